//! The building blocks of the dense forward pass — RMSNorm, rotary embeddings,
//! softmax, causal attention over the f16 KV cache — each rounding exactly where
//! ggml's CPU backend rounds, so that logits match llama.cpp's.

use half::f16;
use shared::ggml_math::{dot_f16, dot_f16_vec, f16_to_f32, reduce4x8};
use shared::models::{RopeParams, RopeType};

/// RMSNorm of each row of `x` (rows of `n`), times `weight`: ggml's `rms_norm`
/// (sum of squares in f64, `1/sqrtf(mean + eps)` in f32) followed by `mul`.
pub fn rms_norm(x: &mut [f32], n: usize, weight: &[f32], eps: f32) {
    debug_assert_eq!(weight.len(), n);
    for row in x.chunks_exact_mut(n) {
        let sum: f64 = row.iter().map(|&v| (v * v) as f64).sum();
        let mean = (sum / n as f64) as f32;
        let scale = 1.0f32 / (mean + eps).sqrt();
        for (v, &w) in row.iter_mut().zip(weight) {
            *v = (*v * scale) * w;
        }
    }
}

/// Adds `bias` to each row of `x`.
pub fn add_bias(x: &mut [f32], bias: &[f32]) {
    for row in x.chunks_exact_mut(bias.len()) {
        for (v, &b) in row.iter_mut().zip(bias) {
            *v += b;
        }
    }
}

/// Softmax of a router row (ggml's `soft_max` without a mask).
pub fn softmax_in_place(row: &mut [f32]) {
    shared::ggml_math::softmax_in_place(row, false);
}

/// ggml's sigmoid `1 / (1 + e^-x)`.
pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// Rotary embedding tables for positions, as ggml's `rope_cache_init` builds them.
pub struct Rope {
    params: RopeParams,
    theta_scale: f32,
    corr_dims: [f32; 2],
}

impl Rope {
    pub fn new(params: &RopeParams) -> Rope {
        let n_dims = params.n_rot as f32;
        let theta_scale = params.freq_base.powf(-2.0 / n_dims);
        let corr_dim = |n_rot: f32| {
            n_dims * (params.n_ctx_orig as f32 / (n_rot * 2.0 * std::f32::consts::PI)).ln()
                / (2.0 * params.freq_base.ln())
        };
        let start = corr_dim(params.beta_fast).floor();
        let end = corr_dim(params.beta_slow).ceil();
        Rope {
            params: params.clone(),
            theta_scale,
            corr_dims: [start.max(0.0), end.min(n_dims - 1.0)],
        }
    }

    /// cos/sin pairs for position `pos`: `n_rot / 2` entries.
    fn cache(&self, pos: usize) -> Vec<(f32, f32)> {
        let p = &self.params;
        let mut theta = pos as f32;
        let mut out = Vec::with_capacity(p.n_rot / 2);
        for i0 in (0..p.n_rot).step_by(2) {
            let theta_extrap = theta;
            let theta_interp = p.freq_scale * theta_extrap;
            let mut th = theta_interp;
            let mut mscale = p.attn_factor;
            if p.ext_factor != 0.0 {
                let y = ((i0 / 2) as f32 - self.corr_dims[0])
                    / (self.corr_dims[1] - self.corr_dims[0]).max(0.001);
                let ramp = 1.0 - y.clamp(0.0, 1.0);
                let ramp_mix = ramp * p.ext_factor;
                th = theta_interp * (1.0 - ramp_mix) + theta_extrap * ramp_mix;
                mscale *= 1.0 + 0.1 * (1.0 / p.freq_scale).ln();
            }
            out.push((th.cos() * mscale, th.sin() * mscale));
            theta *= self.theta_scale;
        }
        out
    }

    /// Rotates `n_heads` heads of `head_dim` values (one token at `pos`) in place;
    /// dimensions past `n_rot` pass unchanged.
    pub fn apply(&self, x: &mut [f32], head_dim: usize, pos: usize) {
        let cs = self.cache(pos);
        let n_rot = self.params.n_rot;
        for head in x.chunks_exact_mut(head_dim) {
            match self.params.kind {
                RopeType::Norm => {
                    for (i, &(c, s)) in cs.iter().enumerate() {
                        let (x0, x1) = (head[2 * i], head[2 * i + 1]);
                        head[2 * i] = x0.mul_add(c, -(x1 * s));
                        head[2 * i + 1] = x0.mul_add(s, x1 * c);
                    }
                }
                RopeType::Neox => {
                    let half = n_rot / 2;
                    for (i, &(c, s)) in cs.iter().enumerate() {
                        let (x0, x1) = (head[i], head[i + half]);
                        head[i] = x0.mul_add(c, -(x1 * s));
                        head[i + half] = x0.mul_add(s, x1 * c);
                    }
                }
            }
        }
    }
}

