//! AMX-INT8 kernels (Sapphire Rapids and later): Q4_K rows × Q8_K tokens in CPU_REPACK's
//! orders on the tile unit, bit for bit the values of the AVX-512 lanes kernels.
//!
//! One `tdpbusd` multiplies a tile of 16 rows × 64 unsigned bytes by 64 × 16 signed bytes
//! (kept as 16 rows of 16 groups of four: the tokens' quants exactly as
//! `avx512::TokenLanes` rearranges them, without the +128) into 16 × 16 exact i32 sums: 16
//! weight rows × 16 tokens × one quarter (64 elements) of a super-block: 16 384 products in
//! about 16 cycles, where `vpdpbusd` does 64 per cycle.
//!
//! The sub-block scales must weigh each sub-block's sum before they are added, and a scale
//! times a quant does not fit a byte (63 · 15). So each row's quants are multiplied by the
//! low four bits of their scale (≤ 15 · 15) and, in a second tile, by the high two (≤ 15 · 3),
//! once per row for all the token groups; `C_lo + 16 · C_hi` is then Σ scale · quant · x over
//! the quarter, the same integer the lanes kernels sum, and the float steps after it are
//! theirs. (A byte times a small scale fits the byte, so `vpmullw` on the packed bytes,
//! multiplying both bytes of each word by the same scale, makes them without unpacking.)
//!
//! Linux hands the tile state to a process only when asked (`arch_prctl`), which
//! [`available`] does once; `dispatch` offers this level only then. Each kernel call loads
//! the tile configuration and releases the tiles when it returns ([`TileSession`]).

use std::arch::asm;
use std::arch::x86_64::*;
use std::marker::PhantomData;
use std::sync::OnceLock;

use super::avx2::{f16_pair, k4_scales_mins, ld, prefetch_span, Q8_K_BYTES};
use super::avx512::{
    ld_lanes_f, ld_lanes_i, repack_few_tokens, store_tokens, LaneGroups, Lanes, TokenLanes,
    K4_SCALE512,
};

/// Tokens from which a group of tokens goes to the tile unit rather than to the AVX-512
/// few-token kernel: a 768 × 2048 matrix × 4 tokens took 217 µs here against 157, × 6 tokens
/// about the same, × 8 tokens half (the weight tiles cost as much for one token as for 16).
pub(crate) const TILE_MIN_TOKENS: usize = 6;

/// Weight rows per tile.
const TILE_ROWS: usize = 16;

/// Whether this process may use AMX-INT8: the CPU has AMX-TILE and AMX-INT8 (CPUID leaf 7,
/// EDX bits 24 and 25) and Linux granted the tile data state. Asked once per process.
pub(crate) fn available() -> bool {
    static GRANTED: OnceLock<bool> = OnceLock::new();
    *GRANTED.get_or_init(|| {
        // (Leaf 7 is answered on every x86-64 CPU, with zeros where it has no such leaf.)
        let leaf = __cpuid_count(7, 0);
        let amx = (1 << 24) | (1 << 25);
        // (Every AMX CPU has BMI2, which the kernels also use.)
        leaf.edx & amx == amx && is_x86_feature_detected!("bmi2") && request_tile_data()
    })
}

#[cfg(target_os = "linux")]
fn request_tile_data() -> bool {
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: this `arch_prctl` only asks that the process may use the tile data state; it
    // passes no memory. It fails (non-zero) where the kernel or the hypervisor withholds it.
    unsafe {
        libc::syscall(
            libc::SYS_arch_prctl,
            ARCH_REQ_XCOMP_PERM,
            XFEATURE_XTILEDATA,
        ) == 0
    }
}

#[cfg(not(target_os = "linux"))]
fn request_tile_data() -> bool {
    false
}

/// A tile configuration (palette 1): each tile's rows and bytes per row.
#[repr(C, align(64))]
struct TileConfig([u8; 64]);

