//! The gRPC transport (tonic): one long-lived bidirectional `Session` stream per link.
//!
//! [`connect`] opens the HTTP/2 connection and the session stream once; every call of the
//! [`GrpcLink`] sends one message on it and reads the next answer. The node answers a
//! session's messages in order, so calls on one link are serialized (one at a time); a
//! call abandoned after its message was sent (its future dropped, e.g. by a timeout) leaves
//! its answer due, and the next call reads and drops it before its own.
//!
//! Both sides cap messages at [`MAX_MESSAGE_BYTES`] (tonic's encoding and decoding limits),
//! set TCP_NODELAY and send HTTP/2 keep-alive pings every [`KEEP_ALIVE_INTERVAL`]: a peer
//! that does not answer one within [`KEEP_ALIVE_TIMEOUT`] is dead and the connection is
//! dropped. A killed peer is noticed at once on loopback (the kernel resets the TCP
//! connection); a silent one (cable pulled) within interval + timeout. Either way an
//! outstanding or later call returns [`TransportError::Closed`]. A link does not reconnect:
//! the coordinator connects a new one when the node is back.
//!
//! TLS: [`serve`] and [`connect`] are plain text, meant for loopback (both sides warn
//! otherwise). [`serve_tls`] and [`connect_tls`] run every connection over TLS 1.3 (rustls,
//! ALPN `h2`), mutual with a cluster CA: the node then accepts only clients presenting a
//! certificate the CA signed, and logs each refused handshake with the client's address;
//! the coordinator accepts only a node whose certificate the CA signed. The handshakes are
//! done here rather than by tonic so that refusals are logged and reported: after its
//! handshake the client waits for the node's first bytes (its HTTP/2 SETTINGS), so that a
//! node refusing the client's certificate (which, in TLS 1.3, it learns after the client
//! considers the handshake done) is a [`TransportError::Tls`] from `connect_tls`.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use prost::Message;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, Mutex};
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Endpoint, Server};
use tonic::{Code, Request, Response, Status, Streaming};
use tracing::{debug, error, info, info_span, warn, Instrument};

use super::tls::{client_config, common_name, server_config, ALPN_H2};
use super::{
    check_size, coordinator_message_kind, handle_blocking, CallFuture, ClientTls, NodeLink,
    NodeService, ServerTls, Stop, TransportError, SHUTDOWN_GRACE,
};
use crate::limits::MAX_MESSAGE_BYTES;
use crate::wire;
use crate::wire::expert_node_client::ExpertNodeClient;
use crate::wire::expert_node_server::{ExpertNode, ExpertNodeServer};

/// How often each side pings an HTTP/2 connection.
pub const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(1);
/// How long a ping may go unanswered before the connection is declared dead.
pub const KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(5);
/// The longest [`connect`] waits for the TCP connection and the session to open.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// The longest a node waits for a client's TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// HTTP/2 flow-control windows: large enough that a 56 MiB result streams without waiting
/// for window updates at every 64 KiB (the HTTP/2 default).
const STREAM_WINDOW: u32 = 16 << 20;
const CONNECTION_WINDOW: u32 = 32 << 20;

/// `e` and its sources, joined by ": " (tonic's own Display says little more than
/// "transport error").
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let s_text = s.to_string();
        if !text.contains(&s_text) {
            text.push_str(": ");
            text.push_str(&s_text);
        }
        source = s.source();
    }
    text
}

fn status_text(status: &Status) -> String {
    if status.message().is_empty() {
        format!("{:?}", status.code())
    } else {
        format!("{:?}: {}", status.code(), status.message())
    }
}

/// The coordinator's end of a gRPC session with one node.
pub struct GrpcLink {
    peer: String,
    session: Mutex<Session>,
}

struct Session {
    requests: mpsc::Sender<wire::CoordinatorMessage>,
    replies: Streaming<wire::NodeMessage>,
    /// Answers due and not yet read: the current call's, and those of calls abandoned
    /// after their message was sent. Read (and the abandoned ones dropped) in order.
    pending: usize,
    /// Why the session ended, once it has: every later call fails with it.
    closed: Option<String>,
}

