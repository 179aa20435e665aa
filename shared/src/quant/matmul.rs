//! A weight matrix times a batch of activation rows, each weight row read once per batch.
//!
//! [`WeightMatrix`] is a view of a ggml 2-D tensor (`ne = [n_cols, n_rows]`: rows of `n_cols`
//! elements, row-major), usually straight from the mmap. [`Activations`] holds token rows
//! already quantized to the weight's `vec_dot_type`, either by [`Activations::quantize`] or, on
//! the network path, validated by [`Activations::from_bytes`]. [`matmul`] computes
//! `out[token * n_rows + row] = W[row] · x[token]` in parallel over chunks of rows on the
//! current rayon pool (callers install socket-pinned pools), each chunk streaming a contiguous
//! range of weights; with several tokens each weight row goes through
//! [`Kernels::vec_dot_batch`] once per group of tokens, so a batch costs one pass over the
//! weights. Each result is bit for bit the dot product of its row and token in the float order
//! ggml's `MUL_MAT` (or `MUL_MAT_ID`) picks for that weight and batch size (see [`matmul`]),
//! whatever the chunking — or, with a table that has one (`Kernels::has_block_order`, opt-in),
//! in exact-block order for Q8_0 batches.

use std::ops::Range;

use rayon::prelude::*;
use thiserror::Error;

use super::dispatch::{
    BlockTokens, Kernels, PreparedTokens, BLOCK_ORDER_MIN_TOKENS, TILED_MIN_TOKENS,
};
use super::rows8::GROUP_ROWS;
use super::GgmlType;

/// Why a weight matrix or a buffer of activation rows was refused.
#[derive(Debug, Error, PartialEq)]
pub enum MatmulError {
    #[error("{ty}: {n_cols} columns is not a whole number of {block_elems}-element blocks")]
    PartialBlock {
        ty: GgmlType,
        n_cols: usize,
        block_elems: usize,
    },
    #[error("{0} is not a weight type")]
    NotWeightType(GgmlType),
    #[error("Q4_K_R8: {n_rows} rows are not whole groups of 8 (the layout interleaves 8 rows)")]
    PartialGroup { n_rows: usize },
    #[error("{0} is not an activation type (F32, F16, BF16, Q8_0, Q8_1, Q8_K)")]
    NotActivationType(GgmlType),
    #[error("{what}: {got} bytes, want {want}")]
    Length {
        what: &'static str,
        got: usize,
        want: usize,
    },
    #[error("activation row {token}, block {block}: quant -128 (quantizers make -127..=127)")]
    QuantOutOfRange { token: usize, block: usize },
    #[error("activation row {token}, block {block}: bsums[{group}] is {stored}, the quants sum to {actual}")]
    BadBlockSum {
        token: usize,
        block: usize,
        group: usize,
        stored: i16,
        actual: i32,
    },
    #[error("activation row {token}, element or block {index}: non-finite value")]
    NonFinite { token: usize, index: usize },
}

/// A view of a weight matrix: `n_rows` rows of `n_cols` elements of `ty`, row-major.
///
/// The fields are public so that views can be cut cheaply (an expert of a 3-D tensor, a
/// head); [`WeightMatrix::new`] validates, and [`matmul`] checks again (panicking, as that is
/// then a caller bug).
#[derive(Clone, Copy, Debug)]
pub struct WeightMatrix<'a> {
    pub ty: GgmlType,
    pub n_rows: usize,
    pub n_cols: usize,
    pub data: &'a [u8],
}

