//! Criterion bench of the quant kernels: quantize and dequantize at every
//! supported level, batch-1 mat-vec at every supported level over a 4-bit matrix larger than the last-level
//! cache, and mat-mul at batch 64.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use neuropil::quant::{self, Params, ScaleType, Scheme};
use neuropil::simd::Level;
use std::hint::black_box;

fn weights(rows: usize, cols: usize) -> Vec<f32> {
    (0..rows * cols)
        .map(|i| ((i * 2_654_435_761) % 1999) as f32 / 999.0 - 1.0)
        .collect()
}

fn bench_quant(c: &mut Criterion) {
    // 8192 x 8192 at 4 bits: 36 MiB packed, more than the 32 MiB LLC.
    let (rows, cols) = (8192usize, 8192usize);
    let w = weights(rows, cols);
    let p = Params::new(4, 64, Scheme::Asym, ScaleType::F16).unwrap();
    let q = quant::quantize(&w, rows, cols, p, false).unwrap();
    let x: Vec<f32> = (0..cols).map(|i| (i % 11) as f32 / 11.0).collect();

    let mut g = c.benchmark_group("quant");
    g.throughput(Throughput::Bytes((rows * cols * 4) as u64));
    let q40 = Params::new(4, 32, Scheme::Q4_0, ScaleType::F16).unwrap();
    for level in Level::supported() {
        g.bench_with_input(
            BenchmarkId::new("quantize_4bit_g64", level.name()),
            &level,
            |b, &l| b.iter(|| quant::quantize_at(l, black_box(&w), rows, cols, p, false).unwrap()),
        );
        g.bench_with_input(
            BenchmarkId::new("quantize_q4_0", level.name()),
            &level,
            |b, &l| {
                b.iter(|| quant::quantize_at(l, black_box(&w), rows, cols, q40, false).unwrap())
            },
        );
    }
    let mut out = vec![0f32; rows * cols];
    for level in Level::supported() {
        g.bench_with_input(
            BenchmarkId::new("dequantize_4bit_g64", level.name()),
            &level,
            |b, &l| {
                b.iter(|| quant::dequantize_into_at(l, &q.view(), black_box(&mut out)).unwrap())
            },
        );
    }
    // a fresh output each time, as the Python API returns
    g.bench_function("dequantize_4bit_g64_fresh", |b| {
        b.iter(|| quant::dequantize(&q.view()).unwrap())
    });
    g.throughput(Throughput::Bytes(q.memory_bytes() as u64));
    let mut y = vec![0f32; rows];
    for level in Level::supported() {
        g.bench_with_input(
            BenchmarkId::new("matvec_4bit_g64", level.name()),
            &level,
            |b, &l| b.iter(|| quant::matvec_at(l, &q.view(), black_box(&x), None, &mut y).unwrap()),
        );
    }
    let n = 64;
    let xs: Vec<f32> = (0..n * cols).map(|i| (i % 17) as f32 / 17.0).collect();
    g.throughput(Throughput::Elements((2 * n * rows * cols) as u64));
    g.bench_function("matmul_4bit_g64_n64", |b| {
        b.iter(|| quant::matmul(&q.view(), black_box(&xs), n).unwrap())
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(10);
    targets = bench_quant
}
criterion_main!(benches);
