//! [`NodeCore`]: what an expert node answers, whatever the transport.
//!
//! Every message is checked by `proto::convert` against the model's shape and this node's
//! inventory before anything is computed; a refused message gets an error answer naming
//! the problem, never a crash. A dispatch's tokens are grouped per expert (one batched
//! matmul per expert) and the weighted outputs summed per token: one partial-sum vector
//! per token goes back — or, for slices (the two rounds of an exact split), the slices'
//! SwiGLU rows or rows of down, per token (dense part) or per assignment (routed experts).

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Instant;

use proto::transport::NodeService;
use proto::{
    wire, DispatchContext, DispatchRequest, ExpertSlice, FfnPart, Hello, HelloReply, Inventory,
    Message, Partials, ProtoError, RemoteError, Stage,
};
use shared::moe::{
    compute_routed_segments, dense_down_segments, dense_hidden_segments, routed_down_segments,
    routed_hidden_segments, slice_answer_width, ExpertSource, FfnMatrices,
};
use shared::placement::Part;
use shared::quant::dispatch::Kernels;
use tracing::{debug, info, warn};

use crate::dram_cache::{CacheStats, CacheThread, DramCache, Key, Resident};
use crate::error::NodeError;
use crate::pinning::{Pinning, ThreadRole};
use crate::weights::NodeWeights;

/// Counters since the node started (the `Stats` message).
#[derive(Debug, Default)]
struct Counters {
    dispatches: AtomicU64,
    tokens: AtomicU64,
    assignments: AtomicU64,
    errors: AtomicU64,
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
    compute_ns: AtomicU64,
    weight_bytes_read: AtomicU64,
}

const SERVING: u8 = 0;
const DRAINING: u8 = 1;

/// An expert node's state and answers.
pub struct NodeCore {
    name: String,
    weights: Arc<NodeWeights>,
    /// `--dram-cache`: the DRAM tier and its background thread.
    cache: Option<Arc<DramCache>>,
    cache_thread: Option<CacheThread>,
    inventory: Inventory,
    kernels: &'static Kernels,
    pool: Option<rayon::ThreadPool>,
    /// One compute thread: dispatches are computed serially on the calling thread.
    inline: bool,
    /// `--numa-node`: the pool's threads bind themselves to the node's units.
    pinning: Option<Arc<Pinning>>,
    started: Instant,
    counters: Counters,
    state: AtomicU8,
}

impl std::fmt::Debug for NodeCore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeCore")
            .field("name", &self.name)
            .field("weights", &self.weights)
            .finish_non_exhaustive()
    }
}

/// The protocol's part from the placement's.
pub fn ffn_part(p: Part) -> FfnPart {
    match p {
        Part::Routed => FfnPart::Routed,
        Part::Dense => FfnPart::Dense,
    }
}

/// The routed experts of one layer, as [`compute_routed`] reads them.
struct LayerSource<'a> {
    weights: &'a NodeWeights,
    resident: Option<&'a Resident>,
    layer: u32,
}

impl ExpertSource for LayerSource<'_> {
    fn n_embd(&self) -> usize {
        self.weights.facts().n_embd
    }

    fn n_expert(&self) -> usize {
        self.weights.facts().n_expert
    }

    fn expert(&self, expert: u32) -> Vec<FfnMatrices<'_>> {
        held(
            self.weights,
            self.resident,
            self.layer,
            Part::Routed,
            expert,
        )
    }
}

/// The DRAM tier's fields of the `Stats` message.
fn dram_stats(d: CacheStats) -> wire::Stats {
    wire::Stats {
        dram_cache_budget_bytes: d.budget_bytes,
        dram_cache_bytes: d.resident_bytes,
        dram_cache_experts: d.resident_experts,
        dram_hit_bytes: d.hit_bytes,
        dram_miss_bytes: d.miss_bytes,
        dram_promoted_bytes: d.promoted_bytes,
        dram_evicted_bytes: d.evicted_bytes,
        ..wire::Stats::default()
    }
}

/// The experts (or the dense part) a dispatch computes, once each: what the DRAM tier counts.
fn used_experts(req: &DispatchRequest) -> Vec<Key> {
    match req.part {
        FfnPart::Routed => {
            let mut experts: Vec<u32> = req.assignments.iter().map(|a| a.expert).collect();
            experts.sort_unstable();
            experts.dedup();
            (experts.into_iter())
                .map(|e| (req.layer, Part::Routed, e))
                .collect()
        }
        FfnPart::Dense => vec![(req.layer, Part::Dense, 0)],
    }
}

