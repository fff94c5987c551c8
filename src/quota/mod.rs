//! Per-tenant limits (DESIGN.md §2 plans): client connections, server connections, queries
//! per second, statement and idle-in-transaction timeouts. The counting logic is sans-IO
//! (callers pass the time); sessions and pools hold the shared per-tenant state.
//!
//! Limits are read from the snapshot each time they are checked, so a reload applies them
//! to new connections and queries without a restart.

pub mod histogram;
pub mod login;
pub mod pending;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::Semaphore;

/// A token bucket: `rate` tokens per second, holding at most `rate` (a burst of one second).
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket refilling at `rate` per second.
    pub fn new(rate: u32, now: Instant) -> Self {
        TokenBucket {
            rate: f64::from(rate),
            tokens: f64::from(rate),
            last: now,
        }
    }

    /// Changes the rate (after a reload), keeping the tokens already earned.
    pub fn set_rate(&mut self, rate: u32) {
        self.rate = f64::from(rate);
        self.tokens = self.tokens.min(self.rate);
    }

    /// Takes one token if there is one.
    pub fn try_take(&mut self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.rate);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// What a tenant's sessions did, for the metrics: plain atomics of this tenant's own, so
/// recording touches nothing shared with other tenants' sessions (read at scrape time).
#[derive(Default)]
pub struct TenantStats {
    pub queries: AtomicU64,
    pub transactions: AtomicU64,
    pub guard_refusals: AtomicU64,
    pub throttled: AtomicU64,
    /// Connections refused at the tenant's client cap.
    pub client_cap_refusals: AtomicU64,
    /// Transactions that waited past `checkout_timeout` for a server connection.
    pub server_cap_refusals: AtomicU64,
    /// Clients in a transaction now (transaction mode), and waiting for a server connection.
    pub active: AtomicUsize,
    pub waiting: AtomicUsize,
    /// Clients whose server connection is pinned to them (transaction mode: a temporary
    /// table, a WITH HOLD cursor, a session advisory lock).
    pub pinned: AtomicUsize,
    pub bytes_from_clients: AtomicU64,
    pub bytes_to_clients: AtomicU64,
    /// Transaction mode: from a server connection's checkout to its release.
    pub transaction_seconds: histogram::DurationHistogram,
    /// From a Query or Sync to its ReadyForQuery.
    pub query_seconds: histogram::DurationHistogram,
    /// How long a transaction waited for a server connection.
    pub checkout_wait_seconds: histogram::DurationHistogram,
}

impl TenantStats {
    /// Adds `n` to `counter`.
    pub fn add(counter: &AtomicU64, n: u64) {
        if n > 0 {
            counter.fetch_add(n, Ordering::Relaxed);
        }
    }

    /// A value for display.
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }

    /// Counts one in `gauge` while the returned guard lives.
    pub fn hold(gauge: &AtomicUsize) -> Held<'_> {
        // SeqCst: a session that counts itself active and then reads the pause flag, and a
        // PAUSE that sets the flag and then reads `active`, cannot both miss each other.
        gauge.fetch_add(1, Ordering::SeqCst);
        Held(gauge)
    }
}

/// One counted in a gauge of [`TenantStats`] until dropped.
pub struct Held<'a>(&'a AtomicUsize);

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Live per-tenant counters.
#[derive(Default)]
pub struct TenantState {
    pub stats: TenantStats,
    /// The tenant is gone from the configuration in force (a reload removed it).
    removed: std::sync::atomic::AtomicBool,
    /// Bumped when the tenant's placement changes (MOVE TENANT, a reload): its sessions
    /// route again at their next transaction.
    placement_epoch: AtomicU64,
    clients: AtomicUsize,
    /// LISTEN subscriptions of all the tenant's clients (bounded: each one costs the shard's
    /// shared listening connection).
    channels: AtomicUsize,
    bucket: Mutex<Option<TokenBucket>>,
    servers: Mutex<Option<(usize, Arc<Semaphore>)>>,
}

impl TenantState {
    /// Takes a query token when the tenant has a rate; true when the query may run.
    pub fn take_query(&self, rate: Option<u32>, now: Instant) -> bool {
        let Some(rate) = rate else { return true };
        let mut bucket = self.bucket.lock().unwrap_or_else(|p| p.into_inner());
        let b = bucket.get_or_insert_with(|| TokenBucket::new(rate, now));
        if b.rate != f64::from(rate) {
            b.set_rate(rate);
        }
        b.try_take(now)
    }

