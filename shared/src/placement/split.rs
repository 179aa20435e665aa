//! Split files: one GGUF per node holding only that node's slices, so each host
//! stores only its share (`moeshard split`).
//!
//! The convention, which the expert node reads:
//! - metadata: every key/value of the original in order, except gguf-split's
//!   `split.*` keys (they describe how the original is stored and would send a
//!   reader looking for other parts), then [`KEY_MODEL_IDENTITY`] (64 lowercase
//!   hex digits: [`crate::gguf::model_identity`] of the original), [`KEY_NODE`]
//!   and [`KEY_SLICES`] (u32 array, five per slice: layer, part id (0 routed,
//!   1 dense), expert, ff_start, ff_len; sorted);
//! - tensors, per slice in that order, each of its original's type:
//!   `moeshard.blk.{L}.{routed|dense}.{E}.ffn_gate` `[n_embd, ff_len]` (rows
//!   `ff_start..` of that expert's gate), `.ffn_up` likewise, `.ffn_down`
//!   `[n_ff, rows]`: the whole rows of down it computes
//!   ([`super::slice_down_rows`]; all `n_embd` of them for a whole expert),
//!   contiguous in the original too. A merged `ffn_gate_up_exps` is split into its
//!   gate and up halves. Nothing else.
//!
//! Tensor names carry no row range, so a split file holds at most one slice
//! of each (layer, part, expert): [`write_node_file`] refuses a node that the
//! plan gives two slices of one expert (say a slice and a replica of the
//! next), naming them. Such a node can serve from the whole model file.
//!
//! Files are written through [`GgufWriter`]: to `<out>.tmp`, renamed into place
//! once complete, the temporary removed on any error, so an interrupted split
//! never leaves a file under the final name.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};

use super::shape::{FfnTensors, RowSource};
use super::{
    identity_hex, is_valid_node_name, parse_identity_hex, ModelShape, Part, PlacementError,
    ResolvedPlan, SliceRef, SliceSpec,
};
use crate::gguf::{
    model_identity, GgufFile, GgufWriter, MetaArray, MetaType, MetaValue, TensorDesc, TensorInfo,
};
use crate::models::HParams;

/// Metadata key: the original model's identity, 64 lowercase hex digits.
pub const KEY_MODEL_IDENTITY: &str = "moeshard.split.model_identity";
/// Metadata key: the node the file is for.
pub const KEY_NODE: &str = "moeshard.split.node";
/// Metadata key: the slices, five u32 per slice (layer, part, expert, ff_start, ff_len).
pub const KEY_SLICES: &str = "moeshard.split.slices";

/// The matrices of a slice, in the order they are written.
pub const MATRICES: [&str; 3] = ["ffn_gate", "ffn_up", "ffn_down"];

/// What a split file says about itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SplitInfo {
    /// The identity of the model it was split from.
    pub model_identity: [u8; 32],
    /// The node it is for.
    pub node: String,
    /// Its slices, sorted.
    pub slices: Vec<SliceSpec>,
}

/// The name of a slice's tensor in a split file:
/// `moeshard.blk.{layer}.{routed|dense}.{expert}.{matrix}`, `matrix` one of [`MATRICES`].
pub fn split_tensor_name(layer: u32, part: Part, expert: u32, matrix: &str) -> String {
    format!("moeshard.blk.{layer}.{part}.{expert}.{matrix}")
}

/// The file name `moeshard split` gives node `node`'s file of the model at
/// `model`: `{stem}.{node}.gguf`, the stem being the model's file name without
/// `.gguf` and without a gguf-split `-00001-of-00003` suffix.
pub fn split_file_name(model: &Path, node: &str) -> PathBuf {
    let name = model
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".to_string());
    let mut stem = name.strip_suffix(".gguf").unwrap_or(&name);
    if let Some(cut) = gguf_split_suffix(stem) {
        stem = &stem[..cut];
    }
    PathBuf::from(format!("{stem}.{node}.gguf"))
}

/// Where a `-NNNNN-of-NNNNN` suffix starts in `stem`, if it has one.
fn gguf_split_suffix(stem: &str) -> Option<usize> {
    let b = stem.as_bytes();
    let n = "-00001-of-00003".len();
    if b.len() < n {
        return None;
    }
    let tail = &b[b.len() - n..];
    let digits = |r: std::ops::Range<usize>| tail[r].iter().all(u8::is_ascii_digit);
    (tail[0] == b'-' && digits(1..6) && &tail[6..10] == b"-of-" && digits(10..15))
        .then_some(b.len() - n)
}

