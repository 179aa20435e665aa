//! Property tests of every SIMD level this host supports against the scalar reference:
//! dot products (single and batched), activation quantizers and the matmul.
//!
//! Dot products sum the same integers as the reference and differ only in the order of their
//! f32 operations. Each such operation rounds by at most ε (f32::EPSILON/2 relative) of a
//! value bounded by Σ|terms| (the sum of the absolute values of every product that enters the
//! result), and a lane accumulates at most one value per block (per 16 elements for the float
//! types) plus a fixed number of final additions. So both results lie within
//! `(steps + c)·ε·Σ|terms|` of the exact value, and the tests allow twice that between them.
//! Quantizers must match byte for byte; batched dot products must match single ones bit for bit.

use proptest::prelude::*;

use super::dispatch::{Isa, Kernels, PreparedTokens, BLOCK_ORDER_MIN_TOKENS, TILED_MIN_TOKENS};
use super::matmul::{
    matmul, matmul_rows, matmul_segments, matmul_unrepacked, matmul_unrepacked_segments,
    matmul_vec_dot, matmul_vec_dot_segments, Activations, WeightMatrix,
};
use super::{reference, GgmlType};

/// A small deterministic generator, so a failing case is reproduced by its seed.
struct Rng(crate::rng::SplitMix64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0.next_u64()
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f32 {
        self.0.next_f32()
    }

    /// Uniform in [-1, 1).
    fn signed(&mut self) -> f32 {
        2.0 * self.unit() - 1.0
    }

    /// Magnitudes spread over several decades, both signs.
    fn activation(&mut self) -> f32 {
        let decade = (self.next_u64() % 4) as i32 - 2;
        self.signed() * 10f32.powi(decade)
    }

    /// A realistic weight scale: |d| in [1e-5, 1e-1), either sign.
    fn scale(&mut self) -> f32 {
        let magnitude = 10f32.powf(-5.0 + 4.0 * self.unit());
        if self.next_u64() & 1 == 0 {
            magnitude
        } else {
            -magnitude
        }
    }
}

/// Byte offsets of the f16 scale fields of a block: (`d`-like fields, `m`/`dmin` fields).
fn scale_fields(ty: GgmlType) -> (&'static [usize], &'static [usize]) {
    match ty {
        GgmlType::Q4_0 | GgmlType::Q5_0 | GgmlType::Q8_0 => (&[0], &[]),
        GgmlType::Q4_1 | GgmlType::Q5_1 => (&[0], &[2]),
        GgmlType::Q2_K => (&[80], &[82]),
        GgmlType::Q3_K => (&[108], &[]),
        GgmlType::Q4_K | GgmlType::Q5_K => (&[0], &[2]),
        GgmlType::Q6_K => (&[208], &[]),
        _ => (&[], &[]),
    }
}

/// A weight row of `n` elements: random quant bytes with random finite f16 scales, or random
/// floats for the float types.
fn random_weights(rng: &mut Rng, ty: GgmlType, n: usize) -> Vec<u8> {
    let bytes = ty.row_bytes(n).expect("whole blocks");
    match ty {
        GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => {
            let values: Vec<f32> = (0..n).map(|_| rng.signed()).collect();
            let mut out = vec![0u8; bytes];
            reference::quantize_row(ty, &values, &mut out);
            out
        }
        _ => {
            let mut out: Vec<u8> = (0..bytes).map(|_| rng.next_u64() as u8).collect();
            let (ds, ms) = scale_fields(ty);
            for block in out.chunks_exact_mut(ty.block_bytes()) {
                for &at in ds.iter().chain(ms) {
                    let h = half::f16::from_f32(rng.scale());
                    block[at..at + 2].copy_from_slice(&h.to_le_bytes());
                }
            }
            out
        }
    }
}

/// `n_tokens` activation rows, each quantized by the reference to `ty.vec_dot_type()`.
fn random_activations(rng: &mut Rng, ty: GgmlType, n: usize, n_tokens: usize) -> Vec<u8> {
    let x_ty = ty.vec_dot_type();
    let row = x_ty.row_bytes(n).expect("whole blocks");
    let mut out = vec![0u8; row * n_tokens];
    for dst in out.chunks_exact_mut(row) {
        let values: Vec<f32> = (0..n).map(|_| rng.activation()).collect();
        reference::quantize_row(x_ty, &values, dst);
    }
    out
}

/// Σ|terms| of a dot product: every product the kernels add, in absolute value (the scale
/// part and the min part of each weight separately, since the kernels sum them separately).
fn abs_terms(ty: GgmlType, n: usize, w: &[u8], x: &[u8]) -> f64 {
    let mut xf = vec![0.0f32; n];
    reference::dequantize_row(ty.vec_dot_type(), x, &mut xf);
    let dequant_abs_dot = |w: &[u8]| {
        let mut wf = vec![0.0f32; n];
        reference::dequantize_row(ty, w, &mut wf);
        wf.iter()
            .zip(&xf)
            .map(|(&a, &b)| (f64::from(a) * f64::from(b)).abs())
            .sum::<f64>()
    };
    let (ds, ms) = scale_fields(ty);
    if ms.is_empty() {
        return dequant_abs_dot(w);
    }
    let with_zeroed = |fields: &[usize]| {
        let mut copy = w.to_vec();
        for block in copy.chunks_exact_mut(ty.block_bytes()) {
            for &at in fields {
                block[at..at + 2].fill(0);
            }
        }
        copy
    };
    let scale_part = dequant_abs_dot(&with_zeroed(ms));
    let min_part = match ty {
        // Q4_1/Q5_1 add m·s per block, with s the activation's stored d·Σq.
        GgmlType::Q4_1 | GgmlType::Q5_1 => w
            .chunks_exact(ty.block_bytes())
            .zip(x.chunks_exact(GgmlType::Q8_1.block_bytes()))
            .map(|(wb, xb)| {
                let m = half::f16::from_le_bytes([wb[2], wb[3]]).to_f64();
                let s = half::f16::from_le_bytes([xb[2], xb[3]]).to_f64();
                (m * s).abs()
            })
            .sum(),
        _ => dequant_abs_dot(&with_zeroed(ds)),
    };
    scale_part + min_part
}

