//! The daemon around [`NodeCore`]: command line, what to serve, the listening transport,
//! graceful shutdown on SIGTERM / Ctrl-C.
//!
//! The same [`NodeArgs`] are parsed by `moeshard-expert-node` and by `moeshard expert-node`
//! (the loopback launcher starts the latter, so one binary is enough).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use clap::Args;
use proto::transport::{grpc, quic, NodeService, ServerTls, TlsIdentity, TransportKind};
use shared::gguf::GgufFile;
use shared::placement::split::read_split_info;
use shared::placement::{ModelShape, Part, Plan, SliceSpec};
use tracing::{info, warn};

use crate::error::NodeError;
use crate::pinning::{Pinning, ThreadRole};
use crate::service::NodeCore;
use crate::weights::NodeWeights;

/// What an expert node serves and where.
#[derive(Args, Debug, Clone)]
pub struct NodeArgs {
    /// The model file (GGUF), or a node file written by `moeshard split`.
    #[arg(long)]
    pub model: PathBuf,
    /// Address to listen on (port 0: any free port, printed once listening).
    #[arg(long, default_value = "127.0.0.1:7070")]
    pub listen: SocketAddr,
    /// grpc or quic.
    #[arg(long, default_value = "grpc")]
    pub transport: TransportKind,
    /// Placement plan (TOML, see docs/placement.md); serve what it gives `--node`.
    #[arg(long, requires = "node")]
    pub plan: Option<PathBuf>,
    /// This node's name in the plan (and in logs and the inventory).
    #[arg(long)]
    pub node: Option<String>,
    /// Serve these whole routed experts of every MoE layer instead of a plan: ranges such
    /// as `0-63` or `0-15,32-47`.
    #[arg(long, conflicts_with = "plan")]
    pub experts: Option<String>,
    /// With `--experts`: only these layers (default: every MoE layer).
    #[arg(long, requires = "experts")]
    pub layers: Option<String>,
    /// Compute threads (default: all cores).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// The node's certificate (PEM). With --tls-ca: issued by that CA (`moeshard certs
    /// issue`), on either transport. Without: QUIC only, created with the key, self-signed,
    /// if neither file exists.
    #[arg(long)]
    pub tls_cert: Option<PathBuf>,
    /// The certificate's private key (PEM).
    #[arg(long)]
    pub tls_key: Option<PathBuf>,
    /// The cluster CA's certificate (PEM): mutual TLS on gRPC and QUIC. Only clients (the
    /// coordinator) presenting a certificate this CA signed are served; every refused
    /// handshake is logged. Needs --tls-cert and --tls-key, signed by the same CA.
    #[arg(long, requires_all = ["tls_cert", "tls_key"])]
    pub tls_ca: Option<PathBuf>,
    /// Read every mapped page once before serving.
    #[arg(long)]
    pub prefault: bool,
    /// DRAM tier: keep the most used experts (or slices), up to this many bytes (e.g. 64G,
    /// 512MiB), copied into DRAM (bound to --numa-node's memory) and serve the rest from the
    /// mapping; promoted and evicted in the background by how often dispatches use them
    #[arg(long, value_name = "BYTES")]
    pub dram_cache: Option<String>,
    /// Stop (as on SIGTERM) when stdin reaches end of file: a launcher holding the pipe
    /// makes sure the node does not outlive it.
    #[arg(long)]
    pub exit_on_stdin_close: bool,
    /// Pin the compute and I/O threads to this NUMA node's cores and bind the weights'
    /// pages to its memory (reported in the inventory; where binding fails, warn and serve
    /// unpinned).
    #[arg(long)]
    pub numa_node: Option<u32>,
    /// The topology that says which cores belong to `--numa-node`:
    /// `synthetic:<hwloc synthetic description>` or `xml:<hwloc XML file>` (default: this
    /// machine's).
    #[arg(long, requires = "numa_node")]
    pub topology: Option<String>,
}

/// Parses `0-63,70` (inclusive ranges) into the listed numbers.
pub fn parse_ranges(text: &str, below: usize, what: &str) -> Result<Vec<u32>, NodeError> {
    let bad = |detail: String| NodeError::Usage(format!("{what} \"{text}\": {detail}"));
    let mut out = Vec::new();
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (a, b) = match part.split_once('-') {
            Some((a, b)) => (a.trim(), b.trim()),
            None => (part, part),
        };
        let a: u32 = a
            .parse()
            .map_err(|_| bad(format!("\"{a}\" is not a number")))?;
        let b: u32 = b
            .parse()
            .map_err(|_| bad(format!("\"{b}\" is not a number")))?;
        if a > b {
            return Err(bad(format!("{a}-{b} is backwards")));
        }
        if b as usize >= below {
            return Err(bad(format!("{b} is out of range (0..{below})")));
        }
        out.extend(a..=b);
    }
    if out.is_empty() {
        return Err(bad("empty".into()));
    }
    out.sort_unstable();
    out.dedup();
    Ok(out)
}

