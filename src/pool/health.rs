//! Shard health: each shard is up or down. A shard goes down when a probe or a new server
//! connection fails for a reason that is the server's (refused, reset, timed out, shutting
//! down or starting up; not a wrong password of one tenant's role), and comes back up when a
//! probe logs in again. While it is down, checkouts fail at once with `08001` instead of
//! waiting for a connect timeout each; and every server connection opened before it went
//! down is stale and never handed out again (its generation is older).
//!
//! While a shard is up, its probe connection is kept and the next probe runs its query on it
//! (a login per probe costs the server a backend start and a SCRAM exchange each second). A
//! kept connection that fails is not the verdict: a new login is, as it is for a shard that
//! is down.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use std::sync::Arc;

use tokio::sync::Notify;

use super::connect::{self, Login};
use super::{ServerConn, ServerError};
use crate::config::{Shard, Snapshot};
use crate::error::sqlstate;
use crate::net::tls;

/// One shard's health.
pub struct Health {
    down: AtomicBool,
    /// A verdict was recorded (a probe finished, or a connection failed): until then the
    /// shard is not known to be up.
    checked: AtomicBool,
    /// Bumped each time the shard goes down: connections of an older generation are stale.
    generation: AtomicU64,
    /// Why it went down, and since when.
    down_since: Mutex<Option<(Instant, String)>>,
    /// A probe is running.
    probing: AtomicBool,
    /// When the last probe started.
    last_probe: Mutex<Option<Instant>>,
    /// Replicas: replay lag found by the last probe, in milliseconds (-1: unknown).
    lag_ms: std::sync::atomic::AtomicI64,
    /// The last probe's connection, for the next probe, and the shard it logged in to.
    kept: Mutex<Option<(Arc<Shard>, ServerConn)>>,
    /// Times the shard went down (the metrics read it when scraped).
    downs: AtomicU64,
    /// Wakes the health loop ([`check_shards`]): the shard went down, or its probe ended.
    wake: Arc<Notify>,
}

impl Health {
    /// A shard's health, waking the health loop through `wake` when its probes are due
    /// sooner (see [`check_shards`]).
    pub fn new(wake: Arc<Notify>) -> Self {
        Health {
            down: AtomicBool::new(false),
            checked: AtomicBool::new(false),
            generation: AtomicU64::new(0),
            down_since: Mutex::new(None),
            probing: AtomicBool::new(false),
            last_probe: Mutex::new(None),
            lag_ms: std::sync::atomic::AtomicI64::new(-1),
            kept: Mutex::default(),
            downs: AtomicU64::new(0),
            wake,
        }
    }

    /// Whether the shard is marked down.
    pub fn is_down(&self) -> bool {
        self.down.load(Ordering::Acquire)
    }

    /// Whether a verdict was recorded yet (`mark_up` or `mark_down`).
    pub fn checked(&self) -> bool {
        self.checked.load(Ordering::Acquire)
    }

    /// The generation server connections opened now belong to.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// A replica's replay lag, as the last probe found it (`None`: unknown, or a primary).
    pub fn lag(&self) -> Option<Duration> {
        u64::try_from(self.lag_ms.load(Ordering::Relaxed))
            .ok()
            .map(Duration::from_millis)
    }

    /// A replica that may take reads: up, with a known lag of at most `max`.
    pub fn serves_reads(&self, max: Duration) -> bool {
        !self.is_down() && self.lag().is_some_and(|lag| lag <= max)
    }

    /// How many times the shard went down.
    pub fn downs(&self) -> u64 {
        self.downs.load(Ordering::Relaxed)
    }