    /// The semaphore capping this tenant's server connections at `limit`.
    pub fn server_permits(&self, limit: usize) -> Arc<Semaphore> {
        let mut slot = self.servers.lock().unwrap_or_else(|p| p.into_inner());
        match &*slot {
            Some((l, s)) if *l == limit => Arc::clone(s),
            _ => {
                // A changed limit gets a fresh semaphore; holders of the old one release
                // into it, so the new cap applies fully once they are gone.
                let s = Arc::new(Semaphore::new(limit));
                *slot = Some((limit, Arc::clone(&s)));
                s
            }
        }
    }

    /// Subscriptions to LISTEN channels held by the tenant's clients.
    pub fn channels(&self) -> usize {
        self.channels.load(Ordering::Relaxed)
    }

    /// Counts `n` more (`added`) or fewer subscriptions.
    pub fn count_channels(&self, n: usize, added: bool) {
        if added {
            self.channels.fetch_add(n, Ordering::Relaxed);
        } else {
            // Never below zero, whatever the order of concurrent updates.
            let _ = self
                .channels
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |c| {
                    Some(c.saturating_sub(n))
                });
        }
    }

    /// Marks the tenant removed from (or back in) the configuration.
    pub fn set_removed(&self, removed: bool) {
        self.removed.store(removed, Ordering::Relaxed);
    }

    /// The placement generation now.
    pub fn placement_epoch(&self) -> u64 {
        self.placement_epoch.load(Ordering::SeqCst)
    }

    /// Marks the tenant's placement changed.
    pub fn bump_placement(&self) {
        self.placement_epoch.fetch_add(1, Ordering::SeqCst);
    }

    /// Whether a reload removed the tenant.
    pub fn removed(&self) -> bool {
        self.removed.load(Ordering::Relaxed)
    }

    /// Current client connections.
    pub fn clients(&self) -> usize {
        self.clients.load(Ordering::Relaxed)
    }
}

/// A client connection counted against its tenant; the count drops with it.
pub struct ClientSlot(Arc<TenantState>);

impl Drop for ClientSlot {
    fn drop(&mut self) {
        self.0.clients.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Per-tenant state for all tenants, created on first use.
#[derive(Default)]
pub struct Quotas {
    tenants: Mutex<HashMap<String, Arc<TenantState>>>,
}

impl Quotas {
    /// The state of tenant `name`.
    pub fn tenant(&self, name: &str) -> Arc<TenantState> {
        let mut map = self.tenants.lock().unwrap_or_else(|p| p.into_inner());
        Arc::clone(map.entry(name.to_owned()).or_default())
    }

    /// Admits a client connection for `name` if it has fewer than `limit`.
    pub fn admit_client(&self, name: &str, limit: Option<usize>) -> Option<ClientSlot> {
        let state = self.tenant(name);
        let now = state.clients.fetch_add(1, Ordering::Relaxed) + 1;
        let slot = ClientSlot(state);
        match limit {
            Some(max) if now > max => {
                TenantStats::add(&slot.0.stats.client_cap_refusals, 1);
                None
            }
            _ => Some(slot),
        }
    }

    /// Every tenant seen since start, with its state (for the metrics and the console).
    pub fn all(&self) -> Vec<(String, Arc<TenantState>)> {
        let map = self.tenants.lock().unwrap_or_else(|p| p.into_inner());
        map.iter()
            .map(|(k, v)| (k.clone(), Arc::clone(v)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_bucket_allows_a_burst_then_the_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(10, t0);
        assert_eq!((0..20).filter(|_| b.try_take(t0)).count(), 10);
        assert!(!b.try_take(t0));
        assert!(b.try_take(t0 + Duration::from_millis(100)));
        assert!(!b.try_take(t0 + Duration::from_millis(100)));
        // Idle time refills only up to the burst.
        let later = t0 + Duration::from_secs(60);
        assert_eq!((0..20).filter(|_| b.try_take(later)).count(), 10);
    }

    #[test]
    fn client_slots_count_and_release() {
        let q = Quotas::default();
        let a = q.admit_client("acme", Some(2)).unwrap();
        let _b = q.admit_client("acme", Some(2)).unwrap();
        assert!(q.admit_client("acme", Some(2)).is_none());
        assert!(
            q.admit_client("globex", Some(2)).is_some(),
            "other tenants are not affected"
        );
        drop(a);
        assert!(q.admit_client("acme", Some(2)).is_some());
        assert!(q.admit_client("acme", None).is_some());
    }

    #[test]
    fn query_rates_apply_per_tenant_and_follow_reloads() {
        let q = Quotas::default();
        let acme = q.tenant("acme");
        let now = Instant::now();
        assert_eq!((0..10).filter(|_| acme.take_query(Some(5), now)).count(), 5);
        assert!(q.tenant("globex").take_query(Some(5), now));
        assert!(acme.take_query(None, now), "no limit, no refusal");
        assert_eq!(
            (0..10)
                .filter(|_| acme.take_query(Some(2), now + Duration::from_secs(1)))
                .count(),
            2
        );
    }
}
