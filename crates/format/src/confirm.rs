//! Confirmation state pages: for every chunk of a disk, the run at which its stored
//! content was last confirmed against the source (read in full, read because change
//! tracking reported it, or sampled by verification).
//!
//! The state of a disk at a restore point is a sequence of `u32` run numbers, one per
//! chunk in disk order, `0` meaning never confirmed. It is cut into pages of
//! [`ENTRIES_PER_PAGE`] entries (the last page shorter); each page is a blob of kind
//! [`crate::BlobKind::Confirm`] holding the entries as little-endian `u32`s, nothing
//! else. A page of only zeros is not stored (its id is [`crate::Id::ZERO`]). The page ids
//! form a fixed index tree ([`crate::tree`]) whose root is the disk entry's
//! `confirm_root`; the tree's "chunks" are the pages.

use crate::FormatError;

/// Entries per page: 16384 × 4 bytes = 64 KiB of plaintext.
pub const ENTRIES_PER_PAGE: u64 = 16384;

/// Pages needed for `chunks` entries.
pub fn page_count(chunks: u64) -> u64 {
    chunks.div_ceil(ENTRIES_PER_PAGE)
}

/// Encodes entries as little-endian `u32`s.
pub fn encode_page(entries: &[u32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(entries.len() * 4);
    for e in entries {
        out.extend_from_slice(&e.to_le_bytes());
    }
    out
}

/// Decodes a page that must hold exactly `len` entries.
pub fn decode_page(buf: &[u8], len: usize) -> Result<Vec<u32>, FormatError> {
    if buf.len() != len * 4 {
        return Err(FormatError::Malformed {
            what: "confirmation page",
            detail: format!("{} bytes for {len} entries", buf.len()),
        });
    }
    Ok(buf.chunks_exact(4).map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes"))).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_are_little_endian_u32s() {
        let page = encode_page(&[0, 1, 0x0102_0304]);
        assert_eq!(page, [0, 0, 0, 0, 1, 0, 0, 0, 4, 3, 2, 1]);
        assert_eq!(decode_page(&page, 3).unwrap(), vec![0, 1, 0x0102_0304]);
        assert!(decode_page(&page, 2).is_err());
        assert!(decode_page(&page[..11], 3).is_err());
        assert_eq!(ENTRIES_PER_PAGE * 4, 65536);
        assert_eq!((page_count(0), page_count(1), page_count(16384), page_count(16385)), (0, 1, 1, 2));
    }
}
