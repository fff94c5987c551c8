//! Server-connection pools (DESIGN.md §1.8 and §5 S2): one pool per shard and login role.
//!
//! A pool holds idle connections and a fair (FIFO) semaphore whose permits cap the shard's
//! connections in use; a permit buys either an idle connection or a new one, so idle plus busy
//! never exceeds `max_connections`. Checkout prefers a connection already bound to the same
//! tenant with the client's session state, then one bound to the tenant, and among those the
//! one released last (as PgBouncer's default does): under partial load the same few server
//! processes stay busy and warm instead of each waking in turn. A connection comes back only
//! through [`Pool::checkin`], which recovers it if its client left mid-request and resets it
//! (`DISCARD ALL`) before anyone else may use it; any failure on that path closes it instead.

pub mod cache;
pub mod connect;
pub mod health;
pub mod notify;
mod pools;
pub mod server_conn;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustls::ClientConfig;
use rustls_pki_types::ServerName;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::config::{Isolation, PoolSettings, Shard, Tenant, UserRole};
use crate::error::{ClientError, ErrorKind, Reportable, sqlstate};
use crate::net::tls;
use crate::tenant::TenantId;
use connect::Login;
pub use pools::Pools;
pub use server_conn::{ServerConn, ServerError};

/// How long pgtenant's own recovery and reset statements may take.
pub(crate) const RESET_PATIENCE: Duration = Duration::from_secs(5);
/// How long a cancel sent to a server connection may take to arrive; a connection whose
/// cancel is still in flight after this is closed rather than given to anyone else.
pub(crate) const CANCEL_PATIENCE: Duration = Duration::from_secs(5);
/// How long a closed connection's backend may take to exit while its permits stay taken.
/// Past it the permits are released with a warning (the backend is stuck beyond cancel).
pub(crate) const RETIRE_PATIENCE: Duration = Duration::from_secs(60);

/// A checkout failure.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("timed out after {0:?} waiting for a server connection")]
    Timeout(Duration),
    #[error("timed out after {1:?} waiting for one of the tenant's {0} server connections")]
    TenantBusy(usize, Duration),
    #[error(transparent)]
    Server(#[from] ServerError),
    #[error("TLS setup for the shard failed: {0}")]
    Tls(String),
    #[error("shard {0:?} is marked down")]
    ShardDown(String),
}

impl Reportable for PoolError {
    fn kind(&self) -> ErrorKind {
        match self {
            PoolError::Timeout(_) | PoolError::TenantBusy(..) => ErrorKind::Quota,
            PoolError::Server(e) => e.kind(),
            PoolError::Tls(_) | PoolError::ShardDown(_) => ErrorKind::ServerUnavailable,
        }
    }

    fn client_error(&self) -> Option<ClientError> {
        match self {
            PoolError::Timeout(d) => Some(
                ClientError::fatal(
                    sqlstate::TOO_MANY_CONNECTIONS,
                    format!(
                        "no server connection became free within {}",
                        crate::config::format_duration(*d)
                    ),
                )
                .with_hint("all of this database's server connections are busy; retry later"),
            ),
            PoolError::TenantBusy(n, d) => Some(
                ClientError::fatal(
                    sqlstate::TOO_MANY_CONNECTIONS,
                    format!(
                        "all {n} server connections this tenant may use stayed busy for {}",
                        crate::config::format_duration(*d)
                    ),
                )
                .with_hint("this tenant's plan caps its server connections; retry later"),
            ),
            PoolError::Server(e) => e.client_error(),
            PoolError::Tls(_) => Some(ClientError::fatal(
                sqlstate::UNABLE_TO_CONNECT,
                "could not connect to the tenant's database",
            )),
            PoolError::ShardDown(_) => Some(
                ClientError::fatal(
                    sqlstate::UNABLE_TO_CONNECT,
                    "the tenant's database is unavailable",
                )
                .with_hint("pgtenant checks it continually and serves it again as soon as it answers; retry shortly"),
            ),
        }
    }
}

