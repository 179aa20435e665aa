//! [`Plan::resolve`]: a plan checked against a model's shape, and the
//! [`ResolvedPlan`] lookups the coordinator, the nodes and `split` use.
//!
//! The checks, in order: the plan on its own ([`Plan::validate`]); per entry,
//! layers, parts and experts the model has (bounds are checked before anything
//! is expanded, so `layers = "0-4000000000"` is an error, not a long loop), row
//! ranges inside `n_ff` and cut on `ffn_down` block boundaries; then per
//! (layer, part, expert), slices that tile `[0, n_ff)` — two entries with the
//! same rows are replicas of one slice, different rows that intersect overlap —
//! every routed expert of every MoE layer placed, and each dense part either
//! wholly absent (the coordinator computes it) or wholly tiled.

use std::ops::Range;

use super::{FfnShape, ModelShape, Part, PlacementError, Plan, SliceRef};

/// A slice of one (layer, part, expert) and the nodes holding it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlacedSlice {
    /// Rows of the intermediate dimension.
    pub ff: Range<usize>,
    /// Indices into [`ResolvedPlan::nodes`], in the order the plan lists them.
    /// Invariant: non-empty, distinct.
    pub replicas: Vec<usize>,
}

/// One slice as a node holds it (and as split files list it).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SliceSpec {
    /// The layer.
    pub layer: u32,
    /// Routed experts or the dense part.
    pub part: Part,
    /// The expert (0 for the dense part).
    pub expert: u32,
    /// First row of the intermediate dimension.
    pub ff_start: u32,
    /// Number of rows.
    pub ff_len: u32,
}

impl SliceSpec {
    /// Rows `ff_start..ff_start + ff_len`.
    pub fn ff(&self) -> Range<usize> {
        self.ff_start as usize..self.ff_start as usize + self.ff_len as usize
    }
}

/// A plan checked against a model shape: every routed expert tiled exactly,
/// dense parts tiled or left to the coordinator.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResolvedPlan {
    nodes: Vec<String>,
    model_identity: Option<[u8; 32]>,
    shape: ModelShape,
    /// Invariant: one per layer of `shape`.
    layers: Vec<ResolvedLayer>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct ResolvedLayer {
    /// Per expert, its slices in row order; empty on layers without routed experts.
    /// Invariant: each non-empty list tiles `[0, n_ff)`.
    routed: Vec<Vec<PlacedSlice>>,
    /// `None` when the dense part is absent or left to the coordinator.
    dense: Option<Vec<PlacedSlice>>,
}

/// A slice while resolving: its rows, the entry that placed it first, its nodes.
struct Pending {
    ff: Range<usize>,
    entry: usize,
    /// (node index, entry that put it there)
    replicas: Vec<(usize, usize)>,
}

