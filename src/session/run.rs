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

/// How forwarding ended.
enum SessionEnd {
    Pump(PumpEnd),
    Shutdown,
    /// The admin console ended the tenant's sessions (`KILL`).
    Killed,
    /// A reload removed the tenant from the configuration.
    Removed,
    /// The tenant's placement changed in a way the session cannot follow.
    Moved,
    IdleInTransaction(Duration),
    /// Transaction pooling: no server connection for the next transaction.
    Checkout(PoolError),
    /// No server connection could be reset and bound for the next transaction.
    Setup(crate::pool::ServerError),
    /// More notifications waited for the client than its queue holds.
    NotifyOverflow,
}

pub(super) async fn run_session(
    state: &AppState,
    snapshot: &Snapshot,
    client: Authenticated,
    who: crate::admin::audit::Who,
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
        crate::admin::registry::ClientEntry {
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
        use crate::admin::audit::str_value;
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
    let session_metrics = state.metrics.session(&tenant.name);
    relay.query_seconds = Some(session_metrics.query_seconds.clone());
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
        let (pooled, _) = checkout_prepared(&pool, &ctx, &mut relay, client_id, tenant_cap.clone())
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
        pool.release(pooled).await;
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
            metrics: session_metrics,
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
        let shutdown = end_token.cancelled();
        tokio::pin!(shutdown);
        let leave = leave_token.cancelled();
        tokio::pin!(leave);
        let mut waits = Waits::new(shutdown, &tenant.limits);
        waits.leave = Some((leave, &tenant_state));
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
            ("end", crate::admin::audit::str_value(label)),
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
        pool.release(pooled).await;
    } else {
        pool.checkin(pooled, relay.client_at_boundary()).await;
    }
}

