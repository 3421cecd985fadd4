//! One query against one tree: halfspace range search and top-k.
//!
//! Exactness argument. A key is reported iff its score `s = fl(q . k)` (the
//! FMA chain of [`super::kernel`]) is `>= t`. A node or key is skipped only
//! when a computed upper bound `ub` satisfies `ub + margin < t`, where
//! `ub >= q . k` holds in exact arithmetic (box or ball over the node, or
//! Cauchy-Schwarz on the principal tail) and `margin` exceeds the rounding of
//! both `s` and `ub`: every error term is at most a few `d * 2^-24 * |q| * K`
//! (`K` = the largest key norm plus the mean's norm); `margin` takes
//! `(8 d + 32) * 2^-23 * |q| * K`, about four times the sum. So a skipped key
//! has `s < t`, and every reported score is the very `s` a full scan computes.

use std::cmp::Ordering;
use std::collections::BinaryHeap;

use super::blocks::{BlockSet, PAD};
use super::kernel::{fma_blocks, score_rows, GROUP, LANES};
use super::quant::{self, QueryCodes};
use super::tree::{Bounds, Tree};
use crate::simd::Level;

/// Work done for one query, in units of keys.
#[derive(Debug, Clone, Copy, Default)]
pub struct Scan {
    /// Keys whose full score was computed.
    pub exact: usize,
    /// Key-dimensions read for bounds (rotated prefixes), divided by `d`.
    pub prefix: f64,
}

/// A query prepared for one tree.
pub struct Prepared {
    pub q: Vec<f32>,
    /// Rotated query prefix (`p_max` dims), f32, for the kernel.
    pub qrot: Vec<f32>,
    /// Rotated query in f64 (all dims), for node bounds.
    pub qrot64: Vec<f64>,
    /// `|q_rot[p..]|` per stage, rounded up.
    pub qtail: Vec<f64>,
    /// `q . mean` (pca) or 0.
    pub qmu: f64,
    pub qnorm: f64,
    pub margin: f64,
    /// `quant`: the query's 8-bit codes, and whether the VNNI kernel runs.
    pub qcodes: Option<QueryCodes>,
    pub vnni: bool,
}

/// Margin over the rounding of scores and bounds (see the module docs).
pub fn margin(d: usize, qnorm: f64, knorm: f64) -> f64 {
    (8.0 * d as f64 + 32.0) * f64::powi(2.0, -23) * qnorm * knorm + f64::MIN_POSITIVE
}

pub fn prepare(level: Level, tree: Option<&Tree>, q: &[f32], knorm: f64) -> Prepared {
    let d = q.len();
    let qnorm = q.iter().map(|&x| x as f64 * x as f64).sum::<f64>().sqrt();
    let mut p = Prepared {
        q: q.to_vec(),
        qrot: Vec::new(),
        qrot64: Vec::new(),
        qtail: Vec::new(),
        qmu: 0.0,
        qnorm,
        margin: margin(d, qnorm, knorm),
        qcodes: None,
        vnni: quant::has_vnni(level),
    };
    if let Some(basis) = tree.and_then(|t| t.basis.as_ref()) {
        let tree = tree.expect("basis implies tree");
        let mut r = vec![0.0f64; d];
        basis.rotate(q, false, &mut r);
        let p_max = *tree.stages.last().unwrap_or(&d);
        p.qrot = r[..p_max.min(d)].iter().map(|&x| x as f32).collect();
        p.qtail = tree
            .stages
            .iter()
            .map(|&s| r[s..].iter().map(|x| x * x).sum::<f64>().sqrt() * (1.0 + 1e-12))
            .collect();
        p.qmu = q.iter().zip(&basis.mean).map(|(&a, &m)| a as f64 * m).sum();
        p.qcodes = tree.codes.as_ref().map(|c| QueryCodes::new(c, &r));
        p.qrot64 = r;
    }
    p
}

