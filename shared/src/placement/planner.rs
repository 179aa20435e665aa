//! The placement planner: given a model's expert sizes, the nodes (memory,
//! read bandwidth), routing statistics (or a stated synthetic distribution), a
//! replica budget and a batch size, it compares candidate placements by the
//! performance model of DESIGN.md and writes the fastest as a [`Plan`].
//!
//! Candidates ([`Mode`]):
//! - **sliced**: every expert's `ff` dimension cut over all nodes at `ffn_down`
//!   block boundaries, in proportion to the nodes' rates; where the blocks do
//!   not divide, the larger share alternates across experts;
//! - **whole experts**: balanced by expected load (heaviest expert first, to the
//!   least-loaded node with room), and, within the replica budget, replicas of
//!   hot experts as DeepSeek's EPLB places them;
//! - **round-robin** whole experts (`e % N`): the naive baseline.
//!
//! The objective is the expected step time, `E[Σ over MoE layers of max over
//! nodes of (bytes node i reads ÷ its rate)]`, estimated by sampling steps of `B`
//! tokens — not the max of expected bytes, which rates disjoint whole experts as
//! perfectly balanced — plus the coordinator's dense time. A node's rate is
//! `min(read bandwidth, cores × kernel rate)` ([`KernelRates`]).
//!
//! Decision logic only: no IO, no clock; the randomness is seeded.

mod candidates;
mod cost;
mod simulate;

#[cfg(test)]
mod tests;

use std::fmt::Write as _;

use serde::Serialize;

pub use self::candidates::{Overfull, Placement};
pub use self::cost::{ExpertCost, KernelRates, ModelCost};
pub use self::simulate::{NodePrediction, Prediction};

use self::candidates::{check_capacity, mode_label, ExpectedLoads};
use super::routing_stats::RoutingModel;
use super::{Cluster, PlacementError, Plan};

/// Read bandwidth assumed for a node whose cluster entry gives none, GB/s (one
/// core of the development machine reads 22–24 GB/s).
pub const DEFAULT_READ_BANDWIDTH_GBS: f64 = 20.0;

/// The round trip of one decode dispatch assumed by default, seconds: gRPC on loopback
/// (`cargo bench -p coordinator --bench dispatch`: 70–130 µs p50 on the development
/// machine); over a LAN give the measured figure.
pub const DEFAULT_ROUND_TRIP_S: f64 = 100e-6;

/// Monte Carlo steps sampled per candidate by default.
pub const DEFAULT_SAMPLES: usize = 1000;

/// Why no plan was made.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PlannerError {
    /// The routed experts need more memory than all nodes have together.
    #[error("the model does not fit: its routed experts need {needed} bytes ({:.2} GB), the nodes have {available} bytes ({:.2} GB) in all: {short} bytes ({:.2} GB) short", gb(*needed), gb(*available), gb(*short))]
    DoesNotFit {
        /// Bytes of every routed expert.
        needed: u64,
        /// Σ of the nodes' `memory_bytes`.
        available: u64,
        /// `needed - available`.
        short: u64,
    },
    /// The total would fit, but no candidate placement does (each overfills a node).
    #[error("no placement fits the nodes' memory: {0}")]
    NoCandidateFits(String),
    /// The model cannot be planned (no routed experts, inconsistent tensors).
    #[error("model: {0}")]
    Model(String),
    /// An unusable setting (batch 0, no nodes, a non-positive rate).
    #[error("{0}")]
    Config(String),
    /// Routing statistics that do not fit the model.
    #[error(transparent)]
    Routing(#[from] super::routing_stats::RoutingStatsError),
    /// A placement error (reading the model's shape; a plan that does not resolve).
    #[error(transparent)]
    Placement(#[from] PlacementError),
}

fn gb(b: u64) -> f64 {
    b as f64 / 1e9
}

/// A node as the planner sees it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PlannerNode {
    /// Its name in the cluster and plan files.
    pub name: String,
    /// Memory for weights; `None`: unlimited.
    pub memory_bytes: Option<u64>,
    /// Read bandwidth, GB/s.
    pub read_bandwidth_gbs: f64,
    /// Whether the bandwidth was declared (otherwise [`DEFAULT_READ_BANDWIDTH_GBS`]).
    pub bandwidth_declared: bool,
    /// Cores computing its experts; `None`: compute is not a limit.
    pub cores: Option<usize>,
}