impl Plan {
    /// Checks the plan against `shape` (see the module doc) and indexes it.
    pub fn resolve(&self, shape: &ModelShape) -> Result<ResolvedPlan, PlacementError> {
        self.validate()?;
        if shape.layers.len() != shape.n_layer {
            return Err(PlacementError::Shape(format!(
                "the model shape has {} layer entries for {} layers",
                shape.layers.len(),
                shape.n_layer
            )));
        }
        let too_large = shape.n_layer > u32::MAX as usize
            || shape.n_expert > u32::MAX as usize
            || shape.layers.iter().any(|l| {
                [l.routed, l.dense]
                    .iter()
                    .flatten()
                    .any(|f| f.n_ff > u32::MAX as usize)
            });
        if too_large {
            return Err(PlacementError::Shape(
                "layer, expert or row counts beyond u32 cannot be placed".to_string(),
            ));
        }
        // Per layer: per expert pending slices (routed), pending dense slices.
        let mut routed: Vec<Vec<Vec<Pending>>> = shape
            .layers
            .iter()
            .map(|l| {
                if l.routed.is_some() {
                    (0..shape.n_expert).map(|_| Vec::new()).collect()
                } else {
                    Vec::new()
                }
            })
            .collect();
        let mut dense: Vec<Vec<Pending>> = shape.layers.iter().map(|_| Vec::new()).collect();

        for (i, e) in self.entries.iter().enumerate() {
            let entry = i + 1;
            let node_ids: Vec<usize> = e
                .nodes
                .iter()
                .map(|n| self.nodes.iter().position(|m| m == n).unwrap_or(usize::MAX))
                .collect();
            // Bounds first, so huge id lists fail before being expanded.
            if e.layers.max() >= shape.n_layer {
                let layer = e
                    .layers
                    .iter()
                    .find(|&l| l >= shape.n_layer)
                    .unwrap_or(e.layers.max());
                return Err(PlacementError::LayerOutOfRange {
                    entry,
                    layer,
                    n_layer: shape.n_layer,
                });
            }
            let n_experts = shape.n_experts_of(e.part);
            if e.experts.max() >= n_experts {
                let expert = e
                    .experts
                    .iter()
                    .find(|&x| x >= n_experts)
                    .unwrap_or(e.experts.max());
                return Err(PlacementError::ExpertOutOfRange {
                    entry,
                    expert,
                    n_expert: n_experts,
                });
            }
            for layer in e.layers.iter() {
                let Some(ffn) = shape.layers[layer].part(e.part) else {
                    return Err(PlacementError::NoSuchPart {
                        entry,
                        layer,
                        part: e.part,
                    });
                };
                let ff = e.ff.clone().unwrap_or(0..ffn.n_ff);
                check_rows(
                    entry,
                    SliceRef {
                        layer,
                        part: e.part,
                        expert: e.experts.min(),
                    },
                    &ff,
                    ffn,
                )?;
                for expert in e.experts.iter() {
                    let list = match e.part {
                        Part::Routed => &mut routed[layer][expert],
                        Part::Dense => &mut dense[layer],
                    };
                    let slice = SliceRef {
                        layer,
                        part: e.part,
                        expert,
                    };
                    add_slice(list, entry, slice, ff.clone(), &node_ids, &self.nodes)?;
                }
            }
        }

        let mut layers = Vec::with_capacity(shape.n_layer);
        for (layer, (routed, dense)) in routed.into_iter().zip(dense).enumerate() {
            let ls = &shape.layers[layer];
            let mut routed_out = Vec::with_capacity(routed.len());
            for (expert, pending) in routed.into_iter().enumerate() {
                let slice = SliceRef {
                    layer,
                    part: Part::Routed,
                    expert,
                };
                let n_ff = ls.routed.map_or(0, |r| r.n_ff);
                if pending.is_empty() {
                    return Err(PlacementError::NotPlaced { slice });
                }
                routed_out.push(finish(slice, pending, n_ff)?);
            }
            let dense_out = if dense.is_empty() {
                None
            } else {
                let slice = SliceRef {
                    layer,
                    part: Part::Dense,
                    expert: 0,
                };
                let n_ff = ls.dense.map_or(0, |d| d.n_ff);
                Some(finish(slice, dense, n_ff)?)
            };
            layers.push(ResolvedLayer {
                routed: routed_out,
                dense: dense_out,
            });
        }
        Ok(ResolvedPlan {
            nodes: self.nodes.clone(),
            model_identity: self.model_identity,
            shape: shape.clone(),
            layers,
        })
    }
}

/// Checks that rows `ff` lie in `[0, n_ff)` and are cut on block boundaries
/// (the end may also be `n_ff`).
fn check_rows(
    entry: usize,
    slice: SliceRef,
    ff: &Range<usize>,
    ffn: FfnShape,
) -> Result<(), PlacementError> {
    if ff.end > ffn.n_ff {
        return Err(PlacementError::FfOutOfRange {
            entry,
            slice,
            ff: ff.clone(),
            n_ff: ffn.n_ff,
        });
    }
    let block = ffn.block.max(1);
    let unaligned = if !ff.start.is_multiple_of(block) {
        Some(ff.start)
    } else if !ff.end.is_multiple_of(block) && ff.end != ffn.n_ff {
        Some(ff.end)
    } else {
        None
    };
    match unaligned {
        Some(cut) => Err(PlacementError::UnalignedCut {
            entry,
            slice,
            ff: ff.clone(),
            cut,
            block,
        }),
        None => Ok(()),
    }
}

