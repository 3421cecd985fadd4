//! `BinaryIndex`: exact search over packed binary codes (faiss's layout: bit `j`
//! is bit `j % 8` of byte `j / 8`), by Hamming distance or Jaccard distance.
//!
//! Codes are kept contiguous with a stable `i64` id each (by default the
//! insertion counter 0, 1, 2, ...; `remove` never renumbers the others) and
//! their popcounts. Results are ordered by distance, then by insertion order.
//! Search runs queries in parallel blocks; each block scans the codes in
//! L2-sized chunks so a chunk is read from memory once per block of queries
//! (see `super::scan`).

use std::collections::HashSet;

use super::scan::{popcount, scan, Codes};
use super::MAX_BYTES;
use crate::error::{Error, Result};
use crate::simd::Level;

/// Distance used by `BinaryIndex::search`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Metric {
    /// Number of differing bits (an integer).
    Hamming,
    /// `1 - |a & b| / |a | b|` (0 for two all-zero codes).
    Jaccard,
}

/// `k` from which a query collects every candidate and selects, instead of
/// keeping a sorted top-k list.
const SELECT_FROM: usize = 64;

/// A flat index of packed binary codes.
#[derive(Debug, Clone, Default)]
pub struct BinaryIndex {
    nbits: usize,
    nbytes: usize,
    codes: Vec<u8>,
    ones: Vec<u32>,
    ids: Vec<i64>,
    next_id: i64,
}

/// Search results: `nq * k` distances and ids, row-major. Missing neighbours
/// (fewer than `k` codes) have id `-1` and distance `i32::MAX` (Hamming) or
/// `+inf` (Jaccard).
pub struct Hits<D> {
    pub distances: Vec<D>,
    pub ids: Vec<i64>,
}

/// faiss-style range-search results: query `i`'s hits are
/// `distances[lims[i]..lims[i + 1]]` and `ids[..]`, nearest first.
pub struct RangeHits {
    pub lims: Vec<i64>,
    pub distances: Vec<i32>,
    pub ids: Vec<i64>,
}

impl BinaryIndex {
    /// An empty index of `nbits`-bit codes (`ceil(nbits / 8)` bytes each).
    pub fn new(nbits: usize) -> Result<Self> {
        if nbits == 0 || nbits > (1 << 30) {
            return Err(Error::value("nbits", "an integer in [1, 2^30]", nbits));
        }
        Ok(BinaryIndex {
            nbits,
            nbytes: nbits.div_ceil(8),
            ..Default::default()
        })
    }

    pub fn nbits(&self) -> usize {
        self.nbits
    }

    pub fn code_bytes(&self) -> usize {
        self.nbytes
    }

    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// The stored codes (`len * code_bytes`), ids and the next default id.
    pub fn parts(&self) -> (&[u8], &[i64], i64) {
        (&self.codes, &self.ids, self.next_id)
    }

    /// Checks a `(n, code_bytes)` code array: width, and bits past `nbits` clear.
    fn check_codes(&self, arg: &'static str, codes: &[u8], n: usize) -> Result<()> {
        let nb = self.nbytes;
        if codes.len() != n * nb {
            return Err(Error::shape(
                arg,
                format!("(n, {nb}) uint8 for {} bits", self.nbits),
                &[n, codes.len() / n.max(1)],
            ));
        }
        let spare = nb * 8 - self.nbits;
        if spare > 0 {
            let mask = !(0xffu8 >> spare);
            if let Some(i) = codes.chunks_exact(nb).position(|c| c[nb - 1] & mask != 0) {
                return Err(Error::value(
                    arg,
                    format!(
                        "codes of {} bits (the last byte's top {spare} bits clear)",
                        self.nbits
                    ),
                    format!("row {i} with bits set past bit {}", self.nbits),
                ));
            }
        }
        Ok(())
    }

