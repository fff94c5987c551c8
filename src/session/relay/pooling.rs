//! Transaction pooling in the relay (DESIGN.md §6). A client keeps its session state while its
//! transactions run on different server connections. That state is its settings, its named
//! prepared statements (protocol and SQL level) and its LISTEN channels. pgtenant prepares
//! statements under its own names, creating each on whichever connection the client gets.
//! Per connection it keeps a bounded cache shared by all of one tenant's clients. It also
//! replays the client's settings on a connection that last served someone else.
//!
//! Replies to what pgtenant sends on its own are consumed, and stand-ins are translated back:
//! a statement already prepared on the connection becomes a `Close` whose `CloseComplete` is
//! shown to the client as `ParseComplete`.

use std::collections::{HashMap, VecDeque};
use std::hash::{Hash, Hasher};
use std::sync::Arc;

use bytes::{BufMut, BytesMut};

use super::Relay;
use crate::pool::cache::{PooledState, settings_key};
use crate::protocol::tracker::ConnTracker;
use crate::protocol::{TxStatus, encode, tag, take_cstr};
use crate::tenant::guard::{Effect, Scope};
use crate::tenant::{quote_ident, quote_if_needed, quote_literal};

use super::{NO_STATEMENT, replace_statement_name};

/// What a ParseComplete or CloseComplete from the server stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Reply {
    /// The client's own message: forward.
    Client,
    /// pgtenant's own message: consume.
    Proxy,
    /// A stand-in Close for a Parse of a statement the connection already has: show it as
    /// ParseComplete.
    AsParse,
}

/// A named statement the client prepared with Parse.
#[derive(Debug, Clone)]
struct Statement {
    server_name: String,
    /// The Parse body after the name: query text, NUL, parameter types.
    definition: Vec<u8>,
    /// What executing it changes in the session (a `SET` sent with Parse/Bind/Execute).
    effects: Vec<Effect>,
}

/// The client's session as it outlives server connections.
#[derive(Debug, Default)]
pub(super) struct SessionState {
    /// Settings in the order set: `(key, (setting, value) pairs that replay it)`.
    settings: Vec<(String, Vec<(String, String)>)>,
    /// [`settings_key`] of the setup and `settings`, built when first needed after a change.
    key: Option<Arc<str>>,
    statements: HashMap<String, Statement>,
    /// Bytes of the statements' definitions (bounded: [`MAX_STATEMENT_BYTES`]).
    statement_bytes: usize,
    /// Channels the client listens on (bounded: [`MAX_CHANNELS`]).
    channels: std::collections::HashSet<String>,
    /// SQL-level prepared statements by server name: the PREPARE that recreates them.
    sql_prepared: HashMap<String, String>,
    /// Replies to ParseComplete, in the order the server will send them, with the epoch
    /// they belong to and the server statement the Parse creates (if pgtenant caches it).
    pub(super) parses: VecDeque<(u64, Reply, Option<String>)>,
    /// Replies to CloseComplete, like `parses`.
    pub(super) closes: VecDeque<(u64, Reply)>,
    /// Effects to apply when their epoch succeeds.
    effects: VecDeque<(u64, Vec<Effect>)>,
    /// The unnamed statement's effects, and those of statements bound since the last Sync.
    unnamed_effects: Vec<Effect>,
    pub(super) pending_effects: Vec<Effect>,
    /// Statements put in the connection's cache during an epoch (undone if it fails).
    pub(super) created: Vec<(u64, String)>,
    /// Epochs that dropped every prepared statement (DISCARD ALL, DEALLOCATE ALL).
    cleared: Vec<u64>,
    /// Such an epoch failed after pgtenant forgot the statements: deallocate them for real.
    pub(super) resync: bool,
    /// Setting changes made inside the open transaction block, in order: they count only if
    /// it commits (a rolled-back `SET` is undone by the server, so it is not replayed).
    staged: Vec<Effect>,
    /// The transaction's savepoints: name and how many staged changes preceded it.
    savepoints: Vec<(String, usize)>,
    /// The open transaction block failed: it can only end by rolling back (unless a
    /// `ROLLBACK TO SAVEPOINT` recovers it).
    tx_failed: bool,
    /// Why the client's server connection stays with it (session state the server holds
    /// for it), if it does.
    pub(super) pinned: Option<&'static str>,
    /// The client's unnamed prepared statement: its Parse body after the name, and its
    /// generation (each unnamed Parse makes a new one). PostgreSQL keeps it until the next
    /// unnamed Parse or simple Query; pgtenant re-creates it on whichever connection the
    /// client's Bind or Describe lands on.
    unnamed: Option<(Vec<u8>, u64)>,
    unnamed_generation: u64,
    /// Unnamed Parses not yet confirmed by ParseComplete: `(epoch, generation)`.
    unnamed_unconfirmed: VecDeque<(u64, u64)>,
    /// The client's own notifications committed by the epoch just closed, to show it before
    /// that epoch's ReadyForQuery: `(channel as the server knows it, payload)`.
    pub(super) notify_now: Vec<(String, String)>,
    /// Those shown, whose copies from the hub are not shown again (bounded).
    local_sent: VecDeque<(String, String)>,
    /// Every notification the client's transactions committed since the pool last took
    /// them (see `Pool::note_notifications`; bounded).
    committed_notes: Vec<(String, String)>,
    /// The server name the next named Parse gets instead of its text's hash (a statement
    /// whose text holds this client's view of `pg_prepared_statements`).
    pub(super) next_server_name: Option<String>,
    /// Counter for those names.
    own_names: u64,
    /// pgtenant sent a simple Query of its own since the connection's unnamed statement was
    /// last checked: it is gone.
    pub(super) unnamed_dropped: bool,
}

