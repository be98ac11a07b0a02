//! Restore-test records: the outcome of `blockproof restore-test`, kept in the repository
//! beside the restore point it tested, so "can you prove the backups restore?" has an
//! answer that outlives the terminal it was printed on.
//!
//! A record is a sealed state document `state/restore-test-<snapshot id>-<16 hex>`
//! (FORMAT §20): which restore point, when, what was checked (per filesystem: how much
//! was walked and read, what failed), the verdict and how long it took. Every test adds
//! one; `forget` removes the records of the restore points it removes, so a record never
//! names a restore point that is gone. Read strictly (FORMAT §15a): a damaged record is
//! skipped with a warning, never trusted.

use blockproof_format::{Id, ObjectMagic};
use blockproof_repo::Repository;
use blockproof_store::Kind;
use serde::{Deserialize, Serialize};

use crate::CoreError;

const PREFIX: &str = "restore-test-";

/// What a restore test did.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TestKind {
    /// Every filesystem of every disk walked with blockproof's own readers, no boot.
    Filesystem,
}

/// One filesystem of a tested restore point.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TestedFilesystem {
    pub disk: String,
    /// The partition number (`blockproof partitions`), 0 for a filesystem on the whole disk.
    pub partition: u32,
    /// `ext4`, `fat32`, `ntfs`, ...
    pub filesystem: String,
    pub dirs: u64,
    pub files: u64,
    pub symlinks: u64,
    pub others: u64,
    /// Regular files read to the end, and their bytes.
    pub files_read: u64,
    pub bytes_read: u64,
    /// What failed (the first 100; `problem_count` counts all).
    pub problems: Vec<TestProblem>,
    pub problem_count: u64,
    pub passed: bool,
}

/// A path that could not be read, or a filesystem that could not be opened (path `/`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TestProblem {
    pub path: String,
    pub error: String,
}

/// A path the test was told must exist, and where it was found.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExpectedPath {
    pub path: String,
    /// `DISK/partN` of each filesystem that has it; empty: missing.
    pub found_in: Vec<String>,
}

/// One restore test (read strictly, FORMAT §15a).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestoreTest {
    /// The tested restore point.
    pub snapshot: Id,
    pub vm: String,
    /// When the test started (RFC 3339 UTC, microseconds: records sort by it).
    pub time: String,
    pub kind: TestKind,
    pub passed: bool,
    /// Why it failed, in one line (`None` when it passed).
    pub reason: Option<String>,
    pub duration_seconds: f64,
    pub hostname: String,
    pub program: String,
    /// The share of regular files whose contents were read (0 to 1).
    pub sample: f64,
    pub filesystems: Vec<TestedFilesystem>,
    /// Disks with no filesystem blockproof can read (nothing of them was checked).
    pub unchecked_disks: Vec<String>,
    pub expected: Vec<ExpectedPath>,
}

/// Stores a record (a new document; earlier tests' records stay).
pub fn record(repo: &Repository, test: &RestoreTest) -> Result<(), CoreError> {
    let name = format!("{PREFIX}{}-{}", test.snapshot.to_hex(), hex::encode(rand::random::<[u8; 8]>()));
    let bytes = serde_json::to_vec(test).expect("a restore test serializes");
    repo.write_doc(Kind::State, ObjectMagic::State, &name, &bytes)?;
    Ok(())
}

/// Every record, oldest first, and a warning for each that cannot be read.
pub fn restore_tests(repo: &Repository) -> Result<(Vec<RestoreTest>, Vec<String>), CoreError> {
    let (mut out, warnings): (Vec<RestoreTest>, _) = crate::state_doc::read_all(repo, PREFIX, "restore-test record")?;
    out.sort_by(|a, b| a.time.cmp(&b.time).then(a.snapshot.cmp(&b.snapshot)));
    Ok((out, warnings))
}

/// Removes the records of `snapshot` (it is being forgotten).
pub(crate) fn remove_for(repo: &Repository, snapshot: &Id) -> Result<(), CoreError> {
    let prefix = format!("{PREFIX}{}-", snapshot.to_hex());
    for n in repo.backend().list(Kind::State)?.into_iter().filter(|n| n.starts_with(&prefix)) {
        match repo.backend().remove(Kind::State, &n) {
            Ok(()) => {}
            Err(e) if e.is_not_found() => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// The newest record of each restore point in `tests` (oldest first).
pub fn latest_by_snapshot(tests: &[RestoreTest]) -> std::collections::HashMap<Id, &RestoreTest> {
    let mut m = std::collections::HashMap::new();
    for t in tests {
        m.insert(t.snapshot, t);
    }
    m
}