/// Rounds a slice to f16 (what ggml does to the f32 operand of an F16 matmul).
pub fn to_f16(x: &[f32]) -> Vec<f16> {
    x.iter().map(|&v| f16::from_f32(v)).collect()
}

/// Causal attention of one query head over cached keys/values, ggml-style:
/// `kq = f16(q)·K` (f32), `softmax(kq·scale)`, probabilities rounded to f16,
/// `out = Σ p·V` with f32 accumulation.
///
/// `keys(j)` / `values(j)` give cached position `j`'s head vectors; positions
/// `0..n_kv` are attended. `batch_tokens` is the size of the batch the query is
/// part of: ggml's K·Q and V·softmax products take tinyBLAS's order for two
/// tokens or more and `ggml_vec_dot_f16`'s for one (a decode step).
pub fn attend_head<'a>(
    q: &[f32],
    n_kv: usize,
    keys: impl Fn(usize) -> &'a [f16],
    values: impl Fn(usize) -> &'a [f16],
    scale: f32,
    batch_tokens: usize,
    out: &mut [f32],
) {
    shared::profile::work(|| attend_one(q, n_kv, keys, values, scale, batch_tokens, out))
}

/// [`attend_head`] for `n_q` query heads that read the same cached keys and values (the
/// heads of a GQA group, or all heads over MLA's latent cache): `q` holds the heads back to
/// back, `out` their outputs back to back. Each head's output is [`attend_head`]'s bit for
/// bit. In a batch, each cached key and value is converted from f16 once for all the heads
/// (the vectorized kernel), where one head at a time converts it once per head; at decode,
/// the heads walk the cache together, a tile of positions at a time, so each cached key and
/// value comes from memory once for the group rather than once per head.
#[allow(clippy::too_many_arguments)]
pub fn attend_heads<'a>(
    q: &[f32],
    n_q: usize,
    n_kv: usize,
    keys: impl Fn(usize) -> &'a [f16],
    values: impl Fn(usize) -> &'a [f16],
    scale: f32,
    batch_tokens: usize,
    out: &mut [f32],
) {
    debug_assert!(n_q > 0 && q.len().is_multiple_of(n_q) && out.len().is_multiple_of(n_q));
    shared::profile::work(|| {
        #[cfg(target_arch = "x86_64")]
        if batch_tokens >= 2 && has_avx2_fma_f16c() {
            // SAFETY: the CPU supports AVX2, FMA and F16C, checked just above.
            unsafe { attend_heads_avx2(q, n_q, n_kv, keys, values, scale, out) };
            return;
        }
        #[cfg(target_arch = "x86_64")]
        if has_avx2_fma_f16c() {
            let (hk, hv) = (q.len() / n_q, out.len() / n_q);
            if hv == 0 {
                return;
            }
            // As many heads together as keep their `V·p` accumulators within L2 (MLA's
            // 512-wide heads: 4; a GQA group of 128-wide ones: all of up to 16).
            let per_call = (GROUP_ACC_BYTES / (VEC_DOT_PERIOD * hv.max(1) * 4)).max(1);
            for (qs, os) in q.chunks(per_call * hk).zip(out.chunks_mut(per_call * hv)) {
                let n = os.len() / hv;
                // SAFETY: the CPU supports AVX2, FMA and F16C, checked just above.
                unsafe { attend_group_vec_avx2(qs, n, n_kv, &keys, &values, scale, os) };
            }
            return;
        }
        let (hk, hv) = (q.len() / n_q, out.len() / n_q);
        for (qh, o) in q.chunks_exact(hk).zip(out.chunks_exact_mut(hv)) {
            attend_one(qh, n_kv, &keys, &values, scale, batch_tokens, o);
        }
    })
}

/// [`attend_head`] without the profile bracket: the fastest version this CPU runs.
fn attend_one<'a>(
    q: &[f32],
    n_kv: usize,
    keys: impl Fn(usize) -> &'a [f16],
    values: impl Fn(usize) -> &'a [f16],
    scale: f32,
    batch_tokens: usize,
    out: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    {
        if has_avx2_fma_f16c() {
            // SAFETY: the CPU supports AVX2, FMA and F16C, checked just above.
            return unsafe { attend_head_avx2(q, n_kv, keys, values, scale, batch_tokens, out) };
        }
        if shared::ggml_math::has_fma() {
            // SAFETY: the CPU supports FMA, checked just above.
            return unsafe { attend_head_fma(q, n_kv, keys, values, scale, batch_tokens, out) };
        }
    }
    attend_head_impl(q, n_kv, keys, values, scale, batch_tokens, out)
}

