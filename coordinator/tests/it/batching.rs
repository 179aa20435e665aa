//! Continuous batching: several sequences in one step (`Engine::step`) give each sequence
//! exactly — bit for bit — the logits it gets alone, on every fixture, in one process and
//! with the experts on 2 loopback nodes.

use coordinator::distributed::connect::{open_distributed, ExpertPlacement};
use coordinator::engine::{Engine, SeqStep};
use coordinator::kv_cache::KvCache;
use coordinator::models::Logits;
use proto::transport::TransportKind;

use crate::distributed::options;
use crate::support::{fixtures, ids, read_json};

const ARCHS: [&str; 4] = ["qwen3moe", "mixtral", "deepseek2", "glm4moe"];
const VARIANTS: [&str; 4] = ["f16", "q8_0", "q4_k_m", "q2_k"];

/// The sequences of a step: a long prefill chunk, a short one, and two decodes with history.
fn workload(prompt: &[u32]) -> Vec<(Vec<u32>, Vec<u32>)> {
    // (history already in the cache, tokens of this step)
    vec![
        (vec![], prompt.to_vec()),
        (vec![], prompt[3..8].to_vec()),
        (prompt[..10].to_vec(), vec![prompt[10]]),
        (prompt[5..20].to_vec(), prompt[20..22].to_vec()),
        (prompt[..2].to_vec(), vec![prompt[7]]),
    ]
}

fn cache_after(engine: &Engine, history: &[u32], n_ctx: usize) -> KvCache {
    let mut cache = engine.new_cache(n_ctx);
    if !history.is_empty() {
        engine.forward(&mut cache, history, Logits::Last).unwrap();
    }
    cache
}

/// Each sequence alone, then all together: the same bits.
fn check(engine: &Engine, what: &str, prompt: &[u32]) {
    let work = workload(prompt);
    let n_ctx = 64;
    let alone: Vec<Vec<f32>> = work
        .iter()
        .map(|(history, tokens)| {
            let mut cache = cache_after(engine, history, n_ctx);
            engine.forward(&mut cache, tokens, Logits::Last).unwrap()
        })
        .collect();
    let mut caches: Vec<KvCache> = work
        .iter()
        .map(|(history, _)| cache_after(engine, history, n_ctx))
        .collect();
    let mut seqs: Vec<SeqStep<'_>> = caches
        .iter_mut()
        .zip(&work)
        .map(|(cache, (_, tokens))| SeqStep {
            cache,
            tokens: tokens.as_slice(),
        })
        .collect();
    let together = engine.step(&mut seqs).unwrap();
    for (i, (a, b)) in alone.iter().zip(&together).enumerate() {
        let same = a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits());
        let diff = a
            .iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0f32, f32::max);
        assert!(
            same,
            "{what}: sequence {i} differs in a batch (max |Δ| {diff})"
        );
    }
    // The caches advanced as they would alone.
    for (cache, (history, tokens)) in caches.iter().zip(&work) {
        assert_eq!(cache.n_past(), history.len() + tokens.len(), "{what}");
    }
}

#[test]
fn a_sequence_gets_the_same_bits_in_any_batch() {
    for arch in ARCHS {
        let dir = fixtures().join(arch);
        let prompt = ids(&read_json(&dir.join("reference.json"))["prompt_tokens"]);
        for variant in VARIANTS {
            let engine = Engine::open(&dir.join(format!("model-{variant}.gguf"))).unwrap();
            check(&engine, &format!("{arch} {variant}"), &prompt);
        }
    }
}

#[test]
fn batching_is_exact_on_nodes_too() {
    for arch in ARCHS {
        let dir = fixtures().join(arch);
        let prompt = ids(&read_json(&dir.join("reference.json"))["prompt_tokens"]);
        let model = dir.join("model-q4_k_m.gguf");
        for (transport, split_dense) in
            [(TransportKind::Grpc, false), (TransportKind::Inproc, true)]
        {
            let mut opts = options(2, transport);
            opts.split_dense = split_dense;
            let d = open_distributed(&model, &opts).unwrap();
            check(
                &d.engine,
                &format!("{arch} q4_k_m on 2 {transport} nodes"),
                &prompt,
            );
        }
    }
}

/// Sliced experts (two rounds per MoE layer; the second round's rows are the assignments,
/// with their sequences' runs), also cut into chunks of whole experts: a batch of sequences
/// still gets exactly what each sequence gets alone.
#[test]
fn batching_is_exact_with_sliced_experts() {
    for arch in ARCHS {
        let dir = fixtures().join(arch);
        let prompt = ids(&read_json(&dir.join("reference.json"))["prompt_tokens"]);
        // Q8_0: experts of 32-element blocks, so they are cut.
        let model = dir.join("model-q8_0.gguf");
        for chunk in [None, Some(3)] {
            let mut opts = options(2, TransportKind::Inproc);
            opts.experts = ExpertPlacement::Sliced;
            opts.slice_chunk_slots = chunk;
            let d = open_distributed(&model, &opts).unwrap();
            check(
                &d.engine,
                &format!("{arch} q8_0 sliced over 2 nodes, chunks {chunk:?}"),
                &prompt,
            );
        }
    }
}
