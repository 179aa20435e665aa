//! What a step costs: the bytes of every expert slice and of the coordinator's
//! dense part, read from the model's tensor table, and how fast a node gets
//! through them ([`KernelRates`], DESIGN.md "Performance model").
//!
//! A node reads an expert slice's weights once per step whatever the number of
//! tokens routed to it (the matmuls read each weight row once per batch), and
//! dequantizes-and-dots them once per token. So a slice costs `bytes` of reading
//! and `bytes × tokens / kernel rate` core-seconds of compute.

use std::ops::Range;

use serde::Serialize;

use super::PlannerError;
use crate::gguf::GgufFile;
use crate::models::HParams;
use crate::placement::{FfnShape, LayerShape, ModelShape};
use crate::quant::GgmlType;

/// How many weight bytes one core dequantizes-and-dots per second, per quant
/// family, in GB/s (10^9 bytes). The defaults are llama.cpp's one-thread decode
/// on the 2-core AVX2 development machine (DESIGN.md: 11.6 GB/s of Q4_K_M,
/// 13 GB/s of Q8_0); float weights are taken to run at read speed.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct KernelRates {
    /// Q2_K … Q6_K (and Q8_K).
    pub k_quant_gbs: f64,
    /// Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q8_1.
    pub legacy_gbs: f64,
    /// F32, F16, BF16.
    pub float_gbs: f64,
}

impl Default for KernelRates {
    fn default() -> KernelRates {
        KernelRates {
            k_quant_gbs: 11.6,
            legacy_gbs: 13.0,
            float_gbs: 20.0,
        }
    }
}

impl KernelRates {
    /// The same rate for every type.
    pub fn uniform(gbs: f64) -> KernelRates {
        KernelRates {
            k_quant_gbs: gbs,
            legacy_gbs: gbs,
            float_gbs: gbs,
        }
    }

    /// Bytes per second one core gets through for weights of type `ty`.
    pub fn bytes_per_s(&self, ty: GgmlType) -> f64 {
        let gbs = match ty {
            GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => self.float_gbs,
            GgmlType::Q4_0
            | GgmlType::Q4_1
            | GgmlType::Q5_0
            | GgmlType::Q5_1
            | GgmlType::Q8_0
            | GgmlType::Q8_1 => self.legacy_gbs,
            GgmlType::Q2_K
            | GgmlType::Q3_K
            | GgmlType::Q4_K
            | GgmlType::Q4_K_R8
            | GgmlType::Q5_K
            | GgmlType::Q6_K
            | GgmlType::Q8_K => self.k_quant_gbs,
        };
        gbs * 1e9
    }

    pub(super) fn check(&self) -> Result<(), PlannerError> {
        for (name, v) in [
            ("k-quant", self.k_quant_gbs),
            ("legacy", self.legacy_gbs),
            ("float", self.float_gbs),
        ] {
            if !(v.is_finite() && v > 0.0) {
                return Err(PlannerError::Config(format!(
                    "the {name} kernel rate {v} GB/s per core is not a positive number"
                )));
            }
        }
        Ok(())
    }
}

/// One layer's routed experts: the three matrices' types and sizes.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ExpertCost {
    /// The intermediate size (rows of gate and up, columns of down).
    pub n_ff: usize,
    /// The hidden size.
    pub n_embd: usize,
    /// `gate`'s type (the gate half's, for a merged `ffn_gate_up_exps`).
    pub gate: GgmlType,
    /// `up`'s type.
    pub up: GgmlType,
    /// `down`'s type; its block size is where slices are cut.
    pub down: GgmlType,
}

impl ExpertCost {
    /// `ffn_down`'s block size in elements.
    pub fn block(&self) -> usize {
        self.down.block_elems()
    }

    /// Bytes of rows `ff` of gate and up and the slice's share of down's rows
    /// ([`crate::placement::slice_down_rows`]).
    pub fn slice_bytes(&self, ff: Range<usize>) -> u64 {
        let rows = ff.len() as u64;
        let row = |ty: GgmlType, n: usize| (n / ty.block_elems() * ty.block_bytes()) as u64;
        let down_rows =
            crate::placement::slice_down_rows(ff.start, ff.len(), self.n_ff, self.n_embd);
        rows * (row(self.gate, self.n_embd) + row(self.up, self.n_embd))
            + down_rows.len() as u64 * row(self.down, self.n_ff)
    }

    /// Bytes of the whole expert.
    pub fn expert_bytes(&self) -> u64 {
        self.slice_bytes(0..self.n_ff)
    }

