//! Connections that have not authenticated yet (DESIGN.md §1.1, §5 S5). Their number is
//! capped in total (`listen.max_unauthenticated`) and per source address
//! (`listen.max_unauthenticated_per_source`). When a cap is reached the *oldest* pending
//! handshake (of that address, or overall) is dropped to make room, rather than the newest
//! being refused: a flood of half-open connections then keeps recycling its own slots, and a
//! legitimate client, on the same address or another, gets in as soon as it connects.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use tokio_util::sync::CancellationToken;

#[derive(Default)]
struct Inner {
    next: u64,
    /// Oldest first.
    pending: VecDeque<(u64, IpAddr, CancellationToken)>,
    per_source: HashMap<IpAddr, usize>,
}

impl Inner {
    fn remove_at(&mut self, i: usize) -> Option<CancellationToken> {
        let (_, source, token) = self.pending.remove(i)?;
        if let Some(n) = self.per_source.get_mut(&source) {
            *n -= 1;
            if *n == 0 {
                self.per_source.remove(&source);
            }
        }
        Some(token)
    }
}

/// All pending handshakes.
#[derive(Default)]
pub struct Handshakes {
    inner: Mutex<Inner>,
}

/// One pending handshake; dropping it (authenticated or gone) frees its place.
pub struct Handshake {
    registry: Arc<Handshakes>,
    id: u64,
    /// Cancelled when the handshake is dropped to make room for a newer one.
    pub evicted: CancellationToken,
}

impl Handshakes {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // Each update keeps the queue and the counts consistent before it can panic.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a new handshake from `source`, evicting the oldest of that source when it is
    /// at `per_source`, and the oldest overall when the total is at `total`.
    pub fn admit(self: &Arc<Self>, source: IpAddr, total: usize, per_source: usize) -> Handshake {
        let mut inner = self.lock();
        if inner.per_source.get(&source).copied().unwrap_or(0) >= per_source.max(1)
            && let Some(i) = inner.pending.iter().position(|(_, s, _)| *s == source)
            && let Some(token) = inner.remove_at(i)
        {
            token.cancel();
        }
        while inner.pending.len() >= total.max(1) {
            match inner.remove_at(0) {
                Some(token) => token.cancel(),
                None => break,
            }
        }
        inner.next += 1;
        let id = inner.next;
        let evicted = CancellationToken::new();
        inner.pending.push_back((id, source, evicted.clone()));
        *inner.per_source.entry(source).or_insert(0) += 1;
        Handshake {
            registry: Arc::clone(self),
            id,
            evicted,
        }
    }

    /// Handshakes pending now.
    pub fn len(&self) -> usize {
        self.lock().pending.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Drop for Handshake {
    fn drop(&mut self) {
        let mut inner = self.registry.lock();
        // Usually among the newest; an evicted one is already gone.
        if let Some(i) = inner.pending.iter().rposition(|(id, _, _)| *id == self.id) {
            inner.remove_at(i);
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
    fn the_oldest_of_a_full_source_makes_room() {
        let reg = Arc::new(Handshakes::default());
        let flood: Vec<_> = (0..3).map(|_| reg.admit(ip("10.0.0.1"), 100, 3)).collect();
        let other = reg.admit(ip("10.0.0.2"), 100, 3);
        let newest = reg.admit(ip("10.0.0.1"), 100, 3);
        assert!(
            flood[0].evicted.is_cancelled(),
            "the oldest of that address"
        );
        assert!(!flood[1].evicted.is_cancelled() && !other.evicted.is_cancelled());
        assert!(!newest.evicted.is_cancelled());
        assert_eq!(reg.len(), 4);
        drop(flood);
        assert_eq!(reg.len(), 2);
    }

    #[test]
    fn the_oldest_overall_makes_room_when_the_table_is_full() {
        let reg = Arc::new(Handshakes::default());
        let a = reg.admit(ip("10.0.0.1"), 2, 10);
        let b = reg.admit(ip("10.0.0.2"), 2, 10);
        let c = reg.admit(ip("10.0.0.3"), 2, 10);
        assert!(a.evicted.is_cancelled());
        assert!(!b.evicted.is_cancelled() && !c.evicted.is_cancelled());
        assert_eq!(reg.len(), 2);
        drop(a);
        assert_eq!(
            reg.len(),
            2,
            "an evicted handshake's drop frees nothing twice"
        );
    }
}
