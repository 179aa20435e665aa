//! K-quant dot products in the float order of ggml's "tiled" CPU matmul
//! (`ggml-cpu/tiled/`, AVX2 + FMA build), which ggml uses instead of `vec_dot` for Q2_K..Q6_K
//! weights that are not repacked when a `MUL_MAT` has at least 8 token rows, or when at least
//! 8 tokens are routed to an expert of a `MUL_MAT_ID`.
//!
//! Per super-block the kernel forms two exact integer sums, `s1 = Σ scale·(q·y)` (Q3_K's and
//! Q6_K's offsets included) and, for the types with mins, `s2 = Σ min·bsum`; then
//! `r = d·f32(s1)` (one rounded product), `r = fma(-dmin, f32(s2), r)`, and the token's
//! accumulator takes `fma(r, d_y, acc)`. There is no lane split and no final reduction, so a
//! token's value does not depend on the tile it was computed in.

use super::blocks;
use super::decode;
use crate::quant::blocks::{BlockQ2K, BlockQ3K, BlockQ4K, BlockQ5K, BlockQ6K, BlockQ8K, BlockQ8_0};
use crate::quant::GgmlType;

/// Lengths are checked by the caller; panics for a type the tiled path does not take.
pub(super) fn vec_dot_tiled(ty: GgmlType, w: &[u8], x: &[u8]) -> f32 {
    match ty {
        GgmlType::Q2_K => run::<BlockQ2K>(w, x, q2_k_sums),
        GgmlType::Q3_K => run::<BlockQ3K>(w, x, q3_k_sums),
        GgmlType::Q4_K => run::<BlockQ4K>(w, x, |b, y| {
            k4_sums(&decode::q4k_quants(b), &b.scales, b.d, b.dmin, y)
        }),
        GgmlType::Q5_K => run::<BlockQ5K>(w, x, |b, y| {
            k4_sums(&decode::q5k_quants(b), &b.scales, b.d, b.dmin, y)
        }),
        GgmlType::Q6_K => run::<BlockQ6K>(w, x, q6_k_sums),
        other => panic!("vec_dot_tiled: {other} has no tiled order"),
    }
}

/// One super-block's terms: `(d, s1, Some((dmin, s2)))`, or `None` for the types without mins.
type Sums = (f32, i32, Option<(f32, i32)>);

fn run<B: bytemuck::Pod>(w: &[u8], x: &[u8], sums: impl Fn(&B, &BlockQ8K) -> Sums) -> f32 {
    let mut acc = 0.0f32;
    for (wb, xb) in blocks::<B>(w).zip(blocks::<BlockQ8K>(x)) {
        let (d, s1, mins) = sums(&wb, &xb);
        let mut r = d * s1 as f32;
        if let Some((dmin, s2)) = mins {
            r = (-dmin).mul_add(s2 as f32, r);
        }
        acc = r.mul_add(xb.d, acc);
    }
    acc
}

/// Σ over sub-blocks of `scale(s) · Σ q·y` with `width`-element sub-blocks.
fn scaled_sum(
    q: impl Fn(usize) -> i32,
    y: &[i8],
    width: usize,
    scale: impl Fn(usize) -> i32,
) -> i32 {
    let mut s1 = 0i32;
    for (s, ys) in y.chunks_exact(width).enumerate() {
        let raw: i32 = ys
            .iter()
            .enumerate()
            .map(|(e, &v)| q(s * width + e) * i32::from(v))
            .sum();
        s1 += scale(s) * raw;
    }
    s1
}

fn q2_k_sums(b: &BlockQ2K, y: &BlockQ8K) -> Sums {
    let q = decode::q2k_quants(b);
    let s1 = scaled_sum(
        |e| i32::from(q[e]),
        &y.qs,
        16,
        |s| i32::from(b.scales[s] & 15),
    );
    let s2: i32 = y
        .bsums
        .iter()
        .zip(&b.scales)
        .map(|(&bs, &sc)| i32::from(bs) * i32::from(sc >> 4))
        .sum();
    (b.d.to_f32(), s1, Some((b.dmin.to_f32(), s2)))
}

fn q3_k_sums(b: &BlockQ3K, y: &BlockQ8K) -> Sums {
    let q = decode::q3k_quants(b);
    let sc = decode::q3k_scales(&b.scales);
    let s1 = scaled_sum(|e| i32::from(q[e]), &y.qs, 16, |s| i32::from(sc[s]));
    (b.d.to_f32(), s1, None)
}

fn k4_sums(
    q: &[u8; crate::quant::QK_K],
    scales: &[u8; 12],
    d: half::f16,
    dmin: half::f16,
    y: &BlockQ8K,
) -> Sums {
    let (sc, mn) = decode::k4_scale_min(scales);
    let s1 = scaled_sum(|e| i32::from(q[e]), &y.qs, 32, |s| i32::from(sc[s]));
    let s2: i32 = y
        .bsums
        .iter()
        .enumerate()
        .map(|(j, &bs)| i32::from(bs) * i32::from(mn[j / 2]))
        .sum();
    (d.to_f32(), s1, Some((dmin.to_f32(), s2)))
}

fn q6_k_sums(b: &BlockQ6K, y: &BlockQ8K) -> Sums {
    let q = decode::q6k_quants(b);
    let s1 = scaled_sum(|e| i32::from(q[e]), &y.qs, 16, |s| i32::from(b.scales[s]));
    (b.d.to_f32(), s1, None)
}

/// Q8_0 · Q8_0 in exact-block order (see `vec_dot_blocks`). Lengths are checked by the caller.
pub(super) fn q8_0_blocks(w: &[u8], x: &[u8]) -> f32 {
    let mut acc = 0.0f32;
    for (wb, xb) in blocks::<BlockQ8_0>(w).zip(blocks::<BlockQ8_0>(x)) {
        let s: i32 = (wb.qs.iter().zip(&xb.qs))
            .map(|(&a, &b)| i32::from(a) * i32::from(b))
            .sum();
        let r = wb.d.to_f32() * s as f32;
        acc = r.mul_add(xb.d.to_f32(), acc);
    }
    acc
}
