//! The forwarding logic of a session, sans-IO (DESIGN.md §4): client bytes go to the server
//! and server bytes to the client, message by message. The relay reads only what the proxy
//! must. On the client side that is Query, Parse, Execute, Sync, FunctionCall and Terminate,
//! for the guard and the query rate. On the server side it is ReadyForQuery, ParameterStatus,
//! ErrorResponse and NotificationResponse. Everything else passes through as the same bytes,
//! in runs as long as the buffer allows.
//!
//! A refused message never reaches the server as written. It is replaced by one the server
//! fails on (a syntax error for Query/Parse, an unknown portal for Execute). The server's
//! error is then swapped for pgtenant's, so replies keep their order and transaction state
//! and the Sync rules stay exactly PostgreSQL's. The relay's own statements (binding the
//! context again after `RESET ALL`) are pipelined into the stream. Their replies are
//! consumed, except ParameterStatus, which the client should see.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::Instant;

use bytes::{Buf, BufMut, BytesMut};

use crate::error::{ClientError, sqlstate};
use crate::pool::cache::PooledState;
use crate::protocol::frame::{FrameError, FrameScanner, Piece, TagSet};
use crate::protocol::tracker::ConnTracker;
use crate::protocol::{TxStatus, encode, server_msgs, tag, take_cstr};
use crate::quota::{TenantState, TenantStats};
use crate::tenant::guard::{Effect, Policy, Scope};
pub use binding::Binding;
use binding::InBand;
use pooling::{OwnStatement, SessionState};

mod binding;
mod bound;
mod client;
#[cfg(any(test, feature = "fixtures"))]
mod fixtures;
mod pooling;
mod server;

/// What the guard made of a Parse.
enum ParseOutcome {
    /// Refused: send these bytes (a Parse the server fails on) instead.
    Refused(BytesMut),
    /// Allowed: forward, with this body when the text was rewritten, and the statement's
    /// session effects (transaction pooling).
    Forward(Option<Vec<u8>>, Vec<Effect>),
}

/// Client messages the relay reads whole. Statement names in Bind, Describe and Close are
/// read too: with transaction pooling they are translated, and in either mode a client never
/// reaches a statement it did not create.
const CLIENT_WHOLE: TagSet = TagSet::of(&[
    tag::TERMINATE,
    tag::QUERY,
    tag::PARSE,
    tag::EXECUTE,
    tag::SYNC,
    tag::FUNCTION_CALL,
    tag::BIND,
    tag::DESCRIBE,
    tag::CLOSE,
]);

/// Text the server fails to parse: stands in for a refused statement.
const REFUSED_SQL: &[u8] = b"PGTENANT_REFUSED_STATEMENT\0";
/// A portal that does not exist: stands in for a refused Execute.
const REFUSED_PORTAL: &[u8] = b"pgtenant_refused_portal\0";

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
    /// Binding the tenant context failed: the connection is closed rather than used unbound.
    #[error("binding the tenant context failed: {0}")]
    BindingFailed(String),
}

