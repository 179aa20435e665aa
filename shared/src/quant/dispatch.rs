//! The kernel table, picked once at run time from the CPU's features.
//!
//! One binary runs on many Xeons, so the SIMD level is chosen when the process first asks for
//! [`Kernels::get`]: the best level the CPU supports (`is_x86_feature_detected!`), lowered by
//! the environment variable `MOESHARD_KERNELS=scalar|avx2|avx512|amx` when set (for tests,
//! benches and debugging); `MOESHARD_Q8_0_ORDER=blocks` opts the AMX level into its faster
//! Q8_0 batch order (see [`Kernels::has_block_order`]). The choice is logged once.
//! [`Kernels::scalar`] is the portable reference table and [`Kernels::supported`] lists every
//! level the host can run, for tests and comparisons.
//!
//! The SIMD functions are `#[target_feature]` functions; a table holding them is only built
//! after the features were detected, which is what makes the calls below sound. Every public
//! method checks lengths first and panics on a mismatch: that is a caller bug, as in
//! [`reference`].

use std::fmt;
use std::sync::OnceLock;

use super::reference;
use super::GgmlType;

/// A SIMD level of the kernel table.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Isa {
    /// The portable reference kernels.
    Scalar,
    /// AVX2 + FMA + F16C.
    Avx2,
    /// AVX2 plus AVX-512 F, BW, VL and VNNI (Cascade Lake and later, Zen 4): faster Q4_K, Q6_K
    /// and Q8_0 kernels, AVX2 for the rest.
    Avx512,
    /// AVX-512 plus the AMX-INT8 tile unit (Sapphire Rapids and later, with the tile state
    /// granted by the OS): batches of Q4_K rows × tokens on the tiles.
    Amx,
}

impl Isa {
    /// Every level, lowest first.
    pub const ALL: [Isa; 4] = [Isa::Scalar, Isa::Avx2, Isa::Avx512, Isa::Amx];

    /// The name used in logs and in `MOESHARD_KERNELS`.
    pub const fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
            Isa::Amx => "amx",
        }
    }

    /// Parses a name of [`Isa::name`] (case-insensitive).
    pub fn from_name(name: &str) -> Option<Isa> {
        Isa::ALL
            .into_iter()
            .find(|isa| isa.name().eq_ignore_ascii_case(name.trim()))
    }

    /// Whether this CPU can run the level.
    pub fn is_supported(self) -> bool {
        match self {
            Isa::Scalar => true,
            Isa::Avx2 => has_avx2(),
            Isa::Avx512 => has_avx2() && has_avx512(),
            Isa::Amx => has_avx2() && has_avx512() && has_amx(),
        }
    }

    /// The best level this CPU supports.
    pub fn best() -> Isa {
        Isa::ALL
            .into_iter()
            .rev()
            .find(|isa| isa.is_supported())
            .unwrap_or(Isa::Scalar)
    }
}

impl fmt::Display for Isa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(target_arch = "x86_64")]
fn has_avx2() -> bool {
    is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
        && is_x86_feature_detected!("f16c")
}

#[cfg(target_arch = "x86_64")]
fn has_avx512() -> bool {
    is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512vl")
        && is_x86_feature_detected!("avx512vnni")
}

#[cfg(target_arch = "x86_64")]
fn has_amx() -> bool {
    super::x86_64::amx::available()
}

#[cfg(not(target_arch = "x86_64"))]
fn has_amx() -> bool {
    false
}

#[cfg(not(target_arch = "x86_64"))]
fn has_avx2() -> bool {
    false
}

#[cfg(not(target_arch = "x86_64"))]
fn has_avx512() -> bool {
    false
}

/// `(n, weight row, activation rows, one result per activation row)`.
///
/// Safety contract of every entry: the CPU has the table's features, `w` is a whole row of `n`
/// elements of the entry's type, `xs.len()` is `out.len()` rows of `n` elements of its
/// `vec_dot_type`, and `n > 0`.
type DotFn = unsafe fn(usize, &[u8], &[u8], &mut [f32]);
/// `(n, weight rows, activation rows, out, stride)`: `out[r * stride + t]` = row r · token t.
type BatchRowsFn = unsafe fn(usize, &[u8], &[u8], &mut [f32], usize);

/// `(source values, destination bytes)`; contract: the CPU has the table's features and `dst`
/// is exactly the quantized row of `src`.
type QuantizeFn = unsafe fn(&[f32], &mut [u8]);

/// Slot of a type in the tables (its position in [`GgmlType::ALL`]).
const fn slot(ty: GgmlType) -> usize {
    match ty {
        GgmlType::F32 => 0,
        GgmlType::F16 => 1,
        GgmlType::Q4_0 => 2,
        GgmlType::Q4_1 => 3,
        GgmlType::Q5_0 => 4,
        GgmlType::Q5_1 => 5,
        GgmlType::Q8_0 => 6,
        GgmlType::Q8_1 => 7,
        GgmlType::Q2_K => 8,
        GgmlType::Q3_K => 9,
        GgmlType::Q4_K => 10,
        GgmlType::Q5_K => 11,
        GgmlType::Q6_K => 12,
        GgmlType::Q8_K => 13,
        GgmlType::BF16 => 14,
        GgmlType::Q4_K_R8 => 15,
    }
}

const N_TYPES: usize = GgmlType::ALL.len();

/// Dot products and activation quantization for one SIMD level.
///
/// Obtain one with [`Kernels::get`] (the process-wide choice), [`Kernels::scalar`] or
/// [`Kernels::for_isa`].
pub struct Kernels {
    isa: Isa,
    // Invariant: every entry may run on this CPU (the table is only handed out after its
    // features were detected).
    dot: [DotFn; N_TYPES],
    /// `dot` with the entries whose float order differs in ggml's batched path (llamafile's
    /// tinyBLAS, used for two tokens or more: F32, F16, BF16) replaced.
    gemm: [DotFn; N_TYPES],
    quantize: [QuantizeFn; N_TYPES],
    /// Kernels of several consecutive weight rows times one activation row (`(n, rows, x,
    /// one result per row)`, same contract with the roles of `w` and `xs` swapped), each
    /// result bit-identical to `dot`'s; `None` where rows are computed one at a time.
    rows: [Option<DotFn>; N_TYPES],
    /// Kernels of several weight rows times several activation rows, each result
    /// bit-identical to `dot`'s (the types whose batched order is the per-token one);
    /// `None` where rows go through `dot` one at a time.
    batch_rows: [Option<BatchRowsFn>; N_TYPES],
    /// Q8_0 batches in exact-block order on the tile unit (AMX level, opt-in: see
    /// [`ENV_Q8_0_ORDER`]).
    q8_0_blocks: bool,
}

impl fmt::Debug for Kernels {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        (f.debug_struct("Kernels").field("isa", &self.isa))
            .field("q8_0_blocks", &self.q8_0_blocks)
            .finish()
    }
}

/// Reference dot product of type `TY` (a ggml id), row by row.
fn scalar_dot<const TY: u32>(n: usize, w: &[u8], xs: &[u8], out: &mut [f32]) {
    let Some(ty) = GgmlType::from_id(TY) else {
        unreachable!("scalar table built from valid ids")
    };
    let x_row = xs.len() / out.len();
    for (o, x) in out.iter_mut().zip(xs.chunks_exact(x_row)) {
        *o = reference::vec_dot(ty, n, w, x);
    }
}

