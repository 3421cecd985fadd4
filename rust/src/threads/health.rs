//! When a short call runs alone rather than in the [`super::team`]: the
//! team pays only while the caller's time per task in it stays under `n` times
//! the time per task alone (`n` threads), and on some VMs it does not.

use std::time::Duration;

/// Whether the team pays for short calls, from the calls so far.
///
/// On a VM whose host does not run its vCPUs side by side (seen on the 2-vCPU
/// VM these figures come from, in phases of minutes), each thread's share of a
/// short call runs 2-3x slower in the team than on one thread: a 576x1536 int8
/// FFN call at 90% took 20 us a tile in the team, 30 us in all, against 6 us a
/// tile and 12 us alone (9 us in the team otherwise). Longer calls still gain
/// (the dense 576x1536 calls: 57-89 us in the team, ~110 us alone). With `n`
/// threads the team pays while the caller's time per task in it stays under
/// `n` times the time per task alone; so calls that follow one under
/// [`SHORT`] compare the two, each measured on such calls (one in
/// [`PROBE_EVERY`] takes the other way to keep the figures fresh, one in a
/// quarter of that while the team loses), and run alone while the team does
/// not pay.
#[derive(Debug, Clone, Copy)]
pub(super) struct Health {
    /// Moving averages (1/4 per call) of the time per task, ns, of short calls
    /// alone and of the caller's own tasks in short team calls (0: none yet).
    alone_ns: u64,
    team_ns: u64,
    /// The last call's wall time, ns.
    last_ns: u64,
    /// Calls since the last one that took the other way.
    streak: u32,
}

/// A call shorter than this may run alone (see [`Health`]).
const SHORT: Duration = Duration::from_micros(40);
const PROBE_EVERY: u32 = 64;

impl Health {
    /// Nothing measured yet.
    pub(super) const NEW: Health = Health {
        alone_ns: 0,
        team_ns: 0,
        last_ns: u64::MAX,
        streak: 0,
    };

    fn short(&self) -> bool {
        self.last_ns < SHORT.as_nanos() as u64
    }

    /// Whether short calls run alone, the team not paying on `threads` threads.
    fn team_loses(&self, threads: usize) -> bool {
        self.alone_ns > 0
            && self.team_ns > 0
            && 10 * self.team_ns > 9 * threads as u64 * self.alone_ns
    }

    /// Whether the next call runs on the caller alone.
    pub(super) fn alone_next(&self, threads: usize) -> bool {
        if !self.short() {
            return false;
        }
        if self.alone_ns == 0 {
            return true;
        }
        let loses = self.team_loses(threads);
        // Where the team loses, it is tried more often: a phase may be short.
        let every = if loses { PROBE_EVERY / 4 } else { PROBE_EVERY };
        let probe = self.streak + 1 >= every;
        loses != probe
    }

    /// After a call: alone or not, its time per task (own tasks in the team)
    /// and its wall time.
    pub(super) fn record(&mut self, threads: usize, alone: bool, task_ns: u64, wall_ns: u64) {
        let usual = self.short() && self.team_loses(threads) == alone;
        self.streak = if usual { self.streak + 1 } else { 0 };
        if self.short() {
            // A team task is counted at most 3x the time alone, so that one
            // preempted call does not weigh as several.
            let (avg, t) = match alone {
                true => (&mut self.alone_ns, task_ns),
                false if self.alone_ns > 0 => (&mut self.team_ns, task_ns.min(3 * self.alone_ns)),
                false => (&mut self.team_ns, task_ns),
            };
            *avg = if *avg == 0 { t } else { (3 * *avg + t) / 4 };
        }
        self.last_ns = wall_ns;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `calls` short calls of 6 us a task alone and `team_task` in the team;
    /// how many ran (alone, in the team).
    fn simulate(h: &mut Health, calls: u32, team_task: u64, wall: u64) -> (u32, u32) {
        let (mut alone, mut team) = (0, 0);
        for _ in 0..calls {
            let a = h.alone_next(2);
            h.record(2, a, if a { 6_000 } else { team_task }, wall);
            if a {
                alone += 1
            } else {
                team += 1
            }
        }
        (alone, team)
    }

    #[test]
    fn short_calls_run_alone_while_the_team_does_not_pay() {
        let mut h = Health {
            alone_ns: 0,
            team_ns: 0,
            last_ns: u64::MAX,
            streak: 0,
        };
        let short = SHORT.as_nanos() as u64 / 2;
        // The first call is long (nothing known): the team.
        assert!(!h.alone_next(2));
        h.record(2, false, 20_000, short);
        // A short call with no figure alone yet runs alone.
        assert!(h.alone_next(2));
        h.record(2, true, 6_000, short);
        // Team tasks at 8 us against 6 us alone: the team pays on 2 threads;
        // every PROBE_EVERY-th call runs alone all the same.
        let (alone, team) = simulate(&mut h, 4 * PROBE_EVERY, 8_000, short);
        assert_eq!(alone, 4, "{alone} alone, {team} in the team");
        // Team tasks at 20 us: short calls run alone, trying the team every
        // PROBE_EVERY-th call.
        h.team_ns = 20_000;
        let (alone, team) = simulate(&mut h, 4 * PROBE_EVERY, 20_000, short);
        assert_eq!(team, 16, "{alone} alone, {team} in the team");
        // A long call always takes the team, and a team that pays again
        // (probe tasks at 7 us) takes the short calls back.
        h.last_ns = 2 * SHORT.as_nanos() as u64;
        assert!(!h.alone_next(2));
        h.last_ns = short;
        simulate(&mut h, 8 * PROBE_EVERY, 7_000, short);
        assert!(!h.team_loses(2));
    }
}
