//! The catalog in PostgreSQL (`[catalog] source = "postgres"`): shards, plans, tenants and
//! their users live in tables of a control-plane database instead of the configuration file,
//! so that several pgtenant instances share them. The file keeps each instance's own settings
//! (listener, pool, admin, metrics, audit).
//!
//! The catalog's rows are turned into the TOML tables the file would hold and validated by
//! the same code, so both sources build the same snapshot and a catalog that would not
//! validate changes nothing. A trigger on every table sends `NOTIFY pgtenant_catalog`; each
//! instance listens and reloads, so a change reaches all of them within a second. While the
//! catalog is unreachable the last good snapshot keeps serving.
//!
//! Read through deadpool-postgres: control plane only, never the data path.

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio_postgres::NoTls;
use tokio_util::sync::CancellationToken;

use crate::config::{self, CatalogSource, Snapshot};

mod instances;
mod rows;

pub use instances::{HEARTBEAT, claim_instance, heartbeat, release_instance};
pub use rows::{Imported, fetch_toml, import};

/// The channel the catalog's trigger notifies.
pub const CHANNEL: &str = "pgtenant_catalog";

/// How long one catalog read or write may take.
const PATIENCE: Duration = Duration::from_secs(5);

/// Why the catalog could not be used.
#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("catalog dsn: {0}")]
    Dsn(String),
    #[error("catalog database: {0}")]
    Db(String),
    #[error("the catalog database did not answer within {0:?}")]
    Timeout(Duration),
    #[error("{0}")]
    Content(String),
    #[error(transparent)]
    Config(#[from] config::ConfigError),
}

impl From<tokio_postgres::Error> for CatalogError {
    fn from(e: tokio_postgres::Error) -> Self {
        CatalogError::Db(match e.as_db_error() {
            Some(db) => format!("{} ({})", db.message(), db.code().code()),
            None => e.to_string(),
        })
    }
}

impl From<deadpool_postgres::PoolError> for CatalogError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        CatalogError::Db(e.to_string())
    }
}

/// The tables, their NOTIFY trigger, and nothing else. Idempotent.
pub const INIT_SQL: &str = r#"
CREATE SCHEMA IF NOT EXISTS pgtenant_catalog;
CREATE TABLE IF NOT EXISTS pgtenant_catalog.shards (
    name text PRIMARY KEY,
    host text NOT NULL,
    port integer NOT NULL DEFAULT 5432,
    database text NOT NULL,
    "user" text NOT NULL,
    -- the other keys of [shards.<name>]: password_env, max_connections, tls, ...
    settings jsonb NOT NULL DEFAULT '{}'
);
CREATE TABLE IF NOT EXISTS pgtenant_catalog.plans (
    name varchar(50) PRIMARY KEY,
    -- the keys of [plans.<name>]: max_client_connections, statement_timeout, ...
    settings jsonb NOT NULL DEFAULT '{}'
);
CREATE TABLE IF NOT EXISTS pgtenant_catalog.tenants (
    id uuid PRIMARY KEY,
    name varchar(255) NOT NULL UNIQUE,
    subdomain varchar(100) UNIQUE,
    plan varchar(50) DEFAULT 'basic',
    -- the tenant's overrides of its plan
    settings jsonb NOT NULL DEFAULT '{}',
    created_at timestamp DEFAULT CURRENT_TIMESTAMP,
    placement text NOT NULL CHECK (placement IN ('shared', 'schema', 'dedicated')),
    shard text NOT NULL,
    schema_name text,
    -- the other keys of [[tenants]]: isolation, allow_ddl, server_user, tls, ...
    options jsonb NOT NULL DEFAULT '{}'
);
CREATE TABLE IF NOT EXISTS pgtenant_catalog.users (
    tenant_id uuid NOT NULL REFERENCES pgtenant_catalog.tenants (id) ON DELETE CASCADE,
    name text NOT NULL,
    -- a SCRAM-SHA-256 verifier (`pgtenant passwd`); never a password
    scram text NOT NULL CHECK (scram LIKE 'SCRAM-SHA-256$%'),
    role text NOT NULL DEFAULT 'readwrite' CHECK (role IN ('readwrite', 'readonly')),
    PRIMARY KEY (tenant_id, name)
);
-- Running instances (`[peering]`): their ids and listener addresses, for forwarding cancels.
-- Not a catalog change: no trigger.
CREATE TABLE IF NOT EXISTS pgtenant_catalog.instances (
    id smallint PRIMARY KEY CHECK (id BETWEEN 1 AND 255),
    addr text NOT NULL,
    seen timestamptz NOT NULL DEFAULT now()
);
CREATE OR REPLACE FUNCTION pgtenant_catalog.notify_change() RETURNS trigger
    LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('pgtenant_catalog', TG_TABLE_NAME);
    RETURN NULL;
