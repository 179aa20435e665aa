//! Checks of the shape table against the models' config.json values (FORMATS.md D)
//! and of the synthetic statistics.

use super::*;

fn shape(name: &str) -> ModelShape {
    by_name(name).unwrap()
}

#[test]
fn table_matches_the_configs() {
    // (name, layers, hidden, heads, kv heads, experts, used, shared, expert ff, dense ff, dense layers, vocab)
    let want = [
        (
            "deepseek-v3",
            61,
            7168,
            128,
            128,
            256,
            8,
            1,
            2048,
            18432,
            3,
            129280,
        ),
        (
            "kimi-k2", 61, 7168, 64, 64, 384, 8, 1, 2048, 18432, 1, 163840,
        ),
        (
            "glm-4.5", 92, 5120, 96, 8, 160, 8, 1, 1536, 12288, 3, 151552,
        ),
        (
            "qwen3-235b-a22b",
            94,
            4096,
            64,
            4,
            128,
            8,
            0,
            1536,
            12288,
            0,
            151936,
        ),
        (
            "qwen3-30b-a3b",
            48,
            2048,
            32,
            4,
            128,
            8,
            0,
            768,
            6144,
            0,
            151936,
        ),
        ("mixtral-8x7b", 32, 4096, 32, 8, 8, 2, 0, 14336, 0, 0, 32000),
    ];
    for (name, l, h, nh, kv, ne, nu, ns, ff, dff, dl, v) in want {
        let s = shape(name);
        let got = (
            s.n_layer,
            s.n_embd,
            s.n_head,
            s.n_head_kv,
            s.n_expert,
            s.n_expert_used,
            s.n_expert_shared,
            s.n_ff_exp,
            s.n_ff_dense,
            s.n_dense_lead,
            s.n_vocab,
        );
        assert_eq!(got, (l, h, nh, kv, ne, nu, ns, ff, dff, dl, v), "{name}");
    }
    let ds = shape("deepseek-v3");
    assert_eq!(ds.mla, Some((1536, 512, 128, 64, 128)));
    assert_eq!((ds.n_expert_groups, ds.n_group_used), (8, 4));
    assert_eq!(ds.expert_weights_scale, 2.5);
    let k2 = shape("kimi-k2");
    assert_eq!((k2.rope_base, k2.expert_weights_scale), (50000.0, 2.827));
    assert_eq!(k2.yarn.map(|y| y.0), Some(32.0));
    assert_eq!(shape("glm-4.5").n_nextn, 1);
    assert!(by_name("nope").is_none());
    assert!(by_name("DeepSeek-V3").is_some());
}

#[test]
fn metadata_keys() {
    let md = |name: &str| -> std::collections::HashMap<String, MetaValue> {
        shape(name).metadata().into_iter().collect()
    };
    let glm = md("glm-4.5");
    assert_eq!(glm["glm4moe.block_count"], MetaValue::U32(93));
    assert_eq!(glm["glm4moe.nextn_predict_layers"], MetaValue::U32(1));
    assert_eq!(glm["glm4moe.rope.dimension_count"], MetaValue::U32(64));
    assert_eq!(
        glm["glm4moe.attention.layer_norm_rms_epsilon"],
        MetaValue::F32(1e-5)
    );
    let ds = md("deepseek-v3");
    assert_eq!(ds["deepseek2.attention.head_count_kv"], MetaValue::U32(1));
    assert_eq!(ds["deepseek2.attention.key_length"], MetaValue::U32(576));
    assert_eq!(
        ds["deepseek2.rope.scaling.type"],
        MetaValue::String("yarn".into())
    );
    assert_eq!(ds["deepseek2.rope.scaling.factor"], MetaValue::F32(40.0));
    let q = md("qwen3-30b-a3b");
    assert_eq!(
        q["qwen3moe.expert_feed_forward_length"],
        MetaValue::U32(768)
    );
    assert_eq!(q["qwen3moe.feed_forward_length"], MetaValue::U32(6144));
    assert!(!q.contains_key("qwen3moe.rope.scaling.type"));
}

