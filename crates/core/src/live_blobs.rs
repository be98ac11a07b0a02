//! The live blobs: what the snapshots reference, as mark bits over the blob index.
//!
//! gc's mark phase and check's tree walk read every page of every snapshot's trees and
//! keep what they saw as [`Marks`] (one bit per location of the index's sorted table)
//! rather than a set of ids; a page already marked is not read again, so the pages a
//! snapshot shares with its parent are walked once. Referenced blobs the index does not
//! know cannot be marked: they are kept apart by id (errors, or losses `repair`
//! recorded).
//!
//! gc plans from the same table and bits, without a second copy of the index: one pass
//! gives each pack's live and dead bytes ([`pack_usage`]); the live blobs of the packs it
//! rewrites are collected a batch of packs at a time, a pass over the table per batch
//! ([`for_each_live_list`]).

use std::collections::{BTreeMap, HashMap, HashSet};

use blockproof_format::tree::{decode_page, level_sizes, page_len, MAX_FANOUT, MIN_FANOUT};
use blockproof_format::{BlobEntry, BlobKind, Compression, Id};
use blockproof_repo::{BlobIndex, BlobReader, MarkQueue, Marks, RepoError, Repository};

use crate::CoreError;

/// Every blob some snapshot references, marked in the index it was walked with.
pub(crate) struct LiveBlobs {
    pub marks: Marks,
    /// Referenced blobs the index does not know.
    pub unindexed: HashSet<Id>,
    pub snapshots: u64,
}

impl LiveBlobs {
    /// The number of distinct referenced blobs.
    pub fn count(&self) -> u64 {
        (self.marks.count() + self.unindexed.len()) as u64
    }

    /// Whether the blob at this position of the index is referenced.
    pub fn contains(&self, at: usize) -> bool {
        self.marks.contains(at)
    }
}

/// Every blob some snapshot references (chunks, index pages, confirmation pages). gc
/// deletes by the absence of references, so a snapshot whose trees cannot be read whole
/// makes it refuse to run.
///
/// Blobs `repair` found in no pack and reported lost (`state/repair`) are the exception:
/// repair read every pack, so no pack holds them, and a lost page's subtree can only come
/// back with a backup that stores the same content again (which stores its chunks too).
///
/// A page of the index's local cache that failed its check during the walk is reported
/// as that, whether the walk failed on it (a tree page not found) or not (the leaves it
/// should have marked would otherwise look like blobs in no index file).
pub(crate) fn mark(repo: &Repository, index: &BlobIndex) -> Result<LiveBlobs, CoreError> {
    let lost = crate::repair::recorded_losses(repo);
    let live = mark_all(repo, index, &lost).map_err(|e| {
        // What the index's local cache failed to give is that failure, not missing data.
        if let Some(damage) = index.damage() {
            return damage.into();
        }
        if let CoreError::Refused(_) = e {
            return e;
        }
        CoreError::Refused(format!(
            "gc refuses to run while data that snapshots reference is missing or unreadable (it could not \
             tell what is unused): {e}; nothing was deleted (run blockproof check, then blockproof repair)"
        ))
    })?;
    match index.damage() {
        Some(damage) => Err(damage.into()),
        None => Ok(live),
    }
}

fn mark_all(repo: &Repository, index: &BlobIndex, lost: &HashSet<Id>) -> Result<LiveBlobs, CoreError> {
    use blockproof_format::tree::{chunk_count, DEFAULT_FANOUT};
    let reader = BlobReader::new(repo, index);
    let snapshots = repo.snapshots()?;
    let mut live = LiveBlobs { marks: Marks::new(index), unindexed: HashSet::new(), snapshots: snapshots.len() as u64 };
    let mut walked = Vec::new();
    // Pages are marked as they are walked (so that a shared one is read once); their
    // leaves are queued and marked together after the walk.
    let mut queue = MarkQueue::new(index);
    let mut leaf = |marks: &mut Marks, id: Id| queue.push(index, marks, id).map_err(scratch_error);
    for s in &snapshots {
        for d in &s.snapshot.disks {
            let chunks = chunk_count(d.size, d.chunk_size);
            walk(&reader, d.index_root, chunks, d.index_fanout, &mut live.marks, &mut walked, lost, &mut leaf)?;
            if let Some(root) = d.confirm_root {
                let pages = blockproof_format::confirm::page_count(chunks);
                walk(&reader, root, pages, DEFAULT_FANOUT, &mut live.marks, &mut walked, lost, &mut leaf)?;
            }
            walked.clear();
        }
    }
    live.unindexed.extend(queue.finish(index, &mut live.marks).map_err(scratch_error)?);
    Ok(live)
}

