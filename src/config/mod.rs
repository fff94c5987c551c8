//! The configuration file: its TOML schema (DESIGN.md §2, the user-facing contract), loading,
//! and the validation that turns it into an immutable [`Snapshot`].
//!
//! Every table is `deny_unknown_fields`, so a misspelt key is an error naming its line. Names
//! of keys are a contract: add keys, never rename them. Semantic errors (an unknown shard, a
//! duplicate tenant) name the file, the line and the offending tenant or shard.

mod ctx;
mod duration;
mod edit;
mod schema;
mod shards;
mod snapshot;
mod tenants;
mod validate;

pub use duration::{format_duration, parse_duration};
pub use edit::with_tenant_shard;
pub use schema::*;
pub use snapshot::*;
pub use validate::build_snapshot;

use std::fmt;
use std::path::{Path, PathBuf};

/// A configuration problem, located as precisely as the source allows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: PathBuf,
    pub line: Option<usize>,
    /// The tenant or shard the problem is about, e.g. `tenant "acme"`.
    pub subject: Option<String>,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        write!(f, ": ")?;
        if let Some(subject) = &self.subject {
            write!(f, "{subject}: ")?;
        }
        write!(f, "{}", self.message)
    }
}

impl std::error::Error for ConfigError {}

/// Reads, parses and validates a configuration file into a snapshot.
pub fn load(path: &Path) -> Result<Snapshot, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
        file: path.to_owned(),
        line: None,
        subject: None,
        message: format!("cannot read: {e}"),
    })?;
    load_str(&text, path)
}

/// Parses and validates configuration text; `path` names the source in errors and anchors
/// relative paths (certificates) at its directory.
pub fn load_str(text: &str, path: &Path) -> Result<Snapshot, ConfigError> {
    let file: ConfigFile = toml::from_str(text).map_err(|e| ConfigError {
        file: path.to_owned(),
        line: e.span().map(|s| line_of(text, s.start)),
        subject: None,
        message: e.message().trim().to_owned(),
    })?;
    build_snapshot(file, text, path)
}

/// 1-based line number of byte offset `at` in `text`.
pub(crate) fn line_of(text: &str, at: usize) -> usize {
    text.as_bytes()
        .iter()
        .take(at.min(text.len()))
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}
