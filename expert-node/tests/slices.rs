//! An FFN split over slices computed from the full model file in the two rounds of the
//! exact split (each slice's SwiGLU rows, then its rows of down from the joined hidden
//! rows) gives exactly the whole FFN's output: a dense part, and routed experts (per
//! assignment, then added in routing order as a node holding whole experts adds them).

use std::path::PathBuf;

use expert_node::NodeWeights;
use shared::gguf::GgufFile;
use shared::moe::{
    add_weighted, compute_routed_segments, dense_down_segments, dense_hidden_segments,
    per_slot_rows, routed_down_segments, routed_hidden_segments, slice_answer_width, Assignment,
    ExpertSource, FfnMatrices,
};
use shared::placement::{slice_down_rows, ModelShape, Part, SliceSpec};
use shared::quant::dispatch::Kernels;
use shared::quant::matmul::Activations;

fn fixture(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures")
        .join(rel)
}

fn check(model: PathBuf, layer: u32, n_ff: u32, cut: u32) {
    let whole = SliceSpec {
        layer,
        part: Part::Dense,
        expert: 0,
        ff_start: 0,
        ff_len: n_ff,
    };
    let halves = [
        SliceSpec {
            ff_len: cut,
            ..whole
        },
        SliceSpec {
            ff_start: cut,
            ff_len: n_ff - cut,
            ..whole
        },
    ];
    let w_full = NodeWeights::open(&model, Some(&[whole])).unwrap();
    let w_half = NodeWeights::open(&model, Some(&halves)).unwrap();
    let k = Kernels::get();
    let full = w_full.expert(layer, Part::Dense, 0);
    let n_embd = full[0].gate.n_cols;
    let n_tokens = 3;
    let x: Vec<f32> = (0..n_tokens * n_embd)
        .map(|i| (i * 7919 % 1000) as f32 / 500.0 - 1.0)
        .collect();
    let mut inputs = vec![Activations::quantize(k, full[0].gate.ty, &x, n_embd)];
    if full[0].up.ty.vec_dot_type() != full[0].gate.ty.vec_dot_type() {
        inputs.push(Activations::quantize(k, full[0].up.ty, &x, n_embd));
    }
    let two_rounds = |slices: &[FfnMatrices<'_>], cuts: &[u32]| -> Vec<f32> {
        // Round 1 per slice, joined in ff order.
        let mut hidden = vec![0.0f32; n_tokens * n_ff as usize];
        for (m, ff) in slices.iter().zip(cuts.windows(2)) {
            let w = m.n_ff();
            let mut part = vec![0.0f32; n_tokens * w];
            dense_hidden_segments(k, std::slice::from_ref(m), &inputs, None, &mut part).unwrap();
            for t in 0..n_tokens {
                let dst = t * n_ff as usize + ff[0] as usize;
                hidden[dst..dst + w].copy_from_slice(&part[t * w..(t + 1) * w]);
            }
        }
        let hq = Activations::quantize(k, slices[0].down.ty, &hidden, n_ff as usize);
        // Round 2 per slice: its rows of down, in row order.
        let mut out = vec![0.0f32; n_tokens * n_embd];
        let mut row = 0;
        for m in slices {
            let r = m.down.n_rows;
            let mut part = vec![0.0f32; n_tokens * r];
            dense_down_segments(k, std::slice::from_ref(m), &hq, n_embd, None, &mut part).unwrap();
            for t in 0..n_tokens {
                let dst = t * n_embd + row;
                out[dst..dst + r].copy_from_slice(&part[t * r..(t + 1) * r]);
            }
            row += r;
        }
        assert_eq!(row, n_embd, "the slices' rows of down tile the hidden size");
        out
    };
    let want = two_rounds(&full, &[0, n_ff]);
    let got = two_rounds(&w_half.expert(layer, Part::Dense, 0), &[0, cut, n_ff]);
    assert!(want.iter().all(|v| v.is_finite()));
    let differ = want
        .iter()
        .zip(&got)
        .filter(|(a, b)| a.to_bits() != b.to_bits())
        .count();
    eprintln!("{}: layer {layer}: {differ} values differ", model.display());
    assert_eq!(differ, 0, "the halves differ from the whole");
}

#[test]
fn dense_halves_add_up_to_the_whole() {
    check(fixture("deepseek2/model-q4_k_m.gguf"), 0, 512, 256);
    let smol =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/SmolLM2-135M-Instruct.Q4_1.gguf");
    if smol.exists() {
        check(smol, 0, 1536, 768);
    }
}

/// One layer's routed experts as `NodeWeights` hold them.
struct Layer<'a> {
    weights: &'a NodeWeights,
    layer: u32,
}

impl ExpertSource for Layer<'_> {
    fn n_embd(&self) -> usize {
        self.weights.facts().n_embd
    }

    fn n_expert(&self) -> usize {
        self.weights.facts().n_expert
    }

    fn expert(&self, expert: u32) -> Vec<FfnMatrices<'_>> {
        self.weights.expert(self.layer, Part::Routed, expert)
    }
}