impl TileConfig {
    /// Tiles `0..8` with `shapes[t]` = (rows, bytes per row).
    fn new(shapes: [(u8, u16); 8]) -> TileConfig {
        let mut cfg = [0u8; 64];
        cfg[0] = 1;
        for (t, (rows, bytes)) in shapes.into_iter().enumerate() {
            cfg[16 + 2 * t..18 + 2 * t].copy_from_slice(&bytes.to_le_bytes());
            cfg[48 + t] = rows;
        }
        TileConfig(cfg)
    }

    /// Tile `t`'s (rows, bytes per row).
    fn shape(&self, t: u8) -> (usize, usize) {
        let t = usize::from(t);
        let bytes = u16::from_le_bytes([self.0[16 + 2 * t], self.0[17 + 2 * t]]);
        (usize::from(self.0[48 + t]), usize::from(bytes))
    }
}

/// The tiles loaded with a [`TileConfig`] on this thread, released on drop. Holding one is
/// what makes the tile operations below sound (each checks its memory against the tile's
/// configured shape); it stays on its thread (the tiles are per thread).
struct TileSession {
    shapes: [(usize, usize); 8],
    _thread: PhantomData<*const ()>,
}

impl TileSession {
    /// # Safety
    /// [`available`] returned true (the process holds the tile data permission) and the CPU
    /// has AMX-TILE and AMX-INT8.
    unsafe fn start(cfg: &TileConfig) -> TileSession {
        // SAFETY: `cfg` is a valid 64-byte palette-1 configuration (at most 16 rows of at
        // most 64 bytes per tile); the caller guarantees the CPU and the OS allow the tiles.
        unsafe { asm!("ldtilecfg [{}]", in(reg) cfg.0.as_ptr(), options(nostack, readonly)) };
        TileSession {
            shapes: std::array::from_fn(|t| cfg.shape(t as u8)),
            _thread: PhantomData,
        }
    }

    /// Zeroes tile `T`.
    #[inline(always)]
    fn zero<const T: u8>(&self) {
        // SAFETY: the tiles are configured (`self` exists); no memory is touched.
        unsafe { asm!("tilezero tmm{t}", t = const T, options(nostack, nomem)) };
    }

    /// Loads tile `T` from consecutive 64-byte rows.
    #[inline(always)]
    fn load<const T: u8>(&self, rows: &[Lanes<u32>]) {
        let (n_rows, bytes) = self.shapes[usize::from(T)];
        assert!(
            bytes <= 64 && n_rows <= rows.len(),
            "tile {T}: {n_rows} rows"
        );
        // SAFETY: the tiles are configured; `rows` holds the tile's rows (at most 64 bytes
        // each) at a stride of 64 (asserted above).
        unsafe {
            asm!(
                "tileloadd tmm{t}, [{p} + {s} * 1]",
                t = const T,
                p = in(reg) rows.as_ptr(),
                s = in(reg) 64usize,
                options(nostack, readonly)
            )
        };
    }

    /// Loads tile `T` from rows `stride` bytes apart starting at `bytes[0]`.
    #[inline(always)]
    fn load_strided<const T: u8>(&self, bytes: &[u8], stride: usize) {
        let (n_rows, width) = self.shapes[usize::from(T)];
        assert!(
            n_rows > 0 && bytes.len() >= (n_rows - 1) * stride + width,
            "tile {T}: {} bytes for {n_rows} rows of {width} at a stride of {stride}",
            bytes.len()
        );
        // SAFETY: the tiles are configured; every row the tile reads lies in `bytes`
        // (asserted above).
        unsafe {
            asm!(
                "tileloadd tmm{t}, [{p} + {s} * 1]",
                t = const T,
                p = in(reg) bytes.as_ptr(),
                s = in(reg) stride,
                options(nostack, readonly)
            )
        };
    }

