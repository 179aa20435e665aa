//! Elementwise math bit-exact with ggml's x86 (AVX2+FMA) CPU build: its
//! vectorized `expf`, SiLU, softmax and the lane order of its f16 dot products.
//!
//! The fixture models amplify a one-ulp difference before an activation is
//! quantized into a whole quant step (several hundredths of a logit), so
//! matching llama.cpp means reproducing its arithmetic, not just its formulas.
//! Each function here is the scalar emulation of one lane of ggml's SIMD code;
//! `f32::mul_add` is a fused multiply-add, as `_mm256_fmadd_ps` is.

use half::f16;

/// ggml's `ggml_v_expf` (AVX2 + FMA), one lane: a range reduction to
/// 2^n·e^b and a degree-5 polynomial, with ggml's overflow/underflow handling
/// (above ~88.38 → inf, below ~-103.97 → 0).
#[inline(always)]
pub fn expf(x: f32) -> f32 {
    let r = f32::from_bits(0x4B40_0000); // 0x1.8p23
    let z = x.mul_add(f32::from_bits(0x3FB8_AA3B), r); // 0x1.715476p+0
    let n = z - r;
    // fnmadd(a, b, c) = c - a·b, fused.
    let b = (-n).mul_add(
        f32::from_bits(0x35BF_BE8E),                  // 0x1.7f7d1cp-20
        (-n).mul_add(f32::from_bits(0x3F31_7200), x), // 0x1.62e4p-1
    );
    let e = z.to_bits() << 23;
    let k = f32::from_bits(e.wrapping_add(1.0f32.to_bits()));
    let c = n.abs() > 126.0;
    let u = b * b;
    let j = f32::from_bits(0x3C07_2010) // 0x1.0e4020p-7
        .mul_add(b, f32::from_bits(0x3D2B_9F17)) // 0x1.573e2ep-5
        .mul_add(
            u,
            f32::from_bits(0x3E2A_AF33).mul_add(b, f32::from_bits(0x3EFF_FEDB)), // 0x1.555e66p-3, 0x1.fffdb6p-2
        )
        .mul_add(u, f32::from_bits(0x3F7F_FFF6) * b); // 0x1.ffffecp-1
    if !c {
        return j.mul_add(k, k);
    }
    let g: u32 = if n <= 0.0 { 0x8200_0000 } else { 0 };
    let s1 = f32::from_bits(g.wrapping_add(0x7F00_0000));
    let s2 = f32::from_bits(e.wrapping_sub(g));
    if n.abs() > 192.0 {
        s1 * s1
    } else {
        s2.mul_add(j, s2) * s1
    }
}

/// ggml's vectorized SiLU `x / (1 + e^(0 - x))` (`ggml_v_silu`).
#[inline(always)]
pub fn silu(x: f32) -> f32 {
    x / (1.0 + expf(0.0 - x))
}

crate::fma_dispatch! {
    /// `g[i] = silu(g[i]) * u[i]`, as `ggml_vec_swiglu_f32` computes it: the vector
    /// path for whole groups of 8, libm's `expf` for the tail.
    pub fn swiglu_in_place(g: &mut [f32], u: &[f32]) => swiglu_impl, swiglu_fma
}

#[inline(always)]
fn swiglu_impl(g: &mut [f32], u: &[f32]) {
    let whole = g.len() / 8 * 8;
    for (gv, &uv) in g[..whole].iter_mut().zip(&u[..whole]) {
        *gv = silu(*gv) * uv;
    }
    for (gv, &uv) in g[whole..].iter_mut().zip(&u[whole..]) {
        *gv = *gv / (1.0 + (-*gv).exp()) * uv;
    }
}

