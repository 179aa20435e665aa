//! `moeshard synth`: a GGUF file with random weights in a real model's exact
//! shapes (`shared::models::shapes`), so a model can be benchmarked and planned
//! for before hundreds of GB are downloaded, and benchmarks get big models.
//!
//! The file streams: the header first, then each tensor in pieces of a few
//! MiB, generated and quantized in parallel (rayon, rows per task) and written
//! through `GgufWriter` under a temporary name renamed at the end, so at most
//! one piece is in memory and a failure leaves no file under the final name.
//! Every value depends only on (seed, tensor name, row, column): the same seed
//! gives the same bytes on any number of threads.
//!
//! The weights have a trained model's scales, not its knowledge (see
//! `shapes::TensorSpec::init`): logits are finite with a spread, routing is
//! spread over the experts. The tokenizer is `tokenizer.ggml.model = "none"`,
//! which llama.cpp accepts (it makes `vocab_size` dummy tokens); moeshard's
//! `eval`, `generate --tokens` and `bench` need no tokenizer.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::mpsc;

use rayon::prelude::*;
use shared::gguf::{GgufError, GgufWriter, MetaValue, TensorDesc, TensorInfo};
use shared::models::shapes::{self, ModelShape, TensorSpec, TypeRecipe};
use shared::quant::GgmlType;

/// What to synthesize.
#[derive(Clone, Debug)]
pub struct SynthConfig {
    /// A name from `shapes::all()` (`deepseek-v3`, `qwen3-30b-a3b`...).
    pub shape: String,
    /// A ggml type name, or a llama-quantize mix (`Q4_K_M`, `Q2_K`); see [`Quant`].
    pub quant: String,
    /// Keep only this many layers (MTP layers are kept in addition).
    pub layers: Option<usize>,
    /// Vocabulary size instead of the model's.
    pub vocab: Option<usize>,
    /// Routed experts per layer instead of the model's (tests; not a CLI flag).
    pub experts: Option<usize>,
    /// Hidden size instead of the model's (tests; not a CLI flag): small models with a
    /// real model's expert count and routing.
    pub hidden: Option<usize>,
    pub seed: u64,
    /// Write the header and leave every tensor's data a hole (a sparse file of the full
    /// size, reading as zeros): enough for `moeshard plan` and `inspect` on models far
    /// larger than the disk.
    pub header_only: bool,
    /// Worker threads; `None` is rayon's default (all cores).
    pub threads: Option<usize>,
    pub out: PathBuf,
}

/// Why a model could not be synthesized.
#[derive(Debug, thiserror::Error)]
pub enum SynthError {
    #[error("unknown shape '{name}' (known: {known})")]
    UnknownShape { name: String, known: String },
    #[error("unknown quantization '{name}' (known: {known})")]
    UnknownQuant { name: String, known: String },
    #[error("{0}")]
    BadValue(String),
    #[error("cannot start {threads} worker threads: {why}")]
    Threads { threads: usize, why: String },
    #[error(transparent)]
    Gguf(#[from] GgufError),
}

/// The type choice of `--quant`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Quant {
    /// Every matrix of this type.
    Uniform(GgmlType),
    /// llama-quantize's `Q4_K_M` mix.
    Q4KM,
    /// llama-quantize's `Q2_K` mix (uniform Q2_K is not what anyone ships).
    Q2K,
    /// llama-quantize's `Q3_K_M` mix.
    Q3KM,
}

/// The `--quant` names, in the order they are listed in errors.
const QUANT_NAMES: &[&str] = &[
    "F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q4_K_M",
    "Q5_K", "Q6_K", "Q3_K_M",
];

impl Quant {
    /// Parses a `--quant` name (case-insensitive).
    pub fn parse(name: &str) -> Result<Quant, SynthError> {
        let upper = name.to_ascii_uppercase();
        let quant = match upper.as_str() {
            "Q4_K_M" => Some(Quant::Q4KM),
            "Q2_K" => Some(Quant::Q2K),
            "Q3_K_M" => Some(Quant::Q3KM),
            _ if QUANT_NAMES.contains(&upper.as_str()) => {
                GgmlType::from_name(&upper).map(Quant::Uniform)
            }
            _ => None,
        };
        quant.ok_or_else(|| SynthError::UnknownQuant {
            name: name.to_owned(),
            known: QUANT_NAMES.join(", "),
        })
    }

