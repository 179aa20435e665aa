//! Tests of placement: plan and cluster files (round trips, every refusal with
//! its message), even plans over 1–3 nodes, model shapes of the fixtures, and
//! split files — every slice tensor's bytes against the original's rows (of down:
//! the slice's share of whole rows), the split metadata read back, and no final file after a failure.

use std::ops::Range;
use std::path::{Path, PathBuf};

use super::split::{
    read_split_info, split_file_name, split_tensor_name, write_node_file, SplitInfo,
    KEY_MODEL_IDENTITY, KEY_NODE, KEY_SLICES,
};
use super::*;
use crate::gguf::{
    model_identity, GgufFile, GgufWriter, MetaArray, MetaType, MetaValue, TensorDesc,
};
use crate::quant::GgmlType;
use crate::rng::SplitMix64;

fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures")
        .join(rel)
}

fn names(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("node{i}")).collect()
}

fn ffn(n_ff: usize, block: usize) -> Option<FfnShape> {
    Some(FfnShape { n_ff, block })
}

/// DeepSeek-like: layer 0 dense (FFN 1024), layers 1..=3 MoE with 8 experts of
/// 768 rows (3 K-quant blocks) and a 512-row shared expert; block 256.
fn moe_shape() -> ModelShape {
    let mut layers = vec![LayerShape {
        routed: None,
        dense: ffn(1024, 256),
    }];
    for _ in 1..4 {
        layers.push(LayerShape {
            routed: ffn(768, 256),
            dense: ffn(512, 256),
        });
    }
    ModelShape {
        n_layer: 4,
        n_expert: 8,
        layers,
    }
}

const HEADER: &str = "version = 1\nnodes = [\"node0\", \"node1\"]\n";

/// A valid plan for `moe_shape`: experts 0-3 whole on node0, 4-7 cut in two.
const GOOD: &str = r#"
[[place]]
part = "routed"
layers = "1-3"
experts = "0-3"
nodes = ["node0"]

[[place]]
part = "routed"
layers = "1-3"
experts = "4-7"
ff = [0, 512]
nodes = ["node1"]

[[place]]
part = "routed"
layers = "1-3"
experts = "4-7"
ff = [512, 768]
nodes = ["node0", "node1"]
"#;

fn resolve_text(text: &str) -> Result<ResolvedPlan, PlacementError> {
    Plan::from_toml(text)?.resolve(&moe_shape())
}

/// Checks that `text` (after `HEADER`) is refused with exactly `expected`.
fn check_refused(body: &str, expected: &str) {
    let text = format!("{HEADER}{body}");
    match resolve_text(&text) {
        Ok(_) => panic!("accepted:\n{text}"),
        Err(e) => assert_eq!(e.to_string(), expected, "for:\n{text}"),
    }
}

// ---- plan files -------------------------------------------------------------

#[test]
fn plan_toml_round_trip() {
    let text = format!(
        "# a comment\nversion = 1\nmodel_identity = \"{}\"\nnodes = [\"node0\", \"node1\"]\n{GOOD}\n[[place]]\npart = \"dense\"\nlayers = \"0\"\nnodes = [\"node1\"]\n",
        "AB".repeat(32)
    );
    let plan = Plan::from_toml(&text).unwrap();
    assert_eq!(plan.model_identity, Some([0xab; 32]));
    assert_eq!(plan.nodes, names(2));
    assert_eq!(plan.entries.len(), 4);
    assert_eq!(plan.entries[1].ff, Some(0..512));
    assert_eq!(plan.entries[0].ff, None);
    assert_eq!(plan.entries[3].part, Part::Dense);
    assert_eq!(plan.entries[3].experts, IdList::single(0));
    let written = plan.to_toml();
    assert!(
        written.contains(&"ab".repeat(32)),
        "identity written lowercase:\n{written}"
    );
    assert!(
        !written.contains("experts = \"0\""),
        "dense entries leave experts out:\n{written}"
    );
    let again = Plan::from_toml(&written).unwrap();
    assert_eq!(again, plan);
    assert_eq!(again.to_toml(), written);
}

#[test]
fn id_lists_parse_normalize_and_refuse() {
    let ids = IdList::parse(" 30, 0-23 ,24").unwrap();
    assert_eq!(ids.to_string(), "0-24,30");
    assert_eq!(ids.len(), 26);
    assert_eq!((ids.min(), ids.max()), (0, 30));
    assert!(ids.contains(30) && !ids.contains(25));
    assert_eq!(
        IdList::from_ids([5, 1, 2, 3, 9, 2]).unwrap().to_string(),
        "1-3,5,9"
    );
    assert_eq!(IdList::from_ids([]), None);
    for (text, why) in [
        ("", "empty item"),
        ("1,,2", "empty item"),
        ("5-3", "runs backwards"),
        ("0-5,3", "id 3 is listed more than once"),
        ("a", "is not an id"),
        ("-3", "is not an id"),
        ("1-2-3", "is not an id"),
        ("99999999999999999999999", "is too large"),
    ] {
        let err = IdList::parse(text).unwrap_err();
        assert!(err.contains(why), "{text:?}: {err}");
    }
}

#[test]
fn plan_save_and_load() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("plan.toml");
    let plan = Plan::even(&names(3), &moe_shape(), true);
    plan.save(&path).unwrap();
    assert!(!dir.path().join("plan.toml.tmp").exists());
    assert_eq!(Plan::load(&path).unwrap(), plan);

    std::fs::write(&path, "version = 1\nnodes = [\"a\"]\nbogus = 1\n").unwrap();
    let err = Plan::load(&path).unwrap_err().to_string();
    assert!(err.starts_with(&path.display().to_string()), "{err}");
    assert!(
        err.contains("line 3") && err.contains("unknown field `bogus`"),
        "{err}"
    );
    let err = Plan::load(&dir.path().join("missing.toml")).unwrap_err();
    assert!(
        matches!(err, PlacementError::Io { op: "read", .. }),
        "{err}"
    );
}

