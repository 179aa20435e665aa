//! Dot products as ggml's generic kernels compute them (`ggml_vec_dot_*_generic` in
//! ggml-cpu/quants.c, `ggml_vec_dot_f32/f16/bf16` scalar paths in ggml-cpu/vec.cpp).
//!
//! Inside a block everything is integer arithmetic (exact, so its order is free); the float
//! steps keep ggml's order: the per-block scale products, the per-block accumulation into one
//! f32, and for Q3_K..Q6_K the eight f32 lane accumulators `sums[l]` (lane = element index mod
//! 8) that are added to the total only after the last block.

use super::blocks;
use super::decode;
use crate::quant::blocks::{
    BlockQ2K, BlockQ3K, BlockQ4K, BlockQ4_0, BlockQ4_1, BlockQ5K, BlockQ5_0, BlockQ5_1, BlockQ6K,
    BlockQ8K, BlockQ8_0, BlockQ8_1, QK,
};
use crate::quant::{GgmlType, QK_K};

/// Lengths are checked by the caller.
pub(super) fn vec_dot(ty: GgmlType, w: &[u8], x: &[u8]) -> f32 {
    match ty {
        GgmlType::F32 => dot_f32(w, x),
        GgmlType::F16 => dot_f16(w, x),
        GgmlType::BF16 => dot_bf16(w, x),
        GgmlType::Q4_0 => q4_0_q8_0(w, x),
        GgmlType::Q4_1 => q4_1_q8_1(w, x),
        GgmlType::Q5_0 => q5_0_q8_0(w, x),
        GgmlType::Q5_1 => q5_1_q8_1(w, x),
        GgmlType::Q8_0 => q8_0_q8_0(w, x),
        GgmlType::Q2_K => q2_k_q8_k(w, x),
        GgmlType::Q3_K => q3_k_q8_k(w, x),
        GgmlType::Q4_K => q4_k_q8_k(w, x),
        GgmlType::Q5_K => q5_k_q8_k(w, x),
        GgmlType::Q6_K => q6_k_q8_k(w, x),
        GgmlType::Q4_K_R8 => {
            panic!("vec_dot: Q4_K_R8 interleaves whole groups of 8 rows; it has no one-row form")
        }
        GgmlType::Q8_1 | GgmlType::Q8_K => {
            panic!("vec_dot: {ty} is an activation-only type; ggml has no dot product for it")
        }
    }
}

// ---- float types: f32 products, f64 accumulation, one final rounding to f32 ----

fn dot_f32(w: &[u8], x: &[u8]) -> f32 {
    let mut sum = 0.0f64;
    for (a, b) in w.chunks_exact(4).zip(x.chunks_exact(4)) {
        let a = f32::from_le_bytes([a[0], a[1], a[2], a[3]]);
        let b = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        sum += f64::from(a * b);
    }
    sum as f32
}

fn dot_f16(w: &[u8], x: &[u8]) -> f32 {
    let mut sum = 0.0f64;
    for (a, b) in w.chunks_exact(2).zip(x.chunks_exact(2)) {
        let a = half::f16::from_le_bytes([a[0], a[1]]).to_f32();
        let b = half::f16::from_le_bytes([b[0], b[1]]).to_f32();
        sum += f64::from(a * b);
    }
    sum as f32
}

fn dot_bf16(w: &[u8], x: &[u8]) -> f32 {
    let mut sum = 0.0f64;
    for (a, b) in w.chunks_exact(2).zip(x.chunks_exact(2)) {
        let a = super::bf16_bits_to_fp32(u16::from_le_bytes([a[0], a[1]]));
        let b = super::bf16_bits_to_fp32(u16::from_le_bytes([b[0], b[1]]));
        sum += f64::from(a * b);
    }
    sum as f32
}

// ---- legacy quants: one integer sum per 32-element block ----

/// `Σ w(e)·y[e]` over a legacy block, with `w(e)` the weight's integer quant of element e.
fn block_isum(y: &[i8; QK], w: impl Fn(usize) -> i32) -> i32 {
    y.iter()
        .enumerate()
        .map(|(e, &q)| w(e) * i32::from(q))
        .sum()
}

