//! The DRAM tier (`--dram-cache BYTES`): the node's most-used experts (or slices), copied
//! from the mapping into DRAM (bound to the node's NUMA node when it is pinned) and served
//! from there; everything else is served from the mapping (a file on persistent memory,
//! whose reads are slower than DRAM's).
//!
//! Dispatches never wait on it: one takes a snapshot of the resident set (an `Arc` cloned
//! under a read lock held for a pointer copy), counts the experts it uses (atomics), and
//! computes from copies where the snapshot has them. A background thread decides, every
//! [`ROUND`], which experts should be resident — the most used, by a use count halved every
//! [`DECAY_ROUNDS`] rounds, greedily to the budget, a resident expert keeping its place
//! until a candidate is used [`STAY`] times as much — copies the newcomers outside any
//! lock (at most [`MAX_PROMOTE_BYTES`] per round) and swaps the new set in. A copy is
//! byte for byte the mapped weights, so results do not change.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, RwLock};
use std::thread::JoinHandle;
use std::time::Duration;

use shared::moe::FfnMatrices;
use shared::placement::Part;
use shared::quant::matmul::WeightMatrix;
use shared::quant::GgmlType;
use tracing::{debug, info, warn};

use crate::pinning::Pinning;
use crate::weights::NodeWeights;

/// How often the background thread reconsiders the resident set.
pub const ROUND: Duration = Duration::from_millis(100);
/// Use counts are halved every this many rounds (a memory of a few seconds).
pub const DECAY_ROUNDS: u32 = 10;
/// A candidate displaces a resident expert only when used this many times as much.
pub const STAY: f64 = 1.25;
/// Bytes copied in one round at most, so promotion competes little with compute.
pub const MAX_PROMOTE_BYTES: u64 = 256 << 20;

/// An expert (or the dense part, expert 0) of a layer: what is cached whole, with every
/// slice of it the node holds.
pub type Key = (u32, Part, u32);

/// A matrix copied into DRAM: page-aligned (so it can be bound to a NUMA node).
struct OwnedMatrix {
    buf: Vec<u8>,
    start: usize,
    len: usize,
    ty: GgmlType,
    n_rows: usize,
    n_cols: usize,
}

const PAGE: usize = 4096;

impl OwnedMatrix {
    fn copy_of(m: &WeightMatrix<'_>, pinning: Option<&Pinning>) -> OwnedMatrix {
        let len = m.data.len();
        // Zeroed pages are mapped lazily: binding first makes them land on the node.
        let mut buf = vec![0u8; len + PAGE];
        let start = buf.as_ptr().align_offset(PAGE).min(PAGE);
        if let Some(p) = pinning {
            p.bind_area(&buf[start..start + len]);
        }
        buf[start..start + len].copy_from_slice(m.data);
        OwnedMatrix {
            buf,
            start,
            len,
            ty: m.ty,
            n_rows: m.n_rows,
            n_cols: m.n_cols,
        }
    }

    fn view(&self) -> WeightMatrix<'_> {
        WeightMatrix {
            ty: self.ty,
            n_rows: self.n_rows,
            n_cols: self.n_cols,
            data: &self.buf[self.start..self.start + self.len],
        }
    }
}

/// One cached expert: its slices' copies, in ff order.
pub struct CachedExpert {
    slices: Vec<[OwnedMatrix; 3]>,
    bytes: u64,
}

impl CachedExpert {
    fn copy_of(slices: &[FfnMatrices<'_>], pinning: Option<&Pinning>) -> CachedExpert {
        let slices: Vec<[OwnedMatrix; 3]> = slices
            .iter()
            .map(|m| [m.gate, m.up, m.down].map(|w| OwnedMatrix::copy_of(&w, pinning)))
            .collect();
        let bytes = slices.iter().flatten().map(|m| m.len as u64).sum();
        CachedExpert { slices, bytes }
    }

    /// The copies, as the kernels read them.
    pub fn matrices(&self) -> Vec<FfnMatrices<'_>> {
        self.slices
            .iter()
            .map(|[g, u, d]| FfnMatrices {
                gate: g.view(),
                up: u.view(),
                down: d.view(),
            })
            .collect()
    }
}

