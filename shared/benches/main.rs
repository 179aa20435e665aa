//! Criterion benchmarks of the hot-path kernels against the machine's read bandwidth.
//!
//! Groups: `kernel_rate/<type>` (a cache-resident matrix on one thread times 1, 4 and 8
//! tokens, and 8 tokens routed to one expert: whether a kernel or the memory is the limit),
//! `read_bandwidth` (a streaming sum over 1 GiB, one thread and all threads), then per
//! weight type `matvec/<type>` and `matmul8/<type>`: a 4096-column matrix of at least 256 MiB
//! (far beyond the last-level cache) times one and eight activation rows, on a one-thread
//! and an all-threads rayon pool. Every benchmark reports `Throughput::Bytes` of weights (or
//! of the buffer), so results read as GB/s of weights streamed. A summary table follows, made
//! from the same timings criterion took: GB/s per type and thread count and the ratio to the
//! read bandwidth.
//!
//! Environment: `MOESHARD_BENCH_TYPES=Q4_K,Q8_0` restricts the types (`Q4_K_R8`, the layout
//! of `moeshard convert --repack`, is measured only when named there); `MOESHARD_KERNELS`
//! lowers the SIMD level (see `shared::quant::dispatch`). The whole run takes a few minutes on
//! two cores.

use std::collections::BTreeMap;
use std::hint::black_box;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput};
use rayon::ThreadPool;

use shared::quant::dispatch::Kernels;
use shared::quant::matmul::{matmul, matmul_vec_dot, Activations, WeightMatrix};
use shared::quant::{reference, GgmlType};

/// Columns of every benchmark matrix (n_embd of a mid-size model; whole blocks of every type).
const N_COLS: usize = 4096;
/// Weight bytes of every benchmark matrix: well past any last-level cache.
const MATRIX_BYTES: usize = 256 << 20;
/// The bandwidth buffer.
const BANDWIDTH_BYTES: usize = 1 << 30;
/// Weight bytes of the cache-resident kernel-rate matrices (fits L2).
const RESIDENT_BYTES: usize = 384 << 10;
/// Tokens of the batched benchmark.
const BATCH: usize = 8;

/// Timings criterion took, per benchmark id: (bytes per iteration, seconds per iteration).
static SAMPLES: Mutex<BTreeMap<String, (u64, Vec<f64>)>> = Mutex::new(BTreeMap::new());

/// Runs `f` `iters` times, returns the total time and records the per-iteration time.
fn timed(id: &str, bytes: u64, iters: u64, mut f: impl FnMut()) -> Duration {
    let start = Instant::now();
    for _ in 0..iters {
        f();
    }
    let elapsed = start.elapsed();
    let mut samples = SAMPLES.lock().unwrap_or_else(|e| e.into_inner());
    let entry = samples.entry(id.to_owned()).or_insert((bytes, Vec::new()));
    entry.1.push(elapsed.as_secs_f64() / iters as f64);
    elapsed
}

/// GB/s of the fastest sample of a recorded benchmark (the least disturbed by other
/// processes).
fn best_gbps(id: &str) -> Option<f64> {
    let samples = SAMPLES.lock().unwrap_or_else(|e| e.into_inner());
    let (bytes, times) = samples.get(id)?;
    let fastest = times.iter().copied().reduce(f64::min)?;
    Some(*bytes as f64 / fastest / 1e9)
}

/// Median GB/s of a recorded benchmark.
fn gbps(id: &str) -> Option<f64> {
    let samples = SAMPLES.lock().unwrap_or_else(|e| e.into_inner());
    let (bytes, times) = samples.get(id)?;
    let mut times = times.clone();
    times.sort_by(f64::total_cmp);
    let median = *times.get(times.len() / 2)?;
    Some(*bytes as f64 / median / 1e9)
}

fn pools() -> [(String, ThreadPool); 2] {
    let all = std::thread::available_parallelism().map_or(1, |n| n.get());
    let pool = |n: usize| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build()
            .unwrap_or_else(|e| panic!("building a {n}-thread pool: {e}"))
    };
    [("1t".to_owned(), pool(1)), (format!("{all}t"), pool(all))]
}

fn config() -> Criterion {
    Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(2))
        .without_plots()
        .configure_from_args()
}

mod bandwidth {
    use super::*;

    use shared::membw::stream_sum;

