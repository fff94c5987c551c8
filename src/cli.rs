//! The command line (clap): run the proxy, check a configuration, make a SCRAM verifier, run
//! the demo.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// A tenant-aware PostgreSQL connection proxy.
#[derive(Debug, Parser)]
#[command(name = "pgtenant", version, about)]
pub struct Cli {
    /// Configuration file (runs the proxy when no command is given).
    #[arg(long, short, global = true, env = "PGTENANT_CONFIG")]
    pub config: Option<PathBuf>,
    /// Threads serving connections when running the proxy. 1 runs everything on one thread,
    /// as PgBouncer does: the least CPU per transaction, best on small machines. Default: one
    /// on a machine of two cores or fewer, else one per CPU core.
    #[arg(long, global = true, env = "PGTENANT_THREADS")]
    pub threads: Option<usize>,
    /// Log line format on standard error: `text` (colours only when it is a terminal) or
    /// `json` (one object per line, with the session's id and tenant as span fields).
    #[arg(long, global = true, env = "PGTENANT_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// `--log-format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// What to do.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the proxy (the default).
    Run,
    /// Validate a configuration file and exit.
    Check {
        /// Also connect to every shard and report isolation problems there.
        #[arg(long)]
        shards: bool,
    },
    /// Read a password from standard input and print its SCRAM-SHA-256 verifier.
    Passwd,
    /// Shard administration.
    #[command(subcommand)]
    Shard(ShardCommand),
    /// The catalog in PostgreSQL (`[catalog] source = "postgres"`).
    #[command(subcommand)]
    Catalog(CatalogCommand),
    /// Start two throwaway PostgreSQL clusters with four sample tenants behind pgtenant.
    Demo {
        /// Port for pgtenant to listen on (0 picks a free one).
        #[arg(long, default_value_t = 6432)]
        port: u16,
    },
}

/// `pgtenant catalog ...`.
#[derive(Debug, Subcommand)]
pub enum CatalogCommand {
    /// Create the catalog tables (schema `pgtenant_catalog`) and their NOTIFY trigger.
    /// Idempotent.
    Init {
        /// The catalog database as a libpq URL; default: `[catalog] dsn` of --config.
        #[arg(long, env = "PGTENANT_CATALOG_DSN")]
        dsn: Option<String>,
    },
    /// Replace the catalog's shards, plans, tenants and users with those of --config (which
    /// is validated first), in one transaction. Running instances reload within a second.
    Import {
        /// The catalog database as a libpq URL; default: `[catalog] dsn` of --config.
        #[arg(long, env = "PGTENANT_CATALOG_DSN")]
        dsn: Option<String>,
    },
}

/// `pgtenant shard ...`.
#[derive(Debug, Subcommand)]
pub enum ShardCommand {
    /// Install the verified tenant context on a shard (schema `pgtenant`, its key, grants)
    /// and harden it for pgtenant's login role. Idempotent.
    Init {
        /// The shard, as named in the configuration.
        #[arg(long)]
        shard: String,
        /// A privileged role to install with, as a libpq URL (used once, never stored), e.g.
        /// postgres://postgres@db-host:5432/app
        #[arg(long, env = "PGTENANT_ADMIN_URL")]
        admin_url: String,
    },
}
