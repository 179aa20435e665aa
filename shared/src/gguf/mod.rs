//! The GGUF container: a zero-copy reader over a memory map and a streaming writer.
//!
//! [`GgufFile::open`] maps a file read-only and parses only its header; tensor
//! data stays in the page cache (or on PMem) and [`GgufFile::tensor_data`]
//! hands out slices of the mapping, never copies. A model split by llama.cpp's
//! `gguf-split` (`name-00001-of-00003.gguf` ...) opens as one model, each
//! tensor's bytes a view into its own part's mapping.
//!
//! [`GgufWriter`] writes a file in one pass: header, then the tensors in
//! order, into `<path>.tmp`, renamed into place by `finish`. Its padding
//! reproduces files written by llama.cpp and gguf-py byte for byte.
//!
//! Every malformed input gives a [`GgufError`] naming the field and its byte
//! offset; nothing on the parse path panics or allocates more than the file's
//! size allows. The format is described in `docs/FORMATS.md` (section A).

mod error;
mod identity;
mod reader;
mod value;
mod writer;

#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::fs::File;
use std::ops::Range;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

pub use self::error::GgufError;
pub use self::identity::model_identity;
pub use self::reader::{
    GgufHeader, DEFAULT_ALIGNMENT, GGUF_MAGIC, MAX_ARRAY_DEPTH, MAX_DIMS, MAX_TENSOR_NAME_LEN,
};
pub use self::value::{MetaArray, MetaType, MetaValue};
pub use self::writer::{
    serialize_header, serialize_raw_header, GgufWriter, RawTensorInfo, TensorDesc,
};
use crate::quant::GgmlType;

/// Metadata key of a split model's part index (from 0), U16.
pub const KEY_SPLIT_NO: &str = "split.no";
/// Metadata key of a split model's number of parts, U16.
pub const KEY_SPLIT_COUNT: &str = "split.count";
/// Metadata key of a split model's total number of tensors, I32.
pub const KEY_SPLIT_TENSORS_COUNT: &str = "split.tensors.count";

/// One tensor's description from a GGUF header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorInfo {
    /// The tensor's name (`blk.0.ffn_gate_exps.weight`).
    pub name: String,
    /// Its ggml type.
    pub ty: GgmlType,
    /// Its shape, `ne[0]` (the contiguous dimension) first; 1 to 4 dimensions.
    pub ne: Vec<u64>,
    /// The part file holding its data (0 for a single file).
    pub part: usize,
    /// Where its data starts, relative to its part's data offset (as in the file).
    pub offset: u64,
    /// The length of its data in bytes.
    pub byte_len: u64,
}

impl TensorInfo {
    /// Number of dimensions as stored in the file.
    pub fn n_dims(&self) -> usize {
        self.ne.len()
    }

    /// The shape padded to four dimensions with 1s, as ggml holds it.
    pub fn ne4(&self) -> [u64; 4] {
        let mut out = [1; 4];
        out[..self.ne.len()].copy_from_slice(&self.ne);
        out
    }

    /// Number of elements.
    pub fn n_elements(&self) -> u64 {
        self.ne.iter().product()
    }

    /// Elements per row (`ne[0]`).
    pub fn row_len(&self) -> u64 {
        self.ne[0]
    }

    /// Number of rows: the product of every dimension but the first.
    pub fn n_rows(&self) -> u64 {
        self.ne[1..].iter().product()
    }

    /// Bytes of one row.
    pub fn row_bytes(&self) -> u64 {
        self.ne[0] / self.ty.block_elems() as u64 * self.ty.block_bytes() as u64
    }

    /// The byte range of the data in its part file, given that part's data offset.
    fn file_range(&self, data_offset: u64) -> Range<usize> {
        let start = (data_offset + self.offset) as usize;
        start..start + self.byte_len as usize
    }

    /// Length of this tensor info in the header.
    fn info_len(&self) -> u64 {
        8 + self.name.len() as u64 + 4 + 8 * self.ne.len() as u64 + 4 + 8
    }
}

/// One mapped file of a model.
#[derive(Debug)]
struct Part {
    path: PathBuf,
    mmap: Mmap,
    version: u32,
    alignment: u64,
    data_offset: u64,
}

