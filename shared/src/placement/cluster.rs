//! The cluster file: the nodes that exist, how to reach them, what they have.
//!
//! ```toml
//! [[node]]
//! name = "node0"
//! address = "127.0.0.1:7001"
//! transport = "quic"              # grpc | quic
//! cert = "certs/node0.pem"        # quic: relative to the cluster file's directory
//! server_name = "localhost"       # quic: TLS name (default "localhost")
//! numa_node = 0                   # optional
//! memory_bytes = 412316860416     # optional
//! read_bandwidth_gbs = 80.0       # optional
//! ```

use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::{is_valid_node_name, PlacementError, Plan};

/// The TLS server name used when a node gives none.
pub const DEFAULT_SERVER_NAME: &str = "localhost";

/// The transports a node can be reached by.
const TRANSPORTS: [&str; 2] = ["grpc", "quic"];

/// What exists: the nodes of a deployment.
#[derive(Clone, Debug, PartialEq)]
pub struct Cluster {
    /// The nodes in file order. Invariant (from `from_toml`): valid, unique names.
    pub nodes: Vec<ClusterNode>,
}

/// One node of the cluster.
#[derive(Clone, Debug, PartialEq)]
pub struct ClusterNode {
    /// Its name, as plans refer to it.
    pub name: String,
    /// `host:port` (an IPv6 host in brackets: `[::1]:7001`).
    pub address: String,
    /// `grpc` or `quic`.
    pub transport: String,
    /// quic: the node's certificate (PEM) to trust, resolved against the
    /// cluster file's directory.
    pub cert: Option<PathBuf>,
    /// quic: the name the certificate is checked against.
    pub server_name: String,
    /// The NUMA node it runs on (informational for now).
    pub numa_node: Option<u32>,
    /// Memory it can give to weights, in bytes.
    pub memory_bytes: Option<u64>,
    /// Its memory read bandwidth in GB/s (10^9 bytes per second).
    pub read_bandwidth_gbs: Option<f64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCluster {
    #[serde(default)]
    node: Vec<RawNode>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNode {
    name: String,
    address: String,
    transport: String,
    cert: Option<PathBuf>,
    server_name: Option<String>,
    numa_node: Option<u32>,
    memory_bytes: Option<u64>,
    read_bandwidth_gbs: Option<f64>,
}

impl Cluster {
    /// Parses and checks a cluster file's text; relative `cert` paths are
    /// resolved against `base_dir`.
    pub fn from_toml(text: &str, base_dir: &Path) -> Result<Cluster, PlacementError> {
        let raw: RawCluster =
            toml::from_str(text).map_err(|e| PlacementError::Toml(e.to_string()))?;
        let nodes = raw
            .node
            .into_iter()
            .map(|n| ClusterNode {
                name: n.name,
                address: n.address,
                transport: n.transport,
                cert: n.cert.map(|c| base_dir.join(c)),
                server_name: n
                    .server_name
                    .unwrap_or_else(|| DEFAULT_SERVER_NAME.to_string()),
                numa_node: n.numa_node,
                memory_bytes: n.memory_bytes,
                read_bandwidth_gbs: n.read_bandwidth_gbs,
            })
            .collect();
        let cluster = Cluster { nodes };
        cluster.validate()?;
        Ok(cluster)
    }

    /// Reads and parses a cluster file; errors name the file.
    pub fn load(path: &Path) -> Result<Cluster, PlacementError> {
        let text = fs::read_to_string(path).map_err(|cause| PlacementError::Io {
            op: "read",
            path: path.to_path_buf(),
            cause,
        })?;
        let base_dir = path.parent().unwrap_or(Path::new(""));
        Cluster::from_toml(&text, base_dir).map_err(|e| e.in_file(path))
    }

    /// The cluster as TOML text (cert paths as resolved).
    pub fn to_toml(&self) -> String {
        let q = |s: &str| toml::Value::String(s.to_string()).to_string();
        let mut out = String::new();
        for (i, n) in self.nodes.iter().enumerate() {
            if i > 0 {
                out.push('\n');
            }
            out.push_str("[[node]]\n");
            out.push_str(&format!("name = {}\n", q(&n.name)));
            out.push_str(&format!("address = {}\n", q(&n.address)));
            out.push_str(&format!("transport = {}\n", q(&n.transport)));
            if let Some(cert) = &n.cert {
                out.push_str(&format!("cert = {}\n", q(&cert.to_string_lossy())));
            }
            out.push_str(&format!("server_name = {}\n", q(&n.server_name)));
            if let Some(v) = n.numa_node {
                out.push_str(&format!("numa_node = {v}\n"));
            }
            if let Some(v) = n.memory_bytes {
                out.push_str(&format!("memory_bytes = {v}\n"));
            }
            if let Some(v) = n.read_bandwidth_gbs {
                // `{:?}` keeps a decimal point (80.0, not 80), so it reads back as a float.
                out.push_str(&format!("read_bandwidth_gbs = {v:?}\n"));
            }
        }
        out
    }

    /// Checks every node: a valid, unique name; an address `host:port`; a known
    /// transport; a certificate for quic; a non-empty server name; positive
    /// memory and a positive, finite bandwidth when given. At least one node.
    pub fn validate(&self) -> Result<(), PlacementError> {
        if self.nodes.is_empty() {
            return Err(PlacementError::Cluster(
                "no nodes (add [[node]] tables)".to_string(),
            ));
        }
        for (i, n) in self.nodes.iter().enumerate() {
            let bad = |why: String| PlacementError::ClusterNode {
                index: i + 1,
                name: n.name.clone(),
                why,
            };
            if !is_valid_node_name(&n.name) {
                return Err(bad(
                    "not a valid node name (1 to 64 letters, digits, '.', '_' or '-', not starting with '.')"
                        .to_string(),
                ));
            }
            if let Some(first) = self.nodes[..i].iter().position(|m| m.name == n.name) {
                return Err(bad(format!("the name is also used by node {}", first + 1)));
            }
            check_address(&n.address)
                .map_err(|why| bad(format!("address {:?}: {why}", n.address)))?;
            if !TRANSPORTS.contains(&n.transport.as_str()) {
                return Err(bad(format!(
                    "transport {:?} is not one of {}",
                    n.transport,
                    TRANSPORTS.join(", ")
                )));
            }
            if n.transport == "quic" && n.cert.is_none() {
                return Err(bad(
                    "transport quic needs cert (the node's certificate, PEM)".to_string(),
                ));
            }
            if n.server_name.is_empty() {
                return Err(bad("server_name is empty".to_string()));
            }
            if n.memory_bytes == Some(0) {
                return Err(bad("memory_bytes is 0".to_string()));
            }
            if let Some(bw) = n.read_bandwidth_gbs {
                if !(bw.is_finite() && bw > 0.0) {
                    return Err(bad(format!(
                        "read_bandwidth_gbs = {bw} is not a positive number"
                    )));
                }
            }
        }
        Ok(())
    }

    /// The node named `name`.
    pub fn node(&self, name: &str) -> Option<&ClusterNode> {
        self.nodes.iter().find(|n| n.name == name)
    }

    /// Refuses a plan naming a node this cluster does not have.
    pub fn check_plan(&self, plan: &Plan) -> Result<(), PlacementError> {
        match plan.nodes.iter().find(|name| self.node(name).is_none()) {
            Some(name) => Err(PlacementError::Cluster(format!(
                "the plan's node {name:?} is not in the cluster (nodes: {})",
                self.nodes
                    .iter()
                    .map(|n| n.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))),
            None => Ok(()),
        }
    }
}

/// Checks `host:port`: a socket address, or a host name and a port.
fn check_address(address: &str) -> Result<(), String> {
    if address.parse::<SocketAddr>().is_ok() {
        return Ok(());
    }
    let Some((host, port)) = address.rsplit_once(':') else {
        return Err("expected host:port".to_string());
    };
    if port.parse::<u16>().is_err() {
        return Err(format!("port {port:?} is not a number from 0 to 65535"));
    }
    let host_ok = !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && !label.starts_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        });
    if !host_ok {
        return Err(format!(
            "host {host:?} is not a host name or an IP address (an IPv6 address goes in brackets: [::1]:7001)"
        ));
    }
    Ok(())
}
