//! Pinning an expert node to one NUMA node (`--numa-node N`): its compute threads (the rayon
//! pool) and I/O threads (the tokio runtime) run on that node's processing units and prefer
//! its memory, and the pages of its weights are bound to that node — unless the weights are
//! on persistent memory mounted with DAX, whose pages are where the file is (a file on
//! another node's namespace is warned about: every read would cross sockets).
//!
//! The plan (which units belong to node N) comes from [`Topology`]: this machine's, or the
//! one `--topology` describes, so that tests can run a synthetic topology's plan here. The
//! binding always acts on this machine ([`Binder`]); where it fails (units or nodes this
//! machine lacks, an OS without the call) the node warns and serves unpinned: pinning never
//! stops a node from serving.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use shared::topology::{format_list, Binder, Pmem, Topology};
use tracing::{debug, info, warn};

use crate::error::NodeError;
use crate::weights::NodeWeights;

/// Which threads a binding is for (each kind is reported once, pinned or not).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ThreadRole {
    /// The thread that loads the weights and then drives the runtime.
    Main,
    /// A thread of the rayon pool dispatches are computed on (`expert-N`).
    Compute,
    /// A tokio thread (`node-io`).
    Io,
}

impl ThreadRole {
    fn name(self) -> &'static str {
        match self {
            ThreadRole::Main => "main",
            ThreadRole::Compute => "compute",
            ThreadRole::Io => "I/O",
        }
    }

    fn index(self) -> usize {
        match self {
            ThreadRole::Main => 0,
            ThreadRole::Compute => 1,
            ThreadRole::Io => 2,
        }
    }
}

/// What the weights' binding did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightsBinding {
    /// Pages bound to the node (`bind:N` in `/proc/PID/numa_maps`): this many bytes.
    Bound { bytes: u64 },
    /// The file is on persistent memory mounted with DAX: its pages are the namespace's.
    OnPmem { numa_node: Option<u32> },
    /// The binding failed (warned); the pages go where the kernel puts them.
    Failed,
}

/// An expert node's pinning to one NUMA node.
#[derive(Debug)]
pub struct Pinning {
    numa_node: u32,
    /// OS indices of node `numa_node`'s processing units, in the planning topology.
    pus: Vec<u32>,
    /// Where the plan came from (`this machine`, `synthetic:...`).
    source: String,
    /// `None` where this machine's topology could not be read (warned once).
    binder: Option<Binder>,
    /// Per [`ThreadRole`]: whether its first binding was reported.
    reported: [AtomicBool; 3],
    threads_pinned: AtomicU64,
    threads_unpinned: AtomicU64,
}

impl Pinning {
    /// Plans pinning to NUMA node `numa_node` of `topology` (a `--topology` spec; `None`:
    /// this machine). A spec that does not parse, or a node the topology lacks, is a usage
    /// error; a machine whose topology cannot be read gets a warning and no binding.
    pub fn plan(numa_node: u32, topology: Option<&str>) -> Result<Pinning, NodeError> {
        let usage = |e: shared::topology::TopologyError| {
            NodeError::Usage(match topology {
                Some(_) => format!("--topology: {e}"),
                None => format!("--numa-node {numa_node}: {e}"),
            })
        };
        let planned = match Topology::from_spec_or_detect(topology) {
            Ok(t) => Some(t),
            Err(e) if topology.is_some() => return Err(usage(e)),
            Err(e) => {
                warn!(error = %e, "cannot read this machine's topology: serving unpinned");
                None
            }
        };
        let (pus, source) = match &planned {
            Some(t) => (
                t.pin_for_numa_node(numa_node).map_err(usage)?.pus,
                t.source.clone(),
            ),
            None => (Vec::new(), "nothing".to_owned()),
        };
        let binder = match (&planned, Binder::this_machine()) {
            (None, _) => None,
            (Some(_), Ok(b)) => Some(b),
            (Some(_), Err(e)) => {
                warn!(error = %e, "cannot read this machine's topology: serving unpinned");
                None
            }
        };
        info!(
            numa_node,
            pus = %format_list(&pus),
            topology = %source,
            "pinning to a NUMA node"
        );
        Ok(Pinning {
            numa_node,
            pus,
            source,
            binder,
            reported: Default::default(),
            threads_pinned: AtomicU64::new(0),
            threads_unpinned: AtomicU64::new(0),
        })
    }

    /// The NUMA node pinned to (the inventory's `numa_node`).
    pub fn numa_node(&self) -> u32 {
        self.numa_node
    }

    /// The node's processing units in the planning topology.
    pub fn pus(&self) -> &[u32] {
        &self.pus
    }

