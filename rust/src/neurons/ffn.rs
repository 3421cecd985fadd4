//! The sparse FFN: dense pre-activations, a selection of active neurons
//! (threshold or top-k), then the up rows and down columns of the active
//! neurons only.
//!
//! For a gated FFN (`down(act(gate x) * up x)`, Llama's SwiGLU) the selection
//! is on `|act(gate x)|`, as in CATS; for an ungated one (`down(act(up x + b))`,
//! BERT) on `|act(up x + b)|`. Masked neurons contribute exactly zero, so the
//! result equals the dense FFN with the same mask applied (up to float
//! reassociation). Rows of a small batch share one pass over the weights: a
//! neuron is fetched once if any row needs it, and each row uses only its own
//! mask.
//!
//! A hot set ([`SparseFfn::set_hot`]) is copied into a separate dense tier;
//! active neurons are read from it when present, else from the backing store,
//! and the counters report hits and the bytes fetched from the backing store.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

pub use super::activation::Activation;
use super::weights::NeuronWeights;
use crate::error::{Error, Result};
use crate::simd::{self, Level};

/// Neurons per parallel work item.
const GRAIN: usize = 32;

/// How many contiguous blocks a call's `tasks` chunks of neurons are summed in:
/// four per thread (a late or slow thread leaves a small share), each summed in
/// neuron order, so an output depends on the thread count only.
fn blocks(tasks: usize) -> Result<usize> {
    Ok((4 * crate::threads::num_threads()?).min(tasks))
}

/// Marks a neuron that is not in the hot tier.
const COLD: u32 = u32::MAX;

/// Which neurons a call computes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Select {
    /// Every neuron (the dense FFN through the same kernel).
    Dense,
    /// Neurons with `|act(pre)| > t`, per row.
    Threshold(f32),
    /// The `k` neurons of largest `|act(pre)|`, per row (ties: lower index).
    TopK(usize),
}

/// Counters accumulated over calls (all neuron counts are per fetched neuron,
/// not per row).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FfnStats {
    /// Calls to `forward`.
    pub calls: u64,
    /// Input rows processed.
    pub rows: u64,
    /// (row, neuron) pairs that were active.
    pub active_pairs: u64,
    /// Neuron fetches served from the hot tier.
    pub hot_fetches: u64,
    /// Neuron fetches served from the backing store.
    pub cold_fetches: u64,
    /// Bytes read from the backing store for up/down (cold fetches times bundle size).
    pub cold_bytes: u64,
}

/// A sparse FFN over weights `W`, with an optional hot tier.
pub struct SparseFfn<W: NeuronWeights> {
    all: W,
    hot: W,
    hot_slot: Vec<u32>,
    hot_ids: Vec<u32>,
    pre_bias: Option<Vec<f32>>,
    down_bias: Option<Vec<f32>>,
    act: Activation,
    counters: [AtomicU64; 6],
}

impl<W: NeuronWeights> SparseFfn<W> {
    /// Wraps bundled weights. `pre_bias` has one value per neuron (added to
    /// the pre-activation), `down_bias` one per output.
    pub fn new(
        all: W,
        act: Activation,
        pre_bias: Option<Vec<f32>>,
        down_bias: Option<Vec<f32>>,
    ) -> Result<Self> {
        let (h, d) = (all.num_neurons(), all.dim());
        if let Some(b) = &pre_bias {
            crate::validate::same_len("up_bias", b.len(), h, "the number of neurons")?;
        }
        if let Some(b) = &down_bias {
            crate::validate::same_len("down_bias", b.len(), d, "the model size")?;
        }
        let hot = all.subset(&[]);
        Ok(SparseFfn {
            all,
            hot,
            hot_slot: vec![COLD; h],
            hot_ids: Vec::new(),
            pre_bias,
            down_bias,
            act,
            counters: Default::default(),
        })
    }

    /// The weights (backing store).
    pub fn weights(&self) -> &W {
        &self.all
    }

    /// The activation.
    pub fn activation(&self) -> Activation {
        self.act
    }

    /// Neurons of the hot tier, ascending.
    pub fn hot_neurons(&self) -> &[u32] {
        &self.hot_ids
    }

