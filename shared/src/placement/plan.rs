//! The plan file: where each slice lives. Parsing, writing, the even plan.
//!
//! The format (documented with examples in `docs/placement.md`):
//! ```toml
//! version = 1
//! model_identity = "<64 hex digits>"   # optional
//! nodes = ["node0", "node1"]           # partial sums are added in this order
//! [[place]]
//! part = "routed"                      # or "dense"
//! layers = "1-60"                      # ids and inclusive ranges
//! experts = "0-127"                    # routed only; dense: omitted (expert 0)
//! ff = [0, 1024]                       # optional: rows start..end (end exclusive)
//! nodes = ["node0"]                    # replicas: each holds the same slice
//! ```

use std::fs;
use std::io::Write;
use std::ops::Range;
use std::path::Path;

use serde::Deserialize;

use super::{
    identity_hex, is_valid_node_name, parse_identity_hex, IdList, ModelShape, Part, PlacementError,
};

/// The plan format version this build reads and writes.
pub const PLAN_VERSION: i64 = 1;

/// A placement plan as written in a plan file: checked on its own (syntax,
/// names, id lists) but not yet against a model; [`Plan::resolve`] does that.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    /// The [`crate::gguf::model_identity`] of the model the plan is for, if it says.
    pub model_identity: Option<[u8; 32]>,
    /// The nodes, in the order their partial sums are added.
    pub nodes: Vec<String>,
    /// The `[[place]]` entries, in file order.
    pub entries: Vec<PlanEntry>,
}

