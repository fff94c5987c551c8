//! Who the client claims to be (DESIGN.md §1.4): the tenant from the TLS SNI name (first label
//! under `listen.tls.sni_suffix`), from the user name (`user@tenant`, or `user.tenant` when
//! that names a tenant), or from the database name; sources are read in `listen.tenant_from`
//! order and must agree.
//!
//! An unknown tenant is not an error here: it resolves to `tenant: None` and authentication
//! runs against a mock verifier, so it fails exactly like a wrong password.

use std::sync::Arc;

use crate::config::{Snapshot, Tenant, TenantSource};

/// What the startup packet and TLS handshake said.
#[derive(Debug, Clone, Copy)]
pub struct Claims<'a> {
    pub sni: Option<&'a str>,
    pub user: &'a str,
    pub database: Option<&'a str>,
}

/// The resolved identity, before authentication.
#[derive(Debug, Clone)]
pub struct Identity {
    /// The tenant, if it exists.
    pub tenant: Option<Arc<Tenant>>,
    /// The tenant as the client named it (for mock verifiers and logs).
    pub tenant_key: String,
    /// The user name within the tenant.
    pub user: String,
    /// Whether the tenant came from the database name (then the database is the tenant).
    pub from_database: bool,
}

/// Identity sources disagree: the client named two different tenants.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("tenant named by {first} differs from tenant named by {second}")]
pub struct Disagreement {
    pub first: &'static str,
    pub second: &'static str,
}

struct Claim {
    source: &'static str,
    key: String,
    tenant: Option<Arc<Tenant>>,
}

impl Claim {
    fn agrees_with(&self, other: &Claim) -> bool {
        match (&self.tenant, &other.tenant) {
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            _ => self.key == other.key,
        }
    }
}

/// The tenant label an SNI host name carries, if it lies under `suffix`.
pub fn sni_label<'a>(host: &'a str, suffix: &str) -> Option<&'a str> {
    let host = host.strip_suffix('.').unwrap_or(host);
    let suffix = suffix.trim_matches('.');
    if suffix.is_empty() || host.len() <= suffix.len() + 1 {
        return None;
    }
    let (prefix, tail) = host.split_at(host.len() - suffix.len());
    if !tail.eq_ignore_ascii_case(suffix) {
        return None;
    }
    let prefix = prefix.strip_suffix('.')?;
    prefix.split('.').next().filter(|l| !l.is_empty())
}