/// Loads and stores of 8-lane vectors for the attention kernels.
#[cfg(target_arch = "x86_64")]
mod lanes8 {
    use half::f16;
    use std::arch::x86_64::*;

    /// Eight f16 values at `at` as f32.
    #[inline]
    #[target_feature(enable = "avx2,f16c")]
    pub(super) fn ld8h(v: &[f16], at: usize) -> __m256 {
        let v = &v[at..at + 8];
        // SAFETY: `v` holds 8 f16 values (16 bytes), read unaligned.
        _mm256_cvtph_ps(unsafe { _mm_loadu_si128(v.as_ptr().cast()) })
    }

    /// Eight f32 values at `at`.
    #[inline]
    #[target_feature(enable = "avx")]
    pub(super) fn ld8(v: &[f32], at: usize) -> __m256 {
        let v = &v[at..at + 8];
        // SAFETY: `v` holds 8 f32 values, read unaligned.
        unsafe { _mm256_loadu_ps(v.as_ptr()) }
    }

    /// The eight lanes of `v`.
    #[inline]
    #[target_feature(enable = "avx")]
    pub(super) fn lanes(v: __m256) -> [f32; 8] {
        let mut l = [0.0f32; 8];
        // SAFETY: `l` has room for 8 f32 values, written unaligned.
        unsafe { _mm256_storeu_ps(l.as_mut_ptr(), v) };
        l
    }
}

/// [`attend_heads`] in a batch (tinyBLAS's order) with 8-lane vectors: per cached position,
/// the key converted once and dotted with every head; per 8 output elements, the values of
/// every position converted once and accumulated for each head in registers (its 8 lane
/// accumulators, position j into lane j % 8, as [`attend_head_avx2`] keeps them in memory).
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn attend_heads_avx2<'a>(
    q: &[f32],
    n_q: usize,
    n_kv: usize,
    keys: impl Fn(usize) -> &'a [f16],
    values: impl Fn(usize) -> &'a [f16],
    scale: f32,
    out: &mut [f32],
) {
    use lanes8::{lanes, ld8, ld8h};
    use std::arch::x86_64::*;

    let (n, d) = (q.len() / n_q, out.len() / n_q);
    // Each head's query rounded to f16 (ggml's F16 matmul operand), as f32.
    let qf: Vec<f32> = q.iter().map(|&v| f16::from_f32(v).to_f32()).collect();
    let whole = n / 8 * 8;
    let mut kf = vec![0.0f32; whole];
    // scores[g * n_kv + j]: head g, position j.
    let mut scores = vec![0.0f32; n_q * n_kv];
    for j in 0..n_kv {
        let k = keys(j);
        debug_assert_eq!(k.len(), n);
        for e in (0..whole).step_by(8) {
            let dst = &mut kf[e..e + 8];
            // SAFETY: `dst` has room for 8 f32 values, written unaligned.
            unsafe { _mm256_storeu_ps(dst.as_mut_ptr(), ld8h(k, e)) };
        }
        for (g, qg) in qf.chunks_exact(n).enumerate() {
            // `dot_f16`: one 8-lane accumulator, `hsum8`, the tail added in f32.
            let mut acc = _mm256_setzero_ps();
            for e in (0..whole).step_by(8) {
                acc = _mm256_fmadd_ps(ld8(qg, e), ld8(&kf, e), acc);
            }
            let mut sum = shared::ggml_math::hsum8(&lanes(acc));
            for e in whole..n {
                sum += qg[e] * k[e].to_f32();
            }
            scores[g * n_kv + j] = sum * scale;
        }
    }
    for row in scores.chunks_exact_mut(n_kv.max(1)) {
        shared::ggml_math::softmax_in_place(row, true);
        for p in row.iter_mut() {
            *p = f16::from_f32(*p).to_f32();
        }
    }

    let whole = d / 8 * 8;
    let vrows: Vec<&[f16]> = (0..n_kv).map(&values).collect();
    // The values' elements e..e + 8 of every position.
    let mut vf = vec![_mm256_setzero_ps(); n_kv];
    for e in (0..whole).step_by(8) {
        for (v, row) in vf.iter_mut().zip(&vrows) {
            debug_assert_eq!(row.len(), d);
            *v = ld8h(row, e);
        }
        for (g, p) in scores.chunks_exact(n_kv.max(1)).enumerate().take(n_q) {
            let mut acc = [_mm256_setzero_ps(); 8];
            for (j, (&p, v)) in p.iter().zip(&vf).enumerate() {
                acc[j % 8] = _mm256_fmadd_ps(_mm256_set1_ps(p), *v, acc[j % 8]);
            }
            #[allow(clippy::redundant_closure)] // (a target-feature fn is not an FnMut)
            let acc = acc.map(|v| lanes(v));
            for (m, o) in out[g * d + e..g * d + e + 8].iter_mut().enumerate() {
                *o = shared::ggml_math::hsum8(&std::array::from_fn(|lane| acc[lane][m]));
            }
        }
    }
    for e in whole..d {
        for (g, p) in scores.chunks_exact(n_kv.max(1)).enumerate().take(n_q) {
            let mut a = [0.0f32; 8];
            for (j, (&p, row)) in p.iter().zip(&vrows).enumerate() {
                a[j % 8] = p.mul_add(row[e].to_f32(), a[j % 8]);
            }
            out[g * d + e] = shared::ggml_math::hsum8(&a);
        }
    }
}

