//! An authenticated session: admission against the tenant's client limit, routing, a server
//! connection (within the tenant's server-connection cap) with the tenant context bound, then
//! forwarding through the relay until the client leaves. While forwarding, the session
//! enforces the plan's statement timeout itself (by cancelling the server's statement) and its
//! idle-in-transaction timeout (by ending the session). Last, the server connection goes back
//! to its pool.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use tokio::io::AsyncWriteExt;

use super::pump::{Pump, PumpEnd, ServerSide};
use super::relay::{Binding, ClientStep, Relay, RelayRules};
use super::{Authenticated, SessionError, report};
use crate::config::{PlacementKind, PlanConfig, PoolMode, Snapshot, Tenant, UserRole};
use crate::error::{ClientError, Reportable, sqlstate};
use crate::net::stream::ClientStream;
use crate::pool::{CANCEL_PATIENCE, Pool, PoolError, PooledConn, RESET_PATIENCE, notify};
use crate::protocol::frame::FrameError;
use crate::protocol::{TxStatus, encode};
use crate::quota::TenantStats;
use crate::state::AppState;
use crate::tenant::guard::{Policy, Scope};
use crate::tenant::params::ClientSettings;
use crate::tenant::route::route;
use crate::tenant::{binding_sql, quote_ident, quote_literal};

mod end;
mod forward;
mod listen;
mod pooled;
mod woken;

use end::{SessionEnd, finish};
use forward::{Waits, forward};
use pooled::{Attached, forward_pooled, replica_pools};

/// The guard policy for `tenant`'s user `role`.
fn policy_for(tenant: &Tenant, role: UserRole) -> Policy {
    let scope = match tenant.placement.kind {
        PlacementKind::Dedicated => Scope::Dedicated,
        PlacementKind::Shared | PlacementKind::Schema => Scope::Tenant,
    };
    Policy {
        scope,
        // A schema tenant's search_path is bound by pgtenant whatever its isolation: a SET
        // of it would be undone at the next transaction, so it is refused outright.
        protect_search_path: tenant.placement.kind == PlacementKind::Schema,
        readonly: role == UserRole::Readonly,
        max_statement_timeout: tenant.limits.statement_timeout.filter(|d| !d.is_zero()),
        notify_prefix: (scope == Scope::Tenant).then(|| format!("{}.", tenant.name)),
        allow_ddl: tenant.allow_ddl,
        prepared_prefix: None,
        lock_salt: None,
        unchecked: false,
        prepared_view: None,
    }
}

/// pgtenant's own constant SQL that binds the tenant context, the user's read-only mode and
/// the plan's statement timeout. It runs when a server connection is taken and again after
/// the client resets its settings; the client's startup settings follow it as parameters.
fn session_setup_sql(tenant: &Tenant, role: UserRole) -> String {
    let mut sql = binding_sql(tenant);
    if role == UserRole::Readonly {
        sql.push_str("; SET default_transaction_read_only TO on");
    }
    if let Some(limit) = tenant.limits.statement_timeout.filter(|d| !d.is_zero()) {
        sql.push_str(&format!(
            "; SET statement_timeout TO '{}ms'",
            limit.as_millis()
        ));
    }
    sql
}

/// Startup settings pass the same rules as the equivalent `SET`.
fn check_startup_settings(settings: &ClientSettings, policy: &Policy) -> Result<(), SessionError> {
    for (name, value) in &settings.0 {
        let sql = format!("SET {} TO {}", quote_ident(name), quote_literal(value));
        if let Some(r) = policy.check(sql.as_bytes(), true).refusal {
            return Err(SessionError::Refused(ClientError::fatal(
                sqlstate::INSUFFICIENT_PRIVILEGE,
                r.message,
            )));
        }
    }
    Ok(())
}

