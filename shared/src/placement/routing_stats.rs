//! Routing statistics and the routing distributions the planner samples steps from.
//!
//! [`RoutingStats`] is what the coordinator records (`--record-routing FILE`):
//! per MoE layer, how many tokens were routed and how many of them picked each
//! expert. Its JSON form is documented in `docs/placement.md` ("Routing
//! statistics"); reading and writing the file is the coordinator's
//! (`coordinator::routing_stats`), this module only checks it.
//!
//! [`RoutingModel`] turns statistics, or a stated synthetic distribution, into
//! per-layer distributions of a token's `k` experts that can be sampled:
//! - [`RoutingModel::zipf`]: Zipf(`s`) over each layer's experts — expert ranks
//!   are a seeded random permutation per layer, the expert of rank `r` has
//!   weight `1 / r^s`, and a token draws `k` experts without replacement in
//!   proportion to the weights (what a skewed top-k router looks like);
//!   `s = 0` is uniform routing.
//! - [`RoutingModel::from_stats`]: each expert is picked by a token with the
//!   recorded frequency `count / n_tokens` (smoothed by one uniformly routed
//!   pseudo-token, so a short recording gives no expert probability 0), exactly:
//!   a token's `k` experts are drawn by systematic sampling (Madow) over a fresh
//!   random order of the experts, whose inclusion probabilities are those
//!   frequencies.
//!
//! [`RoutingModel::synthetic_stats`] draws statistics from a model (the
//! synthetic generator). Nothing here reads a clock or does IO; randomness
//! comes from [`SplitMix64`] seeds.

use serde::{Deserialize, Serialize};

use super::{parse_identity_hex, ModelShape};
use crate::rng::{mix64, SplitMix64};

/// The routing statistics format version this build reads and writes.
pub const ROUTING_STATS_VERSION: u32 = 1;

/// Per (layer, expert) token counts, as recorded by the coordinator.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoutingStats {
    /// [`ROUTING_STATS_VERSION`].
    pub version: u32,
    /// The model the tokens were routed by (64 hex digits), if known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_identity: Option<String>,
    /// Routed experts per MoE layer.
    pub n_expert: usize,
    /// Experts each token picks (`k`).
    pub n_expert_used: usize,
    /// The MoE layers, ascending.
    pub layers: Vec<LayerRouting>,
}

/// One MoE layer's counts.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LayerRouting {
    /// The layer.
    pub layer: usize,
    /// Tokens routed in this layer.
    pub n_tokens: u64,
    /// Per expert, the tokens that picked it (`n_expert` entries; each at most
    /// `n_tokens`, their sum at most `n_tokens × n_expert_used`).
    pub counts: Vec<u64>,
}

/// Why routing statistics were refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("routing statistics: {0}")]
pub struct RoutingStatsError(pub String);

impl RoutingStats {
    /// Empty statistics (no tokens) for the MoE layers of `shape`.
    pub fn empty(shape: &ModelShape, n_expert_used: usize) -> RoutingStats {
        RoutingStats {
            version: ROUTING_STATS_VERSION,
            model_identity: None,
            n_expert: shape.n_expert,
            n_expert_used,
            layers: shape
                .layers
                .iter()
                .enumerate()
                .filter(|(_, l)| l.routed.is_some())
                .map(|(layer, _)| LayerRouting {
                    layer,
                    n_tokens: 0,
                    counts: vec![0; shape.n_expert],
                })
                .collect(),
        }
    }

