//! Distributed execution: the routed experts (and, where the plan says so, dense FFN
//! slices) computed by expert nodes behind any transport.
//!
//! Per MoE layer [`RemoteExperts`] groups the step's (token, expert, weight) assignments by
//! the node holding each expert or slice (one replica chosen per slice), sends each
//! involved node ONE dispatch with the rows of the tokens it needs, all nodes in flight at
//! once, and adds the partial sums in the plan's node order, so results are deterministic:
//! with one node they are bit-identical to the single-process engine. A layer with experts
//! held as slices takes two rounds instead (each assignment's SwiGLU rows, joined and
//! quantized here; then each node's rows of down per assignment, added here in routing
//! order): bit-identical with any slicing.
//!
//! Failover: a node that misses the dispatch deadline ([`deadline`]: by default a multiple
//! of its measured dispatch times), drops or refuses is marked down; its part of the step
//! is re-sent to live replicas of the same slices and the step completes (the partial sums
//! regroup); later steps route around it. A down node is probed in the background,
//! re-verified (model identity, the slices the plan gives it) and reused. An expert with
//! no live replica fails the step naming it, or, in degraded mode, is dropped from the
//! tokens routed to it (their other experts' weights rescaled to the original total),
//! counted and logged — in layers of whole experts; a sliced expert missing a slice always
//! fails the step.
//!
//! - [`launcher`]: loopback mode (N node processes on 127.0.0.1, or in-process nodes).
//! - [`connect`]: links to daemons already running, from a cluster file.

pub mod connect;
pub mod deadline;
pub mod launcher;

pub use deadline::DeadlinePolicy;

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, RwLock, Weak};
use std::time::{Duration, Instant};

use proto::transport::{NodeLink, TransportError};
use proto::{
    partials_from_reply, wire, DispatchRequest, FfnPart, Hello, HelloReply, Partials, ProtoError,
    Stage,
};
use shared::moe::{add_weighted, Assignment};
use shared::placement::{identity_hex, Part, ResolvedPlan, SliceSpec};
use shared::quant::dispatch::Kernels;
use shared::quant::matmul::{Activations, Segments};
use shared::quant::GgmlType;
use tracing::{debug, error, info, warn};

use crate::histogram::{Histogram, DISPATCH_BUCKETS};
use crate::models::{DispatchMetrics, EngineError, ExpertExecutor, Pending};
use deadline::DispatchTimes;

/// How often degraded mode repeats its error line while it keeps dropping experts.
pub const DEGRADED_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// How often down nodes are probed for a rejoin.
pub const PROBE_INTERVAL: Duration = Duration::from_secs(2);

/// Opens a fresh link to a node (after it went down): reconnects to the same address.
pub type Reconnect = Arc<
    dyn Fn() -> Pin<Box<dyn Future<Output = Result<Arc<dyn NodeLink>, TransportError>> + Send>>
        + Send
        + Sync,
>;

/// Reconnects to a gRPC node at `addr`: in plain text, or with `tls` over TLS (the node's
/// certificate checked for the server name given with it; mutual with a cluster CA).
pub fn reconnect_grpc(
    addr: std::net::SocketAddr,
    tls: Option<(String, proto::transport::ClientTls)>,
) -> Reconnect {
    let tls = tls.map(Arc::new);
    Arc::new(move || {
        let tls = tls.clone();
        Box::pin(async move {
            let link: Arc<dyn NodeLink> = match tls.as_deref() {
                Some((name, tls)) => {
                    Arc::new(proto::transport::grpc::connect_tls(addr, name, tls).await?)
                }
                None => Arc::new(proto::transport::grpc::connect(addr).await?),
            };
            Ok(link)
        })
    })
}

/// Reconnects to a QUIC node at `addr` that presents a certificate for `server_name` which
/// `tls` trusts (its own self-signed certificate, or one the cluster CA signed; mutual
/// with a cluster CA).
pub fn reconnect_quic(
    addr: std::net::SocketAddr,
    server_name: String,
    tls: proto::transport::ClientTls,
) -> Reconnect {
    let tls = Arc::new((server_name, tls));
    Arc::new(move || {
        let tls = Arc::clone(&tls);
        Box::pin(async move {
            let (name, tls) = &*tls;
            let link: Arc<dyn NodeLink> =
                Arc::new(proto::transport::quic::connect_tls(addr, name, tls).await?);
            Ok(link)
        })
    })
}

/// A node as the coordinator sees it.
pub struct NodeHandle {
    pub name: String,
    pub link: Arc<dyn NodeLink>,
    /// How to reach it again once it went down (`None`: it cannot come back, e.g. inproc).
    pub reconnect: Option<Reconnect>,
}

/// Why connecting to the nodes failed.
#[derive(Debug, thiserror::Error)]
pub enum DistributedError {
    #[error("node {node} ({peer}): {source}")]
    Transport {
        node: String,
        peer: String,
        source: TransportError,
    },
    #[error("node {node} ({peer}) did not answer the handshake within {timeout:?}")]
    Timeout {
        node: String,
        peer: String,
        timeout: Duration,
    },
    #[error("node {node} ({peer}): {detail}")]
    Refused {
        node: String,
        peer: String,
        detail: String,
    },
    #[error("the plan names node \"{0}\", which is not connected")]
    UnknownNode(String),
    #[error(transparent)]
    Placement(#[from] shared::placement::PlacementError),
    #[error("{0}")]
    Launch(String),
}

/// One node's link and state, shared with the prober.
struct NodeSlot {
    name: String,
    link: RwLock<Arc<dyn NodeLink>>,
    up: AtomicBool,
    reconnect: Option<Reconnect>,
    /// What the plan places on it (checked again when it rejoins).
    expected: Vec<SliceSpec>,
    /// Its recent dispatch times (the measured deadline).
    times: DispatchTimes,
    /// Round trips of its answered dispatches, as the coordinator saw them.
    latency: Histogram,
}

impl NodeSlot {
    fn link(&self) -> Arc<dyn NodeLink> {
        match self.link.read() {
            Ok(l) => l.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    fn set_link(&self, link: Arc<dyn NodeLink>) {
        match self.link.write() {
            Ok(mut l) => *l = link,
            Err(poisoned) => *poisoned.into_inner() = link,
        }
    }

    /// Notes an answered dispatch of `n_rows` rows that took `took` from its sending.
    fn record_answer(&self, n_rows: usize, took: Duration) {
        self.times.record(n_rows, took);
        self.latency.observe(took);
    }
}

/// The nodes, in the plan's order.
struct NodeTable {
    nodes: Vec<NodeSlot>,
    identity: [u8; 32],
    /// Handshakes, probes and stats requests.
    call_timeout: Duration,
}

/// How [`RemoteExperts`] treats slow and missing nodes.
#[derive(Clone, Copy, Debug, Default)]
pub struct FailurePolicy {
    pub deadline: DeadlinePolicy,
    /// Drop experts without a live replica (renormalizing the tokens' other experts)
    /// instead of failing the step.
    pub degraded: bool,
    /// Which replica of a replicated slice serves a step.
    pub replica_choice: ReplicaChoice,
}

/// Which replica of a replicated slice serves a step (`--replica-choice`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ReplicaChoice {
    /// `replicas[layer % n]` (the next live one if it is down): replicas take turns from
    /// layer to layer. Depends on nothing but the layer, so a sequence's results are the
    /// same whatever else is in the batch.
    #[default]
    Layer,
    /// Per step, balancing the bytes each node reads: the slices with one live home are
    /// counted first, then each replicated slice — the experts with the most tokens first —
    /// goes to its live replica with the fewest bytes so far in the step (ties: the `Layer`
    /// choice). Shorter steps when the step's experts are unevenly spread, but a sequence's
    /// partial sums may then be added in another node order depending on the rest of the
    /// batch (results within float regrouping, not bit-identical from batch to batch).
    Load,
}

/// The routed experts computed by expert nodes.
pub struct RemoteExperts {
    runtime: Arc<tokio::runtime::Runtime>,
    table: Arc<NodeTable>,
    plan: ResolvedPlan,
    n_embd: usize,
    /// Per layer: the routed experts' down type (what their hidden rows are quantized to),
    /// where the layer's experts are held as slices (two rounds); `None` where each expert
    /// is whole on its node (one round) or the layer has no routed experts.
    sliced_down: Vec<Option<GgmlType>>,
    /// The most assignments in one chunk of a sliced layer's two rounds (`None`: what the
    /// protocol's limits allow).
    slice_chunk_slots: Option<usize>,
    policy: FailurePolicy,
    /// (token, expert) assignments dropped in degraded mode.
    dropped: AtomicU64,
    /// When degraded mode last logged (ms since `started`; 0: never).
    dropped_logged_ms: AtomicU64,
    started: Instant,
    next_step: AtomicU64,
    prober: tokio::task::JoinHandle<()>,
}

impl Drop for RemoteExperts {
    fn drop(&mut self) {
        self.prober.abort();
    }
}

/// Which (expert, slice index, replicas) of a layer a routing covers.
type SliceFilter<'a> = dyn Fn(u32, usize, &[usize]) -> bool + 'a;

/// A routed round's work per node, the assignments dropped (degraded mode), and the node
/// that serves each (expert, slice index).
type Routing = (Vec<NodeWork>, Vec<Assignment>, HashMap<(u32, usize), usize>);

/// What one node is asked for in one round of a step: its token rows and assignments.
struct NodeWork {
    node: usize,
    /// Global token index of each local row, ascending.
    tokens: Vec<usize>,
    assignments: Vec<Assignment>,
    /// The index of each of `assignments` in the round's whole assignment list.
    slots: Vec<usize>,
}

/// One round of dispatches of a layer: the routed experts held whole (one round), or one of
/// the two rounds of an exactly split FFN — a dense part, or a layer whose routed experts
/// are held as slices (DESIGN: every node's SwiGLU slice first, then whole rows of down
/// from the joined hidden rows).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Round {
    Routed,
    DenseHidden,
    DenseDown,
    /// Per assignment: the SwiGLU rows of the node's slices of its expert.
    SliceHidden,
    /// Per assignment (the round's "tokens" are the step's assignment slots): the node's
    /// rows of down of its expert, unweighted.
    SliceDown,
}

impl Round {
    fn wire(self) -> (FfnPart, Stage) {
        match self {
            Round::Routed => (FfnPart::Routed, Stage::OneRound),
            Round::DenseHidden => (FfnPart::Dense, Stage::Hidden),
            Round::DenseDown => (FfnPart::Dense, Stage::Down),
            Round::SliceHidden => (FfnPart::Routed, Stage::Hidden),
            Round::SliceDown => (FfnPart::Routed, Stage::Down),
        }
    }

