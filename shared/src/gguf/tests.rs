//! Tests of the GGUF reader and writer: byte-exact round trips of every
//! fixture file, one test per malformation (each checking the error variant
//! and the offset in its message), a truncation sweep, split models, the
//! writer's temporary-file discipline, a sparse 400 GB file, and the replay
//! of fuzz crash inputs.

use std::path::{Path, PathBuf};
use std::time::Instant;

use super::*;
use crate::quant::GgmlType;

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Every `*.gguf` under `tests/fixtures`, sorted.
fn fixture_ggufs() -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|e| e == "gguf") {
                out.push(path);
            }
        }
    }
    let mut out = Vec::new();
    walk(&repo_root().join("tests/fixtures"), &mut out);
    out.sort();
    out
}

fn fixture(rel: &str) -> PathBuf {
    repo_root().join("tests/fixtures").join(rel)
}

fn kv(key: &str, value: impl Into<MetaValue>) -> (String, MetaValue) {
    (key.to_string(), value.into())
}

fn raw(name: &str, ne: &[u64], type_id: u32, offset: u64) -> RawTensorInfo {
    RawTensorInfo {
        name: name.to_string(),
        ne: ne.to_vec(),
        type_id,
        offset,
    }
}

/// A complete file: the raw header, zero padding to 32 and `data_len` data bytes.
fn file_with(
    metadata: &[(String, MetaValue)],
    tensors: &[RawTensorInfo],
    data_len: usize,
) -> Vec<u8> {
    let mut bytes = serialize_raw_header(3, metadata, tensors);
    if !tensors.is_empty() {
        bytes.resize(bytes.len().next_multiple_of(32), 0);
    }
    bytes.resize(bytes.len() + data_len, 0);
    bytes
}

/// Parses `bytes`, expecting an error that `matches` accepts and whose
/// message mentions `offset N`.
#[track_caller]
fn check_err(bytes: &[u8], offset: u64, matches: impl FnOnce(&GgufError) -> bool) -> String {
    let err = match GgufFile::parse_bytes(bytes) {
        Ok(_) => panic!("parse succeeded, expected an error at offset {offset}"),
        Err(e) => e,
    };
    let msg = err.to_string();
    assert!(matches(&err), "unexpected error variant: {err:?}");
    assert!(
        msg.contains(&format!("offset {offset}")),
        "message lacks 'offset {offset}': {msg}"
    );
    msg
}

/// Offset of the first occurrence of `needle` in `hay`.
fn find(hay: &[u8], needle: &[u8]) -> u64 {
    hay.windows(needle.len()).position(|w| w == needle).unwrap() as u64
}

// ---------------------------------------------------------------- fixtures

#[test]
fn every_fixture_round_trips_byte_for_byte() {
    let files = fixture_ggufs();
    assert_eq!(
        files.len(),
        21,
        "expected 16 model files and 5 vocab files: {files:?}"
    );
    let dir = tempfile::tempdir().unwrap();
    for path in &files {
        let original = std::fs::read(path).unwrap();
        let file = GgufFile::open(path).unwrap();
        let out = dir.path().join("out.gguf");
        let descs = file.tensors().iter().map(TensorDesc::from).collect();
        let mut w = GgufWriter::create(&out, file.metadata().to_vec(), descs).unwrap();
        for t in file.tensors() {
            w.write_tensor_data(file.tensor_data(t)).unwrap();
        }
        assert_eq!(w.data_offset(), file.data_offset(), "{}", path.display());
        w.finish().unwrap();
        let written = std::fs::read(&out).unwrap();
        assert_eq!(written.len(), original.len(), "{}", path.display());
        if let Some(i) = written.iter().zip(&original).position(|(a, b)| a != b) {
            panic!("{}: first difference at byte {i}", path.display());
        }
    }
}

#[test]
fn model_fixture_facts() {
    let file = GgufFile::open(fixture("qwen3moe/model-q4_k_m.gguf")).unwrap();
    assert_eq!(file.version(), 3);
    assert_eq!(file.alignment(), 32);
    assert_eq!(file.architecture(), Some("qwen3moe"));
    assert_eq!(file.n_parts(), 1);
    assert_eq!(file.data_offset() % 32, 0);
    assert_eq!(file.tensors().len(), 27);
    assert_eq!(file.metadata().len(), 27);
    let embd = file
        .get("qwen3moe.embedding_length")
        .and_then(MetaValue::as_u64);
    assert_eq!(embd, Some(256));
    let tokens = file
        .get("tokenizer.ggml.tokens")
        .and_then(MetaValue::as_array)
        .unwrap();
    assert_eq!(tokens.as_str_vec().unwrap().len(), 512);

    let gate = file.tensor("blk.0.ffn_gate_exps.weight").unwrap();
    assert_eq!(gate.n_dims(), 3);
    assert_eq!(gate.ne[0], 256, "ne[0] is n_embd");
    assert_eq!(gate.ne[2], 8, "ne[2] is n_expert");
    assert_eq!(gate.n_rows(), gate.ne[1] * 8);
    assert_eq!(gate.row_bytes() * gate.n_rows(), gate.byte_len);
    let data = file.tensor_data(gate);
    assert_eq!(data.len() as u64, gate.byte_len);
    assert_eq!(
        data.as_ptr() as usize % 32,
        0,
        "tensor data is aligned in memory"
    );

    // Offsets are packed in order, each tensor padded to the alignment.
    let mut expect = 0;
    for t in file.tensors() {
        assert_eq!(t.offset, expect, "{}", t.name);
        expect += t.byte_len.next_multiple_of(32);
    }
    assert_eq!(file.data_offset() + expect, file.part_bytes(0).len() as u64);
    assert_eq!(file.header_bytes(0).len() as u64, file.data_offset());
}

#[test]
fn vocab_fixture_has_no_tensors_and_no_padding() {
    let path = fixture("tokenizers/ggml-vocab-llama-spm.gguf");
    let file = GgufFile::open(&path).unwrap();
    assert!(file.tensors().is_empty());
    let len = std::fs::metadata(&path).unwrap().len();
    assert_eq!(
        file.data_offset(),
        len,
        "header runs to the end of the file"
    );
    assert_eq!(file.architecture(), Some("llama"));
    let tokens = file
        .get("tokenizer.ggml.tokens")
        .and_then(MetaValue::as_array)
        .unwrap();
    assert_eq!(tokens.elem_type, MetaType::String);
    assert_eq!(tokens.len(), 32000);
    let scores = file
        .get("tokenizer.ggml.scores")
        .and_then(MetaValue::as_array)
        .unwrap();
    assert_eq!(scores.as_f32_vec().unwrap().len(), 32000);
    let types = file
        .get("tokenizer.ggml.token_type")
        .and_then(MetaValue::as_array)
        .unwrap();
    assert_eq!(types.as_i32_vec().unwrap().len(), 32000);
}

