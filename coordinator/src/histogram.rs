//! A lock-free histogram of durations, as Prometheus reads it (cumulative buckets, sum,
//! count): written on hot paths (every dispatch), read by `/metrics`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds, in seconds, for the time of one dispatch round trip: from tens of
/// microseconds (inproc decode) to seconds (a prefill chunk of a big model).
pub const DISPATCH_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0,
];

/// Counts of observations per bucket (not cumulative; the last one is the overflow), their
/// sum in nanoseconds and their number.
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    buckets: Vec<AtomicU64>,
    sum_ns: AtomicU64,
    count: AtomicU64,
}

/// A histogram's values at one moment: cumulative counts per upper bound (then `+Inf`).
#[derive(Clone, Debug, PartialEq)]
pub struct HistogramSnapshot {
    /// (upper bound in seconds, observations ≤ it); the last bound is `f64::INFINITY`.
    pub cumulative: Vec<(f64, u64)>,
    pub sum_seconds: f64,
    pub count: u64,
}

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Histogram {
        Histogram {
            bounds,
            buckets: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_ns: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, took: Duration) {
        let secs = took.as_secs_f64();
        let i = self
            .bounds
            .iter()
            .position(|&le| secs <= le)
            .unwrap_or(self.bounds.len());
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        let ns = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX);
        self.sum_ns.fetch_add(ns, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> HistogramSnapshot {
        let mut total = 0;
        let cumulative = self
            .buckets
            .iter()
            .enumerate()
            .map(|(i, b)| {
                total += b.load(Ordering::Relaxed);
                (self.bounds.get(i).copied().unwrap_or(f64::INFINITY), total)
            })
            .collect();
        HistogramSnapshot {
            cumulative,
            sum_seconds: self.sum_ns.load(Ordering::Relaxed) as f64 / 1e9,
            count: self.count.load(Ordering::Relaxed),
        }
    }
}

impl HistogramSnapshot {
    /// The smallest bucket bound below which at least `q` (0..=1) of the observations lie
    /// (`None` without observations): an upper estimate of the quantile.
    pub fn quantile_bound(&self, q: f64) -> Option<f64> {
        let n = self.cumulative.last()?.1;
        if n == 0 {
            return None;
        }
        let want = (q.clamp(0.0, 1.0) * n as f64).ceil().max(1.0) as u64;
        self.cumulative
            .iter()
            .find(|(_, c)| *c >= want)
            .map(|(le, _)| *le)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_cumulative_and_sum_adds_up() {
        let h = Histogram::new(&[0.001, 0.01, 0.1]);
        for ms in [0.5, 0.9, 5.0, 50.0, 500.0] {
            h.observe(Duration::from_secs_f64(ms / 1000.0));
        }
        // Exactly on a bound counts in that bucket.
        h.observe(Duration::from_millis(10));
        let s = h.snapshot();
        assert_eq!(
            s.cumulative,
            vec![(0.001, 2), (0.01, 4), (0.1, 5), (f64::INFINITY, 6)]
        );
        assert_eq!(s.count, 6);
        assert!((s.sum_seconds - 0.5664).abs() < 1e-9, "{}", s.sum_seconds);
        assert_eq!(s.quantile_bound(0.5), Some(0.01));
        assert_eq!(s.quantile_bound(0.99), Some(f64::INFINITY));
        assert_eq!(
            Histogram::new(DISPATCH_BUCKETS)
                .snapshot()
                .quantile_bound(0.5),
            None
        );
    }
}