fn scalar_quantize<const TY: u32>(src: &[f32], dst: &mut [u8]) {
    let Some(ty) = GgmlType::from_id(TY) else {
        unreachable!("scalar table built from valid ids")
    };
    reference::quantize_row(ty, src, dst);
}

macro_rules! table {
    ($f:ident) => {
        [
            $f::<{ GgmlType::F32.id() }>,
            $f::<{ GgmlType::F16.id() }>,
            $f::<{ GgmlType::Q4_0.id() }>,
            $f::<{ GgmlType::Q4_1.id() }>,
            $f::<{ GgmlType::Q5_0.id() }>,
            $f::<{ GgmlType::Q5_1.id() }>,
            $f::<{ GgmlType::Q8_0.id() }>,
            $f::<{ GgmlType::Q8_1.id() }>,
            $f::<{ GgmlType::Q2_K.id() }>,
            $f::<{ GgmlType::Q3_K.id() }>,
            $f::<{ GgmlType::Q4_K.id() }>,
            $f::<{ GgmlType::Q5_K.id() }>,
            $f::<{ GgmlType::Q6_K.id() }>,
            $f::<{ GgmlType::Q8_K.id() }>,
            $f::<{ GgmlType::BF16.id() }>,
            $f::<{ GgmlType::Q4_K_R8.id() }>,
        ]
    };
}

static SCALAR: Kernels = Kernels {
    isa: Isa::Scalar,
    dot: table!(scalar_dot),
    gemm: table!(scalar_dot),
    quantize: table!(scalar_quantize),
    rows: [None; N_TYPES],
    batch_rows: [None; N_TYPES],
    q8_0_blocks: false,
};

#[cfg(target_arch = "x86_64")]
type Tables = ([DotFn; N_TYPES], [DotFn; N_TYPES], [QuantizeFn; N_TYPES]);

/// The AVX2 entries (the scalar ones where AVX2 has nothing better): `(dot, gemm, quantize)`.
#[cfg(target_arch = "x86_64")]
const fn avx2_tables() -> Tables {
    use super::x86_64::avx2;
    let mut dot: [DotFn; N_TYPES] = table!(scalar_dot);
    dot[slot(GgmlType::F32)] = avx2::dot_f32;
    dot[slot(GgmlType::F16)] = avx2::dot_f16;
    dot[slot(GgmlType::BF16)] = avx2::dot_bf16;
    dot[slot(GgmlType::Q4_0)] = avx2::dot_q4_0;
    dot[slot(GgmlType::Q4_1)] = avx2::dot_q4_1;
    dot[slot(GgmlType::Q5_0)] = avx2::dot_q5_0;
    dot[slot(GgmlType::Q5_1)] = avx2::dot_q5_1;
    dot[slot(GgmlType::Q8_0)] = avx2::dot_q8_0;
    dot[slot(GgmlType::Q2_K)] = avx2::dot_q2_k;
    dot[slot(GgmlType::Q3_K)] = avx2::dot_q3_k;
    dot[slot(GgmlType::Q4_K)] = avx2::dot_q4_k;
    dot[slot(GgmlType::Q5_K)] = avx2::dot_q5_k;
    dot[slot(GgmlType::Q6_K)] = avx2::dot_q6_k;
    let mut quantize: [QuantizeFn; N_TYPES] = table!(scalar_quantize);
    quantize[slot(GgmlType::F16)] = avx2::quantize_f16;
    quantize[slot(GgmlType::Q8_0)] = avx2::quantize_q8_0;
    quantize[slot(GgmlType::Q8_1)] = avx2::quantize_q8_1;
    quantize[slot(GgmlType::Q8_K)] = avx2::quantize_q8_k;
    let mut gemm = dot;
    gemm[slot(GgmlType::F32)] = avx2::gemm_f32;
    gemm[slot(GgmlType::F16)] = avx2::gemm_f16;
    gemm[slot(GgmlType::BF16)] = avx2::gemm_bf16;
    (dot, gemm, quantize)
}

#[cfg(target_arch = "x86_64")]
static AVX2: Kernels = {
    let (dot, gemm, quantize) = avx2_tables();
    let mut rows: [Option<DotFn>; N_TYPES] = [None; N_TYPES];
    rows[slot(GgmlType::Q8_0)] = Some(super::x86_64::avx2::dot_rows_q8_0);
    let mut batch_rows: [Option<BatchRowsFn>; N_TYPES] = [None; N_TYPES];
    batch_rows[slot(GgmlType::Q4_0)] = Some(super::x86_64::avx2::batch_rows_q4_0);
    batch_rows[slot(GgmlType::Q4_1)] = Some(super::x86_64::avx2::batch_rows_q4_1);
    batch_rows[slot(GgmlType::Q5_0)] = Some(super::x86_64::avx2::batch_rows_q5_0);
    batch_rows[slot(GgmlType::Q5_1)] = Some(super::x86_64::avx2::batch_rows_q5_1);
    batch_rows[slot(GgmlType::Q8_0)] = Some(super::x86_64::avx2::batch_rows_q8_0);
    Kernels {
        isa: Isa::Avx2,
        dot,
        gemm,
        quantize,
        rows,
        batch_rows,
        q8_0_blocks: false,
    }
};

#[cfg(target_arch = "x86_64")]
static AVX512: Kernels = avx512_kernels(Isa::Avx512);

/// The AMX level: AVX-512's table; `repack_dot_tiles` uses the tiles.
#[cfg(target_arch = "x86_64")]
static AMX: Kernels = avx512_kernels(Isa::Amx);

/// The AMX level with Q8_0 batches in exact-block order on the tiles ([`ENV_Q8_0_ORDER`]).
#[cfg(target_arch = "x86_64")]
static AMX_Q8_0_BLOCKS: Kernels = Kernels {
    q8_0_blocks: true,
    ..avx512_kernels(Isa::Amx)
};

/// The AVX-512 entries (AVX2's where AVX-512 has nothing better), for `isa`.
#[cfg(target_arch = "x86_64")]
const fn avx512_kernels(isa: Isa) -> Kernels {
    use super::x86_64::avx512;
    let (mut dot, mut gemm, quantize) = avx2_tables();
    dot[slot(GgmlType::Q4_K)] = avx512::dot_q4_k;
    dot[slot(GgmlType::Q6_K)] = avx512::dot_q6_k;
    dot[slot(GgmlType::Q8_0)] = avx512::dot_q8_0;
    dot[slot(GgmlType::Q4_0)] = avx512::dot_q4_0;
    dot[slot(GgmlType::Q4_1)] = avx512::dot_q4_1;
    dot[slot(GgmlType::Q5_0)] = avx512::dot_q5_0;
    dot[slot(GgmlType::Q5_1)] = avx512::dot_q5_1;
    gemm[slot(GgmlType::Q4_K)] = avx512::dot_q4_k;
    gemm[slot(GgmlType::Q6_K)] = avx512::dot_q6_k;
    gemm[slot(GgmlType::Q8_0)] = avx512::dot_q8_0;
    gemm[slot(GgmlType::Q4_0)] = avx512::dot_q4_0;
    gemm[slot(GgmlType::Q4_1)] = avx512::dot_q4_1;
    gemm[slot(GgmlType::Q5_0)] = avx512::dot_q5_0;
    gemm[slot(GgmlType::Q5_1)] = avx512::dot_q5_1;
    let mut rows: [Option<DotFn>; N_TYPES] = [None; N_TYPES];
    rows[slot(GgmlType::Q8_0)] = Some(avx512::dot_rows_q8_0);
    let mut batch_rows: [Option<BatchRowsFn>; N_TYPES] = [None; N_TYPES];
    batch_rows[slot(GgmlType::Q4_0)] = Some(avx512::batch_rows_q4_0);
    batch_rows[slot(GgmlType::Q4_1)] = Some(avx512::batch_rows_q4_1);
    batch_rows[slot(GgmlType::Q5_0)] = Some(avx512::batch_rows_q5_0);
    batch_rows[slot(GgmlType::Q5_1)] = Some(avx512::batch_rows_q5_1);
    batch_rows[slot(GgmlType::Q8_0)] = Some(avx512::batch_rows_q8_0_pairs);
    Kernels {
        isa,
        dot,
        gemm,
        quantize,
        rows,
        batch_rows,
        q8_0_blocks: false,
    }
}

