//! Neuron-major ("row-column bundled") FFN weights.
//!
//! An FFN `y = down(act(gate x) * up x)` with hidden size `h` and model size
//! `d` is stored as `h` bundles, one per neuron: its gate row, its up row and
//! its down column, contiguous (`3 d` elements; `2 d` for an ungated
//! BERT-style FFN `y = down(act(up x + b))`, whose "pre" row is the up row).
//! Skipping an inactive neuron then skips one contiguous block, and fetching an
//! active one is a single sequential read, as in "LLM in a flash".
//!
//! The kernels see weights only through [`NeuronWeights`], so another storage
//! (a row-quantized format, say) plugs in by implementing its four methods.

use super::elem::Elem;
use super::rows::{axpy_rows, dot_rows};
use crate::error::{Error, Result};
use crate::simd::Level;

/// Bytes of the next neuron's pre row requested ahead of the sweep.
const PREFETCH_BYTES: usize = 2048;

/// What a sparse FFN kernel needs from its weight storage.
pub trait NeuronWeights: Send + Sync {
    /// Number of neurons (hidden size `h`).
    fn num_neurons(&self) -> usize;
    /// Model size `d` (length of every row and column).
    fn dim(&self) -> usize;
    /// Whether neurons have a separate up row (SwiGLU/GeGLU style).
    fn gated(&self) -> bool;
    /// Bytes one neuron's bundle occupies.
    fn bytes_per_neuron(&self) -> usize;
    /// `out[r] = pre_j · xs[r]`, where pre is the gate row (gated) or the up row.
    fn pre(&self, level: Level, j: usize, xs: &[f32], out: &mut [f32]);
    /// `out[r] = up_j · xs[r]` (gated weights only).
    fn up(&self, level: Level, j: usize, xs: &[f32], out: &mut [f32]);
    /// `ys[r] += coef[r] * down_j` for every row `r`.
    fn down_axpy(&self, level: Level, j: usize, coef: &[f32], ys: &mut [f32]);
    /// Hints the CPU to start loading neuron `j`'s pre row (a sparse sweep
    /// jumps over inactive neurons, which stalls the hardware prefetcher).
    fn prefetch(&self, _j: usize) {}
    /// A copy holding only the neurons `ids`, in that order (a hot tier).
    fn subset(&self, ids: &[u32]) -> Self
    where
        Self: Sized;
}

/// Bundled weights in element type `E` (f32, f16, or row-quantized
/// [`super::elem::Q8`] / [`super::elem::Q4`] with one scale per row and column).
#[derive(Debug, Clone)]
pub struct Bundled<E: Elem> {
    data: Vec<E>,
    /// One scale per (neuron, part); all 1.0 for plain float types.
    scales: Vec<f32>,
    h: usize,
    d: usize,
    gated: bool,
}

impl<E: Elem> Bundled<E> {
    /// Bundles torch-layout matrices: `gate` and `up` of shape `(h, d)` (row `j`
    /// is neuron `j`'s input weights), `down` of shape `(d, h)` (column `j` is
    /// its output weights). `gate = None` makes an ungated FFN.
    pub fn from_matrices(
        gate: Option<&[f32]>,
        up: &[f32],
        down: &[f32],
        h: usize,
        d: usize,
    ) -> Result<Self> {
        if h == 0 || d == 0 {
            return Err(Error::value(
                "up",
                "a non-empty (h, d) matrix",
                format!("({h}, {d})"),
            ));
        }
        if up.len() != h * d {
            return Err(Error::shape(
                "up",
                format!("({h}, {d})"),
                &[up.len() / d, d],
            ));
        }
        if let Some(g) = gate {
            if g.len() != h * d {
                return Err(Error::shape(
                    "gate",
                    format!("({h}, {d}) to match up"),
                    &[g.len() / d, d],
                ));
            }
        }
        if down.len() != d * h {
            return Err(Error::shape(
                "down",
                format!("({d}, {h}) to match up"),
                &[down.len() / h, h],
            ));
        }
        if !d.is_multiple_of(E::LANES) {
            return Err(Error::value(
                "up",
                format!("a model size d divisible by {} for {}", E::LANES, E::NAME),
                d,
            ));
        }
        let k = if gate.is_some() { 3 } else { 2 };
        let units = d / E::LANES;
        let mut data = vec![E::default(); h * k * units];
        let mut scales = vec![1.0f32; h * k];
        let mut column = vec![0.0f32; d];
        for (j, (bundle, sc)) in data
            .chunks_exact_mut(k * units)
            .zip(scales.chunks_exact_mut(k))
            .enumerate()
        {
            let mut parts = bundle.chunks_exact_mut(units).zip(sc.iter_mut());
            let mut put = |src: &[f32]| {
                if let Some((dst, scale)) = parts.next() {
                    *scale = E::encode(src, dst);
                }
            };
            if let Some(g) = gate {
                put(&g[j * d..(j + 1) * d]);
            }
            put(&up[j * d..(j + 1) * d]);
            for (i, c) in column.iter_mut().enumerate() {
                *c = down[i * h + j];
            }
            put(&column);
        }
        Ok(Bundled {
            data,
            scales,
            h,
            d,
            gated: gate.is_some(),
        })
    }

    fn parts(&self) -> usize {
        if self.gated {
            3
        } else {
            2
        }
    }