    /// `C += A · B` over unsigned bytes of A and signed bytes of B, in i32.
    #[inline(always)]
    fn dpbusd<const C: u8, const A: u8, const B: u8>(&self) {
        // SAFETY: the tiles are configured; no memory is touched.
        unsafe {
            asm!(
                "tdpbusd tmm{c}, tmm{a}, tmm{b}",
                c = const C,
                a = const A,
                b = const B,
                options(nostack, nomem)
            )
        };
    }

    /// `C += A · B` over signed bytes of both, in i32.
    #[inline(always)]
    fn dpbssd<const C: u8, const A: u8, const B: u8>(&self) {
        // SAFETY: the tiles are configured; no memory is touched.
        unsafe {
            asm!(
                "tdpbssd tmm{c}, tmm{a}, tmm{b}",
                c = const C,
                a = const A,
                b = const B,
                options(nostack, nomem)
            )
        };
    }

    /// Stores tile `T` (16 rows of 16 i32).
    #[inline(always)]
    fn store<const T: u8>(&self, rows: &mut [Lanes<i32>; 16]) {
        let (n_rows, bytes) = self.shapes[usize::from(T)];
        assert!(
            n_rows <= 16 && bytes <= 64,
            "tile {T}: {n_rows} rows of {bytes}"
        );
        // SAFETY: the tiles are configured; `rows` is 16 writable rows of 64 bytes at a stride
        // of 64, at least the tile's shape (asserted above).
        unsafe {
            asm!(
                "tilestored [{p} + {s} * 1], tmm{t}",
                t = const T,
                p = in(reg) rows.as_mut_ptr(),
                s = in(reg) 64usize,
                options(nostack)
            )
        };
    }
}

impl Drop for TileSession {
    fn drop(&mut self) {
        // SAFETY: releasing configured tiles returns them to their initial state.
        unsafe { asm!("tilerelease", options(nostack, nomem)) };
    }
}

// The tiles: the two accumulators (quants times the low and the high scale bits), the two
// weight tiles, the tokens.
const C_LO: u8 = 0;
const C_HI: u8 = 1;
const A_LO: u8 = 2;
const A_HI: u8 = 3;
const B: u8 = 4;

/// One super-block of 16 Q4_K rows made into left-hand tiles.
#[repr(C, align(64))]
struct BlockTiles {
    /// Quarter `c`, half `h` (0: quants × low scale bits, 1: × high bits): the 16 rows of
    /// the tile at `16 * (2 * c + h)`.
    quants: [Lanes<u32>; 128],
    /// Each row's `d`.
    d: [f32; TILE_ROWS],
    /// Each row's `dmin`.
    dmin: [f32; TILE_ROWS],
    /// Row `r`, quarter `c`: the i16 pair of mins (sub-blocks `2c`, `2c + 1`) that
    /// multiplies the tokens' bsum pairs.
    mins: [[u32; 4]; TILE_ROWS],
}

impl BlockTiles {
    fn new() -> Box<BlockTiles> {
        Box::new(BlockTiles {
            quants: [Lanes([0; 16]); 128],
            d: [0.0; TILE_ROWS],
            dmin: [0.0; TILE_ROWS],
            mins: [[0; 4]; TILE_ROWS],
        })
    }

