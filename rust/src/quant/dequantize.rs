//! Dequantize: codes times scale plus min, back to float32, parallel over rows.
//!
//! The scalar reference unpacks a group and computes `s * u + m` (symmetric
//! schemes: `s * (u - 2^(bits-1))`) in plain f32; at AVX2 and AVX-512 the 2-,
//! 4- and 8-bit paths run the explicit kernels of `super::kernels`, which
//! repeat those operations lane by lane, so every level returns the same bits.
//! Large fresh outputs get transparent-huge-page advice (`super::pages`).

use rayon::prelude::*;

use super::format::{Params, QuantRef};
#[cfg(target_arch = "x86_64")]
use super::kernels;
use super::pack::unpack_group_f32;
use super::pages::advise_huge;
use crate::error::{Error, Result};
use crate::simd::Level;

/// Dequantizes one group (any width; `dst` may be a row's short last group).
#[inline(always)]
fn dequant_group(p: &Params, bytes: &[u8], s: f32, m: f32, sym: bool, dst: &mut [f32]) {
    let g = p.group_size;
    let mut buf = [0f32; 256];
    unpack_group_f32(p.bits, bytes, &mut buf[..g]);
    if !sym {
        for (o, u) in dst.iter_mut().zip(&buf[..g]) {
            *o = s * u + m;
        }
    } else {
        // scale * (u - offset): the integer is exact, and the sign of a zero
        // follows the scale's, as in ggml's `d * q`.
        let off = p.offset() as f32;
        for (o, u) in dst.iter_mut().zip(&buf[..g]) {
            *o = s * (u - off);
        }
    }
}

/// Dequantizes row `r`; `vector` handles whole groups it covers (returns
/// false for the rest, which take [`dequant_group`]).
#[inline(always)]
fn dequant_row_with(
    q: &QuantRef<'_>,
    r: usize,
    out: &mut [f32],
    vector: impl Fn(&[u8], f32, f32, Option<f32>, &mut [f32]) -> bool,
) {
    let p = &q.params;
    let (g, gb) = (p.group_size, p.group_bytes());
    let sym = q.mins.is_none();
    let off = sym.then(|| p.offset() as f32);
    let mut s = [0f32; 64];
    let mut m = [0f32; 64];
    for (k, bytes) in q.row(r).chunks_exact(gb).enumerate() {
        if k % 64 == 0 {
            let n = (q.groups() - k).min(64);
            q.row_scales_range(r, k, &mut s[..n], &mut m[..n]);
        }
        let dst = &mut out[k * g..((k + 1) * g).min(q.cols)];
        let (sk, mk) = (s[k % 64], m[k % 64]);
        if dst.len() < g || !vector(bytes, sk, mk, off, dst) {
            dequant_group(p, bytes, sk, mk, sym, dst);
        }
    }
}

#[inline(always)]
fn dequant_row(q: &QuantRef<'_>, r: usize, out: &mut [f32]) {
    dequant_row_with(q, r, out, |_, _, _, _, _| false)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dequant_row_avx2(q: &QuantRef<'_>, r: usize, out: &mut [f32]) {
    let bits = q.params.bits;
    dequant_row_with(q, r, out, |b, s, m, off, dst| {
        // SAFETY: AVX2 is enabled on this function; `dst` is a whole group of
        // `b`'s codes.
        unsafe { kernels::dequant_group::<kernels::Avx2>(bits, b, s, m, off, dst) }
    })
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
unsafe fn dequant_row_avx512(q: &QuantRef<'_>, r: usize, out: &mut [f32]) {
    let bits = q.params.bits;
    dequant_row_with(q, r, out, |b, s, m, off, dst| {
        // SAFETY: AVX-512 F is enabled on this function; `dst` is a whole
        // group of `b`'s codes.
        unsafe { kernels::dequant_group::<kernels::Avx512>(bits, b, s, m, off, dst) }
    })
}

/// Whether the AVX-512 + F16C build of the dequantize loop can run at `level`.
pub(crate) fn fast_dequant(level: Level) -> bool {
    #[cfg(target_arch = "x86_64")]
    return level == Level::Avx512 && std::arch::is_x86_feature_detected!("f16c");
    #[cfg(not(target_arch = "x86_64"))]
    return false;
}

/// Dequantizes row `r` into `out` (`q.cols` floats).
#[inline]
pub(crate) fn dequant_row_at(fast: bool, q: &QuantRef<'_>, r: usize, out: &mut [f32]) {
    if fast {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `fast` comes from `fast_dequant`, true only when the CPU has
        // AVX-512 F/BW/VL and F16C.
        unsafe {
            return dequant_row_avx512(q, r, out);
        }
    }
    dequant_row(q, r, out)
}

/// Dequantizes row `r` at `level` (identical floats at every level).
#[inline]
fn dequant_row_level(level: Level, q: &QuantRef<'_>, r: usize, out: &mut [f32]) {
    match level {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: callers pass a level that passed `Level::check` (AVX2 + FMA).
        Level::Avx2 => unsafe { dequant_row_avx2(q, r, out) },
        _ => dequant_row_at(fast_dequant(level), q, r, out),
    }
}

/// Dequantizes rows `0..q.rows` into `out` (rows x cols, padding dropped).
pub fn dequantize_into(q: &QuantRef<'_>, out: &mut [f32]) -> Result<()> {
    dequantize_into_at(crate::simd::level()?, q, out)
}

/// [`dequantize_into`] at an explicit level (the floats are the same at every level).
pub fn dequantize_into_at(level: Level, q: &QuantRef<'_>, out: &mut [f32]) -> Result<()> {
    level.check()?;
    if out.len() != q.rows * q.cols {
        return Err(Error::shape(
            "out",
            format!("({}, {})", q.rows, q.cols),
            &[out.len()],
        ));
    }
    crate::threads::install(|| {
        out.par_chunks_mut(q.cols)
            .enumerate()
            .with_min_len(16)
            .for_each(|(r, o)| dequant_row_level(level, q, r, o))
    })
}

/// Dequantizes to a new row-major (rows, cols) vector.
pub fn dequantize(q: &QuantRef<'_>) -> Result<Vec<f32>> {
    let mut out = vec![0f32; q.rows * q.cols];
    advise_huge(&out);
    dequantize_into(q, &mut out)?;
    Ok(out)
}
