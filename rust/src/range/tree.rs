//! The two pruning structures over the blocked keys.
//!
//! - `pca`: keys rotated into their principal basis, ordered by a k-d split
//!   (median of the widest of the first `stages[0]` principal coordinates,
//!   at a multiple of 16) so every block holds nearby keys. A node bounds its
//!   keys by a box over the first principal coordinates plus the largest norm
//!   of the remaining coordinates; each block also keeps, per stage `p`, the
//!   first `p` rotated coordinates and every key's tail norm `|k_rot[p..]|`.
//! - `kmeans`: the original design, hierarchical k-means (k-means++ seeding,
//!   Lloyd iterations), each node a ball of its centroid and exact radius.
//!
//! Both lay leaves out contiguously (depth-first), so a node covers one range
//! of blocks.

use super::basis::Basis;
use super::blocks::{BlockSet, PAD};
use super::kernel::LANES;
use super::quant::Codes;

/// A tree node: children (indices into `Tree::kids`) and the blocks it covers.
#[derive(Debug, Clone)]
pub struct Node {
    pub kids: (u32, u32),
    pub blocks: (u32, u32),
}

/// How a node bounds `q . k` over its keys.
#[derive(Debug, Clone)]
pub enum Bounds {
    /// `lohi[node * 2b ..]`: (lo, hi) per principal coordinate; `tail[node]`:
    /// the largest `|k_rot[b..]|`.
    Box {
        b: usize,
        lohi: Vec<f64>,
        tail: Vec<f64>,
    },
    /// `centre[node * d ..]` and `radius[node]` (exact, rounded up).
    Ball { centre: Vec<f64>, radius: Vec<f64> },
}

/// A built index: blocked keys in tree order and the bounds that prune them.
#[derive(Debug, Clone)]
pub struct Tree {
    pub keys: BlockSet,
    pub nodes: Vec<Node>,
    pub kids: Vec<u32>,
    pub bounds: Bounds,
    /// `pca` only: the basis, the prefix stages, the rotated prefixes
    /// (`rot[b * p_max * 16 + j * 16 + lane]`) and the tail norms
    /// (`tails[b * stages * 16 + s * 16 + lane]`, rounded up).
    pub basis: Option<Basis>,
    pub stages: Vec<usize>,
    pub rot: Vec<f32>,
    pub tails: Vec<f32>,
    /// `quant` / `auto` only: 8-bit codes of the rotated keys, in block order,
    /// and the keys again row-major in the same order (`rows[pos * d + j]`), so
    /// the few survivors of the bound are scored from 4 cache lines each
    /// instead of one line per dimension of the dimension-major blocks.
    pub codes: Option<Codes>,
    pub rows: Vec<f32>,
}

/// Prefix lengths checked in turn by the `pca` method for dimension `d`.
pub fn stages_for(d: usize) -> Vec<usize> {
    let s: Vec<usize> = [8usize, 16, 32].into_iter().filter(|&p| p < d).collect();
    if s.is_empty() {
        vec![(d / 2).max(1).min(d)]
    } else {
        s
    }
}

fn round_up(x: f64) -> f64 {
    // One ulp up, so a stored norm or radius is never below the exact value.
    x * (1.0 + 4.0 * f64::EPSILON) + f64::MIN_POSITIVE
}

