//! Putting a distributed engine together from the command line's choices: loopback nodes
//! (`--nodes N --transport T`, optionally with `--plan`), or daemons already running
//! (`--cluster FILE`, with `--plan FILE` or an even plan over the cluster's nodes).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use proto::transport::{ClientTls, NodeLink, TlsIdentity, TransportKind};
use shared::gguf::{model_identity, GgufFile};
use shared::placement::{Cluster, ClusterTls, FfnTensors, ModelShape, Part, Plan};
use shared::quant::GgmlType;
use shared::topology::Topology;
use tracing::{info, warn};

use super::launcher::{launch, LaunchOptions, LocalNodes, NodeNuma};
use super::{
    reconnect_grpc, reconnect_quic, DeadlinePolicy, DistributedError, FailurePolicy, NodeHandle,
    Reconnect, RemoteExperts,
};
use crate::engine::Engine;
use crate::models::Model;

/// Where the experts run.
#[derive(Clone, Debug)]
pub struct DistOptions {
    /// Start this many loopback nodes (with an even plan unless `plan` is given).
    pub nodes: Option<usize>,
    pub transport: TransportKind,
    /// Connect to the daemons of this cluster file instead of starting nodes.
    pub cluster: Option<PathBuf>,
    pub plan: Option<PathBuf>,
    /// In an even plan, slice dense FFNs and shared experts over the nodes too (always
    /// done for a dense model, which has nothing else to spread).
    pub split_dense: bool,
    pub launch: Option<LaunchOptions>,
    /// How an even plan places the routed experts.
    pub experts: ExpertPlacement,
    /// Chunks of at most this many assignments for sliced layers' two rounds (`None`: as
    /// the protocol's limits require; small values test the chunking).
    pub slice_chunk_slots: Option<usize>,
    /// One node per NUMA node of the topology, pinned there, with a sliced even plan.
    pub numa_auto: bool,
    /// The topology for `numa_auto` (`synthetic:…` or `xml:…`); default: this machine.
    pub topology: Option<String>,
    /// With `numa_auto`: one file per node (`moeshard split` output on each socket's
    /// namespace), in node order.
    pub model_per_node: Vec<PathBuf>,
    /// In an even plan of whole experts, put each expert on this many nodes (failover:
    /// with 2, any one node can die without losing an expert).
    pub replicas: usize,
    /// The dispatch deadline: fixed, or derived from the measured dispatch times.
    pub deadline: DeadlinePolicy,
    /// Drop experts that have no live replica (renormalizing the rest) instead of failing.
    pub degraded: bool,
    /// Which replica serves a replicated slice in a step (`--replica-choice`).
    pub replica_choice: super::ReplicaChoice,
}

impl DistOptions {
    /// Whether anything but the single-process engine was asked for.
    pub fn is_distributed(&self) -> bool {
        self.nodes.is_some() || self.cluster.is_some() || self.plan.is_some() || self.numa_auto
    }
}

impl Default for DistOptions {
    fn default() -> Self {
        DistOptions {
            nodes: None,
            transport: TransportKind::Grpc,
            cluster: None,
            plan: None,
            split_dense: false,
            launch: None,
            experts: ExpertPlacement::Auto,
            slice_chunk_slots: None,
            numa_auto: false,
            topology: None,
            model_per_node: Vec::new(),
            replicas: 1,
            deadline: DeadlinePolicy::default(),
            degraded: false,
            replica_choice: super::ReplicaChoice::Layer,
        }
    }
}

/// An engine whose experts run on nodes, and the nodes started for it (stopped when
/// dropped; empty when connecting to a cluster).
pub struct DistributedEngine {
    pub engine: Engine,
    pub local_nodes: Option<LocalNodes>,
}

