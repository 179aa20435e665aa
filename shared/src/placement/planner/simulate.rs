//! The objective: expected step time E[Σ over MoE layers of max over nodes of
//! (node i's time for the layer)], by Monte Carlo over sampled steps of `B`
//! tokens, plus the coordinator's dense time.
//!
//! A node's time for a layer is `max(bytes ÷ read bandwidth, core-seconds ÷
//! cores)`: it reads every slice it holds of every expert at least one of the
//! step's tokens picked, once, and computes it once per such token. Each
//! candidate is evaluated on the same sampled steps (common random numbers), so
//! their differences are much more precise than each estimate alone.

use serde::Serialize;

use super::candidates::Placement;
use super::cost::ModelCost;
use super::{PlannerConfig, PlannerNode, ReplicaRule};
use crate::placement::routing_stats::RoutingModel;
use crate::rng::{mix64, SplitMix64};

/// What the performance model predicts for one placement.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Prediction {
    /// E[Σ over MoE layers of max over nodes of the node's time], seconds per step.
    pub expert_time_s: f64,
    /// The Monte Carlo standard error of `expert_time_s`.
    pub expert_time_stderr_s: f64,
    /// Σ over layers of max over nodes of the node's *expected* time: what a
    /// planner looking only at expected bytes would predict (never more than
    /// `expert_time_s`).
    pub max_of_expected_s: f64,
    /// The coordinator's dense part, seconds per step.
    pub dense_time_s: f64,
    /// The dispatch round trips of a step: one per MoE layer, two where the layer has
    /// sliced experts.
    pub round_trip_time_s: f64,
    /// `expert_time_s + dense_time_s + round_trip_time_s` (serialization and the overlap
    /// of the shared expert with the nodes are not modelled).
    pub step_time_s: f64,
    /// Decode tokens per second at the batch size: `batch / step_time_s`.
    pub tokens_per_s: f64,
    /// Per node, in plan order.
    pub nodes: Vec<NodePrediction>,
    /// The node that is most often the slowest of a layer (index into `nodes`).
    pub bottleneck: usize,
}

/// One node's share of a step.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct NodePrediction {
    /// The node's name.
    pub name: String,
    /// Bytes of expert slices it holds (replicas included).
    pub held_bytes: u64,
    /// Expected bytes it reads per step.
    pub bytes_per_step: f64,
    /// Expected seconds it works per step (Σ over layers of its own time).
    pub time_per_step_s: f64,
    /// The fraction of (step, layer)s in which it is the slowest node (ties shared).
    pub slowest_share: f64,
}

/// A slice as the simulation sees it.
struct SimSlice {
    bytes: f64,
    core_seconds_per_token: f64,
    replicas: Vec<usize>,
}

