//! Status: for each vm, its latest restore point and, per disk, how much of the disk has
//! been confirmed against its source and how the next backup will read it.
//!
//! Every disk the vm ever had in a readable snapshot is listed, each with the restore
//! point that holds its newest copy: a backup that left a disk out does not hide it.

use blockproof_format::manifest::{ByteRange, Coverage, ReadMode};
use blockproof_format::{Id, SnapshotStatus};
use blockproof_repo::Repository;
use serde::Serialize;

use crate::CoreError;

/// One disk of a vm, as its newest restore point has it.
#[derive(Clone, Debug, Serialize)]
pub struct DiskStatus {
    pub id: String,
    /// The restore point holding the disk's newest copy: the vm's latest, unless the
    /// latest backups left the disk out.
    pub snapshot: Id,
    pub time: String,
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

/// A vm's latest restore point, and the history of what verification found.
#[derive(Clone, Debug, Serialize)]
pub struct VmStatus {
    pub vm: String,
    pub snapshot: Id,
    pub time: String,
    pub status: SnapshotStatus,
    pub snapshots: u64,
    pub disks: Vec<DiskStatus>,
    /// Every detection event of the vm, oldest first: they stay after later backups.
    pub events: Vec<EventStatus>,
}

/// A detection event as `status` shows it.
#[derive(Clone, Debug, Serialize)]
pub struct EventStatus {
    pub time: String,
    /// The tainted restore point.
    pub snapshot: Id,
    /// Whether that restore point has been forgotten since (the event stays).
    pub forgotten: bool,
    pub disks: Vec<EventDiskStatus>,
}

/// One disk of a detection event.
#[derive(Clone, Debug, Serialize)]
pub struct EventDiskStatus {
    pub id: String,
    pub causes: Vec<crate::events::Cause>,
    pub mismatches: Vec<ByteRange>,
    pub suspects: Vec<Id>,
    /// The restore point holding the good bytes of those ranges (the healed one, or the
    /// next full one); absent until one exists.
    pub good_snapshot: Option<Id>,
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
    let mut warnings = scan.skipped.warnings();
    let snapshots = scan.snapshots;
    let (events, event_warnings) = crate::events::events(repo)?;
    warnings.extend(event_warnings);
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
        // Each disk from the newest snapshot that has it: the latest's disks first.
        let mut newest: Vec<(&blockproof_repo::SnapshotInfo, &blockproof_format::DiskEntry)> = Vec::new();
        for info in of_vm.iter().rev() {
            for d in &info.snapshot.disks {
                if !newest.iter().any(|(_, n)| n.id == d.id) {
                    newest.push((info, d));
                }
            }
        }
        let disks = newest
            .into_iter()
            .map(|(holder, d)| {
                let next_full_reason = if d.cbt == "none" {
                    Some("cbt=none".to_string())
                } else if let Some(why) = &d.next_full {
                    Some(why.clone())
                } else if holder.snapshot.status != SnapshotStatus::Ok {
                    Some(format!("the previous restore point {} is tainted", holder.id))
                } else {
                    None
                };
                DiskStatus {
                    id: d.id.clone(),
                    snapshot: holder.id,
                    time: holder.snapshot.time.clone(),
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
        let events = events
            .iter()
            .filter(|e| e.vm == v)
            .map(|e| EventStatus {
                time: e.time.clone(),
                snapshot: e.snapshot,
                forgotten: !snapshots.iter().any(|s| s.id == e.snapshot),
                disks: e
                    .disks
                    .iter()
                    .map(|d| EventDiskStatus {
                        id: d.id.clone(),
                        causes: d.causes.clone(),
                        mismatches: d.mismatches.clone(),
                        suspects: d.suspects.clone(),
                        good_snapshot: crate::events::good_snapshot(e, &d.id, &snapshots),
                    })
                    .collect(),
            })
            .collect();
        out.push(VmStatus {
            events,
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
