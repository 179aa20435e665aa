//! [`PlacementError`]: why a plan, a cluster file or a split file was refused.
//!
//! Plan entries are numbered from 1 in file order (the third `[[place]]` table
//! is "plan entry 3"), cluster nodes likewise. Every error is permanent — the
//! same input gives the same error — except [`PlacementError::Io`], which
//! depends on the machine.

use std::fmt;
use std::io;
use std::ops::Range;
use std::path::PathBuf;

use super::Part;
use crate::gguf::GgufError;
use crate::models::ModelError;

/// Names one (layer, part, expert) in messages: `layer 5 expert 17` for a routed
/// expert, `layer 5 dense part` for a dense FFN or shared expert.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SliceRef {
    /// The layer.
    pub layer: usize,
    /// Routed experts or the dense part.
    pub part: Part,
    /// The expert (0 for the dense part).
    pub expert: usize,
}

impl fmt::Display for SliceRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.part {
            Part::Routed => write!(f, "layer {} expert {}", self.layer, self.expert),
            Part::Dense => write!(f, "layer {} dense part", self.layer),
        }
    }
}

/// Why a plan, cluster or split file was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PlacementError {
    /// An operating-system call failed on `path`.
    // The cause is part of the message and deliberately not a `#[source]`:
    // a report printing the chain (anyhow's `{:#}`) would repeat it.
    #[error("cannot {op} {path}: {cause}")]
    Io {
        /// What was being done ("read", "write", "rename"...).
        op: &'static str,
        /// The file it was done to.
        path: PathBuf,
        /// The operating system's error.
        cause: io::Error,
    },

    /// An error in the file `path`.
    // As for `Io`, the inner error is in the message, not a `#[source]`.
    #[error("{path}: {error}")]
    InFile {
        /// The plan or cluster file.
        path: PathBuf,
        /// What is wrong in it.
        error: Box<PlacementError>,
    },

    /// The text is not TOML of the expected form: a syntax error, an unknown key,
    /// a value of the wrong type. The message gives the line and column.
    #[error("{0}")]
    Toml(String),

    /// The plan's `version` is not one this build reads.
    #[error("unsupported plan version {0} (this build reads version {PLAN_VERSION})", PLAN_VERSION = super::PLAN_VERSION)]
    Version(i64),

    /// `model_identity` is not 64 hex digits.
    #[error("model_identity {0:?} is not 64 hex digits")]
    BadIdentity(String),

    /// The plan is for another model.
    #[error("the plan is for model {plan}, but this model is {model}")]
    IdentityMismatch {
        /// The plan's model identity (hex).
        plan: String,
        /// The model's identity (hex).
        model: String,
    },

    /// The plan's `nodes` list is unusable.
    #[error("plan nodes: {0}")]
    BadNodes(String),

    /// An entry names a node that is not in the plan's `nodes`.
    #[error("unknown node {name:?} in entry {entry} (nodes: {known})")]
    UnknownNode {
        /// The entry (from 1).
        entry: usize,
        /// The name it gives.
        name: String,
        /// The plan's nodes, comma-separated.
        known: String,
    },

    /// An entry is malformed on its own (its id lists, `ff`, `nodes`).
    #[error("plan entry {entry}: {why}")]
    BadEntry {
        /// The entry (from 1).
        entry: usize,
        /// What is wrong.
        why: String,
    },

    /// An entry names a layer the model does not have.
    #[error("plan entry {entry}: layer {layer} is out of range (the model has {n_layer} layers)")]
    LayerOutOfRange {
        /// The entry (from 1).
        entry: usize,
        /// The layer it names.
        layer: usize,
        /// The model's number of layers.
        n_layer: usize,
    },

    /// An entry places a part a layer does not have (routed experts on a dense
    /// layer, or a dense part on a layer with neither a dense FFN nor a shared expert).
    #[error("plan entry {entry}: layer {layer} has no {}", match part { Part::Routed => "routed experts", Part::Dense => "dense FFN or shared expert" })]
    NoSuchPart {
        /// The entry (from 1).
        entry: usize,
        /// The layer.
        layer: usize,
        /// The part it lacks.
        part: Part,
    },

    /// An entry names an expert the model does not have.
    #[error("plan entry {entry}: expert {expert} is out of range (the model has {n_expert} experts per layer)")]
    ExpertOutOfRange {
        /// The entry (from 1).
        entry: usize,
        /// The expert it names.
        expert: usize,
        /// The model's number of routed experts per layer.
        n_expert: usize,
    },

    /// A slice ends past the intermediate dimension.
    #[error("plan entry {entry}: {slice} rows {}..{} end past n_ff = {n_ff}", ff.start, ff.end)]
    FfOutOfRange {
        /// The entry (from 1).
        entry: usize,
        /// The slice's expert.
        slice: SliceRef,
        /// Its rows.
        ff: Range<usize>,
        /// The intermediate size of that part.
        n_ff: usize,
    },

    /// A cut is not on a quant-block boundary of `ffn_down`.
    #[error("plan entry {entry}: {slice} rows {}..{}: {cut} is not a multiple of ffn_down's block size {block} (cuts must fall on quant-block boundaries)", ff.start, ff.end)]
    UnalignedCut {
        /// The entry (from 1).
        entry: usize,
        /// The slice's expert.
        slice: SliceRef,
        /// Its rows.
        ff: Range<usize>,
        /// The offending boundary.
        cut: usize,
        /// `ffn_down`'s block size in elements.
        block: usize,
    },

    /// Two entries place overlapping (but different) row ranges of one expert.
    #[error("plan entry {entry}: {slice} rows {}..{} overlap entry {other_entry}'s rows {}..{}", ff.start, ff.end, other_ff.start, other_ff.end)]
    Overlap {
        /// The later entry (from 1).
        entry: usize,
        /// The expert.
        slice: SliceRef,
        /// The later entry's rows.
        ff: Range<usize>,
        /// The earlier entry.
        other_entry: usize,
        /// The earlier entry's rows.
        other_ff: Range<usize>,
    },

    /// One node is named twice as a replica of the same slice.
    #[error("plan entry {entry}: {slice} rows {}..{} are already on node {node:?} (entry {other_entry})", ff.start, ff.end)]
    DuplicateReplica {
        /// The later entry (from 1).
        entry: usize,
        /// The expert.
        slice: SliceRef,
        /// The rows.
        ff: Range<usize>,
        /// The node.
        node: String,
        /// The entry that placed them there first.
        other_entry: usize,
    },

    /// A routed expert of a MoE layer is in no entry.
    #[error("{slice} is not placed")]
    NotPlaced {
        /// The expert.
        slice: SliceRef,
    },

    /// Some rows of a placed expert or dense part are in no entry.
    #[error("{slice} rows {}..{} are not placed", missing.start, missing.end)]
    Gap {
        /// The expert.
        slice: SliceRef,
        /// The first run of rows no entry covers.
        missing: Range<usize>,
    },

    /// The model's hyperparameters could not be read.
    #[error(transparent)]
    Model(#[from] ModelError),

    /// The model's FFN tensors do not have the shapes placement needs.
    #[error("{0}")]
    Shape(String),

    /// A cluster file's node is unusable.
    #[error("cluster node {index} ({name:?}): {why}")]
    ClusterNode {
        /// The node (from 1, in file order).
        index: usize,
        /// Its name, as given.
        name: String,
        /// What is wrong.
        why: String,
    },

    /// A cluster file as a whole is unusable (no nodes, a plan node it lacks).
    #[error("cluster: {0}")]
    Cluster(String),

    /// A split file's metadata or tensors are malformed, or a split cannot be written.
    #[error("split file: {0}")]
    Split(String),

    /// Reading or writing a GGUF file failed.
    #[error(transparent)]
    Gguf(#[from] GgufError),
}

impl PlacementError {
    /// Wraps `self` with the file it was found in.
    pub(crate) fn in_file(self, path: &std::path::Path) -> PlacementError {
        match self {
            // Io errors already name their path.
            e @ PlacementError::Io { .. } => e,
            e => PlacementError::InFile {
                path: path.to_path_buf(),
                error: Box::new(e),
            },
        }
    }
}