fn nibble(qs: &[u8; QK / 2], e: usize) -> i32 {
    i32::from(if e < QK / 2 {
        qs[e] & 15
    } else {
        qs[e - QK / 2] >> 4
    })
}

fn fifth_bit(qh: [u8; 4], e: usize) -> i32 {
    ((u32::from_le_bytes(qh) >> e) & 1) as i32 * 16
}

fn q4_0_q8_0(w: &[u8], x: &[u8]) -> f32 {
    let mut sumf = 0.0f32;
    for (wb, xb) in blocks::<BlockQ4_0>(w).zip(blocks::<BlockQ8_0>(x)) {
        let sumi = block_isum(&xb.qs, |e| nibble(&wb.qs, e) - 8);
        // ggml: `sumf += sumi*d_x*d_y`, evaluated left to right.
        sumf += sumi as f32 * wb.d.to_f32() * xb.d.to_f32();
    }
    sumf
}

fn q4_1_q8_1(w: &[u8], x: &[u8]) -> f32 {
    let mut sumf = 0.0f32;
    for (wb, xb) in blocks::<BlockQ4_1>(w).zip(blocks::<BlockQ8_1>(x)) {
        let sumi = block_isum(&xb.qs, |e| nibble(&wb.qs, e));
        sumf += (wb.d.to_f32() * xb.d.to_f32()) * sumi as f32 + wb.m.to_f32() * xb.s.to_f32();
    }
    sumf
}

fn q5_0_q8_0(w: &[u8], x: &[u8]) -> f32 {
    let mut sumf = 0.0f32;
    for (wb, xb) in blocks::<BlockQ5_0>(w).zip(blocks::<BlockQ8_0>(x)) {
        let sumi = block_isum(&xb.qs, |e| (nibble(&wb.qs, e) | fifth_bit(wb.qh, e)) - 16);
        sumf += (wb.d.to_f32() * xb.d.to_f32()) * sumi as f32;
    }
    sumf
}

fn q5_1_q8_1(w: &[u8], x: &[u8]) -> f32 {
    let mut sumf = 0.0f32;
    for (wb, xb) in blocks::<BlockQ5_1>(w).zip(blocks::<BlockQ8_1>(x)) {
        let sumi = block_isum(&xb.qs, |e| nibble(&wb.qs, e) | fifth_bit(wb.qh, e));
        sumf += (wb.d.to_f32() * xb.d.to_f32()) * sumi as f32 + wb.m.to_f32() * xb.s.to_f32();
    }
    sumf
}

fn q8_0_q8_0(w: &[u8], x: &[u8]) -> f32 {
    let mut sumf = 0.0f32;
    for (wb, xb) in blocks::<BlockQ8_0>(w).zip(blocks::<BlockQ8_0>(x)) {
        let sumi = block_isum(&xb.qs, |e| i32::from(wb.qs[e]));
        sumf += sumi as f32 * (wb.d.to_f32() * xb.d.to_f32());
    }
    sumf
}

// ---- K-quants against Q8_K ----

fn q2_k_q8_k(w: &[u8], x: &[u8]) -> f32 {
    let mut sumf = 0.0f32;
    for (wb, xb) in blocks::<BlockQ2K>(w).zip(blocks::<BlockQ8K>(x)) {
        let q = decode::q2k_quants(&wb);
        // The min term needs only the activation's group sums.
        let summs: i32 = xb
            .bsums
            .iter()
            .zip(&wb.scales)
            .map(|(&bsum, &sc)| i32::from(bsum) * i32::from(sc >> 4))
            .sum();
        let mut isum = 0i32;
        for (group, (ws, ys)) in q.chunks_exact(16).zip(xb.qs.chunks_exact(16)).enumerate() {
            let isuml: i32 = ws
                .iter()
                .zip(ys)
                .map(|(&a, &b)| i32::from(a) * i32::from(b))
                .sum();
            isum += i32::from(wb.scales[group] & 15) * isuml;
        }
        let dall = xb.d * wb.d.to_f32();
        let dmin = xb.d * wb.dmin.to_f32();
        sumf += dall * isum as f32 - dmin * summs as f32;
    }
    sumf
}

