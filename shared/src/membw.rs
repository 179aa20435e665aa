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
    let mut sink = sum_all(&buf);
    for _ in 0..reps.max(1) {
        let t = Instant::now();
        sink = sink.wrapping_add(sum_all(&buf));
        best = best.min(t.elapsed().as_secs_f64());
    }
    std::hint::black_box(sink);
    (n * 8) as f64 / best
}

fn sum_all(buf: &[u64]) -> u64 {
    let chunk = (buf.len() / (rayon::current_num_threads() * 4)).max(4096);
    buf.par_chunks(chunk)
        .map(|c| {
            // Four independent accumulators keep the loads, not the adds, the bottleneck.
            let mut acc = [0u64; 4];
            let mut it = c.chunks_exact(4);
            for q in &mut it {
                acc[0] = acc[0].wrapping_add(q[0]);
                acc[1] = acc[1].wrapping_add(q[1]);
                acc[2] = acc[2].wrapping_add(q[2]);
                acc[3] = acc[3].wrapping_add(q[3]);
            }
            let rest: u64 = it.remainder().iter().fold(0, |a, &b| a.wrapping_add(b));
            acc.iter().fold(rest, |a, &b| a.wrapping_add(b))
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
