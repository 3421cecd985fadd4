//! Explicit AVX-512 and AVX2 versions of the two inner row loops of
//! [`super::kernels`]. They perform exactly the additions of the portable
//! loops, in the same order, one 16-vector lane per `__m512` (or two
//! `__m256`), so every level returns bit-identical activations.
#![cfg(target_arch = "x86_64")]

use std::arch::x86_64::*;

use super::kernels::{Lane, GPW, GW, TS};
use super::plan::Block;

/// Sign rows: `acc[r] += T_g[byte g of row r's word]` for the `groups` tables.
/// `word(r)` yields row `r`'s 64-bit word.
///
/// # Safety
/// The CPU must have AVX-512 F; `tables.len() >= groups * TS`, `groups <= GPW`.
#[target_feature(enable = "avx512f")]
pub unsafe fn sign_rows_avx512(
    acc: &mut [Lane],
    tables: &[Lane],
    groups: usize,
    word: impl Fn(usize) -> u64,
) {
    debug_assert!(groups <= GPW && tables.len() >= groups * TS);
    // A constant group count lets the compiler unroll the lookups with
    // constant shifts (a variable `shr r, cl` costs 3 uops).
    // SAFETY: forwarded contract; G == groups.
    unsafe {
        match groups {
            GPW => sign_rows_avx512_g::<GPW>(acc, tables, word),
            _ => sign_rows_avx512_dyn(acc, tables, groups, word),
        }
    }
}

#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn sign_rows_avx512_g<const G: usize>(
    acc: &mut [Lane],
    tables: &[Lane],
    word: impl Fn(usize) -> u64,
) {
    let t = tables.as_ptr() as *const f32;
    for (r, a) in acc.iter_mut().enumerate() {
        let w = word(r);
        let p = a.as_mut_ptr();
        // SAFETY: `a` is one Lane of 16 f32.
        let mut v = unsafe { _mm512_loadu_ps(p) };
        for gi in 0..G {
            let at = gi * TS + (((w >> (GW * gi)) as usize) & (TS - 1));
            // SAFETY: at < G * TS <= tables.len(); each entry is 16 f32.
            v = _mm512_add_ps(v, unsafe { _mm512_loadu_ps(t.add(at * 16)) });
        }
        // SAFETY: as above.
        unsafe { _mm512_storeu_ps(p, v) };
    }
}

#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn sign_rows_avx512_dyn(
    acc: &mut [Lane],
    tables: &[Lane],
    groups: usize,
    word: impl Fn(usize) -> u64,
) {
    let t = tables.as_ptr() as *const f32;
    for (r, a) in acc.iter_mut().enumerate() {
        let w = word(r);
        let p = a.as_mut_ptr();
        // SAFETY: `a` is one Lane of 16 f32.
        let mut v = unsafe { _mm512_loadu_ps(p) };
        for gi in 0..groups {
            let at = gi * TS + (((w >> (GW * gi)) as usize) & (TS - 1));
            // SAFETY: at < groups * TS <= tables.len(); each entry is 16 f32.
            v = _mm512_add_ps(v, unsafe { _mm512_loadu_ps(t.add(at * 16)) });
        }
        // SAFETY: as above.
        unsafe { _mm512_storeu_ps(p, v) };
    }
}

