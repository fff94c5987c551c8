//! The guard's rules: statement allow-list, denied functions, protected settings, read-only
//! users, the plan's statement-timeout cap, and the LISTEN/NOTIFY namespace rewrite.

use std::ops::Range;
use std::time::Duration;

use super::lexer::{Kind, Token, lex};
use crate::error::sqlstate;
use crate::tenant::{TENANT_SETTING, quote_ident, quote_literal};

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
}

/// Why a statement was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub sqlstate: &'static str,
    pub message: String,
}

/// The guard's decision about one message's SQL text.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Verdict {
    /// Set when the text must not reach the server.
    pub refusal: Option<Refusal>,
    /// Text to forward instead of the client's (channel names moved into the namespace).
    pub rewritten: Option<String>,
    /// The text resets settings: bind the tenant context again after it.
    pub rebind: bool,
}

impl Verdict {
    fn refuse(message: impl Into<String>) -> Verdict {
        Verdict {
            refusal: Some(Refusal {
                sqlstate: sqlstate::INSUFFICIENT_PRIVILEGE,
                message: message.into(),
            }),
            ..Verdict::default()
        }
    }
}

/// Functions refused wherever their name appears as an identifier (Tenant scope).
const DENIED_FUNCTIONS: &[&str] = &[
    "pg_cancel_backend",
    "pg_terminate_backend",
    "pg_signal_backend",
    "loread",
    "lowrite",
    "ts_stat",
    "ts_rewrite",
    "pg_stat_activity",
    "pg_stat_get_activity",
    "pg_locks",
    "pg_blocking_pids",
    "pg_safe_snapshot_blocking_pids",
    "pg_read_file",
    "pg_read_binary_file",
    "pg_reload_conf",
    "pg_prepared_xacts",
];
/// Name prefixes refused the same way.
const DENIED_PREFIXES: &[&str] = &[
    "lo_",
    "dblink",
    "query_to_xml",
    "pg_stat_get_backend",
    "pg_stat_statements",
    "pg_ls_",
];

