//! Index math of sliding windows over episodes of frames.
//!
//! Frames `0..n` are cut into episodes by `offsets` (`offsets[0] = 0`,
//! non-decreasing, `offsets[e] = n`). A window is `window` consecutive frames
//! that start every `stride` frames inside one episode; with a look-ahead `a`
//! (a target read `a` frames after the window's last frame) a window also needs
//! `a` more frames of its episode. Episode `e` of length `len` therefore holds
//! `(len - span) / stride + 1` windows when `len >= span = window + a`, else 0.
//!
//! Window `i` (0-based, counted episode after episode) is found by a binary
//! search in the cumulative counts: memory is O(episodes), never O(frames) or
//! O(windows), and a lookup costs O(log episodes).

use crate::error::{Error, Result};
use crate::windows::order::WindowIndex;

/// Where every window of a frame sequence starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    offsets: Vec<u64>,
    /// `cum[e]`: windows in episodes `0..e`; `cum.len() == offsets.len()`.
    cum: Vec<u64>,
    window: u64,
    stride: u64,
    lookahead: u64,
}

impl Layout {
    /// Builds the layout from episode `offsets` (`E + 1` boundaries from 0 to
    /// `n_frames`), or of one episode when `offsets` is `None`.
    ///
    /// Fails with [`Error::Value`] when `window` or `stride` is below 1, the
    /// offsets do not run from 0 to `n_frames` without decreasing, or no
    /// episode is long enough for one window.
    pub fn new(
        n_frames: u64,
        offsets: Option<&[u64]>,
        window: u64,
        stride: u64,
        lookahead: u64,
    ) -> Result<Self> {
        if window < 1 {
            return Err(Error::value("window", "a positive integer", window));
        }
        if stride < 1 {
            return Err(Error::value("stride", "a positive integer", stride));
        }
        let offsets = match offsets {
            None => vec![0, n_frames],
            Some(o) => o.to_vec(),
        };
        check_offsets(&offsets, n_frames)?;
        let span = window
            .checked_add(lookahead)
            .ok_or_else(|| Error::value("target_offset", "a small integer", lookahead))?;
        let mut cum = Vec::with_capacity(offsets.len());
        let mut total = 0u64;
        let mut longest = 0u64;
        cum.push(0);
        for pair in offsets.windows(2) {
            let len = pair[1] - pair[0];
            longest = longest.max(len);
            if len >= span {
                total += (len - span) / stride + 1;
            }
            cum.push(total);
        }
        if total == 0 {
            let what = if lookahead > 0 {
                format!("window + target look-ahead ({window} + {lookahead} frames)")
            } else {
                format!("window ({window} frames)")
            };
            return Err(Error::value(
                "window",
                format!("at most the longest episode ({longest} frames)"),
                what,
            ));
        }
        Ok(Layout {
            offsets,
            cum,
            window,
            stride,
            lookahead,
        })
    }

    /// Builds the layout from episode lengths, which must sum to `n_frames`.
    pub fn from_lengths(
        n_frames: u64,
        lengths: &[u64],
        window: u64,
        stride: u64,
        lookahead: u64,
    ) -> Result<Self> {
        let offsets = lengths_to_offsets(lengths, n_frames)?;
        Self::new(n_frames, Some(&offsets), window, stride, lookahead)
    }

    /// Number of windows.
    pub fn len(&self) -> u64 {
        self.cum[self.cum.len() - 1]
    }

