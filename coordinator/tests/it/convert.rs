//! `moeshard convert --repack`: Q4_K matrices interleaved by eight rows (`Q4_K_R8`) give the
//! original file's logits bit for bit and llama.cpp's greedy tokens, in one process and on
//! expert nodes; what cannot hold the layout is refused with an error naming it.

use std::path::Path;
use std::process::Command;

use coordinator::distributed::connect::{open_distributed, ExpertPlacement};
use coordinator::engine::Engine;
use coordinator::sampler::{Sampler, SamplerConfig};
use proto::transport::TransportKind;
use shared::gguf::{GgufFile, GgufWriter, TensorDesc};
use shared::quant::GgmlType;

use crate::support::{fixtures, ids, read_json};

fn convert(model: &Path, out: &Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_moeshard"))
        .args(["convert", "--repack", "-m"])
        .arg(model)
        .arg("--out")
        .arg(out)
        .output()
        .expect("running moeshard convert")
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|f| f.to_bits()).collect()
}

fn greedy(engine: &Engine, prompt: &[u32], n: usize) -> Vec<u32> {
    let mut sampler = Sampler::new(SamplerConfig::greedy());
    (engine.generate(prompt, n, prompt.len() + n, &mut sampler, |_| true))
        .unwrap()
        .0
}

fn count_r8(path: &Path) -> usize {
    let file = GgufFile::open(path).unwrap();
    (file.tensors().iter())
        .filter(|t| t.ty == GgmlType::Q4_K_R8)
        .count()
}

#[test]
fn repacked_fixtures_give_the_original_bits_and_llamacpp_greedy() {
    let dir = tempfile::tempdir().unwrap();
    for arch in ["qwen3moe", "mixtral", "deepseek2", "glm4moe"] {
        let fx = fixtures().join(arch);
        let original = fx.join("model-q4_k_m.gguf");
        let repacked = dir.path().join(format!("{arch}.r8.gguf"));
        let out = convert(&original, &repacked);
        assert!(
            out.status.success(),
            "{arch}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!dir.path().join(format!("{arch}.r8.gguf.tmp")).exists());
        let n = count_r8(&repacked);
        assert!(n > 0, "{arch}: no tensor was repacked");
        // The file holds the same bytes, rearranged: same size.
        let (size, original_size) = (
            std::fs::metadata(&repacked).unwrap().len(),
            std::fs::metadata(&original).unwrap().len(),
        );
        assert!(
            size.abs_diff(original_size) < 4096,
            "{arch}: {size} bytes against {original_size}"
        );

        let reference = read_json(&fx.join("reference.json"));
        let prompt = ids(&reference["prompt_tokens"]);
        let want = Engine::open(&original).unwrap().eval(&prompt).unwrap();
        let engine = Engine::open(&repacked).unwrap();
        let got = engine.eval(&prompt).unwrap();
        assert!(
            bits(&got) == bits(&want),
            "{arch}: logits differ from the original file's"
        );
        // Decoding takes the one-token kernel on the interleaved rows.
        let want_greedy = ids(&reference["variants"]["q4_k_m"]["llamacpp_greedy"]);
        assert_eq!(
            greedy(&engine, &prompt, want_greedy.len()),
            want_greedy,
            "{arch}: greedy tokens of the repacked file differ from llama.cpp's"
        );
        eprintln!("{arch}: {n} tensors repacked, logits and greedy tokens unchanged");
    }
}

/// A 2-layer Qwen3-30B-A3B-shaped Q4_K_M model with 16 experts, and its converted copy.
fn synth_and_convert(dir: &Path, seed: u64) -> (std::path::PathBuf, std::path::PathBuf) {
    let model = dir.join("qwen3.gguf");
    crate::distributed::synth_qwen3_q4_k_m(&model, seed);
    let repacked = dir.join("qwen3.r8.gguf");
    let file = GgufFile::open(&model).unwrap();
    let report =
        coordinator::convert::repack_q4_k(&file, &model, &repacked, &mut |_, _| {}).unwrap();
    assert!(report.repacked > 0);
    (model, repacked)
}

#[test]
fn repacked_experts_on_nodes_give_the_single_process_bits() {
    let dir = tempfile::tempdir().unwrap();
    let (model, repacked) = synth_and_convert(dir.path(), 11);
    let prompt: Vec<u32> = (0..12).map(|i| (i * 41 + 3) % 512).collect();
    let single = Engine::open(&model).unwrap();
    let want = single.eval(&prompt).unwrap();
    let want_greedy = greedy(&single, &prompt, 4);
    for (placement, transport) in [
        (ExpertPlacement::Sliced, TransportKind::Inproc),
        (ExpertPlacement::Sliced, TransportKind::Grpc),
    ] {
        let mut opts = crate::distributed::options(2, transport);
        opts.experts = placement;
        let d = open_distributed(&repacked, &opts).unwrap();
        let got = d.engine.eval(&prompt).unwrap();
        assert!(
            bits(&got) == bits(&want),
            "{transport:?}: logits of the repacked file on 2 nodes differ"
        );
        assert_eq!(greedy(&d.engine, &prompt, 4), want_greedy, "{transport:?}");
    }
}

/// `split` of a converted model: each node's file keeps the interleaved tensors, and nodes
/// serving from their files give the single-process bits of the original model.
#[test]
fn split_files_of_a_repacked_model_serve_the_original_bits() {
    use coordinator::distributed::connect::DistOptions;
    let dir = tempfile::tempdir().unwrap();
    let (model, repacked) = synth_and_convert(dir.path(), 13);
    let prompt: Vec<u32> = (0..10).map(|i| (i * 29 + 7) % 512).collect();
    let want = Engine::open(&model).unwrap().eval(&prompt).unwrap();

    let (names, plan, out) = crate::distributed::split_even(&repacked, dir.path());

    for name in &names {
        let file = out.join(shared::placement::split::split_file_name(&repacked, name));
        assert!(
            count_r8(&file) > 0,
            "{name}: no Q4_K_R8 tensor in the split file"
        );
    }
    let (children, cluster_path) =
        crate::distributed::serve_split_files(&repacked, &out, &names, dir.path());
    let d = open_distributed(
        &repacked,
        &DistOptions {
            cluster: Some(cluster_path),
            plan: Some(plan),
            ..DistOptions::default()
        },
    )
    .unwrap();
    let got = d.engine.eval(&prompt).unwrap();
    assert!(
        bits(&got) == bits(&want),
        "split files of the repacked model"
    );
    drop(d);
    for (mut c, _) in children {
        let _ = c.kill();
        let _ = c.wait();
    }
}

#[test]
fn what_cannot_hold_the_layout_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    // No Q4_K matrix: nothing to do, and no file.
    let q8 = fixtures().join("qwen3moe").join("model-q8_0.gguf");
    let out_path = dir.path().join("q8.r8.gguf");
    let out = convert(&q8, &out_path);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no Q4_K matrix"), "{err}");
    assert!(!out_path.exists());

    // A Q4_K_R8 tensor of 4 rows (not a whole group) is refused when the file is opened.
    let bad = dir.path().join("bad.gguf");
    let desc = TensorDesc::new("blk.0.attn_q.weight", GgmlType::Q4_K_R8, [256u64, 4]);
    let mut w = GgufWriter::create(&bad, Vec::new(), vec![desc]).unwrap();
    w.write_tensor_data(&vec![0u8; 4 * 144]).unwrap();
    w.finish().unwrap();
    let err = GgufFile::open(&bad).unwrap_err().to_string();
    assert!(
        err.contains("blk.0.attn_q.weight") && err.contains("whole groups of 8"),
        "{err}"
    );
}
