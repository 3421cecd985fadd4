//! Winner-take-all: the `k` largest activations of one vector.
//!
//! Tie rule: activations are ordered by value, largest first, and equal values
//! by output index, lowest first (`-0.0` and `+0.0` are equal). So among tied
//! activations at the threshold the lowest indices win, at every level.
//!
//! Activations are mapped to `u64` keys whose ascending order is exactly that
//! order (high 32 bits: the float's bits flipped into descending order; low 32
//! bits: the index), and the `k` smallest keys are selected.
//!
//! The two scans that pick indices out of all `m` (the cut bucket's members,
//! then the winners) run as compare + compress, 16 indices per instruction, at
//! the AVX-512 level; integer logic only, so every level picks the same winners.
//!
//! Large vectors first go through a prefilter: a threshold from a sample of
//! the keys (every 16th) that almost surely lets through more than `k` keys
//! but only a few percent of them; the exact selection then runs on those
//! candidates alone. The winners are the same (the selection is exact); when
//! the sample misleads and fewer than `k` pass, the full method runs instead.

use crate::simd::Level;

/// Maps `v` to a `u32` that sorts descending in `v` (ascending key = larger value).
#[inline(always)]
fn descending_bits(v: f32) -> u32 {
    let b = (v + 0.0).to_bits(); // folds -0.0 into +0.0
    let ascending = if b >> 31 == 1 { !b } else { b | 0x8000_0000 };
    !ascending
}

/// Reusable buffers for [`Wta::winners`].
#[derive(Default)]
pub struct Wta {
    hi: Vec<u32>,
    keys: Vec<u64>,
    idx: Vec<u32>,
    sample: Vec<u32>,
}

/// Sample stride of the prefilter, and the smallest `m` it runs at.
const STRIDE: usize = 16;
const PREFILTER_MIN: usize = 4096;

impl Wta {
    /// Writes the indices of the `k` winners of `values`, ascending, to `out`.
    ///
    /// Three passes and no sort: (1) each value's order bits and a histogram of
    /// their top 12 bits, which finds the bucket holding the k-th key; (2) the
    /// keys of that bucket only, where a selection finds the k-th key `t`
    /// exactly; (3) every index whose key is `<= t`, in index order.
    /// `level` must be supported (checked by the caller).
    pub fn winners(&mut self, level: Level, values: &[f32], k: usize, out: &mut [u32]) {
        debug_assert!(k >= 1 && k <= values.len() && out.len() == k);
        let m = values.len();
        if k == m {
            for (i, o) in out.iter_mut().enumerate() {
                *o = i as u32;
            }
            return;
        }
        if self.prefiltered(level, values, k, out) {
            return;
        }
        self.hi.clear();
        self.hi.extend(values.iter().map(|&v| descending_bits(v)));
        let mut hist = [0u32; 4096];
        for &h in &self.hi {
            hist[(h >> 20) as usize] += 1;
        }
        let mut below = 0usize;
        let mut cut = 0u32;
        for (b, &h) in hist.iter().enumerate() {
            if below + h as usize >= k {
                cut = b as u32;
                break;
            }
            below += h as usize;
        }
        // Pass 2: the cut bucket's keys; the k-th key overall is their
        // (k - below)-th.
        self.idx.resize(m + 16, 0);
        let n = pick(level, &self.hi, Pick::Bucket(cut), &mut self.idx);
        self.keys.clear();
        let hi = &self.hi;
        self.keys.extend(
            self.idx[..n]
                .iter()
                .map(|&i| ((hi[i as usize] as u64) << 32) | i as u64),
        );
        let (_, &mut t, _) = self.keys.select_nth_unstable(k - below - 1);
        // Pass 3: every index whose key is <= t, in index order.
        let n = pick(
            level,
            &self.hi,
            Pick::Upto((t >> 32) as u32, t as u32),
            &mut self.idx,
        );
        debug_assert_eq!(n, k);
        out.copy_from_slice(&self.idx[..k]);
    }

