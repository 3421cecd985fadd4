//! Criterion benches of the neuron cache (batch recording, reclassification of
//! 1 M neurons) and the sparse FFN at SmolLM2-135M's shape (576 x 1536).

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use neuropil::neurons::{Activation, Bundled, CacheConfig, NeuronCache, Policy, Select, SparseFfn};
use std::hint::black_box;

fn mask(rows: usize, n: usize, density: u64) -> Vec<u8> {
    let mut s = 0x9E37_79B9_7F4A_7C15u64;
    (0..rows * n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            u8::from(s % 100 < density)
        })
        .collect()
}

fn bench_cache(c: &mut Criterion) {
    let n = 1 << 20;
    let rows = 64;
    let m = mask(rows, n, 30);
    let mut group = c.benchmark_group("neuron_cache");
    group.throughput(Throughput::Elements((rows * n) as u64));
    for (name, policy) in [
        ("frequency", Policy::Frequency { decay: None }),
        ("decay", Policy::Frequency { decay: Some(0.99) }),
        ("window", Policy::Window { k: 16 }),
    ] {
        let cfg = CacheConfig {
            capacity: n / 5,
            bytes_per_neuron: 0,
            policy,
            hysteresis: 0.1,
            reclassify_every: 0,
        };
        let mut cache = NeuronCache::new(n, cfg).unwrap();
        group.bench_function(BenchmarkId::new("record_batch_64x1M", name), |b| {
            b.iter(|| cache.record_batch(black_box(&m), rows).unwrap())
        });
        group.bench_function(BenchmarkId::new("reclassify_1M", name), |b| {
            b.iter(|| cache.reclassify())
        });
    }
    group.finish();
}

fn bench_ffn(c: &mut Criterion) {
    let (h, d) = (1536, 576);
    let mut s = 1u64;
    let mut r = || {
        s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.1
    };
    let g: Vec<f32> = (0..h * d).map(|_| r()).collect();
    let u: Vec<f32> = (0..h * d).map(|_| r()).collect();
    let dn: Vec<f32> = (0..d * h).map(|_| r()).collect();
    let x: Vec<f32> = (0..d).map(|_| r() * 10.0).collect();
    let ffn = SparseFfn::new(
        Bundled::<f32>::from_matrices(Some(&g), &u, &dn, h, d).unwrap(),
        Activation::Silu,
        None,
        None,
    )
    .unwrap();
    let mut group = c.benchmark_group("sparse_ffn_576x1536");
    group.bench_function("dense", |b| {
        b.iter(|| ffn.forward(black_box(&x), 1, Select::Dense).unwrap())
    });
    // Thresholds at the 50/70/90% quantiles of |act| for this input: the single-sweep path.
    let mut mags: Vec<f32> = ffn
        .activations(&x, 1)
        .unwrap()
        .iter()
        .map(|v| v.abs())
        .collect();
    mags.sort_by(f32::total_cmp);
    for s in [0.5f64, 0.7, 0.9] {
        let t = mags[(s * h as f64) as usize];
        group.bench_function(BenchmarkId::new("threshold_sparsity", s), |b| {
            b.iter(|| ffn.forward(black_box(&x), 1, Select::Threshold(t)).unwrap())
        });
    }
    for k in [768usize, 461, 154] {
        group.bench_function(BenchmarkId::new("top_k", k), |b| {
            b.iter(|| ffn.forward(black_box(&x), 1, Select::TopK(k)).unwrap())
        });
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(10);
    targets = bench_cache, bench_ffn
}
criterion_main!(benches);
