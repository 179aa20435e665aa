//! The machine's read bandwidth, measured the way weights are streamed: every
//! thread sums its own part of a buffer much larger than the last-level cache.
//! Benchmarks report kernel GB/s against this number, measured in the same run.

use std::time::Instant;

use rayon::prelude::*;

/// Bytes per second read by the current rayon pool over a `bytes`-sized buffer,
/// best of `reps` passes of each read pattern (plain loads, and loads with software
/// prefetch ahead as the kernels do); the first pass, which faults pages in, is not timed.
/// The best pattern is the honest ceiling for the kernels: a bound measured with a weaker
/// loop would flatter them.
pub fn read_bandwidth(bytes: usize, reps: usize) -> f64 {
    let n = (bytes / 8).max(1024);
    let buf: Vec<u64> = (0..n as u64).collect();
    let mut best = f64::INFINITY;
    let mut sink = stream_sum(&buf);
    for _ in 0..reps.max(1) {
        for prefetch in [false, true] {
            let t = Instant::now();
            sink = sink.wrapping_add(stream_sum_with(&buf, prefetch));
            best = best.min(t.elapsed().as_secs_f64());
        }
    }
    std::hint::black_box(sink);
    (n * 8) as f64 / best
}

/// The wrapping sum of `buf`, one contiguous part per thread of the current
/// rayon pool: the read pattern of a weight stream, with the adds off the
/// critical path.
pub fn stream_sum(buf: &[u64]) -> u64 {
    stream_sum_with(buf, false)
}

/// [`stream_sum`] with software prefetch [`PREFETCH_AHEAD`] bytes ahead, as the weight
/// kernels read.
pub fn stream_sum_prefetched(buf: &[u64]) -> u64 {
    stream_sum_with(buf, true)
}

/// [`stream_sum`], optionally prefetching [`PREFETCH_AHEAD`] bytes ahead.
fn stream_sum_with(buf: &[u64], prefetch: bool) -> u64 {
    let chunk = buf.len().div_ceil(rayon::current_num_threads()).max(1);
    buf.par_chunks(chunk)
        .map(|c| part_sum(c, prefetch))
        .reduce(|| 0, u64::wrapping_add)
}

/// How far ahead the prefetching pattern reads (as the weight kernels do).
const PREFETCH_AHEAD: usize = 8192;

fn part_sum(c: &[u64], prefetch: bool) -> u64 {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2, checked just above.
        return unsafe { part_sum_avx2(c, prefetch) };
    }
    let _ = prefetch;
    part_sum_plain(c)
}

#[inline(always)]
fn part_sum_plain(c: &[u64]) -> u64 {
    // Sixteen independent accumulators keep the loads, not the adds, the limit.
    let mut acc = [0u64; 16];
    let mut it = c.chunks_exact(16);
    for q in &mut it {
        for (a, &v) in acc.iter_mut().zip(q) {
            *a = a.wrapping_add(v);
        }
    }
    let rest = it.remainder().iter().fold(0u64, |s, &v| s.wrapping_add(v));
    acc.iter().fold(rest, |s, &a| s.wrapping_add(a))
}

/// [`part_sum_plain`] compiled for AVX2 (256-bit loads), with prefetches one cache line
/// in two 128-byte steps ahead when `prefetch`.
///
/// # Safety
/// The CPU must support AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn part_sum_avx2(c: &[u64], prefetch: bool) -> u64 {
    use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
    if !prefetch {
        return part_sum_plain(c);
    }
    let mut acc = [0u64; 16];
    let mut it = c.chunks_exact(16);
    for q in &mut it {
        let ahead = q.as_ptr().cast::<i8>().wrapping_add(PREFETCH_AHEAD);
        // A prefetch has no architectural effect and never faults, whatever the address.
        _mm_prefetch::<_MM_HINT_T0>(ahead);
        _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(64));
        for (a, &v) in acc.iter_mut().zip(q) {
            *a = a.wrapping_add(v);
        }
    }
    let rest = it.remainder().iter().fold(0u64, |s, &v| s.wrapping_add(v));
    acc.iter().fold(rest, |s, &a| s.wrapping_add(a))
}

/// Peak resident memory of this process (`VmHWM`), if the OS tells.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}
