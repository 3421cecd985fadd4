//! Fused `y += a * codes(w)` and `codes(w) · x` loops for the stored element
//! types: one pass over the codes, where the generic path (decode a chunk to
//! f32, then the f32 kernel) stores and reloads every value once more. The
//! input-sparse sweep adds one weight run per kept input into accumulators
//! that stay in L1; there the extra store and load per value, not memory,
//! bounded f16 and int8 (measured on Zen 5: the dense f16 sweep ran at 0.8
//! cycles per weight).
//!
//! The adds at AVX-512 (f16, int8, int4; f16 also at AVX2 + F16C) and the
//! f16 and int4 dots are explicit loops; int4 values are looked up in a
//! 16-entry table (`vpermps`), not converted. The adds ask for the kept input
//! ahead one cache line at a time as they go: on Zen 5 at 4096x11008, sparse
//! calls ran 2-12% faster than with the compiler-widened loop and a prefetch
//! burst per 512-byte slice, which remains for the other levels.
//! (Prefetching into L2 instead of L1 measured the same.)
//!
//! The explicit loops use a fused multiply-add (the int4 add: the table's
//! product, then an add); the widened loops and the
//! baseline a multiply then an add (Rust does not contract them, and a
//! baseline `mul_add` would be a libm call per value), so levels may differ in
//! the last bit, as the f32 axpy levels do.

use half::f16;

use super::elem::{Elem, Q4, Q8};
use super::rows::GROUP;

/// Hints the CPU to load the bytes `start..end`, one request per cache line
/// (a prefetch never faults, and `wrapping_add` keeps the address arithmetic
/// defined, whatever the range).
pub(super) fn prefetch_range(start: *const u8, end: *const u8) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        let len = (end as usize).saturating_sub(start as usize);
        for off in (0..len).step_by(64) {
            // SAFETY: SSE (`prefetcht0`) is part of the x86-64 baseline, and a
            // prefetch never faults, whatever the address.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(start.wrapping_add(off) as *const i8) };
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (start, end);
}

/// `y += a * w` for f16 `w`, 16 values per `vcvtph2ps` + `vfmadd`, asking for
/// the line of `next` at the same offset every 64 bytes of `w` (null: none).
///
/// # Safety
/// The CPU must have AVX-512 F. (`next` is only prefetched, never read.)
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn f16_axpy_avx512(a: f32, w: &[f16], y: &mut [f32], next: *const u8) {
    use std::arch::x86_64::*;
    let n = w.len().min(y.len());
    let (pw, py) = (w.as_ptr() as *const u16, y.as_mut_ptr());
    let av = _mm512_set1_ps(a);
    let mut i = 0;
    while i + 16 <= n {
        if !next.is_null() && i % 32 == 0 {
            // A prefetch never faults, whatever the address.
            _mm_prefetch::<_MM_HINT_T0>(next.wrapping_add(2 * i) as *const i8);
        }
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

/// [`f16_axpy_avx512`] with 8 values per `vcvtph2ps` (F16C) + `vfmadd`.
///
/// # Safety
/// The CPU must have AVX2, FMA and F16C. (`next` is only prefetched.)
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn f16_axpy_f16c(a: f32, w: &[f16], y: &mut [f32], next: *const u8) {
    use std::arch::x86_64::*;
    let n = w.len().min(y.len());
    let (pw, py) = (w.as_ptr() as *const u16, y.as_mut_ptr());
    let av = _mm256_set1_ps(a);
    let mut i = 0;
    while i + 8 <= n {
        if !next.is_null() && i % 32 == 0 {
            // A prefetch never faults, whatever the address.
            _mm_prefetch::<_MM_HINT_T0>(next.wrapping_add(2 * i) as *const i8);
        }
        // SAFETY: i + 8 <= n: 8 halves (16 bytes) read, 8 floats of `y` read
        // and written, unaligned.
        unsafe {
            let h = _mm256_cvtph_ps(_mm_loadu_si128(pw.add(i) as *const __m128i));
            _mm256_storeu_ps(
                py.add(i),
                _mm256_fmadd_ps(av, h, _mm256_loadu_ps(py.add(i))),
            );
        }
        i += 8;
    }
    for j in i..n {
        y[j] = a.mul_add(w[j].to_f32(), y[j]);
    }
}

/// `y += a * codes(w)` for int8 codes, 16 per `vpmovsxbd` + `vcvtdq2ps` +
/// `vfmadd`, asking for the line of `next` at the same offset every 64 codes
/// (null: none): requests spread one per line, as in the f16 loop, rather than
/// a slice's burst.
///
/// # Safety
/// The CPU must have AVX-512 F. (`next` is only prefetched, never read.)
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn q8_axpy_avx512(a: f32, w: &[Q8], y: &mut [f32], next: *const u8) {
    use std::arch::x86_64::*;
    let n = w.len().min(y.len());
    let (pw, py) = (w.as_ptr() as *const i8, y.as_mut_ptr());
    let av = _mm512_set1_ps(a);
    let mut i = 0;
    while i + 16 <= n {
        if !next.is_null() && i % 64 == 0 {
            // A prefetch never faults, whatever the address.
            _mm_prefetch::<_MM_HINT_T0>(next.wrapping_add(i) as *const i8);
        }
        // SAFETY: i + 16 <= n: 16 codes (16 bytes) read, 16 floats of `y`
        // read and written, unaligned.
        unsafe {
            let c = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(
                pw.add(i) as *const __m128i
            )));
            _mm512_storeu_ps(
                py.add(i),
                _mm512_fmadd_ps(av, c, _mm512_loadu_ps(py.add(i))),
            );
        }
        i += 16;
    }
    for j in i..n {
        y[j] += a * f32::from(w[j].0);
    }
}

