//! Query cancellation (docs 55.2.9 and DESIGN.md §5 S4). Each client gets a random,
//! proxy-issued BackendKeyData; a CancelRequest carrying it reaches only the server connection
//! serving that client at that moment. Servers' real keys never leave pgtenant. Failed
//! look-ups are counted per source address and a source that keeps guessing is reported; a
//! valid key is never ignored (tenants share addresses).
//!
//! A cancel is counted on its server connection from the moment it is looked up (under the
//! registry's lock, so it cannot start after the client's key stops pointing there) until the
//! server has closed the cancel connection, that is until PostgreSQL has signalled the
//! backend. A connection with a cancel in flight is not given to anyone else until then
//! ([`CancelTarget::settled`]): a late cancel can reach only the statement it was meant for,
//! or an idle backend, which ignores it.
//!
//! Several instances (`[peering]`): an instance with an id writes it into bits 23–30 of the
//! pids it issues (the other 23 bits and the 32-bit secret stay random), so a CancelRequest
//! that reaches another instance behind the load balancer is forwarded to the one that
//! issued the key, once ([`forward`]), as PgBouncer's peering does.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{BufMut, BytesMut};
use rustls::ClientConfig;
use rustls_pki_types::ServerName;
use subtle::ConstantTimeEq;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::net::stream::{MaybeTls, ServerStream};

/// Where and how to cancel what one server connection is running.
#[derive(Debug)]
pub struct CancelTarget {
    pub host: String,
    pub port: u16,
    pub pid: i32,
    pub secret: Vec<u8>,
    /// Set when the server connection uses TLS: the cancel goes over TLS too.
    pub tls: Option<(Arc<ClientConfig>, ServerName<'static>)>,
    /// Cancels begun and not yet delivered.
    in_flight: AtomicUsize,
    delivered: tokio::sync::Notify,
}

/// A cancel counted on its target until dropped (after it was sent, or given up).
pub struct PendingCancel(Arc<CancelTarget>);

impl PendingCancel {
    /// Sends it; the count drops when this returns.
    pub async fn send(self, timeout: Duration) -> std::io::Result<()> {
        self.0.send(timeout).await
    }
}

impl Drop for PendingCancel {
    fn drop(&mut self) {
        if self.0.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.delivered.notify_waiters();
        }
    }
}

impl CancelTarget {
    pub fn new(
        host: String,
        port: u16,
        tls: Option<(Arc<ClientConfig>, ServerName<'static>)>,
    ) -> Self {
        CancelTarget {
            host,
            port,
            pid: 0,
            secret: Vec::new(),
            tls,
            in_flight: AtomicUsize::new(0),
            delivered: tokio::sync::Notify::new(),
        }
    }

    /// Counts a cancel about to be sent to this connection (see the module docs).
    pub fn begin(self: &Arc<Self>) -> PendingCancel {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        PendingCancel(Arc::clone(self))
    }

    /// No cancel is in flight to this connection now.
    pub fn is_settled(&self) -> bool {
        self.in_flight.load(Ordering::Acquire) == 0
    }

    /// Waits until no cancel is in flight to this connection; false if one still is after
    /// `patience` (the connection must then be closed, not handed to anyone else).
    pub async fn settled(&self, patience: Duration) -> bool {
        // The common case, at every release: nothing in flight, no timer, no wait.
        if self.is_settled() {
            return true;
        }
        let wait = async {
            loop {
                let delivered = self.delivered.notified();
                tokio::pin!(delivered);
                delivered.as_mut().enable();
                if self.in_flight.load(Ordering::Acquire) == 0 {
                    return;
                }
                delivered.await;
            }
        };
        crate::timers::timeout(patience, wait).await.is_ok()
    }

    /// Sends the CancelRequest on a new connection (the server answers nothing and closes).
    async fn send(&self, timeout: Duration) -> std::io::Result<()> {
        let work = async {
            let tcp = TcpStream::connect((self.host.as_str(), self.port)).await?;
            let stream: ServerStream = match &self.tls {
                None => MaybeTls::Plain(tcp),
                Some((config, name)) => crate::net::stream::start_tls(tcp, config, name).await?,
            };
            deliver(stream, CANCEL_REQUEST_CODE, self.pid, &self.secret).await
        };
        within(timeout, work).await
    }
}

const CANCEL_REQUEST_CODE: i32 = 80_877_102;

/// Writes a cancel packet with request `code` and waits for the other side to close, so the
/// cancel has been processed when this returns.
async fn deliver<S>(mut stream: S, code: i32, pid: i32, secret: &[u8]) -> std::io::Result<()>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut packet = BytesMut::new();
    packet.put_u32(12 + secret.len() as u32);
    packet.put_i32(code);
    packet.put_i32(pid);
    packet.put_slice(secret);
    stream.write_all(&packet).await?;
    stream.flush().await?;
    let mut sink = [0u8; 16];
    let _ = stream.read(&mut sink).await;
    Ok(())
}