/// Builds the `pca` tree over `keys` (n x d, ids 0..n).
pub fn build_pca(keys: &[f32], d: usize, leaf: usize, with_codes: bool) -> Tree {
    let n = keys.len() / d;
    let basis = Basis::fit(keys, d);
    let stages = stages_for(d);
    let p_max = *stages.last().unwrap_or(&d);
    let b = stages[0];
    // Rotated coordinates in f64 (n x d), used for ordering, prefixes and tails.
    let mut rot = vec![0.0f64; n * d];
    let rotate_all = |rot: &mut [f64]| {
        use rayon::prelude::*;
        rot.par_chunks_mut(d)
            .zip(keys.par_chunks(d))
            .for_each(|(r, k)| basis.rotate(k, true, r));
    };
    if crate::threads::install(|| rotate_all(&mut rot)).is_err() {
        for (i, k) in keys.chunks_exact(d).enumerate() {
            basis.rotate(k, true, &mut rot[i * d..(i + 1) * d]);
        }
    }
    let mut perm: Vec<u32> = (0..n as u32).collect();
    let mut nodes = Vec::new();
    let mut kids = Vec::new();
    let leaf = leaf.max(LANES);
    split(&rot, d, b, &mut perm, 0, n, leaf, &mut nodes, &mut kids);
    // Pack blocks in tree order.
    let mut set = BlockSet::new(d);
    for &id in &perm {
        set.push(id, &keys[id as usize * d..(id as usize + 1) * d]);
    }
    let nb = set.blocks();
    let ns = stages.len();
    let mut rot32 = vec![0.0f32; nb * p_max * LANES];
    let mut tails = vec![0.0f32; nb * ns * LANES];
    let mut key_tail_b = vec![0.0f64; n];
    for (pos, &id) in perm.iter().enumerate() {
        let (blk, lane) = (pos / LANES, pos % LANES);
        let r = &rot[id as usize * d..(id as usize + 1) * d];
        for j in 0..p_max {
            rot32[blk * p_max * LANES + j * LANES + lane] = r[j] as f32;
        }
        for (s, &p) in stages.iter().enumerate() {
            let t = round_up(r[p..].iter().map(|x| x * x).sum::<f64>().sqrt());
            tails[blk * ns * LANES + s * LANES + lane] = up32(t);
            if s == 0 {
                key_tail_b[id as usize] = t;
            }
        }
    }
    // Box bounds per node, from the f32 prefixes the kernel reads.
    let mut lohi = vec![0.0f64; nodes.len() * 2 * b];
    let mut tail = vec![0.0f64; nodes.len()];
    for (ni, node) in nodes.iter().enumerate() {
        let (lo_pos, hi_pos) = (
            node.blocks.0 as usize * LANES,
            node.blocks.1 as usize * LANES,
        );
        let mut lo = vec![f64::INFINITY; b];
        let mut hi = vec![f64::NEG_INFINITY; b];
        let mut tmax = 0.0f64;
        for pos in lo_pos..hi_pos.min(n) {
            let (blk, lane) = (pos / LANES, pos % LANES);
            for j in 0..b {
                let v = rot32[blk * p_max * LANES + j * LANES + lane] as f64;
                lo[j] = lo[j].min(v);
                hi[j] = hi[j].max(v);
            }
            tmax = tmax.max(key_tail_b[perm[pos] as usize]);
        }
        for j in 0..b {
            lohi[ni * 2 * b + 2 * j] = lo[j];
            lohi[ni * 2 * b + 2 * j + 1] = hi[j];
        }
        tail[ni] = tmax;
    }
    let codes = with_codes.then(|| {
        let mut by_pos = vec![0.0f64; n * d];
        for (pos, &id) in perm.iter().enumerate() {
            by_pos[pos * d..(pos + 1) * d]
                .copy_from_slice(&rot[id as usize * d..(id as usize + 1) * d]);
        }
        Codes::build(&by_pos, d, nb)
    });
    let rows = if with_codes {
        perm.iter()
            .flat_map(|&id| &keys[id as usize * d..(id as usize + 1) * d])
            .copied()
            .collect()
    } else {
        Vec::new()
    };
    // The quant methods read codes, not prefixes: keep one copy of the data.
    let (rot32, tails) = if with_codes {
        (Vec::new(), Vec::new())
    } else {
        (rot32, tails)
    };
    Tree {
        keys: set,
        nodes,
        kids,
        bounds: Bounds::Box { b, lohi, tail },
        basis: Some(basis),
        stages,
        rot: rot32,
        tails,
        codes,
        rows,
    }
}

/// Smallest f32 not below `x`.
fn up32(x: f64) -> f32 {
    let f = x as f32;
    if (f as f64) < x {
        f.next_up()
    } else {
        f
    }
}

