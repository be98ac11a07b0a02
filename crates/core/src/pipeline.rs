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

use blockproof_format::basis::IndexBasis;
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

    /// [`Dedup::contains`] of each of `ids` (ascending, distinct), in one walk along the
    /// index rather than a lookup each.
    pub(crate) fn contains_sorted(&self, ids: &[Id]) -> Vec<bool> {
        let mut out = Vec::with_capacity(ids.len());
        let all = self.avail.all_usable();
        self.reader.index().stored_where_sorted(
            ids.iter().copied(),
            ids.len() as u64,
            |pack| all || self.avail.usable(pack),
            |_, stored| out.push(stored),
        );
        let new = self.new.lock().expect("dedup lock");
        for (stored, id) in out.iter_mut().zip(ids) {
            *stored = *stored || new.contains(id);
        }
        out
    }

    /// Whether every blob found in lookups on `basis` may still be reused without a
    /// lookup: this index holds all its index files, and every pack may be reused.
    pub(crate) fn holds(&self, basis: &IndexBasis) -> bool {
        self.avail.all_usable() && self.reader.index().holds(basis)
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

    /// For each of `ids` (ascending, distinct), looked up together: whether a copy of the
    /// blob lies in a pack that may be reused (or it is being stored by this backup), so
    /// that a metadata blob may be kept by id without being read back.
    pub(crate) fn reusable_sorted(&self, ids: &[Id]) -> Vec<bool> {
        self.dedup.contains_sorted(ids)
    }

    /// Stores one page of a fixed index tree.
    pub(crate) fn page(&mut self, ids: &[Id]) -> Result<Id, CoreError> {
        self.put(BlobKind::Tree, &encode_page(ids))
    }

    /// The id [`BlobSink::page`] gives a page of `ids` (zero for one of zero ids, which a
    /// tree does not store), without storing it.
    pub(crate) fn page_id(&self, ids: &[Id]) -> Id {
        if ids.iter().all(Id::is_zero) {
            Id::ZERO
        } else {
            self.codec.keys().blob_id(&encode_page(ids))
        }
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

/// A parent tree every blob of which may be reused without a lookup (the disk's tree basis
/// holds, [`crate::page_summaries::tree_reusable`]), with the count of zero chunks the
/// backup that committed it recorded (its [`blockproof_format::DiskStats::zero_chunks`]).
/// Its unchanged pages are then taken whole at any level without being read: the new
/// tree's zero chunks under them are the parent's count less the parent's zero chunks
/// everywhere else, which the backup sees anyway ([`Builder::unread_zeros`]).
#[derive(Clone, Copy, Debug)]
pub(crate) struct ReusableParent {
    pub zero_chunks: u64,
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

/// Walks the plan in disk order: hands each read chunk to `push` once the workers have
/// hashed it (they arrive out of order and wait here for their turn), and each stretch of
/// zero and inherited chunks as it comes; `push` says how many chunks it took.
struct Assembler<'p> {
    runs: &'p [(Range<u64>, Action)],
    /// The run holding `pos`.
    k: usize,
    /// The next chunk to hand on.
    pos: u64,
    pending: BTreeMap<u64, Id>,
}

impl<'p> Assembler<'p> {
    fn new(plan: &'p ChunkPlan) -> Self {
        Assembler { runs: &plan.runs, k: 0, pos: 0, pending: BTreeMap::new() }
    }

    /// Hands on every chunk whose id is known or comes from the plan, in disk order;
    /// stops at the first read chunk that has not arrived yet. `push` gets the chunk, its
    /// id if it was read, and the plan's runs from the one holding it on.
    fn advance(
        &mut self,
        mut push: impl FnMut(u64, Option<Id>, &[(Range<u64>, Action)]) -> Result<u64, CoreError>,
    ) -> Result<(), CoreError> {
        loop {
            while self.runs.get(self.k).is_some_and(|(r, _)| r.end <= self.pos) {
                self.k += 1;
            }
            let Some((_, action)) = self.runs.get(self.k) else {
                return Ok(());
            };
            let read = match action {
                Action::Read => match self.pending.remove(&self.pos) {
                    Some(id) => Some(id),
                    None => return Ok(()),
                },
                _ => None,
            };
            let took = push(self.pos, read, &self.runs[self.k..])?;
            self.pos += took.max(1);
        }
    }

    fn done(&self) -> bool {
        self.k >= self.runs.len()
    }
}

/// Whether chunk `i` lies in one of the sorted runs.
fn in_runs(runs: &[Range<u64>], i: u64) -> bool {
    let k = runs.partition_point(|r| r.end <= i);
    runs.get(k).is_some_and(|r| r.contains(&i))
}

/// Chunks of `span` that lie in the sorted runs.
fn overlap(runs: &[Range<u64>], span: Range<u64>) -> u64 {
    let k = runs.partition_point(|r| r.end <= span.start);
    runs[k..].iter().take_while(|r| r.start < span.end).map(|r| r.end.min(span.end) - r.start.max(span.start)).sum()
}

/// Progress is reported once per read chunk, once per page taken whole, and at most once
/// per this many bytes of zero and inherited chunks taken one by one.
const PROGRESS_STEP: u64 = 64 << 20;

/// Builds the new fixed index tree of one disk from the plan, the read chunks' ids and
/// the parent's tree: a page of the parent wholly made of zero and inherited chunks is
/// taken by its id, not chunk by chunk ([`Builder::unread`]).
struct Builder<'a, 'r, 's, 'd> {
    n: u64,
    chunk_size: u64,
    size: u64,
    parent: Option<&'a mut TreeReader<'r>>,
    /// Set when every blob `parent` references may be reused without a lookup.
    reusable: Option<ReusableParent>,
    /// The parent's zero chunks among the chunks not taken by an unread page.
    parent_zeros_seen: u64,
    /// The parent's pages taken whole without being read (their chunks).
    unread_pages: Vec<Range<u64>>,
    tree: TreeWriter,
    sink: BlobSink<'s, 'd>,
    dedup: &'s Dedup<'d>,
    counters: &'a DiskCounters,
    progress: &'a dyn Progress,
    reported: &'a [Range<u64>],
    unavailable: Vec<u64>,
    parent_failed: Option<String>,
    /// Bytes done but not yet reported to `progress`.
    unreported: u64,
}

impl Builder<'_, '_, '_, '_> {
    fn chunk_len(&self, i: u64) -> u64 {
        (self.size - i * self.chunk_size).min(self.chunk_size)
    }

    /// Records a parent page that cannot be read: this pass stops, the caller reads in full.
    fn parent_error(&mut self, e: blockproof_repo::RepoError) -> CoreError {
        let e = CoreError::from(e);
        self.parent_failed.get_or_insert(e.to_string());
        e
    }

    fn parent_chunk(&mut self, i: u64) -> Result<Option<Id>, CoreError> {
        let Some(parent) = self.parent.as_deref_mut() else {
            return Ok(None);
        };
        match parent.chunk(i) {
            Ok(id) => Ok(Some(id)),
            Err(e) => Err(self.parent_error(e)),
        }
    }

    fn done(&mut self, bytes: u64, flush: bool) {
        self.unreported += bytes;
        if flush || self.unreported >= PROGRESS_STEP {
            self.progress.advance(std::mem::take(&mut self.unreported));
        }
    }

    fn push(&mut self, id: Id) -> Result<(), CoreError> {
        let sink = &mut self.sink;
        self.tree.push(id, &mut |ids: &[Id]| sink.page(ids))
    }

    /// A read chunk, hashed.
    fn read(&mut self, i: u64, id: Id) -> Result<(), CoreError> {
        let before = self.parent_chunk(i)?;
        if before == Some(id) {
            self.counters.overreported.fetch_add(1, Ordering::Relaxed);
        }
        if before.is_some_and(|b| b.is_zero()) {
            self.parent_zeros_seen += 1;
        }
        self.push(id)?;
        // A read chunk took a read: reported at once (the rate shown is the source's).
        let len = self.chunk_len(i);
        self.done(len, true);
        Ok(())
    }

    /// Zero and inherited chunks from chunk `i` on (`runs`: the plan from the run holding
    /// `i`); returns how many were taken: a whole page of the parent when one starts at `i`
    /// and lies wholly in zero and inherited runs ([`Builder::page`]), else one chunk.
    fn unread(&mut self, i: u64, runs: &[(Range<u64>, Action)]) -> Result<u64, CoreError> {
        let mut stretch = i;
        for (r, a) in runs {
            if *a == Action::Read || r.start > stretch {
                break;
            }
            stretch = r.end;
        }
        let f = u64::from(DEFAULT_FANOUT);
        // The largest page (below the root) starting at `i` inside the stretch.
        for level in (0..self.tree.levels() - 1).rev() {
            let span = (0..=level).fold(1u64, |acc, _| acc.saturating_mul(f));
            let end = i.saturating_add(span).min(self.n);
            if i.is_multiple_of(span) && end <= stretch && self.page(level, i..end, span, runs)? {
                self.done((end * self.chunk_size).min(self.size) - i * self.chunk_size, true);
                return Ok(end - i);
            }
        }
        self.chunk(i, runs[0].1)?;
        Ok(1)
    }

    /// Takes the parent's page of `level` covering `chunks` (all zero or inherited) whole
    /// when that gives the same tree and the same counts as chunk by chunk: a page that
    /// was all zeros in the parent (or any page of zero chunks in a full backup), a page
    /// of any level of inherited chunks when every blob of the parent's tree is known
    /// reusable (not read: [`ReusableParent`]), or else a leaf page of inherited chunks,
    /// every chunk id of which is looked up as chunk by chunk ([`Dedup::contains`]): one
    /// without a copy that may be reused is recorded as unavailable, so the page is never
    /// referenced while a blob it lists is missing. Returns false when the chunks must be
    /// taken one by one.
    fn page(
        &mut self,
        level: usize,
        chunks: Range<u64>,
        span: u64,
        runs: &[(Range<u64>, Action)],
    ) -> Result<bool, CoreError> {
        let within = || runs.iter().take_while(|(r, _)| r.start < chunks.end);
        let zero_runs: Vec<Range<u64>> = within()
            .filter(|(_, a)| *a == Action::Zero)
            .map(|(r, _)| r.start.max(chunks.start)..r.end.min(chunks.end))
            .collect();
        let all_zero = zero_runs.iter().map(|r| r.end - r.start).sum::<u64>() == chunks.end - chunks.start;
        let count = chunks.end - chunks.start;
        let Some(parent) = self.parent.as_deref_mut() else {
            // A full backup: zero chunks only (an inherited one is an error, chunk by chunk).
            if !all_zero {
                return Ok(false);
            }
            self.counters.zero_chunks.fetch_add(count, Ordering::Relaxed);
            let sink = &mut self.sink;
            self.tree.push_page(level, Id::ZERO, &mut |ids: &[Id]| sink.page(ids))?;
            return Ok(true);
        };
        if parent.fanout() != DEFAULT_FANOUT || parent.levels() != self.tree.levels() {
            return Ok(false);
        }
        let id = match parent.page_id(level, chunks.start / span) {
            Ok(id) => id,
            Err(e) => return Err(self.parent_error(e)),
        };
        if id.is_zero() {
            // Zero in the parent: a zero chunk change tracking reported was over-reported;
            // none was missed (the parent held no data).
            let over: u64 = zero_runs.iter().map(|r| overlap(self.reported, r.clone())).sum();
            self.counters.overreported.fetch_add(over, Ordering::Relaxed);
            self.counters.zero_chunks.fetch_add(count, Ordering::Relaxed);
            self.parent_zeros_seen += count;
        } else if zero_runs.is_empty() && self.reusable.is_some() {
            // Every blob under it may be reused, and its zero chunks are counted at the end.
            self.unread_pages.push(chunks);
        } else if level == 0 && zero_runs.is_empty() {
            let leaf = match parent.leaf(chunks.start / span) {
                Ok(ids) => ids,
                Err(e) => return Err(self.parent_error(e)),
            };
            let mut zeros = 0;
            for (j, c) in leaf.iter().enumerate() {
                if c.is_zero() {
                    zeros += 1;
                } else if !self.dedup.contains(c) {
                    if !self.dedup.indexed(c) {
                        self.counters.repaired.fetch_add(1, Ordering::Relaxed);
                    }
                    self.unavailable.push(chunks.start + j as u64);
                }
            }
            self.counters.zero_chunks.fetch_add(zeros, Ordering::Relaxed);
            self.parent_zeros_seen += zeros;
            // The page itself was read whole just now; without a copy that may be reused
            // (say, in a pack gc is about to delete) it is stored again.
            if !self.dedup.contains(&id) {
                let again = self.sink.page(leaf)?;
                debug_assert_eq!(again, id);
            }
        } else {
            return Ok(false);
        }
        let sink = &mut self.sink;
        self.tree.push_page(level, id, &mut |ids: &[Id]| sink.page(ids))?;
        Ok(true)
    }

    /// The zero chunks under the pages taken without being read: the parent's recorded
    /// count less its zero chunks everywhere else. Should that count not fit the tree (more
    /// zero chunks seen than recorded, or more left than the pages hold), they are counted
    /// by reading the pages' leaves.
    fn unread_zeros(&mut self) -> Result<u64, CoreError> {
        let Some(reusable) = self.reusable else { return Ok(0) };
        let under: u64 = self.unread_pages.iter().map(|r| r.end - r.start).sum();
        match reusable.zero_chunks.checked_sub(self.parent_zeros_seen) {
            Some(z) if z <= under => return Ok(z),
            _ => {}
        }
        let Some(parent) = self.parent.as_deref_mut() else {
            return Err(CoreError::Internal("pages taken unread without a parent".into()));
        };
        let f = u64::from(DEFAULT_FANOUT);
        let leaves = self.unread_pages.iter().flat_map(|r| r.start / f..r.end.div_ceil(f));
        let counted: Result<u64, _> =
            leaves.map(|leaf| parent.leaf(leaf).map(|ids| ids.iter().filter(|c| c.is_zero()).count() as u64)).sum();
        counted.map_err(|e| self.parent_error(e))
    }

    /// One zero or inherited chunk.
    fn chunk(&mut self, i: u64, action: Action) -> Result<(), CoreError> {
        let id = match action {
            Action::Zero => {
                // What the parent held here tells over-reporting from a missed write.
                if let Some(before) = self.parent_chunk(i)? {
                    self.parent_zeros_seen += u64::from(before.is_zero());
                    let was_reported = in_runs(self.reported, i);
                    if was_reported && before.is_zero() {
                        self.counters.overreported.fetch_add(1, Ordering::Relaxed);
                    } else if !was_reported && !before.is_zero() {
                        self.counters.cbt_missed.fetch_add(1, Ordering::Relaxed);
                        let mut missed = self.counters.missed_chunks.lock().expect("evidence lock");
                        if missed.len() < EVIDENCE_LIMIT {
                            missed.push(i);
                        }
                    }
                }
                Id::ZERO
            }
            Action::Inherit => {
                let id = self
                    .parent_chunk(i)?
                    .ok_or_else(|| CoreError::Internal("an incremental plan without a parent".into()))?;
                self.parent_zeros_seen += u64::from(id.is_zero());
                if !id.is_zero() && self.reusable.is_none() && !self.dedup.contains(&id) {
                    if !self.dedup.indexed(&id) {
                        self.counters.repaired.fetch_add(1, Ordering::Relaxed);
                    }
                    self.unavailable.push(i);
                }
                id
            }
            Action::Read => return Err(CoreError::Internal(format!("chunk {i} was never read"))),
        };
        if id.is_zero() {
            self.counters.zero_chunks.fetch_add(1, Ordering::Relaxed);
        }
        self.push(id)?;
        let len = self.chunk_len(i);
        self.done(len, false);
        Ok(())
    }
}

/// Backs up one disk by `plan`: reads the chunks it says to read and stores the new ones,
/// takes zero chunks as [`Id::ZERO`] and inherited ones from `parent`, and returns the root
/// of the new fixed index tree. With a parent (an incremental), read chunks whose id is
/// the parent's are counted as over-reported. The reader, the workers and this thread are
/// one [`fan_out`]: the first error, a panic or the repository's cancellation stops all.
///
/// Runs of zero and inherited chunks are taken a page at a time where they cover a whole
/// page of the parent's tree ([`Builder::page`]): an unchanged part of a large disk costs
/// its pages, not its chunks.
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
    parent: Option<&mut TreeReader<'_>>,
    reusable: Option<ReusableParent>,
    blobs: &Sender<SealedBlob>,
    counters: &DiskCounters,
    progress: &dyn Progress,
) -> Result<Stored, CoreError> {
    let chunk_size = repo.config().chunk_size as u64;
    let size = source.size();
    let n = chunk_count(size, chunk_size as u32);
    let chunk_len = |i: u64| (size - i * chunk_size).min(chunk_size);
    let reads: Vec<Range<u64>> = plan.runs.iter().filter(|(_, a)| *a == Action::Read).map(|(r, _)| r.clone()).collect();

    let mut b = Builder {
        n,
        chunk_size,
        size,
        reusable: reusable.filter(|_| parent.is_some()),
        parent,
        parent_zeros_seen: 0,
        unread_pages: Vec::new(),
        tree: TreeWriter::new(n, DEFAULT_FANOUT),
        sink: BlobSink::new(repo, dedup, blobs),
        dedup,
        counters,
        progress,
        reported: &plan.reported,
        unavailable: Vec::new(),
        parent_failed: None,
        unreported: 0,
    };
    let outcome = {
        let mut assembler = Assembler::new(plan);
        let mut push = |i: u64, read: Option<Id>, runs: &[(Range<u64>, Action)]| -> Result<u64, CoreError> {
            match read {
                Some(id) => b.read(i, id).map(|()| 1),
                None => b.unread(i, runs),
            }
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
    b.done(0, true);
    let outcome = outcome.and_then(|()| b.unread_zeros()).map(|z| {
        counters.zero_chunks.fetch_add(z, Ordering::Relaxed);
    });
    if let Some(why) = b.parent_failed {
        return Ok(Stored::ParentUnreadable(why));
    }
    outcome?;
    if !b.unavailable.is_empty() {
        return Ok(Stored::Unavailable(b.unavailable));
    }
    let sink = &mut b.sink;
    let root = b.tree.finish(&mut |ids: &[Id]| sink.page(ids))?;
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
