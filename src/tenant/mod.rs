//! Tenants: their identifier, the context pgtenant binds on server connections, and routing.
//!
//! The context is `app.current_tenant_id` (read by the row-level-security policies of the seed
//! design: `USING (tenant_id = current_setting('app.current_tenant_id')::UUID)`) and, for
//! schema placements, `search_path`. It is always bound with SQL on the server connection,
//! never through the server's startup packet, so `RESET ALL`/`DISCARD ALL` return it to empty
//! rather than to the tenant.

pub mod context;
pub mod guard;
pub mod params;
pub mod route;

pub use crate::domain::TenantId;

use crate::config::{PlacementKind, Tenant};

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
    fn tenant_ids_display_canonically() {
        let id = TenantId::parse("6F1C2B7E1D0A4C399D0E6F3B2A1C9E01").unwrap();
        assert_eq!(id.to_string(), "6f1c2b7e-1d0a-4c39-9d0e-6f3b2a1c9e01");
        assert!(TenantId::parse("acme").is_err());
    }
}
