//! Quantize and dequantize: per-group rules and the row-parallel drivers.
//!
//! Round-to-nearest (the default) picks the scale and min from the group's
//! range, rounded *outward* to the storage type (the min down, the scale up),
//! so every weight lands inside the code range and `|w - deq(q(w))| <= scale / 2`
//! holds up to float32 rounding. GGUF schemes follow the `gguf` package's
//! float32 arithmetic step by step, so their bytes are identical to it.
//!
//! `search = true` tries a grid of clipping ranges per group and refits scale
//! and min by least squares for each candidate's codes (in the spirit of
//! ggml's K-quant `make_qkx` search), keeping the lowest squared error.
//! It is calibration-free and deterministic.
//!
//! Results are identical at every SIMD level. The scalar reference here is
//! plain f32 arithmetic (no fused multiply-add, which Rust never introduces on
//! its own); at AVX2 and AVX-512, round-to-nearest quantize and 2/4/8-bit
//! dequantize run the explicit kernels of `super::kernels`, which repeat the
//! reference's operations lane by lane, and `search` runs the reference
//! compiled for the level. Tests compare every level with the reference.
//!
//! Both directions make one pass over the matrix, parallel over rows: the
//! quantize row tasks check the weights for NaN and infinity and write scales
//! and mins in their storage type as they go.

use half::f16;
use rayon::prelude::*;

use super::format::{Params, QuantizedWeights, ScaleType, Scales, Scheme};
#[cfg(target_arch = "x86_64")]
use super::kernels;
use super::pack::pack_group;
use super::pages::advise_huge;
use super::search::{search_asym, search_sym};
use crate::error::{Error, Result};
use crate::simd::Level;
use crate::validate;

/// Rounds `x` to the storage type: `dir` < 0 down, > 0 up, 0 to nearest.
#[inline(always)]
pub(super) fn to_storage(x: f32, t: ScaleType, dir: i8) -> f32 {
    match t {
        ScaleType::F32 => x,
        ScaleType::F16 => {
            let h = f16::from_f32(x);
            let y = h.to_f32();
            if (dir > 0 && y < x) || (dir < 0 && y > x) {
                f16_step(h, dir > 0).to_f32()
            } else {
                y
            }
        }
    }
}

/// The next float16 up or down from `h`.
fn f16_step(h: f16, up: bool) -> f16 {
    f16::from_bits(f16_step_bits(h.to_bits(), up))
}

/// The next float16 bit pattern up or down from `b`.
#[inline(always)]
pub(super) fn f16_step_bits(b: u16, up: bool) -> u16 {
    let neg = b & 0x8000 != 0;
    if b & 0x7fff == 0 {
        if up {
            0x0001
        } else {
            0x8001
        }
    } else if neg == up {
        b.wrapping_sub(1)
    } else {
        b.wrapping_add(1)
    }
}

/// The sign of a zero min or max, fixed by IEEE 754-2019 `minimum`/`maximum`
/// (-0 below +0): `f32::min` may return either zero, and vector reductions
/// pair lanes in their own order, so without this a group whose smallest
/// value is a zero of both signs (pruned weights, `w * mask`) could store a
/// different min at different levels.
#[inline(always)]
pub(super) fn zero_signs(w: &[f32], lo: f32, hi: f32) -> (f32, f32) {
    if lo != 0.0 && hi != 0.0 {
        return (lo, hi);
    }
    let neg = w.iter().any(|v| v.to_bits() == 0x8000_0000);
    let pos = w.iter().any(|v| v.to_bits() == 0);
    (
        if lo == 0.0 && neg {
            -0.0
        } else if lo == 0.0 {
            0.0
        } else {
            lo
        },
        if hi == 0.0 && pos {
            0.0
        } else if hi == 0.0 {
            -0.0
        } else {
            hi
        },
    )
}

#[inline(always)]
fn min_max(w: &[f32]) -> (f32, f32) {
    let (l, h) = min_max_any_zero(w);
    zero_signs(w, l, h)
}

