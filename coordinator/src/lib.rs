//! The moeshard coordinator: the dense part of the model (embeddings, attention,
//! norms, routers, shared experts, output head), the KV cache, the sampler, and
//! the `moeshard` command line.

pub mod inspect;
