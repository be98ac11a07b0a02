//! The repository config file: the plaintext repository id and the encrypted settings.
//!
//! ```text
//! "BPRC" | version u16 | repository id(32) | nonce(24) | ciphertext | tag(16)
//! ```
//!
//! The AD of the seal is the 38 bytes before the nonce. The plaintext is the JSON of
//! [`RepoConfig`].

use serde::{Deserialize, Serialize};

use crate::{FormatError, Id, ObjectMagic, SEAL_OVERHEAD};

/// Bytes of the config file before the sealed settings.
pub const CONFIG_AD_LEN: usize = 6 + 32;

/// Default chunk size (see docs/BENCHMARKS.md for the measurement behind it).
pub const DEFAULT_CHUNK_SIZE: u32 = 64 * 1024;
/// Default target size of a pack file.
pub const DEFAULT_PACK_SIZE: u32 = 16 * 1024 * 1024;
/// Default zstd level.
pub const DEFAULT_ZSTD_LEVEL: i32 = 1;
/// Chunk sizes accepted: powers of two from 4 KiB to 4 MiB.
pub const MIN_CHUNK_SIZE: u32 = 4 * 1024;
pub const MAX_CHUNK_SIZE: u32 = 4 * 1024 * 1024;

/// Repository-wide settings, fixed at `init`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RepoConfig {
    /// Format version of the repository as a whole.
    pub version: u16,
    /// Chunk size in bytes for new disks (a power of two).
    pub chunk_size: u32,
    /// Pack files are closed once they reach this many bytes.
    pub pack_size: u32,
    /// zstd level used for new blobs.
    pub zstd_level: i32,
    /// RFC 3339 creation time.
    pub created: String,
}

impl RepoConfig {
    pub fn validate(&self) -> Result<(), FormatError> {
        if self.version != crate::FORMAT_VERSION {
            return Err(FormatError::Malformed {
                what: "repository config",
                detail: format!(
                    "format version {} (this blockproof reads version {})",
                    self.version,
                    crate::FORMAT_VERSION
                ),
            });
        }
        let cs = self.chunk_size;
        if !cs.is_power_of_two() || !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&cs) {
            return Err(FormatError::Malformed { what: "repository config", detail: format!("chunk size {cs}") });
        }
        if self.pack_size < cs {
            return Err(FormatError::Malformed {
                what: "repository config",
                detail: format!("pack size {}", self.pack_size),
            });
        }
        Ok(())
    }
}

/// The plaintext part of the config file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RepoHeader {
    pub repo_id: Id,
}

impl RepoHeader {
    /// The AD of the sealed settings: magic, version and repository id.
    pub fn ad(&self) -> [u8; CONFIG_AD_LEN] {
        let mut out = [0u8; CONFIG_AD_LEN];
        out[..6].copy_from_slice(&ObjectMagic::Config.header());
        out[6..].copy_from_slice(&self.repo_id.0);
        out
    }

    pub fn encode(&self, sealed: &[u8]) -> Vec<u8> {
        let mut out = self.ad().to_vec();
        out.extend_from_slice(sealed);
        out
    }

    /// Returns the header and the sealed settings.
    pub fn decode(buf: &[u8]) -> Result<(Self, &[u8]), FormatError> {
        let rest = ObjectMagic::Config.check(buf)?;
        if rest.len() < 32 + SEAL_OVERHEAD {
            return Err(FormatError::Truncated {
                what: "repository config",
                needed: CONFIG_AD_LEN + SEAL_OVERHEAD,
                have: buf.len(),
            });
        }
        let mut id = [0u8; 32];
        id.copy_from_slice(&rest[..32]);
        Ok((RepoHeader { repo_id: Id(id) }, &rest[32..]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trip() {
        let h = RepoHeader { repo_id: Id([4; 32]) };
        let f = h.encode(&[0u8; 50]);
        assert_eq!(&f[..6], b"BPRC\x01\x00");
        let (h2, sealed) = RepoHeader::decode(&f).unwrap();
        assert_eq!(h2, h);
        assert_eq!(sealed.len(), 50);
        assert!(RepoHeader::decode(&f[..60]).is_err());
    }

    #[test]
    fn validates_chunk_size() {
        let mut c = RepoConfig {
            version: 1,
            chunk_size: DEFAULT_CHUNK_SIZE,
            pack_size: DEFAULT_PACK_SIZE,
            zstd_level: 1,
            created: "2026-11-22T00:00:00Z".into(),
        };
        assert!(c.validate().is_ok());
        c.chunk_size = 3000;
        assert!(c.validate().is_err());
        c.chunk_size = 8 * 1024 * 1024;
        assert!(c.validate().is_err());
    }
}