/// Per-client bounds on the session state pgtenant keeps for transaction pooling (DESIGN.md
/// §5 S5): named protocol statements, the bytes of their text, SQL-level prepared statements
/// and recorded settings. Past them the statement is refused with 53400 and nothing is kept.
pub(super) const MAX_STATEMENTS: usize = 10_000;
pub(super) const MAX_STATEMENT_BYTES: usize = 16 << 20;
pub(super) const MAX_SQL_PREPARED: usize = 10_000;
pub(super) const MAX_SETTINGS: usize = 500;
/// LISTEN channels per client: each costs the shard's shared listening connection.
pub(super) const MAX_CHANNELS: usize = 1_000;
/// LISTEN subscriptions of all of one tenant's clients together.
pub(super) const MAX_TENANT_CHANNELS: usize = 10_000;

/// pgtenant's name for a statement: the same text and types share one server statement on a
/// connection (connections serve one tenant between resets).
fn server_statement_name(definition: &[u8]) -> String {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    definition.hash(&mut h);
    format!("pgt_s{:016x}", h.finish())
}

fn encode_parse(name: &str, definition: &[u8], out: &mut BytesMut) {
    encode::message(tag::PARSE, out, |b| {
        b.extend_from_slice(name.as_bytes());
        b.put_u8(0);
        b.extend_from_slice(definition);
    });
}

impl Relay {
    pub(super) fn pooled(&self) -> bool {
        self.rules.policy.prepared_prefix.is_some()
    }

    /// What a server connection needs before the client's next transaction may run on it,
    /// when its session state is not the client's: pgtenant's constant setup SQL (after
    /// `RESET ALL`) and the client's settings, and the verified token, as `(setting, value)`
    /// parameters. The caller runs it and waits for it, so a failure never lets the client's
    /// statements run on a connection in the wrong state.
    pub fn setup_for(&mut self, pooled: &PooledState) -> Option<(String, Vec<(String, String)>)> {
        let mine = self.settings_key();
        if pooled.settings_of.as_deref() == Some(&*mine) {
            return None;
        }
        let sql = crate::own_sql::reset_settings_then(&self.rules.rebind_sql);
        let mut pairs: Vec<(String, String)> = self.rules.startup_settings.clone();
        for (_, replay) in &self.session.settings {
            pairs.extend(replay.iter().cloned());
        }
        if self.rules.binding.verified {
            pairs.push((
                crate::tenant::context::CONTEXT_SETTING.to_owned(),
                pooled
                    .token_for(&self.rules.binding.tenant_id)
                    .unwrap_or_default()
                    .to_owned(),
            ));
        }
        Some((sql, pairs))
    }

    /// The setup from [`Relay::setup_for`] ran on the connection.
    pub fn setup_done(&mut self, pooled: &mut PooledState) {
        pooled.settings_of = Some(self.settings_key());
    }

    /// Runs when a server connection is attached for the client's next transaction (after
    /// any reset and setup, which the caller ran): deallocates overflow statements and, unless
    /// the setup just bound it, binds the tenant context with the first statement.
    pub fn attach(
        &mut self,
        out: &mut BytesMut,
        tracker: &mut ConnTracker,
        pooled: &mut PooledState,
        bound_now: bool,
    ) {
        pooled.used = true;
        let overflow = pooled.prepared.overflow();
        if !overflow.is_empty() {
            let sql: Vec<String> = overflow
                .iter()
                .map(|n| format!("DEALLOCATE {}", quote_ident(n)))
                .collect();
            self.inject_query(out, tracker, &sql.join("; "));
        }
        self.settle_unnamed(pooled);
        pooled.last_client = Some(self.rules.client_id);
        // Shared and schema placements bind the context at the start of every transaction
        // (the security contract's S1). A dedicated placement's connections serve its tenant
        // only: the binding its setup ran stays (the guard refuses changing it, and a RESET
        // or DISCARD rebinds at once), so its transactions carry no SET.
        self.binding_due = !bound_now && self.rules.policy.scope == Scope::Tenant;
    }

    /// Records on this connection that pgtenant's own simple Query, just queued, drops its
    /// unnamed statement. Called before the relay lets go of `pooled`, so the mark never
    /// reaches another connection.
    pub(super) fn settle_unnamed(&mut self, pooled: &mut PooledState) {
        if std::mem::take(&mut self.session.unnamed_dropped) {
            pooled.unnamed = None;
        }
    }

    /// The key of the client's session state (see [`settings_key`]).
    pub fn settings_key(&mut self) -> Arc<str> {
        let s = &mut self.session;
        let rules = &self.rules;
        Arc::clone(s.key.get_or_insert_with(|| {
            let startup = rules
                .startup_settings
                .iter()
                .map(|(k, v)| format!("{}:{k}={v}", k.len()));
            let setup = std::iter::once(rules.rebind_sql.clone())
                .chain(startup)
                .collect::<Vec<_>>()
                .join("\0");
            let replay: Vec<String> = s
                .settings
                .iter()
                .flat_map(|(_, pairs)| pairs.iter().map(|(k, v)| format!("{}:{k}={v}", k.len())))
                .collect();
            settings_key(&setup, replay.iter().map(String::as_str))
        }))
    }