#[test]
fn good_plan_resolves_with_replicas() {
    let plan = resolve_text(&format!("{HEADER}{GOOD}")).unwrap();
    assert_eq!(plan.nodes(), &names(2)[..]);
    let whole = plan.slices(2, Part::Routed, 3).unwrap();
    assert_eq!(
        whole,
        &[PlacedSlice {
            ff: 0..768,
            replicas: vec![0]
        }]
    );
    let cut = plan.slices(3, Part::Routed, 5).unwrap();
    assert_eq!(
        cut,
        &[
            PlacedSlice {
                ff: 0..512,
                replicas: vec![1]
            },
            PlacedSlice {
                ff: 512..768,
                replicas: vec![0, 1]
            }
        ]
    );
    assert_eq!(plan.slices(0, Part::Routed, 0), None, "dense layer");
    assert_eq!(
        plan.slices(1, Part::Dense, 0),
        None,
        "kept by the coordinator"
    );
    assert_eq!(plan.slices(9, Part::Routed, 0), None);
    assert_eq!(plan.slices(1, Part::Routed, 8), None);

    let node0 = plan.node_slices(0);
    // Per MoE layer: experts 0-3 whole, then 4-7's second slice.
    assert_eq!(node0.len(), 3 * 8);
    assert_eq!(
        node0[..5],
        [
            SliceSpec {
                layer: 1,
                part: Part::Routed,
                expert: 0,
                ff_start: 0,
                ff_len: 768
            },
            SliceSpec {
                layer: 1,
                part: Part::Routed,
                expert: 1,
                ff_start: 0,
                ff_len: 768
            },
            SliceSpec {
                layer: 1,
                part: Part::Routed,
                expert: 2,
                ff_start: 0,
                ff_len: 768
            },
            SliceSpec {
                layer: 1,
                part: Part::Routed,
                expert: 3,
                ff_start: 0,
                ff_len: 768
            },
            SliceSpec {
                layer: 1,
                part: Part::Routed,
                expert: 4,
                ff_start: 512,
                ff_len: 256
            },
        ]
    );
    let mut sorted = node0.clone();
    sorted.sort();
    assert_eq!(sorted, node0);
    let node1 = plan.node_slices(1);
    assert_eq!(node1.len(), 3 * 4 * 2);
    assert!(plan.node_slices(2).is_empty());

    // The same rows in two entries are replicas of one slice.
    let split_replicas = format!(
        "{HEADER}{GOOD}\n[[place]]\npart = \"routed\"\nlayers = \"2\"\nexperts = \"0\"\nnodes = [\"node1\"]\n"
    );
    let plan = resolve_text(&split_replicas).unwrap();
    assert_eq!(
        plan.slices(2, Part::Routed, 0).unwrap()[0].replicas,
        vec![0, 1]
    );
    assert_eq!(
        plan.slices(1, Part::Routed, 0).unwrap()[0].replicas,
        vec![0]
    );
}

#[test]
fn even_plans_resolve_for_one_to_three_nodes() {
    let shape = moe_shape();
    for n_nodes in 1..=3 {
        for split_dense in [false, true] {
            let nodes = names(n_nodes);
            let plan = Plan::even(&nodes, &shape, split_dense);
            let resolved = plan.resolve(&shape).unwrap_or_else(|e| {
                panic!(
                    "{n_nodes} nodes, split_dense {split_dense}: {e}\n{}",
                    plan.to_toml()
                )
            });
            assert_eq!(Plan::from_toml(&plan.to_toml()).unwrap(), plan);
            for layer in 1..4 {
                for expert in 0..8 {
                    let slices = resolved.slices(layer, Part::Routed, expert).unwrap();
                    let owner = (0..n_nodes)
                        .find(|&i| (8 * i / n_nodes..8 * (i + 1) / n_nodes).contains(&expert))
                        .unwrap();
                    assert_eq!(
                        slices,
                        &[PlacedSlice {
                            ff: 0..768,
                            replicas: vec![owner]
                        }]
                    );
                }
            }
            for layer in 0..4 {
                let dense = resolved.slices(layer, Part::Dense, 0);
                if !split_dense {
                    assert_eq!(dense, None);
                    continue;
                }
                let dense = dense.unwrap();
                let n_ff = shape.layers[layer].dense.unwrap().n_ff;
                assert_eq!(dense.len(), n_nodes.min(n_ff / 256));
                assert_eq!(dense.last().unwrap().ff.end, n_ff);
                let replicas: Vec<usize> = dense.iter().flat_map(|s| s.replicas.clone()).collect();
                let mut sorted = replicas.clone();
                sorted.sort();
                assert_eq!(replicas, sorted, "dense slices go to nodes in node order");
                let lens: Vec<usize> = dense.iter().map(|s| s.ff.len()).collect();
                let (min, max) = (lens.iter().min().unwrap(), lens.iter().max().unwrap());
                assert!(max - min <= 256, "{lens:?}");
            }
            let total: usize = (0..n_nodes).map(|i| resolved.node_slices(i).len()).sum();
            let dense_slices = if split_dense {
                (0..4)
                    .map(|l| resolved.slices(l, Part::Dense, 0).unwrap().len())
                    .sum()
            } else {
                0
            };
            assert_eq!(total, 3 * 8 + dense_slices);
        }
    }
}

#[test]
fn replicated_even_plans_survive_any_one_node() {
    let shape = moe_shape();
    for n_nodes in 2..=4 {
        let plan = Plan::even(&names(n_nodes), &shape, true).with_replicas(2);
        let resolved = plan.resolve(&shape).unwrap();
        for layer in 1..4 {
            for expert in 0..8 {
                let slices = resolved.slices(layer, Part::Routed, expert).unwrap();
                assert_eq!(slices.len(), 1);
                let r = &slices[0].replicas;
                assert_eq!(r.len(), 2, "{n_nodes} nodes, expert {expert}: {r:?}");
                assert_eq!(r[1], (r[0] + 1) % n_nodes);
            }
            // The dense part stays sliced, one node per slice.
            for s in resolved.slices(layer, Part::Dense, 0).unwrap() {
                assert_eq!(s.replicas.len(), 1);
            }
        }
        // Any one node down: every expert still has a live replica.
        for down in 0..n_nodes {
            for expert in 0..8 {
                let r = &resolved.slices(1, Part::Routed, expert).unwrap()[0].replicas;
                assert!(r.iter().any(|&n| n != down));
            }
        }
        assert_eq!(Plan::from_toml(&plan.to_toml()).unwrap(), plan);
    }
    // More copies than nodes: every node holds every expert, once.
    let all = Plan::even(&names(2), &shape, false).with_replicas(5);
    let resolved = all.resolve(&shape).unwrap();
    assert_eq!(
        resolved.slices(1, Part::Routed, 0).unwrap()[0].replicas,
        vec![0, 1]
    );
    // Sliced experts are left alone.
    let sliced = Plan::even_sliced(&names(2), &shape, false);
    assert_eq!(sliced.clone().with_replicas(2), sliced);
}

#[test]
fn even_plan_alternates_the_larger_dense_share() {
    // Shared experts of 768 rows = 3 blocks over 2 nodes: 2+1, then 1+2, ...
    let mut shape = moe_shape();
    for l in &mut shape.layers[1..] {
        l.dense = ffn(768, 256);
    }
    let plan = Plan::even(&names(2), &shape, true).resolve(&shape).unwrap();
    let shares = |layer| -> Vec<(Range<usize>, Vec<usize>)> {
        plan.slices(layer, Part::Dense, 0)
            .unwrap()
            .iter()
            .map(|s| (s.ff.clone(), s.replicas.clone()))
            .collect()
    };
    assert_eq!(shares(1), [(0..256, vec![0]), (256..768, vec![1])]);
    assert_eq!(shares(2), [(0..512, vec![0]), (512..768, vec![1])]);
    assert_eq!(shares(3), [(0..256, vec![0]), (256..768, vec![1])]);
    // Three nodes, 3 blocks: one each, no leftovers.
    let plan3 = Plan::even(&names(3), &shape, true).resolve(&shape).unwrap();
    assert_eq!(plan3.slices(2, Part::Dense, 0).unwrap().len(), 3);
    // More nodes than experts: the extra nodes get no routed experts.
    let plan9 = Plan::even(&names(9), &shape, false);
    let resolved = plan9.resolve(&shape).unwrap();
    assert!(resolved.node_slices(0).is_empty());
    assert_eq!(resolved.node_slices(8).len(), 3);
    // A dense model: nothing routed to place.
    let dense_only = ModelShape {
        n_layer: 2,
        n_expert: 0,
        layers: vec![
            LayerShape {
                routed: None,
                dense: ffn(512, 32)
            };
            2
        ],
    };
    let plan = Plan::even(&names(2), &dense_only, false);
    assert!(plan.entries.is_empty());
    plan.resolve(&dense_only).unwrap();
}

