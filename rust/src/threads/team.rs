//! A team for short parallel calls: the caller and the pool's threads, which
//! stay awake (spinning) for a moment after each call.
//!
//! Handing a call to rayon's pool wakes a sleeping worker, and the caller then
//! sleeps until the work is joined: on the 2-vCPU VM these figures come from,
//! 5-8 us a call, and 16 us through `install` from Python. A 576x1536 FFN
//! layer at 90% sparsity, or a small quantized layer, is about 10 us of work, so
//! such calls ran on the calling thread alone. OpenMP runtimes answer the same
//! problem by letting their threads spin for a while before they sleep
//! (`OMP_WAIT_POLICY`, `KMP_BLOCKTIME`); this module does that for one kind
//! of calls, [`map`], [`fold`] and [`for_each_chunk`], on top of the rayon pool:
//!
//! - The caller publishes the call, works on it itself, and then waits only for
//!   the helpers that joined: a helper still waking up finds the call closed
//!   and costs nothing.
//! - A helper is a rayon job that spins on the published state and leaves
//!   after [`spin_time`] with nothing to do. A call that finds fewer than
//!   `threads - 1` helpers spawns the missing ones, so the first call of a
//!   burst pays one spawn and the later ones none.
//! - Long calls through [`super::install`] retire the helpers first, so the
//!   pool's threads are free for them.
//!
//! One call at a time owns the team; a call made while another runs (another
//! Python thread, or a call from inside a task) runs on its own thread.

use std::any::Any;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicPtr, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use super::health::Health;
use crate::error::{Error, Result};

/// Default of [`spin_time`], in microseconds: long enough to carry a helper
/// across back-to-back calls (a layer's q/k/v or gate/up projections, a
/// benchmark loop: a few microseconds of Python apart), short enough not to
/// hold a core that torch's own threads want for the operations in between.
/// Measured on Zen 5 (2 vCPUs), a 1536x576 4-bit `QuantizedLinear` called in a
/// loop: 41.6 us with no team, 32.5-33.3 us with it; called alternately with a
/// 256x256 `torch.mm` (170 us, two OpenMP threads), the pair took 222 us with
/// no team, 223 us spinning 30 us and 238 us spinning 300 us.
const DEFAULT_SPIN_US: u64 = 50;

/// How long the caller spins for the helpers' last tasks before it yields its
/// core at each check.
const YIELD_AFTER: Duration = Duration::from_micros(20);

/// `state` layout: the call's epoch in the high 32 bits, whether it is open to
/// helpers in bit 31, and how many helpers joined it below.
const OPEN: u64 = 1 << 31;
const JOINED: u64 = OPEN - 1;

/// One published call. It lives on the caller's stack; helpers reach it through
/// [`TEAM`]`.job` only between joining and finishing (see the safety
/// argument in [`helper`]).
struct Job<'a> {
    task: &'a (dyn Fn(usize) + Sync),
    tasks: usize,
    next: AtomicUsize,
    panic: Mutex<Option<Box<dyn Any + Send>>>,
}

impl<'a> Job<'a> {
    fn new(task: &'a (dyn Fn(usize) + Sync), tasks: usize) -> Self {
        Job {
            task,
            tasks,
            next: AtomicUsize::new(0),
            panic: Mutex::new(None),
        }
    }

    /// Raises the kept panic, if a task panicked.
    fn finish(self) -> Result<()> {
        match self.panic.into_inner().unwrap_or_else(|e| e.into_inner()) {
            Some(p) => resume_unwind(p),
            None => Ok(()),
        }
    }

    /// Runs tasks until none is left, keeping the first panic for the caller;
    /// returns how many it ran.
    fn work(&self) -> usize {
        let mut ran = 0;
        loop {
            let t = self.next.fetch_add(1, Ordering::Relaxed);
            if t >= self.tasks {
                return ran;
            }
            ran += 1;
            if let Err(p) = catch_unwind(AssertUnwindSafe(|| (self.task)(t))) {
                let mut slot = self.panic.lock().unwrap_or_else(|e| e.into_inner());
                if slot.is_none() {
                    *slot = Some(p);
                } else {
                    // Dropping a payload may itself panic, and nothing may
                    // unwind out of here (see `Close`): a second one is leaked.
                    std::mem::forget(p);
                }
            }
        }
    }
}

