//! The sparse kernel: the activations of a batch of 16 vectors under a
//! sparse projection, block of inputs by block, rows in [`Plan`] order. The
//! additions are those the [`super::kernels`] module doc defines; the plan
//! order only decides which row is computed when.

use super::kernels::{add, lanes, lanes_mut, plus, Lane, Proj, Scratch, LANES, ZERO};
use super::plan::{Block, Plan, LANE_BYTES};
use super::projection::SPARSE_BLOCK;
use crate::simd::Level;

/// `(s0 + s1) + (s2 + s3)`, where `s_j` sums (from 0, in order) the lanes at
/// positions `j, j + 4, ...` of `offs` (byte offsets into `xt`).
#[inline(always)]
fn sum4(xt: &[Lane], offs: &[u16]) -> Lane {
    let lane = |o: u16| &xt[o as usize / LANE_BYTES];
    let mut s = [ZERO; 4];
    let mut quads = offs.chunks_exact(4);
    for q in &mut quads {
        for j in 0..4 {
            add(&mut s[j], lane(q[j]));
        }
    }
    for (j, &o) in quads.remainder().iter().enumerate() {
        add(&mut s[j], lane(o));
    }
    plus(&plus(&s[0], &s[1]), &plus(&s[2], &s[3]))
}

/// `acc[r] += P_rb - N_rb` for every row `r` of block `blk`, in plan order.
#[inline(always)]
fn sparse_block(acc: &mut [Lane], xt: &[Lane], blk: &Block<'_>) {
    let (mut rows, mut offs) = (blk.rows.iter(), blk.offs);
    for g in blk.groups {
        let (np, nn) = (g.pos as usize, g.neg as usize);
        for &r in rows.by_ref().take(g.rows as usize) {
            let (row, rest) = offs.split_at(np + nn);
            offs = rest;
            let (sp, sn) = (sum4(xt, &row[..np]), sum4(xt, &row[np..]));
            let a = &mut acc[r as usize];
            for v in 0..LANES {
                a[v] += sp[v] - sn[v];
            }
        }
    }
}

#[inline(always)]
pub(super) fn sparse(
    level: Level,
    p: Proj<'_>,
    plan: &Plan,
    x: &[f32],
    nb: usize,
    s: &mut Scratch,
) {
    let d = p.d;
    let acc = lanes_mut(&mut s.acc[..p.m]);
    for b in 0..plan.blocks() {
        let blk = plan.block(b);
        let (lo, hi) = (blk.lo, d.min(blk.lo + SPARSE_BLOCK));
        let xt = lanes_mut(&mut s.xt[..hi - lo]);
        xt.fill(ZERO);
        for v in 0..nb {
            for (i, lane) in xt.iter_mut().enumerate() {
                lane[v] = x[v * d + lo + i];
            }
        }
        let xt = lanes(&s.xt[..hi - lo]);
        #[cfg(target_arch = "x86_64")]
        match level {
            Level::Avx512 => {
                // SAFETY: the level was checked. The plan was built by `Plan::new`
                // from a generated projection, so every offset of block b is that
                // of an input in lo..hi (a lane of `xt`), every row is < m.
                unsafe {
                    match b {
                        0 => super::kernels_x86::sparse_block_avx512::<true, 1>([acc], xt, &blk),
                        _ => super::kernels_x86::sparse_block_avx512::<false, 1>([acc], xt, &blk),
                    }
                };
                continue;
            }
            Level::Avx2 => {
                // SAFETY: as above, with AVX2.
                unsafe {
                    match b {
                        0 => super::kernels_x86::sparse_block_avx2::<true>(acc, xt, &blk),
                        _ => super::kernels_x86::sparse_block_avx2::<false>(acc, xt, &blk),
                    }
                };
                continue;
            }
            _ => {}
        }
        if b == 0 {
            acc.fill(ZERO);
        }
        sparse_block(acc, xt, &blk);
    }
}

/// [`sparse`] for two batches at once (`nb <= 32` vectors; see
/// [`super::kernels_x86::sparse_block_avx512`]).
///
/// # Safety
/// The CPU must have AVX-512 F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn sparse_pair_avx512(
    p: Proj<'_>,
    plan: &Plan,
    x: &[f32],
    nb: usize,
    s: &mut Scratch,
) {
    use super::kernels_x86::sparse_block_avx512 as kernel;
    let (d, m) = (p.d, p.m);
    let (acc0, acc1) = lanes_mut(&mut s.acc[..2 * m]).split_at_mut(m);
    for b in 0..plan.blocks() {
        let blk = plan.block(b);
        let (lo, hi) = (blk.lo, d.min(blk.lo + SPARSE_BLOCK));
        let xt = lanes_mut(&mut s.xt[..2 * (hi - lo)]);
        xt.fill(ZERO);
        for v in 0..nb {
            for i in 0..hi - lo {
                xt[2 * i + v / LANES][v % LANES] = x[v * d + lo + i];
            }
        }
        let xt = lanes(&s.xt[..2 * (hi - lo)]);
        // SAFETY: the caller checked AVX-512. The plan was built by `Plan::new`
        // from a generated projection, so every offset of block b is `64 (i - lo)`
        // for an input i in lo..hi (`2 (i - lo) + 1 < xt.len()`), every row is < m.
        unsafe {
            match b {
                0 => kernel::<true, 2>([&mut *acc0, &mut *acc1], xt, &blk),
                _ => kernel::<false, 2>([&mut *acc0, &mut *acc1], xt, &blk),
            }
        };
    }
}

