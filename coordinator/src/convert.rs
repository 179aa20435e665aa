//! `moeshard convert --repack`: a copy of a GGUF whose Q4_K matrices are stored in the
//! eight-row interleaved layout ([`shared::quant::rows8`], type `Q4_K_R8`), so that the
//! one-token kernel reads them as they lie in the mapping (no load-time copy) and skips the
//! per-row scale unpacking and horizontal sums of the plain layout.
//!
//! Which tensors: every Q4_K matrix the engine multiplies in CPU_REPACK's order — 2-D
//! weights (attention projections, dense FFNs, shared experts, the output head) and the 3-D
//! routed-expert tensors (`*_exps`) — whose matrices have a multiple of 8 rows. The token
//! embedding (read a row at a time) and everything else stay as they are. The results are
//! bit-identical to the original file's (the same bytes, the same float order).
//!
//! The output is written under a temporary name and renamed when complete, as every GGUF
//! moeshard writes; the data is streamed a few MiB at a time, so a model of hundreds of GB
//! converts in bounded memory.

use std::path::Path;

use shared::gguf::{GgufError, GgufFile, GgufWriter, MetaValue, TensorDesc, TensorInfo};
use shared::quant::rows8::{self, GROUP_ROWS};
use shared::quant::GgmlType;
use thiserror::Error;

/// Metadata key marking a converted file (value: the layout, `Q4_K_R8`).
pub const KEY_REPACK: &str = "moeshard.repack";

/// Bytes of tensor data converted and written per step.
const STEP_BYTES: usize = 8 << 20;

#[derive(Debug, Error)]
pub enum ConvertError {
    #[error(transparent)]
    Gguf(#[from] GgufError),
    #[error("{0} has no Q4_K matrix of a multiple of 8 rows to repack (nothing would change)")]
    NothingToRepack(String),
    #[error("the output {0} is the input file")]
    SameFile(String),
}

/// What [`repack_q4_k`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConvertReport {
    /// Tensors stored as Q4_K_R8.
    pub repacked: usize,
    /// Tensors copied as they were.
    pub copied: usize,
    /// Bytes of tensor data written.
    pub bytes: u64,
}

/// Whether tensor `t` is converted: a Q4_K matrix (or stack of expert matrices) of a
/// multiple of 8 rows that goes through the matmul, not the embedding lookup.
pub fn is_repackable(t: &TensorInfo) -> bool {
    let rows_ok = t.ne.len() >= 2 && t.ne[1].is_multiple_of(GROUP_ROWS as u64);
    let matrix = t.ne.iter().skip(2).all(|&d| d == 1);
    let experts = t.name.contains("_exps.");
    t.ty == GgmlType::Q4_K && rows_ok && (matrix || experts) && t.name != "token_embd.weight"
}

/// Writes `model` to `out` with its repackable Q4_K tensors ([`is_repackable`]) interleaved
/// by eight rows, calling `progress(bytes_done, bytes_total)` as the data goes.
pub fn repack_q4_k(
    model: &GgufFile,
    model_path: &Path,
    out: &Path,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<ConvertReport, ConvertError> {
    if let (Ok(a), Ok(b)) = (model_path.canonicalize(), out.canonicalize()) {
        if a == b {
            return Err(ConvertError::SameFile(out.display().to_string()));
        }
    }
    let repack: Vec<bool> = model.tensors().iter().map(is_repackable).collect();
    if !repack.contains(&true) {
        return Err(ConvertError::NothingToRepack(
            model_path.display().to_string(),
        ));
    }
    let mut metadata: Vec<(String, MetaValue)> = (model.metadata().iter())
        .filter(|(k, _)| !k.starts_with("split.") && k != KEY_REPACK)
        .cloned()
        .collect();
    metadata.push((KEY_REPACK.to_owned(), "Q4_K_R8".to_owned().into()));
    let descs = (model.tensors().iter())
        .zip(&repack)
        .map(|(t, &r)| {
            let ty = if r { GgmlType::Q4_K_R8 } else { t.ty };
            TensorDesc::new(t.name.clone(), ty, t.ne.clone())
        })
        .collect();
    let mut writer = GgufWriter::create(out, metadata, descs)?;
    let total: u64 = model.tensors().iter().map(|t| t.byte_len).sum();
    let mut done = 0u64;
    progress(done, total);
    let mut buf = Vec::new();
    for (t, &r) in model.tensors().iter().zip(&repack) {
        let data = model.tensor_data(t);
        if data.is_empty() {
            writer.write_tensor_data(data)?;
            continue;
        }
        if !r {
            for part in data.chunks(STEP_BYTES) {
                writer.write_tensor_part(part)?;
                done += part.len() as u64;
                progress(done, total);
            }
            continue;
        }
        let row_bytes = t.row_bytes() as usize;
        let group = GROUP_ROWS * row_bytes;
        // Whole groups per step (groups never straddle two experts: each expert's matrix
        // is a multiple of 8 rows).
        let step = (STEP_BYTES / group).max(1) * group;
        for part in data.chunks(step) {
            buf.clear();
            buf.extend_from_slice(part);
            rows8::interleave_matrix(&mut buf, row_bytes);
            writer.write_tensor_part(&buf)?;
            done += part.len() as u64;
            progress(done, total);
        }
    }
    writer.finish()?;
    let repacked = repack.iter().filter(|&&r| r).count();
    Ok(ConvertReport {
        repacked,
        copied: repack.len() - repacked,
        bytes: total,
    })
}
