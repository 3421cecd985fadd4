//! The input-sparse FFN: every projection skips the weights of its small
//! inputs, as in TEAL (Liu et al., "Training-Free Activation Sparsity in Large
//! Language Models", ICLR 2025).
//!
//! The neuron-sparse FFN ([`super::ffn`], CATS) must read the whole gate to
//! know which neurons are active, so at sparsity `s` it still reads
//! `1/3 + 2/3 (1 - s)` of a SwiGLU FFN's weights. Here the masks sit on the
//! inputs of the projections instead: inputs `x_i` with `|x_i| <= t_in` are
//! dropped from `gate x` and `up x` (their weight columns are not read), and
//! hidden values `h_j = act(gate_j x) * (up_j x)` with `|h_j| <= t_hidden` are
//! dropped from `down h` (their down columns are not read). At sparsity `s` on
//! both, a call reads `1 - s` of the weights.
//!
//! Layout: the neurons are cut into tiles (64 to 1536 neurons, about four per
//! worker of the pool at construction). Within a tile, input `i`'s gate column slice, then
//! its up column slice (an ungated FFN stores only up), are contiguous, input
//! after input: a tile's work for one kept input is one sequential read, a
//! dense call streams each tile straight through, and a tile's accumulators
//! stay in L1. Down is neuron-major (neuron `j`'s down column, `d` values). A
//! call is one parallel sweep over the tiles: each accumulates its slice of
//! `gate x` and `up x` over the kept inputs, forms `h`, masks it, and adds the
//! kept neurons' down columns into a per-task output.
//!
//! Masked values contribute exactly zero, so the result equals the dense FFN
//! applied to the masked inputs and hidden values (up to float reassociation).

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use rayon::prelude::*;

use super::activation::Activation;
use super::axpy::{axpy_ahead_at, axpy_n_at};
use super::elem::{axpy_rows, Elem};
use crate::error::{Error, Result};
use crate::quant::pages::huge_vec;
use crate::simd::{self, Level};

/// Neurons per tile are a multiple of this, so a tile starts on a whole unit of
/// any element type (two 4-bit codes per byte) and on a cache line of f32.
const TILE_ALIGN: usize = 64;
/// Largest tile: its gate and up accumulators (12 KiB of f32 per row) stay in
/// L1, and a kept input's run of weights is long (6-12 KiB in f32, 3-6 in f16)
/// for the memory system, which serves short scattered runs less well.
const MAX_TILE: usize = 1536;
/// A call that reads fewer bytes runs on the caller's thread: waking the pool's
/// workers (asleep between the layers of a model) costs more than it saves
/// (the same bound as the quantized mat-vec's, see `quant::matvec`).
const INLINE_BYTES: usize = 1 << 18;
/// Bytes of the next kept neuron's down column (or input's slice) requested ahead.
const PREFETCH_BYTES: usize = 2048;

/// Hints the CPU to start loading the first [`PREFETCH_BYTES`] of `w` (a
/// sparse sweep jumps over dropped neurons, which stalls the hardware
/// prefetcher).
fn prefetch<E>(w: &[E]) {
    let p = w.as_ptr() as *const u8;
    prefetch_range(
        p,
        p.wrapping_add(std::mem::size_of_val(w).min(PREFETCH_BYTES)),
    );
}

/// Hints the CPU to load the bytes `start..end` (a prefetch never faults, and
/// `wrapping_add` keeps the address arithmetic defined, whatever the range).
fn prefetch_range(start: *const u8, end: *const u8) {
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

/// Counters accumulated over calls.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct InputSparseStats {
    /// Calls to `forward`.
    pub calls: u64,
    /// Input rows processed.
    pub rows: u64,
    /// (row, input) pairs kept.
    pub kept_inputs: u64,
    /// (row, neuron) pairs kept for the down projection.
    pub kept_hidden: u64,
}