async fn within(
    timeout: Duration,
    work: impl std::future::Future<Output = std::io::Result<()>>,
) -> std::io::Result<()> {
    crate::timers::timeout(timeout, work)
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "cancel timed out"))?
}

/// Forwards a CancelRequest to the peer instance listening at `addr` (marked forwarded, so
/// the peer never passes it on again).
pub async fn forward(
    addr: &str,
    pid: i32,
    secret: &[u8],
    timeout: Duration,
) -> std::io::Result<()> {
    within(timeout, async {
        let tcp = TcpStream::connect(addr).await?;
        deliver(tcp, crate::protocol::startup::PEER_CANCEL_CODE, pid, secret).await
    })
    .await
}

/// Where a key points now. Each key has its own lock, taken by the session when it moves
/// between server connections and by a lookup to count its cancel: no lock shared by all
/// sessions is touched per transaction.
type Slot = Arc<Mutex<Option<Arc<CancelTarget>>>>;

fn lock_slot(slot: &Slot) -> std::sync::MutexGuard<'_, Option<Arc<CancelTarget>>> {
    // Setting an Option cannot be interrupted half-way: a poisoned lock is still usable.
    slot.lock().unwrap_or_else(|p| p.into_inner())
}

struct Entry {
    secret: [u8; 4],
    target: Slot,
}

/// Failed guesses allowed per source address per window.
const MAX_FAILURES: u32 = 20;
const FAILURE_WINDOW: Duration = Duration::from_secs(60);
const MAX_TRACKED_SOURCES: usize = 10_000;

#[derive(Default)]
struct Inner {
    keys: HashMap<i32, Entry>,
    failures: HashMap<IpAddr, (u32, Instant)>,
}

/// All live proxy-issued cancel keys.
#[derive(Default)]
pub struct CancelRegistry {
    inner: Mutex<Inner>,
    /// This instance's peering id (0: none; pids are then random over all 31 bits).
    instance: AtomicU8,
}

/// The pid bits below the instance id.
const INSTANCE_SHIFT: u32 = 23;

impl CancelRegistry {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding this lock cannot leave the maps inconsistent (each update
        // is one insert or remove), so a poisoned lock is still usable.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sets this instance's peering id (before any key is issued).
    pub fn set_instance(&self, id: u8) {
        self.instance.store(id, Ordering::Relaxed);
    }

    /// This instance's peering id (0: none).
    pub fn instance(&self) -> u8 {
        self.instance.load(Ordering::Relaxed)
    }

    /// The instance that issued `pid`, when it is another one (peering only).
    pub fn issuer_elsewhere(&self, pid: i32) -> Option<u8> {
        let own = self.instance();
        let issuer = (pid as u32 >> INSTANCE_SHIFT) as u8;
        (own != 0 && pid > 0 && issuer != own).then_some(issuer)
    }

    /// Issues a fresh key for a client session.
    pub fn register(self: &Arc<Self>) -> CancelHandle {
        let instance = u32::from(self.instance());
        let mut inner = self.lock();
        loop {
            let random = rand::random::<u32>() >> 1;
            let pid = if instance == 0 {
                random as i32
            } else {
                ((instance << INSTANCE_SHIFT) | (random & ((1 << INSTANCE_SHIFT) - 1))) as i32
            };
            if pid == 0 || inner.keys.contains_key(&pid) {
                continue;
            }
            let secret: [u8; 4] = rand::random();
            let target = Slot::default();
            inner.keys.insert(
                pid,
                Entry {
                    secret,
                    target: Arc::clone(&target),
                },
            );
            return CancelHandle {
                registry: Arc::clone(self),
                pid,
                secret,
                target,
            };
        }
    }

    /// The cancel for a CancelRequest, counted on its target, if the key is live and the
    /// source is not blocked.
    pub fn lookup(&self, source: IpAddr, pid: i32, secret: &[u8]) -> Option<PendingCancel> {
        let mut inner = self.lock();
        let now = Instant::now();
        // A valid key is always honoured, whatever else arrived from its address: many
        // tenants share one. Guessing needs no block to be hopeless (a 31-bit pid and a
        // 32-bit secret, both random); failures are counted to report a guessing source.
        let found = inner
            .keys
            .get(&pid)
            .filter(|e| bool::from(e.secret.as_slice().ct_eq(secret)));
        match found {
            // Counted while the key's lock is held: a key retargeted after this waits for it.
            Some(entry) => lock_slot(&entry.target).as_ref().map(CancelTarget::begin),
            None => {
                if inner.failures.len() >= MAX_TRACKED_SOURCES {
                    inner
                        .failures
                        .retain(|_, (_, since)| now.duration_since(*since) < FAILURE_WINDOW);
                }
                let slot = inner.failures.entry(source).or_insert((0, now));
                if now.duration_since(slot.1) >= FAILURE_WINDOW {
                    *slot = (0, now);
                }
                slot.0 += 1;
                if slot.0 == MAX_FAILURES {
                    tracing::warn!(%source, "many CancelRequests with unknown keys from this address");
                }
                None
            }
        }
    }
}

/// A client's key; dropping it retires the key.
pub struct CancelHandle {
    registry: Arc<CancelRegistry>,
    pid: i32,
    secret: [u8; 4],
    target: Slot,
}

impl CancelHandle {
    /// The key to send in BackendKeyData.
    pub fn key(&self) -> (i32, i32) {
        (self.pid, i32::from_be_bytes(self.secret))
    }

