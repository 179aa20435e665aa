//! `moeshard`: the user-facing command line. Thin: parses arguments, sets up
//! logging, calls into the `coordinator` library and maps errors to exit codes.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};
use coordinator::chat_template::ChatTemplate;
use coordinator::engine::Engine;
use coordinator::sampler::{Sampler, SamplerConfig};
use coordinator::tokenizer::{StreamDecoder, Tokenizer};
use shared::gguf::GgufFile;

/// moeshard: serve huge mixture-of-experts models from CPU memory across NUMA sockets and hosts
#[derive(Parser, Debug)]
#[command(name = "moeshard", version, about, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Describe a GGUF model file from its header: architecture, hyperparameters, tensor types, expert sizes
    Inspect {
        /// The GGUF file (for a split model, its first part)
        file: PathBuf,
        /// Print one JSON object instead of text
        #[arg(long)]
        json: bool,
    },
    /// Evaluate tokens as one batch from an empty cache and write every position's logits
    Eval {
        #[arg(long, short = 'm')]
        model: PathBuf,
        /// Comma-separated token ids
        #[arg(long, value_delimiter = ',', required = true)]
        tokens: Vec<u32>,
        /// Output safetensors file with one f32 tensor `logits` [n_tokens, n_vocab]
        #[arg(long)]
        logits_out: PathBuf,
        /// Write the tokens routed to each expert of each layer to this JSON file (docs/placement.md)
        #[arg(long, value_name = "FILE")]
        record_routing: Option<PathBuf>,
        #[command(flatten)]
        dist: DistArgs,
    },
    /// Generate text from a prompt (single process, or with the experts on nodes: --nodes, --cluster)
    Generate(GenerateArgs),
    /// Run an expert-node daemon (the same as `moeshard-expert-node`)
    ExpertNode(expert_node::NodeArgs),
    /// Describe the machine: packages, NUMA nodes, persistent memory, and the pinning plan
    Topology {
        /// Print one JSON object instead of text
        #[arg(long)]
        json: bool,
        /// Describe this one instead of this machine: `synthetic:<hwloc synthetic
        /// description>` (e.g. "synthetic:pack:2 numa:1 core:4 pu:1") or `xml:<hwloc XML file>`
        #[arg(long)]
        topology: Option<String>,
    },
    /// Tokenize text with the model's tokenizer
    Tokenize {
        #[arg(long, short = 'm')]
        model: PathBuf,
        #[arg(long)]
        text: String,
        /// Do not add the BOS token even if the model asks for it
        #[arg(long)]
        no_bos: bool,
        /// Treat special-token text (e.g. <|im_start|>) as plain text
        #[arg(long)]
        no_parse_special: bool,
        /// Print only the ids, as a list
        #[arg(long)]
        ids: bool,
        /// Print {"tokens": [...]}
        #[arg(long)]
        json: bool,
    },
    /// Measure prompt and decode speed next to the memory-bandwidth bound
    Bench {
        #[arg(long, short = 'm')]
        model: PathBuf,
        /// Worker threads (default: all cores)
        #[arg(long, short = 't')]
        threads: Option<usize>,
        /// Prompt tokens
        #[arg(short = 'p', long = "n-prompt", default_value_t = 128)]
        n_prompt: usize,
        /// Decoded tokens
        #[arg(short = 'n', long = "n-gen", default_value_t = 64)]
        n_gen: usize,
        /// Repetitions (median and min are reported)
        #[arg(long, short = 'r', default_value_t = 3)]
        reps: usize,
        /// Also decode with this many sequences stepping together (comma-separated, e.g.
        /// 1,4,8): aggregate generation tokens/s (continuous batching)
        #[arg(long, value_delimiter = ',')]
        parallel: Vec<usize>,
        /// Also profile one decode pass: per token, the wall time of attention, router,
        /// FFN/experts and the rest, and per thread the time in work and idle
        #[arg(long)]
        profile: bool,
        /// Print one JSON object
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        dist: DistArgs,
    },
    /// Render a chat template for a list of messages (like llama-server's /apply-template)
    Template {
        /// Take the template (and BOS/EOS tokens) from this model's metadata
        #[arg(
            long,
            short = 'm',
            conflicts_with = "template",
            required_unless_present = "template"
        )]
        model: Option<PathBuf>,
        /// A Jinja template file
        #[arg(long)]
        template: Option<PathBuf>,
        /// JSON file: an OpenAI-style messages list, or an object with "messages" (and "tools")
        #[arg(long)]
        messages: PathBuf,
        /// Do not append the assistant prompt
        #[arg(long)]
        no_generation_prompt: bool,
        /// Template variable NAME=VALUE (VALUE parsed as JSON when it is valid JSON)
        #[arg(long = "var", value_name = "NAME=VALUE")]
        vars: Vec<String>,
    },
    /// Write a GGUF with random weights in a real model's exact shapes (for benchmarks and planning)
    Synth {
        /// Model shape: deepseek-v3, kimi-k2, glm-4.5, qwen3-235b-a22b, qwen3-30b-a3b, mixtral-8x7b
        #[arg(long)]
        shape: String,
        /// Weight type for every matrix (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q3_K, Q4_K, Q5_K, Q6_K) or a llama-quantize mix (Q4_K_M, Q3_K_M, Q2_K)
        #[arg(long)]
        quant: String,
        /// Keep only the first N layers
        #[arg(long)]
        layers: Option<usize>,
        /// Vocabulary size instead of the model's
        #[arg(long)]
        vocab: Option<usize>,
        /// Routed experts per MoE layer instead of the model's (top-k kept)
        #[arg(long)]
        experts: Option<usize>,
        /// Write only the header: every tensor's data is left a hole (a sparse file reading as
        /// zeros), for `plan` and `inspect` on models larger than the disk
        #[arg(long)]
        header_only: bool,
        /// Seed of the random weights (same seed, same bytes)
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Worker threads (default: all cores; the output does not depend on it)
        #[arg(long, short = 't')]
        threads: Option<usize>,
        /// Output GGUF file
        #[arg(long)]
        out: PathBuf,
    },
    /// Write one GGUF per node holding only that node's slices of a model (see docs/placement.md)
    Split(SplitArgs),
    /// Write a copy of a model with its Q4_K matrices interleaved by eight rows (Q4_K_R8), which
    /// the one-token kernel reads zero-copy and faster; same results (README: Useful knobs)
    Convert {
        /// The model (GGUF; for a split model, its first part)
        #[arg(long, short = 'm')]
        model: PathBuf,
        /// Interleave Q4_K matrices of a multiple of 8 rows (the one conversion there is)
        #[arg(long, required = true)]
        repack: bool,
        /// Output GGUF file (written as <out>.tmp, renamed when complete); only moeshard reads it
        #[arg(long)]
        out: PathBuf,
    },
    /// Serve an OpenAI-compatible HTTP API (chat and text completions, streaming, /health, /metrics)
    Serve(ServeArgs),
    /// Plan where experts go: compare sliced and whole-expert placements by predicted step time and write the fastest (docs/placement.md)
    Plan(PlanArgs),
    /// Create the cluster's CA and its certificates for mutual TLS between the coordinator and its nodes (docs/security.md)
    Certs {
        #[command(subcommand)]
        action: coordinator::certs::CertsCommand,
    },
}

