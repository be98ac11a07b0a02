//! Backup: read the disks of a vm, verify a sample of what change tracking called
//! unchanged, and commit one snapshot (two when a mismatch is healed).
//!
//! Per disk: open it against what its parent recorded, plan it ([`crate::plan`]), run
//! the chunk pipeline, update its confirmation state ([`crate::confirm`]) with the chunks
//! read, sample inherited chunks against the still-open source ([`crate::verify`]), and
//! store the state with the snapshot. A mismatch makes the snapshot `tainted` (nothing is
//! deleted), names the sector-exact ranges and the earlier restore points that may share
//! the stale content, and makes the next backup of the disk a full read; with
//! [`OnMismatch::Heal`] the same run re-reads the tainted disks in full from the same
//! source handles and commits a second, clean snapshot.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime};

use blockproof_format::manifest::{ByteRange, Coverage, DiskStats, ReadMode};
use blockproof_format::tree::{chunk_count, DEFAULT_FANOUT};
use blockproof_format::{Consistency, DiskEntry, Id, Machine, Snapshot, SnapshotStatus};
use blockproof_repo::{
    BlobIndex, BlobReader, Lock, LockKind, Repository, SealedBlob, SnapshotInfo, SnapshotScan, TreeReader,
};
use blockproof_source::{AfterCommit, BlockSource, Changes, DiskSpec, OpenedDisk, Owner, ParentCbt, SourceError};
use crossbeam_channel::Sender;
use serde::Serialize;

use crate::availability::Availability;
use crate::confirm::{ConfirmState, SummaryDocs};
use crate::events::{Cause, Event, EventDisk};
use crate::integrity::Lineage;
use crate::pipeline::{store_disk, with_pack_writer, BlobSink, Dedup, DiskCounters, ReusableParent, Stored};
use crate::plan::{Action, ChunkPlan};
use crate::verification::{DiskCheck, Escalation};
use crate::{Budget, CoreError, Progress};

/// Opens a disk for its vm and disk id, given what its parent restore point recorded
/// about the change source.
pub type OpenFn = Box<dyn FnOnce(&Owner<'_>, Option<&ParentCbt>) -> Result<OpenedDisk, SourceError> + Send>;

/// One disk to back up.
pub struct DiskInput {
    /// Stable identity of the disk (never its position).
    pub id: String,
    /// The change source, as recorded in the manifest (`none`, `bitmap:NAME`, ...).
    pub cbt: String,
    /// Opens the source once the parent is known.
    pub open: OpenFn,
    /// This disk's verification budget, instead of the backup's.
    pub verify: Option<Budget>,
}

impl DiskInput {
    /// A disk opened from a [`DiskSpec`].
    pub fn spec(id: impl Into<String>, spec: DiskSpec) -> DiskInput {
        let cbt = spec.cbt().to_string();
        DiskInput { id: id.into(), cbt, open: Box::new(move |owner, parent| spec.open(owner, parent)), verify: None }
    }

    /// An already open source, read in full (`cbt=none`).
    pub fn source(id: impl Into<String>, source: Box<dyn BlockSource>) -> DiskInput {
        DiskInput {
            id: id.into(),
            cbt: "none".into(),
            open: Box::new(move |_, _| Ok(OpenedDisk::full(source, "cbt=none"))),
            verify: None,
        }
    }
}

/// What a backup does when verification finds source and backup differ. Whatever it is,
/// the comparison first grows around every differing chunk (its segment, and its
/// neighbours while they keep differing) so the report covers the whole stale extent it
/// can find.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum OnMismatch {
    /// Commit the tainted snapshot and stop (the next backup of the disk is full).
    #[default]
    Keep,
    /// Also re-read the tainted disks in full now and commit a second, clean snapshot.
    Heal,
    /// Compare every chunk the backup did not read, then commit the tainted snapshot:
    /// `mismatches` then lists every stale range of the restore point.
    Scan,
}

/// The verification budget when none is given: 5% of each disk per run.
pub fn default_verify_budget() -> Budget {
    Budget { fraction: Some(0.05), ..Budget::default() }
}

/// What to back up.
pub struct BackupOptions {
    pub vm: String,
    pub disks: Vec<DiskInput>,
    pub tags: Vec<String>,
    pub hostname: String,
    /// Read every chunk whatever the change source says.
    pub full: bool,
    /// How much of what change tracking called unchanged to compare with the source.
    pub verify: Budget,
    pub on_mismatch: OnMismatch,
    /// How long to wait for another run of the same vm (or a conflicting repository
    /// lock) to finish before giving up.
    pub lock_wait: Duration,
    /// A running VM's definition and consistency (`--from`), kept in the restore point
    /// (repositories of format version 4 and later).
    pub machine: Option<Machine>,
}