    /// Whether a node's answer has a row per assignment (routed slices).
    fn per_slot(self) -> bool {
        matches!(self, Round::SliceHidden | Round::SliceDown)
    }
}

/// The runs of `tokens` (non-decreasing batch rows: a node's rows, or the token of each
/// assignment of a slice round) that belong to one sequence, given the batch's segments;
/// empty for a batch of one sequence.
fn local_segments(tokens: &[usize], segments: Segments<'_>) -> Vec<usize> {
    let Some(lengths) = segments else {
        return Vec::new();
    };
    let mut ends = lengths.iter().scan(0, |end, &l| {
        *end += l;
        Some(*end)
    });
    let mut out = Vec::new();
    let mut end = ends.next().unwrap_or(0);
    let mut run = 0;
    for &t in tokens {
        while t >= end {
            if run > 0 {
                out.push(run);
                run = 0;
            }
            end = ends.next().unwrap_or(usize::MAX);
        }
        run += 1;
    }
    if run > 0 {
        out.push(run);
    }
    out
}

/// The first message of a link.
fn hello_message(identity: [u8; 32]) -> wire::CoordinatorMessage {
    wire::CoordinatorMessage {
        body: Some(wire::coordinator_message::Body::Hello(
            Hello {
                model_identity: identity,
                coordinator_name: format!("moeshard-{}", std::process::id()),
            }
            .into(),
        )),
    }
}

/// Greets a node and checks its answer: version, model identity, and that it holds every
/// slice in `expected`. Returns its inventory's slice count and weight bytes.
async fn handshake(
    link: &dyn NodeLink,
    identity: [u8; 32],
    expected: &[SliceSpec],
    timeout: Duration,
) -> Result<(usize, u64), String> {
    let answer = tokio::time::timeout(timeout, link.call(hello_message(identity)))
        .await
        .map_err(|_| format!("no answer to the handshake within {timeout:?}"))?
        .map_err(|e| e.to_string())?;
    let reply = match answer.body {
        Some(wire::node_message::Body::Hello(h)) => {
            HelloReply::try_from(h).map_err(|e| format!("bad handshake answer: {e}"))?
        }
        other => return Err(format!("answered the handshake with {other:?}")),
    };
    if let Some(e) = reply.error {
        return Err(format!("refused us: {}", e.message));
    }
    if reply.model_identity != identity {
        return Err(ProtoError::ModelMismatch {
            got: identity_hex(&reply.model_identity),
            want: identity_hex(&identity),
        }
        .to_string());
    }
    for s in expected {
        let held = reply.inventory.slices().iter().any(|h| {
            (h.layer, h.expert, h.ff_start, h.ff_len) == (s.layer, s.expert, s.ff_start, s.ff_len)
                && h.part == part_to_wire(s.part)
        });
        if !held {
            return Err(format!(
                "does not hold layer {} {:?} expert {} rows {}..{}, which the plan places on it",
                s.layer,
                s.part,
                s.expert,
                s.ff_start,
                s.ff_start + s.ff_len
            ));
        }
    }
    // A node computes every slice it holds of an expert it is asked for, and its answer is
    // read by the plan's slices: it must hold no other slice of those experts.
    let planned: std::collections::HashSet<(u32, FfnPart, u32)> = (expected.iter())
        .map(|s| (s.layer, part_to_wire(s.part), s.expert))
        .collect();
    for h in reply.inventory.slices() {
        let extra = planned.contains(&(h.layer, h.part, h.expert))
            && !expected.iter().any(|s| {
                (s.layer, s.expert, s.ff_start, s.ff_len)
                    == (h.layer, h.expert, h.ff_start, h.ff_len)
                    && part_to_wire(s.part) == h.part
            });
        if extra {
            return Err(format!(
                "also holds layer {} {:?} expert {} rows {}..{}, which the plan does not place \
                 on it (it would compute them too): serve it exactly the plan's slices",
                h.layer,
                h.part,
                h.expert,
                h.ff_start,
                h.ff_start + h.ff_len
            ));
        }
    }
    Ok((reply.inventory.slices().len(), reply.inventory.weight_bytes))
}

/// Probes down nodes every [`PROBE_INTERVAL`] until the table is dropped.
async fn probe_down_nodes(table: Weak<NodeTable>) {
    loop {
        tokio::time::sleep(PROBE_INTERVAL).await;
        let Some(table) = table.upgrade() else { return };
        for slot in &table.nodes {
            if slot.up.load(Ordering::SeqCst) {
                continue;
            }
            let Some(reconnect) = &slot.reconnect else {
                continue;
            };
            let link = match tokio::time::timeout(table.call_timeout, reconnect()).await {
                Ok(Ok(link)) => link,
                Ok(Err(e)) => {
                    debug!(node = %slot.name, error = %e, "node still down");
                    continue;
                }
                Err(_) => continue,
            };
            let expected = &slot.expected;
            match handshake(link.as_ref(), table.identity, expected, table.call_timeout).await {
                Ok(_) => {
                    slot.set_link(link);
                    slot.up.store(true, Ordering::SeqCst);
                    info!(node = %slot.name, "node rejoined: identity and slices verified");
                }
                Err(e) => warn!(node = %slot.name, error = %e, "node answered but was refused"),
            }
        }
    }
}

/// A dispatch to a node in this process, left by [`RemoteExperts::spawn_round`] for the
/// thread that waits for its round.
struct HereCall {
    msg: wire::CoordinatorMessage,
    link: Arc<dyn NodeLink>,
    step_id: u64,
    layer: usize,
    node: usize,
    n_rows: usize,
    n_embd: usize,
}

impl RemoteExperts {
    /// Greets every node (protocol version, model identity) and checks that each holds what
    /// `plan` places on it. `nodes` must be in the plan's node order; `routed_down` is each
    /// layer's routed experts' `ffn_down` type (`None` on layers without them).
    pub fn connect(
        runtime: Arc<tokio::runtime::Runtime>,
        nodes: Vec<NodeHandle>,
        plan: ResolvedPlan,
        model_identity: [u8; 32],
        n_embd: usize,
        routed_down: &[Option<GgmlType>],
        policy: FailurePolicy,
    ) -> Result<RemoteExperts, DistributedError> {
        let timeout = policy.deadline.call_timeout();
        for (i, name) in plan.nodes().iter().enumerate() {
            if nodes.get(i).map(|n| &n.name) != Some(name) {
                return Err(DistributedError::UnknownNode(name.clone()));
            }
        }
        check_slice_replicas(&plan)?;
        // All handshakes at once.
        let calls: Vec<_> = nodes
            .iter()
            .enumerate()
            .map(|(i, n)| {
                let link = n.link.clone();
                let expected = plan.node_slices(i);
                runtime.spawn(async move {
                    handshake(link.as_ref(), model_identity, &expected, timeout).await
                })
            })
            .collect();
        for (n, call) in nodes.iter().zip(calls) {
            let peer = n.link.peer().to_owned();
            let refused = |detail: String| DistributedError::Refused {
                node: n.name.clone(),
                peer: peer.clone(),
                detail,
            };
            let (slices, weight_bytes) = runtime
                .block_on(call)
                .map_err(|e| refused(format!("handshake task failed: {e}")))?
                .map_err(refused)?;
            info!(node = %n.name, peer = %peer, slices, weight_bytes, "node ready");
        }
        let table = Arc::new(NodeTable {
            nodes: nodes
                .into_iter()
                .enumerate()
                .map(|(i, n)| NodeSlot {
                    name: n.name,
                    link: RwLock::new(n.link),
                    up: AtomicBool::new(true),
                    reconnect: n.reconnect,
                    expected: plan.node_slices(i),
                    times: DispatchTimes::default(),
                    latency: Histogram::new(DISPATCH_BUCKETS),
                })
                .collect(),
            identity: model_identity,
            call_timeout: timeout,
        });
        let prober = runtime.spawn(probe_down_nodes(Arc::downgrade(&table)));
        let mut sliced_down = Vec::with_capacity(plan.shape().n_layer);
        for layer in 0..plan.shape().n_layer {
            let Some(routed) = plan.shape().part(layer, Part::Routed) else {
                sliced_down.push(None);
                continue;
            };
            let sliced = (0..plan.shape().n_expert).any(|e| {
                plan.slices(layer, Part::Routed, e)
                    .is_some_and(|s| s.len() > 1 || s.iter().any(|p| p.ff != (0..routed.n_ff)))
            });
            let ty = routed_down.get(layer).copied().flatten();
            if sliced && ty.is_none() {
                return Err(DistributedError::Launch(format!(
                    "layer {layer}'s routed experts are sliced but their down type is unknown"
                )));
            }
            sliced_down.push(ty.filter(|_| sliced));
        }
        Ok(RemoteExperts {
            runtime,
            table,
            plan,
            n_embd,
            sliced_down,
            slice_chunk_slots: None,
            policy,
            dropped: AtomicU64::new(0),
            dropped_logged_ms: AtomicU64::new(0),
            started: Instant::now(),
            next_step: AtomicU64::new(1),
            prober,
        })
    }