struct Team {
    /// Epoch, open bit and joined count (see [`OPEN`]).
    state: AtomicU64,
    /// The open call (a `Job` with its lifetime erased).
    job: AtomicPtr<Job<'static>>,
    /// Helpers that finished the current call.
    finished: AtomicU32,
    /// Helper jobs spawned and not yet gone.
    helpers: AtomicUsize,
    /// Bumped to send every helper away.
    generation: AtomicU64,
    /// Held by the call that owns the team.
    owner: Mutex<()>,
    /// The owner's view of how the team fares (see [`Health`]).
    health: Mutex<Health>,
}

/// Nanoseconds since the first call of the process.
fn now_ns() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

static TEAM: Team = Team {
    state: AtomicU64::new(0),
    job: AtomicPtr::new(std::ptr::null_mut()),
    finished: AtomicU32::new(0),
    helpers: AtomicUsize::new(0),
    generation: AtomicU64::new(0),
    owner: Mutex::new(()),
    health: Mutex::new(Health::NEW),
};

/// How long a helper spins for a next call before it leaves the pool's thread
/// free: `NEUROPIL_SPIN_US` microseconds (0 turns the team off: its calls then
/// go through the pool), else 50 (`DEFAULT_SPIN_US`). Read once.
pub fn spin_time() -> Result<Duration> {
    static SPIN: OnceLock<std::result::Result<Duration, String>> = OnceLock::new();
    let parsed = SPIN.get_or_init(|| match std::env::var("NEUROPIL_SPIN_US") {
        Ok(s) if !s.trim().is_empty() => s
            .trim()
            .parse::<u64>()
            .ok()
            .filter(|&us| us <= 1_000_000)
            .map(Duration::from_micros)
            .ok_or(s),
        _ => Ok(Duration::from_micros(DEFAULT_SPIN_US)),
    });
    parsed.clone().map_err(|s| {
        Error::value(
            "NEUROPIL_SPIN_US",
            "an integer number of microseconds in 0..=1000000",
            format!("{s:?}"),
        )
    })
}

/// Sends the spinning helpers away (they leave within a spin step). After a
/// pool is replaced, call this once the new one is in place: a call that read
/// the generation before this bump and then found the old pool spawns helpers
/// that leave at once (see `run`).
pub(crate) fn retire() {
    TEAM.generation.fetch_add(1, Ordering::SeqCst);
}

/// In a forked child: the parent's helpers are not in this process, so none
/// is counted (the next call spawns its own in the child's pool) and any stale
/// one is retired.
pub(crate) fn forked() {
    TEAM.helpers.store(0, Ordering::SeqCst);
    retire();
}