#[cfg(test)]
mod tests {
    use super::super::kernels::{activations, activations_pair, pairs};
    use super::super::projection::{generate_sparse, Weights};
    use super::*;

    /// The sparse activations of vector `x` computed as the module doc defines
    /// them, row by row from the row-major indices, in f32.
    fn canonical_sparse(d: usize, m: usize, w: &Weights, x: &[f32]) -> Vec<f32> {
        let Weights::Sparse { c, plan, .. } = w else {
            unreachable!()
        };
        let (indices, npos) = plan.row_major();
        let sum4 = |part: &[u16]| {
            let mut s = [0.0f32; 4];
            for (j, &i) in part.iter().enumerate() {
                s[j % 4] += x[i as usize];
            }
            (s[0] + s[1]) + (s[2] + s[3])
        };
        (0..m)
            .map(|r| {
                let row = &indices[r * c..(r + 1) * c];
                let (pos, neg) = row.split_at(npos[r]);
                let mut a = 0.0f32;
                for lo in (0..d).step_by(SPARSE_BLOCK) {
                    let part = |p: &[u16]| -> Vec<u16> {
                        p.iter()
                            .copied()
                            .filter(|&i| (lo..lo + SPARSE_BLOCK).contains(&(i as usize)))
                            .collect()
                    };
                    a += sum4(&part(pos)) - sum4(&part(neg));
                }
                a
            })
            .collect()
    }

    #[test]
    fn sparse_follows_the_canonical_order_bit_for_bit() {
        // Several blocks, parts of every length mod 4, and -0.0 inputs.
        let (d, m) = (1000, 300);
        // Vector 0: mixed; 1: all -0.0; 2: -0.0 but for every 97th input (so
        // whole partial sums are -0.0 next to non-zero ones).
        let x: Vec<f32> = (0..3 * d)
            .map(|i| match (i / d, i % 11, i % 97) {
                (0, 0, _) | (1, ..) | (2, _, 1..) => -0.0,
                _ => ((i * 7919 % 1009) as f32 - 504.0) / 3.0,
            })
            .collect();
        let w = generate_sparse(5, d, m, 97, false);
        let p = Proj {
            d,
            m,
            seed: 5,
            weights: &w,
        };
        for level in Level::supported() {
            let mut s = Scratch::new(m, d, true);
            activations(level, p, &x, 3, &mut s);
            for v in 0..3 {
                let want = canonical_sparse(d, m, &w, &x[v * d..(v + 1) * d]);
                for (r, (a, w)) in s.acc().iter().zip(&want).enumerate() {
                    assert_eq!(a[v].to_bits(), w.to_bits(), "{level} {r}");
                }
            }
        }
    }

    #[test]
    fn two_batches_at_once_equal_the_canonical_order_bit_for_bit() {
        // 16 + 5 vectors (batch 1 part full), the -0.0 patterns of the test
        // above among them, several blocks and parts of every length mod 4.
        let (d, m, n) = (1000, 300, 21);
        let x: Vec<f32> = (0..n * d)
            .map(|i| match (i / d, i % 11, i % 97) {
                (0, 0, _) | (17, ..) | (20, _, 1..) => -0.0,
                (v, ..) => (((i + v) * 7919 % 1009) as f32 - 504.0) / 3.0,
            })
            .collect();
        let w = generate_sparse(5, d, m, 97, false);
        let p = Proj {
            d,
            m,
            seed: 5,
            weights: &w,
        };
        let mut tried = false;
        for level in Level::supported().into_iter().filter(|&l| pairs(l, p)) {
            tried = true;
            let mut s = Scratch::new(m, d, true);
            activations_pair(level, p, &x, n, &mut s);
            for v in 0..n {
                let want = canonical_sparse(d, m, &w, &x[v * d..(v + 1) * d]);
                let got = if v < LANES { s.acc() } else { s.acc_second() };
                for (r, (a, w)) in got.iter().zip(&want).enumerate() {
                    assert_eq!(
                        a[v % LANES].to_bits(),
                        w.to_bits(),
                        "{level} vector {v} row {r}"
                    );
                }
            }
        }
        // Without AVX-512 there are no two-batch kernels to test.
        assert_eq!(tried, Level::supported().contains(&Level::Avx512));
    }
}
