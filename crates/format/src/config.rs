//! The repository config file: the plaintext repository id and the encrypted settings.
//!
//! ```text
//! "BPRC" | version u16 | repository id(32) | nonce(24) | ciphertext | tag(16)
//! ```
//!
//! The AD of the seal is the 38 bytes before the nonce. The plaintext is the JSON of
//! [`RepoConfig`]. The header's version is the repository's format version (1 to 3) and
//! must equal the settings' `version`: a build that does not know it refuses the
//! repository before reading anything else.

use serde::{Deserialize, Serialize};

use crate::{FormatError, Id, ObjectMagic, SEAL_OVERHEAD};

/// Bytes of the config file before the sealed settings.
pub const CONFIG_AD_LEN: usize = 6 + 32;

/// Default chunk size (see docs/BENCHMARKS.md for the measurement behind it).
pub const DEFAULT_CHUNK_SIZE: u32 = 64 * 1024;
/// Default target size of a pack file.
pub const DEFAULT_PACK_SIZE: u32 = 16 * 1024 * 1024;
/// Default zstd level (for repositories whose codec is zstd).
pub const DEFAULT_ZSTD_LEVEL: i32 = 1;
/// zstd levels accepted in the settings (negative levels are zstd's "fast" levels).
pub const ZSTD_LEVELS: std::ops::RangeInclusive<i32> = -7..=22;

/// The compressor a repository uses for new blobs. Blobs that do not shrink by 1/32 are
/// stored uncompressed whatever the codec; readers accept every codec in every blob.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Codec {
    /// zstd at the settings' `zstd_level` (the only codec of version 1 repositories,
    /// whose settings have no `compression` field).
    #[default]
    Zstd,
    /// LZ4 block format (version 2): about twice zstd -1's speed for a larger output.
    Lz4,
}
/// Chunk sizes accepted: powers of two from 4 KiB to 4 MiB.
pub const MIN_CHUNK_SIZE: u32 = 4 * 1024;
pub const MAX_CHUNK_SIZE: u32 = 4 * 1024 * 1024;

/// Repository-wide settings, fixed at `init`. Read strictly: an unknown field is an
/// error, and every field but `compression` is required.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RepoConfig {
    /// Format version of the repository as a whole.
    pub version: u16,
    /// Chunk size in bytes for new disks (a power of two).
    pub chunk_size: u32,
    /// Pack files are closed once they reach this many bytes.
    pub pack_size: u32,
    /// zstd level used for new blobs when the codec is zstd.
    pub zstd_level: i32,
    /// Codec of new blobs (version 2; absent in version 1 settings, which mean zstd).
    #[serde(default, skip_serializing_if = "is_zstd")]
    pub compression: Codec,
    /// RFC 3339 creation time.
    pub created: String,
}

fn is_zstd(c: &Codec) -> bool {
    *c == Codec::Zstd
}

impl Codec {
    /// Parses the textual setting `lz4`, `zstd` (level [`DEFAULT_ZSTD_LEVEL`]) or
    /// `zstd:LEVEL` (within [`ZSTD_LEVELS`]) into a codec and the zstd level to record.
    pub fn parse_setting(s: &str) -> Option<(Codec, i32)> {
        match s.split_once(':') {
            None if s == "lz4" => Some((Codec::Lz4, DEFAULT_ZSTD_LEVEL)),
            None if s == "zstd" => Some((Codec::Zstd, DEFAULT_ZSTD_LEVEL)),
            Some(("zstd", level)) => level.parse().ok().filter(|l| ZSTD_LEVELS.contains(l)).map(|l| (Codec::Zstd, l)),
            _ => None,
        }
    }
}

impl RepoConfig {
    /// The compression as [`Codec::parse_setting`] reads it: `lz4` or `zstd:LEVEL`.
    pub fn compression_setting(&self) -> String {
        match self.compression {
            Codec::Lz4 => "lz4".into(),
            Codec::Zstd => format!("zstd:{}", self.zstd_level),
        }
    }

