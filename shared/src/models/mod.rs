//! Facts of each supported architecture: hyperparameters read from GGUF
//! metadata (with llama.cpp's defaults) and the names of tensors.
//!
//! The forward passes live in the coordinator (`coordinator::models`) and the
//! routed-expert computation in `crate::moe`; this module only says what a file
//! holds, so the expert node and the planner can use it without the engine.

pub mod shapes;

use thiserror::Error;

use crate::gguf::{GgufFile, MetaValue};

/// The architectures moeshard runs (`general.architecture`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Arch {
    /// `llama`: dense, or Mixtral-style experts when `expert_count` > 0.
    Llama,
    /// `qwen2moe`: softmax routing without normalization, a sigmoid-gated shared expert.
    Qwen2Moe,
    /// `qwen3moe`: per-head q/k RMSNorm, softmax routing, normalized.
    Qwen3Moe,
    /// `deepseek2`: DeepSeek V2/V3/R1 and Kimi-K2 (MLA attention, grouped sigmoid routing).
    Deepseek2,
    /// `glm4moe`: GLM-4.5 (partial NEOX rope, q/k/v biases, MTP layers skipped).
    Glm4Moe,
}

impl Arch {
    /// Parses `general.architecture`.
    pub fn from_name(name: &str) -> Result<Arch, ModelError> {
        Ok(match name {
            "llama" => Arch::Llama,
            "qwen2moe" => Arch::Qwen2Moe,
            "qwen3moe" => Arch::Qwen3Moe,
            "deepseek2" => Arch::Deepseek2,
            "glm4moe" => Arch::Glm4Moe,
            other => return Err(ModelError::UnsupportedArch(other.to_owned())),
        })
    }

    /// The GGUF name (metadata key prefix).
    pub fn name(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Qwen2Moe => "qwen2moe",
            Arch::Qwen3Moe => "qwen3moe",
            Arch::Deepseek2 => "deepseek2",
            Arch::Glm4Moe => "glm4moe",
        }
    }

    /// How rotary embeddings pair dimensions.
    pub fn rope_type(self) -> RopeType {
        match self {
            Arch::Llama | Arch::Deepseek2 => RopeType::Norm,
            Arch::Qwen2Moe | Arch::Qwen3Moe | Arch::Glm4Moe => RopeType::Neox,
        }
    }
}

/// Rotary embedding pairing: NORM rotates (x[2i], x[2i+1]); NEOX rotates (x[i], x[i + n_rot/2]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RopeType {
    Norm,
    Neox,
}

/// How router logits become expert probabilities (`expert_gating_func`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Gating {
    /// Softmax over all experts (1).
    Softmax,
    /// Sigmoid of each logit (2).
    Sigmoid,
    /// Top-k of the raw logits, softmax over the selected (3).
    SoftmaxWeight,
}

/// Rotary embedding parameters, YaRN included (as ggml's `rope_yarn`).
#[derive(Clone, Debug, PartialEq)]
pub struct RopeParams {
    pub kind: RopeType,
    /// Number of rotated dimensions per head.
    pub n_rot: usize,
    pub freq_base: f32,
    /// 1 / scaling factor (1 without scaling).
    pub freq_scale: f32,
    /// YaRN extrapolation mix (0 unless the file asks for YaRN).
    pub ext_factor: f32,
    /// Multiplier of cos/sin (YaRN attention factor).
    pub attn_factor: f32,
    pub beta_fast: f32,
    pub beta_slow: f32,
    /// Training context before scaling (YaRN's correction dimensions use it).
    pub n_ctx_orig: usize,
    /// `rope.scaling.yarn_log_multiplier` (DeepSeek's mscale_all_dim · 0.1).
    pub yarn_log_mul: f32,
}

/// Multi-head latent attention shapes (deepseek2).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MlaParams {
    /// 0 on "lite" models that have `attn_q` instead of `attn_q_a`/`attn_q_b`.
    pub q_lora_rank: usize,
    pub kv_lora_rank: usize,
    /// Per-head q/k dimensions without rope.
    pub n_embd_head_qk_nope: usize,
    /// Per-head q/k rope dimensions (shared k_pe).
    pub n_embd_head_qk_rope: usize,
    /// Per-head value dimension after `attn_v_b`.
    pub n_embd_head_v: usize,
}

