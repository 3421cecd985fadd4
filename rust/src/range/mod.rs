//! Exact halfspace range search over keys: every key with `q . k >= t`.
//!
//! An index holds `n` keys of dimension `d` (f32). For a batch of queries,
//! each with its own threshold, [`RangeIndex::search`] returns every key whose
//! score reaches the threshold and nothing else; [`RangeIndex::topk`] returns
//! the `k` best. Scores are computed by one FMA chain in dimension order
//! ([`kernel`]), identical on every SIMD level, so every method returns the
//! same set and the same scores as a full scan.
//!
//! Methods:
//! - `flat`: SIMD scan of every key.
//! - `quant` (the default, via `auto`): every key's score is bounded from
//!   above by an exact integer dot product of 8-bit codes of the key and query
//!   in the keys' principal basis, with the quantisation error accounted for
//!   ([`quant`]); only keys whose bound reaches the threshold (about 1.5% at a
//!   top-1% threshold on SmolLM2 keys) get their f32 score.
//! - `pca`: keys in their principal basis under a k-d tree; nodes pruned by a
//!   box over the leading principal coordinates plus the tail norm, then
//!   blocks of 16 keys by `q.mu + q_p . k_p + |q_r| |k_r|` at prefixes
//!   p = 8, 16, 32 (see [`tree`]).
//! - `kmeans`: hierarchical k-means with exact radii (ball bound), the
//!   original design; on real keys it prunes almost nothing.
//! - `auto`: `quant`, switching to the flat scan while the measured work of
//!   pruning (bound reads + exact scores) exceeds 90% of a full scan,
//!   re-checking every 16 searches.
//!
//! Appended keys ([`RangeIndex::add`]) are scanned flat until they exceed
//! `rebuild_fraction` of the indexed keys (and at least `rebuild_min`); the
//! index is then rebuilt, so the cost of an append stays amortised O(d log n).

pub mod basis;
pub mod batch;
pub mod blocks;
pub mod kernel;
pub mod quant;
pub mod search;
pub mod tree;

use std::sync::atomic::{AtomicU64, Ordering};

use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::simd::Level;
use crate::validate;
use blocks::BlockSet;
use search::{Hit, Scan, TopK};
use tree::Tree;

/// How an index prunes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Flat,
    Kmeans,
    Pca,
    Quant,
    Auto,
}

impl Method {
    /// Every method, the order tests and benches go through them.
    pub const ALL: [Method; 5] = [
        Method::Flat,
        Method::Pca,
        Method::Kmeans,
        Method::Quant,
        Method::Auto,
    ];

    pub fn parse(s: &str) -> Result<Method> {
        match s {
            "flat" => Ok(Method::Flat),
            "kmeans" => Ok(Method::Kmeans),
            "pca" => Ok(Method::Pca),
            "quant" => Ok(Method::Quant),
            "auto" => Ok(Method::Auto),
            _ => Err(Error::value(
                "method",
                "one of 'auto', 'quant', 'pca', 'kmeans', 'flat'",
                format!("{s:?}"),
            )),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Method::Flat => "flat",
            Method::Kmeans => "kmeans",
            Method::Pca => "pca",
            Method::Quant => "quant",
            Method::Auto => "auto",
        }
    }
}

/// Build and rebuild settings.
#[derive(Debug, Clone)]
pub struct Params {
    /// Keys per tree leaf (rounded up to a multiple of 16).
    pub leaf: usize,
    /// Children per k-means node.
    pub branching: usize,
    /// Rebuild once appended keys exceed this fraction of the indexed keys...
    pub rebuild_fraction: f64,
    /// ...and this count.
    pub rebuild_min: usize,
    /// Seed of the k-means++ seeding (SplitMix64).
    pub seed: u64,
}

impl Default for Params {
    fn default() -> Self {
        Params {
            leaf: 64,
            branching: 8,
            rebuild_fraction: 0.25,
            rebuild_min: 256,
            seed: 0,
        }
    }
}

/// Answers of a range search in faiss's layout: the hits of query `i` are
/// `ids[lims[i]..lims[i + 1]]`, ascending by id.
#[derive(Debug, Clone, Default)]
pub struct RangeResult {
    pub lims: Vec<usize>,
    pub ids: Vec<i64>,
    pub scores: Vec<f32>,
    /// Per query: fraction of keys whose full score was computed.
    pub scanned: Vec<f32>,
    /// Per query: all work (prefix reads + full scores) over a full scan's.
    pub work: Vec<f32>,
}

