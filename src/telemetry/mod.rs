//! What pgtenant records about its tenants' sessions: the audit log (one line per session
//! event, never a password, query text or parameter) and the Prometheus metrics. Sessions and
//! pools write here; the operator surface (`admin`) reads it.

pub mod audit;
pub mod metrics;
pub mod session_span;
