//! Recording routing decisions: [`RoutingCounter`] counts, per MoE layer and
//! expert, the tokens the router sent there (every forward pass of a
//! [`crate::models::Model`] adds to its counter), and [`save`] / [`load`] write
//! and read them as the JSON routing-statistics file of `docs/placement.md`
//! (`moeshard generate|eval --record-routing FILE`, `moeshard plan
//! --routing-stats FILE`).

use std::fs;
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::Context;
use shared::models::HParams;
use shared::moe::Assignment;
use shared::placement::routing_stats::{LayerRouting, RoutingStats, ROUTING_STATS_VERSION};

/// Per (layer, expert) token counts, added to from any thread.
#[derive(Debug)]
pub struct RoutingCounter {
    n_expert: usize,
    n_expert_used: usize,
    /// Per layer; `None` on layers without routed experts.
    layers: Vec<Option<LayerCounter>>,
}

#[derive(Debug)]
struct LayerCounter {
    n_tokens: AtomicU64,
    /// Invariant: `n_expert` entries.
    counts: Box<[AtomicU64]>,
}

impl RoutingCounter {
    /// A zeroed counter for the MoE layers of a model.
    pub fn new(hp: &HParams) -> RoutingCounter {
        RoutingCounter {
            n_expert: hp.n_expert,
            n_expert_used: hp.n_expert_used,
            layers: (0..hp.n_layer)
                .map(|layer| {
                    hp.is_moe_layer(layer).then(|| LayerCounter {
                        n_tokens: AtomicU64::new(0),
                        counts: (0..hp.n_expert).map(|_| AtomicU64::new(0)).collect(),
                    })
                })
                .collect(),
        }
    }

    /// Adds one routing decision of layer `layer`: `n_tokens` tokens and their
    /// assignments. Out-of-range layers and experts are ignored (the router
    /// never makes them).
    pub fn record(&self, layer: usize, n_tokens: usize, assignments: &[Assignment]) {
        let Some(Some(l)) = self.layers.get(layer) else {
            return;
        };
        l.n_tokens.fetch_add(n_tokens as u64, Ordering::Relaxed);
        for a in assignments {
            if let Some(c) = l.counts.get(a.expert as usize) {
                c.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// The counts so far, for the model `model_identity`.
    pub fn snapshot(&self, model_identity: Option<&[u8; 32]>) -> RoutingStats {
        RoutingStats {
            version: ROUTING_STATS_VERSION,
            model_identity: model_identity.map(shared::placement::identity_hex),
            n_expert: self.n_expert,
            n_expert_used: self.n_expert_used,
            layers: self
                .layers
                .iter()
                .enumerate()
                .filter_map(|(layer, l)| {
                    let l = l.as_ref()?;
                    Some(LayerRouting {
                        layer,
                        n_tokens: l.n_tokens.load(Ordering::Relaxed),
                        counts: l.counts.iter().map(|c| c.load(Ordering::Relaxed)).collect(),
                    })
                })
                .collect(),
        }
    }

    /// Sets every count to zero.
    pub fn reset(&self) {
        for l in self.layers.iter().flatten() {
            l.n_tokens.store(0, Ordering::Relaxed);
            l.counts.iter().for_each(|c| c.store(0, Ordering::Relaxed));
        }
    }
}

/// Writes `stats` as JSON to `path` (through a temporary name, renamed into place).
pub fn save(stats: &RoutingStats, path: &Path) -> anyhow::Result<()> {
    let mut text = serde_json::to_string_pretty(stats).context("encoding routing statistics")?;
    text.push('\n');
    let mut tmp_name = path
        .file_name()
        .with_context(|| format!("{} is not a file path", path.display()))?
        .to_os_string();
    tmp_name.push(".tmp");
    let tmp = path.with_file_name(tmp_name);
    let result = (|| -> anyhow::Result<()> {
        let mut f =
            fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        f.write_all(text.as_bytes())
            .and_then(|()| f.sync_all())
            .with_context(|| format!("writing {}", tmp.display()))?;
        fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Reads and checks a routing statistics file.
pub fn load(path: &Path) -> anyhow::Result<RoutingStats> {
    let text = fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let stats: RoutingStats = serde_json::from_str(&text)
        .with_context(|| format!("{}: not a routing statistics file", path.display()))?;
    stats
        .validate()
        .with_context(|| format!("{}", path.display()))?;
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_round_trip_through_a_file() {
        let stats = RoutingStats {
            version: ROUTING_STATS_VERSION,
            model_identity: Some("ab".repeat(32)),
            n_expert: 4,
            n_expert_used: 2,
            layers: vec![LayerRouting {
                layer: 1,
                n_tokens: 3,
                counts: vec![3, 2, 0, 1],
            }],
        };
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("routing.json");
        save(&stats, &path).unwrap();
        assert_eq!(load(&path).unwrap(), stats);
        std::fs::write(&path, r#"{"version": 1, "n_expert": 4}"#).unwrap();
        let err = format!("{:#}", load(&path).unwrap_err());
        assert!(err.contains("missing field"), "{err}");
        std::fs::write(
            &path,
            r#"{"version": 1, "n_expert": 4, "n_expert_used": 2, "layers": [{"layer": 1, "n_tokens": 1, "counts": [1, 1, 1, 0]}]}"#,
        )
        .unwrap();
        let err = format!("{:#}", load(&path).unwrap_err());
        assert!(err.contains("more than n_tokens"), "{err}");
    }
}
