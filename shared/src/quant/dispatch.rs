//! The kernel table, picked once at run time from the CPU's features.
//!
//! OWNED BY HELPER "simd-kernels" (being written).
