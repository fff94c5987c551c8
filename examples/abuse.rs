//! Abuse figures (issue "No tenant can slow, lock out or exhaust another"): what one tenant's
//! attacks or mistakes cost the others, measured against the release binary on the demo
//! world. Run it with `scripts/abuse.sh` (which raises the open-file limit and builds the
//! binary). It prints figures; it asserts nothing (speed is measured, never asserted).
//!
//! 1. Login latency of a good acme user while another user's password is brute-forced from
//!    the same address, against the same without the brute force.
//! 2. A good login's time during 10,000 half-open connections, from the same address and
//!    spread over ten addresses.
//! 3. pgtenant's RSS during a parse flood (200 named Parse messages of 1 MB from one client).
//! 4. pgtenant's RSS during a notification flood to a client that does not read (2 x 112 MB).
//! 5. Backends on the shard while 500 clients start `pg_sleep(30)` and walk away, and how
//!    many remain afterwards.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use bytes::BytesMut;
use pgtenant::demo::SampleTenant;
use pgtenant::localpg::Cluster;
use postgres_protocol::message::frontend;
use support::{connect_from, raw_login, raw_login_from, read_msg, rss_kib};
use tokio::io::AsyncWriteExt;

fn url(t: &SampleTenant, port: u16, password: &str) -> String {
    format!(
        "postgresql://{}.{}:{}@127.0.0.1:{port}/{}?connect_timeout=30",
        t.user, t.name, password, t.name
    )
}

async fn login(url: &str) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

/// Times `n` good logins (each followed by one query); returns (median, max) in ms.
async fn good_logins(url: &str, n: usize) -> (f64, f64) {
    let mut times = Vec::new();
    for _ in 0..n {
        let started = Instant::now();
        match login(url).await {
            Ok(c) => {
                let _ = c.simple_query("SELECT 1").await;
                times.push(started.elapsed().as_secs_f64() * 1000.0);
            }
            Err(e) => {
                eprintln!("  good login failed: {e}");
                times.push(f64::INFINITY);
            }
        }
    }
    times.sort_by(|a, b| a.partial_cmp(b).unwrap());
    (times[times.len() / 2], times[times.len() - 1])
}

