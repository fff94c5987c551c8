//! The operator surface (DESIGN.md §7): Prometheus metrics and health over HTTP
//! (`admin.http`), and the admin console over the PostgreSQL protocol (database `pgtenant`).

pub mod console;
pub mod http;
pub mod metrics;
pub mod registry;
