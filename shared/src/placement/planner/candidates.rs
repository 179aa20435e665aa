//! The candidate placements: sliced, whole experts balanced by expected load
//! (optionally with EPLB-style replicas of hot experts), and round-robin; each
//! checked against the nodes' memory and turned into a [`Plan`].

use std::ops::Range;

use super::cost::ModelCost;
use super::{Mode, PlannerNode};
use crate::placement::{IdList, Part, PlacedSlice, Plan, PlanEntry, ResolvedPlan};

/// Where every routed expert slice of every MoE layer lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Placement {
    /// Per layer: `None` on layers without routed experts; otherwise per expert
    /// its slices in row order, each with its replicas (indices into the nodes)
    /// in the order the plan lists them — the coordinator serves layer `L` from
    /// `replicas[L % replicas.len()]`.
    pub layers: Vec<Option<Vec<Vec<PlacedSlice>>>>,
}

impl Placement {
    /// The routed slices of a resolved plan.
    pub fn from_resolved(plan: &ResolvedPlan) -> Placement {
        let shape = plan.shape();
        Placement {
            layers: (0..shape.n_layer)
                .map(|layer| {
                    shape.layers[layer].routed.map(|_| {
                        (0..shape.n_expert)
                            .map(|e| {
                                plan.slices(layer, Part::Routed, e)
                                    .map(<[PlacedSlice]>::to_vec)
                                    .unwrap_or_default()
                            })
                            .collect()
                    })
                })
                .collect(),
        }
    }

    /// Bytes each of `n_nodes` nodes holds.
    pub fn held_bytes(&self, model: &ModelCost, n_nodes: usize) -> Vec<u64> {
        let mut held = vec![0u64; n_nodes];
        for (layer, experts) in self.layers.iter().enumerate() {
            let (Some(experts), Some(cost)) = (experts, &model.routed[layer]) else {
                continue;
            };
            for slices in experts {
                for s in slices {
                    let b = cost.slice_bytes(s.ff.clone());
                    for &n in &s.replicas {
                        held[n] += b;
                    }
                }
            }
        }
        held
    }

    /// The plan file for this placement over `nodes`: one entry per (rows,
    /// replica list) and set of experts, layers with the same entries merged.
    pub fn to_plan(&self, model: &ModelCost, nodes: &[PlannerNode]) -> Plan {
        // (ff or None for all rows, replica list, experts) -> layers.
        type Key = (Option<Range<usize>>, Vec<usize>, Vec<usize>);
        // (ff or None, replica list) -> experts, within one layer.
        type LayerKey = (Option<Range<usize>>, Vec<usize>);
        let mut groups: Vec<(Key, Vec<usize>)> = Vec::new();
        for (layer, experts) in self.layers.iter().enumerate() {
            let (Some(experts), Some(cost)) = (experts, &model.routed[layer]) else {
                continue;
            };
            let mut per_layer: Vec<(LayerKey, Vec<usize>)> = Vec::new();
            for (expert, slices) in experts.iter().enumerate() {
                for s in slices {
                    let ff = (s.ff != (0..cost.n_ff)).then(|| s.ff.clone());
                    let key = (ff, s.replicas.clone());
                    match per_layer.iter_mut().find(|(k, _)| *k == key) {
                        Some((_, list)) => list.push(expert),
                        None => per_layer.push((key, vec![expert])),
                    }
                }
            }
            for ((ff, replicas), experts) in per_layer {
                let key = (ff, replicas, experts);
                match groups.iter_mut().find(|(k, _)| *k == key) {
                    Some((_, layers)) => layers.push(layer),
                    None => groups.push((key, vec![layer])),
                }
            }
        }
        let entries = groups
            .into_iter()
            .filter_map(|((ff, replicas, experts), layers)| {
                Some(PlanEntry {
                    part: Part::Routed,
                    layers: IdList::from_ids(layers)?,
                    experts: IdList::from_ids(experts)?,
                    ff,
                    nodes: replicas.iter().map(|&n| nodes[n].name.clone()).collect(),
                })
            })
            .collect();
        Plan {
            model_identity: model.model_identity,
            nodes: nodes.iter().map(|n| n.name.clone()).collect(),
            entries,
        }
    }
}

/// Why a candidate cannot be used: the node whose memory it overfills.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Overfull {
    /// The node (index).
    pub node: usize,
    /// What the candidate puts there.
    pub needed: u64,
    /// Its `memory_bytes`.
    pub memory: u64,
}

/// Checks held bytes against the nodes' memory.
pub(super) fn check_capacity(held: &[u64], nodes: &[PlannerNode]) -> Result<(), Overfull> {
    for (i, n) in nodes.iter().enumerate() {
        if let Some(memory) = n.memory_bytes {
            if held[i] > memory {
                return Err(Overfull {
                    node: i,
                    needed: held[i],
                    memory,
                });
            }
        }
    }
    Ok(())
}