    /// Fills the tiles from super-block `i` of `rows` (whole Q4_K rows).
    #[target_feature(enable = "avx2,bmi2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    fn fill(&mut self, rows: &[&[u8]; TILE_ROWS], i: usize) {
        let m4 = _mm512_set1_epi8(0x0F);
        let m4w = _mm512_set1_epi16(0x0F);
        let patterns = K4_SCALE512.map(|p| load_pattern(&p));
        let wo = i * 144;
        for (r, row) in rows.iter().enumerate() {
            prefetch_span(row, wo, wo + 144);
            let b: &[u8; 144] = row[wo..wo + 144].try_into().expect("whole blocks");
            (self.d[r], self.dmin[r]) = f16_pair(b, 0);
            let (sc, mn) = k4_scales_mins(&b[4..16]);
            // Mins bytes m0..m7 as the i16 pairs (m0, m1), (m2, m3), ...
            let (p01, p23) = (
                _pdep_u64(mn, 0x00FF_00FF_00FF_00FF),
                _pdep_u64(mn >> 32, 0x00FF_00FF_00FF_00FF),
            );
            self.mins[r] = [
                p01 as u32,
                (p01 >> 32) as u32,
                p23 as u32,
                (p23 >> 32) as u32,
            ];
            let scv = _mm512_set1_epi64(sc as i64);
            let quants = &mut self.quants;
            for (c, pattern) in patterns.iter().enumerate() {
                // Quarter c's quants as bytes in element order: the 32 low nibbles
                // (sub-block 2c), then the 32 high ones (2c + 1).
                let q = _mm512_broadcast_i64x4(ld(b, 16 + 32 * c));
                let q = _mm512_and_si512(_mm512_mask_srli_epi16::<4>(q, 0xFFFF_0000, q), m4);
                // Each word: its sub-block's scale, split into bits 0..4 and 4..6. Both bytes
                // of a word times a scale of at most 15: each product (≤ 225) stays in its
                // byte.
                let s = _mm512_shuffle_epi8(scv, *pattern);
                let lo = _mm512_mullo_epi16(q, _mm512_and_si512(s, m4w));
                let hi = _mm512_mullo_epi16(q, _mm512_srli_epi16::<4>(s));
                for (h, v) in [lo, hi].into_iter().enumerate() {
                    let dst = &mut quants[(16 * (2 * c + h) + r) % 128].0;
                    // SAFETY: `dst` is 64 writable, aligned bytes.
                    unsafe { _mm512_store_si512(dst.as_mut_ptr().cast(), v) };
                }
            }
        }
    }
}

#[inline]
#[target_feature(enable = "avx512f")]
fn load_pattern(p: &[u8; 64]) -> __m512i {
    // SAFETY: `p` is 64 readable bytes; `loadu` has no alignment requirement.
    unsafe { _mm512_loadu_si512(p.as_ptr().cast()) }
}

/// The i32 results of the two accumulator tiles.
#[derive(Clone, Copy)]
struct Sums {
    lo: [Lanes<i32>; 16],
    hi: [Lanes<i32>; 16],
}

impl Sums {
    const ZERO: Sums = Sums {
        lo: [Lanes([0; 16]); 16],
        hi: [Lanes([0; 16]); 16],
    };

    /// Row r's `lo + 16 · hi`: its scaled sum from the two halves of its scales.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn row(&self, r: usize) -> __m512i {
        // SAFETY: both are 64 readable, aligned bytes.
        let (lo, hi) = unsafe {
            (
                _mm512_load_si512(self.lo[r].0.as_ptr().cast()),
                _mm512_load_si512(self.hi[r].0.as_ptr().cast()),
            )
        };
        _mm512_add_epi32(lo, _mm512_slli_epi32::<4>(hi))
    }
}

/// Float accumulators of 16 rows × one token group: the products and the mins terms,
/// subtracted at the end.
#[derive(Clone, Copy)]
struct Acc {
    sums: [__m512; TILE_ROWS],
    mins: [__m512; TILE_ROWS],
}

/// Starts quarter `c` (or, `None`, all four) of super-block `i` of the rows of `bt` × the
/// tokens of `x` on the tile unit, into zeroed accumulators; [`TileSession::store`] waits
/// for the result, so the cores can do other work in between.
#[inline]
fn start_block(tiles: &TileSession, bt: &BlockTiles, i: usize, x: &TokenLanes, c: Option<usize>) {
    tiles.zero::<C_LO>();
    tiles.zero::<C_HI>();
    let quarters = match c {
        Some(c) => c..c + 1,
        None => 0..4,
    };
    for c in quarters {
        tiles.load::<A_LO>(&bt.quants[32 * c..]);
        tiles.load::<A_HI>(&bt.quants[32 * c + 16..]);
        tiles.load::<B>(&x.quants[64 * i + 16 * c..]);
        tiles.dpbusd::<C_LO, A_LO, B>();
        tiles.dpbusd::<C_HI, A_HI, B>();
    }
}

