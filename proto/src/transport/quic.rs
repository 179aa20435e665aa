//! The QUIC transport (quinn, TLS 1.3 always): one connection per link, one bidirectional
//! stream per call.
//!
//! A call opens a stream, writes the message as one [`framing`] frame (a u32 little-endian
//! length, then the protobuf bytes; at most [`MAX_MESSAGE_BYTES`]), finishes its side and
//! reads one frame back. Calls on one link run concurrently, each on its stream; the node
//! handles each stream in a task of its own. ALPN is `moeshard/1`.
//!
//! TLS (see `tls.rs`): by default the client trusts exactly the certificate it is given and
//! the node accepts any client; with a cluster CA ([`serve_tls`] with a mutual
//! [`ServerTls`], [`connect_tls`] with a mutual [`ClientTls`]) each side accepts only a peer
//! whose certificate the CA signed. The node logs every refused handshake. Once it has
//! accepted a connection the node opens a unidirectional stream carrying [`READY`]: the
//! client's [`connect_tls`] waits for it, so that a node refusing the client's certificate
//! (which, in TLS 1.3, it learns after the client considers the handshake done) is a
//! [`TransportError::Tls`] from `connect`, not from the first call.
//!
//! Dead peers: both sides send a keep-alive every [`KEEP_ALIVE_INTERVAL`] and drop a
//! connection that hears nothing for [`IDLE_TIMEOUT`]. A node that shuts down closes its
//! connections (the coordinator's calls fail at once with [`TransportError::Closed`]); a
//! killed one sends nothing, so its links fail when the idle timeout expires (the
//! coordinator's per-dispatch deadline usually comes first). A link does not reconnect.
//!
//! [`framing`]: crate::framing

use std::future::Future;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use prost::Message;
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{
    ConnectionError, Endpoint, EndpointConfig, ReadExactError, RecvStream, SendStream,
    TokioRuntime, TransportConfig, VarInt, WriteError,
};
use tokio::sync::mpsc;
use tracing::{debug, error, info, info_span, warn, Instrument};

use super::tls::{client_config, common_name, server_config, ALPN};
use super::{
    check_size, coordinator_message_kind, handle_blocking, CallFuture, ClientTls, NodeLink,
    NodeService, ServerTls, Stop, TlsIdentity, TransportError, SHUTDOWN_GRACE,
};
use crate::framing::{self, FrameError, HEADER_BYTES};
use crate::limits::MAX_MESSAGE_BYTES;
use crate::wire;

/// How often each side sends a keep-alive on an otherwise quiet connection.
pub const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(1);
/// How long a connection may hear nothing from its peer before it is declared dead.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest [`connect`] waits for the handshake and the node's [`READY`].
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// What the node sends on the unidirectional stream it opens once it accepted a connection.
pub const READY: &[u8] = b"moeshard ready";

/// Flow-control windows: a whole large dispatch or result (tens of MiB) in flight without
/// waiting for the reader's window updates.
const STREAM_RECEIVE_WINDOW: u32 = 64 << 20;
const SEND_WINDOW: u64 = 64 << 20;

/// Application error codes for closing connections and resetting streams.
const CODE_OK: u32 = 0;
const CODE_TOO_LARGE: u32 = 1;
const CODE_SERVICE_FAILED: u32 = 2;
const CODE_SHUTDOWN: u32 = 3;
const CODE_BAD_FRAME: u32 = 4;

fn transport_config() -> TransportConfig {
    let mut config = TransportConfig::default();
    config
        .keep_alive_interval(Some(KEEP_ALIVE_INTERVAL))
        .max_idle_timeout(Some(quinn::IdleTimeout::from(VarInt::from_u32(
            IDLE_TIMEOUT.as_millis() as u32,
        ))))
        .stream_receive_window(VarInt::from_u32(STREAM_RECEIVE_WINDOW))
        .send_window(SEND_WINDOW);
    config
}

