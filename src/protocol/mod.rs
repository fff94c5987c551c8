//! The PostgreSQL v3 wire protocol, sans-IO: byte layouts and nothing else.
//!
//! Follows "Frontend/Backend Protocol" (PostgreSQL docs, chapter 55): message formats (55.7)
//! and flow (55.2). Nothing here touches a socket or the configuration; the session and pool
//! code drive these functions over buffers, and the fuzz targets call them directly.

pub mod client_msgs;
pub mod encode;
pub mod frame;
pub mod server_msgs;
pub mod startup;
pub mod tracker;

/// Message type bytes (the first byte of every message after startup), named as in the docs.
pub mod tag {
    // Client → server.
    pub const QUERY: u8 = b'Q';
    pub const PARSE: u8 = b'P';
    pub const BIND: u8 = b'B';
    pub const EXECUTE: u8 = b'E';
    pub const DESCRIBE: u8 = b'D';
    pub const CLOSE: u8 = b'C';
    pub const SYNC: u8 = b'S';
    pub const FLUSH: u8 = b'H';
    pub const TERMINATE: u8 = b'X';
    pub const FUNCTION_CALL: u8 = b'F';
    pub const PASSWORD: u8 = b'p';
    pub const COPY_DATA: u8 = b'd';
    pub const COPY_DONE: u8 = b'c';
    pub const COPY_FAIL: u8 = b'f';

    // Server → client.
    pub const AUTHENTICATION: u8 = b'R';
    pub const BACKEND_KEY_DATA: u8 = b'K';
    pub const PARAMETER_STATUS: u8 = b'S';
    pub const READY_FOR_QUERY: u8 = b'Z';
    pub const ERROR_RESPONSE: u8 = b'E';
    pub const NOTICE_RESPONSE: u8 = b'N';
    pub const NOTIFICATION_RESPONSE: u8 = b'A';
    pub const COMMAND_COMPLETE: u8 = b'C';
    pub const DATA_ROW: u8 = b'D';
    pub const COPY_IN_RESPONSE: u8 = b'G';
    pub const COPY_OUT_RESPONSE: u8 = b'H';
    pub const COPY_BOTH_RESPONSE: u8 = b'W';
    pub const NEGOTIATE_PROTOCOL_VERSION: u8 = b'v';
    pub const PARSE_COMPLETE: u8 = b'1';
    pub const BIND_COMPLETE: u8 = b'2';
    pub const CLOSE_COMPLETE: u8 = b'3';
    pub const EMPTY_QUERY: u8 = b'I';
    pub const PORTAL_SUSPENDED: u8 = b's';
    pub const ROW_DESCRIPTION: u8 = b'T';
    pub const NO_DATA: u8 = b'n';
}

/// Largest message PostgreSQL itself accepts (`PQ_LARGE_MESSAGE_LIMIT`, 1 GiB - 1).
pub const MAX_MESSAGE_LEN: usize = 0x3fff_ffff;

/// Transaction status carried by ReadyForQuery.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TxStatus {
    /// `I`: not in a transaction block.
    Idle,
    /// `T`: in a transaction block.
    InTransaction,
    /// `E`: in a failed transaction block.
    Failed,
}

impl TxStatus {
    /// Decodes the status byte; `None` for anything else.
    pub fn from_byte(b: u8) -> Option<TxStatus> {
        match b {
            b'I' => Some(TxStatus::Idle),
            b'T' => Some(TxStatus::InTransaction),
            b'E' => Some(TxStatus::Failed),
            _ => None,
        }
    }

    /// The byte on the wire.
    pub fn as_byte(self) -> u8 {
        match self {
            TxStatus::Idle => b'I',
            TxStatus::InTransaction => b'T',
            TxStatus::Failed => b'E',
        }
    }
}

/// Reads a NUL-terminated string at the start of `buf`: `(string, rest)`.
pub(crate) fn take_cstr(buf: &[u8]) -> Option<(&[u8], &[u8])> {
    let nul = find_nul(buf)?;
    Some((&buf[..nul], &buf[nul + 1..]))
}

/// How many leading bytes [`find_nul`] looks at itself.
const SHORT_CSTR: usize = 16;

/// The position of the first NUL in `buf`. The names on the wire (statements, portals) are
/// mostly empty or short: a plain look at the first bytes finds their end without memchr's
/// call and set-up (five such names per extended-protocol transaction); longer strings, such
/// as a query's text, go on with memchr.
#[inline]
pub(crate) fn find_nul(buf: &[u8]) -> Option<usize> {
    let head = buf.len().min(SHORT_CSTR);
    match buf[..head].iter().position(|&b| b == 0) {
        Some(i) => Some(i),
        None => memchr::memchr(0, &buf[head..]).map(|i| i + head),
    }
}

/// Reads a big-endian i32 at the start of `buf`.
pub(crate) fn take_i32(buf: &[u8]) -> Option<(i32, &[u8])> {
    let head: [u8; 4] = buf.get(..4)?.try_into().ok()?;
    Some((i32::from_be_bytes(head), &buf[4..]))
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        /// The short look and memchr find the same NUL, wherever it is (or is not).
        #[test]
        fn find_nul_is_the_first_nul(
            bytes in proptest::collection::vec(prop::sample::select(vec![0u8, 1, b'a', 0xff]), 0..64),
        ) {
            prop_assert_eq!(find_nul(&bytes), bytes.iter().position(|&b| b == 0));
            match take_cstr(&bytes) {
                Some((s, rest)) => {
                    prop_assert!(!s.contains(&0));
                    prop_assert_eq!(s.len() + 1 + rest.len(), bytes.len());
                }
                None => prop_assert!(!bytes.contains(&0)),
            }
        }
    }
}