END
$$;
DO $$
DECLARE t text;
BEGIN
    FOREACH t IN ARRAY ARRAY['shards', 'plans', 'tenants', 'users'] LOOP
        EXECUTE format('DROP TRIGGER IF EXISTS notify_change ON pgtenant_catalog.%I', t);
        EXECUTE format('CREATE TRIGGER notify_change AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE
                        ON pgtenant_catalog.%I FOR EACH STATEMENT
                        EXECUTE FUNCTION pgtenant_catalog.notify_change()', t);
    END LOOP;
END
$$;
"#;

fn pg_config(dsn: &str) -> Result<tokio_postgres::Config, CatalogError> {
    tokio_postgres::Config::from_str(dsn).map_err(|e| CatalogError::Dsn(e.to_string()))
}

/// A small pool of catalog connections (they open on first use).
pub fn pool(dsn: &str) -> Result<Pool, CatalogError> {
    let mut config = pg_config(dsn)?;
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(PATIENCE);
    }
    let manager = Manager::from_config(
        config,
        NoTls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Verified,
        },
    );
    Pool::builder(manager)
        .max_size(2)
        .runtime(Runtime::Tokio1)
        .wait_timeout(Some(PATIENCE))
        .create_timeout(Some(PATIENCE))
        .build()
        .map_err(|e| CatalogError::Dsn(e.to_string()))
}

/// Runs one piece of catalog work, bounded by `PATIENCE`. In the control runtime's context
/// (`timers::in_control`): the PostgreSQL client and pool make timers of their own (connect,
/// wait and create timeouts), which the proxy's runtime has no driver for.
async fn within<T>(
    f: impl std::future::Future<Output = Result<T, CatalogError>>,
) -> Result<T, CatalogError> {
    crate::timers::in_control(crate::timers::timeout(PATIENCE, f))
        .await
        .map_err(|_| CatalogError::Timeout(PATIENCE))?
}

/// `pgtenant catalog init`: creates the tables and their trigger.
pub async fn init(pool: &Pool) -> Result<(), CatalogError> {
    within(async {
        let client = pool.get().await?;
        client.batch_execute(INIT_SQL).await?;
        Ok(())
    })
    .await
}

/// The configuration text in force: the file's, plus the catalog's tables when the file
/// says the catalog is in PostgreSQL (`pool` is that catalog's).
pub async fn source_text(path: &Path, pool: Option<&Pool>) -> Result<String, CatalogError> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        CatalogError::Config(config::ConfigError {
            file: path.to_owned(),
            line: None,
            subject: None,
            message: format!("cannot read: {e}"),
        })
    })?;
    let base = config::load_str(&text, path)?;
    if base.catalog.source != CatalogSource::Postgres {
        return Ok(text);
    }
    let own: toml::Table =
        toml::from_str(&text).map_err(|e| CatalogError::Content(e.to_string()))?;
    if let Some(key) = ["shards", "plans", "tenants"]
        .into_iter()
        .find(|k| own.contains_key(*k))
    {
        return Err(CatalogError::Content(format!(
            "{}: with [catalog] source = \"postgres\", {key} come from the catalog; remove them from the file",
            path.display()
        )));
    }
    let fetched = match pool {
        Some(pool) => fetch_toml(pool).await?,
        None => {
            let dsn = base
                .catalog
                .dsn
                .as_ref()
                .map(|s| s.0.as_str())
                .unwrap_or_default();
            fetch_toml(&self::pool(dsn)?).await?
        }
    };
    Ok(format!(
        "{text}\n\n# ---- from the catalog database (pgtenant_catalog.*) ----\n{fetched}"
    ))
}

