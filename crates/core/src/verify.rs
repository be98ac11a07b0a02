//! Sampled verification: read chunks that change tracking called unchanged from the same
//! source handle (the same point in time) and compare them with the ids the new restore
//! point inherited.
//!
//! **Selection** is least-recently-confirmed first. Candidates are ordered by the run at
//! which they were last confirmed (never confirmed first); among equals the order is
//! random, by segments of [`SEGMENT`] consecutive chunks taken in a random order (so reads
//! stay sequential within a segment and a selection needs memory for the segments, not
//! for every chunk). The first chunk of the disk is always selected, whatever the budget
//! (`none` excepted). With `B` chunks sampled per run beside it, every chunk of a disk of
//! `N` chunks is confirmed within `ceil((N - 1) / B)` runs at a steady budget; the bound a
//! run reports is computed from the confirmation state (confirm.rs; docs/VERIFICATION.md
//! has the proof).
//!
//! **Comparison** hashes each chunk with the repository's keyed hash (an all-zero chunk is
//! [`Id::ZERO`]) and compares with the inherited id. A mismatch is narrowed to the
//! 512-byte sectors that differ, by comparing with the stored chunk's bytes.

use std::collections::{BTreeMap, HashMap};
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

use blockproof_format::manifest::ByteRange;
use blockproof_format::{BlobKind, Id};
use blockproof_repo::BlobReader;
use blockproof_source::BlockSource;
use blockproof_work::{fan_out, FanOut};
use rand::Rng;

use crate::pipeline::is_zero;
use crate::{workers, Budget, CoreError};

/// Chunks per segment of the random tie-break (4 MiB of 64 KiB chunks).
pub const SEGMENT: u64 = 64;

/// The granularity of reported mismatch ranges: a disk sector.
pub const SECTOR: usize = 512;

/// The count part of a budget in chunks per run, for a disk of `chunks` chunks of
/// `chunk_size` (`None`: no count part — `all`, or a time limit only). A percentage is
/// rounded up, so a positive one never means zero chunks; a size below one chunk does
/// (and the caller warns).
pub fn chunk_limit(budget: &Budget, chunks: u64, chunk_size: u32) -> Option<u64> {
    if budget.nothing {
        return Some(0);
    }
    let by_fraction = budget.fraction.map(|f| ((chunks as f64) * f).ceil() as u64);
    let by_bytes = budget.bytes.map(|b| b / u64::from(chunk_size));
    [by_fraction, by_bytes, budget.ios].into_iter().flatten().min()
}

/// The last-confirmed run of every chunk of a disk (0: never), as the selection reads it:
/// chunk by chunk, or by page of [`PAGE`] chunks where the implementation keeps a summary
/// (the confirmation state keeps each page's runs, so whole pages are never visited).
pub trait LastConfirmed {
    /// Chunks of the disk.
    fn chunks(&self) -> u64;
    /// The run at which chunk `chunk` was last confirmed.
    fn run_of(&self, chunk: u64) -> u32;
    /// Adds the runs of the chunks of `range` (within one page) to `hist`.
    fn add_runs(&self, range: Range<u64>, hist: &mut BTreeMap<u32, u64>) {
        for c in range {
            *hist.entry(self.run_of(c)).or_default() += 1;
        }
    }
    /// False only if no chunk of `range` (within one page) was last confirmed at a run in
    /// `runs`.
    fn may_hold(&self, range: Range<u64>, runs: Range<u32>) -> bool {
        let _ = (range, runs);
        true
    }
}

impl LastConfirmed for [u32] {
    fn chunks(&self) -> u64 {
        self.len() as u64
    }

    fn run_of(&self, chunk: u64) -> u32 {
        self[chunk as usize]
    }
}

/// The page of [`LastConfirmed`]: the confirmation state's page (a multiple of [`SEGMENT`]).
pub const PAGE: u64 = blockproof_format::confirm::ENTRIES_PER_PAGE;