/// Whether a QUIC error code is a TLS alert (0x100..=0x1ff).
fn is_crypto(code: quinn::TransportErrorCode) -> bool {
    (0x100..0x200).contains(&u64::from(code))
}

/// What a connection-level error means for a call.
fn connection_error(peer: &str, e: &ConnectionError) -> TransportError {
    let peer = peer.to_string();
    match e {
        // This side refused the handshake (normally: the node's certificate).
        ConnectionError::TransportError(t) if is_crypto(t.code) => TransportError::Tls {
            peer,
            detail: format!("refused the node's certificate: {e}"),
        },
        // The node refused it (normally: this side's certificate, missing or not signed
        // by the node's CA).
        ConnectionError::ConnectionClosed(c) if is_crypto(c.error_code) => TransportError::Tls {
            peer,
            detail: format!(
                "the node refused the TLS handshake (is this side's certificate signed by \
                 the node's CA?): {e}"
            ),
        },
        ConnectionError::ApplicationClosed(c)
            if c.error_code == VarInt::from_u32(CODE_SHUTDOWN) =>
        {
            TransportError::Closed {
                peer,
                detail: "the node shut down".into(),
            }
        }
        ConnectionError::TimedOut => TransportError::Closed {
            peer,
            detail: format!("no answer from the node for {IDLE_TIMEOUT:?}"),
        },
        ConnectionError::ApplicationClosed(_)
        | ConnectionError::ConnectionClosed(_)
        | ConnectionError::Reset
        | ConnectionError::LocallyClosed => TransportError::Closed {
            peer,
            detail: e.to_string(),
        },
        ConnectionError::VersionMismatch
        | ConnectionError::TransportError(_)
        | ConnectionError::CidsExhausted => TransportError::Protocol {
            peer,
            detail: e.to_string(),
        },
    }
}

/// Why a frame could not be read from a stream.
enum ReadFail {
    /// The stream ended before a whole frame (`got` bytes of the part read).
    Truncated {
        part: &'static str,
        got: usize,
    },
    Reset(VarInt),
    Connection(ConnectionError),
    Other(String),
    Frame(FrameError),
}

impl ReadFail {
    fn from_read(part: &'static str, e: ReadExactError) -> ReadFail {
        match e {
            ReadExactError::FinishedEarly(got) => ReadFail::Truncated { part, got },
            ReadExactError::ReadError(quinn::ReadError::Reset(code)) => ReadFail::Reset(code),
            ReadExactError::ReadError(quinn::ReadError::ConnectionLost(e)) => {
                ReadFail::Connection(e)
            }
            ReadExactError::ReadError(e) => ReadFail::Other(e.to_string()),
        }
    }

    /// The error a call reports for its reply.
    fn into_call_error(self, peer: &str) -> TransportError {
        let protocol = |detail: String| TransportError::Protocol {
            peer: peer.to_string(),
            detail,
        };
        match self {
            ReadFail::Truncated {
                part: "header",
                got: 0,
            } => TransportError::Closed {
                peer: peer.to_string(),
                detail: "the node closed the stream without an answer".into(),
            },
            ReadFail::Truncated { part, got } => {
                protocol(format!("the answer ended inside its {part} ({got} bytes)"))
            }
            ReadFail::Reset(code) if code == VarInt::from_u32(CODE_TOO_LARGE) => protocol(
                "the node refused the message or its answer: over the message size limit".into(),
            ),
            ReadFail::Reset(code) if code == VarInt::from_u32(CODE_SERVICE_FAILED) => {
                TransportError::Service {
                    peer: peer.to_string(),
                    detail: "the node's service failed on the message".into(),
                }
            }
            ReadFail::Reset(code) if code == VarInt::from_u32(CODE_SHUTDOWN) => {
                TransportError::Closed {
                    peer: peer.to_string(),
                    detail: "the node shut down during the call".into(),
                }
            }
            ReadFail::Reset(code) if code == VarInt::from_u32(CODE_BAD_FRAME) => {
                protocol("the node could not read the message".into())
            }
            ReadFail::Reset(code) => protocol(format!("the node reset the stream (code {code})")),
            ReadFail::Connection(e) => connection_error(peer, &e),
            ReadFail::Other(detail) => protocol(format!("reading the answer: {detail}")),
            ReadFail::Frame(FrameError::Oversized { len, max }) => TransportError::TooLarge {
                peer: peer.to_string(),
                len,
                max,
            },
            ReadFail::Frame(e) => protocol(format!("the answer: {e}")),
        }
    }
}