/// The largest allowed |simd - reference| (see the module comment).
fn tolerance(ty: GgmlType, n: usize, w: &[u8], x: &[u8]) -> f64 {
    let steps = if ty.block_elems() == 1 {
        n / 16 + 24
    } else {
        n / ty.block_elems() + 16
    };
    2.0 * steps as f64 * f64::from(f32::EPSILON) * abs_terms(ty, n, w, x)
}

fn simd_levels() -> Vec<&'static Kernels> {
    Kernels::supported()
        .into_iter()
        .filter(|k| k.level() != Isa::Scalar)
        .collect()
}

/// Block counts: the edges 1, 2, 3, 5, 7 and a few longer rows.
fn n_blocks() -> impl Strategy<Value = usize> {
    prop_oneof![prop::sample::select(vec![1usize, 2, 3, 5, 7]), 8usize..=40]
}

fn check_dot(ty: GgmlType, n_blocks: usize, batch: usize, seed: u64) -> Result<(), TestCaseError> {
    let mut rng = Rng(crate::rng::SplitMix64::new(seed));
    let n = n_blocks * ty.block_elems();
    let w = random_weights(&mut rng, ty, n);
    let xs = random_activations(&mut rng, ty, n, batch);
    let x_row = xs.len() / batch;
    // The SIMD levels share their f32 operations, so they agree bit for bit.
    let mut first_level: Option<(&str, Vec<f32>)> = None;
    for kernels in simd_levels() {
        let mut batched = vec![f32::NAN; batch];
        kernels.vec_dot_batch(ty, n, &w, &xs, &mut batched);
        // The batched (tinyBLAS) order: within tolerance too, and a token's value does not
        // depend on which tile of the batch computes it.
        let mut gemm = vec![f32::NAN; batch];
        kernels.gemm_dot_batch(ty, n, &w, &xs, &mut gemm, batch.max(2));
        // Q4_K's repacked orders (ggml's GEMV and GEMM kernels) are held to the same tolerance.
        let mut repack = vec![f32::NAN; batch];
        let mut repack_gemm = vec![f32::NAN; batch];
        // The tiled matmul's order: bit for bit the scalar definition of that order.
        let tiled_ty = Kernels::has_tiled_order(ty);
        let mut tiled = vec![f32::NAN; batch];
        if tiled_ty {
            kernels.tiled_dot_batch(ty, n, &w, &xs, &mut tiled);
        }
        if ty == GgmlType::Q4_K {
            kernels.repack_dot_batch(ty, n, &w, &xs, &mut repack, false);
            kernels.repack_dot_batch(ty, n, &w, &xs, &mut repack_gemm, true);
        }
        for (t, x) in xs.chunks_exact(x_row).enumerate() {
            let single = kernels.vec_dot(ty, n, &w, x);
            let want = reference::vec_dot(ty, n, &w, x);
            let tol = tolerance(ty, n, &w, x);
            let mut orders = vec![("vec_dot", single), ("gemm", gemm[t])];
            if ty == GgmlType::Q4_K {
                orders.push(("repack", repack[t]));
                orders.push(("repack gemm", repack_gemm[t]));
            }
            if tiled_ty {
                orders.push(("tiled", tiled[t]));
                let tiled_want = reference::vec_dot_tiled(ty, n, &w, x);
                prop_assert_eq!(
                    tiled[t].to_bits(),
                    tiled_want.to_bits(),
                    "{} {} tiled token {}: simd {} scalar {}",
                    kernels.isa(),
                    ty,
                    t,
                    tiled[t],
                    tiled_want
                );
                // A token's value does not depend on the tile (or batch) computing it.
                let mut alone = [f32::NAN];
                kernels.tiled_dot_batch(ty, n, &w, x, &mut alone);
                prop_assert_eq!(
                    alone[0].to_bits(),
                    tiled[t].to_bits(),
                    "{} {} tiled tile",
                    kernels.isa(),
                    ty
                );
            }
            for (order, got) in orders {
                let diff = (f64::from(got) - f64::from(want)).abs();
                prop_assert!(
                    diff <= tol,
                    "{} {ty} n={n} token {t} ({order}): simd {got} reference {want} (diff {diff:e}, tol {tol:e})",
                    kernels.isa()
                );
            }
            let mut alone = [f32::NAN];
            kernels.gemm_dot_batch(ty, n, &w, x, &mut alone, batch.max(2));
            prop_assert_eq!(
                alone[0].to_bits(),
                gemm[t].to_bits(),
                "{} {} gemm tile",
                kernels.isa(),
                ty
            );
            prop_assert_eq!(
                batched[t].to_bits(),
                single.to_bits(),
                "{} {} batch of {}: token {} differs from the single dot",
                kernels.isa(),
                ty,
                batch,
                t
            );
        }
        match &first_level {
            None => first_level = Some((kernels.isa(), batched)),
            Some((isa, values)) => {
                let same = values
                    .iter()
                    .zip(&batched)
                    .all(|(a, b)| a.to_bits() == b.to_bits());
                prop_assert!(
                    same,
                    "{} {ty} differs from {isa}: {batched:?} vs {values:?}",
                    kernels.isa()
                );
            }
        }
    }
    Ok(())
}

