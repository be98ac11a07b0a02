//! Copying files, directories and symlinks out of a filesystem into a target directory.
//!
//! Layout: the filesystem path `/etc/ssh/sshd_config` is written to
//! `TARGET/etc/ssh/sshd_config`; the root `/` means the whole filesystem into `TARGET`.
//!
//! Safety, in order of importance:
//!
//! - Nothing is written outside the target. Requested paths cannot contain `..`
//!   ([`FsPath`]); every name read from a directory must be one plain component
//!   (`check_name`: not empty, `.` or `..`, no `/` or NUL), or the entry is skipped and
//!   reported in [`ExtractReport::skipped`] naming the directory and the name; every
//!   directory on the way is checked with `lstat` and must be a real directory, never a
//!   symlink ([`FsError::TargetNotDirectory`]); files and symlinks are created with
//!   `O_EXCL`, which never follows a symlink. (A process changing the target directory at
//!   the same time is not defended against.)
//! - Nothing dangerous to the host is created unless asked
//!   ([`ExtractOptions::keep_special_modes`]): setuid, setgid and sticky bits are removed
//!   from files, the setuid bit from directories, and write permission for others from
//!   everything (counted in [`ExtractReport::modes_restricted`]). A guest's setuid binary
//!   would otherwise become a setuid binary of whoever extracts — root, typically.
//! - Files are written sparse: all-zero 4 KiB blocks are skipped and the file's length
//!   set at the end, so a guest's huge sparse file costs the host only its data.
//! - Files and directories are private (0600, 0700) while they are being filled; they
//!   get their final mode once complete. Directories created only to hold a requested
//!   path get 0755, a new target directory 0700, whatever the umask.
//! - Nothing existing is replaced unless [`ExtractOptions::overwrite`] is set; then an
//!   existing file or symlink (never a directory) is removed first, not written through.
//! - Every requested path is looked up before anything is written, so a typo writes
//!   nothing. A failure part-way leaves what was extracted so far, and no partial file.
//!
//! Preserved: file contents (holes where the content is zeros); modification and access
//! times (files and directories; directories last, after their contents); permission
//! bits where the filesystem has them (ext2/3/4), restricted as above; symlinks as
//! symlinks, their targets as stored. Filesystems without modes (FAT, NTFS) get the
//! usual `0666`/`0777` less the umask, and never write permission for others. Not
//! preserved: owners (the files belong to whoever extracts; with
//! [`ExtractOptions::restore_owners`], the stored numeric owner and group), symlink
//! times, extended attributes, ACLs, hard links (each name becomes its own file).
//! Devices, FIFOs, sockets and NTFS reparse points are skipped and reported.