/// The rules a session's relay applies.
pub struct RelayRules {
    /// The guard for this tenant and user.
    pub policy: Policy,
    /// pgtenant's own constant SQL that binds the tenant context again (with the user's
    /// read-only mode and the plan's statement timeout).
    pub rebind_sql: String,
    /// The client's startup settings: applied again with the rebind, as parameters.
    pub startup_settings: Vec<(String, String)>,
    /// The tenant binding run at every transaction when pooling.
    pub binding: Binding,
    /// This client's session id (names its state on pooled connections).
    pub client_id: u64,
    /// The tenant's shared counters, and its query rate if it has one.
    pub tenant: Arc<TenantState>,
    pub queries_per_second: Option<u32>,
    /// The prefix of the tenant's notification channels.
    pub notify_prefix: Option<String>,
    /// The audit log, and who this session is in it.
    pub audit: crate::telemetry::audit::Audit,
    pub who: crate::telemetry::audit::Who,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Owner {
    Client,
    /// pgtenant's own statement: its replies are consumed.
    Proxy,
    /// pgtenant's own statement binding the tenant context: like `Proxy`, but if it fails
    /// the server connection is unusable (nothing may run on it unbound).
    Bind,
}

/// Counters a session reports when it ends.
#[derive(Debug, Default, Clone, Copy)]
pub struct RelayCounters {
    pub queries: u64,
    pub refused: u64,
    pub throttled: u64,
}

/// Per-session forwarding state.
pub struct Relay {
    client_scan: FrameScanner,
    rules: RelayRules,
    standard_conforming: bool,
    /// Who owns each ReadyForQuery still owed, oldest first.
    owners: VecDeque<Owner>,
    /// Number of the epoch (run of messages closed by one ReadyForQuery) the next client
    /// message belongs to, and of the epoch the server is answering.
    next_epoch: u64,
    done_epoch: u64,
    /// Errors to show in place of the server's, per epoch.
    refusals: VecDeque<(u64, ClientError)>,
    rebind_at_sync: bool,
    /// The server message being passed through belongs to pgtenant: drop its pieces.
    swallowing: bool,
    /// When the statement the server is running now started (for the statement timeout).
    busy_since: Option<Instant>,
    /// When the last ReadyForQuery arrived (for the idle-in-transaction timeout).
    ready_since: Instant,
    /// The clock as the session loop read it in this wake-up, while it hands the relay the
    /// transaction's first messages (see [`Relay::set_clock`]); else the relay reads it.
    clock: Option<Instant>,
    /// The epoch being answered has reported an error.
    epoch_failed: bool,
    /// The server reported a FATAL error: it is about to close the connection.
    server_fatal: bool,
    /// Transaction pooling: the next transaction still needs its binding.
    binding_due: bool,
    /// Replies of an in-band binding still to consume.
    in_band: Option<InBand>,
    /// Transaction pooling: the client's session state.
    session: SessionState,
    /// Statements calling `set_config` with parameters: checked at each Bind.
    bound_checks: bound::BoundChecks,
    /// Binding the context failed (or could not be sent): the server connection is never
    /// used again.
    unusable: bool,
    /// Session pooling: the pid of the client's server backend.
    own_backend: Option<i32>,
    /// The pid the client's BackendKeyData gave it.
    pub virtual_pid: i32,
    /// Channels to subscribe to and unsubscribe from (`None`: all) at the tenant's hub.
    pub listens: Vec<String>,
    pub unlistens: Vec<Option<String>>,
    pub counters: RelayCounters,
    /// What of `counters` went to the tenant's metrics already.
    flushed: RelayCounters,
    /// The guard's token buffer, kept between statements.
    tokens: crate::tenant::guard::lexer::TokenBuf,
    /// Texts the guard let through untouched, not checked again (bounded; see the type).
    passed: crate::tenant::guard::PassedTexts,
    /// Emptied buffers for the messages pgtenant writes in place of or ahead of a client's,
    /// kept so that a steady transaction allocates none.
    spare: Vec<BytesMut>,
}

impl Relay {
    /// `max_message` caps client messages read whole.
    pub fn new(max_message: usize, rules: RelayRules) -> Self {
        Relay {
            client_scan: FrameScanner::new(CLIENT_WHOLE, max_message),
            rules,
            standard_conforming: true,
            owners: VecDeque::new(),
            next_epoch: 0,
            done_epoch: 0,
            refusals: VecDeque::new(),
            rebind_at_sync: false,
            swallowing: false,
            busy_since: None,
            ready_since: Instant::now(),
            clock: None,
            epoch_failed: false,
            server_fatal: false,
            binding_due: false,
            in_band: None,
            session: SessionState::default(),
            bound_checks: bound::BoundChecks::default(),
            unusable: false,
            own_backend: None,
            virtual_pid: 0,
            listens: Vec::new(),
            unlistens: Vec::new(),
            counters: RelayCounters::default(),
            flushed: RelayCounters::default(),
            tokens: Default::default(),
            passed: Default::default(),
            spare: Vec::new(),
        }
    }

