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
//!
//! **Page summaries** (a cache, not part of the restore point): for each stored page, by
//! its id, how many of its entries hold each run number. A backup keeps them in state
//! documents per disk ([`encode_summaries`]) so that the next one knows every page's
//! summary without reading the page; a page whose id the document does not list is read.
//! A disk of more than one **group** (the [`GROUP_PAGES`] pages one leaf page of the tree
//! lists) keeps one such document per group and a **group list** ([`encode_groups`]):
//! per group the id of its leaf page and its summed runs, so that a backup touching few
//! groups reads and rewrites only those. Since version 3 the list ends with its
//! **basis** ([`IndexBasis`]): the index files in which the backup that wrote it found
//! every leaf page it lists, and every page those list, so that the next backup may keep
//! such a leaf page without looking up its 1 024 pages while those files all remain.

use crate::basis::IndexBasis;
use crate::{FormatError, Id, Reader};

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

/// The magic and version opening an encoded set of page summaries.
pub const SUMMARY_MAGIC: &[u8; 4] = b"BPCS";
pub const SUMMARY_VERSION: u16 = 1;
/// The version of a group list: the same layout, one entry per group.
pub const GROUPS_VERSION: u16 = 2;
/// The version of a group list followed by its [`IndexBasis`].
pub const GROUPS_BASIS_VERSION: u16 = 3;
/// Pages per group: the pages one leaf page of the confirmation tree lists.
pub const GROUP_PAGES: u64 = crate::tree::DEFAULT_FANOUT as u64;

/// Groups needed for `pages` pages.
pub fn group_count(pages: u64) -> u64 {
    pages.div_ceil(GROUP_PAGES)
}

/// How many entries of a page hold each run: `(run, count)`, runs ascending, counts > 0.
pub type PageRuns = Vec<(u32, u64)>;

/// Encodes page summaries: `"BPCS" | version u16 | count u32`, then per page `id (32) |
/// runs u16 | runs × (run u32 | count u64)`, all little-endian.
pub fn encode_summaries(pages: &[(Id, &PageRuns)]) -> Vec<u8> {
    encode(SUMMARY_VERSION, pages)
}

/// Encodes a group list (version 2): the layout of [`encode_summaries`], per group (in
/// order, every group of the disk) the id of its leaf page (zero: no page of the group is
/// stored) and how many entries of the whole group hold each run. With a basis (version
/// 3) the list is followed by `cached u32 | digest (32) | n u32 | n × file id (32)`.
pub fn encode_groups(groups: &[(Id, &PageRuns)], basis: Option<&IndexBasis>) -> Vec<u8> {
    let Some(basis) = basis else { return encode(GROUPS_VERSION, groups) };
    let mut out = encode(GROUPS_BASIS_VERSION, groups);
    basis.encode_into(&mut out);
    out
}

fn encode(version: u16, pages: &[(Id, &PageRuns)]) -> Vec<u8> {
    let mut out = Vec::with_capacity(10 + pages.len() * 60);
    out.extend_from_slice(SUMMARY_MAGIC);
    out.extend_from_slice(&version.to_le_bytes());
    out.extend_from_slice(&(pages.len() as u32).to_le_bytes());
    for (id, runs) in pages {
        out.extend_from_slice(&id.0);
        out.extend_from_slice(&(runs.len() as u16).to_le_bytes());
        for &(run, n) in runs.iter() {
            out.extend_from_slice(&run.to_le_bytes());
            out.extend_from_slice(&n.to_le_bytes());
        }
    }
    out
}

/// A decoded summary document: page summaries (version 1) or a group list (version 2, or
/// 3 with its basis).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Summaries {
    Pages(Vec<(Id, PageRuns)>),
    Groups(Vec<(Id, PageRuns)>, Option<IndexBasis>),
}

/// Decodes page summaries (version 1 only); a page whose runs are not ascending, count
/// zero or more than a page holds, or another version, is an error.
pub fn decode_summaries(buf: &[u8]) -> Result<Vec<(Id, PageRuns)>, FormatError> {
    match decode_any(buf)? {
        Summaries::Pages(p) => Ok(p),
        Summaries::Groups(..) => {
            Err(FormatError::Malformed { what: "confirmation page summaries", detail: "a group list".into() })
        }
    }
}

