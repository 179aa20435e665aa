//! Parsing of one GGUF file's header (magic, version, metadata, tensor infos)
//! from a byte slice, checking every count and length against the bytes left
//! before allocating. Tensor data is never read: only its bounds are checked
//! against the length of the slice, so parsing a memory map of a 400 GB file
//! touches only the pages of its header.

use std::collections::HashMap;

use super::error::GgufError;
use super::value::{MetaArray, MetaType, MetaValue};
use super::TensorInfo;
use crate::quant::GgmlType;

/// `"GGUF"` read as a little-endian u32.
pub const GGUF_MAGIC: [u8; 4] = *b"GGUF";
/// The alignment of the tensor data when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// ggml's `GGML_MAX_DIMS`.
pub const MAX_DIMS: u32 = 4;
/// ggml's `GGML_MAX_NAME` is 64 bytes including the NUL.
pub const MAX_TENSOR_NAME_LEN: usize = 63;
/// The deepest nesting of arrays the reader follows. ggml reads no nested
/// arrays at all and gguf-py writes at most two levels; the cap keeps a
/// hostile file from exhausting the stack through recursion.
pub const MAX_ARRAY_DEPTH: usize = 8;

/// Smallest metadata entry: key length (8) + one key byte + type (4) + a one-byte value.
const MIN_KV_BYTES: u64 = 8 + 1 + 4 + 1;
/// Smallest tensor info: name length (8) + n_dims (4) + one dimension (8) + type (4) + offset (8).
const MIN_TENSOR_INFO_BYTES: u64 = 8 + 4 + 8 + 4 + 8;

/// The parsed header of one GGUF file (one part of a split model).
#[derive(Clone, Debug)]
pub struct GgufHeader {
    pub(crate) version: u32,
    pub(crate) alignment: u64,
    pub(crate) data_offset: u64,
    pub(crate) file_len: u64,
    pub(crate) metadata: Vec<(String, MetaValue)>,
    pub(crate) tensors: Vec<TensorInfo>,
    /// Invariant: maps each tensor name to its index in `tensors`.
    pub(crate) tensor_index: HashMap<String, usize>,
    /// Invariant: `tensor_info_offsets[i]` is where tensor info `i` starts.
    pub(crate) tensor_info_offsets: Vec<u64>,
}

impl GgufHeader {
    /// Parses the header of a GGUF file whose complete bytes are `bytes`,
    /// checking that every tensor's data lies inside `bytes`. Tensor infos get
    /// `part` as their part index.
    pub fn parse(bytes: &[u8], part: usize) -> Result<GgufHeader, GgufError> {
        Parser {
            bytes,
            pos: 0,
            part,
            data_present: true,
        }
        .parse()
    }

    /// Parses a header from `bytes`, the start of a file whose tensor data
    /// need not be present (a header read on its own, or one built by
    /// [`super::serialize_header`]). Everything is checked as by
    /// [`GgufHeader::parse`] except that tensor data ends inside `bytes`.
    /// [`GgufHeader::tensor_data`] must not be used on such a header.
    pub fn parse_header_only(bytes: &[u8], part: usize) -> Result<GgufHeader, GgufError> {
        Parser {
            bytes,
            pos: 0,
            part,
            data_present: false,
        }
        .parse()
    }

    /// The GGUF version (2 or 3).
    pub fn version(&self) -> u32 {
        self.version
    }

    /// The tensor data alignment (`general.alignment`, or 32).
    pub fn alignment(&self) -> u64 {
        self.alignment
    }

    /// Where the tensor data section starts. For a file without tensors this
    /// is the end of the header: such files carry no padding (gguf-py writes none).
    pub fn data_offset(&self) -> u64 {
        self.data_offset
    }

    /// The length of the file the header was parsed from.
    pub fn file_len(&self) -> u64 {
        self.file_len
    }

    /// Metadata in file order.
    pub fn metadata(&self) -> &[(String, MetaValue)] {
        &self.metadata
    }

    /// The value of metadata key `key`.
    pub fn get(&self, key: &str) -> Option<&MetaValue> {
        self.metadata
            .iter()
            .find_map(|(k, v)| (k == key).then_some(v))
    }

