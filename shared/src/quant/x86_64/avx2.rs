//! AVX2 + FMA + F16C kernels: weight-row dot products against a tile of activation rows, and
//! the activation quantizers.
//!
//! Every dot kernel is written once as a tile over `B` tokens (`B` = 1..=[`TILE`]): each
//! weight block is loaded and unpacked once and then multiplied with the block of every token
//! of the tile, which is what lets a batch read the weights once. A token's instructions do not
//! depend on `B` (nor on the other tokens), so `vec_dot` (a tile of one) and `vec_dot_batch`
//! give bit-identical results.
//!
//! Inside a block the arithmetic is integer and exact, as in the reference; only the f32
//! accumulation across blocks (and lanes) is ordered differently. The technique follows
//! ggml's x86 kernels: `maddubs` multiplies unsigned weight quants with signed activation
//! quants into i16 pairs, `madd` folds in the block's scales, and the constant offsets and
//! K-quant mins are applied through the activation's precomputed sums (`bsums`). Where a
//! weight is signed, its sign is moved onto the activation (`sign`), which is exact as long
//! as no activation quant is -128 (our quantizers produce -127..=127, and
//! `Activations::from_bytes` rejects -128).
//!
//! The functions are safe `#[target_feature]` functions: memory is read through slices (the
//! only `unsafe` is the unaligned load/store of a checked 16/32-byte sub-slice), and calling
//! one is unsafe only because the CPU must have the features, which `dispatch` guarantees.

use std::arch::x86_64::*;

use half::f16;

/// Tokens per tile: with 16 ymm registers, four tokens' accumulators plus the unpacked
/// weight vectors stay in registers.
pub(crate) const TILE: usize = 4;

pub(super) const Q8_0_BYTES: usize = 34;
const Q8_1_BYTES: usize = 36;
pub(super) const Q8_K_BYTES: usize = 292;
/// Offset of `qs` and `bsums` in a Q8_K block.
pub(super) const Q8_K_QS: usize = 4;
pub(super) const Q8_K_BSUMS: usize = 260;

// ---------------------------------------------------------------------------------------------
// Small helpers.

/// Loads 32 bytes at `at` (bounds-checked; the check folds away for constant offsets into a
/// block of known size).
#[inline]
#[target_feature(enable = "avx2")]
pub(super) fn ld(bytes: &[u8], at: usize) -> __m256i {
    let chunk = &bytes[at..at + 32];
    // SAFETY: `chunk` is 32 readable bytes and `loadu` has no alignment requirement.
    unsafe { _mm256_loadu_si256(chunk.as_ptr().cast()) }
}

/// Loads 16 bytes at `at`.
#[inline]
#[target_feature(enable = "avx2")]
pub(super) fn ld128(bytes: &[u8], at: usize) -> __m128i {
    let chunk = &bytes[at..at + 16];
    // SAFETY: `chunk` is 16 readable bytes and `loadu` has no alignment requirement.
    unsafe { _mm_loadu_si128(chunk.as_ptr().cast()) }
}

/// Stores 32 bytes at `at`.
#[inline]
#[target_feature(enable = "avx2")]
fn st(bytes: &mut [u8], at: usize, v: __m256i) {
    let chunk = &mut bytes[at..at + 32];
    // SAFETY: `chunk` is 32 writable bytes and `storeu` has no alignment requirement.
    unsafe { _mm256_storeu_si256(chunk.as_mut_ptr().cast(), v) }
}

/// Stores 16 bytes at `at`.
#[inline]
#[target_feature(enable = "avx2")]
fn st128(bytes: &mut [u8], at: usize, v: __m128i) {
    let chunk = &mut bytes[at..at + 16];
    // SAFETY: `chunk` is 16 writable bytes and `storeu` has no alignment requirement.
    unsafe { _mm_storeu_si128(chunk.as_mut_ptr().cast(), v) }
}

/// Loads 8 f32 starting at element `at`.
#[inline]
#[target_feature(enable = "avx2")]
fn ld_ps(xs: &[f32], at: usize) -> __m256 {
    let chunk = &xs[at..at + 8];
    // SAFETY: `chunk` is 8 readable f32 and `loadu` has no alignment requirement.
    unsafe { _mm256_loadu_ps(chunk.as_ptr()) }
}

/// Loads 8 little-endian f32 from bytes (x86 is little-endian).
#[inline]
#[target_feature(enable = "avx2")]
fn ld_ps_bytes(bytes: &[u8], at: usize) -> __m256 {
    _mm256_castsi256_ps(ld(bytes, at))
}

// One bounds check per field, so that LLVM reads each field with one load.
#[inline]
pub(super) fn u16_at(bytes: &[u8], at: usize) -> u16 {
    let b = &bytes[at..at + 2];
    u16::from_le_bytes([b[0], b[1]])
}

#[inline]
pub(super) fn u32_at(bytes: &[u8], at: usize) -> u32 {
    let b = &bytes[at..at + 4];
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

#[inline]
pub(super) fn f32_at(bytes: &[u8], at: usize) -> f32 {
    f32::from_bits(u32_at(bytes, at))
}

/// The f16 at `at` as f32 (exact, so equal to the reference's `half` conversion).
///
/// Normal values are converted with integer operations: a scalar F16C conversion makes LLVM
/// emit `vpinsrw` into an arbitrary register, which can be a loop's accumulator and then
/// chains every block to the previous one's FMA (it cost the Q8_0 kernel two thirds of its
/// speed). Zero, subnormals, Inf and NaN (rare in scales) go through F16C.
#[inline]
#[target_feature(enable = "avx2,f16c")]
pub(super) fn f16_at(bytes: &[u8], at: usize) -> f32 {
    let h = u32::from(u16_at(bytes, at));
    let exponent = h & 0x7c00;
    if exponent != 0 && exponent != 0x7c00 {
        // Rebias the exponent (15 → 127) and widen the mantissa (10 → 23 bits).
        f32::from_bits(((h & 0x8000) << 16) | (((h & 0x7fff) + 0x1_c000) << 13))
    } else {
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(h as i32)))
    }
}

/// The adjacent f16 pair at `at` (`d` and `dmin`) as f32. Converted together, both lanes are
/// used, so the input is one full-width `vmovd` (see [`f16_at`]).
#[inline]
#[target_feature(enable = "avx2,f16c")]
pub(super) fn f16_pair(bytes: &[u8], at: usize) -> (f32, f32) {
    let v = _mm_cvtph_ps(_mm_cvtsi32_si128(u32_at(bytes, at) as i32));
    (_mm_cvtss_f32(v), _mm_cvtss_f32(_mm_movehdup_ps(v)))
}

/// Eight f16 values, `bits(k)` for `k < count` and zero after, as eight f32 lanes: the scales
/// of a group of eight legacy blocks, converted at once.
#[inline]
#[target_feature(enable = "avx2,f16c")]
pub(super) fn f16x8(count: usize, bits: impl Fn(usize) -> u16) -> __m256 {
    let h = |k: usize| if k < count { bits(k) as i16 } else { 0 };
    _mm256_cvtph_ps(_mm_set_epi16(
        h(7),
        h(6),
        h(5),
        h(4),
        h(3),
        h(2),
        h(1),
        h(0),
    ))
}

/// Lane `k` of `v` in every lane.
#[inline]
#[target_feature(enable = "avx2")]
pub(super) fn lane(v: __m256, k: usize) -> __m256 {
    _mm256_permutevar8x32_ps(v, _mm256_set1_epi32(k as i32))
}

/// Horizontal sum of 8 lanes.
#[inline]
#[target_feature(enable = "avx2")]
pub(super) fn hsum_ps(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_movehdup_ps(s));
    _mm_cvtss_f32(s)
}

/// Horizontal wrapping sum of 8 i32 lanes.
#[inline]
#[target_feature(enable = "avx2")]
pub(super) fn hsum_epi32(v: __m256i) -> i32 {
    let s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256::<1>(v));
    let s = _mm_add_epi32(s, _mm_unpackhi_epi64(s, s));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b01>(s));
    _mm_cvtsi128_si32(s)
}

/// Σ over pairs of (unsigned `a` byte × signed `b` byte), then over pairs of those: 8 i32
/// lanes, each the sum of 4 neighbouring products. `maddubs` cannot saturate here: every
/// caller's `a` is at most 63, or at most 128 with |b| ≤ 127.
#[inline]
#[target_feature(enable = "avx2")]
fn dot_u8_i8(a: __m256i, b: __m256i) -> __m256i {
    _mm256_madd_epi16(_mm256_maddubs_epi16(a, b), _mm256_set1_epi16(1))
}

/// 16 i16 lanes: the even bytes are the byte at index `k` of each 128-bit lane, zero-extended
/// (`pshufb` writes zero for index bytes with the top bit set).
const fn bcast_u8_to_i16(low_lane: u8, high_lane: u8) -> [u8; 32] {
    let mut m = [0x80u8; 32];
    let mut i = 0;
    while i < 16 {
        m[i] = if i % 2 == 0 { low_lane } else { 0x80 };
        m[16 + i] = if i % 2 == 0 { high_lane } else { 0x80 };
        i += 1;
    }
    m
}

/// 16 i16 lanes: i16 element `low` of each 128-bit lane in the low lane, `high` in the high.
const fn bcast_i16(low: u8, high: u8) -> [u8; 32] {
    let mut m = [0u8; 32];
    let mut i = 0;
    while i < 8 {
        m[2 * i] = 2 * low;
        m[2 * i + 1] = 2 * low + 1;
        m[16 + 2 * i] = 2 * high;
        m[16 + 2 * i + 1] = 2 * high + 1;
        i += 1;
    }
    m
}

/// Q4_K/Q5_K scales: byte k of a broadcast u64 as i16 in every lane (k = sub-block 0..8).
pub(super) const K4_SCALE: [[u8; 32]; 8] = {
    let mut t = [[0u8; 32]; 8];
    let mut k = 0;
    while k < 8 {
        t[k] = bcast_u8_to_i16(k as u8, k as u8);
        k += 1;
    }
    t
};

/// Q2_K: group scale bytes (a 16-byte vector broadcast to both lanes) for the 32 elements
/// `32k..32k+32` of a super-block: groups `2k` (low lane) and `2k + 1` (high lane).
const Q2K_SCALE: [[u8; 32]; 8] = {
    let mut t = [[0u8; 32]; 8];
    let mut k = 0;
    while k < 8 {
        t[k] = bcast_u8_to_i16(2 * k as u8, 2 * k as u8 + 1);
        k += 1;
    }
    t
};

/// Q3_K/Q6_K: i16 scales (8 per lane, broadcast) for elements `32g..32g+32` of a half.
pub(super) const I16_SCALE: [[u8; 32]; 4] = [
    bcast_i16(0, 1),
    bcast_i16(2, 3),
    bcast_i16(4, 5),
    bcast_i16(6, 7),
];

/// Byte k of the result takes byte k/8 of a broadcast u32.
const BITS_SHUF: [u8; 32] = {
    let mut m = [0u8; 32];
    let mut k = 0;
    while k < 32 {
        m[k] = (k / 8) as u8;
        k += 1;
    }
    m
};

#[inline]
#[target_feature(enable = "avx2")]
pub(super) fn cv(bytes: &[u8; 32]) -> __m256i {
    ld(bytes, 0)
}

/// Expands 32 bits (element e = bit e) to 32 bytes of 0xFF (set) or 0x00.
#[inline]
#[target_feature(enable = "avx2")]
fn bits_to_bytes(bits: u32) -> __m256i {
    let spread = _mm256_shuffle_epi8(_mm256_set1_epi32(bits as i32), cv(&BITS_SHUF));
    let select = _mm256_set1_epi64x(0x8040_2010_0804_0201u64 as i64);
    _mm256_cmpeq_epi8(_mm256_and_si256(spread, select), select)
}

/// 16 bytes of packed nibbles to 32 bytes: low nibbles are elements 0..16, high 16..32.
#[inline]
#[target_feature(enable = "avx2")]
fn nibbles(bytes: &[u8], at: usize) -> __m256i {
    let v = ld128(bytes, at);
    let both = _mm256_set_m128i(_mm_srli_epi16::<4>(v), v);
    _mm256_and_si256(both, _mm256_set1_epi8(0x0F))
}

/// Shifts each 16-bit lane right by `count` (bits of neighbouring bytes that enter a byte are
/// masked off by every caller).
#[inline]
#[target_feature(enable = "avx2")]
fn srl16(v: __m256i, count: usize) -> __m256i {
    _mm256_srl_epi16(v, _mm_cvtsi32_si128(count as i32))
}

/// Block `i` of each token's row.
#[inline]
pub(super) fn token_blocks<'a, const B: usize>(
    x: &[&'a [u8]; B],
    i: usize,
    size: usize,
) -> [&'a [u8]; B] {
    // Loops, not `array::from_fn` closures, throughout the kernels: a closure called from a
    // function without the target features is not inlined and costs a call per block.
    let mut blocks: [&[u8]; B] = [&[]; B];
    for (block, row) in blocks.iter_mut().zip(x) {
        *block = &row[i * size..(i + 1) * size];
    }
    blocks
}

