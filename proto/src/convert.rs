//! Conversions between the wire types and checked `shared`-side types.
//!
//! Wire → checked goes through `TryFrom` where a message can be judged on its own
//! ([`Hello`], [`HelloReply`], [`Inventory`], [`DispatchResponse`]) and through
//! [`DispatchRequest::from_wire`] where the judgement needs the model's shape and the
//! node's inventory ([`DispatchContext`]). Checked → wire is `From`, infallible.

use std::collections::HashSet;
use std::fmt::Write as _;

use shared::models::HParams;
use shared::moe::Assignment;
use shared::quant::matmul::Activations;
use shared::quant::GgmlType;

use crate::error::ProtoError;
use crate::limits::{
    MAX_DENSE_N_FF, MAX_DISPATCH_ASSIGNMENTS, MAX_DISPATCH_INPUTS, MAX_DISPATCH_TOKENS,
    MAX_DISPATCH_VALUES, MAX_ERROR_MESSAGE_BYTES, MAX_EXPERTS, MAX_INVENTORY_SLICES, MAX_LAYERS,
    MAX_NAME_BYTES, MAX_N_EMBD,
};
use crate::wire;
use crate::PROTOCOL_VERSION;

/// Length of a model identity (SHA-256, see `shared::gguf::model_identity`).
pub const MODEL_IDENTITY_BYTES: usize = 32;

fn hex(bytes: &[u8]) -> String {
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

fn check_version(got: u32) -> Result<(), ProtoError> {
    if got != PROTOCOL_VERSION {
        return Err(ProtoError::VersionMismatch {
            got,
            want: PROTOCOL_VERSION,
        });
    }
    Ok(())
}

fn identity(field: &'static str, bytes: &[u8]) -> Result<[u8; 32], ProtoError> {
    bytes.try_into().map_err(|_| ProtoError::BadLength {
        field,
        got: bytes.len(),
        want: MODEL_IDENTITY_BYTES,
    })
}

fn limit(field: &'static str, got: usize, max: usize) -> Result<(), ProtoError> {
    if got > max {
        return Err(ProtoError::OverLimit { field, got, max });
    }
    Ok(())
}

fn nonzero(field: &'static str, got: usize) -> Result<(), ProtoError> {
    if got == 0 {
        return Err(ProtoError::Zero { field, got });
    }
    Ok(())
}

/// Refuses a model identity other than `own`.
pub fn check_model(got: &[u8; 32], own: &[u8; 32]) -> Result<(), ProtoError> {
    if got != own {
        return Err(ProtoError::ModelMismatch {
            got: hex(got),
            want: hex(own),
        });
    }
    Ok(())
}

/// The coordinator's first message, checked: the version is ours and the identity has
/// the right length (whether it is the node's model is [`Hello::check_model`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hello {
    pub model_identity: [u8; 32],
    pub coordinator_name: String,
}

impl Hello {
    /// Refuses a coordinator that runs a model other than `own`.
    pub fn check_model(&self, own: &[u8; 32]) -> Result<(), ProtoError> {
        check_model(&self.model_identity, own)
    }
}

impl TryFrom<wire::Hello> for Hello {
    type Error = ProtoError;

    fn try_from(m: wire::Hello) -> Result<Self, ProtoError> {
        check_version(m.protocol_version)?;
        limit(
            "hello.coordinator_name bytes",
            m.coordinator_name.len(),
            MAX_NAME_BYTES,
        )?;
        Ok(Hello {
            model_identity: identity("hello.model_identity", &m.model_identity)?,
            coordinator_name: m.coordinator_name,
        })
    }
}

impl From<Hello> for wire::Hello {
    fn from(h: Hello) -> Self {
        wire::Hello {
            protocol_version: PROTOCOL_VERSION,
            model_identity: h.model_identity.to_vec(),
            coordinator_name: h.coordinator_name,
        }
    }
}

/// A node's answer to [`Hello`], checked.
#[derive(Clone, Debug, PartialEq)]
pub struct HelloReply {
    pub model_identity: [u8; 32],
    pub inventory: Inventory,
    /// Why the node refused the coordinator, if it did.
    pub error: Option<RemoteError>,
}

impl TryFrom<wire::HelloReply> for HelloReply {
    type Error = ProtoError;

