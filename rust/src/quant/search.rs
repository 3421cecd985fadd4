//! The calibration-free scale search of `quantize(..., search = true)`.
//!
//! For each group, a grid of clipping ranges is tried; for each candidate's
//! codes the scale (and min) are refitted by least squares, and the pair with
//! the lowest squared error is kept, in the spirit of ggml's K-quant
//! `make_qkx` search and of HQQ's error-minimising fit. Deterministic, and
//! the same at every SIMD level (plain f32 arithmetic, no fused multiply-add).

use super::format::Params;
use super::quantize::{codes_for, sq_error, to_storage};

/// Least-squares scale and min of `w` against fixed codes.
#[inline(always)]
fn fit(w: &[f32], codes: &[u8]) -> Option<(f32, f32)> {
    let n = w.len() as f32;
    let (mut sl, mut sl2, mut sw, mut slw) = (0f32, 0f32, 0f32, 0f32);
    for (v, c) in w.iter().zip(codes) {
        let l = *c as f32;
        sl += l;
        sl2 += l * l;
        sw += v;
        slw += l * v;
    }
    let det = n * sl2 - sl * sl;
    if det <= 0.0 {
        return None;
    }
    let s = (n * slw - sl * sw) / det;
    (s > 0.0).then(|| (s, (sw - s * sl) / n))
}

pub(super) fn search_asym(
    p: &Params,
    w: &[f32],
    lo: f32,
    hi: f32,
    rtn: (f32, f32),
    codes: &mut [u8],
) -> (f32, f32) {
    let maxq = p.max_code() as f32;
    let t = p.scale_type;
    let mut best = rtn;
    let mut best_err = sq_error(w, rtn.0, rtn.1, codes);
    let mut trial = [0u8; 256];
    let trial = &mut trial[..w.len()];
    for step in 0..=20 {
        let iscale = (maxq - 1.0 + 0.1 * step as f32) / (hi - lo);
        for (c, v) in trial.iter_mut().zip(w) {
            *c = ((v - lo) * iscale + 0.5).clamp(0.0, maxq) as u8;
        }
        let Some((s, m)) = fit(w, trial) else {
            continue;
        };
        let (s, m) = (to_storage(s, t, 0), to_storage(m, t, 0));
        if !(s > 0.0 && s.is_finite() && m.is_finite()) {
            continue;
        }
        codes_for(w, s, m, maxq, trial);
        let err = sq_error(w, s, m, trial);
        if err < best_err {
            best_err = err;
            best = (s, m);
            codes.copy_from_slice(trial);
        }
    }
    best
}

pub(super) fn search_sym(
    p: &Params,
    w: &[f32],
    amax: f32,
    s0: f32,
    codes: &mut [u8],
) -> (f32, f32) {
    let maxq = p.max_code() as f32;
    let off = p.offset() as f32;
    let t = p.scale_type;
    let mut best = s0;
    let mut best_err = sq_error(w, s0, -off * s0, codes);
    let mut trial = [0u8; 256];
    let trial = &mut trial[..w.len()];
    for step in 0..=16 {
        let s = amax / (off - 1.0 + 0.125 * step as f32);
        codes_for(w, s, -off * s, maxq, trial);
        // refit the scale alone: s = sum(q w) / sum(q^2), q = u - offset
        let (mut qw, mut qq) = (0f32, 0f32);
        for (v, c) in w.iter().zip(trial.iter()) {
            let q = *c as f32 - off;
            qw += q * v;
            qq += q * q;
        }
        if qq <= 0.0 {
            continue;
        }
        let s = to_storage(qw / qq, t, 0);
        if !(s > 0.0 && s.is_finite()) {
            continue;
        }
        codes_for(w, s, -off * s, maxq, trial);
        let err = sq_error(w, s, -off * s, trial);
        if err < best_err {
            best_err = err;
            best = s;
            codes.copy_from_slice(trial);
        }
    }
    (best, -off * best)
}