    /// Copies the neurons `ids` into the hot tier (replacing the old one).
    /// Fails on an id out of range or repeated.
    pub fn set_hot(&mut self, ids: &[u32]) -> Result<()> {
        let h = self.all.num_neurons();
        let mut sorted = ids.to_vec();
        sorted.sort_unstable();
        for (i, &j) in sorted.iter().enumerate() {
            if j as usize >= h {
                return Err(Error::Index {
                    arg: "hot",
                    index: j as i64,
                    len: h,
                });
            }
            if i > 0 && sorted[i - 1] == j {
                return Err(Error::value(
                    "hot",
                    "distinct neuron ids",
                    format!("{j} repeated"),
                ));
            }
        }
        self.hot = self.all.subset(&sorted);
        self.hot_slot = vec![COLD; h];
        for (slot, &j) in sorted.iter().enumerate() {
            self.hot_slot[j as usize] = slot as u32;
        }
        self.hot_ids = sorted;
        Ok(())
    }

    /// The accumulated counters.
    pub fn stats(&self) -> FfnStats {
        let c: Vec<u64> = self.counters.iter().map(|a| a.load(Relaxed)).collect();
        FfnStats {
            calls: c[0],
            rows: c[1],
            active_pairs: c[2],
            hot_fetches: c[3],
            cold_fetches: c[4],
            cold_bytes: c[5],
        }
    }

    /// Zeroes the counters.
    pub fn reset_stats(&self) {
        for a in &self.counters {
            a.store(0, Relaxed);
        }
    }

    /// `rows` may be 0 (an empty batch): the callers return an empty result
    /// before any kernel, whose neuron-major buffers hold `rows` values a neuron.
    fn check_input(&self, xs: &[f32], rows: usize) -> Result<()> {
        let d = self.all.dim();
        if xs.len() != rows * d {
            return Err(Error::shape(
                "x",
                format!("(n, {d})"),
                &[rows, xs.len() / rows.max(1)],
            ));
        }
        Ok(())
    }

    /// Activations `act(pre)` of every neuron, neuron-major: `out[j * rows + r]`.
    fn activations_nm(&self, level: Level, xs: &[f32], rows: usize) -> Result<Vec<f32>> {
        let h = self.all.num_neurons();
        let mut acts = vec![0.0f32; h * rows];
        crate::threads::team::for_each_chunk(&mut acts, GRAIN * rows, |c, chunk| {
            for (i, out) in chunk.chunks_exact_mut(rows).enumerate() {
                let j = c * GRAIN + i;
                // Pre rows are 1 in 2 or 3 of the bundle: keep the stream going.
                self.all.prefetch(j + 1);
                self.all.pre(level, j, xs, out);
                let b = self.pre_bias.as_ref().map_or(0.0, |b| b[j]);
                for v in out.iter_mut() {
                    *v = self.act.apply(*v + b);
                }
            }
        })?;
        Ok(acts)
    }

    /// `act(pre)` of every neuron for each row of `xs` (`rows x d`), row-major
    /// `(rows, h)`: what calibration and the neuron cache record.
    pub fn activations(&self, xs: &[f32], rows: usize) -> Result<Vec<f32>> {
        self.check_input(xs, rows)?;
        if rows == 0 {
            return Ok(Vec::new());
        }
        let h = self.all.num_neurons();
        let nm = self.activations_nm(simd::level()?, xs, rows)?;
        let mut out = vec![0.0f32; rows * h];
        for j in 0..h {
            for r in 0..rows {
                out[r * h + j] = nm[j * rows + r];
            }
        }
        Ok(out)
    }