/// The result for one disk. Field names are part of the JSON contract (docs/JSON.md).
#[derive(Clone, Debug, Serialize)]
pub struct DiskReport {
    pub id: String,
    pub mode: ReadMode,
    pub size: u64,
    pub chunk_size: u32,
    pub bytes_read: u64,
    pub cbt_reported_chunks: u64,
    pub cbt_overreported_chunks: u64,
    pub verified_chunks: u64,
    pub verified_bytes: u64,
    pub mismatches: Vec<ByteRange>,
    pub suspect_snapshots: Vec<Id>,
    pub coverage: Coverage,
    /// Chunks change tracking did not report that the allocation map now calls zero while
    /// the parent held data: writes it missed (the restore point is right; the next run
    /// reads the disk in full).
    pub cbt_missed_chunks: u64,
    /// Whether some differing chunks read differently a second time: the source changed
    /// while it was read (not a point-in-time view) — not a lie of change tracking.
    pub source_changed: bool,
    /// How far the comparison went around mismatches.
    pub escalation: Escalation,
    pub next_mode: ReadMode,
    /// Why every chunk was read, when `mode` is `full`.
    pub full_reason: Option<String>,
    /// The change source used.
    pub cbt: String,
    /// What the operator should do after a mismatch.
    pub advice: Option<String>,
    /// The snapshot holding this disk id before this one.
    pub parent: Option<Id>,
    /// This disk's run number.
    pub run: u64,
    pub chunks: u64,
    pub zero_chunks: u64,
    pub new_chunks: u64,
    pub new_bytes: u64,
    /// Bytes added to the repository for this disk's data (compressed and sealed).
    pub stored_bytes: u64,
    /// Chunks stored again because the repository's copy was missing or damaged (part of
    /// `new_chunks`): inherited chunks read from the source instead, and read chunks whose
    /// only copies were in unusable packs (crate::availability).
    pub repaired_chunks: u64,
}

/// The result of a backup.
#[derive(Clone, Debug, Serialize)]
pub struct BackupReport {
    pub snapshot: Id,
    pub vm: String,
    pub status: SnapshotStatus,
    pub time: String,
    pub disks: Vec<DiskReport>,
    /// With `--on-mismatch=heal`: the clean snapshot committed after the tainted one.
    pub healed_snapshot: Option<Id>,
    /// Pack files and bytes written by this backup (data and index pages).
    pub packs_written: u64,
    pub bytes_written: u64,
    /// Pack files the index names that this backup did not deduplicate against: missing,
    /// of the wrong size, or found damaged by `check --read-data` (see `warnings`).
    pub unavailable_packs: u64,
    /// Index and confirmation pages stored again because no stored copy could be reused
    /// or read back whole.
    pub repaired_pages: u64,
    pub duration_seconds: f64,
    /// A running VM's backup (`--from`): whether its file systems were frozen for the
    /// view (`frozen`) or not (`crash`), and why not. `None` for disk sources.
    pub consistency: Option<Consistency>,
    pub consistency_note: Option<String>,
    /// Things that did not affect the restore point (e.g. an old bitmap that could not be
    /// removed, a confirmation state rebuilt from scratch).
    pub warnings: Vec<String>,
}

fn validate_name(kind: &str, name: &str) -> Result<(), CoreError> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.@+".contains(&b))
        && !name.starts_with('.');
    if ok {
        Ok(())
    } else {
        Err(CoreError::Invalid(format!(
            "invalid {kind} {name:?}: use 1-128 letters, digits and - _ . @ + (not starting with a dot)"
        )))
    }
}

/// Why a disk must be read in full although its change source reported changes.
/// `damage`: why the repository's snapshots or index cannot be trusted to hold the true
/// parent and its chunks (a damaged snapshot or index file was skipped).
fn full_read_reason(
    full: bool,
    damage: Option<&str>,
    parent: Option<&SnapshotInfo>,
    disk_id: &str,
    size: u64,
    cs: u32,
) -> Option<String> {
    if full {
        return Some("--full was given".into());
    }
    if let Some(why) = damage {
        return Some(why.to_string());
    }
    let Some(p) = parent else {
        return Some(format!("no earlier restore point of disk {disk_id}"));
    };
    let entry = p.snapshot.disk(disk_id).expect("a parent holds the disk");
    if entry.size != size {
        return Some(format!("the disk size changed from {} to {size} bytes", entry.size));
    }
    if entry.chunk_size != cs {
        return Some(format!("the chunk size changed from {} to {cs} bytes", entry.chunk_size));
    }
    if let Some(why) = &entry.next_full {
        return Some(why.clone());
    }
    if p.snapshot.status != SnapshotStatus::Ok {
        return Some(format!("the previous restore point {} is tainted", p.id));
    }
    None
}

/// One disk, opened and planned.
struct Prepared<'a> {
    id: String,
    cbt: String,
    parent: Option<&'a SnapshotInfo>,
    source: Box<dyn BlockSource>,
    describe: String,
    size: u64,
    plan: ChunkPlan,
    full_reason: Option<String>,
    cbt_state: Option<String>,
    after_commit: AfterCommit,
    budget: Budget,
    run: u64,
}