#[cfg(target_arch = "x86_64")]
fn has_avx2_fma_f16c() -> bool {
    std::arch::is_x86_feature_detected!("avx2")
        && std::arch::is_x86_feature_detected!("fma")
        && std::arch::is_x86_feature_detected!("f16c")
}

/// Bytes of `V·p` accumulators the heads of one [`attend_group_vec_avx2`] call keep.
const GROUP_ACC_BYTES: usize = 256 * 1024;
/// Cached positions whose keys all the heads of a group read while they stay in L1.
const KEY_TILE: usize = 64;
/// Cached positions whose values the `V·p` pass walks at a time: four per accumulator, so
/// each accumulator's registers take four FMAs per load and store.
const VALUE_TILE: usize = 4 * VEC_DOT_PERIOD;
/// Positions after which `ggml_vec_dot_f16`'s accumulators repeat: 4 accumulators of 8 lanes.
const VEC_DOT_PERIOD: usize = 32;

/// [`attend_head_impl`] at decode (`ggml_vec_dot_f16`'s order) for `n_q` heads that read the
/// same cache, with 8-lane vectors: each head's float operations are the scalar version's,
/// in the same order, so every output is bit-identical (tested). The heads go through the
/// cache together, [`KEY_TILE`] positions at a time for `K·q` and [`VALUE_TILE`] for `V·p`,
/// so a long cache is read from memory once per group, not once per head. `V·p` keeps
/// accumulator k (lane `k % 8` of accumulator `k / 8`: positions k, k + 32, ...) of 64 output
/// elements in eight registers over the tile's positions of that accumulator.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn attend_group_vec_avx2<'a>(
    q: &[f32],
    n_q: usize,
    n_kv: usize,
    keys: impl Fn(usize) -> &'a [f16],
    values: impl Fn(usize) -> &'a [f16],
    scale: f32,
    out: &mut [f32],
) {
    use lanes8::{ld8, ld8h};
    use std::arch::x86_64::*;

    let (hk, hv) = (q.len() / n_q, out.len() / n_q);
    // The queries rounded to f16 (element by element), held in f32 (exact) for the loads.
    let qf: Vec<f32> = to_f16(q).iter().map(|h| h.to_f32()).collect();
    let mut scores = vec![0.0f32; n_q * n_kv];
    let whole_k = hk / 32 * 32;
    for t0 in (0..n_kv).step_by(KEY_TILE) {
        let t1 = (t0 + KEY_TILE).min(n_kv);
        for (qh, sc) in qf.chunks_exact(hk).zip(scores.chunks_exact_mut(n_kv)) {
            for (j, s) in (t0..t1).zip(&mut sc[t0..t1]) {
                let k = keys(j);
                debug_assert_eq!(k.len(), hk);
                // `dot_f16_vec`: four accumulators over steps of 32, `reduce4x8`, tail in f64.
                let mut acc = [_mm256_setzero_ps(); 4];
                for e in (0..whole_k).step_by(32) {
                    for (a, acc) in acc.iter_mut().enumerate() {
                        *acc = _mm256_fmadd_ps(ld8(qh, e + 8 * a), ld8h(k, e + 8 * a), *acc);
                    }
                }
                let mut sum = f64::from(reduce4x8_ps(acc));
                for e in whole_k..hk {
                    sum += f64::from(qh[e] * k[e].to_f32());
                }
                *s = sum as f32 * scale;
            }
        }
    }
    for sc in scores.chunks_exact_mut(n_kv) {
        shared::ggml_math::softmax_in_place(sc, true);
        // ggml multiplies V by the probabilities rounded to f16.
        for p in sc.iter_mut() {
            *p = f16::from_f32(*p).to_f32();
        }
    }

    // acc[(h * 32 + k) * hv + e]: head h's accumulator k (the scalar version's a[e][k / 8][k % 8]).
    let mut acc = vec![0.0f32; n_q * VEC_DOT_PERIOD * hv];
    for t0 in (0..n_kv).step_by(VALUE_TILE) {
        let t1 = (t0 + VALUE_TILE).min(n_kv);
        let per_head = scores
            .chunks_exact(n_kv)
            .zip(acc.chunks_exact_mut(VEC_DOT_PERIOD * hv));
        for (p, acc_h) in per_head {
            // SAFETY: the caller's CPU supports AVX2, FMA and F16C (this function's contract).
            unsafe { accumulate_v(p, &values, VEC_DOT_PERIOD, t0..t1, acc_h) };
        }
    }
    for (acc_h, o) in acc
        .chunks_exact(VEC_DOT_PERIOD * hv)
        .zip(out.chunks_exact_mut(hv))
    {
        reduce_v_accumulators(acc_h, 4, o);
    }
}

