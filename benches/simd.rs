//! Criterion bench of the dispatched dot product at every supported level,
//! on vectors inside L1 and far outside the last-level cache.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use neuropil::simd::{dot, dot_at, Level};
use std::hint::black_box;

fn bench_dot(c: &mut Criterion) {
    let mut group = c.benchmark_group("dot");
    for &n in &[4_096usize, 16 << 20] {
        let a: Vec<f32> = (0..n).map(|i| (i % 13) as f32 * 0.25).collect();
        let b: Vec<f32> = (0..n).map(|i| (i % 7) as f32 * 0.5).collect();
        group.throughput(Throughput::Bytes((2 * n * 4) as u64));
        for level in Level::supported() {
            group.bench_with_input(BenchmarkId::new(level.name(), n), &n, |bench, _| {
                bench.iter(|| dot_at(level, black_box(&a), black_box(&b)).unwrap())
            });
        }
        group.bench_with_input(BenchmarkId::new("parallel", n), &n, |bench, _| {
            bench.iter(|| dot(black_box(&a), black_box(&b)).unwrap())
        });
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20);
    targets = bench_dot
}
criterion_main!(benches);