/// Upper bound of `q . k` over a node's keys (exact arithmetic, f64).
fn node_bound(tree: &Tree, p: &Prepared, node: usize) -> f64 {
    match &tree.bounds {
        Bounds::Box { b, lohi, tail } => {
            let lh = &lohi[node * 2 * b..(node + 1) * 2 * b];
            let mut ub = p.qmu + p.qtail[0] * tail[node];
            for j in 0..*b {
                let qj = p.qrot64[j];
                ub += (qj * lh[2 * j]).max(qj * lh[2 * j + 1]);
            }
            ub
        }
        Bounds::Ball { centre, radius } => {
            let d = p.q.len();
            let c = &centre[node * d..(node + 1) * d];
            let qc: f64 = p.q.iter().zip(c).map(|(&a, &b)| a as f64 * b).sum();
            qc + p.qnorm * radius[node]
        }
    }
}

/// Exact scores of up to GROUP blocks; emits lanes with score >= t.
fn exact_group(
    level: Level,
    set: &BlockSet,
    blocks: &[usize],
    q: &[f32],
    mut emit: impl FnMut(u32, f32),
    scan: &mut Scan,
) {
    let mut acc = [[0.0f32; LANES]; GROUP];
    let mut refs: [&[f32]; GROUP] = [&[]; GROUP];
    for (r, &b) in refs.iter_mut().zip(blocks) {
        *r = set.block(b);
    }
    fma_blocks(level, q, &refs[..blocks.len()], &mut acc);
    for (g, &b) in blocks.iter().enumerate() {
        for (lane, &id) in set.block_ids(b).iter().enumerate() {
            if id != PAD {
                scan.exact += 1;
                emit(id, acc[g][lane]);
            }
        }
    }
}

/// Every key of a block set with score >= t (the flat scan).
#[allow(clippy::too_many_arguments)]
pub fn flat_range(
    level: Level,
    set: &BlockSet,
    first: usize,
    end: usize,
    q: &[f32],
    t: f32,
    out: &mut Vec<(u32, f32)>,
) -> Scan {
    let mut scan = Scan::default();
    let nb = end;
    let mut b = first;
    let mut g: Vec<usize> = Vec::with_capacity(GROUP);
    while b < nb {
        g.clear();
        g.extend(b..(b + GROUP).min(nb));
        exact_group(
            level,
            set,
            &g,
            q,
            |id, s| {
                if s >= t {
                    out.push((id, s))
                }
            },
            &mut scan,
        );
        b += GROUP;
    }
    scan
}

/// Blocks of a leaf that survive the staged principal-prefix bounds
/// (`thr` = the threshold on the rotated part: `t - q.mu - margin`).
fn prefix_filter(
    level: Level,
    tree: &Tree,
    p: &Prepared,
    blocks: &mut Vec<usize>,
    thr: f32,
    scan: &mut Scan,
) {
    let p_max = *tree.stages.last().unwrap_or(&0);
    let ns = tree.stages.len();
    let w = p_max * LANES;
    let mut acc = [[0.0f32; LANES]; GROUP];
    let mut prev = 0usize;
    for (s, &ps) in tree.stages.iter().enumerate() {
        if blocks.is_empty() {
            return;
        }
        let mut refs: [&[f32]; GROUP] = [&[]; GROUP];
        for (r, &b) in refs.iter_mut().zip(blocks.iter()) {
            *r = &tree.rot[b * w + prev * LANES..(b + 1) * w];
        }
        fma_blocks(level, &p.qrot[prev..ps], &refs[..blocks.len()], &mut acc);
        scan.prefix += (blocks.len() * LANES * (ps - prev)) as f64 / p.q.len() as f64;
        let qt = p.qtail[s] as f32;
        let mut keep = 0;
        for g in 0..blocks.len() {
            let b = blocks[g];
            let tails = &tree.tails[(b * ns + s) * LANES..(b * ns + s + 1) * LANES];
            let alive = (0..LANES).any(|l| acc[g][l] + qt * tails[l] >= thr);
            if alive {
                blocks[keep] = b;
                acc[keep] = acc[g];
                keep += 1;
            }
        }
        blocks.truncate(keep);
        prev = ps;
    }
}

