//! The row operations of the sparse FFNs over several input rows at once,
//! written once for every element type ([`Elem`]): a stored run is decoded
//! once (L1-sized chunks) and serves every row.

use super::axpy::{axpy_at, axpy_n_at};
use super::elem::{Elem, CHUNK};
use super::fused::prefetch_range;
use crate::simd::{dot_at, Level};

/// `out[r] = scale * (w · xs[r])` for each of the `out.len()` rows of `xs`
/// (row length `w.len() * E::LANES`).
pub fn dot_rows<E: Elem>(level: Level, w: &[E], scale: f32, xs: &[f32], out: &mut [f32]) {
    let d = w.len() * E::LANES;
    if let Some(wf) = E::as_f32(w) {
        for (o, x) in out.iter_mut().zip(xs.chunks_exact(d)) {
            *o = dot_at(level, wf, x).unwrap_or(0.0) * scale;
        }
        return;
    }
    if let [o] = out {
        // One row: one fused pass (no decoded copy).
        *o = E::dot(level, w, &xs[..d]) * scale;
        return;
    }
    out.fill(0.0);
    let mut buf = [0.0f32; CHUNK];
    for (c, wc) in w.chunks(CHUNK / E::LANES).enumerate() {
        let b = &mut buf[..wc.len() * E::LANES];
        E::to_f32(level, wc, b);
        let start = c * CHUNK;
        for (o, x) in out.iter_mut().zip(xs.chunks_exact(d)) {
            *o += dot_at(level, b, &x[start..start + b.len()]).unwrap_or(0.0);
        }
    }
    for o in out.iter_mut() {
        *o *= scale;
    }
}

/// `ys[r] += coef[r] * scale * w` for each row `r` whose coefficient is non-zero.
pub fn axpy_rows<E: Elem>(level: Level, w: &[E], scale: f32, coef: &[f32], ys: &mut [f32]) {
    let d = w.len() * E::LANES;
    if let [a] = coef {
        // One row: one fused pass (no decoded copy).
        if *a != 0.0 {
            E::axpy(level, a * scale, w, &mut ys[..d], None);
        }
        return;
    }
    if let Some(wf) = E::as_f32(w) {
        for (&a, y) in coef.iter().zip(ys.chunks_exact_mut(d)) {
            if a != 0.0 {
                axpy_at(level, a * scale, wf, y);
            }
        }
        return;
    }
    let mut buf = [0.0f32; CHUNK];
    for (c, wc) in w.chunks(CHUNK / E::LANES).enumerate() {
        let b = &mut buf[..wc.len() * E::LANES];
        E::to_f32(level, wc, b);
        let start = c * CHUNK;
        for (&a, y) in coef.iter().zip(ys.chunks_exact_mut(d)) {
            if a != 0.0 {
                axpy_at(level, a * scale, b, &mut y[start..start + b.len()]);
            }
        }
    }
}

/// Runs added together by [`axpy_group_rows`].
pub(crate) const GROUP: usize = 4;

/// The decoded chunks of a group's runs.
pub(crate) type GroupBuffers = [[f32; CHUNK]; GROUP];

/// `ys[r * stride..][..len] += sum over q of coef[r][q] * codes(ws[q])` for
/// each row `r` of `coef` (`len = ws[q].len() * E::LANES`, equal for every `q`;
/// a padding run takes coefficient 0).
///
/// Several rows' outputs outgrow L1 (4 rows of a 2752-neuron tile's gate and
/// up: 88 KiB), and adding run by run loaded and stored every output once per
/// run and row: that traffic to L2, not the weights, bounded the batched
/// sweep. Here each row's outputs are loaded and stored once per group: at
/// AVX-512 the group's 16 values at a time are decoded into registers
/// (`fused::group_rows_avx512`); elsewhere each chunk of the runs is decoded
/// once into `bufs` (in L1; the caller's, so a call does not clear 8 KiB).
/// With `ahead` (runs of the same length), each part asks for the same part
/// of those runs: requests spread as the runs are read, where a burst per run
/// stalled on the miss buffers. (Blocks of columns whose outputs stay in L1
/// were slower: the runs' pieces became too short for the memory system.)
pub(crate) fn axpy_group_rows<E: Elem>(
    level: Level,
    (ws, ahead): ([&[E]; GROUP], Option<[&[E]; GROUP]>),
    coef: &[[f32; GROUP]],
    (ys, stride): (&mut [f32], usize),
    bufs: &mut GroupBuffers,
) {
    let mut units = ws.iter().map(|w| w.len()).min().unwrap_or(0);
    #[cfg(target_arch = "x86_64")]
    if level == Level::Avx512 && level.is_supported() {
        // SAFETY: AVX-512 F (level checked against the CPU); the kernel
        // checks that `ys` holds every row's run.
        let done = unsafe { super::fused::group_rows_avx512((ws, ahead), coef, ys, stride) };
        // The rest (under 16 values) below, from the runs' tails.
        let skip = done / E::LANES;
        let ws = ws.map(|w| &w[skip..]);
        let ys = &mut ys[done..];
        units -= skip;
        return tail(level, (ws, None), coef, (ys, stride), bufs, units);
    }
    tail(level, (ws, ahead), coef, (ys, stride), bufs, units)
}