/// Whether the CPU has FMA: `f32::mul_add` is exact either way, but without FMA
/// enabled at compile time it is a library call per operation, so the hot
/// elementwise functions below each have an FMA-compiled twin picked here.
#[inline(always)]
pub fn has_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Declares `$name` dispatching to an FMA-compiled copy of the `#[inline(always)]`
/// function `$imp` when the CPU has FMA (same results, one instruction per `mul_add`).
#[macro_export]
macro_rules! fma_dispatch {
    ($(#[$m:meta])* $vis:vis fn $name:ident$(<$lt:lifetime>)?($($arg:ident: $ty:ty),*) $(-> $ret:ty)? => $imp:path, $fma:ident) => {
        $(#[$m])*
        $vis fn $name$(<$lt>)?($($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            {
                if $crate::ggml_math::has_fma() {
                    // SAFETY: the CPU supports FMA, checked just above.
                    return unsafe { $fma($($arg),*) };
                }
            }
            $imp($($arg),*)
        }

        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "fma")]
        unsafe fn $fma$(<$lt>)?($($arg: $ty),*) $(-> $ret)? {
            $imp($($arg),*)
        }
    };
}

/// f16 → f32 through a table (exact, as ggml's `ggml_table_f32_f16`): one load
/// instead of a function call per value on the attention hot path.
#[inline(always)]
pub fn f16_to_f32(h: f16) -> f32 {
    F16_TABLE[usize::from(h.to_bits())]
}

static F16_TABLE: std::sync::LazyLock<Box<[f32]>> =
    std::sync::LazyLock::new(|| (0..=u16::MAX).map(|b| f16::from_bits(b).to_f32()).collect());

/// The horizontal sum of 8 lanes in the order of ggml's and tinyBLAS's
/// `hsum`: (l0+l4)+(l2+l6) + (l1+l5)+(l3+l7).
#[inline(always)]
pub fn hsum8(l: &[f32; 8]) -> f32 {
    let t = [l[0] + l[4], l[1] + l[5], l[2] + l[6], l[3] + l[7]];
    (t[0] + t[2]) + (t[1] + t[3])
}

/// Softmax of one row in place as `ggml_soft_max` computes it: `e^(x - max)`
/// with the vector `expf` over groups of 8 (the sum accumulated per group in
/// f64), libm for the tail unless `padded` (a row ggml pads with masked
/// entries to a multiple of 8, so every real entry takes the vector path), then
/// a multiply by the f32 reciprocal of the sum. With AVX2 the groups of 8 go
/// through [`expf`] in the lanes of one vector (the same operations: same bits).
pub fn softmax_in_place(row: &mut [f32], padded: bool) {
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        // SAFETY: the CPU supports AVX2 and FMA, checked just above.
        return unsafe { softmax_avx2(row, padded) };
    }
    softmax_fma_dispatch(row, padded)
}

crate::fma_dispatch! {
    /// [`softmax_in_place`] one lane at a time (the definition).
    pub fn softmax_fma_dispatch(row: &mut [f32], padded: bool) => softmax_impl, softmax_fma
}

#[cfg(target_arch = "x86_64")]
fn has_avx2_fma() -> bool {
    static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *HAS.get_or_init(|| {
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
    })
}

/// [`expf`] of 8 lanes, the same operations in each lane, or `None` when a lane needs
/// `expf`'s rare path (`|n| > 126`: results that overflow or go subnormal), which the
/// caller then takes lane by lane.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2,fma")]
fn expf8(x: std::arch::x86_64::__m256) -> Option<std::arch::x86_64::__m256> {
    use std::arch::x86_64::*;
    let c = |bits: u32| _mm256_set1_ps(f32::from_bits(bits));
    let r = c(0x4B40_0000);
    let z = _mm256_fmadd_ps(x, c(0x3FB8_AA3B), r);
    let n = _mm256_sub_ps(z, r);
    let b = _mm256_fnmadd_ps(n, c(0x35BF_BE8E), _mm256_fnmadd_ps(n, c(0x3F31_7200), x));
    let abs_n = _mm256_andnot_ps(_mm256_set1_ps(-0.0), n);
    if _mm256_movemask_ps(_mm256_cmp_ps::<_CMP_GT_OQ>(abs_n, _mm256_set1_ps(126.0))) != 0 {
        return None;
    }
    let e = _mm256_slli_epi32::<23>(_mm256_castps_si256(z));
    let k = _mm256_castsi256_ps(_mm256_add_epi32(
        e,
        _mm256_set1_epi32(1.0f32.to_bits() as i32),
    ));
    let u = _mm256_mul_ps(b, b);
    let j = _mm256_fmadd_ps(
        _mm256_fmadd_ps(
            _mm256_fmadd_ps(c(0x3C07_2010), b, c(0x3D2B_9F17)),
            u,
            _mm256_fmadd_ps(c(0x3E2A_AF33), b, c(0x3EFF_FEDB)),
        ),
        u,
        _mm256_mul_ps(c(0x3F7F_FFF6), b),
    );
    Some(_mm256_fmadd_ps(j, k, k))
}

