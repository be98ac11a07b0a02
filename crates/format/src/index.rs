//! Index files: which blobs live in which packs.
//!
//! An index file is an [`Envelope`](crate::Envelope) with magic `BPIX` whose plaintext is
//!
//! ```text
//! pack_count u32 | pack_count × ( pack id(32) | count u32 | count × BlobEntry )
//! ```
//!
//! A backup writes one index file for the packs it created, after those packs are
//! durable. Index files are a cache of the pack headers: they can be rebuilt from them.

use crate::pack::{decode_entry_list, BLOB_ENTRY_LEN};
use crate::{BlobEntry, FormatError, Id, Reader};

/// Upper bound on packs in one index file, to bound memory on hostile input.
pub const MAX_PACKS_PER_INDEX: u32 = 1 << 20;

/// The decoded plaintext of an index file.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IndexFile {
    pub packs: Vec<(Id, Vec<BlobEntry>)>,
}

impl IndexFile {
    pub fn encode(&self) -> Vec<u8> {
        let blobs: usize = self.packs.iter().map(|(_, e)| e.len()).sum();
        let mut out = Vec::with_capacity(4 + self.packs.len() * 36 + blobs * BLOB_ENTRY_LEN);
        out.extend_from_slice(&(self.packs.len() as u32).to_le_bytes());
        for (pack, entries) in &self.packs {
            out.extend_from_slice(&pack.0);
            out.extend_from_slice(&(entries.len() as u32).to_le_bytes());
            for e in entries {
                e.encode(&mut out);
            }
        }
        out
    }

    pub fn decode(buf: &[u8]) -> Result<Self, FormatError> {
        let mut r = Reader::new(buf, "index file");
        let n = r.u32()?;
        if n > MAX_PACKS_PER_INDEX || n as usize * 36 > r.remaining() {
            return Err(r.malformed(format!("claims {n} packs")));
        }
        let mut packs = Vec::with_capacity(n as usize);
        for _ in 0..n {
            let id = Id(r.array()?);
            packs.push((id, decode_entry_list(&mut r)?));
        }
        r.finish()?;
        Ok(IndexFile { packs })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{BlobKind, Compression};

    #[test]
    fn round_trip_and_truncation() {
        let e = BlobEntry {
            kind: BlobKind::Data,
            compression: Compression::None,
            id: Id([3; 32]),
            offset: 6,
            length: 1000,
            raw_length: 960,
        };
        let idx = IndexFile { packs: vec![(Id([1; 32]), vec![e, e]), (Id([2; 32]), vec![])] };
        let buf = idx.encode();
        assert_eq!(buf.len(), 4 + 36 * 2 + 2 * BLOB_ENTRY_LEN);
        assert_eq!(IndexFile::decode(&buf).unwrap(), idx);
        for cut in 0..buf.len() {
            assert!(IndexFile::decode(&buf[..cut]).is_err(), "cut at {cut}");
        }
        let mut long = buf.clone();
        long.push(0);
        assert!(IndexFile::decode(&long).is_err());
    }
}