/// What transaction pooling needs to take server connections for a client.
struct Attached<'a> {
    /// The tenant's shard (its primary).
    pool: Arc<Pool>,
    /// Its streaming replicas, for read-only transactions.
    replicas: Vec<Arc<Pool>>,
    /// The pool of the server connection taken last (the primary's or a replica's).
    held: Arc<Pool>,
    prepare: Prepare,
    /// Where the session's transactions go now, and the tenant's placement generation it
    /// was read at.
    placement: crate::config::Placement,
    epoch: u64,
    role: UserRole,
    client_id: u64,
    tenant_cap: Option<(usize, Arc<tokio::sync::Semaphore>)>,
    metrics: crate::admin::metrics::SessionMetrics,
    tenant: &'a crate::quota::TenantState,
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
async fn checkout_prepared(
    pool: &Arc<Pool>,
    p: &Prepare,
    relay: &mut Relay,
    client_id: u64,
    tenant_cap: Option<(usize, Arc<tokio::sync::Semaphore>)>,
) -> Result<(PooledConn, bool), Failed> {
    let mut last = None;
    for _ in 0..PREPARE_ATTEMPTS {
        let mut pooled = pool
            .checkout(p.tenant.id, client_id, tenant_cap.clone())
            .await
            .map_err(Failed::Checkout)?;
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

async fn prepare(
    pooled: &mut PooledConn,
    p: &Prepare,
    relay: &mut Relay,
) -> Result<bool, crate::pool::ServerError> {
    let conn = &mut pooled.conn;
    // Bound to another tenant, or used at all since its last reset: reset before this
    // tenant sees it.
    if conn.bound != Some(p.tenant.id) && (conn.pooled.used || conn.bound.is_some()) {
        conn.reset(RESET_PATIENCE).await?;
    }
    if let Some(key) = p.key.as_deref()
        && conn.pooled.token_for(&p.tenant_id).is_none()
    {
        let token = key.next_token(p.tenant.id, conn.backend_pid());
        conn.pooled.context_token = Some((p.tenant_id.clone(), token));
    }
    conn.bound = Some(p.tenant.id);
    conn.pooled.used = true;
    let setup = relay.setup_for(&conn.pooled);
    let bound_now = setup.is_some();
    if let Some((sql, pairs)) = setup {
        let pairs: Vec<(&str, &str)> = pairs
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        tokio::time::timeout(RESET_PATIENCE, conn.run_setup(Some(&sql), &pairs))
            .await
            .map_err(|_| crate::pool::ServerError::Timeout)??;
        relay.setup_done(&mut conn.pooled);
    }
    Ok(bound_now)
}

/// Transaction pooling: waits for the client's next message, takes a server connection for
/// the transaction it starts, forwards until the transaction is over, returns the
/// connection, and again. Returns how the session ended and the connection it still holds.
async fn forward_pooled(
    state: &AppState,
    a: &mut Attached<'_>,
    (end_token, drain_token): (
        &tokio_util::sync::CancellationToken,
        &tokio_util::sync::CancellationToken,
    ),
    cancel: &crate::cancel::CancelHandle,
    relay: &mut Relay,
    pump: &mut Pump,
    stream: &mut ClientStream,
) -> (SessionEnd, Option<PooledConn>) {
    // The queue of notifications for this client, made when it first listens (a session that
    // never listens, most of them, holds none).
    let mut notify_tx: Option<notify::Subscriber> = None;
    let mut notify_rx: Option<tokio::sync::mpsc::Receiver<notify::Notification>> = None;
    let prefix = relay.notify_prefix().unwrap_or_default().to_owned();
    let shutdown = end_token.cancelled();
    tokio::pin!(shutdown);
    let drain = drain_token.cancelled();
    tokio::pin!(drain);
    // Armed once the session has run a transaction: one that connected just as shutdown began
    // (it was accepted, so it is served) runs its first transaction before it is ended.
    let mut drain_armed = false;
    let mut waits = Waits::new(shutdown, &a.prepare.tenant.limits);
    let mut listening = false;
    // The backend this session last recorded itself on (see `Pool::note_owner`).
    let mut noted = None;
    let result = loop {
        let waited = tokio::select! {
            r = pump.wait_for_client(stream) => r,
            // Only a client that ever listened has notifications to wait for; a client that
            // does not read them stops taking more (its queue fills: see below).
            Some(n) = next_notification(&mut notify_rx), if listening && pump.to_client_len() < NOTIFY_BUFFERED => {
                // Notifications reach the client between its transactions, as on PostgreSQL.
                push_notification(relay, pump, &prefix, &n);
                continue;
            }
            _ = waits.shutdown.as_mut() => break (SessionEnd::Shutdown, None),
            // Between transactions when shutdown begins: nothing is lost by ending now.
            _ = drain.as_mut(), if drain_armed => break (SessionEnd::Shutdown, None),
            _ = overflowed(&notify_tx), if listening => {
                break (SessionEnd::NotifyOverflow, None);
            }
        };
        if let Err(end) = waited {
            break (SessionEnd::Pump(end), None);
        }
        if a.tenant.removed() {
            break (SessionEnd::Removed, None);
        }
        let wanted = Instant::now();
        if a.metrics.refresh(&state.metrics, wanted) {
            relay.query_seconds = Some(a.metrics.query_seconds.clone());
        }
        let checkout = {
            let _waiting = TenantStats::hold(&a.tenant.stats.waiting);
            if state.pauses.is_paused(&a.prepare.tenant.name) {
                // PAUSE: the transaction waits (its first message unread by the server)
                // until RESUME, or until the session is ended.
                tokio::select! {
                    _ = state.pauses.wait(&a.prepare.tenant.name) => {}
                    _ = waits.shutdown.as_mut() => break (SessionEnd::Shutdown, None),
                    _ = drain.as_mut(), if drain_armed => break (SessionEnd::Shutdown, None),
                }
            }
            // A MOVE TENANT (or a reload) changed where the tenant lives: this transaction
            // and the next ones go there.
            if a.tenant.placement_epoch() != a.epoch
                && let Err(end) = reroute(state, a, relay, listening)
            {
                break (end, None);
            }
            // Read-only work may go to a replica; if it cannot have a connection there, to
            // the primary.
            let read_only = !a.replicas.is_empty()
                && (a.role == UserRole::Readonly || starts_read_only(pump.pending_client()));
            checkout_routed(a, relay, read_only).await
        };
        let started = Instant::now();
        a.metrics
            .checkout_wait_seconds
            .record(started.saturating_duration_since(wanted));
        let active = TenantStats::hold(&a.tenant.stats.active);
        let (mut pooled, bound_now) = match checkout {
            // Counted active only now: a PAUSE (or MOVE) that began meanwhile saw no
            // transaction of this session, so the session waits (or routes again) first.
            Ok((p, _))
                if state.pauses.is_paused(&a.prepare.tenant.name)
                    || a.tenant.placement_epoch() != a.epoch =>
            {
                drop(active);
                a.held.release(p).await;
                continue;
            }
            Ok((p, bound_now)) => (p, bound_now),
            Err(Failed::Checkout(e)) => {
                if matches!(e, PoolError::Timeout(_) | PoolError::TenantBusy(..)) {
                    TenantStats::add(&a.tenant.stats.server_cap_refusals, 1);
                }
                break (SessionEnd::Checkout(e), None);
            }
            Err(Failed::Server(e)) => break (SessionEnd::Setup(e), None),
            Err(Failed::Client(f)) => {
                break (SessionEnd::Setup(crate::pool::ServerError::Server(f)), None);
            }
        };
        cancel.set_target(Some(pooled.conn.cancel_target()));
        // Who uses the backend matters only to the shard's listening connection, and only
        // when it changes hands.
        let backend = pooled.conn.backend_pid();
        if (noted != Some(backend) || pooled.conn.pooled.last_client != Some(a.client_id))
            && !a.held.is_replica()
            && a.pool.hub_if_started().is_some()
        {
            a.pool.note_owner(backend, relay.virtual_pid);
            noted = Some(backend);
        }
        let step = {
            let mut side = ServerSide::of(&mut pooled.conn);
            relay.attach(pump.to_server_mut(), side.tracker, side.pooled, bound_now);
            pump.process_client(relay, &mut side)
        };
        match step {
            Ok(ClientStep::Continue) => {}
            Ok(ClientStep::Terminate) => {
                break (SessionEnd::Pump(PumpEnd::Terminated), Some(pooled));
            }
            Err(e) => break (SessionEnd::Pump(PumpEnd::ClientProtocol(e)), Some(pooled)),
        }
        // Notifications that arrive while the client keeps its connection (a pinned client
        // does for its whole session), delivered when it is between transactions.
        let mut held: std::collections::VecDeque<notify::Notification> = Default::default();
        let (end, listened) = loop {
            let end = loop {
                if !held.is_empty() && relay.between_transactions(&pooled.conn.tracker) {
                    while let Some(n) = held.pop_front() {
                        push_notification(relay, pump, &prefix, &n);
                    }
                }
                // The forwarding state lives in the pump: leaving `forward` for a
                // notification loses nothing.
                tokio::select! {
                    end = forward(
                        &mut waits,
                        &a.prepare.tenant.limits,
                        relay,
                        pump,
                        stream,
                        &mut pooled,
                    ) => break end,
                    Some(n) = next_notification(&mut notify_rx), if listening && held.len() < notify::CLIENT_QUEUE => {
                        held.push_back(n);
                    }
                    _ = overflowed(&notify_tx), if listening => {
                        break SessionEnd::NotifyOverflow;
                    }
                }
            };
            // Before the connection can pass to anyone else: who notified from it (a
            // replica runs no NOTIFY).
            if !a.held.is_replica() {
                a.pool.note_notifications(
                    pooled.conn.backend_pid(),
                    relay.virtual_pid,
                    relay.take_committed_notes(),
                );
            }
            let listened = subscribe(
                relay,
                &a.pool,
                a.client_id,
                (&mut notify_tx, &mut notify_rx),
            );
            listening |= !listened.is_empty();
            if matches!(end, SessionEnd::Pump(PumpEnd::Listening)) {
                // The client keeps its (pinned) connection; its ReadyForQuery goes out once
                // the hub listens.
                confirm_listens(listened).await;
                continue;
            }
            break (end, listened);
        };
        match end {
            SessionEnd::Pump(PumpEnd::Released) => {
                // No new cancel can reach the connection now; release waits for one still
                // on its way.
                cancel.set_target(None);
                a.held.release(pooled).await;
                drop(active);
                a.metrics.transaction_seconds.record(started.elapsed());
                flush_bytes(pump, a.tenant);
                for n in held.drain(..) {
                    push_notification(relay, pump, &prefix, &n);
                }
                // The ReadyForQuery is still unsent: the client learns LISTEN is done only
                // when it is.
                confirm_listens(listened).await;
                if drain_token.is_cancelled() {
                    break (SessionEnd::Shutdown, None);
                }
                drain_armed = true;
            }
            end => break (end, Some(pooled)),
        }
    };
    subscribe(
        relay,
        &a.pool,
        a.client_id,
        (&mut notify_tx, &mut notify_rx),
    );
    if let Some(hub) = a.pool.hub_if_started() {
        hub.unlisten(None, a.client_id);
    }
    result
}

/// Takes the transaction's server connection: from a replica when it is read-only and one
/// can take it, else (or when that fails) from the primary. `a.held` says which.
async fn checkout_routed(
    a: &mut Attached<'_>,
    relay: &mut Relay,
    read_only: bool,
) -> Result<(PooledConn, bool), Failed> {
    if let Some(replica) = pick_replica(&a.replicas, read_only) {
        a.held = replica;
        let cap = a.tenant_cap.clone();
        match checkout_prepared(&a.held, &a.prepare, relay, a.client_id, cap).await {
            // The replica could not serve it: the primary does.
            Err(Failed::Checkout(_) | Failed::Server(_)) => {}
            done => return done,
        }
    }
    a.held = Arc::clone(&a.pool);
    let cap = a.tenant_cap.clone();
    checkout_prepared(&a.held, &a.prepare, relay, a.client_id, cap).await
}

/// The pools of `shard`'s replicas for this tenant's user.
fn replica_pools(
    state: &AppState,
    shard: &crate::config::Shard,
    tenant: &Tenant,
    role: UserRole,
) -> Vec<Arc<Pool>> {
    shard
        .replicas
        .iter()
        .filter_map(|r| state.pools.for_tenant(r, tenant, role).ok())
        .collect()
}

/// The replica a read-only transaction goes to: of those up and not lagging, the one with the
/// fewest connections in use. `None`: the primary takes it.
fn pick_replica(replicas: &[Arc<Pool>], read_only: bool) -> Option<Arc<Pool>> {
    if !read_only {
        return None;
    }
    replicas
        .iter()
        .filter(|p| p.serves_reads())
        .min_by_key(|p| p.in_use())
        .cloned()
}

/// Whether the client's next message starts a transaction it marked read-only (`BEGIN READ
/// ONLY`, `START TRANSACTION ISOLATION LEVEL ... READ ONLY`, as a simple query or a Parse).
/// Anything else, or anything not recognised, is not (it goes to the primary).
fn starts_read_only(pending: &[u8]) -> bool {
    let sql = match pending.split_first() {
        Some((&b'Q', rest)) => rest.get(4..),
        // Parse: the statement name, then the query.
        Some((&b'P', rest)) => rest
            .get(4..)
            .and_then(|b| b.iter().position(|&c| c == 0).map(|n| &b[n + 1..])),
        _ => None,
    };
    let Some(sql) = sql else { return false };
    let end = sql
        .iter()
        .position(|&c| c == 0 || c == b';')
        .unwrap_or(sql.len())
        .min(256);
    let mut words = sql[..end]
        .split(|&c| c.is_ascii_whitespace() || c == b',')
        .filter(|w| !w.is_empty());
    let opens = match words.next() {
        Some(w) if w.eq_ignore_ascii_case(b"BEGIN") => true,
        Some(w) if w.eq_ignore_ascii_case(b"START") => words
            .next()
            .is_some_and(|w| w.eq_ignore_ascii_case(b"TRANSACTION")),
        _ => false,
    };
    if !opens {
        return false;
    }
    let mut read = false;
    words.any(|w| {
        let only = read && w.eq_ignore_ascii_case(b"ONLY");
        read = w.eq_ignore_ascii_case(b"READ");
        only
    })
}

/// Points the session at the tenant's placement in force: its next transactions take server
/// connections from the new shard's pool, bound with that shard's context key. A session
/// that listens for notifications (subscribed on the old shard) or whose placement changed
/// kind or schema ends instead.
fn reroute(
    state: &AppState,
    a: &mut Attached<'_>,
    relay: &mut Relay,
    listening: bool,
) -> Result<(), SessionEnd> {
    // Read first: a change after this read bumps it again.
    let epoch = a.tenant.placement_epoch();
    let snapshot = state.snapshot();
    let Some(now) = snapshot.tenant_by_name(&a.prepare.tenant.name) else {
        return Err(SessionEnd::Removed);
    };
    if now.placement == a.placement {
        a.epoch = epoch;
        return Ok(());
    }
    if listening
        || now.placement.kind != a.placement.kind
        || now.placement.schema != a.placement.schema
    {
        return Err(SessionEnd::Moved);
    }
    let shard = snapshot.shard_of(now).ok_or(SessionEnd::Moved)?;
    a.pool = state
        .pools
        .for_tenant(shard, &a.prepare.tenant, a.role)
        .map_err(SessionEnd::Checkout)?;
    a.prepare.key = shard.context_key.clone();
    a.replicas = replica_pools(state, shard, &a.prepare.tenant, a.role);
    relay.placement_changed(
        shard.context_key.is_some(),
        crate::tenant::context::lock_salt(shard.context_key.as_deref(), a.prepare.tenant.id),
    );
    tracing::info!(shard = %shard.name, "tenant moved: this session follows it");
    a.placement = now.placement.clone();
    a.epoch = epoch;
    Ok(())
}

/// Queues a notification for the client, its channel under the client's own name (unless
/// it is the client's own, shown before its ReadyForQuery already).
fn push_notification(relay: &mut Relay, pump: &mut Pump, prefix: &str, n: &notify::Notification) {
    if relay.shown_already(&n.channel, &n.payload) {
        return;
    }
    let channel = n.channel.strip_prefix(prefix).unwrap_or(&n.channel);
    let mut out = BytesMut::new();
    encode::notification(n.pid, channel, &n.payload, &mut out);
    pump.push_to_client(&out);
}

/// Passes the LISTEN/UNLISTEN the client ran to the shard's notification hub (making the
/// client's queue on its first LISTEN). Returns the hub's confirmations for the new listens.
fn subscribe(
    relay: &mut Relay,
    pool: &Pool,
    client: u64,
    (deliver, queue): (
        &mut Option<notify::Subscriber>,
        &mut Option<tokio::sync::mpsc::Receiver<notify::Notification>>,
    ),
) -> Vec<tokio::sync::oneshot::Receiver<()>> {
    for channel in std::mem::take(&mut relay.unlistens) {
        pool.hub().unlisten(channel, client);
    }
    let listens = std::mem::take(&mut relay.listens);
    if listens.is_empty() {
        return Vec::new();
    }
    let deliver = deliver.get_or_insert_with(|| {
        let (tx, rx) = tokio::sync::mpsc::channel(notify::CLIENT_QUEUE);
        *queue = Some(rx);
        notify::Subscriber {
            deliver: tx,
            overflow: Arc::default(),
        }
    });
    listens
        .into_iter()
        .map(|channel| pool.hub().listen(channel, client, deliver.clone()))
        .collect()
}

/// The next notification queued for the client; never, before it listens.
async fn next_notification(
    queue: &mut Option<tokio::sync::mpsc::Receiver<notify::Notification>>,
) -> Option<notify::Notification> {
    match queue {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// Fires when the client's queue overflowed; never, before it listens.
async fn overflowed(deliver: &Option<notify::Subscriber>) {
    match deliver {
        Some(d) => d.overflow.notified().await,
        None => std::future::pending().await,
    }
}

/// Bytes of notifications written to a client and not yet sent, at most; past it the session
/// stops taking notifications from its queue.
const NOTIFY_BUFFERED: usize = 256 * 1024;

/// How long a client's ReadyForQuery after LISTEN waits for the hub to listen too.
const LISTEN_CONFIRM: Duration = Duration::from_secs(5);

/// Waits until the hub listens on the channels just subscribed, so that, as on PostgreSQL, a
/// NOTIFY committed after the client's LISTEN returned reaches the client.
async fn confirm_listens(confirmations: Vec<tokio::sync::oneshot::Receiver<()>>) {
    if confirmations.is_empty() {
        return;
    }
    let all = async {
        for confirmed in confirmations {
            let _ = confirmed.await;
        }
    };
    if tokio::time::timeout(LISTEN_CONFIRM, all).await.is_err() {
        tracing::warn!("the notification hub did not confirm LISTEN in time");
    }
}

/// The next tick of `tick`; never, without one.
async fn next_tick(tick: &mut Option<tokio::time::Interval>) {
    match tick {
        Some(t) => {
            t.tick().await;
        }
        None => std::future::pending().await,
    }
}

/// pgtenant's own statement timeout fires this long after the plan's limit: the server's
/// `statement_timeout` (set to the same limit) ends the statement first, so pgtenant's cancel
/// is sent only when the client lifted the server's limit.
const OWN_TIMEOUT_GRACE: Duration = Duration::from_millis(250);

/// How often the session checks its timeouts while forwarding.
const TIMER_TICK: Duration = Duration::from_millis(100);

/// What a session creates once and every transaction's forwarding uses: pgtenant's
/// shutdown, and the timer of the plan's timeouts (none when the plan has none). In session
/// mode also the signal that the tenant was removed or moved: the session then ends at its
/// next transaction boundary.
struct Waits<'a, 'b> {
    shutdown: std::pin::Pin<&'a mut tokio_util::sync::WaitForCancellationFuture<'b>>,
    tick: Option<tokio::time::Interval>,
    leave: Option<(
        std::pin::Pin<&'a mut tokio_util::sync::WaitForCancellationFuture<'b>>,
        &'a crate::quota::TenantState,
    )>,
    /// The leave signal fired: end at the next transaction boundary.
    leaving: bool,
}

impl<'a, 'b> Waits<'a, 'b> {
    fn new(
        shutdown: std::pin::Pin<&'a mut tokio_util::sync::WaitForCancellationFuture<'b>>,
        limits: &PlanConfig,
    ) -> Self {
        let timers = [limits.statement_timeout, limits.idle_in_transaction_timeout]
            .iter()
            .any(|d| d.is_some_and(|d| !d.is_zero()));
        Waits {
            shutdown,
            tick: timers.then(timer),
            leave: None,
            leaving: false,
        }
    }
}

fn timer() -> tokio::time::Interval {
    let mut tick = tokio::time::interval(TIMER_TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    tick
}

/// Forwards until the session ends, pgtenant shuts down, or a timeout ends it.
async fn forward(
    waits: &mut Waits<'_, '_>,
    limits: &PlanConfig,
    relay: &mut Relay,
    pump: &mut Pump,
    stream: &mut ClientStream,
    pooled: &mut PooledConn,
) -> SessionEnd {
    let statement_timeout = limits.statement_timeout.filter(|d| !d.is_zero());
    let idle_timeout = limits.idle_in_transaction_timeout.filter(|d| !d.is_zero());
    let cancel_target = pooled.conn.cancel_target();
    let mut side = ServerSide::of(&mut pooled.conn);
    let mut timers = waits.tick.is_some();
    let mut cancelled_for = None;
    loop {
        if waits.leaving && relay.between_transactions(side.tracker) {
            return match &waits.leave {
                Some((_, tenant)) if tenant.removed() => SessionEnd::Removed,
                _ => SessionEnd::Moved,
            };
        }
        let watch_leave = waits.leave.is_some() && !waits.leaving;
        tokio::select! {
            end = pump.run(relay, stream, &mut side) => return SessionEnd::Pump(end),
            _ = waits.shutdown.as_mut() => return SessionEnd::Shutdown,
            _ = async {
                match waits.leave.as_mut() {
                    Some((leave, _)) => leave.as_mut().await,
                    None => std::future::pending().await,
                }
            }, if watch_leave => {
                // Checked at the top of the loop, and at every tick until the transaction
                // in progress ends.
                waits.leaving = true;
                if waits.tick.is_none() {
                    waits.tick = Some(timer());
                }
                timers = true;
            }
            _ = next_tick(&mut waits.tick), if timers => {
                if let (Some(limit), Some(since)) = (statement_timeout, relay.busy_since())
                    && since.elapsed() >= limit + OWN_TIMEOUT_GRACE
                    && cancelled_for != Some(since)
                {
                    cancelled_for = Some(since);
                    relay.explain_next_error(ClientError::error(
                        sqlstate::QUERY_CANCELED,
                        format!(
                            "canceling statement due to statement timeout (this tenant's limit is {})",
                            crate::config::format_duration(limit)
                        ),
                    ));
                    // Counted on the connection now: it is not handed over before the
                    // cancel is delivered.
                    let pending = cancel_target.begin();
                    tokio::spawn(async move {
                        if let Err(e) = pending.send(CANCEL_PATIENCE).await {
                            tracing::warn!(error = %e, "statement timeout: cancel failed");
                        }
                    });
                }
                if let (Some(limit), Some(since)) = (idle_timeout, relay.ready_since())
                    && side.tracker.in_transaction()
                    && since.elapsed() >= limit
                {
                    return SessionEnd::IdleInTransaction(limit);
                }
            }
        }
    }
}

/// Tells the client how the session ended, when it is still there to hear it.
async fn finish(
    end: SessionEnd,
    stream: &mut ClientStream,
    pump: &mut Pump,
    pooled: Option<&PooledConn>,
) -> &'static str {
    let (label, notice) = match &end {
        SessionEnd::Shutdown => (
            "shutdown",
            Some(ClientError::fatal(
                sqlstate::ADMIN_SHUTDOWN,
                "terminating connection because pgtenant is shutting down",
            )),
        ),
        SessionEnd::Killed => (
            "killed",
            Some(ClientError::fatal(
                sqlstate::ADMIN_SHUTDOWN,
                "terminating connection due to administrator command",
            )),
        ),
        SessionEnd::Moved => (
            "tenant_moved",
            Some(ClientError::fatal(
                sqlstate::ADMIN_SHUTDOWN,
                "terminating connection: this tenant's placement changed and this session cannot follow it; reconnect",
            )),
        ),
        SessionEnd::Removed => (
            "tenant_removed",
            Some(ClientError::fatal(
                sqlstate::ADMIN_SHUTDOWN,
                "terminating connection: this tenant was removed from pgtenant's configuration",
            )),
        ),
        SessionEnd::IdleInTransaction(limit) => (
            "idle_in_transaction_timeout",
            Some(ClientError::fatal(
                sqlstate::IDLE_IN_TRANSACTION_TIMEOUT,
                format!(
                    "terminating connection due to idle-in-transaction timeout (this tenant's limit is {})",
                    crate::config::format_duration(*limit)
                ),
            )),
        ),
        SessionEnd::Pump(PumpEnd::ServerGone(_)) | SessionEnd::Pump(PumpEnd::ServerProtocol(_)) => {
            (
                "server_gone",
                Some(ClientError::fatal(
                    sqlstate::CONNECTION_FAILURE,
                    "the connection to the tenant's database was lost",
                )),
            )
        }
        SessionEnd::Pump(PumpEnd::ClientProtocol(FrameError::TooLarge { tag, len, limit })) => {
            tracing::info!(%tag, len, limit, "client message over the size limit");
            (
                "message_too_large",
                Some(
                    ClientError::fatal(
                        sqlstate::PROGRAM_LIMIT_EXCEEDED,
                        format!(
                            "a '{tag}' message of {len} bytes exceeds the limit of {limit} bytes through pgtenant"
                        ),
                    )
                    .with_hint("send large values in smaller statements, or with COPY"),
                ),
            )
        }
        SessionEnd::Pump(PumpEnd::ClientProtocol(e)) => {
            tracing::info!(error = %e, "client broke the protocol");
            (
                "client_protocol",
                Some(ClientError::fatal(
                    sqlstate::PROTOCOL_VIOLATION,
                    e.to_string(),
                )),
            )
        }
        SessionEnd::Checkout(e) => {
            tracing::info!(kind = e.kind().as_str(), error = %e, "no server connection");
            ("checkout", e.client_error())
        }
        SessionEnd::Setup(e) => {
            tracing::warn!(error = %e, "no server connection could be reset and bound");
            ("setup", e.client_error())
        }
        SessionEnd::NotifyOverflow => (
            "notify_overflow",
            Some(
                ClientError::fatal(
                    sqlstate::CONFIGURATION_LIMIT_EXCEEDED,
                    format!(
                        "terminating connection: more than {} notifications waited for this client",
                        notify::CLIENT_QUEUE
                    ),
                )
                .with_hint("read notifications promptly, and do not stay in one transaction while many arrive"),
            ),
        ),
        SessionEnd::Pump(PumpEnd::Terminated)
        | SessionEnd::Pump(PumpEnd::Released)
        | SessionEnd::Pump(PumpEnd::Listening) => {
            ("terminate", None)
        }
        SessionEnd::Pump(PumpEnd::ClientGone(_)) => ("client_gone", None),
        SessionEnd::Pump(PumpEnd::ClientStalled(limit)) => {
            tracing::info!(
                "client took nothing of its results for {}; disconnecting it and freeing its server connection",
                crate::config::format_duration(*limit)
            );
            // It does not read: nothing more is written to it.
            ("client_write_timeout", None)
        }
    };
    tracing::info!(end = label, "session ended");
    let Some(notice) = notice else { return label };
    let mut out = pump.take_to_client();
    // An error may only follow whole messages.
    if pooled.is_some_and(|p| !p.conn.scanner.at_boundary()) {
        out.clear();
    }
    notice.encode(&mut out);
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        let _ = stream.write_all(&out).await;
        let _ = stream.flush().await;
    })
    .await;
    label
}

#[cfg(test)]
mod tests {
    use super::starts_read_only;

    fn query(sql: &str) -> Vec<u8> {
        let mut m = vec![b'Q'];
        m.extend_from_slice(&((sql.len() + 5) as u32).to_be_bytes());
        m.extend_from_slice(sql.as_bytes());
        m.push(0);
        m
    }

    #[test]
    fn only_transactions_opened_read_only_count_as_read_only() {
        for sql in [
            "BEGIN READ ONLY",
            "begin read only; select 1",
            "START TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY",
            "BEGIN TRANSACTION\n  READ ONLY",
        ] {
            assert!(starts_read_only(&query(sql)), "{sql}");
        }
        for sql in [
            "BEGIN",
            "BEGIN READ WRITE",
            "SELECT 'BEGIN READ ONLY'",
            "SET TRANSACTION READ ONLY",
            "START TRANSACTION",
            "INSERT INTO t VALUES (1); BEGIN READ ONLY",
            "BEGIN; SET TRANSACTION READ ONLY",
        ] {
            assert!(!starts_read_only(&query(sql)), "{sql}");
        }
        let mut parse = vec![b'P', 0, 0, 0, 0];
        parse.extend_from_slice(b"s1\0BEGIN READ ONLY\0\0\0");
        assert!(starts_read_only(&parse));
        assert!(!starts_read_only(b"Q\0\0"));
        assert!(!starts_read_only(b""));
    }
}
