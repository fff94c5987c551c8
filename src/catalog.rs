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
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio_postgres::NoTls;
use tokio_util::sync::CancellationToken;

use crate::config::{self, CatalogSource, Snapshot};

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

async fn within<T>(
    f: impl std::future::Future<Output = Result<T, CatalogError>>,
) -> Result<T, CatalogError> {
    tokio::time::timeout(PATIENCE, f)
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

/// What `import` wrote.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Imported {
    pub shards: usize,
    pub plans: usize,
    pub tenants: usize,
    pub users: usize,
}

/// `pgtenant catalog import`: replaces the catalog's shards, plans, tenants and users with
/// those of the configuration `text` (validated first), in one transaction.
pub async fn import(pool: &Pool, text: &str, path: &Path) -> Result<Imported, CatalogError> {
    config::load_str(text, path)?;
    let file: toml::Table =
        toml::from_str(text).map_err(|e| CatalogError::Content(e.to_string()))?;
    let table = |key: &str| -> toml::Table {
        file.get(key)
            .and_then(toml::Value::as_table)
            .cloned()
            .unwrap_or_default()
    };
    within(async {
        let mut client = pool.get().await?;
        let tx = client.transaction().await?;
        tx.batch_execute(
            "DELETE FROM pgtenant_catalog.users; DELETE FROM pgtenant_catalog.tenants;
             DELETE FROM pgtenant_catalog.plans; DELETE FROM pgtenant_catalog.shards;",
        )
        .await?;
        let mut done = Imported::default();
        for (name, shard) in table("shards") {
            let mut rest = shard.as_table().cloned().unwrap_or_default();
            let port = match rest.remove("port") {
                Some(toml::Value::Integer(p)) => p as i32,
                _ => 5432,
            };
            let text_of = |t: &mut toml::Table, k: &str| {
                t.remove(k)
                    .and_then(|v| v.as_str().map(str::to_owned))
                    .unwrap_or_default()
            };
            let (host, database, user) = (
                text_of(&mut rest, "host"),
                text_of(&mut rest, "database"),
                text_of(&mut rest, "user"),
            );
            tx.execute(
                "INSERT INTO pgtenant_catalog.shards (name, host, port, database, \"user\", settings)
                 VALUES ($1, $2, $3, $4, $5, $6::text::jsonb)",
                &[&name, &host, &port, &database, &user, &json(&rest)?],
            )
            .await?;
            done.shards += 1;
        }
        for (name, plan) in table("plans") {
            let settings = plan.as_table().cloned().unwrap_or_default();
            tx.execute(
                "INSERT INTO pgtenant_catalog.plans (name, settings) VALUES ($1, $2::text::jsonb)",
                &[&name, &json(&settings)?],
            )
            .await?;
            done.plans += 1;
        }
        let tenants = file
            .get("tenants")
            .and_then(toml::Value::as_array)
            .cloned()
            .unwrap_or_default();
        for tenant in tenants {
            let mut rest = tenant.as_table().cloned().unwrap_or_default();
            let take = |t: &mut toml::Table, k: &str| {
                t.remove(k).and_then(|v| v.as_str().map(str::to_owned))
            };
            let id = take(&mut rest, "id").unwrap_or_default();
            let name = take(&mut rest, "name").unwrap_or_default();
            let subdomain = take(&mut rest, "subdomain");
            let plan = take(&mut rest, "plan");
            let settings = match rest.remove("settings") {
                Some(toml::Value::Table(t)) => t,
                _ => toml::Table::new(),
            };
            let mut placement = match rest.remove("placement") {
                Some(toml::Value::Table(t)) => t,
                _ => toml::Table::new(),
            };
            let kind = take(&mut placement, "kind").unwrap_or_default();
            let shard = take(&mut placement, "shard").unwrap_or_default();
            let schema = take(&mut placement, "schema");
            let users = match rest.remove("users") {
                Some(toml::Value::Array(u)) => u,
                _ => Vec::new(),
            };
            tx.execute(
                "INSERT INTO pgtenant_catalog.tenants
                    (id, name, subdomain, plan, settings, placement, shard, schema_name, options)
                 VALUES ($1::text::uuid, $2, $3, $4, $5::text::jsonb, $6, $7, $8, $9::text::jsonb)",
                &[
                    &id,
                    &name,
                    &subdomain,
                    &plan,
                    &json(&settings)?,
                    &kind,
                    &shard,
                    &schema,
                    &json(&rest)?,
                ],
            )
            .await?;
            done.tenants += 1;
            for user in users {
                let mut u = user.as_table().cloned().unwrap_or_default();
                let user_name = take(&mut u, "name").unwrap_or_default();
                let scram = take(&mut u, "scram").unwrap_or_default();
                let role = take(&mut u, "role").unwrap_or_else(|| "readwrite".to_owned());
                tx.execute(
                    "INSERT INTO pgtenant_catalog.users (tenant_id, name, scram, role)
                     VALUES ($1::text::uuid, $2, $3, $4)",
                    &[&id, &user_name, &scram, &role],
                )
                .await?;
                done.users += 1;
            }
        }
        tx.commit().await?;
        Ok(done)
    })
    .await
}