    /// Checks the statistics on their own: the version, the identity's form,
    /// `1 <= n_expert_used <= n_expert`, layers ascending and distinct, one count
    /// per expert, no count above the layer's tokens and no more picks than
    /// `n_tokens × n_expert_used`.
    pub fn validate(&self) -> Result<(), RoutingStatsError> {
        let bad = |why: String| Err(RoutingStatsError(why));
        if self.version != ROUTING_STATS_VERSION {
            return bad(format!(
                "unsupported version {} (this build reads version {ROUTING_STATS_VERSION})",
                self.version
            ));
        }
        if let Some(id) = &self.model_identity {
            if parse_identity_hex(id).is_none() {
                return bad(format!("model_identity {id:?} is not 64 hex digits"));
            }
        }
        if self.n_expert == 0 || !(1..=self.n_expert).contains(&self.n_expert_used) {
            return bad(format!(
                "n_expert_used = {} of n_expert = {} (expected 1 <= n_expert_used <= n_expert)",
                self.n_expert_used, self.n_expert
            ));
        }
        for (i, l) in self.layers.iter().enumerate() {
            if i > 0 && l.layer <= self.layers[i - 1].layer {
                return bad(format!(
                    "layer {} comes after layer {} (layers must be ascending and distinct)",
                    l.layer,
                    self.layers[i - 1].layer
                ));
            }
            if l.counts.len() != self.n_expert {
                return bad(format!(
                    "layer {} has {} counts for {} experts",
                    l.layer,
                    l.counts.len(),
                    self.n_expert
                ));
            }
            if let Some((e, &c)) = l.counts.iter().enumerate().find(|(_, &c)| c > l.n_tokens) {
                return bad(format!(
                    "layer {} expert {e}: {c} tokens of {} (a token picks an expert at most once)",
                    l.layer, l.n_tokens
                ));
            }
            let picks = l.counts.iter().try_fold(0u64, |a, &c| a.checked_add(c));
            let most = l.n_tokens.checked_mul(self.n_expert_used as u64);
            match (picks, most) {
                (Some(p), Some(m)) if p <= m => {}
                _ => {
                    return bad(format!(
                    "layer {}: the counts add up to more than n_tokens × n_expert_used = {} × {}",
                    l.layer, l.n_tokens, self.n_expert_used
                ))
                }
            }
        }
        Ok(())
    }

    /// Checks the statistics against a model: the same expert count and `k`,
    /// and only MoE layers of it. (A MoE layer missing from the statistics is
    /// taken as uniformly routed.)
    pub fn check_model(
        &self,
        shape: &ModelShape,
        n_expert_used: usize,
    ) -> Result<(), RoutingStatsError> {
        self.validate()?;
        if self.n_expert != shape.n_expert || self.n_expert_used != n_expert_used {
            return Err(RoutingStatsError(format!(
                "recorded with {} of {} experts per token, the model routes to {n_expert_used} of {}",
                self.n_expert_used, self.n_expert, shape.n_expert
            )));
        }
        for l in &self.layers {
            if shape.part(l.layer, super::Part::Routed).is_none() {
                return Err(RoutingStatsError(format!(
                    "layer {} is not a MoE layer of the model ({} layers)",
                    l.layer, shape.n_layer
                )));
            }
        }
        Ok(())
    }

    /// The counts of `layer`, if recorded.
    pub fn layer(&self, layer: usize) -> Option<&LayerRouting> {
        self.layers
            .binary_search_by_key(&layer, |l| l.layer)
            .ok()
            .map(|i| &self.layers[i])
    }

    /// Adds `other`'s counts (the same model and layers) to these.
    pub fn merge(&mut self, other: &RoutingStats) -> Result<(), RoutingStatsError> {
        if (self.n_expert, self.n_expert_used) != (other.n_expert, other.n_expert_used)
            || self.layers.len() != other.layers.len()
            || self
                .layers
                .iter()
                .zip(&other.layers)
                .any(|(a, b)| a.layer != b.layer)
        {
            return Err(RoutingStatsError(
                "cannot add statistics of differently shaped models".to_string(),
            ));
        }
        for (a, b) in self.layers.iter_mut().zip(&other.layers) {
            a.n_tokens += b.n_tokens;
            for (x, y) in a.counts.iter_mut().zip(&b.counts) {
                *x += y;
            }
        }
        Ok(())
    }
}

/// How the tokens of one layer pick their experts.
#[derive(Clone, Debug, PartialEq)]
enum LayerDist {
    /// `k` draws without replacement in proportion to `weights`.
    Weighted {
        /// Running sums of the weights, for drawing by binary search.
        cumulative: Vec<f64>,
    },
    /// Systematic sampling with these inclusion probabilities (each in [0, 1], sum `k`).
    Inclusion { pi: Vec<f64> },
}

