//! The FFN activations: one value at a time ([`Activation::apply`]), or over
//! a tile of neurons at once ([`Activation::apply_tile`], SiLU with a
//! vectorisable exp: a sparse sweep applies the activation to every neuron of
//! a layer, and the libm `expf` call per neuron was a fifth of a small layer's
//! fixed cost).

use crate::error::{Error, Result};
use crate::simd::Level;

/// The FFN's non-linearity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `x * sigmoid(x)` (SwiGLU's gate, Llama, SmolLM2).
    Silu,
    /// `x * Phi(x)` with the exact (erf) normal CDF (BERT, MiniLM).
    Gelu,
    /// `max(x, 0)`.
    Relu,
}

impl Activation {
    /// Parses `silu`, `gelu` or `relu`.
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "silu" | "swish" => Ok(Activation::Silu),
            "gelu" => Ok(Activation::Gelu),
            "relu" => Ok(Activation::Relu),
            _ => Err(Error::value(
                "activation",
                "one of 'silu', 'gelu', 'relu'",
                format!("{name:?}"),
            )),
        }
    }

    /// Applies the activation to one value.
    #[inline]
    pub fn apply(self, x: f32) -> f32 {
        match self {
            Activation::Silu => x / (1.0 + (-x).exp()),
            Activation::Gelu => 0.5 * x * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2)),
            Activation::Relu => x.max(0.0),
        }
    }
}

impl Activation {
    /// `pre[j] = act(pre[j] + bias[j]) * up[j]` (no bias: 0; no `up`: 1) for
    /// every `j`, in SIMD lanes where `level` allows. SiLU uses [`exp`] (within
    /// 2 ulp of `expf`), the others [`Activation::apply`].
    pub fn apply_tile(
        self,
        level: Level,
        pre: &mut [f32],
        bias: Option<&[f32]>,
        up: Option<&[f32]>,
    ) {
        #[cfg(target_arch = "x86_64")]
        if level == Level::Avx512 && level.is_supported() {
            // SAFETY: AVX-512 F (level checked against the CPU).
            return unsafe { tile_avx512(self, pre, bias, up) };
        }
        #[cfg(target_arch = "x86_64")]
        if level >= Level::Avx2 && level.is_supported() {
            // SAFETY: AVX2 and FMA (level checked against the CPU).
            return unsafe { tile_avx2(self, pre, bias, up) };
        }
        let _ = level;
        tile(self, pre, bias, up);
    }
}