#[inline(always)]
fn min_max_any_zero(w: &[f32]) -> (f32, f32) {
    let mut lo = [f32::INFINITY; 8];
    let mut hi = [f32::NEG_INFINITY; 8];
    for c in w.chunks_exact(8) {
        for i in 0..8 {
            lo[i] = lo[i].min(c[i]);
            hi[i] = hi[i].max(c[i]);
        }
    }
    let (l, h) = (
        lo.iter().fold(f32::INFINITY, |a, b| a.min(*b)),
        hi.iter().fold(f32::NEG_INFINITY, |a, b| a.max(*b)),
    );
    w.chunks_exact(8)
        .remainder()
        .iter()
        .fold((l, h), |(l, h), v| (l.min(*v), h.max(*v)))
}

/// Codes for fixed `scale`/`min`: `u = clamp(round((w - min) / scale))`.
#[inline(always)]
pub(super) fn codes_for(w: &[f32], s: f32, m: f32, maxq: f32, codes: &mut [u8]) {
    let inv = if s > 0.0 { 1.0 / s } else { 0.0 };
    for (c, v) in codes.iter_mut().zip(w) {
        *c = ((*v - m) * inv + 0.5).clamp(0.0, maxq) as u8;
    }
}

#[inline(always)]
pub(super) fn sq_error(w: &[f32], s: f32, m: f32, codes: &[u8]) -> f32 {
    let mut acc = [0f32; 8];
    for (cw, cc) in w.chunks_exact(8).zip(codes.chunks_exact(8)) {
        for i in 0..8 {
            let d = cw[i] - (s * cc[i] as f32 + m);
            acc[i] += d * d;
        }
    }
    acc.iter().sum()
}

/// Quantizes one group; returns (scale, min) as stored (min is the folded
/// `-offset * scale` for symmetric schemes and is not stored).
#[inline(always)]
fn group(p: &Params, search: bool, w: &[f32], codes: &mut [u8]) -> (f32, f32) {
    let maxq = p.max_code() as f32;
    let t = p.scale_type;
    match p.scheme {
        Scheme::Asym => {
            let (lo, hi) = min_max(w);
            let m = to_storage(lo, t, -1);
            let s = to_storage((hi - m) / maxq, t, 1);
            codes_for(w, s, m, maxq, codes);
            if search && hi > lo {
                return search_asym(p, w, lo, hi, (s, m), codes);
            }
            (s, m)
        }
        Scheme::Sym => {
            let off = p.offset() as f32;
            let (lo, hi) = min_max(w);
            let a = hi.abs().max(lo.abs());
            let s = to_storage(a / (off - 1.0), t, 1);
            codes_for(w, s, -off * s, maxq, codes);
            if search && a > 0.0 {
                return search_sym(p, w, a, s, codes);
            }
            (s, -off * s)
        }
        Scheme::Q4_0 => {
            // gguf: imax = argmax |x| (first); d = x[imax] / -8; q = trunc(x / d + 8.5) clip 15
            let (lo, hi) = min_max(w);
            let amax = hi.max(-lo);
            let max = w.iter().copied().find(|v| v.abs() == amax).unwrap_or(0.0);
            let d = max / -8.0;
            let id = if d == 0.0 { 0.0 } else { 1.0 / d };
            for (c, v) in codes.iter_mut().zip(w) {
                *c = ((v * id + 8.5).trunc() as u8).min(15);
            }
            let d = f16::from_f32(d).to_f32();
            (d, -8.0 * d)
        }
        Scheme::Q4_1 => {
            let (lo, hi) = min_max(w);
            let d = (hi - lo) / 15.0;
            let id = if d == 0.0 { 0.0 } else { 1.0 / d };
            for (c, v) in codes.iter_mut().zip(w) {
                *c = (((v - lo) * id + 0.5).trunc() as u8).min(15);
            }
            (f16::from_f32(d).to_f32(), f16::from_f32(lo).to_f32())
        }
        Scheme::Q8_0 => {
            let (lo, hi) = min_max(w);
            // the largest magnitude, +0 for an all-zero group (as gguf's `abs().max()`)
            let d = hi.abs().max(lo.abs()) / 127.0;
            let id = if d == 0.0 { 0.0 } else { 1.0 / d };
            for (c, v) in codes.iter_mut().zip(w) {
                // round half away from zero, as ggml's roundf
                *c = ((v * id).round().clamp(-128.0, 127.0) as i32 + 128) as u8;
            }
            let d = f16::from_f32(d).to_f32();
            (d, -128.0 * d)
        }
    }
}

