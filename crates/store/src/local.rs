//! The local-directory backend.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{ErrorKind, Read};
use std::os::unix::fs::{DirBuilderExt, FileExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rand::Rng;

use crate::{Backend, Kind, StoreError};

/// Open pack files kept for `read_at` (restore and check read many blobs per pack).
const OPEN_FILE_CACHE: usize = 64;

/// A repository in a local directory (or a mounted network filesystem with POSIX
/// rename semantics).
pub struct LocalBackend {
    root: PathBuf,
    open_files: Mutex<HashMap<String, Arc<File>>>,
}

fn io_err(path: &Path, source: std::io::Error) -> StoreError {
    StoreError::Io { path: path.to_path_buf(), source }
}

/// Why a listing on several threads failed.
enum Failed {
    Store(StoreError),
    Work(blockproof_work::WorkError),
}

impl From<blockproof_work::WorkError> for Failed {
    fn from(e: blockproof_work::WorkError) -> Self {
        Failed::Work(e)
    }
}

/// The regular files of `dir`, with their sizes when `sizes` (else 0); a file removed
/// while it is listed is left out.
fn list_dir(dir: &Path, sizes: bool) -> Result<Vec<(String, u64)>, StoreError> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).map_err(|e| io_err(dir, e))? {
        let entry = entry.map_err(|e| io_err(dir, e))?;
        if !entry.file_type().map(|t| t.is_file()).unwrap_or(false) {
            continue;
        }
        let Some(name) = entry.file_name().to_str().map(str::to_string) else { continue };
        let size = match sizes.then(|| entry.metadata()) {
            None => 0,
            Some(Ok(m)) => m.len(),
            // Removed since the directory was read.
            Some(Err(e)) if e.kind() == ErrorKind::NotFound => continue,
            Some(Err(e)) => return Err(io_err(&entry.path(), e)),
        };
        out.push((name, size));
    }
    Ok(out)
}

/// Mode of every directory blockproof creates in a repository (and of missing parents
/// of a new repository): only its owner may enter it, whatever the umask.
pub(crate) const DIR_MODE: u32 = 0o700;
/// Mode of every file blockproof writes in a repository (key slots, packs, manifests,
/// state, temporary files): only its owner may read it, whatever the umask.
pub(crate) const FILE_MODE: u32 = 0o600;

/// `create_dir_all` whose new directories are [`DIR_MODE`] (the umask can only take
/// bits away, never add them).
pub fn create_private_dir_all(dir: &Path) -> Result<(), StoreError> {
    fs::DirBuilder::new().recursive(true).mode(DIR_MODE).create(dir).map_err(|e| io_err(dir, e))
}

/// The directories `create` makes (`state/` appears with its first document).
const DIRS: [Kind; 5] = [Kind::Key, Kind::Pack, Kind::Index, Kind::Snapshot, Kind::Lock];

impl LocalBackend {
    /// Creates the directory layout for a new repository. Fails if `root` exists and
    /// is not an empty directory.
    pub fn create(root: impl AsRef<Path>) -> Result<Self, StoreError> {
        let root = root.as_ref().to_path_buf();
        match fs::read_dir(&root) {
            Ok(mut entries) => {
                if entries.next().is_some() {
                    return Err(StoreError::Invalid(format!(
                        "{} already exists and is not empty; refusing to initialise a repository there",
                        root.display()
                    )));
                }
            }
            Err(e) if e.kind() == ErrorKind::NotFound => create_private_dir_all(&root)?,
            Err(e) => return Err(io_err(&root, e)),
        }
        for d in DIRS.iter().map(|k| k.dir()).chain(["tmp"]) {
            create_private_dir_all(&root.join(d))?;
        }
        for i in 0..=255u8 {
            create_private_dir_all(&root.join("data").join(format!("{i:02x}")))?;
        }
        sync_dir(&root)?;
        Ok(Self::at(root))
    }

