//! Tests of the planner: the balance figures of issue 11 on a DeepSeek-V3-shaped
//! model, property tests (coverage, capacity, distinct replicas, plans that
//! resolve), slice byte counts against a fixture's tensors, the sliced rule's
//! alternation and rate shares, replicas, and the refusals.

use std::path::Path;

use proptest::prelude::*;

use super::*;
use crate::gguf::GgufFile;
use crate::models::shapes::{self, TypeRecipe};
use crate::placement::routing_stats::RoutingModel;
use crate::placement::Part;
use crate::quant::GgmlType;

fn deepseek() -> ModelCost {
    let shape = shapes::by_name("deepseek-v3").unwrap();
    ModelCost::from_model_shape(
        &shape,
        &TypeRecipe::uniform(GgmlType::Q4_K),
        &KernelRates::default(),
    )
    .unwrap()
}

/// A model of `n_layer` layers, the first `n_dense` dense, MoE layers with
/// `n_expert` experts of `n_ff` rows (all matrices of type `ty`).
fn toy(
    n_layer: usize,
    n_dense: usize,
    n_expert: usize,
    k: usize,
    n_ff: u64,
    ty: GgmlType,
) -> ModelCost {
    let e = 256u64;
    let mut t: Vec<(String, GgmlType, Vec<u64>)> = vec![
        ("token_embd.weight".into(), ty, vec![e, 1000]),
        ("output.weight".into(), ty, vec![e, 1000]),
        ("output_norm.weight".into(), GgmlType::F32, vec![e]),
    ];
    for l in 0..n_layer {
        let n = |s: &str| format!("blk.{l}.{s}.weight");
        t.push((n("attn_q"), ty, vec![e, e]));
        if l < n_dense {
            t.push((n("ffn_gate"), ty, vec![e, 512]));
            t.push((n("ffn_up"), ty, vec![e, 512]));
            t.push((n("ffn_down"), ty, vec![512, e]));
        } else {
            let x = n_expert as u64;
            t.push((n("ffn_gate_inp"), GgmlType::F32, vec![e, x]));
            t.push((n("ffn_gate_exps"), ty, vec![e, n_ff, x]));
            t.push((n("ffn_up_exps"), ty, vec![e, n_ff, x]));
            t.push((n("ffn_down_exps"), ty, vec![n_ff, e, x]));
        }
    }
    ModelCost::from_tensors(
        n_layer,
        k,
        t.iter().map(|(n, ty, ne)| (n.as_str(), *ty, ne.as_slice())),
        &KernelRates::default(),
    )
    .unwrap()
}

fn find(summary: &PlanSummary, mode: Mode) -> &Prediction {
    summary
        .candidates
        .iter()
        .find(|c| c.mode == mode)
        .and_then(|c| c.prediction.as_ref())
        .unwrap_or_else(|| panic!("no prediction for {mode:?}"))
}