    /// Cuts sliced layers' two rounds into chunks of at most `slots` assignments (whole
    /// experts per chunk): what the protocol's limits force on big batches, made small to
    /// test it.
    pub fn with_slice_chunks(mut self, slots: usize) -> RemoteExperts {
        self.slice_chunk_slots = Some(slots.max(1));
        self
    }

    /// The nodes' names, in plan order.
    pub fn node_names(&self) -> Vec<String> {
        self.table.nodes.iter().map(|n| n.name.clone()).collect()
    }

    fn live(&self) -> Vec<bool> {
        self.table
            .nodes
            .iter()
            .map(|n| n.up.load(Ordering::SeqCst))
            .collect()
    }

    fn mark_down(&self, node: usize, why: &str) {
        let slot = &self.table.nodes[node];
        if slot.up.swap(false, Ordering::SeqCst) {
            warn!(node = %slot.name, peer = %slot.link().peer(), reason = why, "node marked down");
        }
    }

    /// Groups `assignments` by node: each slice of an expert whose replicas pass `keep`
    /// goes to one live replica; a node holding several slices of the expert gets the
    /// assignment once (it computes all of them). An expert with a slice that has no live
    /// replica is an error naming it — or, in degraded mode, its assignments are left out
    /// and returned second.
    /// [`ReplicaChoice::Load`]: the replica of each replicated (expert, slice index) of the
    /// step, balancing the bytes each node reads in it.
    fn balance_replicas(
        &self,
        layer: usize,
        assignments: &[Assignment],
        live: &[bool],
        keep: &SliceFilter<'_>,
    ) -> HashMap<(u32, usize), usize> {
        let mut tokens: HashMap<u32, usize> = HashMap::new();
        for a in assignments {
            *tokens.entry(a.expert).or_default() += 1;
        }
        // Busiest experts first; ties by id, so the choice is a function of the step.
        let mut experts: Vec<(u32, usize)> = tokens.into_iter().collect();
        experts.sort_unstable_by_key(|&(e, n)| (std::cmp::Reverse(n), e));
        let mut load = vec![0usize; self.table.nodes.len()];
        let mut replicated: Vec<(u32, usize, Vec<usize>, usize)> = Vec::new();
        for &(e, _) in &experts {
            let Some(slices) = self.plan.slices(layer, Part::Routed, e as usize) else {
                continue;
            };
            for (i, s) in (slices.iter().enumerate()).filter(|(i, s)| keep(e, *i, &s.replicas)) {
                let homes: Vec<usize> = (s.replicas.iter().copied())
                    .filter(|&r| live.get(r).copied().unwrap_or(false))
                    .collect();
                match homes.as_slice() {
                    [] => {}
                    [one] => load[*one] += s.ff.len(),
                    _ => replicated.push((e, i, homes, s.ff.len())),
                }
            }
        }
        let mut chosen = HashMap::new();
        for (e, i, homes, bytes) in replicated {
            let slices = self.plan.slices(layer, Part::Routed, e as usize);
            let default = slices
                .and_then(|s| s.get(i))
                .and_then(|s| pick_live(&s.replicas, layer, live));
            let best = (homes.iter().copied())
                .min_by_key(|&n| (load[n], Some(n) != default, n))
                .unwrap_or(homes[0]);
            load[best] += bytes;
            chosen.insert((e, i), best);
        }
        chosen
    }

