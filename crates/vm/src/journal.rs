//! The journal of an instant recovery: `recovery.json` in the recovery's directory, what
//! `recover --resume` needs to carry on after anything stopped the copy (the command
//! killed, the host restarted, QEMU gone), and the lock that keeps two commands off one
//! directory.
//!
//! The journal is written whole to a temporary file, synced and renamed over the old one
//! (then the directory is synced): a crash leaves the old journal or the new one, never
//! half of one. It holds no secret: the repository password and the backup's data stay
//! with the repository.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::{Accelerator, Firmware, VmError};

/// The journal's file name in the recovery directory.
pub const JOURNAL_FILE: &str = "recovery.json";
/// The lock file's name: held (`flock`) by the one command working on the directory.
pub(crate) const LOCK_FILE: &str = "recovery.lock";
/// The journal's version; a journal of another version is refused with a message.
pub const JOURNAL_VERSION: u32 = 1;

/// Everything about one recovery that outlives the command that started it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Journal {
    pub version: u32,
    /// The id of the repository the restore point is in (hex): `--resume` refuses another.
    pub repository: String,
    /// The restore point (snapshot id, hex).
    pub snapshot: String,
    pub vm: String,
    /// When the recovery started (RFC 3339, UTC).
    pub created: String,
    /// The VM's disks in its order (the first one boots).
    pub disks: Vec<JournalDisk>,
    pub machine: Machine,
    /// The QEMU process last started for the VM.
    pub qemu_pid: Option<u32>,
    pub state: RecoveryState,
}

/// One disk of the recovered VM.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct JournalDisk {
    /// The disk's id in the restore point (its NBD export's name).
    pub id: String,
    pub size: u64,
    /// The local qcow2 image, a file name in the recovery directory.
    pub image: String,
    /// Whether the copy into the image is complete (the image has no backing file).
    pub copied: bool,
}

/// The VM's shape, the same whenever QEMU is started again.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Machine {
    pub memory_mib: u64,
    pub cpus: u32,
    pub accelerator: Accelerator,
    /// BIOS or UEFI (the VM's variable store is `uefi-vars.fd` in the directory).
    #[serde(default)]
    pub firmware: Firmware,
    /// Whether the VM boots the `kernel` (and `initrd`) file of the recovery directory
    /// directly, with `append` as its command line; otherwise the firmware boots disk 0.
    pub kernel: bool,
    pub initrd: bool,
    pub append: Option<String>,
    /// Further QEMU arguments, as given (a network device, for instance).
    pub extra_args: Vec<String>,
}

/// Where a recovery stands.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum RecoveryState {
    /// The VM runs (or ran) on overlays over the backup; the copy is not finished.
    Copying,
    /// Every disk is a standalone local image; the backup is no longer used.
    Complete,
}

impl Journal {
    pub(crate) fn load(dir: &Path) -> Result<Journal, VmError> {
        let path = dir.join(JOURNAL_FILE);
        let bytes = fs::read(&path).map_err(|source| match source.kind() {
            std::io::ErrorKind::NotFound => VmError::NoRecovery(dir.to_path_buf()),
            _ => VmError::Io { what: format!("cannot read {}", path.display()), source },
        })?;
        let version = serde_json::from_slice::<serde_json::Value>(&bytes).ok().and_then(|v| v["version"].as_u64());
        if version.is_some_and(|v| v != u64::from(JOURNAL_VERSION)) {
            return Err(VmError::Journal {
                path,
                why: format!("version {} (this blockproof reads {JOURNAL_VERSION})", version.unwrap_or(0)),
            });
        }
        let journal: Journal =
            serde_json::from_slice(&bytes).map_err(|e| VmError::Journal { path: path.clone(), why: e.to_string() })?;
        // Images are files of the directory: a journal naming one elsewhere is not ours.
        if let Some(d) = journal.disks.iter().find(|d| !is_file_name(&d.image)) {
            return Err(VmError::Journal { path, why: format!("image {:?} is not a file name", d.image) });
        }
        Ok(journal)
    }

    /// Replaces the journal atomically and durably.
    pub(crate) fn save(&self, dir: &Path) -> Result<(), VmError> {
        let path = dir.join(JOURNAL_FILE);
        let tmp = dir.join(format!("{JOURNAL_FILE}.tmp"));
        let what = || format!("cannot write {}", path.display());
        let mut bytes = serde_json::to_vec_pretty(self).expect("a journal serializes");
        bytes.push(b'\n');
        let mut f = File::create(&tmp).map_err(VmError::io(what()))?;
        f.write_all(&bytes).map_err(VmError::io(what()))?;
        f.sync_all().map_err(VmError::io(what()))?;
        fs::rename(&tmp, &path).map_err(VmError::io(what()))?;
        sync_dir(dir)
    }