    /// Why and since when the shard is down.
    pub fn down_since(&self) -> Option<(Instant, String)> {
        self.down_since
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Marks the shard down (`why` for the logs); true if it was up.
    pub fn mark_down(&self, shard: &str, why: &str) -> bool {
        let mut since = self.down_since.lock().unwrap_or_else(|p| p.into_inner());
        self.checked.store(true, Ordering::Release);
        // Connections opened before this failure are all suspect, even if it was down.
        self.generation.fetch_add(1, Ordering::AcqRel);
        if self.down.swap(true, Ordering::AcqRel) {
            return false;
        }
        *since = Some((Instant::now(), why.to_owned()));
        self.downs.fetch_add(1, Ordering::Relaxed);
        // Probed every DOWN_PROBE_EVERY from now on: the loop plans its next look again.
        self.wake.notify_one();
        tracing::warn!(
            shard,
            reason = why,
            "shard marked down: its tenants' new transactions fail at once until a probe succeeds"
        );
        true
    }

    /// Marks the shard up; true if it was down.
    pub fn mark_up(&self, shard: &str) -> bool {
        let mut since = self.down_since.lock().unwrap_or_else(|p| p.into_inner());
        self.checked.store(true, Ordering::Release);
        if !self.down.swap(false, Ordering::AcqRel) {
            return false;
        }
        let down_for = since.take().map(|(t, _)| t.elapsed()).unwrap_or_default();
        tracing::info!(
            shard,
            down_ms = down_for.as_millis() as u64,
            "shard back up"
        );
        true
    }
}

/// A replica's replay lag in milliseconds: 0 when it has replayed all it received (or is no
/// longer in recovery), -1 when it receives nothing (no WAL receiver: it cannot be trusted to
/// be current), else the age of the last transaction it replayed.
const REPLICA_LAG_SQL: &str = "SELECT CASE \
    WHEN NOT pg_is_in_recovery() THEN 0 \
    WHEN pg_last_wal_receive_lsn() IS NULL THEN -1 \
    WHEN pg_last_wal_receive_lsn() = pg_last_wal_replay_lsn() THEN 0 \
    ELSE COALESCE((EXTRACT(EPOCH FROM now() - pg_last_xact_replay_timestamp()) * 1000)::bigint, -1) \
    END";

impl Health {
    /// Takes the kept probe connection, if it was opened to `shard` as it is configured now
    /// and the shard is up (a shard that is down comes back up with a new login only). One
    /// that is not taken is closed.
    fn take_kept(&self, shard: &Arc<Shard>, patience: Duration) -> Option<ServerConn> {
        let (was, mut conn) = self.kept.lock().unwrap_or_else(|p| p.into_inner()).take()?;
        if Arc::ptr_eq(&was, shard) && !self.is_down() {
            return Some(conn);
        }
        tokio::spawn(async move { conn.close_and_wait(true, patience).await });
        None
    }

    fn keep(&self, shard: Arc<Shard>, conn: ServerConn) {
        *self.kept.lock().unwrap_or_else(|p| p.into_inner()) = Some((shard, conn));
    }

