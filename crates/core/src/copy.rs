//! Copy: replicate snapshots into a second repository (another site), which may have
//! other keys.
//!
//! Chunk ids are keyed hashes, so the same chunk has different ids in repositories with
//! different keys: copying re-hashes each chunk with the target's key and stores it there
//! if the target lacks it, rebuilds each disk's index tree with the target's ids, and
//! carries the confirmation state, status, mismatches and coverage along (verification
//! status travels with the snapshot). A snapshot already copied (the target holds one with
//! `copied_from` naming it) is skipped. Protection travels too: the copy of a protected
//! snapshot is protected in the target (also when the copy was made before).
//!
//! Only changed chunks are read: when the parent of a disk was copied before, a chunk
//! whose source id equals the parent's takes the id the target already gave the parent's
//! chunk, without reading it. So a second `copy` after an incremental transfers about what
//! the incremental added. The chunks that must be read are fetched in windows of about
//! 4 MiB with [`BlobReader::read_many`], as a restore reads: about one request per pack
//! region on a remote store rather than one per chunk.
//!
//! The target is written like a backup writes: under a shared lock, packs and index
//! files durable before each snapshot file, packs a gc plans to delete left out of
//! deduplication, and so are the target's packs that are missing, of the wrong size or
//! found damaged (crate::availability): what the copy needs from them is stored again,
//! which makes the target's earlier copies whole again too.

use std::collections::HashMap;

use blockproof_format::tree::{chunk_count, DEFAULT_FANOUT};
use blockproof_format::{BlobKind, DiskEntry, Id, Snapshot};
use blockproof_repo::{BlobIndex, BlobReader, LockKind, RepoError, Repository, SealedBlob, TreeReader, TreeWriter};
use crossbeam_channel::Sender;
use serde::Serialize;

use crate::availability::Availability;
use crate::confirm::ConfirmState;
use crate::pipeline::{with_pack_writer, BlobSink, Dedup};
use crate::{CoreError, Progress};

/// Source-to-target id mappings kept in memory at most (about 100 bytes each).
const MAP_LIMIT: usize = 1 << 20;

/// What to copy.
#[derive(Clone, Debug, Default)]
pub struct CopyOptions {
    /// Snapshot references (ids, prefixes, `VM:latest`); empty: every snapshot.
    pub snapshots: Vec<String>,
}

/// One snapshot copied.
#[derive(Clone, Debug, Serialize)]
pub struct CopiedSnapshot {
    pub source: Id,
    pub target: Id,
    pub vm: String,
}

/// What copy did.
#[derive(Clone, Debug, Default, Serialize)]
pub struct CopyReport {
    pub copied: Vec<CopiedSnapshot>,
    /// Snapshots the target already had.
    pub skipped: Vec<Id>,
    /// Chunks read from the source (the others were known from a copied parent).
    pub chunks_read: u64,
    /// Chunks the target did not have (or had only in missing or damaged packs).
    pub chunks_new: u64,
    /// Of `chunks_new`: chunks the target's index named but only in packs that are
    /// missing, of the wrong size or found damaged, stored again.
    pub chunks_repaired: u64,
    pub bytes_written: u64,
    /// Things that did not stop the copy (target packs that are not reused, a vm's head in
    /// the target that could not be updated).
    pub warnings: Vec<String>,
}

struct Copier<'a, 'd> {
    src_reader: &'a BlobReader<'a>,
    dst: &'a Repository,
    dst_reader: &'a BlobReader<'a>,
    dedup: &'a Dedup<'d>,
    map: HashMap<Id, Id>,
    report: CopyReport,
}