impl Session {
    /// Marks the session ended and returns the error for the call that saw it.
    fn close(&mut self, peer: &str, detail: String, err: TransportError) -> TransportError {
        info!(peer, %detail, "grpc session ended");
        self.closed = Some(detail);
        err
    }

    /// Reads the next answer on the session.
    async fn next_reply(&mut self, peer: &str) -> Result<wire::NodeMessage, TransportError> {
        let closed = |detail: &str| TransportError::Closed {
            peer: peer.to_string(),
            detail: detail.to_string(),
        };
        match self.replies.message().await {
            Ok(Some(reply)) => Ok(reply),
            Ok(None) => {
                let detail = "the node ended the session".to_string();
                let err = closed(&detail);
                Err(self.close(peer, detail, err))
            }
            Err(status) => {
                let detail = status_text(&status);
                let err = match status.code() {
                    Code::OutOfRange | Code::ResourceExhausted => TransportError::Protocol {
                        peer: peer.to_string(),
                        detail: format!("session failed: {detail}"),
                    },
                    Code::Internal if status.message().starts_with("node service failed") => {
                        TransportError::Service {
                            peer: peer.to_string(),
                            detail: detail.clone(),
                        }
                    }
                    _ => closed(&detail),
                };
                Err(self.close(peer, detail, err))
            }
        }
    }
}

/// Connects to the node at `addr` in plain text and opens the link's session stream.
pub async fn connect(addr: SocketAddr) -> Result<GrpcLink, TransportError> {
    let peer = format!("grpc://{addr}");
    if !addr.ip().is_loopback() {
        warn!(%peer, "gRPC links are plain text (no TLS): use TLS (a cluster CA) between hosts");
    }
    let endpoint = endpoint(&peer, addr)?;
    let channel = endpoint
        .connect()
        .await
        .map_err(|e| TransportError::Connect {
            peer: peer.clone(),
            detail: error_chain(&e),
        })?;
    open_session(peer, channel).await
}

/// Connects to the node at `addr` over TLS — the node must present a certificate for
/// `server_name` that `tls` trusts; `tls`'s certificate is presented if it has one — and
/// opens the link's session stream. A refused handshake, on either side, is
/// [`TransportError::Tls`].
pub async fn connect_tls(
    addr: SocketAddr,
    server_name: &str,
    tls: &ClientTls,
) -> Result<GrpcLink, TransportError> {
    let peer = format!("grpc://{addr}");
    let tls_err = |detail: String| TransportError::Tls {
        peer: peer.clone(),
        detail,
    };
    let config = client_config(tls, ALPN_H2).map_err(tls_err)?;
    let name = ServerName::try_from(server_name.to_string())
        .map_err(|e| tls_err(format!("server name {server_name:?}: {e}")))?;
    let connector = TlsConnector::from(Arc::new(config));
    let connect = tower::service_fn(move |_: tonic::transport::Uri| {
        tls_connect(addr, connector.clone(), name.clone())
    });
    let channel = endpoint(&peer, addr)?
        .connect_with_connector(connect)
        .await
        .map_err(|e| match find_tls_failure(&e) {
            Some(detail) => tls_err(detail),
            None => TransportError::Connect {
                peer: peer.clone(),
                detail: error_chain(&e),
            },
        })?;
    let link = open_session(peer, channel).await?;
    info!(peer = %link.peer, mutual = tls.is_mutual(), "grpc link over TLS");
    Ok(link)
}

fn endpoint(peer: &str, addr: SocketAddr) -> Result<Endpoint, TransportError> {
    Ok(Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| TransportError::Connect {
            peer: peer.to_string(),
            detail: error_chain(&e),
        })?
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(KEEP_ALIVE_INTERVAL)
        .keep_alive_timeout(KEEP_ALIVE_TIMEOUT)
        .keep_alive_while_idle(true)
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW))
}

/// A TLS handshake that failed, or a node that refused this side after it: carried through
/// tonic's connection errors so that [`connect_tls`] reports it as [`TransportError::Tls`].
#[derive(Debug)]
struct TlsFailure(String);

