//! Which chunks of a disk a backup reads, which are zero without reading, and which
//! inherit their id from the parent restore point.
//!
//! A chunk is **zero** when the source says its bytes read as zeros (NBD
//! `base:allocation`), whatever the change source says: that is the state of the disk at
//! this point in time. Otherwise it is **read** in a full backup, or when it overlaps a
//! changed range in an incremental one; every other chunk **inherits** the parent's id.
//! All sets are kept as sorted runs of chunk numbers, so a plan is small however large
//! the disk.

use std::ops::Range;

/// What happens to a run of chunks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Action {
    Read,
    Zero,
    Inherit,
}

/// The plan of one disk: runs covering chunks `0..n` in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ChunkPlan {
    pub runs: Vec<(Range<u64>, Action)>,
    /// Chunks overlapping a changed range (incremental plans only).
    pub cbt_reported: u64,
    /// Those chunks, as sorted runs (incremental plans only).
    pub reported: Vec<Range<u64>>,
}

/// Chunks wholly inside the byte ranges (the last, short chunk counts when a range
/// reaches the end of the disk).
fn chunks_inside(ranges: &[(u64, u64)], size: u64, cs: u64) -> Vec<Range<u64>> {
    let n = size.div_ceil(cs);
    let mut out = Vec::new();
    for &(off, len) in ranges {
        let end = off.saturating_add(len).min(size);
        let first = off.div_ceil(cs);
        let last = if end == size { n } else { end / cs };
        if first < last {
            push_run(&mut out, first..last);
        }
    }
    out
}

/// Chunks overlapping the byte ranges.
fn chunks_touching(ranges: &[(u64, u64)], size: u64, cs: u64) -> Vec<Range<u64>> {
    let n = size.div_ceil(cs);
    let mut out = Vec::new();
    for &(off, len) in ranges {
        if len == 0 || off >= size {
            continue;
        }
        let end = off.saturating_add(len).min(size);
        push_run(&mut out, off / cs..end.div_ceil(cs).min(n));
    }
    out
}

/// Appends a run to sorted runs, merging overlaps (input sorted by start).
fn push_run(runs: &mut Vec<Range<u64>>, r: Range<u64>) {
    match runs.last_mut() {
        Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
        _ => runs.push(r),
    }
}

/// `a` minus `b`, both sorted and disjoint.
fn subtract(a: &[Range<u64>], b: &[Range<u64>]) -> Vec<Range<u64>> {
    let mut out = Vec::new();
    let mut j = 0;
    for r in a {
        let mut start = r.start;
        while j < b.len() && b[j].end <= start {
            j += 1;
        }
        let mut k = j;
        while k < b.len() && b[k].start < r.end {
            if b[k].start > start {
                out.push(start..b[k].start);
            }
            start = start.max(b[k].end);
            k += 1;
        }
        if start < r.end {
            out.push(start..r.end);
        }
    }
    out
}

impl ChunkPlan {
    /// `changed`: the changed byte ranges of an incremental, `None` for a full read.
    /// `zero`: byte ranges that read as zeros.
    pub fn new(size: u64, chunk_size: u32, zero: &[(u64, u64)], changed: Option<&[(u64, u64)]>) -> ChunkPlan {
        let cs = chunk_size as u64;
        let n = size.div_ceil(cs);
        let zero = chunks_inside(zero, size, cs);
        let (wanted, cbt_reported, reported) = match changed {
            None => (std::iter::once(0..n).collect(), 0, Vec::new()),
            Some(c) => {
                let t = chunks_touching(c, size, cs);
                let count = t.iter().map(|r| r.end - r.start).sum();
                (t.clone(), count, t)
            }
        };
        let read = subtract(&wanted, &zero);
        // Interleave the three kinds into runs covering 0..n.
        let mut marks: Vec<(Range<u64>, Action)> = zero.into_iter().map(|r| (r, Action::Zero)).collect();
        marks.extend(read.into_iter().map(|r| (r, Action::Read)));
        marks.sort_by_key(|(r, _)| r.start);
        let mut runs = Vec::with_capacity(marks.len() * 2 + 1);
        let mut at = 0;
        for (r, action) in marks {
            if r.start > at {
                runs.push((at..r.start, Action::Inherit));
            }
            at = r.end;
            runs.push((r, action));
        }
        if at < n {
            runs.push((at..n, Action::Inherit));
        }
        ChunkPlan { runs, cbt_reported, reported }
    }

    /// The chunks a backup does not read — inherited ones and those the allocation map
    /// calls zero — as sorted, merged runs: what verification samples from.
    pub fn unread(&self) -> Vec<Range<u64>> {
        let mut out = Vec::new();
        for (r, a) in &self.runs {
            if *a != Action::Read {
                push_run(&mut out, r.clone());
            }
        }
        out
    }

    /// What the plan does with chunk `c` (`None` past the end).
    pub fn action(&self, c: u64) -> Option<Action> {
        let k = self.runs.partition_point(|(r, _)| r.end <= c);
        self.runs.get(k).filter(|(r, _)| r.contains(&c)).map(|(_, a)| *a)
    }

