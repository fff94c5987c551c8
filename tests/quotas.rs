//! Per-tenant quotas from the plan and the tenant's overrides: client connections, server
//! connections, queries per second, statement timeout (enforced by pgtenant), idle in
//! transaction, read-only users, and limits changed by a reload without a restart.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::raw::Raw;
use common::{code, connect_with, sqlstate_of, start_with};

/// Gives acme the settings `overrides` (TOML inline-table body).
fn acme_settings(overrides: &str) -> impl FnOnce(String) -> String + use<> {
    let overrides = overrides.to_owned();
    move |t| {
        t.replacen(
            "name = \"acme\"\nplan = \"basic\"\n",
            &format!("name = \"acme\"\nplan = \"basic\"\nsettings = {{ {overrides} }}\n"),
            1,
        )
    }
}

#[tokio::test]
async fn client_connections_are_capped_per_tenant() {
    let env = start_with("", acme_settings("max_client_connections = 2")).await;
    let a = env.connect("acme").await;
    let _b = env.connect("acme").await;
    let err = connect_with(env.pg_config("acme")).await.unwrap_err();
    assert_eq!(code(&err), "53300");
    assert!(
        common::message(&err).contains("too many connections for tenant"),
        "{err}"
    );
    // Other tenants are not affected, and a freed slot is reusable.
    env.connect("globex").await;
    drop(a);
    tokio::time::sleep(Duration::from_millis(100)).await;
    env.connect("acme").await;
}

#[tokio::test]
async fn server_connections_are_capped_per_tenant() {
    let env = start_with("", |t| {
        acme_settings("max_server_connections = 1")(t).replacen(
            "[pool]\nmode = \"transaction\"",
            "[pool]\nmode = \"transaction\"\ncheckout_timeout = \"1s\"",
            1,
        )
    })
    .await;
    // An open transaction holds its server connection under either pool mode.
    let holder = env.connect("acme").await;
    holder.simple_query("BEGIN").await.unwrap();
    let started = Instant::now();
    let err = connect_with(env.pg_config("acme")).await.unwrap_err();
    assert_eq!(code(&err), "53300");
    assert!(started.elapsed() >= Duration::from_millis(900));
    assert!(
        common::message(&err).contains("server connections"),
        "{err}"
    );
    env.connect("globex").await;
}

#[tokio::test]
async fn the_query_rate_is_limited_per_tenant() {
    let env = start_with("", acme_settings("queries_per_second = 5")).await;
    let acme = env.connect("acme").await;
    let mut refused = 0;
    for _ in 0..20 {
        if let Some(c) = sqlstate_of(&acme, "SELECT 1").await {
            assert_eq!(c, "53400");
            refused += 1;
        }
    }
    assert!(
        (14..=15).contains(&refused),
        "{refused} of 20 refused at 5/s"
    );
    let globex = env.connect("globex").await;
    for _ in 0..20 {
        globex.simple_query("SELECT 1").await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(1100)).await;
    acme.simple_query("SELECT 1").await.unwrap();
}

/// FunctionCall (the fast path, allowed on dedicated placements) runs SQL too: it counts
/// against the query rate like Query and Execute.
#[tokio::test]
async fn function_calls_count_against_the_query_rate() {
    let env = start_with("", |t| {
        t.replacen(
            "name = \"initech\"\nplan = \"basic\"\n",
            "name = \"initech\"\nplan = \"basic\"\nsettings = { queries_per_second = 5 }\n",
            1,
        )
    })
    .await;
    let t = env.tenant("initech").clone();
    let mut raw =
        common::raw::Raw::connect(env.addr(), &[("user", "app@initech")], &t.password).await;
    // pg_backend_pid() (OID 2026), no arguments, text result.
    let mut body = 2026u32.to_be_bytes().to_vec();
    body.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
    let mut out = bytes::BytesMut::new();
    for _ in 0..20 {
        common::raw::Raw::put(&mut out, b'F', &body);
    }
    raw.send(&out).await;
    let mut refused = 0;
    let mut ran = 0;
    for _ in 0..20 {
        for m in raw.until_ready().await {
            match m.tag {
                b'E' => {
                    assert_eq!(m.sqlstate().as_deref(), Some("53400"));
                    refused += 1;
                }
                b'V' => ran += 1,
                _ => {}
            }
        }
    }
    assert_eq!(refused + ran, 20);
    assert!(
        (14..=15).contains(&refused),
        "{refused} of 20 refused at 5/s"
    );
}

