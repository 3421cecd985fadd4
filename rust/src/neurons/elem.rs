//! Element types a neuron's weights can be stored in, with the two
//! operations a sparse FFN needs on a run of them (dot with the inputs, scaled
//! add into the outputs); `rows` applies them to several input rows.
//!
//! A type either lends its rows as `f32` directly (no copy) or converts them in
//! L1-sized chunks to `f32`, which the dispatched f32 kernels then consume: one
//! kernel per operation, not one per dtype. Adding bf16 is one `impl`.
//!
//! Row-quantized types ([`Q8`], [`Q4`]) fit the same scheme: a row is encoded
//! with one f32 scale (symmetric absmax), decoding yields the integer codes as
//! f32, and the row kernels multiply the dot product (or the axpy coefficient)
//! by the scale once per row.

use half::f16;

use super::axpy::{axpy_ahead_at, axpy_at};
use crate::simd::{dot_at, Level};

/// Elements converted per chunk (2 KiB of f32: stays in L1 next to the inputs).
pub(super) const CHUNK: usize = 512;

/// A weight element type.
pub trait Elem: Copy + Send + Sync + Default + 'static {
    /// Name as the Python API spells it (`float32`, `float16`).
    const NAME: &'static str;
    /// Values per stored unit (2 for packed 4-bit codes).
    const LANES: usize = 1;
    /// Whether rows carry a scale (quantized types); plain types use 1.0.
    const QUANTIZED: bool = false;
    /// Encodes the row `src` (`dst.len() * LANES` values) into `dst` and
    /// returns its scale (decoded value = code x scale).
    fn encode(src: &[f32], dst: &mut [Self]) -> f32;
    /// Writes the codes of `src` as f32 into `dst` (`src.len() * LANES`
    /// values), with vector instructions where `level` allows.
    fn to_f32(level: Level, src: &[Self], dst: &mut [f32]);
    /// The row itself when it is already f32 (no conversion needed).
    fn as_f32(_src: &[Self]) -> Option<&[f32]> {
        None
    }
    /// Values `v..v + 16` of the run at `p` as one vector (`v` a multiple of
    /// 16): the decode step of the fused AVX-512 loops (`neurons::fused`).
    ///
    /// # Safety
    /// The CPU must have AVX-512 F; the run must hold values `v..v + 16`.
    #[cfg(target_arch = "x86_64")]
    unsafe fn lanes16(p: *const Self, v: usize) -> std::arch::x86_64::__m512;
    /// `y += a * codes(src)` (`src.len() * LANES` values), asking, as it goes,
    /// for the cache lines of `ahead` (what the caller reads next; see
    /// [`axpy_ahead_at`]). By default in L1-sized chunks through `to_f32` and
    /// the f32 axpy; the stored types override it with one fused pass (see
    /// `neurons::fused`).
    fn axpy(level: Level, a: f32, src: &[Self], y: &mut [f32], ahead: Option<&[Self]>) {
        let mut buf = [0.0f32; CHUNK];
        let step = CHUNK / Self::LANES;
        for (c, (wc, yc)) in src.chunks(step).zip(y.chunks_mut(CHUNK)).enumerate() {
            if let Some(next) = ahead {
                let p = next.as_ptr().wrapping_add(c * step) as *const u8;
                super::fused::prefetch_range(p, p.wrapping_add(std::mem::size_of_val(wc)));
            }
            let b = &mut buf[..yc.len()];
            Self::to_f32(level, wc, b);
            axpy_at(level, a, b, yc);
        }
    }
    /// `codes(src) · x` (`src.len() * LANES` values). By default in L1-sized
    /// chunks through `to_f32` and the f32 dot; overridden as [`Elem::axpy`].
    fn dot(level: Level, src: &[Self], x: &[f32]) -> f32 {
        let mut buf = [0.0f32; CHUNK];
        let mut sum = 0.0;
        for (wc, xc) in src.chunks(CHUNK / Self::LANES).zip(x.chunks(CHUNK)) {
            let b = &mut buf[..xc.len()];
            Self::to_f32(level, wc, b);
            sum += dot_at(level, b, xc).unwrap_or(0.0);
        }
        sum
    }
}

