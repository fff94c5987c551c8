//! Shards that fail, with real PostgreSQL: a shard stopped and started again, a backend
//! terminated mid-query, a backend process killed, a restart under load. For each: pgtenant
//! keeps running, affected clients get a clear error at once (no hang), the other shard's
//! tenants are unaffected, no committed transaction is lost, and service resumes by itself
//! without a stale server connection being used.
//!
//! This binary starts its own pair of clusters (it stops and restarts one of them).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use pgtenant::demo;
use pgtenant::localpg::Cluster;

/// Generous failure-only limit (the times are reported, not asserted tightly).
const PATIENCE: Duration = Duration::from_secs(30);

struct Faults {
    a: Cluster,
    b: Cluster,
    fixture: demo::Fixture,
    proxy: pgtenant::app::Running,
    /// Between pgtenant and shard B: can stall or slow down the network.
    relay: Relay,
}

/// A TCP relay to `upstream` that can stop forwarding (a network stall) or delay each chunk
/// (a slow network), in both directions.
struct Relay {
    port: u16,
    stalled: Arc<AtomicBool>,
    delay_ms: Arc<std::sync::atomic::AtomicU64>,
}

impl Relay {
    async fn start(upstream: u16) -> Relay {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let stalled = Arc::new(AtomicBool::new(false));
        let delay_ms = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let (s, d) = (stalled.clone(), delay_ms.clone());
        tokio::spawn(async move {
            while let Ok((down, _)) = listener.accept().await {
                let (s, d) = (s.clone(), d.clone());
                tokio::spawn(async move {
                    // The server gone: the connection closes, as a refused one would.
                    let Ok(up) = tokio::net::TcpStream::connect(("127.0.0.1", upstream)).await
                    else {
                        return;
                    };
                    let (dr, dw) = down.into_split();
                    let (ur, uw) = up.into_split();
                    tokio::spawn(Relay::pump(dr, uw, s.clone(), d.clone()));
                    tokio::spawn(Relay::pump(ur, dw, s, d));
                });
            }
        });
        Relay {
            port,
            stalled,
            delay_ms,
        }
    }

    async fn pump(
        mut from: tokio::net::tcp::OwnedReadHalf,
        mut to: tokio::net::tcp::OwnedWriteHalf,
        stalled: Arc<AtomicBool>,
        delay_ms: Arc<std::sync::atomic::AtomicU64>,
    ) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match from.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            while stalled.load(Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            let delay = delay_ms.load(Ordering::Relaxed);
            if delay > 0 {
                tokio::time::sleep(Duration::from_millis(delay)).await;
            }
            if to.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    }
}

impl Faults {
    fn config(&self, tenant: &str) -> tokio_postgres::Config {
        let t = self.fixture.tenant(tenant).unwrap();
        let mut c = tokio_postgres::Config::new();
        c.host("127.0.0.1")
            .port(self.proxy.addr.port())
            .user(format!("{}@{}", t.user, t.name))
            .password(t.password.clone())
            .dbname(t.name)
            .connect_timeout(PATIENCE);
        c
    }

    async fn connect(&self, tenant: &str) -> tokio_postgres::Client {
        common::connect_with(self.config(tenant)).await.unwrap()
    }
}

/// Runs a statement: the SQLSTATE of its failure ("" when it succeeded) and how long it took.
async fn attempt(client: &tokio_postgres::Client, sql: &str) -> (String, Duration) {
    let started = Instant::now();
    let code = match client.simple_query(sql).await {
        Ok(_) => String::new(),
        Err(e) => common::code(&e),
    };
    (code, started.elapsed())
}