pub(super) async fn run_session(
    state: &AppState,
    snapshot: &Snapshot,
    client: Authenticated,
    who: crate::telemetry::audit::Who,
) {
    let role = client.account().map(|u| u.role).unwrap_or_default();
    let Authenticated {
        mut stream,
        peer,
        tenant,
        user,
        startup,
        settings,
    } = client;
    let client_id = who.session;
    let pooling = snapshot.pool.mode == PoolMode::Transaction;
    let mut policy = policy_for(&tenant, role);
    policy.unchecked = snapshot.unguarded_for_tests;
    if pooling {
        policy.prepared_prefix = Some(format!("pgt_c{client_id}_"));
    }
    let Some(_slot) = state
        .quotas
        .admit_client(&tenant.name, tenant.limits.max_client_connections)
    else {
        let e = SessionError::Quota(
            ClientError::fatal(
                sqlstate::TOO_MANY_CONNECTIONS,
                format!("too many connections for tenant \"{}\"", tenant.name),
            )
            .with_hint("this tenant's plan caps its client connections; close some and retry"),
        );
        tracing::info!(
            kind = e.kind().as_str(),
            "session refused: client connection limit"
        );
        report(&mut stream, &e).await;
        return;
    };
    // Ends with pgtenant's shutdown, or alone by the admin console's KILL.
    let end_token = state.shutdown.child_token();
    // Shutdown has begun: a transaction-mode session ends at its next transaction boundary.
    // A token of its own, so that waiting on it touches no lock other sessions share.
    let drain_token = state.draining.child_token();
    // Session mode: the tenant was removed or moved by a reload; the session ends at its
    // next transaction boundary (transaction mode checks at each transaction instead).
    let leave_token = tokio_util::sync::CancellationToken::new();
    let _registered = state.clients.register(
        client_id,
        crate::registry::ClientEntry {
            tenant: tenant.name.clone(),
            user: user.clone(),
            peer,
            since: Instant::now(),
            end: end_token.clone(),
            leave: leave_token.clone(),
        },
    );
    let setup_sql = session_setup_sql(&tenant, role);
    let tenant_cap = tenant
        .limits
        .max_server_connections
        .filter(|_| policy.scope == Scope::Tenant)
        .map(|n| (n, state.quotas.tenant(&tenant.name).server_permits(n)));
    let shard = match route(snapshot, &tenant, startup.get("database")) {
        Ok(shard) => shard,
        Err(e) => {
            let e = SessionError::from(e);
            tracing::info!(kind = e.kind().as_str(), error = %e, "session refused");
            report(&mut stream, &e).await;
            return;
        }
    };
    {
        use crate::telemetry::audit::str_value;
        state.audit.event(
            "route",
            &who,
            &[
                ("shard", str_value(&shard.name)),
                (
                    "placement",
                    str_value(&format!("{:?}", tenant.placement.kind).to_lowercase()),
                ),
            ],
        );
    }
    let context_key = shard.context_key.clone();
    if policy.scope == Scope::Tenant {
        policy.lock_salt = Some(crate::tenant::context::lock_salt(
            context_key.as_deref(),
            tenant.id,
        ));
    }
    let rules = RelayRules {
        notify_prefix: policy.notify_prefix.clone(),
        policy: policy.clone(),
        rebind_sql: setup_sql,
        startup_settings: settings.0.clone(),
        binding: Binding {
            sql: binding_sql(&tenant),
            tenant_id: tenant.id.to_string(),
            search_path: match (tenant.placement.kind, &tenant.placement.schema) {
                (PlacementKind::Schema, Some(schema)) => Some(quote_ident(schema)),
                _ => None,
            },
            verified: context_key.is_some(),
            encoded: None,
        },
        client_id,
        tenant: state.quotas.tenant(&tenant.name),
        queries_per_second: tenant.limits.queries_per_second,
        audit: state.audit.clone(),
        who: who.clone(),
    };
    let max_message = tenant
        .limits
        .max_message_size
        .map_or(snapshot.listen.max_message_size, |n| {
            n.min(snapshot.listen.max_message_size)
        });
    let mut relay = Relay::new(max_message, rules);
    let tenant_state = state.quotas.tenant(&tenant.name);
    // Read before the placement in force is compared with the session's: a MOVE that lands
    // after this is seen at the next transaction.
    let epoch = tenant_state.placement_epoch();
    let placed_now = state
        .snapshot()
        .tenant_by_name(&tenant.name)
        .is_some_and(|t| t.placement == tenant.placement);
    let ctx = Prepare {
        tenant: Arc::clone(&tenant),
        tenant_id: tenant.id.to_string(),
        key: context_key.clone(),
    };
    let setup = async {
        settings
            .check_placement(tenant.placement.kind)
            .map_err(SessionError::Refused)?;
        check_startup_settings(&settings, &policy)?;
        let pool = state.pools.for_tenant(&shard, &tenant, role)?;
        let (pooled, _) = checkout_prepared(
            &pool,
            &ctx,
            &mut relay,
            Instant::now(),
            tenant_cap.clone(),
            None,
        )
        .await
        .map_err(|e| match e {
            Failed::Checkout(e) => SessionError::from(e),
            Failed::Server(e) => SessionError::from(e),
            Failed::Client(f) => {
                SessionError::Refused(ClientError::fatal_from_server(&f.code, &f.message))
            }
        })?;
        Ok::<_, SessionError>((pool, pooled))
    };
    let (pool, pooled) = match setup.await {
        Ok(ok) => ok,
        Err(e) => {
            tracing::info!(kind = e.kind().as_str(), error = %e, "session refused");
            report(&mut stream, &e).await;
            return;
        }
    };

    let cancel = state.cancels.register();
    relay.virtual_pid = cancel.key().0;
    let mut out = BytesMut::new();
    for (name, value) in &pooled.conn.params {
        let value = if name == "session_authorization" {
            &user
        } else {
            value
        };
        encode::parameter_status(name, value, &mut out);
    }
    let (pid, secret) = cancel.key();
    encode::backend_key_data(pid, secret, &mut out);
    encode::ready_for_query(TxStatus::Idle, &mut out);
    if stream.write_all(&out).await.is_err() || stream.flush().await.is_err() {
        drop(cancel);
        pool.checkin(pooled, true).await;
        return;
    }

    let mut pump = Pump::with_write_timeout(snapshot.pool.client_write_timeout);
    let mut pool = pool;
    let (end, attached) = if pooling {
        pool.release(pooled, Instant::now()).await;
        let mut attached = Attached {
            replicas: replica_pools(state, &shard, &tenant, role),
            held: Arc::clone(&pool),
            pool: Arc::clone(&pool),
            prepare: ctx,
            placement: tenant.placement.clone(),
            // Moved since this session read its snapshot: it routes again first.
            epoch: if placed_now {
                epoch
            } else {
                epoch.wrapping_sub(1)
            },
            role,
            client_id,
            tenant_cap,
            tenant: &tenant_state,
        };
        let forwarded = forward_pooled(
            state,
            &mut attached,
            (&end_token, &drain_token),
            &cancel,
            &mut relay,
            &mut pump,
            &mut stream,
        )
        .await;
        // The pool of the connection still held (another shard's after a MOVE, or a
        // replica's).
        pool = attached.held;
        forwarded
    } else {
        let mut pooled = pooled;
        cancel.set_target(Some(pooled.conn.cancel_target()));
        relay.set_own_backend(pooled.conn.backend_pid());
        let shutdown = std::pin::pin!(end_token.cancelled());
        let leave = std::pin::pin!(leave_token.cancelled());
        let mut waits = Waits::new(woken::Woken::new(shutdown), &tenant.limits);
        waits.leave = Some((woken::Woken::new(leave), &tenant_state));
        let end = forward(
            &mut waits,
            &tenant.limits,
            &mut relay,
            &mut pump,
            &mut stream,
            &mut pooled,
        )
        .await;
        (end, Some(pooled))
    };
    drop(cancel);
    flush_bytes(&mut pump, &tenant_state);
    let end = match end {
        SessionEnd::Shutdown
            if !state.shutdown.is_cancelled() && !state.draining.is_cancelled() =>
        {
            SessionEnd::Killed
        }
        end => end,
    };
    let counters = relay.counters;
    tracing::info!(
        queries = counters.queries,
        refused = counters.refused,
        throttled = counters.throttled,
        "session counters"
    );
    let (bytes_in, bytes_out) = pump.byte_totals();
    let label = finish(end, &mut stream, &mut pump, attached.as_ref()).await;
    state.audit.event(
        "disconnect",
        &who,
        &[
            ("end", crate::telemetry::audit::str_value(label)),
            ("queries", counters.queries.to_string()),
            ("refused", counters.refused.to_string()),
            ("throttled", counters.throttled.to_string()),
            ("bytes_from_client", bytes_in.to_string()),
            ("bytes_to_client", bytes_out.to_string()),
        ],
    );
    let Some(mut pooled) = attached else { return };
    let leftover = pump.take_to_server();
    if !leftover.is_empty() && relay.client_at_boundary() {
        // Messages the client sent just before leaving (e.g. a query and Terminate).
        let _ = pooled.conn.send(&leftover).await;
    }
    if relay.server_unusable() {
        // Closed: pgtenant could not bind the context on it.
        pool.retire(
            pooled,
            relay.client_at_boundary(),
            "the tenant context could not be bound",
        );
    } else if pooling && relay.client_at_boundary() && !relay.pinned() {
        pool.release(pooled, Instant::now()).await;
    } else {
        pool.checkin(pooled, relay.client_at_boundary()).await;
    }
}

