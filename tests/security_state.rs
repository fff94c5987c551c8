//! State left on a pooled server connection by one tenant is gone before another tenant gets
//! that connection: settings, temporary tables, SQL and protocol prepared statements, cursors
//! WITH HOLD, advisory locks, LISTEN.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{all_rows, start_with};
use postgres_protocol::message::frontend;

#[tokio::test]
async fn a_tenant_finds_nothing_another_left_on_the_connection() {
    // One server connection: globex must get the one acme used.
    let env = start_with("", |t| {
        t.replacen("max_connections = 60", "max_connections = 1", 1)
    })
    .await;
    let before = all_rows(&env);
    let t = env.tenant("acme");
    let mut raw = common::raw::Raw::connect(env.addr(), &[("user", "app@acme")], &t.password).await;
    raw.query(
        "SET work_mem = '7MB'; SET myapp.secret = 'acme-secret'; PREPARE planted AS SELECT 1; \
         LISTEN planted_channel; SELECT pg_advisory_lock(777); \
         CREATE TEMP TABLE planted_temp AS SELECT * FROM items; \
         DECLARE planted_cursor CURSOR WITH HOLD FOR SELECT * FROM items",
    )
    .await;
    let replies = raw.until_ready().await;
    assert!(replies.iter().all(|m| m.tag != b'E'), "planting failed");
    let mut parse = bytes::BytesMut::new();
    frontend::parse("planted_protocol", "SELECT name FROM items", [], &mut parse).unwrap();
    frontend::sync(&mut parse);
    raw.send(&parse).await;
    raw.until_ready().await;
    raw.query("SELECT pg_backend_pid()").await;
    let pid_row = raw.until_ready().await;
    let row = pid_row.iter().find(|m| m.tag == b'D').unwrap();
    let acme_pid: i32 = std::str::from_utf8(&row.body[6..])
        .unwrap()
        .parse()
        .unwrap();
    drop(raw);

    let globex = env.connect("globex").await;
    let pid: i32 = globex
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(pid, acme_pid, "the same server connection");
    let row = globex
        .query_one(
            "SELECT current_setting('work_mem'), \
                    coalesce(current_setting('myapp.secret', true), ''), \
                    (SELECT count(*) FROM pg_prepared_statements WHERE name LIKE 'planted%'), \
                    (SELECT count(*) FROM pg_listening_channels()), \
                    to_regclass('pg_temp.planted_temp') IS NULL, \
                    (SELECT count(*) FROM pg_cursors WHERE name = 'planted_cursor'), \
                    current_setting('app.current_tenant_id')",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "4MB");
    assert_eq!(row.get::<_, String>(1), "");
    assert_eq!(row.get::<_, i64>(2), 0);
    assert_eq!(row.get::<_, i64>(3), 0);
    assert!(row.get::<_, bool>(4));
    assert_eq!(row.get::<_, i64>(5), 0);
    assert_eq!(row.get::<_, String>(6), pgtenant::demo::GLOBEX_ID);
    let locks =
        env.admin_a("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objid = 777");
    assert_eq!(locks.trim(), "0");
    let err = globex.simple_query("EXECUTE planted").await.unwrap_err();
    assert_eq!(common::code(&err), "26000");
    assert_eq!(all_rows(&env), before);
}

/// Transaction pooling with the planting tenant still connected: acme plants state on every
/// server connection of the shard at once, then globex takes every one of them.
#[tokio::test]
async fn state_on_every_pooled_connection_is_gone_for_the_next_tenant() {
    const CONNS: usize = 3;
    let env = start_with("", |t| {
        t.replacen(
            "max_connections = 60",
            &format!("max_connections = {CONNS}"),
            1,
        )
    })
    .await;
    let before = all_rows(&env);
    let mut acme = Vec::new();
    let mut acme_pids = std::collections::BTreeSet::new();
    for i in 0..CONNS {
        let c = env.connect("acme").await;
        // Each client holds a transaction, so each gets its own server connection.
        c.batch_execute(&format!(
            "BEGIN; SET work_mem = '7MB'; SET myapp.secret = 'acme-secret'; \
             PREPARE planted_{i} AS SELECT name FROM items; LISTEN planted_channel; \
             SELECT pg_advisory_lock(7770 + {i}); \
             CREATE TEMP TABLE planted_temp_{i} AS SELECT * FROM items; \
             DECLARE planted_cursor_{i} CURSOR WITH HOLD FOR SELECT * FROM items"
        ))
        .await
        .unwrap();
        c.prepare("SELECT name FROM items WHERE name <> 'acme-protocol-marker'")
            .await
            .unwrap();
        let pid: i32 = c
            .query_one("SELECT pg_backend_pid()", &[])
            .await
            .unwrap()
            .get(0);
        acme_pids.insert(pid);
        acme.push(c);
    }
    assert_eq!(acme_pids.len(), CONNS, "acme holds every server connection");
    for c in &acme {
        c.batch_execute("COMMIT").await.unwrap();
    }

    let mut globex = Vec::new();
    let mut globex_pids = std::collections::BTreeSet::new();
    for _ in 0..CONNS {
        let c = env.connect("globex").await;
        c.batch_execute("BEGIN").await.unwrap();
        let row = c
            .query_one(
                "SELECT pg_backend_pid(), current_setting('work_mem'), \
                        coalesce(current_setting('myapp.secret', true), ''), \
                        (SELECT count(*) FROM pg_prepared_statements \
                          WHERE name LIKE '%planted%' \
                             OR statement LIKE '%acme-' || 'protocol-marker%'), \
                        (SELECT count(*) FROM pg_listening_channels()), \
                        (SELECT count(*) FROM pg_cursors WHERE name LIKE 'planted%'), \
                        current_setting('app.current_tenant_id')",
                &[],
            )
            .await
            .unwrap();
        globex_pids.insert(row.get::<_, i32>(0));
        assert_eq!(row.get::<_, String>(1), "4MB");
        assert_eq!(row.get::<_, String>(2), "");
        assert_eq!(row.get::<_, i64>(3), 0, "prepared statements left behind");
        assert_eq!(row.get::<_, i64>(4), 0, "still listening");
        assert_eq!(row.get::<_, i64>(5), 0, "cursors left behind");
        assert_eq!(row.get::<_, String>(6), pgtenant::demo::GLOBEX_ID);
        let err = c.batch_execute("EXECUTE planted_0").await.unwrap_err();
        assert_eq!(common::code(&err), "26000");
        c.batch_execute("ROLLBACK; BEGIN").await.unwrap();
        globex.push(c);
    }
    assert_eq!(
        globex_pids, acme_pids,
        "globex got every connection acme used"
    );
    // Every server connection is held by globex now: nothing of acme's can remain anywhere.
    let temp = env.admin_a(
        "SELECT count(*) FROM pg_class WHERE relname LIKE 'planted_temp%' AND relpersistence = 't'",
    );
    assert_eq!(temp.trim(), "0", "temporary tables left behind");
    let locks = env.admin_a(
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objid BETWEEN 7770 AND 7779",
    );
    assert_eq!(locks.trim(), "0", "advisory locks left behind");
    for c in &globex {
        c.batch_execute("COMMIT").await.unwrap();
    }
    assert_eq!(all_rows(&env), before);
}