    /// The query text of the client's statement `name`, if it prepared one.
    pub(super) fn statement_text(&self, name: &[u8]) -> Option<&[u8]> {
        let statement = self
            .session
            .statements
            .get(String::from_utf8_lossy(name).as_ref())?;
        take_cstr(&statement.definition).map(|(text, _)| text)
    }

    /// Transaction pooling: a Parse, Bind, Describe or Close, renamed into pgtenant's
    /// statement names. Returns the bytes to send instead, if any (possibly preceded by a
    /// Parse creating the statement on this connection).
    pub(super) fn pooled_message(
        &mut self,
        t: u8,
        body: &[u8],
        pooled: &mut PooledState,
        effects: Vec<Effect>,
    ) -> Option<BytesMut> {
        if !self.pooled() {
            return None;
        }
        let epoch = self.next_epoch;
        match t {
            tag::PARSE => {
                let (name, definition) = take_cstr(body)?;
                if name.is_empty() {
                    self.session.parses.push_back((epoch, Reply::Client, None));
                    self.session.unnamed_effects = effects;
                    let s = &mut self.session;
                    s.unnamed_generation += 1;
                    // The previous unnamed statement's buffer holds the new text.
                    let mut text = s.unnamed.take().map(|(t, _)| t).unwrap_or_default();
                    text.clear();
                    text.extend_from_slice(definition);
                    s.unnamed = Some((text, s.unnamed_generation));
                    s.unnamed_unconfirmed
                        .push_back((epoch, s.unnamed_generation));
                    s.unnamed_dropped = false;
                    pooled.unnamed = Some((self.rules.client_id, s.unnamed_generation));
                    return None;
                }
                let name = String::from_utf8_lossy(name).into_owned();
                let server_name = self
                    .session
                    .next_server_name
                    .take()
                    .unwrap_or_else(|| server_statement_name(definition));
                self.session.statement_bytes += definition.len();
                let replaced = self.session.statements.insert(
                    name,
                    Statement {
                        server_name: server_name.clone(),
                        definition: definition.to_vec(),
                        effects,
                    },
                );
                if let Some(old) = replaced {
                    self.session.statement_bytes -= old.definition.len();
                }
                let mut out = self.out_buf();
                if pooled.prepared.contains(&server_name) {
                    encode::message(tag::CLOSE, &mut out, |b| {
                        b.put_u8(b'S');
                        b.extend_from_slice(NO_STATEMENT);
                    });
                    self.session.closes.push_back((epoch, Reply::AsParse));
                } else {
                    encode_parse(&server_name, definition, &mut out);
                    self.session.parses.push_back((
                        epoch,
                        Reply::Client,
                        Some(server_name.clone()),
                    ));
                    pooled.prepared.insert(&server_name);
                    self.session.created.push((epoch, server_name));
                }
                Some(out)
            }
            tag::BIND => {
                let (portal, rest) = take_cstr(body)?;
                let (name, params) = take_cstr(rest)?;
                let effects = if name.is_empty() {
                    &self.session.unnamed_effects
                } else {
                    self.session
                        .statements
                        .get(String::from_utf8_lossy(name).as_ref())
                        .map_or(&[][..], |s| &s.effects[..])
                };
                if !effects.is_empty() {
                    let effects = effects.to_vec();
                    self.session.pending_effects.extend(effects);
                }
                if name.is_empty() {
                    let prefix = &body[..portal.len() + 1];
                    return self.unnamed_message(t, body, pooled, prefix, params);
                }
                if self.unknown_statement(name) {
                    return Some(replace_statement_name(t, &body[..portal.len() + 1], params));
                }
                let mut out = self.out_buf();
                self.ensure_statement(name, pooled, &mut out, |server_name, out| {
                    encode::message(tag::BIND, out, |b| {
                        b.extend_from_slice(portal);
                        b.put_u8(0);
                        b.extend_from_slice(server_name.as_bytes());
                        b.put_u8(0);
                        b.extend_from_slice(params);
                    });
                })?;
                Some(out)
            }
            tag::DESCRIBE | tag::CLOSE => {
                let (&kind, rest) = body.split_first()?;
                if t == tag::CLOSE {
                    self.session.closes.push_back((epoch, Reply::Client));
                }
                if kind != b'S' {
                    return None;
                }
                let (name, _) = take_cstr(rest)?;
                if name.is_empty() {
                    if t == tag::CLOSE {
                        // Closing the unnamed statement: the client has none any more.
                        self.session.unnamed = None;
                        pooled.unnamed = None;
                        return None;
                    }
                    let after = rest.get(name.len()..).unwrap_or_default();
                    return self.unnamed_message(t, body, pooled, b"S", after);
                }
                if t == tag::DESCRIBE && self.unknown_statement(name) {
                    return Some(replace_statement_name(
                        t,
                        b"S",
                        rest.get(name.len()..).unwrap_or_default(),
                    ));
                }
                if t == tag::CLOSE {
                    // The server statement stays in the connection's cache for others.
                    if let Some(old) = self
                        .session
                        .statements
                        .remove(String::from_utf8_lossy(name).as_ref())
                    {
                        self.session.statement_bytes -= old.definition.len();
                    }
                    let mut out = self.out_buf();
                    encode::message(tag::CLOSE, &mut out, |b| {
                        b.put_u8(b'S');
                        b.extend_from_slice(NO_STATEMENT);
                    });
                    return Some(out);
                }
                let mut out = self.out_buf();
                self.ensure_statement(name, pooled, &mut out, |server_name, out| {
                    encode::message(tag::DESCRIBE, out, |b| {
                        b.put_u8(b'S');
                        b.extend_from_slice(server_name.as_bytes());
                        b.put_u8(0);
                    });
                })?;
                Some(out)
            }
            _ => None,
        }
    }