/// Adds the client bytes the pump moved since last time to the tenant's metrics.
fn flush_bytes(pump: &mut Pump, tenant: &crate::quota::TenantState) {
    let (from, to) = pump.take_byte_counts();
    TenantStats::add(&tenant.stats.bytes_from_clients, from);
    TenantStats::add(&tenant.stats.bytes_to_clients, to);
}

/// What preparing a server connection for a tenant's client needs.
struct Prepare {
    tenant: Arc<Tenant>,
    /// The tenant's id as text (tokens are kept per tenant id).
    tenant_id: String,
    /// The shard's context key, when it verifies the context.
    key: Option<Arc<crate::tenant::context::ContextKey>>,
}

/// Why no prepared server connection could be had.
enum Failed {
    Checkout(PoolError),
    Server(crate::pool::ServerError),
    /// The client's settings were refused by the server.
    Client(crate::protocol::server_msgs::ErrorFields),
}

/// How many server connections a transaction may try when resetting or setting them up
/// fails (each failed one is closed).
const PREPARE_ATTEMPTS: usize = 3;

/// Takes a server connection and readies it for the client's next transaction: resets it
/// if another tenant used it, makes the verified-context token for this tenant and backend,
/// and runs the client's setup when the connection's session state is not the client's. All
/// of that is awaited before any client message is sent: a connection on which it fails is
/// closed and another one tried, so the client's statements never run on one left in a
/// previous tenant's state or unbound. Returns the connection and whether it is bound now.
///
/// `taken`: a connection of `pool` already taken (by [`prepared_now`]) that needs the
/// awaited preparation.
async fn checkout_prepared(
    pool: &Arc<Pool>,
    p: &Prepare,
    relay: &mut Relay,
    now: Instant,
    tenant_cap: Option<(usize, Arc<tokio::sync::Semaphore>)>,
    mut taken: Option<PooledConn>,
) -> Result<(PooledConn, bool), Failed> {
    let state = relay.settings_key();
    let mut last = None;
    for _ in 0..PREPARE_ATTEMPTS {
        let mut pooled = match taken.take() {
            Some(pooled) => pooled,
            None => pool
                .checkout(p.tenant.id, &state, tenant_cap.clone(), now)
                .await
                .map_err(Failed::Checkout)?,
        };
        match prepare(&mut pooled, p, relay).await {
            Ok(bound_now) => return Ok((pooled, bound_now)),
            // The server refused a value of the client's own (a startup setting): another
            // connection would refuse it too.
            Err(crate::pool::ServerError::Server(fields))
                if fields.code.starts_with("22") || fields.code.starts_with("42") =>
            {
                return Err(Failed::Client(fields));
            }
            Err(e) => {
                tracing::warn!(error = %e, "a server connection could not be reset or bound");
                last = Some(e);
                pool.retire(pooled, true, "it could not be reset or bound");
            }
        }
    }
    Err(Failed::Server(
        last.unwrap_or(crate::pool::ServerError::Closed),
    ))
}

