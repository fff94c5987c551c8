//! `[[tenants]]`: identity, placement, plan and limits, users and their verifiers, TLS, and
//! the rules that tie tenants to shards (a dedicated shard serves one tenant, a shared one no
//! dedicated tenant).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use super::ctx::{Ctx, secret, valid_name};
use super::snapshot::*;
use super::*;
use crate::domain::TenantId;
use crate::domain::verifier::ScramVerifier;

/// `[[tenants]]`, against the shards, plans and listener already read.
pub(super) fn build(
    ctx: &Ctx<'_>,
    entries: Vec<TenantConfig>,
    plans: &HashMap<String, PlanConfig>,
    shards: &BTreeMap<String, Arc<Shard>>,
    listen: &Listen,
) -> Result<Vec<Arc<Tenant>>, ConfigError> {
    let mut tenants = Vec::new();
    let mut ids = HashSet::new();
    let mut names = HashSet::new();
    let mut subdomains = HashSet::new();
    let mut dedicated_shards: HashMap<String, String> = HashMap::new();
    let mut shared_shards: HashMap<String, String> = HashMap::new();
    for t in entries {
        let name = t.name.get_ref().clone();
        let subject = Some(format!("tenant {name:?}"));
        let here = Some(t.name.span());
        if !valid_name(&name, &['-', '_']) {
            return Err(ctx.err(
                here,
                subject,
                "tenant names use lower-case letters, digits, '-' and '_' (at most 63)".into(),
            ));
        }
        let id = TenantId::parse(t.id.get_ref()).map_err(|_| {
            ctx.err(
                Some(t.id.span()),
                subject.clone(),
                format!("id {:?} is not a UUID", t.id.get_ref()),
            )
        })?;
        if !ids.insert(id) {
            return Err(ctx.err(
                Some(t.id.span()),
                subject,
                format!("id {id} is used by another tenant"),
            ));
        }
        if !names.insert(name.clone()) {
            return Err(ctx.err(here, subject, "another tenant has the same name".into()));
        }
        let subdomain = t
            .subdomain
            .unwrap_or_else(|| name.clone())
            .to_ascii_lowercase();
        if !valid_name(&subdomain, &['-']) {
            return Err(ctx.err(
                here,
                subject,
                format!("subdomain {subdomain:?} is not a DNS label"),
            ));
        }
        if !subdomains.insert(subdomain.clone()) {
            return Err(ctx.err(
                here,
                subject,
                format!("subdomain {subdomain:?} is used by another tenant"),
            ));
        }
        let mut limits = match &t.plan {
            None => PlanConfig::default(),
            Some(plan) => plans.get(plan.get_ref()).cloned().ok_or_else(|| {
                ctx.err(
                    Some(plan.span()),
                    subject.clone(),
                    format!("plan {:?} is not defined in [plans]", plan.get_ref()),
                )
            })?,
        };
        let o = t.settings;
        limits.max_client_connections = o.max_client_connections.or(limits.max_client_connections);
        limits.max_server_connections = o.max_server_connections.or(limits.max_server_connections);
        limits.queries_per_second = o.queries_per_second.or(limits.queries_per_second);
        limits.statement_timeout = o.statement_timeout.or(limits.statement_timeout);
        limits.idle_in_transaction_timeout = o
            .idle_in_transaction_timeout
            .or(limits.idle_in_transaction_timeout);
        limits.max_message_size = o.max_message_size.or(limits.max_message_size);
        if limits.max_message_size.is_some_and(|n| n < 1024) {
            return Err(ctx.err(
                here,
                subject,
                "max_message_size must be at least 1024".into(),
            ));
        }
        // Set on the tenant's server connections: PostgreSQL takes whole milliseconds up to
        // INT_MAX, and refuses every login with a larger value.
        if limits
            .statement_timeout
            .is_some_and(|d| d.as_millis() > i32::MAX as u128)
        {
            return Err(ctx.err(
                here,
                subject,
                "statement_timeout must be at most 2147483647ms (about 24 days), PostgreSQL's largest".into(),
            ));
        }

        let pl = t.placement;
        let shard_name = pl.shard.get_ref().clone();
        if !shards.contains_key(&shard_name) {
            return Err(ctx.err(
                Some(pl.shard.span()),
                subject,
                format!("placement names unknown shard {shard_name:?}"),
            ));
        }
        match (pl.kind, &pl.schema) {
            (PlacementKind::Schema, None) => {
                return Err(ctx.err(
                    Some(pl.shard.span()),
                    subject,
                    "a schema placement needs schema = \"<name>\"".into(),
                ));
            }
            (PlacementKind::Schema, Some(s)) if s.is_empty() || s.len() > 63 => {
                return Err(ctx.err(
                    Some(pl.shard.span()),
                    subject,
                    format!("schema {s:?} is not a valid name"),
                ));
            }
            (PlacementKind::Shared | PlacementKind::Dedicated, Some(_)) => {
                return Err(ctx.err(
                    Some(pl.shard.span()),
                    subject,
                    "schema is only allowed with kind = \"schema\"".into(),
                ));
            }
            _ => {}
        }
        if pl.kind == PlacementKind::Dedicated {
            if let Some(other) = dedicated_shards
                .insert(shard_name.clone(), name.clone())
                .or_else(|| shared_shards.get(&shard_name).cloned())
            {
                return Err(ctx.err(
                    Some(pl.shard.span()),
                    subject,
                    format!("dedicated shard {shard_name:?} is also used by tenant {other:?}"),
                ));
            }
        } else {
            if let Some(other) = dedicated_shards.get(&shard_name) {
                return Err(ctx.err(
                    Some(pl.shard.span()),
                    subject,
                    format!("shard {shard_name:?} is dedicated to tenant {other:?}"),
                ));
            }
            shared_shards.insert(shard_name.clone(), name.clone());
        }

        let subject_text = format!("tenant {name:?}");
        let isolation = match t.isolation {
            IsolationMode::Context => {
                if t.server_user.is_some() {
                    return Err(ctx.err(
                        here,
                        subject,
                        "server_user is only used with isolation = \"role\"".into(),
                    ));
                }
                Isolation::Context
            }
            IsolationMode::Role => {
                let Some(user) = t.server_user.filter(|u| !u.is_empty()) else {
                    return Err(ctx.err(
                        here,
                        subject,
                        "isolation = \"role\" needs server_user".into(),
                    ));
                };
                let password = secret(
                    ctx,
                    &subject_text,
                    "server_password",
                    t.server_password,
                    t.server_password_env,
                )?;
                let readonly_password = secret(
                    ctx,
                    &subject_text,
                    "server_readonly_password",
                    t.server_readonly_password,
                    t.server_readonly_password_env,
                )?;
                let readonly = t
                    .server_readonly_user
                    .filter(|u| !u.is_empty() && *u != user)
                    .map(|u| (u, readonly_password));
                Isolation::Role {
                    user,
                    password,
                    readonly,
                }
            }
        };

        if t.allow_ddl
            && !(pl.kind == PlacementKind::Schema && matches!(isolation, Isolation::Role { .. }))
        {
            return Err(ctx.err(
                here,
                subject,
                "allow_ddl needs a schema placement with isolation = \"role\"".into(),
            ));
        }
        let tls = match t.tls {
            None => None,
            Some(tt) => {
                if listen.tls.is_none() {
                    return Err(ctx.err(
                        here,
                        subject,
                        "a tenant certificate needs [listen.tls]".into(),
                    ));
                }
                Some(ctx.load_certs(&tt.cert, &tt.key, here.clone(), subject.clone())?)
            }
        };

        let mut users = HashMap::new();
        for u in t.users {
            let uname = u.name.get_ref().clone();
            if uname.is_empty() || uname.contains('@') || uname.contains('\0') {
                return Err(ctx.err(
                    Some(u.name.span()),
                    subject,
                    format!("user name {uname:?} is empty or contains '@'"),
                ));
            }
            let verifier = ScramVerifier::parse(u.scram.get_ref()).map_err(|e| {
                ctx.err(
                    Some(u.scram.span()),
                    Some(format!("tenant {name:?}, user {uname:?}")),
                    e.to_string(),
                )
            })?;
            if users.contains_key(&uname) {
                return Err(ctx.err(
                    Some(u.name.span()),
                    subject,
                    format!("user {uname:?} is listed twice"),
                ));
            }
            users.insert(
                uname.clone(),
                TenantUser {
                    name: uname,
                    verifier,
                    role: u.role,
                },
            );
        }
        // Read-only users reach the database as a role that cannot write: without one the
        // configuration is refused rather than trusting the guard alone.
        if users
            .values()
            .any(|u: &TenantUser| u.role == UserRole::Readonly)
        {
            let has_readonly_login = match &isolation {
                Isolation::Role { readonly, .. } => readonly.is_some(),
                Isolation::Context => shards
                    .get(&shard_name)
                    .is_some_and(|s: &Arc<Shard>| s.readonly.is_some()),
            };
            if !has_readonly_login {
                return Err(ctx.err(
                    here,
                    subject,
                    match &isolation {
                        Isolation::Role { .. } => "it has read-only users: set server_readonly_user (a role of the tenant's that can only read)".to_owned(),
                        Isolation::Context => format!(
                            "it has read-only users: set readonly_user on shard {shard_name:?} (a login role that can only read)"
                        ),
                    },
                ));
            }
        }
        tenants.push(Arc::new(Tenant {
            id,
            name,
            subdomain,
            plan: t.plan.map(|p| p.into_inner()),
            placement: Placement {
                kind: pl.kind,
                shard: shard_name,
                schema: pl.schema,
            },
            limits,
            isolation,
            allow_ddl: t.allow_ddl,
            users,
            tls,
        }));
    }
    Ok(tenants)
}
