//! Activations as integers for the VNNI kernels: the per-group quantizer and
//! the layout in which the mat-vec meets the packed codes.
//!
//! Each group `k` of `x` becomes `dx_k * xq` with integer `xq` in
//! `[-qmax, qmax]`, `dx_k = max|x_k| / qmax`, rounded half away from zero:
//! `qmax = 32767` (int16), or 8191 for 3-bit codes (see [`Int16Activations`]).
//! `super::vnni` explains why int16 and not ggml's int8.

use super::format::QuantRef;

/// `x` quantized per group to int16 and laid out like the packed codes.
///
/// Word `w` of a row's codes (bytes `2w`, `2w + 1`) holds `F` code fields per
/// byte, `V = 8 / F` bits wide; `part[F p + f][w]` is the activation that meets
/// field `f` (bits `V f ..`) of byte `2w + p`. For 2-, 4- and 8-bit codes a
/// field is a code (`V = bits`): byte `b` of group `k` holds code `b + f * gb`
/// of the group in field `f` (`gb` bytes per group): for 4-bit, code `b` in the
/// low nibble and `g/2 + b` in the high one (GGUF order); for 2-bit, codes
/// `b, b + g/4, b + g/2, b + 3g/4`; for 8-bit, code `b`.
///
/// 3-bit groups are `g/4` bytes of low 2-bit fields (as 2-bit codes) then `g/8`
/// bytes of high bits (bit `j` of byte `h`: code `j g/8 + h`), so a field is one
/// bit (`V = 1`, `F = 8`) and the part carries the bit's weight: `x`, `2x` for
/// the two bits of a low field, `4x` for a high bit. To keep `4x` in int16, 3-bit
/// activations are quantized to 14 bits (`dx_k = max|x_k| / 8191`).
pub(crate) struct Int16Activations {
    pub(super) part: Vec<Vec<i16>>,
    /// `dx_k` per group (padded to a multiple of 16 with zeros).
    pub(super) dx: Vec<f32>,
    /// `dx_k * sum(xq_k)` per group (padded likewise).
    pub(super) sums: Vec<f32>,
    /// Per 64-byte chunk `j` of a block of 16 groups, the group (0..16) of each
    /// 4-byte lane: `(64 j + 4 L) / gb`.
    pub(super) lane_groups: Vec<[i32; 16]>,
}

/// Width in bits of the code fields the kernel reads for `bits`-bit codes.
pub(super) const fn field_bits(bits: u32) -> u32 {
    if bits == 3 {
        1
    } else {
        bits
    }
}

impl Int16Activations {
    /// Caller: [`super::vnni::applies`] holds for `q`.
    pub fn new(q: &QuantRef<'_>, x: &[f32]) -> Int16Activations {
        let g = q.params.group_size;
        let bits = q.params.bits as usize;
        let fields = 8 / field_bits(bits as u32) as usize;
        let gb = g * bits / 8; // bytes per group
        let ng = q.groups();
        let rb = q.params.row_bytes(q.cols);
        // Words per row, rounded up to whole 64-byte chunks (32 words).
        let words = rb.div_ceil(64) * 32;
        let mut part = vec![vec![0i16; words]; 2 * fields];
        let mut dx = vec![0f32; ng.div_ceil(16) * 16];
        let mut sums = vec![0f32; dx.len()];
        let qmax = if bits == 3 { 8191.0 } else { 32767.0 };
        let mut xq = [0i16; 256];
        for k in 0..ng {
            let src = &x[(k * g).min(x.len())..((k + 1) * g).min(x.len())];
            xq.fill(0);
            let (d, total) = quantize_group(src, &mut xq[..src.len()], qmax);
            for b in 0..gb {
                let byte = k * gb + b;
                let (w, p) = (byte / 2, byte % 2);
                for f in 0..fields {
                    part[fields * p + f][w] = if bits != 3 {
                        xq[b + f * gb]
                    } else if b < g / 4 {
                        // bit f of a low byte: bit f % 2 of code b + (f / 2) g/4
                        xq[b + (f / 2) * (g / 4)] << (f % 2)
                    } else {
                        // bit f of high byte b - g/4: the 4s bit of code f g/8 + (b - g/4)
                        xq[f * (g / 8) + b - g / 4] << 2
                    };
                }
            }
            dx[k] = d;
            sums[k] = d * total as f32;
        }
        let lane_groups = (0..16 * gb / 64)
            .map(|j| std::array::from_fn(|l| ((64 * j + 4 * l) / gb) as i32))
            .collect();
        Int16Activations {
            part,
            dx,
            sums,
            lane_groups,
        }
    }
}

