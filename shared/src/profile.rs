//! Where the time of a forward pass goes: wall time per [`Phase`], measured on the thread that
//! drives the pass, and per thread the time spent in work (kernels and the serial steps
//! between them) during each phase. Wall time × threads minus work is what the threads spent
//! idle, waiting for each other, or in code nobody marked: the cost of synchronization.
//!
//! Off by default; while off, [`work`] costs one relaxed atomic load. `moeshard bench
//! --profile` turns it on for one extra decode pass after the timed ones.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// A part of the forward pass.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Phase {
    /// Attention norm, Q/K/V projections, rope, the KV cache, scores and the output projection.
    Attention = 0,
    /// The router's logits, expert selection, and quantizing the rows the experts take.
    Router = 1,
    /// Routed experts (in process or on nodes), the shared expert, dense FFNs.
    Ffn = 2,
    /// Embedding, residual adds, the FFN norm, the output norm and head.
    Rest = 3,
}

impl Phase {
    /// Every phase, in report order.
    pub const ALL: [Phase; 4] = [Phase::Attention, Phase::Router, Phase::Ffn, Phase::Rest];

    /// Its name in reports.
    pub const fn name(self) -> &'static str {
        match self {
            Phase::Attention => "attention",
            Phase::Router => "router",
            Phase::Ffn => "ffn",
            Phase::Rest => "rest",
        }
    }
}

static ENABLED: AtomicBool = AtomicBool::new(false);
static CURRENT: AtomicU8 = AtomicU8::new(Phase::Rest as u8);
static WALL_NS: [AtomicU64; 4] = [const { AtomicU64::new(0) }; 4];
static OPEN: Mutex<Option<(Phase, Instant)>> = Mutex::new(None);
static THREADS: Mutex<Vec<Arc<ThreadWork>>> = Mutex::new(Vec::new());

/// One thread's work time per phase.
struct ThreadWork {
    name: String,
    ns: [AtomicU64; 4],
}

thread_local! {
    static MINE: Arc<ThreadWork> = register();
    /// Inside a [`work`] span already: nested spans are not counted twice.
    static IN_WORK: Cell<bool> = const { Cell::new(false) };
}

fn register() -> Arc<ThreadWork> {
    let mut threads = THREADS.lock().unwrap_or_else(|e| e.into_inner());
    let current = std::thread::current();
    let name = current
        .name()
        .map_or_else(|| format!("thread-{}", threads.len()), str::to_owned);
    let w = Arc::new(ThreadWork {
        name,
        ns: [const { AtomicU64::new(0) }; 4],
    });
    threads.push(Arc::clone(&w));
    w
}

/// Whether profiling is on.
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// Turns profiling on (with counters cleared) or off.
pub fn set_enabled(on: bool) {
    if on {
        reset();
    } else {
        leave();
    }
    ENABLED.store(on, Ordering::Relaxed);
}

/// Clears every counter.
pub fn reset() {
    for w in &WALL_NS {
        w.store(0, Ordering::Relaxed);
    }
    for t in THREADS.lock().unwrap_or_else(|e| e.into_inner()).iter() {
        for n in &t.ns {
            n.store(0, Ordering::Relaxed);
        }
    }
    *OPEN.lock().unwrap_or_else(|e| e.into_inner()) = None;
}

/// The driving thread enters `phase` (closing the phase it was in).
pub fn enter(phase: Phase) {
    if !enabled() {
        return;
    }
    let now = Instant::now();
    let mut open = OPEN.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((p, since)) = open.take() {
        WALL_NS[p as usize].fetch_add(
            now.duration_since(since).as_nanos() as u64,
            Ordering::Relaxed,
        );
    }
    *open = Some((phase, now));
    CURRENT.store(phase as u8, Ordering::Relaxed);
}

/// The driving thread leaves the phase it is in (the end of a pass).
pub fn leave() {
    if !enabled() {
        return;
    }
    let mut open = OPEN.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((p, since)) = open.take() {
        WALL_NS[p as usize].fetch_add(since.elapsed().as_nanos() as u64, Ordering::Relaxed);
    }
}

/// Runs `f`, counting its time as this thread's work in the current phase (once: a span
/// inside another one is part of it).
#[inline]
pub fn work<R>(f: impl FnOnce() -> R) -> R {
    if !enabled() || IN_WORK.with(Cell::get) {
        return f();
    }
    IN_WORK.with(|c| c.set(true));
    let phase = CURRENT.load(Ordering::Relaxed) as usize;
    let start = Instant::now();
    let r = f();
    let ns = start.elapsed().as_nanos() as u64;
    IN_WORK.with(|c| c.set(false));
    MINE.with(|w| w.ns[phase.min(3)].fetch_add(ns, Ordering::Relaxed));
    r
}

/// The counters: wall nanoseconds per phase, and each thread that did work with its
/// nanoseconds of work per phase (in [`Phase::ALL`] order).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Report {
    pub wall_ns: [u64; 4],
    pub threads: Vec<(String, [u64; 4])>,
}

/// What the counters hold now.
pub fn report() -> Report {
    let wall_ns = std::array::from_fn(|i| WALL_NS[i].load(Ordering::Relaxed));
    let threads = THREADS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .map(|t| {
            let ns = std::array::from_fn(|i| t.ns[i].load(Ordering::Relaxed));
            (t.name.clone(), ns)
        })
        .filter(|(_, ns): &(String, [u64; 4])| ns.iter().any(|&n| n > 0))
        .collect();
    Report { wall_ns, threads }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One test owns the global counters (tests run in parallel threads).
    #[test]
    fn phases_and_work_are_counted_once() {
        set_enabled(true);
        enter(Phase::Attention);
        work(|| {
            // A nested span is part of the outer one.
            work(|| std::thread::sleep(std::time::Duration::from_millis(20)));
        });
        enter(Phase::Ffn);
        std::thread::sleep(std::time::Duration::from_millis(3));
        leave();
        set_enabled(false);
        // Off: nothing counted.
        work(|| std::thread::sleep(std::time::Duration::from_millis(2)));
        let r = report();
        assert!(r.wall_ns[Phase::Attention as usize] >= 20_000_000);
        assert!(r.wall_ns[Phase::Ffn as usize] >= 3_000_000);
        assert_eq!(r.wall_ns[Phase::Router as usize], 0);
        let me = std::thread::current();
        let (_, ns) = r
            .threads
            .iter()
            .find(|(n, _)| Some(n.as_str()) == me.name())
            .expect("this thread's counters");
        let attn = ns[Phase::Attention as usize];
        // Counted twice it would be 40 ms or more.
        assert!((20_000_000..40_000_000).contains(&attn), "{attn} ns");
        assert_eq!(ns[Phase::Ffn as usize], 0);
    }
}
