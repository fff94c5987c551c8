//! The snapshot: the immutable catalog in force (listener settings, shards, plans, tenants and
//! their users), built only from a configuration that validated. Sessions hold an `Arc` of the
//! snapshot they started with.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use super::{
    ClientTlsMode, PlacementKind, PlanConfig, PoolMode, ServerTlsMode, TenantSource, UserRole,
};
use crate::domain::TenantId;
use crate::domain::verifier::ScramVerifier;

/// A password that never shows up in logs or `Debug` output.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub String);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(..)")
    }
}

/// A certificate chain and its private key, read from PEM files.
#[derive(Debug)]
pub struct CertMaterial {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
}

impl Clone for CertMaterial {
    fn clone(&self) -> Self {
        CertMaterial {
            chain: self.chain.clone(),
            key: self.key.clone_key(),
        }
    }
}

/// The catalog in force.
#[derive(Debug)]
pub struct Snapshot {
    pub source: PathBuf,
    pub listen: Listen,
    pub pool: PoolSettings,
    pub admin: Admin,
    pub shards: BTreeMap<String, Arc<Shard>>,
    pub tenants: Vec<Arc<Tenant>>,
    /// `[catalog]`: where shards, plans, tenants and users come from, and the catalog
    /// database's URL (also the default of `pgtenant catalog import`).
    pub catalog: Catalog,
    /// `[peering]`, when this instance has peers.
    pub peering: Option<Peering>,
    by_name: HashMap<String, Arc<Tenant>>,
    by_subdomain: HashMap<String, Arc<Tenant>>,
    /// Tests only (never set from a file): sessions run without the guard, to prove what the
    /// verified context enforces on its own.
    pub unguarded_for_tests: bool,
}

impl Snapshot {
    pub(super) fn new(
        source: PathBuf,
        listen: Listen,
        pool: PoolSettings,
        admin: Admin,
        shards: BTreeMap<String, Arc<Shard>>,
        tenants: Vec<Arc<Tenant>>,
    ) -> Self {
        let by_name = tenants
            .iter()
            .map(|t| (t.name.clone(), Arc::clone(t)))
            .collect();
        let by_subdomain = tenants
            .iter()
            .map(|t| (t.subdomain.clone(), Arc::clone(t)))
            .collect();
        Snapshot {
            catalog: Catalog::default(),
            peering: None,
            unguarded_for_tests: false,
            source,
            listen,
            pool,
            admin,
            shards,
            tenants,
            by_name,
            by_subdomain,
        }
    }

    /// The tenant called `name`.
    pub fn tenant_by_name(&self, name: &str) -> Option<&Arc<Tenant>> {
        self.by_name.get(name)
    }

    /// The tenant whose subdomain (SNI label) is `label`.
    pub fn tenant_by_subdomain(&self, label: &str) -> Option<&Arc<Tenant>> {
        self.by_subdomain.get(label)
    }

    /// The shard a tenant's placement names. Validation guarantees it exists.
    pub fn shard_of(&self, tenant: &Tenant) -> Option<&Arc<Shard>> {
        self.shards.get(&tenant.placement.shard)
    }
}

/// `[catalog]`, resolved.
#[derive(Debug, Clone, Default)]
pub struct Catalog {
    pub source: super::CatalogSource,
    pub dsn: Option<Secret>,
}

/// `[peering]`, resolved.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Peering {
    /// This instance's id; `None`: claimed in the catalog at start.
    pub id: Option<u8>,
    pub advertise: Option<String>,
    /// Other instances' listeners by id.
    pub peers: BTreeMap<u8, String>,
}

/// `[listen]`, resolved.
#[derive(Debug)]
pub struct Listen {
    pub addr: SocketAddr,
    pub tenant_from: Vec<TenantSource>,
    pub startup_timeout: Duration,
    pub max_unauthenticated: usize,
    pub max_unauthenticated_per_source: usize,
    pub max_message_size: usize,
    pub shutdown_grace: Duration,
    pub reuse_port: bool,
    pub tls: Option<ListenTls>,
}

/// `[listen.tls]`, with certificates loaded.
#[derive(Debug)]
pub struct ListenTls {
    pub cert: CertMaterial,
    pub mode: ClientTlsMode,
    pub sni_suffix: Option<String>,
}

