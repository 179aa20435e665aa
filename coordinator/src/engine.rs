//! Single-process inference: a [`Model`] with its routed experts computed by the
//! in-process node, plus the generation loop (one batch for the prompt, then
//! one token per step).

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use shared::gguf::GgufFile;

use crate::kv_cache::KvCache;
use crate::models::{EngineError, ExpertExecutor, InprocExperts, Logits, Model};
use crate::sampler::Sampler;

/// The most tokens evaluated as one batch: longer prompts are cut into batches of this size,
/// as llama.cpp's default `n_ubatch` does (and as expert dispatches must be, see
/// `proto::limits`).
pub const UBATCH: usize = 512;

/// One sequence's part of a batched step: `tokens` are appended after what `cache` holds.
pub struct SeqStep<'a> {
    pub cache: &'a mut KvCache,
    pub tokens: &'a [u32],
}

/// A model ready to evaluate, with the executor of its routed experts.
pub struct Engine {
    model: Model,
    experts: Box<dyn ExpertExecutor>,
}

/// What a generation did, and how fast.
#[derive(Clone, Debug, Default)]
pub struct GenerationStats {
    pub n_prompt: usize,
    pub n_generated: usize,
    pub prompt_time: Duration,
    pub generation_time: Duration,
}

impl GenerationStats {
    /// Prompt tokens per second.
    pub fn prompt_tps(&self) -> f64 {
        self.n_prompt as f64 / self.prompt_time.as_secs_f64().max(1e-9)
    }
    /// Generated tokens per second (the first token's step included).
    pub fn generation_tps(&self) -> f64 {
        self.n_generated as f64 / self.generation_time.as_secs_f64().max(1e-9)
    }
}

impl Engine {
    /// Opens a GGUF file and loads it for single-process inference.
    pub fn open(path: &Path) -> Result<Engine, EngineError> {
        let file = Arc::new(GgufFile::open(path)?);
        Engine::from_file(file)
    }

    /// Loads an opened file for single-process inference.
    pub fn from_file(file: Arc<GgufFile>) -> Result<Engine, EngineError> {
        let model = Model::load(file.clone())?;
        let experts = InprocExperts::new(file, model.hparams())?;
        Ok(Engine {
            model,
            experts: Box::new(experts),
        })
    }

    /// A model whose routed experts are computed elsewhere.
    pub fn with_executor(model: Model, experts: Box<dyn ExpertExecutor>) -> Engine {
        Engine { model, experts }
    }

    /// The routed-expert executor (its nodes' stats, in distributed mode).
    pub fn experts(&self) -> &dyn ExpertExecutor {
        self.experts.as_ref()
    }

    pub fn model(&self) -> &Model {
        &self.model
    }

    /// A fresh KV cache of `n_ctx` positions.
    pub fn new_cache(&self, n_ctx: usize) -> KvCache {
        self.model.new_cache(n_ctx)
    }

    /// Evaluates `tokens` after what `cache` holds; logits of every position or the last.
    pub fn forward(
        &self,
        cache: &mut KvCache,
        tokens: &[u32],
        which: Logits,
    ) -> Result<Vec<f32>, EngineError> {
        self.model
            .forward(self.experts.as_ref(), cache, tokens, which)
    }

    /// One step of several sequences (continuous batching): each sequence's tokens are
    /// evaluated after what its cache holds; returns each sequence's last-position logits.
    ///
    /// The sequences' rows go through every matmul and expert dispatch together (weights
    /// streamed once per step), each computed in the float order it gets alone: a sequence's
    /// logits do not depend on which other sequences share the step.
    pub fn step(&self, seqs: &mut [SeqStep<'_>]) -> Result<Vec<Vec<f32>>, EngineError> {
        let mut batch: Vec<(&mut KvCache, &[u32])> =
            seqs.iter_mut().map(|s| (&mut *s.cache, s.tokens)).collect();
        let logits = self
            .model
            .forward_batch(self.experts.as_ref(), &mut batch, Logits::Last)?;
        let n_vocab = self.model.hparams().n_vocab;
        Ok(logits.chunks_exact(n_vocab).map(<[f32]>::to_vec).collect())
    }

    /// Logits `[n_tokens, n_vocab]` of `tokens` from an empty cache, evaluated in batches of
    /// at most [`UBATCH`] tokens (one batch for shorter inputs).
    pub fn eval(&self, tokens: &[u32]) -> Result<Vec<f32>, EngineError> {
        if tokens.is_empty() {
            return Err(EngineError::EmptyBatch);
        }
        let mut cache = self.new_cache(tokens.len());
        let mut logits = Vec::new();
        for chunk in tokens.chunks(UBATCH) {
            logits.extend(self.forward(&mut cache, chunk, Logits::All)?);
        }
        Ok(logits)
    }

    /// Evaluates `tokens` after what `cache` holds in batches of at most [`UBATCH`] tokens;
    /// the last position's logits.
    pub fn prefill(&self, cache: &mut KvCache, tokens: &[u32]) -> Result<Vec<f32>, EngineError> {
        let mut logits = None;
        for chunk in tokens.chunks(UBATCH) {
            logits = Some(self.forward(cache, chunk, Logits::Last)?);
        }
        logits.ok_or(EngineError::EmptyBatch)
    }

    /// Generates up to `n_predict` tokens after `prompt` (evaluated in batches of [`UBATCH`])
    /// in a context of `n_ctx` positions, calling `on_token` for each; stops early
    /// when `on_token` returns false or the context is full.
    pub fn generate(
        &self,
        prompt: &[u32],
        n_predict: usize,
        n_ctx: usize,
        sampler: &mut Sampler,
        mut on_token: impl FnMut(u32) -> bool,
    ) -> Result<(Vec<u32>, GenerationStats), EngineError> {
        let mut stats = GenerationStats {
            n_prompt: prompt.len(),
            ..Default::default()
        };
        if prompt.len() >= n_ctx {
            return Err(EngineError::ContextFull {
                n_past: 0,
                n_new: prompt.len(),
                n_ctx,
            });
        }
        // Generation stops when the context is full, as llama.cpp's does.
        let n_predict = n_predict.min(n_ctx - prompt.len());
        let mut cache = self.new_cache(n_ctx);
        let mut history: Vec<u32> = prompt.to_vec();
        let mut out = Vec::with_capacity(n_predict);
        if n_predict == 0 {
            return Ok((out, stats));
        }
        let t0 = Instant::now();
        let mut logits = self.prefill(&mut cache, prompt)?;
        stats.prompt_time = t0.elapsed();
        let t1 = Instant::now();
        loop {
            let tok = sampler.sample(&logits, &history);
            out.push(tok);
            history.push(tok);
            stats.n_generated += 1;
            if !on_token(tok) || out.len() >= n_predict {
                break;
            }
            logits = self.forward(&mut cache, &[tok], Logits::Last)?;
        }
        stats.generation_time = t1.elapsed();
        Ok((out, stats))
    }
}
