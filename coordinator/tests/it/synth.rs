//! `moeshard synth`: synthetic models in real shapes load, evaluate to finite,
//! spread logits with spread routing, are deterministic, and bad input fails
//! cleanly.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};

use coordinator::engine::Engine;
use coordinator::models::{EngineError, ExpertExecutor, InprocExperts, Model, Pending};
use coordinator::synth::{self, SynthConfig};
use shared::gguf::{GgufFile, GgufWriter, TensorDesc};
use shared::models::HParams;
use shared::moe::Assignment;
use shared::quant::matmul::Activations;

fn moeshard(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_moeshard"))
        .args(args)
        .env("MOESHARD_LOG", "warn")
        .output()
        .unwrap()
}

fn config(shape: &str, quant: &str, experts: Option<usize>, out: &Path) -> SynthConfig {
    SynthConfig {
        shape: shape.to_owned(),
        quant: quant.to_owned(),
        layers: Some(2),
        vocab: Some(512),
        experts,
        hidden: None,
        seed: 1,
        header_only: false,
        threads: None,
        out: out.to_path_buf(),
    }
}

/// Every shape with 2 layers and a 512-token vocabulary: the header (written
/// sparse, so the full expert sets cost nothing) shows the shape's sizes in
/// `inspect --json`, and the hyperparameters and the model load from it.
#[test]
fn every_shape_header_inspects_and_loads() {
    let dir = tempfile::tempdir().unwrap();
    // (shape, arch, hidden, experts, expert FFN)
    let want = [
        ("deepseek-v3", "deepseek2", 7168, 256, 2048),
        ("kimi-k2", "deepseek2", 7168, 384, 2048),
        ("glm-4.5", "glm4moe", 5120, 160, 1536),
        ("qwen3-235b-a22b", "qwen3moe", 4096, 128, 1536),
        ("qwen3-30b-a3b", "qwen3moe", 2048, 128, 768),
        ("mixtral-8x7b", "llama", 4096, 8, 14336),
    ];
    for (name, arch, hidden, experts, ff) in want {
        let path = dir.path().join(format!("{name}.gguf"));
        let plan = synth::plan(&config(name, "Q4_K_M", None, &path)).unwrap();
        let descs: Vec<TensorDesc> = plan
            .tensors
            .iter()
            .map(|t| TensorDesc::new(t.name.clone(), t.ty, t.ne.clone()))
            .collect();
        let n = descs.len();
        let mut w = GgufWriter::create(&path, plan.metadata.clone(), descs).unwrap();
        for _ in 0..n {
            w.skip_tensor_data().unwrap();
        }
        w.finish().unwrap();

        let out = moeshard(&["inspect", "--json", path.to_str().unwrap()]);
        assert!(out.status.success(), "{name}: {out:?}");
        let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(json["architecture"], arch, "{name}");
        let hp = &json["hyperparameters"];
        assert_eq!(hp["embedding_length"], hidden, "{name}");
        assert_eq!(hp["expert_count"], experts, "{name}");
        let ff_key = if arch == "llama" {
            "feed_forward_length"
        } else {
            "expert_feed_forward_length"
        };
        assert_eq!(hp[ff_key], ff, "{name}");
        assert_eq!(hp["vocab_size"], 512, "{name}");

        let file = GgufFile::open(&path).unwrap();
        let h = HParams::from_gguf(&file).unwrap();
        assert_eq!((h.n_embd, h.n_expert, h.n_ff_exp), (hidden, experts, ff));
        assert_eq!(h.n_layer, 2, "{name}: MTP layers are not main layers");
        Engine::open(&path).unwrap_or_else(|e| panic!("{name}: {e}"));
    }
}

/// Records which experts each MoE layer was asked for.
struct Recording {
    inner: InprocExperts,
    seen: Mutex<BTreeSet<(usize, u32)>>,
}

impl ExpertExecutor for Recording {
    fn start(
        &self,
        layer: usize,
        inputs: &[Activations],
        assignments: &[Assignment],
        segments: Option<&[usize]>,
    ) -> Result<Pending<'_>, EngineError> {
        self.seen
            .lock()
            .unwrap()
            .extend(assignments.iter().map(|a| (layer, a.expert)));
        self.inner.start(layer, inputs, assignments, segments)
    }
}

