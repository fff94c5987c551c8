//! pgtenant's own SQL: every statement it sends on a server connection that the client did not
//! write (the reset between tenants, the tenant binding, the replay of a session's settings,
//! LISTEN/UNLISTEN on the shared notification connection), and the quoting they use. Values
//! from tenants or clients go in as Bind parameters or through these quoting functions,
//! never as raw text.

use crate::config::{PlacementKind, Tenant};

/// Returns a server connection to its just-connected state: settings, prepared statements,
/// cursors, temporary tables, LISTEN registrations and advisory locks (and unbinds it).
pub const RESET: &str = "DISCARD ALL";

/// The name of the setting RLS policies read.
pub const TENANT_SETTING: &str = "app.current_tenant_id";

/// SQL that binds `tenant`'s context on a server connection, as one simple-query string.
/// Dedicated placements get the tenant id too: their own policies may read it.
pub fn binding_sql(tenant: &Tenant) -> String {
    let mut sql = format!("SET {TENANT_SETTING} TO '{}'", tenant.id);
    if let (PlacementKind::Schema, Some(schema)) = (tenant.placement.kind, &tenant.placement.schema)
    {
        sql.push_str(&format!("; SET search_path TO {}", quote_ident(schema)));
    }
    sql
}

/// Quotes `value` as an SQL string literal, correct whatever `standard_conforming_strings` is.
pub fn quote_literal(value: &str) -> String {
    let doubled = value.replace('\'', "''");
    if value.contains('\\') {
        format!("E'{}'", doubled.replace('\\', "\\\\"))
    } else {
        format!("'{doubled}'")
    }
}

/// Quotes `name` as an SQL identifier.
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// An identifier as PostgreSQL's `quote_identifier` writes it (quoted unless plain).
pub fn quote_if_needed(name: &str) -> String {
    let plain = name
        .bytes()
        .next()
        .is_some_and(|b| b.is_ascii_lowercase() || b == b'_')
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if plain {
        name.to_owned()
    } else {
        quote_ident(name)
    }
}

/// Settings back to the server's defaults, then `rebind` (the tenant's binding): before a
/// client's own settings are replayed on a connection.
pub fn reset_settings_then(rebind: &str) -> String {
    format!("RESET ALL; {rebind}")
}

/// The prepared statement that binds a tenant (name, text): the tenant id, plus the
/// verified-context token (`verified`) and the schema's `search_path`, as parameters `$1..`.
pub fn binding_statement(verified: bool, search_path: bool) -> (&'static str, &'static str) {
    match (verified, search_path) {
        (false, false) => (
            "pgt_bind1",
            "SELECT pg_catalog.set_config('app.current_tenant_id', $1, false)",
        ),
        (false, true) => (
            "pgt_bind2",
            "SELECT pg_catalog.set_config('app.current_tenant_id', $1, false), \
             pg_catalog.set_config('search_path', $2, false)",
        ),
        (true, false) => (
            "pgt_bind3",
            "SELECT pg_catalog.set_config('app.current_tenant_id', $1, false), \
             pg_catalog.set_config('pgtenant.context', $2, false)",
        ),
        (true, true) => (
            "pgt_bind4",
            "SELECT pg_catalog.set_config('app.current_tenant_id', $1, false), \
             pg_catalog.set_config('pgtenant.context', $2, false), \
             pg_catalog.set_config('search_path', $3, false)",
        ),
    }
}

/// `SELECT pg_catalog.set_config($1, $2, false), ...` for `n` settings (names and values are
/// the parameters).
pub fn set_configs(n: usize) -> String {
    let calls: Vec<String> = (0..n)
        .map(|i| {
            format!(
                "pg_catalog.set_config(${}, ${}, false)",
                2 * i + 1,
                2 * i + 2
            )
        })
        .collect();
    format!("SELECT {}", calls.join(", "))
}

/// `LISTEN` on `channel` (the name as the server knows it).
pub fn listen(channel: &str) -> String {
    format!("LISTEN {}", quote_ident(channel))
}

/// `UNLISTEN` of `channel`.
pub fn unlisten(channel: &str) -> String {
    format!("UNLISTEN {}", quote_ident(channel))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting() {
        assert_eq!(quote_literal("a'b"), "'a''b'");
        assert_eq!(quote_literal(r"a\'b"), r"E'a\\''b'");
        assert_eq!(quote_ident("t_\"x"), "\"t_\"\"x\"");
    }

    #[test]
    fn statements() {
        assert_eq!(
            set_configs(2),
            "SELECT pg_catalog.set_config($1, $2, false), pg_catalog.set_config($3, $4, false)"
        );
        assert_eq!(listen("t1\"x"), "LISTEN \"t1\"\"x\"");
        assert_eq!(binding_statement(false, false).0, "pgt_bind1");
        assert_eq!(binding_statement(true, true).0, "pgt_bind4");
    }
}
