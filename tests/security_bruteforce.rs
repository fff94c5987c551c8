//! Password guessing: failing attempts wait longer and longer (per tenant user, per source
//! and user, and per spraying source), one at a time; correct passwords are never slowed,
//! so other tenants behind the same address log in at full speed.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::raw::Raw;
use common::start;

async fn attempt(env: &common::Env, source: &str, user: &str, password: &str) -> (bool, Duration) {
    let started = Instant::now();
    let mut raw = Raw::startup_from(source, env.addr(), &[("user", user)]).await;
    let ok = raw.authenticate(password).await.is_ok();
    (ok, started.elapsed())
}

#[tokio::test]
async fn guessing_slows_down_failing_attempts_only() {
    let env = start().await;
    let good = env.tenant("acme").password.clone();
    let globex = env.tenant("globex").password.clone();
    let mut last = Duration::ZERO;
    for _ in 0..6 {
        let (ok, took) = attempt(&env, "127.0.0.1", "app@acme", "guess").await;
        assert!(!ok);
        last = took;
    }
    // After five failures the sixth failure waits 1.6 s before its answer.
    assert!(last >= Duration::from_millis(1500), "{last:?}");

    // Another tenant's good login from the same address (a shared NAT) is not slowed: it is
    // answered sooner than the last failure, whose answer waited 1.6 s (a slowed one would
    // wait 3.2 s).
    let (ok, took) = attempt(&env, "127.0.0.1", "app@globex", &globex).await;
    assert!(ok);
    assert!(took < last, "{took:?}, the last failure {last:?}");
    // Nor is the guessed user's own correct password, from anywhere: only failures wait.
    let (ok, took) = attempt(&env, "127.0.0.3", "app@acme", &good).await;
    assert!(ok);
    assert!(took < last, "{took:?}, the last failure {last:?}");
}

#[tokio::test]
async fn a_good_login_is_fast_during_a_parallel_brute_force_from_its_address() {
    let env = start().await;
    let globex = env.tenant("globex").password.clone();
    // Twenty guesses in parallel: their answers come one at a time, ever slower (the last
    // ones are cut off by the startup timeout), while the other tenant logs in. A login
    // queued behind them would wait the sum of their delays (0.1 s doubling up to 5 s each:
    // tens of seconds); one that is not waits for nothing but its own SCRAM exchange.
    let guesses: Vec<_> = (0..20)
        .map(|_| {
            let addr = env.addr();
            tokio::spawn(async move {
                let mut raw = Raw::startup_from("127.0.0.1", addr, &[("user", "app@acme")]).await;
                let _ = raw.authenticate("guess").await;
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    for _ in 0..3 {
        let (ok, took) = attempt(&env, "127.0.0.1", "app@globex", &globex).await;
        assert!(ok);
        assert!(took < Duration::from_secs(5), "{took:?}");
    }
    for g in guesses {
        g.abort();
    }
}

#[tokio::test]
async fn failures_name_the_user_as_sent_for_known_and_unknown_tenants() {
    let env = start().await;
    for user in ["app.acme", "app.nosuchtenant", "nobody@acme", "app@nosuch"] {
        let mut raw = Raw::startup(env.addr(), &[("user", user)]).await;
        let err = raw.authenticate("wrong").await.unwrap_err();
        assert_eq!(err.sqlstate().as_deref(), Some("28P01"), "{user}");
        assert_eq!(
            err.field(b'M').unwrap(),
            format!("password authentication failed for user \"{user}\""),
        );
    }
}

/// A flood of half-open connections never locks anyone out: when the un-authenticated table
/// (in total, or for one address) is full, the oldest pending handshake makes room, so a
/// tenant on the flooding address or another logs in at once.
#[tokio::test]
async fn half_open_floods_do_not_lock_out_legitimate_clients() {
    let env = common::start_with("", |t| {
        t.replacen(
            "[listen]\n",
            "[listen]\nmax_unauthenticated = 200\nmax_unauthenticated_per_source = 100\n",
            1,
        )
    })
    .await;
    let globex = env.tenant("globex").password.clone();
    let acme = env.tenant("acme").password.clone();
    for round in 0..2 {
        // 1,000 half-open connections, from one address, then spread over four.
        let mut flood = Vec::new();
        for i in 0..1000 {
            let source = if round == 0 {
                "127.0.0.1".to_owned()
            } else {
                format!("127.0.0.{}", 10 + i % 4)
            };
            let socket = tokio::net::TcpSocket::new_v4().unwrap();
            socket
                .bind(std::net::SocketAddr::new(source.parse().unwrap(), 0))
                .unwrap();
            flood.push(socket.connect(env.addr()).await.unwrap());
        }
        for (source, user, password) in [
            ("127.0.0.1", "app@globex", &globex),
            ("127.0.0.10", "app@acme", &acme),
            ("127.0.0.99", "app@globex", &globex),
        ] {
            // Locked out, it would wait for the oldest half-open connections' startup
            // timeout (10 s).
            let (ok, took) = attempt(&env, source, user, password).await;
            assert!(ok, "round {round}: {user} from {source}");
            assert!(took < Duration::from_secs(5), "round {round}: {took:?}");
        }
        drop(flood);
    }
}

/// A client that stops answering during authentication is told why when the startup timeout
/// ends it (08P01), instead of being dropped without a word.
#[tokio::test]
async fn a_startup_timeout_is_reported() {
    let env = common::start_with("", |t| {
        t.replacen("[listen]\n", "[listen]\nstartup_timeout = \"1s\"\n", 1)
    })
    .await;
    let mut raw = Raw::startup(env.addr(), &[("user", "app@acme")]).await;
    let sasl = raw.recv().await;
    assert_eq!(sasl.tag, b'R', "the authentication request");
    let m = raw.recv().await;
    assert_eq!(m.tag, b'E');
    assert_eq!(m.sqlstate().as_deref(), Some("08P01"));
}
