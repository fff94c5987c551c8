//! The guard's vocabulary, shared by its rule modules: what it knows of a session (`Policy`,
//! `Scope`), what it decides (`Verdict`, `Refusal`), the session effects it reports
//! (`Effect`) and the `set_config` calls it found (`SetConfigCall`, `Arg`). Below every rule
//! module, so they depend on it and not on each other's types.

use std::time::Duration;

use crate::error::sqlstate;

/// Which checks apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Shared and schema placements: the full guard.
    Tenant,
    /// A dedicated database: only the read-only and timeout rules.
    Dedicated,
}

/// What the guard knows about the session it protects.
#[derive(Debug, Clone)]
pub struct Policy {
    pub scope: Scope,
    /// The tenant's `search_path` is bound by pgtenant (schema placement, context isolation).
    pub protect_search_path: bool,
    /// The user is read-only.
    pub readonly: bool,
    /// The plan's statement timeout, which a client's `SET statement_timeout` may not exceed.
    pub max_statement_timeout: Option<Duration>,
    /// Prefix that puts notification channels in the tenant's namespace (Tenant scope).
    pub notify_prefix: Option<String>,
    /// The tenant may run DDL (schema placement with its own role).
    pub allow_ddl: bool,
    /// Transaction pooling: report session effects, and rename SQL prepared statements into
    /// this prefix (the client's own namespace).
    pub prepared_prefix: Option<String>,
    /// Shared placements: advisory lock keys are moved into the tenant's namespace by XOR
    /// with this value (a bijection, so the tenant's own locks behave as on PostgreSQL; two
    /// tenants' equal keys become different locks).
    pub lock_salt: Option<u64>,
    /// Tests only: refuse nothing (effects are still reported), to prove what the database
    /// enforces without the guard.
    pub unchecked: bool,
    /// Transaction pooling: what `pg_prepared_statements` is replaced with (the client's own
    /// statements), set by the relay only when a statement names the view.
    pub prepared_view: Option<String>,
}

/// Why a statement was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub sqlstate: &'static str,
    pub message: String,
    /// Character position (1-based) in the statement text, as PostgreSQL reports it.
    pub position: Option<usize>,
}

/// The guard's decision about one message's SQL text.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Verdict {
    /// Set when the text must not reach the server (boxed: rare, and it keeps the verdict
    /// small).
    pub refusal: Option<Box<Refusal>>,
    /// Text to forward instead of the client's (channel names moved into the namespace).
    pub rewritten: Option<String>,
    /// The text resets settings: bind the tenant context again after it.
    pub rebind: bool,
    /// Session-level changes (transaction pooling only).
    pub effects: Vec<Effect>,
    /// Transaction pooling: the text names `pg_prepared_statements` and no
    /// [`Policy::prepared_view`] was given: check it again with one.
    pub wants_prepared_view: bool,
    /// `set_config` calls taking query parameters: checked when a Bind gives the values
    /// ([`Policy::check_bound_set_config`]).
    pub bound_settings: Vec<SetConfigCall>,
}

impl Verdict {
    /// A `42501` refusal.
    pub fn refuse(message: impl Into<String>) -> Verdict {
        Verdict::refuse_as(sqlstate::INSUFFICIENT_PRIVILEGE, message)
    }

    /// A refusal with SQLSTATE `sqlstate`.
    pub fn refuse_as(sqlstate: &'static str, message: impl Into<String>) -> Verdict {
        Verdict {
            refusal: Some(Box::new(Refusal {
                sqlstate,
                message: message.into(),
                position: None,
            })),
            ..Verdict::default()
        }
    }
}

/// A session-level change one statement makes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// A setting changed for the session: `key` identifies it, `pairs` replay it through
    /// `set_config` (as parameters: a value is never lexed again).
    Set {
        key: String,
        pairs: Vec<(String, String)>,
    },
    /// `RESET name`.
    Reset(String),
    /// `RESET ALL`.
    ResetAll,
    /// `DISCARD ALL`: settings, prepared statements, LISTEN and more are gone.
    DiscardAll,
    /// `LISTEN channel` (the channel as the server knows it).
    Listen(String),
    /// `UNLISTEN channel`.
    Unlisten(String),
    /// `UNLISTEN *`.
    UnlistenAll,
    /// `PREPARE`: the server-side name, the statement that creates it there, and the
    /// client's PREPARE statement as it wrote it.
    Prepare {
        server_name: String,
        sql: String,
        shown: String,
    },
    /// `EXECUTE` of a server-side name.
    Execute(String),
    /// `DEALLOCATE` of a server-side name.
    Deallocate(String),
    /// `DEALLOCATE ALL`.
    DeallocateAll,
    /// `ROLLBACK` / `ABORT` (with or without `AND CHAIN`): the transaction's settings are
    /// undone.
    Rollback,
    /// `COMMIT AND CHAIN`: the transaction's settings hold, and a new transaction begins.
    CommitChain,
    /// `SAVEPOINT name`.
    Savepoint(String),
    /// `ROLLBACK TO [SAVEPOINT] name`: settings made since the savepoint are undone.
    RollbackTo(String),
    /// `RELEASE [SAVEPOINT] name`.
    Release(String),
    /// `NOTIFY channel[, 'payload']` with a literal payload (the channel as the server knows
    /// it): a client listening on it gets it before its ReadyForQuery, as from PostgreSQL.
    Notify { channel: String, payload: String },
    /// The statement reads `pg_prepared_statements` (rewritten to the client's own
    /// statements): every one of them must exist on the connection first.
    PreparedView,
    /// The statement leaves state on the server connection that outlives its transaction
    /// (a temporary table, a `WITH HOLD` cursor, a session advisory lock): the connection
    /// stays with the client until it leaves or runs `DISCARD ALL`.
    Pin(&'static str),
}

/// One argument of a `set_config` call as the text shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Arg {
    /// A string constant.
    Text(String),
    /// `NULL`.
    Null,
    /// `true` or `false`.
    Bool(bool),
    /// `$n` (optionally cast to text or varchar), 1-based.
    Param(usize),
    /// Anything else: an expression whose value the guard cannot know.
    Other,
}

/// A `set_config(name, value, is_local)` call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetConfigCall {
    pub name: Arg,
    pub value: Arg,
    pub local: Arg,
}
