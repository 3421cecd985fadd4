//! Range search under the 8-bit bound for a batch of queries, parallel over
//! queries.
//!
//! Why not parallel over key ranges, as the other methods are: the bound makes
//! a query's work small (a few microseconds at 8k keys), so splitting a query's
//! keys over tasks costs more in per-task result vectors and the final merge
//! than the scan itself. Here each rayon task owns a slice of the queries from
//! preparation (rotation, 8-bit codes) to the sorted answer, and walks the keys
//! in chunks that stay in the core's L2 while every query of the slice runs
//! over them, so the codes are read from memory once per slice, not once per
//! query.

use rayon::prelude::*;

use super::blocks::BlockSet;
use super::kernel::LANES;
use super::search::{self, Scan, Scratch};
use super::tree::Tree;
use crate::error::Result;
use crate::simd::Level;

/// One query's hits `(id, score)`, ascending by id, and the work done.
pub type QueryHits = (Vec<(u32, f32)>, Scan);

/// Keys per chunk: 2,048 keys are 128 KiB of codes plus 512 KiB of f32 rows at
/// d = 64, inside a 1-2 MiB L2.
const CHUNK_KEYS: usize = 2048;

/// Queries per task: enough to reuse each chunk from L2 many times, few
/// enough that every thread gets several tasks to balance.
fn queries_per_task(nq: usize, threads: usize) -> usize {
    (nq / (4 * threads.max(1))).clamp(4, 64)
}

/// Every key of `tree` (under the 8-bit bound) and of `pending` (scanned in
/// full) with score `>= thresholds[i]`, for each query `i`.
#[allow(clippy::too_many_arguments)]
pub fn search(
    level: Level,
    tree: &Tree,
    pending: &BlockSet,
    knorm: f64,
    queries: &[f32],
    thresholds: &[f32],
    d: usize,
) -> Result<Vec<QueryHits>> {
    let nq = thresholds.len();
    let mut per: Vec<QueryHits> = (0..nq).map(|_| (Vec::new(), Scan::default())).collect();
    let qb = queries_per_task(nq, crate::threads::num_threads()?);
    let nb = tree.keys.blocks();
    let step = CHUNK_KEYS / LANES;
    crate::threads::install(|| {
        per.par_chunks_mut(qb)
            .zip(queries.par_chunks(qb * d))
            .zip(thresholds.par_chunks(qb))
            .for_each(|((out, qs), ts)| {
                let preps: Vec<search::Prepared> = qs
                    .chunks_exact(d)
                    .map(|q| search::prepare(level, Some(tree), q, knorm))
                    .collect();
                let mut scratch = Scratch::default();
                for a in (0..nb).step_by(step) {
                    let b = (a + step).min(nb);
                    for ((o, p), &t) in out.iter_mut().zip(&preps).zip(ts) {
                        let s =
                            search::quant_range(level, tree, p, a, b, t, &mut o.0, &mut scratch);
                        o.1.exact += s.exact;
                        o.1.prefix += s.prefix;
                    }
                }
                for ((o, p), &t) in out.iter_mut().zip(&preps).zip(ts) {
                    let s =
                        search::flat_range(level, pending, 0, pending.blocks(), &p.q, t, &mut o.0);
                    o.1.exact += s.exact;
                    // Keys are in tree order, answers are by id.
                    o.0.sort_unstable_by_key(|h| h.0);
                }
            })
    })?;
    Ok(per)
}