#[test]
fn deepseek_zipf_whole_experts_are_slower_than_slices_at_batch_1() {
    let model = deepseek();
    assert_eq!(model.n_expert(), 256);
    assert_eq!(model.moe_layers().count(), 58);
    let routing = RoutingModel::zipf(&model.shape, 8, 1.0, 11);
    let nodes = PlannerNode::equal(2, 20.0);
    let config = PlannerConfig {
        samples: 2000,
        ..PlannerConfig::default()
    };
    let planned = plan(&model, &nodes, &routing, &config).unwrap();
    let s = &planned.summary;
    let sliced = find(s, Mode::Sliced);
    let whole = find(s, Mode::Whole);
    let rr = find(s, Mode::RoundRobin);
    let ratio = whole.expert_time_s / sliced.expert_time_s;
    println!(
        "deepseek-v3 Q4_K, Zipf(1.0), batch 1, 2 x 20 GB/s: expert time per step sliced {:.3} ms, whole (balanced by the statistics) {:.3} ms (max of expected {:.3} ms), round-robin {:.3} ms; whole/sliced = {ratio:.3}, round-robin/whole = {:.3}",
        sliced.expert_time_s * 1e3,
        whole.expert_time_s * 1e3,
        whole.max_of_expected_s * 1e3,
        rr.expert_time_s * 1e3,
        rr.expert_time_s / whole.expert_time_s
    );
    print!("{}", s.render_text());
    assert!(ratio >= 1.2, "whole / sliced = {ratio}");
    assert!(
        ratio < 1.4,
        "whole / sliced = {ratio}: more than the imbalance explains"
    );
    // Slices are balanced by construction: every node reads half of each pick.
    assert!((sliced.expert_time_s - sliced.max_of_expected_s).abs() < 1e-3 * sliced.expert_time_s);
    // The max of expected bytes would call whole experts as good as slices.
    assert!(whole.max_of_expected_s < 1.02 * sliced.expert_time_s);
    assert!(
        whole.step_time_s < rr.step_time_s,
        "balanced {} vs round-robin {}",
        whole.step_time_s,
        rr.step_time_s
    );
    assert_eq!(s.mode, Mode::Sliced);
    assert!(
        s.why.contains("sliced predicts the shortest step"),
        "{}",
        s.why
    );
    planned.plan.resolve(&model.shape).unwrap();
}

#[test]
fn recorded_statistics_beat_round_robin_on_the_true_distribution() {
    // The planner sees statistics of 2000 tokens drawn from Zipf(1.0); both
    // placements are then judged on the distribution itself.
    let model = deepseek();
    let truth = RoutingModel::zipf(&model.shape, 8, 1.0, 23);
    let stats = truth.synthetic_stats(2000, 5);
    let learned = RoutingModel::from_stats(&model.shape, &stats).unwrap();
    let nodes = PlannerNode::equal(2, 20.0);
    let config = PlannerConfig {
        samples: 1000,
        ..PlannerConfig::default()
    };
    let planned = plan(&model, &nodes, &learned, &config).unwrap();
    let whole = candidates::whole(
        &model,
        &nodes,
        &[20e9, 20e9],
        &expected_loads(&model, &learned, 1),
        0,
    )
    .unwrap();
    let rr = candidates::round_robin(&model, 2);
    let on_truth = |p: &Placement| predict(&model, &nodes, p, &truth, &config).unwrap();
    let (w, r, chosen) = (
        on_truth(&whole),
        on_truth(&rr),
        on_truth(&planned.placement),
    );
    println!(
        "deepseek-v3, statistics of 2000 Zipf(1.0) tokens, judged on Zipf(1.0): whole (balanced by the statistics) {:.3} ms, round-robin {:.3} ms, chosen ({:?}) {:.3} ms",
        w.expert_time_s * 1e3,
        r.expert_time_s * 1e3,
        planned.summary.mode,
        chosen.expert_time_s * 1e3
    );
    assert!(w.expert_time_s < r.expert_time_s);
    assert!(chosen.expert_time_s <= w.expert_time_s);
}

#[test]
fn slices_alternate_the_larger_share_and_follow_rates() {
    // 768 rows = 3 blocks over 2 nodes.
    let model = toy(3, 1, 8, 2, 768, GgmlType::Q4_K);
    let routing = RoutingModel::uniform(&model.shape, 2);
    let nodes = PlannerNode::equal(2, 10.0);
    let loads = expected_loads(&model, &routing, 1);
    let p = candidates::sliced(&model, &nodes, &[1.0, 1.0], &loads);
    for layer in 1..3 {
        let experts = p.layers[layer].as_ref().unwrap();
        let big_on_0 = experts.iter().filter(|s| s[0].ff == (0..512)).count();
        assert_eq!(big_on_0, 4, "layer {layer}: {experts:?}");
        for s in experts {
            assert_eq!(s.len(), 2);
            assert_eq!(s[0].replicas, vec![0]);
            assert_eq!(s[1].replicas, vec![1]);
        }
    }
    let held = p.held_bytes(&model, 2);
    assert_eq!(held[0], held[1]);

    // Twice the rate, twice the rows (2048 = 8 blocks: 5/3 or 6/2 — never below 5).
    let model = toy(2, 0, 4, 1, 2048, GgmlType::Q4_K);
    let loads = expected_loads(&model, &RoutingModel::uniform(&model.shape, 1), 1);
    let p = candidates::sliced(&model, &nodes, &[20e9, 10e9], &loads);
    for s in p.layers[0].as_ref().unwrap() {
        assert!(
            s[0].ff.len() >= 5 * 256 && s[0].ff.len() <= 6 * 256,
            "{s:?}"
        );
    }
}

