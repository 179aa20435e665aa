//! Distributed execution: the routed experts (and, where the plan says so, dense FFN
//! slices) computed by expert nodes behind any transport.
//!
//! Per MoE layer [`RemoteExperts`] groups the step's (token, expert, weight) assignments by
//! the node holding each expert or slice (one replica chosen per slice), sends each
//! involved node ONE dispatch with the rows of the tokens it needs, all nodes in flight at
//! once, and adds the partial sums in the plan's node order, so results are deterministic:
//! with one node they are bit-identical to the single-process engine.
//!
//! - [`launcher`]: loopback mode (N node processes on 127.0.0.1, or in-process nodes).
//! - [`connect`]: links to daemons already running, from a cluster file.

pub mod connect;
pub mod launcher;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use proto::transport::{NodeLink, TransportError};
use proto::{
    wire, DispatchRequest, DispatchResponse, FfnPart, Hello, HelloReply, Partials, ProtoError,
};
use shared::moe::Assignment;
use shared::placement::{Part, ResolvedPlan};
use shared::quant::matmul::{Activations, Segments};
use tracing::{debug, info};

use crate::models::{EngineError, ExpertExecutor, Pending};

/// How long a node may take to answer one dispatch unless told otherwise
/// (`--dispatch-timeout`): a missed deadline fails the step with the node's name.
pub const DEFAULT_DISPATCH_TIMEOUT: Duration = Duration::from_secs(30);

/// A node as the coordinator sees it.
pub struct NodeHandle {
    pub name: String,
    pub link: Arc<dyn NodeLink>,
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

/// The routed experts computed by expert nodes.
pub struct RemoteExperts {
    runtime: Arc<tokio::runtime::Runtime>,
    /// In the plan's node order.
    nodes: Vec<NodeHandle>,
    plan: ResolvedPlan,
    n_embd: usize,
    timeout: Duration,
    next_step: AtomicU64,
}

/// What one node is asked for in one step: its token rows and assignments.
struct NodeWork {
    node: usize,
    /// Global token index of each local row, ascending.
    tokens: Vec<usize>,
    assignments: Vec<Assignment>,
}

/// The runs of `tokens` (ascending batch rows) that belong to one sequence, given the
/// batch's segments; empty for a batch of one sequence.
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

impl RemoteExperts {
    /// Greets every node (protocol version, model identity) and checks that each holds what
    /// `plan` places on it. `nodes` must be in the plan's node order.
    pub fn connect(
        runtime: Arc<tokio::runtime::Runtime>,
        nodes: Vec<NodeHandle>,
        plan: ResolvedPlan,
        model_identity: [u8; 32],
        n_embd: usize,
        timeout: Duration,
    ) -> Result<RemoteExperts, DistributedError> {
        for (i, name) in plan.nodes().iter().enumerate() {
            if nodes.get(i).map(|n| &n.name) != Some(name) {
                return Err(DistributedError::UnknownNode(name.clone()));
            }
        }
        check_slice_replicas(&plan)?;
        let hello = wire::CoordinatorMessage {
            body: Some(wire::coordinator_message::Body::Hello(
                Hello {
                    model_identity,
                    coordinator_name: format!("moeshard-{}", std::process::id()),
                }
                .into(),
            )),
        };
        // All handshakes at once.
        let calls: Vec<_> = nodes
            .iter()
            .map(|n| {
                let link = n.link.clone();
                let msg = hello.clone();
                runtime.spawn(async move { tokio::time::timeout(timeout, link.call(msg)).await })
            })
            .collect();
        for ((i, n), call) in nodes.iter().enumerate().zip(calls) {
            let peer = n.link.peer().to_owned();
            let refused = |detail: String| DistributedError::Refused {
                node: n.name.clone(),
                peer: peer.clone(),
                detail,
            };
            let answer = runtime
                .block_on(call)
                .map_err(|e| refused(format!("handshake task failed: {e}")))?
                .map_err(|_| DistributedError::Timeout {
                    node: n.name.clone(),
                    peer: peer.clone(),
                    timeout,
                })?
                .map_err(|source| DistributedError::Transport {
                    node: n.name.clone(),
                    peer: peer.clone(),
                    source,
                })?;
            let reply = match answer.body {
                Some(wire::node_message::Body::Hello(h)) => HelloReply::try_from(h)
                    .map_err(|e| refused(format!("bad handshake answer: {e}")))?,
                other => return Err(refused(format!("answered the handshake with {other:?}"))),
            };
            if let Some(e) = reply.error {
                return Err(refused(format!("refused us: {}", e.message)));
            }
            if reply.model_identity != model_identity {
                return Err(refused(
                    ProtoError::ModelMismatch {
                        got: hex(&reply.model_identity),
                        want: hex(&model_identity),
                    }
                    .to_string(),
                ));
            }
            for s in plan.node_slices(i) {
                let held = reply.inventory.slices().iter().any(|h| {
                    (h.layer, h.expert, h.ff_start, h.ff_len)
                        == (s.layer, s.expert, s.ff_start, s.ff_len)
                        && h.part == part_to_wire(s.part)
                });
                if !held {
                    return Err(refused(format!(
                        "does not hold layer {} {:?} expert {} rows {}..{}, which the plan \
                         places on it",
                        s.layer,
                        s.part,
                        s.expert,
                        s.ff_start,
                        s.ff_start + s.ff_len
                    )));
                }
            }
            info!(
                node = %n.name,
                peer = %peer,
                slices = reply.inventory.slices().len(),
                weight_bytes = reply.inventory.weight_bytes,
                "node ready"
            );
        }
        Ok(RemoteExperts {
            runtime,
            nodes,
            plan,
            n_embd,
            timeout,
            next_step: AtomicU64::new(1),
        })
    }

