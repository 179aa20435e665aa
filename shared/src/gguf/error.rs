//! The one error type of the GGUF reader and writer. Every variant that comes
//! from the bytes of a file names the byte offset where the problem sits, so a
//! report about a broken 400 GB file can be checked with `xxd -s OFFSET`.
//!
//! All of these errors are permanent: reading the same file again gives the
//! same error. Only [`GgufError::Io`] and [`GgufError::SplitMissingPart`] can
//! depend on the state of the machine (a missing or unreadable file).

use std::io;
use std::path::PathBuf;

use super::value::MetaType;

/// Why a GGUF file could not be read or written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GgufError {
    /// An operating-system call failed on `path`.
    #[error("cannot {op} {path}: {source}")]
    Io {
        /// What was being done ("open", "map", "write"...).
        op: &'static str,
        /// The file it was done to.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },

    /// A parse error in one file of a (possibly multi-part) model.
    #[error("{path}: {source}")]
    InFile {
        /// The part file the error was found in.
        path: PathBuf,
        /// The error found in it.
        #[source]
        source: Box<GgufError>,
    },

    /// The first four bytes are not `GGUF`.
    #[error("bad magic {found:02x?} at offset 0, expected \"GGUF\" ([47, 47, 55, 46])")]
    BadMagic {
        /// The four bytes found.
        found: [u8; 4],
    },

    /// The version field (offset 4) holds a version this reader does not read.
    #[error("unsupported GGUF version {version} at offset 4: {reason}")]
    UnsupportedVersion {
        /// The version found.
        version: u32,
        /// Why it is refused.
        reason: &'static str,
    },

    /// The file ends inside a field.
    #[error("truncated file: {what} needs {needed} bytes at offset {offset}, but only {available} remain")]
    Truncated {
        /// The field being read.
        what: String,
        /// Where it starts.
        offset: u64,
        /// Bytes it needs.
        needed: u64,
        /// Bytes left in the file from `offset`.
        available: u64,
    },

    /// A string's length prefix points past the end of the file.
    #[error("{what} at offset {offset} has length {len}, past the end of the file ({available} bytes remain after its length)")]
    LengthPastEnd {
        /// The string being read.
        what: String,
        /// Where its length prefix starts.
        offset: u64,
        /// The length found.
        len: u64,
        /// Bytes left after the length prefix.
        available: u64,
    },

    /// A count (tensor_count, kv_count or an array length) is larger than the
    /// rest of the file could hold; rejected before anything is allocated.
    #[error("{what} at offset {offset} is {count}, which cannot fit in the {available} bytes left (each entry needs at least {min_bytes_each} bytes)")]
    CountTooLarge {
        /// The count being read.
        what: String,
        /// Where it starts.
        offset: u64,
        /// The count found.
        count: u64,
        /// The smallest encoding of one entry.
        min_bytes_each: u64,
        /// Bytes left in the file after the count.
        available: u64,
    },

    /// A metadata value type id outside 0..=12.
    #[error("{what} at offset {offset} has unknown metadata value type {type_id} (valid: 0..=12)")]
    UnknownValueType {
        /// The key or array being read.
        what: String,
        /// Where the type id sits.
        offset: u64,
        /// The id found.
        type_id: u32,
    },

    /// Arrays nested deeper than the reader follows (a guard against stack exhaustion).
    #[error("{what} at offset {offset}: arrays nested deeper than {max_depth} levels")]
    NestingTooDeep {
        /// The key being read.
        what: String,
        /// Where the too-deep array starts.
        offset: u64,
        /// The deepest nesting accepted.
        max_depth: usize,
    },

    /// A string is not valid UTF-8.
    #[error("invalid UTF-8 in {what} at offset {offset}")]
    InvalidUtf8 {
        /// The string being read.
        what: String,
        /// The offset of the first invalid byte.
        offset: u64,
    },

    /// A metadata key of length zero (ggml rejects these).
    #[error("metadata key #{index} at offset {offset} is empty")]
    EmptyKey {
        /// The key's position in the file, from 0.
        index: u64,
        /// Where its length prefix starts.
        offset: u64,
    },

    /// The same metadata key twice.
    #[error(
        "duplicated metadata key '{key}' at offset {offset} (first seen at offset {first_offset})"
    )]
    DuplicateKey {
        /// The key.
        key: String,
        /// Where the second copy starts.
        offset: u64,
        /// Where the first copy starts.
        first_offset: u64,
    },

    /// `general.alignment` is not a U32 (ggml requires one).
    #[error("general.alignment at offset {offset} must be of type U32, found {found}")]
    AlignmentType {
        /// Where the value starts.
        offset: u64,
        /// The type found.
        found: MetaType,
    },

    /// `general.alignment` is zero or not a power of two.
    #[error("alignment {alignment} (general.alignment at offset {offset}) is not a non-zero power of two")]
    BadAlignment {
        /// The alignment found.
        alignment: u64,
        /// Where the value starts.
        offset: u64,
    },

    /// A tensor name longer than ggml's `GGML_MAX_NAME - 1` bytes.
    #[error(
        "tensor name '{name}' at offset {offset} is {len} bytes long; ggml allows at most {max}"
    )]
    TensorNameTooLong {
        /// The name.
        name: String,
        /// Where it starts.
        offset: u64,
        /// Its length in bytes.
        len: usize,
        /// The longest accepted.
        max: usize,
    },

    /// The same tensor name twice (in one file or across the parts of a split model).
    #[error("duplicated tensor name '{name}' at offset {offset} of part {part} (first seen at offset {first_offset} of part {first_part})")]
    DuplicateTensor {
        /// The name.
        name: String,
        /// Where the second tensor info starts.
        offset: u64,
        /// The part holding the second one (0 for a single file).
        part: usize,
        /// Where the first tensor info starts.
        first_offset: u64,
        /// The part holding the first one.
        first_part: usize,
    },

    /// `n_dims` outside ggml's 1..=4.
    #[error("tensor '{name}': n_dims = {n_dims} at offset {offset}, ggml allows 1..=4")]
    BadDimCount {
        /// The tensor.
        name: String,
        /// Where n_dims sits.
        offset: u64,
        /// The value found.
        n_dims: u32,
    },

    /// A dimension above `i64::MAX`, or a shape whose element or byte count overflows.
    #[error("tensor '{name}': shape {ne:?} at offset {offset} is too large ({reason})")]
    ShapeOverflow {
        /// The tensor.
        name: String,
        /// Where the shape starts.
        offset: u64,
        /// The shape, `ne[0]` first.
        ne: Vec<u64>,
        /// What overflowed.
        reason: &'static str,
    },

    /// A ggml type id moeshard cannot compute with, or no ggml type at all.
    #[error("tensor '{name}': type id {type_id} at offset {offset}: {}", describe_type_id(*.type_id))]
    UnsupportedTensorType {
        /// The tensor.
        name: String,
        /// Where the type id sits.
        offset: u64,
        /// The id found.
        type_id: u32,
    },

    /// A row length that is not a whole number of quant blocks.
    #[error("tensor '{name}' ({ty}) at offset {offset}: ne[0] = {ne0} is not a multiple of the block size {block_elems}")]
    RowNotBlockMultiple {
        /// The tensor.
        name: String,
        /// Where the shape starts.
        offset: u64,
        /// Its type.
        ty: crate::quant::GgmlType,
        /// Its row length.
        ne0: u64,
        /// The type's block size.
        block_elems: usize,
    },

    /// A Q4_K_R8 tensor whose matrices are not whole groups of 8 rows (or that is not a matrix).
    #[error("tensor '{name}' (Q4_K_R8) at offset {offset}: shape {ne:?} is not matrices of whole groups of 8 rows (ne[1] a multiple of 8)")]
    PartialRowGroup {
        /// The tensor.
        name: String,
        /// Where the shape starts.
        offset: u64,
        /// Its shape.
        ne: Vec<u64>,
    },

    /// A tensor data offset that is not a multiple of the file's alignment.
    #[error("tensor '{name}': data offset {data_offset} (field at offset {offset}) is not a multiple of the alignment {alignment}")]
    MisalignedTensor {
        /// The tensor.
        name: String,
        /// Where the offset field sits.
        offset: u64,
        /// The offset found (relative to the data section).
        data_offset: u64,
        /// The file's alignment.
        alignment: u64,
    },

    /// Tensor data that extends past the end of the file.
    #[error("tensor '{name}': data at file offset {start}..{end} extends past the end of the file ({file_len} bytes)")]
    TensorDataPastEnd {
        /// The tensor.
        name: String,
        /// Absolute start of its data (saturated at `u64::MAX`).
        start: u64,
        /// Absolute end of its data (saturated at `u64::MAX`).
        end: u64,
        /// The file's length.
        file_len: u64,
    },

    /// Two tensors whose data overlap.
    #[error("tensors '{first}' (file offset {first_start}..{first_end}) and '{second}' (file offset {second_start}..{second_end}) overlap")]
    OverlappingTensors {
        /// The tensor starting first.
        first: String,
        /// Absolute start of its data.
        first_start: u64,
        /// Absolute end of its data.
        first_end: u64,
        /// The tensor starting inside it.
        second: String,
        /// Absolute start of its data.
        second_start: u64,
        /// Absolute end of its data.
        second_end: u64,
    },

    /// A part of a split model could not be opened.
    #[error("split model: part {part_no} of {count} is missing ({path}): {source}")]
    SplitMissingPart {
        /// The part's expected path.
        path: PathBuf,
        /// Its number, from 1 as in the file name.
        part_no: u32,
        /// The number of parts.
        count: u32,
        /// Why it could not be opened.
        #[source]
        source: io::Error,
    },

    /// The parts of a split model do not agree with each other or with their file names.
    #[error("split model {path}: {detail}")]
    SplitMismatch {
        /// The part where the disagreement was found.
        path: PathBuf,
        /// What disagrees.
        detail: String,
    },

    /// Metadata or tensor descriptions given to the writer that it cannot write
    /// as a valid file.
    #[error("cannot write GGUF: {0}")]
    InvalidInput(String),

    /// `write_tensor_data` got a buffer of the wrong length.
    #[error("tensor '{name}' needs {expected} bytes, got {got}")]
    TensorDataLength {
        /// The tensor being written.
        name: String,
        /// Its byte length.
        expected: u64,
        /// The buffer's length.
        got: u64,
    },

    /// The writer was used out of order (more tensors than described, or
    /// `finish` before every tensor was written).
    #[error("GGUF writer used out of order: {0}")]
    WriterState(String),
}

impl GgufError {
    /// The error itself, seen through [`GgufError::InFile`] wrappers.
    pub fn innermost(&self) -> &GgufError {
        match self {
            GgufError::InFile { source, .. } => source.innermost(),
            other => other,
        }
    }

    /// Wraps a parse error with the path of the file it came from.
    pub(crate) fn in_file(self, path: impl Into<PathBuf>) -> GgufError {
        GgufError::InFile {
            path: path.into(),
            source: Box::new(self),
        }
    }
}

/// "IQ2_XXS is not supported by moeshard" or "no such ggml type".
fn describe_type_id(type_id: u32) -> String {
    match crate::quant::GgmlType::name_of_id(type_id) {
        Some(name) => format!("{name} is not supported by moeshard"),
        None => "no such ggml type".to_string(),
    }
}