/// Hyperparameters of a model file, with llama.cpp's defaults applied.
#[derive(Clone, Debug, PartialEq)]
pub struct HParams {
    pub arch: Arch,
    pub n_vocab: usize,
    pub n_embd: usize,
    /// Layers run by the forward pass (MTP / NextN layers excluded).
    pub n_layer: usize,
    /// Layers in the file, MTP layers included.
    pub n_layer_all: usize,
    pub n_ctx_train: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
    /// Per-head key dimension (for MLA: kv_lora + rope, as the file says).
    pub n_embd_head_k: usize,
    pub n_embd_head_v: usize,
    pub rms_eps: f32,
    /// Dense FFN size (dense models and leading dense layers).
    pub n_ff: usize,
    /// Routed-expert FFN size.
    pub n_ff_exp: usize,
    /// Shared-expert FFN size (all shared experts together).
    pub n_ff_shexp: usize,
    pub n_expert: usize,
    pub n_expert_used: usize,
    pub n_expert_shared: usize,
    pub n_expert_groups: usize,
    pub n_group_used: usize,
    pub n_layer_dense_lead: usize,
    pub expert_weights_scale: f32,
    pub expert_weights_norm: bool,
    pub gating: Gating,
    pub rope: RopeParams,
    pub mla: Option<MlaParams>,
}

impl HParams {
    /// Reads hyperparameters from a file's metadata.
    pub fn from_gguf(file: &GgufFile) -> Result<HParams, ModelError> {
        let arch_name = file
            .architecture()
            .ok_or(ModelError::MissingKey("general.architecture".to_owned()))?;
        let arch = Arch::from_name(arch_name)?;
        let keys = Keys { file, arch };

        let n_embd = keys.req_usize("embedding_length")?;
        let n_layer_all = keys.req_usize("block_count")?;
        let n_head = keys.req_usize("attention.head_count")?;
        if n_head == 0 || n_embd == 0 || n_layer_all == 0 {
            return Err(ModelError::BadValue {
                key: format!("{}.embedding_length/head_count/block_count", arch.name()),
                why: "must be positive".to_owned(),
            });
        }
        let n_head_kv = keys.opt_usize("attention.head_count_kv")?.unwrap_or(n_head);
        let n_embd_head_k = keys
            .opt_usize("attention.key_length")?
            .unwrap_or(n_embd / n_head);
        let n_embd_head_v = keys
            .opt_usize("attention.value_length")?
            .unwrap_or(n_embd / n_head);
        let n_vocab = match keys.opt_usize("vocab_size")? {
            Some(v) => v,
            None => file
                .get("tokenizer.ggml.tokens")
                .and_then(MetaValue::as_array)
                .map(|a| a.len())
                .or_else(|| file.tensor("token_embd.weight").map(|t| t.ne[1] as usize))
                .ok_or_else(|| ModelError::MissingKey(format!("{}.vocab_size", arch.name())))?,
        };
        let n_ff = keys.opt_usize("feed_forward_length")?.unwrap_or(0);
        let n_expert = keys.opt_usize("expert_count")?.unwrap_or(0);
        let n_expert_used = keys.opt_usize("expert_used_count")?.unwrap_or(0);
        if n_expert > 0 && (n_expert_used == 0 || n_expert_used > n_expert) {
            return Err(ModelError::BadValue {
                key: format!("{}.expert_used_count", arch.name()),
                why: format!("{n_expert_used} experts used of {n_expert}"),
            });
        }
        let n_expert_shared = keys.opt_usize("expert_shared_count")?.unwrap_or(0);
        // Mixtral-style llama files give the per-expert size as feed_forward_length.
        let n_ff_exp = keys
            .opt_usize("expert_feed_forward_length")?
            .unwrap_or(n_ff);
        let n_ff_shexp = match keys.opt_usize("expert_shared_feed_forward_length")? {
            Some(v) => v,
            None => n_ff_exp * n_expert_shared.max(1),
        };
        let n_expert_groups = keys.opt_usize("expert_group_count")?.unwrap_or(1).max(1);
        let n_group_used = keys
            .opt_usize("expert_group_used_count")?
            .unwrap_or(1)
            .max(1);
        if n_expert > 0 && (n_expert % n_expert_groups != 0 || n_group_used > n_expert_groups) {
            return Err(ModelError::BadValue {
                key: format!("{}.expert_group_count", arch.name()),
                why: format!("{n_expert} experts in {n_expert_groups} groups, {n_group_used} used"),
            });
        }
        let n_layer_dense_lead = keys.opt_usize("leading_dense_block_count")?.unwrap_or(0);
        let n_nextn = keys.opt_usize("nextn_predict_layers")?.unwrap_or(0);
        if n_nextn >= n_layer_all {
            return Err(ModelError::BadValue {
                key: format!("{}.nextn_predict_layers", arch.name()),
                why: format!("{n_nextn} MTP layers of {n_layer_all}"),
            });
        }
        let n_layer = n_layer_all - n_nextn;
        let rms_eps = keys
            .opt_f32("attention.layer_norm_rms_epsilon")?
            .unwrap_or(1e-5);

        let gating_id = keys.opt_usize("expert_gating_func")?.unwrap_or(0);
        let gating = match (gating_id, arch) {
            (1, _) => Gating::Softmax,
            (2, _) => Gating::Sigmoid,
            (3, _) => Gating::SoftmaxWeight,
            (0, Arch::Glm4Moe) => Gating::Sigmoid,
            (0, _) => Gating::Softmax,
            (other, _) => {
                return Err(ModelError::BadValue {
                    key: format!("{}.expert_gating_func", arch.name()),
                    why: format!("unknown gating function {other}"),
                })
            }
        };
        let expert_weights_norm = match arch {
            Arch::Llama | Arch::Qwen3Moe => true,
            Arch::Qwen2Moe => false,
            Arch::Deepseek2 | Arch::Glm4Moe => {
                keys.opt_bool("expert_weights_norm")?.unwrap_or(false)
            }
        };
        let expert_weights_scale = keys.opt_f32("expert_weights_scale")?.unwrap_or(0.0);

        let mla = if arch == Arch::Deepseek2 {
            let kv_lora_rank = keys.req_usize("attention.kv_lora_rank")?;
            let q_lora_rank = keys.opt_usize("attention.q_lora_rank")?.unwrap_or(0);
            let n_rot = keys.req_usize("rope.dimension_count")?;
            let head_k_mla = keys
                .opt_usize("attention.key_length_mla")?
                .unwrap_or(n_embd_head_k);
            let head_v_mla = keys
                .opt_usize("attention.value_length_mla")?
                .unwrap_or(n_embd_head_v);
            if head_k_mla <= n_rot {
                return Err(ModelError::BadValue {
                    key: "deepseek2.attention.key_length_mla".to_owned(),
                    why: format!("{head_k_mla} is not larger than the rope dimension {n_rot}"),
                });
            }
            Some(MlaParams {
                q_lora_rank,
                kv_lora_rank,
                n_embd_head_qk_nope: head_k_mla - n_rot,
                n_embd_head_qk_rope: n_rot,
                n_embd_head_v: head_v_mla,
            })
        } else {
            None
        };

        let rope = rope_params(&keys, arch, n_embd_head_k, &mla)?;
        let n_ctx_train = keys.opt_usize("context_length")?.unwrap_or(4096);

        Ok(HParams {
            arch,
            n_vocab,
            n_embd,
            n_layer,
            n_layer_all,
            n_ctx_train,
            n_head,
            n_head_kv,
            n_embd_head_k,
            n_embd_head_v,
            rms_eps,
            n_ff,
            n_ff_exp,
            n_ff_shexp,
            n_expert,
            n_expert_used,
            n_expert_shared,
            n_expert_groups,
            n_group_used,
            n_layer_dense_lead,
            expert_weights_scale,
            expert_weights_norm,
            gating,
            rope,
            mla,
        })
    }