#[test]
fn truncation_keeps_a_moe_layer_and_the_mtp_block() {
    let ds = shape("deepseek-v3").truncated(Some(2), Some(512));
    assert_eq!((ds.n_layer, ds.n_dense_lead, ds.n_vocab), (2, 1, 512));
    assert_eq!(
        shape("deepseek-v3").truncated(Some(1), None).n_dense_lead,
        0
    );
    assert_eq!(
        shape("deepseek-v3").truncated(Some(10), None).n_dense_lead,
        3
    );

    let glm = shape("glm-4.5").truncated(Some(2), Some(512));
    let t = glm.tensors(&TypeRecipe::uniform(GgmlType::Q8_0));
    assert!(t.iter().any(|t| t.name == "blk.2.nextn.eh_proj.weight"));
    assert!(t.iter().any(|t| t.name == "blk.2.ffn_down_exps.weight"));
    assert!(!t.iter().any(|t| t.name.starts_with("blk.3.")));
    let eh = t
        .iter()
        .find(|t| t.name == "blk.2.nextn.eh_proj.weight")
        .unwrap();
    assert_eq!(eh.ne, vec![10240, 5120]);
}

#[test]
fn expert_truncation_respects_groups() {
    let ds = shape("deepseek-v3");
    assert!(ds.clone().with_experts(12).is_err(), "not a multiple of 8");
    assert!(ds.clone().with_experts(8).is_err(), "one per group");
    let s = ds.with_experts(16).unwrap();
    assert_eq!((s.n_expert, s.n_expert_used), (16, 8));
    let m = shape("mixtral-8x7b").with_experts(1).unwrap();
    assert_eq!(m.n_expert_used, 1);
    assert!(shape("qwen3-30b-a3b").with_experts(0).is_err());
}

#[test]
fn fill_row_is_deterministic_and_scaled() {
    let mut a = vec![0f32; 4096];
    let mut b = vec![0f32; 4096];
    fill_row(7, "blk.0.attn_q.weight", 3, Init::Normal(0.5), &mut a);
    fill_row(7, "blk.0.attn_q.weight", 3, Init::Normal(0.5), &mut b);
    assert_eq!(a, b);
    fill_row(8, "blk.0.attn_q.weight", 3, Init::Normal(0.5), &mut b);
    assert_ne!(a, b, "seed");
    fill_row(7, "blk.0.attn_k.weight", 3, Init::Normal(0.5), &mut b);
    assert_ne!(a, b, "name");
    fill_row(7, "blk.0.attn_q.weight", 4, Init::Normal(0.5), &mut b);
    assert_ne!(a, b, "row");

    let n = a.len() as f32;
    let mean = a.iter().sum::<f32>() / n;
    let std = (a.iter().map(|x| (x - mean).powi(2)).sum::<f32>() / n).sqrt();
    assert!(mean.abs() < 0.03, "mean {mean}");
    assert!((std - 0.5).abs() < 0.03, "std {std}");
    assert!(a.iter().all(|x| x.abs() < 0.5 * 3.5));

    fill_row(1, "output_norm.weight", 0, Init::NearOne(0.02), &mut a);
    assert!(a.iter().all(|x| (x - 1.0).abs() < 0.08));
}

#[test]
fn init_by_tensor_kind() {
    let spec = |name: &str, ne: &[u64]| TensorSpec {
        name: name.into(),
        ty: GgmlType::F32,
        ne: ne.to_vec(),
    };
    assert_eq!(
        spec("blk.0.ffn_down_exps.weight", &[1024, 4096, 8]).init(),
        Init::Normal(1.0 / 32.0)
    );
    assert_eq!(
        spec("blk.0.attn_norm.weight", &[4096]).init(),
        Init::NearOne(0.02)
    );
    assert_eq!(
        spec("blk.1.exp_probs_b.bias", &[256]).init(),
        Init::Normal(0.01)
    );
}
