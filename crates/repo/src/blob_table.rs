//! The blob index's table: blob locations as compact slots in runs sorted by blob id.
//!
//! A [`Slot`] is one location of one blob in 54 bytes without padding (the id, the pack's
//! position, offset, lengths, kind and compression; every field has alignment 1). A
//! [`Run`] is slots sorted by id, with a directory of where each value of the ids' top
//! bits starts (4 bytes per [`BUCKET`] slots): blob ids are keyed hashes, uniform, so a
//! lookup reads one directory entry and binary-searches a bucket of a few slots, about
//! two cache misses like a hash table (ids that are not uniform only make some buckets
//! larger). The locations of a blob stored more than once are adjacent in a run, in load
//! order (the first location first).
//!
//! Two ways to build a run: a bulk load appends every listing's slots unsorted and
//! [`settle`]s them once (one in-place sort, then one pass keeping the locations the
//! index keeps); a run added later is merged into an older one in place ([`Run::merge`]).

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

    /// The slot as the index cache stores it (FORMAT §22): id, pack, offset, length and
    /// raw length little-endian, kind, compression; [`SLOT_SIZE`] bytes.
    pub(crate) fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.id.0);
        out.extend_from_slice(&self.pack);
        out.extend_from_slice(&self.offset);
        out.extend_from_slice(&self.length);
        out.extend_from_slice(&self.raw_length);
        out.push(self.kind as u8);
        out.push(self.compression as u8);
    }

    /// A slot from [`SLOT_SIZE`] stored bytes; `None` for an unknown kind or compression.
    pub(crate) fn decode(b: &[u8]) -> Option<Slot> {
        let b: &[u8; SLOT_SIZE] = b.try_into().ok()?;
        let array = |at: usize| -> [u8; 4] { b[at..at + 4].try_into().expect("4 bytes") };
        Some(Slot {
            id: Id(b[..32].try_into().expect("32 bytes")),
            pack: array(32),
            offset: b[36..44].try_into().expect("8 bytes"),
            length: array(44),
            raw_length: array(48),
            kind: BlobKind::from_u8(b[52])?,
            compression: Compression::from_u8(b[53])?,
        })
    }

    /// The same location with its pack at another position.
    pub(crate) fn with_pack(mut self, pack: u32) -> Slot {
        self.set_pack(pack);
        self
    }
}

/// The id's first 8 bytes as a number: ids sort as these do, then by the rest.
fn prefix(id: &Id) -> u64 {
    u64::from_be_bytes(id.0[..8].try_into().expect("8 bytes"))
}

pub(crate) fn by_id(a: &Slot, b: &Slot) -> std::cmp::Ordering {
    a.prefix().cmp(&b.prefix()).then_with(|| a.id.0[8..].cmp(&b.id.0[8..]))
}

/// A run: slots sorted by id, and a directory of where each value of the ids' top
/// `bits` bits starts, so that a lookup reads one directory entry and then searches a
/// bucket of about [`BUCKET`] slots (a page or two of the run) instead of the whole run.
#[derive(Debug, Default)]
pub(crate) struct Run {
    slots: Vec<Slot>,
    /// `dir[b]..dir[b + 1]`: the slots whose top `bits` bits are `b`. Empty for a run of
    /// more than `u32::MAX` slots (searched whole).
    dir: Vec<u32>,
    bits: u32,
}

/// Slots per directory bucket, on average: the directory costs 4 bytes per bucket.
pub(crate) const BUCKET: usize = 8;

impl Run {
    /// A run of `slots`, which must be sorted by id.
    pub(crate) fn new(slots: Vec<Slot>) -> Self {
        let bits = (slots.len() / BUCKET).max(1).ilog2().min(30);
        let mut run = Run { slots, dir: Vec::new(), bits };
        let Ok(len) = u32::try_from(run.slots.len()) else { return run };
        let buckets = 1usize << bits;
        run.dir.reserve_exact(buckets + 1);
        let mut at = 0u32;
        for b in 0..buckets {
            while (at as usize) < run.slots.len() && run.bucket(&run.slots[at as usize].id) < b {
                at += 1;
            }
            run.dir.push(at);
        }
        run.dir.push(len);
        run
    }

    fn bucket(&self, id: &Id) -> usize {
        if self.bits == 0 {
            0
        } else {
            (prefix(id) >> (64 - self.bits)) as usize
        }
    }

    pub(crate) fn slots(&self) -> &[Slot] {
        &self.slots
    }

    pub(crate) fn len(&self) -> usize {
        self.slots.len()
    }

    pub(crate) fn into_slots(self) -> Vec<Slot> {
        self.slots
    }

    /// The first position whose id is not below `id`.
    pub(crate) fn lower_bound(&self, id: &Id) -> usize {
        let (lo, hi) = if self.dir.is_empty() {
            (0, self.slots.len())
        } else {
            let b = self.bucket(id);
            (self.dir[b] as usize, self.dir[b + 1] as usize)
        };
        lo + self.slots[lo..hi].partition_point(|s| s.id < *id)
    }

