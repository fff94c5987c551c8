//! Authentication of clients (DESIGN.md §1.5): tenant identity from the startup packet and
//! TLS (`identity`), then a SCRAM-SHA-256 exchange (`scram`) against the stored verifier
//! (`verifier`), driven here over the client stream (docs 55.3.1 for the message flow).
//!
//! Unknown tenants, unknown users and wrong passwords all run the full exchange and end with
//! the same `28P01` message.

pub mod identity;
pub mod scram;
pub use crate::domain::verifier;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::error::{ClientError, ErrorKind, Reportable, sqlstate};
use crate::protocol::{client_msgs, encode, tag};
use scram::{ScramError, ScramServer};
use verifier::ScramVerifier;

/// Largest SASL message a client may send.
const MAX_AUTH_MESSAGE: usize = 8 * 1024;

/// Why authentication failed.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("password authentication failed for user \"{0}\"")]
    Failed(String),
    #[error("{0}")]
    Protocol(String),
    #[error("client disconnected during authentication")]
    Disconnected,
}

impl Reportable for AuthError {
    fn kind(&self) -> ErrorKind {
        match self {
            AuthError::Failed(_) => ErrorKind::Auth,
            AuthError::Protocol(_) => ErrorKind::Protocol,
            AuthError::Disconnected => ErrorKind::ClientDisconnect,
        }
    }

    fn client_error(&self) -> Option<ClientError> {
        match self {
            AuthError::Failed(_) => Some(ClientError::fatal(
                sqlstate::INVALID_PASSWORD,
                self.to_string(),
            )),
            AuthError::Protocol(_) => Some(ClientError::fatal(
                sqlstate::PROTOCOL_VIOLATION,
                self.to_string(),
            )),
            AuthError::Disconnected => None,
        }
    }
}

/// Reads one tagged client message of at most `max` bytes.
pub async fn read_message<S: AsyncRead + Unpin>(
    stream: &mut S,
    max: usize,
) -> Result<Option<(u8, Bytes)>, std::io::Error> {
    let mut head = [0u8; 5];
    match stream.read_exact(&mut head).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
    if len < 4 || len > max {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("invalid message length {len}"),
        ));
    }
    let mut body = BytesMut::zeroed(len - 4);
    stream.read_exact(&mut body).await?;
    Ok(Some((head[0], body.freeze())))
}

async fn send<S: AsyncWrite + Unpin>(stream: &mut S, out: &BytesMut) -> Result<(), AuthError> {
    stream
        .write_all(out)
        .await
        .map_err(|_| AuthError::Disconnected)?;
    stream.flush().await.map_err(|_| AuthError::Disconnected)
}

async fn read_sasl<S: AsyncRead + Unpin>(stream: &mut S) -> Result<Bytes, AuthError> {
    match read_message(stream, MAX_AUTH_MESSAGE).await {
        Ok(Some((tag::PASSWORD, body))) => Ok(body),
        Ok(Some((other, _))) => Err(AuthError::Protocol(format!(
            "expected SASL response, got message type {:?}",
            other as char
        ))),
        Ok(None) => Err(AuthError::Disconnected),
        Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
            Err(AuthError::Protocol(e.to_string()))
        }
        Err(_) => Err(AuthError::Disconnected),
    }
}

/// Runs SCRAM against `verifier` (a mock when `real` is false) and, on success, sends
/// AuthenticationOk. `channel_binding` is the served certificate's hash on TLS connections.
pub async fn authenticate<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    user: &str,
    verifier: ScramVerifier,
    real: bool,
    channel_binding: Option<Vec<u8>>,
) -> Result<(), AuthError> {
    let mut server = ScramServer::new(verifier, real, channel_binding);
    let mut out = BytesMut::new();
    encode::auth_sasl(server.mechanisms(), &mut out);
    send(stream, &out).await?;

    let body = read_sasl(stream).await?;
    let initial = client_msgs::sasl_initial_response(&body)
        .map_err(|e| AuthError::Protocol(e.to_string()))?;
    let scram_error = |e: ScramError| match e {
        ScramError::Failed => AuthError::Failed(user.to_owned()),
        other => AuthError::Protocol(other.to_string()),
    };
    let server_first = server
        .client_first(initial.mechanism, initial.data)
        .map_err(scram_error)?;
    out.clear();
    encode::auth_sasl_continue(server_first.as_bytes(), &mut out);
    send(stream, &out).await?;

    let body = read_sasl(stream).await?;
    let server_final = server.client_final(&body).map_err(scram_error)?;
    out.clear();
    encode::auth_sasl_final(server_final.as_bytes(), &mut out);
    encode::auth_ok(&mut out);
    send(stream, &out).await
}
