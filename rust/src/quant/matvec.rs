//! Fused mat-vec: `y[r] = sum_c deq(W)[r, c] * x[c]` straight from packed codes.
//!
//! Per group `k` of row `r`: `y += scale * dot(u, x_k) + min * sum(x_k)`, with
//! the group sums of `x` computed once per call, so the float matrix is never
//! materialised.
//!
//! Paths (chosen per call from the SIMD level and the bit width):
//! - every width at the AVX-512 level on a CPU with VNNI: int16 activations per
//!   group (14-bit for 3-bit codes) and `vpdpwssd` (see `vnni.rs`; error bounded
//!   by the activation rounding);
//! - 4-bit at AVX-512 (no VNNI) or AVX2: hand-written kernels, nibbles widened
//!   to 16 or 8 float lanes, FMA against float32 activations;
//! - 2-, 3- and 8-bit at AVX-512 without VNNI and at AVX2: codes unpacked to bytes
//!   per group, then widened to float lanes (8-bit reads its codes in place),
//!   float32 activations;
//! - scalar: portable loops, float32 activations.
//!
//! The float32-activation row dots live in `row_dot.rs`; this file drives
//! them (checks, the split into pieces, the threads). Activations with
//! `max|x| >= 2^96`, whose group dots would overflow float32, run scaled by an
//! exact power of two (`headroom.rs`).
//!
//! Rows run in parallel, in pieces, on the caller and the short-call team's
//! helpers ([`crate::threads::team`]). [`matvec_rows`] computes a
//! subset of rows, for callers that know which outputs they need (sparse FFNs).

#[cfg(target_arch = "x86_64")]
use super::act16::Int16Activations;
use super::format::QuantRef;
use super::headroom;
use super::row_dot::{row_at, Activations};
use crate::error::{Error, Result};
use crate::simd::Level;

/// How many rows ahead [`prefetch_row`] asks for.
const PREFETCH_ROWS: usize = 4;

/// Asks the memory system for row `r`'s codes (memory-level parallelism beyond
/// what the hardware prefetcher keeps in flight for one core).
#[inline]
fn prefetch_row(q: &QuantRef<'_>, r: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        for line in q.row(r).chunks(64) {
            // SAFETY: prefetch never faults, and the address is inside the row.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(line.as_ptr() as *const i8) };
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (q, r);
}

fn check_x(q: &QuantRef<'_>, x: &[f32]) -> Result<()> {
    if x.len() != q.cols {
        return Err(Error::shape(
            "x",
            format!("({},) to match the weights' columns", q.cols),
            &[x.len()],
        ));
    }
    Ok(())
}

/// `out[i] = row(rows[i]) . x` (all rows when `rows` is `None`) at an explicit level.
pub fn matvec_at(
    level: Level,
    q: &QuantRef<'_>,
    x: &[f32],
    rows: Option<&[u32]>,
    out: &mut [f32],
) -> Result<()> {
    level.check()?;
    check_x(q, x)?;
    let n = rows.map_or(q.rows, <[u32]>::len);
    if out.len() != n {
        return Err(Error::shape("out", format!("({n},)"), &[out.len()]));
    }
    if let Some(idx) = rows {
        if let Some(bad) = idx.iter().find(|&&i| i as usize >= q.rows) {
            return Err(Error::Index {
                arg: "rows",
                index: *bad as i64,
                len: q.rows,
            });
        }
    }
    // Huge activations (max|x| >= 2^96) run scaled down by an exact power of
    // two, and the outputs are scaled back: the kernels' group sums would
    // overflow float32 otherwise (see `headroom.rs`).
    #[cfg(target_arch = "x86_64")]
    if level == Level::Avx512 && super::vnni::applies(q) {
        let a = Int16Activations::new(q, x);
        // The int16 steps already hold each group's max|x| (`dx_k = max|x_k| /
        // qmax`), so ordinary x costs no scan of its own on this path.
        let e = if headroom::steps_may_be_huge(&a.dx) {
            headroom::shift(x)
        } else {
            None
        };
        let Some(e) = e else {
            return rows_vnni(q, &a, rows, out);
        };
        rows_vnni(
            q,
            &Int16Activations::new(q, &headroom::scaled(x, e)),
            rows,
            out,
        )?;
        headroom::unscale(out, e);
        return Ok(());
    }
    let Some(e) = headroom::shift(x) else {
        return rows_float(level, q, &Activations::new(q, x), rows, out);
    };
    let a = Activations::new(q, &headroom::scaled(x, e));
    rows_float(level, q, &a, rows, out)?;
    headroom::unscale(out, e);
    Ok(())
}

