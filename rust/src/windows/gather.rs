//! The gather kernel: copies windows of consecutive rows into a batch buffer.
//!
//! A window of `rows` consecutive rows of a C-contiguous array is one
//! contiguous run of bytes, so a batch is `B` independent `memcpy`s of
//! `rows * row_bytes` each (34 KB for 30 frames of 287 float32). The copy is
//! byte-wise, so every element type (float32, float16, bfloat16, int64 labels)
//! is gathered without conversion.
//!
//! Batches over 1 MiB are cut into chunks of about 256 KiB that the calling
//! thread and `threads - 1` pool threads take from one queue: the caller works
//! instead of waiting, and a thread the OS deschedules holds up one chunk at
//! most. While one window is copied, the next one's lines are prefetched into
//! L2 page by page (random windows restart the hardware prefetcher at every
//! 4 KiB page). Every source range is checked before the first byte is
//! written; an out-of-range start fails with [`Error::Index`], never clamped.

use std::sync::Mutex;

use crate::error::{Error, Result};

/// Below this many bytes a batch is copied on the calling thread.
const PARALLEL_MIN_BYTES: usize = 1 << 20;
/// Each parallel task copies at least this many bytes.
const TASK_MIN_BYTES: usize = 256 << 10;

/// A C-contiguous array seen as `n_rows` rows of `row_bytes` bytes.
#[derive(Debug, Clone, Copy)]
pub struct Rows<'a> {
    data: &'a [u8],
    row_bytes: usize,
}

impl<'a> Rows<'a> {
    /// Fails unless `data` holds a whole number of rows of `row_bytes > 0`.
    pub fn new(data: &'a [u8], row_bytes: usize) -> Result<Self> {
        if row_bytes == 0 || !data.len().is_multiple_of(row_bytes) {
            return Err(Error::value(
                "frames",
                "rows of at least one element",
                format!("{} bytes in rows of {row_bytes} bytes", data.len()),
            ));
        }
        Ok(Rows { data, row_bytes })
    }

    pub fn n_rows(&self) -> usize {
        self.data.len() / self.row_bytes
    }

    pub fn row_bytes(&self) -> usize {
        self.row_bytes
    }
}

/// Copies, for each `s` in `starts`, rows `s + shift .. s + shift + rows` of
/// `src` into consecutive slots of `out` (`starts.len() * rows * row_bytes`
/// bytes).
///
/// `arg` names the array in error messages. Fails with [`Error::Shape`] when
/// `out` has the wrong size and with [`Error::Index`] when a window would read
/// outside `src`; in both cases `out` is untouched.
pub fn gather<S: Copy + Sync + Into<i64>>(
    arg: &'static str,
    src: Rows<'_>,
    starts: &[S],
    shift: u64,
    rows: usize,
    out: &mut [u8],
) -> Result<()> {
    let item = rows * src.row_bytes;
    if out.len() != starts.len() * item {
        return Err(Error::shape(
            "out",
            format!(
                "{} bytes ({} windows of {rows} rows of {} bytes)",
                starts.len() * item,
                starts.len(),
                src.row_bytes
            ),
            &[out.len()],
        ));
    }
    let n = src.n_rows() as u64;
    for s in starts.iter().map(|&s| s.into()) {
        let last = (s as u64).checked_add(shift + rows as u64);
        if s < 0 || last.is_none_or(|end| end > n) {
            return Err(Error::Index {
                arg,
                index: s.saturating_add(shift as i64),
                len: (n as usize + 1).saturating_sub(rows),
            });
        }
    }
    if item == 0 {
        return Ok(());
    }
    copy_windows(src, starts, shift, item, out, true);
    Ok(())
}

/// The copy itself, after every range was checked. With `prefetch`, each 4 KiB
/// block of a window is copied after the matching block of the next window was
/// prefetched, so the next window's DRAM reads overlap this window's copy
/// (random windows defeat the hardware prefetcher at every page boundary).
#[doc(hidden)]
pub fn copy_windows<S: Copy + Sync + Into<i64>>(
    src: Rows<'_>,
    starts: &[S],
    shift: u64,
    item: usize,
    out: &mut [u8],
    prefetch: bool,
) {
    let from = |s: S| (s.into() as usize + shift as usize) * src.row_bytes;
    let task = |(dst, st): (&mut [u8], &[S])| {
        for (k, (d, &s)) in dst.chunks_mut(item).zip(st).enumerate() {
            let cur = &src.data[from(s)..from(s) + item];
            match st.get(k + 1) {
                Some(&next) if prefetch => {
                    let next = &src.data[from(next)..from(next) + item];
                    for ((db, cb), nb) in d
                        .chunks_mut(BLOCK)
                        .zip(cur.chunks(BLOCK))
                        .zip(next.chunks(BLOCK))
                    {
                        prefetch_block(nb);
                        db.copy_from_slice(cb);
                    }
                }
                _ => d.copy_from_slice(cur),
            }
        }
    };
    if out.len() < PARALLEL_MIN_BYTES {
        task((out, starts));
        return;
    }
    // A shared queue of chunks, drained by the calling thread and `threads - 1`
    // pool threads: the caller works instead of waiting, and whoever runs takes
    // the next chunk, so a thread the OS descheduled delays nobody.
    let per_task = TASK_MIN_BYTES.div_ceil(item).max(1);
    let chunks: Vec<(&mut [u8], &[S])> = out
        .chunks_mut(item * per_task)
        .zip(starts.chunks(per_task))
        .collect();
    let helpers = crate::threads::num_threads()
        .unwrap_or(1)
        .min(chunks.len())
        .saturating_sub(1);
    let queue = Mutex::new(chunks);
    let drain = || loop {
        let next = queue.lock().unwrap_or_else(|e| e.into_inner()).pop();
        match next {
            Some(chunk) => task(chunk),
            None => break,
        }
    };
    // `in_place_scope` only fails when the pool cannot start: the caller then
    // drains the whole queue alone.
    let _ = crate::threads::in_place_scope(|scope| {
        for _ in 0..helpers {
            scope.spawn(|_| drain());
        }
        drain();
    });
    drain();
}

