//! [`Binder`]: binds the calling thread's processing units and memory policy, and memory
//! areas, to a NUMA node of this machine.
//!
//! It always holds this machine's hwloc topology, whatever topology a plan was made from: a
//! plan from a synthetic topology naming units this machine lacks then fails to bind (an
//! error to warn about), where hwloc would silently do nothing for a topology that is not
//! this system's.

use hwlocality::cpu::binding::CpuBindingFlags;
use hwlocality::cpu::cpuset::CpuSet;
use hwlocality::memory::binding::{MemoryBindingFlags, MemoryBindingPolicy};
use hwlocality::memory::nodeset::NodeSet;

use super::TopologyError;

/// The page size areas are aligned to (mbind(2) wants a page-aligned start).
const PAGE: usize = 4096;

/// Binds threads and memory on this machine.
pub struct Binder {
    hw: hwlocality::Topology,
}

impl std::fmt::Debug for Binder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Binder")
            .field("cpuset", &self.hw.cpuset().to_string())
            .field("nodeset", &self.hw.nodeset().to_string())
            .finish()
    }
}

fn cpuset(pus: &[u32]) -> Result<CpuSet, TopologyError> {
    let mut set = CpuSet::new();
    for &pu in pus {
        if pu > i32::MAX as u32 {
            return Err(TopologyError::Bind {
                what: format!("to PU {pu}"),
                detail: "not a processing unit number".to_owned(),
            });
        }
        set.set(pu as usize);
    }
    Ok(set)
}

fn nodeset(node: u32) -> Result<NodeSet, TopologyError> {
    if node > i32::MAX as u32 {
        return Err(TopologyError::Bind {
            what: format!("to NUMA node {node}"),
            detail: "not a NUMA node number".to_owned(),
        });
    }
    let mut set = NodeSet::new();
    set.set(node as usize);
    Ok(set)
}

impl Binder {
    /// This machine's topology, for binding.
    pub fn this_machine() -> Result<Binder, TopologyError> {
        let hw = hwlocality::Topology::new().map_err(|e| TopologyError::Hwloc(e.to_string()))?;
        Ok(Binder { hw })
    }

    /// Binds the calling thread to the processing units `pus` (OS indices). Fails where
    /// this machine lacks one of them or does not support thread binding.
    pub fn bind_thread_cpus(&self, pus: &[u32]) -> Result<(), TopologyError> {
        let set = cpuset(pus)?;
        self.hw
            .bind_cpu(&set, CpuBindingFlags::THREAD)
            .map_err(|e| TopologyError::Bind {
                what: format!("this thread to PUs {}", super::format_list(pus)),
                detail: e.to_string(),
            })
    }

    /// The processing units the calling thread may run on.
    pub fn thread_cpus(&self) -> Result<Vec<u32>, TopologyError> {
        let set =
            self.hw
                .cpu_binding(CpuBindingFlags::THREAD)
                .map_err(|e| TopologyError::Bind {
                    what: "(reading this thread's PUs)".to_owned(),
                    detail: e.to_string(),
                })?;
        Ok(set.iter_set().map(|i| usize::from(i) as u32).collect())
    }

    /// Makes the calling thread allocate from NUMA node `node` first (Linux
    /// `MPOL_PREFERRED`: other nodes when it is full). Threads it starts afterwards inherit
    /// the policy; page-cache pages of mapped files follow the policy of the thread that
    /// faults them in.
    pub fn prefer_thread_memory(&self, node: u32) -> Result<(), TopologyError> {
        let set = nodeset(node)?;
        self.hw
            .bind_memory(&set, MemoryBindingPolicy::Bind, MemoryBindingFlags::THREAD)
            .map_err(|e| TopologyError::Bind {
                what: format!("this thread's memory to NUMA node {node}"),
                detail: e.to_string(),
            })
    }

    /// Binds the pages of `area` to NUMA node `node` (Linux `MPOL_BIND`, shown as `bind:N`
    /// in `/proc/PID/numa_maps`). The area's start is rounded up to a page boundary (a
    /// shorter area than that binds nothing); returns the bytes covered. Pages already
    /// present are not moved (hwloc offers no migration for an area).
    pub fn bind_area(&self, area: &[u8], node: u32) -> Result<u64, TopologyError> {
        let set = nodeset(node)?;
        let skip = area.as_ptr().align_offset(PAGE).min(area.len());
        let area = &area[skip..];
        if area.is_empty() {
            return Ok(0);
        }
        // STRICT makes Linux's policy MPOL_BIND; without it hwloc asks for MPOL_PREFERRED.
        let flags = MemoryBindingFlags::STRICT;
        self.hw
            .bind_memory_area::<[u8], _>(area, &set, MemoryBindingPolicy::Bind, flags)
            .map_err(|e| TopologyError::Bind {
                what: format!(
                    "{} bytes at {:p} to NUMA node {node}",
                    area.len(),
                    area.as_ptr()
                ),
                detail: e.to_string(),
            })?;
        Ok(area.len() as u64)
    }
}