/// The rows of [`matvec_at`] on the int16-activation VNNI path.
#[cfg(target_arch = "x86_64")]
fn rows_vnni(
    q: &QuantRef<'_>,
    a: &Int16Activations,
    rows: Option<&[u32]>,
    out: &mut [f32],
) -> Result<()> {
    let pieces = pieces(out.len() * q.params.row_bytes(q.cols))?;
    let task = |(start, o): (usize, &mut [f32])| {
        for (i, y) in o.iter_mut().enumerate() {
            let j = start + i;
            let r = rows.map_or(j, |idx| idx[j] as usize);
            // SAFETY: the caller checked `applies()`, which proved AVX-512
            // F/BW/VL + VNNI and a width the kernel takes; `a` was built from
            // `q`; r < q.rows (checked by `matvec_at`).
            *y = unsafe { super::vnni::row_vnni(q, r, a) };
        }
    };
    for_each_piece(out, pieces, task)
}

/// The rows of [`matvec_at`] on the float32-activation paths (`row_dot.rs`).
fn rows_float(
    level: Level,
    q: &QuantRef<'_>,
    a: &Activations,
    rows: Option<&[u32]>,
    out: &mut [f32],
) -> Result<()> {
    let ng = q.groups();
    let n_out = out.len();
    let pieces = pieces(n_out * q.params.row_bytes(q.cols))?;
    let task = |(start, o): (usize, &mut [f32])| {
        let mut s = vec![0f32; ng];
        let mut m = vec![0f32; ng];
        for (i, y) in o.iter_mut().enumerate() {
            let j = start + i;
            let r = rows.map_or(j, |idx| idx[j] as usize);
            if j + PREFETCH_ROWS < n_out && level != Level::Scalar {
                prefetch_row(
                    q,
                    rows.map_or(j + PREFETCH_ROWS, |idx| idx[j + PREFETCH_ROWS] as usize),
                );
            }
            *y = row_at(level, q, r, a, &mut s, &mut m);
        }
    };
    for_each_piece(out, pieces, task)
}

/// Below this many bytes of codes a call is short (~50 us of one core's work;
/// SmolLM2's layers all fall under it), and is cut into [`SHORT_PIECES`]
/// pieces, so the caller and a helper that arrives late still balance.
const SHORT_BYTES: usize = 1 << 20;
const SHORT_PIECES: usize = 8;

/// A long call's pieces hold about this many bytes of codes each, between one
/// and three per thread. Each piece is a fresh stream, whose first lines wait
/// on memory before the prefetchers catch up, so fewer, longer pieces stream
/// faster; a few per thread still balance a thread that falls behind. Measured
/// on Zen 5 (2 threads), the 16 x 4096x4096 4-bit stack in alternation: 4-8
/// pieces per layer 37-46 GB/s, 12-32 pieces 29-37 GB/s.
const PIECE_BYTES: usize = 1 << 20;

/// How many pieces a call reading `bytes` of codes is cut into, and whether
/// it is long.
fn pieces(bytes: usize) -> Result<(usize, bool)> {
    if bytes < SHORT_BYTES {
        return Ok((SHORT_PIECES, false));
    }
    let threads = crate::threads::num_threads()?;
    Ok(((bytes / PIECE_BYTES).clamp(threads, 3 * threads), true))
}

/// Runs `task((first row, rows))` on `pieces.0` pieces of `out` (16-row
/// multiples) in the team ([`crate::threads::team`]), long calls (`pieces.1`)
/// too, as long team calls (`for_each_long_chunk`): handing
/// a call to the rayon pool wakes a sleeping worker and joins it, 5-16 us a
/// call, which a stack of layers pays once per layer, where the team's helpers
/// are still awake from the layer before. Measured on Zen 5 (2 threads), the
/// 16 x 4096x4096 4-bit stack called layer by layer: 32-43 GB/s through the
/// pool, 37-47 in the team (per-round medians in alternation: +5%, the team
/// ahead in 11 of 16 rounds); one 65536x4096 matrix 43-48 (the read bandwidth).
fn for_each_piece<F>(out: &mut [f32], pieces: (usize, bool), task: F) -> Result<()>
where
    F: Fn((usize, &mut [f32])) + Sync + Send,
{
    let (count, long) = pieces;
    let piece = out.len().div_ceil(count).next_multiple_of(16);
    let task = |c: usize, o: &mut [f32]| task((c * piece, o));
    if long {
        crate::threads::team::for_each_long_chunk(out, piece, task)
    } else {
        crate::threads::team::for_each_chunk(out, piece, task)
    }
}

