//! Dequantization against gguf-py, bit for bit: `tests/fixtures/dequant.safetensors` holds one
//! tensor of each quant type of the fixture models dequantized by gguf-py's numpy reference,
//! and the real SmolLM2 model (when present) checks Q4_1 against hashes of gguf-py's output.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use super::dequantize_row;
use crate::gguf::GgufFile;
use crate::quant::GgmlType;

fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

fn dequantize_tensor(file: &GgufFile, name: &str) -> (GgmlType, Vec<f32>) {
    let info = file
        .tensor(name)
        .unwrap_or_else(|| panic!("tensor {name} missing"));
    let data = file.tensor_data(info);
    let mut out = vec![0.0f32; info.n_elements() as usize];
    // One call per row, as the engine dequantizes.
    let row_len = info.row_len() as usize;
    let row_bytes = info.row_bytes() as usize;
    for (src, dst) in data.chunks(row_bytes).zip(out.chunks_mut(row_len)) {
        dequantize_row(info.ty, src, dst);
    }
    (info.ty, out)
}

#[test]
fn dequantize_matches_gguf_py_fixture() {
    let dir = fixtures_dir();
    let st_bytes = std::fs::read(dir.join("dequant.safetensors")).expect("dequant.safetensors");
    let (_, metadata) =
        safetensors::SafeTensors::read_metadata(&st_bytes).expect("safetensors header");
    let index_json = metadata
        .metadata()
        .as_ref()
        .and_then(|m| m.get("index"))
        .expect("__metadata__.index");
    let index: HashMap<String, serde_json::Value> =
        serde_json::from_str(index_json).expect("index is a JSON object");
    let tensors = safetensors::SafeTensors::deserialize(&st_bytes).expect("safetensors");

    let mut files: HashMap<String, GgufFile> = HashMap::new();
    let mut checked = Vec::new();
    for (type_name, entry) in &index {
        let want_ty = GgmlType::from_name(type_name).expect("index key is a ggml type name");
        let file_name = entry["file"].as_str().expect("file");
        let tensor_name = entry["tensor"].as_str().expect("tensor");
        let file = files.entry(file_name.to_string()).or_insert_with(|| {
            GgufFile::open(dir.join(file_name)).unwrap_or_else(|e| panic!("{file_name}: {e}"))
        });
        let (ty, got) = dequantize_tensor(file, tensor_name);
        assert_eq!(ty, want_ty, "{file_name} {tensor_name}");

        let view = tensors.tensor(type_name).expect("expected tensor");
        assert_eq!(view.dtype(), safetensors::Dtype::F32);
        let want: Vec<u32> = view
            .data()
            .chunks_exact(4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        assert_eq!(got.len(), want.len(), "{type_name}: element count");
        let mismatches = got
            .iter()
            .zip(&want)
            .filter(|(g, w)| g.to_bits() != **w)
            .count();
        if let Some(i) = got.iter().zip(&want).position(|(g, w)| g.to_bits() != *w) {
            panic!(
                "{type_name} ({file_name} {tensor_name}): {mismatches} of {} elements differ, \
                 first at {i}: {} vs gguf-py {}",
                want.len(),
                got[i],
                f32::from_bits(want[i])
            );
        }
        checked.push(want_ty);
    }
    checked.sort();
    // Every type the fixture files hold, so a shrunken index cannot pass silently.
    let expected = [
        GgmlType::F16,
        GgmlType::Q4_0,
        GgmlType::Q5_0,
        GgmlType::Q8_0,
        GgmlType::Q2_K,
        GgmlType::Q3_K,
        GgmlType::Q4_K,
        GgmlType::Q5_K,
        GgmlType::Q6_K,
    ];
    assert_eq!(checked, expected);
}

/// FNV-1a over the little-endian bytes of the values.
fn fnv1a(values: &[f32]) -> u64 {
    let mut hash = 0xcbf2_9ce4_8422_2325u64;
    for byte in values.iter().flat_map(|v| v.to_le_bytes()) {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

/// Q4_1 is in no fixture file; the real SmolLM2 model uses it. The hashes are of gguf-py's
/// `dequantize` output for these tensors (gguf 0.19, numpy), computed when this test was
/// written.
#[test]
fn dequantize_q4_1_matches_gguf_py_on_smollm2() {
    let path = std::env::var_os("MOESHARD_SMOLLM2")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/SmolLM2-135M-Instruct.Q4_1.gguf")
        });
    if !path.exists() {
        eprintln!("skipping: SmolLM2 model not found at {}", path.display());
        return;
    }
    let file = GgufFile::open(&path).expect("SmolLM2 GGUF");
    let cases = [
        ("blk.0.ffn_gate.weight", 884_736, 0x7ff3_b747_ab62_35e7u64),
        ("blk.29.attn_v.weight", 110_592, 0x0953_151e_abb8_1d10),
    ];
    for (name, n_elements, want_hash) in cases {
        let (ty, values) = dequantize_tensor(&file, name);
        assert_eq!(ty, GgmlType::Q4_1, "{name}");
        assert_eq!(values.len(), n_elements, "{name}");
        assert_eq!(
            fnv1a(&values),
            want_hash,
            "{name}: dequantized bits differ from gguf-py"
        );
    }
}
