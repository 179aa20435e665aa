//! Loopback mode: the expert nodes of a plan started on this machine — as processes
//! listening on 127.0.0.1 (gRPC or QUIC, ports chosen free by the OS), or inside this
//! process (`inproc`) — and stopped again when [`LocalNodes`] is dropped.
//!
//! The cores are divided between the node processes, not multiplied: N nodes on C cores
//! get max(1, C / N) compute threads each, so timings and deadlines stay meaningful.
//!
//! QUIC nodes get mutual TLS from a throwaway CA made for the run (its key never leaves
//! this process; the nodes' certificates and keys live in the run's temporary directory,
//! removed with it): a loopback node serves only this coordinator. gRPC loopback links are
//! plain text.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use expert_node::{NodeCore, NodeWeights};
use proto::transport::{
    CertAuthority, CertUse, ClientTls, InprocLink, NodeLink, TransportKind, DEFAULT_CERT_DAYS,
};
use shared::placement::{Plan, ResolvedPlan};
use tracing::{info, warn};

use super::{reconnect_grpc, reconnect_quic, DistributedError, NodeHandle, Reconnect};

/// How long a node process may take to load its weights and listen.
pub const DEFAULT_START_TIMEOUT: Duration = Duration::from_secs(300);

/// How to start node processes.
#[derive(Clone, Debug)]
pub struct LaunchOptions {
    /// The program and the arguments before the node's own (`moeshard expert-node`).
    pub program: PathBuf,
    pub program_args: Vec<String>,
    /// Compute threads per node (0: the cores divided by the node count).
    pub threads_per_node: usize,
    pub start_timeout: Duration,
    /// Per node (plan order), where set: its NUMA pinning (`--numa auto`).
    pub numa: Vec<NodeNuma>,
    /// Per node (plan order), where set: the file it serves instead of the model (a
    /// `moeshard split` file on its socket's namespace).
    pub model_per_node: Vec<PathBuf>,
}

/// How one node process is pinned.
#[derive(Clone, Debug)]
pub struct NodeNuma {
    pub numa_node: u32,
    /// Compute threads (the node's processing units).
    pub threads: usize,
    /// The topology the pinning plan came from (`synthetic:…`), passed on to the node.
    pub topology: Option<String>,
}

impl LaunchOptions {
    /// This executable's `expert-node` subcommand.
    pub fn this_executable() -> Result<LaunchOptions, DistributedError> {
        let program = std::env::current_exe()
            .map_err(|e| DistributedError::Launch(format!("finding this executable: {e}")))?;
        Ok(LaunchOptions {
            program,
            program_args: vec!["expert-node".into()],
            threads_per_node: 0,
            start_timeout: DEFAULT_START_TIMEOUT,
            numa: Vec::new(),
            model_per_node: Vec::new(),
        })
    }
}

/// Node processes (or in-process nodes) started for one run; stopped on drop (SIGTERM,
/// then SIGKILL after 5 s).
pub struct LocalNodes {
    children: Vec<(String, Child)>,
    /// The nodes' stdin pipes: closed when this is dropped (or the process dies), which
    /// stops nodes started with `--exit-on-stdin-close`.
    stdins: Vec<Option<std::process::ChildStdin>>,
    /// How each node process was started, and where it listens (for [`LocalNodes::restart`]).
    specs: Vec<NodeSpec>,
    start_timeout: Duration,
    _dir: tempfile::TempDir,
}

/// A node process's command line without `--listen`, and the address it got.
struct NodeSpec {
    program: PathBuf,
    args: Vec<std::ffi::OsString>,
    addr: Option<SocketAddr>,
}

impl LocalNodes {
    /// The process ids of the node processes, in plan order (empty for inproc).
    pub fn pids(&self) -> Vec<u32> {
        self.children.iter().map(|(_, c)| c.id()).collect()
    }

