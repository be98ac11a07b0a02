//! The chunk pipeline of a backup: one reader thread (reading the chunks the plan says to
//! read, several requests in flight where the source can), one worker per core (zero
//! test, keyed hash, dedup, compression, sealing), a pack-writer thread, and the calling
//! thread putting chunk ids in disk order — read ones as they arrive, zero and inherited
//! ones from the plan and the parent's tree — to build the fixed index tree.
//!
//! ```text
//! reader ──(chunk no, bytes)──▶ workers ──(chunk no, id)──▶ caller: reorder → TreeWriter
//!                                  │                                    │ (index pages)
//!                                  └──────── sealed blobs ──────────────┴──▶ pack writer
//! ```
//!
//! All channels are bounded, so memory is a few chunks per thread whatever the disk size.
//! Any error stops every stage: a closed channel makes the sender give up.

use std::collections::{BTreeMap, HashSet};
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use blockproof_format::tree::{chunk_count, encode_page, DEFAULT_FANOUT};
use blockproof_format::{BlobKind, Id};
use blockproof_repo::{
    BlobCodec, BlobReader, PackWriter, PackWriterStats, Repository, SealedBlob, TreeReader, TreeWriter,
};
use blockproof_source::BlockSource;
use blockproof_work::{fan_out, FanOut};
use crossbeam_channel::{bounded, Sender};

use crate::availability::Availability;
use crate::plan::{Action, ChunkPlan};
use crate::{workers, CoreError, Progress};

/// Blob ids already stored or being stored by this backup, shared by all stages so
/// that a chunk seen twice is sealed once. A blob counts as stored only when a copy of it
/// lies in a pack that may be reused ([`Availability`]); a metadata page about to be
/// reused is read back once per backup first (through the backup's [`BlobReader`], which
/// remembers the pages it has read whole, so an incremental's unchanged pages cost no
/// second read).
pub(crate) struct Dedup<'a> {
    reader: &'a BlobReader<'a>,
    avail: &'a Availability,
    new: Mutex<HashSet<Id>>,
    /// Metadata blobs stored again because no copy could be reused or read back.
    pub repaired_pages: AtomicU64,
}

impl<'a> Dedup<'a> {
    pub(crate) fn new(reader: &'a BlobReader<'a>, avail: &'a Availability) -> Self {
        Dedup { reader, avail, new: Mutex::new(HashSet::new()), repaired_pages: AtomicU64::new(0) }
    }

    /// Whether a copy of the blob lies in a pack that may be reused.
    fn stored(&self, id: &Id) -> bool {
        let index = self.reader.index();
        if self.avail.all_usable() {
            index.contains(id)
        } else {
            index.stored_where(id, |pack| self.avail.usable(pack))
        }
    }

    /// Whether the blob is stored (in a pack that may be reused) or being stored.
    pub(crate) fn contains(&self, id: &Id) -> bool {
        self.stored(id) || self.new.lock().expect("dedup lock").contains(id)
    }

    /// Whether the index knows the blob at all: a blob it knows that must be stored
    /// again had only unusable copies (a repair).
    pub(crate) fn indexed(&self, id: &Id) -> bool {
        self.reader.index().contains(id)
    }

    /// True if the blob must be stored now (first sighting).
    pub(crate) fn claim(&self, id: Id) -> bool {
        !self.stored(&id) && self.new.lock().expect("dedup lock").insert(id)
    }

    /// For a metadata blob about to be reused: true if it must be stored again because
    /// no copy of it reads back whole. Each page is read at most once per backup.
    fn reclaim_unreadable(&self, id: Id, kind: BlobKind) -> bool {
        if self.reader.has_verified(&id) || self.new.lock().expect("dedup lock").contains(&id) {
            return false;
        }
        self.reader.read(&id, kind).is_err() && self.new.lock().expect("dedup lock").insert(id)
    }
}