impl std::fmt::Display for TlsFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for TlsFailure {}

fn find_tls_failure(e: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut current = Some(e);
    while let Some(e) = current {
        if let Some(TlsFailure(detail)) = e.downcast_ref::<TlsFailure>() {
            return Some(detail.clone());
        }
        if let Some(TlsFailure(detail)) = e
            .downcast_ref::<io::Error>()
            .and_then(|io| io.get_ref())
            .and_then(|inner| inner.downcast_ref::<TlsFailure>())
        {
            return Some(detail.clone());
        }
        current = e.source();
    }
    None
}

/// The connection of a [`connect_tls`] link: TCP, the TLS handshake, then the node's
/// first bytes (kept for HTTP/2 to read) as its word that it accepted this side.
async fn tls_connect(
    addr: SocketAddr,
    connector: TlsConnector,
    name: ServerName<'static>,
) -> io::Result<TokioIo<Primed<tokio_rustls::client::TlsStream<TcpStream>>>> {
    let tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let mut tls = connector.connect(name, tcp).await.map_err(|e| {
        io::Error::other(TlsFailure(format!("refused the node's certificate: {e}")))
    })?;
    let mut first = vec![0u8; 256];
    let n = match tokio::time::timeout(CONNECT_TIMEOUT, tls.read(&mut first)).await {
        Err(_) => {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("the node sent nothing within {CONNECT_TIMEOUT:?} of the TLS handshake"),
            ))
        }
        Ok(Ok(0)) => {
            return Err(io::Error::other(TlsFailure(
                "the node closed the connection after the TLS handshake (is this side's \
                 certificate signed by the node's CA?)"
                    .into(),
            )))
        }
        Ok(Ok(n)) => n,
        // A TLS alert (InvalidData), or the connection dropped without one.
        Ok(Err(e))
            if matches!(
                e.kind(),
                io::ErrorKind::InvalidData
                    | io::ErrorKind::UnexpectedEof
                    | io::ErrorKind::ConnectionReset
            ) =>
        {
            return Err(io::Error::other(TlsFailure(format!(
                "the node refused the TLS handshake (is this side's certificate signed by the \
                 node's CA?): {e}"
            ))))
        }
        Ok(Err(e)) => return Err(e),
    };
    first.truncate(n);
    Ok(TokioIo::new(Primed {
        first,
        pos: 0,
        inner: tls,
    }))
}

/// A stream whose first bytes were already read: they are read again first.
struct Primed<S> {
    first: Vec<u8>,
    pos: usize,
    inner: S,
}