/// ggml's eight-lane accumulation: `aux32[e % 8] += scale(e) * q8[e] * q[e]` within a block.
fn lanes(q: &[i8; QK_K], y: &[i8; QK_K], scale: impl Fn(usize) -> i32) -> [i32; 8] {
    let mut aux32 = [0i32; 8];
    for (e, (&a, &b)) in q.iter().zip(y).enumerate() {
        aux32[e % 8] += scale(e) * (i32::from(a) * i32::from(b));
    }
    aux32
}

fn add_lanes(sums: &mut [f32; 8], d: f32, aux32: &[i32; 8]) {
    for (s, &a) in sums.iter_mut().zip(aux32) {
        *s += d * a as f32;
    }
}

fn finish_lanes(mut sumf: f32, sums: &[f32; 8]) -> f32 {
    for &s in sums {
        sumf += s;
    }
    sumf
}

fn q3_k_q8_k(w: &[u8], x: &[u8]) -> f32 {
    let mut sums = [0.0f32; 8];
    for (wb, xb) in blocks::<BlockQ3K>(w).zip(blocks::<BlockQ8K>(x)) {
        let q = decode::q3k_quants(&wb);
        let scales = decode::q3k_scales(&wb.scales);
        let aux32 = lanes(&q, &xb.qs, |e| i32::from(scales[e / 16]));
        add_lanes(&mut sums, wb.d.to_f32() * xb.d, &aux32);
    }
    finish_lanes(0.0, &sums)
}

/// Q4_K and Q5_K share everything but the quant width.
fn k4_style(
    q: &[u8; QK_K],
    scales: &[u8; 12],
    d: f32,
    dmin: f32,
    xb: &BlockQ8K,
    sums: &mut [f32; 8],
    sumf: &mut f32,
) {
    let (sc, mn) = decode::k4_scale_min(scales);
    // Every quant is at most 31, so it fits the i8 buffer ggml uses too.
    let q: [i8; QK_K] = q.map(|v| v as i8);
    let sumi: i32 = xb
        .bsums
        .iter()
        .enumerate()
        .map(|(j, &bsum)| i32::from(bsum) * i32::from(mn[j / 2]))
        .sum();
    let aux32 = lanes(&q, &xb.qs, |e| i32::from(sc[e / 32]));
    add_lanes(sums, d * xb.d, &aux32);
    *sumf -= (dmin * xb.d) * sumi as f32;
}

fn q4_k_q8_k(w: &[u8], x: &[u8]) -> f32 {
    let mut sums = [0.0f32; 8];
    let mut sumf = 0.0f32;
    for (wb, xb) in blocks::<BlockQ4K>(w).zip(blocks::<BlockQ8K>(x)) {
        let q = decode::q4k_quants(&wb);
        let (d, dmin) = (wb.d.to_f32(), wb.dmin.to_f32());
        k4_style(&q, &wb.scales, d, dmin, &xb, &mut sums, &mut sumf);
    }
    finish_lanes(sumf, &sums)
}

fn q5_k_q8_k(w: &[u8], x: &[u8]) -> f32 {
    let mut sums = [0.0f32; 8];
    let mut sumf = 0.0f32;
    for (wb, xb) in blocks::<BlockQ5K>(w).zip(blocks::<BlockQ8K>(x)) {
        let q = decode::q5k_quants(&wb);
        let (d, dmin) = (wb.d.to_f32(), wb.dmin.to_f32());
        k4_style(&q, &wb.scales, d, dmin, &xb, &mut sums, &mut sumf);
    }
    finish_lanes(sumf, &sums)
}

fn q6_k_q8_k(w: &[u8], x: &[u8]) -> f32 {
    let mut sums = [0.0f32; 8];
    for (wb, xb) in blocks::<BlockQ6K>(w).zip(blocks::<BlockQ8K>(x)) {
        let q = decode::q6k_quants(&wb);
        let aux32 = lanes(&q, &xb.qs, |e| i32::from(wb.scales[e / 16]));
        add_lanes(&mut sums, wb.d.to_f32() * xb.d, &aux32);
    }
    finish_lanes(0.0, &sums)
}
