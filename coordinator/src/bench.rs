//! `moeshard bench`: prompt and decode speed of a model on this machine, next
//! to the memory-bandwidth bound measured in the same run.
//!
//! Bytes read per decoded token = every tensor except `token_embd` (one row of
//! it is read), with expert tensors counted at `n_expert_used / n_expert`. The
//! bound is bandwidth / bytes per token.

use std::time::Instant;

use serde::Serialize;
use shared::gguf::GgufFile;
use shared::models::HParams;

use crate::engine::Engine;
use crate::models::{EngineError, Logits};

/// What to measure.
#[derive(Clone, Debug)]
pub struct BenchConfig {
    pub n_prompt: usize,
    pub n_decode: usize,
    pub reps: usize,
    /// Bytes of the buffer the bandwidth is measured on.
    pub bandwidth_buffer: usize,
    /// Numbers of concurrent sequences to measure batched decode at (`--parallel`); each
    /// step decodes one token of every sequence in one `Engine::step`.
    pub parallel: Vec<usize>,
    /// Also profile one decode pass (`--profile`): where each token's time goes.
    pub profile: bool,
}

/// One phase of the decode profile, in milliseconds per token.
#[derive(Clone, Debug, Serialize)]
pub struct PhaseProfile {
    pub phase: String,
    /// Wall time of the phase on the thread driving the pass.
    pub wall_ms: f64,
    /// Per thread (in [`DecodeProfile::threads`] order): time in work (kernels and the
    /// serial steps between them).
    pub work_ms: Vec<f64>,
    /// Per thread: wall minus work — idle, waiting for the other threads, or unmarked code.
    pub idle_ms: Vec<f64>,
}

/// Where a decoded token's time goes (`--profile`).
#[derive(Clone, Debug, Serialize)]
pub struct DecodeProfile {
    /// Sequences decoding together (one token each per step).
    pub sequences: usize,
    /// Tokens decoded with profiling on (after a prefill of the benchmark's prompt), all
    /// sequences together; times are per token.
    pub tokens: usize,
    /// Wall time per token of the profiled pass (slightly above the timed passes': the
    /// counters cost a little).
    pub wall_ms: f64,
    pub threads: Vec<String>,
    pub phases: Vec<PhaseProfile>,
}

/// Decode speed with several sequences stepping together.
#[derive(Clone, Debug, Serialize)]
pub struct ParallelResult {
    pub sequences: usize,
    /// Generated tokens per second, all sequences together (median over repetitions).
    pub decode_tps: f64,
    /// `decode_tps` over the batch-1 figure of the same run.
    pub speedup: f64,
}

/// Results (`--json` prints this object).
#[derive(Clone, Debug, Serialize)]
pub struct BenchResult {
    pub model: String,
    pub threads: usize,
    pub n_prompt: usize,
    pub n_decode: usize,
    pub reps: usize,
    /// Median over repetitions.
    pub prompt_tps: f64,
    pub prompt_tps_min: f64,
    pub decode_tps: f64,
    pub decode_tps_min: f64,
    /// Decode tokens/s of each repetition, in order (a warming cache shows as a trend).
    pub decode_tps_reps: Vec<f64>,
    pub bandwidth_gbs: f64,
    pub bytes_per_token: u64,
    pub bound_tps: f64,
    /// decode_tps / bound_tps.
    pub fraction_of_bound: f64,
    /// Peak resident memory of the model run (measured before the bandwidth probe).
    pub peak_rss_bytes: u64,
    pub kernels: String,
    /// Batched decode at each `--parallel` count (empty unless asked).
    pub parallel: Vec<ParallelResult>,
    /// With `--profile`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub profile: Option<DecodeProfile>,
    /// With `--profile` and `--parallel`: the same at the largest `--parallel` count.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub profile_parallel: Option<DecodeProfile>,
}

/// Bytes a decode step reads (see the module comment).
pub fn bytes_per_token(file: &GgufFile, hp: &HParams) -> u64 {
    let mut total = 0u64;
    for t in file.tensors() {
        if t.name == "token_embd.weight" {
            total += t.byte_len / t.ne.get(1).copied().unwrap_or(1).max(1);
        } else if t.name.contains("_exps") && hp.n_expert > 0 {
            total += t.byte_len * hp.n_expert_used as u64 / hp.n_expert as u64;
        } else {
            total += t.byte_len;
        }
    }
    // A tied output head reads all of token_embd.
    if file.tensor("output.weight").is_none() {
        if let Some(t) = file.tensor("token_embd.weight") {
            total += t.byte_len;
        }
    }
    total
}

