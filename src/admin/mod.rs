//! The operator surface (DESIGN.md §7): Prometheus metrics and health over HTTP
//! (`admin.http`), the admin console over the PostgreSQL protocol (database `pgtenant`), and
//! the watch that reloads the configuration when its file changes. It reads and acts on what
//! sessions share (`state`); nothing below it calls it.

pub mod console;
pub mod http;
pub mod watch;
