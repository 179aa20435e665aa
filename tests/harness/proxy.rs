//! Fault-injecting proxies: one TCP (for gRPC links) and one UDP (for QUIC links), each
//! in front of one upstream address, each on a runtime of its own so that a synchronous
//! test can change its faults while a coordinator talks through it.
//!
//! What each injects, per direction, changeable at any time through [`Faults`]:
//! - **latency**: every chunk (TCP) or datagram (UDP) is delivered `latency` after the
//!   proxy received it; order is kept and throughput is not limited by it (a long fat pipe).
//! - **loss** (UDP only): each datagram is dropped with probability `loss`, decided by a
//!   seeded generator, so a run drops the same datagrams of each direction's sequence. TCP
//!   cannot lose bytes; its faults are stalls and resets.
//! - **bandwidth**: each direction is paced to `bandwidth` bytes per second (a datagram or
//!   chunk is delivered when it would have finished transmitting).
//! - **stall** ([`TcpProxy::stall`], [`UdpProxy::stall`]): nothing is forwarded until
//!   [`resume`](TcpProxy::resume). TCP holds the bytes (they flow again on resume, as on a
//!   link that came back before the sender gave up); UDP drops every datagram that falls due
//!   during the stall (a black hole: the sender's retransmissions do the rest).
//! - **reset** (TCP only, [`TcpProxy::reset_all`]): every open connection is aborted with an
//!   RST on both sides, as a middlebox or a reboot on the path would do.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use shared::rng::SplitMix64;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{ReadHalf, WriteHalf};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::runtime::Runtime;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

/// The faults a proxy injects, the same in both directions.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Faults {
    /// One-way delay added to everything forwarded.
    pub latency: Duration,
    /// UDP: probability that a datagram is dropped (0 to 1). Ignored by the TCP proxy.
    pub loss: f64,
    /// Bytes per second; `None`: as fast as the proxy can copy.
    pub bandwidth: Option<u64>,
}

impl Faults {
    /// `latency` each way, nothing else.
    pub fn latency(latency: Duration) -> Faults {
        Faults {
            latency,
            ..Faults::default()
        }
    }

    /// Datagrams dropped with probability `loss` each way, nothing else.
    pub fn loss(loss: f64) -> Faults {
        Faults {
            loss,
            ..Faults::default()
        }
    }
}

/// Which way something travels through a proxy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// From the client (the coordinator) to the upstream (the node).
    ToUpstream,
    /// From the upstream back to the client.
    ToClient,
}

/// Counters of one direction.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DirectionStats {
    /// Bytes delivered.
    pub bytes: u64,
    /// Chunks (TCP) or datagrams (UDP) delivered.
    pub delivered: u64,
    /// Datagrams dropped (UDP: loss, stall, full queue).
    pub dropped: u64,
}

/// What a proxy has done so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProxyStats {
    pub to_upstream: DirectionStats,
    pub to_client: DirectionStats,
    /// TCP connections accepted, or UDP client addresses seen.
    pub sessions: u64,
    /// TCP connections aborted with an RST (by [`TcpProxy::reset_all`] or an error).
    pub resets: u64,
}

#[derive(Default)]
struct DirectionCounters {
    bytes: AtomicU64,
    delivered: AtomicU64,
    dropped: AtomicU64,
}

impl DirectionCounters {
    fn snapshot(&self) -> DirectionStats {
        DirectionStats {
            bytes: self.bytes.load(Ordering::Relaxed),
            delivered: self.delivered.load(Ordering::Relaxed),
            dropped: self.dropped.load(Ordering::Relaxed),
        }
    }
}

/// The state a proxy's tasks share with its handle.
struct Control {
    faults: Mutex<Faults>,
    stalled: watch::Sender<bool>,
    resets: watch::Sender<u64>,
    /// Loss decisions, one generator per direction.
    rng: Mutex<[SplitMix64; 2]>,
    to_upstream: DirectionCounters,
    to_client: DirectionCounters,
    sessions: AtomicU64,
    reset_count: AtomicU64,
}