    /// Always false: a layout holds at least one window.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn window(&self) -> u64 {
        self.window
    }

    pub fn stride(&self) -> u64 {
        self.stride
    }

    pub fn lookahead(&self) -> u64 {
        self.lookahead
    }

    /// Number of frames the layout covers.
    pub fn n_frames(&self) -> u64 {
        self.offsets[self.offsets.len() - 1]
    }

    /// Episode boundaries, `E + 1` values from 0 to the frame count.
    pub fn offsets(&self) -> &[u64] {
        &self.offsets
    }

    /// Cumulative window counts, `E + 1` values from 0 to [`Layout::len`].
    pub fn cumulative_counts(&self) -> &[u64] {
        &self.cum
    }

    /// Resolves a Python-style index (negative counts from the end) or fails
    /// with [`Error::Index`]; never clamps.
    pub fn resolve(&self, index: i64) -> Result<u64> {
        let len = self.len();
        let i = if index < 0 {
            (len as i128) + index as i128
        } else {
            index as i128
        };
        if i < 0 || i >= len as i128 {
            return Err(Error::Index {
                arg: "window",
                index,
                len: len as usize,
            });
        }
        Ok(i as u64)
    }

    /// Episode holding window `i` (already resolved, `i < len`).
    fn episode_of_resolved(&self, i: u64) -> usize {
        // First e with cum[e] > i, minus one: episodes without windows have
        // cum[e] == cum[e + 1] and are skipped by the search.
        self.cum.partition_point(|&c| c <= i) - 1
    }

    /// First frame of window `index`.
    pub fn start(&self, index: i64) -> Result<u64> {
        let i = self.resolve(index)?;
        let e = self.episode_of_resolved(i);
        Ok(self.offsets[e] + (i - self.cum[e]) * self.stride)
    }

    /// Episode (0-based) that window `index` lies in.
    pub fn episode_of(&self, index: i64) -> Result<usize> {
        Ok(self.episode_of_resolved(self.resolve(index)?))
    }

    /// Maps window indices to their first frames, in place of `out`. Fails on
    /// the first out-of-range index, leaving `out` partly written.
    pub fn starts_of(&self, indices: &[i64], out: &mut [i64]) -> Result<()> {
        crate::validate::same_len("out", out.len(), indices.len(), "indices")?;
        for (o, &i) in out.iter_mut().zip(indices) {
            *o = self.start(i)? as i64;
        }
        Ok(())
    }

    /// Maps resolved window indices (`< len`, e.g. an epoch order) to first
    /// frames, in place.
    pub fn starts_in_place<T: WindowIndex>(&self, indices: &mut [T]) -> Result<()> {
        if self.n_frames().saturating_sub(1) > T::MAX {
            return Err(Error::value(
                "frames",
                format!("at most {} rows for this index type", T::MAX as u128 + 1),
                self.n_frames(),
            ));
        }
        for v in indices.iter_mut() {
            let i = v.to_u64();
            if i >= self.len() {
                return Err(Error::Index {
                    arg: "window",
                    index: i as i64,
                    len: self.len() as usize,
                });
            }
            let e = self.episode_of_resolved(i);
            *v = T::from_u64(self.offsets[e] + (i - self.cum[e]) * self.stride);
        }
        Ok(())
    }

    /// Writes the first frame of every window, in order, episode by episode
    /// (one arithmetic run per episode, no search).
    pub fn all_starts(&self, out: &mut [i64]) -> Result<()> {
        crate::validate::same_len("out", out.len(), self.len() as usize, "the window count")?;
        for e in 0..self.offsets.len() - 1 {
            let (lo, hi) = (self.cum[e] as usize, self.cum[e + 1] as usize);
            let first = self.offsets[e];
            for (k, o) in out[lo..hi].iter_mut().enumerate() {
                *o = (first + k as u64 * self.stride) as i64;
            }
        }
        Ok(())
    }
}

/// Checks episode offsets: at least two values, starting at 0, never
/// decreasing, ending at `n_frames`.
pub fn check_offsets(offsets: &[u64], n_frames: u64) -> Result<()> {
    let expected = format!("offsets from 0 to {n_frames} (the number of frames), never decreasing");
    if offsets.len() < 2 {
        return Err(Error::value(
            "episodes",
            expected,
            format!("{} value(s)", offsets.len()),
        ));
    }
    if offsets[0] != 0 || offsets[offsets.len() - 1] != n_frames {
        return Err(Error::value(
            "episodes",
            expected,
            format!(
                "first {} and last {}",
                offsets[0],
                offsets[offsets.len() - 1]
            ),
        ));
    }
    if let Some(k) = offsets.windows(2).position(|p| p[1] < p[0]) {
        return Err(Error::value(
            "episodes",
            expected,
            format!(
                "{} after {} at position {}",
                offsets[k + 1],
                offsets[k],
                k + 1
            ),
        ));
    }
    Ok(())
}