impl PlannerNode {
    /// The cluster's nodes, in file order, with `cores` each.
    pub fn from_cluster(cluster: &Cluster, cores: Option<usize>) -> Vec<PlannerNode> {
        cluster
            .nodes
            .iter()
            .map(|n| PlannerNode {
                name: n.name.clone(),
                memory_bytes: n.memory_bytes,
                read_bandwidth_gbs: n.read_bandwidth_gbs.unwrap_or(DEFAULT_READ_BANDWIDTH_GBS),
                bandwidth_declared: n.read_bandwidth_gbs.is_some(),
                cores,
            })
            .collect()
    }

    /// `n` nodes `node0`… of `read_bandwidth_gbs` each, unlimited memory.
    pub fn equal(n: usize, read_bandwidth_gbs: f64) -> Vec<PlannerNode> {
        (0..n)
            .map(|i| PlannerNode {
                name: format!("node{i}"),
                memory_bytes: None,
                read_bandwidth_gbs,
                bandwidth_declared: true,
                cores: None,
            })
            .collect()
    }
}

/// Which replica of a replicated slice the coordinator serves a step from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ReplicaRule {
    /// `replicas[layer % replicas.len()]`: what `RemoteExperts` does today. A
    /// replica then never shares a layer's load; it moves it, and adds failover.
    ByLayer,
    /// Per step and layer, slices with one home first, then each replicated slice
    /// (busiest expert first) to the replica whose node has the least read time
    /// so far in this layer: what the coordinator does with `--replica-choice load`.
    LeastLoaded,
}

/// The settings of a planning run.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PlannerConfig {
    /// Sequences decoded together (tokens per step).
    pub batch: usize,
    /// Bytes the planner may spend on replicas of hot experts (0: none).
    pub replicate_bytes: u64,
    /// Monte Carlo steps.
    pub samples: usize,
    /// Seed of the sampled steps.
    pub seed: u64,
    /// Per-core kernel rates.
    pub kernel_rates: KernelRates,
    /// The coordinator's read bandwidth for its dense part, GB/s.
    pub coordinator_bandwidth_gbs: f64,
    /// The coordinator's cores; `None`: compute is not a limit.
    pub coordinator_cores: Option<usize>,
    /// The replica choice the predictions assume.
    pub replica_rule: ReplicaRule,
    /// One dispatch round trip (seconds), paid once per MoE layer for whole experts and
    /// twice for a layer with sliced experts (the exact split's two rounds).
    pub round_trip_s: f64,
}

impl Default for PlannerConfig {
    fn default() -> PlannerConfig {
        PlannerConfig {
            batch: 1,
            replicate_bytes: 0,
            samples: DEFAULT_SAMPLES,
            seed: 0x5eed,
            kernel_rates: KernelRates::default(),
            coordinator_bandwidth_gbs: DEFAULT_READ_BANDWIDTH_GBS,
            coordinator_cores: None,
            replica_rule: ReplicaRule::ByLayer,
            round_trip_s: DEFAULT_ROUND_TRIP_S,
        }
    }
}

/// A candidate placement strategy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Every expert cut over all nodes.
    Sliced,
    /// Whole experts balanced by expected load.
    Whole,
    /// Whole experts balanced by expected load, plus replicas of hot experts.
    WholeReplicated,
    /// Whole experts, expert `e` on node `e % N`.
    RoundRobin,
}

/// One candidate's outcome.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Candidate {
    /// Its strategy.
    pub mode: Mode,
    /// Its prediction, or `None` when it does not fit.
    pub prediction: Option<Prediction>,
    /// Why it does not fit, when it does not.
    pub unfit: Option<String>,
    /// With replicas and [`ReplicaRule::ByLayer`]: the prediction under
    /// [`ReplicaRule::LeastLoaded`], for comparison.
    pub least_loaded: Option<Prediction>,
}