    /// The path of disk `i`'s image.
    pub(crate) fn image(&self, dir: &Path, i: usize) -> PathBuf {
        dir.join(&self.disks[i].image)
    }
}

/// A plain file name: no directory part, not `.` or `..`.
fn is_file_name(name: &str) -> bool {
    !name.is_empty() && name != "." && name != ".." && !name.contains('/') && !name.contains('\0')
}

/// Syncs a directory, so that a rename or a new file in it survives a crash.
pub(crate) fn sync_dir(dir: &Path) -> Result<(), VmError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(VmError::io(format!("cannot sync {}", dir.display())))
}

/// The exclusive lock on a recovery directory, held while the value lives.
pub(crate) struct DirLock {
    _file: File,
}

impl DirLock {
    /// Takes the lock, or fails at once when another command holds it.
    pub(crate) fn take(dir: &Path) -> Result<DirLock, VmError> {
        let path = dir.join(LOCK_FILE);
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(VmError::io(format!("cannot open {}", path.display())))?;
        match file.try_lock() {
            Ok(()) => Ok(DirLock { _file: file }),
            Err(std::fs::TryLockError::WouldBlock) => Err(VmError::Busy(dir.to_path_buf())),
            Err(std::fs::TryLockError::Error(e)) => Err(VmError::io(format!("cannot lock {}", path.display()))(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn journal() -> Journal {
        Journal {
            version: JOURNAL_VERSION,
            repository: "ab".repeat(16),
            snapshot: "cd".repeat(16),
            vm: "web".into(),
            created: "2026-12-02T10:00:00Z".into(),
            disks: vec![JournalDisk { id: "vda".into(), size: 1 << 30, image: "vda.qcow2".into(), copied: false }],
            machine: Machine {
                memory_mib: 512,
                cpus: 2,
                accelerator: Accelerator::Tcg,
                firmware: Firmware::Uefi,
                kernel: false,
                initrd: false,
                append: None,
                extra_args: vec!["-nic".into(), "user".into()],
            },
            qemu_pid: Some(42),
            state: RecoveryState::Copying,
        }
    }

    #[test]
    fn a_journal_reads_back_as_written_and_names_its_fields() {
        let dir = tempfile::tempdir().unwrap();
        let j = journal();
        j.save(dir.path()).unwrap();
        assert_eq!(Journal::load(dir.path()).unwrap(), j);
        let text = fs::read_to_string(dir.path().join(JOURNAL_FILE)).unwrap();
        for field in [
            "\"version\": 1",
            "\"state\": \"copying\"",
            "\"accelerator\": \"tcg\"",
            "\"firmware\": \"uefi\"",
            "\"copied\": false",
        ] {
            assert!(text.contains(field), "{field} in {text}");
        }
        assert!(!dir.path().join(format!("{JOURNAL_FILE}.tmp")).exists());
    }

    #[test]
    fn a_journal_of_another_version_or_none_at_all_is_refused_with_a_message() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(Journal::load(dir.path()), Err(VmError::NoRecovery(_))));
        let mut v = serde_json::to_value(journal()).unwrap();
        v["version"] = 2.into();
        fs::write(dir.path().join(JOURNAL_FILE), v.to_string()).unwrap();
        let err = Journal::load(dir.path()).unwrap_err().to_string();
        assert!(err.contains("version 2"), "{err}");
        fs::write(dir.path().join(JOURNAL_FILE), "{").unwrap();
        assert!(matches!(Journal::load(dir.path()), Err(VmError::Journal { .. })));
        let mut outside = journal();
        outside.disks[0].image = "../elsewhere.qcow2".into();
        outside.save(dir.path()).unwrap();
        let err = Journal::load(dir.path()).unwrap_err().to_string();
        assert!(err.contains("not a file name"), "{err}");
    }

    #[test]
    fn a_second_lock_on_a_directory_fails_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let first = DirLock::take(dir.path()).unwrap();
        assert!(matches!(DirLock::take(dir.path()), Err(VmError::Busy(_))));
        drop(first);
        DirLock::take(dir.path()).unwrap();
    }
}
