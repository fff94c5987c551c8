//! A steady-state pooled transaction allocates nothing in the proxy.
//!
//! The proxy runs in this process under a counting global allocator; the client is pgbench,
//! another process, so every allocation counted is the proxy's (or this thread's, which only
//! waits for pgbench). pgbench runs a `-S`-like transaction (a new key each time) through a
//! transaction-mode pool with the guard and the verified tenant context on, in the simple,
//! extended and prepared protocols. Each protocol gets two counted pgbench runs on new
//! connections, one short and one long: logins, warm-up and the program's own allocations
//! cost the same in both, so the difference is what the extra transactions allocated.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::alloc::System;
use std::process::Command;

use stats_alloc::{INSTRUMENTED_SYSTEM, Region, StatsAlloc};

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

/// Transactions of the short run, and how many more the long run has.
const SHORT: usize = 300;
const EXTRA: usize = 2_000;

/// Runs pgbench with `transactions` transactions; returns the allocations made meanwhile.
fn counted_pgbench(
    url: &str,
    password: &str,
    mode: &str,
    script: &str,
    transactions: usize,
) -> usize {
    let pgbench = common::world().a.binary("pgbench");
    let mut cmd = Command::new(pgbench);
    cmd.args(["-n", "-M", mode, "-c", "1", "-f", script])
        .args(["-t", &format!("{transactions:06}")])
        .arg(url)
        .env("PGPASSWORD", password);
    let region = Region::new(GLOBAL);
    let out = cmd.output().expect("run pgbench");
    let allocations = region.change().allocations;
    assert!(
        out.status.success(),
        "pgbench -M {mode} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!("processed: {transactions}/{transactions}")),
        "pgbench -M {mode}: {text}"
    );
    allocations
}

#[test]
fn a_steady_state_pooled_transaction_allocates_nothing() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let fixture = rt.block_on(common::fresh_fixture());
    // No health probes: they allocate on their own schedule, not per transaction.
    let text = fixture.config("127.0.0.1:0", "").replace(
        "mode = \"transaction\"",
        "mode = \"transaction\"\nhealth_check_interval = \"0\"",
    );
    let snapshot = pgtenant::config::load_str(&text, std::path::Path::new("test.toml")).unwrap();
    assert!(
        snapshot.shards.values().any(|s| s.context_key.is_some()),
        "the verified context is on"
    );
    // On the proxy's own runtime, as the binary runs it.
    let proxy = rt
        .block_on(common::start_proxy(snapshot))
        .expect("start proxy");
    let acme = fixture.tenant("acme").unwrap();
    let url = pgtenant::demo::tenant_url(acme, proxy.addr.port());
    let dir = common::TempDir::new("allocations");
    let script = dir.join("select.sql");
    std::fs::write(
        &script,
        "\\set id random(1, 3)\nSELECT name FROM items WHERE id = :id;\n",
    )
    .unwrap();
    let script = script.to_str().unwrap();
    let mut report = Vec::new();
    for mode in ["simple", "extended", "prepared"] {
        // Warms up: the server connection is opened and bound, buffers grow.
        counted_pgbench(&url, &acme.password, mode, script, SHORT);
        let short = counted_pgbench(&url, &acme.password, mode, script, SHORT);
        let long = counted_pgbench(&url, &acme.password, mode, script, SHORT + EXTRA);
        let extra = long.saturating_sub(short);
        report.push((mode, extra, short));
    }
    for (mode, extra, short) in &report {
        println!(
            "-M {mode}: {:.3} allocations per transaction ({extra} over {EXTRA} transactions; {short} for a {SHORT}-transaction session)",
            *extra as f64 / EXTRA as f64
        );
    }
    drop(proxy);
    for (mode, extra, _) in report {
        // Zero per transaction. The margin is for what runs on a clock, not per transaction
        // (the longer run lasts longer): one allocation in twenty transactions still fails.
        assert!(
            extra < EXTRA / 20,
            "-M {mode}: {extra} allocations over {EXTRA} steady-state transactions"
        );
    }
}