/// Every routed expert of `layer` cut in two (one half per "node") against the whole
/// experts: the two rounds give the single-process sums bit for bit.
fn check_routed(model: PathBuf, layer: u32) -> bool {
    let shape = ModelShape::from_gguf(&GgufFile::open(&model).unwrap()).unwrap();
    let f = shape.layers[layer as usize].routed.unwrap();
    let (n_ff, n_expert) = (f.n_ff, shape.n_expert as u32);
    let cut = n_ff / f.block.max(1) / 2 * f.block.max(1);
    if cut == 0 {
        // (The K-quant fixtures' experts are one block wide.)
        eprintln!("{}: {n_ff} rows are one block", model.display());
        return false;
    }
    let spec = |expert, ff: std::ops::Range<usize>| SliceSpec {
        layer,
        part: Part::Routed,
        expert,
        ff_start: ff.start as u32,
        ff_len: ff.len() as u32,
    };
    let whole: Vec<SliceSpec> = (0..n_expert).map(|e| spec(e, 0..n_ff)).collect();
    let halves = [0..cut, cut..n_ff].map(|ff| {
        let specs: Vec<SliceSpec> = (0..n_expert).map(|e| spec(e, ff.clone())).collect();
        NodeWeights::open(&model, Some(&specs)).unwrap()
    });
    let w_whole = NodeWeights::open(&model, Some(&whole)).unwrap();
    let src_whole = Layer {
        weights: &w_whole,
        layer,
    };
    let k = Kernels::get();
    let m = &src_whole.expert(0)[0];
    let n_embd = src_whole.n_embd();
    let n_tokens = 6;
    let x: Vec<f32> = (0..n_tokens * n_embd)
        .map(|i| (i * 7919 % 1000) as f32 / 500.0 - 1.0)
        .collect();
    let mut inputs = vec![Activations::quantize(k, m.gate.ty, &x, n_embd)];
    if m.up.ty.vec_dot_type() != m.gate.ty.vec_dot_type() {
        inputs.push(Activations::quantize(k, m.up.ty, &x, n_embd));
    }
    // Two experts per token, some experts shared by several tokens, weights in rank order.
    let assignments: Vec<Assignment> = (0..n_tokens as u32)
        .flat_map(|t| {
            [(t * 3) % n_expert, (t * 5 + 1) % n_expert]
                .into_iter()
                .enumerate()
                .filter(move |&(i, e)| i == 0 || e != (t * 3) % n_expert)
                .map(move |(i, e)| Assignment {
                    token: t,
                    expert: e,
                    weight: 0.7 - 0.3 * i as f32 + 0.01 * t as f32,
                })
        })
        .collect();
    let mut want = vec![0.0f32; n_tokens * n_embd];
    compute_routed_segments(k, &src_whole, &inputs, &assignments, None, &mut want).unwrap();

    // Round 1 on both halves, joined per assignment.
    let n_slots = assignments.len();
    let mut hidden = vec![0.0f32; n_slots * n_ff];
    for (w, ff) in halves.iter().zip([0..cut, cut..n_ff]) {
        let src = Layer { weights: w, layer };
        let width = slice_answer_width(&src, &assignments, true);
        assert_eq!(width, ff.len());
        let mut part = vec![0.0f32; n_slots * width];
        routed_hidden_segments(k, &src, &inputs, &assignments, None, width, &mut part).unwrap();
        for s in 0..n_slots {
            hidden[s * n_ff + ff.start..s * n_ff + ff.end]
                .copy_from_slice(&part[s * width..(s + 1) * width]);
        }
    }
    let hq = Activations::quantize(k, m.down.ty, &hidden, n_ff);
    // Round 2: one row per assignment.
    let slots = per_slot_rows(&assignments);
    let mut outputs = vec![0.0f32; n_slots * n_embd];
    for (w, ff) in halves.iter().zip([0..cut, cut..n_ff]) {
        let src = Layer { weights: w, layer };
        let rows = slice_down_rows(ff.start, ff.len(), n_ff, n_embd);
        let width = slice_answer_width(&src, &slots, false);
        assert_eq!(width, rows.len());
        let mut part = vec![0.0f32; n_slots * width];
        routed_down_segments(k, &src, &hq, &slots, None, width, &mut part).unwrap();
        for s in 0..n_slots {
            outputs[s * n_embd + rows.start..s * n_embd + rows.end]
                .copy_from_slice(&part[s * width..(s + 1) * width]);
        }
    }
    let mut got = vec![0.0f32; n_tokens * n_embd];
    add_weighted(&mut got, n_embd, &assignments, |s| {
        &outputs[s * n_embd..(s + 1) * n_embd]
    });
    assert!(want.iter().all(|v| v.is_finite()) && want.iter().any(|&v| v != 0.0));
    let differ = (want.iter().zip(&got))
        .filter(|(a, b)| a.to_bits() != b.to_bits())
        .count();
    eprintln!("{}: layer {layer}: {differ} values differ", model.display());
    assert_eq!(differ, 0, "the halves differ from the whole");

    // A node holding slices refuses the one-round computation, naming the expert.
    let src = Layer {
        weights: &halves[0],
        layer,
    };
    let err = compute_routed_segments(k, &src, &inputs, &assignments, None, &mut want)
        .unwrap_err()
        .to_string();
    assert!(err.contains("two rounds"), "{err}");
    true
}

#[test]
fn routed_halves_add_up_to_the_whole() {
    let mut checked = 0;
    for (arch, layer) in [
        ("mixtral", 0),
        ("deepseek2", 1),
        ("qwen3moe", 0),
        ("glm4moe", 1),
    ] {
        for variant in ["f16", "q8_0", "q4_k_m", "q2_k"] {
            checked += check_routed(fixture(&format!("{arch}/model-{variant}.gguf")), layer) as u32;
        }
    }
    assert!(checked >= 8, "only {checked} models could be cut");
}
