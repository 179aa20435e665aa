//! Weight quantization as ggml's `quantize_row_*_ref` (ggml/src/ggml-quants.c), without an
//! importance matrix: what `llama-quantize` does for a type when no imatrix is given.
//!
//! The float operations follow the C expressions left to right without contraction. ggml built
//! with `-ffp-contract=fast` may fuse some of them, so a file written by `llama-quantize` can
//! differ from ours in the last bit of a search step; the layouts and rules are the same.

use half::f16;

use super::activation::{each_block, q8_k_block};
use super::{decode, nearest_int};
use crate::quant::blocks::{
    BlockQ2K, BlockQ3K, BlockQ4K, BlockQ4_0, BlockQ4_1, BlockQ5K, BlockQ5_0, BlockQ5_1, BlockQ6K,
    BlockQ8_0, BlockQ8_1, QK,
};
use crate::quant::{GgmlType, QK_K};

/// ggml's threshold under which a group counts as all zeros.
const GROUP_MAX_EPS: f32 = 1e-15;

/// Lengths are checked by the caller.
pub(super) fn quantize(ty: GgmlType, src: &[f32], dst: &mut [u8]) {
    match ty {
        // The float types and Q8_K convert the same way for weights and activations.
        GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => super::activation::quantize(ty, src, dst),
        GgmlType::Q8_K => each_block(src, dst, q8_k_block),
        GgmlType::Q4_K_R8 => panic!(
            "quantize_weights: Q4_K_R8 interleaves whole groups of 8 rows; it has no one-row form"
        ),
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
    }
}

// ---- legacy quants ----

/// The first element of largest magnitude, with its sign (0 for an all-zero block).
fn signed_absmax(xs: &[f32]) -> f32 {
    let mut amax = 0.0f32;
    let mut max = 0.0f32;
    for &v in xs {
        if amax < v.abs() {
            amax = v.abs();
            max = v;
        }
    }
    max
}

fn min_max(xs: &[f32]) -> (f32, f32) {
    let mut min = f32::MAX;
    let mut max = -f32::MAX;
    for &v in xs {
        if v < min {
            min = v;
        }
        if v > max {
            max = v;
        }
    }
    (min, max)
}

fn inverse_or_zero(d: f32) -> f32 {
    if d != 0.0 {
        1.0 / d
    } else {
        0.0
    }
}

fn q4_0(xs: &[f32; QK]) -> BlockQ4_0 {
    let d = signed_absmax(xs) / -8.0;
    let id = inverse_or_zero(d);
    let mut qs = [0u8; QK / 2];
    for (j, q) in qs.iter_mut().enumerate() {
        // C's `(int8_t)(x + 8.5f)` truncates toward zero, as `as` does.
        let lo = ((xs[j] * id + 8.5) as i8).min(15) as u8;
        let hi = ((xs[j + QK / 2] * id + 8.5) as i8).min(15) as u8;
        *q = lo | (hi << 4);
    }
    BlockQ4_0 {
        d: f16::from_f32(d),
        qs,
    }
}

fn q4_1(xs: &[f32; QK]) -> BlockQ4_1 {
    let (min, max) = min_max(xs);
    let d = (max - min) / 15.0;
    let id = inverse_or_zero(d);
    let mut qs = [0u8; QK / 2];
    for (j, q) in qs.iter_mut().enumerate() {
        let lo = (((xs[j] - min) * id + 0.5) as i8).min(15) as u8;
        let hi = (((xs[j + QK / 2] - min) * id + 0.5) as i8).min(15) as u8;
        *q = lo | (hi << 4);
    }
    BlockQ4_1 {
        d: f16::from_f32(d),
        m: f16::from_f32(min),
        qs,
    }
}

/// Packs 32 five-bit quants into (qh, qs).
fn pack_q5(q: &[u8; QK]) -> ([u8; 4], [u8; QK / 2]) {
    let mut qs = [0u8; QK / 2];
    let mut qh = 0u32;
    for j in 0..QK / 2 {
        let (lo, hi) = (q[j], q[j + QK / 2]);
        qs[j] = (lo & 15) | ((hi & 15) << 4);
        qh |= u32::from((lo & 0x10) >> 4) << j;
        qh |= u32::from((hi & 0x10) >> 4) << (j + QK / 2);
    }
    (qh.to_le_bytes(), qs)
}

