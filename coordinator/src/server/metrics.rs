//! The server's counters and gauges, and `/metrics` in the Prometheus text exposition
//! format (version 0.0.4).

use std::collections::VecDeque;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use shared::placement::routing_stats::RoutingStats;

/// How far back the tokens-per-second gauges look.
pub(crate) const RATE_WINDOW: Duration = Duration::from_secs(10);

/// Upper bounds of the step-time histogram's buckets, in seconds.
const STEP_BUCKETS: [f64; 12] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// How a request ended, as counted in `moeshard_requests_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Outcome {
    Stop,
    Length,
    Cancelled,
    Error,
}

impl Outcome {
    const ALL: [Outcome; 4] = [
        Outcome::Stop,
        Outcome::Length,
        Outcome::Cancelled,
        Outcome::Error,
    ];

    fn label(self) -> &'static str {
        match self {
            Outcome::Stop => "stop",
            Outcome::Length => "length",
            Outcome::Cancelled => "cancelled",
            Outcome::Error => "error",
        }
    }
}

/// Counters shared by the scheduler (which writes them) and `/metrics` (which reads them).
#[derive(Debug)]
pub(crate) struct Metrics {
    n_slots: usize,
    prompt_tokens: AtomicU64,
    generated_tokens: AtomicU64,
    step_sequences: AtomicU64,
    requests: [AtomicU64; 4],
    queue_depth: AtomicU64,
    running: AtomicU64,
    step: Mutex<StepStats>,
}

#[derive(Debug, Default)]
struct StepStats {
    /// Per bucket of [`STEP_BUCKETS`] (not cumulative), then the overflow.
    buckets: [u64; STEP_BUCKETS.len() + 1],
    sum_seconds: f64,
    count: u64,
    /// (when, prompt tokens, generated tokens) of recent steps, oldest first.
    recent: VecDeque<(Instant, u64, u64)>,
}

/// Each node's counters as `/metrics` lists them, or why they could not be read.
pub(crate) type NodeStats = Vec<(String, Result<proto::wire::Stats, String>)>;

/// What the engine measures itself: wall time per layer, and (experts on nodes) the
/// dispatch round trips per node, deadlines and degraded-mode drops.
#[derive(Debug, Default)]
pub(crate) struct EngineTimes {
    /// (seconds summed, passes) per layer.
    pub(crate) layers: Vec<(f64, u64)>,
    pub(crate) dispatch: Option<crate::models::DispatchMetrics>,
}

impl Metrics {
    pub(crate) fn new(n_slots: usize) -> Metrics {
        Metrics {
            n_slots,
            prompt_tokens: AtomicU64::new(0),
            generated_tokens: AtomicU64::new(0),
            step_sequences: AtomicU64::new(0),
            requests: Default::default(),
            queue_depth: AtomicU64::new(0),
            running: AtomicU64::new(0),
            step: Mutex::new(StepStats::default()),
        }
    }

    /// Records one engine step of `n_sequences` sequences that ended at `now`.
    pub(crate) fn record_step(
        &self,
        now: Instant,
        took: Duration,
        n_sequences: u64,
        n_prompt_tokens: u64,
        n_generated: u64,
    ) {
        self.step_sequences
            .fetch_add(n_sequences, Ordering::Relaxed);
        self.prompt_tokens
            .fetch_add(n_prompt_tokens, Ordering::Relaxed);
        self.generated_tokens
            .fetch_add(n_generated, Ordering::Relaxed);
        let mut s = self.step.lock().unwrap_or_else(|e| e.into_inner());
        let secs = took.as_secs_f64();
        let bucket = STEP_BUCKETS
            .iter()
            .position(|&le| secs <= le)
            .unwrap_or(STEP_BUCKETS.len());
        s.buckets[bucket] += 1;
        s.sum_seconds += secs;
        s.count += 1;
        s.recent.push_back((now, n_prompt_tokens, n_generated));
        while s
            .recent
            .front()
            .is_some_and(|&(t, _, _)| now.duration_since(t) > RATE_WINDOW)
        {
            s.recent.pop_front();
        }
    }

