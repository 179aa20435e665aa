//! Round trip of one dispatch per transport on loopback: `cargo bench -p coordinator --bench
//! dispatch [-- --json]`.
//!
//! A DeepSeek-V3-shaped dispatch (n_embd 7168, Q8_K activations, 8 of 256 experts per token,
//! 61 layers) goes from a coordinator-side caller to a node service and back:
//!
//! - decode: 1 token (8176 bytes of Q8_K out, 28 KiB of f32 partial sums back);
//! - prefill: 512 tokens (4 MiB out, 14 MiB back);
//! - ping: a health request and its answer (a few bytes each way), as many calls as decode:
//!   the fixed cost of a call on each link, to set the others against.
//!
//! The node service is a stand-in for `expert_node::NodeCore` WITHOUT expert compute: it
//! counts the message's bytes, decodes and checks the dispatch exactly as a node does
//! (`DispatchRequest::from_wire` against a `DispatchContext` of the model's shape, no
//! inventory), and answers `Partials` of zeros of the right shape (n_tokens × 7168 f32). So
//! the figures are transport + encode/decode + validation, nothing else.
//!
//! The caller does what `RemoteExperts::send` and its `Pending` do, and that is what is
//! timed: clone the quantized rows into a `DispatchRequest`, convert it to the wire
//! `CoordinatorMessage`, spawn `link.call` on a 2-worker tokio runtime (the coordinator's
//! I/O runtime), wait for the answer on a std channel from the calling thread, then
//! `DispatchResponse::try_from` and `check_answers`. Quantizing the rows (f32 → Q8_K, once
//! per layer in the coordinator) is timed separately.
//!
//! Links: `direct` (the service called on the calling thread: no link, no threads: the floor
//! of conversions and checks), `inproc` (`InprocLink`), `grpc` (`grpc::serve` on a
//! 127.0.0.1:0 TCP listener) and `quic` (`quic::serve` on a 127.0.0.1:0 UDP socket, self-signed
//! TLS identity). The servers run in this process on their own 2-worker tokio runtime, as
//! the expert-node daemon's. Calls are interleaved in blocks across the links so that machine
//! noise hits them alike. A stage table then times each conversion on its own (one thread,
//! no I/O) to show where the time of a round trip goes.
//!
//! Options (after `--`): `--json` (or `MOESHARD_BENCH_JSON=1`): one JSON object on stdout;
//! `--decode-calls N` [2000] (also ping's), `--prefill-calls N` [100], `--prefill-tokens N` [512],
//! `--links direct,inproc,grpc,quic`.

use std::hint::black_box;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use proto::transport::{grpc, quic, InprocLink, NodeLink, NodeService, TlsIdentity};
use proto::{
    wire, DispatchContext, DispatchRequest, DispatchResponse, Message, Partials, RemoteError,
};
use shared::moe::Assignment;
use shared::quant::dispatch::Kernels;
use shared::quant::matmul::Activations;
use shared::quant::GgmlType;
use shared::rng::SplitMix64;

const N_EMBD: usize = 7168;
const N_EXPERT: usize = 256;
const N_LAYER: usize = 61;
const TOP_K: usize = 8;
/// The expert weights' type: K-quants consume Q8_K activations.
const WEIGHT_TYPE: GgmlType = GgmlType::Q4_K;
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// The node side: checks each dispatch as `expert_node::NodeCore` does and answers zeros.
struct ZeroNode {
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
}

impl ZeroNode {
    fn dispatch(&self, m: wire::Dispatch) -> wire::DispatchResult {
        let (step_id, layer) = (m.step_id, m.layer);
        let outcome = DispatchRequest::from_wire(m, &context())
            .map_err(|e| RemoteError::from_proto_error(&e))
            .and_then(|req| {
                let n_tokens = req.n_tokens();
                black_box(&req);
                // NodeCore allocates its output zeroed, too; here nothing is added to it.
                let out = vec![0.0f32; n_tokens * N_EMBD];
                Partials::new(n_tokens, N_EMBD, out).map_err(|e| RemoteError {
                    code: wire::ErrorCode::Internal,
                    message: e.to_string(),
                })
            });
        DispatchResponse {
            step_id,
            layer,
            outcome,
        }
        .into()
    }
}

