//! Criterion bench of the window gather (B = 256 windows of 30 x 287 float32,
//! 8.8 MB per batch, from 380k frames = 436 MB, far beyond the last-level
//! cache), against the same bytes copied contiguously (the copy limit), plus
//! the per-epoch index math (permutation and start lookup of 380k windows).

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use neuropil::windows::{epoch_order, gather, Layout, Rows};
use std::hint::black_box;

const N: usize = 380_000;
const D: usize = 287;
const W: usize = 30;
const B: usize = 256;

fn bench_windows(c: &mut Criterion) {
    let row_bytes = D * 4;
    let frames: Vec<u8> = (0..N * row_bytes).map(|i| (i % 251) as u8).collect();
    let layout = Layout::from_lengths(N as u64, &[N as u64 / 2, N as u64 / 2], W as u64, 1, 0)
        .expect("valid layout");
    let mut order = epoch_order(layout.len(), true, 0, 0, 0, 1, false).expect("valid shard");
    layout.starts_in_place(&mut order).expect("in range");
    let starts: Vec<i64> = order.iter().map(|&s| s as i64).collect();
    let mut out = vec![0u8; B * W * row_bytes];
    let rows = Rows::new(&frames, row_bytes).expect("whole rows");

    let mut group = c.benchmark_group("windows");
    group.throughput(Throughput::Bytes((B * W * row_bytes) as u64));
    let mut k = 0usize;
    group.bench_function("gather_b256_w30_d287", |bench| {
        bench.iter(|| {
            let lo = (k % (starts.len() / B)) * B;
            k += 1;
            gather(
                "frames",
                rows,
                black_box(&starts[lo..lo + B]),
                0,
                W,
                &mut out,
            )
            .expect("in range")
        })
    });
    let mut k2 = 0usize;
    group.bench_function("gather_without_software_prefetch", |bench| {
        bench.iter(|| {
            let lo = (k2 % (starts.len() / B)) * B;
            k2 += 1;
            neuropil::windows::gather::copy_windows(
                rows,
                black_box(&starts[lo..lo + B]),
                0,
                W * row_bytes,
                &mut out,
                false,
            )
        })
    });
    // Copy limit: the windows of a batch laid end to end (one contiguous run).
    let contiguous: Vec<i64> = (0..B as i64).map(|b| b * W as i64).collect();
    let mut j = 0i64;
    group.bench_function("contiguous_copy_limit", |bench| {
        bench.iter(|| {
            let base = (j % 40) * (B * W) as i64;
            j += 1;
            let s: Vec<i64> = contiguous.iter().map(|x| x + base).collect();
            gather("frames", rows, black_box(&s), 0, W, &mut out).expect("in range")
        })
    });
    group.finish();

    let mut index = c.benchmark_group("windows_index");
    index.throughput(Throughput::Elements(layout.len()));
    index.bench_function("epoch_order_380k", |bench| {
        bench.iter(|| epoch_order(black_box(layout.len()), true, 7, 1, 0, 1, false))
    });
    index.bench_function("epoch_starts_380k", |bench| {
        bench.iter(|| {
            let mut o = epoch_order(layout.len(), true, 7, 1, 0, 1, false).expect("valid");
            layout.starts_in_place(&mut o).expect("in range");
            o
        })
    });
    index.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20);
    targets = bench_windows
}
criterion_main!(benches);
