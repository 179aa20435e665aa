//! The DRAM tier (`--dram-cache`): a node with it gives bit-identical answers to one without
//! it while its most used experts are promoted into DRAM in the background, stays within
//! its budget, serves hits from the copies, and follows a change of the hot experts
//! (evicting the old ones).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use expert_node::service::NodeCore;
use expert_node::NodeWeights;
use proto::transport::NodeService;
use proto::{partials_from_reply, wire, DispatchRequest, FfnPart, Stage};
use shared::gguf::GgufFile;
use shared::models::HParams;
use shared::moe::Assignment;
use shared::placement::{ModelShape, Part, SliceSpec};
use shared::quant::dispatch::Kernels;
use shared::quant::matmul::Activations;

fn fixture(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures")
        .join(rel)
}

/// Every routed expert of every MoE layer, whole.
fn all_experts(model: &PathBuf) -> Vec<SliceSpec> {
    let shape = ModelShape::from_gguf(&GgufFile::open(model).unwrap()).unwrap();
    let mut out = Vec::new();
    for (l, layer) in shape.layers.iter().enumerate() {
        if let Some(r) = layer.routed {
            for e in 0..shape.n_expert {
                out.push(SliceSpec {
                    layer: l as u32,
                    part: Part::Routed,
                    expert: e as u32,
                    ff_start: 0,
                    ff_len: r.n_ff as u32,
                });
            }
        }
    }
    out
}

struct Setup {
    n_embd: usize,
    weight_type: shared::quant::GgmlType,
    layer: u32,
}

/// 4 tokens of layer `s.layer`, each routed to two of `experts` (weights 0.6, 0.4).
fn dispatch(s: &Setup, step: u64, experts: &[u32]) -> wire::CoordinatorMessage {
    let n_tokens = 4;
    let x: Vec<f32> = (0..n_tokens * s.n_embd)
        .map(|i| ((i as u64 * 2654435761 + step * 97) % 2000) as f32 / 1000.0 - 1.0)
        .collect();
    let inputs = vec![Activations::quantize(
        Kernels::get(),
        s.weight_type,
        &x,
        s.n_embd,
    )];
    let mut assignments = Vec::new();
    for t in 0..n_tokens {
        let a = experts[(t + step as usize) % experts.len()];
        let b = experts[(t + step as usize + 1) % experts.len()];
        assignments.push(Assignment {
            token: t as u32,
            expert: a,
            weight: 0.6,
        });
        if b != a {
            assignments.push(Assignment {
                token: t as u32,
                expert: b,
                weight: 0.4,
            });
        }
    }
    wire::CoordinatorMessage {
        body: Some(wire::coordinator_message::Body::Dispatch(
            DispatchRequest {
                step_id: step,
                layer: s.layer,
                part: FfnPart::Routed,
                stage: Stage::OneRound,
                inputs,
                assignments,
                segments: Vec::new(),
            }
            .into(),
        )),
    }
}

fn answer(node: &NodeCore, msg: wire::CoordinatorMessage, s: &Setup, step: u64) -> Vec<u32> {
    let reply = node.handle(msg);
    let p = partials_from_reply(reply, step, s.layer, 4, s.n_embd).unwrap();
    p.data().iter().map(|v| v.to_bits()).collect()
}

#[test]
fn dram_tier_changes_no_result_and_follows_the_hot_experts() {
    let model = fixture("qwen3moe/model-q8_0.gguf");
    let file = GgufFile::open(&model).unwrap();
    let hp = HParams::from_gguf(&file).unwrap();
    let layer = (0..hp.n_layer_all).find(|&l| hp.is_moe_layer(l)).unwrap() as u32;
    let weight_type = file
        .tensor(&format!("blk.{layer}.ffn_gate_exps.weight"))
        .unwrap()
        .ty;
    let s = Setup {
        n_embd: hp.n_embd,
        weight_type,
        layer,
    };
    let slices = all_experts(&model);
    let plain = NodeCore::new(
        "plain",
        NodeWeights::open(&model, Some(&slices)).unwrap(),
        1,
        None,
    )
    .unwrap();
    let weights = NodeWeights::open(&model, Some(&slices)).unwrap();
    let expert_bytes = weights.weight_bytes() / slices.len() as u64;
    // Room for 4 experts (of this layer's equal-sized ones).
    let budget = 4 * expert_bytes + expert_bytes / 2;
    let mut cached = NodeCore::new("cached", weights, 1, None).unwrap();
    cached.enable_dram_cache(budget).unwrap();

    let run_until = |hot: &[u32], step: &mut u64, done: &dyn Fn() -> bool, what: &str| {
        let t0 = Instant::now();
        while !done() {
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "{what}: not reached in 20 s: {:?}",
                cached.dram_cache_stats()
            );
            *step += 1;
            let want = answer(&plain, dispatch(&s, *step, hot), &s, *step);
            let got = answer(&cached, dispatch(&s, *step, hot), &s, *step);
            assert_eq!(got, want, "step {step}: the DRAM tier changed a result");
            std::thread::sleep(Duration::from_millis(5));
        }
    };
    let mut step = 0u64;
    let stats = || cached.dram_cache_stats().unwrap();

    // Experts 0-3 hot: promoted, then hits.
    let first = [0u32, 1, 2, 3];
    run_until(
        &first,
        &mut step,
        &|| stats().resident_experts == 4 && stats().hit_bytes > 0,
        "the first hot set resident",
    );
    let st = stats();
    assert!(st.resident_bytes <= budget, "{st:?} over budget {budget}");
    assert_eq!(st.budget_bytes, budget);
    assert!(st.promoted_bytes >= st.resident_bytes);

    // Experts 4-7 hot from now on: they replace the first set.
    let second = [4u32, 5, 6, 7];
    let hits_before = st.hit_bytes;
    run_until(
        &second,
        &mut step,
        &|| stats().evicted_bytes >= 4 * expert_bytes && stats().hit_bytes > hits_before,
        "the second hot set resident",
    );
    let st = stats();
    assert!(st.resident_bytes <= budget, "{st:?} over budget {budget}");
    assert!(st.miss_bytes > 0 && st.hit_bytes > 0, "{st:?}");
    // A node without the tier reports zeros.
    assert_eq!(plain.dram_cache_stats(), None);
    let wire_stats = plain.stats();
    assert_eq!(
        (
            wire_stats.dram_cache_budget_bytes,
            wire_stats.dram_hit_bytes
        ),
        (0, 0)
    );
    let wire_stats = cached.stats();
    assert_eq!(wire_stats.dram_cache_budget_bytes, budget);
    assert_eq!(wire_stats.dram_cache_experts, 4);
}
