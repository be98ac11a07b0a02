//! The trash: every file a request removes or replaces (but locks) is kept here, on the
//! server's own disk, for the grace period, and only time purges it. An admin lists it
//! and puts files back; nobody can empty it early through the server.
//!
//! Layout: `STATE/trash/<repository>/<id>.data` (the bytes) and `<id>.json` (kind, name,
//! when, by which token, why). The data is durable before the description is written,
//! and the description before the file leaves the repository, so an entry that is
//! listed is whole, and a crash in between leaves a stray `.data` file that the purge
//! removes.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use blockproof_store::Kind;
use serde::{Deserialize, Serialize};

use crate::route::kind_named;
use crate::ServerError;

/// What the trash knows of one file.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TrashEntry {
    pub id: String,
    pub kind: String,
    pub name: String,
    pub size: u64,
    /// When it went to the trash: seconds since the Unix epoch.
    pub trashed: u64,
    /// The token whose request removed or replaced it.
    pub token: String,
    /// `remove` or `replace`.
    pub why: String,
}

impl TrashEntry {
    pub fn kind(&self) -> Option<Kind> {
        kind_named(&self.kind)
    }
}

/// An id: `<seconds>-<sequence>-<kind>-<name>`, `[A-Za-z0-9_-]`, at most 200 characters.
pub fn valid_id(id: &str) -> bool {
    (3..=200).contains(&id.len())
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        && id.bytes().next().is_some_and(|b| b.is_ascii_digit())
}

/// The trash of one repository.
pub struct Trash {
    dir: PathBuf,
    sequence: AtomicU64,
}

fn now() -> u64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

impl Trash {
    pub fn new(state_dir: &Path, repo: &str) -> Trash {
        Trash { dir: state_dir.join("trash").join(repo), sequence: AtomicU64::new(0) }
    }

    /// Keeps `bytes`, the current content of `kind/name`, before the request destroys it.
    pub fn put(&self, kind: Kind, name: &str, bytes: &[u8], token: &str, why: &str) -> Result<TrashEntry, ServerError> {
        let trashed = now();
        let seq = self.sequence.fetch_add(1, Ordering::Relaxed);
        let id = format!("{trashed}-{}{seq}-{}-{name}", std::process::id(), kind.name());
        let entry = TrashEntry {
            id: id.clone(),
            kind: kind.name().into(),
            name: name.into(),
            size: bytes.len() as u64,
            trashed,
            token: token.into(),
            why: why.into(),
        };
        crate::files::write_atomic(&self.dir.join(format!("{id}.data")), bytes, 0o600)?;
        crate::files::write_atomic(
            &self.dir.join(format!("{id}.json")),
            &serde_json::to_vec(&entry).expect("entry serializes"),
            0o600,
        )?;
        Ok(entry)
    }

    /// Every entry, oldest first.
    pub fn list(&self) -> Result<Vec<TrashEntry>, ServerError> {
        let mut out = Vec::new();
        let read = match std::fs::read_dir(&self.dir) {
            Ok(r) => r,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(ServerError::io(&self.dir, e)),
        };
        for item in read {
            let path = item.map_err(|e| ServerError::io(&self.dir, e))?.path();
            if path.extension().and_then(|e| e.to_str()) != Some("json") {
                continue;
            }
            let bytes = match std::fs::read(&path) {
                Ok(b) => b,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(ServerError::io(&path, e)),
            };
            match serde_json::from_slice::<TrashEntry>(&bytes) {
                Ok(entry) if valid_id(&entry.id) => out.push(entry),
                _ => return Err(ServerError::Config(format!("{}: not a trash entry", path.display()))),
            }
        }
        out.sort_by(|a, b| (a.trashed, &a.id).cmp(&(b.trashed, &b.id)));
        Ok(out)
    }

    /// One entry and its bytes.
    pub fn get(&self, id: &str) -> Result<Option<(TrashEntry, Vec<u8>)>, ServerError> {
        if !valid_id(id) {
            return Ok(None);
        }
        let Some(entry) = self.list()?.into_iter().find(|e| e.id == id) else { return Ok(None) };
        let path = self.dir.join(format!("{id}.data"));
        let bytes = std::fs::read(&path).map_err(|e| ServerError::io(&path, e))?;
        Ok(Some((entry, bytes)))
    }

    /// Removes an entry (after it was put back, or when its grace period is over).
    pub fn discard(&self, id: &str) -> Result<(), ServerError> {
        for ext in ["json", "data"] {
            let path = self.dir.join(format!("{id}.{ext}"));
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(ServerError::io(&path, e)),
            }
        }
        Ok(())
    }

    /// Removes the entries trashed more than `grace` ago, and data files without a
    /// description (a crash while trashing) older than that; returns how many entries.
    pub fn purge(&self, grace: Duration) -> Result<usize, ServerError> {
        let limit = now().saturating_sub(grace.as_secs());
        let mut purged = 0;
        for entry in self.list()? {
            if entry.trashed < limit {
                self.discard(&entry.id)?;
                purged += 1;
            }
        }
        if let Ok(read) = std::fs::read_dir(&self.dir) {
            for item in read.flatten() {
                let path = item.path();
                let id = path.file_stem().and_then(|s| s.to_str()).unwrap_or("").to_string();
                let orphan = path.extension().and_then(|e| e.to_str()) == Some("data")
                    && !self.dir.join(format!("{id}.json")).exists()
                    && id.split('-').next().and_then(|s| s.parse::<u64>().ok()).is_some_and(|t| t < limit);
                if orphan {
                    let _ = std::fs::remove_file(&path);
                }
            }
        }
        Ok(purged)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The stored form of an entry (docs/FORMAT.md §21).
    #[test]
    fn the_entry_format_is_pinned() {
        let text = r#"{"id":"1796000000-42-snapshot-abcd","kind":"snapshot","name":"abcd","size":14,
            "trashed":1796000000,"token":"ops","why":"remove"}"#;
        let entry: TrashEntry = serde_json::from_str(text).unwrap();
        assert_eq!((entry.kind(), entry.trashed, entry.why.as_str()), (Some(Kind::Snapshot), 1796000000, "remove"));
        assert!(serde_json::from_str::<TrashEntry>(&text.replace("\"why\"", "\"new\":1,\"why\"")).is_err());
    }

    #[test]
    fn trashed_files_come_back_whole_and_only_time_purges_them() {
        let dir = tempfile::tempdir().unwrap();
        let trash = Trash::new(dir.path(), "main");
        let a = trash.put(Kind::Snapshot, "abcd", b"snapshot bytes", "ops", "remove").unwrap();
        let b = trash.put(Kind::Snapshot, "abcd", b"again", "ops", "replace").unwrap();
        assert_ne!(a.id, b.id);
        assert!(valid_id(&a.id));
        assert_eq!(trash.list().unwrap().len(), 2);
        let (entry, bytes) = trash.get(&a.id).unwrap().unwrap();
        assert_eq!((entry.kind(), bytes.as_slice()), (Some(Kind::Snapshot), &b"snapshot bytes"[..]));
        assert_eq!(trash.purge(Duration::from_secs(3600)).unwrap(), 0);
        trash.discard(&b.id).unwrap();
        assert_eq!(trash.list().unwrap().len(), 1);
        assert!(trash.get("../x").unwrap().is_none());
        // Grace zero: entries trashed before this second are over it.
        std::thread::sleep(Duration::from_millis(1100));
        assert_eq!(trash.purge(Duration::ZERO).unwrap(), 1);
        assert!(trash.list().unwrap().is_empty());
    }
}
