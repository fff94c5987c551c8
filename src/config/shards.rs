//! `[shards.*]`: each shard's connection settings, TLS, context key and replicas.

use std::collections::BTreeMap;
use std::sync::Arc;

use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

use super::ctx::{Ctx, secret, valid_name};
use super::snapshot::*;
use super::*;
use toml::Spanned;

/// `[shards.*]`.
pub(super) fn build(
    ctx: &Ctx<'_>,
    entries: BTreeMap<Spanned<String>, ShardConfig>,
) -> Result<BTreeMap<String, Arc<Shard>>, ConfigError> {
    let mut shards = BTreeMap::new();
    for (name, s) in entries {
        let subject = format!("shard {:?}", name.get_ref());
        let here = Some(name.span());
        if !valid_name(&name.get_ref().to_ascii_lowercase(), &['-', '_']) {
            return Err(ctx.err(
                here,
                Some(subject),
                "shard names use letters, digits, '-' and '_'".into(),
            ));
        }
        for (field, value) in [
            ("host", &s.host),
            ("database", &s.database),
            ("user", &s.user),
        ] {
            if value.is_empty() {
                return Err(ctx.err(here, Some(subject), format!("{field} must not be empty")));
            }
        }
        if s.max_connections == 0 {
            return Err(ctx.err(
                here,
                Some(subject),
                "max_connections must be at least 1".into(),
            ));
        }
        let password = secret(ctx, &subject, "password", s.password, s.password_env)?;
        let ca = match (&s.ca, s.tls) {
            (Some(ca), _) => {
                let ca_path = ctx.file_path(ca);
                CertificateDer::pem_file_iter(&ca_path)
                    .and_then(|iter| iter.collect::<Result<Vec<_>, _>>())
                    .map_err(|e| {
                        ctx.err(
                            here.clone(),
                            Some(subject.clone()),
                            format!("cannot read CA {}: {e}", ca_path.display()),
                        )
                    })?
            }
            (None, ServerTlsMode::VerifyFull) => {
                return Err(ctx.err(
                    here,
                    Some(subject),
                    "tls = \"verify-full\" needs ca = \"<PEM file>\"".into(),
                ));
            }
            (None, _) => Vec::new(),
        };
        let readonly_password = secret(
            ctx,
            &subject,
            "readonly_password",
            s.readonly_password,
            s.readonly_password_env,
        )?;
        let readonly = match s.readonly_user {
            Some(user) if !user.is_empty() && user != s.user => Some((user, readonly_password)),
            Some(_) => {
                return Err(ctx.err(
                    here,
                    Some(subject),
                    "readonly_user must be a role of its own (not empty, not the shard's user)"
                        .into(),
                ));
            }
            None => None,
        };
        let context_key_file = s.context_key_file.as_ref().map(|f| ctx.file_path(f));
        let context_key = match &context_key_file {
            Some(path) if path.exists() => Some(Arc::new(
                crate::domain::context_key::ContextKey::load(path)
                    .map_err(|e| ctx.err(here.clone(), Some(subject.clone()), e.to_string()))?,
            )),
            _ => None,
        };
        shards.insert(name.get_ref().clone(), {
            let primary = Shard {
                name: name.into_inner(),
                host: s.host,
                port: s.port,
                database: s.database,
                user: s.user,
                password,
                max_connections: s.max_connections,
                tls: s.tls,
                ca,
                readonly,
                context_key_file,
                context_key,
                replicas: Vec::new(),
                max_replica_lag: s.max_replica_lag,
            };
            let replicas = s
                .replicas
                .into_iter()
                .enumerate()
                .map(|(i, r)| {
                    Arc::new(Shard {
                        name: format!("{}#replica{}", primary.name, i + 1),
                        host: r.host,
                        port: r.port,
                        database: primary.database.clone(),
                        user: primary.user.clone(),
                        password: primary.password.clone(),
                        max_connections: primary.max_connections,
                        tls: primary.tls,
                        ca: primary.ca.clone(),
                        readonly: primary.readonly.clone(),
                        context_key_file: primary.context_key_file.clone(),
                        context_key: primary.context_key.clone(),
                        replicas: Vec::new(),
                        max_replica_lag: primary.max_replica_lag,
                    })
                })
                .collect();
            Arc::new(Shard {
                replicas,
                ..primary
            })
        });
    }
    Ok(shards)
}
