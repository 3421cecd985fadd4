//! Loops over the integer codes ([`super::elem::Q8`], [`super::elem::Q4`])
//! written once as plain Rust and compiled for each level: the compiler widens
//! the same loop to 512- or 256-bit vectors inside a `target_feature`
//! function, and the baseline runs it as written. These serve wherever
//! `neurons::fused` has no explicit loop: the int8 dot at every level, the
//! int4 dot and the adds below AVX-512, and decoding to f32.

use super::elem::{Elem, Q4, Q8};
use super::fused::prefetch_range;
use crate::simd::Level;

/// A code type whose decoding is a plain loop the compiler can vectorise.
pub(super) trait PlainDecode: Sized {
    fn decode(src: &[Self], dst: &mut [f32]);
    /// `y += a * codes(src)`, one fused loop (see [`Elem::axpy`]).
    fn axpy(a: f32, src: &[Self], y: &mut [f32]);
    /// `x[i] * code i` for the `DOT` values of `src` (`DOT / LANES` units),
    /// added lane by lane into `acc`: the body of a widened dot product.
    fn dot_block(src: &[Self], x: &[f32], acc: &mut [f32; DOT]);
}

/// Values per block of [`PlainDecode::dot_block`]: two 512-bit accumulators.
pub(super) const DOT: usize = 32;

impl PlainDecode for Q8 {
    #[inline(always)]
    fn decode(src: &[Self], dst: &mut [f32]) {
        for (d, s) in dst.iter_mut().zip(src) {
            *d = f32::from(s.0);
        }
    }
    #[inline(always)]
    fn axpy(a: f32, src: &[Self], y: &mut [f32]) {
        for (y, s) in y.iter_mut().zip(src) {
            *y += a * f32::from(s.0);
        }
    }
    #[inline(always)]
    fn dot_block(src: &[Self], x: &[f32], acc: &mut [f32; DOT]) {
        for i in 0..DOT {
            acc[i] += f32::from(src[i].0) * x[i];
        }
    }
}

impl PlainDecode for Q4 {
    #[inline(always)]
    fn decode(src: &[Self], dst: &mut [f32]) {
        for (d, s) in dst.chunks_exact_mut(2).zip(src) {
            d[0] = f32::from(s.0 & 15) - 8.0;
            d[1] = f32::from(s.0 >> 4) - 8.0;
        }
    }
    #[inline(always)]
    fn axpy(a: f32, src: &[Self], y: &mut [f32]) {
        for (y, s) in y.chunks_exact_mut(2).zip(src) {
            y[0] += a * (f32::from(s.0 & 15) - 8.0);
            y[1] += a * (f32::from(s.0 >> 4) - 8.0);
        }
    }
    #[inline(always)]
    fn dot_block(src: &[Self], x: &[f32], acc: &mut [f32; DOT]) {
        for i in 0..DOT / 2 {
            acc[2 * i] += (f32::from(src[i].0 & 15) - 8.0) * x[2 * i];
            acc[2 * i + 1] += (f32::from(src[i].0 >> 4) - 8.0) * x[2 * i + 1];
        }
    }
}

