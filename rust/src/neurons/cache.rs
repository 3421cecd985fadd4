//! `NeuronCache`: which FFN neurons to keep in fast memory.
//!
//! It records which neurons fire on each token (from index lists, boolean
//! masks or a whole `(n, num_neurons)` batch mask in one pass), keeps a hot set
//! of at most `capacity` neurons chosen by a policy, and counts how many
//! activations the hot set served (hits) and how many bytes the rest had to
//! fetch.
//!
//! Policies: `Frequency` (activation counts, optionally exponentially decayed
//! per token), `Window(k)` (neurons active in the last `k` tokens, most recent
//! first, as in "LLM in a flash") and `Static` (chosen once by frequency, or
//! set explicitly, then frozen). Hysteresis inflates the scores of neurons
//! already hot by a factor `1 + hysteresis` (for `Window`, by `hysteresis * k`
//! tokens), so a neuron leaves only when a cold one clearly beats it.
//!
//! Reclassification is O(n): one pass to score, a two-pass 16-bit radix
//! select for the capacity-th largest score (no sort, no data movement), one
//! pass to mark. Ties go to the lower id.

use rayon::prelude::*;

use super::select::top_cut;
use crate::error::{Error, Result};

/// Neurons per parallel block when recording a batch mask.
const BLOCK: usize = 4096;

/// How the hot set is chosen.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Policy {
    /// Most frequently active neurons; `decay` < 1 weighs a token `t` tokens
    /// old by `decay^t`.
    Frequency { decay: Option<f32> },
    /// Neurons active in the last `k` tokens, most recently active first.
    Window { k: u64 },
    /// Chosen once (by frequency at the first reclassify, or by
    /// [`NeuronCache::set_hot`]), then kept.
    Static,
}

/// Settings of a [`NeuronCache`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CacheConfig {
    /// At most this many hot neurons.
    pub capacity: usize,
    /// Size of one neuron's weights, for the byte statistics.
    pub bytes_per_neuron: u64,
    /// The policy.
    pub policy: Policy,
    /// Score advantage of neurons already hot (>= 0).
    pub hysteresis: f32,
    /// Reclassify automatically every this many tokens (0: only when asked).
    pub reclassify_every: u64,
}

/// Counters of a cache (see the field docs).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CacheStats {
    /// Hot neurons now.
    pub num_hot: usize,
    /// Cold neurons now.
    pub num_cold: usize,
    /// Tokens recorded (one per index list / mask row): the seed's `total_activations`.
    pub total_activations: u64,
    /// (token, neuron) activations recorded.
    pub events: u64,
    /// Activations recorded while a hot set existed that it served.
    pub hits: u64,
    /// Activations recorded while a hot set existed that it did not serve.
    pub misses: u64,
    /// `num_hot / num_neurons`.
    pub hot_ratio: f64,
    /// `hits / (hits + misses)`, 0 before any.
    pub hit_rate: f64,
    /// `misses * bytes_per_neuron`: bytes fetched from slow memory (u128: the
    /// product of two u64s is exact, never wrapped or saturated).
    pub bytes_fetched: u128,
    /// `num_hot * bytes_per_neuron`: bytes the hot set occupies (exact, as above).
    pub hot_bytes: u128,
}

/// The full state, for saving and loading.
#[derive(Debug, Clone, PartialEq)]
pub struct CacheState {
    pub counts: Vec<u64>,
    pub scores: Vec<f32>,
    pub last: Vec<u64>,
    pub hot: Vec<u32>,
    /// tokens, events, hits, misses, tokens since the last reclassify.
    pub counters: [u64; 5],
    pub classified: bool,
}

/// Tracks neuron activity and a capacity-bounded hot set.
#[derive(Debug, Clone)]
pub struct NeuronCache {
    n: usize,
    cfg: CacheConfig,
    /// Per-neuron activation counts, saturating at `u32::MAX` (4.3 G tokens).
    counts: Vec<u32>,
    scores: Vec<f32>,
    last: Vec<u64>,
    is_hot: Vec<u8>,
    hot: Vec<u32>,
    tokens: u64,
    events: u64,
    hits: u64,
    misses: u64,
    pending: u64,
    classified: bool,
    /// Reused buffers of `reclassify` (keys, histogram): no page faults per call.
    scratch: Vec<u32>,
    hist: Vec<[u32; 4]>,
}

