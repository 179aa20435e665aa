//! One decode step's attention for one KV head of a GQA model over the cached positions:
//! `cargo bench -p coordinator --bench attention`.
//!
//! Qwen3-30B-A3B's shape: 8 query heads read one KV head of 128 (a parallel task of the
//! engine's decode step, which runs 4 of them per layer), at 128, 1024 and 4096 cached
//! positions, through `attend_heads` (the vector kernel this CPU runs, in
//! `ggml_vec_dot_f16`'s order) and one head at a time through `attend_head` (the same
//! kernel, per head). Throughput is in cached K and V bytes read per second.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use half::f16;
use std::hint::black_box;

use coordinator::models::blocks::{attend_head, attend_heads};

const HEAD_DIM: usize = 128;
const GROUP: usize = 8;

fn bench(c: &mut Criterion) {
    let mut rng = shared::rng::SplitMix64::new(7);
    let mut group = c.benchmark_group("attention_decode");
    for n_kv in [128usize, 1024, 4096] {
        let f16s = |n: usize, rng: &mut shared::rng::SplitMix64| -> Vec<f16> {
            (0..n)
                .map(|_| f16::from_f32(rng.next_f32() * 4.0 - 2.0))
                .collect()
        };
        let ks = f16s(HEAD_DIM * n_kv, &mut rng);
        let vs = f16s(HEAD_DIM * n_kv, &mut rng);
        let q: Vec<f32> = (0..GROUP * HEAD_DIM)
            .map(|_| rng.next_f32() * 2.0 - 1.0)
            .collect();
        let key = |j: usize| &ks[j * HEAD_DIM..(j + 1) * HEAD_DIM];
        let value = |j: usize| &vs[j * HEAD_DIM..(j + 1) * HEAD_DIM];
        let mut out = vec![0.0f32; GROUP * HEAD_DIM];
        group.throughput(Throughput::Bytes((2 * 2 * HEAD_DIM * n_kv) as u64));
        group.bench_function(format!("heads{GROUP}/{n_kv}"), |b| {
            b.iter(|| {
                attend_heads(black_box(&q), GROUP, n_kv, key, value, 0.08, 1, &mut out);
                black_box(&out);
            })
        });
        group.bench_function(format!("one_head/{n_kv}"), |b| {
            b.iter(|| {
                attend_head(
                    black_box(&q[..HEAD_DIM]),
                    n_kv,
                    key,
                    value,
                    0.08,
                    1,
                    &mut out[..HEAD_DIM],
                );
                black_box(&out);
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