    /// The slots of `id`: its locations in this run, in load order.
    pub(crate) fn group(&self, id: &Id) -> &[Slot] {
        let lo = self.lower_bound(id);
        let n = self.slots[lo..].iter().take_while(|s| s.id == *id).count();
        &self.slots[lo..lo + n]
    }

    /// Merges the run `newer` into this older one, in place from the back (no second
    /// copy of the older slots); of equal ids, the older slots stay first.
    pub(crate) fn merge(&mut self, newer: Run) {
        let slots = std::mem::take(&mut self.slots);
        *self = Run::new(merge_into(slots, &newer.slots));
    }
}

/// Settles the slots of a bulk load, whose `pack` is still the number of the listing
/// they came from (`listing_pack` maps it to the pack's position; the offsets within a
/// listing increase, so listing and offset give the load order). Sorts them by id and
/// load order, then keeps for each blob its first location and each further one in
/// another pack (the first in that pack), as [`crate::BlobIndex::add_pack`] does one
/// listing at a time; every slot's `pack` becomes the pack's position. Returns the
/// number of distinct blobs.
pub(crate) fn settle(mut slots: Vec<Slot>, listing_pack: &[u32]) -> (Run, usize) {
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
    (Run::new(slots), blobs)
}

/// Merges the sorted run `newer` into the sorted run `older`, in place from the back
/// (no second copy of `older`); of equal ids, `older`'s slots stay first.
fn merge_into(mut older: Vec<Slot>, newer: &[Slot]) -> Vec<Slot> {
    let Some(&filler) = newer.first() else { return older };
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
    older
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
        let mut stored = Vec::new();
        s.encode(&mut stored);
        assert_eq!(stored.len(), SLOT_SIZE);
        // Pinned: the index cache's table holds slots in exactly these bytes.
        assert_eq!(&stored[32..], &hex::decode("efbeadde0700000000010000ffffffff0c0000000201").unwrap()[..]);
        assert_eq!(Slot::decode(&stored), Some(s));
        stored[52] = 9;
        assert_eq!(Slot::decode(&stored), None);
        assert_eq!(Slot::decode(&stored[1..]), None);
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
            let mut slots: Vec<Slot> = present.iter().map(|i| slot(*i, 0, 0)).collect();
            slots.sort_unstable_by(by_id);
            let run = Run::new(slots);
            assert!(run.dir.len() > 2 || ids.len() < 100);
            for i in present {
                let g = run.group(i);
                assert_eq!(g.len(), 1);
                assert_eq!(g[0].id, *i);
            }
            for i in absent {
                assert!(run.group(i).is_empty());
                let at = run.lower_bound(i);
                assert!(at == run.len() || run.slots[at].id > *i);
                assert!(at == 0 || run.slots[at - 1].id < *i);
            }
        }
        assert!(Run::new(Vec::new()).group(&id(1)).is_empty());
    }

    /// Settling keeps a blob's first location and its further ones in other packs, in
    /// load order; a second location in a pack it already has is dropped.
    #[test]
    fn settling_keeps_the_first_location_then_copies_in_other_packs() {
        let (a, b) = (id(1), id(2));
        // Listings 0..4 name packs 5, 7, 5 (again), 9.
        let listing_pack = [5, 7, 5, 9];
        let slots = vec![
            slot(a, 0, 100),
            slot(b, 1, 0),
            slot(a, 1, 50),
            slot(a, 2, 100),
            slot(b, 3, 10),
            slot(a, 3, 0),
            slot(a, 3, 70),
        ];
        let (run, blobs) = settle(slots, &listing_pack);
        assert_eq!(blobs, 2);
        let locs = |i: Id| run.group(&i).iter().map(|s| (s.pack(), s.offset())).collect::<Vec<_>>();
        assert_eq!(locs(a), vec![(5, 100), (7, 50), (9, 0)]);
        assert_eq!(locs(b), vec![(7, 0), (9, 10)]);
        assert_eq!(settle(Vec::new(), &[]).1, 0);
    }

    #[test]
    fn merging_keeps_older_slots_first_and_the_run_sorted() {
        let sorted = |range: std::ops::Range<u64>, pack| {
            let mut v: Vec<Slot> = range.map(|k| slot(id(k), pack, 0)).collect();
            v.sort_unstable_by(by_id);
            Run::new(v)
        };
        let mut older = sorted(0..300, 0);
        older.merge(sorted(250..400, 1));
        assert_eq!(older.len(), 450);
        assert!(older.slots.windows(2).all(|w| by_id(&w[0], &w[1]).is_le()));
        for k in 0..400 {
            let packs: Vec<u32> = older.group(&id(k)).iter().map(Slot::pack).collect();
            let want = if k < 250 {
                vec![0]
            } else if k < 300 {
                vec![0, 1]
            } else {
                vec![1]
            };
            assert_eq!(packs, want);
        }
        older.merge(Run::default());
        assert_eq!(older.len(), 450);
    }
}