/// Runs `work` with a pack writer thread fed by the sender it is given; returns what
/// `work` returned and the writer's statistics once every pack and index file is durable.
/// A writer failure is reported in preference to a failure of `work`, which it explains.
pub(crate) fn with_pack_writer<T>(
    repo: &Repository,
    work: impl FnOnce(&Sender<SealedBlob>) -> Result<T, CoreError>,
) -> Result<(T, PackWriterStats), CoreError> {
    let (tx, rx) = bounded::<SealedBlob>(64);
    std::thread::scope(|s| {
        let writer = s.spawn(move || {
            let mut w = PackWriter::new(repo);
            for blob in rx.iter() {
                // Once cancelled (a lost lock, a failed upload) nothing more is written.
                if let Err(c) = repo.cancel().check() {
                    return Err(w.abandon(c.into()));
                }
                w.add(blob)?;
            }
            if let Err(c) = repo.cancel().check() {
                return Err(w.abandon(c.into()));
            }
            w.finish()
        });
        let result = work(&tx);
        drop(tx);
        let written = writer.join().unwrap_or_else(|p| {
            Err(blockproof_work::WorkError::Panicked(format!(
                "pack writer thread panicked: {}",
                blockproof_work::panic_message(p.as_ref())
            ))
            .into())
        });
        match (result, written) {
            (_, Err(e)) => Err(CoreError::from(e)),
            (Err(e), _) => Err(e),
            (Ok(t), Ok((_, stats))) => Ok((t, stats)),
        }
    })
}

/// Seals metadata blobs (index and confirmation pages) and hands new ones to the pack
/// writer.
pub(crate) struct BlobSink<'a, 'd> {
    codec: BlobCodec,
    dedup: &'a Dedup<'d>,
    tx: &'a Sender<SealedBlob>,
}

impl<'a, 'd> BlobSink<'a, 'd> {
    pub(crate) fn new(repo: &Repository, dedup: &'a Dedup<'d>, tx: &'a Sender<SealedBlob>) -> Self {
        BlobSink { codec: BlobCodec::for_repo(repo), dedup, tx }
    }

    /// Stores `plain` as a blob of `kind` (once per repository); returns its id. A
    /// metadata blob is stored again when its stored copies cannot be reused or do not
    /// read back whole.
    pub(crate) fn put(&mut self, kind: BlobKind, plain: &[u8]) -> Result<Id, CoreError> {
        let id = self.codec.keys().blob_id(plain);
        let store = if self.dedup.claim(id) {
            if kind != BlobKind::Data && self.dedup.indexed(&id) {
                self.dedup.repaired_pages.fetch_add(1, Ordering::Relaxed);
            }
            true
        } else if kind != BlobKind::Data && self.dedup.reclaim_unreadable(id, kind) {
            self.dedup.repaired_pages.fetch_add(1, Ordering::Relaxed);
            true
        } else {
            false
        };
        if store {
            self.tx.send(self.codec.seal(kind, id, plain)).map_err(|_| CoreError::WriterGone)?;
        }
        Ok(id)
    }

    /// Stores one page of a fixed index tree.
    pub(crate) fn page(&mut self, ids: &[Id]) -> Result<Id, CoreError> {
        self.put(BlobKind::Tree, &encode_page(ids))
    }
}

/// At most this many chunks of evidence are kept per disk to be re-read.
pub(crate) const EVIDENCE_LIMIT: usize = 16384;

/// Counters of one disk.
#[derive(Default)]
pub(crate) struct DiskCounters {
    /// Chunks change tracking reported whose content equals the parent's: read ones whose
    /// id is the parent's, and ones the allocation map calls zero that were zero before.
    pub overreported: AtomicU64,
    /// Chunks change tracking did *not* report that the allocation map now calls zero
    /// while the parent held data: a write (a discard) it missed.
    pub cbt_missed: AtomicU64,
    /// The first [`EVIDENCE_LIMIT`] of them, to be re-read by verification.
    pub missed_chunks: Mutex<Vec<u64>>,
    pub bytes_read: AtomicU64,
    pub zero_chunks: AtomicU64,
    pub new_chunks: AtomicU64,
    pub new_bytes: AtomicU64,
    pub stored_bytes: AtomicU64,
    /// Chunks stored again because the repository's copy was missing or damaged.
    pub repaired: AtomicU64,
}

impl DiskCounters {
    /// Before the disk is stored again: forgets what describes the discarded tree (what
    /// was read, stored and repaired stays counted).
    pub fn restart(&self) {
        self.overreported.store(0, Ordering::Relaxed);
        self.zero_chunks.store(0, Ordering::Relaxed);
        self.cbt_missed.store(0, Ordering::Relaxed);
        self.missed_chunks.lock().expect("evidence lock").clear();
    }
}

pub(crate) struct DiskResult {
    pub root: Id,
    pub chunks: u64,
}

/// How storing a disk ended.
pub(crate) enum Stored {
    /// The disk's tree is complete.
    Whole(DiskResult),
    /// These inherited chunks (in order) have no copy that may be reused: read them from
    /// the source and store the disk again.
    Unavailable(Vec<u64>),
    /// The parent's index pages cannot be read (why): read the disk in full.
    ParentUnreadable(String),
}

