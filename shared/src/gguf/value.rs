//! Metadata values as GGUF stores them: the thirteen value types with their
//! GGUF ids, and typed accessors that convert between numeric types where the
//! conversion loses nothing (so a converter that wrote a `U64` where another
//! wrote a `U32` reads the same).

use std::fmt;

/// A GGUF metadata value type, with its id in the file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MetaType {
    /// 0
    U8,
    /// 1
    I8,
    /// 2
    U16,
    /// 3
    I16,
    /// 4
    U32,
    /// 5
    I32,
    /// 6
    F32,
    /// 7 (one byte, 0 or 1)
    Bool,
    /// 8 (`u64` length + UTF-8 bytes)
    String,
    /// 9 (`u32` element type + `u64` count + elements)
    Array,
    /// 10
    U64,
    /// 11
    I64,
    /// 12
    F64,
}

impl MetaType {
    /// Every type, in id order.
    pub const ALL: [MetaType; 13] = [
        MetaType::U8,
        MetaType::I8,
        MetaType::U16,
        MetaType::I16,
        MetaType::U32,
        MetaType::I32,
        MetaType::F32,
        MetaType::Bool,
        MetaType::String,
        MetaType::Array,
        MetaType::U64,
        MetaType::I64,
        MetaType::F64,
    ];

    /// The GGUF id (`enum gguf_type`).
    pub const fn id(self) -> u32 {
        match self {
            MetaType::U8 => 0,
            MetaType::I8 => 1,
            MetaType::U16 => 2,
            MetaType::I16 => 3,
            MetaType::U32 => 4,
            MetaType::I32 => 5,
            MetaType::F32 => 6,
            MetaType::Bool => 7,
            MetaType::String => 8,
            MetaType::Array => 9,
            MetaType::U64 => 10,
            MetaType::I64 => 11,
            MetaType::F64 => 12,
        }
    }

    /// The type with GGUF id `id`.
    pub const fn from_id(id: u32) -> Option<MetaType> {
        Some(match id {
            0 => MetaType::U8,
            1 => MetaType::I8,
            2 => MetaType::U16,
            3 => MetaType::I16,
            4 => MetaType::U32,
            5 => MetaType::I32,
            6 => MetaType::F32,
            7 => MetaType::Bool,
            8 => MetaType::String,
            9 => MetaType::Array,
            10 => MetaType::U64,
            11 => MetaType::I64,
            12 => MetaType::F64,
            _ => return None,
        })
    }

    /// The name used in messages (`U32`, `STRING`...).
    pub const fn name(self) -> &'static str {
        match self {
            MetaType::U8 => "U8",
            MetaType::I8 => "I8",
            MetaType::U16 => "U16",
            MetaType::I16 => "I16",
            MetaType::U32 => "U32",
            MetaType::I32 => "I32",
            MetaType::F32 => "F32",
            MetaType::Bool => "BOOL",
            MetaType::String => "STRING",
            MetaType::Array => "ARRAY",
            MetaType::U64 => "U64",
            MetaType::I64 => "I64",
            MetaType::F64 => "F64",
        }
    }

    /// The fewest bytes one value of this type takes in a file (an empty
    /// string or array for the variable-length types). Counts read from a file
    /// are checked against the bytes left with this before anything is allocated.
    pub const fn min_encoded_len(self) -> u64 {
        match self {
            MetaType::U8 | MetaType::I8 | MetaType::Bool => 1,
            MetaType::U16 | MetaType::I16 => 2,
            MetaType::U32 | MetaType::I32 | MetaType::F32 => 4,
            MetaType::U64 | MetaType::I64 | MetaType::F64 | MetaType::String => 8,
            MetaType::Array => 12,
        }
    }
}

