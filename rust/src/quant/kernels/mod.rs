//! Explicit-SIMD round-to-nearest quantize and 2/4/8-bit dequantize, written
//! once over a lane abstraction ([`Lanes`]) and instantiated for AVX2 (8 lanes)
//! and AVX-512 (16 lanes).
//!
//! Every operation is a single IEEE float32 operation in the same order as the
//! scalar reference in [`super::quantize`] (no fused multiply-add), and every
//! float16 conversion rounds to nearest even like `half::f16::from_f32`, so the
//! bytes and floats are identical at every level; the tests compare them.
//!
//! Clamping follows the scalar casts exactly: a NaN lane (only possible when a
//! scale is so small that its reciprocal overflows) becomes code 0 as
//! `NaN as u8` does, and `min`/`max` then bound the value as `clamp` does.

use super::format::{Params, ScaleType, Scheme};
use super::pack::pack_group;

/// The vector operations the kernels use. Implementors are zero-sized tags;
/// every method is `unsafe` because it carries `#[target_feature]` and needs
/// a CPU with those features (checked once by the callers' level dispatch).
pub(crate) trait Lanes {
    /// Lanes per vector.
    const N: usize;
    type F: Copy;
    type I: Copy;
    /// Loads `N` floats from `p` (unaligned).
    unsafe fn load(p: *const f32) -> Self::F;
    /// Stores `N` floats to `p` (unaligned).
    unsafe fn store(p: *mut f32, v: Self::F);
    unsafe fn splat(x: f32) -> Self::F;
    unsafe fn add(a: Self::F, b: Self::F) -> Self::F;
    unsafe fn sub(a: Self::F, b: Self::F) -> Self::F;
    unsafe fn mul(a: Self::F, b: Self::F) -> Self::F;
    /// Lane-wise minimum (operands never NaN where the kernels use it).
    unsafe fn min(a: Self::F, b: Self::F) -> Self::F;
    unsafe fn max(a: Self::F, b: Self::F) -> Self::F;
    /// NaN lanes to +0.0, others unchanged.
    unsafe fn nan_to_zero(a: Self::F) -> Self::F;
    /// Round half away from zero, as `f32::round`.
    unsafe fn round_away(a: Self::F) -> Self::F;
    /// Whether any lane is NaN.
    unsafe fn any_nan(a: Self::F) -> bool;
    unsafe fn hmin(a: Self::F) -> f32;
    unsafe fn hmax(a: Self::F) -> f32;
    /// The first lane where `|a| == x`, if any.
    unsafe fn first_abs_eq(a: Self::F, x: f32) -> Option<usize>;
    /// Truncates to integers (lanes hold values in `[0, 255]`).
    unsafe fn to_int(v: Self::F) -> Self::I;
    /// Stores the low byte of every lane (`N` bytes; lanes hold values below 256).
    unsafe fn store_bytes(v: Self::I, out: *mut u8);
    unsafe fn or(a: Self::I, b: Self::I) -> Self::I;
    unsafe fn shl(a: Self::I, n: i32) -> Self::I;
    /// Loads `N` bytes, zero-extended to 32-bit lanes.
    unsafe fn load_bytes(p: *const u8) -> Self::I;
    unsafe fn and(a: Self::I, m: i32) -> Self::I;
    unsafe fn shr(a: Self::I, n: i32) -> Self::I;
    unsafe fn to_f32(a: Self::I) -> Self::F;
    /// float16 bits of `x`, rounded to nearest even.
    unsafe fn f16_bits(x: f32) -> u16;
    unsafe fn f16_value(b: u16) -> f32;
}

/// Rounds `x` to the storage type: `dir` < 0 down, > 0 up, 0 to nearest (the
/// vector build of `quantize::to_storage`).
#[inline(always)]
unsafe fn to_storage<V: Lanes>(x: f32, t: ScaleType, dir: i8) -> f32 {
    // SAFETY: the caller's target features cover `V`'s (see `Lanes`), and
    // every pointer access stays inside the slices (lengths are multiples of `V::N`).
    unsafe {
        match t {
            ScaleType::F32 => x,
            ScaleType::F16 => {
                // Branch-free: whether rounding went the wrong way is a coin
                // toss per group, too costly as a branch.
                let h = V::f16_bits(x);
                let y = V::f16_value(h);
                let wrong = (dir > 0 && y < x) || (dir < 0 && y > x);
                let stepped = super::quantize::f16_step_bits(h, dir > 0);
                V::f16_value(std::hint::select_unpredictable(wrong, stepped, h))
            }
        }
    }
}

