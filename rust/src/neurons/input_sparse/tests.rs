//! Tests of [`super::InputSparseFfn`] against an f64 reference in every format.

use super::super::elem::{Q4, Q8};
use super::*;
use half::f16;

fn lcg(seed: &mut u64) -> f32 {
    *seed = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    ((*seed >> 40) as f32 / (1u64 << 24) as f32) - 0.5
}

/// The dense FFN on masked inputs and masked hidden values, in f64, from
/// the weights as stored (dequantized).
/// (The hidden mask is taken from the kernel's own f32 hidden values, so a
/// value within rounding of the threshold cannot flip between the two.)
fn reference<E: Elem>(
    f: &InputSparseFfn<E>,
    x: &[f32],
    t_in: Option<f32>,
    t_h: Option<f32>,
) -> Vec<f64> {
    let hid = f.hidden(x, 1, t_in).unwrap();
    let (g, u, dn) = f.to_matrices();
    let (h, d) = (f.h, f.d);
    let keep = |v: f32, t: Option<f32>| t.is_none_or(|t| v.abs() > t);
    let xm: Vec<f64> = x
        .iter()
        .map(|&v| if keep(v, t_in) { v as f64 } else { 0.0 })
        .collect();
    let dot = |m: &[f32], j: usize| (0..d).map(|i| m[j * d + i] as f64 * xm[i]).sum::<f64>();
    let mut y = vec![0.0f64; d];
    for j in 0..h {
        let b = f.pre_bias.as_ref().map_or(0.0, |b| b[j]);
        let pre = g.as_ref().map_or(dot(&u, j), |g| dot(g, j)) as f32 + b;
        let a = f.act.apply(pre) as f64;
        let hv = if g.is_some() { a * dot(&u, j) } else { a };
        assert!((hv - hid[j] as f64).abs() < 1e-4, "hidden {j}");
        if keep(hid[j], t_h) {
            for i in 0..d {
                y[i] += hv * dn[i * h + j] as f64;
            }
        }
    }
    if let Some(b) = &f.down_bias {
        for (yi, bi) in y.iter_mut().zip(b) {
            *yi += *bi as f64;
        }
    }
    y
}

fn check<E: Elem>(gated: bool, tol: f64, h: usize, rows: usize) {
    let d = 96;
    let mut seed = 7;
    let mut m = |n: usize| (0..n).map(|_| lcg(&mut seed)).collect::<Vec<f32>>();
    let (g, u, dn) = (m(h * d), m(h * d), m(d * h));
    let pb = (!gated).then(|| m(h));
    let db = Some(m(d));
    let x = m(rows * d);
    let act = if gated {
        Activation::Silu
    } else {
        Activation::Gelu
    };
    let f =
        InputSparseFfn::<E>::new(gated.then_some(&g[..]), &u, &dn, (h, d), act, pb, db).unwrap();
    for (t_in, t_h) in [(None, None), (Some(0.2), None), (Some(0.1), Some(0.05))] {
        let y = f.forward(&x, rows, t_in, t_h).unwrap();
        for r in 0..rows {
            let want = reference(&f, &x[r * d..(r + 1) * d], t_in, t_h);
            for (a, b) in y[r * d..(r + 1) * d].iter().zip(&want) {
                assert!(
                    (*a as f64 - b).abs() <= tol,
                    "{} {t_in:?} {t_h:?}: {a} vs {b}",
                    E::NAME
                );
            }
        }
    }
    let s = f.stats();
    let r = rows as u64;
    assert_eq!((s.calls, s.rows), (3, 3 * r));
    assert!(s.kept_inputs < 3 * r * d as u64 && s.kept_hidden < 3 * r * h as u64);
}

#[test]
fn equals_the_masked_dense_ffn_in_every_format() {
    // Two rows (inputs in groups, decoded once for both), one row over wide
    // tiles (the fused adds, several prefetch slices per part), and three rows
    // over wide tiles (a group's runs in several chunks).
    for (h, rows) in [(200, 2), (3000, 1), (3000, 3)] {
        for gated in [true, false] {
            check::<f32>(gated, 1e-4, h, rows);
            check::<f16>(gated, 1e-4, h, rows);
            check::<Q8>(gated, 1e-4, h, rows);
            check::<Q4>(gated, 1e-4, h, rows);
        }
    }
}

