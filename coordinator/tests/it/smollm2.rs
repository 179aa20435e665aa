//! The real SmolLM2-135M-Instruct Q4_1 model: prompt logits and greedy
//! continuations (tokens and text) equal llama.cpp's.

use coordinator::engine::Engine;
use coordinator::sampler::{Sampler, SamplerConfig};
use coordinator::tokenizer::Tokenizer;

use crate::support::{fixtures, ids, max_abs_per_row, read_json, read_tensor, smollm2_model};

#[test]
fn smollm2_matches_llamacpp() {
    let Some(path) = smollm2_model() else { return };
    let dir = fixtures().join("smollm2");
    let reference = read_json(&dir.join("reference.json"));
    let engine = Engine::open(&path).unwrap();
    let tokenizer = Tokenizer::from_gguf(engine.model().file()).unwrap();
    let n_vocab = engine.model().hparams().n_vocab;
    for (i, case) in reference["generate"].as_array().unwrap().iter().enumerate() {
        let prompt = ids(&case["prompt_tokens"]);
        let text = case["prompt"].as_str().unwrap();
        assert_eq!(
            tokenizer.encode(text, false, true),
            prompt,
            "prompt {i} tokens"
        );

        let logits = engine.eval(&prompt).unwrap();
        let (_, want) = read_tensor(
            &dir.join("logits.safetensors"),
            &format!("prompt{i}_logits"),
        );
        let diff = max_abs_per_row(&logits, &want, n_vocab);
        let worst = diff.iter().copied().fold(0.0, f32::max);
        eprintln!("smollm2 prompt {i}: max |Δ| vs llama.cpp = {worst:.2e} per position {diff:?}");
        assert!(worst <= 0.02, "prompt {i}: logits differ by {worst}");

        let want_tokens = ids(&case["greedy_tokens"]);
        let mut sampler = Sampler::new(SamplerConfig::greedy());
        let (got, _) = engine
            .generate(&prompt, 32, 512, &mut sampler, |t| !tokenizer.is_eog(t))
            .unwrap();
        assert_eq!(got, want_tokens, "prompt {i}: greedy tokens");
        assert_eq!(
            tokenizer.decode_text(&got),
            case["greedy_text"].as_str().unwrap(),
            "prompt {i}: greedy text"
        );
    }
}