use std::ffi::OsStr;
use std::fs::{self, DirBuilder, File, FileTimes, OpenOptions, Permissions};
use std::io::{self, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::entry::{check_name, Entry, EntryKind, FsPath};
use crate::error::FsError;
use crate::filesystem::Filesystem;

/// Deepest directory nesting followed (a cycle in a damaged filesystem ends here).
pub(crate) const MAX_DEPTH: usize = 1024;

/// Granularity of holes in extracted files: an all-zero block this large (at an offset
/// that is a multiple of it) is not written.
const SPARSE_BLOCK: usize = 4096;

/// Mode bits removed unless [`ExtractOptions::keep_special_modes`]: from files setuid,
/// setgid, sticky and write-for-others; from directories setuid and write-for-others.
const RESTRICTED_FILE_BITS: u32 = 0o7002;
const RESTRICTED_DIR_BITS: u32 = 0o4002;

#[derive(Clone, Debug, Default)]
pub struct ExtractOptions {
    /// Replace existing files and symlinks in the target (directories are merged).
    pub overwrite: bool,
    /// Keep setuid, setgid and sticky bits and write permission for others as stored.
    /// Without it they are removed (see the module documentation).
    pub keep_special_modes: bool,
    /// Give files, directories and symlinks the numeric owner and group the filesystem
    /// records (ext2/3/4), before their mode is set. Needs the privilege to `chown`
    /// (root); a failure is an error. blockproof sets it with `keep_special_modes` when
    /// run as root, so a kept setuid bit never applies to an owner other than the stored
    /// one.
    pub restore_owners: bool,
}

/// What [`extract`] wrote.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ExtractReport {
    pub files: u64,
    pub dirs: u64,
    pub symlinks: u64,
    /// Bytes of file content written.
    pub bytes: u64,
    /// Entries not extracted (devices, FIFOs, sockets, reparse points, entries whose
    /// name is not one plain component), with why.
    pub skipped: Vec<Skipped>,
    /// Files and directories extracted with fewer mode bits than stored (setuid, setgid,
    /// sticky or write for others removed).
    pub modes_restricted: u64,
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
    // A new target is private: what a guest's directories allow is decided below it.
    match fs::metadata(target) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => return Err(FsError::TargetNotDirectory { path: target.to_path_buf() }),
        Err(_) => {
            DirBuilder::new().recursive(true).mode(0o700).create(target).map_err(|e| FsError::target(target, e))?
        }
    }
    let mut run = Extraction { fs, root: target.to_path_buf(), options, report: ExtractReport::default() };
    for entry in entries {
        let mut dest = run.root.clone();
        let parents: Vec<&[u8]> = entry.path.components().collect();
        for part in parents.iter().take(parents.len().saturating_sub(1)) {
            dest.push(OsStr::from_bytes(part));
            ensure_dir(&dest, 0o755)?;
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
                            // Private until its contents are done; then its own mode.
                            ensure_dir(&dest, if entry.mode.is_some() { 0o700 } else { 0o777 })?;
                        }
                        let mut children = self.fs.list_dir(&entry.path)?;
                        children.retain(|child| match check_name(child.path.file_name()) {
                            Ok(()) => true,
                            Err(reason) => {
                                self.report.skipped.push(Skipped {
                                    path: child.path.to_string(),
                                    reason: format!(
                                        "directory {} has an entry named {:?}, which is {reason}",
                                        entry.path, child.name
                                    ),
                                });
                                false
                            }
                        });
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
                        self.set_meta(&dir, &entry).map_err(|e| FsError::target(&dest, e))?;
                    }
                    self.report.dirs += 1;
                }
            }
        }
        Ok(())
    }

    fn file(&mut self, entry: &Entry, dest: &Path) -> Result<(), FsError> {
        // Private while it is written when its own mode follows.
        let mode = if entry.mode.is_some() { 0o600 } else { 0o666 };
        let file = self.create(dest, |p| OpenOptions::new().write(true).create_new(true).mode(mode).open(p))?;
        let mut out = SparseWriter { file, pos: 0 };
        let result = self.fs.read_path(&entry.path, &mut out).and_then(|n| {
            // Trailing zeros were skipped: the length makes them (a hole).
            out.file.set_len(out.pos).map_err(|source| FsError::Output { source })?;
            Ok(n)
        });
        let written = match result {
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
        self.set_meta(&out.file, entry).map_err(|e| FsError::target(dest, e))?;
        self.report.files += 1;
        self.report.bytes += written;
        Ok(())
    }

    fn symlink(&mut self, entry: &Entry, dest: &Path) -> Result<(), FsError> {
        let target = self.fs.read_link_path(&entry.path)?;
        self.create(dest, |p| std::os::unix::fs::symlink(&target, p))?;
        if self.options.restore_owners && (entry.uid.is_some() || entry.gid.is_some()) {
            std::os::unix::fs::lchown(dest, entry.uid, entry.gid).map_err(|e| FsError::target(dest, e))?;
        }
        self.report.symlinks += 1;
        Ok(())
    }

    /// Owner (if asked), times (through the open handle), then the mode, so a read-only
    /// mode cannot get in the way and a `chown` cannot clear a kept setuid bit.
    fn set_meta(&mut self, file: &File, entry: &Entry) -> io::Result<()> {
        if self.options.restore_owners && (entry.uid.is_some() || entry.gid.is_some()) {
            std::os::unix::fs::fchown(file, entry.uid, entry.gid)?;
        }
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
        match entry.mode {
            Some(stored) => {
                let stored = stored & 0o7777;
                let bits = if entry.kind == EntryKind::Dir { RESTRICTED_DIR_BITS } else { RESTRICTED_FILE_BITS };
                let mode = if self.options.keep_special_modes { stored } else { stored & !bits };
                if mode != stored {
                    self.report.modes_restricted += 1;
                }
                file.set_permissions(Permissions::from_mode(mode))?;
            }
            // No stored mode (FAT, NTFS): what it was created with less the umask, and
            // never writable by others (a umask of 000 would give that).
            None => {
                let created = file.metadata()?.mode() & 0o7777;
                if created & 0o002 != 0 {
                    file.set_permissions(Permissions::from_mode(created & !0o002))?;
                }
            }
        }
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

/// Makes sure `dir` is a real directory (not a symlink to one), creating it with `mode`
/// (less the umask) if missing.
fn ensure_dir(dir: &Path, mode: u32) -> Result<(), FsError> {
    match fs::symlink_metadata(dir) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => Err(FsError::TargetNotDirectory { path: dir.to_path_buf() }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => match DirBuilder::new().mode(mode).create(dir) {
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

/// Writes a stream into a new, empty file, leaving all-zero blocks as holes: the
/// caller sets the length to `pos` at the end.
struct SparseWriter {
    file: File,
    /// Bytes of the stream so far (the file's length once done).
    pos: u64,
}

impl Write for SparseWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        // Pieces end at multiples of SPARSE_BLOCK in the file; runs of non-zero pieces
        // go out in one write.
        let mut run: Option<(u64, usize)> = None; // (file offset, start in buf)
        let mut at = 0usize;
        while at < buf.len() {
            let offset = self.pos + at as u64;
            let room = SPARSE_BLOCK - (offset % SPARSE_BLOCK as u64) as usize;
            let end = (at + room).min(buf.len());
            // An OR over the whole piece: no early exit, but it vectorises.
            let zero = buf[at..end].iter().fold(0u8, |acc, &b| acc | b) == 0;
            match (zero, run) {
                (false, None) => run = Some((offset, at)),
                (true, Some((off, start))) => {
                    self.file.write_all_at(&buf[start..at], off)?;
                    run = None;
                }
                _ => {}
            }
            at = end;
        }
        if let Some((off, start)) = run {
            self.file.write_all_at(&buf[start..], off)?;
        }
        self.pos += buf.len() as u64;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a `SparseWriter` makes of `pieces` written one after the other: the file's
    /// bytes and its allocated bytes.
    fn sparse(pieces: &[Vec<u8>]) -> (Vec<u8>, u64) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let mut w = SparseWriter { file: File::create_new(&path).unwrap(), pos: 0 };
        for p in pieces {
            w.write_all(p).unwrap();
        }
        w.file.set_len(w.pos).unwrap();
        w.file.sync_all().unwrap();
        (fs::read(&path).unwrap(), fs::metadata(&path).unwrap().blocks() * 512)
    }

    #[test]
    fn zero_blocks_become_holes_and_the_bytes_stay_exact() {
        let mib = 1 << 20;
        let mut data = vec![0u8; 8 * mib];
        data[3 * mib + 5] = 1; // one non-zero byte in the middle
        data[8 * mib - 1] = 2; // and the very last byte
                               // Pieces that do not line up with blocks.
        let pieces: Vec<Vec<u8>> = data.chunks(100_003).map(<[u8]>::to_vec).collect();
        let (bytes, allocated) = sparse(&pieces);
        assert!(bytes == data);
        assert!(allocated <= 64 << 10, "{allocated} bytes allocated for 8 KiB of data");

        // Trailing zeros are a hole too, and the length is still right.
        let (bytes, allocated) = sparse(&[b"head".to_vec(), vec![0; 4 * mib]]);
        assert_eq!((bytes.len(), &bytes[..4]), (4 * mib + 4, &b"head"[..]));
        assert!(bytes[4..].iter().all(|&b| b == 0));
        assert!(allocated <= 64 << 10, "{allocated}");

        // Data written whole.
        let random: Vec<u8> = (0..300_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8 | 1).collect();
        assert!(sparse(std::slice::from_ref(&random)).0 == random);
    }
}