/// Top-k answers, best first, ties by lower id.
#[derive(Debug, Clone, Default)]
pub struct TopKResult {
    pub k: usize,
    pub ids: Vec<i64>,
    pub scores: Vec<f32>,
    pub scanned: Vec<f32>,
}

/// An exact range-search index over f32 keys.
#[derive(Debug)]
pub struct RangeIndex {
    d: usize,
    method: Method,
    params: Params,
    tree: Option<Tree>,
    /// Keys not in the tree (all of them for `flat`), scanned in full.
    pending: BlockSet,
    /// Largest key norm + mean norm, for the rounding margin.
    knorm: f64,
    n: usize,
    builds: u64,
    /// `auto`: searches so far, and the running mean of the work ratio (x 1e6).
    searches: AtomicU64,
    work_ewma: AtomicU64,
}

/// A copy of the tree and keys as they are (no rebuild: a memcpy, where a
/// rebuild runs the k-means or PCA again); `auto`'s running measure comes along.
/// Beam search forks a cached row into several this way.
impl Clone for RangeIndex {
    fn clone(&self) -> Self {
        RangeIndex {
            d: self.d,
            method: self.method,
            params: self.params.clone(),
            tree: self.tree.clone(),
            pending: self.pending.clone(),
            knorm: self.knorm,
            n: self.n,
            builds: self.builds,
            searches: AtomicU64::new(self.searches.load(Ordering::Relaxed)),
            work_ewma: AtomicU64::new(self.work_ewma.load(Ordering::Relaxed)),
        }
    }
}

impl RangeIndex {
    /// Builds an index over `keys` (`n x d`, row-major, finite, n >= 1).
    pub fn new(keys: &[f32], d: usize, method: Method, params: Params) -> Result<RangeIndex> {
        if d == 0 || !keys.len().is_multiple_of(d) {
            return Err(Error::shape("keys", "(n, d) with d >= 1", &[keys.len(), d]));
        }
        validate::non_empty("keys", &[keys.len() / d, d])?;
        validate::finite("keys", keys)?;
        if !(params.rebuild_fraction > 0.0 && params.rebuild_fraction.is_finite()) {
            return Err(Error::value(
                "rebuild_fraction",
                "a positive number",
                params.rebuild_fraction,
            ));
        }
        if params.leaf == 0 || params.branching < 2 {
            return Err(Error::value(
                "leaf/branching",
                "leaf >= 1 and branching >= 2",
                format!("{}/{}", params.leaf, params.branching),
            ));
        }
        let mut idx = RangeIndex {
            d,
            method,
            params,
            tree: None,
            pending: BlockSet::new(d),
            knorm: 0.0,
            n: 0,
            builds: 0,
            searches: AtomicU64::new(0),
            work_ewma: AtomicU64::new(0),
        };
        idx.rebuild_from(keys);
        Ok(idx)
    }

    fn rebuild_from(&mut self, keys: &[f32]) {
        let d = self.d;
        self.n = keys.len() / d;
        self.knorm = keys
            .chunks_exact(d)
            .map(|k| k.iter().map(|&x| x as f64 * x as f64).sum::<f64>().sqrt())
            .fold(0.0, f64::max);
        self.pending = BlockSet::new(d);
        self.tree = match self.method {
            Method::Flat => None,
            Method::Kmeans => Some(tree::build_kmeans(
                keys,
                d,
                self.params.leaf,
                self.params.branching,
                self.params.seed,
            )),
            Method::Pca => Some(tree::build_pca(keys, d, self.params.leaf, false)),
            Method::Quant | Method::Auto => Some(tree::build_pca(keys, d, self.params.leaf, true)),
        };
        if let Some(b) = self.tree.as_ref().and_then(|t| t.basis.as_ref()) {
            self.knorm += b.mean.iter().map(|x| x * x).sum::<f64>().sqrt();
        }
        if self.tree.is_none() {
            for (i, k) in keys.chunks_exact(d).enumerate() {
                self.pending.push(i as u32, k);
            }
        }
        self.builds += 1;
        self.work_ewma.store(0, Ordering::Relaxed);
    }

