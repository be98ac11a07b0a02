//! Status: for each vm, its latest restore point and, per disk, how much of the disk has
//! been confirmed against its source and how the next backup will read it.

use blockproof_format::manifest::{ByteRange, Coverage, ReadMode};
use blockproof_format::{Id, SnapshotStatus};
use blockproof_repo::Repository;
use serde::Serialize;

use crate::CoreError;

/// One disk of a vm's latest restore point.
#[derive(Clone, Debug, Serialize)]
pub struct DiskStatus {
    pub id: String,
    pub size: u64,
    pub cbt: String,
    pub run: u64,
    pub mode: ReadMode,
    /// Coverage after the latest run (absent for restore points written before
    /// verification existed).
    pub coverage: Option<Coverage>,
    pub mismatches: Vec<ByteRange>,
    pub next_mode: ReadMode,
    /// Why the next backup reads the disk in full, when it must.
    pub next_full_reason: Option<String>,
}

/// A vm's latest restore point.
#[derive(Clone, Debug, Serialize)]
pub struct VmStatus {
    pub vm: String,
    pub snapshot: Id,
    pub time: String,
    pub status: SnapshotStatus,
    pub snapshots: u64,
    pub disks: Vec<DiskStatus>,
}

/// The status of every vm (or of `vm`), by name, from the readable snapshots.
#[derive(Clone, Debug, Serialize)]
pub struct StatusReport {
    pub vms: Vec<VmStatus>,
    /// Stray and damaged snapshot files skipped: a vm's latest readable snapshot may not
    /// be its newest.
    pub warnings: Vec<String>,
}

/// The status of every vm (or of `vm`), by name. Stray and damaged snapshot files are
/// skipped, with a warning each.
pub fn status(repo: &Repository, vm: Option<&str>) -> Result<StatusReport, CoreError> {
    let scan = repo.scan_snapshots()?;
    let warnings = scan.skipped.warnings();
    let snapshots = scan.snapshots;
    let mut vms: Vec<&str> =
        snapshots.iter().map(|s| s.snapshot.vm.as_str()).filter(|v| vm.is_none_or(|w| w == *v)).collect();
    vms.sort_unstable();
    vms.dedup();
    if let (Some(v), true) = (vm, vms.is_empty()) {
        return Err(CoreError::Invalid(format!("no snapshots of vm {v:?}")));
    }
    let mut out = Vec::new();
    for v in vms {
        let of_vm: Vec<_> = snapshots.iter().filter(|s| s.snapshot.vm == v).collect();
        let latest = of_vm.last().expect("a vm has snapshots");
        let s = &latest.snapshot;
        let disks = s
            .disks
            .iter()
            .map(|d| {
                let next_full_reason = if d.cbt == "none" {
                    Some("cbt=none".to_string())
                } else if let Some(why) = &d.next_full {
                    Some(why.clone())
                } else if s.status != SnapshotStatus::Ok {
                    Some(format!("the previous restore point {} is tainted", latest.id))
                } else {
                    None
                };
                DiskStatus {
                    id: d.id.clone(),
                    size: d.size,
                    cbt: d.cbt.clone(),
                    run: d.run,
                    mode: d.mode,
                    coverage: d.coverage.clone(),
                    mismatches: d.mismatches.clone(),
                    next_mode: if next_full_reason.is_some() { ReadMode::Full } else { ReadMode::Incremental },
                    next_full_reason,
                }
            })
            .collect();
        out.push(VmStatus {
            vm: v.to_string(),
            snapshot: latest.id,
            time: s.time.clone(),
            status: s.status,
            snapshots: of_vm.len() as u64,
            disks,
        });
    }
    Ok(StatusReport { vms: out, warnings })
}