/// Each layer's routed experts' `ffn_down` type (`None` on layers without routed experts):
/// what the coordinator quantizes sliced experts' joined hidden rows to.
fn routed_down_types(
    file: &GgufFile,
    hp: &shared::models::HParams,
) -> Result<Vec<Option<GgmlType>>, shared::placement::PlacementError> {
    (0..hp.n_layer)
        .map(|layer| {
            let t = FfnTensors::find(file, hp, layer, Part::Routed)?;
            Ok(t.map(|t| t.down.ty))
        })
        .collect()
}

/// How an even plan (`--nodes N`, `--cluster` without `--plan`, `--numa auto`) places the
/// routed experts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ExpertPlacement {
    /// Sliced over the nodes this process starts (`--nodes N`, `--numa auto`), unless
    /// `--replicas` or `--degraded` asks for whole experts; whole with a cluster file (its
    /// daemons hold what they were started with).
    #[default]
    Auto,
    /// Every expert sliced over all nodes (`--slice-experts`).
    Sliced,
    /// Whole experts, split evenly between the nodes (`--whole-experts`).
    Whole,
}

fn node_names(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("node{i}")).collect()
}

/// Opens `model_path` with its experts placed as `opts` says.
pub fn open_distributed(
    model_path: &Path,
    opts: &DistOptions,
) -> Result<DistributedEngine, OpenError> {
    let file = Arc::new(GgufFile::open(model_path)?);
    let mut model = Model::load(file.clone())?;
    let shape = ModelShape::from_gguf(&file)?;
    let identity = model_identity(&file);
    let dense_model = shape.layers.iter().all(|l| l.routed.is_none());
    let split_dense = opts.split_dense || dense_model;

    let cluster = match &opts.cluster {
        Some(path) => Some(Cluster::load(path)?),
        None => None,
    };
    let mut launch_opts = match &opts.launch {
        Some(o) => o.clone(),
        None => LaunchOptions::this_executable()?,
    };
    let mut nodes = opts.nodes;
    // Slices are the balanced placement (DESIGN.md "Placement": every node reads its share
    // of every expert a token uses) and exact; whole experts are what replicas and degraded
    // mode work with, and what daemons of a cluster file started with `--experts` ranges
    // hold (a cluster without a plan keeps the whole-expert even plan).
    let slice_experts = match opts.experts {
        ExpertPlacement::Sliced => true,
        ExpertPlacement::Whole => false,
        ExpertPlacement::Auto => opts.replicas <= 1 && !opts.degraded && opts.cluster.is_none(),
    };
    if opts.numa_auto {
        if cluster.is_some() {
            return Err(DistributedError::Launch(
                "--numa auto starts the nodes of this machine; it does not go with --cluster"
                    .into(),
            )
            .into());
        }
        let (pins, coordinator_parts) = numa_pins(opts)?;
        // The coordinator's own matrices over the sockets too (one part: nothing to do).
        model.spread_over_sockets(&coordinator_parts)?;
        if let Some(n) = nodes.filter(|&n| n != pins.len()) {
            return Err(DistributedError::Launch(format!(
                "--nodes {n} but --numa auto finds {} NUMA nodes with cores",
                pins.len()
            ))
            .into());
        }
        nodes = Some(pins.len());
        launch_opts.numa = pins;
        if opts.model_per_node.is_empty() {
            if launch_opts.numa.len() > 1 {
                warn!(
                    "--numa auto with one model file: every node reads it wherever its pages \
                     are, so reads cross sockets; give --model-per-node with `moeshard split` \
                     files of a sliced plan, one on each socket's memory"
                );
            }
        } else if opts.model_per_node.len() != launch_opts.numa.len() {
            return Err(DistributedError::Launch(format!(
                "--model-per-node gives {} files for {} NUMA nodes",
                opts.model_per_node.len(),
                launch_opts.numa.len()
            ))
            .into());
        }
    }
    if !opts.model_per_node.is_empty() {
        launch_opts.model_per_node = opts.model_per_node.clone();
    }
    if opts.replicas > 1 && slice_experts {
        return Err(DistributedError::Launch(
            "--replicas places whole experts on several nodes; it does not go with sliced \
             experts (--slice-experts)"
                .into(),
        )
        .into());
    }
    let even = |names: &[String]| {
        if slice_experts {
            Plan::even_sliced(names, &shape, split_dense)
        } else {
            Plan::even(names, &shape, split_dense).with_replicas(opts.replicas)
        }
    };
    let plan = match (&opts.plan, &cluster, nodes) {
        (Some(path), _, _) => Plan::load(path)?,
        (None, Some(c), _) => {
            let names: Vec<String> = c.nodes.iter().map(|n| n.name.clone()).collect();
            even(&names)
        }
        (None, None, Some(n)) => {
            if n == 0 {
                return Err(DistributedError::Launch("--nodes must be at least 1".into()).into());
            }
            even(&node_names(n))
        }
        (None, None, None) => {
            return Err(DistributedError::Launch(
                "give --nodes N, --numa auto, --cluster FILE or --plan FILE".into(),
            )
            .into())
        }
    };
    plan.check_identity(&identity)?;
    let resolved = plan.resolve(&shape)?;
    if let (Some(n), None) = (nodes, &cluster) {
        if n != resolved.nodes().len() {
            return Err(DistributedError::Launch(format!(
                "--nodes {n} but the plan has {} nodes",
                resolved.nodes().len()
            ))
            .into());
        }
    }

    let runtime = Arc::new(
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("coordinator-io")
            .enable_all()
            .build()
            .map_err(|e| DistributedError::Launch(format!("starting the I/O runtime: {e}")))?,
    );
    let (local_nodes, handles) = match &cluster {
        Some(c) => (None, connect_cluster(&runtime, c, resolved.nodes())?),
        None => {
            let (nodes, handles) = launch(
                &runtime,
                model_path,
                &plan,
                &resolved,
                opts.transport,
                &launch_opts,
            )?;
            (Some(nodes), handles)
        }
    };
    let n_embd = model.hparams().n_embd;
    let routed_down = routed_down_types(&file, model.hparams())?;
    let remote = RemoteExperts::connect(
        runtime,
        handles,
        resolved,
        identity,
        n_embd,
        &routed_down,
        FailurePolicy {
            deadline: opts.deadline,
            degraded: opts.degraded,
            replica_choice: opts.replica_choice,
        },
    )?;
    let remote = match opts.slice_chunk_slots {
        Some(n) => remote.with_slice_chunks(n),
        None => remote,
    };
    info!(nodes = remote.node_names().len(), "experts placed on nodes");
    Ok(DistributedEngine {
        engine: Engine::with_executor(model, Box::new(remote)),
        local_nodes,
    })
}

