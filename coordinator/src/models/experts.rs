//! The routed-expert seam of the forward pass: [`ExpertExecutor`] computes a MoE
//! layer's partial sums from quantized activations and routing decisions.
//! [`InprocExperts`] does it in this process over the mapped model file (single-
//! process mode); network transports implement the same trait.

use std::sync::Arc;

use shared::gguf::GgufFile;
use shared::models::{HParams, ModelError};
use shared::moe::{compute_routed_segments, Assignment, ExpertLayer, ExpertTensor};
use shared::quant::dispatch::Kernels;
use shared::quant::matmul::{Activations, Segments};
use shared::quant::GgmlType;

use super::EngineError;

/// Computes routed experts (and, where a plan places them on nodes, dense FFN parts) for
/// the coordinator.
///
/// Work is started, then waited for, so the coordinator can compute its own part of the
/// layer (the shared expert) while nodes work on theirs.
/// What an executor over nodes reports for `/metrics` and `/health`.
#[derive(Clone, Debug)]
pub struct DispatchMetrics {
    /// Per node (plan order): the round trips of its answered dispatches.
    pub latency: Vec<(String, crate::histogram::HistogramSnapshot)>,
    /// Per node: the deadline its next one-token dispatch would get.
    pub decode_deadline: Vec<(String, std::time::Duration)>,
    /// Whether experts without a live replica are dropped instead of failing the step.
    pub degraded_mode: bool,
    /// (token, expert) assignments dropped so far in degraded mode.
    pub dropped_assignments: u64,
}

pub trait ExpertExecutor: Send + Sync {
    /// Starts Σ w·FFN_e(x) per token of MoE layer `layer`. `inputs` are the tokens'
    /// normalized hidden rows, quantized to each type the layer's gate/up kernels consume.
    /// `segments`: the runs of rows that belong to one sequence of a batched step (`None`:
    /// one sequence); each sequence's rows must come out as they would alone.
    fn start(
        &self,
        layer: usize,
        inputs: &[Activations],
        assignments: &[Assignment],
        segments: Segments<'_>,
    ) -> Result<Pending<'_>, EngineError>;

    /// Whether layer `layer`'s dense part (its dense FFN, or its shared expert) is computed
    /// by this executor rather than by the coordinator itself.
    fn places_dense(&self, _layer: usize) -> bool {
        false
    }

    /// Starts layer `layer`'s dense part for every token of `inputs` (quantized to the
    /// dense gate/up types); `down_type` is its down matrix's type, for which the joined
    /// hidden rows are quantized. Only called where [`ExpertExecutor::places_dense`] is true.
    fn start_dense(
        &self,
        layer: usize,
        _inputs: &[Activations],
        _down_type: GgmlType,
        _segments: Segments<'_>,
    ) -> Result<Pending<'_>, EngineError> {
        Err(EngineError::Node(format!(
            "layer {layer}'s dense part is not placed on expert nodes"
        )))
    }

    /// Each node's counters (name, stats or why they could not be had); empty when the
    /// experts run in this process.
    fn node_stats(&self) -> Vec<(String, Result<proto::wire::Stats, EngineError>)> {
        Vec::new()
    }

    /// Each node's name and whether it is up; empty when the experts run in this process.
    fn node_health(&self) -> Vec<(String, bool)> {
        Vec::new()
    }

    /// Whether every expert (and placed dense part) has a live node; why not otherwise.
    fn ready(&self) -> Result<(), String> {
        Ok(())
    }

    /// Dispatch latencies per node and degraded-mode counts; `None` when the experts run
    /// in this process.
    fn dispatch_metrics(&self) -> Option<DispatchMetrics> {
        None
    }

    /// Writes Σ w·FFN_e(x) per token of MoE layer `layer` into `out`
    /// (`n_tokens × n_embd`): [`ExpertExecutor::start`] then wait.
    fn run(
        &self,
        layer: usize,
        inputs: &[Activations],
        assignments: &[Assignment],
        out: &mut [f32],
    ) -> Result<(), EngineError> {
        self.start(layer, inputs, assignments, None)?.wait(out)
    }
}

/// Work started by an [`ExpertExecutor`]; [`Pending::wait`] writes its result.
pub struct Pending<'a>(Box<Finish<'a>>);

/// Writes a started computation's result once it is ready.
type Finish<'a> = dyn FnOnce(&mut [f32]) -> Result<(), EngineError> + Send + 'a;

impl<'a> Pending<'a> {
    /// Work whose result is written by `finish`.
    pub fn new(finish: impl FnOnce(&mut [f32]) -> Result<(), EngineError> + Send + 'a) -> Self {
        Pending(Box::new(finish))
    }

    /// Waits for the work and writes its result (`n_tokens × n_embd`) into `out`.
    pub fn wait(self, out: &mut [f32]) -> Result<(), EngineError> {
        (self.0)(out)
    }
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
    fn start(
        &self,
        layer: usize,
        inputs: &[Activations],
        assignments: &[Assignment],
        segments: Segments<'_>,
    ) -> Result<Pending<'_>, EngineError> {
        let names = self
            .layers
            .get(layer)
            .and_then(Option::as_ref)
            .ok_or_else(|| EngineError::Node(format!("layer {layer} has no routed experts")))?;
        let view = self.layer_view(names)?;
        let n_tokens = inputs.first().map_or(0, Activations::n_tokens);
        let mut result = vec![0.0f32; n_tokens * self.n_embd];
        view.validate()?;
        compute_routed_segments(
            self.kernels,
            &view,
            inputs,
            assignments,
            segments,
            &mut result,
        )?;
        Ok(Pending::new(move |out| {
            if out.len() != result.len() {
                return Err(EngineError::Node(format!(
                    "output of {} values for {} computed",
                    out.len(),
                    result.len()
                )));
            }
            out.copy_from_slice(&result);
            Ok(())
        }))
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