/// Reads one frame from `recv`: the header, the length checked against the limit before the
/// body is allocated, then the body.
async fn read_message<M: Message + Default>(recv: &mut RecvStream) -> Result<M, ReadFail> {
    let mut header = [0u8; HEADER_BYTES];
    recv.read_exact(&mut header)
        .await
        .map_err(|e| ReadFail::from_read("header", e))?;
    let len = framing::frame_len(header, MAX_MESSAGE_BYTES).map_err(ReadFail::Frame)?;
    let mut body = vec![0u8; len];
    recv.read_exact(&mut body)
        .await
        .map_err(|e| ReadFail::from_read("body", e))?;
    M::decode(body.as_slice()).map_err(|e| ReadFail::Frame(FrameError::Decode(e)))
}

/// `msg` as one frame; over the limit is `Err((len, max))`.
fn encode(msg: &impl Message) -> Result<Vec<u8>, (usize, usize)> {
    let mut buf = Vec::new();
    match framing::encode_frame(msg, MAX_MESSAGE_BYTES, &mut buf) {
        Ok(()) => Ok(buf),
        Err(FrameError::Oversized { len, max }) => Err((len, max)),
        // Encoding into a Vec reserved for the message cannot fail otherwise.
        Err(_) => Err((msg.encoded_len(), MAX_MESSAGE_BYTES)),
    }
}

/// The coordinator's end of a QUIC connection to one node.
pub struct QuicLink {
    peer: String,
    connection: quinn::Connection,
    // Kept for as long as the link: the UDP socket and its driver belong to it.
    _endpoint: Endpoint,
}

/// Connects to the node at `addr`, which must present a certificate for `server_name`
/// signed by (normally: equal to) `trusted_cert_pem`, the only certificate trusted; no
/// client certificate is presented.
pub async fn connect(
    addr: SocketAddr,
    server_name: &str,
    trusted_cert_pem: &str,
) -> Result<QuicLink, TransportError> {
    connect_tls(addr, server_name, &ClientTls::trusting(trusted_cert_pem)).await
}