/// Token rows prepared once for the tiles kernels by [`Kernels::prepare_tokens`]: each
/// rearrangement is made by the first kernel that needs it and shared by the others.
pub struct PreparedTokens {
    /// Groups of 15 tokens in lanes (AVX-512 lanes kernels).
    #[cfg(target_arch = "x86_64")]
    lanes: OnceLock<super::x86_64::avx512::LaneGroups>,
    /// Groups of 16 raw tokens (the tile unit's right-hand tiles).
    #[cfg(target_arch = "x86_64")]
    raw: OnceLock<super::x86_64::avx512::LaneGroups>,
    /// What they were made from (elements per row, bytes): checked where they are used.
    n: usize,
    len: usize,
}

/// Q8_0 token rows prepared once by [`Kernels::prepare_block_tokens`] for
/// [`Kernels::block_dot_tiles`] over many chunks of rows.
pub struct BlockTokens {
    /// The tile unit's right-hand tiles (AMX level only).
    #[cfg(target_arch = "x86_64")]
    tiles: Option<super::x86_64::amx::Q8_0Tokens>,
    /// What they were made from (elements per row, bytes): checked where they are used.
    n: usize,
    len: usize,
}

/// Token rows from which a batch of a type with an exact-block order at this level
/// ([`Kernels::has_block_order`]) takes that order. (The tile unit costs as much for one
/// token as for 16: a 768 × 2048 Q8_0 matrix took 176 µs for 2 and 3 tokens on the tiles,
/// 138 and 168 µs in ggml's order; about the same from 4.)
pub const BLOCK_ORDER_MIN_TOKENS: usize = 4;

/// Token rows from which ggml's tiled matmul takes a `MUL_MAT` (or, in a `MUL_MAT_ID`, the
/// tokens routed to one expert): `ggml_tiled_min_batch`.
pub const TILED_MIN_TOKENS: usize = 8;

/// The environment variable that lowers the chosen level.
pub const ENV_KERNELS: &str = "MOESHARD_KERNELS";

/// The environment variable that picks the float order of Q8_0 batches at the AMX level:
/// `ggml` (the default: ggml's, bit for bit) or `blocks` (exact-block order on the tile unit,
/// several times faster; see [`Kernels::has_block_order`]).
pub const ENV_Q8_0_ORDER: &str = "MOESHARD_Q8_0_ORDER";