/// A TOML table as JSON text.
fn json(t: &toml::Table) -> Result<String, CatalogError> {
    serde_json::to_string(t).map_err(|e| CatalogError::Content(e.to_string()))
}

/// JSON text from the catalog as a TOML table (nulls dropped: TOML has none).
fn toml_table(json_text: &str, what: &str) -> Result<toml::Table, CatalogError> {
    fn strip(v: serde_json::Value) -> Option<serde_json::Value> {
        use serde_json::Value;
        match v {
            Value::Null => None,
            Value::Array(a) => Some(Value::Array(a.into_iter().filter_map(strip).collect())),
            Value::Object(o) => Some(Value::Object(
                o.into_iter()
                    .filter_map(|(k, v)| strip(v).map(|v| (k, v)))
                    .collect(),
            )),
            v => Some(v),
        }
    }
    let value: serde_json::Value = serde_json::from_str(json_text)
        .map_err(|e| CatalogError::Content(format!("{what}: {e}")))?;
    let Some(serde_json::Value::Object(o)) = strip(value) else {
        return Err(CatalogError::Content(format!(
            "{what}: a JSON object was expected"
        )));
    };
    toml::Table::try_from(o).map_err(|e| CatalogError::Content(format!("{what}: {e}")))
}

/// The catalog's rows as the TOML tables a configuration file would hold (`[shards.*]`,
/// `[plans.*]`, `[[tenants]]` with their users), read in one consistent snapshot.
pub async fn fetch_toml(pool: &Pool) -> Result<String, CatalogError> {
    within(async {
        let mut client = pool.get().await?;
        let tx = client
            .build_transaction()
            .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .await?;
        let mut root = toml::Table::new();
        let mut shards = toml::Table::new();
        for row in tx
            .query(
                "SELECT name, host, port, database, \"user\", settings::text
                 FROM pgtenant_catalog.shards ORDER BY name",
                &[],
            )
            .await?
        {
            let name: String = row.get(0);
            let mut t = toml_table(row.get(5), &format!("shard {name:?} settings"))?;
            t.insert("host".into(), toml::Value::String(row.get(1)));
            t.insert(
                "port".into(),
                toml::Value::Integer(i64::from(row.get::<_, i32>(2))),
            );
            t.insert("database".into(), toml::Value::String(row.get(3)));
            t.insert("user".into(), toml::Value::String(row.get(4)));
            shards.insert(name, toml::Value::Table(t));
        }
        let mut plans = toml::Table::new();
        for row in tx
            .query(
                "SELECT name, settings::text FROM pgtenant_catalog.plans ORDER BY name",
                &[],
            )
            .await?
        {
            let name: String = row.get(0);
            let t = toml_table(row.get(1), &format!("plan {name:?}"))?;
            plans.insert(name, toml::Value::Table(t));
        }
        let mut users: std::collections::HashMap<String, Vec<toml::Value>> = Default::default();
        for row in tx
            .query(
                "SELECT tenant_id::text, name, scram, role FROM pgtenant_catalog.users
                 ORDER BY tenant_id, name",
                &[],
            )
            .await?
        {
            let mut u = toml::Table::new();
            u.insert("name".into(), toml::Value::String(row.get(1)));
            u.insert("scram".into(), toml::Value::String(row.get(2)));
            u.insert("role".into(), toml::Value::String(row.get(3)));
            users
                .entry(row.get(0))
                .or_default()
                .push(toml::Value::Table(u));
        }
        let mut tenants = Vec::new();
        for row in tx
            .query(
                "SELECT id::text, name, subdomain, plan, settings::text, placement, shard,
                        schema_name, options::text
                 FROM pgtenant_catalog.tenants ORDER BY created_at, name",
                &[],
            )
            .await?
        {
            let id: String = row.get(0);
            let name: String = row.get(1);
            let mut t = toml_table(row.get(8), &format!("tenant {name:?} options"))?;
            t.insert("id".into(), toml::Value::String(id.clone()));
            t.insert("name".into(), toml::Value::String(name.clone()));
            if let Some(s) = row.get::<_, Option<String>>(2) {
                t.insert("subdomain".into(), toml::Value::String(s));
            }
            if let Some(p) = row.get::<_, Option<String>>(3) {
                t.insert("plan".into(), toml::Value::String(p));
            }
            let settings = toml_table(row.get(4), &format!("tenant {name:?} settings"))?;
            if !settings.is_empty() {
                t.insert("settings".into(), toml::Value::Table(settings));
            }
            let mut placement = toml::Table::new();
            placement.insert("kind".into(), toml::Value::String(row.get(5)));
            placement.insert("shard".into(), toml::Value::String(row.get(6)));
            if let Some(s) = row.get::<_, Option<String>>(7) {
                placement.insert("schema".into(), toml::Value::String(s));
            }
            t.insert("placement".into(), toml::Value::Table(placement));
            t.insert(
                "users".into(),
                toml::Value::Array(users.remove(&id).unwrap_or_default()),
            );
            tenants.push(toml::Value::Table(t));
        }
        tx.commit().await?;
        root.insert("shards".into(), toml::Value::Table(shards));
        root.insert("plans".into(), toml::Value::Table(plans));
        root.insert("tenants".into(), toml::Value::Array(tenants));
        toml::to_string(&root).map_err(|e| CatalogError::Content(e.to_string()))
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

/// An instance that has not refreshed its row for this long is gone: its id may be claimed.
const INSTANCE_TTL_SECONDS: i32 = 30;
/// How often a running instance refreshes its row and reads its peers'.
pub const HEARTBEAT: Duration = Duration::from_secs(5);

/// Claims an instance id for the listener at `addr`: the lowest id no live instance holds
/// (an instance restarted at the same address gets its old one back).
pub async fn claim_instance(pool: &Pool, addr: &str) -> Result<u8, CatalogError> {
    within(async {
        let mut client = pool.get().await?;
        let tx = client.transaction().await?;
        // One claim at a time, so that two instances starting together get different ids.
        tx.execute(
            "SELECT pg_advisory_xact_lock(hashtext('pgtenant_catalog.instances'))",
            &[],
        )
        .await?;
        let row = tx
            .query_opt(
                "INSERT INTO pgtenant_catalog.instances (id, addr, seen)
                 SELECT g, $1, now() FROM generate_series(1, 255) g
                  WHERE NOT EXISTS (
                        SELECT 1 FROM pgtenant_catalog.instances i
                         WHERE i.id = g AND i.addr <> $1
                           AND i.seen > now() - make_interval(secs => $2))
                  ORDER BY g LIMIT 1
                 ON CONFLICT (id) DO UPDATE SET addr = EXCLUDED.addr, seen = now()
                 RETURNING id",
                &[&addr, &f64::from(INSTANCE_TTL_SECONDS)],
            )
            .await?;
        tx.commit().await?;
        let id: i16 = row
            .ok_or_else(|| CatalogError::Content("all 255 instance ids are taken".into()))?
            .get(0);
        u8::try_from(id).map_err(|_| CatalogError::Content(format!("instance id {id}")))
    })
    .await
}

/// Refreshes this instance's row (`id` at `addr`) and returns the other live instances.
pub async fn heartbeat(
    pool: &Pool,
    id: u8,
    addr: &str,
) -> Result<std::collections::BTreeMap<u8, String>, CatalogError> {
    within(async {
        let client = pool.get().await?;
        client
            .execute(
                "INSERT INTO pgtenant_catalog.instances (id, addr, seen) VALUES ($1, $2, now())
                 ON CONFLICT (id) DO UPDATE SET addr = EXCLUDED.addr, seen = now()",
                &[&i16::from(id), &addr],
            )
            .await?;
        let rows = client
            .query(
                "SELECT id, addr FROM pgtenant_catalog.instances
                  WHERE id <> $1 AND seen > now() - make_interval(secs => $2)",
                &[&i16::from(id), &f64::from(INSTANCE_TTL_SECONDS)],
            )
            .await?;
        Ok(rows
            .iter()
            .filter_map(|r| Some((u8::try_from(r.get::<_, i16>(0)).ok()?, r.get(1))))
            .collect())
    })
    .await
}

/// Frees this instance's id (at shutdown).
pub async fn release_instance(pool: &Pool, id: u8) -> Result<(), CatalogError> {
    within(async {
        let client = pool.get().await?;
        client
            .execute(
                "DELETE FROM pgtenant_catalog.instances WHERE id = $1",
                &[&i16::from(id)],
            )
            .await?;
        Ok(())
    })
    .await
}

/// Listens for catalog changes and reloads on each (within a second of the commit). When
/// the listening connection is lost it reconnects with backoff and reloads once, in case it
/// missed a change; meanwhile the snapshot in force keeps serving.
pub fn watch(
    dsn: String,
    state: Arc<crate::app::AppState>,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut backoff = Duration::from_millis(200);
        let mut first = true;
        loop {
            let listened = tokio::select! {
                r = listen_once(&dsn, &state, first) => r,
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
                _ = tokio::time::sleep(backoff) => {}
                _ = stop.cancelled() => return,
            }
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    })
}

/// One listening connection, until it breaks. Reloads after LISTEN unless it is the first
/// (the snapshot was just loaded), then on every notification.
async fn listen_once(
    dsn: &str,
    state: &crate::app::AppState,
    first: bool,
) -> Result<(), CatalogError> {
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
        let _ = state.reload_from_source().await;
    }
    while rx.recv().await.is_some() {
        // Changes come in bursts (a transaction touching several tables notifies once per
        // table and statement): let it settle, then read the catalog once.
        tokio::time::sleep(Duration::from_millis(50)).await;
        while rx.try_recv().is_ok() {}
        tracing::info!("catalog changed");
        let _ = state.reload_from_source().await;
    }
    drop(client);
    match driver.await {
        Ok(r) => r,
        Err(e) => Err(CatalogError::Db(e.to_string())),
    }
}
