//! Copying files, directories and symlinks out of a filesystem into a target directory.
//!
//! Layout: the filesystem path `/etc/ssh/sshd_config` is written to
//! `TARGET/etc/ssh/sshd_config`; the root `/` means the whole filesystem into `TARGET`.
//!
//! Safety, in order of importance:
//!
//! - Nothing is written outside the target. Requested paths cannot contain `..`
//!   ([`FsPath`]); every name read from a directory must be one plain component
//!   (`check_name`), or the extraction stops with [`FsError::UnsafeName`]; every
//!   directory on the way is checked with `lstat` and must be a real directory, never a
//!   symlink ([`FsError::TargetNotDirectory`]); files and symlinks are created with
//!   `O_EXCL`, which never follows a symlink. (A process changing the target directory at
//!   the same time is not defended against.)
//! - Nothing existing is replaced unless [`ExtractOptions::overwrite`] is set; then an
//!   existing file or symlink (never a directory) is removed first, not written through.
//! - Every requested path is looked up before anything is written, so a typo writes
//!   nothing. A failure part-way leaves what was extracted so far, and no partial file.
//!
//! Preserved: file contents; modification and access times (files and directories;
//! directories last, after their contents); permission bits including setuid/setgid/
//! sticky where the filesystem has them (ext2/3/4); symlinks as symlinks, their targets
//! as stored. Not preserved: owners (the files belong to whoever extracts), symlink
//! times, extended attributes, ACLs, hard links (each name becomes its own file).
//! Devices, FIFOs, sockets and NTFS reparse points are skipped and reported.

use std::ffi::OsStr;
use std::fs::{self, File, FileTimes, OpenOptions, Permissions};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use crate::entry::{check_name, Entry, EntryKind, FsPath};
use crate::error::FsError;
use crate::filesystem::Filesystem;

/// Deepest directory nesting followed (a cycle in a damaged filesystem ends here).
const MAX_DEPTH: usize = 1024;

#[derive(Clone, Debug, Default)]
pub struct ExtractOptions {
    /// Replace existing files and symlinks in the target (directories are merged).
    pub overwrite: bool,
}

/// What [`extract`] wrote.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ExtractReport {
    pub files: u64,
    pub dirs: u64,
    pub symlinks: u64,
    /// Bytes of file content written.
    pub bytes: u64,
    /// Entries not extracted (devices, FIFOs, sockets, reparse points), with why.
    pub skipped: Vec<Skipped>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Skipped {
    pub path: String,
    pub reason: String,
}

/// Extracts `paths` (files, directories recursively, symlinks) from `fs` below `target`,
/// creating `target` if needed. See the module documentation for the layout and rules.
pub fn extract(
    fs: &Filesystem,
    paths: &[FsPath],
    target: &Path,
    options: &ExtractOptions,
) -> Result<ExtractReport, FsError> {
    let entries = paths.iter().map(|p| fs.stat(p.to_bytes())).collect::<Result<Vec<_>, _>>()?;
    fs::create_dir_all(target).map_err(|e| FsError::target(target, e))?;
    let mut run = Extraction { fs, root: target.to_path_buf(), options, report: ExtractReport::default() };
    for entry in entries {
        let mut dest = run.root.clone();
        let parents: Vec<&[u8]> = entry.path.components().collect();
        for part in parents.iter().take(parents.len().saturating_sub(1)) {
            dest.push(OsStr::from_bytes(part));
            ensure_dir(&dest)?;
        }
        if !entry.path.is_root() {
            dest.push(OsStr::from_bytes(entry.path.file_name()));
        }
        run.tree(entry, dest)?;
    }
    Ok(run.report)
}

struct Extraction<'a> {
    fs: &'a Filesystem,
    root: PathBuf,
    options: &'a ExtractOptions,
    report: ExtractReport,
}

/// Work left on the explicit stack (no recursion: a deep tree cannot overflow it).
enum Step {
    Visit(Entry, PathBuf, usize),
    /// A directory whose contents are done: set its mode and times now.
    Finish(Entry, PathBuf),
}