    /// Opens an existing repository directory. Nothing is written: a read-only
    /// repository (a read-only mount, a directory without write permission) opens, and
    /// serves every operation that only reads.
    pub fn open(root: impl AsRef<Path>) -> Result<Self, StoreError> {
        let root = root.as_ref().to_path_buf();
        if !root.join("config").is_file() {
            return Err(StoreError::Invalid(format!(
                "{} is not a blockproof repository (no config file); create one with blockproof init --repo {}",
                root.display(),
                root.display()
            )));
        }
        Ok(Self::at(root))
    }

    fn at(root: PathBuf) -> Self {
        LocalBackend { root, open_files: Mutex::new(HashMap::new()) }
    }

    /// The repository directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn dir(&self, kind: Kind) -> PathBuf {
        self.root.join(kind.dir())
    }

    /// The path of a file. Names are checked so they cannot leave the repository.
    pub fn path(&self, kind: Kind, name: &str) -> Result<PathBuf, StoreError> {
        Ok(self.root.join(crate::relative_path(kind, name)?))
    }

    /// The regular files of a kind (symbolic links, directories and other entries are
    /// not repository files), with their sizes when `sizes` is set (0 otherwise).
    fn listing(&self, kind: Kind, sizes: bool) -> Result<Vec<(String, u64)>, StoreError> {
        if kind == Kind::Config {
            let config = self.root.join("config");
            return Ok(match fs::metadata(&config) {
                Ok(m) if m.is_file() => vec![("config".into(), m.len())],
                _ => vec![],
            });
        }
        let dir = self.dir(kind);
        if !dir.is_dir() {
            return Ok(Vec::new());
        }
        let mut dirs = vec![dir.clone()];
        if kind == Kind::Pack {
            dirs = fs::read_dir(&dir)
                .map_err(|e| io_err(&dir, e))?
                .filter_map(|e| e.ok())
                .filter(|e| e.file_type().map(|t| t.is_dir()).unwrap_or(false))
                .map(|e| e.path())
                .collect();
        }
        // A repository of many packs has its (up to 256) pack directories read on one
        // thread per core, 16 directories at a time: a backup lists every pack with its
        // size before it reuses any (`Availability`), which at 220 000 packs was half of
        // a one-chunk incremental. A small one (the first directory holds fewer than 16
        // packs) is read on this thread, where threads would cost more than they save.
        let Some((first, rest)) = dirs.split_first() else { return Ok(Vec::new()) };
        let mut out = list_dir(first, sizes)?;
        if rest.len() < 16 || out.len() < 16 {
            for d in rest {
                out.extend(list_dir(d, sizes)?);
            }
            return Ok(out);
        }
        let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
        let listed = blockproof_work::fan_out(
            &blockproof_work::Cancel::new(),
            blockproof_work::FanOut { workers, queue: workers },
            |emit| {
                for batch in rest.chunks(16) {
                    if !emit.send(batch) {
                        break;
                    }
                }
                Ok(())
            },
            || {
                |batch: &[PathBuf]| {
                    let mut part = Vec::new();
                    for d in batch {
                        part.extend(list_dir(d, sizes).map_err(Failed::Store)?);
                    }
                    Ok(part)
                }
            },
            |part| {
                out.extend(part);
                Ok(())
            },
        );
        match listed {
            Ok(()) => Ok(out),
            Err(Failed::Store(e)) => Err(e),
            Err(Failed::Work(e)) => Err(io_err(&dir, std::io::Error::other(e.to_string()))),
        }
    }

    fn open_cached(&self, kind: Kind, name: &str) -> Result<Arc<File>, StoreError> {
        let key = format!("{kind}/{name}");
        if let Some(f) = self.open_files.lock().expect("cache lock").get(&key) {
            return Ok(f.clone());
        }
        let path = self.path(kind, name)?;
        let f = Arc::new(File::open(&path).map_err(|e| self.map_open_err(kind, name, &path, e))?);
        let mut cache = self.open_files.lock().expect("cache lock");
        if cache.len() >= OPEN_FILE_CACHE {
            cache.clear();
        }
        cache.insert(key, f.clone());
        Ok(f)
    }

    fn map_open_err(&self, kind: Kind, name: &str, path: &Path, e: std::io::Error) -> StoreError {
        if e.kind() == ErrorKind::NotFound {
            StoreError::NotFound { kind, name: name.to_string() }
        } else {
            io_err(path, e)
        }
    }
}

fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(|e| io_err(dir, e))
}

impl Backend for LocalBackend {
    fn location(&self) -> String {
        self.root.display().to_string()
    }

    fn read(&self, kind: Kind, name: &str) -> Result<Vec<u8>, StoreError> {
        let path = self.path(kind, name)?;
        let mut f = File::open(&path).map_err(|e| self.map_open_err(kind, name, &path, e))?;
        let mut buf = Vec::new();
        f.read_to_end(&mut buf).map_err(|e| io_err(&path, e))?;
        Ok(buf)
    }

    fn read_at(&self, kind: Kind, name: &str, offset: u64, buf: &mut [u8]) -> Result<(), StoreError> {
        let f = self.open_cached(kind, name)?;
        f.read_exact_at(buf, offset).map_err(|e| {
            let path = self.path(kind, name).unwrap_or_default();
            if e.kind() == ErrorKind::UnexpectedEof {
                io_err(
                    &path,
                    std::io::Error::new(
                        ErrorKind::UnexpectedEof,
                        format!("file too short for {} bytes at offset {offset}", buf.len()),
                    ),
                )
            } else {
                io_err(&path, e)
            }
        })
    }

    fn size(&self, kind: Kind, name: &str) -> Result<u64, StoreError> {
        let path = self.path(kind, name)?;
        fs::metadata(&path).map(|m| m.len()).map_err(|e| self.map_open_err(kind, name, &path, e))
    }

    fn modified(&self, kind: Kind, name: &str) -> Result<std::time::SystemTime, StoreError> {
        let path = self.path(kind, name)?;
        fs::metadata(&path).and_then(|m| m.modified()).map_err(|e| self.map_open_err(kind, name, &path, e))
    }