/// The first (layer, part, expert) of which `node_slices` (sorted) holds two
/// slices, as (the first slice, the second).
fn two_slices_of_one_expert(node_slices: &[SliceSpec]) -> Option<(SliceSpec, SliceSpec)> {
    node_slices.windows(2).find_map(|w| {
        ((w[0].layer, w[0].part, w[0].expert) == (w[1].layer, w[1].part, w[1].expert))
            .then_some((w[0], w[1]))
    })
}

/// Reads a split file's self-description: `None` for an ordinary model file,
/// an error when the split keys are incomplete or malformed, a slice is out of
/// the model's range, or a slice's three tensors are missing or misshapen.
pub fn read_split_info(file: &GgufFile) -> Result<Option<SplitInfo>, PlacementError> {
    let bad = |why: String| PlacementError::Split(why);
    let keys = [KEY_MODEL_IDENTITY, KEY_NODE, KEY_SLICES].map(|k| file.get(k));
    let [Some(identity), Some(node), Some(slices)] = keys else {
        if let Some(i) = keys.iter().position(Option::is_some) {
            let missing: Vec<&str> = [KEY_MODEL_IDENTITY, KEY_NODE, KEY_SLICES]
                .into_iter()
                .zip(keys)
                .filter_map(|(k, v)| v.is_none().then_some(k))
                .collect();
            return Err(bad(format!(
                "has {} but not {}",
                [KEY_MODEL_IDENTITY, KEY_NODE, KEY_SLICES][i],
                missing.join(", ")
            )));
        }
        return Ok(None);
    };
    let model_identity = identity
        .as_str()
        .and_then(parse_identity_hex)
        .ok_or_else(|| {
            bad(format!(
                "{KEY_MODEL_IDENTITY} is {identity}, not 64 hex digits"
            ))
        })?;
    let node = node
        .as_str()
        .filter(|n| is_valid_node_name(n))
        .ok_or_else(|| bad(format!("{KEY_NODE} is {node}, not a node name")))?
        .to_string();
    let values = slices
        .as_array()
        .filter(|a| a.elem_type == MetaType::U32)
        .and_then(MetaArray::as_u32_vec)
        .ok_or_else(|| bad(format!("{KEY_SLICES} is not an array of u32")))?;
    if !values.len().is_multiple_of(5) {
        return Err(bad(format!(
            "{KEY_SLICES} has {} values, not five per slice",
            values.len()
        )));
    }
    let hp = HParams::from_gguf(file)?;
    let mut specs: Vec<SliceSpec> = Vec::with_capacity(values.len() / 5);
    for (i, v) in values.chunks_exact(5).enumerate() {
        let part = Part::from_id(v[1]).ok_or_else(|| {
            bad(format!(
                "slice {i}: part {} is not 0 (routed) or 1 (dense)",
                v[1]
            ))
        })?;
        let spec = SliceSpec {
            layer: v[0],
            part,
            expert: v[2],
            ff_start: v[3],
            ff_len: v[4],
        };
        if let Some(prev) = specs.last() {
            if (prev.layer, prev.part, prev.expert) == (spec.layer, spec.part, spec.expert) {
                return Err(bad(format!(
                    "slices {} and {i} are both of layer {} {} expert {}: a split file holds one slice per expert",
                    i - 1,
                    spec.layer,
                    spec.part,
                    spec.expert
                )));
            }
            if prev > &spec {
                return Err(bad(format!(
                    "slice {i} ({spec:?}) comes before slice {} ({prev:?}): slices must be sorted",
                    i - 1
                )));
            }
        }
        check_spec(file, &hp, i, &spec)?;
        specs.push(spec);
    }
    Ok(Some(SplitInfo {
        model_identity,
        node,
        slices: specs,
    }))
}

