//! Garbage and truncated frames sent straight to a node's port, on the wire under the
//! protocol (raw TCP and UDP) and inside it (a real HTTP/2 session or an authenticated
//! QUIC connection carrying malformed moeshard messages): each bad connection or stream is
//! closed or ignored, and the node keeps serving — the coordinator connected before, and a
//! new one, get the undisturbed output.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream, UdpSocket};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use proto::limits::MAX_MESSAGE_BYTES;
use proto::wire;
use proto::Message;
use shared::rng::SplitMix64;
use tests::Transport;

use crate::common::{assert_identical, note, run, TwoNodes};

const DEADLINE: Duration = Duration::from_secs(10);
/// How long a node may take to close a connection it cannot use.
const CLOSE_WITHIN: Duration = Duration::from_secs(5);

fn random_bytes(seed: u64, n: usize) -> Vec<u8> {
    let mut rng = SplitMix64::new(seed);
    (0..n).map(|_| rng.next_u64() as u8).collect()
}

fn tokio_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// The HTTP/2 client connection preface.
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// An HTTP/2 frame header: length, type, flags, stream id.
fn h2_frame(len: u32, kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut f = len.to_be_bytes()[1..].to_vec();
    f.extend([kind, flags]);
    f.extend(stream.to_be_bytes());
    f.extend(payload);
    f
}

/// How a raw connection ended.
#[derive(Debug)]
struct Ending {
    /// By an RST (else a FIN).
    reset: bool,
    /// Bytes the node sent before (its HTTP/2 SETTINGS, a GOAWAY).
    received: usize,
}

/// Sends `bytes` on a new TCP connection, half-closes, and waits for the node to close.
fn raw_tcp(addr: SocketAddr, bytes: &[u8], half_close: bool) -> Result<Ending, String> {
    let mut s = TcpStream::connect(addr).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(CLOSE_WITHIN)).unwrap();
    // The node may close before reading everything: a failed write is an answer too.
    let _ = s.write_all(bytes);
    if half_close {
        let _ = s.shutdown(Shutdown::Write);
    }
    let mut got = 0;
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => {
                return Ok(Ending {
                    reset: false,
                    received: got,
                })
            }
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                return Ok(Ending {
                    reset: true,
                    received: got,
                })
            }
            Err(e) => {
                return Err(format!(
                    "still open after {CLOSE_WITHIN:?} ({e}), {got} bytes"
                ))
            }
        }
    }
}

/// What the node answered on one gRPC `Session` stream: its `grpc-status` (0: OK) and
/// message, and how many reply messages came before it.
#[derive(Debug)]
struct GrpcEnd {
    status: Option<String>,
    message: String,
    replies: usize,
}