    /// A Bind or Describe (`t`, `body`) of the unnamed statement. When the client has one
    /// and this connection holds another (or none), a Parse re-creating it goes first (its
    /// reply consumed). When the client has none and the connection holds another client's,
    /// the message is replaced (`prefix`, `rest`: see [`replace_statement_name`]) and
    /// answered as PostgreSQL does.
    fn unnamed_message(
        &mut self,
        t: u8,
        body: &[u8],
        pooled: &mut PooledState,
        prefix: &[u8],
        rest: &[u8],
    ) -> Option<BytesMut> {
        let me = self.rules.client_id;
        self.settle_unnamed(pooled);
        match &self.session.unnamed {
            // The connection holds it already: the message goes as it is.
            Some((_, generation)) if pooled.unnamed == Some((me, *generation)) => None,
            Some((definition, generation)) => {
                let generation = *generation;
                let mut out = self.spare.pop().unwrap_or_default();
                out.clear();
                encode_parse("", definition, &mut out);
                self.session
                    .parses
                    .push_back((self.next_epoch, Reply::Proxy, None));
                pooled.unnamed = Some((me, generation));
                encode::raw(t, body, &mut out);
                Some(out)
            }
            // No unnamed statement of the client's: the server may answer for its own only
            // when the connection holds no other client's.
            None if pooled.unnamed.is_none_or(|(client, _)| client == me) => None,
            None => self.no_unnamed(t, prefix, rest),
        }
    }

    /// The client's Bind or Describe of an unnamed statement it does not have, on a
    /// connection holding another client's: answered as PostgreSQL does, never reaching it.
    fn no_unnamed(&mut self, t: u8, prefix: &[u8], rest: &[u8]) -> Option<BytesMut> {
        self.counters.refused += 1;
        self.refuse(
            self.next_epoch,
            crate::error::ClientError::error(
                crate::error::sqlstate::INVALID_SQL_STATEMENT_NAME,
                "unnamed prepared statement does not exist",
            ),
        );
        Some(replace_statement_name(t, prefix, rest))
    }

    /// The client's Parse-prepared statement that SQL names `server_name` (its name in the
    /// client's SQL namespace).
    fn protocol_statement(&self, server_name: &str) -> Option<&Statement> {
        let prefix = self.rules.policy.prepared_prefix.as_deref()?;
        self.session
            .statements
            .get(server_name.strip_prefix(prefix)?)
    }

    /// A simple Query reached the connection: PostgreSQL drops the unnamed statement.
    pub(super) fn query_sent(&mut self, pooled: &mut PooledState, by_client: bool) {
        if by_client {
            self.session.unnamed = None;
        }
        pooled.unnamed = None;
    }

    /// Transaction pooling: the refusal for a Parse of `name` with `definition` (after the
    /// name) that would take the client's statements past their bounds.
    pub(super) fn statement_over_limit(&self, name: &[u8], definition: &[u8]) -> Option<String> {
        if !self.pooled() || name.is_empty() {
            return None;
        }
        let s = &self.session;
        let existing = s.statements.get(String::from_utf8_lossy(name).as_ref());
        let freed = existing.map_or(0, |old| old.definition.len());
        if existing.is_none() && s.statements.len() >= MAX_STATEMENTS {
            return Some(format!(
                "this session holds {MAX_STATEMENTS} prepared statements, the limit through pgtenant; close some first"
            ));
        }
        if s.statement_bytes - freed + definition.len() > MAX_STATEMENT_BYTES {
            return Some(format!(
                "this session's prepared statements would exceed {} MiB of text, the limit through pgtenant; close some first",
                MAX_STATEMENT_BYTES >> 20
            ));
        }
        None
    }

    /// Transaction pooling: the refusal for a Query whose effects would take the client's
    /// SQL prepared statements or recorded settings past their bounds.
    pub(super) fn effects_over_limit(&self, effects: &[Effect]) -> Option<String> {
        if !self.pooled() {
            return None;
        }
        let s = &self.session;
        let prepares = effects
            .iter()
            .filter(|e| matches!(e, Effect::Prepare { server_name, .. } if !s.sql_prepared.contains_key(server_name)))
            .count();
        if prepares > 0 && s.sql_prepared.len() + prepares > MAX_SQL_PREPARED {
            return Some(format!(
                "this session holds {MAX_SQL_PREPARED} SQL prepared statements, the limit through pgtenant; DEALLOCATE some first"
            ));
        }
        let channels = effects
            .iter()
            .filter(|e| matches!(e, Effect::Listen(c) if !s.channels.contains(c)))
            .count();
        if channels > 0 && s.channels.len() + channels > MAX_CHANNELS {
            return Some(format!(
                "this session listens on {MAX_CHANNELS} channels, the limit through pgtenant; UNLISTEN some first"
            ));
        }
        if channels > 0 && self.rules.tenant.channels() + channels > MAX_TENANT_CHANNELS {
            return Some(format!(
                "this tenant's sessions listen on {MAX_TENANT_CHANNELS} channels together, the limit through pgtenant; UNLISTEN some first"
            ));
        }
        let settings = effects
            .iter()
            .filter(|e| matches!(e, Effect::Set { key, .. } if !s.settings.iter().any(|(k, _)| k == key)))
            .count();
        if settings > 0 && s.settings.len() + settings > MAX_SETTINGS {
            return Some(format!(
                "this session has set {MAX_SETTINGS} settings, the limit through pgtenant"
            ));
        }
        None
    }

