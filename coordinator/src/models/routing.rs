//! Expert selection from router logits, as llama.cpp's `build_moe_ffn` does it:
//! gating (softmax / sigmoid / softmax over the selected), selection bias,
//! group-limited routing, top-k, weight normalization and scaling.

use shared::models::{Gating, HParams};
use shared::moe::Assignment;

use super::blocks::{sigmoid, softmax_in_place};

/// ggml clamps the weight sum to the smallest normal f16 before dividing.
const MIN_WEIGHT_SUM: f32 = 6.103_515_6e-5;

/// Routes each of the `n` tokens whose router logits are rows of `logits`.
/// A token's assignments come out in rank order (best first).
pub(crate) fn route(
    hp: &HParams,
    logits: &[f32],
    exp_probs_b: Option<&[f32]>,
    n: usize,
) -> Vec<Assignment> {
    let n_expert = hp.n_expert;
    let k = hp.n_expert_used;
    let mut out = Vec::with_capacity(n * k);
    for (t, row) in logits.chunks_exact(n_expert).take(n).enumerate() {
        let mut probs = row.to_vec();
        match hp.gating {
            Gating::Softmax => softmax_in_place(&mut probs),
            Gating::Sigmoid => probs.iter_mut().for_each(|v| *v = sigmoid(*v)),
            Gating::SoftmaxWeight => {}
        }
        let mut selection: Vec<f32> = match exp_probs_b {
            Some(b) => probs.iter().zip(b).map(|(p, b)| p + b).collect(),
            None => probs.clone(),
        };
        if hp.n_expert_groups > 1 {
            mask_groups(&mut selection, hp.n_expert_groups, hp.n_group_used);
        }
        let idx = top_k(&selection, k);
        if tracing::enabled!(tracing::Level::TRACE) && idx.len() < n_expert {
            // The margin between the last chosen and the first rejected expert: a
            // near-zero margin is a router tie, where one rounding can flip the choice.
            let next = top_k(&selection, k + 1)[k];
            tracing::trace!(
                token = t,
                last = idx[k - 1],
                next,
                margin = selection[idx[k - 1]] - selection[next],
                "routing margin"
            );
        }
        let mut weights: Vec<f32> = idx.iter().map(|&e| probs[e]).collect();
        if hp.gating == Gating::SoftmaxWeight {
            softmax_in_place(&mut weights);
        }
        if hp.expert_weights_norm {
            let sum = weights.iter().map(|&w| w as f64).sum::<f64>() as f32;
            let sum = sum.max(MIN_WEIGHT_SUM);
            weights.iter_mut().for_each(|w| *w /= sum);
        }
        let scale = hp.expert_weights_scale;
        if scale != 0.0 && scale != 1.0 {
            weights.iter_mut().for_each(|w| *w *= scale);
        }
        out.extend(idx.iter().zip(&weights).map(|(&e, &w)| Assignment {
            token: t as u32,
            expert: e as u32,
            weight: w,
        }));
    }
    out
}

/// Indices of the `k` largest values, largest first (ties: lower index first).
fn top_k(values: &[f32], k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..values.len()).collect();
    idx.sort_by(|&a, &b| values[b].total_cmp(&values[a]));
    idx.truncate(k);
    idx
}

/// Keeps the `n_used` groups whose two best experts sum highest; the rest get -inf.
fn mask_groups(selection: &mut [f32], n_groups: usize, n_used: usize) {
    let per_group = selection.len() / n_groups;
    let scores: Vec<f32> = selection
        .chunks_exact(per_group)
        .map(|g| {
            let best = top_k(g, 2.min(per_group));
            best.iter().map(|&i| g[i]).sum()
        })
        .collect();
    let keep = top_k(&scores, n_used);
    for (gi, g) in selection.chunks_exact_mut(per_group).enumerate() {
        if !keep.contains(&gi) {
            g.fill(f32::NEG_INFINITY);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_orders_and_breaks_ties_by_index() {
        assert_eq!(top_k(&[0.1, 0.5, 0.5, 0.2], 3), vec![1, 2, 3]);
    }

    #[test]
    fn groups_keep_best_pairs() {
        // groups: [0.9, 0.0] sum 0.9; [0.5, 0.5] sum 1.0; keep 1 group -> the second.
        let mut s = vec![0.9, 0.0, 0.5, 0.5];
        mask_groups(&mut s, 2, 1);
        assert_eq!(s[0], f32::NEG_INFINITY);
        assert_eq!(&s[2..], &[0.5, 0.5]);
    }
}