#[test]
fn bad_plans_are_refused_with_named_errors() {
    let routed = |layers: &str, experts: &str, ff: &str, nodes: &str| {
        format!("[[place]]\npart = \"routed\"\nlayers = \"{layers}\"\nexperts = \"{experts}\"\n{ff}\nnodes = {nodes}\n")
    };
    let all_but = |missing_expert: usize| {
        let mut text = String::new();
        for e in (0..8).filter(|&e| e != missing_expert) {
            text += &routed("1-3", &e.to_string(), "", "[\"node0\"]");
        }
        text
    };
    // Gap: rows 256..512 of experts 4-7 in no entry.
    check_refused(
        &(routed("1-3", "0-3", "", "[\"node0\"]")
            + &routed("1-3", "4-7", "ff = [0, 256]", "[\"node1\"]")
            + &routed("1-3", "4-7", "ff = [512, 768]", "[\"node1\"]")),
        "layer 1 expert 4 rows 256..512 are not placed",
    );
    // Gap at the end.
    check_refused(
        &(routed("1-3", "0-3", "", "[\"node0\"]")
            + &routed("1-3", "4-7", "ff = [0, 512]", "[\"node1\"]")),
        "layer 1 expert 4 rows 512..768 are not placed",
    );
    // Overlap.
    check_refused(
        &(routed("1-3", "0-7", "ff = [0, 512]", "[\"node0\"]")
            + &routed("1-3", "0-7", "ff = [256, 768]", "[\"node1\"]")),
        "plan entry 2: layer 1 expert 0 rows 256..768 overlap entry 1's rows 0..512",
    );
    check_refused(
        &(routed("1-3", "0-7", "", "[\"node0\"]")
            + &routed("2", "5", "ff = [0, 256]", "[\"node1\"]")),
        "plan entry 2: layer 2 expert 5 rows 0..256 overlap entry 1's rows 0..768",
    );
    // Unknown node.
    check_refused(
        &(routed("1-3", "0-3", "", "[\"node0\"]") + &routed("1-3", "4-7", "", "[\"nod1\"]")),
        "unknown node \"nod1\" in entry 2 (nodes: node0, node1)",
    );
    // Unaligned cuts.
    check_refused(
        &(routed("1-3", "0-7", "ff = [0, 300]", "[\"node0\"]")
            + &routed("1-3", "0-7", "ff = [300, 768]", "[\"node1\"]")),
        "plan entry 1: layer 1 expert 0 rows 0..300: 300 is not a multiple of ffn_down's block size 256 (cuts must fall on quant-block boundaries)",
    );
    check_refused(
        &routed("1-3", "0-7", "ff = [100, 768]", "[\"node0\"]"),
        "plan entry 1: layer 1 expert 0 rows 100..768: 100 is not a multiple of ffn_down's block size 256 (cuts must fall on quant-block boundaries)",
    );
    // Missing expert.
    check_refused(&all_but(3), "layer 1 expert 3 is not placed");
    // Layer out of range; a huge range is refused before it is expanded.
    check_refused(
        &routed("1-4", "0-7", "", "[\"node0\"]"),
        "plan entry 1: layer 4 is out of range (the model has 4 layers)",
    );
    check_refused(
        &routed("1-18446744073709551615", "0-7", "", "[\"node0\"]"),
        "plan entry 1: layer 4 is out of range (the model has 4 layers)",
    );
    // Expert out of range.
    check_refused(
        &routed("1-3", "0-8", "", "[\"node0\"]"),
        "plan entry 1: expert 8 is out of range (the model has 8 experts per layer)",
    );
    // Routed experts on the dense layer.
    check_refused(
        &routed("0-3", "0-7", "", "[\"node0\"]"),
        "plan entry 1: layer 0 has no routed experts",
    );
    // Rows past n_ff.
    check_refused(
        &routed("1-3", "0-7", "ff = [0, 1024]", "[\"node0\"]"),
        "plan entry 1: layer 1 expert 0 rows 0..1024 end past n_ff = 768",
    );
    // One node twice for the same slice.
    check_refused(
        &(routed("1-3", "0-7", "", "[\"node0\"]")
            + &routed("2", "1", "", "[\"node1\", \"node0\"]")),
        "plan entry 2: layer 2 expert 1 rows 0..768 are already on node \"node0\" (entry 1)",
    );
    check_refused(
        &routed("1-3", "0-7", "", "[\"node0\", \"node0\"]"),
        "plan entry 1: node \"node0\" is listed twice",
    );
    check_refused(
        &routed("1-3", "0-7", "", "[]"),
        "plan entry 1: nodes is empty: name at least one node",
    );
    // A dense part half placed.
    check_refused(
        &(routed("1-3", "0-7", "", "[\"node0\"]")
            + "[[place]]\npart = \"dense\"\nlayers = \"0\"\nff = [0, 512]\nnodes = [\"node0\"]\n"),
        "layer 0 dense part rows 512..1024 are not placed",
    );
    check_refused(
        &(routed("1-3", "0-7", "", "[\"node0\"]")
            + "[[place]]\npart = \"dense\"\nlayers = \"0\"\nexperts = \"1\"\nnodes = [\"node0\"]\n"),
        "plan entry 2: experts = \"1\": a dense part has only expert 0 (leave experts out)",
    );
    check_refused(
        &routed("1-3", "0-7", "ff = [512, 512]", "[\"node0\"]"),
        "plan entry 1: ff = [512, 512] is empty (write [start, end] with end exclusive and larger than start)",
    );
    check_refused(
        &routed("1-3", "0-7", "ff = [0]", "[\"node0\"]"),
        "plan entry 1: ff = [0] is not [start, end] (two non-negative integers, end exclusive)",
    );
    check_refused(
        &routed("1-3", "7-0", "", "[\"node0\"]"),
        "plan entry 1: experts \"7-0\": range \"7-0\" runs backwards (write 0-7)",
    );
    check_refused(
        "[[place]]\npart = \"routed\"\nlayers = \"1-3\"\nnodes = [\"node0\"]\n",
        "plan entry 1: part = \"routed\" needs experts (like experts = \"0-63\")",
    );
}

