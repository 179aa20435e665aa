//! The moeshard coordinator: the dense part of the model (embeddings, attention,
//! norms, routers, shared experts, output head), the KV cache, the sampler, and
//! the `moeshard` command line.

pub mod bench;
pub mod certs;
pub mod chat_template;
pub mod convert;
pub mod distributed;
pub mod engine;
pub mod histogram;
pub mod inspect;
pub mod kv_cache;
pub mod models;
pub mod routing_stats;
pub mod safetensors_out;
pub mod sampler;
pub mod server;
pub mod synth;
pub mod tokenizer;