/// One node per NUMA node with cores, pinned there with that node's processing units, and
/// the coordinator's parts (one per such NUMA node).
fn numa_pins(
    opts: &DistOptions,
) -> Result<(Vec<NodeNuma>, Vec<shared::topology::CoordinatorPart>), DistributedError> {
    let topology = Topology::from_spec_or_detect(opts.topology.as_deref())
        .map_err(|e| DistributedError::Launch(format!("--numa auto: {e}")))?;
    let n = topology.compute_nodes().len();
    let plan = topology
        .node_plan(n)
        .map_err(|e| DistributedError::Launch(format!("--numa auto: {e}")))?;
    info!(nodes = n, plan = %plan.to_text(), "--numa auto");
    let nodes = plan
        .expert_nodes
        .iter()
        .map(|p| NodeNuma {
            numa_node: p.numa_node,
            threads: p.pus.len(),
            topology: opts.topology.clone(),
        })
        .collect();
    Ok((nodes, plan.coordinator))
}

/// Links to the running daemons named by the plan, in plan order. With the cluster's
/// `ca`, `client_cert` and `client_key`, every link (gRPC or QUIC) is mutual TLS: a node must
/// present a certificate the CA signed for its `server_name`, and the coordinator presents
/// its own.
pub fn connect_cluster(
    runtime: &tokio::runtime::Runtime,
    cluster: &Cluster,
    plan_nodes: &[String],
) -> Result<Vec<NodeHandle>, DistributedError> {
    let client_tls = match &cluster.tls {
        Some(tls) => Some(load_client_tls(tls)?),
        None => None,
    };
    let mut handles = Vec::with_capacity(plan_nodes.len());
    for name in plan_nodes {
        let node = cluster
            .nodes
            .iter()
            .find(|n| &n.name == name)
            .ok_or_else(|| DistributedError::UnknownNode(name.clone()))?;
        let addr = resolve_addr(&node.address).map_err(|detail| DistributedError::Refused {
            node: name.clone(),
            peer: node.address.clone(),
            detail,
        })?;
        if client_tls.is_none() && !addr.ip().is_loopback() && node.transport == "grpc" {
            warn!(
                node = %name,
                address = %node.address,
                "plain-text gRPC link to another host: unauthenticated and unencrypted \
                 (give the cluster file ca, client_cert and client_key: docs/security.md)"
            );
        }
        let reconnect: Reconnect = match (node.transport.as_str(), &client_tls) {
            ("quic", Some(tls)) => reconnect_quic(addr, node.server_name.clone(), tls.clone()),
            ("quic", None) => {
                let cert = node
                    .cert
                    .as_ref()
                    .ok_or_else(|| DistributedError::Refused {
                        node: name.clone(),
                        peer: node.address.clone(),
                        detail: "a QUIC node needs `cert` in the cluster file".into(),
                    })?;
                let pem = std::fs::read_to_string(cert).map_err(|e| DistributedError::Refused {
                    node: name.clone(),
                    peer: node.address.clone(),
                    detail: format!("reading {}: {e}", cert.display()),
                })?;
                reconnect_quic(addr, node.server_name.clone(), ClientTls::trusting(pem))
            }
            (_, tls) => reconnect_grpc(
                addr,
                tls.as_ref().map(|t| (node.server_name.clone(), t.clone())),
            ),
        };
        let link: Arc<dyn NodeLink> =
            runtime
                .block_on(reconnect())
                .map_err(|source| DistributedError::Transport {
                    node: name.clone(),
                    peer: node.address.clone(),
                    source,
                })?;
        handles.push(NodeHandle {
            name: name.clone(),
            link,
            reconnect: Some(reconnect),
        });
    }
    Ok(handles)
}

