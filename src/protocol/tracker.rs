//! What state a server connection is in, seen from the messages that cross it (docs 55.2:
//! message flow): how many ReadyForQuery replies are still owed, whether extended-protocol
//! messages await a Sync, whether COPY is running, and the last transaction status.
//!
//! A connection may go back to the pool only when [`ConnTracker::is_idle`] holds; otherwise
//! it must first be recovered (cancel, drain, roll back) or closed.

use std::collections::VecDeque;

use super::{TxStatus, tag};

/// A reply the server owes for a message the client sent (docs 55.2.3: each extended
/// message is answered once when processed; Query, FunctionCall and Sync end with
/// ReadyForQuery).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Owed {
    /// Parse → ParseComplete, Bind → BindComplete, Close → CloseComplete.
    Complete(u8),
    /// Execute → CommandComplete, EmptyQueryResponse or PortalSuspended.
    Execute,
    /// Describe → RowDescription or NoData (after ParameterDescription for a statement).
    Describe,
    /// Query or FunctionCall → ReadyForQuery; skipped when an earlier extended message of
    /// the same batch failed.
    Ready,
    /// Sync → ReadyForQuery, always.
    Sync,
}

/// The protocol state of one server connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnTracker {
    /// What the server still owes, oldest first.
    owed: VecDeque<Owed>,
    /// ReadyForQuery replies among `owed`.
    pending: u32,
    /// Extended-protocol messages sent since the last Sync (or the Query that ended them).
    unsynced: bool,
    /// An extended message failed and no Sync was sent since: the server discards
    /// everything until one arrives.
    skipping: bool,
    status: TxStatus,
    copy_in: bool,
    copy_out: bool,
}

impl Default for ConnTracker {
    fn default() -> Self {
        ConnTracker {
            owed: VecDeque::new(),
            pending: 0,
            unsynced: false,
            skipping: false,
            status: TxStatus::Idle,
            copy_in: false,
            copy_out: false,
        }
    }
}

impl ConnTracker {
    /// Records a message the client sent to the server (at its first byte).
    #[inline(always)]
    pub fn client_message(&mut self, t: u8) {
        if self.skipping && t != tag::SYNC {
            // Discarded by the server (as the rest of the failed batch): nothing is owed.
            return;
        }
        let owed = match t {
            tag::QUERY | tag::FUNCTION_CALL => Owed::Ready,
            tag::SYNC => {
                self.unsynced = false;
                self.skipping = false;
                Owed::Sync
            }
            tag::PARSE => Owed::Complete(tag::PARSE_COMPLETE),
            tag::BIND => Owed::Complete(tag::BIND_COMPLETE),
            tag::CLOSE => Owed::Complete(tag::CLOSE_COMPLETE),
            tag::EXECUTE => Owed::Execute,
            tag::DESCRIBE => Owed::Describe,
            tag::COPY_DONE | tag::COPY_FAIL => {
                self.copy_in = false;
                return;
            }
            tag::FLUSH | tag::COPY_DATA | tag::TERMINATE => return,
            // A message type the proxy does not know: the server decides what follows (for
            // an invalid one, a FATAL error), so the connection is not idle until a Sync.
            _ => {
                self.unsynced = true;
                return;
            }
        };
        if matches!(owed, Owed::Ready | Owed::Sync) {
            self.pending += 1;
        } else {
            self.unsynced = true;
        }
        self.owed.push_back(owed);
    }