fn q5_0(xs: &[f32; QK]) -> BlockQ5_0 {
    let d = signed_absmax(xs) / -16.0;
    let id = inverse_or_zero(d);
    let q = xs.map(|x| ((x * id + 16.5) as i8).min(31) as u8);
    let (qh, qs) = pack_q5(&q);
    BlockQ5_0 {
        d: f16::from_f32(d),
        qh,
        qs,
    }
}

fn q5_1(xs: &[f32; QK]) -> BlockQ5_1 {
    let (min, max) = min_max(xs);
    let d = (max - min) / 31.0;
    let id = inverse_or_zero(d);
    // ggml has no clamp here: (x - min) * id + 0.5 stays below 32.
    let q = xs.map(|x| ((x - min) * id + 0.5) as u8);
    let (qh, qs) = pack_q5(&q);
    BlockQ5_1 {
        d: f16::from_f32(d),
        m: f16::from_f32(min),
        qh,
        qs,
    }
}

fn q8_ref_scales(xs: &[f32; QK]) -> (f32, f32) {
    let amax = xs.iter().fold(0.0f32, |m, &x| m.max(x.abs()));
    let d = amax / 127.0;
    (d, inverse_or_zero(d))
}

fn q8_0(xs: &[f32; QK]) -> BlockQ8_0 {
    let (d, id) = q8_ref_scales(xs);
    // `roundf`: half away from zero, as `f32::round`.
    BlockQ8_0 {
        d: f16::from_f32(d),
        qs: xs.map(|x| (x * id).round() as i8),
    }
}

fn q8_1(xs: &[f32; QK]) -> BlockQ8_1 {
    let (d, id) = q8_ref_scales(xs);
    let qs = xs.map(|x| (x * id).round() as i8);
    let sum: i32 = qs.iter().map(|&q| i32::from(q)).sum();
    BlockQ8_1 {
        d: f16::from_f32(d),
        s: f16::from_f32(sum as f32 * d),
        qs,
    }
}

// ---- K-quant helpers (ggml's make_*_quants) ----

/// `make_qx_quants` with `rmse_type = 1` and no importance weights (w = x²): returns the scale,
/// writes `L[i] = q + nmax` with q ∈ [-nmax, nmax-1].
fn make_qx_quants(x: &[f32], nmax: i32, l_out: &mut [i8]) -> f32 {
    let max = signed_absmax(x);
    if max.abs() < GROUP_MAX_EPS {
        l_out.fill(0);
        return 0.0;
    }
    let nmax_f = nmax as f32;
    let clamp = |l: i32| l.clamp(-nmax, nmax - 1);
    let mut iscale = -nmax_f / max;
    let mut sumlx = 0.0f32;
    let mut suml2 = 0.0f32;
    for (&xi, out) in x.iter().zip(l_out.iter_mut()) {
        let l = clamp(nearest_int(iscale * xi));
        *out = (l + nmax) as i8;
        let w = xi * xi;
        sumlx += w * xi * l as f32;
        suml2 += w * l as f32 * l as f32;
    }
    let mut scale = if suml2 != 0.0 { sumlx / suml2 } else { 0.0 };
    let mut best = scale * sumlx;
    for is in -9..=9 {
        if is == 0 {
            continue;
        }
        iscale = -(nmax_f + 0.1 * is as f32) / max;
        sumlx = 0.0;
        suml2 = 0.0;
        for &xi in x {
            let l = clamp(nearest_int(iscale * xi));
            let w = xi * xi;
            sumlx += w * xi * l as f32;
            suml2 += w * l as f32 * l as f32;
        }
        if suml2 > 0.0 && sumlx * sumlx > best * suml2 {
            for (&xi, out) in x.iter().zip(l_out.iter_mut()) {
                *out = (nmax + clamp(nearest_int(iscale * xi))) as i8;
            }
            scale = sumlx / suml2;
            best = scale * sumlx;
        }
    }
    scale
}

