//! The catalog's rows and the TOML a configuration file would hold: `import` writes a file's
//! shards, plans, tenants and users as rows; `fetch_toml` reads them back as TOML tables.

use std::path::Path;

use deadpool_postgres::Pool;

use super::{CatalogError, within};
use crate::config;

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
