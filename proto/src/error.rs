//! [`ProtoError`]: why a wire message was refused.
//!
//! Every variant names the field and the offending values. All of them are permanent for
//! the message at hand (resending the same bytes fails the same way); a node answers them
//! with `ERROR_CODE_BAD_REQUEST` (or the code [`ProtoError::code`] gives), a coordinator
//! treats them as a broken peer.

use shared::quant::matmul::MatmulError;
use thiserror::Error;

use crate::wire::ErrorCode;

/// A malformed, out-of-range or incompatible message.
#[derive(Debug, Error, PartialEq)]
pub enum ProtoError {
    #[error("protocol version {got}, this side speaks {want}")]
    VersionMismatch { got: u32, want: u32 },
    #[error("model identity {got}, this side serves {want}")]
    ModelMismatch { got: String, want: String },
    #[error("{field}: {got} bytes, want {want}")]
    BadLength {
        field: &'static str,
        got: usize,
        want: usize,
    },
    #[error("{field} is missing")]
    Missing { field: &'static str },
    #[error("{field} is {got}, over the limit {max}")]
    OverLimit {
        field: &'static str,
        got: usize,
        max: usize,
    },
    #[error("{field} is {got}, must be at least 1")]
    Zero { field: &'static str, got: usize },
    #[error("n_embd is {got}, the model's is {want}")]
    NEmbdMismatch { got: usize, want: usize },
    #[error("layer {layer} is out of range (the model has {n_layer} layers)")]
    LayerOutOfRange { layer: u32, n_layer: usize },
    #[error("input {index}: unknown ggml type id {id}")]
    UnknownType { index: usize, id: u32 },
    #[error("input {index}: ggml type {ty} appears twice")]
    DuplicateInput { index: usize, ty: String },
    #[error("input {index} ({ty}): {source}")]
    BadActivations {
        index: usize,
        ty: String,
        source: MatmulError,
    },
    #[error("assignment {index}: token {token} is out of range (the dispatch has {n_tokens})")]
    TokenOutOfRange {
        index: usize,
        token: u32,
        n_tokens: usize,
    },
    #[error("assignment {index}: expert {expert} is out of range (the model has {n_expert})")]
    ExpertOutOfRange {
        index: usize,
        expert: u32,
        n_expert: usize,
    },
    #[error(
        "assignment {index}: weight {weight} for token {token}, expert {expert} is not finite"
    )]
    NonFiniteWeight {
        index: usize,
        token: u32,
        expert: u32,
        weight: f32,
    },
    #[error("assignment {index}: token {token}, expert {expert} is assigned twice")]
    DuplicateAssignment {
        index: usize,
        token: u32,
        expert: u32,
    },
    #[error("assignment {index}: token {token} has more than {k} experts")]
    TooManyExperts { index: usize, token: u32, k: usize },
    #[error("assignment {index}: layer {layer}, expert {expert} is not served by this node")]
    NotServed {
        index: usize,
        layer: u32,
        expert: u32,
    },
    #[error("dispatch of layer {layer}'s dense part has {got} assignments, must have none")]
    DenseAssignments { layer: u32, got: usize },
    #[error("layer {layer}'s dense part is not served by this node")]
    DenseNotServed { layer: u32 },
    #[error("layer {layer}: a dense part is computed in two rounds (stage HIDDEN, then DOWN), not ONE_ROUND")]
    OneRoundDense { layer: u32 },
    #[error("layer {layer}: a STAGE_DOWN dispatch carries one input (the hidden rows), not {got}")]
    DownInputs { layer: u32, got: usize },
    #[error("slice {index} (layer {layer}, expert {expert}): {detail}")]
    BadSlice {
        index: usize,
        layer: u32,
        expert: u32,
        detail: String,
    },
    #[error("{field}: value {index} is not finite")]
    NonFinite { field: &'static str, index: usize },
    #[error("result for step {got_step} layer {got_layer}, expected step {want_step} layer {want_layer}")]
    WrongStep {
        got_step: u64,
        got_layer: u32,
        want_step: u64,
        want_layer: u32,
    },
    #[error("{field} is {got}, expected {want}")]
    Mismatch {
        field: &'static str,
        got: usize,
        want: usize,
    },
    #[error("unknown {field} {value}")]
    UnknownEnum { field: &'static str, value: i32 },
    #[error("decoding {message}: {detail}")]
    Decode {
        message: &'static str,
        detail: String,
    },
}

impl ProtoError {
    /// The code a node answers this error with.
    pub fn code(&self) -> ErrorCode {
        match self {
            ProtoError::VersionMismatch { .. } => ErrorCode::VersionMismatch,
            ProtoError::ModelMismatch { .. } => ErrorCode::ModelMismatch,
            ProtoError::NotServed { .. } | ProtoError::DenseNotServed { .. } => {
                ErrorCode::NotServed
            }
            _ => ErrorCode::BadRequest,
        }
    }
}
