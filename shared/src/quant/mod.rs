//! Quantized tensor formats: the ggml type ids, block layouts, dequantization,
//! activation quantization and the dot-product / matmul kernels built on them.
//!
//! Layering: `blocks` (layouts) ← `reference` (portable scalar kernels, the
//! definition of every result) ← `x86_64` (SIMD variants, each tested against
//! `reference`) ← `dispatch` (the `Kernels` table picked once at run time) ←
//! `matmul` (a weight matrix times a batch of activation rows, parallel over rows).

pub mod blocks;
pub mod dispatch;
pub mod matmul;
pub mod reference;
pub mod rows8;
#[cfg(test)]
mod simd_tests;
#[cfg(target_arch = "x86_64")]
pub(crate) mod x86_64;

use std::fmt;

/// Super-block size of the K-quants.
pub const QK_K: usize = 256;

/// A ggml tensor type, with ggml's numeric ids.
///
/// Only the types moeshard can compute with are listed; any other id is a
/// typed error when a file is read (see `GgmlType::from_id`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[allow(non_camel_case_types)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q8_1,
    Q2_K,
    Q3_K,
    Q4_K,
    Q5_K,
    Q6_K,
    Q8_K,
    BF16,
    /// Q4_K with its rows interleaved eight at a time ([`rows8`]): moeshard's own layout,
    /// written by `moeshard convert --repack`, under a type id outside ggml's range so that
    /// ggml-based readers refuse it rather than misread it. A matrix of it is only ever
    /// multiplied (never read a row at a time), with a multiple of 8 rows.
    Q4_K_R8,
}

/// The type id of [`GgmlType::Q4_K_R8`] in a GGUF file: moeshard's own, far above ggml's
/// ids (below 64 today) and ik_llama.cpp's interleaved types (from 200).
pub const Q4_K_R8_ID: u32 = 0x4d53_0c08;

impl GgmlType {
    /// Every type, in id order.
    pub const ALL: [GgmlType; 16] = [
        GgmlType::F32,
        GgmlType::F16,
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q8_0,
        GgmlType::Q8_1,
        GgmlType::Q2_K,
        GgmlType::Q3_K,
        GgmlType::Q4_K,
        GgmlType::Q5_K,
        GgmlType::Q6_K,
        GgmlType::Q8_K,
        GgmlType::BF16,
        GgmlType::Q4_K_R8,
    ];

    /// The types a weight tensor may have (the activation-only Q8_1 and Q8_K are not among them).
    pub const WEIGHT_TYPES: [GgmlType; 13] = [
        GgmlType::F32,
        GgmlType::F16,
        GgmlType::BF16,
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q8_0,
        GgmlType::Q2_K,
        GgmlType::Q3_K,
        GgmlType::Q4_K,
        GgmlType::Q5_K,
        GgmlType::Q6_K,
    ];

    /// ggml's type id (`enum ggml_type`).
    pub const fn id(self) -> u32 {
        match self {
            GgmlType::F32 => 0,
            GgmlType::F16 => 1,
            GgmlType::Q4_0 => 2,
            GgmlType::Q4_1 => 3,
            GgmlType::Q5_0 => 6,
            GgmlType::Q5_1 => 7,
            GgmlType::Q8_0 => 8,
            GgmlType::Q8_1 => 9,
            GgmlType::Q2_K => 10,
            GgmlType::Q3_K => 11,
            GgmlType::Q4_K => 12,
            GgmlType::Q5_K => 13,
            GgmlType::Q6_K => 14,
            GgmlType::Q8_K => 15,
            GgmlType::BF16 => 30,
            GgmlType::Q4_K_R8 => Q4_K_R8_ID,
        }
    }

    /// The type with ggml id `id`, or `None` for ids moeshard does not support.
    pub const fn from_id(id: u32) -> Option<GgmlType> {
        Some(match id {
            0 => GgmlType::F32,
            1 => GgmlType::F16,
            2 => GgmlType::Q4_0,
            3 => GgmlType::Q4_1,
            6 => GgmlType::Q5_0,
            7 => GgmlType::Q5_1,
            8 => GgmlType::Q8_0,
            9 => GgmlType::Q8_1,
            10 => GgmlType::Q2_K,
            11 => GgmlType::Q3_K,
            12 => GgmlType::Q4_K,
            13 => GgmlType::Q5_K,
            14 => GgmlType::Q6_K,
            15 => GgmlType::Q8_K,
            30 => GgmlType::BF16,
            Q4_K_R8_ID => GgmlType::Q4_K_R8,
            _ => return None,
        })
    }