impl NodeService for ZeroNode {
    fn handle(&self, msg: wire::CoordinatorMessage) -> wire::NodeMessage {
        use wire::coordinator_message::Body as In;
        use wire::node_message::Body as Out;
        self.bytes_in
            .fetch_add(msg.encoded_len() as u64, Ordering::Relaxed);
        let body = match msg.body {
            Some(In::Dispatch(d)) => Out::DispatchResult(self.dispatch(d)),
            Some(In::Health(_)) => Out::Health(wire::Health {
                state: wire::NodeState::Serving.into(),
                uptime_ms: 0,
            }),
            _ => Out::DispatchResult(
                DispatchResponse {
                    step_id: 0,
                    layer: 0,
                    outcome: Err(RemoteError {
                        code: wire::ErrorCode::BadRequest,
                        message: "the bench node only answers dispatches".into(),
                    }),
                }
                .into(),
            ),
        };
        let reply = wire::NodeMessage { body: Some(body) };
        self.bytes_out
            .fetch_add(reply.encoded_len() as u64, Ordering::Relaxed);
        reply
    }
}

/// One dispatch, as the coordinator holds it before `RemoteExperts::send` converts it (the
/// layer's quantized rows and the node's assignments); or, for `ping`, a health request (a
/// few bytes each way: the fixed cost of a call).
struct Workload {
    name: &'static str,
    ping: bool,
    n_tokens: usize,
    request: Option<DispatchRequest>,
    /// Median time of `Activations::quantize` for these rows.
    quantize: Duration,
}

fn context() -> DispatchContext<'static> {
    DispatchContext {
        n_layer: N_LAYER,
        n_expert: N_EXPERT,
        n_embd: N_EMBD,
        max_experts_per_token: Some(TOP_K),
        inventory: None,
    }
}

impl Workload {
    fn new(name: &'static str, n_tokens: usize, rng: &mut SplitMix64) -> Workload {
        let x: Vec<f32> = (0..n_tokens * N_EMBD)
            .map(|_| (rng.next_f32() * 2.0 - 1.0) * 3.0)
            .collect();
        let kernels = Kernels::get();
        let reps = if n_tokens == 1 { 2001 } else { 21 };
        let mut times = Vec::with_capacity(reps);
        let mut acts = None;
        for _ in 0..reps {
            let t = Instant::now();
            let a = Activations::quantize(kernels, WEIGHT_TYPE, black_box(&x), N_EMBD);
            times.push(t.elapsed());
            acts = Some(a);
        }
        times.sort_unstable();
        let acts = acts.expect("at least one repetition");
        assert_eq!(acts.ty(), GgmlType::Q8_K);
        let mut assignments = Vec::with_capacity(n_tokens * TOP_K);
        for token in 0..n_tokens as u32 {
            let mut experts: Vec<u32> = Vec::with_capacity(TOP_K);
            while experts.len() < TOP_K {
                let e = (rng.next_u64() % N_EXPERT as u64) as u32;
                if !experts.contains(&e) {
                    experts.push(e);
                }
            }
            let w: Vec<f32> = (0..TOP_K).map(|_| rng.next_f32() + 0.01).collect();
            let sum: f32 = w.iter().sum();
            for (expert, w) in experts.into_iter().zip(w) {
                assignments.push(Assignment {
                    token,
                    expert,
                    weight: w / sum,
                });
            }
        }
        // The request as the coordinator builds it, made through the checked conversion
        // (so it is valid, whatever fields the protocol grows).
        let dispatch = wire::Dispatch {
            step_id: 1,
            layer: 0,
            n_tokens: n_tokens as u32,
            n_embd: N_EMBD as u32,
            inputs: vec![wire::Activation {
                ggml_type: acts.ty().id(),
                data: acts.into_bytes(),
            }],
            assignments: assignments
                .iter()
                .map(|a| wire::TokenAssignment {
                    token: a.token,
                    expert: a.expert,
                    weight: a.weight,
                })
                .collect(),
            part: wire::FfnPart::Routed.into(),
            ..Default::default()
        };
        let request = DispatchRequest::from_wire(dispatch, &context())
            .expect("the bench's dispatch is valid");
        Workload {
            name,
            ping: false,
            n_tokens,
            request: Some(request),
            quantize: times[times.len() / 2],
        }
    }