/// Evaluates 6 tokens: finite logits with a spread, and the experts used.
fn eval_and_route(path: &Path) -> (Vec<f32>, BTreeSet<(usize, u32)>) {
    let file = Arc::new(GgufFile::open(path).unwrap());
    let model = Model::load(file.clone()).unwrap();
    let inner = InprocExperts::new(file, model.hparams()).unwrap();
    let rec = Arc::new(Recording {
        inner,
        seen: Mutex::new(BTreeSet::new()),
    });
    struct Shared(Arc<Recording>);
    impl ExpertExecutor for Shared {
        fn start(
            &self,
            layer: usize,
            inputs: &[Activations],
            assignments: &[Assignment],
            segments: Option<&[usize]>,
        ) -> Result<Pending<'_>, EngineError> {
            self.0.start(layer, inputs, assignments, segments)
        }
    }
    let engine = Engine::with_executor(model, Box::new(Shared(rec.clone())));
    let logits = engine.eval(&[1, 100, 7, 300, 42, 511]).unwrap();
    let seen = rec.seen.lock().unwrap().clone();
    (logits, seen)
}

fn check_logits(name: &str, logits: &[f32], n_vocab: usize) {
    assert!(logits.iter().all(|x| x.is_finite()), "{name}: non-finite");
    for row in logits.chunks_exact(n_vocab) {
        let (min, max) = row
            .iter()
            .fold((f32::MAX, f32::MIN), |(a, b), &x| (a.min(x), b.max(x)));
        assert!(max - min > 0.5 && max.abs() < 100.0, "{name}: {min}..{max}");
    }
    let rows: Vec<&[f32]> = logits.chunks_exact(n_vocab).collect();
    assert!(rows.windows(2).any(|w| w[0] != w[1]), "{name}: same logits");
}

/// Real data, with the routed experts cut to a handful per layer so a debug
/// build writes them in seconds (the dense layers keep their full size).
#[test]
fn synthetic_models_evaluate_with_spread_routing() {
    let dir = tempfile::tempdir().unwrap();
    // (shape, experts kept, quant)
    let cases = [
        ("qwen3-30b-a3b", 32, "Q4_K"),
        ("deepseek-v3", 16, "Q8_0"),
        ("glm-4.5", 16, "Q8_0"),
        ("mixtral-8x7b", 2, "Q4_0"),
    ];
    for (name, experts, quant) in cases {
        let path = dir.path().join(format!("{name}.gguf"));
        synth::synth(&config(name, quant, Some(experts), &path), &mut |_, _| {}).unwrap();
        let (logits, seen) = eval_and_route(&path);
        check_logits(name, &logits, 512);
        let hp = HParams::from_gguf(&GgufFile::open(&path).unwrap()).unwrap();
        for layer in (0..hp.n_layer).filter(|&l| hp.is_moe_layer(l)) {
            let used: BTreeSet<u32> = seen
                .iter()
                .filter(|(l, _)| *l == layer)
                .map(|&(_, e)| e)
                .collect();
            // 6 tokens × top-k: a degenerate router would pick the same k.
            let want = (hp.n_expert_used + 2).min(hp.n_expert);
            assert!(
                used.len() >= want,
                "{name} layer {layer}: experts {used:?} of {}",
                hp.n_expert
            );
        }
        std::fs::remove_file(&path).unwrap();
    }
}

/// The same seed gives the same bytes on any number of threads; another seed
/// gives others.
#[test]
fn synth_is_deterministic() {
    let dir = tempfile::tempdir().unwrap();
    let run = |file: &str, seed: u64, threads: usize| -> PathBuf {
        let path = dir.path().join(file);
        let mut cfg = config("qwen3-30b-a3b", "Q4_K_M", Some(8), &path);
        cfg.layers = Some(1);
        cfg.seed = seed;
        cfg.threads = Some(threads);
        synth::synth(&cfg, &mut |_, _| {}).unwrap();
        path
    };
    let a = std::fs::read(run("a.gguf", 5, 2)).unwrap();
    let b = std::fs::read(run("b.gguf", 5, 1)).unwrap();
    let c = std::fs::read(run("c.gguf", 6, 2)).unwrap();
    assert!(a == b, "threads changed the bytes");
    assert_eq!(a.len(), c.len());
    assert!(a != c, "the seed changed nothing");
}

