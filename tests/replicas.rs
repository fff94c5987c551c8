//! Read replicas with a real streaming standby (`pg_basebackup`): sessions of `readonly` users
//! and transactions a client marks `READ ONLY` go to the replica, with the tenant context
//! verified there as on the primary; everything else goes to the primary; a lagging replica is
//! skipped, and when it is down or lagging reads fall back to the primary.
//!
//! This binary starts its own clusters (it pauses and stops the standby).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::time::Duration;

use bytes::BytesMut;
use common::raw::Raw;
use pgtenant::demo;
use pgtenant::localpg::Cluster;
use postgres_protocol::message::frontend;

const PATIENCE: Duration = Duration::from_secs(30);

async fn until(what: &str, check: impl FnMut() -> bool) {
    common::until(what, PATIENCE, check).await;
}

/// Where a statement runs: "t" on the standby, "f" on the primary.
async fn in_recovery(client: &tokio_postgres::Client) -> String {
    let rows = client
        .simple_query("SELECT pg_is_in_recovery()")
        .await
        .unwrap();
    common::first_value(&rows)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_go_to_the_replica_and_fall_back_to_the_primary() {
    common::use_cluster_template();
    let (a, b, fixture, mut standby) = tokio::task::spawn_blocking(|| {
        let a = Cluster::start(&[]).unwrap();
        let b = Cluster::start(&[]).unwrap();
        demo::create_roles(&a, &b).unwrap();
        let fixture = demo::create_fixture(&a, &b, "_replicas").unwrap();
        // After the fixture, so that the standby has its databases.
        let standby = a.start_replica().unwrap();
        (a, b, fixture, standby)
    })
    .await
    .unwrap();
    let text = fixture
        .config("127.0.0.1:0", "")
        .replacen(
            "[pool]\n",
            "[pool]\nhealth_check_interval = \"200ms\"\nhealth_check_timeout = \"1s\"\n",
            1,
        )
        .replacen(
            "[shards.shared-a]\n",
            &format!(
                "[shards.shared-a]\nreplicas = [{{ host = \"127.0.0.1\", port = {} }}]\nmax_replica_lag = \"1s\"\n",
                standby.port
            ),
            1,
        );
    let snapshot = pgtenant::config::load_str(&text, Path::new("replicas.toml")).unwrap();
    let proxy = common::start_proxy(snapshot).await.unwrap();
    let health = proxy.state.pools.health("shared-a#replica1");
    until("the replica checked", || {
        health.serves_reads(Duration::from_secs(1))
    })
    .await;

    let acme = fixture.tenant("acme").unwrap();
    let connect = |user: &str| {
        let mut c = tokio_postgres::Config::new();
        c.host("127.0.0.1")
            .port(proxy.addr.port())
            .user(format!("{user}@acme"))
            .password(acme.password.clone())
            .dbname("acme");
        common::connect_with(c)
    };
    let reader = connect("reader").await.unwrap();
    let app = connect(acme.user).await.unwrap();

    // A readonly user's session reads from the standby, and sees only its tenant's rows
    // there: the verified context works on the replica too.
    assert_eq!(in_recovery(&reader).await, "t");
    let names: Vec<String> = reader
        .query("SELECT name FROM items ORDER BY name", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(names, ["acme anvil", "acme rocket skates"]);

    // The read-write user: the primary, except transactions marked READ ONLY.
    assert_eq!(in_recovery(&app).await, "f");
    let rows = app
        .simple_query("BEGIN READ ONLY; SELECT pg_is_in_recovery(); COMMIT")
        .await
        .unwrap();
    assert_eq!(common::first_value(&rows), "t");
    app.batch_execute("START TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        .await
        .unwrap();
    assert_eq!(in_recovery(&app).await, "t");
    app.batch_execute("COMMIT").await.unwrap();
    app.simple_query("INSERT INTO items (name) VALUES ('written on the primary')")
        .await
        .unwrap();
    assert_eq!(in_recovery(&app).await, "f");

    // A transaction routed to the replica cannot be turned into a write: the standby refuses
    // every write (25006), and the switch back to read-write (0A000, 25001), whatever the
    // client sends after BEGIN READ ONLY.
    for attack in [
        "BEGIN READ ONLY; INSERT INTO items (name) VALUES ('replica attack')",
        "BEGIN READ ONLY; SET TRANSACTION READ WRITE",
        "BEGIN READ ONLY; SET LOCAL transaction_read_only = off; INSERT INTO items (name) VALUES ('replica attack')",
        "START TRANSACTION READ ONLY; SELECT set_config('transaction_read_only', 'off', true)",
    ] {
        let err = app.simple_query(attack).await.unwrap_err();
        assert!(
            matches!(
                common::code(&err).as_str(),
                "25006" | "25001" | "0A000" | "42501"
            ),
            "{attack}: {} {err:?}",
            common::code(&err)
        );
        app.batch_execute("ROLLBACK").await.unwrap();
    }
    // The same, pipelined in the extended protocol: BEGIN READ ONLY and a write in one batch.
    let mut raw = Raw::connect(
        proxy.addr,
        &[("user", "app@acme"), ("database", "acme")],
        &acme.password,
    )
    .await;
    let mut out = BytesMut::new();
    for sql in [
        "BEGIN READ ONLY",
        "INSERT INTO items (name) VALUES ('replica attack')",
        "COMMIT",
    ] {
        Raw::put_parse_bind_execute(&mut out, sql);
    }
    frontend::sync(&mut out);
    raw.send(&out).await;
    let replies = raw.until_ready().await;
    let error = replies
        .iter()
        .find(|m| m.tag == b'E')
        .expect("the write refused");
    assert_eq!(error.sqlstate().as_deref(), Some("25006"));
    drop(raw);
    let written = a
        .psql(
            &fixture.shared_db,
            "SELECT count(*) FROM items WHERE name = 'replica attack'",
        )
        .unwrap();
    assert_eq!(written.trim(), "0", "nothing was written");
    // The tenant's context holds on the replica: another tenant's rows stay invisible there.
    let rows = reader
        .simple_query(&format!(
            "SELECT count(*) FROM items WHERE tenant_id <> '{}'",
            demo::ACME_ID
        ))
        .await
        .unwrap();
    assert_eq!(common::first_value(&rows), "0");

    // A lagging replica is skipped: replay paused while the primary writes.
    standby
        .psql(&fixture.shared_db, "SELECT pg_wal_replay_pause()")
        .unwrap();
    a.psql(
        &fixture.shared_db,
        "CREATE TABLE lag_marker (x int); DROP TABLE lag_marker",
    )
    .unwrap();
    until("the lag seen", || {
        !health.serves_reads(Duration::from_secs(1))
    })
    .await;
    assert_eq!(
        in_recovery(&reader).await,
        "f",
        "reads fall back to the primary"
    );
    eprintln!("replica lag found: {:?}", health.lag());
    standby
        .psql(&fixture.shared_db, "SELECT pg_wal_replay_resume()")
        .unwrap();
    until("the replica caught up", || {
        health.serves_reads(Duration::from_secs(1))
    })
    .await;
    assert_eq!(in_recovery(&reader).await, "t");

    // The replica down: reads fall back to the primary at once, without an error.
    tokio::task::block_in_place(|| standby.halt());
    assert_eq!(in_recovery(&reader).await, "f");
    assert_eq!(in_recovery(&reader).await, "f");
    tokio::task::block_in_place(|| standby.resume()).unwrap();
    until("the replica back", || {
        health.serves_reads(Duration::from_secs(1))
    })
    .await;
    assert_eq!(in_recovery(&reader).await, "t");

    drop((reader, app));
    proxy.shutdown(Duration::from_secs(1)).await;
    drop((a, b));
}
