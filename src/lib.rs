//! pgtenant: a tenant-aware PostgreSQL connection proxy.
//!
//! Clients speak the PostgreSQL v3 protocol to pgtenant as if it were the database; pgtenant
//! authenticates them as a tenant's user, routes them to the shard, schema or database where
//! the tenant lives, binds the tenant context on the server connection and forwards frames.
//! DESIGN.md §8 gives the module map; `protocol`, `config`, `auth::scram`, `auth::identity` and
//! `tenant` are sans-IO.

#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

pub mod admin;
pub mod app;
pub mod auth;
pub mod cancel;
pub mod catalog;
pub mod check;
pub mod cli;
pub mod config;
pub mod demo;
pub mod domain;
pub mod error;
pub mod localpg;
pub mod net;
pub mod own_sql;
pub mod pool;
pub mod protocol;
pub mod quota;
pub mod registry;
pub mod session;
pub mod shard_init;
pub mod state;
pub mod telemetry;
pub mod tenant;
pub mod timers;
