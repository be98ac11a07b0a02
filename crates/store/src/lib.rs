//! # blockproof-store
//!
//! Where repository files live. The rest of blockproof sees storage only through the
//! small [`Backend`] trait: named, immutable files grouped by [`Kind`]. Encryption,
//! packing and indexing are layers above; a backend stores opaque bytes.
//!
//! ## Durability rules (every backend must keep them)
//!
//! 1. [`Backend::write`] is atomic and durable: when it returns `Ok`, the whole file is
//!    on stable storage under its final name; a crash at any moment leaves either no file
//!    under that name or the complete file, never a prefix. (Local: temporary file in
//!    `tmp/` — written with `O_DIRECT` when it is a pack-sized file, see `direct.rs` —
//!    `fsync`, `rename`, `fsync` of the directory.)
//! 2. Files are immutable. Names of content-addressed kinds are hashes of the content,
//!    so writing an existing name again writes the same bytes and is harmless.
//! 3. Callers order their writes so a reader never sees a reference to a missing file:
//!    packs before the index files that list them, both before the snapshot that uses
//!    them. A crash between steps leaves only unreferenced files, which `check` reports
//!    and garbage collection removes.
//! 4. [`Backend::list`] (and [`Backend::list_sizes`], the same names with their sizes)
//!    returns only complete files (temporary files are invisible).
//!
//! ## Layout of [`LocalBackend`]
//!
//! ```text
//! REPO/config            Kind::Config (single file; the name is ignored)
//! REPO/keys/<name>       Kind::Key
//! REPO/data/<xx>/<name>  Kind::Pack, fanned out by the first two hex digits
//! REPO/index/<name>      Kind::Index
//! REPO/snapshots/<name>  Kind::Snapshot
//! REPO/locks/<name>      Kind::Lock
//! REPO/state/<name>      Kind::State
//! REPO/tmp/              temporary files of writes in progress (safe to delete when
//!                        no blockproof process runs); created by the first write:
//!                        opening a repository writes nothing, so a read-only one opens
//! ```
//!
//! [`relative_path`] gives this layout without the root; object-store backends use it
//! as the object key under their prefix, so a repository directory copied into a bucket
//! (or back) is a valid repository.
//!
//! ## Caching
//!
//! [`ReadCache`] wraps any backend and keeps index files and snapshot manifests in a
//! local directory. Both are immutable and named by the BLAKE3 hash of their bytes, so a
//! cached copy is checked against its name on every read and the cache is disposable.
//!
//! ## Test doubles and the contract (feature `testing`)
//!
//! Built only for this crate's tests and with the `testing` feature, which the other
//! crates enable in their `[dev-dependencies]` alone, so no release build carries them:
//!
//! - `MemoryBackend`: files in memory; a clone is a second handle on the same files, a
//!   `fork` an independent copy.
//! - `FaultyBackend`: wraps any backend and, on the calls a `Calls` chooses (operation,
//!   kind, after N, N times), injects a `Fault`: an error before or after the call
//!   reached the store, a short or bit-flipped read, a delay; or `Faults::crash_after`:
//!   every call after number N fails, as if the process had died there, and the wrapped
//!   store keeps exactly what the first N calls left. Every call is logged.
//! - `contract`: the rules above and the trait's, as one suite every backend must pass
//!   (`contract::check_backend` on an empty store, `contract::check_shared` on two
//!   handles). It runs here against [`LocalBackend`], [`ReadCache`] over it,
//!   `MemoryBackend` and `FaultyBackend` without faults; against S3 on a real Garage node
//!   in the CLI's S3 tests. `crates/core/tests/faults.rs` uses the doubles to prove what a
//!   failing or crashing store leaves of a repository.

mod cache;
#[cfg(any(test, feature = "testing"))]
pub mod contract;
mod direct;
#[cfg(any(test, feature = "testing"))]
mod faulty;
mod local;
#[cfg(any(test, feature = "testing"))]
mod memory;

pub use cache::ReadCache;
#[cfg(any(test, feature = "testing"))]
pub use faulty::{is_injected, Call, Calls, Fault, Faults, FaultyBackend, Op};
pub use local::{create_private_dir_all, LocalBackend};
#[cfg(any(test, feature = "testing"))]
pub use memory::MemoryBackend;

use std::fmt;
use std::path::PathBuf;

/// The kinds of repository files.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    Config,
    Key,
    Pack,
    Index,
    Snapshot,
    Lock,
    /// Small mutable documents: garbage-collection plans, snapshot protection markers.
    State,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Config => "config",
            Kind::Key => "key",
            Kind::Pack => "pack",
            Kind::Index => "index",
            Kind::Snapshot => "snapshot",
            Kind::Lock => "lock",
            Kind::State => "state",
        }
    }

    /// The directory of this kind under the repository root (empty for the config file).
    pub fn dir(self) -> &'static str {
        match self {
            Kind::Config => "",
            Kind::Key => "keys",
            Kind::Pack => "data",
            Kind::Index => "index",
            Kind::Snapshot => "snapshots",
            Kind::Lock => "locks",
            Kind::State => "state",
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Errors of a storage backend.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{kind} {name} not found")]
    NotFound { kind: Kind, name: String },
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{0}")]
    Invalid(String),
    /// A remote store failed (after its retries); the message names the object.
    #[error("{0}")]
    Remote(String),
}

