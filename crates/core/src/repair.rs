//! Repair: rebuild the index from the packs, salvage what damaged packs still hold, and
//! report exactly what is lost.
//!
//! Packs are self-describing (a sealed header lists their blobs, FORMAT §9), so the index
//! files can be rebuilt from them. Repair reads every pack file whole, several at once:
//!
//! - **intact**: its name is the hash of its bytes, its header authenticates and every
//!   blob in it authenticates and re-hashes to its id. Its header's entries are its index
//!   listing: an index file that lists it otherwise, or not at all, is rewritten (a pack
//!   whose index file was lost is indexed again).
//! - **damaged**: anything else — truncated, emptied, bit-flipped, renamed, swapped with
//!   another. The blobs that still authenticate and re-hash (located by its own header,
//!   or by the index when the header is gone) are copied into new packs, then the file is
//!   removed.
//! - **unreadable**: the file is there but cannot be read (an I/O error). It is left as it
//!   is, with its index entries: it may read again later; run repair again then.
//! - **missing**: named by an index file, not in storage. Its index entries are dropped.
//!
//! Then every snapshot's trees are walked against what is left: a chunk or page that is
//! in no intact or salvaged blob is **lost**, reported per snapshot and disk as byte
//! ranges (a lost page loses the range it covers). Blobs are named by their content, so a
//! later backup of the same content stores them again and makes those snapshots whole.
//! The lost blob ids are recorded in `state/repair` (FORMAT §20) so that gc, which
//! otherwise refuses to run while referenced data is missing, can run: repair read every
//! pack, so no pack holds them.
//!
//! ## Order, locks and crashes
//!
//! Repair holds the exclusive lock (no backup, copy, forget or gc runs meanwhile; a dry
//! run takes none and writes nothing). It writes the salvaged packs and their index files,
//! then the new index files, and only then removes the old index files and the damaged
//! packs, and last writes `state/repair`. A blob that can be read is never removed before
//! a copy of it is durable and indexed; a repair killed at any moment leaves at worst
//! blobs listed twice or damaged packs still present, and running it again finishes.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ops::Range;

use blockproof_format::manifest::ByteRange;
use blockproof_format::pack::PACK_HEADER_LEN;
use blockproof_format::tree::{chunk_count, decode_page, level_sizes, page_len, DEFAULT_FANOUT};
use blockproof_format::{BlobEntry, BlobKind, DiskEntry, Id, IndexFile, ObjectMagic};
use blockproof_repo::blob::open_blob;
use blockproof_repo::pack_writer::read_pack_header;
use blockproof_repo::repository::check_name;
use blockproof_repo::{LockKind, PackWriter, RepoError, Repository, SealedBlob};
use blockproof_store::Kind;
use blockproof_work::{fan_out, FanOut};
use serde::{Deserialize, Serialize};

use crate::{CoreError, Progress};

/// What to do.
#[derive(Clone, Debug, Default)]
pub struct RepairOptions {
    /// Only report what would be done; write and remove nothing.
    pub dry_run: bool,
}

/// What repair found and did (with `dry_run`: would do).
#[derive(Clone, Debug, Default, Serialize)]
pub struct RepairReport {
    pub dry_run: bool,
    /// Pack files read.
    pub packs: u64,
    pub packs_intact: u64,
    /// Intact packs that no intact index file listed as their header does (indexed anew).
    pub packs_reindexed: u64,
    /// Damaged or misnamed packs: their readable blobs copied into new packs, the files
    /// removed.
    pub packs_salvaged: u64,
    /// Packs an index file named that are not in storage (their entries dropped).
    pub packs_missing: u64,
    /// Pack files that could not be read at all (left in place with their index entries).
    pub packs_unreadable: u64,
    pub blobs_salvaged: u64,
    /// Blobs of damaged packs that did not authenticate or re-hash (dropped).
    pub blobs_damaged: u64,
    /// Blobs some snapshot references that no intact or salvaged blob holds.
    pub blobs_lost: u64,
    /// Packs and index files written (with `dry_run`: an estimate).
    pub packs_written: u64,
    pub index_files_written: u64,
    pub index_files_removed: u64,
    pub packs_removed: u64,
    pub bytes_read: u64,
    /// Each problem found, one line each.
    pub problems: Vec<String>,
    /// What is lost, per snapshot and disk.
    pub lost: Vec<LostData>,
    pub warnings: Vec<String>,
}

impl RepairReport {
    /// Whether every snapshot restores whole after the repair: nothing lost, nothing
    /// unreadable (a lost part of a confirmation state, which is advisory, is a warning).
    pub fn whole(&self) -> bool {
        self.lost.is_empty() && self.packs_unreadable == 0
    }
}

