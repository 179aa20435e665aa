//! Unit tests of `synth`'s choices: names, per-tensor types and fallbacks.

use super::*;

fn cfg(shape: &str, quant: &str) -> SynthConfig {
    SynthConfig {
        shape: shape.to_owned(),
        quant: quant.to_owned(),
        layers: None,
        vocab: None,
        experts: None,
        hidden: None,
        seed: 0,
        header_only: false,
        threads: None,
        out: PathBuf::from("unused.gguf"),
    }
}

fn types(plan: &SynthPlan) -> BTreeMap<String, GgmlType> {
    plan.tensors
        .iter()
        .map(|t| (t.name.clone(), t.ty))
        .collect()
}

#[test]
fn quant_names() {
    assert_eq!(
        Quant::parse("q8_0").unwrap(),
        Quant::Uniform(GgmlType::Q8_0)
    );
    assert_eq!(Quant::parse("Q4_K_M").unwrap(), Quant::Q4KM);
    assert_eq!(Quant::parse("Q2_K").unwrap(), Quant::Q2K);
    assert_eq!(
        Quant::parse("bf16").unwrap(),
        Quant::Uniform(GgmlType::BF16)
    );
    for bad in ["Q8_K", "Q8_1", "IQ2_XXS", "q4"] {
        let err = Quant::parse(bad).unwrap_err().to_string();
        assert!(err.contains(bad) && err.contains("Q4_K_M"), "{err}");
    }
}

#[test]
fn bad_configs_are_errors() {
    let err = plan(&cfg("gpt-5", "Q8_0")).unwrap_err().to_string();
    assert!(
        err.contains("gpt-5") && err.contains("qwen3-30b-a3b"),
        "{err}"
    );
    let mut c = cfg("qwen3-30b-a3b", "Q8_0");
    c.layers = Some(0);
    assert!(plan(&c).unwrap_err().to_string().contains("--layers"));
    let mut c = cfg("deepseek-v3", "Q8_0");
    c.experts = Some(12);
    assert!(plan(&c).unwrap_err().to_string().contains("groups"));
}

#[test]
fn uniform_types_keep_vectors_and_routers_f32() {
    let p = plan(&cfg("deepseek-v3", "Q8_0")).unwrap();
    let t = types(&p);
    assert_eq!(t["blk.3.ffn_gate_inp.weight"], GgmlType::F32);
    assert_eq!(t["blk.3.exp_probs_b.bias"], GgmlType::F32);
    assert_eq!(t["blk.3.attn_kv_a_norm.weight"], GgmlType::F32);
    assert_eq!(t["blk.3.ffn_down_exps.weight"], GgmlType::Q8_0);
    assert_eq!(t["token_embd.weight"], GgmlType::Q8_0);
    assert!(p.fallbacks.is_empty());
    assert_eq!(
        p.metadata
            .iter()
            .find(|(k, _)| k == "tokenizer.ggml.model")
            .map(|(_, v)| v.clone()),
        Some(MetaValue::String("none".into()))
    );
}

#[test]
fn k_quants_fall_back_on_short_rows() {
    // attn_k_b rows are 128 (qk_nope) long: half a K-quant block.
    let p = plan(&cfg("deepseek-v3", "Q4_K")).unwrap();
    let t = types(&p);
    assert_eq!(t["blk.0.attn_k_b.weight"], GgmlType::Q5_0);
    assert_eq!(t["blk.0.attn_v_b.weight"], GgmlType::Q4_K);
    assert_eq!(p.fallbacks.len(), 61);
    assert_eq!(fallback_type(GgmlType::Q6_K, 128), GgmlType::Q8_0);
    assert_eq!(fallback_type(GgmlType::Q2_K, 96), GgmlType::Q4_0);
    assert_eq!(fallback_type(GgmlType::Q8_0, 40), GgmlType::F16);
    assert_eq!(fallback_type(GgmlType::Q4_K, 512), GgmlType::Q4_K);
}

