//! The blob index's table: blob locations as compact slots in runs sorted by blob id.
//!
//! A [`Slot`] is one location of one blob in 54 bytes without padding (the id, the pack's
//! position, offset, lengths, kind and compression; every field has alignment 1). A run
//! is a `Vec<Slot>` sorted by id; the locations of a blob stored more than once are
//! adjacent in it, in load order (the first location first). Lookups are an
//! interpolation search on the id's first 8 bytes (blob ids are keyed hashes, uniform),
//! bounded to a few probes and finished by a binary search, so ids that are not uniform
//! cost at most a binary search.
//!
//! Two ways to build a run: a bulk load appends every listing's slots unsorted and
//! [`settle`]s them once (one in-place sort, then one pass keeping the locations the
//! index keeps); a run added later is [`merge_into`] an older one in place.

use blockproof_format::{BlobEntry, BlobKind, Compression, Id};

/// One location of one blob. `pack` is the pack's position in the index (while a bulk
/// load is being settled: the number of the listing it came from).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Slot {
    pub(crate) id: Id,
    pack: [u8; 4],
    offset: [u8; 8],
    length: [u8; 4],
    raw_length: [u8; 4],
    kind: BlobKind,
    compression: Compression,
}

/// Bytes per slot: docs/ARCHITECTURE.md §7 counts on it.
pub(crate) const SLOT_SIZE: usize = 54;
const _: () = assert!(std::mem::size_of::<Slot>() == SLOT_SIZE && std::mem::align_of::<Slot>() == 1);

/// Interpolation probes before the binary search takes over.
const INTERPOLATION_PROBES: usize = 6;
/// Below this many slots a lookup goes straight to the binary search.
const SMALL_RANGE: usize = 16;

impl Slot {
    pub(crate) fn new(entry: &BlobEntry, pack: u32) -> Self {
        Slot {
            id: entry.id,
            pack: pack.to_le_bytes(),
            offset: entry.offset.to_le_bytes(),
            length: entry.length.to_le_bytes(),
            raw_length: entry.raw_length.to_le_bytes(),
            kind: entry.kind,
            compression: entry.compression,
        }
    }

    pub(crate) fn pack(&self) -> u32 {
        u32::from_le_bytes(self.pack)
    }

    fn set_pack(&mut self, pack: u32) {
        self.pack = pack.to_le_bytes();
    }

    fn offset(&self) -> u64 {
        u64::from_le_bytes(self.offset)
    }

    pub(crate) fn entry(&self) -> BlobEntry {
        BlobEntry {
            kind: self.kind,
            compression: self.compression,
            id: self.id,
            offset: self.offset(),
            length: u32::from_le_bytes(self.length),
            raw_length: u32::from_le_bytes(self.raw_length),
        }
    }

    fn prefix(&self) -> u64 {
        prefix(&self.id)
    }
}

/// The id's first 8 bytes as a number: ids sort as these do, then by the rest.
fn prefix(id: &Id) -> u64 {
    u64::from_be_bytes(id.0[..8].try_into().expect("8 bytes"))
}

fn by_id(a: &Slot, b: &Slot) -> std::cmp::Ordering {
    a.prefix().cmp(&b.prefix()).then_with(|| a.id.0[8..].cmp(&b.id.0[8..]))
}

/// The first position in `run` (sorted by id) whose id is not below `id`.
pub(crate) fn lower_bound(run: &[Slot], id: &Id) -> usize {
    let key = prefix(id);
    // run[..lo] is below id, run[hi..] is not.
    let (mut lo, mut hi) = (0, run.len());
    for _ in 0..INTERPOLATION_PROBES {
        if hi - lo <= SMALL_RANGE {
            break;
        }
        let (a, b) = (run[lo].prefix(), run[hi - 1].prefix());
        let probe = if key <= a {
            lo
        } else if key >= b {
            hi - 1
        } else {
            let span = (hi - 1 - lo) as u128;
            lo + (u128::from(key - a) * span / u128::from(b - a)) as usize
        };
        if run[probe].id < *id {
            lo = probe + 1;
        } else {
            hi = probe;
        }
    }
    lo + run[lo..hi].partition_point(|s| s.id < *id)
}

/// The slots of `id` in `run`: its locations there, in load order.
pub(crate) fn group<'r>(run: &'r [Slot], id: &Id) -> &'r [Slot] {
    let lo = lower_bound(run, id);
    let n = run[lo..].iter().take_while(|s| s.id == *id).count();
    &run[lo..lo + n]
}

/// Settles the slots of a bulk load, whose `pack` is still the number of the listing
/// they came from (`listing_pack` maps it to the pack's position; the offsets within a
/// listing increase, so listing and offset give the load order). Sorts them by id and
/// load order, then keeps for each blob its first location and each further one in
/// another pack (the first in that pack), as [`crate::BlobIndex::add_pack`] does one
/// listing at a time; every slot's `pack` becomes the pack's position. Returns the
/// number of distinct blobs.
pub(crate) fn settle(slots: &mut Vec<Slot>, listing_pack: &[u32]) -> usize {
    slots.sort_unstable_by(|a, b| {
        by_id(a, b).then_with(|| a.pack().cmp(&b.pack())).then_with(|| a.offset().cmp(&b.offset()))
    });
    let (mut read, mut write, mut blobs) = (0, 0, 0);
    while read < slots.len() {
        let id = slots[read].id;
        let first = write;
        while read < slots.len() && slots[read].id == id {
            let mut s = slots[read];
            s.set_pack(listing_pack[s.pack() as usize]);
            // Slots before `write` have all been read: writing never overtakes reading.
            if slots[first..write].iter().all(|kept| kept.pack() != s.pack()) {
                slots[write] = s;
                write += 1;
            }
            read += 1;
        }
        blobs += 1;
    }
    slots.truncate(write);
    slots.shrink_to_fit();
    blobs
}

