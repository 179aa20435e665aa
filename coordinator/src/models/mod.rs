//! The dense forward pass of every supported architecture: embeddings,
//! attention with the KV cache, norms, routers, shared experts, dense FFNs and
//! the output head. Routed experts are handed to an [`ExpertExecutor`] — the seam
//! where the in-process node and the network transports plug in.
//!
//! Every operation rounds where ggml's CPU backend rounds (activations quantized
//! to each weight's `vec_dot_type`, f16 K/V, f16 attention probabilities), so
//! logits match llama.cpp's.

pub mod blocks;
mod experts;
mod routing;
pub mod sockets;

use std::sync::Arc;

use rayon::prelude::*;

use shared::gguf::{GgufError, GgufFile, TensorInfo};
use shared::models::{Arch, HParams, ModelError};
use shared::moe::{Assignment, MoeError};
use shared::profile::{self, Phase};
use shared::quant::dispatch::Kernels;
use shared::quant::matmul::{
    matmul_segments, matmul_unrepacked_segments, Activations, Segments, WeightMatrix,
};
use shared::quant::GgmlType;
use thiserror::Error;

pub use experts::{DispatchMetrics, ExpertExecutor, InprocExperts, Pending};

use crate::kv_cache::KvCache;
use crate::routing_stats::RoutingCounter;
use blocks::{add_bias, attend_heads, rms_norm, Rope};

/// Why loading or running a model failed.
#[derive(Debug, Error)]
pub enum EngineError {
    #[error(transparent)]
    Gguf(#[from] GgufError),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("expert computation failed: {0}")]
    Moe(#[from] MoeError),
    #[error("token id {token} out of range (vocabulary of {n_vocab})")]
    BadToken { token: u32, n_vocab: usize },
    #[error("context full: {n_past} positions used + {n_new} new > context of {n_ctx}")]
    ContextFull {
        n_past: usize,
        n_new: usize,
        n_ctx: usize,
    },
    #[error("empty batch")]
    EmptyBatch,
    #[error("expert node failed: {0}")]
    Node(String),
}

/// Which positions of a batch get logits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Logits {
    All,
    Last,
}

/// A weight matrix (2-D, or 3-D per head) of the model file.
#[derive(Clone, Debug)]
struct Weight {
    info: TensorInfo,
}

impl Weight {
    fn n_cols(&self) -> usize {
        self.info.ne[0] as usize
    }
    fn n_rows(&self) -> usize {
        self.info.ne.get(1).copied().unwrap_or(1) as usize
    }
}

struct GqaAttention {
    wq: Weight,
    wk: Weight,
    wv: Weight,
    wo: Weight,
    bq: Option<Vec<f32>>,
    bk: Option<Vec<f32>>,
    bv: Option<Vec<f32>>,
    q_norm: Option<Vec<f32>>,
    k_norm: Option<Vec<f32>>,
}

struct MlaAttention {
    /// `attn_q_a` + its norm, then `attn_q_b`; lite models have only `attn_q` (in `wq_b`).
    wq_a: Option<(Weight, Vec<f32>)>,
    wq_b: Weight,
    wkv_a_mqa: Weight,
    kv_a_norm: Vec<f32>,
    wk_b: Weight,
    wv_b: Weight,
    wo: Weight,
}

enum Attention {
    Gqa(GqaAttention),
    Mla(MlaAttention),
}

struct DenseFfn {
    gate: Weight,
    up: Weight,
    down: Weight,
}

struct MoeFfn {
    gate_inp: Weight,
    gate_inp_bias: Option<Vec<f32>>,
    exp_probs_b: Option<Vec<f32>>,
    shared: Option<DenseFfn>,
    /// qwen2moe: the shared expert's output is scaled by sigmoid(`ffn_gate_inp_shexp`·x).
    shared_gate: Option<Weight>,
    /// Activation types the routed experts' gate/up consume.
    input_types: Vec<GgmlType>,
}

// One per layer: the size difference between variants costs nothing.
#[allow(clippy::large_enum_variant)]
enum Ffn {
    Dense(DenseFfn),
    Moe(MoeFfn),
}

struct Layer {
    attn_norm: Vec<f32>,
    attn: Attention,
    ffn_norm: Vec<f32>,
    ffn: Ffn,
}

/// A loaded model: hyperparameters and views of its dense tensors (expert
/// tensors are the executor's). Nothing is copied but the small f32 vectors
/// (norms, biases).
pub struct Model {
    file: Arc<GgufFile>,
    hp: HParams,
    kernels: &'static Kernels,
    tok_embd: Weight,
    output_norm: Vec<f32>,
    output: Weight,
    layers: Vec<Layer>,
    rope: Rope,
    kq_scale: f32,
    /// Tokens routed per (layer, expert) by every forward pass (`--record-routing`).
    routing: RoutingCounter,
    /// Wall time of every layer of every forward pass (`/metrics`).
    layer_times: LayerTimes,
    /// `--numa auto` on several sockets: the coordinator's matrices cut over them.
    sockets: Option<sockets::SocketSplit>,
}

/// Per layer: the wall time of its forward passes (attention, FFN, residuals; all the
/// tokens of a step at once) and how many there were.
#[derive(Debug)]
pub struct LayerTimes {
    nanos: Vec<std::sync::atomic::AtomicU64>,
    passes: Vec<std::sync::atomic::AtomicU64>,
}

impl LayerTimes {
    fn new(n_layer: usize) -> LayerTimes {
        LayerTimes {
            nanos: (0..n_layer).map(|_| Default::default()).collect(),
            passes: (0..n_layer).map(|_| Default::default()).collect(),
        }
    }