impl Extraction<'_> {
    fn tree(&mut self, top: Entry, dest: PathBuf) -> Result<(), FsError> {
        let mut stack = vec![Step::Visit(top, dest, 0)];
        while let Some(step) = stack.pop() {
            match step {
                Step::Visit(entry, dest, depth) => match entry.kind {
                    EntryKind::Dir => {
                        if depth > MAX_DEPTH {
                            return Err(FsError::TooDeep { path: entry.path.to_string(), limit: MAX_DEPTH });
                        }
                        if dest != self.root {
                            ensure_dir(&dest)?;
                        }
                        let mut children = self.fs.list_dir(&entry.path)?;
                        for child in &children {
                            check_name(child.path.file_name()).map_err(|reason| FsError::UnsafeName {
                                dir: entry.path.to_string(),
                                name: child.name.clone(),
                                reason,
                            })?;
                        }
                        // Popped in name order.
                        children.sort_by(|a, b| b.path.file_name().cmp(a.path.file_name()));
                        stack.push(Step::Finish(entry, dest.clone()));
                        for child in children {
                            let to = dest.join(OsStr::from_bytes(child.path.file_name()));
                            stack.push(Step::Visit(child, to, depth + 1));
                        }
                    }
                    EntryKind::File => self.file(&entry, &dest)?,
                    EntryKind::Symlink => self.symlink(&entry, &dest)?,
                    EntryKind::Other => self.report.skipped.push(Skipped {
                        path: entry.path.to_string(),
                        reason: "a device, FIFO, socket or reparse point".to_string(),
                    }),
                },
                Step::Finish(entry, dest) => {
                    // The target directory itself keeps its own mode and times.
                    if dest != self.root {
                        let dir = File::open(&dest).map_err(|e| FsError::target(&dest, e))?;
                        set_meta(&dir, &entry).map_err(|e| FsError::target(&dest, e))?;
                    }
                    self.report.dirs += 1;
                }
            }
        }
        Ok(())
    }

    fn file(&mut self, entry: &Entry, dest: &Path) -> Result<(), FsError> {
        let mut out = self.create(dest, |p| OpenOptions::new().write(true).create_new(true).open(p))?;
        let written = match self.fs.read_path(&entry.path, &mut out) {
            Ok(n) => n,
            Err(err) => {
                drop(out);
                let _ = fs::remove_file(dest);
                return Err(match err {
                    FsError::Output { source } => FsError::target(dest, source),
                    other => other,
                });
            }
        };
        set_meta(&out, entry).map_err(|e| FsError::target(dest, e))?;
        self.report.files += 1;
        self.report.bytes += written;
        Ok(())
    }

    fn symlink(&mut self, entry: &Entry, dest: &Path) -> Result<(), FsError> {
        let target = self.fs.read_link_path(&entry.path)?;
        self.create(dest, |p| std::os::unix::fs::symlink(&target, p))?;
        self.report.symlinks += 1;
        Ok(())
    }

    /// Runs `make` (which must fail with `AlreadyExists` rather than follow anything at
    /// `dest`); with `overwrite`, removes an existing file or symlink and tries once more.
    fn create<T>(&self, dest: &Path, make: impl Fn(&Path) -> io::Result<T>) -> Result<T, FsError> {
        match make(dest) {
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                let is_dir = fs::symlink_metadata(dest).is_ok_and(|m| m.is_dir());
                if !self.options.overwrite || is_dir {
                    return Err(FsError::TargetExists { path: dest.to_path_buf() });
                }
                fs::remove_file(dest).map_err(|e| FsError::target(dest, e))?;
                make(dest).map_err(|e| FsError::target(dest, e))
            }
            other => other.map_err(|e| FsError::target(dest, e)),
        }
    }
}

/// Makes sure `dir` is a real directory (not a symlink to one), creating it if missing.
fn ensure_dir(dir: &Path) -> Result<(), FsError> {
    match fs::symlink_metadata(dir) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => Err(FsError::TargetNotDirectory { path: dir.to_path_buf() }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => match fs::create_dir(dir) {
            Ok(()) => Ok(()),
            // Created meanwhile: check again what it is.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => match fs::symlink_metadata(dir) {
                Ok(m) if m.is_dir() => Ok(()),
                _ => Err(FsError::TargetNotDirectory { path: dir.to_path_buf() }),
            },
            Err(e) => Err(FsError::target(dir, e)),
        },
        Err(e) => Err(FsError::target(dir, e)),
    }
}

/// Times first (through the open handle), then the mode, so a read-only mode cannot get
/// in the way.
fn set_meta(file: &File, entry: &Entry) -> io::Result<()> {
    let mut times = FileTimes::new();
    let mut any = false;
    if let Some(t) = entry.mtime.and_then(|t| t.to_system_time()) {
        times = times.set_modified(t);
        any = true;
    }
    if let Some(t) = entry.atime.and_then(|t| t.to_system_time()) {
        times = times.set_accessed(t);
        any = true;
    }
    if any {
        file.set_times(times)?;
    }
    if let Some(mode) = entry.mode {
        file.set_permissions(Permissions::from_mode(mode & 0o7777))?;
    }
    Ok(())
}
