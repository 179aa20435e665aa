//! The harness of moeshard's cross-process end-to-end tests (`tests/it`): expert-node
//! daemons as child processes, fault-injecting proxies between the coordinator and a node,
//! and network namespaces joined by veth pairs (bandwidth limits with `tc tbf`).
//!
//! This kernel has no `netem`, so latency, loss, stalls and resets come from the proxies
//! ([`TcpProxy`] for gRPC links, [`UdpProxy`] for QUIC links); only bandwidth is shaped by
//! the kernel ([`NetnsLink::shape_tbf`]). Everything started here is stopped and removed on
//! drop, also when a test panics. The engine's and CLI's own tests live in
//! `coordinator/tests/it`, next to the binary they run.

#[path = "harness/netns.rs"]
pub mod netns;
#[path = "harness/node.rs"]
pub mod node;
#[path = "harness/proxy.rs"]
pub mod proxy;

use std::path::PathBuf;

pub use netns::NetnsLink;
pub use node::{NodeProcess, NodeProgram, NodeSpec, Transport};
pub use proxy::{Direction, Faults, LinkProxy, ProxyStats, TcpProxy, UdpProxy};

/// Why a test could not run here (it passes, printing the reason).
#[derive(Debug)]
pub struct Skip(pub String);

impl std::fmt::Display for Skip {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// The committed fixtures (`tests/fixtures`).
pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}
