//! Password guessing: failures slow down further attempts from the same address and for the
//! same user, up to a cap; other addresses and tenants are not slowed.

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
async fn guessing_slows_down_the_guesser_only() {
    let env = start().await;
    let good = env.tenant("acme").password.clone();
    let mut last = Duration::ZERO;
    for _ in 0..6 {
        let (ok, took) = attempt(&env, "127.0.0.1", "app@acme", "guess").await;
        assert!(!ok);
        last = took;
    }
    // After five failures the sixth waits 1.6 s before its answer.
    assert!(last >= Duration::from_millis(1500), "{last:?}");

    // Another tenant's user from another address is not slowed.
    let globex = env.tenant("globex").password.clone();
    let (ok, took) = attempt(&env, "127.0.0.2", "app@globex", &globex).await;
    assert!(ok);
    assert!(took < Duration::from_millis(1000), "{took:?}");

    // The guessed user is slowed from any address, and still gets in with its password.
    let (ok, took) = attempt(&env, "127.0.0.3", "app@acme", &good).await;
    assert!(ok);
    assert!(took >= Duration::from_millis(1500), "{took:?}");
    // Success clears the user's record (not the guessing address's).
    let (ok, took) = attempt(&env, "127.0.0.3", "app@acme", &good).await;
    assert!(ok);
    assert!(took < Duration::from_millis(1000), "{took:?}");
}