    fn record(&self, layer: usize, took: std::time::Duration) {
        use std::sync::atomic::Ordering::Relaxed;
        let ns = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX);
        self.nanos[layer].fetch_add(ns, Relaxed);
        self.passes[layer].fetch_add(1, Relaxed);
    }

    /// (seconds summed, passes) per layer.
    pub fn snapshot(&self) -> Vec<(f64, u64)> {
        use std::sync::atomic::Ordering::Relaxed;
        self.nanos
            .iter()
            .zip(&self.passes)
            .map(|(n, p)| (n.load(Relaxed) as f64 / 1e9, p.load(Relaxed)))
            .collect()
    }
}

impl Model {
    /// Loads the dense part of `file`, checking that every tensor it needs is there
    /// with the right shape.
    pub fn load(file: Arc<GgufFile>) -> Result<Model, EngineError> {
        let hp = HParams::from_gguf(&file)?;
        let kernels = Kernels::get();
        let t = Tensors { file: &file };
        let n_embd = hp.n_embd as u64;
        let n_vocab = hp.n_vocab as u64;

        let tok_embd = t.weight("token_embd.weight", &[n_embd, n_vocab])?;
        if tok_embd.info.ty == GgmlType::Q4_K_R8 {
            // The lookup reads one row per token; `convert --repack` leaves this tensor plain.
            return Err(ModelError::BadType {
                name: "token_embd.weight".to_owned(),
                ty: tok_embd.info.ty.to_string(),
            }
            .into());
        }
        let output_norm = t.vector("output_norm.weight", n_embd)?;
        let output = match t.opt_weight("output.weight", &[n_embd, n_vocab])? {
            Some(w) => w,
            None => tok_embd.clone(),
        };

        if file.tensor("rope_freqs.weight").is_some() {
            // Silently ignoring per-dimension frequency factors would give wrong logits.
            return Err(ModelError::BadValue {
                key: "rope_freqs.weight".to_owned(),
                why: "per-dimension rope frequency factors (llama-3.1 style) are not supported yet"
                    .to_owned(),
            }
            .into());
        }
        let mut layers = Vec::with_capacity(hp.n_layer);
        for il in 0..hp.n_layer {
            layers.push(load_layer(&t, &hp, il)?);
        }

        let kq_scale = match &hp.mla {
            Some(mla) => {
                let dk = (mla.n_embd_head_qk_nope + mla.n_embd_head_qk_rope) as f32;
                let mscale = if hp.rope.freq_scale != 1.0 {
                    1.0 + 0.1 * hp.rope.yarn_log_mul * (1.0 / hp.rope.freq_scale).ln()
                } else {
                    1.0
                };
                mscale * mscale / dk.sqrt()
            }
            None => 1.0 / (hp.n_embd_head_k as f32).sqrt(),
        };
        let rope = Rope::new(&hp.rope);
        tracing::info!(
            arch = hp.arch.name(),
            n_layer = hp.n_layer,
            n_embd = hp.n_embd,
            n_expert = hp.n_expert,
            kernels = kernels.name(),
            "model loaded"
        );
        let routing = RoutingCounter::new(&hp);
        let layer_times = LayerTimes::new(hp.n_layer);
        Ok(Model {
            file,
            hp,
            kernels,
            tok_embd,
            output_norm,
            output,
            layers,
            rope,
            kq_scale,
            routing,
            layer_times,
            sockets: None,
        })
    }

    /// Spreads the coordinator's own matrices over the sockets of `parts` (one per NUMA
    /// node, from the topology's plan): every 2-D weight it multiplies by, cut by rows,
    /// copied into each socket's memory and multiplied there by threads pinned to it
    /// ([`sockets::SocketSplit`]). Results do not change. One part: nothing to do.
    pub fn spread_over_sockets(
        &mut self,
        parts: &[shared::topology::CoordinatorPart],
    ) -> Result<(), EngineError> {
        if parts.len() < 2 {
            return Ok(());
        }
        let tied = self.output.info.name == self.tok_embd.info.name;
        let file = Arc::clone(&self.file);
        let matrices: Vec<&TensorInfo> = file
            .tensors()
            .iter()
            .filter(|t| t.ne.len() >= 2 && t.ne[2..].iter().all(|&d| d == 1) && t.ne[1] > 1)
            .filter(|t| tied || t.name != self.tok_embd.info.name)
            .collect();
        self.sockets = Some(sockets::SocketSplit::new(&file, &matrices, parts)?);
        Ok(())
    }

    /// The coordinator's matrices cut over sockets, where [`Model::spread_over_sockets`] did.
    pub fn socket_split(&self) -> Option<&sockets::SocketSplit> {
        self.sockets.as_ref()
    }

    /// Wall time per layer since the model was loaded.
    pub fn layer_times(&self) -> &LayerTimes {
        &self.layer_times
    }

    /// Tokens routed per (layer, expert) since the model was loaded.
    pub fn routing_counts(&self) -> &RoutingCounter {
        &self.routing
    }