/// The login a tenant's sessions use on its shard.
pub fn login_for(shard: &Shard, tenant: &Tenant, role: UserRole) -> Login {
    let readonly = role == UserRole::Readonly;
    let (user, password) = match &tenant.isolation {
        Isolation::Context => match &shard.readonly {
            Some((user, password)) if readonly => (user, password),
            _ => (&shard.user, &shard.password),
        },
        Isolation::Role {
            readonly: Some((user, password)),
            ..
        } if readonly => (user, password),
        Isolation::Role { user, password, .. } => (user, password),
    };
    Login {
        user: user.clone(),
        password: password.clone(),
    }
}

/// One shard + login role.
pub struct Pool {
    shard: Arc<Shard>,
    health: Arc<health::Health>,
    login: Login,
    tls: Option<(Arc<ClientConfig>, ServerName<'static>)>,
    permits: Arc<Semaphore>,
    // Boxed so that checkout and release move a pointer, not the whole connection state.
    #[allow(clippy::vec_box)]
    idle: Mutex<Vec<Box<ServerConn>>>,
    settings: PoolSettings,
    /// Transaction pooling: the shard's listening connection, started on first use.
    hub: std::sync::OnceLock<notify::NotifyHub>,
    /// Server backend pid → the virtual pid of the client that used it last, so that a
    /// notification shows the notifying client's pid (the one its BackendKeyData gave it).
    owners: notify::Owners,
    /// Checkouts waiting for a permit now.
    waiters: std::sync::atomic::AtomicUsize,
    /// The shard is a replica (read from its name once: asked twice per transaction).
    replica: bool,
}

/// Counts a checkout waiting for a permit while it lives.
struct Waiting<'a>(&'a std::sync::atomic::AtomicUsize);

