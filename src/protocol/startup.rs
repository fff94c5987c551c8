//! The untagged packets that open a connection (docs 55.2.1 and 55.7): SSLRequest,
//! GSSENCRequest, CancelRequest and StartupMessage.
//!
//! Lengths are checked against `MAX_STARTUP_PACKET` (PostgreSQL's `MAX_STARTUP_PACKET_LENGTH`)
//! before anything is allocated; names and values must be UTF-8 and NUL-terminated, with the
//! list closed by an empty name, exactly as `ProcessStartupPacket` requires.

use thiserror::Error;

use super::take_cstr;

/// PostgreSQL's `MAX_STARTUP_PACKET_LENGTH`.
pub const MAX_STARTUP_PACKET: usize = 10_000;
/// Protocol 3.0, the version pgtenant speaks.
pub const PROTOCOL_3_0: i32 = 196_608;
const SSL_REQUEST_CODE: i32 = 80_877_103;
const GSSENC_REQUEST_CODE: i32 = 80_877_104;
const CANCEL_REQUEST_CODE: i32 = 80_877_102;
/// A CancelRequest one pgtenant instance forwards to the peer that issued its key (code
/// 1234.5775, next to PostgreSQL's 1234.5678): never forwarded again, so misconfigured peers
/// cannot bounce a cancel between them.
pub const PEER_CANCEL_CODE: i32 = 80_877_199;
/// Protocol 3.2 allows cancel secrets of up to 256 bytes.
const MAX_CANCEL_SECRET: usize = 256;

/// A packet that may open a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InitialPacket {
    SslRequest,
    GssEncRequest,
    Cancel {
        pid: i32,
        secret: Vec<u8>,
        /// Sent by a peer instance ([`PEER_CANCEL_CODE`]).
        forwarded: bool,
    },
    Startup(StartupMessage),
}

/// A decoded StartupMessage.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StartupMessage {
    pub major: u16,
    pub minor: u16,
    /// Parameters in arrival order; a repeated name keeps its last value, as PostgreSQL does.
    pub params: Vec<(String, String)>,
}

impl StartupMessage {
    /// The value of parameter `name`, if sent.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// Protocol options (`_pq_.*`) the client asked for; pgtenant supports none of them.
    pub fn protocol_options(&self) -> Vec<String> {
        self.params
            .iter()
            .filter(|(k, _)| k.starts_with("_pq_."))
            .map(|(k, _)| k.clone())
            .collect()
    }
}

/// Why an opening packet was refused.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum StartupError {
    #[error("invalid startup packet length {0}")]
    BadLength(usize),
    #[error("unsupported frontend protocol {0}.{1}: server supports 3.0")]
    UnsupportedVersion(u16, u16),
    #[error("invalid startup packet layout: {0}")]
    Malformed(&'static str),
    #[error("invalid UTF-8 in startup packet")]
    InvalidUtf8,
}

/// Decodes the packet at the front of `buf`. `Ok(None)` means more bytes are needed; on
/// success the packet and the number of bytes it used are returned.
pub fn parse_initial(buf: &[u8]) -> Result<Option<(InitialPacket, usize)>, StartupError> {
    let Some(head) = buf.get(..4) else {
        return Ok(None);
    };
    let len = u32::from_be_bytes([head[0], head[1], head[2], head[3]]) as usize;
    if !(8..=MAX_STARTUP_PACKET).contains(&len) {
        return Err(StartupError::BadLength(len));
    }
    let Some(packet) = buf.get(..len) else {
        return Ok(None);
    };
    let code = i32::from_be_bytes([packet[4], packet[5], packet[6], packet[7]]);
    let body = &packet[8..];
    let decoded = match code {
        SSL_REQUEST_CODE if len == 8 => InitialPacket::SslRequest,
        GSSENC_REQUEST_CODE if len == 8 => InitialPacket::GssEncRequest,
        SSL_REQUEST_CODE | GSSENC_REQUEST_CODE => return Err(StartupError::BadLength(len)),
        CANCEL_REQUEST_CODE | PEER_CANCEL_CODE => {
            if body.len() < 8 || body.len() > 4 + MAX_CANCEL_SECRET {
                return Err(StartupError::BadLength(len));
            }
            let pid = i32::from_be_bytes([body[0], body[1], body[2], body[3]]);
            InitialPacket::Cancel {
                pid,
                secret: body[4..].to_vec(),
                forwarded: code == PEER_CANCEL_CODE,
            }
        }
        _ => {
            let major = (code >> 16) as u16;
            let minor = (code & 0xffff) as u16;
            if major != 3 {
                return Err(StartupError::UnsupportedVersion(major, minor));
            }
            InitialPacket::Startup(StartupMessage {
                major,
                minor,
                params: parse_params(body)?,
            })
        }
    };
    Ok(Some((decoded, len)))
}