    /// Whether `name` (non-empty) is a statement the client never prepared: if so the
    /// message is answered with PostgreSQL's 26000, and never reaches a statement of
    /// pgtenant's or of another client.
    fn unknown_statement(&mut self, name: &[u8]) -> bool {
        if name.is_empty()
            || self
                .session
                .statements
                .contains_key(String::from_utf8_lossy(name).as_ref())
        {
            return false;
        }
        self.counters.refused += 1;
        let shown = String::from_utf8_lossy(name).into_owned();
        self.refuse(
            self.next_epoch,
            crate::error::ClientError::error(
                crate::error::sqlstate::INVALID_SQL_STATEMENT_NAME,
                format!("prepared statement \"{shown}\" does not exist"),
            ),
        );
        true
    }

    /// Transaction pooling: the client name of an `EXECUTE` in `effects` that names no
    /// statement the client prepared (earlier, or in the same text before it).
    pub(super) fn unknown_execute(&self, effects: &[Effect]) -> Option<String> {
        let prefix = self.rules.policy.prepared_prefix.as_deref()?;
        let mut prepared_here = Vec::new();
        for effect in effects {
            match effect {
                Effect::Prepare { server_name, .. } => prepared_here.push(server_name.as_str()),
                Effect::Execute(server_name)
                    if !self.session.sql_prepared.contains_key(server_name)
                        && !prepared_here.contains(&server_name.as_str()) =>
                {
                    return Some(
                        server_name
                            .strip_prefix(prefix)
                            .unwrap_or(server_name)
                            .to_owned(),
                    );
                }
                _ => {}
            }
        }
        None
    }

    /// The server name of the client's statement `name`, creating it on this connection
    /// first (into `out`) when needed. `None` for names the client never prepared (the
    /// server reports them).
    fn ensure_statement(
        &mut self,
        name: &[u8],
        pooled: &mut PooledState,
        out: &mut BytesMut,
        then: impl FnOnce(&str, &mut BytesMut),
    ) -> Option<()> {
        if name.is_empty() {
            return None;
        }
        let epoch = self.next_epoch;
        let session = &mut self.session;
        let statement = session
            .statements
            .get(String::from_utf8_lossy(name).as_ref())?;
        if !pooled.prepared.contains(&statement.server_name) {
            encode_parse(&statement.server_name, &statement.definition, out);
            session
                .parses
                .push_back((epoch, Reply::Proxy, Some(statement.server_name.clone())));
            pooled.prepared.insert(&statement.server_name);
            session.created.push((epoch, statement.server_name.clone()));
        }
        then(&statement.server_name, out);
        Some(())
    }

    /// What `pg_prepared_statements` becomes for this client: the server's view joined to the
    /// client's own statements, under the client's names (never another client's statements
    /// or pgtenant's own). SQL-prepared ones show their PREPARE statement with the client's
    /// name (PostgreSQL shows the whole query string that carried it).
    /// `itself`: the statement being prepared, `(name, server name)`, which is in the view.
    pub(super) fn prepared_view_sql(&self, itself: Option<&(String, String)>) -> String {
        let prefix = self
            .rules
            .policy
            .prepared_prefix
            .as_deref()
            .unwrap_or_default();
        let mut rows: Vec<String> = Vec::new();
        if let Some((name, server_name)) = itself {
            rows.push(format!(
                "({}, {}, NULL)",
                quote_literal(name),
                quote_literal(server_name)
            ));
        }
        for (name, statement) in &self.session.statements {
            if itself.is_some_and(|(n, _)| n == name) {
                // Replaced by the statement being prepared.
                continue;
            }
            rows.push(format!(
                "({}, {}, NULL)",
                quote_literal(name),
                quote_literal(&statement.server_name)
            ));
        }
        for (server_name, sql) in &self.session.sql_prepared {
            // The PREPARE as the client wrote it (the server's copy is pgtenant's text).
            let name = server_name.strip_prefix(prefix).unwrap_or(server_name);
            let shown = sql.replacen(&quote_ident(server_name), &quote_if_needed(name), 1);
            rows.push(format!(
                "({}, {}, {})",
                quote_literal(name),
                quote_literal(server_name),
                quote_literal(&shown)
            ));
        }
        if rows.is_empty() {
            return "(SELECT NULL::pg_catalog.text AS name, NULL::pg_catalog.text AS statement, \
                    NULL::pg_catalog.timestamptz AS prepare_time, \
                    NULL::pg_catalog.regtype[] AS parameter_types, NULL::pg_catalog.bool AS from_sql, \
                    NULL::pg_catalog.int8 AS generic_plans, NULL::pg_catalog.int8 AS custom_plans \
                    WHERE false)"
                .into();
        }
        format!(
            "(SELECT m.name, COALESCE(m.shown, p.statement) AS statement, \
                  p.prepare_time, p.parameter_types, p.from_sql, p.generic_plans, p.custom_plans \
             FROM pg_catalog.pg_prepared_statements p \
             JOIN (VALUES {}) AS m(name, server_name, shown) ON p.name OPERATOR(pg_catalog.=) m.server_name)",
            rows.join(", ")
        )
    }

