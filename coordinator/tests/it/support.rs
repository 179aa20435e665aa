//! Shared test helpers: fixture paths, safetensors and JSON readers, comparisons.

use std::path::PathBuf;

/// The committed fixtures (`tests/fixtures` at the workspace root).
pub(crate) fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

/// The real SmolLM2 model, if present (`MOESHARD_SMOLLM2` or `models/`).
pub(crate) fn smollm2_model() -> Option<PathBuf> {
    let p = std::env::var_os("MOESHARD_SMOLLM2")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("../models/SmolLM2-135M-Instruct.Q4_1.gguf")
        });
    if p.exists() {
        Some(p)
    } else {
        eprintln!(
            "note: SmolLM2 model not found at {} (run scripts/fetch-model); skipping",
            p.display()
        );
        None
    }
}

/// Reads an f32 tensor from a safetensors file: (shape, values).
pub(crate) fn read_tensor(path: &std::path::Path, name: &str) -> (Vec<usize>, Vec<f32>) {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let t = st.tensor(name).unwrap();
    assert_eq!(t.dtype(), safetensors::Dtype::F32);
    let v = t
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    (t.shape().to_vec(), v)
}

pub(crate) fn read_json(path: &std::path::Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

pub(crate) fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// Largest |a - b| per row (rows of `n`).
pub(crate) fn max_abs_per_row(a: &[f32], b: &[f32], n: usize) -> Vec<f32> {
    assert_eq!(a.len(), b.len());
    a.chunks_exact(n)
        .zip(b.chunks_exact(n))
        .map(|(x, y)| {
            x.iter()
                .zip(y)
                .map(|(p, q)| (p - q).abs())
                .fold(0.0, f32::max)
        })
        .collect()
}
