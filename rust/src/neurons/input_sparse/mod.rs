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
//! Layout: the neurons are cut into tiles (64 to 1536 neurons for f32, up to
//! 3072 for the narrower types; one per worker of the pool at construction
//! where the layer is small enough). Within a tile, input `i`'s gate
//! column slice, then its up column slice (an ungated FFN stores only up), are
//! contiguous, input after input: a tile's work for one kept input is one sequential read, a
//! dense call streams each tile straight through, and a tile's accumulators
//! stay in L1. Down is neuron-major (neuron `j`'s down column, `d` values). A
//! call is one parallel sweep over the tiles: each accumulates its slice of
//! `gate x` and `up x` over the kept inputs, forms `h`, masks it, and adds the
//! kept neurons' down columns into a per-task output.
//!
//! This file holds the layout; `sweep.rs` the forward pass.
//!
//! Masked values contribute exactly zero, so the result equals the dense FFN
//! applied to the masked inputs and hidden values (up to float reassociation).

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

mod sweep;

pub use sweep::Kept;

use super::activation::Activation;
use super::elem::Elem;
use crate::error::{Error, Result};
use crate::quant::pages::huge_vec;
use crate::simd::Level;

/// Neurons per tile are a multiple of this, so a tile starts on a whole unit of
/// any element type (two 4-bit codes per byte) and on a cache line of f32.
const TILE_ALIGN: usize = 64;
/// Largest f32 tile: its gate and up accumulators (12 KiB of f32 per row) stay
/// in L1, and a kept input's run of weights is long (6-12 KiB) for the memory
/// system, which serves short scattered runs less well.
const MAX_TILE: usize = 1536;
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
        if h.max(d) > u32::MAX as usize {
            // Kept inputs and neurons are listed as u32 positions.
            return Err(Error::value(
                "up",
                format!("h and d at most {}", u32::MAX),
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
        // Tiles as wide as they may be, at least one per worker of the pool
        // as it is now (the layout is fixed; a later thread count only
        // changes the balance): the wider a tile, the longer each kept input's run of
        // weights, and a sparse sweep over short scattered runs waits on
        // memory. Narrower types may be twice as wide: their runs are shorter
        // for the same width. (Measured on Zen 5, 4096x11008 int8 at 50%:
        // 5.7 ms with 1024-neuron tiles, 3.5-3.8 ms with 2752; 576x1536 f32
        // at 50%: 88 us with 8 tiles, 63 us with 2.)
        let workers = crate::threads::num_threads().unwrap_or(1).max(1);
        let max = if E::as_f32(&[]).is_some() {
            MAX_TILE
        } else {
            2 * MAX_TILE
        };
        // As few tiles as the widest allows, a multiple of the workers, of
        // equal width where the layer is wide enough (so every worker gets the
        // same share; a narrow layer gets fewer tiles of 64).
        let count = h.div_ceil(max).next_multiple_of(workers);
        let tile = h.div_ceil(count).next_multiple_of(TILE_ALIGN);
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
}

#[cfg(test)]
mod tests;
