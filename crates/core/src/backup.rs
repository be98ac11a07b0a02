//! Backup: read the disks of a vm and commit one snapshot.

use std::sync::atomic::Ordering;
use std::time::{Instant, SystemTime};

use blockproof_format::manifest::{DiskStats, ReadMode};
use blockproof_format::tree::chunk_count;
use blockproof_format::tree::DEFAULT_FANOUT;
use blockproof_format::{DiskEntry, Id, Snapshot, SnapshotStatus};
use blockproof_repo::{BlobIndex, BlobReader, PackWriter, Repository, SealedBlob, SnapshotInfo, TreeReader};
use blockproof_source::{AfterCommit, BlockSource, Changes, DiskSpec, OpenedDisk, ParentCbt, SourceError};
use crossbeam_channel::bounded;
use serde::Serialize;

use crate::pipeline::{store_disk, Dedup, DiskCounters};
use crate::plan::{Action, ChunkPlan};
use crate::{CoreError, Progress};

/// Opens a disk, given what its parent restore point recorded about the change source.
pub type OpenFn = Box<dyn FnOnce(Option<&ParentCbt>) -> Result<OpenedDisk, SourceError> + Send>;

/// One disk to back up.
pub struct DiskInput {
    /// Stable identity of the disk (never its position).
    pub id: String,
    /// The change source, as recorded in the manifest (`none`, `bitmap:NAME`, ...).
    pub cbt: String,
    /// Opens the source once the parent is known.
    pub open: OpenFn,
}

impl DiskInput {
    /// A disk opened from a [`DiskSpec`].
    pub fn spec(id: impl Into<String>, spec: DiskSpec) -> DiskInput {
        DiskInput { id: id.into(), cbt: spec.cbt().to_string(), open: Box::new(move |parent| spec.open(parent)) }
    }

    /// An already open source, read in full (`cbt=none`).
    pub fn source(id: impl Into<String>, source: Box<dyn BlockSource>) -> DiskInput {
        DiskInput {
            id: id.into(),
            cbt: "none".into(),
            open: Box::new(move |_| Ok(OpenedDisk::full(source, "cbt=none"))),
        }
    }
}

/// What to back up.
pub struct BackupOptions {
    pub vm: String,
    pub disks: Vec<DiskInput>,
    pub tags: Vec<String>,
    pub hostname: String,
    /// Read every chunk whatever the change source says.
    pub full: bool,
}

/// How much of a disk has been confirmed against its source.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Coverage {
    pub chunks: u64,
    pub never_confirmed: u64,
    pub oldest_confirmed_runs_ago: u64,
    pub full_coverage_within_runs: u64,
}

/// The result for one disk. Field names are part of the JSON contract (DESIGN.md §5).
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
    pub mismatches: Vec<blockproof_format::manifest::ByteRange>,
    pub suspect_snapshots: Vec<Id>,
    pub coverage: Coverage,
    pub next_mode: ReadMode,
    /// Why every chunk was read, when `mode` is `full`.
    pub full_reason: Option<String>,
    /// The change source used.
    pub cbt: String,
    /// The snapshot holding this disk id before this one.
    pub parent: Option<Id>,
    pub chunks: u64,
    pub zero_chunks: u64,
    pub new_chunks: u64,
    pub new_bytes: u64,
    /// Bytes added to the repository for this disk's data (compressed and sealed).
    pub stored_bytes: u64,
}

