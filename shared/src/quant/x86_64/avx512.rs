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
    hsum_ps, k4_min_prod, k4_mins_acc, k4_mins_value, k4_scales_mins, lane, ld, ld128,
    legacy_batch_rows, load8, prefetch_span, q4_k_rows4, q4k_quants, q6k_quants, q8_0_rows,
    row_tile, rows_driver, store8, token_blocks, u16_at, u32_at, unpack_q4_0, unpack_q4_1,
    unpack_q5_0, unpack_q5_1, unpack_q8_0, TokenTile, BATCH_TILE, GROUP, I16_SCALE, K4_SCALE,
    Q8_0_BYTES, Q8_K_BSUMS, Q8_K_BYTES, Q8_K_QS,
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
    if R == 4 {
        let v = q4_k_repack_rows4(std::array::from_fn(|k| w[k.min(R - 1)]), x);
        return std::array::from_fn(|r| v[r]);
    }
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
            let (sum, prod) = q4_k_block_sums(wb, &xq, xb);
            let total = hsum_epi32(sum);
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

/// One Q4_K super-block `wb` · the token's quants `xq` (its four quarters, as loaded by the
/// rows kernels) and bsums in `xb`: the eight-lane integer sums of scale · quant · x, and the
/// mins products (both exact; reduced by the callers).
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
fn q4_k_block_sums(wb: &[u8], xq: &[[__m256i; 2]; 4], xb: &[u8]) -> (__m256i, __m128i) {
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
    (_mm256_add_epi32(sumi[0], sumi[1]), k4_min_prod(mins, xb))
}

q4_k_rows4!(
    /// [`q4_k_repack_rows_tile`] of four rows with their per-block float steps side by side
    /// (see `avx2::q4_k_rows4`).
    q4_k_repack_rows4,
    "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni",
    q4_k_block_sums
);

rows_driver!(
    /// Q4_K weight rows · one Q8_K activation row in CPU_REPACK's GEMV order (each result as
    /// `avx2::dot_q4_k_repack` gives it).
    dot_rows_q4_k_repack,
    q4_k_repack_rows_tile,
    "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni"
);

// ---------------------------------------------------------------------------------------------
// Q4_K in CPU_REPACK's orders, a tile of weight rows × tokens at a time, in 512-bit vectors.
//
// Both repacked orders are per (row, token) pair: per super-block, exact integer sums are
// converted and added with scalar FMAs into two accumulators. So a tile computes the integer
// sums of up to 16 pairs in 512-bit registers (each row's unpacked quants reused for every
// token, each token's quants for every row), reduces them to one lane per pair, and runs the
// pairs' scalar float steps side by side in the lanes of one vector: lane p does exactly the
// operations the one-pair kernel does, so every result keeps its bits.

/// Tokens per tile at most.
const TILE_TOKENS: usize = 8;

/// Rows per tile for a tile of `t` tokens: at most 16 pairs, at most 4 rows.
const fn tile_rows(t: usize) -> usize {
    let r = 16 / t;
    if r > 4 {
        4
    } else {
        r
    }
}

/// `pshufb` patterns giving, as i16 in every lane, byte `2c` of a broadcast u64 in the low
/// 256 bits and byte `2c + 1` in the high 256 bits: sub-block scales for quarter `c`.
pub(super) const K4_SCALE512: [[u8; 64]; 4] = {
    let mut t = [[0x80u8; 64]; 4];
    let mut c = 0;
    while c < 4 {
        let mut i = 0;
        while i < 64 {
            if i % 2 == 0 {
                t[c][i] = if i < 32 { 2 * c as u8 } else { 2 * c as u8 + 1 };
            }
            i += 1;
        }
        c += 1;
    }
    t
};

/// 64 bytes at `at`.
#[inline]
#[target_feature(enable = "avx512f")]
fn ld512(bytes: &[u8], at: usize) -> __m512i {
    let chunk = &bytes[at..at + 64];
    // SAFETY: `chunk` is 64 readable bytes and `loadu` has no alignment requirement.
    unsafe { _mm512_loadu_si512(chunk.as_ptr().cast()) }
}

/// `acc` + the sums of adjacent i16 products of `a` and `b`, in one `vpdpwssd`. The
/// intrinsic is split by LLVM's generic tuning into `vpmaddwd` + `vpaddd` (two instructions on
/// the one port that multiplies 512-bit vectors), which the tile kernels are bound by.
#[inline]
#[target_feature(enable = "avx512f,avx512vnni")]
fn dpwssd512(acc: __m512i, a: __m512i, b: __m512i) -> __m512i {
    let mut r = acc;
    // SAFETY: `vpdpwssd` only reads and writes the three vector registers named; the enclosing
    // function's target features (AVX-512 F and VNNI) make the instruction available.
    unsafe {
        std::arch::asm!(
            "vpdpwssd {r}, {a}, {b}",
            r = inout(zmm_reg) r,
            a = in(zmm_reg) a,
            b = in(zmm_reg) b,
            options(pure, nomem, nostack, preserves_flags),
        );
    }
    r
}

/// Sixteen i32 from an array.
#[inline]
#[target_feature(enable = "avx512f")]
fn idx512(v: &[i32; 16]) -> __m512i {
    // SAFETY: `v` is 64 readable bytes.
    unsafe { _mm512_loadu_si512(v.as_ptr().cast()) }
}

/// Four 128-bit values as one 512-bit vector (element k in bits 128k..128k+128).
#[inline]
#[target_feature(enable = "avx512f")]
fn join4(v: [__m128i; 4]) -> __m512i {
    let lo = _mm256_set_m128i(v[1], v[0]);
    let hi = _mm256_set_m128i(v[3], v[2]);
    _mm512_inserti64x4::<1>(_mm512_castsi256_si512(lo), hi)
}

