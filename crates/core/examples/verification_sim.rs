//! Simulates long runs of incremental backups whose change tracking (CBT) lies now and
//! then, sampled with blockproof's own selection (`blockproof_core::verify::select`, the
//! budget turned into chunks by `verify::chunk_limit`), and prints four Markdown tables
//! (docs/VERIFICATION.md, "Simulation", shows them):
//!
//! 1. runs to detection against the coverage bound (single-chunk lies, the original model);
//! 2. lies that span extents: what escalation adds to what a detection reports;
//! 3. a write-locality model, and a strategy that spends part of the budget next to the
//!    extents CBT reported, against the same share spent on random chunks;
//! 4. the spatial layout of the sample: ties broken by segments (as blockproof does) or
//!    by chunks.
//!
//! ```text
//! cargo run --release -p blockproof-core --example verification_sim -- [CHUNKS [RUNS [SEED [SEEDS]]]]
//! ```
//!
//! Defaults: 16384 chunks (1 GiB of 64 KiB chunks), 400 runs, seed 1, 4 seeds. Table 1 is
//! one simulation (seed SEED); every row of tables 2–4 adds up SEEDS simulations (seeds
//! SEED, SEED + 1, ...).
//!
//! # Models
//!
//! **Disk and runs.** A disk of CHUNKS chunks. Run 1 is a full read (every chunk is
//! confirmed at run 1); runs 2..=RUNS are incrementals.
//!
//! **Honest changes.** Every run, CBT reports about 2% of the chunks as changed: extents of
//! 1..=H adjacent chunks (uniform length) at uniform positions, `⌊CHUNKS / 50⌋ · 2 / (H + 1)`
//! of them. Reported chunks are read, so confirmed. H = 1 in table 1, 16 in tables 2–4.
//!
//! **Lies.** With probability P per run, an extent of 1..=L adjacent chunks changes
//! without CBT reporting it: the backup is stale there from this run on. Chunk 0 (compared
//! every run), chunks CBT reported in the same run (read, so right) and chunks already
//! stale from an earlier lie are not part of it; a lie left with no chunk is not counted.
//! Table 1: P = 1/4, L = 1. Tables 2–4: P = 1, L = 16 (missed writes span extents).
//! **Placement** is uniform, or, in the write-locality model of table 3, with probability
//! Q *near* an extent CBT reported in the same run — a gap of 0..G chunks before or after
//! it (G = 128: within two segments; G = 8: adjacent) — else uniform.
//!
//! **Verification.** Among the chunks CBT did not report: chunk 0 (on top of the budget)
//! and the budget's B chunks, least recently confirmed first (`select`; ties broken by
//! segments of 64 chunks in random order). Sampled chunks are confirmed. Table 3 spends
//! ⌊f·B⌋ of the B first on other picks, and `select` picks the other B − ⌊f·B⌋ among the
//! remaining candidates: *near* picks are the unread chunks nearest to the extents CBT
//! reported in this run (every chunk at distance 1 from an extent, then distance 2, ...;
//! random order within a distance); *random* picks, the control, are uniform among the
//! unread chunks. Table 4 also runs `select` on a randomly permuted chunk numbering (chunk
//! 0 kept first), so that its ties are broken by chunks scattered over the disk instead
//! of by runs of 64 adjacent ones; its ordering rule is unchanged.
//!
//! **Outcomes.** A lie is *detected* at the first run that samples one of its stale chunks;
//! runs to detection = that run − the lie's run + 1 (a lie sampled in its own run takes 1).
//! A stale chunk is *masked* when CBT reports a later change of it before the lie is
//! detected (the backup is right again there, the restore points in between stay wrong and
//! nothing flags them); a lie all of whose chunks are masked is masked. A lie neither
//! detected nor masked by the last run is *pending*. At a detection, the stale chunks
//! *reported* (listed in `mismatches`) are the sampled ones, or with **escalation** also
//! those it finds — the rule of `blockproof_core::verification`: the segment of 64 chunks
//! of every differing chunk and its two neighbours are compared (unread chunks not yet
//! compared), again around every chunk found differing, up to `ESCALATION_LIMIT` chunks.
//! The run after a detection is a full read (CBT is no longer trusted), so the stale chunks
//! a detection did not report are overwritten unreported, like masked ones.
//!
//! **Independence.** Lies never change what is sampled: each lie is followed as if it were
//! the only one on the disk, on the history of honest changes and samples (a detection's
//! escalation and full read are not applied to that history). So one history can carry a
//! lie per run without the lies disturbing each other, and every lie is a fair sample.
//! The history (honest changes, lies) draws from its own random stream, `select`'s
//! tie-break and the other picks from theirs: settings compared with the same seed (the
//! paired cells of tables 3 and 4) run on the same history of changes and lies.
//!
//! **Bound.** With B chunks a run (chunk 0 aside) least recently confirmed first, every
//! chunk is confirmed within K = ⌈(CHUNKS − 1) / B⌉ runs — the steady-state
//! `full_coverage_within_runs` (docs/VERIFICATION.md has the proof) — so a lie is detected
//! within K runs unless masked first. With ⌊f·B⌋ chunks a run spent otherwise, only
//! B − ⌊f·B⌋ are least recently confirmed: the guarantee weakens to ⌈(CHUNKS − 1) / (B − ⌊f·B⌋)⌉.

