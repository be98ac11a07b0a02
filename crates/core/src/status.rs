//! Status: for each vm, its latest restore point and, per disk, how much of the disk has
//! been confirmed against its source and how the next backup will read it.
//!
//! Every disk the vm ever had in a readable snapshot is listed, each with the restore
//! point that holds its newest copy: a backup that left a disk out does not hide it.

use std::time::{Duration, SystemTime};

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
    /// The vm's newest restore point with status `ok` (absent when it has none): what
    /// `status --max-age` measures.
    pub last_good: Option<LastGood>,
    /// The newest restore test of one of the vm's restore points (`restore-test`).
    pub last_restore_test: Option<LastTest>,
    pub disks: Vec<DiskStatus>,
    /// Every detection event of the vm, oldest first: they stay after later backups.
    pub events: Vec<EventStatus>,
}

/// A vm's newest restore point with status `ok`.
#[derive(Clone, Debug, Serialize)]
pub struct LastGood {
    pub snapshot: Id,
    pub time: String,
}

/// The newest restore test of a vm.
#[derive(Clone, Debug, Serialize)]
pub struct LastTest {
    pub snapshot: Id,
    /// When the test ran.
    pub time: String,
    pub kind: crate::restore_test::TestKind,
    pub passed: bool,
    pub reason: Option<String>,
}

/// The newest restore test of `vm` (records oldest first) of a restore point that still
/// exists (`exists`).
pub fn last_test(
    tests: &[crate::restore_test::RestoreTest],
    vm: &str,
    exists: impl Fn(&Id) -> bool,
) -> Option<LastTest> {
    tests.iter().rev().find(|t| t.vm == vm && exists(&t.snapshot)).map(|t| LastTest {
        snapshot: t.snapshot,
        time: t.time.clone(),
        kind: t.kind,
        passed: t.passed,
        reason: t.reason.clone(),
    })
}

/// A vm whose last good restore point is older than the age asked for, or missing.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct StaleVm {
    pub vm: String,
    /// The time of its last good restore point (`None`: it has none).
    pub last_good: Option<String>,
}

/// The vms of `report` — and the vms named in `expected` (a vm the repository holds no
/// snapshot of has no good restore point) — whose last good restore point is older than
/// `max_age` at `now`, by name. A restore point time that cannot be read counts as old.
pub fn stale_vms(report: &StatusReport, expected: &[String], max_age: Duration, now: SystemTime) -> Vec<StaleVm> {
    let mut names: Vec<&str> =
        report.vms.iter().map(|v| v.vm.as_str()).chain(expected.iter().map(String::as_str)).collect();
    names.sort_unstable();
    names.dedup();
    let oldest = now.checked_sub(max_age).unwrap_or(SystemTime::UNIX_EPOCH);
    names
        .into_iter()
        .filter_map(|name| {
            let last = report.vms.iter().find(|v| v.vm == name).and_then(|v| v.last_good.as_ref());
            let fresh = last.and_then(|l| humantime::parse_rfc3339_weak(&l.time).ok()).is_some_and(|t| t >= oldest);
            (!fresh).then(|| StaleVm { vm: name.to_string(), last_good: last.map(|l| l.time.clone()) })
        })
        .collect()
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
    let (tests, test_warnings) = crate::restore_test::restore_tests(repo)?;
    warnings.extend(test_warnings);
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
            last_good: of_vm
                .iter()
                .rev()
                .find(|s| s.snapshot.status == SnapshotStatus::Ok)
                .map(|s| LastGood { snapshot: s.id, time: s.snapshot.time.clone() }),
            last_restore_test: last_test(&tests, v, |id| of_vm.iter().any(|s| s.id == *id)),
            disks,
        });
    }
    Ok(StatusReport { vms: out, warnings })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vm(name: &str, last_good: Option<&str>) -> VmStatus {
        VmStatus {
            vm: name.into(),
            snapshot: Id::ZERO,
            time: "2026-12-01T00:00:00Z".into(),
            status: SnapshotStatus::Ok,
            snapshots: 1,
            last_good: last_good.map(|t| LastGood { snapshot: Id::ZERO, time: t.into() }),
            last_restore_test: None,
            disks: vec![],
            events: vec![],
        }
    }

    #[test]
    fn stale_vms_are_those_without_a_good_restore_point_within_the_age() {
        let report = StatusReport {
            vms: vec![
                vm("fresh", Some("2026-12-01T23:00:00Z")),
                vm("old", Some("2026-11-30T12:00:00Z")),
                vm("tainted-only", None),
                vm("garbled", Some("yesterday")),
            ],
            warnings: vec![],
        };
        let now = humantime::parse_rfc3339("2026-12-02T06:00:00Z").unwrap();
        let stale =
            stale_vms(&report, &["never-backed-up".into(), "fresh".into()], Duration::from_secs(26 * 3600), now);
        let names: Vec<&str> = stale.iter().map(|s| s.vm.as_str()).collect();
        assert_eq!(names, ["garbled", "never-backed-up", "old", "tainted-only"]);
        assert_eq!(stale[2].last_good.as_deref(), Some("2026-11-30T12:00:00Z"));
        assert_eq!(stale[1].last_good, None);
        // Exactly at the age is still fresh.
        let at = humantime::parse_rfc3339("2026-12-01T23:00:00Z").unwrap() + Duration::from_secs(26 * 3600);
        assert!(stale_vms(&report, &[], Duration::from_secs(26 * 3600), at).iter().all(|s| s.vm != "fresh"));
    }
}
