//! The three random projections of FlyHash and how they are generated.
//!
//! - `Sign`: dense ±1 weights, one bit each (bit set = +1), rows padded to whole
//!   64-bit words and stored as little-endian bytes: `m * ceil(d / 64) * 8` bytes.
//! - `Sparse`: each output row connects to `c = round(connectivity * d)` distinct
//!   inputs, stored as `u16` indices plus one sign bit per connection (bit set =
//!   -1; all clear with `binary`, the paper's 0/1 weights). Within a row the +1
//!   connections come first, then the -1 ones, each part in ascending index order.
//! - `Seeded`: the `Sign` projection of the same seed, regenerated word by word
//!   during encode; nothing is stored.
//!
//! Every bit comes from [`super::rng`]: row `r`'s sign word `w` is output `w` of
//! the row's SplitMix64 stream (bits past `d` cleared); a sparse row draws its
//! `c` inputs with Floyd's algorithm (`j` from `d - c` to `d - 1`: draw
//! `t = below(j + 1)`, take `t` unless already taken, else `j`), then one sign
//! bit per chosen input in ascending input order from the following words
//! (bit `b % 64` of word `b / 64`).

use super::plan::Plan;
use super::rng::{row_key, splitmix_at, Stream};

/// Which projection a [`super::FlyHash`] uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Sign,
    Sparse,
    Seeded,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Sign => "sign",
            Kind::Sparse => "sparse",
            Kind::Seeded => "seeded",
        }
    }

    pub fn parse(s: &str) -> Option<Kind> {
        match s {
            "sign" => Some(Kind::Sign),
            "sparse" => Some(Kind::Sparse),
            "seeded" => Some(Kind::Seeded),
            _ => None,
        }
    }
}

/// Bytes per row of a sign projection over `d` inputs (whole 64-bit words).
pub fn sign_row_bytes(d: usize) -> usize {
    d.div_ceil(64) * 8
}

/// Bytes of sign bits per row of a sparse projection with `c` connections.
pub fn sparse_sign_bytes(c: usize) -> usize {
    c.div_ceil(8)
}

/// Inputs per block of the sparse kernel: a block of 16-vector lanes (384 x 64 B
/// = 24 KiB) stays in L1 while every row's connections into it are summed.
/// The block partition is part of the canonical arithmetic (see [`super::kernels`]).
pub const SPARSE_BLOCK: usize = 384;

/// Number of input blocks `B` of a sparse projection over `d` inputs.
pub fn sparse_blocks(d: usize) -> usize {
    d.div_ceil(SPARSE_BLOCK)
}

/// Mask of the valid bits of word `w` of a row over `d` inputs.
#[inline(always)]
pub fn word_mask(d: usize, w: usize) -> u64 {
    let left = d - 64 * w;
    if left >= 64 {
        u64::MAX
    } else {
        (1u64 << left) - 1
    }
}

/// Word `w` of row `r` of the sign projection of `seed` over `d` inputs.
#[inline(always)]
pub fn sign_word(seed: u64, d: usize, r: usize, w: usize) -> u64 {
    splitmix_at(row_key(seed, r), w as u64) & word_mask(d, w)
}

/// The stored data of a projection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Weights {
    /// `m * sign_row_bytes(d)` bytes.
    Sign(Vec<u8>),
    /// The connections in the kernel's order ([`Plan::row_major`] gives the
    /// row-major `m * c` indices); `signs`: `m * sparse_sign_bytes(c)`.
    Sparse {
        c: usize,
        plan: Plan,
        signs: Vec<u8>,
    },
    Seeded,
}

impl Weights {
    /// Bytes held by the projection (what `memory_bytes` reports).
    pub fn bytes(&self) -> usize {
        match self {
            Weights::Sign(b) => b.len(),
            Weights::Sparse { plan, signs, .. } => plan.bytes() + signs.len(),
            Weights::Seeded => 0,
        }
    }
}

/// The sign projection of `seed`: `m` rows over `d` inputs.
pub fn generate_sign(seed: u64, d: usize, m: usize) -> Vec<u8> {
    let rb = sign_row_bytes(d);
    let mut out = vec![0u8; m * rb];
    for (r, row) in out.chunks_exact_mut(rb).enumerate() {
        for (w, dst) in row.chunks_exact_mut(8).enumerate() {
            dst.copy_from_slice(&sign_word(seed, d, r, w).to_le_bytes());
        }
    }
    out
}