    /// Core-seconds to compute rows `ff` for one token at `rates`.
    pub fn slice_core_seconds(&self, ff: Range<usize>, rates: &KernelRates) -> f64 {
        let rows = ff.len() as f64;
        let row = |ty: GgmlType| (self.n_embd / ty.block_elems() * ty.block_bytes()) as f64;
        let down_rows =
            crate::placement::slice_down_rows(ff.start, ff.len(), self.n_ff, self.n_embd).len();
        let down = down_rows as f64
            * (self.n_ff / self.down.block_elems().max(1) * self.down.block_bytes()) as f64;
        rows * row(self.gate) / rates.bytes_per_s(self.gate)
            + rows * row(self.up) / rates.bytes_per_s(self.up)
            + down / rates.bytes_per_s(self.down)
    }
}

/// Per layer, what the planner places and what the coordinator keeps.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelCost {
    /// The model identity of the file it was read from, if any.
    pub model_identity: Option<[u8; 32]>,
    /// Experts each token is routed to.
    pub n_expert_used: usize,
    /// Per layer, its routed experts (`None` on dense layers).
    /// Invariant: `shape.n_layer` entries, `Some` exactly where `shape` has routed experts.
    pub routed: Vec<Option<ExpertCost>>,
    /// Bytes the coordinator reads per step: every tensor but the routed experts
    /// (attention, norms, routers, shared experts, dense FFNs, output head; the
    /// token embedding only when the output head is tied to it).
    pub dense_bytes: u64,
    /// Core-seconds the coordinator spends per token on them.
    pub dense_core_seconds: f64,
    /// The shape plans are resolved against.
    pub shape: ModelShape,
}

impl ModelCost {
    /// Reads the cost from a GGUF file's tensor table (no tensor data is touched).
    pub fn from_gguf(file: &GgufFile, rates: &KernelRates) -> Result<ModelCost, PlannerError> {
        let hp = HParams::from_gguf(file).map_err(crate::placement::PlacementError::from)?;
        let tensors = file
            .tensors()
            .iter()
            .map(|t| (t.name.as_str(), t.ty, t.ne.as_slice()));
        let mut cost = ModelCost::from_tensors(hp.n_layer, hp.n_expert_used, tensors, rates)?;
        let shape = ModelShape::from_gguf(file)?;
        if shape != cost.shape {
            return Err(PlannerError::Model(format!(
                "the tensor table's FFN shapes {:?} disagree with the hyperparameters' {:?}",
                cost.shape, shape
            )));
        }
        cost.model_identity = Some(crate::gguf::model_identity(file));
        Ok(cost)
    }

    /// The cost of a real model's shape (`shared::models::shapes`) at the types
    /// of `recipe`, without a file.
    pub fn from_model_shape(
        shape: &crate::models::shapes::ModelShape,
        recipe: &crate::models::shapes::TypeRecipe,
        rates: &KernelRates,
    ) -> Result<ModelCost, PlannerError> {
        let tensors = shape.tensors(recipe);
        ModelCost::from_tensors(
            shape.n_layer,
            shape.n_expert_used,
            tensors
                .iter()
                .map(|t| (t.name.as_str(), t.ty, t.ne.as_slice())),
            rates,
        )
    }

