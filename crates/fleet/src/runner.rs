//! A run of a job: every vm backed up (N at a time, on the codebase's one fan-out), then
//! retention per vm, garbage collection when due, the copy to the second repository, and
//! the repository's state read once for the reports.
//!
//! A vm's failure — a pre hook that fails, a source that cannot be opened or disappears
//! mid-read, even a panic — is that vm's outcome, never the others': each vm is one item
//! of the fan-out and its worker always returns a [`VmRun`].

use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use blockproof_core::{BackupOptions, CopyOptions, ForgetOptions, GcOptions, Progress};
use blockproof_format::SnapshotStatus;
use blockproof_repo::Repository;
use blockproof_work::{fan_out, guarded, Cancel, FanOut};

use crate::job::{Job, VmPlan};
use crate::report::{
    Consistency, CopyRun, DiskAssessment, ForgetRun, GcRun, HistoryEntry, Phases, RunReport, RunStatus, VmRun,
    REPORT_VERSION,
};
use crate::FleetError;

/// The repositories of a run, opened by the caller.
pub struct Repositories<'a> {
    pub main: &'a Repository,
    /// The second repository (`[copy]`), when the job has one.
    pub copy: Option<&'a Repository>,
    /// Runs the restore tests of `[restore_test]` (required when the job has one).
    pub tester: Option<&'a dyn crate::RestoreTester>,
}

/// What a front end sees of a run while it goes on.
pub trait Monitor: Sync {
    /// Progress of one vm's backup (called from the vm's worker thread).
    fn vm_progress(&self, vm: &str) -> Box<dyn Progress + '_>;
    /// A vm is done.
    fn vm_done(&self, run: &VmRun);
    /// A phase after the backups starts ("retention", "gc", "copy", "inventory").
    fn phase(&self, what: &str);
}

fn now() -> String {
    humantime::format_rfc3339_seconds(SystemTime::now()).to_string()
}