pub(crate) fn is_zero(buf: &[u8]) -> bool {
    let words = buf.chunks_exact(16);
    let tail = words.remainder();
    words.into_iter().all(|w| u128::from_ne_bytes(w.try_into().expect("16 bytes")) == 0) && tail.iter().all(|&b| b == 0)
}

/// Puts chunk ids into the fixed index tree in disk order: zero and inherited chunks
/// straight from the plan, read ones once the workers have hashed them (they arrive out
/// of order and wait here for their turn).
struct Assembler<'p> {
    runs: std::slice::Iter<'p, (Range<u64>, Action)>,
    current: Option<(Range<u64>, Action)>,
    pending: BTreeMap<u64, Id>,
}

impl<'p> Assembler<'p> {
    fn new(plan: &'p ChunkPlan) -> Self {
        Assembler { runs: plan.runs.iter(), current: None, pending: BTreeMap::new() }
    }

    /// Hands every chunk whose id is known, in disk order, to `push`; stops at the first
    /// read chunk that has not arrived yet.
    fn advance(
        &mut self,
        mut push: impl FnMut(u64, Action, Option<Id>) -> Result<(), CoreError>,
    ) -> Result<(), CoreError> {
        loop {
            let (run, action) = match &mut self.current {
                Some((r, _)) if r.is_empty() => {
                    self.current = None;
                    continue;
                }
                Some(c) => c,
                None => match self.runs.next() {
                    Some(c) => {
                        self.current = Some(c.clone());
                        continue;
                    }
                    None => return Ok(()),
                },
            };
            let i = run.start;
            let read = match action {
                Action::Read => match self.pending.remove(&i) {
                    Some(id) => Some(id),
                    None => return Ok(()),
                },
                _ => None,
            };
            push(i, *action, read)?;
            run.start += 1;
        }
    }

    fn done(&self) -> bool {
        self.current.is_none() && self.runs.len() == 0
    }
}