/// The horizontal sums of each token's accumulator.
#[inline]
#[target_feature(enable = "avx2")]
pub(super) fn hsum_each<const B: usize>(acc: &[__m256; B]) -> [f32; B] {
    let mut out = [0.0f32; B];
    for (o, &a) in out.iter_mut().zip(acc) {
        *o = hsum_ps(a);
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Batch drivers: split the tokens into tiles and run the tile kernel on each.

/// Bytes ahead of the block being computed that the kernels prefetch a weight row's bytes.
/// The weights come from a file mapping in 4 KiB pages, at whose boundaries the hardware
/// prefetchers stop; measured on the decode benchmark (Q8_0, 2 threads), 8 KiB ahead into L1
/// runs 2.7x faster than no software prefetch, 1 KiB ahead 1.8x, and L2-only hints less.
pub(super) const PREFETCH_AHEAD: usize = 8192;

/// Prefetches into L1 `N` cache lines from byte `start` of `w` moved [`PREFETCH_AHEAD`] on:
/// [`prefetch_span`] without its loop, for a caller that moves through `w` in steps of at
/// most `64 * N` bytes (a line a step leaves out is the first of the next step's).
#[inline]
#[target_feature(enable = "avx2")]
pub(super) fn prefetch_lines<const N: usize>(w: &[u8], start: usize) {
    let base = w.as_ptr().wrapping_add(start + PREFETCH_AHEAD);
    for k in 0..N {
        // A prefetch has no architectural effect and never faults, whatever the address.
        _mm_prefetch::<_MM_HINT_T0>(base.wrapping_add(64 * k).cast());
    }
}

/// Prefetches into L1 the cache lines of bytes `start..end` of `w` moved [`PREFETCH_AHEAD`]
/// further on (past the end of `w` as well: the next rows of a matrix usually follow).
#[inline]
#[target_feature(enable = "avx2")]
pub(super) fn prefetch_span(w: &[u8], start: usize, end: usize) {
    let base = w.as_ptr() as usize;
    let mut line = (base + start + PREFETCH_AHEAD) & !63;
    let last = base + end + PREFETCH_AHEAD;
    while line < last {
        // A prefetch has no architectural effect and never faults, whatever the address.
        _mm_prefetch::<_MM_HINT_T0>(line as *const i8);
        line += 64;
    }
}

macro_rules! batched {
    ($(#[$doc:meta])* $name:ident, $tile:ident) => {
        $(#[$doc])*
        ///
        /// `xs` holds `out.len()` activation rows of equal length; `w` is one weight row of
        /// `n` elements. Lengths are checked by `dispatch`.
        #[target_feature(enable = "avx2,fma,f16c")]
        pub(crate) fn $name(n: usize, w: &[u8], xs: &[u8], out: &mut [f32]) {
            let _ = n;
            let n_tokens = out.len();
            if n_tokens == 0 {
                return;
            }
            let x_row = xs.len() / n_tokens;
            let row = |t: usize| &xs[t * x_row..(t + 1) * x_row];
            for (tile_idx, out_tile) in out.chunks_mut(TILE).enumerate() {
                let t0 = tile_idx * TILE;
                match out_tile.len() {
                    4 => out_tile.copy_from_slice(&$tile::<4>(w, [row(t0), row(t0 + 1), row(t0 + 2), row(t0 + 3)])),
                    3 => out_tile.copy_from_slice(&$tile::<3>(w, [row(t0), row(t0 + 1), row(t0 + 2)])),
                    2 => out_tile.copy_from_slice(&$tile::<2>(w, [row(t0), row(t0 + 1)])),
                    _ => out_tile.copy_from_slice(&$tile::<1>(w, [row(t0)])),
                }
            }
        }
    };
}

batched!(
    /// F32 weights · F32 activations.
    dot_f32, f32_tile
);
batched!(
    /// F16 weights · F16 activations.
    dot_f16, f16_tile
);
batched!(
    /// BF16 weights · BF16 activations.
    dot_bf16, bf16_tile
);
batched!(
    /// F32 weights · F32 activations in tinyBLAS's order (batches of two tokens or more).
    gemm_f32, f32_gemm_tile
);
batched!(
    /// F16 weights · F16 activations in tinyBLAS's order (batches of two tokens or more).
    gemm_f16, f16_gemm_tile
);
batched!(
    /// BF16 weights · BF16 activations in tinyBLAS's order (batches of two tokens or more).
    gemm_bf16, bf16_gemm_tile
);
batched!(
    /// Q4_0 weights · Q8_0 activations.
    dot_q4_0, q4_0_tile
);
batched!(
    /// Q4_1 weights · Q8_1 activations.
    dot_q4_1, q4_1_tile
);
batched!(
    /// Q5_0 weights · Q8_0 activations.
    dot_q5_0, q5_0_tile
);
batched!(
    /// Q5_1 weights · Q8_1 activations.
    dot_q5_1, q5_1_tile
);
batched!(
    /// Q8_0 weights · Q8_0 activations.
    dot_q8_0, q8_0_tile
);
batched!(
    /// Q2_K weights · Q8_K activations.
    dot_q2_k, q2_k_tile
);
batched!(
    /// Q3_K weights · Q8_K activations.
    dot_q3_k, q3_k_tile
);
batched!(
    /// Q4_K weights · Q8_K activations.
    dot_q4_k, q4_k_tile
);
batched!(
    /// Q4_K weights · Q8_K activations in ggml's repacked (8-row interleaved) GEMV order.
    dot_q4_k_repack, q4_k_repack_tile
);
batched!(
    /// Q4_K weights · Q8_K activations in ggml's repacked (8-row interleaved) GEMM order.
    dot_q4_k_repack_gemm, q4_k_repack_gemm_tile
);
batched!(
    /// Q5_K weights · Q8_K activations.
    dot_q5_k, q5_k_tile
);
batched!(
    /// Q6_K weights · Q8_K activations.
    dot_q6_k, q6_k_tile
);
batched!(
    /// Q2_K weights · Q8_K activations in ggml's tiled matmul order.
    dot_q2_k_tiled, q2_k_tiled_tile
);
batched!(
    /// Q3_K weights · Q8_K activations in ggml's tiled matmul order.
    dot_q3_k_tiled, q3_k_tiled_tile
);
batched!(
    /// Q4_K weights · Q8_K activations in ggml's tiled matmul order.
    dot_q4_k_tiled, q4_k_tiled_tile
);
batched!(
    /// Q5_K weights · Q8_K activations in ggml's tiled matmul order.
    dot_q5_k_tiled, q5_k_tiled_tile
);
batched!(
    /// Q6_K weights · Q8_K activations in ggml's tiled matmul order.
    dot_q6_k_tiled, q6_k_tiled_tile
);

// ---------------------------------------------------------------------------------------------
// Float weights, in the two orders ggml's x86 build uses for them:
// - `ggml_vec_dot_f16`/`_f32` (a batch of one token): four 8-lane FMA accumulators over steps
//   of 32 elements, reduced as `GGML_F32x8_REDUCE` (`(a0+a2)+(a1+a3)`, then the 128-bit halves,
//   then two `hadd`s); the tail (n % 32) is added after, in f64 for F16 (`ggml_float`) and with
//   one FMA per element in f32 for F32.
// - llamafile's tinyBLAS (`sgemm`, batches of two tokens or more): one 8-lane FMA accumulator
//   over the length, then `hsum`; it declines rows whose length is not a multiple of 8, which
//   then take the `vec_dot` order.

/// `GGML_F32x8_REDUCE` of four accumulators.
#[inline]
#[target_feature(enable = "avx2")]
fn reduce4(acc: [__m256; 4]) -> f32 {
    let x0 = _mm256_add_ps(acc[0], acc[2]);
    let x1 = _mm256_add_ps(acc[1], acc[3]);
    let x0 = _mm256_add_ps(x0, x1);
    let t0 = _mm_add_ps(_mm256_castps256_ps128(x0), _mm256_extractf128_ps::<1>(x0));
    let t1 = _mm_hadd_ps(t0, t0);
    _mm_cvtss_f32(_mm_hadd_ps(t1, t1))
}

macro_rules! float_tiles {
    ($vec_name:ident, $gemm_name:ident, $elem_bytes:expr, $load:ident, $scalar:ident, $tail_f64:expr) => {
        /// `ggml_vec_dot` order.
        #[inline]
        #[target_feature(enable = "avx2,fma,f16c")]
        fn $vec_name<const B: usize>(w: &[u8], x: [&[u8]; B]) -> [f32; B] {
            const STEP: usize = 32;
            let n = w.len() / $elem_bytes;
            let n_main = n / STEP * STEP;
            let mut acc = [[_mm256_setzero_ps(); 4]; B];
            let mut e = 0;
            while e < n_main {
                prefetch_span(w, e * $elem_bytes, (e + STEP) * $elem_bytes);
                for j in 0..4 {
                    let wj = $load(w, (e + 8 * j) * $elem_bytes);
                    for t in 0..B {
                        let xj = $load(x[t], (e + 8 * j) * $elem_bytes);
                        acc[t][j] = _mm256_fmadd_ps(wj, xj, acc[t][j]);
                    }
                }
                e += STEP;
            }
            let mut out = [0.0f32; B];
            for t in 0..B {
                let sum = reduce4(acc[t]);
                out[t] = if $tail_f64 {
                    let mut sum = f64::from(sum);
                    for k in n_main..n {
                        // The product of two f16 values is exact in f32.
                        sum +=
                            f64::from($scalar(w, k * $elem_bytes) * $scalar(x[t], k * $elem_bytes));
                    }
                    sum as f32
                } else {
                    let mut sum = _mm_set_ss(sum);
                    for k in n_main..n {
                        let a = _mm_set_ss($scalar(w, k * $elem_bytes));
                        let b = _mm_set_ss($scalar(x[t], k * $elem_bytes));
                        sum = _mm_fmadd_ss(a, b, sum);
                    }
                    _mm_cvtss_f32(sum)
                };
            }
            out
        }

        /// tinyBLAS order (the `vec_dot` order when n is not a multiple of 8).
        #[inline]
        #[target_feature(enable = "avx2,fma,f16c")]
        fn $gemm_name<const B: usize>(w: &[u8], x: [&[u8]; B]) -> [f32; B] {
            let n = w.len() / $elem_bytes;
            if n % 8 != 0 {
                return $vec_name::<B>(w, x);
            }
            let mut acc = [_mm256_setzero_ps(); B];
            for e in (0..n).step_by(8) {
                prefetch_span(w, e * $elem_bytes, (e + 8) * $elem_bytes);
                let we = $load(w, e * $elem_bytes);
                for t in 0..B {
                    acc[t] = _mm256_fmadd_ps(we, $load(x[t], e * $elem_bytes), acc[t]);
                }
            }
            hsum_each(&acc)
        }
    };
}

#[inline]
#[target_feature(enable = "avx2,f16c")]
fn ld_f16x8(bytes: &[u8], at: usize) -> __m256 {
    _mm256_cvtph_ps(ld128(bytes, at))
}

#[inline]
#[target_feature(enable = "avx2")]
fn ld_bf16x8(bytes: &[u8], at: usize) -> __m256 {
    let wide = _mm256_cvtepu16_epi32(ld128(bytes, at));
    _mm256_castsi256_ps(_mm256_slli_epi32::<16>(wide))
}

#[inline]
fn bf16_at(bytes: &[u8], at: usize) -> f32 {
    f32::from_bits(u32::from(u16_at(bytes, at)) << 16)
}

float_tiles!(f32_tile, f32_gemm_tile, 4, ld_ps_bytes, f32_at, false);
float_tiles!(f16_tile, f16_gemm_tile, 2, ld_f16x8, f16_at, true);
float_tiles!(bf16_tile, bf16_gemm_tile, 2, ld_bf16x8, bf16_at, false);

// ---------------------------------------------------------------------------------------------
// Legacy quants (32-element blocks).

/// Σ w·x of signed weight bytes `wq` (with `aw = |wq|` precomputed) and activation bytes.
#[inline]
#[target_feature(enable = "avx2")]
fn dot_i8_signed(aw: __m256i, wq: __m256i, xq: __m256i) -> __m256i {
    dot_u8_i8(aw, _mm256_sign_epi8(xq, wq))
}

/// Loads 8 f32 values.
#[inline]
#[target_feature(enable = "avx2")]
pub(super) fn load8(src: &[f32; 8]) -> __m256 {
    // SAFETY: `src` is 8 f32 values, the 32 bytes the unaligned load reads.
    unsafe { _mm256_loadu_ps(src.as_ptr()) }
}

/// Stores 8 f32 lanes into `dst`.
#[inline]
#[target_feature(enable = "avx2")]
pub(super) fn store8(dst: &mut [f32; 8], v: __m256) {
    // SAFETY: `dst` is 8 f32 values, the 32 bytes the unaligned store writes.
    unsafe { _mm256_storeu_ps(dst.as_mut_ptr(), v) };
}

/// Legacy blocks are taken eight at a time so that their scales (the weight's and every
/// token's) are converted with one vector instruction each; the scale of block k is then lane
/// k of their product (the same IEEE product as `d_w * d_x`).
pub(super) const GROUP: usize = 8;

/// Shared body of the Q8_0-activation kernels: `unpack(block) -> signed quants`.
macro_rules! q8_0_family {
    ($name:ident, $w_bytes:expr, $unpack:expr) => {
        #[inline]
        #[target_feature(enable = "avx2,fma,f16c")]
        fn $name<const B: usize>(w: &[u8], x: [&[u8]; B]) -> [f32; B] {
            // Blocks as fixed-size arrays: constant offsets inside a block need no bounds
            // checks, which otherwise cost a third of the instructions of these small blocks.
            let w_blocks = w.as_chunks::<$w_bytes>().0;
            let mut x_blocks: [&[[u8; Q8_0_BYTES]]; B] = [&[]; B];
            for (xb, row) in x_blocks.iter_mut().zip(x) {
                *xb = row.as_chunks::<Q8_0_BYTES>().0;
            }
            let mut acc = [_mm256_setzero_ps(); B];
            for (g, w_group) in w_blocks.chunks(GROUP).enumerate() {
                let count = w_group.len();
                prefetch_span(w, g * GROUP * $w_bytes, (g * GROUP + count) * $w_bytes);
                let wd = f16x8(count, |k| u16_at(&w_group[k], 0));
                let mut x_group: [&[[u8; Q8_0_BYTES]]; B] = [&[]; B];
                // Kept in memory: a broadcast from memory runs on a load port, where taking a
                // register's lane would compete with the integer work for the shuffle port.
                let mut scales = [[0.0f32; GROUP]; B];
                for t in 0..B {
                    x_group[t] = &x_blocks[t][g * GROUP..g * GROUP + count];
                    let xd = f16x8(count, |k| u16_at(&x_group[t][k], 0));
                    store8(&mut scales[t], _mm256_mul_ps(wd, xd));
                }
                // One FMA per block into the token's single accumulator, in block order:
                // ggml's `ggml_vec_dot_q*_0_q8_0` order, which the logits depend on.
                for (k, wb) in w_group.iter().enumerate() {
                    let wq = $unpack(wb);
                    let aw = _mm256_sign_epi8(wq, wq);
                    for t in 0..B {
                        let sumi = dot_i8_signed(aw, wq, ld(&x_group[t][k], 2));
                        let scale = _mm256_set1_ps(scales[t][k]);
                        acc[t] = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(sumi), acc[t]);
                    }
                }
            }
            hsum_each(&acc)
        }
    };
}

#[inline]
#[target_feature(enable = "avx2,f16c")]
pub(super) fn unpack_q8_0(wb: &[u8]) -> __m256i {
    ld(wb, 2)
}

#[inline]
#[target_feature(enable = "avx2,f16c")]
pub(super) fn unpack_q4_0(wb: &[u8]) -> __m256i {
    _mm256_sub_epi8(nibbles(wb, 2), _mm256_set1_epi8(8))
}

#[inline]
#[target_feature(enable = "avx2,f16c")]
pub(super) fn unpack_q5_0(wb: &[u8]) -> __m256i {
    // nibble - 16 for a clear fifth bit is the nibble with the top four bits set.
    let clear = _mm256_andnot_si256(bits_to_bytes(u32_at(wb, 2)), _mm256_set1_epi8(0xF0u8 as i8));
    _mm256_or_si256(nibbles(wb, 6), clear)
}

q8_0_family!(q8_0_tile, 34, unpack_q8_0);

/// Body of a kernel computing several consecutive Q8_0 weight rows against ONE activation row:
/// each row keeps its own accumulator and exactly the operations of `q8_0_tile::<1>` in the
/// same order (so the same bits), but the rows' FMA chains are independent, so their latency
/// overlaps: a one-token product is then limited by throughput, not by one chain per row.
/// `$dot(wq, xq)` is the block's integer dot product (exact, whichever instructions).
macro_rules! q8_0_rows {
    ($(#[$doc:meta])* $name:ident, $features:literal, $dot:ident) => {
        $(#[$doc])*
        #[inline]
        #[target_feature(enable = $features)]
        pub(super) fn $name<const R: usize>(w: [&[u8]; R], x: &[u8]) -> [f32; R] {
            let x_blocks = x.as_chunks::<Q8_0_BYTES>().0;
            let mut w_blocks: [&[[u8; Q8_0_BYTES]]; R] = [&[]; R];
            for (wb, row) in w_blocks.iter_mut().zip(w) {
                *wb = row.as_chunks::<Q8_0_BYTES>().0;
            }
            let mut acc = [_mm256_setzero_ps(); R];
            for (g, x_group) in x_blocks.chunks(GROUP).enumerate() {
                let count = x_group.len();
                let xd = f16x8(count, |k| u16_at(&x_group[k], 0));
                let mut w_group: [&[[u8; Q8_0_BYTES]]; R] = [&[]; R];
                let mut scales = [_mm256_setzero_ps(); R];
                for r in 0..R {
                    w_group[r] = &w_blocks[r][g * GROUP..g * GROUP + count];
                    prefetch_span(w[r], g * GROUP * Q8_0_BYTES, (g * GROUP + count) * Q8_0_BYTES);
                    let wd = f16x8(count, |k| u16_at(&w_group[r][k], 0));
                    scales[r] = _mm256_mul_ps(wd, xd);
                }
                for k in 0..count {
                    let xq = ld(&x_group[k], 2);
                    for r in 0..R {
                        let sumi = $dot(ld(&w_group[r][k], 2), xq);
                        let scale = lane(scales[r], k);
                        acc[r] = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(sumi), acc[r]);
                    }
                }
            }
            hsum_each(&acc)
        }
    };
}
pub(super) use q8_0_rows;

/// Σ of a block's products of signed weight and activation bytes (`maddubs` + `madd`).
#[inline]
#[target_feature(enable = "avx2")]
fn q8_0_block_dot(wq: __m256i, xq: __m256i) -> __m256i {
    dot_i8_signed(_mm256_sign_epi8(wq, wq), wq, xq)
}

/// Runs a rows kernel over `out.len()` consecutive weight rows of `w` (four at a time).
macro_rules! rows_driver {
    ($(#[$doc:meta])* $name:ident, $tile:ident, $features:literal) => {
        $(#[$doc])*
        ///
        /// `w` holds `out.len()` weight rows of `n` elements back to back, `x` one activation
        /// row; lengths are checked by `dispatch`.
        #[target_feature(enable = $features)]
        pub(crate) fn $name(n: usize, w: &[u8], x: &[u8], out: &mut [f32]) {
            let _ = n;
            let n_rows = out.len();
            if n_rows == 0 {
                return;
            }
            let rb = w.len() / n_rows;
            let row = |r: usize| &w[r * rb..(r + 1) * rb];
            for (tile_idx, out_tile) in out.chunks_mut(4).enumerate() {
                let r0 = tile_idx * 4;
                match out_tile.len() {
                    4 => out_tile.copy_from_slice(&$tile::<4>([row(r0), row(r0 + 1), row(r0 + 2), row(r0 + 3)], x)),
                    3 => out_tile.copy_from_slice(&$tile::<3>([row(r0), row(r0 + 1), row(r0 + 2)], x)),
                    2 => out_tile.copy_from_slice(&$tile::<2>([row(r0), row(r0 + 1)], x)),
                    _ => out_tile.copy_from_slice(&$tile::<1>([row(r0)], x)),
                }
            }
        }
    };
}
pub(super) use rows_driver;

/// Q8_0 weight rows · one Q8_0 activation row (each result as `dot_q8_0` gives it), one row
/// after the other; lengths are checked by `dispatch`.
///
/// One row at a time: on a Zen 3 core, four rows walked side by side ([`q8_0_rows_tile`]
/// with `R = 4`) were faster on cache-resident weights (20-26 vs 16-19 GiB/s) but slower from
/// memory (`matvec/Q8_0/1t` 9.3-10.7 vs 12.6-14.4 GiB/s), and decode of the 4-layer Q8_0
/// benchmark file ran at 40-42 tok/s with four rows (two: 41-43) against 58-61 with one, on
/// one thread (2 threads: 62-70, 73-79, 97-100).
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) fn dot_rows_q8_0(n: usize, w: &[u8], x: &[u8], out: &mut [f32]) {
    let _ = n;
    if out.is_empty() {
        return;
    }
    let rb = w.len() / out.len();
    for (o, row) in out.iter_mut().zip(w.chunks_exact(rb.max(1))) {
        *o = q8_0_rows_tile::<1>([row], x)[0];
    }
}

/// `R` Q8_0 rows · one Q8_0 activation row: each row keeps its own accumulator and exactly the
/// operations of `q8_0_tile::<1>` in the same order (so the same bits), but the rows' FMA
/// chains are independent, so their latency overlaps. Unlike the AVX-512 level's
/// [`q8_0_rows`], each block's scale is broadcast from memory (a load port; taking a
/// register's lane is one more micro-op on the vector pipes the integer dot products need),
/// whole groups of eight blocks run with constant bounds, and each group prefetches a fixed
/// number of lines: on a Zen 3 core that made the four-row kernel 1.3-1.7x faster on
/// cache-resident weights (`kernel_rate/Q8_0/1tok`). [`dot_rows_q8_0`] runs it one row at a
/// time (see there why).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn q8_0_rows_tile<const R: usize>(w: [&[u8]; R], x: &[u8]) -> [f32; R] {
    let x_blocks = x.as_chunks::<Q8_0_BYTES>().0;
    let mut w_blocks: [&[[u8; Q8_0_BYTES]]; R] = [&[]; R];
    for (wb, row) in w_blocks.iter_mut().zip(w) {
        *wb = row.as_chunks::<Q8_0_BYTES>().0;
    }
    let mut acc = [_mm256_setzero_ps(); R];
    let mut scales = [[0.0f32; GROUP]; R];
    let (x_full, x_tail) = x_blocks.as_chunks::<GROUP>();
    for (g, x_group) in x_full.iter().enumerate() {
        let xd = f16x8(GROUP, |k| u16_at(&x_group[k], 0));
        let mut w_group: [&[[u8; Q8_0_BYTES]; GROUP]; R] = [&[[0; Q8_0_BYTES]; GROUP]; R];
        for r in 0..R {
            w_group[r] = w_blocks[r][g * GROUP..(g + 1) * GROUP].try_into().unwrap();
            prefetch_lines::<5>(w[r], g * GROUP * Q8_0_BYTES);
            let wd = f16x8(GROUP, |k| u16_at(&w_group[r][k], 0));
            store8(&mut scales[r], _mm256_mul_ps(wd, xd));
        }
        for k in 0..GROUP {
            let xq = ld(&x_group[k], 2);
            for r in 0..R {
                let sumi = q8_0_block_dot(ld(&w_group[r][k], 2), xq);
                let scale = _mm256_set1_ps(scales[r][k]);
                acc[r] = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(sumi), acc[r]);
            }
        }
    }
    let g0 = x_full.len() * GROUP;
    let count = x_tail.len();
    if count > 0 {
        let xd = f16x8(count, |k| u16_at(&x_tail[k], 0));
        for r in 0..R {
            let wd = f16x8(count, |k| u16_at(&w_blocks[r][g0 + k], 0));
            store8(&mut scales[r], _mm256_mul_ps(wd, xd));
        }
        for k in 0..count {
            let xq = ld(&x_tail[k], 2);
            for r in 0..R {
                let sumi = q8_0_block_dot(ld(&w_blocks[r][g0 + k], 2), xq);
                let scale = _mm256_set1_ps(scales[r][k]);
                acc[r] = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(sumi), acc[r]);
            }
        }
    }
    hsum_each(&acc)
}
q8_0_family!(q4_0_tile, 18, unpack_q4_0);
q8_0_family!(q5_0_tile, 22, unpack_q5_0);

/// Shared body of the Q8_1-activation kernels: `unpack(block) -> unsigned quants`; the
/// weight's `m` times the activation's `s` is accumulated per lane beside the products.
macro_rules! q8_1_family {
    ($name:ident, $w_bytes:expr, $unpack:expr) => {
        #[inline]
        #[target_feature(enable = "avx2,fma,f16c")]
        fn $name<const B: usize>(w: &[u8], x: [&[u8]; B]) -> [f32; B] {
            // Fixed-size blocks, as in `q8_0_family`.
            let w_blocks = w.as_chunks::<$w_bytes>().0;
            let mut x_blocks: [&[[u8; Q8_1_BYTES]]; B] = [&[]; B];
            for (xb, row) in x_blocks.iter_mut().zip(x) {
                *xb = row.as_chunks::<Q8_1_BYTES>().0;
            }
            let mut acc = [_mm256_setzero_ps(); B];
            // ggml sums m·s in a scalar, one (contracted) FMA per block.
            let mut summs = [_mm_setzero_ps(); B];
            for (g, w_group) in w_blocks.chunks(GROUP).enumerate() {
                let count = w_group.len();
                prefetch_span(w, g * GROUP * $w_bytes, (g * GROUP + count) * $w_bytes);
                let wd = f16x8(count, |k| u16_at(&w_group[k], 0));
                let wm = f16x8(count, |k| u16_at(&w_group[k], 2));
                let mut x_group: [&[[u8; Q8_1_BYTES]]; B] = [&[]; B];
                let mut scales = [_mm256_setzero_ps(); B];
                let mut xs = [_mm256_setzero_ps(); B];
                for t in 0..B {
                    x_group[t] = &x_blocks[t][g * GROUP..g * GROUP + count];
                    let xd = f16x8(count, |k| u16_at(&x_group[t][k], 0));
                    xs[t] = f16x8(count, |k| u16_at(&x_group[t][k], 2));
                    scales[t] = _mm256_mul_ps(wd, xd);
                }
                for (k, wb) in w_group.iter().enumerate() {
                    let wq = $unpack(wb);
                    let m = _mm256_castps256_ps128(lane(wm, k));
                    for t in 0..B {
                        let sumi = dot_u8_i8(wq, ld(&x_group[t][k], 4));
                        let scale = lane(scales[t], k);
                        acc[t] = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(sumi), acc[t]);
                        let s = _mm256_castps256_ps128(lane(xs[t], k));
                        summs[t] = _mm_fmadd_ss(m, s, summs[t]);
                    }
                }
            }
            let mut out = hsum_each(&acc);
            for (o, m) in out.iter_mut().zip(summs) {
                *o += _mm_cvtss_f32(m);
            }
            out
        }
    };
}

#[inline]
#[target_feature(enable = "avx2,f16c")]
pub(super) fn unpack_q4_1(wb: &[u8]) -> __m256i {
    nibbles(wb, 4)
}

#[inline]
#[target_feature(enable = "avx2,f16c")]
pub(super) fn unpack_q5_1(wb: &[u8]) -> __m256i {
    let fifth = _mm256_and_si256(bits_to_bytes(u32_at(wb, 4)), _mm256_set1_epi8(0x10));
    _mm256_or_si256(nibbles(wb, 8), fifth)
}

q8_1_family!(q4_1_tile, 20, unpack_q4_1);
q8_1_family!(q5_1_tile, 24, unpack_q5_1);

/// Tokens per tile of the rows × tokens kernels (eight accumulators and the Q8_1 sums'
/// vector fit in AVX2's 16 registers).
pub(super) const BATCH_TILE: usize = 8;

/// The activation side of a tile of `B` tokens, laid out for [`batch_rows`]' inner loop:
/// block i's quants of every token side by side (one pointer, constant offsets: eight
/// separate token rows would not fit in the general registers), every block scale (and Q8_1
/// sum) converted from f16 once for all the weight rows.
pub(super) struct TokenTile<const B: usize> {
    /// `[block][token]` quants.
    pub(super) quants: Vec<[[u8; 32]; B]>,
    /// `[token][block]` scales, with a group's worth of zeros after the last block (a short
    /// last group loads them into lanes no block uses).
    scales: Vec<f32>,
    /// `[block][token]` sums (Q8_1's `s`, zero past token `B`; empty for Q8_0).
    pub(super) sums: Vec<[f32; BATCH_TILE]>,
    nb: usize,
}

impl<const B: usize> TokenTile<B> {
    /// `xs`: `B` activation rows of `nb` blocks of `x_bytes` (Q8_0: 34, Q8_1: 36; the
    /// quants are the last 32 bytes of a block, the f16 scale the first two, Q8_1's f16 sum
    /// the next two).
    #[target_feature(enable = "avx2,f16c")]
    pub(super) fn new(xs: &[u8], nb: usize, x_bytes: usize, has_sum: bool) -> TokenTile<B> {
        let x_row = nb * x_bytes;
        let mut quants = vec![[[0u8; 32]; B]; nb];
        let mut scales = vec![0.0f32; B * nb + GROUP];
        let mut sums = vec![[0.0f32; BATCH_TILE]; if has_sum { nb } else { 0 }];
        for t in 0..B {
            let row = &xs[t * x_row..(t + 1) * x_row];
            for (i, block) in row.chunks_exact(x_bytes).enumerate() {
                quants[i][t].copy_from_slice(&block[x_bytes - 32..]);
                scales[t * nb + i] = f16_at(block, 0);
                if has_sum {
                    sums[i][t] = f16_at(block, 2);
                }
            }
        }
        TokenTile {
            quants,
            scales,
            sums,
            nb,
        }
    }

    /// Token `t`'s scales of blocks `g0..g0 + GROUP`.
    #[inline]
    pub(super) fn group_scales(&self, t: usize, g0: usize) -> &[f32; GROUP] {
        let at = t * self.nb + g0;
        self.scales[at..at + GROUP]
            .try_into()
            .unwrap_or(&[0.0; GROUP])
    }
}

/// Several weight rows times several tokens for the legacy quants and Q8_0, each value
/// bit-identical to AVX2's `q8_0_family` / `q8_1_family` tiles (the same f32 operations in
/// the same order; the integer block sums, exact, by `vpdpbusd`). A one-row call converts every token's f16 block scales for that row alone — 16 scalar loads
/// and inserts per token and group of eight blocks, half of the time of a decode batch; here
/// they are converted once per call (a task's rows), tiles of up to [`TILE`] tokens.
///
/// `w` holds whole weight rows, `xs` whole activation rows; `out[r * stride + t]` gets row
/// `r` · token `t`. Lengths are checked by `dispatch`.
macro_rules! batch_rows {
    ($(#[$doc:meta])* $name:ident, $features:literal, $w_bytes:expr, $x_bytes:expr, $has_sum:expr, $row:ident) => {
        $(#[$doc])*
        #[target_feature(enable = $features)]
        pub(crate) fn $name(n: usize, w: &[u8], xs: &[u8], out: &mut [f32], stride: usize) {
            #[inline]
            #[target_feature(enable = $features)]
            fn tile<const B: usize>(
                w: &[u8],
                xs: &[u8],
                nb: usize,
                out: &mut [f32],
                stride: usize,
                t0: usize,
            ) {
                let tokens = TokenTile::<B>::new(xs, nb, $x_bytes, $has_sum);
                for (r, wr) in w.chunks_exact(nb * $w_bytes).enumerate() {
                    let values = $row::<B>(wr, &tokens);
                    out[r * stride + t0..r * stride + t0 + B].copy_from_slice(&values);
                }
            }
            let nb = n / 32;
            let x_row = nb * $x_bytes;
            if x_row == 0 || w.is_empty() {
                return;
            }
            let n_tokens = xs.len() / x_row;
            let mut t0 = 0;
            while t0 < n_tokens {
                let b = (n_tokens - t0).min(BATCH_TILE);
                let x = &xs[t0 * x_row..(t0 + b) * x_row];
                match b {
                    8 => tile::<8>(w, x, nb, out, stride, t0),
                    7 => tile::<7>(w, x, nb, out, stride, t0),
                    6 => tile::<6>(w, x, nb, out, stride, t0),
                    5 => tile::<5>(w, x, nb, out, stride, t0),
                    4 => tile::<4>(w, x, nb, out, stride, t0),
                    3 => tile::<3>(w, x, nb, out, stride, t0),
                    2 => tile::<2>(w, x, nb, out, stride, t0),
                    _ => tile::<1>(w, x, nb, out, stride, t0),
                }
                t0 += b;
            }
        }
    };
}

/// One weight row · a [`TokenTile`]: the float operations of AVX2's `q8_1_family` /
/// `q8_0_family` exactly (one FMA per block into each token's accumulator, Q8_1's m·s
/// in a scalar), every per-block scalar broadcast from memory.
macro_rules! row_tile {
    ($name:ident, $features:literal, $w_bytes:expr, $has_sum:expr, $unpack:ident, $dot:ident) => {
        #[inline]
        #[target_feature(enable = $features)]
        fn $name<const B: usize>(w: &[u8], x: &TokenTile<B>) -> [f32; B] {
            let w_blocks = w.as_chunks::<$w_bytes>().0;
            let mut acc = [_mm256_setzero_ps(); B];
            // Every token's scalar m·s chain in one lane: a vector FMA is the same IEEE
            // operation per lane as the scalar one.
            let mut summs = _mm256_setzero_ps();
            for (g, w_group) in w_blocks.chunks(GROUP).enumerate() {
                let count = w_group.len();
                let g0 = g * GROUP;
                prefetch_span(w, g0 * $w_bytes, (g0 + count) * $w_bytes);
                let wd = f16x8(count, |k| u16_at(&w_group[k], 0));
                let mut wm = [0.0f32; GROUP];
                if $has_sum {
                    store8(&mut wm, f16x8(count, |k| u16_at(&w_group[k], 2)));
                }
                let mut scales = [[0.0f32; GROUP]; B];
                for t in 0..B {
                    store8(
                        &mut scales[t],
                        _mm256_mul_ps(wd, load8(x.group_scales(t, g0))),
                    );
                }
                let quants = &x.quants[g0..g0 + count];
                let sums = if $has_sum {
                    &x.sums[g0..g0 + count]
                } else {
                    &[][..]
                };
                for (k, wb) in w_group.iter().enumerate() {
                    let wq = $unpack(wb);
                    let xq = &quants[k];
                    for t in 0..B {
                        let sumi = $dot(wq, ld(&xq[t], 0));
                        let scale = _mm256_set1_ps(scales[t][k]);
                        acc[t] = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(sumi), acc[t]);
                    }
                    if $has_sum {
                        let m = _mm256_set1_ps(wm[k]);
                        summs = _mm256_fmadd_ps(m, load8(&sums[k]), summs);
                    }
                }
            }
            let mut out = hsum_each(&acc);
            if $has_sum {
                let mut m = [0.0f32; BATCH_TILE];
                store8(&mut m, summs);
                for (o, m) in out.iter_mut().zip(m) {
                    *o += m;
                }
            }
            out
        }
    };
}

/// Every rows × tokens kernel of one level: `$signed` is the Q8_0-activation block dot
/// product, `$unsigned` the Q8_1 one (exact integer sums, so the levels agree bit for bit).
macro_rules! legacy_batch_rows {
    ($features:literal, $signed:ident, $unsigned:ident) => {
        row_tile!(q4_0_row_tile, $features, 18, false, unpack_q4_0, $signed);
        row_tile!(q5_0_row_tile, $features, 22, false, unpack_q5_0, $signed);
        row_tile!(q8_0_row_tile, $features, 34, false, unpack_q8_0, $signed);
        row_tile!(q4_1_row_tile, $features, 20, true, unpack_q4_1, $unsigned);
        row_tile!(q5_1_row_tile, $features, 24, true, unpack_q5_1, $unsigned);
        batch_rows!(
            /// Q4_0 rows · Q8_0 tokens.
            batch_rows_q4_0, $features, 18, 34, false, q4_0_row_tile
        );
        batch_rows!(
            /// Q5_0 rows · Q8_0 tokens.
            batch_rows_q5_0, $features, 22, 34, false, q5_0_row_tile
        );
        batch_rows!(
            /// Q8_0 rows · Q8_0 tokens.
            batch_rows_q8_0, $features, 34, 34, false, q8_0_row_tile
        );
        batch_rows!(
            /// Q4_1 rows · Q8_1 tokens.
            batch_rows_q4_1, $features, 20, 36, true, q4_1_row_tile
        );
        batch_rows!(
            /// Q5_1 rows · Q8_1 tokens.
            batch_rows_q5_1, $features, 24, 36, true, q5_1_row_tile
        );
    };
}
pub(super) use {batch_rows, legacy_batch_rows, row_tile};

legacy_batch_rows!("avx2,fma,f16c", q8_0_block_dot, dot_u8_i8);

// ---------------------------------------------------------------------------------------------
// K-quants against Q8_K.

/// Q4_K/Q5_K's packed 6-bit scales and mins as two u64 of 8 bytes each (byte k = sub-block
/// k), the layout of `scale_min` in docs/FORMATS.md computed four bytes at a time.
#[inline]
pub(super) fn k4_scales_mins(s: &[u8]) -> (u64, u64) {
    let (a0, a1, a2) = (u32_at(s, 0), u32_at(s, 4), u32_at(s, 8));
    let sc_lo = a0 & 0x3f3f_3f3f;
    let mn_lo = a1 & 0x3f3f_3f3f;
    let sc_hi = (a2 & 0x0f0f_0f0f) | (((a0 >> 6) & 0x0303_0303) << 4);
    let mn_hi = ((a2 >> 4) & 0x0f0f_0f0f) | (((a1 >> 6) & 0x0303_0303) << 4);
    (
        u64::from(sc_lo) | (u64::from(sc_hi) << 32),
        u64::from(mn_lo) | (u64::from(mn_hi) << 32),
    )
}

/// Q3_K's 16 scales (-32..=31) as 16 i16.
#[inline]
#[target_feature(enable = "avx2")]
fn q3k_scales(s: &[u8]) -> __m256i {
    let (a0, a1, a2) = (u32_at(s, 0), u32_at(s, 4), u32_at(s, 8));
    let lo4 = 0x0f0f_0f0fu32;
    let hi2 = 0x0303_0303u32;
    let g0 = (a0 & lo4) | ((a2 & hi2) << 4);
    let g1 = (a1 & lo4) | (((a2 >> 2) & hi2) << 4);
    let g2 = ((a0 >> 4) & lo4) | (((a2 >> 4) & hi2) << 4);
    let g3 = ((a1 >> 4) & lo4) | (((a2 >> 6) & hi2) << 4);
    let v = _mm_set_epi32(g3 as i32, g2 as i32, g1 as i32, g0 as i32);
    _mm256_cvtepi8_epi16(_mm_sub_epi8(v, _mm_set1_epi8(32)))
}

/// The 8 i16 of one 128-bit half broadcast to both lanes.
#[inline]
#[target_feature(enable = "avx2")]
pub(super) fn halves(v: __m256i) -> [__m256i; 2] {
    [
        _mm256_permute2x128_si256::<0x00>(v, v),
        _mm256_permute2x128_si256::<0x11>(v, v),
    ]
}

/// Adds `d · Σlanes(sumi)` into a token's accumulator.
#[inline]
#[target_feature(enable = "avx2,fma")]
pub(super) fn fma_acc(acc: __m256, d: f32, sumi: __m256i) -> __m256 {
    _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(sumi), acc)
}

/// One super-block of ggml's tiled order (`reference::vec_dot_tiled`): `r = d·f32(s1)`, then
/// `fma(-dmin, f32(s2), r)` when the type has mins, then `fma(r, d_y, acc)`.
#[inline]
#[target_feature(enable = "avx2,fma")]
fn tiled_step(acc: f32, xd: f32, d: f32, s1: i32, mins: Option<(f32, i32)>) -> f32 {
    let mut r = d * s1 as f32;
    if let Some((dmin, s2)) = mins {
        r = (-dmin).mul_add(s2 as f32, r);
    }
    r.mul_add(xd, acc)
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn q2_k_tile<const B: usize>(w: &[u8], x: [&[u8]; B]) -> [f32; B] {
    q2_k_tile_in::<B, false>(w, x)
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn q2_k_tiled_tile<const B: usize>(w: &[u8], x: [&[u8]; B]) -> [f32; B] {
    q2_k_tile_in::<B, true>(w, x)
}

/// Q2_K in `vec_dot`'s order, or in the tiled matmul's when `TILED` (see [`tiled_step`]).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn q2_k_tile_in<const B: usize, const TILED: bool>(w: &[u8], x: [&[u8]; B]) -> [f32; B] {
    let m3 = _mm256_set1_epi8(3);
    let m4 = _mm_set1_epi8(0x0F);
    let mut acc = [_mm256_setzero_ps(); B];
    let mut tiled = [0.0f32; B];
    for (i, wb) in w.chunks_exact(84).enumerate() {
        prefetch_span(w, i * 84, (i + 1) * 84);
        let (d, dmin) = f16_pair(wb, 80);
        let packed = ld128(wb, 0);
        let scales = _mm256_broadcastsi128_si256(_mm_and_si128(packed, m4));
        let mins = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16::<4>(packed), m4));
        let xb = token_blocks(&x, i, Q8_K_BYTES);
        let mut sumi = [_mm256_setzero_si256(); B];
        for half in 0..2 {
            let q = ld(wb, 16 + 32 * half);
            for j in 0..4 {
                let k = 4 * half + j;
                let qj = _mm256_and_si256(srl16(q, 2 * j), m3);
                let sc = _mm256_shuffle_epi8(scales, cv(&Q2K_SCALE[k]));
                for t in 0..B {
                    let p = _mm256_maddubs_epi16(qj, ld(xb[t], Q8_K_QS + 32 * k));
                    sumi[t] = _mm256_add_epi32(sumi[t], _mm256_madd_epi16(p, sc));
                }
            }
        }
        for t in 0..B {
            let xd = f32_at(xb[t], 0);
            let summs = _mm256_madd_epi16(mins, ld(xb[t], Q8_K_BSUMS));
            if TILED {
                let s2 = hsum_epi32(summs);
                tiled[t] = tiled_step(tiled[t], xd, d, hsum_epi32(sumi[t]), Some((dmin, s2)));
                continue;
            }
            // ggml adds the mins' term first, then the quants', each with one FMA.
            acc[t] = fma_acc(acc[t], -(xd * dmin), summs);
            acc[t] = fma_acc(acc[t], xd * d, sumi[t]);
        }
    }
    if TILED {
        return tiled;
    }
    hsum_each(&acc)
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn q3_k_tile<const B: usize>(w: &[u8], x: [&[u8]; B]) -> [f32; B] {
    q3_k_tile_in::<B, false>(w, x)
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn q3_k_tiled_tile<const B: usize>(w: &[u8], x: [&[u8]; B]) -> [f32; B] {
    q3_k_tile_in::<B, true>(w, x)
}

/// Q3_K in `vec_dot`'s order, or in the tiled matmul's when `TILED` (see [`tiled_step`]).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn q3_k_tile_in<const B: usize, const TILED: bool>(w: &[u8], x: [&[u8]; B]) -> [f32; B] {
    let m3 = _mm256_set1_epi8(3);
    let one = _mm256_set1_epi8(1);
    let mut acc = [_mm256_setzero_ps(); B];
    let mut tiled = [0.0f32; B];
    for (i, wb) in w.chunks_exact(110).enumerate() {
        prefetch_span(w, i * 110, (i + 1) * 110);
        let d = f16_at(wb, 108);
        let scales = q3k_scales(&wb[96..108]);
        let sc_half = halves(scales);
        let hmask = ld(wb, 0);
        let xb = token_blocks(&x, i, Q8_K_BYTES);
        let mut sumi = [_mm256_setzero_si256(); B];
        for (half, &sc_h) in sc_half.iter().enumerate() {
            let q = ld(wb, 32 + 32 * half);
            for (j, shuffle) in I16_SCALE.iter().enumerate() {
                let k = 4 * half + j;
                // q = low two bits - (4 where the high bit is clear). The -4 is taken per
                // element (not from bsums) so that each f32 lane gets ggml's integer sum.
                let lo = _mm256_and_si256(srl16(q, 2 * j), m3);
                let clear = _mm256_andnot_si256(srl16(hmask, k), one);
                let h4 = _mm256_slli_epi16::<2>(clear);
                let sc = _mm256_shuffle_epi8(sc_h, cv(shuffle));
                for t in 0..B {
                    let xq = ld(xb[t], Q8_K_QS + 32 * k);
                    let p = _mm256_sub_epi16(
                        _mm256_maddubs_epi16(lo, xq),
                        _mm256_maddubs_epi16(h4, xq),
                    );
                    sumi[t] = _mm256_add_epi32(sumi[t], _mm256_madd_epi16(p, sc));
                }
            }
        }
        for t in 0..B {
            if TILED {
                let s1 = hsum_epi32(sumi[t]);
                tiled[t] = tiled_step(tiled[t], f32_at(xb[t], 0), d, s1, None);
                continue;
            }
            acc[t] = fma_acc(acc[t], d * f32_at(xb[t], 0), sumi[t]);
        }
    }
    if TILED {
        return tiled;
    }
    hsum_each(&acc)
}

/// Q4_K/Q5_K mins term of one block as ggml's AVX2 kernels form it: 4 i32 lanes, lane `l`
/// = `m[2l]·(b[4l] + b[4l+1]) + m[2l+1]·(b[4l+2] + b[4l+3])` (`b` = the token's bsums).
#[inline]
#[target_feature(enable = "avx2")]
pub(super) fn k4_min_prod(mins: __m128i, xb: &[u8]) -> __m128i {
    let q8s = _mm_hadd_epi16(ld128(xb, Q8_K_BSUMS), ld128(xb, Q8_K_BSUMS + 16));
    _mm_madd_epi16(mins, q8s)
}

/// Adds one block's mins term into a token's mins accumulator. Q4_K (`SCALAR = false`)
/// keeps ggml's four f32 lanes; Q5_K (`SCALAR = true`) sums the lanes as integers first and
/// accumulates a scalar (lane 0), as ggml's `summs += dmin * hsum` (contracted to an FMA).
#[inline]
#[target_feature(enable = "avx2,fma")]
pub(super) fn k4_mins_acc<const SCALAR: bool>(acc_m: __m128, mdmin: f32, prod: __m128i) -> __m128 {
    if SCALAR {
        let total = _mm_hadd_epi32(_mm_hadd_epi32(prod, prod), prod);
        _mm_fmadd_ss(_mm_set_ss(mdmin), _mm_cvtepi32_ps(total), acc_m)
    } else {
        _mm_fmadd_ps(_mm_set1_ps(mdmin), _mm_cvtepi32_ps(prod), acc_m)
    }
}

/// The mins accumulator's value, reduced in ggml's order.
#[inline]
#[target_feature(enable = "avx2")]
pub(super) fn k4_mins_value<const SCALAR: bool>(acc_m: __m128) -> f32 {
    if SCALAR {
        _mm_cvtss_f32(acc_m)
    } else {
        let s = _mm_add_ps(acc_m, _mm_movehl_ps(acc_m, acc_m));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
    }
}

/// Q4_K and Q5_K: `quants(wb, c)` gives the unsigned quants of sub-blocks 2c and 2c+1;
/// `$scalar_mins` picks the kernel's mins accumulation (see [`k4_mins_acc`]); `TILED` the
/// tiled matmul's order instead (see [`tiled_step`]).
macro_rules! k4_tile {
    ($name:ident, $w_bytes:expr, $scales_at:expr, $quants:ident, $scalar_mins:expr) => {
        #[inline]
        #[target_feature(enable = "avx2,fma,f16c")]
        fn $name<const B: usize, const TILED: bool>(w: &[u8], x: [&[u8]; B]) -> [f32; B] {
            let mut acc = [_mm256_setzero_ps(); B];
            let mut acc_m = [_mm_setzero_ps(); B];
            let mut tiled = [0.0f32; B];
            for (i, wb) in w.chunks_exact($w_bytes).enumerate() {
                prefetch_span(w, i * $w_bytes, (i + 1) * $w_bytes);
                let (d, dmin) = f16_pair(wb, 0);
                let (sc, mn) = k4_scales_mins(&wb[$scales_at..$scales_at + 12]);
                let sc = _mm256_set1_epi64x(sc as i64);
                let mins = _mm_cvtepu8_epi16(_mm_cvtsi64_si128(mn as i64));
                let xb = token_blocks(&x, i, Q8_K_BYTES);
                let mut sumi = [_mm256_setzero_si256(); B];
                for c in 0..4 {
                    let (lo, hi) = $quants(wb, c);
                    let sc_lo = _mm256_shuffle_epi8(sc, cv(&K4_SCALE[2 * c]));
                    let sc_hi = _mm256_shuffle_epi8(sc, cv(&K4_SCALE[2 * c + 1]));
                    for t in 0..B {
                        let x_lo = ld(xb[t], Q8_K_QS + 64 * c);
                        let x_hi = ld(xb[t], Q8_K_QS + 64 * c + 32);
                        let s = k4_quarter_dot([lo, hi], [sc_lo, sc_hi], [x_lo, x_hi]);
                        sumi[t] = _mm256_add_epi32(sumi[t], s);
                    }
                }
                for t in 0..B {
                    let xd = f32_at(xb[t], 0);
                    let prod = k4_min_prod(mins, xb[t]);
                    if TILED {
                        let s2 = _mm_hadd_epi32(_mm_hadd_epi32(prod, prod), prod);
                        let s2 = _mm_cvtsi128_si32(s2);
                        let s1 = hsum_epi32(sumi[t]);
                        tiled[t] = tiled_step(tiled[t], xd, d, s1, Some((dmin, s2)));
                        continue;
                    }
                    acc_m[t] = k4_mins_acc::<{ $scalar_mins }>(acc_m[t], -(xd * dmin), prod);
                    acc[t] = fma_acc(acc[t], xd * d, sumi[t]);
                }
            }
            if TILED {
                return tiled;
            }
            let mut out = hsum_each(&acc);
            for (o, m) in out.iter_mut().zip(acc_m) {
                *o += k4_mins_value::<{ $scalar_mins }>(m);
            }
            out
        }
    };
}

/// Q4_K in the order of ggml's CPU_REPACK GEMV kernel (`ggml_gemv_q4_K_8x8_q8_K`), which
/// ggml uses instead of `vec_dot` for Q4_K matrices with a multiple of 8 rows, one token at a
/// time (`MUL_MAT_ID`, and a 2-D `MUL_MAT`'s last `n_tokens % 4` tokens): per super-block, the
/// block's whole integer sum and its whole mins sum are each converted to f32 and added with
/// one FMA into two scalar accumulators (scales `d·d_x` and `dmin·d_x`), and the result is
/// their difference.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn q4_k_repack_tile<const B: usize>(w: &[u8], x: [&[u8]; B]) -> [f32; B] {
    q4_k_repack_tile_in::<B, false>(w, x)
}