impl<'a> WeightMatrix<'a> {
    /// Checks that `ty` is a weight type, that `n_cols` is whole blocks and that `data` holds
    /// exactly `n_rows` rows.
    pub fn new(
        ty: GgmlType,
        n_rows: usize,
        n_cols: usize,
        data: &'a [u8],
    ) -> Result<WeightMatrix<'a>, MatmulError> {
        if ty == GgmlType::Q4_K_R8 {
            if !n_rows.is_multiple_of(crate::quant::rows8::GROUP_ROWS) {
                return Err(MatmulError::PartialGroup { n_rows });
            }
        } else if !GgmlType::WEIGHT_TYPES.contains(&ty) {
            return Err(MatmulError::NotWeightType(ty));
        }
        let row_bytes = ty.row_bytes(n_cols).ok_or(MatmulError::PartialBlock {
            ty,
            n_cols,
            block_elems: ty.block_elems(),
        })?;
        let want = row_bytes.checked_mul(n_rows).ok_or(MatmulError::Length {
            what: "weight matrix",
            got: data.len(),
            want: usize::MAX,
        })?;
        if data.len() != want {
            return Err(MatmulError::Length {
                what: "weight matrix",
                got: data.len(),
                want,
            });
        }
        Ok(WeightMatrix {
            ty,
            n_rows,
            n_cols,
            data,
        })
    }

    /// Bytes of one row.
    ///
    /// Panics if `n_cols` is not whole blocks (a view not made by [`WeightMatrix::new`]).
    pub fn row_bytes(&self) -> usize {
        match self.ty.row_bytes(self.n_cols) {
            Some(b) => b,
            None => panic!(
                "weight matrix {}: {} columns is not whole blocks",
                self.ty, self.n_cols
            ),
        }
    }

    /// Row `r`.
    ///
    /// Panics for [`GgmlType::Q4_K_R8`], whose rows are interleaved in groups of 8.
    pub fn row(&self, r: usize) -> &'a [u8] {
        assert!(
            self.ty != GgmlType::Q4_K_R8,
            "weight matrix Q4_K_R8: rows are interleaved in groups of 8"
        );
        let rb = self.row_bytes();
        &self.data[r * rb..(r + 1) * rb]
    }

    /// Panics unless the view is what [`WeightMatrix::new`] accepts.
    fn assert_valid(&self) {
        if let Err(e) = WeightMatrix::new(self.ty, self.n_rows, self.n_cols, self.data) {
            panic!("matmul: invalid weight matrix: {e}");
        }
    }
}

/// Token rows quantized to one activation type, back to back.
#[derive(Clone, Debug, PartialEq)]
pub struct Activations {
    ty: GgmlType,
    n_cols: usize,
    n_tokens: usize,
    // Invariant: `data.len() == n_tokens * ty.row_bytes(n_cols)`, and the rows are as our
    // quantizers make them (checked in `from_bytes`).
    data: Vec<u8>,
}

const ACTIVATION_TYPES: [GgmlType; 6] = [
    GgmlType::F32,
    GgmlType::F16,
    GgmlType::BF16,
    GgmlType::Q8_0,
    GgmlType::Q8_1,
    GgmlType::Q8_K,
];

impl Activations {
    /// Quantizes the token rows of `x` (`n_cols` values each) to `weight_ty.vec_dot_type()`,
    /// the form a weight of `weight_ty` is multiplied with (an activation type stands for
    /// itself).
    ///
    /// Panics if `x.len()` is not a multiple of `n_cols` or `n_cols` is not whole blocks of
    /// that type (caller bugs: the shapes come from a validated model).
    pub fn quantize(
        kernels: &Kernels,
        weight_ty: GgmlType,
        x: &[f32],
        n_cols: usize,
    ) -> Activations {
        let ty = weight_ty.vec_dot_type();
        let Some(row_bytes) = ty.row_bytes(n_cols) else {
            panic!(
                "Activations::quantize: {n_cols} columns is not whole {ty} blocks of {}",
                ty.block_elems()
            )
        };
        let n_tokens = x.len().checked_div(n_cols).unwrap_or(0);
        assert_eq!(
            n_tokens * n_cols,
            x.len(),
            "Activations::quantize: {} values is not whole rows of {n_cols}",
            x.len()
        );
        let mut data = vec![0u8; n_tokens * row_bytes];
        if row_bytes > 0 {
            for (src, dst) in x.chunks_exact(n_cols).zip(data.chunks_exact_mut(row_bytes)) {
                kernels.quantize_row(ty, src, dst);
            }
        }
        Activations {
            ty,
            n_cols,
            n_tokens,
            data,
        }
    }

