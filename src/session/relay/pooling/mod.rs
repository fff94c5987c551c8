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
use crate::tenant::{quote_ident, quote_literal};

use super::{NO_STATEMENT, replace_statement_name};

mod effects;
mod statements;
mod view;

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
    /// Bytes of the statements' definitions, of both kinds (bounded: [`MAX_STATEMENT_BYTES`]).
    statement_bytes: usize,
    /// Channels the client listens on (bounded: [`MAX_CHANNELS`]).
    channels: std::collections::HashSet<String>,
    /// SQL-level prepared statements by server name.
    sql_prepared: HashMap<String, SqlPrepared>,
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

/// A statement the client prepared with SQL: the PREPARE that creates it on a server
/// connection (pgtenant's text) and the one the client wrote (shown in its view).
#[derive(Debug)]
pub(super) struct SqlPrepared {
    pub(super) sql: String,
    pub(super) shown: String,
}

impl SqlPrepared {
    /// What it counts against the session's statement budget ([`MAX_STATEMENT_BYTES`]).
    pub(super) fn bytes(&self) -> usize {
        self.sql.len() + self.shown.len()
    }
}

/// A statement the text being checked creates, which its own view of
/// `pg_prepared_statements` shows (as PostgreSQL does when the statement runs).
pub(super) struct OwnStatement {
    pub(super) name: String,
    pub(super) server_name: String,
    /// The client's text of a SQL PREPARE; none for a protocol Parse (the server's text).
    pub(super) shown: Option<String>,
}

/// Per-client bounds on the session state pgtenant keeps for transaction pooling (DESIGN.md
/// §5 S5): named protocol statements, the bytes of their text, SQL-level prepared statements,
/// recorded settings, and what an open transaction holds. Past them the statement is refused
/// with 53400 and nothing is kept.
pub(super) const MAX_STATEMENTS: usize = 10_000;
pub(super) const MAX_STATEMENT_BYTES: usize = 16 << 20;
pub(super) const MAX_SQL_PREPARED: usize = 10_000;
pub(super) const MAX_SETTINGS: usize = 500;
/// Bytes of the settings a client has made (names and values), replayed on every
/// connection it moves to: custom `x.y` settings take any value.
pub(super) const MAX_SETTING_BYTES: usize = 1 << 20;
/// Changes a transaction holds until it ends (settings, notifications, savepoints), and their
/// bytes: a transaction can be kept open for as long as the client likes.
pub(super) const MAX_STAGED: usize = 10_000;
pub(super) const MAX_STAGED_BYTES: usize = 16 << 20;

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

/// What a change a transaction holds until it ends costs, for [`MAX_STAGED_BYTES`]; none
/// for an effect that is not held.
pub(super) fn staged_bytes(effect: &Effect) -> Option<usize> {
    match effect {
        Effect::Set { key, pairs } => Some(setting_bytes(key, pairs)),
        Effect::Reset(key) | Effect::Savepoint(key) => Some(key.len()),
        Effect::Notify { channel, payload } => Some(channel.len() + payload.len()),
        Effect::ResetAll | Effect::DiscardAll => Some(0),
        _ => None,
    }
}

/// A recorded setting's bytes, for [`MAX_SETTING_BYTES`].
pub(super) fn setting_bytes(key: &str, pairs: &[(String, String)]) -> usize {
    key.len() + pairs.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>()
}

impl Relay {
    pub(super) fn pooled(&self) -> bool {
        self.rules.policy.prepared_prefix.is_some()
    }

    /// The client's name for the server-side statement name `server_name`.
    pub(super) fn client_statement_name<'a>(&self, server_name: &'a str) -> &'a str {
        self.rules
            .policy
            .prepared_prefix
            .as_deref()
            .and_then(|p| server_name.strip_prefix(p))
            .unwrap_or(server_name)
    }

    /// What a server connection needs before the client's next transaction may run on it,
    /// when its session state is not the client's: pgtenant's constant setup SQL (after
    /// `RESET ALL`) and the client's settings, and the verified token, as `(setting, value)`
    /// parameters. The caller runs it and waits for it, so a failure never lets the client's
    /// statements run on a connection in the wrong state.
    pub fn setup_for(
        &mut self,
        pooled: &mut PooledState,
    ) -> Option<(String, Vec<(String, String)>)> {
        if !self.needs_setup(pooled) {
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

    /// Whether the connection's session state is not the client's (see [`Relay::setup_for`]).
    pub fn needs_setup(&mut self, pooled: &mut PooledState) -> bool {
        let mine = self.settings_key_ref();
        match &pooled.settings_of {
            // Set up last by this session (the same key).
            Some(of) if Arc::ptr_eq(of, mine) => false,
            // By another with the same settings: the connection carries this session's key
            // from now on, so its next transactions there compare pointers, not the text.
            Some(of) if **of == **mine => {
                pooled.settings_of = Some(Arc::clone(mine));
                false
            }
            _ => true,
        }
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
        Arc::clone(self.settings_key_ref())
    }

    /// [`Relay::settings_key`], borrowed (no reference count touched).
    #[inline(always)]
    pub fn settings_key_ref(&mut self) -> &Arc<str> {
        let s = &mut self.session;
        let rules = &self.rules;
        s.key.get_or_insert_with(|| {
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
        })
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