    pub fn nodes(&self) -> &[NodeHandle] {
        &self.nodes
    }

    /// Groups `assignments` by node: each (slice of an) expert goes to one replica.
    fn route(
        &self,
        layer: usize,
        n_tokens: usize,
        assignments: &[Assignment],
    ) -> Result<Vec<NodeWork>, EngineError> {
        let n_nodes = self.nodes.len();
        let mut per_node: Vec<Vec<Assignment>> = vec![Vec::new(); n_nodes];
        for a in assignments {
            let slices = self
                .plan
                .slices(layer, Part::Routed, a.expert as usize)
                .ok_or_else(|| {
                    EngineError::Node(format!(
                        "layer {layer} expert {} is not placed on any node",
                        a.expert
                    ))
                })?;
            // A node holding several slices of the expert gets the assignment once.
            let mut nodes: Vec<usize> = slices
                .iter()
                .map(|s| pick_replica(&s.replicas, layer))
                .collect();
            nodes.sort_unstable();
            nodes.dedup();
            for node in nodes {
                per_node[node].push(*a);
            }
        }
        Ok(per_node
            .into_iter()
            .enumerate()
            .filter(|(_, a)| !a.is_empty())
            .map(|(node, global)| {
                let mut used = vec![false; n_tokens];
                for a in &global {
                    used[a.token as usize] = true;
                }
                let tokens: Vec<usize> = (0..n_tokens).filter(|&t| used[t]).collect();
                let mut local = vec![0u32; n_tokens];
                for (i, &t) in tokens.iter().enumerate() {
                    local[t] = i as u32;
                }
                let assignments = global
                    .into_iter()
                    .map(|a| Assignment {
                        token: local[a.token as usize],
                        ..a
                    })
                    .collect();
                NodeWork {
                    node,
                    tokens,
                    assignments,
                }
            })
            .collect())
    }