    /// Reads these chunks (sorted) instead of inheriting them: their blobs have no copy a
    /// backup may reuse (crate::availability). Chunks with another action stay as they are.
    pub fn read_instead(&mut self, chunks: &[u64]) {
        let mut runs: Vec<(Range<u64>, Action)> = Vec::with_capacity(self.runs.len() + 2 * chunks.len());
        let mut push = |r: Range<u64>, a: Action| match runs.last_mut() {
            _ if r.is_empty() => {}
            Some((last, la)) if *la == a && last.end == r.start => last.end = r.end,
            _ => runs.push((r, a)),
        };
        let mut next = chunks.iter().copied().peekable();
        for (r, a) in std::mem::take(&mut self.runs) {
            if a != Action::Inherit {
                push(r, a);
                continue;
            }
            let mut at = r.start;
            while let Some(&c) = next.peek() {
                if c >= r.end {
                    break;
                }
                next.next();
                if c < at {
                    continue;
                }
                push(at..c, Action::Inherit);
                push(c..c + 1, Action::Read);
                at = c + 1;
            }
            push(at..r.end, Action::Inherit);
        }
        self.runs = runs;
    }

    /// Chunks with this action.
    #[cfg(test)]
    pub fn count(&self, action: Action) -> u64 {
        self.runs.iter().filter(|(_, a)| *a == action).map(|(r, _)| r.end - r.start).sum()
    }
}

#[cfg(test)]
#[allow(clippy::single_range_in_vec_init)] // one-run candidate lists are the point
mod tests {
    use super::Action::*;
    use super::*;

    #[test]
    fn full_plan_reads_everything_but_zero_extents() {
        // 10 chunks of 100 bytes, the last one short (size 950).
        let p = ChunkPlan::new(950, 100, &[(150, 300), (900, 50)], None);
        assert_eq!(p.runs, vec![(0..2, Read), (2..4, Zero), (4..9, Read), (9..10, Zero)]);
        assert_eq!((p.count(Read), p.count(Zero), p.count(Inherit), p.cbt_reported), (7, 3, 0, 0));
    }

    #[test]
    fn incremental_reads_chunks_touching_changes_and_inherits_the_rest() {
        let changed = [(0, 1), (250, 100), (999, 1)];
        let p = ChunkPlan::new(1000, 100, &[], Some(&changed));
        assert_eq!(p.runs, vec![(0..1, Read), (1..2, Inherit), (2..4, Read), (4..9, Inherit), (9..10, Read)]);
        assert_eq!(p.cbt_reported, 4);
        // A zero extent wins over a change: it is the state of the disk now.
        let p = ChunkPlan::new(1000, 100, &[(200, 100)], Some(&changed));
        assert_eq!(
            p.runs,
            vec![(0..1, Read), (1..2, Inherit), (2..3, Zero), (3..4, Read), (4..9, Inherit), (9..10, Read)]
        );
        assert_eq!(p.count(Zero), 1);
        // Nothing changed: everything is inherited.
        assert_eq!(ChunkPlan::new(1000, 100, &[], Some(&[])).runs, vec![(0..10, Inherit)]);
    }

    #[test]
    fn subtraction_of_runs() {
        assert_eq!(subtract(&[0..10], &[2..3, 5..7, 9..12]), vec![0..2, 3..5, 7..9]);
        assert_eq!(subtract(&[0..3, 5..8], &[0..8]), Vec::<Range<u64>>::new());
        assert_eq!(subtract(&[0..3, 5..8], &[]), vec![0..3, 5..8]);
        assert_eq!(subtract(&[0..3, 5..8], &[2..6]), vec![0..2, 6..8]);
    }

    #[test]
    fn unread_runs_and_actions() {
        let changed = [(0, 1), (250, 100), (999, 1)];
        let p = ChunkPlan::new(1000, 100, &[(200, 100), (400, 100)], Some(&changed));
        assert_eq!(p.unread(), vec![1..3, 4..9]);
        assert_eq!(p.reported, vec![0..1, 2..4, 9..10]);
        assert_eq!(
            (p.action(0), p.action(2), p.action(5), p.action(10)),
            (Some(Read), Some(Zero), Some(Inherit), None)
        );
    }

    #[test]
    fn unavailable_inherited_chunks_are_read_instead() {
        let mut p = ChunkPlan::new(1000, 100, &[(200, 100)], Some(&[(0, 1)]));
        assert_eq!(p.runs, vec![(0..1, Read), (1..2, Inherit), (2..3, Zero), (3..10, Inherit)]);
        // 0 is read anyway and 2 is zero: both stay; 1, 3, 4 and 9 become reads.
        p.read_instead(&[0, 1, 2, 3, 4, 9]);
        assert_eq!(p.runs, vec![(0..2, Read), (2..3, Zero), (3..5, Read), (5..9, Inherit), (9..10, Read)]);
        assert_eq!((p.count(Read), p.count(Inherit), p.count(Zero)), (5, 4, 1));
        let before = p.clone();
        p.read_instead(&[]);
        assert_eq!(p, before);
    }

    #[test]
    fn empty_disk() {
        assert_eq!(ChunkPlan::new(0, 100, &[], None).runs, vec![]);
    }
}
