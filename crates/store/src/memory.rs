//! [`MemoryBackend`]: a test double that keeps repository files in memory.

use std::collections::HashMap;
use std::io::ErrorKind;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::SystemTime;

use crate::{relative_path, Backend, Kind, StoreError};

/// Numbers stores in their location, so messages tell two stores apart.
static NEXT_STORE: AtomicU64 = AtomicU64::new(1);

/// The files of one store: (kind, name) → bytes and the time they were written. The
/// config file is kept under the name `config`, whatever name it was written or read with.
type Files = HashMap<(Kind, String), (Arc<Vec<u8>>, SystemTime)>;

/// **A test double**: a store in memory, for tests of the layers above the store (and of
/// the store's own wrappers) that should not touch a disk. It keeps every rule of the
/// [`Backend`] contract (checked by [`crate::contract`]): a write replaces the file whole
/// under a lock, so a reader sees either no file or the complete one; names are checked
/// as [`relative_path`] checks them; a missing file is [`StoreError::NotFound`].
///
/// A clone is another handle on the same files, as a second process opening the same
/// directory would be: what one writes the other reads, and a test can keep a clone to
/// look at (or "reopen") a store it has handed to a repository. [`MemoryBackend::fork`]
/// copies the files into an independent store, so an expensive starting state can be
/// built once and tried many ways. Compiled for tests and with the `testing` feature.
#[derive(Clone)]
pub struct MemoryBackend {
    files: Arc<RwLock<Files>>,
    number: u64,
    parallelism: usize,
}

impl Default for MemoryBackend {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryBackend {
    /// An empty store.
    pub fn new() -> Self {
        MemoryBackend {
            files: Arc::new(RwLock::new(HashMap::new())),
            number: NEXT_STORE.fetch_add(1, Ordering::Relaxed),
            parallelism: 1,
        }
    }

    /// The same store, reporting `n` as its [`Backend::parallelism`] (as a remote store
    /// would), so that callers run their requests concurrently.
    pub fn with_parallelism(mut self, n: usize) -> Self {
        self.parallelism = n;
        self
    }

    /// An independent copy of the store as it is now (a new location number).
    pub fn fork(&self) -> Self {
        let files = self.read_files().clone();
        MemoryBackend {
            files: Arc::new(RwLock::new(files)),
            number: NEXT_STORE.fetch_add(1, Ordering::Relaxed),
            parallelism: self.parallelism,
        }
    }

    /// How many files the store holds, of every kind.
    pub fn file_count(&self) -> usize {
        self.read_files().len()
    }

    fn read_files(&self) -> std::sync::RwLockReadGuard<'_, Files> {
        // A panic while holding the lock cannot leave the map half-updated: every update
        // is one insert or remove.
        self.files.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write_files(&self) -> std::sync::RwLockWriteGuard<'_, Files> {
        self.files.write().unwrap_or_else(|e| e.into_inner())
    }

    /// The map key of a file, after the name check every backend makes.
    fn key(kind: Kind, name: &str) -> Result<(Kind, String), StoreError> {
        relative_path(kind, name)?;
        Ok((kind, if kind == Kind::Config { "config".into() } else { name.to_string() }))
    }

    fn get(&self, kind: Kind, name: &str) -> Result<Arc<Vec<u8>>, StoreError> {
        let key = Self::key(kind, name)?;
        self.read_files()
            .get(&key)
            .map(|f| f.0.clone())
            .ok_or_else(|| StoreError::NotFound { kind, name: name.to_string() })
    }

    /// Sets a file's modification time (to make it look old or young to gc).
    pub fn set_modified(&self, kind: Kind, name: &str, time: SystemTime) -> Result<(), StoreError> {
        let key = Self::key(kind, name)?;
        match self.write_files().get_mut(&key) {
            Some(f) => {
                f.1 = time;
                Ok(())
            }
            None => Err(StoreError::NotFound { kind, name: name.to_string() }),
        }
    }
}

impl Backend for MemoryBackend {
    fn location(&self) -> String {
        format!("memory store {}", self.number)
    }

