//! Unpacking of the K-quant bit fields into plain integers, shared by dequantization and the
//! dot products so that both read the layouts of docs/FORMATS.md section B the same way.

use crate::quant::blocks::{BlockQ2K, BlockQ3K, BlockQ4K, BlockQ5K, BlockQ6K};
use crate::quant::QK_K;

/// Q2_K quants, 0..=3, in element order.
pub(super) fn q2k_quants(b: &BlockQ2K) -> [u8; QK_K] {
    let mut q = [0u8; QK_K];
    for (e, out) in q.iter_mut().enumerate() {
        let (n, j, l) = (e / 128, (e % 128) / 32, e % 32);
        *out = (b.qs[32 * n + l] >> (2 * j)) & 3;
    }
    q
}

/// Q3_K quants, -4..=3, in element order (a clear `hmask` bit subtracts 4).
pub(super) fn q3k_quants(b: &BlockQ3K) -> [i8; QK_K] {
    let mut q = [0i8; QK_K];
    for (e, out) in q.iter_mut().enumerate() {
        let (n, j, l) = (e / 128, (e % 128) / 32, e % 32);
        let lo = ((b.qs[32 * n + l] >> (2 * j)) & 3) as i8;
        let high_bit = (b.hmask[l] >> (e / 32)) & 1;
        *out = if high_bit == 1 { lo } else { lo - 4 };
    }
    q
}

/// Q3_K's 16 six-bit scales, already offset to -32..=31.
pub(super) fn q3k_scales(scales: &[u8; 12]) -> [i8; 16] {
    let mut sc = [0i8; 16];
    for (i, out) in sc.iter_mut().enumerate() {
        let low = (scales[i % 8] >> (4 * (i / 8))) & 15;
        let high = (scales[8 + i % 4] >> (2 * (i / 4))) & 3;
        *out = (low | (high << 4)) as i8 - 32;
    }
    sc
}

/// Q4_K/Q5_K's 8 six-bit (scale, min) pairs (ggml's `get_scale_min_k4`).
pub(super) fn k4_scale_min(scales: &[u8; 12]) -> ([u8; 8], [u8; 8]) {
    let mut sc = [0u8; 8];
    let mut mn = [0u8; 8];
    for j in 0..8 {
        if j < 4 {
            sc[j] = scales[j] & 63;
            mn[j] = scales[j + 4] & 63;
        } else {
            sc[j] = (scales[j + 4] & 15) | ((scales[j - 4] >> 6) << 4);
            mn[j] = (scales[j + 4] >> 4) | ((scales[j] >> 6) << 4);
        }
    }
    (sc, mn)
}

/// Q4_K quants, 0..=15, in element order.
pub(super) fn q4k_quants(b: &BlockQ4K) -> [u8; QK_K] {
    let mut q = [0u8; QK_K];
    for (e, out) in q.iter_mut().enumerate() {
        let (c, high, l) = (e / 64, (e % 64) / 32, e % 32);
        *out = (b.qs[32 * c + l] >> (4 * high)) & 15;
    }
    q
}

/// Q5_K quants, 0..=31, in element order.
pub(super) fn q5k_quants(b: &BlockQ5K) -> [u8; QK_K] {
    let mut q = [0u8; QK_K];
    for (e, out) in q.iter_mut().enumerate() {
        let (c, high, l) = (e / 64, (e % 64) / 32, e % 32);
        let nibble = (b.qs[32 * c + l] >> (4 * high)) & 15;
        let bit = (b.qh[l] >> (e / 32)) & 1;
        *out = nibble | (bit << 4);
    }
    q
}

/// Q6_K quants, -32..=31, in element order.
pub(super) fn q6k_quants(b: &BlockQ6K) -> [i8; QK_K] {
    let mut q = [0i8; QK_K];
    for (e, out) in q.iter_mut().enumerate() {
        let (n, g, l) = (e / 128, (e % 128) / 32, e % 32);
        let byte = b.ql[64 * n + l + 32 * (g & 1)];
        let low = if g < 2 { byte & 15 } else { byte >> 4 };
        let high = (b.qh[32 * n + l] >> (2 * g)) & 3;
        *out = (low | (high << 4)) as i8 - 32;
    }
    q
}
