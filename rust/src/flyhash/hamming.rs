//! Popcount kernels over packed binary codes: Hamming distance (`a ^ b`) and
//! overlap (`a & b`) between one query and a run of codes.
//!
//! Levels: `scalar` counts bits of 64-bit words portably (no `popcnt`
//! instruction assumed); `avx2` is the same loop compiled with `popcnt`;
//! `avx512` uses AVX-512 VPOPCNTDQ (8 x 64-bit popcounts per instruction, masked
//! loads for the tail) when the CPU has it, else the `popcnt` loop. All levels
//! return exact integer counts, so they agree exactly.

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
    }
}
