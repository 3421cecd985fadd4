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

/// Reusable buffer for [`winners`].
#[derive(Default)]
pub struct Wta {
    keys: Vec<u64>,
}

impl Wta {
    /// Writes the indices of the `k` winners of `values`, ascending, to `out`.
    pub fn winners(&mut self, values: &[f32], k: usize, out: &mut [u32]) {
        debug_assert!(k >= 1 && k <= values.len() && out.len() == k);
        let m = values.len();
        self.keys.clear();
        if k == m {
            for (i, o) in out.iter_mut().enumerate() {
                *o = i as u32;
            }
            return;
        }
        // Pre-filter: a histogram of the top 12 key bits finds the bucket that
        // holds the k-th key; only keys up to that bucket are selected from.
        let mut hist = [0u32; 4096];
        for &v in values {
            hist[(descending_bits(v) >> 20) as usize] += 1;
        }
        let mut seen = 0usize;
        let mut cut = 0u32;
        for (b, &h) in hist.iter().enumerate() {
            seen += h as usize;
            if seen >= k {
                cut = b as u32;
                break;
            }
        }
        for (i, &v) in values.iter().enumerate() {
            let hi = descending_bits(v);
            if hi >> 20 <= cut {
                self.keys.push(((hi as u64) << 32) | i as u64);
            }
        }
        let keys = &mut self.keys;
        if keys.len() > k {
            keys.select_nth_unstable(k - 1);
        }
        for (o, key) in out.iter_mut().zip(keys.iter()) {
            *o = *key as u32;
        }
        out.sort_unstable();
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