#[allow(clippy::too_many_arguments)]
fn split(
    rot: &[f64],
    d: usize,
    b: usize,
    perm: &mut [u32],
    lo: usize,
    hi: usize,
    leaf: usize,
    nodes: &mut Vec<Node>,
    kids: &mut Vec<u32>,
) -> u32 {
    let me = nodes.len();
    let blocks = ((lo / LANES) as u32, hi.div_ceil(LANES) as u32);
    nodes.push(Node {
        kids: (0, 0),
        blocks,
    });
    let m = hi - lo;
    let half = (m / 2).div_ceil(LANES) * LANES;
    if m <= leaf || half == 0 || half >= m {
        return me as u32;
    }
    // Widest of the first `b` principal coordinates over this node's keys.
    let slice = &mut perm[lo..hi];
    let mut best = (0usize, -1.0f64);
    for j in 0..b {
        let (mut mn, mut mx) = (f64::INFINITY, f64::NEG_INFINITY);
        for &id in slice.iter() {
            let v = rot[id as usize * d + j];
            mn = mn.min(v);
            mx = mx.max(v);
        }
        if mx - mn > best.1 {
            best = (j, mx - mn);
        }
    }
    let j = best.0;
    slice.select_nth_unstable_by(half, |&x, &y| {
        rot[x as usize * d + j]
            .total_cmp(&rot[y as usize * d + j])
            .then(x.cmp(&y))
    });
    let left = split(rot, d, b, perm, lo, lo + half, leaf, nodes, kids);
    let right = split(rot, d, b, perm, lo + half, hi, leaf, nodes, kids);
    let start = kids.len() as u32;
    kids.push(left);
    kids.push(right);
    nodes[me].kids = (start, start + 2);
    me as u32
}

/// SplitMix64: the documented generator behind every seeded choice here
/// (k-means++ seeding); the same seed gives the same tree on every platform.
pub struct SplitMix64(pub u64);

impl SplitMix64 {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1) with 53 random bits.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Builds the hierarchical k-means tree (`branching` children per node).
pub fn build_kmeans(keys: &[f32], d: usize, leaf: usize, branching: usize, seed: u64) -> Tree {
    let n = keys.len() / d;
    let mut rng = SplitMix64(seed);
    let mut set = BlockSet::new(d);
    let mut nodes = Vec::new();
    let mut kids = Vec::new();
    let mut centre = Vec::new();
    let mut radius = Vec::new();
    let ids: Vec<u32> = (0..n as u32).collect();
    let ctx = KmCtx {
        keys,
        d,
        leaf: leaf.max(LANES),
        branching: branching.max(2),
    };
    ctx.node(
        ids,
        &mut rng,
        &mut set,
        &mut nodes,
        &mut kids,
        &mut centre,
        &mut radius,
    );
    Tree {
        keys: set,
        nodes,
        kids,
        bounds: Bounds::Ball { centre, radius },
        basis: None,
        stages: Vec::new(),
        rot: Vec::new(),
        tails: Vec::new(),
        codes: None,
        rows: Vec::new(),
    }
}

struct KmCtx<'a> {
    keys: &'a [f32],
    d: usize,
    leaf: usize,
    branching: usize,
}

