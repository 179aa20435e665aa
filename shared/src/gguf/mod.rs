//! The GGUF container: a zero-copy reader over a memory map and a streaming writer.
//!
//! OWNED BY HELPER "gguf" (being written).
