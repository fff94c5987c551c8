//! The forwarding logic of a session, sans-IO: move client bytes towards the server and server
//! bytes towards the client, message by message, reading only what the proxy must (DESIGN.md
//! §4): the client's Terminate, the server's ReadyForQuery and ParameterStatus. Everything
//! else passes through as the same bytes, in runs as long as the buffer allows.

use std::collections::BTreeMap;

use bytes::{Buf, BytesMut};

use crate::protocol::frame::{FrameError, FrameScanner, Piece, TagSet};
use crate::protocol::server_msgs;
use crate::protocol::tag;
use crate::protocol::tracker::ConnTracker;

/// Client messages the relay reads whole.
const CLIENT_WHOLE: TagSet = TagSet::of(&[tag::TERMINATE]);

/// What the client side of the relay saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientStep {
    /// Keep going.
    Continue,
    /// The client sent Terminate: the session is over.
    Terminate,
}

/// A server message that is malformed where the proxy must read it.
#[derive(Debug, thiserror::Error)]
pub enum ServerProtocolError {
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error("malformed {0} message")]
    Malformed(&'static str),
}

/// Per-session forwarding state for the client→server direction.
pub struct Relay {
    client_scan: FrameScanner,
}

impl Relay {
    /// `max_message` caps client messages read whole.
    pub fn new(max_message: usize) -> Self {
        Relay {
            client_scan: FrameScanner::new(CLIENT_WHOLE, max_message),
        }
    }

    /// Whether the client stopped between two messages (a half-sent message leaves the
    /// server connection unusable).
    pub fn client_at_boundary(&self) -> bool {
        self.client_scan.at_boundary()
    }

    /// Moves everything forwardable from `input` to `to_server`.
    pub fn client_bytes(
        &mut self,
        input: &mut BytesMut,
        to_server: &mut BytesMut,
        tracker: &mut ConnTracker,
    ) -> Result<ClientStep, FrameError> {
        let mut run = 0;
        let step = loop {
            match self.client_scan.next(&input[run..])? {
                None => break ClientStep::Continue,
                Some(Piece::Pass { tag, len, .. }) => {
                    if let Some(t) = tag {
                        tracker.client_message(t);
                    }
                    run += len;
                }
                Some(Piece::Whole { tag: t, len }) => {
                    if t == tag::TERMINATE {
                        move_run(input, run, to_server);
                        input.advance(len);
                        return Ok(ClientStep::Terminate);
                    }
                    tracker.client_message(t);
                    run += len;
                }
            }
        };
        move_run(input, run, to_server);
        Ok(step)
    }
}

/// Moves everything forwardable from the server's `input` to `to_client`, updating the
/// connection's tracker and parameters.
pub fn server_bytes(
    scanner: &mut FrameScanner,
    input: &mut BytesMut,
    to_client: &mut BytesMut,
    tracker: &mut ConnTracker,
    params: &mut BTreeMap<String, String>,
) -> Result<(), ServerProtocolError> {
    let mut run = 0;
    while let Some(piece) = scanner.next(&input[run..])? {
        match piece {
            Piece::Pass { tag, len, .. } => {
                if let Some(t) = tag {
                    tracker.server_message(t, None);
                }
                run += len;
            }
            Piece::Whole { tag: t, len } => {
                let body = &input[run + 5..run + len];
                match t {
                    tag::READY_FOR_QUERY => {
                        let status = server_msgs::ready_for_query(body)
                            .map_err(|_| ServerProtocolError::Malformed("ReadyForQuery"))?;
                        tracker.server_message(t, Some(status));
                    }
                    tag::PARAMETER_STATUS => {
                        let (k, v) = server_msgs::parameter_status(body)
                            .map_err(|_| ServerProtocolError::Malformed("ParameterStatus"))?;
                        params.insert(k.to_owned(), v.to_owned());
                    }
                    other => tracker.server_message(other, None),
                }
                run += len;
            }
        }
    }
    move_run(input, run, to_client);
    Ok(())
}

/// Moves `input[..run]` to the end of `out`, without copying when `out` is empty and the run
/// is the whole input.
fn move_run(input: &mut BytesMut, run: usize, out: &mut BytesMut) {
    if run == 0 {
        return;
    }
    if out.is_empty() && run == input.len() {
        std::mem::swap(input, out);
    } else {
        out.extend_from_slice(&input[..run]);
        input.advance(run);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pool::server_conn::SERVER_WHOLE;
    use crate::protocol::{TxStatus, encode};

    fn msg(t: u8, body: &[u8]) -> BytesMut {
        let mut b = BytesMut::new();
        encode::raw(t, body, &mut b);
        b
    }

    #[test]
    fn client_bytes_forward_unchanged_until_terminate() {
        let mut relay = Relay::new(1024);
        let mut tracker = ConnTracker::default();
        let mut input = msg(b'Q', b"select 1\0");
        input.extend_from_slice(&msg(b'X', b""));
        input.extend_from_slice(&msg(b'Q', b"never\0"));
        let mut out = BytesMut::new();
        let step = relay
            .client_bytes(&mut input, &mut out, &mut tracker)
            .unwrap();
        assert_eq!(step, ClientStep::Terminate);
        assert_eq!(&out[..], &msg(b'Q', b"select 1\0")[..]);
        assert_eq!(tracker.pending(), 1);
    }

    #[test]
    fn partial_client_messages_stream_and_leave_the_boundary() {
        let mut relay = Relay::new(1024);
        let mut tracker = ConnTracker::default();
        let full = msg(b'd', &[1u8; 100]);
        let mut input = BytesMut::from(&full[..50]);
        let mut out = BytesMut::new();
        relay
            .client_bytes(&mut input, &mut out, &mut tracker)
            .unwrap();
        assert_eq!(out.len(), 50);
        assert!(input.is_empty());
        assert!(!relay.client_at_boundary());
        input.extend_from_slice(&full[50..]);
        relay
            .client_bytes(&mut input, &mut out, &mut tracker)
            .unwrap();
        assert_eq!(&out[..], &full[..]);
        assert!(relay.client_at_boundary());
    }

    #[test]
    fn server_bytes_track_status_and_parameters() {
        let mut scanner = FrameScanner::new(SERVER_WHOLE, 1 << 20);
        let mut tracker = ConnTracker::default();
        tracker.client_message(b'Q');
        let mut params = BTreeMap::new();
        let mut input = msg(b'S', b"TimeZone\0UTC\0");
        input.extend_from_slice(&msg(b'C', b"SET\0"));
        input.extend_from_slice(&msg(b'Z', b"T"));
        let expected = input.clone();
        let mut out = BytesMut::new();
        server_bytes(
            &mut scanner,
            &mut input,
            &mut out,
            &mut tracker,
            &mut params,
        )
        .unwrap();
        assert_eq!(out, expected);
        assert_eq!(params.get("TimeZone").map(String::as_str), Some("UTC"));
        assert_eq!(tracker.status(), TxStatus::InTransaction);
        assert_eq!(tracker.pending(), 0);
    }

    #[test]
    fn malformed_ready_for_query_is_an_error() {
        let mut scanner = FrameScanner::new(SERVER_WHOLE, 1 << 20);
        let mut input = msg(b'Z', b"?");
        let mut out = BytesMut::new();
        assert!(
            server_bytes(
                &mut scanner,
                &mut input,
                &mut out,
                &mut ConnTracker::default(),
                &mut BTreeMap::new()
            )
            .is_err()
        );
    }
}