/// One group of activations to integers: writes `dst[i] = round(src[i] / dx)`
/// with `dx = max|src| / qmax` (round half away from zero; `qmax` <= 32767) and returns
/// `(dx, sum(dst))`. `dx` is 0 for an all-zero group, whose codes are all 0.
/// `dst` has `src`'s length.
///
/// The batched mat-mul quantizes `n x cols` values per call and every mat-vec
/// `cols` of them, so the AVX-512 path matters: compiled from the plain loop,
/// LLVM kept the maximum a serial chain and scalarised the conversion (5 us of
/// a 11 us call at 4,096 columns). Both paths give the same bits.
pub(crate) fn quantize_group(src: &[f32], dst: &mut [i16], qmax: f32) -> (f32, i32) {
    let (d, total) = quantize_group_normal(src, dst, qmax);
    if d > 0.0 && d < f32::MIN_POSITIVE {
        // A group of tiny values (max below ~4e-34): its step is subnormal and
        // `1 / step` overflows, which zeroed or saturated the codes. The codes
        // of the group scaled by 2^64 (exact) are the right ones; its step is
        // then scaled back (subnormal, so with fewer bits, as such values are).
        const UP: f32 = 18446744073709551616.0; // 2^64
        let scaled: Vec<f32> = src.iter().map(|v| v * UP).collect();
        let (d, total) = quantize_group_normal(&scaled, dst, qmax);
        return (d / UP, total);
    }
    (d, total)
}

fn quantize_group_normal(src: &[f32], dst: &mut [i16], qmax: f32) -> (f32, i32) {
    assert_eq!(src.len(), dst.len());
    #[cfg(target_arch = "x86_64")]
    if super::vnni::available() {
        // SAFETY: `available` saw AVX-512 F/BW/VL; the lengths are equal.
        return unsafe { quantize_group_avx512(src, dst, qmax) };
    }
    quantize_group_plain(src, dst, qmax)
}

fn quantize_group_plain(src: &[f32], dst: &mut [i16], qmax: f32) -> (f32, i32) {
    let amax = src.iter().fold(0f32, |a, v| a.max(v.abs()));
    let d = amax / qmax;
    let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
    let mut total = 0i32;
    for (o, v) in dst.iter_mut().zip(src) {
        *o = (v * inv).round().clamp(-qmax, qmax) as i16;
        total += *o as i32;
    }
    (d, total)
}

