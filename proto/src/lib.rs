//! moeshard's wire protocol between the coordinator and expert nodes.
//!
//! Not built yet: the protobuf schema, its conversions into `shared` types and
//! the inproc / gRPC / QUIC transports are the distributed-execution issue.
//! Until then this crate only fixes the protocol version both sides will check.

/// Version of the coordinator ↔ expert-node protocol; a node refuses a peer whose version differs.
pub const PROTOCOL_VERSION: u32 = 1;