    fn try_from(m: wire::HelloReply) -> Result<Self, ProtoError> {
        check_version(m.protocol_version)?;
        Ok(HelloReply {
            model_identity: identity("hello_reply.model_identity", &m.model_identity)?,
            inventory: m
                .inventory
                .ok_or(ProtoError::Missing {
                    field: "hello_reply.inventory",
                })?
                .try_into()?,
            error: m.error.map(RemoteError::try_from).transpose()?,
        })
    }
}

impl From<HelloReply> for wire::HelloReply {
    fn from(h: HelloReply) -> Self {
        wire::HelloReply {
            protocol_version: PROTOCOL_VERSION,
            model_identity: h.model_identity.to_vec(),
            inventory: Some(h.inventory.into()),
            error: h.error.map(Into::into),
        }
    }
}

/// The round of an FFN's computation a dispatch asks for (see `Stage` in moeshard.proto).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Stage {
    /// Routed experts held whole: each token's Σ weight·FFN in one round.
    #[default]
    OneRound,
    /// A split FFN's first round: the node's rows of gate and up and their SwiGLU (per
    /// token for a dense part, per assignment for routed slices).
    Hidden,
    /// Its second round: the node's rows of down, from whole hidden rows.
    Down,
}

impl Stage {
    fn from_wire(value: i32) -> Result<Stage, ProtoError> {
        match wire::Stage::try_from(value) {
            Ok(wire::Stage::OneRound) => Ok(Stage::OneRound),
            Ok(wire::Stage::Hidden) => Ok(Stage::Hidden),
            Ok(wire::Stage::Down) => Ok(Stage::Down),
            Err(_) => Err(ProtoError::UnknownEnum {
                field: "dispatch.stage",
                value,
            }),
        }
    }
}

impl From<Stage> for wire::Stage {
    fn from(s: Stage) -> Self {
        match s {
            Stage::OneRound => wire::Stage::OneRound,
            Stage::Hidden => wire::Stage::Hidden,
            Stage::Down => wire::Stage::Down,
        }
    }
}

/// Which feed-forward weights of a layer a slice or a dispatch is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FfnPart {
    /// The routed experts (`blk.L.ffn_{gate,up,down}_exps.weight`).
    Routed,
    /// The dense part: the dense FFN of a dense layer (`blk.L.ffn_{gate,up,down}.weight`)
    /// or the shared expert of a MoE layer (`blk.L.ffn_{gate,up,down}_shexp.weight`).
    Dense,
}

impl FfnPart {
    /// Reads a wire `FfnPart`; an unknown value is an error naming `field`.
    fn from_wire(field: &'static str, value: i32) -> Result<FfnPart, ProtoError> {
        match wire::FfnPart::try_from(value) {
            Ok(wire::FfnPart::Routed) => Ok(FfnPart::Routed),
            Ok(wire::FfnPart::Dense) => Ok(FfnPart::Dense),
            Err(_) => Err(ProtoError::UnknownEnum { field, value }),
        }
    }
}

impl From<FfnPart> for wire::FfnPart {
    fn from(p: FfnPart) -> Self {
        match p {
            FfnPart::Routed => wire::FfnPart::Routed,
            FfnPart::Dense => wire::FfnPart::Dense,
        }
    }
}

/// Rows `[ff_start, ff_start + ff_len)` of one expert's intermediate dimension, or of the
/// layer's dense part (`part` [`FfnPart::Dense`], `expert` 0). Field order makes the
/// derived `Ord` sort by layer, then part, then expert and rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ExpertSlice {
    pub layer: u32,
    pub part: FfnPart,
    pub expert: u32,
    pub ff_start: u32,
    pub ff_len: u32,
}

/// What a node serves, checked: a name, at most [`MAX_INVENTORY_SLICES`] non-empty
/// slices with ids under [`MAX_LAYERS`] / [`MAX_EXPERTS`], dense slices of expert 0, no
/// two of one expert (or of one layer's dense part) overlapping. Slices are kept sorted
/// by (layer, part, expert, ff_start).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Inventory {
    pub node_name: String,
    pub numa_node: Option<u32>,
    pub weight_bytes: u64,
    pub memory_bytes: u64,
    slices: Vec<ExpertSlice>,
}

