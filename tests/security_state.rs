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
    let locks = env.admin_a(
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' \
           AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
    );
    assert_eq!(locks.trim(), "0");
    let err = globex.simple_query("EXECUTE planted").await.unwrap_err();
    assert_eq!(common::code(&err), "26000");
    assert_eq!(all_rows(&env), before);
}

/// Transaction pooling with the planting tenant still connected: acme plants state on every
/// server connection of the shard at once, then globex takes every one of them. (State that
/// pins a connection to its client, such as temporary tables, is covered below.)
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
             SELECT pg_advisory_xact_lock(7770 + {i}); \
             DECLARE planted_cursor_{i} CURSOR FOR SELECT * FROM items"
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
    let locks = env.admin_a(
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' \
           AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
    );
    assert_eq!(locks.trim(), "0", "advisory locks left behind");
    for c in &globex {
        c.batch_execute("COMMIT").await.unwrap();
    }
    assert_eq!(all_rows(&env), before);
}

/// Transaction pooling: a temporary table, a WITH HOLD cursor or a session advisory lock pins
/// the client's server connection to it (its later transactions see them, as on PostgreSQL),
/// the pin counts toward the tenant's server cap, and when the client leaves the connection is
/// reset before anyone else gets it.
#[tokio::test]
async fn session_state_pins_the_server_connection_until_the_client_leaves() {
    let env = start_with("", |t| {
        t.replacen("max_connections = 60", "max_connections = 3", 1)
            .replacen(
                "mode = \"transaction\"",
                "mode = \"transaction\"\ncheckout_timeout = \"1s\"",
                1,
            )
            .replace(
                "name = \"acme\"\nplan = \"basic\"\n",
                "name = \"acme\"\nplan = \"basic\"\nsettings = { max_server_connections = 2 }\n",
            )
    })
    .await;
    let acme = env.connect("acme").await;
    acme.batch_execute(
        "CREATE TEMP TABLE scratch (x int); INSERT INTO scratch VALUES (1), (2); \
         SELECT pg_advisory_lock(42); \
         DECLARE held CURSOR WITH HOLD FOR SELECT x FROM scratch ORDER BY x",
    )
    .await
    .unwrap();
    let pid: i32 = acme
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    // Another acme client works meanwhile on the other connection.
    let other = env.connect("acme").await;
    for _ in 0..5 {
        let p: i32 = other
            .query_one("SELECT pg_backend_pid()", &[])
            .await
            .unwrap()
            .get(0);
        assert_ne!(p, pid, "the pinned connection went to another client");
        let n: i64 = other
            .query_one(
                "SELECT count(*) FROM pg_class WHERE relname = 'scratch' AND relpersistence = 't' \
                   AND pg_table_is_visible(oid)",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, 0);
    }
    // The pinning client still has its table, cursor and lock in later transactions.
    for _ in 0..3 {
        let row = acme
            .query_one(
                "SELECT pg_backend_pid(), (SELECT count(*) FROM scratch), \
                        (SELECT count(*) FROM pg_cursors WHERE name = 'held')",
                &[],
            )
            .await
            .unwrap();
        assert_eq!(row.get::<_, i32>(0), pid);
        assert_eq!(row.get::<_, i64>(1), 2);
        assert_eq!(row.get::<_, i64>(2), 1);
    }
    let fetched = acme.simple_query("FETCH 1 FROM held").await.unwrap();
    assert!(
        fetched
            .iter()
            .any(|m| matches!(m, tokio_postgres::SimpleQueryMessage::Row(_)))
    );
    let unlocked: bool = acme
        .query_one("SELECT pg_advisory_unlock(42)", &[])
        .await
        .unwrap()
        .get(0);
    assert!(unlocked, "the lock is held by this client's own connection");
    acme.batch_execute("SELECT pg_advisory_lock(42)")
        .await
        .unwrap();

    // The pin counts toward acme's cap of 2: with `other` inside a transaction, a third acme
    // client waits and then gets 53300.
    other.batch_execute("BEGIN").await.unwrap();
    let Err(err) = common::connect_with(env.pg_config("acme")).await else {
        panic!("a third acme client over the cap got in");
    };
    assert_eq!(common::code(&err), "53300");
    other.batch_execute("COMMIT").await.unwrap();

    // When the client leaves, its connection is reset (DISCARD ALL) before anyone gets it.
    drop(acme);
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let globex = env.connect("globex").await;
    let mut seen = std::collections::BTreeSet::new();
    let busy = env.connect("acme").await;
    busy.batch_execute("BEGIN").await.unwrap();
    let row = globex
        .query_one(
            "SELECT pg_backend_pid(), \
                    (SELECT count(*) FROM pg_class WHERE relname = 'scratch' AND relpersistence = 't'), \
                    (SELECT count(*) FROM pg_cursors WHERE name = 'held')",
            &[],
        )
        .await
        .unwrap();
    seen.insert(row.get::<_, i32>(0));
    assert_eq!(
        row.get::<_, i64>(1),
        0,
        "the temporary table outlived its client"
    );
    assert_eq!(row.get::<_, i64>(2), 0);
    busy.batch_execute("COMMIT").await.unwrap();
    let locks = env.admin_a(
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' \
           AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
    );
    assert_eq!(locks.trim(), "0", "the advisory lock outlived its client");
}

/// Advisory lock keys are namespaced per tenant on shared placements: two tenants taking the
/// same key do not block each other; within one tenant the locks behave as on PostgreSQL.
#[tokio::test]
async fn advisory_lock_keys_are_per_tenant() {
    let env = start_with("", |t| t).await;
    let acme = env.connect("acme").await;
    let acme2 = env.connect("acme").await;
    let globex = env.connect("globex").await;
    for (sql, key) in [
        ("SELECT pg_try_advisory_xact_lock($1::int)", "one key"),
        ("SELECT pg_try_advisory_xact_lock($1::int, 7)", "two keys"),
    ] {
        acme.batch_execute("BEGIN").await.unwrap();
        let got: bool = acme.query_one(sql, &[&4242i32]).await.unwrap().get(0);
        assert!(got, "{key}");
        globex.batch_execute("BEGIN").await.unwrap();
        let got: bool = globex.query_one(sql, &[&4242i32]).await.unwrap().get(0);
        assert!(
            got,
            "{key}: another tenant's lock on the same key blocked globex"
        );
        acme2.batch_execute("BEGIN").await.unwrap();
        let got: bool = acme2.query_one(sql, &[&4242i32]).await.unwrap().get(0);
        assert!(
            !got,
            "{key}: acme's own lock must block acme's other client"
        );
        for c in [&acme, &acme2, &globex] {
            c.batch_execute("COMMIT").await.unwrap();
        }
    }
    // A key given any way (expression, parameter, nested call) stays in the namespace.
    acme.batch_execute("SELECT pg_advisory_lock(4242)")
        .await
        .unwrap();
    let got: bool = globex
        .query_one("SELECT pg_try_advisory_lock(4000 + 242)", &[])
        .await
        .unwrap()
        .get(0);
    assert!(got);
    let got: bool = acme2
        .query_one("SELECT pg_try_advisory_lock(4000 + 242)", &[])
        .await
        .unwrap()
        .get(0);
    assert!(!got);
    let err = acme2
        .simple_query("SELECT pg_advisory_lock(1, 2, 3)")
        .await
        .unwrap_err();
    assert_eq!(common::code(&err), "42501");
}