/// Stores the accumulators into `sums`.
#[inline]
fn finish_block(tiles: &TileSession, sums: &mut Sums) {
    tiles.store::<C_LO>(&mut sums.lo);
    tiles.store::<C_HI>(&mut sums.hi);
}

/// Adds one super-block's integer sums (`sums`, of all four quarters in the GEMV order, of
/// quarter `c` in the GEMM order) to `acc` with the float steps of
/// `avx512::q4_k_lanes_rows`: `xd` the tokens' scales, `bsums` their bsum pairs.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
fn add_block(
    bt: &BlockTiles,
    sums: &Sums,
    xd: __m512,
    bsums: &[__m512i; 4],
    quarter: Option<usize>,
    acc: &mut Acc,
) {
    for r in 0..TILE_ROWS {
        // Σ over the quarters of mins pair · bsum pair (exact, in any order).
        let m = match quarter {
            Some(c) => {
                let pair = _mm512_set1_epi32(bt.mins[r][c] as i32);
                _mm512_dpwssd_epi32(_mm512_setzero_si512(), bsums[c], pair)
            }
            None => {
                let mut m = _mm512_setzero_si512();
                for (b, &pair) in bsums.iter().zip(&bt.mins[r]) {
                    m = _mm512_dpwssd_epi32(m, *b, _mm512_set1_epi32(pair as i32));
                }
                m
            }
        };
        let scale = _mm512_mul_ps(_mm512_set1_ps(bt.d[r]), xd);
        let scale_m = _mm512_mul_ps(_mm512_set1_ps(bt.dmin[r]), xd);
        let total = _mm512_cvtepi32_ps(sums.row(r));
        acc.sums[r] = _mm512_fmadd_ps(total, scale, acc.sums[r]);
        acc.mins[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(m), scale_m, acc.mins[r]);
    }
}

