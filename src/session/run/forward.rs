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

/// How often a session that is leaving (its tenant moved or removed, in session mode) looks
/// for the end of its transaction.
pub(super) const LEAVING_TICK: Duration = Duration::from_millis(100);

/// The longest the session's timer waits without a look (plans may set limits of years).
const MAX_HORIZON: Duration = Duration::from_secs(24 * 3600);

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
        // The timer fires no later than the shortest of the plan's limits after the session's
        // last activity.
        let horizon = [
            limits
                .statement_timeout
                .filter(|d| !d.is_zero())
                .map(|d| d + OWN_TIMEOUT_GRACE),
            limits.idle_in_transaction_timeout.filter(|d| !d.is_zero()),
        ]
        .into_iter()
        .flatten()
        .min()
        .map(|h| h.min(MAX_HORIZON));
        Waits {
            shutdown,
            tick: horizon.map(Tick::new),
            leave: None,
            leaving: false,
        }
    }
}

/// The session's one timer, for the plan's timeouts. It fires no later than `horizon` after
/// the session's last activity (a statement sent or answered), which is no later than any
/// limit can be reached, and is then set to the next moment one could be. While the session
/// is busy its deadline only moves later, and only once per half horizon: extending a
/// registered timer is an atomic store, where an earlier deadline takes the timer wheel's lock
/// (on the timer thread's runtime, `crate::timers`). So a session whose statements end well
/// within their limits never wakes for its timer, and one that goes idle wakes at most once.
pub(super) struct Tick {
    sleep: Pin<Box<tokio::time::Sleep>>,
    horizon: Duration,
    /// Activity after this moment (half a horizon before the deadline) moves the deadline.
    follow_after: Instant,
    /// Polled since its last reset, so the timer wakes this task when it fires.
    registered: bool,
}

impl Tick {
    pub(super) fn new(horizon: Duration) -> Tick {
        let deadline = Instant::now() + horizon;
        Tick {
            sleep: Box::pin(crate::timers::sleep_until(deadline.into())),
            horizon,
            follow_after: half_before(deadline, horizon),
            registered: false,
        }
    }

    /// Ready when the deadline passed (the caller then checks the limits and calls
    /// [`Tick::rearm`]).
    fn poll_due(&mut self, cx: &mut std::task::Context<'_>) -> Poll<()> {
        if self.registered && !self.sleep.is_elapsed() {
            return Poll::Pending;
        }
        if self.sleep.as_mut().poll(cx).is_pending() {
            self.registered = true;
            return Poll::Pending;
        }
        Poll::Ready(())
    }

    /// Sets the deadline to `at` (a check found nothing due before it).
    fn rearm(&mut self, at: Instant, cx: &mut std::task::Context<'_>) {
        self.follow_after = half_before(at, self.horizon);
        self.sleep.as_mut().reset(at.into());
        self.registered = self.sleep.as_mut().poll(cx).is_pending();
    }

    /// After the session's activity at `last`: keeps the deadline within the horizon of it,
    /// moving it later when it fell into the first half.
    fn follow(&mut self, last: Instant, cx: &mut std::task::Context<'_>) {
        if last > self.follow_after {
            self.rearm(last + self.horizon, cx);
        }
    }

    /// A leaving session checks for the end of its transaction every [`LEAVING_TICK`].
    fn leaving(&mut self, cx: &mut std::task::Context<'_>) {
        self.horizon = self.horizon.min(LEAVING_TICK);
        self.rearm(Instant::now() + self.horizon, cx);
    }
}

/// Half a horizon before a deadline: activity after it moves the deadline.
fn half_before(deadline: Instant, horizon: Duration) -> Instant {
    deadline.checked_sub(horizon / 2).unwrap_or(deadline)
}

/// Forwards until the session ends, pgtenant shuts down, or a timeout ends it.
///
/// One poll function, no `select!`: each wake-up looks at the end signals (an atomic load
/// each until one fires), at the timer when the plan has one, and then moves bytes.
///
/// A plain function returning the poll function's future (not an `async fn` around it): the
/// caller awaits the poll function itself, one state machine less at every wake-up.
pub(super) fn forward<'s>(
    waits: &'s mut Waits<'_, '_>,
    limits: &PlanConfig,
    relay: &'s mut Relay,
    pump: &'s mut Pump,
    stream: &'s mut ClientStream,
    pooled: &'s mut PooledConn,
) -> impl std::future::Future<Output = SessionEnd> + 's {
    let statement_timeout = limits.statement_timeout.filter(|d| !d.is_zero());
    let idle_timeout = limits.idle_in_transaction_timeout.filter(|d| !d.is_zero());
    let (mut side, cancel_target) = ServerSide::with_cancel(&mut pooled.conn);
    let mut timers = waits.tick.is_some();
    let mut cancelled_for = None;
    std::future::poll_fn(move |cx| {
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
                waits
                    .tick
                    .get_or_insert_with(|| Tick::new(LEAVING_TICK))
                    .leaving(cx);
                timers = true;
                continue;
            }
            if timers
                && let Some(tick) = waits.tick.as_mut()
                && tick.poll_due(cx).is_ready()
            {
                // The deadline passed: what is due now, and when the next limit could be.
                let now = Instant::now();
                let mut next = now + tick.horizon;
                // (A limit too far to be reached is never due.)
                if let (Some(limit), Some(since)) = (statement_timeout, relay.busy_since())
                    && let Some(due) = since.checked_add(limit + OWN_TIMEOUT_GRACE)
                {
                    if now < due {
                        next = next.min(due);
                    } else if cancelled_for != Some(since) {
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
                }
                if let (Some(limit), Some(since)) = (idle_timeout, relay.ready_since())
                    && side.tracker.in_transaction()
                    && let Some(due) = since.checked_add(limit)
                {
                    if now >= due {
                        return Poll::Ready(SessionEnd::IdleInTransaction(limit));
                    }
                    next = next.min(due);
                }
                // Not sooner than the timer's resolution (a millisecond): a deadline it
                // rounds to now would fire again at once.
                tick.rearm(next.max(now + Duration::from_millis(1)), cx);
                continue;
            }
            let run = pump.poll_run(cx, relay, stream, &mut side);
            if run.is_pending()
                && timers
                && let Some(tick) = waits.tick.as_mut()
            {
                tick.follow(relay.last_activity(), cx);
            }
            return run.map(SessionEnd::Pump);
        }
    })
}
