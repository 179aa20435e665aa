//! The exact shapes of real models (from their `config.json`), as GGUF tensor
//! tables and metadata: what `synth` writes and what tests use to build
//! realistic headers (a 400 GB Kimi-K2 header costs nothing to write).
//! Also the statistics `synth` fills them with ([`Init`], [`fill_row`]): this
//! lives here, in an optimized crate, because generating billions of values is
//! the hot loop of writing a synthetic model.

use crate::gguf::MetaValue;
use crate::quant::GgmlType;
use crate::rng::mix64;

/// A real model's shape.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelShape {
    pub name: &'static str,
    pub arch: &'static str,
    pub n_layer: usize,
    pub n_embd: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
    pub head_dim: usize,
    pub n_expert: usize,
    pub n_expert_used: usize,
    pub n_expert_shared: usize,
    pub n_ff_exp: usize,
    pub n_ff_dense: usize,
    pub n_dense_lead: usize,
    pub n_vocab: usize,
    pub n_ctx: usize,
    pub rope_base: f32,
    /// MLA: (q_lora, kv_lora, nope, rope, v_head).
    pub mla: Option<(usize, usize, usize, usize, usize)>,
    pub n_expert_groups: usize,
    pub n_group_used: usize,
    pub expert_weights_scale: f32,
    /// 1 softmax, 2 sigmoid.
    pub gating: u32,
    /// `rms_norm_eps`.
    pub rms_eps: f32,
    /// YaRN rope scaling: (factor, original context, `yarn_log_multiplier`).
    pub yarn: Option<(f32, usize, f32)>,
    /// Multi-token-prediction layers after the `n_layer` main ones (GLM-4.5:
    /// one, with a full MoE block and the `nextn.*` tensors). llama.cpp counts
    /// them in `block_count`; the forward pass skips them.
    pub n_nextn: usize,
}

/// Every known shape, by the names `synth --shape` takes.
pub fn all() -> Vec<ModelShape> {
    let base = ModelShape {
        name: "",
        arch: "",
        n_layer: 0,
        n_embd: 0,
        n_head: 0,
        n_head_kv: 0,
        head_dim: 128,
        n_expert: 0,
        n_expert_used: 0,
        n_expert_shared: 0,
        n_ff_exp: 0,
        n_ff_dense: 0,
        n_dense_lead: 0,
        n_vocab: 0,
        n_ctx: 4096,
        rope_base: 10000.0,
        mla: None,
        n_expert_groups: 1,
        n_group_used: 1,
        expert_weights_scale: 1.0,
        gating: 1,
        rms_eps: 1e-6,
        yarn: None,
        n_nextn: 0,
    };
    vec![
        ModelShape {
            name: "deepseek-v3",
            arch: "deepseek2",
            n_layer: 61,
            n_embd: 7168,
            n_head: 128,
            n_head_kv: 128,
            n_expert: 256,
            n_expert_used: 8,
            n_expert_shared: 1,
            n_ff_exp: 2048,
            n_ff_dense: 18432,
            n_dense_lead: 3,
            n_vocab: 129280,
            n_ctx: 163840,
            mla: Some((1536, 512, 128, 64, 128)),
            n_expert_groups: 8,
            n_group_used: 4,
            expert_weights_scale: 2.5,
            gating: 2,
            // rope_scaling: yarn, factor 40, original 4096, mscale_all_dim 1.
            yarn: Some((40.0, 4096, 0.1)),
            ..base.clone()
        },
        ModelShape {
            name: "kimi-k2",
            arch: "deepseek2",
            n_layer: 61,
            n_embd: 7168,
            n_head: 64,
            n_head_kv: 64,
            n_expert: 384,
            n_expert_used: 8,
            n_expert_shared: 1,
            n_ff_exp: 2048,
            n_ff_dense: 18432,
            n_dense_lead: 1,
            n_vocab: 163840,
            n_ctx: 131072,
            rope_base: 50000.0,
            mla: Some((1536, 512, 128, 64, 128)),
            expert_weights_scale: 2.827,
            gating: 2,
            // rope_scaling: yarn, factor 32, original 4096, mscale_all_dim 1.
            yarn: Some((32.0, 4096, 0.1)),
            ..base.clone()
        },
        ModelShape {
            name: "glm-4.5",
            arch: "glm4moe",
            n_layer: 92,
            n_embd: 5120,
            n_head: 96,
            n_head_kv: 8,
            n_expert: 160,
            n_expert_used: 8,
            n_expert_shared: 1,
            n_ff_exp: 1536,
            n_ff_dense: 12288,
            n_dense_lead: 3,
            n_vocab: 151552,
            n_ctx: 131072,
            rope_base: 1_000_000.0,
            expert_weights_scale: 2.5,
            gating: 2,
            rms_eps: 1e-5,
            n_nextn: 1,
            ..base.clone()
        },
        ModelShape {
            name: "qwen3-235b-a22b",
            arch: "qwen3moe",
            n_layer: 94,
            n_embd: 4096,
            n_head: 64,
            n_head_kv: 4,
            n_expert: 128,
            n_expert_used: 8,
            n_ff_exp: 1536,
            // intermediate_size: llama.cpp writes it as feed_forward_length.
            n_ff_dense: 12288,
            n_vocab: 151936,
            n_ctx: 40960,
            rope_base: 1_000_000.0,
            ..base.clone()
        },
        ModelShape {
            name: "qwen3-30b-a3b",
            arch: "qwen3moe",
            n_layer: 48,
            n_embd: 2048,
            n_head: 32,
            n_head_kv: 4,
            n_expert: 128,
            n_expert_used: 8,
            n_ff_exp: 768,
            n_ff_dense: 6144,
            n_vocab: 151936,
            n_ctx: 40960,
            rope_base: 1_000_000.0,
            ..base.clone()
        },
        ModelShape {
            name: "mixtral-8x7b",
            arch: "llama",
            n_layer: 32,
            n_embd: 4096,
            n_head: 32,
            n_head_kv: 8,
            n_expert: 8,
            n_expert_used: 2,
            n_ff_exp: 14336,
            n_vocab: 32000,
            n_ctx: 32768,
            rope_base: 1_000_000.0,
            rms_eps: 1e-5,
            ..base
        },
    ]
}