/// `make_q3_quants` with `do_rmse = true`: returns the scale, writes `L[i] = q + nmax`.
fn make_q3_quants(x: &[f32], nmax: i32, l_out: &mut [i8]) -> f32 {
    let max = signed_absmax(x);
    if max.abs() < GROUP_MAX_EPS {
        l_out.fill(0);
        return 0.0;
    }
    let clamp = |l: i32| l.clamp(-nmax, nmax - 1);
    let iscale = -(nmax as f32) / max;
    let mut sumlx = 0.0f32;
    let mut suml2 = 0.0f32;
    for (&xi, out) in x.iter().zip(l_out.iter_mut()) {
        let l = clamp(nearest_int(iscale * xi));
        *out = l as i8;
        let w = xi * xi;
        sumlx += w * xi * l as f32;
        suml2 += w * l as f32 * l as f32;
    }
    for _ in 0..5 {
        let mut n_changed = 0;
        for (&xi, out) in x.iter().zip(l_out.iter_mut()) {
            let w = xi * xi;
            let old = f32::from(*out);
            let mut slx = sumlx - w * xi * old;
            if slx > 0.0 {
                let mut sl2 = suml2 - w * old * old;
                let new_l = clamp(nearest_int(xi * sl2 / slx));
                if new_l != i32::from(*out) {
                    slx += w * xi * new_l as f32;
                    sl2 += w * new_l as f32 * new_l as f32;
                    if sl2 > 0.0 && slx * slx * suml2 > sumlx * sumlx * sl2 {
                        *out = new_l as i8;
                        sumlx = slx;
                        suml2 = sl2;
                        n_changed += 1;
                    }
                }
            }
        }
        if n_changed == 0 {
            break;
        }
    }
    for out in l_out.iter_mut() {
        *out += nmax as i8;
    }
    if suml2 > 0.0 {
        sumlx / suml2
    } else {
        0.0
    }
}

/// Search parameters of `make_qkx2_quants`.
struct Qkx2 {
    nmax: i32,
    rmin: f32,
    rdelta: f32,
    nstep: i32,
    use_mad: bool,
}

