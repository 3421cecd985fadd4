//! Projection kernels: the activations of a batch of up to 16 input vectors
//! (at the AVX-512 level the sparse kernel takes two batches per call, see
//! [`activations_pair`]: the same additions per vector).
//!
//! The 16 vectors of a batch sit side by side in "lanes" (`[f32; 16]`, one
//! AVX-512 register, two AVX2 registers, four SSE2/NEON registers). Every lane
//! runs the very same sequence of IEEE float additions, in an order fixed here,
//! so the activations (and thus the codes) are bit-identical at every SIMD
//! level: the levels differ only in how many lanes one instruction covers.
//! Rust never contracts or reassociates float arithmetic, which is what makes
//! the per-level copies of one generic body (`#[target_feature]` wrappers,
//! vectorised by LLVM) safe to compare bit for bit.
//!
//! Canonical arithmetic (per vector `x`):
//! - Sign / seeded: inputs are cut into groups of 4. For each group a table of
//!   the 16 signed sums is built: `T[0] = ((-x0) - x1) - x2) - x3`,
//!   `T[b] = T[b & (b - 1)] + (x_t + x_t)` with `t` the lowest set bit of `b`.
//!   Activation `r` = `((0 + T_0[nib_0]) + T_1[nib_1]) + ...`, where `nib_g`
//!   is bits `4g .. 4g + 4` of row `r`'s bits. One lookup replaces 4 multiply-adds
//!   for 16 vectors; the 16 tables of a 64-bit word fill 16 KiB (L1).
//! - Sparse: inputs are cut into blocks of 384 (their 16 lanes fill 24 KiB, in
//!   L1). Per block `b`, the row's +1 connections into it (`P_b`) and its -1
//!   connections (`N_b`) are summed in stored order into four partial sums by
//!   position mod 4, combined as `(s0 + s1) + (s2 + s3)`; activation =
//!   `((0 + (P_0 - N_0)) + (P_1 - N_1)) + ...`. Rows are independent, so the
//!   order they are computed in ([`super::plan`]: by part lengths, see
//!   `kernels_sparse`) does not change any activation. The AVX2/AVX-512
//!   kernels start each partial sum from its first lane instead of `0 + lane`:
//!   that can only make an all-`-0.0` partial sum `-0.0` instead of `+0.0`, a
//!   zero sign that no later addition keeps (the activation starts from `+0.0`),
//!   so they stay bit-identical to the literal order above (tested at every
//!   level against a row-by-row implementation of it, `-0.0` inputs included).

use super::projection::{sign_word, Weights, SPARSE_BLOCK};
use crate::simd::Level;

/// Vectors per batch.
pub const LANES: usize = 16;
/// One value per vector of a batch.
pub type Lane = [f32; LANES];

pub(super) const ZERO: Lane = [0.0; LANES];

/// Rows per block of the sign kernel.
const ROW_BLOCK: usize = 2048;

#[inline(always)]
pub(super) fn add(a: &mut Lane, b: &Lane) {
    for i in 0..LANES {
        a[i] += b[i];
    }
}

#[inline(always)]
pub(super) fn plus(a: &Lane, b: &Lane) -> Lane {
    let mut o = *a;
    add(&mut o, b);
    o
}

/// A lane on a 64-byte boundary: loading it never touches two cache lines.
#[repr(C, align(64))]
#[derive(Clone, Copy)]
pub(super) struct Aligned(Lane);

const _: () = assert!(std::mem::size_of::<Aligned>() == std::mem::size_of::<Lane>());

pub(super) fn lanes(a: &[Aligned]) -> &[Lane] {
    // SAFETY: `Aligned` is `repr(C)` around one `Lane` and has its size (checked
    // above), so `a.len()` Aligned are `a.len()` contiguous Lanes.
    unsafe { std::slice::from_raw_parts(a.as_ptr() as *const Lane, a.len()) }
}

pub(super) fn lanes_mut(a: &mut [Aligned]) -> &mut [Lane] {
    // SAFETY: as in `lanes`; the borrow is exclusive.
    unsafe { std::slice::from_raw_parts_mut(a.as_mut_ptr() as *mut Lane, a.len()) }
}

/// Per-thread working memory of the kernels, reused across batches.
pub struct Scratch {
    m: usize,
    /// `m` activations per lane (sparse: `2 m`, room for two batches).
    pub(super) acc: Vec<Aligned>,
    tables: Vec<Lane>,
    pub(super) xt: Vec<Aligned>,
}

