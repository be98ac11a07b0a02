//! The run report: one JSON document per run — per vm and disk the backup report, with
//! timings, hooks, errors, consistency and the detection objective; the retention, gc
//! and copy outcomes; the repository's state afterwards — and the history of earlier
//! runs (the reports kept in the reports directory), which the HTML trends and the
//! "gc when due" rule read.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use blockproof_core::{BackupReport, CopyReport, GcReport};
use serde::{Deserialize, Serialize, Serializer};

use crate::hook::HookRun;
use crate::inventory::Inventory;
use crate::objective::{Assessment, Objective};

/// Version of the run report document.
pub const REPORT_VERSION: u32 = 1;

/// How a run, or one vm of it, ended. The run's exit code: 0, 3, 1.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RunStatus {
    Ok,
    /// A restore point was stored, but verification found it differs from its source.
    Tainted,
    Failed,
}

impl RunStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            RunStatus::Ok => "ok",
            RunStatus::Tainted => "tainted",
            RunStatus::Failed => "failed",
        }
    }
}

/// How consistent a vm's disks were when read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Consistency {
    /// As the sources present them (a snapshot of running disks is crash-consistent).
    Crash,
    /// A pre hook ran first (say, `fsfreeze` through the guest agent and a snapshot):
    /// as consistent as the hook made them.
    PreHook,
}

/// One disk's coverage against the vm's detection objective.
#[derive(Clone, Debug, Serialize)]
pub struct DiskAssessment {
    pub disk: String,
    #[serde(flatten)]
    pub assessment: Assessment,
}

/// One vm of a run.
#[derive(Clone, Debug, Serialize)]
pub struct VmRun {
    pub name: String,
    pub group: Option<String>,
    pub status: RunStatus,
    /// What went wrong, in one line.
    pub error: Option<String>,
    pub started: String,
    /// Hooks and backup.
    pub duration_seconds: f64,
    /// The backup alone.
    pub backup_seconds: f64,
    pub consistency: Consistency,
    /// The verification budget used (as written, or derived from the objective).
    pub verify: String,
    pub objective: Option<Objective>,
    /// Per disk, whether the objective holds after this run.
    pub assessments: Vec<DiskAssessment>,
    pub pre: Option<HookRun>,
    pub post: Option<HookRun>,
    pub tags: Vec<String>,
    /// The backup's own report (absent when it did not run or failed).
    pub backup: Option<BackupReport>,
}

/// Retention of one vm.
#[derive(Clone, Debug, Serialize)]
pub struct ForgetRun {
    pub vm: String,
    pub kept: u64,
    pub removed: u64,
    pub error: Option<String>,
}

/// Garbage collection after retention.
#[derive(Clone, Debug, Serialize)]
pub struct GcRun {
    pub ran: bool,
    /// Why it ran or not.
    pub reason: String,
    pub report: Option<GcReport>,
    pub error: Option<String>,
}

/// The copy to the second repository.
#[derive(Clone, Debug, Serialize)]
pub struct CopyRun {
    pub to: String,
    pub report: Option<CopyReport>,
    pub error: Option<String>,
}

/// Seconds spent in each phase (the job's own overhead is what is not in `backups`).
#[derive(Clone, Debug, Default, Serialize)]
pub struct Phases {
    pub backups_seconds: f64,
    pub retention_seconds: f64,
    pub gc_seconds: f64,
    pub copy_seconds: f64,
    pub restore_tests_seconds: f64,
    pub inventory_seconds: f64,
}

/// The report of one run.
#[derive(Clone, Debug, Serialize)]
pub struct RunReport {
    pub version: u32,
    pub job: String,
    pub job_file: String,
    pub host: String,
    pub started: String,
    pub finished: String,
    pub duration_seconds: f64,
    pub status: RunStatus,
    pub vms: Vec<VmRun>,
    pub retention: Vec<ForgetRun>,
    pub gc: Option<GcRun>,
    pub copy: Option<CopyRun>,
    /// The restore tests of this run (`[restore_test]`; empty when none was due).
    pub restore_tests: Vec<crate::RestoreTestRun>,
    /// The repository after the run (absent when it could not be read).
    pub repository: Option<Inventory>,
    pub phases: Phases,
    /// Failures outside the vms (retention, gc, copy, reading the repository's state).
    pub errors: Vec<String>,
}

impl RunReport {
    /// Exit code: 0 all good, 3 any tainted, 1 any failed.
    pub fn exit_code(&self) -> u8 {
        match self.status {
            RunStatus::Ok => 0,
            RunStatus::Tainted => 3,
            RunStatus::Failed => 1,
        }
    }

    /// The stem of this run's report name: `YYYYMMDDTHHMMSSZ` (the report is
    /// `run-STEM.json`, see [`write_new`]).
    pub fn file_stem(&self) -> String {
        self.started.chars().filter(|c| c.is_ascii_alphanumeric()).collect()
    }
}

/// Serializes a duration as seconds.
pub fn seconds<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64())
}

/// An earlier run, as much of its report as the trends and the gc rule need (read
/// leniently: later versions may add fields).
#[derive(Clone, Debug, Deserialize)]
pub struct HistoryEntry {
    pub started: String,
    pub status: RunStatus,
    pub duration_seconds: f64,
    #[serde(default)]
    pub vms: Vec<HistoryVm>,
    #[serde(default)]
    pub gc: Option<HistoryGc>,
}

#[derive(Clone, Debug, Deserialize)]
pub struct HistoryVm {
    pub name: String,
    pub status: RunStatus,
    pub duration_seconds: f64,
    #[serde(default)]
    pub backup: Option<HistoryBackup>,
}