#[test]
fn check_gguf_accepts_every_fixture() {
    for path in fixture_ggufs() {
        crate::fuzz::check_gguf(&std::fs::read(&path).unwrap());
    }
}

// ---------------------------------------------------------------- malformed headers

#[test]
fn bad_magic() {
    let mut bytes = file_with(&[], &[], 0);
    bytes[..4].copy_from_slice(b"GGML");
    check_err(
        &bytes,
        0,
        |e| matches!(e, GgufError::BadMagic { found } if found == b"GGML"),
    );
}

#[test]
fn unsupported_versions() {
    for (version, says) in [
        (1, "v1 is no longer supported"),
        (0, "invalid"),
        (4, "only versions 2 and 3"),
        (0x0300_0000, "big-endian"),
    ] {
        let bytes = serialize_raw_header(version, &[], &[]);
        let msg = check_err(
            &bytes,
            4,
            |e| matches!(e, GgufError::UnsupportedVersion { version: v, .. } if *v == version),
        );
        assert!(msg.contains(says), "{msg}");
    }
    // Version 2 has the same layout and is read.
    let v2 = serialize_raw_header(2, &[kv("a", 1u32)], &[]);
    assert_eq!(GgufFile::parse_bytes(&v2).unwrap().version(), 2);
}

#[test]
fn truncated_fields_name_their_offset() {
    let bytes = serialize_raw_header(3, &[kv("general.architecture", "llama")], &[]);
    // Cut inside the tensor count.
    check_err(
        &bytes[..12],
        8,
        |e| matches!(e, GgufError::Truncated { what, needed: 8, available: 4, .. } if what == "tensor_count"),
    );
    // Cut inside the value's length (key at 24: 8 + 20 bytes, type 4 bytes).
    let value_at = 24 + 8 + 20 + 4;
    check_err(&bytes[..value_at + 3], value_at as u64, |e| {
        matches!(e, GgufError::Truncated { .. })
    });
    // Cut inside a tensor info's dimensions.
    // (A long name, so that the cut file still passes the tensor_count check.)
    let name = "a_longer_tensor_name";
    let bytes = file_with(&[], &[raw(name, &[32, 2], 0, 0)], 256);
    let ne1_at = 24 + 8 + name.len() + 4 + 8;
    check_err(
        &bytes[..ne1_at + 5],
        ne1_at as u64,
        |e| matches!(e, GgufError::Truncated { what, .. } if *what == format!("ne[1] of tensor '{name}'")),
    );
}

#[test]
fn string_length_past_end() {
    let mut bytes = serialize_raw_header(3, &[kv("key", "value")], &[]);
    let len_at = 24 + 8 + 3 + 4;
    bytes[len_at..len_at + 8].copy_from_slice(&1000u64.to_le_bytes());
    check_err(&bytes, len_at as u64, |e| {
        matches!(
            e,
            GgufError::LengthPastEnd {
                len: 1000,
                available: 5,
                ..
            }
        )
    });
    // A key length of u64::MAX.
    let mut bytes = serialize_raw_header(3, &[kv("key", 1u8)], &[]);
    bytes[24..32].copy_from_slice(&u64::MAX.to_le_bytes());
    check_err(&bytes, 24, |e| {
        matches!(e, GgufError::LengthPastEnd { len: u64::MAX, .. })
    });
}