use std::collections::HashSet;
use std::ops::Range;

use blockproof_core::verification::ESCALATION_LIMIT;
use blockproof_core::verify::{chunk_limit, select, SEGMENT};
use blockproof_core::Budget;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

/// The chunk size the budgets are computed with (64 KiB, the default).
const CHUNK_SIZE: u32 = 65536;

/// Budgets of tables 1, 2 and 4 (table 3 uses 1%, 5% and 25%).
const BUDGETS: [&str; 5] = ["1%", "3%", "5%", "10%", "25%"];

/// Where lies land: with probability `near`, `0..gap` chunks before or after an extent CBT
/// reported in the same run; else uniformly.
#[derive(Clone, Copy)]
struct Placement {
    near: f64,
    gap: u64,
}

const UNIFORM: Placement = Placement { near: 0.0, gap: 0 };

/// What the share of the budget taken from the least-recently-confirmed order goes to.
#[derive(Clone, Copy)]
enum Picks {
    /// The unread chunks nearest to this run's reported extents.
    Near,
    /// Uniformly random unread chunks (the control).
    Random,
}

/// One simulated setting.
#[derive(Clone, Copy)]
struct Model {
    /// Honest extents are 1..=`honest_len` chunks.
    honest_len: u64,
    /// Probability of a lie per run.
    lie_chance: f64,
    /// Lies are 1..=`lie_len` chunks.
    lie_len: u64,
    placement: Placement,
    /// The fraction f of the budget spent on `picks` instead.
    share: f64,
    picks: Picks,
    /// `select` runs on a randomly permuted chunk numbering (ties broken by chunks).
    scatter: bool,
}

/// The original model (table 1): single chunks, a lie in one run of four.
const SINGLE: Model = Model {
    honest_len: 1,
    lie_chance: 0.25,
    lie_len: 1,
    placement: UNIFORM,
    share: 0.0,
    picks: Picks::Near,
    scatter: false,
};

/// Writes and lies that span extents, a lie every run (tables 2–4).
const EXTENTS: Model = Model { honest_len: 16, lie_chance: 1.0, lie_len: 16, ..SINGLE };

/// A lie being followed.
struct Lie {
    began: u32,
    chunks: Vec<u64>,
    /// Chunks still stale (not masked).
    stale: u64,
}