impl NeuronCache {
    /// A cache of `num_neurons` neurons; fails on a capacity above the layer
    /// size, a decay outside (0, 1], a window of 0 or a negative hysteresis.
    pub fn new(num_neurons: usize, cfg: CacheConfig) -> Result<Self> {
        if num_neurons == 0 || num_neurons > u32::MAX as usize {
            return Err(Error::value("num_neurons", "in [1, 2^32 - 1]", num_neurons));
        }
        if cfg.capacity > num_neurons {
            return Err(Error::value(
                "capacity",
                format!("at most num_neurons = {num_neurons}"),
                cfg.capacity,
            ));
        }
        if !(cfg.hysteresis >= 0.0 && cfg.hysteresis.is_finite()) {
            return Err(Error::value(
                "hysteresis",
                "a finite value >= 0",
                cfg.hysteresis,
            ));
        }
        match cfg.policy {
            Policy::Frequency { decay: Some(g) } if !(g > 0.0 && g <= 1.0) => {
                return Err(Error::value("decay", "in (0, 1]", g));
            }
            Policy::Window { k: 0 } => return Err(Error::value("window", "at least 1 token", 0)),
            _ => {}
        }
        let decays = matches!(cfg.policy, Policy::Frequency { decay: Some(_) });
        let windowed = matches!(cfg.policy, Policy::Window { .. });
        Ok(NeuronCache {
            n: num_neurons,
            cfg,
            counts: vec![0; num_neurons],
            scores: if decays {
                vec![0.0; num_neurons]
            } else {
                Vec::new()
            },
            last: if windowed {
                vec![0; num_neurons]
            } else {
                Vec::new()
            },
            is_hot: vec![0; num_neurons],
            hot: Vec::new(),
            tokens: 0,
            events: 0,
            hits: 0,
            misses: 0,
            pending: 0,
            classified: false,
            scratch: Vec::new(),
            hist: Vec::new(),
        })
    }

    /// Number of neurons.
    pub fn num_neurons(&self) -> usize {
        self.n
    }

    /// The settings.
    pub fn config(&self) -> &CacheConfig {
        &self.cfg
    }

    fn decay(&self) -> Option<f32> {
        match self.cfg.policy {
            Policy::Frequency { decay: Some(g) } if g < 1.0 => Some(g),
            _ => None,
        }
    }

    /// Records one token whose active neurons are `ids`; a repeated id counts
    /// once, as it would in a mask (a neuron fires in a token or not: counted
    /// twice, its frequency could pass 1). Fails, recording nothing, if any id
    /// is outside `[0, num_neurons)`.
    pub fn record_indices(&mut self, ids: &[i64]) -> Result<()> {
        if let Some(&bad) = ids.iter().find(|&&j| j < 0 || j as u64 >= self.n as u64) {
            return Err(Error::Index {
                arg: "active",
                index: bad,
                len: self.n,
            });
        }
        let unique;
        let ids = if ids.windows(2).all(|w| w[0] < w[1]) {
            ids // (ascending ids, as top-k and nonzero give them: no copy)
        } else {
            let mut v = ids.to_vec();
            v.sort_unstable();
            v.dedup();
            unique = v;
            &unique[..]
        };
        if let Some(g) = self.decay() {
            self.scores.iter_mut().for_each(|s| *s *= g);
        }
        let mut hits = 0u64;
        for &j in ids {
            let j = j as usize;
            self.counts[j] = self.counts[j].saturating_add(1);
            hits += u64::from(self.is_hot[j]);
            if !self.scores.is_empty() {
                self.scores[j] += 1.0;
            }
            if !self.last.is_empty() {
                self.last[j] = self.tokens + 1;
            }
        }
        self.account(ids.len() as u64, hits, 1);
        self.tokens += 1;
        self.after_tokens(1);
        Ok(())
    }

    fn account(&mut self, events: u64, hits: u64, _tokens: u64) {
        self.events += events;
        if self.classified {
            self.hits += hits;
            self.misses += events - hits;
        }
    }

    fn after_tokens(&mut self, t: u64) {
        self.pending += t;
        let every = self.cfg.reclassify_every;
        if every > 0 && self.pending >= every {
            self.reclassify();
        }
    }

