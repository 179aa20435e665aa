//! Distributed execution against the single-process engine (the exactness contract of
//! DESIGN.md): the same plan on any transport gives bit-identical logits with one node;
//! other plans (2 or 3 nodes, replicas) stay within 1e-5 with identical greedy tokens.
//! Node processes are real `moeshard expert-node` daemons on 127.0.0.1.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use coordinator::distributed::connect::{
    open_distributed, DistOptions, DistributedEngine, ExpertPlacement,
};
use coordinator::distributed::launcher::LaunchOptions;
use coordinator::distributed::DeadlinePolicy;
use coordinator::engine::Engine;
use coordinator::models::Logits;
use coordinator::sampler::{Sampler, SamplerConfig};
use proto::transport::TransportKind;
use shared::gguf::GgufFile;
use shared::placement::ModelShape;

use crate::support::{fixtures, ids, read_json, smollm2_model};

const ARCHS: [&str; 4] = ["qwen3moe", "mixtral", "deepseek2", "glm4moe"];
const VARIANTS: [&str; 4] = ["f16", "q8_0", "q4_k_m", "q2_k"];
const TRANSPORTS: [TransportKind; 3] = [
    TransportKind::Inproc,
    TransportKind::Grpc,
    TransportKind::Quic,
];
/// Logits of a different plan (float sums regrouped) vs the single-process engine.
const PLAN_TOLERANCE: f32 = 1e-5;
const N_GREEDY: usize = 16;

fn launch_options() -> LaunchOptions {
    LaunchOptions {
        program: PathBuf::from(env!("CARGO_BIN_EXE_moeshard")),
        program_args: vec!["expert-node".into()],
        threads_per_node: 1,
        start_timeout: Duration::from_secs(60),
        ..LaunchOptions::this_executable().unwrap()
    }
}

pub(crate) fn options(nodes: usize, transport: TransportKind) -> DistOptions {
    DistOptions {
        nodes: Some(nodes),
        transport,
        launch: Some(launch_options()),
        ..DistOptions::default()
    }
}

fn open(model: &Path, opts: &DistOptions) -> DistributedEngine {
    open_distributed(model, opts).unwrap_or_else(|e| panic!("{}: {e}", model.display()))
}

fn greedy(engine: &Engine, prompt: &[u32], n: usize) -> Vec<u32> {
    let mut sampler = Sampler::new(SamplerConfig::greedy());
    engine
        .generate(prompt, n, prompt.len() + n, &mut sampler, |_| true)
        .unwrap()
        .0
}

