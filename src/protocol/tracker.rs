//! What state a server connection is in, seen from the messages that cross it (docs 55.2:
//! message flow): how many ReadyForQuery replies are still owed, whether extended-protocol
//! messages await a Sync, whether COPY is running, and the last transaction status.
//!
//! A connection may go back to the pool only when [`ConnTracker::is_idle`] holds; otherwise
//! it must first be recovered (cancel, drain, roll back) or closed.

use super::{TxStatus, tag};

/// The protocol state of one server connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnTracker {
    /// Query/Sync/FunctionCall messages sent whose ReadyForQuery has not arrived.
    pending: u32,
    /// Extended-protocol messages sent since the last Sync.
    unsynced: bool,
    status: TxStatus,
    copy_in: bool,
    copy_out: bool,
}

impl Default for ConnTracker {
    fn default() -> Self {
        ConnTracker {
            pending: 0,
            unsynced: false,
            status: TxStatus::Idle,
            copy_in: false,
            copy_out: false,
        }
    }
}

impl ConnTracker {
    /// Records a message the client sent to the server (at its first byte).
    #[inline]
    pub fn client_message(&mut self, t: u8) {
        match t {
            tag::QUERY | tag::FUNCTION_CALL => self.pending += 1,
            tag::SYNC => {
                self.pending += 1;
                self.unsynced = false;
            }
            tag::PARSE | tag::BIND | tag::EXECUTE | tag::DESCRIBE | tag::CLOSE => {
                self.unsynced = true;
            }
            tag::COPY_DONE | tag::COPY_FAIL => self.copy_in = false,
            tag::FLUSH | tag::COPY_DATA | tag::TERMINATE => {}
            // A message type the proxy does not know: the server decides what follows (for
            // an invalid one, a FATAL error), so the connection is not idle until a Sync.
            _ => self.unsynced = true,
        }
    }

    /// Records a message the server sent; `status` is the ReadyForQuery status when `t` is
    /// ReadyForQuery.
    #[inline]
    pub fn server_message(&mut self, t: u8, status: Option<TxStatus>) {
        match t {
            tag::READY_FOR_QUERY => {
                self.pending = self.pending.saturating_sub(1);
                if let Some(s) = status {
                    self.status = s;
                }
                self.copy_in = false;
                self.copy_out = false;
            }
            tag::COPY_IN_RESPONSE => self.copy_in = true,
            tag::COPY_OUT_RESPONSE => self.copy_out = true,
            tag::COPY_BOTH_RESPONSE => {
                self.copy_in = true;
                self.copy_out = true;
            }
            tag::COPY_DONE => self.copy_out = false,
            _ => {}
        }
    }

    /// Nothing in flight, no transaction open: safe to hand to someone else after a reset.
    pub fn is_idle(&self) -> bool {
        self.pending == 0
            && !self.unsynced
            && !self.copy_in
            && !self.copy_out
            && self.status == TxStatus::Idle
    }

    /// ReadyForQuery replies still owed.
    pub fn pending(&self) -> u32 {
        self.pending
    }

    /// Extended-protocol messages await a Sync.
    pub fn unsynced(&self) -> bool {
        self.unsynced
    }

    /// The server waits for COPY data from the client.
    pub fn copy_in(&self) -> bool {
        self.copy_in
    }

    /// The last transaction status reported.
    pub fn status(&self) -> TxStatus {
        self.status
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn simple_query_round_trip() {
        let mut t = ConnTracker::default();
        t.client_message(b'Q');
        assert!(!t.is_idle());
        t.server_message(b'T', None);
        t.server_message(b'D', None);
        t.server_message(b'C', None);
        t.server_message(b'Z', Some(TxStatus::Idle));
        assert!(t.is_idle());
    }

    #[test]
    fn open_transaction_is_not_idle() {
        let mut t = ConnTracker::default();
        t.client_message(b'Q');
        t.server_message(b'Z', Some(TxStatus::InTransaction));
        assert!(!t.is_idle());
        assert_eq!(t.pending(), 0);
    }

    #[test]
    fn extended_protocol_needs_sync() {
        let mut t = ConnTracker::default();
        for m in *b"PBDE" {
            t.client_message(m);
        }
        t.client_message(b'H');
        assert!(t.unsynced());
        t.client_message(b'S');
        assert!(!t.unsynced());
        assert_eq!(t.pending(), 1);
        t.server_message(b'Z', Some(TxStatus::Idle));
        assert!(t.is_idle());
    }

    #[test]
    fn copy_in_ends_with_copy_done_or_ready() {
        let mut t = ConnTracker::default();
        t.client_message(b'Q');
        t.server_message(b'G', None);
        assert!(t.copy_in());
        t.client_message(b'd');
        t.client_message(b'c');
        assert!(!t.copy_in());
        t.server_message(b'C', None);
        t.server_message(b'Z', Some(TxStatus::Idle));
        assert!(t.is_idle());

        t.client_message(b'Q');
        t.server_message(b'G', None);
        t.server_message(b'E', None);
        t.server_message(b'Z', Some(TxStatus::Idle));
        assert!(t.is_idle());
    }

    #[test]
    fn unknown_messages_keep_the_connection_busy() {
        let mut t = ConnTracker::default();
        t.client_message(b'?');
        assert!(!t.is_idle());
    }

    #[test]
    fn pipelined_queries_count_every_reply() {
        let mut t = ConnTracker::default();
        t.client_message(b'Q');
        t.client_message(b'Q');
        t.server_message(b'Z', Some(TxStatus::Idle));
        assert!(!t.is_idle());
        t.server_message(b'Z', Some(TxStatus::Idle));
        assert!(t.is_idle());
    }
}