    /// Records a message the server sent; `status` is the ReadyForQuery status when `t` is
    /// ReadyForQuery. Returns how many Query/FunctionCall messages the server will now skip
    /// (an extended message failed before them in the same batch: PostgreSQL discards
    /// everything up to the next Sync, and their ReadyForQuery never comes).
    #[inline(always)]
    pub fn server_message(&mut self, t: u8, status: Option<TxStatus>) -> u32 {
        match t {
            tag::READY_FOR_QUERY => {
                if let Some(owed) = self.owed.pop_front() {
                    if owed == Owed::Ready {
                        // A Query ends the extended batch before it: what stays unsynced
                        // is only an extended message sent after it and not followed by a
                        // Sync.
                        self.unsynced = self
                            .owed
                            .iter()
                            .rev()
                            .take_while(|o| **o != Owed::Sync)
                            .any(|o| !matches!(o, Owed::Ready));
                    }
                    self.pending = self.pending.saturating_sub(1);
                }
                if let Some(s) = status {
                    self.status = s;
                }
                self.copy_in = false;
                self.copy_out = false;
            }
            tag::ERROR_RESPONSE => {
                if matches!(
                    self.owed.front(),
                    Some(Owed::Complete(_) | Owed::Execute | Owed::Describe)
                ) {
                    return self.skip_to_sync();
                }
            }
            tag::PARSE_COMPLETE | tag::BIND_COMPLETE | tag::CLOSE_COMPLETE
                if self.owed.front() == Some(&Owed::Complete(t)) =>
            {
                self.owed.pop_front();
            }
            tag::COMMAND_COMPLETE | tag::EMPTY_QUERY | tag::PORTAL_SUSPENDED => {
                if self.owed.front() == Some(&Owed::Execute) {
                    self.owed.pop_front();
                }
                self.copy_out = false;
            }
            tag::ROW_DESCRIPTION | tag::NO_DATA if self.owed.front() == Some(&Owed::Describe) => {
                self.owed.pop_front();
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
        0
    }

    /// An extended message failed: everything up to the next Sync is discarded.
    fn skip_to_sync(&mut self) -> u32 {
        let mut skipped = 0;
        while let Some(owed) = self.owed.front() {
            match owed {
                Owed::Sync => break,
                Owed::Ready => {
                    skipped += 1;
                    self.pending = self.pending.saturating_sub(1);
                }
                _ => {}
            }
            self.owed.pop_front();
        }
        self.copy_in = false;
        self.copy_out = false;
        if self.owed.is_empty() {
            // No Sync sent yet: the server discards what comes until one is.
            self.skipping = true;
            self.unsynced = true;
        }
        skipped
    }

    /// Nothing in flight, no transaction open: safe to hand to someone else after a reset.
    pub fn is_idle(&self) -> bool {
        self.pending == 0
            && !self.unsynced
            && !self.copy_in
            && !self.copy_out
            && self.status == TxStatus::Idle
    }

    /// The server owes a reply for something the client sent: it is executing, or will.
    pub fn busy(&self) -> bool {
        !self.owed.is_empty() || self.copy_in || self.copy_out
    }

    /// ReadyForQuery replies still owed.
    pub fn pending(&self) -> u32 {
        self.pending
    }

    /// An extended message failed and no Sync has been sent since: the server discards
    /// what the client sends until one is.
    pub fn skipping(&self) -> bool {
        self.skipping
    }

    /// Extended-protocol messages await a Sync.
    pub fn unsynced(&self) -> bool {
        self.unsynced
    }

    /// A transaction is open on the server: an explicit one, or the implicit one of an
    /// extended-protocol batch not yet synced.
    pub fn in_transaction(&self) -> bool {
        self.status != TxStatus::Idle || self.unsynced
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
    fn a_failed_extended_message_skips_queries_until_sync() {
        // Parse fails; PostgreSQL discards the Query and answers only the Sync.
        let mut t = ConnTracker::default();
        for m in *b"PBEQS" {
            t.client_message(m);
        }
        assert_eq!(t.pending(), 2);
        assert_eq!(t.server_message(b'E', None), 1, "the Query is skipped");
        assert_eq!(t.pending(), 1);
        t.server_message(b'Z', Some(TxStatus::Idle));
        assert!(t.is_idle());
    }

    #[test]
    fn messages_after_a_failure_are_discarded_until_sync() {
        let mut t = ConnTracker::default();
        t.client_message(b'P');
        t.client_message(b'H');
        assert_eq!(t.server_message(b'E', None), 0);
        t.client_message(b'Q');
        assert_eq!(
            t.pending(),
            0,
            "the server discards it: no ReadyForQuery is owed"
        );
        t.client_message(b'S');
        t.server_message(b'Z', Some(TxStatus::Idle));
        assert!(t.is_idle());
    }

    #[test]
    fn execute_and_flush_keep_the_server_busy_and_the_transaction_open() {
        let mut t = ConnTracker::default();
        for m in *b"PBEH" {
            t.client_message(m);
        }
        assert!(t.busy());
        for r in *b"12DC" {
            t.server_message(r, None);
        }
        assert!(!t.busy(), "all replied");
        assert!(
            t.in_transaction(),
            "the implicit transaction waits for Sync"
        );
        t.client_message(b'S');
        t.server_message(b'Z', Some(TxStatus::Idle));
        assert!(!t.in_transaction() && t.is_idle());
    }

    #[test]
    fn a_query_ends_the_extended_batch_before_it() {
        let mut t = ConnTracker::default();
        for m in *b"BEQ" {
            t.client_message(m);
        }
        for r in *b"2DCTDC" {
            t.server_message(r, None);
        }
        t.server_message(b'Z', Some(TxStatus::Idle));
        assert!(t.is_idle());
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
