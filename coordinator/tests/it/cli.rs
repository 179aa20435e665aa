//! The `moeshard` command line, run as a user runs it.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use crate::support::{fixtures, ids, read_json, read_tensor, smollm2_model};

fn moeshard(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_moeshard"))
        .args(args)
        .output()
        .expect("running moeshard")
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "moeshard failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

fn all_fixture_ggufs() -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![fixtures()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "gguf") {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

#[test]
fn inspect_every_fixture() {
    let mut files = all_fixture_ggufs();
    files.extend(smollm2_model());
    assert!(files.len() >= 21);
    for f in &files {
        let text = ok(&moeshard(&["inspect", f.to_str().unwrap()]));
        assert!(text.contains("architecture:"), "{}: {text}", f.display());
        let json: serde_json::Value =
            serde_json::from_str(&ok(&moeshard(&["inspect", "--json", f.to_str().unwrap()])))
                .unwrap();
        assert!(json["n_tensors"].as_u64().is_some());
        let name = f.file_name().unwrap().to_str().unwrap();
        if name.starts_with("model-") {
            assert!(
                json["expert_bytes"].as_u64().unwrap() > 0,
                "{name} has experts"
            );
            assert!(!json["expert_layers"].as_array().unwrap().is_empty());
        }
    }
}

/// Corrupted copies are rejected with a clear error, a non-zero exit and no panic.
#[test]
fn inspect_rejects_corrupted_files() {
    let dir = tempfile::tempdir().unwrap();
    let src = std::fs::read(fixtures().join("qwen3moe/model-q8_0.gguf")).unwrap();
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "bad-magic",
            [b"GGUX".as_slice(), &src[4..]].concat(),
            "magic",
        ),
        ("truncated-header", src[..100].to_vec(), "offset"),
        ("truncated-data", src[..src.len() - 1000].to_vec(), "offset"),
        (
            "bad-version",
            {
                let mut v = src.clone();
                v[4..8].copy_from_slice(&99u32.to_le_bytes());
                v
            },
            "version",
        ),
        (
            "huge-tensor-count",
            {
                let mut v = src.clone();
                v[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
                v
            },
            "offset",
        ),
        ("empty", Vec::new(), "offset"),
    ];
    for (name, bytes, needle) in cases {
        let path = dir.path().join(format!("{name}.gguf"));
        std::fs::write(&path, &bytes).unwrap();
        let out = moeshard(&["inspect", path.to_str().unwrap()]);
        let stderr = String::from_utf8_lossy(&out.stderr).to_lowercase();
        assert!(!out.status.success(), "{name}: accepted");
        assert_eq!(out.status.code(), Some(1), "{name}: {stderr}");
        assert!(!stderr.contains("panicked"), "{name}: {stderr}");
        assert!(
            stderr.contains(needle),
            "{name}: error should mention {needle:?}: {stderr}"
        );
    }
}

#[test]
fn eval_writes_logits_safetensors() {
    let dir = tempfile::tempdir().unwrap();
    let out_path = dir.path().join("out.safetensors");
    let model = fixtures().join("mixtral/model-q8_0.gguf");
    let reference = read_json(&fixtures().join("mixtral/reference.json"));
    let prompt = ids(&reference["prompt_tokens"]);
    let tokens: Vec<String> = prompt.iter().map(u32::to_string).collect();
    ok(&moeshard(&[
        "eval",
        "--model",
        model.to_str().unwrap(),
        "--tokens",
        &tokens.join(","),
        "--logits-out",
        out_path.to_str().unwrap(),
    ]));
    let (shape, logits) = read_tensor(&out_path, "logits");
    assert_eq!(shape, vec![prompt.len(), 512]);
    let (_, want) = read_tensor(
        &fixtures().join("mixtral/logits.safetensors"),
        "llamacpp_logits_q8_0",
    );
    let worst = logits
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max);
    assert!(worst <= 0.02, "max |Δ| {worst}");
}