    /// Dense or threshold selection in one sweep over the bundles: each
    /// neuron's pre row is read, and its up row and down column right after it
    /// only if some row keeps it, so the memory traffic is one sequential pass.
    fn forward_fused(
        &self,
        level: Level,
        xs: &[f32],
        rows: usize,
        t: Option<f32>,
    ) -> Result<Vec<f32>> {
        let (h, d) = (self.all.num_neurons(), self.all.dim());
        let gated = self.all.gated();
        type State = (Vec<f32>, Vec<f32>, Vec<f32>, [u64; 3]);
        let init = || -> State {
            (
                vec![0.0; rows * d],
                vec![0.0; rows],
                vec![0.0; rows],
                [0; 3],
            )
        };
        let work = |(mut acc, mut a, mut u, mut n): State, c: usize| -> State {
            for j in c * GRAIN..h.min((c + 1) * GRAIN) {
                let slot = self.hot_slot[j];
                let (w, jj) = if slot == COLD {
                    (&self.all, j)
                } else {
                    (&self.hot, slot as usize)
                };
                // Two neurons on, dense calls too: with the table-lookup int4
                // dot the gate rows' loads, not the dot, bound a dense call
                // (Zen 5, 4096x11008 int4: dense 4.8 -> 4.1 ms, 50% 2.8 ->
                // 2.7 ms; f16 and int8 alike either way).
                self.all.prefetch(j + 2);
                w.pre(level, jj, xs, &mut a);
                let b = self.pre_bias.as_ref().map_or(0.0, |b| b[j]);
                let mut kept = 0u64;
                for v in a.iter_mut() {
                    let y = self.act.apply(*v + b);
                    let keep = t.is_none_or(|t| y.abs() > t);
                    *v = if keep { y } else { 0.0 };
                    kept += u64::from(keep);
                }
                if kept == 0 {
                    continue;
                }
                n[0] += kept;
                n[if slot == COLD { 2 } else { 1 }] += 1;
                if gated {
                    w.up(level, jj, xs, &mut u);
                    for (ui, ai) in u.iter_mut().zip(&a) {
                        *ui *= ai;
                    }
                    w.down_axpy(level, jj, &u, &mut acc);
                } else {
                    w.down_axpy(level, jj, &a, &mut acc);
                }
            }
            (acc, a, u, n)
        };
        let tasks = h.div_ceil(GRAIN);
        let mut parts = crate::threads::team::fold(tasks, blocks(tasks)?, init, work)?.into_iter();
        let first = parts.next().unwrap_or_else(init);
        let (mut ys, _, _, n) = parts.fold(first, |mut x, y| {
            for (p, q) in x.0.iter_mut().zip(&y.0) {
                *p += q;
            }
            for k in 0..3 {
                x.3[k] += y.3[k];
            }
            x
        });
        self.finish(&mut ys, rows, n[0], n[1], n[2]);
        Ok(ys)
    }

    /// Adds the output bias and the counters.
    fn finish(&self, ys: &mut [f32], rows: usize, pairs: u64, hot: u64, cold: u64) {
        if let Some(b) = &self.down_bias {
            for y in ys.chunks_exact_mut(self.all.dim()) {
                for (yi, bi) in y.iter_mut().zip(b) {
                    *yi += bi;
                }
            }
        }
        let add = [
            1,
            rows as u64,
            pairs,
            hot,
            cold,
            cold * self.all.bytes_per_neuron() as u64,
        ];
        for (a, v) in self.counters.iter().zip(add) {
            a.fetch_add(v, Relaxed);
        }
    }