    /// ggml's name of a type id, also for ids moeshard does not compute with (for error messages).
    pub fn name_of_id(id: u32) -> Option<&'static str> {
        if let Some(t) = GgmlType::from_id(id) {
            return Some(t.name());
        }
        Some(match id {
            4 => "Q4_2 (removed)",
            5 => "Q4_3 (removed)",
            16 => "IQ2_XXS",
            17 => "IQ2_XS",
            18 => "IQ3_XXS",
            19 => "IQ1_S",
            20 => "IQ4_NL",
            21 => "IQ3_S",
            22 => "IQ2_S",
            23 => "IQ4_XS",
            24 => "I8",
            25 => "I16",
            26 => "I32",
            27 => "I64",
            28 => "F64",
            29 => "IQ1_M",
            34 => "TQ1_0",
            35 => "TQ2_0",
            39 => "MXFP4",
            _ => return None,
        })
    }

    /// ggml's name for the type (`Q4_K`, `F16`...).
    pub const fn name(self) -> &'static str {
        match self {
            GgmlType::F32 => "F32",
            GgmlType::F16 => "F16",
            GgmlType::Q4_0 => "Q4_0",
            GgmlType::Q4_1 => "Q4_1",
            GgmlType::Q5_0 => "Q5_0",
            GgmlType::Q5_1 => "Q5_1",
            GgmlType::Q8_0 => "Q8_0",
            GgmlType::Q8_1 => "Q8_1",
            GgmlType::Q2_K => "Q2_K",
            GgmlType::Q3_K => "Q3_K",
            GgmlType::Q4_K => "Q4_K",
            GgmlType::Q5_K => "Q5_K",
            GgmlType::Q6_K => "Q6_K",
            GgmlType::Q8_K => "Q8_K",
            GgmlType::BF16 => "BF16",
            GgmlType::Q4_K_R8 => "Q4_K_R8",
        }
    }

    /// Parses ggml's name (case-insensitive).
    pub fn from_name(name: &str) -> Option<GgmlType> {
        GgmlType::ALL
            .into_iter()
            .find(|t| t.name().eq_ignore_ascii_case(name))
    }

    /// Elements per block.
    pub const fn block_elems(self) -> usize {
        match self {
            GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => 1,
            GgmlType::Q4_0
            | GgmlType::Q4_1
            | GgmlType::Q5_0
            | GgmlType::Q5_1
            | GgmlType::Q8_0
            | GgmlType::Q8_1 => 32,
            GgmlType::Q2_K
            | GgmlType::Q3_K
            | GgmlType::Q4_K
            | GgmlType::Q4_K_R8
            | GgmlType::Q5_K
            | GgmlType::Q6_K
            | GgmlType::Q8_K => QK_K,
        }
    }

    /// Bytes per block.
    pub const fn block_bytes(self) -> usize {
        match self {
            GgmlType::F32 => 4,
            GgmlType::F16 | GgmlType::BF16 => 2,
            GgmlType::Q4_0 => 18,
            GgmlType::Q4_1 => 20,
            GgmlType::Q5_0 => 22,
            GgmlType::Q5_1 => 24,
            GgmlType::Q8_0 => 34,
            GgmlType::Q8_1 => 36,
            GgmlType::Q2_K => 84,
            GgmlType::Q3_K => 110,
            GgmlType::Q4_K | GgmlType::Q4_K_R8 => 144,
            GgmlType::Q5_K => 176,
            GgmlType::Q6_K => 210,
            GgmlType::Q8_K => 292,
        }
    }

    /// Bytes of a row of `n_elems` elements, or `None` when `n_elems` is not a
    /// whole number of blocks.
    pub const fn row_bytes(self, n_elems: usize) -> Option<usize> {
        if !n_elems.is_multiple_of(self.block_elems()) {
            return None;
        }
        Some(n_elems / self.block_elems() * self.block_bytes())
    }

    /// Whether this is a K-quant (256-element super-blocks).
    pub const fn is_k_quant(self) -> bool {
        self.block_elems() == QK_K
    }

    /// The type the activation is quantized to before a dot product with a
    /// weight of this type, as ggml's x86 CPU backend does (`type_traits_cpu`).
    pub const fn vec_dot_type(self) -> GgmlType {
        match self {
            GgmlType::F32 => GgmlType::F32,
            GgmlType::F16 => GgmlType::F16,
            GgmlType::BF16 => GgmlType::BF16,
            GgmlType::Q4_0 | GgmlType::Q5_0 | GgmlType::Q8_0 => GgmlType::Q8_0,
            GgmlType::Q4_1 | GgmlType::Q5_1 | GgmlType::Q8_1 => GgmlType::Q8_1,
            GgmlType::Q2_K
            | GgmlType::Q3_K
            | GgmlType::Q4_K
            | GgmlType::Q4_K_R8
            | GgmlType::Q5_K
            | GgmlType::Q6_K
            | GgmlType::Q8_K => GgmlType::Q8_K,
        }
    }
}

impl fmt::Display for GgmlType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}