/// The coordinator's side of the cluster's mutual TLS, checked: the client certificate
/// must be signed by the CA.
fn load_client_tls(tls: &ClusterTls) -> Result<ClientTls, DistributedError> {
    let fail = |e: &dyn std::fmt::Display| {
        DistributedError::Launch(format!("the cluster file's mutual TLS: {e}"))
    };
    let ca = std::fs::read_to_string(&tls.ca)
        .map_err(|e| fail(&format!("ca {}: {e}", tls.ca.display())))?;
    let identity = TlsIdentity::load(&tls.client_cert, &tls.client_key).map_err(|e| fail(&e))?;
    let client = ClientTls::mutual(ca, identity).map_err(|e| {
        fail(&format!(
            "client_cert {} with ca {}: {e}",
            tls.client_cert.display(),
            tls.ca.display()
        ))
    })?;
    info!(ca = %tls.ca.display(), client_cert = %tls.client_cert.display(), "mutual TLS to every node");
    Ok(client)
}

fn resolve_addr(address: &str) -> Result<std::net::SocketAddr, String> {
    use std::net::ToSocketAddrs;
    address
        .to_socket_addrs()
        .map_err(|e| format!("resolving {address}: {e}"))?
        .next()
        .ok_or_else(|| format!("{address} resolves to no address"))
}

/// Why [`open_distributed`] failed.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error(transparent)]
    Gguf(#[from] shared::gguf::GgufError),
    #[error(transparent)]
    Engine(#[from] crate::models::EngineError),
    #[error(transparent)]
    Placement(#[from] shared::placement::PlacementError),
    #[error(transparent)]
    Distributed(#[from] DistributedError),
}
