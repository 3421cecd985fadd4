//! The machine's memory read bandwidth, measured: the limit a memory-bound
//! kernel (batch-1 mat-vec) is judged against, taken in the same run.

use std::time::Instant;

use rayon::prelude::*;

use crate::error::Result;

#[inline(always)]
fn sum(data: &[u64]) -> u64 {
    let mut acc = [0u64; 8];
    for c in data.chunks_exact(8) {
        for i in 0..8 {
            acc[i] = acc[i].wrapping_add(c[i]);
        }
    }
    let rest = data.chunks_exact(8).remainder();
    acc.iter().chain(rest).fold(0, |a, b| a.wrapping_add(*b))
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn sum_avx2(data: &[u64]) -> u64 {
    sum(data)
}

/// Wrapping sum of `data`, read by every thread of the neuropil pool (one
/// contiguous slice each): a pure streaming read.
pub fn parallel_read(data: &[u64]) -> Result<u64> {
    #[cfg(target_arch = "x86_64")]
    let wide = std::arch::is_x86_feature_detected!("avx2");
    crate::threads::install(|| {
        data.par_chunks(1 << 16)
            .map(|c| {
                #[cfg(target_arch = "x86_64")]
                if wide {
                    // SAFETY: AVX2 was detected on this CPU just above.
                    return unsafe { sum_avx2(c) };
                }
                sum(c)
            })
            .reduce(|| 0, u64::wrapping_add)
    })
}

/// Median read bandwidth in GB/s (1e9 bytes) over `repeat` passes of a
/// `bytes`-byte buffer (make it several times the last-level cache).
pub fn read_bandwidth(bytes: usize, repeat: usize) -> Result<f64> {
    let n = (bytes / 8).max(1 << 16);
    // Distinct values so pages are really allocated (not the shared zero page).
    let data: Vec<u64> = (0..n as u64).collect();
    // Warm up for at least 0.2 s: on a VM an idle vCPU can take tens of
    // milliseconds to be scheduled again, and a cold start measures one core.
    let mut guard = parallel_read(&data)?;
    let warm = Instant::now();
    while warm.elapsed().as_secs_f64() < 0.2 {
        guard = guard.wrapping_add(parallel_read(&data)?);
    }
    let mut times = Vec::with_capacity(repeat.max(1));
    for _ in 0..repeat.max(1) {
        let t = Instant::now();
        guard = guard.wrapping_add(parallel_read(&data)?);
        times.push(t.elapsed().as_secs_f64());
    }
    std::hint::black_box(guard);
    times.sort_by(f64::total_cmp);
    Ok((n * 8) as f64 / times[times.len() / 2] / 1e9)
}

#[cfg(test)]
mod tests {
    #[test]
    fn parallel_read_sums_everything() {
        let v: Vec<u64> = (0..200_001).collect();
        assert_eq!(super::parallel_read(&v).unwrap(), 200_000 * 200_001 / 2);
        assert!(super::read_bandwidth(1 << 20, 3).unwrap() > 0.0);
    }
}