/// Lane p = the sum of the 16 lanes of `v[p]` (wrapping, i.e. exact for the sums here).
#[inline]
#[target_feature(enable = "avx512f")]
fn reduce16(v: &[__m512i; 16]) -> __m512i {
    // Per 128-bit lane: [a0+a2, b0+b2, a1+a3, b1+b3] for each pair (a, b).
    let mut s = [_mm512_setzero_si512(); 8];
    for (k, o) in s.iter_mut().enumerate() {
        let (a, b) = (v[2 * k], v[2 * k + 1]);
        *o = _mm512_add_epi32(_mm512_unpacklo_epi32(a, b), _mm512_unpackhi_epi32(a, b));
    }
    // Per 128-bit lane l: the lane-l sums of pairs 4k..4k+4.
    let mut u = [_mm512_setzero_si512(); 4];
    for (k, o) in u.iter_mut().enumerate() {
        let (a, b) = (s[2 * k], s[2 * k + 1]);
        *o = _mm512_add_epi32(_mm512_unpacklo_epi64(a, b), _mm512_unpackhi_epi64(a, b));
    }
    // Sum the four 128-bit lanes: lanes (0+1, 2+3) of two vectors, then the two halves.
    let fold = |a: __m512i, b: __m512i| {
        _mm512_add_epi32(
            _mm512_shuffle_i32x4::<0x88>(a, b),
            _mm512_shuffle_i32x4::<0xDD>(a, b),
        )
    };
    let w0 = fold(u[0], u[1]);
    let w1 = fold(u[2], u[3]);
    fold(w0, w1)
}

/// Index vectors of a tile (lane p = pair (p / T, p % T); lanes past `R·T` repeat pair 0).
struct TileIdx {
    /// Lane of row r's `d` (2r) and `dmin` (2r + 1) in the converted f16 pairs.
    d: __m512i,
    dmin: __m512i,
    /// Token t's activation scale.
    x: __m512i,
    /// Quarter c's mins (i16 pair c of row r: lane 4r + c) and bsum pairs (token t: 4t + c).
    mins: [__m512i; 4],
    bsums: [__m512i; 4],
}

#[inline]
#[target_feature(enable = "avx512f")]
fn tile_idx<const R: usize, const T: usize>() -> TileIdx {
    let mut d = [0i32; 16];
    let mut dmin = [0i32; 16];
    let mut x = [0i32; 16];
    let mut mins = [[0i32; 16]; 4];
    let mut bsums = [[0i32; 16]; 4];
    for p in 0..16 {
        let (r, t) = if p < R * T { (p / T, p % T) } else { (0, 0) };
        d[p] = 2 * r as i32;
        dmin[p] = 2 * r as i32 + 1;
        x[p] = t as i32;
        for c in 0..4 {
            mins[c][p] = (4 * r + c) as i32;
            bsums[c][p] = (4 * t + c) as i32;
        }
    }
    TileIdx {
        d: idx512(&d),
        dmin: idx512(&dmin),
        x: idx512(&x),
        mins: [
            idx512(&mins[0]),
            idx512(&mins[1]),
            idx512(&mins[2]),
            idx512(&mins[3]),
        ],
        bsums: [
            idx512(&bsums[0]),
            idx512(&bsums[1]),
            idx512(&bsums[2]),
            idx512(&bsums[3]),
        ],
    }
}

/// `R` Q4_K rows × `T` Q8_K tokens in CPU_REPACK's GEMV order (`GEMM = false`, as
/// `avx2::q4_k_repack_tile`) or GEMM order (as `avx2::q4_k_repack_gemm_tile`): lane
/// `r * T + t` of the result is row r · token t, bit for bit.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
fn q4_k_repack_pairs<const R: usize, const T: usize, const GEMM: bool>(
    w: [&[u8]; R],
    x: [&[u8]; T],
    idx: &TileIdx,
) -> [f32; 16] {
    let m4 = _mm512_set1_epi8(0x0F);
    let mut acc = _mm512_setzero_ps();
    let mut acc_m = _mm512_setzero_ps();
    let n_blocks = x[0].len() / Q8_K_BYTES;
    for i in 0..n_blocks {
        let wo = i * 144;
        let xo = i * Q8_K_BYTES;
        // Per row: d and dmin (f16 pairs converted together, as `f16_pair` does), scales
        // and mins.
        let mut dpairs = [0u32; 4];
        let mut sc = [0u64; R];
        let mut mins = [_mm_setzero_si128(); 4];
        for r in 0..R {
            prefetch_span(w[r], wo, wo + 144);
            dpairs[r] = u32_at(w[r], wo);
            let (s, m) = k4_scales_mins(&w[r][wo + 4..wo + 16]);
            sc[r] = s;
            mins[r] = _mm_cvtepu8_epi16(_mm_cvtsi64_si128(m as i64));
        }
        // SAFETY: `dpairs` is 16 readable bytes.
        let dv = _mm256_cvtph_ps(unsafe { _mm_loadu_si128(dpairs.as_ptr().cast()) });
        let dz = _mm512_castps256_ps512(dv);
        // Per token: the activation scale and the bsums added in pairs (`k4_min_prod`).
        let mut xd = [0.0f32; 16];
        let mut bs = [_mm_setzero_si128(); 8];
        for t in 0..T {
            xd[t] = f32_at(x[t], xo);
            bs[t] = _mm_hadd_epi16(
                ld128(x[t], xo + Q8_K_BSUMS),
                ld128(x[t], xo + Q8_K_BSUMS + 16),
            );
        }
        // SAFETY: `xd` is 16 readable f32.
        let xz = unsafe { _mm512_loadu_ps(xd.as_ptr()) };
        let xp = _mm512_permutexvar_ps(idx.x, xz);
        let scale = _mm512_mul_ps(_mm512_permutexvar_ps(idx.d, dz), xp);
        let scale_m = _mm512_mul_ps(_mm512_permutexvar_ps(idx.dmin, dz), xp);
        let mins_z = join4(mins);
        let (bs_lo, bs_hi) = (
            join4([bs[0], bs[1], bs[2], bs[3]]),
            join4([bs[4], bs[5], bs[6], bs[7]]),
        );
        // Mins term of each quarter: i16 pair c of the mins · bsum pair c, per lane.
        let mut mq = [_mm512_setzero_si512(); 4];
        for (c, q) in mq.iter_mut().enumerate() {
            let a = _mm512_permutexvar_epi32(idx.mins[c], mins_z);
            let b = _mm512_permutex2var_epi32(bs_lo, idx.bsums[c], bs_hi);
            *q = _mm512_dpwssd_epi32(_mm512_setzero_si512(), a, b);
        }

        let mut sums = [_mm512_setzero_si512(); 16];
        let mut quarter = [_mm512_setzero_si512(); 4];
        for c in 0..4 {
            let mut wq = [_mm512_setzero_si512(); R];
            let mut sv = [_mm512_setzero_si512(); R];
            for r in 0..R {
                // Low nibbles (sub-block 2c) in the low 256 bits, high (2c + 1) in the high.
                let q = _mm512_broadcast_i64x4(ld(w[r], wo + 16 + 32 * c));
                let q = _mm512_mask_srli_epi16::<4>(q, 0xFFFF_0000, q);
                wq[r] = _mm512_and_si512(q, m4);
                sv[r] =
                    _mm512_shuffle_epi8(_mm512_set1_epi64(sc[r] as i64), ld512(&K4_SCALE512[c], 0));
            }
            for t in 0..T {
                let xq = ld512(x[t], xo + Q8_K_QS + 64 * c);
                for r in 0..R {
                    let p = _mm512_maddubs_epi16(wq[r], xq);
                    sums[r * T + t] = dpwssd512(sums[r * T + t], p, sv[r]);
                }
            }
            if GEMM {
                quarter[c] = reduce16(&sums);
                sums = [_mm512_setzero_si512(); 16];
            }
        }
        if GEMM {
            for c in 0..4 {
                acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(quarter[c]), scale, acc);
                acc_m = _mm512_fmadd_ps(_mm512_cvtepi32_ps(mq[c]), scale_m, acc_m);
            }
        } else {
            let total = reduce16(&sums);
            let m = _mm512_add_epi32(
                _mm512_add_epi32(mq[0], mq[1]),
                _mm512_add_epi32(mq[2], mq[3]),
            );
            acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(total), scale, acc);
            acc_m = _mm512_fmadd_ps(_mm512_cvtepi32_ps(m), scale_m, acc_m);
        }
    }
    let mut out = [0.0f32; 16];
    // SAFETY: `out` is 16 writable f32.
    unsafe { _mm512_storeu_ps(out.as_mut_ptr(), _mm512_sub_ps(acc, acc_m)) };
    out
}