/// (min, max, any non-finite) of one group (`w.len()` a multiple of `N`).
#[inline(always)]
unsafe fn min_max<V: Lanes>(w: &[f32]) -> (f32, f32, bool) {
    // SAFETY: the caller's target features cover `V`'s (see `Lanes`), and
    // every pointer access stays inside the slices (lengths are multiples of `V::N`).
    unsafe {
        let p = w.as_ptr();
        let first = V::load(p);
        let (mut lo, mut hi) = (first, first);
        // v - v is 0 for finite v and NaN for NaN or infinity; the sum keeps a NaN.
        let mut bad = V::sub(first, first);
        let mut i = V::N;
        while i < w.len() {
            let v = V::load(p.add(i));
            lo = V::min(lo, v);
            hi = V::max(hi, v);
            bad = V::add(bad, V::sub(v, v));
            i += V::N;
        }
        let (lo, hi) = super::quantize::zero_signs(w, V::hmin(lo), V::hmax(hi));
        (lo, hi, V::any_nan(bad))
    }
}

/// A per-weight code rule: maps a vector of weights to float codes, whole
/// numbers in `[0, 2^bits)` once truncated.
trait Rule<V: Lanes> {
    unsafe fn code(&self, v: V::F) -> V::F;
}

/// `clamp((w - m) * inv + add, 0, maxq)`, a NaN lane to 0 as `NaN as u8`
/// does (asym, sym, Q4_0 with `m = 0`, Q4_1).
struct Affine<V: Lanes> {
    m: V::F,
    inv: V::F,
    add: V::F,
    maxq: V::F,
}

impl<V: Lanes> Affine<V> {
    #[inline(always)]
    unsafe fn new(m: f32, inv: f32, add: f32, maxq: f32) -> Self {
        // SAFETY: the caller's target features cover `V`'s (see `Lanes`).
        unsafe {
            Affine {
                m: V::splat(m),
                inv: V::splat(inv),
                add: V::splat(add),
                maxq: V::splat(maxq),
            }
        }
    }
}

impl<V: Lanes> Rule<V> for Affine<V> {
    #[inline(always)]
    unsafe fn code(&self, v: V::F) -> V::F {
        // SAFETY: the caller's target features cover `V`'s (see `Lanes`).
        unsafe {
            let x = V::add(V::mul(V::sub(v, self.m), self.inv), self.add);
            V::min(V::max(V::nan_to_zero(x), V::splat(0.0)), self.maxq)
        }
    }
}

/// Q4_0: `min(trunc(w * id + 8.5), 15)`, saturating at 0.
struct Q40<V: Lanes> {
    id: V::F,
}

impl<V: Lanes> Rule<V> for Q40<V> {
    #[inline(always)]
    unsafe fn code(&self, v: V::F) -> V::F {
        // SAFETY: the caller's target features cover `V`'s (see `Lanes`).
        unsafe {
            let x = V::add(V::mul(v, self.id), V::splat(8.5));
            V::min(V::max(V::nan_to_zero(x), V::splat(0.0)), V::splat(15.0))
        }
    }
}

/// Q8_0: `round(w * id)` (half away from zero) clamped to [-128, 127], plus 128.
struct Q80<V: Lanes> {
    id: V::F,
}

impl<V: Lanes> Rule<V> for Q80<V> {
    #[inline(always)]
    unsafe fn code(&self, v: V::F) -> V::F {
        // SAFETY: the caller's target features cover `V`'s (see `Lanes`).
        unsafe {
            let x = V::round_away(V::nan_to_zero(V::mul(v, self.id)));
            let x = V::min(V::max(x, V::splat(-128.0)), V::splat(127.0));
            V::add(x, V::splat(128.0))
        }
    }
}

