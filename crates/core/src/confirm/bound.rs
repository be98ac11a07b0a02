//! The coverage of a disk's confirmation state after a run and its bound (docs/
//! VERIFICATION.md, "The bound"): from the groups' summed runs, no chunk visited.

use std::collections::BTreeMap;

use blockproof_format::manifest::{BoundBasis, Coverage, CutShort};

use super::ConfirmState;

impl ConfirmState<'_> {
    /// Coverage after run `run`, given how this run sampled (docs/VERIFICATION.md, "The
    /// bound"). From the groups' runs: no chunk is visited.
    pub fn coverage(&self, run: u32, sampling: &Sampling) -> Coverage {
        let chunks = self.chunks;
        let hist = self.histogram();
        let never = hist.get(&0).copied().unwrap_or(0);
        let oldest = hist.keys().copied().find(|&r| r > 0).unwrap_or(run);
        let (rate, bound) = sampling.rate(chunks);
        Coverage {
            chunks,
            never_confirmed: never,
            oldest_confirmed_runs_ago: u64::from(run.saturating_sub(oldest)),
            full_coverage_within_runs: rate.map_or(0, |r| self.bound(run, r, hist)),
            bound: Some(bound),
            sampled_per_run: rate,
            budget_chunks: sampling.budget_chunks,
            cut_short: sampling.cut_short,
        }
    }

    /// The bound `K` after run `run` if every later run samples at least `rate` chunks
    /// besides the first (which is compared every run and not counted): for a chunk last
    /// confirmed at run `v`, at most `p` other chunks (the first excluded) have been
    /// confirmed no later than it, and each later run in which it is not sampled samples
    /// `rate` of those `p`, which then leave that set for good — so it is confirmed again
    /// by the `⌊p / rate⌋ + 1`-th later run, `run − v + ⌊p / rate⌋ + 1` runs after `v`.
    /// `K` is the largest such gap: at least `⌈(chunks − 1) / rate⌉` (the steady state, from
    /// the chunks confirmed last), never below `oldest_confirmed_runs_ago + 1`. `hist`:
    /// every chunk's run, counted.
    fn bound(&self, run: u32, rate: u64, mut hist: BTreeMap<u32, u64>) -> u64 {
        if self.chunks <= 1 {
            return 1;
        }
        // The first chunk does not count.
        let first = self.get(0);
        if let Some(n) = hist.get_mut(&first) {
            *n -= 1;
            if *n == 0 {
                hist.remove(&first);
            }
        }
        // (The chunks confirmed last give the steady state, ⌈others / rate⌉.)
        let mut at_or_before = 0u64;
        let mut k = 1;
        for (&v, &n) in &hist {
            at_or_before += n;
            let p = at_or_before - 1;
            k = k.max(u64::from(run.saturating_sub(v)) + p / rate + 1);
        }
        k
    }
}

/// How one run sampled, for its coverage bound.
#[derive(Clone, Debug, Default)]
pub(crate) struct Sampling {
    /// Verification is off (`--verify none`).
    pub off: bool,
    /// The budget's count part in chunks per run, the first chunk not counted (`None`:
    /// no count part: `all`, or time only).
    pub budget_chunks: Option<u64>,
    /// Whether the budget has a time limit.
    pub timed: bool,
    /// Chunks sampled within the budget this run (the first chunk and chunks sampled as
    /// evidence not counted).
    pub sampled: u64,
    /// The time limit that stopped sampling before the count was reached.
    pub cut_short: Option<CutShort>,
}