/// The parts of one disk of one snapshot that cannot be restored.
#[derive(Clone, Debug, Serialize)]
pub struct LostData {
    pub snapshot: Id,
    pub vm: String,
    pub time: String,
    pub disk: String,
    /// Byte ranges of the disk whose chunks (or index pages) are nowhere.
    pub ranges: Vec<ByteRange>,
    pub bytes: u64,
}

/// `state/repair`: the blobs the last repair found nowhere (FORMAT §20).
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RepairState {
    time: String,
    lost: Vec<Id>,
}

const REPAIR_STATE: &str = "repair";

/// The blobs the last repair found in no pack and reported lost; empty when there is no
/// record or it cannot be read (gc then refuses as it would without one).
pub(crate) fn recorded_losses(repo: &Repository) -> HashSet<Id> {
    repo.read_doc(Kind::State, ObjectMagic::State, REPAIR_STATE)
        .ok()
        .and_then(|b| serde_json::from_slice::<RepairState>(&b).ok())
        .map(|s| s.lost.into_iter().collect())
        .unwrap_or_default()
}

/// What reading one pack file found.
enum Verdict {
    /// Whole and under its own name: its header's entries.
    Intact(Vec<BlobEntry>),
    /// Not whole or not under its own name: the blobs that still open, how many did not,
    /// and why.
    Damaged { good: Vec<BlobEntry>, bad: u64, why: String },
    /// Could not be read (the error).
    Unreadable(String),
    /// Removed since it was listed.
    Vanished,
}

/// Reads one pack whole and judges it; `indexed` locates its blobs if its header is gone.
fn judge(repo: &Repository, name: &str, indexed: Option<&Vec<BlobEntry>>) -> (Verdict, u64) {
    let file = match repo.backend().read(Kind::Pack, name) {
        Ok(f) => f,
        Err(e) if e.is_not_found() => return (Verdict::Vanished, 0),
        Err(e) => return (Verdict::Unreadable(e.to_string()), 0),
    };
    let named = check_name(name, &file);
    let header = read_pack_header(repo, name, &file);
    let candidates = match &header {
        Ok(entries) => entries.clone(),
        Err(_) => indexed.cloned().unwrap_or_default(),
    };
    let (mut good, mut bad) = (Vec::with_capacity(candidates.len()), 0u64);
    for e in candidates {
        let opens = e.offset >= PACK_HEADER_LEN as u64
            && e.end() <= file.len() as u64
            && open_blob(repo.keys(), &e, &file[e.offset as usize..e.end() as usize], name).is_ok();
        if opens {
            good.push(e);
        } else {
            bad += 1;
        }
    }
    let len = file.len() as u64;
    let verdict = match (named, header) {
        (Ok(()), Ok(_)) if bad == 0 => Verdict::Intact(good),
        (named, header) => {
            let why = match (header, named) {
                (Err(e), _) => format!("{e} ({len} bytes)"),
                (Ok(_), Err(_)) if bad == 0 => "is not named by the hash of its bytes (renamed or replaced)".into(),
                (Ok(_), _) => format!("{bad} blob(s) in it do not authenticate or match their ids"),
            };
            Verdict::Damaged { good, bad, why }
        }
    };
    (verdict, len)
}

/// Metadata blobs (index and confirmation pages) that are still readable after the
/// repair, and where they are now (an intact pack, or a damaged one they are salvaged
/// from): the walk of the snapshots reads pages from here.
struct Pages<'r> {
    repo: &'r Repository,
    at: HashMap<Id, (String, BlobEntry)>,
}

impl Pages<'_> {
    fn read(&self, id: &Id) -> Option<Vec<u8>> {
        let (pack, e) = self.at.get(id)?;
        let mut buf = vec![0u8; e.length as usize];
        self.repo.backend().read_at(Kind::Pack, pack, e.offset, &mut buf).ok()?;
        open_blob(self.repo.keys(), e, &buf, pack).ok()
    }
}