/// `[pool]`.
#[derive(Debug, Clone)]
pub struct PoolSettings {
    pub mode: PoolMode,
    pub checkout_timeout: Duration,
    pub server_idle_timeout: Duration,
    pub connect_timeout: Duration,
    /// A client that takes nothing of what pgtenant has for it for this long, while a server
    /// connection is attached, is disconnected (0: never).
    pub client_write_timeout: Duration,
    /// Each shard is probed this often (zero: never); a shard whose probe or a new
    /// connection fails is marked down until a probe succeeds.
    pub health_check_interval: Duration,
    pub health_check_timeout: Duration,
}

/// `[admin]` and `[metrics]`: the operator surface.
#[derive(Debug, Default)]
pub struct Admin {
    pub http: Option<SocketAddr>,
    pub users: Vec<(String, ScramVerifier)>,
    pub tenant_labels: TenantLabels,
    /// `[audit] path` (relative paths resolved against the configuration file's directory;
    /// `-` is standard output).
    pub audit: Option<std::path::PathBuf>,
}

/// Which tenants get a `tenant` label of their own in the metrics (`metrics.tenant_labels`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TenantLabels {
    /// Every tenant.
    All,
    /// The N most recently active tenants; the rest are `tenant="other"`.
    Top(usize),
    /// No tenant label.
    None,
}

impl Default for TenantLabels {
    fn default() -> Self {
        TenantLabels::Top(1000)
    }
}

impl std::str::FromStr for TenantLabels {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "all" => Ok(TenantLabels::All),
            "none" => Ok(TenantLabels::None),
            _ => s
                .strip_prefix("top:")
                .and_then(|n| n.parse::<usize>().ok())
                .filter(|n| *n > 0)
                .map(TenantLabels::Top)
                .ok_or_else(|| {
                    format!(
                        "metrics.tenant_labels {s:?} must be \"all\", \"none\" or \"top:N\" (N > 0)"
                    )
                }),
        }
    }
}

/// A PostgreSQL endpoint + database + login role.
#[derive(Debug, Clone)]
pub struct Shard {
    pub name: String,
    pub host: String,
    pub port: u16,
    pub database: String,
    pub user: String,
    pub password: Option<Secret>,
    pub max_connections: usize,
    pub tls: ServerTlsMode,
    pub ca: Vec<CertificateDer<'static>>,
    /// The read-only login role for `readonly` users, and its password.
    pub readonly: Option<(String, Option<Secret>)>,
    /// `context_key_file`, resolved against the configuration's directory.
    pub context_key_file: Option<std::path::PathBuf>,
    /// The key read from it; `None` while the file does not exist yet (`shard init`
    /// creates it; the proxy refuses to start without it).
    pub context_key: Option<Arc<crate::domain::context_key::ContextKey>>,
    /// Streaming replicas: the same database, logins and key, at another address (each
    /// named `<shard>#replica<N>`, with no replicas of its own).
    pub replicas: Vec<Arc<Shard>>,
    /// Replicas further behind than this are skipped.
    pub max_replica_lag: Duration,
}

impl Shard {
    /// Whether this is a replica of another shard.
    pub fn is_replica(&self) -> bool {
        self.name.contains("#replica")
    }
}

/// Where a tenant lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    pub kind: PlacementKind,
    pub shard: String,
    /// The tenant's schema (kind `schema` only).
    pub schema: Option<String>,
}

/// How pgtenant logs in to the tenant's shard.
#[derive(Debug, Clone)]
pub enum Isolation {
    /// The shard's login role; the tenant context is bound on the connection.
    Context,
    /// The tenant's own role (and its read-only role, for `readonly` users).
    Role {
        user: String,
        password: Option<Secret>,
        readonly: Option<(String, Option<Secret>)>,
    },
}

/// One of a tenant's users.
#[derive(Debug)]
pub struct TenantUser {
    pub name: String,
    pub verifier: ScramVerifier,
    pub role: UserRole,
}

/// A tenant, as the snapshot knows it.
#[derive(Debug)]
pub struct Tenant {
    pub id: TenantId,
    pub name: String,
    pub subdomain: String,
    pub plan: Option<String>,
    pub placement: Placement,
    /// The plan's limits with the tenant's overrides applied.
    pub limits: PlanConfig,
    pub isolation: Isolation,
    /// May run DDL in its own schema.
    pub allow_ddl: bool,
    pub users: HashMap<String, TenantUser>,
    pub tls: Option<CertMaterial>,
}
