//! `moeshard inspect`: what a GGUF file holds, read from its header alone.
//!
//! Nothing past the tensor table is touched, so a 400 GB model is described in
//! milliseconds: tensor sizes come from the tensor infos, not from reading data.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Serialize;
use shared::gguf::{GgufError, GgufFile, MetaValue};

/// A summary of one model file.
#[derive(Debug, Serialize)]
pub struct Summary {
    pub path: String,
    pub architecture: Option<String>,
    pub name: Option<String>,
    pub gguf_version: u32,
    pub n_parts: usize,
    pub alignment: u64,
    /// `{arch}.*` keys (hyperparameters), with short values.
    pub hyperparameters: BTreeMap<String, serde_json::Value>,
    /// Tokenizer facts: model, pre-tokenizer, vocabulary size.
    pub tokenizer: BTreeMap<String, serde_json::Value>,
    pub n_tensors: usize,
    pub n_metadata: usize,
    pub n_elements: u64,
    pub total_bytes: u64,
    /// Per tensor type: count and bytes.
    pub types: BTreeMap<String, TypeCount>,
    /// Bytes of routed-expert tensors (`*_exps`).
    pub expert_bytes: u64,
    /// Bytes of everything else (attention, norms, routers, shared experts, dense FFNs, embeddings).
    pub other_bytes: u64,
    /// Layers with routed experts.
    pub expert_layers: Vec<ExpertLayer>,
}

/// Tensors of one type.
#[derive(Debug, Default, Serialize)]
pub struct TypeCount {
    pub tensors: usize,
    pub bytes: u64,
}

/// The routed experts of one layer.
#[derive(Debug, Serialize)]
pub struct ExpertLayer {
    pub layer: u32,
    pub n_experts: u64,
    /// Bytes of one expert (gate, up and down together).
    pub bytes_per_expert: u64,
    pub total_bytes: u64,
    /// Tensor types of the expert tensors, e.g. `ffn_down_exps: Q6_K`.
    pub types: BTreeMap<String, String>,
}

/// Reads the header of `path` and summarizes it.
pub fn summarize(path: &Path) -> Result<Summary, GgufError> {
    let file = GgufFile::open(path)?;
    Ok(summarize_file(path, &file))
}

/// Summarizes an opened file.
pub fn summarize_file(path: &Path, file: &GgufFile) -> Summary {
    let architecture = file.architecture().map(str::to_owned);
    let mut hyperparameters = BTreeMap::new();
    let mut tokenizer = BTreeMap::new();
    for (key, value) in file.metadata() {
        if let Some(arch) = &architecture {
            if let Some(rest) = key.strip_prefix(arch.as_str()) {
                if let Some(field) = rest.strip_prefix('.') {
                    hyperparameters.insert(field.to_owned(), short_json(value));
                }
            }
        }
        if let Some(field) = key.strip_prefix("tokenizer.ggml.") {
            let v = match value {
                MetaValue::Array(a) => serde_json::json!(format!("[{} entries]", a.len())),
                other => short_json(other),
            };
            tokenizer.insert(field.to_owned(), v);
        }
    }
    if let Some(tpl) = file
        .get("tokenizer.chat_template")
        .and_then(MetaValue::as_str)
    {
        tokenizer.insert(
            "chat_template".to_owned(),
            serde_json::json!(format!("{} bytes", tpl.len())),
        );
    }

    let mut types: BTreeMap<String, TypeCount> = BTreeMap::new();
    let mut expert_bytes = 0;
    let mut other_bytes = 0;
    let mut n_elements = 0u64;
    let mut layers: BTreeMap<u32, ExpertLayer> = BTreeMap::new();
    for t in file.tensors() {
        let entry = types.entry(t.ty.name().to_owned()).or_default();
        entry.tensors += 1;
        entry.bytes += t.byte_len;
        n_elements += t.ne.iter().product::<u64>();
        match expert_tensor(&t.name) {
            Some((layer, kind)) => {
                expert_bytes += t.byte_len;
                let n_experts = t.ne.get(2).copied().unwrap_or(1).max(1);
                let l = layers.entry(layer).or_insert_with(|| ExpertLayer {
                    layer,
                    n_experts,
                    bytes_per_expert: 0,
                    total_bytes: 0,
                    types: BTreeMap::new(),
                });
                l.total_bytes += t.byte_len;
                l.bytes_per_expert += t.byte_len / n_experts;
                l.types.insert(kind.to_owned(), t.ty.name().to_owned());
            }
            None => other_bytes += t.byte_len,
        }
    }

    Summary {
        path: path.display().to_string(),
        name: file
            .get("general.name")
            .and_then(MetaValue::as_str)
            .map(str::to_owned),
        architecture,
        gguf_version: file.version(),
        n_parts: file.n_parts(),
        alignment: file.alignment(),
        hyperparameters,
        tokenizer,
        n_tensors: file.tensors().len(),
        n_metadata: file.metadata().len(),
        n_elements,
        total_bytes: expert_bytes + other_bytes,
        types,
        expert_bytes,
        other_bytes,
        expert_layers: layers.into_values().collect(),
    }
}