impl StoreError {
    pub fn is_not_found(&self) -> bool {
        matches!(self, StoreError::NotFound { .. })
    }
}

/// The path of a file relative to the repository root (see the layout above). Names
/// are checked so they cannot leave the repository: at least two characters of
/// `[A-Za-z0-9_-]`.
pub fn relative_path(kind: Kind, name: &str) -> Result<String, StoreError> {
    if kind == Kind::Config {
        return Ok("config".into());
    }
    let valid = name.len() >= 2 && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if !valid {
        return Err(StoreError::Invalid(format!("invalid {kind} name {name:?}")));
    }
    Ok(match kind {
        Kind::Pack => format!("{}/{}/{name}", kind.dir(), &name[..2]),
        _ => format!("{}/{name}", kind.dir()),
    })
}

/// Storage of named immutable files, grouped by kind. See the crate doc for the rules.
pub trait Backend: Send + Sync {
    /// A human-readable location (a path or URL) for messages.
    fn location(&self) -> String;
    /// Reads a whole file.
    fn read(&self, kind: Kind, name: &str) -> Result<Vec<u8>, StoreError>;
    /// Reads exactly `buf.len()` bytes at `offset`; a short file is an error.
    fn read_at(&self, kind: Kind, name: &str, offset: u64, buf: &mut [u8]) -> Result<(), StoreError>;
    /// The size of a file in bytes.
    fn size(&self, kind: Kind, name: &str) -> Result<u64, StoreError>;
    /// When a file was last written (its creation, since files are immutable): garbage
    /// collection never deletes a pack younger than the operations that may use it.
    fn modified(&self, kind: Kind, name: &str) -> Result<std::time::SystemTime, StoreError>;
    /// Writes a whole file atomically and durably.
    fn write(&self, kind: Kind, name: &str, data: &[u8]) -> Result<(), StoreError>;
    /// Writes a whole file like [`Backend::write`], taking its buffer. A backend that can
    /// send the bytes without copying them (an object store) keeps the buffer; others
    /// write it and hand it back for reuse.
    fn write_owned(&self, kind: Kind, name: &str, data: Vec<u8>) -> Result<Option<Vec<u8>>, StoreError> {
        self.write(kind, name, &data)?;
        Ok(Some(data))
    }
    /// Names of all complete files of a kind, in no particular order.
    fn list(&self, kind: Kind) -> Result<Vec<String>, StoreError>;
    /// What [`Backend::list`] shows, each name with its file's size. Backup, copy, check
    /// and repair compare pack sizes with what the index says (a missing, truncated or
    /// replaced pack is never deduplicated against); an object store's LIST returns sizes
    /// with the names, a directory reads them from the entries it lists. The default asks
    /// [`Backend::size`] per file (a file removed in between is left out).
    fn list_sizes(&self, kind: Kind) -> Result<Vec<(String, u64)>, StoreError> {
        let mut out = Vec::new();
        for name in self.list(kind)? {
            match self.size(kind, &name) {
                Ok(size) => out.push((name, size)),
                Err(e) if e.is_not_found() => {}
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }
    /// Removes a file; removing a missing file is not an error.
    fn remove(&self, kind: Kind, name: &str) -> Result<(), StoreError>;
    /// Removes temporary files of writes that were interrupted (their writer died) and
    /// are older than `age`; returns how many. Backends without temporary files do nothing.
    fn clean_temporary(&self, age: std::time::Duration) -> Result<u64, StoreError> {
        let _ = age;
        Ok(0)
    }
    /// Ties the store's requests to an operation's cancellation token (the repository's,
    /// [`blockproof_work::Cancel`]): once it is cancelled, requests in flight are abandoned
    /// with its reason instead of finishing their retries, and requests started afterwards
    /// (the cleanup of the failed operation: its lock) are tried once, not retried. A
    /// store that retries for a long time (an object store) also cancels it when a
    /// request gives up, so the operation's other requests stop at once. Stores whose
    /// requests end promptly anyway ignore it.
    fn observe_cancel(&self, cancel: &blockproof_work::Cancel) {
        let _ = cancel;
    }
    /// How many requests are worth running at once: whole-file writes of packs, and
    /// blob reads of a restore (a remote store hides its latency and fills its link with
    /// several; a local disk gains nothing beyond one writer per pack).
    fn parallelism(&self) -> usize {
        1
    }
    /// Whether [`Backend::modified`] of a snapshot is the time a server *received* it,
    /// recorded by the server and beyond the writer's reach (a repository server).
    /// Retention (forget) then judges snapshots by that time, not by the time written
    /// inside them, so a client cannot back-date a snapshot into a retention window.
    fn receipt_times(&self) -> bool {
        false
    }
}
