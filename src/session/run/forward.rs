//! Forwarding one server connection's traffic with the plan's timeouts enforced.

use std::future::Future as _;
use std::pin::Pin;
use std::task::Poll;

use super::woken::Woken;
use super::*;

/// pgtenant's own statement timeout fires this long after the plan's limit: the server's
/// `statement_timeout` (set to the same limit) ends the statement first, so pgtenant's cancel
/// is sent only when the client lifted the server's limit.
pub(super) const OWN_TIMEOUT_GRACE: Duration = Duration::from_millis(250);

/// How often the session checks its timeouts while forwarding.
pub(super) const TIMER_TICK: Duration = Duration::from_millis(100);

/// A session's end signal (a cancellation token's), polled only after it woke.
pub(super) type Signal<'a, 'b> = Woken<'a, tokio_util::sync::WaitForCancellationFuture<'b>>;

/// What a session creates once and every transaction's forwarding uses: pgtenant's
/// shutdown, and the timer of the plan's timeouts (none when the plan has none). In session
/// mode also the signal that the tenant was removed or moved: the session then ends at its
/// next transaction boundary.
pub(super) struct Waits<'a, 'b> {
    pub(super) shutdown: Signal<'a, 'b>,
    pub(super) tick: Option<Tick>,
    pub(super) leave: Option<(Signal<'a, 'b>, &'a crate::quota::TenantState)>,
    /// The leave signal fired: end at the next transaction boundary.
    pub(super) leaving: bool,
}

impl<'a, 'b> Waits<'a, 'b> {
    pub(super) fn new(shutdown: Signal<'a, 'b>, limits: &PlanConfig) -> Self {
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

pub(super) fn timer() -> Tick {
    Tick {
        sleep: Box::pin(crate::timers::sleep(TIMER_TICK)),
        registered: false,
    }
}

/// The session's timer: ready every [`TIMER_TICK`] (a tick missed while busy is skipped).
/// Its sleep is polled only once it elapsed (and once to register): a wake-up before that
/// costs a flag read, not a poll of the timer.
pub(super) struct Tick {
    sleep: Pin<Box<tokio::time::Sleep>>,
    /// Polled since its last reset, so the timer wakes this task when it fires.
    registered: bool,
}

impl Tick {
    fn poll_tick(&mut self, cx: &mut std::task::Context<'_>) -> Poll<()> {
        if self.registered && !self.sleep.is_elapsed() {
            return Poll::Pending;
        }
        if self.sleep.as_mut().poll(cx).is_pending() {
            self.registered = true;
            return Poll::Pending;
        }
        self.sleep
            .as_mut()
            .reset(tokio::time::Instant::now() + TIMER_TICK);
        // Registers this task for the next tick.
        self.registered = self.sleep.as_mut().poll(cx).is_pending();
        Poll::Ready(())
    }
}

/// Forwards until the session ends, pgtenant shuts down, or a timeout ends it.
///
/// One poll function, no `select!`: each wake-up looks at the end signals (an atomic load
/// each until one fires), at the timer when the plan has one, and then moves bytes.
pub(super) async fn forward(
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
    std::future::poll_fn(|cx| {
        loop {
            if waits.leaving && relay.between_transactions(side.tracker) {
                return Poll::Ready(match &waits.leave {
                    Some((_, tenant)) if tenant.removed() => SessionEnd::Removed,
                    _ => SessionEnd::Moved,
                });
            }
            // In this order: an end signal first, so a busy client cannot starve it.
            if Pin::new(&mut waits.shutdown).poll(cx).is_ready() {
                return Poll::Ready(SessionEnd::Shutdown);
            }
            if !waits.leaving
                && let Some((leave, _)) = waits.leave.as_mut()
                && Pin::new(leave).poll(cx).is_ready()
            {
                // Checked at the top of the loop, and at every tick until the transaction
                // in progress ends.
                waits.leaving = true;
                if waits.tick.is_none() {
                    waits.tick = Some(timer());
                }
                timers = true;
                continue;
            }
            if timers
                && let Some(tick) = waits.tick.as_mut()
                && tick.poll_tick(cx).is_ready()
            {
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
                    return Poll::Ready(SessionEnd::IdleInTransaction(limit));
                }
                continue;
            }
            return pump
                .poll_run(cx, relay, stream, &mut side)
                .map(SessionEnd::Pump);
        }
    })
    .await
}