    /// A server statement name for this client alone (`pgt_v<client>_<n>`).
    pub(super) fn own_server_name(&mut self) -> String {
        self.session.own_names += 1;
        format!("pgt_v{}_{}", self.rules.client_id, self.session.own_names)
    }

    /// Creates every statement of the client's on this connection (for its view of
    /// `pg_prepared_statements`).
    fn create_all_statements(
        &mut self,
        out: &mut BytesMut,
        tracker: &mut ConnTracker,
        pooled: &mut PooledState,
    ) {
        let names: Vec<String> = self.session.statements.keys().cloned().collect();
        for name in names {
            self.ensure_statement(name.as_bytes(), pooled, out, |_, _| {});
        }
        let missing: Vec<(String, String)> = self
            .session
            .sql_prepared
            .iter()
            .filter(|(server_name, _)| !pooled.prepared.contains(server_name))
            .map(|(n, sql)| (n.clone(), sql.clone()))
            .collect();
        for (server_name, sql) in missing {
            self.inject_query(out, tracker, &sql);
            pooled.prepared.insert(&server_name);
        }
    }

    /// Before a client Query with session effects is sent: statements it needs are created
    /// first, stale ones of the same name dropped.
    pub(super) fn before_query(
        &mut self,
        effects: &[Effect],
        out: &mut BytesMut,
        tracker: &mut ConnTracker,
        pooled: &mut PooledState,
    ) {
        if std::mem::take(&mut self.session.resync) {
            self.inject_query(out, tracker, "DEALLOCATE ALL");
            pooled.prepared.clear();
        }
        for effect in effects {
            match effect {
                // A stale statement of an earlier client session, not this one's: drop it.
                Effect::Prepare { server_name, .. }
                    if pooled.prepared.contains(server_name)
                        && !self.session.sql_prepared.contains_key(server_name) =>
                {
                    self.inject_query(
                        out,
                        tracker,
                        &format!("DEALLOCATE {}", quote_ident(server_name)),
                    );
                    pooled.prepared.remove(server_name);
                }
                // Statements the session has must exist here: EXECUTE and DEALLOCATE find
                // them, and preparing one again fails as it would on PostgreSQL.
                Effect::Prepare { server_name, .. }
                | Effect::Execute(server_name)
                | Effect::Deallocate(server_name)
                    if !pooled.prepared.contains(server_name) =>
                {
                    if let Some(sql) = self.session.sql_prepared.get(server_name).cloned() {
                        self.inject_query(out, tracker, &sql);
                        pooled.prepared.insert(server_name);
                    } else if let Effect::Deallocate(_) = effect
                        && let Some(statement) = self.protocol_statement(server_name)
                    {
                        // SQL DEALLOCATE of a statement the client prepared with Parse (as
                        // psycopg's cache does): create it under the name the DEALLOCATE
                        // uses, so that it succeeds as on PostgreSQL.
                        let definition = statement.definition.clone();
                        let epoch = self.next_epoch;
                        encode_parse(server_name, &definition, out);
                        self.session.parses.push_back((epoch, Reply::Proxy, None));
                        tracker.client_message(tag::PARSE);
                        encode::raw(tag::SYNC, b"", out);
                        self.open_epoch(super::Owner::Proxy, tracker, tag::SYNC);
                    }
                }
                // Statements prepared after this in the same pipeline must survive it, so the
                // maps are cleared now, in message order, not when the reply arrives.
                Effect::DiscardAll | Effect::DeallocateAll => {
                    self.session.statements.clear();
                    self.session.statement_bytes = 0;
                    self.session.sql_prepared.clear();
                    pooled.prepared.clear();
                    self.session.cleared.push(self.next_epoch);
                    if matches!(effect, Effect::DiscardAll) {
                        self.forget_channels();
                    }
                }
                Effect::PreparedView => self.create_all_statements(out, tracker, pooled),
                Effect::Listen(channel) => {
                    if self.session.channels.insert(channel.clone()) {
                        self.rules.tenant.count_channels(1, true);
                    }
                    self.listens.push(channel.clone());
                }
                Effect::Unlisten(channel) => {
                    if self.session.channels.remove(channel) {
                        self.rules.tenant.count_channels(1, false);
                    }
                    self.unlistens.push(Some(channel.clone()));
                }
                Effect::UnlistenAll => self.forget_channels(),
                _ => {}
            }
        }
    }

    /// The client no longer listens on anything.
    pub(super) fn forget_channels(&mut self) {
        let n = self.session.channels.len();
        self.session.channels.clear();
        self.rules.tenant.count_channels(n, false);
        self.unlistens.push(None);
    }

