//! The guard's rules for settings: which a client may change with `SET`, `RESET` or
//! `set_config`, and which values it may give them (read-only users stay read-only, the
//! statement timeout stays within the plan, client encodings stay ones the lexer can read).

use std::ops::Range;

use super::lexer::{Kind, Token};
use super::types::{Policy, Scope, Verdict};
use crate::tenant::TENANT_SETTING;

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

impl Policy {
    pub(super) fn check_set(
        &self,
        stmt: &[Token<'_>],
        edits: &mut Vec<(Range<usize>, String)>,
    ) -> Result<bool, Verdict> {
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
        let value = Value::of_tokens(stmt.get(value_at..).unwrap_or_default());
        // DEFAULT would return to the server's default: the plan's limit is the ceiling.
        if let (Some(ceiling), Value::Default) = (self.statement_timeout_ceiling(&name), &value)
            && let Some(t) = stmt.get(value_at)
        {
            edits.push((t.start..t.end, ceiling));
            return Ok(false);
        }
        self.check_setting_value(&name, &value)?;
        Ok(false)
    }

    /// For `statement_timeout` under a plan limit: the limit as a SET value.
    fn statement_timeout_ceiling(&self, name: &str) -> Option<String> {
        let max = self
            .max_statement_timeout
            .filter(|_| name == "statement_timeout")?;
        Some(format!("'{}ms'", max.as_millis()))
    }

    pub(super) fn check_reset(
        &self,
        stmt: &[Token<'_>],
        edits: &mut Vec<(Range<usize>, String)>,
    ) -> Result<bool, Verdict> {
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
        // RESET would return to the server's default: the plan's limit is the ceiling.
        if let (Some(ceiling), Some(first), Some(last)) = (
            self.statement_timeout_ceiling(&name),
            stmt.first(),
            stmt.last(),
        ) {
            edits.push((
                first.start..last.end,
                format!("SET statement_timeout TO {ceiling}"),
            ));
        }
        Ok(false)
    }

    /// Whether the client may touch setting `name` (lower case).
    pub(super) fn check_setting_name(&self, name: &str, tenant_rules: bool) -> Result<(), Verdict> {
        let protected = || {
            Err(Verdict::refuse(format!(
                "setting \"{name}\" is managed by pgtenant and cannot be changed"
            )))
        };
        if name == TENANT_SETTING || name.starts_with("pgtenant.") {
            return protected();
        }
        // Settings that change how the server reads the text of later messages: the guard
        // must read it the same way, so they stay as pgtenant found them (values checked
        // below).
        if name == "backslash_quote" {
            return Err(Verdict::refuse(format!(
                "setting \"{name}\" cannot be changed through pgtenant: it changes how SQL text is read"
            )));
        }
        if !tenant_rules {
            return Ok(());
        }
        if IDENTITY_SETTINGS.contains(&name) || (name == "search_path" && self.protect_search_path)
        {
            return protected();
        }
        let custom = name.contains('.') && !name.starts_with("pgtenant.");
        if custom || is_settable(name) {
            Ok(())
        } else {
            Err(Verdict::refuse(format!(
                "setting \"{name}\" cannot be changed through pgtenant"
            )))
        }
    }

    /// Value rules: read-only users stay read-only, the statement timeout stays within the
    /// plan, and client encodings stay ones the guard can lex.
    pub(super) fn check_setting_value(&self, name: &str, value: &Value) -> Result<(), Verdict> {
        let (text, default) = match value {
            Value::Text(t) => (Some(t.as_str()), false),
            Value::Default => (None, true),
            Value::Unknown => (None, false),
        };
        match name {
            "default_transaction_read_only" | "transaction_read_only"
                if self.readonly && !matches!(text, Some("on" | "true" | "yes" | "1")) =>
            {
                return Err(Verdict::refuse(
                    "this user is read-only: read-only mode cannot be turned off",
                ));
            }
            "statement_timeout" => {
                if let Some(max) = self.max_statement_timeout {
                    match text.and_then(parse_timeout_ms) {
                        Some(ms) if ms > 0 && u128::from(ms) <= max.as_millis() => {}
                        _ => {
                            return Err(Verdict::refuse(format!(
                                "statement_timeout cannot exceed this tenant's limit of {}",
                                crate::config::format_duration(max)
                            )));
                        }
                    }
                }
            }
            "standard_conforming_strings"
                if !default && !matches!(text, Some("on" | "true" | "yes" | "1")) =>
            {
                // pgtenant serves only shards where it is on (checked at connect).
                return Err(Verdict::refuse(
                    "standard_conforming_strings must stay on through pgtenant: it changes how SQL text is read",
                ));
            }
            "client_encoding" => {
                // PostgreSQL compares encoding names with everything but letters and digits
                // removed (asyncpg sends 'utf-8' with the quotes as the value).
                let encoding: String = text
                    .unwrap_or_default()
                    .chars()
                    .filter(char::is_ascii_alphanumeric)
                    .collect::<String>()
                    .to_ascii_lowercase();
                let safe = default
                    || SAFE_ENCODINGS
                        .iter()
                        .any(|e| e.replace('_', "") == encoding);
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

/// A setting's new value as the guard knows it.
pub(super) enum Value {
    /// Lower-case text, trimmed.
    Text(String),
    /// Back to the default (`DEFAULT`, or a NULL value for `set_config`).
    Default,
    /// An expression the guard cannot evaluate.
    Unknown,
}

impl Value {
    /// The value of a SET: a single word, number or string; `DEFAULT`.
    pub(super) fn of_tokens(value: &[Token<'_>]) -> Value {
        match value {
            [t] if t.is_keyword("default") => Value::Default,
            _ => value_text(value).map_or(Value::Unknown, Value::Text),
        }
    }

    /// The value argument of a `set_config` call.
    pub(super) fn of_arg(arg: &super::types::Arg) -> Value {
        use super::types::Arg;
        match arg {
            Arg::Text(v) => Value::Text(v.trim().to_ascii_lowercase()),
            Arg::Null => Value::Default,
            _ => Value::Unknown,
        }
    }
}

/// Whether a client may change the standard setting `name` (lower case).
pub fn is_settable(name: &str) -> bool {
    SETTABLE.contains(&name)
        || SETTABLE_PREFIXES.iter().any(|p| name.starts_with(p))
        || name.ends_with("_cost")
}

/// A dotted setting name starting at `stmt[i]`: `(lower-case name, index after it)`.
pub(super) fn setting_name(stmt: &[Token<'_>], mut i: usize) -> Option<(String, usize)> {
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
