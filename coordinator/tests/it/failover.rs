//! Failover: a node that dies mid-generation is routed around when every expert it held
//! has a live replica (same greedy output), its absence is a clear error when not, and a
//! node that comes back on its address is re-verified and reused.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use coordinator::distributed::connect::{open_distributed, DistOptions, DistributedEngine};
use coordinator::distributed::PROBE_INTERVAL;
use coordinator::distributed::{DeadlinePolicy, ReplicaChoice};
use coordinator::engine::Engine;
use coordinator::sampler::{Sampler, SamplerConfig};
use proto::transport::TransportKind;
use shared::gguf::GgufFile;
use shared::placement::ModelShape;

use crate::distributed::{options, spawn_node, stop};
use crate::support::{fixtures, ids, read_json};

const N_GREEDY: usize = 16;

/// A plan with every expert of every MoE layer on two of three nodes.
fn two_of_three_plan(model: &Path, dir: &Path) -> PathBuf {
    let shape = ModelShape::from_gguf(&GgufFile::open(model).unwrap()).unwrap();
    let layers: Vec<String> = (0..shape.n_layer)
        .filter(|&l| shape.layers[l].routed.is_some())
        .map(|l| l.to_string())
        .collect();
    let layers = layers.join(",");
    let e = shape.n_expert;
    let cuts = [0, e / 3, 2 * e / 3, e];
    let pairs = [("node0", "node1"), ("node1", "node2"), ("node2", "node0")];
    let mut text = "version = 1\nnodes = [\"node0\", \"node1\", \"node2\"]\n".to_owned();
    for (i, (a, b)) in pairs.iter().enumerate() {
        text += &format!(
            "[[place]]\npart = \"routed\"\nlayers = \"{layers}\"\nexperts = \"{}-{}\"\nnodes = [\"{a}\", \"{b}\"]\n",
            cuts[i],
            cuts[i + 1] - 1
        );
    }
    let path = dir.join("two-of-three.toml");
    std::fs::write(&path, text).unwrap();
    path
}

fn greedy_killing(d: DistributedEngine, prompt: &[u32], kill_after: usize) -> Vec<u32> {
    let DistributedEngine {
        engine,
        mut local_nodes,
    } = d;
    let mut sampler = Sampler::new(SamplerConfig::greedy());
    let mut n = 0;
    let tokens = engine
        .generate(
            prompt,
            N_GREEDY,
            prompt.len() + N_GREEDY,
            &mut sampler,
            |_| {
                n += 1;
                if n == kill_after {
                    local_nodes.as_mut().unwrap().kill(1);
                }
                true
            },
        )
        .unwrap()
        .0;
    // The failure was seen (node1 is down) and the experts are still all covered.
    let health = engine.experts().node_health();
    assert!(!health[1].1, "node1 should be down: {health:?}");
    assert!(engine.experts().ready().is_ok());
    tokens
}

/// kill -9 of one of three nodes mid-generation, every expert on two nodes: the greedy
/// continuation is the undisturbed one, on both transports; the step that saw the failure
/// re-sent the dead node's work to replicas, later steps routed around it.
#[test]
fn a_killed_node_with_replicas_changes_no_greedy_token() {
    let tmp = tempfile::tempdir().unwrap();
    for arch in ["qwen3moe", "deepseek2"] {
        let dir = fixtures().join(arch);
        let model = dir.join("model-q4_k_m.gguf");
        let prompt = ids(&read_json(&dir.join("reference.json"))["prompt_tokens"]);
        let single = Engine::open(&model).unwrap();
        let mut sampler = Sampler::new(SamplerConfig::greedy());
        let want = single
            .generate(
                &prompt,
                N_GREEDY,
                prompt.len() + N_GREEDY,
                &mut sampler,
                |_| true,
            )
            .unwrap()
            .0;
        let plan = two_of_three_plan(&model, tmp.path());
        // With `--replica-choice load` the replica serving a slice is not always the
        // layer's default one: the retry must re-send what node1 actually served.
        for (transport, choice) in [
            (TransportKind::Grpc, ReplicaChoice::Layer),
            (TransportKind::Quic, ReplicaChoice::Layer),
            (TransportKind::Grpc, ReplicaChoice::Load),
        ] {
            let opts = DistOptions {
                plan: Some(plan.clone()),
                deadline: DeadlinePolicy::Fixed(Duration::from_secs(3)),
                replica_choice: choice,
                ..options(3, transport)
            };
            let d = open_distributed(&model, &opts).unwrap();
            let got = greedy_killing(d, &prompt, 5);
            assert_eq!(
                got, want,
                "{arch} {transport} {choice:?}: greedy tokens with node1 killed"
            );
        }
    }
}

