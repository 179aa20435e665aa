//! The performance model against reality: routing statistics recorded in one run let the
//! planner predict the weight bytes each node reads per decode step; the bytes the nodes
//! count while serving a second run, with other prompts, agree within 10%.

use std::sync::Arc;

use coordinator::distributed::connect::open_distributed;
use coordinator::engine::Engine;
use coordinator::models::Logits;
use coordinator::synth::{synth, SynthConfig};
use proto::transport::TransportKind;
use shared::gguf::{model_identity, GgufFile};
use shared::placement::planner::{predict, ModelCost, Placement, PlannerConfig, PlannerNode};
use shared::placement::routing_stats::RoutingModel;
use shared::placement::{ModelShape, Plan};
use shared::rng::SplitMix64;

use crate::distributed::options;

/// Random prompts of `len` tokens below `n_vocab`.
fn prompts(seed: u64, n: usize, len: usize, n_vocab: usize) -> Vec<Vec<u32>> {
    let mut rng = SplitMix64::new(seed);
    (0..n)
        .map(|_| {
            (0..len)
                .map(|_| (rng.next_u64() % n_vocab as u64) as u32)
                .collect()
        })
        .collect()
}

fn weight_bytes_read(engine: &Engine) -> Vec<u64> {
    engine
        .experts()
        .node_stats()
        .into_iter()
        .map(|(name, s)| {
            s.unwrap_or_else(|e| panic!("{name}: {e}"))
                .weight_bytes_read
        })
        .collect()
}

#[test]
fn predicted_bytes_per_node_match_the_bytes_nodes_read() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("moe256.gguf");
    // Qwen3-30B-A3B's routing (top-8) over 256 experts, one layer, hidden 256.
    let cfg = SynthConfig {
        shape: "qwen3-30b-a3b".into(),
        quant: "Q8_0".into(),
        layers: Some(1),
        vocab: Some(512),
        experts: Some(256),
        hidden: Some(256),
        seed: 7,
        header_only: false,
        threads: None,
        out: path.clone(),
    };
    synth(&cfg, &mut |_, _| {}).unwrap();
    let file = Arc::new(GgufFile::open(&path).unwrap());
    let n_vocab = 512;

    // Run 1: record routing statistics in one process.
    let single = Engine::from_file(file.clone()).unwrap();
    for p in prompts(1, 8, 48, n_vocab) {
        single.eval(&p).unwrap();
    }
    let stats = single
        .model()
        .routing_counts()
        .snapshot(Some(&model_identity(&file)));

    // The prediction for 2 equal nodes holding whole experts (the even plan), batch 1.
    let shape = ModelShape::from_gguf(&file).unwrap();
    let names = vec!["node0".to_owned(), "node1".to_owned()];
    let resolved = Plan::even(&names, &shape, false).resolve(&shape).unwrap();
    let cost = ModelCost::from_gguf(&file, &Default::default()).unwrap();
    let nodes: Vec<PlannerNode> = names
        .iter()
        .map(|name| PlannerNode {
            name: name.clone(),
            memory_bytes: None,
            read_bandwidth_gbs: 20.0,
            bandwidth_declared: true,
            cores: None,
        })
        .collect();
    let routing = RoutingModel::from_stats(&shape, &stats).unwrap();
    let config = PlannerConfig {
        batch: 1,
        samples: 4000,
        ..PlannerConfig::default()
    };
    let predicted = predict(
        &cost,
        &nodes,
        &Placement::from_resolved(&resolved),
        &routing,
        &config,
    )
    .unwrap();

    // Run 2: other prompts on 2 loopback nodes; count decode steps only.
    let d = open_distributed(&path, &options(2, TransportKind::Grpc)).unwrap();
    let engine = &d.engine;
    let mut read = [0u64; 2];
    let mut steps = 0u64;
    for p in prompts(2, 6, 8, n_vocab) {
        let mut cache = engine.new_cache(64);
        let mut logits = engine.forward(&mut cache, &p, Logits::Last).unwrap();
        let before = weight_bytes_read(engine);
        for _ in 0..24 {
            let next = logits
                .iter()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(b.1))
                .map_or(0, |(i, _)| i as u32);
            logits = engine.forward(&mut cache, &[next], Logits::Last).unwrap();
            steps += 1;
        }
        for (r, (after, before)) in read
            .iter_mut()
            .zip(weight_bytes_read(engine).iter().zip(before))
        {
            *r += after - before;
        }
    }
    for (i, node) in predicted.nodes.iter().enumerate() {
        let measured = read[i] as f64 / steps as f64;
        let ratio = measured / node.bytes_per_step;
        eprintln!(
            "{}: predicted {:.0} B/step, measured {measured:.0} B/step over {steps} steps (ratio {ratio:.3})",
            node.name, node.bytes_per_step
        );
        assert!(
            (ratio - 1.0).abs() <= 0.10,
            "{}: measured/predicted = {ratio:.3}",
            node.name
        );
    }
}
