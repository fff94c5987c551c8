//! Abandoned work is cleaned up (issue: no tenant can exhaust a shard by walking away): a
//! client that leaves in the middle of a statement, or in the middle of a message, never
//! leaves a backend running outside the shard's caps, and a client that stops reading its
//! results is disconnected after `client_write_timeout` with its server connection freed.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::{Env, start_with};

/// Client backends of pgtenant's login roles on the fixture's shared database, and how many
/// of them run `pg_sleep`.
fn backends(env: &Env) -> (usize, usize) {
    let out = env.admin_a(
        "SELECT count(*) || ' ' || count(*) FILTER (WHERE query LIKE '%pg_sleep%' AND state = 'active') \
           FROM pg_stat_activity \
          WHERE datname = current_database() AND usename <> current_user \
            AND backend_type = 'client backend' \
            AND application_name <> 'pgtenant health check'",
    );
    let mut parts = out.split_whitespace().map(|n| n.parse::<usize>().unwrap());
    (parts.next().unwrap(), parts.next().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_walk_away_never_leave_backends_beyond_the_cap() {
    const CAP: usize = 3;
    let env = start_with("", |t| {
        t.replacen(
            "max_connections = 60",
            &format!("max_connections = {CAP}"),
            1,
        )
        .replacen(
            "mode = \"transaction\"",
            "mode = \"transaction\"\ncheckout_timeout = \"30s\"",
            1,
        )
    })
    .await;
    let t = env.tenant("acme");
    let (addr, password) = (env.addr(), t.password.clone());
    // Every client starts a long statement and leaves: half of them cleanly between
    // messages, half in the middle of the next message (the server connection cannot be
    // resynchronised and must be closed, with its backend still sleeping).
    let walkers = (0..4 * CAP).map(|i| {
        let password = password.clone();
        tokio::spawn(async move {
            let mut raw = common::raw::Raw::connect(addr, &[("user", "app@acme")], &password).await;
            raw.query("SELECT pg_sleep(20)").await;
            if i % 2 == 1 {
                // The first bytes of another Query: a tag and half a length.
                raw.send(b"Q\0\0").await;
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
            drop(raw);
        })
    });
    let walkers: Vec<_> = walkers.collect();
    let started = Instant::now();
    let mut most = 0;
    while started.elapsed() < Duration::from_secs(8) {
        let (all, _) = backends(&env);
        most = most.max(all);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for w in walkers {
        w.await.unwrap();
    }
    assert!(
        most <= CAP,
        "{most} backends on a shard capped at {CAP} while clients walked away"
    );
    // Nothing keeps sleeping once the clients are gone.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, sleeping) = backends(&env);
        if sleeping == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{sleeping} abandoned statements still run"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // And the shard serves again.
    let c = env.connect("acme").await;
    c.simple_query("SELECT 1").await.unwrap();
}

#[tokio::test]
async fn a_client_that_stops_reading_is_disconnected_and_its_server_freed() {
    let env = start_with("", |t| {
        t.replacen("max_connections = 60", "max_connections = 1", 1)
            .replacen(
                "mode = \"transaction\"",
                "mode = \"transaction\"\nclient_write_timeout = \"1s\"\ncheckout_timeout = \"20s\"",
                1,
            )
    })
    .await;
    let t = env.tenant("acme");
    let mut raw = common::raw::Raw::connect(env.addr(), &[("user", "app@acme")], &t.password).await;
    // About 1 GB of results, never read.
    raw.query("SELECT repeat('x', 1000000), pg_sleep(0) FROM generate_series(1, 1000)")
        .await;
    // The only server connection is busy with it; another client waits for it and gets it
    // once pgtenant gave up on the reader.
    let started = Instant::now();
    let other = env.connect("globex").await;
    other.simple_query("SELECT 1").await.unwrap();
    let waited = started.elapsed();
    assert!(
        waited < Duration::from_secs(15),
        "the stalled client held the server connection for {waited:?}"
    );
    // The stalled client's connection is closed (after what was already in flight).
    let closed = tokio::time::timeout(Duration::from_secs(30), async {
        while raw.try_recv().await.is_some() {}
    })
    .await;
    assert!(closed.is_ok(), "the stalled client is still connected");
}

/// Messages up to the next ReadyForQuery. A client that is not heard waits forever: fail
/// instead (a generous, failure-only limit).
async fn heard(raw: &mut common::raw::Raw, what: &str) -> Vec<common::raw::Msg> {
    tokio::time::timeout(Duration::from_secs(60), raw.until_ready())
        .await
        .unwrap_or_else(|_| panic!("{what}: no answer"))
}

/// The transaction status of a reply's ReadyForQuery.
fn status(msgs: &[common::raw::Msg]) -> Option<u8> {
    msgs.last().map(|m| m.body[0])
}

/// After a wait, a one-value Query sent in pieces a few milliseconds apart: its value (after
/// the DataRow's column count, 2 bytes, and the value's length, 4) and the transaction
/// status after it.
async fn ask_in_pieces(
    raw: &mut common::raw::Raw,
    sql: &str,
    what: &str,
) -> (Option<Vec<u8>>, Option<u8>) {
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut out = bytes::BytesMut::new();
    postgres_protocol::message::frontend::query(sql, &mut out).unwrap();
    for piece in out.chunks(3) {
        raw.send(piece).await;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let msgs = heard(raw, what).await;
    let value = msgs
        .iter()
        .find(|m| m.tag == b'D')
        .map(|m| m.body[6..].to_vec());
    (value, status(&msgs))
}

/// Transaction pooling reads a client that waits, inside a transaction or between two, only
/// when its socket shows bytes: the read registered while it waited is not repeated at every
/// wake-up. It must still hear a statement sent in pieces inside a transaction, the next
/// transaction's first message in pieces, and a client that leaves in the middle of a
/// statement it sent after waiting in its transaction: that statement is cancelled long
/// before it would end.
#[tokio::test]
async fn a_client_waiting_in_or_between_transactions_is_heard() {
    let env = start_with("", |t| {
        t.replacen("mode = \"session\"", "mode = \"transaction\"", 1)
    })
    .await;
    let t = env.tenant("acme");
    let mut raw = common::raw::Raw::connect(env.addr(), &[("user", "app@acme")], &t.password).await;
    raw.query("BEGIN").await;
    assert_eq!(status(&heard(&mut raw, "BEGIN").await), Some(b'T'));
    assert_eq!(
        ask_in_pieces(&mut raw, "SELECT 40 + 2", "inside a transaction").await,
        (Some(b"42".to_vec()), Some(b'T'))
    );
    raw.query("COMMIT").await;
    assert_eq!(status(&heard(&mut raw, "COMMIT").await), Some(b'I'));
    assert_eq!(
        ask_in_pieces(&mut raw, "SELECT 43 - 1", "between transactions").await,
        (Some(b"42".to_vec()), Some(b'I'))
    );

    raw.query("BEGIN").await;
    heard(&mut raw, "the second BEGIN").await;
    // It waits in its transaction before its statement.
    tokio::time::sleep(Duration::from_millis(100)).await;
    raw.query("SELECT pg_sleep(60)").await;
    common::until("the statement runs", Duration::from_secs(20), || {
        backends(&env).1 == 1
    })
    .await;
    drop(raw);
    common::until(
        "the abandoned statement is cancelled",
        Duration::from_secs(30),
        || backends(&env).1 == 0,
    )
    .await;
}
