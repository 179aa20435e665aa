//! What every fault test does: two expert nodes serving an even plan of the qwen3moe Q8_0
//! fixture, coordinators connected to them through cluster files (directly, or with a
//! proxy in front of a node), and the output of a run compared with the undisturbed one.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use coordinator::distributed::connect::{open_distributed, DistOptions, DistributedEngine};
use coordinator::distributed::DeadlinePolicy;
use coordinator::engine::Engine;
use coordinator::sampler::{Sampler, SamplerConfig};
use shared::gguf::{model_identity, GgufFile};
use shared::placement::{ModelShape, Plan};
use tests::{fixtures, NodeProcess, NodeProgram, NodeSpec, Transport};

/// Tokens generated per run: enough for several decode steps, little time.
pub(crate) const N_TOKENS: usize = 8;

/// How much later than its deadline a failed step may report (scheduling on a loaded
/// 2-core CI machine; the deadline itself is the product's promise).
pub(crate) const DEADLINE_MARGIN: Duration = Duration::from_millis(1500);

pub(crate) const NODE_NAMES: [&str; 2] = ["node0", "node1"];

pub(crate) fn model() -> PathBuf {
    fixtures().join("qwen3moe/model-q8_0.gguf")
}

/// The fixture's 24-token prompt: with it every node gets work in every layer.
pub(crate) fn prompt() -> Vec<u32> {
    let path = fixtures().join("qwen3moe/reference.json");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    json["prompt_tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_u64().unwrap() as u32)
        .collect()
}

/// The node daemon: this crate's `moeshard-test-node` (the `expert-node` code of this tree,
/// built by `cargo test -p tests`), or `$MOESHARD_BIN expert-node` when that is set (to run
/// the suite against a given `moeshard` binary).
pub(crate) fn node_program() -> NodeProgram {
    match std::env::var_os("MOESHARD_BIN") {
        Some(path) => NodeProgram {
            path: path.into(),
            args: vec!["expert-node".into()],
        },
        None => NodeProgram {
            path: env!("CARGO_BIN_EXE_moeshard-test-node").into(),
            args: Vec::new(),
        },
    }
}

/// What a run produced: the prompt's logits (every position, one batch) and the greedy
/// continuation.
#[derive(Clone, Debug)]
pub(crate) struct Output {
    pub logits: Vec<f32>,
    pub tokens: Vec<u32>,
}

/// The single-process engine's greedy tokens (the 2-node plan regroups float sums, so only
/// the tokens are compared with it; runs of the same plan are compared bit for bit).
pub(crate) fn single_process_tokens() -> &'static [u32] {
    static TOKENS: OnceLock<Vec<u32>> = OnceLock::new();
    TOKENS.get_or_init(|| {
        let engine = Engine::open(&model()).unwrap();
        greedy(&engine, |_| {}).unwrap()
    })
}

/// Greedy generation of [`N_TOKENS`] after the prompt; `on_token(i)` runs after the i-th
/// token (0-based), before the next step is computed.
pub(crate) fn greedy(engine: &Engine, mut on_token: impl FnMut(usize)) -> Result<Vec<u32>, String> {
    let prompt = prompt();
    let mut sampler = Sampler::new(SamplerConfig::greedy());
    let mut i = 0;
    engine
        .generate(
            &prompt,
            N_TOKENS,
            prompt.len() + N_TOKENS,
            &mut sampler,
            |_| {
                on_token(i);
                i += 1;
                true
            },
        )
        .map(|(tokens, _)| tokens)
        .map_err(|e| e.to_string())
}

/// The prompt's logits and the greedy continuation, and how long both took.
pub(crate) fn run(engine: &Engine) -> Result<(Output, Duration), String> {
    let t0 = Instant::now();
    let logits = engine.eval(&prompt()).map_err(|e| e.to_string())?;
    let tokens = greedy(engine, |_| {})?;
    Ok((Output { logits, tokens }, t0.elapsed()))
}

/// `got` is `want` bit for bit: same tokens, same logits.
pub(crate) fn assert_identical(got: &Output, want: &Output, what: &str) {
    assert_eq!(got.tokens, want.tokens, "{what}: greedy tokens");
    assert_eq!(got.logits.len(), want.logits.len(), "{what}: logits");
    let differ = got
        .logits
        .iter()
        .zip(&want.logits)
        .filter(|(a, b)| a.to_bits() != b.to_bits())
        .count();
    assert_eq!(
        differ, 0,
        "{what}: {differ} logits differ from the undisturbed run"
    );
}