impl Kernels {
    /// The process-wide table: the best level of this CPU, or the lower one asked for in
    /// `MOESHARD_KERNELS`. Chosen and logged on the first call.
    pub fn get() -> &'static Kernels {
        static CHOSEN: OnceLock<&'static Kernels> = OnceLock::new();
        CHOSEN.get_or_init(|| {
            let best = Isa::best();
            let requested = std::env::var(ENV_KERNELS).ok();
            let isa = match requested.as_deref().map(|s| (s, Isa::from_name(s))) {
                None => best,
                Some((_, Some(isa))) if isa <= best => isa,
                Some((name, Some(_))) => {
                    tracing::warn!(
                        requested = name,
                        best = best.name(),
                        "{ENV_KERNELS} asks for a level this CPU lacks; using the best it has"
                    );
                    best
                }
                Some((name, None)) => {
                    tracing::warn!(
                        requested = name,
                        "unknown {ENV_KERNELS} value (want scalar, avx2, avx512 or amx); ignored"
                    );
                    best
                }
            };
            let kernels = Kernels::for_isa(isa).unwrap_or(&SCALAR);
            let order = std::env::var(ENV_Q8_0_ORDER).ok();
            let kernels = match order.as_deref().map(str::trim) {
                None | Some("ggml") => kernels,
                Some("blocks") => match kernels.with_block_order() {
                    Some(k) => k,
                    None => {
                        tracing::warn!(
                            isa = isa.name(),
                            "{ENV_Q8_0_ORDER}=blocks needs the amx level; keeping ggml's order"
                        );
                        kernels
                    }
                },
                Some(other) => {
                    tracing::warn!(
                        requested = other,
                        "unknown {ENV_Q8_0_ORDER} value (want ggml or blocks); ignored"
                    );
                    kernels
                }
            };
            tracing::info!(
                isa = isa.name(),
                best = best.name(),
                q8_0_order = if kernels.q8_0_blocks {
                    "blocks"
                } else {
                    "ggml"
                },
                "kernels selected"
            );
            kernels
        })
    }

    /// The portable reference kernels (every result defined by [`reference`]).
    pub fn scalar() -> &'static Kernels {
        &SCALAR
    }

    /// The table of `isa`, or `None` when this CPU cannot run it.
    pub fn for_isa(isa: Isa) -> Option<&'static Kernels> {
        if !isa.is_supported() {
            return None;
        }
        match isa {
            Isa::Scalar => Some(&SCALAR),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => Some(&AVX2),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => Some(&AVX512),
            #[cfg(target_arch = "x86_64")]
            Isa::Amx => Some(&AMX),
            #[cfg(not(target_arch = "x86_64"))]
            Isa::Avx2 | Isa::Avx512 | Isa::Amx => None,
        }
    }

    /// Every table this CPU can run, lowest level first, each followed by its variant with
    /// Q8_0 batches in exact-block order where it has one.
    pub fn supported() -> Vec<&'static Kernels> {
        (Isa::ALL.into_iter().filter_map(Kernels::for_isa))
            .flat_map(|k| [Some(k), k.with_block_order()])
            .flatten()
            .collect()
    }

    /// This level's table with Q8_0 batches in exact-block order ([`Kernels::has_block_order`]),
    /// where the level has one (AMX).
    pub fn with_block_order(&self) -> Option<&'static Kernels> {
        match self.isa {
            #[cfg(target_arch = "x86_64")]
            Isa::Amx => Some(&AMX_Q8_0_BLOCKS),
            _ => None,
        }
    }

    /// The SIMD level of this table.
    pub fn level(&self) -> Isa {
        self.isa
    }

    /// The table's name for reports: its level's, with `+q8_0-blocks` where Q8_0 batches
    /// take the exact-block order ([`Kernels::has_block_order`]).
    pub fn name(&self) -> String {
        if self.q8_0_blocks {
            format!("{}+q8_0-blocks", self.isa.name())
        } else {
            self.isa.name().to_string()
        }
    }

    /// The name of the SIMD level (`"scalar"`, `"avx2"`, `"avx512"`, `"amx"`).
    pub fn isa(&self) -> &'static str {
        self.isa.name()
    }

    /// Dot product of a weight row of `ty` (`n` elements) with an activation row of
    /// `ty.vec_dot_type()`.
    ///
    /// The activation must be as our quantizers make it (no -128 quant, Q8_K `bsums` equal to
    /// the sums of the quants; `matmul::Activations::from_bytes` checks both); otherwise the
    /// result is unspecified. Panics if `ty` is not a weight type or a length does not match.
    pub fn vec_dot(&self, ty: GgmlType, n: usize, w: &[u8], x: &[u8]) -> f32 {
        let mut out = [0.0f32];
        self.vec_dot_batch(ty, n, w, x, &mut out);
        out[0]
    }

    /// Dot products of one weight row with `out.len()` activation rows stored back to back in
    /// `xs` (each `ty.vec_dot_type().row_bytes(n)` bytes); each result is bit-identical to
    /// [`Kernels::vec_dot`] of that row. The weight row is read from memory once.
    ///
    /// Panics as [`Kernels::vec_dot`] does.
    pub fn vec_dot_batch(&self, ty: GgmlType, n: usize, w: &[u8], xs: &[u8], out: &mut [f32]) {
        let Some(_) = check_batch("vec_dot_batch", ty, n, w, xs, out) else {
            return;
        };
        // SAFETY: the table's features were detected before it was handed out (invariant of
        // `Kernels`), and the lengths were checked above, which is the entry's whole contract.
        unsafe { (self.dot[slot(ty)])(n, w, xs, out) }
    }

    /// Whether [`Kernels::dot_batch_rows`] has a kernel for `ty` at this level (otherwise it
    /// loops over the rows itself; the results are the same).
    pub fn has_batch_rows(&self, ty: GgmlType) -> bool {
        self.batch_rows[slot(ty)].is_some()
    }

    /// Consecutive weight rows (`w`) times the activation rows `xs`, each value
    /// bit-identical to [`Kernels::vec_dot_batch`] of that row: `out[r * stride + t]` =
    /// row `r` · token `t`. For the types whose batched order is the per-token one (legacy
    /// quants, Q8_0), kernels convert the tokens' block scales once for all the rows.
    ///
    /// Panics as [`Kernels::vec_dot`] does, if `w` is not whole rows, or if `out` is too
    /// short for its rows of `stride` (the last row needs only the tokens).
    pub fn dot_batch_rows(
        &self,
        ty: GgmlType,
        n: usize,
        w: &[u8],
        xs: &[u8],
        out: &mut [f32],
        stride: usize,
    ) {
        // (No rows, tokens or elements: nothing to compute.)
        let Some((w_row, n_tokens)) =
            check_tiles("dot_batch_rows", ty, n, w, xs, None, out, stride)
        else {
            return;
        };
        match self.batch_rows[slot(ty)] {
            // SAFETY: features detected (invariant of `Kernels`); `w` is `n_rows` whole rows,
            // `xs` whole activation rows of `n`, and `out` holds every `r * stride + t`
            // (all checked above).
            Some(f) => unsafe { f(n, w, xs, out, stride) },
            None => {
                for (r, row) in w.chunks_exact(w_row).enumerate() {
                    self.vec_dot_batch(ty, n, row, xs, &mut out[r * stride..r * stride + n_tokens]);
                }
            }
        }
    }

    /// Dot products of `out.len()` consecutive weight rows (`w`, each `ty.row_bytes(n)`
    /// bytes) with one activation row `x`; each result is bit-identical to
    /// [`Kernels::vec_dot`] of that row. Types with a rows kernel interleave the rows'
    /// independent accumulation chains, which a one-token product is otherwise bound by.
    ///
    /// Panics as [`Kernels::vec_dot`] does, or if `w` is not `out.len()` whole rows.
    pub fn vec_dot_rows(&self, ty: GgmlType, n: usize, w: &[u8], x: &[u8], out: &mut [f32]) {
        let w_row = check_rows("vec_dot_rows", ty, n, w, out.len());
        if out.is_empty() {
            return;
        }
        match self.rows[slot(ty)] {
            Some(f) => {
                let Some(_) = check_batch("vec_dot_rows", ty, n, &w[..w_row], x, &mut out[..1])
                else {
                    out.fill(0.0);
                    return;
                };
                // SAFETY: features detected (invariant of `Kernels`); `w` is `out.len()` whole
                // rows (asserted above) and `x` one activation row of `n` (checked).
                unsafe { f(n, w, x, out) }
            }
            // The token's block scales converted once for all the rows (same bits).
            None if self.has_batch_rows(ty) => {
                self.dot_batch_rows(ty, n, w, x, out, 1);
            }
            None => {
                for (o, row) in out.iter_mut().zip(w.chunks_exact(w_row.max(1))) {
                    *o = self.vec_dot(ty, n, row, x);
                }
            }
        }
    }

    /// [`Kernels::vec_dot_rows`] in CPU_REPACK's GEMV order (a Q4_K matrix with a multiple
    /// of 8 rows, one token): each result is bit-identical to
    /// [`Kernels::repack_dot_batch`]`(.., gemm = false)` of that row.
    ///
    /// Panics as [`Kernels::repack_dot_batch`] does, or if `w` is not `out.len()` whole rows.
    pub fn repack_dot_rows(&self, ty: GgmlType, n: usize, w: &[u8], x: &[u8], out: &mut [f32]) {
        assert_eq!(
            ty,
            GgmlType::Q4_K,
            "repack_dot_rows: {ty} has no repacked order"
        );
        let w_row = check_rows("repack_dot_rows", ty, n, w, out.len());
        if out.is_empty() {
            return;
        }
        #[cfg(target_arch = "x86_64")]
        if self.isa >= Isa::Avx512 {
            let Some(_) = check_batch("repack_dot_rows", ty, n, &w[..w_row], x, &mut out[..1])
            else {
                out.fill(0.0);
                return;
            };
            // SAFETY: an AVX-512 table is only handed out on a CPU with AVX2, FMA, F16C and
            // AVX-512 F/BW/VL/VNNI (invariant of `Kernels`); `w` is `out.len()` whole rows
            // (asserted above) and `x` one activation row of `n` (checked).
            unsafe { super::x86_64::avx512::dot_rows_q4_k_repack(n, w, x, out) };
            return;
        }
        #[cfg(target_arch = "x86_64")]
        if self.isa == Isa::Avx2 {
            let Some(_) = check_batch("repack_dot_rows", ty, n, &w[..w_row], x, &mut out[..1])
            else {
                out.fill(0.0);
                return;
            };
            // SAFETY: an AVX2 table is only handed out on a CPU with AVX2, FMA and F16C
            // (invariant of `Kernels`); `w` is `out.len()` whole rows (asserted above) and `x`
            // one activation row of `n` (checked).
            unsafe { super::x86_64::avx2::dot_rows_q4_k_repack(n, w, x, out) };
            return;
        }
        for (o, row) in out.iter_mut().zip(w.chunks_exact(w_row.max(1))) {
            self.repack_dot_batch(ty, n, row, x, std::slice::from_mut(o), false);
        }
    }

    /// Groups of eight interleaved Q4_K rows ([`super::rows8`], `w`: `out.len() / 8` groups of
    /// `n` columns) · one Q8_K activation row: `out[r]` is the bits of
    /// [`Kernels::repack_dot_rows`] of the plain row. The AVX2 kernel (also at the AVX-512 and
    /// AMX levels, whose CPUs have AVX2) reads the groups as they are; the scalar table
    /// de-interleaves each group first.
    ///
    /// Panics if `out.len()` is not a multiple of 8 or the lengths do not fit.
    pub fn q4_k_r8_dot_rows(&self, n: usize, w: &[u8], x: &[u8], out: &mut [f32]) {
        let ty = GgmlType::Q4_K;
        let w_row = check_rows("q4_k_r8_dot_rows", ty, n, w, out.len());
        assert!(
            out.len().is_multiple_of(super::rows8::GROUP_ROWS),
            "q4_k_r8_dot_rows: {} rows are not whole groups of 8",
            out.len()
        );
        if out.is_empty() {
            return;
        }
        let Some(_) = check_batch("q4_k_r8_dot_rows", ty, n, &w[..w_row], x, &mut out[..1]) else {
            out.fill(0.0);
            return;
        };
        #[cfg(target_arch = "x86_64")]
        if self.isa >= Isa::Avx2 {
            // SAFETY: a table above the scalar level is only handed out on a CPU with AVX2,
            // FMA and F16C (invariant of `Kernels`); `w` is `out.len()` whole rows (asserted
            // above), `out.len()` a multiple of 8, and `x` one activation row of `n` (checked).
            unsafe { super::x86_64::avx2::dot_rows_q4_k_r8(n, w, x, out) };
            return;
        }
        let mut plain = vec![0u8; 8 * w_row];
        for (o, g) in out.chunks_exact_mut(8).zip(w.chunks_exact(8 * w_row)) {
            super::rows8::deinterleave(g, &mut plain);
            self.repack_dot_rows(ty, n, &plain, x, o);
        }
    }

    /// [`super::rows8::deinterleave`]: a group of eight interleaved Q4_K rows back to the
    /// plain rows, byte for byte (with 32-byte transposes above the scalar level).
    ///
    /// Panics as [`super::rows8::deinterleave`] does.
    pub fn q4_k_r8_deinterleave(&self, group: &[u8], out: &mut [u8]) {
        let block = super::rows8::GROUP_BLOCK_BYTES;
        assert!(
            group.len() == out.len() && group.len().is_multiple_of(block),
            "q4_k_r8_deinterleave: {} bytes into {} are not a group of whole Q4_K super-blocks",
            group.len(),
            out.len()
        );
        #[cfg(target_arch = "x86_64")]
        if self.isa >= Isa::Avx2 {
            // SAFETY: a table above the scalar level is only handed out on a CPU with AVX2
            // (invariant of `Kernels`); the lengths are whole group blocks (asserted above).
            unsafe { super::x86_64::avx2::deinterleave_q4_k_r8(group, out) };
            return;
        }
        super::rows8::deinterleave(group, out);
    }

    /// [`Kernels::q4_k_r8_dot_rows`] for several tokens (`xs`: Q8_K rows of `n` back to
    /// back), each in the GEMV order: `out[r * stride + t]` = row r · token t, the bits of
    /// [`Kernels::repack_dot_tiles`]`(.., gemm = false)` on the plain rows.
    ///
    /// Panics if the row count is not a multiple of 8 or the lengths do not fit.
    pub fn q4_k_r8_dot_tokens(
        &self,
        n: usize,
        w: &[u8],
        xs: &[u8],
        out: &mut [f32],
        stride: usize,
    ) {
        let ty = GgmlType::Q4_K;
        let w_row = ty.row_bytes(n).unwrap_or(0);
        let x_row = ty.vec_dot_type().row_bytes(n).unwrap_or(0);
        assert!(
            w_row > 0 && x_row > 0 && w.len().is_multiple_of(8 * w_row) && xs.len().is_multiple_of(x_row),
            "q4_k_r8_dot_tokens: {} weight bytes and {} activation bytes are not groups of 8 rows and tokens of {n}",
            w.len(),
            xs.len()
        );
        let (n_rows, n_tokens) = (w.len() / w_row, xs.len() / x_row);
        if n_rows == 0 || n_tokens == 0 {
            return;
        }
        assert!(
            n_tokens <= stride && (n_rows - 1) * stride + n_tokens <= out.len(),
            "q4_k_r8_dot_tokens: {} outputs for {n_rows} rows of stride {stride} and {n_tokens} tokens",
            out.len()
        );
        #[cfg(target_arch = "x86_64")]
        if self.isa >= Isa::Avx2 {
            // SAFETY: a table above the scalar level is only handed out on a CPU with AVX2,
            // FMA and F16C (invariant of `Kernels`); `w` is whole groups of rows of `n`, `xs`
            // whole tokens, and `out` holds every `r * stride + t` (asserted above).
            unsafe { super::x86_64::avx2::dot_tokens_q4_k_r8(n, w, xs, out, stride) };
            return;
        }
        let mut col = vec![0.0f32; n_rows];
        for (t, x) in xs.chunks_exact(x_row).enumerate() {
            self.q4_k_r8_dot_rows(n, w, x, &mut col);
            for (r, v) in col.iter().enumerate() {
                out[r * stride + t] = *v;
            }
        }
    }

    /// The Q8_K token rows `xs` (of `n` elements) rearranged once for the tiles kernels
    /// ([`Kernels::repack_dot_tiles`], [`Kernels::tiled_dot_tiles`]) of a matrix product that
    /// runs them on many chunks of rows: at the AVX-512 level, groups of 15 tokens in the
    /// lanes of a vector, at the AMX level also groups of 16 for the tiles (each made when a
    /// kernel first needs it; other levels need nothing).
    ///
    /// Panics if `xs` is not whole Q8_K rows of `n`.
    pub fn prepare_tokens(&self, n: usize, xs: &[u8]) -> PreparedTokens {
        let x_row = GgmlType::Q8_K.row_bytes(n).unwrap_or(0);
        assert!(
            x_row > 0 && xs.len().is_multiple_of(x_row),
            "prepare_tokens: {} bytes are not whole Q8_K rows of {n}",
            xs.len()
        );
        PreparedTokens {
            #[cfg(target_arch = "x86_64")]
            lanes: OnceLock::new(),
            #[cfg(target_arch = "x86_64")]
            raw: OnceLock::new(),
            n,
            len: xs.len(),
        }
    }

    /// Whether this table multiplies batches of `ty` ([`BLOCK_ORDER_MIN_TOKENS`] tokens or
    /// more) in exact-block order ([`reference::vec_dot_blocks`]) rather than in ggml's: Q8_0
    /// on the tile unit, which sums whole blocks where ggml adds eight lanes of four products.
    /// The tile unit makes a Q8_0 batch several times faster, but the two orders differ in
    /// the last bits, enough to flip a near-tied expert choice: on the small fixture models
    /// a few prompt positions then move past the 0.02 bar against llama.cpp. So it is
    /// opt-in ([`ENV_Q8_0_ORDER`]`=blocks`, [`Kernels::with_block_order`]).
    pub fn has_block_order(&self, ty: GgmlType) -> bool {
        self.q8_0_blocks && ty == GgmlType::Q8_0
    }

    /// The Q8_0 token rows `xs` (of `n` elements) rearranged once for
    /// [`Kernels::block_dot_tiles`] (the tile unit's right-hand tiles at the AMX level;
    /// nothing at the others).
    ///
    /// Panics if `xs` is not whole Q8_0 rows of `n`.
    pub fn prepare_block_tokens(&self, n: usize, xs: &[u8]) -> BlockTokens {
        let x_row = GgmlType::Q8_0.row_bytes(n).unwrap_or(0);
        assert!(
            x_row > 0 && xs.len().is_multiple_of(x_row),
            "prepare_block_tokens: {} bytes are not whole Q8_0 rows of {n}",
            xs.len()
        );
        BlockTokens {
            #[cfg(target_arch = "x86_64")]
            tiles: (self.isa == Isa::Amx).then(|| super::x86_64::amx::Q8_0Tokens::new(n, xs)),
            n,
            len: xs.len(),
        }
    }

    /// Consecutive Q8_0 weight rows (`w`) times the Q8_0 token rows `xs` in exact-block order:
    /// `out[r * stride + t]` is [`reference::vec_dot_blocks`] of row `r` and token `t`, bit for
    /// bit. The AMX level computes 16 rows × 16 tokens × one block per `tdpbssd`, the others
    /// call the reference.
    ///
    /// Panics as [`Kernels::dot_batch_rows`] does, if `ty` is not Q8_0, or if `prepared` was
    /// not made from `xs`.
    #[allow(clippy::too_many_arguments)]
    pub fn block_dot_tiles(
        &self,
        ty: GgmlType,
        n: usize,
        w: &[u8],
        xs: &[u8],
        prepared: Option<&BlockTokens>,
        out: &mut [f32],
        stride: usize,
    ) {
        assert_eq!(
            ty,
            GgmlType::Q8_0,
            "block_dot_tiles: {ty} has no exact-block order"
        );
        let made_from = prepared.map(|p| (p.n, p.len));
        let Some((w_row, n_tokens)) =
            check_tiles("block_dot_tiles", ty, n, w, xs, made_from, out, stride)
        else {
            return;
        };
        #[cfg(target_arch = "x86_64")]
        if self.isa == Isa::Amx {
            use super::x86_64::amx;
            let made;
            let tokens = match prepared.and_then(|p| p.tiles.as_ref()) {
                Some(t) => t,
                None => {
                    made = amx::Q8_0Tokens::new(n, xs);
                    &made
                }
            };
            // SAFETY: an AMX table is only handed out on a CPU with AVX2, FMA, F16C, AVX-512
            // F/BW/VL/VNNI and AMX-INT8 whose tile state the OS granted (`amx::available`,
            // invariant of `Kernels`); `w` is whole rows of `n`, `tokens` made from whole Q8_0
            // rows of `n` (prepared ones from `xs`: same rows and length, checked above), and
            // `out` holds every `r * stride + t` (all checked above).
            unsafe { amx::q8_0_blocks(n, w, tokens, out, stride) };
            return;
        }
        let x_row = xs.len() / n_tokens;
        for (r, row) in w.chunks_exact(w_row).enumerate() {
            for (t, x) in xs.chunks_exact(x_row).enumerate() {
                out[r * stride + t] = reference::vec_dot_blocks(ty, n, row, x);
            }
        }
    }

    /// Consecutive Q4_K weight rows (`w`) times the Q8_K token rows `xs` in CPU_REPACK's
    /// orders: `out[r * stride + t]` is bit-identical to [`Kernels::repack_dot_batch`] of row
    /// `r` and token `t` (with the same `gemm`). The AVX-512 level computes tiles of rows ×
    /// tokens: 16 rows × up to 15 tokens in the lanes of `vpdpbusd`, or, for fewer than 8
    /// tokens, rows × tokens with each row's quants unpacked once for the tile's tokens. The
    /// AMX level computes 16 rows × up to 16 tokens per `tdpbusd` (from 6 tokens).
    ///
    /// Panics as [`Kernels::dot_batch_rows`] does, or if `ty` is not Q4_K.
    #[allow(clippy::too_many_arguments)]
    pub fn repack_dot_tiles(
        &self,
        ty: GgmlType,
        n: usize,
        w: &[u8],
        xs: &[u8],
        prepared: Option<&PreparedTokens>,
        out: &mut [f32],
        stride: usize,
        gemm: bool,
    ) {
        assert_eq!(
            ty,
            GgmlType::Q4_K,
            "repack_dot_tiles: {ty} has no repacked order"
        );
        let Some((w_row, n_tokens)) = check_tiles(
            "repack_dot_tiles",
            ty,
            n,
            w,
            xs,
            prepared.map(|p| (p.n, p.len)),
            out,
            stride,
        ) else {
            return;
        };
        #[cfg(target_arch = "x86_64")]
        if self.isa == Isa::Amx {
            // SAFETY: an AMX table is only handed out on a CPU with AVX2, FMA, F16C, AVX-512
            // F/BW/VL/VNNI and AMX-INT8 whose tile state the OS granted (`amx::available`,
            // invariant of `Kernels`); `w` is `n_rows` whole rows, `xs` whole activation rows
            // of `n`, the groups are made from `xs`, and `out` holds every `r * stride + t`
            // (all checked above).
            with_token_groups(n, xs, prepared, true, |groups| unsafe {
                super::x86_64::amx::repack_q4_k(n, w, xs, groups, out, stride, gemm)
            });
            return;
        }
        #[cfg(target_arch = "x86_64")]
        if self.isa >= Isa::Avx512 {
            // SAFETY: an AVX-512 table is only handed out on a CPU with AVX2, FMA, F16C and
            // AVX-512 F/BW/VL/VNNI (invariant of `Kernels`); `w` is `n_rows` whole rows, `xs`
            // whole activation rows of `n`, and `out` holds every `r * stride + t` (all
            // checked above).
            with_token_groups(n, xs, prepared, false, |groups| unsafe {
                super::x86_64::avx512::repack_q4_k(n, w, xs, groups, out, stride, gemm)
            });
            return;
        }
        #[cfg(target_arch = "x86_64")]
        if self.isa == Isa::Avx2 {
            // SAFETY: an AVX2 table is only handed out on a CPU with AVX2, FMA and F16C
            // (invariant of `Kernels`); `w` is `n_rows` whole rows, `xs` whole activation
            // rows of `n`, and `out` holds every `r * stride + t` (all checked above).
            unsafe { super::x86_64::avx2::repack_q4_k_tiles(n, w, xs, out, stride, gemm) };
            return;
        }
        for (r, row) in w.chunks_exact(w_row).enumerate() {
            let o = &mut out[r * stride..r * stride + n_tokens];
            self.repack_dot_batch(ty, n, row, xs, o, gemm);
        }
    }

    /// [`Kernels::vec_dot_batch`] for a Q4_K matrix with a multiple of 8 rows, which ggml's
    /// CPU_REPACK buffer interleaves and multiplies with its own kernels, in their float
    /// order: the GEMM kernel's when `gemm` (a 2-D `MUL_MAT`'s tokens in whole groups of
    /// four), the GEMV kernel's otherwise (see `x86_64::avx2::q4_k_repack_tile` and
    /// `q4_k_repack_gemm_tile`). The scalar table has no such order and uses its reference dot.
    ///
    /// Panics as [`Kernels::vec_dot`] does, or if `ty` is not Q4_K.
    pub fn repack_dot_batch(
        &self,
        ty: GgmlType,
        n: usize,
        w: &[u8],
        xs: &[u8],
        out: &mut [f32],
        gemm: bool,
    ) {
        assert_eq!(
            ty,
            GgmlType::Q4_K,
            "repack_dot_batch: {ty} has no repacked order"
        );
        let Some(_) = check_batch("repack_dot_batch", ty, n, w, xs, out) else {
            return;
        };
        match self.isa {
            Isa::Scalar => self.vec_dot_batch(ty, n, w, xs, out),
            #[cfg(target_arch = "x86_64")]
            // SAFETY: an AVX2 or AVX-512 table is only handed out on a CPU with AVX2, FMA and
            // F16C (invariant of `Kernels`); lengths were checked above.
            Isa::Avx2 | Isa::Avx512 | Isa::Amx => unsafe {
                if gemm {
                    super::x86_64::avx2::dot_q4_k_repack_gemm(n, w, xs, out)
                } else {
                    super::x86_64::avx2::dot_q4_k_repack(n, w, xs, out)
                }
            },
            #[cfg(not(target_arch = "x86_64"))]
            Isa::Avx2 | Isa::Avx512 | Isa::Amx => self.vec_dot_batch(ty, n, w, xs, out),
        }
    }

    /// Whether ggml's tiled CPU matmul takes weights of `ty` (Q2_K..Q6_K; its IQ types are
    /// not ours): it does for a `MUL_MAT` of at least [`TILED_MIN_TOKENS`] token rows, and per
    /// expert of a `MUL_MAT_ID` with that many tokens routed to it, unless the weight is
    /// repacked (CPU_REPACK's kernels take those).
    pub const fn has_tiled_order(ty: GgmlType) -> bool {
        matches!(
            ty,
            GgmlType::Q2_K | GgmlType::Q3_K | GgmlType::Q4_K | GgmlType::Q5_K | GgmlType::Q6_K
        )
    }

    /// [`Kernels::vec_dot_batch`] in the float order of ggml's tiled matmul
    /// ([`reference::vec_dot_tiled`]: one rounded `d·s1`, one fused mins term and one FMA into
    /// the token's accumulator per super-block). Every table gives the same bits: the integer
    /// sums are exact and the float steps are scalar.
    ///
    /// Panics as [`Kernels::vec_dot`] does, or unless [`Kernels::has_tiled_order`]`(ty)`.
    pub fn tiled_dot_batch(&self, ty: GgmlType, n: usize, w: &[u8], xs: &[u8], out: &mut [f32]) {
        assert!(
            Kernels::has_tiled_order(ty),
            "tiled_dot_batch: {ty} has no tiled order"
        );
        let Some(x_bytes) = check_batch("tiled_dot_batch", ty, n, w, xs, out) else {
            return;
        };
        match self.isa {
            Isa::Scalar => {
                for (o, x) in out.iter_mut().zip(xs.chunks_exact(x_bytes)) {
                    *o = reference::vec_dot_tiled(ty, n, w, x);
                }
            }
            #[cfg(target_arch = "x86_64")]
            // SAFETY: an AVX2 or AVX-512 table is only handed out on a CPU with AVX2, FMA and
            // F16C (invariant of `Kernels`); lengths were checked above.
            Isa::Avx2 | Isa::Avx512 | Isa::Amx => unsafe {
                use super::x86_64::avx2;
                let f: DotFn = match ty {
                    GgmlType::Q2_K => avx2::dot_q2_k_tiled,
                    GgmlType::Q3_K => avx2::dot_q3_k_tiled,
                    GgmlType::Q4_K => avx2::dot_q4_k_tiled,
                    GgmlType::Q5_K => avx2::dot_q5_k_tiled,
                    _ => avx2::dot_q6_k_tiled,
                };
                f(n, w, xs, out)
            },
            #[cfg(not(target_arch = "x86_64"))]
            Isa::Avx2 | Isa::Avx512 | Isa::Amx => {
                for (o, x) in out.iter_mut().zip(xs.chunks_exact(x_bytes)) {
                    *o = reference::vec_dot_tiled(ty, n, w, x);
                }
            }
        }
    }

    /// Consecutive weight rows (`w`) times the Q8_K token rows `xs` in the order of ggml's
    /// tiled matmul: `out[r * stride + t]` is bit-identical to [`Kernels::tiled_dot_batch`]
    /// of row `r` and token `t`. At the AVX-512 level, Q6_K's rows go 16 at a time with up to
    /// 15 tokens in the lanes of `vpdpbusd` (8 tokens or more).
    ///
    /// Panics as [`Kernels::dot_batch_rows`] does, or unless [`Kernels::has_tiled_order`]`(ty)`.
    #[allow(clippy::too_many_arguments)]
    pub fn tiled_dot_tiles(
        &self,
        ty: GgmlType,
        n: usize,
        w: &[u8],
        xs: &[u8],
        prepared: Option<&PreparedTokens>,
        out: &mut [f32],
        stride: usize,
    ) {
        assert!(
            Kernels::has_tiled_order(ty),
            "tiled_dot_tiles: {ty} has no tiled order"
        );
        let Some((w_row, n_tokens)) = check_tiles(
            "tiled_dot_tiles",
            ty,
            n,
            w,
            xs,
            prepared.map(|p| (p.n, p.len)),
            out,
            stride,
        ) else {
            return;
        };
        #[cfg(target_arch = "x86_64")]
        if self.isa >= Isa::Avx512 && ty == GgmlType::Q6_K {
            // SAFETY: an AVX-512 table is only handed out on a CPU with AVX2, FMA, F16C and
            // AVX-512 F/BW/VL/VNNI (invariant of `Kernels`); `w` is `n_rows` whole rows, `xs`
            // whole activation rows of `n`, and `out` holds every `r * stride + t` (all
            // checked above).
            with_token_groups(n, xs, prepared, false, |groups| unsafe {
                super::x86_64::avx512::tiled_q6_k(n, w, xs, groups, out, stride)
            });
            return;
        }
        #[cfg(target_arch = "x86_64")]
        if self.isa == Isa::Avx2 && ty == GgmlType::Q6_K {
            // SAFETY: an AVX2 table is only handed out on a CPU with AVX2, FMA and F16C
            // (invariant of `Kernels`); `w` is `n_rows` whole rows, `xs` whole activation
            // rows of `n`, and `out` holds every `r * stride + t` (all checked above).
            unsafe { super::x86_64::avx2::tiled_q6_k_tiles(n, w, xs, out, stride) };
            return;
        }
        for (r, row) in w.chunks_exact(w_row).enumerate() {
            let o = &mut out[r * stride..r * stride + n_tokens];
            self.tiled_dot_batch(ty, n, row, xs, o);
        }
    }

    /// Whether [`Kernels::tiled_dot_tiles`] takes a whole batch at once (it groups the
    /// tokens itself) rather than a few tokens at a time.
    pub fn has_tiled_tiles(&self, ty: GgmlType) -> bool {
        self.isa >= Isa::Avx2 && ty == GgmlType::Q6_K
    }

    /// [`Kernels::vec_dot_batch`] for a matrix product over a batch of `batch_tokens` tokens
    /// (of which `out` may be a part): ggml computes batches of two tokens or more with
    /// llamafile's tinyBLAS where it supports the type, whose float order differs from
    /// `vec_dot`'s for F32, F16 and BF16 weights (for Q8_0/Q4_0/Q5_0 the two orders are the
    /// same). With `batch_tokens < 2` this is [`Kernels::vec_dot_batch`].
    ///
    /// Panics as [`Kernels::vec_dot`] does.
    pub fn gemm_dot_batch(
        &self,
        ty: GgmlType,
        n: usize,
        w: &[u8],
        xs: &[u8],
        out: &mut [f32],
        batch_tokens: usize,
    ) {
        if batch_tokens < 2 {
            return self.vec_dot_batch(ty, n, w, xs, out);
        }
        let Some(_) = check_batch("gemm_dot_batch", ty, n, w, xs, out) else {
            return;
        };
        // SAFETY: as in `vec_dot_batch`: features detected, lengths checked.
        unsafe { (self.gemm[slot(ty)])(n, w, xs, out) }
    }

    /// Quantizes an activation row to `ty` (F32, F16, BF16, Q8_0, Q8_1 or Q8_K), bit-identical
    /// to [`reference::quantize_row`].
    ///
    /// Panics if `ty` is not an activation type or `dst.len()` is not `ty.row_bytes(src.len())`.
    pub fn quantize_row(&self, ty: GgmlType, src: &[f32], dst: &mut [u8]) {
        assert!(
            matches!(
                ty,
                GgmlType::F32
                    | GgmlType::F16
                    | GgmlType::BF16
                    | GgmlType::Q8_0
                    | GgmlType::Q8_1
                    | GgmlType::Q8_K
            ),
            "quantize_row: {ty} is not an activation type"
        );
        let want = ty.row_bytes(src.len());
        assert_eq!(
            Some(dst.len()),
            want,
            "quantize_row {ty}: {} destination bytes for {} values",
            dst.len(),
            src.len()
        );
        // SAFETY: the table's features were detected before it was handed out (invariant of
        // `Kernels`), and the lengths were checked above.
        unsafe { (self.quantize[slot(ty)])(src, dst) }
    }
}