/// Connects to the node at `addr`, which must present a certificate for `server_name`
/// that `tls` trusts; presents `tls`'s certificate if it has one. Returns once the node
/// has accepted the connection (its [`READY`] arrived): a refusal on either side is
/// [`TransportError::Tls`].
pub async fn connect_tls(
    addr: SocketAddr,
    server_name: &str,
    tls: &ClientTls,
) -> Result<QuicLink, TransportError> {
    let peer = format!("quic://{addr}");
    let tls_err = |detail: String| TransportError::Tls {
        peer: peer.clone(),
        detail,
    };
    let connect_err = |detail: String| TransportError::Connect {
        peer: peer.clone(),
        detail,
    };
    let crypto = client_config(tls, ALPN).map_err(tls_err)?;
    let crypto = QuicClientConfig::try_from(crypto).map_err(|e| tls_err(e.to_string()))?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    config.transport_config(Arc::new(transport_config()));
    let local: SocketAddr = if addr.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let endpoint = Endpoint::client(local)
        .map_err(|e| connect_err(format!("binding a UDP socket on {local}: {e}")))?;
    let connecting = endpoint
        .connect_with(config, addr, server_name)
        .map_err(|e| connect_err(e.to_string()))?;
    let accepted = async {
        let connection = connecting.await?;
        // The node's word that it accepted this side (and its certificate).
        let mut ready = connection.accept_uni().await?;
        match ready.read_to_end(READY.len()).await {
            Ok(bytes) if bytes == READY => Ok(Ok(connection)),
            Ok(bytes) => Ok(Err(format!(
                "the node's first stream said {:?}, not {:?}",
                String::from_utf8_lossy(&bytes),
                String::from_utf8_lossy(READY)
            ))),
            Err(quinn::ReadToEndError::Read(quinn::ReadError::ConnectionLost(e))) => Err(e),
            Err(e) => Ok(Err(format!("reading the node's first stream: {e}"))),
        }
    };
    let connection = match tokio::time::timeout(CONNECT_TIMEOUT, accepted).await {
        Err(_) => {
            return Err(connect_err(format!(
                "no handshake within {CONNECT_TIMEOUT:?}"
            )))
        }
        Ok(Err(e)) => {
            return Err(match connection_error(&peer, &e) {
                tls @ TransportError::Tls { .. } => tls,
                other => connect_err(other.to_string()),
            })
        }
        Ok(Ok(Err(detail))) => {
            return Err(TransportError::Protocol {
                peer: peer.clone(),
                detail,
            })
        }
        Ok(Ok(Ok(connection))) => connection,
    };
    info!(%peer, mutual = tls.is_mutual(), "quic link connected");
    Ok(QuicLink {
        peer,
        connection,
        _endpoint: endpoint,
    })
}

impl QuicLink {
    async fn call_inner(
        &self,
        msg: wire::CoordinatorMessage,
    ) -> Result<wire::NodeMessage, TransportError> {
        let peer = self.peer.as_str();
        check_size(peer, &msg)?;
        let kind = coordinator_message_kind(&msg);
        let frame = encode(&msg).map_err(|(len, max)| TransportError::TooLarge {
            peer: peer.to_string(),
            len,
            max,
        })?;
        drop(msg);
        let (mut send, mut recv) = self
            .connection
            .open_bi()
            .await
            .map_err(|e| connection_error(peer, &e))?;
        debug!(peer, kind, bytes = frame.len(), stream = %send.id(), "call");
        send.write_all(&frame).await.map_err(|e| match e {
            WriteError::ConnectionLost(e) => connection_error(peer, &e),
            WriteError::Stopped(code) if code == VarInt::from_u32(CODE_TOO_LARGE) => {
                TransportError::Protocol {
                    peer: peer.to_string(),
                    detail: "the node refused the message: over the message size limit".into(),
                }
            }
            e => TransportError::Protocol {
                peer: peer.to_string(),
                detail: format!("sending: {e}"),
            },
        })?;
        drop(frame);
        // Only fails if the stream was already finished or reset, which it was not.
        let _ = send.finish();
        read_message(&mut recv)
            .await
            .map_err(|e| e.into_call_error(peer))
    }
}

#[cfg(test)]
impl QuicLink {
    /// Sends `bytes` as they are on a new stream and reads the answer: for tests of what
    /// the node does with frames a well-behaved link never sends.
    pub(super) async fn call_raw(&self, bytes: &[u8]) -> Result<wire::NodeMessage, TransportError> {
        let peer = self.peer.as_str();
        let (mut send, mut recv) = self
            .connection
            .open_bi()
            .await
            .map_err(|e| connection_error(peer, &e))?;
        // The node may refuse the frame before reading all of it.
        let _ = send.write_all(bytes).await;
        let _ = send.finish();
        read_message(&mut recv)
            .await
            .map_err(|e| e.into_call_error(peer))
    }
}

impl NodeLink for QuicLink {
    fn call(&self, msg: wire::CoordinatorMessage) -> CallFuture<'_> {
        Box::pin(self.call_inner(msg))
    }

    fn peer(&self) -> &str {
        &self.peer
    }
}

