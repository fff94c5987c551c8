//! The guard's statement rules: the allow-list of statement kinds, denied functions (their
//! names: `roles.rs`), the LISTEN/NOTIFY namespace rewrite and read-only transaction modes
//! (settings: `settings.rs`).

use std::ops::Range;

use super::advisory::{ADVISORY_FUNCTIONS, namespace_lock_keys};
use super::effects;
use super::lexer::{Kind, Token, TokenBuf};
use super::roles::{self, Roles, is_denied};
use super::types::{Policy, Refusal, Scope, SetConfigCall, Verdict};
use crate::error::sqlstate;
use crate::tenant::{quote_ident, quote_literal};

/// Statement names of pgtenant's own (`pgt_...`, `pgtenant_...`): no client may create,
/// execute, describe or close one.
pub fn is_reserved_name(name: &[u8]) -> bool {
    let lower = name.to_ascii_lowercase();
    lower.starts_with(b"pgt_") || lower.starts_with(b"pgtenant_")
}

/// The refusal for a statement name the client did not create, as PostgreSQL words it.
pub fn unknown_statement(name: &str) -> Verdict {
    Verdict::refuse_as(
        sqlstate::INVALID_SQL_STATEMENT_NAME,
        format!("prepared statement \"{name}\" does not exist"),
    )
}

/// What the copies of the client's view of `pg_prepared_statements` may add to one text.
const MAX_VIEW_BYTES: usize = 64 << 20;

/// Keywords that may follow a table name and are not an alias.
const NOT_ALIASES: &[&str] = &[
    "where",
    "join",
    "inner",
    "left",
    "right",
    "full",
    "cross",
    "natural",
    "on",
    "using",
    "group",
    "order",
    "limit",
    "offset",
    "fetch",
    "for",
    "union",
    "except",
    "intersect",
    "having",
    "window",
    "returning",
    "tablesample",
    "with",
];

/// Statement kinds allowed as they are (Tenant scope).
const ALLOWED_STATEMENTS: &[&str] = &[
    "select",
    "insert",
    "update",
    "delete",
    "merge",
    "with",
    "values",
    "table",
    "begin",
    "start",
    "commit",
    "end",
    "rollback",
    "abort",
    "savepoint",
    "release",
    "declare",
    "fetch",
    "move",
    "close",
    "show",
    "deallocate",
    "execute",
    "call",
];

impl Policy {
    /// Decides about `sql`. `standard_conforming` is the session's current
    /// `standard_conforming_strings`.
    pub fn check(&self, sql: &[u8], standard_conforming: bool) -> Verdict {
        self.check_reusing(sql, standard_conforming, &mut TokenBuf::default())
    }

    /// Like [`Policy::check`], lexing into `buf` (a session keeps one, so that checking a
    /// statement allocates nothing).
    pub fn check_reusing(
        &self,
        sql: &[u8],
        standard_conforming: bool,
        buf: &mut TokenBuf,
    ) -> Verdict {
        self.check_then(sql, standard_conforming, buf, |_, _, _| {})
    }