/// The command line with a full expert set: Qwen3-30B-A3B's 128 experts.
#[test]
fn cli_synth_writes_a_loadable_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q.gguf");
    let out = moeshard(&[
        "synth",
        "--shape",
        "qwen3-30b-a3b",
        "--quant",
        "Q8_0",
        "--layers",
        "1",
        "--vocab",
        "512",
        "--out",
        path.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("wrote"));
    assert!(out.stdout.is_empty(), "no progress bar on a pipe");
    let out = moeshard(&["inspect", "--json", path.to_str().unwrap()]);
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["hyperparameters"]["expert_count"], 128);
    // token_embd, output, q, k, v, o and the three expert tensors.
    assert_eq!(json["types"]["Q8_0"]["tensors"], 9);
    let (logits, seen) = eval_and_route(&path);
    check_logits("qwen3-30b-a3b", &logits, 512);
    assert!(seen.len() >= 16, "{seen:?}");
}

#[test]
fn cli_synth_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    let out_path = dir.path().join("x.gguf");
    let out_s = out_path.to_str().unwrap();
    let missing = dir.path().join("no/such/dir/x.gguf");
    let cases: [(Vec<&str>, &str); 4] = [
        (
            vec!["--shape", "gpt-5", "--quant", "Q8_0", "--out", out_s],
            "unknown shape 'gpt-5' (known: deepseek-v3, kimi-k2",
        ),
        (
            vec!["--shape", "kimi-k2", "--quant", "Q3_K_XL", "--out", out_s],
            "unknown quantization 'Q3_K_XL'",
        ),
        (
            vec![
                "--shape", "kimi-k2", "--quant", "Q8_0", "--layers", "0", "--out", out_s,
            ],
            "--layers must be at least 1",
        ),
        (
            vec![
                "--shape",
                "qwen3-30b-a3b",
                "--quant",
                "Q8_0",
                "--layers",
                "1",
                "--vocab",
                "512",
                "--out",
                missing.to_str().unwrap(),
            ],
            "no/such/dir",
        ),
    ];
    for (args, want) in cases {
        let mut all = vec!["synth"];
        all.extend(args);
        let out = moeshard(&all);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{all:?}: {stderr}");
        assert!(stderr.contains(want), "{all:?}: {stderr}");
    }
    let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

/// `--header-only`: the whole Kimi-K2 at Q3_K_M (hundreds of GB) as a sparse file that
/// takes next to no disk, whose header the reader and the planner's cost model accept.
#[test]
fn cli_synth_header_only_kimi_k2_is_sparse_and_readable() {
    use std::os::unix::fs::MetadataExt;
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("kimi-k2-q3_k_m.gguf");
    let o = moeshard(&[
        "synth",
        "--shape",
        "kimi-k2",
        "--quant",
        "Q3_K_M",
        "--header-only",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let meta = std::fs::metadata(&out).unwrap();
    // Kimi-K2 (1.03 T parameters) at about 3.9 bits per weight.
    assert!(
        (400e9..560e9).contains(&(meta.len() as f64)),
        "{} bytes",
        meta.len()
    );
    assert!(
        meta.blocks() * 512 < 64 << 20,
        "{} bytes on disk",
        meta.blocks() * 512
    );
    let file = GgufFile::open(&out).unwrap();
    let hp = HParams::from_gguf(&file).unwrap();
    assert_eq!(
        (hp.n_expert, hp.n_expert_used, hp.n_layer_all),
        (384, 8, 61)
    );
    let ty = |name: &str| file.tensor(name).unwrap().ty.name().to_owned();
    assert_eq!(ty("blk.1.ffn_down_exps.weight"), "Q5_K");
    assert_eq!(ty("blk.30.ffn_down_exps.weight"), "Q4_K");
    assert_eq!(ty("blk.30.ffn_gate_exps.weight"), "Q3_K");
    assert_eq!(ty("output.weight"), "Q6_K");
}