/// Codes of one group by `rule`, packed into `out` (the layouts of
/// [`super::pack`]): 8-, 4- and (planes of at least `N`) 2-bit codes are
/// combined in registers; 3-bit codes go through `codes` and `pack_group`.
#[inline(always)]
unsafe fn encode<V: Lanes, R: Rule<V>>(
    rule: &R,
    bits: u8,
    w: &[f32],
    out: &mut [u8],
    codes: &mut [u8],
) {
    // SAFETY: the caller's target features cover `V`'s (see `Lanes`); `w` is a
    // whole group (a multiple of `V::N`), `out` its packed bytes, `codes` as long as `w`.
    unsafe {
        let g = w.len();
        let (p, o) = (w.as_ptr(), out.as_mut_ptr());
        let at = |i: usize| V::to_int(rule.code(V::load(p.add(i))));
        match bits {
            8 => {
                let mut j = 0;
                while j < g {
                    V::store_bytes(at(j), o.add(j));
                    j += V::N;
                }
            }
            4 => {
                let h = g / 2;
                let mut j = 0;
                while j < h {
                    V::store_bytes(V::or(at(j), V::shl(at(h + j), 4)), o.add(j));
                    j += V::N;
                }
            }
            2 if (g / 4).is_multiple_of(V::N) => {
                let q = g / 4;
                let mut j = 0;
                while j < q {
                    let lo = V::or(at(j), V::shl(at(q + j), 2));
                    let hi = V::or(V::shl(at(2 * q + j), 4), V::shl(at(3 * q + j), 6));
                    V::store_bytes(V::or(lo, hi), o.add(j));
                    j += V::N;
                }
            }
            _ => {
                let c = codes.as_mut_ptr();
                let mut j = 0;
                while j < g {
                    V::store_bytes(at(j), c.add(j));
                    j += V::N;
                }
                pack_group(bits, &codes[..g], out);
            }
        }
    }
}

/// The first weight whose magnitude is `amax` (`lo`/`hi` are the group's range).
#[inline(always)]
unsafe fn signed_max<V: Lanes>(w: &[f32], lo: f32, hi: f32) -> f32 {
    // SAFETY: the caller's target features cover `V`'s (see `Lanes`), and
    // every pointer access stays inside the slices (lengths are multiples of `V::N`).
    unsafe {
        if hi != -lo {
            // which end is larger is a coin toss per group: no branch
            return std::hint::select_unpredictable(hi > -lo, hi, lo);
        }
        // a tie (both signs, or all zeros): the first in order decides the sign
        let amax = hi;
        let mut i = 0;
        while i < w.len() {
            if let Some(j) = V::first_abs_eq(V::load(w.as_ptr().add(i)), amax) {
                return w[i + j];
            }
            i += V::N;
        }
        0.0
    }
}

/// Quantizes one full group (round to nearest); returns (scale, min, any
/// non-finite weight) exactly as `quantize::group` does without search.
#[inline(always)]
pub(crate) unsafe fn group<V: Lanes>(
    p: &Params,
    w: &[f32],
    out: &mut [u8],
    codes: &mut [u8],
) -> (f32, f32, bool) {
    // SAFETY: the caller's target features cover `V`'s (see `Lanes`), and
    // every pointer access stays inside the slices (lengths are multiples of `V::N`).
    unsafe {
        let maxq = p.max_code() as f32;
        let t = p.scale_type;
        let (lo, hi, bad) = min_max::<V>(w);
        match p.scheme {
            Scheme::Asym => {
                let m = to_storage::<V>(lo, t, -1);
                let s = to_storage::<V>((hi - m) / maxq, t, 1);
                let inv = if s > 0.0 { 1.0 / s } else { 0.0 };
                encode::<V, _>(&Affine::<V>::new(m, inv, 0.5, maxq), p.bits, w, out, codes);
                (s, m, bad)
            }
            Scheme::Sym => {
                let off = p.offset() as f32;
                let a = hi.abs().max(lo.abs());
                let s = to_storage::<V>(a / (off - 1.0), t, 1);
                let inv = if s > 0.0 { 1.0 / s } else { 0.0 };
                encode::<V, _>(
                    &Affine::<V>::new(-off * s, inv, 0.5, maxq),
                    p.bits,
                    w,
                    out,
                    codes,
                );
                (s, -off * s, bad)
            }
            Scheme::Q4_0 => {
                let d = signed_max::<V>(w, lo, hi) / -8.0;
                let id = if d == 0.0 { 0.0 } else { 1.0 / d };
                encode::<V, _>(&Q40::<V> { id: V::splat(id) }, 4, w, out, codes);
                let d = V::f16_value(V::f16_bits(d));
                (d, -8.0 * d, bad)
            }
            Scheme::Q4_1 => {
                let d = (hi - lo) / 15.0;
                let id = if d == 0.0 { 0.0 } else { 1.0 / d };
                encode::<V, _>(&Affine::<V>::new(lo, id, 0.5, 15.0), 4, w, out, codes);
                (
                    V::f16_value(V::f16_bits(d)),
                    V::f16_value(V::f16_bits(lo)),
                    bad,
                )
            }
            Scheme::Q8_0 => {
                let d = hi.abs().max(lo.abs()) / 127.0;
                let id = if d == 0.0 { 0.0 } else { 1.0 / d };
                encode::<V, _>(&Q80::<V> { id: V::splat(id) }, 8, w, out, codes);
                let d = V::f16_value(V::f16_bits(d));
                (d, -128.0 * d, bad)
            }
        }
    }
}