/// Q4_K rows × Q8_K tokens in CPU_REPACK's GEMV order (`gemm = false`, each value as
/// `avx2::dot_q4_k_repack` gives it) or GEMM order (as `avx2::dot_q4_k_repack_gemm`):
/// `out[r * stride + t]`. The token groups of `groups` (raw, `avx512::raw_groups`) go
/// through the tile unit, 16 rows at a time, the rest through the AVX-512 few-token kernel.
///
/// # Safety
/// [`available`] returned true. `w` is whole rows of `n` elements, `xs` whole Q8_K rows of
/// `n`, `groups` was made from `xs`, and `out` holds every `r * stride + t` (checked by
/// `dispatch`).
#[target_feature(enable = "avx2,bmi2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
pub(crate) unsafe fn repack_q4_k(
    n: usize,
    w: &[u8],
    xs: &[u8],
    groups: &LaneGroups,
    out: &mut [f32],
    stride: usize,
    gemm: bool,
) {
    let n_blocks = n / 256;
    let w_row = n_blocks * 144;
    let x_row = n_blocks * Q8_K_BYTES;
    if w_row == 0 || xs.is_empty() {
        return;
    }
    let n_tokens = xs.len() / x_row;
    if !groups.groups.is_empty() {
        // SAFETY: the caller guarantees `available()`.
        let tiles = unsafe { TileSession::start(&TileConfig::new([(16, 64); 8])) };
        // Two blocks of weight tiles: the cores fill the next while the tile unit multiplies.
        let mut bts = [BlockTiles::new(), BlockTiles::new()];
        let mut sums = Sums::ZERO;
        let zero = Acc {
            sums: [_mm512_setzero_ps(); TILE_ROWS],
            mins: [_mm512_setzero_ps(); TILE_ROWS],
        };
        let mut accs = vec![zero; groups.groups.len()];
        // In the GEMV order one pass per super-block, in the GEMM order one per quarter.
        let passes: &[Option<usize>] = if gemm {
            &[Some(0), Some(1), Some(2), Some(3)]
        } else {
            &[None]
        };
        let n_rows = w.len() / w_row;
        for r0 in (0..n_rows).step_by(TILE_ROWS) {
            // The last tile repeats the last row and drops its values.
            let rows: [&[u8]; TILE_ROWS] = std::array::from_fn(|k| {
                let r = (r0 + k).min(n_rows - 1);
                &w[r * w_row..(r + 1) * w_row]
            });
            accs.fill(zero);
            bts[0].fill(&rows, 0);
            for i in 0..n_blocks {
                let [a, b] = &mut bts;
                let (bt, next) = if i % 2 == 0 { (a, b) } else { (b, a) };
                let mut first = true;
                for (g, (_, _, x)) in groups.groups.iter().enumerate() {
                    let xd = ld_lanes_f(&x.scales[i]);
                    let bsums = std::array::from_fn(|c| ld_lanes_i(&x.bsums[4 * i + c]));
                    for &quarter in passes {
                        start_block(&tiles, bt, i, x, quarter);
                        if first && i + 1 < n_blocks {
                            next.fill(&rows, i + 1);
                        }
                        first = false;
                        finish_block(&tiles, &mut sums);
                        add_block(bt, &sums, xd, &bsums, quarter, &mut accs[g]);
                    }
                }
            }
            for ((t0, tt, _), acc) in groups.groups.iter().zip(&accs) {
                for k in 0..TILE_ROWS.min(n_rows - r0) {
                    let v = _mm512_sub_ps(acc.sums[k], acc.mins[k]);
                    store_tokens(v, &mut out[(r0 + k) * stride + t0..], *tt);
                }
            }
        }
    }
    let t0 = groups.rest;
    if t0 < n_tokens {
        repack_few_tokens(n, w, &xs[t0 * x_row..], &mut out[t0..], stride, gemm);
    }
}

// ---------------------------------------------------------------------------------------------
// Q8_0 rows × Q8_0 tokens in exact-block order.
//
// ggml's Q8_0 dot products add each block's products in eight lanes of four and convert each
// lane to float on its own; the tile unit's sums are whole blocks, so it cannot keep that
// order. Its order is `reference::vec_dot_blocks`: each block's integer sum exact, then
// `r = d_w · f32(sum)` and `acc = fma(r, d_x, acc)` block after block, one chain per row and
// token, whatever the tile or the group. A `tdpbssd` over one block (32 bytes) makes 16 rows ×
// 16 tokens of those sums straight from the weights in the file (the left-hand tile reads each
// row's block at the row stride: no copy, no rearranging); while the cores convert one
// block's sums the tile unit multiplies the next.

/// Tokens per right-hand tile.
const TILE_TOKENS: usize = 16;

/// Q8_0 bytes per block (f16 scale, 32 quants).
const Q8_0_BYTES: usize = 34;

/// Q8_0 token rows as the tile unit's right-hand tiles: per group of 16 tokens (the last
/// padded with zeros) and block, 8 rows of the 16 tokens' quants four by four, and the
/// tokens' scales.
pub(crate) struct Q8_0Tokens {
    /// `(first token, tokens)` of each group.
    groups: Vec<(usize, usize)>,
    /// Group `g`, block `b`, quants `4k..4k + 4`: `quants[(g * n_blocks + b) * 8 + k]`,
    /// lane `t` = token `t`'s four quants.
    quants: Vec<Lanes<u32>>,
    /// Group `g`, block `b`: lane `t` = token `t`'s `d`.
    scales: Vec<Lanes<f32>>,
}

