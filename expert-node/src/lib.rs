//! The expert-node daemon: serves the routed experts (or expert slices), and optionally
//! dense FFN slices, that its plan gives it, from its local memory.
//!
//! - [`weights`]: maps only the byte ranges of the slices served (from the model file or a
//!   `moeshard split` node file) and hands out zero-copy matrix views.
//! - [`service`]: [`NodeCore`], the transport-independent answers (handshake, dispatch,
//!   health, stats), every message checked first.
//! - [`daemon`]: command line, transports (gRPC or QUIC), graceful shutdown.
//! - [`pinning`]: `--numa-node`: threads on one NUMA node's units, weights on its memory.

pub mod daemon;
pub mod dram_cache;
pub mod error;
pub mod pinning;
pub mod service;
pub mod weights;

pub use daemon::NodeArgs;
pub use error::NodeError;
pub use pinning::Pinning;
pub use service::NodeCore;
pub use weights::NodeWeights;