/// Backs up one disk by `plan`: reads the chunks it says to read and stores the new ones,
/// takes zero chunks as [`Id::ZERO`] and inherited ones from `parent`, and returns the root
/// of the new fixed index tree. With a parent (an incremental), read chunks whose id is
/// the parent's are counted as over-reported. The reader, the workers and this thread are
/// one [`fan_out`]: the first error, a panic or the repository's cancellation stops all.
///
/// Damage is not inherited: when inherited chunks have no copy that may be reused, or
/// the parent's pages cannot be read, the tree is not finished and the caller is told
/// ([`Stored`]) so it can store the disk again with those chunks read.
#[allow(clippy::too_many_arguments)]
pub(crate) fn store_disk(
    repo: &Repository,
    dedup: &Dedup<'_>,
    source: &mut dyn BlockSource,
    plan: &ChunkPlan,
    mut parent: Option<&mut TreeReader<'_>>,
    blobs: &Sender<SealedBlob>,
    counters: &DiskCounters,
    progress: &dyn Progress,
) -> Result<Stored, CoreError> {
    let chunk_size = repo.config().chunk_size as u64;
    let size = source.size();
    let n = chunk_count(size, chunk_size as u32);
    let chunk_len = |i: u64| (size - i * chunk_size).min(chunk_size);
    let reads: Vec<Range<u64>> = plan.runs.iter().filter(|(_, a)| *a == Action::Read).map(|(r, _)| r.clone()).collect();

    let mut sink = BlobSink::new(repo, dedup, blobs);
    let mut tree = TreeWriter::new(n, DEFAULT_FANOUT);
    let mut reported = plan.reported.iter().peekable();
    let mut unavailable = Vec::new();
    let mut parent_failed: Option<String> = None;
    let outcome = {
        let mut assembler = Assembler::new(plan);
        // A parent page that cannot be read stops this pass; the caller reads in full.
        let mut parent_chunk = |parent: &mut TreeReader<'_>, i: u64| {
            parent.chunk(i).map_err(|e| {
                let e = CoreError::from(e);
                parent_failed.get_or_insert(e.to_string());
                e
            })
        };
        let mut push = |i: u64, action: Action, read: Option<Id>| -> Result<(), CoreError> {
            let id = match (action, read) {
                (Action::Zero, _) => {
                    // What the parent held here tells over-reporting from a missed write.
                    if let Some(parent) = parent.as_deref_mut() {
                        while reported.next_if(|r| r.end <= i).is_some() {}
                        let was_reported = reported.peek().is_some_and(|r| r.contains(&i));
                        let before = parent_chunk(parent, i)?;
                        if was_reported && before.is_zero() {
                            counters.overreported.fetch_add(1, Ordering::Relaxed);
                        } else if !was_reported && !before.is_zero() {
                            counters.cbt_missed.fetch_add(1, Ordering::Relaxed);
                            let mut missed = counters.missed_chunks.lock().expect("evidence lock");
                            if missed.len() < EVIDENCE_LIMIT {
                                missed.push(i);
                            }
                        }
                    }
                    Id::ZERO
                }
                (Action::Inherit, _) => {
                    let parent = parent
                        .as_deref_mut()
                        .ok_or_else(|| CoreError::Internal("an incremental plan without a parent".into()))?;
                    let id = parent_chunk(parent, i)?;
                    if !id.is_zero() && !dedup.contains(&id) {
                        if !dedup.indexed(&id) {
                            counters.repaired.fetch_add(1, Ordering::Relaxed);
                        }
                        unavailable.push(i);
                    }
                    id
                }
                (Action::Read, Some(id)) => {
                    if let Some(parent) = parent.as_deref_mut() {
                        if parent_chunk(parent, i)? == id {
                            counters.overreported.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    id
                }
                (Action::Read, None) => return Err(CoreError::Internal(format!("chunk {i} was never read"))),
            };
            if action != Action::Read && id == Id::ZERO {
                counters.zero_chunks.fetch_add(1, Ordering::Relaxed);
            }
            tree.push(id, &mut |ids: &[Id]| sink.page(ids))?;
            progress.advance(chunk_len(i));
            Ok(())
        };

        let run = fan_out(
            repo.cancel(),
            FanOut { workers: workers(), queue: 64 },
            |emit| {
                let mut ranges = reads.into_iter().flatten().map(|i| (i * chunk_size, chunk_len(i) as usize));
                let mut to_workers = |offset: u64, buf: Vec<u8>| {
                    counters.bytes_read.fetch_add(buf.len() as u64, Ordering::Relaxed);
                    emit.send((offset / chunk_size, buf))
                };
                source.read_ranges(&mut ranges, &mut to_workers).map_err(CoreError::from)
            },
            || {
                let mut codec = BlobCodec::for_repo(repo);
                move |(i, buf): (u64, Vec<u8>)| -> Result<(u64, Id), CoreError> {
                    if is_zero(&buf) {
                        counters.zero_chunks.fetch_add(1, Ordering::Relaxed);
                        return Ok((i, Id::ZERO));
                    }
                    let id = codec.keys().blob_id(&buf);
                    if dedup.claim(id) {
                        if dedup.indexed(&id) {
                            counters.repaired.fetch_add(1, Ordering::Relaxed);
                        }
                        let sealed = codec.seal(BlobKind::Data, id, &buf);
                        counters.new_chunks.fetch_add(1, Ordering::Relaxed);
                        counters.new_bytes.fetch_add(buf.len() as u64, Ordering::Relaxed);
                        counters.stored_bytes.fetch_add(sealed.bytes.len() as u64, Ordering::Relaxed);
                        blobs.send(sealed).map_err(|_| CoreError::WriterGone)?;
                    }
                    Ok((i, id))
                }
            },
            |(i, id)| {
                assembler.pending.insert(i, id);
                assembler.advance(&mut push)
            },
        );
        // Zero and inherited chunks after the last read one.
        run.and_then(|()| assembler.advance(&mut push)).and_then(|()| {
            if assembler.done() {
                Ok(())
            } else {
                Err(CoreError::Internal("the reader stopped before the end of the plan".into()))
            }
        })
    };
    if let Some(why) = parent_failed {
        return Ok(Stored::ParentUnreadable(why));
    }
    outcome?;
    if !unavailable.is_empty() {
        return Ok(Stored::Unavailable(unavailable));
    }
    let root = tree.finish(&mut |ids: &[Id]| sink.page(ids))?;
    Ok(Stored::Whole(DiskResult { root, chunks: n }))
}

#[cfg(test)]
mod tests {
    use super::is_zero;

    #[test]
    fn zero_test_handles_every_alignment() {
        let mut buf = vec![0u8; 1000];
        for start in 0..17 {
            assert!(is_zero(&buf[start..]));
        }
        for pos in [0, 1, 15, 16, 500, 999] {
            buf[pos] = 1;
            for start in 0..=pos.min(16) {
                assert!(!is_zero(&buf[start..]), "pos {pos} start {start}");
            }
            buf[pos] = 0;
        }
    }
}
