//! Typed errors: every message is one line, naming the path, partition or offset.

use std::io;
use std::path::PathBuf;

use thiserror::Error;

/// What can go wrong finding, reading or extracting files.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum FsError {
    /// The disk itself could not be read (past its end, a damaged backup, I/O).
    #[error("reading the disk at byte {offset}: {source}")]
    Read {
        offset: u64,
        #[source]
        source: io::Error,
    },
    /// Neither a partition table nor a filesystem on the whole disk.
    #[error("no partition table and no filesystem found on the disk")]
    NoFilesystem,
    /// A partition table that claims to be one but cannot be trusted.
    #[error("damaged partition table: {0}")]
    PartitionTable(String),
    /// `--partition N` names no partition of this disk.
    #[error("no partition {index} on this disk (it has: {available})")]
    NoSuchPartition { index: u32, available: String },
    /// Several filesystems and no choice made.
    #[error("the disk has {count} filesystems ({available}); choose one by its partition number")]
    Ambiguous { count: usize, available: String },
    /// No partition holds a filesystem this crate can read.
    #[error("no readable filesystem on the disk (it has: {available}); readable: ext2/3/4, FAT12/16/32, NTFS")]
    NoReadableFilesystem { available: String },
    /// A partition whose content this crate cannot read.
    #[error("partition {index} holds {what}, which cannot be read (readable: ext2/3/4, FAT12/16/32, NTFS)")]
    Unsupported { index: u32, what: String },
    /// The filesystem's own structures are damaged or use something unsupported.
    #[error("{fs} filesystem: {detail}")]
    Corrupt { fs: String, detail: String },
    #[error("{path}: no such file or directory")]
    NotFound { path: String },
    #[error("{path}: not a directory")]
    NotADirectory { path: String },
    #[error("{path}: is a directory")]
    IsADirectory { path: String },
    #[error("{path}: not a regular file")]
    NotAFile { path: String },
    /// A path argument that is not a plain path inside the filesystem.
    #[error("invalid path {path:?}: {reason}")]
    InvalidPath { path: String, reason: &'static str },
    /// Directories nested implausibly deep (a directory cycle in a damaged filesystem).
    #[error("{path}: directories nested deeper than {limit}; the filesystem is probably damaged")]
    TooDeep { path: String, limit: usize },
    /// Implausibly many entries in one directory (a cycle in a damaged filesystem).
    #[error("{path}: more than {limit} entries in one directory; the filesystem is probably damaged")]
    TooManyEntries { path: String, limit: usize },
    /// The extraction target already has a file of that name.
    #[error("{}: already exists, not replaced (--force replaces existing files)", path.display())]
    TargetExists { path: PathBuf },
    /// Something other than a directory (a symlink, a file) where a directory must be.
    #[error("{}: exists and is not a directory; refusing to write through it", path.display())]
    TargetNotDirectory { path: PathBuf },
    /// Writing a file's bytes to the caller's writer failed.
    #[error("writing the output: {source}")]
    Output {
        #[source]
        source: io::Error,
    },
    /// Writing the extraction target failed.
    #[error("writing {}: {source}", path.display())]
    Target {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl FsError {
    /// True when the error is the caller's: an unknown partition or path, a directory
    /// where a file was asked for, a bad path, something in the target's way. blockproof maps these
    /// to exit code 2; everything else (damage, I/O) is 1.
    pub fn is_usage(&self) -> bool {
        matches!(
            self,
            FsError::NoSuchPartition { .. }
                | FsError::Ambiguous { .. }
                | FsError::NotFound { .. }
                | FsError::NotADirectory { .. }
                | FsError::IsADirectory { .. }
                | FsError::NotAFile { .. }
                | FsError::InvalidPath { .. }
                | FsError::TargetExists { .. }
                | FsError::TargetNotDirectory { .. }
        )
    }

    /// Classifies an I/O error that came out of a filesystem crate: a failed read of the
    /// disk (carried as [`DiskRead`]) stays a read error, anything else is the
    /// filesystem's damage.
    pub(crate) fn from_io(fs: &str, err: io::Error) -> FsError {
        match DiskRead::take(err) {
            Ok(read) => read.into(),
            Err(err) => FsError::corrupt(fs, err),
        }
    }

    /// Like [`FsError::from_io`] for a boxed error (ext4-view's reader errors).
    pub(crate) fn from_boxed(fs: &str, err: Box<dyn std::error::Error + Send + Sync>) -> FsError {
        match err.downcast::<DiskRead>() {
            Ok(read) => (*read).into(),
            Err(err) => match err.downcast::<io::Error>() {
                Ok(io) => FsError::from_io(fs, *io),
                Err(other) => FsError::corrupt(fs, other),
            },
        }
    }

    pub(crate) fn corrupt(fs: &str, detail: impl std::fmt::Display) -> FsError {
        FsError::Corrupt { fs: fs.to_string(), detail: detail.to_string().replace('\n', " ") }
    }

    pub(crate) fn target(path: impl Into<PathBuf>, source: io::Error) -> FsError {
        FsError::Target { path: path.into(), source }
    }
}

/// A failed read of the underlying disk, travelling through a filesystem crate's
/// `io::Error` so it can be told apart from the crate's own complaints.
#[derive(Debug, Error)]
#[error("reading {len} bytes of the disk at byte {offset}: {source}")]
pub(crate) struct DiskRead {
    pub offset: u64,
    pub len: usize,
    #[source]
    pub source: io::Error,
}

impl DiskRead {
    pub fn into_io(self) -> io::Error {
        io::Error::new(self.source.kind(), self)
    }

    /// The `DiskRead` inside `err`, or `err` back.
    fn take(err: io::Error) -> Result<DiskRead, io::Error> {
        if !err.get_ref().is_some_and(|e| e.is::<DiskRead>()) {
            return Err(err);
        }
        let kind = err.kind();
        match err.into_inner().map(|inner| inner.downcast::<DiskRead>()) {
            Some(Ok(read)) => Ok(*read),
            Some(Err(other)) => Err(io::Error::new(kind, other)),
            None => Err(io::Error::from(kind)),
        }
    }
}

impl From<DiskRead> for FsError {
    fn from(read: DiskRead) -> FsError {
        FsError::Read { offset: read.offset, source: read.source }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_reads_survive_the_trip_through_io_errors() {
        let read = DiskRead { offset: 4096, len: 512, source: io::Error::other("gone") };
        match FsError::from_io("FAT", read.into_io()) {
            FsError::Read { offset: 4096, source } => assert_eq!(source.to_string(), "gone"),
            other => panic!("{other:?}"),
        }
        match FsError::from_io("FAT", io::Error::new(io::ErrorKind::InvalidData, "bad cluster")) {
            FsError::Corrupt { fs, detail } => assert_eq!((fs.as_str(), detail.as_str()), ("FAT", "bad cluster")),
            other => panic!("{other:?}"),
        }
        let boxed: Box<dyn std::error::Error + Send + Sync> =
            Box::new(DiskRead { offset: 1, len: 1, source: io::Error::other("x") });
        assert!(matches!(FsError::from_boxed("ext4", boxed), FsError::Read { offset: 1, .. }));
    }

    #[test]
    fn usage_errors_are_the_callers() {
        assert!(FsError::NotFound { path: "/x".into() }.is_usage());
        assert!(!FsError::corrupt("NTFS", "bad record").is_usage());
        assert!(!FsError::NoFilesystem.is_usage());
    }
}