/// Range search of one prepared query in a tree.
pub fn tree_range(
    level: Level,
    tree: &Tree,
    p: &Prepared,
    root: usize,
    t: f32,
    out: &mut Vec<(u32, f32)>,
) -> Scan {
    let mut scan = Scan::default();
    let t64 = t as f64;
    let thr_rot = (t64 - p.qmu - p.margin) as f32;
    let mut stack = vec![root];
    let mut pending: Vec<usize> = Vec::with_capacity(GROUP);
    while let Some(node) = stack.pop() {
        if node_bound(tree, p, node) + p.margin < t64 {
            continue;
        }
        let nd = &tree.nodes[node];
        if nd.kids.0 < nd.kids.1 {
            for k in (nd.kids.0..nd.kids.1).rev() {
                stack.push(tree.kids[k as usize] as usize);
            }
            continue;
        }
        let mut b = nd.blocks.0 as usize;
        while b < nd.blocks.1 as usize {
            pending.clear();
            pending.extend(b..(b + GROUP).min(nd.blocks.1 as usize));
            if tree.basis.is_some() {
                prefix_filter(level, tree, p, &mut pending, thr_rot, &mut scan);
            }
            if !pending.is_empty() {
                exact_group(
                    level,
                    &tree.keys,
                    &pending,
                    &p.q,
                    |id, s| {
                        if s >= t {
                            out.push((id, s))
                        }
                    },
                    &mut scan,
                );
            }
            b += GROUP;
        }
    }
    scan
}

/// Buffers reused across the queries of a work unit.
#[derive(Default)]
pub struct Scratch {
    /// Positions of the keys that survived the bound, and their scores.
    pub survivors: Vec<u32>,
    pub scores: Vec<f32>,
}

/// Lanes of block `b` whose 8-bit upper bound reaches `thr` (on the rotated part).
#[inline]
fn quant_mask(
    level: Level,
    codes: &quant::Codes,
    qc: &QueryCodes,
    vnni: bool,
    b: usize,
    thr: f32,
) -> u32 {
    let (sigma, half, err) = (qc.sigma as f32, (qc.sigma * 0.5) as f32, qc.err as f32);
    let mut ints = [0i32; LANES];
    quant::int_dots(level, vnni, qc, codes.block(b), &mut ints);
    let l1 = &codes.l1[b * LANES..(b + 1) * LANES];
    let mut mask = 0u32;
    for lane in 0..LANES {
        if sigma * ints[lane] as f32 + half * l1[lane] + err >= thr {
            mask |= 1 << lane;
        }
    }
    mask
}

/// The 8-bit bound over blocks `first..end`, then exact scores for the
/// survivors: whole blocks when many lanes survive, gathered lanes otherwise.
/// Range search of one prepared query over blocks `first..end` of a `quant`
/// tree: the 8-bit bound for every key, then exact scores, from the keys'
/// rows, for the few that survive it.
#[allow(clippy::too_many_arguments)]
pub fn quant_range(
    level: Level,
    tree: &Tree,
    p: &Prepared,
    first: usize,
    end: usize,
    t: f32,
    out: &mut Vec<(u32, f32)>,
    scratch: &mut Scratch,
) -> Scan {
    let mut scan = Scan::default();
    let (Some(codes), Some(qc)) = (&tree.codes, &p.qcodes) else {
        return flat_range(level, &tree.keys, first, end, &p.q, t, out);
    };
    let thr_rot = (t as f64 - p.qmu - p.margin) as f32;
    let Scratch { survivors, scores } = scratch;
    survivors.clear();
    quant::survivors(level, p.vnni, qc, codes, first, end, thr_rot, survivors);
    scan.prefix += ((end - first) * LANES) as f64 * 0.25;
    // Padding lanes (only in the last block) carry no key.
    survivors.retain(|&pos| tree.keys.ids[pos as usize] != PAD);
    scores.clear();
    score_rows(level, &p.q, &tree.rows, survivors, scores);
    scan.exact += survivors.len();
    for (&pos, &s) in survivors.iter().zip(scores.iter()) {
        if s >= t {
            out.push((tree.keys.ids[pos as usize], s));
        }
    }
    scan
}

/// A (score, id) pair ordered "better first": higher score, then lower id.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Hit(pub f32, pub u32);