    fn write(&self, kind: Kind, name: &str, data: &[u8]) -> Result<(), StoreError> {
        let path = self.path(kind, name)?;
        let tmp = self.root.join("tmp").join(format!("{}-{:016x}", kind.name(), rand::thread_rng().gen::<u64>()));
        let result = (|| {
            if let Err(e) = crate::direct::write_new_file(&tmp, data) {
                // `tmp/` is created by the first write that needs it (a copied repository
                // may lack it, and opening never writes); retried once.
                if e.kind() != ErrorKind::NotFound {
                    return Err(io_err(&tmp, e));
                }
                let dir = self.root.join("tmp");
                fs::create_dir_all(&dir).map_err(|e| io_err(&dir, e))?;
                crate::direct::write_new_file(&tmp, data).map_err(|e| io_err(&tmp, e))?;
            }
            if let Err(e) = fs::rename(&tmp, &path) {
                // A directory can be missing in a copied repository (git and some sync
                // tools drop empty directories): create it and retry once.
                if e.kind() != ErrorKind::NotFound {
                    return Err(io_err(&path, e));
                }
                let parent = path.parent().expect("repository files have a parent directory");
                create_private_dir_all(parent)?;
                // The new directories' entries must be durable too, up to the root.
                for dir in parent.ancestors().skip(1) {
                    sync_dir(dir)?;
                    if dir == self.root {
                        break;
                    }
                }
                fs::rename(&tmp, &path).map_err(|e| io_err(&path, e))?;
            }
            sync_dir(path.parent().expect("repository files have a parent directory"))
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result
    }

    fn list(&self, kind: Kind) -> Result<Vec<String>, StoreError> {
        Ok(self.listing(kind, false)?.into_iter().map(|(n, _)| n).collect())
    }

    fn list_sizes(&self, kind: Kind) -> Result<Vec<(String, u64)>, StoreError> {
        self.listing(kind, true)
    }

    fn remove(&self, kind: Kind, name: &str) -> Result<(), StoreError> {
        let path = self.path(kind, name)?;
        self.open_files.lock().expect("cache lock").remove(&format!("{kind}/{name}"));
        match fs::remove_file(&path) {
            Ok(()) => sync_dir(path.parent().expect("parent")),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err(&path, e)),
        }
    }

    fn clean_temporary(&self, age: std::time::Duration) -> Result<u64, StoreError> {
        let dir = self.root.join("tmp");
        let mut removed = 0;
        for entry in fs::read_dir(&dir).into_iter().flatten().flatten() {
            let old = entry.metadata().ok().and_then(|m| m.modified().ok()).and_then(|t| t.elapsed().ok());
            if old.is_some_and(|e| e > age) && fs::remove_file(entry.path()).is_ok() {
                removed += 1;
            }
        }
        Ok(removed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_read_list_remove() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("repo");
        let b = LocalBackend::create(&root).unwrap();
        b.write(Kind::Config, "config", b"cfg").unwrap();
        let name = "ab".repeat(32);
        b.write(Kind::Pack, &name, b"0123456789").unwrap();
        assert!(root.join("data/ab").join(&name).is_file());
        assert_eq!(b.read(Kind::Pack, &name).unwrap(), b"0123456789");
        let mut buf = [0u8; 3];
        b.read_at(Kind::Pack, &name, 4, &mut buf).unwrap();
        assert_eq!(&buf, b"456");
        let mut big = [0u8; 20];
        assert!(b.read_at(Kind::Pack, &name, 0, &mut big).is_err());
        assert_eq!(b.size(Kind::Pack, &name).unwrap(), 10);
        assert_eq!(b.list(Kind::Pack).unwrap(), vec![name.clone()]);
        assert!(b.list(Kind::Snapshot).unwrap().is_empty());
        assert_eq!(fs::read_dir(root.join("tmp")).unwrap().count(), 0, "no temporary file left behind");
        b.remove(Kind::Pack, &name).unwrap();
        b.remove(Kind::Pack, &name).unwrap();
        assert!(b.read(Kind::Pack, &name).unwrap_err().is_not_found());
        let reopened = LocalBackend::open(&root).unwrap();
        assert_eq!(reopened.read(Kind::Config, "x").unwrap(), b"cfg");
    }

    /// Enough packs in every directory to be listed on several threads: every pack once
    /// with its size; what is not a regular file left out. And one pack per directory:
    /// listed on this thread, alike. (Written straight into place: only the listing is
    /// under test.)
    #[test]
    fn packs_in_many_directories_are_listed_with_their_sizes() {
        for per_dir in [16u16, 1] {
            let dir = tempfile::tempdir().unwrap();
            let root = dir.path().join("repo");
            let b = LocalBackend::create(&root).unwrap();
            let mut want: Vec<(String, u64)> = (0..256u16)
                .flat_map(|p| {
                    (0..per_dir).map(move |j| (format!("{p:02x}{j:02x}{}", "ab".repeat(30)), (p + j) as u64 % 50))
                })
                .collect();
            for (name, size) in &want {
                fs::write(root.join("data").join(&name[..2]).join(name), vec![7; *size as usize]).unwrap();
            }
            fs::create_dir(root.join("data/25/not-a-pack")).unwrap();
            std::os::unix::fs::symlink(
                root.join("config"),
                root.join("data/25").join(format!("25{}", "ff".repeat(31))),
            )
            .unwrap();
            let mut listed = b.list_sizes(Kind::Pack).unwrap();
            listed.sort();
            want.sort();
            assert_eq!(listed, want, "{per_dir} per directory");
            let mut names = b.list(Kind::Pack).unwrap();
            names.sort();
            assert_eq!(names, want.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>());
        }
    }

    #[test]
    fn opening_writes_nothing_and_tmp_comes_back_with_the_first_write() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("repo");
        LocalBackend::create(&root).unwrap().write(Kind::Config, "config", b"cfg").unwrap();
        fs::remove_dir(root.join("tmp")).unwrap();
        let b = LocalBackend::open(&root).unwrap();
        assert!(!root.join("tmp").exists(), "open wrote nothing");
        assert_eq!(b.read(Kind::Config, "config").unwrap(), b"cfg");
        b.write(Kind::Snapshot, &"ab".repeat(32), b"x").unwrap();
        assert!(root.join("tmp").is_dir());
        assert_eq!(b.read(Kind::Snapshot, &"ab".repeat(32)).unwrap(), b"x");
    }

    #[test]
    fn tolerates_missing_empty_directories() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("repo");
        let b = LocalBackend::create(&root).unwrap();
        b.write(Kind::Config, "config", b"cfg").unwrap();
        fs::remove_dir(root.join("snapshots")).unwrap();
        fs::remove_dir(root.join("data/cd")).unwrap();
        assert!(b.list(Kind::Snapshot).unwrap().is_empty());
        b.write(Kind::Pack, &"cd".repeat(32), b"x").unwrap();
        b.write(Kind::Snapshot, &"ef".repeat(32), b"y").unwrap();
        assert_eq!(b.list(Kind::Pack).unwrap().len(), 1);
    }