fn max_abs(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// `got` against the single-process logits: bit for bit where the plan is `exact`,
/// within [`PLAN_TOLERANCE`] otherwise.
fn check_logits(got: &[f32], want: &[f32], exact: bool, what: &str) {
    let diff = max_abs(got, want);
    if exact {
        assert!(
            got.iter()
                .zip(want)
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "{what}: must be bit-identical (max |Δ| {diff})"
        );
    } else {
        assert!(
            diff <= PLAN_TOLERANCE,
            "{what}: max |Δ| {diff} > {PLAN_TOLERANCE}"
        );
    }
}

/// A plan where the middle experts of every MoE layer live on both nodes.
fn replica_plan(model: &Path, dir: &Path) -> PathBuf {
    let shape = ModelShape::from_gguf(&GgufFile::open(model).unwrap()).unwrap();
    let layers: Vec<String> = (0..shape.n_layer)
        .filter(|&l| shape.layers[l].routed.is_some())
        .map(|l| l.to_string())
        .collect();
    let layers = layers.join(",");
    let e = shape.n_expert;
    let (a, b) = (e / 4, 3 * e / 4);
    let text = format!(
        "version = 1\nnodes = [\"node0\", \"node1\"]\n\
         [[place]]\npart = \"routed\"\nlayers = \"{layers}\"\nexperts = \"0-{}\"\nnodes = [\"node0\"]\n\
         [[place]]\npart = \"routed\"\nlayers = \"{layers}\"\nexperts = \"{a}-{}\"\nnodes = [\"node0\", \"node1\"]\n\
         [[place]]\npart = \"routed\"\nlayers = \"{layers}\"\nexperts = \"{b}-{}\"\nnodes = [\"node1\"]\n",
        a - 1,
        b - 1,
        e - 1
    );
    let path = dir.join("replicas.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// A plan with every routed expert on node0 and every dense part (dense FFN, shared
/// expert) cut in two over node0 and node1: the dense split is exact and one node sums all
/// the routed experts, so the logits are the single-process engine's, bit for bit.
fn dense_split_plan(model: &Path, dir: &Path) -> PathBuf {
    let shape = ModelShape::from_gguf(&GgufFile::open(model).unwrap()).unwrap();
    let mut text = String::from("version = 1\nnodes = [\"node0\", \"node1\"]\n");
    for (l, layer) in shape.layers.iter().enumerate() {
        if layer.routed.is_some() {
            text += &format!(
                "[[place]]\npart = \"routed\"\nlayers = \"{l}\"\nexperts = \"0-{}\"\nnodes = [\"node0\"]\n",
                shape.n_expert - 1
            );
        }
        if let Some(d) = layer.dense {
            // One block of down (a Q4_K shared expert of 256) cannot be cut: whole on node1.
            let cut = d.n_ff / d.block / 2 * d.block;
            let halves = [((0, cut), "node0"), ((cut, d.n_ff), "node1")];
            for &(ff, node) in halves.iter().filter(|((a, b), _)| a < b) {
                text += &format!(
                    "[[place]]\npart = \"dense\"\nlayers = \"{l}\"\nff = [{}, {}]\nnodes = [\"{node}\"]\n",
                    ff.0, ff.1
                );
            }
        }
    }
    let path = dir.join("dense-split.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// Every transport × 1, 2, 3 nodes, a replica plan and a dense split, on one architecture.
fn matrix(arch: &str) {
    let dir = fixtures().join(arch);
    let prompt = ids(&read_json(&dir.join("reference.json"))["prompt_tokens"]);
    let tmp = tempfile::tempdir().unwrap();
    for variant in VARIANTS {
        let model = dir.join(format!("model-{variant}.gguf"));
        let single = Engine::open(&model).unwrap();
        let want = single.eval(&prompt).unwrap();
        let want_greedy = greedy(&single, &prompt, N_GREEDY);

        let shape = ModelShape::from_gguf(&GgufFile::open(&model).unwrap()).unwrap();
        // Experts of one ffn_down block cannot be cut: the sliced even plan then places them
        // whole, alternating nodes, and their partial sums regroup.
        let cuttable = (shape.layers.iter())
            .filter_map(|l| l.routed)
            .all(|f| f.n_ff / f.block.max(1) >= 2);
        // (name, options, bit-identical expected)
        let mut configs: Vec<(String, DistOptions, bool)> = Vec::new();
        for transport in TRANSPORTS {
            for n in 1..=3 {
                // The default even plan: every expert sliced (two exact rounds).
                let exact = n == 1 || cuttable;
                configs.push((format!("{transport} x{n}"), options(n, transport), exact));
            }
            // Whole experts split between the nodes: one round, partial sums regrouped.
            let mut whole = options(2, transport);
            whole.experts = ExpertPlacement::Whole;
            configs.push((format!("{transport} x2 whole experts"), whole, false));
        }
        let mut whole3 = options(3, TransportKind::Grpc);
        whole3.experts = ExpertPlacement::Whole;
        configs.push(("grpc x3 whole experts".into(), whole3, false));
        let mut replicas = options(2, TransportKind::Grpc);
        replicas.plan = Some(replica_plan(&model, tmp.path()));
        configs.push(("grpc x2 with replicas".into(), replicas, false));
        if shape.layers.iter().any(|l| l.dense.is_some()) {
            let mut dense_exact = options(2, TransportKind::Grpc);
            dense_exact.plan = Some(dense_split_plan(&model, tmp.path()));
            configs.push((
                "grpc x2, dense parts split, experts on node0".into(),
                dense_exact,
                true,
            ));
        }

        for (name, opts, exact) in &configs {
            let d = open(&model, opts);
            let got = d.engine.eval(&prompt).unwrap();
            let diff = max_abs(&got, &want);
            eprintln!("{arch} {variant} {name}: max |Δ| vs single process = {diff:.2e}");
            check_logits(&got, &want, *exact, &format!("{arch} {variant} {name}"));
            assert_eq!(
                greedy(&d.engine, &prompt, N_GREEDY),
                want_greedy,
                "{arch} {variant} {name}: greedy tokens"
            );
        }

        // Every routed expert sliced over the nodes (--slice-experts, alone and with
        // --numa auto on a synthetic 2-package topology, which also pins each node): the
        // exact two-round split, so the logits are the single-process engine's, bit for bit.

        let mut sliced = options(2, TransportKind::Inproc);
        sliced.experts = ExpertPlacement::Sliced;
        let mut sliced3 = options(3, TransportKind::Grpc);
        sliced3.experts = ExpertPlacement::Sliced;
        let numa = DistOptions {
            nodes: None,
            numa_auto: true,
            topology: Some("synthetic:pack:2 numa:1 core:2 pu:1".into()),
            ..options(2, TransportKind::Grpc)
        };
        for (name, opts) in [
            ("sliced x2", sliced),
            ("sliced x3 (grpc)", sliced3),
            ("numa auto (2 packages)", numa),
        ] {
            let d = open(&model, &opts);
            let got = d.engine.eval(&prompt).unwrap();
            let diff = max_abs(&got, &want);
            eprintln!("{arch} {variant} {name}: max |Δ| vs single process = {diff:.2e}");
            check_logits(&got, &want, cuttable, &format!("{arch} {variant} {name}"));
            assert_eq!(
                greedy(&d.engine, &prompt, N_GREEDY),
                want_greedy,
                "{arch} {variant} {name}: greedy tokens"
            );
        }

        // Dense FFNs and shared experts split over 2 nodes too (exactly), with the routed
        // experts sliced (exact where they can be cut) and then whole on both nodes (their
        // partial sums regroup, and the f16 KV cache and Q8 activation rounding downstream
        // can turn a last-bit difference into a rounding step: only greedy tokens must match).
        let mut dense = options(2, TransportKind::Inproc);
        dense.split_dense = true;
        let d = open(&model, &dense);
        let got = d.engine.eval(&prompt).unwrap();
        eprintln!(
            "{arch} {variant} dense split x2: max |Δ| vs single process = {:.2e}",
            max_abs(&got, &want)
        );
        if cuttable {
            check_logits(
                &got,
                &want,
                true,
                &format!("{arch} {variant} dense split x2"),
            );
        }
        assert_eq!(
            greedy(&d.engine, &prompt, N_GREEDY),
            want_greedy,
            "{arch} {variant} dense split x2: greedy tokens"
        );
        let mut dense_whole = options(2, TransportKind::Inproc);
        dense_whole.split_dense = true;
        dense_whole.experts = ExpertPlacement::Whole;
        let d = open(&model, &dense_whole);
        assert_eq!(
            greedy(&d.engine, &prompt, N_GREEDY),
            want_greedy,
            "{arch} {variant} dense split x2, whole experts: greedy tokens"
        );
    }
}

#[test]
fn qwen3moe_every_transport_and_plan() {
    matrix(ARCHS[0]);
}

#[test]
fn mixtral_every_transport_and_plan() {
    matrix(ARCHS[1]);
}

#[test]
fn deepseek2_every_transport_and_plan() {
    matrix(ARCHS[2]);
}

#[test]
fn glm4moe_every_transport_and_plan() {
    matrix(ARCHS[3]);
}

/// Logits of the last position after `prompt` then `steps` (prompt as one batch, then one
/// token per step, as generation runs).
fn incremental_logits(engine: &Engine, prompt: &[u32], steps: &[u32]) -> Vec<f32> {
    let mut cache = engine.new_cache(prompt.len() + steps.len() + 1);
    let mut logits = engine.forward(&mut cache, prompt, Logits::Last).unwrap();
    for &t in steps {
        logits = engine.forward(&mut cache, &[t], Logits::Last).unwrap();
    }
    logits
}

/// SmolLM2 (dense) with every FFN split over 2 nodes: the split is exact (two rounds: the
/// nodes' SwiGLU slices, then their rows of down from the joined hidden rows), so logits are
/// bit-identical to the single-process engine's and greedy continuations are llama.cpp's.
#[test]
fn smollm2_ffn_split_over_two_nodes_matches_llamacpp() {
    let Some(path) = smollm2_model() else { return };
    let reference = read_json(&fixtures().join("smollm2/reference.json"));
    let single = Engine::open(&path).unwrap();
    for transport in [TransportKind::Grpc, TransportKind::Inproc] {
        let d = open(&path, &options(2, transport));
        for (i, case) in reference["generate"].as_array().unwrap().iter().enumerate() {
            let prompt = ids(&case["prompt_tokens"]);
            let want = ids(&case["greedy_tokens"]);
            let got = greedy(&d.engine, &prompt, want.len());
            assert_eq!(got, want, "{transport:?} prompt {i}");
            // The prompt as one batch, then one token: both bit-identical.
            let mut all = prompt.clone();
            all.extend_from_slice(&want[..want.len().min(4)]);
            let (a, b) = (single.eval(&all).unwrap(), d.engine.eval(&all).unwrap());
            let differ = a
                .iter()
                .zip(&b)
                .filter(|(x, y)| x.to_bits() != y.to_bits())
                .count();
            assert_eq!(
                differ, 0,
                "{transport:?} prompt {i}: {differ} logits differ"
            );
            let (a, b) = (
                incremental_logits(&single, &prompt, &want[..3]),
                incremental_logits(&d.engine, &prompt, &want[..3]),
            );
            assert!(
                a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()),
                "{transport:?} prompt {i}: decode logits differ"
            );
        }
        let stats = d.engine.experts().node_stats();
        assert_eq!(stats.len(), 2);
        for (name, s) in stats {
            let s = s.unwrap();
            assert!(s.dispatches > 0, "{name} computed nothing");
        }
    }
}

/// A killed node fails the step with an error naming it, within the dispatch deadline.
#[test]
fn killed_or_stalled_node_is_named_within_the_deadline() {
    let model = fixtures().join("qwen3moe/model-q8_0.gguf");
    // 24 tokens: every node gets work in every layer.
    let prompt = ids(&read_json(&fixtures().join("qwen3moe/reference.json"))["prompt_tokens"]);
    let deadline = Duration::from_secs(2);
    // Whole experts (one round per layer) and sliced ones (two rounds: either can fail).
    for (transport, sliced) in [
        (TransportKind::Grpc, false),
        (TransportKind::Quic, false),
        (TransportKind::Grpc, true),
    ] {
        for stall in [false, true] {
            let mut opts = options(2, transport);
            opts.deadline = DeadlinePolicy::Fixed(deadline);
            opts.experts = if sliced {
                ExpertPlacement::Sliced
            } else {
                ExpertPlacement::Whole
            };
            let mut d = open(&model, &opts);
            d.engine.eval(&prompt).unwrap();
            let nodes = d.local_nodes.as_mut().unwrap();
            let pid = nodes.pids()[1];
            if stall {
                // SAFETY: SIGSTOP to a node process this test started.
                unsafe { libc::kill(pid as libc::pid_t, libc::SIGSTOP) };
            } else {
                nodes.kill(1);
            }
            let t0 = Instant::now();
            let err = match d.engine.eval(&prompt) {
                Ok(_) => panic!("{transport} stall={stall}: eval succeeded without node1"),
                Err(e) => e.to_string(),
            };
            let took = t0.elapsed();
            if stall {
                // SAFETY: as above; lets the node stop cleanly when dropped.
                unsafe { libc::kill(pid as libc::pid_t, libc::SIGCONT) };
            }
            eprintln!("{transport} sliced={sliced} stall={stall}: {took:?}: {err}");
            assert!(
                err.contains("node1"),
                "{transport}: error names the node: {err}"
            );
            assert!(
                took <= deadline + Duration::from_millis(500),
                "{transport} stall={stall}: took {took:?} (deadline {deadline:?})"
            );
        }
    }
}

/// A plan that places an expert on a node which does not hold it is refused at the
/// handshake, naming the node and the expert.
#[test]
fn node_without_the_planned_expert_is_refused() {
    let model = fixtures().join("mixtral/model-q4_k_m.gguf");
    let tmp = tempfile::tempdir().unwrap();
    let (mut child, addr) = spawn_node(&["--model", model.to_str().unwrap(), "--experts", "0-3"]);
    let cluster = tmp.path().join("cluster.toml");
    std::fs::write(
        &cluster,
        format!("[[node]]\nname = \"node0\"\naddress = \"{addr}\"\ntransport = \"grpc\"\n"),
    )
    .unwrap();
    let opts = DistOptions {
        cluster: Some(cluster),
        ..DistOptions::default()
    };
    let err = match open_distributed(&model, &opts) {
        Ok(_) => panic!("a node holding experts 0-3 accepted a plan giving it all 8"),
        Err(e) => e.to_string(),
    };
    stop(&mut child);
    assert!(err.contains("node0") && err.contains("expert 4"), "{err}");
}

/// Starts `moeshard expert-node ARGS --listen 127.0.0.1:0 --transport grpc` and reads
/// the address it listens on.
/// The sliced even plan of 2 nodes (dense parts sliced too) as a file in `dir`, and `moeshard
/// split` of `model` by it into `dir/split`: (node names, plan file, split folder).
pub(crate) fn split_even(model: &Path, dir: &Path) -> (Vec<String>, PathBuf, PathBuf) {
    let plan = dir.join("plan.toml");
    let out = dir.join("split");
    let shape = ModelShape::from_gguf(&GgufFile::open(model).unwrap()).unwrap();
    let names = vec!["node0".to_owned(), "node1".to_owned()];
    shared::placement::Plan::even_sliced(&names, &shape, true)
        .save(&plan)
        .unwrap();
    let status = Command::new(env!("CARGO_BIN_EXE_moeshard"))
        .args(["split", "--model"])
        .arg(model)
        .arg("--plan")
        .arg(&plan)
        .arg("--out")
        .arg(&out)
        .status()
        .unwrap();
    assert!(status.success(), "moeshard split of {}", model.display());
    (names, plan, out)
}

/// A 2-layer Qwen3-30B-A3B-shaped Q4_K_M model with 16 experts and a vocabulary of 512 at
/// `path`, random weights from `seed`.
pub(crate) fn synth_qwen3_q4_k_m(path: &Path, seed: u64) {
    use coordinator::synth::{self, SynthConfig};
    let cfg = SynthConfig {
        shape: "qwen3-30b-a3b".into(),
        quant: "Q4_K_M".into(),
        layers: Some(2),
        vocab: Some(512),
        experts: Some(16),
        hidden: None,
        seed,
        header_only: false,
        threads: None,
        out: path.to_path_buf(),
    };
    synth::synth(&cfg, &mut |_, _| {}).unwrap();
}

/// One gRPC node daemon per name serving its `split` file of `model` from `split_dir`, and
/// the cluster file naming them (written into `dir`).
pub(crate) fn serve_split_files(
    model: &Path,
    split_dir: &Path,
    names: &[String],
    dir: &Path,
) -> (Vec<(Child, PathBuf)>, PathBuf) {
    let mut children = Vec::new();
    let mut cluster = String::new();
    for name in names {
        let file = split_dir.join(shared::placement::split::split_file_name(model, name));
        let (child, addr) = spawn_node(&["--model", file.to_str().unwrap(), "--node", name]);
        cluster +=
            &format!("[[node]]\nname = \"{name}\"\naddress = \"{addr}\"\ntransport = \"grpc\"\n");
        children.push((child, file));
    }
    let cluster_path = dir.join("cluster.toml");
    std::fs::write(&cluster_path, cluster).unwrap();
    (children, cluster_path)
}

pub(crate) fn spawn_node(args: &[&str]) -> (Child, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_moeshard"))
        .arg("expert-node")
        .args(args)
        .args([
            "--listen",
            "127.0.0.1:0",
            "--transport",
            "grpc",
            "--threads",
            "1",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .trim()
        .rsplit("://")
        .next()
        .unwrap_or_else(|| panic!("node said {line:?}"))
        .to_owned();
    (child, addr)
}

pub(crate) fn stop(child: &mut Child) {
    // SAFETY: SIGTERM to a process this test started and has not reaped.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    let status = child.wait().unwrap();
    assert!(status.success(), "node exited with {status} on SIGTERM");
}

/// Bytes of the mappings of `file` in `/proc/PID/smaps` (their `Size:` lines).
fn smaps_mapped(pid: u32, file: &Path) -> u64 {
    let file = file.canonicalize().unwrap();
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap();
    let mut total = 0u64;
    let mut current = false;
    for line in smaps.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if first.contains('-') && first.chars().all(|c| c.is_ascii_hexdigit() || c == '-') {
            current = line.split_whitespace().nth(5).map(Path::new) == Some(file.as_path());
        } else if current && line.starts_with("Size:") {
            let kb: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
            total += kb * 1024;
        }
    }
    total
}

/// Nodes serving from `moeshard split` files give the same logits as nodes serving the
/// same plan (every expert and dense part sliced over both) from the full file — and, the
/// split being exact, as the single-process engine — and each maps only its share (checked
/// in smaps).
#[test]
fn split_files_serve_the_same_results_and_map_only_their_share() {
    // Q8_0: experts of 256 rows cut into 32-row blocks, so every expert is sliced.
    let model = fixtures().join("deepseek2/model-q8_0.gguf");
    let prompt = ids(&read_json(&fixtures().join("deepseek2/reference.json"))["prompt_tokens"]);
    let tmp = tempfile::tempdir().unwrap();
    let (names, plan, out) = split_even(&model, tmp.path());

    // Reference: the same plan served from the full file.
    let full = open(
        &model,
        &DistOptions {
            plan: Some(plan.clone()),
            ..options(2, TransportKind::Grpc)
        },
    );
    let want = full.engine.eval(&prompt).unwrap();
    let single = Engine::open(&model).unwrap().eval(&prompt).unwrap();
    check_logits(
        &want,
        &single,
        true,
        "the sliced plan from the full file vs one process",
    );

    let (mut children, cluster_path) = serve_split_files(&model, &out, &names, tmp.path());
    let d = open(
        &model,
        &DistOptions {
            cluster: Some(cluster_path),
            plan: Some(plan),
            ..DistOptions::default()
        },
    );
    let got = d.engine.eval(&prompt).unwrap();
    check_logits(&got, &want, true, "split files vs the full file, same plan");

    let stats = d.engine.experts().node_stats();
    let model_len = std::fs::metadata(&model).unwrap().len();
    for ((child, file), (name, s)) in children.iter_mut().zip(stats) {
        let s = s.unwrap();
        let in_smaps = smaps_mapped(child.id(), file);
        let file_len = std::fs::metadata(file.as_path()).unwrap().len();
        eprintln!(
            "{name}: stats mapped {} B, smaps {in_smaps} B, split file {file_len} B, model {model_len} B",
            s.mapped_bytes
        );
        assert_eq!(s.mapped_bytes, in_smaps, "{name}: stats vs smaps");
        assert!(in_smaps <= file_len, "{name} maps more than its file");
        assert!(
            in_smaps < model_len / 2 + 4096,
            "{name} maps more than its share"
        );
        stop(child);
    }
}

/// `--replica-choice load` with every expert on both nodes (`--replicas 2`): each step's
/// experts are shared by the two nodes (by bytes, busiest first), where the default
/// layer-by-layer choice follows the placement (node i's experts from node i or i+1 by
/// layer), leaving one node idle in steps whose experts all come from one half. Results
/// stay within the plan tolerance and greedy tokens equal the single-process engine's.
#[test]
fn load_based_replica_choice_spreads_each_step_over_the_replicas() {
    use coordinator::distributed::ReplicaChoice;
    let model = fixtures().join("qwen3moe/model-q8_0.gguf");
    let prompt = ids(&read_json(&fixtures().join("qwen3moe/reference.json"))["prompt_tokens"]);
    let single = Engine::open(&model).unwrap();
    let want = single.eval(&prompt).unwrap();
    let want_greedy = greedy(&single, &prompt, N_GREEDY);
    let hp = single.model().hparams().clone();
    let moe_layers = (0..hp.n_layer).filter(|&l| hp.is_moe_layer(l)).count() as u64;
    let mut counts = Vec::new();
    for choice in [ReplicaChoice::Layer, ReplicaChoice::Load] {
        let mut opts = options(2, TransportKind::Inproc);
        opts.replicas = 2;
        opts.replica_choice = choice;
        let d = open(&model, &opts);
        let got = d.engine.eval(&prompt).unwrap();
        let diff = max_abs(&got, &want);
        assert!(diff <= PLAN_TOLERANCE, "{choice:?}: max |Δ| {diff}");
        assert_eq!(
            greedy(&d.engine, &prompt, N_GREEDY),
            want_greedy,
            "{choice:?}"
        );
        let stats: Vec<(u64, u64)> = d
            .engine
            .experts()
            .node_stats()
            .into_iter()
            .map(|(_, s)| {
                let s = s.unwrap();
                (s.dispatches, s.assignments)
            })
            .collect();
        eprintln!("{choice:?}: (dispatches, assignments) per node {stats:?}");
        counts.push(stats);
    }
    // Steps: the eval, then the greedy run's prompt and its N_GREEDY - 1 decode steps.
    let layer_steps = (2 + N_GREEDY as u64 - 1) * moe_layers;
    let dispatches = |c: &[(u64, u64)]| c.iter().map(|x| x.0).sum::<u64>();
    assert!(dispatches(&counts[0]) >= layer_steps);
    assert!(
        dispatches(&counts[1]) > dispatches(&counts[0]),
        "{counts:?}"
    );
    assert!(
        dispatches(&counts[1]) >= layer_steps * 19 / 10,
        "load choice: both nodes in (nearly) every step: {:?}",
        counts[1]
    );
    let (a, b) = (counts[1][0].1 as f64, counts[1][1].1 as f64);
    assert!(
        a.min(b) / a.max(b) > 0.6,
        "load choice: assignments {a} vs {b}"
    );
}

/// The fixtures' K-quant experts are one `ffn_down` block wide (they cannot be cut): a
/// synthetic Qwen3-30B-A3B layer (expert FFN 768 = three Q4_K blocks, down Q6_K) with its
/// experts sliced over 2 and 3 nodes gives the single-process logits bit for bit — the
/// two rounds with repacked Q4_K gate/up rows and Q6_K down rows cut at multiples of 16.
#[test]
fn k_quant_experts_sliced_over_nodes_are_exact() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("qwen3-30b-1l.gguf");
    synth_qwen3_q4_k_m(&model, 7);
    // 12 tokens: the prompt's experts get one to several tokens each (several kernel orders).
    let prompt: Vec<u32> = (0..12).map(|i| (i * 37 + 5) % 512).collect();
    let single = Engine::open(&model).unwrap();
    let want = single.eval(&prompt).unwrap();
    let want_greedy = greedy(&single, &prompt, 4);
    for (n, transport) in [(2, TransportKind::Inproc), (3, TransportKind::Grpc)] {
        let mut opts = options(n, transport);
        opts.experts = ExpertPlacement::Sliced;
        let d = open(&model, &opts);
        let got = d.engine.eval(&prompt).unwrap();
        let diff = max_abs(&got, &want);
        eprintln!("synthetic Qwen3 Q4_K_M sliced x{n}: max |Δ| vs single process = {diff:.2e}");
        check_logits(&got, &want, true, &format!("sliced x{n}"));
        assert_eq!(greedy(&d.engine, &prompt, 4), want_greedy, "x{n}");
    }
}

/// A thin slice of a wide expert holds no row of `ffn_down`: Qwen3-235B-A22B's experts (FFN
/// 1536) on a hidden size of 256, node0 holding intermediate rows 0..32 of every expert
/// (32·256/1536 ≈ 5 rows of down, which rounds to none) and node1 the rest. node0 answers
/// the SwiGLU round and is left out of the down round (nothing to add), node1 answers both;
/// the logits and greedy tokens are still the single-process engine's, bit for bit.
#[test]
fn thin_slice_without_down_rows_skips_the_down_round() {
    use coordinator::synth::{self, SynthConfig};
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("qwen3-235b-2l.gguf");
    let cfg = SynthConfig {
        shape: "qwen3-235b-a22b".into(),
        quant: "Q8_0".into(),
        layers: Some(2),
        vocab: Some(512),
        experts: Some(16),
        hidden: Some(256),
        seed: 11,
        header_only: false,
        threads: None,
        out: model.clone(),
    };
    synth::synth(&cfg, &mut |_, _| {}).unwrap();
    let shape = ModelShape::from_gguf(&GgufFile::open(&model).unwrap()).unwrap();
    let routed = shape.part(0, shared::placement::Part::Routed).unwrap();
    assert_eq!(routed.n_ff, 1536);
    assert!(shared::placement::slice_down_rows(0, 32, 1536, 256).is_empty());

    let plan = tmp.path().join("plan.toml");
    std::fs::write(
        &plan,
        "version = 1\nnodes = [\"node0\", \"node1\"]\n\
         [[place]]\npart = \"routed\"\nlayers = \"0-1\"\nexperts = \"0-15\"\nff = [0, 32]\nnodes = [\"node0\"]\n\
         [[place]]\npart = \"routed\"\nlayers = \"0-1\"\nexperts = \"0-15\"\nff = [32, 1536]\nnodes = [\"node1\"]\n",
    )
    .unwrap();

    let prompt: Vec<u32> = (0..10).map(|i| (i * 53 + 3) % 512).collect();
    let single = Engine::open(&model).unwrap();
    assert_eq!(single.model().hparams().n_embd, 256);
    let want = single.eval(&prompt).unwrap();
    let want_greedy = greedy(&single, &prompt, 4);
    for transport in TRANSPORTS {
        let d = open(
            &model,
            &DistOptions {
                plan: Some(plan.clone()),
                ..options(2, transport)
            },
        );
        let got = d.engine.eval(&prompt).unwrap();
        check_logits(&got, &want, true, &format!("{transport:?}, thin slice"));
        assert_eq!(greedy(&d.engine, &prompt, 4), want_greedy, "{transport:?}");
        let stats: Vec<u64> = (d.engine.experts().node_stats().into_iter())
            .map(|(_, s)| s.unwrap().dispatches)
            .collect();
        eprintln!("{transport:?}: dispatches per node {stats:?}");
        // Steps: the eval, the greedy prompt and 3 decode steps, 2 layers each: node0 one
        // dispatch per layer step (SwiGLU), node1 two (SwiGLU, then down).
        let layer_steps = (2 + 3) * 2;
        assert_eq!(stats, vec![layer_steps, 2 * layer_steps], "{transport:?}");
    }
}

/// A sliced layer's two rounds cut into chunks of whole experts (what the protocol's limits
/// force on big batches: DeepSeek-V3 at 512 tokens makes two), here 3 assignments at most
/// per chunk: every expert's tokens stay together, so the logits are still the
/// single-process engine's, bit for bit.
#[test]
fn sliced_rounds_in_chunks_are_exact() {
    for (arch, variant) in [("mixtral", "f16"), ("deepseek2", "q8_0")] {
        let dir = fixtures().join(arch);
        let prompt = ids(&read_json(&dir.join("reference.json"))["prompt_tokens"]);
        let model = dir.join(format!("model-{variant}.gguf"));
        let single = Engine::open(&model).unwrap();
        let want = single.eval(&prompt).unwrap();
        let mut opts = options(2, TransportKind::Grpc);
        opts.experts = ExpertPlacement::Sliced;
        opts.slice_chunk_slots = Some(3);
        let d = open(&model, &opts);
        let got = d.engine.eval(&prompt).unwrap();
        check_logits(
            &got,
            &want,
            true,
            &format!("{arch} {variant} sliced, chunks of 3"),
        );
        assert_eq!(
            greedy(&d.engine, &prompt, 8),
            greedy(&single, &prompt, 8),
            "{arch} {variant}"
        );
    }
}