    fn name(self) -> String {
        match self {
            Quant::Uniform(t) => t.name().to_owned(),
            Quant::Q4KM => "Q4_K_M".to_owned(),
            Quant::Q2K => "Q2_K".to_owned(),
            Quant::Q3KM => "Q3_K_M".to_owned(),
        }
    }
}

/// A tensor whose row length does not fit its type, and what it got instead.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fallback {
    pub tensor: String,
    pub wanted: GgmlType,
    pub got: GgmlType,
}

/// The resolved model: shape, metadata and tensor table with final types.
#[derive(Clone, Debug)]
pub struct SynthPlan {
    pub shape: ModelShape,
    pub quant: Quant,
    pub metadata: Vec<(String, MetaValue)>,
    pub tensors: Vec<TensorSpec>,
    pub fallbacks: Vec<Fallback>,
}

/// What [`synth`] wrote.
#[derive(Clone, Debug)]
pub struct SynthReport {
    pub bytes: u64,
    pub n_tensors: usize,
    pub fallbacks: Vec<Fallback>,
}

/// Resolves a configuration into a header (nothing written): checks the
/// shape, quantization and sizes, and picks every tensor's type.
pub fn plan(cfg: &SynthConfig) -> Result<SynthPlan, SynthError> {
    let known = || {
        shapes::all()
            .iter()
            .map(|s| s.name)
            .collect::<Vec<_>>()
            .join(", ")
    };
    let shape = shapes::by_name(&cfg.shape).ok_or_else(|| SynthError::UnknownShape {
        name: cfg.shape.clone(),
        known: known(),
    })?;
    let quant = Quant::parse(&cfg.quant)?;
    if cfg.layers == Some(0) {
        return Err(SynthError::BadValue(
            "--layers must be at least 1".to_owned(),
        ));
    }
    if cfg.vocab == Some(0) {
        return Err(SynthError::BadValue(
            "--vocab must be at least 1".to_owned(),
        ));
    }
    if cfg.threads == Some(0) {
        return Err(SynthError::BadValue(
            "--threads must be at least 1".to_owned(),
        ));
    }
    let mut shape = shape.truncated(cfg.layers, cfg.vocab);
    if let Some(n) = cfg.experts {
        shape = shape.with_experts(n).map_err(SynthError::BadValue)?;
    }
    if let Some(h) = cfg.hidden {
        if h == 0 || h % 256 != 0 {
            return Err(SynthError::BadValue(format!(
                "hidden size {h}: a multiple of 256 (whole K-quant blocks) is needed"
            )));
        }
        shape.n_embd = h;
    }

    let mut tensors = shape.tensors(&TypeRecipe::uniform(GgmlType::F32));
    let mut fallbacks = Vec::new();
    for t in &mut tensors {
        let wanted = tensor_type(quant, &shape, t);
        let got = fallback_type(wanted, t.ne[0]);
        if got != wanted {
            fallbacks.push(Fallback {
                tensor: t.name.clone(),
                wanted,
                got,
            });
        }
        t.ty = got;
    }

    let mut metadata = shape.metadata();
    let description = format!(
        "synthetic random weights in the shape of {} ({} layers, vocabulary {}, {}), seed {}, written by moeshard synth",
        shape.name,
        shape.n_layer,
        shape.n_vocab,
        quant.name(),
        cfg.seed
    );
    metadata.push((
        "general.description".to_owned(),
        MetaValue::String(description),
    ));
    metadata.push((
        "tokenizer.ggml.model".to_owned(),
        MetaValue::String("none".to_owned()),
    ));
    Ok(SynthPlan {
        shape,
        quant,
        metadata,
        tensors,
        fallbacks,
    })
}

