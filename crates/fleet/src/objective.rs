//! Detection objectives: `detect_within = "7d"` instead of a budget.
//!
//! With `r` runs a day and an objective of `D` days, docs/VERIFICATION.md ("Choosing a
//! budget") gives `budget ≥ 1 / (D × r)`. The job uses exactly `1 / R` with `R = ⌊D × r⌋`
//! runs inside the objective: each run then samples `⌈N / R⌉` chunks of a disk of `N`,
//! so in the steady state every chunk is confirmed within `⌈(N − 1) / ⌈N / R⌉⌉ ≤ R` runs.
//! Whether it holds after a run is read off the bound the run reported: it holds when
//! `full_coverage_within_runs ≤ R` and the bound rests on the budget; when it is
//! `achieved` (a time limit decided how much was sampled) it holds only as long as later
//! runs sample as much — the report says so; with no bound it does not hold.

use std::time::Duration;

use blockproof_core::{Budget, Coverage};
use blockproof_format::manifest::BoundBasis;
use serde::Serialize;

use crate::schedule::Schedule;

/// A detection objective and what it means on a schedule.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Objective {
    /// As written (`7d`).
    pub within: String,
    #[serde(skip)]
    pub duration: Duration,
    pub runs_per_day: u64,
    /// Runs inside the objective, `⌊D × r⌋`: the bound must not exceed it.
    pub runs: u64,
    /// The budget derived, a share of each disk per run (`1 / runs`).
    pub fraction: f64,
}

impl Objective {
    /// The objective `within` on `schedule`; an error when no run fits inside it.
    pub fn new(within: &str, duration: Duration, schedule: &Schedule) -> Result<Self, String> {
        let runs = duration.as_secs() / schedule.interval().as_secs();
        if runs == 0 {
            return Err(format!(
                "detect_within = {within:?} is shorter than the interval between runs ({} h): no run falls inside it",
                schedule.every_hours
            ));
        }
        Ok(Objective {
            within: within.to_string(),
            duration,
            runs_per_day: schedule.runs_per_day(),
            runs,
            fraction: 1.0 / runs as f64,
        })
    }

    /// The verification budget that meets it.
    pub fn budget(&self) -> Budget {
        Budget { fraction: Some(self.fraction), ..Budget::default() }
    }

    /// The budget as a person would write it (`14.3%`, rounded up).
    pub fn budget_text(&self) -> String {
        let per_mille = (self.fraction * 1000.0).ceil() as u64;
        format!("{}.{}%", per_mille / 10, per_mille % 10)
    }

    /// Whether a disk's coverage after a run meets the objective.
    pub fn assess(&self, c: &Coverage) -> Assessment {
        let k = c.full_coverage_within_runs;
        let (verdict, why) = match c.bound {
            Some(BoundBasis::Off) => (Verdict::Missed, "verification is off".to_string()),
            Some(BoundBasis::None) => (Verdict::Missed, "there is no bound: only the first chunk was compared".into()),
            _ if k == 0 => (Verdict::Missed, "there is no bound".into()),
            _ if k > self.runs => (
                Verdict::Missed,
                format!(
                    "every chunk is confirmed within {k} runs, more than the {} runs of {}",
                    self.runs, self.within
                ),
            ),
            Some(BoundBasis::Achieved) => (
                Verdict::Conditional,
                format!(
                    "every chunk is confirmed within {k} of the {} runs of {} if each later run compares at least {} \
                     chunks (a time limit decides how many)",
                    self.runs,
                    self.within,
                    c.sampled_per_run.unwrap_or(0)
                ),
            ),
            _ => (
                Verdict::Holds,
                format!("every chunk is confirmed within {k} of the {} runs of {}", self.runs, self.within),
            ),
        };
        Assessment { verdict, bound_runs: k, objective_runs: self.runs, text: why }
    }
}

/// Whether a detection objective holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// The bound rests on the budget and is within the objective.
    Holds,
    /// The bound is within the objective but `achieved`: it holds while later runs sample
    /// as much as this one.
    Conditional,
    /// The bound exceeds the objective, or there is none.
    Missed,
}

/// A disk's coverage against its objective.
#[derive(Clone, Debug, Serialize)]
pub struct Assessment {
    pub verdict: Verdict,
    pub bound_runs: u64,
    pub objective_runs: u64,
    pub text: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schedule(hours: u64) -> Schedule {
        Schedule::new(Duration::from_secs(hours * 3600), "01:00", None).unwrap()
    }

    fn coverage(k: u64, bound: BoundBasis) -> Coverage {
        Coverage {
            chunks: 100,
            never_confirmed: 0,
            oldest_confirmed_runs_ago: 0,
            full_coverage_within_runs: k,
            bound: Some(bound),
            sampled_per_run: Some(15),
            budget_chunks: Some(15),
            cut_short: None,
        }
    }

    #[test]
    fn the_documented_table() {
        // docs/VERIFICATION.md: nightly, one week → 15%; 4 a day, two weeks → 2%;
        // hourly, one month → 0.2%. The job uses exactly 1 / runs, which the table rounds.
        let week = Duration::from_secs(7 * 86400);
        let o = Objective::new("7d", week, &schedule(24)).unwrap();
        assert_eq!((o.runs, o.budget_text().as_str()), (7, "14.3%"));
        let o = Objective::new("14d", 2 * week, &schedule(6)).unwrap();
        assert_eq!((o.runs, o.budget_text().as_str()), (56, "1.8%"));
        let o = Objective::new("30d", Duration::from_secs(30 * 86400), &schedule(1)).unwrap();
        assert_eq!((o.runs, o.budget_text().as_str()), (720, "0.2%"));
        assert!(Objective::new("12h", Duration::from_secs(12 * 3600), &schedule(24)).is_err());
    }

    #[test]
    fn the_budget_meets_the_objective_for_every_disk_size() {
        for runs in 1..40u64 {
            let fraction = 1.0 / runs as f64;
            for n in 1..500u64 {
                let per_run = (n as f64 * fraction).ceil() as u64; // Budget::byte_limit's rounding
                let k = (n - 1).div_ceil(per_run.max(1)).max(1);
                assert!(k <= runs, "runs {runs}, n {n}: k {k}");
            }
        }
    }

    #[test]
    fn assessments() {
        let o = Objective::new("7d", Duration::from_secs(7 * 86400), &schedule(24)).unwrap();
        assert_eq!(o.assess(&coverage(7, BoundBasis::Budget)).verdict, Verdict::Holds);
        assert_eq!(o.assess(&coverage(8, BoundBasis::Budget)).verdict, Verdict::Missed);
        let c = o.assess(&coverage(5, BoundBasis::Achieved));
        assert_eq!(c.verdict, Verdict::Conditional);
        assert!(c.text.contains("if each later run compares at least 15 chunks"), "{}", c.text);
        assert_eq!(o.assess(&coverage(0, BoundBasis::None)).verdict, Verdict::Missed);
        assert_eq!(o.assess(&coverage(0, BoundBasis::Off)).verdict, Verdict::Missed);
    }
}