    /// [`Policy::check_reusing`], handing the verdict with the text's tokens and the roles
    /// of its names to `then` before the tokens go back to `buf` (the memo remembers from
    /// them). Malformed text gets PostgreSQL's own syntax error (and is not forwarded).
    pub(super) fn check_then(
        &self,
        sql: &[u8],
        standard_conforming: bool,
        buf: &mut TokenBuf,
        then: impl FnOnce(&[Token<'_>], Roles, &Verdict),
    ) -> Verdict {
        match buf.lex(sql, standard_conforming) {
            Ok(tokens) => {
                let named = Roles::of(&tokens);
                let verdict = self.check_tokens_gated(sql, &tokens, named);
                then(&tokens, named, &verdict);
                buf.keep(tokens);
                verdict
            }
            Err((e, at)) => {
                let (message, position) = super::lexer::postgres_syntax_error(sql, &e, at);
                Verdict {
                    refusal: Some(Box::new(Refusal {
                        sqlstate: sqlstate::SYNTAX_ERROR,
                        message,
                        position: Some(position),
                    })),
                    ..Verdict::default()
                }
            }
        }
    }

    /// The check of lexed `tokens`, with the passes that look for particular names run only
    /// when `roles` says such a name is present (see `roles.rs`).
    pub(super) fn check_tokens_gated(
        &self,
        sql: &[u8],
        tokens: &[Token<'_>],
        roles: Roles,
    ) -> Verdict {
        let mut edits: Vec<(Range<usize>, String)> = Vec::new();
        let mut verdict = Verdict::default();
        if !self.unchecked
            && let Err(v) =
                self.check_identifiers(sql, tokens, roles, &mut edits, &mut verdict.bound_settings)
        {
            return v;
        }
        for stmt in tokens.split(|t| t.is_punct(b';')) {
            if stmt.is_empty() {
                continue;
            }
            if !self.unchecked
                && let Err(v) = self
                    .check_system_writes(stmt, roles)
                    .and_then(|()| self.check_statement_names(stmt, roles))
            {
                return v;
            }
            match self.check_statement(stmt, &mut edits) {
                Ok(rebind) => verdict.rebind |= rebind,
                Err(_) if self.unchecked => {}
                Err(v) => return v,
            }
        }
        if self.prepared_prefix.is_some() {
            match self.prepared_view_edits(tokens, roles, &mut edits) {
                Ok(true) => {
                    verdict.wants_prepared_view = true;
                    return verdict;
                }
                Ok(false) => {}
                Err(v) => return v,
            }
        }
        if self.prepared_prefix.is_some() {
            // An empty statement (after the last `;`) has no effect.
            for stmt in tokens.split(|t| t.is_punct(b';')).filter(|s| !s.is_empty()) {
                if let Err(v) =
                    effects::collect(self, sql, stmt, roles, &mut edits, &mut verdict.effects)
                {
                    return v;
                }
            }
        }
        if !edits.is_empty() {
            let Some(out) = effects::apply(sql, &edits, 0..sql.len()) else {
                return effects::overlapping_rewrites();
            };
            match String::from_utf8(out) {
                Ok(s) => verdict.rewritten = Some(s),
                Err(_) => {
                    return Verdict::refuse(
                        "statement refused: LISTEN/NOTIFY text must be UTF-8 to be namespaced",
                    );
                }
            }
        }
        verdict
    }

    /// Denied functions anywhere; `set_config` only with an allowed setting name and value
    /// (those given as parameters are added to `bound`, checked at Bind); `pg_notify` only
    /// with a literal channel (moved into the namespace).
    fn check_identifiers(
        &self,
        sql: &[u8],
        tokens: &[Token<'_>],
        roles: Roles,
        edits: &mut Vec<(Range<usize>, String)>,
        bound: &mut Vec<SetConfigCall>,
    ) -> Result<(), Verdict> {
        if !roles.any(roles::DENIED | roles::ADVISORY | roles::SET_CONFIG | roles::NOTIFY) {
            return Ok(());
        }
        let tenant = self.scope == Scope::Tenant;
        for (i, t) in tokens.iter().enumerate() {
            let Some(name) = t.ident() else { continue };
            if tenant && is_denied(name) {
                return Err(Verdict::refuse(format!(
                    "\"{name}\" is not allowed through pgtenant"
                )));
            }
            if let Some(salt) = self.lock_salt.filter(|_| tenant)
                && name.starts_with("pg_")
                && ADVISORY_FUNCTIONS.contains(&name)
            {
                namespace_lock_keys(name, tokens, i, salt, edits)?;
            }
            if name == "set_config" {
                self.check_set_config(sql, tokens, i, tenant, bound)?;
            } else if tenant && name == "pg_notify" {
                let literal = match (tokens.get(i + 1), tokens.get(i + 2), tokens.get(i + 3)) {
                    (Some(open), Some(arg), Some(comma))
                        if open.is_punct(b'(') && comma.is_punct(b',') =>
                    {
                        match &arg.kind {
                            Kind::Str { value: Some(v) } => Some((arg.start..arg.end, v.clone())),
                            _ => None,
                        }
                    }
                    _ => None,
                };
                let Some((range, value)) = literal else {
                    return Err(Verdict::refuse(
                        "pg_notify() is allowed only with a string literal as its first argument",
                    ));
                };
                edits.push((range, quote_literal(&self.channel(&value)?)));
            }
        }
        Ok(())
    }

    /// Transaction pooling: replaces each mention of `pg_prepared_statements` (qualified or
    /// not) with the client's own view of it. True when the view is needed and not given.
    fn prepared_view_edits(
        &self,
        tokens: &[Token<'_>],
        roles: Roles,
        edits: &mut Vec<(Range<usize>, String)>,
    ) -> Result<bool, Verdict> {
        if !roles.any(roles::PREPARED_VIEW) {
            return Ok(false);
        }
        let mut inserted = 0usize;
        for (i, t) in tokens.iter().enumerate() {
            if t.ident() != Some("pg_prepared_statements") {
                continue;
            }
            // A qualifier (`pg_prepared_statements.name`) or an alias names no relation.
            if tokens.get(i + 1).is_some_and(|n| n.is_punct(b'.'))
                || (i > 0 && tokens[i - 1].is_keyword("as"))
            {
                continue;
            }
            let Some(view) = &self.prepared_view else {
                return Ok(true);
            };
            // Each mention gets a copy of the view, which holds the client's statements: a
            // short text naming it many times must not make pgtenant build gigabytes.
            inserted = inserted.saturating_add(view.len());
            if inserted > MAX_VIEW_BYTES {
                return Err(Verdict::refuse_as(
                    sqlstate::PROGRAM_LIMIT_EXCEEDED,
                    format!(
                        "statement refused: pgtenant's view of pg_prepared_statements would take over {} MiB of this text; name it fewer times",
                        MAX_VIEW_BYTES >> 20
                    ),
                ));
            }
            let qualified = i >= 2
                && tokens[i - 1].is_punct(b'.')
                && tokens[i - 2].ident() == Some("pg_catalog");
            let start = if qualified {
                tokens[i - 2].start
            } else {
                t.start
            };
            // Keep the name usable as a qualifier unless the client gives an alias.
            let aliased = tokens.get(i + 1).is_some_and(|n| {
                n.is_keyword("as")
                    || (n.ident().is_some() && !NOT_ALIASES.iter().any(|k| n.is_keyword(k)))
            });
            let text = if aliased {
                view.clone()
            } else {
                format!("{view} AS pg_prepared_statements")
            };
            edits.push((start..t.end, text));
        }
        Ok(false)
    }

    /// The namespaced channel for `name`.
    pub(super) fn channel(&self, name: &str) -> Result<String, Verdict> {
        let Some(prefix) = &self.notify_prefix else {
            return Ok(name.to_owned());
        };
        // The lexer stands U+FFFD in for bytes that are not UTF-8; such a name cannot be
        // rewritten faithfully.
        if name.contains('\u{FFFD}') {
            return Err(Verdict::refuse("channel names must be valid UTF-8"));
        }
        let full = format!("{prefix}{name}");
        if full.len() > 63 {
            return Err(Verdict::refuse(format!(
                "channel name \"{name}\" is too long (at most {} bytes)",
                63 - prefix.len()
            )));
        }
        Ok(full)
    }

    /// Checks one statement; `Ok(true)` when the context must be bound again after it.
    fn check_statement(
        &self,
        stmt: &[Token<'_>],
        edits: &mut Vec<(Range<usize>, String)>,
    ) -> Result<bool, Verdict> {
        let word = |i: usize| stmt.get(i).and_then(Token::ident).unwrap_or("");
        let keyword = |i: usize, k: &str| stmt.get(i).is_some_and(|t| t.is_keyword(k));
        let first = match stmt.first() {
            Some(t) if t.is_punct(b'(') => "select",
            Some(t) => match &t.kind {
                Kind::Ident { quoted: false, .. } => word(0),
                _ => return Err(self.refuse_kind("this statement")),
            },
            None => return Ok(false),
        };
        let tenant = self.scope == Scope::Tenant;
        match first {
            "set" => self.check_set(stmt, edits),
            "reset" => self.check_reset(stmt, edits),
            "discard" => {
                if keyword(1, "all") {
                    Ok(true)
                } else {
                    Ok(false)
                }
            }
            "begin" | "start" => {
                self.check_transaction_mode(stmt)?;
                Ok(false)
            }
            "commit" | "rollback" | "end" | "abort" if keyword(1, "prepared") => {
                Err(self.refuse_kind("COMMIT/ROLLBACK PREPARED"))
            }
            "explain" => {
                let mut i = 1;
                if stmt.get(1).is_some_and(|t| t.is_punct(b'(')) {
                    let close = stmt
                        .iter()
                        .position(|t| t.is_punct(b')'))
                        .unwrap_or(stmt.len());
                    i = close + 1;
                } else {
                    while matches!(word(i), "analyze" | "analyse" | "verbose") {
                        i += 1;
                    }
                }
                match stmt.get(i..) {
                    Some(rest) if !rest.is_empty() => self.check_statement(rest, edits),
                    _ => Ok(false),
                }
            }
            "prepare" => {
                if keyword(1, "transaction") {
                    return Err(self.refuse_kind("PREPARE TRANSACTION"));
                }
                let Some(as_at) = stmt.iter().position(|t| t.is_keyword("as")) else {
                    return Err(self.refuse_kind("PREPARE without AS"));
                };
                self.check_statement(&stmt[as_at + 1..], edits)
            }
            "listen" | "unlisten" | "notify" if tenant => {
                if let Some(channel) = stmt.get(1)
                    && let Kind::Ident { name, .. } = &channel.kind
                {
                    edits.push((
                        channel.start..channel.end,
                        quote_ident(&self.channel(name)?),
                    ));
                }
                Ok(false)
            }
            "copy" if tenant => {
                // `COPY (query) TO ...`: the direction follows the query's closing parenthesis.
                let mut depth = 0usize;
                let direction = stmt.iter().enumerate().skip(1).position(|(_, t)| {
                    if t.is_punct(b'(') {
                        depth += 1;
                    } else if t.is_punct(b')') {
                        depth = depth.saturating_sub(1);
                    }
                    depth == 0 && (t.is_keyword("from") || t.is_keyword("to"))
                });
                match direction.and_then(|d| stmt.get(d + 2)) {
                    Some(t) if t.is_keyword("stdin") || t.is_keyword("stdout") => Ok(false),
                    _ => Err(self.refuse_kind("COPY to or from a file or program")),
                }
            }
            "create" if tenant => self.check_create(stmt),
            "drop" if tenant => {
                if keyword(1, "table")
                    || (self.allow_ddl
                        && matches!(word(1), "index" | "sequence" | "type" | "domain"))
                {
                    Ok(false)
                } else {
                    Err(self.refuse_kind(&format!("DROP {}", word(1).to_uppercase())))
                }
            }
            "alter" | "truncate" | "comment" if tenant && self.allow_ddl => {
                if first == "alter"
                    && !matches!(word(1), "table" | "index" | "sequence" | "type" | "domain")
                {
                    return Err(self.refuse_kind(&format!("ALTER {}", word(1).to_uppercase())));
                }
                Ok(false)
            }
            // Role and database defaults apply to every session of the login role, on every
            // database of the cluster (other tenants' included), and RESET returns to them.
            "alter"
                if !tenant
                    && matches!(word(1), "role" | "user" | "database" | "system")
                    && stmt
                        .iter()
                        .any(|t| t.is_keyword("set") || t.is_keyword("reset")) =>
            {
                Err(self.refuse_kind(&format!("ALTER {} ... SET", word(1).to_uppercase())))
            }
            _ if !tenant => Ok(false),
            k if ALLOWED_STATEMENTS.contains(&k) || k == "copy" => Ok(false),
            other => Err(self.refuse_kind(&other.to_uppercase())),
        }
    }

    /// Writes to `pg_settings` change settings without SET or set_config (a rule on the view
    /// calls set_config): refused in every scope, whatever the statement's shape.
    fn check_system_writes(&self, stmt: &[Token<'_>], roles: Roles) -> Result<(), Verdict> {
        // Both a write and `pg_settings` somewhere in the text, or not in this statement.
        if !(roles.any(roles::WRITE) && roles.any(roles::SETTINGS)) {
            return Ok(());
        }
        let names_settings = || stmt.iter().any(|t| t.ident() == Some("pg_settings"));
        let writes = || {
            stmt.iter().any(|t| {
                matches!(&t.kind, Kind::Ident { name, quoted: false }
                    if matches!(&**name, "update" | "insert" | "delete" | "merge"))
            })
        };
        if writes() && names_settings() {
            return Err(Verdict::refuse(
                "writing to pg_settings is not allowed through pgtenant; use SET",
            ));
        }
        Ok(())
    }

    /// SQL-level statement names a client may not reach: pgtenant's own (see
    /// [`is_reserved_name`]); in transaction pooling every other name is moved into the
    /// client's namespace (`effects`).
    fn check_statement_names(&self, stmt: &[Token<'_>], roles: Roles) -> Result<(), Verdict> {
        if !roles.any(roles::STATEMENT_NAME) {
            return Ok(());
        }
        for (i, t) in stmt.iter().enumerate() {
            let Kind::Ident {
                name,
                quoted: false,
            } = &t.kind
            else {
                continue;
            };
            let at = match &**name {
                "execute" | "prepare" => i + 1,
                "deallocate" if stmt.get(i + 1).is_some_and(|n| n.is_keyword("prepare")) => i + 2,
                "deallocate" => i + 1,
                _ => continue,
            };
            if let Some(name) = stmt.get(at).and_then(Token::ident)
                && is_reserved_name(name.as_bytes())
            {
                return Err(unknown_statement(name));
            }
        }
        Ok(())
    }

    pub(super) fn refuse_kind(&self, what: &str) -> Verdict {
        Verdict::refuse(format!("{what} is not allowed through pgtenant"))
    }

    fn check_create(&self, stmt: &[Token<'_>]) -> Result<bool, Verdict> {
        let mut i = 1;
        let word = |i: usize| stmt.get(i).and_then(Token::ident).unwrap_or("");
        if word(i) == "or" && word(i + 1) == "replace" {
            i += 2;
        }
        let mut temporary = false;
        loop {
            match word(i) {
                "global" | "local" => i += 1,
                "temp" | "temporary" => {
                    temporary = true;
                    i += 1;
                }
                "unlogged" => i += 1,
                _ => break,
            }
        }
        let object = word(i);
        let ddl_ok = self.allow_ddl
            && matches!(
                object,
                "table" | "index" | "unique" | "sequence" | "type" | "domain"
            );
        if (object == "table" && temporary) || ddl_ok {
            Ok(false)
        } else {
            Err(self.refuse_kind(&format!("CREATE {}", object.to_uppercase())))
        }
    }

    /// `BEGIN`/`START TRANSACTION`/`SET TRANSACTION`/`SET SESSION CHARACTERISTICS`: a
    /// read-only user may not ask for READ WRITE.
    pub(super) fn check_transaction_mode(&self, stmt: &[Token<'_>]) -> Result<(), Verdict> {
        if self.readonly
            && stmt
                .windows(2)
                .any(|w| w[0].is_keyword("read") && w[1].is_keyword("write"))
        {
            return Err(Verdict::refuse(
                "this user is read-only: READ WRITE transactions are not allowed",
            ));
        }
        Ok(())
    }
}
