//! moeshard's shared library: everything both the coordinator and the expert
//! nodes need and that does no networking — the GGUF container (zero-copy
//! reader, streaming writer), the quant formats and their kernels, and the
//! facts of each model architecture.

pub mod fuzz;
pub mod ggml_math;
pub mod gguf;
pub mod membw;
pub mod models;
pub mod moe;
pub mod parallel;
pub mod placement;
pub mod profile;
pub mod quant;
pub mod rng;
pub mod topology;