/// Q4_K in the order of ggml's CPU_REPACK GEMM kernel (`ggml_gemm_q4_K_8x8_q8_K`), which a
/// 2-D `MUL_MAT` uses for its tokens in groups of four: as [`q4_k_repack_tile`], but the FMAs
/// into the two accumulators happen per 64-element quarter of a super-block (its two
/// sub-blocks' integer sums, and their two mins terms), four per super-block.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn q4_k_repack_gemm_tile<const B: usize>(w: &[u8], x: [&[u8]; B]) -> [f32; B] {
    q4_k_repack_tile_in::<B, true>(w, x)
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn q4_k_repack_tile_in<const B: usize, const GEMM: bool>(w: &[u8], x: [&[u8]; B]) -> [f32; B] {
    let mut acc = [_mm_setzero_ps(); B];
    let mut acc_m = [_mm_setzero_ps(); B];
    for (i, wb) in w.chunks_exact(144).enumerate() {
        prefetch_span(w, i * 144, (i + 1) * 144);
        let (d, dmin) = f16_pair(wb, 0);
        let (sc, mn) = k4_scales_mins(&wb[4..16]);
        let sc = _mm256_set1_epi64x(sc as i64);
        let mins = _mm_cvtepu8_epi16(_mm_cvtsi64_si128(mn as i64));
        let xb = token_blocks(&x, i, Q8_K_BYTES);
        let mut sumi = [_mm256_setzero_si256(); B];
        // Integer sum of each 64-element quarter, per token (the GEMM kernel's FMA operands).
        let mut quarter = [[0i32; 4]; B];
        for c in 0..4 {
            let (lo, hi) = q4k_quants(wb, c);
            let sc_lo = _mm256_shuffle_epi8(sc, cv(&K4_SCALE[2 * c]));
            let sc_hi = _mm256_shuffle_epi8(sc, cv(&K4_SCALE[2 * c + 1]));
            for t in 0..B {
                let x_lo = ld(xb[t], Q8_K_QS + 64 * c);
                let x_hi = ld(xb[t], Q8_K_QS + 64 * c + 32);
                let s = k4_quarter_dot([lo, hi], [sc_lo, sc_hi], [x_lo, x_hi]);
                if GEMM {
                    quarter[t][c] = hsum_epi32(s);
                } else {
                    sumi[t] = _mm256_add_epi32(sumi[t], s);
                }
            }
        }
        for t in 0..B {
            let xd = f32_at(xb[t], 0);
            let prod = k4_min_prod(mins, xb[t]);
            let (scale, scale_m) = (_mm_set_ss(d * xd), _mm_set_ss(dmin * xd));
            if GEMM {
                let mut m = [0i32; 4];
                // SAFETY: `m` is four i32s, the 16 bytes the unaligned store writes.
                unsafe { _mm_storeu_si128(m.as_mut_ptr().cast(), prod) };
                for c in 0..4 {
                    let v = _mm_cvtsi32_ss(_mm_setzero_ps(), quarter[t][c]);
                    acc[t] = _mm_fmadd_ss(v, scale, acc[t]);
                    let v = _mm_cvtsi32_ss(_mm_setzero_ps(), m[c]);
                    acc_m[t] = _mm_fmadd_ss(v, scale_m, acc_m[t]);
                }
            } else {
                let total = hsum_epi32(sumi[t]);
                let m = _mm_hadd_epi32(_mm_hadd_epi32(prod, prod), prod);
                acc[t] = _mm_fmadd_ss(_mm_cvtsi32_ss(_mm_setzero_ps(), total), scale, acc[t]);
                acc_m[t] = _mm_fmadd_ss(_mm_cvtepi32_ps(m), scale_m, acc_m[t]);
            }
        }
    }
    let mut out = [0.0f32; B];
    for t in 0..B {
        out[t] = _mm_cvtss_f32(acc[t]) - _mm_cvtss_f32(acc_m[t]);
    }
    out
}

