//! Dequantization, bit-exact with gguf-py's numpy `gguf.quants.dequantize`.
//!
//! gguf-py computes in f32 and forms the per-group factors first (`d * sc`, `dmin * m`), then
//! `factor * q - min_factor`; the same operations in the same order give the same bits. Types
//! gguf-py lacks (Q8_1, Q8_K) follow ggml's `x = d * q`.

use half::f16;

use super::blocks;
use super::decode;
use crate::quant::blocks::{
    BlockQ2K, BlockQ3K, BlockQ4K, BlockQ4_0, BlockQ4_1, BlockQ5K, BlockQ5_0, BlockQ5_1, BlockQ6K,
    BlockQ8K, BlockQ8_0, BlockQ8_1, QK,
};
use crate::quant::{GgmlType, QK_K};

/// Lengths are checked by the caller.
pub(super) fn dequantize(ty: GgmlType, src: &[u8], dst: &mut [f32]) {
    match ty {
        GgmlType::F32 => {
            for (out, bytes) in dst.iter_mut().zip(src.chunks_exact(4)) {
                *out = f32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
            }
        }
        GgmlType::F16 => {
            for (out, bytes) in dst.iter_mut().zip(src.chunks_exact(2)) {
                *out = f16::from_le_bytes([bytes[0], bytes[1]]).to_f32();
            }
        }
        GgmlType::BF16 => {
            for (out, bytes) in dst.iter_mut().zip(src.chunks_exact(2)) {
                *out = super::bf16_bits_to_fp32(u16::from_le_bytes([bytes[0], bytes[1]]));
            }
        }
        GgmlType::Q4_0 => each_block(src, dst, q4_0),
        GgmlType::Q4_1 => each_block(src, dst, q4_1),
        GgmlType::Q5_0 => each_block(src, dst, q5_0),
        GgmlType::Q5_1 => each_block(src, dst, q5_1),
        GgmlType::Q8_0 => each_block(src, dst, q8_0),
        GgmlType::Q8_1 => each_block(src, dst, q8_1),
        GgmlType::Q2_K => each_block(src, dst, q2_k),
        GgmlType::Q3_K => each_block(src, dst, q3_k),
        GgmlType::Q4_K => each_block(src, dst, q4_k),
        GgmlType::Q5_K => each_block(src, dst, q5_k),
        GgmlType::Q6_K => each_block(src, dst, q6_k),
        GgmlType::Q8_K => each_block(src, dst, q8_k),
        GgmlType::Q4_K_R8 => {
            panic!("dequantize: Q4_K_R8 interleaves whole groups of 8 rows; it has no one-row form")
        }
    }
}

fn each_block<T: bytemuck::Pod, const N: usize>(
    src: &[u8],
    dst: &mut [f32],
    dequantize_block: fn(&T, &mut [f32; N]),
) {
    for (block, out) in blocks::<T>(src).zip(dst.chunks_exact_mut(N)) {
        let out: &mut [f32; N] = match out.try_into() {
            Ok(out) => out,
            Err(_) => unreachable!("chunks_exact_mut yields chunks of N"),
        };
        dequantize_block(&block, out);
    }
}

/// Nibble `e` of a legacy 32-element block: elements 0..16 are the low nibbles, 16..32 the high.
fn nibble(qs: &[u8; QK / 2], e: usize) -> u8 {
    if e < QK / 2 {
        qs[e] & 15
    } else {
        qs[e - QK / 2] >> 4
    }
}

fn q4_0(b: &BlockQ4_0, out: &mut [f32; QK]) {
    let d = b.d.to_f32();
    for (e, y) in out.iter_mut().enumerate() {
        *y = d * (i32::from(nibble(&b.qs, e)) - 8) as f32;
    }
}

fn q4_1(b: &BlockQ4_1, out: &mut [f32; QK]) {
    let (d, m) = (b.d.to_f32(), b.m.to_f32());
    for (e, y) in out.iter_mut().enumerate() {
        *y = d * f32::from(nibble(&b.qs, e)) + m;
    }
}