/// One `[[place]]` table: the same slice of every (layer, expert) it names, on
/// every node it names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlanEntry {
    /// Routed experts or the dense part.
    pub part: Part,
    /// The layers.
    pub layers: IdList,
    /// The experts (for [`Part::Dense`], only expert 0).
    pub experts: IdList,
    /// Rows `start..end` of the intermediate dimension; `None` for all of it
    /// (which differs between parts and layers).
    pub ff: Option<Range<usize>>,
    /// The replicas: every node named holds this slice.
    pub nodes: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPlan {
    version: i64,
    model_identity: Option<String>,
    nodes: Vec<String>,
    #[serde(default)]
    place: Vec<RawEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEntry {
    part: Part,
    layers: String,
    experts: Option<String>,
    ff: Option<Vec<i64>>,
    nodes: Vec<String>,
}

impl Plan {
    /// Parses and checks a plan file's text (everything that does not need the
    /// model: see [`Plan::validate`]). Unknown keys are errors.
    pub fn from_toml(text: &str) -> Result<Plan, PlacementError> {
        let raw: RawPlan = toml::from_str(text).map_err(|e| PlacementError::Toml(e.to_string()))?;
        if raw.version != PLAN_VERSION {
            return Err(PlacementError::Version(raw.version));
        }
        let model_identity = match raw.model_identity {
            None => None,
            Some(hex) => Some(parse_identity_hex(&hex).ok_or(PlacementError::BadIdentity(hex))?),
        };
        let mut entries = Vec::with_capacity(raw.place.len());
        for (i, e) in raw.place.into_iter().enumerate() {
            let entry = i + 1;
            let bad = |why: String| PlacementError::BadEntry { entry, why };
            let layers = IdList::parse(&e.layers).map_err(|why| bad(format!("layers {why}")))?;
            let experts = match (e.part, e.experts) {
                (Part::Routed, None) => {
                    return Err(bad(
                        "part = \"routed\" needs experts (like experts = \"0-63\")".to_string(),
                    ))
                }
                (Part::Routed, Some(text)) => {
                    IdList::parse(&text).map_err(|why| bad(format!("experts {why}")))?
                }
                (Part::Dense, None) => IdList::single(0),
                (Part::Dense, Some(text)) => {
                    IdList::parse(&text).map_err(|why| bad(format!("experts {why}")))?
                }
            };
            let ff = match e.ff {
                None => None,
                Some(pair) => match pair[..] {
                    [start, end] if start >= 0 && end >= 0 => {
                        Some(usize::try_from(start).unwrap_or(usize::MAX)..usize::try_from(end).unwrap_or(usize::MAX))
                    }
                    _ => {
                        return Err(bad(format!(
                            "ff = {pair:?} is not [start, end] (two non-negative integers, end exclusive)"
                        )))
                    }
                },
            };
            entries.push(PlanEntry {
                part: e.part,
                layers,
                experts,
                ff,
                nodes: e.nodes,
            });
        }
        let plan = Plan {
            model_identity,
            nodes: raw.nodes,
            entries,
        };
        plan.validate()?;
        Ok(plan)
    }

    /// Reads and parses a plan file; errors name the file.
    pub fn load(path: &Path) -> Result<Plan, PlacementError> {
        let text = fs::read_to_string(path).map_err(|cause| PlacementError::Io {
            op: "read",
            path: path.to_path_buf(),
            cause,
        })?;
        Plan::from_toml(&text).map_err(|e| e.in_file(path))
    }

    /// Writes the plan to `path` through a temporary name, renamed into place.
    pub fn save(&self, path: &Path) -> Result<(), PlacementError> {
        write_atomically(path, self.to_toml().as_bytes())
    }

    /// The plan as TOML text that [`Plan::from_toml`] reads back to an equal plan.
    pub fn to_toml(&self) -> String {
        let mut out = String::new();
        out.push_str(&format!("version = {PLAN_VERSION}\n"));
        if let Some(id) = &self.model_identity {
            out.push_str(&format!("model_identity = \"{}\"\n", identity_hex(id)));
        }
        out.push_str(&format!("nodes = {}\n", string_array(&self.nodes)));
        for e in &self.entries {
            out.push_str("\n[[place]]\n");
            out.push_str(&format!("part = \"{}\"\n", e.part));
            out.push_str(&format!("layers = \"{}\"\n", e.layers));
            if e.part == Part::Routed || e.experts != IdList::single(0) {
                out.push_str(&format!("experts = \"{}\"\n", e.experts));
            }
            if let Some(ff) = &e.ff {
                out.push_str(&format!("ff = [{}, {}]\n", ff.start, ff.end));
            }
            out.push_str(&format!("nodes = {}\n", string_array(&e.nodes)));
        }
        out
    }

    /// Checks what can be checked without the model: the node list (non-empty,
    /// valid unique names), and per entry: known, distinct, at least one node;
    /// dense entries name only expert 0; `ff` is a non-empty range.
    pub fn validate(&self) -> Result<(), PlacementError> {
        if self.nodes.is_empty() {
            return Err(PlacementError::BadNodes("the list is empty".to_string()));
        }
        for (i, name) in self.nodes.iter().enumerate() {
            if !is_valid_node_name(name) {
                return Err(PlacementError::BadNodes(format!(
                    "{name:?} is not a valid node name (1 to 64 letters, digits, '.', '_' or '-', not starting with '.')"
                )));
            }
            if self.nodes[..i].contains(name) {
                return Err(PlacementError::BadNodes(format!(
                    "{name:?} is listed twice"
                )));
            }
        }
        for (i, e) in self.entries.iter().enumerate() {
            let entry = i + 1;
            let bad = |why: String| PlacementError::BadEntry { entry, why };
            if e.part == Part::Dense && e.experts != IdList::single(0) {
                return Err(bad(format!(
                    "experts = \"{}\": a dense part has only expert 0 (leave experts out)",
                    e.experts
                )));
            }
            if let Some(ff) = &e.ff {
                if ff.start >= ff.end {
                    return Err(bad(format!(
                        "ff = [{}, {}] is empty (write [start, end] with end exclusive and larger than start)",
                        ff.start, ff.end
                    )));
                }
            }
            if e.nodes.is_empty() {
                return Err(bad("nodes is empty: name at least one node".to_string()));
            }
            for (j, name) in e.nodes.iter().enumerate() {
                if !self.nodes.contains(name) {
                    return Err(PlacementError::UnknownNode {
                        entry,
                        name: name.clone(),
                        known: self.nodes.join(", "),
                    });
                }
                if e.nodes[..j].contains(name) {
                    return Err(bad(format!("node {name:?} is listed twice")));
                }
            }
        }
        Ok(())
    }

    /// Refuses the plan if it names a model other than `model` (a plan without
    /// `model_identity` fits any model of the right shape).
    pub fn check_identity(&self, model: &[u8; 32]) -> Result<(), PlacementError> {
        match &self.model_identity {
            Some(plan) if plan != model => Err(PlacementError::IdentityMismatch {
                plan: identity_hex(plan),
                model: identity_hex(model),
            }),
            _ => Ok(()),
        }
    }

    /// The even plan. Routed experts of every MoE layer go in contiguous
    /// whole-expert ranges over the nodes: node `i` of `N` gets experts
    /// `[E*i/N, E*(i+1)/N)` (none when that is empty).
    ///
    /// With `split_dense`, every dense part (dense FFN, shared expert) is sliced
    /// over all nodes in node order, cut at `ffn_down` block boundaries: each node
    /// gets `n_blocks / N` blocks, and the `n_blocks % N` left over go one each
    /// to the nodes starting at `(layer * (n_blocks % N)) % N`, so the larger
    /// shares move to other nodes from one layer to the next. Without
    /// `split_dense` dense parts are left out: the coordinator computes them.
    ///
    /// Layers with the same slices share one entry. The plan has no
    /// `model_identity`; set it from the model file. With no nodes the plan is
    /// empty (and fails [`Plan::validate`]).
    pub fn even(nodes: &[String], shape: &ModelShape, split_dense: bool) -> Plan {
        Plan::even_placement(nodes, shape, split_dense, false)
    }

    /// The sliced even plan: every routed expert's intermediate dimension is cut over all
    /// nodes at `ffn_down` block boundaries (as [`Plan::even`] cuts dense parts), so every
    /// node has a share of every expert and the work of a step is balanced by construction
    /// (DESIGN.md, "Placement"). Where the blocks do not divide evenly, the larger shares
    /// go to different nodes from one expert (and layer) to the next. Dense parts as in
    /// [`Plan::even`].
    pub fn even_sliced(nodes: &[String], shape: &ModelShape, split_dense: bool) -> Plan {
        Plan::even_placement(nodes, shape, split_dense, true)
    }

    /// This plan with every whole routed expert also on the `copies - 1` nodes that follow
    /// its node (in node order, wrapping): with [`Plan::even`] over N nodes and 2 copies,
    /// the experts of node i are also on node i+1, so any one node can die and every expert
    /// keeps a live replica (failover). Routed slices (`ff` set) and dense parts keep their
    /// single node: a node holding two slices of a replicated expert cannot be planned for.
    /// `copies` is capped at the node count.
    pub fn with_replicas(mut self, copies: usize) -> Plan {
        let n = self.nodes.len();
        let copies = copies.clamp(1, n.max(1));
        for e in &mut self.entries {
            if e.part != Part::Routed || e.ff.is_some() || e.nodes.len() != 1 {
                continue;
            }
            let Some(first) = self.nodes.iter().position(|x| *x == e.nodes[0]) else {
                continue;
            };
            e.nodes = (0..copies)
                .map(|k| self.nodes[(first + k) % n].clone())
                .collect();
        }
        self
    }

    fn even_placement(
        nodes: &[String],
        shape: &ModelShape,
        split_dense: bool,
        slice_routed: bool,
    ) -> Plan {
        let n_nodes = nodes.len();
        // Slices that differ only in their layer share one entry.
        struct Group {
            part: Part,
            experts: IdList,
            ff: Option<Range<usize>>,
            node: usize,
            layers: Vec<usize>,
        }
        let mut groups: Vec<Group> = Vec::new();
        let mut add =
            |part: Part, experts: IdList, ff: Option<Range<usize>>, node: usize, layer: usize| {
                match groups.iter_mut().find(|g| {
                    g.part == part && g.experts == experts && g.ff == ff && g.node == node
                }) {
                    Some(g) => g.layers.push(layer),
                    None => groups.push(Group {
                        part,
                        experts,
                        ff,
                        node,
                        layers: vec![layer],
                    }),
                }
            };
        if n_nodes > 0 {
            let n_expert = shape.n_expert;
            for (layer, ls) in shape.layers.iter().enumerate() {
                if let (Some(routed), true) = (ls.routed, slice_routed) {
                    // (node, ff) → the experts that get that share in this layer.
                    let mut shares: Vec<(usize, Range<usize>, Vec<usize>)> = Vec::new();
                    for expert in 0..n_expert {
                        let cut = even_shares(routed.n_ff, routed.block, n_nodes, layer + expert);
                        for (node, ff) in cut.into_iter().enumerate() {
                            if ff.is_empty() {
                                continue;
                            }
                            match shares.iter_mut().find(|(n, f, _)| *n == node && *f == ff) {
                                Some((_, _, experts)) => experts.push(expert),
                                None => shares.push((node, ff, vec![expert])),
                            }
                        }
                    }
                    for (node, ff, experts) in shares {
                        let ff = (ff != (0..routed.n_ff)).then_some(ff);
                        if let Some(experts) = IdList::from_ids(experts) {
                            add(Part::Routed, experts, ff, node, layer);
                        }
                    }
                } else if ls.routed.is_some() {
                    for node in 0..n_nodes {
                        let start = n_expert * node / n_nodes;
                        let end = n_expert * (node + 1) / n_nodes;
                        if let Some(experts) = IdList::from_ids(start..end) {
                            add(Part::Routed, experts, None, node, layer);
                        }
                    }
                }
            }
            if split_dense {
                for (layer, ls) in shape.layers.iter().enumerate() {
                    let Some(dense) = ls.dense else { continue };
                    for (node, ff) in even_shares(dense.n_ff, dense.block, n_nodes, layer)
                        .into_iter()
                        .enumerate()
                    {
                        if ff.is_empty() {
                            continue;
                        }
                        let ff = (ff != (0..dense.n_ff)).then_some(ff);
                        add(Part::Dense, IdList::single(0), ff, node, layer);
                    }
                }
            }
        }
        let entries = groups
            .into_iter()
            .map(|g| PlanEntry {
                part: g.part,
                // `layers` is never empty: a group starts with one.
                layers: IdList::from_ids(g.layers).unwrap_or_else(|| IdList::single(0)),
                experts: g.experts,
                ff: g.ff,
                nodes: vec![nodes[g.node].clone()],
            })
            .collect();
        Plan {
            model_identity: None,
            nodes: nodes.to_vec(),
            entries,
        }
    }
}

/// Rows of an `n_ff`-row FFN for each of `n_nodes` nodes, in node order, cut at
/// multiples of `block`; the leftover blocks go to the nodes starting at
/// `(layer * leftover) % n_nodes`.
pub(super) fn even_shares(
    n_ff: usize,
    block: usize,
    n_nodes: usize,
    layer: usize,
) -> Vec<Range<usize>> {
    let block = block.max(1);
    let n_blocks = n_ff.div_ceil(block);
    let base = n_blocks / n_nodes;
    let extra = n_blocks % n_nodes;
    let first_extra = layer.wrapping_mul(extra) % n_nodes;
    let mut out = Vec::with_capacity(n_nodes);
    let mut start_block = 0;
    for node in 0..n_nodes {
        let gets_extra = (node + n_nodes - first_extra) % n_nodes < extra;
        let end_block = start_block + base + usize::from(gets_extra);
        out.push((start_block * block).min(n_ff)..(end_block * block).min(n_ff));
        start_block = end_block;
    }
    out
}

fn string_array(items: &[String]) -> String {
    let quoted: Vec<String> = items
        .iter()
        .map(|s| toml::Value::String(s.clone()).to_string())
        .collect();
    format!("[{}]", quoted.join(", "))
}

/// Writes `bytes` to `<path>.tmp`, syncs it, and renames it to `path`.
pub(super) fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), PlacementError> {
    let io = |op, path: &Path| {
        let path = path.to_path_buf();
        move |cause| PlacementError::Io { op, path, cause }
    };
    let mut tmp_name = path
        .file_name()
        .ok_or_else(|| PlacementError::Io {
            op: "write",
            path: path.to_path_buf(),
            cause: std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a file path"),
        })?
        .to_os_string();
    tmp_name.push(".tmp");
    let tmp = path.with_file_name(tmp_name);
    let result = (|| {
        let mut file = fs::File::create(&tmp).map_err(io("create", &tmp))?;
        file.write_all(bytes).map_err(io("write", &tmp))?;
        file.sync_all().map_err(io("sync", &tmp))?;
        drop(file);
        fs::rename(&tmp, path).map_err(io("rename into place", path))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}