impl Inventory {
    /// Checks and sorts `slices` (the same checks as for a received inventory).
    pub fn new(
        node_name: String,
        numa_node: Option<u32>,
        weight_bytes: u64,
        memory_bytes: u64,
        slices: Vec<ExpertSlice>,
    ) -> Result<Inventory, ProtoError> {
        limit("inventory.node_name bytes", node_name.len(), MAX_NAME_BYTES)?;
        nonzero("inventory.node_name bytes", node_name.len())?;
        limit("inventory.slices", slices.len(), MAX_INVENTORY_SLICES)?;
        for (index, s) in slices.iter().enumerate() {
            let bad = |detail: String| ProtoError::BadSlice {
                index,
                layer: s.layer,
                expert: s.expert,
                detail,
            };
            if s.layer as usize >= MAX_LAYERS || s.expert as usize >= MAX_EXPERTS {
                return Err(bad(format!(
                    "ids over the limits ({MAX_LAYERS} layers, {MAX_EXPERTS} experts)"
                )));
            }
            if s.part == FfnPart::Dense && s.expert != 0 {
                return Err(bad("a dense slice must have expert 0".into()));
            }
            if s.ff_len == 0 {
                return Err(bad("ff_len is 0".into()));
            }
            if s.ff_start.checked_add(s.ff_len).is_none() {
                return Err(bad(format!(
                    "ff_start {} + ff_len {} overflows",
                    s.ff_start, s.ff_len
                )));
            }
        }
        let mut slices = slices;
        slices.sort_unstable();
        for (index, w) in slices.windows(2).enumerate() {
            let (a, b) = (w[0], w[1]);
            if (a.layer, a.part, a.expert) == (b.layer, b.part, b.expert)
                && a.ff_start + a.ff_len > b.ff_start
            {
                return Err(ProtoError::BadSlice {
                    index: index + 1,
                    layer: b.layer,
                    expert: b.expert,
                    detail: format!(
                        "rows {}..{} overlap rows {}..{}",
                        b.ff_start,
                        b.ff_start + b.ff_len,
                        a.ff_start,
                        a.ff_start + a.ff_len
                    ),
                });
            }
        }
        Ok(Inventory {
            node_name,
            numa_node,
            weight_bytes,
            memory_bytes,
            slices,
        })
    }

    /// The slices, sorted by (layer, part, expert, ff_start).
    pub fn slices(&self) -> &[ExpertSlice] {
        &self.slices
    }

    /// Whether the node holds any rows of `expert` of `layer`'s `part` (for
    /// [`FfnPart::Dense`], `expert` is 0).
    pub fn serves(&self, part: FfnPart, layer: u32, expert: u32) -> bool {
        let key = (layer, part, expert);
        let i = self
            .slices
            .partition_point(|s| (s.layer, s.part, s.expert) < key);
        self.slices
            .get(i)
            .is_some_and(|s| (s.layer, s.part, s.expert) == key)
    }
}

impl TryFrom<wire::NodeInventory> for Inventory {
    type Error = ProtoError;

    fn try_from(m: wire::NodeInventory) -> Result<Self, ProtoError> {
        let slices = m
            .slices
            .iter()
            .map(|s| {
                Ok(ExpertSlice {
                    layer: s.layer,
                    part: FfnPart::from_wire("inventory.slices.part", s.part)?,
                    expert: s.expert,
                    ff_start: s.ff_start,
                    ff_len: s.ff_len,
                })
            })
            .collect::<Result<_, ProtoError>>()?;
        Inventory::new(
            m.node_name,
            m.numa_node,
            m.weight_bytes,
            m.memory_bytes,
            slices,
        )
    }
}

impl From<Inventory> for wire::NodeInventory {
    fn from(i: Inventory) -> Self {
        wire::NodeInventory {
            node_name: i.node_name,
            numa_node: i.numa_node,
            weight_bytes: i.weight_bytes,
            memory_bytes: i.memory_bytes,
            slices: i
                .slices
                .into_iter()
                .map(|s| wire::ExpertSlice {
                    layer: s.layer,
                    expert: s.expert,
                    ff_start: s.ff_start,
                    ff_len: s.ff_len,
                    part: wire::FfnPart::from(s.part).into(),
                })
                .collect(),
        }
    }
}

/// What a dispatch is checked against: the model's shape, and the node's inventory when
/// the receiver is a node (so an expert it does not hold is refused up front).
#[derive(Clone, Copy, Debug)]
pub struct DispatchContext<'a> {
    pub n_layer: usize,
    pub n_expert: usize,
    pub n_embd: usize,
    /// The most experts per token (the model's n_expert_used), if enforced.
    pub max_experts_per_token: Option<usize>,
    pub inventory: Option<&'a Inventory>,
}