/// Bytes copied between two prefetch rounds (one page).
const BLOCK: usize = 4096;

/// Asks the CPU to start loading `block` into the cache (a hint: no effect on
/// results, a no-op off x86-64).
#[inline]
fn prefetch_block(block: &[u8]) {
    #[cfg(target_arch = "x86_64")]
    for line in block.chunks(64) {
        // SAFETY: `_mm_prefetch` is SSE, part of the x86-64 baseline; a prefetch
        // never faults, and `line` is a valid in-bounds pointer anyway.
        unsafe {
            std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T1 }>(
                line.as_ptr().cast::<i8>(),
            )
        };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = block;
}

/// Whether two byte ranges overlap (an output must never alias its source).
pub fn overlaps(a: &[u8], b: &[u8]) -> bool {
    let (a0, a1) = (a.as_ptr() as usize, a.as_ptr() as usize + a.len());
    let (b0, b1) = (b.as_ptr() as usize, b.as_ptr() as usize + b.len());
    !a.is_empty() && !b.is_empty() && a0 < b1 && b0 < a1
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn frames(n: usize, d: usize) -> Vec<f32> {
        (0..n * d).map(|i| i as f32).collect()
    }

    fn bytes(v: &[f32]) -> &[u8] {
        // SAFETY: f32 has no padding or invalid bit patterns as bytes; the
        // length is the same memory measured in bytes.
        unsafe { std::slice::from_raw_parts(v.as_ptr().cast::<u8>(), std::mem::size_of_val(v)) }
    }

    fn run(f: &[f32], d: usize, starts: &[i64], shift: u64, rows: usize) -> Result<Vec<f32>> {
        let mut out = vec![0f32; starts.len() * rows * d];
        // SAFETY: as in `bytes`, for the exclusively borrowed output.
        let ob =
            unsafe { std::slice::from_raw_parts_mut(out.as_mut_ptr().cast::<u8>(), out.len() * 4) };
        gather(
            "frames",
            Rows::new(bytes(f), d * 4)?,
            starts,
            shift,
            rows,
            ob,
        )?;
        Ok(out)
    }

    proptest! {
        #[test]
        fn matches_slicing(
            n in 1usize..60, d in 1usize..9, rows in 1usize..8, shift in 0u64..3,
            raw in prop::collection::vec(0usize..1000, 0..40),
        ) {
            prop_assume!(rows + shift as usize <= n);
            let f = frames(n, d);
            let starts: Vec<i64> =
                raw.iter().map(|r| (r % (n - rows - shift as usize + 1)) as i64).collect();
            let got = run(&f, d, &starts, shift, rows).unwrap();
            for (b, &s) in starts.iter().enumerate() {
                let from = (s as usize + shift as usize) * d;
                prop_assert_eq!(&got[b * rows * d..(b + 1) * rows * d], &f[from..from + rows * d]);
            }
        }
    }

    #[test]
    fn large_batches_take_the_parallel_path() {
        let (n, d, rows) = (4000, 64, 30);
        let f = frames(n, d);
        let starts: Vec<i64> = (0..300).map(|i| (i * 37 % (n - rows)) as i64).collect();
        let got = run(&f, d, &starts, 0, rows).unwrap();
        for (b, &s) in starts.iter().enumerate() {
            let from = s as usize * d;
            assert_eq!(
                &got[b * rows * d..(b + 1) * rows * d],
                &f[from..from + rows * d]
            );
        }
    }

    #[test]
    fn out_of_range_is_an_index_error_not_a_clamp() {
        let f = frames(10, 2);
        assert!(run(&f, 2, &[7], 0, 3).is_ok());
        for (starts, shift) in [(vec![8i64], 0u64), (vec![-1], 0), (vec![7], 1)] {
            let e = run(&f, 2, &starts, shift, 3).unwrap_err();
            assert!(matches!(e, Error::Index { .. }), "{e}");
        }
        let e = run(&f, 2, &[0, 8], 0, 3).unwrap_err().to_string();
        assert_eq!(e, "frames index 8 is out of range for length 8");
    }

    #[test]
    fn wrong_output_size_and_overlap() {
        let f = frames(10, 2);
        let mut out = vec![0u8; 7];
        let e = gather(
            "frames",
            Rows::new(bytes(&f), 8).unwrap(),
            &[0],
            0,
            1,
            &mut out,
        );
        assert!(matches!(e, Err(Error::Shape { .. })));
        let b = bytes(&f);
        assert!(overlaps(&b[0..8], &b[4..12]));
        assert!(!overlaps(&b[0..8], &b[8..12]));
        assert!(Rows::new(b, 0).is_err());
        assert!(Rows::new(&b[..7], 8).is_err());
    }
}