/// Per MoE layer, the distribution of a token's `k` experts.
#[derive(Clone, Debug, PartialEq)]
pub struct RoutingModel {
    n_expert: usize,
    k: usize,
    /// Per layer of the model; `None` on layers without routed experts.
    layers: Vec<Option<LayerDist>>,
    /// Per layer, the probability that a token picks each expert (sum `k`).
    inclusion: Vec<Option<Vec<f64>>>,
    description: String,
}

/// Tokens drawn to estimate the inclusion probabilities of a weighted
/// distribution (per rank, shared by the layers: they differ only by a permutation).
const INCLUSION_TOKENS: usize = 1 << 16;

impl RoutingModel {
    /// Uniform routing: every set of `k` experts equally likely.
    pub fn uniform(shape: &ModelShape, k: usize) -> RoutingModel {
        let mut m = RoutingModel::zipf(shape, k, 0.0, 0);
        m.description = format!("uniform routing ({k} of {} experts)", shape.n_expert);
        m
    }

    /// Zipf(`exponent`) over each layer's experts (see the module doc), the rank
    /// order a random permutation per layer drawn from `seed`.
    pub fn zipf(shape: &ModelShape, k: usize, exponent: f64, seed: u64) -> RoutingModel {
        let n_expert = shape.n_expert;
        let k = k.clamp(1, n_expert.max(1));
        let rank_weights: Vec<f64> = (1..=n_expert).map(|r| (r as f64).powf(-exponent)).collect();
        // Inclusion probability of each rank, estimated once by sampling.
        let rank_cumulative = running_sums(&rank_weights);
        let mut rank_inclusion = vec![0.0f64; n_expert];
        if exponent == 0.0 {
            rank_inclusion.fill(k as f64 / n_expert as f64);
        } else if n_expert > 0 {
            let mut rng = SplitMix64::new(mix64(seed ^ 0x5a5a_1f2e_0c0d_e001));
            let mut picked = Vec::with_capacity(k);
            for _ in 0..INCLUSION_TOKENS {
                draw_weighted(&rank_cumulative, k, &mut rng, &mut picked);
                for &r in &picked {
                    rank_inclusion[r] += 1.0;
                }
            }
            rank_inclusion
                .iter_mut()
                .for_each(|v| *v /= INCLUSION_TOKENS as f64);
        }
        let mut layers = Vec::with_capacity(shape.n_layer);
        let mut inclusion = Vec::with_capacity(shape.n_layer);
        for (layer, ls) in shape.layers.iter().enumerate() {
            if ls.routed.is_none() {
                layers.push(None);
                inclusion.push(None);
                continue;
            }
            let perm = permutation(n_expert, mix64(seed ^ mix64(layer as u64 + 1)));
            let mut weights = vec![0.0f64; n_expert];
            let mut incl = vec![0.0f64; n_expert];
            for (rank, &expert) in perm.iter().enumerate() {
                weights[expert] = rank_weights[rank];
                incl[expert] = rank_inclusion[rank];
            }
            layers.push(Some(LayerDist::Weighted {
                cumulative: running_sums(&weights),
            }));
            inclusion.push(Some(incl));
        }
        RoutingModel {
            n_expert,
            k,
            layers,
            inclusion,
            description: format!(
                "Zipf({exponent}) over each layer's {n_expert} experts, {k} drawn without replacement, rank order seeded with {seed}"
            ),
        }
    }

