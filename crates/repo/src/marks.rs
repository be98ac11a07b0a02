//! Mark bits over the blob index: one bit per position of its table.
//!
//! Operations that walk every snapshot (gc's mark phase, check's referenced chunks and
//! visited tree pages) keep what they have seen as bits parallel to the blob index's
//! sorted table, found by [`BlobIndex::position`], instead of a set of ids: an eighth of
//! a byte per location rather than 40 bytes or more per blob. A blob the index does not
//! know has no position and cannot be marked: the caller keeps those apart (they are
//! errors, or losses `repair` recorded, so few).
//!
//! Marks belong to one index as it was when they were made: a position means nothing
//! in another index, or in the same one after a pack was added.

use std::collections::HashSet;
use std::path::Path;

use blockproof_format::Id;
use blockproof_store::StoreError;

use crate::sorted_ids::SortedIds;
use crate::{BlobIndex, RepoError};

/// A set of positions of one [`BlobIndex`]'s table, one bit each.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Marks {
    words: Vec<u64>,
    len: usize,
    count: usize,
}

impl Marks {
    /// No marks, for every position of `index`.
    pub fn new(index: &BlobIndex) -> Self {
        Self::with_len(index.table_len())
    }

    /// No marks, for positions `0..len`.
    pub fn with_len(len: usize) -> Self {
        Marks { words: vec![0; len.div_ceil(64)], len, count: 0 }
    }

    /// The number of positions.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The number of marked positions.
    pub fn count(&self) -> usize {
        self.count
    }

    /// Marks a position; true if it was not marked. Panics on a position past the end
    /// (a position of another index: a bug).
    pub fn insert(&mut self, at: usize) -> bool {
        assert!(at < self.len, "position {at} past {} marks", self.len);
        let (word, bit) = (&mut self.words[at / 64], 1u64 << (at % 64));
        let new = *word & bit == 0;
        *word |= bit;
        self.count += usize::from(new);
        new
    }

    /// Unmarks a position; true if it was marked.
    pub fn remove(&mut self, at: usize) -> bool {
        assert!(at < self.len, "position {at} past {} marks", self.len);
        let (word, bit) = (&mut self.words[at / 64], 1u64 << (at % 64));
        let was = *word & bit != 0;
        *word &= !bit;
        self.count -= usize::from(was);
        was
    }

    /// Whether a position is marked (a position past the end is not).
    pub fn contains(&self, at: usize) -> bool {
        at < self.len && self.words[at / 64] & (1u64 << (at % 64)) != 0
    }

    /// Marks the blob `id` of `index`: `Some(true)` if it was not marked, `Some(false)`
    /// if it was, `None` if the index does not know it.
    pub fn mark(&mut self, index: &BlobIndex, id: &Id) -> Option<bool> {
        index.position(id).map(|at| self.insert(at))
    }

    /// Whether the blob `id` of `index` is marked (an unknown blob is not).
    pub fn is_marked(&self, index: &BlobIndex, id: &Id) -> bool {
        index.position(id).is_some_and(|at| self.contains(at))
    }

    /// The marked positions, in order.
    pub fn iter(&self) -> impl Iterator<Item = usize> + '_ {
        self.words.iter().enumerate().flat_map(|(w, &word)| {
            let mut rest = word;
            std::iter::from_fn(move || {
                (rest != 0).then(|| {
                    let bit = rest.trailing_zeros() as usize;
                    rest &= rest - 1;
                    w * 64 + bit
                })
            })
        })
    }
}

/// Ids kept in memory at once while marking through a local cache: 64 MiB (small in
/// tests, so that they spill and merge).
const QUEUE_BATCH: usize = if cfg!(test) { 100 } else { 1 << 21 };

/// Blobs to mark, by id, gathered while trees are walked and marked together by
/// [`MarkQueue::finish`]: with the blob index's table on disk (a local cache), looking up
/// each referenced blob would read a page per blob; the queue sorts the ids in bounded
/// memory ([`crate::sorted_ids`], spilling runs beside the cache file) and marks them in
/// one walk along the table. An index in memory is marked at once.
pub struct MarkQueue {
    deferred: Option<SortedIds>,
    /// Unknown ids met while marking at once: a set, so that a damaged repository's
    /// missing blob referenced again and again is held once.
    unknown: HashSet<Id>,
}

impl MarkQueue {
    pub fn new(index: &BlobIndex) -> Self {
        let deferred = index.scratch_base("marks").map(|base| SortedIds::new(base, QUEUE_BATCH));
        MarkQueue { deferred, unknown: HashSet::new() }
    }

