//! Validation: checks that span tables (a tenant's shard exists, names are unique, verifiers
//! parse, certificates load) and the build of the [`Snapshot`]. Nothing is half-applied: an
//! error anywhere means no snapshot.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::ops::Range;
use std::path::Path;

use super::ctx::{Ctx, secret};
use super::snapshot::*;
use super::*;
use crate::domain::verifier::ScramVerifier;

/// `[peering]`: ids 1 to 255 (they are written into the cancel keys this instance issues).
fn peering(ctx: &Ctx<'_>, p: PeeringConfig, catalog: &Catalog) -> Result<Peering, ConfigError> {
    let subject = || Some("peering".to_owned());
    let in_range = |n: u32, span: Option<Range<usize>>| {
        u8::try_from(n).ok().filter(|n| *n != 0).ok_or_else(|| {
            ctx.err(
                span,
                subject(),
                format!("instance id {n} is not between 1 and 255"),
            )
        })
    };
    let span = p.id.as_ref().map(|s| s.span());
    let id = match (p.id.map(|s| s.into_inner()), p.id_env) {
        (Some(_), Some(_)) => {
            return Err(ctx.err(span, subject(), "set either id or id_env, not both".into()));
        }
        (Some(n), None) => Some(in_range(n, span)?),
        (None, Some(var)) => {
            let text = std::env::var(&var).map_err(|_| {
                ctx.err(
                    None,
                    subject(),
                    format!("id_env names environment variable {var:?}, which is not set"),
                )
            })?;
            let n = text.trim().parse::<u32>().map_err(|_| {
                ctx.err(
                    None,
                    subject(),
                    format!("{var}={text:?} is not an instance id"),
                )
            })?;
            Some(in_range(n, None)?)
        }
        (None, None) if catalog.source == CatalogSource::Postgres => None,
        (None, None) => {
            return Err(ctx.err(
                None,
                subject(),
                "an instance id is needed (id or id_env), or the catalog in PostgreSQL to claim one"
                    .into(),
            ));
        }
    };
    let advertise = secret(ctx, "peering", "advertise", p.advertise, p.advertise_env)?.map(|s| s.0);
    let mut peers = BTreeMap::new();
    for peer in p.peers {
        let n = in_range(peer.id, None)?;
        if Some(n) == id {
            continue;
        }
        if peers.insert(n, peer.addr).is_some() {
            return Err(ctx.err(None, subject(), format!("peer id {n} is listed twice")));
        }
    }
    Ok(Peering {
        id,
        advertise,
        peers,
    })
}

/// Validates `file` (parsed from `text`, read from `path`) and builds the snapshot.
pub fn build_snapshot(file: ConfigFile, text: &str, path: &Path) -> Result<Snapshot, ConfigError> {
    let ctx = Ctx { text, path };
    // One section at a time; tenants are checked against the shards, plans and listener.
    let listen = listen(&ctx, file.listen)?;
    let pool = pool(file.pool);
    let admin = admin(&ctx, file.admin, file.audit, file.metrics)?;
    let shards = super::shards::build(&ctx, file.shards)?;
    let plans: HashMap<String, PlanConfig> = file
        .plans
        .into_iter()
        .map(|(k, v)| (k.into_inner(), v))
        .collect();
    let tenants = super::tenants::build(&ctx, file.tenants, &plans, &shards, &listen)?;
    let catalog = catalog(&ctx, file.catalog)?;
    let peering = match file.peering {
        None => None,
        Some(p) => Some(peering(&ctx, p, &catalog)?),
    };
    let mut snapshot = Snapshot::new(path.to_owned(), listen, pool, admin, shards, tenants);
    snapshot.catalog = catalog;
    snapshot.peering = peering;
    Ok(snapshot)
}

/// `[listen]`.
fn listen(ctx: &Ctx<'_>, l: ListenConfig) -> Result<Listen, ConfigError> {
    let addr: SocketAddr = l.addr.get_ref().parse().map_err(|_| {
        ctx.err(
            Some(l.addr.span()),
            None,
            format!(
                "listen.addr {:?} is not an address like 127.0.0.1:6432",
                l.addr.get_ref()
            ),
        )
    })?;
    if l.tenant_from.is_empty() {
        return Err(ctx.err(
            None,
            None,
            "listen.tenant_from must name at least one source".into(),
        ));
    }
    let unique_sources: HashSet<_> = l.tenant_from.iter().collect();
    if unique_sources.len() != l.tenant_from.len() {
        return Err(ctx.err(None, None, "listen.tenant_from repeats a source".into()));
    }
    if l.max_message_size < 1024 {
        return Err(ctx.err(
            None,
            None,
            "listen.max_message_size must be at least 1024".into(),
        ));
    }
    let tls = match l.tls {
        None => None,
        Some(t) => Some(ListenTls {
            cert: ctx.load_certs(t.cert.get_ref(), t.key.get_ref(), Some(t.cert.span()), None)?,
            mode: t.mode,
            sni_suffix: t
                .sni_suffix
                .map(|s| s.trim_matches('.').to_ascii_lowercase())
                .filter(|s| !s.is_empty()),
        }),
    };
    Ok(Listen {
        addr,
        tenant_from: l.tenant_from,
        startup_timeout: l.startup_timeout,
        max_unauthenticated: l.max_unauthenticated.max(1),
        max_unauthenticated_per_source: l.max_unauthenticated_per_source.max(1),
        max_message_size: l.max_message_size,
        shutdown_grace: l.shutdown_grace,
        reuse_port: l.reuse_port,
        tls,
    })
}