#[test]
fn bad_plan_files_are_refused() {
    let refused = |text: &str| Plan::from_toml(text).unwrap_err().to_string();
    // Unknown keys, at the top and in an entry, with their line.
    let err = refused("version = 1\nnodes = [\"a\"]\nnode = [\"b\"]\n");
    assert!(
        err.contains("line 3") && err.contains("unknown field `node`"),
        "{err}"
    );
    let err = refused("version = 1\nnodes = [\"a\"]\n[[place]]\npart = \"routed\"\nlayers = \"0\"\nexperts = \"0\"\nnodes = [\"a\"]\nreplicas = 2\n");
    assert!(
        err.contains("line 8") && err.contains("unknown field `replicas`"),
        "{err}"
    );
    let err = refused("version = 1\nnodes = [\"a\"]\n[[place]]\npart = \"shared\"\nlayers = \"0\"\nnodes = [\"a\"]\n");
    assert!(
        err.contains("line 4") && err.contains("unknown variant `shared`"),
        "{err}"
    );
    let err = refused("version = 1\nnodes = [\"a\"\n");
    assert!(err.contains("TOML parse error"), "{err}");
    assert!(refused("nodes = [\"a\"]\n").contains("missing field `version`"));
    assert_eq!(
        refused("version = 2\nnodes = [\"a\"]\n"),
        "unsupported plan version 2 (this build reads version 1)"
    );
    assert_eq!(
        refused("version = 1\nmodel_identity = \"abc\"\nnodes = [\"a\"]\n"),
        "model_identity \"abc\" is not 64 hex digits"
    );
    assert_eq!(
        refused("version = 1\nnodes = []\n"),
        "plan nodes: the list is empty"
    );
    assert_eq!(
        refused("version = 1\nnodes = [\"a\", \"a\"]\n"),
        "plan nodes: \"a\" is listed twice"
    );
    assert!(refused("version = 1\nnodes = [\"../etc\"]\n").contains("not a valid node name"));
}

#[test]
fn plan_identity_is_checked() {
    let mut plan = Plan::even(&names(1), &moe_shape(), false);
    plan.check_identity(&[7; 32]).unwrap();
    plan.model_identity = Some([1; 32]);
    plan.check_identity(&[1; 32]).unwrap();
    let err = plan.check_identity(&[2; 32]).unwrap_err().to_string();
    assert_eq!(
        err,
        format!(
            "the plan is for model {}, but this model is {}",
            "01".repeat(32),
            "02".repeat(32)
        )
    );
    assert_eq!(
        plan.resolve(&moe_shape()).unwrap().model_identity(),
        Some([1; 32])
    );
}

// ---- cluster files ----------------------------------------------------------

const CLUSTER: &str = r#"
[[node]]
name = "node0"
address = "127.0.0.1:7001"
transport = "grpc"
numa_node = 0
memory_bytes = 412316860416
read_bandwidth_gbs = 80

[[node]]
name = "node1"
address = "host-b.example:7002"
transport = "quic"
cert = "certs/node1.pem"

[[node]]
name = "node2"
address = "[::1]:7003"
transport = "quic"
cert = "/etc/moeshard/node2.pem"
server_name = "node2.internal"
read_bandwidth_gbs = 12.5
"#;

#[test]
fn cluster_parses_and_round_trips() {
    let base = Path::new("/srv/cluster");
    let cluster = Cluster::from_toml(CLUSTER, base).unwrap();
    assert_eq!(cluster.nodes.len(), 3);
    let n0 = &cluster.nodes[0];
    assert_eq!(
        (
            n0.transport.as_str(),
            n0.cert.as_ref(),
            n0.server_name.as_str()
        ),
        ("grpc", None, DEFAULT_SERVER_NAME)
    );
    assert_eq!(
        (n0.numa_node, n0.memory_bytes, n0.read_bandwidth_gbs),
        (Some(0), Some(412_316_860_416), Some(80.0))
    );
    assert_eq!(
        cluster.nodes[1].cert.as_deref(),
        Some(Path::new("/srv/cluster/certs/node1.pem"))
    );
    assert_eq!(
        cluster.node("node2").unwrap().cert.as_deref(),
        Some(Path::new("/etc/moeshard/node2.pem"))
    );
    assert_eq!(cluster.nodes[2].server_name, "node2.internal");
    let again = Cluster::from_toml(&cluster.to_toml(), Path::new("/elsewhere")).unwrap();
    assert_eq!(again, cluster);

    cluster
        .check_plan(&Plan::even(&names(3), &moe_shape(), false))
        .unwrap();
    assert_eq!(
        cluster
            .check_plan(&Plan::even(&names(4), &moe_shape(), false))
            .unwrap_err()
            .to_string(),
        "cluster: the plan's node \"node3\" is not in the cluster (nodes: node0, node1, node2)"
    );

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cluster.toml");
    std::fs::write(&path, CLUSTER).unwrap();
    let loaded = Cluster::load(&path).unwrap();
    assert_eq!(
        loaded.nodes[1].cert.as_deref(),
        Some(&*dir.path().join("certs/node1.pem"))
    );
}

#[test]
fn bad_clusters_are_refused() {
    let node = |name: &str, address: &str, transport: &str, extra: &str| {
        format!("[[node]]\nname = \"{name}\"\naddress = \"{address}\"\ntransport = \"{transport}\"\n{extra}\n")
    };
    let refused = |text: &str| {
        Cluster::from_toml(text, Path::new(""))
            .unwrap_err()
            .to_string()
    };
    let ok = node("a", "10.0.0.1:1", "grpc", "");
    assert_eq!(refused(""), "cluster: no nodes (add [[node]] tables)");
    assert_eq!(
        refused(&(ok.clone() + &node("a", "10.0.0.2:1", "grpc", ""))),
        "cluster node 2 (\"a\"): the name is also used by node 1"
    );
    assert_eq!(
        refused(&node("", "10.0.0.1:1", "grpc", "")),
        "cluster node 1 (\"\"): not a valid node name (1 to 64 letters, digits, '.', '_' or '-', not starting with '.')"
    );
    assert_eq!(
        refused(&node("a", "10.0.0.1", "grpc", "")),
        "cluster node 1 (\"a\"): address \"10.0.0.1\": expected host:port"
    );
    assert_eq!(
        refused(&node("a", "host:99999", "grpc", "")),
        "cluster node 1 (\"a\"): address \"host:99999\": port \"99999\" is not a number from 0 to 65535"
    );
    assert!(refused(&node("a", "bad host:1", "grpc", "")).contains("is not a host name"));
    assert!(refused(&node("a", "::1:7001", "grpc", "")).contains("IPv6 address goes in brackets"));
    assert_eq!(
        refused(&node("a", "h:1", "tcp", "")),
        "cluster node 1 (\"a\"): transport \"tcp\" is not one of grpc, quic"
    );
    assert_eq!(
        refused(&node("a", "h:1", "quic", "")),
        "cluster node 1 (\"a\"): transport quic needs cert (the node's certificate, PEM)"
    );
    assert!(
        refused(&node("a", "h:1", "grpc", "read_bandwidth_gbs = -1.0"))
            .contains("not a positive number")
    );
    assert!(refused(&node("a", "h:1", "grpc", "memory_bytes = 0")).contains("memory_bytes is 0"));
    let err = refused(&node("a", "h:1", "grpc", "numa = 1"));
    assert!(
        err.contains("unknown field `numa`") && err.contains("line 5"),
        "{err}"
    );
    let err = refused("[[nodes]]\nname = \"a\"\n");
    assert!(err.contains("unknown field `nodes`"), "{err}");
}