#[test]
fn q4_k_m_mix() {
    let p = plan(&cfg("qwen3-30b-a3b", "Q4_K_M")).unwrap();
    let t = types(&p);
    assert_eq!(t["output.weight"], GgmlType::Q6_K);
    assert_eq!(t["token_embd.weight"], GgmlType::Q4_K);
    // 48 layers: more bits on 0..6, 42..48 and every third from 8.
    assert_eq!(t["blk.0.attn_v.weight"], GgmlType::Q6_K);
    assert_eq!(t["blk.0.ffn_down_exps.weight"], GgmlType::Q6_K);
    assert_eq!(t["blk.7.ffn_down_exps.weight"], GgmlType::Q4_K);
    assert_eq!(t["blk.8.ffn_down_exps.weight"], GgmlType::Q6_K);
    assert_eq!(t["blk.9.attn_v.weight"], GgmlType::Q4_K);
    assert_eq!(t["blk.47.attn_v.weight"], GgmlType::Q6_K);
    assert_eq!(t["blk.20.ffn_gate_exps.weight"], GgmlType::Q4_K);
    assert_eq!(t["blk.20.attn_q_norm.weight"], GgmlType::F32);

    let m = types(&plan(&cfg("mixtral-8x7b", "Q4_K_M")).unwrap());
    assert_eq!(m["blk.5.attn_v.weight"], GgmlType::Q8_0);
    assert_eq!(m["blk.5.attn_k.weight"], GgmlType::Q8_0);
    assert_eq!(m["blk.5.attn_output.weight"], GgmlType::Q5_K);
}

#[test]
fn q2_k_mix() {
    let t = types(&plan(&cfg("glm-4.5", "Q2_K")).unwrap());
    assert_eq!(t["blk.10.ffn_gate_exps.weight"], GgmlType::Q2_K);
    assert_eq!(t["blk.10.ffn_down_exps.weight"], GgmlType::Q3_K);
    assert_eq!(t["blk.1.ffn_down.weight"], GgmlType::Q3_K);
    assert_eq!(
        t["blk.10.attn_v.weight"],
        GgmlType::Q4_K,
        "96/8 heads: GQA 12"
    );
    assert_eq!(t["blk.10.attn_output.weight"], GgmlType::Q3_K);
    assert_eq!(t["output.weight"], GgmlType::Q6_K);
    assert_eq!(t["blk.92.nextn.eh_proj.weight"], GgmlType::Q2_K);
}

#[test]
fn use_more_bits_matches_llama_quantize() {
    let more: Vec<usize> = (0..16).filter(|&i| use_more_bits(i, 16)).collect();
    // n/8 = 2, 7n/8 = 14: 0, 1, then (i-2)%3 == 2 → 4, 7, 10, 13, then 14, 15.
    assert_eq!(more, [0, 1, 4, 7, 10, 13, 14, 15]);
}

#[test]
fn q3_k_m_mix() {
    // Kimi-K2: 61 layers, n/16 = 3: ffn_down Q5_K on layers 0-2, Q4_K after.
    let t = types(&plan(&cfg("kimi-k2", "Q3_K_M")).unwrap());
    assert_eq!(t["output.weight"], GgmlType::Q6_K);
    assert_eq!(t["token_embd.weight"], GgmlType::Q3_K);
    assert_eq!(t["blk.0.ffn_down.weight"], GgmlType::Q5_K);
    assert_eq!(t["blk.2.ffn_down_exps.weight"], GgmlType::Q5_K);
    assert_eq!(t["blk.3.ffn_down_exps.weight"], GgmlType::Q4_K);
    assert_eq!(t["blk.3.ffn_down_shexp.weight"], GgmlType::Q4_K);
    assert_eq!(t["blk.40.ffn_up_exps.weight"], GgmlType::Q3_K);
    assert_eq!(t["blk.40.attn_output.weight"], GgmlType::Q4_K);
    assert_eq!(t["blk.40.attn_kv_a_norm.weight"], GgmlType::F32);
    // GQA attention: attn_v Q5_K on the first two layers, Q4_K after.
    let q = types(&plan(&cfg("qwen3-30b-a3b", "Q3_K_M")).unwrap());
    assert_eq!(q["blk.1.attn_v.weight"], GgmlType::Q5_K);
    assert_eq!(q["blk.2.attn_v.weight"], GgmlType::Q4_K);
    assert_eq!(q["blk.2.attn_q.weight"], GgmlType::Q3_K);
    let m = types(&plan(&cfg("mixtral-8x7b", "Q3_K_M")).unwrap());
    assert_eq!(m["blk.5.attn_v.weight"], GgmlType::Q8_0);
    assert_eq!(m["blk.5.attn_output.weight"], GgmlType::Q5_K);
}
