//! Session pooling (`pool.mode = "session"`): a client keeps one server connection for its
//! whole session, which is reset before the next client gets it. The rest of the suite runs
//! in transaction mode, the default; this file covers what differs.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{Env, start_with};
use pgtenant::demo::ACME_ID;

async fn session_mode(max: usize) -> Env {
    start_with("", move |t| {
        t.replacen("mode = \"transaction\"", "mode = \"session\"", 1)
            .replacen(
                "max_connections = 60",
                &format!("max_connections = {max}"),
                1,
            )
    })
    .await
}

#[tokio::test]
async fn a_client_keeps_its_server_connection_and_session_state() {
    let env = session_mode(5).await;
    let c = env.connect("acme").await;
    let pid: i32 = c
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    c.simple_query("SET work_mem = '3MB'; CREATE TEMP TABLE mine (x int)")
        .await
        .unwrap();
    let other = env.connect("acme").await;
    for _ in 0..3 {
        other.simple_query("SELECT 1").await.unwrap();
        let row = c
            .query_one(
                "SELECT pg_backend_pid(), current_setting('work_mem'), to_regclass('pg_temp.mine') IS NOT NULL, \
                        current_setting('app.current_tenant_id')",
                &[],
            )
            .await
            .unwrap();
        assert_eq!(row.get::<_, i32>(0), pid);
        assert_eq!(row.get::<_, String>(1), "3MB");
        assert!(row.get::<_, bool>(2));
        assert_eq!(row.get::<_, String>(3), ACME_ID);
    }
}

#[tokio::test]
async fn the_next_client_finds_the_connection_reset() {
    let env = session_mode(1).await;
    let c = env.connect("acme").await;
    c.simple_query("SET work_mem = '3MB'; PREPARE p AS SELECT 1; LISTEN ch")
        .await
        .unwrap();
    drop(c);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let next = env.connect("globex").await;
    let row = next
        .query_one(
            "SELECT current_setting('work_mem'), \
                    (SELECT count(*) FROM pg_prepared_statements WHERE name = 'p'), \
                    (SELECT count(*) FROM pg_listening_channels())",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "4MB");
    assert_eq!(row.get::<_, i64>(1), 0);
    assert_eq!(row.get::<_, i64>(2), 0);
}

#[tokio::test]
async fn notifications_are_renamed_on_the_clients_own_connection() {
    let env = session_mode(5).await;
    let t = env.tenant("acme").clone();
    let mut listener =
        common::raw::Raw::connect(env.addr(), &[("user", "app@acme")], &t.password).await;
    listener.query("LISTEN ch").await;
    listener.until_ready().await;
    env.connect("globex")
        .await
        .simple_query("NOTIFY ch, 'no'")
        .await
        .unwrap();
    env.connect("acme")
        .await
        .simple_query("NOTIFY ch, 'yes'")
        .await
        .unwrap();
    let mut got = Vec::new();
    while let Ok(Some(m)) =
        tokio::time::timeout(Duration::from_millis(500), listener.try_recv()).await
    {
        if m.tag == b'A' {
            got.push(String::from_utf8_lossy(&m.body[4..]).into_owned());
        }
    }
    assert_eq!(got, vec!["ch\0yes\0".to_owned()]);
}

/// A reload that removes the tenant: a session in a transaction finishes it (and it commits),
/// then ends with `57P01`; an idle session ends at once. Other tenants go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_tenant_s_sessions_end_at_their_next_transaction_boundary() {
    let env = session_mode(5).await;
    // The connection tasks' results: the FATAL error pgtenant sends when it ends the session.
    let connect = || async {
        let (client, connection) = env
            .pg_config("acme")
            .connect(tokio_postgres::NoTls)
            .await
            .unwrap();
        (client, tokio::spawn(connection))
    };
    let (busy, busy_end) = connect().await;
    let (idle, idle_end) = connect().await;
    let globex = env.connect("globex").await;
    busy.simple_query("BEGIN; INSERT INTO items (name) VALUES ('committed after removal')")
        .await
        .unwrap();
    idle.simple_query("SELECT 1").await.unwrap();

    let without_acme = common::without_tenant(
        &env.fixture.config(&env.addr().to_string(), "").replacen(
            "mode = \"transaction\"",
            "mode = \"session\"",
            1,
        ),
        "acme",
    );
    let snapshot =
        pgtenant::config::load_str(&without_acme, std::path::Path::new("test.toml")).unwrap();
    assert!(snapshot.tenant_by_name("acme").is_none());
    env.proxy.state.reload(snapshot).unwrap();

    // The open transaction goes on and commits.
    busy.simple_query("SELECT 1").await.unwrap();
    busy.simple_query("COMMIT").await.unwrap();
    for ended in [busy_end, idle_end] {
        let err = tokio::time::timeout(Duration::from_secs(20), ended)
            .await
            .expect("the session ends")
            .unwrap()
            .unwrap_err();
        assert_eq!(common::code(&err), "57P01", "{err:?}");
        assert!(common::message(&err).contains("removed"), "{err:?}");
    }
    assert!(idle.simple_query("SELECT 1").await.is_err());
    globex.simple_query("SELECT 1").await.unwrap();
    let committed =
        env.admin_a("SELECT count(*) FROM items WHERE name = 'committed after removal'");
    assert_eq!(committed.trim(), "1");
}