/// A helper: joins each call after epoch `seen` published while it spins, and
/// leaves after `spin` with none, or when retired.
fn helper(generation: u64, mut seen: u64, spin: Duration) {
    let mut idle_since = Instant::now();
    let mut polls = 0u32;
    loop {
        let s = TEAM.state.load(Ordering::Acquire);
        if s >> 32 != seen && s & OPEN != 0 {
            if TEAM
                .state
                .compare_exchange_weak(s, s + 1, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
            {
                seen = s >> 32;
                // SAFETY: the CAS compared the whole state, open bit
                // included, so it joined the call open at that moment; it
                // reads (AcqRel) the Release store that opened it, which
                // `run` made after storing that call's job, so this load sees
                // that job. The owner lock keeps any other caller from storing
                // a new job before this call ends, and the call's `Close` guard
                // (dropped before the job, on unwind too) does not return until
                // `finished` counts this helper, so the job is alive until the
                // `fetch_add` below. Nothing borrowed from it outlives that
                // (its `'static` lifetime is erased, not real); `Job` is Sync.
                let job = unsafe { &*TEAM.job.load(Ordering::Acquire) };
                let _ = job.work();
                TEAM.finished.fetch_add(1, Ordering::Release);
                idle_since = Instant::now();
            }
            continue;
        }
        std::hint::spin_loop();
        polls = polls.wrapping_add(1);
        // The clock and the generation are read now and then, not every poll.
        if polls.is_multiple_of(64)
            && (TEAM.generation.load(Ordering::Relaxed) != generation
                || idle_since.elapsed() > spin)
        {
            TEAM.helpers.fetch_sub(1, Ordering::Relaxed);
            return;
        }
    }
}

/// `f(0), ..., f(tasks - 1)` on the caller and the team's helpers, each task
/// once, results in task order. A panic in a task is raised again here once
/// every task has run.
pub fn map<T: Send>(tasks: usize, f: impl Fn(usize) -> T + Sync) -> Result<Vec<T>> {
    let out: Vec<Mutex<Option<T>>> = (0..tasks).map(|_| Mutex::new(None)).collect();
    run(tasks, &|t| {
        let v = f(t);
        *out[t].lock().unwrap_or_else(|e| e.into_inner()) = Some(v);
    })?;
    Ok(out
        .into_iter()
        .map(|m| {
            m.into_inner()
                .unwrap_or_else(|e| e.into_inner())
                .expect("every task ran")
        })
        .collect())
}

/// `work(acc, t)` for every task `t`, the tasks cut into `blocks` contiguous
/// ranges, each folded in order into its own `init()`; results in block order.
/// Unlike rayon's `fold`, the result does not depend on which thread ran what
/// (floats summed in a fixed order), only on `blocks`.
pub fn fold<A: Send>(
    tasks: usize,
    blocks: usize,
    init: impl Fn() -> A + Sync,
    work: impl Fn(A, usize) -> A + Sync,
) -> Result<Vec<A>> {
    let blocks = blocks.clamp(1, tasks.max(1));
    map(blocks, |b| {
        (b * tasks / blocks..(b + 1) * tasks / blocks).fold(init(), &work)
    })
}

/// `f(c, piece)` for each `chunk`-long piece `c` of `data` (the last may be
/// shorter), on the caller and the team's helpers.
pub fn for_each_chunk<T: Send>(
    data: &mut [T],
    chunk: usize,
    f: impl Fn(usize, &mut [T]) + Sync,
) -> Result<()> {
    chunks(data, chunk, f, Kind::Short)
}

/// [`for_each_chunk`] for a long call (hundreds of microseconds and more):
/// the team's awake helpers still save it the pool's hand-off, which a stack
/// of such calls (a model's layers) pays once per call, but it never runs
/// alone to probe whether the team pays (see `health.rs`; that is a short
/// call's question), and it runs in the pool, not alone, when another call
/// holds the team.
pub fn for_each_long_chunk<T: Send>(
    data: &mut [T],
    chunk: usize,
    f: impl Fn(usize, &mut [T]) + Sync,
) -> Result<()> {
    chunks(data, chunk, f, Kind::Long)
}

fn chunks<T: Send>(
    data: &mut [T],
    chunk: usize,
    f: impl Fn(usize, &mut [T]) + Sync,
    kind: Kind,
) -> Result<()> {
    let pieces: Vec<Mutex<&mut [T]>> = data.chunks_mut(chunk.max(1)).map(Mutex::new).collect();
    run_as(kind, pieces.len(), &|c| {
        f(c, &mut pieces[c].lock().unwrap_or_else(|e| e.into_inner()))
    })
}

/// Whether a call is short (the team's health decides whether it runs
/// alone) or long (see [`for_each_long_chunk`]).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Short,
    Long,
}

/// Closes the open call when dropped: no helper can join it after that, and
/// the drop returns only once every helper that joined has finished with the
/// job (they read it until they count themselves finished).
struct Close;

