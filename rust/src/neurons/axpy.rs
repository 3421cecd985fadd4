//! `y += a * w`: the down-projection step of a sparse FFN (one neuron's down
//! column scaled by its activation and added to the output), dispatched like
//! [`crate::simd::dot`]; and `y += a_0 w_0 + ... + a_{N-1} w_{N-1}`, which the
//! input-sparse FFN uses to add several kept inputs' columns per pass over `y`.

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

/// `y[i] += a[0] * w[0][i] + ... + a[N-1] * w[N-1][i]` for every `i`, at
/// `level` (which the caller has checked). One load and store of `y` per `N`
/// columns instead of per column.
///
/// # Panics
/// Never: the shortest length is used, and callers pass equal ones.
pub fn axpy_n_at<const N: usize>(level: Level, a: [f32; N], w: [&[f32]; N], y: &mut [f32]) {
    let n = w.iter().map(|w| w.len()).fold(y.len(), usize::min);
    let w: [&[f32]; N] = std::array::from_fn(|q| &w[q][..n]);
    let y = &mut y[..n];
    match level {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: callers obtain `level` from `simd::level()` or `Level::check()`,
        // and the guard re-checks that the CPU has AVX-512 F.
        Level::Avx512 if Level::Avx512.is_supported() => unsafe { avx512_n(a, w, y) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above, for AVX2 and FMA (the loop below, widened by LLVM).
        Level::Avx2 if Level::Avx2.is_supported() => unsafe { avx2_n(a, w, y) },
        _ => scalar_n(a, w, y),
    }
}

#[inline(always)]
fn scalar_n<const N: usize>(a: [f32; N], w: [&[f32]; N], y: &mut [f32]) {
    for (i, yi) in y.iter_mut().enumerate() {
        let mut v = *yi;
        for q in 0..N {
            v = a[q].mul_add(w[q][i], v);
        }
        *yi = v;
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn avx2_n<const N: usize>(a: [f32; N], w: [&[f32]; N], y: &mut [f32]) {
    scalar_n(a, w, y);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn avx512_n<const N: usize>(a: [f32; N], w: [&[f32]; N], y: &mut [f32]) {
    use std::arch::x86_64::*;
    let n = y.len();
    let av: [__m512; N] = std::array::from_fn(|q| _mm512_set1_ps(a[q]));
    let py = y.as_mut_ptr();
    let mut i = 0;
    // Four vectors per step: each vector's `N` adds are one dependent chain
    // (4 cycles a link), and two chains in flight (the compiler's unrolling)
    // left the loop waiting on them: 8 cycles per 16 values at N = 4.
    while i + 64 <= n {
        // SAFETY: i + 64 <= n, the length of `y` and of every `w[q]`.
        unsafe {
            let mut v: [__m512; 4] = std::array::from_fn(|u| _mm512_loadu_ps(py.add(i + 16 * u)));
            for q in 0..N {
                let pw = w[q].as_ptr().add(i);
                for (u, vu) in v.iter_mut().enumerate() {
                    *vu = _mm512_fmadd_ps(av[q], _mm512_loadu_ps(pw.add(16 * u)), *vu);
                }
            }
            for (u, vu) in v.iter().enumerate() {
                _mm512_storeu_ps(py.add(i + 16 * u), *vu);
            }
        }
        i += 64;
    }
    // Whole vectors unmasked (a masked store is slow on some cores), the tail masked.
    while i + 16 <= n {
        // SAFETY: i + 16 <= n, the length of `y` and of every `w[q]`.
        unsafe {
            let mut v = _mm512_loadu_ps(py.add(i));
            for q in 0..N {
                v = _mm512_fmadd_ps(av[q], _mm512_loadu_ps(w[q].as_ptr().add(i)), v);
            }
            _mm512_storeu_ps(py.add(i), v);
        }
        i += 16;
    }
    if i < n {
        let mask: __mmask16 = ((1u32 << (n - i)) - 1) as __mmask16;
        // SAFETY: the mask enables only lanes i..n of `y` and every `w[q]`.
        unsafe {
            let mut v = _mm512_maskz_loadu_ps(mask, py.add(i));
            for q in 0..N {
                v = _mm512_fmadd_ps(av[q], _mm512_maskz_loadu_ps(mask, w[q].as_ptr().add(i)), v);
            }
            _mm512_mask_storeu_ps(py.add(i), mask, v);
        }
    }
}

/// [`axpy_at`] that also asks for the cache line at `ahead[i]` while it
/// reads `w[i]`: a streaming caller passes the data it will read next (the
/// next kept input's slice), so the requests go out one per line, evenly,
/// where a burst of prefetches would stall on the miss buffers.
pub fn axpy_ahead_at(level: Level, a: f32, w: &[f32], y: &mut [f32], ahead: Option<&[f32]>) {
    match level {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the guard checks the CPU has AVX-512 F. The prefetch address
        // is only ever prefetched (never dereferenced), which cannot fault.
        Level::Avx512 if Level::Avx512.is_supported() => unsafe {
            avx512_ahead(a, w, y, ahead.map_or(std::ptr::null(), |s| s.as_ptr()))
        },
        _ => axpy_at(level, a, w, y),
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn avx512_ahead(a: f32, w: &[f32], y: &mut [f32], ahead: *const f32) {
    use std::arch::x86_64::*;
    let n = w.len().min(y.len());
    let av = _mm512_set1_ps(a);
    let (pw, py) = (w.as_ptr(), y.as_mut_ptr());
    let mut i = 0;
    while i + 16 <= n {
        // A prefetch never faults; wrapping_add keeps the address arithmetic defined.
        _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(i) as *const i8);
        // SAFETY: i + 16 <= n = min(w.len(), y.len()); unaligned loads and stores.
        unsafe {
            let r = _mm512_fmadd_ps(av, _mm512_loadu_ps(pw.add(i)), _mm512_loadu_ps(py.add(i)));
            _mm512_storeu_ps(py.add(i), r);
        }
        i += 16;
    }
    scalar(a, &w[i..n], &mut y[i..n]);
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

        #[test]
        fn several_columns_at_once_match_one_at_a_time(
            v in prop::collection::vec((-1.0f32..1.0, -1.0f32..1.0, -1.0f32..1.0), 0..200),
            a in prop::array::uniform3(-2.0f32..2.0),
        ) {
            let w0: Vec<f32> = v.iter().map(|t| t.0).collect();
            let w1: Vec<f32> = v.iter().map(|t| t.1).collect();
            let y0: Vec<f32> = v.iter().map(|t| t.2).collect();
            let mut want = y0.clone();
            scalar(a[0], &w0, &mut want);
            scalar(a[1], &w1, &mut want);
            scalar(a[2], &w0, &mut want);
            for level in Level::supported() {
                let mut got = y0.clone();
                axpy_n_at(level, a, [&w0, &w1, &w0], &mut got);
                for (g, e) in got.iter().zip(&want) {
                    prop_assert!((g - e).abs() <= 1e-5, "{level}: {g} vs {e}");
                }
            }
        }
    }
}