impl DispatchContext<'_> {
    /// The shape of the model `hparams` describes, without an inventory.
    pub fn from_hparams(hparams: &HParams) -> DispatchContext<'static> {
        DispatchContext {
            n_layer: hparams.n_layer_all,
            n_expert: hparams.n_expert,
            n_embd: hparams.n_embd,
            max_experts_per_token: Some(hparams.n_expert_used),
            inventory: None,
        }
    }
}

/// A checked dispatch: every input holds `n_tokens` valid rows of `n_embd` of a distinct
/// activation type. For [`FfnPart::Routed`], at least one assignment; every assignment
/// names a token of the dispatch and an expert of the model (and of the inventory, if one
/// was given) with a finite weight, no (token, expert) twice. Assignments keep their wire
/// order (routing rank order per token). For [`FfnPart::Dense`], no assignments (every
/// token goes through the layer's dense part) and, if an inventory was given, it serves
/// that dense part, in [`Stage::Hidden`] or [`Stage::Down`]. A [`Stage::Down`] dispatch
/// has one input whose rows are the FFN's `n_ff` wide (at most [`MAX_DENSE_N_FF`]; the node
/// checks the width against its weights), not `n_embd`; for routed slices its rows are one
/// per assignment (up to [`MAX_DISPATCH_ASSIGNMENTS`]) and each assignment's `token` names
/// its row.
#[derive(Clone, Debug, PartialEq)]
pub struct DispatchRequest {
    pub step_id: u64,
    pub layer: u32,
    pub part: FfnPart,
    pub stage: Stage,
    pub inputs: Vec<Activations>,
    pub assignments: Vec<Assignment>,
    /// Lengths of the runs of rows that belong to one sequence (empty: one sequence);
    /// checked: non-zero, adding up to the row count.
    pub segments: Vec<usize>,
}

impl DispatchRequest {
    /// Number of token rows.
    pub fn n_tokens(&self) -> usize {
        self.inputs.first().map_or(0, Activations::n_tokens)
    }

