//! Unit tests of the reference kernels: hand-computed blocks (values worked out from the
//! layouts in docs/FORMATS.md, not from this code), rounding rules (ties, signs, zero blocks),
//! round trips within each type's error bound, and every dot product against an f64 dot of
//! the dequantized rows.

use half::f16;

use super::*;
use crate::quant::blocks::{
    BlockQ2K, BlockQ3K, BlockQ4K, BlockQ4_0, BlockQ4_1, BlockQ5K, BlockQ5_0, BlockQ5_1, BlockQ6K,
    BlockQ8K, BlockQ8_0, BlockQ8_1, QK,
};
use crate::quant::QK_K;

// ---------------------------------------------------------------- helpers

/// Deterministic test data without a dependency.
struct Rng(crate::rng::SplitMix64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0.next_u64()
    }

    /// Uniform in [0, 1).
    fn uniform(&mut self) -> f64 {
        self.0.next_f64()
    }

    fn normal(&mut self) -> f32 {
        let u1 = self.uniform().max(1e-300);
        let u2 = self.uniform();
        ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
    }

    /// Gaussian values whose scale changes from block to block, with a few outliers, like
    /// real weights and activations.
    fn row(&mut self, n: usize) -> Vec<f32> {
        let mut out = Vec::with_capacity(n);
        for chunk_start in (0..n).step_by(32) {
            let scale = (0.02 + 3.0 * self.uniform()) as f32;
            for _ in chunk_start..(chunk_start + 32).min(n) {
                let outlier = if self.uniform() < 0.01 { 8.0 } else { 1.0 };
                out.push(self.normal() * scale * outlier);
            }
        }
        out
    }

    /// Unit Gaussian values (one scale for the whole row), as in a weight matrix.
    fn gaussian(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.normal()).collect()
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next_u64() as u8).collect()
    }

    /// A finite f16 of moderate size (random raw bytes could be NaN or huge).
    fn scale_f16(&mut self) -> f16 {
        let sign = if self.uniform() < 0.5 { -1.0 } else { 1.0 };
        f16::from_f32(sign * (0.0005 + 0.05 * self.uniform()) as f32)
    }
}

fn dequant(ty: GgmlType, bytes: &[u8]) -> Vec<f32> {
    let n = bytes.len() / ty.block_bytes() * ty.block_elems();
    let mut out = vec![0.0; n];
    dequantize_row(ty, bytes, &mut out);
    out
}

fn quant(ty: GgmlType, xs: &[f32]) -> Vec<u8> {
    let mut out = vec![0u8; ty.row_bytes(xs.len()).expect("whole blocks")];
    quantize_row(ty, xs, &mut out);
    out
}

fn quant_weights(ty: GgmlType, xs: &[f32]) -> Vec<u8> {
    let mut out = vec![0u8; ty.row_bytes(xs.len()).expect("whole blocks")];
    quantize_weights_row(ty, xs, &mut out);
    out
}

fn one_block<T: Pod>(bytes: &[u8]) -> T {
    assert_eq!(bytes.len(), size_of::<T>());
    bytemuck::pod_read_unaligned(bytes)
}

fn bits(xs: &[f32]) -> Vec<u32> {
    xs.iter().map(|x| x.to_bits()).collect()
}

fn h(x: f32) -> f16 {
    f16::from_f32(x)
}

// ---------------------------------------------------------------- dequantization by hand

#[test]
fn dequant_float_types() {
    let f32_bytes: Vec<u8> = [1.5f32, -0.0, f32::MIN_POSITIVE]
        .iter()
        .flat_map(|x| x.to_le_bytes())
        .collect();
    assert_eq!(
        bits(&dequant(GgmlType::F32, &f32_bytes)),
        bits(&[1.5, -0.0, f32::MIN_POSITIVE])
    );
    // f16 0x3c00 = 1, 0xc000 = -2, 0x0001 = 2^-24 (subnormal), 0x7bff = 65504.
    let f16_bytes = [0x00, 0x3c, 0x00, 0xc0, 0x01, 0x00, 0xff, 0x7b];
    assert_eq!(
        dequant(GgmlType::F16, &f16_bytes),
        vec![1.0, -2.0, 2f32.powi(-24), 65504.0]
    );
    // bf16 0x3f80 = 1, 0xc049 = -3.140625.
    let bf16_bytes = [0x80, 0x3f, 0x49, 0xc0];
    assert_eq!(dequant(GgmlType::BF16, &bf16_bytes), vec![1.0, -3.140625]);
}

