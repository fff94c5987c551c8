//! One client connection, start to end (DESIGN.md §1): handshake → identity → SCRAM → route →
//! server connection with the tenant context bound → forwarding → the server connection's
//! safe return to its pool.
//!
//! The un-authenticated phase runs under `listen.startup_timeout` and holds a permit of the
//! listener's un-authenticated cap; both are released once the client has authenticated.

pub mod handshake;
pub mod pump;
pub mod relay;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;
use tracing::Instrument;

use crate::app::AppState;
use crate::auth::identity::{self, Claims, Disagreement};
use crate::auth::verifier::ScramVerifier;
use crate::auth::{self, AuthError};
use crate::config::{ClientTlsMode, Snapshot, Tenant};
use crate::error::{ClientError, ErrorKind, Reportable, sqlstate};
use crate::net::stream::ClientStream;
use crate::pool::{PoolError, PooledConn, ServerError};
use crate::protocol::startup::StartupMessage;
use crate::protocol::{TxStatus, encode};
use crate::tenant::params::ClientSettings;
use crate::tenant::route::{RouteError, route};
use crate::tenant::{binding_sql, quote_literal};
use handshake::{HandshakeError, Opening};
use pump::{Pump, PumpEnd, ServerSide};
use relay::Relay;

/// Everything that can end a session before or instead of forwarding.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error(transparent)]
    Handshake(#[from] HandshakeError),
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error(transparent)]
    Identity(#[from] Disagreement),
    #[error(transparent)]
    Route(#[from] RouteError),
    #[error("{}", .0.message)]
    Refused(ClientError),
    #[error(transparent)]
    Pool(#[from] PoolError),
    #[error(transparent)]
    Server(#[from] ServerError),
    #[error("client I/O: {0}")]
    ClientIo(#[from] std::io::Error),
}

impl Reportable for SessionError {
    fn kind(&self) -> ErrorKind {
        match self {
            SessionError::Handshake(e) => e.kind(),
            SessionError::Auth(e) => e.kind(),
            SessionError::Identity(_) => ErrorKind::Auth,
            SessionError::Route(e) => e.kind(),
            SessionError::Refused(_) => ErrorKind::Policy,
            SessionError::Pool(e) => e.kind(),
            SessionError::Server(e) => e.kind(),
            SessionError::ClientIo(_) => ErrorKind::ClientDisconnect,
        }
    }

    fn client_error(&self) -> Option<ClientError> {
        match self {
            SessionError::Handshake(e) => e.client_error(),
            SessionError::Auth(e) => e.client_error(),
            SessionError::Identity(d) => Some(ClientError::fatal(
                sqlstate::INVALID_AUTHORIZATION,
                format!("the {d}"),
            ).with_hint("name one tenant: in the TLS server name, the user name (user@tenant) or the database")),
            SessionError::Route(e) => e.client_error(),
            SessionError::Refused(e) => Some(e.clone()),
            SessionError::Pool(e) => e.client_error(),
            SessionError::Server(ServerError::Server(fields)) => Some(ClientError {
                severity: crate::error::Severity::Fatal,
                sqlstate: sqlstate_from(&fields.code),
                message: fields.message.clone(),
                hint: None,
            }),
            SessionError::Server(e) => e.client_error(),
            SessionError::ClientIo(_) => None,
        }
    }
}

/// Maps a server SQLSTATE onto the static codes pgtenant reports (unknown codes keep their
/// class as `XX000`).
fn sqlstate_from(code: &str) -> &'static str {
    const KNOWN: &[&str] = &[
        "22023", "42704", "22P02", "42501", "3D000", "28P01", "53300",
    ];
    KNOWN
        .iter()
        .find(|k| **k == code)
        .copied()
        .unwrap_or(sqlstate::INTERNAL_ERROR)
}

/// Sends `error` (if the client should hear it) and flushes; failures are ignored, since
/// the connection is closing anyway.
async fn report<W: AsyncWrite + Unpin>(stream: &mut W, error: &(dyn Reportable + Sync)) {
    if let Some(client_error) = error.client_error() {
        send_error(stream, &client_error).await;
    }
}

async fn send_error<W: AsyncWrite + Unpin>(stream: &mut W, error: &ClientError) {
    let mut out = BytesMut::new();
    error.encode(&mut out);
    let _ = stream.write_all(&out).await;
    let _ = stream.flush().await;
}

/// A client that passed authentication.
struct Authenticated {
    stream: ClientStream,
    tenant: Arc<Tenant>,
    user: String,
    startup: StartupMessage,
    settings: ClientSettings,
}

/// Serves one accepted TCP connection to its end.
pub async fn serve(
    state: Arc<AppState>,
    tcp: TcpStream,
    peer: SocketAddr,
    unauthenticated: OwnedSemaphorePermit,
) {
    let id = state.next_session_id();
    let span = tracing::info_span!("session", id, %peer);
    async move {
        let snapshot = state.snapshot();
        let deadline = snapshot.listen.startup_timeout;
        let opened = tokio::time::timeout(deadline, open(&state, &snapshot, tcp, peer)).await;
        drop(unauthenticated);
        let client = match opened {
            Ok(Some(client)) => client,
            Ok(None) => return,
            Err(_) => {
                tracing::info!("startup timed out");
                return;
            }
        };
        tracing::info!(tenant = %client.tenant.name, user = %client.user, "authenticated");
        run_session(&state, &snapshot, client).await;
    }
    .instrument(span)
    .await;
}

/// Handshake and authentication. Errors are reported to the client here.
async fn open(
    state: &AppState,
    snapshot: &Snapshot,
    tcp: TcpStream,
    peer: SocketAddr,
) -> Option<Authenticated> {
    let _ = tcp.set_nodelay(true);
    let tls = state.client_tls();
    let mode = snapshot
        .listen
        .tls
        .as_ref()
        .map(|t| t.mode)
        .unwrap_or(ClientTlsMode::Disable);
    let (mut stream, startup) = match handshake::negotiate(tcp, tls.as_deref(), mode).await {
        Ok(Opening::Startup { stream, startup }) => (stream, startup),
        Ok(Opening::Cancel { pid, secret }) => {
            if let Some(target) = state.cancels.lookup(peer.ip(), pid, &secret)
                && let Err(e) = target.send(Duration::from_secs(5)).await
            {
                tracing::info!(error = %e, "forwarding cancel request failed");
            }
            return None;
        }
        Err(e) => {
            tracing::info!(kind = e.kind().as_str(), error = %e, "handshake failed");
            return None;
        }
    };
    match authenticate(state, snapshot, &mut stream, &startup).await {
        Ok((tenant, user, settings)) => Some(Authenticated {
            stream,
            tenant,
            user,
            startup,
            settings,
        }),
        Err(e) => {
            tracing::info!(kind = e.kind().as_str(), error = %e, "connection refused");
            report(&mut stream, &e).await;
            None
        }
    }
}

async fn authenticate(
    state: &AppState,
    snapshot: &Snapshot,
    stream: &mut ClientStream,
    startup: &StartupMessage,
) -> Result<(Arc<Tenant>, String, ClientSettings), SessionError> {
    let unsupported = startup.protocol_options();
    if startup.minor > 0 || !unsupported.is_empty() {
        let mut out = BytesMut::new();
        encode::negotiate_protocol_version(unsupported, &mut out);
        stream.write_all(&out).await?;
    }
    let settings = ClientSettings::from_startup(&startup.params).map_err(SessionError::Refused)?;
    let user = startup.get("user").unwrap_or_default();
    if user.is_empty() {
        return Err(SessionError::Refused(ClientError::fatal(
            sqlstate::INVALID_AUTHORIZATION,
            "no PostgreSQL user name specified in startup packet",
        )));
    }
    let sni = stream.sni().map(str::to_owned);
    let sni_suffix = snapshot
        .listen
        .tls
        .as_ref()
        .and_then(|t| t.sni_suffix.as_deref());
    let identity = identity::resolve(
        snapshot,
        sni_suffix,
        Claims {
            sni: sni.as_deref(),
            user,
            database: startup.get("database"),
        },
    )?;
    let account = identity
        .tenant
        .as_ref()
        .and_then(|t| t.users.get(&identity.user).map(|u| (Arc::clone(t), u)));
    let (verifier, real) = match &account {
        Some((_, u)) => (u.verifier.clone(), true),
        None => (
            ScramVerifier::mock(
                state.process_secret(),
                &format!("{}/{}", identity.tenant_key, identity.user),
            ),
            false,
        ),
    };
    let channel_binding = state
        .client_tls()
        .filter(|_| stream.is_tls())
        .map(|tls| tls.resolver.channel_binding(sni.as_deref()));
    auth::authenticate(stream, &identity.user, verifier, real, channel_binding).await?;
    let Some((tenant, _)) = account else {
        // Unreachable: a mock verifier never authenticates.
        return Err(AuthError::Failed(identity.user).into());
    };
    Ok((tenant, identity.user, settings))
}

/// The SQL that binds the tenant context and the client's startup settings.
fn session_setup_sql(tenant: &Tenant, settings: &ClientSettings) -> String {
    let mut sql = binding_sql(tenant);
    if !settings.0.is_empty() {
        let calls: Vec<String> = settings
            .0
            .iter()
            .map(|(k, v)| {
                format!(
                    "pg_catalog.set_config({}, {}, false)",
                    quote_literal(k),
                    quote_literal(v)
                )
            })
            .collect();
        sql.push_str("; SELECT ");
        sql.push_str(&calls.join(", "));
    }
    sql
}

async fn run_session(state: &AppState, snapshot: &Snapshot, client: Authenticated) {
    let Authenticated {
        mut stream,
        tenant,
        user,
        startup,
        settings,
    } = client;
    let setup = async {
        settings
            .check_placement(tenant.placement.kind)
            .map_err(SessionError::Refused)?;
        let shard = route(snapshot, &tenant, startup.get("database"))?;
        let pool = state.pools.for_tenant(&shard, &tenant)?;
        let mut pooled = pool.checkout(tenant.id).await?;
        match pooled
            .conn
            .run_own(&session_setup_sql(&tenant, &settings))
            .await
        {
            Ok(()) => {
                pooled.conn.bound = Some(tenant.id);
                Ok((pool, pooled))
            }
            Err(e) => {
                pool.checkin(pooled, true).await;
                Err(SessionError::from(e))
            }
        }
    };
    let (pool, mut pooled) = match setup.await {
        Ok(ok) => ok,
        Err(e) => {
            tracing::info!(kind = e.kind().as_str(), error = %e, "session refused");
            report(&mut stream, &e).await;
            return;
        }
    };

    let cancel = state.cancels.register();
    cancel.set_target(Some(pooled.conn.cancel_target()));
    let mut out = BytesMut::new();
    for (name, value) in &pooled.conn.params {
        let value = if name == "session_authorization" {
            &user
        } else {
            value
        };
        encode::parameter_status(name, value, &mut out);
    }
    let (pid, secret) = cancel.key();
    encode::backend_key_data(pid, secret, &mut out);
    encode::ready_for_query(TxStatus::Idle, &mut out);
    if stream.write_all(&out).await.is_err() || stream.flush().await.is_err() {
        drop(cancel);
        pool.checkin(pooled, true).await;
        return;
    }

    let mut relay = Relay::new(snapshot.listen.max_message_size);
    let mut pump = Pump::default();
    let end = forward(state, &mut relay, &mut pump, &mut stream, &mut pooled).await;
    drop(cancel);
    finish(end, &mut stream, &mut pump, &pooled).await;
    let leftover = pump.take_to_server();
    if !leftover.is_empty() && relay.client_at_boundary() {
        // Messages the client sent just before leaving (e.g. a query and Terminate).
        let _ = pooled.conn.send(&leftover).await;
    }
    pool.checkin(pooled, relay.client_at_boundary()).await;
}

/// Forwards until the session ends or pgtenant shuts down.
async fn forward(
    state: &AppState,
    relay: &mut Relay,
    pump: &mut Pump,
    stream: &mut ClientStream,
    pooled: &mut PooledConn,
) -> Option<PumpEnd> {
    let conn = &mut pooled.conn;
    let mut side = ServerSide {
        stream: &mut conn.stream,
        rbuf: &mut conn.rbuf,
        scanner: &mut conn.scanner,
        tracker: &mut conn.tracker,
        params: &mut conn.params,
    };
    tokio::select! {
        end = pump.run(relay, stream, &mut side) => Some(end),
        _ = state.shutdown.cancelled() => None,
    }
}

/// Tells the client how the session ended, when it is still there to hear it.
async fn finish(
    end: Option<PumpEnd>,
    stream: &mut ClientStream,
    pump: &mut Pump,
    pooled: &PooledConn,
) {
    let notice = match &end {
        None => Some(ClientError::fatal(
            sqlstate::ADMIN_SHUTDOWN,
            "terminating connection because pgtenant is shutting down",
        )),
        Some(PumpEnd::ServerGone(_)) | Some(PumpEnd::ServerProtocol(_)) => {
            Some(ClientError::fatal(
                sqlstate::CONNECTION_FAILURE,
                "the connection to the tenant's database was lost",
            ))
        }
        Some(PumpEnd::ClientProtocol(e)) => {
            tracing::info!(error = %e, "client broke the protocol");
            Some(ClientError::fatal(
                sqlstate::PROTOCOL_VIOLATION,
                e.to_string(),
            ))
        }
        Some(PumpEnd::Terminated) | Some(PumpEnd::ClientGone(_)) => None,
    };
    tracing::info!(end = ?end.as_ref().map(end_label), "session ended");
    let Some(notice) = notice else { return };
    let mut out = pump.take_to_client();
    // An error may only follow whole messages.
    if !pooled.conn.scanner.at_boundary() {
        out.clear();
    }
    notice.encode(&mut out);
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        let _ = stream.write_all(&out).await;
        let _ = stream.flush().await;
    })
    .await;
}

fn end_label(end: &PumpEnd) -> &'static str {
    match end {
        PumpEnd::Terminated => "terminate",
        PumpEnd::ClientGone(_) => "client_gone",
        PumpEnd::ClientProtocol(_) => "client_protocol",
        PumpEnd::ServerGone(_) => "server_gone",
        PumpEnd::ServerProtocol(_) => "server_protocol",
    }
}