    pub fn validate(&self) -> Result<(), FormatError> {
        let malformed = |detail: String| FormatError::Malformed { what: "repository config", detail };
        if !(crate::MIN_FORMAT_VERSION..=crate::FORMAT_VERSION).contains(&self.version) {
            return Err(malformed(format!(
                "format version {} (this blockproof reads versions {} to {})",
                self.version,
                crate::MIN_FORMAT_VERSION,
                crate::FORMAT_VERSION
            )));
        }
        if self.version < 2 && self.compression != Codec::Zstd {
            return Err(malformed(format!(
                "{:?} compression in a version {} repository",
                self.compression, self.version
            )));
        }
        if !ZSTD_LEVELS.contains(&self.zstd_level) {
            return Err(malformed(format!("zstd level {}", self.zstd_level)));
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
    /// The repository's format version (equal to the settings' `version`).
    pub version: u16,
}

impl RepoHeader {
    /// The AD of the sealed settings: magic, version and repository id.
    pub fn ad(&self) -> [u8; CONFIG_AD_LEN] {
        let mut out = [0u8; CONFIG_AD_LEN];
        out[..6].copy_from_slice(&ObjectMagic::Config.header_with(self.version));
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
        let (version, rest) = ObjectMagic::Config.check_version(buf)?;
        if rest.len() < 32 + SEAL_OVERHEAD {
            return Err(FormatError::Truncated {
                what: "repository config",
                needed: CONFIG_AD_LEN + SEAL_OVERHEAD,
                have: buf.len(),
            });
        }
        let mut id = [0u8; 32];
        id.copy_from_slice(&rest[..32]);
        Ok((RepoHeader { repo_id: Id(id), version }, &rest[32..]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trip() {
        let h = RepoHeader { repo_id: Id([4; 32]), version: 2 };
        let f = h.encode(&[0u8; 50]);
        assert_eq!(&f[..6], b"BPRC\x02\x00");
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
            compression: Codec::Zstd,
            created: "2026-11-22T00:00:00Z".into(),
        };
        assert!(c.validate().is_ok());
        c.compression = Codec::Lz4;
        assert!(c.validate().is_err(), "LZ4 needs version 2");
        c.version = 2;
        assert!(c.validate().is_ok());
        c.version = 3;
        assert!(c.validate().is_ok());
        c.version = 4;
        assert!(c.validate().is_ok());
        c.version = 5;
        assert!(c.validate().is_err());
        c.version = 1;
        c.compression = Codec::Zstd;
        for (level, ok) in [(-7, true), (22, true), (-8, false), (23, false)] {
            c.zstd_level = level;
            assert_eq!(c.validate().is_ok(), ok, "zstd level {level}");
        }
        c.zstd_level = 1;
        c.chunk_size = 3000;
        assert!(c.validate().is_err());
        c.chunk_size = 8 * 1024 * 1024;
        assert!(c.validate().is_err());
    }

    #[test]
    fn version_1_settings_mean_zstd_and_lz4_is_spelled_out() {
        let v1 = r#"{"version":1,"chunk_size":65536,"pack_size":16777216,"zstd_level":1,"created":"x"}"#;
        let c: RepoConfig = serde_json::from_str(v1).unwrap();
        assert_eq!(c.compression, Codec::Zstd);
        assert_eq!(serde_json::to_string(&c).unwrap(), v1, "a version 1 config re-encodes unchanged");
        let v2 = RepoConfig { version: 2, compression: Codec::Lz4, ..c };
        assert!(serde_json::to_string(&v2).unwrap().contains(r#""compression":"lz4""#));
    }

    #[test]
    fn settings_are_read_strictly() {
        let v1 = r#"{"version":1,"chunk_size":65536,"pack_size":16777216,"zstd_level":1,"created":"x"}"#;
        assert!(serde_json::from_str::<RepoConfig>(v1).is_ok());
        // An unknown field (here a misspelled `compression`) is an error naming it.
        let typo = v1.replace(r#""created""#, r#""compresion":"lz4","created""#);
        let err = serde_json::from_str::<RepoConfig>(&typo).unwrap_err().to_string();
        assert!(err.contains("unknown field `compresion`"), "{err}");
        // Every field but `compression` is required.
        for field in ["version", "chunk_size", "pack_size", "zstd_level", "created"] {
            let mut j: serde_json::Value = serde_json::from_str(v1).unwrap();
            j.as_object_mut().unwrap().remove(field);
            let err = serde_json::from_value::<RepoConfig>(j).unwrap_err().to_string();
            assert!(err.contains(&format!("missing field `{field}`")), "{err}");
        }
        let bad_codec = v1.replace(r#""created""#, r#""compression":"gzip","created""#);
        assert!(serde_json::from_str::<RepoConfig>(&bad_codec).is_err());
    }

    #[test]
    fn compression_settings_round_trip() {
        for text in ["lz4", "zstd:1", "zstd:-7", "zstd:22"] {
            let (compression, zstd_level) = Codec::parse_setting(text).unwrap();
            let c = RepoConfig {
                version: 2,
                chunk_size: DEFAULT_CHUNK_SIZE,
                pack_size: DEFAULT_PACK_SIZE,
                zstd_level,
                compression,
                created: String::new(),
            };
            assert_eq!(c.compression_setting(), text);
        }
        assert_eq!(Codec::parse_setting("zstd"), Some((Codec::Zstd, DEFAULT_ZSTD_LEVEL)));
        for bad in ["gzip", "zstd:23", "zstd:x", "lz4:1", "", "ZSTD"] {
            assert_eq!(Codec::parse_setting(bad), None, "{bad:?}");
        }
    }
}
