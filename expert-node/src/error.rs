//! [`NodeError`]: why an expert node could not start or serve.

use std::path::PathBuf;

use shared::gguf::GgufError;
use shared::models::ModelError;
use shared::moe::MoeError;
use shared::placement::{PlacementError, SliceSpec};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum NodeError {
    #[error(transparent)]
    Gguf(#[from] GgufError),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Placement(#[from] PlacementError),
    #[error(transparent)]
    Moe(#[from] MoeError),
    #[error(transparent)]
    Proto(#[from] proto::ProtoError),
    #[error(transparent)]
    Transport(#[from] proto::transport::TransportError),
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("tensor '{0}' is missing")]
    MissingTensor(String),
    #[error("{}: nothing to serve (give --plan with --node, or --experts)", path.display())]
    NothingToServe { path: PathBuf },
    #[error("{}: the split file does not hold {slice:?}", path.display())]
    NotInFile { path: PathBuf, slice: SliceSpec },
    #[error("slice {slice:?}: {detail}")]
    BadSlice { slice: SliceSpec, detail: String },
    #[error("{0}")]
    Usage(String),
}