/// `[pool]`.
fn pool(p: PoolConfig) -> PoolSettings {
    PoolSettings {
        mode: *p.mode.get_ref(),
        checkout_timeout: p.checkout_timeout,
        server_idle_timeout: p.server_idle_timeout,
        connect_timeout: p.connect_timeout,
        client_write_timeout: p.client_write_timeout,
        health_check_interval: p.health_check_interval,
        health_check_timeout: p.health_check_timeout,
    }
}

/// `[admin]`, `[audit]` and `[metrics]`.
fn admin(
    ctx: &Ctx<'_>,
    file_admin: Option<AdminConfig>,
    file_audit: Option<AuditConfig>,
    file_metrics: Option<MetricsConfig>,
) -> Result<Admin, ConfigError> {
    let mut admin = Admin::default();
    if let Some(a) = file_admin {
        if let Some(http) = a.http {
            admin.http = Some(http.get_ref().parse().map_err(|_| {
                ctx.err(
                    Some(http.span()),
                    None,
                    format!("admin.http {:?} is not an address", http.get_ref()),
                )
            })?);
        }
        for u in a.users {
            let v = ScramVerifier::parse(u.scram.get_ref()).map_err(|e| {
                ctx.err(
                    Some(u.scram.span()),
                    Some(format!("admin user {:?}", u.name)),
                    e.to_string(),
                )
            })?;
            admin.users.push((u.name, v));
        }
    }
    if let Some(audit) = file_audit {
        admin.audit = Some(if audit.path.as_os_str() == "-" {
            audit.path
        } else {
            ctx.file_path(&audit.path)
        });
    }
    if let Some(labels) = file_metrics.and_then(|m| m.tenant_labels) {
        admin.tenant_labels = labels
            .get_ref()
            .parse()
            .map_err(|e: String| ctx.err(Some(labels.span()), None, e))?;
    }
    Ok(admin)
}

