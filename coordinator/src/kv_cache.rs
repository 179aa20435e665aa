//! The KV cache of one sequence: keys and values rounded to f16 when stored, as
//! llama.cpp's default f16 cache does.
//!
//! For MLA (deepseek2) only the compressed latent and the shared rope key are
//! kept per token (`kv_lora + rope` values), and the values are the first
//! `kv_lora` of them: no separate V.

use half::f16;

/// Cached keys/values of every layer for positions `0..n_past`.
#[derive(Debug, Clone)]
pub struct KvCache {
    n_ctx: usize,
    n_past: usize,
    layers: Vec<LayerCache>,
}

#[derive(Debug, Clone)]
struct LayerCache {
    /// Values per position in `k` (all KV heads together).
    k_width: usize,
    v_width: usize,
    k: Vec<f16>,
    v: Vec<f16>,
}

impl KvCache {
    /// A cache for `n_ctx` positions of `n_layer` layers with the given widths per position.
    /// Memory is reserved lazily as positions fill, so a large `n_ctx` costs nothing up front.
    pub fn new(n_ctx: usize, n_layer: usize, k_width: usize, v_width: usize) -> KvCache {
        KvCache {
            n_ctx,
            n_past: 0,
            layers: (0..n_layer)
                .map(|_| LayerCache {
                    k_width,
                    v_width,
                    k: Vec::new(),
                    v: Vec::new(),
                })
                .collect(),
        }
    }

    /// Capacity in positions.
    pub fn n_ctx(&self) -> usize {
        self.n_ctx
    }

    /// Positions already evaluated.
    pub fn n_past(&self) -> usize {
        self.n_past
    }

    /// Forgets everything (a new sequence).
    pub fn clear(&mut self) {
        self.n_past = 0;
        for l in &mut self.layers {
            l.k.clear();
            l.v.clear();
        }
    }

    /// Drops positions from `n` on (e.g. to re-evaluate a suffix).
    pub fn truncate(&mut self, n: usize) {
        if n < self.n_past {
            self.n_past = n;
            for l in &mut self.layers {
                l.k.truncate(n * l.k_width);
                l.v.truncate(n * l.v_width);
            }
        }
    }

    /// Marks `n` more positions as evaluated (after every layer stored them).
    pub(crate) fn advance(&mut self, n: usize) {
        self.n_past += n;
    }

    /// Stores the keys and values of position `pos` (which must be the next unstored one) in `layer`.
    pub(crate) fn store(&mut self, layer: usize, pos: usize, k: &[f32], v: &[f32]) {
        let l = &mut self.layers[layer];
        debug_assert_eq!(k.len(), l.k_width);
        debug_assert_eq!(v.len(), l.v_width);
        debug_assert_eq!(l.k.len(), pos * l.k_width, "positions are stored in order");
        l.k.extend(k.iter().map(|&x| f16::from_f32(x)));
        l.v.extend(v.iter().map(|&x| f16::from_f32(x)));
    }

    /// Keys of position `pos` in `layer` (all heads).
    pub(crate) fn k(&self, layer: usize, pos: usize) -> &[f16] {
        let l = &self.layers[layer];
        &l.k[pos * l.k_width..(pos + 1) * l.k_width]
    }

    /// Values of position `pos` in `layer` (all heads).
    pub(crate) fn v(&self, layer: usize, pos: usize) -> &[f16] {
        let l = &self.layers[layer];
        &l.v[pos * l.v_width..(pos + 1) * l.v_width]
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.layers
            .iter()
            .map(|l| (l.k.len() + l.v.len()) * 2)
            .sum()
    }
}