/// [`softmax_impl`] with the groups of 8 in vectors ([`expf8`]) and [`hsum8`] in registers.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn softmax_avx2(row: &mut [f32], padded: bool) {
    use std::arch::x86_64::*;
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0f64;
    let whole = if padded { row.len() } else { row.len() / 8 * 8 };
    let vmax = _mm256_set1_ps(max);
    let full = whole / 8 * 8;
    for group in row[..full].chunks_exact_mut(8) {
        // SAFETY: `group` is 8 f32, read and written unaligned.
        let x = _mm256_sub_ps(unsafe { _mm256_loadu_ps(group.as_ptr()) }, vmax);
        let Some(v) = expf8(x) else {
            let mut lanes = [0.0f32; 8];
            for (lane, v) in lanes.iter_mut().zip(group.iter_mut()) {
                *v = expf(*v - max);
                *lane = *v;
            }
            sum += hsum8(&lanes) as f64;
            continue;
        };
        // SAFETY: as above.
        unsafe { _mm256_storeu_ps(group.as_mut_ptr(), v) };
        // `hsum8`: t_i = lane i + lane i+4, then (t0 + t2) + (t1 + t3).
        let t = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let u = _mm_add_ps(t, _mm_movehl_ps(t, t));
        sum += _mm_cvtss_f32(_mm_add_ss(u, _mm_shuffle_ps::<1>(u, u))) as f64;
    }
    // A padded row's last partial group: its missing lanes are ggml's masked entries (0).
    if full < whole {
        let mut lanes = [0.0f32; 8];
        for (lane, v) in lanes.iter_mut().zip(row[full..whole].iter_mut()) {
            *v = expf(*v - max);
            *lane = *v;
        }
        sum += hsum8(&lanes) as f64;
    }
    for v in &mut row[whole..] {
        *v = (*v - max).exp();
        sum += *v as f64;
    }
    let inv = (1.0 / sum) as f32;
    for v in row.iter_mut() {
        *v *= inv;
    }
}

#[inline(always)]
fn softmax_impl(row: &mut [f32], padded: bool) {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0f64;
    let whole = if padded { row.len() } else { row.len() / 8 * 8 };
    for group in row[..whole].chunks_mut(8) {
        let mut lanes = [0.0f32; 8];
        for (lane, v) in lanes.iter_mut().zip(group.iter_mut()) {
            *v = expf(*v - max);
            *lane = *v;
        }
        sum += hsum8(&lanes) as f64;
    }
    for v in &mut row[whole..] {
        *v = (*v - max).exp();
        sum += *v as f64;
    }
    let inv = (1.0 / sum) as f32;
    for v in row.iter_mut() {
        *v *= inv;
    }
}

/// An f16 dot product in tinyBLAS's order (llamafile's sgemm, which ggml's x86
/// build uses for F16 matrix products): one 8-lane FMA accumulator over the
/// length, then [`hsum8`]. A tail shorter than 8 is added in f32 afterwards.
#[inline(always)]
pub fn dot_f16(a: &[f16], b: &[f16]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    let mut acc = [0.0f32; 8];
    let whole = a.len() / 8 * 8;
    for (ca, cb) in a[..whole].chunks_exact(8).zip(b[..whole].chunks_exact(8)) {
        for l in 0..8 {
            acc[l] = f16_to_f32(ca[l]).mul_add(f16_to_f32(cb[l]), acc[l]);
        }
    }
    let mut sum = hsum8(&acc);
    for (x, y) in a[whole..].iter().zip(&b[whole..]) {
        sum += f16_to_f32(*x) * f16_to_f32(*y);
    }
    sum
}

/// `GGML_F32x8_REDUCE` of four 8-lane accumulators (ggml's `vec_dot` reduction on AVX2):
/// `x = (a0+a2) + (a1+a3)`, the 128-bit halves added, then two `hadd`s.
#[inline(always)]
pub fn reduce4x8(acc: &[[f32; 8]; 4]) -> f32 {
    let mut x = [0.0f32; 8];
    for (l, v) in x.iter_mut().enumerate() {
        *v = (acc[0][l] + acc[2][l]) + (acc[1][l] + acc[3][l]);
    }
    let t = [x[0] + x[4], x[1] + x[5], x[2] + x[6], x[3] + x[7]];
    (t[0] + t[1]) + (t[2] + t[3])
}