/// Opens a real HTTP/2 connection and a `Session` stream, sends `body` (raw gRPC framing:
/// flag, u32 length, message) and ends the stream; reads the answer to its trailers.
async fn grpc_session(addr: SocketAddr, body: Vec<u8>) -> Result<GrpcEnd, String> {
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let (client, connection) = h2::client::handshake(tcp)
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(connection);
    let mut client = client.ready().await.map_err(|e| e.to_string())?;
    let request = http::Request::builder()
        .method("POST")
        .uri(format!("http://{addr}/moeshard.v1.ExpertNode/Session"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .unwrap();
    let (response, mut send) = client
        .send_request(request, false)
        .map_err(|e| e.to_string())?;
    send.send_data(Bytes::from(body), true)
        .map_err(|e| e.to_string())?;
    let response = response.await.map_err(|e| e.to_string())?;
    let header = |h: &http::HeaderMap, k: &str| {
        h.get(k)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
    };
    let (parts, mut body) = response.into_parts();
    let mut end = GrpcEnd {
        status: header(&parts.headers, "grpc-status"),
        message: header(&parts.headers, "grpc-message").unwrap_or_default(),
        replies: 0,
    };
    let mut data = Vec::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.map_err(|e| e.to_string())?;
        let _ = body.flow_control().release_capacity(chunk.len());
        data.extend_from_slice(&chunk);
    }
    // Count the length-prefixed reply messages.
    let mut rest = data.as_slice();
    while rest.len() >= 5 {
        let len = u32::from_be_bytes([rest[1], rest[2], rest[3], rest[4]]) as usize;
        rest = &rest[(5 + len).min(rest.len())..];
        end.replies += 1;
    }
    if let Some(trailers) = body.trailers().await.map_err(|e| e.to_string())? {
        end.status = header(&trailers, "grpc-status").or(end.status);
        if let Some(m) = header(&trailers, "grpc-message") {
            end.message = m;
        }
    }
    Ok(end)
}

fn grpc_message(flag: u8, len: u32, payload: &[u8]) -> Vec<u8> {
    let mut m = vec![flag];
    m.extend(len.to_be_bytes());
    m.extend(payload);
    m
}

/// A gRPC node's TCP port gets garbage, half an HTTP/2 connection, and malformed gRPC
/// messages on a real session; it closes each and keeps serving.
#[test]
fn garbage_to_a_grpc_port_is_closed_and_the_node_keeps_serving() {
    let test = "grpc garbage";
    let nodes = TwoNodes::start(Transport::Grpc);
    let before = nodes.open([None, None], DEADLINE);
    let (want, _) = run(&before.engine).unwrap();
    let addr = nodes.nodes[1].addr;

    let settings = h2_frame(0, 4, 0, 0, &[]);
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("random bytes", random_bytes(1, 4096)),
        (
            "an HTTP/1.1 request",
            b"GET / HTTP/1.1\r\nHost: node\r\n\r\n".to_vec(),
        ),
        ("a truncated preface", PREFACE[..10].to_vec()),
        ("the preface, then 0xff", [PREFACE, &[0xff; 64]].concat()),
        (
            "the preface, then a truncated SETTINGS frame",
            [PREFACE, &h2_frame(12, 4, 0, 0, &[0, 1, 0])].concat(),
        ),
        (
            "a HEADERS frame claiming 16 MiB",
            [
                PREFACE,
                &settings,
                &h2_frame((1 << 24) - 1, 1, 4, 1, &[0; 32]),
            ]
            .concat(),
        ),
        (
            "DATA on a stream never opened",
            [PREFACE, &settings, &h2_frame(10, 0, 0, 1, &[7; 10])].concat(),
        ),
    ];
    for (what, bytes) in &cases {
        let t0 = Instant::now();
        let ending = raw_tcp(addr, bytes, true)
            .unwrap_or_else(|e| panic!("{test}: {what}: the node kept the connection: {e}"));
        note(
            test,
            format_args!(
                "{what}: closed ({}) after {:.2?}, {} bytes from the node before",
                if ending.reset { "RST" } else { "FIN" },
                t0.elapsed(),
                ending.received
            ),
        );
    }

    // Inside a real HTTP/2 session: malformed gRPC messages end the session with an error
    // status; a well-formed message without a body gets an error answer.
    let sessions: Vec<(&str, Vec<u8>, bool)> = vec![
        (
            "undecodable protobuf",
            grpc_message(0, 64, &[0xff; 64]),
            false,
        ),
        ("a message cut short", grpc_message(0, 100, &[0; 10]), false),
        (
            "a length over the limit",
            grpc_message(0, MAX_MESSAGE_BYTES as u32 + 1, &[0; 16]),
            false,
        ),
        (
            "compressed without an encoding",
            grpc_message(1, 8, &[0; 8]),
            false,
        ),
        (
            "a message without a body",
            grpc_message(0, 0, &wire::CoordinatorMessage::default().encode_to_vec()),
            true,
        ),
    ];
    let rt = tokio_runtime();
    for (what, body, answered) in sessions {
        let end = rt
            .block_on(async { tokio::time::timeout(CLOSE_WITHIN, grpc_session(addr, body)).await })
            .unwrap_or_else(|_| panic!("{test}: {what}: no end within {CLOSE_WITHIN:?}"))
            .unwrap_or_else(|e| panic!("{test}: {what}: {e}"));
        note(test, format_args!("session with {what}: {end:?}"));
        if answered {
            assert_eq!(end.replies, 1, "{test}: {what}: {end:?}");
        } else {
            assert_eq!(end.replies, 0, "{test}: {what}: {end:?}");
            assert!(
                end.status.as_deref().is_some_and(|s| s != "0"),
                "{test}: {what}: the session did not end with an error: {end:?}"
            );
        }
    }

    assert!(
        nodes.nodes[1].log().contains("session stream failed"),
        "{test}: the node logs the sessions it ended"
    );
    check_still_serving(test, &nodes, &before, &want);
}

/// The connected coordinator and a new one both get the undisturbed output.
fn check_still_serving(
    test: &str,
    nodes: &TwoNodes,
    before: &coordinator::distributed::connect::DistributedEngine,
    want: &crate::common::Output,
) {
    let (again, _) = run(&before.engine).unwrap();
    assert_identical(
        &again,
        want,
        &format!("{test}: the coordinator connected before"),
    );
    let fresh = nodes.open([None, None], DEADLINE);
    let (got, _) = run(&fresh.engine).unwrap();
    assert_identical(&got, want, &format!("{test}: a new coordinator"));
}

