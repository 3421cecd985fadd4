//! The scan behind [`super::BinaryIndex`] searches: blocks of queries run in
//! parallel; each block walks the codes in L2-sized chunks, counts a whole
//! (queries x chunk) tile with [`counts_tile`], then filters each query's row.
//!
//! The filter keeps selection cheap: `bound(list)` is an exclusive limit on
//! the distance a candidate needs to enter the query's list (the current k-th
//! distance, the range radius + 1, ...). Runs of 16 distances are compared
//! with it at once (a compare and a mask move, no branch per code); only the
//! set bits of a run's mask are handed to `keep`, in position order.

use rayon::prelude::*;

use super::hamming::{counts_tile, Op};
use super::index::Metric;
use crate::error::Result;
use crate::simd::Level;

/// At most this many queries per parallel task (fewer when there are few
/// queries, so every thread gets work), and bytes of codes per scanned chunk: a
/// chunk (and the block's counts over it) stays in L2 while the block runs over it.
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
    let tasks = 4 * crate::threads::num_threads()?;
    let qblock = nq.div_ceil(tasks).clamp(1, QUERY_BLOCK);
    crate::threads::install(|| {
        out.par_chunks_mut(qblock)
            .zip(q.par_chunks(qblock * nb))
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
    // Distances are below u32::MAX (Hamming <= 2^30 bits, Jaccard <= 1.0), so a
    // bound clamped to u32::MAX rejects exactly what the u64 bound rejects.
    let clamp = |b: u64| b.min(u32::MAX as u64) as u32;
    let mut lim = clamp(bound(acc));
    let offer = |at: usize, run: &[u32], mut mask: u32, lim: &mut u32, acc: &mut Vec<u64>| {
        while mask != 0 {
            let i = mask.trailing_zeros() as usize;
            mask &= mask - 1;
            let d = run[i];
            // The list may have tightened since the mask was taken.
            if d < *lim {
                keep(((d as u64) << 32) | (at + i) as u64, acc);
                *lim = clamp(bound(acc));
            }
        }
    };
    let mut runs = row.chunks_exact(RUN);
    for (r, run) in (&mut runs).enumerate() {
        // A compare and a mask move per run of 16: no branch per code.
        let mask = run
            .iter()
            .enumerate()
            .fold(0u32, |m, (i, &d)| m | ((d < lim) as u32) << i);
        if mask != 0 {
            offer(start + r * RUN, run, mask, &mut lim, acc);
        }
    }
    let rest = runs.remainder();
    let mask = rest
        .iter()
        .enumerate()
        .fold(0u32, |m, (i, &d)| m | ((d < lim) as u32) << i);
    offer(start + row.len() - rest.len(), rest, mask, &mut lim, acc);
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

#[cfg(test)]
mod tests {
    use super::super::BinaryIndex;
    use super::*;

    fn codes(n: usize, nb: usize, seed: u64) -> Vec<u8> {
        let mut s = super::super::rng::Stream::for_row(seed, 0);
        (0..n * nb).map(|_| s.next_u64() as u8).collect()
    }

    /// Several chunks and query blocks, a code width with a tail past whole
    /// 64-byte blocks, code and query counts off the tile sizes: top-k, Jaccard
    /// and range search equal brute force at every level.
    #[test]
    fn tiled_scan_matches_brute_force_at_every_level() {
        let (nb, n, nq) = (130, 2 * (128 << 10) / 130 + 37, 21);
        let mut ix = BinaryIndex::new(nb * 8 - 3).unwrap();
        let mut data = codes(n, nb, 5);
        let mut q = codes(nq, nb, 6);
        for c in data.chunks_exact_mut(nb).chain(q.chunks_exact_mut(nb)) {
            c[nb - 1] &= 0x1f;
        }
        // Duplicates and all-zero codes exercise the tie rule and 0 / 0.
        data.copy_within(0..nb, 700 * nb);
        data[900 * nb..901 * nb].fill(0);
        q[3 * nb..4 * nb].fill(0);
        q[..nb].copy_from_slice(&data[..nb]);
        ix.add(&data, n, None).unwrap();
        let pairs = |qi: usize| -> Vec<(u32, u32, u32)> {
            let a = &q[qi * nb..(qi + 1) * nb];
            (0..n)
                .map(|i| {
                    let b = &data[i * nb..(i + 1) * nb];
                    let x = a.iter().zip(b).map(|(x, y)| (x ^ y).count_ones()).sum();
                    let and = a.iter().zip(b).map(|(x, y)| (x & y).count_ones()).sum();
                    let or = a.iter().zip(b).map(|(x, y)| (x | y).count_ones()).sum();
                    (x, and, or)
                })
                .collect()
        };
        let radius = 8 * nb as u32 / 2 - 40;
        for level in Level::supported() {
            let k = 10;
            let ham = ix.search_hamming(level, &q, nq, k).unwrap();
            let jac = ix.search_jaccard(level, &q, nq, k).unwrap();
            let range = ix.range_search(level, &q, nq, radius).unwrap();
            for qi in 0..nq {
                let p = pairs(qi);
                let mut want: Vec<(u32, usize)> = p.iter().map(|t| t.0).zip(0..).collect();
                want.sort();
                let got: Vec<(u32, usize)> = (0..k)
                    .map(|j| {
                        (
                            ham.distances[qi * k + j] as u32,
                            ham.ids[qi * k + j] as usize,
                        )
                    })
                    .collect();
                assert_eq!(got, want[..k], "{level} hamming q{qi}");
                let mut wj: Vec<(u32, usize)> =
                    p.iter().map(|t| jaccard_bits(t.1, t.2)).zip(0..).collect();
                wj.sort();
                let got: Vec<(u32, usize)> = (0..k)
                    .map(|j| {
                        (
                            jac.distances[qi * k + j].to_bits(),
                            jac.ids[qi * k + j] as usize,
                        )
                    })
                    .collect();
                assert_eq!(got, wj[..k], "{level} jaccard q{qi}");
                let wr: Vec<(u32, usize)> =
                    want.iter().copied().filter(|t| t.0 <= radius).collect();
                let (lo, hi) = (range.lims[qi] as usize, range.lims[qi + 1] as usize);
                let got: Vec<(u32, usize)> = (lo..hi)
                    .map(|j| (range.distances[j] as u32, range.ids[j] as usize))
                    .collect();
                assert_eq!(got, wr, "{level} range q{qi}");
            }
        }
    }
}