// ---- model shapes -----------------------------------------------------------

#[test]
fn model_shapes_of_fixtures() {
    let file = GgufFile::open(fixture("deepseek2/model-q8_0.gguf")).unwrap();
    let shape = ModelShape::from_gguf(&file).unwrap();
    assert_eq!((shape.n_layer, shape.n_expert), (2, 8));
    assert_eq!(
        shape.layers[0],
        LayerShape {
            routed: None,
            dense: ffn(512, 32)
        }
    );
    assert_eq!(
        shape.layers[1],
        LayerShape {
            routed: ffn(256, 32),
            dense: ffn(256, 32)
        }
    );

    let file = GgufFile::open(fixture("qwen3moe/model-q4_k_m.gguf")).unwrap();
    let shape = ModelShape::from_gguf(&file).unwrap();
    assert_eq!(
        shape.layers[0],
        LayerShape {
            routed: ffn(256, 256),
            dense: None
        }
    );
    // Layer 1's down is Q6_K: still 256.
    assert_eq!(shape.layers[1].routed, ffn(256, 256));

    let dir = tempfile::tempdir().unwrap();
    let merged = merged_model(dir.path(), false);
    let shape = ModelShape::from_gguf(&GgufFile::open(&merged).unwrap()).unwrap();
    assert_eq!(
        shape.layers,
        vec![
            LayerShape {
                routed: ffn(128, 32),
                dense: None
            };
            2
        ]
    );

    let broken = merged_model(dir.path(), true);
    let err = ModelShape::from_gguf(&GgufFile::open(&broken).unwrap()).unwrap_err();
    assert_eq!(
        err.to_string(),
        "blk.1.ffn_gate_up_exps.weight has shape [64, 128, 4], expected [64, 256, 4]"
    );
}

// ---- split files ------------------------------------------------------------

/// A small qwen3moe-shaped file with a merged `ffn_gate_up_exps` (Q8_0, random
/// bytes): 2 layers, 4 experts of 128 rows, n_embd 64. With `broken`, layer 1's
/// merged tensor has only n_ff rows.
fn merged_model(dir: &Path, broken: bool) -> PathBuf {
    let path = dir.join(if broken { "broken.gguf" } else { "merged.gguf" });
    let kv = |k: &str, v: MetaValue| (k.to_string(), v);
    let metadata = vec![
        kv("general.architecture", "qwen3moe".into()),
        kv("qwen3moe.block_count", MetaValue::U32(2)),
        kv("qwen3moe.embedding_length", MetaValue::U32(64)),
        kv("qwen3moe.attention.head_count", MetaValue::U32(4)),
        kv("qwen3moe.vocab_size", MetaValue::U32(16)),
        kv("qwen3moe.expert_count", MetaValue::U32(4)),
        kv("qwen3moe.expert_used_count", MetaValue::U32(2)),
        kv("qwen3moe.expert_feed_forward_length", MetaValue::U32(128)),
        kv("split.count", MetaValue::U16(0)),
    ];
    let mut tensors = Vec::new();
    for layer in 0..2u64 {
        let rows = if broken && layer == 1 { 128 } else { 256 };
        tensors.push(TensorDesc::new(
            format!("blk.{layer}.ffn_gate_up_exps.weight"),
            GgmlType::Q8_0,
            [64, rows, 4],
        ));
        tensors.push(TensorDesc::new(
            format!("blk.{layer}.ffn_down_exps.weight"),
            GgmlType::Q8_0,
            [128, 64, 4],
        ));
    }
    let mut w = GgufWriter::create(&path, metadata, tensors).unwrap();
    let mut rng = SplitMix64::new(42);
    while let Some(t) = w.next_tensor() {
        let data: Vec<u8> = (0..t.byte_len).map(|_| rng.next_u64() as u8).collect();
        w.write_tensor_data(&data).unwrap();
    }
    w.finish().unwrap();
    path
}

/// Rows `ff` (plus `row_offset` within each expert's block of `rows_per_expert`)
/// of expert `expert` of tensor `name`, row by row.
fn expected_rows(
    file: &GgufFile,
    name: &str,
    expert: usize,
    rows_per_expert: usize,
    row_offset: usize,
    ff: Range<usize>,
) -> Vec<u8> {
    let info = file.tensor(name).unwrap();
    let data = file.tensor_data(info);
    let row_bytes = info.ty.row_bytes(info.ne[0] as usize).unwrap();
    let mut out = Vec::new();
    for r in ff {
        let row = expert * rows_per_expert + row_offset + r;
        out.extend_from_slice(&data[row * row_bytes..(row + 1) * row_bytes]);
    }
    out
}

/// The rows of expert `expert`'s `down` that a slice of rows `ff` of gate and up computes
/// (`slice_down_rows`), whole.
fn expected_down_rows(file: &GgufFile, name: &str, expert: usize, ff: Range<usize>) -> Vec<u8> {
    let info = file.tensor(name).unwrap();
    let (n_ff, n_embd) = (info.ne[0] as usize, info.ne[1] as usize);
    let rows = super::slice_down_rows(ff.start, ff.len(), n_ff, n_embd);
    expected_rows(file, name, expert, n_embd, 0, rows)
}