/// `r` cut at page boundaries.
fn by_page(r: Range<u64>) -> impl Iterator<Item = Range<u64>> {
    let mut at = r.start;
    std::iter::from_fn(move || {
        (at < r.end).then(|| {
            let end = ((at / PAGE + 1) * PAGE).min(r.end);
            let part = at..end;
            at = end;
            part
        })
    })
}

/// A random order of `0..n`, drawn lazily (Fisher–Yates, keeping only the positions
/// swapped so far): memory for what was drawn, not for `n`.
struct LazyShuffle {
    n: u64,
    next: u64,
    swapped: HashMap<u64, u64>,
}

impl LazyShuffle {
    fn new(n: u64) -> Self {
        LazyShuffle { n, next: 0, swapped: HashMap::new() }
    }

    fn draw(&mut self, rng: &mut impl Rng) -> Option<u64> {
        if self.next >= self.n {
            return None;
        }
        let t = self.next;
        let j = rng.gen_range(t..self.n);
        let at_j = self.swapped.get(&j).copied().unwrap_or(j);
        let at_t = self.swapped.remove(&t).unwrap_or(t);
        if j != t {
            self.swapped.insert(j, at_t);
        }
        self.next += 1;
        Some(at_j)
    }
}

/// Picks up to `limit` chunks among `candidates` (sorted, disjoint runs of chunk numbers),
/// least recently confirmed first, plus chunk 0 (on top of the limit) when it is a
/// candidate. Returns them in priority order.
///
/// The histogram of the candidates' runs comes from the pages' summaries where a page is
/// wholly a candidate; pages holding no chunk older than the threshold, or none at it,
/// are skipped; the random order of segments is drawn lazily, among the segments of pages
/// holding chunks at the threshold. So the cost is the pages the selection touches, not
/// the disk.
pub fn select<L: LastConfirmed + ?Sized>(
    last: &L,
    candidates: &[Range<u64>],
    limit: Option<u64>,
    rng: &mut impl Rng,
) -> Vec<u64> {
    let first_is_candidate = candidates.first().is_some_and(|r| r.start == 0 && r.end > 0);
    let total: u64 = candidates.iter().map(|r| r.end - r.start).sum::<u64>() - u64::from(first_is_candidate);
    let limit = limit.unwrap_or(total).min(total);
    let mut out = Vec::new();
    // The first chunk leads, on top of the budget (which then covers the others).
    if first_is_candidate {
        out.push(0);
    }
    if limit == 0 {
        return out;
    }
    let others = |r: &Range<u64>| r.start.max(u64::from(first_is_candidate))..r.end;
    // Histogram of last-confirmed runs, to find the run `t` at which the budget runs out.
    let mut hist: BTreeMap<u32, u64> = BTreeMap::new();
    for r in candidates {
        for part in by_page(others(r)) {
            last.add_runs(part, &mut hist);
        }
    }
    let mut below = 0u64;
    let mut threshold = u32::MAX;
    for (&run, &n) in &hist {
        if below + n >= limit {
            threshold = run;
            break;
        }
        below += n;
    }
    // Everything confirmed before `threshold`, oldest first...
    let mut older: Vec<(u32, u64)> = Vec::with_capacity(below as usize);
    if below > 0 {
        for r in candidates {
            for part in by_page(others(r)) {
                if !last.may_hold(part.clone(), 0..threshold) {
                    continue;
                }
                for c in part {
                    let run = last.run_of(c);
                    if run < threshold {
                        older.push((run, c));
                    }
                }
            }
        }
    }
    older.sort_unstable();
    out.extend(older.into_iter().map(|(_, c)| c));
    // ...then the rest among those confirmed at `threshold`, by random segments (drawn
    // among the segments of the pages holding such chunks: the others hold none).
    let mut rest = limit - below;
    if rest > 0 && threshold != u32::MAX {
        let chunks = last.chunks();
        let at = threshold..threshold + 1;
        let pages: Vec<u64> = (0..chunks.div_ceil(PAGE))
            .filter(|&p| last.may_hold(p * PAGE..((p + 1) * PAGE).min(chunks), at.clone()))
            .collect();
        let per_page = PAGE / SEGMENT;
        let mut order = LazyShuffle::new(pages.len() as u64 * per_page);
        while let Some(k) = order.draw(rng) {
            let seg = pages[(k / per_page) as usize] * per_page + k % per_page;
            let (lo, hi) = (seg * SEGMENT, ((seg + 1) * SEGMENT).min(chunks));
            if lo >= hi {
                continue;
            }
            let first_run = candidates.partition_point(|r| r.end <= lo);
            for r in &candidates[first_run..] {
                if r.start >= hi {
                    break;
                }
                let r = others(r);
                for c in r.start.max(lo)..r.end.min(hi) {
                    if rest > 0 && last.run_of(c) == threshold {
                        out.push(c);
                        rest -= 1;
                    }
                }
            }
            if rest == 0 {
                break;
            }
        }
    }
    out
}