fn q5_0(b: &BlockQ5_0, out: &mut [f32; QK]) {
    let d = b.d.to_f32();
    let qh = u32::from_le_bytes(b.qh);
    for (e, y) in out.iter_mut().enumerate() {
        let q = nibble(&b.qs, e) | ((((qh >> e) & 1) as u8) << 4);
        *y = d * (i32::from(q) - 16) as f32;
    }
}

fn q5_1(b: &BlockQ5_1, out: &mut [f32; QK]) {
    let (d, m) = (b.d.to_f32(), b.m.to_f32());
    let qh = u32::from_le_bytes(b.qh);
    for (e, y) in out.iter_mut().enumerate() {
        let q = nibble(&b.qs, e) | ((((qh >> e) & 1) as u8) << 4);
        *y = d * f32::from(q) + m;
    }
}

fn q8_0(b: &BlockQ8_0, out: &mut [f32; QK]) {
    let d = b.d.to_f32();
    for (y, &q) in out.iter_mut().zip(&b.qs) {
        *y = f32::from(q) * d;
    }
}

fn q8_1(b: &BlockQ8_1, out: &mut [f32; QK]) {
    let d = b.d.to_f32();
    for (y, &q) in out.iter_mut().zip(&b.qs) {
        *y = f32::from(q) * d;
    }
}

fn q2_k(b: &BlockQ2K, out: &mut [f32; QK_K]) {
    let (d, dmin) = (b.d.to_f32(), b.dmin.to_f32());
    let q = decode::q2k_quants(b);
    for (group, (ys, qs)) in out.chunks_exact_mut(16).zip(q.chunks_exact(16)).enumerate() {
        let sc = b.scales[group];
        let dl = d * f32::from(sc & 15);
        let ml = dmin * f32::from(sc >> 4);
        for (y, &q) in ys.iter_mut().zip(qs) {
            *y = dl * f32::from(q) - ml;
        }
    }
}

fn q3_k(b: &BlockQ3K, out: &mut [f32; QK_K]) {
    let d = b.d.to_f32();
    let q = decode::q3k_quants(b);
    let scales = decode::q3k_scales(&b.scales);
    for (group, (ys, qs)) in out.chunks_exact_mut(16).zip(q.chunks_exact(16)).enumerate() {
        let dl = d * f32::from(scales[group]);
        for (y, &q) in ys.iter_mut().zip(qs) {
            *y = dl * f32::from(q);
        }
    }
}

fn k4_style(d: f16, dmin: f16, scales: &[u8; 12], q: &[u8; QK_K], out: &mut [f32; QK_K]) {
    let (d, dmin) = (d.to_f32(), dmin.to_f32());
    let (sc, mn) = decode::k4_scale_min(scales);
    for (group, (ys, qs)) in out.chunks_exact_mut(32).zip(q.chunks_exact(32)).enumerate() {
        let dl = d * f32::from(sc[group]);
        let ml = dmin * f32::from(mn[group]);
        for (y, &q) in ys.iter_mut().zip(qs) {
            *y = dl * f32::from(q) - ml;
        }
    }
}

fn q4_k(b: &BlockQ4K, out: &mut [f32; QK_K]) {
    k4_style(b.d, b.dmin, &b.scales, &decode::q4k_quants(b), out);
}

fn q5_k(b: &BlockQ5K, out: &mut [f32; QK_K]) {
    k4_style(b.d, b.dmin, &b.scales, &decode::q5k_quants(b), out);
}

fn q6_k(b: &BlockQ6K, out: &mut [f32; QK_K]) {
    let d = b.d.to_f32();
    let q = decode::q6k_quants(b);
    for (group, (ys, qs)) in out.chunks_exact_mut(16).zip(q.chunks_exact(16)).enumerate() {
        let dl = d * f32::from(b.scales[group]);
        for (y, &q) in ys.iter_mut().zip(qs) {
            *y = dl * f32::from(q);
        }
    }
}

fn q8_k(b: &BlockQ8K, out: &mut [f32; QK_K]) {
    for (y, &q) in out.iter_mut().zip(&b.qs) {
        *y = b.d * f32::from(q);
    }
}