    pub(super) fn bench(c: &mut Criterion, pools: &[(String, ThreadPool)]) {
        let buf: Vec<u64> = (0..(BANDWIDTH_BYTES / 8) as u64).collect();
        let bytes = (buf.len() * 8) as u64;
        let mut group = c.benchmark_group("read_bandwidth");
        group.throughput(Throughput::Bytes(bytes));
        for (name, pool) in pools {
            let id = format!("read_bandwidth/{name}");
            group.bench_function(name.as_str(), |b| {
                b.iter_custom(|iters| {
                    pool.install(|| {
                        timed(&id, bytes, iters, || {
                            black_box(stream_sum(black_box(&buf)));
                        })
                    })
                })
            });
        }
        group.finish();
    }
}

mod kernels {
    use super::*;

    /// SplitMix64, to fill the matrices quickly and reproducibly.
    struct Rng(shared::rng::SplitMix64);

    impl Rng {
        fn next_u64(&mut self) -> u64 {
            self.0.next_u64()
        }

        fn signed(&mut self) -> f32 {
            (self.next_u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        }
    }

    /// One row of `ty`: random quant bytes with small finite scales, or random floats.
    fn random_row(rng: &mut Rng, ty: GgmlType) -> Vec<u8> {
        // Q4_K_R8 rows are Q4_K rows, interleaved by eight once the matrix is made.
        let ty = if ty == GgmlType::Q4_K_R8 {
            GgmlType::Q4_K
        } else {
            ty
        };
        let bytes = ty.row_bytes(N_COLS).unwrap_or(0);
        if ty.block_elems() == 1 {
            let values: Vec<f32> = (0..N_COLS).map(|_| rng.signed()).collect();
            let mut out = vec![0u8; bytes];
            reference::quantize_row(ty, &values, &mut out);
            return out;
        }
        let mut out: Vec<u8> = (0..bytes).map(|_| rng.next_u64() as u8).collect();
        // Every f16 field gets a small finite value, wherever the type keeps its scales.
        let scale_at: &[usize] = match ty {
            GgmlType::Q2_K => &[80, 82],
            GgmlType::Q3_K => &[108],
            GgmlType::Q6_K => &[208],
            GgmlType::Q4_1 | GgmlType::Q5_1 | GgmlType::Q4_K | GgmlType::Q5_K => &[0, 2],
            _ => &[0],
        };
        for block in out.chunks_exact_mut(ty.block_bytes()) {
            for &at in scale_at {
                block[at..at + 2].copy_from_slice(&half::f16::from_f32(0.01).to_le_bytes());
            }
        }
        out
    }

    /// A Q4_K_R8 matrix's rows (made as plain Q4_K) interleaved by eight.
    fn interleave_if_r8(ty: GgmlType, data: &mut [u8], row_bytes: usize) {
        if ty == GgmlType::Q4_K_R8 {
            shared::quant::rows8::interleave_matrix(data, row_bytes);
        }
    }

    /// A matrix of at least [`MATRIX_BYTES`]: distinct random rows repeated (the caches see
    /// 256 MiB of addresses either way; generating it all would dominate the run).
    fn matrix(ty: GgmlType) -> (usize, Vec<u8>) {
        let row_bytes = ty.row_bytes(N_COLS).unwrap_or(1);
        let n_rows = MATRIX_BYTES.div_ceil(row_bytes).next_multiple_of(8);
        let mut rng = Rng(shared::rng::SplitMix64::new(ty.id().into()));
        let distinct: Vec<Vec<u8>> = (0..64).map(|_| random_row(&mut rng, ty)).collect();
        let mut data = Vec::with_capacity(n_rows * row_bytes);
        for r in 0..n_rows {
            data.extend_from_slice(&distinct[r % distinct.len()]);
        }
        interleave_if_r8(ty, &mut data, row_bytes);
        (n_rows, data)
    }

