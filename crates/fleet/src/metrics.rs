//! Prometheus metrics of a run, in the text format node_exporter's textfile collector
//! reads (`--collector.textfile.directory`), written atomically by the caller.
//!
//! Naming follows the Prometheus conventions: a `blockproof_` prefix, base units in the
//! name (`_seconds`, `_bytes`), `_total` only on counters, one `# HELP` and `# TYPE` per
//! family. Every series carries `blockproof_job` (so the files of several jobs on one
//! host never clash); per-vm series add `vm`, per-disk series `vm` and `disk`. Gauges
//! about "the last run" describe this run; gauges about the repository (last success,
//! coverage, tainted and suspect restore points, size) come from its state after the run.

use std::fmt::Write;

use crate::objective::Verdict;
use crate::report::{RunReport, RunStatus};

#[derive(Clone, Copy)]
enum Kind {
    Gauge,
    Counter,
}

struct Family {
    name: &'static str,
    help: &'static str,
    kind: Kind,
    samples: Vec<(Vec<(&'static str, String)>, f64)>,
}

struct Families(Vec<Family>);

impl Families {
    fn add(
        &mut self,
        name: &'static str,
        kind: Kind,
        help: &'static str,
        labels: Vec<(&'static str, String)>,
        value: f64,
    ) {
        match self.0.iter_mut().find(|f| f.name == name) {
            Some(f) => f.samples.push((labels, value)),
            None => self.0.push(Family { name, help, kind, samples: vec![(labels, value)] }),
        }
    }
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

fn seconds(time: &str) -> Option<f64> {
    let t = humantime::parse_rfc3339_weak(time).ok()?;
    Some(t.duration_since(std::time::UNIX_EPOCH).ok()?.as_secs_f64())
}

fn status_labels(base: &[(&'static str, String)], status: &'static str) -> Vec<(&'static str, String)> {
    let mut l = base.to_vec();
    l.push(("status", status.to_string()));
    l
}

const STATUSES: [RunStatus; 3] = [RunStatus::Ok, RunStatus::Tainted, RunStatus::Failed];

/// The textfile for `report`.
pub fn render(report: &RunReport) -> String {
    use Kind::{Counter, Gauge};
    let mut f = Families(Vec::new());
    let job = vec![("blockproof_job", report.job.clone())];

    if let Some(t) = seconds(&report.finished) {
        f.add("blockproof_run_timestamp_seconds", Gauge, "When the last run of the job finished.", job.clone(), t);
    }
    f.add(
        "blockproof_run_duration_seconds",
        Gauge,
        "Duration of the last run of the job.",
        job.clone(),
        report.duration_seconds,
    );
    for s in STATUSES {
        let v = f64::from(u8::from(report.status == s));
        f.add(
            "blockproof_run_status",
            Gauge,
            "1 for how the last run of the job ended (ok, tainted, failed).",
            status_labels(&job, s.as_str()),
            v,
        );
    }
    for s in STATUSES {
        let n = report.vms.iter().filter(|v| v.status == s).count();
        f.add(
            "blockproof_run_vms",
            Gauge,
            "VMs of the last run by how they ended.",
            status_labels(&job, s.as_str()),
            n as f64,
        );
    }
    f.add(
        "blockproof_run_overhead_seconds",
        Gauge,
        "Time of the last run spent outside the backups and restore tests (retention, gc, copy, reading the repository's state).",
        job.clone(),
        (report.duration_seconds - report.phases.backups_seconds - report.phases.restore_tests_seconds).max(0.0),
    );
    for t in &report.restore_tests {
        f.add(
            "blockproof_vm_restore_test_passed",
            Gauge,
            "Whether the restore test the last run made of the vm's latest restore point passed (only vms tested in it).",
            vec![("blockproof_job", report.job.clone()), ("vm", t.vm.clone())],
            f64::from(u8::from(t.passed)),
        );
    }

    for vm in &report.vms {
        let l = vec![("blockproof_job", report.job.clone()), ("vm", vm.name.clone())];
        for s in STATUSES {
            let v = f64::from(u8::from(vm.status == s));
            f.add(
                "blockproof_vm_status",
                Gauge,
                "1 for how the VM's last run ended (ok, tainted, failed).",
                status_labels(&l, s.as_str()),
                v,
            );
        }
        if let Some(t) = seconds(&vm.started) {
            f.add("blockproof_vm_last_run_timestamp_seconds", Gauge, "When the VM's last run started.", l.clone(), t);
        }
        f.add(
            "blockproof_vm_duration_seconds",
            Gauge,
            "Duration of the VM's last run, hooks included.",
            l.clone(),
            vm.duration_seconds,
        );
        let Some(b) = &vm.backup else { continue };
        f.add(
            "blockproof_vm_backup_written_bytes",
            Gauge,
            "Bytes the VM's last backup wrote to the repository.",
            l.clone(),
            b.bytes_written as f64,
        );
        for d in &b.disks {
            let dl = vec![("blockproof_job", report.job.clone()), ("vm", vm.name.clone()), ("disk", d.id.clone())];
            f.add(
                "blockproof_disk_read_bytes",
                Gauge,
                "Bytes the disk's last backup read from its source.",
                dl.clone(),
                d.bytes_read as f64,
            );
            f.add(
                "blockproof_disk_new_bytes",
                Gauge,
                "New data the disk's last backup found (before compression).",
                dl.clone(),
                d.new_bytes as f64,
            );
            f.add(
                "blockproof_disk_stored_bytes",
                Gauge,
                "Bytes the disk's last backup added to the repository.",
                dl.clone(),
                d.stored_bytes as f64,
            );
            f.add(
                "blockproof_disk_verified_chunks",
                Gauge,
                "Unread chunks the disk's last backup compared with the source.",
                dl.clone(),
                d.verified_chunks as f64,
            );
            f.add(
                "blockproof_disk_verified_bytes",
                Gauge,
                "Bytes the disk's last backup compared with the source.",
                dl.clone(),
                d.verified_bytes as f64,
            );
            let mismatched: u64 = d.mismatches.iter().map(|m| m.length).sum();
            f.add(
                "blockproof_disk_mismatched_bytes",
                Gauge,
                "Bytes the disk's last backup found differing from the source.",
                dl.clone(),
                mismatched as f64,
            );
            f.add(
                "blockproof_disk_full_read",
                Gauge,
                "1 when the disk's last backup read it in full.",
                dl.clone(),
                f64::from(u8::from(d.full_reason.is_some())),
            );
        }
        for a in &vm.assessments {
            let dl = vec![("blockproof_job", report.job.clone()), ("vm", vm.name.clone()), ("disk", a.disk.clone())];
            f.add(
                "blockproof_disk_objective_runs",
                Gauge,
                "Runs inside the disk's detection objective.",
                dl.clone(),
                a.assessment.objective_runs as f64,
            );
            f.add(
                "blockproof_disk_objective_met",
                Gauge,
                "1 when the disk's coverage bound is within its detection objective (see _conditional).",
                dl.clone(),
                f64::from(u8::from(a.assessment.verdict != Verdict::Missed)),
            );
            f.add(
                "blockproof_disk_objective_conditional",
                Gauge,
                "1 when the objective holds only if later runs sample as much (an achieved bound).",
                dl,
                f64::from(u8::from(a.assessment.verdict == Verdict::Conditional)),
            );
        }
    }

    if let Some(inv) = &report.repository {
        let l = job.clone();
        f.add(
            "blockproof_repository_stored_bytes",
            Gauge,
            "Bytes of pack files in the repository.",
            l.clone(),
            inv.stored_bytes as f64,
        );
        f.add(
            "blockproof_repository_logical_bytes",
            Gauge,
            "Bytes of every restore point's disks, as full copies would take them.",
            l.clone(),
            inv.logical_bytes as f64,
        );
        f.add(
            "blockproof_repository_dedup_ratio",
            Gauge,
            "Logical over stored bytes (deduplication and compression).",
            l.clone(),
            inv.dedup_ratio,
        );
        f.add("blockproof_repository_snapshots", Gauge, "Restore points in the repository.", l, inv.snapshots as f64);
        for vm in &inv.vms {
            let l = vec![("blockproof_job", report.job.clone()), ("vm", vm.vm.clone())];
            if let Some(t) = vm.last_good.as_ref().and_then(|g| seconds(&g.time)) {
                f.add(
                    "blockproof_vm_last_success_timestamp_seconds",
                    Gauge,
                    "Time of the VM's newest restore point with status ok.",
                    l.clone(),
                    t,
                );
            }
            if let Some(t) = &vm.last_restore_test {
                if let Some(at) = seconds(&t.time) {
                    f.add(
                        "blockproof_vm_last_restore_test_timestamp_seconds",
                        Gauge,
                        "When the newest restore test of one of the VM's restore points ran.",
                        l.clone(),
                        at,
                    );
                }
                f.add(
                    "blockproof_vm_last_restore_test_passed",
                    Gauge,
                    "Whether the newest restore test of one of the VM's restore points passed.",
                    l.clone(),
                    f64::from(u8::from(t.passed)),
                );
            }
            f.add("blockproof_vm_snapshots", Gauge, "Restore points of the VM.", l.clone(), vm.snapshots as f64);
            f.add(
                "blockproof_vm_tainted_snapshots",
                Gauge,
                "Restore points of the VM verification found differing from the source.",
                l.clone(),
                vm.tainted_snapshots as f64,
            );
            f.add(
                "blockproof_vm_suspect_snapshots",
                Gauge,
                "Restore points of the VM that may share stale content a detection found.",
                l.clone(),
                vm.suspect_snapshots as f64,
            );
            f.add(
                "blockproof_vm_detection_events_total",
                Counter,
                "Detection events recorded for the VM (source and backup found differing).",
                l,
                vm.detection_events as f64,
            );
            for d in &vm.disks {
                let dl = vec![("blockproof_job", report.job.clone()), ("vm", vm.vm.clone()), ("disk", d.id.clone())];
                f.add(
                    "blockproof_disk_size_bytes",
                    Gauge,
                    "Size of the disk at its latest restore point.",
                    dl.clone(),
                    d.size as f64,
                );
                f.add(
                    "blockproof_disk_chunks",
                    Gauge,
                    "Chunks of the disk at its latest restore point.",
                    dl.clone(),
                    d.map.chunks as f64,
                );
                let never: u64 = d.map.cells.iter().map(|c| c.never_confirmed).sum();
                f.add(
                    "blockproof_disk_never_confirmed_chunks",
                    Gauge,
                    "Chunks of the disk never confirmed against the source.",
                    dl.clone(),
                    never as f64,
                );
                let Some(c) = &d.coverage else { continue };
                f.add(
                    "blockproof_disk_coverage_bound_runs",
                    Gauge,
                    "Every chunk of the disk is confirmed against its source within this many runs (0: no bound).",
                    dl.clone(),
                    c.full_coverage_within_runs as f64,
                );
                f.add(
                    "blockproof_disk_oldest_confirmation_runs",
                    Gauge,
                    "Runs since the disk's least recently confirmed chunk was confirmed.",
                    dl,
                    c.oldest_confirmed_runs_ago as f64,
                );
            }
        }
    }

    let mut out = String::new();
    for fam in &f.0 {
        let kind = match fam.kind {
            Kind::Gauge => "gauge",
            Kind::Counter => "counter",
        };
        let _ = writeln!(out, "# HELP {} {}", fam.name, fam.help);
        let _ = writeln!(out, "# TYPE {} {kind}", fam.name);
        for (labels, value) in &fam.samples {
            let l: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{}\"", escape(v))).collect();
            let _ = writeln!(out, "{}{{{}}} {}", fam.name, l.join(","), value);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
