//! Publishing a run: the JSON run report (`run-TIME.json`, `latest.json`), the HTML
//! report and the Prometheus textfile, each written atomically; old run reports pruned;
//! then the notifications, which get the JSON report.

use std::path::PathBuf;

use crate::job::Job;
use crate::notify::NotifyRun;
use crate::report::{prune_history, write_atomic, HistoryEntry, RunReport};

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
            let run = dir.join(report.file_name());
            write(run.clone(), &json, &mut p);
            write(dir.join("latest.json"), &json, &mut p);
            report_path = Some(run.display().to_string());
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