/// The shape called `name`.
pub fn by_name(name: &str) -> Option<ModelShape> {
    all()
        .into_iter()
        .find(|s| s.name.eq_ignore_ascii_case(name))
}

/// Tensor types to use for each kind of tensor.
#[derive(Clone, Copy, Debug)]
pub struct TypeRecipe {
    pub expert_gate_up: GgmlType,
    pub expert_down: GgmlType,
    pub attention: GgmlType,
    pub dense_ffn: GgmlType,
    pub embeddings: GgmlType,
    pub output: GgmlType,
}

impl TypeRecipe {
    /// Every matrix of one type (norms, routers and biases stay F32).
    pub fn uniform(ty: GgmlType) -> TypeRecipe {
        TypeRecipe {
            expert_gate_up: ty,
            expert_down: ty,
            attention: ty,
            dense_ffn: ty,
            embeddings: ty,
            output: ty,
        }
    }
}

/// One tensor of a table: name, type, `ne`.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorSpec {
    pub name: String,
    pub ty: GgmlType,
    pub ne: Vec<u64>,
}

impl ModelShape {
    /// The same shape with fewer layers and/or a smaller vocabulary. A
    /// truncated model of two or more layers keeps at least one MoE layer
    /// (DeepSeek-V3 with 2 layers: 1 dense, 1 MoE); MTP layers are kept.
    pub fn truncated(mut self, n_layer: Option<usize>, n_vocab: Option<usize>) -> ModelShape {
        if let Some(n) = n_layer {
            self.n_layer = n;
            self.n_dense_lead = self.n_dense_lead.min(n.saturating_sub(1));
        }
        if let Some(v) = n_vocab {
            self.n_vocab = v;
        }
        self
    }