impl Q8_0Tokens {
    /// Rearranges the Q8_0 rows `xs` of `n` elements (whole rows; checked by `dispatch`).
    pub(crate) fn new(n: usize, xs: &[u8]) -> Q8_0Tokens {
        let n_blocks = n / 32;
        let x_row = n_blocks * Q8_0_BYTES;
        let n_tokens = xs.len().checked_div(x_row).unwrap_or(0);
        let groups: Vec<(usize, usize)> = (0..n_tokens)
            .step_by(TILE_TOKENS)
            .map(|t0| (t0, (n_tokens - t0).min(TILE_TOKENS)))
            .collect();
        let mut quants = vec![Lanes([0u32; 16]); groups.len() * n_blocks * 8];
        let mut scales = vec![Lanes([0.0f32; 16]); groups.len() * n_blocks];
        for (g, &(t0, tt)) in groups.iter().enumerate() {
            for t in 0..tt {
                let row = &xs[(t0 + t) * x_row..(t0 + t + 1) * x_row];
                for (b, block) in row.chunks_exact(Q8_0_BYTES).enumerate() {
                    let at = g * n_blocks + b;
                    scales[at].0[t] = half::f16::from_le_bytes([block[0], block[1]]).to_f32();
                    for (k, q) in block[2..].chunks_exact(4).enumerate() {
                        quants[at * 8 + k].0[t] = u32::from_le_bytes([q[0], q[1], q[2], q[3]]);
                    }
                }
            }
        }
        Q8_0Tokens {
            groups,
            quants,
            scales,
        }
    }
}

// The tiles of the Q8_0 kernel: two of each, the tile unit working on one block while the
// cores read the other's sums.
const Q8_C: [u8; 2] = [0, 1];
const Q8_A: [u8; 2] = [2, 3];
const Q8_B: [u8; 2] = [4, 5];

/// The Q8_0 kernel's shapes: sums 16 × 16 i32, weights 16 rows × one block, tokens 8 rows
/// of 16 tokens × four quants.
fn q8_0_config() -> TileConfig {
    let (sums, weights, tokens) = ((16, 64), (16, 32), (8, 64));
    TileConfig::new([sums, sums, weights, weights, tokens, tokens, (0, 0), (0, 0)])
}

/// Starts block `b` of 16 rows (`rows`: their bytes from the row's start, `w_row` apart) ×
/// the tokens' tile `x` on buffer `k` (0 or 1).
#[inline(always)]
fn start_q8_0(
    tiles: &TileSession,
    k: usize,
    rows: &[u8],
    w_row: usize,
    b: usize,
    x: &[Lanes<u32>],
) {
    let a = &rows[b * Q8_0_BYTES + 2..];
    if k == 0 {
        tiles.zero::<{ Q8_C[0] }>();
        tiles.load_strided::<{ Q8_A[0] }>(a, w_row);
        tiles.load::<{ Q8_B[0] }>(x);
        tiles.dpbssd::<{ Q8_C[0] }, { Q8_A[0] }, { Q8_B[0] }>();
    } else {
        tiles.zero::<{ Q8_C[1] }>();
        tiles.load_strided::<{ Q8_A[1] }>(a, w_row);
        tiles.load::<{ Q8_B[1] }>(x);
        tiles.dpbssd::<{ Q8_C[1] }, { Q8_A[1] }, { Q8_B[1] }>();
    }
}