/// [`axpy_group_rows`] through decoded chunks (any level; the AVX-512 path's
/// last values).
fn tail<E: Elem>(
    level: Level,
    (ws, ahead): ([&[E]; GROUP], Option<[&[E]; GROUP]>),
    coef: &[[f32; GROUP]],
    (ys, stride): (&mut [f32], usize),
    bufs: &mut GroupBuffers,
    units: usize,
) {
    let step = CHUNK / E::LANES;
    let direct = E::as_f32(&[]).is_some();
    for u0 in (0..units).step_by(step) {
        let u1 = (u0 + step).min(units);
        let (v0, len) = (u0 * E::LANES, (u1 - u0) * E::LANES);
        for run in ahead.iter().flatten() {
            let r = &run[u0.min(run.len())..u1.min(run.len())];
            let p = r.as_ptr() as *const u8;
            prefetch_range(p, p.wrapping_add(std::mem::size_of_val(r)));
        }
        if !direct {
            for (w, b) in ws.iter().zip(bufs.iter_mut()) {
                E::to_f32(level, &w[u0..u1], &mut b[..len]);
            }
        }
        let views: [&[f32]; GROUP] =
            std::array::from_fn(|q| E::as_f32(&ws[q][u0..u1]).unwrap_or(&bufs[q][..len]));
        for (r, a) in coef.iter().enumerate() {
            if a.iter().any(|&c| c != 0.0) {
                let at = r * stride + v0;
                axpy_n_at(level, *a, views, &mut ys[at..at + len]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::neurons::elem::{Q4, Q8};

    fn check<E: Elem>() {
        // Runs of 1300 values (several chunks, 81 vectors and a ragged tail),
        // 3 rows with a stride wider than a run.
        let (len, rows, stride) = (1300, 3, 1400);
        let runs: Vec<Vec<E>> = (0..GROUP)
            .map(|q| {
                let v: Vec<f32> = (0..len)
                    .map(|i| ((i * (q + 3)) % 13) as f32 - 6.0)
                    .collect();
                let mut w = vec![E::default(); len / E::LANES];
                E::encode(&v, &mut w);
                w
            })
            .collect();
        let decoded: Vec<Vec<f32>> = runs
            .iter()
            .map(|w| {
                let mut b = vec![0.0; len];
                E::to_f32(Level::Scalar, w, &mut b);
                b
            })
            .collect();
        let coef: Vec<[f32; GROUP]> = (0..rows)
            .map(|r| {
                std::array::from_fn(|q| {
                    // Row 1 takes nothing (skipped); the last run is padding.
                    if q == GROUP - 1 || r == 1 {
                        0.0
                    } else {
                        (r + 2 * q) as f32 * 0.25 - 1.0
                    }
                })
            })
            .collect();
        for level in Level::supported() {
            let mut ys = vec![0.5f32; rows * stride];
            let ws: [&[E]; GROUP] = std::array::from_fn(|q| &runs[q][..]);
            let mut bufs = [[0.0; CHUNK]; GROUP];
            axpy_group_rows(level, (ws, Some(ws)), &coef, (&mut ys, stride), &mut bufs);
            for r in 0..rows {
                for i in 0..stride {
                    let want = if i < len {
                        0.5 + (0..GROUP).map(|q| coef[r][q] * decoded[q][i]).sum::<f32>()
                    } else {
                        0.5
                    };
                    let got = ys[r * stride + i];
                    assert!(
                        (got - want).abs() <= 1e-4,
                        "{level} {} r{r} i{i}: {got} vs {want}",
                        E::NAME
                    );
                }
            }
        }
    }

    #[test]
    #[should_panic]
    fn outputs_too_short_for_every_row_panic_before_any_write() {
        let w = [Q8(1); 64];
        let ws: [&[Q8]; GROUP] = std::array::from_fn(|_| &w[..]);
        // Two rows of 64 values with stride 64 need 128 outputs.
        let mut ys = vec![0.0f32; 127];
        let mut bufs = [[0.0; CHUNK]; GROUP];
        let level = crate::simd::level().unwrap();
        axpy_group_rows(
            level,
            (ws, None),
            &[[1.0; GROUP]; 2],
            (&mut ys, 64),
            &mut bufs,
        );
    }

    #[test]
    fn a_group_of_runs_adds_into_every_row_and_nothing_past_its_run() {
        check::<f32>();
        check::<half::f16>();
        check::<Q8>();
        check::<Q4>();
    }
}