    /// `general.architecture`.
    pub fn architecture(&self) -> Option<&str> {
        self.get("general.architecture").and_then(MetaValue::as_str)
    }

    /// Tensor infos in file order.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    /// The tensor named `name`.
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensor_index.get(name).map(|&i| &self.tensors[i])
    }

    /// The data of `info` inside `bytes`, the slice this header was parsed from.
    ///
    /// # Panics
    /// If `info` does not lie inside `bytes` (it comes from another file).
    pub fn tensor_data<'a>(&self, bytes: &'a [u8], info: &TensorInfo) -> &'a [u8] {
        let range = info.file_range(self.data_offset);
        bytes
            .get(range.clone())
            .unwrap_or_else(|| panic!("tensor '{}' at {range:?} is not in this file", info.name))
    }
}

struct Parser<'a> {
    bytes: &'a [u8],
    pos: usize,
    part: usize,
    /// Whether `bytes` is the whole file, tensor data included.
    data_present: bool,
}

impl<'a> Parser<'a> {
    fn remaining(&self) -> u64 {
        (self.bytes.len() - self.pos) as u64
    }

    fn offset(&self) -> u64 {
        self.pos as u64
    }

    /// The next `n` bytes, or a `Truncated` error naming `what`.
    fn take(&mut self, n: u64, what: impl FnOnce() -> String) -> Result<&'a [u8], GgufError> {
        if n > self.remaining() {
            return Err(GgufError::Truncated {
                what: what(),
                offset: self.offset(),
                needed: n,
                available: self.remaining(),
            });
        }
        let start = self.pos;
        // `n <= remaining`, so it fits a usize and stays in bounds.
        self.pos += n as usize;
        Ok(&self.bytes[start..self.pos])
    }

    fn array<const N: usize>(
        &mut self,
        what: impl FnOnce() -> String,
    ) -> Result<[u8; N], GgufError> {
        let bytes = self.take(N as u64, what)?;
        let mut out = [0; N];
        out.copy_from_slice(bytes);
        Ok(out)
    }

    fn u32(&mut self, what: impl FnOnce() -> String) -> Result<u32, GgufError> {
        self.array(what).map(u32::from_le_bytes)
    }

    fn u64(&mut self, what: impl FnOnce() -> String) -> Result<u64, GgufError> {
        self.array(what).map(u64::from_le_bytes)
    }

    /// Reads a count and checks that `count` entries of at least
    /// `min_bytes_each` bytes fit in what is left, so that a hostile count
    /// never leads to a large allocation.
    fn count(&mut self, min_bytes_each: u64, what: impl Fn() -> String) -> Result<u64, GgufError> {
        let offset = self.offset();
        let count = self.u64(&what)?;
        let needed = u128::from(count) * u128::from(min_bytes_each);
        if needed > u128::from(self.remaining()) {
            return Err(GgufError::CountTooLarge {
                what: what(),
                offset,
                count,
                min_bytes_each,
                available: self.remaining(),
            });
        }
        Ok(count)
    }

    fn string(&mut self, what: impl Fn() -> String) -> Result<String, GgufError> {
        let offset = self.offset();
        let len = self.u64(|| format!("length of {}", what()))?;
        if len > self.remaining() {
            return Err(GgufError::LengthPastEnd {
                what: what(),
                offset,
                len,
                available: self.remaining(),
            });
        }
        let start = self.offset();
        let bytes = self.take(len, &what)?;
        match std::str::from_utf8(bytes) {
            Ok(s) => Ok(s.to_owned()),
            Err(e) => Err(GgufError::InvalidUtf8 {
                what: what(),
                offset: start + e.valid_up_to() as u64,
            }),
        }
    }

    fn meta_type(&mut self, what: impl Fn() -> String) -> Result<MetaType, GgufError> {
        let offset = self.offset();
        let type_id = self.u32(&what)?;
        MetaType::from_id(type_id).ok_or_else(|| GgufError::UnknownValueType {
            what: what(),
            offset,
            type_id,
        })
    }

    /// Reads one value of type `ty` (its type id already read).
    fn value(
        &mut self,
        ty: MetaType,
        depth: usize,
        what: &dyn Fn() -> String,
    ) -> Result<MetaValue, GgufError> {
        Ok(match ty {
            MetaType::U8 => MetaValue::U8(u8::from_le_bytes(self.array(what)?)),
            MetaType::I8 => MetaValue::I8(i8::from_le_bytes(self.array(what)?)),
            MetaType::U16 => MetaValue::U16(u16::from_le_bytes(self.array(what)?)),
            MetaType::I16 => MetaValue::I16(i16::from_le_bytes(self.array(what)?)),
            MetaType::U32 => MetaValue::U32(u32::from_le_bytes(self.array(what)?)),
            MetaType::I32 => MetaValue::I32(i32::from_le_bytes(self.array(what)?)),
            MetaType::F32 => MetaValue::F32(f32::from_le_bytes(self.array(what)?)),
            // ggml reads any non-zero byte as true.
            MetaType::Bool => MetaValue::Bool(self.array::<1>(what)?[0] != 0),
            MetaType::String => MetaValue::String(self.string(what)?),
            MetaType::U64 => MetaValue::U64(u64::from_le_bytes(self.array(what)?)),
            MetaType::I64 => MetaValue::I64(i64::from_le_bytes(self.array(what)?)),
            MetaType::F64 => MetaValue::F64(f64::from_le_bytes(self.array(what)?)),
            MetaType::Array => {
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(GgufError::NestingTooDeep {
                        what: what(),
                        offset: self.offset(),
                        max_depth: MAX_ARRAY_DEPTH,
                    });
                }
                let elem_type = self.meta_type(|| format!("element type of {}", what()))?;
                let count = self.count(elem_type.min_encoded_len(), || {
                    format!("length of {}", what())
                })?;
                // `count` fits in the bytes left (checked above), so this allocation
                // is bounded by the file's size.
                let mut values = Vec::with_capacity(count as usize);
                for i in 0..count {
                    let elem_what = || format!("element {i} of {}", what());
                    values.push(self.value(elem_type, depth + 1, &elem_what)?);
                }
                MetaValue::Array(MetaArray { elem_type, values })
            }
        })
    }

    fn parse(mut self) -> Result<GgufHeader, GgufError> {
        let magic: [u8; 4] = self.array(|| "magic".to_string())?;
        if magic != GGUF_MAGIC {
            return Err(GgufError::BadMagic { found: magic });
        }
        let version = self.u32(|| "version".to_string())?;
        check_version(version)?;

        let tensor_count = self.count(MIN_TENSOR_INFO_BYTES, || "tensor_count".to_string())?;
        let kv_count = self.count(MIN_KV_BYTES, || "kv_count".to_string())?;
        // Each count fits alone; the metadata comes first, so the tensor infos
        // must fit in what the smallest metadata would leave.
        let after_kv =
            u128::from(self.remaining()) - u128::from(kv_count) * u128::from(MIN_KV_BYTES);
        if u128::from(tensor_count) * u128::from(MIN_TENSOR_INFO_BYTES) > after_kv {
            return Err(GgufError::CountTooLarge {
                what: format!("tensor_count (after {kv_count} metadata entries)"),
                offset: 8,
                count: tensor_count,
                min_bytes_each: MIN_TENSOR_INFO_BYTES,
                available: after_kv as u64,
            });
        }

        let (metadata, alignment) = self.metadata(kv_count)?;
        let (tensors, tensor_info_offsets, tensor_index) = self.tensor_infos(tensor_count)?;

        // As in ggml, the data section starts at the next multiple of the
        // alignment, but only when there is tensor data: gguf-py writes no
        // padding after the header of a file without tensors.
        let header_end = self.offset();
        let data_offset = if tensors.is_empty() {
            header_end
        } else {
            let padded = header_end.next_multiple_of(alignment);
            if padded > self.bytes.len() as u64 {
                return Err(GgufError::Truncated {
                    what: format!("padding to the alignment {alignment} before the tensor data"),
                    offset: header_end,
                    needed: padded - header_end,
                    available: self.remaining(),
                });
            }
            padded
        };

        let header = GgufHeader {
            version,
            alignment,
            data_offset,
            file_len: self.bytes.len() as u64,
            metadata,
            tensors,
            tensor_index,
            tensor_info_offsets,
        };
        let data_end = if self.data_present {
            header.file_len
        } else {
            u64::MAX
        };
        check_tensor_layout(&header, data_end)?;
        Ok(header)
    }

    fn metadata(&mut self, kv_count: u64) -> Result<(Vec<(String, MetaValue)>, u64), GgufError> {
        // `kv_count` fits in the bytes left (checked by the caller).
        let mut metadata: Vec<(String, MetaValue)> = Vec::with_capacity(kv_count as usize);
        let mut key_offsets: HashMap<String, u64> = HashMap::with_capacity(kv_count as usize);
        let mut alignment = DEFAULT_ALIGNMENT;
        for index in 0..kv_count {
            let key_offset = self.offset();
            let key = self.string(|| format!("metadata key #{index}"))?;
            if key.is_empty() {
                return Err(GgufError::EmptyKey {
                    index,
                    offset: key_offset,
                });
            }
            if let Some(&first_offset) = key_offsets.get(&key) {
                return Err(GgufError::DuplicateKey {
                    key,
                    offset: key_offset,
                    first_offset,
                });
            }
            let what = || format!("value of key '{key}'");
            let ty = self.meta_type(what)?;
            let value_offset = self.offset();
            let value = self.value(ty, 0, &what)?;
            if key == "general.alignment" {
                alignment = match value {
                    MetaValue::U32(a) if a.is_power_of_two() => a.into(),
                    MetaValue::U32(a) => {
                        return Err(GgufError::BadAlignment {
                            alignment: a.into(),
                            offset: value_offset,
                        })
                    }
                    _ => {
                        return Err(GgufError::AlignmentType {
                            offset: value_offset,
                            found: ty,
                        })
                    }
                };
            }
            key_offsets.insert(key.clone(), key_offset);
            metadata.push((key, value));
        }
        Ok((metadata, alignment))
    }

    #[allow(clippy::type_complexity)]
    fn tensor_infos(
        &mut self,
        tensor_count: u64,
    ) -> Result<(Vec<TensorInfo>, Vec<u64>, HashMap<String, usize>), GgufError> {
        // `tensor_count` fits in the bytes left (checked by the caller).
        let n = tensor_count as usize;
        let mut tensors = Vec::with_capacity(n);
        let mut offsets = Vec::with_capacity(n);
        let mut index: HashMap<String, usize> = HashMap::with_capacity(n);
        for i in 0..n {
            let info_offset = self.offset();
            let info = self.tensor_info(i)?;
            if let Some(&first) = index.get(&info.name) {
                return Err(GgufError::DuplicateTensor {
                    name: info.name,
                    offset: info_offset,
                    part: self.part,
                    first_offset: offsets[first],
                    first_part: self.part,
                });
            }
            index.insert(info.name.clone(), i);
            offsets.push(info_offset);
            tensors.push(info);
        }
        Ok((tensors, offsets, index))
    }

    fn tensor_info(&mut self, i: usize) -> Result<TensorInfo, GgufError> {
        let name_offset = self.offset();
        let name = self.string(|| format!("name of tensor #{i}"))?;
        if name.len() > MAX_TENSOR_NAME_LEN {
            return Err(GgufError::TensorNameTooLong {
                len: name.len(),
                name,
                offset: name_offset,
                max: MAX_TENSOR_NAME_LEN,
            });
        }
        let dims_offset = self.offset();
        let n_dims = self.u32(|| format!("n_dims of tensor '{name}'"))?;
        if !(1..=MAX_DIMS).contains(&n_dims) {
            return Err(GgufError::BadDimCount {
                name,
                offset: dims_offset,
                n_dims,
            });
        }
        let ne_offset = self.offset();
        let mut ne = Vec::with_capacity(n_dims as usize);
        for j in 0..n_dims {
            ne.push(self.u64(|| format!("ne[{j}] of tensor '{name}'"))?);
        }
        let overflow = |reason| GgufError::ShapeOverflow {
            name: name.clone(),
            offset: ne_offset,
            ne: ne.clone(),
            reason,
        };
        // ggml holds dimensions and the element count in int64_t.
        if ne.iter().any(|&d| d > i64::MAX as u64) {
            return Err(overflow("a dimension exceeds i64::MAX"));
        }
        let n_elements = ne
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d))
            .filter(|&n| n <= i64::MAX as u64)
            .ok_or_else(|| overflow("the element count exceeds i64::MAX"))?;

        let type_offset = self.offset();
        let type_id = self.u32(|| format!("type of tensor '{name}'"))?;
        let ty = GgmlType::from_id(type_id).ok_or_else(|| GgufError::UnsupportedTensorType {
            name: name.clone(),
            offset: type_offset,
            type_id,
        })?;
        let block_elems = ty.block_elems() as u64;
        if !ne[0].is_multiple_of(block_elems) {
            return Err(GgufError::RowNotBlockMultiple {
                name,
                offset: ne_offset,
                ty,
                ne0: ne[0],
                block_elems: ty.block_elems(),
            });
        }
        if ty == GgmlType::Q4_K_R8 && !(ne.len() >= 2 && ne[1].is_multiple_of(8)) {
            return Err(GgufError::PartialRowGroup {
                name,
                offset: ne_offset,
                ne,
            });
        }
        let byte_len = (n_elements / block_elems)
            .checked_mul(ty.block_bytes() as u64)
            .filter(|&b| usize::try_from(b).is_ok())
            .ok_or_else(|| overflow("the size in bytes overflows"))?;

        let offset = self.u64(|| format!("data offset of tensor '{name}'"))?;
        Ok(TensorInfo {
            name,
            ty,
            ne,
            part: self.part,
            offset,
            byte_len,
        })
    }
}

