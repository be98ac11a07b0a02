//! Pack files: many sealed blobs in one file, with a sealed table of contents at the end.
//!
//! ```text
//! "BPPK" | version u16
//! blob*           each: nonce(24) | ciphertext | tag(16); AD = kind u8 | blob id(32)
//! pack header     nonce(24) | ciphertext | tag(16);       AD = "BPPK" | version u16
//!                 plaintext: count u32 | count × BlobEntry (50 bytes each)
//! header length   u32, the sealed pack header's length
//! ```
//!
//! The pack header makes every pack self-describing, so the index files can be rebuilt
//! from the packs alone.

use crate::{FormatError, Id, Reader, SEAL_OVERHEAD};

/// Bytes of one encoded [`BlobEntry`].
pub const BLOB_ENTRY_LEN: usize = 50;
/// Bytes of the pack file header (magic and version).
pub const PACK_HEADER_LEN: usize = 6;
/// Bytes of the trailing length field.
pub const PACK_TRAILER_LEN: usize = 4;
/// Upper bound on blobs in one pack, to bound memory when decoding untrusted headers.
pub const MAX_BLOBS_PER_PACK: u32 = 1 << 20;

/// What a blob holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BlobKind {
    /// One chunk of a disk.
    Data = 0,
    /// One page of a fixed index.
    Tree = 1,
    /// One page of a disk's confirmation state ([`crate::confirm`]).
    Confirm = 2,
}

impl BlobKind {
    pub fn from_u8(v: u8) -> Option<Self> {
        match v {
            0 => Some(BlobKind::Data),
            1 => Some(BlobKind::Tree),
            2 => Some(BlobKind::Confirm),
            _ => None,
        }
    }
}

/// How a blob's plaintext was compressed before sealing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Compression {
    None = 0,
    Zstd = 1,
    /// LZ4 block format (no frame, no size prefix: the entry's `raw_length` is the
    /// output size). Format version 2 and later.
    Lz4 = 2,
}

impl Compression {
    pub fn from_u8(v: u8) -> Option<Self> {
        match v {
            0 => Some(Compression::None),
            1 => Some(Compression::Zstd),
            2 => Some(Compression::Lz4),
            _ => None,
        }
    }
}

/// The associated data a blob is sealed with: its kind and its id. A blob moved to
/// another id, or a data blob passed off as a tree page, fails authentication.
pub fn blob_ad(kind: BlobKind, id: &Id) -> [u8; 33] {
    let mut ad = [0u8; 33];
    ad[0] = kind as u8;
    ad[1..].copy_from_slice(&id.0);
    ad
}

/// Where a blob lives inside its pack and how to decode it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct BlobEntry {
    pub kind: BlobKind,
    pub compression: Compression,
    pub id: Id,
    /// Offset of the sealed blob from the start of the pack file.
    pub offset: u64,
    /// Length of the sealed blob (nonce, ciphertext and tag).
    pub length: u32,
    /// Length of the plaintext after decompression.
    pub raw_length: u32,
}

impl BlobEntry {
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.push(self.kind as u8);
        out.push(self.compression as u8);
        out.extend_from_slice(&self.id.0);
        out.extend_from_slice(&self.offset.to_le_bytes());
        out.extend_from_slice(&self.length.to_le_bytes());
        out.extend_from_slice(&self.raw_length.to_le_bytes());
    }

    pub(crate) fn decode(r: &mut Reader<'_>) -> Result<Self, FormatError> {
        let kind = r.u8()?;
        let kind = BlobKind::from_u8(kind).ok_or_else(|| r.malformed(format!("unknown blob kind {kind}")))?;
        let compression = r.u8()?;
        let compression = Compression::from_u8(compression)
            .ok_or_else(|| r.malformed(format!("unknown compression {compression}")))?;
        let id = Id(r.array()?);
        let offset = r.u64()?;
        let length = r.u32()?;
        let raw_length = r.u32()?;
        if (length as usize) < SEAL_OVERHEAD {
            return Err(r.malformed(format!("blob {} shorter than its seal", id.short())));
        }
        Ok(BlobEntry { kind, compression, id, offset, length, raw_length })
    }

    /// End offset of the sealed blob in its pack.
    pub fn end(&self) -> u64 {
        self.offset + u64::from(self.length)
    }
}