/// `8 · groups` random Q4_K rows of `n_blocks` super-blocks, plain and interleaved by eight
/// (`Q4_K_R8`), with the generator to go on with and the row length `n`.
fn r8_matrix(seed: u64, n_blocks: usize, groups: usize) -> (Rng, usize, Vec<u8>, Vec<u8>) {
    let ty = GgmlType::Q4_K;
    let mut rng = Rng(crate::rng::SplitMix64::new(seed));
    let n = n_blocks * ty.block_elems();
    let plain: Vec<u8> = (0..8 * groups)
        .flat_map(|_| random_weights(&mut rng, ty, n))
        .collect();
    let mut interleaved = plain.clone();
    super::rows8::interleave_matrix(&mut interleaved, ty.row_bytes(n).unwrap_or(0));
    (rng, n, plain, interleaved)
}

/// `n_rows` random rows of `ty` times one activation row through the rows kernels
/// (`repack`: CPU_REPACK's GEMV order) equal the one-row kernel of that order, bit for bit.
fn check_rows(
    ty: GgmlType,
    n_blocks: usize,
    n_rows: usize,
    seed: u64,
    repack: bool,
) -> Result<(), TestCaseError> {
    let mut rng = Rng(crate::rng::SplitMix64::new(seed));
    let n = n_blocks * ty.block_elems();
    let w: Vec<u8> = (0..n_rows)
        .flat_map(|_| random_weights(&mut rng, ty, n))
        .collect();
    let x = random_activations(&mut rng, ty, n, 1);
    let row_bytes = w.len() / n_rows;
    for kernels in Kernels::supported() {
        let mut got = vec![f32::NAN; n_rows];
        if repack {
            kernels.repack_dot_rows(ty, n, &w, &x, &mut got);
        } else {
            kernels.vec_dot_rows(ty, n, &w, &x, &mut got);
        }
        for (r, row) in w.chunks_exact(row_bytes).enumerate() {
            let mut want = [f32::NAN];
            if repack {
                kernels.repack_dot_batch(ty, n, row, &x, &mut want, false);
            } else {
                want[0] = kernels.vec_dot(ty, n, row, &x);
            }
            prop_assert_eq!(
                got[r].to_bits(),
                want[0].to_bits(),
                "{} {} (repack {}): row {} of {}: {} vs {}",
                kernels.isa(),
                ty,
                repack,
                r,
                n_rows,
                got[r],
                want[0]
            );
        }
    }
    Ok(())
}

/// Rows × tokens of `ty` through a tiles kernel (`tiles(kernels, ty, n, w, xs, prepared, out,
/// stride)`) equal each row's one-row kernel (`one(kernels, ty, n, row, xs, out)`) bit for bit, at
/// every level, with and without tokens prepared beforehand; the padding between rows is left
/// alone.
type TilesFn =
    fn(&Kernels, GgmlType, usize, &[u8], &[u8], Option<&PreparedTokens>, &mut [f32], usize);
type OneRowFn = fn(&Kernels, GgmlType, usize, &[u8], &[u8], &mut [f32]);

fn check_tiles(
    ty: GgmlType,
    n_blocks: usize,
    n_rows: usize,
    batch: usize,
    seed: u64,
    tiles: TilesFn,
    one: OneRowFn,
) -> Result<(), TestCaseError> {
    let mut rng = Rng(crate::rng::SplitMix64::new(seed));
    let n = n_blocks * ty.block_elems();
    let w: Vec<u8> = (0..n_rows)
        .flat_map(|_| random_weights(&mut rng, ty, n))
        .collect();
    let xs = random_activations(&mut rng, ty, n, batch);
    let row_bytes = w.len() / n_rows;
    let stride = batch + 3;
    for kernels in Kernels::supported() {
        let mut got = vec![f32::NAN; n_rows * stride];
        tiles(kernels, ty, n, &w, &xs, None, &mut got, stride);
        let prepared = kernels.prepare_tokens(n, &xs);
        let mut got_prepared = vec![f32::NAN; n_rows * stride];
        tiles(
            kernels,
            ty,
            n,
            &w,
            &xs,
            Some(&prepared),
            &mut got_prepared,
            stride,
        );
        prop_assert_eq!(
            got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            got_prepared.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            "{} {}: prepared tokens give other values",
            kernels.isa(),
            ty
        );
        for (r, row) in w.chunks_exact(row_bytes).enumerate() {
            let mut want = vec![f32::NAN; batch];
            one(kernels, ty, n, row, &xs, &mut want);
            for t in 0..batch {
                prop_assert_eq!(
                    got[r * stride + t].to_bits(),
                    want[t].to_bits(),
                    "{} {}: row {} of {}, token {} of {}: {} vs {}",
                    kernels.isa(),
                    ty,
                    r,
                    n_rows,
                    t,
                    batch,
                    got[r * stride + t],
                    want[t]
                );
            }
            for pad in &got[r * stride + batch..(r + 1) * stride] {
                prop_assert!(pad.is_nan(), "{}: padding written", kernels.isa());
            }
        }
    }
    Ok(())
}