    fn bundle_len(&self) -> usize {
        self.d / E::LANES * self.parts()
    }

    fn bundle(&self, j: usize) -> &[E] {
        let b = self.bundle_len();
        &self.data[j * b..(j + 1) * b]
    }

    /// The part `p` (0: pre, 1: up or down, 2: down) of neuron `j`, and its scale.
    fn part(&self, j: usize, p: usize) -> (&[E], f32) {
        let u = self.d / E::LANES;
        (
            &self.bundle(j)[p * u..(p + 1) * u],
            self.scales[j * self.parts() + p],
        )
    }

    /// Decodes part `p` of neuron `j` to f32, scale applied.
    fn decode(&self, j: usize, p: usize, out: &mut [f32]) {
        let (w, scale) = self.part(j, p);
        E::to_f32(Level::Scalar, w, out);
        for v in out.iter_mut() {
            *v *= scale;
        }
    }

    /// Back to torch layout `(gate, up, down)` as f32 (dequantized), for checks.
    pub fn to_matrices(&self) -> (Option<Vec<f32>>, Vec<f32>, Vec<f32>) {
        let (h, d) = (self.h, self.d);
        let mut row = vec![0.0f32; d];
        let mut gate = self.gated.then(|| vec![0.0f32; h * d]);
        let mut up = vec![0.0f32; h * d];
        let mut down = vec![0.0f32; d * h];
        let off = usize::from(self.gated);
        for j in 0..h {
            if let Some(g) = gate.as_mut() {
                self.decode(j, 0, &mut g[j * d..(j + 1) * d]);
            }
            self.decode(j, off, &mut up[j * d..(j + 1) * d]);
            self.decode(j, off + 1, &mut row);
            for (i, v) in row.iter().enumerate() {
                down[i * h + j] = *v;
            }
        }
        (gate, up, down)
    }
}

impl<E: Elem> NeuronWeights for Bundled<E> {
    fn num_neurons(&self) -> usize {
        self.h
    }
    fn dim(&self) -> usize {
        self.d
    }
    fn gated(&self) -> bool {
        self.gated
    }
    fn bytes_per_neuron(&self) -> usize {
        let scales = if E::QUANTIZED { self.parts() * 4 } else { 0 };
        self.bundle_len() * std::mem::size_of::<E>() + scales
    }
    fn pre(&self, level: Level, j: usize, xs: &[f32], out: &mut [f32]) {
        let (w, scale) = self.part(j, 0);
        dot_rows(level, w, scale, xs, out);
    }
    fn up(&self, level: Level, j: usize, xs: &[f32], out: &mut [f32]) {
        let (w, scale) = self.part(j, 1);
        dot_rows(level, w, scale, xs, out);
    }
    fn down_axpy(&self, level: Level, j: usize, coef: &[f32], ys: &mut [f32]) {
        let (w, scale) = self.part(j, self.parts() - 1);
        axpy_rows(level, w, scale, coef, ys);
    }
    fn prefetch(&self, j: usize) {
        if j >= self.h {
            return;
        }
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
            let (w, _) = self.part(j, 0);
            let bytes = std::mem::size_of_val(w).min(PREFETCH_BYTES);
            let p = w.as_ptr() as *const i8;
            for off in (0..bytes).step_by(64) {
                // SAFETY: `off < size_of_val(w)`: the address lies inside the row;
                // SSE (and so `prefetcht0`) is part of the x86-64 baseline, and a
                // prefetch never faults.
                unsafe { _mm_prefetch::<_MM_HINT_T0>(p.add(off)) };
            }
        }
    }
    fn subset(&self, ids: &[u32]) -> Self {
        let (b, k) = (self.bundle_len(), self.parts());
        let mut data = Vec::with_capacity(ids.len() * b);
        let mut scales = Vec::with_capacity(ids.len() * k);
        for &j in ids {
            let j = j as usize;
            data.extend_from_slice(self.bundle(j));
            scales.extend_from_slice(&self.scales[j * k..(j + 1) * k]);
        }
        Bundled {
            data,
            scales,
            h: ids.len(),
            d: self.d,
            gated: self.gated,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bundling_round_trips_and_checks_shapes() {
        let (h, d) = (5, 3);
        let g: Vec<f32> = (0..h * d).map(|i| i as f32).collect();
        let u: Vec<f32> = (0..h * d).map(|i| -(i as f32)).collect();
        let dn: Vec<f32> = (0..d * h).map(|i| 0.5 * i as f32).collect();
        let w = Bundled::<f32>::from_matrices(Some(&g), &u, &dn, h, d).unwrap();
        let (g2, u2, d2) = w.to_matrices();
        assert_eq!((g2.unwrap(), u2, d2), (g.clone(), u.clone(), dn.clone()));
        assert_eq!(w.bytes_per_neuron(), 3 * d * 4);
        let sub = w.subset(&[4, 1]);
        assert_eq!(sub.part(0, 0).0, &g[12..15]);
        assert_eq!(sub.part(1, 2).0, &[dn[1], dn[6], dn[11]]);
        let err = Bundled::<f32>::from_matrices(Some(&g), &u, &dn[1..], h, d).unwrap_err();
        assert!(
            err.to_string().starts_with("down must have shape (3, 5)"),
            "{err}"
        );
    }
}