    /// Checks a received dispatch against `ctx`.
    pub fn from_wire(m: wire::Dispatch, ctx: &DispatchContext<'_>) -> Result<Self, ProtoError> {
        let n_tokens = m.n_tokens as usize;
        let n_embd = m.n_embd as usize;
        let stage = Stage::from_wire(m.stage)?;
        let down = stage == Stage::Down;
        let part = FfnPart::from_wire("dispatch.part", m.part)?;
        nonzero("dispatch.n_tokens", n_tokens)?;
        // Routed slices' second round has a row per assignment.
        let max_rows = if down && part == FfnPart::Routed {
            MAX_DISPATCH_ASSIGNMENTS
        } else {
            MAX_DISPATCH_TOKENS
        };
        limit("dispatch.n_tokens", n_tokens, max_rows)?;
        nonzero("dispatch.n_embd", n_embd)?;
        limit(
            "dispatch.n_embd",
            n_embd,
            if down { MAX_DENSE_N_FF } else { MAX_N_EMBD },
        )?;
        limit(
            "dispatch.n_tokens * n_embd",
            n_tokens * n_embd,
            MAX_DISPATCH_VALUES,
        )?;
        if !down && n_embd != ctx.n_embd {
            return Err(ProtoError::NEmbdMismatch {
                got: n_embd,
                want: ctx.n_embd,
            });
        }
        if m.layer as usize >= ctx.n_layer {
            return Err(ProtoError::LayerOutOfRange {
                layer: m.layer,
                n_layer: ctx.n_layer,
            });
        }
        if down && m.inputs.len() != 1 {
            return Err(ProtoError::DownInputs {
                layer: m.layer,
                got: m.inputs.len(),
            });
        }
        match part {
            FfnPart::Routed => nonzero("dispatch.assignments", m.assignments.len())?,
            FfnPart::Dense if stage == Stage::OneRound => {
                return Err(ProtoError::OneRoundDense { layer: m.layer })
            }
            FfnPart::Dense => {
                if !m.assignments.is_empty() {
                    return Err(ProtoError::DenseAssignments {
                        layer: m.layer,
                        got: m.assignments.len(),
                    });
                }
                if let Some(inv) = ctx.inventory {
                    if !inv.serves(FfnPart::Dense, m.layer, 0) {
                        return Err(ProtoError::DenseNotServed { layer: m.layer });
                    }
                }
            }
        }
        nonzero("dispatch.inputs", m.inputs.len())?;
        limit("dispatch.inputs", m.inputs.len(), MAX_DISPATCH_INPUTS)?;
        limit(
            "dispatch.assignments",
            m.assignments.len(),
            MAX_DISPATCH_ASSIGNMENTS,
        )?;

        let mut inputs: Vec<Activations> = Vec::with_capacity(m.inputs.len());
        for (index, input) in m.inputs.into_iter().enumerate() {
            let ty = GgmlType::from_id(input.ggml_type).ok_or(ProtoError::UnknownType {
                index,
                id: input.ggml_type,
            })?;
            if inputs.iter().any(|a| a.ty() == ty) {
                return Err(ProtoError::DuplicateInput {
                    index,
                    ty: ty.to_string(),
                });
            }
            let acts =
                Activations::from_bytes(ty, n_embd, n_tokens, input.data).map_err(|source| {
                    ProtoError::BadActivations {
                        index,
                        ty: ty.to_string(),
                        source,
                    }
                })?;
            inputs.push(acts);
        }

        let mut seen = HashSet::with_capacity(m.assignments.len());
        let mut per_token = vec![0usize; n_tokens];
        let mut assignments = Vec::with_capacity(m.assignments.len());
        for (index, a) in m.assignments.iter().enumerate() {
            if a.token as usize >= n_tokens {
                return Err(ProtoError::TokenOutOfRange {
                    index,
                    token: a.token,
                    n_tokens,
                });
            }
            if a.expert as usize >= ctx.n_expert {
                return Err(ProtoError::ExpertOutOfRange {
                    index,
                    expert: a.expert,
                    n_expert: ctx.n_expert,
                });
            }
            if !a.weight.is_finite() {
                return Err(ProtoError::NonFiniteWeight {
                    index,
                    token: a.token,
                    expert: a.expert,
                    weight: a.weight,
                });
            }
            if !seen.insert((a.token, a.expert)) {
                return Err(ProtoError::DuplicateAssignment {
                    index,
                    token: a.token,
                    expert: a.expert,
                });
            }
            let count = &mut per_token[a.token as usize];
            *count += 1;
            let k = ctx
                .max_experts_per_token
                .map_or(crate::limits::MAX_EXPERTS_PER_TOKEN, |k| {
                    k.min(crate::limits::MAX_EXPERTS_PER_TOKEN)
                });
            if *count > k {
                return Err(ProtoError::TooManyExperts {
                    index,
                    token: a.token,
                    k,
                });
            }
            if let Some(inv) = ctx.inventory {
                if !inv.serves(FfnPart::Routed, m.layer, a.expert) {
                    return Err(ProtoError::NotServed {
                        index,
                        layer: m.layer,
                        expert: a.expert,
                    });
                }
            }
            assignments.push(Assignment {
                token: a.token,
                expert: a.expert,
                weight: a.weight,
            });
        }
        let segments: Vec<usize> = m.segments.iter().map(|&l| l as usize).collect();
        if !segments.is_empty() {
            limit("dispatch.segments", segments.len(), MAX_DISPATCH_TOKENS)?;
            if segments.contains(&0) {
                return Err(ProtoError::Zero {
                    field: "a dispatch.segments length",
                    got: 0,
                });
            }
            let total: usize = segments.iter().sum();
            if total != n_tokens {
                return Err(ProtoError::Mismatch {
                    field: "dispatch.segments sum",
                    got: total,
                    want: n_tokens,
                });
            }
        }
        Ok(DispatchRequest {
            step_id: m.step_id,
            layer: m.layer,
            part,
            stage,
            inputs,
            assignments,
            segments,
        })
    }
}