#[tokio::test]
async fn the_statement_timeout_is_enforced_by_pgtenant() {
    let env = start_with("", acme_settings("statement_timeout = \"1s\"")).await;
    let acme = env.connect("acme").await;
    // The server's own statement_timeout is raised out of the way (a superuser could do it
    // too); pgtenant still cancels at the tenant's limit.
    let started = Instant::now();
    let err = acme
        .simple_query("SET LOCAL statement_timeout = '900ms'; SELECT pg_sleep(60)")
        .await
        .unwrap_err();
    assert_eq!(code(&err), "57014");
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(
        sqlstate_of(&acme, "SET statement_timeout = '10s'")
            .await
            .as_deref(),
        Some("42501")
    );
    assert_eq!(
        sqlstate_of(&acme, "SET statement_timeout = 0")
            .await
            .as_deref(),
        Some("42501")
    );
    acme.simple_query("SET statement_timeout = '500ms'")
        .await
        .unwrap();
    let row = acme
        .query_one("SELECT current_setting('statement_timeout')", &[])
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "500ms");
}

#[tokio::test]
async fn statements_over_the_limit_are_cancelled_even_when_the_server_allows_them() {
    let env = start_with("", acme_settings("statement_timeout = \"1s\"")).await;
    let acme = env.connect("acme").await;
    // DEFAULT is allowed (it returns to the server default, here none); pgtenant's own timer
    // applies the plan.
    acme.simple_query("SET statement_timeout TO DEFAULT")
        .await
        .unwrap();
    let started = Instant::now();
    let err = acme.simple_query("SELECT pg_sleep(60)").await.unwrap_err();
    assert_eq!(code(&err), "57014");
    assert!(common::message(&err).contains("statement timeout"), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "{:?}",
        started.elapsed()
    );
    acme.simple_query("SELECT 1").await.unwrap();
}

/// The session's timer follows its activity (its deadline moves later as statements come and
/// go, and is set precisely when it fires): after seconds of short statements a long one is
/// still cancelled at the limit by pgtenant's own timer, and a transaction left idle after a
/// statement that outlasted the idle limit is still ended at that limit. Without the guard,
/// so that the client can lift the server's own statement_timeout and only pgtenant's timer
/// is left to enforce the plan's.
#[tokio::test]
async fn timeouts_hold_after_activity_moved_the_sessions_timer() {
    let env = common::start_tweaked(
        "",
        acme_settings("statement_timeout = \"2s\", idle_in_transaction_timeout = \"1s\""),
        |s| s.unguarded_for_tests = true,
    )
    .await;
    let acme = env.connect("acme").await;
    acme.simple_query("SET statement_timeout = 0")
        .await
        .unwrap();
    let busy_until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < busy_until {
        acme.simple_query("SELECT 1").await.unwrap();
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let err = acme.simple_query("SELECT pg_sleep(60)").await.unwrap_err();
    assert_eq!(code(&err), "57014");
    assert!(
        common::message(&err).contains("this tenant's limit is 2s"),
        "{}",
        common::message(&err)
    );
    // 1.5 s of work inside a transaction (within the statement limit, past the idle one),
    // then silence.
    acme.simple_query("BEGIN; SELECT pg_sleep(1.5)")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let err = acme.simple_query("SELECT 1").await.unwrap_err();
    assert!(
        err.code().map(|c| c.code()) == Some("25P03") || err.is_closed(),
        "{err}"
    );
}

#[tokio::test]
async fn idle_in_transaction_sessions_are_ended_and_rolled_back() {
    let env = start_with("", acme_settings("idle_in_transaction_timeout = \"1s\"")).await;
    let acme = env.connect("acme").await;
    acme.simple_query("BEGIN; INSERT INTO items (name) VALUES ('abandoned')")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1600)).await;
    let err = acme.simple_query("COMMIT").await.unwrap_err();
    assert!(
        err.code().map(|c| c.code()) == Some("25P03") || err.is_closed(),
        "{err}"
    );
    let n = env.admin_a("SELECT count(*) FROM items WHERE name = 'abandoned'");
    assert_eq!(n.trim(), "0");
    // Idle outside a transaction is fine.
    let acme = env.connect("acme").await;
    tokio::time::sleep(Duration::from_millis(1300)).await;
    acme.simple_query("SELECT 1").await.unwrap();
}

#[tokio::test]
async fn read_only_users_cannot_write_or_turn_it_off() {
    let env = common::start().await;
    let mut c = env.pg_config("acme");
    c.user("reader@acme");
    let reader = connect_with(c).await.unwrap();
    let n: i64 = reader
        .query_one("SELECT count(*) FROM items", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 2);
    assert_eq!(
        sqlstate_of(&reader, "INSERT INTO items (name) VALUES ('nope')")
            .await
            .as_deref(),
        Some("25006")
    );
    for sql in [
        "SET default_transaction_read_only = off",
        "SET SESSION CHARACTERISTICS AS TRANSACTION READ WRITE",
        "BEGIN READ WRITE",
        "SET transaction_read_only = off",
    ] {
        assert_eq!(
            sqlstate_of(&reader, sql).await.as_deref(),
            Some("42501"),
            "{sql}"
        );
    }
    reader.simple_query("RESET ALL").await.unwrap();
    assert_eq!(
        sqlstate_of(&reader, "DELETE FROM items").await.as_deref(),
        Some("25006"),
        "still read-only after RESET ALL"
    );
    let mut c = env.pg_config("acme");
    c.user("reader@acme")
        .options("-c default_transaction_read_only=off");
    assert_eq!(code(&connect_with(c).await.unwrap_err()), "42501");
    let n = env.admin_a("SELECT count(*) FROM items");
    assert_eq!(n.trim(), "3");
}

