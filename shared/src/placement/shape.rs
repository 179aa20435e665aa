//! [`ModelShape`]: what a plan must cover, read from a model's tensor table —
//! per layer, the intermediate size of its routed experts and of its dense FFN
//! or shared expert, and the block size cuts must respect.
//!
//! [`FfnTensors`] finds the tensors behind one (layer, part), merged
//! `ffn_gate_up_exps` included; `split` reads slices through it.

use super::{Part, PlacementError};
use crate::gguf::{GgufFile, TensorInfo};
use crate::models::HParams;

/// What a plan must place: layers, experts, and per layer the FFN sizes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelShape {
    /// Layers run by the forward pass (MTP layers excluded).
    pub n_layer: usize,
    /// Routed experts per MoE layer (0 for a dense model).
    pub n_expert: usize,
    /// Invariant (from `from_gguf`): `n_layer` entries.
    pub layers: Vec<LayerShape>,
}

/// One layer's FFNs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LayerShape {
    /// The routed experts, on MoE layers.
    pub routed: Option<FfnShape>,
    /// The dense FFN (dense layers) or the shared expert (MoE layers); `None`
    /// when the layer has neither.
    pub dense: Option<FfnShape>,
}

impl LayerShape {
    /// The shape of `part`, if the layer has it.
    pub fn part(&self, part: Part) -> Option<FfnShape> {
        match part {
            Part::Routed => self.routed,
            Part::Dense => self.dense,
        }
    }
}

/// The intermediate dimension of one FFN.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FfnShape {
    /// The intermediate size (rows of gate and up, columns of down).
    pub n_ff: usize,
    /// `ffn_down`'s block size in elements (256 for K-quants, 32 for the legacy
    /// quants, 1 for float types): cuts of the `ff` range fall on multiples of it.
    pub block: usize,
}

impl ModelShape {
    /// Reads the shape from `file`'s hyperparameters and FFN tensors, checking
    /// that gate, up and down agree with each other.
    pub fn from_gguf(file: &GgufFile) -> Result<ModelShape, PlacementError> {
        let hp = HParams::from_gguf(file)?;
        let n_expert = hp.n_expert;
        if n_expert > u32::MAX as usize || hp.n_layer > u32::MAX as usize {
            return Err(PlacementError::Shape(format!(
                "{} layers of {n_expert} experts do not fit the u32 ids of split files",
                hp.n_layer
            )));
        }
        let mut layers = Vec::with_capacity(hp.n_layer);
        for layer in 0..hp.n_layer {
            let routed = if hp.is_moe_layer(layer) {
                let tensors =
                    FfnTensors::find(file, &hp, layer, Part::Routed)?.ok_or_else(|| {
                        PlacementError::Shape(format!(
                        "layer {layer} is a MoE layer but has no blk.{layer}.ffn_down_exps.weight"
                    ))
                    })?;
                Some(tensors.shape())
            } else {
                None
            };
            let dense = FfnTensors::find(file, &hp, layer, Part::Dense)?.map(|t| t.shape());
            layers.push(LayerShape { routed, dense });
        }
        Ok(ModelShape {
            n_layer: hp.n_layer,
            n_expert,
            layers,
        })
    }

    /// The shape of `part` of layer `layer`, if the layer exists and has it.
    pub fn part(&self, layer: usize, part: Part) -> Option<FfnShape> {
        self.layers.get(layer).and_then(|l| l.part(part))
    }

    /// The number of experts `part` has per layer (1 for the dense part).
    pub fn n_experts_of(&self, part: Part) -> usize {
        match part {
            Part::Routed => self.n_expert,
            Part::Dense => 1,
        }
    }
}

/// One of gate or up: a tensor and where this matrix's rows start within each
/// expert (non-zero for the up half of a merged `ffn_gate_up_exps`).
#[derive(Clone, Copy, Debug)]
pub struct RowSource<'a> {
    pub info: &'a TensorInfo,
    /// Rows of `info` per expert (`n_ff`, or `2 * n_ff` when merged).
    pub rows_per_expert: usize,
    /// The first row of this matrix within an expert.
    pub first_row: usize,
}

/// The tensors of one (layer, part), shapes checked.
#[derive(Clone, Copy, Debug)]
pub struct FfnTensors<'a> {
    pub gate: RowSource<'a>,
    pub up: RowSource<'a>,
    /// `[n_ff, n_embd]` or `[n_ff, n_embd, n_expert]`.
    pub down: &'a TensorInfo,
    pub n_embd: usize,
    pub n_ff: usize,
}