#[test]
fn replicas_go_to_the_hottest_experts_on_other_nodes() {
    let model = toy(2, 0, 16, 2, 256, GgmlType::Q8_0);
    let routing = RoutingModel::zipf(&model.shape, 2, 1.2, 3);
    let nodes = PlannerNode::equal(3, 10.0);
    let expert = model.routed[0].unwrap().expert_bytes();
    let loads = expected_loads(&model, &routing, 1);
    let p = candidates::whole(&model, &nodes, &[1.0; 3], &loads, 3 * expert).unwrap();
    let mut replicated = Vec::new();
    for (layer, experts) in p.layers.iter().enumerate() {
        for (e, s) in experts.as_ref().unwrap().iter().enumerate() {
            let r = &s[0].replicas;
            let mut sorted = r.clone();
            sorted.sort_unstable();
            sorted.dedup();
            assert_eq!(sorted.len(), r.len(), "distinct replicas");
            if r.len() > 1 {
                replicated.push((loads[layer].as_ref().unwrap()[e], layer, e));
            }
        }
    }
    assert_eq!(replicated.len(), 3);
    let mut all: Vec<f64> = loads.iter().flatten().flatten().copied().collect();
    all.sort_by(|a, b| b.total_cmp(a));
    for (load, _, _) in &replicated {
        // Among the hottest few (load per replica decides, so at most one rank slips).
        assert!(*load >= all[4], "{load} vs {:?}", &all[..5]);
    }
    let held: u64 = p.held_bytes(&model, 3).iter().sum();
    assert_eq!(held, model.routed_bytes() + 3 * expert);

    // The planner reports both replica rules.
    let config = PlannerConfig {
        replicate_bytes: 3 * expert,
        samples: 400,
        batch: 4,
        ..PlannerConfig::default()
    };
    let planned = plan(&model, &nodes, &routing, &config).unwrap();
    let c = planned
        .summary
        .candidates
        .iter()
        .find(|c| c.mode == Mode::WholeReplicated)
        .unwrap();
    let (by_layer, least) = (
        c.prediction.as_ref().unwrap(),
        c.least_loaded.as_ref().unwrap(),
    );
    let whole = find(&planned.summary, Mode::Whole);
    // Serving every layer from the balancing's primary, replicas change nothing.
    assert!((by_layer.expert_time_s - whole.expert_time_s).abs() < 1e-12);
    assert!(least.expert_time_s < by_layer.expert_time_s);
    assert!(planned
        .summary
        .notes
        .iter()
        .any(|n| n.contains("least-loaded")));
}

