//! Portable scalar kernels: the definition every SIMD variant is tested against.
//!
//! Contract (callers rely on these exact signatures):
//! - [`dequantize_row`]`(ty, src, dst)`: `src` holds whole blocks of `ty` (any weight type of
//!   `GgmlType::WEIGHT_TYPES`, plus Q8_0/Q8_1/Q8_K), `dst.len()` = number of elements. Equals
//!   gguf-py's `gguf.quants.dequantize` bit for bit (same f32 operations in the same order).
//! - [`quantize_row`]`(ty, src, dst)`: quantizes an activation row to `ty` ∈ {F32, F16, BF16,
//!   Q8_0, Q8_1, Q8_K} exactly as ggml's x86 build does (docs/FORMATS.md: Q8_0/Q8_1 = the AVX2
//!   path with round-half-even, Q8_K = `quantize_row_q8_K_ref`). `dst.len()` =
//!   `ty.row_bytes(src.len())`.
//! - [`vec_dot`]`(ty, n, w, x) -> f32`: dot product of one weight row of type `ty` (n elements)
//!   with an activation row of type `ty.vec_dot_type()`, computed as ggml's generic (scalar)
//!   vec_dot does: integer sums inside blocks, f32 accumulation across blocks (f64 for the
//!   float types, as `ggml_vec_dot_f32/f16/bf16` do).
//! - [`vec_dot_tiled`]`(ty, n, w, x) -> f32`: the same dot product for Q2_K..Q6_K in the
//!   float order of ggml's tiled matmul (one FMA per super-block, see `tiled`).
//! - [`vec_dot_blocks`]`(ty, n, w, x) -> f32`: a Q8_0 dot product in exact-block order (one
//!   FMA per block), the order of the tile unit's Q8_0 batches.
//! - [`quantize_weights_row`]`(ty, src, dst)`: ggml's `quantize_row_*_ref` for every type (no
//!   importance matrix), to synthesize weight files.
//!
//! Lengths that do not match are caller bugs and panic with a message. No operation is fused
//! (Rust never contracts `a * b + c` into an FMA), so each result is the one the C source
//! describes when compiled without contraction.

mod activation;
mod decode;
mod dequant;
mod dot;
mod tiled;
mod weights;

#[cfg(test)]
mod fixture_tests;
#[cfg(test)]
mod tests;

use bytemuck::Pod;

use super::GgmlType;

/// Dequantizes one row (whole blocks) of `ty` into `dst`.
///
/// Panics if `src.len()` is not `ty.row_bytes(dst.len())`.
pub fn dequantize_row(ty: GgmlType, src: &[u8], dst: &mut [f32]) {
    let n_bytes = row_bytes_or_panic(ty, dst.len());
    assert_eq!(
        src.len(),
        n_bytes,
        "dequantize_row {ty}: {} source bytes for {} elements (want {n_bytes})",
        src.len(),
        dst.len()
    );
    dequant::dequantize(ty, src, dst);
}

/// Quantizes an activation row to `ty` as ggml's x86 build does.
///
/// Panics if `ty` is not an activation type (F32, F16, BF16, Q8_0, Q8_1, Q8_K) or if
/// `dst.len()` is not `ty.row_bytes(src.len())`.
pub fn quantize_row(ty: GgmlType, src: &[f32], dst: &mut [u8]) {
    let n_bytes = row_bytes_or_panic(ty, src.len());
    assert_eq!(
        dst.len(),
        n_bytes,
        "quantize_row {ty}: {} destination bytes for {} elements (want {n_bytes})",
        dst.len(),
        src.len()
    );
    activation::quantize(ty, src, dst);
}

/// Dot product of a weight row of type `ty` with an activation row of `ty.vec_dot_type()`.
///
/// Panics if `ty` is Q8_1 or Q8_K (activation-only types, which ggml has no dot product for)
/// or if `w`/`x` do not hold exactly `n` elements of their types.
pub fn vec_dot(ty: GgmlType, n: usize, w: &[u8], x: &[u8]) -> f32 {
    let x_ty = ty.vec_dot_type();
    let w_bytes = row_bytes_or_panic(ty, n);
    let x_bytes = row_bytes_or_panic(x_ty, n);
    assert_eq!(
        w.len(),
        w_bytes,
        "vec_dot {ty}: {} weight bytes for {n} elements (want {w_bytes})",
        w.len()
    );
    assert_eq!(
        x.len(),
        x_bytes,
        "vec_dot {ty}: {} activation ({x_ty}) bytes for {n} elements (want {x_bytes})",
        x.len()
    );
    dot::vec_dot(ty, w, x)
}