/// A failure to sort the referenced blobs aside ([`MarkQueue`]): not missing data.
pub(crate) fn scratch_error(e: RepoError) -> CoreError {
    CoreError::Refused(format!(
        "the referenced blobs could not be sorted in the index cache's directory ({e}); nothing was changed \
         (free space there, or run with --no-cache)"
    ))
}

/// Walks a tree: each page not yet marked in `pages` is marked, read and its children
/// followed; each non-zero leaf is given to `leaf` (with `pages`, which gc also marks its
/// leaves in). A page already marked is not read again: its content, and so its subtree,
/// is determined by its id. A page `repair` recorded as lost (`lost`) is skipped. The
/// positions this walk marked are appended to `walked` (check unmarks them when the
/// walk fails, so that each snapshot sharing a damaged page reports it).
#[allow(clippy::too_many_arguments)]
pub(crate) fn walk(
    reader: &BlobReader<'_>,
    root: Id,
    leaves: u64,
    fanout: u32,
    pages: &mut Marks,
    walked: &mut Vec<usize>,
    lost: &HashSet<Id>,
    leaf: &mut impl FnMut(&mut Marks, Id) -> Result<(), CoreError>,
) -> Result<(), CoreError> {
    if !(MIN_FANOUT..=MAX_FANOUT).contains(&fanout) {
        return Err(RepoError::corrupt("fixed index", format!("fanout {fanout} out of range")).into());
    }
    let index = reader.index();
    let sizes = level_sizes(leaves, fanout);
    let mut stack = vec![(sizes.len() - 1, 0u64, root)];
    while let Some((level, page, id)) = stack.pop() {
        if id.is_zero() {
            continue;
        }
        // A page the index does not know fails to read below.
        if let Some(at) = index.position(&id) {
            if !pages.insert(at) {
                continue;
            }
            walked.push(at);
        }
        let plain = match reader.read(&id, BlobKind::Tree) {
            Ok(p) => p,
            Err(_) if lost.contains(&id) => continue,
            Err(e) => return Err(e.into()),
        };
        let ids = decode_page(&plain, page_len(sizes[level], page, fanout))
            .map_err(|e| RepoError::corrupt(format!("index page {id}"), e))?;
        for (k, child) in ids.into_iter().enumerate() {
            if level == 0 {
                if !child.is_zero() {
                    leaf(pages, child)?;
                }
            } else {
                stack.push((level - 1, page * u64::from(fanout) + k as u64, child));
            }
        }
    }
    Ok(())
}

/// Fails unless every blob some snapshot references is listed by an index file in a pack
/// that exists: gc deletes by the absence of references, so it must never run on a
/// repository whose references it cannot see whole (a pack renamed or lost, an index
/// file lost — its packs would look unindexed and be deleted). Blobs `repair` recorded as
/// lost after reading every pack are the exception (see [`mark`]).
pub(crate) fn refuse_if_data_missing(
    repo: &Repository,
    index: &BlobIndex,
    live: &LiveBlobs,
    stored: &HashSet<Id>,
) -> Result<(), CoreError> {
    let lost = crate::repair::recorded_losses(repo);
    let unindexed = live.unindexed.iter().filter(|id| !lost.contains(*id)).count();
    let in_stored: Vec<bool> = index.packs().iter().map(|p| stored.contains(p)).collect();
    let stored_somewhere = covered(index, live, |pack| in_stored[pack as usize]);
    let mut missing_packs: BTreeMap<Id, u64> = BTreeMap::new();
    for t in index.iter_table() {
        let first = t.at == t.blob;
        if first && live.contains(t.blob) && !stored_somewhere.contains(t.blob) && !lost.contains(&t.entry.id) {
            *missing_packs.entry(index.packs()[t.pack as usize]).or_default() += 1;
        }
    }
    if unindexed == 0 && missing_packs.is_empty() {
        return Ok(());
    }
    let mut what = Vec::new();
    if let Some((pack, blobs)) = missing_packs.iter().next() {
        what.push(format!(
            "{} pack file(s) listed by the index are missing (e.g. pack {pack}, holding {blobs} referenced blob(s))",
            missing_packs.len()
        ));
    }
    if unindexed > 0 {
        what.push(format!("{unindexed} referenced blob(s) are in no index file"));
    }
    Err(CoreError::Refused(format!(
        "gc refuses to run while data that snapshots reference is missing: {}; nothing was deleted \
         (run blockproof check for the full list, and blockproof repair)",
        what.join("; ")
    )))
}

