"""psycopg 3 through pgtenant: server-side prepared statements (prepare=True and the automatic
prepare_threshold), explicit transactions, pipeline mode and per-client settings."""

import asyncio

import psycopg

from common import QUERY, check, run, run_clients, spec, work_mem_of

ROUNDS = 10


async def client(i, port, tenant, pids):
    conn = await psycopg.AsyncConnection.connect(
        host="127.0.0.1", port=port, user=tenant.user, password=tenant.password,
        dbname=tenant.database, autocommit=True, prepare_threshold=0,
    )
    async with conn:
        await conn.execute(f"SET work_mem = '{work_mem_of(i)}'")
        # set_config with bound parameters, as psycopg sends it: checked at Bind and kept
        # across server connections like SET.
        await conn.execute("select set_config(%s, %s, false)", ["myapp.client", str(i)])
        query = QUERY.format(param="%s")
        for r in range(ROUNDS):
            cur = await conn.execute(query, (r,), prepare=True)
            pids.add(check(i, tenant, await cur.fetchone()))
            async with conn.transaction():
                cur = await conn.execute(query, (r,), prepare=True)
                pids.add(check(i, tenant, await cur.fetchone()))
                cur = await conn.execute("SHOW work_mem")
                if (await cur.fetchone())[0] != work_mem_of(i):
                    raise AssertionError(f"client {i}: SHOW work_mem is someone else's")
                cur = await conn.execute("SELECT current_setting(%s)", ["myapp.client"])
                if (await cur.fetchone())[0] != str(i):
                    raise AssertionError(f"client {i}: set_config value is someone else's")
            await asyncio.sleep(0)
        # Pipeline mode: several statements, each with its own Sync, in one round trip.
        async with conn.pipeline():
            curs = [await conn.execute(query, (r,), prepare=True) for r in range(3)]
        for cur in curs:
            pids.add(check(i, tenant, await cur.fetchone()))
        # An error in the middle of a pipeline fails that statement only.
        try:
            async with conn.pipeline():
                await conn.execute("SELECT 1")
                await conn.execute("SELECT 1/0")
        except psycopg.errors.DivisionByZero:
            pass
        else:
            raise AssertionError(f"client {i}: division by zero not reported")
        cur = await conn.execute(query, (0,), prepare=True)
        pids.add(check(i, tenant, await cur.fetchone()))
        # Statements really were prepared on the server, by psycopg's own names.
        if not conn._prepared._names:
            raise AssertionError(f"client {i}: psycopg prepared nothing")
        # A small statement cache: psycopg deallocates the statements it evicts (with SQL
        # DEALLOCATE of its own names), wherever the client's connection is by then.
        conn.prepared_max = 2
        for k in range(6):
            cur = await conn.execute(f"SELECT {k} + %s::int", (k,), prepare=True)
            if (await cur.fetchone())[0] != 2 * k:
                raise AssertionError(f"client {i}: wrong result from cached statement {k}")


async def main():
    port, clients, tenants = spec()
    pids = await run_clients(client, port, clients, tenants)
    print(f"psycopg {psycopg.__version__}: {clients} clients ok")
    print(f"pids={len(pids)}")


if __name__ == "__main__":
    run(main)
