// node-postgres through pgtenant: named queries ({ name, text, values } are prepared once per
// connection by the driver and then only bound), transactions and per-client settings.
'use strict';

const { Client } = require('pg');

const ROUNDS = 10;
const QUERY =
  "SELECT current_setting('app.current_tenant_id') AS tenant, count(*)::int AS n, " +
  "current_setting('work_mem') AS work_mem, pg_backend_pid() AS pid " +
  'FROM items WHERE $1::int >= 0';

function spec() {
  const port = Number(process.env.PGT_PORT);
  const clients = Number(process.env.PGT_CLIENTS || '50');
  const tenants = process.env.PGT_TENANTS.split(';').filter(Boolean).map((e) => {
    const [name, user, password, database, tenantId, rows] = e.split('|');
    return { name, user, password, database, tenantId, rows: Number(rows) };
  });
  return { port, clients, tenants };
}

const workMemOf = (i) => `${1100 + i}kB`;

function check(i, tenant, row) {
  const got = [row.tenant, row.n, row.work_mem];
  const want = [tenant.tenantId, tenant.rows, workMemOf(i)];
  if (JSON.stringify(got) !== JSON.stringify(want)) {
    throw new Error(`client ${i} (${tenant.name}): got ${JSON.stringify(got)}, want ${JSON.stringify(want)}`);
  }
  return row.pid;
}

async function client(i, port, tenant, pids) {
  const c = new Client({
    host: '127.0.0.1', port, user: tenant.user, password: tenant.password, database: tenant.database,
  });
  await c.connect();
  try {
    await c.query(`SET work_mem = '${workMemOf(i)}'`);
    for (let r = 0; r < ROUNDS; r++) {
      let res = await c.query({ name: 'tenant-check', text: QUERY, values: [r] });
      pids.add(check(i, tenant, res.rows[0]));
      await c.query('BEGIN');
      res = await c.query({ name: 'tenant-check', text: QUERY, values: [r] });
      pids.add(check(i, tenant, res.rows[0]));
      res = await c.query('SHOW work_mem');
      if (res.rows[0].work_mem !== workMemOf(i)) throw new Error(`client ${i}: SHOW work_mem is someone else's`);
      await c.query('COMMIT');
    }
    // An error in a named query inside a transaction, then a rollback: the connection goes on.
    await c.query('BEGIN');
    let failed = false;
    try {
      await c.query({ name: 'divide', text: 'SELECT 1/$1::int', values: [0] });
    } catch (e) {
      failed = e.code === '22012';
    }
    await c.query('ROLLBACK');
    if (!failed) throw new Error(`client ${i}: division by zero not reported`);
    const res = await c.query({ name: 'divide-again', text: 'SELECT 1/$1::int AS q', values: [1] });
    if (res.rows[0].q !== 1) throw new Error(`client ${i}: named query after an error gave ${res.rows[0].q}`);
  } finally {
    await c.end();
  }
}

async function main() {
  const { port, clients, tenants } = spec();
  const pids = new Set();
  await Promise.all(Array.from({ length: clients }, (_, i) => client(i, port, tenants[i % tenants.length], pids)));
  console.log(`node-postgres ${require('pg/package.json').version}: ${clients} clients ok`);
  console.log(`pids=${pids.size}`);
}

main().catch((e) => {
  console.error(`FAILED: ${e.stack || e}`);
  process.exit(1);
});