#[test]
fn too_little_memory_is_refused_saying_by_how_much() {
    let model = toy(2, 1, 8, 2, 512, GgmlType::Q4_K);
    let needed = model.routed_bytes();
    let mut nodes = PlannerNode::equal(2, 10.0);
    nodes[0].memory_bytes = Some(needed / 4);
    nodes[1].memory_bytes = Some(needed / 4);
    let routing = RoutingModel::uniform(&model.shape, 2);
    let err = plan(&model, &nodes, &routing, &PlannerConfig::default()).unwrap_err();
    let short = needed - 2 * (needed / 4);
    assert!(
        err.to_string().contains(&format!("{short} bytes")) && err.to_string().contains("short"),
        "{err}"
    );
    // Enough in all, but node 1 holds only an eighth: slices and round-robin do not
    // fit, whole experts do.
    nodes[0].memory_bytes = Some(needed);
    nodes[1].memory_bytes = Some(needed / 8);
    let planned = plan(&model, &nodes, &routing, &PlannerConfig::default()).unwrap();
    assert_eq!(planned.summary.mode, Mode::Whole);
    let sliced = &planned.summary.candidates[0];
    assert!(sliced
        .unfit
        .as_ref()
        .unwrap()
        .contains("node node1 would hold"));
    // Enough in all, but no candidate fits (6.5 + 1.5 experts of room): each says why.
    nodes[0].memory_bytes = Some(needed * 13 / 16);
    nodes[1].memory_bytes = Some(needed * 3 / 16);
    let err = plan(&model, &nodes, &routing, &PlannerConfig::default()).unwrap_err();
    assert!(matches!(err, PlannerError::NoCandidateFits(_)), "{err}");
    assert!(err.to_string().contains("sliced: node"), "{err}");
}

#[test]
fn bad_settings_are_refused() {
    let model = toy(2, 1, 8, 2, 512, GgmlType::Q4_K);
    let routing = RoutingModel::uniform(&model.shape, 2);
    let nodes = PlannerNode::equal(2, 10.0);
    let check =
        |nodes: &[PlannerNode], routing: &RoutingModel, config: PlannerConfig, want: &str| {
            let err = plan(&model, nodes, routing, &config)
                .unwrap_err()
                .to_string();
            assert!(err.contains(want), "{err:?} should say {want:?}");
        };
    check(
        &nodes,
        &routing,
        PlannerConfig {
            batch: 0,
            ..Default::default()
        },
        "batch size",
    );
    check(&[], &routing, PlannerConfig::default(), "no nodes");
    let mut slow = nodes.clone();
    slow[1].read_bandwidth_gbs = 0.0;
    check(
        &slow,
        &routing,
        PlannerConfig::default(),
        "node \"node1\": read bandwidth 0",
    );
    let other = RoutingModel::uniform(&model.shape, 3);
    check(
        &nodes,
        &other,
        PlannerConfig::default(),
        "picks 3 of 8 experts (or lacks a MoE layer), the model 2 of 8",
    );
    let dense = toy(2, 2, 8, 2, 512, GgmlType::Q4_K);
    let err = plan(&dense, &nodes, &routing, &PlannerConfig::default()).unwrap_err();
    assert!(err.to_string().contains("no routed experts"), "{err}");
}

#[test]
fn byte_sizes_parse() {
    assert_eq!(parse_byte_size("1000"), Ok(1000));
    assert_eq!(parse_byte_size("4G"), Ok(4_000_000_000));
    assert_eq!(parse_byte_size("512MiB"), Ok(512 << 20));
    assert_eq!(parse_byte_size("1.5 GB"), Ok(1_500_000_000));
    assert!(parse_byte_size("4X").unwrap_err().contains("unknown unit"));
    assert!(parse_byte_size("G").is_err());
}

fn fixture(rel: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures")
        .join(rel)
}

#[test]
fn slice_bytes_match_the_fixtures_tensors() {
    for rel in [
        "qwen3moe/model-q4_k_m.gguf",
        "qwen3moe/model-q8_0.gguf",
        "deepseek2/model-q4_k_m.gguf",
    ] {
        let file = GgufFile::open(fixture(rel)).unwrap();
        let model = ModelCost::from_gguf(&file, &KernelRates::default()).unwrap();
        assert!(model.model_identity.is_some());
        let mut routed = 0u64;
        let mut rest = 0u64;
        for t in file.tensors() {
            if t.name.contains("_exps") {
                routed += t.byte_len;
            } else if t.name != "token_embd.weight" || file.tensor("output.weight").is_none() {
                rest += t.byte_len;
            }
        }
        assert_eq!(model.routed_bytes(), routed, "{rel}");
        assert_eq!(model.dense_bytes, rest, "{rel}");
        for (_, c) in model.moe_layers() {
            let half = c.n_ff / c.block() / 2 * c.block();
            assert_eq!(
                c.slice_bytes(0..half) + c.slice_bytes(half..c.n_ff),
                c.expert_bytes()
            );
        }
    }
}

