//! A disposable local read-through cache of index files and snapshot manifests.
//!
//! Every command starts by reading all index files and many manifests; on an object store
//! that is one GET per file per run. Both kinds are immutable and named by the BLAKE3 hash
//! of their bytes, so the cache needs no invalidation: a cached copy whose hash does not
//! match its name is dropped and fetched again, and a listing of the kind drops cached
//! files the store no longer has. Deleting the cache directory at any time is safe.

use std::fs;
use std::io::{ErrorKind, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::{Backend, Kind, StoreError};

/// The kinds kept in the cache.
const CACHED: [Kind; 2] = [Kind::Index, Kind::Snapshot];

/// Wraps a backend; reads of index files and snapshots are served from `dir` when present.
pub struct ReadCache {
    inner: Box<dyn Backend>,
    dir: PathBuf,
    hits: AtomicU64,
    misses: AtomicU64,
}

impl ReadCache {
    /// Caches `inner`'s index files and manifests in `dir` (created when missing).
    pub fn new(inner: Box<dyn Backend>, dir: impl AsRef<Path>) -> Result<Self, StoreError> {
        let dir = dir.as_ref().to_path_buf();
        // Private like the repository: the cached files are its (encrypted) metadata.
        for kind in CACHED {
            crate::local::create_private_dir_all(&dir.join(kind.dir()))?;
        }
        Ok(ReadCache { inner, dir, hits: AtomicU64::new(0), misses: AtomicU64::new(0) })
    }

    /// Reads served from the cache and reads that went to the store, so far.
    pub fn hits_and_misses(&self) -> (u64, u64) {
        (self.hits.load(Ordering::Relaxed), self.misses.load(Ordering::Relaxed))
    }

    fn cached_path(&self, kind: Kind, name: &str) -> Option<PathBuf> {
        if !CACHED.contains(&kind) {
            return None;
        }
        crate::relative_path(kind, name).ok().map(|p| self.dir.join(p))
    }

    /// Stores a copy if its bytes match its name; failures only cost a later re-fetch.
    fn keep(&self, path: &Path, name: &str, data: &[u8]) {
        if !matches_name(name, data) {
            return;
        }
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        let write = || -> std::io::Result<()> {
            let mut f = fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(crate::local::FILE_MODE)
                .open(&tmp)?;
            f.write_all(data)?;
            fs::rename(&tmp, path)
        };
        if write().is_err() {
            let _ = fs::remove_file(&tmp);
        }
    }
}

fn matches_name(name: &str, data: &[u8]) -> bool {
    blake3::hash(data).to_hex().as_str() == name
}

impl Backend for ReadCache {
    fn location(&self) -> String {
        self.inner.location()
    }

    fn read(&self, kind: Kind, name: &str) -> Result<Vec<u8>, StoreError> {
        let Some(path) = self.cached_path(kind, name) else {
            return self.inner.read(kind, name);
        };
        if let Ok(data) = fs::read(&path) {
            if matches_name(name, &data) {
                self.hits.fetch_add(1, Ordering::Relaxed);
                return Ok(data);
            }
            let _ = fs::remove_file(&path);
        }
        self.misses.fetch_add(1, Ordering::Relaxed);
        let data = self.inner.read(kind, name)?;
        self.keep(&path, name, &data);
        Ok(data)
    }

    fn read_at(&self, kind: Kind, name: &str, offset: u64, buf: &mut [u8]) -> Result<(), StoreError> {
        self.inner.read_at(kind, name, offset, buf)
    }

    fn size(&self, kind: Kind, name: &str) -> Result<u64, StoreError> {
        self.inner.size(kind, name)
    }

    fn modified(&self, kind: Kind, name: &str) -> Result<std::time::SystemTime, StoreError> {
        self.inner.modified(kind, name)
    }

    fn write(&self, kind: Kind, name: &str, data: &[u8]) -> Result<(), StoreError> {
        self.inner.write(kind, name, data)?;
        if let Some(path) = self.cached_path(kind, name) {
            self.keep(&path, name, data);
        }
        Ok(())
    }

    fn write_owned(&self, kind: Kind, name: &str, data: Vec<u8>) -> Result<Option<Vec<u8>>, StoreError> {
        if CACHED.contains(&kind) {
            self.write(kind, name, &data)?;
            return Ok(Some(data));
        }
        self.inner.write_owned(kind, name, data)
    }

    fn list(&self, kind: Kind) -> Result<Vec<String>, StoreError> {
        let names = self.inner.list(kind)?;
        if CACHED.contains(&kind) {
            let present: std::collections::HashSet<&str> = names.iter().map(String::as_str).collect();
            let dir = self.dir.join(kind.dir());
            for entry in fs::read_dir(&dir).into_iter().flatten().flatten() {
                let name = entry.file_name();
                if !name.to_str().is_some_and(|n| present.contains(n)) {
                    let _ = fs::remove_file(entry.path());
                }
            }
        }
        Ok(names)
    }

    /// The store's listing (the cache is tidied by [`Backend::list`]).
    fn list_sizes(&self, kind: Kind) -> Result<Vec<(String, u64)>, StoreError> {
        self.inner.list_sizes(kind)
    }

    fn remove(&self, kind: Kind, name: &str) -> Result<(), StoreError> {
        if let Some(path) = self.cached_path(kind, name) {
            match fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(source) => return Err(StoreError::Io { path, source }),
            }
        }
        self.inner.remove(kind, name)
    }

    fn clean_temporary(&self, age: std::time::Duration) -> Result<u64, StoreError> {
        self.inner.clean_temporary(age)
    }

    fn observe_cancel(&self, cancel: &blockproof_work::Cancel) {
        self.inner.observe_cancel(cancel)
    }

    fn parallelism(&self) -> usize {
        self.inner.parallelism()
    }

    fn receipt_times(&self) -> bool {
        self.inner.receipt_times()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::LocalBackend;
    use std::os::unix::fs::PermissionsExt;

    fn named(data: &[u8]) -> String {
        blake3::hash(data).to_hex().to_string()
    }

    #[test]
    fn serves_verified_copies_and_forgets_removed_files() {
        let d = tempfile::tempdir().unwrap();
        let store = LocalBackend::create(d.path().join("repo")).unwrap();
        let cache = ReadCache::new(Box::new(store), d.path().join("cache")).unwrap();
        cache.write(Kind::Config, "config", b"config").unwrap();
        let (a, b) = (b"index one".to_vec(), b"snapshot two".to_vec());
        cache.write(Kind::Index, &named(&a), &a).unwrap();
        // Written through: the first read is already a hit.
        assert_eq!(cache.read(Kind::Index, &named(&a)).unwrap(), a);
        assert_eq!(cache.hits_and_misses(), (1, 0));

        // A file written by another process is fetched once, then served locally.
        let other = LocalBackend::open(d.path().join("repo")).unwrap();
        other.write(Kind::Snapshot, &named(&b), &b).unwrap();
        assert_eq!(cache.read(Kind::Snapshot, &named(&b)).unwrap(), b);
        assert_eq!(cache.read(Kind::Snapshot, &named(&b)).unwrap(), b);
        assert_eq!(cache.hits_and_misses(), (2, 1));

        // A damaged cached copy is not served: it is dropped and fetched again.
        let cached = d.path().join("cache").join(crate::relative_path(Kind::Snapshot, &named(&b)).unwrap());
        fs::write(&cached, b"garbage").unwrap();
        assert_eq!(cache.read(Kind::Snapshot, &named(&b)).unwrap(), b);
        assert_eq!(cache.hits_and_misses(), (2, 2));

        // Cached copies and the cache's directories are private, whatever the umask
        // (this process's, 022 or so under cargo test: the old 0644 would show).
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&cached), 0o600);
        for dir in ["", "index", "snapshots"] {
            assert_eq!(mode(&d.path().join("cache").join(dir)), 0o700, "cache/{dir}");
        }

        // Another process removes the snapshot: listing drops the cached copy.
        other.remove(Kind::Snapshot, &named(&b)).unwrap();
        assert!(cache.list(Kind::Snapshot).unwrap().is_empty());
        assert!(!cached.exists());
        assert!(cache.read(Kind::Snapshot, &named(&b)).unwrap_err().is_not_found());

        // Files whose bytes do not match their name (locks, state, keys) pass through.
        cache.write(Kind::State, "gc-plan-x", b"plan").unwrap();
        assert_eq!(cache.read(Kind::State, "gc-plan-x").unwrap(), b"plan");
        assert_eq!(cache.hits_and_misses(), (2, 3));
    }
}