    fn route(
        &self,
        layer: usize,
        n_tokens: usize,
        assignments: &[Assignment],
        live: &[bool],
        keep: &SliceFilter<'_>,
    ) -> Result<Routing, EngineError> {
        let n_nodes = self.table.nodes.len();
        let chosen = match self.policy.replica_choice {
            ReplicaChoice::Layer => HashMap::new(),
            ReplicaChoice::Load => self.balance_replicas(layer, assignments, live, keep),
        };
        // Per node: (index in `assignments`, assignment).
        let mut per_node: Vec<Vec<(usize, Assignment)>> = vec![Vec::new(); n_nodes];
        let mut nodes: Vec<usize> = Vec::new();
        // (expert, its holders) of every slice without a live replica: all named at once.
        let mut missing: Vec<(u32, Vec<usize>)> = Vec::new();
        let mut dropped: Vec<Assignment> = Vec::new();
        let mut served: HashMap<(u32, usize), usize> = HashMap::new();
        for (slot, a) in assignments.iter().enumerate() {
            let slices = self
                .plan
                .slices(layer, Part::Routed, a.expert as usize)
                .ok_or_else(|| {
                    EngineError::Node(format!(
                        "layer {layer} expert {} is not placed on any node",
                        a.expert
                    ))
                })?;
            nodes.clear();
            let mut lost = false;
            let kept = (slices.iter().enumerate()).filter(|(i, s)| keep(a.expert, *i, &s.replicas));
            for (i, s) in kept {
                let choice = chosen.get(&(a.expert, i)).copied();
                match choice.or_else(|| pick_live(&s.replicas, layer, live)) {
                    Some(node) => {
                        nodes.push(node);
                        served.insert((a.expert, i), node);
                    }
                    None => {
                        lost = true;
                        if !missing.iter().any(|(e, _)| *e == a.expert) {
                            missing.push((a.expert, s.replicas.clone()));
                        }
                    }
                }
            }
            if lost {
                // All of the expert or none of it: a part of its slices is no FFN.
                dropped.push(*a);
                continue;
            }
            nodes.sort_unstable();
            nodes.dedup();
            for &node in &nodes {
                per_node[node].push((slot, *a));
            }
        }
        if !missing.is_empty() && !self.policy.degraded {
            missing.sort_unstable();
            let (experts, nodes) = self.describe_missing(&missing, ", ");
            return Err(EngineError::Node(format!(
                "layer {layer}: experts {experts} have no live replica (held by {nodes}, all down)"
            )));
        }
        if !missing.is_empty() {
            self.count_dropped(layer, &missing, dropped.len());
        }
        let work = per_node
            .into_iter()
            .enumerate()
            .filter(|(_, a)| !a.is_empty())
            .map(|(node, global)| {
                let mut used = vec![false; n_tokens];
                for (_, a) in &global {
                    used[a.token as usize] = true;
                }
                let tokens: Vec<usize> = (0..n_tokens).filter(|&t| used[t]).collect();
                let mut local = vec![0u32; n_tokens];
                for (i, &t) in tokens.iter().enumerate() {
                    local[t] = i as u32;
                }
                let (slots, assignments) = global
                    .into_iter()
                    .map(|(slot, a)| {
                        let local = Assignment {
                            token: local[a.token as usize],
                            ..a
                        };
                        (slot, local)
                    })
                    .unzip();
                NodeWork {
                    node,
                    tokens,
                    assignments,
                    slots,
                }
            })
            .collect();
        Ok((work, dropped, served))
    }

    /// The experts of `missing` (expert, holders) and the names of their holders, each
    /// joined with `sep`.
    fn describe_missing(&self, missing: &[(u32, Vec<usize>)], sep: &str) -> (String, String) {
        let experts: Vec<String> = missing.iter().map(|(e, _)| e.to_string()).collect();
        let mut holders: Vec<usize> = missing.iter().flat_map(|(_, h)| h.clone()).collect();
        holders.sort_unstable();
        holders.dedup();
        let names: Vec<&str> = holders
            .iter()
            .map(|&h| self.table.nodes[h].name.as_str())
            .collect();
        (experts.join(sep), names.join(sep))
    }

    /// Degraded mode: counts assignments dropped for experts without a live replica and
    /// says so loudly (at most every [`DEGRADED_LOG_INTERVAL`]: once per layer and step
    /// would drown the log).
    fn count_dropped(&self, layer: usize, missing: &[(u32, Vec<usize>)], n: usize) {
        let total = self.dropped.fetch_add(n as u64, Ordering::Relaxed) + n as u64;
        let now = self.started.elapsed().as_millis() as u64;
        let last = self.dropped_logged_ms.load(Ordering::Relaxed);
        let due = last == 0 || now.saturating_sub(last) >= DEGRADED_LOG_INTERVAL.as_millis() as u64;
        if due
            && self
                .dropped_logged_ms
                .compare_exchange(last, now.max(1), Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            let (experts, nodes) = self.describe_missing(missing, ",");
            error!(
                layer,
                %experts,
                nodes_down = %nodes,
                dropped_total = total,
                "DEGRADED: experts without a live replica are dropped and the tokens' other \
                 experts renormalized; outputs differ from the full model"
            );
        }
    }

    /// The dense part's slices whose replicas pass `keep`, each on one live replica; in the
    /// down round, only nodes whose slices hold some of down's rows.
    fn route_dense(
        &self,
        layer: usize,
        round: Round,
        n_tokens: usize,
        live: &[bool],
        keep: &dyn Fn(&[usize]) -> bool,
    ) -> Result<Vec<NodeWork>, EngineError> {
        let slices = self.plan.slices(layer, Part::Dense, 0).ok_or_else(|| {
            EngineError::Node(format!("layer {layer}'s dense part is not placed"))
        })?;
        let mut nodes = Vec::new();
        for s in slices.iter().filter(|s| keep(&s.replicas)) {
            let node = pick_live(&s.replicas, layer, live)
                .ok_or_else(|| self.no_live_replica(layer, "dense part", 0, &s.ff, &s.replicas))?;
            nodes.push(node);
        }
        nodes.sort_unstable();
        nodes.dedup();
        if round == Round::DenseDown {
            nodes.retain(|&n| self.answer_width(n, layer, round, &[]) > 0);
        }
        Ok(nodes
            .into_iter()
            .map(|node| NodeWork {
                node,
                tokens: (0..n_tokens).collect(),
                assignments: Vec::new(),
                slots: Vec::new(),
            })
            .collect())
    }

    /// The layer's dense part's intermediate size.
    fn dense_n_ff(&self, layer: usize) -> Result<usize, EngineError> {
        (self.plan.shape().layers.get(layer))
            .and_then(|l| l.dense)
            .map(|d| d.n_ff)
            .ok_or_else(|| EngineError::Node(format!("layer {layer} has no dense part")))
    }

    /// Where a node's answer in a dense round goes in the joined row: per dense slice it
    /// holds of the layer (ff order), its ff rows (hidden round) or its rows of down.
    /// Looked up in the layer's dense slices only: it runs for every dense round.
    fn dense_places(&self, node: usize, layer: usize, round: Round) -> Vec<std::ops::Range<usize>> {
        let n_ff = self.dense_n_ff(layer).unwrap_or(0);
        let slices = self.plan.slices(layer, Part::Dense, 0).unwrap_or_default();
        self.places(node, slices, n_ff, round)
    }