/// [`quantize_group_plain`] in AVX-512, 16 values per step (a masked tail).
///
/// # Safety
/// The CPU has AVX-512 F/BW/VL; `dst.len() == src.len()`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn quantize_group_avx512(src: &[f32], dst: &mut [i16], qmax: f32) -> (f32, i32) {
    use std::arch::x86_64::*;
    let n = src.len();
    let mask = |i: usize| -> __mmask16 { (u32::MAX >> (32 - (n - i).min(16))) as u16 };
    // max(|v|, m) keeps m where v is NaN, as `f32::max` ignores NaN.
    let mut m = _mm512_setzero_ps();
    for i in (0..n).step_by(16) {
        // SAFETY: the mask covers elements i..min(i + 16, n) of `src` only.
        let v = unsafe { _mm512_maskz_loadu_ps(mask(i), src.as_ptr().add(i)) };
        m = _mm512_max_ps(_mm512_abs_ps(v), m);
    }
    let d = _mm512_reduce_max_ps(m) / qmax;
    let inv = _mm512_set1_ps(if d > 0.0 { 1.0 / d } else { 0.0 });
    // round(a) = trunc(a + copysign(0.5 - 2^-25, a)): exact for every float,
    // unlike trunc(a + 0.5), which rounds 0.49999997 up.
    let half = _mm512_set1_epi32(0.49999997f32.to_bits() as i32);
    let sign = _mm512_set1_epi32(i32::MIN);
    let (lo, hi) = (_mm512_set1_ps(-qmax), _mm512_set1_ps(qmax));
    let mut total = _mm512_setzero_si512();
    for i in (0..n).step_by(16) {
        let k = mask(i);
        // SAFETY: as above.
        let a = _mm512_mul_ps(
            unsafe { _mm512_maskz_loadu_ps(k, src.as_ptr().add(i)) },
            inv,
        );
        let h = _mm512_or_si512(half, _mm512_and_si512(_mm512_castps_si512(a), sign));
        let r = _mm512_roundscale_ps::<{ _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC }>(_mm512_add_ps(
            a,
            _mm512_castsi512_ps(h),
        ));
        // NaN lanes become 0, as `as i16` makes them (the clamp would not keep
        // them NaN: vmaxps returns its second operand on NaN).
        let ord = _mm512_cmp_ps_mask::<_CMP_ORD_Q>(r, r);
        let r = _mm512_min_ps(_mm512_max_ps(r, lo), hi);
        let q = _mm512_maskz_cvttps_epi32(ord, r);
        total = _mm512_add_epi32(total, q);
        // SAFETY: the mask covers elements i..min(i + 16, n) of `dst` (= n long).
        unsafe { _mm512_mask_cvtepi32_storeu_epi16(dst.as_mut_ptr().add(i) as *mut _, k, q) };
    }
    (d, _mm512_reduce_add_epi32(total))
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;

    /// A group of tiny values (subnormal step) keeps its codes: they once
    /// came out zero or saturated, as `1 / step` overflowed.
    #[test]
    fn a_group_of_tiny_values_keeps_its_codes() {
        for scale in [1e-30f32, 1e-35, 1e-37, 1e-38, 1e-40] {
            let src: Vec<f32> = [1.0f32, -0.5, 0.25, 0.0, -1.0, 0.125]
                .map(|v| v * scale)
                .to_vec();
            let mut q = vec![0i16; src.len()];
            let (d, total) = quantize_group(&src, &mut q, 32767.0);
            assert_eq!(q[0], 32767, "{scale:e}: {q:?}");
            assert_eq!(total, q.iter().map(|&c| c as i32).sum::<i32>());
            for (v, c) in src.iter().zip(&q) {
                let back = d as f64 * *c as f64;
                // Subnormal steps carry fewer bits: 2^-149 absolute at most.
                let tol = (v.abs() as f64) * 1e-4 + d as f64 + 1.5e-45 * 32767.0;
                assert!(
                    (back - *v as f64).abs() <= tol,
                    "{scale:e}: {v:e} vs {back:e}"
                );
            }
        }
    }

    /// The AVX-512 group quantizer gives the plain loop's bits: ties, values
    /// just under a tie, tails shorter than a vector, zeros, NaN and infinity.
    #[test]
    fn group_quantizer_matches_the_plain_loop() {
        if !super::super::vnni::available() {
            return;
        }
        // With max |v| = 32767 the step is exactly 1, so these are the codes' ties.
        let mut special = vec![32767.0f32, 0.5, -0.5, 1.5, -2.5, 0.49999997, -0.49999997];
        special.extend([32766.5, -32766.5, 7.5000005, 0.0, -0.0, 1e-30, 3.0]);
        let mut cases = vec![
            special,
            vec![0.0; 32],
            vec![f32::NAN, 1.0, -2.0],
            vec![f32::INFINITY, 1.0],
        ];
        let mut state = 12345u32;
        for len in [1, 15, 16, 17, 31, 64, 100, 256] {
            cases.push(
                (0..len)
                    .map(|_| {
                        state = state.wrapping_mul(1664525).wrapping_add(1013904223);
                        (state >> 8) as f32 / (1 << 20) as f32 - 8.0
                    })
                    .collect(),
            );
        }
        for src in cases {
            let (mut a, mut b) = (vec![0i16; src.len()], vec![0i16; src.len()]);
            let pa = quantize_group_plain(&src, &mut a, 32767.0);
            // SAFETY: `available` saw AVX-512 F/BW/VL; equal lengths.
            let pb = unsafe { quantize_group_avx512(&src, &mut b, 32767.0) };
            assert_eq!(a, b, "{src:?}");
            assert_eq!(pa.0.to_bits(), pb.0.to_bits(), "{src:?}");
            assert_eq!(pa.1, pb.1, "{src:?}");
        }
    }
}