/// The sparse projection of `seed`: `m` rows of `c` connections over `d` inputs.
pub fn generate_sparse(seed: u64, d: usize, m: usize, c: usize, binary: bool) -> Weights {
    let sb = sparse_sign_bytes(c);
    let mut indices = vec![0u16; m * c];
    let mut signs = vec![0u8; m * sb];
    let mut npos = vec![0usize; m];
    let mut taken = vec![false; d];
    let mut chosen: Vec<usize> = Vec::with_capacity(c);
    let mut neg: Vec<u16> = Vec::with_capacity(c);
    for r in 0..m {
        let mut s = Stream::for_row(seed, r);
        chosen.clear();
        for j in (d - c)..d {
            let t = s.below(j as u64 + 1) as usize;
            let pick = if taken[t] { j } else { t };
            taken[pick] = true;
            chosen.push(pick);
        }
        chosen.sort_unstable();
        let row = &mut indices[r * c..(r + 1) * c];
        let mut p = 0;
        neg.clear();
        let mut word = 0u64;
        for (b, &i) in chosen.iter().enumerate() {
            taken[i] = false;
            if b % 64 == 0 {
                word = s.next_u64();
            }
            let negative = !binary && (word >> (b % 64)) & 1 == 1;
            if negative {
                neg.push(i as u16);
            } else {
                row[p] = i as u16;
                p += 1;
            }
        }
        row[p..].copy_from_slice(&neg);
        npos[r] = p;
        let sign_row = &mut signs[r * sb..(r + 1) * sb];
        for b in p..c {
            sign_row[b / 8] |= 1 << (b % 8);
        }
    }
    let plan = Plan::new(d, m, c, &indices, &npos);
    Weights::Sparse { c, plan, signs }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sign_rows_are_masked_and_balanced() {
        let (d, m) = (100, 300);
        let bits = generate_sign(7, d, m);
        assert_eq!(bits.len(), m * 16);
        let mut ones = 0u32;
        for row in bits.chunks_exact(16) {
            let hi = u64::from_le_bytes(row[8..16].try_into().unwrap());
            assert_eq!(hi >> 36, 0, "bits past d must be clear");
            ones += row.iter().map(|b| b.count_ones()).sum::<u32>();
        }
        let frac = ones as f64 / (d * m) as f64;
        assert!((frac - 0.5).abs() < 0.02, "{frac}");
        assert_eq!(bits, generate_sign(7, d, m));
        assert_ne!(bits, generate_sign(8, d, m));
    }

    #[test]
    fn sparse_rows_are_distinct_sorted_and_signed() {
        let (d, m, c) = (50, 400, 6);
        let Weights::Sparse { plan, signs, .. } = generate_sparse(3, d, m, c, false) else {
            unreachable!()
        };
        let (indices, npos) = plan.row_major();
        let mut neg_total = 0;
        let mut hits = vec![0u32; d];
        for r in 0..m {
            let row = &indices[r * c..(r + 1) * c];
            let p = npos[r];
            assert!(row[..p].windows(2).all(|w| w[0] < w[1]));
            assert!(row[p..].windows(2).all(|w| w[0] < w[1]));
            let mut all: Vec<u16> = row.to_vec();
            all.sort_unstable();
            all.dedup();
            assert_eq!(all.len(), c);
            for &i in row {
                hits[i as usize] += 1;
            }
            assert_eq!(signs[r].count_ones() as usize, c - p);
            neg_total += c - p;
        }
        let frac = neg_total as f64 / (m * c) as f64;
        assert!((frac - 0.5).abs() < 0.06, "{frac}");
        // Uniform inputs: every input is used about m * c / d = 48 times.
        assert!(hits.iter().all(|&h| (20..90).contains(&h)), "{hits:?}");
        let binary = generate_sparse(3, d, m, c, true);
        let Weights::Sparse { signs, .. } = &binary else {
            unreachable!()
        };
        assert!(signs.iter().all(|&s| s == 0));
    }
}