/// Per MoE layer, per expert, the bytes a step is expected to read of it
/// (`bytes × P(at least one of the batch's tokens picks it)`).
pub(super) type ExpectedLoads = Vec<Option<Vec<f64>>>;

/// Every expert cut over all nodes at `ffn_down` block boundaries in proportion
/// to the nodes' rates; blocks that do not divide go, one each, to the nodes
/// furthest below their share of the layer's expected bytes so far, so the
/// larger share alternates across experts (and follows the hot ones).
pub(super) fn sliced(
    model: &ModelCost,
    nodes: &[PlannerNode],
    rates: &[f64],
    loads: &ExpectedLoads,
) -> Placement {
    let n_nodes = nodes.len();
    let total_rate: f64 = rates.iter().sum();
    let share: Vec<f64> = rates.iter().map(|r| r / total_rate).collect();
    let layers = model
        .routed
        .iter()
        .enumerate()
        .map(|(layer, cost)| {
            let cost = cost.as_ref()?;
            let load = loads[layer].as_ref()?;
            let block = cost.block().max(1);
            let n_blocks = cost.n_ff.div_ceil(block);
            let block_load = |e: usize| load[e] / n_blocks as f64;
            // Expected bytes given to each node in this layer so far, and in all.
            let mut given = vec![0.0f64; n_nodes];
            let mut total = 0.0f64;
            let experts = (0..model.n_expert())
                .map(|e| {
                    let mut blocks: Vec<usize> = share
                        .iter()
                        .map(|s| (s * n_blocks as f64).floor() as usize)
                        .collect();
                    let mut left = n_blocks - blocks.iter().sum::<usize>().min(n_blocks);
                    total += load[e];
                    while left > 0 {
                        // Largest deficit against the share of everything so far;
                        // ties rotate with the layer so no node always wins them.
                        let deficit = |i: usize| {
                            share[i] * total - given[i] - blocks[i] as f64 * block_load(e)
                        };
                        let pick = (0..n_nodes)
                            .map(|j| (j + layer) % n_nodes)
                            .fold(None, |best: Option<usize>, i| match best {
                                Some(b) if deficit(b) >= deficit(i) - 1e-12 * total.max(1.0) => {
                                    Some(b)
                                }
                                _ => Some(i),
                            })
                            .unwrap_or(0);
                        blocks[pick] += 1;
                        left -= 1;
                    }
                    let mut start_block = 0;
                    let mut slices = Vec::new();
                    for (i, &b) in blocks.iter().enumerate() {
                        given[i] += b as f64 * block_load(e);
                        if b == 0 {
                            continue;
                        }
                        let ff = (start_block * block).min(cost.n_ff)
                            ..((start_block + b) * block).min(cost.n_ff);
                        start_block += b;
                        slices.push(PlacedSlice {
                            ff,
                            replicas: vec![i],
                        });
                    }
                    slices
                })
                .collect();
            Some(experts)
        })
        .collect();
    Placement { layers }
}

/// Whole experts, expert `e` on node `e % N` in every layer.
pub(super) fn round_robin(model: &ModelCost, n_nodes: usize) -> Placement {
    Placement {
        layers: model
            .routed
            .iter()
            .map(|c| {
                let c = c.as_ref()?;
                Some(
                    (0..model.n_expert())
                        .map(|e| {
                            vec![PlacedSlice {
                                ff: 0..c.n_ff,
                                replicas: vec![e % n_nodes],
                            }]
                        })
                        .collect(),
                )
            })
            .collect(),
    }
}