impl Prepared<'_> {
    fn parent_entry(&self) -> Option<&DiskEntry> {
        self.parent.and_then(|p| p.snapshot.disk(&self.id))
    }
}

fn prepare<'a>(
    input: DiskInput,
    vm: &str,
    snapshots: &'a [SnapshotInfo],
    damage: Option<&str>,
    lineage: &Lineage,
    opts: &BackupOptions,
    chunk_size: u32,
) -> Result<Prepared<'a>, CoreError> {
    // Parent: the latest snapshot of this vm holding the same disk id (never a position;
    // a disk moved to another vm starts over with a full read).
    let parent = snapshots.iter().rev().find(|s| s.snapshot.vm == vm && s.snapshot.disk(&input.id).is_some());
    let parent_entry = parent.and_then(|p| p.snapshot.disk(&input.id));
    let parent_cbt = parent_entry.map(|d| ParentCbt { cbt: d.cbt.clone(), state: d.cbt_state.clone() });
    let mut opened = (input.open)(&Owner { vm, disk: &input.id }, parent_cbt.as_ref())?;
    let size = opened.source.size();
    blockproof_source::check_disk_size(&opened.source.describe(), size, Some(chunk_size))?;
    // After verification caught a lie on this disk, the next run trusts no tracking
    // metadata at all: not the change source, and not the allocation map either.
    let zero =
        if parent_entry.is_some_and(|e| e.next_full.is_some()) { Vec::new() } else { opened.source.zero_ranges()? };
    let (changed, full_reason) = match &opened.changes {
        Changes::All { reason } => (None, Some(reason.clone())),
        Changes::Ranges(r) => match full_read_reason(opts.full, damage, parent, &input.id, size, chunk_size)
            .or_else(|| lineage.unbound(opened.base, &input.id, parent?))
        {
            Some(reason) => (None, Some(reason)),
            None => (Some(r.as_slice()), None),
        },
    };
    let plan = ChunkPlan::new(size, chunk_size, &zero, changed);
    Ok(Prepared {
        describe: opened.source.describe(),
        id: input.id,
        cbt: input.cbt,
        parent,
        source: opened.source,
        size,
        plan,
        full_reason,
        cbt_state: opened.cbt_state.take(),
        after_commit: opened.after_commit,
        budget: input.verify.unwrap_or_else(|| opts.verify.clone()),
        run: parent_entry.map_or(0, |e| e.run) + 1,
    })
}

/// What backing up one disk produced.
struct DiskOutcome {
    entry: DiskEntry,
    report: DiskReport,
    /// What made it differ from its source, if it does.
    causes: Vec<Cause>,
    /// The summaries of its confirmation pages, for the disk's state documents.
    summaries: SummaryDocs,
}

/// After a commit: keeps each disk's page summaries and tree basis for the next backup
/// (a cache; a failure is a warning), with the basis of this run's lookups: the index
/// files it loaded and `written`, the ones it wrote.
fn keep_summaries(
    repo: &Repository,
    index: &BlobIndex,
    written: &[Id],
    vm: &str,
    outcomes: &[&DiskOutcome],
    warnings: &mut Vec<String>,
) {
    let basis = index.basis(written);
    for o in outcomes {
        let root = o.entry.index_root;
        crate::page_summaries::keep(repo, vm, &o.entry.id, root, &o.summaries, basis.as_ref(), warnings);
    }
}

/// Context shared by every disk of a backup.
struct Ctx<'a, 'd> {
    repo: &'a Repository,
    reader: &'a BlobReader<'a>,
    dedup: &'a Dedup<'d>,
    snapshots: &'a [SnapshotInfo],
    progress: &'a dyn Progress,
    chunk_size: u32,
    warnings: Vec<String>,
    /// Compare every unread chunk once one differs (`--on-mismatch=scan`).
    scan: bool,
    vm: String,
}

