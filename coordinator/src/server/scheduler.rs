//! Continuous batching on one OS thread that owns the engine (its calls block, so they
//! never run on a tokio worker).
//!
//! Requests arrive on a channel. Before each step the scheduler frees the slots of requests
//! whose client went away (their event receiver is dropped), admits waiting requests into
//! free slots (`--parallel`, each with its own KV cache), then gives every decoding
//! sequence one token and every prefilling sequence the next chunk of its prompt (at most
//! `--prefill-chunk` tokens, so one long prompt does not stall the others) and calls
//! [`Engine::step`] once for all of them. Sequences that have evaluated their whole prompt
//! sample a token with their own sampler; the text, with stop strings held back, goes to
//! the request's channel. A sequence's tokens do not depend on what else is in the step:
//! `Engine::step` guarantees it.

use std::collections::VecDeque;
use std::ops::Range;
use std::sync::mpsc::{Receiver, TryRecvError};
use std::time::Instant;

use tokio::sync::mpsc::UnboundedSender;
use tracing::{debug, warn};

use super::metrics::{Metrics, Outcome};
use super::stop::StopMatcher;
use crate::engine::{Engine, SeqStep};
use crate::kv_cache::KvCache;
use crate::sampler::{Sampler, SamplerConfig};
use crate::tokenizer::{StreamDecoder, Tokenizer};

/// A generation request, checked: `prompt` is non-empty and `prompt + max_tokens` fits the
/// context.
pub(crate) struct GenRequest {
    pub(crate) prompt: Vec<u32>,
    pub(crate) max_tokens: usize,
    pub(crate) sampling: SamplerConfig,
    pub(crate) stop: Vec<String>,
    /// Where the text goes; dropping the receiver cancels the request.
    pub(crate) events: UnboundedSender<Event>,
}

/// What the scheduler tells a request.
#[derive(Debug, PartialEq)]
pub(crate) enum Event {
    /// More text (never empty).
    Text(String),
    /// The end: no more events follow.
    Done(Finish),
    /// The step failed (a node down, ...): no more events follow.
    Error(String),
}

/// How a generation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Finish {
    pub(crate) reason: FinishReason,
    pub(crate) prompt_tokens: usize,
    /// Tokens sampled, an end-of-generation token included.
    pub(crate) completion_tokens: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum FinishReason {
    /// An end-of-generation token or a stop string.
    Stop,
    /// `max_tokens` or the end of the context.
    Length,
}

impl FinishReason {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

/// What one sequence evaluates in a step.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Work {
    /// These prompt positions.
    Prefill(Range<usize>),
    /// The token sampled last step.
    Decode,
}

/// Where a running sequence stands, as the step planner sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct SeqState {
    pub(crate) n_prompt: usize,
    /// Prompt tokens already in the cache.
    pub(crate) n_prefilled: usize,
}

/// The next step: `(slot, work)` for every slot holding a sequence. Pure, for tests.
pub(crate) fn plan_step(slots: &[Option<SeqState>], prefill_chunk: usize) -> Vec<(usize, Work)> {
    slots
        .iter()
        .enumerate()
        .filter_map(|(i, s)| {
            let s = s.as_ref()?;
            let work = if s.n_prefilled < s.n_prompt {
                let end = s.n_prompt.min(s.n_prefilled + prefill_chunk);
                Work::Prefill(s.n_prefilled..end)
            } else {
                Work::Decode
            };
            Some((i, work))
        })
        .collect()
}

struct Sequence {
    req: GenRequest,
    n_prefilled: usize,
    /// Sampled and not yet evaluated.
    next_token: Option<u32>,
    /// Prompt and generated tokens (the sampler's repetition penalty looks at them).
    history: Vec<u32>,
    n_generated: usize,
    sampler: Sampler,
    decoder: StreamDecoder,
    stop: StopMatcher,
}

impl Sequence {
    fn state(&self) -> SeqState {
        SeqState {
            n_prompt: self.req.prompt.len(),
            n_prefilled: self.n_prefilled,
        }
    }

    fn finish(&self, reason: FinishReason) -> Event {
        Event::Done(Finish {
            reason,
            prompt_tokens: self.req.prompt.len(),
            completion_tokens: self.n_generated,
        })
    }
}

struct Slot {
    cache: KvCache,
    seq: Option<Sequence>,
}