/// Runs `E::decode` compiled for AVX-512 or AVX2 when `level` allows (the
/// same loop, widened by the compiler to 512- or 256-bit vectors), else for
/// the baseline.
pub(super) fn widened<E: PlainDecode>(level: Level, src: &[E], dst: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if level == Level::Avx512 && level.is_supported() {
        // SAFETY: AVX-512 F/BW are present (level checked against the CPU).
        unsafe { decode_avx512(src, dst) };
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if level >= Level::Avx2 && level.is_supported() {
        // SAFETY: AVX2 is present (level checked against the CPU).
        unsafe { decode_avx2(src, dst) };
        return;
    }
    let _ = level;
    E::decode(src, dst);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn decode_avx2<E: PlainDecode>(src: &[E], dst: &mut [f32]) {
    E::decode(src, dst);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn decode_avx512<E: PlainDecode>(src: &[E], dst: &mut [f32]) {
    E::decode(src, dst);
}

/// Runs `E::axpy` compiled for AVX-512 or AVX2 + FMA when `level` allows (the
/// same loop, widened by the compiler), else for the baseline; with `ahead`,
/// a slice of codes at a time, each asking for the same bytes of `ahead`.
pub(super) fn axpy_widened<E: PlainDecode + Elem>(
    level: Level,
    a: f32,
    w: &[E],
    y: &mut [f32],
    ahead: Option<&[E]>,
) {
    debug_assert_eq!(y.len(), w.len() * E::LANES);
    #[cfg(target_arch = "x86_64")]
    if level == Level::Avx512 && level.is_supported() {
        // SAFETY: AVX-512 F/BW are present (level checked against the CPU).
        unsafe { axpy_avx512(a, w, y, ahead) };
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if level >= Level::Avx2 && level.is_supported() {
        // SAFETY: AVX2 and FMA are present (level checked against the CPU).
        unsafe { axpy_avx2(a, w, y, ahead) };
        return;
    }
    let _ = level;
    by_lines(a, w, y, ahead);
}

/// Bytes of codes per slice of a widened add with a prefetch: a slice's loop
/// (widened by the compiler, with its prologue and tail) costs too much per
/// 64-byte line; 512 bytes were measured best for int8 and int4 on Zen 5.
const SLICE: usize = 512;

/// `E::axpy` over all of `w`, or, with `ahead`, slice by slice of `w`, each
/// asking for the same bytes of `ahead` (inlined into the wrappers below, so
/// each slice's loop is widened for their level).
#[inline(always)]
fn by_lines<E: PlainDecode + Elem>(a: f32, w: &[E], y: &mut [f32], ahead: Option<&[E]>) {
    let Some(next) = ahead else {
        return PlainDecode::axpy(a, w, y);
    };
    let units = (SLICE / std::mem::size_of::<E>()).max(1);
    let p = next.as_ptr() as *const u8;
    for (c, (wc, yc)) in w
        .chunks(units)
        .zip(y.chunks_mut(units * E::LANES))
        .enumerate()
    {
        prefetch_range(p.wrapping_add(SLICE * c), p.wrapping_add(SLICE * (c + 1)));
        PlainDecode::axpy(a, wc, yc);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn axpy_avx2<E: PlainDecode + Elem>(a: f32, w: &[E], y: &mut [f32], ahead: Option<&[E]>) {
    by_lines(a, w, y, ahead);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn axpy_avx512<E: PlainDecode + Elem>(a: f32, w: &[E], y: &mut [f32], ahead: Option<&[E]>) {
    by_lines(a, w, y, ahead);
}

/// `codes(w) · x` through `E::dot_block`, compiled for AVX-512 or AVX2 when
/// `level` allows (the block's lanes widened by the compiler into vector
/// accumulators: a float sum is never reassociated by the compiler, so the
/// lanes are spelled out), else for the baseline.
pub(super) fn dot_widened<E: PlainDecode + Elem>(level: Level, w: &[E], x: &[f32]) -> f32 {
    debug_assert_eq!(x.len(), w.len() * E::LANES);
    #[cfg(target_arch = "x86_64")]
    if level == Level::Avx512 && level.is_supported() {
        // SAFETY: AVX-512 F/BW are present (level checked against the CPU).
        return unsafe { dot_avx512(w, x) };
    }
    #[cfg(target_arch = "x86_64")]
    if level >= Level::Avx2 && level.is_supported() {
        // SAFETY: AVX2 and FMA are present (level checked against the CPU).
        return unsafe { dot_avx2(w, x) };
    }
    let _ = level;
    dot_blocks(w, x)
}

#[inline(always)]
fn dot_blocks<E: PlainDecode + Elem>(w: &[E], x: &[f32]) -> f32 {
    let units = DOT / E::LANES;
    let mut acc = [0.0f32; DOT];
    let mut wb = w.chunks_exact(units);
    let mut xb = x.chunks_exact(DOT);
    for (wc, xc) in (&mut wb).zip(&mut xb) {
        E::dot_block(wc, xc, &mut acc);
    }
    // The tail: decoded, then multiplied value by value.
    let (wt, xt) = (wb.remainder(), xb.remainder());
    let mut tail = [0.0f32; DOT];
    let t = &mut tail[..wt.len() * E::LANES];
    E::to_f32(Level::Scalar, wt, t);
    let mut sum: f32 = acc.iter().sum();
    for (a, b) in t.iter().zip(xt) {
        sum += a * b;
    }
    sum
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_avx2<E: PlainDecode + Elem>(w: &[E], x: &[f32]) -> f32 {
    dot_blocks(w, x)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn dot_avx512<E: PlainDecode + Elem>(w: &[E], x: &[f32]) -> f32 {
    dot_blocks(w, x)
}