impl Drop for QuicLink {
    fn drop(&mut self) {
        // The endpoint's driver sends the close in the background.
        self.connection
            .close(VarInt::from_u32(CODE_OK), b"link dropped");
    }
}

/// Serves `service` on `socket` with `identity`, accepting any client, until `shutdown`
/// resolves (see [`serve_tls`]).
pub async fn serve(
    socket: std::net::UdpSocket,
    identity: TlsIdentity,
    service: Arc<dyn NodeService>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), TransportError> {
    serve_tls(socket, ServerTls::server_only(identity), service, shutdown).await
}

/// Serves `service` on `socket` with `tls` (with a client CA: only to clients presenting a
/// certificate it signed; each refused handshake is logged) until `shutdown` resolves; then
/// refuses new connections, lets in-flight calls finish (at most [`SHUTDOWN_GRACE`]), closes
/// every connection and returns.
pub async fn serve_tls(
    socket: std::net::UdpSocket,
    tls: ServerTls,
    service: Arc<dyn NodeService>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), TransportError> {
    let addr = socket.local_addr().map_or_else(
        |_| "quic://(unknown address)".to_string(),
        |a| format!("quic://{a}"),
    );
    let serve_err = |detail: String| TransportError::Serve {
        addr: addr.clone(),
        detail,
    };
    let crypto = server_config(&tls, ALPN).map_err(|detail| TransportError::Tls {
        peer: addr.clone(),
        detail,
    })?;
    let crypto = QuicServerConfig::try_from(crypto).map_err(|e| TransportError::Tls {
        peer: addr.clone(),
        detail: e.to_string(),
    })?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    config.transport_config(Arc::new(transport_config()));
    socket
        .set_nonblocking(true)
        .map_err(|e| serve_err(format!("socket: {e}")))?;
    let endpoint = Endpoint::new(
        EndpointConfig::default(),
        Some(config),
        socket,
        Arc::new(TokioRuntime),
    )
    .map_err(|e| serve_err(format!("starting the endpoint: {e}")))?;

    let (stop_tx, stop) = Stop::new();
    // Every connection and stream task holds a clone; `recv` returns None once all ended.
    let (alive, mut all_done) = mpsc::channel::<()>(1);
    let mut shutdown = std::pin::pin!(shutdown);
    info!(%addr, mutual_tls = tls.is_mutual(), "quic node serving");
    loop {
        let incoming = tokio::select! {
            () = &mut shutdown => break,
            incoming = endpoint.accept() => incoming,
        };
        let Some(incoming) = incoming else {
            break;
        };
        let remote = incoming.remote_address();
        tokio::spawn(
            serve_connection(incoming, Arc::clone(&service), stop.clone(), alive.clone())
                .instrument(info_span!("quic_connection", node = %addr, %remote)),
        );
    }
    info!(%addr, "quic node shutting down");
    endpoint.set_server_config(None);
    let _ = stop_tx.send(true);
    drop(alive);
    if tokio::time::timeout(SHUTDOWN_GRACE, all_done.recv())
        .await
        .is_err()
    {
        warn!(%addr, "in-flight calls abandoned after the shutdown grace period");
    }
    endpoint.close(VarInt::from_u32(CODE_SHUTDOWN), b"node shutting down");
    if tokio::time::timeout(Duration::from_secs(1), endpoint.wait_idle())
        .await
        .is_err()
    {
        debug!(%addr, "connections still draining");
    }
    info!(%addr, "quic node stopped");
    Ok(())
}