    /// Reads one byte of every page of the dense tensors (everything but routed
    /// experts), so that the first tokens do not pay the page faults; `progress`
    /// gets (bytes done, bytes total). Expert pages stay untouched: they are
    /// read where they are used.
    pub fn prefault(&self, mut progress: impl FnMut(u64, u64)) {
        const PAGE: usize = 4096;
        let dense: Vec<&TensorInfo> = self
            .file
            .tensors()
            .iter()
            .filter(|t| !t.name.contains("_exps"))
            .collect();
        let total: u64 = dense.iter().map(|t| t.byte_len).sum();
        let mut done = 0u64;
        let mut sink = 0u8;
        for t in dense {
            let data = self.file.tensor_data(t);
            for chunk in data.chunks(1 << 24) {
                for i in (0..chunk.len()).step_by(PAGE) {
                    sink = sink.wrapping_add(chunk[i]);
                }
                done += chunk.len() as u64;
                progress(done, total);
            }
        }
        std::hint::black_box(sink);
    }

    /// Hyperparameters.
    pub fn hparams(&self) -> &HParams {
        &self.hp
    }

    /// The model file.
    pub fn file(&self) -> &Arc<GgufFile> {
        &self.file
    }

    /// The kernel table in use.
    pub fn kernels(&self) -> &'static Kernels {
        self.kernels
    }

    /// A KV cache for `n_ctx` positions.
    pub fn new_cache(&self, n_ctx: usize) -> KvCache {
        let (k_width, v_width) = match &self.hp.mla {
            Some(m) => (m.kv_lora_rank + m.n_embd_head_qk_rope, 0),
            None => (
                self.hp.n_head_kv * self.hp.n_embd_head_k,
                self.hp.n_head_kv * self.hp.n_embd_head_v,
            ),
        };
        KvCache::new(n_ctx, self.hp.n_layer, k_width, v_width)
    }

    /// Evaluates `tokens` as one batch after what `cache` holds and returns logits
    /// (`[n_out, n_vocab]`, row-major) for all positions or the last.
    pub fn forward(
        &self,
        experts: &dyn ExpertExecutor,
        cache: &mut KvCache,
        tokens: &[u32],
        which: Logits,
    ) -> Result<Vec<f32>, EngineError> {
        self.forward_batch(experts, &mut [(cache, tokens)], which)
    }

    /// Evaluates several sequences' tokens in one batch, each after what its cache holds,
    /// and returns logits of every row of every sequence (`Logits::All`), or of each
    /// sequence's last row (`Logits::Last`), in sequence order.
    ///
    /// Every matmul and expert dispatch streams its weights once for the whole batch, while
    /// each sequence's rows are computed in the float order they would get alone
    /// ([`Segments`]): a sequence's logits do not depend on what else is in the batch.
    pub fn forward_batch(
        &self,
        experts: &dyn ExpertExecutor,
        seqs: &mut [(&mut KvCache, &[u32])],
        which: Logits,
    ) -> Result<Vec<f32>, EngineError> {
        if seqs.is_empty() {
            return Err(EngineError::EmptyBatch);
        }
        for (cache, tokens) in seqs.iter() {
            if tokens.is_empty() {
                return Err(EngineError::EmptyBatch);
            }
            if cache.n_past() + tokens.len() > cache.n_ctx() {
                return Err(EngineError::ContextFull {
                    n_past: cache.n_past(),
                    n_new: tokens.len(),
                    n_ctx: cache.n_ctx(),
                });
            }
        }
        let n_embd = self.hp.n_embd;
        let lengths: Vec<usize> = seqs.iter().map(|(_, t)| t.len()).collect();
        let n: usize = lengths.iter().sum();
        // One sequence keeps the plain path (the same order, by construction).
        let seg: Segments<'_> = (seqs.len() > 1).then_some(lengths.as_slice());
        let ones = vec![1usize; seqs.len()];
        let seg_last: Segments<'_> = (seqs.len() > 1).then_some(ones.as_slice());

        profile::enter(Phase::Rest);
        let mut x = vec![0.0f32; n * n_embd];
        let all_tokens = seqs.iter().flat_map(|(_, t)| t.iter());
        for (row, &tok) in x.chunks_exact_mut(n_embd).zip(all_tokens) {
            if tok as usize >= self.hp.n_vocab {
                profile::leave();
                return Err(EngineError::BadToken {
                    token: tok,
                    n_vocab: self.hp.n_vocab,
                });
            }
            profile::work(|| self.embed(tok, row));
        }
        let mut rows: Vec<SeqRows<'_>> = Vec::with_capacity(seqs.len());
        let mut start = 0;
        for (cache, tokens) in seqs.iter_mut() {
            let pos0 = cache.n_past();
            rows.push(SeqRows {
                cache,
                pos0,
                start,
                n: tokens.len(),
            });
            start += tokens.len();
        }
        // The last row of each sequence.
        let last_rows: Vec<usize> = rows.iter().map(|r| r.start + r.n - 1).collect();

        let out = self.layers_and_head(experts, &mut rows, x, n, seg, seg_last, &last_rows, which);
        profile::leave();
        out
    }

    /// The layers and the output head of [`Model::forward_batch`] (phases marked for the
    /// profile).
    #[allow(clippy::too_many_arguments)]
    fn layers_and_head(
        &self,
        experts: &dyn ExpertExecutor,
        rows: &mut [SeqRows<'_>],
        mut x: Vec<f32>,
        n: usize,
        seg: Segments<'_>,
        seg_last: Segments<'_>,
        last_rows: &[usize],
        which: Logits,
    ) -> Result<Vec<f32>, EngineError> {
        let n_embd = self.hp.n_embd;
        for (il, layer) in self.layers.iter().enumerate() {
            let layer_start = std::time::Instant::now();
            profile::enter(Phase::Attention);
            let cur = profile::work(|| {
                let mut cur = x.clone();
                rms_norm(&mut cur, n_embd, &layer.attn_norm, self.hp.rms_eps);
                cur
            });
            let attn_out = match &layer.attn {
                Attention::Gqa(a) => self.gqa(il, a, &cur, rows, seg),
                Attention::Mla(a) => self.mla(il, a, &cur, rows, seg),
            };
            // The last layer only needs the rows whose logits are wanted.
            let last_layer = il + 1 == self.layers.len() && which == Logits::Last;
            let (keep, ffn_seg): (Vec<usize>, Segments<'_>) = if last_layer {
                (last_rows.to_vec(), seg_last)
            } else {
                ((0..n).collect(), seg)
            };
            let n_rows = keep.len();
            profile::enter(Phase::Rest);
            let (mut ffn_inp, cur) = profile::work(|| {
                let mut ffn_inp = Vec::with_capacity(n_rows * n_embd);
                for &r in &keep {
                    let a = &attn_out[r * n_embd..(r + 1) * n_embd];
                    let b = &x[r * n_embd..(r + 1) * n_embd];
                    ffn_inp.extend(a.iter().zip(b).map(|(a, b)| a + b));
                }
                let mut cur = ffn_inp.clone();
                rms_norm(&mut cur, n_embd, &layer.ffn_norm, self.hp.rms_eps);
                (ffn_inp, cur)
            });
            let ffn_out = match &layer.ffn {
                Ffn::Dense(f) => {
                    profile::enter(Phase::Ffn);
                    self.start_dense_ffn(il, f, &cur, experts, ffn_seg)?
                        .finish(n_rows * n_embd)?
                }
                Ffn::Moe(m) => self.moe_ffn(il, m, &cur, n_rows, experts, ffn_seg)?,
            };
            profile::enter(Phase::Rest);
            profile::work(|| {
                for (o, f) in ffn_inp.iter_mut().zip(&ffn_out) {
                    *o += f;
                }
            });
            x = ffn_inp;
            self.layer_times.record(il, layer_start.elapsed());
        }
        for r in rows.iter_mut() {
            r.cache.advance(r.n);
        }

        profile::work(|| rms_norm(&mut x, n_embd, &self.output_norm, self.hp.rms_eps));
        let out_seg = if which == Logits::Last { seg_last } else { seg };
        Ok(self.linear(&self.output, &x, out_seg))
    }

    /// Token embedding row (dequantized).
    fn embed(&self, tok: u32, out: &mut [f32]) {
        let info = &self.tok_embd.info;
        let row_bytes = info.ty.row_bytes(self.hp.n_embd).unwrap_or(0);
        let data = self.file.tensor_data(info);
        let row = &data[tok as usize * row_bytes..(tok as usize + 1) * row_bytes];
        shared::quant::reference::dequantize_row(info.ty, row, out);
    }

    /// `W·x` for each row of `x`: activations quantized to the weight's
    /// `vec_dot_type`, then the kernels' matmul.
    fn linear(&self, w: &Weight, x: &[f32], seg: Segments<'_>) -> Vec<f32> {
        let data = self.file.tensor_data(&w.info);
        let n_rows = w.n_rows();
        let n_cols = w.n_cols();
        let rows_total = w.info.ne.iter().skip(1).product::<u64>() as usize;
        debug_assert_eq!(rows_total, n_rows, "linear() takes 2-D weights");
        let m = WeightMatrix {
            ty: w.info.ty,
            n_rows,
            n_cols,
            data,
        };
        if let Some(split) = &self.sockets {
            let act = Activations::quantize(self.kernels, m.ty, x, n_cols);
            let mut out = vec![0.0f32; act.n_tokens() * n_rows];
            if split.matmul(self.kernels, &m, &w.info.name, &act, seg, &mut out) {
                return out;
            }
        }
        self.apply(&m, x, n_cols, true, seg)
    }

    /// Head `h`'s matrix of a 3-D per-head weight (`attn_k_b`, `attn_v_b`) times rows of `x`.
    fn linear_head(&self, w: &Weight, h: usize, x: &[f32], seg: Segments<'_>) -> Vec<f32> {
        let data = self.file.tensor_data(&w.info);
        let n_rows = w.n_rows();
        let n_cols = w.n_cols();
        let row_bytes = w.info.ty.row_bytes(n_cols).unwrap_or(0);
        let m = WeightMatrix {
            ty: w.info.ty,
            n_rows,
            n_cols,
            data: &data[h * n_rows * row_bytes..(h + 1) * n_rows * row_bytes],
        };
        // ggml repacks only 2-D weights of MUL_MAT: a 3-D one keeps vec_dot's order, or the
        // tiled matmul's for a K-quant from 8 tokens (src1->ne[1] is the token count).
        self.apply(&m, x, n_cols, false, seg)
    }

    fn apply(
        &self,
        m: &WeightMatrix<'_>,
        x: &[f32],
        n_cols: usize,
        two_d: bool,
        seg: Segments<'_>,
    ) -> Vec<f32> {
        let n_tokens = x.len() / n_cols;
        let act = Activations::quantize(self.kernels, m.ty, x, n_cols);
        let mut out = vec![0.0f32; n_tokens * m.n_rows];
        if two_d {
            matmul_segments(self.kernels, m, &act, seg, &mut out);
        } else {
            matmul_unrepacked_segments(self.kernels, m, &act, seg, &mut out);
        }
        out
    }

    fn gqa(
        &self,
        il: usize,
        a: &GqaAttention,
        cur: &[f32],
        seqs: &mut [SeqRows<'_>],
        seg: Segments<'_>,
    ) -> Vec<f32> {
        let hp = &self.hp;
        let (hd_k, hd_v) = (hp.n_embd_head_k, hp.n_embd_head_v);
        // The three projections in one parallel region: a thread done with its part of one
        // goes on to the next instead of waiting at a barrier after each (each row's value
        // does not depend on which thread computes it).
        let (mut q, (mut k, mut v)) = rayon::join(
            || self.linear(&a.wq, cur, seg),
            || (self.linear(&a.wk, cur, seg), self.linear(&a.wv, cur, seg)),
        );
        if let Some(b) = &a.bq {
            add_bias(&mut q, b);
        }
        if let Some(b) = &a.bk {
            add_bias(&mut k, b);
        }
        if let Some(b) = &a.bv {
            add_bias(&mut v, b);
        }
        if let Some(w) = &a.q_norm {
            rms_norm(&mut q, hd_k, w, hp.rms_eps);
        }
        if let Some(w) = &a.k_norm {
            rms_norm(&mut k, hd_k, w, hp.rms_eps);
        }
        let q_width = hp.n_head * hd_k;
        let k_width = hp.n_head_kv * hd_k;
        let v_width = hp.n_head_kv * hd_v;
        profile::work(|| {
            for s in seqs.iter_mut() {
                for i in 0..s.n {
                    let t = s.start + i;
                    self.rope
                        .apply(&mut q[t * q_width..(t + 1) * q_width], hd_k, s.pos0 + i);
                    self.rope
                        .apply(&mut k[t * k_width..(t + 1) * k_width], hd_k, s.pos0 + i);
                    s.cache.store(
                        il,
                        s.pos0 + i,
                        &k[t * k_width..(t + 1) * k_width],
                        &v[t * v_width..(t + 1) * v_width],
                    );
                }
            }
        });
        let group = hp.n_head / hp.n_head_kv;
        let out_width = hp.n_head * hd_v;
        let n: usize = seqs.iter().map(|s| s.n).sum();
        let rows = token_rows(seqs);
        let mut out = vec![0.0f32; n * out_width];
        let seqs = &*seqs;
        // One task per token and KV head: the query heads that read it, together.
        out.par_chunks_exact_mut(group * hd_v)
            .with_min_len(HEADS_PER_TASK.div_ceil(group))
            .enumerate()
            .for_each(|(idx, o)| {
                let (t, kvh) = (idx / hp.n_head_kv, idx % hp.n_head_kv);
                let (s, i) = rows[t];
                let (cache, pos0, n_seq) = (&*seqs[s].cache, seqs[s].pos0, seqs[s].n);
                let q0 = t * q_width + kvh * group * hd_k;
                attend_heads(
                    &q[q0..q0 + group * hd_k],
                    group,
                    pos0 + i + 1,
                    |j| &cache.k(il, j)[kvh * hd_k..(kvh + 1) * hd_k],
                    |j| &cache.v(il, j)[kvh * hd_v..(kvh + 1) * hd_v],
                    self.kq_scale,
                    n_seq,
                    o,
                );
            });
        self.linear(&a.wo, &out, seg)
    }

    fn mla(
        &self,
        il: usize,
        a: &MlaAttention,
        cur: &[f32],
        seqs: &mut [SeqRows<'_>],
        seg: Segments<'_>,
    ) -> Vec<f32> {
        let n: usize = seqs.iter().map(|s| s.n).sum();
        let hp = &self.hp;
        let Some(m) = &hp.mla else {
            unreachable!("MLA layers exist only with MLA hyperparameters")
        };
        let (nope, rope_d, lora) = (m.n_embd_head_qk_nope, m.n_embd_head_qk_rope, m.kv_lora_rank);
        let head_k = nope + rope_d;
        let n_head = hp.n_head;
        // The query's projections and the compressed KV's in one parallel region (as `gqa`).
        let (mut q, mut kv) = rayon::join(
            || match &a.wq_a {
                Some((wq_a, norm)) => {
                    let mut qa = self.linear(wq_a, cur, seg);
                    rms_norm(&mut qa, wq_a.n_rows(), norm, hp.rms_eps);
                    self.linear(&a.wq_b, &qa, seg)
                }
                None => self.linear(&a.wq_b, cur, seg),
            },
            || self.linear(&a.wkv_a_mqa, cur, seg),
        );
        let kv_width = lora + rope_d;
        for s in seqs.iter_mut() {
            for i in 0..s.n {
                let t = s.start + i;
                let qi = &mut q[t * n_head * head_k..(t + 1) * n_head * head_k];
                for h in 0..n_head {
                    self.rope.apply(
                        &mut qi[h * head_k + nope..(h + 1) * head_k],
                        rope_d,
                        s.pos0 + i,
                    );
                }
                let row = &mut kv[t * kv_width..(t + 1) * kv_width];
                self.rope.apply(&mut row[lora..], rope_d, s.pos0 + i);
                rms_norm(&mut row[..lora], lora, &a.kv_a_norm, hp.rms_eps);
                s.cache.store(il, s.pos0 + i, row, &[]);
            }
        }
        // Absorb k_b into the query: q_abs[h] = k_b[h]·q_nope[h], for all tokens of head h at once.
        let mut q_full = vec![0.0f32; n * n_head * kv_width];
        for h in 0..n_head {
            let q_nope: Vec<f32> = (0..n)
                .flat_map(|i| {
                    let base = i * n_head * head_k + h * head_k;
                    q[base..base + nope].iter().copied()
                })
                .collect();
            let q_abs = self.linear_head(&a.wk_b, h, &q_nope, seg);
            for i in 0..n {
                let dst = &mut q_full[(i * n_head + h) * kv_width..(i * n_head + h + 1) * kv_width];
                dst[..lora].copy_from_slice(&q_abs[i * lora..(i + 1) * lora]);
                let src = i * n_head * head_k + h * head_k + nope;
                dst[lora..].copy_from_slice(&q[src..src + rope_d]);
            }
        }
        // Attention over the latent cache: one shared K head, V = the latent part of K.
        let mut latent = vec![0.0f32; n * n_head * lora];
        {
            let rows = token_rows(seqs);
            let seqs = &*seqs;
            // One task per token and group of heads (all read the one latent cache).
            let heads = HEADS_PER_TASK.max(n_head.div_ceil(rayon::current_num_threads()));
            let heads = (1..=heads)
                .rev()
                .find(|h| n_head.is_multiple_of(*h))
                .unwrap_or(1);
            latent
                .par_chunks_exact_mut(heads * lora)
                .enumerate()
                .for_each(|(idx, o)| {
                    let (s, i) = rows[idx * heads / n_head];
                    let (cache, pos0, n_seq) = (&*seqs[s].cache, seqs[s].pos0, seqs[s].n);
                    attend_heads(
                        &q_full[idx * heads * kv_width..(idx + 1) * heads * kv_width],
                        heads,
                        pos0 + i + 1,
                        |j| cache.k(il, j),
                        |j| &cache.k(il, j)[..lora],
                        self.kq_scale,
                        n_seq,
                        o,
                    );
                });
        }
        // Decompress with v_b per head, then concatenate heads.
        let v_head = m.n_embd_head_v;
        let mut out = vec![0.0f32; n * n_head * v_head];
        for h in 0..n_head {
            let lat_h: Vec<f32> = (0..n)
                .flat_map(|i| {
                    latent[(i * n_head + h) * lora..(i * n_head + h + 1) * lora]
                        .iter()
                        .copied()
                })
                .collect();
            let vh = self.linear_head(&a.wv_b, h, &lat_h, seg);
            for i in 0..n {
                out[(i * n_head + h) * v_head..(i * n_head + h + 1) * v_head]
                    .copy_from_slice(&vh[i * v_head..(i + 1) * v_head]);
            }
        }
        self.linear(&a.wo, &out, seg)
    }

    /// A dense FFN (dense layer or shared expert): started on the nodes where the plan
    /// places it, computed here otherwise.
    fn start_dense_ffn<'e>(
        &self,
        il: usize,
        f: &DenseFfn,
        cur: &[f32],
        experts: &'e dyn ExpertExecutor,
        seg: Segments<'_>,
    ) -> Result<DenseResult<'e>, EngineError> {
        if !experts.places_dense(il) {
            return Ok(DenseResult::Local(self.dense_ffn(f, cur, seg)));
        }
        let n_embd = self.hp.n_embd;
        let (g, u) = (f.gate.info.ty.vec_dot_type(), f.up.info.ty.vec_dot_type());
        let mut inputs = vec![Activations::quantize(
            self.kernels,
            f.gate.info.ty,
            cur,
            n_embd,
        )];
        if u != g {
            inputs.push(Activations::quantize(
                self.kernels,
                f.up.info.ty,
                cur,
                n_embd,
            ));
        }
        Ok(DenseResult::Remote(experts.start_dense(
            il,
            &inputs,
            f.down.info.ty,
            seg,
        )?))
    }

    fn dense_ffn(&self, f: &DenseFfn, cur: &[f32], seg: Segments<'_>) -> Vec<f32> {
        let mut g = self.linear(&f.gate, cur, seg);
        let u = self.linear(&f.up, cur, seg);
        shared::ggml_math::swiglu_in_place(&mut g, &u);
        self.linear(&f.down, &g, seg)
    }

    fn moe_ffn(
        &self,
        il: usize,
        m: &MoeFfn,
        cur: &[f32],
        n: usize,
        experts: &dyn ExpertExecutor,
        seg: Segments<'_>,
    ) -> Result<Vec<f32>, EngineError> {
        profile::enter(Phase::Router);
        let mut logits = self.linear(&m.gate_inp, cur, seg);
        let (assignments, inputs) = profile::work(|| {
            if let Some(b) = &m.gate_inp_bias {
                add_bias(&mut logits, b);
            }
            let assignments: Vec<Assignment> =
                routing::route(&self.hp, &logits, m.exp_probs_b.as_deref(), n);
            self.routing.record(il, n, &assignments);
            let inputs: Vec<Activations> = m
                .input_types
                .iter()
                .map(|&ty| Activations::quantize(self.kernels, ty, cur, self.hp.n_embd))
                .collect();
            (assignments, inputs)
        });
        profile::enter(Phase::Ffn);
        let pending = experts.start(il, &inputs, &assignments, seg)?;
        // The shared expert is computed (here or on nodes) while the routed experts run.
        let shared = match &m.shared {
            Some(f) => Some(self.start_dense_ffn(il, f, cur, experts, seg)?),
            None => None,
        };
        let mut out = vec![0.0f32; n * self.hp.n_embd];
        pending.wait(&mut out)?;
        if let Some(shared) = shared {
            let mut sh = shared.finish(n * self.hp.n_embd)?;
            if let Some(gate) = &m.shared_gate {
                let g = self.linear(gate, cur, seg);
                for (row, &gv) in sh.chunks_exact_mut(self.hp.n_embd).zip(&g) {
                    let s = blocks::sigmoid(gv);
                    row.iter_mut().for_each(|v| *v *= s);
                }
            }
            for (o, s) in out.iter_mut().zip(&sh) {
                *o += s;
            }
        }
        Ok(out)
    }
}

