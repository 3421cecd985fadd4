//! Explicit AVX-512 and AVX2 versions of the two inner row loops of
//! [`super::kernels`]. They perform exactly the additions of the portable
//! loops, in the same order, one 16-vector lane per `__m512` (or two
//! `__m256`), so every level returns bit-identical activations.
#![cfg(target_arch = "x86_64")]

use std::arch::x86_64::*;

use super::kernels::Lane;

/// Sign rows: `acc[r] += T_g[byte g of row r's word]` for the `groups` tables.
/// `word(r)` yields row `r`'s 64-bit word.
///
/// # Safety
/// The CPU must have AVX-512 F; `tables.len() >= groups * 256`, `groups <= 8`.
#[target_feature(enable = "avx512f")]
pub unsafe fn sign_rows_avx512(
    acc: &mut [Lane],
    tables: &[Lane],
    groups: usize,
    word: impl Fn(usize) -> u64,
) {
    debug_assert!(groups <= 8 && tables.len() >= groups * 256);
    let t = tables.as_ptr() as *const f32;
    for (r, a) in acc.iter_mut().enumerate() {
        let w = word(r);
        let p = a.as_mut_ptr();
        // SAFETY: `a` is one Lane of 16 f32.
        let mut v = unsafe { _mm512_loadu_ps(p) };
        for gi in 0..groups {
            let at = gi * 256 + ((w >> (8 * gi)) & 0xff) as usize;
            // SAFETY: at < groups * 256 <= tables.len(); each entry is 16 f32.
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
    debug_assert!(groups <= 8 && tables.len() >= groups * 256);
    let t = tables.as_ptr() as *const f32;
    for (r, a) in acc.iter_mut().enumerate() {
        let w = word(r);
        let p = a.as_mut_ptr();
        // SAFETY: `a` is one Lane of 16 f32 (two halves of 8).
        let (mut lo, mut hi) = unsafe { (_mm256_loadu_ps(p), _mm256_loadu_ps(p.add(8))) };
        for gi in 0..groups {
            let at = (gi * 256 + ((w >> (8 * gi)) & 0xff) as usize) * 16;
            // SAFETY: at / 16 < groups * 256 <= tables.len().
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

macro_rules! sum4 {
    ($ty:ty, $zero:expr, $load:expr, $add:expr, $xt:expr, $idx:expr) => {{
        let xt: *const f32 = $xt;
        let idx: &[u16] = $idx;
        let mut s: [$ty; 4] = [$zero; 4];
        let mut quads = idx.chunks_exact(4);
        for q in &mut quads {
            // Four indices as one little-endian u64, split with shifts: keeps the
            // index arithmetic on the integer ports (LLVM would otherwise build
            // the offsets in a vector register and extract them on the ports the
            // additions need).
            let w = u64::from_le_bytes([
                q[0] as u8,
                (q[0] >> 8) as u8,
                q[1] as u8,
                (q[1] >> 8) as u8,
                q[2] as u8,
                (q[2] >> 8) as u8,
                q[3] as u8,
                (q[3] >> 8) as u8,
            ]);
            let w = std::hint::black_box(w);
            s[0] = $add(s[0], $load(xt.add((w & 0xffff) as usize * 16)));
            s[1] = $add(s[1], $load(xt.add(((w >> 16) & 0xffff) as usize * 16)));
            s[2] = $add(s[2], $load(xt.add(((w >> 32) & 0xffff) as usize * 16)));
            s[3] = $add(s[3], $load(xt.add((w >> 48) as usize * 16)));
        }
        for (k, &i) in quads.remainder().iter().enumerate() {
            s[k] = $add(s[k], $load(xt.add(i as usize * 16)));
        }
        $add($add(s[0], s[1]), $add(s[2], s[3]))
    }};
}

/// Sparse rows: `acc[r] = P_r - N_r` (see [`super::kernels`] for the order).
///
/// # Safety
/// The CPU must have AVX-512 F; every index is `< xt.len()`; `indices` holds
/// `acc.len() * c` entries and `positives[r] <= c`.
#[target_feature(enable = "avx512f")]
pub unsafe fn sparse_rows_avx512(
    acc: &mut [Lane],
    xt: &[Lane],
    indices: &[u16],
    positives: &[u32],
    c: usize,
) {
    let base = xt.as_ptr() as *const f32;
    // SAFETY: only called below on pointers into `xt` (see the caller's contract).
    let load = |p: *const f32| unsafe { _mm512_loadu_ps(p) };
    for (r, a) in acc.iter_mut().enumerate() {
        let row = &indices[r * c..(r + 1) * c];
        let (pos, neg) = row.split_at(positives[r] as usize);
        // SAFETY: indices < xt.len() (the caller's contract), so every load is in bounds.
        let (sp, sn) = unsafe {
            (
                sum4!(
                    __m512,
                    _mm512_setzero_ps(),
                    load,
                    |a, b| _mm512_add_ps(a, b),
                    base,
                    pos
                ),
                sum4!(
                    __m512,
                    _mm512_setzero_ps(),
                    load,
                    |a, b| _mm512_add_ps(a, b),
                    base,
                    neg
                ),
            )
        };
        // SAFETY: `a` is one Lane of 16 f32.
        unsafe { _mm512_storeu_ps(a.as_mut_ptr(), _mm512_sub_ps(sp, sn)) };
    }
}

/// AVX2 twin of [`sparse_rows_avx512`] (two 8-float halves per lane).
///
/// # Safety
/// The CPU must have AVX2; same bounds as [`sparse_rows_avx512`].
#[target_feature(enable = "avx2")]
pub unsafe fn sparse_rows_avx2(
    acc: &mut [Lane],
    xt: &[Lane],
    indices: &[u16],
    positives: &[u32],
    c: usize,
) {
    let base = xt.as_ptr() as *const f32;
    // SAFETY: only called below on pointers into `xt` (see the caller's contract).
    let load = |p: *const f32| unsafe { _mm256_loadu_ps(p) };
    let add = |a: __m256, b: __m256| _mm256_add_ps(a, b);
    for (r, a) in acc.iter_mut().enumerate() {
        let row = &indices[r * c..(r + 1) * c];
        let (pos, neg) = row.split_at(positives[r] as usize);
        // SAFETY: indices < xt.len(); the `hi` half reads floats 8..16 of each lane.
        let (lo, hi) = unsafe {
            let hb = base.add(8);
            (
                _mm256_sub_ps(
                    sum4!(__m256, _mm256_setzero_ps(), load, add, base, pos),
                    sum4!(__m256, _mm256_setzero_ps(), load, add, base, neg),
                ),
                _mm256_sub_ps(
                    sum4!(__m256, _mm256_setzero_ps(), load, add, hb, pos),
                    sum4!(__m256, _mm256_setzero_ps(), load, add, hb, neg),
                ),
            )
        };
        // SAFETY: `a` is one Lane of 16 f32.
        unsafe {
            _mm256_storeu_ps(a.as_mut_ptr(), lo);
            _mm256_storeu_ps(a.as_mut_ptr().add(8), hi);
        }
    }
}