/// Predicts each of `placements` (with the replica rule to model for it) on
/// the same sampled steps.
pub(super) fn simulate(
    model: &ModelCost,
    nodes: &[PlannerNode],
    placements: &[(&Placement, ReplicaRule)],
    routing: &RoutingModel,
    config: &PlannerConfig,
) -> Vec<Prediction> {
    let n_nodes = nodes.len();
    let n_layer = model.routed.len();
    let moe_layers: Vec<usize> = model.moe_layers().map(|(l, _)| l).collect();
    let bw: Vec<f64> = nodes.iter().map(|n| n.read_bandwidth_gbs * 1e9).collect();
    let cores: Vec<Option<f64>> = nodes.iter().map(|n| n.cores.map(|c| c as f64)).collect();
    // Per candidate, per layer, per expert: its slices.
    let sims: Vec<Vec<Vec<Vec<SimSlice>>>> = placements
        .iter()
        .map(|(p, _)| {
            (0..n_layer)
                .map(|layer| {
                    let (Some(Some(experts)), Some(cost)) =
                        (p.layers.get(layer), &model.routed[layer])
                    else {
                        return Vec::new();
                    };
                    experts
                        .iter()
                        .map(|slices| {
                            slices
                                .iter()
                                .map(|s| SimSlice {
                                    bytes: cost.slice_bytes(s.ff.clone()) as f64,
                                    core_seconds_per_token: cost
                                        .slice_core_seconds(s.ff.clone(), &config.kernel_rates),
                                    replicas: s.replicas.clone(),
                                })
                                .collect()
                        })
                        .collect()
                })
                .collect()
        })
        .collect();

    let n_cand = placements.len();
    let samples = config.samples.max(1);
    let mut step_sum = vec![0.0f64; n_cand];
    let mut step_sumsq = vec![0.0f64; n_cand];
    // Per candidate: per layer per node summed time; per node bytes, time, slowest.
    let mut layer_node_time = vec![vec![0.0f64; n_layer * n_nodes]; n_cand];
    let mut node_bytes = vec![vec![0.0f64; n_nodes]; n_cand];
    let mut node_time = vec![vec![0.0f64; n_nodes]; n_cand];
    let mut slowest = vec![vec![0.0f64; n_nodes]; n_cand];

    let mut counts = vec![0u32; model.n_expert()];
    let mut touched: Vec<usize> = Vec::new();
    let mut picked: Vec<usize> = Vec::with_capacity(routing.k());
    let mut bytes = vec![0.0f64; n_nodes];
    let mut core = vec![0.0f64; n_nodes];
    let mut time = vec![0.0f64; n_nodes];
    for s in 0..samples {
        let mut step = vec![0.0f64; n_cand];
        for &layer in &moe_layers {
            let mut rng = SplitMix64::new(mix64(
                config.seed ^ mix64(((s as u64) << 24) ^ layer as u64),
            ));
            touched.clear();
            for _ in 0..config.batch {
                routing.sample_token(layer, &mut rng, &mut picked);
                for &e in &picked {
                    if counts[e] == 0 {
                        touched.push(e);
                    }
                    counts[e] += 1;
                }
            }
            // Busiest experts first, for the least-loaded replica choice.
            touched.sort_unstable_by(|&a, &b| counts[b].cmp(&counts[a]).then(a.cmp(&b)));
            for (c, (_, rule)) in placements.iter().enumerate() {
                bytes.fill(0.0);
                core.fill(0.0);
                let experts = &sims[c][layer];
                let mut add = |node: usize, sl: &SimSlice, n_tok: u32, bytes: &mut [f64]| {
                    bytes[node] += sl.bytes;
                    core[node] += sl.core_seconds_per_token * n_tok as f64;
                };
                match rule {
                    ReplicaRule::ByLayer => {
                        for &e in &touched {
                            for sl in &experts[e] {
                                let node = sl.replicas[layer % sl.replicas.len()];
                                add(node, sl, counts[e], &mut bytes);
                            }
                        }
                    }
                    ReplicaRule::LeastLoaded => {
                        // Slices with one home first, then each replicated slice to
                        // the replica with the least read time so far.
                        for &e in &touched {
                            for sl in experts[e].iter().filter(|sl| sl.replicas.len() == 1) {
                                add(sl.replicas[0], sl, counts[e], &mut bytes);
                            }
                        }
                        for &e in &touched {
                            for sl in experts[e].iter().filter(|sl| sl.replicas.len() > 1) {
                                let node = sl
                                    .replicas
                                    .iter()
                                    .copied()
                                    .min_by(|&a, &b| {
                                        ((bytes[a] + sl.bytes) / bw[a])
                                            .total_cmp(&((bytes[b] + sl.bytes) / bw[b]))
                                    })
                                    .unwrap_or(sl.replicas[0]);
                                add(node, sl, counts[e], &mut bytes);
                            }
                        }
                    }
                }
                let mut max = 0.0f64;
                for i in 0..n_nodes {
                    let compute = cores[i].map_or(0.0, |c| core[i] / c);
                    time[i] = (bytes[i] / bw[i]).max(compute);
                    max = max.max(time[i]);
                    layer_node_time[c][layer * n_nodes + i] += time[i];
                    node_bytes[c][i] += bytes[i];
                    node_time[c][i] += time[i];
                }
                let tol = max * 1e-12;
                let n_slowest = time.iter().filter(|&&t| t >= max - tol).count();
                for i in 0..n_nodes {
                    if time[i] >= max - tol {
                        slowest[c][i] += 1.0 / n_slowest as f64;
                    }
                }
                step[c] += max;
            }
            for &e in &touched {
                counts[e] = 0;
            }
        }
        for c in 0..n_cand {
            step_sum[c] += step[c];
            step_sumsq[c] += step[c] * step[c];
        }
    }

    let dense_time_s = dense_time(model, config);
    let n = samples as f64;
    let n_layer_steps = (samples * moe_layers.len()).max(1) as f64;
    (0..n_cand)
        .map(|c| {
            let mean = step_sum[c] / n;
            let var = (step_sumsq[c] / n - mean * mean).max(0.0);
            let held = placements[c].0.held_bytes(model, n_nodes);
            let max_of_expected_s = moe_layers
                .iter()
                .map(|&l| {
                    (0..n_nodes)
                        .map(|i| layer_node_time[c][l * n_nodes + i] / n)
                        .fold(0.0, f64::max)
                })
                .sum();
            let nodes_out: Vec<NodePrediction> = (0..n_nodes)
                .map(|i| NodePrediction {
                    name: nodes[i].name.clone(),
                    held_bytes: held[i],
                    bytes_per_step: node_bytes[c][i] / n,
                    time_per_step_s: node_time[c][i] / n,
                    slowest_share: slowest[c][i] / n_layer_steps,
                })
                .collect();
            let bottleneck = (0..n_nodes)
                .max_by(|&a, &b| {
                    let key = |i: usize| (nodes_out[i].slowest_share, nodes_out[i].time_per_step_s);
                    key(a)
                        .0
                        .total_cmp(&key(b).0)
                        .then(key(a).1.total_cmp(&key(b).1))
                        .then(b.cmp(&a))
                })
                .unwrap_or(0);
            let rounds: usize = (moe_layers.iter())
                .map(|&l| {
                    if sliced_layer(&sims[c][l], &model.routed[l]) {
                        2
                    } else {
                        1
                    }
                })
                .sum();
            let round_trip_time_s = rounds as f64 * config.round_trip_s;
            let step_time_s = mean + dense_time_s + round_trip_time_s;
            Prediction {
                expert_time_s: mean,
                expert_time_stderr_s: (var / n).sqrt(),
                max_of_expected_s,
                dense_time_s,
                round_trip_time_s,
                step_time_s,
                tokens_per_s: config.batch as f64 / step_time_s.max(f64::MIN_POSITIVE),
                nodes: nodes_out,
                bottleneck,
            }
        })
        .collect()
}

/// Whether a layer has an expert cut into slices (computed in two rounds).
fn sliced_layer(experts: &[Vec<SimSlice>], cost: &Option<super::cost::ExpertCost>) -> bool {
    let whole = cost.as_ref().map_or(0.0, |c| c.expert_bytes() as f64);
    experts
        .iter()
        .any(|slices| slices.len() > 1 || slices.iter().any(|s| s.bytes < whole))
}

/// The coordinator's time per step for the dense part: read once per step,
/// computed once per token.
pub(super) fn dense_time(model: &ModelCost, config: &PlannerConfig) -> f64 {
    let read = model.dense_bytes as f64 / (config.coordinator_bandwidth_gbs * 1e9);
    let compute = config.coordinator_cores.map_or(0.0, |c| {
        model.dense_core_seconds * config.batch as f64 / c as f64
    });
    read.max(compute)
}