/// What simulations found (added up over seeds).
#[derive(Default)]
struct Tally {
    lies: u64,
    detected: u64,
    masked: u64,
    pending: u64,
    /// Sum and maximum of runs to detection.
    runs_sum: u64,
    runs_max: u64,
    /// Detections in the lie's own run.
    same_run: u64,
    /// Stale chunks, and their fates.
    stale_chunks: u64,
    masked_chunks: u64,
    reported_sampled: u64,
    reported_escalated: u64,
    pending_chunks: u64,
    /// Chunks the escalation compared, over all detections.
    escalation_reads: u64,
}

impl Tally {
    fn mean(&self) -> f64 {
        self.runs_sum as f64 / self.detected.max(1) as f64
    }
}

/// Chunks per run the budget samples besides chunk 0 (`chunk_limit`, as the backup does).
fn budget_chunks(budget: &str, chunks: u64) -> u64 {
    let b = Budget::parse(budget).expect("a valid budget");
    chunk_limit(&b, chunks, CHUNK_SIZE).expect("a count budget")
}

/// The split of `b` chunks a run: (least recently confirmed, other picks).
fn split(b: u64, share: f64) -> (u64, u64) {
    let other = ((b as f64) * share).floor() as u64;
    (b - other, other)
}

/// The guaranteed bound with `lrc` chunks a run least recently confirmed.
fn bound(chunks: u64, lrc: u64) -> u64 {
    (chunks - 1).div_ceil(lrc.max(1))
}

/// One disk's history: the state the selection sees, and the lies followed on it.
struct Sim<'t> {
    chunks: u64,
    model: Model,
    rng: StdRng,
    /// For the picks besides `select` and the permutation, and `ties` for `select`'s
    /// tie-break, so that they leave the draws of the history (changes, lies) as they are:
    /// settings compared with the same seed see the same history.
    aside: StdRng,
    ties: StdRng,
    /// Last-confirmed run per chunk.
    last: Vec<u32>,
    /// The run that last reported / sampled each chunk (stamps: nothing to clear).
    changed: Vec<u32>,
    sampled: Vec<u32>,
    /// The lie (index + 1) a chunk is stale from; 0: none.
    owner: Vec<u32>,
    lies: Vec<Lie>,
    /// Lies neither detected nor masked yet (indices).
    open: Vec<usize>,
    /// With `scatter`: the chunk at each position of the permuted numbering.
    chunk_at: Option<Vec<u64>>,
    t: &'t mut Tally,
}

impl<'t> Sim<'t> {
    fn new(chunks: u64, model: Model, seed: u64, t: &'t mut Tally) -> Self {
        let n = chunks as usize;
        let mut aside = StdRng::seed_from_u64(seed ^ (1 << 32));
        let chunk_at = model.scatter.then(|| {
            let mut p: Vec<u64> = (0..chunks).collect();
            p[1..].shuffle(&mut aside);
            p
        });
        Sim {
            chunks,
            model,
            rng: StdRng::seed_from_u64(seed),
            aside,
            ties: StdRng::seed_from_u64(seed ^ (2 << 32)),
            last: vec![1; n],
            changed: vec![0; n],
            sampled: vec![0; n],
            owner: vec![0; n],
            lies: Vec::new(),
            open: Vec::new(),
            chunk_at,
            t,
        }
    }

    /// Runs 2..=`runs` with `b` chunks sampled per run besides chunk 0.
    fn run(mut self, runs: u32, b: u64) {
        let (lrc, other) = split(b, self.model.share);
        for run in 2..=runs {
            let extents = self.honest_changes(run);
            self.inject_lie(run, &extents);
            let mut picked = match self.model.picks {
                Picks::Near => self.near_reported(run, &extents, other),
                Picks::Random => self.random_unread(run, other),
            };
            picked.extend(self.least_recently_confirmed(run, lrc));
            for &c in &picked {
                self.sampled[c as usize] = run;
                self.last[c as usize] = run;
            }
            self.detect(run, &picked);
        }
        for &k in &self.open {
            self.t.pending += 1;
            self.t.pending_chunks += self.lies[k].stale;
        }
    }