/// Checks one listed slice against the hyperparameters and its tensors.
fn check_spec(
    file: &GgufFile,
    hp: &HParams,
    i: usize,
    spec: &SliceSpec,
) -> Result<(), PlacementError> {
    let bad = |why: String| PlacementError::Split(format!("slice {i} ({spec:?}): {why}"));
    let layer = spec.layer as usize;
    if layer >= hp.n_layer {
        return Err(bad(format!("the model has {} layers", hp.n_layer)));
    }
    let n_ff = match spec.part {
        Part::Routed if !hp.is_moe_layer(layer) => return Err(bad("not a MoE layer".to_string())),
        Part::Routed if spec.expert as usize >= hp.n_expert => {
            return Err(bad(format!("the model has {} experts", hp.n_expert)))
        }
        Part::Routed => hp.n_ff_exp,
        Part::Dense if spec.expert != 0 => {
            return Err(bad("a dense part has only expert 0".to_string()))
        }
        Part::Dense if hp.is_moe_layer(layer) => hp.n_ff_shexp,
        Part::Dense => hp.n_ff,
    };
    if spec.ff_len == 0 || spec.ff().end > n_ff {
        return Err(bad(format!(
            "rows {:?} are not inside 0..{n_ff}",
            spec.ff()
        )));
    }
    let n_embd = hp.n_embd as u64;
    let ff_len = u64::from(spec.ff_len);
    let rows = super::slice_down_rows(
        spec.ff_start as usize,
        spec.ff_len as usize,
        n_ff,
        hp.n_embd,
    );
    let down = [n_ff as u64, rows.len() as u64];
    for (matrix, expected) in MATRICES
        .into_iter()
        .zip([[n_embd, ff_len], [n_embd, ff_len], down])
    {
        let name = split_tensor_name(spec.layer, spec.part, spec.expert, matrix);
        let info = file
            .tensor(&name)
            .ok_or_else(|| bad(format!("tensor {name} is missing")))?;
        if info.ne != expected {
            return Err(bad(format!(
                "tensor {name} has shape {:?}, expected {expected:?}",
                info.ne
            )));
        }
    }
    Ok(())
}

/// Writes node `node`'s split file of `model` under `plan` to `out` (through
/// `<out>.tmp`), calling `progress(bytes_done, bytes_total)` over the tensor
/// data as it goes. Returns the file's size in bytes.
///
/// Refuses a plan that names another model or was resolved against another
/// shape, and a model that is itself a split file.
pub fn write_node_file(
    model: &GgufFile,
    plan: &ResolvedPlan,
    node: usize,
    out: &Path,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<u64, PlacementError> {
    let node_name = plan.nodes().get(node).ok_or_else(|| {
        PlacementError::Split(format!(
            "node index {node} is out of range (the plan has {} nodes)",
            plan.nodes().len()
        ))
    })?;
    if let Some(key) = model
        .metadata()
        .iter()
        .map(|(k, _)| k)
        .find(|k| k.starts_with("moeshard.split."))
    {
        return Err(PlacementError::Split(format!(
            "the model is itself a split file ({key}); split the original model"
        )));
    }
    let identity = model_identity(model);
    if let Some(plan_identity) = plan.model_identity() {
        if plan_identity != identity {
            return Err(PlacementError::IdentityMismatch {
                plan: identity_hex(&plan_identity),
                model: identity_hex(&identity),
            });
        }
    }
    let shape = ModelShape::from_gguf(model)?;
    if &shape != plan.shape() {
        return Err(PlacementError::Split(
            "the plan was resolved against a model of another shape".to_string(),
        ));
    }
    let hp = HParams::from_gguf(model)?;
    let slices = plan.node_slices(node);
    if let Some((a, b)) = two_slices_of_one_expert(&slices) {
        let what = SliceRef {
            layer: a.layer as usize,
            part: a.part,
            expert: a.expert as usize,
        };
        return Err(PlacementError::Split(format!(
            "the plan gives node {node_name:?} two slices of {what} (rows {:?} and {:?}); a split file holds one slice per expert (serve this node from the whole model file, or give it one slice per expert)",
            a.ff(),
            b.ff()
        )));
    }

    // The tensors behind each (layer, part) the node holds.
    let mut ffns: HashMap<(u32, Part), FfnTensors<'_>> = HashMap::new();
    for s in &slices {
        if let std::collections::hash_map::Entry::Vacant(v) = ffns.entry((s.layer, s.part)) {
            let t = FfnTensors::find(model, &hp, s.layer as usize, s.part)?.ok_or_else(|| {
                PlacementError::Split(format!("layer {} has no {} FFN tensors", s.layer, s.part))
            })?;
            v.insert(t);
        }
    }

    let mut metadata: Vec<(String, MetaValue)> = model
        .metadata()
        .iter()
        .filter(|(k, _)| !k.starts_with("split."))
        .cloned()
        .collect();
    metadata.push((
        KEY_MODEL_IDENTITY.to_string(),
        identity_hex(&identity).into(),
    ));
    metadata.push((KEY_NODE.to_string(), node_name.clone().into()));
    let values = slices
        .iter()
        .flat_map(|s| [s.layer, s.part.id(), s.expert, s.ff_start, s.ff_len])
        .map(MetaValue::U32)
        .collect();
    metadata.push((
        KEY_SLICES.to_string(),
        MetaValue::Array(MetaArray::new(MetaType::U32, values)),
    ));

    let mut descs = Vec::with_capacity(3 * slices.len());
    for s in &slices {
        let t = &ffns[&(s.layer, s.part)];
        let len = u64::from(s.ff_len);
        let n_embd = t.n_embd as u64;
        let name = |m| split_tensor_name(s.layer, s.part, s.expert, m);
        descs.push(TensorDesc::new(
            name("ffn_gate"),
            t.gate.info.ty,
            [n_embd, len],
        ));
        descs.push(TensorDesc::new(name("ffn_up"), t.up.info.ty, [n_embd, len]));
        let down = [t.n_ff as u64, down_rows_of(t, s).len() as u64];
        descs.push(TensorDesc::new(name("ffn_down"), t.down.ty, down));
    }

    let mut writer = GgufWriter::create(out, metadata, descs)?;
    let total: u64 = writer.tensors().iter().map(|t| t.byte_len).sum();
    let mut done = 0u64;
    progress(done, total);
    for s in &slices {
        let t = &ffns[&(s.layer, s.part)];
        for rows in [&t.gate, &t.up] {
            let bytes = matrix_rows(model, rows, s)?;
            writer.write_tensor_data(bytes)?;
            done += bytes.len() as u64;
            progress(done, total);
        }
        let bytes = down_rows(model, t, s)?;
        writer.write_tensor_data(bytes)?;
        done += bytes.len() as u64;
        progress(done, total);
    }
    writer.finish()?;
    let size = fs::metadata(out)
        .map_err(|cause| PlacementError::Io {
            op: "stat",
            path: out.to_path_buf(),
            cause,
        })?
        .len();
    tracing::debug!(path = %out.display(), node = %node_name, n_slices = slices.len(), bytes = size, "wrote split file");
    Ok(size)
}

/// The rows of down that slice `s` computes ([`super::slice_down_rows`]).
fn down_rows_of(t: &FfnTensors<'_>, s: &SliceSpec) -> std::ops::Range<usize> {
    super::slice_down_rows(s.ff_start as usize, s.ff_len as usize, t.n_ff, t.n_embd)
}

/// The bytes of the rows of expert `s.expert`'s down (expert 0: a dense part's) that
/// slice `s` computes: contiguous.
fn down_rows<'a>(
    model: &'a GgufFile,
    t: &FfnTensors<'_>,
    s: &SliceSpec,
) -> Result<&'a [u8], PlacementError> {
    let info = t.down;
    let row_bytes = info.row_bytes() as usize;
    let rows = down_rows_of(t, s);
    let first = s.expert as usize * t.n_embd + rows.start;
    check_row_groups(info, first, rows.len())?;
    let (start, end) = (first * row_bytes, (first + rows.len()) * row_bytes);
    model
        .tensor_data(info)
        .get(start..end)
        .ok_or_else(|| out_of_tensor(info, start..end))
}

