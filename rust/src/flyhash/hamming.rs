//! Popcount kernels over packed binary codes: Hamming distance (`a ^ b`) and
//! overlap (`a & b`) between one query and a run of codes.
//!
//! Levels: `scalar` counts bits of 64-bit words portably (no `popcnt`
//! instruction assumed); `avx2` is the same loop compiled with `popcnt`;
//! `avx512` uses AVX-512 VPOPCNTDQ (8 x 64-bit popcounts per instruction, masked
//! loads for the tail) when the CPU has it, else the `popcnt` loop. All levels
//! return exact integer counts, so they agree exactly.
//!
//! [`counts_tile`] is the search kernel: a block of queries against a run of
//! codes. At the VPOPCNTDQ level it takes codes 8 at a time (their bytes stay in
//! L1 while every query of the block runs over them), keeps one accumulator per
//! code and folds the 8 accumulators into one register of 8 counts with a
//! transposing reduction (7 shuffles for 8 pairs instead of one full horizontal
//! sum per pair).

use crate::simd::Level;

/// Which bitwise combination is counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// `popcount(a ^ b)`: the Hamming distance.
    Xor,
    /// `popcount(a & b)`: the number of shared set bits.
    And,
}

/// Whether this CPU has AVX-512 VPOPCNTDQ (checked once).
pub fn has_vpopcntdq() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *HAS.get_or_init(|| std::arch::is_x86_feature_detected!("avx512vpopcntdq"))
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// The kernel name a level runs (for reports): `scalar`, `popcnt`, `avx512-vpopcntdq`.
pub fn kernel_name(level: Level) -> &'static str {
    match level {
        Level::Avx512 if has_vpopcntdq() => "avx512-vpopcntdq",
        Level::Avx512 | Level::Avx2 => "popcnt",
        Level::Neon => "neon-cnt",
        Level::Scalar => "scalar",
    }
}

/// `out[i] = popcount(q OP codes[i])` for each `nbytes`-byte code in `codes`.
/// `level` must be supported (the caller checked it).
pub fn counts(level: Level, op: Op, q: &[u8], codes: &[u8], out: &mut [u32]) {
    let nbytes = q.len();
    debug_assert!(nbytes > 0 && codes.len() == out.len() * nbytes);
    match level {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the level was checked (AVX-512 F/BW) and VPOPCNTDQ was detected.
        Level::Avx512 if has_vpopcntdq() => unsafe { vpopcntdq(op, q, codes, out) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: every CPU with AVX2 (a checked level) has POPCNT.
        Level::Avx2 | Level::Avx512 => unsafe { popcnt(op, q, codes, out) },
        #[cfg(target_arch = "aarch64")]
        // SAFETY: the level was checked, the CPU has NEON.
        Level::Neon => unsafe { neon(op, q, codes, out) },
        _ => words(op, q, codes, out),
    }
}

/// `out[j * n + i] = popcount(queries[j] OP codes[i])` for the `nq` queries in
/// `queries` (`nq * nbytes`) and the `n` codes in `codes`. `level` must be supported.
pub fn counts_tile(level: Level, op: Op, queries: &[u8], nq: usize, codes: &[u8], out: &mut [u32]) {
    debug_assert!(nq > 0 && queries.len().is_multiple_of(nq));
    let nbytes = queries.len() / nq;
    let n = codes.len() / nbytes.max(1);
    debug_assert!(nbytes > 0 && codes.len() == n * nbytes && out.len() == nq * n);
    match level {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the level was checked (AVX-512 F/BW) and VPOPCNTDQ was detected;
        // the lengths were checked above (debug) and are the caller's contract.
        Level::Avx512 if has_vpopcntdq() => unsafe { vpopcntdq_tile(op, queries, nq, codes, out) },
        _ => {
            for (q, o) in queries.chunks_exact(nbytes).zip(out.chunks_exact_mut(n)) {
                counts(level, op, q, codes, o);
            }
        }
    }
}

#[inline(always)]
fn word(b: &[u8]) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(b);
    u64::from_le_bytes(w)
}

#[inline(always)]
fn one(op: Op, q: &[u8], c: &[u8]) -> u32 {
    let (qw, qt) = q.split_at(q.len() / 8 * 8);
    let (cw, ct) = c.split_at(qw.len());
    let mut n = 0u32;
    for (a, b) in qw.chunks_exact(8).zip(cw.chunks_exact(8)) {
        n += match op {
            Op::Xor => (word(a) ^ word(b)).count_ones(),
            Op::And => (word(a) & word(b)).count_ones(),
        };
    }
    for (a, b) in qt.iter().zip(ct) {
        n += match op {
            Op::Xor => (a ^ b).count_ones(),
            Op::And => (a & b).count_ones(),
        };
    }
    n
}

#[inline(always)]
fn words(op: Op, q: &[u8], codes: &[u8], out: &mut [u32]) {
    for (c, o) in codes.chunks_exact(q.len()).zip(out.iter_mut()) {
        *o = one(op, q, c);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "popcnt")]