#[test]
fn absurd_counts_are_rejected_before_allocating() {
    let base = serialize_raw_header(3, &[kv("a", 1u8)], &[]);
    let mut bytes = base.clone();
    bytes[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
    check_err(
        &bytes,
        8,
        |e| matches!(e, GgufError::CountTooLarge { what, count: u64::MAX, .. } if what == "tensor_count"),
    );
    let mut bytes = base.clone();
    bytes[16..24].copy_from_slice(&(1u64 << 40).to_le_bytes());
    check_err(
        &bytes,
        16,
        |e| matches!(e, GgufError::CountTooLarge { what, .. } if what == "kv_count"),
    );
    // Each count alone would fit, but not both together.
    let mut bytes = serialize_raw_header(3, &[kv("a", 1u8)], &[]);
    bytes.resize(24 + 64, 0);
    bytes[8..16].copy_from_slice(&2u64.to_le_bytes());
    bytes[16..24].copy_from_slice(&4u64.to_le_bytes());
    check_err(
        &bytes,
        8,
        |e| matches!(e, GgufError::CountTooLarge { what, count: 2, available: 8, .. } if what.starts_with("tensor_count")),
    );

    // An array of 2^40 u32 in a tiny file.
    let array = MetaArray::new(MetaType::U32, vec![MetaValue::U32(7)]);
    let mut bytes = serialize_raw_header(3, &[kv("arr", array)], &[]);
    let count_at = 24 + 8 + 3 + 4 + 4;
    bytes[count_at..count_at + 8].copy_from_slice(&(1u64 << 40).to_le_bytes());
    check_err(&bytes, count_at as u64, |e| {
        matches!(e, GgufError::CountTooLarge { what, min_bytes_each: 4, available: 4, .. }
            if what == "length of value of key 'arr'")
    });
    // A string array whose count fits one byte per element but not the 8-byte length prefixes.
    let array = MetaArray::new(MetaType::String, vec![MetaValue::from("x"); 2]);
    let mut bytes = serialize_raw_header(3, &[kv("arr", array)], &[]);
    bytes[count_at..count_at + 8].copy_from_slice(&9u64.to_le_bytes());
    check_err(&bytes, count_at as u64, |e| {
        matches!(
            e,
            GgufError::CountTooLarge {
                min_bytes_each: 8,
                ..
            }
        )
    });
}

#[test]
fn unknown_value_types() {
    let mut bytes = serialize_raw_header(3, &[kv("key", 1u32)], &[]);
    let type_at = 24 + 8 + 3;
    bytes[type_at..type_at + 4].copy_from_slice(&13u32.to_le_bytes());
    check_err(&bytes, type_at as u64, |e| {
        matches!(e, GgufError::UnknownValueType { type_id: 13, .. })
    });
    // Inside an array.
    let array = MetaArray::new(MetaType::U8, vec![MetaValue::U8(1)]);
    let mut bytes = serialize_raw_header(3, &[kv("key", array)], &[]);
    let elem_type_at = type_at + 4;
    bytes[elem_type_at..elem_type_at + 4].copy_from_slice(&0xffff_ffffu32.to_le_bytes());
    let msg = check_err(&bytes, elem_type_at as u64, |e| {
        matches!(
            e,
            GgufError::UnknownValueType {
                type_id: 0xffff_ffff,
                ..
            }
        )
    });
    assert!(msg.contains("element type of value of key 'key'"), "{msg}");
}

#[test]
fn nested_arrays_read_back_and_depth_is_capped() {
    let inner = |v: &[i32]| {
        MetaValue::Array(MetaArray::new(
            MetaType::I32,
            v.iter().map(|&x| x.into()).collect(),
        ))
    };
    let nested = MetaArray::new(
        MetaType::Array,
        vec![inner(&[1, 2]), inner(&[]), inner(&[-3])],
    );
    let metadata = vec![kv("nested", nested)];
    let bytes = serialize_header(&metadata, &[]).unwrap();
    let header = GgufFile::parse_bytes(&bytes).unwrap();
    assert_eq!(header.metadata(), &metadata[..]);

    let mut deep = MetaValue::U8(1);
    for _ in 0..MAX_ARRAY_DEPTH + 1 {
        deep = MetaValue::Array(MetaArray::new(deep.meta_type(), vec![deep]));
    }
    let bytes = serialize_raw_header(3, &[kv("deep", deep.clone())], &[]);
    // The outermost array's element type sits at 24 + 8 + 4 + 4; each level adds 12 bytes.
    let too_deep_at = 24 + 8 + 4 + 4 + 12 * MAX_ARRAY_DEPTH as u64;
    check_err(&bytes, too_deep_at, |e| {
        matches!(e, GgufError::NestingTooDeep { .. })
    });
    assert!(matches!(
        serialize_header(&[kv("deep", deep)], &[]),
        Err(GgufError::InvalidInput(_))
    ));
}

#[test]
fn invalid_utf8() {
    let mut bytes = serialize_raw_header(3, &[kv("key", "valu\u{e9}")], &[]);
    let bad_at = find(&bytes, "\u{e9}".as_bytes());
    bytes[bad_at as usize] = 0xff;
    let msg = check_err(&bytes, bad_at, |e| {
        matches!(e, GgufError::InvalidUtf8 { .. })
    });
    assert!(msg.contains("value of key 'key'"), "{msg}");
    // In a key.
    let mut bytes = serialize_raw_header(3, &[kv("k\u{e9}y", 1u8)], &[]);
    bytes[24 + 8 + 1] = 0xc0;
    check_err(&bytes, 24 + 8 + 1, |e| {
        matches!(e, GgufError::InvalidUtf8 { .. })
    });
    // In a tensor name.
    let mut bytes = file_with(&[], &[raw("t\u{e9}", &[32], 0, 0)], 128);
    bytes[24 + 8 + 1] = 0x80;
    check_err(
        &bytes,
        24 + 8 + 1,
        |e| matches!(e, GgufError::InvalidUtf8 { what, .. } if what == "name of tensor #0"),
    );
}

#[test]
fn duplicated_and_empty_keys() {
    let bytes = serialize_raw_header(3, &[kv("a.b", 1u32), kv("c", 2u8), kv("a.b", 3u32)], &[]);
    let second_at = 24 + (8 + 3 + 4 + 4) + (8 + 1 + 4 + 1);
    check_err(
        &bytes,
        second_at,
        |e| matches!(e, GgufError::DuplicateKey { key, first_offset: 24, .. } if key == "a.b"),
    );
    let bytes = serialize_raw_header(3, &[kv("a", 1u32), kv("", 2u8)], &[]);
    check_err(&bytes, 24 + 8 + 1 + 4 + 4, |e| {
        matches!(e, GgufError::EmptyKey { index: 1, .. })
    });
}

#[test]
fn bad_alignments() {
    let value_at = 24 + 8 + "general.alignment".len() as u64 + 4;
    for bad in [0u32, 48, 3] {
        let bytes = serialize_raw_header(3, &[kv("general.alignment", bad)], &[]);
        check_err(
            &bytes,
            value_at,
            |e| matches!(e, GgufError::BadAlignment { alignment, .. } if *alignment == u64::from(bad)),
        );
    }
    let bytes = serialize_raw_header(3, &[kv("general.alignment", 32u64)], &[]);
    check_err(&bytes, value_at, |e| {
        matches!(
            e,
            GgufError::AlignmentType {
                found: MetaType::U64,
                ..
            }
        )
    });
    // A valid custom alignment moves the data section.
    let meta = [kv("general.alignment", 64u32)];
    let mut bytes = serialize_raw_header(3, &meta, &[raw("t", &[32], 0, 0)]);
    bytes.resize(bytes.len().next_multiple_of(64) + 128, 0);
    let header = GgufFile::parse_bytes(&bytes).unwrap();
    assert_eq!(header.alignment(), 64);
    assert_eq!(header.data_offset() % 64, 0);
}

#[test]
fn tensor_type_errors_name_the_type() {
    let type_at = 24 + 8 + 1 + 4 + 8;
    let bytes = file_with(&[], &[raw("t", &[256], 16, 0)], 256);
    let msg = check_err(&bytes, type_at, |e| {
        matches!(e, GgufError::UnsupportedTensorType { type_id: 16, .. })
    });
    assert!(msg.contains("IQ2_XXS is not supported"), "{msg}");
    let bytes = file_with(&[], &[raw("t", &[256], 99, 0)], 256);
    let msg = check_err(&bytes, type_at, |e| {
        matches!(e, GgufError::UnsupportedTensorType { type_id: 99, .. })
    });
    assert!(msg.contains("no such ggml type"), "{msg}");
}

#[test]
fn dimension_count_must_be_1_to_4() {
    for ne in [&[][..], &[1, 1, 1, 1, 1][..]] {
        let bytes = file_with(&[], &[raw("t", ne, 0, 0)], 64);
        check_err(
            &bytes,
            24 + 8 + 1,
            |e| matches!(e, GgufError::BadDimCount { n_dims, .. } if *n_dims as usize == ne.len()),
        );
    }
    // n_dims = 2^32 - 1 is rejected before any dimension is read.
    let mut bytes = file_with(&[], &[raw("t", &[1], 0, 0)], 64);
    bytes[33..37].copy_from_slice(&u32::MAX.to_le_bytes());
    check_err(&bytes, 33, |e| matches!(e, GgufError::BadDimCount { .. }));
}

#[test]
fn shape_overflow() {
    let ne_at = 24 + 8 + 1 + 4;
    let bytes = file_with(&[], &[raw("t", &[1 << 32, 1 << 32], 0, 0)], 64);
    check_err(&bytes, ne_at, |e| {
        matches!(e, GgufError::ShapeOverflow { .. })
    });
    let bytes = file_with(&[], &[raw("t", &[u64::MAX], 0, 0)], 64);
    check_err(&bytes, ne_at, |e| {
        matches!(e, GgufError::ShapeOverflow { .. })
    });
    // Fits i64 in elements, but not in bytes (F32: 4 bytes each).
    let bytes = file_with(&[], &[raw("t", &[1 << 62], 0, 0)], 64);
    check_err(
        &bytes,
        ne_at,
        |e| matches!(e, GgufError::ShapeOverflow { reason, .. } if reason.contains("bytes")),
    );
}

#[test]
fn rows_must_be_whole_blocks() {
    let bytes = file_with(&[], &[raw("t", &[100, 2], GgmlType::Q4_K.id(), 0)], 1024);
    let msg = check_err(&bytes, 24 + 8 + 1 + 4, |e| {
        matches!(
            e,
            GgufError::RowNotBlockMultiple {
                ne0: 100,
                block_elems: 256,
                ..
            }
        )
    });
    assert!(msg.contains("Q4_K"), "{msg}");
}

#[test]
fn tensor_data_must_be_inside_the_file() {
    // F32 [64] = 256 bytes, with only 255 present.
    let bytes = file_with(&[], &[raw("t", &[64], 0, 0)], 255);
    let data_offset = (24 + 8 + 1 + 4 + 8 + 4 + 8u64).next_multiple_of(32);
    let msg = check_err(
        &bytes,
        data_offset,
        |e| matches!(e, GgufError::TensorDataPastEnd { end, .. } if *end == data_offset + 256),
    );
    assert!(msg.contains("past the end"), "{msg}");
    // An offset near u64::MAX does not overflow.
    let bytes = file_with(&[], &[raw("t", &[64], 0, u64::MAX - 31)], 256);
    assert!(matches!(
        GgufFile::parse_bytes(&bytes),
        Err(GgufError::TensorDataPastEnd { .. })
    ));
    // The padding between header and data is missing.
    let bytes = serialize_raw_header(3, &[], &[raw("t", &[0], 0, 0)]);
    check_err(&bytes, bytes.len() as u64, |e| {
        matches!(e, GgufError::Truncated { .. })
    });
}

#[test]
fn misaligned_tensor_offsets() {
    let bytes = file_with(&[], &[raw("t", &[8], 0, 16)], 64);
    let offset_field_at = 24 + 8 + 1 + 4 + 8 + 4;
    check_err(&bytes, offset_field_at, |e| {
        matches!(
            e,
            GgufError::MisalignedTensor {
                data_offset: 16,
                alignment: 32,
                ..
            }
        )
    });
}

#[test]
fn overlapping_tensors() {
    // a: F32 [16] = 64 bytes at 0; b at 32 overlaps it.
    let bytes = file_with(&[], &[raw("a", &[16], 0, 0), raw("b", &[8], 0, 32)], 128);
    let data_offset = 96; // header of 24 + 2 * 33 = 90, padded to 96
    check_err(
        &bytes,
        data_offset,
        |e| matches!(e, GgufError::OverlappingTensors { first, second, .. } if first == "a" && second == "b"),
    );
    // Listed out of order, still caught; a gap and zero-size tensors are fine.
    let bytes = file_with(&[], &[raw("b", &[8], 0, 32), raw("a", &[16], 0, 0)], 128);
    assert!(matches!(
        GgufFile::parse_bytes(&bytes),
        Err(GgufError::OverlappingTensors { .. })
    ));
    let bytes = file_with(
        &[],
        &[
            raw("a", &[8], 0, 64),
            raw("e", &[0], 0, 64),
            raw("b", &[8], 0, 0),
        ],
        128,
    );
    GgufFile::parse_bytes(&bytes).unwrap();
}

#[test]
fn duplicated_tensor_names() {
    let bytes = file_with(&[], &[raw("w", &[8], 0, 0), raw("w", &[8], 0, 32)], 64);
    check_err(
        &bytes,
        24 + 33,
        |e| matches!(e, GgufError::DuplicateTensor { name, first_offset: 24, .. } if name == "w"),
    );
}

#[test]
fn long_tensor_names() {
    let name = "x".repeat(MAX_TENSOR_NAME_LEN + 1);
    let bytes = file_with(&[], &[raw(&name, &[8], 0, 0)], 64);
    check_err(&bytes, 24, |e| {
        matches!(e, GgufError::TensorNameTooLong { len: 64, .. })
    });
    let name = "x".repeat(MAX_TENSOR_NAME_LEN);
    GgufFile::parse_bytes(&file_with(&[], &[raw(&name, &[8], 0, 0)], 64)).unwrap();
}

#[test]
fn every_prefix_of_a_header_is_an_error() {
    for rel in ["qwen3moe/model-q4_k_m.gguf", "deepseek2/model-q2_k.gguf"] {
        let bytes = std::fs::read(fixture(rel)).unwrap();
        let data_offset = GgufFile::parse_bytes(&bytes).unwrap().data_offset() as usize;
        for len in 0..=data_offset {
            assert!(
                GgufFile::parse_bytes(&bytes[..len]).is_err(),
                "{rel}: prefix {len}"
            );
        }
        // Cut inside the tensor data: the last tensor no longer fits.
        for len in (data_offset..bytes.len()).step_by(4099) {
            assert!(matches!(
                GgufFile::parse_bytes(&bytes[..len]),
                Err(GgufError::TensorDataPastEnd { .. })
            ));
        }
    }
    // Vocab files are all header: every prefix near the start and the end, and a stride between.
    let bytes = std::fs::read(fixture("tokenizers/ggml-vocab-gpt-2.gguf")).unwrap();
    let n = bytes.len();
    let cuts = (0..4096)
        .chain((4096..n - 256).step_by(7919))
        .chain(n - 256..n);
    for len in cuts {
        assert!(
            GgufFile::parse_bytes(&bytes[..len]).is_err(),
            "prefix {len}"
        );
    }
    GgufFile::parse_bytes(&bytes).unwrap();
}

#[test]
fn errors_from_open_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.gguf");
    std::fs::write(&path, b"GGUF\x01\0\0\0").unwrap();
    let err = GgufFile::open(&path).unwrap_err();
    assert!(matches!(
        err.innermost(),
        GgufError::UnsupportedVersion { version: 1, .. }
    ));
    assert!(err.to_string().contains("bad.gguf"), "{err}");
    let err = GgufFile::open(dir.path().join("absent.gguf")).unwrap_err();
    assert!(matches!(err, GgufError::Io { op: "open", .. }), "{err:?}");
}