#[derive(Args, Debug)]
struct PlanArgs {
    /// The model (GGUF; for a split model, its first part); only its header is read
    #[arg(long, short = 'm')]
    model: PathBuf,
    /// The cluster file (TOML): nodes with memory_bytes and read_bandwidth_gbs
    #[arg(
        long,
        required_unless_present = "topology",
        conflicts_with = "topology"
    )]
    cluster: Option<PathBuf>,
    /// Instead of a cluster file, one node per NUMA node of this topology (`synthetic:<hwloc
    /// description>`, `xml:<file>`, or `this` for this machine), named node0, node1… as
    /// `--numa auto` names them, each with its own cores (unless --cores) and the memory and
    /// bandwidth of --node-memory and --node-gbs
    #[arg(long, value_name = "SPEC")]
    topology: Option<String>,
    /// With --topology: memory for weights per node (e.g. 768G; default: the NUMA node's memory)
    #[arg(long, value_name = "BYTES", requires = "topology")]
    node_memory: Option<String>,
    /// With --topology: read bandwidth of each node's weights, GB/s
    #[arg(long, value_name = "GBS", requires = "topology")]
    node_gbs: Option<f64>,
    /// Routing statistics (JSON) recorded with --record-routing
    #[arg(long, value_name = "FILE", conflicts_with = "zipf")]
    routing_stats: Option<PathBuf>,
    /// Without statistics: Zipf routing with this exponent over each layer's experts (default: uniform)
    #[arg(long, value_name = "S")]
    zipf: Option<f64>,
    /// Bytes to spend on replicas of hot experts (e.g. 4G, 512MiB)
    #[arg(long, value_name = "BYTES", default_value = "0")]
    replicate: String,
    /// Sequences decoded together
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Write the plan (TOML) here; without it the plan is printed after the summary
    #[arg(long)]
    out: Option<PathBuf>,
    /// Print one JSON object (the summary, and the plan as TOML text)
    #[arg(long)]
    json: bool,
    /// Monte Carlo steps per candidate
    #[arg(long, default_value_t = shared::placement::planner::DEFAULT_SAMPLES)]
    samples: usize,
    /// Seed of the sampled steps (and of the Zipf ranks)
    #[arg(long, default_value_t = 0x5eed)]
    seed: u64,
    /// Cores computing experts on each node (default: compute is not a limit)
    #[arg(long)]
    cores: Option<usize>,
    /// Kernel rate, GB/s of weights per core, for every quant type (default: per family, DESIGN.md)
    #[arg(long, value_name = "GBS")]
    kernel_gbs: Option<f64>,
    /// The coordinator's read bandwidth for the dense part, GB/s
    #[arg(long, value_name = "GBS", default_value_t = shared::placement::planner::DEFAULT_READ_BANDWIDTH_GBS)]
    coordinator_gbs: f64,
    /// The coordinator's cores (default: compute is not a limit)
    #[arg(long)]
    coordinator_cores: Option<usize>,
    /// One dispatch round trip, µs: paid once per MoE layer with whole experts, twice with
    /// sliced ones (default: gRPC on loopback; over a network give the measured figure)
    #[arg(long, value_name = "US", default_value_t = shared::placement::planner::DEFAULT_ROUND_TRIP_S * 1e6)]
    round_trip_us: f64,
}

#[derive(Args, Debug)]
struct SplitArgs {
    /// The model (GGUF; for a split model, its first part)
    #[arg(long, short = 'm')]
    model: PathBuf,
    /// The plan file (TOML) placing the slices on nodes
    #[arg(long)]
    plan: PathBuf,
    /// Output directory (created if missing); files are named <model stem>.<node>.gguf
    #[arg(long)]
    out: PathBuf,
    /// Write only this node's file
    #[arg(long)]
    node: Option<String>,
}