#[tokio::test]
async fn a_reload_applies_new_limits_without_a_restart() {
    let mut text = String::new();
    let env = start_with("", |t| {
        let t = acme_settings("max_client_connections = 1")(t);
        text = t.clone();
        t
    })
    .await;
    let _a = env.connect("acme").await;
    assert_eq!(
        code(&connect_with(env.pg_config("acme")).await.unwrap_err()),
        "53300"
    );
    let relaxed = text.replacen(
        "max_client_connections = 1",
        "max_client_connections = 3",
        1,
    );
    let snapshot = pgtenant::config::load_str(&relaxed, Path::new("test.toml")).unwrap();
    env.proxy.state.reload(snapshot).unwrap();
    env.connect("acme").await;
}

/// A client's statements are bounded in transaction pooling (pgtenant keeps their text to
/// re-create them on other server connections): a flood of 1 MiB named Parse messages is
/// refused with 53400 past 16 MiB, and the session goes on.
#[tokio::test]
async fn a_parse_flood_is_bounded_per_client() {
    let env = start_with("", |t| t).await;
    let t = env.tenant("acme").clone();
    let mut raw = common::raw::Raw::connect(env.addr(), &[("user", "app@acme")], &t.password).await;
    let filler = "x".repeat(1 << 20);
    let mut refused = 0;
    for i in 0..40 {
        let mut out = bytes::BytesMut::new();
        let sql = format!("SELECT 1 /* {i} {filler} */");
        postgres_protocol::message::frontend::parse(
            &format!("s{i}"),
            &sql,
            std::iter::empty::<u32>(),
            &mut out,
        )
        .unwrap();
        postgres_protocol::message::frontend::sync(&mut out);
        raw.send(&out).await;
        for m in raw.until_ready().await {
            if m.tag == b'E' {
                assert_eq!(m.sqlstate().as_deref(), Some("53400"));
                refused += 1;
            }
        }
    }
    assert_eq!(refused, 40 - 15, "15 statements of 1 MiB fit in 16 MiB");
    raw.query("SELECT 1").await;
    assert!(raw.until_ready().await.iter().any(|m| m.tag == b'D'));
}

/// Both timeouts follow what the server is doing, whatever the protocol shape: an Execute
/// sent with Flush and no Sync is a running statement (the plan's statement timeout ends it
/// even when the server's own was lifted), and its open implicit transaction, once it is
/// answered, is idle in transaction (the plan's idle timeout ends the session).
#[tokio::test]
async fn timeouts_apply_to_extended_messages_without_sync() {
    let env = start_with(
        "",
        acme_settings("statement_timeout = \"1s\", idle_in_transaction_timeout = \"1s\""),
    )
    .await;
    let t = env.tenant("acme").clone();
    let extended = |sql: &str| {
        let mut out = bytes::BytesMut::new();
        common::raw::Raw::put_parse_bind_execute(&mut out, sql);
        postgres_protocol::message::frontend::flush(&mut out);
        out
    };
    let mut raw = common::raw::Raw::connect(env.addr(), &[("user", "app@acme")], &t.password).await;
    raw.query("SET statement_timeout TO DEFAULT").await;
    raw.until_ready().await;
    let started = Instant::now();
    raw.send(&extended("SELECT pg_sleep(60)")).await;
    let error = loop {
        let m = raw.recv().await;
        if m.tag == b'E' {
            break m;
        }
    };
    assert_eq!(error.sqlstate().as_deref(), Some("57014"));
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "{:?}",
        started.elapsed()
    );
    let mut sync = bytes::BytesMut::new();
    postgres_protocol::message::frontend::sync(&mut sync);
    raw.send(&sync).await;
    raw.until_ready().await;

    // An xid held by an unsynced batch, then silence.
    raw.send(&extended("SELECT txid_current()")).await;
    let started = Instant::now();
    let ended = loop {
        match tokio::time::timeout(Duration::from_secs(30), raw.try_recv()).await {
            Ok(Some(m)) if m.tag == b'E' => break Some(m),
            Ok(Some(_)) => continue,
            _ => break None,
        }
    };
    let ended = ended.expect("the session is ended with an error");
    assert_eq!(ended.sqlstate().as_deref(), Some("25P03"));
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "{:?}",
        started.elapsed()
    );
}