impl<S: AsyncRead + Unpin> AsyncRead for Primed<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.pos < this.first.len() {
            let n = buf.remaining().min(this.first.len() - this.pos);
            buf.put_slice(&this.first[this.pos..this.pos + n]);
            this.pos += n;
            if this.pos == this.first.len() {
                this.first = Vec::new();
                this.pos = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Primed<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Opens the session stream on `channel`.
async fn open_session(
    peer: String,
    channel: tonic::transport::Channel,
) -> Result<GrpcLink, TransportError> {
    let connect_err = |detail: String| TransportError::Connect {
        peer: peer.clone(),
        detail,
    };
    let mut client = ExpertNodeClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let (requests, requests_rx) = mpsc::channel(4);
    let response = tokio::time::timeout(
        CONNECT_TIMEOUT,
        client.session(ReceiverStream::new(requests_rx)),
    )
    .await
    .map_err(|_| {
        connect_err(format!(
            "the node did not open the session within {CONNECT_TIMEOUT:?}"
        ))
    })?
    .map_err(|status| connect_err(format!("opening the session: {}", status_text(&status))))?;
    info!(%peer, "grpc link connected");
    Ok(GrpcLink {
        peer,
        session: Mutex::new(Session {
            requests,
            replies: response.into_inner(),
            pending: 0,
            closed: None,
        }),
    })
}

impl NodeLink for GrpcLink {
    fn call(&self, msg: wire::CoordinatorMessage) -> CallFuture<'_> {
        Box::pin(async move {
            let peer = self.peer.as_str();
            let len = check_size(peer, &msg)?;
            let kind = coordinator_message_kind(&msg);
            let mut session = self.session.lock().await;
            if let Some(detail) = &session.closed {
                return Err(TransportError::Closed {
                    peer: peer.to_string(),
                    detail: detail.clone(),
                });
            }
            // Answers of abandoned calls come first: the node answers in order.
            while session.pending > 0 {
                session.next_reply(peer).await?;
                session.pending -= 1;
                debug!(peer, "dropped the answer of an abandoned call");
            }
            debug!(peer, kind, bytes = len, "call");
            if session.requests.send(msg).await.is_err() {
                // The session is over; its reply stream normally holds the reason (the
                // node's final status).
                let why = tokio::time::timeout(Duration::from_secs(1), async {
                    loop {
                        match session.next_reply(peer).await {
                            Ok(_) => continue,
                            Err(e) => return e,
                        }
                    }
                })
                .await;
                return Err(why.unwrap_or_else(|_| {
                    let detail = "the session's request stream is gone".to_string();
                    let err = TransportError::Closed {
                        peer: peer.to_string(),
                        detail: detail.clone(),
                    };
                    session.close(peer, detail, err)
                }));
            }
            session.pending = 1;
            let reply = session.next_reply(peer).await?;
            session.pending = 0;
            Ok(reply)
        })
    }

    fn peer(&self) -> &str {
        &self.peer
    }
}

/// The tonic service: each session runs in a task of its own.
struct GrpcNode {
    service: Arc<dyn NodeService>,
    stop: Stop,
}

#[tonic::async_trait]
impl ExpertNode for GrpcNode {
    type SessionStream = ReceiverStream<Result<wire::NodeMessage, Status>>;