/// Walks a tree of `leaves` entries; returns the leaf ranges that are lost (a page that
/// cannot be read loses every leaf below it). The page and leaf ids that are not
/// available go into `missing`.
fn walk(
    pages: &Pages<'_>,
    available: &HashSet<Id>,
    root: Id,
    leaves: u64,
    fanout: u32,
    missing: &mut HashSet<Id>,
) -> Vec<Range<u64>> {
    let f = u64::from(fanout);
    let sizes = level_sizes(leaves, fanout);
    let mut lost = Vec::new();
    let mut stack = vec![(sizes.len() - 1, 0u64, root)];
    while let Some((level, page, id)) = stack.pop() {
        if id.is_zero() {
            continue;
        }
        let ids = available
            .contains(&id)
            .then(|| pages.read(&id))
            .flatten()
            .and_then(|plain| decode_page(&plain, page_len(sizes[level], page, fanout)).ok());
        let Some(ids) = ids else {
            missing.insert(id);
            let span = f.saturating_pow(level as u32 + 1);
            lost.push(page.saturating_mul(span).min(leaves)..(page + 1).saturating_mul(span).min(leaves));
            continue;
        };
        for (k, child) in ids.into_iter().enumerate() {
            let at = page * f + k as u64;
            if level > 0 {
                stack.push((level - 1, at, child));
            } else if !child.is_zero() && !available.contains(&child) {
                missing.insert(child);
                lost.push(at..at + 1);
            }
        }
    }
    lost.sort_by_key(|r| r.start);
    let mut merged: Vec<Range<u64>> = Vec::with_capacity(lost.len());
    for r in lost {
        match merged.last_mut() {
            Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
            _ => merged.push(r),
        }
    }
    merged
}

/// The disk's byte ranges of lost chunk ranges.
fn byte_ranges(disk: &DiskEntry, chunks: &[Range<u64>]) -> Vec<ByteRange> {
    let cs = u64::from(disk.chunk_size);
    chunks
        .iter()
        .map(|r| {
            let end = (r.end * cs).min(disk.size);
            ByteRange { offset: r.start * cs, length: end - r.start * cs }
        })
        .collect()
}

