//! LISTEN/NOTIFY between tenants on a shared database: channels are namespaced per tenant, so
//! a tenant receives only its own notifications and cannot forge another's.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::raw::Raw;
use common::{all_rows, assert_isolation_intact, start};

async fn notifications(raw: &mut Raw, wait: Duration) -> Vec<(String, String)> {
    let mut got = Vec::new();
    while let Ok(Some(m)) = tokio::time::timeout(wait, raw.try_recv()).await {
        if m.tag == b'A' {
            let body = &m.body[4..];
            let mut parts = body.split(|&b| b == 0);
            let channel = String::from_utf8_lossy(parts.next().unwrap()).into_owned();
            let payload = String::from_utf8_lossy(parts.next().unwrap()).into_owned();
            got.push((channel, payload));
        }
    }
    got
}

#[tokio::test]
async fn notifications_stay_within_the_tenant() {
    let env = start().await;
    let before = all_rows(&env);
    let acme_t = env.tenant("acme").clone();
    let mut listener = Raw::connect(env.addr(), &[("user", "app@acme")], &acme_t.password).await;
    listener.query("LISTEN events").await;
    listener.until_ready().await;

    // Globex shouts on the same channel name, on acme's namespaced name, and via pg_notify.
    let globex = env.connect("globex").await;
    globex
        .simple_query("NOTIFY events, 'from globex'")
        .await
        .unwrap();
    globex
        .simple_query("NOTIFY \"acme.events\", 'forged'")
        .await
        .unwrap();
    globex
        .simple_query("SELECT pg_notify('acme.events', 'forged too')")
        .await
        .unwrap();
    globex
        .simple_query("SELECT pg_notify('events', 'from globex again')")
        .await
        .unwrap();
    // Acme notifies itself.
    let acme = env.connect("acme").await;
    acme.simple_query("NOTIFY events, 'from acme'")
        .await
        .unwrap();
    acme.simple_query("SELECT pg_notify('events', 'from acme via pg_notify')")
        .await
        .unwrap();

    let got = notifications(&mut listener, Duration::from_millis(700)).await;
    assert_eq!(
        got,
        vec![
            ("events".to_owned(), "from acme".to_owned()),
            ("events".to_owned(), "from acme via pg_notify".to_owned()),
        ]
    );
    // A raw LISTEN on the real channel name of globex is namespaced too.
    listener.query("LISTEN \"globex.events\"").await;
    listener.until_ready().await;
    globex
        .simple_query("NOTIFY events, 'private'")
        .await
        .unwrap();
    assert!(
        notifications(&mut listener, Duration::from_millis(500))
            .await
            .is_empty()
    );
    assert_isolation_intact(&env, &before, &acme).await;
}