    /// Takes rows quantized elsewhere (the network path), after checking everything the
    /// kernels rely on: the type, the length, finite scales and values, no -128 quant, and
    /// Q8_K block sums equal to the sums of their quants.
    pub fn from_bytes(
        ty: GgmlType,
        n_cols: usize,
        n_tokens: usize,
        data: Vec<u8>,
    ) -> Result<Activations, MatmulError> {
        if !ACTIVATION_TYPES.contains(&ty) {
            return Err(MatmulError::NotActivationType(ty));
        }
        let row_bytes = ty.row_bytes(n_cols).ok_or(MatmulError::PartialBlock {
            ty,
            n_cols,
            block_elems: ty.block_elems(),
        })?;
        let want = row_bytes.checked_mul(n_tokens).ok_or(MatmulError::Length {
            what: "activation rows",
            got: data.len(),
            want: usize::MAX,
        })?;
        if data.len() != want {
            return Err(MatmulError::Length {
                what: "activation rows",
                got: data.len(),
                want,
            });
        }
        if row_bytes > 0 {
            for (token, row) in data.chunks_exact(row_bytes).enumerate() {
                validate_row(ty, token, row)?;
            }
        }
        Ok(Activations {
            ty,
            n_cols,
            n_tokens,
            data,
        })
    }

    /// The activation type.
    pub fn ty(&self) -> GgmlType {
        self.ty
    }

    /// Values per token row.
    pub fn n_cols(&self) -> usize {
        self.n_cols
    }

    /// Number of token rows.
    pub fn n_tokens(&self) -> usize {
        self.n_tokens
    }

    /// Bytes of one token row.
    pub fn row_bytes(&self) -> usize {
        self.data.len().checked_div(self.n_tokens).unwrap_or(0)
    }

    /// All rows, back to back.
    pub fn data(&self) -> &[u8] {
        &self.data
    }

    /// Token row `t`.
    pub fn row(&self, t: usize) -> &[u8] {
        let rb = self.row_bytes();
        &self.data[t * rb..(t + 1) * rb]
    }

    /// The bytes, e.g. to send them.
    pub fn into_bytes(self) -> Vec<u8> {
        self.data
    }

    /// The rows of `tokens`, in that order (a token may repeat).
    ///
    /// Panics if a token is out of range.
    pub fn gather(&self, tokens: &[usize]) -> Activations {
        let mut data = Vec::with_capacity(tokens.len() * self.row_bytes());
        for &t in tokens {
            assert!(
                t < self.n_tokens,
                "gather: token {t} of {} rows",
                self.n_tokens
            );
            data.extend_from_slice(self.row(t));
        }
        Activations {
            ty: self.ty,
            n_cols: self.n_cols,
            n_tokens: tokens.len(),
            data,
        }
    }
}