/// Resolves the claims against the snapshot.
pub fn resolve(
    snapshot: &Snapshot,
    sni_suffix: Option<&str>,
    claims: Claims<'_>,
) -> Result<Identity, Disagreement> {
    let mut user = claims.user.to_owned();
    let mut found: Vec<Claim> = Vec::new();
    let mut database_claim = None;
    for source in &snapshot.listen.tenant_from {
        match source {
            TenantSource::Sni => {
                if let (Some(host), Some(suffix)) = (claims.sni, sni_suffix)
                    && let Some(label) = sni_label(host, suffix)
                {
                    let key = label.to_ascii_lowercase();
                    found.push(Claim {
                        source: "the TLS server name",
                        tenant: snapshot.tenant_by_subdomain(&key).cloned(),
                        key,
                    });
                }
            }
            TenantSource::User => {
                if let Some((name, tenant)) = claims.user.rsplit_once('@') {
                    user = name.to_owned();
                    found.push(Claim {
                        source: "the user name",
                        tenant: snapshot.tenant_by_name(tenant).cloned(),
                        key: tenant.to_owned(),
                    });
                } else if let Some((name, tenant)) = claims.user.rsplit_once('.')
                    && let Some(t) = snapshot.tenant_by_name(tenant)
                {
                    // A dot only separates a tenant when it names one; user names may
                    // contain dots.
                    let claim = Claim {
                        source: "the user name",
                        tenant: Some(Arc::clone(t)),
                        key: tenant.to_owned(),
                    };
                    if found.first().is_none_or(|f| f.agrees_with(&claim)) {
                        user = name.to_owned();
                        found.push(claim);
                    }
                }
            }
            TenantSource::Database => {
                if let Some(db) = claims.database.filter(|d| !d.is_empty()) {
                    database_claim = Some(Claim {
                        source: "the database name",
                        tenant: snapshot.tenant_by_name(db).cloned(),
                        key: db.to_owned(),
                    });
                }
            }
        }
    }
    if let [first, rest @ ..] = found.as_slice() {
        if let Some(other) = rest.iter().find(|c| !c.agrees_with(first)) {
            return Err(Disagreement {
                first: first.source,
                second: other.source,
            });
        }
        return Ok(Identity {
            tenant: first.tenant.clone(),
            tenant_key: first.key.clone(),
            user,
            from_database: false,
        });
    }
    match database_claim {
        Some(claim) => Ok(Identity {
            tenant: claim.tenant,
            tenant_key: claim.key,
            user,
            from_database: true,
        }),
        None => Ok(Identity {
            tenant: None,
            tenant_key: String::new(),
            user,
            from_database: false,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::load_str;
    use std::path::Path;

    fn snapshot(tenant_from: &str) -> Snapshot {
        let v = crate::auth::verifier::ScramVerifier::from_password(b"pw");
        let text = format!(
            r#"
[listen]
addr = "127.0.0.1:0"
tenant_from = {tenant_from}
[shards.a]
host = "127.0.0.1"
database = "app"
user = "pgtenant"
[[tenants]]
id = "00000000-0000-0000-0000-000000000001"
name = "acme"
subdomain = "acme-corp"
placement = {{ kind = "shared", shard = "a" }}
users = [{{ name = "app", scram = "{v}" }}]
[[tenants]]
id = "00000000-0000-0000-0000-000000000002"
name = "globex"
placement = {{ kind = "shared", shard = "a" }}
users = [{{ name = "app", scram = "{v}" }}]
"#
        );
        load_str(&text, Path::new("test.toml")).unwrap()
    }

    fn resolve_all(
        s: &Snapshot,
        sni: Option<&str>,
        user: &str,
        db: Option<&str>,
    ) -> Result<Identity, Disagreement> {
        resolve(
            s,
            Some("db.example.com"),
            Claims {
                sni,
                user,
                database: db,
            },
        )
    }

    fn tenant_name(i: &Identity) -> Option<&str> {
        i.tenant.as_ref().map(|t| t.name.as_str())
    }

    #[test]
    fn sni_labels() {
        assert_eq!(
            sni_label("acme.db.example.com", "db.example.com"),
            Some("acme")
        );
        assert_eq!(
            sni_label("ACME.DB.example.com.", "db.example.com"),
            Some("ACME")
        );
        assert_eq!(
            sni_label("x.acme.db.example.com", "db.example.com"),
            Some("x")
        );
        assert_eq!(sni_label("db.example.com", "db.example.com"), None);
        assert_eq!(sni_label("acme.other.com", "db.example.com"), None);
        assert_eq!(sni_label("evildb.example.com", "db.example.com"), None);
    }

    #[test]
    fn each_source_resolves_alone() {
        let s = snapshot(r#"["sni", "user", "database"]"#);
        let i = resolve_all(&s, Some("acme-corp.db.example.com"), "app", None).unwrap();
        assert_eq!((tenant_name(&i), i.user.as_str()), (Some("acme"), "app"));
        let i = resolve_all(&s, None, "app@globex", None).unwrap();
        assert_eq!((tenant_name(&i), i.user.as_str()), (Some("globex"), "app"));
        let i = resolve_all(&s, None, "app.globex", None).unwrap();
        assert_eq!((tenant_name(&i), i.user.as_str()), (Some("globex"), "app"));
        let i = resolve_all(&s, None, "app", Some("acme")).unwrap();
        assert_eq!((tenant_name(&i), i.from_database), (Some("acme"), true));
    }

    #[test]
    fn agreeing_sources_are_fine() {
        let s = snapshot(r#"["sni", "user", "database"]"#);
        let i = resolve_all(
            &s,
            Some("acme-corp.db.example.com"),
            "app@acme",
            Some("app"),
        )
        .unwrap();
        assert_eq!(tenant_name(&i), Some("acme"));
        assert!(!i.from_database);
    }

    #[test]
    fn disagreeing_sources_are_refused() {
        let s = snapshot(r#"["sni", "user", "database"]"#);
        assert!(resolve_all(&s, Some("acme-corp.db.example.com"), "app@globex", None).is_err());
        assert!(resolve_all(&s, Some("acme-corp.db.example.com"), "app@nosuch", None).is_err());
        assert!(resolve_all(&s, Some("nosuch.db.example.com"), "app@acme", None).is_err());
    }

    #[test]
    fn dotted_user_names_stay_whole_unless_they_name_the_tenant() {
        let s = snapshot(r#"["sni", "user", "database"]"#);
        let i = resolve_all(&s, Some("acme-corp.db.example.com"), "john.smith", None).unwrap();
        assert_eq!(
            (tenant_name(&i), i.user.as_str()),
            (Some("acme"), "john.smith")
        );
        let i = resolve_all(&s, Some("acme-corp.db.example.com"), "john.globex", None).unwrap();
        assert_eq!(
            (tenant_name(&i), i.user.as_str()),
            (Some("acme"), "john.globex")
        );
        let i = resolve_all(&s, None, "john.smith", Some("acme")).unwrap();
        assert_eq!(
            (tenant_name(&i), i.user.as_str()),
            (Some("acme"), "john.smith")
        );
    }

    #[test]
    fn unknown_tenants_resolve_to_none() {
        let s = snapshot(r#"["sni", "user", "database"]"#);
        let i = resolve_all(&s, None, "app@nosuch", None).unwrap();
        assert!(i.tenant.is_none());
        assert_eq!(i.tenant_key, "nosuch");
        let i = resolve_all(&s, None, "app", None).unwrap();
        assert!(i.tenant.is_none());
    }

    #[test]
    fn tenant_from_limits_the_sources() {
        let s = snapshot(r#"["database"]"#);
        let i = resolve_all(
            &s,
            Some("acme-corp.db.example.com"),
            "app@globex",
            Some("acme"),
        )
        .unwrap();
        assert_eq!(
            (tenant_name(&i), i.user.as_str()),
            (Some("acme"), "app@globex")
        );
    }
}