/// Decodes any version: page summaries (1) or a group list (2 or 3, whose entries may
/// count up to a group's entries, [`GROUP_PAGES`] pages; 3 with its basis, of at most
/// [`crate::basis::BASIS_FILES`] files).
pub fn decode_any(buf: &[u8]) -> Result<Summaries, FormatError> {
    let mut r = Reader::new(buf, "confirmation page summaries");
    if &r.array::<4>()? != SUMMARY_MAGIC {
        return Err(r.malformed("bad magic"));
    }
    let version = r.u16()?;
    let limit = match version {
        SUMMARY_VERSION => ENTRIES_PER_PAGE,
        GROUPS_VERSION | GROUPS_BASIS_VERSION => ENTRIES_PER_PAGE * GROUP_PAGES,
        _ => return Err(r.malformed(format!("version {version}"))),
    };
    let count = r.u32()?;
    let mut out = Vec::with_capacity((count as usize).min(buf.len() / 34));
    for _ in 0..count {
        let id = Id(r.array()?);
        let k = r.u16()?;
        let mut runs: PageRuns = Vec::with_capacity(k as usize);
        for _ in 0..k {
            let (run, n) = (r.u32()?, r.u64()?);
            if n == 0 || runs.last().is_some_and(|&(last, _)| last >= run) {
                return Err(r.malformed(format!("page {id}: runs out of order or empty")));
            }
            runs.push((run, n));
        }
        if runs.iter().map(|&(_, n)| n).sum::<u64>() > limit {
            return Err(r.malformed(format!("page {id}: more entries than a page holds")));
        }
        out.push((id, runs));
    }
    let basis = if version == GROUPS_BASIS_VERSION { Some(IndexBasis::decode_from(&mut r)?) } else { None };
    r.finish()?;
    Ok(match version {
        SUMMARY_VERSION => Summaries::Pages(out),
        _ => Summaries::Groups(out, basis),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summaries_are_pinned() {
        let a: PageRuns = vec![(0, 2), (7, 16382)];
        let b: PageRuns = vec![(1, 100)];
        let enc = encode_summaries(&[(Id([1; 32]), &a), (Id([2; 32]), &b)]);
        let mut want = b"BPCS\x01\x00\x02\x00\x00\x00".to_vec();
        want.extend_from_slice(&[1; 32]);
        want.extend_from_slice(&[2, 0, 0, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 7, 0, 0, 0, 0xfe, 0x3f, 0, 0, 0, 0, 0, 0]);
        want.extend_from_slice(&[2; 32]);
        want.extend_from_slice(&[1, 0, 1, 0, 0, 0, 100, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(enc, want);
        assert_eq!(decode_summaries(&enc).unwrap(), vec![(Id([1; 32]), a), (Id([2; 32]), b)]);
        assert!(decode_summaries(&enc[..enc.len() - 1]).is_err());
        let mut bad = enc.clone();
        bad[4] = 2;
        assert!(decode_summaries(&bad).is_err(), "an unknown version");
        let unordered: PageRuns = vec![(5, 1), (5, 1)];
        assert!(decode_summaries(&encode_summaries(&[(Id([3; 32]), &unordered)])).is_err());
    }

    #[test]
    fn group_lists_are_pinned_and_both_versions_read() {
        let a: PageRuns = vec![(0, 5), (3, ENTRIES_PER_PAGE * GROUP_PAGES - 5)];
        let enc = encode_groups(&[(Id([4; 32]), &a), (Id::ZERO, &vec![(0, 16384)])], None);
        let mut want = b"BPCS\x02\x00\x02\x00\x00\x00".to_vec();
        want.extend_from_slice(&[4; 32]);
        want.extend_from_slice(&[
            2, 0, 0, 0, 0, 0, 5, 0, 0, 0, 0, 0, 0, 0, 3, 0, 0, 0, 0xfb, 0xff, 0xff, 0, 0, 0, 0, 0,
        ]);
        want.extend_from_slice(&[0; 32]);
        want.extend_from_slice(&[1, 0, 0, 0, 0, 0, 0, 0x40, 0, 0, 0, 0, 0, 0]);
        assert_eq!(enc, want);
        assert_eq!(
            decode_any(&enc).unwrap(),
            Summaries::Groups(vec![(Id([4; 32]), a.clone()), (Id::ZERO, vec![(0, 16384)])], None)
        );
        assert!(decode_summaries(&enc).is_err(), "a group list is not page summaries");
        let pages = encode_summaries(&[(Id([1; 32]), &vec![(1, 7)])]);
        assert_eq!(decode_any(&pages).unwrap(), Summaries::Pages(vec![(Id([1; 32]), vec![(1, 7)])]));
        // A page's summary may not count a group's entries.
        assert!(decode_any(&encode_summaries(&[(Id([1; 32]), &a)])).is_err());
        let too_many: PageRuns = vec![(1, ENTRIES_PER_PAGE * GROUP_PAGES + 1)];
        assert!(decode_any(&encode_groups(&[(Id([1; 32]), &too_many)], None)).is_err());
        assert_eq!((GROUP_PAGES, group_count(0), group_count(1024), group_count(1025)), (1024, 0, 1, 2));
    }

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

    #[test]
    fn a_group_list_with_its_basis_is_pinned() {
        let a: PageRuns = vec![(2, 9)];
        let basis = IndexBasis { cached: 7, digest: [5; 32], files: vec![Id([6; 32]), Id([8; 32])] };
        let enc = encode_groups(&[(Id([4; 32]), &a)], Some(&basis));
        let mut want = b"BPCS\x03\x00\x01\x00\x00\x00".to_vec();
        want.extend_from_slice(&[4; 32]);
        want.extend_from_slice(&[1, 0, 2, 0, 0, 0, 9, 0, 0, 0, 0, 0, 0, 0]);
        want.extend_from_slice(&[7, 0, 0, 0]);
        want.extend_from_slice(&[5; 32]);
        want.extend_from_slice(&[2, 0, 0, 0]);
        want.extend_from_slice(&[6; 32]);
        want.extend_from_slice(&[8; 32]);
        assert_eq!(enc, want);
        assert_eq!(decode_any(&enc).unwrap(), Summaries::Groups(vec![(Id([4; 32]), a.clone())], Some(basis.clone())));
        assert!(decode_any(&enc[..enc.len() - 1]).is_err(), "a file id cut short");
        let mut longer = enc.clone();
        longer.push(0);
        assert!(decode_any(&longer).is_err(), "bytes after the basis");
        let mut many = encode_groups(&[(Id([4; 32]), &a)], Some(&IndexBasis { files: vec![], ..basis }));
        let at = many.len() - 4;
        many[at..].copy_from_slice(&(crate::basis::BASIS_FILES as u32 + 1).to_le_bytes());
        assert!(decode_any(&many).is_err(), "more files than a basis names");
    }
}