fn check_version(version: u32) -> Result<(), GgufError> {
    let reason = match version {
        2 | 3 => return Ok(()),
        0 => "version 0 is invalid",
        1 => "GGUF v1 is no longer supported (only versions 2 and 3 are)",
        // A little-endian reader sees a big-endian file's version 3 as 0x03000000.
        v if v & 0xffff == 0 => "only little-endian files are supported and this looks big-endian",
        _ => "only versions 2 and 3 are supported",
    };
    Err(GgufError::UnsupportedVersion { version, reason })
}

/// Checks offsets against the alignment and the file's length, and that no
/// two tensors overlap. Gaps between tensors are allowed (gguf-py reads them;
/// ggml is stricter and wants the data packed in order).
fn check_tensor_layout(header: &GgufHeader, data_end: u64) -> Result<(), GgufError> {
    let mut ranges = Vec::with_capacity(header.tensors.len());
    for (i, t) in header.tensors.iter().enumerate() {
        if !t.offset.is_multiple_of(header.alignment) {
            return Err(GgufError::MisalignedTensor {
                name: t.name.clone(),
                // The offset field is the last 8 bytes of the tensor info.
                offset: header.tensor_info_offsets[i] + t.info_len() - 8,
                data_offset: t.offset,
                alignment: header.alignment,
            });
        }
        let start = header.data_offset.checked_add(t.offset);
        let end = start.and_then(|s| s.checked_add(t.byte_len));
        match end {
            Some(end) if end <= data_end => {
                if t.byte_len > 0 {
                    ranges.push((end - t.byte_len, end, i));
                }
            }
            _ => {
                return Err(GgufError::TensorDataPastEnd {
                    name: t.name.clone(),
                    start: start.unwrap_or(u64::MAX),
                    end: end.unwrap_or(u64::MAX),
                    file_len: header.file_len,
                })
            }
        }
    }
    ranges.sort_unstable();
    for pair in ranges.windows(2) {
        let (first_start, first_end, first) = pair[0];
        let (second_start, second_end, second) = pair[1];
        if second_start < first_end {
            return Err(GgufError::OverlappingTensors {
                first: header.tensors[first].name.clone(),
                first_start,
                first_end,
                second: header.tensors[second].name.clone(),
                second_start,
                second_end,
            });
        }
    }
    Ok(())
}