    pub fn d(&self) -> usize {
        self.d
    }
    pub fn len(&self) -> usize {
        self.n
    }
    pub fn is_empty(&self) -> bool {
        self.n == 0
    }
    pub fn method(&self) -> Method {
        self.method
    }
    pub fn params(&self) -> &Params {
        &self.params
    }

    /// All keys (`n x d`, by id).
    pub fn keys(&self) -> Vec<f32> {
        let mut out = vec![0.0f32; self.n * self.d];
        if let Some(t) = &self.tree {
            t.keys.scatter(&mut out);
        }
        self.pending.scatter(&mut out);
        out
    }

    /// Appends keys (`m x d`); they get ids `n..n+m`. Rebuilds when the
    /// appended keys pass the rebuild policy.
    pub fn add(&mut self, keys: &[f32]) -> Result<()> {
        let d = self.d;
        if !keys.len().is_multiple_of(d) {
            return Err(Error::shape("keys", format!("(m, {d})"), &[keys.len()]));
        }
        validate::finite("keys", keys)?;
        if keys.is_empty() {
            // Nothing appended: no rebuild either.
            return Ok(());
        }
        if self.n + keys.len() / d >= u32::MAX as usize {
            return Err(Error::value(
                "keys",
                "fewer than 2^32 - 1 keys in total",
                self.n + keys.len() / d,
            ));
        }
        for k in keys.chunks_exact(d) {
            self.knorm = self
                .knorm
                .max(k.iter().map(|&x| x as f64 * x as f64).sum::<f64>().sqrt());
            self.pending.push(self.n as u32, k);
            self.n += 1;
        }
        if let Some(t) = &self.tree {
            let indexed = t.keys.len as f64;
            let p = self.pending.len;
            if p >= self.params.rebuild_min && p as f64 > self.params.rebuild_fraction * indexed {
                let all = self.keys();
                self.rebuild_from(&all);
            }
        }
        Ok(())
    }

    /// Rebuilds the tree over every key now.
    pub fn rebuild(&mut self) {
        let all = self.keys();
        self.rebuild_from(&all);
    }

    fn check_queries(&self, queries: &[f32]) -> Result<usize> {
        let d = self.d;
        if !queries.len().is_multiple_of(d) {
            return Err(Error::shape(
                "queries",
                format!("(nq, {d}) to match the keys"),
                &[queries.len()],
            ));
        }
        validate::finite("queries", queries)?;
        Ok(queries.len() / d)
    }

    /// Whether `auto` should prune on this search.
    fn prune_now(&self) -> bool {
        match self.method {
            Method::Flat => false,
            Method::Pca | Method::Kmeans | Method::Quant => true,
            Method::Auto => {
                let i = self.searches.fetch_add(1, Ordering::Relaxed);
                let w = self.work_ewma.load(Ordering::Relaxed) as f64 / 1e6;
                w < 0.9 || i.is_multiple_of(16)
            }
        }
    }

    fn record(&self, work: f64) {
        if self.method == Method::Auto {
            let old = self.work_ewma.load(Ordering::Relaxed) as f64 / 1e6;
            let new = if old == 0.0 {
                work
            } else {
                0.7 * old + 0.3 * work
            };
            self.work_ewma.store((new * 1e6) as u64, Ordering::Relaxed);
        }
    }

    /// Range search at the process-wide SIMD level.
    pub fn search(&self, queries: &[f32], thresholds: &[f32]) -> Result<RangeResult> {
        self.search_at(crate::simd::level()?, queries, thresholds)
    }