/// Runs the benchmark in the current rayon pool.
pub fn run(
    engine: &Engine,
    model_name: &str,
    cfg: &BenchConfig,
) -> Result<BenchResult, EngineError> {
    let hp = engine.model().hparams();
    let n_vocab = hp.n_vocab as u32;
    // Deterministic pseudo-random tokens: the speed must not depend on the text.
    let tokens: Vec<u32> = (0..cfg.n_prompt as u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 7) % n_vocab)
        .collect();
    let mut prompt_tps = Vec::new();
    let mut decode_tps = Vec::new();
    // One warm-up pass faults the weights in.
    {
        let mut cache = engine.new_cache(cfg.n_prompt + cfg.n_decode + 1);
        engine.prefill(&mut cache, &tokens)?;
    }
    for _ in 0..cfg.reps.max(1) {
        let mut cache = engine.new_cache(cfg.n_prompt + cfg.n_decode + 1);
        let t = Instant::now();
        let logits = engine.prefill(&mut cache, &tokens)?;
        prompt_tps.push(cfg.n_prompt as f64 / t.elapsed().as_secs_f64());
        let mut next = argmax(&logits);
        let t = Instant::now();
        for _ in 0..cfg.n_decode {
            let logits = engine.forward(&mut cache, &[next], Logits::Last)?;
            next = argmax(&logits);
        }
        decode_tps.push(cfg.n_decode as f64 / t.elapsed().as_secs_f64());
    }
    let decode_tps_reps = decode_tps.clone();
    let (d_med, d_min) = median_min(&mut decode_tps);
    let mut parallel = Vec::new();
    for &b in &cfg.parallel {
        let tps = parallel_decode(engine, &tokens, b, cfg)?;
        parallel.push(ParallelResult {
            sequences: b,
            decode_tps: tps,
            speedup: tps / d_med,
        });
    }
    let profile = if cfg.profile {
        Some(profile_decode(engine, &tokens, 1, cfg)?)
    } else {
        None
    };
    let profile_parallel = match cfg.parallel.iter().max() {
        Some(&b) if cfg.profile && b > 1 => Some(profile_decode(engine, &tokens, b, cfg)?),
        _ => None,
    };
    // Before the bandwidth probe, whose buffer would otherwise dominate the peak.
    let peak_rss_bytes = shared::membw::peak_rss_bytes().unwrap_or(0);
    let bandwidth = shared::membw::read_bandwidth(cfg.bandwidth_buffer, 5);
    let bpt = bytes_per_token(engine.model().file(), hp);
    let bound = bandwidth / bpt as f64;
    let (p_med, p_min) = median_min(&mut prompt_tps);
    Ok(BenchResult {
        model: model_name.to_owned(),
        threads: rayon::current_num_threads(),
        n_prompt: cfg.n_prompt,
        n_decode: cfg.n_decode,
        reps: cfg.reps,
        prompt_tps: p_med,
        prompt_tps_min: p_min,
        decode_tps: d_med,
        decode_tps_min: d_min,
        decode_tps_reps,
        bandwidth_gbs: bandwidth / 1e9,
        bytes_per_token: bpt,
        bound_tps: bound,
        fraction_of_bound: d_med / bound,
        peak_rss_bytes,
        kernels: engine.model().kernels().name(),
        parallel,
        profile,
        profile_parallel,
    })
}

/// One decode pass of `cfg.n_decode` steps of `b` sequences after their prompts, with the
/// profile counters on.
fn profile_decode(
    engine: &Engine,
    tokens: &[u32],
    b: usize,
    cfg: &BenchConfig,
) -> Result<DecodeProfile, EngineError> {
    use shared::profile::{self, Phase};
    let (mut caches, mut next) = prefill_sequences(engine, tokens, b, cfg)?;
    profile::set_enabled(true);
    let t = Instant::now();
    let mut run = || -> Result<(), EngineError> {
        for _ in 0..cfg.n_decode {
            next = decode_step(engine, &mut caches, &next)?;
        }
        Ok(())
    };
    let outcome = run();
    let elapsed = t.elapsed();
    profile::set_enabled(false);
    outcome?;
    let report = profile::report();
    let n_tokens = (cfg.n_decode * b).max(1);
    let per_token = |ns: u64| ns as f64 / 1e6 / n_tokens as f64;
    let threads: Vec<String> = report.threads.iter().map(|(n, _)| n.clone()).collect();
    let phases = Phase::ALL
        .iter()
        .map(|&p| {
            let wall = per_token(report.wall_ns[p as usize]);
            let work_ms: Vec<f64> = report
                .threads
                .iter()
                .map(|(_, ns)| per_token(ns[p as usize]))
                .collect();
            let idle_ms = work_ms.iter().map(|w| (wall - w).max(0.0)).collect();
            PhaseProfile {
                phase: p.name().to_owned(),
                wall_ms: wall,
                work_ms,
                idle_ms,
            }
        })
        .collect();
    Ok(DecodeProfile {
        sequences: b,
        tokens: n_tokens,
        wall_ms: elapsed.as_secs_f64() * 1e3 / n_tokens as f64,
        threads,
        phases,
    })
}

