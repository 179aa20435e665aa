//! What the machine is: packages, NUMA nodes (their memory and the processing units local to
//! each) and persistent memory (fsdax namespaces, the NUMA node each belongs to, their DAX
//! mounts), read through hwloc (hwlocality) and sysfs.
//!
//! A [`Topology`] is plain data: [`Topology::detect`] describes this machine,
//! [`Topology::from_spec`] a described one (`synthetic:<hwloc synthetic description>` or
//! `xml:<hwloc XML file>`), so that tests and plans for other machines go through the same
//! code as the real machine. [`Topology::node_plan`] is the pinning plan (one expert node per
//! NUMA node, with its processing units and memory node, and the coordinator's per-socket
//! parts): a pure function of the topology. [`Binder`] is the one thing that acts: it binds
//! the calling thread or a memory area, always on this machine, whatever topology planned it.
//!
//! Persistent memory is read from a root directory ([`Pmem::read`]: `/` for the real
//! machine) so that tests can point it at a fake `sys/bus/nd/devices` and `proc/mounts`.

mod bind;
mod plan;
mod pmem;

#[cfg(test)]
mod tests;

use std::fmt;
use std::path::{Path, PathBuf};

use hwlocality::object::attributes::ObjectAttributes;
use hwlocality::object::types::ObjectType;
use hwlocality::object::TopologyObject;
use serde::Serialize;
use thiserror::Error;

pub use bind::Binder;
pub use plan::{CoordinatorPart, ExpertNodePin, NodePlan};
pub use pmem::{Pmem, PmemLocation, PmemMount, PmemNamespace};

/// Why a topology could not be read or used. Every variant is permanent for its input (a
/// bad spec, a file hwloc refuses); binding failures ([`TopologyError::Bind`]) depend on the
/// machine and are meant to be warned about, not to stop a program.
#[derive(Debug, Error)]
pub enum TopologyError {
    #[error(
        "topology \"{spec}\": expected synthetic:<hwloc synthetic description> \
         (e.g. \"synthetic:pack:2 numa:1 core:4 pu:1\") or xml:<hwloc XML file>"
    )]
    BadSpec { spec: String },
    #[error("topology \"{spec}\": hwloc refused it: {detail}")]
    Refused { spec: String, detail: String },
    #[error("reading the topology: hwloc: {0}")]
    Hwloc(String),
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the topology has no NUMA node {node} with processing units (nodes: {known})")]
    NoSuchNode { node: u32, known: String },
    #[error("the topology has no NUMA node with processing units")]
    NoComputeNodes,
    #[error("a pinning plan needs at least one expert node")]
    NoExpertNodes,
    #[error("binding {what}: {detail}")]
    Bind { what: String, detail: String },
}

/// What kind of memory a NUMA node has (hwloc's subtype of the node).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(into = "String")]
pub enum MemoryKind {
    /// Ordinary memory (hwloc gives no subtype).
    Dram,
    /// Non-volatile memory exposed as a NUMA node (a DAX device onlined as system RAM).
    Nvm,
    /// Anything else hwloc names (`MCDRAM`, `HBM`, `GPUMemory`, ...).
    Other(String),
}

impl fmt::Display for MemoryKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MemoryKind::Dram => f.write_str("DRAM"),
            MemoryKind::Nvm => f.write_str("NVM"),
            MemoryKind::Other(s) => f.write_str(s),
        }
    }
}

impl From<MemoryKind> for String {
    fn from(kind: MemoryKind) -> String {
        kind.to_string()
    }
}

/// A processor package (socket).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Package {
    /// hwloc's logical index (0, 1, ... in topology order).
    pub index: u32,
    /// The OS's physical package id, where known.
    pub os_index: Option<u32>,
    pub n_cores: usize,
    /// OS indices of the processing units (hardware threads), sorted.
    pub pus: Vec<u32>,
    /// OS indices of the NUMA nodes local to it, sorted.
    pub numa_nodes: Vec<u32>,
}

/// A NUMA node: memory and the processing units local to it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct NumaNode {
    /// The OS's node number (what `numactl`, `/proc/PID/numa_maps` and binding use).
    pub os_index: u32,
    /// The logical index of the package it belongs to, where it is inside one.
    pub package: Option<u32>,
    pub kind: MemoryKind,
    pub memory_bytes: u64,
    /// Cores whose processing units are all local to this node.
    pub n_cores: usize,
    /// OS indices of the local processing units, sorted (empty for a memory-only node that
    /// hwloc does not attach to any).
    pub pus: Vec<u32>,
    /// The DAX device behind an NVM node (hwloc's `DAXDevice` info), e.g. `dax0.0`.
    pub dax_device: Option<String>,
}

/// The machine: packages, NUMA nodes and persistent memory.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Topology {
    /// Where the description came from: `this machine`, `synthetic:...` or `xml:...`.
    pub source: String,
    /// In logical order.
    pub packages: Vec<Package>,
    /// Sorted by OS index.
    pub numa_nodes: Vec<NumaNode>,
    pub pmem: Pmem,
}

