//! The blob index against a model of its rules (the hash map it replaced), built in bulk,
//! one listing at a time and both; and loaded from a repository with packs excluded.

use std::collections::{HashMap, HashSet};

use blockproof_format::{BlobEntry, BlobKind, Compression, Id, KdfParams};
use blockproof_store::MemoryBackend;

use super::{BlobIndex, IndexBuilder};
use crate::{BlobCodec, InitOptions, PackWriter, Repository};

/// The rules as the hash map kept them: the first location of each blob, then its
/// further ones in other packs (the first per pack), in load order.
#[derive(Default)]
struct Model {
    packs: Vec<Id>,
    locations: HashMap<Id, Vec<(Id, BlobEntry)>>,
}

impl Model {
    fn add_pack(&mut self, pack: Id, entries: &[BlobEntry]) {
        if !self.packs.contains(&pack) {
            self.packs.push(pack);
        }
        for e in entries {
            let locs = self.locations.entry(e.id).or_default();
            if !locs.iter().any(|(p, _)| *p == pack) {
                locs.push((pack, *e));
            }
        }
    }

    /// Every query of the index agrees with the model.
    fn assert_same(&self, index: &BlobIndex, absent: &[Id]) {
        assert_eq!(index.len(), self.locations.len());
        assert_eq!(index.is_empty(), self.locations.is_empty());
        assert_eq!(index.packs(), &self.packs[..]);
        for (id, locs) in &self.locations {
            assert!(index.contains(id));
            assert_eq!(index.get(id), Some(locs[0]));
            assert_eq!(index.locations(id).collect::<Vec<_>>(), *locs);
            assert!(index.stored_where(id, |p| *p == locs[locs.len() - 1].0));
        }
        for id in absent {
            assert!(!index.contains(id));
            assert_eq!(index.get(id), None);
            assert_eq!(index.locations(id).count(), 0);
            assert!(!index.stored_where(id, |_| true));
        }
        let mut firsts: Vec<(Id, Id, BlobEntry)> = index.iter().collect();
        firsts.sort_by_key(|f| f.0);
        let mut want: Vec<(Id, Id, BlobEntry)> = self.locations.iter().map(|(i, l)| (*i, l[0].0, l[0].1)).collect();
        want.sort_by_key(|f| f.0);
        assert_eq!(firsts, want);
        let mut all: Vec<(Id, Id, u64)> = index.iter_all().map(|(i, p, e)| (i, p, e.offset)).collect();
        all.sort();
        let mut want: Vec<(Id, Id, u64)> =
            self.locations.iter().flat_map(|(i, l)| l.iter().map(move |(p, e)| (*i, *p, e.offset))).collect();
        want.sort();
        assert_eq!(all, want);
        // Positions: one per blob, below the table's length, at its first location; the
        // table pass gives every location once, in order, with its blob's position.
        let table: Vec<_> = index.iter_table().collect();
        assert_eq!(table.len(), index.table_len());
        assert!(table.iter().enumerate().all(|(k, t)| t.at == k));
        for (id, locs) in &self.locations {
            let p = index.position(id).expect("a known blob has a position");
            let mine: Vec<_> = table.iter().filter(|t| t.entry.id == *id).collect();
            assert!(mine.iter().all(|t| t.blob == p));
            assert_eq!(mine.len(), locs.len());
            let first = table[p];
            assert_eq!((index.packs()[first.pack as usize], first.entry), locs[0]);
            assert_eq!(index.pack_position(&locs[0].0), Some(first.pack));
        }
        let positions: HashSet<usize> = table.iter().map(|t| t.blob).collect();
        assert_eq!(positions.len(), self.locations.len());
        for id in absent {
            assert_eq!(index.position(id), None);
        }
    }
}

/// A deterministic pseudo-random sequence (xorshift).
pub(crate) struct Rng(pub(crate) u64);

