//! Opening a server connection (docs 55.2.1 and 55.2.10): TCP, SSLRequest and TLS per the
//! shard's `tls` mode, StartupMessage, then SCRAM-SHA-256 (with channel binding over TLS),
//! md5, cleartext or trust as the server asks, and the ParameterStatus/BackendKeyData that
//! precede the first ReadyForQuery.

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use postgres_protocol::authentication::md5_hash;
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
use postgres_protocol::message::frontend;
use rustls::ClientConfig;
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;

use super::server_conn::{ServerConn, ServerError};
use crate::cancel::CancelTarget;
use crate::config::{Secret, ServerTlsMode, Shard};
use crate::net::stream::MaybeTls;
use crate::net::tls::end_point_hash;
use crate::protocol::server_msgs::{self, AuthRequest};
use crate::protocol::tag;

/// The role pgtenant logs in as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Login {
    pub user: String,
    pub password: Option<Secret>,
}

/// The `application_name` of pgtenant's server connections.
pub const APPLICATION_NAME: &str = "pgtenant";
/// The `application_name` of its health checks' short connections.
pub const HEALTH_CHECK_NAME: &str = "pgtenant health check";

/// Opens and authenticates a connection to `shard` as `login`.
pub async fn open(
    shard: &Shard,
    login: &Login,
    tls: Option<&(Arc<ClientConfig>, ServerName<'static>)>,
    timeout: Duration,
) -> Result<ServerConn, ServerError> {
    open_named(shard, login, tls, timeout, APPLICATION_NAME).await
}

/// Like [`open`], with another `application_name`.
pub async fn open_named(
    shard: &Shard,
    login: &Login,
    tls: Option<&(Arc<ClientConfig>, ServerName<'static>)>,
    timeout: Duration,
    application_name: &str,
) -> Result<ServerConn, ServerError> {
    let conn = crate::timers::timeout(timeout, open_inner(shard, login, tls, application_name))
        .await
        .map_err(|_| ServerError::Timeout)??;
    // The guard reads SQL text as the server does only with standard-conforming strings (the
    // default since PostgreSQL 9.1); clients cannot change it through pgtenant.
    if conn
        .params
        .get("standard_conforming_strings")
        .map(String::as_str)
        != Some("on")
    {
        return Err(ServerError::Protocol(
            "the shard runs with standard_conforming_strings off; pgtenant requires it on".into(),
        ));
    }
    Ok(conn)
}

async fn open_inner(
    shard: &Shard,
    login: &Login,
    tls: Option<&(Arc<ClientConfig>, ServerName<'static>)>,
    application_name: &str,
) -> Result<ServerConn, ServerError> {
    let addr = format!("{}:{}", shard.host, shard.port);
    let tcp = TcpStream::connect((shard.host.as_str(), shard.port))
        .await
        .map_err(|source| ServerError::Connect {
            addr: addr.clone(),
            source,
        })?;
    tcp.set_nodelay(true)?;
    let stream = match tls {
        None => MaybeTls::Plain(tcp),
        Some((config, name)) => {
            let stream = crate::net::stream::start_tls(tcp, config, name)
                .await
                .map_err(|e| ServerError::Tls(e.to_string()))?;
            if !stream.is_tls() && shard.tls != ServerTlsMode::Prefer {
                return Err(ServerError::Tls(format!(
                    "server {addr} does not support TLS, and the shard requires it"
                )));
            }
            stream
        }
    };
    let channel_binding = match &stream {
        MaybeTls::Tls(s) => s
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .map(|c| end_point_hash(c)),
        MaybeTls::Plain(_) => None,
    };
    let used_tls = stream.is_tls();
    let mut conn = ServerConn::new(
        stream,
        Arc::new(CancelTarget::new(
            shard.host.clone(),
            shard.port,
            if used_tls { tls.cloned() } else { None },
        )),
    );

    let mut out = BytesMut::new();
    frontend::startup_message(
        [
            ("user", login.user.as_str()),
            ("database", shard.database.as_str()),
            ("client_encoding", "UTF8"),
            ("application_name", application_name),
        ],
        &mut out,
    )
    .map_err(|e| ServerError::Protocol(e.to_string()))?;
    conn.send(&out).await?;

    authenticate(&mut conn, login, channel_binding).await?;

    let (mut pid, mut secret) = (0, Vec::new());
    loop {
        let (t, body) = conn.read_message().await?;
        match t {
            tag::PARAMETER_STATUS => {
                let (k, v) = server_msgs::parameter_status(&body)
                    .map_err(|e| ServerError::Protocol(e.to_string()))?;
                conn.params.insert(k.to_owned(), v.to_owned());
            }
            tag::BACKEND_KEY_DATA => {
                let (p, s) = server_msgs::backend_key_data(&body)
                    .map_err(|e| ServerError::Protocol(e.to_string()))?;
                pid = p;
                secret = s.to_vec();
            }
            tag::READY_FOR_QUERY => break,
            tag::ERROR_RESPONSE => {
                return Err(ServerError::Server(
                    server_msgs::error_fields(&body).unwrap_or_default(),
                ));
            }
            // NoticeResponse and NegotiateProtocolVersion need no answer.
            _ => {}
        }
    }
    if let Some(target) = Arc::get_mut(&mut conn.cancel) {
        target.pid = pid;
        target.secret = secret;
    }
    conn.startup_done();
    Ok(conn)
}

async fn authenticate(
    conn: &mut ServerConn,
    login: &Login,
    channel_binding: Option<Vec<u8>>,
) -> Result<(), ServerError> {
    let password = || {
        login
            .password
            .as_ref()
            .map(|p| p.0.as_bytes())
            .ok_or_else(|| {
                ServerError::Auth("the server asks for a password; configure one".into())
            })
    };
    let mut scram: Option<ScramSha256> = None;
    loop {
        let (t, body) = conn.read_message().await?;
        if t == tag::ERROR_RESPONSE {
            let fields = server_msgs::error_fields(&body).unwrap_or_default();
            return Err(ServerError::Auth(format!(
                "{} ({})",
                fields.message, fields.code
            )));
        }
        if t != tag::AUTHENTICATION {
            return Err(ServerError::Protocol(format!(
                "expected an authentication request, got {:?}",
                t as char
            )));
        }
        let request =
            server_msgs::auth_request(&body).map_err(|e| ServerError::Protocol(e.to_string()))?;
        let mut out = BytesMut::new();
        match request {
            AuthRequest::Ok => return Ok(()),
            AuthRequest::Cleartext => {
                frontend::password_message(password()?, &mut out)?;
            }
            AuthRequest::Md5 { salt } => {
                let hash = md5_hash(login.user.as_bytes(), password()?, salt);
                frontend::password_message(hash.as_bytes(), &mut out)?;
            }
            AuthRequest::Sasl { mechanisms } => {
                let plus = channel_binding.is_some() && mechanisms.contains(&"SCRAM-SHA-256-PLUS");
                let (mechanism, binding) = match (&channel_binding, plus) {
                    (Some(cb), true) => (
                        "SCRAM-SHA-256-PLUS",
                        ChannelBinding::tls_server_end_point(cb.clone()),
                    ),
                    _ if mechanisms.contains(&"SCRAM-SHA-256") => {
                        ("SCRAM-SHA-256", ChannelBinding::unsupported())
                    }
                    _ => {
                        return Err(ServerError::Auth(format!(
                            "no supported SASL mechanism in {mechanisms:?}"
                        )));
                    }
                };
                let client = ScramSha256::new(password()?, binding);
                frontend::sasl_initial_response(mechanism, client.message(), &mut out)?;
                scram = Some(client);
            }
            AuthRequest::SaslContinue(data) => {
                let client = scram
                    .as_mut()
                    .ok_or_else(|| ServerError::Protocol("SASL continue without start".into()))?;
                client
                    .update(data)
                    .map_err(|e| ServerError::Auth(e.to_string()))?;
                frontend::sasl_response(client.message(), &mut out)?;
            }
            AuthRequest::SaslFinal(data) => {
                let client = scram
                    .as_mut()
                    .ok_or_else(|| ServerError::Protocol("SASL final without start".into()))?;
                // Verifies the server's signature: a server that does not know the
                // password cannot finish the exchange.
                client
                    .finish(data)
                    .map_err(|e| ServerError::Auth(e.to_string()))?;
            }
            AuthRequest::Unsupported(code) => {
                return Err(ServerError::Auth(format!(
                    "authentication method {code} is not supported"
                )));
            }
        }
        if !out.is_empty() {
            conn.send(&out).await?;
        }
    }
}