    fn ping() -> Workload {
        Workload {
            name: "ping",
            ping: true,
            n_tokens: 0,
            request: None,
            quantize: Duration::ZERO,
        }
    }

    /// The wire message, built as `RemoteExperts::send` builds it: the rows cloned out of
    /// the layer's activations into a `DispatchRequest` (here with the assignments, which
    /// `send` moves in: a copy of 12 bytes each), then converted.
    fn message(&self, step_id: u64, layer: u32) -> wire::CoordinatorMessage {
        let Some(template) = &self.request else {
            return wire::CoordinatorMessage {
                body: Some(wire::coordinator_message::Body::Health(
                    wire::HealthRequest {},
                )),
            };
        };
        let mut request = template.clone();
        request.step_id = step_id;
        request.layer = layer;
        wire::CoordinatorMessage {
            body: Some(wire::coordinator_message::Body::Dispatch(request.into())),
        }
    }
}

/// Checks an answer as `RemoteExperts`' `Pending` does.
fn check_answer(
    answer: wire::NodeMessage,
    step_id: u64,
    layer: u32,
    n_tokens: usize,
) -> Result<Partials, String> {
    let result = match answer.body {
        Some(wire::node_message::Body::DispatchResult(r)) => {
            DispatchResponse::try_from(r).map_err(|e| e.to_string())?
        }
        other => return Err(format!("answered a dispatch with {other:?}")),
    };
    result
        .check_answers(step_id, layer, n_tokens, N_EMBD)
        .map_err(|e| e.to_string())?;
    result
        .outcome
        .map_err(|e| format!("{:?}: {}", e.code, e.message))
}

/// How a dispatch reaches the node.
enum Via {
    /// `NodeService::handle` on the calling thread.
    Direct(Arc<ZeroNode>),
    Link(Arc<dyn NodeLink>),
}

struct Target {
    name: &'static str,
    via: Via,
}

struct Bench {
    client: tokio::runtime::Runtime,
    next_step: u64,
}

impl Bench {
    /// One timed round trip.
    fn call(&mut self, target: &Target, w: &Workload) -> Result<Duration, String> {
        let step_id = self.next_step;
        self.next_step += 1;
        let layer = (step_id % N_LAYER as u64) as u32;
        let t = Instant::now();
        let msg = w.message(step_id, layer);
        let answer = match &target.via {
            Via::Direct(node) => node.handle(msg),
            Via::Link(link) => {
                let (tx, rx) = mpsc::channel();
                let link = Arc::clone(link);
                self.client.spawn(async move {
                    let answer = tokio::time::timeout(CALL_TIMEOUT, link.call(msg)).await;
                    let _ = tx.send(answer);
                });
                rx.recv()
                    .map_err(|_| "the call's task was lost".to_string())?
                    .map_err(|_| format!("no answer within {CALL_TIMEOUT:?}"))?
                    .map_err(|e| e.to_string())?
            }
        };
        if w.ping {
            let elapsed = t.elapsed();
            return match answer.body {
                Some(wire::node_message::Body::Health(h)) => {
                    black_box(h);
                    Ok(elapsed)
                }
                other => Err(format!("answered a health request with {other:?}")),
            };
        }
        let partials = check_answer(answer, step_id, layer, w.n_tokens)?;
        let elapsed = t.elapsed();
        black_box(partials);
        Ok(elapsed)
    }
}