// ---------------------------------------------------------------- values

#[test]
fn numeric_accessors_convert_only_when_lossless() {
    assert_eq!(MetaValue::U64(7).as_u32(), Some(7));
    assert_eq!(MetaValue::U64(1 << 32).as_u32(), None);
    assert_eq!(MetaValue::I32(-1).as_u32(), None);
    assert_eq!(MetaValue::I32(-1).as_i64(), Some(-1));
    assert_eq!(MetaValue::U64(u64::MAX).as_i64(), None);
    assert_eq!(MetaValue::U8(200).as_u64(), Some(200));
    assert_eq!(MetaValue::F32(1.5).as_u32(), None);
    assert_eq!(MetaValue::Bool(true).as_u32(), None);
    assert_eq!(MetaValue::F64(0.25).as_f32(), Some(0.25));
    assert_eq!(MetaValue::I32(-3).as_f32(), Some(-3.0));
    assert_eq!(MetaValue::U32((1 << 24) + 1).as_f32(), None);
    assert_eq!(MetaValue::Bool(true).as_bool(), Some(true));
    assert_eq!(MetaValue::U8(1).as_bool(), None);
    assert_eq!(MetaValue::from("x").as_str(), Some("x"));
    assert_eq!(MetaValue::U8(1).as_str(), None);

    let ints = MetaArray::new(MetaType::I32, vec![1i32.into(), (-2i32).into()]);
    assert_eq!(ints.as_i32_vec(), Some(vec![1, -2]));
    assert_eq!(ints.as_f32_vec(), Some(vec![1.0, -2.0]));
    assert_eq!(ints.as_u32_vec(), None);
    assert_eq!(ints.as_str_vec(), None);
    assert_eq!(ints.len(), 2);
    let big = MetaArray::new(MetaType::U64, vec![MetaValue::U64(1 << 40)]);
    assert_eq!(big.as_i32_vec(), None);
    assert!(MetaValue::Array(big).as_array().is_some());
}