    /// The same shape with `n_expert` routed experts per layer (for tests and
    /// quick experiments: a full expert set is most of a model's bytes). The
    /// expert groups stay, so `n_expert` must divide into them with at least
    /// two experts each (group scores sum the top two).
    pub fn with_experts(mut self, n_expert: usize) -> Result<ModelShape, String> {
        if n_expert == 0 {
            return Err("the expert count must be positive".to_owned());
        }
        let groups = self.n_expert_groups.max(1);
        if groups > 1 && (!n_expert.is_multiple_of(groups) || n_expert / groups < 2) {
            return Err(format!(
                "{} routes over {groups} expert groups: the expert count must be a multiple of {groups} with at least 2 per group, not {n_expert}",
                self.name
            ));
        }
        self.n_expert = n_expert;
        self.n_expert_used = self.n_expert_used.min(n_expert);
        Ok(self)
    }

    /// Layers in the file: the main ones and the MTP ones (`block_count`).
    pub fn n_layer_all(&self) -> usize {
        self.n_layer + self.n_nextn
    }

    /// The GGUF metadata llama.cpp expects for this shape (tokenizer keys excluded).
    pub fn metadata(&self) -> Vec<(String, MetaValue)> {
        let a = self.arch;
        let k = |s: &str| format!("{a}.{s}");
        let u = |v: usize| MetaValue::U32(v as u32);
        let mut m = vec![
            (
                "general.architecture".to_owned(),
                MetaValue::String(a.to_owned()),
            ),
            (
                "general.name".to_owned(),
                MetaValue::String(self.name.to_owned()),
            ),
            (k("block_count"), u(self.n_layer_all())),
            (k("context_length"), u(self.n_ctx)),
            (k("embedding_length"), u(self.n_embd)),
            (k("attention.head_count"), u(self.n_head)),
            (k("rope.freq_base"), MetaValue::F32(self.rope_base)),
            (
                k("attention.layer_norm_rms_epsilon"),
                MetaValue::F32(self.rms_eps),
            ),
            (k("vocab_size"), u(self.n_vocab)),
            (k("expert_count"), u(self.n_expert)),
            (k("expert_used_count"), u(self.n_expert_used)),
        ];
        match self.mla {
            Some((q_lora, kv_lora, nope, rope, v_head)) => m.extend([
                (k("attention.head_count_kv"), u(1)),
                (k("attention.q_lora_rank"), u(q_lora)),
                (k("attention.kv_lora_rank"), u(kv_lora)),
                (k("attention.key_length"), u(kv_lora + rope)),
                (k("attention.value_length"), u(kv_lora)),
                (k("attention.key_length_mla"), u(nope + rope)),
                (k("attention.value_length_mla"), u(v_head)),
                (k("rope.dimension_count"), u(rope)),
            ]),
            None => m.extend([
                (k("attention.head_count_kv"), u(self.n_head_kv)),
                (k("attention.key_length"), u(self.head_dim)),
                (k("attention.value_length"), u(self.head_dim)),
                (
                    k("rope.dimension_count"),
                    u(if a == "glm4moe" {
                        self.head_dim / 2
                    } else {
                        self.head_dim
                    }),
                ),
            ]),
        }
        if a == "llama" {
            m.push((k("feed_forward_length"), u(self.n_ff_exp)));
        } else {
            m.push((k("expert_feed_forward_length"), u(self.n_ff_exp)));
            m.push((
                k("feed_forward_length"),
                u(self.n_ff_dense.max(self.n_ff_exp)),
            ));
        }
        if self.n_expert_shared > 0 {
            m.push((k("expert_shared_count"), u(self.n_expert_shared)));
            m.push((k("leading_dense_block_count"), u(self.n_dense_lead)));
            m.push((
                k("expert_weights_scale"),
                MetaValue::F32(self.expert_weights_scale),
            ));
            m.push((k("expert_weights_norm"), MetaValue::Bool(true)));
            m.push((k("expert_gating_func"), MetaValue::U32(self.gating)));
            m.push((k("expert_group_count"), u(self.n_expert_groups)));
            m.push((k("expert_group_used_count"), u(self.n_group_used)));
        }
        if let Some((factor, orig_ctx, log_mul)) = self.yarn {
            m.push((k("rope.scaling.type"), MetaValue::String("yarn".to_owned())));
            m.push((k("rope.scaling.factor"), MetaValue::F32(factor)));
            m.push((k("rope.scaling.original_context_length"), u(orig_ctx)));
            m.push((
                k("rope.scaling.yarn_log_multiplier"),
                MetaValue::F32(log_mul),
            ));
        }
        if a == "glm4moe" {
            m.push((k("nextn_predict_layers"), u(self.n_nextn)));
        }
        m.push(("general.alignment".to_owned(), MetaValue::U32(32)));
        m
    }