    /// Sends each node its dispatch; the returned [`Pending`] gathers the answers.
    fn send(
        &self,
        layer: usize,
        part: FfnPart,
        n_tokens: usize,
        inputs: &[Activations],
        work: Vec<NodeWork>,
        segments: Segments<'_>,
    ) -> Result<Pending<'_>, EngineError> {
        let max_tokens = proto::limits::MAX_DISPATCH_TOKENS
            .min(proto::limits::MAX_DISPATCH_VALUES / self.n_embd.max(1));
        if let Some(w) = work.iter().find(|w| w.tokens.len() > max_tokens) {
            return Err(EngineError::Node(format!(
                "layer {layer}: a dispatch of {} tokens to node {} exceeds the protocol's limit \
                 of {max_tokens} tokens for n_embd {}: evaluate the prompt in smaller batches",
                w.tokens.len(),
                self.nodes[w.node].name,
                self.n_embd
            )));
        }
        let step_id = self.next_step.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel();
        let mut expected = Vec::with_capacity(work.len());
        for w in work {
            let all = w.tokens.len() == n_tokens;
            let rows: Vec<Activations> = if all {
                inputs.to_vec()
            } else {
                inputs.iter().map(|x| x.gather(&w.tokens)).collect()
            };
            let msg = wire::CoordinatorMessage {
                body: Some(wire::coordinator_message::Body::Dispatch(
                    DispatchRequest {
                        step_id,
                        layer: layer as u32,
                        part,
                        inputs: rows,
                        assignments: w.assignments,
                        segments: local_segments(&w.tokens, segments),
                    }
                    .into(),
                )),
            };
            let link = self.nodes[w.node].link.clone();
            let tx = tx.clone();
            let timeout = self.timeout;
            let node = w.node;
            self.runtime.spawn(async move {
                let answer = tokio::time::timeout(timeout, link.call(msg)).await;
                // The receiver is gone only if the step was abandoned.
                let _ = tx.send((node, answer));
            });
            expected.push((w.node, w.tokens));
        }
        drop(tx);
        let n_embd = self.n_embd;
        Ok(Pending::new(move |out: &mut [f32]| {
            if out.len() != n_tokens * n_embd {
                return Err(EngineError::Node(format!(
                    "output of {} values for {n_tokens} tokens",
                    out.len()
                )));
            }
            let mut partials: Vec<Option<Partials>> = vec![None; self.nodes.len()];
            for _ in 0..expected.len() {
                let (node, answer) = rx.recv().map_err(|_| {
                    EngineError::Node(format!("layer {layer}: a dispatch task was lost"))
                })?;
                let n = &self.nodes[node];
                let n_rows = expected
                    .iter()
                    .find(|(i, _)| *i == node)
                    .map_or(0, |(_, t)| t.len());
                let fail = |detail: String| {
                    EngineError::Node(format!(
                        "node {} ({}), layer {layer}: {detail}",
                        n.name,
                        n.link.peer()
                    ))
                };
                let answer = answer
                    .map_err(|_| fail(format!("no answer within {:?}", self.timeout)))?
                    .map_err(|e| fail(e.to_string()))?;
                let result = match answer.body {
                    Some(wire::node_message::Body::DispatchResult(r)) => {
                        DispatchResponse::try_from(r).map_err(|e| fail(e.to_string()))?
                    }
                    other => return Err(fail(format!("answered a dispatch with {other:?}"))),
                };
                result
                    .check_answers(step_id, layer as u32, n_rows, n_embd)
                    .map_err(|e| fail(e.to_string()))?;
                let p = result
                    .outcome
                    .map_err(|e| fail(format!("{:?}: {}", e.code, e.message)))?;
                partials[node] = Some(p);
            }
            // Add in the plan's node order: a token's first partial is copied, the next added.
            out.fill(0.0);
            let mut seen = vec![false; n_tokens];
            for (node, tokens) in plan_order(&expected) {
                let Some(p) = &partials[node] else { continue };
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
            debug!(step_id, layer, nodes = expected.len(), "gathered");
            Ok(())
        }))
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

/// `expected` sorted by node index (the plan's order).
fn plan_order(expected: &[(usize, Vec<usize>)]) -> Vec<(usize, &[usize])> {
    let mut v: Vec<(usize, &[usize])> = expected.iter().map(|(n, t)| (*n, t.as_slice())).collect();
    v.sort_by_key(|(n, _)| *n);
    v
}

/// The replica serving a slice in layer `layer`: they take turns from layer to layer, so
/// replicas share the work while each expert's tokens of a step stay on one node.
fn pick_replica(replicas: &[usize], layer: usize) -> usize {
    replicas[layer % replicas.len()]
}

fn part_to_wire(p: Part) -> FfnPart {
    match p {
        Part::Routed => FfnPart::Routed,
        Part::Dense => FfnPart::Dense,
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl ExpertExecutor for RemoteExperts {
    fn start(
        &self,
        layer: usize,
        inputs: &[Activations],
        assignments: &[Assignment],
        segments: Segments<'_>,
    ) -> Result<Pending<'_>, EngineError> {
        let n_tokens = inputs.first().map_or(0, Activations::n_tokens);
        let work = self.route(layer, n_tokens, assignments)?;
        self.send(layer, FfnPart::Routed, n_tokens, inputs, work, segments)
    }

    fn node_stats(&self) -> Vec<(String, Result<wire::Stats, EngineError>)> {
        let ask = wire::CoordinatorMessage {
            body: Some(wire::coordinator_message::Body::Stats(
                wire::StatsRequest {},
            )),
        };
        self.nodes
            .iter()
            .map(|n| {
                let link = n.link.clone();
                let msg = ask.clone();
                let timeout = self.timeout;
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
                let stats = stats.map_err(|detail| {
                    EngineError::Node(format!("node {} ({}): {detail}", n.name, n.link.peer()))
                });
                (n.name.clone(), stats)
            })
            .collect()
    }

    fn places_dense(&self, layer: usize) -> bool {
        self.plan.slices(layer, Part::Dense, 0).is_some()
    }

    fn start_dense(
        &self,
        layer: usize,
        inputs: &[Activations],
        segments: Segments<'_>,
    ) -> Result<Pending<'_>, EngineError> {
        let n_tokens = inputs.first().map_or(0, Activations::n_tokens);
        let slices = self.plan.slices(layer, Part::Dense, 0).ok_or_else(|| {
            EngineError::Node(format!("layer {layer}'s dense part is not placed"))
        })?;
        let mut nodes: Vec<usize> = slices
            .iter()
            .map(|s| pick_replica(&s.replicas, layer))
            .collect();
        nodes.sort_unstable();
        nodes.dedup();
        let work = nodes
            .into_iter()
            .map(|node| NodeWork {
                node,
                tokens: (0..n_tokens).collect(),
                assignments: Vec::new(),
            })
            .collect();
        self.send(layer, FfnPart::Dense, n_tokens, inputs, work, segments)
    }
}

#[cfg(test)]
mod tests {
    use super::local_segments;

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
    }
}