/// The profile as a text table (ms per token).
pub fn profile_table(p: &DecodeProfile) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let total_wall: f64 = p.phases.iter().map(|ph| ph.wall_ms).sum();
    let _ = writeln!(
        s,
        "profile: {} decoded tokens ({} sequences per step), {:.3} ms per token; per thread: \
         work (kernels and the serial steps between them) / idle (wall - work: waiting, \
         synchronization)",
        p.tokens, p.sequences, p.wall_ms
    );
    let mut header = format!("{:<10} {:>9} {:>6}", "phase", "wall ms", "share");
    for t in &p.threads {
        let _ = write!(header, " | {:>21}", format!("{t} work/idle"));
    }
    let _ = writeln!(s, "{header}");
    let mut work_total = vec![0.0; p.threads.len()];
    for ph in &p.phases {
        let share = if total_wall > 0.0 {
            100.0 * ph.wall_ms / total_wall
        } else {
            0.0
        };
        let mut line = format!("{:<10} {:>9.3} {:>5.1}%", ph.phase, ph.wall_ms, share);
        for (i, (w, idle)) in ph.work_ms.iter().zip(&ph.idle_ms).enumerate() {
            work_total[i] += w;
            let _ = write!(line, " | {:>10.3} / {:>8.3}", w, idle);
        }
        let _ = writeln!(s, "{line}");
    }
    let mut line = format!("{:<10} {:>9.3} {:>5.1}%", "total", total_wall, 100.0);
    for w in &work_total {
        let _ = write!(line, " | {:>10.3} / {:>8.3}", w, (total_wall - w).max(0.0));
    }
    let _ = writeln!(s, "{line}");
    s
}

/// Aggregate decode tokens/s of `b` sequences stepping together (median over repetitions):
/// each sequence gets its own prompt (a rotation of `tokens`), then every step decodes one
/// token of each in one `Engine::step`.
fn parallel_decode(
    engine: &Engine,
    tokens: &[u32],
    b: usize,
    cfg: &BenchConfig,
) -> Result<f64, EngineError> {
    let b = b.max(1);
    let mut runs = Vec::new();
    for _ in 0..cfg.reps.max(1) {
        let (mut caches, mut next) = prefill_sequences(engine, tokens, b, cfg)?;
        let t = Instant::now();
        for _ in 0..cfg.n_decode {
            next = decode_step(engine, &mut caches, &next)?;
        }
        runs.push((b * cfg.n_decode) as f64 / t.elapsed().as_secs_f64());
    }
    Ok(median_min(&mut runs).0)
}

/// `b` sequences, each prefilled with its own prompt (a rotation of `tokens`): their caches
/// and first greedy tokens.
fn prefill_sequences(
    engine: &Engine,
    tokens: &[u32],
    b: usize,
    cfg: &BenchConfig,
) -> Result<(Vec<crate::kv_cache::KvCache>, Vec<u32>), EngineError> {
    let mut caches: Vec<_> = (0..b.max(1))
        .map(|_| engine.new_cache(cfg.n_prompt + cfg.n_decode + 1))
        .collect();
    let mut next = Vec::with_capacity(caches.len());
    for (i, cache) in caches.iter_mut().enumerate() {
        let mut prompt = tokens.to_vec();
        prompt.rotate_left(i % tokens.len().max(1));
        next.push(argmax(&engine.prefill(cache, &prompt)?));
    }
    Ok((caches, next))
}

/// One greedy token of every sequence: one `Engine::forward` alone, one `Engine::step` for
/// several.
fn decode_step(
    engine: &Engine,
    caches: &mut [crate::kv_cache::KvCache],
    next: &[u32],
) -> Result<Vec<u32>, EngineError> {
    if let ([cache], [token]) = (&mut *caches, next) {
        let logits = engine.forward(cache, &[*token], Logits::Last)?;
        return Ok(vec![argmax(&logits)]);
    }
    let step_tokens: Vec<[u32; 1]> = next.iter().map(|&t| [t]).collect();
    let mut seqs: Vec<crate::engine::SeqStep<'_>> = caches
        .iter_mut()
        .zip(&step_tokens)
        .map(|(cache, t)| crate::engine::SeqStep {
            cache,
            tokens: t.as_slice(),
        })
        .collect();
    let logits = engine.step(&mut seqs)?;
    Ok(logits.iter().map(|l| argmax(l)).collect())
}

fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best as u32
}

fn median_min(v: &mut [f64]) -> (f64, f64) {
    v.sort_by(f64::total_cmp);
    (v[v.len() / 2], v[0])
}