    /// The tensor table in llama.cpp's names, types from `recipe`.
    pub fn tensors(&self, recipe: &TypeRecipe) -> Vec<TensorSpec> {
        let e = self.n_embd as u64;
        let f32t = GgmlType::F32;
        let mut out = Vec::new();
        let mut push = |name: String, ty: GgmlType, ne: &[u64]| {
            out.push(TensorSpec {
                name,
                ty,
                ne: ne.to_vec(),
            })
        };
        push(
            "token_embd.weight".into(),
            recipe.embeddings,
            &[e, self.n_vocab as u64],
        );
        push("output_norm.weight".into(), f32t, &[e]);
        push(
            "output.weight".into(),
            recipe.output,
            &[e, self.n_vocab as u64],
        );
        let (h, hkv, hd) = (
            self.n_head as u64,
            self.n_head_kv as u64,
            self.head_dim as u64,
        );
        for il in 0..self.n_layer_all() {
            let n = |s: &str| format!("blk.{il}.{s}");
            if il >= self.n_layer {
                // MTP block (as GLM-4.5's converter writes it): its own input
                // projection and norms, embedding and head, then a full block.
                let v = self.n_vocab as u64;
                push(n("nextn.eh_proj.weight"), recipe.attention, &[2 * e, e]);
                push(n("nextn.embed_tokens.weight"), recipe.embeddings, &[e, v]);
                push(n("nextn.enorm.weight"), f32t, &[e]);
                push(n("nextn.hnorm.weight"), f32t, &[e]);
                push(n("nextn.shared_head_head.weight"), recipe.output, &[e, v]);
                push(n("nextn.shared_head_norm.weight"), f32t, &[e]);
            }
            push(n("attn_norm.weight"), f32t, &[e]);
            match self.mla {
                Some((q_lora, kv_lora, nope, rope, v_head)) => {
                    let (ql, kl) = (q_lora as u64, kv_lora as u64);
                    push(n("attn_q_a.weight"), recipe.attention, &[e, ql]);
                    push(n("attn_q_a_norm.weight"), f32t, &[ql]);
                    push(
                        n("attn_q_b.weight"),
                        recipe.attention,
                        &[ql, h * (nope + rope) as u64],
                    );
                    push(
                        n("attn_kv_a_mqa.weight"),
                        recipe.attention,
                        &[e, kl + rope as u64],
                    );
                    push(n("attn_kv_a_norm.weight"), f32t, &[kl]);
                    push(
                        n("attn_k_b.weight"),
                        recipe.attention,
                        &[nope as u64, kl, h],
                    );
                    push(
                        n("attn_v_b.weight"),
                        recipe.attention,
                        &[kl, v_head as u64, h],
                    );
                    push(
                        n("attn_output.weight"),
                        recipe.attention,
                        &[h * v_head as u64, e],
                    );
                }
                None => {
                    push(n("attn_q.weight"), recipe.attention, &[e, h * hd]);
                    push(n("attn_k.weight"), recipe.attention, &[e, hkv * hd]);
                    push(n("attn_v.weight"), recipe.attention, &[e, hkv * hd]);
                    push(n("attn_output.weight"), recipe.attention, &[h * hd, e]);
                    if self.arch == "glm4moe" {
                        push(n("attn_q.bias"), f32t, &[h * hd]);
                        push(n("attn_k.bias"), f32t, &[hkv * hd]);
                        push(n("attn_v.bias"), f32t, &[hkv * hd]);
                    }
                    if self.arch == "qwen3moe" {
                        push(n("attn_q_norm.weight"), f32t, &[hd]);
                        push(n("attn_k_norm.weight"), f32t, &[hd]);
                    }
                }
            }
            let norm = if self.arch == "glm4moe" {
                "post_attention_norm.weight"
            } else {
                "ffn_norm.weight"
            };
            push(n(norm), f32t, &[e]);
            if il < self.n_dense_lead {
                let ff = self.n_ff_dense as u64;
                push(n("ffn_gate.weight"), recipe.dense_ffn, &[e, ff]);
                push(n("ffn_up.weight"), recipe.dense_ffn, &[e, ff]);
                push(n("ffn_down.weight"), recipe.dense_ffn, &[ff, e]);
                continue;
            }
            let (ne_, ff) = (self.n_expert as u64, self.n_ff_exp as u64);
            push(n("ffn_gate_inp.weight"), f32t, &[e, ne_]);
            if self.gating == 2 {
                push(n("exp_probs_b.bias"), f32t, &[ne_]);
            }
            push(
                n("ffn_gate_exps.weight"),
                recipe.expert_gate_up,
                &[e, ff, ne_],
            );
            push(
                n("ffn_up_exps.weight"),
                recipe.expert_gate_up,
                &[e, ff, ne_],
            );
            push(n("ffn_down_exps.weight"), recipe.expert_down, &[ff, e, ne_]);
            if self.n_expert_shared > 0 {
                let sf = ff * self.n_expert_shared as u64;
                push(n("ffn_gate_shexp.weight"), recipe.dense_ffn, &[e, sf]);
                push(n("ffn_up_shexp.weight"), recipe.dense_ffn, &[e, sf]);
                push(n("ffn_down_shexp.weight"), recipe.dense_ffn, &[sf, e]);
            }
        }
        out
    }
}

