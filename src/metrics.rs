//! Process-wide counters and histograms, rendered as Prometheus text by the server.

use std::sync::atomic::{AtomicU64, Ordering};

/// A histogram with fixed upper bounds.
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    buckets: Vec<AtomicU64>,
    count: AtomicU64,
    /// Sum in millionths of the unit, to keep it an integer.
    sum_micro: AtomicU64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            buckets: bounds.iter().map(|_| AtomicU64::new(0)).collect(),
            count: AtomicU64::new(0),
            sum_micro: AtomicU64::new(0),
        }
    }

    /// Records one observation.
    pub fn observe(&self, v: f64) {
        if let Some(i) = self.bounds.iter().position(|b| v <= *b) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_micro
            .fetch_add((v * 1e6).max(0.0) as u64, Ordering::Relaxed);
    }

    /// Number of observations.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// Sum of observations.
    pub fn sum(&self) -> f64 {
        self.sum_micro.load(Ordering::Relaxed) as f64 / 1e6
    }

    /// Writes the histogram in Prometheus text format.
    pub fn render(&self, name: &str, help: &str, out: &mut String) {
        use std::fmt::Write;
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cumulative = 0;
        for (b, c) in self.bounds.iter().zip(&self.buckets) {
            cumulative += c.load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {cumulative}");
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", self.count());
        let _ = writeln!(out, "{name}_sum {}", self.sum());
        let _ = writeln!(out, "{name}_count {}", self.count());
    }
}

/// Figures of one manager.
#[derive(Debug)]
pub struct Metrics {
    /// Events appended (idempotent repeats excluded).
    pub events_appended: AtomicU64,
    /// Write transactions committed.
    pub commits: AtomicU64,
    /// Events per commit.
    pub batch_size: Histogram,
    /// Seconds from the start of a commit until it is acknowledged: its fsync included in
    /// immediate durability, and the wait for an fsync of earlier batches in progress.
    pub commit_seconds: Histogram,
    /// Log folds: the write-ahead log written into redb, redb made durable, the log emptied.
    pub log_folds: AtomicU64,
    /// Seconds each log fold took. New appends wait while one runs.
    pub log_fold_seconds: Histogram,
    /// Times a subscriber fell behind the live channel and caught up from the log.
    pub lag_recoveries: AtomicU64,
    /// Batches rebuilt because a shared store held newer state of one of their queues
    /// (another node wrote to it).
    pub batch_rebuilds: AtomicU64,
    /// Group commits the writer thread acknowledged itself (nothing else waiting), without
    /// handing them to the acknowledger thread.
    pub writer_acks: AtomicU64,
    /// Gap notices delivered.
    pub gap_notices: AtomicU64,
    /// Events removed by trimming, expiry and deletion.
    pub events_removed: AtomicU64,
    /// Deleted or expired queues whose events are still being removed in bounded steps.
    pub pending_purges: AtomicU64,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            events_appended: AtomicU64::new(0),
            commits: AtomicU64::new(0),
            batch_size: Histogram::new(&[
                1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 4096.0, 8192.0,
            ]),
            commit_seconds: Histogram::new(&[
                0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
            ]),
            log_folds: AtomicU64::new(0),
            log_fold_seconds: Histogram::new(&[
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
            ]),
            lag_recoveries: AtomicU64::new(0),
            batch_rebuilds: AtomicU64::new(0),
            writer_acks: AtomicU64::new(0),
            gap_notices: AtomicU64::new(0),
            events_removed: AtomicU64::new(0),
            pending_purges: AtomicU64::new(0),
        }
    }
}

impl Metrics {
    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Reads a counter.
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}
