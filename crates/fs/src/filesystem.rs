//! One opened filesystem, whatever its kind.

use std::io::Write;
use std::path::PathBuf;

use crate::entry::{Entry, EntryKind, FsPath};
use crate::error::FsError;
use crate::fs_kind::FsKind;
use crate::window::Window;
use crate::{ext, fat, ntfs};

/// Most entries read from one directory. ext4 and NTFS allow more in theory; a
/// directory this large in a VM's disk is far more likely a damaged (cyclic) one.
pub(crate) const MAX_DIR_ENTRIES: usize = 4 << 20;

/// Bytes copied per read when streaming a file.
pub(crate) const COPY_BUF: usize = 256 << 10;

/// What each filesystem kind implements. Paths are absolute and already parsed.
pub(crate) trait Backend {
    /// The entry at `path`, not following a final symlink.
    fn stat(&self, path: &FsPath) -> Result<Entry, FsError>;
    /// The entries of the directory at `path`, without its own `.` and `..`, in on-disk
    /// order. Names are as stored: a damaged or hostile filesystem may hold one that is
    /// not a plain path component ([`Entry::unsafe_name`]).
    fn list(&self, path: &FsPath) -> Result<Vec<Entry>, FsError>;
    /// Streams the regular file at `path` to `out`; returns the byte count.
    fn read(&self, path: &FsPath, out: &mut dyn Write) -> Result<u64, FsError>;
    /// Reads the regular file at `path` from byte `offset` into `buf`, as far as the file
    /// goes; returns the byte count (0 at or past its end).
    fn read_at(&self, path: &FsPath, offset: u64, buf: &mut [u8]) -> Result<usize, FsError>;
    /// The target of the symlink at `path`, as stored.
    fn read_link(&self, path: &FsPath) -> Result<Vec<u8>, FsError>;
    /// The volume label, if the filesystem has one.
    fn label(&self) -> Option<String>;
}

/// An opened ext2/3/4, FAT12/16/32 or NTFS filesystem, read-only.
///
/// Paths are `/etc/hostname`-style (see [`FsPath::parse`]); FAT and NTFS match names
/// case-insensitively, ext2/3/4 exactly. Not `Send`: `ext4-view` shares its state with
/// `Rc`. Open one per thread.
pub struct Filesystem {
    kind: FsKind,
    backend: Box<dyn Backend>,
}

impl Filesystem {
    pub(crate) fn open(kind: FsKind, window: Window) -> Result<Filesystem, FsError> {
        let backend: Box<dyn Backend> = match kind {
            FsKind::Ext(_) => Box::new(ext::ExtFs::open(kind, window)?),
            FsKind::Fat(_) => Box::new(fat::FatFs::open(kind, window)?),
            FsKind::Ntfs => Box::new(ntfs::NtfsFs::open(window)?),
            FsKind::Other(name) => return Err(FsError::Unsupported { index: 0, what: name.to_string() }),
        };
        Ok(Filesystem { kind, backend })
    }

    pub fn kind(&self) -> FsKind {
        self.kind
    }

    /// The volume label, if the filesystem has one.
    pub fn label(&self) -> Option<String> {
        self.backend.label()
    }

    /// The entry at `path` itself (a final symlink is not followed).
    pub fn stat(&self, path: impl AsRef<[u8]>) -> Result<Entry, FsError> {
        self.backend.stat(&FsPath::parse(path)?)
    }

    /// A directory's entries sorted by name, or, like `ls`, the entry itself when `path`
    /// is not a directory. An entry whose name is not a plain path component (`..`
    /// stored as a name, say) is listed as stored; [`Entry::unsafe_name`] tells.
    pub fn list(&self, path: impl AsRef<[u8]>) -> Result<Vec<Entry>, FsError> {
        let path = FsPath::parse(path)?;
        let entry = self.backend.stat(&path)?;
        if entry.kind != EntryKind::Dir {
            return Ok(vec![entry]);
        }
        let mut entries = self.list_dir(&path)?;
        entries.sort_by(|a, b| a.path.file_name().cmp(b.path.file_name()));
        Ok(entries)
    }

    /// The entries of the directory at `path`, unsorted.
    pub(crate) fn list_dir(&self, path: &FsPath) -> Result<Vec<Entry>, FsError> {
        self.backend.list(path)
    }

    /// Streams the regular file at `path` (symlinks followed on ext2/3/4) to `out`,
    /// a buffer at a time; returns the number of bytes written.
    pub fn read(&self, path: impl AsRef<[u8]>, out: &mut dyn Write) -> Result<u64, FsError> {
        self.backend.read(&FsPath::parse(path)?, out)
    }

    /// Reads the regular file at `path` (symlinks followed on ext2/3/4) from byte `offset`
    /// into `buf`: the whole buffer unless the file ends first. Returns the byte count, 0
    /// at or past the end. For random access (a FUSE mount); [`read`](Self::read) streams.
    pub fn read_at(&self, path: impl AsRef<[u8]>, offset: u64, buf: &mut [u8]) -> Result<usize, FsError> {
        self.backend.read_at(&FsPath::parse(path)?, offset, buf)
    }

    pub(crate) fn read_path(&self, path: &FsPath, out: &mut dyn Write) -> Result<u64, FsError> {
        self.backend.read(path, out)
    }

    /// The target of the symlink at `path`, as stored (it may be absolute or contain
    /// `..`: it is data, never followed outside the filesystem).
    pub fn read_link(&self, path: impl AsRef<[u8]>) -> Result<PathBuf, FsError> {
        self.read_link_path(&FsPath::parse(path)?)
    }

    pub(crate) fn read_link_path(&self, path: &FsPath) -> Result<PathBuf, FsError> {
        use std::os::unix::ffi::OsStringExt;
        Ok(PathBuf::from(std::ffi::OsString::from_vec(self.backend.read_link(path)?)))
    }
}

impl std::fmt::Debug for Filesystem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Filesystem").field("kind", &self.kind).finish()
    }
}

/// Fills `buf` from `read` until it is full or `read` returns 0; returns the byte count.
pub(crate) fn fill(
    buf: &mut [u8],
    mut read: impl FnMut(&mut [u8]) -> Result<usize, FsError>,
) -> Result<usize, FsError> {
    let mut done = 0;
    while done < buf.len() {
        match read(&mut buf[done..])? {
            0 => break,
            n => done += n,
        }
    }
    Ok(done)
}

/// Copies what `read` yields to `out` through a bounded buffer until `read` returns 0.
/// A failed write is [`FsError::Output`].
pub(crate) fn copy_stream(
    mut read: impl FnMut(&mut [u8]) -> Result<usize, FsError>,
    out: &mut dyn Write,
) -> Result<u64, FsError> {
    let mut buf = vec![0u8; COPY_BUF];
    let mut total = 0u64;
    loop {
        let n = read(&mut buf)?;
        if n == 0 {
            return Ok(total);
        }
        out.write_all(&buf[..n]).map_err(|source| FsError::Output { source })?;
        total += n as u64;
    }
}