/// An f16 dot product in `ggml_vec_dot_f16`'s AVX2 order (a matrix product over one token):
/// four 8-lane FMA accumulators over steps of 32 ([`reduce4x8`]), the tail added in f64.
#[inline(always)]
pub fn dot_f16_vec(a: &[f16], b: &[f16]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    let mut acc = [[0.0f32; 8]; 4];
    let whole = a.len() / 32 * 32;
    for (ca, cb) in a[..whole].chunks_exact(32).zip(b[..whole].chunks_exact(32)) {
        for (k, (x, y)) in ca.iter().zip(cb).enumerate() {
            let (j, l) = (k / 8, k % 8);
            acc[j][l] = f16_to_f32(*x).mul_add(f16_to_f32(*y), acc[j][l]);
        }
    }
    let mut sum = f64::from(reduce4x8(&acc));
    for (x, y) in a[whole..].iter().zip(&b[whole..]) {
        sum += f64::from(f16_to_f32(*x) * f16_to_f32(*y));
    }
    sum as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The vector softmax gives the lane-by-lane definition's bits: every length around the
    /// groups of 8, padded or not, scores spread wide enough to reach `expf`'s rare path
    /// (under -87: subnormal results) and masked (-inf) entries.
    #[test]
    fn vector_softmax_equals_the_definition() {
        let mut rng = crate::rng::SplitMix64::new(5);
        for len in 1..=41 {
            for spread in [0.5f32, 8.0, 60.0, 200.0] {
                for padded in [false, true] {
                    let mut row: Vec<f32> = (0..len)
                        .map(|_| (rng.next_f32() * 2.0 - 1.0) * spread)
                        .collect();
                    if len > 5 {
                        row[3] = f32::NEG_INFINITY;
                    }
                    let mut want = row.clone();
                    softmax_fma_dispatch(&mut want, padded);
                    let mut got = row.clone();
                    softmax_in_place(&mut got, padded);
                    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                    assert_eq!(
                        bits(&got),
                        bits(&want),
                        "len {len} spread {spread} padded {padded}"
                    );
                }
            }
        }
    }

    fn ulps(a: f32, b: f32) -> u32 {
        (a.to_bits() as i64 - b.to_bits() as i64).unsigned_abs() as u32
    }

    #[test]
    fn expf_is_within_two_ulps_of_libm() {
        let mut x = -87.0f32;
        while x < 88.0 {
            let (got, want) = (expf(x), x.exp());
            assert!(ulps(got, want) <= 2, "expf({x}) = {got}, libm {want}");
            x += 0.013;
        }
    }

    #[test]
    fn expf_edges() {
        assert_eq!(expf(0.0), 1.0);
        assert_eq!(expf(f32::NEG_INFINITY), 0.0);
        assert_eq!(expf(-200.0), 0.0);
        assert_eq!(expf(100.0), f32::INFINITY);
        assert!(
            expf(-100.0) > 0.0 && expf(-100.0) < 1e-43,
            "subnormal range"
        );
    }

    #[test]
    fn softmax_handles_masked_entries_and_sums_to_one() {
        let mut row = vec![
            0.5,
            -1.0,
            2.0,
            f32::NEG_INFINITY,
            0.25,
            3.0,
            -7.0,
            1.0,
            0.0,
            0.1,
        ];
        softmax_in_place(&mut row, true);
        assert_eq!(row[3], 0.0);
        let s: f32 = row.iter().sum();
        assert!((s - 1.0).abs() < 1e-6);
        let mut row2 = vec![0.5, -1.0, 2.0, 0.3, 0.25, 3.0, -7.0, 1.0, 0.0, 0.1];
        softmax_in_place(&mut row2, false);
        assert!((row2.iter().sum::<f32>() - 1.0).abs() < 1e-6);
    }

    #[test]
    fn hsum_order() {
        // Chosen so that a left-to-right sum rounds differently.
        let l = [1e8, 1.0, -1e8, 1.0, 1.0, 0.0, 0.0, 0.0];
        assert_eq!(hsum8(&l), ((1e8f32 + 1.0) + (-1e8 + 0.0)) + (1.0 + 1.0));
    }

    #[test]
    fn dot_f16_matches_exact_sum_closely() {
        let a: Vec<f16> = (0..64)
            .map(|i| f16::from_f32((i as f32 * 0.37).sin()))
            .collect();
        let b: Vec<f16> = (0..64)
            .map(|i| f16::from_f32((i as f32 * 0.11).cos()))
            .collect();
        let exact: f64 = a.iter().zip(&b).map(|(x, y)| x.to_f64() * y.to_f64()).sum();
        assert!((dot_f16(&a, &b) as f64 - exact).abs() < 1e-5);
    }
}