    /// An empty buffer for a message pgtenant writes (a kept one when there is one).
    fn out_buf(&mut self) -> BytesMut {
        let mut b = self.spare.pop().unwrap_or_default();
        b.clear();
        b
    }

    /// Keeps `b` for [`Relay::out_buf`]: a few small ones (a large one goes, so an odd big
    /// message does not stay with the session).
    fn recycle(&mut self, b: BytesMut) {
        if b.capacity() > 0 && b.capacity() <= SPARE_MAX && self.spare.len() < SPARES {
            self.spare.push(b);
        }
    }

    /// pgtenant failed to bind the tenant context on the server connection: close it.
    pub fn server_unusable(&self) -> bool {
        self.unusable
    }

    /// Transaction pooling: the client holds session state on its server connection (see
    /// [`Effect::Pin`]), so the connection must be reset before anyone else gets it.
    pub fn pinned(&self) -> bool {
        self.session.pinned.is_some()
    }

    /// The tenant moved to another shard: bind with that shard's key (or without one), and
    /// salt advisory-lock keys with it.
    pub fn placement_changed(&mut self, verified: bool, lock_salt: u64) {
        self.rules.binding.verified = verified;
        self.rules.binding.encoded = None;
        if self.rules.policy.lock_salt.is_some() {
            self.rules.policy.lock_salt = Some(lock_salt);
        }
    }

    /// Session pooling: notifications from `server_pid` (the client's own backend) show
    /// the client's [`Relay::virtual_pid`].
    pub fn set_own_backend(&mut self, server_pid: i32) {
        self.own_backend = Some(server_pid);
    }

    /// The prefix of the tenant's notification channels.
    pub fn notify_prefix(&self) -> Option<&str> {
        self.rules.notify_prefix.as_deref()
    }

    /// Transaction pooling: the server connection may go back to the pool now (nothing is
    /// owed, no transaction is open, and the client is between messages).
    pub fn at_release_point(&self, tracker: &ConnTracker) -> bool {
        self.rules.policy.prepared_prefix.is_some()
            && self.session.pinned.is_none()
            && !self.server_fatal
            && self.owners.is_empty()
            && tracker.is_idle()
            && self.client_scan.at_boundary()
    }

    /// The client is between transactions: nothing owed, no transaction open, between
    /// messages (where PostgreSQL delivers notifications).
    pub fn between_transactions(&self, tracker: &ConnTracker) -> bool {
        self.owners.is_empty() && tracker.is_idle() && self.client_scan.at_boundary()
    }

    /// Transaction pooling: the client's transaction ended with a LISTEN the notification hub
    /// has not confirmed yet. Its ReadyForQuery waits, so that a NOTIFY the client's peers
    /// commit after seeing it cannot be missed.
    #[inline(always)]
    pub fn holds_client_output(&self, tracker: &ConnTracker) -> bool {
        !self.listens.is_empty()
            && tracker.status() == TxStatus::Idle
            && !tracker.unsynced()
            && !self.owners.iter().any(|o| matches!(o, Owner::Client))
    }

    /// Lends the relay the time the caller read in this wake-up (`None` takes it back): a
    /// statement that starts meanwhile starts then, without reading the clock again.
    pub fn set_clock(&mut self, now: Option<Instant>) {
        self.clock = now;
    }

    /// The time now: the lent one (see [`Relay::set_clock`]) or the clock's.
    fn now(&self) -> Instant {
        self.clock.unwrap_or_else(Instant::now)
    }

    /// When the statement now running on the server started, if one is.
    pub fn busy_since(&self) -> Option<Instant> {
        self.busy_since
    }