/// Writes every node's split file and checks each against the original.
fn split_and_check(model_path: &Path, plan: &Plan, dir: &Path) -> Vec<PathBuf> {
    let model = GgufFile::open(model_path).unwrap();
    let shape = ModelShape::from_gguf(&model).unwrap();
    let resolved = plan.resolve(&shape).unwrap();
    let identity = model_identity(&model);
    let mut paths = Vec::new();
    for node in 0..resolved.nodes().len() {
        let name = &resolved.nodes()[node];
        let out = dir.join(split_file_name(model_path, name));
        let mut last = (0, 0);
        let mut calls = 0;
        let size = write_node_file(&model, &resolved, node, &out, &mut |done, total| {
            assert!(done >= last.0 && done <= total);
            last = (done, total);
            calls += 1;
        })
        .unwrap();
        assert_eq!(last.0, last.1, "progress ends at the total");
        assert!(calls >= 2);
        assert_eq!(size, std::fs::metadata(&out).unwrap().len());

        let split = GgufFile::open(&out).unwrap();
        let info = read_split_info(&split).unwrap().unwrap();
        let slices = resolved.node_slices(node);
        assert_eq!(
            info,
            SplitInfo {
                model_identity: identity,
                node: name.clone(),
                slices: slices.clone()
            }
        );
        assert_eq!(
            split.tensors().len(),
            3 * slices.len(),
            "nothing but the slices"
        );
        // The original's metadata in order (less split.*), then the three keys.
        let original: Vec<_> = model
            .metadata()
            .iter()
            .filter(|(k, _)| !k.starts_with("split."))
            .collect();
        let n = original.len();
        assert_eq!(
            split.metadata().iter().take(n).collect::<Vec<_>>(),
            original
        );
        let keys: Vec<&str> = split.metadata()[n..]
            .iter()
            .map(|(k, _)| k.as_str())
            .collect();
        assert_eq!(keys, [KEY_MODEL_IDENTITY, KEY_NODE, KEY_SLICES]);

        for s in &slices {
            let (layer, expert, ff) = (s.layer as usize, s.expert as usize, s.ff());
            let blk = |m: &str| format!("blk.{layer}.{m}.weight");
            let (gate, up, down) = match s.part {
                Part::Routed if model.tensor(&blk("ffn_gate_up_exps")).is_some() => {
                    let n_ff = shape.layers[layer].routed.unwrap().n_ff;
                    let merged = blk("ffn_gate_up_exps");
                    (
                        expected_rows(&model, &merged, expert, 2 * n_ff, 0, ff.clone()),
                        expected_rows(&model, &merged, expert, 2 * n_ff, n_ff, ff.clone()),
                        expected_down_rows(&model, &blk("ffn_down_exps"), expert, ff.clone()),
                    )
                }
                Part::Routed => {
                    let n_ff = shape.layers[layer].routed.unwrap().n_ff;
                    (
                        expected_rows(&model, &blk("ffn_gate_exps"), expert, n_ff, 0, ff.clone()),
                        expected_rows(&model, &blk("ffn_up_exps"), expert, n_ff, 0, ff.clone()),
                        expected_down_rows(&model, &blk("ffn_down_exps"), expert, ff.clone()),
                    )
                }
                Part::Dense => {
                    let sfx = if shape.layers[layer].routed.is_some() {
                        "_shexp"
                    } else {
                        ""
                    };
                    // A slice holds whole rows of down (the exact two-round split).
                    let down = blk(&format!("ffn_down{sfx}"));
                    (
                        expected_rows(&model, &blk(&format!("ffn_gate{sfx}")), 0, 0, 0, ff.clone()),
                        expected_rows(&model, &blk(&format!("ffn_up{sfx}")), 0, 0, 0, ff.clone()),
                        expected_down_rows(&model, &down, 0, ff.clone()),
                    )
                }
            };
            for (matrix, expected) in [("ffn_gate", gate), ("ffn_up", up), ("ffn_down", down)] {
                let name = split_tensor_name(s.layer, s.part, s.expert, matrix);
                let t = split.tensor(&name).unwrap();
                assert_eq!(split.tensor_data(t), &expected[..], "{name}");
            }
        }
        paths.push(out);
    }
    paths
}

#[test]
fn split_moe_fixture_over_two_nodes() {
    // deepseek2 Q8_0: 32-element blocks, so experts can be cut. Experts 0-5 of
    // layer 1 in two slices, 6-7 whole on both nodes; the dense FFN sliced, the
    // shared expert on node1.
    let path = fixture("deepseek2/model-q8_0.gguf");
    let model = GgufFile::open(&path).unwrap();
    let text = format!(
        r#"version = 1
model_identity = "{}"
nodes = ["node0", "node1"]
[[place]]
part = "routed"
layers = "1"
experts = "0-5"
ff = [0, 96]
nodes = ["node0"]
[[place]]
part = "routed"
layers = "1"
experts = "0-5"
ff = [96, 256]
nodes = ["node1"]
[[place]]
part = "routed"
layers = "1"
experts = "6-7"
nodes = ["node1", "node0"]
[[place]]
part = "dense"
layers = "0"
ff = [0, 320]
nodes = ["node0"]
[[place]]
part = "dense"
layers = "0"
ff = [320, 512]
nodes = ["node1"]
[[place]]
part = "dense"
layers = "1"
nodes = ["node1"]
"#,
        identity_hex(&model_identity(&model))
    );
    let plan = Plan::from_toml(&text).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let paths = split_and_check(&path, &plan, dir.path());
    assert_eq!(
        paths,
        [
            dir.path().join("model-q8_0.node0.gguf"),
            dir.path().join("model-q8_0.node1.gguf")
        ]
    );
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| n.to_string_lossy().ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    let node0 = read_split_info(&GgufFile::open(&paths[0]).unwrap())
        .unwrap()
        .unwrap();
    assert_eq!(
        node0.slices[..2],
        [
            SliceSpec {
                layer: 0,
                part: Part::Dense,
                expert: 0,
                ff_start: 0,
                ff_len: 320
            },
            SliceSpec {
                layer: 1,
                part: Part::Routed,
                expert: 0,
                ff_start: 0,
                ff_len: 96
            },
        ]
    );
    assert_eq!(node0.slices.len(), 1 + 6 + 2);

    // A node with two slices of one expert cannot be written: names hold no rows.
    let two = text.replace(
        "ff = [96, 256]\nnodes = [\"node1\"]",
        "ff = [96, 256]\nnodes = [\"node1\", \"node0\"]",
    );
    assert_ne!(two, text);
    let resolved = Plan::from_toml(&two)
        .unwrap()
        .resolve(&ModelShape::from_gguf(&model).unwrap())
        .unwrap();
    let out = dir.path().join("two.gguf");
    let err = write_node_file(&model, &resolved, 0, &out, &mut |_, _| {}).unwrap_err();
    assert_eq!(
        err.to_string(),
        "split file: the plan gives node \"node0\" two slices of layer 1 expert 0 (rows 0..96 and 96..256); a split file holds one slice per expert (serve this node from the whole model file, or give it one slice per expert)"
    );
    assert!(!out.exists());
    // An ordinary model file is not a split file.
    assert_eq!(read_split_info(&model).unwrap(), None);
}

#[test]
fn split_even_plans_of_fixtures() {
    let dir = tempfile::tempdir().unwrap();
    // K-quants (whole experts, 2-block dense FFN halved), with and without dense parts.
    for (rel, n_nodes, split_dense) in [
        ("glm4moe/model-q4_k_m.gguf", 2, true),
        ("qwen3moe/model-q2_k.gguf", 3, false),
        ("deepseek2/model-q2_k.gguf", 1, true),
    ] {
        let path = fixture(rel);
        let model = GgufFile::open(&path).unwrap();
        let shape = ModelShape::from_gguf(&model).unwrap();
        let plan = Plan::even(&names(n_nodes), &shape, split_dense);
        let sub = dir.path().join(rel.replace('/', "_"));
        std::fs::create_dir(&sub).unwrap();
        split_and_check(&path, &plan, &sub);
    }
}