impl Ctx<'_, '_> {
    /// Reads, verifies and stores one disk; returns its manifest entry and report.
    fn disk(&mut self, d: &mut Prepared<'_>, blobs: &Sender<SealedBlob>) -> Result<DiskOutcome, CoreError> {
        let n = chunk_count(d.size, self.chunk_size);
        let run = d.run as u32;
        let mut incremental = d.full_reason.is_none();
        let mut parent_entry = d.parent_entry().filter(|_| incremental).cloned();
        let mut parent_tree = match &parent_entry {
            Some(e) => Some(TreeReader::new(self.reader, e.index_root, n, e.index_fanout)?),
            None => None,
        };
        // Every blob the parent's tree references was found or written by the backup
        // that committed it, in index files this run's index still holds: its inherited
        // chunks are taken without a lookup each, its unchanged pages without reading them.
        let reusable = parent_entry
            .as_ref()
            .filter(|e| crate::page_summaries::tree_reusable(self.repo, &self.vm, e, |b| self.dedup.holds(b)))
            .map(|e| ReusableParent { zero_chunks: e.stats.zero_chunks });
        // Loaded page by page as needed; not copied: the selection reads only chunks this
        // run did not read, which hold what they held before it.
        let (mut state, warning) = match d.parent_entry() {
            Some(e) => {
                let known = crate::page_summaries::known(self.repo, &self.vm, &d.id, |b| self.dedup.holds(b));
                ConfirmState::load_with(self.reader, e, n, known)
            }
            None => (ConfirmState::never(n), None),
        };
        self.warnings.extend(warning);

        let counters = DiskCounters::default();
        // Damage is not inherited: chunks whose stored copy is unusable are read from the
        // source, and a parent whose pages cannot be read makes this a full read.
        let mut label = format!("backup {}", d.id);
        let mut passes = 0;
        let result = loop {
            // At most: the plan, the plan with lost chunks read, a full read.
            passes += 1;
            if passes > 3 {
                return Err(CoreError::Internal(format!("disk {}: stored {passes} times without a whole tree", d.id)));
            }
            self.progress.begin(&label, d.size);
            let stored = store_disk(
                self.repo,
                self.dedup,
                d.source.as_mut(),
                &d.plan,
                parent_tree.as_mut(),
                reusable,
                blobs,
                &counters,
                self.progress,
            );
            self.progress.end();
            let stored = stored?;
            if !matches!(stored, Stored::Whole(_)) {
                counters.restart();
            }
            match stored {
                Stored::Whole(r) => break r,
                Stored::Unavailable(chunks) => {
                    label = format!("backup {} (re-reading {} chunks missing from the repository)", d.id, chunks.len());
                    d.plan.read_instead(&chunks);
                }
                Stored::ParentUnreadable(why) => {
                    label = format!("backup {} (full read)", d.id);
                    let zero = d.source.zero_ranges()?;
                    d.plan = ChunkPlan::new(d.size, self.chunk_size, &zero, None);
                    d.full_reason = Some(format!("the parent restore point's index pages cannot be read ({why})"));
                    (incremental, parent_entry, parent_tree) = (false, None, None);
                }
            }
        };
        // Only what was read is confirmed: the allocation map is tracking metadata too,
        // so chunks it called zero are sampled like inherited ones.
        for (r, action) in &d.plan.runs {
            if *action == Action::Read {
                r.clone().for_each(|c| state.confirm(c, run));
            }
        }

        // Verification, from the same source handle: evidence, the budget's sample of
        // everything not read, and the escalation around what differs.
        let cbt_missed = counters.cbt_missed.load(Ordering::Relaxed);
        let forced = std::mem::take(&mut *counters.missed_chunks.lock().expect("evidence lock"));
        let check = DiskCheck {
            id: &d.id,
            reader: self.reader,
            chunk_size: self.chunk_size,
            chunks: n,
            unread: d.plan.unread(),
            forced,
            budget: &d.budget,
            scan: self.scan,
        };
        let plan = &d.plan;
        let mut expected = |c: u64| -> Result<Id, CoreError> {
            match plan.action(c) {
                Some(Action::Zero) => Ok(Id::ZERO),
                Some(Action::Inherit) => Ok(parent_tree
                    .as_mut()
                    .ok_or_else(|| CoreError::Internal(format!("chunk {c} inherited without a parent")))?
                    .chunk(c)?),
                _ => Err(CoreError::Internal(format!("chunk {c} was read, not left unread"))),
            }
        };
        let verdict = check.run(d.source.as_mut(), self.repo, &state, &mut expected, self.progress)?;
        self.warnings.extend(verdict.warning.clone());
        // When the stale chunks were last confirmed, before this run says anything.
        let stale_last: Vec<u32> = verdict.stale.iter().map(|&(c, _)| state.get(c)).collect();
        for c in &verdict.confirmed {
            state.confirm(*c, run);
        }
        for &(c, _) in &verdict.stale {
            // Not confirmed: the restore point holds stale content here.
            state.confirm(c, 0);
        }
        let suspects =
            self.suspects(&d.id, parent_entry.as_ref(), d.parent.map(|p| p.id), &verdict.stale, &stale_last)?;
        for &c in &verdict.changing {
            state.confirm(c, 0);
        }
        let mismatches = verdict.mismatches.clone();
        let confirm_root = state.store(&mut BlobSink::new(self.repo, self.dedup, blobs))?;
        let coverage = state.coverage(run, &verdict.sampling);
        self.warnings.extend(state.take_warnings().into_iter().map(|w| format!("disk {}: {w}", d.id)));

        // What the findings say about the change tracking and the allocation map.
        let lied_alloc = verdict.stale.iter().any(|(c, _)| plan.action(*c) == Some(Action::Zero));
        let lied_cbt = verdict.stale.iter().any(|(c, _)| plan.action(*c) == Some(Action::Inherit));
        let next_full = if lied_cbt || lied_alloc {
            Some(format!(
                "verification found {} lying about disk {} in run {}",
                match (lied_cbt, lied_alloc) {
                    (true, true) => "change tracking and the allocation map",
                    (true, false) => "change tracking",
                    _ => "the allocation map",
                },
                d.id,
                d.run
            ))
        } else if cbt_missed > 0 && incremental {
            Some(format!(
                "change tracking missed writes to disk {} in run {}: {cbt_missed} chunk(s) it did not report now read \
                 as zeros (the restore point is right; the tracking is not trusted)",
                d.id, d.run
            ))
        } else {
            None
        };
        let advice = advice(&d.cbt, lied_cbt, lied_alloc, !verdict.changing.is_empty(), cbt_missed > 0 && incremental);
        let causes: Vec<Cause> = [
            (lied_cbt, Cause::ChangeTracking),
            (lied_alloc, Cause::AllocationMap),
            (!verdict.changing.is_empty(), Cause::SourceChanged),
        ]
        .into_iter()
        .filter_map(|(on, c)| on.then_some(c))
        .collect();
        let stats = DiskStats {
            bytes_read: counters.bytes_read.load(Ordering::Relaxed),
            zero_chunks: counters.zero_chunks.load(Ordering::Relaxed),
            new_chunks: counters.new_chunks.load(Ordering::Relaxed),
            new_bytes: counters.new_bytes.load(Ordering::Relaxed),
            stored_bytes: counters.stored_bytes.load(Ordering::Relaxed),
        };
        let mode = if incremental { ReadMode::Incremental } else { ReadMode::Full };
        let parent = d.parent.map(|p| p.id);
        let report = DiskReport {
            id: d.id.clone(),
            mode,
            size: d.size,
            chunk_size: self.chunk_size,
            bytes_read: stats.bytes_read,
            cbt_reported_chunks: d.plan.cbt_reported,
            cbt_overreported_chunks: counters.overreported.load(Ordering::Relaxed),
            verified_chunks: verdict.verified_chunks,
            verified_bytes: verdict.verified_bytes,
            mismatches: mismatches.clone(),
            suspect_snapshots: suspects,
            coverage: coverage.clone(),
            cbt_missed_chunks: cbt_missed,
            source_changed: !verdict.changing.is_empty(),
            escalation: verdict.escalation.clone(),
            next_mode: if d.cbt == "none" || next_full.is_some() { ReadMode::Full } else { ReadMode::Incremental },
            full_reason: d.full_reason.clone(),
            cbt: d.cbt.clone(),
            advice,
            parent,
            run: d.run,
            chunks: result.chunks,
            zero_chunks: stats.zero_chunks,
            new_chunks: stats.new_chunks,
            new_bytes: stats.new_bytes,
            stored_bytes: stats.stored_bytes,
            repaired_chunks: counters.repaired.load(Ordering::Relaxed),
        };
        let entry = DiskEntry {
            id: d.id.clone(),
            size: d.size,
            chunk_size: self.chunk_size,
            index_root: result.root,
            index_fanout: DEFAULT_FANOUT,
            parent,
            source: d.describe.clone(),
            cbt: d.cbt.clone(),
            // After a detected lie a bitmap rotation restarts: the next run records no bitmap.
            cbt_state: if next_full.is_some() { None } else { d.cbt_state.clone() },
            mode,
            full_reason: d.full_reason.clone(),
            stats,
            mismatches,
            run: d.run,
            confirm_root,
            coverage: Some(coverage.for_version(self.repo.config().version)),
            next_full,
        };
        Ok(DiskOutcome { entry, report, causes, summaries: state.summaries() })
    }