/// Repairs the repository (see the module doc).
pub fn repair(repo: &Repository, opts: &RepairOptions, progress: &dyn Progress) -> Result<RepairReport, CoreError> {
    let lock = if opts.dry_run { None } else { Some(repo.lock(LockKind::Exclusive, "repair")?) };
    let mut report = RepairReport { dry_run: opts.dry_run, ..RepairReport::default() };
    let backend = repo.backend();

    // The index files as they are; a damaged one is replaced by what the packs say.
    let mut index_files: Vec<(String, Option<IndexFile>)> = Vec::new();
    for name in backend.list(Kind::Index)? {
        match repo.read_index_file(&name) {
            Ok(f) => index_files.push((name, Some(f))),
            Err(RepoError::Store(e)) if e.is_not_found() => {}
            Err(e) => {
                report.problems.push(format!("{e}: replaced by an index rebuilt from the packs"));
                index_files.push((name, None));
            }
        }
    }
    let mut indexed: HashMap<String, Vec<BlobEntry>> = HashMap::new();
    for (_, f) in &index_files {
        for (pack, entries) in f.iter().flat_map(|f| &f.packs) {
            indexed.entry(pack.to_hex()).or_insert_with(|| entries.clone());
        }
    }

    // Read and judge every pack, several at once (at most 256 MiB of packs in memory).
    let stored: Vec<(String, u64)> = backend.list_sizes(Kind::Pack)?;
    let largest = stored.iter().map(|(_, s)| *s).max().unwrap_or(1).max(1);
    let readers = crate::readers(repo).min(((256u64 << 20) / largest).max(1) as usize);
    progress.begin("repair: read packs", stored.iter().map(|(_, s)| *s).sum());
    let mut verdicts: BTreeMap<String, Verdict> = BTreeMap::new();
    fan_out(
        repo.cancel(),
        FanOut { workers: readers, queue: readers },
        |emit| {
            for (name, _) in &stored {
                if !emit.send(name.clone()) {
                    break;
                }
            }
            Ok::<(), CoreError>(())
        },
        || {
            |name: String| {
                // A pack found damaged is read again before anything is decided: a pack
                // that reads differently each time is left alone, never removed.
                let (first, bytes) = judge(repo, &name, indexed.get(&name));
                let verdict = match first {
                    Verdict::Damaged { .. } => match judge(repo, &name, indexed.get(&name)).0 {
                        Verdict::Damaged { good, bad, why } => Verdict::Damaged { good, bad, why },
                        Verdict::Vanished => Verdict::Vanished,
                        Verdict::Unreadable(e) => Verdict::Unreadable(e),
                        Verdict::Intact(_) => Verdict::Unreadable("it reads differently each time".into()),
                    },
                    v => v,
                };
                Ok((verdict, bytes, name))
            }
        },
        |(verdict, bytes, name)| {
            progress.advance(bytes);
            report.bytes_read += bytes;
            verdicts.insert(name, verdict);
            Ok(())
        },
    )?;
    progress.end();

    // What is left: intact packs, salvageable blobs of damaged ones, unreadable packs.
    let mut intact: BTreeMap<Id, Vec<BlobEntry>> = BTreeMap::new();
    let mut damaged: BTreeMap<&str, &Vec<BlobEntry>> = BTreeMap::new();
    let mut unreadable: BTreeMap<&str, String> = BTreeMap::new();
    for (name, v) in &verdicts {
        report.packs += u64::from(!matches!(v, Verdict::Vanished));
        match v {
            Verdict::Intact(entries) => {
                intact.insert(name.parse().expect("an intact pack is named by its hash"), entries.clone());
            }
            Verdict::Damaged { good, bad, why } => {
                report
                    .problems
                    .push(format!("pack {name} {why}: {} blob(s) can be salvaged, {bad} cannot", good.len()));
                report.blobs_damaged += bad;
                damaged.insert(name, good);
            }
            Verdict::Unreadable(e) => {
                report.problems.push(format!("pack {name} cannot be read ({e}); left as it is, run repair again"));
                unreadable.insert(name, e.clone());
            }
            Verdict::Vanished => {}
        }
    }
    report.packs_intact = intact.len() as u64;
    report.packs_unreadable = unreadable.len() as u64;
    let present: HashSet<&str> =
        verdicts.iter().filter(|(_, v)| !matches!(v, Verdict::Vanished)).map(|(n, _)| n.as_str()).collect();
    let mut missing_packs: Vec<&String> = indexed.keys().filter(|p| !present.contains(p.as_str())).collect();
    missing_packs.sort();
    for p in &missing_packs {
        report
            .problems
            .push(format!("pack {p} is missing ({} blobs indexed); its index entries are dropped", indexed[*p].len()));
    }
    report.packs_missing = missing_packs.len() as u64;

    // Blobs available after the repair, and where their pages are read from meanwhile.
    let mut available: HashSet<Id> = HashSet::new();
    let mut pages = Pages { repo, at: HashMap::new() };
    for (pack, entries) in &intact {
        for e in entries {
            available.insert(e.id);
            if e.kind != BlobKind::Data {
                pages.at.entry(e.id).or_insert_with(|| (pack.to_hex(), *e));
            }
        }
    }
    let mut salvage: Vec<(&str, BlobEntry)> = Vec::new();
    for (name, good) in &damaged {
        for e in good.iter() {
            if available.insert(e.id) {
                salvage.push((name, *e));
                if e.kind != BlobKind::Data {
                    pages.at.insert(e.id, (name.to_string(), *e));
                }
            }
        }
    }
    report.packs_salvaged = damaged.len() as u64;
    report.blobs_salvaged = salvage.len() as u64;

    // What the snapshots lose.
    let mut missing = HashSet::new();
    let mut names = backend.list(Kind::Snapshot)?;
    names.sort();
    progress.begin_count("repair: walk snapshots", names.len() as u64);
    let mut snapshots = Vec::new();
    for name in names {
        progress.advance(1);
        match repo.load_snapshot(&name) {
            Ok(s) => snapshots.push(s),
            Err(RepoError::Store(e)) if e.is_not_found() => {}
            Err(e) => report.problems.push(format!("{e}: repair cannot rebuild a snapshot file")),
        }
    }
    snapshots.sort_by(|a, b| a.snapshot.time.cmp(&b.snapshot.time).then(a.id.cmp(&b.id)));
    for s in &snapshots {
        for d in &s.snapshot.disks {
            let n = chunk_count(d.size, d.chunk_size);
            let lost = walk(&pages, &available, d.index_root, n, d.index_fanout, &mut missing);
            if !lost.is_empty() {
                let ranges = byte_ranges(d, &lost);
                let bytes = ranges.iter().map(|r| r.length).sum();
                report.lost.push(LostData {
                    snapshot: s.id,
                    vm: s.snapshot.vm.clone(),
                    time: s.snapshot.time.clone(),
                    disk: d.id.clone(),
                    ranges,
                    bytes,
                });
            }
            if let Some(root) = d.confirm_root {
                let pages_n = blockproof_format::confirm::page_count(n);
                let before = missing.len();
                walk(&pages, &available, root, pages_n, DEFAULT_FANOUT, &mut missing);
                if missing.len() > before {
                    report.warnings.push(format!(
                        "snapshot {} disk {}: part of the confirmation state is lost; those chunks count as never \
                         confirmed",
                        s.id.short(),
                        d.id
                    ));
                }
            }
        }
    }
    progress.end();
    report.blobs_lost = missing.len() as u64;

    // The index the packs call for: intact packs by their headers, unreadable ones as
    // indexed (they may read again). An index file that lists exactly that is kept.
    let mut wanted: BTreeMap<Id, Vec<BlobEntry>> = intact.clone();
    for name in unreadable.keys() {
        if let (Ok(id), Some(entries)) = (name.parse::<Id>(), indexed.get(*name)) {
            wanted.insert(id, entries.clone());
        }
    }
    let same = |a: &[BlobEntry], b: &[BlobEntry]| {
        a.len() == b.len() && a.iter().collect::<HashSet<_>>() == b.iter().collect::<HashSet<_>>()
    };
    let mut covered: HashSet<Id> = HashSet::new();
    let mut stale_files = Vec::new();
    for (name, f) in &index_files {
        let keep = f
            .as_ref()
            .is_some_and(|f| f.packs.iter().all(|(p, entries)| wanted.get(p).is_some_and(|w| same(w, entries))));
        if keep {
            covered.extend(f.iter().flat_map(|f| f.packs.iter().map(|(p, _)| *p)));
        } else {
            stale_files.push(name.clone());
        }
    }
    let to_index: Vec<(Id, Vec<BlobEntry>)> = wanted.into_iter().filter(|(p, _)| !covered.contains(p)).collect();
    report.packs_reindexed =
        to_index.iter().filter(|(p, _)| intact.contains_key(p) && !indexed.contains_key(&p.to_hex())).count() as u64;
    for (p, _) in to_index.iter().filter(|(p, _)| intact.contains_key(p) && !indexed.contains_key(&p.to_hex())) {
        report.problems.push(format!("pack {p} is intact but in no index file; indexed again"));
    }

    if opts.dry_run {
        let salvaged_bytes: u64 = salvage.iter().map(|(_, e)| u64::from(e.length)).sum();
        report.packs_written = salvaged_bytes.div_ceil(u64::from(repo.config().pack_size));
        report.index_files_written = to_index.len().div_ceil(64) as u64 + report.packs_written.div_ceil(64);
        report.index_files_removed = stale_files.len() as u64;
        report.packs_removed = damaged.len() as u64;
        return Ok(report);
    }

    // 1. Salvage: readable blobs of damaged packs into new packs (durable and indexed).
    if !salvage.is_empty() {
        progress.begin_count("repair: salvage", salvage.len() as u64);
        let mut writer = PackWriter::new(repo);
        for (name, e) in &salvage {
            let mut bytes = vec![0u8; e.length as usize];
            backend.read_at(Kind::Pack, name, e.offset, &mut bytes)?;
            open_blob(repo.keys(), e, &bytes, name)?;
            writer.add(SealedBlob {
                kind: e.kind,
                id: e.id,
                compression: e.compression,
                raw_length: e.raw_length,
                bytes,
            })?;
            progress.advance(1);
        }
        let (_, stats) = writer.finish()?;
        progress.end();
        report.packs_written = stats.packs;
        report.index_files_written += stats.index_files.len() as u64;
    }
    // 2. Index files for the intact packs no kept index file lists.
    for group in to_index.chunks(64) {
        repo.write_index_file(&IndexFile { packs: group.to_vec() })?;
        report.index_files_written += 1;
    }
    // 3. Only now: the old index files, then the damaged packs.
    if let Some(lock) = &lock {
        lock.ensure_held()?;
    }
    for name in &stale_files {
        backend.remove(Kind::Index, name)?;
        report.index_files_removed += 1;
    }
    for name in damaged.keys() {
        backend.remove(Kind::Pack, name)?;
        report.packs_removed += 1;
    }
    // Packs read whole and found intact, or removed, are no longer damaged for backups.
    let judged: HashSet<&str> = verdicts
        .iter()
        .filter(|(_, v)| matches!(v, Verdict::Intact(_) | Verdict::Damaged { .. }))
        .map(|(n, _)| n.as_str())
        .collect();
    crate::check::clear_damaged(repo, &judged)?;
    // 4. What no pack holds, for gc (blobs of unreadable packs are not lost yet).
    let uncertain: HashSet<Id> = unreadable.keys().filter_map(|n| indexed.get(*n)).flatten().map(|e| e.id).collect();
    let lost: Vec<Id> = {
        let mut v: Vec<Id> = missing.iter().filter(|id| !uncertain.contains(*id)).copied().collect();
        v.sort();
        v
    };
    if lost.is_empty() {
        backend.remove(Kind::State, REPAIR_STATE)?;
    } else {
        let state =
            RepairState { time: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(), lost };
        let bytes = serde_json::to_vec(&state).expect("the repair state serializes");
        repo.write_doc(Kind::State, ObjectMagic::State, REPAIR_STATE, &bytes)?;
    }
    Ok(report)
}