/// What sampling found.
#[derive(Debug, Default)]
pub(crate) struct Sampled {
    /// Chunks compared and found equal.
    pub confirmed: Vec<u64>,
    /// Chunks compared and found different, with the bytes read from the source.
    pub mismatched: Vec<(u64, Vec<u8>)>,
    pub bytes: u64,
    pub chunks: u64,
    /// The deadline stopped the reads before every selected chunk was read.
    pub cut_short: bool,
}

/// Bytes a time-limited sample may have in flight before the first read completes (and
/// tells how fast the source is).
const FIRST_WAVE: u64 = 1 << 20;

/// Reads `selected` (in priority order) from `source` and compares chunk `selected[k]`
/// with `expected[k]`. The first `exempt` chunks are always read; the others only while
/// `deadline` allows — decided before each read is issued: none is issued after the
/// deadline, nor one that would not complete before it at the rate the source has shown
/// so far (a source that keeps many requests in flight would otherwise overrun the
/// deadline by all of them). So reads go in waves: the exempt chunks, then what fits in
/// the time left (at most [`FIRST_WAVE`] bytes while nothing has completed), each wave
/// pipelined. The reader, the hashing workers and the comparison are one [`fan_out`]: a
/// lost lock stops them.
#[allow(clippy::too_many_arguments)]
pub(crate) fn sample(
    source: &mut dyn BlockSource,
    keys: &blockproof_crypto::Keys,
    cancel: &blockproof_work::Cancel,
    chunk_size: u32,
    selected: &[u64],
    expected: &[Id],
    exempt: usize,
    deadline: Option<Instant>,
    progress: &dyn crate::Progress,
) -> Result<Sampled, CoreError> {
    let cs = u64::from(chunk_size);
    let size = source.size();
    let mut out = Sampled::default();
    let cut = AtomicBool::new(false);
    let done = AtomicU64::new(0);
    fan_out(
        cancel,
        FanOut { workers: workers(), queue: 32 },
        |emit| {
            let index: HashMap<u64, usize> = selected.iter().enumerate().map(|(k, &c)| (c * cs, k)).collect();
            let mut to_workers = |offset: u64, buf: Vec<u8>| {
                done.fetch_add(buf.len() as u64, Ordering::Relaxed);
                progress.advance(buf.len() as u64);
                match index.get(&offset) {
                    Some(&k) => emit.send((k, buf)),
                    None => false,
                }
            };
            let len = |c: u64| (size - c * cs).min(cs);
            // In waves: the exempt chunks, then as many as fit before the deadline at the
            // rate the source has shown (a first wave of at most FIRST_WAVE bytes when
            // nothing has completed yet), until the deadline or the end.
            let mut next = exempt.min(selected.len());
            let mut wave: Vec<u64> = selected[..next].to_vec();
            let mut last_wave: u64 = wave.iter().map(|&c| len(c)).sum();
            loop {
                let wave_started = (Instant::now(), done.load(Ordering::Relaxed));
                if !wave.is_empty() {
                    let mut ranges = wave.iter().map(|&c| (c * cs, len(c) as usize));
                    source.read_ranges(&mut ranges, &mut to_workers)?;
                    if emit.stopped() {
                        return Ok(());
                    }
                }
                if next >= selected.len() {
                    return Ok(());
                }
                // The rate of the last wave (a source may burst at first), and at most
                // twice its size: estimates are tested before they are trusted.
                let room = match deadline {
                    None => u64::MAX,
                    Some(d) => {
                        let now = Instant::now();
                        let read = done.load(Ordering::Relaxed) - wave_started.1;
                        let took = wave_started.0.elapsed().as_secs_f64();
                        if now >= d {
                            0
                        } else if read == 0 {
                            last_wave = FIRST_WAVE;
                            FIRST_WAVE
                        } else {
                            let fits = (read as f64 / took.max(1e-6) * (d - now).as_secs_f64()) as u64;
                            last_wave = fits.min(2 * last_wave);
                            last_wave
                        }
                    }
                };
                wave.clear();
                let mut bytes = 0u64;
                while next < selected.len() && bytes + len(selected[next]) <= room {
                    bytes += len(selected[next]);
                    wave.push(selected[next]);
                    next += 1;
                }
                if wave.is_empty() {
                    cut.store(true, Ordering::Relaxed);
                    return Ok(());
                }
            }
        },
        || {
            |(k, buf): (usize, Vec<u8>)| -> Result<(usize, bool, Vec<u8>), CoreError> {
                let id = if is_zero(&buf) { Id::ZERO } else { keys.blob_id(&buf) };
                let same = id == expected[k];
                Ok((k, same, if same { Vec::new() } else { buf }))
            }
        },
        |(k, same, buf)| {
            out.chunks += 1;
            let c = selected[k];
            out.bytes += (size - c * cs).min(cs);
            if same {
                out.confirmed.push(c);
            } else {
                out.mismatched.push((c, buf));
            }
            Ok(())
        },
    )?;
    out.cut_short = cut.into_inner();
    out.confirmed.sort_unstable();
    out.mismatched.sort_unstable_by_key(|(c, _)| *c);
    Ok(out)
}

