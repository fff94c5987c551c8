//! Advisory locks on shared placements: each tenant's keys move into a namespace of its own
//! (XOR with a salt derived from the shard's context key), so two tenants' equal keys are
//! different locks while a tenant's own locks behave as on PostgreSQL.

use std::ops::Range;

use super::lexer::Token;
use super::types::Verdict;

/// PostgreSQL's advisory lock functions that take a key (session and transaction level).
pub(super) const ADVISORY_FUNCTIONS: &[&str] = &[
    "pg_advisory_lock",
    "pg_advisory_lock_shared",
    "pg_try_advisory_lock",
    "pg_try_advisory_lock_shared",
    "pg_advisory_unlock",
    "pg_advisory_unlock_shared",
    "pg_advisory_xact_lock",
    "pg_advisory_xact_lock_shared",
    "pg_try_advisory_xact_lock",
    "pg_try_advisory_xact_lock_shared",
];

/// Rewrites the call of advisory lock function `name` at `tokens[at]` so that its key moves
/// into the tenant's namespace: `f(k)` becomes `f((k)::bigint # salt)`, `f(a, b)` becomes
/// `f((a)::integer # s1, (b)::integer # s2)`. Only the parentheses and the comma are
/// edited, so nested calls are rewritten too. Any other shape is refused (a call the guard
/// cannot rewrite would reach another tenant's locks).
pub(super) fn namespace_lock_keys(
    name: &str,
    tokens: &[Token<'_>],
    at: usize,
    salt: u64,
    edits: &mut Vec<(Range<usize>, String)>,
) -> Result<(), Verdict> {
    let refuse = || {
        Verdict::refuse(format!(
            "{name}() is allowed only as a direct call with one bigint key or two integer keys"
        ))
    };
    let open = tokens
        .get(at + 1)
        .filter(|t| t.is_punct(b'('))
        .ok_or_else(refuse)?;
    let mut depth = 0usize;
    let mut commas = Vec::new();
    let mut close = None;
    for t in &tokens[at + 1..] {
        if t.is_punct(b'(') || t.is_punct(b'[') {
            depth += 1;
        } else if t.is_punct(b')') || t.is_punct(b']') {
            depth -= 1;
            if depth == 0 {
                close = Some(t);
                break;
            }
        } else if depth == 1 && t.is_punct(b',') {
            commas.push(t);
        }
    }
    let close = close.ok_or_else(refuse)?;
    if close.start == open.end {
        return Err(refuse());
    }
    let salt64 = salt as i64;
    match commas.as_slice() {
        [] => {
            edits.push((open.start..open.end, "((".into()));
            edits.push((
                close.start..close.end,
                format!(")::bigint # '{salt64}'::bigint)"),
            ));
        }
        [comma] => {
            let (high, low) = ((salt >> 32) as u32 as i32, salt as u32 as i32);
            edits.push((open.start..open.end, "((".into()));
            edits.push((
                comma.start..comma.end,
                format!(")::integer # '{high}'::integer, ("),
            ));
            edits.push((
                close.start..close.end,
                format!(")::integer # '{low}'::integer)"),
            ));
        }
        _ => return Err(refuse()),
    }
    Ok(())
}