    /// The FFN output for `rows` inputs `xs` (`rows x d`, row-major), computing
    /// only the neurons `select` keeps.
    pub fn forward(&self, xs: &[f32], rows: usize, select: Select) -> Result<Vec<f32>> {
        self.check_input(xs, rows)?;
        let (h, d) = (self.all.num_neurons(), self.all.dim());
        match select {
            Select::Threshold(t) if !(t >= 0.0 && t.is_finite()) => {
                return Err(Error::value("threshold", "a finite value >= 0", t));
            }
            Select::TopK(k) if k == 0 || k > h => {
                return Err(Error::value("top_k", format!("in [1, {h}]"), k));
            }
            _ => {}
        }
        if rows == 0 {
            // An empty batch: no work, and the counters stay as they are.
            return Ok(Vec::new());
        }
        let level = simd::level()?;
        match select {
            Select::Dense => return self.forward_fused(level, xs, rows, None),
            Select::Threshold(t) => return self.forward_fused(level, xs, rows, Some(t)),
            Select::TopK(_) => {}
        }
        let mut coef = self.activations_nm(level, xs, rows)?;
        let mut active: Vec<u32> = Vec::with_capacity(h);
        match select {
            Select::Dense => active.extend(0..h as u32),
            Select::Threshold(t) => {
                for (j, c) in coef.chunks_exact_mut(rows).enumerate() {
                    let mut any = false;
                    for v in c.iter_mut() {
                        if v.abs() > t {
                            any = true;
                        } else {
                            *v = 0.0;
                        }
                    }
                    if any {
                        active.push(j as u32);
                    }
                }
            }
            Select::TopK(k) => {
                let mut keep = vec![false; h * rows];
                let mut mags: Vec<(f32, u32)> = Vec::with_capacity(h);
                for r in 0..rows {
                    mags.clear();
                    mags.extend((0..h).map(|j| (coef[j * rows + r].abs(), j as u32)));
                    // Largest magnitude first; ties go to the lower index.
                    mags.select_nth_unstable_by(k - 1, |a, b| {
                        b.0.total_cmp(&a.0).then(a.1.cmp(&b.1))
                    });
                    for &(_, j) in &mags[..k] {
                        keep[j as usize * rows + r] = true;
                    }
                }
                for (j, (c, kp)) in coef
                    .chunks_exact_mut(rows)
                    .zip(keep.chunks_exact(rows))
                    .enumerate()
                {
                    for (v, &on) in c.iter_mut().zip(kp) {
                        if !on {
                            *v = 0.0;
                        }
                    }
                    if kp.iter().any(|&on| on) {
                        active.push(j as u32);
                    }
                }
            }
        }
        let pairs = if select == Select::Dense {
            (h * rows) as u64
        } else {
            coef.iter().filter(|v| **v != 0.0).count() as u64
        };
        let gated = self.all.gated();
        let work = |mut acc: Vec<f32>, chunk: &[u32]| {
            let mut u = vec![0.0f32; rows];
            for &j in chunk {
                let j = j as usize;
                let slot = self.hot_slot[j];
                let (w, jj) = if slot == COLD {
                    (&self.all, j)
                } else {
                    (&self.hot, slot as usize)
                };
                let c = &coef[j * rows..(j + 1) * rows];
                if gated {
                    w.up(level, jj, xs, &mut u);
                    for (ui, ci) in u.iter_mut().zip(c) {
                        *ui *= ci;
                    }
                    w.down_axpy(level, jj, &u, &mut acc);
                } else {
                    w.down_axpy(level, jj, c, &mut acc);
                }
            }
            acc
        };
        let chunks: Vec<&[u32]> = active.chunks(GRAIN).collect();
        let init = || vec![0.0f32; rows * d];
        let parts =
            crate::threads::team::fold(chunks.len(), blocks(chunks.len())?, init, |acc, c| {
                work(acc, chunks[c])
            })?;
        let mut parts = parts.into_iter();
        let first = parts.next().unwrap_or_else(init);
        let mut ys = parts.fold(first, |mut a, b| {
            for (x, y) in a.iter_mut().zip(&b) {
                *x += y;
            }
            a
        });
        let hot = active
            .iter()
            .filter(|&&j| self.hot_slot[j as usize] != COLD)
            .count() as u64;
        self.finish(&mut ys, rows, pairs, hot, active.len() as u64 - hot);
        Ok(ys)
    }
}

#[cfg(test)]
mod tests {
    use super::super::weights::Bundled;
    use super::*;

