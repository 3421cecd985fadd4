//! The sweep of [`InputSparseFfn`]: the kept inputs, each tile's hidden
//! values from them, the hidden mask, and the kept neurons' down columns.

use std::sync::atomic::Ordering::Relaxed;

use rayon::prelude::*;

use super::super::elem::Elem;
use super::super::rows::{axpy_group_rows, GroupBuffers, GROUP};
use super::InputSparseFfn;
use crate::error::{Error, Result};
use crate::simd::{self, Level};

/// A call that reads fewer weights than this runs on the caller's thread; any
/// other runs in the short-call team ([`crate::threads::team`]), whose helpers
/// stay awake between calls, not through the pool, whose workers sleep between
/// the layers of a model (waking one and joining cost 5-8 us a call). Measured
/// on Zen 5, 576x1536 at 90% sparsity (~270 K weights read): through the pool
/// f32 24 us, int8 inline 14 us, both 10-13 us in the team; at 70%: f32 38 ->
/// 29 us, int4 32 -> 19 us. Calls that keep 1-2 inputs take the same time
/// (2.8 us) either way.
const INLINE_VALUES: usize = 16 << 10;

/// A call that reads fewer weights than this is short (10-20 us on Zen 5):
/// the Python binding keeps the GIL for it, as numpy does for small arrays,
/// because releasing and taking it back costs ~0.25 us, 3% of a 576x1536
/// call at 90% sparsity (7-8 us).
const SHORT_VALUES: usize = 512 << 10;

/// A call's kept inputs, between [`InputSparseFfn::prepare`] and
/// [`InputSparseFfn::sweep`].
pub struct Kept {
    level: Level,
    /// `(h, d)` of the layer that prepared it.
    layer: (usize, usize),
    rows: usize,
    /// The kept inputs, and their coefficients (`rows` each).
    ids: Vec<u32>,
    coef: Vec<f32>,
    /// Kept (row, input) pairs.
    pairs: u64,
    t_hidden: Option<f32>,
    /// About how many weights the sweep reads.
    values: usize,
}

impl Kept {
    /// Whether the sweep is short enough not to let other threads run
    /// meanwhile (see [`SHORT_VALUES`]): its weights times its rows, since
    /// each weight read serves every row.
    pub fn is_short(&self) -> bool {
        self.values.saturating_mul(self.rows) < SHORT_VALUES
    }
}

/// How far ahead, in bytes of the kept weight runs, a sweep asks for the
/// weights it will read: the kept input (or neuron) that many bytes on, line
/// by line as the current one is read. A sparse sweep jumps from run to run,
/// where the hardware prefetchers restart; at one run ahead (3-6 KiB for the
/// quantized types) a request was issued too late to hide the memory's
/// latency. Measured on Zen 5 at 4096x11008, alternating in one process:
/// 12 KiB ahead against one run ahead, int8 at 50% 1.65 against 2.15 ms,
/// int4 1.15 against 1.49 ms; 6-24 KiB measured alike.
const AHEAD_BYTES: usize = 12 << 10;

/// The kept item `m` places on, where `m` items of `bytes` each make up
/// [`AHEAD_BYTES`].
fn ahead_items(bytes: usize) -> usize {
    AHEAD_BYTES.div_ceil(bytes.max(1)).max(1)
}