async fn serve_connection(
    incoming: quinn::Incoming,
    service: Arc<dyn NodeService>,
    mut stop: Stop,
    alive: mpsc::Sender<()>,
) {
    let remote = incoming.remote_address();
    let connection = match incoming.await {
        Ok(connection) => connection,
        Err(e) => {
            // The remote address again: the span's fields are not shown when only warnings are.
            warn!(%remote, error = %e, "refused a client: quic/TLS handshake failed");
            return;
        }
    };
    let client = connection
        .peer_identity()
        .and_then(|id| {
            id.downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
                .ok()
        })
        .and_then(|certs| certs.first().and_then(common_name));
    match &client {
        Some(name) => info!(client = %name, "quic connection open (client certificate)"),
        None => info!("quic connection open"),
    }
    // Tell the client it is accepted (see the module documentation).
    match connection.open_uni().await {
        Ok(mut ready) => {
            let _ = ready.write_all(READY).await;
            let _ = ready.finish();
        }
        Err(e) => {
            info!(reason = %e, "quic connection closed");
            return;
        }
    }
    loop {
        let stream = tokio::select! {
            biased;
            () = stop.stopped() => break,
            stream = connection.accept_bi() => stream,
        };
        match stream {
            Ok((send, recv)) => {
                let id = send.id();
                tokio::spawn(
                    serve_stream(
                        send,
                        recv,
                        Arc::clone(&service),
                        stop.clone(),
                        alive.clone(),
                    )
                    .instrument(info_span!("stream", %id)),
                );
            }
            Err(e) => {
                info!(reason = %e, "quic connection closed");
                return;
            }
        }
    }
    // Stopping: keep the connection open (dropping the last handle would close it with
    // code 0) until `serve` closes the endpoint with CODE_SHUTDOWN once the streams in
    // flight are answered, so the coordinator learns why. `alive` is not held meanwhile.
    drop(alive);
    let _ =
        tokio::time::timeout(SHUTDOWN_GRACE + Duration::from_secs(2), connection.closed()).await;
}

/// Answers the one message of a stream.
async fn serve_stream(
    mut send: SendStream,
    mut recv: RecvStream,
    service: Arc<dyn NodeService>,
    mut stop: Stop,
    _alive: mpsc::Sender<()>,
) {
    let reset = |send: &mut SendStream, code: u32| {
        let _ = send.reset(VarInt::from_u32(code));
    };
    let msg: wire::CoordinatorMessage = match read_message(&mut recv).await {
        Ok(msg) => msg,
        Err(ReadFail::Frame(FrameError::Oversized { len, max })) => {
            info!(len, max, "message over the limit refused");
            let _ = recv.stop(VarInt::from_u32(CODE_TOO_LARGE));
            reset(&mut send, CODE_TOO_LARGE);
            return;
        }
        Err(e) => {
            let e = e.into_call_error("the coordinator");
            info!(error = %e, "unreadable message");
            reset(&mut send, CODE_BAD_FRAME);
            return;
        }
    };
    debug!(kind = coordinator_message_kind(&msg), "message");
    let reply = tokio::select! {
        reply = handle_blocking(&service, msg) => reply,
        () = stop.grace_over() => {
            warn!("in-flight message abandoned at shutdown");
            reset(&mut send, CODE_SHUTDOWN);
            return;
        }
    };
    let reply = match reply {
        Ok(reply) => reply,
        Err(detail) => {
            error!(%detail, "node service failed");
            reset(&mut send, CODE_SERVICE_FAILED);
            return;
        }
    };
    let frame = match encode(&reply) {
        Ok(frame) => frame,
        Err((len, max)) => {
            error!(len, max, "reply over the message limit not sent");
            reset(&mut send, CODE_TOO_LARGE);
            return;
        }
    };
    drop(reply);
    let sent = async {
        send.write_all(&frame).await?;
        let _ = send.finish();
        // Wait until the coordinator has the whole answer, so that a shutdown closing the
        // connection right after this task ends does not cut it off.
        let _ = send.stopped().await;
        Ok::<(), WriteError>(())
    };
    let result = tokio::select! {
        result = sent => result,
        () = stop.grace_over() => {
            warn!("answer abandoned at shutdown");
            return;
        }
    };
    if let Err(e) = result {
        debug!(error = %e, "answer not delivered");
    }
}
