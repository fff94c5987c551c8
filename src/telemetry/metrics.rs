//! Prometheus metrics (DESIGN.md §7), on `metrics` + `metrics-exporter-prometheus`.
//!
//! Nothing on the hot path takes a lock shared by all sessions: per-tenant counts are plain
//! atomics of the tenant's own ([`crate::quota::TenantStats`]), turned into series when
//! Prometheus scrapes. So are the duration histograms: fixed buckets of atomics in the
//! tenant's stats ([`crate::quota::histogram`]), recorded without a clock read or an
//! allocation and bounded in memory whether or not anyone scrapes; their changes are added
//! to the series of the tenant's label at scrape time and rendered after the exporter's
//! series. Per-tenant labels are capped by `metrics.tenant_labels`: `top:N` keeps a label for
//! the N tenants active most recently (a tenant keeps its label while it is active; one idle
//! for [`LABEL_IDLE`] gives it up), the rest count under `tenant="other"`.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::atomic::Ordering;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use metrics::Label;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use metrics_util::MetricKindMask;

use crate::config::TenantLabels;
use crate::quota::TenantStats;
use crate::quota::histogram::{Counts, DurationHistogram};

/// Series not updated for this long disappear (idle tenants, removed shards).
pub const SERIES_IDLE: Duration = Duration::from_secs(10 * 60);
/// A tenant inactive for this long gives its label up under `top:N`.
pub const LABEL_IDLE: Duration = Duration::from_secs(10 * 60);

/// Where a tenant's stats keep one of its histograms.
type HistogramOf = fn(&TenantStats) -> &DurationHistogram;

/// The per-tenant duration histograms: name, help, and where a tenant's stats keep it.
const HISTOGRAMS: [(&str, &str, HistogramOf); 3] = [
    (
        "pgtenant_transaction_duration_seconds",
        "Transaction mode: from a server connection's checkout to its release, by tenant",
        |s| &s.transaction_seconds,
    ),
    (
        "pgtenant_query_duration_seconds",
        "From a Query or Sync to its ReadyForQuery, by tenant",
        |s| &s.query_seconds,
    ),
    (
        "pgtenant_checkout_wait_seconds",
        "Time a transaction waited for a server connection, by tenant",
        |s| &s.checkout_wait_seconds,
    ),
];
const HISTOGRAM_COUNT: usize = HISTOGRAMS.len();

/// The process's Prometheus recorder (one per process: the `metrics` facade is global),
/// installed on first use; `None` if another recorder was installed first.
pub fn recorder() -> Option<&'static PrometheusHandle> {
    static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let handle = PrometheusBuilder::new()
                .idle_timeout(MetricKindMask::ALL, Some(SERIES_IDLE))
                .install_recorder();
            match handle {
                Ok(h) => {
                    describe();
                    Some(h)
                }
                Err(e) => {
                    tracing::warn!(error = %e, "metrics disabled: no Prometheus recorder");
                    None
                }
            }
        })
        .as_ref()
}

fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge};
    describe_gauge!(
        "pgtenant_client_connections",
        "Client connections by tenant and state (idle, active, waiting)"
    );
    describe_gauge!(
        "pgtenant_server_connections",
        "Server connections by shard and state (idle, active, pinned)"
    );
    describe_gauge!(
        "pgtenant_server_connections_max",
        "Server connections a shard allows"
    );
    describe_gauge!(
        "pgtenant_pool_waiters",
        "Transactions waiting for a server connection, by shard"
    );
    describe_counter!("pgtenant_queries_total", "Queries by tenant");
    describe_counter!("pgtenant_transactions_total", "Transactions by tenant");
    describe_counter!(
        "pgtenant_guard_refusals_total",
        "Statements the guard refused, by tenant"
    );
    describe_counter!(
        "pgtenant_quota_refusals_total",
        "Refusals and throttles at a tenant's limits, by tenant and kind"
    );
    describe_counter!(
        "pgtenant_auth_failures_total",
        "Failed authentications by kind"
    );
    describe_counter!(
        "pgtenant_client_bytes_total",
        Unit::Bytes,
        "Bytes between clients and pgtenant, by tenant and direction"
    );
    describe_counter!("pgtenant_reloads_total", "Configuration reloads by result");
    describe_gauge!(
        "pgtenant_shard_up",
        "1 while a shard's health checks succeed, 0 while it is marked down"
    );
    describe_gauge!(
        "pgtenant_replica_lag_seconds",
        Unit::Seconds,
        "A replica's replay lag as its last health check found it"
    );
    describe_counter!(
        "pgtenant_shard_down_total",
        "Times a shard was marked down (a probe or a new connection failed)"
    );
}

/// Counts a failed authentication (`kind` is a fixed word, never a user name).
pub fn auth_failure(kind: &'static str) {
    metrics::counter!("pgtenant_auth_failures_total", "kind" => kind).increment(1);
}

