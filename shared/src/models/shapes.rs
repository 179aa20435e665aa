//! The exact shapes of real models (from their `config.json`), as GGUF tensor
//! tables and metadata: what `synth` writes and what tests use to build
//! realistic headers (a 400 GB Kimi-K2 header costs nothing to write).

use crate::gguf::MetaValue;
use crate::quant::GgmlType;

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
    /// The same shape with fewer layers and/or a smaller vocabulary.
    pub fn truncated(mut self, n_layer: Option<usize>, n_vocab: Option<usize>) -> ModelShape {
        if let Some(n) = n_layer {
            self.n_layer = n;
            self.n_dense_lead = self.n_dense_lead.min(n);
        }
        if let Some(v) = n_vocab {
            self.n_vocab = v;
        }
        self
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
            (k("block_count"), u(self.n_layer)),
            (k("context_length"), u(self.n_ctx)),
            (k("embedding_length"), u(self.n_embd)),
            (k("attention.head_count"), u(self.n_head)),
            (k("rope.freq_base"), MetaValue::F32(self.rope_base)),
            (k("attention.layer_norm_rms_epsilon"), MetaValue::F32(1e-6)),
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
        if a == "glm4moe" {
            m.push((k("nextn_predict_layers"), u(0)));
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
        for il in 0..self.n_layer {
            let n = |s: &str| format!("blk.{il}.{s}");
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
