//! # blockproof-core
//!
//! The operations of blockproof, each shaped the same way: an `*Options` struct in, a
//! `*Report` struct out, progress through the [`Progress`] trait. The CLI is a thin
//! layer over these functions; so will be any other front end.
//!
//! | operation        | options            | report            |
//! |------------------|--------------------|-------------------|
//! | [`backup()`]     | [`BackupOptions`]  | [`BackupReport`]  |
//! | [`restore()`]    | [`RestoreOptions`] | [`RestoreReport`] |
//! | [`check()`]      | [`CheckOptions`]   | [`CheckReport`]   |
//! | [`repair()`]     | [`RepairOptions`]  | [`RepairReport`]  |
//!
//! ## Invariants
//!
//! - Backup reads sources only through [`blockproof_source::BlockSource`] (read-only).
//! - Backup makes a snapshot visible only after every pack and index file it references
//!   is durable; an interrupted backup leaves only unreferenced packs.
//! - Backup and copy never reuse a blob whose copies all lie in packs that are missing,
//!   of the wrong size or found damaged, nor an index page that does not read back: they
//!   store it again from the source (`availability`, `pipeline::Dedup`). `repair`
//!   rebuilds the index from the packs and never removes a readable blob before a copy of
//!   it is durable and indexed.
//! - Restore writes a regular file through a temporary file renamed into place on
//!   success: a failed restore leaves no file that looks complete. Every chunk is
//!   authenticated and re-hashed against its id before it is written.
//! - Check reports every problem it finds (it does not stop at the first).
//! - A snapshot file is removed only after a forget record names it, and a vm's head
//!   names only committed snapshots, so check tells a forgotten snapshot from one deleted
//!   outside blockproof; an incremental whose changes are on the caller's word reads in
//!   full unless its parent is the newest restore point of the disk recorded
//!   (`integrity.rs`; docs/FORMAT.md §20a).

pub mod audit;
mod availability;
pub mod backup;
pub mod budget;
pub mod check;
mod confirm;
pub mod confirmation_map;
pub mod copy;
pub mod diff;
pub mod events;
pub mod forget;
pub mod gc;
pub mod image;
mod integrity;
mod live_blobs;
mod page_summaries;
mod pipeline;
mod plan;
pub mod recompress;
pub mod repair;
pub mod restore;
pub mod restore_test;
mod state_doc;
pub mod stats;
pub mod status;
pub mod verification;
pub mod verify;

#[cfg(test)]
mod test_repo;

pub use audit::{verify, DiskVerifyReport, VerifyOptions, VerifyReport};
pub use backup::{
    backup, default_verify_budget, BackupOptions, BackupReport, DiskInput, DiskReport, OnMismatch, OpenFn,
};
pub use blockproof_format::manifest::Coverage;
pub use budget::Budget;
pub use check::{check, CheckOptions, CheckReport, HeadReport};
pub use confirmation_map::{ConfirmationCell, ConfirmationMap, ConfirmationReader};
pub use copy::{copy, CopyOptions, CopyReport};
pub use diff::{diff, DiffReport, DiskDiff};
pub use forget::{forget, protected, set_protected, ForgetOptions, ForgetReport, KeepPolicy, RetentionScope};
pub use gc::{gc, GcOptions, GcReport};
pub use image::DiskImage;
pub use recompress::{RecompressOptions, RECOMPRESS_LEVEL};
pub use repair::{repair, LostData, RepairOptions, RepairReport};
pub use restore::{restore, RestoreFormat, RestoreOptions, RestoreReport};
pub use stats::{stats, RepoStats};
pub use status::{stale_vms, status, DiskStatus, LastGood, StaleVm, StatusReport, VmStatus};

use std::path::PathBuf;

use blockproof_repo::RepoError;
use blockproof_source::SourceError;

