//! Publishing a run: the JSON run report (`run-TIME.json`, `latest.json`), the HTML
//! report and the Prometheus textfile, each written atomically; old run reports pruned;
//! then the notifications, which get the JSON report.

use std::path::PathBuf;

use crate::job::Job;
use crate::notify::NotifyRun;
use crate::report::{prune_history, write_atomic, write_new, HistoryEntry, RunReport};

/// What publishing did.
#[derive(Debug, Default)]
pub struct Publication {
    pub written: Vec<PathBuf>,
    /// Reports that could not be written (the run then counts as failed).
    pub errors: Vec<String>,
    pub notifications: Vec<NotifyRun>,
}

/// Writes the reports of `report` as `job` says; `history` (earlier runs, oldest first)
/// feeds the HTML trends. Then sends the notifications.
pub fn publish(job: &Job, report: &RunReport, history: &[HistoryEntry]) -> Publication {
    let mut p = Publication::default();
    let json = serde_json::to_vec_pretty(report).expect("a run report serializes");
    let write = |path: PathBuf, bytes: &[u8], p: &mut Publication| match write_atomic(&path, bytes) {
        Ok(()) => p.written.push(path),
        Err(e) => p.errors.push(format!("cannot write {}: {e}", path.display())),
    };
    let mut report_path = None;
    if let Some(dir) = &job.reports.directory {
        if let Err(e) = std::fs::create_dir_all(dir) {
            p.errors.push(format!("cannot create the reports directory {}: {e}", dir.display()));
        } else {
            match write_new(dir, &report.file_stem(), &json) {
                Ok(run) => {
                    report_path = Some(run.display().to_string());
                    p.written.push(run);
                }
                Err(e) => p.errors.push(format!("cannot write the run report in {}: {e}", dir.display())),
            }
            write(dir.join("latest.json"), &json, &mut p);
            if job.reports.html {
                write(dir.join("report.html"), crate::html::render(report, history).as_bytes(), &mut p);
            }
            if let Err(e) = prune_history(dir, job.reports.keep) {
                p.errors.push(format!("cannot remove old run reports in {}: {e}", dir.display()));
            }
        }
    }
    if let Some(m) = &job.reports.metrics {
        write(m.clone(), crate::metrics::render(report).as_bytes(), &mut p);
    }
    let status = if p.errors.is_empty() { report.status } else { crate::report::RunStatus::Failed };
    for n in &job.notify {
        if let Some(r) = n.send(&job.name, status, &json, report_path.as_deref()) {
            p.notifications.push(r);
        }
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::{Phases, RunStatus, REPORT_VERSION};

    fn report(started: &str) -> RunReport {
        RunReport {
            version: REPORT_VERSION,
            job: "j".into(),
            job_file: "j.toml".into(),
            host: "h".into(),
            started: started.into(),
            finished: started.into(),
            duration_seconds: 1.0,
            status: RunStatus::Ok,
            vms: Vec::new(),
            retention: Vec::new(),
            gc: None,
            copy: None,
            restore_tests: Vec::new(),
            repository: None,
            phases: Phases::default(),
            errors: Vec::new(),
        }
    }

    /// Two runs that start in the same second (two `blockproof run` of one job at once, or
    /// a quick rerun) each keep their run report: neither replaces the other's.
    #[test]
    fn runs_of_the_same_second_keep_both_reports() {
        let dir = tempfile::tempdir().unwrap();
        let text = "version = 1\n[repository]\nlocation = \"repo\"\n[[vm]]\nname = \"a\"\ndisks = [\"id=a,source=a.img\"]\n[reports]\ndirectory = \"reports\"\nhtml = false\n";
        let job = Job::parse(&dir.path().join("j.toml"), text).unwrap();
        let mut first = report("2026-12-02T01:00:00Z");
        first.status = RunStatus::Failed;
        let second = report("2026-12-02T01:00:00Z");
        for r in [&first, &second] {
            let p = publish(&job, r, &[]);
            assert!(p.errors.is_empty(), "{:?}", p.errors);
        }
        let (history, warnings) = crate::report::load_history(&dir.path().join("reports"));
        assert!(warnings.is_empty(), "{warnings:?}");
        assert_eq!(
            history.iter().map(|h| h.status).collect::<Vec<_>>(),
            [RunStatus::Failed, RunStatus::Ok],
            "oldest first"
        );
        let names: Vec<String> = std::fs::read_dir(dir.path().join("reports"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names.len(), 3, "{names:?}");
        assert!(names.iter().all(|n| !n.contains(".tmp")), "{names:?}");
    }
}