/// Runs `job` against `repos`; `history` is the earlier runs' reports (for "gc when due").
/// Never fails as a whole: every failure is in the report, which gives the exit code.
pub fn run(job: &Job, repos: &Repositories<'_>, history: &[HistoryEntry], monitor: &dyn Monitor) -> RunReport {
    let started = now();
    let t0 = Instant::now();
    let mut phases = Phases::default();
    let mut errors = Vec::new();

    let slots: Mutex<Vec<Option<VmRun>>> = Mutex::new(vec![None; job.vms.len()]);
    let shape = FanOut { workers: job.parallel.min(job.vms.len()).max(1), queue: 1 };
    let fanned: Result<(), FleetError> = fan_out(
        &Cancel::new(),
        shape,
        |emit| {
            for i in 0..job.vms.len() {
                if !emit.send(i) {
                    break;
                }
            }
            Ok(())
        },
        || |i: usize| Ok((i, run_vm(job, &job.vms[i], repos.main, monitor))),
        |(i, vm): (usize, VmRun)| {
            monitor.vm_done(&vm);
            slots.lock().unwrap_or_else(|p| p.into_inner())[i] = Some(vm);
            Ok(())
        },
    );
    if let Err(e) = fanned {
        errors.push(format!("backups stopped: {e}"));
    }
    let vms: Vec<VmRun> = slots
        .into_inner()
        .unwrap_or_else(|p| p.into_inner())
        .into_iter()
        .zip(&job.vms)
        .map(|(slot, plan)| slot.unwrap_or_else(|| not_run(plan, "the run stopped before this vm")))
        .collect();
    phases.backups_seconds = t0.elapsed().as_secs_f64();

    // Retention, per vm with a policy.
    let t = Instant::now();
    let mut retention = Vec::new();
    if job.vms.iter().any(|v| v.retention.is_some()) {
        monitor.phase("retention");
    }
    for vm in job.vms.iter().filter(|v| v.retention.is_some()) {
        let opts = ForgetOptions {
            snapshots: Vec::new(),
            policy: vm.retention.clone().expect("filtered"),
            vm: Some(vm.name.clone()),
            scope: blockproof_core::RetentionScope::Disk,
            dry_run: false,
        };
        let r = match blockproof_core::forget(repos.main, &opts) {
            Ok(r) => ForgetRun {
                vm: vm.name.clone(),
                kept: r.kept.len() as u64,
                removed: r.removed.len() as u64,
                error: None,
            },
            Err(e) => {
                errors.push(format!("retention of vm {}: {e}", vm.name));
                ForgetRun { vm: vm.name.clone(), kept: 0, removed: 0, error: Some(e.to_string()) }
            }
        };
        retention.push(r);
    }
    phases.retention_seconds = t.elapsed().as_secs_f64();

    // Garbage collection when due.
    let t = Instant::now();
    let gc = {
        let (due, reason) = gc_due(job, history, SystemTime::now());
        if due {
            monitor.phase("gc");
            let opts = GcOptions { repack_threshold: job.gc.repack_threshold, dry_run: false, recompress: None };
            match blockproof_core::gc(repos.main, &opts, &blockproof_core::NoProgress) {
                Ok(r) => GcRun { ran: true, reason, report: Some(r), error: None },
                Err(e) => {
                    errors.push(format!("gc: {e}"));
                    GcRun { ran: true, reason, report: None, error: Some(e.to_string()) }
                }
            }
        } else {
            GcRun { ran: false, reason, report: None, error: None }
        }
    };
    phases.gc_seconds = t.elapsed().as_secs_f64();

    // The copy: every restore point of the job's vms the target lacks.
    let t = Instant::now();
    let copy = match (&job.copy, repos.copy) {
        (Some(spec), Some(target)) => {
            monitor.phase("copy");
            let r = copy_vms(job, repos.main, target);
            if let Err(e) = &r {
                errors.push(format!("copy to {}: {e}", spec.location));
            }
            let (report, error) = match r {
                Ok(r) => (Some(r), None),
                Err(e) => (None, Some(e.to_string())),
            };
            Some(CopyRun { to: spec.location.clone(), report, error })
        }
        _ => None,
    };
    phases.copy_seconds = t.elapsed().as_secs_f64();

    // Restore tests of the vms that are due.
    let t = Instant::now();
    let restore_tests = match (&job.restore_test, repos.tester) {
        (Some(policy), Some(tester)) => {
            monitor.phase("restore tests");
            let names: Vec<String> = job.vms.iter().map(|v| v.name.clone()).collect();
            crate::restore_tests::run(repos.main, policy, &names, tester, &mut errors)
        }
        (Some(_), None) => {
            errors.push("the job has [restore_test], but this front end cannot run restore tests".into());
            Vec::new()
        }
        (None, _) => Vec::new(),
    };
    phases.restore_tests_seconds = t.elapsed().as_secs_f64();

    let t = Instant::now();
    monitor.phase("inventory");
    let names: Vec<String> = job.vms.iter().map(|v| v.name.clone()).collect();
    let repository =
        match crate::inventory::inventory(repos.main, &job.repository.location, &names, job.reports.heatmap_cells) {
            Ok(i) => Some(i),
            Err(e) => {
                errors.push(format!("reading the repository's state: {e}"));
                None
            }
        };
    phases.inventory_seconds = t.elapsed().as_secs_f64();

    let worst = vms.iter().map(|v| v.status).max().unwrap_or(RunStatus::Ok);
    let status = if errors.is_empty() { worst } else { RunStatus::Failed };
    RunReport {
        version: REPORT_VERSION,
        job: job.name.clone(),
        job_file: job.path.display().to_string(),
        host: blockproof_core::hostname(),
        started,
        finished: now(),
        duration_seconds: t0.elapsed().as_secs_f64(),
        status,
        vms,
        retention,
        gc: Some(gc),
        copy,
        restore_tests,
        repository,
        phases,
        errors,
    }
}

/// Whether gc is due: never run according to the history, or its interval (less an hour,
/// for the drift of timers) has passed since.
pub fn gc_due(job: &Job, history: &[HistoryEntry], now: SystemTime) -> (bool, String) {
    let Some(every) = job.gc.every else {
        return (false, "gc is off for this job (every = \"never\")".into());
    };
    let last = history.iter().rev().find(|h| h.gc.as_ref().is_some_and(|g| g.ran)).and_then(|h| h.time());
    match last {
        None => (true, "no earlier run of this job ran gc".into()),
        Some(t) => {
            let since = now.duration_since(t).unwrap_or_default();
            let slack = Duration::from_secs(3600).min(every / 2);
            let when = humantime::format_duration(Duration::from_secs(since.as_secs())).to_string();
            if since + slack >= every {
                (true, format!("the last gc was {when} ago"))
            } else {
                (false, format!("the last gc was {when} ago; it runs every {}", humantime::format_duration(every)))
            }
        }
    }
}