    /// Records `rows` tokens from a row-major `(rows, num_neurons)` mask
    /// (non-zero = active) in one pass per block of neurons, in parallel.
    pub fn record_batch(&mut self, mask: &[u8], rows: usize) -> Result<()> {
        if mask.len() != rows * self.n {
            return Err(Error::shape(
                "mask",
                format!("(n, {})", self.n),
                &[rows, mask.len() / rows.max(1)],
            ));
        }
        let mut start = 0;
        while start < rows {
            let every = self.cfg.reclassify_every;
            let room = if every > 0 {
                (every - self.pending.min(every)).max(1) as usize
            } else {
                rows
            };
            let end = rows.min(start + room);
            self.record_segment(mask, start, end)?;
            self.after_tokens((end - start) as u64);
            start = end;
        }
        Ok(())
    }

    fn record_segment(&mut self, mask: &[u8], r0: usize, r1: usize) -> Result<()> {
        let n = self.n;
        let t0 = self.tokens;
        let decay = self.decay();
        let windowed = !self.last.is_empty();
        let (counts, is_hot) = (&mut self.counts, &self.is_hot);
        let scores = &mut self.scores;
        let last = &mut self.last;
        let block = |(b, (cnt, hot)): (usize, (&mut [u32], &[u8])),
                     sc: Option<&mut [f32]>,
                     ls: Option<&mut [u64]>| {
            let j0 = b * BLOCK;
            let len = cnt.len();
            let mut local = [0u32; BLOCK];
            let local = &mut local[..len];
            for r in r0..r1 {
                let row = &mask[r * n + j0..r * n + j0 + len];
                for (c, &m) in local.iter_mut().zip(row) {
                    *c += u32::from(m != 0);
                }
            }
            if let (Some(sc), Some(g)) = (sc, decay) {
                for r in r0..r1 {
                    let row = &mask[r * n + j0..r * n + j0 + len];
                    for (s, &m) in sc.iter_mut().zip(row) {
                        *s = *s * g + f32::from(u8::from(m != 0));
                    }
                }
            }
            if let Some(ls) = ls {
                for r in r0..r1 {
                    let t = t0 + (r - r0) as u64 + 1;
                    let row = &mask[r * n + j0..r * n + j0 + len];
                    for (l, &m) in ls.iter_mut().zip(row) {
                        *l = if m != 0 { t } else { *l };
                    }
                }
            }
            let (mut ev, mut hits) = (0u64, 0u64);
            for ((c, l), h) in cnt.iter_mut().zip(local.iter()).zip(hot) {
                *c = c.saturating_add(*l);
                ev += u64::from(*l);
                hits += u64::from(*l) * u64::from(*h);
            }
            (ev, hits)
        };
        let (events, hits) = crate::threads::install(|| {
            let base = counts
                .par_chunks_mut(BLOCK)
                .zip(is_hot.par_chunks(BLOCK))
                .enumerate();
            match (decay.is_some(), windowed) {
                (true, _) => base
                    .zip(scores.par_chunks_mut(BLOCK))
                    .map(|(a, s)| block(a, Some(s), None))
                    .reduce(|| (0, 0), |a, b| (a.0 + b.0, a.1 + b.1)),
                (false, true) => base
                    .zip(last.par_chunks_mut(BLOCK))
                    .map(|(a, l)| block(a, None, Some(l)))
                    .reduce(|| (0, 0), |a, b| (a.0 + b.0, a.1 + b.1)),
                _ => base
                    .map(|a| block(a, None, None))
                    .reduce(|| (0, 0), |a, b| (a.0 + b.0, a.1 + b.1)),
            }
        })?;
        self.account(events, hits, (r1 - r0) as u64);
        self.tokens += (r1 - r0) as u64;
        Ok(())
    }