/// Counts a configuration reload.
pub fn reload(ok: bool) {
    let result = if ok { "ok" } else { "error" };
    metrics::counter!("pgtenant_reloads_total", "result" => result).increment(1);
}

/// Per-tenant label assignment and what the last scrape saw.
pub struct Metrics {
    inner: Mutex<Labels>,
}

struct Labels {
    policy: TenantLabels,
    /// Tenants holding a label of their own (`top:N`), with their last activity.
    slots: HashMap<String, Instant>,
    /// Per tenant: the counters and histograms as the last scrape read them.
    seen: HashMap<String, Seen>,
    /// The histograms' series, per label (`None`: no tenant label), and when each last
    /// changed or had an active tenant.
    histograms: HashMap<Option<String>, ([Counts; HISTOGRAM_COUNT], Instant)>,
}

#[derive(Clone, Copy, Default, PartialEq)]
struct Seen {
    counters: [u64; COUNTERS],
    histograms: [Counts; HISTOGRAM_COUNT],
}

/// Labels besides `tenant`.
type Extra = &'static [(&'static str, &'static str)];

/// The per-tenant counters turned into series at scrape time, in the order
/// [`Metrics::render`] reads them.
const TENANT_COUNTERS: [(&str, Extra); 8] = [
    ("pgtenant_queries_total", &[]),
    ("pgtenant_transactions_total", &[]),
    ("pgtenant_guard_refusals_total", &[]),
    ("pgtenant_quota_refusals_total", &[("kind", "query_rate")]),
    (
        "pgtenant_quota_refusals_total",
        &[("kind", "client_connections")],
    ),
    (
        "pgtenant_quota_refusals_total",
        &[("kind", "server_connections")],
    ),
    (
        "pgtenant_client_bytes_total",
        &[("direction", "from_client")],
    ),
    ("pgtenant_client_bytes_total", &[("direction", "to_client")]),
];
const COUNTERS: usize = TENANT_COUNTERS.len();

impl Labels {
    /// The `tenant` label for `tenant`, active now if `active` (None: no label at all).
    fn label(&mut self, tenant: &str, active: bool, now: Instant) -> Option<String> {
        match self.policy {
            TenantLabels::All => Some(tenant.to_owned()),
            TenantLabels::None => None,
            TenantLabels::Top(n) => {
                if let Some(last) = self.slots.get_mut(tenant) {
                    if active {
                        *last = now;
                    }
                    return Some(tenant.to_owned());
                }
                if !active {
                    return Some("other".to_owned());
                }
                if self.slots.len() >= n {
                    let idle = self
                        .slots
                        .iter()
                        .filter(|(_, last)| now.saturating_duration_since(**last) >= LABEL_IDLE)
                        .min_by_key(|(_, last)| **last)
                        .map(|(name, _)| name.clone());
                    match idle {
                        Some(name) => {
                            self.slots.remove(&name);
                        }
                        None => return Some("other".to_owned()),
                    }
                }
                self.slots.insert(tenant.to_owned(), now);
                Some(tenant.to_owned())
            }
        }
    }

    /// Appends the histograms' series (those not idle for [`SERIES_IDLE`]) to `out`.
    fn render_histograms(&mut self, out: &mut String, now: Instant) {
        self.histograms
            .retain(|_, (_, at)| now.saturating_duration_since(*at) < SERIES_IDLE);
        let mut series: Vec<_> = self.histograms.iter().collect();
        series.sort_by(|a, b| a.0.cmp(b.0));
        for (i, (name, help, _)) in HISTOGRAMS.iter().enumerate() {
            let mut counted = series
                .iter()
                .filter(|(_, (h, _))| !h[i].is_empty())
                .peekable();
            if counted.peek().is_none() {
                continue;
            }
            if !out.is_empty() && !out.ends_with("\n\n") {
                out.push('\n');
            }
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
            for (label, (h, _)) in counted {
                let labels = match label {
                    Some(t) => format!("tenant=\"{}\",", escape_label(t)),
                    None => String::new(),
                };
                h[i].render(out, name, &labels);
            }
        }
    }
}

/// A label value as the text format writes it.
fn escape_label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn labels_of(label: Option<&str>, extra: &[(&'static str, &'static str)]) -> Vec<Label> {
    let mut labels: Vec<Label> = extra.iter().map(|(k, v)| Label::new(*k, *v)).collect();
    if let Some(t) = label {
        labels.push(Label::new("tenant", t.to_owned()));
    }
    labels
}

impl Metrics {
    pub fn new(policy: TenantLabels) -> Self {
        Metrics {
            inner: Mutex::new(Labels {
                policy,
                slots: HashMap::new(),
                seen: HashMap::new(),
                histograms: HashMap::new(),
            }),
        }
    }