#[inline(always)]
fn tile(act: Activation, pre: &mut [f32], bias: Option<&[f32]>, up: Option<&[f32]>) {
    // One loop per case, each free of branches, so the compiler widens it.
    let f = |v: f32| match act {
        Activation::Silu => v / (1.0 + exp(-v)),
        _ => act.apply(v),
    };
    match (act, bias, up) {
        (Activation::Silu, None, Some(u)) => {
            for (p, &u) in pre.iter_mut().zip(u) {
                *p = *p / (1.0 + exp(-*p)) * u;
            }
        }
        (Activation::Silu, Some(b), None) => {
            for (p, &b) in pre.iter_mut().zip(b) {
                let v = *p + b;
                *p = v / (1.0 + exp(-v));
            }
        }
        _ => {
            for (j, p) in pre.iter_mut().enumerate() {
                let a = f(*p + bias.map_or(0.0, |b| b[j]));
                *p = up.map_or(a, |u| a * u[j]);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn tile_avx512(act: Activation, pre: &mut [f32], bias: Option<&[f32]>, up: Option<&[f32]>) {
    match (act, bias, up) {
        // SAFETY: AVX-512 F (this function's own target feature).
        // (Equal lengths only: the chunked loop pairs `pre` and `up` by position.)
        (Activation::Silu, None, Some(u)) if u.len() == pre.len() => unsafe {
            silu_up_avx512(pre, u)
        },
        _ => tile(act, pre, bias, up),
    }
}

/// SwiGLU's `pre = silu(pre) * up`, 16 neurons per step, with an exp made
/// of FMAs and `vscalefps` (`2^n` applied in one instruction, which also
/// takes care of overflow and underflow): about a third of the instructions
/// of the portable [`exp`], which Rust computes without FMA contraction.
/// A sparse sweep applies this to every neuron of the layer, so it is part
/// of every call's fixed cost (576x1536 at 90%: 0.45 of 7-10 us).
/// Same reduction and polynomial as [`exp`]; within 2 ulp of `expf` (tested
/// against [`Activation::apply`] through `apply_tile`).
///
/// # Safety
/// The CPU must have AVX-512 F. (`up` as long as `pre`, for a right result.)
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn silu_up_avx512(pre: &mut [f32], up: &[f32]) {
    debug_assert_eq!(pre.len(), up.len());
    use std::arch::x86_64::*;
    let c = |v: f32| _mm512_set1_ps(v);
    let (one, half) = (c(1.0), c(0.5));
    let mut pc = pre.chunks_exact_mut(16);
    let mut uc = up.chunks_exact(16);
    for (p, u) in (&mut pc).zip(&mut uc) {
        // SAFETY: `p` and `u` hold 16 f32 each (unaligned loads and store).
        unsafe {
            let v = _mm512_loadu_ps(p.as_ptr());
            // e^-v: clamped where 2^n is 0 or inf anyway, so `r` stays small.
            let neg = _mm512_sub_ps(_mm512_setzero_ps(), v);
            let x = _mm512_min_ps(_mm512_max_ps(neg, c(-104.0)), c(89.0));
            let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
                _mm512_mul_ps(x, c(std::f32::consts::LOG2_E)),
            );
            let r = _mm512_fnmadd_ps(n, c(0.693_359_4), x);
            let r = _mm512_fnmadd_ps(n, c(-2.121_944_4e-4), r);
            let mut q = _mm512_fmadd_ps(c(1.987_569_2e-4), r, c(1.398_199_9e-3));
            q = _mm512_fmadd_ps(q, r, c(8.333_452e-3));
            q = _mm512_fmadd_ps(q, r, c(4.166_579_6e-2));
            q = _mm512_fmadd_ps(q, r, c(1.666_666_5e-1));
            q = _mm512_fmadd_ps(q, r, half);
            let e = _mm512_fmadd_ps(_mm512_mul_ps(q, r), r, _mm512_add_ps(r, one));
            let e = _mm512_scalef_ps(e, n);
            // Above 88.5, inf as the portable `exp` gives (its SiLU is then
            // -0, which a threshold of 0 drops, at every level alike).
            let big = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(neg, c(88.5));
            let e = _mm512_mask_mov_ps(e, big, c(f32::INFINITY));
            let s = _mm512_div_ps(v, _mm512_add_ps(one, e));
            _mm512_storeu_ps(
                p.as_mut_ptr(),
                _mm512_mul_ps(s, _mm512_loadu_ps(u.as_ptr())),
            );
        }
    }
    tile(
        Activation::Silu,
        pc.into_remainder(),
        None,
        Some(uc.remainder()),
    );
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn tile_avx2(act: Activation, pre: &mut [f32], bias: Option<&[f32]>, up: Option<&[f32]>) {
    tile(act, pre, bias, up)
}

/// e^x for f32 `x`, within 2 ulp of `expf` on [-87, 88]; 0 below -87.5 and
/// +inf above 88.5 (in between, the value at the clamp: `expf` there is near
/// the f32 range's ends too). Cephes' `expf`: `x = n ln2 + r`, a degree-6
/// polynomial in `r`, `2^n` from the exponent bits; no branch and no call, so
/// a loop of it is widened to SIMD lanes.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 in two parts: n * LN2_HI is exact for |n| < 2^9.
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding and subtracting 1.5 * 2^23 rounds to the nearest integer.
    const ROUND: f32 = 12_582_912.0;
    let x0 = x;
    let x = x.clamp(-87.0, 88.0);
    let t = x * LOG2E + ROUND;
    let n = t - ROUND;
    // n as an integer: the low bits of t's mantissa (no float -> int cast,
    // whose saturating semantics would cost a branch per lane).
    let k = t.to_bits().wrapping_sub(ROUND.to_bits());
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = ((((1.987_569_2e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r
        + 1.666_666_5e-1)
        * r
        + 0.5;
    let e = p * r * r + r + 1.0;
    let v = e * f32::from_bits(k.wrapping_add(127) << 23);
    // Past the clamp, what `expf` gives: 0 below, +inf above (selects, so the
    // loop stays branch-free; SiLU then gives -0 for very negative inputs, as
    // with `expf`, not a tiny non-zero value that a threshold of 0 would keep).
    if x0 < -87.5 {
        0.0
    } else if x0 > 88.5 {
        f32::INFINITY
    } else {
        v
    }
}

/// erf with relative error below 1.2e-7 (Numerical Recipes' Chebyshev fit of erfc).
fn erf(x: f32) -> f32 {
    let z = (x as f64).abs();
    let t = 1.0 / (1.0 + 0.5 * z);
    let poly = -z * z - 1.265_512_23
        + t * (1.000_023_68
            + t * (0.374_091_96
                + t * (0.096_784_18
                    + t * (-0.186_288_06
                        + t * (0.278_868_07
                            + t * (-1.135_203_98
                                + t * (1.488_515_87 + t * (-0.822_152_23 + t * 0.170_872_77))))))));
    let r = t * poly.exp();
    (if x >= 0.0 { 1.0 - r } else { r - 1.0 }) as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn erf_is_accurate() {
        for (x, want) in [
            (0.0f32, 0.0f64),
            (0.5, 0.520_499_877_8),
            (1.0, 0.842_700_792_9),
            (-2.0, -0.995_322_265),
        ] {
            assert!((erf(x) as f64 - want).abs() < 1e-6, "{x}");
        }
    }

    #[test]
    fn exp_is_within_two_ulp_and_tiles_match_apply() {
        let ulp = |a: f32, b: f32| (a.to_bits() as i64 - b.to_bits() as i64).abs();
        let mut x = -87.0f32;
        while x <= 88.0 {
            assert!(ulp(exp(x), x.exp()) <= 2, "{x}: {} vs {}", exp(x), x.exp());
            x += 0.001_37;
        }
        assert_eq!(exp(0.0), 1.0);
        assert_eq!((exp(-100.0), exp(100.0)), (0.0, f32::INFINITY));
        // Very negative inputs: SiLU is -0 (not a tiny value a 0 threshold keeps).
        let far = [-88.6f32, -1e30, -3.4e38, 100.0];
        for level in Level::supported() {
            let mut v = far;
            Activation::Silu.apply_tile(level, &mut v, None, None);
            assert_eq!(v.map(|a| a == 0.0), [true, true, true, false], "{level}");
            assert_eq!(v[3], 100.0);
            // The gated form too (its own AVX-512 loop), over a full chunk
            // of 16 and a tail; NaN stays NaN.
            let mut v: Vec<f32> = far.iter().cycle().take(19).copied().collect();
            v[5] = f32::NAN;
            Activation::Silu.apply_tile(level, &mut v, None, Some(&[2.0; 19]));
            for (j, (g, x)) in v.iter().zip(far.iter().cycle()).enumerate() {
                match j {
                    5 => assert!(g.is_nan(), "{level}"),
                    _ if *x < 0.0 => assert!(*g == 0.0 && g.is_sign_negative(), "{level} {x}: {g}"),
                    _ => assert_eq!(*g, 200.0, "{level}"),
                }
            }
        }
        let pre: Vec<f32> = (0..300).map(|i| (i as f32 - 150.0) / 7.0).collect();
        let aux: Vec<f32> = (0..300).map(|i| (i % 13) as f32 / 5.0 - 1.0).collect();
        for act in [Activation::Silu, Activation::Gelu, Activation::Relu] {
            for (bias, up) in [(None, Some(&aux[..])), (Some(&aux[..]), None), (None, None)] {
                for level in Level::supported() {
                    let mut got = pre.clone();
                    act.apply_tile(level, &mut got, bias, up);
                    for (j, (&g, &v)) in got.iter().zip(&pre).enumerate() {
                        let a = act.apply(v + bias.map_or(0.0, |b| b[j]));
                        let want = up.map_or(a, |u| a * u[j]);
                        assert!(
                            (g - want).abs() <= 1e-6 * want.abs().max(1.0),
                            "{act:?} {level} {j}"
                        );
                        if act == Activation::Silu && want.is_normal() {
                            assert!(ulp(g, want) <= 4, "{level} {j}: {g} vs {want}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn parse_names() {
        assert_eq!(Activation::parse("silu").unwrap(), Activation::Silu);
        assert!(Activation::parse("tanh").is_err());
        assert_eq!(Activation::Relu.apply(-1.0), 0.0);
        assert!((Activation::Silu.apply(1.0) - 0.731_058_6).abs() < 1e-6);
    }
}
