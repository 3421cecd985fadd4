//! Headroom for huge activations: an exact power-of-two rescale of `x`.
//!
//! The fused kernels form per-group integer-code dots `dot(u, x_k)` (up to
//! `255 * 256 * max|x|`), group sums `sum(x_k)` and, on the VNNI paths,
//! `dx_k * sum(xq_k)` (about `g * max|x|`) before the scales bring them down
//! to the size of the result. For `max|x|` around 1e36 those intermediates
//! overflow float32 to inf although `W x` itself fits.
//!
//! Below [`LIMIT`] (2^96) every such intermediate stays under 2^112, so what
//! can still overflow is only what the dense float product overflows too
//! (`scale * u <= |w| + |min|`). At or above it, `x` is multiplied by `2^-e`,
//! bringing `max|x|` into `[2^64, 2^65)`, and the outputs by `2^e`. Both
//! are exact (no rounding) away from subnormals, so the result has the bits
//! the kernels would give with unbounded exponents; entries of `x` that do
//! become subnormal are under `2^(e - 126)`, `2^-190` of the largest entry,
//! far under its rounding.
//!
//! Ordinary inputs take none of this, and the check costs little: the VNNI
//! mat-vec looks at its per-group activation steps ([`steps_may_be_huge`]),
//! the other paths make one vectorised pass over `x` ([`shift`]; ~0.5 us at
//! 4,096 columns, against ~1 us to lay out the activations and 100+ us for a
//! 4096x4096 4-bit mat-vec).

/// `max|x|` at or above this (2^96) takes the rescale.
const LIMIT: f32 = 79_228_162_514_264_337_593_543_950_336.0;

/// The largest `max|x|` after the rescale lies in `[2^TARGET, 2^(TARGET + 1))`.
const TARGET: i32 = 64;

/// `2^e` for `-126 <= e <= 127`, exactly.
fn pow2(e: i32) -> f32 {
    debug_assert!((-126..=127).contains(&e));
    f32::from_bits(((127 + e) as u32) << 23)
}

/// Whether any `|x_i| >= LIMIT` (or is NaN): 16 independent lanes of integer
/// compares on the magnitude bits, which LLVM vectorises at the baseline ISA
/// (a `fold` with `f32::max` stays one serial chain).
fn any_large(x: &[f32]) -> bool {
    const BITS: i32 = LIMIT.to_bits() as i32;
    let large = |v: f32| ((v.to_bits() & 0x7fff_ffff) as i32 >= BITS) as i32;
    let mut hit = [0i32; 16];
    let chunks = x.chunks_exact(16);
    let rest = chunks.remainder().iter().fold(0, |h, &v| h | large(v));
    for c in chunks {
        for i in 0..16 {
            hit[i] |= large(c[i]);
        }
    }
    hit.iter().fold(rest, |a, &h| a | h) != 0
}

/// Whether int16 activation steps `dx` (`dx_k = max|x_k| / qmax`, `qmax <=
/// 32767 < 2^15`; see `act16.rs`) may come from a group with `max|x_k| >= 2^96`:
/// such a group's step is at least `2^96 / 2^15 = 2^81` (division rounds
/// monotonically), so a `false` is exact and a `true` sends the caller to
/// [`shift`] (groups from about 2^94 up pass too). The VNNI mat-vec checks
/// this instead of scanning `x`: `ng` compares, not `cols`.
pub(crate) fn steps_may_be_huge(dx: &[f32]) -> bool {
    const STEP: f32 = 2417851639229258349412352.0; // 2^81
    dx.iter().any(|&d| d >= STEP)
}

/// The exponent `e` by which `x` must be scaled down (`x * 2^-e`), or `None`
/// when `x` is within the kernels' range or holds an infinity (the result
/// is then not finite anyway).
pub(crate) fn shift(x: &[f32]) -> Option<i32> {
    if !any_large(x) {
        return None;
    }
    // NaN entries are skipped by `max` (they make NaN outputs either way).
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    if !amax.is_finite() || amax < LIMIT {
        return None;
    }
    // floor(log2(amax)), amax a normal float >= 2^96: in 96..=127.
    let e = ((amax.to_bits() >> 23) & 0xff) as i32 - 127;
    Some(e - TARGET)
}

/// `x * 2^-e` (exact but for entries that become subnormal; see the module).
pub(crate) fn scaled(x: &[f32], e: i32) -> Vec<f32> {
    let f = pow2(-e);
    x.iter().map(|v| v * f).collect()
}

/// Undoes [`scaled`] on outputs: `y * 2^e` (exact unless the result overflows,
/// as the exact result then does).
pub(crate) fn unscale(y: &mut [f32], e: i32) {
    let f = pow2(e);
    for v in y {
        *v *= f;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shift_brings_the_largest_entry_into_the_target_octave() {
        assert_eq!(shift(&[]), None);
        assert_eq!(shift(&[1.0, -3e28, 7.9e28]), None); // < 2^96
        assert_eq!(shift(&[f32::INFINITY, 1e37]), None);
        for (amax, want) in [(LIMIT, 32), (1e36, 119 - 64), (-f32::MAX, 63)] {
            // At every position: in the 16-lane body and in the remainder.
            for n in [1usize, 17, 40] {
                for at in 0..n {
                    let mut x = vec![0.5f32; n];
                    x[at] = amax;
                    let e = shift(&x).unwrap();
                    assert_eq!(e, want, "{amax} at {at} of {n}");
                    let m = scaled(&x, e)[at].abs();
                    assert!((pow2(TARGET)..pow2(TARGET + 1)).contains(&m));
                }
            }
        }
        // The int16 steps' check passes every group at 2^96, either qmax.
        for qmax in [32767f32, 8191.0] {
            assert!(steps_may_be_huge(&[0.0, LIMIT / qmax, 1.0]));
            assert!(!steps_may_be_huge(&[0.0, 7e28 / 32767.0, 1.0]));
        }
        let mut y = scaled(&[1e36, -3.5, 1e-20], 55);
        unscale(&mut y, 55);
        assert_eq!(y, [1e36, -3.5, 1e-20]);
    }
}