    /// The recorded frequencies of `stats` (see the module doc). MoE layers of
    /// `shape` the statistics lack, or where they saw no token, are uniform.
    pub fn from_stats(
        shape: &ModelShape,
        stats: &RoutingStats,
    ) -> Result<RoutingModel, RoutingStatsError> {
        stats.check_model(shape, stats.n_expert_used)?;
        let n_expert = shape.n_expert;
        let k = stats.n_expert_used;
        let mut layers = Vec::with_capacity(shape.n_layer);
        let mut inclusion = Vec::with_capacity(shape.n_layer);
        let mut n_recorded = 0usize;
        for (layer, ls) in shape.layers.iter().enumerate() {
            if ls.routed.is_none() {
                layers.push(None);
                inclusion.push(None);
                continue;
            }
            let pi = match stats.layer(layer) {
                Some(l) if l.n_tokens > 0 => {
                    n_recorded += 1;
                    let prior = k as f64 / n_expert as f64;
                    let raw: Vec<f64> = l.counts.iter().map(|&c| c as f64 + prior).collect();
                    capped_inclusion(&raw, k)
                }
                _ => vec![k as f64 / n_expert as f64; n_expert],
            };
            layers.push(Some(LayerDist::Inclusion { pi: pi.clone() }));
            inclusion.push(Some(pi));
        }
        let tokens: u64 = stats.layers.iter().map(|l| l.n_tokens).max().unwrap_or(0);
        Ok(RoutingModel {
            n_expert,
            k,
            layers,
            inclusion,
            description: format!(
                "recorded routing statistics ({n_recorded} MoE layers, up to {tokens} tokens per layer; {k} of {n_expert} experts per token)"
            ),
        })
    }

    /// What the distribution is, in words.
    pub fn description(&self) -> &str {
        &self.description
    }

    /// Experts each token picks.
    pub fn k(&self) -> usize {
        self.k
    }

    /// Routed experts per MoE layer.
    pub fn n_expert(&self) -> usize {
        self.n_expert
    }

    /// Per expert of `layer`, the probability that a token picks it (sum `k`);
    /// `None` on layers without routed experts.
    pub fn inclusion(&self, layer: usize) -> Option<&[f64]> {
        self.inclusion.get(layer)?.as_deref()
    }

    /// Draws one token's `k` distinct experts of `layer` into `out` (cleared
    /// first; nothing on a layer without routed experts).
    pub fn sample_token(&self, layer: usize, rng: &mut SplitMix64, out: &mut Vec<usize>) {
        out.clear();
        match self.layers.get(layer) {
            Some(Some(LayerDist::Weighted { cumulative })) => {
                draw_weighted(cumulative, self.k, rng, out)
            }
            Some(Some(LayerDist::Inclusion { pi })) => draw_systematic(pi, self.k, rng, out),
            _ => {}
        }
    }

    /// Statistics of `n_tokens` tokens per MoE layer drawn from this model with
    /// `seed` (the synthetic generator).
    pub fn synthetic_stats(&self, n_tokens: u64, seed: u64) -> RoutingStats {
        let mut layers = Vec::new();
        let mut picked = Vec::with_capacity(self.k);
        for layer in 0..self.layers.len() {
            if self.layers[layer].is_none() {
                continue;
            }
            let mut rng = SplitMix64::new(mix64(seed ^ mix64(layer as u64)));
            let mut counts = vec![0u64; self.n_expert];
            for _ in 0..n_tokens {
                self.sample_token(layer, &mut rng, &mut picked);
                for &e in &picked {
                    counts[e] += 1;
                }
            }
            layers.push(LayerRouting {
                layer,
                n_tokens,
                counts,
            });
        }
        RoutingStats {
            version: ROUTING_STATS_VERSION,
            model_identity: None,
            n_expert: self.n_expert,
            n_expert_used: self.k,
            layers,
        }
    }
}

fn running_sums(weights: &[f64]) -> Vec<f64> {
    let mut sum = 0.0;
    weights
        .iter()
        .map(|w| {
            sum += w;
            sum
        })
        .collect()
}

/// A random permutation of `0..n` (Fisher–Yates) from `seed`.
fn permutation(n: usize, seed: u64) -> Vec<usize> {
    let mut rng = SplitMix64::new(seed);
    let mut perm: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        let j = (rng.next_u64() % (i as u64 + 1)) as usize;
        perm.swap(i, j);
    }
    perm
}

