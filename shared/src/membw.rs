//! The machine's read bandwidth, measured the way weights are streamed: every
//! thread sums its own part of a buffer much larger than the last-level cache.
//! Benchmarks report kernel GB/s against this number, measured in the same run.

use std::time::Instant;

use rayon::prelude::*;

/// Bytes per second read by the current rayon pool over a `bytes`-sized buffer,
/// best of `reps` passes (the first pass, which faults pages in, is not timed).
pub fn read_bandwidth(bytes: usize, reps: usize) -> f64 {
    let n = (bytes / 8).max(1024);
    let buf: Vec<u64> = (0..n as u64).collect();
    let mut best = f64::INFINITY;
    let mut sink = stream_sum(&buf);
    for _ in 0..reps.max(1) {
        let t = Instant::now();
        sink = sink.wrapping_add(stream_sum(&buf));
        best = best.min(t.elapsed().as_secs_f64());
    }
    std::hint::black_box(sink);
    (n * 8) as f64 / best
}

/// The wrapping sum of `buf`, one contiguous part per thread of the current
/// rayon pool: the read pattern of a weight stream, with the adds off the
/// critical path.
pub fn stream_sum(buf: &[u64]) -> u64 {
    let chunk = buf.len().div_ceil(rayon::current_num_threads()).max(1);
    buf.par_chunks(chunk)
        .map(|c| {
            // Eight independent accumulators keep the loads, not the adds, the limit.
            let mut acc = [0u64; 8];
            let mut it = c.chunks_exact(8);
            for q in &mut it {
                for (a, &v) in acc.iter_mut().zip(q) {
                    *a = a.wrapping_add(v);
                }
            }
            let rest = it.remainder().iter().fold(0u64, |s, &v| s.wrapping_add(v));
            acc.iter().fold(rest, |s, &a| s.wrapping_add(a))
        })
        .reduce(|| 0, u64::wrapping_add)
}

/// Peak resident memory of this process (`VmHWM`), if the OS tells.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}