impl Sampling {
    /// The rate the bound may assume for later runs, and what it rests on.
    fn rate(&self, chunks: u64) -> (Option<u64>, BoundBasis) {
        if self.off {
            return (None, BoundBasis::Off);
        }
        let (rate, basis) = match (self.budget_chunks, self.timed, self.cut_short) {
            // A count without a time limit: every run samples it (or every candidate).
            (Some(b), false, _) => (b, BoundBasis::Budget),
            // `all` without a time limit: every candidate, every run.
            (None, false, _) => (chunks.saturating_sub(1).max(1), BoundBasis::Budget),
            // A count reached under a time limit: a later run may be cut short, so the
            // bound assumes they reach it too.
            (Some(b), true, None) => (b, BoundBasis::Achieved),
            // A time limit decided: later runs are assumed to reach this run's sample.
            _ => (self.sampled, BoundBasis::Achieved),
        };
        if rate == 0 {
            (None, BoundBasis::None)
        } else {
            (Some(rate), basis)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn count(b: u64) -> Sampling {
        Sampling { budget_chunks: Some(b), sampled: b, ..Sampling::default() }
    }

    #[test]
    fn the_steady_state_bound_is_the_others_over_the_rate() {
        // 101 chunks: the first and 100 others.
        let mut s = ConfirmState::never(101);
        for c in 0..101 {
            s.confirm(c, 1);
        }
        assert_eq!(s.coverage(1, &count(25)).full_coverage_within_runs, 4);
        assert_eq!(s.coverage(1, &count(30)).full_coverage_within_runs, 4);
        assert_eq!(s.coverage(1, &count(100)).full_coverage_within_runs, 1);
        assert_eq!(s.coverage(1, &count(1000)).full_coverage_within_runs, 1);
        let off = s.coverage(1, &Sampling { off: true, ..Sampling::default() });
        assert_eq!((off.full_coverage_within_runs, off.bound), (0, Some(BoundBasis::Off)));
        let none = s.coverage(1, &count(0));
        assert_eq!((none.full_coverage_within_runs, none.bound), (0, Some(BoundBasis::None)));
        // Staggered as sampling leaves it: 25 others confirmed at each of runs 4..=7.
        for c in 1..101 {
            s.confirm(c, 4 + ((c - 1) / 25) as u32);
        }
        s.confirm(0, 7); // the first chunk, every run
        let c = s.coverage(7, &count(25));
        assert_eq!((c.oldest_confirmed_runs_ago, c.full_coverage_within_runs), (3, 4));
    }

    #[test]
    fn old_chunks_raise_the_bound_so_it_never_contradicts_the_state() {
        // A deadline cut runs short: 10 of 100 others are 9 runs old.
        let mut s = ConfirmState::never(101);
        for c in 0..101 {
            s.confirm(c, if (1..11).contains(&c) { 1 } else { 10 });
        }
        let cut = Sampling {
            budget_chunks: Some(25),
            timed: true,
            sampled: 5,
            cut_short: Some(CutShort::Deadline),
            ..Sampling::default()
        };
        let c = s.coverage(10, &cut);
        assert_eq!(c.bound, Some(BoundBasis::Achieved));
        assert_eq!(c.sampled_per_run, Some(5));
        // The 10 old ones: 9 runs old, 9 others at or before them → next sampled within
        // ⌊9 / 5⌋ + 1 = 2 runs: 11. The rest: ⌈100 / 5⌉ = 20.
        assert_eq!(c.full_coverage_within_runs, 20);
        assert!(c.full_coverage_within_runs > c.oldest_confirmed_runs_ago);
        // With the count honoured, the age still shows: 9 + ⌊9/25⌋ + 1 = 10 > ⌈100/25⌉.
        assert_eq!(s.coverage(10, &count(25)).full_coverage_within_runs, 10);
    }

    #[test]
    fn a_lone_first_chunk_and_never_confirmed_chunks() {
        assert_eq!(ConfirmState::never(1).coverage(3, &count(5)).full_coverage_within_runs, 1);
        let c = ConfirmState::never(11).coverage(2, &count(5));
        assert_eq!((c.never_confirmed, c.full_coverage_within_runs), (11, 2 + 9 / 5 + 1));
    }

    /// The property behind `full_coverage_within_runs`: after every run `r`, every chunk is
    /// confirmed again no later than `last_r[c] + K_r`, over random disk sizes, budgets,
    /// change patterns and runs whose time limit cut the sample — for a `budget` bound
    /// always, for an `achieved` one as long as later runs sample at least as much (the
    /// condition it states). A lie — a chunk left stale — is detected when the chunk is
    /// next sampled, so this bounds detection too. 400 random cases.
    #[test]
    fn the_bound_holds_for_random_budgets_disks_changes_and_cuts() {
        use rand::{Rng, SeedableRng};
        for seed in 0..400u64 {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let n = rng.gen_range(1..300u64);
            let others = n.saturating_sub(1).max(1);
            let budget = rng.gen_range(1..=others);
            let change = rng.gen_range(0.0..0.3);
            let timed = rng.gen_bool(0.4);
            let runs = 40u32;
            let mut state = ConfirmState::never(n);
            // Run 1: a full read.
            (0..n).for_each(|c| state.confirm(c, 1));
            // (run, K, rate, basis, last) after each run.
            let mut history: Vec<(u32, u64, u64, BoundBasis, Vec<u32>)> = Vec::new();
            let mut samples = vec![0u64; runs as usize + 1];
            for run in 2..=runs {
                // Changes change tracking reports: read, so confirmed.
                let changed: Vec<u64> = (0..n).filter(|_| rng.gen_bool(change)).collect();
                let unread = crate::verify::tests_support::runs_without(n, &changed);
                // A time limit may cut the count short.
                let cut = timed && rng.gen_bool(0.5);
                let take = if cut { rng.gen_range(0..=budget) } else { budget };
                let picked = crate::verify::select(&state, &unread, Some(take), &mut rng);
                for &c in changed.iter().chain(&picked) {
                    state.confirm(c, run);
                }
                let sampled = picked.iter().filter(|&&c| c != 0).count() as u64;
                samples[run as usize] = sampled;
                let sampling = Sampling {
                    off: false,
                    budget_chunks: Some(budget),
                    timed,
                    sampled,
                    cut_short: (cut && sampled < budget && sampled < unread_len(&unread, 0))
                        .then_some(CutShort::Deadline),
                };
                let cov = state.coverage(run, &sampling);
                assert!(
                    cov.full_coverage_within_runs == 0 || cov.full_coverage_within_runs > cov.oldest_confirmed_runs_ago,
                    "seed {seed}: a bound below the state's age"
                );
                history.push((
                    run,
                    cov.full_coverage_within_runs,
                    cov.sampled_per_run.unwrap_or(0),
                    cov.bound.unwrap(),
                    state.all(),
                ));
                // Check every earlier claim whose deadline is this run.
                for (r, k, rate, basis, last) in &history {
                    if *k == 0 {
                        continue;
                    }
                    let kept = *basis == BoundBasis::Budget
                        || samples[(*r as usize + 1)..=run as usize].iter().all(|&s| s >= *rate);
                    if !kept {
                        continue;
                    }
                    for (c, &was) in last.iter().enumerate().skip(1) {
                        let due = u64::from(was) + k;
                        if u64::from(run) == due {
                            assert!(
                                state.get(c as u64) > was,
                                "seed {seed}: chunk {c} confirmed at run {was} not again by run {run} (K {k} after \
                                 run {r}, n {n}, budget {budget}, rate {rate}, {basis:?})"
                            );
                        }
                    }
                }
            }
        }
    }

    fn unread_len(runs: &[std::ops::Range<u64>], skip_first: u64) -> u64 {
        runs.iter().map(|r| r.end - r.start).sum::<u64>().saturating_sub(skip_first)
    }
}