/// The bytes of rows `s.ff()` of expert `s.expert`'s gate or up: contiguous.
fn matrix_rows<'a>(
    model: &'a GgufFile,
    src: &RowSource<'_>,
    s: &SliceSpec,
) -> Result<&'a [u8], PlacementError> {
    let info: &TensorInfo = src.info;
    let row_bytes = info.row_bytes() as usize;
    let first = s.expert as usize * src.rows_per_expert + src.first_row + s.ff_start as usize;
    check_row_groups(info, first, s.ff_len as usize)?;
    let start = first * row_bytes;
    let end = start + s.ff_len as usize * row_bytes;
    model
        .tensor_data(info)
        .get(start..end)
        .ok_or_else(|| out_of_tensor(info, start..end))
}

/// A Q4_K_R8 tensor's rows can be cut only at whole groups of 8 (a group's rows are
/// interleaved).
fn check_row_groups(info: &TensorInfo, first: usize, len: usize) -> Result<(), PlacementError> {
    let group = crate::quant::rows8::GROUP_ROWS;
    if info.ty == crate::quant::GgmlType::Q4_K_R8
        && !(first.is_multiple_of(group) && len.is_multiple_of(group))
    {
        return Err(PlacementError::Split(format!(
            "rows {first}..{} of {} (Q4_K_R8) are not whole groups of 8; split the unconverted \
             file, or use a plan whose slices are multiples of 8 rows",
            first + len,
            info.name
        )));
    }
    Ok(())
}

fn out_of_tensor(info: &TensorInfo, range: std::ops::Range<usize>) -> PlacementError {
    PlacementError::Split(format!(
        "bytes {range:?} are outside tensor {} ({} bytes)",
        info.name, info.byte_len
    ))
}
