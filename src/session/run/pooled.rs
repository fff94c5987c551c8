//! Transaction pooling: the loop that takes a server connection for each of the client's
//! transactions, routes it (primary or replica, the tenant's placement in force) and returns it.

use std::future::Future as _;
use std::pin::Pin;
use std::task::Poll;

use super::forward::{Waits, forward};
use super::listen::*;
use super::*;

/// What transaction pooling needs to take server connections for a client.
pub(super) struct Attached<'a> {
    /// The tenant's shard (its primary).
    pub(super) pool: Arc<Pool>,
    /// Its streaming replicas, for read-only transactions.
    pub(super) replicas: Vec<Arc<Pool>>,
    /// The pool of the server connection taken last (the primary's or a replica's).
    pub(super) held: Arc<Pool>,
    pub(super) prepare: Prepare,
    /// Where the session's transactions go now, and the tenant's placement generation it
    /// was read at.
    pub(super) placement: crate::config::Placement,
    pub(super) epoch: u64,
    pub(super) role: UserRole,
    pub(super) client_id: u64,
    pub(super) tenant_cap: Option<(usize, Arc<tokio::sync::Semaphore>)>,
    pub(super) tenant: &'a crate::quota::TenantState,
}

/// Transaction pooling: waits for the client's next message, takes a server connection for
/// the transaction it starts, forwards until the transaction is over, returns the
/// connection, and again. Returns how the session ended and the connection it still holds.
pub(super) async fn forward_pooled(
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
    let shutdown = std::pin::pin!(end_token.cancelled());
    let drain = std::pin::pin!(drain_token.cancelled());
    let mut drain = super::woken::Woken::new(drain);
    // Armed once the session has run a transaction: one that connected just as shutdown began
    // (it was accepted, so it is served) runs its first transaction before it is ended.
    let mut drain_armed = false;
    let mut waits = Waits::new(super::woken::Woken::new(shutdown), &a.prepare.tenant.limits);
    let mut listening = false;
    // The backend this session last recorded itself on (see `Pool::note_owner`).
    let mut noted = None;
    // Notifications that arrive while the client keeps its connection (a pinned client
    // does for its whole session), delivered when it is between transactions.
    let mut held: std::collections::VecDeque<notify::Notification> = Default::default();
    let result = loop {
        // A session that never listened waits for its client and its end signals only, in
        // one poll function (the end signals first: each costs an atomic load until it
        // fires).
        let waited = if !listening {
            let waited = std::future::poll_fn(|cx| {
                if Pin::new(&mut waits.shutdown).poll(cx).is_ready()
                    || (drain_armed && Pin::new(&mut drain).poll(cx).is_ready())
                {
                    return Poll::Ready(None);
                }
                pump.poll_wait_for_client(cx, stream).map(Some)
            })
            .await;
            match waited {
                Some(waited) => waited,
                None => break (SessionEnd::Shutdown, None),
            }
        } else {
            tokio::select! {
            // In this order: the end signals first (a client that keeps sending cannot starve
            // them; each costs an atomic load until it fires).
            biased;
            _ = &mut waits.shutdown => break (SessionEnd::Shutdown, None),
            // Between transactions when shutdown begins: nothing is lost by ending now.
            _ = &mut drain, if drain_armed => break (SessionEnd::Shutdown, None),
            _ = overflowed(&notify_tx), if listening => {
                break (SessionEnd::NotifyOverflow, None);
            }
            r = pump.wait_for_client(stream) => r,
            // Only a client that ever listened has notifications to wait for; a client that
            // does not read them stops taking more (its queue fills: see below).
            Some(n) = next_notification(&mut notify_rx), if listening && pump.to_client_len() < NOTIFY_BUFFERED => {
                // Notifications reach the client between its transactions, as on PostgreSQL.
                push_notification(relay, pump, &prefix, &n);
                continue;
            }
            }
        };
        if let Err(end) = waited {
            break (SessionEnd::Pump(end), None);
        }
        if a.tenant.removed() {
            break (SessionEnd::Removed, None);
        }
        let wanted = Instant::now();
        // The clock as this wake-up read it: the checkout and the first statement's start
        // share it unless something was awaited in between.
        let mut now = wanted;
        let checkout = {
            let _waiting = TenantStats::hold(&a.tenant.stats.waiting);
            if state.pauses.is_paused(&a.prepare.tenant.name) {
                // PAUSE: the transaction waits (its first message unread by the server)
                // until RESUME, or until the session is ended.
                tokio::select! {
                    _ = state.pauses.wait(&a.prepare.tenant.name) => {}
                    _ = &mut waits.shutdown => break (SessionEnd::Shutdown, None),
                    _ = &mut drain, if drain_armed => break (SessionEnd::Shutdown, None),
                }
                now = Instant::now();
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
            match checkout_now(a, relay, read_only, now) {
                // Nothing was awaited here: no second clock reading.
                Ok(pooled) => Ok((pooled, false, now)),
                Err(taken) => checkout_routed(a, relay, read_only, now, taken)
                    .await
                    .map(|(p, bound)| (p, bound, Instant::now())),
            }
        };
        let started = match &checkout {
            Ok((_, _, started)) => *started,
            Err(_) => Instant::now(),
        };
        a.tenant
            .stats
            .checkout_wait_seconds
            .record(if started == wanted {
                Duration::ZERO
            } else {
                started.saturating_duration_since(wanted)
            });
        let active = TenantStats::hold(&a.tenant.stats.active);
        let (mut pooled, bound_now) = match checkout {
            // Counted active only now: a PAUSE (or MOVE) that began meanwhile saw no
            // transaction of this session, so the session waits (or routes again) first.
            Ok((p, _, _))
                if state.pauses.is_paused(&a.prepare.tenant.name)
                    || a.tenant.placement_epoch() != a.epoch =>
            {
                drop(active);
                a.held.release(p, Instant::now()).await;
                continue;
            }
            Ok((p, bound_now, _)) => (p, bound_now),
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
            // The transaction's first statement starts when its connection was ready.
            relay.set_clock(Some(started));
            let step = pump.process_client(relay, &mut side);
            relay.set_clock(None);
            step
        };
        match step {
            Ok(ClientStep::Continue) => {}
            Ok(ClientStep::Terminate) => {
                break (SessionEnd::Pump(PumpEnd::Terminated), Some(pooled));
            }
            Err(e) => break (SessionEnd::Pump(PumpEnd::ClientProtocol(e)), Some(pooled)),
        }
        let (end, listened) = loop {
            let end = loop {
                if !held.is_empty() && relay.between_transactions(&pooled.conn.tracker) {
                    while let Some(n) = held.pop_front() {
                        push_notification(relay, pump, &prefix, &n);
                    }
                }
                let forwarding = forward(
                    &mut waits,
                    &a.prepare.tenant.limits,
                    relay,
                    pump,
                    stream,
                    &mut pooled,
                );
                // A session that never listened has nothing else to wait for (most of them:
                // one select less per wake-up).
                if !listening {
                    break forwarding.await;
                }
                // The forwarding state lives in the pump: leaving `forward` for a
                // notification loses nothing.
                tokio::select! {
                    biased;
                    end = forwarding => break end,
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
            // Most transactions neither listen nor unlisten: no call.
            let listened = if relay.listens.is_empty() && relay.unlistens.is_empty() {
                Vec::new()
            } else {
                subscribe(
                    relay,
                    &a.pool,
                    a.client_id,
                    (&mut notify_tx, &mut notify_rx),
                )
            };
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
                // The transaction ended with its last ReadyForQuery: the clock read then.
                let ended = relay
                    .ready_since()
                    .filter(|t| *t >= started)
                    .unwrap_or_else(Instant::now);
                if let Err(pooled) = a.held.release_now(pooled, ended) {
                    a.held.release(pooled, ended).await;
                }
                drop(active);
                a.tenant
                    .stats
                    .transaction_seconds
                    .record(ended.saturating_duration_since(started));
                flush_bytes(pump, a.tenant);
                while let Some(n) = held.pop_front() {
                    push_notification(relay, pump, &prefix, &n);
                }
                // The ReadyForQuery is still unsent: the client learns LISTEN is done only
                // when it is.
                if !listened.is_empty() {
                    confirm_listens(listened).await;
                }
                // A drain that began meanwhile ends the session at the next turn's select,
                // before the client's next message is read (its end signals go first).
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
///
/// `taken`: a primary connection [`checkout_now`] took that needs the awaited preparation
/// (the transaction then goes to the primary).
pub(super) async fn checkout_routed(
    a: &mut Attached<'_>,
    relay: &mut Relay,
    read_only: bool,
    now: Instant,
    taken: Option<PooledConn>,
) -> Result<(PooledConn, bool), Failed> {
    if taken.is_none()
        && let Some(replica) = pick_replica(&a.replicas, read_only)
    {
        a.held = replica;
        let cap = a.tenant_cap.clone();
        match checkout_prepared(&a.held, &a.prepare, relay, now, cap, None).await {
            // The replica could not serve it: the primary does.
            Err(Failed::Checkout(_) | Failed::Server(_)) => {}
            done => return done,
        }
    }
    a.held = Arc::clone(&a.pool);
    let cap = a.tenant_cap.clone();
    checkout_prepared(&a.held, &a.prepare, relay, now, cap, taken).await
}

/// [`checkout_routed`] when it needs no wait: a primary connection ready for the client
/// (see [`prepared_now`]); never for work a replica may take. `Err` as [`prepared_now`]'s.
pub(super) fn checkout_now(
    a: &mut Attached<'_>,
    relay: &mut Relay,
    read_only: bool,
    now: Instant,
) -> Result<PooledConn, Option<PooledConn>> {
    if read_only && a.replicas.iter().any(|p| p.serves_reads()) {
        return Err(None);
    }
    let pooled = prepared_now(&a.pool, &a.prepare, relay, now, a.tenant_cap.as_ref())?;
    if !Arc::ptr_eq(&a.held, &a.pool) {
        a.held = Arc::clone(&a.pool);
    }
    Ok(pooled)
}

/// The pools of `shard`'s replicas for this tenant's user.
pub(super) fn replica_pools(
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
pub(super) fn pick_replica(replicas: &[Arc<Pool>], read_only: bool) -> Option<Arc<Pool>> {
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
pub(super) fn starts_read_only(pending: &[u8]) -> bool {
    let sql = match pending.split_first() {
        Some((&b'Q', rest)) => rest.get(4..),
        // Parse: the statement name, then the query.
        Some((&b'P', rest)) => rest
            .get(4..)
            .and_then(|b| crate::protocol::take_cstr(b).map(|(_, rest)| rest)),
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
pub(super) fn reroute(
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
