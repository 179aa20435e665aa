//! The four MoE architectures on every fixture file: logits within 0.02 of
//! llama.cpp's at every prompt position (and of transformers' on f16), greedy
//! tokens identical to llama.cpp's.

use coordinator::engine::Engine;
use coordinator::sampler::{Sampler, SamplerConfig};

use crate::support::{fixtures, ids, max_abs_per_row, read_json, read_tensor};

const TOLERANCE: f32 = 0.02;

/// Positions exempt from the transformers comparison, with the reason
/// (../shared/README.md): glm4moe f16 position 15 is a router near-tie
/// (4th/5th expert scores 8.7e-6 apart with f16 weights) where llama.cpp and
/// transformers pick different experts; there llama.cpp is the reference.
fn hf_exempt(arch: &str, variant: &str, pos: usize) -> bool {
    arch == "glm4moe" && variant == "f16" && pos == 15
}

fn check(arch: &str, variant: &str) {
    let dir = fixtures().join(arch);
    let reference = read_json(&dir.join("reference.json"));
    let prompt = ids(&reference["prompt_tokens"]);
    let engine = Engine::open(&dir.join(format!("model-{variant}.gguf"))).unwrap();
    let n_vocab = engine.model().hparams().n_vocab;

    let logits = engine.eval(&prompt).unwrap();
    let (shape, want) = read_tensor(
        &dir.join("logits.safetensors"),
        &format!("llamacpp_logits_{variant}"),
    );
    assert_eq!(shape, vec![prompt.len(), n_vocab]);
    let diff = max_abs_per_row(&logits, &want, n_vocab);
    let worst = diff.iter().copied().fold(0.0, f32::max);
    eprintln!("{arch} {variant}: max |Δ| vs llama.cpp = {worst:.2e}");
    for (pos, d) in diff.iter().enumerate() {
        assert!(
            *d <= TOLERANCE,
            "{arch} {variant} position {pos}: max |Δ| vs llama.cpp = {d} > {TOLERANCE} (all: {diff:?})"
        );
    }
    if variant == "f16" {
        let (_, hf) = read_tensor(&dir.join("logits.safetensors"), "hf_logits");
        let diff = max_abs_per_row(&logits, &hf, n_vocab);
        for (pos, d) in diff.iter().enumerate() {
            if hf_exempt(arch, variant, pos) {
                continue;
            }
            assert!(
                *d <= TOLERANCE,
                "{arch} f16 position {pos}: max |Δ| vs transformers = {d} > {TOLERANCE}"
            );
        }
    }

    let want_greedy = ids(&reference["variants"][variant]["llamacpp_greedy"]);
    let mut sampler = Sampler::new(SamplerConfig::greedy());
    let (got, _) = engine
        .generate(&prompt, want_greedy.len(), 64, &mut sampler, |_| true)
        .unwrap();
    assert_eq!(
        got, want_greedy,
        "{arch} {variant}: greedy tokens differ from llama.cpp"
    );
}

/// One test per (architecture, file), so a failure names its case.
macro_rules! fixture_tests {
    ($($name:ident: $arch:literal, $variant:literal;)*) => {
        $(
            #[test]
            fn $name() {
                check($arch, $variant);
            }
        )*
    };
}

fixture_tests! {
    qwen3moe_f16: "qwen3moe", "f16";
    qwen3moe_q8_0: "qwen3moe", "q8_0";
    qwen3moe_q4_k_m: "qwen3moe", "q4_k_m";
    qwen3moe_q2_k: "qwen3moe", "q2_k";
    mixtral_f16: "mixtral", "f16";
    mixtral_q8_0: "mixtral", "q8_0";
    mixtral_q4_k_m: "mixtral", "q4_k_m";
    mixtral_q2_k: "mixtral", "q2_k";
    deepseek2_f16: "deepseek2", "f16";
    deepseek2_q8_0: "deepseek2", "q8_0";
    deepseek2_q4_k_m: "deepseek2", "q4_k_m";
    deepseek2_q2_k: "deepseek2", "q2_k";
    glm4moe_f16: "glm4moe", "f16";
    glm4moe_q8_0: "glm4moe", "q8_0";
    glm4moe_q4_k_m: "glm4moe", "q4_k_m";
    glm4moe_q2_k: "glm4moe", "q2_k";
}