impl KmCtx<'_> {
    fn key(&self, id: u32) -> &[f32] {
        &self.keys[id as usize * self.d..(id as usize + 1) * self.d]
    }

    fn dist2(&self, id: u32, c: &[f64]) -> f64 {
        self.key(id)
            .iter()
            .zip(c)
            .map(|(&x, &y)| (x as f64 - y) * (x as f64 - y))
            .sum()
    }

    #[allow(clippy::too_many_arguments)]
    fn node(
        &self,
        ids: Vec<u32>,
        rng: &mut SplitMix64,
        set: &mut BlockSet,
        nodes: &mut Vec<Node>,
        kids: &mut Vec<u32>,
        centre: &mut Vec<f64>,
        radius: &mut Vec<f64>,
    ) -> u32 {
        let d = self.d;
        let me = nodes.len();
        nodes.push(Node {
            kids: (0, 0),
            blocks: (0, 0),
        });
        // Centroid and exact radius of this node's keys.
        let mut c = vec![0.0f64; d];
        for &id in &ids {
            for (cj, &x) in c.iter_mut().zip(self.key(id)) {
                *cj += x as f64;
            }
        }
        c.iter_mut().for_each(|x| *x /= ids.len() as f64);
        let r = ids
            .iter()
            .map(|&id| self.dist2(id, &c))
            .fold(0.0f64, f64::max)
            .sqrt();
        centre.extend_from_slice(&c);
        radius.push(round_up(r));
        let parts = if ids.len() > self.leaf {
            self.kmeans(&ids, rng)
        } else {
            Vec::new()
        };
        if parts.iter().filter(|p| !p.is_empty()).count() < 2 {
            set.align();
            let first = set.blocks() as u32;
            for &id in &ids {
                set.push(id, self.key(id));
            }
            nodes[me].blocks = (first, set.blocks() as u32);
            return me as u32;
        }
        let first_block = set.blocks() as u32;
        let mut mine = Vec::new();
        for part in parts.into_iter().filter(|p| !p.is_empty()) {
            mine.push(self.node(part, rng, set, nodes, kids, centre, radius));
        }
        let start = kids.len() as u32;
        kids.extend_from_slice(&mine);
        nodes[me].kids = (start, kids.len() as u32);
        nodes[me].blocks = (first_block, set.blocks() as u32);
        me as u32
    }

    /// k-means++ seeding and 8 Lloyd iterations; returns the partition.
    fn kmeans(&self, ids: &[u32], rng: &mut SplitMix64) -> Vec<Vec<u32>> {
        let d = self.d;
        let k = self.branching.min(ids.len());
        let mut cents: Vec<Vec<f64>> = Vec::with_capacity(k);
        let first = ids[(rng.next_u64() % ids.len() as u64) as usize];
        cents.push(self.key(first).iter().map(|&x| x as f64).collect());
        let mut best: Vec<f64> = ids.iter().map(|&id| self.dist2(id, &cents[0])).collect();
        while cents.len() < k {
            let total: f64 = best.iter().sum();
            if total <= 0.0 {
                break;
            }
            let mut target = rng.next_f64() * total;
            let mut pick = ids.len() - 1;
            for (i, &w) in best.iter().enumerate() {
                if target < w {
                    pick = i;
                    break;
                }
                target -= w;
            }
            let c: Vec<f64> = self.key(ids[pick]).iter().map(|&x| x as f64).collect();
            for (i, &id) in ids.iter().enumerate() {
                best[i] = best[i].min(self.dist2(id, &c));
            }
            cents.push(c);
        }
        let mut assign = vec![0usize; ids.len()];
        for _ in 0..8 {
            for (i, &id) in ids.iter().enumerate() {
                let mut b = (0usize, f64::INFINITY);
                for (ci, c) in cents.iter().enumerate() {
                    let dd = self.dist2(id, c);
                    if dd < b.1 {
                        b = (ci, dd);
                    }
                }
                assign[i] = b.0;
            }
            let mut sums = vec![vec![0.0f64; d]; cents.len()];
            let mut counts = vec![0usize; cents.len()];
            for (i, &id) in ids.iter().enumerate() {
                counts[assign[i]] += 1;
                for (s, &x) in sums[assign[i]].iter_mut().zip(self.key(id)) {
                    *s += x as f64;
                }
            }
            for (ci, c) in cents.iter_mut().enumerate() {
                if counts[ci] > 0 {
                    for (cj, s) in c.iter_mut().zip(&sums[ci]) {
                        *cj = s / counts[ci] as f64;
                    }
                }
            }
        }
        let mut parts = vec![Vec::new(); cents.len()];
        for (i, &id) in ids.iter().enumerate() {
            parts[assign[i]].push(id);
        }
        parts
    }
}

/// Checks the tree covers every id exactly once (tests and debug builds).
pub fn covers_all(tree: &Tree, n: usize) -> bool {
    let mut seen = vec![false; n];
    for &id in &tree.keys.ids {
        if id != PAD {
            if seen[id as usize] {
                return false;
            }
            seen[id as usize] = true;
        }
    }
    seen.into_iter().all(|s| s)
}