/// Several weight rows times several tokens (`dot_batch_rows`) equal each row's
/// `vec_dot_batch`, bit for bit, at every level; the padding between rows is left alone.
fn check_batch_rows(
    ty: GgmlType,
    n_blocks: usize,
    n_rows: usize,
    batch: usize,
    pad: usize,
    seed: u64,
) -> Result<(), TestCaseError> {
    let mut rng = Rng(crate::rng::SplitMix64::new(seed));
    let n = n_blocks * ty.block_elems();
    let w: Vec<u8> = (0..n_rows)
        .flat_map(|_| random_weights(&mut rng, ty, n))
        .collect();
    let xs = random_activations(&mut rng, ty, n, batch);
    let row_bytes = w.len() / n_rows;
    let stride = batch + pad;
    for kernels in Kernels::supported() {
        let mut got = vec![-7.0f32; (n_rows - 1) * stride + batch];
        kernels.dot_batch_rows(ty, n, &w, &xs, &mut got, stride);
        for (r, row) in w.chunks_exact(row_bytes).enumerate() {
            let mut want = vec![f32::NAN; batch];
            kernels.vec_dot_batch(ty, n, row, &xs, &mut want);
            for t in 0..batch {
                prop_assert_eq!(
                    got[r * stride + t].to_bits(),
                    want[t].to_bits(),
                    "{} {}: row {} token {} of {}x{}",
                    kernels.isa(),
                    ty,
                    r,
                    t,
                    n_rows,
                    batch
                );
            }
            if r + 1 < n_rows {
                prop_assert!(got[r * stride + batch..(r + 1) * stride]
                    .iter()
                    .all(|&v| v == -7.0));
            }
        }
    }
    Ok(())
}