    /// The winners from the keys that pass a sampled threshold (see the module
    /// doc); `false`, with `out` unspecified, when the prefilter does not apply
    /// or fewer than `k` keys pass.
    fn prefiltered(&mut self, level: Level, values: &[f32], k: usize, out: &mut [u32]) -> bool {
        let m = values.len();
        let ns = m / STRIDE;
        // About k / STRIDE sampled keys are expected at or above the k-th key;
        // taking the sample's (1.25 k / STRIDE + 8)-th lets through ~1.25 k + 128
        // keys, and fewer than k only with a sample about 3 deviations off.
        let r = k * 5 / (4 * STRIDE) + 8;
        if m < PREFILTER_MIN || 2 * r >= ns {
            return false;
        }
        self.sample.clear();
        self.sample
            .extend((0..ns).map(|j| descending_bits(values[j * STRIDE])));
        let t0 = nth_smallest(level, &mut self.sample, r);
        self.idx.resize(m + 16, 0);
        let n = candidates(level, values, t0, &mut self.idx);
        if n < k {
            return false;
        }
        self.hi.clear();
        let idx = &self.idx[..n];
        self.hi
            .extend(idx.iter().map(|&i| descending_bits(values[i as usize])));
        self.sample.clear();
        self.sample.extend_from_slice(&self.hi);
        let (idx, hi) = (&mut self.idx[..n], &self.hi[..n]);
        // The k-th key `t`: the winners are the keys below it and, among those
        // equal to it, the first `need` in index order (the candidates are).
        let t = nth_smallest(level, &mut self.sample, k - 1);
        let below = count_le(level, hi, t.wrapping_sub(1)) * (t > 0) as usize;
        let mut need = k - below;
        let mut w = 0;
        if count_le(level, hi, t) - below == need {
            // Every key equal to t wins (the usual case: t is unique).
            for j in 0..n {
                idx[w] = idx[j];
                w += (hi[j] <= t) as usize;
            }
        } else {
            for j in 0..n {
                let tie = hi[j] == t && need > 0;
                need -= tie as usize;
                idx[w] = idx[j];
                w += (hi[j] < t || tie) as usize;
            }
        }
        debug_assert_eq!(w, k);
        out.copy_from_slice(&idx[..k]);
        true
    }
}

/// The `r`-th smallest of `keys` (0-based; `r < keys.len()`; `keys` may be
/// reordered). At the AVX-512 level: the smallest `t` with more than `r` keys
/// `<= t`, found bit by bit from the top (32 counting passes, 16 keys per
/// compare, no data-dependent branches); elsewhere a selection.
fn nth_smallest(level: Level, keys: &mut [u32], r: usize) -> u32 {
    debug_assert!(r < keys.len());
    if level != Level::Avx512 {
        return *keys.select_nth_unstable(r).1;
    }
    let mut t = 0u32;
    for b in (0..32).rev() {
        // The answer has bit b clear iff more than r keys are <= t with bits
        // below b set.
        if count_le(level, keys, t | ((1u32 << b) - 1)) <= r {
            t |= 1 << b;
        }
    }
    t
}

/// How many of `keys` are `<= t`.
fn count_le(level: Level, keys: &[u32], t: u32) -> usize {
    #[cfg(target_arch = "x86_64")]
    if level == Level::Avx512 {
        // SAFETY: the caller checked the level (AVX-512 F/BW/VL).
        return unsafe { count_le_avx512(keys, t) };
    }
    let _ = level;
    keys.iter().map(|&h| (h <= t) as usize).sum()
}

/// [`count_le`] compiled for AVX-512 (the same loop, vectorised by LLVM).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn count_le_avx512(keys: &[u32], t: u32) -> usize {
    keys.iter().map(|&h| (h <= t) as u32).sum::<u32>() as usize
}

/// Writes every index `i` whose key `descending_bits(values[i]) <= t`, ascending,
/// to `idx` (`>= values.len() + 16` long); returns how many.
fn candidates(level: Level, values: &[f32], t: u32, idx: &mut [u32]) -> usize {
    let m = values.len();
    assert!(idx.len() >= m + 16 && m < u32::MAX as usize);
    #[cfg(target_arch = "x86_64")]
    if level == Level::Avx512 && std::arch::is_x86_feature_detected!("popcnt") {
        // SAFETY: the caller checked the level (AVX-512 F), POPCNT was just
        // detected; `idx` is long enough (asserted).
        return unsafe { candidates_avx512(values, t, idx) };
    }
    let _ = level;
    // Branch-free compaction: the n-th candidate is written at n <= i.
    let mut n = 0;
    for (i, &v) in values.iter().enumerate() {
        idx[n] = i as u32;
        n += (descending_bits(v) <= t) as usize;
    }
    n
}