    /// CBT reports this run's honest extents: read and confirmed; stale chunks there are
    /// masked. Returns the extents.
    fn honest_changes(&mut self, run: u32) -> Vec<Range<u64>> {
        let h = self.model.honest_len;
        let count = (self.chunks / 50) * 2 / (h + 1);
        let mut extents = Vec::with_capacity(count as usize);
        for _ in 0..count {
            let start = self.rng.gen_range(0..self.chunks);
            let len = self.length(h);
            let end = (start + len).min(self.chunks);
            for c in start..end {
                let i = c as usize;
                self.changed[i] = run;
                self.last[i] = run;
                if let Some(k) = self.owner[i].checked_sub(1) {
                    self.owner[i] = 0;
                    self.lies[k as usize].stale -= 1;
                    self.t.masked_chunks += 1;
                }
            }
            extents.push(start..end);
        }
        // Lies all of whose chunks were overwritten are masked.
        let (lies, t) = (&self.lies, &mut *self.t);
        self.open.retain(|&k| {
            let gone = lies[k].stale == 0;
            t.masked += u64::from(gone);
            !gone
        });
        extents
    }

    /// With probability `lie_chance`, an extent changes without being reported.
    fn inject_lie(&mut self, run: u32, extents: &[Range<u64>]) {
        if !self.rng.gen_bool(self.model.lie_chance) {
            return;
        }
        let len = self.length(self.model.lie_len);
        let p = self.model.placement;
        let start = if p.near > 0.0 && !extents.is_empty() && self.rng.gen_bool(p.near) {
            let e = &extents[self.rng.gen_range(0..extents.len())];
            let gap = self.rng.gen_range(0..p.gap);
            if self.rng.gen_bool(0.5) {
                e.start.saturating_sub(gap + len).max(1)
            } else {
                e.end + gap
            }
        } else {
            self.rng.gen_range(1..self.chunks)
        };
        let id = self.lies.len() as u32 + 1;
        let mut chunks = Vec::new();
        for c in start..(start + len).min(self.chunks) {
            let i = c as usize;
            if c != 0 && self.changed[i] != run && self.owner[i] == 0 {
                self.owner[i] = id;
                chunks.push(c);
            }
        }
        if chunks.is_empty() {
            return;
        }
        self.t.lies += 1;
        self.t.stale_chunks += chunks.len() as u64;
        self.open.push(self.lies.len());
        self.lies.push(Lie { began: run, stale: chunks.len() as u64, chunks });
    }

    /// A length of 1..=`max` chunks (no draw when `max` is 1).
    fn length(&mut self, max: u64) -> u64 {
        if max > 1 {
            self.rng.gen_range(1..=max)
        } else {
            1
        }
    }

    /// Whether chunk `c` may still be picked in this run (not chunk 0, not read, not picked).
    fn free(&self, run: u32, c: u64) -> bool {
        let i = c as usize;
        c != 0 && c < self.chunks && self.changed[i] != run && self.sampled[i] != run
    }

    /// Up to `want` unread chunks nearest to this run's reported extents, by distance,
    /// random within a distance. Marks them sampled.
    fn near_reported(&mut self, run: u32, extents: &[Range<u64>], want: u64) -> Vec<u64> {
        let mut out = Vec::new();
        let mut d = 1;
        while (out.len() as u64) < want && d < self.chunks && !extents.is_empty() {
            let mut ring: Vec<u64> = extents
                .iter()
                .flat_map(|e| [e.start.checked_sub(d), Some(e.end - 1 + d)])
                .flatten()
                .filter(|&c| self.free(run, c))
                .collect();
            ring.sort_unstable();
            ring.dedup();
            ring.shuffle(&mut self.aside);
            ring.truncate((want - out.len() as u64) as usize);
            for &c in &ring {
                self.sampled[c as usize] = run;
            }
            out.extend(ring);
            d += 1;
        }
        out
    }

