//! The documented, counter-based generator behind every FlyHash projection.
//!
//! SplitMix64 (Steele, Lea, Flood 2014; the seeding generator of
//! `java.util.SplittableRandom` and of xoshiro): a 64-bit state advanced by
//! the golden-ratio constant `0x9E3779B97F4A7C15` and passed through the
//! `mix64` finaliser. Output `i` (0-based) of a stream started at state `s` is
//! `mix64(s + (i + 1) * 0x9E3779B97F4A7C15)` (wrapping), so any word is
//! computed directly from `(state, i)`: no sequential state, no floating point,
//! only 64-bit integer arithmetic, and therefore the same bits on every OS,
//! CPU level and device.
//!
//! FlyHash derives one key per output row, `row_key(seed, r)` = output `r` of
//! the stream started at `seed`; row `r`'s random words are the outputs of the
//! stream started at `row_key(seed, r)`. Rows can thus be regenerated in any
//! order and in parallel (the `seeded` projection stores nothing).

/// Weyl increment of SplitMix64 (2^64 / golden ratio, odd).
pub const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

/// The SplitMix64 output finaliser (variant 13 of Stafford's mixers).
#[inline(always)]
pub fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Output `i` (0-based) of the SplitMix64 stream whose state starts at `state`.
#[inline(always)]
pub fn splitmix_at(state: u64, i: u64) -> u64 {
    mix64(state.wrapping_add(GOLDEN.wrapping_mul(i.wrapping_add(1))))
}

/// Key of output row `row`: output `row` of the stream started at `seed`.
#[inline(always)]
pub fn row_key(seed: u64, row: usize) -> u64 {
    splitmix_at(seed, row as u64)
}

/// A sequential reader of one row's stream (words 0, 1, 2, ...).
pub struct Stream {
    state: u64,
}

impl Stream {
    /// The stream of row `row` under `seed`.
    pub fn for_row(seed: u64, row: usize) -> Self {
        Stream {
            state: row_key(seed, row),
        }
    }

    /// The next 64-bit word.
    #[inline(always)]
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(GOLDEN);
        mix64(self.state)
    }

    /// A uniform integer in `0..n` by Lemire's multiply-shift (`(w * n) >> 64`);
    /// its bias is below `n / 2^64`, i.e. nil for any dimension used here.
    #[inline(always)]
    pub fn below(&mut self, n: u64) -> u64 {
        ((self.next_u64() as u128 * n as u128) >> 64) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_reference_splitmix64_sequence() {
        // Reference values of SplitMix64 seeded with 0 (Vigna's splitmix64.c).
        let mut s = Stream { state: 0 };
        assert_eq!(s.next_u64(), 0xE220_A839_7B1D_CDAF);
        assert_eq!(s.next_u64(), 0x6E78_9E6A_A1B9_65F4);
        assert_eq!(s.next_u64(), 0x06C4_5D18_8009_454F);
        assert_eq!(splitmix_at(0, 2), 0x06C4_5D18_8009_454F);
    }

    #[test]
    fn random_access_equals_sequential_reading() {
        let mut s = Stream::for_row(42, 7);
        for i in 0..100 {
            assert_eq!(s.next_u64(), splitmix_at(row_key(42, 7), i));
        }
    }

    #[test]
    fn below_stays_in_range() {
        let mut s = Stream::for_row(1, 0);
        for n in [1u64, 2, 3, 1536, 65_536] {
            for _ in 0..1000 {
                assert!(s.below(n) < n);
            }
        }
    }
}