    fn lcg(seed: &mut u64) -> f32 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((*seed >> 40) as f32 / (1u64 << 24) as f32) - 0.5
    }

    /// Dense reference in f64 with the same mask rule.
    #[allow(clippy::too_many_arguments)]
    fn reference(
        g: Option<&[f32]>,
        u: &[f32],
        dn: &[f32],
        x: &[f32],
        h: usize,
        d: usize,
        act: Activation,
        t: f32,
    ) -> Vec<f64> {
        let mut y = vec![0.0f64; d];
        for j in 0..h {
            let row = |m: &[f32]| {
                (0..d)
                    .map(|i| m[j * d + i] as f64 * x[i] as f64)
                    .sum::<f64>()
            };
            let pre = row(g.unwrap_or(u));
            let a = act.apply(pre as f32) as f64;
            if a.abs() <= t as f64 {
                continue;
            }
            let v = if g.is_some() { a * row(u) } else { a };
            for (i, yi) in y.iter_mut().enumerate() {
                *yi += v * dn[i * h + j] as f64;
            }
        }
        y
    }

    #[test]
    fn matches_masked_reference_with_and_without_hot_tier() {
        let (h, d) = (70, 37);
        let mut s = 7u64;
        let g: Vec<f32> = (0..h * d).map(|_| lcg(&mut s)).collect();
        let u: Vec<f32> = (0..h * d).map(|_| lcg(&mut s)).collect();
        let dn: Vec<f32> = (0..d * h).map(|_| lcg(&mut s)).collect();
        let x: Vec<f32> = (0..d).map(|_| lcg(&mut s)).collect();
        for act in [Activation::Silu, Activation::Gelu, Activation::Relu] {
            for gated in [true, false] {
                let gate = gated.then_some(g.as_slice());
                let w = Bundled::<f32>::from_matrices(gate, &u, &dn, h, d).unwrap();
                let mut ffn = SparseFfn::new(w, act, None, None).unwrap();
                for t in [0.0f32, 0.05, 0.2] {
                    let want = reference(gate, &u, &dn, &x, h, d, act, t);
                    for hot in [vec![], vec![0u32, 5, 69]] {
                        ffn.set_hot(&hot).unwrap();
                        let got = ffn.forward(&x, 1, Select::Threshold(t)).unwrap();
                        for (a, b) in got.iter().zip(&want) {
                            assert!(
                                (*a as f64 - b).abs() < 1e-4,
                                "{act:?} {gated} {t}: {a} vs {b}"
                            );
                        }
                    }
                }
            }
        }
        let w = Bundled::<f32>::from_matrices(Some(&g), &u, &dn, h, d).unwrap();
        let ffn = SparseFfn::new(w, Activation::Silu, None, None).unwrap();
        assert!(ffn.forward(&x[1..], 1, Select::Dense).is_err());
        assert!(ffn.forward(&x, 1, Select::TopK(h + 1)).is_err());
        assert!(ffn.forward(&x, 1, Select::Threshold(f32::NAN)).is_err());
        let all = ffn.forward(&x, 1, Select::TopK(h)).unwrap();
        let dense = ffn.forward(&x, 1, Select::Dense).unwrap();
        for (a, b) in all.iter().zip(&dense) {
            assert!((a - b).abs() < 1e-5);
        }
    }

    #[test]
    fn an_empty_batch_gives_an_empty_output_and_counts_nothing() {
        let (h, d) = (70, 37);
        let mut s = 11u64;
        let g: Vec<f32> = (0..h * d).map(|_| lcg(&mut s)).collect();
        let u: Vec<f32> = (0..h * d).map(|_| lcg(&mut s)).collect();
        let dn: Vec<f32> = (0..d * h).map(|_| lcg(&mut s)).collect();
        let w = Bundled::<f32>::from_matrices(Some(&g), &u, &dn, h, d).unwrap();
        let ffn = SparseFfn::new(w, Activation::Silu, None, Some(vec![1.0; d])).unwrap();
        for select in [Select::Dense, Select::Threshold(0.1), Select::TopK(5)] {
            assert_eq!(ffn.forward(&[], 0, select).unwrap(), Vec::<f32>::new());
        }
        assert_eq!(ffn.activations(&[], 0).unwrap(), Vec::<f32>::new());
        assert_eq!((ffn.stats().calls, ffn.stats().rows), (0, 0));
        // Bad arguments are still refused with no rows.
        assert!(ffn.forward(&[], 0, Select::TopK(0)).is_err());
        assert!(ffn.forward(&[], 0, Select::Threshold(f32::NAN)).is_err());
        assert!(ffn.forward(&[0.0; 3], 0, Select::Dense).is_err());
    }
}