impl<'a> Waiting<'a> {
    fn on(count: &'a std::sync::atomic::AtomicUsize) -> Self {
        count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Waiting(count)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// A checked-out connection; its permits return with it.
pub struct PooledConn {
    /// Boxed: it moves in and out of the idle list on every transaction.
    pub conn: Box<ServerConn>,
    _permit: OwnedSemaphorePermit,
    _tenant_permit: Option<OwnedSemaphorePermit>,
}

impl Pool {
    pub(super) fn new(
        shard: Arc<Shard>,
        health: Arc<health::Health>,
        login: Login,
        settings: PoolSettings,
    ) -> Result<Self, PoolError> {
        let tls = match tls::server_tls(&shard).map_err(|e| PoolError::Tls(e.to_string()))? {
            None => None,
            Some(config) => Some((
                config,
                tls::server_name(&shard.host).map_err(|e| PoolError::Tls(e.to_string()))?,
            )),
        };
        Ok(Pool {
            permits: Arc::new(Semaphore::new(shard.max_connections)),
            replica: shard.is_replica(),
            shard,
            health,
            login,
            tls,
            idle: Mutex::new(Vec::new()),
            settings,
            hub: std::sync::OnceLock::new(),
            owners: Arc::default(),
            waiters: Default::default(),
        })
    }

    #[allow(clippy::vec_box)]
    #[inline(always)]
    fn idle(&self) -> std::sync::MutexGuard<'_, Vec<Box<ServerConn>>> {
        // Pushing or popping a Vec cannot be interrupted half-way; a poisoned lock is fine.
        self.idle.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes a connection for `tenant`: an idle one (preferring one bound to the tenant) or a
    /// new one, waiting at most `checkout_timeout` for the tenant's own cap (`tenant_cap`:
    /// its size and semaphore), then for the shard's. `now` is the caller's clock reading (read
    /// again only after a wait).
    pub async fn checkout(
        &self,
        tenant: TenantId,
        state: &Arc<str>,
        tenant_cap: Option<(usize, Arc<Semaphore>)>,
        now: Instant,
    ) -> Result<PooledConn, PoolError> {
        // A shard marked down fails at once; the prober brings it back.
        if self.health.is_down() {
            return Err(PoolError::ShardDown(self.shard.name.clone()));
        }
        let timeout = self.settings.checkout_timeout;
        // Read only when the transaction waits for its tenant's permit (the fast path reads
        // no clock).
        let mut waited_since = None;
        let tenant_permit = match tenant_cap {
            None => None,
            // A free permit is taken at once; only a wait needs the timer.
            Some((n, sem)) => Some(match Arc::clone(&sem).try_acquire_owned() {
                Ok(p) => p,
                Err(_) => {
                    waited_since = Some(tokio::time::Instant::now());
                    let _waiting = Waiting::on(&self.waiters);
                    crate::timers::timeout(timeout, sem.acquire_owned())
                        .await
                        .map_err(|_| PoolError::TenantBusy(n, timeout))?
                        .map_err(|_| PoolError::TenantBusy(n, timeout))?
                }
            }),
        };
        let permit = match Arc::clone(&self.permits).try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                // What is left of the checkout timeout after any wait for the tenant's permit
                // (one clock reading when there was none).
                let timeout = match waited_since {
                    Some(since) => timeout.saturating_sub(since.elapsed()),
                    None => {
                        waited_since = Some(tokio::time::Instant::now());
                        timeout
                    }
                };
                let _waiting = Waiting::on(&self.waiters);
                crate::timers::timeout(timeout, Arc::clone(&self.permits).acquire_owned())
                    .await
                    .map_err(|_| PoolError::Timeout(self.settings.checkout_timeout))?
                    .map_err(|_| PoolError::Timeout(self.settings.checkout_timeout))?
            }
        };
        let now = if waited_since.is_some() {
            Instant::now()
        } else {
            now
        };
        if let Some(conn) = self.take_idle(tenant, state, now) {
            return Ok(PooledConn {
                conn,
                _permit: permit,
                _tenant_permit: tenant_permit,
            });
        }
        let generation = self.health.generation();
        // Boxed: opening a connection (TLS, authentication) is the slow path, and its state
        // inline would make every session's future larger while it waits between
        // transactions.
        let mut conn = Box::pin(connect::open(
            &self.shard,
            &self.login,
            self.tls.as_ref(),
            self.settings.connect_timeout,
        ))
        .await
        .inspect_err(|e| {
            if health::means_down(e) {
                self.health.mark_down(&self.shard.name, &e.to_string());
            }
        })?;
        conn.generation = generation;
        tracing::debug!(shard = %self.shard.name, user = %self.login.user, "opened server connection");
        Ok(PooledConn {
            conn: Box::new(conn),
            _permit: permit,
            _tenant_permit: tenant_permit,
        })
    }

    /// [`Pool::checkout`] when it can answer at once: both permits free and an idle
    /// connection to take. `None` when it would wait, open a connection or fail (the caller
    /// then takes the awaited path, which does and says so); nothing is taken then.
    pub fn checkout_now(
        &self,
        tenant: TenantId,
        state: &Arc<str>,
        tenant_cap: Option<&(usize, Arc<Semaphore>)>,
        now: Instant,
    ) -> Option<PooledConn> {
        if self.health.is_down() {
            return None;
        }
        let tenant_permit = match tenant_cap {
            None => None,
            Some((_, sem)) => Some(Arc::clone(sem).try_acquire_owned().ok()?),
        };
        let permit = Arc::clone(&self.permits).try_acquire_owned().ok()?;
        let conn = self.take_idle(tenant, state, now)?;
        Some(PooledConn {
            conn,
            _permit: permit,
            _tenant_permit: tenant_permit,
        })
    }