/// (token, head) pairs of attention one parallel task computes at least: a decode step's
/// heads are spread over the threads, a few to a task.
const HEADS_PER_TASK: usize = 4;

/// One sequence of a batch: its cache, its first position, and where its rows are.
struct SeqRows<'c> {
    cache: &'c mut KvCache,
    pos0: usize,
    start: usize,
    n: usize,
}

/// (sequence, index within it) of every row of the batch.
fn token_rows(seqs: &[SeqRows<'_>]) -> Vec<(usize, usize)> {
    seqs.iter()
        .enumerate()
        .flat_map(|(s, r)| (0..r.n).map(move |i| (s, i)))
        .collect()
}

/// A dense FFN's output: computed here, or still running on nodes.
enum DenseResult<'e> {
    Local(Vec<f32>),
    Remote(Pending<'e>),
}

impl DenseResult<'_> {
    fn finish(self, len: usize) -> Result<Vec<f32>, EngineError> {
        match self {
            DenseResult::Local(v) => Ok(v),
            DenseResult::Remote(p) => {
                let mut out = vec![0.0f32; len];
                p.wait(&mut out)?;
                Ok(out)
            }
        }
    }
}

/// Typed tensor look-ups with shape checks.
struct Tensors<'a> {
    file: &'a GgufFile,
}