/// Loads the configuration file and, when it says so, the catalog in PostgreSQL.
pub async fn load(path: &Path, pool: Option<&Pool>) -> Result<Snapshot, CatalogError> {
    let text = source_text(path, pool).await?;
    Ok(config::load_str(&text, path)?)
}

/// `MOVE TENANT` with the catalog in PostgreSQL: the tenant's shard, in the catalog.
pub async fn set_shard(pool: &Pool, tenant: &str, shard: &str) -> Result<(), CatalogError> {
    within(async {
        let client = pool.get().await?;
        let n = client
            .execute(
                "UPDATE pgtenant_catalog.tenants SET shard = $2 WHERE name = $1",
                &[&tenant, &shard],
            )
            .await?;
        if n != 1 {
            return Err(CatalogError::Content(format!(
                "the catalog has no tenant {tenant:?}"
            )));
        }
        Ok(())
    })
    .await
}

/// Listens for catalog changes and calls `reload` on each (within a second of the commit). When
/// the listening connection is lost it reconnects with backoff and reloads once, in case it
/// missed a change; meanwhile the snapshot in force keeps serving.
pub fn watch<R, F>(dsn: String, reload: R, stop: CancellationToken) -> tokio::task::JoinHandle<()>
where
    R: Fn() -> F + Send + Sync + 'static,
    F: std::future::Future<Output = ()> + Send,
{
    tokio::spawn(async move {
        let mut backoff = Duration::from_millis(200);
        let mut first = true;
        loop {
            let listened = tokio::select! {
                r = listen_once(&dsn, &reload, first) => r,
                _ = stop.cancelled() => return,
            };
            first = false;
            match listened {
                Ok(()) => backoff = Duration::from_millis(200),
                Err(e) => {
                    tracing::warn!(error = %e, "catalog: cannot listen for changes; the snapshot in force keeps serving");
                }
            }
            tokio::select! {
                _ = crate::timers::sleep(backoff) => {}
                _ = stop.cancelled() => return,
            }
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    })
}

/// One listening connection, until it breaks. Reloads after LISTEN unless it is the first
/// (the snapshot was just loaded), then on every notification.
async fn listen_once<R, F>(dsn: &str, reload: &R, first: bool) -> Result<(), CatalogError>
where
    R: Fn() -> F,
    F: std::future::Future<Output = ()>,
{
    let mut config = pg_config(dsn)?;
    config.connect_timeout(PATIENCE);
    let (client, mut connection) = within(async { Ok(config.connect(NoTls).await?) }).await?;
    let (tx, mut rx) = tokio::sync::mpsc::channel::<()>(1);
    let driver = tokio::spawn(async move {
        loop {
            match std::future::poll_fn(|cx| connection.poll_message(cx)).await {
                Some(Ok(tokio_postgres::AsyncMessage::Notification(_))) => {
                    let _ = tx.try_send(());
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(CatalogError::from(e)),
                None => return Ok(()),
            }
        }
    });
    within(async { Ok(client.batch_execute(&format!("LISTEN {CHANNEL}")).await?) }).await?;
    tracing::info!("catalog: listening for changes");
    if !first {
        reload().await;
    }
    while rx.recv().await.is_some() {
        // Changes come in bursts (a transaction touching several tables notifies once per
        // table and statement): let it settle, then read the catalog once.
        crate::timers::sleep(Duration::from_millis(50)).await;
        while rx.try_recv().is_ok() {}
        tracing::info!("catalog changed");
        reload().await;
    }
    drop(client);
    match driver.await {
        Ok(r) => r,
        Err(e) => Err(CatalogError::Db(e.to_string())),
    }
}