/// AVX2 twin of [`sign_rows_avx512`].
///
/// # Safety
/// The CPU must have AVX2; same bounds as [`sign_rows_avx512`].
#[target_feature(enable = "avx2")]
pub unsafe fn sign_rows_avx2(
    acc: &mut [Lane],
    tables: &[Lane],
    groups: usize,
    word: impl Fn(usize) -> u64,
) {
    debug_assert!(groups <= GPW && tables.len() >= groups * TS);
    let t = tables.as_ptr() as *const f32;
    for (r, a) in acc.iter_mut().enumerate() {
        let w = word(r);
        let p = a.as_mut_ptr();
        // SAFETY: `a` is one Lane of 16 f32 (two halves of 8).
        let (mut lo, mut hi) = unsafe { (_mm256_loadu_ps(p), _mm256_loadu_ps(p.add(8))) };
        for gi in 0..groups {
            let at = (gi * TS + (((w >> (GW * gi)) as usize) & (TS - 1))) * 16;
            // SAFETY: at / 16 < groups * TS <= tables.len().
            unsafe {
                lo = _mm256_add_ps(lo, _mm256_loadu_ps(t.add(at)));
                hi = _mm256_add_ps(hi, _mm256_loadu_ps(t.add(at + 8)));
            }
        }
        // SAFETY: as above.
        unsafe {
            _mm256_storeu_ps(p, lo);
            _mm256_storeu_ps(p.add(8), hi);
        }
    }
}

/// `(s0 + s1) + (s2 + s3)` over the lanes at byte offsets `offs` from `xt`
/// (see `kernels_sparse::sum4`). Each partial sum starts from its first lane
/// rather than from `0 + lane`: that differs only where the lane is -0.0 and
/// only in the sign of a zero, which no later addition lets through (the
/// activation starts from +0.0, and `a + ±0 = a` for `a != 0`, `+0 + ±0 = +0`).
/// Offsets are read four at a time, one 64-bit load per quad.
macro_rules! sum4 {
    ($ty:ty, $zero:expr, $load:expr, $add:expr, $xt:expr, $offs:expr) => {{
        let xt: *const u8 = $xt;
        let offs: &[u16] = $offs;
        let lane = |o: u64| $load(xt.wrapping_add((o & 0xffff) as usize));
        let mut s: [$ty; 4] = [$zero; 4];
        let mut quads = offs.chunks_exact(4);
        let word = |q: &[u16]| {
            // SAFETY: `q` is 4 u16 = 8 bytes; x86 is little-endian, so q[j] is
            // bits 16j .. 16j + 16.
            unsafe { (q.as_ptr() as *const u64).read_unaligned() }
        };
        if let Some(q) = quads.next() {
            let w = word(q);
            for j in 0..4 {
                s[j] = lane(w >> (16 * j));
            }
        } else {
            for (j, &o) in quads.remainder().iter().enumerate() {
                s[j] = lane(o as u64);
            }
            quads = [].chunks_exact(4);
        }
        for q in &mut quads {
            let w = word(q);
            for j in 0..4 {
                s[j] = $add(s[j], lane(w >> (16 * j)));
            }
        }
        for (j, &o) in quads.remainder().iter().enumerate() {
            s[j] = $add(s[j], lane(o as u64));
        }
        $add($add(s[0], s[1]), $add(s[2], s[3]))
    }};
}

/// How many rows ahead the sparse kernels prefetch a row's activations.
const ROW_AHEAD: usize = 16;

