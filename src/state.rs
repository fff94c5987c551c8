//! The state every session and the admin surfaces share (no globals): the configuration in
//! force, pools, cancel keys, quotas, pauses, metrics and audit, and the operations that
//! change it as a whole (reload, MOVE TENANT, shutdown requests).

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use arc_swap::{ArcSwap, ArcSwapOption};
use tokio_util::sync::CancellationToken;

use crate::cancel::CancelRegistry;
use crate::config::{self, Snapshot};
use crate::net::tls::{ClientTls, client_tls};
use crate::pool::Pools;
use crate::quota::Quotas;
use crate::quota::login::LoginThrottle;

/// State shared by all sessions.
pub struct AppState {
    snapshot: ArcSwap<Snapshot>,
    client_tls: ArcSwapOption<ClientTls>,
    pub pools: Arc<Pools>,
    pub cancels: Arc<CancelRegistry>,
    /// Per-tenant live counters (client connections, query rate, server-connection caps).
    pub quotas: Quotas,
    /// Failed-login slow-down and the per-source un-authenticated cap.
    pub logins: Arc<LoginThrottle>,
    /// Connections that have not authenticated yet.
    pub handshakes: Arc<crate::quota::pending::Handshakes>,
    /// Fires when sessions must end now.
    pub shutdown: CancellationToken,
    /// Fires when shutdown begins: transaction-mode sessions end at their next transaction
    /// boundary (those between transactions at once), admin sessions at once.
    pub draining: CancellationToken,
    /// The audit log (disabled without `[audit]`).
    pub audit: crate::telemetry::audit::Audit,
    /// Per-tenant metric labels and what the last scrape saw.
    pub metrics: crate::telemetry::metrics::Metrics,
    /// Connected clients (admin console).
    pub clients: Arc<crate::registry::Clients>,
    /// Paused tenants (admin console).
    pub pauses: crate::registry::Pauses,
    /// Fires when the admin console asks the process to shut down.
    pub(crate) shutdown_requested: CancellationToken,
    process_secret: [u8; 32],
    session_ids: AtomicU64,
    source_lock: tokio::sync::Mutex<()>,
    moves: tokio::sync::Mutex<()>,
    /// The catalog database (`[catalog] source = "postgres"`).
    pub(crate) catalog: Option<deadpool_postgres::Pool>,
    /// Peer instances registered in the catalog (`[peering]` with the catalog in PostgreSQL).
    pub(crate) catalog_peers: arc_swap::ArcSwap<std::collections::BTreeMap<u8, String>>,
}

/// Why a `MOVE TENANT` changed nothing.
#[derive(Debug, thiserror::Error)]
pub enum MoveError {
    #[error("no such tenant")]
    UnknownTenant,
    #[error("no such shard")]
    UnknownShard,
    #[error(
        "in session mode a session cannot change shards: end the tenant's sessions first (KILL)"
    )]
    SessionMode,
    #[error("{0} transaction(s) of the tenant still running after {timeout}; the tenant was not moved", timeout = config::format_duration(*.1))]
    Busy(usize, Duration),
    #[error("the configuration source cannot take the move: {0}")]
    Source(String),
    #[error("the configuration with the move is invalid: {0}")]
    Invalid(String),
}

/// Replaces `path` with `text` atomically (a temporary file renamed over it).
fn write_replacing(path: &std::path::Path, text: &str) -> std::io::Result<()> {
    let tmp = path.with_extension("pgtenant-move.tmp");
    std::fs::write(&tmp, text)?;
    if let Ok(meta) = std::fs::metadata(path) {
        let _ = std::fs::set_permissions(&tmp, meta.permissions());
    }
    std::fs::rename(&tmp, path).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}

impl AppState {
    /// State for `snapshot`.
    pub fn new(
        snapshot: Snapshot,
        audit: crate::telemetry::audit::Audit,
    ) -> anyhow::Result<Arc<Self>> {
        let tls = client_tls(&snapshot)?;
        let tenant_labels = snapshot.admin.tenant_labels;
        let catalog = match (&snapshot.catalog.source, &snapshot.catalog.dsn) {
            (config::CatalogSource::Postgres, Some(dsn)) => Some(crate::catalog::pool(&dsn.0)?),
            _ => None,
        };
        Ok(Arc::new(AppState {
            catalog,
            catalog_peers: Default::default(),
            pools: Arc::new(Pools::new(snapshot.pool.clone())),
            snapshot: ArcSwap::from_pointee(snapshot),
            client_tls: ArcSwapOption::from(tls.map(Arc::new)),
            cancels: Arc::new(CancelRegistry::default()),
            quotas: Quotas::default(),
            logins: Arc::new(LoginThrottle::default()),
            handshakes: Arc::default(),
            shutdown: CancellationToken::new(),
            draining: CancellationToken::new(),
            metrics: crate::telemetry::metrics::Metrics::new(tenant_labels),
            audit,
            clients: Arc::default(),
            pauses: Default::default(),
            shutdown_requested: CancellationToken::new(),
            process_secret: rand::random(),
            session_ids: AtomicU64::new(1),
            source_lock: tokio::sync::Mutex::new(()),
            moves: tokio::sync::Mutex::new(()),
        }))
    }

