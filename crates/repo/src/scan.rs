//! Tolerant reading of a repository's directories: stray files and damaged files.
//!
//! A **stray file** is one whose name is not an object name of its directory (64
//! lowercase hex digits): `index/.DS_Store`, `snapshots/README`, an editor's backup. It
//! is not a blockproof object and is ignored, with one warning listing every such file.
//! A **damaged file** has an object name but cannot be read, or fails its name check,
//! authentication or decoding.
//!
//! Operations that only read — listing, status, restore, files, serving, backup (which
//! then reads every disk in full) — skip both and warn ([`Repository::scan_snapshots`],
//! [`BlobIndex::scan`](crate::BlobIndex::scan)). Operations that delete must see every
//! object to be safe: garbage collection and forget by policy use the strict loaders
//! ([`Repository::snapshots`], [`BlobIndex::load`](crate::BlobIndex::load)), for which a
//! stray or damaged file is an error naming it.

use blockproof_format::Id;
use blockproof_store::Kind;

use crate::repository::SnapshotInfo;
use crate::{RepoError, Repository};

/// Files a tolerant reader left out.
#[derive(Clone, Debug, Default)]
pub struct Skipped {
    /// Stray files, as `DIR/NAME` (`snapshots/.foo`).
    pub stray: Vec<String>,
    /// Damaged files: the error naming each (`snapshot 46d8…: content hash … does not
    /// match its name …`).
    pub damaged: Vec<String>,
    /// What the skipping means for the request (`VM:latest` may not be the newest).
    pub notes: Vec<String>,
}

impl Skipped {
    pub fn is_empty(&self) -> bool {
        self.stray.is_empty() && self.damaged.is_empty()
    }

    pub fn extend(&mut self, other: Skipped) {
        self.stray.extend(other.stray);
        self.damaged.extend(other.damaged);
        self.notes.extend(other.notes);
    }

    /// What to tell the user: one line listing every stray file, one line per damaged file,
    /// then the notes.
    pub fn warnings(&self) -> Vec<String> {
        let mut out = Vec::new();
        if !self.stray.is_empty() {
            let mut stray = self.stray.clone();
            stray.sort();
            out.push(format!(
                "ignoring {} stray file(s) that are not blockproof objects: {}",
                stray.len(),
                stray.join(", ")
            ));
        }
        out.extend(self.damaged.iter().map(|d| format!("skipping damaged {d}")));
        out.extend(self.notes.iter().cloned());
        out
    }
}

/// The readable snapshots of a repository, and what was skipped.
#[derive(Clone, Debug, Default)]
pub struct SnapshotScan {
    /// Oldest first (by time, then id).
    pub snapshots: Vec<SnapshotInfo>,
    pub skipped: Skipped,
}

/// The error for a stray file where an object of `kind` was expected (strict loaders).
pub(crate) fn stray_error(kind: Kind, name: &str) -> RepoError {
    RepoError::corrupt(
        format!("{}/{name}", kind.dir()),
        format!("not a blockproof {kind} file (its name is not an object id); move it out of the repository"),
    )
}

