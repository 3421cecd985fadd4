//! The rayon pool every parallel kernel runs in.
//!
//! A dedicated pool (not rayon's global one) so `set_num_threads` can resize it
//! at any time: the next parallel call picks up the new pool, calls in flight
//! finish on the old one. Sized by `NEUROPIL_NUM_THREADS`, else all cores.
//!
//! Short calls (tens of microseconds) go through [`team`] instead: the same
//! pool's threads, kept spinning for a moment between calls so that a burst of
//! short calls does not pay the pool's wake-up each time.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use rayon::{ThreadPool, ThreadPoolBuilder};

use crate::error::{Error, Result};

mod health;
pub mod team;

/// The pool, and the [`forks`] count it was built at: a process forked after
/// the pool started (DataLoader workers, `multiprocessing` with "fork") has
/// none of its threads, so a parallel call there would wait for them forever.
/// The child builds its own pool at its first parallel call instead.
static POOL: RwLock<Option<(u64, Arc<ThreadPool>)>> = RwLock::new(None);

/// Forks of this process so far (counted in the child by a `pthread_atfork`
/// handler, installed when the first pool is built).
static FORKS: AtomicU64 = AtomicU64::new(0);

#[cfg(target_os = "linux")]
extern "C" fn count_fork() {
    // Async-signal-safe: one atomic add, nothing else, in the forked child.
    FORKS.fetch_add(1, Ordering::SeqCst);
}

fn forks() -> u64 {
    #[cfg(target_os = "linux")]
    {
        static HOOK: std::sync::Once = std::sync::Once::new();
        HOOK.call_once(|| {
            // SAFETY: registers a plain `extern "C"` function taking nothing;
            // `count_fork` only touches an atomic, which is async-signal-safe.
            // A failed registration (ENOMEM) leaves fork detection off, as before.
            unsafe { libc::pthread_atfork(None, None, Some(count_fork)) };
        });
    }
    FORKS.load(Ordering::SeqCst)
}

/// Installs `p` as the pool of the current process.
fn store(slot: &mut Option<(u64, Arc<ThreadPool>)>, forks: u64, p: Arc<ThreadPool>) {
    if let Some((at, old)) = slot.replace((forks, p)) {
        if at != forks {
            // The parent's pool: its threads are not in this process, so
            // dropping it could wait on or signal threads that do not exist.
            std::mem::forget(old);
            // Its helpers are not here either: the child's team starts empty.
            team::forked();
        }
    }
}

/// The most threads the pool takes: far past any CPU's cores (oversubscribed
/// many times over), and a bound on what a typo costs: 2000 threads took 2.5 s
/// to start on a 2-vCPU VM, so a million would take many minutes (or exhaust
/// the OS's thread limit); larger counts are refused rather than attempted.
pub const MAX_THREADS: usize = 4096;

fn check_count(name: &'static str, n: usize, found: impl std::fmt::Display) -> Result<usize> {
    if (1..=MAX_THREADS).contains(&n) {
        Ok(n)
    } else {
        Err(Error::value(
            name,
            format!("a positive integer at most {MAX_THREADS}"),
            found,
        ))
    }
}

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

/// Thread count from `NEUROPIL_NUM_THREADS`, else the number of available cores
/// (at most [`MAX_THREADS`], so `set_num_threads(num_threads())` always works).
pub fn default_num_threads() -> Result<usize> {
    count_from(
        std::env::var("NEUROPIL_NUM_THREADS").ok(),
        std::thread::available_parallelism().map_or(1, |n| n.get()),
    )
}

/// The pool size for `NEUROPIL_NUM_THREADS` set to `env` (unset: `None`) on a
/// host with `cores` cores: a core count past [`MAX_THREADS`] gets the largest
/// pool `set_num_threads` accepts; a set value past it is refused.
fn count_from(env: Option<String>, cores: usize) -> Result<usize> {
    match env {
        Some(s) if !s.trim().is_empty() => match s.trim().parse::<usize>() {
            Ok(n) if n >= 1 => check_count("NEUROPIL_NUM_THREADS", n, format!("{s:?}")),
            _ => Err(Error::value(
                "NEUROPIL_NUM_THREADS",
                "a positive integer",
                format!("{s:?}"),
            )),
        },
        _ => Ok(cores.clamp(1, MAX_THREADS)),
    }
}

pub(crate) fn pool() -> Result<Arc<ThreadPool>> {
    let now = forks();
    if let Some((at, p)) = POOL.read().unwrap_or_else(|e| e.into_inner()).as_ref() {
        if *at == now {
            return Ok(p.clone());
        }
    }
    let mut slot = POOL.write().unwrap_or_else(|e| e.into_inner());
    let n = match slot.as_ref() {
        Some((at, p)) if *at == now => return Ok(p.clone()),
        // Forked: as many threads as the parent's pool had (set_num_threads included).
        Some((_, p)) => p.current_num_threads(),
        None => default_num_threads()?,
    };
    let p = build(n)?;
    store(&mut slot, now, p.clone());
    Ok(p)
}

/// Resizes the pool used by every later parallel call.
pub fn set_num_threads(n: usize) -> Result<()> {
    if n == 0 {
        return Err(Error::value("n", "a positive integer", 0));
    }
    let p = build(check_count("n", n, n)?)?;
    store(
        &mut POOL.write().unwrap_or_else(|e| e.into_inner()),
        forks(),
        p,
    );
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
        // Refused before any thread starts (a million would take minutes).
        let err = set_num_threads(1_000_000).unwrap_err().to_string();
        assert_eq!(
            err,
            format!("n must be a positive integer at most {MAX_THREADS}; got 1000000")
        );
        assert_eq!(num_threads().unwrap(), 3);
    }

    #[test]
    fn default_is_capped_at_the_maximum() {
        for (cores, n) in [
            (0, 1),
            (1, 1),
            (MAX_THREADS, MAX_THREADS),
            (MAX_THREADS + 1, MAX_THREADS),
            (usize::MAX, MAX_THREADS),
        ] {
            assert_eq!(count_from(None, cores).unwrap(), n);
            assert_eq!(count_from(Some(" ".into()), cores).unwrap(), n);
            // The default is a size set_num_threads accepts.
            assert!(check_count("n", n, n).is_ok());
        }
        assert_eq!(count_from(Some(" 7 ".into()), 9000).unwrap(), 7);
    }

    #[test]
    fn env_count_past_the_maximum_is_an_error_naming_it() {
        // (count_from, not the variable itself: the environment is process-wide
        // and tests run in parallel; the Python tests set it in a subprocess)
        let err = count_from(Some("5000".into()), 8).unwrap_err().to_string();
        assert_eq!(
            err,
            format!(
                "NEUROPIL_NUM_THREADS must be a positive integer at most {MAX_THREADS}; got \"5000\""
            )
        );
        let err = count_from(Some("0".into()), 8).unwrap_err().to_string();
        assert_eq!(
            err,
            "NEUROPIL_NUM_THREADS must be a positive integer; got \"0\""
        );
        let err = count_from(Some("four".into()), 8).unwrap_err().to_string();
        assert!(err.contains("got \"four\""), "{err}");
    }
}