/// A QUIC long-header packet of `version` with random connection ids and payload, padded
/// to `len` bytes (an Initial has to be at least 1200).
fn quic_long_header(version: u32, len: usize, seed: u64) -> Vec<u8> {
    let mut p = vec![0xc0];
    p.extend(version.to_be_bytes());
    p.push(8);
    p.extend(random_bytes(seed, 8));
    p.push(8);
    p.extend(random_bytes(seed + 1, 8));
    if version == 1 {
        p.push(0); // token length
        let rest = (len - p.len() - 2) as u16;
        p.extend((0x4000 | rest).to_be_bytes()); // payload length, a 2-byte varint
    }
    let pad = len.saturating_sub(p.len());
    p.extend(random_bytes(seed + 2, pad));
    p
}

/// A QUIC client of the node's own certificate (the coordinator's way of trusting it), to
/// send what the coordinator never would on an authenticated connection.
async fn quic_client(
    addr: SocketAddr,
    cert_pem: &str,
) -> Result<(quinn::Endpoint, quinn::Connection), String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(cert_pem.as_bytes()) {
        roots
            .add(cert.map_err(|e| e.to_string())?)
            .map_err(|e| e.to_string())?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut crypto = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    crypto.alpn_protocols = vec![b"moeshard/1".to_vec()];
    let crypto =
        quinn::crypto::rustls::QuicClientConfig::try_from(crypto).map_err(|e| e.to_string())?;
    let config = quinn::ClientConfig::new(Arc::new(crypto));
    let endpoint =
        quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).map_err(|e| e.to_string())?;
    let connection = endpoint
        .connect_with(config, addr, "localhost")
        .map_err(|e| e.to_string())?
        .await
        .map_err(|e| e.to_string())?;
    Ok((endpoint, connection))
}

/// How the node ended one stream.
#[derive(Debug, PartialEq, Eq)]
enum StreamEnd {
    /// It answered with these bytes (a frame).
    Answer(usize),
    /// It reset the stream with this application code.
    Reset(u64),
    /// It asked us to stop sending, with this code.
    Stopped(u64),
}

/// Sends `bytes` on a new bidirectional stream, finishes it, and reads the answer.
async fn quic_stream(connection: &quinn::Connection, bytes: &[u8]) -> Result<StreamEnd, String> {
    let (mut send, mut recv) = connection.open_bi().await.map_err(|e| e.to_string())?;
    match send.write_all(bytes).await {
        Ok(()) => {}
        Err(quinn::WriteError::Stopped(code)) => return Ok(StreamEnd::Stopped(code.into_inner())),
        Err(e) => return Err(format!("writing: {e}")),
    }
    let _ = send.finish();
    match recv.read_to_end(1 << 20).await {
        Ok(answer) => Ok(StreamEnd::Answer(answer.len())),
        Err(quinn::ReadToEndError::Read(quinn::ReadError::Reset(code))) => {
            Ok(StreamEnd::Reset(code.into_inner()))
        }
        Err(e) => Err(format!("reading: {e}")),
    }
}

fn moeshard_frame(len: u32, payload: &[u8]) -> Vec<u8> {
    [&len.to_le_bytes()[..], payload].concat()
}