    /// Where the plan came from.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Threads bound so far, and threads whose binding failed.
    pub fn threads(&self) -> (u64, u64) {
        (
            self.threads_pinned.load(Ordering::Relaxed),
            self.threads_unpinned.load(Ordering::Relaxed),
        )
    }

    /// Binds the calling thread to the node's units and makes it prefer the node's memory;
    /// a failure is warned about (once per role) and the thread runs unpinned.
    pub fn pin_current_thread(&self, role: ThreadRole) {
        let Some(binder) = &self.binder else {
            self.threads_unpinned.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let cpus = binder.bind_thread_cpus(&self.pus);
        let memory = binder.prefer_thread_memory(self.numa_node);
        let first = !self.reported[role.index()].swap(true, Ordering::Relaxed);
        let thread = std::thread::current();
        let thread = thread.name().unwrap_or("unnamed");
        match &cpus {
            Ok(()) => {
                self.threads_pinned.fetch_add(1, Ordering::Relaxed);
                if first {
                    info!(
                        threads = role.name(),
                        pus = %format_list(&self.pus),
                        numa_node = self.numa_node,
                        "threads pinned"
                    );
                }
                debug!(thread, pus = %format_list(&self.pus), "thread pinned");
            }
            Err(e) => {
                self.threads_unpinned.fetch_add(1, Ordering::Relaxed);
                if first {
                    warn!(
                        threads = role.name(),
                        error = %e,
                        "cannot pin threads to the NUMA node's units: they run unpinned"
                    );
                }
                debug!(thread, error = %e, "thread not pinned");
            }
        }
        if let Err(e) = memory {
            if first {
                warn!(
                    threads = role.name(),
                    error = %e,
                    "cannot make threads prefer the NUMA node's memory"
                );
            }
        }
    }

    /// Warns when `path` is on another NUMA node's persistent memory; says whether it is on
    /// a DAX mount (then its pages are the namespace's and are not bound).
    pub fn check_model_location(&self, path: &Path) -> Option<shared::topology::PmemLocation> {
        let location = Pmem::read(Path::new("/")).location_of(path)?;
        match location.numa_node {
            Some(node) if node != self.numa_node => warn!(
                model = %path.display(),
                model_numa_node = node,
                numa_node = self.numa_node,
                namespace = location.namespace.as_deref().unwrap_or("?"),
                "the model file is on NUMA node {node}'s persistent memory but this node is \
                 pinned to NUMA node {}: every read crosses sockets (put a `moeshard split` \
                 file on node {}'s namespace)",
                self.numa_node,
                self.numa_node
            ),
            Some(_) => info!(
                model = %path.display(),
                namespace = location.namespace.as_deref().unwrap_or("?"),
                dax = location.dax,
                "the model file is on this NUMA node's persistent memory"
            ),
            None => warn!(
                model = %path.display(),
                mount = %location.mount_point.display(),
                "the model file is on persistent memory whose NUMA node the kernel does not say"
            ),
        }
        Some(location)
    }

    /// Binds the pages of `area` (DRAM copies of weights: the DRAM tier's) to the node before
    /// they are touched; false (logged at debug) where binding is not possible here.
    pub fn bind_area(&self, area: &[u8]) -> bool {
        let Some(binder) = &self.binder else {
            return false;
        };
        match binder.bind_area(area, self.numa_node) {
            Ok(_) => true,
            Err(e) => {
                tracing::debug!(error = %e, "cannot bind a DRAM copy to the NUMA node");
                false
            }
        }
    }

    /// Binds the pages of the weights' mappings to the
    /// node, unless they live on DAX persistent memory; logs what was done.
    pub fn bind_weights(&self, weights: &NodeWeights) -> WeightsBinding {
        if let Some(location) = self.check_model_location(weights.path()) {
            if location.dax {
                info!(
                    numa_node = ?location.numa_node,
                    "weights are on persistent memory (DAX): their pages are not bound"
                );
                return WeightsBinding::OnPmem {
                    numa_node: location.numa_node,
                };
            }
        }
        let Some(binder) = &self.binder else {
            return WeightsBinding::Failed;
        };
        let mut bytes = 0u64;
        let mut areas = 0usize;
        for area in weights.mapped_slices() {
            match binder.bind_area(area, self.numa_node) {
                Ok(n) => {
                    bytes += n;
                    areas += 1;
                }
                Err(e) => {
                    warn!(
                        error = %e,
                        "cannot bind the weights' pages to the NUMA node: the kernel places them"
                    );
                    return WeightsBinding::Failed;
                }
            }
        }
        info!(
            numa_node = self.numa_node,
            bytes, areas, "weights bound to the NUMA node's memory"
        );
        WeightsBinding::Bound { bytes }
    }
}
