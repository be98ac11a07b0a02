//! # blockproof-fleet
//!
//! A fleet of VMs under one policy. A **job file** (TOML, [`Job`]; schema in
//! docs/JOBS.md) names the repository and how to open it, an optional second repository
//! to copy to, a schedule, the VMs — each with its disks (the `--disk` syntax) — and per
//! vm, group or `[defaults]` the verification budget or a **detection objective**
//! (`detect_within = "7d"`, turned into a budget with the schedule's runs a day: see
//! [`objective`]), retention, pre/post hooks with timeouts, and tags; where reports go
//! and whom to notify.
//!
//! A **run** ([`run()`]) backs up every vm, `parallel` at a time on the codebase's one
//! fan-out ([`blockproof_work::fan_out`]) — a vm's failure is its own outcome, never the
//! others' —, then applies retention per vm, runs gc when due, copies the job's restore
//! points to the second repository, tests the restore points of the vms due for a
//! restore test ([`restore_tests`]), and reads the repository's state once
//! ([`inventory`]). Its [`RunReport`] gives the exit code (0 all good, 3 any tainted, 1
//! any failed) and is **published** ([`publish`]) as a JSON document, a self-contained
//! HTML page with a coverage heatmap per disk, and a Prometheus textfile, all written
//! atomically and rendered from the same report, so they agree; then notifications (a
//! command, a webhook) get the JSON. Scheduling is systemd's or cron's
//! ([`schedule::Schedule::systemd_units`]): blockproof has no daemon.
//!
//! The repositories are opened by the caller (passwords, object-storage options and
//! terminals are the front end's business); this crate prints nothing.
//!
//! Running-VM sources (libvirt domains, QMP sockets) are not supported yet; the keys they
//! will use are reserved and refused with a message, so a job file never runs
//! half-understood.

pub mod disk;
pub mod hook;
pub mod html;
pub mod inventory;
pub mod job;
pub mod metrics;
pub mod notify;
pub mod objective;
pub mod plan;
pub mod publication;
pub mod report;
pub mod restore_tests;
pub mod runner;
pub mod schedule;

use std::path::PathBuf;

pub use job::{Job, PasswordSource, RepositorySpec, VmPlan};
pub use publication::{publish, Publication};
pub use report::{load_history, HistoryEntry, RunReport, RunStatus, VmRun};
pub use restore_tests::{BootTestPolicy, RestoreTestPolicy, RestoreTestRun, RestoreTester};
pub use runner::{run, Monitor, Repositories};

/// A job file that cannot be used: where, and why (exit code 2 in the CLI).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}{}: {message}", path.display(), line.map_or(String::new(), |l| format!(" line {l}")))]
pub struct JobError {
    pub path: PathBuf,
    /// The line of the offending key or value, when there is one.
    pub line: Option<usize>,
    pub message: String,
}

/// Errors of a run's parts (each is caught and reported; a run as a whole never fails).
#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    #[error(transparent)]
    Job(#[from] JobError),
    #[error(transparent)]
    Core(#[from] blockproof_core::CoreError),
    #[error(transparent)]
    Repo(#[from] blockproof_repo::RepoError),
    #[error(transparent)]
    Store(#[from] blockproof_store::StoreError),
    #[error(transparent)]
    Work(#[from] blockproof_work::WorkError),
}