#[test]
fn dequant_q4_0_q4_1_by_hand() {
    let mut qs = [0u8; 16];
    qs[0] = 0xf0; // element 0: 0, element 16: 15
    qs[5] = 0x39; // element 5: 9, element 21: 3
    let b = BlockQ4_0 { d: h(0.5), qs };
    let y = dequant(GgmlType::Q4_0, bytemuck::bytes_of(&b));
    assert_eq!(
        (y[0], y[16], y[5], y[21], y[1]),
        (-4.0, 3.5, 0.5, -2.5, -4.0)
    );

    let b = BlockQ4_1 {
        d: h(0.25),
        m: h(-1.0),
        qs,
    };
    let y = dequant(GgmlType::Q4_1, bytemuck::bytes_of(&b));
    assert_eq!(
        (y[0], y[16], y[5], y[21], y[1]),
        (-1.0, 2.75, 1.25, -0.25, -1.0)
    );
}

#[test]
fn dequant_q5_0_q5_1_by_hand() {
    let mut qs = [0u8; 16];
    qs[3] = 0x7a; // element 3 low nibble 10, element 19 low nibble 7
    qs[4] = 0x21; // element 4: 1, element 20: 2
                  // Fifth bits of elements 3 and 19 (and 31) set.
    let qh = ((1u32 << 3) | (1 << 19) | (1 << 31)).to_le_bytes();
    let b = BlockQ5_0 { d: h(2.0), qh, qs };
    let y = dequant(GgmlType::Q5_0, bytemuck::bytes_of(&b));
    // q = 26, 23, 1, 2, 16 (element 31: nibble 0 + 16), 0 → minus 16, times 2.
    assert_eq!(
        (y[3], y[19], y[4], y[20], y[31], y[0]),
        (20.0, 14.0, -30.0, -28.0, 0.0, -32.0)
    );

    let b = BlockQ5_1 {
        d: h(0.5),
        m: h(-1.0),
        qh,
        qs,
    };
    let y = dequant(GgmlType::Q5_1, bytemuck::bytes_of(&b));
    assert_eq!(
        (y[3], y[19], y[4], y[20], y[31], y[0]),
        (12.0, 10.5, -0.5, 0.0, 7.0, -1.0)
    );
}

#[test]
fn dequant_q8_types_by_hand() {
    let mut qs = [0i8; QK];
    qs[0] = -128;
    qs[1] = 127;
    qs[31] = -3;
    let b = BlockQ8_0 { d: h(0.125), qs };
    let y = dequant(GgmlType::Q8_0, bytemuck::bytes_of(&b));
    assert_eq!((y[0], y[1], y[2], y[31]), (-16.0, 15.875, 0.0, -0.375));

    let b = BlockQ8_1 {
        d: h(0.125),
        s: h(-0.5),
        qs,
    };
    let y = dequant(GgmlType::Q8_1, bytemuck::bytes_of(&b));
    assert_eq!((y[0], y[1], y[2], y[31]), (-16.0, 15.875, 0.0, -0.375));

    let mut qs = [0i8; QK_K];
    qs[0] = 100;
    qs[255] = -7;
    let b = BlockQ8K {
        d: -0.01,
        qs,
        bsums: [0; 16],
    };
    let y = dequant(GgmlType::Q8_K, bytemuck::bytes_of(&b));
    assert_eq!((y[0], y[1], y[255]), (-0.01 * 100.0, 0.0, -0.01 * -7.0));
}

#[test]
fn dequant_q2_k_by_hand() {
    let mut b = BlockQ2K {
        scales: [0; 16],
        qs: [0; 64],
        d: h(0.5),
        dmin: h(0.25),
    };
    // Element 165: n=1, j=1, s=0, l=5 → qs[37] bits 2..3, scales[10].
    b.qs[37] = 0b0000_1100; // q = 3
    b.scales[10] = 0x27; // scale 7, min 2
                         // Element 0: qs[0] bits 0..1, scales[0]; element 16 uses scales[1].
    b.qs[16] = 0b10; // element 16: q = 2
    b.scales[1] = 0xf1; // scale 1, min 15
    let y = dequant(GgmlType::Q2_K, bytemuck::bytes_of(&b));
    assert_eq!(y[165], 0.5 * 7.0 * 3.0 - 0.25 * 2.0);
    assert_eq!(y[16], 0.5 * 2.0 - 0.25 * 15.0);
    assert_eq!(y[164], -0.5); // same group, q = 0
    assert_eq!(y[0], 0.0);
}