/// The 512-byte sectors where `actual` (read from the source at `offset`) differs from
/// the stored chunk `expected`, merged into byte ranges.
pub(crate) fn differing_ranges(reader: &BlobReader<'_>, expected: Id, actual: &[u8], offset: u64) -> Vec<ByteRange> {
    let stored = if expected.is_zero() { Ok(vec![0u8; actual.len()]) } else { reader.read(&expected, BlobKind::Data) };
    let Ok(stored) = stored.map_err(|_| ()).and_then(|s| if s.len() == actual.len() { Ok(s) } else { Err(()) }) else {
        // The stored chunk cannot be read back: the whole chunk is the range.
        return vec![ByteRange { offset, length: actual.len() as u64 }];
    };
    let mut out: Vec<ByteRange> = Vec::new();
    for (i, (a, b)) in actual.chunks(SECTOR).zip(stored.chunks(SECTOR)).enumerate() {
        if a != b {
            let start = offset + (i * SECTOR) as u64;
            match out.last_mut() {
                Some(r) if r.offset + r.length == start => r.length += a.len() as u64,
                _ => out.push(ByteRange { offset: start, length: a.len() as u64 }),
            }
        }
    }
    out
}

/// Merges touching ranges (input sorted).
pub(crate) fn merge_ranges(ranges: Vec<ByteRange>) -> Vec<ByteRange> {
    let mut out: Vec<ByteRange> = Vec::with_capacity(ranges.len());
    for r in ranges {
        match out.last_mut() {
            Some(l) if l.offset + l.length == r.offset => l.length += r.length,
            _ => out.push(r),
        }
    }
    out
}

