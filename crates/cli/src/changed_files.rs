//! `diff --files`: the files that changed between two snapshots, per disk and
//! filesystem, read in place through blockproof-fs (nothing is mounted or restored).
//!
//! Only disks whose bytes differ are opened. On each, every partition that holds a
//! recognised filesystem in both snapshots (same partition number, same kind) is compared
//! with [`blockproof_fs::changes`]: entries added, removed, or modified by rsync's quick
//! check (kind, size, modification time, mode, link target — contents are not read). A
//! filesystem that cannot be read in either snapshot is reported with the reason, never
//! fatal: the byte ranges stay the answer for that disk.

use anyhow::Result;
use blockproof_core::DiffReport;
use blockproof_fs::{changes, Disk, FileChange};
use blockproof_repo::{BlobReader, Repository};
use serde::Serialize;

use crate::files::{leaked_reader, snapshot_disk};

/// The changed files of one filesystem of one disk.
#[derive(Debug, Serialize)]
pub struct FilesystemChanges {
    pub disk: String,
    /// The partition number (`--partition` of `ls`; 0: the whole disk).
    pub partition: u32,
    pub filesystem: String,
    /// Why this filesystem could not be compared (then `changes` is empty).
    pub error: Option<String>,
    pub changes: Vec<ChangeRow>,
}

#[derive(Debug, Serialize)]
pub struct ChangeRow {
    #[serde(skip)]
    mark: char,
    pub path: String,
    /// `added`, `removed` or `modified`.
    pub change: &'static str,
    pub kind: &'static str,
    /// For `modified`: what differs (`kind`, `size`, `mtime`, `mode`, `target`).
    pub differs: Vec<&'static str>,
}

impl From<&FileChange> for ChangeRow {
    fn from(c: &FileChange) -> Self {
        ChangeRow {
            mark: c.change.mark(),
            path: c.path.to_string(),
            change: c.change.name(),
            kind: c.kind.name(),
            differs: c.differs.clone(),
        }
    }
}

/// The changed files of every changed disk of `report`.
pub fn changed_files(repo: Repository, report: &DiffReport) -> Result<Vec<FilesystemChanges>> {
    let repo: &'static Repository = Box::leak(Box::new(repo));
    let (from, to) = (repo.load_snapshot(&report.from.to_hex())?, repo.load_snapshot(&report.to.to_hex())?);
    let reader = leaked_reader(repo)?;
    let mut out = Vec::new();
    for d in report.disks.iter().filter(|d| !d.changed.is_empty()) {
        let (Some(a), Some(b)) = (from.snapshot.disk(&d.id), to.snapshot.disk(&d.id)) else { continue };
        let (old, new) = match (open(reader, a), open(reader, b)) {
            (Ok(old), Ok(new)) => (old, new),
            // No partition table or filesystem this reader knows: nothing to compare.
            _ => continue,
        };
        for p in new.partitions() {
            let Some(kind) = p.filesystem else { continue };
            if !old.partitions().iter().any(|q| q.index == p.index && q.filesystem == Some(kind)) {
                continue;
            }
            let mut fc = FilesystemChanges {
                disk: d.id.clone(),
                partition: p.index,
                filesystem: kind.to_string(),
                error: None,
                changes: Vec::new(),
            };
            let compared = old
                .open_filesystem(Some(p.index))
                .and_then(|x| new.open_filesystem(Some(p.index)).map(|y| (x, y)))
                .and_then(|(x, y)| changes(&x, &y));
            match compared {
                Ok(list) => fc.changes = list.iter().map(ChangeRow::from).collect(),
                Err(e) => fc.error = Some(e.to_string()),
            }
            out.push(fc);
        }
    }
    Ok(out)
}

fn open(reader: &'static BlobReader<'static>, entry: &blockproof_format::DiskEntry) -> Result<Disk> {
    Ok(Disk::open(snapshot_disk(reader, entry)?)?)
}

/// The text form: per filesystem a header, then `+ path`, `- path`, `M path (size, mtime)`.
pub fn print(list: &[FilesystemChanges]) {
    for fc in list {
        let what = format!("disk {} partition {} ({})", fc.disk, fc.partition, fc.filesystem);
        if let Some(e) = &fc.error {
            println!("  {what}: files not compared: {e}");
            continue;
        }
        if fc.changes.is_empty() {
            println!("  {what}: no file changed");
            continue;
        }
        println!("  {what}: {}", crate::commands::count(fc.changes.len() as u64, "change"));
        for c in &fc.changes {
            let why = if c.differs.is_empty() { String::new() } else { format!(" ({})", c.differs.join(", ")) };
            println!("    {} {}{why}", c.mark, c.path);
        }
    }
}