impl<E: Elem> InputSparseFfn<E> {
    /// `rows` may be 0 (an empty batch): [`Self::hidden`] and [`Self::sweep`]
    /// return an empty result for it before any kernel.
    fn check(&self, xs: &[f32], rows: usize, t: &[(&'static str, Option<f32>)]) -> Result<()> {
        let d = self.d;
        if xs.len() != rows * d {
            return Err(Error::shape(
                "x",
                format!("(n, {d})"),
                &[rows, xs.len() / rows.max(1)],
            ));
        }
        for &(name, v) in t {
            if let Some(v) = v {
                if !(v >= 0.0 && v.is_finite()) {
                    return Err(Error::value(
                        name,
                        "a finite value >= 0 (or None: keep all)",
                        v,
                    ));
                }
            }
        }
        Ok(())
    }

    /// The kept inputs (any row keeps them) and their per-row coefficients
    /// (`rows` each; 0 where a row drops the input), and the kept pair count.
    fn kept_inputs(
        &self,
        level: Level,
        xs: &[f32],
        rows: usize,
        t: Option<f32>,
    ) -> (Vec<u32>, Vec<f32>, u64) {
        let d = self.d;
        if let (1, Some(t)) = (rows, t) {
            // One row with a threshold (the common call): a vector filter.
            let mut ids = Vec::new();
            simd::above(level, xs, t, &mut ids);
            let coef: Vec<f32> = ids.iter().map(|&i| xs[i as usize]).collect();
            let kept = ids.len() as u64;
            return (ids, coef, kept);
        }
        let (mut ids, mut coef, mut pairs) = (Vec::new(), Vec::new(), 0u64);
        for i in 0..d {
            let at = coef.len();
            let mut kept = 0u64;
            for r in 0..rows {
                let v = xs[r * d + i];
                let keep = t.is_none_or(|t| v.abs() > t);
                coef.push(if keep { v } else { 0.0 });
                kept += u64::from(keep);
            }
            if kept == 0 {
                coef.truncate(at);
            } else {
                ids.push(i as u32);
                pairs += kept;
            }
        }
        (ids, coef, pairs)
    }

    /// `h` of tile `t`'s neurons `lo..hi` for each row, from the kept inputs:
    /// `act(gate x) * (up x)` (gated) or `act(up x + b)`; row-major `(rows, hi - lo)`.
    fn hidden_tile(
        &self,
        level: Level,
        (ids, coef): (&[u32], &[f32]),
        rows: usize,
        t: usize,
    ) -> Vec<f32> {
        let (lo, hi) = self.tile_range(t);
        let n = hi - lo;
        let parts = self.parts();
        let mut acc = vec![0.0f32; parts * rows * n];
        if rows == 1 {
            // One row: each part of a kept input straight into its
            // accumulators (no decoded copy, see `neurons::fused`), asking as
            // it goes for the same part of the kept input `m` places on (see
            // [`AHEAD_BYTES`]), also within a run of consecutive inputs.
            let m = ahead_items(std::mem::size_of_val(self.bundle(t, 0)));
            for (k, &i) in ids.iter().enumerate() {
                let next = ids.get(k + m).map(|&j| self.bundle(t, j as usize));
                let all = self.bundle(t, i as usize);
                let len = n / E::LANES;
                for (p, w) in all.chunks_exact(len).enumerate() {
                    let a = coef[k] * self.col_scales[(t * self.d + i as usize) * parts + p];
                    let ahead = next.map(|b| &b[p * len..(p + 1) * len]);
                    E::axpy(level, a, w, &mut acc[p * n..(p + 1) * n], ahead);
                }
            }
        } else {
            // Several rows: `GROUP` kept inputs at a time, each part's runs
            // decoded once and added into every row's accumulators (see
            // [`axpy_group_rows`]); a padding slot repeats the last input
            // with coefficient 0.
            let nu = n / E::LANES;
            // The group `m` groups on (see [`AHEAD_BYTES`]).
            let m = GROUP * ahead_items(GROUP * std::mem::size_of_val(self.bundle(t, 0)));
            let mut coefs = vec![[0.0f32; GROUP]; rows];
            let mut bufs: Box<GroupBuffers> = Box::new([[0.0; _]; GROUP]);
            let group = |g0: usize| -> [&[E]; GROUP] {
                std::array::from_fn(|q| self.bundle(t, ids[(g0 + q).min(ids.len() - 1)] as usize))
            };
            for g0 in (0..ids.len()).step_by(GROUP) {
                let (all, next) = (group(g0), (g0 + m < ids.len()).then(|| group(g0 + m)));
                for p in 0..parts {
                    for (r, c) in coefs.iter_mut().enumerate() {
                        *c = std::array::from_fn(|q| match ids.get(g0 + q) {
                            Some(&i) => {
                                let s = self.col_scales[(t * self.d + i as usize) * parts + p];
                                coef[(g0 + q) * rows + r] * s
                            }
                            None => 0.0,
                        });
                    }
                    let ws = all.map(|w| &w[p * nu..(p + 1) * nu]);
                    let ahead = next.map(|a| a.map(|w| &w[p * nu..(p + 1) * nu]));
                    let a = &mut acc[p * rows * n..(p + 1) * rows * n];
                    axpy_group_rows(level, (ws, ahead), &coefs, (a, n), &mut bufs);
                }
            }
        }
        let (pre, up) = acc.split_at_mut(rows * n);
        let bias = self.pre_bias.as_ref().map(|b| &b[lo..hi]);
        for r in 0..rows {
            let u = self.gated.then(|| &up[r * n..(r + 1) * n]);
            self.act
                .apply_tile(level, &mut pre[r * n..(r + 1) * n], bias, u);
        }
        acc.truncate(rows * n);
        acc
    }

    /// The hidden values `h` (before the hidden mask) for each row of `xs`,
    /// with inputs `|x| <= t_in` dropped: row-major `(rows, h)`. What
    /// calibration measures.
    pub fn hidden(&self, xs: &[f32], rows: usize, t_in: Option<f32>) -> Result<Vec<f32>> {
        self.check(xs, rows, &[("t_in", t_in)])?;
        if rows == 0 {
            return Ok(Vec::new());
        }
        let level = simd::level()?;
        let (ids, coef, _) = self.kept_inputs(level, xs, rows, t_in);
        let parts: Vec<Vec<f32>> = crate::threads::install(|| {
            (0..self.num_tiles())
                .into_par_iter()
                .map(|t| self.hidden_tile(level, (&ids, &coef), rows, t))
                .collect()
        })?;
        let mut out = vec![0.0f32; rows * self.h];
        for (t, p) in parts.iter().enumerate() {
            let (lo, hi) = self.tile_range(t);
            let n = hi - lo;
            for r in 0..rows {
                out[r * self.h + lo..r * self.h + hi].copy_from_slice(&p[r * n..(r + 1) * n]);
            }
        }
        Ok(out)
    }

    /// The FFN output for `rows` inputs `xs` (`rows x d`), reading only the
    /// columns of inputs with `|x| > t_in` and the down columns of neurons with
    /// `|h| > t_hidden` (None: keep every input / neuron, the dense FFN).
    pub fn forward(
        &self,
        xs: &[f32],
        rows: usize,
        t_in: Option<f32>,
        t_hidden: Option<f32>,
    ) -> Result<Vec<f32>> {
        self.sweep(self.prepare(xs, rows, t_in, t_hidden)?)
    }

    /// [`Self::forward`]'s first step: checks the call and finds the kept
    /// inputs, which tell how long the sweep will take ([`Kept::is_short`]).
    pub fn prepare(
        &self,
        xs: &[f32],
        rows: usize,
        t_in: Option<f32>,
        t_hidden: Option<f32>,
    ) -> Result<Kept> {
        self.check(xs, rows, &[("t_in", t_in), ("t_hidden", t_hidden)])?;
        let level = simd::level()?;
        let (ids, coef, pairs) = self.kept_inputs(level, xs, rows, t_in);
        // About the weights the sweep reads: the kept inputs' share of every
        // matrix (the down columns counted as if as many neurons were kept).
        let values = (self.parts() + 1) * self.h * ids.len();
        Ok(Kept {
            level,
            layer: (self.h, self.d),
            rows,
            ids,
            coef,
            pairs,
            t_hidden,
            values,
        })
    }

    /// [`Self::forward`]'s second step: the hidden values of the kept inputs,
    /// the hidden mask and the kept neurons' down columns.
    pub fn sweep(&self, kept: Kept) -> Result<Vec<f32>> {
        if kept.layer != (self.h, self.d) {
            return Err(Error::value(
                "kept",
                format!("prepared for a ({}, {}) layer", self.h, self.d),
                format!("prepared for ({}, {})", kept.layer.0, kept.layer.1),
            ));
        }
        let Kept {
            level,
            layer: _,
            rows,
            ids,
            coef,
            pairs: in_pairs,
            t_hidden,
            values,
        } = kept;
        if rows == 0 {
            // An empty batch: no work, and the counters stay as they are.
            return Ok(Vec::new());
        }
        let (d, du) = (self.d, self.d / E::LANES);
        let work = |(mut y, mut kept): (Vec<f32>, u64), t: usize| {
            let hid = self.hidden_tile(level, (&ids, &coef), rows, t);
            let (lo, hi) = self.tile_range(t);
            let n = hi - lo;
            let keep = |v: f32| t_hidden.is_none_or(|t| v.abs() > t);
            let mut active = Vec::new();
            match (rows, t_hidden) {
                (1, Some(t)) => _ = simd::above(level, &hid, t, &mut active),
                _ => active.extend(
                    (0..n as u32).filter(|&jj| (0..rows).any(|r| keep(hid[r * n + jj as usize]))),
                ),
            };
            let col = |j: usize| &self.down[j * du..(j + 1) * du];
            // The kept neuron `m` places on (see [`AHEAD_BYTES`]).
            let m = ahead_items(std::mem::size_of_val(col(0)));
            if rows == 1 {
                // One row: each kept column straight into `y`, its coefficient
                // the hidden value (`active` holds only kept neurons).
                for (q, &jj) in active.iter().enumerate() {
                    let (jj, j) = (jj as usize, lo + jj as usize);
                    let ahead = active.get(q + m).map(|&next| col(lo + next as usize));
                    E::axpy(level, hid[jj] * self.down_scales[j], col(j), &mut y, ahead);
                }
                return (y, kept + active.len() as u64);
            }
            // Several rows: `GROUP` kept neurons at a time (see
            // [`axpy_group_rows`]); a row whose value is masked takes 0.
            let m = GROUP * ahead_items(GROUP * std::mem::size_of_val(col(0)));
            let mut coefs = vec![[0.0f32; GROUP]; rows];
            let mut bufs: Box<GroupBuffers> = Box::new([[0.0; _]; GROUP]);
            let group = |g0: usize| -> [&[E]; GROUP] {
                std::array::from_fn(|q| col(lo + active[(g0 + q).min(active.len() - 1)] as usize))
            };
            for g0 in (0..active.len()).step_by(GROUP) {
                for (r, c) in coefs.iter_mut().enumerate() {
                    *c = std::array::from_fn(|q| match active.get(g0 + q) {
                        Some(&jj) if keep(hid[r * n + jj as usize]) => {
                            kept += 1;
                            hid[r * n + jj as usize] * self.down_scales[lo + jj as usize]
                        }
                        _ => 0.0,
                    });
                }
                let next = (g0 + m < active.len()).then(|| group(g0 + m));
                axpy_group_rows(level, (group(g0), next), &coefs, (&mut y, d), &mut bufs);
            }
            (y, kept)
        };
        let init = || (vec![0.0f32; rows * d], 0u64);
        let (mut ys, hid_pairs) = if values < INLINE_VALUES {
            (0..self.num_tiles()).fold(init(), work)
        } else {
            let parts = crate::threads::team::map(self.num_tiles(), |t| work(init(), t))?;
            let mut parts = parts.into_iter();
            let first = parts.next().unwrap_or_else(init);
            parts.fold(first, |(mut a, ka), (b, kb)| {
                for (x, y) in a.iter_mut().zip(&b) {
                    *x += y;
                }
                (a, ka + kb)
            })
        };
        if let Some(b) = &self.down_bias {
            for y in ys.chunks_exact_mut(d) {
                for (yi, bi) in y.iter_mut().zip(b) {
                    *yi += bi;
                }
            }
        }
        for (a, v) in self
            .counters
            .iter()
            .zip([1, rows as u64, in_pairs, hid_pairs])
        {
            a.fetch_add(v, Relaxed);
        }
        Ok(ys)
    }
}