/// One row's scales (or mins) as stored.
enum ScaleRow<'a> {
    F16(&'a mut [u16]),
    F32(&'a mut [f32]),
}

impl ScaleRow<'_> {
    #[inline(always)]
    fn set(&mut self, k: usize, v: f32, to_f16: impl Fn(f32) -> u16) {
        match self {
            ScaleRow::F16(s) => s[k] = to_f16(v),
            ScaleRow::F32(s) => s[k] = v,
        }
    }
}

fn scale_rows(s: &mut Scales, groups: usize) -> Vec<ScaleRow<'_>> {
    match s {
        Scales::F16(v) => v.chunks_mut(groups).map(ScaleRow::F16).collect(),
        Scales::F32(v) => v.chunks_mut(groups).map(ScaleRow::F32).collect(),
    }
}

/// Where a row's per-group scales and mins go, and the first group whose
/// scale or min is not finite (the storage type's range was exceeded).
struct Sink<'a> {
    s: ScaleRow<'a>,
    m: Option<ScaleRow<'a>>,
    bad: Option<(usize, f32, f32)>,
}

impl Sink<'_> {
    #[inline(always)]
    fn put(&mut self, k: usize, s: f32, m: f32, to_f16: impl Fn(f32) -> u16 + Copy) {
        if self.bad.is_none() && !(s.is_finite() && m.is_finite()) {
            self.bad = Some((k, s, m));
        }
        self.s.set(k, s, to_f16);
        if let Some(mins) = &mut self.m {
            mins.set(k, m, to_f16);
        }
    }
}

/// Group `k` (`g` weights) of a row: borrowed where the row holds all of it,
/// else its weights copied into `buf` and padded with zeros (the last group of
/// a row whose length is not a multiple of `g`).
#[inline(always)]
pub(super) fn padded_group<'a>(
    w: &'a [f32],
    k: usize,
    g: usize,
    buf: &'a mut [f32; 256],
) -> &'a [f32] {
    let src = &w[(k * g).min(w.len())..((k + 1) * g).min(w.len())];
    if src.len() == g {
        return src;
    }
    buf[..src.len()].copy_from_slice(src);
    buf[src.len()..g].fill(0.0);
    &buf[..g]
}