/// The experts resident in DRAM at one moment.
#[derive(Default)]
pub struct Resident {
    experts: HashMap<Key, Arc<CachedExpert>>,
    bytes: u64,
}

impl Resident {
    pub fn get(&self, key: &Key) -> Option<&CachedExpert> {
        self.experts.get(key).map(Arc::as_ref)
    }
}

/// The tier's counters, for the node's stats.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheStats {
    pub budget_bytes: u64,
    pub resident_bytes: u64,
    pub resident_experts: u64,
    /// Weight bytes dispatches read from DRAM copies / from the mapping.
    pub hit_bytes: u64,
    pub miss_bytes: u64,
    pub promoted_bytes: u64,
    pub evicted_bytes: u64,
}

/// The DRAM tier of one node.
pub struct DramCache {
    budget: u64,
    resident: RwLock<Arc<Resident>>,
    /// Every expert the node serves: its use count and its bytes.
    uses: HashMap<Key, AtomicU64>,
    sizes: HashMap<Key, u64>,
    hit_bytes: AtomicU64,
    miss_bytes: AtomicU64,
    promoted_bytes: AtomicU64,
    evicted_bytes: AtomicU64,
}

impl DramCache {
    /// A tier of `budget` bytes for the experts `weights` holds (empty until the background
    /// thread of [`DramCache::start`] fills it).
    pub fn new(weights: &NodeWeights, budget: u64) -> DramCache {
        let mut sizes: HashMap<Key, u64> = HashMap::new();
        for s in weights.slices() {
            sizes.entry((s.layer, s.part, s.expert)).or_insert_with(|| {
                (weights.expert(s.layer, s.part, s.expert).iter())
                    .map(|m| (m.gate.data.len() + m.up.data.len() + m.down.data.len()) as u64)
                    .sum()
            });
        }
        let uses = sizes.keys().map(|&k| (k, AtomicU64::new(0))).collect();
        DramCache {
            budget,
            resident: RwLock::new(Arc::new(Resident::default())),
            uses,
            sizes,
            hit_bytes: AtomicU64::new(0),
            miss_bytes: AtomicU64::new(0),
            promoted_bytes: AtomicU64::new(0),
            evicted_bytes: AtomicU64::new(0),
        }
    }

    /// The resident set now; a dispatch computes from this snapshot to its end.
    pub fn snapshot(&self) -> Arc<Resident> {
        match self.resident.read() {
            Ok(r) => Arc::clone(&r),
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        }
    }

    /// A dispatch used `key` (reading `bytes` from DRAM when `hit`).
    pub fn record(&self, key: &Key, hit: bool) {
        if let Some(n) = self.uses.get(key) {
            n.fetch_add(1, Ordering::Relaxed);
        }
        let bytes = self.sizes.get(key).copied().unwrap_or(0);
        let counter = if hit {
            &self.hit_bytes
        } else {
            &self.miss_bytes
        };
        counter.fetch_add(bytes, Ordering::Relaxed);
    }

    pub fn stats(&self) -> CacheStats {
        let r = self.snapshot();
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        CacheStats {
            budget_bytes: self.budget,
            resident_bytes: r.bytes,
            resident_experts: r.experts.len() as u64,
            hit_bytes: get(&self.hit_bytes),
            miss_bytes: get(&self.miss_bytes),
            promoted_bytes: get(&self.promoted_bytes),
            evicted_bytes: get(&self.evicted_bytes),
        }
    }

    /// The experts that should be resident: the most used first (residents weighted by
    /// [`STAY`]), while they fit the budget; unused experts never.
    fn wanted(&self, resident: &Resident) -> Vec<Key> {
        let mut ranked: Vec<(f64, Key)> = (self.uses.iter())
            .filter_map(|(k, n)| {
                let n = n.load(Ordering::Relaxed) as f64;
                let n = if resident.experts.contains_key(k) {
                    n * STAY
                } else {
                    n
                };
                (n > 0.0).then_some((n, *k))
            })
            .collect();
        ranked.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        let mut room = self.budget;
        let mut out = Vec::new();
        for (_, k) in ranked {
            let size = self.sizes[&k];
            if size <= room {
                room -= size;
                out.push(k);
            }
        }
        out
    }