/// Four Q4_K rows · one Q8_K activation row in CPU_REPACK's GEMV order (see
/// [`q4_k_repack_tile`]) with their per-block float steps side by side: the four rows' integer
/// totals (and mins sums) reduced together into the four lanes of one vector, whose lanes
/// then take exactly the one-row kernel's scalar operations (the same bits). The activation's
/// quants are loaded once for the four rows. `$block_sums(wb, xq, xb)` gives one super-block's
/// eight-lane integer sums of scale · quant · x and its mins products (exact, whichever
/// instructions make them).
macro_rules! q4_k_rows4 {
    ($(#[$doc:meta])* $name:ident, $features:literal, $block_sums:ident) => {
        $(#[$doc])*
        #[inline]
        #[target_feature(enable = $features)]
        fn $name(w: [&[u8]; 4], x: &[u8]) -> [f32; 4] {
            let mut acc = _mm_setzero_ps();
            let mut acc_m = _mm_setzero_ps();
            for (i, xb) in x.chunks_exact(Q8_K_BYTES).enumerate() {
                let xd = _mm_set1_ps(f32_at(xb, 0));
                let mut xq = [[_mm256_setzero_si256(); 2]; 4];
                for (c, q) in xq.iter_mut().enumerate() {
                    *q = [ld(xb, Q8_K_QS + 64 * c), ld(xb, Q8_K_QS + 64 * c + 32)];
                }
                let mut sums = [_mm256_setzero_si256(); 4];
                let mut prods = [_mm_setzero_si128(); 4];
                let mut heads = [0u32; 4];
                for r in 0..4 {
                    let wb = &w[r][i * 144..(i + 1) * 144];
                    prefetch_span(w[r], i * 144, (i + 1) * 144);
                    heads[r] = u32_at(wb, 0);
                    (sums[r], prods[r]) = $block_sums(wb, &xq, xb);
                }
                // Lane r: row r's integer total, and its mins sum (exact, in any order).
                let t = _mm256_hadd_epi32(
                    _mm256_hadd_epi32(sums[0], sums[1]),
                    _mm256_hadd_epi32(sums[2], sums[3]),
                );
                let total = _mm_add_epi32(_mm256_castsi256_si128(t), _mm256_extracti128_si256::<1>(t));
                let m = _mm_hadd_epi32(
                    _mm_hadd_epi32(prods[0], prods[1]),
                    _mm_hadd_epi32(prods[2], prods[3]),
                );
                // Lanes (d_r, dmin_r) of the four rows, then d·x_d and dmin·x_d per row.
                // SAFETY: `heads` is 16 readable bytes; `loadu` has no alignment requirement.
                let h = unsafe { _mm_loadu_si128(heads.as_ptr().cast()) };
                let dd = _mm256_cvtph_ps(h);
                let d = _mm256_castps256_ps128(_mm256_permutevar8x32_ps(
                    dd,
                    _mm256_setr_epi32(0, 2, 4, 6, 0, 0, 0, 0),
                ));
                let dmin = _mm256_castps256_ps128(_mm256_permutevar8x32_ps(
                    dd,
                    _mm256_setr_epi32(1, 3, 5, 7, 0, 0, 0, 0),
                ));
                acc = _mm_fmadd_ps(_mm_cvtepi32_ps(total), _mm_mul_ps(d, xd), acc);
                acc_m = _mm_fmadd_ps(_mm_cvtepi32_ps(m), _mm_mul_ps(dmin, xd), acc_m);
            }
            let mut out = [0.0f32; 4];
            // SAFETY: `out` is 4 writable f32.
            unsafe { _mm_storeu_ps(out.as_mut_ptr(), _mm_sub_ps(acc, acc_m)) };
            out
        }
    };
}
pub(super) use q4_k_rows4;

/// One Q4_K super-block `wb` · the token's quants `xq` (its four quarters, as the rows kernels
/// load them) and bsums in `xb`: the eight-lane integer sums of scale · quant · x, and the
/// mins products (both exact; reduced by the callers).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn q4_k_block_sums(wb: &[u8], xq: &[[__m256i; 2]; 4], xb: &[u8]) -> (__m256i, __m128i) {
    let (sc, mn) = k4_scales_mins(&wb[4..16]);
    let sc = _mm256_set1_epi64x(sc as i64);
    let mins = _mm_cvtepu8_epi16(_mm_cvtsi64_si128(mn as i64));
    let mut sumi = [_mm256_setzero_si256(); 2];
    for (c, q) in xq.iter().enumerate() {
        let (lo, hi) = q4k_quants(wb, c);
        let sc_lo = _mm256_shuffle_epi8(sc, cv(&K4_SCALE[2 * c]));
        let sc_hi = _mm256_shuffle_epi8(sc, cv(&K4_SCALE[2 * c + 1]));
        let s = k4_quarter_dot([lo, hi], [sc_lo, sc_hi], *q);
        sumi[c % 2] = _mm256_add_epi32(sumi[c % 2], s);
    }
    (_mm256_add_epi32(sumi[0], sumi[1]), k4_min_prod(mins, xb))
}

q4_k_rows4!(
    /// Four Q4_K rows · one Q8_K activation row (see [`q4_k_rows4`]).
    q4_k_repack_rows4,
    "avx2,fma,f16c",
    q4_k_block_sums
);

/// `R` Q4_K rows · one Q8_K activation row in CPU_REPACK's GEMV order: four rows together,
/// fewer one at a time (each result as [`dot_q4_k_repack`] gives it).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn q4_k_repack_rows_tile<const R: usize>(w: [&[u8]; R], x: &[u8]) -> [f32; R] {
    if R == 4 {
        let v = q4_k_repack_rows4(std::array::from_fn(|k| w[k.min(R - 1)]), x);
        return std::array::from_fn(|r| v[r]);
    }
    std::array::from_fn(|r| q4_k_repack_tile::<1>(w[r], [x])[0])
}

