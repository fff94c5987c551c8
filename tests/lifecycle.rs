//! Shutdown, restart and reload: a shutdown ends sessions between transactions at once, lets
//! open transactions finish, then ends them with `57P01`; two instances sharing the port with
//! `reuse_port` replace each other without a client seeing a failure; reloads under load fail
//! no query.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use common::{Env, code, start_with};

/// Generous failure-only limit for things that take milliseconds.
const PATIENCE: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_lets_open_transactions_finish_and_ends_idle_sessions_at_once() {
    let Env { fixture, proxy, .. } = start_with("", |t| t).await;
    let env_port = proxy.addr.port();
    let config = |tenant: &str| {
        let t = fixture.tenant(tenant).unwrap();
        let mut c = tokio_postgres::Config::new();
        c.host("127.0.0.1")
            .port(env_port)
            .user(format!("{}@{}", t.user, t.name))
            .password(t.password.clone())
            .dbname(t.name);
        c
    };
    let idle = common::connect_with(config("acme")).await.unwrap();
    idle.simple_query("SELECT 1").await.unwrap();
    let busy = common::connect_with(config("globex")).await.unwrap();
    busy.simple_query("BEGIN; SELECT count(*) FROM items")
        .await
        .unwrap();

    let grace = Duration::from_secs(60);
    let shutdown = tokio::spawn(proxy.shutdown(grace));
    // The idle session is ended at once; a new connection is refused.
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let err = loop {
        match idle.simple_query("SELECT 1").await {
            Err(e) => break e,
            Ok(_) => {
                assert!(tokio::time::Instant::now() < deadline, "idle session kept");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    assert!(
        err.as_db_error().is_none() || code(&err) == "57P01",
        "{err:?}"
    );
    assert!(
        tokio::net::TcpStream::connect(("127.0.0.1", env_port))
            .await
            .is_err(),
        "still accepting"
    );
    // The open transaction goes on and commits; the session ends after it.
    busy.simple_query("INSERT INTO items (name) VALUES ('written while shutting down')")
        .await
        .unwrap();
    busy.simple_query("COMMIT").await.unwrap();
    tokio::time::timeout(PATIENCE, shutdown)
        .await
        .expect("shutdown ends once no transaction is open, long before the grace period")
        .unwrap();
    assert!(busy.simple_query("SELECT 1").await.is_err());
    let committed = common::world().a.psql(
        &fixture.shared_db,
        "SELECT count(*) FROM items WHERE name = 'written while shutting down'",
    );
    assert_eq!(committed.unwrap().trim(), "1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_ends_a_transaction_still_open_after_the_grace_period() {
    let Env { fixture, proxy, .. } = start_with("", |t| t).await;
    let t = fixture.tenant("acme").unwrap();
    let mut c = tokio_postgres::Config::new();
    c.host("127.0.0.1")
        .port(proxy.addr.port())
        .user(format!("{}@{}", t.user, t.name))
        .password(t.password.clone())
        .dbname(t.name);
    let client = common::connect_with(c).await.unwrap();
    client.simple_query("BEGIN").await.unwrap();
    tokio::time::timeout(PATIENCE, proxy.shutdown(Duration::from_millis(300)))
        .await
        .expect("shutdown ends after its grace period");
    let err = client.simple_query("SELECT 1").await.unwrap_err();
    assert!(
        err.as_db_error().is_none() || code(&err) == "57P01",
        "{err:?}"
    );
}

/// With `reuse_port`, a second instance listens on the first one's port; the first shuts
/// down; a client connecting in a loop the whole time never fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_with_reuse_port_refuses_no_connection() {
    // Connections the kernel queued on the closing listener move to the other one instead of
    // being reset (Linux ≥ 5.14, net.ipv4.tcp_migrate_req); the README asks operators to set
    // it for rolling restarts. Set here for the test (as root) and put back after.
    let migrate = MigrateReq::enable();
    let reuse = |text: String| text.replacen("[listen]\n", "[listen]\nreuse_port = true\n", 1);
    let Env { fixture, proxy, .. } = start_with("", reuse).await;
    let addr = proxy.addr;
    let t = fixture.tenant("acme").unwrap();
    let mut config = tokio_postgres::Config::new();
    config
        .host("127.0.0.1")
        .port(addr.port())
        .user(format!("{}@{}", t.user, t.name))
        .password(t.password.clone())
        .dbname(t.name)
        .connect_timeout(PATIENCE);

    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicUsize::new(0));
    let mut loops = Vec::new();
    for _ in 0..2 {
        let (config, stop, done) = (config.clone(), stop.clone(), done.clone());
        loops.push(tokio::spawn(async move {
            let mut failures = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let result = async {
                    let client = common::connect_with(config.clone()).await?;
                    client.simple_query("SELECT count(*) FROM items").await?;
                    Ok::<_, tokio_postgres::Error>(())
                }
                .await;
                match result {
                    Ok(()) => {
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => failures.push(format!("{e:?}")),
                }
            }
            failures
        }));
    }
    let wait_for = |n: usize| {
        let done = done.clone();
        async move {
            let target = done.load(Ordering::Relaxed) + n;
            tokio::time::timeout(PATIENCE, async {
                while done.load(Ordering::Relaxed) < target {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            })
            .await
            .expect("the client loop makes progress");
        }
    };
    wait_for(20).await;
    // The replacement: same configuration, same address.
    let text = reuse(fixture.config(&addr.to_string(), ""));
    let snapshot = pgtenant::config::load_str(&text, Path::new("test.toml")).unwrap();
    let second = common::start_proxy(snapshot)
        .await
        .expect("a second instance shares the port");
    assert_eq!(second.addr, addr);
    wait_for(20).await;
    proxy.shutdown(Duration::from_secs(10)).await;
    wait_for(40).await;
    stop.store(true, Ordering::Relaxed);
    let mut failures = Vec::new();
    for l in loops {
        failures.extend(l.await.unwrap());
    }
    if migrate.on {
        assert!(failures.is_empty(), "{failures:#?}");
    } else {
        eprintln!(
            "net.ipv4.tcp_migrate_req is off and cannot be set: {} connection(s) queued on the \
             closing listener were reset",
            failures.len()
        );
    }
    second.shutdown(Duration::from_secs(1)).await;
}

/// `net.ipv4.tcp_migrate_req` on for the test's life, as it was after.
struct MigrateReq {
    on: bool,
    restore: bool,
}

const MIGRATE_REQ: &str = "/proc/sys/net/ipv4/tcp_migrate_req";

impl MigrateReq {
    fn enable() -> Self {
        match std::fs::read_to_string(MIGRATE_REQ).map(|v| v.trim() == "1") {
            Ok(true) => MigrateReq {
                on: true,
                restore: false,
            },
            Ok(false) => {
                let on = std::fs::write(MIGRATE_REQ, "1").is_ok();
                MigrateReq { on, restore: on }
            }
            Err(_) => MigrateReq {
                on: false,
                restore: false,
            },
        }
    }
}

impl Drop for MigrateReq {
    fn drop(&mut self) {
        if self.restore {
            let _ = std::fs::write(MIGRATE_REQ, "0");
        }
    }
}

/// `[peering]` with ids in the configuration: a CancelRequest that reaches the instance that
/// did not issue its key is forwarded to the one that did; a key of an unknown instance, or
/// a guessed one, cancels nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_sent_to_the_other_instance_is_forwarded_to_the_one_holding_the_client() {
    use common::raw::Raw;
    let peering = |id: u8, peers: String| {
        move |text: String| format!("{text}\n[peering]\nid = {id}\npeers = [{peers}]\n")
    };
    let Env {
        fixture,
        proxy: one,
        ..
    } = start_with("", peering(1, String::new())).await;
    let two_text = peering(2, format!("{{ id = 1, addr = \"{}\" }}", one.addr))(
        fixture.config("127.0.0.1:0", ""),
    );
    let two =
        common::start_proxy(pgtenant::config::load_str(&two_text, Path::new("two.toml")).unwrap())
            .await
            .unwrap();
    // Instance one learns instance two's address by a reload.
    let one_text = peering(1, format!("{{ id = 2, addr = \"{}\" }}", two.addr))(
        fixture.config(&one.addr.to_string(), ""),
    );
    one.state
        .reload(pgtenant::config::load_str(&one_text, Path::new("one.toml")).unwrap())
        .unwrap();

    let t = fixture.tenant("acme").unwrap();
    let user = format!("{}@{}", t.user, t.name);
    let params = [("user", user.as_str()), ("database", t.name)];
    for (holder, other, id) in [(&one, &two, 1), (&two, &one, 2)] {
        let (mut raw, pid, secret) = Raw::connect_with_key(holder.addr, &params, &t.password).await;
        assert_eq!(pid as u32 >> 23, id, "the key carries its instance's id");
        raw.query("SELECT pg_sleep(30)").await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        // A guessed key and a key of an instance nobody knows: nothing happens.
        Raw::cancel(other.addr, pid ^ 1, secret).await;
        Raw::cancel(other.addr, (pid & 0x7f_ffff) | (77 << 23), secret).await;
        let started = tokio::time::Instant::now();
        Raw::cancel(other.addr, pid, secret).await;
        let reply = tokio::time::timeout(PATIENCE, raw.until_ready())
            .await
            .expect("the statement was cancelled");
        let error = reply.iter().find(|m| m.tag == b'E').expect("an error");
        assert_eq!(error.sqlstate().as_deref(), Some("57014"), "{reply:?}");
        eprintln!(
            "cancel sent to instance {}, statement on instance {id} cancelled after {:?}",
            3 - id,
            started.elapsed()
        );
        // The guessed keys did not cancel this one early: it ran until the real cancel.
        raw.query("SELECT 1").await;
        assert!(raw.until_ready().await.iter().all(|m| m.tag != b'E'));
    }
    two.shutdown(Duration::from_secs(1)).await;
    one.shutdown(Duration::from_secs(1)).await;
}

/// Reloads under running load (plans changed, a tenant added and removed, an invalid file in
/// between) fail no query of the tenants that stay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloads_under_load_fail_no_query() {
    let (env, path) = common::start_from_file("").await;
    let original = std::fs::read_to_string(&path).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let mut loads = Vec::new();
    for tenant in ["acme", "acme", "globex", "initech"] {
        let client = env.connect(tenant).await;
        let stop = stop.clone();
        loads.push(tokio::spawn(async move {
            let statement = client
                .prepare("SELECT count(*) FROM items WHERE name <> $1")
                .await
                .unwrap();
            let (mut done, mut failures) = (0u64, Vec::new());
            while !stop.load(Ordering::Relaxed) {
                let r = async {
                    client.batch_execute("BEGIN").await?;
                    client.query_one(&statement, &[&"x"]).await?;
                    client.batch_execute("COMMIT").await
                }
                .await;
                match r {
                    Ok(()) => done += 1,
                    Err(e) => failures.push(format!("{e:?}")),
                }
            }
            (done, failures)
        }));
    }
    let hooli = format!(
        "\n[[tenants]]\nid = \"0b7e3c1a-5d2f-4e6a-9c8b-7a6d5e4f3c21\"\nname = \"hooli\"\n\
         placement = {{ kind = \"shared\", shard = \"shared-a\" }}\n[[tenants.users]]\n\
         name = \"app\"\nscram = \"{}\"\n",
        pgtenant::auth::verifier::ScramVerifier::from_password(b"pw")
    );
    let mut ok = 0;
    for round in 0..30 {
        let text = match round % 3 {
            0 => original.replace("statement_timeout = \"60s\"", "statement_timeout = \"61s\""),
            1 => format!("{original}{hooli}"),
            _ => "[listen\nnot toml".to_owned(),
        };
        std::fs::write(&path, &text).unwrap();
        if env.proxy.state.reload_from_source().await.is_ok() {
            ok += 1;
        }
        tokio::time::sleep(std::time::Duration::from_millis(30)).await;
    }
    assert_eq!(ok, 20, "the valid files applied, the invalid ones did not");
    std::fs::write(&path, &original).unwrap();
    env.proxy.state.reload_from_source().await.unwrap();
    stop.store(true, Ordering::Relaxed);
    let mut total = 0;
    for l in loads {
        let (done, failures) = l.await.unwrap();
        assert!(failures.is_empty(), "{failures:#?}");
        assert!(done > 0);
        total += done;
    }
    eprintln!("{total} transactions across 30 reloads, none failed");
}