impl Drop for Close {
    fn drop(&mut self) {
        let joined = TEAM.state.fetch_and(!OPEN, Ordering::AcqRel) & JOINED;
        let waiting = Instant::now();
        while u64::from(TEAM.finished.load(Ordering::Acquire)) < joined {
            // A helper descheduled in mid-task (more threads than cores) would
            // otherwise wait for its core while this one spins on it.
            if waiting.elapsed() < YIELD_AFTER {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
    }
}

/// Runs `task(0..tasks)` as [`map`] describes.
fn run(tasks: usize, task: &(dyn Fn(usize) + Sync)) -> Result<()> {
    run_as(Kind::Short, tasks, task)
}

fn run_as(kind: Kind, tasks: usize, task: &(dyn Fn(usize) + Sync)) -> Result<()> {
    let threads = super::num_threads()?;
    let spin = spin_time()?;
    // Alone, panics are kept and raised after every task as in the team.
    let serial = || {
        let job = Job::new(task, tasks);
        job.work();
        job.finish()
    };
    if tasks <= 1 || threads <= 1 {
        return serial();
    }
    let pool = || {
        use rayon::prelude::*;
        super::install(|| (0..tasks).into_par_iter().for_each(task))
    };
    if spin.is_zero() {
        // No team: the pool, as long calls use it.
        return pool();
    }
    // A call that panicked poisoned the lock; it guards no data, so that is moot.
    let _owner = match TEAM.owner.try_lock() {
        Ok(g) => g,
        Err(std::sync::TryLockError::Poisoned(e)) => e.into_inner(),
        Err(std::sync::TryLockError::WouldBlock) if kind == Kind::Long => return pool(),
        Err(std::sync::TryLockError::WouldBlock) => return serial(),
    };
    let mut health = *TEAM.health.lock().unwrap_or_else(|e| e.into_inner());
    let t0 = now_ns();
    if kind == Kind::Short && health.alone_next(threads) {
        serial()?;
        let wall = now_ns() - t0;
        health.record(threads, true, wall / tasks as u64, wall);
        *TEAM.health.lock().unwrap_or_else(|e| e.into_inner()) = health;
        return Ok(());
    }
    let missing = (threads - 1).saturating_sub(TEAM.helpers.load(Ordering::Relaxed));
    if missing > 0 {
        // The generation before the pool: a pool replaced in between is
        // followed by a bump (see `retire`), which sends these helpers away.
        let generation = TEAM.generation.load(Ordering::SeqCst);
        let pool = super::pool()?;
        // The new helpers may join this call, published below.
        let seen = TEAM.state.load(Ordering::Relaxed) >> 32;
        for _ in 0..missing {
            TEAM.helpers.fetch_add(1, Ordering::Relaxed);
            pool.spawn(move || helper(generation, seen, spin));
        }
    }
    let job = Job::new(task, tasks);
    // Every helper of the previous call has finished (its `run` waited), so
    // the count starts afresh.
    TEAM.finished.store(0, Ordering::Relaxed);
    TEAM.job.store(
        (&job as *const Job<'_>).cast_mut().cast(),
        Ordering::Relaxed,
    );
    let epoch = ((TEAM.state.load(Ordering::Relaxed) >> 32) + 1) & u64::from(u32::MAX);
    // Release: a helper whose join succeeds sees the job and the count.
    TEAM.state.store(epoch << 32 | OPEN, Ordering::Release);
    // Declared after `job`, so dropped (closing the call and waiting) before
    // it, even if something below unwinds.
    let close = Close;
    let t1 = now_ns();
    let own = job.work();
    let t2 = now_ns();
    drop(close);
    if kind == Kind::Short {
        let wall = now_ns() - t0;
        health.record(threads, false, (t2 - t1) / own.max(1) as u64, wall);
        *TEAM.health.lock().unwrap_or_else(|e| e.into_inner()) = health;
    }
    job.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Holds the pool-resizing lock with the pool at `n` threads.
    fn pool_of(n: usize) -> std::sync::MutexGuard<'static, ()> {
        let guard = super::super::TEST_LOCK
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        super::super::set_num_threads(n).unwrap();
        guard
    }

    #[test]
    fn map_runs_each_task_once_in_order() {
        let _pool = pool_of(3);
        let runs = AtomicUsize::new(0);
        for tasks in [0, 1, 2, 7, 64] {
            for _ in 0..50 {
                runs.store(0, Ordering::Relaxed);
                let got = map(tasks, |t| {
                    runs.fetch_add(1, Ordering::Relaxed);
                    t * t
                })
                .unwrap();
                assert_eq!(got, (0..tasks).map(|t| t * t).collect::<Vec<_>>());
                assert_eq!(runs.load(Ordering::Relaxed), tasks);
            }
        }
    }

    #[test]
    fn a_long_call_takes_the_pool_when_another_call_holds_the_team() {
        let _pool = pool_of(3);
        let threads_used = |long: bool| {
            let ids = Mutex::new(std::collections::HashSet::new());
            let mut data = vec![0u8; 12];
            let f = |_: usize, _: &mut [u8]| {
                std::thread::sleep(Duration::from_millis(3));
                ids.lock().unwrap().insert(std::thread::current().id());
            };
            if long {
                for_each_long_chunk(&mut data, 1, f).unwrap();
            } else {
                for_each_chunk(&mut data, 1, f).unwrap();
            }
            ids.into_inner().unwrap().len()
        };
        // Another call owns the team for the length of these calls.
        let owner = TEAM.owner.lock().unwrap_or_else(|e| e.into_inner());
        assert_eq!(threads_used(false), 1); // a short call runs alone
        assert!(threads_used(true) > 1); // a long one in the pool
        drop(owner);
        assert!(threads_used(true) > 1);
    }

    #[test]
    fn fold_folds_contiguous_ranges_in_order() {
        for (tasks, blocks) in [(0, 3), (1, 4), (5, 2), (300, 8), (7, 100)] {
            let accs = fold(tasks, blocks, Vec::new, |mut v, t| {
                v.push(t);
                v
            })
            .unwrap();
            assert_eq!(accs.len(), blocks.clamp(1, tasks.max(1)));
            assert!(accs.iter().all(|v| v.windows(2).all(|w| w[1] == w[0] + 1)));
            let all: Vec<usize> = accs.into_iter().flatten().collect();
            assert_eq!(all, (0..tasks).collect::<Vec<_>>());
        }
    }

    /// Two tasks that each wait for the other's start: they end at once only
    /// if two threads run them. Returns whether they did.
    fn two_threads_ran() -> bool {
        let arrived = AtomicUsize::new(0);
        let threads = map(2, |_| {
            arrived.fetch_add(1, Ordering::SeqCst);
            let t0 = Instant::now();
            while arrived.load(Ordering::SeqCst) < 2 && t0.elapsed() < Duration::from_millis(200) {
                std::hint::spin_loop();
            }
            std::thread::current().id()
        })
        .unwrap();
        threads[0] != threads[1]
    }

    #[test]
    fn a_helper_takes_part() {
        let _pool = pool_of(2);
        // Other tests' calls may own the team for a moment (this call then
        // runs on its own thread), so a few tries.
        assert!((0..20).any(|_| two_threads_ran()), "no helper joined");
    }

    #[test]
    fn retire_sends_a_spinning_helper_away() {
        let _pool = super::super::TEST_LOCK
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        TEAM.helpers.fetch_add(1, Ordering::Relaxed);
        let generation = TEAM.generation.load(Ordering::Relaxed);
        let seen = TEAM.state.load(Ordering::Relaxed) >> 32;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            helper(generation, seen, Duration::from_secs(60));
            tx.send(()).unwrap();
        });
        retire();
        assert!(
            rx.recv_timeout(Duration::from_secs(5)).is_ok(),
            "a helper spun on after retire"
        );
    }

    #[test]
    fn a_panicking_task_is_raised_after_every_task_ran() {
        let _pool = pool_of(2);
        let runs = AtomicUsize::new(0);
        let r = catch_unwind(AssertUnwindSafe(|| {
            map(16, |t| {
                runs.fetch_add(1, Ordering::Relaxed);
                assert!(t != 5, "task 5 fails");
            })
        }));
        assert!(r.is_err());
        assert_eq!(runs.load(Ordering::Relaxed), 16);
        // The team still works afterwards, helpers included.
        assert!(
            (0..20).any(|_| two_threads_ran()),
            "the team is off after a panic"
        );
    }
}