/// `make_qkx2_quants`: fits `x ≈ scale·L - the_min` with L ∈ [0, nmax]; returns
/// `(scale, the_min)`. `laux` is scratch of x's length.
fn make_qkx2_quants(
    x: &[f32],
    weights: &[f32],
    p: &Qkx2,
    l_out: &mut [u8],
    laux: &mut [u8],
) -> (f32, f32) {
    let nmax_f = p.nmax as f32;
    let mut min = x[0];
    let mut max = x[0];
    let mut sum_w = weights[0];
    let mut sum_x = sum_w * x[0];
    for (&xi, &w) in x.iter().zip(weights).skip(1) {
        if xi < min {
            min = xi;
        }
        if xi > max {
            max = xi;
        }
        sum_w += w;
        sum_x += w * xi;
    }
    if min > 0.0 {
        min = 0.0;
    }
    if max == min {
        l_out.fill(0);
        return (0.0, -min);
    }
    let error = |diff: f32| if p.use_mad { diff.abs() } else { diff * diff };
    let quant = |iscale: f32, xi: f32, min: f32| nearest_int(iscale * (xi - min)).clamp(0, p.nmax);
    let mut iscale = nmax_f / (max - min);
    let mut scale = 1.0 / iscale;
    let mut best_error = 0.0f32;
    for ((&xi, &w), out) in x.iter().zip(weights).zip(l_out.iter_mut()) {
        *out = quant(iscale, xi, min) as u8;
        let diff = scale * f32::from(*out) + min - xi;
        best_error += w * error(diff);
    }
    if p.nstep < 1 {
        return (scale, -min);
    }
    for is in 0..=p.nstep {
        iscale = (p.rmin + p.rdelta * is as f32 + nmax_f) / (max - min);
        let mut sum_l = 0.0f32;
        let mut sum_l2 = 0.0f32;
        let mut sum_xl = 0.0f32;
        for ((&xi, &w), aux) in x.iter().zip(weights).zip(laux.iter_mut()) {
            let l = quant(iscale, xi, min);
            *aux = l as u8;
            let lf = l as f32;
            sum_l += w * lf;
            sum_l2 += w * lf * lf;
            sum_xl += w * lf * xi;
        }
        let big_d = sum_w * sum_l2 - sum_l * sum_l;
        if big_d > 0.0 {
            let mut this_scale = (sum_w * sum_xl - sum_x * sum_l) / big_d;
            let mut this_min = (sum_l2 * sum_x - sum_l * sum_xl) / big_d;
            if this_min > 0.0 {
                this_min = 0.0;
                this_scale = sum_xl / sum_l2;
            }
            let mut cur_error = 0.0f32;
            for ((&xi, &w), &aux) in x.iter().zip(weights).zip(laux.iter()) {
                let diff = this_scale * f32::from(aux) + this_min - xi;
                cur_error += w * error(diff);
            }
            if cur_error < best_error {
                l_out.copy_from_slice(laux);
                best_error = cur_error;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    (scale, -min)
}

/// Packs 256 two-bit quants as Q2_K/Q3_K store them: byte `32n + l` holds elements
/// `128n + l + 32j` at bits `2j`.
fn pack_2bit(l: &[u8; QK_K]) -> [u8; QK_K / 4] {
    let mut qs = [0u8; QK_K / 4];
    for n in 0..QK_K / 128 {
        for i in 0..32 {
            let base = 128 * n + i;
            qs[32 * n + i] =
                l[base] | (l[base + 32] << 2) | (l[base + 64] << 4) | (l[base + 96] << 6);
        }
    }
    qs
}

// ---- K-quants ----

fn q2_k(xs: &[f32; QK_K]) -> BlockQ2K {
    const Q4SCALE: f32 = 15.0;
    let params = Qkx2 {
        nmax: 3,
        rmin: -0.5,
        rdelta: 0.1,
        nstep: 15,
        use_mad: true,
    };
    let mut big_l = [0u8; QK_K];
    let mut laux = [0u8; 16];
    let mut scales = [0.0f32; QK_K / 16];
    let mut mins = [0.0f32; QK_K / 16];
    let mut max_scale = 0.0f32;
    let mut max_min = 0.0f32;
    for j in 0..QK_K / 16 {
        let x = &xs[16 * j..16 * j + 16];
        let weights: [f32; 16] = std::array::from_fn(|l| x[l].abs());
        let (scale, min) = make_qkx2_quants(
            x,
            &weights,
            &params,
            &mut big_l[16 * j..16 * j + 16],
            &mut laux,
        );
        scales[j] = scale;
        mins[j] = min;
        if scale > max_scale {
            max_scale = scale;
        }
        if min > max_min {
            max_min = min;
        }
    }
    let mut block = BlockQ2K {
        scales: [0; QK_K / 16],
        qs: [0; QK_K / 4],
        d: f16::ZERO,
        dmin: f16::ZERO,
    };
    if max_scale > 0.0 {
        let iscale = Q4SCALE / max_scale;
        for (out, &s) in block.scales.iter_mut().zip(&scales) {
            *out = nearest_int(iscale * s) as u8;
        }
        block.d = f16::from_f32(max_scale / Q4SCALE);
    }
    if max_min > 0.0 {
        let iscale = Q4SCALE / max_min;
        for (out, &m) in block.scales.iter_mut().zip(&mins) {
            *out |= (nearest_int(iscale * m) << 4) as u8;
        }
        block.dmin = f16::from_f32(max_min / Q4SCALE);
    }
    for j in 0..QK_K / 16 {
        let d = block.d.to_f32() * f32::from(block.scales[j] & 15);
        if d == 0.0 {
            continue;
        }
        let dm = block.dmin.to_f32() * f32::from(block.scales[j] >> 4);
        for ii in 0..16 {
            let l = nearest_int((xs[16 * j + ii] + dm) / d).clamp(0, 3);
            big_l[16 * j + ii] = l as u8;
        }
    }
    block.qs = pack_2bit(&big_l);
    block
}

fn q3_k(xs: &[f32; QK_K]) -> BlockQ3K {
    let mut big_l = [0i8; QK_K];
    let mut scales = [0.0f32; QK_K / 16];
    let mut max_scale = 0.0f32;
    let mut amax = 0.0f32;
    for j in 0..QK_K / 16 {
        scales[j] = make_q3_quants(&xs[16 * j..16 * j + 16], 4, &mut big_l[16 * j..16 * j + 16]);
        if scales[j].abs() > amax {
            amax = scales[j].abs();
            max_scale = scales[j];
        }
    }
    let mut block = BlockQ3K {
        hmask: [0; QK_K / 8],
        qs: [0; QK_K / 4],
        scales: [0; 12],
        d: f16::ZERO,
    };
    if max_scale != 0.0 {
        let iscale = -32.0 / max_scale;
        for (j, &s) in scales.iter().enumerate() {
            // ggml stores the int in an int8_t (wrapping) before clamping.
            let l = ((nearest_int(iscale * s) as i8).clamp(-32, 31) + 32) as u8;
            if j < 8 {
                block.scales[j] = l & 15;
            } else {
                block.scales[j - 8] |= (l & 15) << 4;
            }
            block.scales[j % 4 + 8] |= (l >> 4) << (2 * (j / 4));
        }
        block.d = f16::from_f32(1.0 / iscale);
    }
    let group_scales = decode::q3k_scales(&block.scales);
    for j in 0..QK_K / 16 {
        let d = block.d.to_f32() * f32::from(group_scales[j]);
        if d == 0.0 {
            continue;
        }
        for ii in 0..16 {
            let l = nearest_int(xs[16 * j + ii] / d).clamp(-4, 3);
            big_l[16 * j + ii] = (l + 4) as i8;
        }
    }
    // The high bit of element e goes to bit e/32 of hmask[e % 32].
    let mut low = [0u8; QK_K];
    for (e, (&l, out)) in big_l.iter().zip(low.iter_mut()).enumerate() {
        let mut l = l as u8;
        if l > 3 {
            block.hmask[e % 32] |= 1 << (e / 32);
            l -= 4;
        }
        *out = l;
    }
    block.qs = pack_2bit(&low);
    block
}

/// The shared part of Q4_K and Q5_K: per-32 scale/min search, 6-bit packing of the scales,
/// and the final requantization with the rounded scales. Returns (d, dmin, scales, L).
fn k4_style_scales(xs: &[f32; QK_K], params: &Qkx2) -> (f16, f16, [u8; 12], [u8; QK_K]) {
    let mut big_l = [0u8; QK_K];
    let mut laux = [0u8; 32];
    let mut scales = [0.0f32; QK_K / 32];
    let mut mins = [0.0f32; QK_K / 32];
    let mut max_scale = 0.0f32;
    let mut max_min = 0.0f32;
    for j in 0..QK_K / 32 {
        let x = &xs[32 * j..32 * j + 32];
        let mut sum_x2 = 0.0f32;
        for &v in x {
            sum_x2 += v * v;
        }
        let av_x = (sum_x2 / 32.0).sqrt();
        let weights: [f32; 32] = std::array::from_fn(|l| av_x + x[l].abs());
        let (scale, min) = make_qkx2_quants(
            x,
            &weights,
            params,
            &mut big_l[32 * j..32 * j + 32],
            &mut laux,
        );
        scales[j] = scale;
        mins[j] = min;
        if scale > max_scale {
            max_scale = scale;
        }
        if min > max_min {
            max_min = min;
        }
    }
    let inv_scale = if max_scale > 0.0 {
        63.0 / max_scale
    } else {
        0.0
    };
    let inv_min = if max_min > 0.0 { 63.0 / max_min } else { 0.0 };
    let mut packed = [0u8; 12];
    for j in 0..QK_K / 32 {
        // ggml stores the ints in uint8_t (wrapping) before taking the min with 63.
        let ls = (nearest_int(inv_scale * scales[j]) as u8).min(63);
        let lm = (nearest_int(inv_min * mins[j]) as u8).min(63);
        if j < 4 {
            packed[j] = ls;
            packed[j + 4] = lm;
        } else {
            packed[j + 4] = (ls & 15) | ((lm & 15) << 4);
            packed[j - 4] |= (ls >> 4) << 6;
            packed[j] |= (lm >> 4) << 6;
        }
    }
    let d = f16::from_f32(max_scale / 63.0);
    let dmin = f16::from_f32(max_min / 63.0);
    let (sc, mn) = decode::k4_scale_min(&packed);
    for j in 0..QK_K / 32 {
        let dl = d.to_f32() * f32::from(sc[j]);
        if dl == 0.0 {
            continue;
        }
        let dm = dmin.to_f32() * f32::from(mn[j]);
        for ii in 0..32 {
            let l = nearest_int((xs[32 * j + ii] + dm) / dl).clamp(0, params.nmax);
            big_l[32 * j + ii] = l as u8;
        }
    }
    (d, dmin, packed, big_l)
}

fn q4_k(xs: &[f32; QK_K]) -> BlockQ4K {
    let params = Qkx2 {
        nmax: 15,
        rmin: -1.0,
        rdelta: 0.1,
        nstep: 20,
        use_mad: false,
    };
    let (d, dmin, scales, big_l) = k4_style_scales(xs, &params);
    let mut qs = [0u8; QK_K / 2];
    for c in 0..QK_K / 64 {
        for l in 0..32 {
            qs[32 * c + l] = big_l[64 * c + l] | (big_l[64 * c + l + 32] << 4);
        }
    }
    BlockQ4K {
        d,
        dmin,
        scales,
        qs,
    }
}

fn q5_k(xs: &[f32; QK_K]) -> BlockQ5K {
    let params = Qkx2 {
        nmax: 31,
        rmin: -0.5,
        rdelta: 0.1,
        nstep: 15,
        use_mad: false,
    };
    let (d, dmin, scales, big_l) = k4_style_scales(xs, &params);
    let mut qs = [0u8; QK_K / 2];
    let mut qh = [0u8; QK_K / 8];
    for c in 0..QK_K / 64 {
        for j in 0..32 {
            let (mut l1, mut l2) = (big_l[64 * c + j], big_l[64 * c + j + 32]);
            if l1 > 15 {
                l1 -= 16;
                qh[j] |= 1 << (2 * c);
            }
            if l2 > 15 {
                l2 -= 16;
                qh[j] |= 2 << (2 * c);
            }
            qs[32 * c + j] = l1 | (l2 << 4);
        }
    }
    BlockQ5K {
        d,
        dmin,
        scales,
        qh,
        qs,
    }
}

fn q6_k(xs: &[f32; QK_K]) -> BlockQ6K {
    let mut big_l = [0i8; QK_K];
    let mut scales = [0.0f32; QK_K / 16];
    let mut max_scale = 0.0f32;
    let mut max_abs_scale = 0.0f32;
    for ib in 0..QK_K / 16 {
        let scale = make_qx_quants(
            &xs[16 * ib..16 * ib + 16],
            32,
            &mut big_l[16 * ib..16 * ib + 16],
        );
        scales[ib] = scale;
        if scale.abs() > max_abs_scale {
            max_abs_scale = scale.abs();
            max_scale = scale;
        }
    }
    let mut block = BlockQ6K {
        ql: [0; QK_K / 2],
        qh: [0; QK_K / 4],
        scales: [0; QK_K / 16],
        d: f16::ZERO,
    };
    if max_abs_scale < GROUP_MAX_EPS {
        return block;
    }
    let iscale = -128.0 / max_scale;
    block.d = f16::from_f32(1.0 / iscale);
    for (out, &s) in block.scales.iter_mut().zip(&scales) {
        *out = nearest_int(iscale * s).min(127) as i8;
    }
    for j in 0..QK_K / 16 {
        let d = block.d.to_f32() * f32::from(block.scales[j]);
        if d == 0.0 {
            continue;
        }
        for ii in 0..16 {
            let l = nearest_int(xs[16 * j + ii] / d).clamp(-32, 31);
            big_l[16 * j + ii] = (l + 32) as i8;
        }
    }
    let l = big_l.map(|v| v as u8);
    for n in 0..QK_K / 128 {
        for i in 0..32 {
            let base = 128 * n + i;
            let (q1, q2, q3, q4) = (l[base], l[base + 32], l[base + 64], l[base + 96]);
            block.ql[64 * n + i] = (q1 & 15) | ((q3 & 15) << 4);
            block.ql[64 * n + i + 32] = (q2 & 15) | ((q4 & 15) << 4);
            block.qh[32 * n + i] =
                (q1 >> 4) | ((q2 >> 4) << 2) | ((q3 >> 4) << 4) | ((q4 >> 4) << 6);
        }
    }
    block
}
