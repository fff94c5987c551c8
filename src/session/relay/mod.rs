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
use pooling::SessionState;

mod binding;
mod bound;
mod pooling;

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
    pub audit: crate::admin::audit::Audit,
    pub who: crate::admin::audit::Who,
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
    /// The tenant's query-duration histogram (Query or Sync to ReadyForQuery).
    pub query_seconds: Option<metrics::Histogram>,
    /// The guard's token buffer, kept between statements.
    tokens: crate::tenant::guard::lexer::TokenBuf,
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
            query_seconds: None,
            tokens: Default::default(),
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
    pub fn holds_client_output(&self, tracker: &ConnTracker) -> bool {
        !self.listens.is_empty()
            && tracker.status() == TxStatus::Idle
            && !tracker.unsynced()
            && !self.owners.iter().any(|o| matches!(o, Owner::Client))
    }

    /// When the statement now running on the server started, if one is.
    pub fn busy_since(&self) -> Option<Instant> {
        self.busy_since
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
            self.busy_since = Some(Instant::now());
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
        use crate::admin::audit::str_value;
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
            &[("reason", crate::admin::audit::str_value(reason))],
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

    /// Moves everything forwardable from `input` to `to_server`. `pooled` is the server
    /// connection's transaction-pooling state.
    pub fn client_bytes(
        &mut self,
        input: &mut BytesMut,
        to_server: &mut BytesMut,
        tracker: &mut ConnTracker,
        pooled: &mut PooledState,
    ) -> Result<ClientStep, FrameError> {
        let mut run = 0;
        loop {
            let piece = match self.client_scan.next(&input[run..])? {
                None => break,
                Some(p) => p,
            };
            let (t, len) = match piece {
                Piece::Pass { tag, len, .. } => {
                    if let Some(t) = tag {
                        if self.binding_due {
                            move_run(input, run, to_server);
                            run = 0;
                            self.bind_separately(to_server, tracker, pooled);
                        }
                        tracker.client_message(t);
                    }
                    run += len;
                    continue;
                }
                Piece::Whole { tag, len } => (tag, len),
            };
            let message = &input[run..run + len];
            let body = &message[5..];
            let mut effects = Vec::new();
            let mut before = self.out_buf();
            let mut prefix = false;
            if self.binding_due && t != tag::TERMINATE {
                match self.binding_plan(t, body) {
                    binding::Plan::Prefix => prefix = true,
                    binding::Plan::Extended => {
                        self.binding_due = false;
                        self.bind_extended(&mut before, tracker, pooled);
                    }
                    binding::Plan::Separate => self.bind_separately(&mut before, tracker, pooled),
                }
            }
            let replacement: Option<(u8, BytesMut)> = match t {
                tag::TERMINATE => {
                    move_run(input, run, to_server);
                    input.advance(len);
                    return Ok(ClientStep::Terminate);
                }
                tag::QUERY => {
                    self.bound_checks.unnamed_gone();
                    if self.pooled() {
                        self.query_sent(pooled, true);
                    }
                    let (replacement, found) = self.on_query(body);
                    effects = found;
                    if !effects.is_empty() || self.session.resync {
                        self.before_query(&effects, &mut before, tracker, pooled);
                    }
                    replacement
                }
                tag::PARSE => match self.on_parse(body) {
                    ParseOutcome::Refused(bytes) => {
                        // The stand-in is an unnamed Parse: the server's unnamed statement
                        // goes (and the client's too, when its Parse was unnamed).
                        if self.pooled() {
                            self.query_sent(pooled, body.first() == Some(&0));
                        }
                        Some((tag::PARSE, bytes))
                    }
                    ParseOutcome::Forward(new_body, found) => {
                        // What the statement needs on this connection goes ahead of it;
                        // its effects count when a Bind executes it.
                        if !found.is_empty() || self.session.resync {
                            self.before_query(&found, &mut before, tracker, pooled);
                        }
                        let body = new_body.as_deref().unwrap_or(body);
                        match self.pooled_message(tag::PARSE, body, pooled, found) {
                            Some(bytes) => Some((tag::PARSE, bytes)),
                            None => new_body.map(|b| {
                                let mut out = BytesMut::new();
                                encode::raw(tag::PARSE, &b, &mut out);
                                (tag::PARSE, out)
                            }),
                        }
                    }
                },
                tag::BIND | tag::DESCRIBE | tag::CLOSE => {
                    let refused = match t {
                        tag::BIND => self.check_bind(body),
                        tag::CLOSE => {
                            if let Some((b'S', rest)) = body.split_first()
                                && let Some((name, _)) = take_cstr(rest)
                            {
                                self.bound_checks.closed(name);
                            }
                            None
                        }
                        _ => None,
                    };
                    if let Some(bytes) = refused {
                        Some((t, bytes))
                    } else if self.pooled() {
                        self.pooled_message(t, body, pooled, Vec::new())
                            .map(|bytes| (t, bytes))
                    } else {
                        self.own_statement_names(t, body)
                    }
                }
                tag::EXECUTE => self.on_execute(body),
                tag::FUNCTION_CALL if self.rules.policy.scope == Scope::Tenant => {
                    self.counters.refused += 1;
                    self.refuse(
                        self.next_epoch,
                        ClientError::error(
                            sqlstate::INSUFFICIENT_PRIVILEGE,
                            "the FunctionCall (fast-path) message is not allowed through pgtenant",
                        ),
                    );
                    let mut out = BytesMut::new();
                    encode::raw(tag::QUERY, REFUSED_SQL, &mut out);
                    Some((tag::QUERY, out))
                }
                // Dedicated placements allow the fast path; it runs SQL, so it counts
                // against the query rate like Query and Execute.
                tag::FUNCTION_CALL => {
                    self.counters.queries += 1;
                    if self.take_query_token() {
                        None
                    } else {
                        let error = self.throttled();
                        self.refuse(self.next_epoch, error);
                        Some((tag::QUERY, refused_query()))
                    }
                }
                _ => None,
            };
            // A refused statement needs no binding; the next one gets it.
            let refused = self
                .refusals
                .back()
                .is_some_and(|(e, _)| *e == self.next_epoch);
            let prefixed = prefix && !refused;
            let sent_tag = if prefixed {
                self.binding_due = false;
                tag::QUERY
            } else {
                replacement.as_ref().map(|(t, _)| *t).unwrap_or(t)
            };
            if replacement.is_none() && before.is_empty() && !prefixed {
                run += len;
            } else {
                move_run(input, run, to_server);
                to_server.extend_from_slice(&before);
                let sent: &[u8] = match &replacement {
                    Some((_, bytes)) => bytes,
                    None => &input[..len],
                };
                if prefixed {
                    // Written straight into the output: no copy of the query per transaction.
                    self.bind_prefix(sent.get(5..).unwrap_or_default(), to_server);
                } else {
                    to_server.extend_from_slice(sent);
                }
                input.advance(len);
                run = 0;
            }
            self.recycle(before);
            if let Some((_, bytes)) = replacement {
                self.recycle(bytes);
            }
            if sent_tag == tag::SYNC {
                // The effects of the statements this batch executed.
                effects = std::mem::take(&mut self.session.pending_effects);
            }
            match sent_tag {
                // Discarded by the server (an extended message failed, no Sync yet): no
                // ReadyForQuery comes for it and nothing it would change happens.
                tag::QUERY | tag::FUNCTION_CALL if tracker.skipping() => {
                    tracker.client_message(sent_tag);
                }
                tag::QUERY | tag::SYNC | tag::FUNCTION_CALL => {
                    let epoch = self.next_epoch;
                    self.open_epoch(Owner::Client, tracker, sent_tag);
                    let mut after = self.out_buf();
                    if !effects.is_empty() {
                        self.after_query(epoch, effects, &mut after, tracker);
                    }
                    if std::mem::take(&mut self.rebind_at_sync) {
                        self.inject_rebind(&mut after, tracker, pooled);
                    }
                    if !after.is_empty() {
                        move_run(input, run, to_server);
                        run = 0;
                        to_server.extend_from_slice(&after);
                    }
                    self.recycle(after);
                }
                other => tracker.client_message(other),
            }
        }
        move_run(input, run, to_server);
        if self.pooled() {
            self.settle_unnamed(pooled);
        }
        if self.busy_since.is_none() && tracker.busy() {
            // Extended messages (Execute and Flush, no Sync) keep the server busy too.
            self.busy_since = Some(Instant::now());
        }
        Ok(ClientStep::Continue)
    }

    /// Checks a Query; returns the message to send instead, if any, and its session effects
    /// (transaction pooling).
    fn on_query(&mut self, body: &[u8]) -> (Option<(u8, BytesMut)>, Vec<Effect>) {
        self.counters.queries += 1;
        let epoch = self.next_epoch;
        if !self.take_query_token() {
            let error = self.throttled();
            self.refuse(epoch, error);
            return (Some((tag::QUERY, refused_query())), Vec::new());
        }
        let text = cstr_prefix(body);
        let mut verdict = self.check_text(text);
        if verdict.refusal.is_none()
            && let Some(refused) = self.execute_of_bound(text)
        {
            verdict = refused;
        }
        if let Some(r) = verdict.refusal {
            self.counters.refused += 1;
            self.refuse(
                epoch,
                ClientError::error(r.sqlstate, r.message).with_position(r.position),
            );
            return (Some((tag::QUERY, refused_query())), Vec::new());
        }
        if let Some(why) = self.effects_over_limit(&verdict.effects) {
            self.counters.refused += 1;
            self.refuse(
                epoch,
                ClientError::error(sqlstate::CONFIGURATION_LIMIT_EXCEEDED, why),
            );
            return (Some((tag::QUERY, refused_query())), Vec::new());
        }
        if let Some(name) = self.unknown_execute(&verdict.effects) {
            self.counters.refused += 1;
            self.refuse(
                epoch,
                ClientError::error(
                    sqlstate::INVALID_SQL_STATEMENT_NAME,
                    format!("prepared statement \"{name}\" does not exist"),
                ),
            );
            return (Some((tag::QUERY, refused_query())), Vec::new());
        }
        // The rebind goes right after this Query (the epoch opens when it is sent).
        self.rebind_at_sync |= verdict.rebind;
        let replacement = verdict.rewritten.map(|sql| {
            let mut out = BytesMut::new();
            let mut b = sql.into_bytes();
            b.push(0);
            encode::raw(tag::QUERY, &b, &mut out);
            (tag::QUERY, out)
        });
        (replacement, verdict.effects)
    }

    /// Checks a Parse. A refused one becomes an unnamed Parse the server fails on; an
    /// allowed one may come back with rewritten text (same name and parameter types).
    fn on_parse(&mut self, body: &[u8]) -> ParseOutcome {
        // A malformed Parse goes through unchanged: the server rejects it.
        let Some((name, rest)) = take_cstr(body) else {
            return ParseOutcome::Forward(None, Vec::new());
        };
        let Some((text, params)) = take_cstr(rest) else {
            return ParseOutcome::Forward(None, Vec::new());
        };
        if name.is_empty() {
            self.bound_checks.unnamed_gone();
        }
        let mut verdict = self.check_text_naming(text, name);
        if verdict.refusal.is_none()
            && let Some(why) = self
                .statement_over_limit(name, rest)
                .or_else(|| self.effects_over_limit(&verdict.effects))
        {
            verdict = crate::tenant::guard::Verdict::refuse_as(
                sqlstate::CONFIGURATION_LIMIT_EXCEEDED,
                why,
            );
        }
        if self.rules.policy.prepared_prefix.is_none()
            && crate::tenant::guard::is_reserved_name(name)
            && !self.rules.policy.unchecked
        {
            verdict = crate::tenant::guard::Verdict::refuse(
                "statement names starting with pgt_ or pgtenant_ are reserved by pgtenant",
            );
        }
        if verdict.refusal.is_none()
            && let Some(refused) = self.execute_of_bound(text)
        {
            verdict = refused;
        }
        if verdict.refusal.is_none() && !verdict.bound_settings.is_empty() {
            let calls = std::mem::take(&mut verdict.bound_settings);
            if let Err(refused) = self.keep_bound_settings(name, params, calls) {
                verdict = refused;
            }
        }
        if let Some(r) = verdict.refusal {
            self.session.next_server_name = None;
            self.counters.refused += 1;
            self.refuse(
                self.next_epoch,
                ClientError::error(r.sqlstate, r.message).with_position(r.position),
            );
            let mut b = vec![0];
            b.extend_from_slice(REFUSED_SQL);
            b.extend_from_slice(params);
            let mut out = BytesMut::new();
            encode::raw(tag::PARSE, &b, &mut out);
            if self.rules.policy.prepared_prefix.is_some() {
                self.session
                    .parses
                    .push_back((self.next_epoch, pooling::Reply::Client, None));
            }
            return ParseOutcome::Refused(out);
        }
        self.rebind_at_sync |= verdict.rebind;
        let rewritten = verdict.rewritten.map(|text| {
            let mut b = Vec::with_capacity(name.len() + text.len() + params.len() + 2);
            b.extend_from_slice(name);
            b.push(0);
            b.extend_from_slice(text.as_bytes());
            b.push(0);
            b.extend_from_slice(params);
            b
        });
        ParseOutcome::Forward(rewritten, verdict.effects)
    }

    /// Session mode: Bind, Describe or Close of one of pgtenant's own statement names is
    /// answered as PostgreSQL answers an unknown name; the server never sees the name.
    fn own_statement_names(&mut self, t: u8, body: &[u8]) -> Option<(u8, BytesMut)> {
        let (prefix, name, rest) = match t {
            tag::BIND => {
                let (portal, rest) = take_cstr(body)?;
                let (name, rest) = take_cstr(rest)?;
                (&body[..portal.len() + 1], name, rest)
            }
            _ => {
                let (&kind, rest) = body.split_first()?;
                if kind != b'S' {
                    return None;
                }
                let (name, rest) = take_cstr(rest)?;
                (&body[..1], name, rest)
            }
        };
        if self.rules.policy.unchecked || !crate::tenant::guard::is_reserved_name(name) {
            return None;
        }
        if t != tag::CLOSE {
            self.counters.refused += 1;
            self.refuse(
                self.next_epoch,
                ClientError::error(
                    sqlstate::INVALID_SQL_STATEMENT_NAME,
                    format!(
                        "prepared statement \"{}\" does not exist",
                        String::from_utf8_lossy(name)
                    ),
                ),
            );
        }
        Some((t, replace_statement_name(t, prefix, rest)))
    }

    /// The guard's verdict on `text`; in transaction pooling a text naming
    /// `pg_prepared_statements` is checked again with the client's own view of it.
    fn check_text(&mut self, text: &[u8]) -> crate::tenant::guard::Verdict {
        self.check_text_naming(text, b"")
    }

    /// Like [`Relay::check_text`], for the text of a Parse creating the client's statement
    /// `name`: a named statement that reads `pg_prepared_statements` sees itself there, as
    /// on PostgreSQL, so it gets a server name of its own, known before its text is written.
    fn check_text_naming(&mut self, text: &[u8], name: &[u8]) -> crate::tenant::guard::Verdict {
        let verdict =
            self.rules
                .policy
                .check_reusing(text, self.standard_conforming, &mut self.tokens);
        if !verdict.wants_prepared_view {
            return verdict;
        }
        let itself = (self.pooled() && !name.is_empty()).then(|| {
            let server_name = self.own_server_name();
            (String::from_utf8_lossy(name).into_owned(), server_name)
        });
        self.rules.policy.prepared_view = Some(self.prepared_view_sql(itself.as_ref()));
        self.session.next_server_name = itself.map(|(_, s)| s);
        let mut verdict = self.rules.policy.check(text, self.standard_conforming);
        self.rules.policy.prepared_view = None;
        if verdict.wants_prepared_view {
            // Cannot happen (the view was given); never forward the text unrewritten.
            return crate::tenant::guard::Verdict::refuse(
                "pg_prepared_statements could not be rewritten",
            );
        }
        if verdict.refusal.is_none() {
            verdict.effects.push(Effect::PreparedView);
        }
        verdict
    }

    /// Counts an Execute against the query rate.
    fn on_execute(&mut self, body: &[u8]) -> Option<(u8, BytesMut)> {
        self.counters.queries += 1;
        if self.take_query_token() {
            return None;
        }
        let error = self.throttled();
        self.refuse(self.next_epoch, error);
        let max_rows = take_cstr(body)
            .map(|(_, rest)| rest)
            .unwrap_or(&[0, 0, 0, 0]);
        let mut b = Vec::with_capacity(REFUSED_PORTAL.len() + 4);
        b.extend_from_slice(REFUSED_PORTAL);
        b.extend_from_slice(max_rows);
        let mut out = BytesMut::new();
        encode::raw(tag::EXECUTE, &b, &mut out);
        Some((tag::EXECUTE, out))
    }

    fn take_query_token(&mut self) -> bool {
        self.rules
            .tenant
            .take_query(self.rules.queries_per_second, Instant::now())
    }

    fn throttled(&mut self) -> ClientError {
        self.counters.throttled += 1;
        ClientError::error(
            sqlstate::CONFIGURATION_LIMIT_EXCEEDED,
            format!(
                "this tenant is over its limit of {} queries per second",
                self.rules.queries_per_second.unwrap_or_default()
            ),
        )
        .with_hint("slow down and retry")
    }

    /// Moves everything forwardable from the server's `input` to `to_client`, updating the
    /// connection's tracker and parameters.
    pub fn server_bytes(
        &mut self,
        scanner: &mut FrameScanner,
        input: &mut BytesMut,
        to_client: &mut BytesMut,
        tracker: &mut ConnTracker,
        params: &mut BTreeMap<String, String>,
        pooled: &mut PooledState,
    ) -> Result<(), ServerProtocolError> {
        if self.unusable {
            return Err(ServerProtocolError::BindingFailed(
                "the binding could not be sent".into(),
            ));
        }
        let mut run = 0;
        while let Some(piece) = scanner.next(&input[run..])? {
            match piece {
                Piece::Pass { tag, len, .. } => {
                    if let Some(t) = tag {
                        tracker.server_message(t, None);
                        self.swallowing = self.own_front() || self.in_band_reply(t);
                    }
                    if self.swallowing {
                        drop_piece(input, &mut run, len, to_client);
                    } else {
                        run += len;
                    }
                }
                Piece::Whole { tag: t, len } => {
                    let body = &input[run + 5..run + len];
                    let proxy = self.own_front();
                    match t {
                        tag::READY_FOR_QUERY => {
                            let status = server_msgs::ready_for_query(body)
                                .map_err(|_| ServerProtocolError::Malformed("ReadyForQuery"))?;
                            tracker.server_message(t, Some(status));
                            let failed = std::mem::take(&mut self.epoch_failed);
                            self.end_epoch(failed, pooled, tracker);
                            if !self.session.notify_now.is_empty() {
                                // The client's own notifications come before its
                                // ReadyForQuery, as from PostgreSQL.
                                move_run(input, run, to_client);
                                run = 0;
                                let pid = self.virtual_pid;
                                self.own_notifications(pid, to_client);
                            }
                            if proxy {
                                drop_piece(input, &mut run, len, to_client);
                            } else {
                                run += len;
                            }
                        }
                        tag::PARAMETER_STATUS => {
                            let (k, v) = server_msgs::parameter_status(body)
                                .map_err(|_| ServerProtocolError::Malformed("ParameterStatus"))?;
                            if k == "standard_conforming_strings" {
                                self.standard_conforming = v == "on";
                            }
                            params.insert(k.to_owned(), v.to_owned());
                            run += len;
                        }
                        tag::ERROR_RESPONSE if self.owners.front() == Some(&Owner::Bind) => {
                            tracker.server_message(t, None);
                            let fields = server_msgs::error_fields(body).unwrap_or_default();
                            self.unusable = true;
                            // What the client's own statements produced still reaches it.
                            move_run(input, run, to_client);
                            return Err(ServerProtocolError::BindingFailed(format!(
                                "{}: {}",
                                fields.code, fields.message
                            )));
                        }
                        tag::ERROR_RESPONSE if proxy => {
                            let skipped = tracker.server_message(t, None);
                            let fields = server_msgs::error_fields(body).unwrap_or_default();
                            tracing::warn!(code = %fields.code, message = %fields.message,
                                "rebinding the tenant context failed; retrying after the next statement");
                            self.rebind_at_sync = true;
                            drop_piece(input, &mut run, len, to_client);
                            self.skip_epochs(skipped, pooled, tracker);
                        }
                        tag::ERROR_RESPONSE => {
                            let skipped = tracker.server_message(t, None);
                            self.epoch_failed = true;
                            if server_msgs::error_fields(body)
                                .is_ok_and(|f| f.severity == "FATAL" || f.severity == "PANIC")
                            {
                                // The server closes after this: the connection never goes back.
                                self.server_fatal = true;
                            }
                            let epoch = self.done_epoch;
                            let shifted = self.in_band_error(body);
                            match self.refusals.iter().position(|(e, _)| *e == epoch) {
                                Some(i) => {
                                    let mine = self.refusals.remove(i).map(|(_, e)| e);
                                    let mut out = BytesMut::new();
                                    if let Some(e) = mine {
                                        e.encode(&mut out);
                                    }
                                    replace_piece(input, &mut run, len, to_client, &out);
                                }
                                None => match shifted {
                                    Some(out) => {
                                        replace_piece(input, &mut run, len, to_client, &out)
                                    }
                                    None => run += len,
                                },
                            }
                            self.skip_epochs(skipped, pooled, tracker);
                        }
                        tag::NOTIFICATION_RESPONSE
                            if self.rules.policy.prepared_prefix.is_some() =>
                        {
                            // Pooled connections do not listen; the tenant's hub delivers.
                            drop_piece(input, &mut run, len, to_client);
                        }
                        tag::NOTIFICATION_RESPONSE => {
                            let out = self.rename_notification(body);
                            replace_piece(input, &mut run, len, to_client, &out);
                        }
                        tag::PARSE_COMPLETE | tag::CLOSE_COMPLETE => {
                            tracker.server_message(t, None);
                            match self.reply_for(t) {
                                _ if proxy => drop_piece(input, &mut run, len, to_client),
                                Some(shown) if shown == t => run += len,
                                Some(shown) => {
                                    let mut out = BytesMut::new();
                                    encode::raw(shown, b"", &mut out);
                                    replace_piece(input, &mut run, len, to_client, &out);
                                }
                                None => drop_piece(input, &mut run, len, to_client),
                            }
                        }
                        other => {
                            tracker.server_message(other, None);
                            if proxy {
                                drop_piece(input, &mut run, len, to_client);
                            } else {
                                run += len;
                            }
                        }
                    }
                }
            }
        }
        move_run(input, run, to_client);
        if self.busy_since.is_some() && self.owners.is_empty() && !tracker.busy() {
            // Extended messages without a Sync completed: idle, maybe in a transaction.
            self.busy_since = None;
            self.ready_since = Instant::now();
        }
        Ok(())
    }

    /// The epoch being answered is over: its ReadyForQuery arrived, or the server skipped it
    /// (an extended message before its Query failed).
    fn end_epoch(&mut self, failed: bool, pooled: &mut PooledState, tracker: &ConnTracker) {
        let owner = self.owners.pop_front();
        if self
            .in_band
            .as_ref()
            .is_some_and(|ib| ib.epoch <= self.done_epoch)
        {
            self.in_band = None;
        }
        if self.rules.policy.prepared_prefix.is_some() {
            self.close_epoch(self.done_epoch, failed, tracker.status(), pooled);
        }
        self.done_epoch += 1;
        let now = Instant::now();
        if owner == Some(Owner::Client) {
            self.count_epoch(now, tracker.status());
        }
        if self.owners.is_empty() && !tracker.busy() {
            self.busy_since = None;
            self.ready_since = now;
        } else {
            self.busy_since = Some(now);
        }
        let done = self.done_epoch;
        self.refusals.retain(|(e, _)| *e >= done);
    }

    /// A client's epoch ended at `now` with the transaction status `status`: its duration
    /// and what it counted go to the tenant's metrics.
    fn count_epoch(&mut self, now: Instant, status: TxStatus) {
        if let (Some(h), Some(since)) = (&self.query_seconds, self.busy_since) {
            h.record(now.saturating_duration_since(since));
        }
        let stats = &self.rules.tenant.stats;
        if status == TxStatus::Idle {
            TenantStats::add(&stats.transactions, 1);
        }
        let (c, f) = (self.counters, &mut self.flushed);
        TenantStats::add(&stats.queries, c.queries - f.queries);
        TenantStats::add(&stats.guard_refusals, c.refused - f.refused);
        TenantStats::add(&stats.throttled, c.throttled - f.throttled);
        *f = c;
    }

    /// Ends the epochs of Queries the server skips after a failed extended message: their
    /// ReadyForQuery never comes (the next one is the Sync's).
    fn skip_epochs(&mut self, skipped: u32, pooled: &mut PooledState, tracker: &ConnTracker) {
        for _ in 0..skipped {
            self.epoch_failed = false;
            self.end_epoch(true, pooled, tracker);
        }
    }

    /// Strips the tenant's prefix from a notification's channel; notifications from outside
    /// the namespace are dropped (empty result).
    fn rename_notification(&self, body: &[u8]) -> BytesMut {
        let mut out = BytesMut::new();
        let Some((pid, rest)) = body.split_first_chunk::<4>() else {
            return out;
        };
        let Some((channel, payload)) = take_cstr(rest) else {
            return out;
        };
        // The client's own NOTIFY shows the pid its BackendKeyData gave it.
        let pid = match i32::from_be_bytes(*pid) {
            pid if Some(pid) == self.own_backend => self.virtual_pid,
            pid => pid,
        };
        let own = match &self.rules.notify_prefix {
            None => channel,
            Some(prefix) => match channel.strip_prefix(prefix.as_bytes()) {
                Some(own) => own,
                None => return out,
            },
        };
        let mut b = Vec::with_capacity(body.len());
        b.put_i32(pid);
        b.put_slice(own);
        b.put_u8(0);
        b.put_slice(payload);
        encode::raw(tag::NOTIFICATION_RESPONSE, &b, &mut out);
        out
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
    match body.iter().position(|&b| b == 0) {
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

impl RelayRules {
    /// A shared tenant "acme" bound to the id `x`, session pooling, an optional query rate:
    /// the one fixture for unit tests, benchmarks and fuzz targets.
    pub fn sample_shared(queries_per_second: Option<u32>) -> RelayRules {
        RelayRules {
            policy: Policy {
                scope: Scope::Tenant,
                protect_search_path: false,
                readonly: false,
                max_statement_timeout: None,
                notify_prefix: Some("acme.".into()),
                allow_ddl: false,
                prepared_prefix: None,
                lock_salt: None,
                unchecked: false,
                prepared_view: None,
            },
            rebind_sql: "SET app.current_tenant_id TO 'x'".into(),
            startup_settings: Vec::new(),
            binding: Binding {
                sql: "SET app.current_tenant_id TO 'x'".into(),
                tenant_id: "x".into(),
                search_path: None,
                verified: false,
            },
            client_id: 1,
            tenant: crate::quota::Quotas::default().tenant("acme"),
            queries_per_second,
            notify_prefix: Some("acme.".into()),
            audit: crate::admin::audit::Audit::default(),
            who: crate::admin::audit::Who::default(),
        }
    }
}

#[cfg(test)]
mod tests;