impl Eq for Hit {}
impl Ord for Hit {
    fn cmp(&self, o: &Self) -> Ordering {
        // Reversed so BinaryHeap<Hit> is a min-heap of quality: its top is the worst kept hit.
        o.0.total_cmp(&self.0).then(self.1.cmp(&o.1))
    }
}
impl PartialOrd for Hit {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}

/// The best `k` hits seen so far.
pub struct TopK {
    pub k: usize,
    pub heap: BinaryHeap<Hit>,
}

impl TopK {
    pub fn new(k: usize) -> Self {
        TopK {
            k,
            heap: BinaryHeap::with_capacity(k + 1),
        }
    }
    pub fn offer(&mut self, id: u32, s: f32) {
        let h = Hit(s, id);
        if self.heap.len() < self.k {
            self.heap.push(h);
        } else if let Some(worst) = self.heap.peek() {
            if h < *worst {
                self.heap.pop();
                self.heap.push(h);
            }
        }
    }
    /// Score a candidate must reach to enter (None while not full).
    pub fn bar(&self) -> Option<f32> {
        if self.heap.len() < self.k {
            None
        } else {
            self.heap.peek().map(|h| h.0)
        }
    }
    /// Hits, best first.
    pub fn into_sorted(self) -> Vec<Hit> {
        let mut v = self.heap.into_vec();
        v.sort();
        v
    }
}

/// Offers every key of a block set (the flat top-k).
pub fn flat_topk(
    level: Level,
    set: &BlockSet,
    first: usize,
    end: usize,
    q: &[f32],
    top: &mut TopK,
) -> Scan {
    let mut scan = Scan::default();
    let nb = end;
    let mut b = first;
    let mut g: Vec<usize> = Vec::with_capacity(GROUP);
    while b < nb {
        g.clear();
        g.extend(b..(b + GROUP).min(nb));
        exact_group(level, set, &g, q, |id, s| top.offer(id, s), &mut scan);
        b += GROUP;
    }
    scan
}

#[derive(PartialEq)]
struct Pri(f64, usize);
impl Eq for Pri {}
impl Ord for Pri {
    fn cmp(&self, o: &Self) -> Ordering {
        self.0.total_cmp(&o.0).then(o.1.cmp(&self.1))
    }
}
impl PartialOrd for Pri {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}

/// Best-first top-k: nodes are opened by decreasing upper bound and the
/// search stops when the best remaining bound cannot reach the k-th score.
pub fn tree_topk(level: Level, tree: &Tree, p: &Prepared, top: &mut TopK) -> Scan {
    let mut scan = Scan::default();
    let mut queue = BinaryHeap::new();
    queue.push(Pri(node_bound(tree, p, 0), 0));
    let mut pending: Vec<usize> = Vec::with_capacity(GROUP);
    while let Some(Pri(ub, node)) = queue.pop() {
        if let Some(bar) = top.bar() {
            if ub + p.margin < bar as f64 {
                break;
            }
        }
        let nd = &tree.nodes[node];
        if nd.kids.0 < nd.kids.1 {
            for k in nd.kids.0..nd.kids.1 {
                let c = tree.kids[k as usize] as usize;
                queue.push(Pri(node_bound(tree, p, c), c));
            }
            continue;
        }
        let mut b = nd.blocks.0 as usize;
        while b < nd.blocks.1 as usize {
            pending.clear();
            pending.extend(b..(b + GROUP).min(nd.blocks.1 as usize));
            if let (Some(bar), true) = (top.bar(), tree.basis.is_some()) {
                let thr = (bar as f64 - p.qmu - p.margin) as f32;
                if let (Some(codes), Some(qc)) = (&tree.codes, &p.qcodes) {
                    pending.retain(|&b| quant_mask(level, codes, qc, p.vnni, b, thr) != 0);
                    scan.prefix += (pending.len() * LANES) as f64 * 0.25;
                } else {
                    prefix_filter(level, tree, p, &mut pending, thr, &mut scan);
                }
            }
            if !pending.is_empty() {
                exact_group(
                    level,
                    &tree.keys,
                    &pending,
                    &p.q,
                    |id, s| top.offer(id, s),
                    &mut scan,
                );
            }
            b += GROUP;
        }
    }
    scan
}