    /// Kills node `index` at once (SIGKILL), as a crash would (for tests of failure handling).
    pub fn kill(&mut self, index: usize) {
        if let Some((name, child)) = self.children.get_mut(index) {
            warn!(node = %name, "killing node");
            let _ = child.kill();
            let _ = child.wait();
        }
        if let Some(stdin) = self.stdins.get_mut(index) {
            stdin.take();
        }
    }

    /// Starts node `index` again on the address it had (after [`LocalNodes::kill`], or after
    /// it died), as a supervisor such as systemd would; the coordinator's prober finds it,
    /// re-verifies it and uses it again. Stops the old process first if it still runs.
    pub fn restart(&mut self, index: usize) -> Result<(), DistributedError> {
        let (Some((name, old)), Some(spec)) = (self.children.get_mut(index), self.specs.get(index))
        else {
            return Err(launch_err(format!("no node process {index} to restart")));
        };
        let name = name.clone();
        let addr = spec
            .addr
            .ok_or_else(|| launch_err(format!("node {name} never listened")))?;
        if matches!(old.try_wait(), Ok(None)) {
            let _ = old.kill();
            let _ = old.wait();
        }
        let (child, stdin, rx) = spawn_node(&name, spec, &addr.to_string())?;
        self.children[index].1 = child;
        self.stdins[index] = stdin;
        let got = wait_listening(&name, &mut self.children[index].1, &rx, self.start_timeout)?;
        info!(node = %name, %got, "node restarted");
        Ok(())
    }
}

/// Starts one node process listening on `listen`: the child, its stdin pipe, and a channel
/// that gets the first line it prints (its address).
fn spawn_node(
    name: &str,
    spec: &NodeSpec,
    listen: &str,
) -> Result<
    (
        Child,
        Option<std::process::ChildStdin>,
        mpsc::Receiver<String>,
    ),
    DistributedError,
> {
    let mut child = Command::new(&spec.program)
        .args(&spec.args)
        .args(["--listen", listen])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| {
            launch_err(format!(
                "starting node {name} ({}): {e}",
                spec.program.display()
            ))
        })?;
    let stdout = child.stdout.take();
    let stdin = child.stdin.take();
    let (tx, rx) = mpsc::channel();
    if let Some(out) = stdout {
        std::thread::spawn(move || {
            let mut lines = BufReader::new(out).lines();
            if let Some(Ok(line)) = lines.next() {
                let _ = tx.send(line);
            }
            // Keep draining so the node never blocks on a full pipe.
            for _ in lines {}
        });
    }
    Ok((child, stdin, rx))
}

/// Waits for a node's ready line and returns the address in it.
fn wait_listening(
    name: &str,
    child: &mut Child,
    rx: &mpsc::Receiver<String>,
    timeout: Duration,
) -> Result<SocketAddr, DistributedError> {
    let deadline = Instant::now() + timeout;
    let line = loop {
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(line) => break line,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                if let Ok(Some(status)) = child.try_wait() {
                    return Err(launch_err(format!(
                        "node {name} exited ({status}) before listening; see its log above"
                    )));
                }
                if Instant::now() >= deadline {
                    return Err(launch_err(format!(
                        "node {name} did not listen within {timeout:?}"
                    )));
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                let status = child.wait().ok();
                return Err(launch_err(format!(
                    "node {name} exited ({status:?}) before listening; see its log above"
                )));
            }
        }
    };
    parse_ready_line(&line).ok_or_else(|| {
        launch_err(format!(
            "node {name} printed \"{line}\" instead of its address"
        ))
    })
}