rows_driver!(
    /// Q4_K weight rows · one Q8_K activation row in CPU_REPACK's GEMV order (each result as
    /// [`dot_q4_k_repack`] gives it).
    dot_rows_q4_k_repack4,
    q4_k_repack_rows_tile,
    "avx2,fma,f16c"
);

/// Q4_K weight rows · one Q8_K activation row in CPU_REPACK's GEMV order (each result as
/// [`dot_q4_k_repack`] gives it): eight rows at a time, the rest four or one at a time.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) fn dot_rows_q4_k_repack(n: usize, w: &[u8], x: &[u8], out: &mut [f32]) {
    let n_rows = out.len();
    if n_rows == 0 {
        return;
    }
    let rb = w.len() / n_rows;
    let eights = n_rows / 8 * 8;
    for (o, rows) in out[..eights]
        .chunks_exact_mut(8)
        .zip(w.chunks_exact(8 * rb))
    {
        let v = q4_k_repack_rows8(rows, rb, x);
        o.copy_from_slice(&v);
    }
    if eights < n_rows {
        dot_rows_q4_k_repack4(n, &w[eights * rb..], x, &mut out[eights..]);
    }
}

/// Groups of eight interleaved Q4_K rows ([`crate::quant::rows8`]) · one Q8_K activation
/// row in CPU_REPACK's GEMV order: `out[r]` is the bits of [`dot_q4_k_repack`] of the group's
/// row `r % 8` de-interleaved. Each 32-bit lane carries one row from the loads to the result,
/// so a sub-block's eight steps add their `maddubs` pairs as i16 (at most 8 · 2 · 15 · 128 =
/// 30720, no overflow) and take one `madd` by the eight rows' scales, and the scales and mins
/// of the eight rows unpack together. Lengths are checked by `dispatch`: `out.len()` is a
/// multiple of 8 and `w` is `out.len() / 8` groups of `n` columns.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) fn dot_rows_q4_k_r8(n: usize, w: &[u8], x: &[u8], out: &mut [f32]) {
    use crate::quant::rows8::GROUP_BLOCK_BYTES;
    let group_bytes = n / 256 * GROUP_BLOCK_BYTES;
    if group_bytes == 0 {
        out.fill(0.0);
        return;
    }
    for (o, g) in out.chunks_exact_mut(8).zip(w.chunks_exact(group_bytes)) {
        let o: &mut [f32; 8] = o.try_into().expect("chunks of 8");
        store8(o, q4_k_r8_group(g, x));
    }
}