impl fmt::Display for MetaType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum MetaValue {
    /// GGUF type 0.
    U8(u8),
    /// GGUF type 1.
    I8(i8),
    /// GGUF type 2.
    U16(u16),
    /// GGUF type 3.
    I16(i16),
    /// GGUF type 4.
    U32(u32),
    /// GGUF type 5.
    I32(i32),
    /// GGUF type 6.
    F32(f32),
    /// GGUF type 7.
    Bool(bool),
    /// GGUF type 8.
    String(String),
    /// GGUF type 9.
    Array(MetaArray),
    /// GGUF type 10.
    U64(u64),
    /// GGUF type 11.
    I64(i64),
    /// GGUF type 12.
    F64(f64),
}

/// A metadata array: every value has type `elem_type` (arrays may nest).
#[derive(Clone, Debug, PartialEq)]
pub struct MetaArray {
    /// The type of every element.
    pub elem_type: MetaType,
    /// The elements, in file order.
    pub values: Vec<MetaValue>,
}

impl MetaValue {
    /// The value's GGUF type.
    pub const fn meta_type(&self) -> MetaType {
        match self {
            MetaValue::U8(_) => MetaType::U8,
            MetaValue::I8(_) => MetaType::I8,
            MetaValue::U16(_) => MetaType::U16,
            MetaValue::I16(_) => MetaType::I16,
            MetaValue::U32(_) => MetaType::U32,
            MetaValue::I32(_) => MetaType::I32,
            MetaValue::F32(_) => MetaType::F32,
            MetaValue::Bool(_) => MetaType::Bool,
            MetaValue::String(_) => MetaType::String,
            MetaValue::Array(_) => MetaType::Array,
            MetaValue::U64(_) => MetaType::U64,
            MetaValue::I64(_) => MetaType::I64,
            MetaValue::F64(_) => MetaType::F64,
        }
    }

    /// The string, for a `String` value.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            MetaValue::String(s) => Some(s),
            _ => None,
        }
    }

    /// The value as an `i128`, for any integer type (`Bool` and floats excluded).
    fn as_integer(&self) -> Option<i128> {
        Some(match *self {
            MetaValue::U8(v) => v.into(),
            MetaValue::I8(v) => v.into(),
            MetaValue::U16(v) => v.into(),
            MetaValue::I16(v) => v.into(),
            MetaValue::U32(v) => v.into(),
            MetaValue::I32(v) => v.into(),
            MetaValue::U64(v) => v.into(),
            MetaValue::I64(v) => v.into(),
            _ => return None,
        })
    }

    /// Any integer value that fits a `u32`.
    pub fn as_u32(&self) -> Option<u32> {
        self.as_integer().and_then(|v| u32::try_from(v).ok())
    }

    /// Any integer value that fits an `i32`.
    pub fn as_i32(&self) -> Option<i32> {
        self.as_integer().and_then(|v| i32::try_from(v).ok())
    }

    /// Any integer value that fits a `u64` (negative values give `None`).
    pub fn as_u64(&self) -> Option<u64> {
        self.as_integer().and_then(|v| u64::try_from(v).ok())
    }

    /// Any integer value that fits an `i64`.
    pub fn as_i64(&self) -> Option<i64> {
        self.as_integer().and_then(|v| i64::try_from(v).ok())
    }

    /// An `F32` or `F64` value (the latter rounded to f32, as ggml would when it
    /// stores a hyperparameter), or an integer an f32 holds exactly.
    pub fn as_f32(&self) -> Option<f32> {
        match *self {
            MetaValue::F32(v) => Some(v),
            MetaValue::F64(v) => Some(v as f32),
            _ => {
                let v = self.as_integer()?;
                // Integers up to 2^24 in magnitude are exact in f32.
                (v.unsigned_abs() <= 1 << 24).then_some(v as f32)
            }
        }
    }

    /// An `F32` or `F64` value, or an integer an f64 holds exactly.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            MetaValue::F32(v) => Some(v.into()),
            MetaValue::F64(v) => Some(v),
            _ => {
                let v = self.as_integer()?;
                (v.unsigned_abs() <= 1 << 53).then_some(v as f64)
            }
        }
    }

    /// The value of a `Bool`.
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            MetaValue::Bool(b) => Some(b),
            _ => None,
        }
    }

    /// The array, for an `Array` value.
    pub fn as_array(&self) -> Option<&MetaArray> {
        match self {
            MetaValue::Array(a) => Some(a),
            _ => None,
        }
    }
}