#[derive(Clone, Debug)]
struct Stats {
    calls: usize,
    p50: Duration,
    p99: Duration,
    mean: Duration,
    min: Duration,
    max: Duration,
}

fn stats(mut v: Vec<Duration>) -> Stats {
    v.sort_unstable();
    let n = v.len();
    // Nearest-rank percentiles.
    let rank = |p: f64| v[((p * n as f64).ceil() as usize).clamp(1, n) - 1];
    Stats {
        calls: n,
        p50: rank(0.50),
        p99: rank(0.99),
        mean: v.iter().sum::<Duration>() / n as u32,
        min: v[0],
        max: v[n - 1],
    }
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// A duration for the table: µs below 10 ms, ms above.
fn fmt_dur(d: Duration) -> String {
    let us = us(d);
    if us < 10_000.0 {
        format!("{us:.1} µs")
    } else {
        format!("{:.2} ms", us / 1000.0)
    }
}

fn fmt_bytes(b: usize) -> String {
    if b < 1 << 20 {
        format!("{b} B")
    } else {
        format!("{:.2} MiB", b as f64 / (1 << 20) as f64)
    }
}

/// One conversion step timed on its own.
struct Stage {
    workload: &'static str,
    name: &'static str,
    median: Duration,
}

/// Median time of `f` over `reps` runs (dropping its result is not timed).
fn time_median<T>(reps: usize, mut f: impl FnMut() -> T) -> Duration {
    let mut v: Vec<Duration> = (0..reps)
        .map(|_| {
            let t = Instant::now();
            let out = black_box(f());
            let elapsed = t.elapsed();
            drop(out);
            elapsed
        })
        .collect();
    v.sort_unstable();
    v[v.len() / 2]
}

/// Median time of `f` over one run per input, the inputs made before the clock starts
/// (dropping the result is not timed; what `f` frees of its input is).
fn time_median_consuming<I, T>(inputs: Vec<I>, mut f: impl FnMut(I) -> T) -> Duration {
    let mut v: Vec<Duration> = inputs
        .into_iter()
        .map(|input| {
            let t = Instant::now();
            let out = black_box(f(input));
            let elapsed = t.elapsed();
            drop(out);
            elapsed
        })
        .collect();
    v.sort_unstable();
    v[v.len() / 2]
}

/// Each step of a round trip on its own, one thread, no I/O.
fn stages(w: &Workload, node: &ZeroNode) -> Vec<Stage> {
    let reps = if w.n_tokens == 1 { 2001 } else { 21 };
    let mut out = Vec::new();
    let mut stage = |name: &'static str, median: Duration| {
        out.push(Stage {
            workload: w.name,
            name,
            median,
        })
    };
    stage(
        "coordinator: rows cloned + DispatchRequest -> wire",
        time_median(reps, || w.message(1, 0)),
    );
    let msg = w.message(1, 0);
    stage(
        "coordinator: prost encode (grpc, quic)",
        time_median(reps, || msg.encode_to_vec()),
    );
    let bytes = msg.encode_to_vec();
    stage(
        "node: prost decode (grpc, quic)",
        time_median(reps, || {
            wire::CoordinatorMessage::decode(bytes.as_slice()).expect("decodes")
        }),
    );
    let dispatch = match &msg.body {
        Some(wire::coordinator_message::Body::Dispatch(d)) => d.clone(),
        _ => unreachable!("a dispatch"),
    };
    let ctx = context();
    stage(
        "node: DispatchRequest::from_wire (checks)",
        time_median_consuming(vec![dispatch; reps], |d| {
            DispatchRequest::from_wire(d, &ctx).expect("valid")
        }),
    );
    stage(
        "node: zeros + Partials::new",
        time_median(reps, || {
            Partials::new(w.n_tokens, N_EMBD, vec![0.0; w.n_tokens * N_EMBD]).expect("valid")
        }),
    );
    let partials =
        Partials::new(w.n_tokens, N_EMBD, vec![0.0; w.n_tokens * N_EMBD]).expect("valid");
    stage(
        "node: Partials -> wire",
        time_median_consuming(vec![partials; reps], wire::Partials::from),
    );
    let reply = node.handle(w.message(1, 0));
    stage(
        "node: prost encode reply (grpc, quic)",
        time_median(reps, || reply.encode_to_vec()),
    );
    let reply_bytes = reply.encode_to_vec();
    stage(
        "coordinator: prost decode reply (grpc, quic)",
        time_median(reps, || {
            wire::NodeMessage::decode(reply_bytes.as_slice()).expect("decodes")
        }),
    );
    stage(
        "coordinator: DispatchResponse::try_from + check",
        time_median_consuming(vec![reply; reps], |r| {
            check_answer(r, 1, 0, w.n_tokens).expect("valid")
        }),
    );
    out
}