#[test]
fn dequant_q3_k_by_hand() {
    let mut b = BlockQ3K {
        hmask: [0; 32],
        qs: [0; 64],
        scales: [0; 12],
        d: h(0.25),
    };
    // Element 200: n=1, j=2, l=8 → qs[40] bits 4..5; high bit (hmask[8] >> 6) & 1;
    // group 12 → low nibble scales[4] >> 4, high bits (scales[8] >> 6) & 3.
    b.qs[40] = 0b0010_0000; // lo = 2
    b.hmask[8] = 1 << 6; // high bit set: q = 2
    b.scales[4] = 0x50; // low 5
    b.scales[8] = 0b1100_0000; // high 3 → 5 | 48 = 53 → 21
                               // Element 8: group 0, lo 0, high bit clear → q = -4; scale: scales[0] low 0, high
                               // (scales[8] >> 0) & 3 = 0 → -32.
    let y = dequant(GgmlType::Q3_K, bytemuck::bytes_of(&b));
    assert_eq!(y[200], 0.25 * 21.0 * 2.0);
    assert_eq!(y[8], 0.25 * -32.0 * -4.0);
}

#[test]
fn dequant_q4_k_q5_k_by_hand() {
    let mut scales = [0u8; 12];
    scales[1] = 0xc0 | 9; // sub-block 1: scale 9 (+ high bits 3 for sub-block 5)
    scales[5] = 0x40 | 4; // sub-block 1: min 4 (+ high bits 1 for sub-block 5's min)
    scales[9] = 0x2a; // sub-block 5: scale low 10, min low 2 → scale 58, min 18
    let mut qs = [0u8; 128];
    qs[7] = 0xd0; // element 7 (sub-block 0): 0; element 39 (sub-block 1): 13
    qs[64 + 3] = 0x0e; // element 131 (sub-block 4): 14; element 163 (sub-block 5): 0
    qs[64 + 4] = 0x50; // element 164 (sub-block 5): 5
    let b = BlockQ4K {
        d: h(0.5),
        dmin: h(0.125),
        scales,
        qs,
    };
    let y = dequant(GgmlType::Q4_K, bytemuck::bytes_of(&b));
    assert_eq!(y[39], 0.5 * 9.0 * 13.0 - 0.125 * 4.0);
    assert_eq!(y[164], 0.5 * 58.0 * 5.0 - 0.125 * 18.0);
    assert_eq!(y[131], 0.0); // sub-block 4: scale 0, min 0
    assert_eq!(y[7], 0.0);

    // Q5_K: the fifth bit of element e is bit e/32 of qh[e % 32].
    let mut qh = [0u8; 32];
    qh[4] = 1 << 5; // element 164
    qh[7] = 1 << 1; // element 39
    let b = BlockQ5K {
        d: h(0.5),
        dmin: h(0.125),
        scales,
        qh,
        qs,
    };
    let y = dequant(GgmlType::Q5_K, bytemuck::bytes_of(&b));
    assert_eq!(y[39], 0.5 * 9.0 * 29.0 - 0.125 * 4.0);
    assert_eq!(y[164], 0.5 * 58.0 * 21.0 - 0.125 * 18.0);
    assert_eq!(y[163], -0.125 * 18.0);
}

#[test]
fn dequant_q6_k_by_hand() {
    let mut b = BlockQ6K {
        ql: [0; 128],
        qh: [0; 64],
        scales: [0; 16],
        d: h(0.5),
    };
    // Element 230: n=1, g=3, l=6 → high nibble of ql[64+6+32]; (qh[32+6] >> 6) & 3; scale 14.
    b.ql[102] = 0xb0; // low 4 bits of q: 11
    b.qh[38] = 0b1000_0000; // high 2 bits: 2 → q = 11 | 32 = 43 → 11
    b.scales[14] = -3;
    // Element 0: low nibble of ql[0], qh[0] bits 0..1, scale 0.
    b.ql[0] = 0x05;
    b.qh[0] = 0b01; // q = 5 | 16 = 21 → -11
    b.scales[0] = 2;
    let y = dequant(GgmlType::Q6_K, bytemuck::bytes_of(&b));
    assert_eq!(y[230], 0.5 * -3.0 * 11.0);
    assert_eq!(y[0], 0.5 * 2.0 * -11.0);
    assert_eq!(y[1], 0.5 * 2.0 * -32.0);
}