/// Sparse rows of one input block for `W` batches (1 or 2): `acc[w][r] +=
/// P_rb - N_rb` for every row `r` of `blk`, in plan order (see
/// [`super::kernels`] for the additions). With `FIRST` (block 0) `acc[w][r] =
/// 0 + (P_rb - N_rb)`: `acc` need not be cleared. `xt` holds, per input of the
/// block, batch 0's lane, then batch 1's: each offset read serves `W`
/// additions, which is what two batches gain (a quarter fewer instructions per
/// addition; each batch's additions are unchanged).
///
/// # Safety
/// The CPU must have AVX-512 F; every offset of `blk.offs` is `64 * i` with
/// `W * (i + 1) <= xt.len()`, every row is shorter than each `acc[w]`, and the
/// groups cover exactly `blk.rows` and `blk.offs` (all hold for a plan from
/// [`super::plan::Plan::new`] over the block's inputs).
#[target_feature(enable = "avx512f")]
pub unsafe fn sparse_block_avx512<const FIRST: bool, const W: usize>(
    acc: [&mut [Lane]; W],
    xt: &[Lane],
    blk: &Block<'_>,
) {
    let base = xt.as_ptr() as *const u8;
    // `sum4` reads the lane at `base + offset`; input i's W lanes sit at
    // `base + W * offset` (the offset is 64 i): one lea, no extra load.
    let load = |p: *const u8| {
        let at = base.wrapping_add(W * (p as usize - base as usize));
        // SAFETY: `p - base` is an offset of `blk` (see `sum4`), so every lane
        // read lies in `xt` (contract).
        std::array::from_fn::<__m512, W, _>(|w| unsafe {
            _mm512_loadu_ps(at.wrapping_add(64 * w) as *const f32)
        })
    };
    let add = |a: [__m512; W], b: [__m512; W]| std::array::from_fn(|w| _mm512_add_ps(a[w], b[w]));
    let z = [_mm512_setzero_ps(); W];
    let (mut rows, mut offs) = (blk.rows.iter(), blk.offs);
    // Rows come in shape order, so their activations are far apart (L2, and
    // a TLB miss each): ask for the one ROW_AHEAD rows on well in advance.
    let mut ahead = blk.rows.iter().skip(ROW_AHEAD);
    for g in blk.groups {
        let (np, nn) = (g.pos as usize, g.neg as usize);
        for &r in rows.by_ref().take(g.rows as usize) {
            if let Some(&a) = ahead.next() {
                for acc in &acc {
                    // A prefetch never faults, whatever the address (a safe intrinsic here).
                    _mm_prefetch::<_MM_HINT_T0>(acc.as_ptr().wrapping_add(a as usize) as *const i8);
                }
            }
            let (row, rest) = offs.split_at(np + nn);
            offs = rest;
            let sp = sum4!([__m512; W], z, load, add, base, &row[..np]);
            let sn = sum4!([__m512; W], z, load, add, base, &row[np..]);
            for w in 0..W {
                let p = acc[w][r as usize].as_mut_ptr();
                // SAFETY: `p` is one Lane of 16 f32, borrowed mutably through `acc[w]`.
                unsafe {
                    let a = if FIRST { z[w] } else { _mm512_loadu_ps(p) };
                    _mm512_storeu_ps(p, _mm512_add_ps(a, _mm512_sub_ps(sp[w], sn[w])))
                };
            }
        }
    }
}

/// AVX2 twin of [`sparse_block_avx512`] (two 8-float halves per lane).
///
/// # Safety
/// The CPU must have AVX2; same contract as [`sparse_block_avx512`].
#[target_feature(enable = "avx2")]
pub unsafe fn sparse_block_avx2<const FIRST: bool>(acc: &mut [Lane], xt: &[Lane], blk: &Block<'_>) {
    let base = xt.as_ptr() as *const u8;
    // `hb` reads floats 8..16 of each lane.
    let hb = base.wrapping_add(32);
    // SAFETY: only called below on `base + offset` or `hb + offset`, inside a lane of `xt`.
    let load = |p: *const u8| unsafe { _mm256_loadu_ps(p as *const f32) };
    let add = |a: __m256, b: __m256| _mm256_add_ps(a, b);
    let (mut rows, mut offs) = (blk.rows.iter(), blk.offs);
    for g in blk.groups {
        let (np, nn) = (g.pos as usize, g.neg as usize);
        for &r in rows.by_ref().take(g.rows as usize) {
            let (row, rest) = offs.split_at(np + nn);
            offs = rest;
            let (pos, neg) = row.split_at(np);
            let z = _mm256_setzero_ps();
            let lo8 = _mm256_sub_ps(
                sum4!(__m256, z, load, add, base, pos),
                sum4!(__m256, z, load, add, base, neg),
            );
            let hi8 = _mm256_sub_ps(
                sum4!(__m256, z, load, add, hb, pos),
                sum4!(__m256, z, load, add, hb, neg),
            );
            let p = acc[r as usize].as_mut_ptr();
            // SAFETY: `p` is one Lane of 16 f32.
            unsafe {
                let (a, b) = if FIRST {
                    (z, z)
                } else {
                    (_mm256_loadu_ps(p), _mm256_loadu_ps(p.add(8)))
                };
                _mm256_storeu_ps(p, _mm256_add_ps(a, lo8));
                _mm256_storeu_ps(p.add(8), _mm256_add_ps(b, hi8));
            }
        }
    }
}