/// `k` distinct indices drawn without replacement in proportion to the weights
/// whose running sums are `cumulative`: a draw from all of them, repeated while
/// it hits one already taken — the same distribution as drawing from the rest.
/// Falls back to a scan when the weights left are too small to hit by chance.
fn draw_weighted(cumulative: &[f64], k: usize, rng: &mut SplitMix64, out: &mut Vec<usize>) {
    out.clear();
    let n = cumulative.len();
    let total = cumulative.last().copied().unwrap_or(0.0);
    let k = k.min(n);
    let weight = |i: usize| cumulative[i] - if i == 0 { 0.0 } else { cumulative[i - 1] };
    while out.len() < k {
        let mut found = None;
        for _ in 0..64 {
            let u = rng.next_f64() * total;
            let i = cumulative.partition_point(|&c| c <= u).min(n - 1);
            if !out.contains(&i) {
                found = Some(i);
                break;
            }
        }
        let i = found.unwrap_or_else(|| {
            // The taken indices hold nearly all the weight: draw among the rest directly.
            let rest: f64 = (0..n).filter(|i| !out.contains(i)).map(weight).sum();
            let mut u = rng.next_f64() * rest;
            let mut last = None;
            for i in (0..n).filter(|i| !out.contains(i)) {
                last = Some(i);
                u -= weight(i);
                if u < 0.0 {
                    break;
                }
            }
            last.unwrap_or(0)
        });
        out.push(i);
    }
}

/// `k` distinct indices with inclusion probabilities `pi` (each in [0, 1], sum
/// `k`): systematic sampling over a fresh random order — walk the running sums,
/// take each index whose interval contains one of `u, u+1, …, u+k-1`.
fn draw_systematic(pi: &[f64], k: usize, rng: &mut SplitMix64, out: &mut Vec<usize>) {
    out.clear();
    let n = pi.len();
    let mut order: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        let j = (rng.next_u64() % (i as u64 + 1)) as usize;
        order.swap(i, j);
    }
    let u = rng.next_f64();
    let mut next = u;
    let mut sum = 0.0;
    for &i in &order {
        sum += pi[i];
        if sum > next {
            out.push(i);
            next += 1.0;
            if out.len() == k {
                return;
            }
        }
    }
    // Rounding left the last threshold just past the total: take the most likely of the rest.
    while out.len() < k.min(n) {
        let best = (0..n)
            .filter(|i| !out.contains(i))
            .max_by(|&a, &b| pi[a].total_cmp(&pi[b]))
            .unwrap_or(0);
        out.push(best);
    }
}

