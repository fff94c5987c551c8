//! One client connection, start to end (DESIGN.md §1): handshake → identity → SCRAM → route →
//! server connection with the tenant context bound → forwarding → the server connection's
//! safe return to its pool.
//!
//! Until authentication finishes, a connection is counted as a pending handshake (in total and
//! per source address; when a cap is reached the oldest pending one is dropped) and must
//! finish within `listen.startup_timeout`. Failing logins wait longer and longer; correct
//! ones never do. This file covers that phase; `run.rs` covers the rest.

pub mod handshake;
pub mod pump;
pub mod relay;
mod run;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::auth::identity::{self, Claims, Disagreement};
use crate::auth::verifier::ScramVerifier;
use crate::auth::{self, AuthError};
use crate::config::{ClientTlsMode, Snapshot, Tenant, TenantUser};
use crate::error::{ClientError, ErrorKind, Reportable, sqlstate};
use crate::net::stream::ClientStream;
use crate::pool::{PoolError, ServerError};
use crate::protocol::encode;
use crate::protocol::startup::StartupMessage;
use crate::state::AppState;
use crate::tenant::params::ClientSettings;
use crate::tenant::route::RouteError;
use handshake::{HandshakeError, Opening};

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
    #[error("{}", .0.message)]
    Quota(ClientError),
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
            SessionError::Quota(_) => ErrorKind::Quota,
            SessionError::Pool(e) => e.kind(),
            SessionError::Server(e) => e.kind(),
            SessionError::ClientIo(_) => ErrorKind::ClientDisconnect,
        }
    }

    fn client_error(&self) -> Option<ClientError> {
        match self {
            SessionError::Handshake(e) => e.client_error(),
            SessionError::Auth(e) => e.client_error(),
            SessionError::Identity(d) => Some(
                ClientError::fatal(sqlstate::INVALID_AUTHORIZATION, format!("the {d}")).with_hint(
                    "name one tenant: in the TLS server name, the user name (user@tenant) or the database",
                ),
            ),
            SessionError::Route(e) => e.client_error(),
            SessionError::Refused(e) | SessionError::Quota(e) => Some(e.clone()),
            SessionError::Pool(e) => e.client_error(),
            // What the server said about the client's own settings (e.g. a bad TimeZone).
            SessionError::Server(ServerError::Server(fields)) => Some(
                ClientError::fatal_from_server(&fields.code, &fields.message),
            ),
            SessionError::Server(e) => e.client_error(),
            SessionError::ClientIo(_) => None,
        }
    }
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

/// Records a refused login in the audit log: the user name as sent and why (never the
/// password).
fn audit_failure(
    state: &AppState,
    who: &crate::telemetry::audit::Who,
    user: &str,
    e: &SessionError,
) {
    use crate::telemetry::audit::str_value;
    let who = crate::telemetry::audit::Who {
        user: Some(user.to_owned()),
        ..who.clone()
    };
    let mut fields = vec![("kind", str_value(e.kind().as_str()))];
    if let Some(c) = e.client_error() {
        fields.push(("sqlstate", str_value(&c.sqlstate)));
    }
    state.audit.event("auth_fail", &who, &fields);
}

/// A connection that passed authentication.
enum Opened {
    /// A tenant's client.
    Tenant(Authenticated),
    /// An admin user of the console, by name.
    Admin(ClientStream, String),
}

/// A client that passed authentication.
struct Authenticated {
    stream: ClientStream,
    peer: SocketAddr,
    tenant: Arc<Tenant>,
    user: String,
    startup: StartupMessage,
    settings: ClientSettings,
}

impl Authenticated {
    fn account(&self) -> Option<&TenantUser> {
        self.tenant.users.get(&self.user)
    }
}

