//! Criterion bench of exact range search: every method on low-rank keys
//! (a stand-in for LLM keys; `neuropil bench range` uses real SmolLM2 keys)
//! and the flat scan, 256 queries at top-1% thresholds.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use neuropil::range::{Method, Params, RangeIndex};
use std::hint::black_box;

/// Low-rank keys with a decaying spectrum plus noise (SplitMix64-seeded).
fn keys(n: usize, d: usize, seed: u64) -> Vec<f32> {
    let mut rng = neuropil::range::tree::SplitMix64(seed);
    let mut g = || (rng.next_f64() * 2.0 - 1.0) as f32;
    let rank = 8;
    let basis: Vec<f32> = (0..rank * d).map(|_| g()).collect();
    (0..n)
        .flat_map(|_| {
            let coef: Vec<f32> = (0..rank).map(|r| g() * 4.0 / (r + 1) as f32).collect();
            let noise: Vec<f32> = (0..d).map(|_| 0.2 * g()).collect();
            (0..d)
                .map(|j| noise[j] + (0..rank).map(|r| coef[r] * basis[r * d + j]).sum::<f32>())
                .collect::<Vec<f32>>()
        })
        .collect()
}

fn bench_range(c: &mut Criterion) {
    let d = 64;
    let n = 32_768;
    let k = keys(n, d, 1);
    let q = keys(256, d, 2);
    let flat = RangeIndex::new(&k, d, Method::Flat, Params::default()).unwrap();
    let top = flat.topk(&q, n / 100).unwrap();
    let t: Vec<f32> = top.scores.chunks(n / 100).map(|s| s[s.len() - 1]).collect();
    let mut group = c.benchmark_group("range_search_32k_x256");
    group.throughput(Throughput::Elements(256));
    for method in Method::ALL {
        let idx = RangeIndex::new(&k, d, method, Params::default()).unwrap();
        group.bench_with_input(BenchmarkId::new(method.name(), n), &n, |b, _| {
            b.iter(|| idx.search(black_box(&q), black_box(&t)).unwrap())
        });
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(10);
    targets = bench_range
}
criterion_main!(benches);
