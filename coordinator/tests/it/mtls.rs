//! Mutual TLS end to end (docs/security.md): `moeshard certs init` and `certs issue` for a
//! 2-node cluster file, two `moeshard expert-node` daemons with `--tls-ca/--tls-cert/
//! --tls-key`, and `open_distributed` with the cluster file's `ca`, `client_cert` and
//! `client_key` giving the single-process engine's logits (within the regrouping tolerance
//! of a 2-node plan) and greedy tokens, over gRPC and QUIC. Strangers are refused: a client
//! without a certificate (logged by the node, which keeps serving), a coordinator whose
//! certificate another CA signed (refused before it connects), a cluster file trusting
//! another CA (the coordinator refuses the nodes).

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};

use coordinator::distributed::connect::{open_distributed, DistOptions};
use coordinator::engine::Engine;
use coordinator::sampler::{Sampler, SamplerConfig};
use proto::transport::{grpc, quic, ClientTls, TransportError, TransportKind};
use shared::gguf::GgufFile;
use shared::placement::{ModelShape, Plan};

use crate::support::{fixtures, ids, read_json};

const TOLERANCE: f32 = 1e-5;
const N_GREEDY: usize = 8;

fn moeshard(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_moeshard"))
        .args(args)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "moeshard {args:?}: {}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[cfg(unix)]
fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

/// A daemon and everything it wrote to stderr so far.
struct Daemon {
    child: Child,
    addr: String,
    log: Arc<Mutex<String>>,
}

impl Daemon {
    fn start(args: &[&str]) -> Daemon {
        let mut child = Command::new(env!("CARGO_BIN_EXE_moeshard"))
            .arg("expert-node")
            .args(args)
            .args(["--listen", "127.0.0.1:0", "--threads", "1"])
            .env("MOESHARD_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let log = Arc::new(Mutex::new(String::new()));
        let mut stderr = child.stderr.take().unwrap();
        let sink = Arc::clone(&log);
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = stderr.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addr = line
            .trim()
            .rsplit("://")
            .next()
            .filter(|a| a.parse::<std::net::SocketAddr>().is_ok())
            .unwrap_or_else(|| panic!("node said {line:?}, log: {}", log.lock().unwrap()))
            .to_owned();
        Daemon { child, addr, log }
    }

    /// Waits (a little: the node logs from its own thread) for `text` in its log.
    fn wait_for_log(&self, text: &str) -> String {
        let started = std::time::Instant::now();
        loop {
            let log = self.log.lock().unwrap().clone();
            if let Some(line) = log.lines().find(|l| l.contains(text)) {
                return line.to_string();
            }
            assert!(
                started.elapsed() < std::time::Duration::from_secs(10),
                "no {text:?} in the node's log:\n{log}"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    fn stop(mut self) {
        // SAFETY: SIGTERM to a process this test started and has not reaped.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        let status = self.child.wait().unwrap();
        assert!(status.success(), "node exited with {status} on SIGTERM");
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn max_abs(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn greedy(engine: &Engine, prompt: &[u32]) -> Vec<u32> {
    let mut sampler = Sampler::new(SamplerConfig::greedy());
    engine
        .generate(
            prompt,
            N_GREEDY,
            prompt.len() + N_GREEDY,
            &mut sampler,
            |_| true,
        )
        .unwrap()
        .0
}

/// The cluster file's text: `tls` is the top-level lines, then one node per address.
fn cluster_text(tls: &str, transport: TransportKind, addrs: &[&str]) -> String {
    let mut text = tls.to_string();
    for (i, addr) in addrs.iter().enumerate() {
        text += &format!(
            "\n[[node]]\nname = \"node{i}\"\naddress = \"{addr}\"\ntransport = \"{transport}\"\n"
        );
    }
    text
}

#[test]
fn certs_and_mutual_tls_nodes_give_the_single_process_logits() {
    let model = fixtures().join("mixtral/model-q4_k_m.gguf");
    let prompt = ids(&read_json(&fixtures().join("mixtral/reference.json"))["prompt_tokens"]);
    let single = Engine::open(&model).unwrap();
    let want = single.eval(&prompt).unwrap();
    let want_greedy = greedy(&single, &prompt);

    let tmp = tempfile::tempdir().unwrap();
    let certs = tmp.path().join("certs");
    let certs_s = certs.to_str().unwrap();

    // The CA, then certificates for the nodes of a cluster file (the ports do not matter:
    // certificates name hosts) and the coordinator.
    let said = moeshard(&["certs", "init", "--dir", certs_s, "--name", "test"]);
    assert!(said.contains("ca.key"), "{said}");
    let draft = tmp.path().join("draft.toml");
    std::fs::write(
        &draft,
        cluster_text("", TransportKind::Grpc, &["127.0.0.1:1", "127.0.0.1:2"]),
    )
    .unwrap();
    let said = moeshard(&[
        "certs",
        "issue",
        "--dir",
        certs_s,
        "--cluster",
        draft.to_str().unwrap(),
    ]);
    eprintln!("{said}");
    assert!(said.contains("client_cert = "), "{said}");
    for name in ["ca", "node0", "node1", "coordinator"] {
        assert!(certs.join(format!("{name}.pem")).exists(), "{name}.pem");
        #[cfg(unix)]
        assert_eq!(
            mode(&certs.join(format!("{name}.key"))),
            0o600,
            "{name}.key"
        );
    }
    // Another CA and its coordinator certificate: a stranger.
    let other = tmp.path().join("other");
    let other_s = other.to_str().unwrap();
    moeshard(&["certs", "init", "--dir", other_s, "--name", "other"]);
    moeshard(&[
        "certs",
        "issue",
        "--dir",
        other_s,
        "--coordinator",
        "coordinator",
    ]);

    // The nodes serve an even plan of 2 nodes.
    let shape = ModelShape::from_gguf(&GgufFile::open(&model).unwrap()).unwrap();
    let names = vec!["node0".to_owned(), "node1".to_owned()];
    let plan = tmp.path().join("plan.toml");
    Plan::even(&names, &shape, false).save(&plan).unwrap();

    let tls_lines = |dir: &Path, ca_dir: &Path| {
        format!(
            "ca = {:?}\nclient_cert = {:?}\nclient_key = {:?}\n",
            ca_dir.join("ca.pem"),
            dir.join("coordinator.pem"),
            dir.join("coordinator.key")
        )
    };
    let open = |cluster_file: &Path| {
        open_distributed(
            &model,
            &DistOptions {
                cluster: Some(cluster_file.to_path_buf()),
                plan: Some(plan.clone()),
                ..DistOptions::default()
            },
        )
    };

    for transport in [TransportKind::Grpc, TransportKind::Quic] {
        let daemons: Vec<Daemon> = names
            .iter()
            .map(|name| {
                let cert = certs.join(format!("{name}.pem"));
                let key = certs.join(format!("{name}.key"));
                Daemon::start(&[
                    "--model",
                    model.to_str().unwrap(),
                    "--plan",
                    plan.to_str().unwrap(),
                    "--node",
                    name,
                    "--transport",
                    transport.as_str(),
                    "--tls-ca",
                    certs.join("ca.pem").to_str().unwrap(),
                    "--tls-cert",
                    cert.to_str().unwrap(),
                    "--tls-key",
                    key.to_str().unwrap(),
                ])
            })
            .collect();
        let addrs: Vec<&str> = daemons.iter().map(|d| d.addr.as_str()).collect();

        // The right cluster file: the single-process answers.
        let cluster_file = tmp.path().join(format!("cluster-{transport}.toml"));
        std::fs::write(
            &cluster_file,
            cluster_text(&tls_lines(&certs, &certs), transport, &addrs),
        )
        .unwrap();
        let d = open(&cluster_file).unwrap_or_else(|e| panic!("{transport}: {e}"));
        let got = d.engine.eval(&prompt).unwrap();
        let diff = max_abs(&got, &want);
        eprintln!("{transport} with mutual TLS: max |Δ| vs single process = {diff:.2e}");
        assert!(diff <= TOLERANCE, "{transport}: max |Δ| {diff}");
        assert_eq!(greedy(&d.engine, &prompt), want_greedy, "{transport}");

        // A client without a certificate: refused at connect, logged by the node.
        let ca_pem = std::fs::read_to_string(certs.join("ca.pem")).unwrap();
        let addr = addrs[0].parse().unwrap();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let err: TransportError = runtime.block_on(async {
            let tls = ClientTls::trusting(ca_pem.clone());
            match transport {
                TransportKind::Grpc => grpc::connect_tls(addr, "127.0.0.1", &tls).await.map(drop),
                _ => quic::connect_tls(addr, "127.0.0.1", &tls).await.map(drop),
            }
            .expect_err("a client without a certificate is refused")
        });
        eprintln!("{transport}, no client certificate: {err}");
        assert!(matches!(err, TransportError::Tls { .. }), "{err}");
        let line = daemons[0].wait_for_log("refused a client");
        eprintln!("{transport}, node0's log: {line}");
        assert!(line.contains("WARN"), "{line}");

        // The node kept serving its coordinator.
        assert_eq!(
            d.engine.eval(&prompt).unwrap(),
            got,
            "{transport}: after a refusal"
        );
        drop(d);

        // A coordinator whose certificate another CA signed.
        let stranger = tmp.path().join(format!("stranger-{transport}.toml"));
        std::fs::write(
            &stranger,
            cluster_text(&tls_lines(&other, &certs), transport, &addrs),
        )
        .unwrap();
        let err = open(&stranger)
            .err()
            .expect("a stranger coordinator")
            .to_string();
        eprintln!("{transport}, another CA's coordinator: {err}");
        assert!(err.contains("not signed by the cluster CA"), "{err}");

        // A coordinator trusting another CA refuses the nodes (their certificates are
        // not signed by it), naming the node.
        let distrust = tmp.path().join(format!("distrust-{transport}.toml"));
        std::fs::write(
            &distrust,
            cluster_text(&tls_lines(&other, &other), transport, &addrs),
        )
        .unwrap();
        let err = open(&distrust)
            .err()
            .expect("nodes of another CA")
            .to_string();
        eprintln!("{transport}, nodes of another CA: {err}");
        assert!(
            err.contains("node0") && err.contains("refused the node's certificate"),
            "{err}"
        );

        for daemon in daemons {
            daemon.stop();
        }
    }
}

/// `--tls-ca` with a certificate another CA signed: the node refuses to start, saying why.
#[test]
fn node_refuses_a_certificate_its_ca_did_not_sign() {
    let tmp = tempfile::tempdir().unwrap();
    let (ours, theirs) = (tmp.path().join("ours"), tmp.path().join("theirs"));
    for dir in [&ours, &theirs] {
        let dir = dir.to_str().unwrap();
        moeshard(&["certs", "init", "--dir", dir]);
        moeshard(&[
            "certs",
            "issue",
            "--dir",
            dir,
            "--node",
            "node0",
            "--san",
            "127.0.0.1",
        ]);
    }
    let model: PathBuf = fixtures().join("mixtral/model-q4_k_m.gguf");
    let out = Command::new(env!("CARGO_BIN_EXE_moeshard"))
        .args([
            "expert-node",
            "--model",
            model.to_str().unwrap(),
            "--experts",
            "0-7",
        ])
        .args(["--listen", "127.0.0.1:0", "--transport", "grpc", "--tls-ca"])
        .arg(ours.join("ca.pem"))
        .arg("--tls-cert")
        .arg(theirs.join("node0.pem"))
        .arg("--tls-key")
        .arg(theirs.join("node0.key"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "started: {stderr}");
    assert!(stderr.contains("not signed by the cluster CA"), "{stderr}");
}