/// The largest message pgtenant reads whole is set per plan: past it the session ends with
/// 54000 and a clear message; other tenants keep the global limit.
#[tokio::test]
async fn the_largest_message_read_whole_is_capped_per_plan() {
    let env = start_with("", acme_settings("max_message_size = 65536")).await;
    let acme = env.connect("acme").await;
    let big = format!("SELECT '{}'", "x".repeat(100_000));
    let err = acme.simple_query(&big).await.unwrap_err();
    assert_eq!(code(&err), "54000", "{err}");
    assert!(common::message(&err).contains("65536"), "{err}");
    // Under the limit is fine; globex is not limited by acme's plan.
    let acme = env.connect("acme").await;
    acme.simple_query(&format!("SELECT '{}'", "x".repeat(60_000)))
        .await
        .unwrap();
    let globex = env.connect("globex").await;
    globex.simple_query(&big).await.unwrap();
}

/// Thousands of clients of one tenant queued for its only server connection: each waits
/// holding a few KiB (what it pipelined behind its first statement stays in the kernel,
/// unread), the tenant's client cap bounds their number, and all are served, in order, once
/// the connection is free. Other tenants are not kept waiting meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_queued_clients_hold_bounded_memory_and_are_all_served() {
    // Two descriptors per client in this process (its socket and pgtenant's); fewer clients
    // where the open-file limit is low.
    let n = ((open_file_limit().saturating_sub(300)) / 2).min(2000);
    let settings = acme_settings(&format!(
        "max_server_connections = 1, max_client_connections = {}",
        n + 1
    ));
    let env = start_with("", |t| {
        settings(t).replacen(
            "[pool]\nmode = \"transaction\"",
            "[pool]\nmode = \"transaction\"\ncheckout_timeout = \"300s\"",
            1,
        )
    })
    .await;
    let t = env.tenant("acme");
    let mut logins = tokio::task::JoinSet::new();
    let mut clients = Vec::with_capacity(n);
    let mut started = 0;
    while clients.len() < n {
        while started < n && logins.len() < 32 {
            let (addr, password) = (env.addr(), t.password.clone());
            logins
                .spawn(async move { Raw::connect(addr, &[("user", "app@acme")], &password).await });
            started += 1;
        }
        clients.push(logins.join_next().await.unwrap().unwrap());
    }
    // A session begins with a server connection of its own (pgtenant checks the tenant's
    // setup there), so the clients log in first and the holder takes the only one after.
    let holder = env.connect("acme").await;
    holder.simple_query("BEGIN; SELECT 1").await.unwrap();
    // One client more than the cap is refused: the queue cannot grow past it.
    let err = connect_with(env.pg_config("acme")).await.unwrap_err();
    assert_eq!(code(&err), "53300");

    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = common::rss_kib();
    // Each client's statement, and 64 KiB more pipelined behind it.
    let filler = format!("SELECT length('{}')", "x".repeat(64 * 1024));
    let mut out = bytes::BytesMut::new();
    postgres_protocol::message::frontend::query("SELECT 1", &mut out).unwrap();
    postgres_protocol::message::frontend::query(&filler, &mut out).unwrap();
    let out = out.freeze();
    let mut queued = tokio::task::JoinSet::new();
    for mut c in clients {
        let out = out.clone();
        queued.spawn(async move {
            c.send(&out).await;
            let first = c.until_ready().await;
            let second = c.until_ready().await;
            (first, second)
        });
    }
    let tenant = env.proxy.state.quotas.tenant("acme");
    common::until("every client queued", Duration::from_secs(120), || {
        tenant
            .stats
            .waiting
            .load(std::sync::atomic::Ordering::Relaxed)
            == n
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let grown = common::rss_kib().saturating_sub(before);
    eprintln!(
        "{n} queued clients: this process grew by {grown} KiB ({:.1} KiB per client)",
        grown as f64 / n as f64
    );
    // Reading the pipelined bytes would take 64 MiB or more per 1,000 clients.
    assert!(grown < 32 * n as u64, "{n} queued clients took {grown} KiB");

    // Another tenant is served while acme's queue waits.
    env.connect("globex")
        .await
        .simple_query("SELECT 1")
        .await
        .unwrap();

    holder.simple_query("COMMIT").await.unwrap();
    while let Some(done) = queued.join_next().await {
        let (first, second) = done.unwrap();
        assert!(first.iter().all(|m| m.tag != b'E'), "{first:?}");
        let row = second.iter().find(|m| m.tag == b'D').expect("a row");
        assert!(row.body.ends_with(b"65536"), "{row:?}");
    }
}

/// The soft limit on open files of this process.
fn open_file_limit() -> usize {
    std::fs::read_to_string("/proc/self/limits")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|n| n.parse().ok())
        .unwrap_or(1024)
}
