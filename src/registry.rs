//! What the admin console needs to know and do about sessions: the clients connected now
//! (`SHOW CLIENTS`, `KILL <tenant>`) and paused tenants (`PAUSE`, `RESUME`). A session
//! registers once when it starts; the per-transaction check of a pause reads one atomic
//! unless something is paused.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio_util::sync::CancellationToken;

/// A connected client.
#[derive(Clone)]
pub struct ClientEntry {
    pub tenant: String,
    pub user: String,
    pub peer: SocketAddr,
    pub since: Instant,
    /// Ends the session (KILL); a child of pgtenant's shutdown token.
    pub end: CancellationToken,
    /// Session mode: asks the session to end at its next transaction boundary (its tenant
    /// was removed or moved).
    pub leave: CancellationToken,
}

/// The clients connected now.
#[derive(Default)]
pub struct Clients {
    map: Mutex<HashMap<u64, ClientEntry>>,
}

impl Clients {
    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<u64, ClientEntry>> {
        // One insert or remove at a time: a poisoned map is still consistent.
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers session `id`; it is removed when the guard drops.
    pub fn register(self: &Arc<Self>, id: u64, entry: ClientEntry) -> Registered {
        self.map().insert(id, entry);
        Registered {
            clients: Arc::clone(self),
            id,
        }
    }

    /// The clients now.
    pub fn list(&self) -> Vec<(u64, ClientEntry)> {
        self.map().iter().map(|(k, v)| (*k, v.clone())).collect()
    }

    /// Asks every session of `tenant` to end at its next transaction boundary.
    pub fn leave(&self, tenant: &str) {
        for c in self.map().values().filter(|c| c.tenant == tenant) {
            c.leave.cancel();
        }
    }

    /// Ends every session of `tenant`; returns how many.
    pub fn kill(&self, tenant: &str) -> usize {
        let map = self.map();
        let mut n = 0;
        for c in map.values().filter(|c| c.tenant == tenant) {
            c.end.cancel();
            n += 1;
        }
        n
    }
}

/// A session's registration; dropping it unregisters the session.
pub struct Registered {
    clients: Arc<Clients>,
    id: u64,
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.clients.map().remove(&self.id);
    }
}

/// Paused tenants (or everything).
#[derive(Default)]
pub struct Pauses {
    /// True while anything is paused: the per-transaction check reads only this.
    any: AtomicBool,
    state: Mutex<(bool, HashSet<String>)>,
    resumed: tokio::sync::Notify,
}

impl Pauses {
    fn state(&self) -> std::sync::MutexGuard<'_, (bool, HashSet<String>)> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Pauses `tenant` (None: every tenant): their next transactions wait.
    pub fn pause(&self, tenant: Option<&str>) {
        let mut s = self.state();
        match tenant {
            None => s.0 = true,
            Some(t) => {
                s.1.insert(t.to_owned());
            }
        }
        self.any.store(true, Ordering::SeqCst);
    }

    /// Resumes `tenant` (None: everything, including tenants paused one by one).
    pub fn resume(&self, tenant: Option<&str>) {
        let mut s = self.state();
        match tenant {
            None => {
                s.0 = false;
                s.1.clear();
            }
            Some(t) => {
                s.1.remove(t);
            }
        }
        self.any.store(s.0 || !s.1.is_empty(), Ordering::SeqCst);
        self.resumed.notify_waiters();
    }

    /// Whether `tenant` is paused now.
    #[inline(always)]
    pub fn is_paused(&self, tenant: &str) -> bool {
        // SeqCst: see `TenantStats::hold`.
        if !self.any.load(Ordering::SeqCst) {
            return false;
        }
        let s = self.state();
        s.0 || s.1.contains(tenant)
    }

    /// Waits while `tenant` is paused.
    pub async fn wait(&self, tenant: &str) {
        while self.any.load(Ordering::Acquire) {
            let resumed = self.resumed.notified();
            tokio::pin!(resumed);
            resumed.as_mut().enable();
            if !self.is_paused(tenant) {
                return;
            }
            resumed.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn pause_and_resume_per_tenant_and_for_all() {
        let p = Arc::new(Pauses::default());
        assert!(!p.is_paused("acme"));
        p.pause(Some("acme"));
        assert!(p.is_paused("acme") && !p.is_paused("globex"));
        p.wait("globex").await;
        let waiter = tokio::spawn({
            let p = Arc::clone(&p);
            async move { p.wait("acme").await }
        });
        crate::timers::sleep(std::time::Duration::from_millis(20)).await;
        assert!(!waiter.is_finished());
        p.resume(Some("acme"));
        waiter.await.unwrap();
        p.pause(None);
        assert!(p.is_paused("anyone"));
        p.resume(None);
        assert!(!p.is_paused("anyone"));
    }
}
