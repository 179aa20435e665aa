//! Size limits of the protocol's messages, checked before anything is allocated or used.
//!
//! They are derived from the largest model moeshard targets, DeepSeek-V3 / Kimi-K2
//! (n_embd 7168, 61 layers, 256 resp. 384 routed experts, top-8), with headroom:
//!
//! - A decode dispatch (1 token, Q8_K) is 7168 / 256 × 292 = 8176 bytes of activations
//!   and 28 KiB of f32 partial sums back.
//! - A prefill chunk of 2048 tokens (llama.cpp's default batch) of DeepSeek-V3 is at most
//!   2048 × 7168 values per input: 56 MiB in f32 (the widest activation type), 16 MiB in
//!   Q8_K; its result is 56 MiB. A 512-token chunk is a quarter of that.
//! - Models with a wider hidden size (up to [`MAX_N_EMBD`]) get proportionally fewer tokens
//!   per dispatch: the coordinator cuts prefill into chunks of at most
//!   [`MAX_DISPATCH_VALUES`] / n_embd tokens.
//!
//! [`MAX_MESSAGE_BYTES`] bounds every encoded message (the gRPC codec's limit and the QUIC
//! framing's), so a peer never allocates more than that for one message.

/// The widest hidden size accepted (DeepSeek-V3 and Kimi-K2 have 7168).
pub const MAX_N_EMBD: usize = 16384;
/// The widest input row of a split FFN's second round (`STAGE_DOWN`: the FFN's `n_ff`;
/// DeepSeek-V3's dense layers have 18432, Llama-3.1-405B's 53248).
pub const MAX_DENSE_N_FF: usize = 65536;

/// The most token rows in one dispatch.
pub const MAX_DISPATCH_TOKENS: usize = 2048;

/// The most values (n_tokens × n_embd) per activation input or result of one dispatch:
/// a 2048-token chunk of DeepSeek-V3.
pub const MAX_DISPATCH_VALUES: usize = 2048 * 7168;

/// The most activation inputs of one dispatch: gate and up may consume two types.
pub const MAX_DISPATCH_INPUTS: usize = 2;

/// The most assignments per token (n_expert_used): 8 in the target models, 32 allowed.
pub const MAX_EXPERTS_PER_TOKEN: usize = 32;

/// The most assignments in one dispatch.
pub const MAX_DISPATCH_ASSIGNMENTS: usize = MAX_DISPATCH_TOKENS * MAX_EXPERTS_PER_TOKEN;

/// The most layers and experts per layer an id may name (DeepSeek-V3: 61 and 256,
/// Kimi-K2: 61 and 384).
pub const MAX_LAYERS: usize = 1024;
/// See [`MAX_LAYERS`].
pub const MAX_EXPERTS: usize = 4096;

/// The most slices one node's inventory lists: every expert of every layer of Kimi-K2
/// (61 × 384 = 23424) cut in 8, with room to spare.
pub const MAX_INVENTORY_SLICES: usize = 1 << 18;

/// The longest node name, coordinator name or error message, in bytes.
pub const MAX_NAME_BYTES: usize = 256;
/// See [`MAX_NAME_BYTES`].
pub const MAX_ERROR_MESSAGE_BYTES: usize = 4096;

/// The largest encoded message: a dispatch with two f32 inputs at [`MAX_DISPATCH_VALUES`]
/// (112 MiB) plus its assignments (each at most 2 + 5 + 5 + 5 bytes encoded) and 1 MiB for
/// the remaining fields. An inventory at [`MAX_INVENTORY_SLICES`] (≤ 26 bytes a slice,
/// 6.5 MiB) and a result (56 MiB) fit well inside.
pub const MAX_MESSAGE_BYTES: usize =
    MAX_DISPATCH_INPUTS * MAX_DISPATCH_VALUES * 4 + MAX_DISPATCH_ASSIGNMENTS * 17 + (1 << 20);
