"""Shared parsing of the driver-check environment (see README.md)."""

import os

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