// ---------------------------------------------------------------- writer

fn small_model() -> (Vec<(String, MetaValue)>, Vec<TensorDesc>) {
    let metadata = vec![
        kv("general.architecture", "test"),
        kv("test.block_count", 1u32),
        kv(
            "tokenizer.ggml.tokens",
            MetaArray::new(MetaType::String, vec!["a".into(), "b".into()]),
        ),
    ];
    let tensors = vec![
        TensorDesc::new("a", GgmlType::F32, vec![3]),
        TensorDesc::new("b", GgmlType::Q8_0, vec![64, 2]),
        TensorDesc::new("c", GgmlType::F16, vec![5]),
    ];
    (metadata, tensors)
}

#[test]
fn writer_lays_out_and_reads_back() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.gguf");
    let (metadata, tensors) = small_model();
    let mut w = GgufWriter::create(&path, metadata.clone(), tensors.clone()).unwrap();
    let lens: Vec<u64> = w.tensors().iter().map(|t| t.byte_len).collect();
    assert_eq!(lens, [12, 136, 10]);
    let offsets: Vec<u64> = w.tensors().iter().map(|t| t.offset).collect();
    assert_eq!(offsets, [0, 32, 192]);
    let datas: Vec<Vec<u8>> = lens
        .iter()
        .map(|&n| (0..n).map(|i| (i * 7 + n) as u8).collect())
        .collect();
    for d in &datas {
        w.write_tensor_data(d).unwrap();
    }
    assert!(matches!(
        w.write_tensor_data(&[]),
        Err(GgufError::WriterState(_))
    ));
    assert!(!path.exists(), "nothing under the final name before finish");
    w.finish().unwrap();
    assert!(!dir.path().join("m.gguf.tmp").exists());

    let file = GgufFile::open(&path).unwrap();
    assert_eq!(file.metadata(), &metadata[..]);
    let header = serialize_header(&metadata, &tensors).unwrap();
    assert_eq!(file.header_bytes(0), &header[..]);
    for (t, d) in file.tensors().iter().zip(&datas) {
        assert_eq!(file.tensor_data(t), &d[..]);
    }
    let len = std::fs::metadata(&path).unwrap().len();
    assert_eq!(
        len,
        file.data_offset() + 192 + 32,
        "the last tensor is padded too"
    );
}

#[test]
fn writer_checks_lengths_and_cleans_up() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.gguf");
    let tmp = dir.path().join("m.gguf.tmp");
    let (metadata, tensors) = small_model();

    let mut w = GgufWriter::create(&path, metadata.clone(), tensors.clone()).unwrap();
    assert!(tmp.exists());
    let err = w.write_tensor_data(&[0; 11]).unwrap_err();
    assert!(
        matches!(&err, GgufError::TensorDataLength { name, expected: 12, got: 11 } if name == "a"),
        "{err:?}"
    );
    w.write_tensor_data(&[0; 12]).unwrap();
    let err = w.finish().unwrap_err();
    assert!(matches!(err, GgufError::WriterState(_)), "{err:?}");
    assert!(
        !tmp.exists() && !path.exists(),
        "a failed finish leaves nothing"
    );

    let mut w = GgufWriter::create(&path, metadata, tensors).unwrap();
    w.skip_tensor_data().unwrap();
    drop(w);
    assert!(
        !tmp.exists() && !path.exists(),
        "a dropped writer leaves nothing"
    );
}

#[test]
fn writer_takes_tensors_in_parts() {
    let dir = tempfile::tempdir().unwrap();
    let (metadata, tensors) = small_model();
    let whole = dir.path().join("whole.gguf");
    let parts = dir.path().join("parts.gguf");
    let datas: Vec<Vec<u8>> = [12u64, 136, 10]
        .iter()
        .map(|&n| (0..n).map(|i| (i * 5 + n) as u8).collect())
        .collect();
    let mut w = GgufWriter::create(&whole, metadata.clone(), tensors.clone()).unwrap();
    for d in &datas {
        w.write_tensor_data(d).unwrap();
    }
    w.finish().unwrap();

    let mut w = GgufWriter::create(&parts, metadata, tensors).unwrap();
    w.write_tensor_part(&datas[0]).unwrap();
    w.write_tensor_part(&datas[1][..100]).unwrap();
    assert!(
        matches!(
            w.write_tensor_data(&datas[1]),
            Err(GgufError::WriterState(_))
        ),
        "a whole write in the middle of a tensor"
    );
    let err = w.write_tensor_part(&[0; 37]).unwrap_err();
    assert!(
        matches!(
            &err,
            GgufError::TensorDataLength {
                expected: 136,
                got: 137,
                ..
            }
        ),
        "{err:?}"
    );
    w.write_tensor_part(&datas[1][100..]).unwrap();
    w.write_tensor_part(&[]).unwrap();
    w.write_tensor_part(&datas[2][..3]).unwrap();
    w.write_tensor_part(&datas[2][3..]).unwrap();
    w.finish().unwrap();
    assert_eq!(
        std::fs::read(&whole).unwrap(),
        std::fs::read(&parts).unwrap()
    );
}