/// What the planner decided and why.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PlanSummary {
    /// The chosen strategy.
    pub mode: Mode,
    /// Why, in a sentence or two.
    pub why: String,
    /// The routing distribution the steps were sampled from, in words.
    pub routing: String,
    /// The settings.
    pub config: PlannerConfig,
    /// The nodes as planned for.
    pub nodes: Vec<PlannerNode>,
    /// The chosen plan's prediction.
    pub prediction: Prediction,
    /// Every candidate, the chosen one included.
    pub candidates: Vec<Candidate>,
    /// Bytes of every routed expert (without replicas).
    pub routed_bytes: u64,
    /// Bytes the coordinator reads per step.
    pub dense_bytes: u64,
    /// Things worth knowing about the prediction.
    pub notes: Vec<String>,
}

/// A plan and its summary.
#[derive(Clone, Debug)]
pub struct Planned {
    /// The plan (it resolves against the model's shape).
    pub plan: Plan,
    /// The placement behind it.
    pub placement: Placement,
    /// What was decided and predicted.
    pub summary: PlanSummary,
}

/// Plans `model` over `nodes` (see the module doc).
pub fn plan(
    model: &ModelCost,
    nodes: &[PlannerNode],
    routing: &RoutingModel,
    config: &PlannerConfig,
) -> Result<Planned, PlannerError> {
    check_inputs(model, nodes, routing, config)?;
    let n_nodes = nodes.len();
    let needed = model.routed_bytes();
    if nodes.iter().all(|n| n.memory_bytes.is_some()) {
        let available = nodes.iter().filter_map(|n| n.memory_bytes).sum::<u64>();
        if needed > available {
            return Err(PlannerError::DoesNotFit {
                needed,
                available,
                short: needed - available,
            });
        }
    }
    let loads = expected_loads(model, routing, config.batch);
    let rates = balance_rates(model, nodes, config);

    let mut built: Vec<(Mode, Result<Placement, Overfull>)> = vec![
        (
            Mode::Sliced,
            Ok(candidates::sliced(model, nodes, &rates, &loads)),
        ),
        (
            Mode::Whole,
            candidates::whole(model, nodes, &rates, &loads, 0),
        ),
    ];
    if config.replicate_bytes > 0 {
        built.push((
            Mode::WholeReplicated,
            candidates::whole(model, nodes, &rates, &loads, config.replicate_bytes),
        ));
    }
    built.push((
        Mode::RoundRobin,
        Ok(candidates::round_robin(model, n_nodes)),
    ));
    let built: Vec<(Mode, Result<Placement, Overfull>)> = built
        .into_iter()
        .map(|(mode, p)| {
            let p = p.and_then(|p| {
                check_capacity(&p.held_bytes(model, n_nodes), nodes)?;
                Ok(p)
            });
            (mode, p)
        })
        .collect();

    // Simulate every placement that fits, on the same steps; replicated ones
    // also under the other replica rule.
    let mut runs: Vec<(&Placement, ReplicaRule)> = Vec::new();
    let mut index: Vec<(Option<usize>, Option<usize>)> = Vec::new();
    for (mode, p) in &built {
        match p {
            Ok(p) => {
                let main = runs.len();
                runs.push((p, config.replica_rule));
                let other = (*mode == Mode::WholeReplicated
                    && config.replica_rule == ReplicaRule::ByLayer)
                    .then(|| {
                        runs.push((p, ReplicaRule::LeastLoaded));
                        runs.len() - 1
                    });
                index.push((Some(main), other));
            }
            Err(_) => index.push((None, None)),
        }
    }
    let predictions = simulate::simulate(model, nodes, &runs, routing, config);
    let candidates: Vec<Candidate> = built
        .iter()
        .zip(&index)
        .map(|((mode, p), (main, other))| Candidate {
            mode: *mode,
            prediction: main.map(|i| predictions[i].clone()),
            unfit: p.as_ref().err().map(|o| {
                format!(
                    "node {} would hold {} bytes ({:.2} GB), it has {} ({:.2} GB short)",
                    nodes[o.node].name,
                    o.needed,
                    gb(o.needed),
                    o.memory,
                    gb(o.needed.saturating_sub(o.memory))
                )
            }),
            least_loaded: other.map(|i| predictions[i].clone()),
        })
        .collect();

    let best = candidates
        .iter()
        .enumerate()
        .filter_map(|(i, c)| c.prediction.as_ref().map(|p| (i, p.step_time_s)))
        .min_by(|a, b| a.1.total_cmp(&b.1).then(a.0.cmp(&b.0)))
        .map(|(i, _)| i);
    let Some(best) = best else {
        let reasons: Vec<String> = candidates
            .iter()
            .filter_map(|c| Some(format!("{}: {}", mode_label(c.mode), c.unfit.as_ref()?)))
            .collect();
        return Err(PlannerError::NoCandidateFits(reasons.join("; ")));
    };
    let mode = candidates[best].mode;
    let placement = match &built[best].1 {
        Ok(p) => p.clone(),
        Err(_) => unreachable!("the best candidate has a prediction, so it fits"),
    };
    let plan = placement.to_plan(model, nodes);
    plan.resolve(&model.shape)?;
    let prediction = candidates[best]
        .prediction
        .clone()
        .expect("the best candidate has a prediction");
    let why = explain(&candidates, best, config);
    let notes = notes(model, nodes, config, &candidates);
    Ok(Planned {
        plan,
        placement,
        summary: PlanSummary {
            mode,
            why,
            routing: routing.description().to_string(),
            config: config.clone(),
            nodes: nodes.to_vec(),
            prediction,
            candidates,
            routed_bytes: needed,
            dense_bytes: model.dense_bytes,
            notes,
        },
    })
}

