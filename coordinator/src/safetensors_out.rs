//! Writing f32 tensors as a safetensors file (the format `moeshard eval` emits):
//! an 8-byte little-endian header length, a JSON header, then raw data.
//! Written to a temporary name and renamed, so a failed write leaves nothing.

use std::io::Write;
use std::path::Path;

/// Writes one f32 tensor `name` of `shape` to `path`.
pub fn write_f32(path: &Path, name: &str, shape: &[usize], data: &[f32]) -> std::io::Result<()> {
    let n: usize = shape.iter().product();
    if n != data.len() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{} values for shape {shape:?}", data.len()),
        ));
    }
    let header = serde_json::json!({
        name: { "dtype": "F32", "shape": shape, "data_offsets": [0, data.len() * 4] }
    })
    .to_string();
    // Pad the header with spaces so the data starts 8-byte aligned.
    let mut header = header.into_bytes();
    while !(8 + header.len()).is_multiple_of(8) {
        header.push(b' ');
    }
    let tmp = path.with_extension("safetensors.tmp");
    let result = (|| {
        let mut f = std::io::BufWriter::new(std::fs::File::create(&tmp)?);
        f.write_all(&(header.len() as u64).to_le_bytes())?;
        f.write_all(&header)?;
        for v in data {
            f.write_all(&v.to_le_bytes())?;
        }
        f.into_inner().map_err(|e| e.into_error())?.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}
