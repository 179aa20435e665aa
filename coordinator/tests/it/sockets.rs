//! `--numa auto`'s coordinator on several sockets: its own matrices (attention, router,
//! dense FFNs and shared experts, output head) cut by rows over the sockets of a synthetic
//! topology, copied and multiplied per socket, give logits bit-identical to the unsplit
//! engine on every fixture — prompt (batched kernels) and decode (one token).

use std::path::PathBuf;
use std::sync::Arc;

use coordinator::engine::Engine;
use coordinator::models::{InprocExperts, Logits, Model};
use shared::gguf::GgufFile;
use shared::topology::Topology;

use crate::support::{fixtures, ids, read_json, smollm2_model};

fn check(model: PathBuf, prompt: &[u32], topology: &str) {
    let file = Arc::new(GgufFile::open(&model).unwrap());
    let whole = Engine::from_file(Arc::clone(&file)).unwrap();
    let topo = Topology::from_spec(topology).unwrap();
    let parts = topo
        .node_plan(topo.compute_nodes().len())
        .unwrap()
        .coordinator;
    let mut m = Model::load(Arc::clone(&file)).unwrap();
    m.spread_over_sockets(&parts).unwrap();
    let split = m.socket_split().expect("split over several sockets");
    assert_eq!(split.n_sockets(), parts.len());
    // The output head is cut by vocabulary rows: every socket gets some, all are covered.
    let hp = m.hparams().clone();
    let head = if file.tensor("output.weight").is_some() {
        "output.weight"
    } else {
        "token_embd.weight"
    };
    let shares = split.shares(head).expect("the output head is split");
    assert_eq!(shares.first().unwrap().1.start, 0);
    assert_eq!(shares.last().unwrap().1.end, hp.n_vocab);
    let experts = InprocExperts::new(Arc::clone(&file), &hp).unwrap();
    let spread = Engine::with_executor(m, Box::new(experts));

    let (a, b) = (whole.eval(prompt).unwrap(), spread.eval(prompt).unwrap());
    let differ = a
        .iter()
        .zip(&b)
        .filter(|(x, y)| x.to_bits() != y.to_bits())
        .count();
    assert_eq!(
        differ,
        0,
        "{}: {differ} prompt logits differ",
        model.display()
    );
    // Then one token at a time.
    let mut ca = whole.new_cache(prompt.len() + 4);
    let mut cb = spread.new_cache(prompt.len() + 4);
    whole.forward(&mut ca, prompt, Logits::Last).unwrap();
    spread.forward(&mut cb, prompt, Logits::Last).unwrap();
    for &t in &prompt[..3] {
        let x = whole.forward(&mut ca, &[t], Logits::Last).unwrap();
        let y = spread.forward(&mut cb, &[t], Logits::Last).unwrap();
        assert!(
            x.iter().zip(&y).all(|(p, q)| p.to_bits() == q.to_bits()),
            "{}: decode logits differ",
            model.display()
        );
    }
}

#[test]
fn coordinator_spread_over_sockets_changes_no_logit() {
    for arch in ["qwen3moe", "mixtral", "deepseek2", "glm4moe"] {
        let dir = fixtures().join(arch);
        let prompt = ids(&read_json(&dir.join("reference.json"))["prompt_tokens"]);
        for variant in ["f16", "q8_0", "q4_k_m", "q2_k"] {
            check(
                dir.join(format!("model-{variant}.gguf")),
                &prompt,
                "synthetic:pack:2 numa:1 core:2 pu:1",
            );
        }
        // Four sockets.
        check(
            dir.join("model-q4_k_m.gguf"),
            &prompt,
            "synthetic:pack:4 numa:1 core:1 pu:1",
        );
    }
    if let Some(smol) = smollm2_model() {
        let reference = read_json(&fixtures().join("smollm2/reference.json"));
        let prompt = ids(&reference["generate"][0]["prompt_tokens"]);
        check(smol, &prompt, "synthetic:pack:2 numa:1 core:2 pu:1");
    }
}