/// Predicts any placement (a plan file's, say) with the same model.
pub fn predict(
    model: &ModelCost,
    nodes: &[PlannerNode],
    placement: &Placement,
    routing: &RoutingModel,
    config: &PlannerConfig,
) -> Result<Prediction, PlannerError> {
    check_inputs(model, nodes, routing, config)?;
    if placement.layers.len() != model.routed.len() {
        return Err(PlannerError::Config(format!(
            "the placement has {} layers, the model {}",
            placement.layers.len(),
            model.routed.len()
        )));
    }
    for (layer, (experts, cost)) in placement.layers.iter().zip(&model.routed).enumerate() {
        let bad = match (experts, cost) {
            (None, None) => false,
            (Some(experts), Some(cost)) => {
                experts.len() != model.n_expert()
                    || experts.iter().any(|slices| {
                        slices.is_empty()
                            || slices.iter().any(|s| {
                                s.ff.end > cost.n_ff
                                    || s.replicas.is_empty()
                                    || s.replicas.iter().any(|&n| n >= nodes.len())
                            })
                    })
            }
            _ => true,
        };
        if bad {
            return Err(PlannerError::Config(format!(
                "the placement does not fit the model or the {} nodes at layer {layer}",
                nodes.len()
            )));
        }
    }
    Ok(simulate::simulate(
        model,
        nodes,
        &[(placement, config.replica_rule)],
        routing,
        config,
    )
    .remove(0))
}

fn check_inputs(
    model: &ModelCost,
    nodes: &[PlannerNode],
    routing: &RoutingModel,
    config: &PlannerConfig,
) -> Result<(), PlannerError> {
    if nodes.is_empty() {
        return Err(PlannerError::Config(
            "no nodes to place experts on".to_string(),
        ));
    }
    if let Some(n) = nodes
        .iter()
        .find(|n| !(n.read_bandwidth_gbs.is_finite() && n.read_bandwidth_gbs > 0.0))
    {
        return Err(PlannerError::Config(format!(
            "node {:?}: read bandwidth {} GB/s is not a positive number",
            n.name, n.read_bandwidth_gbs
        )));
    }
    if nodes.iter().any(|n| n.cores == Some(0)) || config.coordinator_cores == Some(0) {
        return Err(PlannerError::Config("a core count of 0".to_string()));
    }
    if config.batch == 0 || config.samples == 0 {
        return Err(PlannerError::Config(
            "the batch size and the number of samples must be at least 1".to_string(),
        ));
    }
    if !(config.coordinator_bandwidth_gbs.is_finite() && config.coordinator_bandwidth_gbs > 0.0) {
        return Err(PlannerError::Config(format!(
            "the coordinator's bandwidth {} GB/s is not a positive number",
            config.coordinator_bandwidth_gbs
        )));
    }
    config.kernel_rates.check()?;
    if model.moe_layers().next().is_none() {
        return Err(PlannerError::Model(
            "the model has no routed experts to place".to_string(),
        ));
    }
    if routing.n_expert() != model.n_expert()
        || routing.k() != model.n_expert_used
        || model
            .moe_layers()
            .any(|(l, _)| routing.inclusion(l).is_none())
    {
        return Err(PlannerError::Config(format!(
            "the routing distribution picks {} of {} experts (or lacks a MoE layer), the model {} of {}",
            routing.k(),
            routing.n_expert(),
            model.n_expert_used,
            model.n_expert()
        )));
    }
    Ok(())
}