struct Options {
    json: bool,
    decode_calls: usize,
    prefill_calls: usize,
    prefill_tokens: usize,
    links: Vec<String>,
}

fn parse_args() -> Result<Options, String> {
    let mut o = Options {
        json: std::env::var("MOESHARD_BENCH_JSON").is_ok_and(|v| !v.is_empty() && v != "0"),
        decode_calls: 2000,
        prefill_calls: 100,
        prefill_tokens: 512,
        links: ["direct", "inproc", "grpc", "quic"]
            .map(String::from)
            .to_vec(),
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut number = |name: &str| -> Result<usize, String> {
            let v = args.next().ok_or(format!("{name} needs a value"))?;
            match v.parse::<usize>() {
                Ok(n) if n > 0 => Ok(n),
                _ => Err(format!("{name}: {v:?} is not a positive number")),
            }
        };
        match a.as_str() {
            "--json" => o.json = true,
            "--decode-calls" => o.decode_calls = number("--decode-calls")?,
            "--prefill-calls" => o.prefill_calls = number("--prefill-calls")?,
            "--prefill-tokens" => o.prefill_tokens = number("--prefill-tokens")?,
            "--links" => {
                let v = args.next().ok_or("--links needs a value")?;
                o.links = v.split(',').map(str::to_owned).collect();
                for l in &o.links {
                    if !["direct", "inproc", "grpc", "quic"].contains(&l.as_str()) {
                        return Err(format!(
                            "unknown link {l:?} (choices: direct, inproc, grpc, quic)"
                        ));
                    }
                }
            }
            // `cargo bench` passes --bench to every bench target.
            "--bench" => {}
            "-h" | "--help" => {
                return Err(
                    "usage: cargo bench -p coordinator --bench dispatch -- [--json] \
                            [--decode-calls N] [--prefill-calls N] [--prefill-tokens N] \
                            [--links direct,inproc,grpc,quic]"
                        .into(),
                )
            }
            // A name filter (`cargo bench -- NAME`) does not apply here.
            other if !other.starts_with('-') => {}
            other => return Err(format!("unknown option {other:?} (see --help)")),
        }
    }
    if o.prefill_tokens > proto::limits::MAX_DISPATCH_TOKENS {
        return Err(format!(
            "--prefill-tokens is at most {}",
            proto::limits::MAX_DISPATCH_TOKENS
        ));
    }
    Ok(o)
}

fn runtime(name: &str) -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name(name)
        .enable_all()
        .build()
        .expect("a tokio runtime")
}