    pub(crate) fn count_request(&self, outcome: Outcome) {
        let i = Outcome::ALL.iter().position(|&o| o == outcome).unwrap_or(0);
        self.requests[i].fetch_add(1, Ordering::Relaxed);
    }

    /// Requests waiting for a slot and sequences holding one.
    pub(crate) fn set_load(&self, queued: usize, running: usize) {
        self.queue_depth.store(queued as u64, Ordering::Relaxed);
        self.running.store(running as u64, Ordering::Relaxed);
    }

    /// The text exposition of every metric at `now`, with the nodes' counters and the
    /// router's token counts per (layer, expert).
    pub(crate) fn render(
        &self,
        now: Instant,
        nodes: &NodeStats,
        routing: Option<&RoutingStats>,
        engine: &EngineTimes,
    ) -> String {
        let mut out = String::new();
        let mut metric = |name: &str, kind: &str, help: &str, samples: &[(String, f64)]| {
            write_metric(&mut out, name, kind, help, samples)
        };
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed) as f64;
        metric(
            "moeshard_prompt_tokens_total",
            "counter",
            "Prompt tokens evaluated.",
            &[(String::new(), load(&self.prompt_tokens))],
        );
        metric(
            "moeshard_generated_tokens_total",
            "counter",
            "Tokens generated.",
            &[(String::new(), load(&self.generated_tokens))],
        );
        metric(
            "moeshard_step_sequences_total",
            "counter",
            "Sequences evaluated, summed over steps (divided by moeshard_step_seconds_count: the mean batch).",
            &[(String::new(), load(&self.step_sequences))],
        );
        let requests: Vec<(String, f64)> = Outcome::ALL
            .iter()
            .zip(&self.requests)
            .map(|(o, n)| (format!("{{outcome=\"{}\"}}", o.label()), load(n)))
            .collect();
        metric(
            "moeshard_requests_total",
            "counter",
            "Generation requests ended, by outcome (finish reason, cancelled by the client, or failed).",
            &requests,
        );
        metric(
            "moeshard_queue_depth",
            "gauge",
            "Requests waiting for a free slot.",
            &[(String::new(), load(&self.queue_depth))],
        );
        metric(
            "moeshard_running_sequences",
            "gauge",
            "Sequences holding a slot (prefilling or decoding).",
            &[(String::new(), load(&self.running))],
        );
        metric(
            "moeshard_slots",
            "gauge",
            "Sequences that can run at once (--parallel).",
            &[(String::new(), self.n_slots as f64)],
        );

        let s = self.step.lock().unwrap_or_else(|e| e.into_inner());
        let (mut prompt, mut generated, mut oldest) = (0u64, 0u64, now);
        for &(t, p, g) in s
            .recent
            .iter()
            .filter(|(t, _, _)| now.duration_since(*t) <= RATE_WINDOW)
        {
            prompt += p;
            generated += g;
            oldest = oldest.min(t);
        }
        // Over the window, or over the time since the first recent step when that is shorter
        // (at least one second, so a single step does not read as a huge rate).
        let span = now
            .duration_since(oldest)
            .max(Duration::from_secs(1))
            .min(RATE_WINDOW)
            .as_secs_f64();
        metric(
            "moeshard_generation_tokens_per_second",
            "gauge",
            "Tokens generated per second over the last 10 seconds.",
            &[(String::new(), generated as f64 / span)],
        );
        metric(
            "moeshard_prompt_tokens_per_second",
            "gauge",
            "Prompt tokens evaluated per second over the last 10 seconds.",
            &[(String::new(), prompt as f64 / span)],
        );
        let mut cumulative = 0;
        let mut buckets = Vec::with_capacity(STEP_BUCKETS.len() + 1);
        for (i, n) in s.buckets.iter().enumerate() {
            cumulative += n;
            let le = STEP_BUCKETS
                .get(i)
                .map_or_else(|| "+Inf".to_owned(), |b| number(*b));
            buckets.push((format!("{{le=\"{le}\"}}"), cumulative as f64));
        }
        let _ = writeln!(
            out,
            "# HELP moeshard_step_seconds Time of one engine step (every running sequence)."
        );
        let _ = writeln!(out, "# TYPE moeshard_step_seconds histogram");
        for (labels, value) in &buckets {
            let _ = writeln!(
                out,
                "moeshard_step_seconds_bucket{labels} {}",
                number(*value)
            );
        }
        let _ = writeln!(out, "moeshard_step_seconds_sum {}", number(s.sum_seconds));
        let _ = writeln!(out, "moeshard_step_seconds_count {}", s.count);
        drop(s);