/// Per layer, per expert: bytes × P(a step of `batch` tokens picks it).
fn expected_loads(model: &ModelCost, routing: &RoutingModel, batch: usize) -> ExpectedLoads {
    model
        .routed
        .iter()
        .enumerate()
        .map(|(layer, cost)| {
            let cost = cost.as_ref()?;
            let pi = routing.inclusion(layer)?;
            let bytes = cost.expert_bytes() as f64;
            Some(
                pi.iter()
                    .map(|&p| bytes * (1.0 - (1.0 - p.clamp(0.0, 1.0)).powi(batch as i32)))
                    .collect(),
            )
        })
        .collect()
}

/// Each node's rate for balancing, bytes/s: `min(bandwidth, cores × kernel
/// rate)`, the kernel rate being the experts' bytes over their core-seconds at
/// the expected tokens per picked expert.
fn balance_rates(model: &ModelCost, nodes: &[PlannerNode], config: &PlannerConfig) -> Vec<f64> {
    let (bytes, core_s) = model
        .moe_layers()
        .map(|(_, c)| {
            (
                c.expert_bytes() as f64,
                c.slice_core_seconds(0..c.n_ff, &config.kernel_rates),
            )
        })
        .fold((0.0, 0.0), |a, b| (a.0 + b.0, a.1 + b.1));
    let kernel = bytes / core_s.max(f64::MIN_POSITIVE);
    // Tokens per picked expert under uniform routing.
    let q = model.n_expert_used as f64 / model.n_expert().max(1) as f64;
    let b = config.batch as f64;
    let tokens = (b * q / (1.0 - (1.0 - q).powf(b)).max(f64::MIN_POSITIVE)).max(1.0);
    nodes
        .iter()
        .map(|n| {
            let bw = n.read_bandwidth_gbs * 1e9;
            n.cores.map_or(bw, |c| bw.min(c as f64 * kernel / tokens))
        })
        .collect()
}

fn explain(candidates: &[Candidate], best: usize, config: &PlannerConfig) -> String {
    let chosen = &candidates[best];
    let p = chosen.prediction.as_ref().expect("chosen has a prediction");
    let mut why = format!(
        "{} predicts the shortest step: {} ({:.1} tokens/s at batch {})",
        mode_label(chosen.mode),
        fmt_time(p.step_time_s),
        p.tokens_per_s,
        config.batch
    );
    let others: Vec<(String, f64)> = candidates
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != best)
        .filter_map(|(_, c)| {
            let q = c.prediction.as_ref()?;
            let ratio = q.step_time_s / p.step_time_s;
            Some((
                format!(
                    "{} {} ({ratio:.2}x)",
                    mode_label(c.mode),
                    fmt_time(q.step_time_s)
                ),
                ratio,
            ))
        })
        .collect();
    if !others.is_empty() {
        let list: Vec<&str> = others.iter().map(|(t, _)| t.as_str()).collect();
        let _ = write!(why, "; {}", list.join(", "));
    }
    why.push('.');
    if others.iter().any(|&(_, r)| r < 1.01) {
        why.push_str(" Candidates within 1% of each other are a tie for practical purposes.");
    }
    if let Some(w) = candidates
        .iter()
        .find(|c| c.mode == Mode::Whole)
        .and_then(|c| c.prediction.as_ref())
    {
        if chosen.mode == Mode::Sliced && w.expert_time_s > p.expert_time_s * 1.001 {
            let _ = write!(
                why,
                " Whole experts are balanced in expectation (max over nodes of the expected expert time: {} per step) but not step by step: a step's tokens pick unevenly, and E[max over nodes] is {}, against {} sliced.",
                fmt_time(w.max_of_expected_s),
                fmt_time(w.expert_time_s),
                fmt_time(p.expert_time_s)
            );
        }
    }
    why
}