/// Turns episode lengths into offsets; the lengths must sum to `n_frames`.
pub fn lengths_to_offsets(lengths: &[u64], n_frames: u64) -> Result<Vec<u64>> {
    let mut offsets = Vec::with_capacity(lengths.len() + 1);
    let mut total = 0u64;
    offsets.push(0);
    for &len in lengths {
        total = total.saturating_add(len);
        offsets.push(total);
    }
    if total != n_frames {
        return Err(Error::value(
            "episodes",
            format!("lengths summing to {n_frames} (the number of frames)"),
            format!("a sum of {total}"),
        ));
    }
    Ok(offsets)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Every window by brute force: (episode, first frame).
    fn brute(offsets: &[u64], window: u64, stride: u64, ahead: u64) -> Vec<(usize, u64)> {
        let mut out = vec![];
        for e in 0..offsets.len() - 1 {
            let mut s = offsets[e];
            while s + window + ahead <= offsets[e + 1] {
                out.push((e, s));
                s += stride;
            }
        }
        out
    }

    proptest! {
        #[test]
        fn starts_match_brute_force(
            lens in prop::collection::vec(0u64..40, 1..12),
            window in 1u64..10, stride in 1u64..5, ahead in 0u64..3,
        ) {
            let n: u64 = lens.iter().sum();
            let want = brute(&lengths_to_offsets(&lens, n).unwrap(), window, stride, ahead);
            match Layout::from_lengths(n, &lens, window, stride, ahead) {
                Err(_) => prop_assert!(want.is_empty()),
                Ok(l) => {
                    prop_assert_eq!(l.len() as usize, want.len());
                    let mut all = vec![0i64; want.len()];
                    l.all_starts(&mut all).unwrap();
                    for (i, &(e, s)) in want.iter().enumerate() {
                        prop_assert_eq!(l.start(i as i64).unwrap(), s);
                        prop_assert_eq!(l.episode_of(i as i64).unwrap(), e);
                        prop_assert_eq!(all[i] as u64, s);
                        // No window (nor its target) crosses its episode's end.
                        prop_assert!(s + window + ahead <= l.offsets()[e + 1]);
                    }
                    let len = l.len() as i64;
                    let past_end = matches!(l.start(len), Err(Error::Index { .. }));
                    prop_assert!(past_end);
                    let before = matches!(l.start(-len - 1), Err(Error::Index { .. }));
                    prop_assert!(before);
                    prop_assert_eq!(l.start(-1).unwrap(), want[want.len() - 1].1);
                }
            }
        }
    }

    #[test]
    fn bad_arguments_are_named() {
        let e = Layout::new(10, None, 0, 1, 0).unwrap_err().to_string();
        assert_eq!(e, "window must be a positive integer; got 0");
        let e = Layout::new(10, None, 3, 0, 0).unwrap_err().to_string();
        assert_eq!(e, "stride must be a positive integer; got 0");
        let e = Layout::from_lengths(10, &[3, 4], 2, 1, 0)
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "episodes must be lengths summing to 10 (the number of frames); got a sum of 7"
        );
        let e = Layout::from_lengths(10, &[5, 5], 6, 1, 0)
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "window must be at most the longest episode (5 frames); got window (6 frames)"
        );
        let e = Layout::new(10, Some(&[0, 6, 4, 10]), 2, 1, 0)
            .unwrap_err()
            .to_string();
        assert!(e.ends_with("got 4 after 6 at position 2"), "{e}");
    }

    #[test]
    fn in_place_mapping_rejects_out_of_range() {
        let l = Layout::from_lengths(20, &[10, 10], 4, 2, 0).unwrap();
        assert_eq!(l.len(), 8);
        let mut v = vec![0u64, 3, 4, 7];
        l.starts_in_place(&mut v).unwrap();
        assert_eq!(v, vec![0, 6, 10, 16]);
        let mut narrow = vec![0u32, 3, 4, 7];
        l.starts_in_place(&mut narrow).unwrap();
        assert_eq!(narrow, vec![0, 6, 10, 16]);
        let mut bad = vec![8u64];
        assert!(matches!(
            l.starts_in_place(&mut bad),
            Err(Error::Index { index: 8, .. })
        ));
    }
}
