//! Other tenants' sessions: a tenant cannot see them in pg_stat_activity, cancel or terminate
//! them with SQL, or cancel them with a guessed key.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{all_rows, assert_all_refused, assert_isolation_intact, start};

#[tokio::test]
async fn other_sessions_cannot_be_seen_or_signalled() {
    let env = start().await;
    let before = all_rows(&env);
    let globex = env.connect("globex").await;
    let victim_pid: i32 = globex
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    let acme = env.connect("acme").await;
    let attacks = [
        "SELECT pid, query FROM pg_stat_activity".to_owned(),
        "SELECT * FROM pg_catalog.pg_stat_activity WHERE datname = current_database()".to_owned(),
        "SELECT pg_stat_get_activity(NULL)".to_owned(),
        format!("SELECT pg_stat_get_backend_activity({victim_pid})"),
        "SELECT * FROM pg_locks".to_owned(),
        format!("SELECT pg_cancel_backend({victim_pid})"),
        format!("SELECT pg_terminate_backend({victim_pid})"),
        format!("SELECT pg_catalog.pg_terminate_backend({victim_pid}, 1000)"),
        format!("SELECT pg_signal_backend({victim_pid}, 15)"),
        format!("SELECT \"pg_terminate_backend\"({victim_pid})"),
    ];
    let attacks: Vec<&str> = attacks.iter().map(String::as_str).collect();
    assert_all_refused(&acme, &attacks).await;

    // The victim's long query is not cancelled by guessed keys either.
    let running =
        tokio::spawn(async move { globex.simple_query("SELECT pg_sleep(1)").await.map(|_| ()) });
    for guess in 0..20 {
        let mut packet = bytes::BytesMut::new();
        postgres_protocol::message::frontend::cancel_request(victim_pid, guess, &mut packet);
        let mut s = tokio::net::TcpStream::connect(env.addr()).await.unwrap();
        tokio::io::AsyncWriteExt::write_all(&mut s, &packet)
            .await
            .unwrap();
    }
    tokio::time::timeout(Duration::from_secs(5), running)
        .await
        .unwrap()
        .unwrap()
        .expect("the victim's query finished undisturbed");
    assert_isolation_intact(&env, &before, &acme).await;
}

/// Sessions' databases, roles and application names are not shown to tenants of any
/// placement (the database refuses: dedicated placements have no statement guard).
#[tokio::test]
async fn no_placement_sees_other_sessions_application_names() {
    let env = start().await;
    let mut c = env.pg_config("globex");
    c.application_name("globex-secret-app");
    let _globex = common::connect_with(c).await.unwrap();
    for tenant in ["umbrella", "initech"] {
        let client = env.connect(tenant).await;
        for sql in [
            "SELECT application_name, datname, usename FROM pg_stat_activity",
            "SELECT * FROM pg_stat_get_activity(NULL)",
        ] {
            let err = client.simple_query(sql).await.unwrap_err();
            assert_eq!(common::code(&err), "42501", "{tenant}: {sql}");
        }
    }
}