#[test]
fn a_fixture_plan_resolves_with_its_identity() {
    let file = GgufFile::open(fixture("qwen3moe/model-q4_k_m.gguf")).unwrap();
    let model = ModelCost::from_gguf(&file, &KernelRates::default()).unwrap();
    let routing = RoutingModel::zipf(&model.shape, model.n_expert_used, 1.0, 0);
    let planned = plan(
        &model,
        &PlannerNode::equal(2, 10.0),
        &routing,
        &PlannerConfig::default(),
    )
    .unwrap();
    let resolved = planned
        .plan
        .resolve(&ModelShape::from_gguf(&file).unwrap())
        .unwrap();
    assert_eq!(
        resolved.model_identity(),
        Some(crate::gguf::model_identity(&file))
    );
    // n_ff = 256 is one block: the note says the sliced candidate cannot cut.
    assert!(planned
        .summary
        .notes
        .iter()
        .any(|n| n.contains("1 block(s)")));
}

use crate::placement::ModelShape;

/// A random planning problem: (model, nodes, replica budget, batch).
fn problem() -> impl Strategy<Value = (ModelCost, Vec<PlannerNode>, u64, usize, f64)> {
    (
        1usize..4,
        0usize..2,
        1usize..13,
        prop_oneof![
            Just(GgmlType::Q4_K),
            Just(GgmlType::Q8_0),
            Just(GgmlType::F16)
        ],
        1u64..5,
        1usize..5,
        any::<u64>(),
        1usize..6,
        0.0f64..1.5,
    )
        .prop_map(
            |(n_moe, n_dense, n_expert, ty, ff_blocks, n_nodes, seed, batch, zipf)| {
                let k = 1 + (seed as usize) % n_expert;
                let n_ff = ff_blocks
                    * if ty == GgmlType::F16 {
                        96
                    } else {
                        ty.block_elems() as u64
                    };
                let model = toy(n_dense + n_moe, n_dense, n_expert, k, n_ff, ty);
                let total = model.routed_bytes();
                let mut rng = crate::rng::SplitMix64::new(seed);
                let nodes = (0..n_nodes)
                    .map(|i| PlannerNode {
                        name: format!("n{i}"),
                        memory_bytes: (!rng.next_u64().is_multiple_of(4)).then(|| {
                            // From a fifth to twice a fair share.
                            let f = 0.2 + 1.8 * rng.next_f64();
                            1 + (total as f64 * f / n_nodes as f64) as u64
                        }),
                        read_bandwidth_gbs: 1.0 + 49.0 * rng.next_f64(),
                        bandwidth_declared: true,
                        cores: (rng.next_u64().is_multiple_of(2))
                            .then(|| 1 + (rng.next_u64() % 8) as usize),
                    })
                    .collect();
                let expert = model.moe_layers().next().unwrap().1.expert_bytes();
                let budget = expert * (rng.next_u64() % 6);
                (model, nodes, budget, batch, zipf)
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn plans_cover_everything_within_capacity((model, nodes, budget, batch, zipf) in problem()) {
        let routing = RoutingModel::zipf(&model.shape, model.n_expert_used, zipf, 1);
        let config = PlannerConfig {
            batch,
            replicate_bytes: budget,
            samples: 8,
            ..PlannerConfig::default()
        };
        match plan(&model, &nodes, &routing, &config) {
            Ok(planned) => {
                let resolved = planned.plan.resolve(&model.shape).unwrap();
                let names: Vec<String> = nodes.iter().map(|n| n.name.clone()).collect();
                prop_assert_eq!(resolved.nodes(), names.as_slice());
                let mut held = vec![0u64; nodes.len()];
                for (layer, cost) in model.moe_layers() {
                    for e in 0..model.n_expert() {
                        let slices = resolved.slices(layer, Part::Routed, e).unwrap();
                        prop_assert!(!slices.is_empty());
                        prop_assert_eq!(slices[0].ff.start, 0);
                        prop_assert_eq!(slices.last().unwrap().ff.end, cost.n_ff);
                        for s in slices {
                            let mut r = s.replicas.clone();
                            r.sort_unstable();
                            r.dedup();
                            prop_assert_eq!(r.len(), s.replicas.len(), "replicas on distinct nodes");
                            for &n in &s.replicas {
                                held[n] += cost.slice_bytes(s.ff.clone());
                            }
                        }
                    }
                }
                for (i, n) in nodes.iter().enumerate() {
                    if let Some(m) = n.memory_bytes {
                        prop_assert!(held[i] <= m, "node {} holds {} of {}", i, held[i], m);
                    }
                    prop_assert_eq!(planned.summary.prediction.nodes[i].held_bytes, held[i]);
                }
                let extra: u64 = held.iter().sum::<u64>() - model.routed_bytes();
                prop_assert!(extra <= budget);
                // The file form reads back to the same plan.
                prop_assert_eq!(&Plan::from_toml(&planned.plan.to_toml()).unwrap(), &planned.plan);
                prop_assert!(planned.summary.prediction.step_time_s > 0.0);
            }
            Err(PlannerError::DoesNotFit { needed, available, short }) => {
                prop_assert!(nodes.iter().all(|n| n.memory_bytes.is_some()));
                prop_assert_eq!(needed - available, short);
                prop_assert!(needed > available);
            }
            Err(PlannerError::NoCandidateFits(why)) => {
                prop_assert!(nodes.iter().any(|n| n.memory_bytes.is_some()), "{}", why);
            }
            Err(e) => prop_assert!(false, "unexpected error {}", e),
        }
    }
}

#[test]
fn a_plan_file_predicts_as_its_placement() {
    let model = toy(3, 1, 8, 2, 768, GgmlType::Q4_K);
    let routing = RoutingModel::zipf(&model.shape, 2, 1.0, 4);
    let nodes = PlannerNode::equal(2, 10.0);
    let expert = model.routed[1].unwrap().expert_bytes();
    let config = PlannerConfig {
        replicate_bytes: 2 * expert,
        batch: 3,
        samples: 200,
        ..PlannerConfig::default()
    };
    let planned = plan(&model, &nodes, &routing, &config).unwrap();
    let text = planned.plan.to_toml();
    let resolved = Plan::from_toml(&text)
        .unwrap()
        .resolve(&model.shape)
        .unwrap();
    let placement = Placement::from_resolved(&resolved);
    assert_eq!(placement, planned.placement);
    let p = predict(&model, &nodes, &placement, &routing, &config).unwrap();
    assert_eq!(p, planned.summary.prediction);

    // Any plan file: the even plan, which puts experts 0-3 and 4-7 on the two nodes.
    let even = Plan::even(&["node0".into(), "node1".into()], &model.shape, false);
    let even = Placement::from_resolved(&even.resolve(&model.shape).unwrap());
    let p = predict(&model, &nodes, &even, &routing, &config).unwrap();
    assert!(p.expert_time_s > 0.0);
    // A placement for another model is refused.
    let other = toy(2, 1, 8, 2, 768, GgmlType::Q4_K);
    let err = predict(&other, &nodes, &even, &routing, &config).unwrap_err();
    assert!(err.to_string().contains("3 layers, the model 2"), "{err}");
}
