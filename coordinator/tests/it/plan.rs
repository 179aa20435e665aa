//! `moeshard plan` and `--record-routing` as a user runs them: statistics
//! recorded by `eval` and `generate` (single process and over in-process
//! nodes), a plan written for a fixture over a 2-node cluster that resolves and
//! generates the same tokens as the single-process engine, and the refusals.

use std::path::Path;
use std::process::{Command, Output};

use shared::gguf::{model_identity, GgufFile};
use shared::placement::routing_stats::RoutingStats;
use shared::placement::{ModelShape, Plan};

use crate::support::fixtures;

fn moeshard(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_moeshard"))
        .args(args)
        .output()
        .expect("running moeshard")
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "moeshard failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

fn cluster(dir: &Path, memory: u64) -> String {
    let path = dir.join("cluster.toml");
    std::fs::write(
        &path,
        format!(
            "[[node]]\nname = \"a\"\naddress = \"127.0.0.1:7001\"\ntransport = \"grpc\"\nmemory_bytes = {memory}\nread_bandwidth_gbs = 20.0\n\n\
             [[node]]\nname = \"b\"\naddress = \"127.0.0.1:7002\"\ntransport = \"grpc\"\nmemory_bytes = {memory}\n"
        ),
    )
    .unwrap();
    path.to_str().unwrap().to_owned()
}

fn load_stats(path: &Path) -> RoutingStats {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn plan_writes_a_plan_that_resolves_and_generates_the_same_tokens() {
    let model = fixtures().join("qwen3moe/model-q4_k_m.gguf");
    let m = model.to_str().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cluster = cluster(dir.path(), 1 << 30);

    // Routing recorded by eval: every token in every MoE layer, k picks each.
    let stats_path = dir.path().join("routing.json");
    let logits = dir.path().join("logits.safetensors");
    ok(&moeshard(&[
        "eval",
        "-m",
        m,
        "--tokens",
        "1,2,3,4,5,6,7,8,9,10",
        "--logits-out",
        logits.to_str().unwrap(),
        "--record-routing",
        stats_path.to_str().unwrap(),
    ]));
    let stats = load_stats(&stats_path);
    stats.validate().unwrap();
    let file = GgufFile::open(&model).unwrap();
    let identity = shared::placement::identity_hex(&model_identity(&file));
    assert_eq!(stats.model_identity.as_deref(), Some(identity.as_str()));
    assert_eq!((stats.n_expert, stats.n_expert_used), (8, 2));
    assert_eq!(stats.layers.len(), 2);
    for l in &stats.layers {
        assert_eq!(l.n_tokens, 10);
        assert_eq!(l.counts.iter().sum::<u64>(), 20);
    }

    let plan_path = dir.path().join("plan.toml");
    let text = ok(&moeshard(&[
        "plan",
        "-m",
        m,
        "--cluster",
        &cluster,
        "--routing-stats",
        stats_path.to_str().unwrap(),
        "--out",
        plan_path.to_str().unwrap(),
    ]));
    print!("{text}");
    assert!(text.contains("mode "), "{text}");
    assert!(text.contains("recorded routing statistics"), "{text}");
    assert!(text.contains("no read_bandwidth_gbs for b"), "{text}");
    let plan = Plan::load(&plan_path).unwrap();
    plan.check_identity(&model_identity(&file)).unwrap();
    assert_eq!(plan.nodes, ["a", "b"]);
    plan.resolve(&ModelShape::from_gguf(&file).unwrap())
        .unwrap();

    // The plan runs: greedy tokens as in one process.
    let gen = |extra: &[&str]| {
        let mut args = vec![
            "generate", "-m", m, "--tokens", "1,2,3", "-n", "6", "--temp", "0", "--json",
        ];
        args.extend_from_slice(extra);
        let v: serde_json::Value = serde_json::from_str(&ok(&moeshard(&args))).unwrap();
        v["tokens"].clone()
    };
    let recorded = dir.path().join("routing-dist.json");
    let single = gen(&[]);
    let planned = gen(&[
        "--plan",
        plan_path.to_str().unwrap(),
        "--transport",
        "inproc",
        "--record-routing",
        recorded.to_str().unwrap(),
    ]);
    assert_eq!(single, planned);
    // 3 prompt tokens, then 5 decode steps of one token (the 6th is sampled, not
    // evaluated); the prompt's last layer routes only the row whose logits are wanted.
    let stats = load_stats(&recorded);
    let tokens: Vec<u64> = stats.layers.iter().map(|l| l.n_tokens).collect();
    assert_eq!(tokens, [3 + 5, 1 + 5]);

    // JSON form.
    let v: serde_json::Value = serde_json::from_str(&ok(&moeshard(&[
        "plan",
        "-m",
        m,
        "--cluster",
        &cluster,
        "--zipf",
        "1.0",
        "--batch",
        "4",
        "--json",
    ])))
    .unwrap();
    assert!(v["summary"]["prediction"]["tokens_per_s"].as_f64().unwrap() > 0.0);
    assert_eq!(v["summary"]["config"]["batch"], 4);
    assert!(Plan::from_toml(v["plan"].as_str().unwrap()).is_ok());
    assert_eq!(v["summary"]["candidates"].as_array().unwrap().len(), 3);
}

#[test]
fn plan_refuses_what_does_not_fit_and_bad_statistics() {
    let model = fixtures().join("qwen3moe/model-q4_k_m.gguf");
    let m = model.to_str().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let small = cluster(dir.path(), 100_000);
    let out = moeshard(&["plan", "-m", m, "--cluster", &small]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("does not fit") && err.contains("short"),
        "{err}"
    );

    let cluster = cluster(dir.path(), 1 << 30);
    let stats = dir.path().join("bad.json");
    std::fs::write(
        &stats,
        r#"{"version": 1, "n_expert": 4, "n_expert_used": 2, "layers": []}"#,
    )
    .unwrap();
    let out = moeshard(&[
        "plan",
        "-m",
        m,
        "--cluster",
        &cluster,
        "--routing-stats",
        stats.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("the model routes to 2 of 8"), "{err}");

    let out = moeshard(&["plan", "-m", m, "--cluster", &cluster, "--replicate", "3X"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown unit"));
}

/// `plan --topology`: the nodes of a synthetic one- and two-package machine, for Kimi-K2 at
/// Q3_K_M (a header-only file) on a dual-socket Optane box — 6 × 128 GiB PMem DIMMs and
/// 30 GB/s per socket, the dense part from DDR4. Two sockets slice every expert and
/// predict a shorter step than one: each streams half of every routed expert.
#[test]
fn plan_over_a_synthetic_topology_predicts_dual_socket_kimi_k2() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("kimi-k2-q3_k_m.gguf");
    let model = model.to_str().unwrap();
    ok(&moeshard(&[
        "synth",
        "--shape",
        "kimi-k2",
        "--quant",
        "Q3_K_M",
        "--header-only",
        "--out",
        model,
    ]));
    let predict_rtt = |topology: &str, rtt_us: &str| -> serde_json::Value {
        let out = ok(&moeshard(&[
            "plan",
            "-m",
            model,
            "--topology",
            topology,
            "--node-memory",
            "768GiB",
            "--node-gbs",
            "30",
            "--coordinator-gbs",
            "80",
            "--round-trip-us",
            rtt_us,
            "--json",
        ]));
        serde_json::from_str::<serde_json::Value>(&out).unwrap()["summary"].clone()
    };
    let predict = |topology: &str| predict_rtt(topology, "100");
    let one = predict("synthetic:pack:1 numa:1 core:24 pu:2");
    let two = predict("synthetic:pack:2 numa:1 core:24 pu:2");
    // Round trips: 60 MoE layers, one each for the single node's whole experts, two each
    // for the exact split of sliced ones; none when a round trip costs nothing.
    let rtt = |s: &serde_json::Value| s["prediction"]["round_trip_time_s"].as_f64().unwrap();
    assert!((rtt(&one) - 60.0 * 100e-6).abs() < 1e-9, "{}", rtt(&one));
    assert!((rtt(&two) - 120.0 * 100e-6).abs() < 1e-9, "{}", rtt(&two));
    let free = predict_rtt("synthetic:pack:2 numa:1 core:24 pu:2", "0");
    assert_eq!(rtt(&free), 0.0);
    let p = &free["prediction"];
    let sum = p["expert_time_s"].as_f64().unwrap() + p["dense_time_s"].as_f64().unwrap();
    assert!((p["step_time_s"].as_f64().unwrap() - sum).abs() < 1e-12);
    let tps = |s: &serde_json::Value| s["prediction"]["tokens_per_s"].as_f64().unwrap();
    let names = |s: &serde_json::Value| -> Vec<String> {
        (s["nodes"].as_array().unwrap().iter())
            .map(|n| n["name"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(names(&one), ["node0"]);
    assert_eq!(names(&two), ["node0", "node1"]);
    assert_eq!(two["mode"], "sliced", "{}", two["why"]);
    assert_eq!(two["nodes"][0]["cores"], 24);
    // Experts: ~5 GB of Q3_K/Q4_K per token over 30 GB/s per socket; the dense part
    // (6.2 GB at 80 GB/s) is the same on both.
    let (t1, t2) = (tps(&one), tps(&two));
    eprintln!("Kimi-K2 Q3_K_M predicted decode: one socket {t1:.2} tok/s, two {t2:.2} tok/s");
    assert!((2.0..3.0).contains(&t1), "one socket {t1}");
    assert!(
        t2 > 1.5 * t1 && t2 < 2.0 * t1,
        "two sockets {t2} vs one {t1}"
    );

    // A bad bandwidth or round trip and a missing cluster are errors naming the flag.
    let bad_rtt = moeshard(&[
        "plan",
        "-m",
        model,
        "--topology",
        "synthetic:pack:2 numa:1 core:2 pu:1",
        "--round-trip-us=-5",
    ]);
    assert!(!bad_rtt.status.success());
    assert!(String::from_utf8_lossy(&bad_rtt.stderr).contains("--round-trip-us"));
    let bad = moeshard(&[
        "plan",
        "-m",
        model,
        "--topology",
        "synthetic:pack:2 numa:1 core:2 pu:1",
        "--node-gbs",
        "0",
    ]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--node-gbs"));
    let none = moeshard(&["plan", "-m", model]);
    assert_eq!(
        none.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&none.stderr)
    );
}