        if !engine.layers.is_empty() {
            let _ = writeln!(
                out,
                "# HELP moeshard_layer_seconds Wall time of each layer's forward passes (attention, FFN and residuals of a whole step)."
            );
            let _ = writeln!(out, "# TYPE moeshard_layer_seconds summary");
            for (layer, (secs, n)) in engine.layers.iter().enumerate() {
                let _ = writeln!(
                    out,
                    "moeshard_layer_seconds_sum{{layer=\"{layer}\"}} {}",
                    number(*secs)
                );
                let _ = writeln!(out, "moeshard_layer_seconds_count{{layer=\"{layer}\"}} {n}");
            }
        }
        if let Some(d) = &engine.dispatch {
            let _ = writeln!(
                out,
                "# HELP moeshard_node_dispatch_seconds Round trip of each answered dispatch to the node, as the coordinator sees it."
            );
            let _ = writeln!(out, "# TYPE moeshard_node_dispatch_seconds histogram");
            for (name, h) in &d.latency {
                let node = escape_label(name);
                for (le, n) in &h.cumulative {
                    let le = if le.is_finite() {
                        number(*le)
                    } else {
                        "+Inf".to_owned()
                    };
                    let _ = writeln!(
                        out,
                        "moeshard_node_dispatch_seconds_bucket{{node=\"{node}\",le=\"{le}\"}} {n}"
                    );
                }
                let _ = writeln!(
                    out,
                    "moeshard_node_dispatch_seconds_sum{{node=\"{node}\"}} {}",
                    number(h.sum_seconds)
                );
                let _ = writeln!(
                    out,
                    "moeshard_node_dispatch_seconds_count{{node=\"{node}\"}} {}",
                    h.count
                );
            }
            let deadlines: Vec<(String, f64)> = d
                .decode_deadline
                .iter()
                .map(|(name, t)| {
                    (
                        format!("{{node=\"{}\"}}", escape_label(name)),
                        t.as_secs_f64(),
                    )
                })
                .collect();
            write_metric(
                &mut out,
                "moeshard_node_dispatch_deadline_seconds",
                "gauge",
                "The deadline a one-token dispatch to the node gets now (fixed, or measured from its recent dispatches).",
                &deadlines,
            );
            write_metric(
                &mut out,
                "moeshard_degraded_mode",
                "gauge",
                "1 when experts without a live node are dropped (--degraded) instead of failing the request.",
                &[(String::new(), f64::from(u8::from(d.degraded_mode)))],
            );
            write_metric(
                &mut out,
                "moeshard_degraded_dropped_assignments_total",
                "counter",
                "(token, expert) assignments dropped in degraded mode because the expert had no live node.",
                &[(String::new(), d.dropped_assignments as f64)],
            );
        }
        if let Some(r) = routing.filter(|r| !r.layers.is_empty()) {
            let layers: Vec<(String, f64)> = r
                .layers
                .iter()
                .map(|l| (format!("{{layer=\"{}\"}}", l.layer), l.n_tokens as f64))
                .collect();
            write_metric(
                &mut out,
                "moeshard_layer_routed_tokens_total",
                "counter",
                "Tokens routed by each MoE layer's router.",
                &layers,
            );
            let experts: Vec<(String, f64)> = r
                .layers
                .iter()
                .flat_map(|l| {
                    l.counts.iter().enumerate().map(move |(e, &n)| {
                        (
                            format!("{{layer=\"{}\",expert=\"{e}\"}}", l.layer),
                            n as f64,
                        )
                    })
                })
                .collect();
            write_metric(
                &mut out,
                "moeshard_expert_routed_tokens_total",
                "counter",
                "Tokens routed to each expert of each MoE layer.",
                &experts,
            );
        }
        if !nodes.is_empty() {
            let per_node = |f: &dyn Fn(&proto::wire::Stats) -> f64| -> Vec<(String, f64)> {
                nodes
                    .iter()
                    .filter_map(|(name, stats)| {
                        let s = stats.as_ref().ok()?;
                        Some((format!("{{node=\"{}\"}}", escape_label(name)), f(s)))
                    })
                    .collect()
            };
            let mut metric = |name: &str, kind: &str, help: &str, samples: &[(String, f64)]| {
                write_metric(&mut out, name, kind, help, samples)
            };
            let up: Vec<(String, f64)> = nodes
                .iter()
                .map(|(name, s)| {
                    (
                        format!("{{node=\"{}\"}}", escape_label(name)),
                        if s.is_ok() { 1.0 } else { 0.0 },
                    )
                })
                .collect();
            metric(
                "moeshard_node_up",
                "gauge",
                "Whether the expert node answered its stats request and is not marked down.",
                &up,
            );
            // Each node's counters from its `Stats` answer: (name, type, help, value).
            type NodeMetric = (
                &'static str,
                &'static str,
                &'static str,
                fn(&proto::wire::Stats) -> f64,
            );
            let node_metrics: [NodeMetric; 10] = [
                (
                    "moeshard_node_dispatches_total",
                    "counter",
                    "Dispatches the node has answered since it started.",
                    |s| s.dispatches as f64,
                ),
                (
                    "moeshard_node_tokens_total",
                    "counter",
                    "Token rows the node has received in dispatches.",
                    |s| s.tokens as f64,
                ),
                (
                    "moeshard_node_assignments_total",
                    "counter",
                    "(token, expert) assignments the node has computed.",
                    |s| s.assignments as f64,
                ),
                (
                    "moeshard_node_errors_total",
                    "counter",
                    "Dispatches the node answered with an error.",
                    |s| s.errors as f64,
                ),
                (
                    "moeshard_node_compute_seconds_total",
                    "counter",
                    "Time the node spent computing experts.",
                    |s| s.compute_ns as f64 / 1e9,
                ),
                (
                    "moeshard_node_received_bytes_total",
                    "counter",
                    "Bytes of dispatches the node has received.",
                    |s| s.bytes_in as f64,
                ),
                (
                    "moeshard_node_sent_bytes_total",
                    "counter",
                    "Bytes of partial sums the node has sent.",
                    |s| s.bytes_out as f64,
                ),
                (
                    "moeshard_node_dram_cache_bytes",
                    "gauge",
                    "Bytes of experts the node's DRAM tier holds now (0 without --dram-cache).",
                    |s| s.dram_cache_bytes as f64,
                ),
                (
                    "moeshard_node_dram_hit_bytes_total",
                    "counter",
                    "Weight bytes the node's dispatches read from its DRAM tier.",
                    |s| s.dram_hit_bytes as f64,
                ),
                (
                    "moeshard_node_dram_miss_bytes_total",
                    "counter",
                    "Weight bytes the node's dispatches read from the mapping with the DRAM tier on.",
                    |s| s.dram_miss_bytes as f64,
                ),
            ];
            for (name, kind, help, value) in node_metrics {
                metric(name, kind, help, &per_node(&value));
            }
        }
        out
    }
}

/// One metric family: its help and type lines, then a sample per label set.
fn write_metric(out: &mut String, name: &str, kind: &str, help: &str, samples: &[(String, f64)]) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
    for (labels, value) in samples {
        let _ = writeln!(out, "{name}{labels} {}", number(*value));
    }
}

/// A sample value as Prometheus reads it (integers without a fraction).
fn number(v: f64) -> String {
    if v.is_finite() && v == v.trunc() && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else if v.is_nan() {
        "NaN".to_owned()
    } else if v.is_infinite() {
        if v > 0.0 { "+Inf" } else { "-Inf" }.to_owned()
    } else {
        format!("{v}")
    }
}

/// A label value with `\`, `"` and newlines escaped.
fn escape_label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}
