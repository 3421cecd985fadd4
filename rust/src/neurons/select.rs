//! Radix selection of the hot set: the cut under which a score no longer
//! makes the top `capacity`, found in O(n) with two 16-bit histogram passes
//! (no sort, no data movement; `select_nth_unstable` would reorder a copy of
//! the keys and costs several passes with data-dependent branches).

/// The hot set is `{j : keys[j] > cut}` plus the first `ties` ids (in id order)
/// with `keys[j] == cut`: at most `cap` neurons, all with a key > 0, the largest
/// keys first. Two 16-bit histogram passes (a radix select) find the cut in
/// O(n) without moving the keys.
pub(crate) fn top_cut(keys: &[u32], cap: usize, t: &mut Vec<[u32; 4]>) -> (u32, usize) {
    let hist = histogram(keys, t, |k| Some(k >> 16));
    // Eligible keys are > 0; bucket 0 of the high half holds the zeros too.
    let zeros = keys.iter().filter(|&&k| k == 0).count();
    let eligible = keys.len() - zeros;
    if cap == 0 {
        return (u32::MAX, 0);
    }
    if eligible <= cap {
        return (0, 0);
    }
    // Find the high bucket holding the cap-th largest key.
    let mut above = 0usize;
    let mut hi = 0usize;
    for b in (0..1 << 16).rev() {
        let c = hist[b] as usize;
        if above + c >= cap {
            hi = b;
            break;
        }
        above += c;
    }
    let hist = histogram(keys, t, |k| {
        ((k >> 16) as usize == hi).then_some(k & 0xffff)
    });
    for lo in (0..1 << 16).rev() {
        let c = hist[lo] as usize;
        if above + c >= cap {
            let cut = ((hi as u32) << 16) | lo as u32;
            return (cut, cap - above);
        }
        above += c;
    }
    (u32::MAX, 0)
}

/// Counts of `bin(k)` over 65536 bins, in four interleaved tables so runs of
/// equal keys (counts are small integers) don't serialise on one counter.
fn histogram(keys: &[u32], t: &mut Vec<[u32; 4]>, bin: impl Fn(u32) -> Option<u32>) -> Vec<u32> {
    t.clear();
    t.resize(1 << 16, [0; 4]);
    let chunks = keys.chunks_exact(4);
    let tail = chunks.remainder();
    for c in chunks {
        for (lane, &k) in c.iter().enumerate() {
            if let Some(b) = bin(k) {
                t[b as usize][lane] += 1;
            }
        }
    }
    for &k in tail {
        if let Some(b) = bin(k) {
            t[b as usize][0] += 1;
        }
    }
    t.iter().map(|x| x.iter().sum()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cut_keeps_the_largest_keys_and_breaks_ties_by_count() {
        let keys = [5u32, 0, 7, 5, 5, 1 << 20, 3];
        let mut t = Vec::new();
        assert_eq!(top_cut(&keys, 2, &mut t), (7, 1)); // 1<<20, then one 7
        assert_eq!(top_cut(&keys, 3, &mut t), (5, 1)); // 1<<20, 7, then one of three 5s
        assert_eq!(top_cut(&keys, 0, &mut t), (u32::MAX, 0));
        assert_eq!(top_cut(&keys, 7, &mut t), (0, 0)); // every eligible key fits
    }
}