    /// Up to `want` uniformly random unread chunks. Marks them sampled.
    fn random_unread(&mut self, run: u32, want: u64) -> Vec<u64> {
        let mut out = Vec::new();
        while (out.len() as u64) < want {
            let c = self.aside.gen_range(1..self.chunks);
            if self.free(run, c) {
                self.sampled[c as usize] = run;
                out.push(c);
            }
        }
        out
    }

    /// `select` among the chunks neither reported nor picked yet in this run: `lrc`
    /// chunks and chunk 0. With `scatter`, on the permuted numbering.
    fn least_recently_confirmed(&mut self, run: u32, lrc: u64) -> Vec<u64> {
        let at = |p: u64| self.chunk_at.as_ref().map_or(p, |m| m[p as usize]);
        let mut candidates = Vec::new();
        let mut start = None;
        for p in 0..=self.chunks {
            let free = p < self.chunks && {
                let c = at(p) as usize;
                self.changed[c] != run && self.sampled[c] != run
            };
            match (free, start) {
                (true, None) => start = Some(p),
                (false, Some(s)) => {
                    candidates.push(s..p);
                    start = None;
                }
                _ => {}
            }
        }
        match &self.chunk_at {
            None => select(&self.last[..], &candidates, Some(lrc), &mut self.ties),
            Some(m) => {
                let last: Vec<u32> = m.iter().map(|&c| self.last[c as usize]).collect();
                let picked = select(&last[..], &candidates, Some(lrc), &mut self.ties);
                picked.into_iter().map(|p| m[p as usize]).collect()
            }
        }
    }

    /// Lies whose stale chunks were sampled are detected: what is reported with and
    /// without escalation; the rest is overwritten by the next run's full read.
    fn detect(&mut self, run: u32, picked: &[u64]) {
        let mut hit: Vec<u32> =
            picked.iter().filter(|&&c| self.owner[c as usize] != 0).map(|&c| self.owner[c as usize]).collect();
        hit.sort_unstable();
        hit.dedup();
        for id in hit {
            let k = id as usize - 1;
            let stale: Vec<u64> =
                self.lies[k].chunks.iter().copied().filter(|&c| self.owner[c as usize] == id).collect();
            let sampled: Vec<u64> = stale.iter().copied().filter(|&c| self.sampled[c as usize] == run).collect();
            let (found, reads) = self.escalate(run, id, &sampled);
            let took = u64::from(run - self.lies[k].began) + 1;
            let t = &mut *self.t;
            t.detected += 1;
            t.runs_sum += took;
            t.runs_max = t.runs_max.max(took);
            t.same_run += u64::from(took == 1);
            t.reported_sampled += sampled.len() as u64;
            t.reported_escalated += (sampled.len() + found) as u64;
            t.escalation_reads += reads;
            for c in stale {
                self.owner[c as usize] = 0;
            }
            self.open.retain(|&o| o != k);
        }
    }

    /// The escalation of `blockproof_core::verification` around the chunks of lie `id`
    /// that sampling found differing: returns (stale chunks it found, chunks it compared).
    fn escalate(&self, run: u32, id: u32, differing: &[u64]) -> (usize, u64) {
        let mut compared: HashSet<u64> = HashSet::new();
        let mut differing = differing.to_vec();
        let (mut found, mut reads) = (0usize, 0u64);
        while !differing.is_empty() {
            let mut queued = Vec::new();
            for &c in &differing {
                let seg = c / SEGMENT * SEGMENT;
                let around = (seg..(seg + SEGMENT).min(self.chunks)).chain([c.saturating_sub(1), c + 1]);
                // Unread (not reported this run) and not compared yet.
                queued.extend(around.filter(|&n| self.free(run, n) && compared.insert(n)));
            }
            queued.sort_unstable();
            let room = ESCALATION_LIMIT - reads;
            let limited = queued.len() as u64 > room;
            queued.truncate(room as usize);
            reads += queued.len() as u64;
            differing = queued.into_iter().filter(|&c| self.owner[c as usize] == id).collect();
            found += differing.len();
            if limited {
                break;
            }
        }
        (found, reads)
    }
}