    /// Earlier restore points of the disk, from `parent` back, that hold the same id at a
    /// `stale` chunk as this run's restore point and were taken after the chunk was last
    /// confirmed (`last`, per stale chunk: its run in the state before this run): by chunk, then newest first, each
    /// once. One walk down the chain: each restore point's index is opened once.
    fn suspects(
        &self,
        disk: &str,
        parent: Option<&DiskEntry>,
        parent_id: Option<Id>,
        stale: &[(u64, Id)],
        last: &[u32],
    ) -> Result<Vec<Id>, CoreError> {
        // Per stale chunk, the restore points holding its id, newest first.
        let mut hits: Vec<Vec<Id>> = vec![Vec::new(); stale.len()];
        // The stale chunks whose walk goes on (a chunk stops at its last confirmation).
        let mut live: Vec<usize> = (0..stale.len()).collect();
        let (mut at, mut at_id) = (parent.cloned(), parent_id);
        while let (Some(e), Some(sid)) = (at, at_id) {
            let n = chunk_count(e.size, e.chunk_size);
            live.retain(|&k| {
                let c = stale[k].0;
                e.run > u64::from(last[k]) && c < n
            });
            if live.is_empty() {
                break;
            }
            let mut tree = TreeReader::new(self.reader, e.index_root, n, e.index_fanout)?;
            for &k in &live {
                if tree.chunk(stale[k].0)? == stale[k].1 {
                    hits[k].push(sid);
                }
            }
            at_id = e.parent;
            at = e
                .parent
                .and_then(|p| self.snapshots.iter().find(|s| s.id == p))
                .and_then(|s| s.snapshot.disk(disk))
                .cloned();
        }
        let mut out: Vec<Id> = Vec::new();
        for s in hits.into_iter().flatten() {
            if !out.contains(&s) {
                out.push(s);
            }
        }
        Ok(out)
    }