#[derive(Args, Debug)]
struct GenerateArgs {
    #[arg(long, short = 'm')]
    model: PathBuf,
    /// Prompt text (tokenized with the model's tokenizer, special tokens parsed)
    #[arg(
        long,
        short = 'p',
        conflicts_with = "tokens",
        required_unless_present = "tokens"
    )]
    prompt: Option<String>,
    /// Prompt as comma-separated token ids, taken exactly as given (no BOS added)
    #[arg(long, value_delimiter = ',')]
    tokens: Option<Vec<u32>>,
    /// Number of tokens to generate
    #[arg(short = 'n', long = "n-predict", default_value_t = 128)]
    n_predict: usize,
    /// Temperature; 0 is greedy
    #[arg(long, default_value_t = 0.8)]
    temp: f32,
    #[arg(long, default_value_t = 40)]
    top_k: usize,
    #[arg(long, default_value_t = 0.95)]
    top_p: f32,
    #[arg(long, default_value_t = 0.05)]
    min_p: f32,
    #[arg(long, default_value_t = 1.0)]
    repeat_penalty: f32,
    #[arg(long, default_value_t = 64)]
    repeat_last_n: usize,
    #[arg(long, short = 's', default_value_t = 0x5EED)]
    seed: u64,
    /// Wrap the prompt in the model's chat template as a user message
    #[arg(long)]
    chat: bool,
    /// Optional system message for --chat
    #[arg(long)]
    system: Option<String>,
    /// Keep generating after an end-of-generation token
    #[arg(long)]
    ignore_eos: bool,
    /// Context size (default: prompt + n)
    #[arg(long, short = 'c')]
    ctx_size: Option<usize>,
    /// Print one JSON object with `tokens` and `text` instead of streaming text
    #[arg(long)]
    json: bool,
    /// Write the tokens routed to each expert of each layer to this JSON file (docs/placement.md)
    #[arg(long, value_name = "FILE")]
    record_routing: Option<PathBuf>,
    #[command(flatten)]
    dist: DistArgs,
}

