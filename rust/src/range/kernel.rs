//! Dot products of one query with blocks of 16 keys stored dimension-major.
//!
//! A block holds 16 keys as `block[j * 16 + lane]` (dimension `j` of key
//! `lane`), so one vector register holds dimension `j` of 16 keys and a query
//! coordinate is broadcast against it. Each lane accumulates with fused
//! multiply-adds in dimension order, starting from the caller's accumulator:
//!
//! `acc[lane] = fma(q[n-1], k[n-1], ... fma(q[1], k[1], fma(q[0], k[0], acc[lane])))`
//!
//! Every level (scalar via `f32::mul_add`, AVX2, AVX-512, NEON) performs exactly
//! that sequence of correctly rounded FMAs, so scores are bit-identical across
//! levels, thread counts and index methods: the range search's answer is the
//! same set everywhere. Up to [`GROUP`] blocks run together to hide FMA latency.

use crate::error::Result;
use crate::simd::Level;

/// Keys per block (one AVX-512 register of f32).
pub const LANES: usize = 16;
/// Blocks processed together (independent FMA chains).
pub const GROUP: usize = 4;

/// Accumulates `q . block` for `blocks.len() <= GROUP` blocks into `acc`.
///
/// `q` has `m` elements, each block at least `m * LANES`: dimensions `0..m`
/// of the block are read. `level` must have passed [`Level::check`].
#[inline]
pub fn fma_blocks(level: Level, q: &[f32], blocks: &[&[f32]], acc: &mut [[f32; LANES]; GROUP]) {
    debug_assert!(blocks.len() <= GROUP);
    debug_assert!(blocks.iter().all(|b| b.len() >= q.len() * LANES));
    match level {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: callers only pass levels that passed `Level::check()` (AVX-512 F present);
        // every block holds at least `q.len() * LANES` floats (asserted by `checked`).
        Level::Avx512 => unsafe { avx512(q, blocks, acc) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above, with AVX2 + FMA present.
        Level::Avx2 => unsafe { avx2(q, blocks, acc) },
        #[cfg(target_arch = "aarch64")]
        // SAFETY: as above, with NEON present.
        Level::Neon => unsafe { neon(q, blocks, acc) },
        _ => scalar(q, blocks, acc),
    }
}

/// Checked entry point used by tests and benches: validates sizes and level.
pub fn fma_blocks_checked(
    level: Level,
    q: &[f32],
    blocks: &[&[f32]],
    acc: &mut [[f32; LANES]; GROUP],
) -> Result<()> {
    level.check()?;
    if blocks.len() > GROUP || blocks.iter().any(|b| b.len() < q.len() * LANES) {
        return Err(crate::Error::value(
            "blocks",
            format!("at most {GROUP} blocks of {} floats", q.len() * LANES),
            format!("{} blocks", blocks.len()),
        ));
    }
    fma_blocks(level, q, blocks, acc);
    Ok(())
}

fn scalar(q: &[f32], blocks: &[&[f32]], acc: &mut [[f32; LANES]; GROUP]) {
    for (b, block) in blocks.iter().enumerate() {
        let a = &mut acc[b];
        for (j, &qj) in q.iter().enumerate() {
            let row = &block[j * LANES..(j + 1) * LANES];
            for l in 0..LANES {
                a[l] = qj.mul_add(row[l], a[l]);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn avx512(q: &[f32], blocks: &[&[f32]], acc: &mut [[f32; LANES]; GROUP]) {
    use std::arch::x86_64::*;
    if blocks.len() == GROUP {
        let p = [
            blocks[0].as_ptr(),
            blocks[1].as_ptr(),
            blocks[2].as_ptr(),
            blocks[3].as_ptr(),
        ];
        // SAFETY: each accumulator row holds exactly 16 f32.
        let mut a = unsafe {
            [
                _mm512_loadu_ps(acc[0].as_ptr()),
                _mm512_loadu_ps(acc[1].as_ptr()),
                _mm512_loadu_ps(acc[2].as_ptr()),
                _mm512_loadu_ps(acc[3].as_ptr()),
            ]
        };
        for (j, &qj) in q.iter().enumerate() {
            let qv = _mm512_set1_ps(qj);
            for g in 0..GROUP {
                // SAFETY: j < q.len() and every block holds >= m * 16 floats.
                let k = unsafe { _mm512_loadu_ps(p[g].add(j * LANES)) };
                a[g] = _mm512_fmadd_ps(qv, k, a[g]);
            }
        }
        for g in 0..GROUP {
            // SAFETY: each accumulator row holds exactly 16 f32.
            unsafe { _mm512_storeu_ps(acc[g].as_mut_ptr(), a[g]) };
        }
        return;
    }
    for (g, block) in blocks.iter().enumerate() {
        let p = block.as_ptr();
        // SAFETY: each accumulator row holds exactly 16 f32.
        let mut a = unsafe { _mm512_loadu_ps(acc[g].as_ptr()) };
        for (j, &qj) in q.iter().enumerate() {
            // SAFETY: j < q.len() and the block holds >= m * 16 floats.
            let k = unsafe { _mm512_loadu_ps(p.add(j * LANES)) };
            a = _mm512_fmadd_ps(_mm512_set1_ps(qj), k, a);
        }
        // SAFETY: as above.
        unsafe { _mm512_storeu_ps(acc[g].as_mut_ptr(), a) };
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn avx2(q: &[f32], blocks: &[&[f32]], acc: &mut [[f32; LANES]; GROUP]) {
    use std::arch::x86_64::*;
    for (g, block) in blocks.iter().enumerate() {
        let p = block.as_ptr();
        // SAFETY: each accumulator row holds 16 f32: two 8-lane halves.
        let (mut lo, mut hi) = unsafe {
            (
                _mm256_loadu_ps(acc[g].as_ptr()),
                _mm256_loadu_ps(acc[g].as_ptr().add(8)),
            )
        };
        for (j, &qj) in q.iter().enumerate() {
            let qv = _mm256_set1_ps(qj);
            // SAFETY: j < q.len() and the block holds >= m * 16 floats.
            let (k0, k1) = unsafe {
                (
                    _mm256_loadu_ps(p.add(j * LANES)),
                    _mm256_loadu_ps(p.add(j * LANES + 8)),
                )
            };
            lo = _mm256_fmadd_ps(qv, k0, lo);
            hi = _mm256_fmadd_ps(qv, k1, hi);
        }
        // SAFETY: as above.
        unsafe {
            _mm256_storeu_ps(acc[g].as_mut_ptr(), lo);
            _mm256_storeu_ps(acc[g].as_mut_ptr().add(8), hi);
        }
    }
}

#[cfg(target_arch = "aarch64")]
#[target_feature(enable = "neon")]
unsafe fn neon(q: &[f32], blocks: &[&[f32]], acc: &mut [[f32; LANES]; GROUP]) {
    use std::arch::aarch64::*;
    let m = q.len();
    for (g, block) in blocks.iter().enumerate() {
        let p = block.as_ptr();
        let a_ptr = acc[g].as_mut_ptr();
        // SAFETY: each accumulator row holds 16 f32: four 4-lane quarters.
        let mut a = unsafe {
            [
                vld1q_f32(a_ptr),
                vld1q_f32(a_ptr.add(4)),
                vld1q_f32(a_ptr.add(8)),
                vld1q_f32(a_ptr.add(12)),
            ]
        };
        for (j, &qj) in q.iter().enumerate() {
            let qv = vdupq_n_f32(qj);
            for (h, s) in a.iter_mut().enumerate() {
                // SAFETY: j < q.len() and the block holds >= m * 16 floats.
                let k = unsafe { vld1q_f32(p.add(j * LANES + 4 * h)) };
                *s = vfmaq_f32(*s, qv, k);
            }
        }
        for (h, s) in a.iter().enumerate() {
            // SAFETY: as above.
            unsafe { vst1q_f32(a_ptr.add(4 * h), *s) };
        }
    }
}

/// Chains run side by side in [`score_rows`]: an FMA's latency (4 cycles)
/// times its throughput (2 per cycle).
const CHAINS: usize = 8;

/// Scores of the keys `rows[pos * d..]` for `pos` in `positions`, each by the
/// same FMA chain in dimension order as [`fma_blocks`], so bit-identical to it.
///
/// For a few scattered keys (the survivors of a bound): a key's `d` floats are
/// contiguous, and `CHAINS` independent chains keep the FMA units busy where
/// one chain would wait on each FMA's latency.
pub fn score_rows(level: Level, q: &[f32], rows: &[f32], positions: &[u32], out: &mut Vec<f32>) {
    let d = q.len();
    debug_assert!(positions
        .iter()
        .all(|&p| (p as usize + 1) * d <= rows.len()));
    match level {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: both x86 levels passed `Level::check()`, which requires FMA.
        Level::Avx512 | Level::Avx2 => unsafe { score_rows_fma(q, rows, positions, out) },
        _ => score_rows_portable(q, rows, positions, out),
    }
}

#[inline(always)]
fn score_rows_portable(q: &[f32], rows: &[f32], positions: &[u32], out: &mut Vec<f32>) {
    let d = q.len();
    for chunk in positions.chunks(CHAINS) {
        let mut acc = [0.0f32; CHAINS];
        let r: [&[f32]; CHAINS] = std::array::from_fn(|c| {
            let p = chunk.get(c).copied().unwrap_or(chunk[0]) as usize;
            &rows[p * d..(p + 1) * d]
        });
        for (j, &qj) in q.iter().enumerate() {
            for c in 0..CHAINS {
                acc[c] = qj.mul_add(r[c][j], acc[c]);
            }
        }
        out.extend_from_slice(&acc[..chunk.len()]);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "fma")]
unsafe fn score_rows_fma(q: &[f32], rows: &[f32], positions: &[u32], out: &mut Vec<f32>) {
    // The portable code with FMA enabled: `mul_add` becomes one vfmadd each.
    score_rows_portable(q, rows, positions, out)
}

/// The reference score of one key, as every kernel computes it.
pub fn score_reference(q: &[f32], k: &[f32]) -> f32 {
    q.iter()
        .zip(k)
        .fold(0.0f32, |acc, (a, b)| a.mul_add(*b, acc))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn every_level_is_bit_identical_to_the_reference(
            d in 1usize..70,
            nb in 1usize..5,
            seed in 0u64..1000,
        ) {
            let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
            let mut rnd = || {
                s ^= s << 13; s ^= s >> 7; s ^= s << 17;
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            };
            let q: Vec<f32> = (0..d).map(|_| rnd()).collect();
            let keys: Vec<Vec<f32>> = (0..nb * LANES).map(|_| (0..d).map(|_| rnd()).collect()).collect();
            let mut blocks = vec![vec![0.0f32; d * LANES]; nb];
            for (i, k) in keys.iter().enumerate() {
                for j in 0..d {
                    blocks[i / LANES][j * LANES + i % LANES] = k[j];
                }
            }
            let refs: Vec<&[f32]> = blocks.iter().map(|b| b.as_slice()).collect();
            let rows: Vec<f32> = keys.concat();
            let positions: Vec<u32> = (0..keys.len() as u32).rev().collect();
            for level in Level::supported() {
                let mut scores = Vec::new();
                score_rows(level, &q, &rows, &positions, &mut scores);
                for (&p, s) in positions.iter().zip(&scores) {
                    let want = score_reference(&q, &keys[p as usize]);
                    prop_assert_eq!(s.to_bits(), want.to_bits(), "rows {}", level);
                }
            }
            for level in Level::supported() {
                let mut acc = [[0.0f32; LANES]; GROUP];
                fma_blocks_checked(level, &q, &refs, &mut acc).unwrap();
                for (i, k) in keys.iter().enumerate() {
                    let want = score_reference(&q, k);
                    prop_assert_eq!(acc[i / LANES][i % LANES].to_bits(), want.to_bits(), "{}", level);
                }
            }
        }
    }
}