    /// Closes the kept probe connection, if any (the shard was removed, or pgtenant stops).
    pub async fn close_kept(&self, patience: Duration) {
        let kept = self.kept.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some((_, mut conn)) = kept {
            conn.close_and_wait(true, patience).await;
        }
    }
}

/// Runs the probe's query on `conn`: `SELECT 1`, or on a replica its lag in milliseconds.
async fn probe_query(conn: &mut ServerConn, replica: bool) -> Result<i64, ServerError> {
    if replica {
        let rows = conn.query_rows(REPLICA_LAG_SQL).await?;
        Ok(rows
            .first()
            .and_then(|r| r.first().cloned().flatten())
            .and_then(|v| v.parse::<i64>().ok())
            .unwrap_or(-1))
    } else {
        conn.run_own("SELECT 1").await?;
        Ok(-1)
    }
}

/// Probes `shard` within `timeout`: on the connection the last probe kept if it still
/// answers, else with a new login as the shard's login role. Returns the lag in milliseconds
/// (-1: unknown or not a replica); the connection is kept for the next probe.
async fn probe(shard: &Arc<Shard>, health: &Health, timeout: Duration) -> Result<i64, ServerError> {
    if let Some(mut conn) = health.take_kept(shard, timeout) {
        let checked =
            crate::timers::timeout(timeout, probe_query(&mut conn, shard.is_replica())).await;
        if let Ok(Ok(lag)) = checked {
            health.keep(Arc::clone(shard), conn);
            return Ok(lag);
        }
        // Closed by the server, or stuck: a new login decides.
        drop(conn);
    }
    let mut conn = login(shard, timeout).await?;
    let lag = crate::timers::timeout(timeout, probe_query(&mut conn, shard.is_replica()))
        .await
        .map_err(|_| ServerError::Timeout)??;
    health.keep(Arc::clone(shard), conn);
    Ok(lag)
}

/// Logs in to `shard` as its login role, within `timeout`.
async fn login(shard: &Shard, timeout: Duration) -> Result<ServerConn, ServerError> {
    let tls = match tls::server_tls(shard).map_err(|e| ServerError::Tls(e.to_string()))? {
        None => None,
        Some(config) => Some((
            config,
            tls::server_name(&shard.host).map_err(|e| ServerError::Tls(e.to_string()))?,
        )),
    };
    let login = Login {
        user: shard.user.clone(),
        password: shard.password.clone(),
    };
    let work = connect::open_named(
        shard,
        &login,
        tls.as_ref(),
        timeout,
        connect::HEALTH_CHECK_NAME,
    );
    crate::timers::timeout(timeout, work)
        .await
        .map_err(|_| ServerError::Timeout)?
}

/// What the health loop does with a shard now (see [`Health::turn`]).
#[derive(Debug, PartialEq, Eq)]
enum Turn {
    /// Probe it now (it is marked as being probed).
    Probe,
    /// Nothing before this moment.
    At(Instant),
    /// A probe is running; its end wakes the loop.
    Probing,
}

impl Health {
    /// Whether the shard's probe is due at `now`, every `interval` while it is up and every
    /// [`DOWN_PROBE_EVERY`] while it is down; when it is, the probe is counted as started.
    fn turn(&self, interval: Duration, now: Instant) -> Turn {
        let every = if self.is_down() {
            DOWN_PROBE_EVERY
        } else {
            interval
        };
        let mut last = self.last_probe.lock().unwrap_or_else(|p| p.into_inner());
        if self.probing.load(Ordering::Acquire) {
            return Turn::Probing;
        }
        if let Some(due) = last.and_then(|t| t.checked_add(every))
            && due > now
        {
            return Turn::At(due);
        }
        if self.probing.swap(true, Ordering::AcqRel) {
            return Turn::Probing;
        }
        *last = Some(now);
        Turn::Probe
    }
}

/// The longest the health loop sleeps without a look at the snapshot in force.
const CHECKS_NAP: Duration = Duration::from_secs(1);

/// Probes every shard of the snapshot in force, each every `pool.health_check_interval`
/// (every [`DOWN_PROBE_EVERY`] while it is down), one probe per shard at a time, until `stop`.
///
/// Between probes the loop sleeps until the next one is due (at most [`CHECKS_NAP`]); a
/// shard marked down, a probe that ended and a reload wake it sooner (`Pools::wake_checks`).
/// An idle pgtenant wakes for its health checks only when one is due.
pub async fn check_shards(
    snapshot: impl Fn() -> Arc<Snapshot>,
    pools: Arc<super::Pools>,
    stop: tokio_util::sync::CancellationToken,
) {
    let wake = pools.checks_wake();
    loop {
        let snapshot = snapshot();
        let (interval, timeout) = (
            snapshot.pool.health_check_interval,
            snapshot.pool.health_check_timeout,
        );
        let now = Instant::now();
        let mut next = now + CHECKS_NAP;
        if !interval.is_zero() {
            let all = snapshot
                .shards
                .values()
                .flat_map(|s| std::iter::once(s).chain(s.replicas.iter()));
            for shard in all {
                let health = pools.health(&shard.name);
                match health.turn(interval, now) {
                    Turn::Probe => {}
                    Turn::At(due) => {
                        next = next.min(due);
                        continue;
                    }
                    Turn::Probing => continue,
                }
                let shard = Arc::clone(shard);
                tokio::spawn(async move {
                    match probe(&shard, &health, timeout).await {
                        Ok(lag) => {
                            health.lag_ms.store(lag, Ordering::Relaxed);
                            health.mark_up(&shard.name);
                        }
                        Err(e) if means_down(&e) => {
                            health.mark_down(&shard.name, &e.to_string());
                        }
                        Err(e) => {
                            // Answering, but refusing pgtenant's login: a configuration
                            // problem, not an outage.
                            tracing::warn!(shard = %shard.name, error = %e, "shard health check: the shard answers but the probe failed");
                            health.mark_up(&shard.name);
                        }
                    }
                    health.probing.store(false, Ordering::Release);
                    health.wake.notify_one();
                });
            }
        }
        // A shard no longer configured (or probes turned off) keeps no connection.
        for (name, health) in pools.healths() {
            let probed = !interval.is_zero()
                && snapshot
                    .shards
                    .values()
                    .any(|s| s.name == name || s.replicas.iter().any(|r| r.name == name));
            if !probed {
                health.close_kept(timeout).await;
            }
        }
        tokio::select! {
            _ = crate::timers::sleep_until(next.into()) => {}
            _ = wake.notified() => {}
            _ = stop.cancelled() => break,
        }
    }
    for (_, health) in pools.healths() {
        health.close_kept(Duration::from_secs(1)).await;
    }
}

/// Whether `e`, met opening a server connection, says the server is unavailable (as opposed
/// to a problem of one login or one request).
pub fn means_down(e: &ServerError) -> bool {
    match e {
        ServerError::Connect { .. }
        | ServerError::Io(_)
        | ServerError::Closed
        | ServerError::Timeout
        | ServerError::Tls(_) => true,
        // Shutting down, crash recovery, starting up, too many connections: the server
        // itself cannot take a connection now.
        ServerError::Server(f) => {
            f.code.starts_with("57P")
                || f.code.starts_with("08")
                || f.code == sqlstate::TOO_MANY_CONNECTIONS
        }
        ServerError::Auth(_) | ServerError::Protocol(_) => false,
    }
}

/// How long a down shard waits between probes: short, so that service resumes within about
/// a second of the server's return.
pub const DOWN_PROBE_EVERY: Duration = Duration::from_millis(250);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::server_msgs::ErrorFields;