    /// Range search: for each query `i`, every key with score >= `thresholds[i]`.
    pub fn search_at(
        &self,
        level: Level,
        queries: &[f32],
        thresholds: &[f32],
    ) -> Result<RangeResult> {
        level.check()?;
        let nq = self.check_queries(queries)?;
        validate::same_len("thresholds", thresholds.len(), nq, "the number of queries")?;
        validate::finite("thresholds", thresholds)?;
        if nq == 0 {
            // An empty batch: faiss's empty answer (lims = [0]), before
            // `prune_now`, so it does not count as a search for `auto`.
            return Ok(RangeResult {
                lims: vec![0],
                ..Default::default()
            });
        }
        let prune = self.prune_now();
        let d = self.d;
        if let (Some(tree), true) = (&self.tree, prune) {
            if tree.codes.is_some() {
                let per = batch::search(
                    level,
                    tree,
                    &self.pending,
                    self.knorm,
                    queries,
                    thresholds,
                    d,
                )?;
                return Ok(self.collect(per, prune));
            }
        }
        // Work units of about CHUNK keys (subtrees, or block ranges when not
        // pruning), each run for every query while its keys sit in cache;
        // rayon spreads the units over threads.
        let mut units = Vec::new();
        block_units(self.pending.blocks(), Unit::Pending, &mut units);
        let preps: Vec<search::Prepared> = match (&self.tree, prune) {
            (Some(tree), true) => {
                tree_units(tree, 0, &mut units);
                queries
                    .chunks_exact(d)
                    .map(|q| search::prepare(level, Some(tree), q, self.knorm))
                    .collect()
            }
            (Some(tree), false) => {
                block_units(tree.keys.blocks(), Unit::TreeFlat, &mut units);
                Vec::new()
            }
            _ => Vec::new(),
        };
        let per_unit: Vec<Vec<QueryHits>> = crate::threads::install(|| {
            units
                .par_iter()
                .map(|unit| {
                    queries
                        .chunks_exact(d)
                        .zip(thresholds)
                        .enumerate()
                        .map(|(qi, (q, &t))| {
                            let mut hits = Vec::new();
                            let scan = match *unit {
                                Unit::Pending(a, b) => {
                                    search::flat_range(level, &self.pending, a, b, q, t, &mut hits)
                                }
                                Unit::TreeFlat(a, b) => {
                                    let tree = self.tree.as_ref().expect("tree units need a tree");
                                    search::flat_range(level, &tree.keys, a, b, q, t, &mut hits)
                                }
                                Unit::Node(node) => {
                                    let tree = self.tree.as_ref().expect("tree units need a tree");
                                    search::tree_range(level, tree, &preps[qi], node, t, &mut hits)
                                }
                            };
                            (hits, scan)
                        })
                        .collect()
                })
                .collect()
        })?;
        let mut per: Vec<QueryHits> = (0..nq).map(|_| (Vec::new(), Scan::default())).collect();
        for unit in per_unit {
            for (qi, (hits, scan)) in unit.into_iter().enumerate() {
                per[qi].0.extend(hits);
                per[qi].1.exact += scan.exact;
                per[qi].1.prefix += scan.prefix;
            }
        }
        for (hits, _) in &mut per {
            hits.sort_unstable_by_key(|h| h.0);
        }
        Ok(self.collect(per, prune))
    }

    /// Answers in faiss's layout from per-query hits sorted by id; feeds `auto`.
    fn collect(&self, per: Vec<QueryHits>, prune: bool) -> RangeResult {
        let nq = per.len();
        let mut out = RangeResult {
            lims: Vec::with_capacity(nq + 1),
            ..Default::default()
        };
        out.lims.push(0);
        let n = self.n.max(1) as f64;
        let mut work_sum = 0.0;
        let total: usize = per.iter().map(|p| p.0.len()).sum();
        out.ids.reserve(total);
        out.scores.reserve(total);
        for (hits, scan) in per {
            out.ids.extend(hits.iter().map(|h| h.0 as i64));
            out.scores.extend(hits.iter().map(|h| h.1));
            out.lims.push(out.ids.len());
            out.scanned.push((scan.exact as f64 / n) as f32);
            let w = (scan.exact as f64 + scan.prefix) / n;
            work_sum += w;
            out.work.push(w as f32);
        }
        if prune && nq > 0 {
            self.record(work_sum / nq as f64);
        }
        out
    }

    /// Top-k at the process-wide SIMD level.
    pub fn topk(&self, queries: &[f32], k: usize) -> Result<TopKResult> {
        self.topk_at(crate::simd::level()?, queries, k)
    }

