//! Duration histograms of a tenant's own: fixed buckets of plain atomics, recorded without a
//! clock read, a lock or an allocation, and bounded in memory however long nobody scrapes
//! (the exporter's own histograms keep every sample until the next scrape: 14 MB after
//! 200,000 transactions). Turned into Prometheus series at scrape time (`telemetry/metrics.rs`).

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Bucket upper bounds: nanoseconds, and the `le` label Prometheus shows (seconds).
const BUCKETS: [(u64, &str); 17] = [
    (100_000, "0.0001"),
    (250_000, "0.00025"),
    (500_000, "0.0005"),
    (1_000_000, "0.001"),
    (2_500_000, "0.0025"),
    (5_000_000, "0.005"),
    (10_000_000, "0.01"),
    (25_000_000, "0.025"),
    (50_000_000, "0.05"),
    (100_000_000, "0.1"),
    (250_000_000, "0.25"),
    (500_000_000, "0.5"),
    (1_000_000_000, "1"),
    (2_500_000_000, "2.5"),
    (5_000_000_000, "5"),
    (10_000_000_000, "10"),
    (30_000_000_000, "30"),
];
/// The buckets and the one above the last bound (`+Inf`).
const SLOTS: usize = BUCKETS.len() + 1;

/// One histogram: per-bucket counts (not cumulative) and the sum.
#[derive(Debug, Default)]
pub struct DurationHistogram {
    counts: [AtomicU64; SLOTS],
    sum_ns: AtomicU64,
}

impl DurationHistogram {
    /// Counts one observation of `d`.
    pub fn record(&self, d: Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        // Most durations fall in the first few buckets.
        let slot = BUCKETS
            .iter()
            .position(|&(bound, _)| ns <= bound)
            .unwrap_or(BUCKETS.len());
        self.counts[slot].fetch_add(1, Ordering::Relaxed);
        self.sum_ns.fetch_add(ns, Ordering::Relaxed);
    }

    /// What it counted so far.
    pub fn read(&self) -> Counts {
        Counts {
            counts: std::array::from_fn(|i| self.counts[i].load(Ordering::Relaxed)),
            sum_ns: self.sum_ns.load(Ordering::Relaxed),
        }
    }
}

/// A histogram's counts at one time, or what changed between two times.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    counts: [u64; SLOTS],
    sum_ns: u64,
}

impl Counts {
    /// What was counted after `before`.
    pub fn since(&self, before: &Counts) -> Counts {
        Counts {
            counts: std::array::from_fn(|i| self.counts[i].wrapping_sub(before.counts[i])),
            sum_ns: self.sum_ns.wrapping_sub(before.sum_ns),
        }
    }

    pub fn add(&mut self, other: &Counts) {
        for (c, o) in self.counts.iter_mut().zip(other.counts) {
            *c = c.wrapping_add(o);
        }
        self.sum_ns = self.sum_ns.wrapping_add(other.sum_ns);
    }

    pub fn is_empty(&self) -> bool {
        self.counts.iter().all(|&c| c == 0)
    }

    /// The series of `name` with `labels` (already rendered, `k="v",` each), in the text
    /// format: cumulative buckets, `+Inf`, sum (seconds) and count.
    pub fn render(&self, out: &mut String, name: &str, labels: &str) {
        let mut cumulative = 0u64;
        for (i, &(_, le)) in BUCKETS.iter().enumerate() {
            cumulative += self.counts[i];
            let _ = writeln!(out, "{name}_bucket{{{labels}le=\"{le}\"}} {cumulative}");
        }
        cumulative += self.counts[BUCKETS.len()];
        let _ = writeln!(out, "{name}_bucket{{{labels}le=\"+Inf\"}} {cumulative}");
        let labels = labels.trim_end_matches(',');
        let labels = if labels.is_empty() {
            String::new()
        } else {
            format!("{{{labels}}}")
        };
        let sum = self.sum_ns as f64 / 1e9;
        let _ = writeln!(out, "{name}_sum{labels} {sum}");
        let _ = writeln!(out, "{name}_count{labels} {cumulative}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn observations_land_in_the_first_bucket_that_holds_them() {
        let h = DurationHistogram::default();
        h.record(Duration::from_micros(100)); // on the bound: le="0.0001"
        h.record(Duration::from_micros(101));
        h.record(Duration::from_secs(31));
        h.record(Duration::MAX);
        let c = h.read();
        assert_eq!(c.counts[0], 1);
        assert_eq!(c.counts[1], 1);
        assert_eq!(c.counts[BUCKETS.len()], 2);
        let mut text = String::new();
        c.since(&Counts::default())
            .render(&mut text, "x_seconds", "tenant=\"a\",");
        assert!(text.contains("x_seconds_bucket{tenant=\"a\",le=\"0.0001\"} 1\n"));
        assert!(text.contains("x_seconds_bucket{tenant=\"a\",le=\"0.00025\"} 2\n"));
        assert!(text.contains("x_seconds_bucket{tenant=\"a\",le=\"30\"} 2\n"));
        assert!(text.contains("x_seconds_bucket{tenant=\"a\",le=\"+Inf\"} 4\n"));
        assert!(text.contains("x_seconds_count{tenant=\"a\"} 4\n"));
        let mut none = String::new();
        c.render(&mut none, "x_seconds", "");
        assert!(none.contains("\nx_seconds_count 4\n"));
        // What changed between two reads.
        h.record(Duration::from_millis(3));
        let d = h.read().since(&c);
        assert_eq!(d.counts[5], 1);
        assert_eq!(d.sum_ns, 3_000_000);
        assert!(!d.is_empty() && Counts::default().is_empty());
    }
}