    fn server(code: &str) -> ServerError {
        ServerError::Server(ErrorFields {
            code: code.to_owned(),
            ..Default::default()
        })
    }

    #[test]
    fn only_the_server_s_unavailability_marks_a_shard_down() {
        assert!(means_down(&ServerError::Timeout));
        assert!(means_down(&ServerError::Closed));
        assert!(means_down(&server("57P03")), "starting up");
        assert!(means_down(&server("57P01")), "shutting down");
        assert!(means_down(&server("53300")), "too many connections");
        // One role's problem is not an outage of the shard.
        assert!(!means_down(&ServerError::Auth("password".into())));
        assert!(!means_down(&server("28P01")));
        assert!(!means_down(&server("3D000")));
    }

    #[test]
    fn going_down_makes_every_older_connection_stale() {
        let h = Health::new(Arc::default());
        let before = h.generation();
        assert!(h.mark_down("s", "refused") && h.is_down());
        assert!(!h.mark_down("s", "refused again"), "already down");
        assert_eq!(h.downs(), 1, "one time down");
        assert!(h.generation() > before);
        assert!(h.down_since().is_some());
        assert!(h.mark_up("s") && !h.is_down() && h.down_since().is_none());
        assert!(!h.mark_up("s"));
    }

    #[test]
    fn a_probe_is_due_every_interval_while_up_and_sooner_while_down() {
        let h = Health::new(Arc::default());
        let interval = Duration::from_secs(3600);
        let t0 = Instant::now();
        assert_eq!(h.turn(interval, t0), Turn::Probe, "never probed");
        assert_eq!(h.turn(interval, t0), Turn::Probing, "one probe at a time");
        h.probing.store(false, Ordering::Release);
        assert_eq!(h.turn(interval, t0), Turn::At(t0 + interval));
        let later = t0 + Duration::from_secs(1);
        assert_eq!(h.turn(interval, later), Turn::At(t0 + interval));
        // Down: due DOWN_PROBE_EVERY after the last probe, not an hour after.
        h.mark_down("s", "refused");
        assert_eq!(h.turn(interval, t0), Turn::At(t0 + DOWN_PROBE_EVERY));
        assert_eq!(h.turn(interval, later), Turn::Probe);
        h.probing.store(false, Ordering::Release);
        assert_eq!(h.turn(interval, later), Turn::At(later + DOWN_PROBE_EVERY));
    }

    #[tokio::test]
    async fn going_down_wakes_the_health_loop() {
        let wake = Arc::new(Notify::new());
        let h = Health::new(Arc::clone(&wake));
        h.mark_down("s", "refused");
        // The wake is kept for a loop that was busy when it came.
        crate::timers::timeout(Duration::from_secs(30), wake.notified())
            .await
            .expect("woken");
        // Already down: no new wake (the loop already plans for it).
        h.mark_down("s", "refused again");
        let again = crate::timers::timeout(Duration::from_millis(50), wake.notified()).await;
        assert!(again.is_err());
    }
}