    /// After the Query is sent: its effects wait for the epoch's outcome; a LISTEN is undone
    /// on the pooled connection at once (notifications come through the tenant's hub). A
    /// statement that leaves session state on the server pins the connection from now on.
    pub(super) fn after_query(
        &mut self,
        epoch: u64,
        effects: Vec<Effect>,
        out: &mut BytesMut,
        tracker: &mut ConnTracker,
    ) {
        if self.session.pinned.is_none()
            && let Some(reason) = effects.iter().find_map(|e| match e {
                Effect::Pin(r) => Some(*r),
                _ => None,
            })
        {
            tracing::info!(
                client = self.rules.client_id,
                reason,
                "server connection pinned to its client until it leaves or runs DISCARD ALL"
            );
            self.audit_pin(reason);
            self.rules
                .tenant
                .stats
                .pinned
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            self.session.pinned = Some(reason);
        }
        let listened: Vec<String> = effects
            .iter()
            .filter_map(|e| match e {
                Effect::Listen(c) => Some(crate::own_sql::unlisten(c)),
                _ => None,
            })
            .collect();
        if !listened.is_empty() {
            self.inject_query(out, tracker, &listened.join("; "));
        }
        self.session.effects.push_back((epoch, effects));
    }

    /// At the ReadyForQuery closing `epoch` (`status`: the transaction status it reported):
    /// apply its effects if it succeeded, undo its statement creations the server never
    /// confirmed if it failed, and drop replies that will never come. Setting changes made
    /// in a transaction block wait for its end and are dropped if it rolls back.
    pub(super) fn close_epoch(
        &mut self,
        epoch: u64,
        failed: bool,
        status: TxStatus,
        pooled: &mut PooledState,
    ) {
        self.session.parses.retain(|(e, _, _)| *e > epoch);
        self.session.closes.retain(|(e, _)| *e > epoch);
        let created: Vec<String> = self
            .session
            .created
            .iter()
            .filter(|(e, _)| *e <= epoch)
            .map(|(_, n)| n.clone())
            .collect();
        self.session.created.retain(|(e, _)| *e > epoch);
        if failed {
            for name in created {
                pooled.prepared.remove(&name);
            }
            if self.session.cleared.contains(&epoch) {
                self.session.resync = true;
            }
        }
        self.session.cleared.retain(|e| *e > epoch);
        while let Some(&(e, generation)) = self.session.unnamed_unconfirmed.front()
            && e <= epoch
        {
            // Never confirmed: the Parse failed (or was skipped), and PostgreSQL dropped the
            // previous unnamed statement when it began.
            self.session.unnamed_unconfirmed.pop_front();
            if self
                .session
                .unnamed
                .as_ref()
                .is_some_and(|(_, g)| *g >= generation)
            {
                self.session.unnamed = None;
            }
        }
        while self
            .session
            .effects
            .front()
            .is_some_and(|(e, _)| *e <= epoch)
        {
            let Some((e, effects)) = self.session.effects.pop_front() else {
                break;
            };
            let epoch_failed = failed && e == epoch;
            for effect in effects {
                self.transaction_effect(effect, epoch_failed, pooled);
            }
        }
        let s = &mut self.session;
        match status {
            TxStatus::Idle => {
                // The transaction is over: committed unless it failed or was rolled back.
                let staged = std::mem::take(&mut s.staged);
                let committed = !std::mem::take(&mut s.tx_failed) && !failed;
                s.savepoints.clear();
                if committed {
                    for effect in staged {
                        self.commit_effect(effect, pooled);
                    }
                }
            }
            TxStatus::Failed => s.tx_failed = true,
            TxStatus::InTransaction => {}
        }
    }

    /// One effect of an epoch that ended (`failed`: with an error, so only its savepoints
    /// count: the server kept those it made before the error).
    fn transaction_effect(&mut self, effect: Effect, failed: bool, pooled: &mut PooledState) {
        let s = &mut self.session;
        match effect {
            Effect::Savepoint(name) => s.savepoints.push((name, s.staged.len())),
            _ if failed => {}
            Effect::Set { .. }
            | Effect::Reset(_)
            | Effect::ResetAll
            | Effect::DiscardAll
            | Effect::Notify { .. } => s.staged.push(effect),
            Effect::Rollback => {
                s.staged.clear();
                s.savepoints.clear();
                s.tx_failed = false;
            }
            Effect::RollbackTo(name) => {
                if let Some(i) = s.savepoints.iter().rposition(|(n, _)| *n == name) {
                    s.staged.truncate(s.savepoints[i].1);
                    s.savepoints.truncate(i + 1);
                }
                s.tx_failed = false;
            }
            Effect::Release(name) => {
                if let Some(i) = s.savepoints.iter().rposition(|(n, _)| *n == name) {
                    s.savepoints.truncate(i);
                }
            }
            Effect::CommitChain => {
                s.savepoints.clear();
                for effect in std::mem::take(&mut s.staged) {
                    self.commit_effect(effect, pooled);
                }
            }
            other => self.apply_effect(other, pooled),
        }
    }

    /// An effect of a transaction that committed: a NOTIFY on a channel the client listens
    /// on is shown to it before the ReadyForQuery (once per channel and payload, as
    /// PostgreSQL folds duplicates within a transaction); the rest is applied.
    fn commit_effect(&mut self, effect: Effect, pooled: &mut PooledState) {
        match effect {
            Effect::Notify { channel, payload } => {
                let s = &mut self.session;
                let note = (channel, payload);
                if !s.committed_notes.contains(&note) && s.committed_notes.len() < 64 {
                    s.committed_notes.push(note.clone());
                }
                if s.channels.contains(&note.0) && !s.notify_now.contains(&note) {
                    s.notify_now.push(note);
                }
            }
            other => self.apply_effect(other, pooled),
        }
    }