fn copy_vms(job: &Job, main: &Repository, target: &Repository) -> Result<blockproof_core::CopyReport, FleetError> {
    let scan = main.scan_snapshots()?;
    let ids: Vec<String> = scan
        .snapshots
        .iter()
        .filter(|s| job.vms.iter().any(|v| v.name == s.snapshot.vm))
        .map(|s| s.id.to_hex())
        .collect();
    if ids.is_empty() {
        // (No ids would mean "every snapshot", other jobs' vms too.)
        return Ok(blockproof_core::CopyReport::default());
    }
    Ok(blockproof_core::copy(main, target, &CopyOptions { snapshots: ids }, &blockproof_core::NoProgress)?)
}

fn not_run(plan: &VmPlan, why: &str) -> VmRun {
    VmRun {
        name: plan.name.clone(),
        group: plan.group.clone(),
        status: RunStatus::Failed,
        error: Some(why.to_string()),
        started: now(),
        duration_seconds: 0.0,
        backup_seconds: 0.0,
        consistency: if plan.pre.is_some() { Consistency::PreHook } else { Consistency::Crash },
        verify: plan.verify.text.clone(),
        objective: plan.verify.objective.clone(),
        assessments: Vec::new(),
        pre: None,
        post: None,
        tags: plan.tags.clone(),
        backup: None,
    }
}

/// One vm: pre hook, backup, post hook. Always returns its outcome.
fn run_vm(job: &Job, plan: &VmPlan, repo: &Repository, monitor: &dyn Monitor) -> VmRun {
    let t0 = Instant::now();
    let mut run = not_run(plan, "");
    run.error = None;
    run.status = RunStatus::Ok;
    let env = |phase: &str| {
        vec![
            ("BLOCKPROOF_JOB", job.name.clone()),
            ("BLOCKPROOF_VM", plan.name.clone()),
            ("BLOCKPROOF_PHASE", phase.to_string()),
        ]
    };
    if let Some(h) = &plan.pre {
        let r = h.run(&env("pre"), None);
        if let Some(e) = &r.error {
            run.status = RunStatus::Failed;
            run.error = Some(format!("pre hook: {e}"));
        }
        run.pre = Some(r);
    }
    if run.status == RunStatus::Ok {
        let t = Instant::now();
        match backup(job, plan, repo, monitor) {
            Ok(report) => {
                if report.status == SnapshotStatus::Tainted {
                    run.status = RunStatus::Tainted;
                }
                if let Some(o) = &plan.verify.objective {
                    run.assessments = report
                        .disks
                        .iter()
                        .map(|d| DiskAssessment { disk: d.id.clone(), assessment: o.assess(&d.coverage) })
                        .collect();
                }
                run.backup = Some(report);
            }
            Err(e) => {
                run.status = RunStatus::Failed;
                run.error = Some(e);
            }
        }
        run.backup_seconds = t.elapsed().as_secs_f64();
    }
    if let Some(h) = &plan.post {
        let mut env = env("post");
        env.push(("BLOCKPROOF_STATUS", run.status.as_str().to_string()));
        if let Some(b) = &run.backup {
            env.push(("BLOCKPROOF_SNAPSHOT", b.snapshot.to_hex()));
        }
        let r = h.run(&env, None);
        if let Some(e) = &r.error {
            run.error.get_or_insert_with(|| format!("post hook: {e}"));
            run.status = RunStatus::Failed;
        }
        run.post = Some(r);
    }
    run.duration_seconds = t0.elapsed().as_secs_f64();
    run
}

fn backup(
    job: &Job,
    plan: &VmPlan,
    repo: &Repository,
    monitor: &dyn Monitor,
) -> Result<blockproof_core::BackupReport, String> {
    let disks = plan.disks.iter().map(|d| d.clone().input()).collect::<Result<Vec<_>, _>>()?;
    let mut tags = plan.tags.clone();
    tags.push(format!("job:{}", job.name));
    let opts = BackupOptions {
        vm: plan.name.clone(),
        disks,
        tags,
        hostname: blockproof_core::hostname(),
        full: false,
        verify: plan.verify.budget.clone(),
        on_mismatch: plan.on_mismatch,
        // Another run of the same vm (an overlapping job): this vm fails with the reason.
        lock_wait: std::time::Duration::ZERO,
        machine: None,
    };
    let progress = monitor.vm_progress(&plan.name);
    match guarded(&format!("the backup of vm {}", plan.name), || blockproof_core::backup(repo, opts, progress.as_ref()))
    {
        Ok(Ok(r)) => Ok(r),
        Ok(Err(e)) => Err(e.to_string()),
        Err(panic) => Err(panic.to_string()),
    }
}