/// Quantizes one row (round to nearest), handing each group's (index, scale,
/// min) to `emit`; returns whether the row holds a NaN or an infinity.
#[inline(always)]
pub(crate) unsafe fn row<V: Lanes>(
    p: &Params,
    w: &[f32],
    out: &mut [u8],
    mut emit: impl FnMut(usize, f32, f32),
) -> bool {
    // SAFETY: the caller's target features cover `V`'s (see `Lanes`), and
    // every pointer access stays inside the slices (lengths are multiples of `V::N`).
    unsafe {
        let g = p.group_size;
        let gb = p.group_bytes();
        let mut buf = [0f32; 256];
        let mut codes = [0u8; 256];
        let mut bad = false;
        for (k, dst) in out.chunks_exact_mut(gb).enumerate() {
            let wg = super::quantize::padded_group(w, k, g, &mut buf);
            let (s, m, b) = group::<V>(p, wg, dst, &mut codes[..g]);
            bad |= b;
            emit(k, s, m);
        }
        bad
    }
}

#[inline(always)]
unsafe fn affine<V: Lanes>(u: V::F, s: V::F, m: V::F, off: Option<V::F>) -> V::F {
    // SAFETY: the caller's target features cover `V`'s (see `Lanes`), and
    // every pointer access stays inside the slices (lengths are multiples of `V::N`).
    unsafe {
        match off {
            Some(o) => V::mul(s, V::sub(u, o)),
            None => V::add(V::mul(s, u), m),
        }
    }
}

/// Dequantizes one full group of 2-, 4- or 8-bit codes (`dst.len()` = group
/// size) as `s * u + m` (`sym`: `s * (u - off)`); returns false, writing
/// nothing, for layouts it does not cover (3 bits, 2-bit planes shorter than `N`).
#[inline(always)]
pub(crate) unsafe fn dequant_group<V: Lanes>(
    bits: u8,
    bytes: &[u8],
    s: f32,
    m: f32,
    sym: Option<f32>,
    dst: &mut [f32],
) -> bool {
    // SAFETY: the caller's target features cover `V`'s (see `Lanes`), and
    // every pointer access stays inside the slices (lengths are multiples of `V::N`).
    unsafe {
        let g = dst.len();
        let (vs, vm) = (V::splat(s), V::splat(m));
        let voff = sym.map(|o| V::splat(o));
        let (b, o) = (bytes.as_ptr(), dst.as_mut_ptr());
        match bits {
            8 => {
                let mut j = 0;
                while j < g {
                    V::store(
                        o.add(j),
                        affine::<V>(V::to_f32(V::load_bytes(b.add(j))), vs, vm, voff),
                    );
                    j += V::N;
                }
            }
            4 => {
                let h = g / 2;
                let mut j = 0;
                while j < h {
                    let x = V::load_bytes(b.add(j));
                    V::store(
                        o.add(j),
                        affine::<V>(V::to_f32(V::and(x, 15)), vs, vm, voff),
                    );
                    V::store(
                        o.add(h + j),
                        affine::<V>(V::to_f32(V::shr(x, 4)), vs, vm, voff),
                    );
                    j += V::N;
                }
            }
            2 if (g / 4).is_multiple_of(V::N) => {
                let q = g / 4;
                let mut j = 0;
                while j < q {
                    let x = V::load_bytes(b.add(j));
                    for k in 0..4 {
                        let u = V::to_f32(V::and(V::shr(x, 2 * k as i32), 3));
                        V::store(o.add(k * q + j), affine::<V>(u, vs, vm, voff));
                    }
                    j += V::N;
                }
            }
            _ => return false,
        }
        true
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) use x86::{f16_bits, Avx2, Avx512};

#[cfg(target_arch = "x86_64")]
mod x86;