/// [`attend_head_impl`] with 8-lane vectors: the same float operations in the same order
/// (each of the scalar version's 8-lane accumulators is one register; the `V·p`
/// accumulators are kept per (slot, lane) and vectorized over the output elements), so the
/// results are bit-identical (tested).
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn attend_head_avx2<'a>(
    q: &[f32],
    n_kv: usize,
    keys: impl Fn(usize) -> &'a [f16],
    values: impl Fn(usize) -> &'a [f16],
    scale: f32,
    batch_tokens: usize,
    out: &mut [f32],
) {
    use lanes8::ld8h as ld8;
    use std::arch::x86_64::*;

    if batch_tokens < 2 {
        // SAFETY: the caller's CPU supports AVX2, FMA and F16C (this function's contract).
        return unsafe { attend_group_vec_avx2(q, 1, n_kv, keys, values, scale, out) };
    }
    let q16 = to_f16(q);
    // The query rounded to f16 once, held in f32 (exact) for the vector loads.
    let qf: Vec<f32> = q16.iter().map(|h| h.to_f32()).collect();
    let n = q16.len();
    let mut scores: Vec<f32> = Vec::with_capacity(n_kv);
    for j in 0..n_kv {
        let k = keys(j);
        debug_assert_eq!(k.len(), n);
        // `dot_f16`: one 8-lane accumulator, `hsum8`, the tail added in f32.
        let whole = n / 8 * 8;
        let mut acc = _mm256_setzero_ps();
        for e in (0..whole).step_by(8) {
            acc = _mm256_fmadd_ps(lanes8::ld8(&qf, e), ld8(k, e), acc);
        }
        // `hsum8` in registers: t = lanes l + l+4, then (t0 + t2) + (t1 + t3).
        let t = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps::<1>(acc));
        let u = _mm_add_ps(t, _mm_movehl_ps(t, t));
        let mut sum = _mm_cvtss_f32(_mm_add_ss(u, _mm_shuffle_ps::<1>(u, u)));
        for e in whole..n {
            sum += q16[e].to_f32() * k[e].to_f32();
        }
        scores.push(sum * scale);
    }
    shared::ggml_math::softmax_in_place(&mut scores, true);

    // acc[lane * d + e]: the scalar version's a[e][0][lane] (tinyBLAS: one accumulator of
    // 8 lanes, position j into lane j % 8).
    let d = out.len();
    let mut acc = vec![0.0f32; 8 * d];
    let probs: Vec<f32> = scores.iter().map(|&p| f16::from_f32(p).to_f32()).collect();
    // SAFETY: the caller's CPU supports AVX2, FMA and F16C (this function's contract).
    unsafe { accumulate_v(&probs, &values, 8, 0..n_kv, &mut acc) };
    reduce_v_accumulators(&acc, 1, out);
}

