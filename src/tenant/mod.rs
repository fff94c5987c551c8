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

pub use crate::own_sql::{
    TENANT_SETTING, binding_sql, quote_ident, quote_if_needed, quote_literal,
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tenant_ids_display_canonically() {
        let id = TenantId::parse("6F1C2B7E1D0A4C399D0E6F3B2A1C9E01").unwrap();
        assert_eq!(id.to_string(), "6f1c2b7e-1d0a-4c39-9d0e-6f3b2a1c9e01");
        assert!(TenantId::parse("acme").is_err());
    }
}