    /// One round of the background thread: the new resident set, if it changes.
    fn rebalance(&self, weights: &NodeWeights, pinning: Option<&Pinning>) {
        let current = self.snapshot();
        let wanted = self.wanted(&current);
        if wanted.len() == current.experts.len()
            && wanted.iter().all(|k| current.experts.contains_key(k))
        {
            return;
        }
        let mut next = Resident::default();
        let mut promoted = 0u64;
        for k in wanted {
            let cached = match current.experts.get(&k) {
                Some(c) => Arc::clone(c),
                None => {
                    if promoted >= MAX_PROMOTE_BYTES {
                        continue;
                    }
                    let (layer, part, expert) = k;
                    let c = Arc::new(CachedExpert::copy_of(
                        &weights.expert(layer, part, expert),
                        pinning,
                    ));
                    promoted += c.bytes;
                    c
                }
            };
            next.bytes += cached.bytes;
            next.experts.insert(k, cached);
        }
        let evicted: u64 = (current.experts.iter())
            .filter(|(k, _)| !next.experts.contains_key(k))
            .map(|(_, c)| c.bytes)
            .sum();
        debug!(
            resident = next.experts.len(),
            resident_bytes = next.bytes,
            promoted,
            evicted,
            "DRAM tier rebalanced"
        );
        self.promoted_bytes.fetch_add(promoted, Ordering::Relaxed);
        self.evicted_bytes.fetch_add(evicted, Ordering::Relaxed);
        let next = Arc::new(next);
        match self.resident.write() {
            Ok(mut r) => *r = next,
            Err(poisoned) => *poisoned.into_inner() = next,
        }
        // `current` (and the copies only it held) is freed once the dispatches using it end.
    }

    fn decay(&self) {
        for n in self.uses.values() {
            // Halving needs no exactness: a racing increment may be lost.
            let v = n.load(Ordering::Relaxed);
            n.store(v / 2, Ordering::Relaxed);
        }
    }
}

/// The background thread of a node's DRAM tier; stops when dropped.
pub struct CacheThread {
    stop: Option<mpsc::Sender<()>>,
    handle: Option<JoinHandle<()>>,
}

impl Drop for CacheThread {
    fn drop(&mut self) {
        self.stop.take();
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

impl DramCache {
    /// Starts the thread that promotes and evicts (pinned to the node's units, where the
    /// node is pinned).
    pub fn start(
        cache: Arc<DramCache>,
        weights: Arc<NodeWeights>,
        pinning: Option<Arc<Pinning>>,
    ) -> std::io::Result<CacheThread> {
        info!(
            budget_bytes = cache.budget,
            experts = cache.sizes.len(),
            bytes = cache.sizes.values().sum::<u64>(),
            "DRAM tier on: the most used experts are copied into DRAM"
        );
        let (tx, rx) = mpsc::channel::<()>();
        let handle = std::thread::Builder::new()
            .name("dram-cache".into())
            .spawn(move || {
                if let Some(p) = &pinning {
                    p.pin_current_thread(crate::pinning::ThreadRole::Io);
                }
                let mut round = 0u32;
                // Nothing is ever sent: the sender's drop ends the wait early.
                while let Err(RecvTimeoutError::Timeout) = rx.recv_timeout(ROUND) {
                    let pinned = pinning.as_deref();
                    if let Err(e) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        cache.rebalance(&weights, pinned)
                    })) {
                        warn!(?e, "the DRAM tier's rebalancing panicked; it stops");
                        break;
                    }
                    round += 1;
                    if round.is_multiple_of(DECAY_ROUNDS) {
                        cache.decay();
                    }
                }
            })?;
        Ok(CacheThread {
            stop: Some(tx),
            handle: Some(handle),
        })
    }
}