    /// Points the key at the server connection now serving the client (or at none).
    #[inline(always)]
    pub fn set_target(&self, target: Option<Arc<CancelTarget>>) {
        *lock_slot(&self.target) = target;
    }
}

impl Drop for CancelHandle {
    fn drop(&mut self) {
        self.registry.lock().keys.remove(&self.pid);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target() -> Arc<CancelTarget> {
        let mut t = CancelTarget::new("127.0.0.1".into(), 1, None);
        t.pid = 99;
        t.secret = vec![1, 2, 3, 4];
        Arc::new(t)
    }

    #[tokio::test]
    async fn a_connection_is_settled_only_when_its_cancels_are_done() {
        let t = target();
        assert!(t.settled(Duration::from_millis(1)).await);
        let pending = t.begin();
        assert!(!t.settled(Duration::from_millis(20)).await, "one in flight");
        let waiter = {
            let t = Arc::clone(&t);
            tokio::spawn(async move { t.settled(Duration::from_secs(5)).await })
        };
        crate::timers::sleep(Duration::from_millis(10)).await;
        drop(pending);
        assert!(waiter.await.unwrap(), "woken when it is delivered");
    }

    #[test]
    fn keys_reach_only_their_current_target() {
        let reg = Arc::new(CancelRegistry::default());
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        let h = reg.register();
        let (pid, secret) = h.key();
        assert!(
            reg.lookup(ip, pid, &secret.to_be_bytes()).is_none(),
            "no target yet"
        );
        h.set_target(Some(target()));
        assert_eq!(
            reg.lookup(ip, pid, &secret.to_be_bytes()).unwrap().0.pid,
            99
        );
        assert!(reg.lookup(ip, pid, &(secret ^ 1).to_be_bytes()).is_none());
        drop(h);
        assert!(
            reg.lookup(ip, pid, &secret.to_be_bytes()).is_none(),
            "retired"
        );
    }

    #[test]
    fn a_valid_key_is_honoured_after_guesses_from_its_address() {
        let reg = Arc::new(CancelRegistry::default());
        let h = reg.register();
        h.set_target(Some(target()));
        let (pid, secret) = h.key();
        let shared_nat: IpAddr = "10.0.0.1".parse().unwrap();
        for guess in 0..MAX_FAILURES * 2 {
            assert!(
                reg.lookup(
                    shared_nat,
                    pid,
                    &(guess as i32 ^ secret ^ 0x5a5a).to_be_bytes()
                )
                .is_none()
            );
        }
        assert!(
            reg.lookup(shared_nat, pid, &secret.to_be_bytes()).is_some(),
            "another tenant's legitimate cancel from the same address"
        );
        assert_eq!(reg.lock().failures[&shared_nat].0, MAX_FAILURES * 2);
    }
}