    /// Shows the notifications the client's committed transaction sent itself, before the
    /// ReadyForQuery about to be forwarded; their copies from the hub will be skipped.
    pub(super) fn own_notifications(&mut self, virtual_pid: i32, to_client: &mut BytesMut) {
        let prefix = self.rules.notify_prefix.clone().unwrap_or_default();
        for (channel, payload) in std::mem::take(&mut self.session.notify_now) {
            let shown = channel.strip_prefix(&prefix).unwrap_or(&channel);
            encode::notification(virtual_pid, shown, &payload, to_client);
            if self.session.local_sent.len() >= 1024 {
                self.session.local_sent.pop_front();
            }
            self.session.local_sent.push_back((channel, payload));
        }
    }

    /// The notifications the client's transactions committed since last asked.
    pub fn take_committed_notes(&mut self) -> Vec<(String, String)> {
        std::mem::take(&mut self.session.committed_notes)
    }

    /// Whether the hub's notification `channel`/`payload` is the copy of one the client was
    /// shown already (its own, before its ReadyForQuery). Matched by channel and payload
    /// only, once per own notification: the pid the hub credits can be another client's when
    /// the hub reads the notification before the client's commit is recorded (seen once in
    /// CI under load), and skipping by count keeps the client from seeing its own twice.
    pub fn shown_already(&mut self, channel: &str, payload: &str) -> bool {
        let s = &mut self.session;
        match s
            .local_sent
            .iter()
            .position(|(c, p)| c == channel && p == payload)
        {
            Some(i) => {
                s.local_sent.remove(i);
                true
            }
            None => false,
        }
    }

    fn apply_effect(&mut self, effect: Effect, pooled: &mut PooledState) {
        let s = &mut self.session;
        let mut settings_changed = false;
        match effect {
            Effect::Set { key, pairs } => {
                s.settings.retain(|(k, _)| *k != key);
                s.settings.push((key, pairs));
                settings_changed = true;
            }
            Effect::Reset(key) => {
                s.settings.retain(|(k, _)| *k != key);
                settings_changed = true;
            }
            Effect::ResetAll => {
                s.settings.clear();
                settings_changed = true;
            }
            Effect::DiscardAll => {
                s.settings.clear();
                settings_changed = true;
                if let Some(reason) = s.pinned.take() {
                    self.rules
                        .tenant
                        .stats
                        .pinned
                        .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
                    tracing::info!(
                        client = self.rules.client_id,
                        reason,
                        "DISCARD ALL: server connection unpinned"
                    );
                }
            }
            Effect::Prepare { server_name, sql } => {
                pooled.prepared.insert(&server_name);
                s.sql_prepared.insert(server_name, sql);
            }
            Effect::Deallocate(server_name) => {
                pooled.prepared.remove(&server_name);
                if s.sql_prepared.remove(&server_name).is_none() {
                    // A statement prepared with Parse, deallocated with SQL.
                    let client_name = self
                        .rules
                        .policy
                        .prepared_prefix
                        .as_deref()
                        .and_then(|p| server_name.strip_prefix(p))
                        .unwrap_or_default();
                    if let Some(old) = s.statements.remove(client_name) {
                        s.statement_bytes -= old.definition.len();
                    }
                }
            }
            Effect::DeallocateAll
            | Effect::Execute(_)
            | Effect::Listen(_)
            | Effect::Unlisten(_)
            | Effect::UnlistenAll
            | Effect::Rollback
            | Effect::CommitChain
            | Effect::Savepoint(_)
            | Effect::RollbackTo(_)
            | Effect::Release(_)
            | Effect::PreparedView
            | Effect::Notify { .. }
            | Effect::Pin(_) => {}
        }
        if settings_changed {
            s.key = None;
            // The connection that ran the change has it applied already.
            pooled.settings_of = Some(self.settings_key());
        }
    }

    /// How a server ParseComplete or CloseComplete is shown to the client: `None` to
    /// consume it, `Some(tag)` to forward it as that message type.
    pub(super) fn reply_for(&mut self, t: u8) -> Option<u8> {
        let reply = if t == tag::PARSE_COMPLETE {
            let Some((epoch, reply, created)) = self.session.parses.pop_front() else {
                return Some(t);
            };
            if reply == Reply::Client && created.is_none() {
                // The client's unnamed Parse succeeded.
                self.session.unnamed_unconfirmed.pop_front();
            }
            if let Some(name) = created {
                // The statement exists on the server now, whatever happens to its epoch.
                if let Some(i) = self
                    .session
                    .created
                    .iter()
                    .position(|(e, n)| *e == epoch && *n == name)
                {
                    self.session.created.swap_remove(i);
                }
            }
            reply
        } else {
            let Some((_, reply)) = self.session.closes.pop_front() else {
                return Some(t);
            };
            reply
        };
        match reply {
            Reply::Client => Some(t),
            Reply::Proxy => None,
            Reply::AsParse => Some(tag::PARSE_COMPLETE),
        }
    }
}
