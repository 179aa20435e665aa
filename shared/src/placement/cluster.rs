//! The cluster file: the nodes that exist, how to reach them, what they have.
//!
//! ```toml
//! # optional, all three or none: mutual TLS on every link (docs/security.md)
//! ca = "certs/ca.pem"             # the cluster CA; relative to the cluster file's directory
//! client_cert = "certs/coordinator.pem"
//! client_key = "certs/coordinator.key"
//!
//! [[node]]
//! name = "node0"
//! address = "127.0.0.1:7001"
//! transport = "quic"              # grpc | quic
//! cert = "certs/node0.pem"        # quic without `ca`: the node's certificate to trust
//! server_name = "localhost"       # TLS name (default: the address's host with `ca`, else "localhost")
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
    /// Mutual TLS on every link (gRPC and QUIC), from the top-level `ca`, `client_cert`
    /// and `client_key`; `None`: gRPC in plain text, QUIC trusting each node's `cert`.
    pub tls: Option<ClusterTls>,
}

/// The coordinator's side of mutual TLS (paths resolved against the cluster file's
/// directory): nodes must present a certificate signed by `ca` for their `server_name`;
/// the coordinator presents `client_cert`, which `ca` signed too (`moeshard certs`).
#[derive(Clone, Debug, PartialEq)]
pub struct ClusterTls {
    /// The cluster CA's certificate (PEM).
    pub ca: PathBuf,
    /// The coordinator's certificate (PEM) and its private key.
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
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
    /// quic without a cluster CA: the node's certificate (PEM) to trust, resolved
    /// against the cluster file's directory.
    pub cert: Option<PathBuf>,
    /// The name the node's certificate is checked against (default: with a cluster CA
    /// the address's host, without one [`DEFAULT_SERVER_NAME`]).
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
    ca: Option<PathBuf>,
    client_cert: Option<PathBuf>,
    client_key: Option<PathBuf>,
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
    /// Parses and checks a cluster file's text; relative `cert`, `ca`, `client_cert`
    /// and `client_key` paths are resolved against `base_dir`.
    pub fn from_toml(text: &str, base_dir: &Path) -> Result<Cluster, PlacementError> {
        let raw: RawCluster =
            toml::from_str(text).map_err(|e| PlacementError::Toml(e.to_string()))?;
        let tls = match (raw.ca, raw.client_cert, raw.client_key) {
            (None, None, None) => None,
            (Some(ca), Some(client_cert), Some(client_key)) => Some(ClusterTls {
                ca: base_dir.join(ca),
                client_cert: base_dir.join(client_cert),
                client_key: base_dir.join(client_key),
            }),
            (ca, cert, key) => {
                let missing: Vec<&str> = [
                    ("ca", ca.is_none()),
                    ("client_cert", cert.is_none()),
                    ("client_key", key.is_none()),
                ]
                .into_iter()
                .filter_map(|(name, missing)| missing.then_some(name))
                .collect();
                return Err(PlacementError::Cluster(format!(
                    "ca, client_cert and client_key go together (mutual TLS, docs/security.md): \
                     {} missing",
                    missing.join(" and ")
                )));
            }
        };
        let nodes = raw
            .node
            .into_iter()
            .map(|n| {
                let server_name = n.server_name.unwrap_or_else(|| match &tls {
                    Some(_) => address_host(&n.address).to_string(),
                    None => DEFAULT_SERVER_NAME.to_string(),
                });
                ClusterNode {
                    name: n.name,
                    address: n.address,
                    transport: n.transport,
                    cert: n.cert.map(|c| base_dir.join(c)),
                    server_name,
                    numa_node: n.numa_node,
                    memory_bytes: n.memory_bytes,
                    read_bandwidth_gbs: n.read_bandwidth_gbs,
                }
            })
            .collect();
        let cluster = Cluster { nodes, tls };
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

    /// The cluster as TOML text (paths as resolved).
    pub fn to_toml(&self) -> String {
        let q = |s: &str| toml::Value::String(s.to_string()).to_string();
        let mut out = String::new();
        if let Some(tls) = &self.tls {
            out.push_str(&format!("ca = {}\n", q(&tls.ca.to_string_lossy())));
            out.push_str(&format!(
                "client_cert = {}\n",
                q(&tls.client_cert.to_string_lossy())
            ));
            out.push_str(&format!(
                "client_key = {}\n",
                q(&tls.client_key.to_string_lossy())
            ));
        }
        for (i, n) in self.nodes.iter().enumerate() {
            if i > 0 || self.tls.is_some() {
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
    /// transport; without a cluster CA a certificate for quic, with one no `cert`; a
    /// non-empty server name; positive memory and a positive, finite bandwidth when
    /// given. At least one node.
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
            match (&self.tls, &n.cert) {
                (None, None) if n.transport == "quic" => {
                    return Err(bad(
                        "transport quic needs cert (the node's certificate, PEM)".to_string(),
                    ));
                }
                (Some(_), Some(_)) => {
                    return Err(bad(
                        "cert is not used with a cluster CA (ca): the node's certificate is checked against the CA; remove cert"
                            .to_string(),
                    ));
                }
                _ => {}
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

/// The host of `host:port` (an IPv6 address without its brackets).
fn address_host(address: &str) -> &str {
    let host = address.rsplit_once(':').map_or(address, |(host, _)| host);
    host.strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host)
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

#[cfg(test)]
mod tests {
    use super::*;

    const MUTUAL: &str = r#"
ca = "certs/ca.pem"
client_cert = "certs/coordinator.pem"
client_key = "/secrets/coordinator.key"

[[node]]
name = "node0"
address = "10.0.0.7:7001"
transport = "grpc"

[[node]]
name = "node1"
address = "[fd00::2]:7002"
transport = "quic"

[[node]]
name = "node2"
address = "hostc.lan:7003"
transport = "quic"
server_name = "node2"
"#;

    #[test]
    fn mutual_tls_fields_parse_and_round_trip() {
        let cluster = Cluster::from_toml(MUTUAL, Path::new("/srv/cluster")).unwrap();
        assert_eq!(
            cluster.tls,
            Some(ClusterTls {
                ca: PathBuf::from("/srv/cluster/certs/ca.pem"),
                client_cert: PathBuf::from("/srv/cluster/certs/coordinator.pem"),
                client_key: PathBuf::from("/secrets/coordinator.key"),
            })
        );
        // With a CA the name checked defaults to the address's host.
        let names: Vec<&str> = cluster
            .nodes
            .iter()
            .map(|n| n.server_name.as_str())
            .collect();
        assert_eq!(names, ["10.0.0.7", "fd00::2", "node2"]);
        assert!(cluster.nodes.iter().all(|n| n.cert.is_none()));
        let again = Cluster::from_toml(&cluster.to_toml(), Path::new("/elsewhere")).unwrap();
        assert_eq!(again, cluster);
        // Without one, "localhost" as before.
        let plain = "[[node]]\nname = \"a\"\naddress = \"10.0.0.7:1\"\ntransport = \"grpc\"\n";
        let cluster = Cluster::from_toml(plain, Path::new("")).unwrap();
        assert_eq!(cluster.tls, None);
        assert_eq!(cluster.nodes[0].server_name, DEFAULT_SERVER_NAME);
    }

    #[test]
    fn mutual_tls_fields_are_checked() {
        let refused = |text: &str| {
            Cluster::from_toml(text, Path::new(""))
                .unwrap_err()
                .to_string()
        };
        let node = "\n[[node]]\nname = \"a\"\naddress = \"10.0.0.7:1\"\ntransport = \"quic\"\n";
        assert_eq!(
            refused(&format!("ca = \"ca.pem\"\n{node}")),
            "cluster: ca, client_cert and client_key go together (mutual TLS, docs/security.md): \
             client_cert and client_key missing"
        );
        assert_eq!(
            refused(&format!(
                "client_cert = \"c.pem\"\nclient_key = \"c.key\"\n{node}"
            )),
            "cluster: ca, client_cert and client_key go together (mutual TLS, docs/security.md): \
             ca missing"
        );
        let tls = "ca = \"ca.pem\"\nclient_cert = \"c.pem\"\nclient_key = \"c.key\"\n";
        assert_eq!(
            refused(&format!("{tls}{node}cert = \"a.pem\"\n")),
            "cluster node 1 (\"a\"): cert is not used with a cluster CA (ca): the node's \
             certificate is checked against the CA; remove cert"
        );
        assert!(refused(node).contains("transport quic needs cert"));
    }
}