/// The fast path of [`checkout_prepared`], with no wait: an idle connection of `pool`, taken
/// at once, that needs neither a reset nor the client's setup (the same tenant and session
/// state as the client's). `Err` when that cannot be had: with the connection taken, which
/// [`checkout_prepared`] then prepares, or none (it checks one out, waiting if it must).
fn prepared_now(
    pool: &Pool,
    p: &Prepare,
    relay: &mut Relay,
    now: Instant,
    tenant_cap: Option<&(usize, Arc<tokio::sync::Semaphore>)>,
) -> Result<PooledConn, Option<PooledConn>> {
    let mut pooled = pool
        .checkout_now(p.tenant.id, relay.settings_key_ref(), tenant_cap, now)
        .ok_or(None)?;
    if needs_reset(&pooled.conn, p) || relay.needs_setup(&mut pooled.conn.pooled) {
        return Err(Some(pooled));
    }
    bind_to(&mut pooled.conn, p);
    Ok(pooled)
}

/// Bound to another tenant, or used at all since its last reset: the connection is reset
/// before this tenant sees it.
fn needs_reset(conn: &crate::pool::ServerConn, p: &Prepare) -> bool {
    conn.bound != Some(p.tenant.id) && (conn.pooled.used || conn.bound.is_some())
}

/// Marks `conn` (reset if it had to be) as the tenant's, with its verified-context token.
#[inline(always)]
fn bind_to(conn: &mut crate::pool::ServerConn, p: &Prepare) {
    if let Some(key) = p.key.as_deref()
        && conn.pooled.token_for(&p.tenant_id).is_none()
    {
        let token = key.next_token(p.tenant.id, conn.backend_pid());
        conn.pooled.context_token = Some((p.tenant_id.clone(), token));
    }
    conn.bound = Some(p.tenant.id);
    conn.pooled.used = true;
}

async fn prepare(
    pooled: &mut PooledConn,
    p: &Prepare,
    relay: &mut Relay,
) -> Result<bool, crate::pool::ServerError> {
    let conn = &mut pooled.conn;
    if needs_reset(conn, p) {
        conn.reset(RESET_PATIENCE).await?;
    }
    bind_to(conn, p);
    let setup = relay.setup_for(&mut conn.pooled);
    let bound_now = setup.is_some();
    if let Some((sql, pairs)) = setup {
        let pairs: Vec<(&str, &str)> = pairs
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        crate::timers::timeout(RESET_PATIENCE, conn.run_setup(Some(&sql), &pairs))
            .await
            .map_err(|_| crate::pool::ServerError::Timeout)??;
        relay.setup_done(&mut conn.pooled);
    }
    Ok(bound_now)
}