impl fmt::Display for MetaValue {
    /// A short human-readable form; long arrays are elided after a few elements.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MetaValue::U8(v) => write!(f, "{v}"),
            MetaValue::I8(v) => write!(f, "{v}"),
            MetaValue::U16(v) => write!(f, "{v}"),
            MetaValue::I16(v) => write!(f, "{v}"),
            MetaValue::U32(v) => write!(f, "{v}"),
            MetaValue::I32(v) => write!(f, "{v}"),
            MetaValue::F32(v) => write!(f, "{v}"),
            MetaValue::Bool(v) => write!(f, "{v}"),
            MetaValue::String(v) => write!(f, "{v:?}"),
            MetaValue::U64(v) => write!(f, "{v}"),
            MetaValue::I64(v) => write!(f, "{v}"),
            MetaValue::F64(v) => write!(f, "{v}"),
            MetaValue::Array(a) => {
                const SHOWN: usize = 8;
                write!(f, "[{}; {}: ", a.elem_type, a.values.len())?;
                for (i, v) in a.values.iter().take(SHOWN).enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    write!(f, "{v}")?;
                }
                if a.values.len() > SHOWN {
                    f.write_str(", ...")?;
                }
                f.write_str("]")
            }
        }
    }
}

impl MetaArray {
    /// An array of `elem_type` holding `values` (not checked here: the writer
    /// checks that every value has `elem_type`).
    pub fn new(elem_type: MetaType, values: Vec<MetaValue>) -> MetaArray {
        MetaArray { elem_type, values }
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.values.len()
    }

    /// Whether the array has no elements.
    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    /// The elements, in file order.
    pub fn iter(&self) -> std::slice::Iter<'_, MetaValue> {
        self.values.iter()
    }

    /// The strings of a string array.
    pub fn as_str_vec(&self) -> Option<Vec<&str>> {
        self.values.iter().map(MetaValue::as_str).collect()
    }

    /// Every element as f32 (see [`MetaValue::as_f32`]); `None` if one does not convert.
    pub fn as_f32_vec(&self) -> Option<Vec<f32>> {
        self.values.iter().map(MetaValue::as_f32).collect()
    }

    /// Every element as i32 (see [`MetaValue::as_i32`]); `None` if one does not fit.
    pub fn as_i32_vec(&self) -> Option<Vec<i32>> {
        self.values.iter().map(MetaValue::as_i32).collect()
    }

    /// Every element as u32 (see [`MetaValue::as_u32`]); `None` if one does not fit.
    pub fn as_u32_vec(&self) -> Option<Vec<u32>> {
        self.values.iter().map(MetaValue::as_u32).collect()
    }

    /// Every element as u64 (see [`MetaValue::as_u64`]); `None` if one does not fit.
    pub fn as_u64_vec(&self) -> Option<Vec<u64>> {
        self.values.iter().map(MetaValue::as_u64).collect()
    }
}

impl<'a> IntoIterator for &'a MetaArray {
    type Item = &'a MetaValue;
    type IntoIter = std::slice::Iter<'a, MetaValue>;

    fn into_iter(self) -> Self::IntoIter {
        self.values.iter()
    }
}

impl From<&str> for MetaValue {
    fn from(v: &str) -> MetaValue {
        MetaValue::String(v.to_string())
    }
}

impl From<String> for MetaValue {
    fn from(v: String) -> MetaValue {
        MetaValue::String(v)
    }
}

macro_rules! impl_from_scalar {
    ($($t:ty => $variant:ident),* $(,)?) => {
        $(impl From<$t> for MetaValue {
            fn from(v: $t) -> MetaValue {
                MetaValue::$variant(v)
            }
        })*
    };
}

impl_from_scalar!(
    u8 => U8, i8 => I8, u16 => U16, i16 => I16, u32 => U32, i32 => I32,
    f32 => F32, bool => Bool, u64 => U64, i64 => I64, f64 => F64, MetaArray => Array,
);
