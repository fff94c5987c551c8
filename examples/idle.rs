//! Idle scale (issue "Shards that fail and scale", item 4): opens N idle authenticated
//! clients (default 10,000; transaction mode, so none holds a server connection) against the
//! release binary on the demo world, and reports the connect rate and pgtenant's RSS per idle
//! client, then closes them and reports what pgtenant keeps. Run it with `scripts/idle.sh
//! [N]` (which raises the open-file limit and builds the binary). It prints figures; it
//! asserts nothing (speed is measured, never asserted).
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use support::{raw_login, rss_kib};

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
    // A first session warms up what every session shares (pools, the tenant's state).
    drop(raw_login(world.port, &user, &acme.password).await);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = rss_kib(world.pid);
    println!("pgtenant RSS before: {before} KiB");

    let started = Instant::now();
    let mut clients = Vec::with_capacity(n);
    let concurrency = 64;
    let mut pending = tokio::task::JoinSet::new();
    let mut opened = 0;
    while clients.len() < n {
        while opened < n && pending.len() < concurrency {
            let (port, user, password) = (world.port, user.clone(), acme.password.clone());
            pending.spawn(async move { raw_login(port, &user, &password).await });
            opened += 1;
        }
        if let Some(done) = pending.join_next().await {
            clients.push(done.unwrap());
        }
    }
    let took = started.elapsed();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let held = rss_kib(world.pid);
    println!(
        "{n} idle clients connected in {:.1} s ({:.0} connections/s)",
        took.as_secs_f64(),
        n as f64 / took.as_secs_f64()
    );
    println!(
        "pgtenant RSS with them: {held} KiB, {:.2} KiB per idle client",
        held.saturating_sub(before) as f64 / n as f64
    );
    drop(clients);
    tokio::time::sleep(Duration::from_secs(3)).await;
    println!("pgtenant RSS after they left: {} KiB", rss_kib(world.pid));
}
