//! LISTEN/NOTIFY between tenants on a shared database: channels are namespaced per tenant, so
//! a tenant receives only its own notifications and cannot forge another's.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::raw::Raw;
use common::{all_rows, assert_isolation_intact, start};

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

    let got = listener.notifications(Duration::from_millis(700)).await;
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
        listener
            .notifications(Duration::from_millis(500))
            .await
            .is_empty()
    );
    assert_isolation_intact(&env, &before, &acme).await;
}
