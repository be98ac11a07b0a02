//! Simulates long runs of incremental backups with change tracking that lies now and
//! then, using blockproof's own selection (`blockproof_core::verify::select`), and
//! tabulates how many runs each lie stays undetected against the coverage bound
//! `ceil(chunks / sampled per run)`.
//!
//! ```text
//! cargo run --release -p blockproof-core --example verification_sim -- [CHUNKS [RUNS [SEED]]]
//! ```
//!
//! Model: a disk of CHUNKS chunks; every run, CBT honestly reports a random 2% of the
//! chunks as changed (read, so confirmed) and, with probability 1/4, one more chunk
//! changes without being reported: a lie, which leaves the backup stale at that chunk
//! from this run on. Verification samples the budget among the chunks CBT called
//! unchanged, least recently confirmed first. A lie is *detected* when its chunk is
//! sampled; it is *masked* when CBT later reports a change of the same chunk first (the
//! backup is right again from then on, but the restore points in between stay wrong and
//! nothing flags them: the limit docs/VERIFICATION.md describes).

use blockproof_core::verify::select;
use rand::{Rng, SeedableRng};

struct Row {
    budget: f64,
    bound: u64,
    lies: u64,
    detected: u64,
    masked: u64,
    mean: f64,
    max: u64,
}

fn simulate(chunks: u64, runs: u32, budget: f64, seed: u64) -> Row {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let per_run = ((chunks as f64) * budget).round() as u64;
    let bound = chunks.div_ceil(per_run.max(1));
    let mut last = vec![1u32; chunks as usize]; // run 1: a full read
    let mut stale: Vec<Option<u32>> = vec![None; chunks as usize]; // run the lie began
    let (mut lies, mut detected, mut masked, mut total, mut max) = (0, 0, 0, 0u64, 0u64);
    for run in 2..=runs {
        // Honest changes: read and confirmed; a pending lie there is masked.
        let mut changed = vec![false; chunks as usize];
        for _ in 0..(chunks / 50) {
            let c = rng.gen_range(0..chunks) as usize;
            changed[c] = true;
            last[c] = run;
            if stale[c].take().is_some() {
                masked += 1;
            }
        }
        // The lie of this run, if any, on a chunk CBT reports unchanged.
        if rng.gen_bool(0.25) {
            let c = rng.gen_range(1..chunks) as usize;
            if !changed[c] && stale[c].is_none() {
                stale[c] = Some(run);
                lies += 1;
            }
        }
        // Candidates: runs of chunks CBT called unchanged.
        let mut candidates = Vec::new();
        let mut start = None;
        for c in 0..=chunks {
            let unchanged = c < chunks && !changed[c as usize];
            match (unchanged, start) {
                (true, None) => start = Some(c),
                (false, Some(s)) => {
                    candidates.push(s..c);
                    start = None;
                }
                _ => {}
            }
        }
        for c in select(&last, &candidates, Some(per_run), &mut rng) {
            last[c as usize] = run;
            if let Some(began) = stale[c as usize].take() {
                detected += 1;
                let took = u64::from(run - began) + 1;
                total += took;
                max = max.max(took);
            }
        }
    }
    Row { budget, bound, lies, detected, masked, mean: total as f64 / detected.max(1) as f64, max }
}

fn main() {
    let args: Vec<u64> = std::env::args().skip(1).map(|a| a.parse().expect("a number")).collect();
    let chunks = args.first().copied().unwrap_or(16384);
    let runs = args.get(1).copied().unwrap_or(400) as u32;
    let seed = args.get(2).copied().unwrap_or(1);
    println!(
        "{chunks} chunks ({} MiB at 64 KiB), {runs} runs, 2% honest changes per run, a lie in 1 run of 4",
        chunks / 16
    );
    println!();
    println!("| budget | bound (runs) | lies | detected | masked by a later reported change | still pending | mean runs to detection | max runs to detection | max ≤ bound |");
    println!("|---|---|---|---|---|---|---|---|---|");
    for budget in [0.01, 0.03, 0.05, 0.10, 0.25] {
        let r = simulate(chunks, runs, budget, seed);
        println!(
            "| {:.0}% | {} | {} | {} | {} | {} | {:.1} | {} | {} |",
            r.budget * 100.0,
            r.bound,
            r.lies,
            r.detected,
            r.masked,
            r.lies - r.detected - r.masked,
            r.mean,
            r.max,
            if r.max <= r.bound { "yes" } else { "NO" }
        );
    }
}