/// Errors of the operations.
#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    #[error(transparent)]
    Repo(#[from] RepoError),
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    /// The request itself is wrong (bad names, unknown disk, existing target).
    #[error("{0}")]
    Invalid(String),
    /// Stored data failed verification during a restore; names the disk range.
    #[error("disk {disk}: bytes {offset}..{end} cannot be restored: {cause}")]
    DamagedRange { disk: String, offset: u64, end: u64, cause: RepoError },
    /// The root page of a disk's index (its list of chunks) cannot be read: no byte of the
    /// disk can be located.
    #[error("disk {disk}: the root of its index cannot be read, so the whole disk cannot be restored: {cause}")]
    DamagedIndex { disk: String, cause: RepoError },
    #[error("the pack writer stopped unexpectedly")]
    WriterGone,
    /// The operation refused to start because going on would be unsafe (the message
    /// says why and what to do).
    #[error("{0}")]
    Refused(String),
    /// The operation was cancelled: its lock was lost, or the caller asked.
    #[error("{0}")]
    Cancelled(String),
    /// An operation that changes the repository in steps failed part-way: what it had
    /// already done (and cannot undo) is said with the cause.
    #[error("{operation} stopped after it {done}: {source}")]
    Interrupted { operation: &'static str, done: String, source: Box<CoreError> },
    /// A fault of blockproof itself (a worker thread panicked); never the user's.
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<blockproof_work::WorkError> for CoreError {
    fn from(e: blockproof_work::WorkError) -> Self {
        match e {
            blockproof_work::WorkError::Cancelled(why) => CoreError::Cancelled(why),
            blockproof_work::WorkError::Panicked(what) => CoreError::Internal(what),
        }
    }
}

impl From<blockproof_store::StoreError> for CoreError {
    fn from(e: blockproof_store::StoreError) -> Self {
        CoreError::Repo(e.into())
    }
}

impl CoreError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        CoreError::Io { path: path.into(), source }
    }

    /// Whether the error is the caller's (exit code 2 in the CLI: a bad request, an
    /// unknown snapshot or disk) rather than the repository's or the system's.
    pub fn is_usage(&self) -> bool {
        matches!(self, CoreError::Invalid(_) | CoreError::Source(SourceError::Invalid(_)))
            || matches!(self, CoreError::Repo(e) if e.is_usage())
    }
}

/// Progress of a long operation, reported in bytes. Implementations must be cheap:
/// `advance` is called once per chunk.
pub trait Progress: Send + Sync {
    /// A new phase starts (`what` is a short label such as "backup sda").
    fn begin(&self, what: &str, total: u64);
    /// A new phase that counts items (snapshots, packs), not bytes.
    fn begin_count(&self, what: &str, total: u64) {
        self.begin(what, total);
    }
    fn advance(&self, amount: u64);
    fn end(&self);
    /// Something the user should know that does not stop the operation (a damaged file
    /// skipped, ...). Shown at once, so that it is seen even if the operation fails later.
    fn warn(&self, message: &str) {
        let _ = message;
    }
}

/// A [`Progress`] that shows nothing.
pub struct NoProgress;

impl Progress for NoProgress {
    fn begin(&self, _: &str, _: u64) {}
    fn advance(&self, _: u64) {}
    fn end(&self) {}
}

/// The error for an index page of `disk` that cannot be read, covering what it hides:
/// the whole disk for the root, else the byte range of the chunks under the page.
pub(crate) fn index_damage(
    disk: &blockproof_format::DiskEntry,
    span: blockproof_repo::PageSpan,
    cause: RepoError,
) -> CoreError {
    if span.root {
        return CoreError::DamagedIndex { disk: disk.id.clone(), cause };
    }
    let cs = u64::from(disk.chunk_size);
    CoreError::DamagedRange {
        disk: disk.id.clone(),
        offset: span.chunks.start.saturating_mul(cs).min(disk.size),
        end: span.chunks.end.saturating_mul(cs).min(disk.size),
        cause,
    }
}

/// This machine's host name, for snapshot manifests.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

/// The number of worker threads for chunk processing.
pub(crate) fn workers() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2).clamp(1, 16)
}

/// Threads that read blobs from `repo`: one per core, more on a remote store whose
/// requests spend their time waiting.
pub(crate) fn readers(repo: &blockproof_repo::Repository) -> usize {
    workers().max(repo.backend().parallelism()).min(16)
}
