//! Login protection (DESIGN.md §1.5): failed authentications slow down further attempts from
//! the same source address and for the same tenant user (a delay that doubles with each
//! failure, up to a cap, and is forgotten after a quiet period), and each source address may
//! hold only so many connections that have not authenticated yet. Other sources and users are
//! not slowed.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const FIRST_DELAY: Duration = Duration::from_millis(100);
const MAX_DELAY: Duration = Duration::from_secs(5);
/// Failures older than this are forgotten.
const QUIET_PERIOD: Duration = Duration::from_secs(300);
/// Bound on remembered sources and users.
const MAX_TRACKED: usize = 100_000;

#[derive(Clone, Copy)]
struct Record {
    failures: u32,
    last: Instant,
}

#[derive(Default)]
struct Inner {
    sources: HashMap<IpAddr, Record>,
    users: HashMap<String, Record>,
    unauthenticated: HashMap<IpAddr, usize>,
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

impl LoginThrottle {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// How long to hold an attempt by `user` (tenant-qualified) from `source` before answering
    /// it, success or failure alike (so a prober cannot tell by timing out early).
    pub fn delay(&self, source: IpAddr, user: &str, now: Instant) -> Duration {
        let inner = self.lock();
        delay_for(inner.sources.get(&source), now).max(delay_for(inner.users.get(user), now))
    }

    /// Records a failed attempt.
    pub fn failed(&self, source: IpAddr, user: &str, now: Instant) {
        let mut inner = self.lock();
        bump(&mut inner.sources, source, now);
        bump(&mut inner.users, user.to_owned(), now);
    }

    /// Records a success: the user's failures are forgotten (the source's are not, so one
    /// good account does not unlock guessing others from the same place).
    pub fn succeeded(&self, user: &str) {
        self.lock().users.remove(user);
    }

    /// Counts a connection from `source` until it authenticates or closes; `None` when the
    /// source already has `cap` such connections.
    pub fn enter(self: &Arc<Self>, source: IpAddr, cap: usize) -> Option<PendingLogin> {
        let mut inner = self.lock();
        let count = inner.unauthenticated.entry(source).or_insert(0);
        if *count >= cap {
            return None;
        }
        *count += 1;
        Some(PendingLogin {
            throttle: Arc::clone(self),
            source,
        })
    }
}

/// A connection from a source that has not authenticated yet.
pub struct PendingLogin {
    throttle: Arc<LoginThrottle>,
    source: IpAddr,
}

impl Drop for PendingLogin {
    fn drop(&mut self) {
        let mut inner = self.throttle.lock();
        if let Some(count) = inner.unauthenticated.get_mut(&self.source) {
            *count -= 1;
            if *count == 0 {
                inner.unauthenticated.remove(&self.source);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn delays_grow_with_failures_up_to_a_cap() {
        let t = LoginThrottle::default();
        let now = Instant::now();
        assert_eq!(t.delay(ip("10.0.0.1"), "acme/app", now), Duration::ZERO);
        t.failed(ip("10.0.0.1"), "acme/app", now);
        assert_eq!(t.delay(ip("10.0.0.1"), "acme/app", now), FIRST_DELAY);
        t.failed(ip("10.0.0.1"), "acme/app", now);
        assert_eq!(t.delay(ip("10.0.0.1"), "acme/app", now), FIRST_DELAY * 2);
        for _ in 0..20 {
            t.failed(ip("10.0.0.1"), "acme/app", now);
        }
        assert_eq!(t.delay(ip("10.0.0.1"), "acme/app", now), MAX_DELAY);
        assert_eq!(
            t.delay(ip("10.0.0.1"), "acme/app", now + QUIET_PERIOD),
            Duration::ZERO
        );
    }

    #[test]
    fn other_sources_and_users_are_not_slowed() {
        let t = LoginThrottle::default();
        let now = Instant::now();
        t.failed(ip("10.0.0.1"), "acme/app", now);
        assert_eq!(t.delay(ip("10.0.0.2"), "globex/app", now), Duration::ZERO);
        // The user is slowed from any source; the source for any user.
        assert_eq!(t.delay(ip("10.0.0.2"), "acme/app", now), FIRST_DELAY);
        assert_eq!(t.delay(ip("10.0.0.1"), "globex/app", now), FIRST_DELAY);
        t.succeeded("acme/app");
        assert_eq!(t.delay(ip("10.0.0.2"), "acme/app", now), Duration::ZERO);
    }

    #[test]
    fn unauthenticated_connections_are_capped_per_source() {
        let t = Arc::new(LoginThrottle::default());
        let a = t.enter(ip("10.0.0.1"), 2).unwrap();
        let _b = t.enter(ip("10.0.0.1"), 2).unwrap();
        assert!(t.enter(ip("10.0.0.1"), 2).is_none());
        assert!(t.enter(ip("10.0.0.2"), 2).is_some());
        drop(a);
        assert!(t.enter(ip("10.0.0.1"), 2).is_some());
    }
}
