//! Placement: which node holds which expert slice, and what nodes exist.
//!
//! The unit of placement is a slice: (layer, [`Part`], expert, range of the
//! intermediate dimension `ff`). A node holding rows `a..b` of an expert's (or
//! a dense part's) `gate` and `up` holds the matching share of whole rows of its
//! `down` ([`slice_down_rows`]): a sliced FFN is computed exactly, in two rounds
//! (the nodes' SwiGLU rows, joined and quantized once by the coordinator, then
//! the nodes' rows of down), so any slicing gives the single-process result.
//!
//! Two human-edited TOML files, both described with examples in
//! `docs/placement.md`:
//! - the **plan** ([`Plan`]): where each slice lives, with replicas, and which
//!   model it is for. [`Plan::resolve`] checks it against a model's
//!   [`ModelShape`] (every routed expert covered exactly once per row, cuts on
//!   quant-block boundaries, ids in range) and gives a [`ResolvedPlan`] to look
//!   slices up in;
//! - the **cluster** ([`Cluster`]): the nodes that exist, their addresses and
//!   transports.
//!
//! [`split`] writes per-node GGUF files holding only one node's slices.
//!
//! Nothing here does networking or reads a clock; errors are
//! [`PlacementError`]s naming the file, the plan entry, the layer and expert
//! and what is wrong.

mod cluster;
mod error;
mod ids;
mod plan;
pub mod planner;
mod resolve;
pub mod routing_stats;
mod shape;
pub mod split;

#[cfg(test)]
mod tests;

use std::fmt;

use serde::{Deserialize, Serialize};

pub use self::cluster::{Cluster, ClusterNode, ClusterTls, DEFAULT_SERVER_NAME};
pub use self::error::{PlacementError, SliceRef};
pub use self::ids::IdList;
pub use self::plan::{Plan, PlanEntry, PLAN_VERSION};
pub use self::resolve::{PlacedSlice, ResolvedPlan, SliceSpec};
pub use self::shape::{FfnShape, FfnTensors, LayerShape, ModelShape, RowSource};

/// The rows of `ffn_down` (`n_embd` rows of `n_ff`) that the node holding rows
/// `ff_start..ff_start + ff_len` of an FFN's gate and up computes: a dense part's, or a
/// routed expert's.
///
/// A sliced FFN is computed exactly, in two rounds: every node computes its rows of gate
/// and up and their SwiGLU, the coordinator joins each token's whole hidden row and
/// quantizes it once, and every node computes whole rows of down from it — a share of
/// down's rows in proportion to its share of `n_ff`, cut at the nearest multiple of 16 rows (a Q4_K
/// down that ggml repacks in groups of 8 rows is cut between groups, and the tiled kernels'
/// row groups stay whole). The slices of an FFN tile `0..n_embd` as their ff rows tile
/// `0..n_ff`; a thin slice may get no row. A whole FFN gets every row.
pub fn slice_down_rows(
    ff_start: usize,
    ff_len: usize,
    n_ff: usize,
    n_embd: usize,
) -> std::ops::Range<usize> {
    let cut = |ff: usize| {
        if ff >= n_ff {
            n_embd
        } else {
            // ff·n_embd/n_ff to the nearest multiple of 16 (so that slices alternating the
            // larger share of ff rows also share down's rows evenly).
            let units =
                (2 * ff as u128 * n_embd as u128 + 16 * n_ff as u128) / (32 * n_ff.max(1) as u128);
            ((units * 16) as usize).min(n_embd)
        }
    };
    cut(ff_start)..cut(ff_start + ff_len)
}

/// Which feed-forward network of a layer a slice belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Part {
    /// The routed experts (`ffn_{gate,up,down}_exps`, or a merged `ffn_gate_up_exps`).
    Routed,
    /// The layer's dense FFN (`ffn_{gate,up,down}` on dense layers) or its shared
    /// expert (`ffn_{gate,up,down}_shexp` on MoE layers); always expert 0.
    Dense,
}

impl Part {
    /// The name used in plan files and split tensor names (`routed`, `dense`).
    pub const fn name(self) -> &'static str {
        match self {
            Part::Routed => "routed",
            Part::Dense => "dense",
        }
    }

    /// The number stored in a split file's `moeshard.split.slices` (0 routed, 1 dense).
    pub const fn id(self) -> u32 {
        match self {
            Part::Routed => 0,
            Part::Dense => 1,
        }
    }

    /// The part stored as `id` in a split file.
    pub const fn from_id(id: u32) -> Option<Part> {
        match id {
            0 => Some(Part::Routed),
            1 => Some(Part::Dense),
            _ => None,
        }
    }
}

impl fmt::Display for Part {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Formats a model identity as 64 lowercase hex digits.
pub fn identity_hex(identity: &[u8; 32]) -> String {
    identity.iter().map(|b| format!("{b:02x}")).collect()
}

/// Parses 64 hex digits (either case) into a model identity.
pub fn parse_identity_hex(text: &str) -> Option<[u8; 32]> {
    let bytes = text.as_bytes();
    if bytes.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in bytes.chunks_exact(2).enumerate() {
        let hi = (pair[0] as char).to_digit(16)?;
        let lo = (pair[1] as char).to_digit(16)?;
        out[i] = (hi * 16 + lo) as u8;
    }
    Some(out)
}

/// Whether `name` may name a node: 1 to 64 ASCII letters, digits, `.`, `_` or
/// `-`, not starting with `.` (node names become parts of file names).
pub fn is_valid_node_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}