/// `y += a * codes(w)` for int4 codes (two per byte, low nibble first, value
/// `code - 8`), 32 values per step, asking for the line of `next` every 64
/// bytes (as [`q8_axpy_avx512`]).
///
/// A code has only 16 values, so `a * (code - 8)` is looked up, not computed:
/// `vpermps` picks from a 16-float table built once per call, indexed by the
/// low 4 bits of each lane (the nibble above it is ignored, so no mask). The
/// convert, subtract and multiply of the plain loop were the bound: its dense
/// sweep read int4 at 22 GB/s where int8 read at 38 (Zen 5); this one does
/// half the vector work per value. Each value is rounded once in the table
/// and once in the add (the plain loop: once, in a fused multiply-add).
///
/// # Safety
/// The CPU must have AVX-512 F; `y.len() >= 2 * w.len()`. (`next` is only
/// prefetched, never read.)
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn q4_axpy_avx512(a: f32, w: &[Q4], y: &mut [f32], next: *const u8) {
    use std::arch::x86_64::*;
    let n = w.len().min(y.len() / 2);
    let (pw, py) = (w.as_ptr() as *const u8, y.as_mut_ptr());
    // a * (code - 8) for every code.
    let table = _mm512_mul_ps(_mm512_set1_ps(a), q4_values());
    let mut i = 0;
    while i + 16 <= n {
        if !next.is_null() && i % 64 == 0 {
            // A prefetch never faults, whatever the address.
            _mm_prefetch::<_MM_HINT_T0>(next.wrapping_add(i) as *const i8);
        }
        // SAFETY: i + 16 <= n: 16 bytes of codes read; 32 floats of `y` (at
        // 2 i .. 2 i + 32 <= 2 n <= y.len()) read and written, unaligned.
        unsafe {
            for (k, lanes) in q4_lanes(pw.add(i)).into_iter().enumerate() {
                let v = _mm512_permutexvar_ps(lanes, table);
                let at = py.add(2 * i + 16 * k);
                _mm512_storeu_ps(at, _mm512_add_ps(_mm512_loadu_ps(at), v));
            }
        }
        i += 16;
    }
    for j in i..n {
        y[2 * j] += a * (f32::from(w[j].0 & 15) - 8.0);
        y[2 * j + 1] += a * (f32::from(w[j].0 >> 4) - 8.0);
    }
}

