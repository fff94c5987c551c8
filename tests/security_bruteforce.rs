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

    // Another tenant's good login from the same address (a shared NAT) is not slowed.
    let (ok, took) = attempt(&env, "127.0.0.1", "app@globex", &globex).await;
    assert!(ok);
    assert!(took < Duration::from_millis(1000), "{took:?}");
    // Nor is the guessed user's own correct password, from anywhere: only failures wait.
    let (ok, took) = attempt(&env, "127.0.0.3", "app@acme", &good).await;
    assert!(ok);
    assert!(took < Duration::from_millis(1000), "{took:?}");
}

#[tokio::test]
async fn a_good_login_is_fast_during_a_parallel_brute_force_from_its_address() {
    let env = start().await;
    let globex = env.tenant("globex").password.clone();
    // Twenty guesses in parallel: their answers come one at a time, ever slower (the last
    // ones are cut off by the startup timeout), while the other tenant logs in.
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
        assert!(took < Duration::from_millis(500), "{took:?}");
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

/// Over the per-address cap of connections still logging in, the next one gets a 53300
/// ErrorResponse (not a silent close), and a connection from another address is served.
#[tokio::test]
async fn over_the_per_address_login_cap_the_client_is_told_why() {
    let env = common::start_with("", |t| {
        t.replacen(
            "[listen]\n",
            "[listen]\nmax_unauthenticated_per_source = 2\n",
            1,
        )
    })
    .await;
    let _held: Vec<tokio::net::TcpStream> = {
        let mut v = Vec::new();
        for _ in 0..2 {
            v.push(tokio::net::TcpStream::connect(env.addr()).await.unwrap());
        }
        v
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut raw = Raw::startup(env.addr(), &[("user", "app@acme")]).await;
    let m = raw.recv().await;
    assert_eq!(m.tag, b'E');
    assert_eq!(m.sqlstate().as_deref(), Some("53300"));
    let globex = env.tenant("globex").password.clone();
    let (ok, _) = attempt(&env, "127.0.0.2", "app@globex", &globex).await;
    assert!(ok);
}