    /// Whether layer `layer` has routed experts.
    pub fn is_moe_layer(&self, layer: usize) -> bool {
        self.n_expert > 0 && layer >= self.n_layer_dense_lead
    }
}

fn rope_params(
    keys: &Keys<'_>,
    arch: Arch,
    n_embd_head_k: usize,
    mla: &Option<MlaParams>,
) -> Result<RopeParams, ModelError> {
    let default_rot = match mla {
        Some(m) => m.n_embd_head_qk_rope,
        None => n_embd_head_k,
    };
    let n_rot = keys
        .opt_usize("rope.dimension_count")?
        .unwrap_or(default_rot);
    if n_rot % 2 != 0 || (mla.is_none() && n_rot > n_embd_head_k) {
        return Err(ModelError::BadValue {
            key: format!("{}.rope.dimension_count", arch.name()),
            why: format!("{n_rot} rotated dimensions for heads of {n_embd_head_k}"),
        });
    }
    let freq_base = keys.opt_f32("rope.freq_base")?.unwrap_or(10000.0);
    let scaling_type = keys.opt_str("rope.scaling.type")?.unwrap_or("none");
    let factor = keys.opt_f32("rope.scaling.factor")?.unwrap_or(0.0);
    let n_ctx_train = keys.opt_usize("context_length")?.unwrap_or(4096);
    let n_ctx_orig = keys
        .opt_usize("rope.scaling.original_context_length")?
        .unwrap_or(n_ctx_train);
    let yarn_log_mul = keys
        .opt_f32("rope.scaling.yarn_log_multiplier")?
        .unwrap_or(0.0);
    let freq_scale = if factor > 0.0 && scaling_type != "none" {
        1.0 / factor
    } else {
        1.0
    };
    let (ext_factor, attn_factor) = match scaling_type {
        "yarn" => {
            // llama.cpp: ext_factor 1 for YaRN; deepseek2 pre-scales kq_scale and cancels
            // rope_yarn's own magnitude correction through attn_factor.
            let attn_factor = if arch == Arch::Deepseek2 {
                1.0 / (1.0 + 0.1 * (1.0 / freq_scale).ln())
            } else {
                1.0
            };
            (1.0, attn_factor)
        }
        "none" | "linear" => (0.0, 1.0),
        other => {
            return Err(ModelError::BadValue {
                key: format!("{}.rope.scaling.type", arch.name()),
                why: format!("unsupported rope scaling {other:?}"),
            })
        }
    };
    Ok(RopeParams {
        kind: arch.rope_type(),
        n_rot,
        freq_base,
        freq_scale,
        ext_factor,
        attn_factor,
        beta_fast: 32.0,
        beta_slow: 1.0,
        n_ctx_orig,
        yarn_log_mul,
    })
}