/// The referenced blobs with a location in a pack `keeps` accepts (by pack position).
pub(crate) fn covered(index: &BlobIndex, live: &LiveBlobs, keeps: impl Fn(u32) -> bool) -> Marks {
    let mut out = Marks::new(index);
    for t in index.iter_table() {
        if live.contains(t.blob) && keeps(t.pack) {
            out.insert(t.blob);
        }
    }
    out
}

/// What one indexed pack holds, by the index: all its blobs' sealed bytes, those of
/// blobs no snapshot references, how many referenced blobs, whether one is LZ4.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct PackUsage {
    pub total: u64,
    pub dead: u64,
    pub live_blobs: u64,
    pub live_lz4: bool,
}

/// Each pack's usage, by position in [`BlobIndex::packs`]: one pass over the table.
pub(crate) fn pack_usage(index: &BlobIndex, live: &LiveBlobs) -> Vec<PackUsage> {
    let mut usage = vec![PackUsage::default(); index.packs().len()];
    for t in index.iter_table() {
        let u = &mut usage[t.pack as usize];
        let length = u64::from(t.entry.length);
        u.total += length;
        if live.contains(t.blob) {
            u.live_blobs += 1;
            u.live_lz4 |= t.entry.compression == Compression::Lz4;
        } else {
            u.dead += length;
        }
    }
    usage
}

/// Live blobs collected per pass over the table: at least this many, or a 32nd of the
/// table (about 2 bytes per location at most), whichever is more.
const BATCH_MIN: usize = 1 << 16;

/// Calls `each` with the number in `packs` and the referenced blobs' entries, in offset
/// order, of every one of `packs` (indexed ones) in turn, until it returns false. The
/// lists are collected a batch of packs at a time by a pass over the table each, a batch
/// holding at most about a 32nd of the table's locations (at least one pack).
pub(crate) fn for_each_live_list(
    index: &BlobIndex,
    live: &LiveBlobs,
    usage: &[PackUsage],
    packs: &[Id],
    each: impl FnMut(usize, Vec<BlobEntry>) -> Result<bool, CoreError>,
) -> Result<(), CoreError> {
    let limit = (index.table_len() / 32).max(BATCH_MIN) as u64;
    live_lists_in_batches(index, live, usage, packs, limit, each)
}

