//! Routing an authenticated tenant (DESIGN.md §1.4 and §1.6): the database parameter must name
//! the tenant or its placement's database, and the placement names the shard to use.

use std::sync::Arc;

use crate::config::{Shard, Snapshot, Tenant};
use crate::error::{ClientError, ErrorKind, Reportable, sqlstate};

/// Why a tenant's session cannot be routed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    #[error("database \"{0}\" does not exist")]
    UnknownDatabase(String),
    #[error("the database name names another tenant")]
    OtherTenant,
    #[error("the tenant's shard is not configured")]
    NoShard,
}

impl Reportable for RouteError {
    fn kind(&self) -> ErrorKind {
        match self {
            RouteError::OtherTenant => ErrorKind::Auth,
            _ => ErrorKind::Routing,
        }
    }

    fn client_error(&self) -> Option<ClientError> {
        Some(match self {
            RouteError::UnknownDatabase(_) => {
                ClientError::fatal(sqlstate::INVALID_CATALOG_NAME, self.to_string())
                    .with_hint("connect to the tenant's name as the database, or leave it out")
            }
            RouteError::OtherTenant => ClientError::fatal(
                sqlstate::INVALID_AUTHORIZATION,
                "the tenant named by the database differs from the tenant you authenticated as",
            ),
            RouteError::NoShard => ClientError::fatal(
                sqlstate::INVALID_CATALOG_NAME,
                "no database is available for this tenant",
            ),
        })
    }
}

/// Checks the requested database and returns the tenant's shard.
pub fn route(
    snapshot: &Snapshot,
    tenant: &Tenant,
    database: Option<&str>,
) -> Result<Arc<Shard>, RouteError> {
    let shard = snapshot
        .shard_of(tenant)
        .cloned()
        .ok_or(RouteError::NoShard)?;
    match database.filter(|d| !d.is_empty()) {
        None => {}
        Some(db) if db == tenant.name || db == shard.database => {}
        Some(db) if snapshot.tenant_by_name(db).is_some() => return Err(RouteError::OtherTenant),
        Some(db) => return Err(RouteError::UnknownDatabase(db.to_owned())),
    }
    Ok(shard)
}