/// Writes the synthetic model of `cfg`; `progress` gets (bytes written, total bytes).
pub fn synth(
    cfg: &SynthConfig,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<SynthReport, SynthError> {
    let plan = plan(cfg)?;
    log_fallbacks(&plan.fallbacks);
    let pool = {
        let mut b = rayon::ThreadPoolBuilder::new();
        if let Some(n) = cfg.threads {
            b = b.num_threads(n);
        }
        b.build().map_err(|e| SynthError::Threads {
            threads: cfg.threads.unwrap_or(0),
            why: e.to_string(),
        })?
    };
    let descs: Vec<TensorDesc> = plan
        .tensors
        .iter()
        .map(|t| TensorDesc::new(t.name.clone(), t.ty, t.ne.clone()))
        .collect();
    let mut writer = GgufWriter::create(&cfg.out, plan.metadata.clone(), descs)?;
    let align = writer.alignment();
    let total = writer.data_offset()
        + writer
            .tensors()
            .iter()
            .map(|t| t.byte_len.next_multiple_of(align))
            .sum::<u64>();
    progress(writer.data_offset(), total);
    if cfg.header_only {
        for _ in 0..plan.tensors.len() {
            writer.skip_tensor_data()?;
        }
        writer.finish()?;
        progress(total, total);
        return Ok(SynthReport {
            bytes: total,
            n_tensors: plan.tensors.len(),
            fallbacks: plan.fallbacks,
        });
    }
    tracing::info!(
        shape = plan.shape.name,
        quant = %plan.quant.name(),
        bytes = total,
        path = %cfg.out.display(),
        "synthesizing"
    );

    // Generation runs on its own thread (and the pool) while this one writes:
    // on a disk slower than the generator the two overlap instead of adding.
    let infos = writer.tensors().to_vec();
    let (full_tx, full_rx) = mpsc::sync_channel::<(usize, Vec<u8>)>(1);
    let (empty_tx, empty_rx) = mpsc::channel::<Vec<u8>>();
    for _ in 0..BUFFERS {
        // Cannot fail: the receiver is alive.
        let _ = empty_tx.send(Vec::new());
    }
    let (tensors, infos_ref, pool_ref, seed) = (&plan.tensors, &infos, &pool, cfg.seed);
    std::thread::scope(|scope| -> Result<(), SynthError> {
        scope.spawn(move || generate(tensors, infos_ref, seed, pool_ref, &empty_rx, full_tx));
        // Owned here, so that an error return drops them and unblocks the
        // generator before the scope waits for it.
        let (full_rx, empty_tx) = (full_rx, empty_tx);
        let mut within = (usize::MAX, 0u64);
        for (idx, piece) in full_rx.iter() {
            writer.write_tensor_part(&piece)?;
            if within.0 != idx {
                within = (idx, 0);
            }
            within.1 += piece.len() as u64;
            progress(writer.data_offset() + infos[idx].offset + within.1, total);
            // The generator may be gone only if it finished: nothing to do then.
            let _ = empty_tx.send(piece);
        }
        Ok(())
    })?;
    writer.finish()?;
    progress(total, total);
    Ok(SynthReport {
        bytes: total,
        n_tensors: plan.tensors.len(),
        fallbacks: plan.fallbacks,
    })
}

/// Makes every tensor's data in pieces of about [`PIECE_BYTES`], in file
/// order, taking buffers from `empty` and sending them to `full`; stops early
/// when the writer goes away (it failed).
fn generate(
    tensors: &[TensorSpec],
    infos: &[TensorInfo],
    seed: u64,
    pool: &rayon::ThreadPool,
    empty: &mpsc::Receiver<Vec<u8>>,
    full: mpsc::SyncSender<(usize, Vec<u8>)>,
) {
    for (idx, (spec, info)) in tensors.iter().zip(infos).enumerate() {
        let ne0 = spec.ne[0] as usize;
        let row_bytes = info.row_bytes() as usize;
        let n_rows = info.n_rows();
        let init = spec.init();
        let rows_per_piece = (PIECE_BYTES / row_bytes.max(1)).max(1) as u64;
        let mut row0 = 0u64;
        while row0 < n_rows {
            let Ok(mut buf) = empty.recv() else {
                return;
            };
            let rows = rows_per_piece.min(n_rows - row0);
            buf.resize(rows as usize * row_bytes, 0);
            pool.install(|| {
                buf.par_chunks_mut(row_bytes)
                    .enumerate()
                    .with_min_len(ROWS_PER_TASK_MIN)
                    .for_each_init(
                        || vec![0f32; ne0],
                        |vals, (i, dst)| {
                            shapes::fill_row(seed, &spec.name, row0 + i as u64, init, vals);
                            shared::quant::reference::quantize_weights_row(spec.ty, vals, dst);
                        },
                    );
            });
            if full.send((idx, buf)).is_err() {
                return;
            }
            row0 += rows;
        }
    }
}

/// Pieces in flight: one being generated, one being written.
const BUFFERS: usize = 2;
/// Bytes generated before each write: large enough to keep every core busy,
/// small enough that memory stays flat whatever the model's size.
const PIECE_BYTES: usize = 16 << 20;
/// Rows per rayon task at least, so small rows do not drown in scheduling.
const ROWS_PER_TASK_MIN: usize = 16;

/// One warning per (wanted, got) pair, as llama-quantize warns per tensor.
fn log_fallbacks(fallbacks: &[Fallback]) {
    let mut groups: BTreeMap<(GgmlType, GgmlType), Vec<&str>> = BTreeMap::new();
    for f in fallbacks {
        groups.entry((f.wanted, f.got)).or_default().push(&f.tensor);
    }
    for ((wanted, got), names) in groups {
        tracing::warn!(
            "{} tensor(s) with a row length that is not a multiple of the {wanted} block fall back to {got}, as llama-quantize does (e.g. {})",
            names.len(),
            names[0]
        );
    }
}

/// Whether llama-quantize would quantize this tensor: norms, biases and
/// routers (`ffn_gate_inp`, `exp_probs_b`) stay F32 in llama.cpp's files.
fn is_quantized(spec: &TensorSpec) -> bool {
    spec.ne.len() >= 2
        && !spec.name.ends_with("norm.weight")
        && !spec.name.ends_with(".bias")
        && !spec.name.contains("ffn_gate_inp")
}

/// llama-quantize's `use_more_bits`: the first and last eighth of the layers
/// and every third one between.
fn use_more_bits(i_layer: usize, n_layer: usize) -> bool {
    i_layer < n_layer / 8
        || i_layer >= 7 * n_layer / 8
        || (i_layer as i64 - (n_layer / 8) as i64) % 3 == 2
}

/// The layer of a `blk.N.` tensor.
fn layer_of(name: &str) -> Option<usize> {
    name.strip_prefix("blk.")?.split('.').next()?.parse().ok()
}

/// A tensor's type under `quant`, before the block-size fallback.
///
/// The mixes follow `llama_tensor_get_type` in llama.cpp's
/// `src/llama-quant.cpp` (without an importance matrix) for the tensors these
/// shapes have: `output` gets Q6_K; `attn_v` Q6_K on the `use_more_bits`
/// layers (Q4_K_M) or Q4_K/Q3_K by GQA ratio (Q2_K), Q8_0 with 8 experts;
/// `attn_k` Q8_0 with 8 experts; every `ffn_down*` (dense, shared and routed)
/// Q6_K on the `use_more_bits` layers (Q4_K_M) or Q3_K (Q2_K); `attn_output`
/// Q5_K with 8 experts, Q3_K otherwise under Q2_K. Simplified: the layer
/// count is `block_count` (MTP included) as llama.cpp's, but `attn_v`'s
/// counter is taken as the layer number; model-size special cases (70B
/// dense, Falcon) and the user overrides (`--tensor-type`...) do not apply;
/// MLA's `attn_k_b`/`attn_v_b` and the MTP block get the default type.
///
/// `Q3_K_M`: default Q3_K; `output` Q6_K; `attn_v` Q5_K on the first two layers, Q4_K
/// after (Q8_0 with 8 experts); `ffn_down*` Q5_K on the first sixteenth of the layers,
/// Q4_K after; `attn_output` Q4_K (Q5_K with 8 experts).
pub fn tensor_type(quant: Quant, shape: &ModelShape, spec: &TensorSpec) -> GgmlType {
    if !is_quantized(spec) {
        return GgmlType::F32;
    }
    let (default, q4km) = match quant {
        Quant::Uniform(t) => return t,
        Quant::Q4KM => (GgmlType::Q4_K, true),
        Quant::Q2K => (GgmlType::Q2_K, false),
        Quant::Q3KM => return q3km_type(shape, spec),
    };
    let name = spec.name.as_str();
    let n_layer = shape.n_layer_all();
    let layer = layer_of(name).unwrap_or(0);
    let eight_experts = shape.n_expert == 8;
    if name == "output.weight" {
        return GgmlType::Q6_K;
    }
    if name.ends_with("attn_v.weight") {
        if eight_experts {
            return GgmlType::Q8_0;
        }
        return if q4km {
            if use_more_bits(layer, n_layer) {
                GgmlType::Q6_K
            } else {
                default
            }
        } else if shape.n_head / shape.n_head_kv.max(1) >= 4 {
            GgmlType::Q4_K
        } else {
            GgmlType::Q3_K
        };
    }
    if name.ends_with("attn_k.weight") && eight_experts {
        return GgmlType::Q8_0;
    }
    if name.contains("ffn_down") {
        return if !q4km {
            GgmlType::Q3_K
        } else if use_more_bits(layer, n_layer) {
            GgmlType::Q6_K
        } else {
            default
        };
    }
    if name.ends_with("attn_output.weight") {
        if eight_experts {
            return GgmlType::Q5_K;
        }
        if !q4km {
            return GgmlType::Q3_K;
        }
    }
    default
}

/// [`tensor_type`] under `Q3_K_M` (a quantized tensor).
fn q3km_type(shape: &ModelShape, spec: &TensorSpec) -> GgmlType {
    let name = spec.name.as_str();
    let n_layer = shape.n_layer_all();
    let layer = layer_of(name).unwrap_or(0);
    let eight_experts = shape.n_expert == 8;
    if name == "output.weight" {
        GgmlType::Q6_K
    } else if name.ends_with("attn_v.weight") {
        if eight_experts {
            GgmlType::Q8_0
        } else if layer < 2 {
            GgmlType::Q5_K
        } else {
            GgmlType::Q4_K
        }
    } else if name.ends_with("attn_k.weight") && eight_experts {
        GgmlType::Q8_0
    } else if name.contains("ffn_down") {
        if layer < n_layer / 16 {
            GgmlType::Q5_K
        } else {
            GgmlType::Q4_K
        }
    } else if name.ends_with("attn_output.weight") {
        if eight_experts {
            GgmlType::Q5_K
        } else {
            GgmlType::Q4_K
        }
    } else {
        GgmlType::Q3_K
    }
}

/// llama-quantize's `tensor_type_fallback`: a row of `ne0` that is not whole
/// blocks of `ty` takes the next type with 32-element blocks, or F16.
pub fn fallback_type(ty: GgmlType, ne0: u64) -> GgmlType {
    let fits = |t: GgmlType| ne0.is_multiple_of(t.block_elems() as u64);
    if fits(ty) {
        return ty;
    }
    let next = match ty {
        GgmlType::Q2_K | GgmlType::Q3_K => GgmlType::Q4_0,
        GgmlType::Q4_K => GgmlType::Q5_0,
        GgmlType::Q5_K => GgmlType::Q5_1,
        GgmlType::Q6_K => GgmlType::Q8_0,
        other => other,
    };
    if fits(next) {
        next
    } else {
        GgmlType::F16
    }
}

#[cfg(test)]
mod tests;