fn live_lists_in_batches(
    index: &BlobIndex,
    live: &LiveBlobs,
    usage: &[PackUsage],
    packs: &[Id],
    limit: u64,
    mut each: impl FnMut(usize, Vec<BlobEntry>) -> Result<bool, CoreError>,
) -> Result<(), CoreError> {
    let mut start = 0;
    while start < packs.len() {
        // This batch: packs[start..end], by pack position.
        let mut batch: HashMap<u32, usize> = HashMap::new();
        let (mut end, mut blobs) = (start, 0u64);
        while end < packs.len() && (end == start || blobs < limit) {
            if let Some(p) = index.pack_position(&packs[end]) {
                blobs += usage[p as usize].live_blobs;
                batch.insert(p, end - start);
            }
            end += 1;
        }
        let mut lists: Vec<Vec<BlobEntry>> = vec![Vec::new(); end - start];
        for t in index.iter_table() {
            if let Some(&k) = batch.get(&t.pack) {
                if live.contains(t.blob) {
                    lists[k].push(t.entry);
                }
            }
        }
        for (k, mut list) in lists.into_iter().enumerate() {
            list.sort_by_key(|e| e.offset);
            if !each(start + k, list)? {
                return Ok(());
            }
        }
        start = end;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use blockproof_repo::IndexBuilder;

    fn id(k: u32) -> Id {
        let mut i = Id([0; 32]);
        i.0[..4].copy_from_slice(&k.wrapping_mul(0x9E37_79B9).to_be_bytes());
        i.0[31] = 1;
        i
    }

    fn entry(k: u32, offset: u64, compression: Compression) -> BlobEntry {
        BlobEntry { kind: BlobKind::Data, compression, id: id(k), offset, length: 100 + k, raw_length: 200 }
    }

    /// Packs 1000..1004 of blobs 10 * p .. 10 * p + 10 (blob 6 also in pack 1001, LZ4
    /// only in pack 1000); every third blob referenced.
    fn fixture() -> (BlobIndex, LiveBlobs) {
        let mut b = IndexBuilder::new();
        for p in 0..4u32 {
            let compression = if p == 0 { Compression::Lz4 } else { Compression::Zstd };
            let mut es: Vec<BlobEntry> = (0..10).map(|k| entry(10 * p + k, u64::from(k) * 1000, compression)).collect();
            if p == 1 {
                es.push(entry(6, 20_000, compression));
            }
            // Listed out of offset order: the lists come back in offset order.
            es.reverse();
            b.add_pack(id(1000 + p), &es);
        }
        let index = b.finish();
        let mut live = LiveBlobs { marks: Marks::new(&index), unindexed: HashSet::new(), snapshots: 1 };
        for k in (0..40).step_by(3) {
            live.marks.mark(&index, &id(k)).expect("indexed");
        }
        (index, live)
    }

    #[test]
    fn pack_usage_counts_live_and_dead_bytes_per_pack() {
        let (index, live) = fixture();
        let usage = pack_usage(&index, &live);
        for p in 0..4u32 {
            let u = usage[index.pack_position(&id(1000 + p)).unwrap() as usize];
            let mut ks: Vec<u32> = (10 * p..10 * p + 10).collect();
            if p == 1 {
                ks.push(6);
            }
            let total: u64 = ks.iter().map(|k| u64::from(100 + k)).sum();
            let live_ks: Vec<&u32> = ks.iter().filter(|k| *k % 3 == 0).collect();
            let dead: u64 = ks.iter().filter(|k| *k % 3 != 0).map(|k| u64::from(100 + k)).sum();
            assert_eq!((u.total, u.dead, u.live_blobs, u.live_lz4), (total, dead, live_ks.len() as u64, p == 0));
        }
    }

    /// Whatever the batch size, every pack asked for comes once, in order, with exactly
    /// its referenced blobs in offset order; returning false stops.
    #[test]
    fn live_lists_come_per_pack_in_offset_order_in_any_batching() {
        let (index, live) = fixture();
        let usage = pack_usage(&index, &live);
        let packs = [id(1002), id(1000), id(9999), id(1001)];
        let mut want = Vec::new();
        for (k, p) in packs.iter().enumerate() {
            let mut es: Vec<BlobEntry> = index
                .iter_all()
                .filter(|(i, pack, _)| pack == p && live.marks.is_marked(&index, i))
                .map(|t| t.2)
                .collect();
            es.sort_by_key(|e| e.offset);
            want.push((k, es));
        }
        assert!(want[3].1.last().is_some_and(|e| e.id == id(6)) && want[2].1.is_empty());
        for limit in [1, 3, 100] {
            let mut got = Vec::new();
            live_lists_in_batches(&index, &live, &usage, &packs, limit, |k, es| {
                got.push((k, es));
                Ok(true)
            })
            .unwrap();
            assert_eq!(got, want, "batches of {limit}");
            let mut calls = 0;
            live_lists_in_batches(&index, &live, &usage, &packs, limit, |_, _| {
                calls += 1;
                Ok(calls < 2)
            })
            .unwrap();
            assert_eq!(calls, 2);
        }
    }
}
