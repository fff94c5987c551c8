//! Login protection (DESIGN.md §1.5, §5 S5): only failing attempts are slowed. A correct
//! password is answered at once, whatever else happens on its address: many tenants share one
//! application host or NAT, and a tenant with a stale password is an everyday event.
//!
//! A failure is answered after a delay that doubles with each recent failure, up to a cap,
//! and is forgotten after a quiet period. The delay is the largest of three records: the
//! tenant user's (guessing one account from anywhere), the (source, tenant user) pair's, and
//! the source's spraying record (failures for many different users from one address).
//! Failing attempts for one user are also answered one at a time, and so are a spraying
//! source's, so parallel connections do not multiply a guesser's rate.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const FIRST_DELAY: Duration = Duration::from_millis(100);
const MAX_DELAY: Duration = Duration::from_secs(5);
/// Failures older than this are forgotten.
const QUIET_PERIOD: Duration = Duration::from_secs(300);
/// Bound on remembered sources and users.
const MAX_TRACKED: usize = 100_000;
/// Distinct failing users from one source before the source counts as spraying.
const SPRAY_USERS: usize = 5;

#[derive(Clone, Copy)]
struct Record {
    failures: u32,
    last: Instant,
}

#[derive(Default)]
struct Spray {
    users: HashSet<String>,
    last: Option<Instant>,
}

#[derive(Default)]
struct Inner {
    users: HashMap<String, Record>,
    pairs: HashMap<(IpAddr, String), Record>,
    sprays: HashMap<IpAddr, Spray>,
    /// One failing answer at a time per user and per spraying source.
    user_gates: HashMap<String, Arc<tokio::sync::Mutex<()>>>,
    source_gates: HashMap<IpAddr, Arc<tokio::sync::Mutex<()>>>,
}

/// Shared login-protection state.
#[derive(Default)]
pub struct LoginThrottle {
    inner: Mutex<Inner>,
}

fn delay_for(record: Option<&Record>, now: Instant) -> Duration {
    match record {
        Some(r) if r.failures > 0 && now.saturating_duration_since(r.last) < QUIET_PERIOD => {
            let doublings = (r.failures - 1).min(16);
            (FIRST_DELAY * 2u32.pow(doublings)).min(MAX_DELAY)
        }
        _ => Duration::ZERO,
    }
}

fn bump<K: std::hash::Hash + Eq>(map: &mut HashMap<K, Record>, key: K, now: Instant) {
    if map.len() >= MAX_TRACKED {
        map.retain(|_, r| now.saturating_duration_since(r.last) < QUIET_PERIOD);
    }
    let r = map.entry(key).or_insert(Record {
        failures: 0,
        last: now,
    });
    if now.saturating_duration_since(r.last) >= QUIET_PERIOD {
        r.failures = 0;
    }
    r.failures = r.failures.saturating_add(1);
    r.last = now;
}

/// The gate for `key`, created when missing; unused gates are dropped when the map is full.
fn gate<K: std::hash::Hash + Eq + Clone>(
    map: &mut HashMap<K, Arc<tokio::sync::Mutex<()>>>,
    key: &K,
) -> Arc<tokio::sync::Mutex<()>> {
    if map.len() >= MAX_TRACKED {
        map.retain(|_, g| Arc::strong_count(g) > 1);
    }
    Arc::clone(map.entry(key.clone()).or_default())
}

impl LoginThrottle {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// How long a failed attempt by `user` (tenant-qualified) from `source` waits before its
    /// answer, from the failures recorded before it.
    pub fn failure_delay(&self, source: IpAddr, user: &str, now: Instant) -> Duration {
        let inner = self.lock();
        let spray = inner.sprays.get(&source).and_then(|s| {
            let over = s.users.len().checked_sub(SPRAY_USERS)?;
            Some(Record {
                failures: u32::try_from(over + 1).unwrap_or(u32::MAX),
                last: s.last?,
            })
        });
        delay_for(inner.users.get(user), now)
            .max(delay_for(inner.pairs.get(&(source, user.to_owned())), now))
            .max(delay_for(spray.as_ref(), now))
    }

    /// Records a failed attempt.
    pub fn failed(&self, source: IpAddr, user: &str, now: Instant) {
        let mut inner = self.lock();
        bump(&mut inner.users, user.to_owned(), now);
        bump(&mut inner.pairs, (source, user.to_owned()), now);
        if inner.sprays.len() >= MAX_TRACKED {
            inner.sprays.retain(|_, s| {
                s.last
                    .is_some_and(|l| now.saturating_duration_since(l) < QUIET_PERIOD)
            });
        }
        let spray = inner.sprays.entry(source).or_default();
        if spray
            .last
            .is_some_and(|l| now.saturating_duration_since(l) >= QUIET_PERIOD)
        {
            spray.users.clear();
        }
        // Bounded: past the cap one more user adds nothing to the delay anyway.
        if spray.users.len() < SPRAY_USERS + 16 {
            spray.users.insert(user.to_owned());
        }
        spray.last = Some(now);
    }

