//! Counters for monitoring (issue 14): what the VMM's hot paths count and
//! what `vm.counters` and `/metrics` report.
//!
//! Invariants: recording never locks and never allocates; a [`Counter`] or
//! [`Histogram`] is a set of atomics updated with relaxed ordering, so a
//! reader sees each value exact but two values are not taken at one
//! instant (a histogram's count may run one observation ahead of a bucket).
//! Counters only grow; they are never reset while the VMM runs (Prometheus
//! computes rates from monotonic counters).
//!
//! [`Exposition`] writes the Prometheus text format (version 0.0.4): one
//! `# HELP` and `# TYPE` line per family, then its samples, label values
//! escaped as the format asks.
//!
//! The cargo feature `off` compiles recording out ([`ENABLED`] is false,
//! `add`, `publish` and `observe` do nothing, callers skip the clock reads
//! they make only for a histogram): the build that `vireo-bench` figures
//! are compared with to measure what counting costs (docs/monitoring.md).

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

/// False in a build with the `off` feature: nothing is recorded, so a
/// caller can skip work done only to record (a clock read for a latency).
pub const ENABLED: bool = !cfg!(feature = "off");

/// A monotonic count, shared between the thread that counts and readers.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub const fn new() -> Self {
        Counter(AtomicU64::new(0))
    }

    #[inline]
    pub fn add(&self, n: u64) {
        if ENABLED {
            self.0.fetch_add(n, Ordering::Relaxed);
        }
    }

    #[inline]
    pub fn inc(&self) {
        self.add(1)
    }

    /// Overwrite with a value the owner counted itself (an engine vCPU
    /// publishes its private totals this way; only that thread writes).
    #[inline]
    pub fn publish(&self, v: u64) {
        if ENABLED {
            self.0.store(v, Ordering::Relaxed);
        }
    }

    #[inline]
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Upper bounds in microseconds of the request-latency buckets: 10 µs to
/// 1 s, about three per decade (the `+Inf` bucket is implicit).
pub const LATENCY_BOUNDS_US: [u64; 16] = [
    10, 25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000,
    500_000, 1_000_000,
];

/// A histogram over fixed bucket bounds (in the recorded unit), lock-free.
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [u64],
    /// One per bound, then the overflow bucket; not cumulative.
    buckets: Box<[AtomicU64]>,
    sum: AtomicU64,
    count: AtomicU64,
}