/// Until `tenant` runs a query through a fresh session; how long that took.
async fn until_served(f: &Faults, tenant: &str) -> Duration {
    let started = Instant::now();
    loop {
        if let Ok(c) = common::connect_with(f.config(tenant)).await
            && c.simple_query("SELECT count(*) FROM items").await.is_ok()
        {
            return started.elapsed();
        }
        assert!(started.elapsed() < PATIENCE, "{tenant} not served again");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shards_that_fail() {
    common::use_cluster_template();
    let (a, b) = tokio::task::spawn_blocking(|| {
        let a = Cluster::start(&[]).unwrap();
        let b = Cluster::start(&[]).unwrap();
        demo::create_roles(&a, &b).unwrap();
        (a, b)
    })
    .await
    .unwrap();
    let fixture = demo::create_fixture(&a, &b, "_faults").unwrap();
    // Shard B is reached through the relay.
    let relay = Relay::start(b.port).await;
    // A long connect timeout: a shard that is down must fail fast without waiting for it.
    let text = fixture
        .config("127.0.0.1:0", "")
        .replacen(
            "[pool]\n",
            "[pool]\nconnect_timeout = \"20s\"\nhealth_check_interval = \"500ms\"\n\
             health_check_timeout = \"1s\"\n",
            1,
        )
        .replacen(
            &format!("port = {}\ndatabase = \"{}\"", b.port, fixture.dedicated_db),
            &format!(
                "port = {}\ndatabase = \"{}\"",
                relay.port, fixture.dedicated_db
            ),
            1,
        );
    assert!(text.contains(&format!("port = {}", relay.port)));
    let snapshot = pgtenant::config::load_str(&text, Path::new("faults.toml")).unwrap();
    let proxy = common::start_proxy(snapshot).await.unwrap();
    let mut f = Faults {
        a,
        b,
        fixture,
        proxy,
        relay,
    };

    a_probe_keeps_its_login(&f).await;
    a_shard_down_fails_fast_and_comes_back(&mut f).await;
    a_backend_terminated_mid_query(&f).await;
    a_backend_killed(&f).await;
    a_restart_under_load_loses_no_commit(&mut f).await;
    a_network_stall(&f).await;
    a_slow_shard(&f).await;

    let Faults { proxy, .. } = f;
    proxy.shutdown(Duration::from_secs(1)).await;
}

/// Shard B (initech's) stops: an open transaction there gets `08006`, new ones `08001` at
/// once; acme on shard A goes on. B starts again: initech is served again without restarting
/// pgtenant, and the session that was idle meanwhile continues without meeting a stale
/// server connection.
async fn a_shard_down_fails_fast_and_comes_back(f: &mut Faults) {
    let acme = f.connect("acme").await;
    let idle = f.connect("initech").await;
    idle.simple_query("SELECT count(*) FROM items")
        .await
        .unwrap();
    let (in_flight, in_flight_end) = common::connect_watched(f.config("initech")).await;
    in_flight.simple_query("BEGIN; SELECT 1").await.unwrap();

    f.b.halt();
    let halted = Instant::now();
    // The open transaction's client hears why (the server's 57P01, or pgtenant's 08006),
    // as an error to its next statement or as the error that closed its connection.
    let (code, _) = attempt(&in_flight, "SELECT 1").await;
    let code = if code.starts_with("no SQLSTATE") {
        match tokio::time::timeout(PATIENCE, in_flight_end)
            .await
            .unwrap()
            .unwrap()
        {
            Err(e) => common::code(&e),
            Ok(()) => "closed without an error".to_owned(),
        }
    } else {
        code
    };
    assert!(["08006", "57P01"].contains(&code.as_str()), "{code:?}");
    // The next transaction fails at once (08001, or 08006 when it met a server connection
    // whose close had not arrived yet), whatever the connect timeout; so does a new session.
    let (code, took) = attempt(&idle, "SELECT 1").await;
    assert!(["08001", "08006"].contains(&code.as_str()), "{code:?}");
    assert!(took < Duration::from_secs(10), "it waited {took:?}");
    let started = Instant::now();
    let refused = common::connect_with(f.config("initech")).await.unwrap_err();
    assert!(
        ["08001", "08006"].contains(&common::code(&refused).as_str()),
        "{refused:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(10));
    eprintln!(
        "shard down: initech's next transaction refused with 08001 in {took:?}, a new session in {:?} ({:?} after the stop)",
        started.elapsed(),
        halted.elapsed()
    );
    // Shard A's tenants do not notice.
    for _ in 0..20 {
        acme.simple_query("SELECT count(*) FROM items")
            .await
            .unwrap();
    }

    f.b.resume().unwrap();
    let took = until_served(f, "initech").await;
    eprintln!("shard back: initech served again {took:?} after PostgreSQL accepted connections");
    // A client whose session outlived the outage goes on; no stale connection is used.
    let survivor = f.connect("initech").await;
    for _ in 0..5 {
        survivor
            .simple_query("SELECT count(*) FROM items")
            .await
            .unwrap();
    }
}

/// pg_terminate_backend on the backend running a tenant's query: that client gets the
/// server's error; pgtenant and the other tenants go on, and the tenant reconnects.
/// The health probe's backends on shard A (pids).
fn probe_backends(f: &Faults) -> Vec<String> {
    let text =
        f.a.psql(
            "postgres",
            "SELECT pid FROM pg_stat_activity WHERE application_name = 'pgtenant health check' \
             ORDER BY pid",
        )
        .unwrap();
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect()
}

/// Until the probe of shard A has a backend other than `not`; its pid.
async fn probe_backend_other_than(f: &Faults, not: Option<&str>) -> String {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let pids = probe_backends(f);
        if let [pid] = pids.as_slice()
            && Some(pid.as_str()) != not
        {
            return pid.clone();
        }
        assert!(Instant::now() < deadline, "no probe backend: {pids:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Each probe (every 500 ms) runs on the connection the last one kept: one login, not one
/// per probe. A kept connection that dies is not an outage: the next probe logs in again and
/// the shard's tenants never see it marked down.
async fn a_probe_keeps_its_login(f: &Faults) {
    let first = probe_backend_other_than(f, None).await;
    tokio::time::sleep(Duration::from_millis(1600)).await;
    assert_eq!(
        probe_backends(f),
        vec![first.clone()],
        "the probes logged in again"
    );
    let killed =
        f.a.psql("postgres", &format!("SELECT pg_terminate_backend({first})"))
            .unwrap();
    assert_eq!(killed.trim(), "t");
    let acme = f.connect("acme").await;
    let since = Instant::now();
    while since.elapsed() < Duration::from_millis(1500) {
        let (code, _) = attempt(&acme, "SELECT count(*) FROM items").await;
        assert_eq!(code, "", "the shard was taken for down");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    probe_backend_other_than(f, Some(&first)).await;
}

async fn a_backend_terminated_mid_query(f: &Faults) {
    let acme = f.connect("acme").await;
    let globex = f.connect("globex").await;
    let sleeper = tokio::spawn({
        let c = f.connect("acme").await;
        async move { attempt(&c, "SELECT pg_sleep(30)").await }
    });
    let db = f.fixture.shared_db.clone();
    let a = &f.a;
    let deadline = Instant::now() + PATIENCE;
    loop {
        let killed = a
            .psql(
                &db,
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
                 WHERE query LIKE '%pg_sleep(30)%' AND pid <> pg_backend_pid()",
            )
            .unwrap();
        if killed.trim() == "1" {
            break;
        }
        assert!(Instant::now() < deadline, "the query never ran");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (code, took) = sleeper.await.unwrap();
    assert!(["57P01", "08006"].contains(&code.as_str()), "{code:?}");
    assert!(
        took < Duration::from_secs(25),
        "it waited for the sleep: {took:?}"
    );
    globex
        .simple_query("SELECT count(*) FROM items")
        .await
        .unwrap();
    acme.simple_query("SELECT count(*) FROM items")
        .await
        .unwrap();
    until_served(f, "acme").await;
}

/// A backend process killed with SIGKILL: PostgreSQL restarts every backend of that cluster
/// (crash recovery). pgtenant marks the shard down while it recovers and serves it again
/// after; the other cluster's tenants never notice.
async fn a_backend_killed(f: &Faults) {
    let initech = f.connect("initech").await;
    let pid: i32 = initech
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    let acme = f.connect("acme").await;
    std::process::Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()
        .unwrap();
    let started = Instant::now();
    // Meanwhile on shard A.
    for _ in 0..20 {
        acme.simple_query("SELECT count(*) FROM items")
            .await
            .unwrap();
    }
    let took = until_served(f, "initech").await;
    eprintln!(
        "backend killed: initech served again {:?} after the kill (crash recovery included)",
        started.elapsed().max(took)
    );
}

/// Shard B restarted while initech and acme clients write: acme loses nothing and fails
/// nothing; initech's failures are clear errors; every insert that reported success is there.
async fn a_restart_under_load_loses_no_commit(f: &mut Faults) {
    let stop = Arc::new(AtomicBool::new(false));
    let mut loads = Vec::new();
    for tenant in ["initech", "initech", "acme"] {
        let config = f.config(tenant);
        let stop = stop.clone();
        loads.push(tokio::spawn(async move {
            let (mut committed, mut errors) = (0u64, Vec::new());
            let mut client = common::connect_with(config.clone()).await.ok();
            while !stop.load(Ordering::Relaxed) {
                let Some(c) = client.as_ref() else {
                    client = common::connect_with(config.clone())
                        .await
                        .map_err(|e| errors.push(common::code(&e)))
                        .ok();
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                match c
                    .simple_query("INSERT INTO items (name) VALUES ('under restart')")
                    .await
                {
                    Ok(_) => committed += 1,
                    Err(e) => {
                        errors.push(common::code(&e));
                        client = None;
                    }
                }
            }
            (tenant, committed, errors)
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    tokio::task::block_in_place(|| f.b.halt());
    tokio::time::sleep(Duration::from_millis(500)).await;
    tokio::task::block_in_place(|| f.b.resume()).unwrap();
    until_served(f, "initech").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    let mut initech_committed = 0;
    for l in loads {
        let (tenant, committed, errors) = l.await.unwrap();
        if tenant == "acme" {
            assert!(errors.is_empty(), "acme: {errors:?}");
        } else {
            initech_committed += committed;
            // A clear error each time: the SQLSTATE of the outage, or a connection closed by
            // the FATAL error pgtenant or the server sent to an idle session.
            for e in &errors {
                assert!(
                    [
                        "08001",
                        "08006",
                        "57P01",
                        "57P03",
                        "no SQLSTATE: connection closed"
                    ]
                    .contains(&e.as_str()),
                    "initech: {errors:?}"
                );
            }
        }
    }
    let rows: u64 =
        f.b.psql(
            &f.fixture.dedicated_db,
            "SELECT count(*) FROM items WHERE name = 'under restart'",
        )
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    // fsync is off in these clusters, but a fast shutdown writes everything: every
    // reported commit is there (one in flight at the stop may be there unreported).
    assert!(
        rows >= initech_committed,
        "{rows} rows, {initech_committed} commits reported"
    );
    assert!(rows <= initech_committed + 2);
}

/// The network to shard B stalls: the probe times out and the shard is marked down, so
/// initech's new transactions fail fast with 08001 instead of hanging; the statement in
/// flight completes once the network is back (nothing lost), and service resumes; acme never
/// notices.
async fn a_network_stall(f: &Faults) {
    let acme = f.connect("acme").await;
    let in_flight = f.connect("initech").await;
    in_flight.simple_query("SELECT 1").await.unwrap();
    let pending = tokio::spawn(async move {
        let r = in_flight
            .simple_query("SELECT count(*) FROM pg_sleep(0.3), items")
            .await
            .map(|_| ());
        (r.map_err(|e| common::code(&e)), in_flight)
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    f.relay.stalled.store(true, Ordering::Relaxed);
    let stalled = Instant::now();
    let health = f.proxy.state.pools.health("initech-db");
    while !health.is_down() {
        assert!(stalled.elapsed() < PATIENCE, "the stall was never noticed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let noticed = stalled.elapsed();
    let started = Instant::now();
    let refused = common::connect_with(f.config("initech")).await.unwrap_err();
    assert_eq!(common::code(&refused), "08001", "{refused:?}");
    let refused_in = started.elapsed();
    for _ in 0..10 {
        acme.simple_query("SELECT count(*) FROM items")
            .await
            .unwrap();
    }
    f.relay.stalled.store(false, Ordering::Relaxed);
    let (r, _client) = tokio::time::timeout(PATIENCE, pending)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        r,
        Ok(()),
        "the statement in flight completes after the stall"
    );
    let back = until_served(f, "initech").await;
    eprintln!(
        "network stall: shard marked down {noticed:?} after the stall, a new session refused in \
         {refused_in:?}; served again {back:?} after the network came back"
    );
}

/// Shard B slow (every packet delayed): initech is slow, acme on shard A is not.
async fn a_slow_shard(f: &Faults) {
    let acme = f.connect("acme").await;
    let initech = f.connect("initech").await;
    let median = |mut v: Vec<Duration>| {
        v.sort();
        v[v.len() / 2]
    };
    let mut quiet = Vec::new();
    for _ in 0..20 {
        let started = Instant::now();
        acme.simple_query("SELECT count(*) FROM items")
            .await
            .unwrap();
        quiet.push(started.elapsed());
    }
    f.relay.delay_ms.store(50, Ordering::Relaxed);
    let slow_query = tokio::spawn(async move {
        let started = Instant::now();
        for _ in 0..5 {
            initech
                .simple_query("SELECT count(*) FROM items")
                .await
                .unwrap();
        }
        started.elapsed() / 5
    });
    let mut during = Vec::new();
    for _ in 0..20 {
        let started = Instant::now();
        acme.simple_query("SELECT count(*) FROM items")
            .await
            .unwrap();
        during.push(started.elapsed());
    }
    let initech_each = slow_query.await.unwrap();
    f.relay.delay_ms.store(0, Ordering::Relaxed);
    eprintln!(
        "slow shard (+50 ms a packet): initech {initech_each:?} a query; acme median {:?} before, {:?} during",
        median(quiet),
        median(during)
    );
    assert!(
        initech_each >= Duration::from_millis(50),
        "the delay applies"
    );
}