/// Every row of `w` × `T` tokens (`xs`), `R` rows at a time (the last tile repeats the last
/// row and drops its values): `out[r * stride + t]`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
fn q4_k_repack_token_tile<const R: usize, const T: usize, const GEMM: bool>(
    w: &[u8],
    w_row: usize,
    xs: &[u8],
    out: &mut [f32],
    stride: usize,
) {
    let x: [&[u8]; T] = split(xs, xs.len() / T);
    let idx = tile_idx::<R, T>();
    let n_rows = w.len() / w_row;
    let mut r0 = 0;
    while r0 < n_rows {
        let mut rows: [&[u8]; R] = [&[]; R];
        for (k, row) in rows.iter_mut().enumerate() {
            let r = (r0 + k).min(n_rows - 1);
            *row = &w[r * w_row..(r + 1) * w_row];
        }
        let v = q4_k_repack_pairs::<R, T, GEMM>(rows, x, &idx);
        for k in 0..R.min(n_rows - r0) {
            let o = (r0 + k) * stride;
            out[o..o + T].copy_from_slice(&v[k * T..(k + 1) * T]);
        }
        r0 += R;
    }
}

macro_rules! repack_tiles {
    ($(#[$doc:meta])* $name:ident, $gemm:expr) => {
        $(#[$doc])*
        ///
        /// `w` is whole rows of `n` elements, `xs` whole Q8_K rows of `n`, and `out` holds
        /// every `r * stride + t`; checked by `dispatch`.
        #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
        fn $name(n: usize, w: &[u8], xs: &[u8], out: &mut [f32], stride: usize) {
            let w_row = n / 256 * 144;
            let x_row = n / 256 * Q8_K_BYTES;
            if w_row == 0 || xs.is_empty() {
                return;
            }
            let n_tokens = xs.len() / x_row;
            let mut t0 = 0;
            while t0 < n_tokens {
                let tt = (n_tokens - t0).min(TILE_TOKENS);
                let xt = &xs[t0 * x_row..(t0 + tt) * x_row];
                let o = &mut out[t0..];
                match tt {
                    8 => q4_k_repack_token_tile::<{ tile_rows(8) }, 8, $gemm>(w, w_row, xt, o, stride),
                    7 => q4_k_repack_token_tile::<{ tile_rows(7) }, 7, $gemm>(w, w_row, xt, o, stride),
                    6 => q4_k_repack_token_tile::<{ tile_rows(6) }, 6, $gemm>(w, w_row, xt, o, stride),
                    5 => q4_k_repack_token_tile::<{ tile_rows(5) }, 5, $gemm>(w, w_row, xt, o, stride),
                    4 => q4_k_repack_token_tile::<{ tile_rows(4) }, 4, $gemm>(w, w_row, xt, o, stride),
                    3 => q4_k_repack_token_tile::<{ tile_rows(3) }, 3, $gemm>(w, w_row, xt, o, stride),
                    2 => q4_k_repack_token_tile::<{ tile_rows(2) }, 2, $gemm>(w, w_row, xt, o, stride),
                    _ => q4_k_repack_token_tile::<{ tile_rows(1) }, 1, $gemm>(w, w_row, xt, o, stride),
                }
                t0 += tt;
            }
        }
    };
}

repack_tiles!(
    /// Q4_K rows × Q8_K tokens in CPU_REPACK's GEMV order (each value as
    /// `avx2::dot_q4_k_repack` gives it): `out[r * stride + t]`.
    tiles_q4_k_repack,
    false
);
repack_tiles!(
    /// Q4_K rows × Q8_K tokens in CPU_REPACK's GEMM order (each value as
    /// `avx2::dot_q4_k_repack_gemm` gives it): `out[r * stride + t]`.
    tiles_q4_k_repack_gemm,
    true
);

// ---------------------------------------------------------------------------------------------
// Q4_K in CPU_REPACK's orders with tokens in the lanes.
//
// ggml's repacked kernels interleave 8 weight rows once at load time so that vector lanes are
// rows. The weights here stay as the file has them, so the lanes are tokens instead: the
// tokens' quants are rearranged once per call (cheap: they are shared by every row), and
// each weight row's quants, unpacked to bytes, are broadcast four at a time into `vpdpbusd`.
// `vpdpbusd` multiplies unsigned by signed bytes, so the activations enter as x + 128 and a
// 16th lane of ones yields each sub-block's sum of weights to take 128 of them back off. Every
// integer is exact and each lane runs the one-pair kernel's float steps, so every result
// keeps the bits of `avx2::dot_q4_k_repack` (GEMV) or `avx2::dot_q4_k_repack_gemm` (GEMM).

/// Tokens in the lanes of one tile (the 16th lane holds ones).
const LANE_TOKENS: usize = 15;

/// 16 lanes, 64-byte aligned so that each load is one cache line.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
pub(super) struct Lanes<T: Copy>(pub(super) [T; 16]);

/// Up to [`LANE_TOKENS`] Q8_K rows rearranged for [`q4_k_lanes_rows`], per super-block:
/// 64 vectors of four quants (+ 128) per token, the scales, and the bsums added in pairs.
/// (Or, raw, up to 16 tokens with their quants as they are: the tile unit's
/// layout of the right-hand tile, `amx`.)
pub(super) struct TokenLanes {
    /// Super-block `i`, quants `4g..4g + 4`: `quants[64 * i + g]`, lane t (lane 15: ones).
    pub(super) quants: Vec<Lanes<u32>>,
    /// Super-block `i`: each token's `d`.
    pub(super) scales: Vec<Lanes<f32>>,
    /// Super-block `i`, quarter `c`: `bsums[4 * i + c]`, lane t = the i16 pair
    /// (`b[4c] + b[4c + 1]`, `b[4c + 2] + b[4c + 3]`) of token t (as `k4_min_prod` adds them).
    pub(super) bsums: Vec<Lanes<u32>>,
    /// Super-block `i`, pair `q`: `bsums16[8 * i + q]`, lane t = the i16 pair
    /// (`b[2q]`, `b[2q + 1]`) of token t (the sums of 16-element sub-blocks, for Q6_K).
    bsums16: Vec<Lanes<u32>>,
}

impl TokenLanes {
    /// Up to [`LANE_TOKENS`] tokens as quants + 128 with lane 15 ones, or (`raw`) up to 16
    /// tokens with their quants as they are; absent tokens are zero.
    #[target_feature(enable = "avx512f")]
    fn build(xs: &[u8], x_row: usize, raw: bool) -> TokenLanes {
        let n_tokens = xs.len() / x_row;
        let n_blocks = x_row / Q8_K_BYTES;
        let mut quants = Vec::with_capacity(64 * n_blocks);
        let mut scales = vec![Lanes([0.0f32; 16]); n_blocks];
        let mut bsums = vec![Lanes([0u32; 16]); 4 * n_blocks];
        let mut bsums16 = vec![Lanes([0u32; 16]); 8 * n_blocks];
        let flip = _mm512_set1_epi32(if raw { 0 } else { 0x8080_8080u32 as i32 });
        for i in 0..n_blocks {
            // 64 quants of each token (+ 128; absent tokens 0, lane 15 ones), transposed.
            for c in 0..4 {
                let mut rows = [_mm512_setzero_si512(); 16];
                for (t, r) in rows.iter_mut().enumerate().take(n_tokens) {
                    let at = t * x_row + i * Q8_K_BYTES + Q8_K_QS + 64 * c;
                    *r = _mm512_xor_si512(ld512(xs, at), flip);
                }
                if !raw {
                    rows[15] = _mm512_set1_epi32(0x0101_0101);
                }
                for v in transpose16(&rows) {
                    let mut l = Lanes([0u32; 16]);
                    // SAFETY: `l` is 64 writable, aligned bytes.
                    unsafe { _mm512_store_si512(l.0.as_mut_ptr().cast(), v) };
                    quants.push(l);
                }
            }
        }
        for t in 0..n_tokens {
            let row = &xs[t * x_row..(t + 1) * x_row];
            for (i, b) in row.chunks_exact(Q8_K_BYTES).enumerate() {
                scales[i].0[t] = f32_at(b, 0);
                let bs = |k: usize| {
                    let at = Q8_K_BSUMS + 2 * k;
                    i16::from_le_bytes([b[at], b[at + 1]])
                };
                for c in 0..4 {
                    let lo = bs(4 * c).wrapping_add(bs(4 * c + 1)) as u16;
                    let hi = bs(4 * c + 2).wrapping_add(bs(4 * c + 3)) as u16;
                    bsums[4 * i + c].0[t] = u32::from(lo) | (u32::from(hi) << 16);
                }
                for q in 0..8 {
                    let (lo, hi) = (bs(2 * q) as u16, bs(2 * q + 1) as u16);
                    bsums16[8 * i + q].0[t] = u32::from(lo) | (u32::from(hi) << 16);
                }
            }
        }
        TokenLanes {
            quants,
            scales,
            bsums,
            bsums16,
        }
    }
}

/// The 16 × 16 transpose of 32-bit elements: element c of result r is element r of `v[c]`.
#[inline]
#[target_feature(enable = "avx512f")]
fn transpose16(v: &[__m512i; 16]) -> [__m512i; 16] {
    // Within 128-bit lanes: a[2i], a[2i + 1] interleave rows 2i and 2i + 1; then b[4i + j]'s
    // lane L holds column 4L + j of rows 4i..4i + 4.
    let mut a = [_mm512_setzero_si512(); 16];
    for i in 0..8 {
        a[2 * i] = _mm512_unpacklo_epi32(v[2 * i], v[2 * i + 1]);
        a[2 * i + 1] = _mm512_unpackhi_epi32(v[2 * i], v[2 * i + 1]);
    }
    let mut b = [_mm512_setzero_si512(); 16];
    for i in 0..4 {
        b[4 * i] = _mm512_unpacklo_epi64(a[4 * i], a[4 * i + 2]);
        b[4 * i + 1] = _mm512_unpackhi_epi64(a[4 * i], a[4 * i + 2]);
        b[4 * i + 2] = _mm512_unpacklo_epi64(a[4 * i + 1], a[4 * i + 3]);
        b[4 * i + 3] = _mm512_unpackhi_epi64(a[4 * i + 1], a[4 * i + 3]);
    }
    // Then a 4 × 4 transpose of 128-bit lanes among b[j], b[4 + j], b[8 + j], b[12 + j].
    let mut out = [_mm512_setzero_si512(); 16];
    for j in 0..4 {
        let c0 = _mm512_shuffle_i32x4::<0x44>(b[j], b[4 + j]);
        let c1 = _mm512_shuffle_i32x4::<0xEE>(b[j], b[4 + j]);
        let c2 = _mm512_shuffle_i32x4::<0x44>(b[8 + j], b[12 + j]);
        let c3 = _mm512_shuffle_i32x4::<0xEE>(b[8 + j], b[12 + j]);
        out[j] = _mm512_shuffle_i32x4::<0x88>(c0, c2);
        out[4 + j] = _mm512_shuffle_i32x4::<0xDD>(c0, c2);
        out[8 + j] = _mm512_shuffle_i32x4::<0x88>(c1, c3);
        out[12 + j] = _mm512_shuffle_i32x4::<0xDD>(c1, c3);
    }
    out
}

#[inline]
#[target_feature(enable = "avx512f")]
pub(super) fn ld_lanes_i(v: &Lanes<u32>) -> __m512i {
    // SAFETY: `v` is 64 readable, aligned bytes.
    unsafe { _mm512_load_si512(v.0.as_ptr().cast()) }
}

#[inline]
#[target_feature(enable = "avx512f")]
pub(super) fn ld_lanes_f(v: &Lanes<f32>) -> __m512 {
    // SAFETY: `v` is 64 readable, aligned bytes.
    unsafe { _mm512_load_ps(v.0.as_ptr()) }
}

/// Per row, Σ over the groups of four quants `g0..g0 + xq.len()` of (the tokens' quants + 128)
/// · (the row's quants, `wq`, broadcast): one `vpdpbusd` per row and group.
#[inline]
#[target_feature(enable = "avx512f,avx512vnni")]
fn group_dots<const R: usize>(
    xq: &[Lanes<u32>],
    wq: &[[Lanes<u32>; 4]; R],
    g0: usize,
) -> [__m512i; R] {
    let mut dsum = [_mm512_setzero_si512(); R];
    for (k, x) in xq.iter().enumerate() {
        let g = g0 + k;
        let xv = ld_lanes_i(x);
        for r in 0..R {
            let wv = _mm512_set1_epi32(wq[r][g / 16].0[g % 16] as i32);
            dsum[r] = _mm512_dpbusd_epi32(dsum[r], xv, wv);
        }
    }
    dsum
}

/// `S - 128 · S[15]` in every lane: a lane's Σ w·(x + 128) less 128 Σ w (lane 15's sum).
#[inline]
#[target_feature(enable = "avx512f")]
fn less_offset(s: __m512i) -> __m512i {
    let ones = _mm512_permutexvar_epi32(_mm512_set1_epi32(15), s);
    _mm512_sub_epi32(s, _mm512_slli_epi32::<7>(ones))
}

/// `R` Q4_K rows × the tokens of `x`: lane t of result r is row r · token t in CPU_REPACK's
/// GEMV order (`GEMM = false`) or GEMM order.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
fn q4_k_lanes_rows<const R: usize, const GEMM: bool>(
    w: [&[u8]; R],
    x: &TokenLanes,
    wq: &mut [[Lanes<u32>; 4]; R],
) -> [__m512; R] {
    let m4 = _mm256_set1_epi8(0x0F);
    let mut acc = [_mm512_setzero_ps(); R];
    let mut acc_m = [_mm512_setzero_ps(); R];
    for (i, xs) in x.scales.iter().enumerate() {
        let wo = i * 144;
        let mut d = [0.0f32; R];
        let mut dmin = [0.0f32; R];
        let mut sc = [0u64; R];
        let mut mn = [0u64; R];
        for r in 0..R {
            prefetch_span(w[r], wo, wo + 144);
            (d[r], dmin[r]) = f16_pair(w[r], wo);
            (sc[r], mn[r]) = k4_scales_mins(&w[r][wo + 4..wo + 16]);
            // The row's 256 quants as bytes, in element order.
            for (c, dst) in wq[r].iter_mut().enumerate() {
                let q = ld(w[r], wo + 16 + 32 * c);
                let lo = _mm256_and_si256(q, m4);
                let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(q), m4);
                let dst = &mut dst.0;
                // SAFETY: `dst` is 64 writable bytes (two 32-byte halves).
                unsafe {
                    _mm256_storeu_si256(dst.as_mut_ptr().cast(), lo);
                    _mm256_storeu_si256(dst.as_mut_ptr().add(8).cast(), hi);
                }
            }
        }
        let xq = &x.quants[64 * i..64 * (i + 1)];
        // Per row: Σ_j scale_j · Σ w·(x + 128) over sub-block j, by quarter for GEMM.
        let mut s = [[_mm512_setzero_si512(); 4]; R];
        for j in 0..8 {
            let dsum = group_dots(&xq[8 * j..8 * (j + 1)], wq, 8 * j);
            for r in 0..R {
                let scale = _mm512_set1_epi32(((sc[r] >> (8 * j)) & 0xFF) as i32);
                let q = if GEMM { j / 2 } else { 0 };
                s[r][q] = _mm512_add_epi32(s[r][q], _mm512_mullo_epi32(dsum[r], scale));
            }
        }
        let xd = ld_lanes_f(xs);
        let bsums = &x.bsums[4 * i..4 * (i + 1)];
        for r in 0..R {
            let scale = _mm512_mul_ps(_mm512_set1_ps(d[r]), xd);
            let scale_m = _mm512_mul_ps(_mm512_set1_ps(dmin[r]), xd);
            let mut mq = [_mm512_setzero_si512(); 4];
            for (c, m) in mq.iter_mut().enumerate() {
                let pair = ((mn[r] >> (16 * c)) & 0xFF) | (((mn[r] >> (16 * c + 8)) & 0xFF) << 16);
                let pair = _mm512_set1_epi32(pair as i32);
                *m = _mm512_dpwssd_epi32(_mm512_setzero_si512(), ld_lanes_i(&bsums[c]), pair);
            }
            if GEMM {
                for c in 0..4 {
                    let q = _mm512_cvtepi32_ps(less_offset(s[r][c]));
                    acc[r] = _mm512_fmadd_ps(q, scale, acc[r]);
                    acc_m[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(mq[c]), scale_m, acc_m[r]);
                }
            } else {
                let total = _mm512_cvtepi32_ps(less_offset(s[r][0]));
                let m = _mm512_add_epi32(
                    _mm512_add_epi32(mq[0], mq[1]),
                    _mm512_add_epi32(mq[2], mq[3]),
                );
                acc[r] = _mm512_fmadd_ps(total, scale, acc[r]);
                acc_m[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(m), scale_m, acc_m[r]);
            }
        }
    }
    let mut out = [_mm512_setzero_ps(); R];
    for r in 0..R {
        out[r] = _mm512_sub_ps(acc[r], acc_m[r]);
    }
    out
}

/// Rows per call of [`q4_k_lanes_rows`].
/// Rows per call of [`q4_k_lanes_rows`]: the tokens' quants, loaded once, serve 16 rows.
const LANE_ROWS: usize = 16;

/// `R` Q6_K rows × the tokens of `x`: lane t of result r is row r · token t in the order of
/// ggml's tiled matmul (as `avx2::dot_q6_k_tiled`: per super-block `r = d · s1` rounded,
/// then one FMA with the token's scale). The quants enter as q + 32 (unsigned, 0..=63): the
/// 32 Σ x taken back off comes from the token's bsums, one per 16-element sub-block.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
fn q6_k_lanes_rows<const R: usize>(
    w: [&[u8]; R],
    x: &TokenLanes,
    wq: &mut [[Lanes<u32>; 4]; R],
) -> [__m512; R] {
    let mut acc = [_mm512_setzero_ps(); R];
    for (i, xs) in x.scales.iter().enumerate() {
        let wo = i * 210;
        let mut d = [0.0f32; R];
        let mut sc = [[0i8; 16]; R];
        for r in 0..R {
            prefetch_span(w[r], wo, wo + 210);
            d[r] = f16_at(w[r], wo + 208);
            for (k, s) in sc[r].iter_mut().enumerate() {
                *s = w[r][wo + 192 + k] as i8;
            }
            // The row's 256 quants + 32 as bytes, in element order.
            for half in 0..2 {
                let u = q6k_quants(
                    ld(w[r], wo + 64 * half),
                    ld(w[r], wo + 64 * half + 32),
                    ld(w[r], wo + 128 + 32 * half),
                );
                for (g, v) in u.into_iter().enumerate() {
                    let dst = &mut wq[r][2 * half + g / 2].0[8 * (g % 2)..];
                    // SAFETY: `dst` is at least 32 writable bytes.
                    unsafe { _mm256_storeu_si256(dst.as_mut_ptr().cast(), v) };
                }
            }
        }
        let xq = &x.quants[64 * i..64 * (i + 1)];
        let mut s = [_mm512_setzero_si512(); R];
        // (`j` indexes the sub-blocks of every row's scales and of the tokens' quants.)
        #[allow(clippy::needless_range_loop)]
        for j in 0..16 {
            let dsum = group_dots(&xq[4 * j..4 * (j + 1)], wq, 4 * j);
            for r in 0..R {
                let scale = _mm512_set1_epi32(i32::from(sc[r][j]));
                s[r] = _mm512_add_epi32(s[r], _mm512_mullo_epi32(dsum[r], scale));
            }
        }
        let xd = ld_lanes_f(xs);
        let bsums = &x.bsums16[8 * i..8 * (i + 1)];
        for r in 0..R {
            let mut offset = _mm512_setzero_si512();
            for (q, b) in bsums.iter().enumerate() {
                let pair = u32::from(sc[r][2 * q] as i16 as u16)
                    | (u32::from(sc[r][2 * q + 1] as i16 as u16) << 16);
                offset = _mm512_dpwssd_epi32(offset, ld_lanes_i(b), _mm512_set1_epi32(pair as i32));
            }
            let s1 = _mm512_sub_epi32(less_offset(s[r]), _mm512_slli_epi32::<5>(offset));
            let v = _mm512_mul_ps(_mm512_set1_ps(d[r]), _mm512_cvtepi32_ps(s1));
            acc[r] = _mm512_fmadd_ps(v, xd, acc[r]);
        }
    }
    acc
}

/// Token counts from which a group of tokens goes through the lanes kernel rather than the
/// tiles kernel: the lanes kernel costs the same for 1 to 15 tokens (measured on the
/// tilebench of `cargo bench -p shared`: equal at about 8 tokens).
const LANES_MIN_TOKENS: usize = 8;

/// The lanes kernels: Q4_K in the GEMV and GEMM orders of CPU_REPACK, Q6_K in the tiled
/// matmul's.
const LANES_Q4_K_GEMV: u8 = 0;
const LANES_Q4_K_GEMM: u8 = 1;
const LANES_Q6_K_TILED: u8 = 2;

/// Every row of `w` × the tokens of `lanes` (at most [`LANE_TOKENS`]), [`LANE_ROWS`] rows at
/// a time (the last call repeats the last row and drops its values): `out[r * stride + t]`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
fn lanes_rows<const TY: u8>(
    w: &[u8],
    w_row: usize,
    lanes: &TokenLanes,
    n_tokens: usize,
    out: &mut [f32],
    stride: usize,
) {
    let n_rows = w.len() / w_row;
    // Each row's quants as bytes, rewritten for every super-block.
    let mut wq = [[Lanes([0u32; 16]); 4]; LANE_ROWS];
    let mut r0 = 0;
    while r0 < n_rows {
        let mut rows: [&[u8]; LANE_ROWS] = [&[]; LANE_ROWS];
        for (k, row) in rows.iter_mut().enumerate() {
            let r = (r0 + k).min(n_rows - 1);
            *row = &w[r * w_row..(r + 1) * w_row];
        }
        let v = match TY {
            LANES_Q4_K_GEMV => q4_k_lanes_rows::<LANE_ROWS, false>(rows, lanes, &mut wq),
            LANES_Q4_K_GEMM => q4_k_lanes_rows::<LANE_ROWS, true>(rows, lanes, &mut wq),
            _ => q6_k_lanes_rows::<LANE_ROWS>(rows, lanes, &mut wq),
        };
        for (k, &v) in v.iter().enumerate().take(n_rows - r0) {
            store_tokens(v, &mut out[(r0 + k) * stride..], n_tokens);
        }
        r0 += LANE_ROWS;
    }
}

/// A batch of Q8_K token rows cut for the lanes kernels: groups of up to [`LANE_TOKENS`]
/// tokens rearranged ([`TokenLanes`]) while at least [`LANES_MIN_TOKENS`] remain, then the
/// remaining tokens (from `rest`), which the other kernels take as they are. Made once per
/// matrix product and shared by its parallel tasks.
pub(crate) struct LaneGroups {
    /// `(first token, tokens, their lanes)`.
    pub(super) groups: Vec<(usize, usize, TokenLanes)>,
    /// The first token left to the other kernels.
    pub(super) rest: usize,
}

/// The [`LaneGroups`] of the Q8_K rows `xs` (of `n` elements each).
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
pub(crate) fn lane_groups(n: usize, xs: &[u8]) -> LaneGroups {
    groups_of(n, xs, LANE_TOKENS, LANES_MIN_TOKENS, false)
}

/// The Q8_K rows `xs` (of `n` elements each) in groups of 16 raw tokens (`TokenLanes::raw`)
/// while at least `min_tokens` remain: the tile unit's right-hand tiles.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
pub(crate) fn raw_groups(n: usize, xs: &[u8], min_tokens: usize) -> LaneGroups {
    groups_of(n, xs, 16, min_tokens, true)
}

#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
fn groups_of(n: usize, xs: &[u8], width: usize, min_tokens: usize, raw: bool) -> LaneGroups {
    let x_row = n / 256 * Q8_K_BYTES;
    let n_tokens = xs.len().checked_div(x_row).unwrap_or(0);
    let mut groups = Vec::new();
    let mut t0 = 0;
    while n_tokens - t0 >= min_tokens.max(1) {
        let tt = (n_tokens - t0).min(width);
        let lanes = TokenLanes::build(&xs[t0 * x_row..(t0 + tt) * x_row], x_row, raw);
        groups.push((t0, tt, lanes));
        t0 += tt;
    }
    LaneGroups { groups, rest: t0 }
}

/// Lanes `0..n` of `v` into `out[..n]`.
#[inline]
#[target_feature(enable = "avx512f")]
pub(super) fn store_tokens(v: __m512, out: &mut [f32], n: usize) {
    let mut vals = [0.0f32; 16];
    // SAFETY: `vals` is 16 writable f32.
    unsafe { _mm512_storeu_ps(vals.as_mut_ptr(), v) };
    out[..n].copy_from_slice(&vals[..n]);
}

/// Q4_K rows × a few Q8_K tokens in CPU_REPACK's GEMM order (`gemm`) or GEMV order, with each
/// row unpacked once for the tokens: `out[r * stride + t]`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
pub(super) fn repack_few_tokens(
    n: usize,
    w: &[u8],
    xs: &[u8],
    out: &mut [f32],
    stride: usize,
    gemm: bool,
) {
    if gemm {
        tiles_q4_k_repack_gemm(n, w, xs, out, stride);
    } else {
        tiles_q4_k_repack(n, w, xs, out, stride);
    }
}

/// Every row of `w` × the tokens of `xs` with lanes kernel `TY`: `groups` (of `xs`) through
/// it, the remaining tokens through the kernel of the same order for a few tokens.
///
/// `w` is whole rows of `n` elements, `xs` whole Q8_K rows of `n`, and `out` holds every
/// `r * stride + t`; checked by `dispatch`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
fn lanes_then_rest<const TY: u8>(
    n: usize,
    w: &[u8],
    xs: &[u8],
    groups: &LaneGroups,
    out: &mut [f32],
    stride: usize,
) {
    let block_bytes = if TY == LANES_Q6_K_TILED { 210 } else { 144 };
    let w_row = n / 256 * block_bytes;
    let x_row = n / 256 * Q8_K_BYTES;
    if w_row == 0 || xs.is_empty() {
        return;
    }
    let n_tokens = xs.len() / x_row;
    for (t0, tt, lanes) in &groups.groups {
        lanes_rows::<TY>(w, w_row, lanes, *tt, &mut out[*t0..], stride);
    }
    let t0 = groups.rest;
    if t0 == n_tokens {
        return;
    }
    let rest = &xs[t0 * x_row..];
    match TY {
        LANES_Q4_K_GEMV | LANES_Q4_K_GEMM => {
            repack_few_tokens(n, w, rest, &mut out[t0..], stride, TY == LANES_Q4_K_GEMM)
        }
        _ => {
            for (r, row) in w.chunks_exact(w_row).enumerate() {
                let o = r * stride + t0;
                super::avx2::dot_q6_k_tiled(n, row, rest, &mut out[o..o + (n_tokens - t0)]);
            }
        }
    }
}

/// Q4_K rows × Q8_K tokens in CPU_REPACK's GEMV order (`gemm = false`, each value as
/// `avx2::dot_q4_k_repack` gives it) or GEMM order (as `avx2::dot_q4_k_repack_gemm`):
/// `out[r * stride + t]`, as [`lanes_then_rest`] computes it.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
pub(crate) fn repack_q4_k(
    n: usize,
    w: &[u8],
    xs: &[u8],
    groups: &LaneGroups,
    out: &mut [f32],
    stride: usize,
    gemm: bool,
) {
    if gemm {
        lanes_then_rest::<LANES_Q4_K_GEMM>(n, w, xs, groups, out, stride);
    } else {
        lanes_then_rest::<LANES_Q4_K_GEMV>(n, w, xs, groups, out, stride);
    }
}

/// Q6_K rows × Q8_K tokens in the order of ggml's tiled matmul (each value as
/// `avx2::dot_q6_k_tiled` gives it): `out[r * stride + t]`, as [`lanes_then_rest`]
/// computes it.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
pub(crate) fn tiled_q6_k(
    n: usize,
    w: &[u8],
    xs: &[u8],
    groups: &LaneGroups,
    out: &mut [f32],
    stride: usize,
) {
    lanes_then_rest::<LANES_Q6_K_TILED>(n, w, xs, groups, out, stride);
}

// ---------------------------------------------------------------------------------------------
// Q8_0 rows × Q8_0 tokens, two tokens to a vector.
//
// ggml's order for a Q8_0 dot product keeps eight f32 lanes per token: per block, lane l gets
// `fma(d_w·d_x, f32(Σ of products 4l..4l + 4), acc_l)`, and the eight lanes are added at the
// end (`hsum_ps`). Two tokens' eight lanes fill one 512-bit vector, so one `vpdpbusd`, one
// conversion, one multiply (the two tokens' `d_w·d_x`) and one FMA do a block for two tokens:
// the lanes keep exactly their one-token values. `vpdpbusd` multiplies unsigned by signed
// bytes, so the weights enter as w + 128 and each lane starts from -128 · Σ of its four
// token quants (exact integers).

/// Q8_0 tokens two to a vector (an odd last token paired with zeros): pair `p`, block `b` at
/// `p * n_blocks + b`.
struct Q8_0Pairs {
    n_blocks: usize,
    n_pairs: usize,
    /// The first token's 32 quants, then the second's.
    quants: Vec<Lanes<u32>>,
    /// Lane l of each half: -128 × the sum of that token's quants 4l..4l + 4.
    offsets: Vec<Lanes<i32>>,
    /// The first token's `d` in lanes 0..8, the second's in 8..16.
    scales: Vec<Lanes<f32>>,
}

impl Q8_0Pairs {
    fn new(xs: &[u8], n_blocks: usize) -> Q8_0Pairs {
        let x_row = n_blocks * Q8_0_BYTES;
        let n_tokens = xs.len() / x_row;
        let n_pairs = n_tokens.div_ceil(2);
        let mut quants = vec![Lanes([0u32; 16]); n_pairs * n_blocks];
        let mut offsets = vec![Lanes([0i32; 16]); n_pairs * n_blocks];
        let mut scales = vec![Lanes([0.0f32; 16]); n_pairs * n_blocks];
        for (t, row) in xs.chunks_exact(x_row).enumerate() {
            let (p, half) = (t / 2, t % 2);
            for (b, block) in row.chunks_exact(Q8_0_BYTES).enumerate() {
                let at = p * n_blocks + b;
                for (l, q) in block[2..].chunks_exact(4).enumerate() {
                    quants[at].0[8 * half + l] = u32::from_le_bytes([q[0], q[1], q[2], q[3]]);
                    let sum: i32 = q.iter().map(|&v| i32::from(v as i8)).sum();
                    offsets[at].0[8 * half + l] = -128 * sum;
                }
                let d = half::f16::from_le_bytes([block[0], block[1]]).to_f32();
                scales[at].0[8 * half..8 * half + 8].fill(d);
            }
        }
        Q8_0Pairs {
            n_blocks,
            n_pairs,
            quants,
            offsets,
            scales,
        }
    }
}

/// Tokens from which [`batch_rows_q8_0_pairs`] pairs them (below, the one-token-per-vector
/// kernel is faster).
const PAIRS_MIN_TOKENS: usize = 4;

/// Weight rows per register tile, and token pairs.
const PAIR_ROWS: usize = 4;
const PAIRS: usize = 4;

/// Q8_0 rows × Q8_0 tokens, each value bit-identical to `dot_q8_0` (ggml's order): `w`
/// whole rows, `xs` whole activation rows, `out[r * stride + t]` (lengths checked by
/// `dispatch`).
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
pub(crate) fn batch_rows_q8_0_pairs(n: usize, w: &[u8], xs: &[u8], out: &mut [f32], stride: usize) {
    let n_blocks = n / 32;
    let w_row = n_blocks * Q8_0_BYTES;
    if w_row == 0 || w.is_empty() || xs.is_empty() {
        return;
    }
    let n_tokens = xs.len() / w_row;
    if n_tokens < PAIRS_MIN_TOKENS {
        return batch_rows_q8_0(n, w, xs, out, stride);
    }
    let x = Q8_0Pairs::new(xs, n_blocks);
    // Row r (of the tile), block b: the row's d, at `r * n_blocks + b`.
    let mut dw = vec![0.0f32; PAIR_ROWS * n_blocks + GROUP];
    for (g, rows) in w.chunks(PAIR_ROWS * w_row).enumerate() {
        let r0 = g * PAIR_ROWS;
        for (r, row) in rows.chunks_exact(w_row).enumerate() {
            for b0 in (0..n_blocks).step_by(GROUP) {
                let count = (n_blocks - b0).min(GROUP);
                let d = f16x8(count, |k| u16_at(row, (b0 + k) * Q8_0_BYTES));
                let at = r * n_blocks + b0;
                store8((&mut dw[at..at + GROUP]).try_into().expect("8 lanes"), d);
            }
        }
        let o = &mut out[r0 * stride..];
        match rows.len() / w_row {
            4 => pair_rows::<4>(rows, w_row, &x, &dw, o, stride, n_tokens),
            3 => pair_rows::<3>(rows, w_row, &x, &dw, o, stride, n_tokens),
            2 => pair_rows::<2>(rows, w_row, &x, &dw, o, stride, n_tokens),
            _ => pair_rows::<1>(rows, w_row, &x, &dw, o, stride, n_tokens),
        }
    }
}

/// `R` rows × every token pair of `x`, [`PAIRS`] pairs at a time.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
fn pair_rows<const R: usize>(
    rows: &[u8],
    w_row: usize,
    x: &Q8_0Pairs,
    dw: &[f32],
    out: &mut [f32],
    stride: usize,
    n_tokens: usize,
) {
    let mut p0 = 0;
    while p0 < x.n_pairs {
        let pp = (x.n_pairs - p0).min(PAIRS);
        // The first pass over the rows streams them from memory: prefetch ahead.
        let first = p0 == 0;
        let acc: [[__m512; PAIRS]; R] = match pp {
            4 => pair_tile::<R, 4>(rows, w_row, x, dw, p0, first),
            3 => pair_tile::<R, 3>(rows, w_row, x, dw, p0, first),
            2 => pair_tile::<R, 2>(rows, w_row, x, dw, p0, first),
            _ => pair_tile::<R, 1>(rows, w_row, x, dw, p0, first),
        };
        for (r, acc) in acc.iter().enumerate() {
            for (p, &a) in acc.iter().enumerate().take(pp) {
                let t = 2 * (p0 + p);
                let lo = _mm512_castps512_ps256(a);
                let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(a)));
                out[r * stride + t] = hsum_ps(lo);
                if t + 1 < n_tokens {
                    out[r * stride + t + 1] = hsum_ps(hi);
                }
            }
        }
        p0 += pp;
    }
}

