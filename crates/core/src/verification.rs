//! Verifying one disk after its backup, against the same open source: the chunks the
//! backup already holds evidence about, the budgeted sample of everything it did not read
//! (inherited chunks, and chunks the allocation map called zero — tracking metadata is
//! sampled like change tracking), the escalation around every mismatch, and a second read
//! of every differing chunk to tell a changing source from a lie.
//!
//! Primitives (selection, comparison, sector-exact ranges) are in [`crate::verify`]; the
//! bound in [`crate::confirm`]; what a verdict does to the restore point in
//! [`crate::backup`]. docs/VERIFICATION.md is the user's view.

use std::collections::HashSet;
use std::ops::Range;
use std::time::Instant;

use blockproof_crypto::Keys;
use blockproof_format::manifest::{ByteRange, CutShort};
use blockproof_format::Id;
use blockproof_repo::BlobReader;
use blockproof_source::BlockSource;
use serde::Serialize;

use crate::budget::TimeLimit;
use crate::confirm::Sampling;
use crate::pipeline::is_zero;
use crate::verify::{chunk_limit, differing_ranges, merge_ranges, sample, select, LastConfirmed, Sampled, SEGMENT};
use crate::{Budget, CoreError, Progress};

/// At most this many chunks are compared around mismatches per disk and run (1 GiB of
/// 64 KiB chunks), unless every unread chunk is to be compared (`--on-mismatch=scan`).
pub const ESCALATION_LIMIT: u64 = 16384;

/// How far the comparison went around the mismatches sampling found.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Escalation {
    /// Chunks compared because a neighbour (or a chunk of the same segment) differed.
    pub chunks: u64,
    pub bytes: u64,
    /// Whether the extent was still growing when [`ESCALATION_LIMIT`] stopped it.
    pub limited: bool,
    /// Every unread chunk was compared (`--on-mismatch=scan`).
    pub scanned: bool,
}

/// What verifying one disk found.
#[derive(Debug, Default)]
pub(crate) struct Verdict {
    /// How the budget's sample went, for the coverage bound.
    pub sampling: Sampling,
    /// Everything compared: evidence, sample and escalation.
    pub verified_chunks: u64,
    pub verified_bytes: u64,
    /// Chunks found equal (confirmed at this run).
    pub confirmed: Vec<u64>,
    /// Chunks that differ and read the same twice: the restore point is stale there.
    /// With the id it holds.
    pub stale: Vec<(u64, Id)>,
    /// Chunks that differ but read differently the second time: the source changed
    /// while it was read.
    pub changing: Vec<u64>,
    /// Sector-exact ranges of `stale` and `changing` chunks.
    pub mismatches: Vec<ByteRange>,
    pub escalation: Escalation,
    /// Something the user should know (a budget below one chunk).
    pub warning: Option<String>,
    /// Differing chunks before the second read.
    diffs: Vec<Diff>,
}

/// A chunk that differed: what the restore point holds, what the source read.
#[derive(Debug)]
struct Diff {
    chunk: u64,
    held: Id,
    read: Id,
}

/// One disk to verify.
pub(crate) struct DiskCheck<'a> {
    pub id: &'a str,
    pub reader: &'a BlobReader<'a>,
    pub chunk_size: u32,
    pub chunks: u64,
    /// Chunks the backup did not read, as sorted runs.
    pub unread: Vec<Range<u64>>,
    /// Chunks to compare whatever the budget, before it (evidence the backup has in hand).
    pub forced: Vec<u64>,
    pub budget: &'a Budget,
    /// Compare every unread chunk once one differs.
    pub scan: bool,
}

