//! pgtenant's count of what the server owes (issue "Every promise holds on a pooled
//! connection", item 2) against a real PostgreSQL: random sequences of extended-protocol and
//! simple messages, including failing ones (after a failed extended message PostgreSQL
//! discards everything up to the next Sync, Queries included), are sent straight to the
//! server with `ConnTracker` predicting the ReadyForQuery replies; and the same sequences go
//! through pgtenant on a one-connection shard, which must answer exactly like PostgreSQL and
//! hand the connection to the next client afterwards.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use bytes::BytesMut;
use common::raw::{Msg, Raw};
use pgtenant::protocol::TxStatus;
use pgtenant::protocol::tracker::ConnTracker;
use postgres_protocol::message::frontend;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

/// One random client message: its tag and bytes.
fn message(rng: &mut StdRng, out: &mut BytesMut) -> u8 {
    match rng.random_range(0..11) {
        0 => {
            frontend::parse("", "SELECT 1", std::iter::empty::<u32>(), out).unwrap();
            b'P'
        }
        1 => {
            frontend::parse("", "SELEC broken", std::iter::empty::<u32>(), out).unwrap();
            b'P'
        }
        2 => {
            Raw::put_bind_unnamed(out);
            b'B'
        }
        3 => {
            frontend::execute("", 0, out).unwrap();
            b'E'
        }
        4 => {
            frontend::describe(b'S', "", out).unwrap();
            b'D'
        }
        5 => {
            frontend::close(b'S', "", out).unwrap();
            b'C'
        }
        6 => {
            frontend::query("SELECT 1", out).unwrap();
            b'Q'
        }
        7 => {
            frontend::query("SELECT 1/0", out).unwrap();
            b'Q'
        }
        8 => {
            frontend::flush(out);
            b'H'
        }
        _ => {
            frontend::sync(out);
            b'S'
        }
    }
}

/// Sends a random sequence ending in Sync, then reads replies until the model owes nothing;
/// returns the replies. Panics if the server sends more, or stops early.
async fn run_sequence(raw: &mut Raw, rng: &mut StdRng, label: &str) -> Vec<Msg> {
    let mut model = ConnTracker::default();
    let mut out = BytesMut::new();
    let mut tags = Vec::new();
    for _ in 0..rng.random_range(1..12) {
        tags.push(message(rng, &mut out));
    }
    frontend::sync(&mut out);
    tags.push(b'S');
    for &t in &tags {
        model.client_message(t);
    }
    raw.send(&out).await;
    let mut replies = Vec::new();
    while model.pending() > 0 {
        let m = tokio::time::timeout(Duration::from_secs(5), raw.recv())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "{label}: the server stopped with {} ReadyForQuery still expected after {:?}; sent {:?}",
                    model.pending(),
                    replies.iter().map(|m: &Msg| m.tag as char).collect::<String>(),
                    String::from_utf8_lossy(&tags)
                )
            });
        let status = (m.tag == b'Z').then(|| match m.body.first() {
            Some(b'T') => TxStatus::InTransaction,
            Some(b'E') => TxStatus::Failed,
            _ => TxStatus::Idle,
        });
        model.server_message(m.tag, status);
        replies.push(m);
    }
    assert!(
        tokio::time::timeout(Duration::from_millis(50), raw.recv())
            .await
            .is_err(),
        "{label}: the server sent more than the model expected; sent {:?}",
        String::from_utf8_lossy(&tags)
    );
    assert!(model.is_idle(), "{label}: {model:?}");
    replies
}

#[tokio::test]
async fn the_reply_count_matches_postgresql_and_pgtenant_answers_the_same() {
    let w = common::world();
    let mut rng = StdRng::seed_from_u64(20261130);
    // Straight to PostgreSQL.
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], w.a.port));
    let mut direct = Raw::startup(addr, &[("user", "postgres"), ("database", "postgres")]).await;
    direct.authenticate(&w.a.password).await.unwrap();
    direct.until_ready().await;
    for i in 0..300 {
        run_sequence(&mut direct, &mut rng, &format!("direct #{i}")).await;
    }

    // Through pgtenant, on a dedicated shard with one server connection: the same answers,
    // and the connection goes back for the next client every time.
    let env = common::start_with("", |t| {
        t.replace("max_connections = 20", "max_connections = 1")
    })
    .await;
    let t = env.tenant("initech").clone();
    let mut rng = StdRng::seed_from_u64(20261130);
    for i in 0..60 {
        let mut raw = Raw::connect(env.addr(), &[("user", "app@initech")], &t.password).await;
        run_sequence(&mut raw, &mut rng, &format!("pgtenant #{i}")).await;
        if i % 10 == 0 {
            let other = env.connect("initech").await;
            tokio::time::timeout(Duration::from_secs(5), other.simple_query("SELECT 1"))
                .await
                .expect("the server connection was handed on")
                .unwrap();
        }
    }
}

/// The tags of the replies up to the next ReadyForQuery.
async fn reply_tags(raw: &mut Raw) -> String {
    raw.until_ready()
        .await
        .iter()
        .map(|m| m.tag as char)
        .collect()
}

/// The client waits for the error of a failed extended message before sending a Query: the
/// server discards that Query too (no reply at all) and answers only the Sync; pgtenant must
/// do the same and not wait for a ReadyForQuery that never comes.
#[tokio::test]
async fn a_query_sent_after_a_failed_extended_message_is_discarded() {
    let env = common::start_with("", |t| {
        t.replace("max_connections = 20", "max_connections = 1")
    })
    .await;
    let t = env.tenant("initech").clone();
    let mut raw = Raw::connect(env.addr(), &[("user", "app@initech")], &t.password).await;
    let mut out = BytesMut::new();
    frontend::parse("", "SELEC broken", std::iter::empty::<u32>(), &mut out).unwrap();
    frontend::flush(&mut out);
    raw.send(&out).await;
    assert_eq!(raw.recv().await.tag, b'E');
    let mut out = BytesMut::new();
    frontend::query("SELECT 1", &mut out).unwrap();
    frontend::sync(&mut out);
    raw.send(&out).await;
    assert_eq!(reply_tags(&mut raw).await, "Z", "only the Sync is answered");
    raw.query("SELECT 1").await;
    assert_eq!(reply_tags(&mut raw).await, "TDCZ");
    let other = env.connect("initech").await;
    tokio::time::timeout(Duration::from_secs(5), other.simple_query("SELECT 1"))
        .await
        .expect("the server connection was handed on")
        .unwrap();
}
