//! The scan behind [`super::BinaryIndex`] searches: blocks of queries run in
//! parallel; each block walks the codes in L2-sized chunks, counts a whole
//! (queries x chunk) tile with [`counts_tile`], then filters each query's row.
//!
//! The filter keeps selection cheap: `bound(list)` is an exclusive limit on
//! the distance a candidate needs to enter the query's list (the current k-th
//! distance, the range radius + 1, ...). Runs of 16 distances are rejected by
//! their minimum (a vector min, no branch per code); only a run holding a
//! candidate below the limit is walked and handed to `keep`, in position order.

use rayon::prelude::*;

use super::hamming::{counts_tile, Op};
use super::index::Metric;
use crate::error::Result;
use crate::simd::Level;

/// Queries per parallel task, and bytes of codes per scanned chunk: a chunk
/// (and the block's counts over it) stays in L2 while the block runs over it.
const QUERY_BLOCK: usize = 16;
const CHUNK_BYTES: usize = 128 << 10;
/// Distances per run of the filter.
const RUN: usize = 16;

/// The codes scanned: `ones[i]` is the popcount of code `i` (`nbytes` bytes each).
pub struct Codes<'a> {
    pub codes: &'a [u8],
    pub ones: &'a [u32],
    pub nbytes: usize,
}

/// Per query of `q` (`nq` codes), the list `keep` built from keys
/// `(distance bits << 32) | position` offered in increasing position, then
/// `finish`ed. `bound` must never reject a key `keep` would take.
#[allow(clippy::too_many_arguments)]
pub fn scan<F, B, G>(
    level: Level,
    metric: Metric,
    data: Codes<'_>,
    q: &[u8],
    nq: usize,
    keep: F,
    bound: B,
    finish: G,
) -> Result<Vec<Vec<u64>>>
where
    F: Fn(u64, &mut Vec<u64>) + Sync,
    B: Fn(&Vec<u64>) -> u64 + Sync,
    G: Fn(&mut Vec<u64>) + Sync,
{
    level.check()?;
    let nb = data.nbytes;
    let len = data.ones.len();
    let chunk = (CHUNK_BYTES / nb).max(1);
    let op = match metric {
        Metric::Hamming => Op::Xor,
        Metric::Jaccard => Op::And,
    };
    let mut out: Vec<Vec<u64>> = vec![Vec::new(); nq];
    crate::threads::install(|| {
        out.par_chunks_mut(QUERY_BLOCK)
            .zip(q.par_chunks(QUERY_BLOCK * nb))
            .for_each(|(res, qb)| {
                let nqb = res.len();
                let q_ones: Vec<u32> = qb.chunks_exact(nb).map(popcount).collect();
                let mut buf = vec![0u32; nqb * chunk.min(len)];
                for (start, codes) in (0..).step_by(chunk).zip(data.codes.chunks(chunk * nb)) {
                    let n = codes.len() / nb;
                    let buf = &mut buf[..nqb * n];
                    counts_tile(level, op, qb, nqb, codes, buf);
                    let ones = &data.ones[start..start + n];
                    for ((acc, row), &qo) in
                        res.iter_mut().zip(buf.chunks_exact_mut(n)).zip(&q_ones)
                    {
                        let jac = (metric == Metric::Jaccard).then_some((qo, ones));
                        post_row(level, row, jac, start, acc, &keep, &bound);
                    }
                }
                for acc in res.iter_mut() {
                    finish(acc);
                }
            })
    })?;
    Ok(out)
}

/// Turns one query's counts into distance bits (Jaccard) and offers the
/// candidates under the bound to `keep`; the same code at every level, compiled
/// with the level's features so the min runs and the divisions vectorise.
#[inline(always)]
fn post_row<F, B>(
    level: Level,
    row: &mut [u32],
    jac: Option<(u32, &[u32])>,
    start: usize,
    acc: &mut Vec<u64>,
    keep: &F,
    bound: &B,
) where
    F: Fn(u64, &mut Vec<u64>),
    B: Fn(&Vec<u64>) -> u64,
{
    match level {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the caller checked the level, so the CPU has AVX-512 F/BW/VL.
        Level::Avx512 => unsafe { post_avx512(row, jac, start, acc, keep, bound) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above, the CPU has AVX2.
        Level::Avx2 => unsafe { post_avx2(row, jac, start, acc, keep, bound) },
        _ => post_body(row, jac, start, acc, keep, bound),
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn post_avx512<F, B>(
    row: &mut [u32],
    jac: Option<(u32, &[u32])>,
    start: usize,
    acc: &mut Vec<u64>,
    keep: &F,
    bound: &B,
) where
    F: Fn(u64, &mut Vec<u64>),
    B: Fn(&Vec<u64>) -> u64,
{
    post_body(row, jac, start, acc, keep, bound)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn post_avx2<F, B>(
    row: &mut [u32],
    jac: Option<(u32, &[u32])>,
    start: usize,
    acc: &mut Vec<u64>,
    keep: &F,
    bound: &B,
) where
    F: Fn(u64, &mut Vec<u64>),
    B: Fn(&Vec<u64>) -> u64,
{
    post_body(row, jac, start, acc, keep, bound)
}

#[inline(always)]
fn post_body<F, B>(
    row: &mut [u32],
    jac: Option<(u32, &[u32])>,
    start: usize,
    acc: &mut Vec<u64>,
    keep: &F,
    bound: &B,
) where
    F: Fn(u64, &mut Vec<u64>),
    B: Fn(&Vec<u64>) -> u64,
{
    if let Some((q_ones, ones)) = jac {
        for (c, &o) in row.iter_mut().zip(ones) {
            *c = jaccard_bits(*c, q_ones + o - *c);
        }
    }
    let mut lim = bound(acc);
    let offer = |at: usize, run: &[u32], lim: &mut u64, acc: &mut Vec<u64>| {
        for (i, &d) in run.iter().enumerate() {
            if (d as u64) < *lim {
                keep(((d as u64) << 32) | (at + i) as u64, acc);
                *lim = bound(acc);
            }
        }
    };
    let mut runs = row.chunks_exact(RUN);
    for (r, run) in (&mut runs).enumerate() {
        let min = run.iter().fold(u32::MAX, |m, &d| m.min(d));
        if (min as u64) < lim {
            offer(start + r * RUN, run, &mut lim, acc);
        }
    }
    let rest = runs.remainder();
    offer(start + row.len() - rest.len(), rest, &mut lim, acc);
}

/// Bits of the Jaccard distance `1 - inter / union` (non-negative, so its f32
/// bits order like its value); 0 for two all-zero codes.
#[inline(always)]
pub fn jaccard_bits(inter: u32, union: u32) -> u32 {
    let d = (1.0f32 - inter as f32 / union as f32).max(0.0).to_bits();
    // union == 0 gives 0 / 0 = NaN above: select 0.0 without a branch.
    if union == 0 {
        0
    } else {
        d
    }
}

pub fn popcount(c: &[u8]) -> u32 {
    c.iter().map(|b| b.count_ones()).sum()
}