    async fn session(
        &self,
        request: Request<Streaming<wire::CoordinatorMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        let remote = request
            .remote_addr()
            .map_or_else(|| "unknown".to_string(), |a| a.to_string());
        let (replies, replies_rx) = mpsc::channel(1);
        tokio::spawn(
            run_session(
                Arc::clone(&self.service),
                request.into_inner(),
                replies,
                self.stop.clone(),
            )
            .instrument(info_span!("grpc_session", %remote)),
        );
        Ok(Response::new(ReceiverStream::new(replies_rx)))
    }
}

/// Answers one session's messages in order until the coordinator ends it, the stream
/// fails or the server stops (then a final `UNAVAILABLE` status tells the coordinator why).
async fn run_session(
    service: Arc<dyn NodeService>,
    mut requests: Streaming<wire::CoordinatorMessage>,
    replies: mpsc::Sender<Result<wire::NodeMessage, Status>>,
    mut stop: Stop,
) {
    info!("grpc session opened");
    let last: Option<Status> = loop {
        let msg = tokio::select! {
            biased;
            () = stop.stopped() => break Some(Status::unavailable("the node is shutting down")),
            msg = requests.message() => msg,
        };
        let msg = match msg {
            Ok(Some(msg)) => msg,
            Ok(None) => {
                info!("the coordinator ended the session");
                break None;
            }
            Err(status) => {
                // A message over the limit, or the stream broke: tell the peer if it listens.
                info!(status = %status_text(&status), "session stream failed");
                break Some(status);
            }
        };
        debug!(kind = coordinator_message_kind(&msg), "message");
        let reply = tokio::select! {
            reply = handle_blocking(&service, msg) => reply,
            () = stop.grace_over() => {
                warn!("in-flight message abandoned at shutdown");
                break Some(Status::unavailable("the node shut down during the call"));
            }
        };
        let reply = match reply {
            Ok(reply) => reply,
            Err(detail) => {
                error!(%detail, "node service failed");
                break Some(Status::internal(format!("node service failed: {detail}")));
            }
        };
        let len = reply.encoded_len();
        if len > MAX_MESSAGE_BYTES {
            error!(
                len,
                max = MAX_MESSAGE_BYTES,
                "reply over the message limit not sent"
            );
            break Some(Status::resource_exhausted(format!(
                "reply of {len} bytes is over the limit of {MAX_MESSAGE_BYTES}"
            )));
        }
        let sent = tokio::select! {
            sent = replies.send(Ok(reply)) => sent.is_ok(),
            () = stop.grace_over() => false,
        };
        if !sent {
            info!("the coordinator went away");
            break None;
        }
    };
    if let Some(status) = last {
        let _ = tokio::time::timeout(Duration::from_secs(1), replies.send(Err(status))).await;
    }
    info!("grpc session closed");
}

/// Serves `service` in plain text on `listener` until `shutdown` resolves; then stops
/// accepting, lets in-flight calls finish (at most [`SHUTDOWN_GRACE`]), ends every session
/// with an `UNAVAILABLE` status and returns.
pub async fn serve(
    listener: tokio::net::TcpListener,
    service: Arc<dyn NodeService>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), TransportError> {
    let local = listener.local_addr().ok();
    let addr = server_addr(local);
    if !local.is_some_and(|a| a.ip().is_loopback()) {
        warn!(%addr, "gRPC is plain text (no TLS): give the node a cluster CA (--tls-ca) to serve other hosts");
    }
    // Connections that never send the HTTP/2 preface are dropped after HANDSHAKE_TIMEOUT,
    // so a peer cannot hold the node's sockets by connecting and saying nothing.
    let (connections, incoming) = mpsc::channel::<io::Result<TcpStream>>(16);
    let accepting = tokio::spawn(
        accept_plain(listener, connections).instrument(info_span!("grpc", node = %addr)),
    );
    let _accepting = AbortOnDrop(accepting);
    info!(%addr, "grpc node serving");
    run_server(addr, ReceiverStream::new(incoming), service, shutdown).await
}

/// Stops the accepting task (and drops the listener) however the server ends.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The HTTP/2 client connection preface (RFC 9113, 3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Accepts TCP connections and passes on those whose first bytes are the HTTP/2 preface
/// within [`HANDSHAKE_TIMEOUT`]; the others are closed and logged.
async fn accept_plain(
    listener: tokio::net::TcpListener,
    connections: mpsc::Sender<io::Result<TcpStream>>,
) {
    accept_each(listener, move |tcp, remote| {
        let connections = connections.clone();
        async move {
            let preface = async {
                let mut buf = [0u8; H2_PREFACE.len()];
                loop {
                    let n = tcp.peek(&mut buf).await?;
                    if n == 0 || buf[..n] != H2_PREFACE[..n] {
                        return Ok::<bool, io::Error>(false);
                    }
                    if n == H2_PREFACE.len() {
                        return Ok(true);
                    }
                    // Part of it: a peer that hung up will never send the rest (peeking
                    // cannot see the end of the stream behind pending bytes; readiness can).
                    let ready = tcp.ready(tokio::io::Interest::READABLE).await?;
                    if ready.is_read_closed() {
                        return Ok(false);
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            };
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, preface).await {
                Ok(Ok(true)) => {
                    let _ = connections.send(Ok(tcp)).await;
                }
                Ok(Ok(false)) => warn!(%remote, "closed a connection that is not HTTP/2"),
                Ok(Err(e)) => debug!(%remote, error = %e, "connection failed before its preface"),
                Err(_) => warn!(
                    %remote,
                    "closed a connection that sent no HTTP/2 preface within {HANDSHAKE_TIMEOUT:?}"
                ),
            }
        }
    })
    .await;
}

/// Accepts TCP connections until the task is dropped and runs `per_connection` on each in a
/// task of its own (TCP_NODELAY set).
async fn accept_each<F, Fut>(listener: tokio::net::TcpListener, mut per_connection: F)
where
    F: FnMut(TcpStream, SocketAddr) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    loop {
        let (tcp, remote) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of file descriptors and the like: try again shortly.
                warn!(error = %e, "accepting a connection failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        tokio::spawn(per_connection(tcp, remote).in_current_span());
    }
}

/// Serves `service` over TLS on `listener` (with a client CA: only to clients presenting a
/// certificate it signed; each refused handshake is logged with the client's address) until
/// `shutdown` resolves, then stops as [`serve`] does.
pub async fn serve_tls(
    listener: tokio::net::TcpListener,
    tls: ServerTls,
    service: Arc<dyn NodeService>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), TransportError> {
    let addr = server_addr(listener.local_addr().ok());
    let config = server_config(&tls, ALPN_H2).map_err(|detail| TransportError::Tls {
        peer: addr.clone(),
        detail,
    })?;
    let acceptor = TlsAcceptor::from(Arc::new(config));
    let (connections, incoming) = mpsc::channel::<io::Result<TlsServerStream>>(16);
    let accepting = tokio::spawn(
        accept_tls(listener, acceptor, connections)
            .instrument(info_span!("grpc_tls", node = %addr)),
    );
    let _accepting = AbortOnDrop(accepting);
    info!(%addr, mutual_tls = tls.is_mutual(), "grpc node serving over TLS");
    run_server(addr, ReceiverStream::new(incoming), service, shutdown).await
}

type TlsServerStream = tokio_rustls::server::TlsStream<TcpStream>;

/// Accepts TCP connections and runs each one's TLS handshake in a task of its own, passing
/// on the connections whose handshake succeeded and logging the refused ones.
async fn accept_tls(
    listener: tokio::net::TcpListener,
    acceptor: TlsAcceptor,
    connections: mpsc::Sender<io::Result<TlsServerStream>>,
) {
    accept_each(listener, move |tcp, remote| {
        let acceptor = acceptor.clone();
        let connections = connections.clone();
        async move {
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => {
                    let client = tls
                        .get_ref()
                        .1
                        .peer_certificates()
                        .and_then(|certs| certs.first().and_then(common_name));
                    match &client {
                        Some(name) => {
                            info!(%remote, client = %name, "TLS connection (client certificate)")
                        }
                        None => info!(%remote, "TLS connection"),
                    }
                    let _ = connections.send(Ok(tls)).await;
                }
                Ok(Err(e)) => {
                    warn!(%remote, error = %e, "refused a client: TLS handshake failed")
                }
                Err(_) => warn!(
                    %remote,
                    "refused a client: no TLS handshake within {HANDSHAKE_TIMEOUT:?}"
                ),
            }
        }
    })
    .await;
}

fn server_addr(local: Option<SocketAddr>) -> String {
    local.map_or_else(
        || "grpc://(unknown address)".to_string(),
        |a| format!("grpc://{a}"),
    )
}

/// Runs the tonic server on `incoming` until `shutdown`, then drains it.
async fn run_server<I, IO, IE>(
    addr: String,
    incoming: I,
    service: Arc<dyn NodeService>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), TransportError>
where
    I: tokio_stream::Stream<Item = Result<IO, IE>>,
    IO: AsyncRead + AsyncWrite + tonic::transport::server::Connected + Unpin + Send + 'static,
    IE: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let (stop_tx, stop) = Stop::new();
    let node = ExpertNodeServer::new(GrpcNode {
        service,
        stop: stop.clone(),
    })
    .max_decoding_message_size(MAX_MESSAGE_BYTES)
    .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let mut signal = stop;
    let server = Server::builder()
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .http2_keepalive_interval(Some(KEEP_ALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(KEEP_ALIVE_TIMEOUT))
        .serve_with_incoming_shutdown(node, incoming, async move { signal.stopped().await });
    let mut server = std::pin::pin!(server);
    let mut shutdown = std::pin::pin!(shutdown);
    let serve_err = |e: tonic::transport::Error| TransportError::Serve {
        addr: addr.clone(),
        detail: error_chain(&e),
    };
    tokio::select! {
        result = &mut server => return result.map_err(serve_err),
        () = &mut shutdown => {}
    }
    info!(%addr, "grpc node shutting down");
    let _ = stop_tx.send(true);
    // Sessions end by themselves within the grace period; the second is for the goodbyes.
    match tokio::time::timeout(SHUTDOWN_GRACE + Duration::from_secs(1), server).await {
        Ok(result) => result.map_err(serve_err)?,
        Err(_) => warn!(%addr, "connections still open after the shutdown grace period"),
    }
    info!(%addr, "grpc node stopped");
    Ok(())
}