#[test]
fn dequant_reads_rows_at_any_alignment() {
    let mut rng = Rng(crate::rng::SplitMix64::new(7));
    let xs = rng.row(2 * QK_K);
    for ty in [GgmlType::Q8_K, GgmlType::Q4_K, GgmlType::Q4_0] {
        let q = quant_weights(ty, &xs);
        let mut shifted = vec![0u8; q.len() + 1];
        shifted[1..].copy_from_slice(&q);
        assert_eq!(
            bits(&dequant(ty, &shifted[1..])),
            bits(&dequant(ty, &q)),
            "{ty}"
        );
    }
}

// ---------------------------------------------------------------- activation quantization

#[test]
fn q8_0_rounds_ties_to_even() {
    // amax = 127 gives d = 1 and id = 1: the products are the inputs themselves.
    let mut xs = [0.0f32; QK];
    xs[0] = 127.0;
    let ties = [0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5, -3.5];
    xs[1..9].copy_from_slice(&ties);
    let b: BlockQ8_0 = one_block(&quant(GgmlType::Q8_0, &xs));
    assert_eq!(b.d, h(1.0));
    assert_eq!(&b.qs[..9], &[127, 0, 2, 2, 0, -2, -2, 126, -4]);
    // The weight quantizer (ggml's scalar reference) rounds half away from zero instead.
    let w: BlockQ8_0 = one_block(&quant_weights(GgmlType::Q8_0, &xs));
    assert_eq!(&w.qs[..9], &[127, 1, 2, 3, -1, -2, -3, 127, -4]);
}

#[test]
fn q8_1_sum_and_ties() {
    let mut xs = [0.0f32; QK];
    xs[0] = -127.0;
    xs[1] = 2.5;
    xs[2] = 0.5;
    xs[3] = 10.0;
    xs[4] = 3.5;
    let b: BlockQ8_1 = one_block(&quant(GgmlType::Q8_1, &xs));
    assert_eq!(b.d, h(1.0));
    assert_eq!(&b.qs[..5], &[-127, 2, 0, 10, 4]);
    assert_eq!(b.s, h(-127.0 + 2.0 + 10.0 + 4.0));

    // s is the f32 d (not the stored f16 one) times the integer sum, rounded to f16 once.
    let xs: [f32; QK] = std::array::from_fn(|i| if i == 0 { 1.0 } else { 0.3 });
    let b: BlockQ8_1 = one_block(&quant(GgmlType::Q8_1, &xs));
    let sum: i32 = b.qs.iter().map(|&q| i32::from(q)).sum();
    assert_eq!(b.qs[0], 127);
    assert_eq!(b.qs[1], 38); // 0.3 · 127 = 38.1
    assert_eq!(b.s, h((1.0f32 / 127.0) * sum as f32));
}

#[test]
fn q8_zero_blocks() {
    let zeros = [0.0f32; QK_K];
    let b: BlockQ8K = one_block(&quant(GgmlType::Q8_K, &zeros));
    assert_eq!(b.d, 0.0);
    assert!(b.qs.iter().all(|&q| q == 0));
    assert!(b.bsums.iter().all(|&s| s == 0));

    let q = quant(GgmlType::Q8_0, &zeros);
    assert!(q.iter().all(|&byte| byte == 0), "Q8_0 zero block");
    let q = quant(GgmlType::Q8_1, &zeros);
    assert!(q.iter().all(|&byte| byte == 0), "Q8_1 zero block");
    // -0.0 counts as zero too (d = 0, not -0).
    let q = quant(GgmlType::Q8_K, &[-0.0f32; QK_K]);
    let b: BlockQ8K = one_block(&q);
    assert_eq!(b.d.to_bits(), 0);
}

#[test]
fn q8_k_scale_sign_and_ties() {
    // Largest magnitude is negative: iscale = -127 / -127 = 1, d = 1.
    let mut xs = [0.0f32; QK_K];
    xs[3] = -127.0;
    xs[4] = 62.5;
    xs[5] = 63.5;
    xs[6] = -0.5;
    xs[7] = 1.5;
    xs[20] = 100.0;
    let b: BlockQ8K = one_block(&quant(GgmlType::Q8_K, &xs));
    assert_eq!(b.d, 1.0);
    assert_eq!(&b.qs[3..8], &[-127, 62, 64, 0, 2]);
    assert_eq!(b.bsums[0], -127 + 62 + 64 + 2);
    assert_eq!(b.bsums[1], 100);
    assert_eq!(b.bsums[2..], [0; 14]);

    // Largest magnitude positive: iscale = -1, so d = -1 and the quants change sign.
    let neg: Vec<f32> = xs.iter().map(|x| -x).collect();
    let b: BlockQ8K = one_block(&quant(GgmlType::Q8_K, &neg));
    assert_eq!(b.d, -1.0);
    assert_eq!(&b.qs[3..8], &[-127, 62, 64, 0, 2]);
}

