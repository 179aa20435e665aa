//! A weight matrix times a batch of activation rows, each weight row read once per batch.
//!
//! OWNED BY HELPER "simd-kernels" (being written).
