//! The rayon pool every parallel kernel runs in.
//!
//! A dedicated pool (not rayon's global one) so `set_num_threads` can resize it
//! at any time: the next parallel call picks up the new pool, calls in flight
//! finish on the old one. Sized by `NEUROPIL_NUM_THREADS`, else all cores.
//!
//! Short calls (tens of microseconds) go through [`team`] instead: the same
//! pool's threads, kept spinning for a moment between calls so that a burst of
//! short calls does not pay the pool's wake-up each time.

use std::sync::{Arc, RwLock};

use rayon::{ThreadPool, ThreadPoolBuilder};

use crate::error::{Error, Result};

mod health;
pub mod team;

static POOL: RwLock<Option<Arc<ThreadPool>>> = RwLock::new(None);

/// Serialises the unit tests that resize the process-wide pool.
#[cfg(test)]
pub(crate) static TEST_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn build(n: usize) -> Result<Arc<ThreadPool>> {
    ThreadPoolBuilder::new()
        .num_threads(n)
        .thread_name(|i| format!("neuropil-{i}"))
        .build()
        .map(Arc::new)
        .map_err(|e| Error::Threads(format!("could not start {n} threads: {e}")))
}

/// Thread count from `NEUROPIL_NUM_THREADS`, else the number of available cores.
pub fn default_num_threads() -> Result<usize> {
    match std::env::var("NEUROPIL_NUM_THREADS") {
        Ok(s) if !s.trim().is_empty() => match s.trim().parse::<usize>() {
            Ok(n) if n >= 1 => Ok(n),
            _ => Err(Error::value(
                "NEUROPIL_NUM_THREADS",
                "a positive integer",
                format!("{s:?}"),
            )),
        },
        _ => Ok(std::thread::available_parallelism().map_or(1, |n| n.get())),
    }
}

pub(crate) fn pool() -> Result<Arc<ThreadPool>> {
    if let Some(p) = POOL.read().unwrap_or_else(|e| e.into_inner()).as_ref() {
        return Ok(p.clone());
    }
    let mut slot = POOL.write().unwrap_or_else(|e| e.into_inner());
    if let Some(p) = slot.as_ref() {
        return Ok(p.clone());
    }
    let p = build(default_num_threads()?)?;
    *slot = Some(p.clone());
    Ok(p)
}

/// Resizes the pool used by every later parallel call.
pub fn set_num_threads(n: usize) -> Result<()> {
    if n == 0 {
        return Err(Error::value("n", "a positive integer", 0));
    }
    let p = build(n)?;
    *POOL.write().unwrap_or_else(|e| e.into_inner()) = Some(p);
    // After the swap: the helpers spinning in the old pool leave, and the next
    // short call starts the new pool's (see `team::retire`).
    team::retire();
    Ok(())
}

/// Number of threads parallel calls use.
pub fn num_threads() -> Result<usize> {
    Ok(pool()?.current_num_threads())
}

/// Runs `f` inside the pool, so its rayon iterators use the configured threads.
pub fn install<R: Send>(f: impl FnOnce() -> R + Send) -> Result<R> {
    // A long call wants every worker: the team's spinning helpers step aside.
    team::retire();
    Ok(pool()?.install(f))
}

/// Runs `f` on the calling thread with a scope of the pool: jobs `f` spawns run
/// on pool threads while the caller keeps working, so a caller that does its
/// share needs no hand-off; returns once every spawned job has finished.
pub fn in_place_scope<'scope, R>(f: impl FnOnce(&rayon::Scope<'scope>) -> R) -> Result<R> {
    team::retire();
    Ok(pool()?.in_place_scope(f))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rayon::prelude::*;

    #[test]
    fn resize_and_install() {
        let _guard = TEST_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        set_num_threads(3).unwrap();
        assert_eq!(num_threads().unwrap(), 3);
        let seen = install(rayon::current_num_threads).unwrap();
        assert_eq!(seen, 3);
        let total: u64 = install(|| (0..1000u64).into_par_iter().sum()).unwrap();
        assert_eq!(total, 499_500);
        assert!(set_num_threads(0).is_err());
    }
}