    /// Kernel rate on cache-resident weights (the performance model's `kernel_rate`): a
    /// matrix of [`RESIDENT_BYTES`] on one thread, times 1, 4 and 8 tokens (a `MUL_MAT`), and
    /// 8 tokens routed to one expert (a `MUL_MAT_ID`, whose float order may differ).
    pub(super) fn bench_resident(
        c: &mut Criterion,
        pools: &[(String, ThreadPool)],
        types: &[GgmlType],
    ) {
        let kernels = Kernels::get();
        let (_, pool) = &pools[0];
        for &ty in types {
            let row_bytes = ty.row_bytes(N_COLS).unwrap_or(1);
            // A multiple of 8 rows, as real models' matrices: ggml repacks Q4_K only then.
            let n_rows = RESIDENT_BYTES.div_ceil(row_bytes).next_multiple_of(8);
            let mut rng = Rng(shared::rng::SplitMix64::new(ty.id().into()));
            let mut data: Vec<u8> = (0..n_rows).flat_map(|_| random_row(&mut rng, ty)).collect();
            interleave_if_r8(ty, &mut data, row_bytes);
            let w = match WeightMatrix::new(ty, n_rows, N_COLS, &data) {
                Ok(w) => w,
                Err(e) => panic!("benchmark matrix {ty}: {e}"),
            };
            let bytes = data.len() as u64;
            let mut group = c.benchmark_group(format!("kernel_rate/{ty}"));
            group.throughput(Throughput::Bytes(bytes));
            group.measurement_time(Duration::from_millis(700));
            for n_tokens in [1, 4, BATCH] {
                let x: Vec<f32> = (0..N_COLS * n_tokens).map(|_| rng.signed()).collect();
                let act = Activations::quantize(kernels, ty, &x, N_COLS);
                let mut out = vec![0.0f32; n_rows * n_tokens];
                let id = format!("kernel_rate/{ty}/{n_tokens}");
                group.bench_function(format!("{n_tokens}tok"), |b| {
                    b.iter_custom(|iters| {
                        pool.install(|| {
                            timed(&id, bytes, iters, || {
                                matmul(kernels, &w, black_box(&act), &mut out);
                            })
                        })
                    })
                });
                if n_tokens == BATCH {
                    // The same tokens routed to one expert (MUL_MAT_ID's float order).
                    let id = format!("kernel_rate/{ty}/{n_tokens}e");
                    group.bench_function(format!("{n_tokens}tok_expert"), |b| {
                        b.iter_custom(|iters| {
                            pool.install(|| {
                                timed(&id, bytes, iters, || {
                                    matmul_vec_dot(kernels, &w, black_box(&act), &mut out);
                                })
                            })
                        })
                    });
                }
            }
            if ty == GgmlType::Q4_K_R8 {
                // What a GEMM-order batch pays first: the rows back to plain Q4_K (vector
                // transposes, and the scalar definition for comparison).
                let mut plain = vec![0u8; data.len()];
                let rows8 = 8 * row_bytes;
                for (name, simd) in [("deinterleave", true), ("deinterleave_scalar", false)] {
                    let id = format!("kernel_rate/{ty}/{name}");
                    group_bench(&mut group, name, &id, bytes, || {
                        for (g, p) in data.chunks_exact(rows8).zip(plain.chunks_exact_mut(rows8)) {
                            if simd {
                                kernels.q4_k_r8_deinterleave(g, p);
                            } else {
                                shared::quant::rows8::deinterleave(g, p);
                            }
                        }
                    });
                }
            }
            group.finish();
        }
    }

    /// One timed benchmark of `f` on the calling thread.
    fn group_bench(
        group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
        name: &str,
        id: &str,
        bytes: u64,
        mut f: impl FnMut(),
    ) {
        group.bench_function(name, |b| {
            b.iter_custom(|iters| timed(id, bytes, iters, &mut f))
        });
    }

