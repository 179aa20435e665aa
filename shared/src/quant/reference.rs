//! Portable scalar kernels: the definition every SIMD variant is tested against.
//!
//! OWNED BY HELPER "quant-reference" (being written).
//!
//! Contract (callers rely on these exact signatures):
//! - `dequantize_row(ty, src, dst)`: `src` holds whole blocks of `ty` (any weight type of
//!   `GgmlType::WEIGHT_TYPES`, plus Q8_0/Q8_1/Q8_K), `dst.len()` = number of elements. Must equal
//!   gguf-py's `gguf.quants.dequantize` bit for bit.
//! - `quantize_row(ty, src, dst)`: quantizes an activation row to `ty` ∈ {F32, F16, BF16, Q8_0,
//!   Q8_1, Q8_K} exactly as ggml's x86 build does (docs/FORMATS.md: Q8_0/Q8_1 = the AVX2 path
//!   with round-half-even, Q8_K = `quantize_row_q8_K_ref`). `dst.len()` = `ty.row_bytes(src.len())`.
//! - `vec_dot(ty, n, w, x) -> f32`: dot product of one weight row of type `ty` (n elements) with an
//!   activation row of type `ty.vec_dot_type()`, computed as ggml's generic (scalar) vec_dot does:
//!   integer sums inside blocks, f32 accumulation across blocks.
//! Lengths that do not match are caller bugs and panic with a message.

use super::GgmlType;

/// Dequantizes one row (whole blocks) of `ty` into `dst`.
pub fn dequantize_row(ty: GgmlType, src: &[u8], dst: &mut [f32]) {
    let _ = (ty, src, dst);
    todo!("quant-reference helper")
}

/// Quantizes an activation row to `ty` as ggml's x86 build does.
pub fn quantize_row(ty: GgmlType, src: &[f32], dst: &mut [u8]) {
    let _ = (ty, src, dst);
    todo!("quant-reference helper")
}

/// Dot product of a weight row of type `ty` with an activation row of `ty.vec_dot_type()`.
pub fn vec_dot(ty: GgmlType, n: usize, w: &[u8], x: &[u8]) -> f32 {
    let _ = (ty, n, w, x);
    todo!("quant-reference helper")
}
