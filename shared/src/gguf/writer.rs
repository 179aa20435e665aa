//! Writing GGUF files: header serialization and a streaming writer.
//!
//! The layout reproduces llama.cpp's and gguf-py's files byte for byte:
//! metadata and tensor infos in the order given, tensor offsets packed in
//! order with each tensor padded with zeros to the alignment (the last one
//! too), and zero padding between the header and the data only when there is
//! data (gguf-py writes a tensor-less vocab file with no padding at all).

use std::collections::HashSet;
use std::fs::{self, File};
use std::io::{self, BufWriter, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use super::error::GgufError;
use super::reader::{
    DEFAULT_ALIGNMENT, GGUF_MAGIC, MAX_ARRAY_DEPTH, MAX_DIMS, MAX_TENSOR_NAME_LEN,
};
use super::value::MetaValue;
use super::TensorInfo;
use crate::quant::GgmlType;

/// The GGUF version the writer produces.
const WRITE_VERSION: u32 = 3;

/// A tensor to be written: everything but its place in the file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorDesc {
    /// The tensor's name.
    pub name: String,
    /// Its ggml type.
    pub ty: GgmlType,
    /// Its shape, `ne[0]` first.
    pub ne: Vec<u64>,
}

impl TensorDesc {
    /// A tensor called `name` of type `ty` and shape `ne` (`ne[0]` first).
    pub fn new(name: impl Into<String>, ty: GgmlType, ne: impl Into<Vec<u64>>) -> TensorDesc {
        TensorDesc {
            name: name.into(),
            ty,
            ne: ne.into(),
        }
    }

    /// The data length in bytes, or why the shape cannot be written.
    pub fn byte_len(&self) -> Result<u64, GgufError> {
        let invalid =
            |why: String| GgufError::InvalidInput(format!("tensor '{}': {why}", self.name));
        if self.name.len() > MAX_TENSOR_NAME_LEN {
            return Err(invalid(format!(
                "name is {} bytes long, ggml allows at most {MAX_TENSOR_NAME_LEN}",
                self.name.len()
            )));
        }
        if self.ne.is_empty() || self.ne.len() > MAX_DIMS as usize {
            return Err(invalid(format!(
                "{} dimensions, ggml allows 1..=4",
                self.ne.len()
            )));
        }
        let n_elements = self
            .ne
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d))
            .filter(|&n| n <= i64::MAX as u64)
            .ok_or_else(|| invalid(format!("shape {:?} has too many elements", self.ne)))?;
        let block_elems = self.ty.block_elems() as u64;
        if !self.ne[0].is_multiple_of(block_elems) {
            return Err(invalid(format!(
                "ne[0] = {} is not a multiple of the {} block size {block_elems}",
                self.ne[0], self.ty
            )));
        }
        (n_elements / block_elems)
            .checked_mul(self.ty.block_bytes() as u64)
            .ok_or_else(|| invalid(format!("shape {:?} is too large in bytes", self.ne)))
    }
}

impl From<&TensorInfo> for TensorDesc {
    fn from(info: &TensorInfo) -> TensorDesc {
        TensorDesc::new(info.name.clone(), info.ty, info.ne.clone())
    }
}

/// A tensor info written exactly as given, for building malformed headers in
/// tests and fuzz seeds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RawTensorInfo {
    /// The name.
    pub name: String,
    /// The dimensions (`n_dims` is their count).
    pub ne: Vec<u64>,
    /// The ggml type id.
    pub type_id: u32,
    /// The data offset relative to the data section.
    pub offset: u64,
}

/// The header of a file with `metadata` and `tensors` laid out as the writer
/// lays them out, padding to the data section included (when there are
/// tensors). Appending each tensor's data padded to the alignment gives a
/// complete file.
pub fn serialize_header(
    metadata: &[(String, MetaValue)],
    tensors: &[TensorDesc],
) -> Result<Vec<u8>, GgufError> {
    Ok(Layout::new(metadata, tensors)?.header)
}

/// A header holding exactly what it is given, unchecked and unpadded:
/// `version`, the metadata, then the tensor infos. For tests and fuzzing,
/// which need headers no valid writer would produce.
pub fn serialize_raw_header(
    version: u32,
    metadata: &[(String, MetaValue)],
    tensors: &[RawTensorInfo],
) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&GGUF_MAGIC);
    out.extend_from_slice(&version.to_le_bytes());
    out.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    out.extend_from_slice(&(metadata.len() as u64).to_le_bytes());
    for (key, value) in metadata {
        put_string(&mut out, key);
        out.extend_from_slice(&value.meta_type().id().to_le_bytes());
        put_value(&mut out, value);
    }
    for t in tensors {
        put_string(&mut out, &t.name);
        out.extend_from_slice(&(t.ne.len() as u32).to_le_bytes());
        for &d in &t.ne {
            out.extend_from_slice(&d.to_le_bytes());
        }
        out.extend_from_slice(&t.type_id.to_le_bytes());
        out.extend_from_slice(&t.offset.to_le_bytes());
    }
    out
}