/// The parameters shared by every table.
struct Setup {
    chunks: u64,
    runs: u32,
    /// Seeds added up in a row of tables 2–4.
    seeds: Range<u64>,
}

impl Setup {
    /// The budget's chunks a run (besides chunk 0) and its bound K.
    fn budget(&self, budget: &str) -> (u64, u64) {
        let b = budget_chunks(budget, self.chunks);
        (b, bound(self.chunks, b))
    }

    /// Adds up the simulations of `model` with `b` chunks a run over `seeds`.
    fn simulate(&self, model: Model, b: u64, seeds: Range<u64>) -> Tally {
        let mut t = Tally::default();
        for s in seeds {
            Sim::new(self.chunks, model, s, &mut t).run(self.runs, b);
        }
        t
    }

    /// A table's title and header row (`columns` separated by `|`).
    fn header(&self, title: &str, seeds: &Range<u64>, columns: &str) {
        let (s, e) = (seeds.start, seeds.end - 1);
        let seeds = if s == e { format!("seed {s}") } else { format!("seeds {s}..={e}") };
        println!("### {title} ({} chunks, {} runs, {seeds})\n", self.chunks, self.runs);
        println!("| {columns} |\n|{}", "---|".repeat(columns.split('|').count()));
    }
}

fn pct(part: u64, whole: u64) -> String {
    format!("{:.1}%", 100.0 * part as f64 / whole.max(1) as f64)
}

fn yes(ok: bool) -> String {
    (if ok { "yes" } else { "NO" }).to_string()
}

/// One cell for several tallies: their values joined by " / ".
fn cell(ts: &[Tally], f: impl Fn(&Tally) -> String) -> String {
    ts.iter().map(f).collect::<Vec<_>>().join(" / ")
}

/// Table 1: the original model, runs to detection against the bound (one seed).
fn table_single(setup: &Setup) {
    let seeds = setup.seeds.start..setup.seeds.start + 1;
    setup.header(
        "1. Runs to detection, single chunks",
        &seeds,
        "budget | chunks a run | bound K (runs) | lies | detected | masked by a later reported change | still \
         pending | mean runs to detection | max runs to detection | max ≤ K",
    );
    for budget in BUDGETS {
        let (b, k) = setup.budget(budget);
        let t = setup.simulate(SINGLE, b, seeds.clone());
        println!(
            "| {budget} | {b} | {k} | {} | {} | {} | {} | {:.1} | {} | {} |",
            t.lies,
            t.detected,
            t.masked,
            t.pending,
            t.mean(),
            t.runs_max,
            yes(t.runs_max <= k)
        );
    }
    println!();
}

/// Table 2: lies spanning extents, what a detection reports with and without escalation.
fn table_extents(setup: &Setup) {
    setup.header(
        "2. Lies spanning extents: escalation",
        &setup.seeds,
        "budget | K | lies | lies detected | lies masked | lies pending | mean / max runs to detection | stale \
         chunks | chunks masked | chunks reported without escalation | chunks reported with escalation | chunks \
         left unreported (then rewritten by the full read): without / with escalation | chunks pending | chunks \
         compared by the escalation per detection",
    );
    for budget in BUDGETS {
        let (b, k) = setup.budget(budget);
        let t = setup.simulate(EXTENTS, b, setup.seeds.clone());
        let (lies, n, over) = (t.lies, t.stale_chunks, if t.runs_max <= k { "" } else { " (over K!)" });
        let (l, c) = (|x| pct(x, lies), |x| pct(x, n));
        let left = |reported: u64| c(n - t.masked_chunks - t.pending_chunks - reported);
        let per_detection = t.escalation_reads as f64 / t.detected.max(1) as f64;
        println!(
            "| {budget} | {k} | {lies} | {} | {} | {} | {:.1} / {}{over} | {n} | {} | {} | {} | {} / {} | {} | \
             {per_detection:.0} |",
            l(t.detected),
            l(t.masked),
            l(t.pending),
            t.mean(),
            t.runs_max,
            c(t.masked_chunks),
            c(t.reported_sampled),
            c(t.reported_escalated),
            left(t.reported_sampled),
            left(t.reported_escalated),
            c(t.pending_chunks),
        );
    }
    println!();
}