/// The seed of the loss decisions (any fixed value: runs drop the same datagrams).
const LOSS_SEED: u64 = 0x5eed_1055;

impl Control {
    fn new(faults: Faults) -> Arc<Control> {
        Arc::new(Control {
            faults: Mutex::new(faults),
            stalled: watch::Sender::new(false),
            resets: watch::Sender::new(0),
            rng: Mutex::new([
                SplitMix64::new(LOSS_SEED),
                SplitMix64::new(LOSS_SEED ^ 0xffff),
            ]),
            to_upstream: DirectionCounters::default(),
            to_client: DirectionCounters::default(),
            sessions: AtomicU64::new(0),
            reset_count: AtomicU64::new(0),
        })
    }

    fn faults(&self) -> Faults {
        *self.faults.lock().unwrap()
    }

    fn counters(&self, dir: Direction) -> &DirectionCounters {
        match dir {
            Direction::ToUpstream => &self.to_upstream,
            Direction::ToClient => &self.to_client,
        }
    }

    fn delivered(&self, dir: Direction, bytes: usize) {
        let c = self.counters(dir);
        c.bytes.fetch_add(bytes as u64, Ordering::Relaxed);
        c.delivered.fetch_add(1, Ordering::Relaxed);
    }

    fn dropped(&self, dir: Direction) {
        self.counters(dir).dropped.fetch_add(1, Ordering::Relaxed);
    }

    /// Whether the next datagram of `dir` is lost.
    fn lose(&self, dir: Direction) -> bool {
        let loss = self.faults().loss;
        let mut rng = self.rng.lock().unwrap();
        let draw = rng[dir as usize].next_f64();
        loss > 0.0 && draw < loss
    }

    fn stats(&self) -> ProxyStats {
        ProxyStats {
            to_upstream: self.to_upstream.snapshot(),
            to_client: self.to_client.snapshot(),
            sessions: self.sessions.load(Ordering::Relaxed),
            resets: self.reset_count.load(Ordering::Relaxed),
        }
    }

    fn set_stalled(&self, stalled: bool) {
        self.stalled.send_replace(stalled);
    }
}

/// Paces one direction to a bandwidth.
#[derive(Default)]
struct Pace {
    next_free: Option<Instant>,
}

impl Pace {
    /// Waits until `bytes` sent at `rate` bytes/s after what went before would be through.
    async fn wait(&mut self, bytes: usize, rate: Option<u64>) {
        let Some(rate) = rate.filter(|&r| r > 0) else {
            self.next_free = None;
            return;
        };
        let now = Instant::now();
        let start = self.next_free.map_or(now, |t| t.max(now));
        let done = start + Duration::from_secs_f64(bytes as f64 / rate as f64);
        self.next_free = Some(done);
        tokio::time::sleep_until(done).await;
    }
}

fn runtime(name: &str) -> io::Result<Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name(name)
        .enable_all()
        .build()
}

/// The loopback address of `upstream`'s family, any port.
fn loopback_for(upstream: SocketAddr) -> SocketAddr {
    let ip: IpAddr = if upstream.is_ipv4() {
        Ipv4Addr::LOCALHOST.into()
    } else {
        Ipv6Addr::LOCALHOST.into()
    };
    SocketAddr::new(ip, 0)
}

/// A TCP proxy on 127.0.0.1 in front of `upstream`; stops (connections dropped) on drop.
pub struct TcpProxy {
    addr: SocketAddr,
    upstream: SocketAddr,
    control: Arc<Control>,
    runtime: Option<Runtime>,
}

