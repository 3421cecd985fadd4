//! Element types a neuron's weights can be stored in, and the two row
//! operations a sparse FFN needs (dot with the inputs, scaled add into the
//! outputs), written once for every element type.
//!
//! A type either lends its rows as `f32` directly (no copy) or converts them in
//! L1-sized chunks to `f32`, which the dispatched f32 kernels then consume: one
//! kernel per operation, not one per dtype. Adding bf16 is one `impl`.

use half::f16;

use super::axpy::axpy_at;
use crate::simd::{dot_at, Level};

/// Elements converted per chunk (2 KiB of f32: stays in L1 next to the inputs).
const CHUNK: usize = 512;

/// A weight element type.
pub trait Elem: Copy + Send + Sync + Default + 'static {
    /// Name as the Python API spells it (`float32`, `float16`).
    const NAME: &'static str;
    /// Rounds an f32 to this type (round-to-nearest-even).
    fn from_f32(v: f32) -> Self;
    /// Writes `src` as f32 into `dst` (same length), with vector
    /// instructions where `level` allows.
    fn to_f32(level: Level, src: &[Self], dst: &mut [f32]);
    /// The row itself when it is already f32 (no conversion needed).
    fn as_f32(_src: &[Self]) -> Option<&[f32]> {
        None
    }
}

impl Elem for f32 {
    const NAME: &'static str = "float32";
    fn from_f32(v: f32) -> Self {
        v
    }
    fn to_f32(_level: Level, src: &[Self], dst: &mut [f32]) {
        dst.copy_from_slice(src);
    }
    fn as_f32(src: &[Self]) -> Option<&[f32]> {
        Some(src)
    }
}

impl Elem for f16 {
    const NAME: &'static str = "float16";
    fn from_f32(v: f32) -> Self {
        f16::from_f32(v)
    }
    fn to_f32(level: Level, src: &[Self], dst: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if level >= Level::Avx2
            && level.is_supported()
            && std::arch::is_x86_feature_detected!("f16c")
        {
            // SAFETY: AVX2 (level checked) and F16C (detected) are present.
            unsafe { f16c_to_f32(src, dst) };
            return;
        }
        let _ = level;
        for (d, s) in dst.iter_mut().zip(src) {
            *d = s.to_f32();
        }
    }
}

/// f16 -> f32 with `vcvtph2ps`, 8 lanes at a time.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,f16c")]
unsafe fn f16c_to_f32(src: &[f16], dst: &mut [f32]) {
    use std::arch::x86_64::*;
    let n = src.len().min(dst.len());
    let (ps, pd) = (src.as_ptr() as *const u16, dst.as_mut_ptr());
    let mut i = 0;
    while i + 8 <= n {
        // SAFETY: i + 8 <= n: 8 halves (16 bytes) read, 8 floats written, unaligned.
        unsafe {
            let h = _mm_loadu_si128(ps.add(i) as *const __m128i);
            _mm256_storeu_ps(pd.add(i), _mm256_cvtph_ps(h));
        }
        i += 8;
    }
    for j in i..n {
        dst[j] = src[j].to_f32();
    }
}

/// `out[r] = w · xs[r]` for each of the `out.len()` rows of `xs` (row length `w.len()`).
pub fn dot_rows<E: Elem>(level: Level, w: &[E], xs: &[f32], out: &mut [f32]) {
    let d = w.len();
    if let Some(wf) = E::as_f32(w) {
        for (o, x) in out.iter_mut().zip(xs.chunks_exact(d)) {
            *o = dot_at(level, wf, x).unwrap_or(0.0);
        }
        return;
    }
    out.fill(0.0);
    let mut buf = [0.0f32; CHUNK];
    for (c, wc) in w.chunks(CHUNK).enumerate() {
        let b = &mut buf[..wc.len()];
        E::to_f32(level, wc, b);
        let start = c * CHUNK;
        for (o, x) in out.iter_mut().zip(xs.chunks_exact(d)) {
            *o += dot_at(level, b, &x[start..start + wc.len()]).unwrap_or(0.0);
        }
    }
}

/// `ys[r] += coef[r] * w` for each row `r` whose coefficient is non-zero.
pub fn axpy_rows<E: Elem>(level: Level, w: &[E], coef: &[f32], ys: &mut [f32]) {
    let d = w.len();
    if let Some(wf) = E::as_f32(w) {
        for (&a, y) in coef.iter().zip(ys.chunks_exact_mut(d)) {
            if a != 0.0 {
                axpy_at(level, a, wf, y);
            }
        }
        return;
    }
    let mut buf = [0.0f32; CHUNK];
    for (c, wc) in w.chunks(CHUNK).enumerate() {
        let b = &mut buf[..wc.len()];
        E::to_f32(level, wc, b);
        let start = c * CHUNK;
        for (&a, y) in coef.iter().zip(ys.chunks_exact_mut(d)) {
            if a != 0.0 {
                axpy_at(level, a, b, &mut y[start..start + wc.len()]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check<E: Elem>() {
        let d = 1300; // several chunks and a ragged tail
        let w32: Vec<f32> = (0..d).map(|i| ((i % 17) as f32 - 8.0) / 8.0).collect();
        let w: Vec<E> = w32.iter().map(|&v| E::from_f32(v)).collect();
        let mut back = vec![0.0; d];
        E::to_f32(Level::Scalar, &w, &mut back);
        for level in Level::supported() {
            let mut other = vec![0.0; d];
            E::to_f32(level, &w, &mut other);
            assert_eq!(back, other);
        }
        let xs: Vec<f32> = (0..2 * d).map(|i| ((i % 11) as f32 - 5.0) / 5.0).collect();
        for level in Level::supported() {
            let mut out = [0.0f32; 2];
            dot_rows(level, &w, &xs, &mut out);
            for r in 0..2 {
                let want: f64 = back
                    .iter()
                    .zip(&xs[r * d..(r + 1) * d])
                    .map(|(a, b)| *a as f64 * *b as f64)
                    .sum();
                assert!((out[r] as f64 - want).abs() < 1e-3, "{level} {}", E::NAME);
            }
            let mut ys = vec![1.0f32; 2 * d];
            axpy_rows(level, &w, &[0.5, 0.0], &mut ys);
            for i in 0..d {
                assert!((ys[i] - (1.0 + 0.5 * back[i])).abs() < 1e-6);
                assert_eq!(ys[d + i], 1.0);
            }
        }
    }

    #[test]
    fn f32_and_f16_rows() {
        check::<f32>();
        check::<f16>();
    }
}