/// [`vec_dot`] of a Q2_K, Q3_K, Q4_K, Q5_K or Q6_K row in the float order of ggml's tiled
/// matmul: per super-block `r = d·f32(s1)`, then `fma(-dmin, f32(s2), r)` for the types with
/// mins, then `acc = fma(r, d_y, acc)` (`s1`, `s2`: the block's exact integer sums).
///
/// Panics as [`vec_dot`] does, or if `ty` is not one of those five types.
pub fn vec_dot_tiled(ty: GgmlType, n: usize, w: &[u8], x: &[u8]) -> f32 {
    let w_bytes = row_bytes_or_panic(ty, n);
    let x_bytes = row_bytes_or_panic(ty.vec_dot_type(), n);
    assert_eq!(
        w.len(),
        w_bytes,
        "vec_dot_tiled {ty}: {} weight bytes for {n} elements",
        w.len()
    );
    assert_eq!(
        x.len(),
        x_bytes,
        "vec_dot_tiled {ty}: {} activation bytes for {n} elements",
        x.len()
    );
    tiled::vec_dot_tiled(ty, w, x)
}

/// [`vec_dot`] of a Q8_0 row in exact-block order, the order of the tile unit's Q8_0 batches
/// (`x86_64::amx`): per block `r = d_w·f32(s)` (`s` the block's exact integer sum), then
/// `acc = fma(r, d_x, acc)`, block after block. (ggml adds each block in eight lanes of four
/// products instead; the two differ in the last bits.)
///
/// Panics as [`vec_dot`] does, or if `ty` is not Q8_0.
pub fn vec_dot_blocks(ty: GgmlType, n: usize, w: &[u8], x: &[u8]) -> f32 {
    assert_eq!(
        ty,
        GgmlType::Q8_0,
        "vec_dot_blocks: {ty} has no exact-block order"
    );
    let bytes = row_bytes_or_panic(ty, n);
    assert_eq!(
        (w.len(), x.len()),
        (bytes, bytes),
        "vec_dot_blocks {ty}: {} weight and {} activation bytes for {n} elements",
        w.len(),
        x.len()
    );
    tiled::q8_0_blocks(w, x)
}

/// Quantizes a weight row to `ty` as ggml's `quantize_row_*_ref` does (no importance matrix).
///
/// Every type is supported. Q8_0 and Q8_1 use ggml's scalar reference (`id = 1/d`, round half
/// away from zero), which is how `llama-quantize` writes files; the activation path
/// ([`quantize_row`]) rounds half to even instead. Panics if `dst.len()` is not
/// `ty.row_bytes(src.len())`.
pub fn quantize_weights_row(ty: GgmlType, src: &[f32], dst: &mut [u8]) {
    let n_bytes = row_bytes_or_panic(ty, src.len());
    assert_eq!(
        dst.len(),
        n_bytes,
        "quantize_weights_row {ty}: {} destination bytes for {} elements (want {n_bytes})",
        dst.len(),
        src.len()
    );
    weights::quantize(ty, src, dst);
}

/// f32 → bf16 bits as ggml's `GGML_FP32_TO_BF16`: round to nearest even, NaN made quiet,
/// subnormals kept (current ggml; older versions flushed them to zero).
pub fn fp32_to_bf16_bits(x: f32) -> u16 {
    let u = x.to_bits();
    if u & 0x7fff_ffff > 0x7f80_0000 {
        // NaN: keep sign and payload top bits, force the quiet bit.
        return ((u >> 16) | 64) as u16;
    }
    // Cannot overflow: the largest non-NaN pattern, 0xff80_0000, plus 0x8000 fits in u32.
    ((u + (0x7fff + ((u >> 16) & 1))) >> 16) as u16
}

/// bf16 bits → f32 (exact).
pub fn bf16_bits_to_fp32(h: u16) -> f32 {
    f32::from_bits(u32::from(h) << 16)
}

/// ggml's `nearest_int`: adds 1.5·2^23 so the f32 adder rounds half to even, then reads the
/// integer from the mantissa. Reproduced bit for bit (also outside its documented range
/// |x| ≤ 4194303, and for NaN, where it returns 0).
pub fn nearest_int(fval: f32) -> i32 {
    let val = fval + 12_582_912.0;
    (val.to_bits() & 0x007f_ffff) as i32 - 0x0040_0000
}

fn row_bytes_or_panic(ty: GgmlType, n_elems: usize) -> usize {
    match ty.row_bytes(n_elems) {
        Some(n) => n,
        None => panic!(
            "{ty}: {n_elems} elements is not a whole number of {}-element blocks",
            ty.block_elems()
        ),
    }
}

/// The blocks of a byte slice, copied out one at a time, so that rows at any alignment (an
/// mmap offset, a `Vec<u8>`) can be read without pointer casts.
fn blocks<T: Pod>(bytes: &[u8]) -> impl Iterator<Item = T> + '_ {
    bytes
        .chunks_exact(size_of::<T>())
        .map(bytemuck::pod_read_unaligned)
}