fn put_string(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// Appends a value's payload (without its type id).
fn put_value(out: &mut Vec<u8>, value: &MetaValue) {
    match value {
        MetaValue::U8(v) => out.push(*v),
        MetaValue::I8(v) => out.extend_from_slice(&v.to_le_bytes()),
        MetaValue::U16(v) => out.extend_from_slice(&v.to_le_bytes()),
        MetaValue::I16(v) => out.extend_from_slice(&v.to_le_bytes()),
        MetaValue::U32(v) => out.extend_from_slice(&v.to_le_bytes()),
        MetaValue::I32(v) => out.extend_from_slice(&v.to_le_bytes()),
        MetaValue::F32(v) => out.extend_from_slice(&v.to_le_bytes()),
        MetaValue::Bool(v) => out.push(u8::from(*v)),
        MetaValue::String(v) => put_string(out, v),
        MetaValue::U64(v) => out.extend_from_slice(&v.to_le_bytes()),
        MetaValue::I64(v) => out.extend_from_slice(&v.to_le_bytes()),
        MetaValue::F64(v) => out.extend_from_slice(&v.to_le_bytes()),
        MetaValue::Array(a) => {
            out.extend_from_slice(&a.elem_type.id().to_le_bytes());
            out.extend_from_slice(&(a.values.len() as u64).to_le_bytes());
            for v in &a.values {
                put_value(out, v);
            }
        }
    }
}

/// Checks that `value` can be written and read back: array elements of the
/// declared type, nesting within what the reader follows.
fn check_value(key: &str, value: &MetaValue, depth: usize) -> Result<(), GgufError> {
    let MetaValue::Array(array) = value else {
        return Ok(());
    };
    if depth >= MAX_ARRAY_DEPTH {
        return Err(GgufError::InvalidInput(format!(
            "key '{key}': arrays nested deeper than {MAX_ARRAY_DEPTH} levels"
        )));
    }
    for (i, v) in array.values.iter().enumerate() {
        if v.meta_type() != array.elem_type {
            return Err(GgufError::InvalidInput(format!(
                "key '{key}': element {i} is {} in an array of {}",
                v.meta_type(),
                array.elem_type
            )));
        }
        check_value(key, v, depth + 1)?;
    }
    Ok(())
}

/// A validated header and where each tensor goes.
struct Layout {
    /// The header bytes, padded to `data_offset` when there are tensors.
    header: Vec<u8>,
    alignment: u64,
    tensors: Vec<TensorInfo>,
}

impl Layout {
    fn new(metadata: &[(String, MetaValue)], descs: &[TensorDesc]) -> Result<Layout, GgufError> {
        let mut keys = HashSet::with_capacity(metadata.len());
        let mut alignment = DEFAULT_ALIGNMENT;
        for (key, value) in metadata {
            if key.is_empty() {
                return Err(GgufError::InvalidInput("empty metadata key".to_string()));
            }
            if !keys.insert(key.as_str()) {
                return Err(GgufError::InvalidInput(format!(
                    "duplicated metadata key '{key}'"
                )));
            }
            check_value(key, value, 0)?;
            if key == "general.alignment" {
                alignment = match *value {
                    MetaValue::U32(a) if a.is_power_of_two() => a.into(),
                    _ => {
                        return Err(GgufError::InvalidInput(format!(
                            "general.alignment must be a U32 power of two, not {} {value}",
                            value.meta_type()
                        )))
                    }
                };
            }
        }

        let mut names = HashSet::with_capacity(descs.len());
        let mut tensors = Vec::with_capacity(descs.len());
        let mut offset = 0u64;
        for desc in descs {
            if !names.insert(desc.name.as_str()) {
                return Err(GgufError::InvalidInput(format!(
                    "duplicated tensor name '{}'",
                    desc.name
                )));
            }
            let byte_len = desc.byte_len()?;
            tensors.push(TensorInfo {
                name: desc.name.clone(),
                ty: desc.ty,
                ne: desc.ne.clone(),
                part: 0,
                offset,
                byte_len,
            });
            offset = byte_len
                .checked_next_multiple_of(alignment)
                .and_then(|padded| offset.checked_add(padded))
                .ok_or_else(|| {
                    GgufError::InvalidInput("tensor data exceeds u64 bytes".to_string())
                })?;
        }

        let raw: Vec<RawTensorInfo> = tensors
            .iter()
            .map(|t| RawTensorInfo {
                name: t.name.clone(),
                ne: t.ne.clone(),
                type_id: t.ty.id(),
                offset: t.offset,
            })
            .collect();
        let mut header = serialize_raw_header(WRITE_VERSION, metadata, &raw);
        if !tensors.is_empty() {
            let padded = (header.len() as u64).next_multiple_of(alignment);
            header.resize(padded as usize, 0);
        }
        Ok(Layout {
            header,
            alignment,
            tensors,
        })
    }
}

/// Writes a GGUF file in one pass: the header when created, then each
/// tensor's data in order, then `finish`.
///
/// The file is written as `<path>.tmp` and renamed to `path` by
/// [`GgufWriter::finish`]; a writer dropped before `finish` removes the
/// temporary file, so nothing half-written ever carries the final name.
#[derive(Debug)]
pub struct GgufWriter {
    /// `None` once finished.
    out: Option<BufWriter<File>>,
    tmp_path: PathBuf,
    final_path: PathBuf,
    alignment: u64,
    data_offset: u64,
    tensors: Vec<TensorInfo>,
    /// Invariant: tensors `..next` have been written or skipped.
    next: usize,
    /// Invariant: the file position the next byte goes to.
    pos: u64,
    /// Bytes of the next tensor already given to `write_tensor_part`.
    partial: u64,
}

impl GgufWriter {
    /// Creates `<path>.tmp` and writes the header for `metadata` (in this
    /// order) and `tensors`. The alignment is `general.alignment` when
    /// present, else 32.
    pub fn create(
        path: impl AsRef<Path>,
        metadata: Vec<(String, MetaValue)>,
        tensors: Vec<TensorDesc>,
    ) -> Result<GgufWriter, GgufError> {
        let final_path = path.as_ref().to_path_buf();
        let layout = Layout::new(&metadata, &tensors)?;
        let mut tmp_name = final_path
            .file_name()
            .ok_or_else(|| {
                GgufError::InvalidInput(format!("{} is not a file path", final_path.display()))
            })?
            .to_os_string();
        tmp_name.push(".tmp");
        let tmp_path = final_path.with_file_name(tmp_name);
        let file = File::create(&tmp_path).map_err(|source| GgufError::Io {
            op: "create",
            path: tmp_path.clone(),
            source,
        })?;
        let mut writer = GgufWriter {
            out: Some(BufWriter::with_capacity(1 << 20, file)),
            tmp_path,
            final_path,
            alignment: layout.alignment,
            data_offset: layout.header.len() as u64,
            tensors: layout.tensors,
            next: 0,
            pos: 0,
            partial: 0,
        };
        writer.write(&layout.header)?;
        Ok(writer)
    }

    /// The tensors as they will be in the file (offsets and lengths), in order.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    /// The tensor whose data is expected next, if any.
    pub fn next_tensor(&self) -> Option<&TensorInfo> {
        self.tensors.get(self.next)
    }

    /// The file offset of the tensor data section.
    pub fn data_offset(&self) -> u64 {
        self.data_offset
    }

    /// The alignment in use.
    pub fn alignment(&self) -> u64 {
        self.alignment
    }

    /// Writes the next piece of the next tensor's data, for tensors too large
    /// to hold in memory: once its `byte_len` bytes have been given, the
    /// padding follows and the writer moves to the next tensor.
    pub fn write_tensor_part(&mut self, data: &[u8]) -> Result<(), GgufError> {
        let (byte_len, padded) = self.next_tensor_len()?;
        let end = self.partial + data.len() as u64;
        if end > byte_len {
            return Err(GgufError::TensorDataLength {
                name: self.tensors[self.next].name.clone(),
                expected: byte_len,
                got: end,
            });
        }
        self.write(data)?;
        self.partial = end;
        if end == byte_len {
            self.write_zeros(padded - byte_len)?;
            self.partial = 0;
            self.next += 1;
        }
        Ok(())
    }

    /// Writes the next tensor's data (exactly its `byte_len` bytes) and its padding.
    pub fn write_tensor_data(&mut self, data: &[u8]) -> Result<(), GgufError> {
        self.check_no_partial()?;
        let (byte_len, padded) = self.next_tensor_len()?;
        if data.len() as u64 != byte_len {
            return Err(GgufError::TensorDataLength {
                name: self.tensors[self.next].name.clone(),
                expected: byte_len,
                got: data.len() as u64,
            });
        }
        self.write(data)?;
        self.write_zeros(padded - byte_len)?;
        self.next += 1;
        Ok(())
    }

    /// Leaves the next tensor's data (and padding) as a hole: the writer seeks
    /// past it, so on file systems with sparse files it takes no space and
    /// reads as zeros. This makes huge test files cheap.
    pub fn skip_tensor_data(&mut self) -> Result<(), GgufError> {
        self.check_no_partial()?;
        let (_, padded) = self.next_tensor_len()?;
        let step = i64::try_from(padded)
            .map_err(|_| GgufError::InvalidInput(format!("cannot seek {padded} bytes")))?;
        let pos = self.pos;
        self.io("seek in", |out| out.seek(SeekFrom::Current(step)).map(drop))?;
        self.pos = pos + padded;
        self.next += 1;
        Ok(())
    }

    /// Pads, flushes, syncs the data to disk and renames the temporary file
    /// to the final path. Fails if some tensor was neither written nor skipped.
    pub fn finish(mut self) -> Result<(), GgufError> {
        if self.next != self.tensors.len() {
            return Err(GgufError::WriterState(format!(
                "finish called with {} of {} tensors not written (next: '{}')",
                self.tensors.len() - self.next,
                self.tensors.len(),
                self.tensors[self.next].name
            )));
        }
        let end = self.pos;
        self.io("flush", |out| out.flush())?;
        // A trailing hole left by `skip_tensor_data` is only a seek: set the
        // length so the file really ends after it.
        self.io("set the length of", |out| out.get_ref().set_len(end))?;
        self.io("sync", |out| out.get_ref().sync_all())?;
        // Dropping the file closes it before the rename.
        self.out = None;
        if let Err(source) = fs::rename(&self.tmp_path, &self.final_path) {
            let _ = fs::remove_file(&self.tmp_path);
            return Err(GgufError::Io {
                op: "rename into place",
                path: self.final_path.clone(),
                source,
            });
        }
        // Make the rename itself durable; best effort, as not every platform
        // lets a directory be opened and synced.
        if let Some(dir) = self.final_path.parent() {
            let dir = if dir.as_os_str().is_empty() {
                Path::new(".")
            } else {
                dir
            };
            if let Ok(d) = File::open(dir) {
                let _ = d.sync_all();
            }
        }
        tracing::debug!(path = %self.final_path.display(), bytes = end, "wrote gguf");
        Ok(())
    }

    /// A whole-tensor call in the middle of a tensor written in parts is a caller bug.
    fn check_no_partial(&self) -> Result<(), GgufError> {
        if self.partial == 0 {
            return Ok(());
        }
        Err(GgufError::WriterState(format!(
            "tensor '{}' is partly written ({} bytes)",
            self.tensors[self.next].name, self.partial
        )))
    }

    /// The next tensor's byte length and padded length.
    fn next_tensor_len(&self) -> Result<(u64, u64), GgufError> {
        let t = self.tensors.get(self.next).ok_or_else(|| {
            GgufError::WriterState(format!(
                "all {} tensors were already written",
                self.tensors.len()
            ))
        })?;
        // Cannot overflow: `Layout::new` checked the padded sum of all tensors.
        Ok((t.byte_len, t.byte_len.next_multiple_of(self.alignment)))
    }

    fn write(&mut self, bytes: &[u8]) -> Result<(), GgufError> {
        self.io("write", |out| out.write_all(bytes))?;
        self.pos += bytes.len() as u64;
        Ok(())
    }

    fn write_zeros(&mut self, n: u64) -> Result<(), GgufError> {
        const ZEROS: [u8; 256] = [0; 256];
        let mut left = n;
        while left > 0 {
            let chunk = left.min(ZEROS.len() as u64) as usize;
            self.write(&ZEROS[..chunk])?;
            left -= chunk as u64;
        }
        Ok(())
    }

    fn io(
        &mut self,
        op: &'static str,
        f: impl FnOnce(&mut BufWriter<File>) -> io::Result<()>,
    ) -> Result<(), GgufError> {
        let Some(out) = self.out.as_mut() else {
            return Err(GgufError::WriterState(
                "the file is already finished".to_string(),
            ));
        };
        f(out).map_err(|source| GgufError::Io {
            op,
            path: self.tmp_path.clone(),
            source,
        })
    }
}

impl Drop for GgufWriter {
    fn drop(&mut self) {
        // Not finished (an error, or the caller gave up): remove the partial file.
        if self.out.take().is_some() {
            if let Err(e) = fs::remove_file(&self.tmp_path) {
                tracing::warn!(path = %self.tmp_path.display(), error = %e, "cannot remove unfinished gguf");
            }
        }
    }
}