/// Serves one accepted TCP connection to its end. Called as it is accepted: the connection is
/// counted among the pending handshakes then, before its task first runs, so that "oldest"
/// means first accepted however the runtime's threads order the tasks.
pub fn serve(
    state: Arc<AppState>,
    tcp: TcpStream,
    peer: SocketAddr,
) -> impl std::future::Future<Output = ()> + Send + 'static {
    let id = state.next_session_id();
    let span = tracing::info_span!("session", id, %peer, tenant = tracing::field::Empty);
    let snapshot = state.snapshot();
    // Counted until authenticated; dropped first when a cap is reached and it is the oldest
    // pending handshake (of its address, or overall).
    let pending = state.handshakes.admit(
        peer.ip(),
        snapshot.listen.max_unauthenticated,
        snapshot.listen.max_unauthenticated_per_source,
    );
    let tenant_field = span.clone();
    let session = async move {
        let deadline = tokio::time::Instant::now() + snapshot.listen.startup_timeout;
        let who = crate::telemetry::audit::Who {
            session: id,
            peer: Some(peer),
            ..Default::default()
        };
        state.audit.event("connect", &who, &[]);
        // The handshake and the admin console are boxed: inline, their state would size every
        // session's future, which an idle client holds for as long as it stays connected.
        let opened = tokio::select! {
            opened = Box::pin(open(&state, &snapshot, tcp, peer, deadline, &who)) => opened,
            _ = pending.evicted.cancelled() => {
                tracing::info!("handshake dropped: the oldest pending while the un-authenticated table was full");
                return;
            }
        };
        drop(pending);
        match opened {
            None => {}
            Some(Opened::Tenant(client)) => {
                tenant_field.record("tenant", client.tenant.name.as_str());
                tracing::info!(tenant = %client.tenant.name, user = %client.user, "authenticated");
                let who = crate::telemetry::audit::Who {
                    tenant: Some(client.tenant.name.clone()),
                    user: Some(client.user.clone()),
                    ..who
                };
                state.audit.event("auth_ok", &who, &[]);
                run::run_session(&state, &snapshot, client, who).await;
            }
            Some(Opened::Admin(stream, user)) => {
                let who = crate::telemetry::audit::Who {
                    user: Some(user.clone()),
                    ..who
                };
                state
                    .audit
                    .event("auth_ok", &who, &[("console", "true".to_owned())]);
                Box::pin(crate::admin::console::serve(&state, stream, &who)).await;
                state.audit.event("disconnect", &who, &[]);
            }
        }
    };
    crate::telemetry::session_span::in_session(span, session)
}