    /// Where a node's answer row for an assignment of `expert` goes in the expert's joined
    /// row, in a routed slice round: per slice of the expert it holds (ff order), its ff
    /// rows (hidden round) or its rows of down.
    fn slice_places(
        &self,
        node: usize,
        layer: usize,
        expert: u32,
        round: Round,
    ) -> Vec<std::ops::Range<usize>> {
        let n_ff = self.routed_n_ff(layer);
        let slices = (self.plan.slices(layer, Part::Routed, expert as usize)).unwrap_or_default();
        self.places(node, slices, n_ff, round)
    }

    /// The places of `node`'s slices among `slices` (of an FFN of `n_ff`) in `round`.
    fn places(
        &self,
        node: usize,
        slices: &[shared::placement::PlacedSlice],
        n_ff: usize,
        round: Round,
    ) -> Vec<std::ops::Range<usize>> {
        (slices.iter())
            .filter(|s| s.replicas.contains(&node))
            .map(|s| match round {
                Round::DenseDown | Round::SliceDown => {
                    shared::placement::slice_down_rows(s.ff.start, s.ff.len(), n_ff, self.n_embd)
                }
                _ => s.ff.clone(),
            })
            .collect()
    }

    /// The routed experts' intermediate size in `layer` (0 if it has none).
    fn routed_n_ff(&self, layer: usize) -> usize {
        (self.plan.shape().part(layer, Part::Routed)).map_or(0, |f| f.n_ff)
    }

    /// `work` less the nodes whose answer would have no columns: in a sliced layer's down
    /// round, a node whose slices of the routed experts hold no rows of down (thin slices of
    /// a wide model) has nothing to add.
    fn without_empty(&self, layer: usize, round: Round, mut work: Vec<NodeWork>) -> Vec<NodeWork> {
        if round == Round::SliceDown {
            work.retain(|w| self.answer_width(w.node, layer, round, &w.assignments) > 0);
        }
        work
    }

    /// The width of a node's answer rows in `round` for its `assignments` (routed rounds):
    /// for routed slices, the widest of its experts' joined places (as the node computes it).
    fn answer_width(
        &self,
        node: usize,
        layer: usize,
        round: Round,
        assignments: &[Assignment],
    ) -> usize {
        match round {
            Round::Routed => self.n_embd,
            Round::DenseHidden | Round::DenseDown => self
                .dense_places(node, layer, round)
                .iter()
                .map(|r| r.len())
                .sum(),
            Round::SliceHidden | Round::SliceDown => {
                let mut experts: Vec<u32> = assignments.iter().map(|a| a.expert).collect();
                experts.sort_unstable();
                experts.dedup();
                (experts.into_iter())
                    .map(|e| {
                        (self.slice_places(node, layer, e, round).iter())
                            .map(|r| r.len())
                            .sum::<usize>()
                    })
                    .max()
                    .unwrap_or(0)
            }
        }
    }

    fn no_live_replica(
        &self,
        layer: usize,
        what: &str,
        expert: u32,
        ff: &std::ops::Range<usize>,
        replicas: &[usize],
    ) -> EngineError {
        let names: Vec<&str> = replicas
            .iter()
            .map(|&r| self.table.nodes[r].name.as_str())
            .collect();
        EngineError::Node(format!(
            "layer {layer} {what} {expert} rows {}..{} has no live replica (held by {}, all down)",
            ff.start,
            ff.end,
            names.join(", ")
        ))
    }

    /// Starts one round of dispatches; each answer arrives on `tx` as (node, outcome). The
    /// last dispatch, if its node lives in this process, is not started but returned, for
    /// [`RemoteExperts::call_here`] on the thread that waits for the round: that thread then
    /// computes it instead of waking another one to do it and sleeping (on a machine of few
    /// cores, a second woken thread was often queued behind the first on one core while the
    /// other idled).
    #[allow(clippy::too_many_arguments)]
    fn spawn_round(
        &self,
        step_id: u64,
        layer: usize,
        round: Round,
        n_tokens: usize,
        inputs: &[Activations],
        work: &[NodeWork],
        segments: Segments<'_>,
        tx: &mpsc::Sender<(usize, Result<Partials, String>)>,
    ) -> Option<HereCall> {
        let mut here = None;
        for (i, w) in work.iter().enumerate() {
            let rows: Vec<Activations> = if w.tokens.len() == n_tokens {
                inputs.to_vec()
            } else {
                inputs.iter().map(|x| x.gather(&w.tokens)).collect()
            };
            let (part, stage) = round.wire();
            let msg = wire::CoordinatorMessage {
                body: Some(wire::coordinator_message::Body::Dispatch(
                    DispatchRequest {
                        step_id,
                        layer: layer as u32,
                        part,
                        stage,
                        inputs: rows,
                        assignments: w.assignments.clone(),
                        segments: local_segments(&w.tokens, segments),
                    }
                    .into(),
                )),
            };
            let slot = &self.table.nodes[w.node];
            let link = slot.link();
            let tx = tx.clone();
            // Routed slices answer a row per assignment.
            let n_rows = if round.per_slot() {
                w.assignments.len()
            } else {
                w.tokens.len()
            };
            let (node, n_embd) = (
                w.node,
                self.answer_width(w.node, layer, round, &w.assignments),
            );
            if i + 1 == work.len() && link.is_here() {
                here = Some(HereCall {
                    msg,
                    link,
                    step_id,
                    layer,
                    node,
                    n_rows,
                    n_embd,
                });
                continue;
            }
            let timeout = slot.times.deadline(&self.policy.deadline, n_rows);
            let table = Arc::clone(&self.table);
            self.runtime.spawn(async move {
                let sent = Instant::now();
                let outcome = match tokio::time::timeout(timeout, link.call(msg)).await {
                    Err(_) => Err(format!("no answer within the deadline of {timeout:?}")),
                    Ok(Err(e)) => Err(e.to_string()),
                    Ok(Ok(answer)) => {
                        partials_from_reply(answer, step_id, layer as u32, n_rows, n_embd)
                    }
                };
                if outcome.is_ok() {
                    table.nodes[node].record_answer(n_rows, sent.elapsed());
                }
                // The receiver is gone only if the step was abandoned.
                let _ = tx.send((node, outcome));
            });
        }
        here
    }

    /// Computes a round's in-process dispatch ([`RemoteExperts::spawn_round`]) on this thread
    /// and sends its outcome on `tx` as the spawned ones do. No deadline: the node is this
    /// process.
    fn call_here(&self, call: HereCall, tx: &mpsc::Sender<(usize, Result<Partials, String>)>) {
        let sent = Instant::now();
        let (layer, n_rows) = (call.layer as u32, call.n_rows);
        let outcome = match call.link.call_here(call.msg) {
            Err(e) => Err(e.to_string()),
            Ok(answer) => partials_from_reply(answer, call.step_id, layer, n_rows, call.n_embd),
        };
        if outcome.is_ok() {
            self.table.nodes[call.node].record_answer(n_rows, sent.elapsed());
        }
        let _ = tx.send((call.node, outcome));
    }