#[test]
fn q8_k_uses_first_element_of_largest_magnitude() {
    let mut xs = [0.0f32; QK_K];
    xs[5] = -2.0;
    xs[9] = 2.0;
    xs[10] = 1.0;
    let b: BlockQ8K = one_block(&quant(GgmlType::Q8_K, &xs));
    // max = x[5] = -2: iscale = 63.5, d = 1/63.5 > 0.
    assert_eq!(b.d, 1.0 / 63.5);
    assert_eq!((b.qs[5], b.qs[9], b.qs[10]), (-127, 127, 64)); // 63.5 rounds to even 64

    xs.swap(5, 9); // now x[5] = 2 comes first: d < 0
    let b: BlockQ8K = one_block(&quant(GgmlType::Q8_K, &xs));
    assert_eq!(b.d, -1.0 / 63.5);
    assert_eq!((b.qs[5], b.qs[9], b.qs[10]), (-127, 127, -64));
}

#[test]
fn multi_block_rows_quantize_each_block_alone() {
    let mut rng = Rng(crate::rng::SplitMix64::new(11));
    for ty in [GgmlType::Q8_0, GgmlType::Q8_1, GgmlType::Q8_K] {
        let n_blocks = 5;
        let xs = rng.row(n_blocks * ty.block_elems());
        let whole = quant(ty, &xs);
        for (i, block_xs) in xs.chunks(ty.block_elems()).enumerate() {
            let alone = quant(ty, block_xs);
            let bb = ty.block_bytes();
            assert_eq!(&whole[i * bb..(i + 1) * bb], &alone[..], "{ty} block {i}");
        }
    }
}

#[test]
fn activation_round_trips_within_bounds() {
    let mut rng = Rng(crate::rng::SplitMix64::new(3));
    for ty in [GgmlType::Q8_0, GgmlType::Q8_1, GgmlType::Q8_K] {
        let xs = rng.row(4 * QK_K);
        let y = dequant(ty, &quant(ty, &xs));
        for (block, (xb, yb)) in xs
            .chunks(ty.block_elems())
            .zip(y.chunks(ty.block_elems()))
            .enumerate()
        {
            let amax = xb.iter().fold(0.0f32, |m, x| m.max(x.abs()));
            // Half a step (amax/127/2), plus the f16 rounding of d for Q8_0/Q8_1
            // (relative 2^-11 on a value of at most amax).
            let bound = amax / 254.0 * 1.0001 + amax * 2f32.powi(-11);
            for (x, y) in xb.iter().zip(yb) {
                assert!((x - y).abs() <= bound, "{ty} block {block}: {x} vs {y}");
            }
        }
    }
}

