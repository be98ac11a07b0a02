//! Fixed index trees: the list of chunk ids of one disk, stored as pages.
//!
//! A disk of `size` bytes with chunk size `c` has `n = ceil(size / c)` chunks. Level 0
//! holds the `n` chunk ids in disk order, split into pages of `fanout` ids; level `k+1`
//! holds the ids of the pages of level `k`, until one level has a single page: its id is
//! the root recorded in the snapshot. A disk with `n <= fanout` chunks has one level.
//!
//! A page is stored as a *tree* blob whose plaintext is its ids concatenated (32 bytes
//! each; only the last page of a level is shorter). [`Id::ZERO`] stands for an all-zero
//! chunk, and for a page whose ids are all [`Id::ZERO`]: such pages are never stored,
//! so an empty region costs nothing at any level. Pages are content-addressed like
//! chunks, so an incremental backup stores only the pages on the paths to changed chunks.

use crate::{FormatError, Id};

/// Ids per page written by this version (32 KiB pages).
pub const DEFAULT_FANOUT: u32 = 1024;
/// Smallest and largest fanout a reader accepts.
pub const MIN_FANOUT: u32 = 2;
pub const MAX_FANOUT: u32 = 1 << 16;

/// Number of chunks of a disk.
pub fn chunk_count(size: u64, chunk_size: u32) -> u64 {
    size.div_ceil(u64::from(chunk_size))
}

/// The number of entries at each level, from level 0 (chunks) up to the root page's
/// level. The root page is the single page of the last level.
pub fn level_sizes(chunks: u64, fanout: u32) -> Vec<u64> {
    let f = u64::from(fanout);
    let mut sizes = vec![chunks];
    let mut n = chunks;
    while n > f {
        n = n.div_ceil(f);
        sizes.push(n);
    }
    sizes
}

/// Encodes a page.
pub fn encode_page(ids: &[Id]) -> Vec<u8> {
    let mut out = Vec::with_capacity(ids.len() * Id::LEN);
    for id in ids {
        out.extend_from_slice(&id.0);
    }
    out
}

/// Decodes a page that must hold exactly `expected` ids.
pub fn decode_page(buf: &[u8], expected: usize) -> Result<Vec<Id>, FormatError> {
    if buf.len() != expected * Id::LEN {
        return Err(FormatError::Malformed {
            what: "index page",
            detail: format!("{} bytes, expected {} ids", buf.len(), expected),
        });
    }
    Ok(buf
        .chunks_exact(Id::LEN)
        .map(|c| {
            let mut a = [0u8; 32];
            a.copy_from_slice(c);
            Id(a)
        })
        .collect())
}

/// How many ids page `page` of a level with `level_len` entries holds.
pub fn page_len(level_len: u64, page: u64, fanout: u32) -> usize {
    let f = u64::from(fanout);
    let start = page * f;
    (level_len.saturating_sub(start)).min(f) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn geometry() {
        assert_eq!(chunk_count(0, 65536), 0);
        assert_eq!(chunk_count(1, 65536), 1);
        assert_eq!(chunk_count(65536 * 3, 65536), 3);
        assert_eq!(level_sizes(0, 1024), vec![0]);
        assert_eq!(level_sizes(1024, 1024), vec![1024]);
        assert_eq!(level_sizes(1025, 1024), vec![1025, 2]);
        // 2 TiB at 64 KiB chunks: 32 Mi chunks, 32 Ki leaves, 32 pages, 1 root.
        assert_eq!(level_sizes(1 << 25, 1024), vec![1 << 25, 1 << 15, 32]);
        assert_eq!(page_len(1025, 0, 1024), 1024);
        assert_eq!(page_len(1025, 1, 1024), 1);
        assert_eq!(page_len(1025, 2, 1024), 0);
    }

    #[test]
    fn pages_round_trip() {
        let ids = vec![Id([1; 32]), Id::ZERO, Id([2; 32])];
        let p = encode_page(&ids);
        assert_eq!(decode_page(&p, 3).unwrap(), ids);
        assert!(decode_page(&p, 2).is_err());
        assert!(decode_page(&p[..50], 2).is_err());
    }
}
