//! The tenant guard (DESIGN.md §5 S1), sans-IO: decides, for the SQL text of each Query or
//! Parse a client sends, whether it may reach a shared or schema placement.
//!
//! Statements are lexed exactly (`lexer`) and checked against an allow-list of statement kinds.
//! Names of denied functions are refused wherever they stand as identifiers. Settings that
//! bind the tenant (`app.current_tenant_id`, a schema tenant's `search_path`, roles) cannot be
//! changed. `RESET ALL`/`DISCARD ALL` are let through, and the context is bound again after
//! them. LISTEN/UNLISTEN/NOTIFY channels are moved into the tenant's namespace. Anything the
//! lexer cannot read is refused. Dedicated placements skip the tenant checks but keep the
//! read-only and statement-timeout rules.

mod advisory;
mod effects;
pub mod lexer;
mod memo;
mod policy;
mod roles;
mod set_config;
mod settings;
#[cfg(test)]
mod tests;
mod types;

pub use effects::executed_names;
pub use memo::PassedTexts;
pub use policy::{is_reserved_name, unknown_statement};
pub use set_config::{Bound, parse_bool};
pub use settings::is_settable;
pub use types::{Arg, Effect, Policy, Refusal, Scope, SetConfigCall, Verdict};
