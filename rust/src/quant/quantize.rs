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
        let src = &w[(k * g).min(w.len())..((k + 1) * g).min(w.len())];
        let wg: &[f32] = if src.len() == g {
            src
        } else {
            buf[..src.len()].copy_from_slice(src);
            buf[src.len()..g].fill(0.0);
            &buf[..g]
        };
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
mod tests {
    use super::super::dequantize::{dequant_row_at, dequantize, dequantize_into_at, fast_dequant};
    use super::*;
    use proptest::prelude::*;

    fn lcg(seed: u64, n: usize, spread: f32) -> Vec<f32> {
        let mut s = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * spread
            })
            .collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        #[test]
        fn round_trip_within_half_a_step(
            bits in prop::sample::select(vec![2u8, 3, 4, 8]),
            g in prop::sample::select(vec![32usize, 64, 128, 256]),
            sym in any::<bool>(),
            f32s in any::<bool>(),
            cols in 1usize..300,
            seed in any::<u64>(),
        ) {
            let scheme = if sym { Scheme::Sym } else { Scheme::Asym };
            let t = if f32s { ScaleType::F32 } else { ScaleType::F16 };
            let p = Params::new(bits, g, scheme, t).unwrap();
            let rows = 3;
            let w = lcg(seed, rows * cols, 4.0);
            let want = quantize_at(Level::Scalar, &w, rows, cols, p, false).unwrap();
            for level in Level::supported() {
                let q = quantize_at(level, &w, rows, cols, p, false).unwrap();
                prop_assert_eq!(&q, &want, "level {}", level);
            }
            let v = want.view();
            let d = dequantize(&v).unwrap();
            for r in 0..rows {
                for c in 0..cols {
                    let s = v.scales.get(r * p.groups(cols) + c / g);
                    let (x, y) = (w[r * cols + c], d[r * cols + c]);
                    prop_assert!((x - y).abs() <= s / 2.0 * 1.0001 + 1e-6 * x.abs().max(1.0), "{x} vs {y}, scale {s}");
                }
            }
        }
    }

    /// Weights of one of several shapes of data: spread uniform values,
    /// small integers (ties between the largest and smallest, all-zero
    /// groups), values so tiny that scales are subnormal (reciprocals
    /// overflow), and huge ones.
    fn kinds(kind: u8, seed: u64, n: usize) -> Vec<f32> {
        let u = lcg(seed, n, 1.0);
        match kind {
            0 => u.iter().map(|x| x * 4.0).collect(),
            1 => u.iter().map(|x| (x * 5.0).round()).collect(),
            // with exact zeros: 0 times an overflowed reciprocal is NaN
            2 => u
                .iter()
                .enumerate()
                .map(|(i, x)| if i % 5 == 0 { 0.0 } else { x * 1e-38 })
                .collect(),
            3 => u
                .iter()
                .enumerate()
                .map(|(i, x)| if i % 5 == 0 { 0.0 } else { x * 3e-41 })
                .collect(),
            4 => u.iter().map(|x| x * 6e4).collect(),
            _ => u
                .iter()
                .enumerate()
                .map(|(i, x)| if i % 7 < 5 { 0.0 } else { x + 0.75 })
                .collect(),
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(160))]
        /// Every level gives the scalar reference's bytes (quantize) and float
        /// bits (dequantize), on odd shapes: one row, short tails, columns
        /// that are no multiple of the group, every scheme and width.
        #[test]
        fn every_level_matches_scalar(
            scheme in prop::sample::select(Scheme::ALL.to_vec()),
            bits in prop::sample::select(vec![2u8, 3, 4, 8]),
            g in prop::sample::select(vec![32usize, 64, 128, 256]),
            f32s in any::<bool>(),
            rows in 1usize..5,
            cols in 1usize..700,
            kind in 0u8..6,
            seed in any::<u64>(),
        ) {
            let (bits, g, t, cols) = match scheme.gguf_shape() {
                Some((b, gg)) => (b, gg, ScaleType::F16, cols.div_ceil(32) * 32),
                None => (bits, g, if f32s { ScaleType::F32 } else { ScaleType::F16 }, cols),
            };
            let p = Params::new(bits, g, scheme, t).unwrap();
            let w = kinds(kind, seed, rows * cols);
            let want = quantize_at(Level::Scalar, &w, rows, cols, p, false);
            let mut want_d = vec![0f32; rows * cols];
            if let Ok(q) = &want {
                dequantize_into_at(Level::Scalar, &q.view(), &mut want_d).unwrap();
            }
            for level in Level::supported() {
                let got = quantize_at(level, &w, rows, cols, p, false);
                match (&got, &want) {
                    (Ok(a), Ok(b)) => prop_assert_eq!(a, b, "level {}", level),
                    (Err(a), Err(b)) => prop_assert_eq!(a.to_string(), b.to_string()),
                    _ => prop_assert!(false, "level {level}: {got:?} vs {want:?}"),
                }
                if let Ok(q) = &want {
                    let mut d = vec![f32::NAN; rows * cols];
                    dequantize_into_at(level, &q.view(), &mut d).unwrap();
                    let bits_of = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                    prop_assert_eq!(bits_of(&d), bits_of(&want_d), "level {}", level);
                    let fast = fast_dequant(level);
                    for r in 0..rows {
                        let mut o = vec![f32::NAN; cols];
                        dequant_row_at(fast, &q.view(), r, &mut o);
                        prop_assert_eq!(bits_of(&o), bits_of(&want_d[r * cols..(r + 1) * cols]));
                    }
                }
            }
        }
    }

    #[test]
    fn signed_zeros_match_at_every_level() {
        // groups whose min or max is a zero of either sign, in every order
        let pats: [[f32; 4]; 4] = [
            [0.0, -0.0, 1.0, 2.0],
            [-0.0, 0.0, 1.0, 2.0],
            [0.0, -0.0, -1.0, -2.0],
            [-0.0, 0.0, -0.0, 0.0],
        ];
        // all-zero groups of mixed signs, and all negative zeros
        let zeros: Vec<Vec<f32>> = vec![
            (0..64)
                .map(|i| if i % 3 == 0 { -0.0 } else { 0.0 })
                .collect(),
            vec![-0.0; 64],
        ];
        for w in &zeros {
            for scheme in Scheme::ALL {
                let (bits, g) = scheme.gguf_shape().unwrap_or((4, 32));
                let p = Params::new(bits, g, scheme, ScaleType::F16).unwrap();
                let want = quantize_at(Level::Scalar, w, 2, 32, p, false).unwrap();
                for level in Level::supported() {
                    let got = quantize_at(level, w, 2, 32, p, false).unwrap();
                    assert_eq!(got, want, "{level} {scheme:?}");
                }
            }
        }
        let q8 = Params::new(8, 32, Scheme::Q8_0, ScaleType::F16).unwrap();
        let q = quantize(&zeros[1], 2, 32, q8, false).unwrap();
        assert_eq!(
            q.scales,
            Scales::F16(vec![0, 0]),
            "gguf's d = abs().max() / 127 is +0"
        );
        for pat in pats {
            for shift in 0..32 {
                let mut w = vec![0.5f32; 64];
                for (i, v) in pat.iter().enumerate() {
                    w[(shift + i * 9) % 64] = *v;
                }
                if pat[2] < 0.0 {
                    w.iter_mut().filter(|v| **v == 0.5).for_each(|v| *v = -0.5);
                }
                for scheme in Scheme::ALL {
                    let (bits, g) = scheme.gguf_shape().unwrap_or((4, 32));
                    let p = Params::new(bits, g, scheme, ScaleType::F16).unwrap();
                    let want = quantize_at(Level::Scalar, &w, 2, 32, p, false).unwrap();
                    for level in Level::supported() {
                        let got = quantize_at(level, &w, 2, 32, p, false).unwrap();
                        assert_eq!(got, want, "{level} {scheme:?} {pat:?} {shift}");
                    }
                }
            }
        }
    }

    #[test]
    fn non_finite_weights_are_reported_at_every_level() {
        let p = Params::new(4, 64, Scheme::Asym, ScaleType::F16).unwrap();
        let q = Params::new(4, 32, Scheme::Q4_0, ScaleType::F16).unwrap();
        for level in Level::supported() {
            for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
                let mut w = lcg(3, 40 * 96, 2.0);
                w[37 * 96 + 70] = bad;
                for params in [p, q] {
                    let e = quantize_at(level, &w, 40, 96, params, false).unwrap_err();
                    let want = format!("got {bad} at flat index {}", 37 * 96 + 70);
                    assert!(e.to_string().ends_with(&want), "{level}: {e}");
                }
            }
            // a range error in an early row loses to a NaN in a later one
            let mut w = lcg(3, 40 * 96, 2.0);
            w[0] = 1e30;
            w[1] = -1e30;
            let e = quantize_at(level, &w, 40, 96, p, false).unwrap_err();
            assert!(e.to_string().contains("row 0 group 0"), "{e}");
            w[39 * 96] = f32::NAN;
            let e = quantize_at(level, &w, 40, 96, p, false).unwrap_err();
            assert!(e.to_string().contains("finite"), "{e}");
        }
    }

    #[test]
    fn search_never_increases_error() {
        for (bits, scheme) in [
            (4, Scheme::Asym),
            (3, Scheme::Asym),
            (4, Scheme::Sym),
            (2, Scheme::Asym),
        ] {
            let p = Params::new(bits, 64, scheme, ScaleType::F16).unwrap();
            let w = lcg(7, 64 * 64, 2.0);
            let err = |search| {
                let q = quantize(&w, 64, 64, p, search).unwrap();
                let d = dequantize(&q.view()).unwrap();
                w.iter()
                    .zip(&d)
                    .map(|(a, b)| (a - b) * (a - b))
                    .sum::<f32>()
            };
            let (plain, searched) = (err(false), err(true));
            assert!(
                searched <= plain,
                "{bits}-bit {scheme:?}: {searched} > {plain}"
            );
        }
    }

    #[test]
    fn bad_input_is_rejected() {
        let p = Params::new(4, 32, Scheme::Asym, ScaleType::F16).unwrap();
        let e = quantize(&[1.0, f32::NAN], 1, 2, p, false).unwrap_err();
        assert!(e.to_string().contains("finite"), "{e}");
        let e = quantize(&[1e30, -1e30], 1, 2, p, false).unwrap_err();
        assert!(e.to_string().contains("float32"), "{e}");
        let q = Params::new(4, 32, Scheme::Q4_0, ScaleType::F16).unwrap();
        assert!(quantize(&[1.0; 40], 1, 40, q, false).is_err());
    }
}