fn validate_row(ty: GgmlType, token: usize, row: &[u8]) -> Result<(), MatmulError> {
    let non_finite = |index| MatmulError::NonFinite { token, index };
    let f16_ok = |b: &[u8], at: usize| half::f16::from_le_bytes([b[at], b[at + 1]]).is_finite();
    match ty {
        GgmlType::F32 => {
            for (i, v) in row.chunks_exact(4).enumerate() {
                if !f32::from_le_bytes([v[0], v[1], v[2], v[3]]).is_finite() {
                    return Err(non_finite(i));
                }
            }
        }
        GgmlType::F16 => {
            for (i, _) in row.chunks_exact(2).enumerate() {
                if !f16_ok(row, 2 * i) {
                    return Err(non_finite(i));
                }
            }
        }
        GgmlType::BF16 => {
            for (i, v) in row.chunks_exact(2).enumerate() {
                // All exponent bits set is Inf or NaN.
                if u16::from_le_bytes([v[0], v[1]]) & 0x7f80 == 0x7f80 {
                    return Err(non_finite(i));
                }
            }
        }
        GgmlType::Q8_0 | GgmlType::Q8_1 => {
            let qs_at = if ty == GgmlType::Q8_0 { 2 } else { 4 };
            for (block, b) in row.chunks_exact(ty.block_bytes()).enumerate() {
                if !f16_ok(b, 0) || (ty == GgmlType::Q8_1 && !f16_ok(b, 2)) {
                    return Err(non_finite(block));
                }
                if b[qs_at..].contains(&0x80) {
                    return Err(MatmulError::QuantOutOfRange { token, block });
                }
            }
        }
        GgmlType::Q8_K => {
            for (block, b) in row.chunks_exact(ty.block_bytes()).enumerate() {
                if !f32::from_le_bytes([b[0], b[1], b[2], b[3]]).is_finite() {
                    return Err(non_finite(block));
                }
                let qs = &b[4..260];
                if qs.contains(&0x80) {
                    return Err(MatmulError::QuantOutOfRange { token, block });
                }
                for (group, (q, s)) in qs
                    .chunks_exact(16)
                    .zip(b[260..].chunks_exact(2))
                    .enumerate()
                {
                    let actual: i32 = q.iter().map(|&v| i32::from(v as i8)).sum();
                    let stored = i16::from_le_bytes([s[0], s[1]]);
                    if i32::from(stored) != actual {
                        return Err(MatmulError::BadBlockSum {
                            token,
                            block,
                            group,
                            stored,
                            actual,
                        });
                    }
                }
            }
        }
        other => return Err(MatmulError::NotActivationType(other)),
    }
    Ok(())
}

/// Bytes of weights one parallel task streams at least (when the matrix has enough rows for
/// every thread to get several tasks): large enough that rayon's per-task cost is noise.
const TASK_BYTES: usize = 256 * 1024;