/// A QUIC node's UDP port gets random datagrams and broken QUIC packets (ignored), and an
/// authenticated connection gets malformed moeshard frames (each stream reset with the
/// transport's code); the node keeps serving.
#[test]
fn garbage_to_a_quic_port_is_ignored_and_the_node_keeps_serving() {
    let test = "quic garbage";
    let nodes = TwoNodes::start(Transport::Quic);
    let before = nodes.open([None, None], DEADLINE);
    let (want, _) = run(&before.engine).unwrap();
    let node = &nodes.nodes[1];
    let addr = node.addr;

    // Under the protocol: datagrams that are not QUIC, or not a connection the node knows.
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    socket
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let datagrams: Vec<(&str, Vec<u8>)> = vec![
        ("one byte", vec![0]),
        ("1200 random bytes", random_bytes(2, 1200)),
        ("65000 random bytes", random_bytes(3, 65000)),
        (
            "an Initial with a random payload",
            quic_long_header(1, 1200, 4),
        ),
        (
            "an Initial cut to 60 bytes",
            quic_long_header(1, 1200, 5)[..60].to_vec(),
        ),
        (
            "an Initial of 100 bytes (under the minimum)",
            quic_long_header(1, 100, 6),
        ),
        (
            "a long header of an unknown version",
            quic_long_header(0x1a2a_3a4a, 1200, 7),
        ),
        (
            "a short header for no connection",
            [&[0x40][..], &random_bytes(8, 99)].concat(),
        ),
    ];
    for (what, d) in &datagrams {
        socket.send_to(d, addr).unwrap();
        let mut buf = [0u8; 2048];
        let answer = match socket.recv_from(&mut buf) {
            Ok((n, _)) => format!("answered {n} bytes (first byte {:#04x})", buf[0]),
            Err(_) => "no answer".to_string(),
        };
        note(test, format_args!("datagram, {what}: {answer}"));
    }

    // Inside an authenticated connection: malformed frames.
    let cert = std::fs::read_to_string(node.cert.as_ref().unwrap()).unwrap();
    let body_less = {
        let mut f = Vec::new();
        proto::framing::encode_frame(
            &wire::CoordinatorMessage::default(),
            MAX_MESSAGE_BYTES,
            &mut f,
        )
        .unwrap();
        f
    };
    const BAD_FRAME: u64 = 4;
    const TOO_LARGE: u64 = 1;
    let streams: Vec<(&str, Vec<u8>, Option<StreamEnd>)> = vec![
        (
            "an empty stream",
            Vec::new(),
            Some(StreamEnd::Reset(BAD_FRAME)),
        ),
        (
            "half a header",
            vec![5, 0],
            Some(StreamEnd::Reset(BAD_FRAME)),
        ),
        (
            "a body cut short",
            moeshard_frame(100, &[0; 10]),
            Some(StreamEnd::Reset(BAD_FRAME)),
        ),
        (
            "undecodable protobuf",
            moeshard_frame(64, &[0xff; 64]),
            Some(StreamEnd::Reset(BAD_FRAME)),
        ),
        // The node stops reading and resets: either may reach us first.
        (
            "a length over the limit",
            moeshard_frame(MAX_MESSAGE_BYTES as u32 + 1, &[0; 64]),
            None,
        ),
        ("a message without a body", body_less, None),
    ];
    let rt = tokio_runtime();
    rt.block_on(async {
        let (endpoint, connection) = quic_client(addr, &cert).await.unwrap();
        for (what, bytes, want_end) in streams {
            let end = tokio::time::timeout(CLOSE_WITHIN, quic_stream(&connection, &bytes))
                .await
                .unwrap_or_else(|_| panic!("{test}: {what}: no end within {CLOSE_WITHIN:?}"))
                .unwrap_or_else(|e| panic!("{test}: {what}: {e}"));
            note(test, format_args!("stream with {what}: {end:?}"));
            match (what, want_end) {
                (_, Some(w)) => assert_eq!(end, w, "{test}: {what}"),
                ("a length over the limit", None) => assert!(
                    matches!(
                        end,
                        StreamEnd::Reset(TOO_LARGE) | StreamEnd::Stopped(TOO_LARGE)
                    ),
                    "{test}: {what}: {end:?}"
                ),
                (_, None) => assert!(
                    matches!(end, StreamEnd::Answer(n) if n > 0),
                    "{test}: {what}: {end:?}"
                ),
            }
        }
        // A stream left with half a frame when the connection goes away.
        let (mut send, _recv) = connection.open_bi().await.unwrap();
        send.write_all(&moeshard_frame(1000, &[1; 100]))
            .await
            .unwrap();
        connection.close(0u32.into(), b"gone");
        endpoint.wait_idle().await;
    });

    assert!(
        node.log().contains("unreadable message"),
        "{test}: the node logs the streams it reset"
    );
    check_still_serving(test, &nodes, &before, &want);
}

/// A TCP connection to a gRPC node that never completes the HTTP/2 preface (nothing sent,
/// or half of it) is closed after `proto::transport::grpc::HANDSHAKE_TIMEOUT` (10 s), so an
/// unauthenticated peer cannot hold the node's sockets (file descriptors) by saying nothing.
#[test]
fn grpc_connection_that_never_completes_the_preface_is_closed() {
    let limit = Duration::from_secs(15);
    let nodes = TwoNodes::start(Transport::Grpc);
    let addr = nodes.nodes[1].addr;
    for (what, bytes) in [("nothing", &b""[..]), ("half the preface", &PREFACE[..16])] {
        let mut s = TcpStream::connect(addr).unwrap();
        s.write_all(bytes).unwrap();
        s.set_read_timeout(Some(limit)).unwrap();
        let t0 = Instant::now();
        let mut buf = [0u8; 256];
        let closed = loop {
            match s.read(&mut buf) {
                Ok(0) => break true,
                Ok(_) => continue,
                Err(e) => break e.kind() == std::io::ErrorKind::ConnectionReset,
            }
        };
        note(
            "grpc preface",
            format_args!("{what}: closed {closed} after {:.2?}", t0.elapsed()),
        );
        assert!(
            closed,
            "a connection that sent {what} is open after {limit:?}"
        );
    }
}
