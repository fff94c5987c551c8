//! The catalog in PostgreSQL: `pgtenant catalog init` and `import` through the command line,
//! two instances reading one catalog, a change reaching both through NOTIFY, an invalid
//! change and an unreachable catalog changing nothing, and `MOVE TENANT` persisted there.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{code, world};
use pgtenant::app::Running;

/// Generous failure-only limit for what takes milliseconds.
const PATIENCE: Duration = Duration::from_secs(15);

fn pgtenant(config: &Path, args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_pgtenant"))
        .arg("--config")
        .arg(config)
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// Waits until `check` holds, for at most [`PATIENCE`]; how long it took.
async fn until(what: &str, check: impl FnMut() -> bool) -> Duration {
    common::until(what, PATIENCE, check).await
}

fn client_config(
    proxy: &Running,
    tenant: &str,
    user: &str,
    password: &str,
) -> tokio_postgres::Config {
    let mut c = tokio_postgres::Config::new();
    c.host("127.0.0.1")
        .port(proxy.addr.port())
        .user(format!("{user}@{tenant}"))
        .password(password)
        .dbname(tenant)
        .connect_timeout(PATIENCE);
    c
}

async fn one(client: &tokio_postgres::Client, sql: &str) -> String {
    client.query_one(sql, &[]).await.unwrap().get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_share_a_catalog_in_postgres() {
    let fixture = common::fresh_fixture().await;
    let dir = common::TempDir::new("catalog");
    let b = &world().b;
    let catalog_db = format!("catalog_{}", std::process::id());
    b.psql("postgres", &format!("CREATE DATABASE {catalog_db}"))
        .unwrap();
    let dsn = format!(
        "postgresql://{}:{}@127.0.0.1:{}/{catalog_db}",
        b.superuser, b.password, b.port
    );
    let catalog = |sql: &str| b.psql(&catalog_db, sql).unwrap();

    // init and import through the command line.
    let source = dir.join("source.toml");
    std::fs::write(&source, fixture.config("127.0.0.1:0", "")).unwrap();
    let (ok, out) = pgtenant(&source, &["catalog", "init", "--dsn", &dsn]);
    assert!(ok, "{out}");
    let (ok, out) = pgtenant(&source, &["catalog", "init", "--dsn", &dsn]);
    assert!(ok, "init is idempotent: {out}");
    let (ok, out) = pgtenant(&source, &["catalog", "import", "--dsn", &dsn]);
    assert!(ok, "{out}");
    assert!(
        out.contains("imported 2 shards, 1 plans, 4 tenants, 8 users"),
        "{out}"
    );
    // Verifiers only: the catalog holds no tenant password.
    let acme = fixture.tenant("acme").unwrap();
    assert!(
        !catalog("SELECT string_agg(scram, ',') FROM pgtenant_catalog.users")
            .contains(&acme.password)
    );

    // Two instances with the catalog in PostgreSQL.
    let verifier = pgtenant::auth::verifier::ScramVerifier::from_password(b"dba-secret");
    let instance = dir.join("instance.toml");
    std::fs::write(
        &instance,
        format!(
            "[listen]\naddr = \"127.0.0.1:0\"\n\n[pool]\nmode = \"transaction\"\n\n\
             [admin]\nusers = [{{ name = \"dba\", scram = \"{verifier}\" }}]\n\n\
             [catalog]\nsource = \"postgres\"\ndsn = \"{dsn}\"\n\n[peering]\n"
        ),
    )
    .unwrap();
    let (ok, out) = pgtenant(&instance, &["check"]);
    assert!(ok && out.contains("4 tenants"), "{out}");
    let start = || async {
        let snapshot = pgtenant::catalog::load(&instance, None).await.unwrap();
        common::start_proxy(snapshot).await.unwrap()
    };
    let (one_proxy, two_proxy) = (start().await, start().await);
    for proxy in [&one_proxy, &two_proxy] {
        let client = common::connect_with(client_config(proxy, "acme", acme.user, &acme.password))
            .await
            .unwrap();
        assert_eq!(
            one(&client, "SELECT min(name) FROM items").await,
            "acme anvil"
        );
    }

    // Each instance claimed its own id in the catalog; a cancel sent to the instance that
    // does not hold the client is forwarded to the one that does.
    let ids = (
        one_proxy.state.cancels.instance(),
        two_proxy.state.cancels.instance(),
    );
    assert!(ids.0 != 0 && ids.1 != 0 && ids.0 != ids.1, "{ids:?}");
    {
        use common::raw::Raw;
        let user = format!("{}@acme", acme.user);
        let params = [("user", user.as_str()), ("database", "acme")];
        let (mut raw, pid, secret) =
            Raw::connect_with_key(one_proxy.addr, &params, &acme.password).await;
        raw.query("SELECT pg_sleep(30)").await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        Raw::cancel(two_proxy.addr, pid, secret).await;
        let reply = tokio::time::timeout(PATIENCE, raw.until_ready())
            .await
            .expect("cancelled through the other instance");
        let error = reply.iter().find(|m| m.tag == b'E').expect("an error");
        assert_eq!(error.sqlstate().as_deref(), Some("57014"));
    }

    // A tenant added to the catalog reaches both instances through NOTIFY.
    let hooli_id = "0b7e3c1a-5d2f-4e6a-9c8b-7a6d5e4f3c21";
    let hooli_verifier = pgtenant::auth::verifier::ScramVerifier::from_password(b"hooli-pw");
    let added = Instant::now();
    catalog(&format!(
        "BEGIN;
         INSERT INTO pgtenant_catalog.tenants (id, name, plan, placement, shard)
              VALUES ('{hooli_id}', 'hooli', 'basic', 'shared', 'shared-a');
         INSERT INTO pgtenant_catalog.users (tenant_id, name, scram)
              VALUES ('{hooli_id}', 'app', '{hooli_verifier}');
         COMMIT;"
    ));
    let has_hooli = |p: &Running| p.state.snapshot().tenant_by_name("hooli").is_some();
    until("hooli on both instances", || {
        has_hooli(&one_proxy) && has_hooli(&two_proxy)
    })
    .await;
    eprintln!(
        "a tenant added to the catalog was served by both instances {:?} after its commit",
        added.elapsed()
    );
    let hooli = common::connect_with(client_config(&two_proxy, "hooli", "app", "hooli-pw"))
        .await
        .unwrap();
    assert_eq!(
        hooli
            .query_one("SELECT count(*) FROM items", &[])
            .await
            .unwrap()
            .get::<_, i64>(0),
        0
    );

    // An invalid change (an unknown plan) changes nothing.
    catalog("UPDATE pgtenant_catalog.tenants SET plan = 'no-such-plan' WHERE name = 'hooli'");
    tokio::time::sleep(Duration::from_millis(500)).await;
    for p in [&one_proxy, &two_proxy] {
        let s = p.state.snapshot();
        assert_eq!(
            s.tenant_by_name("hooli").unwrap().plan.as_deref(),
            Some("basic")
        );
    }
    hooli.simple_query("SELECT 1").await.unwrap();
    catalog("UPDATE pgtenant_catalog.tenants SET plan = 'basic' WHERE name = 'hooli'");

    // MOVE TENANT on one instance is written to the catalog; the other instance's sessions
    // follow at their next transaction.
    let second_db = format!("catalog_moved_{}", std::process::id());
    let key_file = dir.join("shared-b.key");
    let shard_b = {
        let (db, key) = (second_db.clone(), key_file.clone());
        tokio::task::spawn_blocking(move || common::second_shared_shard(&db, &key))
            .await
            .unwrap()
    };
    let shard_b: toml::Table = toml::from_str(&shard_b).unwrap();
    let b_table = shard_b["shards"]["shared-b"].as_table().unwrap();
    let mut settings = b_table.clone();
    for k in ["host", "port", "database", "user"] {
        settings.remove(k);
    }
    catalog(&format!(
        "INSERT INTO pgtenant_catalog.shards (name, host, port, database, \"user\", settings)
         VALUES ('shared-b', '127.0.0.1', {}, '{second_db}', '{}', '{}')",
        b_table["port"].as_integer().unwrap(),
        b_table["user"].as_str().unwrap(),
        serde_json::to_string(&settings).unwrap()
    ));
    until("shared-b on both instances", || {
        [&one_proxy, &two_proxy]
            .iter()
            .all(|p| p.state.snapshot().shards.contains_key("shared-b"))
    })
    .await;
    let on_two = common::connect_with(client_config(&two_proxy, "acme", acme.user, &acme.password))
        .await
        .unwrap();
    assert_eq!(
        one(&on_two, "SELECT current_database()").await,
        fixture.shared_db
    );
    let console = common::connect_with(
        format!(
            "postgresql://dba:dba-secret@127.0.0.1:{}/pgtenant",
            one_proxy.addr.port()
        )
        .parse()
        .unwrap(),
    )
    .await
    .unwrap();
    console
        .simple_query("MOVE TENANT acme TO shared-b")
        .await
        .unwrap();
    assert_eq!(
        catalog("SELECT shard FROM pgtenant_catalog.tenants WHERE name = 'acme'").trim(),
        "shared-b"
    );
    until("acme moved on the other instance", || {
        two_proxy
            .state
            .snapshot()
            .tenant_by_name("acme")
            .is_some_and(|t| t.placement.shard == "shared-b")
    })
    .await;
    assert_eq!(one(&on_two, "SELECT current_database()").await, second_db);

    // The catalog unreachable: the snapshot in force keeps serving, RELOAD says why.
    b.psql(
        "postgres",
        &format!(
            "ALTER DATABASE {catalog_db} ALLOW_CONNECTIONS false;
             SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{catalog_db}';"
        ),
    )
    .unwrap();
    let err = console.simple_query("RELOAD").await.unwrap_err();
    assert_eq!(code(&err), "F0000", "{err:?}");
    common::connect_with(client_config(&one_proxy, "hooli", "app", "hooli-pw"))
        .await
        .unwrap()
        .simple_query("SELECT 1")
        .await
        .unwrap();
    b.psql(
        "postgres",
        &format!("ALTER DATABASE {catalog_db} ALLOW_CONNECTIONS true"),
    )
    .unwrap();
    // Back: the listeners reconnect, and a change reaches both again.
    let removed = Instant::now();
    let mut deleted = false;
    until("hooli removed on both instances", || {
        if !deleted {
            // Retried until the listeners are back (a change made while they reconnect is
            // read by the reload that follows their LISTEN).
            deleted = b
                .psql(
                    &catalog_db,
                    "DELETE FROM pgtenant_catalog.tenants WHERE name = 'hooli'",
                )
                .is_ok();
        }
        !has_hooli(&one_proxy) && !has_hooli(&two_proxy)
    })
    .await;
    eprintln!(
        "after the catalog came back, a removal reached both instances in {:?}",
        removed.elapsed()
    );

    drop(console);
    one_proxy.shutdown(Duration::from_secs(1)).await;
    two_proxy.shutdown(Duration::from_secs(1)).await;
    // Their ids are free again.
    assert_eq!(
        catalog("SELECT count(*) FROM pgtenant_catalog.instances").trim(),
        "0"
    );
}
