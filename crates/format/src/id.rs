//! 32-byte identifiers of blobs and files.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::FormatError;

/// A 32-byte identifier: a keyed BLAKE3 hash for blobs, an unkeyed BLAKE3 hash of the
/// file bytes for pack, index and snapshot files. Shown as 64 lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Id(pub [u8; 32]);

/// Ids order as their bytes do (lexicographically), compared eight bytes at a time: the
/// sorted tables and runs of the blob index compare ids millions of times, and a call of
/// `memcmp` per comparison costs more than the comparison.
impl Ord for Id {
    // Inlined across crates: sorts and table walks compare ids millions of times.
    #[inline]
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        let word = |id: &Id, k: usize| u64::from_be_bytes(id.0[k * 8..k * 8 + 8].try_into().expect("8 bytes"));
        (0..4).map(|k| word(self, k).cmp(&word(other, k))).find(|o| o.is_ne()).unwrap_or(std::cmp::Ordering::Equal)
    }
}

impl PartialOrd for Id {
    #[inline]
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

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

/// Sorts `ids` ascending, in place. Ids are keyed hashes, spread evenly: they are first
/// moved into buckets by their top bits (a few per bucket; an in-place radix pass, which
/// needs no second copy of the ids), then each bucket is sorted, which is about three
/// times faster than a comparison sort of the tens of thousands of ids a backup looks up
/// together. Ids that share their top bits (not keyed hashes) still sort, by the
/// comparison sort of their bucket.
pub fn sort_ids(ids: &mut [Id]) {
    if ids.len() < 1024 || ids.len() > u32::MAX as usize {
        ids.sort_unstable();
        return;
    }
    // About 16 ids per bucket: small sorts, and bucket bounds that stay in the cache.
    let bits = (ids.len().next_power_of_two().trailing_zeros() - 4).min(16);
    let bucket = |id: &Id| (u64::from_be_bytes(id.0[..8].try_into().expect("8 bytes")) >> (64 - bits)) as usize;
    let mut ends = vec![0u32; 1 << bits];
    for id in ids.iter() {
        ends[bucket(id)] += 1;
    }
    let mut sum = 0;
    for e in ends.iter_mut() {
        sum += *e;
        *e = sum;
    }
    // heads[b]: the next place of bucket b not yet holding one of its ids.
    let mut heads: Vec<u32> = std::iter::once(0).chain(ends[..ends.len() - 1].iter().copied()).collect();
    for b in 0..ends.len() {
        while heads[b] < ends[b] {
            // Carry the id found here to its bucket, and the one it displaces on, until
            // one belongs here.
            let mut id = ids[heads[b] as usize];
            let mut to = bucket(&id);
            while to != b {
                std::mem::swap(&mut id, &mut ids[heads[to] as usize]);
                heads[to] += 1;
                to = bucket(&id);
            }
            ids[heads[b] as usize] = id;
            heads[b] += 1;
        }
    }
    let mut from = 0;
    for &end in &ends {
        ids[from as usize..end as usize].sort_unstable();
        from = end;
    }
}

#[cfg(test)]
mod tests {
    /// The bucket sort sorts like a comparison sort: spread ids, ids sharing their top
    /// bytes, repeats, and few ids.
    #[test]
    fn ids_sort_in_buckets_as_by_comparison() {
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let mut random = |n: usize, shared: usize| -> Vec<super::Id> {
            (0..n)
                .map(|_| {
                    let mut id = super::Id([0; 32]);
                    id.0.chunks_mut(8).for_each(|c| c.copy_from_slice(&next().to_le_bytes()));
                    id.0[..shared].fill(0x5a);
                    id
                })
                .collect()
        };
        let mut repeated = random(3000, 0);
        repeated.extend(repeated.clone());
        for ids in [random(70_000, 0), random(5000, 3), random(5000, 9), repeated, random(10, 0), Vec::new()] {
            let (mut got, mut want) = (ids.clone(), ids);
            super::sort_ids(&mut got);
            want.sort_unstable();
            assert_eq!(got, want);
        }
    }

    /// The order is the order of the bytes, whichever byte the ids first differ in.
    #[test]
    fn ids_order_as_their_bytes() {
        let mut ids = vec![super::Id::ZERO, super::Id([0xff; 32])];
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for k in 0..32 {
            for v in [0u8, 1, 0x7f, 0x80, 0xfe] {
                let mut id = super::Id([0x42; 32]);
                id.0[k] = v;
                ids.push(id);
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                id.0[(x % 32) as usize] = x as u8;
                ids.push(id);
            }
        }
        for a in &ids {
            for b in &ids {
                assert_eq!(a.cmp(b), a.0.cmp(&b.0), "{a:?} {b:?}");
                assert_eq!(a.partial_cmp(b), Some(a.0.cmp(&b.0)));
            }
        }
    }

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