    /// Sends the step's work, re-sends the part of nodes that fail to live replicas, and
    /// returns the [`Pending`] that gathers everything.
    fn run_step(
        &self,
        layer: usize,
        round: Round,
        inputs: &[Activations],
        assignments: &[Assignment],
        segments: Segments<'_>,
    ) -> Result<Pending<'_>, EngineError> {
        let n_tokens = inputs.first().map_or(0, Activations::n_tokens);
        // The widest rows the round moves (the hidden size, or the FFN's n_ff), and how many:
        // a routed slice round's answers have a row per assignment.
        let width = self.n_embd.max(match round {
            Round::Routed => 0,
            Round::DenseHidden | Round::DenseDown => self.dense_n_ff(layer)?,
            Round::SliceHidden | Round::SliceDown => self.routed_n_ff(layer),
        });
        let (rows, max_rows) = if round.per_slot() {
            (assignments.len(), proto::limits::MAX_DISPATCH_ASSIGNMENTS)
        } else {
            (n_tokens, proto::limits::MAX_DISPATCH_TOKENS)
        };
        let max_rows = max_rows.min(proto::limits::MAX_DISPATCH_VALUES / width.max(1));
        // (A slice down round's input rows are its assignments.)
        let max_inputs = if round == Round::SliceDown {
            max_rows
        } else {
            proto::limits::MAX_DISPATCH_TOKENS.min(max_rows.max(rows))
        };
        if rows > max_rows || n_tokens > max_inputs {
            return Err(EngineError::Node(format!(
                "layer {layer}: a dispatch of {rows} rows exceeds the protocol's limit of \
                 {max_rows} rows of {width}: evaluate the prompt in smaller batches"
            )));
        }
        let live = self.live();
        let all = |_: &[usize]| true;
        let all_slices = |_: u32, _: usize, _: &[usize]| true;
        let (work, dropped, served) = match round {
            Round::Routed | Round::SliceHidden | Round::SliceDown => {
                let (work, dropped, served) =
                    self.route(layer, n_tokens, assignments, &live, &all_slices)?;
                (self.without_empty(layer, round, work), dropped, served)
            }
            Round::DenseHidden | Round::DenseDown => (
                self.route_dense(layer, round, n_tokens, &live, &all)?,
                Vec::new(),
                HashMap::new(),
            ),
        };
        if round.per_slot() && !dropped.is_empty() {
            // A sliced expert's lost slices cannot be left out: no part of a slice round is
            // dropped (degraded mode drops whole experts placed whole).
            let mut experts: Vec<u32> = dropped.iter().map(|a| a.expert).collect();
            experts.sort_unstable();
            experts.dedup();
            return Err(EngineError::Node(format!(
                "layer {layer}: sliced experts {experts:?} have a slice with no live replica"
            )));
        }
        let step_id = self.next_step.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel();
        let mut here = self.spawn_round(
            step_id, layer, round, n_tokens, inputs, &work, segments, &tx,
        );
        // What a retry needs once the caller's borrows are gone.
        let inputs = inputs.to_vec();
        let assignments = assignments.to_vec();
        let segments: Option<Vec<usize>> = segments.map(<[usize]>::to_vec);
        // The width of the round's result rows.
        let n_embd = match round {
            Round::Routed | Round::DenseDown | Round::SliceDown => self.n_embd,
            Round::DenseHidden => self.dense_n_ff(layer)?,
            Round::SliceHidden => self.routed_n_ff(layer),
        };
        Ok(Pending::new(move |out: &mut [f32]| {
            if let Some(call) = here.take() {
                self.call_here(call, &tx);
            }
            if out.len() != rows * n_embd {
                return Err(EngineError::Node(format!(
                    "output of {} values for {rows} rows",
                    out.len()
                )));
            }
            let mut live = live;
            let mut work = work;
            let mut dropped = dropped;
            let mut served = served;
            // (node, its rows, its assignments' slots and experts, its answer) in the order
            // they are added.
            type Answer = (usize, Vec<usize>, Vec<(usize, u32)>, Partials);
            let mut done: Vec<Answer> = Vec::new();
            let mut errors: Vec<String> = Vec::new();
            loop {
                let mut results: Vec<(usize, Result<Partials, String>)> = Vec::new();
                for _ in 0..work.len() {
                    results.push(rx.recv().map_err(|_| {
                        EngineError::Node(format!("layer {layer}: a dispatch task was lost"))
                    })?);
                }
                results.sort_by_key(|(node, _)| *node);
                let mut failed: Vec<usize> = Vec::new();
                for (node, outcome) in results {
                    let w = work.iter().find(|w| w.node == node);
                    let tokens = w.map(|w| w.tokens.clone()).unwrap_or_default();
                    let slots = w
                        .map(|w| {
                            let experts = w.assignments.iter().map(|a| a.expert);
                            w.slots.iter().copied().zip(experts).collect()
                        })
                        .unwrap_or_default();
                    match outcome {
                        Ok(p) => done.push((node, tokens, slots, p)),
                        Err(e) => {
                            let slot = &self.table.nodes[node];
                            let msg = format!(
                                "node {} ({}), layer {layer}: {e}",
                                slot.name,
                                slot.link().peer()
                            );
                            self.mark_down(node, &msg);
                            errors.push(msg);
                            failed.push(node);
                        }
                    }
                }
                if failed.is_empty() {
                    break;
                }
                // Re-send what the failed nodes held to live replicas of the same slices.
                let before = live.clone();
                for &f in &failed {
                    live[f] = false;
                }
                let was_failed = |replicas: &[usize]| {
                    pick_live(replicas, layer, &before).is_some_and(|n| failed.contains(&n))
                };
                // Routed slices: exactly those the failed nodes were serving (with
                // `--replica-choice load` not necessarily the default replica).
                let served_by_failed = |expert: u32, i: usize, _: &[usize]| {
                    served.get(&(expert, i)).is_some_and(|n| failed.contains(n))
                };
                let retry = match round {
                    Round::Routed if self.policy.degraded => {
                        // Whatever is lost now must be lost for every token of the step, and
                        // some of a lost expert's slices may already be summed: start the
                        // step over on the live nodes.
                        done.clear();
                        self.route(layer, n_tokens, &assignments, &live, &all_slices)
                            .map(|(w, d, s)| {
                                dropped = d;
                                served = s;
                                w
                            })
                    }
                    Round::Routed | Round::SliceHidden | Round::SliceDown => self
                        .route(layer, n_tokens, &assignments, &live, &served_by_failed)
                        .and_then(|(w, d, s)| {
                            if round.per_slot() && !d.is_empty() {
                                Err(EngineError::Node(format!(
                                    "layer {layer}: a sliced expert's slice has no live replica"
                                )))
                            } else {
                                served.extend(s);
                                Ok(self.without_empty(layer, round, w))
                            }
                        }),
                    Round::DenseHidden | Round::DenseDown => {
                        self.route_dense(layer, round, n_tokens, &live, &was_failed)
                    }
                };
                work = retry.map_err(|e| {
                    let why = match e {
                        EngineError::Node(m) => m,
                        other => other.to_string(),
                    };
                    EngineError::Node(format!("{}; {why}", errors.join("; ")))
                })?;
                info!(
                    layer,
                    nodes = ?work.iter().map(|w| self.table.nodes[w.node].name.as_str()).collect::<Vec<_>>(),
                    "re-sending a failed node's work to replicas"
                );
                if let Some(call) = self.spawn_round(
                    step_id,
                    layer,
                    round,
                    n_tokens,
                    &inputs,
                    &work,
                    segments.as_deref(),
                    &tx,
                ) {
                    self.call_here(call, &tx);
                }
            }
            if round.per_slot() {
                // Each node's pieces of an assignment's hidden row (or of its expert's
                // output row) go to their places; a slice answered twice (by a failed node,
                // then by a replica) is the same values.
                for (node, _, slots, p) in &done {
                    let w = p.n_embd();
                    // An expert's places, looked up once per node (not per assignment).
                    let mut places: HashMap<u32, Vec<std::ops::Range<usize>>> = HashMap::new();
                    for (src, &(slot, expert)) in p.data().chunks_exact(w.max(1)).zip(slots) {
                        let dst = &mut out[slot * n_embd..(slot + 1) * n_embd];
                        let mut at = 0;
                        let expert_places = places
                            .entry(expert)
                            .or_insert_with(|| self.slice_places(*node, layer, expert, round));
                        for r in expert_places.iter() {
                            dst[r.clone()].copy_from_slice(&src[at..at + r.len()]);
                            at += r.len();
                        }
                    }
                }
                debug!(step_id, layer, ?round, answers = done.len(), "gathered");
                return Ok(());
            }
            if round != Round::Routed {
                // Each node's slices of the hidden rows (or of the output rows) go to their
                // places, as above.
                for (node, _, _, p) in &done {
                    let places = self.dense_places(*node, layer, round);
                    let w = p.n_embd();
                    for (src, dst) in p
                        .data()
                        .chunks_exact(w.max(1))
                        .zip(out.chunks_exact_mut(n_embd))
                    {
                        let mut at = 0;
                        for r in &places {
                            dst[r.clone()].copy_from_slice(&src[at..at + r.len()]);
                            at += r.len();
                        }
                    }
                }
                debug!(step_id, layer, ?round, answers = done.len(), "gathered");
                return Ok(());
            }
            // Add in the plan's node order (then retries): a token's first partial is
            // copied, the next added.
            out.fill(0.0);
            let mut seen = vec![false; n_tokens];
            for (_, tokens, _, p) in &done {
                for (row, &t) in p.data().chunks_exact(n_embd).zip(tokens) {
                    let dst = &mut out[t * n_embd..(t + 1) * n_embd];
                    if seen[t] {
                        dst.iter_mut().zip(row).for_each(|(o, v)| *o += v);
                    } else {
                        dst.copy_from_slice(row);
                        seen[t] = true;
                    }
                }
            }
            if !dropped.is_empty() {
                renormalize(out, n_embd, &assignments, &dropped);
            }
            debug!(step_id, layer, answers = done.len(), "gathered");
            Ok(())
        }))
    }
}