    /// Appends `n` codes; `ids` (non-negative) or the next counter values.
    pub fn add(&mut self, codes: &[u8], n: usize, ids: Option<&[i64]>) -> Result<()> {
        self.check_codes("codes", codes, n)?;
        if (self.codes.len() + codes.len()) as u128 > MAX_BYTES as u128 {
            let found = format!("{n} codes to add to {}", self.len());
            let bytes = (self.codes.len() + codes.len()) as u128;
            return Err(super::too_big("codes", found, "index", bytes));
        }
        // The next automatic id follows the largest id, so an id must leave room
        // for it; everything is checked before anything changes.
        if let Some(ids) = ids {
            crate::validate::same_len("ids", ids.len(), n, "the number of codes")?;
            if let Some(&bad) = ids.iter().find(|&&i| !(0..i64::MAX).contains(&i)) {
                return Err(Error::value(
                    "ids",
                    format!("non-negative integers below {}", i64::MAX),
                    bad,
                ));
            }
        } else if self.next_id.checked_add(n as i64).is_none() {
            return Err(Error::value(
                "ids",
                format!(
                    "given explicitly: {n} automatic ids from {} would pass {}",
                    self.next_id,
                    i64::MAX
                ),
                "None",
            ));
        }
        self.codes.extend_from_slice(codes);
        self.ones
            .extend(codes.chunks_exact(self.nbytes).map(popcount));
        match ids {
            Some(ids) => {
                self.ids.extend_from_slice(ids);
                let top = ids.iter().copied().max().unwrap_or(-1);
                self.next_id = self.next_id.max(top + 1);
            }
            None => {
                self.ids.extend(self.next_id..self.next_id + n as i64);
                self.next_id += n as i64;
            }
        }
        Ok(())
    }

    /// Rebuilds an index from saved parts (validated by the caller).
    pub fn from_parts(nbits: usize, codes: Vec<u8>, ids: Vec<i64>, next_id: i64) -> Result<Self> {
        let mut ix = BinaryIndex::new(nbits)?;
        ix.check_codes("codes", &codes, ids.len())?;
        ix.ones = codes.chunks_exact(ix.nbytes).map(popcount).collect();
        ix.codes = codes;
        ix.ids = ids;
        ix.next_id = next_id;
        Ok(ix)
    }

    /// Removes every code whose id is in `ids`; returns how many were removed.
    pub fn remove(&mut self, ids: &[i64]) -> usize {
        let gone: HashSet<i64> = ids.iter().copied().collect();
        let nb = self.nbytes;
        let mut w = 0;
        for r in 0..self.ids.len() {
            if gone.contains(&self.ids[r]) {
                continue;
            }
            if w != r {
                self.ids[w] = self.ids[r];
                self.ones[w] = self.ones[r];
                self.codes.copy_within(r * nb..(r + 1) * nb, w * nb);
            }
            w += 1;
        }
        let removed = self.ids.len() - w;
        self.ids.truncate(w);
        self.ones.truncate(w);
        self.codes.truncate(w * nb);
        removed
    }

    fn check_search(&self, queries: &[u8], nq: usize, k: usize) -> Result<()> {
        self.check_codes("queries", queries, nq)?;
        if k == 0 {
            return Err(Error::value("k", "a positive integer", 0));
        }
        if nq as u128 * k as u128 * 12 > MAX_BYTES as u128 {
            let found = format!("{k} for {nq} quer{}", if nq == 1 { "y" } else { "ies" });
            return Err(super::too_big(
                "k",
                found,
                "results",
                nq as u128 * k as u128 * 12,
            ));
        }
        Ok(())
    }

    /// The `k` nearest codes of each of `nq` queries by Hamming distance.
    pub fn search_hamming(&self, level: Level, q: &[u8], nq: usize, k: usize) -> Result<Hits<i32>> {
        self.check_search(q, nq, k)?;
        let keys = self.scan(level, Metric::Hamming, q, nq, k)?;
        Ok(self.hits(keys, k, |key| key as i32, i32::MAX))
    }

