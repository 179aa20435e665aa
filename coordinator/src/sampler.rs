//! Token sampling: greedy, or the llama.cpp chain — repetition penalty, top-k,
//! top-p, min-p, temperature, then a seeded draw.

/// Sampling settings (llama.cpp's defaults where it has them).
#[derive(Clone, Debug, PartialEq)]
pub struct SamplerConfig {
    /// 0 (or below) means greedy.
    pub temperature: f32,
    /// 0 disables.
    pub top_k: usize,
    /// 1 disables.
    pub top_p: f32,
    /// 0 disables.
    pub min_p: f32,
    /// 1 disables.
    pub repeat_penalty: f32,
    /// How many recent tokens the penalty looks at.
    pub repeat_last_n: usize,
    pub seed: u64,
}

impl Default for SamplerConfig {
    fn default() -> Self {
        SamplerConfig {
            temperature: 0.8,
            top_k: 40,
            top_p: 0.95,
            min_p: 0.05,
            repeat_penalty: 1.0,
            repeat_last_n: 64,
            seed: 0x5EED,
        }
    }
}

impl SamplerConfig {
    /// Greedy decoding.
    pub fn greedy() -> Self {
        SamplerConfig {
            temperature: 0.0,
            ..SamplerConfig::default()
        }
    }
}

/// A sampler with its own random state.
#[derive(Clone, Debug)]
pub struct Sampler {
    config: SamplerConfig,
    rng: shared::rng::SplitMix64,
}

impl Sampler {
    pub fn new(config: SamplerConfig) -> Sampler {
        Sampler {
            rng: shared::rng::SplitMix64::new(config.seed),
            config,
        }
    }

    /// Picks the next token from `logits`, given the tokens so far (for the penalty).
    pub fn sample(&mut self, logits: &[f32], history: &[u32]) -> u32 {
        let c = &self.config;
        let mut cand: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .map(|(i, &l)| (i as u32, l))
            .collect();
        if c.repeat_penalty != 1.0 && c.repeat_last_n > 0 {
            let start = history.len().saturating_sub(c.repeat_last_n);
            let mut seen = std::collections::HashSet::new();
            for &t in &history[start..] {
                if seen.insert(t) {
                    if let Some(e) = cand.get_mut(t as usize) {
                        e.1 = if e.1 > 0.0 {
                            e.1 / c.repeat_penalty
                        } else {
                            e.1 * c.repeat_penalty
                        };
                    }
                }
            }
        }
        if c.temperature <= 0.0 {
            return argmax(&cand);
        }
        // Sort by logit, best first (ties: lower id first).
        cand.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        if c.top_k > 0 && c.top_k < cand.len() {
            cand.truncate(c.top_k);
        }
        let probs = softmax(&cand);
        if c.top_p < 1.0 {
            let mut cum = 0.0;
            let mut keep = cand.len();
            for (i, p) in probs.iter().enumerate() {
                cum += p;
                if cum >= c.top_p {
                    keep = i + 1;
                    break;
                }
            }
            cand.truncate(keep.max(1));
        }
        if c.min_p > 0.0 {
            let max = cand[0].1;
            let threshold = max + c.min_p.ln();
            let keep = cand.iter().take_while(|e| e.1 >= threshold).count().max(1);
            cand.truncate(keep);
        }
        for e in &mut cand {
            e.1 /= c.temperature;
        }
        let probs = softmax(&cand);
        let r = self.rng.next_f64();
        let mut cum = 0.0;
        for (e, p) in cand.iter().zip(&probs) {
            cum += *p as f64;
            if r < cum {
                return e.0;
            }
        }
        cand[cand.len() - 1].0
    }
}

fn argmax(cand: &[(u32, f32)]) -> u32 {
    let mut best = 0;
    for (i, e) in cand.iter().enumerate() {
        if e.1 > cand[best].1 {
            best = i;
        }
    }
    cand[best].0
}

fn softmax(cand: &[(u32, f32)]) -> Vec<f32> {
    let max = cand.iter().map(|e| e.1).fold(f32::NEG_INFINITY, f32::max);
    let exps: Vec<f64> = cand.iter().map(|e| ((e.1 - max) as f64).exp()).collect();
    let sum: f64 = exps.iter().sum();
    exps.iter().map(|&e| (e / sum) as f32).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_argmax() {
        let mut s = Sampler::new(SamplerConfig::greedy());
        assert_eq!(s.sample(&[0.1, 3.0, 2.9, -1.0], &[]), 1);
    }

    #[test]
    fn penalty_can_change_greedy_choice() {
        let mut s = Sampler::new(SamplerConfig {
            repeat_penalty: 2.0,
            ..SamplerConfig::greedy()
        });
        assert_eq!(s.sample(&[0.1, 3.0, 2.0, -1.0], &[1]), 2);
    }

    #[test]
    fn same_seed_same_tokens_and_top_k_one_is_greedy() {
        let logits: Vec<f32> = (0..50).map(|i| ((i * 37) % 11) as f32 * 0.3).collect();
        let cfg = SamplerConfig {
            temperature: 1.0,
            seed: 42,
            ..SamplerConfig::default()
        };
        let a: Vec<u32> = {
            let mut s = Sampler::new(cfg.clone());
            (0..20).map(|_| s.sample(&logits, &[])).collect()
        };
        let b: Vec<u32> = {
            let mut s = Sampler::new(cfg.clone());
            (0..20).map(|_| s.sample(&logits, &[])).collect()
        };
        assert_eq!(a, b);
        let mut s = Sampler::new(SamplerConfig { top_k: 1, ..cfg });
        let greedy = Sampler::new(SamplerConfig::greedy()).sample(&logits, &[]);
        assert!((0..10).all(|_| s.sample(&logits, &[]) == greedy));
    }

    #[test]
    fn min_p_filters_unlikely_tokens() {
        let logits = [10.0, 9.5, -10.0];
        let mut s = Sampler::new(SamplerConfig {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.1,
            ..SamplerConfig::default()
        });
        assert!((0..200).all(|_| s.sample(&logits, &[]) != 2));
    }
}