fn parse_params(mut body: &[u8]) -> Result<Vec<(String, String)>, StartupError> {
    let mut params: Vec<(String, String)> = Vec::new();
    loop {
        let (name, rest) = take_cstr(body).ok_or(StartupError::Malformed("missing terminator"))?;
        if name.is_empty() {
            if !rest.is_empty() {
                return Err(StartupError::Malformed("bytes after the parameter list"));
            }
            return Ok(params);
        }
        let (value, rest) = take_cstr(rest).ok_or(StartupError::Malformed("missing value"))?;
        let name = std::str::from_utf8(name).map_err(|_| StartupError::InvalidUtf8)?;
        let value = std::str::from_utf8(value).map_err(|_| StartupError::InvalidUtf8)?;
        params.retain(|(k, _)| k != name);
        params.push((name.to_owned(), value.to_owned()));
        body = rest;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BytesMut;

    fn startup(params: &[(&str, &str)]) -> Vec<u8> {
        let mut buf = BytesMut::new();
        postgres_protocol::message::frontend::startup_message(params.iter().copied(), &mut buf)
            .unwrap();
        buf.to_vec()
    }

    #[test]
    fn decodes_a_startup_message_from_a_real_encoder() {
        let bytes = startup(&[("user", "app@acme"), ("database", "acme")]);
        let (packet, used) = parse_initial(&bytes).unwrap().unwrap();
        assert_eq!(used, bytes.len());
        let InitialPacket::Startup(m) = packet else {
            panic!("not a startup")
        };
        assert_eq!((m.major, m.minor), (3, 0));
        assert_eq!(m.get("user"), Some("app@acme"));
        assert_eq!(m.get("database"), Some("acme"));
    }

    #[test]
    fn waits_for_the_whole_packet() {
        let bytes = startup(&[("user", "u")]);
        assert_eq!(parse_initial(&bytes[..3]).unwrap(), None);
        assert_eq!(parse_initial(&bytes[..bytes.len() - 1]).unwrap(), None);
    }

    #[test]
    fn recognises_ssl_gss_and_cancel() {
        let mut buf = BytesMut::new();
        postgres_protocol::message::frontend::ssl_request(&mut buf);
        assert_eq!(
            parse_initial(&buf).unwrap(),
            Some((InitialPacket::SslRequest, 8))
        );
        let gss = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x30];
        assert_eq!(
            parse_initial(&gss).unwrap(),
            Some((InitialPacket::GssEncRequest, 8))
        );
        let mut buf = BytesMut::new();
        postgres_protocol::message::frontend::cancel_request(42, 7, &mut buf);
        assert_eq!(
            parse_initial(&buf).unwrap(),
            Some((
                InitialPacket::Cancel {
                    pid: 42,
                    secret: 7i32.to_be_bytes().to_vec(),
                    forwarded: false,
                },
                16
            ))
        );
    }

    #[test]
    fn refuses_bad_lengths_before_reading_them() {
        assert!(matches!(
            parse_initial(&[0x7f, 0xff, 0xff, 0xff]),
            Err(StartupError::BadLength(_))
        ));
        assert!(matches!(
            parse_initial(&[0, 0, 0, 4]),
            Err(StartupError::BadLength(4))
        ));
    }

    #[test]
    fn refuses_old_protocols_and_malformed_lists() {
        let mut v2 = vec![0, 0, 0, 9, 0, 2, 0, 0, 0];
        assert!(matches!(
            parse_initial(&v2),
            Err(StartupError::UnsupportedVersion(2, 0))
        ));
        v2[5] = 3;
        v2[8] = b'x';
        assert!(matches!(
            parse_initial(&v2),
            Err(StartupError::Malformed(_))
        ));
        let mut bad_utf8 = startup(&[("user", "u")]);
        let at = bad_utf8.iter().position(|&b| b == b'u').unwrap();
        bad_utf8[at] = 0xff;
        assert_eq!(parse_initial(&bad_utf8), Err(StartupError::InvalidUtf8));
    }

    #[test]
    fn repeated_parameters_keep_the_last_value() {
        let m = parse_params(b"user\0a\0user\0b\0\0").unwrap();
        assert_eq!(m, vec![("user".to_owned(), "b".to_owned())]);
    }
}