/// `blk.N.ffn_*_exps.weight` → (N, `ffn_*_exps`). Biases of expert tensors count as expert bytes too.
fn expert_tensor(name: &str) -> Option<(u32, &str)> {
    let rest = name.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer = layer.parse().ok()?;
    let kind = rest.split('.').next()?;
    kind.ends_with("_exps").then_some((layer, kind))
}

/// A JSON rendering of a metadata value, with long arrays abbreviated.
fn short_json(value: &MetaValue) -> serde_json::Value {
    use serde_json::json;
    match value {
        MetaValue::U8(v) => json!(v),
        MetaValue::I8(v) => json!(v),
        MetaValue::U16(v) => json!(v),
        MetaValue::I16(v) => json!(v),
        MetaValue::U32(v) => json!(v),
        MetaValue::I32(v) => json!(v),
        MetaValue::U64(v) => json!(v),
        MetaValue::I64(v) => json!(v),
        MetaValue::F32(v) => json!(v),
        MetaValue::F64(v) => json!(v),
        MetaValue::Bool(v) => json!(v),
        MetaValue::String(s) => json!(s),
        MetaValue::Array(a) if a.len() <= 16 => {
            serde_json::Value::Array(a.values.iter().map(short_json).collect())
        }
        MetaValue::Array(a) => json!(format!("[{} entries]", a.len())),
    }
}

/// Human-readable bytes (binary units).
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = bytes as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.2} {}", UNITS[unit])
    }
}

/// The text report `moeshard inspect` prints.
pub fn render_text(s: &Summary) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(out, "file:          {}", s.path);
    let _ = writeln!(
        out,
        "architecture:  {}",
        s.architecture.as_deref().unwrap_or("(none)")
    );
    if let Some(name) = &s.name {
        let _ = writeln!(out, "name:          {name}");
    }
    let _ = writeln!(
        out,
        "gguf:          v{}, {} part(s), alignment {}, {} metadata keys",
        s.gguf_version, s.n_parts, s.alignment, s.n_metadata
    );
    let _ = writeln!(
        out,
        "tensors:       {} ({} parameters, {})",
        s.n_tensors,
        s.n_elements,
        human_bytes(s.total_bytes)
    );
    let pct = |b: u64| {
        if s.total_bytes == 0 {
            0.0
        } else {
            100.0 * b as f64 / s.total_bytes as f64
        }
    };
    let _ = writeln!(
        out,
        "experts:       {} ({:.1}%), rest {} ({:.1}%)",
        human_bytes(s.expert_bytes),
        pct(s.expert_bytes),
        human_bytes(s.other_bytes),
        pct(s.other_bytes)
    );
    let _ = writeln!(out, "\nhyperparameters:");
    for (k, v) in &s.hyperparameters {
        let _ = writeln!(out, "  {k:<40} {v}");
    }
    if !s.tokenizer.is_empty() {
        let _ = writeln!(out, "\ntokenizer:");
        for (k, v) in &s.tokenizer {
            let _ = writeln!(out, "  {k:<40} {v}");
        }
    }
    let _ = writeln!(out, "\ntensor types:");
    for (ty, c) in &s.types {
        let _ = writeln!(
            out,
            "  {ty:<6} {:>6} tensors  {:>12}",
            c.tensors,
            human_bytes(c.bytes)
        );
    }
    if !s.expert_layers.is_empty() {
        let _ = writeln!(out, "\nrouted experts per layer:");
        for l in &s.expert_layers {
            let types: Vec<String> = l.types.iter().map(|(k, v)| format!("{k}={v}")).collect();
            let _ = writeln!(
                out,
                "  blk.{:<4} {:>4} experts x {:>10} = {:>10}  {}",
                l.layer,
                l.n_experts,
                human_bytes(l.bytes_per_expert),
                human_bytes(l.total_bytes),
                types.join(" ")
            );
        }
    }
    out
}
