"""asyncpg through pgtenant: its statement cache (named statements for every query), explicit
prepare(), transactions, type introspection, per-client settings and LISTEN/NOTIFY through
add_listener, which must only ever deliver the client's own tenant's notifications."""

import asyncio

import asyncpg

from common import QUERY, check, run, run_clients, spec, work_mem_of

ROUNDS = 10


async def client(i, port, tenant, pids):
    conn = await asyncpg.connect(
        host="127.0.0.1", port=port, user=tenant.user, password=tenant.password,
        database=tenant.database, statement_cache_size=100,
    )
    try:
        await conn.execute(f"SET work_mem = '{work_mem_of(i)}'")
        query = QUERY.format(param="$1")
        stmt = await conn.prepare(query)
        for r in range(ROUNDS):
            pids.add(check(i, tenant, tuple(await conn.fetchrow(query, r))))
            async with conn.transaction():
                pids.add(check(i, tenant, tuple(await stmt.fetchrow(r))))
                if await conn.fetchval("SHOW work_mem") != work_mem_of(i):
                    raise AssertionError(f"client {i}: SHOW work_mem is someone else's")
            await asyncio.sleep(0)
        # Type introspection (asyncpg looks up unknown types with its own prepared queries).
        got = await conn.fetchval("SELECT $1::int[]", [1, 2, i])
        if got != [1, 2, i]:
            raise AssertionError(f"client {i}: array round trip gave {got}")
        # An error inside a transaction rolls it back and the connection goes on.
        try:
            async with conn.transaction():
                await conn.execute("SELECT 1/0")
        except asyncpg.exceptions.DivisionByZeroError:
            pass
        pids.add(check(i, tenant, tuple(await stmt.fetchrow(0))))
        if len(conn._stmt_cache) == 0:
            raise AssertionError(f"client {i}: the statement cache is empty")
    finally:
        await conn.close()


async def notifications(port, tenants):
    """Each tenant listens on the same channel name; each sends one notification; each
    receives exactly its own."""
    got = {t.name: [] for t in tenants}
    conns = []
    for t in tenants:
        c = await asyncpg.connect(host="127.0.0.1", port=port, user=t.user,
                                  password=t.password, database=t.database)
        await c.add_listener("events", lambda _c, _pid, ch, payload, name=t.name: got[name].append((ch, payload)))
        conns.append(c)
    sender = []
    for t in tenants:
        c = await asyncpg.connect(host="127.0.0.1", port=port, user=t.user,
                                  password=t.password, database=t.database)
        await c.execute(f"NOTIFY events, 'from-{t.name}'")
        sender.append(c)
    for _ in range(100):
        if all(got[t.name] for t in tenants):
            break
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.2)
    for t in tenants:
        if got[t.name] != [("events", f"from-{t.name}")]:
            raise AssertionError(f"{t.name} received {got[t.name]}")
    for c in conns + sender:
        await c.close()


async def main():
    port, clients, tenants = spec()
    pids = await run_clients(client, port, clients, tenants)
    await notifications(port, tenants)
    print(f"asyncpg {asyncpg.__version__}: {clients} clients ok, notifications per tenant ok")
    print(f"pids={len(pids)}")


if __name__ == "__main__":
    run(main)