impl Copier<'_, '_> {
    fn disk(
        &mut self,
        entry: &DiskEntry,
        parent: Option<(&DiskEntry, &DiskEntry)>,
        tx: &Sender<SealedBlob>,
    ) -> Result<DiskEntry, CoreError> {
        let n = chunk_count(entry.size, entry.chunk_size);
        let mut sink = BlobSink::new(self.dst, self.dedup, tx);
        let mut src_tree = TreeReader::new(self.src_reader, entry.index_root, n, entry.index_fanout)?;
        // The parent in both repositories, when its geometry matches.
        let mut parents = match parent {
            Some((ps, pt)) if ps.size == entry.size && ps.chunk_size == entry.chunk_size => Some((
                TreeReader::new(self.src_reader, ps.index_root, n, ps.index_fanout)?,
                TreeReader::new(self.dst_reader, pt.index_root, n, pt.index_fanout)?,
            )),
            _ => None,
        };
        let mut tree = TreeWriter::new(n, DEFAULT_FANOUT);
        // Chunks go in windows of about 4 MiB, like a restore's batches: the chunks of a
        // window that must be read are fetched with one `read_many` (about one request per
        // pack region on a remote store, instead of one per chunk), then handled in order.
        let window = crate::restore::chunks_per_read(u64::from(entry.chunk_size));
        let mut start = 0;
        while start < n {
            let end = (start + window).min(n);
            // Each chunk's source id, and the target id when it is known without reading.
            let mut chunks: Vec<(Id, Option<Id>)> = Vec::with_capacity((end - start) as usize);
            for i in start..end {
                let id = src_tree.chunk(i)?;
                let known = if id.is_zero() {
                    Some(Id::ZERO)
                } else if let Some(t) = self.map.get(&id) {
                    Some(*t)
                } else {
                    // The target's id of the parent's chunk, when it is the same chunk and
                    // the target still has a copy it may reuse. A parent whose pages cannot
                    // be read in either repository is no shortcut: its chunks are read.
                    match parents.as_mut() {
                        Some((ps, pt)) => {
                            match ps.chunk(i).and_then(|p| if p == id { pt.chunk(i).map(Some) } else { Ok(None) }) {
                                Ok(t) => t.filter(|t| self.dedup.contains(t)),
                                Err(_) => {
                                    parents = None;
                                    None
                                }
                            }
                        }
                        None => None,
                    }
                };
                chunks.push((id, known));
            }
            let mut wanted: Vec<Id> = chunks.iter().filter(|(_, k)| k.is_none()).map(|(id, _)| *id).collect();
            wanted.sort_unstable();
            wanted.dedup();
            let mut fetched: HashMap<Id, Result<Vec<u8>, RepoError>> =
                wanted.iter().copied().zip(self.src_reader.read_many(&wanted, BlobKind::Data)).collect();
            for (id, known) in chunks {
                let target = match known.or_else(|| self.map.get(&id).copied()) {
                    Some(t) => t,
                    None => {
                        // Fetched above; read again only when a chunk repeats in the window
                        // and the map is full.
                        let plain = match fetched.remove(&id) {
                            Some(r) => r?,
                            None => self.src_reader.read(&id, BlobKind::Data)?,
                        };
                        self.report.chunks_read += 1;
                        let t = self.dst.keys().blob_id(&plain);
                        if !self.dedup.contains(&t) {
                            self.report.chunks_new += 1;
                            if self.dedup.indexed(&t) {
                                self.report.chunks_repaired += 1;
                            }
                        }
                        let t = sink.put(BlobKind::Data, &plain)?;
                        if self.map.len() < MAP_LIMIT {
                            self.map.insert(id, t);
                        }
                        t
                    }
                };
                if known.is_some() && !target.is_zero() && self.map.len() < MAP_LIMIT {
                    self.map.insert(id, target);
                }
                tree.push(target, &mut |ids: &[Id]| sink.page(ids))?;
            }
            start = end;
        }
        let root = tree.finish(&mut |ids: &[Id]| sink.page(ids))?;
        let (mut state, _) = ConfirmState::load(self.src_reader, entry, n);
        let confirm_root = match entry.confirm_root {
            Some(_) => state.store(&mut sink)?,
            None => None,
        };
        Ok(DiskEntry {
            index_root: root,
            index_fanout: DEFAULT_FANOUT,
            confirm_root,
            parent: None, // the caller names the target's parent
            ..entry.clone()
        })
    }
}