/// Settings a client may change (lower case); custom `x.y` settings are allowed too, except
/// the tenant's own.
const SETTABLE: &[&str] = &[
    "application_name",
    "client_encoding",
    "datestyle",
    "timezone",
    "intervalstyle",
    "extra_float_digits",
    "bytea_output",
    "client_min_messages",
    "lock_timeout",
    "statement_timeout",
    "idle_in_transaction_session_timeout",
    "idle_session_timeout",
    "default_transaction_isolation",
    "default_transaction_read_only",
    "default_transaction_deferrable",
    "transaction_isolation",
    "transaction_read_only",
    "transaction_deferrable",
    "standard_conforming_strings",
    "timezone_abbreviations",
    "xmlbinary",
    "xmloption",
    "work_mem",
    "maintenance_work_mem",
    "temp_buffers",
    "hash_mem_multiplier",
    "effective_cache_size",
    "from_collapse_limit",
    "join_collapse_limit",
    "constraint_exclusion",
    "cursor_tuple_fraction",
    "default_statistics_target",
    "plan_cache_mode",
    "max_parallel_workers_per_gather",
    "lc_monetary",
    "lc_numeric",
    "lc_time",
    "array_nulls",
    "escape_string_warning",
    "quote_all_identifiers",
    "synchronous_commit",
    "row_security",
    "check_function_bodies",
    "search_path",
    "default_toast_compression",
    "gin_fuzzy_search_limit",
];
const SETTABLE_PREFIXES: &[&str] = &["enable_", "geqo", "jit", "cpu_", "parallel_"];
/// Settings that decide who the session is.
const IDENTITY_SETTINGS: &[&str] = &["role", "session_authorization"];
/// Client encodings in which every byte below 0x80 is ASCII, so the lexer reads them right.
const SAFE_ENCODINGS: &[&str] = &[
    "utf8",
    "unicode",
    "sql_ascii",
    "latin1",
    "latin2",
    "latin3",
    "latin4",
    "latin5",
    "latin6",
    "latin7",
    "latin8",
    "latin9",
    "latin10",
    "win1250",
    "win1251",
    "win1252",
    "win1253",
    "win1254",
    "win1255",
    "win1256",
    "win1257",
    "win1258",
    "iso_8859_5",
    "iso_8859_6",
    "iso_8859_7",
    "iso_8859_8",
    "koi8r",
    "koi8u",
    "euc_jp",
    "euc_kr",
    "euc_cn",
    "euc_tw",
    "euc_jis_2004",
    "win866",
    "win874",
    "mule_internal",
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
        let tokens = match lex(sql, standard_conforming) {
            Ok(t) => t,
            Err(e) => {
                return Verdict::refuse(format!(
                    "statement refused: pgtenant cannot read it safely ({e})"
                ));
            }
        };
        let mut edits: Vec<(Range<usize>, String)> = Vec::new();
        if self.scope == Scope::Tenant
            && let Err(v) = self.check_identifiers(&tokens, &mut edits)
        {
            return v;
        }
        let mut verdict = Verdict::default();
        for stmt in tokens.split(|t| t.is_punct(b';')) {
            if stmt.is_empty() {
                continue;
            }
            match self.check_statement(stmt, &mut edits) {
                Ok(rebind) => verdict.rebind |= rebind,
                Err(v) => return v,
            }
        }
        if !edits.is_empty() {
            edits.sort_by_key(|(r, _)| r.start);
            let mut out = Vec::with_capacity(sql.len() + 32 * edits.len());
            let mut at = 0;
            for (range, text) in edits {
                out.extend_from_slice(&sql[at..range.start]);
                out.extend_from_slice(text.as_bytes());
                at = range.end;
            }
            out.extend_from_slice(&sql[at..]);
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

    /// Denied functions anywhere; `set_config` only with a literal, allowed setting name;
    /// `pg_notify` only with a literal channel (moved into the namespace).
    fn check_identifiers(
        &self,
        tokens: &[Token<'_>],
        edits: &mut Vec<(Range<usize>, String)>,
    ) -> Result<(), Verdict> {
        for (i, t) in tokens.iter().enumerate() {
            let Some(name) = t.ident() else { continue };
            if DENIED_FUNCTIONS.contains(&name)
                || DENIED_PREFIXES.iter().any(|p| name.starts_with(p))
            {
                return Err(Verdict::refuse(format!(
                    "\"{name}\" is not allowed through pgtenant"
                )));
            }
            if name == "set_config" || name == "pg_notify" {
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
                    return Err(Verdict::refuse(format!(
                        "{name}() is allowed only with a string literal as its first argument"
                    )));
                };
                if name == "set_config" {
                    let setting = value.to_ascii_lowercase();
                    self.check_setting_name(&setting, true)?;
                    // The value must pass the same rules as SET's: only a lone literal can.
                    let value = match tokens.get(i + 5) {
                        Some(t) if t.is_punct(b',') => tokens.get(i + 4..i + 5).unwrap_or_default(),
                        _ => &[],
                    };
                    self.check_setting_value(&setting, value)?;
                } else {
                    edits.push((range, quote_literal(&self.channel(&value)?)));
                }
            }
        }
        Ok(())
    }

    /// The namespaced channel for `name`.
    fn channel(&self, name: &str) -> Result<String, Verdict> {
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
            "set" => self.check_set(stmt),
            "reset" => self.check_reset(stmt),
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
            _ if !tenant => Ok(false),
            k if ALLOWED_STATEMENTS.contains(&k) || k == "copy" => Ok(false),
            other => Err(self.refuse_kind(&other.to_uppercase())),
        }
    }

    fn refuse_kind(&self, what: &str) -> Verdict {
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
    fn check_transaction_mode(&self, stmt: &[Token<'_>]) -> Result<(), Verdict> {
        if self.readonly
            && stmt
                .windows(2)
                .any(|w| w[0].is_keyword("read") && w[1].is_keyword("write"))
        {
            return Err(Verdict {
                refusal: Some(Refusal {
                    sqlstate: sqlstate::INSUFFICIENT_PRIVILEGE,
                    message: "this user is read-only: READ WRITE transactions are not allowed"
                        .into(),
                }),
                ..Verdict::default()
            });
        }
        Ok(())
    }

    fn check_set(&self, stmt: &[Token<'_>]) -> Result<bool, Verdict> {
        let word = |i: usize| stmt.get(i).and_then(Token::ident).unwrap_or("");
        let mut i = 1;
        match word(1) {
            "session" if word(2) == "authorization" && self.scope == Scope::Tenant => {
                return Err(self.refuse_kind("SET SESSION AUTHORIZATION"));
            }
            "session" if word(2) == "authorization" => return Ok(false),
            "session" if word(2) == "characteristics" => {
                self.check_transaction_mode(stmt)?;
                return Ok(false);
            }
            "session" | "local" => i = 2,
            _ => {}
        }
        let (name, value_at) = match word(i) {
            "role" if self.scope == Scope::Tenant => return Err(self.refuse_kind("SET ROLE")),
            "transaction" => {
                self.check_transaction_mode(stmt)?;
                return Ok(false);
            }
            "constraints" => return Ok(false),
            "xml" if word(i + 1) == "option" => return Ok(false),
            "time" if word(i + 1) == "zone" => ("timezone".to_owned(), i + 2),
            "schema" => ("search_path".to_owned(), i + 1),
            "names" => ("client_encoding".to_owned(), i + 1),
            _ => {
                let (name, end) =
                    setting_name(stmt, i).ok_or_else(|| self.refuse_kind("this form of SET"))?;
                let value_at = match stmt.get(end) {
                    Some(t) if t.is_keyword("to") || t.kind == Kind::Op(b"=") => end + 1,
                    _ => end,
                };
                (name, value_at)
            }
        };
        self.check_setting_name(&name, self.scope == Scope::Tenant)?;
        self.check_setting_value(&name, stmt.get(value_at..).unwrap_or_default())?;
        Ok(false)
    }

    fn check_reset(&self, stmt: &[Token<'_>]) -> Result<bool, Verdict> {
        let word = |i: usize| stmt.get(i).and_then(Token::ident).unwrap_or("");
        let name = match word(1) {
            "all" => return Ok(true),
            "session" if word(2) == "authorization" => "session_authorization".to_owned(),
            "time" if word(2) == "zone" => "timezone".to_owned(),
            "transaction" => return Ok(false),
            _ => setting_name(stmt, 1)
                .map(|(n, _)| n)
                .ok_or_else(|| self.refuse_kind("this form of RESET"))?,
        };
        self.check_setting_name(&name, self.scope == Scope::Tenant)?;
        if self.readonly
            && matches!(
                name.as_str(),
                "default_transaction_read_only" | "transaction_read_only"
            )
        {
            return Err(Verdict::refuse(
                "this user is read-only: it cannot reset read-only mode",
            ));
        }
        Ok(false)
    }

    /// Whether the client may touch setting `name` (lower case).
    fn check_setting_name(&self, name: &str, tenant_rules: bool) -> Result<(), Verdict> {
        let protected = || {
            Err(Verdict::refuse(format!(
                "setting \"{name}\" is managed by pgtenant and cannot be changed"
            )))
        };
        if name == TENANT_SETTING {
            return protected();
        }
        if !tenant_rules {
            return Ok(());
        }
        if IDENTITY_SETTINGS.contains(&name) || (name == "search_path" && self.protect_search_path)
        {
            return protected();
        }
        let custom = name.contains('.') && !name.starts_with("pgtenant.");
        let known = SETTABLE.contains(&name)
            || SETTABLE_PREFIXES.iter().any(|p| name.starts_with(p))
            || name.ends_with("_cost");
        if custom || known {
            Ok(())
        } else {
            Err(Verdict::refuse(format!(
                "setting \"{name}\" cannot be changed through pgtenant"
            )))
        }
    }

    /// Value rules: read-only users stay read-only, the statement timeout stays within the
    /// plan, and client encodings stay ones the guard can lex.
    fn check_setting_value(&self, name: &str, value: &[Token<'_>]) -> Result<(), Verdict> {
        let text = value_text(value);
        match name {
            "default_transaction_read_only" | "transaction_read_only"
                if self.readonly
                    && !matches!(text.as_deref(), Some("on" | "true" | "yes" | "1")) =>
            {
                return Err(Verdict::refuse(
                    "this user is read-only: read-only mode cannot be turned off",
                ));
            }
            "statement_timeout" => {
                if let Some(max) = self.max_statement_timeout {
                    let requested = text.as_deref().and_then(parse_timeout_ms);
                    match requested {
                        Some(ms) if ms > 0 && u128::from(ms) <= max.as_millis() => {}
                        // DEFAULT returns to the session default; pgtenant's own timer still
                        // applies the plan.
                        None if value.first().is_some_and(|t| t.is_keyword("default")) => {}
                        _ => {
                            return Err(Verdict::refuse(format!(
                                "statement_timeout cannot exceed this tenant's limit of {}",
                                crate::config::format_duration(max)
                            )));
                        }
                    }
                }
            }
            "client_encoding" if self.scope == Scope::Tenant => {
                let encoding = text.unwrap_or_default().replace(['-', '_'], "");
                let safe = SAFE_ENCODINGS
                    .iter()
                    .any(|e| e.replace('_', "") == encoding)
                    || value.first().is_some_and(|t| t.is_keyword("default"));
                if !safe {
                    return Err(Verdict::refuse(format!(
                        "client_encoding {encoding:?} is not supported through pgtenant"
                    )));
                }
            }
            _ => {}
        }
        Ok(())
    }
}

/// A dotted setting name starting at `stmt[i]`: `(lower-case name, index after it)`.
fn setting_name(stmt: &[Token<'_>], mut i: usize) -> Option<(String, usize)> {
    let mut name = stmt.get(i)?.ident()?.to_ascii_lowercase();
    i += 1;
    while stmt.get(i).is_some_and(|t| t.is_punct(b'.')) {
        name.push('.');
        name.push_str(&stmt.get(i + 1)?.ident()?.to_ascii_lowercase());
        i += 2;
    }
    Some((name, i))
}

/// The value of a SET as lower-case text, when it is a single word, number or string.
fn value_text(value: &[Token<'_>]) -> Option<String> {
    match value {
        [t] => match &t.kind {
            Kind::Ident { name, .. } => Some(name.to_ascii_lowercase()),
            Kind::Str { value } => value.as_ref().map(|v| v.trim().to_ascii_lowercase()),
            Kind::Number(n) => Some(String::from_utf8_lossy(n).into_owned()),
            _ => None,
        },
        _ => None,
    }
}

/// A statement_timeout value in milliseconds: `5000`, `'5s'`, `'1min'`, `'100ms'`, `'1h'`.
fn parse_timeout_ms(text: &str) -> Option<u64> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let n: u64 = digits.parse().ok()?;
    let factor = match unit.trim() {
        "" | "ms" => 1,
        "s" => 1_000,
        "min" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return None,
    };
    n.checked_mul(factor)
}
