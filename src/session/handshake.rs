//! The opening of a client connection (docs 55.2.1 and 55.2.10): SSLRequest → TLS or 'N',
//! GSSENCRequest → 'N', PostgreSQL 17 direct TLS (ALPN `postgresql`), then a StartupMessage
//! or a CancelRequest. TLS failures and garbage before startup get no answer.

use bytes::{BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::config::ClientTlsMode;
use crate::error::{ClientError, ErrorKind, Reportable, sqlstate};
use crate::net::stream::{ClientStream, MaybeTls};
use crate::net::tls::ClientTls;
use crate::protocol::startup::{
    InitialPacket, MAX_STARTUP_PACKET, StartupError, StartupMessage, parse_initial,
};

/// How a connection opened.
pub enum Opening {
    /// A session starts.
    Startup {
        stream: ClientStream,
        startup: StartupMessage,
    },
    /// A CancelRequest (the connection carries nothing else).
    Cancel {
        pid: i32,
        secret: Vec<u8>,
        /// Forwarded by a peer instance: handled here or not at all.
        forwarded: bool,
    },
}

/// Why the opening failed.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Startup(#[from] StartupError),
    #[error("TLS handshake: {0}")]
    Tls(std::io::Error),
    #[error("direct TLS without ALPN \"postgresql\"")]
    DirectTlsAlpn,
    #[error("the client did not use TLS, which this listener requires")]
    TlsRequired,
    #[error("repeated {0} request")]
    Repeated(&'static str),
}

impl Reportable for HandshakeError {
    fn kind(&self) -> ErrorKind {
        match self {
            HandshakeError::Io(_) => ErrorKind::ClientDisconnect,
            HandshakeError::TlsRequired => ErrorKind::Auth,
            _ => ErrorKind::Protocol,
        }
    }

    fn client_error(&self) -> Option<ClientError> {
        match self {
            HandshakeError::Startup(StartupError::UnsupportedVersion(..)) => Some(
                ClientError::fatal(sqlstate::FEATURE_NOT_SUPPORTED, self.to_string()),
            ),
            HandshakeError::Startup(e) => Some(ClientError::fatal(
                sqlstate::PROTOCOL_VIOLATION,
                e.to_string(),
            )),
            HandshakeError::TlsRequired => Some(
                ClientError::fatal(
                    sqlstate::INVALID_AUTHORIZATION,
                    "connections to pgtenant must use TLS",
                )
                .with_hint("connect with sslmode=require"),
            ),
            _ => None,
        }
    }
}

/// Tells the client why its opening was refused (when it should hear it) and returns the
/// error.
async fn refuse<S: AsyncWrite + Unpin>(stream: &mut S, error: HandshakeError) -> HandshakeError {
    if let Some(notice) = error.client_error() {
        let mut out = BytesMut::new();
        notice.encode(&mut out);
        let _ = stream.write_all(&out).await;
        let _ = stream.flush().await;
    }
    error
}

/// Reads one opening packet without reading past it (the TLS handshake may follow).
async fn read_packet<S: AsyncRead + Unpin>(
    stream: &mut S,
) -> Result<(InitialPacket, Bytes), HandshakeError> {
    let mut head = [0u8; 4];
    stream.read_exact(&mut head).await?;
    let len = u32::from_be_bytes(head) as usize;
    if !(8..=MAX_STARTUP_PACKET).contains(&len) {
        return Err(StartupError::BadLength(len).into());
    }
    let mut packet = BytesMut::with_capacity(len);
    packet.put_slice(&head);
    packet.resize(len, 0);
    stream.read_exact(&mut packet[4..]).await?;
    let packet = packet.freeze();
    match parse_initial(&packet)? {
        Some((decoded, _)) => Ok((decoded, packet)),
        None => Err(StartupError::BadLength(len).into()),
    }
}

async fn write_byte<S: AsyncWrite + Unpin>(stream: &mut S, b: u8) -> std::io::Result<()> {
    stream.write_all(&[b]).await?;
    stream.flush().await
}

/// Runs the opening of `tcp` up to the StartupMessage or CancelRequest.
pub async fn negotiate(
    tcp: TcpStream,
    tls: Option<&ClientTls>,
    mode: ClientTlsMode,
) -> Result<Opening, HandshakeError> {
    let tls = tls.filter(|_| mode != ClientTlsMode::Disable);
    let mut stream: ClientStream = MaybeTls::Plain(tcp);
    let mut gss_seen = false;
    let mut ssl_seen = false;

    if let (Some(tls), MaybeTls::Plain(tcp)) = (tls, &stream) {
        let mut first = [0u8; 1];
        // 0x16 is a TLS handshake record: PostgreSQL 17 "direct" TLS without SSLRequest.
        if tcp.peek(&mut first).await? == 1 && first[0] == 0x16 {
            let MaybeTls::Plain(tcp) = stream else {
                return Err(HandshakeError::DirectTlsAlpn);
            };
            let accepted = tls
                .acceptor
                .accept(tcp)
                .await
                .map_err(HandshakeError::Tls)?;
            if accepted.get_ref().1.alpn_protocol() != Some(b"postgresql") {
                return Err(HandshakeError::DirectTlsAlpn);
            }
            stream = MaybeTls::Tls(Box::new(accepted));
            ssl_seen = true;
        }
    }

    loop {
        let packet = match read_packet(&mut stream).await {
            Ok((packet, _)) => packet,
            Err(e) => return Err(refuse(&mut stream, e).await),
        };
        match packet {
            InitialPacket::SslRequest => {
                if ssl_seen {
                    return Err(HandshakeError::Repeated("SSL"));
                }
                ssl_seen = true;
                match (tls, stream) {
                    (Some(tls), MaybeTls::Plain(mut tcp)) => {
                        write_byte(&mut tcp, b'S').await?;
                        let accepted = tls
                            .acceptor
                            .accept(tcp)
                            .await
                            .map_err(HandshakeError::Tls)?;
                        stream = MaybeTls::Tls(Box::new(accepted));
                    }
                    (_, mut other) => {
                        write_byte(&mut other, b'N').await?;
                        stream = other;
                    }
                }
            }
            InitialPacket::GssEncRequest => {
                if gss_seen {
                    return Err(HandshakeError::Repeated("GSSENC"));
                }
                gss_seen = true;
                write_byte(&mut stream, b'N').await?;
            }
            InitialPacket::Cancel {
                pid,
                secret,
                forwarded,
            } => {
                return Ok(Opening::Cancel {
                    pid,
                    secret,
                    forwarded,
                });
            }
            InitialPacket::Startup(startup) => {
                if mode == ClientTlsMode::Require && !stream.is_tls() {
                    return Err(refuse(&mut stream, HandshakeError::TlsRequired).await);
                }
                return Ok(Opening::Startup { stream, startup });
            }
        }
    }
}