/// Encodes `count u32 | entries` (the plaintext of a pack header).
pub fn encode_entries(entries: &[BlobEntry]) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + entries.len() * BLOB_ENTRY_LEN);
    out.extend_from_slice(&(entries.len() as u32).to_le_bytes());
    for e in entries {
        e.encode(&mut out);
    }
    out
}

/// Decodes the plaintext of a pack header.
pub fn decode_entries(buf: &[u8]) -> Result<Vec<BlobEntry>, FormatError> {
    let mut r = Reader::new(buf, "pack header");
    let entries = decode_entry_list(&mut r)?;
    r.finish()?;
    Ok(entries)
}

pub(crate) fn decode_entry_list(r: &mut Reader<'_>) -> Result<Vec<BlobEntry>, FormatError> {
    let count = r.u32()?;
    if count > MAX_BLOBS_PER_PACK || count as usize * BLOB_ENTRY_LEN > r.remaining() {
        return Err(r.malformed(format!("claims {count} blobs")));
    }
    (0..count).map(|_| BlobEntry::decode(r)).collect()
}

/// Locates the sealed pack header in a whole pack file (after checking magic and
/// version). Returns its byte range.
pub fn header_range(file_len: u64, trailer: [u8; 4]) -> Result<std::ops::Range<u64>, FormatError> {
    let len = u64::from(u32::from_le_bytes(trailer));
    let min = (PACK_HEADER_LEN + PACK_TRAILER_LEN) as u64;
    if len < SEAL_OVERHEAD as u64 || len + min > file_len {
        return Err(FormatError::Malformed {
            what: "pack file",
            detail: format!("header length {len} in a {file_len}-byte file"),
        });
    }
    let end = file_len - PACK_TRAILER_LEN as u64;
    Ok(end - len..end)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(i: u8) -> BlobEntry {
        BlobEntry {
            kind: if i.is_multiple_of(2) { BlobKind::Data } else { BlobKind::Tree },
            compression: Compression::Zstd,
            id: Id([i; 32]),
            offset: 6 + u64::from(i) * 100,
            length: 100,
            raw_length: 65536,
        }
    }

    #[test]
    fn compression_codes_are_pinned() {
        let codes = [(0, Compression::None), (1, Compression::Zstd), (2, Compression::Lz4)];
        for (code, c) in codes {
            assert_eq!(Compression::from_u8(code), Some(c));
            assert_eq!(c as u8, code);
        }
        assert_eq!(Compression::from_u8(3), None);
    }

    #[test]
    fn entries_round_trip_with_pinned_size() {
        let entries: Vec<_> = (1..5).map(entry).collect();
        let buf = encode_entries(&entries);
        assert_eq!(buf.len(), 4 + 4 * BLOB_ENTRY_LEN);
        assert_eq!(BLOB_ENTRY_LEN, 50);
        assert_eq!(decode_entries(&buf).unwrap(), entries);
    }

    #[test]
    fn hostile_headers_are_errors_not_panics() {
        let mut buf = encode_entries(&[entry(1)]);
        buf[0] = 200; // claims 200 entries
        assert!(decode_entries(&buf).is_err());
        let mut buf = encode_entries(&[entry(1)]);
        buf[4] = 9; // unknown kind
        assert!(decode_entries(&buf).is_err());
        let buf = encode_entries(&[entry(1)]);
        for cut in 0..buf.len() {
            assert!(decode_entries(&buf[..cut]).is_err());
        }
        assert!(header_range(10, 100u32.to_le_bytes()).is_err());
        assert_eq!(header_range(1000, 100u32.to_le_bytes()).unwrap(), 896..996);
    }

    #[test]
    fn blob_ad_binds_kind_and_id() {
        let id = Id([5; 32]);
        assert_ne!(blob_ad(BlobKind::Data, &id), blob_ad(BlobKind::Tree, &id));
        assert_eq!(blob_ad(BlobKind::Tree, &id)[0], 1);
    }
}