impl Rng {
    pub(crate) fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    pub(crate) fn id(&mut self) -> Id {
        let mut out = [0u8; 32];
        for chunk in out.chunks_mut(8) {
            chunk.copy_from_slice(&self.next().to_le_bytes());
        }
        Id(out)
    }
}

fn entry(id: Id, offset: u64) -> BlobEntry {
    BlobEntry {
        kind: BlobKind::Data,
        compression: Compression::Zstd,
        id,
        offset,
        length: 100 + (offset % 7) as u32,
        raw_length: 65536,
    }
}

/// Listings of `packs` packs (some listed twice), drawing blob ids from a pool so that
/// many blobs are stored more than once, a few twice in one pack.
fn listings(rng: &mut Rng, pool: &[Id], packs: &[Id], count: usize) -> Vec<(Id, Vec<BlobEntry>)> {
    (0..count)
        .map(|_| {
            let pack = packs[rng.next() as usize % packs.len()];
            let n = 1 + rng.next() as usize % 40;
            let entries = (0..n).map(|k| entry(pool[rng.next() as usize % pool.len()], k as u64 * 1000)).collect();
            (pack, entries)
        })
        .collect()
}

#[test]
fn duplicates_keep_the_first_location_then_copies_in_load_order() {
    let (a, b, c, d) = (Id([1; 32]), Id([2; 32]), Id([3; 32]), Id([4; 32]));
    let (p1, p2, p3, p4) = (Id([11; 32]), Id([12; 32]), Id([13; 32]), Id([14; 32]));
    let lists = vec![
        (p1, vec![entry(a, 0), entry(b, 100)]),
        (p2, vec![entry(a, 0), entry(c, 100)]),
        (p1, vec![entry(a, 0), entry(b, 100)]),
        (p3, vec![entry(c, 0), entry(a, 50), entry(a, 200)]),
        // Offsets that do not increase: the first mention of d is kept.
        (p4, vec![entry(d, 500), entry(d, 100), entry(a, 0)]),
    ];
    let mut builder = IndexBuilder::new();
    let mut one_by_one = BlobIndex::default();
    for (pack, entries) in &lists {
        builder.add_pack(*pack, entries);
        one_by_one.add_pack(*pack, entries);
    }
    for index in [builder.finish(), one_by_one] {
        assert_eq!(index.len(), 4);
        let offsets = |id: Id| index.locations(&id).map(|(p, e)| (p, e.offset)).collect::<Vec<_>>();
        assert_eq!(offsets(a), vec![(p1, 0), (p2, 0), (p3, 50), (p4, 0)]);
        assert_eq!(offsets(b), vec![(p1, 100)]);
        assert_eq!(offsets(c), vec![(p2, 100), (p3, 0)]);
        assert_eq!(offsets(d), vec![(p4, 500)]);
        assert_eq!(index.get(&a).map(|l| l.0), Some(p1));
        assert_eq!(index.iter().count(), 4);
        assert_eq!(index.iter_all().count(), 8);
    }
}

/// Bulk, one listing at a time, and a bulk load followed by listings added one at a time
/// (as a backup adds the packs it writes) all give the model's answers.
#[test]
fn bulk_incremental_and_mixed_loads_agree_with_the_model() {
    let mut rng = Rng(0x1234_5678_9abc_def1);
    let pool: Vec<Id> = (0..3000).map(|_| rng.id()).collect();
    let packs: Vec<Id> = (0..60).map(|_| rng.id()).collect();
    let absent: Vec<Id> = (0..200).map(|_| rng.id()).collect();
    let lists = listings(&mut rng, &pool, &packs, 150);
    let mut model = Model::default();
    let mut bulk = IndexBuilder::new();
    let mut incremental = BlobIndex::default();
    for (pack, entries) in &lists {
        model.add_pack(*pack, entries);
        bulk.add_pack(*pack, entries);
        incremental.add_pack(*pack, entries);
    }
    let mut bulk = bulk.finish();
    model.assert_same(&bulk, &absent);
    model.assert_same(&incremental, &absent);
    assert!(incremental.runs.len() <= 12, "{} runs", incremental.runs.len());
    assert_eq!(bulk.runs.len(), 1);
    // More listings on the loaded index: new blobs, copies and repeats.
    let more_pool: Vec<Id> = pool.iter().step_by(3).copied().chain((0..500).map(|_| rng.id())).collect();
    for (pack, entries) in listings(&mut rng, &more_pool, &packs, 80) {
        model.add_pack(pack, &entries);
        bulk.add_pack(pack, &entries);
        model.assert_same(&bulk, &absent[..10]);
    }
    model.assert_same(&bulk, &absent);
}

