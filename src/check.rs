//! `pgtenant check --shards` (DESIGN.md §5 S3): connects to each shard as pgtenant will, and
//! reports what would weaken tenant isolation there. That covers a login role that is a
//! superuser, has BYPASSRLS or owns tables, tables it can read without ENABLE and FORCE ROW
//! LEVEL SECURITY, tables it may TRUNCATE (which skips RLS), TEMP granted to PUBLIC, and a
//! database or role default for `app.current_tenant_id` (RESET would return to it).
//! Role-isolated tenants' roles get the role checks too.

use std::collections::BTreeSet;
use std::sync::Arc;

use crate::config::{Isolation, PlacementKind, Shard, Snapshot};
use crate::pool::connect::{self, Login};
use crate::pool::{ServerConn, ServerError};
use crate::tenant::TENANT_SETTING;

/// What the inspection found on one shard for one login.
#[derive(Debug, Default)]
pub struct ShardReport {
    pub shard: String,
    pub login: String,
    /// Hardening problems; empty when the shard is sound.
    pub problems: Vec<String>,
    /// The shard could not be inspected.
    pub error: Option<String>,
}

fn cell(rows: &[Vec<Option<String>>]) -> Option<&str> {
    rows.first()?.first()?.as_deref()
}

fn list(rows: Vec<Vec<Option<String>>>) -> Vec<String> {
    rows.into_iter()
        .filter_map(|r| r.into_iter().next().flatten())
        .collect()
}

/// `shared`: the login serves tenants of a shared database through row-level security (the
/// table checks apply). A role-isolated tenant's own role gets only the role checks: it is
/// expected to own its schema's tables.
async fn inspect(
    conn: &mut ServerConn,
    shared: bool,
    readonly: bool,
) -> Result<Vec<String>, ServerError> {
    let mut problems = Vec::new();
    if readonly {
        let writable = list(
            conn.query_rows(
                "SELECT n.nspname || '.' || c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
                 WHERE c.relkind IN ('r', 'p', 'v', 'm', 'f') AND n.nspname NOT IN ('pg_catalog', 'information_schema') \
                   AND n.nspname NOT LIKE 'pg_temp%' AND n.nspname NOT LIKE 'pg_toast%' \
                   AND (has_table_privilege(c.oid, 'INSERT') OR has_table_privilege(c.oid, 'UPDATE') \
                        OR has_table_privilege(c.oid, 'DELETE') OR has_table_privilege(c.oid, 'TRUNCATE')) \
                 ORDER BY 1",
            )
            .await?,
        );
        if !writable.is_empty() {
            problems.push(format!(
                "the read-only login role can write (read-only users would too): {}",
                writable.join(", ")
            ));
        }
    }
    let role = conn
        .query_rows(
            "SELECT rolsuper::text, rolbypassrls::text FROM pg_roles WHERE rolname = current_user",
        )
        .await?;
    if let Some(r) = role.first() {
        if r.first().and_then(|v| v.as_deref()) == Some("true") {
            problems.push(
                "the login role is a superuser: row-level security does not apply to it".into(),
            );
        }
        if r.get(1).and_then(|v| v.as_deref()) == Some("true") {
            problems.push("the login role has BYPASSRLS".into());
        }
    }
    let owned = list(
        conn.query_rows(
            "SELECT n.nspname || '.' || c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE c.relowner = (SELECT oid FROM pg_roles WHERE rolname = current_user) \
               AND c.relkind IN ('r', 'p') AND n.nspname NOT IN ('pg_catalog', 'information_schema') \
               AND n.nspname NOT LIKE 'pg_temp%' AND n.nspname NOT LIKE 'pg_toast%' ORDER BY 1",
        )
        .await?,
    );
    if shared && !owned.is_empty() {
        problems.push(format!(
            "the login role owns tables (owners bypass RLS unless FORCE is set, and can disable it): {}",
            owned.join(", ")
        ));
    }
    if shared {
        let unprotected = list(
            conn.query_rows(
                "SELECT n.nspname || '.' || c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
                 WHERE c.relkind IN ('r', 'p') AND n.nspname NOT IN ('pg_catalog', 'information_schema') \
                   AND n.nspname NOT LIKE 'pg_temp%' AND n.nspname NOT LIKE 'pg_toast%' \
                   AND has_table_privilege(c.oid, 'SELECT') \
                   AND NOT (c.relrowsecurity AND c.relforcerowsecurity) ORDER BY 1",
            )
            .await?,
        );
        if !unprotected.is_empty() {
            problems.push(format!(
                "readable tables without ENABLE and FORCE ROW LEVEL SECURITY: {}",
                unprotected.join(", ")
            ));
        }
        let truncatable = list(
            conn.query_rows(
                "SELECT n.nspname || '.' || c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
                 WHERE c.relkind IN ('r', 'p') AND n.nspname NOT IN ('pg_catalog', 'information_schema') \
                   AND has_table_privilege(c.oid, 'TRUNCATE') ORDER BY 1",
            )
            .await?,
        );
        if !truncatable.is_empty() {
            problems.push(format!(
                "the login role may TRUNCATE (which ignores RLS): {}",
                truncatable.join(", ")
            ));
        }
        problems.extend(inspect_context(conn).await?);
        let temp = conn
            .query_rows("SELECT has_database_privilege('public', current_database(), 'TEMP')::text")
            .await?;
        if cell(&temp) == Some("true") {
            problems.push(
                "TEMP is granted to PUBLIC on this shared database (REVOKE TEMP ON DATABASE ... FROM PUBLIC)"
                    .into(),
            );
        }
    }
    problems.extend(inspect_hardening(conn).await?);
    let defaults = conn
        .query_rows(&format!(
            "SELECT count(*)::text FROM pg_db_role_setting s, unnest(s.setconfig) AS c \
             WHERE c ILIKE '{TENANT_SETTING}=%'"
        ))
        .await?;
    if cell(&defaults).is_some_and(|n| n != "0") {
        problems.push(format!(
            "a database or role default sets {TENANT_SETTING}: RESET would return sessions to it"
        ));
    }
    Ok(problems)
}