/// `W x` for one vector `x` of length `cols`; returns `rows` outputs.
pub fn matvec(q: &QuantRef<'_>, x: &[f32]) -> Result<Vec<f32>> {
    let mut out = vec![0f32; q.rows];
    matvec_at(crate::simd::level()?, q, x, None, &mut out)?;
    Ok(out)
}

/// The selected rows of `W x`: `out[i] = W[rows[i]] . x`. Indices may repeat
/// and come in any order; one out of range is an [`Error::Index`].
pub fn matvec_rows(q: &QuantRef<'_>, x: &[f32], rows: &[u32]) -> Result<Vec<f32>> {
    let mut out = vec![0f32; rows.len()];
    matvec_at(crate::simd::level()?, q, x, Some(rows), &mut out)?;
    Ok(out)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::super::dequantize::dequantize;
    use super::super::format::{Params, ScaleType, Scheme};
    use super::super::quantize::quantize;
    use super::*;
    use proptest::prelude::*;

    fn data(seed: u64, n: usize) -> Vec<f32> {
        let mut s = seed | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s % 2001) as f32 / 1000.0 - 1.0
            })
            .collect()
    }

    /// How far int16 activations (the VNNI path) may move a row's dot product.
    pub(crate) fn int16_bound(w: &[f32], x: &[f32], g: usize) -> f64 {
        x.chunks(g)
            .zip(w.chunks(g))
            .map(|(xs, ws)| {
                let dx = xs.iter().fold(0f32, |a, v| a.max(v.abs())) as f64 / 32767.0;
                dx / 2.0 * ws.iter().map(|v| v.abs() as f64).sum::<f64>() * 1.01
            })
            .sum()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(40))]
        #[test]
        fn every_level_matches_dequantized_reference(
            bits in prop::sample::select(vec![2u8, 3, 4, 8]),
            g in prop::sample::select(vec![32usize, 64, 128, 256]),
            scheme in prop::sample::select(vec![Scheme::Asym, Scheme::Sym]),
            rows in 1usize..9,
            // up to 37 groups at g = 32: whole 16-group blocks and a remainder
            cols in 1usize..1200,
            seed in any::<u64>(),
        ) {
            let p = Params::new(bits, g, scheme, ScaleType::F16).unwrap();
            let w = data(seed, rows * cols);
            let x = data(seed ^ 0x5555, cols);
            let q = quantize(&w, rows, cols, p, false).unwrap();
            let d = dequantize(&q.view()).unwrap();
            for level in Level::supported() {
                let mut y = vec![0f32; rows];
                matvec_at(level, &q.view(), &x, None, &mut y).unwrap();
                for r in 0..rows {
                    let want: f64 = (0..cols).map(|c| d[r * cols + c] as f64 * x[c] as f64).sum();
                    let mut tol = 1e-4 * (cols as f64).sqrt() * (1.0 + want.abs());
                    if level == Level::Avx512 && (bits == 4 || bits == 8) {
                        tol += int16_bound(&d[r * cols..(r + 1) * cols], &x, g);
                    }
                    prop_assert!((y[r] as f64 - want).abs() <= tol, "{level} row {r}: {} vs {want}", y[r]);
                }
                let pick = [rows as u32 - 1, 0, rows as u32 - 1];
                let mut ys = vec![0f32; 3];
                matvec_at(level, &q.view(), &x, Some(&pick), &mut ys).unwrap();
                prop_assert_eq!(ys[0].to_bits(), y[rows - 1].to_bits());
                prop_assert_eq!(ys[1].to_bits(), y[0].to_bits());
            }
        }
    }

    #[test]
    fn a_long_call_in_pieces_matches_row_by_row() {
        // 2.6 MiB of 4-bit codes: a long call, cut into several pieces whose
        // sizes do not divide the 4099 rows (the last piece is short).
        let (rows, cols) = (4099, 1280);
        let p = Params::new(4, 64, Scheme::Asym, ScaleType::F16).unwrap();
        let q = quantize(&data(7, rows * cols), rows, cols, p, false).unwrap();
        let bytes = rows * p.row_bytes(cols);
        assert!(bytes >= SHORT_BYTES);
        let x = data(8, cols);
        for level in Level::supported() {
            let mut y = vec![f32::NAN; rows];
            matvec_at(level, &q.view(), &x, None, &mut y).unwrap();
            // Each row alone (a short call of one row) gives the same bits.
            for r in [0, 1, 15, 16, 1023, 2048, 4095, 4096, 4098] {
                let mut one = [0f32];
                matvec_at(level, &q.view(), &x, Some(&[r as u32]), &mut one).unwrap();
                assert_eq!(y[r].to_bits(), one[0].to_bits(), "{level} row {r}");
            }
            assert!(
                y.iter().all(|v| v.is_finite()),
                "{level}: a row was not written"
            );
        }
    }

    /// Every scheme, width and group size the kernels specialise on.
    pub(crate) fn every_format() -> Vec<Params> {
        let mut out = vec![];
        for (bits, g) in [
            (2u8, 64usize),
            (3, 64),
            (4, 64),
            (4, 256),
            (8, 32),
            (8, 256),
        ] {
            for scheme in [Scheme::Asym, Scheme::Sym] {
                out.push(Params::new(bits, g, scheme, ScaleType::F16).unwrap());
            }
        }
        for (bits, scheme) in [(4, Scheme::Q4_0), (4, Scheme::Q4_1), (8, Scheme::Q8_0)] {
            out.push(Params::new(bits, 32, scheme, ScaleType::F16).unwrap());
        }
        out
    }

    /// Huge activations, whose code dots and group sums overflow float32
    /// although `W x` fits (it did at the scalar and AVX2 levels from
    /// max|x| ~ 1e36 and at every level from ~3e37): finite, close to the
    /// reference, and exactly 2^64 times the result for `x / 2^64`.
    #[test]
    fn huge_activations_do_not_overflow_at_any_level() {
        let (rows, cols) = (6, 1024);
        let w: Vec<f32> = data(11, rows * cols).iter().map(|v| v * 1e-2).collect();
        let two64 = 18446744073709551616f32;
        // 5e28 is just under the rescale's 2^96 (~7.9e28), and over the
        // int16 steps' conservative check for 3-bit codes (~2^94).
        let mut xs: Vec<Vec<f32>> = [1e36f32, 2e37, 5e28]
            .iter()
            .map(|&m| data(12, cols).iter().map(|v| v * m).collect())
            .collect();
        // Constant positive x: no cancellation inside a group's dot or sum.
        xs.push(vec![1e36; cols]);
        xs.push(vec![3e37; cols]);
        // One entry near f32::MAX among ordinary ones.
        let mut one = data(13, cols);
        one[700] = 3e38;
        xs.push(one);
        for p in every_format() {
            let q = quantize(&w, rows, cols, p, false).unwrap();
            let d = dequantize(&q.view()).unwrap();
            for (i, x) in xs.iter().enumerate() {
                let small: Vec<f32> = x.iter().map(|v| v / two64).collect();
                for level in Level::supported() {
                    let mut y = vec![0f32; rows];
                    matvec_at(level, &q.view(), x, None, &mut y).unwrap();
                    let mut ys = vec![0f32; rows];
                    matvec_at(level, &q.view(), &small, None, &mut ys).unwrap();
                    let pick = [rows as u32 - 1, 2];
                    let mut yp = [0f32; 2];
                    matvec_at(level, &q.view(), x, Some(&pick), &mut yp).unwrap();
                    for r in 0..rows {
                        let dr = &d[r * cols..(r + 1) * cols];
                        let want: f64 = dr.iter().zip(x).map(|(a, b)| *a as f64 * *b as f64).sum();
                        let mag: f64 = dr
                            .iter()
                            .zip(x)
                            .map(|(a, b)| (*a as f64 * *b as f64).abs())
                            .sum();
                        assert!(want.abs() < f32::MAX as f64 / 2.0);
                        let tol = 1e-3 * mag + int16_bound(dr, x, p.group_size);
                        let msg = format!("{level} {p:?} x #{i} row {r}");
                        assert!(
                            (y[r] as f64 - want).abs() <= tol,
                            "{msg}: {} vs {want}",
                            y[r]
                        );
                        assert_eq!(y[r].to_bits(), (ys[r] * two64).to_bits(), "{msg}");
                    }
                    assert_eq!(yp[0].to_bits(), y[rows - 1].to_bits());
                    assert_eq!(yp[1].to_bits(), y[2].to_bits());
                }
            }
        }
    }

    #[test]
    fn bad_arguments() {
        let p = Params::new(4, 32, Scheme::Asym, ScaleType::F16).unwrap();
        let q = quantize(&data(1, 64), 2, 32, p, false).unwrap();
        let e = matvec(&q.view(), &[0.0; 31]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "x must have shape (32,) to match the weights' columns; got (31,)"
        );
        let e = matvec_rows(&q.view(), &[0.0; 32], &[0, 2]).unwrap_err();
        assert_eq!(e.to_string(), "rows index 2 is out of range for length 2");
    }
}
