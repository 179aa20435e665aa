//! Activation quantization as ggml's x86 build does it before a dot product.
//!
//! Q8_0 and Q8_1 follow the AVX2 `quantize_row_q8_0`/`quantize_row_q8_1` (ggml-cpu
//! `arch/x86/quants.c`), which made the fixtures: `d = amax / 127`, `id = 127 / amax`,
//! `q = round_half_even(x * id)` saturated to i8 (the `packs` instructions), and for Q8_1
//! `s = f16(d * Σq)` with the sum taken in integers. Q8_K is `quantize_row_q8_K_ref`, which x86
//! uses too.

use half::f16;

use super::nearest_int;
use crate::quant::blocks::{BlockQ8K, BlockQ8_0, BlockQ8_1, QK};
use crate::quant::{GgmlType, QK_K};

/// Lengths are checked by the caller.
pub(super) fn quantize(ty: GgmlType, src: &[f32], dst: &mut [u8]) {
    match ty {
        GgmlType::F32 => {
            for (bytes, x) in dst.chunks_exact_mut(4).zip(src) {
                bytes.copy_from_slice(&x.to_le_bytes());
            }
        }
        GgmlType::F16 => {
            for (bytes, &x) in dst.chunks_exact_mut(2).zip(src) {
                bytes.copy_from_slice(&f16::from_f32(x).to_le_bytes());
            }
        }
        GgmlType::BF16 => {
            for (bytes, &x) in dst.chunks_exact_mut(2).zip(src) {
                bytes.copy_from_slice(&super::fp32_to_bf16_bits(x).to_le_bytes());
            }
        }
        GgmlType::Q8_0 => each_block(src, dst, q8_0_block),
        GgmlType::Q8_1 => each_block(src, dst, q8_1_block),
        GgmlType::Q8_K => each_block(src, dst, q8_k_block),
        GgmlType::Q4_K_R8 => {
            panic!("quantize: Q4_K_R8 interleaves whole groups of 8 rows; it has no one-row form")
        }
        GgmlType::Q4_0
        | GgmlType::Q4_1
        | GgmlType::Q5_0
        | GgmlType::Q5_1
        | GgmlType::Q2_K
        | GgmlType::Q3_K
        | GgmlType::Q4_K
        | GgmlType::Q5_K
        | GgmlType::Q6_K => panic!(
            "quantize_row: {ty} is a weight type, not an activation type \
             (use quantize_weights_row)"
        ),
    }
}

/// Quantizes `src` block by block into `dst` (lengths already checked).
pub(super) fn each_block<T: bytemuck::Pod, const N: usize>(
    src: &[f32],
    dst: &mut [u8],
    quantize_block: fn(&[f32; N]) -> T,
) {
    for (out, xs) in dst
        .chunks_exact_mut(size_of::<T>())
        .zip(src.chunks_exact(N))
    {
        let xs: &[f32; N] = match xs.try_into() {
            Ok(xs) => xs,
            Err(_) => unreachable!("chunks_exact yields chunks of N"),
        };
        out.copy_from_slice(bytemuck::bytes_of(&quantize_block(xs)));
    }
}

/// `_mm256_round_ps(.., _MM_ROUND_NEAREST)` then `_mm256_cvtps_epi32`: NaN and values outside
/// i32 become i32::MIN (the "integer indefinite" value).
fn round_even_to_i32(v: f32) -> i32 {
    let r = v.round_ties_even();
    if (-2_147_483_648.0..2_147_483_648.0).contains(&r) {
        r as i32
    } else {
        // Also NaN, which no range contains.
        i32::MIN
    }
}

/// The two saturating `packs` steps (i32 → i16 → i8) collapse to one clamp.
fn saturate_i8(v: i32) -> i8 {
    v.clamp(-128, 127) as i8
}

/// amax, d and id as the AVX2 path computes them.
fn q8_scales(xs: &[f32; QK]) -> (f32, f32) {
    // `_mm256_max_ps` of non-NaN values is an ordinary max; the order does not matter.
    let amax = xs
        .iter()
        .fold(0.0f32, |m, &x| if x.abs() > m { x.abs() } else { m });
    let d = amax / 127.0;
    let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
    (d, id)
}

fn q8_0_block(xs: &[f32; QK]) -> BlockQ8_0 {
    let (d, id) = q8_scales(xs);
    let mut qs = [0i8; QK];
    for (q, &x) in qs.iter_mut().zip(xs) {
        *q = saturate_i8(round_even_to_i32(x * id));
    }
    BlockQ8_0 {
        d: f16::from_f32(d),
        qs,
    }
}

fn q8_1_block(xs: &[f32; QK]) -> BlockQ8_1 {
    let (d, id) = q8_scales(xs);
    let mut qs = [0i8; QK];
    // The AVX2 path sums the i32 values before packing them, in wrapping i32 lanes.
    let mut sum = 0i32;
    for (q, &x) in qs.iter_mut().zip(xs) {
        let v = round_even_to_i32(x * id);
        sum = sum.wrapping_add(v);
        *q = saturate_i8(v);
    }
    BlockQ8_1 {
        d: f16::from_f32(d),
        s: f16::from_f32(d * sum as f32),
        qs,
    }
}

/// `quantize_row_q8_K_ref`: scale from the first element of largest magnitude, with its sign.
pub(super) fn q8_k_block(xs: &[f32; QK_K]) -> BlockQ8K {
    let mut max = 0.0f32;
    let mut amax = 0.0f32;
    for &x in xs {
        if x.abs() > amax {
            amax = x.abs();
            max = x;
        }
    }
    if amax == 0.0 {
        // ggml leaves bsums unwritten here; zero is what any reader of a zero block expects.
        return BlockQ8K {
            d: 0.0,
            qs: [0; QK_K],
            bsums: [0; QK_K / 16],
        };
    }
    let iscale = -127.0 / max;
    let mut qs = [0i8; QK_K];
    for (q, &x) in qs.iter_mut().zip(xs) {
        // C converts the int to int8_t by wrapping; only reachable for non-finite input.
        *q = nearest_int(iscale * x).min(127) as i8;
    }
    let mut bsums = [0i16; QK_K / 16];
    for (sum, group) in bsums.iter_mut().zip(qs.chunks_exact(16)) {
        *sum = group.iter().map(|&q| i32::from(q)).sum::<i32>() as i16;
    }
    BlockQ8K {
        d: 1.0 / iscale,
        qs,
        bsums,
    }
}