    /// The `k` nearest codes of each of `nq` queries by Jaccard distance.
    pub fn search_jaccard(&self, level: Level, q: &[u8], nq: usize, k: usize) -> Result<Hits<f32>> {
        self.check_search(q, nq, k)?;
        let keys = self.scan(level, Metric::Jaccard, q, nq, k)?;
        Ok(self.hits(keys, k, f32::from_bits, f32::INFINITY))
    }

    fn hits<D: Copy>(
        &self,
        keys: Vec<Vec<u64>>,
        k: usize,
        dist: impl Fn(u32) -> D,
        none: D,
    ) -> Hits<D> {
        let mut distances = Vec::with_capacity(keys.len() * k);
        let mut ids = Vec::with_capacity(keys.len() * k);
        for row in keys {
            for j in 0..k {
                match row.get(j) {
                    Some(&key) => {
                        distances.push(dist((key >> 32) as u32));
                        ids.push(self.ids[key as u32 as usize]);
                    }
                    None => {
                        distances.push(none);
                        ids.push(-1);
                    }
                }
            }
        }
        Hits { distances, ids }
    }

    /// Every code within Hamming distance `max_distance` (inclusive) of each query.
    pub fn range_search(
        &self,
        level: Level,
        q: &[u8],
        nq: usize,
        max_distance: u32,
    ) -> Result<RangeHits> {
        self.check_search(q, nq, 1)?;
        let keys = self.scan_with(
            level,
            Metric::Hamming,
            q,
            nq,
            |key, acc: &mut Vec<u64>| {
                if (key >> 32) as u32 <= max_distance {
                    acc.push(key);
                }
            },
            |_| max_distance as u64 + 1,
            |acc| acc.sort_unstable(),
        )?;
        let mut lims = Vec::with_capacity(nq + 1);
        lims.push(0i64);
        let total: usize = keys.iter().map(Vec::len).sum();
        let mut distances = Vec::with_capacity(total);
        let mut ids = Vec::with_capacity(total);
        for row in keys {
            for key in row {
                distances.push((key >> 32) as i32);
                ids.push(self.ids[key as u32 as usize]);
            }
            lims.push(distances.len() as i64);
        }
        Ok(RangeHits {
            lims,
            distances,
            ids,
        })
    }

