//! The routed-expert seam of the forward pass: [`ExpertExecutor`] computes a MoE
//! layer's partial sums from quantized activations and routing decisions.
//! [`InprocExperts`] does it in this process over the mapped model file (single-
//! process mode); network transports implement the same trait.

use std::sync::Arc;

use shared::gguf::GgufFile;
use shared::models::{HParams, ModelError};
use shared::moe::{compute_experts, Assignment, ExpertLayer, ExpertTensor};
use shared::quant::dispatch::Kernels;
use shared::quant::matmul::Activations;
use shared::quant::GgmlType;

use super::EngineError;

/// Computes routed experts for the coordinator.
pub trait ExpertExecutor: Send + Sync {
    /// Writes Σ w·FFN_e(x) per token of MoE layer `layer` into `out`
    /// (`n_tokens × n_embd`). `inputs` are the tokens' normalized hidden rows,
    /// quantized to each type the layer's gate/up kernels consume.
    fn run(
        &self,
        layer: usize,
        inputs: &[Activations],
        assignments: &[Assignment],
        out: &mut [f32],
    ) -> Result<(), EngineError>;
}

/// Every routed expert of the model, computed in this process from the mapping.
pub struct InprocExperts {
    file: Arc<GgufFile>,
    kernels: &'static Kernels,
    /// Per layer: (gate, up, down) tensor names, or `None` for dense layers.
    layers: Vec<Option<ExpertNames>>,
    n_embd: usize,
    n_ff: usize,
    n_expert: usize,
}

#[derive(Clone, Debug)]
struct ExpertNames {
    /// `Some` for a merged `ffn_gate_up_exps`.
    gate_up: Option<String>,
    gate: String,
    up: String,
    down: String,
}

impl InprocExperts {
    /// Checks that every MoE layer's expert tensors exist with the expected shapes.
    pub fn new(file: Arc<GgufFile>, hp: &HParams) -> Result<InprocExperts, EngineError> {
        let mut me = InprocExperts {
            file,
            kernels: Kernels::get(),
            layers: Vec::with_capacity(hp.n_layer),
            n_embd: hp.n_embd,
            n_ff: hp.n_ff_exp,
            n_expert: hp.n_expert,
        };
        for il in 0..hp.n_layer {
            let names = hp.is_moe_layer(il).then(|| expert_names(&me.file, il));
            if let Some(names) = &names {
                me.layer_view(names)?.validate()?;
            }
            me.layers.push(names);
        }
        Ok(me)
    }

    fn tensor(
        &self,
        name: &str,
        n_cols: usize,
        n_rows: usize,
    ) -> Result<ExpertTensor<'_>, EngineError> {
        let info = self
            .file
            .tensor(name)
            .ok_or_else(|| ModelError::MissingTensor(name.to_owned()))?;
        let expected = [n_cols as u64, n_rows as u64, self.n_expert as u64];
        if info.ne.as_slice() != expected {
            return Err(ModelError::BadShape {
                name: name.to_owned(),
                found: info.ne.clone(),
                expected: expected.to_vec(),
            }
            .into());
        }
        Ok(ExpertTensor::new(
            info.ty,
            n_cols,
            n_rows,
            self.n_expert,
            self.file.tensor_data(info),
        )?)
    }

    fn layer_view(&self, names: &ExpertNames) -> Result<ExpertLayer<'_>, EngineError> {
        let (gate, up) = match &names.gate_up {
            Some(merged) => {
                let t = self.tensor(merged, self.n_embd, 2 * self.n_ff)?;
                (t.rows(0, self.n_ff)?, t.rows(self.n_ff, self.n_ff)?)
            }
            None => (
                self.tensor(&names.gate, self.n_embd, self.n_ff)?,
                self.tensor(&names.up, self.n_embd, self.n_ff)?,
            ),
        };
        let down = self.tensor(&names.down, self.n_ff, self.n_embd)?;
        Ok(ExpertLayer { gate, up, down })
    }
}

impl ExpertExecutor for InprocExperts {
    fn run(
        &self,
        layer: usize,
        inputs: &[Activations],
        assignments: &[Assignment],
        out: &mut [f32],
    ) -> Result<(), EngineError> {
        let names = self
            .layers
            .get(layer)
            .and_then(Option::as_ref)
            .ok_or_else(|| EngineError::Node(format!("layer {layer} has no routed experts")))?;
        let view = self.layer_view(names)?;
        compute_experts(self.kernels, &view, inputs, assignments, out)?;
        Ok(())
    }
}

fn expert_names(file: &GgufFile, il: usize) -> ExpertNames {
    let n = |s: &str| format!("blk.{il}.{s}.weight");
    let merged = n("ffn_gate_up_exps");
    ExpertNames {
        gate_up: file.tensor(&merged).is_some().then_some(merged),
        gate: n("ffn_gate_exps"),
        up: n("ffn_up_exps"),
        down: n("ffn_down_exps"),
    }
}

/// The quant types of layer `il`'s expert gate and up tensors.
pub(crate) fn expert_gate_up_types(
    file: &GgufFile,
    _hp: &HParams,
    il: usize,
) -> Result<(GgmlType, GgmlType), ModelError> {
    let names = expert_names(file, il);
    let ty = |name: &str| {
        file.tensor(name)
            .map(|t| t.ty)
            .ok_or_else(|| ModelError::MissingTensor(name.to_owned()))
    };
    match &names.gate_up {
        Some(m) => {
            let t = ty(m)?;
            Ok((t, t))
        }
        None => Ok((ty(&names.gate)?, ty(&names.up)?)),
    }
}