    /// Queues the blob `id` to be marked in `marks` (or marks it now). Fails only if its
    /// temporary files cannot be written.
    pub fn push(&mut self, index: &BlobIndex, marks: &mut Marks, id: Id) -> Result<(), RepoError> {
        match &mut self.deferred {
            Some(ids) => ids.push(id).map_err(|e| scratch_error(index, e)),
            None => {
                if marks.mark(index, &id).is_none() {
                    self.unknown.insert(id);
                }
                Ok(())
            }
        }
    }

    /// Marks every queued blob in `marks`; returns those the index does not know (each
    /// once).
    pub fn finish(self, index: &BlobIndex, marks: &mut Marks) -> Result<Vec<Id>, RepoError> {
        let MarkQueue { deferred, unknown } = self;
        let mut unknown: Vec<Id> = unknown.into_iter().collect();
        if let Some(ids) = deferred {
            let count = ids.pushed();
            let mut merged = ids.finish().map_err(|e| scratch_error(index, e))?;
            index.positions_sorted(&mut merged, count, |id, at| match at {
                Some(at) => {
                    marks.insert(at);
                }
                None => unknown.push(id),
            });
            if merged.failed() {
                let e = std::io::Error::other("a temporary run changed while it was merged");
                return Err(scratch_error(index, e));
            }
        }
        unknown.sort_unstable();
        unknown.dedup();
        Ok(unknown)
    }
}

fn scratch_error(index: &BlobIndex, e: std::io::Error) -> RepoError {
    let path = index.scratch_base("marks").unwrap_or_default();
    let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
    RepoError::Store(StoreError::Io { path: dir, source: e })
}

#[cfg(test)]
mod tests {
    use super::*;
    use blockproof_format::{BlobEntry, BlobKind, Compression};

    fn id(k: u8) -> Id {
        let mut i = Id([k.wrapping_mul(37); 32]);
        i.0[31] = k;
        i
    }

    fn entry(id: Id, offset: u64) -> BlobEntry {
        BlobEntry { kind: BlobKind::Data, compression: Compression::Lz4, id, offset, length: 10, raw_length: 10 }
    }

    #[test]
    fn bits_count_and_iterate_in_order() {
        let mut m = Marks::with_len(200);
        assert!(m.insert(3) && m.insert(64) && m.insert(199) && !m.insert(64));
        assert_eq!(m.count(), 3);
        assert!(m.contains(3) && !m.contains(4) && !m.contains(500));
        assert_eq!(m.iter().collect::<Vec<_>>(), vec![3, 64, 199]);
        assert!(m.remove(64) && !m.remove(64));
        assert_eq!((m.count(), m.iter().collect::<Vec<_>>()), (2, vec![3, 199]));
        assert_eq!(Marks::with_len(0).iter().count(), 0);
    }

    /// A blob is marked at its first location's position, in a bulk-loaded index and in
    /// one with several runs (a blob whose first location is in an older run than a
    /// further copy); an unknown blob cannot be marked.
    #[test]
    fn blobs_are_marked_by_their_position_in_any_index() {
        let mut bulk = crate::IndexBuilder::new();
        let mut runs = BlobIndex::default();
        for (pack, ks) in [(id(200), &[1u8, 2, 3][..]), (id(201), &[3, 4][..]), (id(202), &[5, 1][..])] {
            let es: Vec<BlobEntry> = ks.iter().enumerate().map(|(o, k)| entry(id(*k), o as u64 * 10)).collect();
            bulk.add_pack(pack, &es);
            runs.add_pack(pack, &es);
        }
        for index in [bulk.finish(), runs] {
            assert_eq!(index.table_len(), 7);
            let mut m = Marks::new(&index);
            assert_eq!(m.mark(&index, &id(3)), Some(true));
            assert_eq!(m.mark(&index, &id(3)), Some(false));
            assert_eq!(m.mark(&index, &id(9)), None);
            assert!(m.is_marked(&index, &id(3)) && !m.is_marked(&index, &id(4)) && !m.is_marked(&index, &id(9)));
            // Every location of blob 3 names its blob's (marked) position.
            let table: Vec<_> = index.iter_table().collect();
            let threes: Vec<_> = table.iter().filter(|t| t.entry.id == id(3)).collect();
            assert_eq!(threes.len(), 2);
            assert!(threes.iter().all(|t| m.contains(t.blob)));
            assert_eq!(threes.iter().filter(|t| t.at == t.blob).count(), 1);
            assert_eq!(m.count(), 1);
        }
    }
}