/// Seconds with a unit that keeps three or four significant digits.
fn fmt_time(s: f64) -> String {
    if s >= 1.0 {
        format!("{s:.3} s")
    } else if s >= 1e-3 {
        format!("{:.3} ms", s * 1e3)
    } else {
        format!("{:.2} µs", s * 1e6)
    }
}

/// Bytes in B, kB, MB or GB (powers of 1000).
fn fmt_bytes(b: f64) -> String {
    if b >= 1e9 {
        format!("{:.3} GB", b / 1e9)
    } else if b >= 1e6 {
        format!("{:.3} MB", b / 1e6)
    } else if b >= 1e3 {
        format!("{:.2} kB", b / 1e3)
    } else {
        format!("{b:.0} B")
    }
}

fn notes(
    model: &ModelCost,
    nodes: &[PlannerNode],
    config: &PlannerConfig,
    candidates: &[Candidate],
) -> Vec<String> {
    let mut notes = Vec::new();
    let defaulted: Vec<&str> = nodes
        .iter()
        .filter(|n| !n.bandwidth_declared)
        .map(|n| n.name.as_str())
        .collect();
    if !defaulted.is_empty() {
        notes.push(format!(
            "no read_bandwidth_gbs for {}: assumed {DEFAULT_READ_BANDWIDTH_GBS} GB/s",
            defaulted.join(", ")
        ));
    }
    if nodes.iter().all(|n| n.cores.is_none()) {
        notes.push(
            "no core counts given: compute is not a limit, only read bandwidth (give --cores)"
                .to_string(),
        );
    }
    let uncuttable: Vec<String> = model
        .moe_layers()
        .filter(|(_, c)| c.n_ff.div_ceil(c.block().max(1)) < nodes.len())
        .map(|(l, _)| l.to_string())
        .collect();
    if !uncuttable.is_empty() {
        let (_, c) = model.moe_layers().next().expect("MoE layers were checked");
        notes.push(format!(
            "layers {}: n_ff = {} is {} block(s) of ffn_down, fewer than the {} nodes: the sliced candidate gives some nodes nothing of an expert (the larger shares alternate)",
            uncuttable.join(","),
            c.n_ff,
            c.n_ff.div_ceil(c.block().max(1)),
            nodes.len()
        ));
    }
    if let Some(c) = candidates.iter().find(|c| c.mode == Mode::WholeReplicated) {
        if let (Some(p), Some(ll)) = (&c.prediction, &c.least_loaded) {
            notes.push(format!(
                "replicas: the coordinator serves layer L from replicas[L % n], so a replica moves a layer's load instead of sharing it ({}); with the least-loaded replica choice per step (--replica-choice load) the same plan would take {}",
                fmt_time(p.step_time_s),
                fmt_time(ll.step_time_s)
            ));
        }
    }
    notes.push(format!(
        "not modelled: serialization, and the overlap of the shared expert with the nodes' work ({} sampled steps, seed {})",
        config.samples, config.seed
    ));
    notes
}

