//! Session effects of statements, for transaction pooling (DESIGN.md §6). A client's session
//! outlives any one server connection, so what it changes at session level is tracked here
//! and replayed on the next connection. That covers settings, LISTEN registrations and
//! SQL-level prepared statements. SQL prepared statement names are renamed into the client's
//! own namespace, so they can be re-created on whichever server connection the client gets.

use std::ops::Range;

use super::lexer::{Kind, Token};
use super::policy::{Policy, Verdict};
use crate::tenant::quote_ident;

/// A session-level change one statement makes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// A setting changed for the session: `key` identifies it, `sql` replays it.
    Set { key: String, sql: String },
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
    /// `PREPARE`: the server-side name and the statement that creates it there.
    Prepare { server_name: String, sql: String },
    /// `EXECUTE` of a server-side name.
    Execute(String),
    /// `DEALLOCATE` of a server-side name.
    Deallocate(String),
    /// `DEALLOCATE ALL`.
    DeallocateAll,
}

/// Collects the effects of `stmt` (a statement of `sql`), adding the renames of SQL prepared
/// statement names to `edits`. Statements referring to a prepared statement the session
/// does not know are left to the server to reject.
pub(super) fn collect(
    policy: &Policy,
    sql: &[u8],
    stmt: &[Token<'_>],
    edits: &mut Vec<(Range<usize>, String)>,
    out: &mut Vec<Effect>,
) -> Result<(), Verdict> {
    let word = |i: usize| stmt.get(i).and_then(Token::ident).unwrap_or("");
    let raw = |from: usize| -> String {
        match (stmt.get(from), stmt.last()) {
            (Some(a), Some(b)) => String::from_utf8_lossy(&sql[a.start..b.end]).into_owned(),
            _ => String::new(),
        }
    };
    let Some(prefix) = &policy.prepared_prefix else {
        return Ok(());
    };
    let server_name = |t: &Token<'_>| t.ident().map(|n| format!("{prefix}{n}"));
    match word(0) {
        "set" => {
            let mut i = 1;
            match word(1) {
                "local" => return Ok(()),
                "session" if word(2) == "characteristics" => {
                    out.push(Effect::Set {
                        key: "session characteristics".into(),
                        sql: raw(0),
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
            out.push(Effect::Set {
                sql: format!("SET {} TO {}", quote_ident(&key), raw(value_at)),
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
                out.push(Effect::Prepare {
                    sql: String::from_utf8_lossy(&apply(sql, edits, range)).into_owned(),
                    server_name: server,
                });
            }
        }
        "execute" => {
            if let Some(name_token) = stmt.get(1)
                && let Some(server) = server_name(name_token)
            {
                edits.push((name_token.start..name_token.end, quote_ident(&server)));
                out.push(Effect::Execute(server));
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

/// `sql[range]` with the `edits` that fall inside it applied.
pub(super) fn apply(sql: &[u8], edits: &[(Range<usize>, String)], range: Range<usize>) -> Vec<u8> {
    let mut inside: Vec<&(Range<usize>, String)> = edits
        .iter()
        .filter(|(r, _)| r.start >= range.start && r.end <= range.end)
        .collect();
    inside.sort_by_key(|(r, _)| r.start);
    let mut out = Vec::with_capacity(range.len() + 32 * inside.len());
    let mut at = range.start;
    for (r, text) in inside {
        out.extend_from_slice(&sql[at..r.start]);
        out.extend_from_slice(text.as_bytes());
        at = r.end;
    }
    out.extend_from_slice(&sql[at..range.end]);
    out
}