    /// The session's last activity: when its statement in progress was sent, else when the
    /// server last became ready.
    pub fn last_activity(&self) -> Instant {
        self.busy_since.unwrap_or(self.ready_since)
    }

    /// When the server last became ready for the client (nothing is owed since then).
    pub fn ready_since(&self) -> Option<Instant> {
        (self.owners.is_empty() && self.busy_since.is_none()).then_some(self.ready_since)
    }

    /// Shows `error` in place of the next error the server reports for the statement running
    /// now (pgtenant cancelled it).
    pub fn explain_next_error(&mut self, error: ClientError) {
        self.refusals.push_back((self.done_epoch, error));
    }

    /// Whether the client stopped between two messages (a half-sent message leaves the
    /// server connection unusable).
    pub fn client_at_boundary(&self) -> bool {
        self.client_scan.at_boundary()
    }

    /// The reply being read belongs to a statement of pgtenant's own.
    fn own_front(&self) -> bool {
        matches!(self.owners.front(), Some(Owner::Proxy | Owner::Bind))
    }

    /// Records that a ReadyForQuery is owed to `owner`.
    fn open_epoch(&mut self, owner: Owner, tracker: &mut ConnTracker, t: u8) {
        if self.owners.is_empty() {
            self.busy_since = Some(self.now());
        }
        self.owners.push_back(owner);
        self.next_epoch += 1;
        tracker.client_message(t);
    }

    fn refuse(&mut self, epoch: u64, error: ClientError) {
        if self.rules.audit.enabled() {
            self.audit_refusal(&error);
        }
        self.refusals.push_back((epoch, error));
    }

    /// Records a refusal in the audit log: its SQLSTATE, and the construct the guard names
    /// (42501 messages name what was refused, never values); other messages may quote the
    /// statement, so they are left out.
    fn audit_refusal(&self, error: &ClientError) {
        use crate::telemetry::audit::str_value;
        let code = error.sqlstate.as_ref();
        let kind = if code.starts_with("53") {
            "quota_refusal"
        } else {
            "guard_refusal"
        };
        let mut fields = vec![("sqlstate", str_value(code))];
        if code == sqlstate::INSUFFICIENT_PRIVILEGE {
            fields.push(("reason", str_value(&error.message)));
        }
        self.rules.audit.event(kind, &self.rules.who, &fields);
    }

    /// Records in the audit log that the session pinned its server connection.
    pub(super) fn audit_pin(&self, reason: &str) {
        self.rules.audit.event(
            "pin",
            &self.rules.who,
            &[("reason", crate::telemetry::audit::str_value(reason))],
        );
    }

    /// Appends a simple query of pgtenant's own to `out`; its replies will be consumed.
    fn inject_query(&mut self, out: &mut BytesMut, tracker: &mut ConnTracker, sql: &str) {
        // A simple Query drops the server's unnamed statement (see `unnamed_here`).
        self.session.unnamed_dropped = true;
        let mut body = Vec::with_capacity(sql.len() + 1);
        body.extend_from_slice(sql.as_bytes());
        body.push(0);
        encode::raw(tag::QUERY, &body, out);
        self.open_epoch(Owner::Proxy, tracker, tag::QUERY);
    }

    /// Appends pgtenant's rebind statements to `out`: its constant SQL, then the client's
    /// startup settings and the verified token as parameters.
    fn inject_rebind(
        &mut self,
        out: &mut BytesMut,
        tracker: &mut ConnTracker,
        pooled: &PooledState,
    ) {
        let sql = self.rules.rebind_sql.clone();
        self.inject_query(out, tracker, &sql);
        self.last_is_binding();
        let settings = std::mem::take(&mut self.rules.startup_settings);
        let mut pairs: Vec<(&str, &str)> = settings
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        if self.rules.binding.verified {
            pairs.push((
                crate::tenant::context::CONTEXT_SETTING,
                pooled
                    .token_for(&self.rules.binding.tenant_id)
                    .unwrap_or(""),
            ));
        }
        self.inject_set_configs(out, tracker, &pairs);
        self.rules.startup_settings = settings;
    }