/// The result of a backup.
#[derive(Clone, Debug, Serialize)]
pub struct BackupReport {
    pub snapshot: Id,
    pub vm: String,
    pub status: SnapshotStatus,
    pub time: String,
    pub disks: Vec<DiskReport>,
    /// Pack files and bytes written by this backup (data and index pages).
    pub packs_written: u64,
    pub bytes_written: u64,
    pub duration_seconds: f64,
    /// Things that went wrong after the commit and did not affect the restore point
    /// (e.g. an old bitmap that could not be removed; the next run removes it).
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
fn full_read_reason(
    opts_full: bool,
    parent: Option<&SnapshotInfo>,
    disk_id: &str,
    size: u64,
    chunk_size: u32,
) -> Option<String> {
    if opts_full {
        return Some("--full was given".into());
    }
    let Some(p) = parent else {
        return Some(format!("no earlier restore point of disk {disk_id}"));
    };
    let entry = p.snapshot.disk(disk_id).expect("a parent holds the disk");
    if entry.size != size {
        return Some(format!("the disk size changed from {} to {size} bytes", entry.size));
    }
    if entry.chunk_size != chunk_size {
        return Some(format!("the chunk size changed from {} to {chunk_size} bytes", entry.chunk_size));
    }
    if p.snapshot.status != SnapshotStatus::Ok {
        return Some(format!("the previous restore point {} is tainted", p.id));
    }
    None
}

/// Runs since the last full read of a disk, following its parent chain (0 for a full read
/// now): every chunk was confirmed against the source at most that many runs ago.
fn runs_since_full(snapshots: &[SnapshotInfo], parent: Option<Id>, disk_id: &str) -> u64 {
    let mut runs = 1;
    let mut at = parent;
    while let Some(id) = at {
        let Some(entry) = snapshots.iter().find(|s| s.id == id).and_then(|s| s.snapshot.disk(disk_id)) else {
            break;
        };
        if entry.mode == ReadMode::Full {
            return runs;
        }
        runs += 1;
        at = entry.parent;
    }
    runs
}

/// One disk, opened and planned.
struct Prepared<'a> {
    input_id: String,
    cbt: String,
    parent: Option<&'a SnapshotInfo>,
    source: Box<dyn BlockSource>,
    describe: String,
    size: u64,
    plan: ChunkPlan,
    full_reason: Option<String>,
    cbt_state: Option<String>,
    after_commit: AfterCommit,
}

fn prepare<'a>(
    input: DiskInput,
    vm: &str,
    snapshots: &'a [SnapshotInfo],
    chunk_size: u32,
    full: bool,
) -> Result<Prepared<'a>, CoreError> {
    // Parent: the latest snapshot of this vm holding the same disk id (never a position;
    // a disk moved to another vm starts over with a full read).
    let parent = snapshots.iter().rev().find(|s| s.snapshot.vm == vm && s.snapshot.disk(&input.id).is_some());
    let parent_cbt = parent
        .and_then(|p| p.snapshot.disk(&input.id))
        .map(|d| ParentCbt { cbt: d.cbt.clone(), state: d.cbt_state.clone() });
    let mut opened = (input.open)(parent_cbt.as_ref())?;
    let size = opened.source.size();
    let zero = opened.source.zero_ranges()?;
    let (changed, full_reason) = match &opened.changes {
        Changes::All { reason } => (None, Some(reason.clone())),
        Changes::Ranges(r) => match full_read_reason(full, parent, &input.id, size, chunk_size) {
            Some(reason) => (None, Some(reason)),
            None => (Some(r.as_slice()), None),
        },
    };
    let plan = ChunkPlan::new(size, chunk_size, &zero, changed);
    Ok(Prepared {
        describe: opened.source.describe(),
        input_id: input.id,
        cbt: input.cbt,
        parent,
        source: opened.source,
        size,
        plan,
        full_reason,
        cbt_state: opened.cbt_state.take(),
        after_commit: opened.after_commit,
    })
}

