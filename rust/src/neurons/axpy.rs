//! `y += a * w`: the down-projection step of a sparse FFN (one neuron's down
//! column scaled by its activation and added to the output), dispatched like
//! [`crate::simd::dot`].

use crate::simd::Level;

/// `y[i] += a * w[i]` for every `i`, at `level` (which the caller has checked).
///
/// # Panics
/// Never: the shorter of the two lengths is used, and callers pass equal ones.
pub fn axpy_at(level: Level, a: f32, w: &[f32], y: &mut [f32]) {
    let n = w.len().min(y.len());
    let (w, y) = (&w[..n], &mut y[..n]);
    match level {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: callers obtain `level` from `simd::level()` or `Level::check()`,
        // which proved the CPU has AVX2 and FMA.
        Level::Avx2 if Level::Avx2.is_supported() => unsafe { avx2(a, w, y) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above, for AVX-512 F (re-checked by the guard).
        Level::Avx512 if Level::Avx512.is_supported() => unsafe { avx512(a, w, y) },
        _ => scalar(a, w, y),
    }
}

/// Portable version; LLVM vectorises it with the baseline instruction set.
fn scalar(a: f32, w: &[f32], y: &mut [f32]) {
    for (yi, wi) in y.iter_mut().zip(w) {
        *yi += a * wi;
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn avx2(a: f32, w: &[f32], y: &mut [f32]) {
    use std::arch::x86_64::*;
    let n = w.len();
    let av = _mm256_set1_ps(a);
    let (pw, py) = (w.as_ptr(), y.as_mut_ptr());
    let mut i = 0;
    while i + 8 <= n {
        // SAFETY: i + 8 <= n = w.len() = y.len(); unaligned loads and stores.
        unsafe {
            let r = _mm256_fmadd_ps(av, _mm256_loadu_ps(pw.add(i)), _mm256_loadu_ps(py.add(i)));
            _mm256_storeu_ps(py.add(i), r);
        }
        i += 8;
    }
    scalar(a, &w[i..], &mut y[i..]);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn avx512(a: f32, w: &[f32], y: &mut [f32]) {
    use std::arch::x86_64::*;
    let n = w.len();
    let av = _mm512_set1_ps(a);
    let (pw, py) = (w.as_ptr(), y.as_mut_ptr());
    let mut i = 0;
    while i + 32 <= n {
        // SAFETY: i + 32 <= n = w.len() = y.len(); unaligned loads and stores.
        unsafe {
            let r0 = _mm512_fmadd_ps(av, _mm512_loadu_ps(pw.add(i)), _mm512_loadu_ps(py.add(i)));
            let r1 = _mm512_fmadd_ps(
                av,
                _mm512_loadu_ps(pw.add(i + 16)),
                _mm512_loadu_ps(py.add(i + 16)),
            );
            _mm512_storeu_ps(py.add(i), r0);
            _mm512_storeu_ps(py.add(i + 16), r1);
        }
        i += 32;
    }
    while i < n {
        let left = (n - i).min(16);
        let mask: __mmask16 = ((1u32 << left) - 1) as __mmask16;
        // SAFETY: the mask enables only lanes i..i+left, all < n.
        unsafe {
            let r = _mm512_fmadd_ps(
                av,
                _mm512_maskz_loadu_ps(mask, pw.add(i)),
                _mm512_maskz_loadu_ps(mask, py.add(i)),
            );
            _mm512_mask_storeu_ps(py.add(i), mask, r);
        }
        i += left;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn every_level_matches_scalar(
            v in prop::collection::vec((-1.0f32..1.0, -1.0f32..1.0), 0..200),
            a in -2.0f32..2.0,
        ) {
            let (w, y0): (Vec<f32>, Vec<f32>) = v.into_iter().unzip();
            let mut want = y0.clone();
            scalar(a, &w, &mut want);
            for level in Level::supported() {
                let mut got = y0.clone();
                axpy_at(level, a, &w, &mut got);
                for (g, e) in got.iter().zip(&want) {
                    prop_assert!((g - e).abs() <= 1e-6, "{level}: {g} vs {e}");
                }
            }
        }
    }
}
