//! x86-64 SIMD kernels, reached only through `dispatch::Kernels`, which checks the CPU's
//! features before it hands any of them out.
//!
//! - `avx2`: AVX2 + FMA + F16C (every Xeon since Haswell): all weight types, and the Q8_0,
//!   Q8_1, Q8_K and F16 activation quantizers.
//! - `avx512`: AVX-512 F/BW/VL/VNNI versions of the hottest kernels (Q4_K, Q6_K, Q8_0), with
//!   tiles of eight tokens; the other entries of that level are AVX2's.
//! - `amx`: Q4_K batches on the AMX-INT8 tile unit (16 rows × 16 tokens per instruction),
//!   bit for bit the AVX-512 lanes kernels' values.
//!
//! Toolchain: the kernels are safe `#[target_feature]` functions calling the intrinsics without
//! `unsafe` (Rust 1.87), read blocks with `slice::as_chunks` (1.88) and name the AVX-512
//! features (1.89).

pub(crate) mod amx;
pub(crate) mod avx2;
pub(crate) mod avx512;