/// Degraded mode: scales each token's sum of the experts it kept by (all its routing
/// weights) ÷ (the weights of the experts kept), as if the router had renormalized over
/// the live experts only; a token that lost every expert keeps a zero sum.
fn renormalize(out: &mut [f32], n_embd: usize, assignments: &[Assignment], dropped: &[Assignment]) {
    let n_tokens = out.len() / n_embd.max(1);
    let mut total = vec![0f32; n_tokens];
    let mut lost = vec![0f32; n_tokens];
    for a in assignments {
        if let Some(t) = total.get_mut(a.token as usize) {
            *t += a.weight;
        }
    }
    for a in dropped {
        if let Some(l) = lost.get_mut(a.token as usize) {
            *l += a.weight;
        }
    }
    for (t, row) in out.chunks_exact_mut(n_embd.max(1)).enumerate() {
        if lost[t] == 0.0 {
            continue;
        }
        let kept = total[t] - lost[t];
        let scale = if kept > 0.0 { total[t] / kept } else { 0.0 };
        row.iter_mut().for_each(|v| *v *= scale);
    }
}

/// A node computes every slice it holds of an expert it gets tokens for, so a node holding
/// several slices of one expert must be the one picked for each of them: refuse plans where
/// such slices have replicas (a replica could be picked instead, and the slice counted twice).
fn check_slice_replicas(plan: &ResolvedPlan) -> Result<(), DistributedError> {
    for node in 0..plan.nodes().len() {
        let slices = plan.node_slices(node);
        for w in slices.windows(2) {
            let (a, b) = (w[0], w[1]);
            if (a.layer, a.part, a.expert) != (b.layer, b.part, b.expert) {
                continue;
            }
            let replicated = plan
                .slices(a.layer as usize, a.part, a.expert as usize)
                .is_some_and(|s| s.iter().any(|p| p.replicas.len() > 1));
            if replicated {
                return Err(DistributedError::Launch(format!(
                    "node {} holds several slices of layer {} {:?} expert {} and some of them \
                     have replicas: not supported (give each node one slice per expert)",
                    plan.nodes()[node],
                    a.layer,
                    a.part,
                    a.expert
                )));
            }
        }
    }
    Ok(())
}

/// The replica serving a slice in layer `layer`: replicas take turns from layer to layer
/// (so they share the work while each expert's tokens of a step stay on one node), skipping
/// nodes that are down. The choice depends only on the layer and the live nodes, never on
/// the batch, so a sequence's results do not depend on what else is in the step.
fn pick_live(replicas: &[usize], layer: usize, live: &[bool]) -> Option<usize> {
    let n = replicas.len();
    (0..n)
        .map(|i| replicas[(layer + i) % n])
        .find(|&r| live.get(r).copied().unwrap_or(false))
}

/// The assignment slots in chunks of whole experts (each expert's slots in one chunk), at
/// most `max_slots` per chunk unless one expert alone has more; slots ascending in each.
fn slot_chunks(assignments: &[Assignment], max_slots: usize) -> Vec<Vec<usize>> {
    if assignments.len() <= max_slots {
        return vec![(0..assignments.len()).collect()];
    }
    let mut by_expert: std::collections::BTreeMap<u32, Vec<usize>> = Default::default();
    for (slot, a) in assignments.iter().enumerate() {
        by_expert.entry(a.expert).or_default().push(slot);
    }
    let mut chunks: Vec<Vec<usize>> = vec![Vec::new()];
    for slots in by_expert.into_values() {
        let last = chunks.last_mut().expect("non-empty");
        if !last.is_empty() && last.len() + slots.len() > max_slots {
            chunks.push(slots);
        } else {
            last.extend(slots);
        }
    }
    for c in &mut chunks {
        c.sort_unstable();
    }
    chunks
}

/// The assignments of `slots`, in order.
fn pick(assignments: &[Assignment], slots: &[usize]) -> Vec<Assignment> {
    slots.iter().map(|&s| assignments[s]).collect()
}

fn part_to_wire(p: Part) -> FfnPart {
    match p {
        Part::Routed => FfnPart::Routed,
        Part::Dense => FfnPart::Dense,
    }
}