/// Checks a batched dot product's lengths (panicking like [`check_dot`]); returns the
/// activation row bytes, or `None` after writing zeros when there is nothing to compute
/// (`n == 0`, or no rows).
fn check_batch(
    what: &str,
    ty: GgmlType,
    n: usize,
    w: &[u8],
    xs: &[u8],
    out: &mut [f32],
) -> Option<usize> {
    let (_, x_bytes) = check_dot(ty, n, w.len());
    assert_eq!(
        xs.len(),
        x_bytes * out.len(),
        "{what} {ty}: {} activation bytes for {} rows of {n} (want {})",
        xs.len(),
        out.len(),
        x_bytes * out.len()
    );
    if n == 0 || out.is_empty() {
        out.fill(0.0);
        return None;
    }
    Some(x_bytes)
}

/// Checks the arguments of a rows × tokens kernel ([`Kernels::dot_batch_rows`] and the tiles
/// kernels): whole weight rows and activation rows, room in `out` for every `r * stride + t`,
/// and `prepared` made from `xs`. Returns the weight row bytes and the token count, or `None`
/// when there is nothing to compute.
#[allow(clippy::too_many_arguments)]
fn check_tiles(
    what: &str,
    ty: GgmlType,
    n: usize,
    w: &[u8],
    xs: &[u8],
    prepared: Option<(usize, usize)>,
    out: &[f32],
    stride: usize,
) -> Option<(usize, usize)> {
    let w_row = ty.row_bytes(n).unwrap_or(0);
    let n_rows = w.len().checked_div(w_row).unwrap_or(0);
    check_rows(what, ty, n, w, n_rows);
    if n_rows == 0 {
        return None;
    }
    let (_, x_bytes) = check_dot(ty, n, w_row);
    let n_tokens = xs.len().checked_div(x_bytes).unwrap_or(0);
    assert_eq!(
        xs.len(),
        x_bytes * n_tokens,
        "{what} {ty}: {} activation bytes are not whole rows of {x_bytes}",
        xs.len()
    );
    assert!(
        n_tokens <= stride && out.len() >= (n_rows - 1) * stride + n_tokens,
        "{what} {ty}: output of {} values for {n_rows} rows of stride {stride} and {n_tokens} \
         tokens",
        out.len()
    );
    if let Some((p_n, p_len)) = prepared {
        assert!(
            (p_n, p_len) == (n, xs.len()),
            "{what} {ty}: tokens prepared for {p_len} bytes of rows of {p_n}, given {} of {n}",
            xs.len()
        );
    }
    (n_tokens > 0).then_some((w_row, n_tokens))
}