    /// The cost from a tensor table given as (name, type, `ne`), in llama.cpp's
    /// names. Layers from `n_layer` on (MTP layers) are not run and not counted.
    pub fn from_tensors<'a>(
        n_layer: usize,
        n_expert_used: usize,
        tensors: impl IntoIterator<Item = (&'a str, GgmlType, &'a [u64])>,
        rates: &KernelRates,
    ) -> Result<ModelCost, PlannerError> {
        let tensors: Vec<(&str, GgmlType, &[u64])> = tensors.into_iter().collect();
        let find = |name: &str| tensors.iter().find(|t| t.0 == name).copied();
        let bad = |why: String| PlannerError::Model(why);
        // Rows of whole blocks (a table that is not, like a shape's recipe applied to
        // a row too short for it, counts its last block whole).
        let bytes_of = |ty: GgmlType, ne: &[u64]| -> u64 {
            let rows: u64 = ne.iter().skip(1).product();
            let row = ne
                .first()
                .map_or(0, |&n| n.div_ceil(ty.block_elems() as u64));
            rows * row * ty.block_bytes() as u64
        };
        let tied_output = find("output.weight").is_none();
        let mut dense_bytes = 0u64;
        let mut dense_core_seconds = 0.0f64;
        for &(name, ty, ne) in &tensors {
            if name.contains("_exps") {
                continue;
            }
            if let Some(layer) = layer_of(name) {
                if layer >= n_layer {
                    continue;
                }
            }
            if name == "token_embd.weight" && !tied_output {
                // One row per token: nothing next to the rest.
                continue;
            }
            let b = bytes_of(ty, ne);
            dense_bytes += b;
            dense_core_seconds += b as f64 / rates.bytes_per_s(ty);
        }

        let mut n_expert: Option<usize> = None;
        let mut routed = Vec::with_capacity(n_layer);
        let mut layers = Vec::with_capacity(n_layer);
        for layer in 0..n_layer {
            let name = |s: &str| format!("blk.{layer}.{s}.weight");
            let down = find(&name("ffn_down_exps"));
            let expert = match down {
                None => None,
                Some((down_name, down_ty, down_ne)) => {
                    let [n_ff, n_embd, n_exp] = *down_ne else {
                        return Err(bad(format!(
                            "{down_name} has shape {down_ne:?}, expected [n_ff, n_embd, n_expert]"
                        )));
                    };
                    if n_ff == 0 || n_embd == 0 || n_exp == 0 {
                        return Err(bad(format!(
                            "{down_name} has an empty dimension: {down_ne:?}"
                        )));
                    }
                    match n_expert {
                        None => n_expert = Some(n_exp as usize),
                        Some(e) if e as u64 != n_exp => {
                            return Err(bad(format!(
                                "{down_name} has {n_exp} experts, earlier layers {e}"
                            )))
                        }
                        Some(_) => {}
                    }
                    let (gate_ty, up_ty) = match (
                        find(&name("ffn_gate_up_exps")),
                        find(&name("ffn_gate_exps")),
                        find(&name("ffn_up_exps")),
                    ) {
                        (Some((n, ty, ne)), None, None) => {
                            if ne != [n_embd, 2 * n_ff, n_exp] {
                                return Err(bad(format!("{n} has shape {ne:?}, expected [{n_embd}, {}, {n_exp}]", 2 * n_ff)));
                            }
                            (ty, ty)
                        }
                        (None, Some(g), Some(u)) => {
                            for (n, _, ne) in [g, u] {
                                if ne != [n_embd, n_ff, n_exp] {
                                    return Err(bad(format!(
                                        "{n} has shape {ne:?}, expected [{n_embd}, {n_ff}, {n_exp}]"
                                    )));
                                }
                            }
                            (g.1, u.1)
                        }
                        _ => {
                            return Err(bad(format!(
                                "layer {layer} has ffn_down_exps but not one of ffn_gate_up_exps or ffn_gate_exps + ffn_up_exps"
                            )))
                        }
                    };
                    let cost = ExpertCost {
                        n_ff: n_ff as usize,
                        n_embd: n_embd as usize,
                        gate: gate_ty,
                        up: up_ty,
                        down: down_ty,
                    };
                    for (ty, n) in [(gate_ty, n_embd), (up_ty, n_embd), (down_ty, n_ff)] {
                        if !n.is_multiple_of(ty.block_elems() as u64) {
                            return Err(bad(format!(
                                "layer {layer}: rows of {n} elements are not whole {ty} blocks"
                            )));
                        }
                    }
                    Some(cost)
                }
            };
            // A MoE layer's dense part is its shared expert; a dense layer's, its FFN.
            let dense_name = if expert.is_some() {
                "ffn_down_shexp"
            } else {
                "ffn_down"
            };
            let dense = find(&name(dense_name))
                .filter(|(_, _, ne)| ne.len() == 2)
                .map(|(_, ty, ne)| FfnShape {
                    n_ff: ne[0] as usize,
                    block: ty.block_elems(),
                });
            layers.push(LayerShape {
                routed: expert.map(|e| FfnShape {
                    n_ff: e.n_ff,
                    block: e.block(),
                }),
                dense,
            });
            routed.push(expert);
        }
        let n_expert = n_expert.unwrap_or(0);
        if n_expert > 0 && !(1..=n_expert).contains(&n_expert_used) {
            return Err(bad(format!(
                "{n_expert_used} experts used per token of {n_expert}"
            )));
        }
        Ok(ModelCost {
            model_identity: None,
            n_expert_used,
            routed,
            dense_bytes,
            dense_core_seconds,
            shape: ModelShape {
                n_layer,
                n_expert,
                layers,
            },
        })
    }

    /// Routed experts per MoE layer.
    pub fn n_expert(&self) -> usize {
        self.shape.n_expert
    }

    /// The MoE layers, ascending.
    pub fn moe_layers(&self) -> impl Iterator<Item = (usize, &ExpertCost)> + '_ {
        self.routed
            .iter()
            .enumerate()
            .filter_map(|(l, e)| e.as_ref().map(|e| (l, e)))
    }

    /// Bytes of every routed expert of every MoE layer.
    pub fn routed_bytes(&self) -> u64 {
        self.moe_layers()
            .map(|(_, e)| e.expert_bytes() * self.n_expert() as u64)
            .sum()
    }
}

/// The layer of a `blk.N.` tensor name.
fn layer_of(name: &str) -> Option<usize> {
    let rest = name.strip_prefix("blk.")?;
    rest.split('.').next()?.parse().ok()
}