    /// Writes the scores the hot set is chosen by (0: not eligible),
    /// hysteresis included, into `out`: one tight loop per policy so each
    /// vectorises, over blocks in parallel.
    pub(crate) fn keys_into(&self, out: &mut [u32]) {
        let h = self.cfg.hysteresis;
        let sat = |v: u64| v.min(u32::MAX as u64) as u32;
        let now = self.tokens;
        let fill = |b: usize, o: &mut [u32]| {
            let r = b * BLOCK..b * BLOCK + o.len();
            let hot = &self.is_hot[r.clone()];
            match self.cfg.policy {
                Policy::Window { k } => {
                    let boost = (h as f64 * k as f64) as u64;
                    for ((o, &l), &ht) in o.iter_mut().zip(&self.last[r]).zip(hot) {
                        let live = l != 0 && l + k > now;
                        *o = if live {
                            sat(l + boost * u64::from(ht))
                        } else {
                            0
                        };
                    }
                }
                _ if !self.scores.is_empty() => {
                    // Non-negative floats order like their bit patterns.
                    for ((o, &sc), &ht) in o.iter_mut().zip(&self.scores[r]).zip(hot) {
                        *o = (sc * (1.0 + h * f32::from(ht))).max(0.0).to_bits();
                    }
                }
                _ if h > 0.0 => {
                    for ((o, &c), &ht) in o.iter_mut().zip(&self.counts[r]).zip(hot) {
                        // Through i32, whose conversions vectorise (u32's do not on
                        // the x86-64 baseline); above 2^24 the boost is approximate
                        // and counts saturate at 2^30.
                        let v = c.min(1 << 30) as i32 as f32 * (1.0 + h * f32::from(ht));
                        *o = v.min(2.0e9) as i32 as u32;
                    }
                }
                _ => o.copy_from_slice(&self.counts[r]),
            }
        };
        let par = crate::threads::install(|| {
            out.par_chunks_mut(BLOCK * 16)
                .enumerate()
                .for_each(|(c, o)| {
                    for (i, oo) in o.chunks_mut(BLOCK).enumerate() {
                        fill(c * 16 + i, oo);
                    }
                })
        });
        if par.is_err() {
            for (b, o) in out.chunks_mut(BLOCK).enumerate() {
                fill(b, o);
            }
        }
    }

    /// Re-chooses the hot set (O(n)). A `Static` cache does so only once.
    pub fn reclassify(&mut self) {
        self.pending = 0;
        if self.cfg.policy == Policy::Static && self.classified {
            return;
        }
        let mut keys = std::mem::take(&mut self.scratch);
        keys.resize(self.n, 0);
        self.keys_into(&mut keys);
        let (cut, mut ties) = top_cut(&keys, self.cfg.capacity, &mut self.hist);
        // One branch-free pass marks and compacts (the hot set is a random
        // subset, so branches would mispredict); ties at the cut go to the
        // lowest ids, so the list comes out sorted.
        self.hot.clear();
        self.hot.reserve(self.n);
        let spare = &mut self.hot.spare_capacity_mut()[..self.n];
        let mut len = 0usize;
        for (j, (&k, flag)) in keys.iter().zip(self.is_hot.iter_mut()).enumerate() {
            let tie = usize::from(k == cut) & usize::from(ties > 0);
            ties -= tie;
            let on = usize::from(k > cut) | tie;
            *flag = on as u8;
            // `len <= j < n`: in bounds; slots past the final `len` are never read.
            spare[len].write(j as u32);
            len += on;
        }
        // SAFETY: the first `len` slots were written above (each slot < len got
        // the id that was marked there before `len` moved past it).
        unsafe { self.hot.set_len(len) };
        self.scratch = keys;
        self.classified = true;
    }

    /// Makes `ids` the hot set (any policy; a `Static` cache keeps it).
    pub fn set_hot(&mut self, ids: &[i64]) -> Result<()> {
        if ids.len() > self.cfg.capacity {
            return Err(Error::value(
                "hot",
                format!("at most capacity = {} neurons", self.cfg.capacity),
                ids.len(),
            ));
        }
        let mut flags = vec![0u8; self.n];
        for &j in ids {
            if j < 0 || j as u64 >= self.n as u64 {
                return Err(Error::Index {
                    arg: "hot",
                    index: j,
                    len: self.n,
                });
            }
            if flags[j as usize] != 0 {
                return Err(Error::value(
                    "hot",
                    "distinct neuron ids",
                    format!("{j} repeated"),
                ));
            }
            flags[j as usize] = 1;
        }
        self.hot = (0..self.n as u32)
            .filter(|&j| flags[j as usize] != 0)
            .collect();
        self.is_hot = flags;
        self.classified = true;
        Ok(())
    }

    /// Hot neuron ids, ascending.
    pub fn hot_neurons(&self) -> &[u32] {
        &self.hot
    }

    /// Cold neuron ids, ascending.
    pub fn cold_neurons(&self) -> Vec<u32> {
        (0..self.n as u32)
            .filter(|&j| self.is_hot[j as usize] == 0)
            .collect()
    }

    /// Whether each neuron is hot (0/1).
    pub fn hot_mask(&self) -> &[u8] {
        &self.is_hot
    }