    #[test]
    fn files_and_directories_are_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("new/repo");
        let b = LocalBackend::create(&root).unwrap();
        b.write(Kind::Config, "config", b"cfg").unwrap();
        b.write(Kind::Pack, &"ab".repeat(32), &vec![7u8; 2 << 20]).unwrap(); // O_DIRECT path
        fs::remove_dir(root.join("snapshots")).unwrap();
        b.write(Kind::Snapshot, &"cd".repeat(32), b"s").unwrap(); // directory made again
        b.write(Kind::State, "check", b"x").unwrap(); // state/ appears now
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir.path().join("new")), 0o700, "a missing parent");
        let mut stack = vec![root.clone()];
        let (mut files, mut dirs) = (0, 0);
        while let Some(d) = stack.pop() {
            assert_eq!(mode(&d), 0o700, "{}", d.display());
            dirs += 1;
            for e in fs::read_dir(&d).unwrap() {
                let p = e.unwrap().path();
                if p.is_dir() {
                    stack.push(p);
                } else {
                    assert_eq!(mode(&p), 0o600, "{}", p.display());
                    files += 1;
                }
            }
        }
        assert_eq!((files, dirs), (4, 1 + 6 + 256 + 1));
    }

    #[test]
    fn refuses_bad_names_and_non_empty_dirs() {
        let dir = tempfile::tempdir().unwrap();
        let b = LocalBackend::create(dir.path().join("r")).unwrap();
        assert!(b.write(Kind::Snapshot, "../escape", b"x").is_err());
        assert!(b.write(Kind::Snapshot, "a", b"x").is_err());
        assert!(LocalBackend::create(dir.path().join("r")).is_err());
        assert!(LocalBackend::open(dir.path()).is_err());
    }

    #[test]
    fn old_temporary_files_are_cleaned_new_ones_kept() {
        let d = tempfile::tempdir().unwrap();
        let b = LocalBackend::create(d.path().join("r")).unwrap();
        let tmp = d.path().join("r").join("tmp");
        let old = tmp.join("pack-0000000000000001");
        let new = tmp.join("pack-0000000000000002");
        std::fs::write(&old, b"x").unwrap();
        std::fs::write(&new, b"y").unwrap();
        let f = std::fs::File::options().write(true).open(&old).unwrap();
        f.set_modified(std::time::SystemTime::now() - std::time::Duration::from_secs(7200)).unwrap();
        assert_eq!(b.clean_temporary(std::time::Duration::from_secs(3600)).unwrap(), 1);
        assert!(!old.exists() && new.exists());
    }
}