/// Quantizes one row into its packed bytes and per-group scales/mins (the
/// scalar reference, and every level's `search` path); returns whether the
/// row holds a NaN or an infinity (then nothing is written).
#[inline(always)]
fn row(p: &Params, search: bool, w: &[f32], out: &mut [u8], sink: &mut Sink<'_>) -> bool {
    if w.iter().any(|v| !v.is_finite()) {
        return true;
    }
    let g = p.group_size;
    let gb = p.group_bytes();
    let mut buf = [0f32; 256];
    let mut codes = [0u8; 256];
    for (k, dst) in out.chunks_exact_mut(gb).enumerate() {
        let wg = padded_group(w, k, g, &mut buf);
        let (sc, mn) = group(p, search, wg, &mut codes[..g]);
        pack_group(p.bits, &codes[..g], dst);
        sink.put(k, sc, mn, |x| f16::from_f32(x).to_bits());
    }
    false
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn row_avx2(
    p: &Params,
    search: bool,
    w: &[f32],
    out: &mut [u8],
    sink: &mut Sink<'_>,
) -> bool {
    row(p, search, w, out, sink)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
unsafe fn row_avx512(
    p: &Params,
    search: bool,
    w: &[f32],
    out: &mut [u8],
    sink: &mut Sink<'_>,
) -> bool {
    row(p, search, w, out, sink)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn rtn_avx2(p: &Params, w: &[f32], out: &mut [u8], sink: &mut Sink<'_>) -> bool {
    // SAFETY: the features `kernels::Avx2` needs are enabled on this function.
    unsafe {
        kernels::row::<kernels::Avx2>(p, w, out, |k, s, m| {
            sink.put(k, s, m, |x| kernels::f16_bits(x))
        })
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
unsafe fn rtn_avx512(p: &Params, w: &[f32], out: &mut [u8], sink: &mut Sink<'_>) -> bool {
    // SAFETY: the features `kernels::Avx512` needs are enabled on this function.
    unsafe {
        kernels::row::<kernels::Avx512>(p, w, out, |k, s, m| {
            sink.put(k, s, m, |x| kernels::f16_bits(x))
        })
    }
}

/// Whether the explicit-SIMD kernels (which convert float16 with F16C) can run.
#[cfg(target_arch = "x86_64")]
#[inline]
fn has_f16c() -> bool {
    std::arch::is_x86_feature_detected!("f16c")
}

fn row_at(
    level: Level,
    p: &Params,
    search: bool,
    w: &[f32],
    out: &mut [u8],
    sink: &mut Sink<'_>,
) -> bool {
    match level {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: callers pass a level that passed `Level::check` (AVX2 + FMA),
        // and F16C is checked here.
        Level::Avx2 if !search && has_f16c() => unsafe { rtn_avx2(p, w, out, sink) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: callers pass a level that passed `Level::check` (AVX2 + FMA).
        Level::Avx2 => unsafe { row_avx2(p, search, w, out, sink) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: callers pass a level that passed `Level::check` (AVX-512
        // F/BW/VL, which imply AVX2 and FMA), and F16C is checked here.
        Level::Avx512 if !search && has_f16c() => unsafe { rtn_avx512(p, w, out, sink) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: callers pass a level that passed `Level::check` (AVX-512 F/BW/VL).
        Level::Avx512 => unsafe { row_avx512(p, search, w, out, sink) },
        _ => row(p, search, w, out, sink),
    }
}

/// Quantizes a row-major (rows, cols) matrix at the process-wide SIMD level.
pub fn quantize(
    w: &[f32],
    rows: usize,
    cols: usize,
    params: Params,
    search: bool,
) -> Result<QuantizedWeights> {
    quantize_at(crate::simd::level()?, w, rows, cols, params, search)
}

/// Quantizes at an explicit level (the result is the same at every level).
///
/// One pass over `w`: each row task checks its weights for NaN and infinity
/// while quantizing and writes scales and mins in their storage type.
pub fn quantize_at(
    level: Level,
    w: &[f32],
    rows: usize,
    cols: usize,
    p: Params,
    search: bool,
) -> Result<QuantizedWeights> {
    level.check()?;
    validate::non_empty("w", &[rows, cols])?;
    if w.len() != rows * cols {
        return Err(Error::shape("w", format!("({rows}, {cols})"), &[w.len()]));
    }
    if p.scheme.gguf_shape().is_some() && !cols.is_multiple_of(32) {
        return Err(Error::value(
            "w",
            format!(
                "a row length divisible by 32 for scheme {}",
                p.scheme.name()
            ),
            format!("{cols} columns"),
        ));
    }
    let groups = p.groups(cols);
    let rb = p.row_bytes(cols);
    let mut data = vec![0u8; rows * rb];
    advise_huge(&data);
    let mut scales = Scales::zeros(p.scale_type, rows * groups);
    let mut mins = p
        .scheme
        .has_min()
        .then(|| Scales::zeros(p.scale_type, rows * groups));
    let s_rows = scale_rows(&mut scales, groups);
    let m_rows: Vec<Option<ScaleRow<'_>>> = match &mut mins {
        Some(m) => scale_rows(m, groups).into_iter().map(Some).collect(),
        None => (0..rows).map(|_| None).collect(),
    };
    // The first problem: a non-finite weight anywhere wins over a range error.
    let issue = crate::threads::install(|| {
        data.par_chunks_mut(rb)
            .zip(s_rows.into_par_iter().zip(m_rows))
            .zip(w.par_chunks(cols))
            .enumerate()
            .with_min_len(8)
            .filter_map(|(r, ((out, (s, m)), wr))| {
                let mut sink = Sink { s, m, bad: None };
                if row_at(level, &p, search, wr, out, &mut sink) {
                    Some((0, r, None))
                } else {
                    sink.bad.map(|b| (1, r, Some(b)))
                }
            })
            .min_by_key(|(kind, r, _)| (*kind, *r))
    })?;
    match issue {
        Some((_, _, None)) => {
            validate::finite("w", w)?;
            unreachable!("a row reported a non-finite weight")
        }
        Some((_, r, Some((k, sk, mk)))) => Err(Error::value(
            "w",
            format!(
                "a range that {} scales can hold (use scale_dtype=float32)",
                p.scale_type.name()
            ),
            format!("row {r} group {k} with scale {sk} and min {mk}"),
        )),
        None => Ok(QuantizedWeights {
            params: p,
            rows,
            cols,
            data,
            scales,
            mins,
        }),
    }
}

#[cfg(test)]
#[path = "quantize_tests.rs"]
mod tests;