/// The slices of an expert (or dense part) a node holds: its DRAM copies where the tier
/// has them, the mapping otherwise.
fn held<'a>(
    weights: &'a NodeWeights,
    resident: Option<&'a Resident>,
    layer: u32,
    part: Part,
    expert: u32,
) -> Vec<FfnMatrices<'a>> {
    match resident.and_then(|r| r.get(&(layer, part, expert))) {
        Some(cached) => cached.matrices(),
        None => weights.expert(layer, part, expert),
    }
}

impl NodeCore {
    /// A node named `name` serving `weights` with `threads` compute threads (0: rayon's
    /// global pool).
    pub fn new(
        name: &str,
        weights: NodeWeights,
        threads: usize,
        numa_node: Option<u32>,
    ) -> Result<NodeCore, NodeError> {
        NodeCore::build(name, weights, threads, numa_node, None)
    }

    /// A node whose compute threads are pinned to `pinning`'s NUMA node (each binds itself
    /// as it starts), reporting that node in its inventory. With `threads` 0 it gets one
    /// thread per processing unit of the node.
    pub fn pinned(
        name: &str,
        weights: NodeWeights,
        threads: usize,
        pinning: Arc<Pinning>,
    ) -> Result<NodeCore, NodeError> {
        let threads = match threads {
            0 => pinning.pus().len().max(1),
            n => n,
        };
        NodeCore::build(
            name,
            weights,
            threads,
            Some(pinning.numa_node()),
            Some(pinning),
        )
    }