    /// An idle connection that is still good at `now`, preferring one bound to `tenant` with
    /// the session state `state` (the client's [`cache::settings_key`]: nothing to replay),
    /// then one bound to `tenant`, and the one released last among them; stale ones met on
    /// the way are closed.
    fn take_idle(
        &self,
        tenant: TenantId,
        state: &Arc<str>,
        now: Instant,
    ) -> Option<Box<ServerConn>> {
        let same_state = |k: &Option<Arc<str>>| {
            k.as_ref()
                .is_some_and(|k| Arc::ptr_eq(k, state) || **k == **state)
        };
        loop {
            let mut conn = {
                let mut idle = self.idle();
                let pos = idle
                    .iter()
                    .rposition(|c| c.bound == Some(tenant) && same_state(&c.pooled.settings_of))
                    .or_else(|| idle.iter().rposition(|c| c.bound == Some(tenant)))
                    .or_else(|| idle.len().checked_sub(1))?;
                idle.remove(pos)
            };
            // Stale: opened before the shard last went down, idle too long, or closed by the
            // server (a readiness check, no system call while nothing arrived).
            if conn.generation == self.health.generation()
                && now.saturating_duration_since(conn.idle_since)
                    < self.settings.server_idle_timeout
                && !conn.looks_closed()
            {
                return Some(conn);
            }
            tracing::debug!(shard = %self.shard.name, "dropping stale server connection");
        }
    }

    /// A replica's pool that may take a read-only transaction now.
    pub fn serves_reads(&self) -> bool {
        self.health.serves_reads(self.shard.max_replica_lag)
    }

    /// Whether this pool's connections go to a replica.
    pub fn is_replica(&self) -> bool {
        self.replica
    }

    /// What the pool holds now.
    pub fn stats(&self) -> PoolStats {
        PoolStats {
            shard: self.shard.name.clone(),
            user: self.login.user.clone(),
            idle: self.idle_count(),
            in_use: self.in_use(),
            max: self.shard.max_connections,
            waiters: self.waiters.load(std::sync::atomic::Ordering::Relaxed),
        }
    }

    /// Transaction pooling: returns a connection between transactions as it is (bound to its
    /// tenant, statements prepared), or through [`Pool::checkin`] if it is not idle.
    /// Like [`Pool::checkin`], it first waits for any cancel still on its way to the
    /// connection (the caller has stopped new ones: see `cancel`), so that no late cancel
    /// reaches the next client's statement.
    ///
    /// `ended` is when the transaction ended (the connection is idle since then): the caller
    /// read the clock already.
    pub async fn release(&self, pooled: PooledConn, ended: Instant) {
        let Err(mut pooled) = self.release_now(pooled, ended) else {
            return;
        };
        if !pooled.conn.cancel.settled(CANCEL_PATIENCE).await {
            self.retire(pooled, true, "a cancel was still in flight");
            return;
        }
        if pooled.conn.tracker.is_idle() && pooled.conn.scanner.at_boundary() {
            pooled.conn.idle_since = ended;
            self.idle().push(pooled.conn);
        } else {
            // Boxed, as the slow path (see `checkout`).
            Box::pin(self.checkin(pooled, true)).await;
        }
    }

    /// [`Pool::release`] when it needs no wait: no cancel in flight to the connection and
    /// the connection idle at a message boundary. Otherwise the connection comes back, for
    /// [`Pool::release`].
    pub fn release_now(&self, mut pooled: PooledConn, ended: Instant) -> Result<(), PooledConn> {
        if !pooled.conn.cancel.is_settled()
            || !pooled.conn.tracker.is_idle()
            || !pooled.conn.scanner.at_boundary()
        {
            return Err(pooled);
        }
        pooled.conn.idle_since = ended;
        self.idle().push(pooled.conn);
        Ok(())
    }

