//! Expert-node daemons as child processes: started with a plan (or `--experts`), on
//! loopback or inside a network namespace, their address read from the ready line, their
//! log in a file; signals for stalls (SIGSTOP/SIGCONT) and crashes (SIGKILL); killed and
//! reaped on drop, even when the test fails.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// How long a node may take to load and listen.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// The link a node serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    Grpc,
    Quic,
}

impl Transport {
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Grpc => "grpc",
            Transport::Quic => "quic",
        }
    }
}

impl std::fmt::Display for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The program that runs a node, and the arguments before the node's own (for the
/// `moeshard` binary: `expert-node`).
#[derive(Clone, Debug)]
pub struct NodeProgram {
    pub path: PathBuf,
    pub args: Vec<String>,
}

/// How to start one node.
#[derive(Clone, Debug)]
pub struct NodeSpec {
    pub program: NodeProgram,
    pub name: String,
    pub model: PathBuf,
    /// `--plan FILE --node NAME`; without it, `experts` must be set.
    pub plan: Option<PathBuf>,
    /// `--experts RANGES` (whole experts of every MoE layer).
    pub experts: Option<String>,
    pub transport: Transport,
    /// Where to listen (port 0: a free one).
    pub listen: SocketAddr,
    /// Where its certificate, key and log go.
    pub dir: PathBuf,
    /// A command the node runs under (`ip netns exec NS`), or empty.
    pub wrapper: Vec<String>,
    pub threads: usize,
}

/// A running node process.
pub struct NodeProcess {
    pub name: String,
    pub transport: Transport,
    /// The address it listens on.
    pub addr: SocketAddr,
    /// The certificate a QUIC client must trust.
    pub cert: Option<PathBuf>,
    log: PathBuf,
    child: Child,
    /// Held so that `--exit-on-stdin-close` stops the node if the test process dies.
    _stdin: Option<ChildStdin>,
}

impl NodeProcess {
    /// Starts the node and waits until it listens.
    pub fn spawn(spec: &NodeSpec) -> Result<NodeProcess, String> {
        let log = spec.dir.join(format!("{}.log", spec.name));
        let log_file =
            File::create(&log).map_err(|e| format!("creating {}: {e}", log.display()))?;
        let (program, mut args): (&Path, Vec<String>) = match spec.wrapper.split_first() {
            Some((first, rest)) => {
                let mut args = rest.to_vec();
                args.push(spec.program.path.display().to_string());
                (Path::new(first), args)
            }
            None => (&spec.program.path, Vec::new()),
        };
        args.extend(spec.program.args.iter().cloned());
        let mut cmd = Command::new(program);
        cmd.args(&args)
            .arg("--model")
            .arg(&spec.model)
            .arg("--node")
            .arg(&spec.name)
            .arg("--listen")
            .arg(spec.listen.to_string())
            .arg("--transport")
            .arg(spec.transport.as_str())
            .arg("--threads")
            .arg(spec.threads.to_string())
            .arg("--exit-on-stdin-close");
        match (&spec.plan, &spec.experts) {
            (Some(plan), _) => {
                cmd.arg("--plan").arg(plan);
            }
            (None, Some(experts)) => {
                cmd.arg("--experts").arg(experts);
            }
            (None, None) => return Err("a node needs a plan or --experts".into()),
        }
        let mut cert = None;
        if spec.transport == Transport::Quic {
            let c = spec.dir.join(format!("{}.cert.pem", spec.name));
            let k = spec.dir.join(format!("{}.key.pem", spec.name));
            cmd.arg("--tls-cert").arg(&c).arg("--tls-key").arg(&k);
            cert = Some(c);
        }
        if std::env::var_os("RUST_LOG").is_none() {
            cmd.env("RUST_LOG", "info");
        }
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log_file));
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("starting {}: {e}", program.display()))?;
        let stdin = child.stdin.take();
        let stdout = child.stdout.take();
        let (tx, rx) = mpsc::channel();
        if let Some(out) = stdout {
            std::thread::spawn(move || {
                let mut lines = BufReader::new(out).lines();
                if let Some(Ok(line)) = lines.next() {
                    let _ = tx.send(line);
                }
                for _ in lines {}
            });
        }
        let mut node = NodeProcess {
            name: spec.name.clone(),
            transport: spec.transport,
            addr: SocketAddr::from(([0, 0, 0, 0], 0)),
            cert,
            log,
            child,
            _stdin: stdin,
        };
        let line = match rx.recv_timeout(START_TIMEOUT) {
            Ok(line) => line,
            Err(_) => {
                let status = node.child.try_wait().ok().flatten();
                return Err(format!(
                    "node {} did not listen within {START_TIMEOUT:?} (exit status {status:?}); \
                     its log:\n{}",
                    spec.name,
                    node.log()
                ));
            }
        };
        node.addr = line
            .rsplit("://")
            .next()
            .and_then(|a| a.trim().parse().ok())
            .ok_or_else(|| format!("node {} printed {line:?} instead of its address", spec.name))?;
        Ok(node)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends `signal` to the node process.
    pub fn signal(&self, signal: libc::c_int) {
        // SAFETY: kill(2) on the pid of a child this handle owns and has not reaped (it is
        // reaped only in `kill` and on drop, which take `&mut self`).
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, signal);
        }
    }

    /// Freezes the process (SIGSTOP): it keeps its sockets but answers nothing.
    pub fn pause(&self) {
        self.signal(libc::SIGSTOP);
    }

    /// Lets a paused process run again (SIGCONT).
    pub fn resume(&self) {
        self.signal(libc::SIGCONT);
    }

    /// Sends SIGCONT after `delay`, from a thread of its own (while the test thread is
    /// blocked in a generation that waits on this node).
    pub fn resume_after(&self, delay: Duration) -> std::thread::JoinHandle<()> {
        let pid = self.child.id() as libc::pid_t;
        std::thread::spawn(move || {
            std::thread::sleep(delay);
            // SAFETY: kill(2) on a child of this process that the test keeps alive (its
            // handle outlives this thread: tests join it before dropping the node).
            unsafe {
                libc::kill(pid, libc::SIGCONT);
            }
        })
    }

    /// SIGKILL, as a crash: the kernel closes its sockets; waits until it is gone.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// The node's log (stderr) so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// This node's `[[node]]` entry of a cluster file, at `address` (its own unless given:
    /// a proxy's).
    pub fn cluster_entry(&self, address: Option<SocketAddr>) -> String {
        let address = address.unwrap_or(self.addr);
        let mut entry = format!(
            "[[node]]\nname = \"{}\"\naddress = \"{address}\"\ntransport = \"{}\"\n",
            self.name, self.transport
        );
        if let Some(cert) = &self.cert {
            entry += &format!(
                "cert = \"{}\"\nserver_name = \"localhost\"\n",
                cert.display()
            );
        }
        entry
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        // SIGKILL also ends a stopped (SIGSTOP) process.
        self.kill();
    }
}