#[test]
fn writer_rejects_what_it_cannot_write() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.gguf");
    let invalid = |metadata: Vec<(String, MetaValue)>, tensors: Vec<TensorDesc>| {
        let err = GgufWriter::create(&path, metadata, tensors).unwrap_err();
        assert!(matches!(err, GgufError::InvalidInput(_)), "{err:?}");
        assert!(!path.exists() && !dir.path().join("m.gguf.tmp").exists());
    };
    let f32_t = |name: &str| TensorDesc::new(name, GgmlType::F32, vec![4]);
    invalid(vec![kv("a", 1u8), kv("a", 2u8)], vec![]);
    invalid(vec![kv("", 1u8)], vec![]);
    invalid(vec![kv("general.alignment", 24u32)], vec![]);
    invalid(vec![kv("general.alignment", 32u64)], vec![]);
    invalid(
        vec![kv(
            "mixed",
            MetaArray::new(MetaType::U8, vec![MetaValue::U8(1), MetaValue::I8(1)]),
        )],
        vec![],
    );
    invalid(vec![], vec![f32_t("t"), f32_t("t")]);
    invalid(vec![], vec![TensorDesc::new("q", GgmlType::Q4_0, vec![33])]);
    invalid(vec![], vec![TensorDesc::new("q", GgmlType::F32, vec![])]);
    invalid(
        vec![],
        vec![TensorDesc::new("q", GgmlType::F32, vec![1; 5])],
    );
    invalid(
        vec![],
        vec![TensorDesc::new("q", GgmlType::F32, vec![u64::MAX, 2])],
    );
    invalid(vec![], vec![f32_t(&"n".repeat(64))]);
}

#[test]
fn custom_alignment_is_used_for_offsets() {
    let metadata = vec![kv("general.alignment", 128u32)];
    let tensors = vec![
        TensorDesc::new("a", GgmlType::F32, vec![1]),
        TensorDesc::new("b", GgmlType::F32, vec![1]),
    ];
    let header = serialize_header(&metadata, &tensors).unwrap();
    assert_eq!(header.len() % 128, 0);
    let mut bytes = header.clone();
    bytes.resize(header.len() + 128 + 4, 0);
    let parsed = GgufFile::parse_bytes(&bytes).unwrap();
    assert_eq!(parsed.tensor("b").unwrap().offset, 128);
    assert_eq!(parsed.data_offset(), header.len() as u64);
}

/// A 400 GB model made of holes: written in milliseconds, opened in milliseconds.
#[test]
fn sparse_400_gb_file_opens_quickly() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("huge.gguf");
    // 104 expert tensors of 3.99 GB each (Q8_0 [7168, 2048, 256]).
    let tensors: Vec<TensorDesc> = (0..104)
        .map(|i| {
            TensorDesc::new(
                format!("blk.{i}.ffn_up_exps.weight"),
                GgmlType::Q8_0,
                vec![7168, 2048, 256],
            )
        })
        .collect();
    let metadata = vec![kv("general.architecture", "deepseek2")];
    let mut w = GgufWriter::create(&path, metadata, tensors).unwrap();
    let total: u64 = w.tensors().iter().map(|t| t.byte_len).sum();
    assert!(total > 400_000_000_000, "{total}");
    for _ in 0..103 {
        w.skip_tensor_data().unwrap();
    }
    let last_len = w.next_tensor().unwrap().byte_len;
    // Writing real data after holes also works; keep it small by skipping it too.
    assert_eq!(last_len, 7168 / 32 * 34 * 2048 * 256);
    w.skip_tensor_data().unwrap();
    w.finish().unwrap();

    let started = Instant::now();
    let file = GgufFile::open(&path).unwrap();
    let elapsed = started.elapsed();
    eprintln!("opened a {total}-byte sparse gguf in {elapsed:?}");
    assert!(elapsed.as_millis() < 500, "opening took {elapsed:?}");
    assert_eq!(file.part_bytes(0).len() as u64, file.data_offset() + total);
    let last = file.tensors().last().unwrap();
    let data = file.tensor_data(last);
    assert_eq!(data.len() as u64, last_len);
    assert_eq!(data[data.len() - 1], 0, "holes read as zeros");

    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        let on_disk = std::fs::metadata(&path).unwrap().blocks() * 512;
        assert!(on_disk < 1 << 20, "the file takes {on_disk} bytes on disk");
    }
}

#[test]
fn vocabulary_of_150k_strings_parses_fast() {
    let n = 150_000;
    let tokens: Vec<MetaValue> = (0..n)
        .map(|i| MetaValue::String(format!("tok{i}\u{0120}x")))
        .collect();
    let scores: Vec<MetaValue> = (0..n).map(|i| MetaValue::F32(i as f32)).collect();
    let types: Vec<MetaValue> = (0..n).map(|_| MetaValue::I32(1)).collect();
    let metadata = vec![
        kv(
            "tokenizer.ggml.tokens",
            MetaArray::new(MetaType::String, tokens),
        ),
        kv(
            "tokenizer.ggml.scores",
            MetaArray::new(MetaType::F32, scores),
        ),
        kv(
            "tokenizer.ggml.token_type",
            MetaArray::new(MetaType::I32, types),
        ),
    ];
    let bytes = serialize_header(&metadata, &[]).unwrap();
    let started = Instant::now();
    let header = GgufFile::parse_bytes(&bytes).unwrap();
    let elapsed = started.elapsed();
    eprintln!("parsed {n} tokens ({} bytes) in {elapsed:?}", bytes.len());
    assert!(elapsed.as_millis() < 1000, "parsing took {elapsed:?}");
    let tokens = header
        .get("tokenizer.ggml.tokens")
        .unwrap()
        .as_array()
        .unwrap();
    assert_eq!(tokens.as_str_vec().unwrap()[149_999], "tok149999\u{0120}x");
}

// ---------------------------------------------------------------- split models