/// [`dot_rows_q4_k_r8`] for several tokens (`xs`, Q8_K rows back to back), each in the GEMV
/// order: `out[r * stride + t]` = row r · token t. A group's blocks (9 KiB for 2048 columns)
/// stay in L1 while every token goes over them. Lengths are checked by `dispatch`.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) fn dot_tokens_q4_k_r8(n: usize, w: &[u8], xs: &[u8], out: &mut [f32], stride: usize) {
    use crate::quant::rows8::GROUP_BLOCK_BYTES;
    let group_bytes = n / 256 * GROUP_BLOCK_BYTES;
    let x_row = n / 256 * Q8_K_BYTES;
    if group_bytes == 0 || x_row == 0 {
        return;
    }
    for (gi, g) in w.chunks_exact(group_bytes).enumerate() {
        for (t, x) in xs.chunks_exact(x_row).enumerate() {
            let mut lanes = [0.0f32; 8];
            store8(&mut lanes, q4_k_r8_group(g, x));
            for (r, v) in lanes.into_iter().enumerate() {
                out[(8 * gi + r) * stride + t] = v;
            }
        }
    }
}

/// [`crate::quant::rows8::deinterleave`] with 32-byte moves: each row's 4-byte words are
/// columns of 8 × 8 word matrices (a 32-byte load holds one word of each row), so a block
/// takes one 8 × 4 and four 8 × 8 transposes. Byte-identical to the scalar version (tested);
/// lengths as there (checked by `dispatch`).
#[target_feature(enable = "avx2")]
pub(crate) fn deinterleave_q4_k_r8(group: &[u8], out: &mut [u8]) {
    use crate::quant::rows8::{
        DMIN_AT, D_AT, GROUP_BLOCK_BYTES, QS_AT, SCALES_AT, SUPER_BLOCK_BYTES,
    };
    let rb = group.len() / 8;
    for (i, g) in group.chunks_exact(GROUP_BLOCK_BYTES).enumerate() {
        let at = |r: usize| r * rb + i * SUPER_BLOCK_BYTES;
        // Words 0..4 of each row: (d, dmin), a0, a1, a2.
        let (d, dmin) = (ld128(g, D_AT), ld128(g, DMIN_AT));
        let dd = _mm256_set_m128i(_mm_unpackhi_epi16(d, dmin), _mm_unpacklo_epi16(d, dmin));
        // `dd` holds rows 0..4 in its low half and 4..8 in its high half; the scale words
        // hold rows 0..8 in order: permute them to the same (0, 1, 2, 3 | 4, 5, 6, 7) halves.
        let (a0, a1, a2) = (
            ld(g, SCALES_AT),
            ld(g, SCALES_AT + 32),
            ld(g, SCALES_AT + 64),
        );
        let lo01 = _mm256_unpacklo_epi32(dd, a0);
        let hi01 = _mm256_unpackhi_epi32(dd, a0);
        let lo23 = _mm256_unpacklo_epi32(a1, a2);
        let hi23 = _mm256_unpackhi_epi32(a1, a2);
        // Row r (of each half): words (dd, a0, a1, a2) as one 128-bit lane.
        let heads = [
            _mm256_unpacklo_epi64(lo01, lo23), // rows 0 | 4
            _mm256_unpackhi_epi64(lo01, lo23), // rows 1 | 5
            _mm256_unpacklo_epi64(hi01, hi23), // rows 2 | 6
            _mm256_unpackhi_epi64(hi01, hi23), // rows 3 | 7
        ];
        for (k, h) in heads.iter().enumerate() {
            st128(out, at(k), _mm256_castsi256_si128(*h));
            st128(out, at(k + 4), _mm256_extracti128_si256::<1>(*h));
        }
        // Quants: words 8j..8j + 8 of every row from 8 loads.
        for j in 0..4 {
            let v: [__m256i; 8] = std::array::from_fn(|k| ld(g, QS_AT + 32 * (8 * j + k)));
            let t = transpose8x8_epi32(v);
            for (r, row) in t.iter().enumerate() {
                st(out, at(r) + 16 + 32 * j, *row);
            }
        }
    }
}

/// The transpose of an 8 × 8 matrix of 32-bit words (`v[k]` lane r → result r lane k).
#[inline]
#[target_feature(enable = "avx2")]
fn transpose8x8_epi32(v: [__m256i; 8]) -> [__m256i; 8] {
    // a[2p], a[2p + 1]: the low and high word pairs of v[2p] and v[2p + 1].
    let a: [__m256i; 8] = std::array::from_fn(|i| {
        let (x, y) = (v[i & !1], v[i | 1]);
        if i % 2 == 0 {
            _mm256_unpacklo_epi32(x, y)
        } else {
            _mm256_unpackhi_epi32(x, y)
        }
    });
    // b[0]: rows 0 | 4 of columns 0..4; b[1]: rows 1 | 5; ... (columns 4..8 in b[4..8]): the
    // low and high quadword pairs of a[4g + j] and a[4g + j + 2].
    let b: [__m256i; 8] = std::array::from_fn(|i| {
        let (g, j) = (i / 4, i % 4 / 2);
        let (x, y) = (a[4 * g + j], a[4 * g + j + 2]);
        if i % 2 == 0 {
            _mm256_unpacklo_epi64(x, y)
        } else {
            _mm256_unpackhi_epi64(x, y)
        }
    });
    [
        _mm256_permute2x128_si256::<0x20>(b[0], b[4]),
        _mm256_permute2x128_si256::<0x20>(b[1], b[5]),
        _mm256_permute2x128_si256::<0x20>(b[2], b[6]),
        _mm256_permute2x128_si256::<0x20>(b[3], b[7]),
        _mm256_permute2x128_si256::<0x31>(b[0], b[4]),
        _mm256_permute2x128_si256::<0x31>(b[1], b[5]),
        _mm256_permute2x128_si256::<0x31>(b[2], b[6]),
        _mm256_permute2x128_si256::<0x31>(b[3], b[7]),
    ]
}

/// Bytes `k0` and `k1` of every 32-bit lane as the lane's two i16 (zero-extended).
const fn lane_bytes(k0: u8, k1: u8) -> [u8; 32] {
    let mut c = [0x80u8; 32];
    let mut i = 0;
    while i < 8 {
        let base = 4 * (i as u8 % 4);
        c[4 * i] = base + k0;
        c[4 * i + 2] = base + k1;
        i += 1;
    }
    c
}

/// Sub-block `s % 4`'s scale of each row as an i16 pair (`LANE_BYTE[s % 4]`).
const LANE_BYTE: [[u8; 32]; 4] = [
    lane_bytes(0, 0),
    lane_bytes(1, 1),
    lane_bytes(2, 2),
    lane_bytes(3, 3),
];
/// The mins of sub-blocks 2p, 2p + 1 (`p % 2`) of each row as its two i16.
const LANE_COUPLE: [[u8; 32]; 2] = [lane_bytes(0, 1), lane_bytes(2, 3)];

/// One group of eight interleaved Q4_K rows · one Q8_K token: lane r = row r's result.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn q4_k_r8_group(g: &[u8], x: &[u8]) -> __m256 {
    use crate::quant::rows8::{DMIN_AT, D_AT, GROUP_BLOCK_BYTES, QS_AT, SCALES_AT};
    let m4 = _mm256_set1_epi8(0x0F);
    let (m6, m2) = (_mm256_set1_epi8(0x3F), _mm256_set1_epi8(0x03));
    let mut acc = _mm256_setzero_ps();
    let mut acc_m = _mm256_setzero_ps();
    for (b, xb) in g
        .chunks_exact(GROUP_BLOCK_BYTES)
        .zip(x.chunks_exact(Q8_K_BYTES))
    {
        prefetch_lines::<18>(b, 0);
        let xd = _mm256_set1_ps(f32_at(xb, 0));
        // Lane r: row r's scale bytes (sub-blocks 0..4 and 4..8) and min bytes, as
        // `k4_scales_mins` unpacks one row.
        let (a0, a1, a2) = (
            ld(b, SCALES_AT),
            ld(b, SCALES_AT + 32),
            ld(b, SCALES_AT + 64),
        );
        let top =
            |a: __m256i| _mm256_slli_epi32::<4>(_mm256_and_si256(_mm256_srli_epi32::<6>(a), m2));
        let sc = [
            _mm256_and_si256(a0, m6),
            _mm256_or_si256(_mm256_and_si256(a2, m4), top(a0)),
        ];
        let mn = [
            _mm256_and_si256(a1, m6),
            _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi32::<4>(a2), m4), top(a1)),
        ];
        let mut sum = _mm256_setzero_si256();
        for c in 0..4 {
            let mut lo = _mm256_setzero_si256();
            let mut hi = _mm256_setzero_si256();
            for j in 0..8 {
                let q = ld(b, QS_AT + 32 * (8 * c + j));
                let x_lo = _mm256_set1_epi32(u32_at(xb, Q8_K_QS + 64 * c + 4 * j) as i32);
                let x_hi = _mm256_set1_epi32(u32_at(xb, Q8_K_QS + 64 * c + 32 + 4 * j) as i32);
                lo = _mm256_add_epi16(lo, _mm256_maddubs_epi16(_mm256_and_si256(q, m4), x_lo));
                let q_hi = _mm256_and_si256(_mm256_srli_epi16::<4>(q), m4);
                hi = _mm256_add_epi16(hi, _mm256_maddubs_epi16(q_hi, x_hi));
            }
            // Sub-blocks 2c and 2c + 1: bytes (2c) % 4 and (2c + 1) % 4 of word c / 2.
            let s = sc[c / 2];
            let sc_lo = _mm256_shuffle_epi8(s, cv(&LANE_BYTE[(2 * c) % 4]));
            let sc_hi = _mm256_shuffle_epi8(s, cv(&LANE_BYTE[(2 * c + 1) % 4]));
            sum = _mm256_add_epi32(sum, _mm256_madd_epi16(lo, sc_lo));
            sum = _mm256_add_epi32(sum, _mm256_madd_epi16(hi, sc_hi));
        }
        // Σ min · (sum of the sub-block's 32 quants), the bsums paired per sub-block.
        let q8s = _mm_hadd_epi16(ld128(xb, Q8_K_BSUMS), ld128(xb, Q8_K_BSUMS + 16));
        let mut m = _mm256_setzero_si256();
        for p in 0..4 {
            let mins = _mm256_shuffle_epi8(mn[p / 2], cv(&LANE_COUPLE[p % 2]));
            let pair = _mm256_broadcastd_epi32(match p {
                0 => q8s,
                1 => _mm_srli_si128::<4>(q8s),
                2 => _mm_srli_si128::<8>(q8s),
                _ => _mm_srli_si128::<12>(q8s),
            });
            m = _mm256_add_epi32(m, _mm256_madd_epi16(mins, pair));
        }
        let d = _mm256_cvtph_ps(ld128(b, D_AT));
        let dmin = _mm256_cvtph_ps(ld128(b, DMIN_AT));
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum), _mm256_mul_ps(d, xd), acc);
        acc_m = _mm256_fmadd_ps(_mm256_cvtepi32_ps(m), _mm256_mul_ps(dmin, xd), acc_m);
    }
    _mm256_sub_ps(acc, acc_m)
}

