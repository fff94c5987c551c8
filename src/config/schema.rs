//! The TOML schema, exactly as users write it (DESIGN.md §2). Validation and defaults that
//! depend on other tables live in `validate.rs`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use super::duration;

/// The whole file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    pub listen: ListenConfig,
    #[serde(default)]
    pub admin: Option<AdminConfig>,
    #[serde(default)]
    pub metrics: Option<MetricsConfig>,
    #[serde(default)]
    pub audit: Option<AuditConfig>,
    #[serde(default)]
    pub catalog: Option<CatalogConfig>,
    #[serde(default)]
    pub peering: Option<PeeringConfig>,
    #[serde(default)]
    pub pool: PoolConfig,
    #[serde(default)]
    pub shards: BTreeMap<Spanned<String>, ShardConfig>,
    #[serde(default)]
    pub plans: BTreeMap<Spanned<String>, PlanConfig>,
    #[serde(default)]
    pub tenants: Vec<TenantConfig>,
}

/// Where tenant identity is read from, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TenantSource {
    Sni,
    User,
    Database,
}

/// `[listen]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenConfig {
    pub addr: Spanned<String>,
    #[serde(default = "default_tenant_from")]
    pub tenant_from: Vec<TenantSource>,
    #[serde(default = "default_startup_timeout", deserialize_with = "duration::de")]
    pub startup_timeout: Duration,
    #[serde(default = "default_max_unauthenticated")]
    pub max_unauthenticated: usize,
    #[serde(default = "default_max_unauthenticated_per_source")]
    pub max_unauthenticated_per_source: usize,
    /// Largest Query/Parse message pgtenant accepts (bytes); others stream through.
    #[serde(default = "default_max_message_size")]
    pub max_message_size: usize,
    /// On shutdown, how long open transactions (and session-mode sessions) may take to end.
    #[serde(default = "default_shutdown_grace", deserialize_with = "duration::de")]
    pub shutdown_grace: Duration,
    /// Listen with SO_REUSEPORT, so that a second instance can take over the port.
    #[serde(default)]
    pub reuse_port: bool,
    #[serde(default)]
    pub tls: Option<ListenTlsConfig>,
}

fn default_tenant_from() -> Vec<TenantSource> {
    vec![
        TenantSource::Sni,
        TenantSource::User,
        TenantSource::Database,
    ]
}
fn default_startup_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_shutdown_grace() -> Duration {
    Duration::from_secs(30)
}
fn default_max_unauthenticated() -> usize {
    1000
}
fn default_max_unauthenticated_per_source() -> usize {
    256
}
fn default_max_message_size() -> usize {
    64 << 20
}

/// Whether clients may, must or must not use TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ClientTlsMode {
    Disable,
    #[default]
    Prefer,
    Require,
}

/// `[listen.tls]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenTlsConfig {
    pub cert: Spanned<PathBuf>,
    pub key: Spanned<PathBuf>,
    #[serde(default)]
    pub mode: ClientTlsMode,
    #[serde(default)]
    pub sni_suffix: Option<String>,
}

/// `[admin]`: the HTTP endpoint (metrics, health) and the admin console's users.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    #[serde(default)]
    pub http: Option<Spanned<String>>,
    #[serde(default)]
    pub users: Vec<AdminUserConfig>,
}

/// `[metrics]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// `"all"`, `"top:N"` or `"none"`.
    #[serde(default)]
    pub tenant_labels: Option<Spanned<String>>,
}

/// Where shards, plans, tenants and users come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum CatalogSource {
    /// This file.
    #[default]
    File,
    /// Tables in a PostgreSQL database (`pgtenant catalog init`).
    Postgres,
}

/// `[catalog]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CatalogConfig {
    #[serde(default)]
    pub source: CatalogSource,
    /// libpq URL of the catalog database (or `dsn_env`, the variable that holds it).
    #[serde(default)]
    pub dsn: Option<String>,
    #[serde(default)]
    pub dsn_env: Option<String>,
}