/// How `synth` fills a tensor, with the scale statistics of a trained model.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Init {
    /// Mean 0, this standard deviation.
    Normal(f32),
    /// 1 plus noise of this standard deviation (RMSNorm weights).
    NearOne(f32),
}

impl TensorSpec {
    /// The statistics of this tensor in a synthetic model. Every matrix, the
    /// embedding, routers and MLA's per-head `attn_k_b`/`attn_v_b` included,
    /// reads its input along `ne[0]`, so std = 1/√ne[0] keeps every
    /// projection's output near unit variance (router logits too, so routing
    /// is far from degenerate), and the RMSNorms keep the residual stream in
    /// range however many layers there are. Biases (`exp_probs_b` included)
    /// are small, so they shift but do not decide.
    pub fn init(&self) -> Init {
        if self.name.ends_with("norm.weight") {
            Init::NearOne(0.02)
        } else if self.name.ends_with(".bias") {
            Init::Normal(0.01)
        } else {
            Init::Normal(1.0 / (self.ne[0].max(1) as f32).sqrt())
        }
    }
}

/// FNV-1a of a tensor name: values depend on the name, not on where the
/// tensor sits in the table, so truncating a model keeps the other tensors.
fn name_hash(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Fills `out` with row `row` of tensor `name` for `seed`. Counter-based:
/// each value depends only on (seed, name, row, column), so rows can be made
/// in any order, on any number of threads, with identical results. Normal
/// values are approximated by the sum of four 16-bit uniforms (Irwin–Hall),
/// bounded by ±3.46σ — one 64-bit hash per value.
pub fn fill_row(seed: u64, name: &str, row: u64, init: Init, out: &mut [f32]) {
    const GOLDEN: u64 = 0x9e37_79b9_7f4a_7c15;
    // Mean and standard deviation of a sum of four uniforms on 0..=65535.
    const MEAN: f32 = 4.0 * 32767.5;
    const INV_SD: f32 = 1.0 / 37_837.23;
    let key = mix64(mix64(seed ^ GOLDEN) ^ name_hash(name));
    let base = mix64(key ^ row.wrapping_mul(0xd1b5_4a32_d192_ed03));
    let (offset, std) = match init {
        Init::Normal(std) => (0.0, std),
        Init::NearOne(std) => (1.0, std),
    };
    let scale = std * INV_SD;
    for (i, o) in out.iter_mut().enumerate() {
        let x = mix64(base.wrapping_add((i as u64).wrapping_mul(GOLDEN)));
        let sum = (x & 0xffff) + ((x >> 16) & 0xffff) + ((x >> 32) & 0xffff) + (x >> 48);
        *o = offset + (sum as f32 - MEAN) * scale;
    }
}

#[cfg(test)]
mod tests;