/// The verified context and what depends on it (shared shards): `pgtenant.tenant_id()`
/// installed, its key unreadable, policies that read the unverified setting, keys of tenant
/// tables without the tenant column, and catalog objects that show other sessions.
async fn inspect_context(conn: &mut ServerConn) -> Result<Vec<String>, ServerError> {
    let mut problems = Vec::new();
    let installed = conn
        .query_rows("SELECT (to_regprocedure('pgtenant.tenant_id()') IS NOT NULL)::text")
        .await?;
    if cell(&installed) != Some("true") {
        problems.push(
            "pgtenant.tenant_id() is not installed: run `pgtenant shard init`, set context_key_file, \
             and make policies read (SELECT pgtenant.tenant_id())"
                .into(),
        );
    } else {
        let readable = conn
            .query_rows(
                "SELECT (to_regclass('pgtenant.context_key') IS NOT NULL \
                   AND has_table_privilege('pgtenant.context_key', 'SELECT'))::text",
            )
            .await?;
        if cell(&readable) == Some("true") {
            problems.push(
                "the login role can read pgtenant.context_key (the shard's context key)".into(),
            );
        }
    }
    let unverified = list(
        conn.query_rows(&format!(
            "SELECT schemaname || '.' || tablename || ' (' || policyname || ')' FROM pg_policies \
             WHERE coalesce(qual, '') || ' ' || coalesce(with_check, '') LIKE '%{TENANT_SETTING}%' \
             ORDER BY 1"
        ))
        .await?,
    );
    if !unverified.is_empty() {
        problems.push(format!(
            "policies read the unverified setting {TENANT_SETTING} (any SQL that sets it passes them; \
             read (SELECT pgtenant.tenant_id()) instead): {}",
            unverified.join(", ")
        ));
    }
    let keys = list(
        conn.query_rows(&format!(
            "SELECT k.conrelid::regclass::text || ' ' || k.conname FROM pg_constraint k \
             JOIN pg_class t ON t.oid = k.conrelid \
             JOIN pg_attribute a ON a.attrelid = t.oid AND a.attname = '{TENANT_COLUMN}' AND NOT a.attisdropped \
             WHERE t.relrowsecurity AND k.contype IN ('p', 'u', 'f') AND NOT (a.attnum = ANY (k.conkey)) \
             ORDER BY 1"
        ))
        .await?,
    );
    if !keys.is_empty() {
        problems.push(format!(
            "keys of tenant tables without the {TENANT_COLUMN} column (a duplicate-key or \
             foreign-key error tells one tenant that another's row exists): {}",
            keys.join(", ")
        ));
    }
    Ok(problems)
}

