//! Transports between the coordinator and expert nodes, behind one trait pair.
//!
//! A node implements [`NodeService`]: one [`wire::CoordinatorMessage`] in, one
//! [`wire::NodeMessage`] out. The coordinator holds one [`NodeLink`] per node and calls it.
//! Three transports connect the two, and pass the same conformance tests
//! (`transport/tests.rs`):
//!
//! - [`InprocLink`]: the node lives in the coordinator's process; a call is a direct call of
//!   the service on a blocking thread, no encoding, no sockets (or on the calling thread:
//!   [`NodeLink::call_here`]).
//! - [`grpc`]: tonic; one long-lived bidirectional `Session` stream per link, opened by
//!   [`grpc::connect`]; the node answers a session's messages in order.
//! - [`quic`]: quinn over TLS 1.3 (always); one connection per link, one bidirectional stream
//!   per call carrying one [`framing`](crate::framing) frame each way.
//!
//! TLS (`tls.rs`, `ca.rs`): gRPC links are plain text unless given a [`ServerTls`] /
//! [`ClientTls`] ([`grpc::serve_tls`], [`grpc::connect_tls`]); QUIC links always use TLS,
//! server-authenticated by default and mutual with a cluster CA ([`CertAuthority`]): then a
//! node accepts only clients whose certificate the CA signed, and logs each refusal; the
//! coordinator accepts only nodes whose certificate the CA signed. A refused handshake is a
//! [`TransportError::Tls`] from `connect`, on both transports.
//!
//! Transports only move messages and enforce [`MAX_MESSAGE_BYTES`]: every check of a
//! message's content stays in [`convert`](crate::convert). A node's service is called on a
//! blocking thread (`tokio::task::spawn_blocking`), never on an async worker, since it
//! computes experts. Callers apply deadlines with `tokio::time::timeout`; a link whose peer
//! went away answers [`TransportError::Closed`] (or `Connect`) naming the peer, never hangs.
//!
//! Servers take an already-bound socket and a shutdown future: when it resolves they stop
//! accepting, let in-flight calls finish for at most [`SHUTDOWN_GRACE`], close their
//! connections and return.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use prost::Message;
use thiserror::Error;

use crate::limits::MAX_MESSAGE_BYTES;
use crate::wire;

mod ca;
pub mod grpc;
mod inproc;
pub mod quic;
mod tls;

#[cfg(test)]
mod tests;

pub use ca::{is_tls_name, CertAuthority, CertUse, DEFAULT_CA_DAYS, DEFAULT_CERT_DAYS};
pub use inproc::InprocLink;
pub use tls::{ClientTls, ServerTls, TlsIdentity};

/// How long a server waits for in-flight calls after its shutdown future resolved.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Which transport a link uses (the cluster file's `transport`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TransportKind {
    Inproc,
    Grpc,
    Quic,
}

impl TransportKind {
    /// Every kind, in the order error messages list them.
    pub const ALL: [TransportKind; 3] = [
        TransportKind::Inproc,
        TransportKind::Grpc,
        TransportKind::Quic,
    ];

    /// The name `FromStr` reads and `Display` writes.
    pub fn as_str(self) -> &'static str {
        match self {
            TransportKind::Inproc => "inproc",
            TransportKind::Grpc => "grpc",
            TransportKind::Quic => "quic",
        }
    }
}

impl fmt::Display for TransportKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A transport name other than `inproc`, `grpc` or `quic`.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
#[error("unknown transport {0:?} (choices: inproc, grpc, quic)")]
pub struct UnknownTransport(pub String);

impl FromStr for TransportKind {
    type Err = UnknownTransport;

    fn from_str(s: &str) -> Result<Self, UnknownTransport> {
        TransportKind::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| UnknownTransport(s.to_string()))
    }
}

/// What an expert node does with the coordinator's messages, whatever the transport.
pub trait NodeService: Send + Sync + 'static {
    /// Answers one coordinator message. May block for a long time (computes experts):
    /// transports call it on a blocking thread (`tokio::task::spawn_blocking`), never on an
    /// async worker.
    fn handle(&self, msg: wire::CoordinatorMessage) -> wire::NodeMessage;
}

/// The future of one [`NodeLink::call`].
pub type CallFuture<'a> =
    Pin<Box<dyn Future<Output = Result<wire::NodeMessage, TransportError>> + Send + 'a>>;

/// The coordinator's end of a link to one node.
pub trait NodeLink: Send + Sync {
    /// Sends one message and waits for its answer. Callers apply deadlines with
    /// `tokio::time::timeout`; dropping the future abandons the call (the link stays usable).
    fn call(&self, msg: wire::CoordinatorMessage) -> CallFuture<'_>;

    /// The peer's address, e.g. `grpc://127.0.0.1:7001`, `quic://127.0.0.1:7001`,
    /// `inproc://node0`, for error messages.
    fn peer(&self) -> &str;

    /// Whether the node lives in this process ([`InprocLink`]): then
    /// [`NodeLink::call_here`] answers on the calling thread.
    fn is_here(&self) -> bool {
        false
    }