/// Adds block `b`'s integer sums of 16 rows × 16 tokens to `acc`: `acc = fma(d_w · f32(sum),
/// d_x, acc)`.
#[inline]
#[target_feature(enable = "avx512f")]
fn add_q8_0_block(
    sums: &[Lanes<i32>; 16],
    dw: &[f32],
    b: usize,
    xd: &Lanes<f32>,
    acc: &mut [__m512; TILE_ROWS],
) {
    let d_x = ld_lanes_f(xd);
    let d_w = &dw[b * TILE_ROWS..(b + 1) * TILE_ROWS];
    for (r, a) in acc.iter_mut().enumerate() {
        // SAFETY: `sums[r]` is 64 readable, aligned bytes.
        let sum = unsafe { _mm512_load_si512(sums[r].0.as_ptr().cast()) };
        let v = _mm512_mul_ps(_mm512_set1_ps(d_w[r]), _mm512_cvtepi32_ps(sum));
        *a = _mm512_fmadd_ps(v, d_x, *a);
    }
}

/// Q8_0 rows (`w`) × the tokens `x` in exact-block order: `out[r * stride + t]`.
///
/// # Safety
/// [`available`] returned true. `w` is whole rows of `n` elements, `x` was made from Q8_0
/// rows of `n`, and `out` holds every `r * stride + t` (checked by `dispatch`).
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
pub(crate) unsafe fn q8_0_blocks(
    n: usize,
    w: &[u8],
    x: &Q8_0Tokens,
    out: &mut [f32],
    stride: usize,
) {
    let n_blocks = n / 32;
    let w_row = n_blocks * Q8_0_BYTES;
    if w_row == 0 || x.groups.is_empty() {
        return;
    }
    let n_rows = w.len() / w_row;
    // SAFETY: the caller guarantees `available()`.
    let tiles = unsafe { TileSession::start(&q8_0_config()) };
    // Block b, row r: the row's d.
    let mut dw = vec![0.0f32; n_blocks * TILE_ROWS];
    let mut sums = [[Lanes([0i32; 16]); 16]; 2];
    let mut tail = Vec::new();
    for r0 in (0..n_rows).step_by(TILE_ROWS) {
        let n_valid = (n_rows - r0).min(TILE_ROWS);
        // The last tile repeats the last row and drops its values.
        let rows: &[u8] = if n_valid == TILE_ROWS {
            &w[r0 * w_row..(r0 + TILE_ROWS) * w_row]
        } else {
            tail.clear();
            for k in 0..TILE_ROWS {
                let r = (r0 + k).min(n_rows - 1);
                tail.extend_from_slice(&w[r * w_row..(r + 1) * w_row]);
            }
            &tail
        };
        for (r, row) in rows.chunks_exact(w_row).enumerate() {
            for (b, block) in row.chunks_exact(Q8_0_BYTES).enumerate() {
                dw[b * TILE_ROWS + r] = half::f16::from_le_bytes([block[0], block[1]]).to_f32();
            }
        }
        for (g, &(t0, tt)) in x.groups.iter().enumerate() {
            let xq = &x.quants[g * n_blocks * 8..(g + 1) * n_blocks * 8];
            let xd = &x.scales[g * n_blocks..(g + 1) * n_blocks];
            let mut acc = [_mm512_setzero_ps(); TILE_ROWS];
            // Three blocks in flight: the tile unit multiplies block b + 1 while block b's
            // sums are stored and block b - 1's, stored an iteration ago, are added.
            start_q8_0(&tiles, 0, rows, w_row, 0, xq);
            for b in 0..=n_blocks {
                let k = b % 2;
                if b + 1 < n_blocks {
                    start_q8_0(&tiles, 1 - k, rows, w_row, b + 1, &xq[8 * (b + 1)..]);
                }
                if b < n_blocks {
                    if k == 0 {
                        tiles.store::<{ Q8_C[0] }>(&mut sums[0]);
                    } else {
                        tiles.store::<{ Q8_C[1] }>(&mut sums[1]);
                    }
                }
                if b > 0 {
                    add_q8_0_block(&sums[1 - k], &dw, b - 1, &xd[b - 1], &mut acc);
                }
            }
            for (r, a) in acc.iter().enumerate().take(n_valid) {
                store_tokens(*a, &mut out[(r0 + r) * stride + t0..], tt);
            }
        }
    }
}