impl PlanSummary {
    /// The summary as text for a terminal.
    pub fn render_text(&self) -> String {
        let mut out = String::new();
        let p = &self.prediction;
        let _ = writeln!(out, "mode             {}", mode_label(self.mode));
        let _ = writeln!(out, "why              {}", self.why);
        let _ = writeln!(out, "routing          {}", self.routing);
        let _ = writeln!(
            out,
            "batch            {} ({} sampled steps)",
            self.config.batch, self.config.samples
        );
        let _ = writeln!(
            out,
            "step time        {} = experts {} (± {}) + coordinator dense {} ({} at {} GB/s) \
             + round trips {} ({} of {})",
            fmt_time(p.step_time_s),
            fmt_time(p.expert_time_s),
            fmt_time(p.expert_time_stderr_s),
            fmt_time(p.dense_time_s),
            fmt_bytes(self.dense_bytes as f64),
            self.config.coordinator_bandwidth_gbs,
            fmt_time(p.round_trip_time_s),
            (p.round_trip_time_s / self.config.round_trip_s.max(f64::MIN_POSITIVE)).round(),
            fmt_time(self.config.round_trip_s)
        );
        let _ = writeln!(
            out,
            "tokens/s         {:.2} (decode, batch {})",
            p.tokens_per_s, self.config.batch
        );
        let _ = writeln!(
            out,
            "bottleneck       {} (slowest in {:.0}% of layer steps)",
            p.nodes[p.bottleneck].name,
            p.nodes[p.bottleneck].slowest_share * 100.0
        );
        let _ = writeln!(
            out,
            "routed experts   {} (without replicas)",
            fmt_bytes(self.routed_bytes as f64)
        );
        let _ = writeln!(out, "nodes:");
        let _ = writeln!(
            out,
            "  {:<16} {:>12} {:>12} {:>8} {:>12} {:>12} {:>8}",
            "name", "holds", "memory", "GB/s", "reads/step", "busy/step", "slowest"
        );
        for (n, np) in self.nodes.iter().zip(&p.nodes) {
            let bw = format!(
                "{}{}",
                n.read_bandwidth_gbs,
                if n.bandwidth_declared { "" } else { "*" }
            );
            let _ = writeln!(
                out,
                "  {:<16} {:>12} {:>12} {:>8} {:>12} {:>12} {:>7.0}%",
                n.name,
                fmt_bytes(np.held_bytes as f64),
                n.memory_bytes
                    .map_or("-".to_string(), |m| fmt_bytes(m as f64)),
                bw,
                fmt_bytes(np.bytes_per_step),
                fmt_time(np.time_per_step_s),
                np.slowest_share * 100.0
            );
        }
        let _ = writeln!(out, "candidates:");
        for c in &self.candidates {
            match &c.prediction {
                Some(q) => {
                    let _ = writeln!(
                        out,
                        "  {:<26} step {:>11}  experts {:>11} (max of expected {:>11})  {:>10.2} tok/s{}",
                        mode_label(c.mode),
                        fmt_time(q.step_time_s),
                        fmt_time(q.expert_time_s),
                        fmt_time(q.max_of_expected_s),
                        q.tokens_per_s,
                        if c.mode == self.mode { "  <- chosen" } else { "" }
                    );
                }
                None => {
                    let _ = writeln!(
                        out,
                        "  {:<26} does not fit: {}",
                        mode_label(c.mode),
                        c.unfit.as_deref().unwrap_or("")
                    );
                }
            }
        }
        for n in &self.notes {
            let _ = writeln!(out, "note: {n}");
        }
        out
    }
}

/// Parses a byte count: an integer with an optional unit, `K`/`M`/`G`/`T`
/// (powers of 1000) or `KiB`/`MiB`/`GiB`/`TiB` (powers of 1024), `B` optional
/// (`"512MiB"`, `"4G"`, `"1000000"`).
pub fn parse_byte_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let unit = unit.trim();
    let mult: f64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" => 1e3,
        "m" | "mb" => 1e6,
        "g" | "gb" => 1e9,
        "t" | "tb" => 1e12,
        "kib" => 1024.0,
        "mib" => 1024.0 * 1024.0,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        "tib" => 1024.0f64.powi(4),
        _ => {
            return Err(format!(
                "{text:?}: unknown unit {unit:?} (use K, M, G, T, KiB, MiB, GiB or TiB)"
            ))
        }
    };
    let value: f64 = num
        .parse()
        .map_err(|_| format!("{text:?} is not a byte count like 4G or 512MiB"))?;
    let bytes = value * mult;
    if !(bytes.is_finite() && bytes >= 0.0 && bytes < u64::MAX as f64) {
        return Err(format!("{text:?} is out of range"));
    }
    Ok(bytes.round() as u64)
}