    fn read(&self, kind: Kind, name: &str) -> Result<Vec<u8>, StoreError> {
        Ok(self.get(kind, name)?.as_ref().clone())
    }

    fn read_at(&self, kind: Kind, name: &str, offset: u64, buf: &mut [u8]) -> Result<(), StoreError> {
        let data = self.get(kind, name)?;
        let end = offset.checked_add(buf.len() as u64);
        match end {
            Some(end) if end <= data.len() as u64 => {
                buf.copy_from_slice(&data[offset as usize..end as usize]);
                Ok(())
            }
            _ => Err(StoreError::Io {
                path: PathBuf::from(format!("{}/{}", self.location(), relative_path(kind, name)?)),
                source: std::io::Error::new(
                    ErrorKind::UnexpectedEof,
                    format!("file of {} bytes too short for {} bytes at offset {offset}", data.len(), buf.len()),
                ),
            }),
        }
    }

    fn size(&self, kind: Kind, name: &str) -> Result<u64, StoreError> {
        Ok(self.get(kind, name)?.len() as u64)
    }

    fn modified(&self, kind: Kind, name: &str) -> Result<SystemTime, StoreError> {
        let key = Self::key(kind, name)?;
        self.read_files().get(&key).map(|f| f.1).ok_or_else(|| StoreError::NotFound { kind, name: name.to_string() })
    }

    fn write(&self, kind: Kind, name: &str, data: &[u8]) -> Result<(), StoreError> {
        let key = Self::key(kind, name)?;
        self.write_files().insert(key, (Arc::new(data.to_vec()), SystemTime::now()));
        Ok(())
    }

    fn write_owned(&self, kind: Kind, name: &str, data: Vec<u8>) -> Result<Option<Vec<u8>>, StoreError> {
        let key = Self::key(kind, name)?;
        self.write_files().insert(key, (Arc::new(data), SystemTime::now()));
        Ok(None)
    }

    fn list(&self, kind: Kind) -> Result<Vec<String>, StoreError> {
        Ok(self.read_files().keys().filter(|(k, _)| *k == kind).map(|(_, name)| name.clone()).collect())
    }

    fn list_sizes(&self, kind: Kind) -> Result<Vec<(String, u64)>, StoreError> {
        Ok(self
            .read_files()
            .iter()
            .filter(|((k, _), _)| *k == kind)
            .map(|((_, name), (data, _))| (name.clone(), data.len() as u64))
            .collect())
    }

    fn remove(&self, kind: Kind, name: &str) -> Result<(), StoreError> {
        let key = Self::key(kind, name)?;
        self.write_files().remove(&key);
        Ok(())
    }

    fn parallelism(&self) -> usize {
        self.parallelism
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clones_share_files_and_forks_do_not() {
        let a = MemoryBackend::new();
        let b = a.clone();
        a.write(Kind::Snapshot, "s1", b"one").unwrap();
        assert_eq!(b.read(Kind::Snapshot, "s1").unwrap(), b"one", "a clone is a handle on the same store");
        let fork = a.fork();
        assert_ne!(fork.location(), a.location());
        a.remove(Kind::Snapshot, "s1").unwrap();
        fork.write(Kind::Snapshot, "s2", b"two").unwrap();
        assert_eq!(fork.read(Kind::Snapshot, "s1").unwrap(), b"one", "the fork keeps what it copied");
        assert!(b.read(Kind::Snapshot, "s1").unwrap_err().is_not_found());
        assert!(a.read(Kind::Snapshot, "s2").unwrap_err().is_not_found(), "and writes only to itself");
        assert_eq!((a.file_count(), fork.file_count()), (0, 2));
    }

    #[test]
    fn the_config_has_one_name_and_parallelism_is_chosen() {
        let m = MemoryBackend::new().with_parallelism(4);
        m.write(Kind::Config, "anything", b"cfg").unwrap();
        assert_eq!(m.read(Kind::Config, "config").unwrap(), b"cfg");
        assert_eq!(m.list(Kind::Config).unwrap(), vec!["config".to_string()]);
        assert_eq!(m.parallelism(), 4);
    }
}