/// A GGUF model opened for reading: one file or every part of a split model,
/// each memory-mapped read-only.
#[derive(Debug)]
pub struct GgufFile {
    /// Invariant: `parts[0]` is the file that was opened; parts in split order.
    parts: Vec<Part>,
    metadata: Vec<(String, MetaValue)>,
    /// Invariant: every tensor's data lies inside `parts[tensor.part]`.
    tensors: Vec<TensorInfo>,
    /// Invariant: maps each tensor name to its index in `tensors`.
    tensor_index: HashMap<String, usize>,
}

impl GgufFile {
    /// Maps and parses `path`. If it is the first part of a split model (its
    /// name ends in `-00001-of-0000N.gguf`, or its metadata has
    /// `split.count` > 1), every part is opened: metadata comes from the first
    /// (the `split.*` keys included), tensors from all parts in order.
    pub fn open(path: impl AsRef<Path>) -> Result<GgufFile, GgufError> {
        let path = path.as_ref();
        let started = std::time::Instant::now();
        let (first, header) = map_part(path, 0)?;
        let name_split = SplitName::parse(path);
        let count = split_count(path, &header, name_split.as_ref())?;
        let file = if count <= 1 {
            GgufFile::from_parts(vec![(first, header)])?
        } else {
            let name_split = name_split.ok_or_else(|| GgufError::SplitMismatch {
                path: path.to_path_buf(),
                detail: format!(
                    "split.count is {count} but the file name does not end in -00001-of-{count:05}.gguf, so the other parts cannot be found"
                ),
            })?;
            let mut parts = vec![(first, header)];
            for index in 1..count {
                let part_path = name_split.part_path(index, count);
                let (part, header) = match map_part(&part_path, index as usize) {
                    Err(GgufError::Io {
                        source, op: "open", ..
                    }) => {
                        return Err(GgufError::SplitMissingPart {
                            path: part_path,
                            part_no: index + 1,
                            count,
                            source,
                        })
                    }
                    other => other?,
                };
                check_part_keys(&part_path, &header, index, count)?;
                parts.push((part, header));
            }
            let file = GgufFile::from_parts(parts)?;
            check_split_tensor_count(&file)?;
            file
        };
        tracing::debug!(
            path = %path.display(),
            n_parts = file.parts.len(),
            n_tensors = file.tensors.len(),
            n_kv = file.metadata.len(),
            elapsed_us = started.elapsed().as_micros() as u64,
            "opened gguf"
        );
        Ok(file)
    }

    /// Maps and parses exactly one file, without following `split.*` keys to
    /// other parts (for tools that look at a single part).
    pub fn open_single(path: impl AsRef<Path>) -> Result<GgufFile, GgufError> {
        let (part, header) = map_part(path.as_ref(), 0)?;
        GgufFile::from_parts(vec![(part, header)])
    }

    /// Parses a complete GGUF file held in memory (for tests and fuzzing);
    /// tensor data is then [`GgufHeader::tensor_data`] of `bytes`.
    pub fn parse_bytes(bytes: &[u8]) -> Result<GgufHeader, GgufError> {
        GgufHeader::parse(bytes, 0)
    }

    fn from_parts(parts: Vec<(Part, GgufHeader)>) -> Result<GgufFile, GgufError> {
        let mut out_parts = Vec::with_capacity(parts.len());
        let mut metadata = Vec::new();
        let mut tensors = Vec::new();
        let mut tensor_index: HashMap<String, usize> = HashMap::new();
        let mut tensor_info_offsets = Vec::new();
        for (part_idx, (part, header)) in parts.into_iter().enumerate() {
            if part_idx == 0 {
                metadata = header.metadata;
            }
            for (info, info_offset) in header.tensors.into_iter().zip(header.tensor_info_offsets) {
                if let Some(&first) = tensor_index.get(&info.name) {
                    let first_info: &TensorInfo = &tensors[first];
                    return Err(GgufError::DuplicateTensor {
                        name: info.name,
                        offset: info_offset,
                        part: part_idx,
                        first_offset: tensor_info_offsets[first],
                        first_part: first_info.part,
                    }
                    .in_file(&part.path));
                }
                tensor_index.insert(info.name.clone(), tensors.len());
                tensors.push(info);
                tensor_info_offsets.push(info_offset);
            }
            out_parts.push(part);
        }
        Ok(GgufFile {
            parts: out_parts,
            metadata,
            tensors,
            tensor_index,
        })
    }