/// Adds the cached values of positions `range` times their probabilities `p` into one
/// head's `V·p` accumulators `acc` (`period` of them, `d` = `acc.len() / period` elements
/// each): accumulator k takes positions k, k + period, ... in increasing order, one FMA per
/// element each, as the scalar version's per-position loop adds them, so the values are that
/// loop's. `range` starts at a multiple of `period`. One accumulator at a time, 64 elements
/// of it held in eight registers over its positions, each cached value read once.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn accumulate_v<'a>(
    p: &[f32],
    values: impl Fn(usize) -> &'a [f16],
    period: usize,
    range: std::ops::Range<usize>,
    acc: &mut [f32],
) {
    use lanes8::{ld8, ld8h};
    use std::arch::x86_64::*;

    debug_assert!(range.start.is_multiple_of(period));
    let d = acc.len() / period;
    let whole = d / 8 * 8;
    for (k, a) in acc.chunks_exact_mut(d).enumerate() {
        let positions = (range.start + k..range.end).step_by(period);
        let mut e0 = 0;
        while e0 + 64 <= whole {
            let mut r: [__m256; 8] = std::array::from_fn(|b| ld8(a, e0 + 8 * b));
            for j in positions.clone() {
                let (pv, v) = (_mm256_set1_ps(p[j]), values(j));
                debug_assert_eq!(v.len(), d);
                for (b, r) in r.iter_mut().enumerate() {
                    *r = _mm256_fmadd_ps(pv, ld8h(v, e0 + 8 * b), *r);
                }
            }
            for (b, r) in r.iter().enumerate() {
                // SAFETY: `a[e0 + 8b..]` holds 8 f32 values, written unaligned.
                unsafe { _mm256_storeu_ps(a[e0 + 8 * b..e0 + 8 * b + 8].as_mut_ptr(), *r) };
            }
            e0 += 64;
        }
        for e in (e0..whole).step_by(8) {
            let mut r = ld8(a, e);
            for j in positions.clone() {
                r = _mm256_fmadd_ps(_mm256_set1_ps(p[j]), ld8h(values(j), e), r);
            }
            // SAFETY: `a[e..e + 8]` holds 8 f32 values, written unaligned.
            unsafe { _mm256_storeu_ps(a[e..e + 8].as_mut_ptr(), r) };
        }
        for (e, a) in a.iter_mut().enumerate().skip(whole) {
            for j in positions.clone() {
                *a = p[j].mul_add(values(j)[e].to_f32(), *a);
            }
        }
    }
}

/// The `V·p` outputs from their accumulators: `acc[(slot * 8 + lane) * d + e]` (`d` =
/// `out.len()`, `n_acc` slots of 8 lanes) summed per output element as the scalar version
/// sums its `a[e][slot][lane]` (`hsum8` for one slot, `reduce4x8` for four), eight elements
/// at a time in vectors over e.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn reduce_v_accumulators(acc: &[f32], n_acc: usize, out: &mut [f32]) {
    use std::arch::x86_64::*;
    let d = out.len();
    let whole = d / 8 * 8;
    let at = |slot: usize, lane: usize, e: usize| acc[(slot * 8 + lane) * d + e];
    for e in (0..whole).step_by(8) {
        let row = |slot: usize, lane: usize| lanes8::ld8(acc, (slot * 8 + lane) * d + e);
        let v = if n_acc == 1 {
            // `hsum8`: t_i = lane i + lane i+4, then (t0 + t2) + (t1 + t3).
            let t: [__m256; 4] = std::array::from_fn(|i| _mm256_add_ps(row(0, i), row(0, i + 4)));
            _mm256_add_ps(_mm256_add_ps(t[0], t[2]), _mm256_add_ps(t[1], t[3]))
        } else {
            // `reduce4x8`: y_l = (a0 + a2) + (a1 + a3), t_i = y_i + y_i+4, (t0 + t1) + (t2 + t3).
            let y: [__m256; 8] = std::array::from_fn(|l| {
                _mm256_add_ps(
                    _mm256_add_ps(row(0, l), row(2, l)),
                    _mm256_add_ps(row(1, l), row(3, l)),
                )
            });
            let t: [__m256; 4] = std::array::from_fn(|i| _mm256_add_ps(y[i], y[i + 4]));
            _mm256_add_ps(_mm256_add_ps(t[0], t[1]), _mm256_add_ps(t[2], t[3]))
        };
        // SAFETY: `out[e..e + 8]` holds 8 f32 values, written unaligned.
        unsafe { _mm256_storeu_ps(out[e..e + 8].as_mut_ptr(), v) };
    }
    for (e, o) in out.iter_mut().enumerate().skip(whole) {
        let mut a = [[0.0f32; 8]; 4];
        for (slot, row) in a.iter_mut().enumerate().take(n_acc) {
            for (lane, v) in row.iter_mut().enumerate() {
                *v = at(slot, lane, e);
            }
        }
        *o = if n_acc == 1 {
            shared::ggml_math::hsum8(&a[0])
        } else {
            reduce4x8(&a)
        };
    }
}