impl Scratch {
    pub fn new(m: usize, d: usize, sparse: bool) -> Self {
        Scratch {
            m,
            // Sparse: room for two batches (see `kernels_sparse::sparse_pair`).
            acc: vec![Aligned(ZERO); if sparse { 2 * m } else { m }],
            tables: if sparse {
                Vec::new()
            } else {
                vec![ZERO; GPW * TS]
            },
            xt: if sparse {
                vec![Aligned(ZERO); 2 * d.min(SPARSE_BLOCK)]
            } else {
                Vec::new()
            },
        }
    }

    /// The activations of the last [`activations`] call: `m` lanes (`2 m`
    /// after [`activations_pair`]: batch 0's, then batch 1's).
    pub fn acc(&self) -> &[Lane] {
        &lanes(&self.acc)[..self.m]
    }

    /// Batch 1's activations after [`activations_pair`]: `m` lanes.
    pub fn acc_second(&self) -> &[Lane] {
        lanes(&self.acc).get(self.m..2 * self.m).unwrap_or(&[])
    }
}

/// What the kernels read: the projection and its dimensions.
#[derive(Clone, Copy)]
pub struct Proj<'a> {
    pub d: usize,
    pub m: usize,
    pub seed: u64,
    pub weights: &'a Weights,
}