/// Splits `src` into parts of `sizes` tensors each, as gguf-split writes them:
/// the first part has all metadata then the split keys, the others only the split keys.
fn write_split(src: &GgufFile, dir: &Path, prefix: &str, sizes: &[usize]) -> Vec<PathBuf> {
    let count = sizes.len() as u16;
    let n_tensors = src.tensors().len() as i32;
    let mut paths = Vec::new();
    let mut tensors = src.tensors().iter();
    for (i, &size) in sizes.iter().enumerate() {
        let mut metadata = if i == 0 {
            src.metadata().to_vec()
        } else {
            Vec::new()
        };
        metadata.push(kv(KEY_SPLIT_NO, i as u16));
        metadata.push(kv(KEY_SPLIT_COUNT, count));
        metadata.push(kv(KEY_SPLIT_TENSORS_COUNT, n_tensors));
        let part: Vec<&TensorInfo> = tensors.by_ref().take(size).collect();
        let path = dir.join(format!("{prefix}-{:05}-of-{:05}.gguf", i + 1, count));
        let descs = part.iter().map(|&t| TensorDesc::from(t)).collect();
        let mut w = GgufWriter::create(&path, metadata, descs).unwrap();
        for t in part {
            w.write_tensor_data(src.tensor_data(t)).unwrap();
        }
        w.finish().unwrap();
        paths.push(path);
    }
    assert!(tensors.next().is_none(), "sizes cover every tensor");
    paths
}