    /// Metadata of the (first) file, in file order.
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

    /// The GGUF version of the (first) file.
    pub fn version(&self) -> u32 {
        self.parts[0].version
    }

    /// The tensor data alignment of the (first) file.
    pub fn alignment(&self) -> u64 {
        self.parts[0].alignment
    }

    /// Where the (first) file's tensor data section starts.
    pub fn data_offset(&self) -> u64 {
        self.parts[0].data_offset
    }

    /// Tensors in file order, across all parts.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    /// The tensor named `name`.
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensor_index.get(name).map(|&i| &self.tensors[i])
    }

    /// The data of `info`: a slice of its part's mapping (no copy). The slice
    /// starts at a multiple of the file's alignment (mappings are page-aligned).
    ///
    /// # Panics
    /// If `info` does not come from this file.
    pub fn tensor_data(&self, info: &TensorInfo) -> &[u8] {
        let part = &self.parts[info.part];
        let range = info.file_range(part.data_offset);
        part.mmap
            .get(range.clone())
            .unwrap_or_else(|| panic!("tensor '{}' at {range:?} is not in this file", info.name))
    }

    /// Number of part files (1 unless the model is split).
    pub fn n_parts(&self) -> usize {
        self.parts.len()
    }

    /// The path of part `part`.
    pub fn part_path(&self, part: usize) -> &Path {
        &self.parts[part].path
    }

    /// The data offset of part `part`.
    pub fn part_data_offset(&self, part: usize) -> u64 {
        self.parts[part].data_offset
    }

    /// The whole mapping of part `part` (for `madvise`, hashing, NUMA binding).
    pub fn part_bytes(&self, part: usize) -> &[u8] {
        &self.parts[part].mmap
    }

    /// The header of part `part`: its bytes before the tensor data, which
    /// identify the model (metadata and tensor table) without reading weights.
    pub fn header_bytes(&self, part: usize) -> &[u8] {
        let part = &self.parts[part];
        &part.mmap[..part.data_offset as usize]
    }
}

/// Opens, maps and parses one part file.
fn map_part(path: &Path, part: usize) -> Result<(Part, GgufHeader), GgufError> {
    let io_err = |op, source| GgufError::Io {
        op,
        path: path.to_path_buf(),
        source,
    };
    let file = File::open(path).map_err(|e| io_err("open", e))?;
    // SAFETY: the mapping is read-only and private to this process. moeshard
    // treats model files as immutable while they are open; a file truncated
    // or rewritten underneath the mapping by another process would be a
    // deployment error (it can fault on access), which no reader of mapped
    // files can guard against.
    let mmap = unsafe { Mmap::map(&file) }.map_err(|e| io_err("map", e))?;
    let header = GgufHeader::parse(&mmap, part).map_err(|e| e.in_file(path))?;
    let part = Part {
        path: path.to_path_buf(),
        mmap,
        version: header.version,
        alignment: header.alignment,
        data_offset: header.data_offset,
    };
    Ok((part, header))
}