    /// The snapshot in force.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.load_full()
    }

    /// The client TLS setup in force.
    pub fn client_tls(&self) -> Option<Arc<ClientTls>> {
        self.client_tls.load_full()
    }

    /// A secret for this process (mock SCRAM salts).
    pub fn process_secret(&self) -> &[u8; 32] {
        &self.process_secret
    }

    /// The listener address of peer instance `id` (`[peering]`: from the configuration, or
    /// registered in the catalog).
    pub fn peer(&self, id: u8) -> Option<String> {
        let snapshot = self.snapshot();
        let configured = snapshot.peering.as_ref().and_then(|p| p.peers.get(&id));
        configured
            .cloned()
            .or_else(|| self.catalog_peers.load().get(&id).cloned())
    }

    /// A new session id for logs.
    pub fn next_session_id(&self) -> u64 {
        self.session_ids.fetch_add(1, Ordering::Relaxed)
    }

    /// Loads the configuration file in force again and applies it (SIGHUP, admin `RELOAD`,
    /// the file watch).
    /// With the catalog in PostgreSQL, its tables are read again too.
    pub async fn reload_from_source(&self) -> anyhow::Result<()> {
        let path = self.snapshot().source.clone();
        let result = {
            let _one_at_a_time = self.source_lock.lock().await;
            crate::catalog::load(&path, self.catalog.as_ref())
                .await
                .map_err(anyhow::Error::from)
                .and_then(|s| self.reload(s))
        };
        crate::telemetry::metrics::reload(result.is_ok());
        match &result {
            Ok(()) => tracing::info!(path = %path.display(), "configuration reloaded"),
            Err(e) => {
                tracing::error!(error = %e, "reload failed; keeping the configuration in force")
            }
        }
        result
    }

    /// `MOVE TENANT <tenant> TO <shard>`: pauses only that tenant, waits up to `timeout` for
    /// its open transactions, writes the new placement into the configuration file (the
    /// catalog source: the file, keeping its comments and layout, or the catalog database),
    /// switches the snapshot in force and
    /// resumes. Its sessions take their next transaction's server connection on the new
    /// shard. On any failure nothing changes and the tenant resumes. Returns how long the
    /// tenant's transactions were held.
    pub async fn move_tenant(
        &self,
        tenant: &str,
        shard: &str,
        timeout: Duration,
    ) -> Result<Duration, MoveError> {
        let _one_move = self.moves.lock().await;
        let current = self.snapshot();
        let Some(t) = current.tenant_by_name(tenant) else {
            return Err(MoveError::UnknownTenant);
        };
        if !current.shards.contains_key(shard) {
            return Err(MoveError::UnknownShard);
        }
        if t.placement.shard == shard {
            return Ok(Duration::ZERO);
        }
        if current.pool.mode == config::PoolMode::Session
            && self.quotas.tenant(tenant).clients() > 0
        {
            return Err(MoveError::SessionMode);
        }
        // Checked before the tenant is paused, so that a move that cannot be made holds
        // nothing up.
        self.moved_source(tenant, shard).await?;

        let held_already = self.pauses.is_paused(tenant);
        let started = tokio::time::Instant::now();
        self.pauses.pause(Some(tenant));
        let result = async {
            if let Err(busy) = self.wait_for_transactions(Some(tenant), timeout).await {
                return Err(MoveError::Busy(busy, timeout));
            }
            // A reload never applies a source read before this move wrote it; and the source
            // is read again under the lock, so that a change made while the tenant's
            // transactions finished is kept, not overwritten.
            let _one_at_a_time = self.source_lock.lock().await;
            let (source, edited, next) = self.moved_source(tenant, shard).await?;
            match &self.catalog {
                Some(catalog) => crate::catalog::set_shard(catalog, tenant, shard)
                    .await
                    .map_err(|e| MoveError::Source(e.to_string()))?,
                None => write_replacing(&source, &edited).map_err(|e| {
                    MoveError::Source(format!("cannot write {}: {e}", source.display()))
                })?,
            }
            self.reload(next)
                .map_err(|e| MoveError::Invalid(format!("{e:#}")))
        }
        .await;
        if !held_already {
            self.pauses.resume(Some(tenant));
        }
        let held = started.elapsed();
        match &result {
            Ok(()) => tracing::info!(
                tenant,
                shard,
                held_ms = held.as_millis() as u64,
                "tenant moved"
            ),
            Err(e) => {
                tracing::warn!(tenant, shard, error = %e, "MOVE TENANT failed; nothing changed")
            }
        }
        result.map(|()| held)
    }

    /// The configuration source with `tenant` placed on `shard`: its path, its edited text,
    /// and the snapshot that text validates into.
    async fn moved_source(
        &self,
        tenant: &str,
        shard: &str,
    ) -> Result<(PathBuf, String, Snapshot), MoveError> {
        let source = self.snapshot().source.clone();
        let text = crate::catalog::source_text(&source, self.catalog.as_ref())
            .await
            .map_err(|e| MoveError::Source(e.to_string()))?;
        let edited = config::with_tenant_shard(&text, tenant, shard)
            .map_err(|e| MoveError::Source(format!("{}: {e}", source.display())))?;
        let next =
            config::load_str(&edited, &source).map_err(|e| MoveError::Invalid(e.to_string()))?;
        require_context_keys(&next).map_err(|e| MoveError::Invalid(format!("{e:#}")))?;
        Ok((source, edited, next))
    }

    /// Waits until no transaction of `tenant` (None: of any tenant) runs, for at most
    /// `timeout`; the number still running when it gives up.
    pub async fn wait_for_transactions(
        &self,
        tenant: Option<&str>,
        timeout: Duration,
    ) -> Result<(), usize> {
        let started = tokio::time::Instant::now();
        loop {
            let busy: usize = self
                .quotas
                .all()
                .iter()
                .filter(|(name, _)| tenant.is_none_or(|t| t == name))
                .map(|(_, s)| s.stats.active.load(Ordering::SeqCst))
                .sum();
            if busy == 0 {
                return Ok(());
            }
            if started.elapsed() >= timeout {
                return Err(busy);
            }
            crate::timers::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Asks the process to shut down as on SIGTERM (admin `SHUTDOWN`).
    pub fn request_shutdown(&self) {
        self.shutdown_requested.cancel();
    }

    /// Replaces the snapshot (and TLS certificates) after validation; sessions already
    /// running keep the snapshot they started with. The listen address cannot change.
    pub fn reload(&self, snapshot: Snapshot) -> anyhow::Result<()> {
        let current = self.snapshot();
        if snapshot.listen.addr != current.listen.addr {
            tracing::warn!(
                "listen.addr changes need a restart; keeping {}",
                current.listen.addr
            );
        }
        require_context_keys(&snapshot)?;
        let tls = client_tls(&snapshot)?;
        self.client_tls.store(tls.map(Arc::new));
        self.metrics.set_policy(snapshot.admin.tenant_labels);
        // Tenants no longer in the file: their sessions end at their next transaction.
        let live = self.quotas.all();
        let session_mode = snapshot.pool.mode == config::PoolMode::Session;
        for (name, tenant) in &live {
            let removed = snapshot.tenant_by_name(name).is_none();
            tenant.set_removed(removed);
            if removed && session_mode {
                self.clients.leave(name);
            }
        }
        let moved: Vec<_> = live
            .into_iter()
            .filter(|(name, _)| {
                match (current.tenant_by_name(name), snapshot.tenant_by_name(name)) {
                    (Some(old), Some(new)) => old.placement != new.placement,
                    _ => false,
                }
            })
            .collect();
        self.snapshot.store(Arc::new(snapshot));
        // New shards, or other health-check settings: the health loop looks again now.
        self.pools.wake_checks();
        // After the store: a session that sees the new generation reads the new snapshot.
        for (name, tenant) in moved {
            tracing::info!(tenant = %name, "placement changed: its sessions follow at their next transaction");
            tenant.bump_placement();
            // A session-mode session cannot follow: it ends at its next transaction boundary.
            if session_mode {
                self.clients.leave(&name);
            }
        }
        Ok(())
    }
}

/// A shard whose `context_key_file` does not exist yet cannot bind the verified context its
/// policies read: the proxy refuses the configuration rather than serve tenants no rows.
pub(crate) fn require_context_keys(snapshot: &Snapshot) -> anyhow::Result<()> {
    for shard in snapshot.shards.values() {
        if let (Some(path), None) = (&shard.context_key_file, &shard.context_key) {
            anyhow::bail!(
                "shard {:?}: context_key_file {} does not exist; run `pgtenant shard init --shard {}` first",
                shard.name,
                path.display(),
                shard.name
            );
        }
    }
    Ok(())
}