/// Fills `scratch.acc[..m]` with the activations of the `nb <= 16` vectors in
/// `x` (`nb * d` floats, row-major). Lanes past `nb` hold those of zero vectors.
/// `level` must be supported (checked by the caller).
pub fn activations(level: Level, p: Proj<'_>, x: &[f32], nb: usize, s: &mut Scratch) {
    debug_assert!(nb <= LANES && x.len() == nb * p.d && level.is_supported());
    match level {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: callers pass a level that `Level::check` accepted, so the CPU has AVX2+FMA.
        Level::Avx2 => unsafe { avx2(p, x, nb, s) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above, the CPU has AVX-512 F/BW/VL.
        Level::Avx512 => unsafe { avx512(p, x, nb, s) },
        #[cfg(target_arch = "aarch64")]
        // SAFETY: as above, the CPU has NEON.
        Level::Neon => unsafe { neon(p, x, nb, s) },
        _ => body(Level::Scalar, p, x, nb, s),
    }
}

/// Whether [`activations_pair`] serves `p` at `level` (two batches per call:
/// the sparse projection at the AVX-512 level).
pub fn pairs(level: Level, p: Proj<'_>) -> bool {
    level == Level::Avx512 && level.is_supported() && matches!(p.weights, Weights::Sparse { .. })
}

/// [`activations`] for up to 32 vectors (`nb <= 32`) as two batches: batch 0's
/// in `scratch.acc()`, batch 1's in `scratch.acc_second()`, bit-identical to
/// two [`activations`] calls. Only where [`pairs`] says so (panics otherwise).
pub fn activations_pair(level: Level, p: Proj<'_>, x: &[f32], nb: usize, s: &mut Scratch) {
    // Checked, not debug-asserted: more vectors would be written into the
    // lanes of the next inputs, and a foreign level would run AVX-512 code.
    assert!(nb <= 2 * LANES && x.len() == nb * p.d && pairs(level, p));
    #[cfg(target_arch = "x86_64")]
    if let Weights::Sparse { plan, .. } = p.weights {
        // SAFETY: `pairs` checked that the CPU has AVX-512 F.
        unsafe { super::kernels_sparse::sparse_pair_avx512(p, plan, x, nb, s) };
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn avx2(p: Proj<'_>, x: &[f32], nb: usize, s: &mut Scratch) {
    body(Level::Avx2, p, x, nb, s)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn avx512(p: Proj<'_>, x: &[f32], nb: usize, s: &mut Scratch) {
    body(Level::Avx512, p, x, nb, s)
}

#[cfg(target_arch = "aarch64")]
#[target_feature(enable = "neon")]
unsafe fn neon(p: Proj<'_>, x: &[f32], nb: usize, s: &mut Scratch) {
    body(Level::Neon, p, x, nb, s)
}

#[inline(always)]
fn body(level: Level, p: Proj<'_>, x: &[f32], nb: usize, s: &mut Scratch) {
    match p.weights {
        Weights::Sign(bits) => sign(level, p, Some(bits), x, nb, s),
        Weights::Seeded => sign(level, p, None, x, nb, s),
        Weights::Sparse { plan, .. } => super::kernels_sparse::sparse(level, p, plan, x, nb, s),
    }
}

/// Writes lane `v < nb` of `acc` to `out[v * m .. (v + 1) * m]` (`m = acc.len()`):
/// one vector's activations per row. Rows go in blocks that stay in L1, so
/// `acc` is read from L2/L3 once rather than once per vector. At the AVX-512
/// level, tiles of 16 x 16 are transposed in registers. `level` must be
/// supported (checked by the caller); values are only moved, so every level
/// writes the same bytes.
pub fn unpack(level: Level, acc: &[Lane], nb: usize, out: &mut [f32]) {
    const RB: usize = 64;
    let m = acc.len();
    assert!(nb <= LANES && out.len() == nb * m);
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if level == Level::Avx512 {
        // SAFETY: the level was checked; out holds nb * m floats (asserted).
        done = unsafe { super::kernels_x86::unpack_avx512(acc, nb, out) };
    }
    let _ = level;
    for (b, blk) in acc[done..].chunks(RB).enumerate() {
        for v in 0..nb {
            let at = v * m + done + b * RB;
            for (o, a) in out[at..at + blk.len()].iter_mut().zip(blk) {
                *o = a[v];
            }
        }
    }
}

/// Inputs per table group, entries per table, groups per 64-bit row word.
pub const GW: usize = 4;
pub const TS: usize = 1 << GW;
pub const GPW: usize = 64 / GW;

/// Builds the `TS`-entry tables of groups `g0 .. g0 + groups` (`GW` inputs each).
#[inline(always)]
fn build_tables(d: usize, g0: usize, groups: usize, x: &[f32], nb: usize, tables: &mut [Lane]) {
    for gi in 0..groups {
        let base = GW * (g0 + gi);
        let mut xs = [ZERO; GW];
        for (i, lane) in xs.iter_mut().enumerate() {
            if base + i < d {
                for v in 0..nb {
                    lane[v] = x[v * d + base + i];
                }
            }
        }
        let t = &mut tables[gi * TS..(gi + 1) * TS];
        let mut t0 = ZERO;
        for v in 0..LANES {
            let mut acc = -xs[0][v];
            for lane in &xs[1..] {
                acc -= lane[v];
            }
            t0[v] = acc;
        }
        t[0] = t0;
        let mut twice = [ZERO; GW];
        for (tw, lane) in twice.iter_mut().zip(&xs) {
            *tw = plus(lane, lane);
        }
        for b in 1..TS {
            t[b] = plus(&t[b & (b - 1)], &twice[b.trailing_zeros() as usize]);
        }
    }
}

#[inline(always)]
fn sign(
    level: Level,
    p: Proj<'_>,
    stored: Option<&Vec<u8>>,
    x: &[f32],
    nb: usize,
    s: &mut Scratch,
) {
    let (d, m) = (p.d, p.m);
    let rb = super::projection::sign_row_bytes(d);
    s.acc[..m].fill(Aligned(ZERO));
    // Rows are taken in blocks of ROW_BLOCK (their activations, 128 KiB, stay in
    // L2) and, within a block, in passes of one 64-bit word of each row: 16
    // groups of 4 inputs, whose tables (16 x 16 lanes = 16 KiB) stay in L1.
    // Tables are rebuilt per block (16 x 15 additions per pass against
    // ROW_BLOCK x 16 lookups). The sum order does not depend on the blocking:
    // groups in ascending order.
    let total = d.div_ceil(GW);
    for r0 in (0..m).step_by(ROW_BLOCK) {
        let acc = lanes_mut(&mut s.acc[r0..m.min(r0 + ROW_BLOCK)]);
        for w in 0..total.div_ceil(GPW) {
            let groups = GPW.min(total - GPW * w);
            build_tables(d, GPW * w, groups, x, nb, &mut s.tables);
            let tables = &s.tables[..groups * TS];
            let word = move |r: usize| match stored {
                Some(bits) => {
                    let at = (r0 + r) * rb + 8 * w;
                    // Rows are 192 bytes apart (d = 1536): ask for the word 32 rows
                    // ahead so the L2 -> L1 trip overlaps the lookups.
                    #[cfg(target_arch = "x86_64")]
                    // SAFETY: a prefetch never faults, whatever the address.
                    unsafe {
                        use std::arch::x86_64::*;
                        _mm_prefetch::<_MM_HINT_T0>(
                            bits.as_ptr().wrapping_add(at + 32 * rb) as *const i8
                        );
                    }
                    let mut b = [0u8; 8];
                    b.copy_from_slice(&bits[at..at + 8]);
                    u64::from_le_bytes(b)
                }
                None => sign_word(p.seed, d, r0 + r, w),
            };
            #[cfg(target_arch = "x86_64")]
            match level {
                Level::Avx512 => {
                    // SAFETY: the level was checked; groups <= GPW and tables hold groups * TS lanes.
                    unsafe { super::kernels_x86::sign_rows_avx512(acc, tables, groups, word) };
                    continue;
                }
                Level::Avx2 => {
                    // SAFETY: as above, with AVX2.
                    unsafe { super::kernels_x86::sign_rows_avx2(acc, tables, groups, word) };
                    continue;
                }
                _ => {}
            }
            if groups == GPW {
                sign_rows_g::<GPW>(acc, tables, word);
                continue;
            }
            for (r, a) in acc.iter_mut().enumerate() {
                let word = word(r);
                let mut v = *a;
                for (gi, t) in tables.chunks_exact(TS).enumerate() {
                    add(&mut v, &t[((word >> (GW * gi)) as usize) & (TS - 1)]);
                }
                *a = v;
            }
        }
    }
}

/// Portable sign rows with a constant group count (unrolled, constant shifts).
#[inline(always)]
fn sign_rows_g<const G: usize>(acc: &mut [Lane], tables: &[Lane], word: impl Fn(usize) -> u64) {
    for (r, a) in acc.iter_mut().enumerate() {
        let w = word(r);
        let mut v = *a;
        for gi in 0..G {
            add(
                &mut v,
                &tables[gi * TS + (((w >> (GW * gi)) as usize) & (TS - 1))],
            );
        }
        *a = v;
    }
}

#[cfg(test)]
mod tests {
    use super::super::projection::{generate_sign, generate_sparse};
    use super::*;

    fn reference(p: Proj<'_>, x: &[f32]) -> Vec<f64> {
        let d = p.d;
        let indices = match p.weights {
            Weights::Sparse { plan, .. } => plan.row_major().0,
            _ => Vec::new(),
        };
        (0..p.m)
            .map(|r| match p.weights {
                Weights::Sign(bits) => (0..d)
                    .map(|i| {
                        let on = bits[r * d.div_ceil(64) * 8 + i / 8] >> (i % 8) & 1 == 1;
                        if on {
                            x[i] as f64
                        } else {
                            -(x[i] as f64)
                        }
                    })
                    .sum(),
                Weights::Sparse { c, signs, .. } => (0..*c)
                    .map(|j| {
                        let i = indices[r * c + j] as usize;
                        let neg = signs[r * c.div_ceil(8) + j / 8] >> (j % 8) & 1 == 1;
                        if neg {
                            -(x[i] as f64)
                        } else {
                            x[i] as f64
                        }
                    })
                    .sum(),
                Weights::Seeded => unreachable!(),
            })
            .collect()
    }

    #[test]
    fn unpack_is_the_same_at_every_level() {
        for (m, nb) in [(37, 16), (64, 5), (200, 1), (15, 16)] {
            let acc: Vec<Lane> = (0..m)
                .map(|r| std::array::from_fn(|v| (r * 16 + v) as f32 - 0.5))
                .collect();
            let mut want = vec![0f32; nb * m];
            for v in 0..nb {
                for r in 0..m {
                    want[v * m + r] = acc[r][v];
                }
            }
            for level in Level::supported() {
                let mut out = vec![f32::NAN; nb * m];
                unpack(level, &acc, nb, &mut out);
                assert_eq!(out, want, "{level} {m} {nb}");
            }
        }
    }

    #[test]
    fn every_level_is_bit_identical_and_close_to_f64() {
        let (d, m) = (77, 130);
        let x: Vec<f32> = (0..5 * d)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0)
            .collect();
        let sign_w = Weights::Sign(generate_sign(9, d, m));
        let sparse_w = generate_sparse(9, d, m, 11, false);
        let seeded_w = Weights::Seeded;
        for w in [&sign_w, &sparse_w, &seeded_w] {
            let p = Proj {
                d,
                m,
                seed: 9,
                weights: w,
            };
            let mut first: Option<Vec<Lane>> = None;
            for level in Level::supported() {
                let mut s = Scratch::new(m, d, matches!(w, Weights::Sparse { .. }));
                activations(level, p, &x, 5, &mut s);
                match &first {
                    None => first = Some(s.acc().to_vec()),
                    Some(f) => {
                        for (a, b) in f.iter().zip(s.acc()) {
                            for v in 0..LANES {
                                assert_eq!(a[v].to_bits(), b[v].to_bits(), "{level}");
                            }
                        }
                    }
                }
            }
            let acc = first.unwrap();
            let ref_p = Proj {
                weights: if matches!(w, Weights::Seeded) {
                    &sign_w
                } else {
                    w
                },
                ..p
            };
            for v in 0..5 {
                let want = reference(ref_p, &x[v * d..(v + 1) * d]);
                for r in 0..m {
                    assert!((acc[r][v] as f64 - want[r]).abs() < 1e-3, "{r} {v}");
                }
            }
            for lane in &acc {
                assert!(lane[5..].iter().all(|&a| a == 0.0));
            }
        }
    }
}
