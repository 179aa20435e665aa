//! moeshard's wire protocol between the coordinator and expert nodes.
//!
//! The schema is `proto/moeshard.proto` (package `moeshard.v1`), compiled by prost into
//! [`wire`]. Only this crate knows protobuf: [`convert`] turns wire messages into `shared`
//! types ([`shared::moe::Assignment`], [`shared::quant::matmul::Activations`]) and checks
//! everything a node or coordinator relies on (version, model identity, ids, shapes,
//! sizes, finite values), answering bad input with a [`ProtoError`] that names the field
//! and the values, never a panic. [`limits`] fixes the message sizes; [`framing`] puts
//! messages on a byte stream (QUIC) as a u32 little-endian length then the message.
//!
//! [`transport`] moves those messages between the coordinator and a node, behind one
//! trait pair: a node implements [`transport::NodeService`], the coordinator holds a
//! [`transport::NodeLink`] per node, over [`transport::InprocLink`] (same process),
//! [`transport::grpc`] (tonic, one bidirectional stream per link; the service is generated
//! into [`wire`]) or [`transport::quic`] (quinn, TLS always, a stream per call). All three
//! pass one conformance suite. Transports enforce only the message size; the checks of a
//! message's content stay in [`convert`].

pub mod convert;
pub mod error;
pub mod framing;
pub mod fuzz;
pub mod limits;
pub mod transport;

#[cfg(test)]
mod tests;

/// The prost types generated from `proto/moeshard.proto`, and the tonic client
/// (`expert_node_client`) and server (`expert_node_server`) of its `ExpertNode` service.
#[allow(missing_docs, unreachable_pub, clippy::all, clippy::pedantic)]
pub mod wire {
    include!(concat!(env!("OUT_DIR"), "/moeshard.v1.rs"));
}

pub use convert::{
    partials_from_reply, DispatchContext, DispatchRequest, DispatchResponse, ExpertSlice, FfnPart,
    Hello, HelloReply, Inventory, Partials, RemoteError, Stage, MODEL_IDENTITY_BYTES,
};
pub use error::ProtoError;
pub use prost::Message;

/// Version of the coordinator ↔ expert-node protocol; a node refuses a peer whose version differs.
/// 2: dense parts are split in two rounds (`Dispatch.dense_stage`), a dense slice holds rows
/// of down. 3: routed slices too (`Dispatch.stage`: ONE_ROUND, HIDDEN, DOWN; answers per
/// assignment), a routed slice holds rows of down.
pub const PROTOCOL_VERSION: u32 = 3;