/// Copies snapshots from `src` into `dst`.
pub fn copy(
    src: &Repository,
    dst: &Repository,
    opts: &CopyOptions,
    progress: &dyn Progress,
) -> Result<CopyReport, CoreError> {
    if src.id() == dst.id() {
        return Err(CoreError::Invalid("the source and the target are the same repository".into()));
    }
    let lock = dst.lock(LockKind::Shared, "copy")?;
    let mut wanted = if opts.snapshots.is_empty() {
        src.snapshots()?
    } else {
        opts.snapshots.iter().map(|r| src.resolve_snapshot(r)).collect::<Result<Vec<_>, _>>()?
    };
    wanted.sort_by(|a, b| a.snapshot.time.cmp(&b.snapshot.time).then(a.id.cmp(&b.id)));
    wanted.dedup_by_key(|s| s.id);
    let all_src = src.snapshots()?;

    let planned = crate::gc::planned_packs(dst)?;
    let src_index = BlobIndex::load(src)?;
    let dst_index = BlobIndex::load_excluding(dst, &planned)?;
    let src_reader = BlobReader::new(src, &src_index);
    let dst_reader = BlobReader::new(dst, &dst_index);
    // The target's missing, short or damaged packs are not reused (crate::availability).
    let mut warnings = Vec::new();
    let avail = Availability::assess(dst, &dst_index, &mut warnings)?;
    let dedup = Dedup::new(&dst_reader, &avail);
    // Target snapshots by the source snapshot they were copied from.
    let mut copied: HashMap<Id, (Id, Snapshot)> =
        dst.snapshots()?.into_iter().filter_map(|t| t.snapshot.copied_from.map(|s| (s, (t.id, t.snapshot)))).collect();
    let mut c = Copier {
        src_reader: &src_reader,
        dst,
        dst_reader: &dst_reader,
        dedup: &dedup,
        map: HashMap::new(),
        report: CopyReport { warnings, ..CopyReport::default() },
    };
    // Protection travels with the copy (also to a copy made before the source was
    // protected).
    let src_protected = crate::forget::protected(src)?;
    let dst_protected = crate::forget::protected(dst)?;
    let keep_protection = |source: Id, target: Id| -> Result<(), CoreError> {
        if src_protected.contains(&source) && !dst_protected.contains(&target) {
            crate::forget::protect(dst, target)?;
        }
        Ok(())
    };
    for s in wanted {
        if let Some((target, _)) = copied.get(&s.id) {
            keep_protection(s.id, *target)?;
            c.report.skipped.push(s.id);
            continue;
        }
        progress.begin_count(&format!("copy {}", s.id.short()), s.snapshot.disks.len() as u64);
        let (disks, stats) = with_pack_writer(dst, |tx| {
            let mut disks = Vec::new();
            for d in &s.snapshot.disks {
                // The source parent, and its copy in the target, if there is one.
                let parent = d.parent.and_then(|p| {
                    let src_parent = all_src.iter().find(|x| x.id == p)?.snapshot.disk(&d.id)?;
                    let (tid, tsnap) = copied.get(&p)?;
                    Some((src_parent, tsnap.disk(&d.id)?, *tid))
                });
                let mut e = c.disk(d, parent.map(|(a, b, _)| (a, b)), tx)?;
                e.parent = parent.map(|(_, _, t)| t);
                disks.push(e);
                progress.advance(1);
            }
            Ok(disks)
        })?;
        progress.end();
        let snapshot =
            Snapshot { disks, copied_from: Some(s.id), ..s.snapshot.clone() }.for_version(dst.config().version);
        let target = crate::backup::commit(dst, &lock, &snapshot)?;
        keep_protection(s.id, target)?;
        c.report.warnings.extend(crate::integrity::record_commit(dst, target, &snapshot));
        c.report.bytes_written += stats.pack_bytes;
        c.report.copied.push(CopiedSnapshot { source: s.id, target, vm: s.snapshot.vm.clone() });
        copied.insert(s.id, (target, snapshot));
    }
    Ok(c.report)
}
