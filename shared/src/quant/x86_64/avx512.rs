//! AVX-512 (F, BW, VL, VNNI) kernels for the hottest weight types: Q4_K, Q6_K, Q8_0 and the
//! legacy 4/5-bit quants (Q4_0, Q4_1, Q5_0, Q5_1).
//!
//! They keep AVX2's 256-bit vectors and its block math (and its f32 operations, so their
//! results equal the AVX2 level's bit for bit) and use two things AVX-512 adds: 32 vector
//! registers, so a tile of eight tokens keeps its accumulators and the unpacked weights in
//! registers, and VNNI, whose `vpdpwssd` folds the scale multiply and the accumulation into one
//! instruction (`vpdpbusd` for Q8_0: the byte products and their sum). That cuts the
//! per-token work, which is what bounds batched (prefill, multi-token expert) matmuls.
//!
//! Integer sums are exact, so a small tile splits its accumulation over four chains (hiding
//! `vpdpwssd`'s latency) while a large tile uses one, without changing any result: a token's
//! value still does not depend on the tile it is computed in.

use std::arch::x86_64::*;

use super::avx2::{
    batch_rows, cv, f16_at, f16_pair, f16x8, f32_at, fma_acc, halves, hsum_each, hsum_epi32,
    k4_min_prod, k4_mins_acc, k4_mins_value, k4_scales_mins, lane, ld, ld128, legacy_batch_rows,
    load8, prefetch_span, q4k_quants, q6k_quants, q8_0_rows, row_tile, rows_driver, store8,
    token_blocks, u16_at, unpack_q4_0, unpack_q4_1, unpack_q5_0, unpack_q5_1, unpack_q8_0,
    TokenTile, BATCH_TILE, GROUP, I16_SCALE, K4_SCALE, Q8_0_BYTES, Q8_K_BSUMS, Q8_K_BYTES, Q8_K_QS,
};

/// Tokens per tile.
pub(crate) const TILE: usize = 8;

/// Independent integer accumulation chains per token for a tile of `b` tokens.
const fn chains(b: usize) -> usize {
    if b >= 4 {
        1
    } else {
        4
    }
}

/// The first `B` rows of `rows` (each `x_row` bytes).
fn split<const B: usize>(rows: &[u8], x_row: usize) -> [&[u8]; B] {
    let mut out: [&[u8]; B] = [&[]; B];
    for (t, o) in out.iter_mut().enumerate() {
        *o = &rows[t * x_row..(t + 1) * x_row];
    }
    out
}