#[derive(Clone, Debug, Deserialize)]
pub struct HistoryBackup {
    #[serde(default)]
    pub disks: Vec<HistoryDisk>,
}

#[derive(Clone, Debug, Deserialize)]
pub struct HistoryDisk {
    pub bytes_read: u64,
    pub stored_bytes: u64,
}

#[derive(Clone, Debug, Deserialize)]
pub struct HistoryGc {
    pub ran: bool,
}

impl HistoryEntry {
    pub fn time(&self) -> Option<SystemTime> {
        humantime::parse_rfc3339_weak(&self.started).ok()
    }
}

/// The run reports kept in `dir`, oldest first, with a warning for each one that cannot
/// be read (a damaged report never stops a run).
pub fn load_history(dir: &Path) -> (Vec<HistoryEntry>, Vec<String>) {
    let mut warnings = Vec::new();
    let mut out = Vec::new();
    for path in report_files(dir) {
        match fs::read(&path)
            .map_err(|e| e.to_string())
            .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
        {
            Ok(entry) => out.push(entry),
            Err(e) => warnings.push(format!("run report {} skipped: {e}", path.display())),
        }
    }
    (out, warnings)
}

/// `run-*.json` in `dir`, oldest first: by the time in the name, then by the number a
/// second report of the same second carries (`run-TIME-2.json`).
fn report_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<(String, u32, PathBuf)> = fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter_map(|p| {
            let stem = p.file_name()?.to_str()?.strip_prefix("run-")?.strip_suffix(".json")?.to_string();
            let (time, seq) = match stem.rsplit_once('-') {
                Some((time, n)) => (time.to_string(), n.parse().ok()?),
                None => (stem, 1),
            };
            Some((time, seq, p))
        })
        .collect();
    files.sort();
    files.into_iter().map(|(_, _, p)| p).collect()
}

/// Whether the report at `path` records a gc that ran (read leniently).
fn records_gc(path: &Path) -> bool {
    fs::read(path)
        .ok()
        .and_then(|b| serde_json::from_slice::<HistoryEntry>(&b).ok())
        .is_some_and(|h| h.gc.is_some_and(|g| g.ran))
}

/// Removes the oldest run reports beyond `keep` — except the newest report of a gc that
/// ran when none of those kept records one: the gc rule ("gc when due") reads it, and
/// without it gc would run again as soon as that report aged out.
pub fn prune_history(dir: &Path, keep: usize) -> std::io::Result<()> {
    let files = report_files(dir);
    let (old, kept) = files.split_at(files.len().saturating_sub(keep));
    let spare = if kept.iter().any(|p| records_gc(p)) { None } else { old.iter().rposition(|p| records_gc(p)) };
    for (k, path) in old.iter().enumerate() {
        if Some(k) != spare {
            fs::remove_file(path)?;
        }
    }
    Ok(())
}

/// Writes a run's report as `run-STEM.json` in `dir`, atomically and never over another
/// run's report: a second report of the same second (two runs of one job at once, or a
/// quick rerun) becomes `run-STEM-2.json`, and so on. Returns the path written.
pub fn write_new(dir: &Path, stem: &str, bytes: &[u8]) -> std::io::Result<PathBuf> {
    let tmp = dir.join(format!(".run-{stem}.json.tmp-{}", std::process::id()));
    let result = (|| {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        for n in 1u32.. {
            let name = if n == 1 { format!("run-{stem}.json") } else { format!("run-{stem}-{n}.json") };
            let path = dir.join(name);
            // A hard link never replaces an existing name: the first run to claim it keeps it.
            match fs::hard_link(&tmp, &path) {
                Ok(()) => {
                    fs::File::open(dir)?.sync_all()?;
                    return Ok(path);
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && n < 10_000 => continue,
                Err(e) => return Err(e),
            }
        }
        unreachable!("the loop returns")
    })();
    let _ = fs::remove_file(&tmp);
    result
}

/// Writes `bytes` to `path` atomically: a temporary file in the same directory (a name
/// node_exporter's textfile collector ignores), flushed, renamed over `path`, and the
/// directory flushed. A reader sees the old file or the new one, never a part.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("report");
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let result = (|| {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_writes_replace_whole_files_and_leave_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.prom");
        write_atomic(&p, b"one").unwrap();
        write_atomic(&p, b"two").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
        assert!(write_atomic(&dir.path().join("no/such/dir/x"), b"x").is_err());
    }

    #[test]
    fn history_is_read_leniently_and_pruned_oldest_first() {
        let dir = tempfile::tempdir().unwrap();
        for (i, status) in ["ok", "failed", "tainted"].iter().enumerate() {
            let doc = format!(
                r#"{{"started":"2026-12-0{}T01:00:00Z","status":"{status}","duration_seconds":1.5,"future":1,"vms":[]}}"#,
                i + 1
            );
            fs::write(dir.path().join(format!("run-2026120{}T010000Z.json", i + 1)), doc).unwrap();
        }
        fs::write(dir.path().join("run-20261204T010000Z.json"), "{broken").unwrap();
        fs::write(dir.path().join("latest.json"), "{}").unwrap();
        let (h, warnings) = load_history(dir.path());
        assert_eq!(
            h.iter().map(|e| e.status).collect::<Vec<_>>(),
            [RunStatus::Ok, RunStatus::Failed, RunStatus::Tainted]
        );
        assert_eq!(warnings.len(), 1);
        prune_history(dir.path(), 2).unwrap();
        let (h, _) = load_history(dir.path());
        assert_eq!(h.len(), 1, "the two oldest went (the broken one is the newest)");
        assert!(dir.path().join("latest.json").exists());
    }
}
