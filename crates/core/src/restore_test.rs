//! Restore-test records: the outcome of `blockproof restore-test`, kept in the repository
//! beside the restore point it tested, so "can you prove the backups restore?" has an
//! answer that outlives the terminal it was printed on.
//!
//! A record is a sealed state document `state/restore-test-<snapshot id>-<16 hex>`
//! (FORMAT §20): which restore point, when, what was checked (per filesystem: how much
//! was walked and read, what failed; for a boot test: how the VM booted, what the check
//! was, how long the boot took and the end of its console), the verdict and how long it
//! took. Every test adds one; `forget` removes the records of the restore points it
//! removes, and gc those of points that are gone anyway (a `forget` interrupted between
//! the two), so a record never names a restore point that is gone for long. Read
//! strictly (FORMAT §15a): a damaged record is
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
    /// Booted in an isolated, throwaway VM until a check passed (blockproof-vm).
    Boot,
}

/// How a boot test's VM booted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BootMethod {
    /// The firmware (SeaBIOS) booted the first disk with the disk's own boot loader.
    Firmware,
    /// QEMU loaded a kernel (and initrd) read out of the restore point itself.
    Kernel,
}

/// What a boot test booted and checked.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootCheck {
    /// The text that had to appear on the serial console.
    pub console_marker: Option<String>,
    /// The text that failed the test when it appeared.
    pub fail_marker: Option<String>,
    /// The check script (exit 0 passes).
    pub script: Option<String>,
    /// The guest agent had to answer `guest-ping`. Written only when true, so that the
    /// records of other checks stay readable by builds that predate it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub guest_agent: bool,
    /// The VM booted by UEFI (OVMF), not SeaBIOS. Written only when true, as above.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub uefi: bool,
    pub boot: BootMethod,
    /// Where the kernel and initrd were read (`DISK/partN:PATH`), and the command line.
    pub kernel: Option<String>,
    pub initrd: Option<String>,
    pub append: Option<String>,
    pub memory_mib: u64,
    pub cpus: u32,
    /// The disks attached, in order (the first one boots).
    pub disks: Vec<String>,
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
    // A boot test's (kind `boot`); absent from filesystem tests and from records written
    // before boot tests existed, so those stay readable and filesystem records stay
    // readable by older builds.
    /// Seconds from QEMU's start to the console marker: a measured recovery time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_seconds: Option<f64>,
    /// The end of the VM's serial console (the last 4 KiB, invalid UTF-8 replaced).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub console_excerpt: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub check: Option<BootCheck>,
    /// `kvm` or `tcg`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accelerator: Option<String>,
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

/// Removes the records of the restore points `gone` (they are being forgotten), listing
/// the records once.
pub(crate) fn remove_for(repo: &Repository, gone: &std::collections::HashSet<Id>) -> Result<u64, CoreError> {
    if gone.is_empty() {
        return Ok(0);
    }
    let names = repo.backend().list(Kind::State)?;
    let doomed = names.into_iter().filter(|n| record_snapshot(n).is_some_and(|id| gone.contains(&id)));
    remove_names(repo, doomed)
}

/// Removes the records whose restore point is gone (a `forget` that crashed between the
/// two): gc's upkeep. Records are listed before the restore points, so a record written
/// meanwhile — always for a point that exists — is never taken for an orphan.
pub(crate) fn remove_orphans(repo: &Repository) -> Result<u64, CoreError> {
    let names = repo.backend().list(Kind::State)?;
    let records: Vec<(String, Id)> = names.into_iter().filter_map(|n| record_snapshot(&n).map(|id| (n, id))).collect();
    if records.is_empty() {
        return Ok(0);
    }
    let present: std::collections::HashSet<Id> =
        repo.backend().list(Kind::Snapshot)?.iter().filter_map(|n| n.parse().ok()).collect();
    remove_names(repo, records.into_iter().filter(|(_, id)| !present.contains(id)).map(|(n, _)| n))
}

