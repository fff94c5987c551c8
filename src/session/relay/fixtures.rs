//! Fixtures for unit tests, benchmarks and fuzz targets (built with `cfg(test)` or the
//! `fixtures` feature only; never in the production binary's API).

use super::{Binding, RelayRules};
use crate::tenant::guard::{Policy, Scope};

impl RelayRules {
    /// A shared tenant "acme" bound to the id `x`, session pooling, an optional query rate:
    /// the one fixture for unit tests, benchmarks and fuzz targets.
    pub fn sample_shared(queries_per_second: Option<u32>) -> RelayRules {
        RelayRules {
            policy: Policy {
                scope: Scope::Tenant,
                protect_search_path: false,
                readonly: false,
                max_statement_timeout: None,
                notify_prefix: Some("acme.".into()),
                allow_ddl: false,
                prepared_prefix: None,
                lock_salt: None,
                unchecked: false,
                prepared_view: None,
            },
            rebind_sql: "SET app.current_tenant_id TO 'x'".into(),
            startup_settings: Vec::new(),
            binding: Binding {
                sql: "SET app.current_tenant_id TO 'x'".into(),
                tenant_id: "x".into(),
                search_path: None,
                verified: false,
                encoded: None,
            },
            client_id: 1,
            tenant: crate::quota::Quotas::default().tenant("acme"),
            queries_per_second,
            notify_prefix: Some("acme.".into()),
            audit: crate::telemetry::audit::Audit::default(),
            who: crate::telemetry::audit::Who::default(),
        }
    }
}