#[test]
fn f16_and_bf16_conversions() {
    // f16: round to nearest even, overflow to infinity.
    let xs = [
        1.0 + 2f32.powi(-11),
        1.0 + 3.0 * 2f32.powi(-11),
        65520.0,
        -1e-8,
    ];
    let q = quant(GgmlType::F16, &xs);
    let got: Vec<u16> = q
        .chunks(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
        .collect();
    assert_eq!(got, vec![0x3c00, 0x3c02, 0x7c00, 0x8000]);

    let cases: [(u32, u16); 9] = [
        (0x3f80_8000, 0x3f80), // tie, even stays
        (0x3f81_8000, 0x3f82), // tie, odd rounds up
        (0x3f80_8001, 0x3f81), // above half
        (0x7f7f_ffff, 0x7f80), // largest finite rounds to infinity
        (0x7f80_0000, 0x7f80), // infinity
        (0x7f80_0001, 0x7fc0), // signalling NaN becomes quiet
        (0xff81_2345, 0xffc1), // NaN keeps sign and top payload bits
        (0x0001_8000, 0x0002), // subnormals are rounded, not flushed
        (0x8000_8000, 0x8000), // -subnormal tie to even
    ];
    let xs: Vec<f32> = cases.iter().map(|&(b, _)| f32::from_bits(b)).collect();
    let q = quant(GgmlType::BF16, &xs);
    for (i, &(input, want)) in cases.iter().enumerate() {
        let got = u16::from_le_bytes([q[2 * i], q[2 * i + 1]]);
        assert_eq!(got, want, "bf16 of {input:#010x}");
    }
    // F32 is a copy.
    let q = quant(GgmlType::F32, &xs);
    assert_eq!(bits(&dequant(GgmlType::F32, &q)), bits(&xs));
}

#[test]
fn nearest_int_is_round_half_even() {
    let cases = [
        (0.5, 0),
        (1.5, 2),
        (2.5, 2),
        (-0.5, 0),
        (-1.5, -2),
        (126.5, 126),
        (-127.0, -127),
        (0.49999997, 0),
        (4194303.0, 4194303),
    ];
    for (x, want) in cases {
        assert_eq!(nearest_int(x), want, "nearest_int({x})");
    }
}

#[test]
#[should_panic(expected = "weight type")]
fn quantize_row_rejects_weight_types() {
    let mut out = vec![0u8; GgmlType::Q4_K.block_bytes()];
    quantize_row(GgmlType::Q4_K, &[0.0; QK_K], &mut out);
}

#[test]
#[should_panic(expected = "want 34")]
fn quantize_row_checks_lengths() {
    let mut out = vec![0u8; 33];
    quantize_row(GgmlType::Q8_0, &[0.0; QK], &mut out);
}

// ---------------------------------------------------------------- weight quantization

#[test]
fn q4_0_weights_by_hand() {
    let mut xs = [0.0f32; QK];
    xs[0] = -8.0; // the signed max: d = -8 / -8 = 1
    xs[1] = 7.0;
    xs[2] = 3.4;
    xs[16] = -2.6;
    xs[17] = 7.9; // 16.4 truncates to 16, clamped to 15
    let b: BlockQ4_0 = one_block(&quant_weights(GgmlType::Q4_0, &xs));
    assert_eq!(b.d, h(1.0));
    // Element j in the low nibble of qs[j], element j + 16 in the high nibble.
    assert_eq!(b.qs[0], (5 << 4), "elements 0 and 16: q = 0, 5"); // -2.6 + 8.5 = 5.9 → 5
    assert_eq!(b.qs[1], 15 | (15 << 4));
    assert_eq!(b.qs[2], 11 | (8 << 4)); // 3.4 + 8.5 = 11.9 → 11; 0 + 8.5 → 8
}

#[test]
fn weight_zero_blocks_stay_zero() {
    for ty in GgmlType::WEIGHT_TYPES {
        let n = QK_K * 2;
        let y = dequant(ty, &quant_weights(ty, &vec![0.0; n]));
        assert!(y.iter().all(|&v| v == 0.0), "{ty}");
    }
}

/// RMS error of quantize_weights_row → dequantize_row relative to the RMS of the data.
fn relative_rmse(ty: GgmlType, xs: &[f32]) -> f64 {
    let y = dequant(ty, &quant_weights(ty, xs));
    let err: f64 = xs
        .iter()
        .zip(&y)
        .map(|(&a, &b)| (f64::from(a) - f64::from(b)).powi(2))
        .sum();
    let norm: f64 = xs.iter().map(|&a| f64::from(a).powi(2)).sum();
    (err / norm).sqrt()
}

#[test]
fn weight_round_trips_within_bounds() {
    let mut rng = Rng(crate::rng::SplitMix64::new(5));
    let xs = rng.gaussian(16 * QK_K);
    // Bounds about 1.25 times what these quantizers reach on unit Gaussian data (the
    // quantization step over √12); a layout or scale bug gives errors of order 1.
    let bounds = [
        (GgmlType::F32, 0.0),
        (GgmlType::F16, 3e-4),
        (GgmlType::BF16, 2.5e-3),
        (GgmlType::Q8_0, 0.007),
        (GgmlType::Q6_K, 0.022),
        (GgmlType::Q5_0, 0.055),
        (GgmlType::Q5_1, 0.05),
        (GgmlType::Q5_K, 0.045),
        (GgmlType::Q4_0, 0.11),
        (GgmlType::Q4_1, 0.1),
        (GgmlType::Q4_K, 0.09),
        (GgmlType::Q3_K, 0.19),
        (GgmlType::Q2_K, 0.36),
    ];
    for (ty, bound) in bounds {
        let rmse = relative_rmse(ty, &xs);
        assert!(rmse <= bound, "{ty}: relative rmse {rmse} > {bound}");
    }
    // The simple types also have a per-element bound: half a step.
    for (i, xb) in xs.chunks(QK).enumerate() {
        let y = dequant(GgmlType::Q8_0, &quant_weights(GgmlType::Q8_0, xb));
        let amax = xb.iter().fold(0.0f32, |m, x| m.max(x.abs()));
        for (x, y) in xb.iter().zip(&y) {
            assert!(
                (x - y).abs() <= amax / 254.0 * 1.001 + amax * 2f32.powi(-11),
                "block {i}"
            );
        }
    }
}

#[test]
fn k_quant_weights_use_full_scale_range() {
    // A sanity check of the scale packing: the largest sub-block scale must decode to the
    // top of its range (63 for Q4_K/Q5_K, ±127/-128 for Q6_K, -32 for Q3_K, 15 for Q2_K).
    let mut rng = Rng(crate::rng::SplitMix64::new(9));
    let xs = rng.row(QK_K);
    let b: BlockQ4K = one_block(&quant_weights(GgmlType::Q4_K, &xs));
    let (sc, _) = decode::k4_scale_min(&b.scales);
    assert_eq!(sc.iter().max(), Some(&63));
    let b: BlockQ5K = one_block(&quant_weights(GgmlType::Q5_K, &xs));
    let (sc, _) = decode::k4_scale_min(&b.scales);
    assert_eq!(sc.iter().max(), Some(&63));
    let b: BlockQ6K = one_block(&quant_weights(GgmlType::Q6_K, &xs));
    assert!(b.scales.iter().any(|&s| s == -128 || s == 127));
    let b: BlockQ3K = one_block(&quant_weights(GgmlType::Q3_K, &xs));
    assert_eq!(decode::q3k_scales(&b.scales).iter().min(), Some(&-32));
    let b: BlockQ2K = one_block(&quant_weights(GgmlType::Q2_K, &xs));
    assert_eq!(b.scales.iter().map(|s| s & 15).max(), Some(15));
}

// ---------------------------------------------------------------- dot products

/// A weight row of `ty` holding `n` elements: either quantized from data, or random bytes
/// with finite scales (to reach bit patterns our quantizers never write).
fn weight_row(rng: &mut Rng, ty: GgmlType, n: usize, random_bytes: bool) -> Vec<u8> {
    if !random_bytes || matches!(ty, GgmlType::F32 | GgmlType::F16 | GgmlType::BF16) {
        return quant_weights(ty, &rng.row(n));
    }
    let mut bytes = rng.bytes(ty.row_bytes(n).expect("whole blocks"));
    // Byte offsets of the f16 scale fields in each block.
    let f16_fields: &[usize] = match ty {
        GgmlType::Q4_0 | GgmlType::Q5_0 | GgmlType::Q8_0 => &[0],
        GgmlType::Q4_1 | GgmlType::Q5_1 | GgmlType::Q4_K | GgmlType::Q5_K => &[0, 2],
        GgmlType::Q2_K => &[80, 82],
        GgmlType::Q3_K => &[108],
        GgmlType::Q6_K => &[208],
        _ => unreachable!("{ty} is not a quantized weight type"),
    };
    for block in bytes.chunks_mut(ty.block_bytes()) {
        for &off in f16_fields {
            block[off..off + 2].copy_from_slice(&rng.scale_f16().to_le_bytes());
        }
    }
    bytes
}

#[test]
fn vec_dot_matches_f64_dot_of_dequantized_rows() {
    let mut rng = Rng(crate::rng::SplitMix64::new(1234));
    for random_bytes in [false, true] {
        for ty in GgmlType::WEIGHT_TYPES {
            // Odd lengths as ggml's test-quantize-fns uses (and f32/f16/bf16 rows that are
            // not multiples of 8).
            let lengths: &[usize] = if ty.block_elems() == 1 {
                &[1, 5, 33, 300]
            } else {
                &[1, 3, 7]
            };
            for &n_blocks in lengths {
                let n = n_blocks * ty.block_elems();
                let w = weight_row(&mut rng, ty, n, random_bytes);
                let x_ty = ty.vec_dot_type();
                let x = quant(x_ty, &rng.row(n));
                let got = vec_dot(ty, n, &w, &x);

                let wd = dequant(ty, &w);
                let xd = dequant(x_ty, &x);
                let exact: f64 = wd
                    .iter()
                    .zip(&xd)
                    .map(|(&a, &b)| f64::from(a) * f64::from(b))
                    .sum();
                let magnitude: f64 = wd
                    .iter()
                    .zip(&xd)
                    .map(|(&a, &b)| (f64::from(a) * f64::from(b)).abs())
                    .sum();
                // f32 rounding of the scale products and of the block accumulation.
                let mut tol = 1e-5 * magnitude + 1e-30;
                if x_ty == GgmlType::Q8_1 {
                    // ggml uses the stored s = f16(d·Σq) for the min term: add its rounding.
                    let mins: f64 = blocks::<BlockQ8_1>(&x)
                        .zip(w.chunks(ty.block_bytes()))
                        .map(|(xb, wb)| {
                            let m = f16::from_le_bytes([wb[2], wb[3]]).to_f32();
                            f64::from(m.abs()) * f64::from(xb.s.to_f32().abs()) * 2f64.powi(-10)
                        })
                        .sum();
                    tol += mins;
                }
                let diff = (f64::from(got) - exact).abs();
                assert!(
                    diff <= tol,
                    "{ty} n={n} random_bytes={random_bytes}: vec_dot {got} vs {exact} \
                     (diff {diff:e}, tol {tol:e})"
                );
            }
        }
    }
}

#[test]
fn vec_dot_float_types_accumulate_in_f64() {
    // Adding 2^-28 to 1 is lost in f32 (below half an ulp) but kept in f64: ggml's scalar
    // f32/f16/bf16 dot products accumulate in double.
    let n = 64;
    let mut w = vec![0.0f32; n];
    let x = vec![1.0f32; n];
    w[0] = 1.0;
    for v in w.iter_mut().skip(1) {
        *v = 2f32.powi(-28);
    }
    let wb = quant(GgmlType::F32, &w);
    let xb = quant(GgmlType::F32, &x);
    let got = vec_dot(GgmlType::F32, n, &wb, &xb);
    assert_eq!(got, (1.0f64 + 63.0 * 2f64.powi(-28)) as f32);
    assert!(got > 1.0);
}

#[test]
fn vec_dot_q8_0_by_hand() {
    let mut wq = [0i8; QK];
    let mut xq = [0i8; QK];
    wq[0] = 3;
    xq[0] = -5;
    wq[31] = 100;
    xq[31] = 2;
    let w = BlockQ8_0 { d: h(0.5), qs: wq };
    let x = BlockQ8_0 { d: h(0.25), qs: xq };
    let mut wb = bytemuck::bytes_of(&w).to_vec();
    let mut xb = bytemuck::bytes_of(&x).to_vec();
    // Two blocks: the second is the first negated, so the total is zero.
    let w2 = BlockQ8_0 { d: h(-0.5), qs: wq };
    wb.extend_from_slice(bytemuck::bytes_of(&w2));
    xb.extend_from_slice(bytemuck::bytes_of(&x));
    assert_eq!(
        vec_dot(GgmlType::Q8_0, QK, &wb[..34], &xb[..34]),
        185.0 * 0.125
    );
    assert_eq!(vec_dot(GgmlType::Q8_0, 2 * QK, &wb, &xb), 0.0);
}

#[test]
fn vec_dot_k_quant_min_terms_use_bsums() {
    // Q4_K with all quants 0 contributes only -dmin·m·Σx: computed from bsums alone.
    let mut scales = [0u8; 12];
    scales[4] = 3; // sub-block 0 min 3
    let w = BlockQ4K {
        d: h(1.0),
        dmin: h(0.5),
        scales,
        qs: [0; 128],
    };
    let mut xs = [0.0f32; QK_K];
    xs[0] = -127.0; // d = 1
    xs[1] = 10.0;
    xs[40] = 99.0; // sub-block 1: min 0, no contribution
    let x = quant(GgmlType::Q8_K, &xs);
    let got = vec_dot(GgmlType::Q4_K, QK_K, bytemuck::bytes_of(&w), &x);
    assert_eq!(got, -(0.5 * 3.0) * (-127.0 + 10.0));
}

#[test]
#[should_panic(expected = "activation-only")]
fn vec_dot_rejects_activation_types() {
    let row = vec![0u8; GgmlType::Q8_K.block_bytes()];
    vec_dot(GgmlType::Q8_K, QK_K, &row, &row);
}
