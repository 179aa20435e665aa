//! AVX2+FMA (and AVX-512 where present) kernels, reached only through `dispatch::Kernels`.
//!
//! OWNED BY HELPER "simd-kernels" (being written).
