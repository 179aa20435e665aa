//! Entry points for the cargo-fuzz targets in `shared/fuzz`, kept here so that
//! crash inputs can be replayed by ordinary unit tests
//! (`gguf::tests::replay_fuzz_failures` runs every file in
//! `test_data/fuzz-failures/`).

use std::hint::black_box;

use crate::gguf::{serialize_header, GgufFile, GgufHeader, MetaValue, TensorDesc};

/// Parses `data` as a complete GGUF file. On success it touches every
/// metadata value and every tensor's data slice, and checks that the writer
/// serializes what was read into a header that reads back the same.
///
/// Returns normally on any input; a panic is a bug (in the reader, or a
/// disagreement between reader and writer).
pub fn check_gguf(data: &[u8]) {
    let Ok(header) = GgufFile::parse_bytes(data) else {
        return;
    };
    let mut checksum = 0u64;
    for (key, value) in header.metadata() {
        checksum = checksum.wrapping_add(key.len() as u64);
        checksum = checksum.wrapping_add(touch(value));
        assert!(header.get(key).is_some(), "key '{key}' not found by get");
    }
    for info in header.tensors() {
        let bytes = header.tensor_data(data, info);
        assert_eq!(bytes.len() as u64, info.byte_len);
        assert!(info
            .n_elements()
            .is_multiple_of(info.ty.block_elems() as u64));
        checksum = checksum.wrapping_add(bytes.iter().map(|&b| u64::from(b)).sum::<u64>());
        assert!(header.tensor(&info.name) == Some(info));
    }
    black_box(checksum);

    // Whatever the reader accepts, the writer must write, and reading that
    // back must give the same header again.
    let descs: Vec<TensorDesc> = header.tensors().iter().map(TensorDesc::from).collect();
    let written = serialize_header(header.metadata(), &descs)
        .unwrap_or_else(|e| panic!("the writer refuses what the reader accepted: {e}"));
    let reread = GgufHeader::parse_header_only(&written, 0)
        .unwrap_or_else(|e| panic!("the reader refuses what the writer wrote: {e}"));
    let descs_again: Vec<TensorDesc> = reread.tensors().iter().map(TensorDesc::from).collect();
    assert_eq!(
        descs, descs_again,
        "tensors changed in a write/read round trip"
    );
    let written_again = serialize_header(reread.metadata(), &descs_again)
        .unwrap_or_else(|e| panic!("the writer refuses its own output: {e}"));
    assert!(
        written == written_again,
        "metadata changed in a write/read round trip"
    );
}

/// Calls every accessor on `value` and returns something that depends on it.
fn touch(value: &MetaValue) -> u64 {
    let mut h = value.meta_type().id() as u64;
    h = h.wrapping_add(value.as_u64().unwrap_or(0));
    h = h.wrapping_add(value.as_i64().unwrap_or(0) as u64);
    h = h.wrapping_add(value.as_u32().unwrap_or(0).into());
    h = h.wrapping_add(value.as_f32().map_or(0, |f| f.to_bits().into()));
    h = h.wrapping_add(value.as_f64().map_or(0, f64::to_bits));
    h = h.wrapping_add(value.as_bool().map_or(0, u64::from));
    h = h.wrapping_add(value.as_str().map_or(0, |s| s.len() as u64));
    if let Some(array) = value.as_array() {
        h = h.wrapping_add(array.len() as u64);
        h = h.wrapping_add(array.as_str_vec().map_or(0, |v| v.len() as u64));
        h = h.wrapping_add(array.as_f32_vec().map_or(0, |v| v.len() as u64));
        h = h.wrapping_add(array.as_i32_vec().map_or(0, |v| v.len() as u64));
        for v in array {
            h = h.wrapping_add(touch(v));
        }
    }
    h
}