/// Adds rows `ff` on nodes `node_ids` from entry `entry` to one expert's list:
/// equal rows become more replicas, intersecting rows are an overlap.
fn add_slice(
    list: &mut Vec<Pending>,
    entry: usize,
    slice: SliceRef,
    ff: Range<usize>,
    node_ids: &[usize],
    names: &[String],
) -> Result<(), PlacementError> {
    if let Some(existing) = list.iter_mut().find(|p| p.ff == ff) {
        for &node in node_ids {
            if let Some(&(_, other_entry)) = existing.replicas.iter().find(|r| r.0 == node) {
                return Err(PlacementError::DuplicateReplica {
                    entry,
                    slice,
                    ff,
                    node: names.get(node).cloned().unwrap_or_default(),
                    other_entry,
                });
            }
            existing.replicas.push((node, entry));
        }
        return Ok(());
    }
    if let Some(other) = list
        .iter()
        .find(|p| p.ff.start < ff.end && ff.start < p.ff.end)
    {
        return Err(PlacementError::Overlap {
            entry,
            slice,
            ff,
            other_entry: other.entry,
            other_ff: other.ff.clone(),
        });
    }
    list.push(Pending {
        ff,
        entry,
        replicas: node_ids.iter().map(|&n| (n, entry)).collect(),
    });
    Ok(())
}

/// Sorts one expert's slices and checks that they tile `[0, n_ff)`.
fn finish(
    slice: SliceRef,
    mut pending: Vec<Pending>,
    n_ff: usize,
) -> Result<Vec<PlacedSlice>, PlacementError> {
    pending.sort_by_key(|p| p.ff.start);
    let mut next = 0;
    for p in &pending {
        // Overlaps were refused while adding, so a difference is a gap.
        if p.ff.start > next {
            return Err(PlacementError::Gap {
                slice,
                missing: next..p.ff.start,
            });
        }
        next = p.ff.end;
    }
    if next < n_ff {
        return Err(PlacementError::Gap {
            slice,
            missing: next..n_ff,
        });
    }
    Ok(pending
        .into_iter()
        .map(|p| PlacedSlice {
            ff: p.ff,
            replicas: p.replicas.into_iter().map(|(n, _)| n).collect(),
        })
        .collect())
}

impl ResolvedPlan {
    /// The plan's nodes, in the order partial sums are added.
    pub fn nodes(&self) -> &[String] {
        &self.nodes
    }

    /// The index of node `name`.
    pub fn node_index(&self, name: &str) -> Option<usize> {
        self.nodes.iter().position(|n| n == name)
    }

    /// The model identity the plan names, if any.
    pub fn model_identity(&self) -> Option<[u8; 32]> {
        self.model_identity
    }

    /// The shape the plan was resolved against.
    pub fn shape(&self) -> &ModelShape {
        &self.shape
    }

    /// The slices of (layer, part, expert) in row order, each with its
    /// replicas, or `None` when not placed: a dense part kept by the
    /// coordinator, or a layer, part or expert the model does not have.
    pub fn slices(&self, layer: usize, part: Part, expert: usize) -> Option<&[PlacedSlice]> {
        let l = self.layers.get(layer)?;
        match part {
            Part::Routed => l.routed.get(expert).map(Vec::as_slice),
            Part::Dense => (expert == 0).then_some(l.dense.as_deref()).flatten(),
        }
    }

    /// Everything node `node` (an index into [`ResolvedPlan::nodes`]) holds,
    /// sorted by (layer, part, expert, ff_start).
    pub fn node_slices(&self, node: usize) -> Vec<SliceSpec> {
        let mut out = Vec::new();
        let mut push = |layer: usize, part: Part, expert: usize, s: &PlacedSlice| {
            if s.replicas.contains(&node) {
                // Cannot truncate: resolve refused shapes beyond u32 and keeps
                // rows within n_ff.
                out.push(SliceSpec {
                    layer: layer as u32,
                    part,
                    expert: expert as u32,
                    ff_start: s.ff.start as u32,
                    ff_len: s.ff.len() as u32,
                });
            }
        };
        for (layer, l) in self.layers.iter().enumerate() {
            for (expert, slices) in l.routed.iter().enumerate() {
                for s in slices {
                    push(layer, Part::Routed, expert, s);
                }
            }
            for s in l.dense.iter().flatten() {
                push(layer, Part::Dense, 0, s);
            }
        }
        out
    }
}