#[cfg(target_arch = "x86_64")]
// POPCNT: without it the count of each mask is a dozen shifts and adds.
#[target_feature(enable = "avx512f,popcnt")]
unsafe fn candidates_avx512(values: &[f32], t: u32, idx: &mut [u32]) -> usize {
    use std::arch::x86_64::*;
    let m = values.len();
    let mut at_idx = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    let tv = _mm512_set1_epi32(t as i32);
    let mut n = 0usize;
    for at in (0..m).step_by(16) {
        let live: __mmask16 = if m - at >= 16 {
            0xffff
        } else {
            (1 << (m - at)) - 1
        };
        // SAFETY: the mask enables only values[at .. min(at + 16, m)].
        let v = unsafe { _mm512_maskz_loadu_ps(live, values.as_ptr().add(at)) };
        // descending_bits, 16 at a time: fold -0.0; then `!(b ^ flip)` with
        // `flip` all ones for a negative value, the sign bit for a positive one,
        // i.e. `b ^ (!sign_mask & 0x7fff_ffff)`.
        let b = _mm512_castps_si512(_mm512_add_ps(v, _mm512_setzero_ps()));
        let h = _mm512_xor_si512(
            b,
            _mm512_andnot_si512(_mm512_srai_epi32::<31>(b), _mm512_set1_epi32(i32::MAX)),
        );
        let keep = _mm512_cmple_epu32_mask(h, tv) & live;
        // SAFETY: n <= at, so [n, n + 16) lies inside idx (len >= m + 16).
        unsafe {
            _mm512_storeu_si512(
                idx.as_mut_ptr().add(n) as *mut _,
                _mm512_maskz_compress_epi32(keep, at_idx),
            )
        };
        n += keep.count_ones() as usize;
        at_idx = _mm512_add_epi32(at_idx, _mm512_set1_epi32(16));
    }
    n
}

/// Which indices [`pick`] keeps: order bits whose top 12 bits are the bucket,
/// or keys `(h, i) <= (th, ti)`.
#[derive(Clone, Copy)]
enum Pick {
    Bucket(u32),
    Upto(u32, u32),
}

impl Pick {
    #[inline(always)]
    fn keeps(self, h: u32, i: u32) -> bool {
        match self {
            Pick::Bucket(b) => h >> 20 == b,
            Pick::Upto(th, ti) => h < th || (h == th && i <= ti),
        }
    }
}