/// Dispatches node `index` has answered so far (its own counter, asked over the link).
pub(crate) fn dispatches(d: &DistributedEngine, index: usize) -> u64 {
    let stats = d.engine.experts().node_stats();
    match &stats[index].1 {
        Ok(s) => s.dispatches,
        Err(e) => panic!("stats of {}: {e}", stats[index].0),
    }
}

/// Two node processes serving the even plan of [`model`] (experts 0-3 on node0, 4-7 on
/// node1 in every layer), killed on drop.
pub(crate) struct TwoNodes {
    pub dir: tempfile::TempDir,
    pub plan: PathBuf,
    pub nodes: Vec<NodeProcess>,
    clusters: AtomicUsize,
}

impl TwoNodes {
    pub(crate) fn start(transport: Transport) -> TwoNodes {
        TwoNodes::start_with(transport, None)
    }

    /// With the plan `plan_text` (TOML; its `model_identity` is the model's) instead of the
    /// even one.
    pub(crate) fn start_with(transport: Transport, plan_text: Option<&str>) -> TwoNodes {
        let dir = tempfile::Builder::new()
            .prefix("moeshard-faults-")
            .tempdir()
            .unwrap();
        let plan = match plan_text {
            Some(text) => {
                let path = dir.path().join("plan.toml");
                std::fs::write(&path, text).unwrap();
                path
            }
            None => write_plan(dir.path()),
        };
        let nodes = NODE_NAMES
            .iter()
            .map(|name| {
                NodeProcess::spawn(&node_spec(name, transport, dir.path(), &plan))
                    .unwrap_or_else(|e| panic!("{e}"))
            })
            .collect();
        TwoNodes {
            dir,
            plan,
            nodes,
            clusters: AtomicUsize::new(0),
        }
    }

    /// A cluster file naming both nodes, each at its own address or at `via[i]` (a proxy).
    pub(crate) fn cluster_file(&self, via: [Option<SocketAddr>; 2]) -> PathBuf {
        let entries: Vec<String> = self
            .nodes
            .iter()
            .zip(via)
            .map(|(n, v)| n.cluster_entry(v))
            .collect();
        let k = self.clusters.fetch_add(1, Ordering::Relaxed);
        let path = self.dir.path().join(format!("cluster{k}.toml"));
        std::fs::write(&path, entries.join("\n")).unwrap();
        path
    }

    /// A coordinator connected to the nodes (through `via` where given).
    pub(crate) fn open(
        &self,
        via: [Option<SocketAddr>; 2],
        deadline: Duration,
    ) -> DistributedEngine {
        open_cluster(&self.cluster_file(via), &self.plan, deadline)
    }
}

/// The spec of one node of [`TwoNodes`]'s plan, on loopback.
pub(crate) fn node_spec(name: &str, transport: Transport, dir: &Path, plan: &Path) -> NodeSpec {
    NodeSpec {
        program: node_program(),
        name: name.into(),
        model: model(),
        plan: Some(plan.to_path_buf()),
        experts: None,
        transport,
        listen: "127.0.0.1:0".parse().unwrap(),
        dir: dir.to_path_buf(),
        wrapper: Vec::new(),
        threads: 1,
    }
}

/// The even plan of the two nodes, for this model, as a file.
pub(crate) fn write_plan(dir: &Path) -> PathBuf {
    let file = GgufFile::open(model()).unwrap();
    let shape = ModelShape::from_gguf(&file).unwrap();
    let names: Vec<String> = NODE_NAMES.iter().map(|n| n.to_string()).collect();
    let mut plan = Plan::even(&names, &shape, false);
    plan.model_identity = Some(model_identity(&file));
    let path = dir.join("plan.toml");
    plan.save(&path).unwrap();
    path
}

pub(crate) fn open_cluster(cluster: &Path, plan: &Path, deadline: Duration) -> DistributedEngine {
    let opts = DistOptions {
        cluster: Some(cluster.to_path_buf()),
        plan: Some(plan.to_path_buf()),
        deadline: DeadlinePolicy::Fixed(deadline),
        ..DistOptions::default()
    };
    open_distributed(&model(), &opts).unwrap_or_else(|e| panic!("connecting: {e}"))
}

/// Prints a line of the suite's record (shown with `--nocapture`, and on failure).
pub(crate) fn note(test: &str, text: impl std::fmt::Display) {
    eprintln!("[{test}] {text}");
}