    /// The statement just injected binds the context: its failure is fatal.
    pub(super) fn last_is_binding(&mut self) {
        if let Some(last) = self.owners.back_mut() {
            *last = Owner::Bind;
        }
    }

    /// Appends pgtenant's own `set_config` statement for `pairs` (parameters, never text);
    /// its replies are consumed and its failure closes the server connection.
    fn inject_set_configs(
        &mut self,
        out: &mut BytesMut,
        tracker: &mut ConnTracker,
        pairs: &[(&str, &str)],
    ) {
        if pairs.is_empty() {
            return;
        }
        let epoch = self.next_epoch;
        let tags = encode::set_configs(pairs, out);
        if tags.is_empty() {
            // Nothing sent: the connection must not go on unbound.
            self.unusable = true;
            return;
        }
        for &t in tags {
            match t {
                tag::SYNC => {
                    self.open_epoch(Owner::Bind, tracker, t);
                }
                tag::PARSE => {
                    if self.rules.policy.prepared_prefix.is_some() {
                        self.session
                            .parses
                            .push_back((epoch, pooling::Reply::Proxy, None));
                    }
                    tracker.client_message(t);
                }
                tag::CLOSE => {
                    if self.rules.policy.prepared_prefix.is_some() {
                        self.session
                            .closes
                            .push_back((epoch, pooling::Reply::Proxy));
                    }
                    tracker.client_message(t);
                }
                _ => tracker.client_message(t),
            }
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        // The client's LISTEN subscriptions and pin no longer count against its tenant.
        if self.pooled() {
            self.forget_channels();
        }
        if self.session.pinned.is_some() {
            self.rules
                .tenant
                .stats
                .pinned
                .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

/// A Bind, Describe or Close like the client's but naming a statement that never exists: the
/// server answers it as an unknown name (a Close, with CloseComplete).
pub(super) fn replace_statement_name(t: u8, prefix: &[u8], rest: &[u8]) -> BytesMut {
    let mut b = Vec::with_capacity(prefix.len() + NO_STATEMENT.len() + rest.len());
    b.extend_from_slice(prefix);
    b.extend_from_slice(NO_STATEMENT);
    b.extend_from_slice(rest);
    let mut out = BytesMut::new();
    encode::raw(t, &b, &mut out);
    out
}

/// How many emptied message buffers a session keeps, and the largest it keeps.
const SPARES: usize = 3;
const SPARE_MAX: usize = 4096;

/// A statement name no client can have (reserved prefix) and pgtenant never creates.
pub(super) const NO_STATEMENT: &[u8] = b"pgtenant_no_statement\0";

fn refused_query() -> BytesMut {
    let mut out = BytesMut::new();
    encode::raw(tag::QUERY, REFUSED_SQL, &mut out);
    out
}

/// The bytes of a NUL-terminated body up to the first NUL (the whole body if none).
fn cstr_prefix(body: &[u8]) -> &[u8] {
    match crate::protocol::find_nul(body) {
        Some(n) => &body[..n],
        None => body,
    }
}

/// Forwards the run before the piece at `*run`, then drops the piece.
fn drop_piece(input: &mut BytesMut, run: &mut usize, len: usize, out: &mut BytesMut) {
    move_run(input, *run, out);
    input.advance(len);
    *run = 0;
}

/// Forwards the run before the piece at `*run`, then sends `with` instead of the piece.
fn replace_piece(
    input: &mut BytesMut,
    run: &mut usize,
    len: usize,
    out: &mut BytesMut,
    with: &[u8],
) {
    drop_piece(input, run, len, out);
    out.extend_from_slice(with);
}

/// Moves `input[..run]` to the end of `out`, without copying when `out` is empty and the run
/// is the whole input.
#[inline(always)]
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
mod tests;
