//! 32-byte identifiers of blobs and files.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::FormatError;

/// A 32-byte identifier: a keyed BLAKE3 hash for blobs, an unkeyed BLAKE3 hash of the
/// file bytes for pack, index and snapshot files. Shown as 64 lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Id(pub [u8; 32]);

impl Id {
    /// Length in bytes.
    pub const LEN: usize = 32;
    /// The sentinel for an all-zero chunk or page; never the name of a stored object.
    pub const ZERO: Id = Id([0u8; 32]);

    pub fn is_zero(&self) -> bool {
        self.0 == [0u8; 32]
    }

    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// The first 8 hex digits, as shown in tables.
    pub fn short(&self) -> String {
        hex::encode(&self.0[..4])
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Whether `name` is a valid name for a content-named file (key slot, pack, index
    /// file, snapshot): exactly 64 lowercase hex digits. Any other name in those
    /// directories is a stray file, not a blockproof object (docs/FORMAT.md §13).
    pub fn is_file_name(name: &str) -> bool {
        name.len() == 64 && name.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    }
}

impl fmt::Display for Id {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for Id {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Id({})", self.short())
    }
}

impl FromStr for Id {
    type Err = FormatError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut out = [0u8; 32];
        if s.len() != 64 {
            return Err(FormatError::BadId(s.to_string()));
        }
        hex::decode_to_slice(s, &mut out).map_err(|_| FormatError::BadId(s.to_string()))?;
        Ok(Id(out))
    }
}

impl Serialize for Id {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_hex())
    }
}

impl<'de> Deserialize<'de> for Id {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trip() {
        let id = Id([0xab; 32]);
        let s = id.to_hex();
        assert_eq!(s.len(), 64);
        assert_eq!(s.parse::<Id>().unwrap(), id);
        assert_eq!(id.short(), "abababab");
    }

    #[test]
    fn rejects_bad_hex() {
        assert!("xyz".parse::<Id>().is_err());
        assert!("zz".repeat(32).parse::<Id>().is_err());
    }

    #[test]
    fn serde_as_hex_string() {
        let id = Id([1; 32]);
        let j = serde_json::to_string(&id).unwrap();
        assert_eq!(j, format!("\"{}\"", "01".repeat(32)));
        assert_eq!(serde_json::from_str::<Id>(&j).unwrap(), id);
    }

    #[test]
    fn file_names_are_64_lowercase_hex_digits() {
        assert!(Id::is_file_name(&Id([0xab; 32]).to_hex()));
        for stray in
            [".DS_Store", "README", "ab", &"AB".repeat(32), &"ab".repeat(31), &format!("{}.bak", "ab".repeat(32))]
        {
            assert!(!Id::is_file_name(stray), "{stray}");
        }
    }
}
