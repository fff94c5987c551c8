//! Wiring and lifecycle: the listener with its un-authenticated cap, configuration reload on
//! SIGHUP, and a shutdown that stops accepting, lets sessions finish for a grace period, then
//! ends the rest with `57P01`. The state sessions share is in [`crate::state`].

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{self, Snapshot};
pub use crate::state::{AppState, MoveError};

/// A running proxy.
pub struct Running {
    /// The address the listener is bound to.
    pub addr: SocketAddr,
    /// The address the admin HTTP endpoint is bound to (`admin.http`).
    pub admin_addr: Option<SocketAddr>,
    pub state: Arc<AppState>,
    stop_accepting: CancellationToken,
    /// Fired by the accept loop once it has dropped the listener.
    listener_closed: CancellationToken,
    sessions: TaskTracker,
    background: TaskTracker,
}

impl Running {
    /// Stops accepting (the listener closes, so a second instance sharing the port with
    /// `reuse_port` gets every new connection), ends sessions between transactions, waits up
    /// to `grace` for open transactions (and session-mode sessions) to end, then ends the
    /// rest with `57P01`.
    pub async fn shutdown(self, grace: Duration) {
        self.stop_accepting.cancel();
        // The listener is closed before any session is ended: a client that sees its idle
        // session end and connects again is refused (or, with `reuse_port`, reaches the
        // other instance), never queued on a listener that will not accept it.
        let _ =
            crate::timers::timeout(Duration::from_secs(5), self.listener_closed.cancelled()).await;
        self.state.draining.cancel();
        self.sessions.close();
        if crate::timers::timeout(grace, self.sessions.wait())
            .await
            .is_err()
        {
            tracing::info!("ending remaining sessions");
        }
        self.state.shutdown.cancel();
        let _ = crate::timers::timeout(Duration::from_secs(10), self.sessions.wait()).await;
        self.background.close();
        self.background.wait().await;
    }
}

/// Dropped without [`Running::shutdown`] (a test's proxy, an error path): stops at once, as a
/// shutdown does when its grace period is over. The listener closes, the background work stops
/// and the remaining sessions end with `57P01`.
impl Drop for Running {
    fn drop(&mut self) {
        self.stop_accepting.cancel();
        self.state.draining.cancel();
        self.state.shutdown.cancel();
    }
}