impl From<DispatchRequest> for wire::Dispatch {
    /// Panics if `d` has no input (a caller bug: a dispatch carries the token rows).
    fn from(d: DispatchRequest) -> Self {
        let first = d.inputs.first().expect("a dispatch has at least one input");
        let (n_tokens, n_embd) = (first.n_tokens() as u32, first.n_cols() as u32);
        wire::Dispatch {
            step_id: d.step_id,
            layer: d.layer,
            n_tokens,
            n_embd,
            inputs: d
                .inputs
                .into_iter()
                .map(|a| wire::Activation {
                    ggml_type: a.ty().id(),
                    data: a.into_bytes(),
                })
                .collect(),
            assignments: d
                .assignments
                .into_iter()
                .map(|a| wire::TokenAssignment {
                    token: a.token,
                    expert: a.expert,
                    weight: a.weight,
                })
                .collect(),
            part: wire::FfnPart::from(d.part).into(),
            segments: d.segments.iter().map(|&l| l as u32).collect(),
            stage: wire::Stage::from(d.stage).into(),
        }
    }
}

/// One f32 partial sum of `n_embd` values per token, back to back, all finite.
#[derive(Clone, Debug, PartialEq)]
pub struct Partials {
    n_tokens: usize,
    n_embd: usize,
    data: Vec<f32>,
}

impl Partials {
    /// Checks the shape against the limits and `data.len() == n_tokens * n_embd`.
    pub fn new(n_tokens: usize, n_embd: usize, data: Vec<f32>) -> Result<Partials, ProtoError> {
        Partials::check_shape(n_tokens, n_embd)?;
        if data.len() != n_tokens * n_embd {
            return Err(ProtoError::BadLength {
                field: "partials values",
                got: data.len(),
                want: n_tokens * n_embd,
            });
        }
        if let Some(index) = data.iter().position(|v| !v.is_finite()) {
            return Err(ProtoError::NonFinite {
                field: "partials.data",
                index,
            });
        }
        Ok(Partials {
            n_tokens,
            n_embd,
            data,
        })
    }

    /// The limits on a result's shape. Rows are up to [`MAX_DENSE_N_FF`] wide (a split
    /// FFN's first round answers rows of its hidden width), and up to one per assignment
    /// (routed slices' rounds).
    fn check_shape(n_tokens: usize, n_embd: usize) -> Result<(), ProtoError> {
        limit("partials.n_tokens", n_tokens, MAX_DISPATCH_ASSIGNMENTS)?;
        limit("partials.n_embd", n_embd, MAX_DENSE_N_FF)?;
        limit(
            "partials.n_tokens * n_embd",
            n_tokens * n_embd,
            MAX_DISPATCH_VALUES,
        )
    }

    pub fn n_tokens(&self) -> usize {
        self.n_tokens
    }

    pub fn n_embd(&self) -> usize {
        self.n_embd
    }

    /// `n_tokens × n_embd` values, token-major.
    pub fn data(&self) -> &[f32] {
        &self.data
    }

    pub fn into_data(self) -> Vec<f32> {
        self.data
    }
}

impl TryFrom<wire::Partials> for Partials {
    type Error = ProtoError;

    fn try_from(m: wire::Partials) -> Result<Self, ProtoError> {
        let (n_tokens, n_embd) = (m.n_tokens as usize, m.n_embd as usize);
        Partials::check_shape(n_tokens, n_embd)?;
        let want = n_tokens * n_embd * 4;
        if m.data.len() != want {
            return Err(ProtoError::BadLength {
                field: "partials.data",
                got: m.data.len(),
                want,
            });
        }
        let data = m
            .data
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        Partials::new(n_tokens, n_embd, data)
    }
}

impl From<Partials> for wire::Partials {
    fn from(p: Partials) -> Self {
        wire::Partials {
            n_tokens: p.n_tokens as u32,
            n_embd: p.n_embd as u32,
            data: p.data.iter().flat_map(|v| v.to_le_bytes()).collect(),
        }
    }
}

/// An error a peer reported, checked: a known code and a message of bounded length.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RemoteError {
    pub code: wire::ErrorCode,
    pub message: String,
}

impl RemoteError {
    /// Whether resending the work (to a replica) may succeed.
    pub fn is_transient(&self) -> bool {
        self.code == wire::ErrorCode::Unavailable
    }

    /// What a node answers to a message it refused.
    pub fn from_proto_error(e: &ProtoError) -> RemoteError {
        RemoteError {
            code: e.code(),
            message: e.to_string(),
        }
    }
}

impl TryFrom<wire::Error> for RemoteError {
    type Error = ProtoError;

    fn try_from(m: wire::Error) -> Result<Self, ProtoError> {
        let code = wire::ErrorCode::try_from(m.code).map_err(|_| ProtoError::UnknownEnum {
            field: "error.code",
            value: m.code,
        })?;
        limit(
            "error.message bytes",
            m.message.len(),
            MAX_ERROR_MESSAGE_BYTES,
        )?;
        Ok(RemoteError {
            code,
            message: m.message,
        })
    }
}

