//! The values the configuration is made of and every layer above it shares: a tenant's id,
//! a SCRAM verifier, a shard's context key. They depend on nothing else in pgtenant, so the
//! configuration can hold them without depending on the modules that use them.

pub mod context_key;
pub mod verifier;

use std::fmt;

/// A tenant's UUID.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TenantId(uuid::Uuid);

impl TenantId {
    /// Parses the canonical or simple UUID forms.
    pub fn parse(text: &str) -> Result<Self, uuid::Error> {
        uuid::Uuid::parse_str(text).map(TenantId)
    }
}

impl fmt::Display for TenantId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0.hyphenated(), f)
    }
}

impl fmt::Debug for TenantId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TenantId({self})")
    }
}