/// Whole experts balanced by expected load, then (within `replicate_bytes`)
/// replicas of hot experts, the way DeepSeek's EPLB does it. Per layer the
/// heaviest expert goes to the node with the least expected time (load ÷ rate)
/// that has room. Then each spare replica goes to the expert with the highest
/// load per replica over all layers, on the least-loaded node (of that layer)
/// that has room and does not hold it yet. A replicated expert's list starts
/// so that `replicas[L % len]` — the one the coordinator serves layer `L` from
/// today — is the node the balancing chose.
pub(super) fn whole(
    model: &ModelCost,
    nodes: &[PlannerNode],
    rates: &[f64],
    loads: &ExpectedLoads,
    replicate_bytes: u64,
) -> Result<Placement, Overfull> {
    let n_nodes = nodes.len();
    let room = |i: usize, held: &[u64]| nodes[i].memory_bytes.map(|m| m.saturating_sub(held[i]));
    let fits = |i: usize, held: &[u64], b: u64| room(i, held).is_none_or(|r| r >= b);
    let mut held = vec![0u64; n_nodes];
    // Per layer: per expert its nodes (primary first), and per node its expected time.
    let mut homes: Vec<Option<Vec<Vec<usize>>>> = Vec::with_capacity(model.routed.len());
    let mut node_time: Vec<Vec<f64>> = Vec::with_capacity(model.routed.len());
    for (layer, cost) in model.routed.iter().enumerate() {
        let (Some(cost), Some(load)) = (cost, &loads[layer]) else {
            homes.push(None);
            node_time.push(vec![0.0; n_nodes]);
            continue;
        };
        let bytes = cost.expert_bytes();
        let mut order: Vec<usize> = (0..model.n_expert()).collect();
        order.sort_by(|&a, &b| load[b].total_cmp(&load[a]).then(a.cmp(&b)));
        let mut time = vec![0.0f64; n_nodes];
        let mut home = vec![Vec::new(); model.n_expert()];
        for e in order {
            let pick = (0..n_nodes)
                .filter(|&i| fits(i, &held, bytes))
                .min_by(|&a, &b| time[a].total_cmp(&time[b]).then(a.cmp(&b)));
            let Some(i) = pick else {
                // Nowhere to put it: report the node with the most room.
                let i = (0..n_nodes)
                    .max_by_key(|&i| room(i, &held).unwrap_or(u64::MAX))
                    .unwrap_or(0);
                return Err(Overfull {
                    node: i,
                    needed: held[i] + bytes,
                    memory: nodes[i].memory_bytes.unwrap_or(0),
                });
            };
            held[i] += bytes;
            time[i] += load[e] / rates[i];
            home[e].push(i);
        }
        homes.push(Some(home));
        node_time.push(time);
    }

    // Replicas: each to the expert with the highest load per replica.
    let mut budget = replicate_bytes;
    if budget > 0 {
        let mut candidates: Vec<(usize, usize)> = Vec::new();
        for (layer, h) in homes.iter().enumerate() {
            if h.is_some() {
                candidates.extend((0..model.n_expert()).map(|e| (layer, e)));
            }
        }
        let mut closed = vec![false; candidates.len()];
        loop {
            let best = candidates
                .iter()
                .enumerate()
                .filter(|(c, _)| !closed[*c])
                .map(|(c, &(layer, e))| {
                    let load = loads[layer].as_ref().map_or(0.0, |l| l[e]);
                    let n = homes[layer].as_ref().map_or(1, |h| h[e].len());
                    (c, load / n as f64)
                })
                .max_by(|a, b| a.1.total_cmp(&b.1).then(b.0.cmp(&a.0)));
            let Some((c, per_replica)) = best else { break };
            if per_replica <= 0.0 {
                break;
            }
            let (layer, e) = candidates[c];
            let Some(cost) = &model.routed[layer] else {
                closed[c] = true;
                continue;
            };
            let bytes = cost.expert_bytes();
            let Some(home) = homes[layer].as_mut() else {
                closed[c] = true;
                continue;
            };
            let time = &mut node_time[layer];
            let pick = (0..n_nodes)
                .filter(|&i| !home[e].contains(&i) && fits(i, &held, bytes))
                .min_by(|&a, &b| time[a].total_cmp(&time[b]).then(a.cmp(&b)));
            match pick {
                Some(i) if bytes <= budget => {
                    // The expert's load is now shared by one more replica.
                    let load = loads[layer].as_ref().map_or(0.0, |l| l[e]);
                    let n = home[e].len() as f64;
                    for &j in &home[e] {
                        time[j] -= load / n / rates[j] - load / (n + 1.0) / rates[j];
                    }
                    time[i] += load / (n + 1.0) / rates[i];
                    home[e].push(i);
                    held[i] += bytes;
                    budget -= bytes;
                }
                _ => closed[c] = true,
            }
        }
    }

    let layers = homes
        .into_iter()
        .enumerate()
        .map(|(layer, h)| {
            let cost = model.routed[layer].as_ref()?;
            Some(
                h?.into_iter()
                    .map(|mut replicas| {
                        // Rotate so that replicas[layer % len] is the primary.
                        let len = replicas.len();
                        replicas.rotate_right(layer % len);
                        vec![PlacedSlice {
                            ff: 0..cost.n_ff,
                            replicas,
                        }]
                    })
                    .collect(),
            )
        })
        .collect();
    Ok(Placement { layers })
}

/// The label of a mode in summaries.
pub(super) fn mode_label(mode: Mode) -> &'static str {
    match mode {
        Mode::Sliced => "sliced",
        Mode::Whole => "whole experts",
        Mode::WholeReplicated => "whole experts + replicas",
        Mode::RoundRobin => "round-robin",
    }
}