unsafe fn popcnt(op: Op, q: &[u8], codes: &[u8], out: &mut [u32]) {
    words(op, q, codes, out)
}

#[cfg(target_arch = "aarch64")]
#[target_feature(enable = "neon")]
unsafe fn neon(op: Op, q: &[u8], codes: &[u8], out: &mut [u32]) {
    words(op, q, codes, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vpopcntdq")]
unsafe fn vpopcntdq(op: Op, q: &[u8], codes: &[u8], out: &mut [u32]) {
    use std::arch::x86_64::*;
    let nb = q.len();
    let full = nb / 64;
    let tail = nb % 64;
    let tail_mask: __mmask64 = if tail == 0 { 0 } else { (1u64 << tail) - 1 };
    let qp = q.as_ptr();
    // The query's 64-byte blocks, loaded once (up to 16 blocks = 8192-bit codes
    // stay in registers; longer codes reload the query from L1).
    let combine = |a: __m512i, b: __m512i| match op {
        Op::Xor => _mm512_xor_si512(a, b),
        Op::And => _mm512_and_si512(a, b),
    };
    for (i, o) in out.iter_mut().enumerate() {
        // SAFETY: code i spans codes[i * nb .. (i + 1) * nb], inside `codes`.
        let cp = unsafe { codes.as_ptr().add(i * nb) };
        let mut acc0 = _mm512_setzero_si512();
        let mut acc1 = _mm512_setzero_si512();
        let mut j = 0;
        while j + 2 <= full {
            // SAFETY: blocks j and j + 1 end at 64 * (j + 2) <= 64 * full <= nb.
            let (a0, b0, a1, b1) = unsafe {
                (
                    _mm512_loadu_si512(qp.add(64 * j) as *const _),
                    _mm512_loadu_si512(cp.add(64 * j) as *const _),
                    _mm512_loadu_si512(qp.add(64 * j + 64) as *const _),
                    _mm512_loadu_si512(cp.add(64 * j + 64) as *const _),
                )
            };
            acc0 = _mm512_add_epi64(acc0, _mm512_popcnt_epi64(combine(a0, b0)));
            acc1 = _mm512_add_epi64(acc1, _mm512_popcnt_epi64(combine(a1, b1)));
            j += 2;
        }
        if j < full {
            // SAFETY: block j ends at 64 * (j + 1) <= nb.
            let (a, b) = unsafe {
                (
                    _mm512_loadu_si512(qp.add(64 * j) as *const _),
                    _mm512_loadu_si512(cp.add(64 * j) as *const _),
                )
            };
            acc0 = _mm512_add_epi64(acc0, _mm512_popcnt_epi64(combine(a, b)));
        }
        if tail != 0 {
            // SAFETY: the mask enables only bytes 64 * full .. nb of both operands.
            let (a, b) = unsafe {
                (
                    _mm512_maskz_loadu_epi8(tail_mask, qp.add(64 * full) as *const _),
                    _mm512_maskz_loadu_epi8(tail_mask, cp.add(64 * full) as *const _),
                )
            };
            acc1 = _mm512_add_epi64(acc1, _mm512_popcnt_epi64(combine(a, b)));
        }
        *o = _mm512_reduce_add_epi64(_mm512_add_epi64(acc0, acc1)) as u32;
    }
}

/// Codes per register tile of [`vpopcntdq_tile`].
#[cfg(target_arch = "x86_64")]
const TILE: usize = 8;

/// Folds 8 accumulators of 8 x u64 into one vector whose lane `c` is the sum of
/// accumulator `c` (three levels of blend + swap + add).
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f")]
fn reduce8(a: [std::arch::x86_64::__m512i; TILE]) -> std::arch::x86_64::__m512i {
    use std::arch::x86_64::*;
    // Level 1: lanes 2i / 2i + 1 of the result = pair sums i of x / y.
    let l1 = |x: __m512i, y: __m512i| {
        let t = _mm512_mask_blend_epi64(0xAA, x, y);
        let u = _mm512_mask_blend_epi64(0xAA, y, x);
        _mm512_add_epi64(t, _mm512_shuffle_epi32::<0x4E>(u))
    };
    // Level 2: the same on 128-bit units (swap units 0<->1, 2<->3).
    let l2 = |x: __m512i, y: __m512i| {
        let t = _mm512_mask_blend_epi64(0xCC, x, y);
        let u = _mm512_mask_blend_epi64(0xCC, y, x);
        _mm512_add_epi64(t, _mm512_shuffle_i64x2::<0b10_11_00_01>(u, u))
    };
    // Level 3: low halves + high halves.
    let l3 = |x: __m512i, y: __m512i| {
        let lo = _mm512_shuffle_i64x2::<0b01_00_01_00>(x, y);
        let hi = _mm512_shuffle_i64x2::<0b11_10_11_10>(x, y);
        _mm512_add_epi64(lo, hi)
    };
    l3(
        l2(l1(a[0], a[1]), l1(a[2], a[3])),
        l2(l1(a[4], a[5]), l1(a[6], a[7])),
    )
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vpopcntdq")]
unsafe fn vpopcntdq_tile(op: Op, queries: &[u8], nq: usize, codes: &[u8], out: &mut [u32]) {
    use std::arch::x86_64::*;
    let nb = queries.len() / nq;
    let n = codes.len() / nb;
    let full = nb / 64;
    let tail = nb % 64;
    let tail_mask: __mmask64 = if tail == 0 { 0 } else { (1u64 << tail) - 1 };
    let combine = |a: __m512i, b: __m512i| match op {
        Op::Xor => _mm512_xor_si512(a, b),
        Op::And => _mm512_and_si512(a, b),
    };
    let tiles = n / TILE;
    for t in 0..tiles {
        // SAFETY: codes t * TILE .. (t + 1) * TILE lie inside `codes` (t < n / TILE).
        let cp = unsafe { codes.as_ptr().add(t * TILE * nb) };
        for j in 0..nq {
            // SAFETY: query j spans queries[j * nb .. (j + 1) * nb].
            let qp = unsafe { queries.as_ptr().add(j * nb) };
            let mut acc = [_mm512_setzero_si512(); TILE];
            for b in 0..full {
                // SAFETY: block b ends at 64 * (b + 1) <= nb of the query and of
                // each code c < TILE of the tile.
                unsafe {
                    let a = _mm512_loadu_si512(qp.add(64 * b) as *const _);
                    for (c, s) in acc.iter_mut().enumerate() {
                        let x = _mm512_loadu_si512(cp.add(c * nb + 64 * b) as *const _);
                        *s = _mm512_add_epi64(*s, _mm512_popcnt_epi64(combine(a, x)));
                    }
                }
            }
            if tail != 0 {
                // SAFETY: the mask enables only bytes 64 * full .. nb of each operand.
                unsafe {
                    let a = _mm512_maskz_loadu_epi8(tail_mask, qp.add(64 * full) as *const _);
                    for (c, s) in acc.iter_mut().enumerate() {
                        let x = _mm512_maskz_loadu_epi8(
                            tail_mask,
                            cp.add(c * nb + 64 * full) as *const _,
                        );
                        *s = _mm512_add_epi64(*s, _mm512_popcnt_epi64(combine(a, x)));
                    }
                }
            }
            let sums = _mm512_cvtepi64_epi32(reduce8(acc));
            // SAFETY: out[j * n + t * TILE .. + TILE] lies inside `out` (len nq * n).
            unsafe { _mm256_storeu_si256(out.as_mut_ptr().add(j * n + t * TILE) as *mut _, sums) };
        }
    }
    let done = tiles * TILE;
    if done < n {
        for j in 0..nq {
            let q = &queries[j * nb..(j + 1) * nb];
            // SAFETY: this function's own features (AVX-512 F/BW, VPOPCNTDQ).
            unsafe {
                vpopcntdq(
                    op,
                    q,
                    &codes[done * nb..],
                    &mut out[j * n + done..(j + 1) * n],
                )
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn naive(op: Op, a: &[u8], b: &[u8]) -> u32 {
        a.iter()
            .zip(b)
            .map(|(x, y)| match op {
                Op::Xor => (x ^ y).count_ones(),
                Op::And => (x & y).count_ones(),
            })
            .sum()
    }

    proptest! {
        #[test]
        fn every_level_counts_exactly(
            nbytes in 1usize..300,
            seed in any::<u64>(),
            n in 1usize..6,
        ) {
            let mut s = super::super::rng::Stream::for_row(seed, 0);
            let q: Vec<u8> = (0..nbytes).map(|_| s.next_u64() as u8).collect();
            let codes: Vec<u8> = (0..nbytes * n).map(|_| s.next_u64() as u8).collect();
            for op in [Op::Xor, Op::And] {
                let want: Vec<u32> = codes.chunks(nbytes).map(|c| naive(op, &q, c)).collect();
                for level in Level::supported() {
                    let mut out = vec![0u32; n];
                    counts(level, op, &q, &codes, &mut out);
                    prop_assert_eq!(&out, &want, "{} {:?}", level, op);
                }
            }
        }

        #[test]
        fn every_level_counts_tiles_exactly(
            nbytes in 1usize..300,
            seed in any::<u64>(),
            n in 1usize..40,
            nq in 1usize..5,
        ) {
            let mut s = super::super::rng::Stream::for_row(seed, 1);
            let qs: Vec<u8> = (0..nbytes * nq).map(|_| s.next_u64() as u8).collect();
            let codes: Vec<u8> = (0..nbytes * n).map(|_| s.next_u64() as u8).collect();
            for op in [Op::Xor, Op::And] {
                let want: Vec<u32> = qs
                    .chunks(nbytes)
                    .flat_map(|q| codes.chunks(nbytes).map(|c| naive(op, q, c)).collect::<Vec<_>>())
                    .collect();
                for level in Level::supported() {
                    let mut out = vec![u32::MAX; n * nq];
                    counts_tile(level, op, &qs, nq, &codes, &mut out);
                    prop_assert_eq!(&out, &want, "{} {:?}", level, op);
                }
            }
        }
    }
}