    /// Fraction of recorded tokens in which `neuron` was active.
    pub fn activation_frequency(&self, neuron: i64) -> Result<f64> {
        if neuron < 0 || neuron as u64 >= self.n as u64 {
            return Err(Error::Index {
                arg: "neuron",
                index: neuron,
                len: self.n,
            });
        }
        Ok(if self.tokens == 0 {
            0.0
        } else {
            self.counts[neuron as usize] as f64 / self.tokens as f64
        })
    }

    /// Activation counts of every neuron.
    pub fn counts(&self) -> &[u32] {
        &self.counts
    }

    /// The counters.
    pub fn stats(&self) -> CacheStats {
        let num_hot = self.hot.len();
        let looked = self.hits + self.misses;
        let bpn = self.cfg.bytes_per_neuron;
        CacheStats {
            num_hot,
            num_cold: self.n - num_hot,
            total_activations: self.tokens,
            events: self.events,
            hits: self.hits,
            misses: self.misses,
            hot_ratio: num_hot as f64 / self.n as f64,
            hit_rate: if looked == 0 {
                0.0
            } else {
                self.hits as f64 / looked as f64
            },
            bytes_fetched: self.misses as u128 * bpn as u128,
            hot_bytes: num_hot as u128 * bpn as u128,
        }
    }

    /// Zeroes hits and misses (keeps the recorded activity and the hot set).
    pub fn reset_stats(&mut self) {
        self.hits = 0;
        self.misses = 0;
    }

    /// Forgets everything recorded, and the hot set.
    pub fn clear(&mut self) {
        self.counts.fill(0);
        self.scores.fill(0.0);
        self.last.fill(0);
        self.is_hot.fill(0);
        self.hot.clear();
        (
            self.tokens,
            self.events,
            self.hits,
            self.misses,
            self.pending,
        ) = (0, 0, 0, 0, 0);
        self.classified = false;
    }

    /// The full state (for saving).
    pub fn state(&self) -> CacheState {
        CacheState {
            counts: self.counts.iter().map(|&c| u64::from(c)).collect(),
            scores: self.scores.clone(),
            last: self.last.clone(),
            hot: self.hot.clone(),
            counters: [
                self.tokens,
                self.events,
                self.hits,
                self.misses,
                self.pending,
            ],
            classified: self.classified,
        }
    }

    /// Rebuilds a cache from [`Self::state`]; validates every field.
    pub fn from_state(num_neurons: usize, cfg: CacheConfig, st: CacheState) -> Result<Self> {
        let mut c = NeuronCache::new(num_neurons, cfg)?;
        let bad = |what: &str, detail: String| {
            Error::format(format!("neuron cache state: {what}"), detail)
        };
        if st.counts.len() != num_neurons {
            return Err(bad(
                "counts",
                format!("expected {num_neurons} values, found {}", st.counts.len()),
            ));
        }
        if st.scores.len() != c.scores.len()
            || st.scores.iter().any(|s| !(s.is_finite() && *s >= 0.0))
        {
            return Err(bad(
                "scores",
                format!("expected {} finite values >= 0", c.scores.len()),
            ));
        }
        if st.last.len() != c.last.len() || st.last.iter().any(|&l| l > st.counters[0]) {
            return Err(bad(
                "last",
                format!("expected {} token indices <= tokens", c.last.len()),
            ));
        }
        let [tokens, events, hits, misses, pending] = st.counters;
        // (checked: a tampered file may hold counters that wrap when added)
        let served = hits.checked_add(misses);
        if served.is_none_or(|s| s > events)
            || pending > tokens
            || st
                .counts
                .iter()
                .any(|&k| k > tokens || k > u64::from(u32::MAX))
        {
            return Err(bad(
                "counters",
                "inconsistent (hits + misses > events, or a count > tokens or 2^32 - 1)".into(),
            ));
        }
        let hot: Vec<i64> = st.hot.iter().map(|&j| j as i64).collect();
        c.set_hot(&hot).map_err(|e| bad("hot", e.to_string()))?;
        c.counts = st
            .counts
            .iter()
            .map(|&k| k as u32) // (each checked <= u32::MAX above)
            .collect();
        c.scores = st.scores;
        c.last = st.last;
        (c.tokens, c.events, c.hits, c.misses, c.pending) = (tokens, events, hits, misses, pending);
        c.classified = st.classified;
        Ok(c)
    }
}