impl Topology {
    /// This machine, as hwloc sees it (restricted to the processing units and memory this
    /// process may use), with its persistent memory from `/sys` and `/proc/mounts`.
    pub fn detect() -> Result<Topology, TopologyError> {
        let hw = hwlocality::Topology::new().map_err(|e| TopologyError::Hwloc(e.to_string()))?;
        let mut topology = Topology::from_hwloc(&hw, "this machine");
        topology.pmem = Pmem::read(Path::new("/"));
        Ok(topology)
    }

    /// A described machine: `synthetic:<hwloc synthetic description>` (for example
    /// `synthetic:pack:2 numa:1 core:4 pu:1`) or `xml:<hwloc XML file>` (as `lstopo
    /// file.xml` writes it). It has no persistent memory unless one is added
    /// ([`Topology::with_pmem`]).
    pub fn from_spec(spec: &str) -> Result<Topology, TopologyError> {
        let refused = |detail: String| TopologyError::Refused {
            spec: spec.to_owned(),
            detail,
        };
        let builder = hwlocality::Topology::builder();
        let builder = if let Some(description) = spec.strip_prefix("synthetic:") {
            builder
                .from_synthetic(description.trim())
                .map_err(|e| refused(format!("not a synthetic description ({e})")))?
        } else if let Some(file) = spec.strip_prefix("xml:") {
            let path = Path::new(file.trim());
            // hwloc's own message for a missing file is vague: say which file.
            std::fs::metadata(path).map_err(|source| TopologyError::Io {
                path: path.to_owned(),
                source,
            })?;
            builder
                .from_xml_file(path)
                .map_err(|e| refused(format!("not a hwloc XML topology ({e})")))?
        } else {
            return Err(TopologyError::BadSpec {
                spec: spec.to_owned(),
            });
        };
        let hw = builder.build().map_err(|e| refused(e.to_string()))?;
        Ok(Topology::from_hwloc(&hw, spec))
    }

    /// [`Topology::from_spec`] for `Some`, [`Topology::detect`] for `None`: what a
    /// `--topology` flag means.
    pub fn from_spec_or_detect(spec: Option<&str>) -> Result<Topology, TopologyError> {
        match spec {
            Some(spec) => Topology::from_spec(spec),
            None => Topology::detect(),
        }
    }

    /// The same topology with this persistent memory.
    pub fn with_pmem(mut self, pmem: Pmem) -> Topology {
        self.pmem = pmem;
        self
    }

    fn from_hwloc(hw: &hwlocality::Topology, source: &str) -> Topology {
        let packages_hw: Vec<&TopologyObject> = hw.objects_with_type(ObjectType::Package).collect();
        let cores_hw: Vec<&TopologyObject> = hw.objects_with_type(ObjectType::Core).collect();
        let pus_of = |obj: &TopologyObject| -> Vec<u32> {
            let mut pus: Vec<u32> = obj
                .cpuset()
                .map(|set| set.iter_set().map(|i| usize::from(i) as u32).collect())
                .unwrap_or_default();
            pus.sort_unstable();
            pus
        };
        // A core counts for a node when all its processing units are local to the node.
        let n_cores_in = |pus: &[u32]| -> usize {
            cores_hw
                .iter()
                .filter(|core| {
                    let core_pus = pus_of(core);
                    !core_pus.is_empty() && core_pus.iter().all(|p| pus.binary_search(p).is_ok())
                })
                .count()
        };

        let mut numa_nodes: Vec<NumaNode> = hw
            .objects_with_type(ObjectType::NUMANode)
            .map(|node| {
                let pus = pus_of(node);
                let package = node
                    .first_ancestor_with_type(ObjectType::Package)
                    .or_else(|| {
                        // A node above several packages is in none; one whose processing
                        // units are all in a package belongs to it.
                        packages_hw.iter().copied().find(|pkg| {
                            let pkg_pus = pus_of(pkg);
                            !pus.is_empty() && pus.iter().all(|p| pkg_pus.binary_search(p).is_ok())
                        })
                    })
                    .map(|pkg| pkg.logical_index() as u32);
                let memory_bytes = match node.attributes() {
                    Some(ObjectAttributes::NUMANode(attr)) => {
                        attr.local_memory().map(|m| m.get()).unwrap_or(0)
                    }
                    _ => 0,
                };
                let kind = match node.subtype().map(|s| s.to_string_lossy().into_owned()) {
                    None => MemoryKind::Dram,
                    Some(s) if s.eq_ignore_ascii_case("NVM") => MemoryKind::Nvm,
                    Some(s) => MemoryKind::Other(s),
                };
                let dax_device = node
                    .info("DAXDevice")
                    .map(|s| s.to_string_lossy().into_owned());
                NumaNode {
                    os_index: node.os_index().unwrap_or(0) as u32,
                    package,
                    kind,
                    memory_bytes,
                    n_cores: n_cores_in(&pus),
                    pus,
                    dax_device,
                }
            })
            .collect();
        numa_nodes.sort_by_key(|n| n.os_index);

        let packages = packages_hw
            .iter()
            .map(|pkg| {
                let index = pkg.logical_index() as u32;
                let pus = pus_of(pkg);
                Package {
                    index,
                    os_index: pkg.os_index().map(|i| i as u32),
                    n_cores: n_cores_in(&pus),
                    pus,
                    numa_nodes: numa_nodes
                        .iter()
                        .filter(|n| n.package == Some(index))
                        .map(|n| n.os_index)
                        .collect(),
                }
            })
            .collect();
        Topology {
            source: source.to_owned(),
            packages,
            numa_nodes,
            pmem: Pmem::default(),
        }
    }