/// Typed access to `{arch}.*` keys.
struct Keys<'a> {
    file: &'a GgufFile,
    arch: Arch,
}

impl Keys<'_> {
    fn key(&self, suffix: &str) -> String {
        format!("{}.{suffix}", self.arch.name())
    }

    fn opt_usize(&self, suffix: &str) -> Result<Option<usize>, ModelError> {
        let key = self.key(suffix);
        match self.file.get(&key) {
            None => Ok(None),
            Some(v) => match v.as_u64() {
                Some(n) if n <= (1 << 40) => Ok(Some(n as usize)),
                _ => Err(ModelError::BadValue {
                    key,
                    why: format!("expected a non-negative integer, found {v:?}"),
                }),
            },
        }
    }

    fn req_usize(&self, suffix: &str) -> Result<usize, ModelError> {
        self.opt_usize(suffix)?
            .ok_or_else(|| ModelError::MissingKey(self.key(suffix)))
    }

    fn opt_f32(&self, suffix: &str) -> Result<Option<f32>, ModelError> {
        let key = self.key(suffix);
        match self.file.get(&key) {
            None => Ok(None),
            Some(v) => match v.as_f32() {
                Some(x) if x.is_finite() => Ok(Some(x)),
                _ => Err(ModelError::BadValue {
                    key,
                    why: format!("expected a finite number, found {v:?}"),
                }),
            },
        }
    }

    fn opt_bool(&self, suffix: &str) -> Result<Option<bool>, ModelError> {
        let key = self.key(suffix);
        match self.file.get(&key) {
            None => Ok(None),
            Some(v) => v.as_bool().map(Some).ok_or_else(|| ModelError::BadValue {
                key,
                why: format!("expected a bool, found {v:?}"),
            }),
        }
    }

    fn opt_str(&self, suffix: &str) -> Result<Option<&str>, ModelError> {
        let key = self.key(suffix);
        match self.file.get(&key) {
            None => Ok(None),
            Some(v) => v.as_str().map(Some).ok_or_else(|| ModelError::BadValue {
                key,
                why: format!("expected a string, found {v:?}"),
            }),
        }
    }
}

/// A model file that moeshard cannot run, and why.
#[derive(Debug, Error)]
pub enum ModelError {
    #[error(
        "unsupported architecture {0:?} (supported: llama, qwen2moe, qwen3moe, deepseek2, glm4moe)"
    )]
    UnsupportedArch(String),
    #[error("missing metadata key {0}")]
    MissingKey(String),
    #[error("bad value for {key}: {why}")]
    BadValue { key: String, why: String },
    #[error("missing tensor {0}")]
    MissingTensor(String),
    #[error("tensor {name} has shape {found:?}, expected {expected:?}")]
    BadShape {
        name: String,
        found: Vec<u64>,
        expected: Vec<u64>,
    },
    #[error("tensor {name} has type {ty}, which cannot be used there")]
    BadType { name: String, ty: String },
}
