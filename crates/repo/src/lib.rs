//! # blockproof-repo
//!
//! The repository: everything between the operations (backup, restore, check) and the
//! storage backend. It unlocks the keys, seals and opens blobs, packs them, keeps the
//! blob index, stores fixed index trees and snapshot manifests.
//!
//! ## Model
//!
//! - A **blob** is a chunk of a disk or a page of a fixed index, named by the keyed hash
//!   of its plaintext ([`Keys::blob_id`](blockproof_crypto::Keys::blob_id)), compressed
//!   with the repository's codec (LZ4 or zstd) when that helps, and sealed with its kind
//!   and id as associated data
//!   ([`blob`]).
//! - Blobs are grouped into **packs** of about 16 MiB ([`PackWriter`]): one file per
//!   pack keeps a 2 TiB disk to about 130 000 files (and object stores to a sane number
//!   of requests) while fixed 64 KiB chunks keep incrementals small.
//! - The **blob index** ([`BlobIndex`]) maps every blob id to its pack and offset. It is
//!   the union of the index files, loaded when an operation needs blobs.
//! - A disk's chunk list is a **fixed index tree** ([`tree`]) whose pages are blobs too;
//!   a **snapshot** manifest names each disk's tree root ([`Repository::save_snapshot`]).
//!
//! ## Invariants
//!
//! - Write order is packs → index file → snapshot (each durable before the next), so a
//!   visible snapshot never references a missing blob, whatever moment a crash hits.
//! - Every blob read is authenticated *and* re-hashed against its id before its bytes
//!   are returned ([`BlobReader::read`]): wrong bytes are an error, never data.
//! - Nothing here ever rewrites or deletes an object (that is garbage collection's job),
//!   except what a session wrote itself as it lost its lock: a snapshot is withdrawn, an
//!   index file loses the packs gc deleted meanwhile ([`Repository::write_index_file`]).
//! - One bad file never hides the rest from a reader: stray files (names that are not
//!   object ids) and damaged snapshot and index files are skipped and listed
//!   ([`Repository::scan_snapshots`], [`BlobIndex::scan`]); the strict loaders
//!   ([`Repository::snapshots`], [`BlobIndex::load`]) refuse them, for operations that delete
//!   ([`scan`]).
//! - A key slot that no longer hashes to its name is reported as damaged, never as a wrong
//!   password.
//! - A snapshot file is removed only after a durable forget record names it, and a vm's
//!   head names only committed snapshots ([`heads`]): what a head or a parent reference
//!   names that is neither present nor recorded was removed outside blockproof.

pub mod blob;
mod blob_table;
pub mod heads;
pub mod hooks;
pub mod index;
pub mod index_cache;
pub mod keys;
pub mod lock;
pub mod marks;
mod membership;
pub mod pack_writer;
pub mod repository;
mod run_file;
pub mod scan;
pub mod selector;
mod sorted_ids;
pub mod tree;

pub use blob::{open_blob, BlobCodec, SealedBlob};
pub use heads::{ForgetRecords, Forgotten, Head, Named, Recorded, Removal};
pub use index::{BlobIndex, BlobLocation, BlobReader, IndexBuilder, TableEntry, TableIter};
pub use lock::{time_text, Lock, LockFile, LockInfo, LockKind};
pub use marks::{MarkQueue, Marks};
pub use pack_writer::{PackWriter, PackWriterStats};
pub use repository::{InitOptions, Repository, SnapshotInfo};
pub use scan::{Skipped, SnapshotScan};
pub use tree::{PageSpan, TreeReader, TreeWriter};

use blockproof_crypto::CryptoError;
use blockproof_format::{FormatError, Id};
use blockproof_store::StoreError;

/// Errors of the repository layer.
#[derive(Debug, thiserror::Error)]
pub enum RepoError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("wrong password: no key slot of this repository opens with it")]
    WrongPassword,
    #[error("{what}: {detail}")]
    Corrupt { what: String, detail: String },
    #[error("blob {0} is not in the repository index")]
    MissingBlob(Id),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Invalid(String),
    #[error("key derivation failed: {0}")]
    Kdf(String),
    /// Another process holds a conflicting lock (the message names it).
    #[error("{0}")]
    Locked(String),
    /// This process lost its lock while it worked (see [`lock`]); nothing was committed.
    #[error("{0}")]
    LockLost(String),
    /// The operation was cancelled (the reason: a lost lock, a signal).
    #[error("{0}")]
    Cancelled(String),
    /// A fault of blockproof itself (a thread that panicked): never the user's, exit 1.
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<blockproof_work::WorkError> for RepoError {
    fn from(e: blockproof_work::WorkError) -> Self {
        match e {
            blockproof_work::WorkError::Cancelled(why) => RepoError::Cancelled(why),
            blockproof_work::WorkError::Panicked(what) => RepoError::Internal(what),
        }
    }
}

impl RepoError {
    /// Whether the caller asked for something wrong (an unknown or ambiguous name, an
    /// invalid request) rather than the repository or the system failing.
    pub fn is_usage(&self) -> bool {
        matches!(self, RepoError::NotFound(_) | RepoError::Invalid(_))
    }

    /// Whether the error is damage to one stored file — it could not be read, or failed
    /// its name check, authentication or decoding — rather than the storage failing as a
    /// whole (a remote store unreachable) or a wrong request. Tolerant readers skip such a
    /// file with a warning; garbage collection refuses to run.
    pub fn is_damage(&self) -> bool {
        matches!(self, RepoError::Corrupt { .. } | RepoError::Store(StoreError::Io { .. }))
    }

    pub fn corrupt(what: impl Into<String>, detail: impl std::fmt::Display) -> Self {
        RepoError::Corrupt { what: what.into(), detail: detail.to_string() }
    }
}

impl From<(String, FormatError)> for RepoError {
    fn from((what, e): (String, FormatError)) -> Self {
        RepoError::corrupt(what, e)
    }
}

impl From<(String, CryptoError)> for RepoError {
    fn from((what, e): (String, CryptoError)) -> Self {
        RepoError::corrupt(what, e)
    }
}