impl Tensors<'_> {
    fn opt_weight(&self, name: &str, ne: &[u64]) -> Result<Option<Weight>, ModelError> {
        let Some(info) = self.file.tensor(name) else {
            return Ok(None);
        };
        if info.ne.as_slice() != ne {
            return Err(ModelError::BadShape {
                name: name.to_owned(),
                found: info.ne.clone(),
                expected: ne.to_vec(),
            });
        }
        if matches!(info.ty, GgmlType::Q8_1 | GgmlType::Q8_K) {
            return Err(ModelError::BadType {
                name: name.to_owned(),
                ty: info.ty.to_string(),
            });
        }
        Ok(Some(Weight { info: info.clone() }))
    }

    fn weight(&self, name: &str, ne: &[u64]) -> Result<Weight, ModelError> {
        self.opt_weight(name, ne)?
            .ok_or_else(|| ModelError::MissingTensor(name.to_owned()))
    }

    fn opt_vector(&self, name: &str, n: u64) -> Result<Option<Vec<f32>>, ModelError> {
        let Some(w) = self.opt_weight(name, &[n])? else {
            return Ok(None);
        };
        let mut out = vec![0.0f32; n as usize];
        shared::quant::reference::dequantize_row(
            w.info.ty,
            self.file.tensor_data(&w.info),
            &mut out,
        );
        Ok(Some(out))
    }

    fn vector(&self, name: &str, n: u64) -> Result<Vec<f32>, ModelError> {
        self.opt_vector(name, n)?
            .ok_or_else(|| ModelError::MissingTensor(name.to_owned()))
    }
}