#[derive(Args, Debug)]
struct ServeArgs {
    #[arg(long, short = 'm')]
    model: PathBuf,
    /// Address to listen on
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Port to listen on (0: any free port; the address is printed once the model is loaded)
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Require `Authorization: Bearer KEY` on /v1/*
    #[arg(long, value_name = "KEY")]
    api_key: Option<String>,
    /// Positions per sequence (default: 4096, or the model's training context if smaller)
    #[arg(long, short = 'c')]
    ctx_size: Option<usize>,
    /// Sequences generated at once (each with its own KV cache)
    #[arg(long, default_value_t = 4)]
    parallel: usize,
    /// The most prompt tokens a sequence evaluates per step
    #[arg(long, default_value_t = 256)]
    prefill_chunk: usize,
    /// The model's name in /v1/models (default: the file name without .gguf)
    #[arg(long)]
    alias: Option<String>,
    #[command(flatten)]
    dist: DistArgs,
}

/// Where the routed experts run (default: in this process).
#[derive(Args, Debug, Clone)]
struct DistArgs {
    /// Start N expert nodes on this machine (loopback) with an even plan (or --plan's)
    #[arg(long)]
    nodes: Option<usize>,
    /// Transport to the loopback nodes: grpc, quic, or inproc (nodes inside this process)
    #[arg(long, default_value = "grpc")]
    transport: proto::transport::TransportKind,
    /// Connect to running expert-node daemons listed in this cluster file (TOML, docs/placement.md)
    #[arg(long, conflicts_with = "nodes")]
    cluster: Option<PathBuf>,
    /// Placement plan (TOML, docs/placement.md); default: an even plan over the nodes
    #[arg(long)]
    plan: Option<PathBuf>,
    /// In the even plan, also slice dense FFNs and shared experts over the nodes (always
    /// done for a dense model)
    #[arg(long)]
    split_dense: bool,
    /// How long a node may take to answer one dispatch before it is marked down (its work
    /// re-sent to replicas, or the step failing naming it): `auto` — 10× the node's recent
    /// dispatch times for that many tokens, at least 2 s (30 s until it has answered) — or a
    /// fixed number of seconds
    #[arg(long, default_value = "auto")]
    dispatch_timeout: String,
    /// In the even plan, place every (whole) expert on this many nodes: with 2, any one
    /// node can die without losing an expert
    #[arg(long, default_value_t = 1)]
    replicas: usize,
    /// When an expert has no live node, drop it from the tokens routed to it (their other
    /// experts renormalized; counted in /metrics, logged as an error) instead of failing
    #[arg(long)]
    degraded: bool,
    /// Which replica of a replicated expert serves a step: `layer` (replicas take turns from
    /// layer to layer; a sequence's results do not depend on the rest of the batch) or `load`
    /// (per step, balancing the bytes each node reads; results then vary within float
    /// regrouping with the batch)
    #[arg(long, value_parser = ["layer", "load"], default_value = "layer")]
    replica_choice: String,
    /// In the even plan, slice every routed expert over all nodes (at quant-block
    /// boundaries): balanced at any batch size, exact (two rounds per MoE layer). The
    /// default, unless --replicas or --degraded asks for whole experts
    #[arg(long, conflicts_with = "whole_experts")]
    slice_experts: bool,
    /// In the even plan, place whole experts, split evenly between the nodes (one round per
    /// MoE layer; a step waits for the node its tokens picked most experts on)
    #[arg(long)]
    whole_experts: bool,
    /// `auto`: one expert node per NUMA node, pinned to its cores and memory, every expert
    /// sliced over them (the dual-socket setup in one command)
    #[arg(long, value_parser = ["auto", "off"], default_value = "off")]
    numa: String,
    /// The topology --numa auto plans for: `synthetic:<hwloc description>` or `xml:<file>`
    /// (default: this machine)
    #[arg(long)]
    topology: Option<String>,
    /// With --numa auto: one model file per NUMA node, in node order (`moeshard split` files,
    /// each on its socket's memory), comma-separated
    #[arg(long, value_delimiter = ',')]
    model_per_node: Vec<PathBuf>,
}

impl DistArgs {
    fn options(&self) -> anyhow::Result<coordinator::distributed::connect::DistOptions> {
        let deadline = match self.dispatch_timeout.as_str() {
            "auto" => coordinator::distributed::DeadlinePolicy::default(),
            secs => match secs.parse::<f64>() {
                Ok(v) if v > 0.0 && v.is_finite() && v < 1e9 => {
                    coordinator::distributed::DeadlinePolicy::Fixed(
                        std::time::Duration::from_secs_f64(v),
                    )
                }
                _ => bail!(
                    "--dispatch-timeout must be `auto` or a positive number of seconds, not {secs:?}"
                ),
            },
        };
        if self.replicas == 0 {
            bail!("--replicas must be at least 1");
        }
        Ok(coordinator::distributed::connect::DistOptions {
            nodes: self.nodes,
            transport: self.transport,
            cluster: self.cluster.clone(),
            plan: self.plan.clone(),
            split_dense: self.split_dense,
            deadline,
            replicas: self.replicas,
            degraded: self.degraded,
            replica_choice: match self.replica_choice.as_str() {
                "load" => coordinator::distributed::ReplicaChoice::Load,
                _ => coordinator::distributed::ReplicaChoice::Layer,
            },
            launch: None,
            experts: if self.slice_experts {
                coordinator::distributed::connect::ExpertPlacement::Sliced
            } else if self.whole_experts {
                coordinator::distributed::connect::ExpertPlacement::Whole
            } else {
                coordinator::distributed::connect::ExpertPlacement::Auto
            },
            slice_chunk_slots: None,
            numa_auto: self.numa == "auto",
            topology: self.topology.clone(),
            model_per_node: self.model_per_node.clone(),
        })
    }
}

/// An engine and, in loopback mode, the node processes it uses (stopped when dropped).
struct Loaded {
    engine: Engine,
    _nodes: Option<coordinator::distributed::launcher::LocalNodes>,
}

impl std::ops::Deref for Loaded {
    type Target = Engine;
    fn deref(&self) -> &Engine {
        &self.engine
    }
}

/// The single-process engine, or one whose experts run on nodes.
fn open_engine_dist(path: &Path, dist: &DistArgs) -> anyhow::Result<Loaded> {
    let opts = dist.options()?;
    if !opts.is_distributed() {
        return Ok(Loaded {
            engine: open_engine(path)?,
            _nodes: None,
        });
    }
    let d = coordinator::distributed::connect::open_distributed(path, &opts)
        .with_context(|| format!("placing the experts of {} on nodes", path.display()))?;
    Ok(Loaded {
        engine: d.engine,
        _nodes: d.local_nodes,
    })
}

fn main() -> ExitCode {
    init_tracing();
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Inspect { file, json } => {
            let summary = coordinator::inspect::summarize(&file)
                .with_context(|| format!("reading {}", file.display()))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&summary)?);
            } else {
                print!("{}", coordinator::inspect::render_text(&summary));
            }
            Ok(())
        }
        Command::Eval {
            model,
            tokens,
            logits_out,
            record_routing,
            dist,
        } => {
            let engine = open_engine_dist(&model, &dist)?;
            let logits = engine.eval(&tokens).context("evaluating tokens")?;
            if let Some(path) = &record_routing {
                save_routing(&engine, path)?;
            }
            let n_vocab = engine.model().hparams().n_vocab;
            coordinator::safetensors_out::write_f32(
                &logits_out,
                "logits",
                &[tokens.len(), n_vocab],
                &logits,
            )
            .with_context(|| format!("writing {}", logits_out.display()))?;
            eprintln!(
                "wrote logits [{}, {}] to {}",
                tokens.len(),
                n_vocab,
                logits_out.display()
            );
            Ok(())
        }
        Command::Generate(args) => generate(args),
        Command::Serve(args) => serve(args),
        Command::Topology { json, topology } => {
            let topology = shared::topology::Topology::from_spec_or_detect(topology.as_deref())?;
            let plan = topology.node_plan(topology.compute_nodes().len().max(1));
            if json {
                let mut value = serde_json::to_value(&topology)?;
                value["node_plan"] = serde_json::to_value(plan.as_ref().ok())?;
                println!("{}", serde_json::to_string_pretty(&value)?);
            } else {
                print!("{}", topology.to_text());
                match plan {
                    Ok(plan) => print!("{}", plan.to_text()),
                    Err(e) => println!("plan: none ({e})"),
                }
            }
            Ok(())
        }
        Command::ExpertNode(args) => {
            let core = expert_node::daemon::load(&args)?;
            expert_node::daemon::serve(&args, core, |transport, addr| {
                // The one line on stdout: the loopback launcher reads the bound address from it.
                println!("moeshard-expert-node listening on {transport}://{addr}");
            })?;
            Ok(())
        }
        Command::Bench {
            model,
            threads,
            n_prompt,
            n_gen,
            reps,
            parallel,
            profile,
            json,
            dist,
        } => {
            if n_prompt == 0 || reps == 0 {
                bail!("-p and --reps must be at least 1");
            }
            let threads = threads
                .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
            if threads == 0 {
                bail!("--threads must be at least 1");
            }
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .thread_name(|i| format!("worker-{i}"))
                .build()
                .context("starting worker threads")?;
            let engine = open_engine_dist(&model, &dist)?;
            let cfg = coordinator::bench::BenchConfig {
                n_prompt,
                n_decode: n_gen,
                reps,
                bandwidth_buffer: 1 << 30,
                parallel,
                profile,
            };
            let name = model.display().to_string();
            let r = pool
                .install(|| coordinator::bench::run(&engine, &name, &cfg))
                .context("benchmarking")?;
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                println!("model            {}", r.model);
                println!("threads          {} ({} kernels)", r.threads, r.kernels);
                println!(
                    "prompt  (pp{:<4}) {:>9.1} tok/s median, {:.1} min",
                    r.n_prompt, r.prompt_tps, r.prompt_tps_min
                );
                println!(
                    "decode  (tg{:<4}) {:>9.1} tok/s median, {:.1} min",
                    r.n_decode, r.decode_tps, r.decode_tps_min
                );
                println!("read bandwidth   {:>9.1} GB/s", r.bandwidth_gbs);
                println!(
                    "bytes per token  {:>9.1} MB",
                    r.bytes_per_token as f64 / 1e6
                );
                println!(
                    "bandwidth bound  {:>9.1} tok/s (decode at {:.0}% of it)",
                    r.bound_tps,
                    100.0 * r.fraction_of_bound
                );
                println!("peak RSS         {:>9.1} MB", r.peak_rss_bytes as f64 / 1e6);
                for p in &r.parallel {
                    println!(
                        "decode x{:<3}      {:>9.1} tok/s for all sequences ({:.2}x batch 1)",
                        p.sequences, p.decode_tps, p.speedup
                    );
                }
                for p in r.profile.iter().chain(&r.profile_parallel) {
                    println!();
                    print!("{}", coordinator::bench::profile_table(p));
                }
            }
            Ok(())
        }
        Command::Tokenize {
            model,
            text,
            no_bos,
            no_parse_special,
            ids,
            json,
        } => {
            let file = open_gguf(&model)?;
            let tok = Tokenizer::from_gguf(&file).context("loading the tokenizer")?;
            let tokens = tok.encode(&text, !no_bos, !no_parse_special);
            if json {
                println!("{}", serde_json::json!({ "tokens": tokens }));
            } else if ids {
                println!("{tokens:?}");
            } else {
                for t in tokens {
                    let piece = String::from_utf8_lossy(tok.token_to_piece(t)).into_owned();
                    println!("{t:>6} -> '{piece}'");
                }
            }
            Ok(())
        }
        Command::Synth {
            shape,
            quant,
            layers,
            vocab,
            experts,
            header_only,
            seed,
            threads,
            out,
        } => {
            let cfg = coordinator::synth::SynthConfig {
                shape,
                quant,
                layers,
                vocab,
                experts,
                hidden: None,
                header_only,
                seed,
                threads,
                out: out.clone(),
            };
            let bar = bytes_bar("synth");
            let start = std::time::Instant::now();
            let report = coordinator::synth::synth(&cfg, &mut |done, total| {
                bar.set_length(total);
                bar.set_position(done);
            });
            bar.finish_and_clear();
            let report = report.with_context(|| format!("writing {}", out.display()))?;
            let secs = start.elapsed().as_secs_f64();
            eprintln!(
                "wrote {} ({} tensors, {:.2} GB) in {secs:.1} s ({:.2} GB/s)",
                out.display(),
                report.n_tensors,
                report.bytes as f64 / 1e9,
                report.bytes as f64 / 1e9 / secs.max(1e-9)
            );
            Ok(())
        }
        Command::Plan(args) => plan(args),
        Command::Certs { action } => Ok(coordinator::certs::run(action)?),
        Command::Convert { model, repack, out } => {
            debug_assert!(repack, "clap requires --repack");
            let file = open_gguf(&model)?;
            let bar = bytes_bar("convert");
            let report = coordinator::convert::repack_q4_k(&file, &model, &out, &mut |d, t| {
                bar.set_length(t);
                bar.set_position(d);
            });
            bar.finish_and_clear();
            let report = report.with_context(|| format!("converting {}", model.display()))?;
            println!(
                "{}\t{} tensors repacked to Q4_K_R8, {} copied, {:.2} GB",
                out.display(),
                report.repacked,
                report.copied,
                report.bytes as f64 / 1e9
            );
            Ok(())
        }
        Command::Split(args) => {
            use shared::placement::{split, ModelShape, Plan};
            let model = open_gguf(&args.model)?;
            let plan = Plan::load(&args.plan)?;
            plan.check_identity(&shared::gguf::model_identity(&model))
                .with_context(|| {
                    format!(
                        "{} is not a plan for {}",
                        args.plan.display(),
                        args.model.display()
                    )
                })?;
            let shape = ModelShape::from_gguf(&model)
                .with_context(|| format!("reading the FFN shapes of {}", args.model.display()))?;
            let resolved = plan.resolve(&shape).with_context(|| {
                format!(
                    "checking {} against {}",
                    args.plan.display(),
                    args.model.display()
                )
            })?;
            let nodes: Vec<usize> = match &args.node {
                None => (0..resolved.nodes().len()).collect(),
                Some(name) => vec![resolved.node_index(name).with_context(|| {
                    format!(
                        "node {name:?} is not in {} (nodes: {})",
                        args.plan.display(),
                        resolved.nodes().join(", ")
                    )
                })?],
            };
            std::fs::create_dir_all(&args.out)
                .with_context(|| format!("creating {}", args.out.display()))?;
            for node in nodes {
                let name = &resolved.nodes()[node];
                let n_slices = resolved.node_slices(node).len();
                if n_slices == 0 {
                    eprintln!("node {name} holds nothing under this plan: no file written");
                    continue;
                }
                let path = args.out.join(split::split_file_name(&args.model, name));
                let bar = indicatif::ProgressBar::with_draw_target(
                    None,
                    indicatif::ProgressDrawTarget::stderr(),
                );
                bar.set_style(
                    indicatif::ProgressStyle::with_template(
                        "split {msg} {wide_bar} {bytes}/{total_bytes} ({bytes_per_sec}, {eta})",
                    )
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
                );
                bar.set_message(name.clone());
                let written =
                    split::write_node_file(&model, &resolved, node, &path, &mut |done, total| {
                        bar.set_length(total);
                        bar.set_position(done);
                    });
                bar.finish_and_clear();
                let bytes = written.with_context(|| format!("writing {}", path.display()))?;
                println!(
                    "{}\t{bytes} bytes ({:.2} GB)\t{n_slices} slices",
                    path.display(),
                    bytes as f64 / 1e9
                );
            }
            Ok(())
        }
        Command::Template {
            model,
            template,
            messages,
            no_generation_prompt,
            vars,
        } => {
            let mut extra = BTreeMap::new();
            let source = match (&model, &template) {
                (Some(m), _) => {
                    let file = open_gguf(m)?;
                    if let Ok(tok) = Tokenizer::from_gguf(&file) {
                        extra.extend(ChatTemplate::special_token_vars(&tok));
                    }
                    file.get("tokenizer.chat_template")
                        .and_then(|v| v.as_str())
                        .map(str::to_owned)
                        .with_context(|| {
                            format!("{} has no tokenizer.chat_template", m.display())
                        })?
                }
                (None, Some(t)) => std::fs::read_to_string(t)
                    .with_context(|| format!("reading {}", t.display()))?,
                (None, None) => bail!("give --model or --template"),
            };
            for v in vars {
                let (name, value) = v
                    .split_once('=')
                    .with_context(|| format!("--var {v:?} is not NAME=VALUE"))?;
                let value = serde_json::from_str(value)
                    .unwrap_or_else(|_| serde_json::Value::String(value.to_owned()));
                extra.insert(name.to_owned(), value);
            }
            let text = std::fs::read_to_string(&messages)
                .with_context(|| format!("reading {}", messages.display()))?;
            let parsed: serde_json::Value = serde_json::from_str(&text)
                .with_context(|| format!("{} is not JSON", messages.display()))?;
            let msgs = match parsed {
                serde_json::Value::Object(mut o) => {
                    for (k, v) in o.iter() {
                        if k != "messages" {
                            extra.entry(k.clone()).or_insert_with(|| v.clone());
                        }
                    }
                    o.remove("messages")
                        .context("the messages object has no \"messages\" list")?
                }
                list => list,
            };
            let tpl = ChatTemplate::new(&source).context("parsing the chat template")?;
            let out = tpl
                .render(&msgs, !no_generation_prompt, &extra)
                .context("rendering the chat template")?;
            print!("{out}");
            Ok(())
        }
    }
}

fn generate(args: GenerateArgs) -> anyhow::Result<()> {
    let file = open_gguf(&args.model)?;
    let engine = if args.dist.options()?.is_distributed() {
        open_engine_dist(&args.model, &args.dist)?
    } else {
        Loaded {
            engine: load_engine(file.clone(), &args.model)?,
            _nodes: None,
        }
    };
    let tokenizer = Tokenizer::from_gguf(&file).ok();
    let prompt: Vec<u32> = match (&args.tokens, &args.prompt) {
        (Some(t), _) => t.clone(),
        (None, Some(text)) => {
            let tok = tokenizer
                .as_ref()
                .context("this model has no tokenizer: use --tokens")?;
            if args.chat {
                let source = file
                    .get("tokenizer.chat_template")
                    .and_then(|v| v.as_str())
                    .context("this model has no chat template")?;
                let tpl = ChatTemplate::new(source).context("parsing the chat template")?;
                let mut msgs = Vec::new();
                if let Some(sys) = &args.system {
                    msgs.push(serde_json::json!({"role": "system", "content": sys}));
                }
                msgs.push(serde_json::json!({"role": "user", "content": text}));
                let rendered = tpl
                    .render(
                        &serde_json::Value::Array(msgs),
                        true,
                        &ChatTemplate::special_token_vars(tok),
                    )
                    .context("rendering the chat template")?;
                tok.encode(&rendered, false, true)
            } else {
                tok.encode(text, true, true)
            }
        }
        (None, None) => bail!("give --prompt or --tokens"),
    };
    if prompt.is_empty() {
        bail!("the prompt is empty");
    }
    let config = SamplerConfig {
        temperature: args.temp,
        top_k: args.top_k,
        top_p: args.top_p,
        min_p: args.min_p,
        repeat_penalty: args.repeat_penalty,
        repeat_last_n: args.repeat_last_n,
        seed: args.seed,
    };
    let mut sampler = Sampler::new(config);
    let n_ctx = args.ctx_size.unwrap_or(prompt.len() + args.n_predict);
    if prompt.len() + args.n_predict > n_ctx {
        bail!(
            "prompt ({} tokens) + n ({}) exceeds the context size {n_ctx}",
            prompt.len(),
            args.n_predict
        );
    }
    let mut decoder = tokenizer.as_ref().map(|_| StreamDecoder::new(false));
    let stdout = std::io::stdout();
    let json = args.json;
    let ignore_eos = args.ignore_eos;
    let (tokens, stats) = engine
        .generate(&prompt, args.n_predict, n_ctx, &mut sampler, |tok| {
            if let (Some(dec), Some(t), false) = (decoder.as_mut(), tokenizer.as_ref(), json) {
                let piece = dec.push(t, tok);
                let mut out = stdout.lock();
                let _ = out.write_all(piece.as_bytes());
                let _ = out.flush();
            }
            ignore_eos || !tokenizer.as_ref().is_some_and(|t| t.is_eog(tok))
        })
        .context("generating")?;
    if let Some(path) = &args.record_routing {
        save_routing(&engine, path)?;
    }
    if let (Some(dec), false) = (decoder.as_mut(), json) {
        print!("{}", dec.finish());
        println!();
    }
    if json {
        let text = tokenizer
            .as_ref()
            .map(|t| t.decode_text(&tokens))
            .unwrap_or_default();
        println!(
            "{}",
            serde_json::json!({
                "tokens": tokens,
                "text": text,
                "n_prompt": stats.n_prompt,
                "prompt_tps": stats.prompt_tps(),
                "generation_tps": stats.generation_tps(),
            })
        );
    }
    eprintln!(
        "prompt: {} tokens, {:.1} tok/s | generation: {} tokens, {:.1} tok/s",
        stats.n_prompt,
        stats.prompt_tps(),
        stats.n_generated,
        stats.generation_tps()
    );
    Ok(())
}

/// Writes the routing statistics of everything `engine` evaluated to `path`.
fn save_routing(engine: &Engine, path: &Path) -> anyhow::Result<()> {
    let identity = shared::gguf::model_identity(engine.model().file());
    let stats = engine.model().routing_counts().snapshot(Some(&identity));
    coordinator::routing_stats::save(&stats, path)
        .with_context(|| format!("writing routing statistics to {}", path.display()))?;
    let tokens = stats.layers.first().map_or(0, |l| l.n_tokens);
    eprintln!(
        "wrote routing statistics ({} MoE layers, {tokens} tokens) to {}",
        stats.layers.len(),
        path.display()
    );
    Ok(())
}

/// `moeshard plan`: the planner over a model's header and a cluster file.
fn plan(args: PlanArgs) -> anyhow::Result<()> {
    use shared::placement::planner::{self, KernelRates, PlannerConfig, PlannerNode};
    use shared::placement::routing_stats::RoutingModel;
    use shared::placement::{identity_hex, Cluster};
    let file = open_gguf(&args.model)?;
    let rates = args
        .kernel_gbs
        .map_or_else(KernelRates::default, KernelRates::uniform);
    let model = planner::ModelCost::from_gguf(&file, &rates)
        .with_context(|| format!("reading the expert sizes of {}", args.model.display()))?;
    let (nodes, placed_on) = match (&args.cluster, &args.topology) {
        (Some(path), _) => {
            let cluster = Cluster::load(path)?;
            (
                PlannerNode::from_cluster(&cluster, args.cores),
                path.display().to_string(),
            )
        }
        (None, Some(spec)) => {
            let memory = match &args.node_memory {
                Some(m) => Some(
                    planner::parse_byte_size(m)
                        .map_err(|e| anyhow::anyhow!("--node-memory {e}"))?,
                ),
                None => None,
            };
            if let Some(g) = args.node_gbs.filter(|g| !(g.is_finite() && *g > 0.0)) {
                bail!("--node-gbs {g}: a bandwidth must be a positive number of GB/s");
            }
            let spec = (spec != "this").then_some(spec.as_str());
            let topology = shared::topology::Topology::from_spec_or_detect(spec)?;
            let nodes: Vec<PlannerNode> = topology
                .compute_nodes()
                .iter()
                .enumerate()
                .map(|(i, n)| PlannerNode {
                    name: format!("node{i}"),
                    memory_bytes: memory.or(Some(n.memory_bytes)).filter(|&b| b > 0),
                    read_bandwidth_gbs: args
                        .node_gbs
                        .unwrap_or(planner::DEFAULT_READ_BANDWIDTH_GBS),
                    bandwidth_declared: args.node_gbs.is_some(),
                    cores: args.cores.or(Some(n.n_cores.max(1))),
                })
                .collect();
            if nodes.is_empty() {
                bail!("the topology has no NUMA node with cores to run an expert node on");
            }
            (nodes, format!("the NUMA nodes of {}", topology.source))
        }
        (None, None) => bail!("give --cluster FILE or --topology SPEC"),
    };
    let replicate_bytes = planner::parse_byte_size(&args.replicate)
        .map_err(|e| anyhow::anyhow!("--replicate {e}"))?;
    let k = model.n_expert_used;
    let mut notes = Vec::new();
    let routing = match (&args.routing_stats, args.zipf) {
        (Some(path), _) => {
            let stats = coordinator::routing_stats::load(path)?;
            if let (Some(recorded), Some(id)) = (&stats.model_identity, &model.model_identity) {
                if !recorded.eq_ignore_ascii_case(&identity_hex(id)) {
                    notes.push(format!(
                        "{} was recorded with another model file ({recorded}); used as this model's routing",
                        path.display()
                    ));
                }
            }
            stats.check_model(&model.shape, k).with_context(|| {
                format!("{} does not fit {}", path.display(), args.model.display())
            })?;
            RoutingModel::from_stats(&model.shape, &stats)?
        }
        (None, Some(s)) => {
            if !(s.is_finite() && s >= 0.0) {
                bail!("--zipf {s}: the exponent must be a number >= 0");
            }
            RoutingModel::zipf(&model.shape, k, s, args.seed)
        }
        (None, None) => RoutingModel::uniform(&model.shape, k),
    };
    if !(args.round_trip_us.is_finite() && args.round_trip_us >= 0.0) {
        bail!(
            "--round-trip-us {}: the round trip must be a number of microseconds >= 0",
            args.round_trip_us
        );
    }
    let config = PlannerConfig {
        batch: args.batch,
        replicate_bytes,
        samples: args.samples,
        seed: args.seed,
        kernel_rates: rates,
        coordinator_bandwidth_gbs: args.coordinator_gbs,
        coordinator_cores: args.coordinator_cores,
        round_trip_s: args.round_trip_us * 1e-6,
        ..PlannerConfig::default()
    };
    let mut planned = planner::plan(&model, &nodes, &routing, &config)
        .with_context(|| format!("planning {} over {placed_on}", args.model.display()))?;
    planned.summary.notes.extend(notes);
    if let Some(out) = &args.out {
        planned.plan.save(out)?;
    }
    let plan_text = planned.plan.to_toml();
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "summary": planned.summary,
                "plan": plan_text,
                "out": args.out,
            }))?
        );
    } else {
        print!("{}", planned.summary.render_text());
        match &args.out {
            Some(out) => println!("wrote the plan to {}", out.display()),
            None => print!("\n{plan_text}"),
        }
    }
    Ok(())
}

fn serve(args: ServeArgs) -> anyhow::Result<()> {
    use coordinator::server::{LoadedModel, ServeConfig};
    let model_name = args.alias.clone().unwrap_or_else(|| {
        let name = args
            .model
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        name.strip_suffix(".gguf").unwrap_or(&name).to_owned()
    });
    let config = ServeConfig {
        model_name,
        api_key: args.api_key.clone(),
        n_parallel: args.parallel,
        n_ctx: args.ctx_size,
        prefill_chunk: args.prefill_chunk,
        ..ServeConfig::default()
    };
    config.validate()?;
    args.dist.options()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("moeshard-http")
        .enable_all()
        .build()
        .context("starting the HTTP runtime")?;
    let (model, dist) = (args.model.clone(), args.dist.clone());
    let load = move || {
        open_engine_dist(&model, &dist)
            .map(|l| LoadedModel {
                engine: l.engine,
                nodes: l._nodes,
            })
            .map_err(|e| format!("{e:#}"))
    };
    runtime.block_on(async move {
        let addr = format!("{}:{}", args.host, args.port);
        let listener = tokio::net::TcpListener::bind(&addr)
            .await
            .with_context(|| format!("listening on {addr}"))?;
        let on_ready = |addr: std::net::SocketAddr| {
            // The one line on stdout: scripts and tests read the bound address from it.
            println!("moeshard serve listening on http://{addr}");
        };
        coordinator::server::serve(listener, config, load, on_ready, shutdown_signal()).await?;
        Ok(())
    })
}

/// Completes on Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
    eprintln!("moeshard serve: stopping (finishing the requests in flight)");
}

fn open_gguf(path: &Path) -> anyhow::Result<std::sync::Arc<GgufFile>> {
    Ok(std::sync::Arc::new(
        GgufFile::open(path).with_context(|| format!("opening {}", path.display()))?,
    ))
}

fn open_engine(path: &Path) -> anyhow::Result<Engine> {
    load_engine(open_gguf(path)?, path)
}

/// Loads a model; on a terminal a progress bar shows the dense weights being
/// paged in (nothing is drawn when stderr is a pipe).
fn load_engine(file: std::sync::Arc<GgufFile>, path: &Path) -> anyhow::Result<Engine> {
    let engine = Engine::from_file(file).with_context(|| format!("loading {}", path.display()))?;
    let bar =
        indicatif::ProgressBar::with_draw_target(None, indicatif::ProgressDrawTarget::stderr());
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "loading {msg} {wide_bar} {bytes}/{total_bytes} ({bytes_per_sec})",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar.set_message(
        path.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
    );
    engine.model().prefault(|done, total| {
        bar.set_length(total);
        bar.set_position(done);
    });
    bar.finish_and_clear();
    Ok(engine)
}

/// Logs go to stderr; `MOESHARD_LOG` or `RUST_LOG` sets the filter, default `warn`.
fn init_tracing() {
    use tracing_subscriber::EnvFilter;
    let filter = std::env::var("MOESHARD_LOG")
        .ok()
        .and_then(|v| EnvFilter::try_new(v).ok())
        .or_else(|| EnvFilter::try_from_default_env().ok())
        .unwrap_or_else(|| EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

/// A progress bar on stderr for a long write: `<what> [bar] bytes/total (rate, eta)`.
fn bytes_bar(what: &str) -> indicatif::ProgressBar {
    let bar =
        indicatif::ProgressBar::with_draw_target(None, indicatif::ProgressDrawTarget::stderr());
    bar.set_style(
        indicatif::ProgressStyle::with_template(&format!(
            "{what} {{wide_bar}} {{bytes}}/{{total_bytes}} ({{bytes_per_sec}}, {{eta}})"
        ))
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar
}
