//! The repository's state after a run, for the job's vms: the last good restore point,
//! tainted and suspect restore points, detection events, the last restore test, each disk's coverage and its
//! confirmation map (the heatmap), and the repository's size and deduplication. Every
//! report — JSON, metrics, HTML — is rendered from this one reading, so they agree.

use blockproof_core::{ConfirmationMap, ConfirmationReader, Coverage};
use blockproof_format::manifest::ByteRange;
use blockproof_format::{Id, SnapshotStatus};
use blockproof_repo::Repository;
use blockproof_store::Kind;
use serde::Serialize;

use crate::FleetError;

/// A restore point, briefly.
#[derive(Clone, Debug, Serialize)]
pub struct SnapshotRef {
    pub id: Id,
    pub time: String,
    pub status: SnapshotStatus,
}

/// One disk of a vm's latest restore point.
#[derive(Clone, Debug, Serialize)]
pub struct DiskInventory {
    pub id: String,
    pub size: u64,
    pub run: u64,
    pub coverage: Option<Coverage>,
    pub mismatches: Vec<ByteRange>,
    /// Runs since each part of the disk was last confirmed against its source.
    pub map: ConfirmationMap,
}

/// One vm of the job in the repository.
#[derive(Clone, Debug, Serialize)]
pub struct VmInventory {
    pub vm: String,
    pub snapshots: u64,
    pub latest: Option<SnapshotRef>,
    /// The newest restore point with status `ok`.
    pub last_good: Option<SnapshotRef>,
    pub tainted_snapshots: u64,
    /// Restore points a detection event named as possibly sharing stale content.
    pub suspect_snapshots: u64,
    /// Detection events of the vm (they outlive later backups and forget).
    pub detection_events: u64,
    /// The newest restore test of one of the vm's restore points (`restore-test` or a
    /// job's `[restore_test]`).
    pub last_restore_test: Option<blockproof_core::status::LastTest>,
    pub disks: Vec<DiskInventory>,
}

/// The repository after a run.
#[derive(Clone, Debug, Serialize)]
pub struct Inventory {
    pub location: String,
    pub snapshots: u64,
    /// Pack files, as stored.
    pub stored_bytes: u64,
    /// The disks of every restore point, as full copies would take them.
    pub logical_bytes: u64,
    /// Logical over stored (deduplication and compression together).
    pub dedup_ratio: f64,
    pub vms: Vec<VmInventory>,
    /// Files skipped while reading (damaged or stray), and confirmation states that could
    /// not be read.
    pub warnings: Vec<String>,
}

/// Reads the state of `vms` in `repo`; heatmaps of at most `cells` cells.
pub fn inventory(repo: &Repository, location: &str, vms: &[String], cells: usize) -> Result<Inventory, FleetError> {
    let scan = repo.scan_snapshots()?;
    let mut warnings = scan.skipped.warnings();
    let snapshots = scan.snapshots;
    let (events, event_warnings) = blockproof_core::events::events(repo)?;
    warnings.extend(event_warnings);
    let (tests, test_warnings) = blockproof_core::restore_test::restore_tests(repo)?;
    warnings.extend(test_warnings);
    let stored_bytes: u64 = repo.backend().list_sizes(Kind::Pack)?.iter().map(|(_, n)| n).sum();
    let logical_bytes: u64 = snapshots.iter().flat_map(|s| &s.snapshot.disks).map(|d| d.size).sum();
    let reader = ConfirmationReader::new(repo)?;
    let brief = |s: &blockproof_repo::SnapshotInfo| SnapshotRef {
        id: s.id,
        time: s.snapshot.time.clone(),
        status: s.snapshot.status,
    };
    let mut out = Vec::new();
    for vm in vms {
        let of_vm: Vec<_> = snapshots.iter().filter(|s| &s.snapshot.vm == vm).collect();
        let latest = of_vm.last().copied();
        let mut disks = Vec::new();
        if let Some(l) = latest {
            for d in &l.snapshot.disks {
                let map = reader.map(l, &d.id, cells)?;
                if let Some(w) = &map.warning {
                    warnings.push(format!("vm {vm}: {w}"));
                }
                disks.push(DiskInventory {
                    id: d.id.clone(),
                    size: d.size,
                    run: d.run,
                    coverage: d.coverage.clone(),
                    mismatches: d.mismatches.clone(),
                    map,
                });
            }
        }
        let of_vm_events: Vec<_> = events.iter().filter(|e| &e.vm == vm).collect();
        let suspects = of_vm
            .iter()
            .filter(|s| of_vm_events.iter().any(|e| e.disks.iter().any(|d| d.suspects.contains(&s.id))))
            .count() as u64;
        out.push(VmInventory {
            vm: vm.clone(),
            snapshots: of_vm.len() as u64,
            latest: latest.map(brief),
            last_good: of_vm.iter().rev().find(|s| s.snapshot.status == SnapshotStatus::Ok).map(|s| brief(s)),
            tainted_snapshots: of_vm.iter().filter(|s| s.snapshot.status == SnapshotStatus::Tainted).count() as u64,
            suspect_snapshots: suspects,
            detection_events: of_vm_events.len() as u64,
            last_restore_test: blockproof_core::status::last_test(&tests, vm, |id| of_vm.iter().any(|s| s.id == *id)),
            disks,
        });
    }
    Ok(Inventory {
        location: location.to_string(),
        snapshots: snapshots.len() as u64,
        stored_bytes,
        logical_bytes,
        dedup_ratio: if stored_bytes == 0 { 0.0 } else { logical_bytes as f64 / stored_bytes as f64 },
        vms: out,
        warnings,
    })
}