/// The number of parts of the model whose first file is `path`: 1 for an
/// unsplit file.
fn split_count(
    path: &Path,
    header: &GgufHeader,
    name: Option<&SplitName>,
) -> Result<u32, GgufError> {
    let mismatch = |detail: String| GgufError::SplitMismatch {
        path: path.to_path_buf(),
        detail,
    };
    let meta_count = match header.get(KEY_SPLIT_COUNT) {
        None => None,
        Some(v) => Some(
            v.as_u32()
                .ok_or_else(|| mismatch(format!("{KEY_SPLIT_COUNT} is {v}, not a part count")))?,
        ),
    };
    // gguf-split writes split.count = 0 into a merged file so that it is not
    // taken for a part; treat 0 and 1 as "not split".
    let count = match (meta_count, name) {
        (Some(c), Some(n)) if c > 1 || n.count > 1 => {
            if c != n.count {
                return Err(mismatch(format!(
                    "{KEY_SPLIT_COUNT} is {c} but the file name says {} parts",
                    n.count
                )));
            }
            c
        }
        (Some(c), _) => c,
        (None, Some(n)) => n.count,
        (None, None) => 1,
    };
    if count <= 1 {
        return Ok(1);
    }
    let split_no = header.get(KEY_SPLIT_NO).map(MetaValue::as_u32);
    let no_from_name = name.map(|n| n.no);
    if split_no.is_some_and(|n| n != Some(0)) || no_from_name.is_some_and(|n| n != 1) {
        return Err(mismatch(format!(
            "this is not the first part of a {count}-part model ({KEY_SPLIT_NO} = {}); open the -00001-of-{count:05}.gguf file",
            header
                .get(KEY_SPLIT_NO)
                .map_or_else(|| "absent".to_string(), ToString::to_string)
        )));
    }
    Ok(count)
}

/// Checks the `split.*` keys of part `index` (from 0) of a `count`-part model.
/// Later parts written by gguf-split carry only these keys.
fn check_part_keys(
    path: &Path,
    header: &GgufHeader,
    index: u32,
    count: u32,
) -> Result<(), GgufError> {
    let mismatch = |detail: String| GgufError::SplitMismatch {
        path: path.to_path_buf(),
        detail,
    };
    if let Some(v) = header.get(KEY_SPLIT_COUNT) {
        if v.as_u32() != Some(count) {
            return Err(mismatch(format!(
                "{KEY_SPLIT_COUNT} is {v} here but {count} in the first part"
            )));
        }
    }
    match header.get(KEY_SPLIT_NO) {
        None => {}
        Some(v) if v.as_u32() == Some(index) => {}
        Some(v) => {
            return Err(mismatch(format!(
                "{KEY_SPLIT_NO} is {v} but this file is part {index} (from 0) by its name"
            )))
        }
    }
    Ok(())
}

/// Checks `split.tensors.count` of the first part against the tensors found in all parts.
fn check_split_tensor_count(file: &GgufFile) -> Result<(), GgufError> {
    let Some(v) = file.get(KEY_SPLIT_TENSORS_COUNT) else {
        return Ok(());
    };
    if v.as_u64() != Some(file.tensors.len() as u64) {
        return Err(GgufError::SplitMismatch {
            path: file.parts[0].path.clone(),
            detail: format!(
                "{KEY_SPLIT_TENSORS_COUNT} is {v} but the {} parts hold {} tensors",
                file.parts.len(),
                file.tensors.len()
            ),
        });
    }
    Ok(())
}

/// A split part's file name, `PREFIX-NNNNN-of-MMMMM.gguf`, as llama.cpp's
/// `llama_split_path` writes it.
#[derive(Debug)]
struct SplitName {
    dir: PathBuf,
    prefix: String,
    /// The part number in the name (from 1).
    no: u32,
    count: u32,
}

impl SplitName {
    fn parse(path: &Path) -> Option<SplitName> {
        let file_name = path.file_name()?.to_str()?;
        let stem = file_name.strip_suffix(".gguf")?;
        let (rest, count) = stem.rsplit_once("-of-")?;
        let (prefix, no) = rest.rsplit_once('-')?;
        let all_digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
        if !all_digits(no) || !all_digits(count) {
            return None;
        }
        let name = SplitName {
            dir: path.parent().map(Path::to_path_buf).unwrap_or_default(),
            prefix: prefix.to_string(),
            no: no.parse().ok()?,
            count: count.parse().ok()?,
        };
        // Only names llama.cpp itself would write (5-digit zero padding).
        (name.no >= 1 && name.file_name(name.no - 1, name.count) == file_name).then_some(name)
    }

    fn file_name(&self, index: u32, count: u32) -> String {
        format!("{}-{:05}-of-{:05}.gguf", self.prefix, index + 1, count)
    }

    /// The path of part `index` (from 0).
    fn part_path(&self, index: u32, count: u32) -> PathBuf {
        self.dir.join(self.file_name(index, count))
    }
}