#[test]
fn split_model_opens_as_one() {
    let src = GgufFile::open(fixture("mixtral/model-q8_0.gguf")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let n = src.tensors().len();
    let paths = write_split(&src, dir.path(), "mixtral", &[5, n - 15, 10]);

    let file = GgufFile::open(&paths[0]).unwrap();
    assert_eq!(file.n_parts(), 3);
    assert_eq!(file.tensors().len(), n);
    assert_eq!(file.architecture(), src.architecture());
    assert_eq!(&file.metadata()[..src.metadata().len()], src.metadata());
    assert_eq!(
        file.get(KEY_SPLIT_COUNT).and_then(MetaValue::as_u32),
        Some(3)
    );
    for (i, (t, orig)) in file.tensors().iter().zip(src.tensors()).enumerate() {
        assert_eq!(t.name, orig.name);
        assert_eq!(
            (t.ty, &t.ne, t.byte_len),
            (orig.ty, &orig.ne, orig.byte_len)
        );
        let expect_part = if i < 5 {
            0
        } else if i < n - 10 {
            1
        } else {
            2
        };
        assert_eq!(t.part, expect_part, "{}", t.name);
        assert_eq!(file.tensor_data(t), src.tensor_data(orig), "{}", t.name);
        assert_eq!(file.tensor(&t.name), Some(t));
    }
    assert_eq!(file.part_path(2), paths[2]);

    // A later part on its own: refused by `open`, readable with `open_single`.
    let err = GgufFile::open(&paths[1]).unwrap_err();
    assert!(matches!(err, GgufError::SplitMismatch { .. }), "{err:?}");
    assert!(err.to_string().contains("not the first part"), "{err}");
    let single = GgufFile::open_single(&paths[1]).unwrap();
    assert_eq!(single.tensors().len(), n - 15);
    assert_eq!(single.tensors()[0].part, 0);
}

#[test]
fn split_model_inconsistencies() {
    let src = GgufFile::open(fixture("qwen3moe/model-q2_k.gguf")).unwrap();
    let n = src.tensors().len();

    // A missing part.
    let dir = tempfile::tempdir().unwrap();
    let paths = write_split(&src, dir.path(), "m", &[10, 10, n - 20]);
    std::fs::remove_file(&paths[2]).unwrap();
    let err = GgufFile::open(&paths[0]).unwrap_err();
    assert!(
        matches!(
            err,
            GgufError::SplitMissingPart {
                part_no: 3,
                count: 3,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("m-00003-of-00003.gguf"), "{err}");

    // split.count disagreeing between parts.
    let dir = tempfile::tempdir().unwrap();
    let paths = write_split(&src, dir.path(), "m", &[10, n - 10]);
    let w = GgufWriter::create(
        &paths[1],
        vec![
            kv(KEY_SPLIT_NO, 1u16),
            kv(KEY_SPLIT_COUNT, 3u16),
            kv(KEY_SPLIT_TENSORS_COUNT, n as i32),
        ],
        vec![],
    )
    .unwrap();
    w.finish().unwrap();
    let err = GgufFile::open(&paths[0]).unwrap_err();
    assert!(matches!(err, GgufError::SplitMismatch { .. }), "{err:?}");
    assert!(
        err.to_string().contains("split.count is 3 here but 2"),
        "{err}"
    );

    // split.tensors.count disagreeing with the tensors found.
    let dir = tempfile::tempdir().unwrap();
    let paths = write_split(&src, dir.path(), "m", &[10, n - 10]);
    let part0 = GgufFile::open_single(&paths[0]).unwrap();
    let mut metadata = part0.metadata().to_vec();
    metadata.last_mut().unwrap().1 = MetaValue::I32(n as i32 + 1);
    rewrite(&part0, &paths[0], metadata);
    let err = GgufFile::open(&paths[0]).unwrap_err();
    assert!(err.to_string().contains("split.tensors.count"), "{err}");

    // The same tensor in two parts.
    let dir = tempfile::tempdir().unwrap();
    let paths = write_split(&src, dir.path(), "m", &[10, n - 10]);
    let part1 = GgufFile::open_single(&paths[1]).unwrap();
    let first = &src.tensors()[0];
    let mut descs: Vec<TensorDesc> = part1.tensors().iter().map(TensorDesc::from).collect();
    descs.push(TensorDesc::from(first));
    let mut w = GgufWriter::create(&paths[1], part1.metadata().to_vec(), descs).unwrap();
    for t in part1.tensors() {
        w.write_tensor_data(part1.tensor_data(t)).unwrap();
    }
    w.write_tensor_data(src.tensor_data(first)).unwrap();
    w.finish().unwrap();
    let err = GgufFile::open(&paths[0]).unwrap_err();
    assert!(
        matches!(
            err.innermost(),
            GgufError::DuplicateTensor {
                part: 1,
                first_part: 0,
                ..
            }
        ),
        "{err:?}"
    );

    // A part named as one, but the metadata of an unsplit file with split.count = 4.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("x-00001-of-00002.gguf");
    let w = GgufWriter::create(&path, vec![kv(KEY_SPLIT_COUNT, 4u16)], vec![]).unwrap();
    w.finish().unwrap();
    let err = GgufFile::open(&path).unwrap_err();
    assert!(err.to_string().contains("file name says 2 parts"), "{err}");
    // split.count > 1 in a file whose name does not say where the other parts are.
    let path = dir.path().join("plain.gguf");
    let w = GgufWriter::create(&path, vec![kv(KEY_SPLIT_COUNT, 2u16)], vec![]).unwrap();
    w.finish().unwrap();
    let err = GgufFile::open(&path).unwrap_err();
    assert!(matches!(err, GgufError::SplitMismatch { .. }), "{err:?}");
    // split.count = 0 marks a merged file: read as one file.
    let w = GgufWriter::create(&path, vec![kv(KEY_SPLIT_COUNT, 0u16)], vec![]).unwrap();
    w.finish().unwrap();
    assert_eq!(GgufFile::open(&path).unwrap().n_parts(), 1);
}

/// Rewrites the file `file` (opened from `path`) with new metadata, same tensors.
fn rewrite(file: &GgufFile, path: &Path, metadata: Vec<(String, MetaValue)>) {
    let descs: Vec<TensorDesc> = file.tensors().iter().map(TensorDesc::from).collect();
    let datas: Vec<Vec<u8>> = file
        .tensors()
        .iter()
        .map(|t| file.tensor_data(t).to_vec())
        .collect();
    let mut w = GgufWriter::create(path, metadata, descs).unwrap();
    for d in &datas {
        w.write_tensor_data(d).unwrap();
    }
    w.finish().unwrap();
}

// ---------------------------------------------------------------- fuzz

/// Replays every input the fuzzer ever crashed on (`test_data/fuzz-failures/`).
#[test]
fn replay_fuzz_failures() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("test_data/fuzz-failures");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        crate::fuzz::check_gguf(&std::fs::read(&path).unwrap());
        n += 1;
    }
    assert!(n > 0, "{} holds at least its README", dir.display());
}

/// Hostile inputs that once were (or could be) dangerous run through the fuzz entry.
#[test]
fn check_gguf_survives_hostile_inputs() {
    crate::fuzz::check_gguf(&[]);
    crate::fuzz::check_gguf(b"GGUF");
    let mut bytes = serialize_raw_header(
        3,
        &[kv("general.alignment", 1u32 << 31)],
        &[raw("t", &[0], 0, 0)],
    );
    crate::fuzz::check_gguf(&bytes);
    bytes.truncate(30);
    crate::fuzz::check_gguf(&bytes);
    let many_empty = MetaArray::new(
        MetaType::Array,
        vec![MetaValue::Array(MetaArray::new(MetaType::U8, vec![])); 1000],
    );
    crate::fuzz::check_gguf(&serialize_raw_header(3, &[kv("a", many_empty)], &[]));
}

/// Writes the fuzz seed corpus: each fixture shrunk to a few KB (arrays cut
/// to 3 elements, 4 tensors of one block each, real data bytes), and files
/// with every value type, nested arrays and a custom alignment. Run by the
/// command in `shared/fuzz/README.md`:
/// `MOESHARD_FUZZ_SEEDS=shared/fuzz/corpus/gguf_reader cargo test -p shared --lib write_fuzz_seeds -- --ignored`.
#[test]
#[ignore = "writes files; run by hand to make the fuzz corpus"]
fn write_fuzz_seeds() {
    let Some(out) = std::env::var_os("MOESHARD_FUZZ_SEEDS") else {
        panic!("set MOESHARD_FUZZ_SEEDS to the corpus folder");
    };
    // A relative path is taken from the repository root (tests run in `shared/`).
    let out = repo_root().join(out);
    std::fs::create_dir_all(&out).unwrap();
    let write =
        |name: &str, metadata: Vec<(String, MetaValue)>, tensors: Vec<(TensorDesc, Vec<u8>)>| {
            let descs: Vec<TensorDesc> = tensors.iter().map(|(d, _)| d.clone()).collect();
            let mut bytes = serialize_header(&metadata, &descs).unwrap();
            let alignment = GgufFile::parse_bytes(&{
                let mut b = bytes.clone();
                for d in &descs {
                    b.resize(
                        b.len() + d.byte_len().unwrap().next_multiple_of(128) as usize,
                        0,
                    );
                }
                b
            })
            .unwrap()
            .alignment() as usize;
            for (_, data) in &tensors {
                bytes.extend_from_slice(data);
                bytes.resize(bytes.len().next_multiple_of(alignment), 0);
            }
            crate::fuzz::check_gguf(&bytes);
            std::fs::write(out.join(name), &bytes).unwrap();
        };
    for path in fixture_ggufs() {
        let file = GgufFile::open(&path).unwrap();
        let metadata = file
            .metadata()
            .iter()
            .map(|(k, v)| match v {
                MetaValue::Array(a) => {
                    let values = a.values.iter().take(3).cloned().collect();
                    (
                        k.clone(),
                        MetaValue::Array(MetaArray::new(a.elem_type, values)),
                    )
                }
                _ => (k.clone(), v.clone()),
            })
            .collect();
        let mut seen_types = Vec::new();
        let tensors = file
            .tensors()
            .iter()
            .filter(|t| {
                let new = !seen_types.contains(&t.ty);
                seen_types.push(t.ty);
                new
            })
            .map(|t| {
                let mut ne = vec![1; t.n_dims()];
                ne[0] = t.ty.block_elems() as u64;
                let desc = TensorDesc::new(t.name.clone(), t.ty, ne);
                let len = desc.byte_len().unwrap() as usize;
                (desc, file.tensor_data(t)[..len].to_vec())
            })
            .collect();
        let rel = path
            .strip_prefix(repo_root().join("tests/fixtures"))
            .unwrap();
        let name = rel.to_str().unwrap().replace('/', "-");
        write(&name, metadata, tensors);
    }
    let every_type = vec![
        kv("u8", 1u8),
        kv("i8", -1i8),
        kv("u16", 2u16),
        kv("i16", -2i16),
        kv("u32", 3u32),
        kv("i32", -3i32),
        kv("f32", 0.5f32),
        kv("bool", true),
        kv("string", "s\u{e9}"),
        kv("u64", 4u64),
        kv("i64", -4i64),
        kv("f64", 0.25f64),
        kv(
            "array",
            MetaArray::new(MetaType::U16, vec![1u16.into(), 2u16.into()]),
        ),
        kv(
            "nested",
            MetaArray::new(
                MetaType::Array,
                vec![MetaArray::new(MetaType::String, vec!["a".into()]).into()],
            ),
        ),
    ];
    write("every-value-type.gguf", every_type, vec![]);
    // ggml's types (moeshard's own Q4_K_R8 is not one).
    let tensors = GgmlType::ALL
        .iter()
        .filter(|&&ty| ty != GgmlType::Q4_K_R8)
        .map(|&ty| {
            let desc = TensorDesc::new(format!("t.{ty}"), ty, vec![ty.block_elems() as u64, 2]);
            let len = desc.byte_len().unwrap() as usize;
            (desc, (0..len).map(|i| i as u8).collect())
        })
        .collect();
    write(
        "every-tensor-type-align-64.gguf",
        vec![kv("general.alignment", 64u32)],
        tensors,
    );
}
