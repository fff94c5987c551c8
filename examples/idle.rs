//! Idle scale (issue "Shards that fail and scale", item 4): opens N idle authenticated
//! clients (default 10,000; transaction mode, so none holds a server connection) against the
//! release binary on the demo world, and reports the connect rate and pgtenant's RSS per idle
//! client, then closes them and reports what pgtenant keeps. When PgBouncer is installed the
//! same storm runs against it (transaction mode, SCRAM, in front of the same database) and its
//! figures are printed beside pgtenant's. Run it with `scripts/idle.sh [N]` (which raises the
//! open-file limit and builds the binary). It prints figures; it asserts nothing (speed is
//! measured, never asserted).
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use support::{raw_login, rss_kib};

/// What one storm of `n` logins measured.
struct Storm {
    rate: f64,
    /// The server's CPU per login (µs, user + system).
    cpu_us: f64,
    before_kib: u64,
    held_kib: u64,
    after_kib: u64,
}

/// Opens `n` authenticated clients as `user` against `port` (64 logins in flight), holds them
/// idle, then closes them; the RSS of process `pid` throughout.
async fn storm(port: u16, user: &str, password: &str, n: usize, pid: u32) -> Storm {
    // A first session warms up what every session shares (pools, the tenant's state).
    drop(raw_login(port, user, password).await);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before_kib = rss_kib(pid);
    let cpu_before = support::cpu_ticks(pid);
    let started = Instant::now();
    let mut clients = Vec::with_capacity(n);
    let mut pending = tokio::task::JoinSet::new();
    let mut opened = 0;
    while clients.len() < n {
        while opened < n && pending.len() < 64 {
            let (user, password) = (user.to_owned(), password.to_owned());
            pending.spawn(async move { raw_login(port, &user, &password).await });
            opened += 1;
        }
        if let Some(done) = pending.join_next().await {
            clients.push(done.unwrap());
        }
    }
    let took = started.elapsed();
    let cpu_after = support::cpu_ticks(pid);
    let ticks = (cpu_after.0 + cpu_after.1) - (cpu_before.0 + cpu_before.1);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let held_kib = rss_kib(pid);
    drop(clients);
    tokio::time::sleep(Duration::from_secs(12)).await;
    Storm {
        rate: n as f64 / took.as_secs_f64(),
        cpu_us: ticks as f64 / support::clock_ticks_per_second() * 1e6 / n as f64,
        before_kib,
        held_kib,
        after_kib: rss_kib(pid),
    }
}

fn report(name: &str, n: usize, s: &Storm) {
    println!(
        "{name:>9}: {n} clients at {:>6.0} connections/s, {:.0} µs CPU per login; RSS {} KiB \
         before, {} KiB with them ({:.2} KiB per idle client), {} KiB after they left",
        s.rate,
        s.cpu_us,
        s.before_kib,
        s.held_kib,
        s.held_kib.saturating_sub(s.before_kib) as f64 / n as f64,
        s.after_kib
    );
}

#[tokio::main]
async fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(10_000);
    let world = support::start("idle", "100", |text| {
        text.replacen(
            "max_client_connections = 200",
            &format!("max_client_connections = {}", n + 100),
            1,
        )
        .replacen(
            "[listen]\n",
            "[listen]\nmax_unauthenticated = 4096\nmax_unauthenticated_per_source = 4096\n",
            1,
        )
    })
    .await;
    let acme = world.fixture.tenant("acme").unwrap();
    let user = format!("{}@{}", acme.user, acme.name);
    let ours = storm(world.port, &user, &acme.password, n, world.pid).await;
    report("pgtenant", n, &ours);

    if !std::path::Path::new(support::PGBOUNCER).is_file() {
        println!("PgBouncer is not installed: no comparison");
        return;
    }
    // PgBouncer at its fastest: a SCRAM verifier in its auth_file (no key derivation per
    // login), the same verifier on the server's role so it can log in with the client's keys.
    let verifier = pgtenant::auth::verifier::ScramVerifier::from_password(acme.password.as_bytes());
    tokio::task::block_in_place(|| {
        world
            .a
            .psql(
                "postgres",
                &format!("CREATE ROLE app LOGIN PASSWORD '{verifier}'"),
            )
            .unwrap()
    });
    let (bouncer, port) = support::start_pgbouncer(
        &world.dir,
        &world.a,
        support::Bouncer {
            dbname: &world.fixture.shared_db,
            secret: &verifier,
            server_login: None,
            pool_mode: "transaction",
            pool_size: 20,
            max_clients: n + 100,
        },
    );
    let theirs = storm(port, "app", &acme.password, n, bouncer.0.id()).await;
    report("pgbouncer", n, &theirs);
    println!(
        "pgtenant / PgBouncer: connect rate {:.2}x, CPU per login {:.2}x",
        ours.rate / theirs.rate,
        ours.cpu_us / theirs.cpu_us
    );
}