/// Eight Q4_K rows · one Q8_K activation row in CPU_REPACK's GEMV order: as
/// [`q4_k_repack_rows4`], but each super-block's reduction (`reduce8`: lane r = row r) and
/// float steps serve eight rows, the token's bsums are paired once per block for all rows,
/// and the token's quants are read from L1 as memory operands (eight rows' sums take the
/// registers). So its row step is written out rather than calling [`q4_k_block_sums`], which
/// takes the quants preloaded: through it the kernel measured 8.3-13.7 against 11.6-14.8 GiB/s
/// (`kernel_rate/Q4_K/1tok`, alternated). The eight `(d, dmin)` pairs are gathered from the rows: eight 4-byte stores
/// read back as one vector wait for the stores to retire (no store forwarding), which made
/// the kernel slower than four rows at a time. On a Zen 3 core, alternated with the four-row
/// kernel: `kernel_rate/Q4_K/1tok` 14.3-14.8 → 15.0-15.4 GiB/s, `matvec/Q4_K/1t` 11.0-11.6
/// → 11.5-12.3 GiB/s.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn q4_k_repack_rows8(rows: &[u8], rb: usize, x: &[u8]) -> [f32; 8] {
    assert!(rows.len() == 8 * rb && rb <= i32::MAX as usize / 8);
    let w: [&[u8]; 8] = std::array::from_fn(|r| &rows[r * rb..(r + 1) * rb]);
    let offsets = _mm256_mullo_epi32(
        _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
        _mm256_set1_epi32(rb as i32),
    );
    let m4 = _mm256_set1_epi8(0x0F);
    let mut acc = _mm256_setzero_ps();
    let mut acc_m = _mm256_setzero_ps();
    for (i, xb) in x.chunks_exact(Q8_K_BYTES).enumerate() {
        let xd = _mm256_set1_ps(f32_at(xb, 0));
        let q8s = _mm_hadd_epi16(ld128(xb, Q8_K_BSUMS), ld128(xb, Q8_K_BSUMS + 16));
        let mut sums = [_mm256_setzero_si256(); 8];
        let mut prods = [_mm_setzero_si128(); 8];
        for r in 0..8 {
            let wb = &w[r][i * 144..(i + 1) * 144];
            prefetch_span(w[r], i * 144, (i + 1) * 144);
            let (sc, mn) = k4_scales_mins(&wb[4..16]);
            let sc = _mm256_set1_epi64x(sc as i64);
            prods[r] = _mm_madd_epi16(_mm_cvtepu8_epi16(_mm_cvtsi64_si128(mn as i64)), q8s);
            let mut s = [_mm256_setzero_si256(); 2];
            for c in 0..4 {
                let q = ld(wb, 16 + 32 * c);
                let lo = _mm256_and_si256(q, m4);
                let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(q), m4);
                let sc_lo = _mm256_shuffle_epi8(sc, cv(&K4_SCALE[2 * c]));
                let sc_hi = _mm256_shuffle_epi8(sc, cv(&K4_SCALE[2 * c + 1]));
                let x_lo = ld(xb, Q8_K_QS + 64 * c);
                let x_hi = ld(xb, Q8_K_QS + 64 * c + 32);
                let d = k4_quarter_dot([lo, hi], [sc_lo, sc_hi], [x_lo, x_hi]);
                s[c % 2] = _mm256_add_epi32(s[c % 2], d);
            }
            sums[r] = _mm256_add_epi32(s[0], s[1]);
        }
        // Lane r: row r's integer total, and its mins sum (both exact, in any order).
        let total = reduce8(&sums);
        let m = _mm256_set_m128i(
            _mm_hadd_epi32(
                _mm_hadd_epi32(prods[4], prods[5]),
                _mm_hadd_epi32(prods[6], prods[7]),
            ),
            _mm_hadd_epi32(
                _mm_hadd_epi32(prods[0], prods[1]),
                _mm_hadd_epi32(prods[2], prods[3]),
            ),
        );
        // Lanes (d_r, dmin_r) as u32 → d's and dmins' f16 bits packed, then widened.
        // Lane r: the first 4 bytes of row r's super-block i, its (d, dmin) pair.
        // SAFETY: lane r reads the 4 bytes at `rows[r * rb + i * 144]`, inside `rows`: row r's
        // super-block i was sliced (bounds-checked) above.
        let h = unsafe { _mm256_i32gather_epi32::<1>(rows.as_ptr().add(i * 144).cast(), offsets) };
        let packed = _mm256_permute4x64_epi64::<0b11_01_10_00>(_mm256_packus_epi32(
            _mm256_and_si256(h, _mm256_set1_epi32(0xFFFF)),
            _mm256_srli_epi32::<16>(h),
        ));
        let d = _mm256_cvtph_ps(_mm256_castsi256_si128(packed));
        let dmin = _mm256_cvtph_ps(_mm256_extracti128_si256::<1>(packed));
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(total), _mm256_mul_ps(d, xd), acc);
        acc_m = _mm256_fmadd_ps(_mm256_cvtepi32_ps(m), _mm256_mul_ps(dmin, xd), acc_m);
    }
    let mut out = [0.0f32; 8];
    // SAFETY: `out` is 8 writable f32.
    unsafe { _mm256_storeu_ps(out.as_mut_ptr(), _mm256_sub_ps(acc, acc_m)) };
    out
}

// ---------------------------------------------------------------------------------------------
// Q4_K in CPU_REPACK's orders, one weight row × eight tokens at a time, tokens in the lanes.
//
// Both repacked orders are per (row, token) pair: per super-block (GEMV) or per 64-element
// quarter (GEMM) an exact integer sum is converted and added with a scalar FMA. The one-pair
// kernel pays a horizontal sum per pair and step; here a row's unpacked quants serve eight
// tokens, the eight pairs' integer sums are reduced together by one transposing tree into the
// eight lanes of a vector, and lane t then takes exactly the one-pair kernel's float
// operations, so every result keeps its bits.

/// Tokens per tile of [`q4_k_repack_row8`].
const ROW8_TOKENS: usize = 8;

/// Lane p = the wrapping sum of the eight i32 lanes of `v[p]` (exact for the sums here).
#[inline]
#[target_feature(enable = "avx2")]
fn reduce8(v: &[__m256i; 8]) -> __m256i {
    // Each 128-bit half: after two rounds of pairwise adds, element k is v[k] (or v[4 + k]) summed
    // over that half; the two halves are then added lane for lane.
    let h0 = _mm256_hadd_epi32(_mm256_hadd_epi32(v[0], v[1]), _mm256_hadd_epi32(v[2], v[3]));
    let h1 = _mm256_hadd_epi32(_mm256_hadd_epi32(v[4], v[5]), _mm256_hadd_epi32(v[6], v[7]));
    _mm256_add_epi32(
        _mm256_permute2x128_si256::<0x20>(h0, h1),
        _mm256_permute2x128_si256::<0x31>(h0, h1),
    )
}

/// The 8 × 4 transpose of the tokens' mins products (`m[t]`: lane c = quarter c's):
/// result c holds quarter c of token t in lane t.
#[inline]
#[target_feature(enable = "avx2")]
fn quarters_by_token(m: &[__m128i; 8]) -> [__m256i; 4] {
    let a = _mm256_set_m128i(m[4], m[0]);
    let b = _mm256_set_m128i(m[5], m[1]);
    let c = _mm256_set_m128i(m[6], m[2]);
    let d = _mm256_set_m128i(m[7], m[3]);
    let ab_lo = _mm256_unpacklo_epi32(a, b);
    let ab_hi = _mm256_unpackhi_epi32(a, b);
    let cd_lo = _mm256_unpacklo_epi32(c, d);
    let cd_hi = _mm256_unpackhi_epi32(c, d);
    [
        _mm256_unpacklo_epi64(ab_lo, cd_lo),
        _mm256_unpackhi_epi64(ab_lo, cd_lo),
        _mm256_unpacklo_epi64(ab_hi, cd_hi),
        _mm256_unpackhi_epi64(ab_hi, cd_hi),
    ]
}

/// One Q4_K row × eight Q8_K tokens in CPU_REPACK's GEMV order (`GEMM = false`, as
/// [`q4_k_repack_tile`]) or GEMM order (as [`q4_k_repack_gemm_tile`]): lane t of the result
/// is the row · token t, bit for bit.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn q4_k_repack_row8<const GEMM: bool>(w: &[u8], x: &[&[u8]; ROW8_TOKENS]) -> __m256 {
    let mut acc = _mm256_setzero_ps();
    let mut acc_m = _mm256_setzero_ps();
    for (i, wb) in w.chunks_exact(144).enumerate() {
        prefetch_lines::<3>(w, i * 144);
        let xb = token_blocks(x, i, Q8_K_BYTES);
        let (d, dmin) = f16_pair(wb, 0);
        let mut xd = [0.0f32; ROW8_TOKENS];
        for (v, b) in xd.iter_mut().zip(&xb) {
            *v = f32_at(b, 0);
        }
        let xd = load8(&xd);
        let scale = _mm256_mul_ps(_mm256_set1_ps(d), xd);
        let scale_m = _mm256_mul_ps(_mm256_set1_ps(dmin), xd);
        let (sc, mn) = k4_scales_mins(&wb[4..16]);
        let sc = _mm256_set1_epi64x(sc as i64);
        let mins = _mm_cvtepu8_epi16(_mm_cvtsi64_si128(mn as i64));
        let mut sumi = [_mm256_setzero_si256(); ROW8_TOKENS];
        let mut quarter = [_mm256_setzero_si256(); 4];
        for (c, q) in quarter.iter_mut().enumerate() {
            let (lo, hi) = q4k_quants(wb, c);
            let sc_lo = _mm256_shuffle_epi8(sc, cv(&K4_SCALE[2 * c]));
            let sc_hi = _mm256_shuffle_epi8(sc, cv(&K4_SCALE[2 * c + 1]));
            let mut s = [_mm256_setzero_si256(); ROW8_TOKENS];
            for t in 0..ROW8_TOKENS {
                let x_lo = ld(xb[t], Q8_K_QS + 64 * c);
                let x_hi = ld(xb[t], Q8_K_QS + 64 * c + 32);
                let p = k4_quarter_dot([lo, hi], [sc_lo, sc_hi], [x_lo, x_hi]);
                if GEMM {
                    s[t] = p;
                } else {
                    sumi[t] = _mm256_add_epi32(sumi[t], p);
                }
            }
            if GEMM {
                *q = reduce8(&s);
            }
        }
        let mut prods = [_mm_setzero_si128(); ROW8_TOKENS];
        for (p, b) in prods.iter_mut().zip(&xb) {
            *p = k4_min_prod(mins, b);
        }
        let m = quarters_by_token(&prods);
        if GEMM {
            for c in 0..4 {
                acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(quarter[c]), scale, acc);
                acc_m = _mm256_fmadd_ps(_mm256_cvtepi32_ps(m[c]), scale_m, acc_m);
            }
        } else {
            let total_m =
                _mm256_add_epi32(_mm256_add_epi32(m[0], m[1]), _mm256_add_epi32(m[2], m[3]));
            acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(reduce8(&sumi)), scale, acc);
            acc_m = _mm256_fmadd_ps(_mm256_cvtepi32_ps(total_m), scale_m, acc_m);
        }
    }
    _mm256_sub_ps(acc, acc_m)
}

/// One Q6_K row × eight Q8_K tokens in the order of ggml's tiled matmul (as
/// [`q6_k_tiled_tile`]: per super-block `r = d · s1` rounded, then one FMA with the token's
/// scale): lane t of the result is the row · token t, bit for bit.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn q6_k_tiled_row8(w: &[u8], x: &[&[u8]; ROW8_TOKENS]) -> __m256 {
    let mut acc = _mm256_setzero_ps();
    for (i, wb) in w.chunks_exact(210).enumerate() {
        prefetch_lines::<4>(w, i * 210);
        let xb = token_blocks(x, i, Q8_K_BYTES);
        let d = f16_at(wb, 208);
        let scales = _mm256_cvtepi8_epi16(ld128(wb, 192));
        let sc_half = halves(scales);
        let mut sumi = [_mm256_setzero_si256(); ROW8_TOKENS];
        for (half, &sc_h) in sc_half.iter().enumerate() {
            let u = q6k_quants(
                ld(wb, 64 * half),
                ld(wb, 64 * half + 32),
                ld(wb, 128 + 32 * half),
            );
            for (g, ug) in u.into_iter().enumerate() {
                let sc = _mm256_shuffle_epi8(sc_h, cv(&I16_SCALE[g]));
                for t in 0..ROW8_TOKENS {
                    let p = _mm256_maddubs_epi16(ug, ld(xb[t], Q8_K_QS + 128 * half + 32 * g));
                    sumi[t] = _mm256_add_epi32(sumi[t], _mm256_madd_epi16(p, sc));
                }
            }
        }
        // The quants entered as q + 32: 32 Σ x per sub-block comes off (from the bsums).
        let mut xd = [0.0f32; ROW8_TOKENS];
        for t in 0..ROW8_TOKENS {
            let offset = _mm256_madd_epi16(scales, ld(xb[t], Q8_K_BSUMS));
            sumi[t] = _mm256_sub_epi32(sumi[t], _mm256_slli_epi32::<5>(offset));
            xd[t] = f32_at(xb[t], 0);
        }
        let r = _mm256_mul_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(reduce8(&sumi)));
        acc = _mm256_fmadd_ps(r, load8(&xd), acc);
    }
    acc
}

/// What [`row8_tiles`] computes: Q4_K in CPU_REPACK's GEMV or GEMM order, Q6_K in the tiled
/// matmul's.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Row8Order {
    Q4kGemv,
    Q4kGemm,
    Q6kTiled,
}

/// Every row of `w` × the Q8_K tokens of `xs`, `out[r * stride + t]`, each value the bits of
/// the one-row kernel of `order`: eight tokens at a time through a row × eight tokens kernel
/// (a row stays in L1 for all its token groups), the last few (under four) through the
/// one-row kernel. Lengths are checked by `dispatch`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn row8_tiles(order: Row8Order, n: usize, w: &[u8], xs: &[u8], out: &mut [f32], stride: usize) {
    let blocks = n / 256;
    let block_bytes = if order == Row8Order::Q6kTiled {
        210
    } else {
        144
    };
    let (w_row, x_row) = (block_bytes * blocks, Q8_K_BYTES * blocks);
    if w_row == 0 || x_row == 0 {
        return;
    }
    let n_tokens = xs.len() / x_row;
    // Whole tiles, and a last partial one (its missing tokens repeat its last) when it has at
    // least four tokens; fewer go through the one-row kernel.
    let tiled = if n_tokens % ROW8_TOKENS >= 4 {
        n_tokens
    } else {
        n_tokens - n_tokens % ROW8_TOKENS
    };
    for (r, row) in w.chunks_exact(w_row).enumerate() {
        let dst = &mut out[r * stride..r * stride + n_tokens];
        for t0 in (0..tiled).step_by(ROW8_TOKENS) {
            let count = ROW8_TOKENS.min(tiled - t0);
            let mut x: [&[u8]; ROW8_TOKENS] = [&[]; ROW8_TOKENS];
            for (k, xk) in x.iter_mut().enumerate() {
                let t = t0 + k.min(count - 1);
                *xk = &xs[t * x_row..(t + 1) * x_row];
            }
            let v = match order {
                Row8Order::Q4kGemv => q4_k_repack_row8::<false>(row, &x),
                Row8Order::Q4kGemm => q4_k_repack_row8::<true>(row, &x),
                Row8Order::Q6kTiled => q6_k_tiled_row8(row, &x),
            };
            let mut lanes = [0.0f32; ROW8_TOKENS];
            store8(&mut lanes, v);
            dst[t0..t0 + count].copy_from_slice(&lanes[..count]);
        }
        if tiled < n_tokens {
            let (rest, dst) = (&xs[tiled * x_row..], &mut dst[tiled..]);
            match order {
                Row8Order::Q4kGemv => dot_q4_k_repack(n, row, rest, dst),
                Row8Order::Q4kGemm => dot_q4_k_repack_gemm(n, row, rest, dst),
                Row8Order::Q6kTiled => dot_q6_k_tiled(n, row, rest, dst),
            }
        }
    }
}