    /// Holds a failed attempt for its delay, one at a time per user and per spraying source,
    /// then records it. The answer (the error) is sent after this returns.
    pub async fn hold_failure(&self, source: IpAddr, user: &str) {
        let (user_gate, source_gate) = {
            let mut inner = self.lock();
            let spraying = inner
                .sprays
                .get(&source)
                .is_some_and(|s| s.users.len() >= SPRAY_USERS);
            let user_gate = gate(&mut inner.user_gates, &user.to_owned());
            let source_gate = spraying.then(|| gate(&mut inner.source_gates, &source));
            (user_gate, source_gate)
        };
        let _user = user_gate.lock().await;
        let _source = match &source_gate {
            Some(g) => Some(g.lock().await),
            None => None,
        };
        let delay = self.failure_delay(source, user, Instant::now());
        if !delay.is_zero() {
            crate::timers::sleep(delay).await;
        }
        self.failed(source, user, Instant::now());
    }

    /// Records a success: the user's failures, from anywhere, are forgotten (the source's
    /// spraying record is not, so one good account does not unlock guessing others).
    pub fn succeeded(&self, source: IpAddr, user: &str) {
        let mut inner = self.lock();
        inner.users.remove(user);
        inner.pairs.remove(&(source, user.to_owned()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn failure_delays_grow_with_failures_up_to_a_cap() {
        let t = LoginThrottle::default();
        let now = Instant::now();
        let a = ip("10.0.0.1");
        assert_eq!(t.failure_delay(a, "acme/app", now), Duration::ZERO);
        t.failed(a, "acme/app", now);
        assert_eq!(t.failure_delay(a, "acme/app", now), FIRST_DELAY);
        t.failed(a, "acme/app", now);
        assert_eq!(t.failure_delay(a, "acme/app", now), FIRST_DELAY * 2);
        for _ in 0..20 {
            t.failed(a, "acme/app", now);
        }
        assert_eq!(t.failure_delay(a, "acme/app", now), MAX_DELAY);
        assert_eq!(
            t.failure_delay(a, "acme/app", now + QUIET_PERIOD),
            Duration::ZERO
        );
    }

    #[test]
    fn another_users_failures_on_the_same_address_cost_nothing() {
        let t = LoginThrottle::default();
        let now = Instant::now();
        for _ in 0..3 {
            t.failed(ip("10.0.0.1"), "acme/app", now);
        }
        // A different tenant's user on the same address (a shared NAT): no delay at all.
        assert_eq!(
            t.failure_delay(ip("10.0.0.1"), "globex/app", now),
            Duration::ZERO
        );
        // The guessed user is slowed from any address.
        assert_eq!(
            t.failure_delay(ip("10.0.0.2"), "acme/app", now),
            FIRST_DELAY * 4
        );
        t.succeeded(ip("10.0.0.2"), "acme/app");
        assert_eq!(
            t.failure_delay(ip("10.0.0.2"), "acme/app", now),
            Duration::ZERO
        );
    }

    #[test]
    fn spraying_many_users_slows_that_source() {
        let t = LoginThrottle::default();
        let now = Instant::now();
        for i in 0..SPRAY_USERS + 2 {
            t.failed(ip("10.0.0.9"), &format!("t{i}/app"), now);
        }
        assert!(t.failure_delay(ip("10.0.0.9"), "fresh/user", now) >= FIRST_DELAY * 2);
        assert_eq!(
            t.failure_delay(ip("10.0.0.8"), "fresh/user", now),
            Duration::ZERO
        );
    }

    #[tokio::test]
    async fn failing_answers_for_one_user_come_one_at_a_time() {
        let t = Arc::new(LoginThrottle::default());
        t.failed(ip("10.0.0.1"), "acme/app", Instant::now());
        let started = Instant::now();
        let mut tasks = Vec::new();
        for i in 0..3 {
            let t = Arc::clone(&t);
            tasks.push(tokio::spawn(async move {
                t.hold_failure(ip(&format!("10.0.1.{i}")), "acme/app").await;
            }));
        }
        for task in tasks {
            task.await.unwrap();
        }
        // 100 + 200 + 400 ms one after another, not 3 x 100 ms side by side.
        assert!(
            started.elapsed() >= Duration::from_millis(650),
            "{:?}",
            started.elapsed()
        );
    }
}