    /// Re-reads a tainted disk in full from the same source handle — every byte: the
    /// allocation map may be what lied.
    fn heal(
        &mut self,
        d: &mut Prepared<'_>,
        first: Id,
        why: Option<String>,
        blobs: &Sender<SealedBlob>,
    ) -> Result<DiskOutcome, CoreError> {
        d.plan = ChunkPlan::new(d.size, self.chunk_size, &[], None);
        d.full_reason = Some(format!("healing: verification found snapshot {} differs from the source", first.short()));
        d.run += 1;
        d.parent = None;
        let mut out = self.disk(d, blobs)?;
        out.entry.parent = Some(first);
        out.report.parent = Some(first);
        // The reason the tainted restore point gave (which tracking lied) carries over.
        out.entry.next_full = Some(why.unwrap_or_else(|| {
            format!(
                "verification of disk {} found snapshot {} stale; the next backup reads it in full",
                d.id,
                first.short()
            )
        }));
        out.entry.cbt_state = None;
        out.report.next_mode = ReadMode::Full;
        Ok(out)
    }
}

/// What the operator should do after verification found something: a lie of change
/// tracking, of the allocation map, a source that changed while it was read, or writes
/// change tracking missed (evidence the backup had in hand). `None` when all is well.
fn advice(cbt: &str, lied_cbt: bool, lied_alloc: bool, changing: bool, missed: bool) -> Option<String> {
    let mut out = Vec::new();
    if lied_cbt || missed {
        let what = if lied_cbt { "reported changed data as unchanged" } else { "missed writes (discards)" };
        out.push(if cbt == "bitmap:auto" {
            format!("change tracking {what}: blockproof reset its bitmap rotation; the next backup of this disk reads it in full")
        } else if cbt.starts_with("changes:") || cbt.starts_with("bitmap:") {
            format!(
                "change tracking ({cbt}) {what}: reset CBT on the hypervisor (VMware: disable and re-enable change \
                 tracking; libvirt: delete the checkpoints and start a new chain) before trusting incrementals; the \
                 next backup of this disk reads it in full"
            )
        } else {
            format!("change tracking {what}; the next backup of this disk reads it in full")
        });
    }
    if lied_alloc {
        out.push(
            "the source's allocation map reported zeros where the disk holds data (a bug of the NBD server or \
             the storage): the next backup of this disk reads every byte, trusting no allocation map"
                .into(),
        );
    }
    if changing {
        out.push(
            "the source changed while blockproof read it: it is not a point-in-time view, so this restore point \
             may mix moments; back up from a snapshot (or a VM source), not from a disk in use — change tracking \
             is not at fault"
                .into(),
        );
    }
    (!out.is_empty()).then(|| out.join("; "))
}

/// For tests of concurrency and crashes (test builds only, feature `test-hooks`): with
/// `BLOCKPROOF_PAUSE_BEFORE_COMMIT=PATH` in the environment, a backup that has written all
/// its data waits, before committing its snapshot, until the file PATH exists (it creates
/// `PATH.waiting` while it waits).
fn pause_before_commit() {
    blockproof_repo::hooks::pause_at("BLOCKPROOF_PAUSE_BEFORE_COMMIT");
}

/// With `BLOCKPROOF_PAUSE_AFTER_OPEN=PATH` (test builds only), a backup that has opened
/// every disk — its change source queried — waits like [`pause_before_commit`] before it
/// reads: a test can then change the source behind the backup's view.
fn pause_after_open() {
    blockproof_repo::hooks::pause_at("BLOCKPROOF_PAUSE_AFTER_OPEN");
}

/// Makes a snapshot visible — only while this backup certainly holds its lock, checked
/// right before and right after the write. A process stopped for longer than the stale
/// age may have lost it, and gc may then have deleted what the snapshot references: the
/// snapshot is then withdrawn and the backup fails (its source is still there; running
/// it again stores what is missing).
pub(crate) fn commit(repo: &Repository, lock: &Lock<'_>, snapshot: &Snapshot) -> Result<Id, CoreError> {
    lock.ensure_held()?;
    let id = repo.save_snapshot(snapshot)?;
    if let Err(e) = lock.ensure_held() {
        repo.withdraw_snapshot(id, snapshot);
        return Err(e.into());
    }
    Ok(id)
}

