//! # blockproof-format
//!
//! The byte-level formats of a blockproof repository, and nothing else: no I/O, no
//! cryptography. `docs/FORMAT.md` is the normative specification; every magic number,
//! version and layout constant it names is defined here and pinned by tests.
//!
//! ## Model
//!
//! A repository stores four kinds of encrypted objects and one plaintext kind:
//!
//! | object     | file name            | content                                          |
//! |------------|----------------------|--------------------------------------------------|
//! | key slot   | `keys/<hex id>`      | plaintext header + master secret wrapped by Argon2id |
//! | config     | `config`             | plaintext repository id + encrypted [`RepoConfig`] |
//! | pack       | `data/<xx>/<hex id>` | encrypted blobs + encrypted pack header          |
//! | index      | `index/<hex id>`     | encrypted list of the blobs in some packs        |
//! | snapshot   | `snapshots/<hex id>` | encrypted [`Snapshot`] manifest (JSON)           |
//!
//! Blobs are either *data* blobs (one disk chunk) or *tree* blobs (one page of a fixed
//! index, see [`tree`]). A blob is named by the keyed BLAKE3 hash of its plaintext.
//! Pack, index and snapshot files are named by the (unkeyed) BLAKE3 hash of their bytes,
//! so their integrity can be checked without the key.
//!
//! ## Invariants
//!
//! - Every file starts with a 4-byte magic and a little-endian `u16` format version;
//!   readers reject unknown magics and versions with [`FormatError`], never a panic.
//! - Decoders take untrusted bytes: every length is bounds-checked.
//! - The all-zero id [`Id::ZERO`] is never the name of a stored blob: in a fixed index it
//!   means "this chunk (or this whole subtree) is zeros".

pub mod basis;
pub mod config;
pub mod confirm;
pub mod envelope;
pub mod id;
pub mod index;
pub mod keyslot;
pub mod manifest;
pub mod pack;
pub mod tree;

pub use config::{Codec, RepoConfig, RepoHeader};
pub use envelope::{Envelope, ObjectMagic};
pub use id::Id;
pub use index::IndexFile;
pub use keyslot::{KdfParams, KeySlot};
pub use manifest::{Consistency, DiskEntry, Machine, MachineKind, Snapshot, SnapshotStatus};
pub use pack::{BlobEntry, BlobKind, Compression};

/// The newest repository format version this build reads; new repositories get it.
/// It is written in the config file's header and settings. Version 2 added LZ4 blobs and
/// the `compression` setting; version 3 the coverage fields of manifests that say what a
/// verification bound rests on; version 4 the `machine` of a running VM's manifests. None
/// changed a byte layout.
pub const FORMAT_VERSION: u16 = 4;
/// The oldest repository format version this build reads (and writes into).
pub const MIN_FORMAT_VERSION: u16 = 1;
/// The version in the header of every file but the config: the format version that
/// introduced the byte layouts in use (a file's header names its layout, the config names
/// the repository's version).
pub const LAYOUT_VERSION: u16 = 1;

/// Length of the nonce of both AEADs (XChaCha20-Poly1305 and XAES-256-GCM).
pub const NONCE_LEN: usize = 24;
/// Length of the Poly1305 tag.
pub const TAG_LEN: usize = 16;
/// Bytes an AEAD seal adds to a plaintext: nonce in front, tag behind.
pub const SEAL_OVERHEAD: usize = NONCE_LEN + TAG_LEN;

/// Errors while decoding untrusted bytes.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FormatError {
    #[error("not a blockproof {what} (bad magic)")]
    BadMagic { what: &'static str },
    /// `readable`: the versions this build reads in that kind of file (the repository
    /// versions for the config, the layout version for every other file).
    #[error("unsupported {what} format version {version} (this build reads {})", versions(readable))]
    UnsupportedVersion { what: &'static str, version: u16, readable: std::ops::RangeInclusive<u16> },
    #[error("truncated {what}: needed {needed} bytes, have {have}")]
    Truncated { what: &'static str, needed: usize, have: usize },
    #[error("malformed {what}: {detail}")]
    Malformed { what: &'static str, detail: String },
    #[error("invalid id {0:?}: expected 64 hexadecimal digits")]
    BadId(String),
}

fn versions(r: &std::ops::RangeInclusive<u16>) -> String {
    if r.start() == r.end() {
        format!("version {}", r.start())
    } else {
        format!("versions {} to {}", r.start(), r.end())
    }
}

/// A bounds-checked little-endian reader over untrusted bytes.
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    what: &'static str,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(buf: &'a [u8], what: &'static str) -> Self {
        Reader { buf, pos: 0, what }
    }

    pub(crate) fn take(&mut self, n: usize) -> Result<&'a [u8], FormatError> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.buf.len()).ok_or(FormatError::Truncated {
            what: self.what,
            needed: self.pos.saturating_add(n),
            have: self.buf.len(),
        })?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    pub(crate) fn array<const N: usize>(&mut self) -> Result<[u8; N], FormatError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }

    pub(crate) fn u8(&mut self) -> Result<u8, FormatError> {
        Ok(self.take(1)?[0])
    }

    pub(crate) fn u16(&mut self) -> Result<u16, FormatError> {
        Ok(u16::from_le_bytes(self.array()?))
    }

    pub(crate) fn u32(&mut self) -> Result<u32, FormatError> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    pub(crate) fn u64(&mut self) -> Result<u64, FormatError> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    pub(crate) fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    pub(crate) fn finish(&self) -> Result<(), FormatError> {
        if self.remaining() == 0 {
            Ok(())
        } else {
            Err(FormatError::Malformed { what: self.what, detail: format!("{} trailing bytes", self.remaining()) })
        }
    }

    pub(crate) fn malformed(&self, detail: impl Into<String>) -> FormatError {
        FormatError::Malformed { what: self.what, detail: detail.into() }
    }
}
