//! Backup: read the disks of a vm and commit one snapshot.

use std::sync::atomic::Ordering;
use std::time::{Instant, SystemTime};

use blockproof_format::manifest::{DiskStats, ReadMode};
use blockproof_format::tree::DEFAULT_FANOUT;
use blockproof_format::{DiskEntry, Id, Snapshot, SnapshotStatus};
use blockproof_repo::{BlobIndex, PackWriter, Repository, SealedBlob};
use blockproof_source::BlockSource;
use crossbeam_channel::bounded;
use serde::Serialize;

use crate::pipeline::{store_disk, Dedup, DiskCounters};
use crate::{CoreError, Progress};

/// One disk to back up.
pub struct DiskInput {
    /// Stable identity of the disk (never its position).
    pub id: String,
    pub source: Box<dyn BlockSource>,
    /// The change source as given (`none` until changed-block tracking lands).
    pub cbt: String,
}

/// What to back up.
pub struct BackupOptions {
    pub vm: String,
    pub disks: Vec<DiskInput>,
    pub tags: Vec<String>,
    pub hostname: String,
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
        if d.cbt != "none" {
            return Err(CoreError::Invalid(format!(
                "disk {}: change source {:?} is not supported yet (use cbt=none)",
                d.id, d.cbt
            )));
        }
    }

    let snapshots = repo.snapshots()?;
    let index = BlobIndex::load(repo)?;
    let dedup = Dedup::new(&index);
    let chunk_size = repo.config().chunk_size;

    let (blob_tx, blob_rx) = bounded::<SealedBlob>(64);
    let (entries, writer_stats) = std::thread::scope(|s| {
        let writer = s.spawn(move || {
            let mut w = PackWriter::new(repo);
            for blob in blob_rx.iter() {
                w.add(blob)?;
            }
            w.finish()
        });
        let mut entries = Vec::new();
        let mut result = Ok(());
        for disk in &opts.disks {
            // Parent: the latest snapshot of this vm holding the same disk id.
            let parent =
                snapshots.iter().rev().find(|s| s.snapshot.vm == opts.vm && s.snapshot.disk(&disk.id).is_some());
            let counters = DiskCounters::default();
            progress.begin(&format!("backup {}", disk.id), disk.source.size());
            let r = store_disk(repo, &dedup, disk.source.as_ref(), &blob_tx, &counters, progress);
            progress.end();
            match r {
                Ok(r) => entries.push((disk, parent.map(|p| p.id), r, counters)),
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
            (Ok(()), Ok((_, stats))) => Ok((entries, stats)),
        }
    })?;

    let mut disks = Vec::new();
    let mut reports = Vec::new();
    for (input, parent, result, c) in entries {
        let stats = DiskStats {
            bytes_read: c.bytes_read.load(Ordering::Relaxed),
            zero_chunks: c.zero_chunks.load(Ordering::Relaxed),
            new_chunks: c.new_chunks.load(Ordering::Relaxed),
            new_bytes: c.new_bytes.load(Ordering::Relaxed),
            stored_bytes: c.stored_bytes.load(Ordering::Relaxed),
        };
        let size = input.source.size();
        reports.push(DiskReport {
            id: input.id.clone(),
            mode: ReadMode::Full,
            size,
            chunk_size,
            bytes_read: stats.bytes_read,
            cbt_reported_chunks: 0,
            cbt_overreported_chunks: 0,
            verified_chunks: 0,
            verified_bytes: 0,
            mismatches: vec![],
            suspect_snapshots: vec![],
            // A full read confirms every chunk against the source in this run.
            coverage: Coverage {
                chunks: result.chunks,
                never_confirmed: 0,
                oldest_confirmed_runs_ago: 0,
                full_coverage_within_runs: 1,
            },
            next_mode: ReadMode::Full,
            parent,
            chunks: result.chunks,
            zero_chunks: stats.zero_chunks,
            new_chunks: stats.new_chunks,
            new_bytes: stats.new_bytes,
            stored_bytes: stats.stored_bytes,
        });
        disks.push(DiskEntry {
            id: input.id.clone(),
            size,
            chunk_size,
            index_root: result.root,
            index_fanout: DEFAULT_FANOUT,
            parent,
            source: input.source.describe(),
            cbt: input.cbt.clone(),
            mode: ReadMode::Full,
            stats,
            mismatches: vec![],
        });
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
    Ok(BackupReport {
        snapshot: id,
        vm: opts.vm,
        status: SnapshotStatus::Ok,
        time,
        disks: reports,
        packs_written: writer_stats.packs,
        bytes_written: writer_stats.pack_bytes,
        duration_seconds: started.elapsed().as_secs_f64(),
    })
}