    /// Answers `msg` on the calling thread, without a deadline (the service is this
    /// process's), where [`NodeLink::is_here`]; other links refuse
    /// ([`TransportError::Service`]).
    fn call_here(
        &self,
        msg: wire::CoordinatorMessage,
    ) -> Result<wire::NodeMessage, TransportError> {
        let _ = msg;
        Err(TransportError::Service {
            peer: self.peer().to_string(),
            detail: "not a node in this process: use call".to_string(),
        })
    }
}

/// Why a call, a connection or a server failed. Every variant names the peer (or, for a
/// server, its own address; for an identity, its files).
///
/// Transient (the node may be back later or a replica may do): [`Connect`], [`Closed`].
/// Permanent for the message or the configuration: the others. Either way a coordinator
/// marks the node down for the step and re-sends the work to a replica.
///
/// [`Connect`]: TransportError::Connect
/// [`Closed`]: TransportError::Closed
#[derive(Debug, Error)]
pub enum TransportError {
    /// The connection could not be set up (refused, unreachable, timed out).
    #[error("{peer}: cannot connect: {detail}")]
    Connect { peer: String, detail: String },
    /// The TLS handshake failed (certificate not trusted, wrong name, ALPN), or a
    /// certificate or key could not be used.
    #[error("{peer}: TLS: {detail}")]
    Tls { peer: String, detail: String },
    /// The peer dropped the stream or the connection (process gone, shut down, keep-alive
    /// timed out). The link is dead: later calls fail the same way.
    #[error("{peer}: connection closed: {detail}")]
    Closed { peer: String, detail: String },
    /// A message over the size limit: refused before sending, or announced by the peer.
    #[error("{peer}: message of {len} bytes is over the limit of {max}")]
    TooLarge {
        peer: String,
        len: usize,
        max: usize,
    },
    /// The peer broke the transport's protocol (an undecodable or truncated message, a
    /// reset stream, an error status).
    #[error("{peer}: {detail}")]
    Protocol { peer: String, detail: String },
    /// The node's service failed on a message (it panicked).
    #[error("{peer}: node service failed: {detail}")]
    Service { peer: String, detail: String },
    /// A server could not start or run on its socket.
    #[error("serving on {addr}: {detail}")]
    Serve { addr: String, detail: String },
    /// A TLS identity (certificate and key files) could not be read, generated or written;
    /// `what` names the files.
    #[error("TLS identity {what}: {detail}")]
    Identity { what: String, detail: String },
}

impl TransportError {
    /// Whether trying again later (or on a replica) may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            TransportError::Connect { .. } | TransportError::Closed { .. }
        )
    }
}

/// Refuses a message whose encoding is over [`MAX_MESSAGE_BYTES`], before it is sent (or,
/// for inproc, handled: all transports refuse the same messages).
fn check_size(peer: &str, msg: &impl Message) -> Result<usize, TransportError> {
    let len = msg.encoded_len();
    if len > MAX_MESSAGE_BYTES {
        return Err(TransportError::TooLarge {
            peer: peer.to_string(),
            len,
            max: MAX_MESSAGE_BYTES,
        });
    }
    Ok(len)
}

/// Calls `service` on a blocking thread. `Err` carries a description of its panic.
async fn handle_blocking(
    service: &Arc<dyn NodeService>,
    msg: wire::CoordinatorMessage,
) -> Result<wire::NodeMessage, String> {
    let service = Arc::clone(service);
    tokio::task::spawn_blocking(move || service.handle(msg))
        .await
        .map_err(|e| {
            if e.is_panic() {
                SERVICE_PANICKED.to_string()
            } else {
                format!("the service's task was cancelled: {e}")
            }
        })
}

/// Calls `service` on this thread. `Err` carries a description of its panic, as
/// [`handle_blocking`]'s.
fn handle_here(
    service: &Arc<dyn NodeService>,
    msg: wire::CoordinatorMessage,
) -> Result<wire::NodeMessage, String> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| service.handle(msg)))
        .map_err(|_| SERVICE_PANICKED.to_string())
}

/// How a service's panic is reported to the caller.
const SERVICE_PANICKED: &str = "the service panicked";

/// The name of a message's kind, for logs.
fn coordinator_message_kind(msg: &wire::CoordinatorMessage) -> &'static str {
    use wire::coordinator_message::Body;
    match &msg.body {
        Some(Body::Hello(_)) => "hello",
        Some(Body::Dispatch(_)) => "dispatch",
        Some(Body::Health(_)) => "health",
        Some(Body::Stats(_)) => "stats",
        None => "empty",
    }
}

/// A shutdown signal shared by a server's tasks: set once, seen by every clone.
#[derive(Clone)]
struct Stop(tokio::sync::watch::Receiver<bool>);

impl Stop {
    fn new() -> (tokio::sync::watch::Sender<bool>, Stop) {
        let (tx, rx) = tokio::sync::watch::channel(false);
        (tx, Stop(rx))
    }

    /// Resolves once the server is stopping (or gone).
    async fn stopped(&mut self) {
        let _ = self.0.wait_for(|stop| *stop).await;
    }

    /// Resolves [`SHUTDOWN_GRACE`] after the server started stopping: in-flight work is
    /// abandoned then.
    async fn grace_over(&mut self) {
        self.stopped().await;
        tokio::time::sleep(SHUTDOWN_GRACE).await;
    }
}
