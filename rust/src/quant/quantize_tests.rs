//! Tests of `quantize.rs`: the half-step round-trip bound, every SIMD level
//! against the scalar reference (signed zeros, non-finite weights), the search
//! never raising the error, and bad input.

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
