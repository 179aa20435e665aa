//! A dense FFN split over slices computed from the full model file in the two rounds of
//! the exact split (each slice's SwiGLU rows, then its rows of down from the joined hidden
//! rows) gives exactly the whole FFN's output.

use std::path::PathBuf;

use expert_node::NodeWeights;
use shared::moe::{dense_down_segments, dense_hidden_segments, FfnMatrices};
use shared::placement::{Part, SliceSpec};
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