    /// The `k` keys of highest score per query, best first (ties: lower id).
    pub fn topk_at(&self, level: Level, queries: &[f32], k: usize) -> Result<TopKResult> {
        level.check()?;
        let nq = self.check_queries(queries)?;
        if k == 0 || k > self.n {
            return Err(Error::value(
                "k",
                format!("between 1 and the number of keys ({})", self.n),
                k,
            ));
        }
        if nq == 0 {
            return Ok(TopKResult {
                k,
                ..Default::default()
            });
        }
        let prune = self.method != Method::Flat;
        let per: Vec<(Vec<Hit>, Scan)> = crate::threads::install(|| {
            queries
                .par_chunks(self.d)
                .map(|q| {
                    let mut top = TopK::new(k);
                    let mut scan = search::flat_topk(
                        level,
                        &self.pending,
                        0,
                        self.pending.blocks(),
                        q,
                        &mut top,
                    );
                    if let Some(tree) = &self.tree {
                        let s = if prune {
                            let p = search::prepare(level, Some(tree), q, self.knorm);
                            search::tree_topk(level, tree, &p, &mut top)
                        } else {
                            search::flat_topk(level, &tree.keys, 0, tree.keys.blocks(), q, &mut top)
                        };
                        scan.exact += s.exact;
                    }
                    (top.into_sorted(), scan)
                })
                .collect()
        })?;
        let mut out = TopKResult {
            k,
            ..Default::default()
        };
        for (hits, scan) in per {
            out.ids.extend(hits.iter().map(|h| h.1 as i64));
            out.scores.extend(hits.iter().map(|h| h.0));
            out.scanned.push((scan.exact as f64 / self.n as f64) as f32);
        }
        debug_assert_eq!(out.ids.len(), nq * k);
        Ok(out)
    }

    /// Counters and sizes, for `stats`.
    pub fn stats(&self) -> Stats {
        let t = self.tree.as_ref();
        Stats {
            n: self.n,
            d: self.d,
            method: self.method.name(),
            indexed: t.map_or(0, |t| t.keys.len),
            pending: self.pending.len,
            nodes: t.map_or(0, |t| t.nodes.len()),
            blocks: t.map_or(0, |t| t.keys.blocks()) + self.pending.blocks(),
            builds: self.builds,
            bytes: t.map_or(0, |t| {
                t.keys.bytes()
                    + t.rot.len() * 4
                    + t.rows.len() * 4
                    + t.tails.len() * 4
                    + t.codes.as_ref().map_or(0, |c| c.bytes())
            }) + self.pending.bytes(),
            stages: t.map_or(Vec::new(), |t| t.stages.clone()),
            explained: t
                .and_then(|t| t.basis.as_ref().map(|b| (b, &t.stages)))
                .map_or(Vec::new(), |(b, st)| {
                    let total: f64 = b.var.iter().sum::<f64>().max(f64::MIN_POSITIVE);
                    st.iter()
                        .map(|&p| b.var[..p].iter().sum::<f64>() / total)
                        .collect()
                }),
            auto_work: self.work_ewma.load(Ordering::Relaxed) as f64 / 1e6,
        }
    }
}

use batch::QueryHits;

/// Keys per work unit: the blocks of a unit (original + rotated prefixes)
/// stay in a core's L2 while every query of a batch runs over them.
const CHUNK_KEYS: usize = 2048;

#[derive(Debug, Clone, Copy)]
enum Unit {
    /// Blocks a..b of the appended keys.
    Pending(usize, usize),
    /// Blocks a..b of the tree's keys, scanned in full.
    TreeFlat(usize, usize),
    /// A subtree.
    Node(usize),
}

fn block_units(nb: usize, make: fn(usize, usize) -> Unit, out: &mut Vec<Unit>) {
    let step = CHUNK_KEYS / kernel::LANES;
    let mut a = 0;
    while a < nb {
        out.push(make(a, (a + step).min(nb)));
        a += step;
    }
}

fn tree_units(tree: &Tree, node: usize, out: &mut Vec<Unit>) {
    let nd = &tree.nodes[node];
    let keys = (nd.blocks.1 - nd.blocks.0) as usize * kernel::LANES;
    if keys <= CHUNK_KEYS || nd.kids.0 == nd.kids.1 {
        out.push(Unit::Node(node));
    } else {
        for k in nd.kids.0..nd.kids.1 {
            tree_units(tree, tree.kids[k as usize] as usize, out);
        }
    }
}

/// What [`RangeIndex::stats`] reports.
#[derive(Debug, Clone)]
pub struct Stats {
    pub n: usize,
    pub d: usize,
    pub method: &'static str,
    pub indexed: usize,
    pub pending: usize,
    pub nodes: usize,
    pub blocks: usize,
    pub builds: u64,
    pub bytes: usize,
    pub stages: Vec<usize>,
    /// Fraction of the keys' variance in the first `stages[i]` principal directions.
    pub explained: Vec<f64>,
    /// `auto`: running mean of the pruning work over a full scan's.
    pub auto_work: f64,
}

#[cfg(test)]
mod tests;
