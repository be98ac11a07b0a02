//! Extents: what `NBD_CMD_BLOCK_STATUS` answers, one list per metadata context.
//!
//! The meaning of an extent's flags depends on its context:
//!
//! | context                   | bit 0                      | bit 1                        |
//! |---------------------------|----------------------------|------------------------------|
//! | `base:allocation`         | `NBD_STATE_HOLE`: unallocated | `NBD_STATE_ZERO`: reads as zeroes |
//! | `qemu:dirty-bitmap:NAME`  | `NBD_STATE_DIRTY`: changed since the bitmap was created or cleared | — |
//!
//! A dirty bitmap is tracked at its granularity (64 KiB by default in qcow2), so dirty
//! extents are whole granules: a 4 KiB write marks its whole 64 KiB granule dirty.

/// The `base:allocation` context.
pub const BASE_ALLOCATION: &str = "base:allocation";
/// `base:allocation` flag: the extent is a hole (not allocated).
pub const STATE_HOLE: u32 = 1 << 0;
/// `base:allocation` flag: the extent reads as zeroes.
pub const STATE_ZERO: u32 = 1 << 1;
/// `qemu:dirty-bitmap:NAME` flag: the extent is dirty.
pub const STATE_DIRTY: u32 = 1 << 0;

/// The meta context name of a qemu dirty bitmap.
pub fn dirty_bitmap_context(bitmap: &str) -> String {
    format!("qemu:dirty-bitmap:{bitmap}")
}

/// A run of bytes with one status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub offset: u64,
    pub length: u64,
    pub flags: u32,
}

impl Extent {
    pub fn end(&self) -> u64 {
        self.offset + self.length
    }

    /// `base:allocation`: not allocated.
    pub fn is_hole(&self) -> bool {
        self.flags & STATE_HOLE != 0
    }

    /// `base:allocation`: reads as zeroes (no need to read it).
    pub fn is_zero(&self) -> bool {
        self.flags & STATE_ZERO != 0
    }

    /// `qemu:dirty-bitmap:NAME`: changed.
    pub fn is_dirty(&self) -> bool {
        self.flags & STATE_DIRTY != 0
    }
}

/// The answer to one block status request: for each granted context, extents that start
/// at the request's offset, are consecutive, and end at or before the request's end (the
/// server may describe less than was asked; never more, the client clips).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct BlockStatus {
    pub contexts: Vec<(u32, Vec<Extent>)>,
}

impl BlockStatus {
    /// The extents for one context id.
    pub fn extents(&self, context_id: u32) -> Option<&[Extent]> {
        self.contexts.iter().find(|(id, _)| *id == context_id).map(|(_, e)| e.as_slice())
    }
}

/// Appends `e`, merging it into the last extent when they touch and share flags.
pub(crate) fn push_coalesced(out: &mut Vec<Extent>, e: Extent) {
    if let Some(last) = out.last_mut() {
        if last.end() == e.offset && last.flags == e.flags {
            last.length += e.length;
            return;
        }
    }
    out.push(e);
}

/// Merges touching extents that satisfy `keep` into ranges `(offset, length)`: e.g. the
/// dirty ranges of a bitmap, or the data (non-zero) ranges of `base:allocation`.
pub fn ranges_where(extents: &[Extent], keep: impl Fn(&Extent) -> bool) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for e in extents.iter().filter(|e| keep(e)) {
        match out.last_mut() {
            Some((off, len)) if *off + *len == e.offset => *len += e.length,
            _ => out.push((e.offset, e.length)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ext(offset: u64, length: u64, flags: u32) -> Extent {
        Extent { offset, length, flags }
    }

    #[test]
    fn flags_and_names() {
        assert_eq!(dirty_bitmap_context("b0"), "qemu:dirty-bitmap:b0");
        let e = ext(0, 10, STATE_HOLE | STATE_ZERO);
        assert!(e.is_hole() && e.is_zero() && e.is_dirty());
        assert!(!ext(0, 1, 0).is_hole());
        assert_eq!(e.end(), 10);
    }

    #[test]
    fn coalescing_merges_only_touching_equal_extents() {
        let mut v = Vec::new();
        push_coalesced(&mut v, ext(0, 10, 1));
        push_coalesced(&mut v, ext(10, 5, 1));
        push_coalesced(&mut v, ext(15, 5, 0));
        push_coalesced(&mut v, ext(25, 5, 0));
        assert_eq!(v, vec![ext(0, 15, 1), ext(15, 5, 0), ext(25, 5, 0)]);
    }

    #[test]
    fn ranges_where_selects_and_merges() {
        let v = [ext(0, 10, 1), ext(10, 5, 1), ext(15, 5, 0), ext(20, 5, 1), ext(30, 1, 1)];
        assert_eq!(ranges_where(&v, Extent::is_dirty), vec![(0, 15), (20, 5), (30, 1)]);
        assert_eq!(ranges_where(&v, |e| !e.is_dirty()), vec![(15, 5)]);
        let bs = BlockStatus { contexts: vec![(3, v.to_vec())] };
        assert_eq!(bs.extents(3).map(|e| e.len()), Some(5));
        assert!(bs.extents(4).is_none());
    }
}
