//! The positions of the values whose magnitude passes a threshold: the mask
//! step of activation-sparse kernels (TEAL's kept inputs and kept neurons).
//!
//! A short call's fixed cost matters there: at 90% sparsity a 576x1536 FFN
//! reads ~270 K weights (5-10 us), and a branchy filter over its 576 inputs
//! and 1536 neurons took ~0.6 us of that. AVX-512 compares 16 values and
//! writes the passing positions with one compress-store, with no branch per
//! value; the portable version writes every position and advances by the
//! comparison's result, which is branch-free too.

use super::Level;

/// Appends to `out` every `i` (ascending) with `|values[i]| > t`; NaN never
/// passes, as with `f32::abs(v) > t`. `t` may be any float (a NaN `t` keeps
/// nothing). Returns how many were appended. The caller keeps `values`
/// shorter than `u32::MAX` (the positions' type; layers check their sizes).
pub fn above(level: Level, values: &[f32], t: f32, out: &mut Vec<u32>) -> usize {
    debug_assert!(values.len() <= u32::MAX as usize, "positions must fit u32");
    let start = out.len();
    // One slot per value: enough for the AVX-512 path's full 16-lane stores
    // too (see `above_avx512`).
    out.reserve(values.len());
    #[cfg(target_arch = "x86_64")]
    if level == Level::Avx512 && level.is_supported() {
        // SAFETY: AVX-512 F (checked against the CPU); `out` has room for
        // `values.len()` more elements (reserved above).
        unsafe { above_avx512(values, t, out) };
        return out.len() - start;
    }
    let _ = level;
    above_portable(values, t, out);
    out.len() - start
}

fn above_portable(values: &[f32], t: f32, out: &mut Vec<u32>) {
    let len = out.len();
    // The spare capacity (reserved by the caller) is written in full, one
    // slot per value, and only the passing ones are kept by the length.
    let spare = &mut out.spare_capacity_mut()[..values.len()];
    let mut n = 0;
    for (i, &v) in values.iter().enumerate() {
        spare[n].write(i as u32);
        n += usize::from(v.abs() > t);
    }
    // SAFETY: slots len..len + n were written above (n <= values.len(), the
    // spare slots' count).
    unsafe { out.set_len(len + n) };
}

/// # Safety
/// The CPU must have AVX-512 F, and `out` spare capacity for `values.len()`
/// more elements.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn above_avx512(values: &[f32], t: f32, out: &mut Vec<u32>) {
    use std::arch::x86_64::*;
    let tv = _mm512_set1_ps(t);
    let step = _mm512_set1_epi32(16);
    let mut pos = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    let mut len = out.len();
    let chunks = values.chunks_exact(16);
    let tail = chunks.remainder();
    for c in chunks {
        // SAFETY: `c` holds 16 f32 (unaligned load).
        let v = _mm512_abs_ps(unsafe { _mm512_loadu_ps(c.as_ptr()) });
        // Ordered compare: a NaN lane is false, as `v.abs() > t` is.
        let m = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(v, tv);
        // Compress in a register and store all 16 lanes: a compress straight
        // to memory is microcoded on AMD (Zen 4: ~5x slower).
        // SAFETY: at most one position per value so far, so `len` is at most
        // the initial length plus this chunk's offset in `values`; the chunk
        // holds 16 values, so the 16 lanes end within the slot per value the
        // caller reserved.
        unsafe {
            _mm512_storeu_si512(
                out.as_mut_ptr().add(len) as *mut _,
                _mm512_maskz_compress_epi32(m, pos),
            )
        };
        len += m.count_ones() as usize;
        pos = _mm512_add_epi32(pos, step);
    }
    let base = (values.len() - tail.len()) as u32;
    for (i, &v) in tail.iter().enumerate() {
        if v.abs() > t {
            // SAFETY: within the reserved capacity, as above.
            unsafe { out.as_mut_ptr().add(len).write(base + i as u32) };
            len += 1;
        }
    }
    // SAFETY: every slot below `len` was written above.
    unsafe { out.set_len(len) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_level_keeps_what_abs_greater_keeps() {
        let mut values: Vec<f32> = (0..1000)
            .map(|i| ((i * 7919 % 1013) as f32 - 506.0) / 100.0)
            .collect();
        values[3] = f32::NAN;
        values[17] = f32::INFINITY;
        values[40] = f32::NEG_INFINITY;
        values[41] = -0.0;
        values[42] = 1.5; // equal to t: not kept (strict)
        values[43] = -1.5;
        for n in [0, 1, 15, 16, 17, 33, 999, 1000] {
            for t in [1.5, 0.0, -1.0, f32::NAN, f32::INFINITY] {
                let want: Vec<u32> = (0..n as u32)
                    .filter(|&i| values[i as usize].abs() > t)
                    .collect();
                for level in Level::supported() {
                    let mut out = vec![7u32];
                    let k = above(level, &values[..n], t, &mut out);
                    assert_eq!(out[0], 7, "{level}");
                    assert_eq!(&out[1..], &want[..], "{level} n={n} t={t}");
                    assert_eq!(k, want.len());
                }
            }
        }
    }
}