fn load_layer(t: &Tensors<'_>, hp: &HParams, il: usize) -> Result<Layer, ModelError> {
    let n = |s: &str| format!("blk.{il}.{s}");
    let n_embd = hp.n_embd as u64;
    let attn_norm = t.vector(&n("attn_norm.weight"), n_embd)?;
    let attn = match &hp.mla {
        Some(m) => {
            let head_k = (m.n_embd_head_qk_nope + m.n_embd_head_qk_rope) as u64;
            let n_head = hp.n_head as u64;
            let lora = m.kv_lora_rank as u64;
            let (wq_a, wq_b) = if m.q_lora_rank > 0 {
                let ql = m.q_lora_rank as u64;
                let wq_a = t.weight(&n("attn_q_a.weight"), &[n_embd, ql])?;
                let norm = t.vector(&n("attn_q_a_norm.weight"), ql)?;
                let wq_b = t.weight(&n("attn_q_b.weight"), &[ql, n_head * head_k])?;
                (Some((wq_a, norm)), wq_b)
            } else {
                (
                    None,
                    t.weight(&n("attn_q.weight"), &[n_embd, n_head * head_k])?,
                )
            };
            if t.file.tensor(&n("attn_k_b.weight")).is_none()
                && t.file.tensor(&n("attn_kv_b.weight")).is_some()
            {
                return Err(ModelError::BadValue {
                    key: n("attn_kv_b.weight"),
                    why: "this file predates split attn_k_b/attn_v_b tensors; re-convert it with a current llama.cpp".to_owned(),
                });
            }
            Attention::Mla(MlaAttention {
                wq_a,
                wq_b,
                wkv_a_mqa: t.weight(
                    &n("attn_kv_a_mqa.weight"),
                    &[n_embd, lora + m.n_embd_head_qk_rope as u64],
                )?,
                kv_a_norm: t.vector(&n("attn_kv_a_norm.weight"), lora)?,
                wk_b: t.weight(
                    &n("attn_k_b.weight"),
                    &[m.n_embd_head_qk_nope as u64, lora, n_head],
                )?,
                wv_b: t.weight(
                    &n("attn_v_b.weight"),
                    &[lora, m.n_embd_head_v as u64, n_head],
                )?,
                wo: t.weight(
                    &n("attn_output.weight"),
                    &[n_head * m.n_embd_head_v as u64, n_embd],
                )?,
            })
        }
        None => {
            let q_dim = (hp.n_head * hp.n_embd_head_k) as u64;
            let k_dim = (hp.n_head_kv * hp.n_embd_head_k) as u64;
            let v_dim = (hp.n_head_kv * hp.n_embd_head_v) as u64;
            let hd = hp.n_embd_head_k as u64;
            let (q_norm, k_norm) = match hp.arch {
                Arch::Qwen3Moe => (
                    Some(t.vector(&n("attn_q_norm.weight"), hd)?),
                    Some(t.vector(&n("attn_k_norm.weight"), hd)?),
                ),
                Arch::Glm4Moe => (
                    t.opt_vector(&n("attn_q_norm.weight"), hd)?,
                    t.opt_vector(&n("attn_k_norm.weight"), hd)?,
                ),
                Arch::Llama | Arch::Qwen2Moe | Arch::Deepseek2 => (None, None),
            };
            Attention::Gqa(GqaAttention {
                wq: t.weight(&n("attn_q.weight"), &[n_embd, q_dim])?,
                wk: t.weight(&n("attn_k.weight"), &[n_embd, k_dim])?,
                wv: t.weight(&n("attn_v.weight"), &[n_embd, v_dim])?,
                wo: t.weight(
                    &n("attn_output.weight"),
                    &[(hp.n_head * hp.n_embd_head_v) as u64, n_embd],
                )?,
                bq: t.opt_vector(&n("attn_q.bias"), q_dim)?,
                bk: t.opt_vector(&n("attn_k.bias"), k_dim)?,
                bv: t.opt_vector(&n("attn_v.bias"), v_dim)?,
                q_norm,
                k_norm,
            })
        }
    };
    let ffn_norm_name = match hp.arch {
        Arch::Glm4Moe => "post_attention_norm.weight",
        Arch::Llama | Arch::Qwen2Moe | Arch::Qwen3Moe | Arch::Deepseek2 => "ffn_norm.weight",
    };
    let ffn_norm = t.vector(&n(ffn_norm_name), n_embd)?;
    let dense = |prefix: &str, n_ff: u64| -> Result<DenseFfn, ModelError> {
        Ok(DenseFfn {
            gate: t.weight(&n(&format!("ffn_gate{prefix}.weight")), &[n_embd, n_ff])?,
            up: t.weight(&n(&format!("ffn_up{prefix}.weight")), &[n_embd, n_ff])?,
            down: t.weight(&n(&format!("ffn_down{prefix}.weight")), &[n_ff, n_embd])?,
        })
    };
    let ffn = if hp.is_moe_layer(il) {
        let n_expert = hp.n_expert as u64;
        let gate_inp = t.weight(&n("ffn_gate_inp.weight"), &[n_embd, n_expert])?;
        let shared =
            if hp.n_expert_shared > 0 || t.file.tensor(&n("ffn_gate_shexp.weight")).is_some() {
                Some(dense("_shexp", hp.n_ff_shexp as u64)?)
            } else {
                None
            };
        let shared_gate = t.opt_weight(&n("ffn_gate_inp_shexp.weight"), &[n_embd])?;
        let (gate_ty, up_ty) = experts::expert_gate_up_types(t.file, hp, il)?;
        let mut input_types = vec![gate_ty.vec_dot_type()];
        if up_ty.vec_dot_type() != gate_ty.vec_dot_type() {
            input_types.push(up_ty.vec_dot_type());
        }
        Ffn::Moe(MoeFfn {
            gate_inp,
            gate_inp_bias: t.opt_vector(&n("ffn_gate_inp.bias"), n_expert)?,
            exp_probs_b: t.opt_vector(&n("exp_probs_b.bias"), n_expert)?,
            shared,
            shared_gate,
            input_types,
        })
    } else {
        Ffn::Dense(dense("", hp.n_ff as u64)?)
    };
    Ok(Layer {
        attn_norm,
        attn,
        ffn_norm,
        ffn,
    })
}