    /// Returns a connection. `whole_messages` is false when the client stopped in the middle
    /// of a message it was sending: the server cannot be resynchronised and is closed.
    pub async fn checkin(&self, mut pooled: PooledConn, whole_messages: bool) {
        if !pooled.conn.cancel.settled(CANCEL_PATIENCE).await {
            self.retire(pooled, whole_messages, "a cancel was still in flight");
            return;
        }
        if !whole_messages || !pooled.conn.scanner.at_boundary() {
            self.retire(pooled, whole_messages, "it stopped mid-message");
            return;
        }
        // Recovering and resetting talk to the server: boxed, as the slow path (see
        // `checkout`).
        if !pooled.conn.tracker.is_idle()
            && let Err(e) = Box::pin(pooled.conn.recover(RESET_PATIENCE)).await
        {
            tracing::info!(shard = %self.shard.name, error = %e, "server connection could not be recovered");
            self.retire(pooled, true, "it could not be recovered");
            return;
        }
        if let Err(e) = Box::pin(pooled.conn.reset(RESET_PATIENCE)).await {
            tracing::info!(shard = %self.shard.name, error = %e, "server connection failed to reset");
            self.retire(pooled, true, "it failed to reset");
            return;
        }
        pooled.conn.idle_since = Instant::now();
        self.idle().push(pooled.conn);
        // The permit drops here, after the connection is back in the idle list.
    }

    /// Closes a connection that must not be used again, without leaving its backend behind:
    /// what it runs is cancelled, it is told to terminate, and its permits (the shard's and
    /// the tenant's) stay taken until the backend is gone, so a client that walks away from
    /// a long statement cannot make the shard run more backends than its caps allow.
    /// `whole_messages`: what was written to the server ends with a whole message.
    pub fn retire(&self, mut pooled: PooledConn, whole_messages: bool, why: &'static str) {
        let shard = self.shard.name.clone();
        tracing::info!(%shard, why, "closing server connection");
        tokio::spawn(async move {
            if !pooled
                .conn
                .close_and_wait(whole_messages, RETIRE_PATIENCE)
                .await
            {
                tracing::warn!(%shard, pid = pooled.conn.backend_pid(),
                    "a closed server connection's backend did not exit within {RETIRE_PATIENCE:?}; releasing its slot");
            }
            drop(pooled);
        });
    }

    /// Records that the client with virtual pid `client_pid` now uses the backend
    /// `server_pid`.
    pub fn note_owner(&self, server_pid: i32, client_pid: i32) {
        let bound = 2 * self.shard.max_connections + 64;
        self.senders().attach(server_pid, client_pid, bound);
    }

    /// Records the notifications (channel as the server knows it, payload) the client with
    /// virtual pid `client_pid` just committed on backend `server_pid`, so that the hub shows
    /// them with its pid even if the backend has passed to another client by then.
    pub fn note_notifications(
        &self,
        server_pid: i32,
        client_pid: i32,
        notes: Vec<(String, String)>,
    ) {
        if !notes.is_empty() {
            self.senders().committed(server_pid, client_pid, notes);
        }
    }

    fn senders(&self) -> std::sync::MutexGuard<'_, notify::Senders> {
        self.owners.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The notification hub for this shard and login (transaction pooling).
    pub fn hub(&self) -> &notify::NotifyHub {
        self.hub.get_or_init(|| {
            notify::NotifyHub::start(
                Arc::clone(&self.shard),
                self.login.clone(),
                self.tls.clone(),
                self.settings.connect_timeout,
                Arc::clone(&self.owners),
            )
        })
    }

    /// The hub, if a client ever listened.
    pub fn hub_if_started(&self) -> Option<&notify::NotifyHub> {
        self.hub.get()
    }

    /// Closes idle connections past `server_idle_timeout`.
    pub fn reap(&self) {
        let limit = self.settings.server_idle_timeout;
        self.idle().retain(|c| c.idle_since.elapsed() < limit);
    }

    /// Connections in use.
    pub fn in_use(&self) -> usize {
        self.shard
            .max_connections
            .saturating_sub(self.permits.available_permits())
    }

    /// Idle connections.
    pub fn idle_count(&self) -> usize {
        self.idle().len()
    }
}

/// A pool's connections at one moment.
#[derive(Debug, Clone)]
pub struct PoolStats {
    pub shard: String,
    pub user: String,
    pub idle: usize,
    /// Checked out (running a transaction, pinned, or held by a session-mode client).
    pub in_use: usize,
    pub max: usize,
    /// Transactions waiting for a connection.
    pub waiters: usize,
}