/// `[catalog]`.
fn catalog(ctx: &Ctx<'_>, file_catalog: Option<CatalogConfig>) -> Result<Catalog, ConfigError> {
    match file_catalog {
        None => Ok(Catalog::default()),
        Some(c) => {
            let dsn = secret(ctx, "catalog", "dsn", c.dsn, c.dsn_env)?;
            if c.source == CatalogSource::Postgres && dsn.is_none() {
                return Err(ctx.err(
                    None,
                    Some("catalog".into()),
                    "source = \"postgres\" needs dsn (or dsn_env)".into(),
                ));
            }
            Ok(Catalog {
                source: c.source,
                dsn,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#"
[listen]
addr = "127.0.0.1:6432"

[shards.shard-a]
host = "127.0.0.1"
database = "app"
user = "pgtenant_app"
password = "x"

[plans.basic]
max_client_connections = 20
statement_timeout = "30s"
"#;

    fn tenant(extra: &str) -> String {
        let v = ScramVerifier::from_password(b"pw");
        format!(
            r#"
[[tenants]]
id = "6f1c2b7e-1d0a-4c39-9d0e-6f3b2a1c9e01"
name = "acme"
plan = "basic"
{extra}
[[tenants.users]]
name = "app"
scram = "{v}"
"#
        )
    }

    fn load(text: &str) -> Result<Snapshot, ConfigError> {
        load_str(text, Path::new("conf/pgtenant.toml"))
    }

    #[test]
    fn a_minimal_config_loads_with_defaults() {
        let s = load(&format!(
            "{BASE}{}",
            tenant(
                r#"placement = { kind = "shared", shard = "shard-a" }
settings = { statement_timeout = "10s" }"#
            )
        ))
        .unwrap();
        let t = s.tenant_by_name("acme").unwrap();
        assert_eq!(t.subdomain, "acme");
        assert_eq!(t.limits.max_client_connections, Some(20));
        assert_eq!(
            t.limits.statement_timeout,
            Some(std::time::Duration::from_secs(10))
        );
        assert_eq!(s.pool.mode, PoolMode::Transaction);
        assert_eq!(s.listen.tenant_from.len(), 3);
    }

    #[test]
    fn a_statement_timeout_postgresql_would_refuse_is_refused() {
        let placement = r#"placement = { kind = "shared", shard = "shard-a" }"#;
        let ok = format!("{placement}\nsettings = {{ statement_timeout = \"596h\" }}");
        assert!(load(&format!("{BASE}{}", tenant(&ok))).is_ok());
        let e = load(&format!(
            "{BASE}{}",
            tenant(&format!(
                "{placement}\nsettings = {{ statement_timeout = \"597h\" }}"
            ))
        ))
        .unwrap_err();
        assert!(e.message.contains("at most 2147483647ms"), "{e}");
        let e = load(&format!(
            "{}{}",
            BASE.replace("\"30s\"", "\"99999999999h\""),
            tenant(placement)
        ))
        .unwrap_err();
        assert!(
            e.message.contains("statement_timeout must be at most"),
            "{e}"
        );
    }

    #[test]
    fn unknown_keys_name_their_line() {
        let e = load(&format!("{BASE}\n[pool]\nmodee = \"session\"\n")).unwrap_err();
        assert_eq!(e.line, Some(line_of(BASE, BASE.len()) + 2));
        assert!(e.message.contains("modee"), "{e}");
        assert!(e.to_string().starts_with("conf/pgtenant.toml:"));
    }

    #[test]
    fn unknown_shard_names_tenant_and_line() {
        let text = format!(
            "{BASE}{}",
            tenant(r#"placement = { kind = "shared", shard = "nope" }"#)
        );
        let e = load(&text).unwrap_err();
        assert_eq!(e.subject.as_deref(), Some("tenant \"acme\""));
        let line = text.lines().position(|l| l.contains("\"nope\"")).unwrap() + 1;
        assert_eq!(e.line, Some(line));
        assert!(e.message.contains("unknown shard"));
    }

    #[test]
    fn semantic_errors_are_caught() {
        let cases = [
            (
                r#"placement = { kind = "schema", shard = "shard-a" }"#,
                "needs schema",
            ),
            (
                r#"placement = { kind = "shared", shard = "shard-a", schema = "x" }"#,
                "only allowed",
            ),
            (
                r#"placement = { kind = "shared", shard = "shard-a" }
isolation = "role""#,
                "needs server_user",
            ),
            (
                r#"placement = { kind = "shared", shard = "shard-a" }
tls = { cert = "a.pem", key = "a.key" }"#,
                "needs [listen.tls]",
            ),
        ];
        for (extra, want) in cases {
            let e = load(&format!("{BASE}{}", tenant(extra))).unwrap_err();
            assert!(e.message.contains(want), "{extra}: {e}");
        }
    }

    #[test]
    fn duplicates_and_bad_verifiers_are_caught() {
        let one = tenant(r#"placement = { kind = "shared", shard = "shard-a" }"#);
        let e = load(&format!("{BASE}{one}{one}")).unwrap_err();
        assert!(e.message.contains("is used by another tenant"), "{e}");

        let bad = one.replace("SCRAM-SHA-256$", "SCRAM-SHA-1$");
        let e = load(&format!("{BASE}{bad}")).unwrap_err();
        assert!(e.message.contains("invalid SCRAM verifier"), "{e}");
        assert_eq!(e.subject.as_deref(), Some("tenant \"acme\", user \"app\""));
    }

    #[test]
    fn dedicated_shards_are_exclusive() {
        let v = ScramVerifier::from_password(b"pw");
        let text = format!(
            r#"{BASE}
[[tenants]]
id = "00000000-0000-0000-0000-000000000001"
name = "a"
placement = {{ kind = "dedicated", shard = "shard-a" }}
users = [{{ name = "u", scram = "{v}" }}]
[[tenants]]
id = "00000000-0000-0000-0000-000000000002"
name = "b"
placement = {{ kind = "shared", shard = "shard-a" }}
"#
        );
        let e = load(&text).unwrap_err();
        assert!(e.message.contains("dedicated"), "{e}");
    }

    #[test]
    fn read_only_users_need_a_read_only_login_role() {
        let v = ScramVerifier::from_password(b"pw");
        let reader = format!(
            "placement = {{ kind = \"shared\", shard = \"shard-a\" }}\n\
             users = [{{ name = \"r\", scram = \"{v}\", role = \"readonly\" }}]"
        );
        let text = format!(
            r#"{BASE}
[[tenants]]
id = "00000000-0000-0000-0000-000000000001"
name = "a"
{reader}
"#
        );
        let e = load(&text).unwrap_err();
        assert!(e.message.contains("readonly_user"), "{e}");
        let with_role = text.replace(
            "password = \"x\"",
            "password = \"x\"\nreadonly_user = \"pgtenant_ro\"\nreadonly_password = \"y\"",
        );
        let s = load(&with_role).unwrap();
        let shard = &s.shards["shard-a"];
        assert_eq!(
            shard.readonly.as_ref().map(|(u, _)| u.as_str()),
            Some("pgtenant_ro")
        );
        let same = text.replace(
            "password = \"x\"",
            "password = \"x\"\nreadonly_user = \"pgtenant_app\"",
        );
        assert!(load(&same).unwrap_err().message.contains("role of its own"));
    }

    #[test]
    fn missing_password_env_is_reported() {
        let text = BASE.replace(
            "password = \"x\"",
            "password_env = \"PGTENANT_TEST_UNSET_VAR\"",
        );
        let e = load(&text).unwrap_err();
        assert_eq!(e.subject.as_deref(), Some("shard \"shard-a\""));
        assert!(e.message.contains("PGTENANT_TEST_UNSET_VAR"));
    }
}