fn main() {
    let opts = match parse_args() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    };
    if let Err(e) = run(&opts) {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

fn run(opts: &Options) -> Result<(), String> {
    let mut rng = SplitMix64::new(0x6d6f_6573_6861_7264);
    let ping = Workload::ping();
    let decode = Workload::new("decode", 1, &mut rng);
    let prefill = Workload::new("prefill", opts.prefill_tokens, &mut rng);

    // The node side: its own runtime, as the expert-node daemon's.
    let server = runtime("bench-node-io");
    let node = Arc::new(ZeroNode {
        bytes_in: AtomicU64::new(0),
        bytes_out: AtomicU64::new(0),
    });
    let service: Arc<dyn NodeService> = node.clone();
    let mut stops = Vec::new();
    let mut servers = Vec::new();
    let mut targets = Vec::new();
    let bench_client = runtime("bench-coordinator-io");
    for name in &opts.links {
        let via = match name.as_str() {
            "direct" => Via::Direct(node.clone()),
            "inproc" => Via::Link(Arc::new(InprocLink::new("bench", service.clone()))),
            "grpc" => {
                let listener = server
                    .block_on(tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)))
                    .map_err(|e| format!("binding a TCP listener: {e}"))?;
                let addr = listener.local_addr().map_err(|e| e.to_string())?;
                let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
                servers.push(server.spawn(grpc::serve(listener, service.clone(), async {
                    let _ = stopped.await;
                })));
                stops.push(stop);
                let link = bench_client
                    .block_on(grpc::connect(addr))
                    .map_err(|e| e.to_string())?;
                Via::Link(Arc::new(link))
            }
            "quic" => {
                let socket = std::net::UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))
                    .map_err(|e| format!("binding a UDP socket: {e}"))?;
                let addr: SocketAddr = socket.local_addr().map_err(|e| e.to_string())?;
                let identity = TlsIdentity::self_signed(&["localhost", "127.0.0.1"])
                    .map_err(|e| e.to_string())?;
                let cert = identity.cert_pem.clone();
                let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
                servers.push(
                    server.spawn(quic::serve(socket, identity, service.clone(), async {
                        let _ = stopped.await;
                    })),
                );
                stops.push(stop);
                let link = bench_client
                    .block_on(quic::connect(addr, "localhost", &cert))
                    .map_err(|e| e.to_string())?;
                Via::Link(Arc::new(link))
            }
            _ => unreachable!("checked in parse_args"),
        };
        targets.push(Target {
            name: match name.as_str() {
                "direct" => "direct",
                "inproc" => "inproc",
                "grpc" => "grpc",
                _ => "quic",
            },
            via,
        });
    }

    let mut bench = Bench {
        client: bench_client,
        next_step: 1,
    };
    // Bytes each way (protobuf message; QUIC adds a 4-byte frame header, gRPC a 5-byte
    // message prefix and HTTP/2 frame headers).
    let sizes = |w: &Workload| {
        let out = w.message(1, 0).encoded_len();
        let back = node.handle(w.message(1, 0)).encoded_len();
        (out, back)
    };

    let mut rows = Vec::new();
    for (w, calls, blocks) in [
        (&ping, opts.decode_calls, 10usize),
        (&decode, opts.decode_calls, 10usize),
        (&prefill, opts.prefill_calls, 5usize),
    ] {
        let blocks = blocks.min(calls);
        let per_block = calls.div_ceil(blocks);
        let warmup = (calls / 10).max(3);
        let mut samples: Vec<Vec<Duration>> = vec![Vec::with_capacity(calls); targets.len()];
        for t in &targets {
            for _ in 0..warmup {
                bench
                    .call(t, w)
                    .map_err(|e| format!("{} {}: {e}", w.name, t.name))?;
            }
        }
        // Interleaved blocks: every link sees the same stretches of machine noise.
        for _ in 0..blocks {
            for (t, s) in targets.iter().zip(&mut samples) {
                for _ in 0..per_block.min(calls - s.len()) {
                    let d = bench
                        .call(t, w)
                        .map_err(|e| format!("{} {}: {e}", w.name, t.name))?;
                    s.push(d);
                }
            }
        }
        let (out, back) = sizes(w);
        for (t, s) in targets.iter().zip(samples) {
            rows.push((w.name, w.n_tokens, t.name, stats(s), out, back));
        }
    }
    let mut stage_rows = stages(&decode, &node);
    stage_rows.extend(stages(&prefill, &node));

    // Links first (a gRPC session or QUIC connection ends with them), then the servers.
    drop(targets);
    for s in stops {
        let _ = s.send(());
    }
    for s in servers {
        match server.block_on(async { tokio::time::timeout(Duration::from_secs(10), s).await }) {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => eprintln!("warning: a server failed: {e}"),
            Ok(Err(e)) => eprintln!("warning: a server task failed: {e}"),
            Err(_) => eprintln!("warning: a server did not stop within 10 s"),
        }
    }

    let kernels = Kernels::get().isa();
    if opts.json {
        let results: Vec<_> = rows
            .iter()
            .map(|(workload, n_tokens, link, s, out, back)| {
                serde_json::json!({
                    "workload": workload,
                    "n_tokens": n_tokens,
                    "link": link,
                    "calls": s.calls,
                    "p50_us": us(s.p50),
                    "p99_us": us(s.p99),
                    "mean_us": us(s.mean),
                    "min_us": us(s.min),
                    "max_us": us(s.max),
                    "bytes_out": out,
                    "bytes_back": back,
                })
            })
            .collect();
        let stage_json: Vec<_> = stage_rows
            .iter()
            .map(|s| {
                serde_json::json!({
                    "workload": s.workload,
                    "stage": s.name,
                    "median_us": us(s.median),
                })
            })
            .collect();
        let doc = serde_json::json!({
            "what": "dispatch round trip on loopback; no expert compute (the node checks the \
                     dispatch and answers zeros)",
            "n_embd": N_EMBD,
            "n_expert": N_EXPERT,
            "n_layer": N_LAYER,
            "experts_per_token": TOP_K,
            "activation_type": "Q8_K",
            "kernels": kernels,
            "cores": std::thread::available_parallelism().map_or(1, |c| c.get()),
            "quantize_us": {
                "decode": us(decode.quantize),
                "prefill": us(prefill.quantize),
            },
            "prefill_tokens": prefill.n_tokens,
            "results": results,
            "stages": stage_json,
        });
        println!(
            "{}",
            serde_json::to_string_pretty(&doc).map_err(|e| e.to_string())?
        );
        return Ok(());
    }

    println!(
        "Dispatch round trip on loopback, per link. NO expert compute: the node decodes and \
         checks each dispatch as a real node does and answers zeros, so this is transport + \
         encode/decode + validation only."
    );
    println!(
        "n_embd {N_EMBD}, Q8_K activations out, f32 partial sums back, {TOP_K} of {N_EXPERT} \
         experts per token; {} kernels, {} cores.",
        kernels,
        std::thread::available_parallelism().map_or(1, |c| c.get())
    );
    println!(
        "Quantizing the rows f32 -> Q8_K (once per layer in the coordinator, not in the round \
         trip): decode {}, prefill ({} tokens) {}.",
        fmt_dur(decode.quantize),
        prefill.n_tokens,
        fmt_dur(prefill.quantize)
    );
    println!();
    println!(
        "{:<8} {:>6} {:<7} {:>6} {:>11} {:>11} {:>11} {:>11} {:>11} {:>11}",
        "workload", "tokens", "link", "calls", "p50", "p99", "mean", "min", "out", "back"
    );
    for (workload, n_tokens, link, s, out, back) in &rows {
        println!(
            "{:<8} {:>6} {:<7} {:>6} {:>11} {:>11} {:>11} {:>11} {:>11} {:>11}",
            workload,
            n_tokens,
            link,
            s.calls,
            fmt_dur(s.p50),
            fmt_dur(s.p99),
            fmt_dur(s.mean),
            fmt_dur(s.min),
            fmt_bytes(*out),
            fmt_bytes(*back)
        );
    }
    println!();
    println!("Where the time goes: each step on its own (median, one thread, no I/O).");
    println!("{:<8} {:<52} {:>11}", "workload", "step", "median");
    for s in &stage_rows {
        println!("{:<8} {:<52} {:>11}", s.workload, s.name, fmt_dur(s.median));
    }
    Ok(())
}