#[test]
fn generate_json_greedy_matches_llamacpp() {
    let model = fixtures().join("qwen3moe/model-q4_k_m.gguf");
    let reference = read_json(&fixtures().join("qwen3moe/reference.json"));
    let prompt: Vec<String> = ids(&reference["prompt_tokens"])
        .iter()
        .map(u32::to_string)
        .collect();
    let text = ok(&moeshard(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--tokens",
        &prompt.join(","),
        "-n",
        "16",
        "--temp",
        "0",
        "--ignore-eos",
        "--json",
    ]));
    let json: serde_json::Value = serde_json::from_str(text.trim()).unwrap();
    assert_eq!(
        ids(&json["tokens"]),
        ids(&reference["variants"]["q4_k_m"]["llamacpp_greedy"])
    );
}

#[test]
fn bad_flags_and_missing_files_are_clear_errors() {
    let out = moeshard(&["inspect", "/nonexistent/model.gguf"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/model.gguf"));
    let out = moeshard(&["generate", "--model", "x.gguf", "--bogus"]);
    assert_eq!(out.status.code(), Some(2), "clap usage errors exit with 2");
    let model = fixtures().join("mixtral/model-q8_0.gguf");
    let out = moeshard(&[
        "eval",
        "--model",
        model.to_str().unwrap(),
        "--tokens",
        "1,99999",
        "--logits-out",
        "/tmp/never-written.safetensors",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("99999"));
    assert!(!Path::new("/tmp/never-written.safetensors").exists());
    // Failure-policy flags: named in the error, nothing started.
    let m = model.to_str().unwrap();
    for (flags, says) in [
        (
            &["--nodes", "2", "--dispatch-timeout", "soon"][..],
            "--dispatch-timeout",
        ),
        (
            &["--nodes", "2", "--dispatch-timeout=-1"][..],
            "--dispatch-timeout",
        ),
        (&["--nodes", "2", "--replicas", "0"][..], "--replicas"),
        (
            &["--nodes", "2", "--replicas", "2", "--slice-experts"][..],
            "--replicas",
        ),
    ] {
        let mut args = vec!["generate", "--model", m, "-p", "hi", "-n", "1"];
        args.extend(flags);
        let out = moeshard(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{flags:?}: {stderr}");
        assert!(stderr.contains(says), "{flags:?}: {stderr}");
    }
}

#[test]
fn tokenize_json_on_vocab_only_file() {
    let vocab = fixtures().join("tokenizers/ggml-vocab-llama-bpe.gguf");
    let text = ok(&moeshard(&[
        "tokenize",
        "--model",
        vocab.to_str().unwrap(),
        "--text",
        "Hello world",
        "--no-bos",
        "--json",
    ]));
    let json: serde_json::Value = serde_json::from_str(text.trim()).unwrap();
    assert_eq!(ids(&json["tokens"]), vec![9906, 1917]);
}

/// `inspect` reads only the header: a sparse file with Kimi-K2's real header and
/// tensor table (over 400 GB of apparent size, almost nothing on disk) is
/// described in well under a second — reading its data would take minutes.
#[test]
fn inspect_sparse_400gb_kimi_k2_header() {
    use shared::gguf::{GgufWriter, TensorDesc};
    use shared::models::shapes::{self, TypeRecipe};
    use shared::quant::GgmlType;

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kimi-k2-sparse.gguf");
    let shape = shapes::by_name("kimi-k2").unwrap();
    let recipe = TypeRecipe {
        expert_gate_up: GgmlType::Q2_K,
        expert_down: GgmlType::Q4_K,
        attention: GgmlType::Q8_0,
        dense_ffn: GgmlType::Q8_0,
        embeddings: GgmlType::Q4_K,
        output: GgmlType::Q6_K,
    };
    let tensors: Vec<TensorDesc> = shape
        .tensors(&recipe)
        .into_iter()
        .map(|t| TensorDesc::new(t.name, t.ty, t.ne))
        .collect();
    let n_tensors = tensors.len();
    let mut w = GgufWriter::create(&path, shape.metadata(), tensors).unwrap();
    for _ in 0..n_tensors {
        w.skip_tensor_data().unwrap();
    }
    w.finish().unwrap();
    let len = std::fs::metadata(&path).unwrap().len();
    assert!(len > 400_000_000_000, "apparent size {len}");

    let start = std::time::Instant::now();
    let out = moeshard(&["inspect", "--json", path.to_str().unwrap()]);
    let elapsed = start.elapsed();
    let json: serde_json::Value = serde_json::from_str(&ok(&out)).unwrap();
    assert_eq!(json["architecture"], "deepseek2");
    assert_eq!(json["n_tensors"].as_u64().unwrap() as usize, n_tensors);
    assert_eq!(json["hyperparameters"]["expert_count"], 384);
    let layers = json["expert_layers"].as_array().unwrap();
    assert_eq!(layers.len(), 60, "61 layers, the first dense");
    assert_eq!(layers[0]["n_experts"], 384);
    let expert = json["expert_bytes"].as_u64().unwrap();
    let total = json["total_bytes"].as_u64().unwrap();
    assert!(
        expert > 390_000_000_000 && total <= len,
        "expert {expert} total {total}"
    );
    // A process start plus header parsing; reading 400 GB would take minutes.
    assert!(elapsed.as_secs_f64() < 5.0, "inspect took {elapsed:?}");
}

/// Rewrites a fixture with its metadata and tensors edited by `edit`.
fn rewrite_fixture(
    src: &Path,
    dst: &Path,
    edit: impl FnOnce(&mut Vec<(String, shared::gguf::MetaValue)>, &mut Vec<String>),
) {
    use shared::gguf::{GgufFile, GgufWriter, TensorDesc};
    let file = GgufFile::open(src).unwrap();
    let mut meta = file.metadata().to_vec();
    let mut names: Vec<String> = file.tensors().iter().map(|t| t.name.clone()).collect();
    edit(&mut meta, &mut names);
    let descs = names
        .iter()
        .map(|n| {
            let t = file.tensor(n).unwrap();
            TensorDesc::new(n.clone(), t.ty, t.ne.clone())
        })
        .collect();
    let mut w = GgufWriter::create(dst, meta, descs).unwrap();
    for n in &names {
        w.write_tensor_data(file.tensor_data(file.tensor(n).unwrap()))
            .unwrap();
    }
    w.finish().unwrap();
}

/// An unsupported architecture and a missing tensor are clear errors at load time.
#[test]
fn unsupported_architecture_and_missing_tensor_are_load_errors() {
    let dir = tempfile::tempdir().unwrap();
    let src = fixtures().join("glm4moe/model-q8_0.gguf");
    let tokens = "1,2,3";

    let odd_arch = dir.path().join("odd-arch.gguf");
    rewrite_fixture(&src, &odd_arch, |meta, _| {
        for (k, v) in meta.iter_mut() {
            if k == "general.architecture" {
                *v = shared::gguf::MetaValue::String("mamba2".to_owned());
            }
        }
    });
    let out_path = dir.path().join("x.safetensors");
    // Runs `eval` on `model`, expecting a clean failure; returns stderr.
    let eval_err = |model: &Path| {
        let out = moeshard(&[
            "eval",
            "--model",
            model.to_str().unwrap(),
            "--tokens",
            tokens,
            "--logits-out",
            out_path.to_str().unwrap(),
        ]);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
        stderr
    };
    let stderr = eval_err(&odd_arch);
    assert!(
        stderr.contains("unsupported architecture") && stderr.contains("mamba2"),
        "{stderr}"
    );

    let missing = dir.path().join("missing.gguf");
    rewrite_fixture(&src, &missing, |_, names| {
        names.retain(|n| n != "blk.1.ffn_up_shexp.weight");
    });
    let stderr = eval_err(&missing);
    assert!(
        stderr.contains("missing tensor blk.1.ffn_up_shexp.weight"),
        "{stderr}"
    );
    assert!(!out_path.exists(), "nothing written on failure");
}

/// `bench --json --profile`: the fields the performance issue names, and a profile whose
/// phases add up to the pass and whose per-thread work never exceeds the phase's wall time.
#[test]
fn bench_json_with_profile() {
    let model = fixtures().join("qwen3moe/model-q8_0.gguf");
    let out = ok(&moeshard(&[
        "bench",
        "--model",
        model.to_str().unwrap(),
        "-t",
        "2",
        "-p",
        "8",
        "-n",
        "6",
        "--reps",
        "1",
        "--profile",
        "--json",
    ]));
    let j: serde_json::Value = serde_json::from_str(&out).unwrap();
    for field in [
        "prompt_tps",
        "decode_tps",
        "bandwidth_gbs",
        "bytes_per_token",
        "bound_tps",
        "peak_rss_bytes",
    ] {
        let v = j[field].as_f64().unwrap_or(-1.0);
        assert!(v > 0.0, "{field} = {v} in {out}");
    }
    let p = &j["profile"];
    assert_eq!(p["tokens"], 6);
    let threads = p["threads"].as_array().unwrap();
    assert!(!threads.is_empty(), "{p}");
    let phases = p["phases"].as_array().unwrap();
    let names: Vec<&str> = phases
        .iter()
        .map(|ph| ph["phase"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["attention", "router", "ffn", "rest"]);
    let wall_sum: f64 = phases
        .iter()
        .map(|ph| ph["wall_ms"].as_f64().unwrap())
        .sum();
    let wall = p["wall_ms"].as_f64().unwrap();
    assert!(
        wall_sum <= wall * 1.01 && wall_sum >= wall * 0.5,
        "phases {wall_sum} ms of a {wall} ms token"
    );
    for ph in phases {
        let w = ph["wall_ms"].as_f64().unwrap();
        assert!(w > 0.0, "{ph}");
        for work in ph["work_ms"].as_array().unwrap() {
            assert!(work.as_f64().unwrap() <= w * 1.001 + 1e-3, "{ph}");
        }
    }
    // The experts and the attention do work on some thread.
    for (i, name) in [(0, "attention"), (2, "ffn")] {
        let work: f64 = phases[i]["work_ms"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .sum();
        assert!(work > 0.0, "{name}: {}", phases[i]);
    }
}

/// `MOESHARD_Q8_0_ORDER`: ggml's order by default; `blocks` switches the AMX level to its
/// exact-block Q8_0 batches (and only it: elsewhere a warning keeps ggml's order); an unknown
/// value is named in a warning and ignored. `bench` reports which table ran.
#[test]
fn q8_0_block_order_is_opt_in() {
    let model = fixtures().join("qwen3moe/model-q8_0.gguf");
    let bench = |order: Option<&str>| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_moeshard"));
        cmd.args(["bench", "--model", model.to_str().unwrap()])
            .args(["-t", "1", "-p", "4", "-n", "1", "--reps", "1", "--json"])
            .env_remove("MOESHARD_KERNELS")
            .env("RUST_LOG", "warn");
        match order {
            Some(o) => cmd.env("MOESHARD_Q8_0_ORDER", o),
            None => cmd.env_remove("MOESHARD_Q8_0_ORDER"),
        };
        let out = cmd.output().expect("running moeshard");
        let j: serde_json::Value = serde_json::from_str(&ok(&out)).unwrap();
        let kernels = j["kernels"].as_str().unwrap().to_string();
        (kernels, String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let (default, _) = bench(None);
    assert!(!default.contains("q8_0-blocks"), "{default}");
    let (ggml, _) = bench(Some("ggml"));
    assert_eq!(ggml, default);
    let (blocks, stderr) = bench(Some("blocks"));
    if default == "amx" {
        assert_eq!(blocks, "amx+q8_0-blocks");
    } else {
        assert_eq!(blocks, default);
        assert!(stderr.contains("needs the amx level"), "{stderr}");
    }
    let (bogus, stderr) = bench(Some("fastest"));
    assert_eq!(bogus, default);
    assert!(
        stderr.contains("unknown MOESHARD_Q8_0_ORDER") && stderr.contains("fastest"),
        "{stderr}"
    );
}