/// Transposes whole tiles of 16 rows of `acc` (16 vectors each) into `out`:
/// vector `v < nb` gets `out[v * m + r]` for the tiles' rows `r`. Returns how
/// many rows it wrote (`m` rounded down to 16); the caller writes the rest.
///
/// # Safety
/// The CPU must have AVX-512 F; `out.len() == nb * acc.len()`, `nb <= 16`.
#[target_feature(enable = "avx512f")]
pub unsafe fn unpack_avx512(acc: &[Lane], nb: usize, out: &mut [f32]) -> usize {
    let m = acc.len();
    debug_assert!(nb <= 16 && out.len() == nb * m);
    let (lo, hi) = (_mm512_unpacklo_ps, _mm512_unpackhi_ps);
    let pd = _mm512_castps_pd;
    let ps = _mm512_castpd_ps;
    for (t, tile) in acc.chunks_exact(16).enumerate() {
        // SAFETY: each row is one Lane of 16 f32.
        let r: [__m512; 16] = std::array::from_fn(|i| unsafe { _mm512_loadu_ps(tile[i].as_ptr()) });
        // Pairs of rows interleaved, then pairs of pairs: u[4q + c] holds, in
        // 128-bit lane l, column c + 4l of rows 4q .. 4q + 4.
        let mut u = [_mm512_setzero_ps(); 16];
        for q in 0..4 {
            let (a, b, c, d) = (r[4 * q], r[4 * q + 1], r[4 * q + 2], r[4 * q + 3]);
            let (t0, t1, t2, t3) = (lo(a, b), hi(a, b), lo(c, d), hi(c, d));
            u[4 * q] = ps(_mm512_unpacklo_pd(pd(t0), pd(t2)));
            u[4 * q + 1] = ps(_mm512_unpackhi_pd(pd(t0), pd(t2)));
            u[4 * q + 2] = ps(_mm512_unpacklo_pd(pd(t1), pd(t3)));
            u[4 * q + 3] = ps(_mm512_unpackhi_pd(pd(t1), pd(t3)));
        }
        // Gather 128-bit lanes: column c + 4l is lane l of u[c], u[4 + c],
        // u[8 + c], u[12 + c].
        let mut col = [_mm512_setzero_ps(); 16];
        for c in 0..4 {
            let v0 = _mm512_shuffle_f32x4::<0x88>(u[c], u[4 + c]);
            let v1 = _mm512_shuffle_f32x4::<0xdd>(u[c], u[4 + c]);
            let v2 = _mm512_shuffle_f32x4::<0x88>(u[8 + c], u[12 + c]);
            let v3 = _mm512_shuffle_f32x4::<0xdd>(u[8 + c], u[12 + c]);
            col[c] = _mm512_shuffle_f32x4::<0x88>(v0, v2);
            col[c + 8] = _mm512_shuffle_f32x4::<0xdd>(v0, v2);
            col[c + 4] = _mm512_shuffle_f32x4::<0x88>(v1, v3);
            col[c + 12] = _mm512_shuffle_f32x4::<0xdd>(v1, v3);
        }
        for (v, c) in col.iter().enumerate().take(nb) {
            let at = v * m + 16 * t;
            // SAFETY: at + 16 <= v * m + m <= nb * m = out.len().
            unsafe { _mm512_storeu_ps(out.as_mut_ptr().add(at), *c) };
        }
    }
    m / 16 * 16
}
