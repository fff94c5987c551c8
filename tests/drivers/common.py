"""Shared parts of the Python driver checks: the environment (see README.md), the per-row
check, and running every client at once."""

import asyncio
import os
import sys

QUERY = (
    "SELECT current_setting('app.current_tenant_id') AS tenant, count(*)::int AS n, "
    "current_setting('work_mem') AS work_mem, pg_backend_pid() AS pid "
    "FROM items WHERE {param}::int >= 0"
)


class Tenant:
    def __init__(self, entry):
        name, user, password, database, tenant_id, rows = entry.split("|")
        self.name, self.user, self.password = name, user, password
        self.database, self.tenant_id, self.rows = database, tenant_id, int(rows)


def spec():
    port = int(os.environ["PGT_PORT"])
    clients = int(os.environ.get("PGT_CLIENTS", "50"))
    tenants = [Tenant(e) for e in os.environ["PGT_TENANTS"].split(";") if e]
    return port, clients, tenants


def work_mem_of(i):
    # Distinct per client, all valid: 1100kB, 1101kB, ...
    return f"{1100 + i}kB"


def check(i, tenant, row):
    tenant_id, n, work_mem, pid = row
    want = (tenant.tenant_id, tenant.rows, work_mem_of(i))
    if (tenant_id, n, work_mem) != want:
        raise AssertionError(f"client {i} ({tenant.name}): got {(tenant_id, n, work_mem)}, want {want}")
    return pid


async def run_clients(client, port, clients, tenants):
    """Runs `client(i, port, tenant, pids)` for every client at once; returns the distinct
    server backends they saw."""
    pids = set()
    await asyncio.gather(*(client(i, port, tenants[i % len(tenants)], pids) for i in range(clients)))
    return pids


def run(main):
    """Runs the coroutine function `main`; any failure is reported and exits non-zero."""
    try:
        asyncio.run(main())
    except Exception as e:  # noqa: BLE001 - report and fail
        print(f"FAILED: {type(e).__name__}: {e}", file=sys.stderr)
        sys.exit(1)
