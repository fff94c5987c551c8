//! `pgtenant shard init` (DESIGN.md §5 S1b, S3): installs the verified tenant context on a
//! shard and hardens it for pgtenant's login role. Idempotent; run it again after a key
//! rotation (delete the key file first) or a PostgreSQL upgrade.
//!
//! It connects with a privileged role given only on the command line (never stored), creates
//! the shard's key file when missing (mode 0600), installs schema `pgtenant` (the key's pads,
//! readable by nobody but the owner, and `pgtenant.tenant_id()`), revokes from PUBLIC what
//! shows other sessions' activity, locks and settings (giving it back to
//! `pg_read_all_stats`), and then proves, logged in as the login role, that the key cannot
//! be read and that a token pgtenant makes verifies.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail};

use crate::config::{Secret, Shard, Snapshot};
use crate::pool::ServerConn;
use crate::pool::connect::{self, Login};
use crate::tenant::TenantId;
use crate::tenant::context::{self, CONTEXT_SETTING, ContextKey};

/// What `shard init` did.
#[derive(Debug)]
pub struct InitReport {
    /// The verified context, when the shard has a `context_key_file`: the file, whether it
    /// was created, and the key's fingerprint.
    pub context: Option<(String, bool, String)>,
    /// Catalog objects now closed to PUBLIC.
    pub revoked: Vec<String>,
}

/// Runs `shard init` for `shard_name` of `snapshot`, connecting as `admin_url`.
pub async fn init(
    snapshot: &Snapshot,
    shard_name: &str,
    admin_url: &str,
    timeout: Duration,
) -> anyhow::Result<InitReport> {
    let shard = snapshot
        .shards
        .get(shard_name)
        .with_context(|| format!("no shard {shard_name:?} in the configuration"))?;
    // Without a key file (e.g. a dedicated shard) only the hardening is installed: sessions
    // of other databases on the cluster stay invisible from this one.
    let key = match &shard.context_key_file {
        Some(key_file) if key_file.exists() => Some((key_file, ContextKey::load(key_file)?, false)),
        Some(key_file) => {
            let key = ContextKey::generate();
            key.create(key_file)?;
            Some((key_file, key, true))
        }
        None => None,
    };

    let (admin_shard, admin) = admin_login(shard, admin_url)?;
    let mut conn = open(&admin_shard, &admin, timeout)
        .await
        .context("connecting with --admin-url")?;
    let install = match &key {
        Some((_, key, _)) => format!(
            "{}\n{};\n",
            context::install_sql(&shard.user),
            key.store_sql()
        ),
        None => String::new(),
    };
    let sql = format!("BEGIN;\n{install}{}\nCOMMIT;", context::harden_sql());
    conn.run_own(&sql)
        .await
        .context("installing schema pgtenant")?;
    let Some((key_file, key, key_created)) = key else {
        return Ok(InitReport {
            context: None,
            revoked: revoked(),
        });
    };

    // Proof, as the login role itself: the key is out of reach and a token verifies.
    let login = Login {
        user: shard.user.clone(),
        password: shard.password.clone(),
    };
    let mut as_login = open(shard, &login, timeout)
        .await
        .context("connecting as the shard's login role")?;
    let readable = as_login
        .query_rows("SELECT has_table_privilege('pgtenant.context_key', 'SELECT')::text")
        .await?;
    if first(&readable) != Some("false") {
        bail!("the login role {:?} can read the context key", shard.user);
    }
    let probe = TenantId::parse("00000000-0000-4000-8000-000000000001")?;
    let token = key.token(probe, as_login.backend_pid(), 0);
    as_login
        .run_setup(None, &[(CONTEXT_SETTING, token.as_str())])
        .await?;
    let verified = as_login
        .query_rows("SELECT pgtenant.tenant_id()::text")
        .await?;
    if first(&verified) != Some(&probe.to_string()) {
        bail!("the shard does not verify pgtenant's token: is the key file the one installed?");
    }
    Ok(InitReport {
        context: Some((
            key_file.display().to_string(),
            key_created,
            key.fingerprint(),
        )),
        revoked: revoked(),
    })
}

fn revoked() -> Vec<String> {
    context::HARDENED
        .iter()
        .map(|(_, name)| (*name).to_owned())
        .collect()
}

fn first(rows: &[Vec<Option<String>>]) -> Option<&str> {
    rows.first()?.first()?.as_deref()
}

/// The shard as reached with the admin URL: its host, port and user (the database must be
/// the shard's own, or absent).
fn admin_login(shard: &Arc<Shard>, url: &str) -> anyhow::Result<(Shard, Login)> {
    let config: tokio_postgres::Config = url
        .parse()
        .map_err(|e| anyhow::anyhow!("--admin-url: {e}"))?;
    let user = config
        .get_user()
        .context("--admin-url names no user")?
        .to_owned();
    if let Some(db) = config.get_dbname()
        && db != shard.database
    {
        bail!(
            "--admin-url names database {db:?}, but the shard's database is {:?}",
            shard.database
        );
    }
    let mut admin_shard = Shard::clone(shard);
    if let Some(tokio_postgres::config::Host::Tcp(host)) = config.get_hosts().first() {
        admin_shard.host = host.clone();
    }
    if let Some(port) = config.get_ports().first() {
        admin_shard.port = *port;
    }
    let password = config
        .get_password()
        .map(|p| Secret(String::from_utf8_lossy(p).into_owned()));
    Ok((admin_shard, Login { user, password }))
}

async fn open(shard: &Shard, login: &Login, timeout: Duration) -> anyhow::Result<ServerConn> {
    let tls = match crate::net::tls::server_tls(shard)? {
        Some(config) => Some((config, crate::net::tls::server_name(&shard.host)?)),
        None => None,
    };
    Ok(connect::open(shard, login, tls.as_ref(), timeout).await?)
}