macro_rules! batched {
    ($(#[$doc:meta])* $name:ident, $tile:ident) => {
        $(#[$doc])*
        ///
        /// `xs` holds `out.len()` activation rows of equal length; `w` is one weight row of
        /// `n` elements. Lengths are checked by `dispatch`.
        #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
        pub(crate) fn $name(n: usize, w: &[u8], xs: &[u8], out: &mut [f32]) {
            let _ = n;
            let n_tokens = out.len();
            if n_tokens == 0 {
                return;
            }
            let x_row = xs.len() / n_tokens;
            for (tile_idx, out_tile) in out.chunks_mut(TILE).enumerate() {
                let rows = &xs[tile_idx * TILE * x_row..];
                match out_tile.len() {
                    8 => out_tile.copy_from_slice(&$tile::<8>(w, split(rows, x_row))),
                    7 => out_tile.copy_from_slice(&$tile::<7>(w, split(rows, x_row))),
                    6 => out_tile.copy_from_slice(&$tile::<6>(w, split(rows, x_row))),
                    5 => out_tile.copy_from_slice(&$tile::<5>(w, split(rows, x_row))),
                    4 => out_tile.copy_from_slice(&$tile::<4>(w, split(rows, x_row))),
                    3 => out_tile.copy_from_slice(&$tile::<3>(w, split(rows, x_row))),
                    2 => out_tile.copy_from_slice(&$tile::<2>(w, split(rows, x_row))),
                    _ => out_tile.copy_from_slice(&$tile::<1>(w, split(rows, x_row))),
                }
            }
        }
    };
}

batched!(
    /// Q4_K weights · Q8_K activations.
    dot_q4_k, q4_k_tile
);
batched!(
    /// Q6_K weights · Q8_K activations.
    dot_q6_k, q6_k_tile
);
batched!(
    /// Q8_0 weights · Q8_0 activations.
    dot_q8_0, q8_0_tile
);

/// One weight row of a legacy quant · the tokens of `xs`: [`batch_rows`] with one row (the
/// tokens' scales converted once, then the row's tile).
macro_rules! one_row {
    ($(#[$doc:meta])* $name:ident, $rows:ident) => {
        $(#[$doc])*
        ///
        /// `xs` holds `out.len()` activation rows of equal length; `w` is one weight row of
        /// `n` elements. Lengths are checked by `dispatch`.
        #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
        pub(crate) fn $name(n: usize, w: &[u8], xs: &[u8], out: &mut [f32]) {
            let stride = out.len();
            $rows(n, w, xs, out, stride);
        }
    };
}

one_row!(
    /// Q4_0 weights · Q8_0 activations.
    dot_q4_0,
    batch_rows_q4_0
);
one_row!(
    /// Q5_0 weights · Q8_0 activations.
    dot_q5_0,
    batch_rows_q5_0
);
one_row!(
    /// Q4_1 weights · Q8_1 activations.
    dot_q4_1,
    batch_rows_q4_1
);
one_row!(
    /// Q5_1 weights · Q8_1 activations.
    dot_q5_1,
    batch_rows_q5_1
);

/// Σ of a block's unsigned-weight × signed-activation byte products (Q4_1, Q5_1).
#[inline]
#[target_feature(enable = "avx2,avx512f,avx512bw,avx512vl,avx512vnni")]
fn u8_i8_block_dot(wq: __m256i, xq: __m256i) -> __m256i {
    _mm256_dpbusd_epi32(_mm256_setzero_si256(), wq, xq)
}

legacy_batch_rows!(
    "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni",
    q8_0_block_dot,
    u8_i8_block_dot
);

/// Sum of a token's accumulation chains.
#[inline]
#[target_feature(enable = "avx2")]
fn fold(chains: [__m256i; 4]) -> __m256i {
    _mm256_add_epi32(
        _mm256_add_epi32(chains[0], chains[1]),
        _mm256_add_epi32(chains[2], chains[3]),
    )
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
fn q4_k_tile<const B: usize>(w: &[u8], x: [&[u8]; B]) -> [f32; B] {
    let n_chains = chains(B);
    let mut acc = [_mm256_setzero_ps(); B];
    let mut acc_m = [_mm_setzero_ps(); B];
    for (i, wb) in w.chunks_exact(144).enumerate() {
        prefetch_span(w, i * 144, (i + 1) * 144);
        let (d, dmin) = f16_pair(wb, 0);
        let (sc, mn) = k4_scales_mins(&wb[4..16]);
        let sc = _mm256_set1_epi64x(sc as i64);
        let mins = _mm_cvtepu8_epi16(_mm_cvtsi64_si128(mn as i64));
        let xb = token_blocks(&x, i, Q8_K_BYTES);
        let mut sumi = [[_mm256_setzero_si256(); 4]; B];
        for c in 0..4 {
            let (lo, hi) = q4k_quants(wb, c);
            let sc_lo = _mm256_shuffle_epi8(sc, cv(&K4_SCALE[2 * c]));
            let sc_hi = _mm256_shuffle_epi8(sc, cv(&K4_SCALE[2 * c + 1]));
            let chain = c % n_chains;
            for t in 0..B {
                let p_lo = _mm256_maddubs_epi16(lo, ld(xb[t], Q8_K_QS + 64 * c));
                let p_hi = _mm256_maddubs_epi16(hi, ld(xb[t], Q8_K_QS + 64 * c + 32));
                let s = _mm256_dpwssd_epi32(sumi[t][chain], p_lo, sc_lo);
                sumi[t][chain] = _mm256_dpwssd_epi32(s, p_hi, sc_hi);
            }
        }
        // The same float operations as AVX2's `k4_tile` (ggml's order).
        for t in 0..B {
            let xd = f32_at(xb[t], 0);
            let prod = k4_min_prod(mins, xb[t]);
            acc_m[t] = k4_mins_acc::<false>(acc_m[t], -(xd * dmin), prod);
            acc[t] = fma_acc(acc[t], xd * d, fold(sumi[t]));
        }
    }
    let mut out = hsum_each(&acc);
    for (o, m) in out.iter_mut().zip(acc_m) {
        *o += k4_mins_value::<false>(m);
    }
    out
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
fn q6_k_tile<const B: usize>(w: &[u8], x: [&[u8]; B]) -> [f32; B] {
    let n_chains = chains(B);
    let mut acc = [_mm256_setzero_ps(); B];
    for (i, wb) in w.chunks_exact(210).enumerate() {
        prefetch_span(w, i * 210, (i + 1) * 210);
        let d = f16_at(wb, 208);
        let scales = _mm256_cvtepi8_epi16(ld128(wb, 192));
        let sc_half = halves(scales);
        let xb = token_blocks(&x, i, Q8_K_BYTES);
        let mut sumi = [[_mm256_setzero_si256(); 4]; B];
        for (half, &sc_h) in sc_half.iter().enumerate() {
            let ql0 = ld(wb, 64 * half);
            let ql1 = ld(wb, 64 * half + 32);
            let qh = ld(wb, 128 + 32 * half);
            // q + 32 = low four bits | two high bits << 4, in 0..=63; the -32 comes from bsums.
            let u = q6k_quants(ql0, ql1, qh);
            for (g, ug) in u.into_iter().enumerate() {
                let sc = _mm256_shuffle_epi8(sc_h, cv(&I16_SCALE[g]));
                let chain = g % n_chains;
                for t in 0..B {
                    let p = _mm256_maddubs_epi16(ug, ld(xb[t], Q8_K_QS + 128 * half + 32 * g));
                    sumi[t][chain] = _mm256_dpwssd_epi32(sumi[t][chain], p, sc);
                }
            }
        }
        for t in 0..B {
            let offset = _mm256_madd_epi16(scales, ld(xb[t], Q8_K_BSUMS));
            let s = _mm256_sub_epi32(fold(sumi[t]), _mm256_slli_epi32::<5>(offset));
            acc[t] = fma_acc(acc[t], d * f32_at(xb[t], 0), s);
        }
    }
    hsum_each(&acc)
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
fn q8_0_tile<const B: usize>(w: &[u8], x: [&[u8]; B]) -> [f32; B] {
    let n_blocks = w.len() / Q8_0_BYTES;
    let mut acc = [_mm256_setzero_ps(); B];
    for g0 in (0..n_blocks).step_by(GROUP) {
        let count = (n_blocks - g0).min(GROUP);
        prefetch_span(w, g0 * Q8_0_BYTES, (g0 + count) * Q8_0_BYTES);
        let wd = f16x8(count, |k| u16_at(w, (g0 + k) * Q8_0_BYTES));
        // The products d_w·d_x of the group's blocks, kept in memory: a broadcast from memory
        // runs on a load port, where taking a lane of a register would compete with the
        // integer dot products for the shuffle port.
        let mut scales = [[0.0f32; GROUP]; B];
        for t in 0..B {
            let xd = f16x8(count, |k| u16_at(x[t], (g0 + k) * Q8_0_BYTES));
            store8(&mut scales[t], _mm256_mul_ps(wd, xd));
        }
        // One FMA per block in block order, as AVX2's `q8_0_family` (ggml's order).
        // (`k` indexes the blocks of the weight, of every token and of every scale row.)
        #[allow(clippy::needless_range_loop)]
        for k in 0..count {
            let i = g0 + k;
            let wq = unpack_q8_0(&w[i * Q8_0_BYTES..(i + 1) * Q8_0_BYTES]);
            let aw = _mm256_sign_epi8(wq, wq);
            let xb = token_blocks(&x, i, Q8_0_BYTES);
            for t in 0..B {
                // |w| · (x with w's sign): exact while x is never -128 (see `avx2`).
                let sx = _mm256_sign_epi8(ld(xb[t], 2), wq);
                let sumi = _mm256_dpbusd_epi32(_mm256_setzero_si256(), aw, sx);
                let scale = _mm256_set1_ps(scales[t][k]);
                acc[t] = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(sumi), acc[t]);
            }
        }
    }
    hsum_each(&acc)
}

/// Σ of a block's products of signed weight and activation bytes, with VNNI.
#[inline]
#[target_feature(enable = "avx2,avx512f,avx512bw,avx512vl,avx512vnni")]
fn q8_0_block_dot(wq: __m256i, xq: __m256i) -> __m256i {
    // |w| · (x with w's sign): exact while x is never -128 (see `avx2`).
    let aw = _mm256_sign_epi8(wq, wq);
    _mm256_dpbusd_epi32(_mm256_setzero_si256(), aw, _mm256_sign_epi8(xq, wq))
}

q8_0_rows!(
    /// Q8_0 rows · one Q8_0 activation row, VNNI.
    q8_0_rows_tile,
    "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni",
    q8_0_block_dot
);

rows_driver!(
    /// Q8_0 weight rows · one Q8_0 activation row (each result as `dot_q8_0` gives it).
    dot_rows_q8_0,
    q8_0_rows_tile,
    "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni"
);

/// Q4_K rows · one Q8_K activation row in the order of ggml's CPU_REPACK GEMV kernel (see
/// `avx2::q4_k_repack_tile`): per super-block one exact integer total and one mins sum, each
/// converted and added with one scalar FMA. The integer totals are exact whichever
/// instructions make them, so VNNI's `vpdpwssd` folds the scale multiply and the sum, the
/// activation's quants are loaded once for all the rows, and each row's result is the bits
/// `avx2::dot_q4_k_repack` gives (tested).
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
fn q4_k_repack_rows_tile<const R: usize>(w: [&[u8]; R], x: &[u8]) -> [f32; R] {
    let mut acc = [_mm_setzero_ps(); R];
    let mut acc_m = [_mm_setzero_ps(); R];
    for (i, xb) in x.chunks_exact(Q8_K_BYTES).enumerate() {
        let xd = f32_at(xb, 0);
        let mut xq = [[_mm256_setzero_si256(); 2]; 4];
        for (c, q) in xq.iter_mut().enumerate() {
            *q = [ld(xb, Q8_K_QS + 64 * c), ld(xb, Q8_K_QS + 64 * c + 32)];
        }
        for r in 0..R {
            let wb = &w[r][i * 144..(i + 1) * 144];
            prefetch_span(w[r], i * 144, (i + 1) * 144);
            let (d, dmin) = f16_pair(wb, 0);
            let (sc, mn) = k4_scales_mins(&wb[4..16]);
            let sc = _mm256_set1_epi64x(sc as i64);
            let mins = _mm_cvtepu8_epi16(_mm_cvtsi64_si128(mn as i64));
            let mut sumi = [_mm256_setzero_si256(); 2];
            for (c, q) in xq.iter().enumerate() {
                let (lo, hi) = q4k_quants(wb, c);
                let sc_lo = _mm256_shuffle_epi8(sc, cv(&K4_SCALE[2 * c]));
                let sc_hi = _mm256_shuffle_epi8(sc, cv(&K4_SCALE[2 * c + 1]));
                let p_lo = _mm256_maddubs_epi16(lo, q[0]);
                let p_hi = _mm256_maddubs_epi16(hi, q[1]);
                let s = _mm256_dpwssd_epi32(sumi[c % 2], p_lo, sc_lo);
                sumi[c % 2] = _mm256_dpwssd_epi32(s, p_hi, sc_hi);
            }
            let total = hsum_epi32(_mm256_add_epi32(sumi[0], sumi[1]));
            let prod = k4_min_prod(mins, xb);
            let m = _mm_hadd_epi32(_mm_hadd_epi32(prod, prod), prod);
            let (scale, scale_m) = (_mm_set_ss(d * xd), _mm_set_ss(dmin * xd));
            acc[r] = _mm_fmadd_ss(_mm_cvtsi32_ss(_mm_setzero_ps(), total), scale, acc[r]);
            acc_m[r] = _mm_fmadd_ss(_mm_cvtepi32_ps(m), scale_m, acc_m[r]);
        }
    }
    let mut out = [0.0f32; R];
    for r in 0..R {
        out[r] = _mm_cvtss_f32(acc[r]) - _mm_cvtss_f32(acc_m[r]);
    }
    out
}

rows_driver!(
    /// Q4_K weight rows · one Q8_K activation row in CPU_REPACK's GEMV order (each result as
    /// `avx2::dot_q4_k_repack` gives it).
    dot_rows_q4_k_repack,
    q4_k_repack_rows_tile,
    "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni"
);