/// Backs up every disk of `opts` into one new snapshot.
pub fn backup(repo: &Repository, opts: BackupOptions, progress: &dyn Progress) -> Result<BackupReport, CoreError> {
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

    let snapshots = repo.snapshots()?;
    let index = BlobIndex::load(repo)?;
    let dedup = Dedup::new(&index);
    let reader = BlobReader::new(repo, &index);
    let chunk_size = repo.config().chunk_size;

    // Open every disk first: together they are the vm at one point in time.
    let mut prepared = Vec::new();
    for input in opts.disks {
        prepared.push(prepare(input, &opts.vm, &snapshots, chunk_size, opts.full)?);
    }

    let (blob_tx, blob_rx) = bounded::<SealedBlob>(64);
    let (results, writer_stats) = std::thread::scope(|s| {
        let writer = s.spawn(move || {
            let mut w = PackWriter::new(repo);
            for blob in blob_rx.iter() {
                w.add(blob)?;
            }
            w.finish()
        });
        let mut results = Vec::new();
        let mut result = Ok(());
        for disk in &mut prepared {
            let counters = DiskCounters::default();
            progress.begin(&format!("backup {}", disk.input_id), disk.size);
            let r = (|| {
                let mut parent_tree = match (disk.parent, disk.plan.count(Action::Inherit)) {
                    (Some(p), inherit) if inherit > 0 => {
                        let e = p.snapshot.disk(&disk.input_id).expect("a parent holds the disk");
                        Some(TreeReader::new(&reader, e.index_root, chunk_count(e.size, e.chunk_size), e.index_fanout)?)
                    }
                    _ => None,
                };
                store_disk(
                    repo,
                    &dedup,
                    disk.source.as_mut(),
                    &disk.plan,
                    parent_tree.as_mut(),
                    &blob_tx,
                    &counters,
                    progress,
                )
            })();
            progress.end();
            match r {
                Ok(r) => results.push((r, counters)),
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
        }
        drop(blob_tx);
        let written = writer.join().expect("pack writer thread panicked");
        match (result, written) {
            // A writer failure explains any pipeline error that followed it.
            (_, Err(e)) => Err(CoreError::from(e)),
            (Err(e), _) => Err(e),
            (Ok(()), Ok((_, stats))) => Ok((results, stats)),
        }
    })?;

    let mut disks = Vec::new();
    let mut reports = Vec::new();
    let mut after = Vec::new();
    for (disk, (result, c)) in prepared.into_iter().zip(results) {
        let stats = DiskStats {
            bytes_read: c.bytes_read.load(Ordering::Relaxed),
            zero_chunks: c.zero_chunks.load(Ordering::Relaxed),
            new_chunks: c.new_chunks.load(Ordering::Relaxed),
            new_bytes: c.new_bytes.load(Ordering::Relaxed),
            stored_bytes: c.stored_bytes.load(Ordering::Relaxed),
        };
        let mode = if disk.full_reason.is_some() { ReadMode::Full } else { ReadMode::Incremental };
        let parent = disk.parent.map(|p| p.id);
        let runs = if mode == ReadMode::Full { 0 } else { runs_since_full(&snapshots, parent, &disk.input_id) };
        reports.push(DiskReport {
            id: disk.input_id.clone(),
            mode,
            size: disk.size,
            chunk_size,
            bytes_read: stats.bytes_read,
            cbt_reported_chunks: disk.plan.cbt_reported,
            cbt_overreported_chunks: 0,
            verified_chunks: 0,
            verified_bytes: 0,
            mismatches: vec![],
            suspect_snapshots: vec![],
            // Every chunk was confirmed against the source at the last full read, at
            // most `runs` runs ago; the chunks read now, in this run.
            coverage: Coverage {
                chunks: result.chunks,
                never_confirmed: 0,
                oldest_confirmed_runs_ago: runs,
                full_coverage_within_runs: runs + 1,
            },
            next_mode: if disk.cbt == "none" { ReadMode::Full } else { ReadMode::Incremental },
            full_reason: disk.full_reason.clone(),
            cbt: disk.cbt.clone(),
            parent,
            chunks: result.chunks,
            zero_chunks: stats.zero_chunks,
            new_chunks: stats.new_chunks,
            new_bytes: stats.new_bytes,
            stored_bytes: stats.stored_bytes,
        });
        disks.push(DiskEntry {
            id: disk.input_id,
            size: disk.size,
            chunk_size,
            index_root: result.root,
            index_fanout: DEFAULT_FANOUT,
            parent,
            source: disk.describe,
            cbt: disk.cbt,
            cbt_state: disk.cbt_state,
            mode,
            full_reason: disk.full_reason,
            stats,
            mismatches: vec![],
        });
        // Close the source (and stop a qemu-nbd serving it) before the commit's aftermath.
        drop(disk.source);
        after.push(disk.after_commit);
    }
    let snapshot = Snapshot {
        vm: opts.vm.clone(),
        time: time.clone(),
        hostname: opts.hostname,
        tags: opts.tags,
        status: SnapshotStatus::Ok,
        disks,
        program: format!("blockproof {}", env!("CARGO_PKG_VERSION")),
    };
    // Every pack and index file is durable (the writer finished): commit.
    let id = repo.save_snapshot(&snapshot)?;
    let warnings = after.into_iter().filter_map(|a| a.run().err().map(|e| e.to_string())).collect();
    Ok(BackupReport {
        snapshot: id,
        vm: opts.vm,
        status: SnapshotStatus::Ok,
        time,
        disks: reports,
        packs_written: writer_stats.packs,
        bytes_written: writer_stats.pack_bytes,
        duration_seconds: started.elapsed().as_secs_f64(),
        warnings,
    })
}
