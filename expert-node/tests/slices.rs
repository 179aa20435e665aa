//! A slice of a dense FFN computed from the full model file: the partial sums of the
//! slices add up to the whole FFN's output (up to float regrouping).

use std::path::PathBuf;

use expert_node::NodeWeights;
use shared::moe::compute_dense;
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
    let mut want = vec![0.0f32; n_tokens * n_embd];
    compute_dense(k, &full, &inputs, &mut want).unwrap();
    let mut got = vec![0.0f32; n_tokens * n_embd];
    compute_dense(k, &w_half.expert(layer, Part::Dense, 0), &inputs, &mut got).unwrap();
    let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let diff = want
        .iter()
        .zip(&got)
        .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
    eprintln!(
        "{}: layer {layer}: max |Δ| {diff:e} of max |y| {scale}",
        model.display()
    );
    assert!(
        diff <= 1e-5 * scale.max(1.0),
        "halves differ from the whole by {diff}"
    );
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
