//! Criterion benchmarks (OWNED BY HELPER "simd-kernels").
fn main() {}
