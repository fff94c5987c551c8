//! Session effects of statements, for transaction pooling (DESIGN.md §6). A client's session
//! outlives any one server connection, so what it changes at session level is tracked here
//! and replayed on the next connection. That covers settings, LISTEN registrations and
//! SQL-level prepared statements. SQL prepared statement names are renamed into the client's
//! own namespace, so they can be re-created on whichever server connection the client gets.

use std::ops::Range;

use super::lexer::{Kind, Token};
use super::roles::{self, Roles, SESSION_LOCK_FUNCTIONS};
use super::types::{Effect, Policy, Verdict};
use crate::tenant::{quote_ident, quote_if_needed};

/// Why `stmt` pins its server connection, if it does: temporary objects, `WITH HOLD`
/// cursors and session advisory locks. Generous on purpose: a pin costs the client's tenant
/// one server connection, a missed one lets another client meet the state.
fn pin_reason(stmt: &[Token<'_>], roles: Roles) -> Option<&'static str> {
    if !roles.any(roles::PIN) {
        return None;
    }
    let mut reason = None;
    let declare = stmt.first().is_some_and(|t| t.is_keyword("declare"));
    for (i, t) in stmt.iter().enumerate() {
        // One match per name (the keywords only unquoted, the names either way).
        let Kind::Ident { name, quoted } = &t.kind else {
            continue;
        };
        let keyword = !quoted;
        let after = |words: &[&str]| i > 0 && words.iter().any(|w| stmt[i - 1].is_keyword(w));
        match &**name {
            "temp" | "temporary"
                if keyword && after(&["create", "global", "local", "replace", "into"]) =>
            {
                reason = Some("a temporary table");
            }
            n if n == "pg_temp" || n.starts_with("pg_temp_") => reason = Some("a temporary table"),
            "hold" if keyword && declare && after(&["with"]) => reason = Some("a WITH HOLD cursor"),
            n if SESSION_LOCK_FUNCTIONS.contains(&n) => return Some("a session advisory lock"),
            _ => {}
        }
    }
    reason
}

/// The statement names `stmt` runs with `EXECUTE`, wherever it stands (as a statement, and
/// inside EXPLAIN and CREATE TABLE ... AS EXECUTE).
pub(super) fn executed<'s, 't>(stmt: &'s [Token<'t>]) -> impl Iterator<Item = &'s Token<'t>> {
    stmt.windows(2).filter_map(|w| {
        let skip = ["function", "procedure", "routine", "on"];
        (w[0].is_keyword("execute") && !skip.iter().any(|k| w[1].is_keyword(k))).then_some(&w[1])
    })
}

/// Collects the effects of `stmt` (a statement of `sql`), adding the renames of SQL prepared
/// statement names to `edits`. Statements referring to a prepared statement the session
/// does not know are left to the server to reject.
pub(super) fn collect(
    policy: &Policy,
    sql: &[u8],
    stmt: &[Token<'_>],
    roles: Roles,
    edits: &mut Vec<(Range<usize>, String)>,
    out: &mut Vec<Effect>,
) -> Result<(), Verdict> {
    let word = |i: usize| stmt.get(i).and_then(Token::ident).unwrap_or("");
    let Some(prefix) = &policy.prepared_prefix else {
        return Ok(());
    };
    let server_name = |t: &Token<'_>| t.ident().map(|n| format!("{prefix}{n}"));
    if let Some(reason) = pin_reason(stmt, roles) {
        out.push(Effect::Pin(reason));
    }
    // EXECUTE names a prepared statement wherever it stands: as a statement, and inside
    // EXPLAIN and CREATE TABLE ... AS EXECUTE. Every such name moves into the client's own
    // namespace, so no other statement on the connection can be reached.
    // (Over no tokens when the text names no statement: see `roles.rs`.)
    let named = if roles.any(roles::STATEMENT_NAME) {
        stmt
    } else {
        &[]
    };
    for name_token in executed(named) {
        if let Some(server) = server_name(name_token) {
            edits.push((name_token.start..name_token.end, quote_ident(&server)));
            out.push(Effect::Execute(server));
        }
    }
    // set_config at session level is a SET; calls taking parameters count at Bind.
    let calls = if roles.any(roles::SET_CONFIG) {
        stmt
    } else {
        &[]
    };
    for (i, t) in calls.iter().enumerate() {
        if t.ident() != Some("set_config") {
            continue;
        }
        let Some(call) = super::set_config::parse(sql, stmt, i) else {
            continue;
        };
        if call.takes_params() {
            continue;
        }
        match policy.check_bound_set_config(&call, true, |_| None) {
            Ok(effect) => out.extend(effect),
            Err(_) if policy.unchecked => {}
            Err(v) => return Err(v),
        }
    }
    match word(0) {
        "set" => {
            let mut i = 1;
            match word(1) {
                "local" => return Ok(()),
                "session" if word(2) == "characteristics" => {
                    out.push(Effect::Set {
                        key: "session characteristics".into(),
                        pairs: characteristics(stmt).ok_or_else(|| {
                            policy.refuse_kind("this form of SET SESSION CHARACTERISTICS")
                        })?,
                    });
                    return Ok(());
                }
                "session" => i = 2,
                "transaction" | "constraints" => return Ok(()),
                _ => {}
            }
            let (key, value_at) = match word(i) {
                "time" if word(i + 1) == "zone" => ("timezone".to_owned(), i + 2),
                "schema" => ("search_path".to_owned(), i + 1),
                "names" => ("client_encoding".to_owned(), i + 1),
                "xml" if word(i + 1) == "option" => ("xmloption".to_owned(), i + 2),
                _ => {
                    let Some((name, end)) = super::settings::setting_name(stmt, i) else {
                        return Ok(());
                    };
                    let value_at = match stmt.get(end) {
                        Some(t) if t.is_keyword("to") || t.kind == Kind::Op(b"=") => end + 1,
                        _ => end,
                    };
                    (name, value_at)
                }
            };
            let value = stmt.get(value_at..).unwrap_or_default();
            let resets = match value {
                [t] => t.is_keyword("default") || (key == "timezone" && t.is_keyword("local")),
                _ => false,
            };
            if resets {
                out.push(Effect::Reset(key));
                return Ok(());
            }
            let Some(value) = replay_value(&key, value) else {
                return Err(Verdict::refuse(format!(
                    "this form of SET {key} cannot follow the client across pooled transactions; \
                     give the value as a string literal"
                )));
            };
            out.push(Effect::Set {
                pairs: vec![(key.clone(), value)],
                key,
            });
        }
        "reset" => match word(1) {
            "all" => out.push(Effect::ResetAll),
            "time" if word(2) == "zone" => out.push(Effect::Reset("timezone".into())),
            _ => {
                if let Some((name, _)) = super::settings::setting_name(stmt, 1) {
                    out.push(Effect::Reset(name));
                }
            }
        },
        "discard" if word(1) == "all" => out.push(Effect::DiscardAll),
        "rollback" | "abort" => {
            let mut i = 1;
            if matches!(word(i), "work" | "transaction") {
                i += 1;
            }
            if word(i) == "to" {
                i += 1;
                if word(i) == "savepoint" {
                    i += 1;
                }
                if let Some(name) = stmt.get(i).and_then(Token::ident) {
                    out.push(Effect::RollbackTo(name.to_owned()));
                }
            } else if word(1) != "prepared" {
                out.push(Effect::Rollback);
            }
        }
        "commit" | "end" => {
            let chain = stmt
                .windows(2)
                .any(|w| w[0].is_keyword("and") && w[1].is_keyword("chain"));
            if chain {
                out.push(Effect::CommitChain);
            }
        }
        "savepoint" => {
            if let Some(name) = stmt.get(1).and_then(Token::ident) {
                out.push(Effect::Savepoint(name.to_owned()));
            }
        }
        "release" => {
            let at = if word(1) == "savepoint" { 2 } else { 1 };
            if let Some(name) = stmt.get(at).and_then(Token::ident) {
                out.push(Effect::Release(name.to_owned()));
            }
        }
        "notify" => {
            if let Some(name) = stmt.get(1).and_then(Token::ident) {
                let payload = match (stmt.get(2), stmt.get(3), stmt.len()) {
                    (None, _, _) => Some(String::new()),
                    (Some(comma), Some(t), 4) if comma.is_punct(b',') => match &t.kind {
                        Kind::Str { value: Some(v) } => Some(v.to_string()),
                        _ => None,
                    },
                    _ => None,
                };
                if let Some(payload) = payload {
                    out.push(Effect::Notify {
                        channel: policy.channel(name)?,
                        payload,
                    });
                }
            }
        }
        "listen" | "unlisten" => {
            let unlisten = word(0) == "unlisten";
            match stmt.get(1) {
                Some(t) if t.kind == Kind::Op(b"*") && unlisten => out.push(Effect::UnlistenAll),
                Some(t) => {
                    if let Some(name) = t.ident() {
                        let channel = policy.channel(name)?;
                        out.push(if unlisten {
                            Effect::Unlisten(channel)
                        } else {
                            Effect::Listen(channel)
                        });
                    }
                }
                None => {}
            }
        }
        "prepare" => {
            if let Some(name_token) = stmt.get(1)
                && let Some(server) = server_name(name_token)
            {
                edits.push((name_token.start..name_token.end, quote_ident(&server)));
                let range = match (stmt.first(), stmt.last()) {
                    (Some(a), Some(b)) => a.start..b.end,
                    _ => 0..0,
                };
                let Some(text) = apply(sql, edits, range.clone()) else {
                    return Err(overlapping_rewrites());
                };
                out.push(Effect::Prepare {
                    sql: String::from_utf8_lossy(&text).into_owned(),
                    server_name: server,
                    shown: String::from_utf8_lossy(sql.get(range).unwrap_or_default()).into_owned(),
                });
            }
        }
        "deallocate" => {
            let at = if word(1) == "prepare" { 2 } else { 1 };
            match stmt.get(at) {
                Some(t) if t.is_keyword("all") => out.push(Effect::DeallocateAll),
                Some(t) => {
                    if let Some(server) = server_name(t) {
                        edits.push((t.start..t.end, quote_ident(&server)));
                        out.push(Effect::Deallocate(server));
                    }
                }
                None => {}
            }
        }
        _ => {}
    }
    Ok(())
}

/// The value PostgreSQL stores for `SET name TO <value>` (gram.y `var_list`, flattened as
/// guc.c's `flatten_set_variable_args` does), when the value is a list of literals, names
/// and numbers; `None` for anything else (`INTERVAL ...`, expressions).
fn replay_value(name: &str, value: &[Token<'_>]) -> Option<String> {
    // Of the settings a client may change, only search_path quotes its list elements.
    let list_quote = name == "search_path";
    let mut items = Vec::new();
    for item in value.split(|t| t.is_punct(b',')) {
        let text = match item {
            [t] => match &t.kind {
                Kind::Str { value } => {
                    let v = value.as_deref()?.to_owned();
                    if list_quote { quote_if_needed(&v) } else { v }
                }
                Kind::Ident { name, .. } => {
                    if list_quote {
                        quote_if_needed(name)
                    } else {
                        name.to_string()
                    }
                }
                Kind::Number(n) => String::from_utf8_lossy(n).into_owned(),
                _ => return None,
            },
            [sign, t] if sign.kind == Kind::Op(b"-") || sign.kind == Kind::Op(b"+") => {
                match (&sign.kind, &t.kind) {
                    (Kind::Op(op), Kind::Number(n)) => {
                        format!(
                            "{}{}",
                            String::from_utf8_lossy(op),
                            String::from_utf8_lossy(n)
                        )
                    }
                    _ => return None,
                }
            }
            _ => return None,
        };
        items.push(text);
    }
    (!items.is_empty()).then(|| items.join(", "))
}

/// `SET SESSION CHARACTERISTICS AS TRANSACTION <modes>` as the three settings it changes.
fn characteristics(stmt: &[Token<'_>]) -> Option<Vec<(String, String)>> {
    let words: Vec<&str> = stmt
        .iter()
        .skip(5)
        .map(|t| t.ident().unwrap_or(","))
        .collect();
    if stmt.get(3).is_none_or(|t| !t.is_keyword("as"))
        || stmt.get(4).is_none_or(|t| !t.is_keyword("transaction"))
    {
        return None;
    }
    let mut pairs = Vec::new();
    let mut i = 0;
    while i < words.len() {
        let (pair, used) = match &words[i..] {
            [",", ..] => {
                i += 1;
                continue;
            }
            ["isolation", "level", "read", "committed", ..] => {
                (("default_transaction_isolation", "read committed"), 4)
            }
            ["isolation", "level", "read", "uncommitted", ..] => {
                (("default_transaction_isolation", "read uncommitted"), 4)
            }
            ["isolation", "level", "repeatable", "read", ..] => {
                (("default_transaction_isolation", "repeatable read"), 4)
            }
            ["isolation", "level", "serializable", ..] => {
                (("default_transaction_isolation", "serializable"), 3)
            }
            ["read", "only", ..] => (("default_transaction_read_only", "on"), 2),
            ["read", "write", ..] => (("default_transaction_read_only", "off"), 2),
            ["not", "deferrable", ..] => (("default_transaction_deferrable", "off"), 2),
            ["deferrable", ..] => (("default_transaction_deferrable", "on"), 1),
            _ => return None,
        };
        pairs.push((pair.0.to_owned(), pair.1.to_owned()));
        i += used;
    }
    (!pairs.is_empty()).then_some(pairs)
}

/// `sql[range]` with the `edits` that fall inside it applied; `None` when two of them
/// overlap (one token named twice, e.g. `LISTEN pg_prepared_statements` under transaction
/// pooling: a channel and a relation): no single rewrite is right, and the caller refuses.
pub(super) fn apply(
    sql: &[u8],
    edits: &[(Range<usize>, String)],
    range: Range<usize>,
) -> Option<Vec<u8>> {
    let mut inside: Vec<&(Range<usize>, String)> = edits
        .iter()
        .filter(|(r, _)| r.start >= range.start && r.end <= range.end)
        .collect();
    inside.sort_by_key(|(r, _)| r.start);
    let mut out = Vec::with_capacity(range.len() + 32 * inside.len());
    let mut at = range.start;
    for (r, text) in inside {
        out.extend_from_slice(sql.get(at..r.start)?);
        out.extend_from_slice(text.as_bytes());
        at = r.end;
    }
    out.extend_from_slice(sql.get(at..range.end)?);
    Some(out)
}

/// The refusal for text whose rewrites overlap (see [`apply`]).
pub(super) fn overlapping_rewrites() -> Verdict {
    Verdict::refuse(
        "statement refused: pgtenant would rewrite one of its names in two ways \
         (rename the statement or channel)",
    )
}

/// The statement names SQL text runs with `EXECUTE` (none when it cannot be lexed: such
/// text is refused anyway).
pub fn executed_names(sql: &[u8], standard_conforming: bool) -> Vec<String> {
    let Ok(tokens) = super::lexer::lex(sql, standard_conforming) else {
        return Vec::new();
    };
    executed(&tokens)
        .filter_map(|t| t.ident().map(str::to_owned))
        .collect()
}