/// The columns tables 3 and 4 share, for one or two tallies, against bound `k`.
fn outcome_cells(ts: &[Tally], k: u64) -> String {
    [
        cell(ts, |t| pct(t.detected, t.lies)),
        cell(ts, |t| pct(t.masked, t.lies)),
        cell(ts, |t| pct(t.same_run, t.lies)),
        cell(ts, |t| format!("{:.2}", t.mean())),
        cell(ts, |t| t.runs_max.to_string()),
        cell(ts, |t| yes(t.runs_max <= k)),
    ]
    .join(" | ")
}

const OUTCOMES: &str =
    "detected | masked | detected in the lie's own run | mean runs to detection | max runs to detection | max ≤ bound";

/// Table 3: the write-locality model; a share of the budget near reported extents, or on
/// random chunks (the control).
fn table_locality(setup: &Setup) {
    let columns =
        format!("lies placed | budget | f | least recently confirmed a run | bound | {OUTCOMES} | max ≤ K of f = 0");
    setup.header(
        "3. Write locality: a share f of the budget near reported extents / on random chunks",
        &setup.seeds,
        &columns,
    );
    let placements = [
        ("uniform", UNIFORM),
        ("Q = ½, G = 128", Placement { near: 0.5, gap: 2 * SEGMENT }),
        ("Q = 1, G = 8", Placement { near: 1.0, gap: 8 }),
    ];
    for (name, placement) in placements {
        for budget in ["1%", "5%", "25%"] {
            let (b, k0) = setup.budget(budget);
            for share in [0.0, 0.10, 0.25, 0.50] {
                let (lrc, _) = split(b, share);
                let k = bound(setup.chunks, lrc);
                let picks: &[Picks] = if share > 0.0 { &[Picks::Near, Picks::Random] } else { &[Picks::Near] };
                let ts: Vec<Tally> = picks
                    .iter()
                    .map(|&picks| setup.simulate(Model { placement, share, picks, ..EXTENTS }, b, setup.seeds.clone()))
                    .collect();
                println!(
                    "| {name} | {budget} | {:.0}% | {lrc} of {b} | {k} | {} | {} |",
                    share * 100.0,
                    outcome_cells(&ts, k),
                    cell(&ts, |t| yes(t.runs_max <= k0))
                );
            }
        }
    }
    println!();
}

/// Table 4: ties broken by segments (blockproof) or by scattered chunks.
fn table_scatter(setup: &Setup) {
    setup.header(
        "4. Ties by segments (as blockproof) / by scattered chunks",
        &setup.seeds,
        &format!("budget | bound | {OUTCOMES}"),
    );
    for budget in BUDGETS {
        let (b, k) = setup.budget(budget);
        let ts: Vec<Tally> =
            [false, true].map(|scatter| setup.simulate(Model { scatter, ..EXTENTS }, b, setup.seeds.clone())).into();
        println!("| {budget} | {k} | {} |", outcome_cells(&ts, k));
    }
    println!();
}

fn main() {
    let args: Vec<u64> = std::env::args().skip(1).map(|a| a.parse().expect("a number")).collect();
    let chunks = args.first().copied().unwrap_or(16384).max(2);
    let runs = args.get(1).copied().unwrap_or(400).max(2) as u32;
    let seed = args.get(2).copied().unwrap_or(1);
    let seeds = seed..seed + args.get(3).copied().unwrap_or(4).max(1);
    println!("{chunks} chunks ({} MiB at 64 KiB), {runs} runs; bound K = ⌈(chunks − 1) / chunks a run⌉\n", chunks / 16);
    let setup = Setup { chunks, runs, seeds };
    table_single(&setup);
    table_extents(&setup);
    table_locality(&setup);
    table_scatter(&setup);
}