/// The slices `args` asks for (`None`: all a split file holds).
fn wanted_slices(args: &NodeArgs) -> Result<Option<Vec<SliceSpec>>, NodeError> {
    let file = GgufFile::open(&args.model)?;
    if read_split_info(&file)?.is_some() {
        if args.plan.is_some() || args.experts.is_some() {
            warn!("a split file serves the slices it holds; --plan/--experts only name them");
        }
        return Ok(None);
    }
    let shape = ModelShape::from_gguf(&file)?;
    if let Some(plan_path) = &args.plan {
        let plan = Plan::load(plan_path)?;
        let identity = shared::gguf::model_identity(&file);
        plan.check_identity(&identity)?;
        let resolved = plan.resolve(&shape)?;
        let name = args.node.as_deref().unwrap_or_default();
        let index = resolved
            .nodes()
            .iter()
            .position(|n| n == name)
            .ok_or_else(|| {
                NodeError::Usage(format!(
                    "node \"{name}\" is not in the plan {} (nodes: {})",
                    plan_path.display(),
                    resolved.nodes().join(", ")
                ))
            })?;
        return Ok(Some(resolved.node_slices(index)));
    }
    if let Some(experts) = &args.experts {
        let experts = parse_ranges(experts, shape.n_expert, "--experts")?;
        let layers: Vec<u32> = match &args.layers {
            Some(l) => parse_ranges(l, shape.n_layer, "--layers")?,
            None => (0..shape.n_layer as u32).collect(),
        };
        let mut out = Vec::new();
        for &layer in &layers {
            let Some(routed) = &shape.layers[layer as usize].routed else {
                if args.layers.is_some() {
                    return Err(NodeError::Usage(format!(
                        "--layers: layer {layer} has no routed experts"
                    )));
                }
                continue;
            };
            for &expert in &experts {
                out.push(SliceSpec {
                    layer,
                    part: Part::Routed,
                    expert,
                    ff_start: 0,
                    ff_len: routed.n_ff as u32,
                });
            }
        }
        return Ok(Some(out));
    }
    Err(NodeError::NothingToServe {
        path: args.model.clone(),
    })
}

/// Loads what `args` asks for (with `--numa-node`, pinned: the calling thread too, so that
/// what it loads lands on the node).
pub fn load(args: &NodeArgs) -> Result<NodeCore, NodeError> {
    let pinning = match args.numa_node {
        Some(node) => {
            let pinning = Arc::new(Pinning::plan(node, args.topology.as_deref())?);
            pinning.pin_current_thread(ThreadRole::Main);
            Some(pinning)
        }
        None => None,
    };
    let wanted = wanted_slices(args)?;
    let weights = NodeWeights::open(&args.model, wanted.as_deref())?;
    if let Some(pinning) = &pinning {
        pinning.bind_weights(&weights);
    }
    if args.prefault {
        let t0 = std::time::Instant::now();
        weights.prefault();
        info!(ms = t0.elapsed().as_millis() as u64, "weights prefaulted");
    }
    let name = args
        .node
        .clone()
        .unwrap_or_else(|| format!("node@{}", args.listen));
    let budget = match &args.dram_cache {
        Some(text) => Some(
            shared::placement::planner::parse_byte_size(text)
                .map_err(|e| NodeError::Usage(format!("--dram-cache {e}")))?,
        ),
        None => None,
    };
    let mut core = match pinning {
        Some(pinning) => NodeCore::pinned(&name, weights, args.threads, pinning)?,
        None => NodeCore::new(&name, weights, args.threads, None)?,
    };
    if let Some(budget) = budget.filter(|&b| b > 0) {
        core.enable_dram_cache(budget)?;
    }
    Ok(core)
}