/// The batching loop over an engine.
pub(crate) struct Scheduler<'a> {
    engine: &'a Engine,
    tokenizer: &'a Tokenizer,
    metrics: &'a Metrics,
    slots: Vec<Slot>,
    queue: VecDeque<GenRequest>,
    prefill_chunk: usize,
}

impl<'a> Scheduler<'a> {
    /// `n_slots` sequences of `n_ctx` positions at once.
    pub(crate) fn new(
        engine: &'a Engine,
        tokenizer: &'a Tokenizer,
        metrics: &'a Metrics,
        n_slots: usize,
        n_ctx: usize,
        prefill_chunk: usize,
    ) -> Scheduler<'a> {
        Scheduler {
            engine,
            tokenizer,
            metrics,
            slots: (0..n_slots)
                .map(|_| Slot {
                    cache: engine.new_cache(n_ctx),
                    seq: None,
                })
                .collect(),
            queue: VecDeque::new(),
            prefill_chunk: prefill_chunk.max(1),
        }
    }

    /// Serves requests until every sender of `requests` is gone and the last sequence ended.
    pub(crate) fn run(mut self, requests: Receiver<GenRequest>) {
        let mut open = true;
        loop {
            if self.is_idle() {
                if !open {
                    return;
                }
                match requests.recv() {
                    Ok(r) => self.queue.push_back(r),
                    Err(_) => return,
                }
            }
            while open {
                match requests.try_recv() {
                    Ok(r) => self.queue.push_back(r),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => open = false,
                }
            }
            self.drop_cancelled();
            self.admit();
            self.publish_load();
            self.step();
            self.publish_load();
        }
    }

    fn is_idle(&self) -> bool {
        self.queue.is_empty() && self.slots.iter().all(|s| s.seq.is_none())
    }

    fn n_running(&self) -> usize {
        self.slots.iter().filter(|s| s.seq.is_some()).count()
    }

    fn publish_load(&self) {
        self.metrics.set_load(self.queue.len(), self.n_running());
    }

    /// Frees the slots (and queue places) of requests whose client went away.
    fn drop_cancelled(&mut self) {
        for slot in &mut self.slots {
            if slot.seq.as_ref().is_some_and(|s| s.req.events.is_closed()) {
                debug!("request cancelled: slot freed");
                slot.seq = None;
                self.metrics.count_request(Outcome::Cancelled);
            }
        }
        let before = self.queue.len();
        self.queue.retain(|r| !r.events.is_closed());
        for _ in self.queue.len()..before {
            self.metrics.count_request(Outcome::Cancelled);
        }
    }

    /// Moves waiting requests into free slots, oldest first.
    fn admit(&mut self) {
        for slot in self.slots.iter_mut().filter(|s| s.seq.is_none()) {
            let Some(req) = self.queue.pop_front() else {
                break;
            };
            slot.cache.clear();
            slot.seq = Some(Sequence {
                n_prefilled: 0,
                next_token: None,
                history: req.prompt.clone(),
                n_generated: 0,
                sampler: Sampler::new(req.sampling.clone()),
                decoder: StreamDecoder::new(false),
                stop: StopMatcher::new(&req.stop),
                req,
            });
        }
    }

    /// One engine step over every running sequence, then sampling and events.
    fn step(&mut self) {
        let states: Vec<Option<SeqState>> = self
            .slots
            .iter()
            .map(|s| s.seq.as_ref().map(Sequence::state))
            .collect();
        let plan = plan_step(&states, self.prefill_chunk);
        if plan.is_empty() {
            return;
        }
        let started = Instant::now();
        let result = {
            let mut planned = plan.iter().peekable();
            let mut steps = Vec::with_capacity(plan.len());
            for (i, slot) in self.slots.iter_mut().enumerate() {
                let Some((_, work)) = planned.next_if(|(j, _)| *j == i) else {
                    continue;
                };
                let Some(seq) = slot.seq.as_ref() else {
                    continue;
                };
                let tokens: &[u32] = match (work, &seq.next_token) {
                    (Work::Prefill(range), _) => &seq.req.prompt[range.clone()],
                    (Work::Decode, Some(tok)) => std::slice::from_ref(tok),
                    (Work::Decode, None) => &[],
                };
                steps.push(SeqStep {
                    cache: &mut slot.cache,
                    tokens,
                });
            }
            self.engine.step(&mut steps)
        };
        let took = started.elapsed();
        let logits = match result {
            Ok(l) if l.len() == plan.len() => l,
            Ok(l) => {
                self.fail(
                    &plan,
                    &format!(
                        "internal error: the engine returned {} results for {} sequences",
                        l.len(),
                        plan.len()
                    ),
                );
                return;
            }
            Err(e) => {
                warn!(error = %e, sequences = plan.len(), "step failed");
                self.fail(&plan, &e.to_string());
                return;
            }
        };
        // Counted before any answer goes out, so a client that reads /metrics after its
        // answer sees its tokens.
        let mut n_prompt_tokens = 0;
        let mut to_sample = Vec::with_capacity(plan.len());
        let n_sequences = plan.len() as u64;
        for ((i, work), logits) in plan.into_iter().zip(logits) {
            let Some(seq) = self.slots[i].seq.as_mut() else {
                continue;
            };
            match work {
                Work::Prefill(range) => {
                    n_prompt_tokens += range.len() as u64;
                    seq.n_prefilled = range.end;
                    if seq.n_prefilled < seq.req.prompt.len() {
                        continue;
                    }
                }
                Work::Decode => seq.next_token = None,
            }
            to_sample.push((i, logits));
        }
        self.metrics.record_step(
            Instant::now(),
            took,
            n_sequences,
            n_prompt_tokens,
            to_sample.len() as u64,
        );
        for (i, logits) in to_sample {
            self.sample(i, &logits);
        }
    }

    /// Samples slot `i`'s next token from `logits` and sends what it adds.
    fn sample(&mut self, i: usize, logits: &[f32]) {
        let tokenizer = self.tokenizer;
        let slot = &mut self.slots[i];
        let Some(seq) = slot.seq.as_mut() else {
            return;
        };
        let tok = seq.sampler.sample(logits, &seq.history);
        seq.history.push(tok);
        seq.n_generated += 1;
        let mut events = Vec::with_capacity(2);
        let end = if tokenizer.is_eog(tok) {
            flush(seq, &mut events);
            Some(FinishReason::Stop)
        } else {
            let piece = seq.decoder.push(tokenizer, tok);
            let (text, hit) = seq.stop.push(&piece);
            if !text.is_empty() {
                events.push(Event::Text(text));
            }
            if hit {
                Some(FinishReason::Stop)
            } else if seq.n_generated >= seq.req.max_tokens
                || slot.cache.n_past() >= slot.cache.n_ctx()
            {
                Some(if flush(seq, &mut events) {
                    FinishReason::Stop
                } else {
                    FinishReason::Length
                })
            } else {
                seq.next_token = Some(tok);
                None
            }
        };
        let Some(reason) = end else {
            if !events.into_iter().all(|e| seq.req.events.send(e).is_ok()) {
                slot.seq = None;
                self.metrics.count_request(Outcome::Cancelled);
            }
            return;
        };
        // Finished: the slot is free and counted before the last events go out.
        let Some(seq) = slot.seq.take() else {
            return;
        };
        events.push(seq.finish(reason));
        self.metrics.count_request(match reason {
            FinishReason::Stop => Outcome::Stop,
            FinishReason::Length => Outcome::Length,
        });
        self.publish_load();
        for e in events {
            if seq.req.events.send(e).is_err() {
                break;
            }
        }
    }

    /// Ends every sequence of a failed step with `message`.
    fn fail(&mut self, plan: &[(usize, Work)], message: &str) {
        let failed: Vec<Sequence> = plan
            .iter()
            .filter_map(|(i, _)| self.slots[*i].seq.take())
            .collect();
        for _ in &failed {
            self.metrics.count_request(Outcome::Error);
        }
        self.publish_load();
        for seq in failed {
            let _ = seq.req.events.send(Event::Error(message.to_owned()));
        }
    }
}

/// Releases the text held back at the end of a sequence; true when a stop string turns up
/// in it (the decoder's last bytes completed one).
fn flush(seq: &mut Sequence, events: &mut Vec<Event>) -> bool {
    let tail = seq.decoder.finish();
    let (mut text, hit) = seq.stop.push(&tail);
    if !hit {
        text.push_str(&seq.stop.finish());
    }
    if !text.is_empty() {
        events.push(Event::Text(text));
    }
    hit
}