/// Without a replica the step fails with an error naming the dead node and the experts
/// left without one, within the deadline.
#[test]
fn a_killed_node_without_replicas_is_a_clear_error() {
    let model = fixtures().join("mixtral/model-q8_0.gguf");
    let prompt = ids(&read_json(&fixtures().join("mixtral/reference.json"))["prompt_tokens"]);
    let deadline = Duration::from_secs(2);
    let mut d = open_distributed(
        &model,
        &DistOptions {
            deadline: DeadlinePolicy::Fixed(deadline),
            ..options(2, TransportKind::Grpc)
        },
    )
    .unwrap();
    d.engine.eval(&prompt).unwrap();
    d.local_nodes.as_mut().unwrap().kill(1);
    let t0 = Instant::now();
    let err = match d.engine.eval(&prompt) {
        Ok(_) => panic!("evaluation succeeded without node1"),
        Err(e) => e.to_string(),
    };
    assert!(t0.elapsed() <= deadline + Duration::from_millis(500));
    assert!(
        err.contains("node1") && err.contains("no live replica"),
        "{err}"
    );
    assert!(d.engine.experts().ready().is_err());
    let health = d.engine.experts().node_health();
    assert_eq!(
        health,
        vec![("node0".into(), true), ("node1".into(), false)]
    );
}