/// Helpers for tests elsewhere in the crate.
#[cfg(test)]
pub(crate) mod tests_support {
    use std::ops::Range;

    /// Chunks `0..n` without `out` (sorted), as runs.
    pub fn runs_without(n: u64, out: &[u64]) -> Vec<Range<u64>> {
        let mut runs = Vec::new();
        let mut start = 0;
        for &c in out {
            if c > start {
                runs.push(start..c);
            }
            start = c + 1;
        }
        if start < n {
            runs.push(start..n);
        }
        runs
    }
}

#[cfg(test)]
#[allow(clippy::single_range_in_vec_init)] // one-run candidate lists are the point
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn rng() -> rand::rngs::StdRng {
        rand::rngs::StdRng::seed_from_u64(7)
    }

    #[test]
    fn budgets_become_chunk_counts() {
        let b = |s: &str| Budget::parse(s).unwrap();
        assert_eq!(chunk_limit(&b("25%"), 100, 65536), Some(25));
        assert_eq!(chunk_limit(&b("10%,1MiB"), 1000, 65536), Some(16));
        assert_eq!(chunk_limit(&b("7ios,50%"), 100, 65536), Some(7));
        assert_eq!(chunk_limit(&b("none"), 100, 65536), Some(0));
        assert_eq!(chunk_limit(&b("all"), 100, 65536), None);
        assert_eq!(chunk_limit(&b("30s"), 100, 65536), None);
    }

    #[test]
    fn least_recently_confirmed_first_and_first_chunk_always() {
        // Chunks 0..10; candidates all but 4..6 (those were read).
        let last = [5, 1, 0, 3, 9, 9, 2, 0, 4, 1];
        let cands = [0..4, 6..10];
        let sel = select(&last[..], &cands, Some(4), &mut rng());
        assert_eq!(sel[0], 0, "the first chunk leads");
        assert_eq!(sel, vec![0, 2, 7, 1, 9], "the first chunk comes on top of the budget");
        // Budget zero: only the first chunk.
        assert_eq!(select(&last[..], &cands, Some(0), &mut rng()), vec![0]);
        // Unlimited: every candidate once, oldest first.
        let all = select(&last[..], &cands, None, &mut rng());
        assert_eq!(all.len(), 8);
        let mut sorted = all.clone();
        sorted.sort();
        assert_eq!(sorted, vec![0, 1, 2, 3, 6, 7, 8, 9]);
        // Chunk 0 not a candidate: not selected.
        assert!(!select(&last[..], &[1..10], Some(3), &mut rng()).contains(&0));
    }

    #[test]
    fn ties_are_random_but_complete_over_runs() {
        // 1000 chunks all confirmed at run 1; sampling 250 a run, confirming as we go,
        // covers every chunk in exactly 4 runs, whatever the random order.
        let mut last = vec![1u32; 1000];
        let mut r = rng();
        let first = select(&last[..], &[0..1000], Some(250), &mut r);
        for run in 2..=5u32 {
            let sel = select(&last[..], &[0..1000], Some(250), &mut r);
            assert_eq!(sel.len(), 251);
            for c in sel {
                last[c as usize] = run;
            }
        }
        assert!(last.iter().all(|&x| x >= 2), "every chunk confirmed within 4 runs");
        assert_eq!(select(&last[..], &[0..1000], Some(0), &mut r), vec![0]);
        let again = select(&vec![1u32; 1000][..], &[0..1000], Some(250), &mut rand::rngs::StdRng::seed_from_u64(8));
        assert_ne!(first, again, "ties are broken randomly");
    }

    #[test]
    fn mismatch_ranges_are_sector_exact() {
        let merged = merge_ranges(vec![
            ByteRange { offset: 0, length: 512 },
            ByteRange { offset: 512, length: 512 },
            ByteRange { offset: 4096, length: 512 },
        ]);
        assert_eq!(merged, vec![ByteRange { offset: 0, length: 1024 }, ByteRange { offset: 4096, length: 512 }]);
    }
}
