//! What the identifiers of a text could set off, found in one pass over its tokens: the
//! guard's passes that look for particular names (denied functions, `set_config`, writes to
//! `pg_settings`, statement names, pinning words, ...) run only when such a name is present.
//!
//! Exact by construction: a role is set for every identifier a pass would act on (the test
//! `gated_verdicts_equal_full_verdicts` checks the verdicts with and without the gate), and a
//! pass skipped for a whole text would have found nothing in any of its statements.
//!
//! The lists of names the passes look for live here too, so that the passes depend on this
//! module and not the other way round.

use super::advisory::ADVISORY_FUNCTIONS;
use super::lexer::{Kind, Token};

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
    "pg_prepared_xact",
    "pg_lock_status",
    "pg_stat_ssl",
    "pg_stat_gssapi",
    "pg_stat_get_progress_info",
    "cursor_to_xml",
    "cursor_to_xmlschema",
];
/// Name prefixes refused the same way.
const DENIED_PREFIXES: &[&str] = &[
    "lo_",
    "dblink",
    // The *_to_xml functions read any relation or query by name, so they would reach the
    // catalog views denied above.
    "query_to_xml",
    "table_to_xml",
    "schema_to_xml",
    "database_to_xml",
    "pg_stat_progress_",
    "pg_stat_get_backend",
    "pg_stat_statements",
    "pg_ls_",
];

/// The first two letters of every denied name: most identifiers are ruled out by them
/// before the lists are searched (a unit test keeps the lists within them).
const DENIED_STARTS: &[&[u8; 2]] = &[
    b"pg", b"lo", b"ts", b"cu", b"db", b"qu", b"ta", b"sc", b"da",
];

/// Whether identifier `name` is a denied function or view (Tenant scope).
pub(super) fn is_denied(name: &str) -> bool {
    let start = name.as_bytes().first_chunk::<2>();
    start.is_some_and(|s| DENIED_STARTS.contains(&s))
        && (DENIED_FUNCTIONS.contains(&name) || DENIED_PREFIXES.iter().any(|p| name.starts_with(p)))
}

#[cfg(test)]
pub(super) fn denied_names() -> impl Iterator<Item = &'static str> {
    DENIED_FUNCTIONS.iter().chain(DENIED_PREFIXES).copied()
}

/// Functions taking a session-level advisory lock (held past the transaction).
pub(super) const SESSION_LOCK_FUNCTIONS: &[&str] = &[
    "pg_advisory_lock",
    "pg_advisory_lock_shared",
    "pg_try_advisory_lock",
    "pg_try_advisory_lock_shared",
];

/// A set of roles (bits below).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Roles(u16);

/// A denied function or view name (`is_denied`).
pub(super) const DENIED: u16 = 1;
/// An advisory-lock function (`ADVISORY_FUNCTIONS`).
pub(super) const ADVISORY: u16 = 1 << 1;
/// `set_config`.
pub(super) const SET_CONFIG: u16 = 1 << 2;
/// `pg_notify`.
pub(super) const NOTIFY: u16 = 1 << 3;
/// `pg_settings`.
pub(super) const SETTINGS: u16 = 1 << 4;
/// An unquoted `update`, `insert`, `delete` or `merge`.
pub(super) const WRITE: u16 = 1 << 5;
/// An unquoted `execute`, `prepare` or `deallocate` (a statement name follows).
pub(super) const STATEMENT_NAME: u16 = 1 << 6;
/// `pg_prepared_statements`.
pub(super) const PREPARED_VIEW: u16 = 1 << 7;
/// A word that may pin the connection: unquoted `temp`, `temporary`, `hold`; `pg_temp`,
/// `pg_temp_*`; a session advisory-lock function.
pub(super) const PIN: u16 = 1 << 8;

impl Roles {
    /// Every role: the gate open for every pass.
    #[cfg(test)]
    pub(super) const ALL: Roles = Roles(u16::MAX);

    /// The roles of `tokens`' identifiers.
    pub(super) fn of(tokens: &[Token<'_>]) -> Roles {
        let mut roles = 0;
        for t in tokens {
            if let Kind::Ident { name, quoted } = &t.kind {
                roles |= of_name(name, *quoted);
            }
        }
        Roles(roles)
    }

    /// True when any of `roles` (bits) is present.
    pub(super) fn any(self, roles: u16) -> bool {
        self.0 & roles != 0
    }
}

/// The roles of one identifier.
fn of_name(name: &str, quoted: bool) -> u16 {
    // Every name below starts with one of these bytes; most identifiers stop here.
    let Some(&first) = name.as_bytes().first() else {
        return 0;
    };
    if !matches!(
        first,
        b'c' | b'd' | b'e' | b'h' | b'i' | b'l' | b'm' | b'p' | b'q' | b's' | b't' | b'u'
    ) {
        return 0;
    }
    let mut roles = if is_denied(name) { DENIED } else { 0 };
    let keyword = !quoted;
    // By length first: most identifiers are compared with a name or two, or none.
    roles |= match (name.len(), name) {
        (4, "temp" | "hold") | (9, "temporary") if keyword => PIN,
        (5, "merge") | (6, "update" | "insert" | "delete") if keyword => WRITE,
        (7, "execute" | "prepare") | (10, "deallocate") if keyword => STATEMENT_NAME,
        (10, "set_config") => SET_CONFIG,
        (9, "pg_notify") => NOTIFY,
        (11, "pg_settings") => SETTINGS,
        (22, "pg_prepared_statements") => PREPARED_VIEW,
        (7, "pg_temp") => PIN,
        _ => 0,
    };
    if name.starts_with("pg_") {
        if name.starts_with("pg_temp_") {
            roles |= PIN;
        }
        if ADVISORY_FUNCTIONS.contains(&name) {
            roles |= ADVISORY;
            if SESSION_LOCK_FUNCTIONS.contains(&name) {
                roles |= PIN;
            }
        }
    }
    roles
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_name_a_pass_acts_on_has_its_role() {
        for name in denied_names() {
            assert!(of_name(name, false) & DENIED != 0, "{name}");
            assert!(of_name(name, true) & DENIED != 0, "{name}");
        }
        for name in ADVISORY_FUNCTIONS {
            assert!(of_name(name, true) & ADVISORY != 0, "{name}");
        }
        for name in SESSION_LOCK_FUNCTIONS {
            assert!(of_name(name, true) & PIN != 0, "{name}");
        }
        for (name, role) in [
            ("set_config", SET_CONFIG),
            ("pg_notify", NOTIFY),
            ("pg_settings", SETTINGS),
            ("pg_prepared_statements", PREPARED_VIEW),
            ("pg_temp", PIN),
            ("pg_temp_3", PIN),
        ] {
            assert_eq!(of_name(name, true) & role, role, "{name}");
        }
        for (words, role) in [
            (&["update", "insert", "delete", "merge"][..], WRITE),
            (&["execute", "prepare", "deallocate"][..], STATEMENT_NAME),
            (&["temp", "temporary", "hold"][..], PIN),
        ] {
            for w in words {
                assert_eq!(of_name(w, false) & role, role, "{w}");
                // Quoted, they are names, not keywords.
                assert_eq!(of_name(w, true) & role, 0, "{w}");
            }
        }
        for plain in ["select", "name", "from", "items", "where", "id", ""] {
            assert_eq!(of_name(plain, false), 0, "{plain}");
        }
    }
}
