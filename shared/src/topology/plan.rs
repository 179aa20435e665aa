//! The pinning plan: which processing units and which memory node each expert node of one
//! box gets, and the coordinator's per-socket parts. A pure function of the [`Topology`].
//!
//! One expert node per NUMA node that has processing units (DRAM nodes first: an NVM node
//! hwloc attaches to a package has that package's units too, but it is memory, not a
//! socket). Each expert node is pinned to its node's units and binds its weights to its
//! node's memory; its model shard belongs on that node's persistent-memory mounts, where
//! there are some. With more expert nodes than NUMA nodes, the nodes sharing a NUMA node
//! divide its units into contiguous shares. The coordinator splits its own dense work into
//! one part per NUMA node, computed on that node's units from that node's memory: the
//! coordinator's parts and the expert nodes take turns within a layer, so they share the
//! units rather than divide them.

use std::path::PathBuf;

use serde::Serialize;

use super::{format_list, MemoryKind, NumaNode, Topology, TopologyError};

/// Where one expert node runs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ExpertNodePin {
    /// The NUMA node it belongs to (`--numa-node`).
    pub numa_node: u32,
    /// The logical index of that node's package.
    pub package: Option<u32>,
    /// OS indices of the processing units its threads are bound to, sorted.
    pub pus: Vec<u32>,
    /// The NUMA node its weights' pages are bound to.
    pub memory_node: u32,
    /// DAX mounts of persistent memory on its NUMA node: where its shard file should live.
    pub pmem_mounts: Vec<PathBuf>,
}

/// One part of the coordinator's dense work (a share of the attention heads, of the shared
/// experts' and dense layers' intermediate rows, of the output head's vocabulary rows).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct CoordinatorPart {
    pub numa_node: u32,
    /// OS indices of the processing units its threads are bound to, sorted.
    pub pus: Vec<u32>,
    /// The NUMA node its weights are copied to and bound to.
    pub memory_node: u32,
}

/// The pinning plan of a box: expert nodes in order (node `i` is expert node `i`), and the
/// coordinator's parts in NUMA node order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct NodePlan {
    pub expert_nodes: Vec<ExpertNodePin>,
    pub coordinator: Vec<CoordinatorPart>,
}

impl NodePlan {
    /// The expert node planned for NUMA node `numa_node` (the first, where several share it).
    pub fn for_numa_node(&self, numa_node: u32) -> Option<&ExpertNodePin> {
        self.expert_nodes.iter().find(|p| p.numa_node == numa_node)
    }

    /// One line per expert node, then one per coordinator part.
    pub fn to_text(&self) -> String {
        use std::fmt::Write;
        let mut out = String::new();
        for (i, node) in self.expert_nodes.iter().enumerate() {
            let pmem: Vec<String> = (node.pmem_mounts.iter())
                .map(|m| m.display().to_string())
                .collect();
            let _ = writeln!(
                out,
                "plan: expert node {i} on numa {}: PUs {}, memory node {}{}",
                node.numa_node,
                format_list(&node.pus),
                node.memory_node,
                if pmem.is_empty() {
                    String::new()
                } else {
                    format!(", shard on {}", pmem.join(" or "))
                }
            );
        }
        for part in &self.coordinator {
            let _ = writeln!(
                out,
                "plan: coordinator part on numa {}: PUs {}, memory node {}",
                part.numa_node,
                format_list(&part.pus),
                part.memory_node
            );
        }
        out
    }
}

impl Topology {
    /// The NUMA nodes that can run threads, in OS index order: the DRAM nodes with
    /// processing units, or, where there are none, any node with processing units.
    pub fn compute_nodes(&self) -> Vec<&NumaNode> {
        let with_pus = |n: &&NumaNode| !n.pus.is_empty();
        let dram: Vec<&NumaNode> = (self.numa_nodes.iter())
            .filter(with_pus)
            .filter(|n| n.kind == MemoryKind::Dram)
            .collect();
        if dram.is_empty() {
            self.numa_nodes.iter().filter(with_pus).collect()
        } else {
            dram
        }
    }

    /// The pinning plan for `n_expert_nodes` expert nodes on this box: node `i` on the
    /// `i mod m`-th of the `m` compute NUMA nodes ([`Topology::compute_nodes`]); what
    /// `--numa auto` starts is `node_plan(m)`, one per NUMA node.
    pub fn node_plan(&self, n_expert_nodes: usize) -> Result<NodePlan, TopologyError> {
        if n_expert_nodes == 0 {
            return Err(TopologyError::NoExpertNodes);
        }
        let compute = self.compute_nodes();
        if compute.is_empty() {
            return Err(TopologyError::NoComputeNodes);
        }
        let m = compute.len();
        let mut expert_nodes = Vec::with_capacity(n_expert_nodes);
        for i in 0..n_expert_nodes {
            let node = compute[i % m];
            // Expert nodes i mod m == k share NUMA node k; this one is the `rank`-th of them.
            let sharers = n_expert_nodes / m + usize::from(i % m < n_expert_nodes % m);
            let rank = i / m;
            expert_nodes.push(ExpertNodePin {
                numa_node: node.os_index,
                package: node.package,
                pus: share(&node.pus, rank, sharers),
                memory_node: node.os_index,
                pmem_mounts: self
                    .pmem
                    .mounts
                    .iter()
                    .filter(|mount| mount.dax && mount.numa_node == Some(node.os_index))
                    .map(|mount| mount.mount_point.clone())
                    .collect(),
            });
        }
        let coordinator = compute
            .iter()
            .map(|node| CoordinatorPart {
                numa_node: node.os_index,
                pus: node.pus.clone(),
                memory_node: node.os_index,
            })
            .collect();
        Ok(NodePlan {
            expert_nodes,
            coordinator,
        })
    }

    /// The processing units of NUMA node `numa_node` for one expert node pinned to it, or a
    /// [`TopologyError::NoSuchNode`] naming the nodes there are.
    pub fn pin_for_numa_node(&self, numa_node: u32) -> Result<ExpertNodePin, TopologyError> {
        let compute = self.compute_nodes();
        let plan = self.node_plan(compute.len().max(1))?;
        plan.for_numa_node(numa_node)
            .cloned()
            .ok_or_else(|| TopologyError::NoSuchNode {
                node: numa_node,
                known: format_list(&compute.iter().map(|n| n.os_index).collect::<Vec<_>>()),
            })
    }
}

/// The `rank`-th of `n` contiguous, near-equal shares of `pus` (the first shares get the
/// extra unit); with fewer units than shares, the units are shared round-robin.
fn share(pus: &[u32], rank: usize, n: usize) -> Vec<u32> {
    if n <= 1 {
        return pus.to_vec();
    }
    if pus.len() < n {
        return vec![pus[rank % pus.len()]];
    }
    let base = pus.len() / n;
    let extra = pus.len() % n;
    let start = rank * base + rank.min(extra);
    let len = base + usize::from(rank < extra);
    pus[start..start + len].to_vec()
}