/// An FFN whose projections read only the weights of kept inputs.
pub struct InputSparseFfn<E: Elem> {
    /// Per tile, per input: its gate then up column slice (see the module doc).
    cols: Vec<E>,
    /// One scale per (tile, input, part).
    col_scales: Vec<f32>,
    /// Neurons per tile (the last tile may hold fewer).
    tile: usize,
    /// Per neuron: its down column (`d` values).
    down: Vec<E>,
    down_scales: Vec<f32>,
    h: usize,
    d: usize,
    gated: bool,
    pre_bias: Option<Vec<f32>>,
    down_bias: Option<Vec<f32>>,
    act: Activation,
    counters: [AtomicU64; 4],
}

/// Calls `put(c, column c)` for every column `c` of the row-major `(rows,
/// cols)` matrix `m`, transposing 64 columns at a time (each source row
/// segment is read once per block, not once per column).
fn columns(m: &[f32], rows: usize, cols: usize, mut put: impl FnMut(usize, &[f32])) {
    let mut block = vec![0.0f32; 64 * rows];
    for c0 in (0..cols).step_by(64) {
        let nc = (cols - c0).min(64);
        for r in 0..rows {
            for (k, &v) in m[r * cols + c0..r * cols + c0 + nc].iter().enumerate() {
                block[k * rows + r] = v;
            }
        }
        for k in 0..nc {
            put(c0 + k, &block[k * rows..(k + 1) * rows]);
        }
    }
}