    /// The NUMA node with this OS index.
    pub fn numa_node(&self, os_index: u32) -> Option<&NumaNode> {
        self.numa_nodes.iter().find(|n| n.os_index == os_index)
    }

    /// The NUMA node of the persistent-memory namespace `path` lives on (`None` for a file
    /// on an ordinary disk, or on a namespace whose node the kernel does not say).
    pub fn numa_node_of_path(&self, path: &Path) -> Option<u32> {
        self.pmem.location_of(path).and_then(|l| l.numa_node)
    }

    /// The text `moeshard topology` prints: one line per package and NUMA node, then the
    /// persistent-memory namespaces and their mounts.
    pub fn to_text(&self) -> String {
        use std::fmt::Write;
        let mut out = String::new();
        let _ = writeln!(out, "topology: {}", self.source);
        for pkg in &self.packages {
            let nodes: Vec<String> = pkg.numa_nodes.iter().map(u32::to_string).collect();
            let _ = writeln!(
                out,
                "package {}: {} cores, PUs {}, NUMA nodes {}",
                pkg.index,
                pkg.n_cores,
                format_list(&pkg.pus),
                if nodes.is_empty() {
                    "-".to_owned()
                } else {
                    nodes.join(",")
                },
            );
        }
        for node in &self.numa_nodes {
            let package = node
                .package
                .map_or_else(|| "no package".to_owned(), |p| format!("package {p}"));
            let dax = node
                .dax_device
                .as_ref()
                .map(|d| format!(", {d}"))
                .unwrap_or_default();
            let _ = writeln!(
                out,
                "numa {} ({package}, {}{dax}): {} cores, PUs {}, {}",
                node.os_index,
                node.kind,
                node.n_cores,
                format_list(&node.pus),
                format_bytes(node.memory_bytes),
            );
        }
        if self.pmem.namespaces.is_empty() && self.pmem.mounts.is_empty() {
            let _ = writeln!(out, "pmem: none");
        }
        for ns in &self.pmem.namespaces {
            let dev = ns
                .blockdev
                .as_ref()
                .map(|b| format!(", /dev/{b}"))
                .unwrap_or_default();
            let _ = writeln!(
                out,
                "pmem {} ({}, {}, {}{dev}): numa {}",
                ns.name,
                ns.region,
                ns.mode,
                format_bytes(ns.size_bytes),
                ns.numa_node
                    .map_or_else(|| "unknown".to_owned(), |n| n.to_string()),
            );
        }
        for m in &self.pmem.mounts {
            let _ = writeln!(
                out,
                "mount {} ({}, {}, {}): numa {}",
                m.mount_point.display(),
                m.device,
                m.fs_type,
                if m.dax { "dax" } else { "no dax: page cache" },
                m.numa_node
                    .map_or_else(|| "unknown".to_owned(), |n| n.to_string()),
            );
        }
        out
    }
}

/// The NUMA node of the persistent-memory namespace `path` lives on, on this machine (reads
/// `/sys/bus/nd/devices` and `/proc/mounts`); `None` for ordinary disks.
pub fn numa_node_of_path(path: &Path) -> Option<u32> {
    Pmem::read(Path::new("/"))
        .location_of(path)
        .and_then(|l| l.numa_node)
}

/// `0-3,8,10-11`: sorted numbers as ranges (`-` for none).
pub fn format_list(values: &[u32]) -> String {
    if values.is_empty() {
        return "-".to_owned();
    }
    let mut parts = Vec::new();
    let mut i = 0;
    while i < values.len() {
        let mut j = i;
        while j + 1 < values.len() && values[j + 1] == values[j] + 1 {
            j += 1;
        }
        parts.push(if i == j {
            values[i].to_string()
        } else {
            format!("{}-{}", values[i], values[j])
        });
        i = j + 1;
    }
    parts.join(",")
}

fn format_bytes(bytes: u64) -> String {
    const GIB: f64 = (1u64 << 30) as f64;
    const MIB: f64 = (1u64 << 20) as f64;
    let b = bytes as f64;
    if b >= GIB {
        format!("{:.1} GiB", b / GIB)
    } else {
        format!("{:.1} MiB", b / MIB)
    }
}