/// The restore point a record's name names (`restore-test-<64 hex>-<16 hex>`).
fn record_snapshot(name: &str) -> Option<Id> {
    let rest = name.strip_prefix(PREFIX)?;
    let (id, _) = rest.split_once('-')?;
    (id.len() == 64).then(|| id.parse().ok()).flatten()
}

fn remove_names(repo: &Repository, names: impl Iterator<Item = String>) -> Result<u64, CoreError> {
    let mut removed = 0;
    for n in names {
        match repo.backend().remove(Kind::State, &n) {
            Ok(()) => removed += 1,
            Err(e) if e.is_not_found() => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(removed)
}

/// The newest record of each restore point in `tests` (oldest first).
pub fn latest_by_snapshot(tests: &[RestoreTest]) -> std::collections::HashMap<Id, &RestoreTest> {
    let mut m = std::collections::HashMap::new();
    for t in tests {
        m.insert(t.snapshot, t);
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILESYSTEM_RECORD: &str = r#"{"snapshot":"00000000000000000000000000000000000000000000000000000000000000aa",
        "vm":"web01","time":"2026-12-01T10:00:00.000000Z","kind":"filesystem","passed":true,"reason":null,
        "duration_seconds":1.5,"hostname":"h","program":"blockproof 0.1.0","sample":0.05,"filesystems":[],
        "unchecked_disks":[],"expected":[]}"#;

    #[test]
    fn a_record_written_before_boot_tests_reads_and_a_filesystem_record_writes_the_same_fields() {
        let t: RestoreTest = serde_json::from_str(FILESYSTEM_RECORD).unwrap();
        assert_eq!((t.kind, t.boot_seconds.is_none(), t.check.is_none()), (TestKind::Filesystem, true, true));
        let back: serde_json::Value = serde_json::to_value(&t).unwrap();
        let old: serde_json::Value = serde_json::from_str(FILESYSTEM_RECORD).unwrap();
        assert_eq!(back, old, "no new field in a filesystem record: older builds read it strictly");
    }

    #[test]
    fn a_boot_record_round_trips_and_unknown_fields_are_refused() {
        let mut t: RestoreTest = serde_json::from_str(FILESYSTEM_RECORD).unwrap();
        t.kind = TestKind::Boot;
        t.boot_seconds = Some(12.5);
        t.console_excerpt = Some("BLOCKPROOF-BOOT-OK\n".into());
        t.accelerator = Some("tcg".into());
        t.check = Some(BootCheck {
            console_marker: Some("BLOCKPROOF-BOOT-OK".into()),
            fail_marker: None,
            script: None,
            guest_agent: false,
            uefi: false,
            boot: BootMethod::Kernel,
            kernel: Some("vda/part1:/boot/vmlinuz".into()),
            initrd: None,
            append: Some("console=ttyS0".into()),
            memory_mib: 256,
            cpus: 1,
            disks: vec!["vda".into()],
        });
        let json = serde_json::to_value(&t).unwrap();
        assert_eq!((json["kind"].as_str(), json["check"]["boot"].as_str()), (Some("boot"), Some("kernel")));
        assert_eq!(serde_json::from_value::<RestoreTest>(json.clone()).unwrap(), t);
        assert!(json["check"].get("guest_agent").is_none(), "written only when asked for: older builds read strictly");
        assert!(json["check"].get("uefi").is_none(), "written only when asked for: older builds read strictly");
        let mut agent = t.clone();
        agent.check.as_mut().unwrap().guest_agent = true;
        let with_agent = serde_json::to_value(&agent).unwrap();
        assert_eq!(with_agent["check"]["guest_agent"], true);
        assert_eq!(serde_json::from_value::<RestoreTest>(with_agent).unwrap(), agent);
        let mut extra = json;
        extra["check"]["surprise"] = 1.into();
        assert!(serde_json::from_value::<RestoreTest>(extra).is_err(), "read strictly (FORMAT §15a)");
    }
}