impl TcpProxy {
    /// Listens on a free loopback port and forwards every connection to `upstream`.
    pub fn start(upstream: SocketAddr, faults: Faults) -> io::Result<TcpProxy> {
        let runtime = runtime("tcp-fault-proxy")?;
        let listener = runtime.block_on(TcpListener::bind(loopback_for(upstream)))?;
        let addr = listener.local_addr()?;
        let control = Control::new(faults);
        runtime.spawn(tcp_accept(listener, upstream, Arc::clone(&control)));
        Ok(TcpProxy {
            addr,
            upstream,
            control,
            runtime: Some(runtime),
        })
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn upstream(&self) -> SocketAddr {
        self.upstream
    }

    pub fn set_faults(&self, faults: Faults) {
        *self.control.faults.lock().unwrap() = faults;
    }

    /// Stops forwarding (bytes are held) until [`resume`](Self::resume).
    pub fn stall(&self) {
        self.control.set_stalled(true);
    }

    /// Forwards again, the held bytes first.
    pub fn resume(&self) {
        self.control.set_stalled(false);
    }

    /// Aborts every open connection with an RST to both peers.
    pub fn reset_all(&self) {
        self.control.resets.send_modify(|n| *n += 1);
    }

    pub fn stats(&self) -> ProxyStats {
        self.control.stats()
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

async fn tcp_accept(listener: TcpListener, upstream: SocketAddr, control: Arc<Control>) {
    while let Ok((client, _)) = listener.accept().await {
        control.sessions.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(tcp_connection(client, upstream, Arc::clone(&control)));
    }
}

/// Aborts `stream` with an RST when it is dropped.
fn abort_on_drop(stream: &TcpStream) {
    // SO_LINGER with a zero timeout: close(2) sends an RST and returns at once (the
    // deprecation is about non-zero timeouts, which block the thread on drop).
    #[allow(deprecated)]
    let _ = stream.set_linger(Some(Duration::ZERO));
}

async fn tcp_connection(mut client: TcpStream, upstream: SocketAddr, control: Arc<Control>) {
    let mut server = match TcpStream::connect(upstream).await {
        Ok(s) => s,
        Err(_) => {
            abort_on_drop(&client);
            return;
        }
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let mut resets = control.resets.subscribe();
    let clean = {
        let (client_read, client_write) = client.split();
        let (server_read, server_write) = server.split();
        let up = pump(client_read, server_write, &control, Direction::ToUpstream);
        let down = pump(server_read, client_write, &control, Direction::ToClient);
        tokio::select! {
            r = async { tokio::try_join!(up, down) } => r.is_ok(),
            _ = resets.changed() => false,
        }
    };
    if !clean {
        control.reset_count.fetch_add(1, Ordering::Relaxed);
        abort_on_drop(&client);
        abort_on_drop(&server);
    }
}

/// Copies one direction of a connection with the proxy's faults; at end of file, shuts the
/// other side's write half (FIN), so half-closes pass through.
async fn pump(
    mut from: ReadHalf<'_>,
    mut to: WriteHalf<'_>,
    control: &Control,
    dir: Direction,
) -> io::Result<()> {
    let (tx, mut rx) = mpsc::channel::<(Instant, Vec<u8>)>(256);
    let reader = async move {
        let mut buf = vec![0u8; 64 << 10];
        loop {
            let n = from.read(&mut buf).await?;
            if n == 0 {
                return Ok::<(), io::Error>(());
            }
            let due = Instant::now() + control.faults().latency;
            if tx.send((due, buf[..n].to_vec())).await.is_err() {
                return Ok(());
            }
        }
    };
    let writer = async move {
        let mut stalled = control.stalled.subscribe();
        let mut pace = Pace::default();
        while let Some((due, chunk)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            // A stall holds everything; the sender's TCP sees a peer that stopped reading.
            let _ = stalled.wait_for(|s| !*s).await;
            pace.wait(chunk.len(), control.faults().bandwidth).await;
            to.write_all(&chunk).await?;
            control.delivered(dir, chunk.len());
        }
        to.shutdown().await
    };
    tokio::try_join!(reader, writer).map(|_| ())
}

/// A UDP proxy on 127.0.0.1 in front of `upstream`: each client address gets a socket of
/// its own towards the upstream (as a NAT would), so the upstream sees one peer per client.
pub struct UdpProxy {
    addr: SocketAddr,
    upstream: SocketAddr,
    control: Arc<Control>,
    runtime: Option<Runtime>,
}

impl UdpProxy {
    /// Listens on a free loopback port and forwards every client's datagrams to `upstream`.
    pub fn start(upstream: SocketAddr, faults: Faults) -> io::Result<UdpProxy> {
        let runtime = runtime("udp-fault-proxy")?;
        let front = runtime.block_on(UdpSocket::bind(loopback_for(upstream)))?;
        let addr = front.local_addr()?;
        let control = Control::new(faults);
        runtime.spawn(udp_front(Arc::new(front), upstream, Arc::clone(&control)));
        Ok(UdpProxy {
            addr,
            upstream,
            control,
            runtime: Some(runtime),
        })
    }

    /// Where clients send.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn upstream(&self) -> SocketAddr {
        self.upstream
    }

    pub fn set_faults(&self, faults: Faults) {
        *self.control.faults.lock().unwrap() = faults;
    }

    /// Drops every datagram until [`resume`](Self::resume) (a black hole).
    pub fn stall(&self) {
        self.control.set_stalled(true);
    }

    pub fn resume(&self) {
        self.control.set_stalled(false);
    }

    pub fn stats(&self) -> ProxyStats {
        self.control.stats()
    }
}

impl Drop for UdpProxy {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

type Datagram = (Instant, Vec<u8>);

/// The most datagrams waiting in one direction of one client (beyond: dropped, as a full
/// router queue would).
const UDP_QUEUE: usize = 4096;
const MAX_DATAGRAM: usize = 65536;

async fn udp_front(front: Arc<UdpSocket>, upstream: SocketAddr, control: Arc<Control>) {
    let mut clients: HashMap<SocketAddr, mpsc::Sender<Datagram>> = HashMap::new();
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        let Ok((n, from)) = front.recv_from(&mut buf).await else {
            // ICMP errors surface here on some systems; the socket stays usable.
            continue;
        };
        let to_upstream = match clients.get(&from) {
            Some(tx) => tx.clone(),
            None => match udp_client(&front, from, upstream, &control).await {
                Ok(tx) => {
                    control.sessions.fetch_add(1, Ordering::Relaxed);
                    clients.insert(from, tx.clone());
                    tx
                }
                Err(_) => continue,
            },
        };
        offer(&to_upstream, &control, Direction::ToUpstream, &buf[..n]);
    }
}

/// Queues a received datagram for delivery unless it is lost.
fn offer(queue: &mpsc::Sender<Datagram>, control: &Control, dir: Direction, data: &[u8]) {
    if control.lose(dir) {
        control.dropped(dir);
        return;
    }
    let due = Instant::now() + control.faults().latency;
    if queue.try_send((due, data.to_vec())).is_err() {
        control.dropped(dir);
    }
}

/// The socket and tasks of one client: its own socket towards the upstream, and a delivery
/// queue each way.
async fn udp_client(
    front: &Arc<UdpSocket>,
    client: SocketAddr,
    upstream: SocketAddr,
    control: &Arc<Control>,
) -> io::Result<mpsc::Sender<Datagram>> {
    let local = SocketAddr::new(
        if upstream.ip().is_loopback() {
            loopback_for(upstream).ip()
        } else if upstream.is_ipv4() {
            Ipv4Addr::UNSPECIFIED.into()
        } else {
            Ipv6Addr::UNSPECIFIED.into()
        },
        0,
    );
    let back = Arc::new(UdpSocket::bind(local).await?);
    back.connect(upstream).await?;

    let (up_tx, up_rx) = mpsc::channel::<Datagram>(UDP_QUEUE);
    let (down_tx, down_rx) = mpsc::channel::<Datagram>(UDP_QUEUE);
    {
        let back = Arc::clone(&back);
        tokio::spawn(deliver(
            up_rx,
            Arc::clone(control),
            Direction::ToUpstream,
            move |d| {
                let back = Arc::clone(&back);
                async move { back.send(&d).await.map(|_| ()) }
            },
        ));
    }
    {
        let front = Arc::clone(front);
        tokio::spawn(deliver(
            down_rx,
            Arc::clone(control),
            Direction::ToClient,
            move |d| {
                let front = Arc::clone(&front);
                async move { front.send_to(&d, client).await.map(|_| ()) }
            },
        ));
    }
    let control = Arc::clone(control);
    tokio::spawn(async move {
        let mut buf = vec![0u8; MAX_DATAGRAM];
        loop {
            match back.recv(&mut buf).await {
                Ok(n) => offer(&down_tx, &control, Direction::ToClient, &buf[..n]),
                // ECONNREFUSED from an earlier send (the upstream is not listening): the
                // datagram is gone, the socket stays usable.
                Err(_) => tokio::time::sleep(Duration::from_millis(1)).await,
            }
        }
    });
    Ok(up_tx)
}

/// Delivers one direction's queue: at each datagram's due time, unless stalled, paced.
async fn deliver<F, Fut>(
    mut queue: mpsc::Receiver<Datagram>,
    control: Arc<Control>,
    dir: Direction,
    send: F,
) where
    F: Fn(Vec<u8>) -> Fut,
    Fut: std::future::Future<Output = io::Result<()>>,
{
    let stalled = control.stalled.subscribe();
    let mut pace = Pace::default();
    while let Some((due, data)) = queue.recv().await {
        tokio::time::sleep_until(due).await;
        if *stalled.borrow() {
            control.dropped(dir);
            continue;
        }
        pace.wait(data.len(), control.faults().bandwidth).await;
        let len = data.len();
        match send(data).await {
            Ok(()) => control.delivered(dir, len),
            Err(_) => control.dropped(dir),
        }
    }
}

/// The proxy a link of `transport` needs: TCP for gRPC, UDP for QUIC.
pub enum LinkProxy {
    Tcp(TcpProxy),
    Udp(UdpProxy),
}

impl LinkProxy {
    pub fn start(
        transport: crate::Transport,
        upstream: SocketAddr,
        faults: Faults,
    ) -> io::Result<LinkProxy> {
        Ok(match transport {
            crate::Transport::Grpc => LinkProxy::Tcp(TcpProxy::start(upstream, faults)?),
            crate::Transport::Quic => LinkProxy::Udp(UdpProxy::start(upstream, faults)?),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        match self {
            LinkProxy::Tcp(p) => p.addr(),
            LinkProxy::Udp(p) => p.addr(),
        }
    }

    pub fn set_faults(&self, faults: Faults) {
        match self {
            LinkProxy::Tcp(p) => p.set_faults(faults),
            LinkProxy::Udp(p) => p.set_faults(faults),
        }
    }

    /// TCP: hold everything; UDP: drop everything (see the module's notes).
    pub fn stall(&self) {
        match self {
            LinkProxy::Tcp(p) => p.stall(),
            LinkProxy::Udp(p) => p.stall(),
        }
    }

    pub fn resume(&self) {
        match self {
            LinkProxy::Tcp(p) => p.resume(),
            LinkProxy::Udp(p) => p.resume(),
        }
    }

    pub fn stats(&self) -> ProxyStats {
        match self {
            LinkProxy::Tcp(p) => p.stats(),
            LinkProxy::Udp(p) => p.stats(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream, UdpSocket};
    use std::time::{Duration, Instant};

    use super::{Faults, TcpProxy, UdpProxy};

    /// A TCP server that echoes every connection until end of file, then closes.
    fn tcp_echo() -> std::net::SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut s) = stream else { return };
                std::thread::spawn(move || {
                    let mut buf = [0u8; 65536];
                    while let Ok(n) = s.read(&mut buf) {
                        if n == 0 || s.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                });
            }
        });
        addr
    }

    fn udp_echo() -> std::net::SocketAddr {
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = socket.local_addr().unwrap();
        std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while let Ok((n, from)) = socket.recv_from(&mut buf) {
                let _ = socket.send_to(&buf[..n], from);
            }
        });
        addr
    }

    /// Sends `data`, half-closes, reads the echo to end of file.
    fn echo_through(addr: std::net::SocketAddr, data: &[u8]) -> Vec<u8> {
        let mut s = TcpStream::connect(addr).unwrap();
        let mut reader = s.try_clone().unwrap();
        let read = std::thread::spawn(move || {
            let mut got = Vec::new();
            reader.read_to_end(&mut got).unwrap();
            got
        });
        s.write_all(data).unwrap();
        s.shutdown(std::net::Shutdown::Write).unwrap();
        read.join().unwrap()
    }

    #[test]
    fn tcp_latency_and_bandwidth_delay_but_keep_the_bytes() {
        let latency = Duration::from_millis(30);
        let proxy = TcpProxy::start(
            tcp_echo(),
            Faults {
                latency,
                bandwidth: Some(1_000_000),
                ..Faults::default()
            },
        )
        .unwrap();
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let t0 = Instant::now();
        let got = echo_through(proxy.addr(), &data);
        let took = t0.elapsed();
        assert_eq!(
            got, data,
            "the echo passes through unchanged, half-close included"
        );
        // 200 kB at 1 MB/s each way (pipelined) plus a round trip of latency.
        assert!(took >= Duration::from_millis(200) + 2 * latency, "{took:?}");
        let stats = proxy.stats();
        assert_eq!(stats.to_upstream.bytes, 200_000);
        assert_eq!(stats.to_client.bytes, 200_000);
    }

    #[test]
    fn tcp_stall_holds_and_reset_aborts() {
        let proxy = TcpProxy::start(tcp_echo(), Faults::default()).unwrap();
        let mut s = TcpStream::connect(proxy.addr()).unwrap();
        s.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        proxy.stall();
        s.write_all(b"held").unwrap();
        let mut buf = [0u8; 4];
        assert!(s.read_exact(&mut buf).is_err(), "nothing passes a stall");
        proxy.resume();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"held", "held bytes flow on resume");
        proxy.reset_all();
        let err = s.read(&mut buf).expect_err("a reset connection");
        assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset);
        assert_eq!(proxy.stats().resets, 1);
    }

    #[test]
    fn udp_loss_and_stall_drop_datagrams() {
        let proxy = UdpProxy::start(udp_echo(), Faults::loss(0.5)).unwrap();
        let s = UdpSocket::bind("127.0.0.1:0").unwrap();
        s.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let n = 200;
        for i in 0..n {
            s.send_to(&[i as u8; 100], proxy.addr()).unwrap();
        }
        let mut echoed = 0;
        let mut buf = [0u8; 256];
        while s.recv_from(&mut buf).is_ok() {
            echoed += 1;
        }
        let stats = proxy.stats();
        // Half lost each way: about a quarter comes back.
        assert!(
            (25..=80).contains(&echoed),
            "{echoed} of {n} echoed: {stats:?}"
        );
        assert_eq!(
            stats.to_upstream.delivered + stats.to_upstream.dropped,
            n,
            "{stats:?}"
        );

        proxy.set_faults(Faults::default());
        proxy.stall();
        s.send_to(b"lost", proxy.addr()).unwrap();
        assert!(s.recv_from(&mut buf).is_err(), "a stall is a black hole");
        proxy.resume();
        s.send_to(b"back", proxy.addr()).unwrap();
        let (len, _) = s.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"back");
    }
}