/// Runs `f` with the token groups of `xs` for the lanes kernels, or (`raw`) for the tiles:
/// `prepared`'s (made now if no kernel made them yet), or made for this call.
///
/// Callers hold an AVX-512 table (so the CPU has AVX2, FMA, F16C and AVX-512 F/BW/VL/VNNI)
/// and have checked that `xs` is whole Q8_K rows of `n` and `prepared` made from it.
#[cfg(target_arch = "x86_64")]
fn with_token_groups<R>(
    n: usize,
    xs: &[u8],
    prepared: Option<&PreparedTokens>,
    raw: bool,
    f: impl FnOnce(&super::x86_64::avx512::LaneGroups) -> R,
) -> R {
    use super::x86_64::{amx, avx512};
    // SAFETY: the CPU has the features (callers hold an AVX-512 table); `xs` is whole rows
    // of `n` (checked by the callers).
    let make = || unsafe {
        if raw {
            avx512::raw_groups(n, xs, amx::TILE_MIN_TOKENS)
        } else {
            avx512::lane_groups(n, xs)
        }
    };
    match prepared {
        Some(p) => f(if raw { &p.raw } else { &p.lanes }.get_or_init(make)),
        None => f(&make()),
    }
}

/// Checks that `w` is `n_rows` whole rows of `n` elements of `ty`; returns the row bytes.
fn check_rows(what: &str, ty: GgmlType, n: usize, w: &[u8], n_rows: usize) -> usize {
    let w_row = ty.row_bytes(n).unwrap_or(0);
    assert_eq!(
        w.len(),
        w_row * n_rows,
        "{what} {ty}: {} weight bytes for {n_rows} rows of {n}",
        w.len()
    );
    w_row
}

/// Checks a dot product's type and weight length; returns the weight and activation row bytes.
fn check_dot(ty: GgmlType, n: usize, w_len: usize) -> (usize, usize) {
    assert!(
        !matches!(ty, GgmlType::Q8_1 | GgmlType::Q8_K),
        "vec_dot: {ty} is an activation-only type"
    );
    let (Some(w_bytes), Some(x_bytes)) = (ty.row_bytes(n), ty.vec_dot_type().row_bytes(n)) else {
        panic!(
            "vec_dot {ty}: {n} elements is not a whole number of {}-element blocks",
            ty.block_elems()
        )
    };
    assert_eq!(
        w_len, w_bytes,
        "vec_dot {ty}: {w_len} weight bytes for {n} elements (want {w_bytes})"
    );
    (w_bytes, x_bytes)
}