#[test]
fn an_empty_index_knows_nothing() {
    let absent: Vec<Id> = (0..5u8).map(|k| Id([k; 32])).collect();
    let model = Model::default();
    model.assert_same(&BlobIndex::default(), &absent);
    model.assert_same(&IndexBuilder::new().finish(), &absent);
    let mut index = BlobIndex::default();
    index.add_pack(Id([9; 32]), &[]);
    assert!(index.is_empty());
    assert_eq!(index.packs(), &[Id([9; 32])]);
    assert_eq!(index.expected_pack_size(&Id([9; 32])), Some(super::pack_size(0, 0)));
}

/// Loading without some packs leaves out their blobs (unless stored elsewhere) and the
/// packs themselves; the rest reads as before.
#[test]
fn excluded_packs_are_left_out_of_a_load() {
    let opts = InitOptions { kdf: KdfParams::MIN, pack_size: 64 * 1024, ..InitOptions::default() };
    let repo = Repository::init(Box::new(MemoryBackend::new()), b"pw", &opts).unwrap();
    let mut codec = BlobCodec::for_repo(&repo);
    let mut rng = Rng(77);
    let mut write = |blobs: &[Vec<u8>]| {
        let mut w = PackWriter::new(&repo);
        for plain in blobs {
            w.add(codec.seal(BlobKind::Data, repo.keys().blob_id(plain), plain)).unwrap();
        }
        w.finish().unwrap();
    };
    let blobs: Vec<Vec<u8>> =
        (0..60).map(|_| (0..3000).flat_map(|_| rng.next().to_le_bytes()).take(20000).collect()).collect();
    write(&blobs);
    let full = BlobIndex::load(&repo).unwrap();
    assert_eq!(full.len(), 60);
    let excluded: HashSet<Id> = full.packs()[..2].iter().copied().collect();
    let gone: Vec<Id> = full.iter().filter(|(_, p, _)| excluded.contains(p)).map(|(i, _, _)| i).collect();
    assert!(!gone.is_empty());
    let partial = BlobIndex::load_excluding(&repo, &excluded).unwrap();
    let (scanned, skipped) = BlobIndex::scan(&repo, &excluded).unwrap();
    assert!(skipped.stray.is_empty() && skipped.damaged.is_empty());
    for index in [&partial, &scanned] {
        assert_eq!(index.len(), 60 - gone.len());
        assert!(index.packs().iter().all(|p| !excluded.contains(p)));
        assert!(gone.iter().all(|id| !index.contains(id)));
        for (id, pack, entry) in full.iter().filter(|(_, p, _)| !excluded.contains(p)) {
            assert_eq!(index.get(&id), Some((pack, entry)));
        }
        assert_eq!(index.files(), full.files());
    }
    // The excluded blobs stored again: found, in the new packs only.
    write(&blobs[..10]);
    let again = BlobIndex::load_excluding(&repo, &excluded).unwrap();
    for id in gone.iter().filter(|id| blobs[..10].iter().any(|b| repo.keys().blob_id(b) == **id)) {
        assert!(again.locations(id).all(|(p, _)| !excluded.contains(&p)));
        assert!(again.contains(id));
    }
}