/// Views and functions that show other sessions (their database, role, application name,
/// queries and locks) or signal them: every login's database should have them revoked from
/// PUBLIC, dedicated ones included (`pg_stat_activity` lists the whole cluster's sessions).
async fn inspect_hardening(conn: &mut ServerConn) -> Result<Vec<String>, ServerError> {
    let mut problems = Vec::new();
    let checks: Vec<String> = crate::tenant::context::HARDENED
        .iter()
        .map(|(kind, name)| {
            if *kind == "TABLE" {
                format!(
                    "SELECT '{name}' WHERE to_regclass('{name}') IS NOT NULL \
                     AND has_table_privilege('{name}', 'SELECT')"
                )
            } else {
                format!(
                    "SELECT '{name}' WHERE to_regprocedure('{name}') IS NOT NULL \
                     AND has_function_privilege('{name}', 'EXECUTE')"
                )
            }
        })
        .collect();
    let exposed = list(conn.query_rows(&checks.join(" UNION ALL ")).await?);
    if !exposed.is_empty() {
        problems.push(format!(
            "the login role can see or signal other sessions (run `pgtenant shard init` to revoke): {}",
            exposed.join(", ")
        ));
    }
    Ok(problems)
}

/// The column that holds a row's tenant in shared tables (the seed schema's `tenant_id`).
pub const TENANT_COLUMN: &str = "tenant_id";

/// Inspects every shard with every login pgtenant uses there.
pub async fn inspect_shards(snapshot: &Snapshot, timeout: std::time::Duration) -> Vec<ShardReport> {
    let mut logins: BTreeSet<(String, String)> = BTreeSet::new();
    let mut reports = Vec::new();
    for (name, shard) in &snapshot.shards {
        let tenants: Vec<_> = snapshot
            .tenants
            .iter()
            .filter(|t| &t.placement.shard == name)
            .collect();
        let shared = tenants
            .iter()
            .any(|t| t.placement.kind != PlacementKind::Dedicated);
        let login = |user: &String, password: &Option<crate::config::Secret>| Login {
            user: user.clone(),
            password: password.clone(),
        };
        // (login, shared-table checks, read-only role)
        let mut shard_logins = vec![(login(&shard.user, &shard.password), shared, false)];
        if let Some((user, password)) = &shard.readonly {
            shard_logins.push((login(user, password), shared, true));
        }
        for t in &tenants {
            if let Isolation::Role {
                user,
                password,
                readonly,
            } = &t.isolation
            {
                shard_logins.push((login(user, password), false, false));
                if let Some((user, password)) = readonly {
                    shard_logins.push((login(user, password), false, true));
                }
            }
        }
        for (login, table_checks, readonly) in shard_logins {
            if !logins.insert((name.clone(), login.user.clone())) {
                continue;
            }
            reports.push(inspect_one(shard, login, table_checks, readonly, timeout).await);
        }
    }
    reports
}

async fn inspect_one(
    shard: &Arc<Shard>,
    login: Login,
    shared: bool,
    readonly: bool,
    timeout: std::time::Duration,
) -> ShardReport {
    let mut report = ShardReport {
        shard: shard.name.clone(),
        login: login.user.clone(),
        ..ShardReport::default()
    };
    let tls = match crate::net::tls::server_tls(shard) {
        Ok(Some(config)) => match crate::net::tls::server_name(&shard.host) {
            Ok(name) => Some((config, name)),
            Err(e) => {
                report.error = Some(e.to_string());
                return report;
            }
        },
        Ok(None) => None,
        Err(e) => {
            report.error = Some(e.to_string());
            return report;
        }
    };
    match connect::open(shard, &login, tls.as_ref(), timeout).await {
        Ok(mut conn) => match inspect(&mut conn, shared, readonly).await {
            Ok(problems) => report.problems = problems,
            Err(e) => report.error = Some(e.to_string()),
        },
        Err(e) => report.error = Some(e.to_string()),
    }
    report
}