/// The 16 values of an int4 code, `code - 8`, as `_mm512_set_ps` lists
/// them (lane 15 first): the table [`q4_axpy_avx512`] scales and
/// [`q4_dot_avx512`] reads.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn q4_values() -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::_mm512_set_ps;
    _mm512_set_ps(
        7.0, 6.0, 5.0, 4.0, 3.0, 2.0, 1.0, 0.0, -1.0, -2.0, -3.0, -4.0, -5.0, -6.0, -7.0, -8.0,
    )
}

/// The 32 codes of 16 bytes as two vectors of 16 `u32` lanes whose low 4
/// bits are the codes in value order (the nibble above is the next code,
/// which `vpermps` ignores): each byte next to itself shifted down a nibble.
///
/// # Safety
/// The CPU must have AVX-512 F; `p` must be valid for reading 16 bytes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn q4_lanes(p: *const u8) -> [std::arch::x86_64::__m512i; 2] {
    use std::arch::x86_64::*;
    // SAFETY: the caller guarantees 16 readable bytes at `p` (unaligned load).
    let b = unsafe { _mm_loadu_si128(p as *const __m128i) };
    let hi = _mm_srli_epi16(b, 4);
    [
        _mm512_cvtepu8_epi32(_mm_unpacklo_epi8(b, hi)),
        _mm512_cvtepu8_epi32(_mm_unpackhi_epi8(b, hi)),
    ]
}

/// 16 int4 values (8 bytes at `p`, low nibble first) as one vector, looked
/// up as in [`q4_axpy_avx512`].
///
/// # Safety
/// The CPU must have AVX-512 F; `p` must be valid for reading 8 bytes.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(super) unsafe fn q4_lanes16(p: *const u8) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    // SAFETY: the caller guarantees AVX-512 F and 8 readable bytes at `p`.
    unsafe {
        let b = _mm_loadl_epi64(p as *const __m128i);
        let pair = _mm_unpacklo_epi8(b, _mm_srli_epi16(b, 4));
        _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(pair), q4_values())
    }
}

/// `ys[r * stride..][..len] += sum over q of coef[r][q] * codes(ws[q])` for
/// every row `r` (see `rows::axpy_group_rows`) in one pass: 16 values of each
/// run decoded into registers, then added into each row's outputs with one
/// load and store per row. Returns the values done (a multiple of 16); the
/// caller does the rest. Each line of `ahead` is requested as the same line
/// of `ws` is read.
///
/// # Safety
/// The CPU must have AVX-512 F. (`ys.len() >= (coef.len() - 1) * stride +
/// len`, where `len` is the shortest run's value count, is checked.)
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn group_rows_avx512<E: Elem>(
    (ws, ahead): ([&[E]; GROUP], Option<[&[E]; GROUP]>),
    coef: &[[f32; GROUP]],
    ys: &mut [f32],
    stride: usize,
) -> usize {
    use std::arch::x86_64::*;
    let units = ws.iter().map(|w| w.len()).min().unwrap_or(0);
    let full = units * E::LANES / 16 * 16;
    // Every row's run must fit in `ys`, checked without overflow (the row
    // offsets below then cannot wrap either).
    let end = match coef.len() {
        0 => Some(0),
        r => (r - 1)
            .checked_mul(stride)
            .and_then(|o| o.checked_add(full)),
    };
    assert!(
        end.is_some_and(|e| e <= ys.len()),
        "group_rows_avx512: outputs too short"
    );
    let (py, bytes16) = (ys.as_mut_ptr(), 16 / E::LANES * std::mem::size_of::<E>());
    let mut v = 0;
    while v < full {
        let at = v / 16 * bytes16;
        if let Some(next) = ahead.filter(|_| at % 64 == 0) {
            for run in next {
                // A prefetch never faults, whatever the address.
                let p = (run.as_ptr() as *const u8).wrapping_add(at);
                _mm_prefetch::<_MM_HINT_T0>(p as *const i8);
            }
        }
        // SAFETY: v + 16 <= full <= every run's value count.
        let w: [__m512; GROUP] = std::array::from_fn(|q| unsafe { E::lanes16(ws[q].as_ptr(), v) });
        // A row whose group coefficients are all 0 (every input masked
        // for it) is skipped: nothing to add.
        for (r, c) in coef.iter().enumerate().filter(|(_, c)| **c != [0.0; GROUP]) {
            // SAFETY: r * stride + v + 16 <= (coef.len() - 1) * stride + full
            // <= ys.len() (asserted above).
            unsafe {
                let p = py.add(r * stride + v);
                let mut y = _mm512_loadu_ps(p);
                for q in 0..GROUP {
                    y = _mm512_fmadd_ps(_mm512_set1_ps(c[q]), w[q], y);
                }
                _mm512_storeu_ps(p, y);
            }
        }
        v += 16;
    }
    full
}

