//! `--numa-node`: a running `moeshard-expert-node` binds its weight mappings to the node
//! (`bind:N` in `/proc/PID/numa_maps`: the call is made; where the pages land can only be
//! seen on a machine with several nodes), runs its compute and I/O threads on the node's
//! units, reports the node in its inventory, and still stops cleanly on SIGTERM. With a
//! synthetic topology naming units and nodes this machine lacks, binding fails: it warns and
//! serves anyway.

use std::collections::BTreeSet;
use std::fs::{self, File};
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use proto::transport::{grpc, NodeLink};
use proto::wire;
use shared::topology::Topology;

const MODEL: &str = "qwen3moe/model-q8_0.gguf";
const TWO_PACKAGES: &str = "synthetic:pack:2 numa:1 core:4 pu:1";

fn fixture(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures")
        .join(rel)
}

/// A running node; killed if a test fails before stopping it.
struct Node {
    child: Child,
    addr: SocketAddr,
    stderr: PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Node {
    fn start(extra: &[&str]) -> Node {
        let dir = tempfile::tempdir().unwrap();
        let stderr = dir.path().join("stderr.log");
        let model = fixture(MODEL);
        let mut child = Command::new(env!("CARGO_BIN_EXE_moeshard-expert-node"))
            .args(["--experts", "0-7", "--listen", "127.0.0.1:0", "--model"])
            .arg(&model)
            .args(extra)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(File::create(&stderr).unwrap())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let Some(addr) = line
            .trim()
            .strip_prefix("moeshard-expert-node listening on grpc://")
        else {
            let _ = child.kill();
            panic!(
                "no address on stdout ({line:?}); stderr:\n{}",
                fs::read_to_string(&stderr).unwrap_or_default()
            );
        };
        Node {
            addr: addr.parse().unwrap(),
            child,
            stderr,
            _dir: dir,
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The log (stderr) once it has all of `wants`, or after 10 s (threads log as they
    /// start).
    fn log_with(&self, wants: &[&str]) -> String {
        let t0 = Instant::now();
        loop {
            let log = fs::read_to_string(&self.stderr).unwrap();
            if wants.iter().all(|w| log.contains(w)) || t0.elapsed() > Duration::from_secs(10) {
                return log;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The inventory's `numa_node`, from a hello over gRPC.
    fn inventory_numa_node(&self) -> Option<u32> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let link = grpc::connect(self.addr).await.unwrap();
            let hello = wire::CoordinatorMessage {
                body: Some(wire::coordinator_message::Body::Hello(wire::Hello {
                    protocol_version: proto::PROTOCOL_VERSION,
                    // Any identity: the reply carries the inventory either way.
                    model_identity: vec![0; 32],
                    coordinator_name: "numa test".into(),
                })),
            };
            let reply = link.call(hello).await.unwrap();
            let Some(wire::node_message::Body::Hello(h)) = reply.body else {
                panic!("a hello reply expected, got {reply:?}");
            };
            h.inventory.unwrap().numa_node
        })
    }

    /// SIGTERM, then the exit status within 30 s.
    fn terminate(mut self) -> std::process::ExitStatus {
        let status = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill -TERM failed");
        let t0 = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "the node did not stop within 30 s of SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// The lines of `/proc/PID/numa_maps` for mappings of `file`.
fn numa_maps_of(pid: u32, file: &Path) -> Vec<String> {
    let file = fs::canonicalize(file).unwrap();
    let needle = format!("file={}", file.display());
    fs::read_to_string(format!("/proc/{pid}/numa_maps"))
        .unwrap()
        .lines()
        .filter(|l| l.split_whitespace().any(|w| w == needle))
        .map(str::to_owned)
        .collect()
}

/// `0-3,8` → {0, 1, 2, 3, 8}.
fn parse_list(text: &str) -> BTreeSet<u32> {
    let mut out = BTreeSet::new();
    for part in text.trim().split(',').filter(|p| !p.is_empty()) {
        let (a, b) = part.split_once('-').unwrap_or((part, part));
        out.extend(a.parse::<u32>().unwrap()..=b.parse::<u32>().unwrap());
    }
    out
}

/// (thread name, the units it may run on) for each thread of `pid`.
fn thread_cpus(pid: u32) -> Vec<(String, BTreeSet<u32>)> {
    let mut out = Vec::new();
    for task in fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let Ok(status) = fs::read_to_string(task.unwrap().path().join("status")) else {
            continue; // the thread ended
        };
        let field = |key: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .map(|v| v.trim().to_owned())
                .unwrap_or_default()
        };
        out.push((field("Name:"), parse_list(&field("Cpus_allowed_list:"))));
    }
    out.sort();
    out
}

/// The threads of `pid` once `ready` holds for them (threads name themselves, and bind
/// themselves, as they start: shortly after the node says it listens).
fn threads_when(
    pid: u32,
    ready: impl Fn(&[(String, BTreeSet<u32>)]) -> bool,
) -> Vec<(String, BTreeSet<u32>)> {
    let t0 = Instant::now();
    loop {
        let threads = thread_cpus(pid);
        if ready(&threads) || t0.elapsed() > Duration::from_secs(10) {
            return threads;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn count_named(threads: &[(String, BTreeSet<u32>)], prefix: &str) -> usize {
    threads
        .iter()
        .filter(|(n, _)| n.starts_with(prefix))
        .count()
}

#[test]
fn numa_node_0_binds_weights_and_threads_on_this_machine() {
    let topology = Topology::detect().unwrap();
    let node0: BTreeSet<u32> = topology
        .pin_for_numa_node(0)
        .unwrap()
        .pus
        .into_iter()
        .collect();
    // Prefaulted, so that numa_maps also counts the pages (`mapped=`, `N0=`).
    let node = Node::start(&["--numa-node", "0", "--prefault"]);

    let maps = numa_maps_of(node.pid(), &fixture(MODEL));
    for line in &maps {
        eprintln!("numa_maps: {line}");
    }
    assert!(!maps.is_empty(), "the model file is not mapped");
    for line in &maps {
        assert!(
            line.split_whitespace().nth(1) == Some("bind:0"),
            "a weight mapping without the bind:0 policy: {line}"
        );
    }

    // The pool has one thread per unit of node 0; tokio has 2 workers.
    let pinned = |threads: &[(String, BTreeSet<u32>)]| {
        count_named(threads, "expert-") == node0.len()
            && count_named(threads, "node-io") >= 2
            && (threads.iter())
                .filter(|(n, _)| n.starts_with("expert-") || n == "node-io")
                .all(|(_, cpus)| cpus == &node0)
    };
    let threads = threads_when(node.pid(), pinned);
    eprintln!("threads: {threads:?}");
    let compute: Vec<_> = (threads.iter())
        .filter(|(name, _)| name.starts_with("expert-"))
        .collect();
    assert_eq!(
        compute.len(),
        node0.len(),
        "one compute thread per unit of node 0"
    );
    for (name, cpus) in compute
        .iter()
        .copied()
        .chain(threads.iter().filter(|(name, _)| name == "node-io"))
    {
        assert_eq!(cpus, &node0, "{name} is not on node 0's units");
    }

    assert_eq!(node.inventory_numa_node(), Some(0));
    let wants = [
        "pinning to a NUMA node",
        "weights bound to the NUMA node's memory",
        "threads pinned threads=\"compute\"",
        "threads pinned threads=\"I/O\"",
    ];
    let log = node.log_with(&wants);
    for want in wants {
        assert!(log.contains(want), "{want:?} not logged:\n{log}");
    }
    let status = node.terminate();
    assert!(status.success(), "exit status {status}");
}

#[test]
fn numa_node_of_a_synthetic_topology_warns_and_serves() {
    // Node 1 of two packages: units 4-7 and memory node 1, which this machine lacks.
    let node = Node::start(&["--numa-node", "1", "--topology", TWO_PACKAGES]);
    assert_eq!(node.inventory_numa_node(), Some(1));
    let threads = threads_when(node.pid(), |t| count_named(t, "expert-") == 4);
    assert_eq!(
        count_named(&threads, "expert-"),
        4,
        "one compute thread per unit of the synthetic node: {threads:?}"
    );
    let wants = [
        "pus=4-7 topology=synthetic:pack:2 numa:1 core:4 pu:1",
        "cannot pin threads to the NUMA node's units",
        "cannot bind the weights' pages to the NUMA node",
    ];
    let log = node.log_with(&wants);
    for want in wants {
        assert!(log.contains(want), "{want:?} not logged:\n{log}");
    }
    let status = node.terminate();
    assert!(status.success(), "exit status {status}");
}

#[test]
fn numa_flags_that_name_nothing_are_errors() {
    for (args, want) in [
        (
            vec!["--numa-node", "0", "--topology", "pack:2"],
            "expected synthetic:<hwloc synthetic description>",
        ),
        (
            vec!["--numa-node", "7", "--topology", TWO_PACKAGES],
            "no NUMA node 7 with processing units (nodes: 0-1)",
        ),
        (vec!["--topology", TWO_PACKAGES], "--numa-node"),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_moeshard-expert-node"))
            .args(["--experts", "0-7", "--listen", "127.0.0.1:0", "--model"])
            .arg(fixture(MODEL))
            .args(&args)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} was accepted");
        assert!(out.stdout.is_empty(), "{args:?}: it listened");
        assert!(stderr.contains(want), "{args:?}: {want:?} not in\n{stderr}");
    }
}