/// Merges the sorted run `newer` into the sorted run `older`, in place from the back
/// (no second copy of `older`); of equal ids, `older`'s slots stay first.
pub(crate) fn merge_into(older: &mut Vec<Slot>, newer: &[Slot]) {
    let Some(&filler) = newer.first() else { return };
    let mut i = older.len();
    older.resize(older.len() + newer.len(), filler);
    let mut j = newer.len();
    let mut k = older.len();
    while j > 0 {
        k -= 1;
        if i > 0 && by_id(&older[i - 1], &newer[j - 1]).is_gt() {
            older[k] = older[i - 1];
            i -= 1;
        } else {
            older[k] = newer[j - 1];
            j -= 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pseudo-random id (xorshift), uniform like a keyed hash.
    fn id(seed: u64) -> Id {
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let mut out = [0u8; 32];
        for chunk in out.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            chunk.copy_from_slice(&x.to_le_bytes());
        }
        Id(out)
    }

    fn slot(id: Id, pack: u32, offset: u64) -> Slot {
        let e = BlobEntry {
            kind: BlobKind::Data,
            compression: Compression::Lz4,
            id,
            offset,
            length: 1000 + offset as u32,
            raw_length: 65536,
        };
        Slot::new(&e, pack)
    }

    #[test]
    fn a_slot_is_54_bytes_and_gives_back_its_entry() {
        assert_eq!(std::mem::size_of::<Slot>(), 54);
        let e = BlobEntry {
            kind: BlobKind::Confirm,
            compression: Compression::Zstd,
            id: id(3),
            offset: (1 << 40) + 7,
            length: u32::MAX,
            raw_length: 12,
        };
        let s = Slot::new(&e, 0xDEAD_BEEF);
        assert_eq!((s.entry(), s.pack()), (e, 0xDEAD_BEEF));
    }

    /// Lookups find every id at its first slot and no absent one, in uniform ids and in
    /// ids that are not (all sharing their first 8 bytes, or clustered).
    #[test]
    fn lookups_find_present_ids_and_no_absent_ones() {
        let uniform: Vec<Id> = (0..5000).map(id).collect();
        let same_prefix: Vec<Id> = (0..500u64)
            .map(|k| {
                let mut i = id(k);
                i.0[..8].copy_from_slice(&[0xAB; 8]);
                i
            })
            .collect();
        let clustered: Vec<Id> = (0..500u64)
            .map(|k| {
                let mut i = Id([0; 32]);
                i.0[..8].copy_from_slice(&(if k < 490 { k } else { u64::MAX - k }).to_be_bytes());
                i
            })
            .collect();
        for ids in [uniform, same_prefix, clustered] {
            let (present, absent) = ids.split_at(ids.len() * 4 / 5);
            let mut run: Vec<Slot> = present.iter().map(|i| slot(*i, 0, 0)).collect();
            run.sort_unstable_by(by_id);
            for i in present {
                let g = group(&run, i);
                assert_eq!(g.len(), 1);
                assert_eq!(g[0].id, *i);
            }
            for i in absent {
                assert!(group(&run, i).is_empty());
                let at = lower_bound(&run, i);
                assert!(at == run.len() || run[at].id > *i);
                assert!(at == 0 || run[at - 1].id < *i);
            }
        }
        assert!(group(&[], &id(1)).is_empty());
    }

    /// Settling keeps a blob's first location and its further ones in other packs, in
    /// load order; a second location in a pack it already has is dropped.
    #[test]
    fn settling_keeps_the_first_location_then_copies_in_other_packs() {
        let (a, b) = (id(1), id(2));
        // Listings 0..4 name packs 5, 7, 5 (again), 9.
        let listing_pack = [5, 7, 5, 9];
        let mut slots = vec![
            slot(a, 0, 100),
            slot(b, 1, 0),
            slot(a, 1, 50),
            slot(a, 2, 100),
            slot(b, 3, 10),
            slot(a, 3, 0),
            slot(a, 3, 70),
        ];
        assert_eq!(settle(&mut slots, &listing_pack), 2);
        let locs = |i: Id| group(&slots, &i).iter().map(|s| (s.pack(), s.offset())).collect::<Vec<_>>();
        assert_eq!(locs(a), vec![(5, 100), (7, 50), (9, 0)]);
        assert_eq!(locs(b), vec![(7, 0), (9, 10)]);
        let mut none = Vec::new();
        assert_eq!(settle(&mut none, &[]), 0);
    }

    #[test]
    fn merging_keeps_older_slots_first_and_the_run_sorted() {
        let mut older: Vec<Slot> = (0..300).map(|k| slot(id(k), 0, 0)).collect();
        older.sort_unstable_by(by_id);
        let mut newer: Vec<Slot> = (250..400).map(|k| slot(id(k), 1, 0)).collect();
        newer.sort_unstable_by(by_id);
        merge_into(&mut older, &newer);
        assert_eq!(older.len(), 450);
        assert!(older.windows(2).all(|w| by_id(&w[0], &w[1]).is_le()));
        for k in 250..300 {
            let packs: Vec<u32> = group(&older, &id(k)).iter().map(Slot::pack).collect();
            assert_eq!(packs, vec![0, 1]);
        }
        merge_into(&mut older, &[]);
        assert_eq!(older.len(), 450);
    }
}