/// `codes(w) · x` for int4 codes, 32 values per step, each value looked up
/// (as in [`q4_axpy_avx512`]) and multiplied into two accumulators.
///
/// # Safety
/// The CPU must have AVX-512 F; `x.len() >= 2 * w.len()`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn q4_dot_avx512(w: &[Q4], x: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let n = w.len().min(x.len() / 2);
    let (pw, px) = (w.as_ptr() as *const u8, x.as_ptr());
    let table = q4_values();
    let mut acc = [_mm512_setzero_ps(); 2];
    let mut i = 0;
    while i + 16 <= n {
        // SAFETY: i + 16 <= n: 16 bytes of codes read; 32 floats of `x` (at
        // 2 i .. 2 i + 32 <= 2 n <= x.len()) read, unaligned.
        unsafe {
            for (k, lanes) in q4_lanes(pw.add(i)).into_iter().enumerate() {
                let v = _mm512_permutexvar_ps(lanes, table);
                acc[k] = _mm512_fmadd_ps(v, _mm512_loadu_ps(px.add(2 * i + 16 * k)), acc[k]);
            }
        }
        i += 16;
    }
    let mut sum = _mm512_reduce_add_ps(_mm512_add_ps(acc[0], acc[1]));
    for j in i..n {
        sum += (f32::from(w[j].0 & 15) - 8.0) * x[2 * j];
        sum += (f32::from(w[j].0 >> 4) - 8.0) * x[2 * j + 1];
    }
    sum
}

/// `w · x` for f16 `w`: two 16-lane accumulators, `vcvtph2ps` + `vfmadd`.
///
/// # Safety
/// The CPU must have AVX-512 F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn f16_dot_avx512(w: &[f16], x: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let n = w.len().min(x.len());
    let (pw, px) = (w.as_ptr() as *const u16, x.as_ptr());
    let (mut a0, mut a1) = (_mm512_setzero_ps(), _mm512_setzero_ps());
    let half = |i: usize| {
        // SAFETY: callers pass i + 16 <= n: 16 halves (32 bytes) read, unaligned.
        unsafe { _mm512_cvtph_ps(_mm256_loadu_si256(pw.add(i) as *const __m256i)) }
    };
    let xs = |i: usize| {
        // SAFETY: callers pass i + 16 <= n: 16 floats read, unaligned.
        unsafe { _mm512_loadu_ps(px.add(i)) }
    };
    let mut i = 0;
    while i + 32 <= n {
        a0 = _mm512_fmadd_ps(half(i), xs(i), a0);
        a1 = _mm512_fmadd_ps(half(i + 16), xs(i + 16), a1);
        i += 32;
    }
    if i + 16 <= n {
        a0 = _mm512_fmadd_ps(half(i), xs(i), a0);
        i += 16;
    }
    let mut sum = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
    for j in i..n {
        sum += w[j].to_f32() * x[j];
    }
    sum
}