/// Every Q4_K row of `w` × the Q8_K tokens of `xs` in CPU_REPACK's GEMV (`gemm = false`) or
/// GEMM order, `out[r * stride + t]`, each value the bits of [`dot_q4_k_repack`] (or
/// [`dot_q4_k_repack_gemm`]), through [`q4_k_repack_row8`]. Lengths are checked by
/// `dispatch`.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) fn repack_q4_k_tiles(
    n: usize,
    w: &[u8],
    xs: &[u8],
    out: &mut [f32],
    stride: usize,
    gemm: bool,
) {
    let order = if gemm {
        Row8Order::Q4kGemm
    } else {
        Row8Order::Q4kGemv
    };
    row8_tiles(order, n, w, xs, out, stride);
}

/// Every Q6_K row of `w` × the Q8_K tokens of `xs` in the tiled matmul's order,
/// `out[r * stride + t]`, each value the bits of [`dot_q6_k_tiled`], through
/// [`q6_k_tiled_row8`]. Lengths are checked by `dispatch`.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) fn tiled_q6_k_tiles(n: usize, w: &[u8], xs: &[u8], out: &mut [f32], stride: usize) {
    row8_tiles(Row8Order::Q6kTiled, n, w, xs, out, stride);
}

/// One 64-element quarter of a Q4_K (or Q5_K) super-block · a token's quants: the quarter's
/// low and high 32 unsigned quants `q` times the token's `x`, each 32-element sub-block's
/// products summed and multiplied by its scale (`sc`, as i16 in every lane): eight exact i32
/// lanes. `vpmaddubsw` cannot saturate (quants ≤ 31, |x| ≤ 127).
#[inline]
#[target_feature(enable = "avx2")]
pub(super) fn k4_quarter_dot(q: [__m256i; 2], sc: [__m256i; 2], x: [__m256i; 2]) -> __m256i {
    _mm256_add_epi32(
        _mm256_madd_epi16(_mm256_maddubs_epi16(q[0], x[0]), sc[0]),
        _mm256_madd_epi16(_mm256_maddubs_epi16(q[1], x[1]), sc[1]),
    )
}

#[inline]
#[target_feature(enable = "avx2")]
pub(super) fn q4k_quants(wb: &[u8], c: usize) -> (__m256i, __m256i) {
    let m4 = _mm256_set1_epi8(0x0F);
    let q = ld(wb, 16 + 32 * c);
    (
        _mm256_and_si256(q, m4),
        _mm256_and_si256(_mm256_srli_epi16::<4>(q), m4),
    )
}

#[inline]
#[target_feature(enable = "avx2")]
fn q5k_quants(wb: &[u8], c: usize) -> (__m256i, __m256i) {
    let m4 = _mm256_set1_epi8(0x0F);
    let one = _mm256_set1_epi8(1);
    let q = ld(wb, 48 + 32 * c);
    let qh = ld(wb, 16);
    let bit_lo = _mm256_slli_epi16::<4>(_mm256_and_si256(srl16(qh, 2 * c), one));
    let bit_hi = _mm256_slli_epi16::<4>(_mm256_and_si256(srl16(qh, 2 * c + 1), one));
    (
        _mm256_or_si256(_mm256_and_si256(q, m4), bit_lo),
        _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16::<4>(q), m4), bit_hi),
    )
}

k4_tile!(q4_k_tile_in, 144, 4, q4k_quants, false);
k4_tile!(q5_k_tile_in, 176, 4, q5k_quants, true);

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn q4_k_tile<const B: usize>(w: &[u8], x: [&[u8]; B]) -> [f32; B] {
    q4_k_tile_in::<B, false>(w, x)
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn q4_k_tiled_tile<const B: usize>(w: &[u8], x: [&[u8]; B]) -> [f32; B] {
    q4_k_tile_in::<B, true>(w, x)
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn q5_k_tile<const B: usize>(w: &[u8], x: [&[u8]; B]) -> [f32; B] {
    q5_k_tile_in::<B, false>(w, x)
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn q5_k_tiled_tile<const B: usize>(w: &[u8], x: [&[u8]; B]) -> [f32; B] {
    q5_k_tile_in::<B, true>(w, x)
}

/// Q6_K's four 32-element groups of a half (`ql` bytes 0..32 and 32..64, `qh` 32 bytes).
#[inline]
#[target_feature(enable = "avx2")]
pub(super) fn q6k_quants(ql0: __m256i, ql1: __m256i, qh: __m256i) -> [__m256i; 4] {
    let m15 = _mm256_set1_epi8(15);
    // q + 32 = low four bits | two high bits << 4, in 0..=63; the -32 comes from bsums.
    let h0 = _mm256_slli_epi16::<4>(_mm256_and_si256(qh, _mm256_set1_epi8(0x03)));
    let h1 = _mm256_slli_epi16::<2>(_mm256_and_si256(qh, _mm256_set1_epi8(0x0C)));
    let h2 = _mm256_and_si256(qh, _mm256_set1_epi8(0x30));
    let h3 = _mm256_srli_epi16::<2>(_mm256_and_si256(qh, _mm256_set1_epi8(0xC0u8 as i8)));
    [
        _mm256_or_si256(_mm256_and_si256(ql0, m15), h0),
        _mm256_or_si256(_mm256_and_si256(ql1, m15), h1),
        _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16::<4>(ql0), m15), h2),
        _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16::<4>(ql1), m15), h3),
    ]
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn q6_k_tile<const B: usize>(w: &[u8], x: [&[u8]; B]) -> [f32; B] {
    q6_k_tile_in::<B, false>(w, x)
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn q6_k_tiled_tile<const B: usize>(w: &[u8], x: [&[u8]; B]) -> [f32; B] {
    q6_k_tile_in::<B, true>(w, x)
}

/// Q6_K in `vec_dot`'s order, or in the tiled matmul's when `TILED` (see [`tiled_step`]).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn q6_k_tile_in<const B: usize, const TILED: bool>(w: &[u8], x: [&[u8]; B]) -> [f32; B] {
    let mut acc = [_mm256_setzero_ps(); B];
    let mut tiled = [0.0f32; B];
    for (i, wb) in w.chunks_exact(210).enumerate() {
        prefetch_span(w, i * 210, (i + 1) * 210);
        let d = f16_at(wb, 208);
        let scales = _mm256_cvtepi8_epi16(ld128(wb, 192));
        let sc_half = halves(scales);
        let xb = token_blocks(&x, i, Q8_K_BYTES);
        let mut sumi = [_mm256_setzero_si256(); B];
        for (half, &sc_h) in sc_half.iter().enumerate() {
            let ql0 = ld(wb, 64 * half);
            let ql1 = ld(wb, 64 * half + 32);
            let qh = ld(wb, 128 + 32 * half);
            // q + 32 = low four bits | two high bits << 4, in 0..=63; the -32 comes from bsums.
            let u = q6k_quants(ql0, ql1, qh);
            for (g, ug) in u.into_iter().enumerate() {
                let sc = _mm256_shuffle_epi8(sc_h, cv(&I16_SCALE[g]));
                for t in 0..B {
                    let p = _mm256_maddubs_epi16(ug, ld(xb[t], Q8_K_QS + 128 * half + 32 * g));
                    sumi[t] = _mm256_add_epi32(sumi[t], _mm256_madd_epi16(p, sc));
                }
            }
        }
        for t in 0..B {
            let offset = _mm256_madd_epi16(scales, ld(xb[t], Q8_K_BSUMS));
            let s = _mm256_sub_epi32(sumi[t], _mm256_slli_epi32::<5>(offset));
            if TILED {
                tiled[t] = tiled_step(tiled[t], f32_at(xb[t], 0), d, hsum_epi32(s), None);
                continue;
            }
            acc[t] = fma_acc(acc[t], d * f32_at(xb[t], 0), s);
        }
    }
    if TILED {
        return tiled;
    }
    hsum_each(&acc)
}

// ---------------------------------------------------------------------------------------------
// Activation quantizers, bit-identical to `reference::quantize_row`.

/// Largest |x| over 32 values, ignoring NaN as the reference's `>` comparison does
/// (`max_ps` returns its second operand when the first is NaN, and `m` never is).
#[inline]
#[target_feature(enable = "avx2")]
fn abs_max(v: &[__m256]) -> f32 {
    let sign = _mm256_set1_ps(-0.0);
    let mut m = _mm256_setzero_ps();
    for &x in v {
        m = _mm256_max_ps(_mm256_andnot_ps(sign, x), m);
    }
    let m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps::<1>(m));
    let m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    let m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
    _mm_cvtss_f32(m4)
}

/// Restores element order after the in-lane `packs`/`packus` steps.
#[inline]
#[target_feature(enable = "avx2")]
fn unpack_order(v: __m256i) -> __m256i {
    _mm256_permutevar8x32_epi32(v, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7))
}

/// Q8_0/Q8_1 block: the rounded i32 values (RNE by the default MXCSR mode; NaN and overflow
/// give i32::MIN as in the reference), saturated to i8, plus their wrapping sum.
#[inline]
#[target_feature(enable = "avx2")]
fn q8_legacy_block(xs: &[f32], out_qs: &mut [u8]) -> (f32, i32) {
    let v = [ld_ps(xs, 0), ld_ps(xs, 8), ld_ps(xs, 16), ld_ps(xs, 24)];
    let amax = abs_max(&v);
    let d = amax / 127.0;
    let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
    let mul = _mm256_set1_ps(id);
    let mut i = [_mm256_setzero_si256(); 4];
    for (i, &x) in i.iter_mut().zip(&v) {
        *i = _mm256_cvtps_epi32(_mm256_mul_ps(x, mul));
    }
    let sum = _mm256_add_epi32(_mm256_add_epi32(i[0], i[1]), _mm256_add_epi32(i[2], i[3]));
    let packed = _mm256_packs_epi16(
        _mm256_packs_epi32(i[0], i[1]),
        _mm256_packs_epi32(i[2], i[3]),
    );
    st(out_qs, 0, unpack_order(packed));
    (d, hsum_epi32(sum))
}

/// Q8_0 activation row.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) fn quantize_q8_0(src: &[f32], dst: &mut [u8]) {
    for (xs, out) in src.chunks_exact(32).zip(dst.chunks_exact_mut(Q8_0_BYTES)) {
        let (d, _) = q8_legacy_block(xs, &mut out[2..]);
        out[..2].copy_from_slice(&f16::from_f32(d).to_le_bytes());
    }
}

/// Q8_1 activation row.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) fn quantize_q8_1(src: &[f32], dst: &mut [u8]) {
    for (xs, out) in src.chunks_exact(32).zip(dst.chunks_exact_mut(Q8_1_BYTES)) {
        let (d, sum) = q8_legacy_block(xs, &mut out[4..]);
        out[..2].copy_from_slice(&f16::from_f32(d).to_le_bytes());
        out[2..4].copy_from_slice(&f16::from_f32(d * sum as f32).to_le_bytes());
    }
}

/// Q8_K activation row (`quantize_row_q8_K_ref`).
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) fn quantize_q8_k(src: &[f32], dst: &mut [u8]) {
    let sign = _mm256_set1_ps(-0.0);
    for (xs, out) in src.chunks_exact(256).zip(dst.chunks_exact_mut(Q8_K_BYTES)) {
        let mut m = _mm256_setzero_ps();
        for k in 0..32 {
            m = _mm256_max_ps(_mm256_andnot_ps(sign, ld_ps(xs, 8 * k)), m);
        }
        let amax = abs_max(&[m]);
        if amax == 0.0 {
            out.fill(0);
            continue;
        }
        // The reference keeps the first element of largest magnitude, with its sign.
        let target = _mm256_set1_ps(amax);
        let mut first = 0;
        for k in 0..32 {
            let abs = _mm256_andnot_ps(sign, ld_ps(xs, 8 * k));
            let hits = _mm256_movemask_ps(_mm256_cmp_ps::<_CMP_EQ_OQ>(abs, target));
            if hits != 0 {
                first = 8 * k + hits.trailing_zeros() as usize;
                break;
            }
        }
        let iscale = -127.0 / xs[first];
        let mul = _mm256_set1_ps(iscale);
        // ggml's `nearest_int`: add 1.5·2^23 and read the mantissa, then `MIN(127, ·)` and
        // the C conversion to int8_t, which keeps the low byte.
        let magic = _mm256_set1_ps(12_582_912.0);
        let mantissa = _mm256_set1_epi32(0x007f_ffff);
        let bias = _mm256_set1_epi32(0x0040_0000);
        let low_byte = _mm256_set1_epi32(0xff);
        let cap = _mm256_set1_epi32(127);
        let mut bsums = [0i16; 16];
        for k in 0..8 {
            let mut q = [_mm256_setzero_si256(); 4];
            for (j, q) in q.iter_mut().enumerate() {
                let v = _mm256_add_ps(_mm256_mul_ps(ld_ps(xs, 32 * k + 8 * j), mul), magic);
                let i = _mm256_sub_epi32(_mm256_and_si256(_mm256_castps_si256(v), mantissa), bias);
                *q = _mm256_and_si256(_mm256_min_epi32(i, cap), low_byte);
            }
            let packed = _mm256_packus_epi16(
                _mm256_packus_epi32(q[0], q[1]),
                _mm256_packus_epi32(q[2], q[3]),
            );
            let bytes = unpack_order(packed);
            st(out, Q8_K_QS + 32 * k, bytes);
            // Sums of 8 bytes each, made unsigned by the +128 bias (8·128 per sum).
            let sad = _mm256_sad_epu8(
                _mm256_xor_si256(bytes, _mm256_set1_epi8(-128)),
                _mm256_setzero_si256(),
            );
            let mut lanes = [0i64; 4];
            // SAFETY: `lanes` is 32 writable bytes; `storeu` has no alignment requirement.
            unsafe { _mm256_storeu_si256(lanes.as_mut_ptr().cast(), sad) };
            bsums[2 * k] = (lanes[0] + lanes[1] - 2048) as i16;
            bsums[2 * k + 1] = (lanes[2] + lanes[3] - 2048) as i16;
        }
        out[..4].copy_from_slice(&(1.0 / iscale).to_le_bytes());
        for (dst, s) in out[Q8_K_BSUMS..].chunks_exact_mut(2).zip(bsums) {
            dst.copy_from_slice(&s.to_le_bytes());
        }
    }
}

/// F16 activation row (F16C rounds to nearest even, as `half` and ggml do).
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) fn quantize_f16(src: &[f32], dst: &mut [u8]) {
    let n_main = src.len() / 8 * 8;
    for (k, out) in dst[..2 * n_main].chunks_exact_mut(16).enumerate() {
        let h = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(ld_ps(src, 8 * k));
        // SAFETY: `out` is 16 writable bytes; `storeu` has no alignment requirement.
        unsafe { _mm_storeu_si128(out.as_mut_ptr().cast(), h) };
    }
    for (out, &x) in dst[2 * n_main..].chunks_exact_mut(2).zip(&src[n_main..]) {
        out.copy_from_slice(&f16::from_f32(x).to_le_bytes());
    }
}
