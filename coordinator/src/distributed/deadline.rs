//! How long a node may take to answer one dispatch.
//!
//! A fixed deadline must be long enough for the biggest prefill dispatch of the slowest
//! node, which makes it far too long to notice a stalled node during decode (milliseconds
//! per dispatch). The measured policy scales with what each node has actually been
//! taking: `factor ×` a decaying maximum of its recent dispatch times, scaled by the
//! dispatch's token count, never under `floor` (cold pages, a scheduler hiccup).

use std::sync::Mutex;
use std::time::Duration;

/// Dispatches of at most this many token rows count as "small" (their time is mostly
/// fixed cost); larger ones give the per-row rate.
const SMALL_ROWS: usize = 8;

/// Each new sample decays the kept maxima by this much first: a slow spell (cold pages,
/// a busy host) stops counting after a few hundred dispatches.
const DECAY: f64 = 0.98;

/// The deadline of a dispatch.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum DeadlinePolicy {
    /// Every dispatch gets this long (`--dispatch-timeout SECS`).
    Fixed(Duration),
    /// `factor ×` the node's predicted time for the dispatch, at least `floor`; `initial`
    /// until the node has answered a dispatch (`--dispatch-timeout auto`, the default).
    Measured {
        factor: f64,
        floor: Duration,
        initial: Duration,
    },
}

impl Default for DeadlinePolicy {
    fn default() -> Self {
        DeadlinePolicy::Measured {
            factor: 10.0,
            floor: Duration::from_secs(2),
            initial: Duration::from_secs(30),
        }
    }
}

impl DeadlinePolicy {
    /// The deadline of calls that are not dispatches (handshake, stats, probes).
    pub fn call_timeout(&self) -> Duration {
        match *self {
            DeadlinePolicy::Fixed(d) => d,
            DeadlinePolicy::Measured { initial, .. } => initial,
        }
    }
}

/// A node's recent dispatch times.
#[derive(Debug, Default)]
pub struct DispatchTimes {
    inner: Mutex<Maxima>,
}

#[derive(Debug, Default, Clone, Copy)]
struct Maxima {
    /// Decaying maximum of the seconds of small dispatches.
    small: f64,
    /// Decaying maximum of seconds per row of large dispatches.
    per_row: f64,
    samples: u64,
}

impl DispatchTimes {
    /// Records a dispatch of `rows` token rows that was answered after `took`.
    pub fn record(&self, rows: usize, took: Duration) {
        let secs = took.as_secs_f64();
        let mut m = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        m.small *= DECAY;
        m.per_row *= DECAY;
        if rows <= SMALL_ROWS {
            m.small = m.small.max(secs);
        } else {
            m.per_row = m.per_row.max(secs / rows as f64);
        }
        m.samples += 1;
    }

    /// The predicted time of a dispatch of `rows` rows (`None` before any sample): the
    /// larger of the small-dispatch time and the per-row rate times `rows`, where a rate not
    /// yet seen is taken as the small-dispatch time spread over [`SMALL_ROWS`] rows (an
    /// overestimate: big batches amortize the weight reads).
    pub fn predict(&self, rows: usize) -> Option<Duration> {
        let m = *self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if m.samples == 0 {
            return None;
        }
        let per_row = if m.per_row > 0.0 {
            m.per_row
        } else {
            m.small / SMALL_ROWS as f64
        };
        let secs = m.small.max(per_row * rows as f64);
        Some(Duration::from_secs_f64(secs.min(1e6)))
    }

    /// The deadline `policy` gives a dispatch of `rows` rows to this node.
    pub fn deadline(&self, policy: &DeadlinePolicy, rows: usize) -> Duration {
        match *policy {
            DeadlinePolicy::Fixed(d) => d,
            DeadlinePolicy::Measured {
                factor,
                floor,
                initial,
            } => match self.predict(rows) {
                None => initial,
                Some(p) => p.mul_f64(factor).max(floor),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    fn near(d: Duration, want_ms: f64) -> bool {
        (d.as_secs_f64() * 1e3 - want_ms).abs() < 1.0
    }

    #[test]
    fn measured_deadline_follows_the_node() {
        let policy = DeadlinePolicy::Measured {
            factor: 10.0,
            floor: ms(100),
            initial: ms(30_000),
        };
        let t = DispatchTimes::default();
        assert_eq!(t.deadline(&policy, 1), ms(30_000), "nothing measured yet");
        t.record(1, ms(3));
        // 10 × 3 ms is under the floor.
        assert_eq!(t.deadline(&policy, 1), ms(100));
        t.record(1, ms(40));
        assert!(near(t.deadline(&policy, 1), 400.0));
        // No large dispatch seen: 40 ms / 8 rows per row, 512 rows → 2.56 s, × 10.
        assert!(near(t.deadline(&policy, 512), 25_600.0));
        t.record(256, ms(256));
        // 1 ms per row.
        assert!(near(t.deadline(&policy, 512), 5_120.0));
        // A slow spell decays away.
        for _ in 0..400 {
            t.record(1, ms(3));
        }
        assert!(t.deadline(&policy, 1) == ms(100));
        assert_eq!(
            t.deadline(&DeadlinePolicy::Fixed(ms(7)), 512),
            ms(7),
            "a fixed deadline ignores the measurements"
        );
    }
}