    fn build(
        name: &str,
        weights: NodeWeights,
        threads: usize,
        numa_node: Option<u32>,
        pinning: Option<Arc<Pinning>>,
    ) -> Result<NodeCore, NodeError> {
        let slices = weights
            .slices()
            .iter()
            .map(|s| ExpertSlice {
                layer: s.layer,
                part: ffn_part(s.part),
                expert: s.expert,
                ff_start: s.ff_start,
                ff_len: s.ff_len,
            })
            .collect();
        let inventory = Inventory::new(
            name.to_owned(),
            numa_node,
            weights.weight_bytes(),
            weights.mapped_bytes(),
            slices,
        )?;
        // One unpinned compute thread: the thread that receives a dispatch computes it
        // (no hand-off to a pool thread and back).
        let inline = threads == 1 && pinning.is_none();
        let pool = if threads > 0 && !inline {
            let mut builder = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .thread_name(|i| format!("expert-{i}"));
            if let Some(pinning) = &pinning {
                let pinning = pinning.clone();
                builder =
                    builder.start_handler(move |_| pinning.pin_current_thread(ThreadRole::Compute));
            }
            Some(
                builder
                    .build()
                    .map_err(|e| NodeError::Usage(format!("starting {threads} threads: {e}")))?,
            )
        } else {
            None
        };
        Ok(NodeCore {
            name: name.to_owned(),
            weights: Arc::new(weights),
            cache: None,
            cache_thread: None,
            inventory,
            kernels: Kernels::get(),
            pool,
            inline,
            pinning,
            started: Instant::now(),
            counters: Counters::default(),
            state: AtomicU8::new(SERVING),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Turns the DRAM tier on with `budget` bytes (`--dram-cache`): the most used experts
    /// are copied into DRAM in the background and served from there.
    pub fn enable_dram_cache(&mut self, budget: u64) -> Result<(), NodeError> {
        let cache = Arc::new(DramCache::new(&self.weights, budget));
        let thread = DramCache::start(
            Arc::clone(&cache),
            Arc::clone(&self.weights),
            self.pinning.clone(),
        )
        .map_err(|e| NodeError::Usage(format!("starting the DRAM tier's thread: {e}")))?;
        self.cache = Some(cache);
        self.cache_thread = Some(thread);
        Ok(())
    }

    /// The DRAM tier's counters, where it is on.
    pub fn dram_cache_stats(&self) -> Option<CacheStats> {
        self.cache.as_ref().map(|c| c.stats())
    }

    pub fn inventory(&self) -> &Inventory {
        &self.inventory
    }

    pub fn weights(&self) -> &NodeWeights {
        &self.weights
    }

    /// The NUMA pinning, where `--numa-node` asked for one.
    pub fn pinning(&self) -> Option<&Arc<Pinning>> {
        self.pinning.as_ref()
    }

    /// From now on, dispatches are refused as `UNAVAILABLE` (a coordinator retries
    /// elsewhere) and health says draining.
    pub fn drain(&self) {
        self.state.store(DRAINING, Ordering::SeqCst);
    }

    fn hello(&self, m: wire::Hello) -> wire::HelloReply {
        let error = match Hello::try_from(m) {
            Ok(h) => match h.check_model(self.weights.identity()) {
                Ok(()) => {
                    info!(coordinator = %h.coordinator_name, "coordinator connected");
                    None
                }
                Err(e) => Some(e),
            },
            Err(e) => Some(e),
        };
        if let Some(e) = &error {
            warn!(error = %e, "refused a coordinator");
        }
        HelloReply {
            model_identity: *self.weights.identity(),
            inventory: self.inventory.clone(),
            error: error.as_ref().map(RemoteError::from_proto_error),
        }
        .into()
    }

    fn dispatch(&self, m: wire::Dispatch) -> wire::DispatchResult {
        let (step_id, layer) = (m.step_id, m.layer);
        let outcome = self.compute(m);
        if let Err(e) = &outcome {
            self.counters.errors.fetch_add(1, Ordering::Relaxed);
            warn!(step_id, layer, error = %e.message, "dispatch refused");
        }
        proto::DispatchResponse {
            step_id,
            layer,
            outcome,
        }
        .into()
    }

    fn compute(&self, m: wire::Dispatch) -> Result<Partials, RemoteError> {
        if self.state.load(Ordering::SeqCst) != SERVING {
            return Err(RemoteError {
                code: wire::ErrorCode::Unavailable,
                message: format!("node {} is shutting down", self.name),
            });
        }
        let facts = self.weights.facts();
        let ctx = DispatchContext {
            n_layer: facts.n_layer,
            n_expert: facts.n_expert,
            n_embd: facts.n_embd,
            max_experts_per_token: Some(facts.n_expert_used),
            inventory: Some(&self.inventory),
        };
        let req = DispatchRequest::from_wire(m, &ctx)
            .map_err(|e: ProtoError| RemoteError::from_proto_error(&e))?;
        let n_tokens = req.n_tokens();
        let t0 = Instant::now();
        // The DRAM tier's experts as they are now, for the whole dispatch.
        let resident = self.cache.as_ref().map(|c| c.snapshot());
        let dense = match req.part {
            FfnPart::Routed => Vec::new(),
            FfnPart::Dense => held(
                &self.weights,
                resident.as_deref(),
                req.layer,
                Part::Dense,
                0,
            ),
        };
        let source = LayerSource {
            weights: &self.weights,
            resident: resident.as_deref(),
            layer: req.layer,
        };
        // A row of the answer: the partial sum (routed, one round), or the node's slices of
        // the hidden activation or of down's output (the two rounds of a split FFN; routed
        // slices answer a row per assignment).
        let (rows, width) = match (req.part, req.stage) {
            (FfnPart::Routed, Stage::OneRound) => (n_tokens, facts.n_embd),
            (FfnPart::Routed, stage) => (
                req.assignments.len(),
                slice_answer_width(&source, &req.assignments, stage == Stage::Hidden),
            ),
            (FfnPart::Dense, Stage::Down) => {
                let n_ff = dense.first().map_or(0, |m| m.down.n_cols);
                let got = req.inputs[0].n_cols();
                if got != n_ff {
                    return Err(RemoteError {
                        code: wire::ErrorCode::BadRequest,
                        message: format!(
                            "layer {}: the hidden rows of a STAGE_DOWN dispatch are {got} \
                             wide; the dense part's n_ff is {n_ff}",
                            req.layer
                        ),
                    });
                }
                (n_tokens, dense.iter().map(|m| m.down.n_rows).sum())
            }
            // (ONE_ROUND is refused for a dense part when the dispatch is checked.)
            (FfnPart::Dense, _) => (n_tokens, dense.iter().map(FfnMatrices::n_ff).sum()),
        };
        // Checked before anything is allocated or computed: the answer must fit a result.
        if rows * width > proto::limits::MAX_DISPATCH_VALUES {
            return Err(RemoteError {
                code: wire::ErrorCode::BadRequest,
                message: format!(
                    "layer {}: the answer would be {rows} rows of {width} values, over the \
                     protocol's limit of {} values",
                    req.layer,
                    proto::limits::MAX_DISPATCH_VALUES
                ),
            });
        }
        let mut out = vec![0.0f32; rows * width];
        let segments = (!req.segments.is_empty()).then_some(req.segments.as_slice());
        let (k, inputs, assignments) = (self.kernels, &req.inputs, &req.assignments);
        let mut run = || match (req.part, req.stage) {
            (FfnPart::Routed, Stage::OneRound) => {
                compute_routed_segments(k, &source, inputs, assignments, segments, &mut out)
            }
            (FfnPart::Routed, Stage::Hidden) => {
                routed_hidden_segments(k, &source, inputs, assignments, segments, width, &mut out)
            }
            (FfnPart::Routed, Stage::Down) => routed_down_segments(
                k,
                &source,
                &inputs[0],
                assignments,
                segments,
                width,
                &mut out,
            ),
            (FfnPart::Dense, Stage::Down) => {
                dense_down_segments(k, &dense, &inputs[0], facts.n_embd, segments, &mut out)
            }
            (FfnPart::Dense, _) => dense_hidden_segments(k, &dense, inputs, segments, &mut out),
        };
        let result = match &self.pool {
            Some(pool) => pool.install(&mut run),
            None if self.inline => shared::parallel::serial(&mut run),
            None => run(),
        };
        // What the expert math refuses is the request's doing (a hidden row of the wrong
        // width, a token or expert out of range, an expert held otherwise), not the node's.
        result.map_err(|e| RemoteError {
            code: wire::ErrorCode::BadRequest,
            message: format!("layer {}: {e}", req.layer),
        })?;
        let c = &self.counters;
        let used = used_experts(&req);
        c.weight_bytes_read
            .fetch_add(self.bytes_read(&req, &used), Ordering::Relaxed);
        if let (Some(cache), Some(resident)) = (&self.cache, &resident) {
            for key in &used {
                cache.record(key, resident.get(key).is_some());
            }
        }
        c.compute_ns
            .fetch_add(t0.elapsed().as_nanos() as u64, Ordering::Relaxed);
        c.dispatches.fetch_add(1, Ordering::Relaxed);
        // A split FFN's second round computes on the first round's rows (for routed slices,
        // one per assignment): its tokens and assignments were counted then.
        if req.stage != Stage::Down {
            c.tokens.fetch_add(n_tokens as u64, Ordering::Relaxed);
            c.assignments
                .fetch_add(req.assignments.len() as u64, Ordering::Relaxed);
        }
        debug!(
            node = %self.name,
            step_id = req.step_id,
            layer = req.layer,
            n_tokens,
            assignments = req.assignments.len(),
            us = t0.elapsed().as_micros() as u64,
            stage = ?req.stage,
            "dispatch"
        );
        Partials::new(rows, width, out).map_err(|e| RemoteError {
            code: wire::ErrorCode::Internal,
            message: format!("layer {}: result {e}", req.layer),
        })
    }

    /// Weight bytes a dispatch reads: each expert (slice) used, once.
    fn bytes_read(&self, req: &DispatchRequest, used: &[Key]) -> u64 {
        let matrices = |m: &FfnMatrices<'_>| match req.stage {
            Stage::OneRound => [m.gate, m.up, m.down].map(|w| w.data.len()).iter().sum(),
            Stage::Hidden => m.gate.data.len() + m.up.data.len(),
            Stage::Down => m.down.data.len(),
        } as u64;
        (used.iter())
            .flat_map(|&(layer, part, expert)| self.weights.expert(layer, part, expert))
            .map(|m| matrices(&m))
            .sum()
    }

    /// The `Stats` message.
    pub fn stats(&self) -> wire::Stats {
        let c = &self.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        wire::Stats {
            dispatches: get(&c.dispatches),
            tokens: get(&c.tokens),
            assignments: get(&c.assignments),
            errors: get(&c.errors),
            bytes_in: get(&c.bytes_in),
            bytes_out: get(&c.bytes_out),
            compute_ns: get(&c.compute_ns),
            mapped_bytes: self.weights.mapped_bytes(),
            weight_bytes_read: get(&c.weight_bytes_read),
            ..dram_stats(self.dram_cache_stats().unwrap_or_default())
        }
    }

    fn health(&self) -> wire::Health {
        let state = if self.state.load(Ordering::SeqCst) == SERVING {
            wire::NodeState::Serving
        } else {
            wire::NodeState::Draining
        };
        wire::Health {
            state: state.into(),
            uptime_ms: self.started.elapsed().as_millis() as u64,
        }
    }
}

impl NodeService for NodeCore {
    fn handle(&self, msg: wire::CoordinatorMessage) -> wire::NodeMessage {
        use wire::coordinator_message::Body as In;
        use wire::node_message::Body as Out;
        self.counters
            .bytes_in
            .fetch_add(msg.encoded_len() as u64, Ordering::Relaxed);
        let body = match msg.body {
            Some(In::Hello(h)) => Out::Hello(self.hello(h)),
            Some(In::Dispatch(d)) => Out::DispatchResult(self.dispatch(d)),
            Some(In::Health(_)) => Out::Health(self.health()),
            Some(In::Stats(_)) => Out::Stats(self.stats()),
            None => {
                self.counters.errors.fetch_add(1, Ordering::Relaxed);
                Out::DispatchResult(
                    proto::DispatchResponse {
                        step_id: 0,
                        layer: 0,
                        outcome: Err(RemoteError {
                            code: wire::ErrorCode::BadRequest,
                            message: "a message without a body".into(),
                        }),
                    }
                    .into(),
                )
            }
        };
        let reply = wire::NodeMessage { body: Some(body) };
        self.counters
            .bytes_out
            .fetch_add(reply.encoded_len() as u64, Ordering::Relaxed);
        reply
    }
}