impl Histogram {
    pub fn new(bounds: &'static [u64]) -> Self {
        Histogram {
            bounds,
            buckets: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }

    /// A request-latency histogram in microseconds.
    pub fn latency_us() -> Self {
        Histogram::new(&LATENCY_BOUNDS_US)
    }

    #[inline]
    pub fn observe(&self, v: u64) {
        if !ENABLED {
            return;
        }
        let i = self.bounds.partition_point(|&b| b < v);
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum.fetch_add(v, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    /// The values now, buckets made cumulative as Prometheus has them.
    pub fn snapshot(&self) -> HistogramSnapshot {
        let mut acc = 0;
        let buckets = self
            .bounds
            .iter()
            .zip(self.buckets.iter())
            .map(|(&le, b)| {
                acc += b.load(Ordering::Relaxed);
                Bucket { le, count: acc }
            })
            .collect();
        let overflow = self.buckets[self.bounds.len()].load(Ordering::Relaxed);
        // The count is at least what the buckets hold, whatever raced.
        let count = self.count.load(Ordering::Relaxed).max(acc + overflow);
        HistogramSnapshot {
            buckets,
            sum: self.sum.load(Ordering::Relaxed),
            count,
        }
    }
}

/// One cumulative bucket: observations at most `le`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bucket {
    pub le: u64,
    pub count: u64,
}

/// A histogram's values at one time (cumulative buckets; `count` is the
/// `+Inf` bucket).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistogramSnapshot {
    pub buckets: Vec<Bucket>,
    pub sum: u64,
    pub count: u64,
}

/// The kind of a metric family, as `# TYPE` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

/// A Prometheus text exposition being written.
#[derive(Debug, Default)]
pub struct Exposition {
    out: String,
}

/// The content type of the text format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

fn escape_label(v: &str, out: &mut String) {
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

fn escape_help(v: &str, out: &mut String) {
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

/// A sample value: integers print exactly, the rest as floats.
#[derive(Debug, Clone, Copy)]
pub enum Value {
    Int(u64),
    Float(f64),
}

impl From<u64> for Value {
    fn from(v: u64) -> Self {
        Value::Int(v)
    }
}

impl From<f64> for Value {
    fn from(v: f64) -> Self {
        Value::Float(v)
    }
}

impl Exposition {
    pub fn new() -> Self {
        Exposition::default()
    }

    /// Start a family: `name` (with its unit suffix, and `_total` for a
    /// counter, as the conventions ask), its help text and kind.
    pub fn family(&mut self, name: &str, help: &str, kind: Kind) {
        let _ = write!(self.out, "# HELP {name} ");
        escape_help(help, &mut self.out);
        let _ = writeln!(self.out, "\n# TYPE {name} {}", kind.name());
    }

    /// One sample of the family just started.
    pub fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl Into<Value>) {
        self.out.push_str(name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                self.out.push_str(k);
                self.out.push_str("=\"");
                escape_label(v, &mut self.out);
                self.out.push('"');
            }
            self.out.push('}');
        }
        let _ = match value.into() {
            Value::Int(v) => writeln!(self.out, " {v}"),
            Value::Float(v) if v.is_finite() => writeln!(self.out, " {v}"),
            Value::Float(v) if v.is_nan() => writeln!(self.out, " NaN"),
            Value::Float(v) if v > 0.0 => writeln!(self.out, " +Inf"),
            Value::Float(_) => writeln!(self.out, " -Inf"),
        };
    }

    /// A histogram's samples (`_bucket`, `_sum`, `_count`) for a family
    /// started with [`Kind::Histogram`]; dividing by `per_unit` turns the
    /// recorded unit into the family's (1e6 for microseconds reported in
    /// seconds: a division keeps 10 µs printing as 0.00001).
    pub fn histogram(
        &mut self,
        name: &str,
        labels: &[(&str, &str)],
        h: &HistogramSnapshot,
        per_unit: f64,
    ) {
        let bucket = format!("{name}_bucket");
        for b in &h.buckets {
            let le = format!("{}", b.le as f64 / per_unit);
            let mut with_le: Vec<(&str, &str)> = labels.to_vec();
            with_le.push(("le", &le));
            self.sample(&bucket, &with_le, b.count);
        }
        let mut with_le: Vec<(&str, &str)> = labels.to_vec();
        with_le.push(("le", "+Inf"));
        self.sample(&bucket, &with_le, h.count);
        self.sample(&format!("{name}_sum"), labels, h.sum as f64 / per_unit);
        self.sample(&format!("{name}_count"), labels, h.count);
    }

    pub fn finish(self) -> String {
        self.out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let h = Histogram::latency_us();
        for v in [5, 10, 11, 2_000_000] {
            h.observe(v);
        }
        let s = h.snapshot();
        assert_eq!(s.buckets[0], Bucket { le: 10, count: 2 });
        assert_eq!(s.buckets[1], Bucket { le: 25, count: 3 });
        assert_eq!(s.buckets.last().unwrap().count, 3);
        assert_eq!((s.count, s.sum), (4, 2_000_026));
    }

    #[test]
    fn exposition_escapes_and_types() {
        let mut e = Exposition::new();
        e.family("vireo_x_total", "A \\ help\nline", Kind::Counter);
        e.sample("vireo_x_total", &[("device", "a\"b\\c\nd")], 3u64);
        e.family("vireo_y_seconds", "y", Kind::Histogram);
        let h = Histogram::new(&[10]);
        h.observe(20);
        e.histogram("vireo_y_seconds", &[("d", "0")], &h.snapshot(), 1e6);
        let t = e.finish();
        assert!(t.starts_with(
            "# HELP vireo_x_total A \\\\ help\\nline\n# TYPE vireo_x_total counter\n"
        ));
        assert!(
            t.contains("vireo_x_total{device=\"a\\\"b\\\\c\\nd\"} 3\n"),
            "{t}"
        );
        assert!(
            t.contains("vireo_y_seconds_bucket{d=\"0\",le=\"0.00001\"} 0\n"),
            "{t}"
        );
        assert!(
            t.contains("vireo_y_seconds_bucket{d=\"0\",le=\"+Inf\"} 1\n"),
            "{t}"
        );
        assert!(t.contains("vireo_y_seconds_count{d=\"0\"} 1\n"), "{t}");
    }
}