impl DiskCheck<'_> {
    fn is_unread(&self, c: u64) -> bool {
        let k = self.unread.partition_point(|r| r.end <= c);
        self.unread.get(k).is_some_and(|r| r.contains(&c))
    }

    /// Runs the comparison. `last` is the confirmation state before this run (for the
    /// selection); `expected(c)` the id the new restore point holds for unread chunk `c`.
    pub fn run(
        &self,
        source: &mut dyn BlockSource,
        repo: &blockproof_repo::Repository,
        last: &dyn LastConfirmed,
        expected: &mut dyn FnMut(u64) -> Result<Id, CoreError>,
        progress: &dyn Progress,
    ) -> Result<Verdict, CoreError> {
        let mut v = Verdict::default();
        if self.budget.nothing {
            v.sampling.off = true;
            return Ok(v);
        }
        let limit = chunk_limit(self.budget, self.chunks, self.chunk_size);
        if limit == Some(0) {
            v.warning = Some(format!(
                "disk {}: the verification budget is less than one chunk ({} bytes): only the first chunk is \
                 compared, and no coverage bound holds; use a larger budget or a percentage",
                self.id, self.chunk_size
            ));
        }
        // Evidence first, then chunk 0, then the budget's sample (least recently
        // confirmed first) among the other unread chunks.
        let forced: Vec<u64> = self.forced.iter().copied().filter(|&c| c != 0 && self.is_unread(c)).collect();
        let forced_set: HashSet<u64> = forced.iter().copied().collect();
        let candidates: Vec<Range<u64>> =
            if forced.is_empty() { self.unread.clone() } else { split_out(&self.unread, &forced_set) };
        let picked = select(last, &candidates, limit, &mut rand::thread_rng());
        let first = usize::from(picked.first() == Some(&0));
        let mut selected = forced.clone();
        selected.extend_from_slice(&picked);
        let exempt = forced.len() + first;
        let want = fetch_expected(&selected, expected)?;

        let started = Instant::now();
        let deadline = self.budget.deadline(started);
        progress.begin(&format!("verify {}", self.id), selected.len() as u64 * u64::from(self.chunk_size));
        let sampled = sample(
            source,
            repo.keys(),
            repo.cancel(),
            self.chunk_size,
            &selected,
            &want,
            exempt,
            deadline.map(|d| d.0),
            progress,
        );
        progress.end();
        let sampled = sampled?;
        let budgeted = sampled.chunks.saturating_sub(exempt as u64);
        v.sampling = Sampling {
            off: false,
            budget_chunks: limit,
            timed: self.budget.is_timed(),
            sampled: budgeted,
            cut_short: match (sampled.cut_short, limit, deadline) {
                (true, Some(b), Some((_, which))) if budgeted < b => Some(match which {
                    TimeLimit::Duration => CutShort::Deadline,
                    TimeLimit::Window => CutShort::Window,
                }),
                _ => None,
            },
        };
        let mut compared: HashSet<u64> = selected.iter().copied().collect();
        let mut differing = self.absorb(&mut v, repo.keys(), sampled, &selected, &want);

        // Escalation: around every differing chunk, its segment and the neighbours,
        // growing while they keep differing; or every unread chunk (scan).
        let mut queued: Vec<u64> = Vec::new();
        if self.scan && !differing.is_empty() {
            v.escalation.scanned = true;
            queued = self.unread.iter().flat_map(|r| r.clone()).filter(|c| !compared.contains(c)).collect();
        }
        while !differing.is_empty() || !queued.is_empty() {
            for &c in &differing {
                let seg = c / SEGMENT * SEGMENT;
                let around = (seg..(seg + SEGMENT).min(self.chunks)).chain([c.saturating_sub(1), c + 1]);
                for n in around {
                    if n < self.chunks && self.is_unread(n) && compared.insert(n) {
                        queued.push(n);
                    }
                }
            }
            if queued.is_empty() {
                break;
            }
            queued.sort_unstable();
            let room = if v.escalation.scanned { u64::MAX } else { ESCALATION_LIMIT - v.escalation.chunks };
            if queued.len() as u64 > room {
                queued.truncate(room as usize);
                v.escalation.limited = true;
            }
            let batch = std::mem::take(&mut queued);
            let want = fetch_expected(&batch, expected)?;
            let sampled = sample(
                source,
                repo.keys(),
                repo.cancel(),
                self.chunk_size,
                &batch,
                &want,
                batch.len(),
                None,
                &crate::NoProgress,
            )?;
            v.escalation.chunks += sampled.chunks;
            v.escalation.bytes += sampled.bytes;
            differing = self.absorb(&mut v, repo.keys(), sampled, &batch, &want);
            if v.escalation.limited {
                break;
            }
        }

        // Read every differing chunk again: a source that changed between the two reads
        // is not a point-in-time view, and its differences are not a lie of the tracking.
        let diffs = std::mem::take(&mut v.diffs);
        if !diffs.is_empty() {
            let chunks: Vec<u64> = diffs.iter().map(|d| d.chunk).collect();
            let first_reads: Vec<Id> = diffs.iter().map(|d| d.read).collect();
            let again = sample(
                source,
                repo.keys(),
                repo.cancel(),
                self.chunk_size,
                &chunks,
                &first_reads,
                chunks.len(),
                None,
                &crate::NoProgress,
            )?;
            let moved: HashSet<u64> = again.mismatched.iter().map(|(c, _)| *c).collect();
            for d in diffs {
                if moved.contains(&d.chunk) {
                    v.changing.push(d.chunk);
                } else {
                    v.stale.push((d.chunk, d.held));
                }
            }
        }
        let mut ranges = std::mem::take(&mut v.mismatches);
        ranges.sort_unstable_by_key(|r| r.offset);
        v.mismatches = merge_ranges(ranges);
        Ok(v)
    }

    /// Adds one comparison's outcome to the verdict; returns the chunks that differ.
    fn absorb(&self, v: &mut Verdict, keys: &Keys, s: Sampled, chunks: &[u64], want: &[Id]) -> Vec<u64> {
        v.verified_chunks += s.chunks;
        v.verified_bytes += s.bytes;
        v.confirmed.extend(&s.confirmed);
        let cs = u64::from(self.chunk_size);
        let mut out = Vec::new();
        for (c, actual) in s.mismatched {
            let held = want[chunks.iter().position(|x| *x == c).expect("compared chunk")];
            v.mismatches.extend(differing_ranges(self.reader, held, &actual, c * cs));
            let read = if is_zero(&actual) { Id::ZERO } else { keys.blob_id(&actual) };
            v.diffs.push(Diff { chunk: c, held, read });
            out.push(c);
        }
        out
    }
}

/// `runs` without the chunks in `out` (runs sorted).
fn split_out(runs: &[Range<u64>], out: &HashSet<u64>) -> Vec<Range<u64>> {
    let mut res = Vec::new();
    for r in runs {
        let mut start = r.start;
        for c in r.clone() {
            if out.contains(&c) {
                if start < c {
                    res.push(start..c);
                }
                start = c + 1;
            }
        }
        if start < r.end {
            res.push(start..r.end);
        }
    }
    res
}

/// The ids for `chunks`, looked up in disk order (the parent's tree is read forwards).
fn fetch_expected(
    chunks: &[u64],
    expected: &mut dyn FnMut(u64) -> Result<Id, CoreError>,
) -> Result<Vec<Id>, CoreError> {
    let mut order: Vec<usize> = (0..chunks.len()).collect();
    order.sort_unstable_by_key(|&k| chunks[k]);
    let mut out = vec![Id::ZERO; chunks.len()];
    for k in order {
        out[k] = expected(chunks[k])?;
    }
    Ok(out)
}