/// [`reduce4x8`] of four 8-lane accumulators in registers: lanes (a0 + a2) + (a1 + a3), then
/// t_i = lane i + lane i+4 and (t0 + t1) + (t2 + t3) — the same additions in the same order.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2")]
fn reduce4x8_ps(acc: [std::arch::x86_64::__m256; 4]) -> f32 {
    use std::arch::x86_64::*;
    let x = _mm256_add_ps(_mm256_add_ps(acc[0], acc[2]), _mm256_add_ps(acc[1], acc[3]));
    let t = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps::<1>(x));
    let h = _mm_hadd_ps(t, t);
    _mm_cvtss_f32(_mm_hadd_ps(h, h))
}

/// [`attend_head`] compiled with FMA: its `mul_add`s become single instructions
/// (the same results as the library calls they are otherwise).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "fma")]
unsafe fn attend_head_fma<'a>(
    q: &[f32],
    n_kv: usize,
    keys: impl Fn(usize) -> &'a [f16],
    values: impl Fn(usize) -> &'a [f16],
    scale: f32,
    batch_tokens: usize,
    out: &mut [f32],
) {
    attend_head_impl(q, n_kv, keys, values, scale, batch_tokens, out)
}

#[inline(always)]
fn attend_head_impl<'a>(
    q: &[f32],
    n_kv: usize,
    keys: impl Fn(usize) -> &'a [f16],
    values: impl Fn(usize) -> &'a [f16],
    scale: f32,
    batch_tokens: usize,
    out: &mut [f32],
) {
    let q16 = to_f16(q);
    let gemm = batch_tokens >= 2;
    // ggml pads the KV length with masked cells, so every score takes the vector path.
    let mut scores: Vec<f32> = (0..n_kv)
        .map(|j| {
            let d = if gemm {
                dot_f16(&q16, keys(j))
            } else {
                dot_f16_vec(&q16, keys(j))
            };
            d * scale
        })
        .collect();
    shared::ggml_math::softmax_in_place(&mut scores, true);
    // kqv = V·f16(p): per output element, FMA accumulators over positions; tinyBLAS has one
    // of 8 lanes, vec_dot four (position j in accumulator (j / 8) % 4, lane j % 8). The
    // padded KV length is a multiple of 32 and its masked cells add exact zeros.
    let d = out.len();
    let n_acc = if gemm { 1 } else { 4 };
    let mut acc = vec![[[0.0f32; 8]; 4]; d];
    for (j, &p) in scores.iter().enumerate() {
        let p = f16_to_f32(f16::from_f32(p));
        let (slot, lane) = ((j / 8) % n_acc, j % 8);
        for (a, v) in acc.iter_mut().zip(values(j)) {
            a[slot][lane] = p.mul_add(f16_to_f32(*v), a[slot][lane]);
        }
    }
    for (o, a) in out.iter_mut().zip(&acc) {
        *o = if gemm {
            shared::ggml_math::hsum8(&a[0])
        } else {
            reduce4x8(a)
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The vector attention equals the scalar one bit for bit, at decode (vec_dot order) and in
    /// a batch (tinyBLAS order), for head sizes with and without tails.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn attend_head_avx2_equals_scalar() {
        if !has_avx2_fma_f16c() {
            return;
        }
        let mut rng = shared::rng::SplitMix64::new(7);
        for &(dim, n_kv) in &[(128, 1), (128, 37), (64, 300), (72, 9), (12, 40), (576, 64)] {
            let q: Vec<f32> = (0..dim).map(|_| rng.next_f32() * 2.0 - 1.0).collect();
            let kv = |_: usize| -> Vec<f16> {
                (0..dim)
                    .map(|_| f16::from_f32(rng.next_f32() * 4.0 - 2.0))
                    .collect()
            };
            let ks: Vec<Vec<f16>> = (0..n_kv).map(kv).collect();
            let vs: Vec<Vec<f16>> = (0..n_kv)
                .map(|_| {
                    (0..dim)
                        .map(|_| f16::from_f32(rng.next_f32() * 4.0 - 2.0))
                        .collect()
                })
                .collect();
            for batch in [1, 2, 7] {
                let mut want = vec![0.0f32; dim];
                attend_head_impl(&q, n_kv, |j| &ks[j], |j| &vs[j], 0.088, batch, &mut want);
                let mut got = vec![0.0f32; dim];
                // SAFETY: checked above.
                unsafe {
                    attend_head_avx2(&q, n_kv, |j| &ks[j], |j| &vs[j], 0.088, batch, &mut got)
                };
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(
                    bits(&got),
                    bits(&want),
                    "dim {dim}, n_kv {n_kv}, batch {batch}"
                );
            }
        }
    }

    /// Several heads over the same keys and values equal each head alone (the scalar
    /// version), bit for bit, in a batch and at decode.
    #[test]
    fn attend_heads_equal_each_head() {
        let mut rng = shared::rng::SplitMix64::new(11);
        for &(dim_k, dim_v, n_q, n_kv) in &[
            (128, 128, 8, 37),
            (64, 64, 1, 9),
            (72, 40, 3, 130),
            (12, 20, 5, 1),
            (20, 12, 2, 6),
            (576, 512, 4, 17),
            // Several key and value tiles, a partial last one.
            (128, 128, 8, 300),
            (96, 72, 2, 200),
            // Wide heads, taken a few per call.
            (64, 512, 9, 40),
        ] {
            let f16s = |n: usize, rng: &mut shared::rng::SplitMix64| -> Vec<f16> {
                (0..n)
                    .map(|_| f16::from_f32(rng.next_f32() * 4.0 - 2.0))
                    .collect()
            };
            let ks: Vec<Vec<f16>> = (0..n_kv).map(|_| f16s(dim_k, &mut rng)).collect();
            let vs: Vec<Vec<f16>> = (0..n_kv).map(|_| f16s(dim_v, &mut rng)).collect();
            let q: Vec<f32> = (0..n_q * dim_k)
                .map(|_| rng.next_f32() * 2.0 - 1.0)
                .collect();
            for batch in [1, 2, 9] {
                let mut want = vec![0.0f32; n_q * dim_v];
                for (qh, o) in q.chunks_exact(dim_k).zip(want.chunks_exact_mut(dim_v)) {
                    attend_head_impl(qh, n_kv, |j| &ks[j], |j| &vs[j], 0.07, batch, o);
                }
                let mut got = vec![f32::NAN; n_q * dim_v];
                attend_heads(&q, n_q, n_kv, |j| &ks[j], |j| &vs[j], 0.07, batch, &mut got);
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(
                    bits(&got),
                    bits(&want),
                    "dims {dim_k}/{dim_v}, {n_q} heads, n_kv {n_kv}, batch {batch}"
                );
            }
        }
    }

    #[test]
    fn softmax_sums_to_one_and_orders() {
        let mut v = vec![1.0, 2.0, 3.0, -1.0];
        softmax_in_place(&mut v);
        let s: f32 = v.iter().sum();
        assert!((s - 1.0).abs() < 1e-6);
        assert!(v[2] > v[1] && v[1] > v[0] && v[0] > v[3]);
    }

    #[test]
    fn rms_norm_unit_rows() {
        let mut x = vec![3.0, 4.0, 0.0, 0.0];
        // A zero row stays zero only with eps > 0 (ggml divides by sqrt(mean + eps) too).
        rms_norm(&mut x, 2, &[1.0, 1.0], 1e-12);
        // rms of (3,4) is sqrt(12.5)
        assert!((x[0] - 3.0 / 12.5f32.sqrt()).abs() < 1e-6);
        assert_eq!(&x[2..], &[0.0, 0.0]);
    }

    #[test]
    fn rope_position_zero_is_identity_and_preserves_norm() {
        let params = RopeParams {
            kind: RopeType::Neox,
            n_rot: 4,
            freq_base: 10000.0,
            freq_scale: 1.0,
            ext_factor: 0.0,
            attn_factor: 1.0,
            beta_fast: 32.0,
            beta_slow: 1.0,
            n_ctx_orig: 4096,
            yarn_log_mul: 0.0,
        };
        let rope = Rope::new(&params);
        let orig = vec![0.5, -1.0, 2.0, 0.25, 7.0, 8.0];
        let mut x = orig.clone();
        rope.apply(&mut x, 6, 0);
        assert_eq!(x, orig);
        rope.apply(&mut x, 6, 17);
        let n0: f32 = orig[..4].iter().map(|v| v * v).sum();
        let n1: f32 = x[..4].iter().map(|v| v * v).sum();
        assert!((n0 - n1).abs() < 1e-4);
        assert_eq!(&x[4..], &orig[4..], "dims past n_rot pass unchanged");
        assert_ne!(&x[..4], &orig[..4]);
    }
}