impl ExpertExecutor for RemoteExperts {
    fn start(
        &self,
        layer: usize,
        inputs: &[Activations],
        assignments: &[Assignment],
        segments: Segments<'_>,
    ) -> Result<Pending<'_>, EngineError> {
        let Some(down_type) = self.sliced_down.get(layer).copied().flatten() else {
            return self.run_step(layer, Round::Routed, inputs, assignments, segments);
        };
        // Experts held as slices: two rounds, exactly as a dense part is split. The
        // assignments go in chunks of whole experts (every slot of an expert in one chunk,
        // so its tokens are computed together, in the single-process float order) small
        // enough for the protocol's limits; usually one chunk.
        debug_assert!(
            assignments.windows(2).all(|w| w[0].token <= w[1].token),
            "assignments are token-major"
        );
        let n_ff = self.routed_n_ff(layer);
        let n_embd = self.n_embd;
        let max_slots = self.slice_chunk_slots.unwrap_or(
            (proto::limits::MAX_DISPATCH_VALUES / n_ff.max(n_embd).max(1))
                .min(proto::limits::MAX_DISPATCH_ASSIGNMENTS),
        );
        let chunks = slot_chunks(assignments, max_slots);
        // The first chunk's first round starts now (the nodes work while the coordinator
        // computes its shared expert); the rest follow in `wait`.
        let first = pick(assignments, &chunks[0]);
        let first_round = self.run_step(layer, Round::SliceHidden, inputs, &first, segments)?;
        let inputs = if chunks.len() > 1 {
            inputs.to_vec()
        } else {
            Vec::new()
        };
        let assignments = assignments.to_vec();
        let segments: Option<Vec<usize>> = segments.map(<[usize]>::to_vec);
        Ok(Pending::new(move |out: &mut [f32]| {
            let mut outputs = vec![0.0f32; assignments.len() * n_embd];
            let mut hidden_round = Some(first_round);
            for chunk in &chunks {
                let sub = pick(&assignments, chunk);
                let round = match hidden_round.take() {
                    Some(r) => r,
                    None => self.run_step(
                        layer,
                        Round::SliceHidden,
                        &inputs,
                        &sub,
                        segments.as_deref(),
                    )?,
                };
                let mut hidden = vec![0.0f32; sub.len() * n_ff];
                round.wait(&mut hidden)?;
                // Each assignment's whole hidden row, quantized once, as the single-process
                // engine quantizes it for down.
                let hidden = Activations::quantize(Kernels::get(), down_type, &hidden, n_ff);
                let mut rows = vec![0.0f32; sub.len() * n_embd];
                // The round's rows are the assignments, token-major: each sequence's runs.
                let slot_tokens: Vec<usize> = sub.iter().map(|a| a.token as usize).collect();
                let slot_segments = (segments.as_deref())
                    .map(|_| local_segments(&slot_tokens, segments.as_deref()));
                self.run_step(
                    layer,
                    Round::SliceDown,
                    &[hidden],
                    &shared::moe::per_slot_rows(&sub),
                    slot_segments.as_deref(),
                )?
                .wait(&mut rows)?;
                for (row, &slot) in rows.chunks_exact(n_embd).zip(chunk) {
                    outputs[slot * n_embd..(slot + 1) * n_embd].copy_from_slice(row);
                }
            }
            // The weighted sum in routing order, as a node holding whole experts adds it.
            add_weighted(out, n_embd, &assignments, |slot| {
                &outputs[slot * n_embd..(slot + 1) * n_embd]
            });
            Ok(())
        }))
    }

    fn node_stats(&self) -> Vec<(String, Result<wire::Stats, EngineError>)> {
        let ask = wire::CoordinatorMessage {
            body: Some(wire::coordinator_message::Body::Stats(
                wire::StatsRequest {},
            )),
        };
        self.table
            .nodes
            .iter()
            .enumerate()
            .map(|(i, n)| {
                let link = n.link();
                let peer = link.peer().to_owned();
                let msg = ask.clone();
                let timeout = self.table.call_timeout;
                let answer = self
                    .runtime
                    .block_on(async move { tokio::time::timeout(timeout, link.call(msg)).await });
                let stats = match answer {
                    Ok(Ok(wire::NodeMessage {
                        body: Some(wire::node_message::Body::Stats(s)),
                    })) => Ok(s),
                    Ok(Ok(other)) => Err(format!("answered a stats request with {other:?}")),
                    Ok(Err(e)) => Err(e.to_string()),
                    Err(_) => Err(format!("no answer within {timeout:?}")),
                };
                if let Err(detail) = &stats {
                    // A node that does not answer is down until the prober verifies it again.
                    self.mark_down(i, detail);
                }
                let stats = stats.map_err(|detail| {
                    EngineError::Node(format!("node {} ({peer}): {detail}", n.name))
                });
                (n.name.clone(), stats)
            })
            .collect()
    }

    fn node_health(&self) -> Vec<(String, bool)> {
        self.table
            .nodes
            .iter()
            .map(|n| (n.name.clone(), n.up.load(Ordering::SeqCst)))
            .collect()
    }

    fn ready(&self) -> Result<(), String> {
        let live = self.live();
        for (layer, ls) in self.plan.shape().layers.iter().enumerate() {
            for part in [Part::Routed, Part::Dense] {
                let n_expert = match (part, ls.routed, ls.dense) {
                    (Part::Routed, Some(_), _) => self.plan.shape().n_expert,
                    (Part::Dense, _, Some(_)) => 1,
                    _ => 0,
                };
                for expert in 0..n_expert {
                    let Some(slices) = self.plan.slices(layer, part, expert) else {
                        continue;
                    };
                    for s in slices {
                        if pick_live(&s.replicas, layer, &live).is_none() {
                            return Err(format!(
                                "layer {layer} {} {expert} has no live node",
                                if part == Part::Routed {
                                    "expert"
                                } else {
                                    "dense part"
                                }
                            ));
                        }
                    }
                }
            }
        }
        Ok(())
    }

    fn dispatch_metrics(&self) -> Option<DispatchMetrics> {
        let nodes = &self.table.nodes;
        Some(DispatchMetrics {
            latency: nodes
                .iter()
                .map(|n| (n.name.clone(), n.latency.snapshot()))
                .collect(),
            decode_deadline: nodes
                .iter()
                .map(|n| (n.name.clone(), n.times.deadline(&self.policy.deadline, 1)))
                .collect(),
            degraded_mode: self.policy.degraded,
            dropped_assignments: self.dropped.load(Ordering::Relaxed),
        })
    }

    fn places_dense(&self, layer: usize) -> bool {
        self.plan.slices(layer, Part::Dense, 0).is_some()
    }

    fn start_dense(
        &self,
        layer: usize,
        inputs: &[Activations],
        down_type: GgmlType,
        segments: Segments<'_>,
    ) -> Result<Pending<'_>, EngineError> {
        let n_tokens = inputs.first().map_or(0, Activations::n_tokens);
        let n_ff = self.dense_n_ff(layer)?;
        // The first round starts now (the nodes work while the coordinator computes the
        // routed experts' gathering); the second needs its answers.
        let hidden_round = self.run_step(layer, Round::DenseHidden, inputs, &[], segments)?;
        let segments: Option<Vec<usize>> = segments.map(<[usize]>::to_vec);
        Ok(Pending::new(move |out: &mut [f32]| {
            let mut hidden = vec![0.0f32; n_tokens * n_ff];
            hidden_round.wait(&mut hidden)?;
            // Quantized once, as the single-process engine quantizes it for down.
            let hidden = Activations::quantize(Kernels::get(), down_type, &hidden, n_ff);
            self.run_step(layer, Round::DenseDown, &[hidden], &[], segments.as_deref())?
                .wait(out)
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::{local_segments, renormalize};
    use shared::moe::Assignment;

    #[test]
    fn degraded_sums_are_rescaled_to_the_full_routing_weight() {
        let a = |token, expert, weight| Assignment {
            token,
            expert,
            weight,
        };
        // Token 0: experts 1 (0.6) and 2 (0.4), expert 2 lost → its sum × 1/0.6.
        // Token 1: nothing lost. Token 2: everything lost → zero.
        let assignments = [
            a(0, 1, 0.6),
            a(0, 2, 0.4),
            a(1, 1, 0.5),
            a(1, 3, 0.5),
            a(2, 2, 2.5),
        ];
        let dropped = [a(0, 2, 0.4), a(2, 2, 2.5)];
        let mut out = vec![0.6, -1.2, 3.0, 4.0, 0.0, 0.0];
        renormalize(&mut out, 2, &assignments, &dropped);
        assert!(
            (out[0] - 1.0).abs() < 1e-6 && (out[1] + 2.0).abs() < 1e-6,
            "{out:?}"
        );
        assert_eq!(&out[2..], &[3.0, 4.0, 0.0, 0.0]);
    }

    #[test]
    fn local_segments_follow_the_sequences() {
        assert_eq!(local_segments(&[0, 1, 2], None), Vec::<usize>::new());
        // Sequences of 3, 2 and 4 rows; the node gets rows 1, 2 (seq 0), 7, 8 (seq 2).
        assert_eq!(local_segments(&[1, 2, 7, 8], Some(&[3, 2, 4])), vec![2, 2]);
        assert_eq!(
            local_segments(&[0, 3, 4, 5], Some(&[3, 2, 4])),
            vec![1, 2, 1]
        );
        assert_eq!(local_segments(&[], Some(&[3])), Vec::<usize>::new());
        // A slice round's rows: the tokens of the assignments, each repeated per expert.
        assert_eq!(local_segments(&[0, 0, 1, 1, 2], Some(&[2, 1])), vec![4, 1]);
    }
}
