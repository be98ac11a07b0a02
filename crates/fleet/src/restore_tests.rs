//! Restore tests in a job (`[restore_test]`): "will there be a regularly scheduled
//! restore test?" answered by the schedule the backups already run on.
//!
//! After the backups, retention, gc and the copy, a run tests the latest restore point of
//! the vms that are **due** — never tested, or whose last test (of any of their restore
//! points, from the records in the repository) is older than `every` — least recently
//! tested first (never tested first, in the job's order), at most `per_run` of them: the
//! "least recently confirmed" idea of sampled verification, applied to restores. With
//! the defaults (`every = "7d"`, `per_run = 1`) a nightly job of seven vms tests each of
//! them once a week, round robin.
//!
//! The test itself is the front end's ([`RestoreTester`]: the binary walks every
//! filesystem with blockproof-fs, as `blockproof restore-test` does, or with
//! `[restore_test.boot]` boots the restore point in an isolated VM, as `restore-test
//! --boot` does); the run stores its
//! record in the repository like that command, so `status` and `snapshots` show it, and a
//! test that fails — or cannot run — fails the run.

use std::time::{Duration, SystemTime};

use blockproof_core::restore_test::{record, restore_tests, RestoreTest};
use blockproof_format::Id;
use blockproof_repo::Repository;
use serde::Serialize;

use crate::FleetError;

/// `[restore_test]` of a job.
#[derive(Clone, Debug, PartialEq)]
pub struct RestoreTestPolicy {
    /// A vm whose last test is older than this is due.
    pub every: Duration,
    /// At most this many vms tested per run.
    pub per_run: usize,
    /// The share of regular files read whole (0 to 1).
    pub sample: f64,
    /// Paths that must exist in one of the restore point's filesystems.
    pub expect: Vec<String>,
    /// `[restore_test.boot]`: boot the restore point instead of walking its filesystems.
    pub boot: Option<BootTestPolicy>,
}

/// `[restore_test.boot]`: the check of `restore-test --boot` (no script: a job file
/// starts no program of its own but its hooks).
#[derive(Clone, Debug, PartialEq)]
pub struct BootTestPolicy {
    pub console_marker: Option<String>,
    pub fail_marker: Option<String>,
    pub guest_agent: bool,
    pub timeout: Duration,
    pub memory_mib: u64,
    pub cpus: u32,
    pub uefi: bool,
    /// A direct kernel boot: the kernel, initrd and command line, paths in the backup.
    pub kernel: Option<String>,
    pub initrd: Option<String>,
    pub append: Option<String>,
}

/// Runs one restore test of a restore point (the front end's: it reads filesystems).
pub trait RestoreTester: Sync {
    fn test(&self, snapshot: Id, policy: &RestoreTestPolicy) -> Result<RestoreTest, String>;
}

/// One restore test of a run, as the run report has it.
#[derive(Clone, Debug, Serialize)]
pub struct RestoreTestRun {
    pub vm: String,
    /// The tested restore point (hex).
    pub snapshot: String,
    /// Why it was due: `never tested`, or how long ago the last test was.
    pub due: String,
    pub passed: bool,
    /// Why it failed, or why it could not run.
    pub reason: Option<String>,
    pub duration_seconds: f64,
}

/// The vms of `names` due for a test at `now`, with their latest restore point and why,
/// in the order they are tested; at most `policy.per_run`.
pub fn due(
    repo: &Repository,
    policy: &RestoreTestPolicy,
    names: &[String],
    now: SystemTime,
) -> Result<Vec<(String, Id, String)>, FleetError> {
    let (tests, _) = restore_tests(repo)?;
    let scan = repo.scan_snapshots()?;
    let mut due = Vec::new();
    for (order, name) in names.iter().enumerate() {
        // The scan lists restore points oldest first.
        let Some(latest) = scan.snapshots.iter().rev().find(|s| &s.snapshot.vm == name) else { continue };
        let last = tests.iter().filter(|t| &t.vm == name).filter_map(|t| humantime::parse_rfc3339(&t.time).ok()).max();
        match last {
            None => due.push((None, order, name.clone(), latest.id, "never tested".to_string())),
            Some(t) => {
                let ago = now.duration_since(t).unwrap_or_default();
                if ago >= policy.every {
                    let when = humantime::format_duration(Duration::from_secs(ago.as_secs()));
                    due.push((Some(t), order, name.clone(), latest.id, format!("last tested {when} ago")));
                }
            }
        }
    }
    // Never tested first (in the job's order), then the longest ago.
    due.sort_by(|a, b| a.0.cmp(&b.0).then(a.1.cmp(&b.1)));
    Ok(due.into_iter().take(policy.per_run).map(|(_, _, vm, id, why)| (vm, id, why)).collect())
}

/// Tests the due vms one after the other and records each outcome; a failed test, one
/// that could not run, and a record that could not be stored are in `errors`.
pub fn run(
    repo: &Repository,
    policy: &RestoreTestPolicy,
    names: &[String],
    tester: &dyn RestoreTester,
    errors: &mut Vec<String>,
) -> Vec<RestoreTestRun> {
    let due = match due(repo, policy, names, SystemTime::now()) {
        Ok(d) => d,
        Err(e) => {
            errors.push(format!("choosing the restore tests: {e}"));
            return Vec::new();
        }
    };
    let mut runs = Vec::new();
    for (vm, snapshot, why) in due {
        let started = std::time::Instant::now();
        let (passed, reason) = match tester.test(snapshot, policy) {
            Ok(t) => {
                if let Err(e) = record(repo, &t) {
                    errors.push(format!("restore test of vm {vm}: the record could not be stored: {e}"));
                }
                (t.passed, t.reason)
            }
            Err(e) => (false, Some(format!("the test could not run: {e}"))),
        };
        if !passed {
            errors.push(format!(
                "restore test of vm {vm} (snapshot {}) failed: {}",
                snapshot.short(),
                reason.as_deref().unwrap_or("?")
            ));
        }
        runs.push(RestoreTestRun {
            vm,
            snapshot: snapshot.to_hex(),
            due: why,
            passed,
            reason,
            duration_seconds: started.elapsed().as_secs_f64(),
        });
    }
    runs
}