fn check_block_tiles(
    n_blocks: usize,
    n_rows: usize,
    batch: usize,
    seed: u64,
) -> Result<(), TestCaseError> {
    let ty = GgmlType::Q8_0;
    let mut rng = Rng(crate::rng::SplitMix64::new(seed));
    let n = n_blocks * 32;
    let w: Vec<u8> = (0..n_rows)
        .flat_map(|_| random_weights(&mut rng, ty, n))
        .collect();
    let xs = random_activations(&mut rng, ty, n, batch);
    let (row_bytes, x_row) = (w.len() / n_rows, xs.len() / batch);
    let stride = batch + 3;
    for kernels in Kernels::supported() {
        let mut got = vec![-7.0f32; n_rows * stride];
        kernels.block_dot_tiles(ty, n, &w, &xs, None, &mut got, stride);
        let prepared = kernels.prepare_block_tokens(n, &xs);
        let mut got_prepared = vec![-7.0f32; n_rows * stride];
        kernels.block_dot_tiles(ty, n, &w, &xs, Some(&prepared), &mut got_prepared, stride);
        prop_assert_eq!(
            got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            got_prepared.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            "{}: prepared tokens give other values",
            kernels.isa()
        );
        for (r, row) in w.chunks_exact(row_bytes).enumerate() {
            for (t, x) in xs.chunks_exact(x_row).enumerate() {
                let want = reference::vec_dot_blocks(ty, n, row, x);
                prop_assert_eq!(
                    got[r * stride + t].to_bits(),
                    want.to_bits(),
                    "{}: row {} token {} of {}x{}",
                    kernels.isa(),
                    r,
                    t,
                    n_rows,
                    batch
                );
                // ggml's order sums the same integers: both within the rounding bound.
                let ggml = reference::vec_dot(ty, n, row, x);
                let bound = 2.0
                    * (n_blocks + 4) as f64
                    * f64::from(f32::EPSILON)
                    * abs_terms(ty, n, row, x);
                prop_assert!(
                    (f64::from(want) - f64::from(ggml)).abs() <= bound,
                    "row {} token {}: {} vs ggml's {} (bound {})",
                    r,
                    t,
                    want,
                    ggml,
                    bound
                );
            }
            // The gaps between a row's tokens are left alone.
            prop_assert!(got[r * stride + batch..(r + 1) * stride]
                .iter()
                .all(|&v| v == -7.0));
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn batch_rows_equal_vec_dot_batch(
        ty in prop::sample::select(GgmlType::WEIGHT_TYPES.to_vec()),
        n_blocks in n_blocks(),
        n_rows in 1usize..=5,
        batch in 1usize..=19,
        pad in 0usize..=3,
        seed in any::<u64>(),
    ) {
        check_batch_rows(ty, n_blocks, n_rows, batch, pad, seed)?;
    }

    /// Q8_0 (the prompt's hottest batched kernel for Q8_0 models) over more rows and tokens.
    #[test]
    fn q8_0_batch_rows_equal_vec_dot_batch(
        n_blocks in n_blocks(),
        n_rows in 1usize..=7,
        batch in 1usize..=40,
        pad in 0usize..=3,
        seed in any::<u64>(),
    ) {
        check_batch_rows(GgmlType::Q8_0, n_blocks, n_rows, batch, pad, seed)?;
    }

    #[test]
    fn dot_matches_reference(
        ty in prop::sample::select(GgmlType::WEIGHT_TYPES.to_vec()),
        n_blocks in n_blocks(),
        batch in 1usize..=9,
        seed in any::<u64>(),
    ) {
        check_dot(ty, n_blocks, batch, seed)?;
    }

    /// Several rows against one activation row (the one-token matvec path) give each row's
    /// `vec_dot` bit for bit, at every level, for every row count around the kernels' tile.
    #[test]
    fn dot_rows_equal_vec_dot(
        ty in prop::sample::select(GgmlType::WEIGHT_TYPES.to_vec()),
        n_blocks in n_blocks(),
        n_rows in 1usize..=11,
        seed in any::<u64>(),
    ) {
        check_rows(ty, n_blocks, n_rows, seed, false)?;
    }

    /// Q4_K rows in CPU_REPACK's GEMV order against one activation row give each row's
    /// `repack_dot_batch` (GEMV) bit for bit, at every level.
    #[test]
    fn repack_rows_equal_repack_gemv(
        n_blocks in 1usize..=12,
        n_rows in 1usize..=11,
        seed in any::<u64>(),
    ) {
        check_rows(GgmlType::Q4_K, n_blocks, n_rows, seed, true)?;
    }

    /// Groups of eight interleaved Q4_K rows (the `Q4_K_R8` layout a converted file holds)
    /// give the plain rows' CPU_REPACK GEMV results bit for bit, at every level.
    #[test]
    fn q4_k_r8_rows_equal_repack_gemv(
        n_blocks in 1usize..=12,
        groups in 1usize..=3,
        seed in any::<u64>(),
    ) {
        let ty = GgmlType::Q4_K;
        let (mut rng, n, plain, interleaved) = r8_matrix(seed, n_blocks, groups);
        let n_rows = 8 * groups;
        let x = random_activations(&mut rng, ty, n, 1);
        for kernels in Kernels::supported() {
            let mut want = vec![f32::NAN; n_rows];
            kernels.repack_dot_rows(ty, n, &plain, &x, &mut want);
            let mut got = vec![f32::NAN; n_rows];
            kernels.q4_k_r8_dot_rows(n, &interleaved, &x, &mut got);
            for r in 0..n_rows {
                prop_assert_eq!(
                    got[r].to_bits(),
                    want[r].to_bits(),
                    "{}: row {} of {}: {} vs {}",
                    kernels.isa(),
                    r,
                    n_rows,
                    got[r],
                    want[r]
                );
            }
        }
    }

    /// The vector de-interleaving gives the scalar one's bytes, at every level.
    #[test]
    fn q4_k_r8_deinterleave_equals_scalar(n_blocks in 1usize..=5, seed in any::<u64>()) {
        let mut rng = Rng(crate::rng::SplitMix64::new(seed));
        let group: Vec<u8> = (0..n_blocks * super::rows8::GROUP_BLOCK_BYTES)
            .map(|_| rng.next_u64() as u8)
            .collect();
        let mut want = vec![0u8; group.len()];
        super::rows8::deinterleave(&group, &mut want);
        for kernels in Kernels::supported() {
            let mut got = vec![0u8; group.len()];
            kernels.q4_k_r8_deinterleave(&group, &mut got);
            prop_assert!(got == want, "{}", kernels.isa());
        }
    }

    /// A Q4_K_R8 matrix (the plain matrix interleaved) gives the plain matrix's products bit
    /// for bit through every matmul entry point, for one token and for batches, and for
    /// row ranges of whole groups.
    #[test]
    fn q4_k_r8_matmul_equals_q4_k(
        n_blocks in 1usize..=6,
        groups in 1usize..=40,
        n_tokens in 1usize..=19,
        first_group in 0usize..=2,
        seed in any::<u64>(),
    ) {
        let ty = GgmlType::Q4_K;
        let (mut rng, n, plain, interleaved) = r8_matrix(seed, n_blocks, groups);
        let n_rows = 8 * groups;
        let x = random_activations(&mut rng, ty, n, n_tokens);
        let act = Activations::from_bytes(GgmlType::Q8_K, n, n_tokens, x).unwrap();
        let w = WeightMatrix::new(ty, n_rows, n, &plain).unwrap();
        let w8 = WeightMatrix::new(GgmlType::Q4_K_R8, n_rows, n, &interleaved).unwrap();
        let rows = 8 * first_group.min(groups - 1)..n_rows;
        type Entry = fn(&Kernels, &WeightMatrix<'_>, &Activations, &mut [f32]);
        let entries: [(&str, Entry); 3] = [
            ("matmul", matmul),
            ("matmul_vec_dot", matmul_vec_dot),
            ("matmul_unrepacked", matmul_unrepacked),
        ];
        for kernels in Kernels::supported() {
            for (name, f) in entries {
                let mut want = vec![f32::NAN; n_rows * n_tokens];
                let mut got = vec![f32::NAN; n_rows * n_tokens];
                f(kernels, &w, &act, &mut want);
                f(kernels, &w8, &act, &mut got);
                let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                prop_assert_eq!(bits(&got), bits(&want), "{} {}", kernels.isa(), name);
            }
            let mut want = vec![f32::NAN; rows.len() * n_tokens];
            let mut got = vec![f32::NAN; rows.len() * n_tokens];
            matmul_rows(kernels, &w, rows.clone(), &act, &mut want);
            matmul_rows(kernels, &w8, rows.clone(), &act, &mut got);
            let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            prop_assert_eq!(bits(&got), bits(&want), "{} matmul_rows {:?}", kernels.isa(), rows);
        }
    }

    /// Q4_K rows × tokens in CPU_REPACK's GEMV and GEMM orders, in tiles, give each pair's
    /// `repack_dot_batch` bit for bit, for row and token counts around the tile shapes.
    #[test]
    fn repack_tiles_equal_repack_batch(
        n_blocks in 1usize..=9,
        n_rows in 1usize..=37,
        batch in 1usize..=19,
        seed in any::<u64>(),
        gemm in any::<bool>(),
    ) {
        let (tiles, one): (TilesFn, OneRowFn) = if gemm {
            (
                |k, ty, n, w, xs, p, out, stride| k.repack_dot_tiles(ty, n, w, xs, p, out, stride, true),
                |k, ty, n, row, xs, out| k.repack_dot_batch(ty, n, row, xs, out, true),
            )
        } else {
            (
                |k, ty, n, w, xs, p, out, stride| k.repack_dot_tiles(ty, n, w, xs, p, out, stride, false),
                |k, ty, n, row, xs, out| k.repack_dot_batch(ty, n, row, xs, out, false),
            )
        };
        check_tiles(GgmlType::Q4_K, n_blocks, n_rows, batch, seed, tiles, one)?;
    }

    /// K-quant rows × tokens in the tiled matmul's order, in tiles, give each pair's
    /// `tiled_dot_batch` bit for bit, for row and token counts around the tile shapes.
    #[test]
    fn tiled_tiles_equal_tiled_batch(
        ty in prop::sample::select(vec![GgmlType::Q6_K, GgmlType::Q4_K, GgmlType::Q2_K]),
        n_blocks in 1usize..=9,
        n_rows in 1usize..=37,
        batch in 1usize..=19,
        seed in any::<u64>(),
    ) {
        check_tiles(
            ty,
            n_blocks,
            n_rows,
            batch,
            seed,
            |k, ty, n, w, xs, p, out, stride| k.tiled_dot_tiles(ty, n, w, xs, p, out, stride),
            |k, ty, n, row, xs, out| k.tiled_dot_batch(ty, n, row, xs, out),
        )?;
    }

    /// Q8_0 rows × tokens in exact-block order (the tile unit's Q8_0 batches) give each
    /// pair's `reference::vec_dot_blocks` bit for bit at every level, with the tokens
    /// prepared or not, for row and token counts around the tiles' 16 × 16; and that order
    /// stays within the rounding bound of ggml's.
    #[test]
    fn block_tiles_equal_vec_dot_blocks(
        n_blocks in 1usize..=9,
        n_rows in 1usize..=37,
        batch in 1usize..=40,
        seed in any::<u64>(),
    ) {
        check_block_tiles(n_blocks, n_rows, batch, seed)?;
    }

    #[test]
    fn float_dot_odd_lengths(
        ty in prop::sample::select(vec![GgmlType::F32, GgmlType::F16, GgmlType::BF16]),
        n in 1usize..=300,
        batch in 1usize..=9,
        seed in any::<u64>(),
    ) {
        check_dot(ty, n, batch, seed)?;
    }

    #[test]
    fn quantize_matches_reference(
        ty in prop::sample::select(vec![
            GgmlType::F32, GgmlType::F16, GgmlType::BF16,
            GgmlType::Q8_0, GgmlType::Q8_1, GgmlType::Q8_K,
        ]),
        n_blocks in n_blocks(),
        seed in any::<u64>(),
    ) {
        let mut rng = Rng(crate::rng::SplitMix64::new(seed));
        let n = n_blocks * ty.block_elems().max(32);
        let mut values: Vec<f32> = (0..n).map(|_| rng.activation()).collect();
        // Blocks with ties and special shapes: zeros, rounding ties, a repeated maximum of
        // both signs (the first one must win), a single non-zero.
        for (k, block) in values.chunks_exact_mut(ty.block_elems().max(32)).enumerate() {
            match (seed as usize + k) % 6 {
                0 => block.fill(0.0),
                1 => {
                    block[0] = 127.0;
                    for (j, v) in block.iter_mut().enumerate().skip(1) {
                        *v = (j as f32 - 60.5) * if j % 2 == 0 { 1.0 } else { -1.0 };
                    }
                }
                2 => {
                    let m = block.len() / 2;
                    block[m] = -5.0;
                    block[m + 1] = 5.0;
                    block[3] = 5.0;
                }
                3 => {
                    block.fill(0.0);
                    block[block.len() - 1] = -1e-3;
                }
                _ => {}
            }
        }
        let bytes = ty.row_bytes(n).expect("whole blocks");
        let mut want = vec![0u8; bytes];
        reference::quantize_row(ty, &values, &mut want);
        for kernels in simd_levels() {
            let mut got = vec![0xAAu8; bytes];
            kernels.quantize_row(ty, &values, &mut got);
            prop_assert!(got == want, "{} quantize {ty}: bytes differ from the reference", kernels.isa());
        }
    }

    #[test]
    fn segments_match_each_sequence_alone(
        ty in prop::sample::select(GgmlType::WEIGHT_TYPES.to_vec()),
        n_rows in prop::sample::select(vec![5usize, 8, 16]),
        lengths in prop::collection::vec(1usize..=12, 1..=4),
        seed in any::<u64>(),
    ) {
        let mut rng = Rng(crate::rng::SplitMix64::new(seed));
        let n_cols = 2 * ty.block_elems().max(32);
        let data: Vec<u8> = (0..n_rows).flat_map(|_| random_weights(&mut rng, ty, n_cols)).collect();
        let w = WeightMatrix::new(ty, n_rows, n_cols, &data).expect("valid matrix");
        let n_tokens: usize = lengths.iter().sum();
        let x: Vec<f32> = (0..n_cols * n_tokens).map(|_| rng.activation()).collect();
        let kernels = Kernels::get();
        let act = Activations::quantize(kernels, ty, &x, n_cols);
        type Whole = fn(&Kernels, &WeightMatrix<'_>, &Activations, &mut [f32]);
        type Segmented = fn(&Kernels, &WeightMatrix<'_>, &Activations, Option<&[usize]>, &mut [f32]);
        let pairs: [(&str, Whole, Segmented); 3] = [
            ("matmul", matmul, matmul_segments),
            ("matmul_vec_dot", matmul_vec_dot, matmul_vec_dot_segments),
            ("matmul_unrepacked", matmul_unrepacked, matmul_unrepacked_segments),
        ];
        for (name, whole, segmented) in pairs {
            let mut got = vec![f32::NAN; n_tokens * n_rows];
            segmented(kernels, &w, &act, Some(&lengths), &mut got);
            let mut t0 = 0;
            for &len in &lengths {
                let tokens: Vec<usize> = (t0..t0 + len).collect();
                let mut want = vec![f32::NAN; len * n_rows];
                whole(kernels, &w, &act.gather(&tokens), &mut want);
                let got_seg = &got[t0 * n_rows..(t0 + len) * n_rows];
                prop_assert!(
                    got_seg.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()),
                    "{name} {ty}: segment at {t0} of {lengths:?} differs from the sequence alone"
                );
                t0 += len;
            }
        }
    }

    #[test]
    fn matmul_matches_rows(
        ty in prop::sample::select(GgmlType::WEIGHT_TYPES.to_vec()),
        n_blocks in 1usize..=4,
        n_rows in 1usize..=37,
        n_tokens in prop_oneof![1usize..=9, 10usize..=40],
        seed in any::<u64>(),
    ) {
        let mut rng = Rng(crate::rng::SplitMix64::new(seed));
        let n_cols = n_blocks * ty.block_elems().max(32);
        let row_bytes = ty.row_bytes(n_cols).expect("whole blocks");
        let data: Vec<u8> = (0..n_rows).flat_map(|_| random_weights(&mut rng, ty, n_cols)).collect();
        let w = WeightMatrix::new(ty, n_rows, n_cols, &data).expect("valid matrix");
        let x: Vec<f32> = (0..n_cols * n_tokens).map(|_| rng.activation()).collect();
        let tiled = Kernels::has_tiled_order(ty) && n_tokens >= TILED_MIN_TOKENS;
        for kernels in Kernels::supported() {
            let act = Activations::quantize(kernels, ty, &x, n_cols);
            let x_row = act.ty().row_bytes(n_cols).expect("whole blocks");
            // Q8_0 batches on the tile unit: the exact-block order.
            let block = kernels.has_block_order(ty) && n_tokens >= BLOCK_ORDER_MIN_TOKENS;
            let mut out = vec![f32::NAN; n_tokens * n_rows];
            matmul(kernels, &w, &act, &mut out);
            for t in 0..n_tokens {
                for r in 0..n_rows {
                    // ggml's order for a batch of `n_tokens` (tinyBLAS's from two tokens).
                    // Q4_K with a multiple of 8 rows: ggml's repacked order.
                    let mut want = [f32::NAN];
                    let w_row = &data[r * row_bytes..(r + 1) * row_bytes];
                    let x_t = &act.data()[t * x_row..(t + 1) * x_row];
                    // Whole groups of four tokens take the GEMM kernel's order, the rest GEMV's.
                    if block {
                        want[0] = reference::vec_dot_blocks(ty, n_cols, w_row, x_t);
                    } else if ty == GgmlType::Q4_K && n_rows % 8 == 0 {
                        let gemm = t < n_tokens - n_tokens % 4;
                        kernels.repack_dot_batch(ty, n_cols, w_row, x_t, &mut want, gemm);
                    } else if tiled {
                        // Other K-quants from eight tokens: the tiled matmul's order.
                        kernels.tiled_dot_batch(ty, n_cols, w_row, x_t, &mut want);
                    } else {
                        kernels.gemm_dot_batch(ty, n_cols, w_row, x_t, &mut want, n_tokens);
                    }
                    let want = want[0];
                    prop_assert_eq!(out[t * n_rows + r].to_bits(), want.to_bits(),
                        "{} matmul {} token {} row {}", kernels.isa(), ty, t, r);
                }
            }
            // A weight ggml does not repack (a 3-D tensor's plane) keeps the unrepacked order.
            let mut plain = vec![f32::NAN; n_tokens * n_rows];
            matmul_unrepacked(kernels, &w, &act, &mut plain);
            for t in 0..n_tokens {
                for r in 0..n_rows {
                    let mut want = [f32::NAN];
                    let w_row = &data[r * row_bytes..(r + 1) * row_bytes];
                    let x_t = &act.data()[t * x_row..(t + 1) * x_row];
                    if block {
                        want[0] = reference::vec_dot_blocks(ty, n_cols, w_row, x_t);
                    } else if tiled {
                        kernels.tiled_dot_batch(ty, n_cols, w_row, x_t, &mut want);
                    } else {
                        kernels.gemm_dot_batch(ty, n_cols, w_row, x_t, &mut want, n_tokens);
                    }
                    prop_assert_eq!(plain[t * n_rows + r].to_bits(), want[0].to_bits(),
                        "{} unrepacked matmul {} token {} row {}", kernels.isa(), ty, t, r);
                }
            }
            // One expert of MUL_MAT_ID: never tinyBLAS; repacked Q4_K takes the GEMV order,
            // other K-quants the tiled order from eight routed tokens.
            let mut expert = vec![f32::NAN; n_tokens * n_rows];
            matmul_vec_dot(kernels, &w, &act, &mut expert);
            for t in 0..n_tokens {
                for r in 0..n_rows {
                    let mut want = [f32::NAN];
                    let w_row = &data[r * row_bytes..(r + 1) * row_bytes];
                    let x_t = &act.data()[t * x_row..(t + 1) * x_row];
                    if block {
                        want[0] = reference::vec_dot_blocks(ty, n_cols, w_row, x_t);
                    } else if ty == GgmlType::Q4_K && n_rows % 8 == 0 {
                        kernels.repack_dot_batch(ty, n_cols, w_row, x_t, &mut want, false);
                    } else if tiled {
                        kernels.tiled_dot_batch(ty, n_cols, w_row, x_t, &mut want);
                    } else {
                        kernels.vec_dot_batch(ty, n_cols, w_row, x_t, &mut want);
                    }
                    prop_assert_eq!(expert[t * n_rows + r].to_bits(), want[0].to_bits(),
                        "{} expert matmul {} token {} row {}", kernels.isa(), ty, t, r);
                }
            }
            // A row range gives the same values as the whole matrix.
            let (a, b) = (n_rows / 3, n_rows - n_rows / 4);
            let mut part = vec![f32::NAN; n_tokens * (b - a)];
            matmul_rows(kernels, &w, a..b, &act, &mut part);
            for t in 0..n_tokens {
                prop_assert_eq!(&part[t * (b - a)..(t + 1) * (b - a)], &out[t * n_rows + a..t * n_rows + b]);
            }
        }
    }
}

/// Activation rows with a -128 quant or inconsistent Q8_K sums are refused.
#[test]
fn from_bytes_validates() {
    let mut rng = Rng(crate::rng::SplitMix64::new(3));
    let n = 256;
    let good = random_activations(&mut rng, GgmlType::Q4_K, n, 2);
    assert!(Activations::from_bytes(GgmlType::Q8_K, n, 2, good.clone()).is_ok());
    let mut bad_sum = good.clone();
    bad_sum[260] ^= 1;
    assert!(Activations::from_bytes(GgmlType::Q8_K, n, 2, bad_sum).is_err());
    let mut bad_quant = good.clone();
    bad_quant[292 + 10] = 0x80;
    assert!(Activations::from_bytes(GgmlType::Q8_K, n, 2, bad_quant).is_err());
    assert!(Activations::from_bytes(GgmlType::Q8_K, n, 3, good).is_err());
}

/// Non-finite and huge inputs quantize exactly as the reference (whose result is defined for
/// them too), so a bad value upstream cannot make the SIMD levels disagree.
#[test]
fn quantize_special_values() {
    let specials = [
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
        1e30,
        -1e30,
        f32::MIN_POSITIVE,
        -0.0,
        65504.0,
        70000.0,
    ];
    for ty in [
        GgmlType::F16,
        GgmlType::BF16,
        GgmlType::Q8_0,
        GgmlType::Q8_1,
        GgmlType::Q8_K,
    ] {
        let block = ty.block_elems().max(32);
        for (k, &special) in specials.iter().enumerate() {
            let mut values: Vec<f32> = (0..2 * block).map(|i| (i as f32 - 40.0) * 0.37).collect();
            values[(7 * k + 3) % block] = special;
            values[block + (11 * k) % block] = special;
            let bytes = ty.row_bytes(values.len()).expect("whole blocks");
            let mut want = vec![0u8; bytes];
            reference::quantize_row(ty, &values, &mut want);
            for kernels in simd_levels() {
                let mut got = vec![0u8; bytes];
                kernels.quantize_row(ty, &values, &mut got);
                let differs = got
                    .chunks_exact(2)
                    .zip(want.chunks_exact(2))
                    .position(|(g, w)| g != w);
                assert_eq!(differs, None, "{} {ty} with {special}", kernels.isa());
            }
        }
    }
}

/// On a CPU with AVX2 the SIMD tests above do run (they would pass vacuously otherwise).
#[test]
fn host_levels_are_tested() {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
        && is_x86_feature_detected!("f16c")
    {
        assert!(simd_levels().iter().any(|k| k.level() == Isa::Avx2));
    }
    assert_eq!(Kernels::scalar().isa(), "scalar");
    assert_eq!(Isa::from_name(" AVX2 "), Some(Isa::Avx2));
    assert_eq!(Isa::from_name("sse"), None);
}