    pub(super) fn bench(c: &mut Criterion, pools: &[(String, ThreadPool)], types: &[GgmlType]) {
        let kernels = Kernels::get();
        for &ty in types {
            let (n_rows, data) = matrix(ty);
            let w = match WeightMatrix::new(ty, n_rows, N_COLS, &data) {
                Ok(w) => w,
                Err(e) => panic!("benchmark matrix {ty}: {e}"),
            };
            let bytes = data.len() as u64;
            let mut rng = Rng(shared::rng::SplitMix64::new(1));
            for (label, n_tokens) in [("matvec", 1), ("matmul8", BATCH)] {
                let x: Vec<f32> = (0..N_COLS * n_tokens).map(|_| rng.signed()).collect();
                let act = Activations::quantize(kernels, ty, &x, N_COLS);
                let mut out = vec![0.0f32; n_rows * n_tokens];
                let mut group = c.benchmark_group(format!("{label}/{ty}"));
                group.throughput(Throughput::Bytes(bytes));
                for (name, pool) in pools {
                    let id = format!("{label}/{ty}/{name}");
                    group.bench_function(name.as_str(), |b| {
                        b.iter_custom(|iters| {
                            pool.install(|| {
                                timed(&id, bytes, iters, || {
                                    matmul(kernels, &w, black_box(&act), &mut out);
                                })
                            })
                        })
                    });
                }
                group.finish();
                black_box(&out);
            }
        }
    }
}

fn bench_types() -> Vec<GgmlType> {
    let Ok(list) = std::env::var("MOESHARD_BENCH_TYPES") else {
        return GgmlType::WEIGHT_TYPES.to_vec();
    };
    list.split(',')
        .filter(|s| !s.trim().is_empty())
        .map(|s| match GgmlType::from_name(s.trim()) {
            Some(ty) if GgmlType::WEIGHT_TYPES.contains(&ty) || ty == GgmlType::Q4_K_R8 => ty,
            _ => panic!("MOESHARD_BENCH_TYPES: {s:?} is not a weight type"),
        })
        .collect()
}

fn summary(pools: &[(String, ThreadPool)], types: &[GgmlType]) {
    let names: Vec<&str> = pools.iter().map(|(n, _)| n.as_str()).collect();
    let bandwidth: Vec<Option<f64>> = names
        .iter()
        .map(|n| gbps(&format!("read_bandwidth/{n}")))
        .collect();
    let fmt = |v: Option<f64>| v.map_or_else(|| "-".to_owned(), |v| format!("{v:.1}"));
    let ratio = |v: Option<f64>, bw: Option<f64>| match (v, bw) {
        (Some(v), Some(bw)) => format!("{:.0}%", 100.0 * v / bw),
        _ => "-".to_owned(),
    };
    println!();
    println!("kernels: {}", Kernels::get().isa());
    println!(
        "read bandwidth (GB/s): {}",
        names
            .iter()
            .zip(&bandwidth)
            .map(|(n, b)| format!("{n} {}", fmt(*b)))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!();
    println!(
        "| type | tokens | GB/s {0} | GB/s {1} | of read bw {0} | of read bw {1} |",
        names[0], names[1]
    );
    println!("|---|---|---|---|---|---|");
    for ty in types {
        for (label, tokens) in [("matvec", 1), ("matmul8", BATCH)] {
            if !names
                .iter()
                .any(|n| gbps(&format!("{label}/{ty}/{n}")).is_some())
            {
                continue;
            }
            let v: Vec<Option<f64>> = names
                .iter()
                .map(|n| gbps(&format!("{label}/{ty}/{n}")))
                .collect();
            println!(
                "| {ty} | {tokens} | {} | {} | {} | {} |",
                fmt(v[0]),
                fmt(v[1]),
                ratio(v[0], bandwidth[0]),
                ratio(v[1], bandwidth[1])
            );
        }
    }
}

/// Cache-resident kernel rates: GB/s of weights for 1, 4 and 8 tokens (median and best
/// sample), and the batch's gain in token-rows per second over one token (from the best
/// samples, the least disturbed by other processes).
fn summary_resident(types: &[GgmlType]) {
    let rows: Vec<String> = types
        .iter()
        .filter_map(|ty| {
            let ids = [
                format!("kernel_rate/{ty}/1"),
                format!("kernel_rate/{ty}/4"),
                format!("kernel_rate/{ty}/{BATCH}"),
                format!("kernel_rate/{ty}/{BATCH}e"),
            ];
            let median = ids.each_ref().map(|id| gbps(id));
            let best = ids.each_ref().map(|id| best_gbps(id));
            let one = best[0]?;
            let cells: Vec<String> = [1, 4, BATCH, BATCH]
                .iter()
                .enumerate()
                .map(|(i, &t)| match (median[i], best[i]) {
                    (Some(m), Some(b)) => format!("{m:.1} / {b:.1} ({:.1}x)", b * t as f64 / one),
                    _ => "-".to_owned(),
                })
                .collect();
            Some(format!("| {ty} | {} |", cells.join(" | ")))
        })
        .collect();
    if rows.is_empty() {
        return;
    }
    println!();
    println!("kernel rate, cache-resident weights, 1 thread: GB/s of weights, median / best");
    println!("(in brackets: token-rows per second relative to one token)");
    println!();
    println!("| type | 1 token | 4 tokens | 8 tokens | 8 tokens, one expert |");
    println!("|---|---|---|---|---|");
    for row in rows {
        println!("{row}");
    }
}

fn main() {
    let mut c = config();
    let pools = pools();
    let types = bench_types();
    kernels::bench_resident(&mut c, &pools, &types);
    bandwidth::bench(&mut c, &pools);
    kernels::bench(&mut c, &pools, &types);
    c.final_summary();
    summary(&pools, &types);
    summary_resident(&types);
}