/// A warning when this backup leaves out disks the vm's latest snapshot had: the vm then
/// looks complete in this restore point while a disk's newest copy stays in the older one
/// (retention keeps that copy: it works per disk).
fn omitted_disks(opts: &BackupOptions, snapshots: &[SnapshotInfo]) -> Option<String> {
    let latest = snapshots.iter().rev().find(|s| s.snapshot.vm == opts.vm)?;
    let left_out: Vec<&str> = latest
        .snapshot
        .disks
        .iter()
        .map(|d| d.id.as_str())
        .filter(|id| !opts.disks.iter().any(|d| d.id == *id))
        .collect();
    (!left_out.is_empty()).then(|| {
        format!(
            "vm {}'s latest snapshot {} also has disk(s) {}, which this backup leaves out: their newest \
             restore point stays {} (retention keeps it, per disk)",
            opts.vm,
            latest.id.short(),
            left_out.join(", "),
            latest.id.short()
        )
    })
}

/// Backs up every disk of `opts` into one new snapshot.
pub fn backup(repo: &Repository, mut opts: BackupOptions, progress: &dyn Progress) -> Result<BackupReport, CoreError> {
    let started = Instant::now();
    let time = humantime::format_rfc3339_micros(SystemTime::now()).to_string();
    validate_name("vm name", &opts.vm)?;
    if opts.disks.is_empty() {
        return Err(CoreError::Invalid("a backup needs at least one --disk".into()));
    }
    for (i, d) in opts.disks.iter().enumerate() {
        validate_name("disk id", &d.id)?;
        if opts.disks[..i].iter().any(|o| o.id == d.id) {
            return Err(CoreError::Invalid(format!("disk id {:?} is given twice", d.id)));
        }
    }

    // A shared lock tells garbage collection this backup may use what it sees; packs a gc
    // already plans to delete are left out of deduplication (stored again if needed).
    // It also names the vm: one run per vm at a time, so two overlapping backups of a vm
    // never both commit, nor remove each other's bitmaps.
    let lock = repo.lock_vm(LockKind::Shared, &format!("backup of vm {}", opts.vm), &opts.vm, opts.lock_wait)?;
    let planned = crate::gc::planned_packs(repo)?;
    // Stray and damaged snapshot and index files are skipped with a warning. With damage,
    // every disk is read in full: the skipped snapshot may have been a disk's true parent
    // (a change list is relative to it), and a skipped index file's blobs are unknown, so
    // nothing is inherited and whatever it listed is stored again.
    let SnapshotScan { snapshots, mut skipped } = repo.scan_snapshots()?;
    let (index, index_skipped) = BlobIndex::scan(repo, &planned)?;
    skipped.extend(index_skipped);
    let damage = (!skipped.damaged.is_empty()).then(|| {
        format!(
            "{} damaged snapshot or index file(s) skipped (see the warnings): the parent or its chunks may be \
             missing, so nothing is inherited",
            skipped.damaged.len()
        )
    });
    // Packs that are missing, of the wrong size or found damaged are not reused.
    let mut warnings = skipped.warnings();
    // The vm's head: an incremental on the caller's word needs its parent to be the
    // latest restore point the repository recorded of the disk.
    let lineage = Lineage::load(repo, &opts.vm, &snapshots)?;
    warnings.extend(lineage.warnings());
    warnings.extend(omitted_disks(&opts, &snapshots));
    let avail = Availability::assess(repo, &index, &mut warnings)?;
    let reader = BlobReader::new(repo, &index);
    let dedup = Dedup::new(&reader, &avail);
    let chunk_size = repo.config().chunk_size;

    // Open every disk first: together they are the vm at one point in time.
    let inputs = std::mem::take(&mut opts.disks);
    let mut prepared = Vec::new();
    for input in inputs {
        prepared.push(prepare(input, &opts.vm, &snapshots, damage.as_deref(), &lineage, &opts, chunk_size)?);
    }
    pause_after_open();
    let mut ctx = Ctx {
        repo,
        reader: &reader,
        dedup: &dedup,
        snapshots: &snapshots,
        progress,
        chunk_size,
        warnings,
        scan: opts.on_mismatch == OnMismatch::Scan,
        vm: opts.vm.clone(),
    };

    let (outcomes, stats) =
        with_pack_writer(repo, |tx| prepared.iter_mut().map(|d| ctx.disk(d, tx)).collect::<Result<Vec<_>, _>>())?;
    pause_before_commit();
    let tainted = outcomes.iter().any(|o| !o.entry.mismatches.is_empty());
    let status = if tainted { SnapshotStatus::Tainted } else { SnapshotStatus::Ok };
    let snapshot = Snapshot {
        vm: opts.vm.clone(),
        time: time.clone(),
        hostname: opts.hostname.clone(),
        tags: opts.tags.clone(),
        status,
        disks: outcomes.iter().map(|o| o.entry.clone()).collect(),
        program: format!("blockproof {}", env!("CARGO_PKG_VERSION")),
        copied_from: None,
        machine: opts.machine.clone(),
    }
    .for_version(repo.config().version);
    if opts.machine.is_some() && snapshot.machine.is_none() {
        ctx.warnings.push(format!(
            "this repository is format version {}: the VM's definition and consistency are not kept in the restore \
             point (version 4 keeps them; `copy` into a new repository to upgrade)",
            repo.config().version
        ));
    }
    // Every pack and index file is durable (the writer finished): commit.
    let id = commit(repo, &lock, &snapshot)?;
    let mut written = stats.index_files.clone();
    keep_summaries(repo, &index, &written, &opts.vm, &outcomes.iter().collect::<Vec<_>>(), &mut ctx.warnings);
    ctx.warnings.extend(crate::integrity::record_commit(repo, id, &snapshot));
    // A finding is recorded in the repository, not only printed (docs/VERIFICATION.md).
    let mut event = tainted.then(|| Event {
        snapshot: id,
        vm: opts.vm.clone(),
        time: time.clone(),
        disks: outcomes
            .iter()
            .filter(|o| !o.entry.mismatches.is_empty())
            .map(|o| EventDisk {
                id: o.entry.id.clone(),
                causes: o.causes.clone(),
                mismatches: o.entry.mismatches.clone(),
                suspects: o.report.suspect_snapshots.clone(),
            })
            .collect(),
        healed_by: None,
    });
    let mut event_warnings = Vec::new();
    if let Some(e) = &event {
        if let Err(err) = crate::events::record(repo, e) {
            event_warnings.push(format!("the detection event could not be recorded: {err}"));
        }
    }
    let mut report = BackupReport {
        snapshot: id,
        vm: opts.vm.clone(),
        status,
        time,
        disks: outcomes.iter().map(|o| o.report.clone()).collect(),
        healed_snapshot: None,
        packs_written: stats.packs,
        bytes_written: stats.pack_bytes,
        unavailable_packs: avail.unusable_packs(),
        repaired_pages: 0,
        duration_seconds: 0.0,
        consistency: opts.machine.as_ref().map(|m| m.consistency),
        consistency_note: opts.machine.as_ref().and_then(|m| m.consistency_note.clone()),
        warnings: vec![],
    };

    if tainted && opts.on_mismatch == OnMismatch::Heal {
        let heal_time = humantime::format_rfc3339_micros(SystemTime::now()).to_string();
        let (entries, heal_stats) = with_pack_writer(repo, |tx| {
            let mut entries = Vec::new();
            let mut healed = Vec::new();
            for (d, o) in prepared.iter_mut().zip(&outcomes) {
                if o.entry.mismatches.is_empty() {
                    let mut e = o.entry.clone();
                    e.parent = Some(id);
                    e.run += 1;
                    entries.push(e);
                } else {
                    let h = ctx.heal(d, id, o.entry.next_full.clone(), tx)?;
                    entries.push(h.entry.clone());
                    healed.push(h);
                }
            }
            Ok((entries, healed))
        })?;
        let (entries, healed_outcomes) = entries;
        let healed = Snapshot { time: heal_time, status: SnapshotStatus::Ok, disks: entries, ..snapshot };
        let healed_id = commit(repo, &lock, &healed)?;
        written.extend_from_slice(&heal_stats.index_files);
        let healed_outcomes = healed_outcomes.iter().collect::<Vec<_>>();
        keep_summaries(repo, &index, &written, &opts.vm, &healed_outcomes, &mut ctx.warnings);
        ctx.warnings.extend(crate::integrity::record_commit(repo, healed_id, &healed));
        report.healed_snapshot = Some(healed_id);
        if let Some(e) = event.as_mut() {
            e.healed_by = Some(healed_id);
            if let Err(err) = crate::events::record(repo, e) {
                event_warnings.push(format!("the detection event could not be updated: {err}"));
            }
        }
        report.packs_written += heal_stats.packs;
        report.bytes_written += heal_stats.pack_bytes;
    }

    // Close the sources (stopping any qemu-nbd) before what comes after the commit.
    let mut warnings = std::mem::take(&mut ctx.warnings);
    warnings.extend(event_warnings);
    for d in prepared {
        drop(d.source);
        warnings.extend(d.after_commit.run().err().map(|e| e.to_string()));
    }
    report.warnings = warnings;
    report.repaired_pages = dedup.repaired_pages.load(Ordering::Relaxed);
    report.duration_seconds = started.elapsed().as_secs_f64();
    Ok(report)
}