impl From<RemoteError> for wire::Error {
    fn from(e: RemoteError) -> Self {
        let mut message = e.message;
        if message.len() > MAX_ERROR_MESSAGE_BYTES {
            let mut end = MAX_ERROR_MESSAGE_BYTES;
            while !message.is_char_boundary(end) {
                end -= 1;
            }
            message.truncate(end);
        }
        wire::Error {
            code: e.code as i32,
            message,
        }
    }
}

/// A node's answer to a dispatch, checked (its shape against the dispatch is
/// [`DispatchResponse::check_answers`]).
#[derive(Clone, Debug, PartialEq)]
pub struct DispatchResponse {
    pub step_id: u64,
    pub layer: u32,
    pub outcome: Result<Partials, RemoteError>,
}

impl DispatchResponse {
    /// Refuses an answer to another dispatch than (`step_id`, `layer`) of `n_tokens`
    /// rows of `n_embd`.
    pub fn check_answers(
        &self,
        step_id: u64,
        layer: u32,
        n_tokens: usize,
        n_embd: usize,
    ) -> Result<(), ProtoError> {
        if (self.step_id, self.layer) != (step_id, layer) {
            return Err(ProtoError::WrongStep {
                got_step: self.step_id,
                got_layer: self.layer,
                want_step: step_id,
                want_layer: layer,
            });
        }
        if let Ok(p) = &self.outcome {
            if p.n_tokens != n_tokens {
                return Err(ProtoError::Mismatch {
                    field: "partials.n_tokens",
                    got: p.n_tokens,
                    want: n_tokens,
                });
            }
            if p.n_embd != n_embd {
                return Err(ProtoError::Mismatch {
                    field: "partials.n_embd",
                    got: p.n_embd,
                    want: n_embd,
                });
            }
        }
        Ok(())
    }
}

impl TryFrom<wire::DispatchResult> for DispatchResponse {
    type Error = ProtoError;

    fn try_from(m: wire::DispatchResult) -> Result<Self, ProtoError> {
        let outcome = match m.outcome.ok_or(ProtoError::Missing {
            field: "dispatch_result.outcome",
        })? {
            wire::dispatch_result::Outcome::Partials(p) => Ok(p.try_into()?),
            wire::dispatch_result::Outcome::Error(e) => Err(e.try_into()?),
        };
        Ok(DispatchResponse {
            step_id: m.step_id,
            layer: m.layer,
            outcome,
        })
    }
}

impl From<DispatchResponse> for wire::DispatchResult {
    fn from(r: DispatchResponse) -> Self {
        wire::DispatchResult {
            step_id: r.step_id,
            layer: r.layer,
            outcome: Some(match r.outcome {
                Ok(p) => wire::dispatch_result::Outcome::Partials(p.into()),
                Err(e) => wire::dispatch_result::Outcome::Error(e.into()),
            }),
        }
    }
}

/// The partial sums of a node's answer to dispatch (`step_id`, `layer`) of `n_rows` rows
/// of `n_embd`: the message must be a dispatch result for that dispatch, well-formed, of
/// that shape and finite; a node's error answer becomes `Err` with its code and message.
pub fn partials_from_reply(
    answer: wire::NodeMessage,
    step_id: u64,
    layer: u32,
    n_rows: usize,
    n_embd: usize,
) -> Result<Partials, String> {
    let result = match answer.body {
        Some(wire::node_message::Body::DispatchResult(r)) => {
            DispatchResponse::try_from(r).map_err(|e| e.to_string())?
        }
        Some(other) => {
            let kind = match other {
                wire::node_message::Body::Hello(_) => "a handshake reply",
                wire::node_message::Body::Health(_) => "a health report",
                wire::node_message::Body::Stats(_) => "stats",
                wire::node_message::Body::DispatchResult(_) => "a dispatch result",
            };
            return Err(format!("answered a dispatch with {kind}"));
        }
        None => return Err("answered a dispatch with an empty message".into()),
    };
    result
        .check_answers(step_id, layer, n_rows, n_embd)
        .map_err(|e| e.to_string())?;
    result
        .outcome
        .map_err(|e| format!("{:?}: {}", e.code, e.message))
}