#[test]
fn keeps_the_weights_and_rejects_bad_input() {
    let (h, d) = (130, 6);
    let w: Vec<f32> = (0..h * d).map(|i| i as f32 / 100.0).collect();
    let f =
        InputSparseFfn::<f32>::new(Some(&w), &w, &w, (h, d), Activation::Silu, None, None).unwrap();
    let (g, u, dn) = f.to_matrices();
    assert_eq!((g.unwrap(), u), (w.clone(), w.clone()));
    assert_eq!(dn, w);
    assert!(f.forward(&[0.0; 5], 1, None, None).is_err());
    assert!(f.forward(&[0.0; 6], 1, Some(-1.0), None).is_err());
    assert!(f.forward(&[0.0; 6], 1, None, Some(f32::NAN)).is_err());
    let odd = InputSparseFfn::<Q4>::new(
        None,
        &w[..129 * 6],
        &w[..129 * 6],
        (129, 6),
        Activation::Relu,
        None,
        None,
    );
    assert!(odd.is_err());
    assert!(
        InputSparseFfn::<f32>::new(None, &w, &w[1..], (h, d), Activation::Relu, None, None)
            .is_err()
    );
}

#[test]
fn prepare_tells_short_sweeps_and_forward_is_prepare_then_sweep() {
    // 576x1536 (SmolLM2's FFN): at 90% of inputs dropped the sweep is short,
    // a dense call is not; either way prepare + sweep is forward, bit for bit.
    let (h, d) = (1536, 576);
    let mut seed = 7;
    let w: Vec<f32> = (0..h * d).map(|_| lcg(&mut seed)).collect();
    let f =
        InputSparseFfn::<f32>::new(Some(&w), &w, &w, (h, d), Activation::Silu, None, None).unwrap();
    let x: Vec<f32> = (0..d).map(|_| lcg(&mut seed)).collect();
    // |x| is uniform on [0, 0.5]: 0.45 keeps about 10% of the inputs.
    for (t_in, short) in [(Some(0.45), true), (None, false)] {
        let kept = f.prepare(&x, 1, t_in, Some(0.01)).unwrap();
        assert_eq!(kept.is_short(), short, "{t_in:?}");
        let y = f.sweep(kept).unwrap();
        let want = f.forward(&x, 1, t_in, Some(0.01)).unwrap();
        assert_eq!(
            y.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            want.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
        );
    }
    // Many rows over the same kept share: long, whatever the share.
    let many: Vec<f32> = x.iter().cycle().take(64 * d).copied().collect();
    assert!(!f
        .prepare(&many, 64, Some(0.45), Some(0.01))
        .unwrap()
        .is_short());
    // A bad call fails in prepare, before any sweep.
    assert!(f.prepare(&x, 1, Some(-1.0), None).is_err());
    assert!(f.prepare(&x[1..], 1, None, None).is_err());
    // A sweep of what another shape of layer prepared is an error, not a panic.
    let (h2, d2) = (64, 32);
    let w2: Vec<f32> = (0..h2 * d2).map(|_| lcg(&mut seed)).collect();
    let g = InputSparseFfn::<f32>::new(Some(&w2), &w2, &w2, (h2, d2), Activation::Silu, None, None)
        .unwrap();
    let other = g.prepare(&x[..d2], 1, None, None).unwrap();
    assert!(f.sweep(other).is_err());
}

#[test]
fn an_empty_batch_gives_an_empty_output_and_counts_nothing() {
    let (h, d) = (130, 6);
    let mut seed = 3;
    let w: Vec<f32> = (0..h * d).map(|_| lcg(&mut seed)).collect();
    let f =
        InputSparseFfn::<Q8>::new(Some(&w), &w, &w, (h, d), Activation::Silu, None, None).unwrap();
    for (t_in, t_h) in [(None, None), (Some(0.1), Some(0.1))] {
        assert_eq!(f.forward(&[], 0, t_in, t_h).unwrap(), Vec::<f32>::new());
        let kept = f.prepare(&[], 0, t_in, t_h).unwrap();
        assert!(kept.is_short());
        assert_eq!(f.sweep(kept).unwrap(), Vec::<f32>::new());
        assert_eq!(f.hidden(&[], 0, t_in).unwrap(), Vec::<f32>::new());
    }
    assert_eq!((f.stats().calls, f.stats().rows), (0, 0));
    assert!(f.forward(&[], 0, Some(-1.0), None).is_err());
    assert!(f.forward(&[0.0; 2], 0, None, None).is_err());
}