    fn labels(&self) -> std::sync::MutexGuard<'_, Labels> {
        // Maps updated entry by entry: a poisoned lock is still consistent enough for labels.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A reload may change `metrics.tenant_labels`.
    pub fn set_policy(&self, policy: TenantLabels) {
        let mut labels = self.labels();
        if labels.policy != policy {
            labels.policy = policy;
            labels.slots.clear();
        }
    }

    /// Turns the tenants' counts into series, has `record_shards` record the shards' (their
    /// pools and health), and renders them all (Prometheus text format); empty when metrics
    /// are disabled.
    pub fn render(
        &self,
        tenants: &[(String, std::sync::Arc<crate::quota::TenantState>)],
        record_shards: impl FnOnce(),
    ) -> String {
        let Some(handle) = recorder() else {
            return String::new();
        };
        let now = Instant::now();
        let mut gauges: HashMap<(Option<String>, &'static str), f64> = HashMap::new();
        {
            let mut labels = self.labels();
            for (name, tenant) in tenants {
                let s = &tenant.stats;
                let values = [
                    TenantStats::get(&s.queries),
                    TenantStats::get(&s.transactions),
                    TenantStats::get(&s.guard_refusals),
                    TenantStats::get(&s.throttled),
                    TenantStats::get(&s.client_cap_refusals),
                    TenantStats::get(&s.server_cap_refusals),
                    TenantStats::get(&s.bytes_from_clients),
                    TenantStats::get(&s.bytes_to_clients),
                ];
                let seen = Seen {
                    counters: values,
                    histograms: HISTOGRAMS.map(|(_, _, of)| of(s).read()),
                };
                let before = labels.seen.insert(name.clone(), seen).unwrap_or_default();
                let clients = tenant.clients();
                let changed = seen != before;
                if !changed && clients == 0 {
                    // Idle: its series expire unless it comes back.
                    continue;
                }
                let label = labels.label(name, changed || clients > 0, now);
                let series = labels
                    .histograms
                    .entry(label.clone())
                    .or_insert_with(|| (Default::default(), now));
                for (total, (now_h, before_h)) in series
                    .0
                    .iter_mut()
                    .zip(seen.histograms.iter().zip(&before.histograms))
                {
                    total.add(&now_h.since(before_h));
                }
                series.1 = now;
                let delta = |i: usize| values[i].saturating_sub(before.counters[i]);
                for (i, (metric, extra)) in TENANT_COUNTERS.iter().enumerate() {
                    // Touch every series of an active tenant so none expires while it is.
                    metrics::counter!(*metric, labels_of(label.as_deref(), extra))
                        .increment(delta(i));
                }
                let active = tenant.stats.active.load(Ordering::Relaxed);
                let waiting = tenant.stats.waiting.load(Ordering::Relaxed);
                let idle = clients.saturating_sub(active + waiting);
                for (state, n) in [("idle", idle), ("active", active), ("waiting", waiting)] {
                    *gauges.entry((label.clone(), state)).or_default() += n as f64;
                }
            }
        }
        for ((label, client_state), n) in gauges {
            metrics::gauge!(
                "pgtenant_client_connections",
                labels_of(label.as_deref(), &[("state", client_state)])
            )
            .set(n);
        }
        // The shards' series come from their pools, which the caller reads.
        record_shards();
        handle.run_upkeep();
        let mut text = handle.render();
        self.labels().render_histograms(&mut text, now);
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_n_keeps_labels_for_active_tenants_and_frees_idle_ones() {
        let mut l = Labels {
            policy: TenantLabels::Top(2),
            slots: HashMap::new(),
            seen: HashMap::new(),
            histograms: HashMap::new(),
        };
        let t0 = Instant::now();
        assert_eq!(l.label("a", true, t0).as_deref(), Some("a"));
        assert_eq!(l.label("b", true, t0).as_deref(), Some("b"));
        assert_eq!(l.label("c", true, t0).as_deref(), Some("other"));
        // Inactive tenants without a label stay under "other".
        assert_eq!(l.label("d", false, t0).as_deref(), Some("other"));
        // "a" idles past LABEL_IDLE while "b" stays active: "c" takes "a"'s label.
        let later = t0 + LABEL_IDLE + Duration::from_secs(1);
        assert_eq!(l.label("b", true, later).as_deref(), Some("b"));
        assert_eq!(l.label("c", true, later).as_deref(), Some("c"));
        assert_eq!(l.label("a", true, later).as_deref(), Some("other"));
        l.policy = TenantLabels::None;
        assert_eq!(l.label("a", true, later), None);
        l.policy = TenantLabels::All;
        assert_eq!(l.label("zzz", false, later).as_deref(), Some("zzz"));
    }
}