#[tokio::main]
async fn main() {
    let world = support::start("abuse", "300", |text| {
        text.replacen(
            "max_client_connections = 200",
            "max_client_connections = 1000",
            1,
        )
    })
    .await;
    let (a, fixture, port, pid) = (&world.a, &world.fixture, world.port, world.pid);
    let acme = fixture.tenant("acme").unwrap();
    let globex = fixture.tenant("globex").unwrap();
    let good = url(acme, port, &acme.password);
    println!("pgtenant RSS at start: {} KiB", rss_kib(pid));

    // 1. Brute force against globex's user from the same address.
    let (median, max) = good_logins(&good, 30).await;
    println!(
        "1. good acme login, quiet:                         median {median:.1} ms, max {max:.1} ms"
    );
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut attackers = Vec::new();
    for i in 0..8 {
        let bad = url(globex, port, &format!("wrong-{i}"));
        let stop = stop.clone();
        attackers.push(tokio::spawn(async move {
            let mut tries = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let _ = login(&bad).await;
                tries += 1;
            }
            tries
        }));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (median, max) = good_logins(&good, 30).await;
    println!(
        "   good acme login, globex brute-forced (same IP): median {median:.1} ms, max {max:.1} ms"
    );
    let globex_good = url(globex, port, &globex.password);
    let (median, max) = good_logins(&globex_good, 10).await;
    println!(
        "   good globex login during its own brute force:   median {median:.1} ms, max {max:.1} ms"
    );
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut tries = 0;
    for a in attackers {
        tries += a.await.unwrap();
    }
    println!("   ({tries} wrong-password attempts)");

    // 2. Half-open flood.
    for (label, sources) in [("one address", 1usize), ("ten addresses", 10)] {
        let mut held = Vec::new();
        let started = Instant::now();
        for i in 0..10_000usize {
            let source = format!("127.0.0.{}", 2 + i % sources);
            match connect_from(&source, port).await {
                Ok(mut s) => {
                    // Half a startup packet, then silence.
                    let _ = s.write_all(&[0, 0, 0, 40, 0, 3]).await;
                    held.push(s);
                }
                Err(e) => {
                    eprintln!("   half-open connection {i} failed: {e}");
                    break;
                }
            }
        }
        let opened = held.len();
        let (median, max) = good_logins(&good, 20).await;
        println!(
            "2. {opened} half-open connections from {label} (opened in {:.1} s): good login median {median:.1} ms, max {max:.1} ms; RSS {} KiB",
            started.elapsed().as_secs_f64(),
            rss_kib(pid)
        );
        drop(held);
        tokio::time::sleep(Duration::from_secs(1)).await;
    }

    // 3. Parse flood from one client.
    let before = rss_kib(pid);
    let mut s = raw_login(
        port,
        &format!("{}@{}", acme.user, acme.name),
        &acme.password,
    )
    .await;
    let text = format!("SELECT '{}'", "x".repeat(1 << 20));
    let mut peak = before;
    let mut refused = 0;
    for i in 0..200 {
        let mut out = BytesMut::new();
        frontend::parse(&format!("flood{i}"), &text, [], &mut out).unwrap();
        frontend::sync(&mut out);
        s.write_all(&out).await.unwrap();
        loop {
            let (tag, _) = read_msg(&mut s).await.unwrap();
            if tag == b'E' {
                refused += 1;
            }
            if tag == b'Z' {
                break;
            }
        }
        peak = peak.max(rss_kib(pid));
    }
    drop(s);
    tokio::time::sleep(Duration::from_millis(500)).await;
    println!(
        "3. parse flood (200 x 1 MB named statements, {refused} refused): RSS before {before} KiB, peak {peak} KiB, after {} KiB",
        rss_kib(pid)
    );

    // 4. Notification flood to a client that does not read.
    let before = rss_kib(pid);
    let mut listener = raw_login(
        port,
        &format!("{}@{}", acme.user, acme.name),
        &acme.password,
    )
    .await;
    let mut out = BytesMut::new();
    frontend::query("LISTEN flood", &mut out).unwrap();
    listener.write_all(&out).await.unwrap();
    while read_msg(&mut listener)
        .await
        .is_some_and(|(t, _)| t != b'Z')
    {}
    let notifier = login(&good).await.unwrap();
    let mut peak = before;
    for round in 0..2 {
        let r = notifier
            .simple_query(
                "SELECT pg_notify('flood', repeat('x', 7000)) FROM generate_series(1, 16000)",
            )
            .await;
        peak = peak.max(rss_kib(pid));
        println!(
            "   flood {round}: {}",
            if r.is_ok() { "sent" } else { "failed" }
        );
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    peak = peak.max(rss_kib(pid));
    drop(listener);
    tokio::time::sleep(Duration::from_millis(500)).await;
    println!(
        "4. notification flood (2 x 112 MB, listener not reading): RSS before {before} KiB, peak {peak} KiB, after {} KiB",
        rss_kib(pid)
    );

    // 5. 500 clients start a long statement and walk away.
    let backends = |a: &Cluster, db: &str| -> (usize, usize) {
        let out = a
            .psql(
                db,
                "SELECT count(*) || ' ' || count(*) FILTER (WHERE query LIKE '%pg_sleep%' AND state = 'active') \
                   FROM pg_stat_activity WHERE datname = current_database() AND usename <> current_user \
                    AND backend_type = 'client backend'",
            )
            .unwrap_or_default();
        let mut p = out.split_whitespace().map(|n| n.parse().unwrap_or(0));
        (p.next().unwrap_or(0), p.next().unwrap_or(0))
    };
    let shared_db = fixture.shared_db.clone();
    let started = Instant::now();
    let user = format!("{}@{}", acme.user, acme.name);
    let (user2, password2) = (user.clone(), acme.password.clone());
    // Five waves of 100 clients, from five addresses (an application fleet).
    let walkers = [tokio::spawn(async move {
        for wave in 0..5 {
            let clients: Vec<_> = (0..100)
                .map(|i| {
                    let (user, password) = (user2.clone(), password2.clone());
                    tokio::spawn(async move {
                        let source = format!("127.0.1.{}", 1 + (wave * 100 + i) % 5);
                        let mut s = raw_login_from(&source, port, &user, &password).await;
                        let mut out = BytesMut::new();
                        frontend::query("SELECT pg_sleep(30)", &mut out).unwrap();
                        let _ = s.write_all(&out).await;
                        tokio::time::sleep(Duration::from_millis(300)).await;
                        // The socket closes here, mid-statement.
                    })
                })
                .collect();
            for c in clients {
                let _ = c.await;
            }
        }
    })];
    let mut most = 0;
    let mut all_done = false;
    while !all_done {
        all_done = walkers.iter().all(|w| w.is_finished());
        let (n, _) = tokio::task::block_in_place(|| backends(a, &shared_db));
        most = most.max(n);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let walked = started.elapsed();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let (left, sleeping) = tokio::task::block_in_place(|| backends(a, &shared_db));
    println!(
        "5. 500 clients walked away from pg_sleep(30) over {:.1} s: at most {most} backends on the shard (max_connections = 60, plus the idle notification hub); 5 s later {left} backends, {sleeping} still sleeping",
        walked.as_secs_f64()
    );
    println!("pgtenant RSS at the end: {} KiB", rss_kib(pid));
    drop(world);
}
