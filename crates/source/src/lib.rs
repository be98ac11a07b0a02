//! # blockproof-source
//!
//! Block sources: what a backup reads. A [`BlockSource`] is a fixed-size, random-access,
//! read-only view of one disk at one point in time.
//!
//! ## Invariants
//!
//! - A source is opened read-only, always (seed 004: a backup host must never be able
//!   to write to production volumes). [`RawFile`] opens with `O_RDONLY` and nothing else;
//!   no code path in blockproof asks a source for write access.
//! - `read_at` fills the whole buffer or fails: a short read (the disk shrank under us)
//!   is an error, never silently zero-filled data.
//! - `size` is fixed when the source is opened; a backup never reads past it.

mod raw;

pub use raw::RawFile;

use std::path::PathBuf;

/// Errors of a block source.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("cannot open source {path}: {source}")]
    Open { path: PathBuf, source: std::io::Error },
    #[error("{path} is not a regular file or block device")]
    NotADisk { path: PathBuf },
    #[error("read of {len} bytes at offset {offset} from {what} failed: {source}")]
    Read { what: String, offset: u64, len: usize, source: std::io::Error },
    #[error("read at offset {offset} is past the end of {what} ({size} bytes)")]
    OutOfRange { what: String, offset: u64, size: u64 },
}

/// A read-only disk at one point in time.
pub trait BlockSource: Send + Sync {
    /// Size of the disk in bytes.
    fn size(&self) -> u64;
    /// Fills `buf` with the bytes at `offset`.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), SourceError>;
    /// What it is, for reports and messages (a path or URI).
    fn describe(&self) -> String;
}