/// `R` rows × `P` token pairs from pair `p0`: each pair's 16 lanes (two tokens × ggml's
/// eight) per row.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
fn pair_tile<const R: usize, const P: usize>(
    rows: &[u8],
    w_row: usize,
    x: &Q8_0Pairs,
    dw: &[f32],
    p0: usize,
    prefetch: bool,
) -> [[__m512; PAIRS]; R] {
    let n_blocks = x.n_blocks;
    let mut acc = [[_mm512_setzero_ps(); PAIRS]; R];
    let bias = _mm512_set1_epi8(-128);
    for b in 0..n_blocks {
        if prefetch && b % 2 == 0 {
            for r in 0..R {
                let row = &rows[r * w_row..(r + 1) * w_row];
                prefetch_span(row, b * Q8_0_BYTES, (b + 2).min(n_blocks) * Q8_0_BYTES);
            }
        }
        // Each row's block + 128 (as unsigned bytes) in both halves.
        let wq: [__m512i; R] = std::array::from_fn(|r| {
            let q = ld(rows, r * w_row + b * Q8_0_BYTES + 2);
            _mm512_xor_si512(_mm512_broadcast_i64x4(q), bias)
        });
        // (`p` indexes the pairs and every row's accumulators.)
        #[allow(clippy::needless_range_loop)]
        for p in 0..P {
            let at = (p0 + p) * n_blocks + b;
            let xq = ld_lanes_i(&x.quants[at]);
            // SAFETY: `x.offsets[at]` is 64 readable, aligned bytes.
            let off = unsafe { _mm512_load_si512(x.offsets[at].0.as_ptr().cast()) };
            let xd = ld_lanes_f(&x.scales[at]);
            for r in 0..R {
                let s = _mm512_dpbusd_epi32(off, wq[r], xq);
                let d = _mm512_mul_ps(_mm512_set1_ps(dw[r * n_blocks + b]), xd);
                acc[r][p] = _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(s), acc[r][p]);
            }
        }
    }
    acc
}