impl<'a> FfnTensors<'a> {
    /// The tensors of `part` of layer `layer`: `None` when the layer has none of
    /// them, an error when some are missing or their shapes disagree.
    pub fn find(
        file: &'a GgufFile,
        hp: &HParams,
        layer: usize,
        part: Part,
    ) -> Result<Option<FfnTensors<'a>>, PlacementError> {
        let name = |s: &str| format!("blk.{layer}.{s}.weight");
        let (suffix, n_expert) = match part {
            Part::Routed => ("_exps", hp.n_expert),
            Part::Dense if hp.is_moe_layer(layer) => ("_shexp", 1),
            Part::Dense => ("", 1),
        };
        let gate_name = name(&format!("ffn_gate{suffix}"));
        let up_name = name(&format!("ffn_up{suffix}"));
        let down_name = name(&format!("ffn_down{suffix}"));
        let merged_name = (part == Part::Routed).then(|| name("ffn_gate_up_exps"));
        let merged = merged_name.as_deref().and_then(|n| file.tensor(n));
        let gate = file.tensor(&gate_name);
        let up = file.tensor(&up_name);
        let Some(down) = file.tensor(&down_name) else {
            if gate.is_some() || up.is_some() || merged.is_some() {
                return Err(PlacementError::Shape(format!("{down_name} is missing")));
            }
            return Ok(None);
        };
        let bad_shape = |info: &TensorInfo, expected: Vec<u64>| {
            PlacementError::Shape(format!(
                "{} has shape {:?}, expected {expected:?}",
                info.name, info.ne
            ))
        };
        let with_experts = |mut ne: Vec<u64>| {
            if part == Part::Routed {
                ne.push(n_expert as u64);
            }
            ne
        };
        // down is [n_ff, n_embd(, n_expert)]: it gives n_ff and n_embd.
        let expected_dims = if part == Part::Routed { 3 } else { 2 };
        if down.ne.len() != expected_dims {
            return Err(PlacementError::Shape(format!(
                "{} has {} dimensions {:?}, expected {expected_dims}",
                down.name,
                down.ne.len(),
                down.ne
            )));
        }
        let n_ff = down.ne[0];
        let n_embd = down.ne[1];
        if n_ff == 0 || n_ff > u32::MAX as u64 {
            return Err(PlacementError::Shape(format!(
                "{} has an intermediate size of {n_ff} (ne[0]), outside 1..=2^32-1",
                down.name
            )));
        }
        let expected = with_experts(vec![n_ff, hp.n_embd as u64]);
        if down.ne != expected {
            return Err(bad_shape(down, expected));
        }
        let (n_ff, n_embd) = (n_ff as usize, n_embd as usize);
        let (gate, up) = match (merged, gate, up) {
            (Some(merged), None, None) => {
                let expected = with_experts(vec![n_embd as u64, 2 * n_ff as u64]);
                if merged.ne != expected {
                    return Err(bad_shape(merged, expected));
                }
                let half = |first_row| RowSource {
                    info: merged,
                    rows_per_expert: 2 * n_ff,
                    first_row,
                };
                (half(0), half(n_ff))
            }
            (None, Some(gate), Some(up)) => {
                let expected = with_experts(vec![n_embd as u64, n_ff as u64]);
                for t in [gate, up] {
                    if t.ne != expected {
                        return Err(bad_shape(t, expected));
                    }
                }
                let whole = |info| RowSource {
                    info,
                    rows_per_expert: n_ff,
                    first_row: 0,
                };
                (whole(gate), whole(up))
            }
            (Some(_), _, _) => {
                return Err(PlacementError::Shape(format!(
                    "layer {layer} has both a merged ffn_gate_up_exps and separate gate/up tensors"
                )))
            }
            (None, None, _) => {
                return Err(PlacementError::Shape(format!("{gate_name} is missing")))
            }
            (None, Some(_), None) => {
                return Err(PlacementError::Shape(format!("{up_name} is missing")))
            }
        };
        Ok(Some(FfnTensors {
            gate,
            up,
            down,
            n_embd,
            n_ff,
        }))
    }

    pub(super) fn shape(&self) -> FfnShape {
        FfnShape {
            n_ff: self.n_ff,
            block: self.down.ty.block_elems(),
        }
    }
}