    /// Per query, its best `k` keys `(distance bits << 32) | position`, ascending.
    fn scan(
        &self,
        level: Level,
        metric: Metric,
        q: &[u8],
        nq: usize,
        k: usize,
    ) -> Result<Vec<Vec<u64>>> {
        if k >= SELECT_FROM {
            return self.scan_with(
                level,
                metric,
                q,
                nq,
                |key, acc: &mut Vec<u64>| acc.push(key),
                |_| u64::MAX,
                |acc| {
                    if acc.len() > k {
                        acc.select_nth_unstable(k - 1);
                        acc.truncate(k);
                    }
                    acc.sort_unstable();
                },
            );
        }
        self.scan_with(
            level,
            metric,
            q,
            nq,
            |key, acc: &mut Vec<u64>| {
                // Keys arrive in increasing position, so a tie never displaces an earlier code.
                if acc.len() == k {
                    if key >= acc[k - 1] {
                        return;
                    }
                    acc.pop();
                }
                let at = acc.partition_point(|&x| x < key);
                acc.insert(at, key);
            },
            // A full list takes only distances below its last (a tie comes later).
            |acc| {
                if acc.len() == k {
                    acc[k - 1] >> 32
                } else {
                    u64::MAX
                }
            },
            |_| {},
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn scan_with<F, B, G>(
        &self,
        level: Level,
        metric: Metric,
        q: &[u8],
        nq: usize,
        keep: F,
        bound: B,
        finish: G,
    ) -> Result<Vec<Vec<u64>>>
    where
        F: Fn(u64, &mut Vec<u64>) + Sync,
        B: Fn(&Vec<u64>) -> u64 + Sync,
        G: Fn(&mut Vec<u64>) + Sync,
    {
        let data = Codes {
            codes: &self.codes,
            ones: &self.ones,
            nbytes: self.nbytes,
        };
        scan(level, metric, data, q, nq, keep, bound, finish)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn codes(n: usize, nb: usize, seed: u64) -> Vec<u8> {
        let mut s = super::super::rng::Stream::for_row(seed, 0);
        (0..n * nb).map(|_| s.next_u64() as u8).collect()
    }

    #[test]
    fn search_matches_brute_force_at_every_level() {
        let nb = 20;
        let mut ix = BinaryIndex::new(nb * 8).unwrap();
        let data = codes(300, nb, 1);
        ix.add(&data, 300, None).unwrap();
        let q = codes(5, nb, 2);
        for level in Level::supported() {
            for k in [1, 7, 100, 400] {
                let hits = ix.search_hamming(level, &q, 5, k).unwrap();
                for qi in 0..5 {
                    let mut want: Vec<(u32, i64)> = (0..300)
                        .map(|i| {
                            let d = q[qi * nb..(qi + 1) * nb]
                                .iter()
                                .zip(&data[i * nb..(i + 1) * nb])
                                .map(|(a, b)| (a ^ b).count_ones())
                                .sum();
                            (d, i as i64)
                        })
                        .collect();
                    want.sort();
                    for j in 0..k {
                        let (d, id) = want.get(j).map_or((i32::MAX, -1), |&(d, i)| (d as i32, i));
                        assert_eq!(hits.distances[qi * k + j], d);
                        assert_eq!(hits.ids[qi * k + j], id);
                    }
                }
            }
        }
    }

    #[test]
    fn remove_keeps_ids_stable() {
        let mut ix = BinaryIndex::new(16).unwrap();
        let data = codes(10, 2, 3);
        ix.add(&data, 10, None).unwrap();
        assert_eq!(ix.remove(&[3, 5, 99]), 2);
        assert_eq!(ix.len(), 8);
        let hits = ix
            .search_hamming(Level::Scalar, &data[6 * 2..7 * 2], 1, 1)
            .unwrap();
        assert_eq!((hits.distances[0], hits.ids[0]), (0, 6));
        ix.add(&data[..2], 1, None).unwrap();
        assert_eq!(ix.parts().1.last(), Some(&10));
    }

    #[test]
    fn ids_that_would_overflow_the_next_id_are_refused_unchanged() {
        let mut ix = BinaryIndex::new(8).unwrap();
        let err = ix.add(&[1], 1, Some(&[i64::MAX])).unwrap_err().to_string();
        assert!(
            err.contains("ids must be non-negative integers below 9223372036854775807"),
            "{err}"
        );
        ix.add(&[1], 1, Some(&[i64::MAX - 1])).unwrap();
        // next_id is now i64::MAX: one more automatic id does not fit.
        let err = ix.add(&[2, 3], 2, None).unwrap_err().to_string();
        assert!(
            err.contains("automatic ids from 9223372036854775807"),
            "{err}"
        );
        assert_eq!((ix.len(), ix.parts().1.len()), (1, 1));
        let hits = ix.search_hamming(Level::Scalar, &[1], 1, 3).unwrap();
        assert_eq!(hits.ids, [i64::MAX - 1, -1, -1]);
    }

    #[test]
    fn padding_bits_and_widths_are_checked() {
        let mut ix = BinaryIndex::new(12).unwrap();
        let err = ix.add(&[0xff, 0x10], 1, None).unwrap_err().to_string();
        assert!(err.contains("bits set past bit 12"), "{err}");
        let err = ix.add(&[0xff, 0x0f, 0], 1, None).unwrap_err().to_string();
        assert!(err.contains("must have shape (n, 2)"), "{err}");
    }
}