/// Serves `core` on `args.listen` until SIGTERM or Ctrl-C; `on_ready` gets the bound
/// address once the node accepts connections.
pub fn serve(
    args: &NodeArgs,
    core: NodeCore,
    on_ready: impl FnOnce(TransportKind, SocketAddr),
) -> Result<(), NodeError> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder
        .worker_threads(2)
        .thread_name("node-io")
        .enable_all();
    if let Some(pinning) = core.pinning() {
        let pinning = pinning.clone();
        builder.on_thread_start(move || pinning.pin_current_thread(ThreadRole::Io));
    }
    let runtime = builder
        .build()
        .map_err(|e| NodeError::Usage(format!("starting the I/O runtime: {e}")))?;
    let core = Arc::new(core);
    let service: Arc<dyn NodeService> = core.clone();
    runtime.block_on(async move {
        let draining = core.clone();
        let stdin_closed = stdin_eof(args.exit_on_stdin_close);
        let shutdown = async move {
            tokio::select! {
                _ = wait_for_signal() => {}
                _ = stdin_closed => info!("stdin closed"),
            }
            info!("shutting down: finishing in-flight dispatches");
            draining.drain();
        };
        let mutual = mutual_tls(args)?;
        match args.transport {
            TransportKind::Grpc => {
                let listener = tokio::net::TcpListener::bind(args.listen)
                    .await
                    .map_err(|e| NodeError::Usage(format!("listening on {}: {e}", args.listen)))?;
                let addr = listener
                    .local_addr()
                    .map_err(|e| NodeError::Usage(format!("listening on {}: {e}", args.listen)))?;
                match mutual {
                    Some(tls) => {
                        info!(%addr, node = core.name(), "serving over gRPC with mutual TLS");
                        on_ready(TransportKind::Grpc, addr);
                        grpc::serve_tls(listener, tls, service, shutdown).await?;
                    }
                    None => {
                        if args.tls_cert.is_some() || args.tls_key.is_some() {
                            warn!("--tls-cert/--tls-key without --tls-ca: gRPC serves plain text");
                        }
                        info!(%addr, node = core.name(), "serving over gRPC");
                        on_ready(TransportKind::Grpc, addr);
                        grpc::serve(listener, service, shutdown).await?;
                    }
                }
            }
            TransportKind::Quic => {
                if let Some(tls) = mutual {
                    let socket = std::net::UdpSocket::bind(args.listen).map_err(|e| {
                        NodeError::Usage(format!("listening on {}: {e}", args.listen))
                    })?;
                    let addr = socket.local_addr().map_err(|e| {
                        NodeError::Usage(format!("listening on {}: {e}", args.listen))
                    })?;
                    info!(%addr, node = core.name(), "serving over QUIC with mutual TLS");
                    on_ready(TransportKind::Quic, addr);
                    quic::serve_tls(socket, tls, service, shutdown).await?;
                    info!("stopped");
                    return Ok(());
                }
                let (cert, key) = match (&args.tls_cert, &args.tls_key) {
                    (Some(c), Some(k)) => (c.clone(), k.clone()),
                    _ => {
                        return Err(NodeError::Usage(
                            "--transport quic needs --tls-cert and --tls-key (created, \
                             self-signed, if neither exists)"
                                .into(),
                        ))
                    }
                };
                let host = args.listen.ip().to_string();
                let identity = TlsIdentity::load_or_create(&cert, &key, &["localhost", &host])?;
                let socket = std::net::UdpSocket::bind(args.listen)
                    .map_err(|e| NodeError::Usage(format!("listening on {}: {e}", args.listen)))?;
                let addr = socket
                    .local_addr()
                    .map_err(|e| NodeError::Usage(format!("listening on {}: {e}", args.listen)))?;
                info!(%addr, node = core.name(), cert = %cert.display(), "serving over QUIC");
                on_ready(TransportKind::Quic, addr);
                quic::serve(socket, identity, service, shutdown).await?;
            }
            TransportKind::Inproc => {
                return Err(NodeError::Usage(
                    "--transport inproc runs nodes inside the coordinator; a daemon listens \
                     with grpc or quic"
                        .into(),
                ))
            }
        }
        info!("stopped");
        Ok(())
    })
}

/// With `--tls-ca`: the node's certificate and key (which must exist: a certificate this
/// node made itself would not be signed by the CA), checked against the CA.
fn mutual_tls(args: &NodeArgs) -> Result<Option<ServerTls>, NodeError> {
    let Some(ca) = &args.tls_ca else {
        return Ok(None);
    };
    let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) else {
        return Err(NodeError::Usage(
            "--tls-ca needs --tls-cert and --tls-key (`moeshard certs issue`)".into(),
        ));
    };
    let ca_pem = std::fs::read_to_string(ca)
        .map_err(|e| NodeError::Usage(format!("--tls-ca {}: {e}", ca.display())))?;
    let identity = TlsIdentity::load(cert, key)?;
    let tls = ServerTls::mutual(identity, ca_pem).map_err(|e| {
        NodeError::Usage(format!(
            "--tls-cert {} with --tls-ca {}: {e}",
            cert.display(),
            ca.display()
        ))
    })?;
    info!(ca = %ca.display(), cert = %cert.display(), "mutual TLS: serving only clients the CA signed");
    Ok(Some(tls))
}

/// Resolves when stdin reaches end of file (never, unless `enabled`).
async fn stdin_eof(enabled: bool) {
    if !enabled {
        return std::future::pending().await;
    }
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    std::thread::spawn(move || {
        let mut sink = [0u8; 256];
        let mut stdin = std::io::stdin().lock();
        while let Ok(n) = std::io::Read::read(&mut stdin, &mut sink) {
            if n == 0 {
                break;
            }
        }
        let _ = tx.send(());
    });
    let _ = rx.await;
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