/// Scales `raw` (positive) to sum `k` with no value above 1: values that would
/// pass 1 are set to 1 and the rest rescaled, until none does.
fn capped_inclusion(raw: &[f64], k: usize) -> Vec<f64> {
    let n = raw.len();
    let mut capped = vec![false; n];
    let mut pi = vec![0.0; n];
    loop {
        let n_capped = capped.iter().filter(|&&c| c).count();
        let rest: f64 = (0..n).filter(|&i| !capped[i]).map(|i| raw[i]).sum();
        let scale = (k as f64 - n_capped as f64) / rest;
        let mut changed = false;
        for i in 0..n {
            pi[i] = if capped[i] { 1.0 } else { raw[i] * scale };
            if !capped[i] && pi[i] > 1.0 {
                capped[i] = true;
                changed = true;
            }
        }
        if !changed {
            return pi;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::placement::{FfnShape, LayerShape};

    fn shape(n_layer: usize, n_expert: usize) -> ModelShape {
        let f = FfnShape {
            n_ff: 512,
            block: 256,
        };
        ModelShape {
            n_layer,
            n_expert,
            layers: (0..n_layer)
                .map(|l| LayerShape {
                    routed: (l > 0).then_some(f),
                    dense: None,
                })
                .collect(),
        }
    }

    #[test]
    fn zipf_draws_distinct_experts_with_a_skew() {
        let s = shape(3, 64);
        let m = RoutingModel::zipf(&s, 8, 1.0, 7);
        assert!(m.inclusion(0).is_none());
        let stats = m.synthetic_stats(20_000, 1);
        stats.validate().unwrap();
        assert_eq!(stats.layers.len(), 2);
        for l in &stats.layers {
            assert_eq!(l.counts.iter().sum::<u64>(), 20_000 * 8);
            let incl = m.inclusion(l.layer).unwrap();
            assert!((incl.iter().sum::<f64>() - 8.0).abs() < 1e-9);
            // The estimated inclusion matches what the generator does.
            for (e, &c) in l.counts.iter().enumerate() {
                let f = c as f64 / 20_000.0;
                assert!((f - incl[e]).abs() < 0.02, "expert {e}: {f} vs {}", incl[e]);
            }
            let max = *l.counts.iter().max().unwrap() as f64 / 20_000.0;
            let min = *l.counts.iter().min().unwrap() as f64 / 20_000.0;
            assert!(max > 0.5 && min < 0.05, "skewed: {max} {min}");
        }
        // Different layers rank their experts differently.
        assert_ne!(m.inclusion(1), m.inclusion(2));
    }

    #[test]
    fn stats_frequencies_are_reproduced_exactly_in_expectation() {
        let s = shape(2, 16);
        let mut counts = vec![0u64; 16];
        counts[3] = 1000; // every token
        counts[5] = 600;
        counts[9] = 300;
        counts[0] = 100;
        let stats = RoutingStats {
            version: 1,
            model_identity: None,
            n_expert: 16,
            n_expert_used: 2,
            layers: vec![LayerRouting {
                layer: 1,
                n_tokens: 1000,
                counts,
            }],
        };
        let m = RoutingModel::from_stats(&s, &stats).unwrap();
        let pi = m.inclusion(1).unwrap();
        assert!((pi.iter().sum::<f64>() - 2.0).abs() < 1e-9);
        // Smoothed by one uniform pseudo-token: (1000 + 2/16) / 1001.
        assert!((pi[3] - 1000.125 / 1001.0).abs() < 1e-9);
        let drawn = m.synthetic_stats(50_000, 3);
        let l = &drawn.layers[0];
        assert!(l.counts[3] > 49_900);
        for (e, (&c, &p)) in l.counts.iter().zip(pi).enumerate() {
            let f = c as f64 / 50_000.0;
            assert!((f - p).abs() < 0.01, "expert {e}: {f} vs {p}");
        }
    }

    #[test]
    fn the_documented_example_is_valid() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/placement.md");
        let text = std::fs::read_to_string(path).unwrap();
        let block = text
            .split("```json\n")
            .nth(1)
            .and_then(|b| b.split("```").next())
            .expect("a JSON example in docs/placement.md");
        let stats: RoutingStats = serde_json::from_str(block).unwrap();
        let mut both_moe = shape(2, 8);
        both_moe.layers[0].routed = both_moe.layers[1].routed;
        stats.check_model(&both_moe, 2).unwrap();
        assert_eq!(stats.layer(1).unwrap().n_tokens, 6);
    }

    #[test]
    fn refusals_name_the_problem() {
        let s = shape(2, 4);
        let good = RoutingStats {
            version: 1,
            model_identity: None,
            n_expert: 4,
            n_expert_used: 2,
            layers: vec![LayerRouting {
                layer: 1,
                n_tokens: 3,
                counts: vec![3, 1, 1, 1],
            }],
        };
        good.check_model(&s, 2).unwrap();
        let check = |edit: &dyn Fn(&mut RoutingStats), want: &str| {
            let mut st = good.clone();
            edit(&mut st);
            let err = st.check_model(&s, 2).unwrap_err().to_string();
            assert!(err.contains(want), "{err:?} should say {want:?}");
        };
        check(&|st| st.version = 2, "unsupported version 2");
        check(&|st| st.layers[0].counts[0] = 4, "expert 0: 4 tokens of 3");
        check(
            &|st| st.layers[0].counts = vec![1, 2],
            "2 counts for 4 experts",
        );
        check(
            &|st| st.layers[0].counts = vec![3, 3, 1, 0],
            "more than n_tokens",
        );
        check(&|st| st.layers[0].layer = 0, "layer 0 is not a MoE layer");
        check(&|st| st.n_expert_used = 3, "the model routes to 2 of 4");
        check(
            &|st| st.model_identity = Some("xyz".into()),
            "not 64 hex digits",
        );
    }
}
