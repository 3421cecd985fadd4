//! Winner-take-all: the `k` largest activations of one vector.
//!
//! Tie rule: activations are ordered by value, largest first, and equal values
//! by output index, lowest first (`-0.0` and `+0.0` are equal). So among tied
//! activations at the threshold the lowest indices win, at every level.
//!
//! Activations are mapped to `u64` keys whose ascending order is exactly that
//! order (high 32 bits: the float's bits flipped into descending order; low 32
//! bits: the index), and the `k` smallest keys are selected.

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
}

impl Wta {
    /// Writes the indices of the `k` winners of `values`, ascending, to `out`.
    ///
    /// Three passes and no sort: (1) each value's order bits and a histogram of
    /// their top 12 bits, which finds the bucket holding the k-th key; (2) the
    /// keys of that bucket only, where a selection finds the k-th key `t`
    /// exactly; (3) every index whose key is `<= t`, in index order.
    pub fn winners(&mut self, values: &[f32], k: usize, out: &mut [u32]) {
        debug_assert!(k >= 1 && k <= values.len() && out.len() == k);
        let m = values.len();
        if k == m {
            for (i, o) in out.iter_mut().enumerate() {
                *o = i as u32;
            }
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
        self.keys.clear();
        for (i, &h) in self.hi.iter().enumerate() {
            if h >> 20 == cut {
                self.keys.push(((h as u64) << 32) | i as u64);
            }
        }
        // The k-th key overall is the (k - below)-th of the cut bucket.
        let (_, &mut t, _) = self.keys.select_nth_unstable(k - below - 1);
        let (th, ti) = ((t >> 32) as u32, t as u32);
        // Branch-free compaction: the n-th winner is written at n <= i < m.
        self.idx.resize(m, 0);
        let mut n = 0;
        for (i, &h) in self.hi.iter().enumerate() {
            self.idx[n] = i as u32;
            n += (h < th || (h == th && i as u32 <= ti)) as usize;
        }
        debug_assert_eq!(n, k);
        out.copy_from_slice(&self.idx[..k]);
    }
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
        w.winners(&[1.0, 3.0, 2.0, 3.0, 3.0], 2, &mut out);
        assert_eq!(out, [1, 3]);
        w.winners(&[-0.0, 0.0, -1.0, 0.0], 2, &mut out);
        assert_eq!(out, [0, 1]);
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
            Wta::default().winners(&values, k, &mut out);
            prop_assert_eq!(out, winners_by_sorting(&values, k));
        }
    }
}