/// `[peering]`: instances that forward each other's CancelRequests.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeeringConfig {
    /// This instance's id, 1 to 255 (or `id_env`); without either, claimed in the catalog.
    #[serde(default)]
    pub id: Option<Spanned<u32>>,
    #[serde(default)]
    pub id_env: Option<String>,
    /// The address other instances reach this one's listener at (or `advertise_env`);
    /// default: the listen address once bound.
    #[serde(default)]
    pub advertise: Option<String>,
    #[serde(default)]
    pub advertise_env: Option<String>,
    /// Other instances, by id (this instance's own entry is ignored).
    #[serde(default)]
    pub peers: Vec<PeerConfig>,
}

/// One entry of `[peering] peers`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerConfig {
    pub id: u32,
    pub addr: String,
}

/// `[audit]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditConfig {
    /// File to append JSON lines to; `"-"` is standard output.
    pub path: PathBuf,
}

/// One admin console user.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminUserConfig {
    pub name: String,
    pub scram: Spanned<String>,
}

/// How server connections are shared between clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum PoolMode {
    /// A server connection per transaction.
    #[default]
    Transaction,
    /// A server connection for the client's whole session.
    Session,
}

/// `[pool]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolConfig {
    #[serde(default = "default_pool_mode")]
    pub mode: Spanned<PoolMode>,
    #[serde(
        default = "default_checkout_timeout",
        deserialize_with = "duration::de"
    )]
    pub checkout_timeout: Duration,
    #[serde(
        default = "default_server_idle_timeout",
        deserialize_with = "duration::de"
    )]
    pub server_idle_timeout: Duration,
    #[serde(default = "default_connect_timeout", deserialize_with = "duration::de")]
    pub connect_timeout: Duration,
    #[serde(
        default = "default_client_write_timeout",
        deserialize_with = "duration::de"
    )]
    pub client_write_timeout: Duration,
    /// How often each shard is probed (a login); `"0"` turns health checks off.
    #[serde(
        default = "default_health_check_interval",
        deserialize_with = "duration::de"
    )]
    pub health_check_interval: Duration,
    /// A probe that takes longer fails.
    #[serde(
        default = "default_health_check_timeout",
        deserialize_with = "duration::de"
    )]
    pub health_check_timeout: Duration,
}

fn default_health_check_interval() -> Duration {
    Duration::from_secs(1)
}
fn default_health_check_timeout() -> Duration {
    Duration::from_secs(2)
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            mode: default_pool_mode(),
            checkout_timeout: default_checkout_timeout(),
            server_idle_timeout: default_server_idle_timeout(),
            connect_timeout: default_connect_timeout(),
            client_write_timeout: default_client_write_timeout(),
            health_check_interval: default_health_check_interval(),
            health_check_timeout: default_health_check_timeout(),
        }
    }
}

fn default_pool_mode() -> Spanned<PoolMode> {
    Spanned::new(0..0, PoolMode::default())
}
fn default_checkout_timeout() -> Duration {
    Duration::from_secs(5)
}
fn default_server_idle_timeout() -> Duration {
    Duration::from_secs(300)
}
fn default_connect_timeout() -> Duration {
    Duration::from_secs(5)
}
fn default_client_write_timeout() -> Duration {
    Duration::from_secs(60)
}

/// TLS towards a shard, with libpq's `sslmode` meanings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum ServerTlsMode {
    Disable,
    #[default]
    Prefer,
    Require,
    VerifyFull,
}

/// `[shards.<name>]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShardConfig {
    pub host: String,
    #[serde(default = "default_port")]
    pub port: u16,
    pub database: String,
    pub user: String,
    #[serde(default)]
    pub password: Option<String>,
    #[serde(default)]
    pub password_env: Option<String>,
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    #[serde(default)]
    pub tls: ServerTlsMode,
    /// CA bundle (PEM) that signs the server certificate; used with `tls = "verify-full"`.
    #[serde(default)]
    pub ca: Option<PathBuf>,
    /// A login role with read privileges only: `readonly` tenant users reach the shard as it,
    /// so the database itself refuses their writes.
    #[serde(default)]
    pub readonly_user: Option<String>,
    #[serde(default)]
    pub readonly_password: Option<String>,
    #[serde(default)]
    pub readonly_password_env: Option<String>,
    /// The shard's tenant-context key (hex, mode 0600), written by `pgtenant shard init`.
    /// With it, pgtenant binds the verified context that `pgtenant.tenant_id()` returns.
    #[serde(default)]
    pub context_key_file: Option<PathBuf>,
    /// Streaming replicas of this shard's server: read-only work may go there.
    #[serde(default)]
    pub replicas: Vec<ReplicaConfig>,
    /// A replica further behind than this is skipped.
    #[serde(default = "default_max_replica_lag", deserialize_with = "duration::de")]
    pub max_replica_lag: Duration,
}