/// A node that dies and comes back on the same address is probed, re-verified and used
/// again, without restarting the coordinator.
#[test]
fn a_node_that_comes_back_is_reused() {
    let dir = fixtures().join("qwen3moe");
    let model = dir.join("model-q8_0.gguf");
    let prompt = ids(&read_json(&dir.join("reference.json"))["prompt_tokens"]);
    let tmp = tempfile::tempdir().unwrap();
    let m = model.to_str().unwrap();
    let (mut a, addr_a) = spawn_node(&["--model", m, "--experts", "0-3", "--node", "node0"]);
    let (mut b, addr_b) = spawn_node(&["--model", m, "--experts", "4-7", "--node", "node1"]);
    let cluster = tmp.path().join("cluster.toml");
    std::fs::write(
        &cluster,
        format!(
            "[[node]]\nname = \"node0\"\naddress = \"{addr_a}\"\ntransport = \"grpc\"\n\
             [[node]]\nname = \"node1\"\naddress = \"{addr_b}\"\ntransport = \"grpc\"\n"
        ),
    )
    .unwrap();
    let d = open_distributed(
        &model,
        &DistOptions {
            cluster: Some(cluster),
            deadline: DeadlinePolicy::Fixed(Duration::from_secs(2)),
            ..DistOptions::default()
        },
    )
    .unwrap();
    let want = d.engine.eval(&prompt).unwrap();

    stop(&mut b);
    assert!(d.engine.eval(&prompt).is_err(), "node1 is gone");
    assert!(d.engine.experts().ready().is_err());

    let (mut b2, addr_b2) = spawn_node_at(m, "4-7", "node1", &addr_b);
    assert_eq!(addr_b2, addr_b);
    let t0 = Instant::now();
    while d.engine.experts().ready().is_err() {
        assert!(
            t0.elapsed() < PROBE_INTERVAL * 5,
            "node1 was not reused within {:?}",
            PROBE_INTERVAL * 5
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let got = d.engine.eval(&prompt).unwrap();
    assert!(
        got.iter()
            .zip(&want)
            .all(|(x, y)| x.to_bits() == y.to_bits()),
        "after the rejoin the same plan gives the same bits"
    );
    drop(d);
    stop(&mut a);
    stop(&mut b2);
}

fn spawn_node_at(
    model: &str,
    experts: &str,
    name: &str,
    addr: &str,
) -> (std::process::Child, String) {
    // The port was just freed by the previous node: retry briefly if it is still held.
    for _ in 0..20 {
        let (mut child, got) = spawn_node_listening(model, experts, name, addr);
        if !got.is_empty() {
            return (child, got);
        }
        let _ = child.wait();
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("could not listen on {addr} again");
}

fn spawn_node_listening(
    model: &str,
    experts: &str,
    name: &str,
    addr: &str,
) -> (std::process::Child, String) {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};
    let mut child = Command::new(env!("CARGO_BIN_EXE_moeshard"))
        .args([
            "expert-node",
            "--model",
            model,
            "--experts",
            experts,
            "--node",
            name,
        ])
        .args(["--listen", addr, "--transport", "grpc", "--threads", "1"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    let _ = BufReader::new(child.stdout.take().unwrap()).read_line(&mut line);
    let got = line.trim().rsplit("://").next().unwrap_or("").to_owned();
    let got = if line.trim().is_empty() {
        String::new()
    } else {
        got
    };
    (child, got)
}

/// `--degraded`: with node1 (experts 4-7) dead and no replica, steps go on without its
/// experts — finite logits that differ from the whole model's, every dropped (token,
/// expert) counted — where the default fails the step.
#[test]
fn degraded_mode_drops_experts_without_a_live_node() {
    let model = fixtures().join("mixtral/model-q8_0.gguf");
    let prompt = ids(&read_json(&fixtures().join("mixtral/reference.json"))["prompt_tokens"]);
    let mut d = open_distributed(
        &model,
        &DistOptions {
            deadline: DeadlinePolicy::Fixed(Duration::from_secs(2)),
            degraded: true,
            ..options(2, TransportKind::Grpc)
        },
    )
    .unwrap();
    let whole = d.engine.eval(&prompt).unwrap();
    let metrics = || d.engine.experts().dispatch_metrics().unwrap();
    assert!(metrics().degraded_mode);
    assert_eq!(metrics().dropped_assignments, 0);
    d.local_nodes.as_mut().unwrap().kill(1);
    let degraded = d.engine.eval(&prompt).unwrap();
    assert!(degraded.iter().all(|v| v.is_finite()));
    let max_diff = whole
        .iter()
        .zip(&degraded)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(max_diff > 1e-3, "dropping experts 4-7 changed nothing");
    let dropped = metrics().dropped_assignments;
    assert!(dropped > 0);
    // The next step routes around node1 from the start, and counts again.
    d.engine.eval(&prompt[..4]).unwrap();
    assert!(metrics().dropped_assignments > dropped);
    assert!(d.engine.experts().ready().is_err());
}

/// The measured deadline: dispatch times are recorded per node, and a one-token
/// dispatch's deadline comes down from the initial 30 s to the floor once measured.
#[test]
fn measured_deadline_comes_from_the_nodes_answers() {
    let dir = fixtures().join("qwen3moe");
    let model = dir.join("model-q8_0.gguf");
    let prompt = ids(&read_json(&dir.join("reference.json"))["prompt_tokens"]);
    let policy = DeadlinePolicy::Measured {
        factor: 10.0,
        floor: Duration::from_millis(500),
        initial: Duration::from_secs(30),
    };
    let d = open_distributed(
        &model,
        &DistOptions {
            deadline: policy,
            ..options(2, TransportKind::Grpc)
        },
    )
    .unwrap();
    let before = d.engine.experts().dispatch_metrics().unwrap();
    assert!(before
        .decode_deadline
        .iter()
        .all(|(_, t)| *t == Duration::from_secs(30)));
    let mut sampler = Sampler::new(SamplerConfig::greedy());
    d.engine
        .generate(&prompt, 8, prompt.len() + 8, &mut sampler, |_| true)
        .unwrap();
    let after = d.engine.experts().dispatch_metrics().unwrap();
    for ((name, t), (_, h)) in after.decode_deadline.iter().zip(&after.latency) {
        assert!(h.count > 0, "{name}: no dispatch recorded");
        assert!(
            *t >= Duration::from_millis(500) && *t < Duration::from_secs(5),
            "{name}: deadline {t:?} after {} dispatches",
            h.count
        );
    }
}

/// A killed QUIC node sends nothing (no reset, unlike TCP): the default measured deadline
/// notices it within its 2 s floor during decode, where the old fixed default waited 30 s.
#[test]
fn a_killed_quic_node_is_noticed_within_the_measured_deadline() {
    let model = fixtures().join("mixtral/model-q8_0.gguf");
    let prompt = ids(&read_json(&fixtures().join("mixtral/reference.json"))["prompt_tokens"]);
    let mut d = open_distributed(&model, &options(2, TransportKind::Quic)).unwrap();
    for _ in 0..3 {
        d.engine.eval(&prompt[..2]).unwrap();
    }
    let deadlines = d
        .engine
        .experts()
        .dispatch_metrics()
        .unwrap()
        .decode_deadline;
    assert!(
        deadlines.iter().all(|(_, t)| *t == Duration::from_secs(2)),
        "{deadlines:?}"
    );
    d.local_nodes.as_mut().unwrap().kill(1);
    let t0 = Instant::now();
    let err = match d.engine.eval(&prompt[..1]) {
        Ok(_) => panic!("evaluation succeeded without node1"),
        Err(e) => e.to_string(),
    };
    let took = t0.elapsed();
    eprintln!("noticed after {took:?}: {err}");
    assert!(took < Duration::from_millis(3500), "{took:?}");
    assert!(err.contains("node1"), "{err}");
}