impl<E: Elem> InputSparseFfn<E> {
    /// Builds the layout from torch-layout matrices: `gate` and `up` of shape
    /// `(h, d)`, `down` of shape `(d, h)`; `gate = None` makes an ungated FFN
    /// (`down(act(up x + pre_bias))`).
    pub fn new(
        gate: Option<&[f32]>,
        up: &[f32],
        down: &[f32],
        (h, d): (usize, usize),
        act: Activation,
        pre_bias: Option<Vec<f32>>,
        down_bias: Option<Vec<f32>>,
    ) -> Result<Self> {
        if h == 0 || d == 0 {
            return Err(Error::value(
                "up",
                "a non-empty (h, d) matrix",
                format!("({h}, {d})"),
            ));
        }
        let shape = |name: &'static str, len: usize, want: String, r: usize, c: usize| {
            if len == r * c {
                Ok(())
            } else {
                Err(Error::shape(name, want, &[len / c, c]))
            }
        };
        shape("up", up.len(), format!("({h}, {d})"), h, d)?;
        if let Some(g) = gate {
            shape("gate", g.len(), format!("({h}, {d}) to match up"), h, d)?;
        }
        shape("down", down.len(), format!("({d}, {h}) to match up"), d, h)?;
        for (name, n) in [("up", h), ("down", d)] {
            if !n.is_multiple_of(E::LANES) {
                return Err(Error::value(
                    name,
                    format!("h and d divisible by {} for {}", E::LANES, E::NAME),
                    format!("({h}, {d})"),
                ));
            }
        }
        if let Some(b) = &pre_bias {
            crate::validate::same_len("up_bias", b.len(), h, "the number of neurons")?;
        }
        if let Some(b) = &down_bias {
            crate::validate::same_len("down_bias", b.len(), d, "the model size")?;
        }
        let parts = if gate.is_some() { 2 } else { 1 };
        // About four tiles per worker of the pool as it is now (the layout is
        // fixed; a later thread count only changes the balance).
        let workers = crate::threads::num_threads().unwrap_or(1).max(1);
        // Types decoded to f32 first also keep the decoded run in L1.
        let max = if E::as_f32(&[]).is_some() {
            MAX_TILE
        } else {
            MAX_TILE * 2 / 3
        };
        let tile = (h / (4 * workers))
            .next_multiple_of(TILE_ALIGN)
            .clamp(TILE_ALIGN, max.next_multiple_of(TILE_ALIGN));
        let du = d / E::LANES;
        let mut cols = huge_vec(d * parts * h / E::LANES, E::default());
        let ntiles = h.div_ceil(tile);
        let mut col_scales = vec![1.0f32; ntiles * d * parts];
        for (p, m) in gate.into_iter().chain([up]).enumerate() {
            columns(m, h, d, |i, col| {
                for t in 0..ntiles {
                    let (lo, hi) = (t * tile, ((t + 1) * tile).min(h));
                    let at = Self::col_at(t * tile, hi - lo, d, parts, i, p);
                    let dst = &mut cols[at..at + (hi - lo) / E::LANES];
                    col_scales[(t * d + i) * parts + p] = E::encode(&col[lo..hi], dst);
                }
            });
        }
        let mut dn = huge_vec(h * du, E::default());
        let mut down_scales = vec![1.0f32; h];
        columns(down, d, h, |j, col| {
            down_scales[j] = E::encode(col, &mut dn[j * du..(j + 1) * du]);
        });
        Ok(InputSparseFfn {
            cols,
            col_scales,
            tile,
            down: dn,
            down_scales,
            h,
            d,
            gated: parts == 2,
            pre_bias,
            down_bias,
            act,
            counters: Default::default(),
        })
    }

    /// Hidden size `h`.
    pub fn num_neurons(&self) -> usize {
        self.h
    }

    /// Model size `d`.
    pub fn dim(&self) -> usize {
        self.d
    }

    /// Whether there is a gate projection.
    pub fn gated(&self) -> bool {
        self.gated
    }

    /// Bytes of stored weights and scales.
    pub fn memory_bytes(&self) -> usize {
        std::mem::size_of_val(&self.cols[..])
            + std::mem::size_of_val(&self.down[..])
            + 4 * (self.col_scales.len() + self.down_scales.len())
    }

    fn parts(&self) -> usize {
        1 + usize::from(self.gated)
    }

    /// Where (in units) input `i`'s part `p` starts in the tile of neurons
    /// `lo..lo + n`: after the full tiles before it, then `(i, p)` slices of
    /// `n` neurons.
    fn col_at(lo: usize, n: usize, d: usize, parts: usize, i: usize, p: usize) -> usize {
        (lo * d * parts + (i * parts + p) * n) / E::LANES
    }

    /// Tile `t`'s neurons `(lo, hi)`.
    fn tile_range(&self, t: usize) -> (usize, usize) {
        (t * self.tile, ((t + 1) * self.tile).min(self.h))
    }

    fn num_tiles(&self) -> usize {
        self.h.div_ceil(self.tile)
    }

    /// Input `i`'s slices in tile `t`, all parts (contiguous).
    fn bundle(&self, t: usize, i: usize) -> &[E] {
        let (lo, hi) = self.tile_range(t);
        let at = Self::col_at(lo, hi - lo, self.d, self.parts(), i, 0);
        &self.cols[at..at + self.parts() * (hi - lo) / E::LANES]
    }

    /// Part `p` of input `i`'s column slice in tile `t`, and its scale.
    fn col(&self, t: usize, i: usize, p: usize) -> (&[E], f32) {
        let (lo, hi) = self.tile_range(t);
        let at = Self::col_at(lo, hi - lo, self.d, self.parts(), i, p);
        (
            &self.cols[at..at + (hi - lo) / E::LANES],
            self.col_scales[(t * self.d + i) * self.parts() + p],
        )
    }

    /// The stored weights back in torch layout as f32: (gate or None, up, down).
    pub fn to_matrices(&self) -> (Option<Vec<f32>>, Vec<f32>, Vec<f32>) {
        let (h, d) = (self.h, self.d);
        let level = Level::Scalar;
        let mut col = vec![0.0f32; h.max(d)];
        let mut mats = vec![vec![0.0f32; h * d]; self.parts()];
        for t in 0..self.num_tiles() {
            let (lo, hi) = self.tile_range(t);
            for i in 0..d {
                for (p, m) in mats.iter_mut().enumerate() {
                    let (w, s) = self.col(t, i, p);
                    E::to_f32(level, w, &mut col[..hi - lo]);
                    for j in lo..hi {
                        m[j * d + i] = col[j - lo] * s;
                    }
                }
            }
        }
        let mut down = vec![0.0f32; d * h];
        let du = d / E::LANES;
        for j in 0..h {
            E::to_f32(level, &self.down[j * du..(j + 1) * du], &mut col[..d]);
            for i in 0..d {
                down[i * h + j] = col[i] * self.down_scales[j];
            }
        }
        let up = mats.pop().unwrap_or_default();
        (mats.pop(), up, down)
    }

    /// The accumulated counters.
    pub fn stats(&self) -> InputSparseStats {
        let c: Vec<u64> = self.counters.iter().map(|a| a.load(Relaxed)).collect();
        InputSparseStats {
            calls: c[0],
            rows: c[1],
            kept_inputs: c[2],
            kept_hidden: c[3],
        }
    }

    /// Zeroes the counters.
    pub fn reset_stats(&self) {
        for a in &self.counters {
            a.store(0, Relaxed);
        }
    }

    fn check(&self, xs: &[f32], rows: usize, t: &[(&'static str, Option<f32>)]) -> Result<()> {
        let d = self.d;
        if rows == 0 || xs.len() != rows * d {
            return Err(Error::shape(
                "x",
                format!("(n, {d}) with n >= 1"),
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
    fn kept_inputs(&self, xs: &[f32], rows: usize, t: Option<f32>) -> (Vec<u32>, Vec<f32>, u64) {
        let d = self.d;
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
        // f32 views of an input's slices: the stored ones for f32, else
        // decoded into `buf` (n floats, in L1 next to `acc`).
        let direct = E::as_f32(&self.cols[..0]).is_some();
        let mut buf = vec![0.0f32; if direct { 0 } else { parts * n }];
        if direct && rows == 1 {
            // One row of f32 (scales 1.0): an input's gate and up slices are one
            // contiguous run, and so are the row's two accumulators: one call.
            // (Prefetching as below.)
            for (k, &i) in ids.iter().enumerate() {
                let ahead = ids
                    .get(k + 1)
                    .filter(|&&j| j != i + 1)
                    .and_then(|&j| E::as_f32(self.bundle(t, j as usize)));
                if let Some(w) = E::as_f32(self.bundle(t, i as usize)) {
                    axpy_ahead_at(level, coef[k], w, &mut acc, ahead);
                }
            }
        } else {
            for (k, &i) in ids.iter().enumerate() {
                // The slices of the kept input two places on, requested while
                // this one is decoded, where they do not follow the input
                // before them: a run of kept inputs is one stream the hardware
                // prefetchers follow best alone; a jump is one they cannot
                // predict. (Two ahead: one input's work is shorter than a
                // memory access.)
                if let (Some(&prev), Some(&next)) = (ids.get(k + 1), ids.get(k + 2)) {
                    if next != prev + 1 {
                        let w = self.bundle(t, next as usize);
                        let p = w.as_ptr() as *const u8;
                        prefetch_range(p, p.wrapping_add(std::mem::size_of_val(w)));
                    }
                }
                // Every part of the input at once (one contiguous run).
                let all = self.bundle(t, i as usize);
                let view = match E::as_f32(all) {
                    Some(w) => w,
                    None => {
                        E::to_f32(level, all, &mut buf);
                        &buf[..]
                    }
                };
                for (p, w) in view.chunks_exact(n).enumerate() {
                    let s = self.col_scales[(t * self.d + i as usize) * parts + p];
                    let a = &mut acc[p * rows * n..(p + 1) * rows * n];
                    for (r, y) in a.chunks_exact_mut(n).enumerate() {
                        let c = coef[k * rows + r];
                        if c != 0.0 {
                            axpy_n_at(level, [c * s], [w], y);
                        }
                    }
                }
            }
        }
        let (pre, up) = acc.split_at_mut(rows * n);
        for r in 0..rows {
            for jj in 0..n {
                let b = self.pre_bias.as_ref().map_or(0.0, |b| b[lo + jj]);
                let a = self.act.apply(pre[r * n + jj] + b);
                pre[r * n + jj] = if self.gated { a * up[r * n + jj] } else { a };
            }
        }
        acc.truncate(rows * n);
        acc
    }

    /// The hidden values `h` (before the hidden mask) for each row of `xs`,
    /// with inputs `|x| <= t_in` dropped: row-major `(rows, h)`. What
    /// calibration measures.
    pub fn hidden(&self, xs: &[f32], rows: usize, t_in: Option<f32>) -> Result<Vec<f32>> {
        self.check(xs, rows, &[("t_in", t_in)])?;
        let level = simd::level()?;
        let (ids, coef, _) = self.kept_inputs(xs, rows, t_in);
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
        self.check(xs, rows, &[("t_in", t_in), ("t_hidden", t_hidden)])?;
        let level = simd::level()?;
        let (d, du) = (self.d, self.d / E::LANES);
        let (ids, coef, in_pairs) = self.kept_inputs(xs, rows, t_in);
        let work = |(mut y, mut kept): (Vec<f32>, u64), t: usize| {
            let hid = self.hidden_tile(level, (&ids, &coef), rows, t);
            let (lo, hi) = self.tile_range(t);
            let n = hi - lo;
            let keep = |v: f32| t_hidden.is_none_or(|t| v.abs() > t);
            let active: Vec<usize> = (0..n)
                .filter(|&jj| (0..rows).any(|r| keep(hid[r * n + jj])))
                .collect();
            let mut c = vec![0.0f32; rows];
            for (q, &jj) in active.iter().enumerate() {
                // The next kept neuron's column, where it does not follow this one.
                if let Some(&next) = active.get(q + 1).filter(|&&j| j != jj + 1) {
                    let j = lo + next;
                    prefetch(&self.down[j * du..(j + 1) * du]);
                }
                for (r, cr) in c.iter_mut().enumerate() {
                    let v = hid[r * n + jj];
                    *cr = if keep(v) { v } else { 0.0 };
                    kept += u64::from(keep(v));
                }
                let j = lo + jj;
                axpy_rows(
                    level,
                    &self.down[j * du..(j + 1) * du],
                    self.down_scales[j],
                    &c,
                    &mut y,
                );
            }
            (y, kept)
        };
        let init = || (vec![0.0f32; rows * d], 0u64);
        // About the work of this call, as bytes of f32 weights (the kept
        // inputs' share of every matrix; quantized types cost their decoding).
        let work_bytes = 4 * (self.parts() + 1) * self.h * ids.len();
        let (mut ys, hid_pairs) = if work_bytes < INLINE_BYTES {
            (0..self.num_tiles()).fold(init(), work)
        } else {
            crate::threads::install(|| {
                (0..self.num_tiles())
                    .into_par_iter()
                    .fold(init, work)
                    .reduce(init, |(mut a, ka), (b, kb)| {
                        for (x, y) in a.iter_mut().zip(&b) {
                            *x += y;
                        }
                        (a, ka + kb)
                    })
            })?
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

#[cfg(test)]
mod tests {
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

    fn check<E: Elem>(gated: bool, tol: f64) {
        let (h, d) = (200, 96);
        let mut seed = 7;
        let mut m = |n: usize| (0..n).map(|_| lcg(&mut seed)).collect::<Vec<f32>>();
        let (g, u, dn) = (m(h * d), m(h * d), m(d * h));
        let pb = (!gated).then(|| m(h));
        let db = Some(m(d));
        let x = m(2 * d);
        let act = if gated {
            Activation::Silu
        } else {
            Activation::Gelu
        };
        let f = InputSparseFfn::<E>::new(gated.then_some(&g[..]), &u, &dn, (h, d), act, pb, db)
            .unwrap();
        for (t_in, t_h) in [(None, None), (Some(0.2), None), (Some(0.1), Some(0.05))] {
            let y = f.forward(&x, 2, t_in, t_h).unwrap();
            for r in 0..2 {
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
        assert_eq!((s.calls, s.rows), (3, 6));
        assert!(s.kept_inputs < 3 * 2 * d as u64 && s.kept_hidden < 3 * 2 * h as u64);
    }

    #[test]
    fn equals_the_masked_dense_ffn_in_every_format() {
        for gated in [true, false] {
            check::<f32>(gated, 1e-4);
            check::<f16>(gated, 1e-4);
            check::<Q8>(gated, 1e-4);
            check::<Q4>(gated, 1e-4);
        }
    }

    #[test]
    fn keeps_the_weights_and_rejects_bad_input() {
        let (h, d) = (130, 6);
        let w: Vec<f32> = (0..h * d).map(|i| i as f32 / 100.0).collect();
        let f = InputSparseFfn::<f32>::new(Some(&w), &w, &w, (h, d), Activation::Silu, None, None)
            .unwrap();
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
        assert!(InputSparseFfn::<f32>::new(
            None,
            &w,
            &w[1..],
            (h, d),
            Activation::Relu,
            None,
            None
        )
        .is_err());
    }
}
