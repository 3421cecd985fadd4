//! Fused `y += a * codes(w)` loops for the stored element types: one pass that
//! reads the codes and updates `y`, where the generic path (decode a chunk to
//! f32, then the f32 axpy) stores and reloads every value once more. The
//! input-sparse sweep adds one weight run per kept input into accumulators
//! that stay in L1; there the extra store and load per value, not memory,
//! bounded f16 and int8 (measured on Zen 5: the dense f16 sweep ran at 0.8
//! cycles per weight).
//!
//! Each loop performs, per value, one `mul_add` (a fused multiply-add at every
//! level, so every level gives the same bits).

use half::f16;

use super::elem::PlainDecode;
use crate::simd::Level;

/// `y += a * w` for f16 `w`, 16 values per `vcvtph2ps` + `vfmadd`.
///
/// # Safety
/// The CPU must have AVX-512 F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn f16_axpy_avx512(a: f32, w: &[f16], y: &mut [f32]) {
    use std::arch::x86_64::*;
    let n = w.len().min(y.len());
    let (pw, py) = (w.as_ptr() as *const u16, y.as_mut_ptr());
    let av = _mm512_set1_ps(a);
    let mut i = 0;
    while i + 16 <= n {
        // SAFETY: i + 16 <= n: 16 halves (32 bytes) read, 16 floats of `y`
        // read and written, unaligned.
        unsafe {
            let h = _mm512_cvtph_ps(_mm256_loadu_si256(pw.add(i) as *const __m256i));
            _mm512_storeu_ps(
                py.add(i),
                _mm512_fmadd_ps(av, h, _mm512_loadu_ps(py.add(i))),
            );
        }
        i += 16;
    }
    for j in i..n {
        y[j] = a.mul_add(w[j].to_f32(), y[j]);
    }
}

/// Runs `E::axpy` compiled for AVX-512 or AVX2 + FMA when `level` allows (the
/// same loop, widened by the compiler), else for the baseline.
pub(super) fn axpy_widened<E: PlainDecode>(level: Level, a: f32, w: &[E], y: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if level == Level::Avx512 && level.is_supported() {
        // SAFETY: AVX-512 F/BW are present (level checked against the CPU).
        unsafe { axpy_avx512(a, w, y) };
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if level >= Level::Avx2 && level.is_supported() {
        // SAFETY: AVX2 and FMA are present (level checked against the CPU).
        unsafe { axpy_avx2(a, w, y) };
        return;
    }
    let _ = level;
    E::axpy(a, w, y);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn axpy_avx2<E: PlainDecode>(a: f32, w: &[E], y: &mut [f32]) {
    E::axpy(a, w, y);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn axpy_avx512<E: PlainDecode>(a: f32, w: &[E], y: &mut [f32]) {
    E::axpy(a, w, y);
}