impl Elem for f32 {
    const NAME: &'static str = "float32";
    fn encode(src: &[f32], dst: &mut [Self]) -> f32 {
        dst.copy_from_slice(src);
        1.0
    }
    fn to_f32(_level: Level, src: &[Self], dst: &mut [f32]) {
        dst.copy_from_slice(src);
    }
    fn as_f32(src: &[Self]) -> Option<&[f32]> {
        Some(src)
    }
    fn axpy(level: Level, a: f32, src: &[Self], y: &mut [f32], ahead: Option<&[Self]>) {
        axpy_ahead_at(level, a, src, y, ahead);
    }
    fn dot(level: Level, src: &[Self], x: &[f32]) -> f32 {
        dot_at(level, src, x).unwrap_or(0.0)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn lanes16(p: *const Self, v: usize) -> std::arch::x86_64::__m512 {
        // SAFETY: the caller guarantees AVX-512 F and 16 values at `p + v`.
        unsafe { std::arch::x86_64::_mm512_loadu_ps(p.add(v)) }
    }
}

impl Elem for f16 {
    const NAME: &'static str = "float16";
    fn encode(src: &[f32], dst: &mut [Self]) -> f32 {
        for (d, &v) in dst.iter_mut().zip(src) {
            *d = f16::from_f32(v);
        }
        1.0
    }
    fn to_f32(level: Level, src: &[Self], dst: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if level == Level::Avx512 && level.is_supported() {
            // SAFETY: AVX-512 F (level checked against the CPU) converts halves.
            unsafe { f16_to_f32_avx512(src, dst) };
            return;
        }
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
    fn axpy(level: Level, a: f32, src: &[Self], y: &mut [f32], ahead: Option<&[Self]>) {
        #[cfg(target_arch = "x86_64")]
        if level == Level::Avx512 && level.is_supported() {
            let next = ahead.map_or(std::ptr::null(), |s| s.as_ptr() as *const u8);
            // SAFETY: AVX-512 F (level checked against the CPU); `next` is
            // only prefetched.
            unsafe { super::fused::f16_axpy_avx512(a, src, y, next) };
            return;
        }
        #[cfg(target_arch = "x86_64")]
        if level >= Level::Avx2
            && level.is_supported()
            && std::arch::is_x86_feature_detected!("f16c")
        {
            let next = ahead.map_or(std::ptr::null(), |s| s.as_ptr() as *const u8);
            // SAFETY: AVX2 + FMA (level checked) and F16C (detected) are
            // present; `next` is only prefetched.
            unsafe { super::fused::f16_axpy_f16c(a, src, y, next) };
            return;
        }
        let _ = (level, ahead);
        for (y, s) in y.iter_mut().zip(src) {
            *y += a * s.to_f32();
        }
    }
    fn dot(level: Level, src: &[Self], x: &[f32]) -> f32 {
        #[cfg(target_arch = "x86_64")]
        if level == Level::Avx512 && level.is_supported() {
            // SAFETY: AVX-512 F (level checked against the CPU).
            return unsafe { super::fused::f16_dot_avx512(src, x) };
        }
        let _ = level;
        src.iter().zip(x).map(|(s, x)| s.to_f32() * x).sum()
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn lanes16(p: *const Self, v: usize) -> std::arch::x86_64::__m512 {
        use std::arch::x86_64::*;
        // SAFETY: the caller guarantees AVX-512 F and 16 halves at `p + v`.
        unsafe { _mm512_cvtph_ps(_mm256_loadu_si256(p.add(v) as *const __m256i)) }
    }
}

/// Symmetric absmax scale for codes in `[-qmax, qmax]` (1.0 for an all-zero row).
fn absmax_scale(src: &[f32], qmax: f32) -> f32 {
    let m = src.iter().fold(0.0f32, |a, v| a.max(v.abs()));
    if m > 0.0 && m.is_finite() {
        m / qmax
    } else {
        1.0
    }
}

/// 8-bit row-quantized weight: codes in [-127, 127], one scale per row.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Q8(pub i8);

impl Elem for Q8 {
    const NAME: &'static str = "int8";
    const QUANTIZED: bool = true;
    fn encode(src: &[f32], dst: &mut [Self]) -> f32 {
        let scale = absmax_scale(src, 127.0);
        for (d, &v) in dst.iter_mut().zip(src) {
            *d = Q8((v / scale).round().clamp(-127.0, 127.0) as i8);
        }
        scale
    }
    fn to_f32(level: Level, src: &[Self], dst: &mut [f32]) {
        super::widened::widened(level, src, dst);
    }
    fn axpy(level: Level, a: f32, src: &[Self], y: &mut [f32], ahead: Option<&[Self]>) {
        #[cfg(target_arch = "x86_64")]
        if level == Level::Avx512 && level.is_supported() {
            let next = ahead.map_or(std::ptr::null(), |s| s.as_ptr() as *const u8);
            // SAFETY: AVX-512 F (level checked against the CPU); `next` is
            // only prefetched.
            return unsafe { super::fused::q8_axpy_avx512(a, src, y, next) };
        }
        super::widened::axpy_widened(level, a, src, y, ahead);
    }
    fn dot(level: Level, src: &[Self], x: &[f32]) -> f32 {
        super::widened::dot_widened(level, src, x)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn lanes16(p: *const Self, v: usize) -> std::arch::x86_64::__m512 {
        use std::arch::x86_64::*;
        // SAFETY: the caller guarantees AVX-512 F and 16 codes at `p + v`.
        unsafe {
            _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(
                p.add(v) as *const __m128i
            )))
        }
    }
}

/// 4-bit row-quantized weights, two per byte (low nibble first): codes in
/// [-7, 7] stored as `code + 8`, one scale per row. Rows need an even length.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Q4(pub u8);

impl Elem for Q4 {
    const NAME: &'static str = "int4";
    const LANES: usize = 2;
    const QUANTIZED: bool = true;
    fn encode(src: &[f32], dst: &mut [Self]) -> f32 {
        let scale = absmax_scale(src, 7.0);
        let code = |v: f32| ((v / scale).round().clamp(-7.0, 7.0) as i8 + 8) as u8;
        for (d, pair) in dst.iter_mut().zip(src.chunks(2)) {
            let hi = pair.get(1).map_or(8, |&v| code(v));
            *d = Q4(code(pair[0]) | (hi << 4));
        }
        scale
    }
    fn to_f32(level: Level, src: &[Self], dst: &mut [f32]) {
        super::widened::widened(level, src, dst);
    }
    fn axpy(level: Level, a: f32, src: &[Self], y: &mut [f32], ahead: Option<&[Self]>) {
        #[cfg(target_arch = "x86_64")]
        if level == Level::Avx512 && level.is_supported() {
            let next = ahead.map_or(std::ptr::null(), |s| s.as_ptr() as *const u8);
            // SAFETY: AVX-512 F (level checked against the CPU); `y` holds two
            // values per byte of `src` (the trait's contract); `next` is only
            // prefetched.
            return unsafe { super::fused::q4_axpy_avx512(a, src, y, next) };
        }
        super::widened::axpy_widened(level, a, src, y, ahead);
    }
    fn dot(level: Level, src: &[Self], x: &[f32]) -> f32 {
        #[cfg(target_arch = "x86_64")]
        if level == Level::Avx512 && level.is_supported() {
            // SAFETY: AVX-512 F (level checked against the CPU); `x` holds two
            // values per byte of `src` (the trait's contract).
            return unsafe { super::fused::q4_dot_avx512(src, x) };
        }
        super::widened::dot_widened(level, src, x)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn lanes16(p: *const Self, v: usize) -> std::arch::x86_64::__m512 {
        // SAFETY: the caller guarantees AVX-512 F and 16 values (8 bytes) at
        // value `v`.
        unsafe { super::fused::q4_lanes16(p.add(v / 2) as *const u8) }
    }
}

/// f16 -> f32 with the 512-bit `vcvtph2ps`, 16 lanes at a time.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn f16_to_f32_avx512(src: &[f16], dst: &mut [f32]) {
    use std::arch::x86_64::*;
    let n = src.len().min(dst.len());
    let (ps, pd) = (src.as_ptr() as *const u16, dst.as_mut_ptr());
    let mut i = 0;
    while i + 16 <= n {
        // SAFETY: i + 16 <= n: 16 halves (32 bytes) read, 16 floats written, unaligned.
        unsafe {
            let h = _mm256_loadu_si256(ps.add(i) as *const __m256i);
            _mm512_storeu_ps(pd.add(i), _mm512_cvtph_ps(h));
        }
        i += 16;
    }
    for j in i..n {
        dst[j] = src[j].to_f32();
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

#[cfg(test)]
mod tests {
    use super::super::rows::{axpy_rows, dot_rows};
    use super::*;

    fn check<E: Elem>(tol: f64) {
        let d = 1300; // several chunks and a ragged tail
        let w32: Vec<f32> = (0..d).map(|i| ((i % 17) as f32 - 8.0) / 8.0).collect();
        let mut w = vec![E::default(); d / E::LANES];
        let scale = E::encode(&w32, &mut w);
        let mut back = vec![0.0; d];
        E::to_f32(Level::Scalar, &w, &mut back);
        for level in Level::supported() {
            let mut other = vec![0.0; d];
            E::to_f32(level, &w, &mut other);
            assert_eq!(back, other);
        }
        for (b, v) in back.iter_mut().zip(&w32) {
            *b *= scale;
            assert!((*b - v).abs() as f64 <= tol, "{} {b} vs {v}", E::NAME);
        }
        let xs: Vec<f32> = (0..2 * d).map(|i| ((i % 11) as f32 - 5.0) / 5.0).collect();
        for level in Level::supported() {
            let mut out = [0.0f32; 2];
            dot_rows(level, &w, scale, &xs, &mut out);
            for r in 0..2 {
                let want: f64 = back
                    .iter()
                    .zip(&xs[r * d..(r + 1) * d])
                    .map(|(a, b)| *a as f64 * *b as f64)
                    .sum();
                assert!((out[r] as f64 - want).abs() < 1e-3, "{level} {}", E::NAME);
            }
            let mut ys = vec![1.0f32; 2 * d];
            axpy_rows(level, &w, scale, &[0.5, 0.0], &mut ys);
            for i in 0..d {
                assert!((ys[i] - (1.0 + 0.5 * back[i])).abs() < 1e-5);
                assert_eq!(ys[d + i], 1.0);
            }
            // One row: the fused dot and add.
            let mut one = [0.0f32];
            dot_rows(level, &w, scale, &xs[..d], &mut one);
            let want: f64 = back
                .iter()
                .zip(&xs)
                .map(|(a, b)| *a as f64 * *b as f64)
                .sum();
            assert!((one[0] as f64 - want).abs() < 1e-3, "{level} {}", E::NAME);
            let mut y1 = vec![1.0f32; d];
            axpy_rows(level, &w, scale, &[0.5], &mut y1);
            for i in 0..d {
                assert!((y1[i] - (1.0 + 0.5 * back[i])).abs() < 1e-5);
            }
            // The fused add of the codes, with and without a run to prefetch.
            let mut codes = vec![0.0; d];
            E::to_f32(Level::Scalar, &w, &mut codes);
            for ahead in [None, Some(&w[..])] {
                let mut y = vec![1.0f32; d];
                E::axpy(level, -0.25, &w, &mut y, ahead);
                for (i, (&v, &c)) in y.iter().zip(&codes).enumerate() {
                    let want = 1.0 - 0.25 * c;
                    assert!(
                        (v - want).abs() <= 1e-6,
                        "{level} {} {i}: {v} vs {want}",
                        E::NAME
                    );
                }
            }
        }
    }

    #[test]
    fn every_element_type_round_trips_and_computes() {
        check::<f32>(0.0);
        check::<f16>(1e-3);
        check::<Q8>(1.0 / 127.0);
        check::<Q4>(1.0 / 7.0);
    }
}
