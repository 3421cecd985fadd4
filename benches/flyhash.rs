//! Criterion benches of FlyHash: batch encode (d = 1536, m = 19,968, k = 998)
//! for each projection at every supported level, the popcount kernels (one
//! query, and the 16-query tile the search runs), and
//! Hamming top-10 over 100k 1024-bit codes.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use neuropil::flyhash::hamming::{counts, counts_tile, Op};
use neuropil::flyhash::rng::Stream;
use neuropil::flyhash::{BinaryIndex, Config, FlyHash, Kind, Output};
use neuropil::simd::Level;
use std::hint::black_box;

fn inputs(n: usize, d: usize) -> Vec<f32> {
    let mut s = Stream::for_row(7, 0);
    (0..n * d)
        .map(|_| (s.next_u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0)
        .collect()
}

fn bench_encode(c: &mut Criterion) {
    let (d, n) = (1536, 64);
    let x = inputs(n, d);
    let mut group = c.benchmark_group("flyhash_encode");
    group.throughput(Throughput::Elements(n as u64));
    for kind in [Kind::Sign, Kind::Sparse, Kind::Seeded] {
        let fh = FlyHash::new(Config {
            input_dim: d,
            expansion_ratio: 13.0,
            active_fraction: 0.05,
            seed: 0,
            kind,
            connectivity: 0.1,
            binary: false,
        })
        .unwrap();
        let mut out = vec![0u32; n * fh.active_bits];
        for level in Level::supported() {
            group.bench_function(BenchmarkId::new(kind.name(), level.name()), |b| {
                b.iter(|| {
                    fh.encode_at(level, black_box(&x), n, Output::Indices(&mut out))
                        .unwrap()
                })
            });
        }
    }
    group.finish();
}

fn bench_hamming(c: &mut Criterion) {
    let (n, nb) = (100_000, 128);
    let mut s = Stream::for_row(3, 0);
    let codes: Vec<u8> = (0..n * nb).map(|_| s.next_u64() as u8).collect();
    let queries: Vec<u8> = (0..100 * nb).map(|_| s.next_u64() as u8).collect();
    let mut group = c.benchmark_group("hamming");
    group.throughput(Throughput::Bytes((n * nb) as u64));
    let mut out = vec![0u32; n];
    for level in Level::supported() {
        group.bench_function(
            BenchmarkId::new("counts_100k_x_1024bit", level.name()),
            |b| b.iter(|| counts(level, Op::Xor, black_box(&queries[..nb]), &codes, &mut out)),
        );
    }
    // The search kernel: 16 queries x one 128 KiB chunk (1024 codes).
    let chunk = (128 << 10) / nb;
    let mut tile = vec![0u32; 16 * chunk];
    group.throughput(Throughput::Bytes((16 * chunk * nb) as u64));
    for level in Level::supported() {
        group.bench_function(
            BenchmarkId::new("counts_tile_16q_x_1024", level.name()),
            |b| {
                b.iter(|| {
                    counts_tile(
                        level,
                        Op::Xor,
                        black_box(&queries[..16 * nb]),
                        16,
                        &codes[..chunk * nb],
                        &mut tile,
                    )
                })
            },
        );
    }
    let mut ix = BinaryIndex::new(nb * 8).unwrap();
    ix.add(&codes, n, None).unwrap();
    group.throughput(Throughput::Elements(100));
    for level in Level::supported() {
        group.bench_function(BenchmarkId::new("top10_100_queries", level.name()), |b| {
            b.iter(|| {
                ix.search_hamming(level, black_box(&queries), 100, 10)
                    .unwrap()
            })
        });
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(10);
    targets = bench_encode, bench_hamming
}
criterion_main!(benches);