thread_local! {
    /// A task's rows of a Q4_K_R8 matrix de-interleaved, kept between tasks (a fresh
    /// allocation of this size is a fresh mapping, page faults included).
    static PLAIN_ROWS: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Tokens whose activation rows are multiplied with a chunk of weight rows before moving on
/// to the next group: the group's rows stay in L2 while the chunk's weights are reused.
const TOKEN_GROUP: usize = 32;

/// `out[token * n_rows + row] = W[row] · x[token]` for every row and token.
///
/// Panics if the shapes do not fit: `x` must be `w.ty.vec_dot_type()` rows of `w.n_cols`,
/// `out.len()` must be `x.n_tokens() * w.n_rows`.
///
/// The float order is ggml's `MUL_MAT` for a batch of `x.n_tokens()`: the tiled matmul's for
/// Q2_K..Q6_K weights with 8 tokens or more (see [`Kernels::tiled_dot_batch`]), CPU_REPACK's
/// for Q4_K matrices of a multiple of 8 rows, tinyBLAS's for two tokens or more where it
/// applies (see [`Kernels::gemm_dot_batch`]), `vec_dot`'s otherwise.
pub fn matmul(kernels: &Kernels, w: &WeightMatrix<'_>, x: &Activations, out: &mut [f32]) {
    matmul_rows(kernels, w, 0..w.n_rows, x, out);
}

/// Consecutive runs of a batch's token rows that belong to different sequences: each run is
/// computed in the float order it would get alone (ggml picks the order by batch size), while
/// the weights are still streamed once for the whole batch. `None` means one run.
pub type Segments<'a> = Option<&'a [usize]>;

/// [`matmul`] of a batch of several sequences' rows: every run of [`Segments`] gets exactly
/// the result [`matmul`] gives for it alone.
pub fn matmul_segments(
    kernels: &Kernels,
    w: &WeightMatrix<'_>,
    x: &Activations,
    segments: Segments<'_>,
    out: &mut [f32],
) {
    matmul_rows_in(kernels, w, 0..w.n_rows, x, out, true, true, segments);
}

/// [`matmul_vec_dot`] by [`Segments`] (an expert's tokens from several sequences).
pub fn matmul_vec_dot_segments(
    kernels: &Kernels,
    w: &WeightMatrix<'_>,
    x: &Activations,
    segments: Segments<'_>,
    out: &mut [f32],
) {
    matmul_rows_in(kernels, w, 0..w.n_rows, x, out, false, true, segments);
}

/// [`matmul_unrepacked`] by [`Segments`].
pub fn matmul_unrepacked_segments(
    kernels: &Kernels,
    w: &WeightMatrix<'_>,
    x: &Activations,
    segments: Segments<'_>,
    out: &mut [f32],
) {
    matmul_rows_in(kernels, w, 0..w.n_rows, x, out, true, false, segments);
}

/// [`matmul`] for one expert of ggml's `MUL_MAT_ID` (`x` = the tokens routed to it), which
/// never goes through tinyBLAS: `vec_dot`'s order, CPU_REPACK's GEMV order for repacked Q4_K,
/// or the tiled matmul's for other K-quants when 8 tokens or more are routed to the expert.
pub fn matmul_vec_dot(kernels: &Kernels, w: &WeightMatrix<'_>, x: &Activations, out: &mut [f32]) {
    matmul_rows_in(kernels, w, 0..w.n_rows, x, out, false, true, None);
}

/// [`matmul`] for a weight that ggml's CPU_REPACK never takes: a plane of a 3-D tensor under
/// a plain `MUL_MAT` (MLA's per-head `attn_k_b`/`attn_v_b`), as repacking is for 2-D
/// `MUL_MAT` and 3-D `MUL_MAT_ID` weights only. Such a Q4_K matrix keeps `vec_dot`'s order
/// below 8 tokens and takes the tiled matmul's from 8 (`src1->ne[1]` is the token count).
pub fn matmul_unrepacked(
    kernels: &Kernels,
    w: &WeightMatrix<'_>,
    x: &Activations,
    out: &mut [f32],
) {
    matmul_rows_in(kernels, w, 0..w.n_rows, x, out, true, false, None);
}

/// [`matmul`] over the rows `rows` only (an expert slice):
/// `out[token * rows.len() + (row - rows.start)] = W[row] · x[token]`.
///
/// Panics as [`matmul`] does, or if `rows` is not within the matrix.
pub fn matmul_rows(
    kernels: &Kernels,
    w: &WeightMatrix<'_>,
    rows: Range<usize>,
    x: &Activations,
    out: &mut [f32],
) {
    matmul_rows_in(kernels, w, rows, x, out, true, true, None);
}

/// [`matmul_rows`], in tinyBLAS's order for batches of two tokens or more when `gemm`, in
/// CPU_REPACK's order for the types ggml repacks when `may_repack`, and in the tiled matmul's
/// for the other K-quants from [`TILED_MIN_TOKENS`] tokens (a `MUL_MAT`'s `src1->ne[1]`, or a
/// `MUL_MAT_ID` expert's routed rows: `x` is the whole batch in both cases). With
/// `segments`, each run of tokens is ordered as if it were the whole batch.
///
/// Panics if `segments` do not add up to the batch or one of them is empty.
#[allow(clippy::too_many_arguments)]
fn matmul_rows_in(
    kernels: &Kernels,
    w: &WeightMatrix<'_>,
    rows: Range<usize>,
    x: &Activations,
    out: &mut [f32],
    gemm: bool,
    may_repack: bool,
    segments: Segments<'_>,
) {
    w.assert_valid();
    assert!(
        rows.start <= rows.end && rows.end <= w.n_rows,
        "matmul: rows {rows:?} of a {}-row matrix",
        w.n_rows
    );
    assert_eq!(
        x.ty,
        w.ty.vec_dot_type(),
        "matmul: {} activations for {} weights",
        x.ty,
        w.ty
    );
    assert_eq!(
        x.n_cols, w.n_cols,
        "matmul: activations of {} columns for a matrix of {}",
        x.n_cols, w.n_cols
    );
    // Q4_K_R8 is Q4_K in whole groups of 8 rows: the kernels below read it as Q4_K (one
    // token through its own kernel, batches through the Q4_K kernels after de-interleaving).
    let r8 = w.ty == GgmlType::Q4_K_R8;
    assert!(
        !r8 || (rows.start.is_multiple_of(GROUP_ROWS) && rows.end.is_multiple_of(GROUP_ROWS)),
        "matmul: rows {rows:?} of a Q4_K_R8 matrix are not whole groups of 8"
    );
    let n_rows = rows.len();
    let n_tokens = x.n_tokens;
    assert_eq!(
        out.len(),
        n_tokens * n_rows,
        "matmul: output of {} values for {n_tokens} tokens x {n_rows} rows",
        out.len()
    );
    if n_rows == 0 || n_tokens == 0 {
        return;
    }
    let row_bytes = w.row_bytes();
    if row_bytes == 0 {
        out.fill(0.0);
        return;
    }
    let weights = &w.data[rows.start * row_bytes..rows.end * row_bytes];
    let mut rows_per_task = rows_per_task(n_rows, row_bytes);
    if r8 {
        rows_per_task = rows_per_task.next_multiple_of(GROUP_ROWS);
    }
    let ty = if r8 { GgmlType::Q4_K } else { w.ty };
    let n = w.n_cols;
    let x_row = x.row_bytes();
    // ggml's CPU_REPACK takes Q4_K matrices whose row count (per expert) is a multiple of 8.
    let repacked = may_repack && ty == GgmlType::Q4_K && w.n_rows.is_multiple_of(8);
    let whole = [n_tokens];
    let lengths = segments.unwrap_or(&whole);
    assert!(
        lengths.iter().all(|&l| l > 0) && lengths.iter().sum::<usize>() == n_tokens,
        "matmul: segments {lengths:?} for a batch of {n_tokens}"
    );

    // Runs of one-token segments (decoding sequences) all take the one-token order, which is
    // per token: they go through the kernels together, each weight row read once for all.
    // (start, tokens, the batch size that sets their order)
    let mut groups: Vec<(usize, usize, usize)> = Vec::with_capacity(lengths.len());
    let mut start = 0;
    for &len in lengths {
        match groups.last_mut() {
            Some((_, n, 1)) if len == 1 => *n += 1,
            _ => groups.push((start, len, len)),
        }
        start += len;
    }

    // The token rows of the runs that go through the tiles kernels, prepared once for all
    // the tasks: per run, [GEMM part, GEMV part] of a repacked weight, [all] of a tiled one.
    let tiled_tiles = kernels.has_tiled_tiles(ty);
    let prepare =
        |a: usize, b: usize| Some(kernels.prepare_tokens(n, &x.data[a * x_row..b * x_row]));
    // (One token, decode's case, takes the rows kernels and needs none.)
    let prepared: Vec<[Option<PreparedTokens>; 2]> = (groups.iter())
        .filter(|_| n_tokens > 1)
        .map(|&(seg_start, seg_tokens, seg_len)| {
            let seg_end = seg_start + seg_tokens;
            if repacked {
                let n_gemm = seg_start + seg_len - seg_len % 4;
                let split = if gemm {
                    n_gemm.clamp(seg_start, seg_end)
                } else {
                    seg_start
                };
                [prepare(seg_start, split), prepare(split, seg_end)]
            } else if tiled_tiles && seg_len >= TILED_MIN_TOKENS {
                [prepare(seg_start, seg_end), None]
            } else {
                [None, None]
            }
        })
        .collect();

    // The runs that take an exact-block order at this level (Q8_0 on the tile unit, opt-in),
    // their tokens prepared once for all the tasks; none (and no allocation) otherwise.
    let block_prepared: Vec<Option<BlockTokens>> = if n_tokens > 1 && kernels.has_block_order(ty) {
        (groups.iter())
            .map(|&(seg_start, seg_tokens, seg_len)| {
                (seg_len >= BLOCK_ORDER_MIN_TOKENS).then(|| {
                    let xs = &x.data[seg_start * x_row..(seg_start + seg_tokens) * x_row];
                    kernels.prepare_block_tokens(n, xs)
                })
            })
            .collect()
    } else {
        Vec::new()
    };

    // Whether every token takes CPU_REPACK's GEMV order (MUL_MAT_ID, or runs under 4 tokens).
    let all_gemv = !gemm || groups.iter().all(|&(_, _, len)| len < 4);
    // The task on plain rows: weight rows `chunk` into `dst`, laid out row-major
    // (`dst[r * n_tokens + t]`).
    let plain_task = |chunk: &[u8], dst: &mut [f32]| {
        if n_tokens == 1 {
            // One token takes vec_dot's order (CPU_REPACK's GEMV order for a repacked
            // weight) whatever the call: rows go through the kernels several at a time.
            if repacked {
                kernels.repack_dot_rows(ty, n, chunk, &x.data, dst);
            } else {
                kernels.vec_dot_rows(ty, n, chunk, &x.data, dst);
            }
            return;
        }
        for (g, &(seg_start, seg_tokens, seg_len)) in groups.iter().enumerate() {
            let seg_end = seg_start + seg_tokens;
            if let Some(Some(tokens)) = block_prepared.get(g) {
                let xs = &x.data[seg_start * x_row..seg_end * x_row];
                let out = &mut dst[seg_start..];
                kernels.block_dot_tiles(ty, n, chunk, xs, Some(tokens), out, n_tokens);
                continue;
            }
            let prepared = &prepared[g];
            // ggml picks the float order by the (segment's) batch size.
            let n_gemm = seg_start + seg_len - seg_len % 4;
            // ggml_compute_forward_mul_mat_tiled runs first unless the weight is repacked.
            let tiled = !repacked && Kernels::has_tiled_order(ty) && seg_len >= TILED_MIN_TOKENS;
            if !repacked && !tiled && kernels.has_batch_rows(ty) {
                // A per-token order (the legacy quants and Q8_0, batched or not): the task's
                // rows × the tokens in one kernel call, which converts each token's block
                // scales once for all the rows instead of once per row.
                let mut t0 = seg_start;
                while t0 < seg_end {
                    let t1 = (t0 + TOKEN_GROUP).min(seg_end);
                    let xs = &x.data[t0 * x_row..t1 * x_row];
                    kernels.dot_batch_rows(ty, n, chunk, xs, &mut dst[t0..], n_tokens);
                    t0 = t1;
                }
                continue;
            }
            let mut t0 = seg_start;
            while t0 < seg_end {
                // The repacked kernels group the tokens themselves (15 to the lanes of a
                // vector), so they take a segment whole.
                let whole = repacked || (tiled && tiled_tiles);
                let group = if whole { seg_tokens } else { TOKEN_GROUP };
                let t1 = (t0 + group).min(seg_end);
                let xs = &x.data[t0 * x_row..t1 * x_row];
                if repacked {
                    // A 2-D MUL_MAT takes its tokens four at a time through the GEMM kernel
                    // and the rest one at a time through GEMV; MUL_MAT_ID uses GEMV. Both
                    // orders are per (row, token), so the rows × tokens go through in tiles.
                    let split = if gemm { n_gemm.clamp(t0, t1) } else { t0 };
                    let x_split = (split - t0) * x_row;
                    let (xs_gemm, xs_gemv) = xs.split_at(x_split);
                    let [p_gemm, p_gemv] = prepared;
                    kernels.repack_dot_tiles(
                        ty,
                        n,
                        chunk,
                        xs_gemm,
                        p_gemm.as_ref(),
                        &mut dst[t0..],
                        n_tokens,
                        true,
                    );
                    kernels.repack_dot_tiles(
                        ty,
                        n,
                        chunk,
                        xs_gemv,
                        p_gemv.as_ref(),
                        &mut dst[split..],
                        n_tokens,
                        false,
                    );
                    t0 = t1;
                    continue;
                }
                if tiled {
                    let p = prepared[0].as_ref().filter(|_| whole);
                    kernels.tiled_dot_tiles(ty, n, chunk, xs, p, &mut dst[t0..], n_tokens);
                    t0 = t1;
                    continue;
                }
                for (r, w_row) in chunk.chunks_exact(row_bytes).enumerate() {
                    let row_out = &mut dst[r * n_tokens + t0..r * n_tokens + t1];
                    kernels.gemm_dot_batch(
                        ty,
                        n,
                        w_row,
                        xs,
                        row_out,
                        if gemm { seg_len } else { 1 },
                    );
                }
                t0 = t1;
            }
        }
    };

    // One task: a Q4_K_R8 matrix's rows through its own kernels, or de-interleaved.
    let task = |chunk: &[u8], dst: &mut [f32]| {
        if r8 && n_tokens == 1 && repacked {
            kernels.q4_k_r8_dot_rows(n, chunk, &x.data, dst);
            return;
        }
        // GEMV order for every token: the interleaved kernel one token at a time, each group
        // of rows staying in L1 (as fast as the Q4_K tiles kernel at 8 tokens,
        // `kernel_rate/Q4_K_R8/8tok_expert`, and no de-interleaving).
        if r8 && repacked && all_gemv {
            kernels.q4_k_r8_dot_tokens(n, chunk, &x.data, dst, n_tokens);
            return;
        }
        // Any other use of interleaved rows reads them as the plain Q4_K rows they hold: the
        // same bytes, so the same results as the unconverted file.
        if r8 {
            PLAIN_ROWS.with(|buf| {
                let mut buf = buf.borrow_mut();
                buf.resize(chunk.len(), 0);
                let group = GROUP_ROWS * row_bytes;
                for (g, p) in chunk.chunks_exact(group).zip(buf.chunks_exact_mut(group)) {
                    kernels.q4_k_r8_deinterleave(g, p);
                }
                plain_task(&buf, dst);
            });
        } else {
            plain_task(chunk, dst);
        }
    };

    if n_tokens == 1 {
        // Row-major and token-major coincide: write straight into `out`.
        run_chunks(
            weights,
            row_bytes * rows_per_task,
            out,
            rows_per_task,
            &task,
        );
        return;
    }
    let mut by_row = vec![0.0f32; n_rows * n_tokens];
    run_chunks(
        weights,
        row_bytes * rows_per_task,
        &mut by_row,
        rows_per_task * n_tokens,
        &task,
    );
    // To token-major order in blocks of 16 rows: each token's 16 values are one cache line
    // of `out`, and the 16 rows being read stay in cache across the tokens.
    for (b, block) in by_row.chunks(16 * n_tokens).enumerate() {
        let r0 = 16 * b;
        let rows = block.len() / n_tokens;
        for t in 0..n_tokens {
            let dst = &mut out[t * n_rows + r0..t * n_rows + r0 + rows];
            for (r, d) in dst.iter_mut().enumerate() {
                *d = block[r * n_tokens + t];
            }
        }
    }
}

/// Runs `task` on matching chunks of `weights` and `dst`, in parallel unless there is only
/// one chunk.
fn run_chunks(
    weights: &[u8],
    weight_chunk: usize,
    dst: &mut [f32],
    dst_chunk: usize,
    task: &(impl Fn(&[u8], &mut [f32]) + Sync),
) {
    if weights.len() <= weight_chunk {
        crate::profile::work(|| task(weights, dst));
        return;
    }
    if crate::parallel::is_serial() {
        for (w, d) in weights.chunks(weight_chunk).zip(dst.chunks_mut(dst_chunk)) {
            crate::profile::work(|| task(w, d));
        }
        return;
    }
    weights
        .par_chunks(weight_chunk)
        .zip(dst.par_chunks_mut(dst_chunk))
        .for_each(|(w, d)| crate::profile::work(|| task(w, d)));
}

/// Weights below which a task is not worth splitting further (a few microseconds of work).
const MIN_TASK_BYTES: usize = 32 * 1024;

/// Rows per task: [`TASK_BYTES`] of weights, but small enough that each thread of the current
/// pool gets about four tasks (for balance), and never under [`MIN_TASK_BYTES`] or one row.
fn rows_per_task(n_rows: usize, row_bytes: usize) -> usize {
    let by_bytes = TASK_BYTES.div_ceil(row_bytes);
    let by_balance = n_rows.div_ceil(4 * crate::parallel::threads());
    let floor = MIN_TASK_BYTES.div_ceil(row_bytes);
    by_bytes.min(by_balance).max(floor).max(1)
}