impl Repository {
    /// Every snapshot, oldest first; `strict`: a stray or damaged snapshot file is an
    /// error, else it is skipped and listed. A snapshot removed (by `forget`) between
    /// listing and reading is skipped either way.
    pub(crate) fn read_snapshots(&self, strict: bool) -> Result<SnapshotScan, RepoError> {
        let mut scan = SnapshotScan::default();
        for name in self.backend().list(Kind::Snapshot)? {
            if !Id::is_file_name(&name) {
                if strict {
                    return Err(stray_error(Kind::Snapshot, &name));
                }
                scan.skipped.stray.push(format!("{}/{name}", Kind::Snapshot.dir()));
                continue;
            }
            match self.load_snapshot(&name) {
                Ok(s) => scan.snapshots.push(s),
                Err(RepoError::Store(e)) if e.is_not_found() => {}
                Err(e) if !strict && e.is_damage() => scan.skipped.damaged.push(e.to_string()),
                Err(e) => return Err(e),
            }
        }
        scan.snapshots.sort_by(|a, b| a.snapshot.time.cmp(&b.snapshot.time).then(a.id.cmp(&b.id)));
        scan.skipped.stray.sort();
        Ok(scan)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{BlobIndex, InitOptions};
    use blockproof_format::{IndexFile, KdfParams, Snapshot, SnapshotStatus};
    use blockproof_store::LocalBackend;

    fn snapshot(vm: &str, time: &str) -> Snapshot {
        Snapshot {
            vm: vm.into(),
            time: time.into(),
            hostname: "h".into(),
            tags: vec![],
            status: SnapshotStatus::Ok,
            disks: vec![],
            program: "test".into(),
            copied_from: None,
            machine: None,
        }
    }

    #[test]
    fn readers_skip_stray_and_damaged_files_and_strict_loaders_refuse_them() {
        let dir = tempfile::tempdir().unwrap();
        let opts = InitOptions { kdf: KdfParams::MIN, ..InitOptions::default() };
        let repo = Repository::init(Box::new(LocalBackend::create(dir.path()).unwrap()), b"pw", &opts).unwrap();
        let old = repo.save_snapshot(&snapshot("vm", "2026-11-22T10:00:00Z")).unwrap();
        let new = repo.save_snapshot(&snapshot("vm", "2026-11-22T11:00:00Z")).unwrap();
        let index = repo.write_index_file(&IndexFile { packs: vec![] }).unwrap();
        assert!(repo.scan_snapshots().unwrap().skipped.is_empty());
        assert_eq!(repo.snapshots().unwrap().len(), 2);

        // Stray files: skipped with one warning by readers, errors for strict loaders.
        let b = repo.backend();
        b.write(Kind::Snapshot, "README", b"x").unwrap();
        b.write(Kind::Index, "notes-1", b"x").unwrap();
        let scan = repo.scan_snapshots().unwrap();
        assert_eq!((scan.snapshots.len(), scan.skipped.stray.clone()), (2, vec!["snapshots/README".to_string()]));
        let (_, skipped) = BlobIndex::scan(&repo, &Default::default()).unwrap();
        assert_eq!(skipped.stray, vec!["index/notes-1".to_string()]);
        let err = repo.snapshots().unwrap_err().to_string();
        assert!(err.contains("snapshots/README") && err.contains("not a blockproof snapshot file"), "{err}");
        assert!(BlobIndex::load(&repo).err().unwrap().to_string().contains("index/notes-1"));
        assert!(repo.resolve_snapshot("vm:latest").is_err(), "strict");
        assert_eq!(repo.resolve_snapshot_for_reading("vm:latest").unwrap().0.id, new);
        // A stray name never matches a prefix.
        b.write(Kind::Snapshot, &format!("{}x", &old.to_hex()[..8]), b"x").unwrap();
        assert_eq!(repo.resolve_snapshot(&old.to_hex()[..8]).unwrap().id, old);
        b.remove(Kind::Snapshot, "README").unwrap();
        b.remove(Kind::Snapshot, &format!("{}x", &old.to_hex()[..8])).unwrap();
        b.remove(Kind::Index, "notes-1").unwrap();

        // Damaged files: skipped and named by readers (the latest readable snapshot is
        // then the older one), errors for strict loaders.
        b.write(Kind::Snapshot, &new.to_hex(), b"damaged").unwrap();
        b.write(Kind::Index, &index.to_hex(), b"damaged").unwrap();
        let scan = repo.scan_snapshots().unwrap();
        assert_eq!(scan.snapshots.iter().map(|s| s.id).collect::<Vec<_>>(), vec![old]);
        assert_eq!(scan.skipped.damaged.len(), 1);
        let warnings = scan.skipped.warnings();
        assert!(warnings[0].starts_with("skipping damaged snapshot ") && warnings[0].contains(&new.to_hex()));
        let (info, skipped) = repo.resolve_snapshot_for_reading("vm:latest").unwrap();
        assert_eq!((info.id, skipped.damaged.len()), (old, 1));
        let last = skipped.warnings().pop().unwrap();
        assert!(last.contains("vm:latest") && last.contains(&old.to_hex()[..8]), "{last}");
        let (_, skipped) = BlobIndex::scan(&repo, &Default::default()).unwrap();
        assert!(skipped.damaged[0].contains(&index.to_hex()), "{skipped:?}");
        assert!(repo.snapshots().unwrap_err().is_damage());
        assert!(BlobIndex::load(&repo).err().unwrap().is_damage());
        // A vm whose only snapshots are damaged: not a usage error.
        b.write(Kind::Snapshot, &old.to_hex(), b"damaged").unwrap();
        let err = repo.resolve_snapshot_for_reading("vm:latest").unwrap_err();
        assert!(!err.is_usage() && err.to_string().contains("2 damaged"), "{err}");
    }
}