#[test]
fn split_merged_gate_up() {
    let dir = tempfile::tempdir().unwrap();
    let path = merged_model(dir.path(), false);
    let model = GgufFile::open(&path).unwrap();
    let shape = ModelShape::from_gguf(&model).unwrap();
    // 128 rows = 4 blocks of 32: cut at 32 and 96 over three nodes.
    let text = r#"version = 1
nodes = ["a", "b", "c"]
[[place]]
part = "routed"
layers = "0-1"
experts = "0-3"
ff = [0, 32]
nodes = ["b"]
[[place]]
part = "routed"
layers = "0-1"
experts = "0-3"
ff = [32, 96]
nodes = ["a"]
[[place]]
part = "routed"
layers = "0-1"
experts = "0-3"
ff = [96, 128]
nodes = ["c"]
"#;
    let plan = Plan::from_toml(text).unwrap();
    plan.resolve(&shape).unwrap();
    let out = split_and_check(&path, &plan, dir.path());
    // The original's split.count = 0 is not copied: the node file is one file.
    let split = GgufFile::open(&out[1]).unwrap();
    assert!(split.get("split.count").is_none());
    let info = read_split_info(&split).unwrap().unwrap();
    assert_eq!(info.slices.len(), 2 * 4);
    // Node b holds rows 0..32 of every expert.
    assert!(
        info.slices.iter().all(|s| s.ff() == (0..32)),
        "{:?}",
        info.slices
    );
}

#[test]
fn failed_split_leaves_no_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = fixture("deepseek2/model-q8_0.gguf");
    let model = GgufFile::open(&path).unwrap();
    let shape = ModelShape::from_gguf(&model).unwrap();
    let plan = Plan::even(&names(2), &shape, true);
    let resolved = plan.resolve(&shape).unwrap();
    let out = dir.path().join("node0.gguf");
    let tmp = dir.path().join("node0.gguf.tmp");

    // Interrupted half way (the progress callback unwinds, as a cancelled run would).
    let mut wrote_to_tmp = true;
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        write_node_file(&model, &resolved, 0, &out, &mut |done, total| {
            wrote_to_tmp &= tmp.exists() && !out.exists();
            if done > total / 2 {
                panic!("interrupted (on purpose, by the test)");
            }
        })
    }));
    assert!(result.is_err());
    assert!(wrote_to_tmp, "writing goes to the temporary name");
    assert!(!out.exists() && !tmp.exists());

    // A plan for another model.
    let mut other = plan.clone();
    other.model_identity = Some([9; 32]);
    let err = write_node_file(
        &model,
        &other.resolve(&shape).unwrap(),
        0,
        &out,
        &mut |_, _| {},
    )
    .unwrap_err()
    .to_string();
    assert_eq!(
        err,
        format!(
            "the plan is for model {}, but this model is {}",
            "09".repeat(32),
            identity_hex(&model_identity(&model))
        )
    );
    // A plan resolved against another shape.
    let mut wrong_shape = shape.clone();
    wrong_shape.layers[1].dense = None;
    let resolved_wrong = Plan::even(&names(2), &wrong_shape, false)
        .resolve(&wrong_shape)
        .unwrap();
    let err = write_node_file(&model, &resolved_wrong, 0, &out, &mut |_, _| {}).unwrap_err();
    assert!(err.to_string().contains("another shape"), "{err}");
    // A node the plan does not have.
    let err = write_node_file(&model, &resolved, 2, &out, &mut |_, _| {}).unwrap_err();
    assert!(
        err.to_string().contains("node index 2 is out of range"),
        "{err}"
    );
    assert!(!out.exists() && !tmp.exists());

    // Splitting a split file is refused.
    write_node_file(&model, &resolved, 0, &out, &mut |_, _| {}).unwrap();
    let split = GgufFile::open(&out).unwrap();
    let again = dir.path().join("again.gguf");
    let err = write_node_file(&split, &resolved, 0, &again, &mut |_, _| {}).unwrap_err();
    assert!(err.to_string().contains("is itself a split file"), "{err}");
    assert!(!again.exists());
}

/// An edit of a file's metadata and tensor list.
type Edit<'a> = &'a dyn Fn(&mut Vec<(String, MetaValue)>, &mut Vec<TensorDesc>);

/// Rewrites `src` with `edit` applied to its metadata and tensor list.
fn rewrite(
    src: &GgufFile,
    out: &Path,
    edit: impl FnOnce(&mut Vec<(String, MetaValue)>, &mut Vec<TensorDesc>),
) -> GgufFile {
    let mut metadata = src.metadata().to_vec();
    let mut descs: Vec<TensorDesc> = src
        .tensors()
        .iter()
        .map(|t| TensorDesc::new(t.name.clone(), t.ty, t.ne.clone()))
        .collect();
    edit(&mut metadata, &mut descs);
    let mut w = GgufWriter::create(out, metadata, descs.clone()).unwrap();
    for d in &descs {
        match src.tensor(&d.name) {
            Some(t) if t.ne == d.ne => w.write_tensor_data(src.tensor_data(t)).unwrap(),
            _ => w.skip_tensor_data().unwrap(),
        }
    }
    w.finish().unwrap();
    GgufFile::open(out).unwrap()
}

#[test]
fn malformed_split_metadata_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = fixture("deepseek2/model-q8_0.gguf");
    let model = GgufFile::open(&path).unwrap();
    let shape = ModelShape::from_gguf(&model).unwrap();
    let resolved = Plan::even(&names(2), &shape, true).resolve(&shape).unwrap();
    let good_path = dir.path().join("good.gguf");
    write_node_file(&model, &resolved, 1, &good_path, &mut |_, _| {}).unwrap();
    let good = GgufFile::open(&good_path).unwrap();
    let first = resolved.node_slices(1)[0];
    let down = split_tensor_name(first.layer, first.part, first.expert, "ffn_down");

    let out = dir.path().join("bad.gguf");
    let check = |edit: Edit<'_>, expected: &str| {
        let bad = rewrite(&good, &out, edit);
        let err = read_split_info(&bad).unwrap_err().to_string();
        assert!(err.starts_with("split file: "), "{err}");
        assert!(err.contains(expected), "{err}\nexpected: {expected}");
    };
    let set = |metadata: &mut Vec<(String, MetaValue)>, key: &str, value: MetaValue| {
        metadata.iter_mut().find(|(k, _)| k == key).unwrap().1 = value;
    };
    let slices_with = |edit: &dyn Fn(&mut Vec<u32>)| {
        let mut v: Vec<u32> = good
            .get(KEY_SLICES)
            .unwrap()
            .as_array()
            .unwrap()
            .as_u32_vec()
            .unwrap();
        edit(&mut v);
        MetaValue::Array(MetaArray::new(
            MetaType::U32,
            v.into_iter().map(MetaValue::U32).collect(),
        ))
    };

    check(
        &|m, _| m.retain(|(k, _)| k != KEY_NODE),
        "but not moeshard.split.node",
    );
    check(
        &|m, _| set(m, KEY_MODEL_IDENTITY, "xyz".into()),
        "not 64 hex digits",
    );
    check(&|m, _| set(m, KEY_NODE, "a/b".into()), "not a node name");
    check(
        &|m, _| set(m, KEY_SLICES, MetaValue::U32(1)),
        "not an array of u32",
    );
    check(
        &|m, _| set(m, KEY_SLICES, slices_with(&|v| v.truncate(4))),
        "has 4 values, not five per slice",
    );
    check(
        &|m, _| set(m, KEY_SLICES, slices_with(&|v| v[1] = 7)),
        "part 7 is not 0 (routed) or 1 (dense)",
    );
    check(
        &|m, _| set(m, KEY_SLICES, slices_with(&|v| v[0] = 5)),
        "the model has 2 layers",
    );
    check(
        &|m, _| {
            let swapped = slices_with(&|v| {
                let (a, b) = v.split_at_mut(10);
                a[5..10].swap_with_slice(&mut b[..5]);
            });
            set(m, KEY_SLICES, swapped)
        },
        "must be sorted",
    );
    check(
        &|m, _| {
            let doubled = slices_with(&|v| {
                v.copy_within(0..5, 5);
            });
            set(m, KEY_SLICES, doubled)
        },
        "slices 0 and 1 are both of layer 0 dense expert 0: a split file holds one slice per expert",
    );
    check(
        &|_, t| t.retain(|d| d.name != down),
        &format!("tensor {down} is missing"),
    );
    check(
        &|_, t| {
            let d = t.iter_mut().find(|d| d.name == down).unwrap();
            d.ne = vec![d.ne[0], d.ne[1] / 2];
        },
        "expected [",
    );
    // And the good file reads back.
    assert_eq!(read_split_info(&good).unwrap().unwrap().node, "node1");
}

