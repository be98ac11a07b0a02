//! Blob ids gathered in bounded memory and given back sorted and distinct.
//!
//! An external sort: ids are appended to a batch; a full batch is sorted, its repeats
//! dropped, and written aside as a run ([`crate::run_file`]); at the end the runs and
//! the last batch are merged. Memory is the batch (32 bytes per id) and a small read
//! buffer per run, whatever the number of ids.

use std::cell::Cell;
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::path::PathBuf;
use std::rc::Rc;

use blockproof_format::Id;

use crate::run_file::RunFiles;

/// Read-ahead per run while merging: 1 000 runs (a billion ids in batches of a million)
/// hold 64 MiB.
const RUN_BUFFER: usize = 64 << 10;

/// Ids to be given back sorted and distinct ([`SortedIds::finish`]).
pub(crate) struct SortedIds {
    batch: Vec<Id>,
    limit: usize,
    runs: RunFiles,
    pushed: u64,
}

impl SortedIds {
    /// Holds up to `limit` ids at once; runs go to files named after `base`.
    pub(crate) fn new(base: PathBuf, limit: usize) -> Self {
        SortedIds { batch: Vec::new(), limit: limit.max(1), runs: RunFiles::new(base), pushed: 0 }
    }

    /// Ids pushed so far, repeats included.
    pub(crate) fn pushed(&self) -> u64 {
        self.pushed
    }

    pub(crate) fn push(&mut self, id: Id) -> std::io::Result<()> {
        if self.batch.len() >= self.limit {
            let mut full = std::mem::take(&mut self.batch);
            sort_distinct(&mut full);
            self.runs.write(full.iter().copied())?;
            // The allocation is reused for the next batch.
            full.clear();
            self.batch = full;
        }
        self.batch.push(id);
        self.pushed += 1;
        Ok(())
    }

    /// Every id pushed, once each, in ascending order.
    pub(crate) fn finish(mut self) -> std::io::Result<Merged> {
        sort_distinct(&mut self.batch);
        let failed = Rc::new(Cell::new(false));
        let mut sources: Vec<Box<dyn Iterator<Item = Id>>> = Vec::new();
        for run in self.runs.readers::<Id>(RUN_BUFFER, &failed)? {
            sources.push(Box::new(run) as Box<dyn Iterator<Item = Id>>);
        }
        sources.push(Box::new(std::mem::take(&mut self.batch).into_iter()));
        let mut heap = BinaryHeap::with_capacity(sources.len());
        for (k, source) in sources.iter_mut().enumerate() {
            if let Some(id) = source.next() {
                heap.push(Reverse((id, k)));
            }
        }
        Ok(Merged { sources, heap, last: None, failed, _runs: self.runs })
    }
}

fn sort_distinct(ids: &mut Vec<Id>) {
    ids.sort_unstable();
    ids.dedup();
}

/// The merge of [`SortedIds::finish`]: ascending, each id once. If a run failed to read
/// back as written ([`Merged::failed`]), what it gave was not the whole set.
pub(crate) struct Merged {
    sources: Vec<Box<dyn Iterator<Item = Id>>>,
    heap: BinaryHeap<Reverse<(Id, usize)>>,
    last: Option<Id>,
    failed: Rc<Cell<bool>>,
    /// Kept until the merge is dropped: the run files are removed then.
    _runs: RunFiles,
}

impl Merged {
    pub(crate) fn failed(&self) -> bool {
        self.failed.get()
    }
}

impl Iterator for Merged {
    type Item = Id;

    fn next(&mut self) -> Option<Id> {
        while let Some(Reverse((id, k))) = self.heap.pop() {
            if let Some(next) = self.sources[k].next() {
                self.heap.push(Reverse((next, k)));
            }
            if self.last != Some(id) {
                self.last = Some(id);
                return Some(id);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    #[test]
    fn ids_come_back_sorted_and_distinct_through_spilled_runs() {
        let dir = tempfile::tempdir().unwrap();
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        // 40 distinct ids pushed 5 000 times: every batch of 64 holds repeats, and so do
        // the runs of each other.
        let pool: Vec<Id> = (0..40).map(|_| Id(rng.gen())).collect();
        let mut ids = SortedIds::new(dir.path().join("ids"), 64);
        for _ in 0..5000 {
            ids.push(pool[rng.gen_range(0..pool.len())]).unwrap();
        }
        assert_eq!(ids.pushed(), 5000);
        assert!(ids.runs.len() > 10, "the batches were spilled");
        let merged = ids.finish().unwrap();
        let mut expect = pool.clone();
        expect.sort();
        let got: Vec<Id> = merged.collect();
        assert_eq!(got, expect);
    }

    #[test]
    fn a_set_that_fits_is_never_written_and_an_empty_one_is_empty() {
        let dir = tempfile::tempdir().unwrap();
        let mut ids = SortedIds::new(dir.path().join("ids"), 100);
        for k in [3u8, 1, 3, 2] {
            ids.push(Id([k; 32])).unwrap();
        }
        let merged = ids.finish().unwrap();
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        assert_eq!(merged.collect::<Vec<_>>(), vec![Id([1; 32]), Id([2; 32]), Id([3; 32])]);
        assert_eq!(SortedIds::new(dir.path().join("ids"), 1).finish().unwrap().count(), 0);
    }

    #[test]
    fn run_files_are_removed_when_the_merge_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let mut ids = SortedIds::new(dir.path().join("ids"), 2);
        for k in 0..10u8 {
            ids.push(Id([k; 32])).unwrap();
        }
        let mut merged = ids.finish().unwrap();
        assert_eq!(merged.next(), Some(Id([0; 32])));
        assert!(std::fs::read_dir(dir.path()).unwrap().count() >= 4);
        assert!(!merged.failed());
        drop(merged);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