impl Drop for LocalNodes {
    fn drop(&mut self) {
        self.stdins.clear();
        for (_, child) in &mut self.children {
            if !matches!(child.try_wait(), Ok(None)) {
                continue;
            }
            // SAFETY: kill(2) on a pid we spawned and have not reaped yet.
            unsafe {
                libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
            }
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        for (name, child) in &mut self.children {
            loop {
                match child.try_wait() {
                    Ok(Some(_)) | Err(_) => break,
                    Ok(None) if Instant::now() >= deadline => {
                        warn!(node = %name, "node did not stop on SIGTERM; killing it");
                        let _ = child.kill();
                        let _ = child.wait();
                        break;
                    }
                    Ok(None) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        }
    }
}

fn launch_err(detail: String) -> DistributedError {
    DistributedError::Launch(detail)
}

/// Starts the nodes of `plan` for `model` and connects to them; handles in plan order.
pub fn launch(
    runtime: &tokio::runtime::Runtime,
    model: &Path,
    plan: &Plan,
    resolved: &ResolvedPlan,
    transport: TransportKind,
    options: &LaunchOptions,
) -> Result<(LocalNodes, Vec<NodeHandle>), DistributedError> {
    let dir = tempfile::Builder::new()
        .prefix("moeshard-nodes-")
        .tempdir()
        .map_err(|e| launch_err(format!("creating a temporary directory: {e}")))?;
    let n = resolved.nodes().len();
    let cores = std::thread::available_parallelism().map_or(1, |c| c.get());
    let threads = match options.threads_per_node {
        0 => (cores / n).max(1),
        t => t,
    };

    if transport == TransportKind::Inproc {
        let mut handles = Vec::with_capacity(n);
        for (i, name) in resolved.nodes().iter().enumerate() {
            let slices = resolved.node_slices(i);
            let weights = NodeWeights::open(model, Some(&slices))
                .map_err(|e| launch_err(format!("node {name}: {e}")))?;
            let core = NodeCore::new(name, weights, threads, None)
                .map_err(|e| launch_err(format!("node {name}: {e}")))?;
            let link: Arc<dyn NodeLink> = Arc::new(InprocLink::new(name, Arc::new(core)));
            handles.push(NodeHandle {
                name: name.clone(),
                link,
                reconnect: None,
            });
        }
        info!(nodes = n, threads, "in-process nodes ready");
        return Ok((
            LocalNodes {
                children: Vec::new(),
                stdins: Vec::new(),
                specs: Vec::new(),
                start_timeout: options.start_timeout,
                _dir: dir,
            },
            handles,
        ));
    }

    let plan_path = dir.path().join("plan.toml");
    plan.save(&plan_path)
        .map_err(|e| launch_err(format!("writing the plan: {e}")))?;
    let mut nodes = LocalNodes {
        children: Vec::new(),
        stdins: Vec::new(),
        specs: Vec::new(),
        start_timeout: options.start_timeout,
        _dir: dir,
    };
    // QUIC: the run's CA, its certificate for the nodes, and the coordinator's side.
    let loopback_tls = match transport {
        TransportKind::Quic => Some(loopback_pki(nodes._dir.path())?),
        _ => None,
    };
    let mut started = Vec::with_capacity(n);
    for (i, name) in resolved.nodes().iter().enumerate() {
        let numa = options.numa.get(i);
        let node_model = options
            .model_per_node
            .get(i)
            .map_or(model, PathBuf::as_path);
        let node_threads = numa.map_or(threads, |p| p.threads.max(1));
        let mut args: Vec<std::ffi::OsString> =
            options.program_args.iter().map(Into::into).collect();
        let mut arg = |a: &dyn AsRef<std::ffi::OsStr>| args.push(a.as_ref().to_owned());
        arg(&"--model");
        arg(&node_model);
        arg(&"--transport");
        arg(&transport.to_string());
        arg(&"--plan");
        arg(&plan_path);
        arg(&"--node");
        arg(name);
        arg(&"--threads");
        arg(&node_threads.to_string());
        if let Some(p) = numa {
            arg(&"--numa-node");
            arg(&p.numa_node.to_string());
            if let Some(t) = &p.topology {
                arg(&"--topology");
                arg(t);
            }
        }
        // A node must not outlive its coordinator, even one killed with SIGKILL: it stops
        // when its stdin (held by LocalNodes) closes.
        arg(&"--exit-on-stdin-close");
        if let Some(pki) = &loopback_tls {
            let cert = nodes._dir.path().join(format!("{name}.cert.pem"));
            let key = nodes._dir.path().join(format!("{name}.key.pem"));
            pki.ca
                .issue(name, &loopback_names(), CertUse::Node, DEFAULT_CERT_DAYS)
                .and_then(|identity| identity.save(&cert, &key))
                .map_err(|e| launch_err(format!("node {name}: certificate: {e}")))?;
            arg(&"--tls-ca");
            arg(&pki.ca_path);
            arg(&"--tls-cert");
            arg(&cert);
            arg(&"--tls-key");
            arg(&key);
        }
        let spec = NodeSpec {
            program: options.program.clone(),
            args,
            addr: None,
        };
        let (child, stdin, rx) = spawn_node(name, &spec, "127.0.0.1:0")?;
        nodes.stdins.push(stdin);
        nodes.children.push((name.clone(), child));
        nodes.specs.push(spec);
        started.push((name.clone(), rx));
    }

    let mut handles = Vec::with_capacity(n);
    for (i, (name, rx)) in started.into_iter().enumerate() {
        let addr = wait_listening(&name, &mut nodes.children[i].1, &rx, options.start_timeout)?;
        nodes.specs[i].addr = Some(addr);
        let reconnect: Reconnect = match &loopback_tls {
            Some(pki) => reconnect_quic(addr, "localhost".into(), pki.client.clone()),
            None => reconnect_grpc(addr, None),
        };
        let link: Arc<dyn NodeLink> = runtime
            .block_on(reconnect())
            .map_err(|e| launch_err(format!("node {name}: {e}")))?;
        handles.push(NodeHandle {
            name: name.clone(),
            link,
            reconnect: Some(reconnect),
        });
    }
    info!(nodes = n, threads, %transport, "node processes ready");
    Ok((nodes, handles))
}

/// A loopback run's mutual TLS: its CA (certificate written to `ca_path`) and the
/// coordinator's side.
struct LoopbackPki {
    ca: CertAuthority,
    ca_path: PathBuf,
    client: ClientTls,
}

/// The names a loopback node's certificate carries.
fn loopback_names() -> [String; 2] {
    ["localhost".to_string(), "127.0.0.1".to_string()]
}

fn loopback_pki(dir: &Path) -> Result<LoopbackPki, DistributedError> {
    let fail = |e: proto::transport::TransportError| launch_err(format!("loopback TLS: {e}"));
    let ca = CertAuthority::generate("loopback", DEFAULT_CERT_DAYS).map_err(fail)?;
    let ca_path = dir.join("ca.pem");
    std::fs::write(&ca_path, ca.cert_pem())
        .map_err(|e| launch_err(format!("writing {}: {e}", ca_path.display())))?;
    let coordinator = ca
        .issue("coordinator", &[], CertUse::Coordinator, DEFAULT_CERT_DAYS)
        .map_err(fail)?;
    let client = ca.client_tls(coordinator).map_err(fail)?;
    Ok(LoopbackPki {
        ca,
        ca_path,
        client,
    })
}

/// The address in `moeshard-expert-node listening on grpc://127.0.0.1:PORT`.
fn parse_ready_line(line: &str) -> Option<SocketAddr> {
    let url = line.rsplit(' ').next()?;
    let (_, addr) = url.split_once("://")?;
    addr.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::parse_ready_line;

    #[test]
    fn ready_line() {
        assert_eq!(
            parse_ready_line("moeshard-expert-node listening on quic://127.0.0.1:4242"),
            Some("127.0.0.1:4242".parse().unwrap())
        );
        assert_eq!(parse_ready_line("starting"), None);
    }
}