/// Writes the indices `i` with `p.keeps(hi[i], i)`, ascending, to `out`
/// (`out.len() >= hi.len() + 16`); returns how many.
fn pick(level: Level, hi: &[u32], p: Pick, out: &mut [u32]) -> usize {
    assert!(out.len() >= hi.len() + 16 && hi.len() < u32::MAX as usize);
    #[cfg(target_arch = "x86_64")]
    if level == Level::Avx512 && std::arch::is_x86_feature_detected!("popcnt") {
        // SAFETY: the caller checked the level (AVX-512 F), POPCNT was just
        // detected; `out` is long enough (asserted).
        return unsafe { pick_avx512(hi, p, out) };
    }
    let _ = level;
    // Branch-free compaction: the n-th kept index is written at n <= i.
    let mut n = 0;
    for (i, &h) in hi.iter().enumerate() {
        out[n] = i as u32;
        n += p.keeps(h, i as u32) as usize;
    }
    n
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,popcnt")]
unsafe fn pick_avx512(hi: &[u32], p: Pick, out: &mut [u32]) -> usize {
    use std::arch::x86_64::*;
    let mask = |h: __m512i, i: __m512i| -> __mmask16 {
        match p {
            Pick::Bucket(b) => {
                _mm512_cmpeq_epi32_mask(_mm512_srli_epi32::<20>(h), _mm512_set1_epi32(b as i32))
            }
            Pick::Upto(th, ti) => {
                let t = _mm512_set1_epi32(th as i32);
                _mm512_cmplt_epu32_mask(h, t)
                    | (_mm512_cmpeq_epi32_mask(h, t)
                        & _mm512_cmple_epu32_mask(i, _mm512_set1_epi32(ti as i32)))
            }
        }
    };
    let m = hi.len();
    let mut idx = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    let mut n = 0usize;
    for at in (0..m).step_by(16) {
        let live: __mmask16 = if m - at >= 16 {
            0xffff
        } else {
            (1 << (m - at)) - 1
        };
        // SAFETY: the mask enables only hi[at .. min(at + 16, m)].
        let h = unsafe { _mm512_maskz_loadu_epi32(live, hi.as_ptr().add(at) as *const _) };
        let keep = mask(h, idx) & live;
        // SAFETY: n <= at, so out[n .. n + 16] lies inside out (len >= m + 16).
        unsafe {
            _mm512_storeu_si512(
                out.as_mut_ptr().add(n) as *mut _,
                _mm512_maskz_compress_epi32(keep, idx),
            )
        };
        n += keep.count_ones() as usize;
        idx = _mm512_add_epi32(idx, _mm512_set1_epi32(16));
    }
    n
}

/// Reference implementation: full sort by the tie rule.
#[cfg(test)]
pub fn winners_by_sorting(values: &[f32], k: usize) -> Vec<u32> {
    let mut idx: Vec<u32> = (0..values.len() as u32).collect();
    idx.sort_by(|&a, &b| {
        let (va, vb) = (values[a as usize] + 0.0, values[b as usize] + 0.0);
        vb.partial_cmp(&va).unwrap().then(a.cmp(&b))
    });
    let mut top = idx[..k].to_vec();
    top.sort_unstable();
    top
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn lowest_index_wins_ties() {
        let mut w = Wta::default();
        let mut out = [0u32; 2];
        for level in Level::supported() {
            w.winners(level, &[1.0, 3.0, 2.0, 3.0, 3.0], 2, &mut out);
            assert_eq!(out, [1, 3]);
            w.winners(level, &[-0.0, 0.0, -1.0, 0.0], 2, &mut out);
            assert_eq!(out, [0, 1]);
        }
    }

    fn noise(n: usize, seed: u64) -> Vec<f32> {
        let mut s = crate::flyhash::rng::Stream::for_row(seed, 0);
        (0..n)
            .map(|_| (s.next_u64() >> 40) as f32 / (1u64 << 20) as f32 - 8.0)
            .collect()
    }

    #[test]
    fn prefilter_and_its_fallback_pick_the_same_winners() {
        let (m, k) = (19_968, 998);
        let mut cases = vec![noise(m, 1)];
        // Coarse values: many ties around the threshold.
        cases.push(noise(m, 2).iter().map(|v| v.round()).collect());
        // Every sampled position high, all others low: the sampled threshold
        // lets too few through and the full method runs.
        cases.push(
            (0..m)
                .map(|i| if i % STRIDE == 0 { 1.0 } else { -(i as f32) })
                .collect(),
        );
        // Few distinct values, -0.0 and 0.0 included.
        cases.push((0..m).map(|i| [-0.0, 0.0, 1.0, -1.0][i % 4]).collect());
        let mut out = vec![0u32; k];
        for values in &cases {
            let want = winners_by_sorting(values, k);
            for level in Level::supported() {
                Wta::default().winners(level, values, k, &mut out);
                assert_eq!(out, want, "{level}");
            }
        }
    }

    proptest! {
        #[test]
        fn matches_full_sort(
            v in prop::collection::vec(prop_oneof![-4i32..4, -100_000i32..100_000], 1..400),
            kf in 0.0f64..1.0,
        ) {
            let values: Vec<f32> = v.iter().map(|&i| i as f32 / 8.0).collect();
            let k = 1 + ((values.len() - 1) as f64 * kf) as usize;
            let mut out = vec![0u32; k];
            let want = winners_by_sorting(&values, k);
            for level in Level::supported() {
                Wta::default().winners(level, &values, k, &mut out);
                prop_assert_eq!(&out, &want, "{}", level);
            }
        }
    }
}