/// Handshake and authentication. Errors are reported to the client here.
/// The whole of it must finish by `deadline` (`listen.startup_timeout`): a client that has
/// sent its startup packet is told so with an ErrorResponse; one that never got that far is
/// closed (as PostgreSQL does with an incomplete startup packet).
async fn open(
    state: &AppState,
    snapshot: &Snapshot,
    tcp: TcpStream,
    peer: SocketAddr,
    deadline: tokio::time::Instant,
    who: &crate::telemetry::audit::Who,
) -> Option<Opened> {
    let _ = tcp.set_nodelay(true);
    let tls = state.client_tls();
    let mode = snapshot
        .listen
        .tls
        .as_ref()
        .map(|t| t.mode)
        .unwrap_or(ClientTlsMode::Disable);
    let negotiated =
        crate::timers::timeout_at(deadline, handshake::negotiate(tcp, tls.as_deref(), mode)).await;
    let Ok(negotiated) = negotiated else {
        tracing::info!("startup timed out before the startup packet");
        return None;
    };
    let (mut stream, startup) = match negotiated {
        Ok(Opening::Startup { stream, startup }) => (stream, startup),
        Ok(Opening::Cancel {
            pid,
            secret,
            forwarded,
        }) => {
            // Issued by another instance: passed on to it, once.
            if let Some(issuer) = state.cancels.issuer_elsewhere(pid) {
                match state.peer(issuer) {
                    Some(addr) if !forwarded => {
                        if let Err(e) =
                            crate::cancel::forward(&addr, pid, &secret, Duration::from_secs(5))
                                .await
                        {
                            tracing::info!(peer = issuer, %addr, error = %e, "forwarding a cancel request to a peer failed");
                        }
                    }
                    _ => tracing::info!(
                        peer = issuer,
                        forwarded,
                        "cancel request for another instance, which is not a known peer"
                    ),
                }
                return None;
            }
            if let Some(cancel) = state.cancels.lookup(peer.ip(), pid, &secret)
                && let Err(e) = cancel.send(Duration::from_secs(5)).await
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
    if startup.get("database") == Some(crate::admin::console::DATABASE) {
        let user = startup.get("user").unwrap_or_default().to_owned();
        let admitted = crate::timers::timeout_at(
            deadline,
            authenticate_admin(state, snapshot, &mut stream, &user, peer),
        )
        .await;
        return match admitted {
            Ok(Ok(())) => Some(Opened::Admin(stream, user)),
            Ok(Err(e)) => {
                audit_failure(state, who, &user, &e);
                tracing::info!(kind = e.kind().as_str(), error = %e, "admin console login refused");
                report(&mut stream, &e).await;
                None
            }
            Err(_) => {
                crate::telemetry::metrics::auth_failure("timeout");
                None
            }
        };
    }
    let authenticated = crate::timers::timeout_at(
        deadline,
        authenticate(state, snapshot, &mut stream, &startup, peer),
    )
    .await;
    let Ok(authenticated) = authenticated else {
        crate::telemetry::metrics::auth_failure("timeout");
        tracing::info!("startup timed out during authentication");
        let e = SessionError::Refused(
            ClientError::fatal(
                sqlstate::PROTOCOL_VIOLATION,
                format!(
                    "authentication did not finish within {}",
                    crate::config::format_duration(snapshot.listen.startup_timeout)
                ),
            )
            .with_hint("answer the authentication request promptly"),
        );
        report(&mut stream, &e).await;
        return None;
    };
    match authenticated {
        Ok((tenant, user, settings)) => Some(Opened::Tenant(Authenticated {
            stream,
            peer,
            tenant,
            user,
            startup,
            settings,
        })),
        Err(e) => {
            audit_failure(state, who, startup.get("user").unwrap_or_default(), &e);
            tracing::info!(kind = e.kind().as_str(), error = %e, "connection refused");
            report(&mut stream, &e).await;
            None
        }
    }
}

/// The account's verifier, or a mock one (same exchange, never succeeds) for `login_key`
/// when there is no such account; true when real.
fn verifier_or_mock(
    state: &AppState,
    account: Option<&ScramVerifier>,
    login_key: &str,
) -> (ScramVerifier, bool) {
    match account {
        Some(v) => (v.clone(), true),
        None => (
            ScramVerifier::mock(state.process_secret(), login_key),
            false,
        ),
    }
}

/// The served certificate's hash for SCRAM channel binding, on TLS connections.
fn channel_binding(state: &AppState, stream: &ClientStream, sni: Option<&str>) -> Option<Vec<u8>> {
    state
        .client_tls()
        .filter(|_| stream.is_tls())
        .map(|tls| tls.resolver.channel_binding(sni))
}

/// SCRAM for an `[admin]` user of the console. Anyone else (tenants' users included) goes
/// through a mock exchange and fails as a wrong password does, slowed down the same way.
async fn authenticate_admin(
    state: &AppState,
    snapshot: &Snapshot,
    stream: &mut ClientStream,
    user: &str,
    peer: SocketAddr,
) -> Result<(), SessionError> {
    let login_key = format!("admin/{user}");
    let account = snapshot.admin.users.iter().find(|(name, _)| name == user);
    let (verifier, real) = verifier_or_mock(state, account.map(|(_, v)| v), &login_key);
    let channel_binding = channel_binding(state, stream, stream.sni());
    match auth::authenticate(stream, user, verifier, real, channel_binding).await {
        Ok(()) if real => {
            state.logins.succeeded(peer.ip(), &login_key);
            Ok(())
        }
        Ok(()) | Err(AuthError::Failed(_)) => {
            crate::telemetry::metrics::auth_failure(if real { "password" } else { "unknown_user" });
            state.logins.hold_failure(peer.ip(), &login_key).await;
            Err(AuthError::Failed(user.to_owned()).into())
        }
        Err(e) => Err(e.into()),
    }
}

async fn authenticate(
    state: &AppState,
    snapshot: &Snapshot,
    stream: &mut ClientStream,
    startup: &StartupMessage,
    peer: SocketAddr,
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
    )
    .inspect_err(|_| crate::telemetry::metrics::auth_failure("identity"))?;
    let account = identity
        .tenant
        .as_ref()
        .and_then(|t| t.users.get(&identity.user).map(|u| (Arc::clone(t), u)));
    let login_key = format!("{}/{}", identity.tenant_key, identity.user);
    let (verifier, real) = verifier_or_mock(
        state,
        account.as_ref().map(|(_, u)| &u.verifier),
        &login_key,
    );
    let channel_binding = channel_binding(state, stream, sni.as_deref());
    match auth::authenticate(stream, &identity.user, verifier, real, channel_binding).await {
        Ok(()) => state.logins.succeeded(peer.ip(), &login_key),
        Err(AuthError::Failed(_)) => {
            crate::telemetry::metrics::auth_failure(if real { "password" } else { "unknown_user" });
            // Only failures wait (a correct password is never slowed), and the answer names
            // the user exactly as sent, for known and unknown tenants alike.
            state.logins.hold_failure(peer.ip(), &login_key).await;
            return Err(AuthError::Failed(user.to_owned()).into());
        }
        Err(e) => {
            if matches!(e, AuthError::Protocol(_)) {
                crate::telemetry::metrics::auth_failure("protocol");
            }
            return Err(e.into());
        }
    }
    let Some((tenant, _)) = account else {
        // Unreachable: a mock verifier never authenticates.
        return Err(AuthError::Failed(user.to_owned()).into());
    };
    Ok((tenant, identity.user, settings))
}