/// One entry of a shard's `replicas`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplicaConfig {
    pub host: String,
    #[serde(default = "default_port")]
    pub port: u16,
}

fn default_max_replica_lag() -> Duration {
    Duration::from_secs(10)
}

fn default_port() -> u16 {
    5432
}
fn default_max_connections() -> usize {
    50
}

/// `[plans.<name>]`: per-tenant limits. Every key is optional: absent means unlimited.
#[derive(Debug, Deserialize, Default, Clone)]
#[serde(deny_unknown_fields)]
pub struct PlanConfig {
    #[serde(default)]
    pub max_client_connections: Option<usize>,
    #[serde(default)]
    pub max_server_connections: Option<usize>,
    #[serde(default)]
    pub queries_per_second: Option<u32>,
    #[serde(default, deserialize_with = "duration::de_opt")]
    pub statement_timeout: Option<Duration>,
    #[serde(default, deserialize_with = "duration::de_opt")]
    pub idle_in_transaction_timeout: Option<Duration>,
    /// The largest client message pgtenant reads whole for this tenant (bytes), below
    /// `listen.max_message_size`.
    #[serde(default)]
    pub max_message_size: Option<usize>,
}

/// Where a tenant's data lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PlacementKind {
    /// Shared tables on a shard, rows filtered by row-level security.
    Shared,
    /// The tenant's own schema on a shard.
    Schema,
    /// The tenant's own database (its own shard entry).
    Dedicated,
}

/// `placement = { kind = ..., shard = ..., schema = ... }`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlacementConfig {
    pub kind: PlacementKind,
    pub shard: Spanned<String>,
    #[serde(default)]
    pub schema: Option<String>,
}

/// How a tenant is kept inside its data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum IsolationMode {
    /// The shard's login role, with the tenant context bound on every transaction.
    #[default]
    Context,
    /// The tenant's own PostgreSQL role (`server_user`).
    Role,
}

/// A tenant's own certificate, served when SNI names it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantTlsConfig {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// What a user may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum UserRole {
    #[default]
    Readwrite,
    Readonly,
}

/// `[[tenants.users]]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserConfig {
    pub name: Spanned<String>,
    pub scram: Spanned<String>,
    #[serde(default)]
    pub role: UserRole,
}

/// `[[tenants]]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantConfig {
    pub id: Spanned<String>,
    pub name: Spanned<String>,
    #[serde(default)]
    pub subdomain: Option<String>,
    #[serde(default)]
    pub plan: Option<Spanned<String>>,
    pub placement: PlacementConfig,
    /// Per-tenant overrides of the plan's limits.
    #[serde(default)]
    pub settings: PlanConfig,
    #[serde(default)]
    pub tls: Option<TenantTlsConfig>,
    #[serde(default)]
    pub isolation: IsolationMode,
    /// DDL on its own schema (schema placement with `isolation = "role"` only).
    #[serde(default)]
    pub allow_ddl: bool,
    #[serde(default)]
    pub server_user: Option<String>,
    #[serde(default)]
    pub server_password: Option<String>,
    #[serde(default)]
    pub server_password_env: Option<String>,
    /// With `isolation = "role"`: the tenant's read-only role, for its `readonly` users.
    #[serde(default)]
    pub server_readonly_user: Option<String>,
    #[serde(default)]
    pub server_readonly_password: Option<String>,
    #[serde(default)]
    pub server_readonly_password_env: Option<String>,
    #[serde(default)]
    pub users: Vec<UserConfig>,
}