/// Binds the listener and starts accepting.
pub async fn start(snapshot: Snapshot) -> anyhow::Result<Running> {
    crate::state::require_context_keys(&snapshot)?;
    let listener = listen(snapshot.listen.addr, snapshot.listen.reuse_port)
        .with_context(|| format!("cannot listen on {}", snapshot.listen.addr))?;
    let addr = listener.local_addr()?;
    let audit = match &snapshot.admin.audit {
        Some(path) => crate::telemetry::audit::Audit::open(path.clone())
            .await
            .with_context(|| format!("cannot open the audit log {}", path.display()))?,
        None => crate::telemetry::audit::Audit::default(),
    };
    let state = AppState::new(snapshot, audit)?;
    let stop_accepting = CancellationToken::new();
    let sessions = TaskTracker::new();
    let background = TaskTracker::new();
    if let Some(peering) = state.snapshot().peering.clone() {
        start_peering(&state, &peering, addr, &background).await?;
    }

    let accept_state = Arc::clone(&state);
    let accept_stop = stop_accepting.clone();
    let accept_sessions = sessions.clone();
    let listener_closed = CancellationToken::new();
    let accept_closed = listener_closed.clone();
    background.spawn(async move {
        let mut backoff = Duration::from_millis(10);
        loop {
            // Un-authenticated connections are bounded by dropping the oldest pending
            // handshake when a cap is reached (quota::pending), so accepting never waits.
            let accepted = tokio::select! {
                a = listener.accept() => a,
                _ = accept_stop.cancelled() => break,
            };
            match accepted {
                Ok((tcp, peer)) => {
                    backoff = Duration::from_millis(10);
                    accept_sessions.spawn(crate::session::serve(
                        Arc::clone(&accept_state),
                        tcp,
                        peer,
                    ));
                }
                Err(e) => {
                    // Typically EMFILE: wait for sessions to close descriptors.
                    tracing::warn!(error = %e, "accept failed");
                    crate::timers::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
            }
        }
        drop(listener);
        accept_closed.cancel();
    });

    let mut admin_addr = None;
    if let Some(http) = state.snapshot().admin.http {
        let listener = TcpListener::bind(http)
            .await
            .with_context(|| format!("cannot listen on admin.http {http}"))?;
        admin_addr = Some(listener.local_addr()?);
        tracing::info!(addr = %listener.local_addr()?, "admin http listening (/metrics, /healthz, /readyz)");
        crate::telemetry::metrics::recorder();
        background.spawn(crate::admin::http::serve(
            listener,
            Arc::clone(&state),
            stop_accepting.clone(),
        ));
    }

    if let (config::CatalogSource::Postgres, Some(dsn)) = (
        state.snapshot().catalog.source,
        &state.snapshot().catalog.dsn,
    ) {
        // A catalog change reloads the state from its source (a failure is logged there, and
        // the snapshot in force keeps serving).
        let reloaded = Arc::clone(&state);
        let reload = move || {
            let state = Arc::clone(&reloaded);
            async move {
                let _ = state.reload_from_source().await;
            }
        };
        let watch = crate::catalog::watch(dsn.0.clone(), reload, stop_accepting.clone());
        background.spawn(async move {
            let _ = watch.await;
        });
    }

    let probe_state = Arc::clone(&state);
    background.spawn(crate::pool::health::check_shards(
        move || probe_state.snapshot(),
        Arc::clone(&state.pools),
        stop_accepting.clone(),
    ));

    let reap_state = Arc::clone(&state);
    let reap_stop = stop_accepting.clone();
    background.spawn(async move {
        let mut tick = crate::timers::interval(Duration::from_secs(10));
        loop {
            tokio::select! {
                _ = tick.tick() => reap_state.pools.reap(),
                _ = reap_stop.cancelled() => break,
            }
        }
    });

    tracing::info!(%addr, "pgtenant listening");
    Ok(Running {
        addr,
        admin_addr,
        state,
        stop_accepting,
        listener_closed,
        sessions,
        background,
    })
}

/// `[peering]`: this instance's id goes into every cancel key it issues (configured, or
/// claimed in the catalog); with the catalog in PostgreSQL the instance registers its
/// listener there and learns its peers' every few seconds, until pgtenant stops.
async fn start_peering(
    state: &Arc<AppState>,
    peering: &config::Peering,
    bound: SocketAddr,
    background: &TaskTracker,
) -> anyhow::Result<()> {
    let advertise = peering.advertise.clone().unwrap_or_else(|| {
        if bound.ip().is_unspecified() {
            tracing::warn!(%bound, "peering: the listener has no address peers can reach; set [peering] advertise");
        }
        bound.to_string()
    });
    let id = match (peering.id, &state.catalog) {
        (Some(id), _) => id,
        (None, Some(catalog)) => crate::catalog::claim_instance(catalog, &advertise)
            .await
            .context("peering: cannot claim an instance id in the catalog")?,
        (None, None) => anyhow::bail!("peering: no instance id"),
    };
    state.cancels.set_instance(id);
    tracing::info!(id, %advertise, "peering: cancel keys carry this instance's id");
    let Some(catalog) = state.catalog.clone() else {
        return Ok(());
    };
    let state = Arc::clone(state);
    background.spawn(async move {
        loop {
            match crate::catalog::heartbeat(&catalog, id, &advertise).await {
                Ok(peers) => state.catalog_peers.store(Arc::new(peers)),
                Err(e) => tracing::warn!(error = %e, "peering: cannot refresh this instance in the catalog"),
            }
            tokio::select! {
                _ = crate::timers::sleep(crate::catalog::HEARTBEAT) => {}
                _ = state.shutdown.cancelled() => break,
            }
        }
        // Sessions are gone: the id is free for another instance.
        if let Err(e) = crate::catalog::release_instance(&catalog, id).await {
            tracing::warn!(error = %e, "peering: cannot release this instance's id");
        }
    });
    Ok(())
}

/// The client listener. With `reuse_port`, SO_REUSEPORT lets another instance listen on the
/// same address: the kernel spreads new connections over both, and when one closes its
/// listener the other gets them all (a rolling restart).
fn listen(addr: SocketAddr, reuse_port: bool) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    if reuse_port {
        socket.set_reuseport(true)?;
    }
    socket.bind(addr)?;
    socket.listen(1024)
}

/// Runs the proxy from a configuration file until SIGINT/SIGTERM; SIGHUP reloads it.
pub async fn run(config_path: PathBuf) -> anyhow::Result<()> {
    let snapshot = crate::catalog::load(&config_path, None).await?;
    let running = start(snapshot).await?;
    let stop_watch = CancellationToken::new();
    if let Err(e) = crate::admin::watch::start(
        config_path.clone(),
        Arc::clone(&running.state),
        stop_watch.clone(),
    ) {
        tracing::warn!(error = %e, "cannot watch the configuration file; SIGHUP and RELOAD still reload it");
    }
    let _stop_watch = stop_watch.drop_guard();
    wait_for_signals(&running, Some(&config_path)).await?;
    // The grace of the configuration in force (a reload may have changed it).
    let grace = running.state.snapshot().listen.shutdown_grace;
    tracing::info!(grace = %config::format_duration(grace), "shutting down");
    running.shutdown(grace).await;
    Ok(())
}

/// Waits for SIGINT or SIGTERM; on SIGHUP reloads `config_path` (if given).
pub async fn wait_for_signals(
    running: &Running,
    config_path: Option<&PathBuf>,
) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    loop {
        tokio::select! {
            _ = running.state.shutdown_requested.cancelled() => return Ok(()),
            _ = term.recv() => return Ok(()),
            _ = int.recv() => return Ok(()),
            _ = hup.recv() => {
                running.state.audit.reopen();
                if config_path.is_some() {
                    let _ = running.state.reload_from_source().await;
                }
            }
        }
    }
}