#[test]
fn split_names() {
    assert_eq!(
        split_tensor_name(3, Part::Routed, 17, "ffn_down"),
        "moeshard.blk.3.routed.17.ffn_down"
    );
    assert_eq!(
        split_tensor_name(0, Part::Dense, 0, "ffn_gate"),
        "moeshard.blk.0.dense.0.ffn_gate"
    );
    assert_eq!(
        split_file_name(Path::new("/m/Kimi-K2-Q4_K_M-00001-of-00013.gguf"), "node1"),
        PathBuf::from("Kimi-K2-Q4_K_M.node1.gguf")
    );
    assert_eq!(
        split_file_name(Path::new("model.gguf"), "n0"),
        PathBuf::from("model.n0.gguf")
    );
    assert_eq!(Part::from_id(Part::Dense.id()), Some(Part::Dense));
    assert_eq!(Part::from_id(2), None);
    assert_eq!(
        parse_identity_hex(&identity_hex(&[0x5a; 32])),
        Some([0x5a; 32])
    );
    assert_eq!(parse_identity_hex(&"g".repeat(64)), None);
}

// ---- docs/placement.md --------------------------------------------------------

/// The TOML examples of `docs/placement.md`, in order.
fn doc_examples() -> Vec<String> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/placement.md");
    let text = std::fs::read_to_string(path).unwrap();
    text.split("```toml\n")
        .skip(1)
        .map(|block| block.split("```").next().unwrap().to_string())
        .collect()
}

#[test]
fn doc_examples_parse_and_resolve() {
    let examples = doc_examples();
    assert_eq!(examples.len(), 2, "a plan and a cluster example");
    // DeepSeek-V3's shape, as the example's comment says.
    let mut layers = vec![
        LayerShape {
            routed: None,
            dense: ffn(18432, 256)
        };
        3
    ];
    layers.extend(vec![
        LayerShape {
            routed: ffn(2048, 256),
            dense: ffn(2048, 256)
        };
        58
    ]);
    let shape = ModelShape {
        n_layer: 61,
        n_expert: 256,
        layers,
    };
    let plan = Plan::from_toml(&examples[0]).unwrap();
    let resolved = plan.resolve(&shape).unwrap();
    assert_eq!(
        resolved.slices(10, Part::Routed, 7).unwrap()[0].replicas,
        vec![0, 2]
    );
    assert_eq!(
        resolved.slices(40, Part::Routed, 200).unwrap()[1].replicas,
        vec![2, 0]
    );
    assert_eq!(resolved.slices(30, Part::Dense, 0), None);
    assert_eq!(resolved.slices(1, Part::Dense, 0).unwrap().len(), 2);

    let cluster = Cluster::from_toml(&examples[1], Path::new("/etc/moeshard")).unwrap();
    cluster.check_plan(&plan).unwrap();
    assert_eq!(
        cluster.nodes[0].cert.as_deref(),
        Some(Path::new("/etc/moeshard/certs/s0.pem"))
    );
}

#[test]
fn sliced_even_plans_give_every_node_a_share_of_every_expert() {
    let shape = moe_shape();
    for n_nodes in 1..=3 {
        let nodes = names(n_nodes);
        let plan = Plan::even_sliced(&nodes, &shape, true);
        let resolved = plan
            .resolve(&shape)
            .unwrap_or_else(|e| panic!("{n_nodes} nodes: {e}\n{}", plan.to_toml()));
        assert_eq!(Plan::from_toml(&plan.to_toml()).unwrap(), plan);
        // 768 rows = 3 blocks of 256.
        let mut larger = vec![0usize; n_nodes];
        for layer in 1..4 {
            for expert in 0..8 {
                let slices = resolved.slices(layer, Part::Routed, expert).unwrap();
                let holders: Vec<usize> = slices.iter().map(|s| s.replicas[0]).collect();
                assert_eq!(
                    holders,
                    (0..n_nodes).collect::<Vec<_>>(),
                    "layer {layer} expert {expert}"
                );
                let sizes: Vec<usize> = slices.iter().map(|s| s.ff.len()).collect();
                assert_eq!(sizes.iter().sum::<usize>(), 768);
                assert!(sizes.iter().all(|&s| s % 256 == 0 && s >= 256));
                let max = *sizes.iter().max().unwrap();
                for (node, &s) in sizes.iter().enumerate() {
                    larger[node] += usize::from(s == max && n_nodes == 2);
                }
            }
        }
        if n_nodes == 2 {
            // 3 blocks over 2 nodes: the larger share alternates, so both get it half the time.
            assert_eq!(larger, vec![12, 12], "larger shares per node");
        }
    }
}

#[test]
fn slice_down_rows_tile_the_hidden_size_at_multiples_of_16() {
    use super::slice_down_rows;
    for (n_ff, n_embd) in [
        (1536usize, 576usize),
        (18432, 7168),
        (512, 100),
        (256, 2048),
    ] {
        for cuts in [
            vec![0, n_ff],
            vec![0, n_ff / 2, n_ff],
            vec![0, 32, 64, n_ff],
        ] {
            let rows: Vec<_> = cuts
                .windows(2)
                .map(|c| slice_down_rows(c[0], c[1] - c[0], n_ff, n_embd))
                .collect();
            assert_eq!(rows[0].start, 0);
            assert_eq!(rows.last().unwrap().end, n_embd);
            for w in rows.windows(2) {
                assert_eq!(w[0].end, w[1].start);
                assert_eq!(w[0].end % 16, 0, "{rows:?}");
            }
        }
    }
    // Half of the ff rows, half of down's rows.
    assert_eq!(slice_down_rows(0, 768, 1536, 576), 0..288);
    assert_eq!(slice_down_rows(768, 768, 1536, 576), 288..576);
}
