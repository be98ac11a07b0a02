//! The index through its cache against the index loaded into memory from the same index
//! files: built from nothing, with files added, with files replaced and removed, with the
//! cache damaged in every section, of another repository, and with packs excluded.

use std::collections::{BTreeSet, HashSet};
use std::path::Path;

use blockproof_format::{BlobEntry, BlobKind, Compression, Id, IndexFile, KdfParams};
use blockproof_store::{Kind, MemoryBackend};

use super::{mac, CachedTable, CACHE_FILE, HEADER_LEN, PAGE_SLOTS, PASS_PAGES};
use crate::blob_table::SLOT_SIZE;
use crate::index::tests::Rng;
use crate::{BlobIndex, InitOptions, MarkQueue, Marks, Repository};

fn repo() -> (Repository, MemoryBackend) {
    let opts = InitOptions { kdf: KdfParams::MIN, ..InitOptions::default() };
    let store = MemoryBackend::new();
    (Repository::init(Box::new(store.clone()), b"pw", &opts).unwrap(), store)
}

/// Another session of the same repository, with its index cache in `dir`.
fn cached(store: &MemoryBackend, dir: &Path) -> Repository {
    let mut r = Repository::open(Box::new(store.clone()), b"pw").unwrap();
    r.set_index_cache(Some(dir.to_path_buf()));
    r
}

/// Writes `files` index files of 1–4 pack listings each, drawing blob ids from `pool` so
/// that many blobs are stored more than once; some packs are listed again (with the same
/// listing, as a pack's contents never change).
fn write_files(repo: &Repository, rng: &mut Rng, pool: &[Id], packs: &mut Vec<Listing>, files: usize) -> Vec<String> {
    (0..files)
        .map(|_| {
            let listings = (0..1 + rng.next() % 4)
                .map(|_| {
                    if !packs.is_empty() && rng.next().is_multiple_of(5) {
                        return packs[rng.next() as usize % packs.len()].clone();
                    }
                    let n = 1 + rng.next() as usize % 300;
                    let entries: Vec<BlobEntry> = (0..n)
                        .map(|k| BlobEntry {
                            kind: if k % 50 == 0 { BlobKind::Tree } else { BlobKind::Data },
                            compression: Compression::Lz4,
                            id: pool[rng.next() as usize % pool.len()],
                            offset: k as u64 * 70_000,
                            length: 1000 + (rng.next() % 60_000) as u32,
                            raw_length: 65_536,
                        })
                        .collect();
                    packs.push((rng.id(), entries));
                    packs[packs.len() - 1].clone()
                })
                .collect();
            repo.write_index_file(&IndexFile { packs: listings }).unwrap().to_hex()
        })
        .collect()
}

type Listing = (Id, Vec<BlobEntry>);

/// The two indexes answer every query alike. `exact`: also in the same order (a cache
/// built from nothing loads the files in the same order as memory does).
fn assert_agree(memory: &BlobIndex, cache: &BlobIndex, absent: &[Id], exact: bool) {
    assert!(cache.layers().0, "the index was loaded through its cache");
    assert!(cache.damage().is_none());
    assert_eq!(cache.len(), memory.len());
    assert_eq!(cache.table_len(), memory.table_len());
    let set = |i: &BlobIndex| i.packs().iter().copied().collect::<BTreeSet<_>>();
    assert_eq!(set(cache), set(memory));
    let files = |i: &BlobIndex| i.file_packs().map(|(f, p)| (f.to_string(), p.to_vec())).collect::<BTreeSet<_>>();
    assert_eq!(files(cache), files(memory));
    let table: Vec<_> = cache.iter_table().collect();
    assert_eq!(table.len(), cache.table_len());
    let mut ids = HashSet::new();
    for t in &table {
        let id = t.entry.id;
        assert_eq!(cache.position(&id), Some(t.blob));
        if !ids.insert(id) {
            continue;
        }
        assert!(cache.contains(&id));
        assert_eq!(table[t.blob].at, t.blob);
        let (mine, theirs): (Vec<_>, Vec<_>) = (cache.locations(&id).collect(), memory.locations(&id).collect());
        if exact {
            assert_eq!(mine, theirs);
        } else {
            assert_eq!(mine.iter().map(|(p, _)| *p).collect::<BTreeSet<_>>().len(), mine.len());
            let key = |v: &[(Id, BlobEntry)]| v.iter().map(|(p, e)| (*p, e.offset)).collect::<BTreeSet<_>>();
            assert_eq!(key(&mine), key(&theirs), "{id:?}");
        }
        assert_eq!(cache.get(&id), mine.first().copied());
        let (pack, entry) = mine[0];
        assert_eq!(cache.expected_pack_size(&pack), memory.expected_pack_size(&pack));
        assert_eq!(entry.id, id);
    }
    assert_eq!(ids.len(), memory.len());
    if exact {
        let memory_table: Vec<_> = memory.iter_table().collect();
        assert_eq!(table, memory_table);
    }
    for id in absent {
        assert!(!cache.contains(id) && cache.get(id).is_none() && cache.position(id).is_none());
    }
}

/// Marking `ids` through a [`MarkQueue`] (sorted aside, marked in one walk along the
/// table) gives the marks and the unknown ids that a lookup each gives; its temporary
/// files are gone afterwards.
fn assert_queue_agrees(index: &BlobIndex, ids: &[Id], dir: &Path) {
    let mut direct = Marks::new(index);
    let mut unknown_direct: Vec<Id> = ids.iter().filter(|id| direct.mark(index, id).is_none()).copied().collect();
    unknown_direct.sort();
    unknown_direct.dedup();
    let mut queued = Marks::new(index);
    let mut queue = MarkQueue::new(index);
    for id in ids {
        queue.push(index, &mut queued, *id).unwrap();
    }
    let unknown = queue.finish(index, &mut queued).unwrap();
    assert_eq!(queued, direct);
    assert_eq!(unknown, unknown_direct);
    let left: Vec<_> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert!(left.iter().all(|n| n == CACHE_FILE), "{left:?}");
}

/// Looking `ids` up together ([`BlobIndex::stored_where_sorted`]: every page in order,
/// or a page per id for a few) answers as a lookup each, with some packs not usable.
fn assert_sorted_lookups_agree(index: &BlobIndex, ids: &[Id]) {
    let mut sorted = ids.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    let usable = |pack: &Id| !pack.0[0].is_multiple_of(3);
    let few = vec![sorted[0], sorted[sorted.len() / 2]];
    for pick in [sorted, few] {
        let mut got = Vec::new();
        index.stored_where_sorted(pick.iter().copied(), pick.len() as u64, usable, |id, s| got.push((id, s)));
        let want: Vec<_> = pick.iter().map(|id| (*id, index.stored_where(id, usable))).collect();
        assert_eq!(got, want);
    }
}

fn modified(path: &Path) -> (u64, std::time::SystemTime) {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).unwrap();
    (m.ino(), m.modified().unwrap())
}

/// From nothing (several spilled runs: batches are small in tests), then index files
/// added (read on top of the cache, then rebuilt into it), then files replaced and
/// removed as gc does: the cache answers as the index loaded into memory does.
#[test]
fn the_cache_agrees_with_memory_as_files_come_and_go() {
    let (repo, store) = repo();
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng(0x5eed_1234_abcd_0001);
    let pool: Vec<Id> = (0..20_000).map(|_| rng.id()).collect();
    let absent: Vec<Id> = (0..500).map(|_| rng.id()).collect();
    let mut packs = Vec::new();
    write_files(&repo, &mut rng, &pool, &mut packs, 40);
    let c = cached(&store, dir.path());
    let memory = BlobIndex::load(&repo).unwrap();
    assert!(memory.table_len() > 10 * super::BATCH_SLOTS, "{} slots", memory.table_len());
    assert!(memory.table_len() > 20 * PAGE_SLOTS);
    assert_agree(&memory, &BlobIndex::load(&c).unwrap(), &absent, true);
    let file = dir.path().join(CACHE_FILE);
    let built = modified(&file);

    // A file more: read on top of the cache, which stays as it is.
    write_files(&repo, &mut rng, &pool, &mut packs, 1);
    let memory = BlobIndex::load(&repo).unwrap();
    let index = BlobIndex::load(&c).unwrap();
    assert!(index.layers().1 > 0);
    assert_agree(&memory, &index, &absent, false);
    assert_eq!(modified(&file), built);
    // Marking many blobs at once (every page read in order; repeats; blobs only the run
    // in memory holds; unknown ones), and a few (a page each).
    let mut many: Vec<Id> = pool.iter().chain(&absent).chain(&pool[..5000]).copied().collect();
    many.extend(index.iter_table().skip(index.table_len() - 50).map(|t| t.entry.id));
    assert_queue_agrees(&index, &many, dir.path());
    let few: Vec<Id> = pool.iter().step_by(997).chain(&absent[..3]).copied().collect();
    assert_queue_agrees(&index, &few, dir.path());
    assert_sorted_lookups_agree(&index, &many);
    let (mut usable, mut unusable) = (0, 0);
    for id in &many {
        match index.stored_where(id, |pack| !pack.0[0].is_multiple_of(3)) {
            true => usable += 1,
            false => unusable += 1,
        }
    }
    assert!(usable > 1000 && unusable > 1000, "both answers are tried: {usable}, {unusable}");
    assert_queue_agrees(&index, &[], dir.path());
    assert_queue_agrees(&memory, &many, dir.path());

    // Many more: the cache is rebuilt with them.
    write_files(&repo, &mut rng, &pool, &mut packs, crate::index::load::DELTA_FILES + 1);
    let memory = BlobIndex::load(&repo).unwrap();
    let index = BlobIndex::load(&c).unwrap();
    assert!(index.layers().1 == 0, "everything is in the rebuilt cache");
    assert_ne!(modified(&file), built);
    assert_agree(&memory, &index, &absent, false);

    // gc: one file replaced by one listing part of its packs, another removed outright.
    let names = repo.backend().list(Kind::Index).unwrap();
    let first = repo.read_index_file(&names[0]).unwrap();
    let part = IndexFile { packs: first.packs[..first.packs.len().div_ceil(2)].to_vec() };
    repo.write_index_file(&part).unwrap();
    repo.backend().remove(Kind::Index, &names[0]).unwrap();
    repo.backend().remove(Kind::Index, &names[1]).unwrap();
    let memory = BlobIndex::load(&repo).unwrap();
    let index = BlobIndex::load(&c).unwrap();
    assert!(index.layers().1 == 0);
    assert_agree(&memory, &index, &absent, false);
    assert!(index.files().iter().all(|f| *f != names[0] && *f != names[1]));
    let again = BlobIndex::load(&c).unwrap();
    assert_agree(&memory, &again, &absent, false);
}

/// A cache that is damaged anywhere, truncated, or another repository's is never
/// believed: refused at open (and rebuilt), or, for a page, noticed at the lookup that
/// reads it (reported as damage, the file removed) and rebuilt by the next load.
#[test]
fn a_damaged_or_foreign_cache_is_never_believed() {
    let (repo, store) = repo();
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng(99);
    let pool: Vec<Id> = (0..5_000).map(|_| rng.id()).collect();
    write_files(&repo, &mut rng, &pool, &mut Vec::new(), 10);
    let c = cached(&store, dir.path());
    let memory = BlobIndex::load(&repo).unwrap();
    drop(BlobIndex::load(&c).unwrap());
    let file = dir.path().join(CACHE_FILE);
    let good = std::fs::read(&file).unwrap();
    let slots = memory.table_len();
    let filter_at = HEADER_LEN + slots * SLOT_SIZE;
    let meta_len = u64::from_le_bytes(good[64..72].try_into().unwrap()) as usize;
    let meta_at = good.len() - meta_len;
    let flip = |at: usize| {
        let mut b = good.clone();
        b[at] ^= 0x40;
        std::fs::write(&file, b).unwrap();
    };

    // Header, meta section (fences, MACs, packs): refused at open, rebuilt.
    for at in [0, 4, 8, 45, 70, 100, good.len() - 1, good.len() - 40, meta_at + meta_len / 2, meta_at] {
        flip(at);
        assert_agree(&memory, &BlobIndex::load(&c).unwrap(), &[], true);
        assert_eq!(std::fs::read(&file).unwrap().len(), good.len(), "rebuilt whole");
    }
    std::fs::write(&file, &good[..good.len() - 1]).unwrap();
    assert_agree(&memory, &BlobIndex::load(&c).unwrap(), &[], true);

    // A page: found by the lookup that reads it.
    let page = 3;
    flip(HEADER_LEN + page * PAGE_SLOTS * SLOT_SIZE + 17);
    let index = BlobIndex::load(&c).unwrap();
    let victim = memory.iter_table().nth(page * PAGE_SLOTS + 1).unwrap().entry.id;
    assert_eq!(index.get(&victim), None, "a page that fails its check gives nothing");
    let damage = index.damage().expect("the damage is reported").to_string();
    assert!(damage.contains("page 3 does not authenticate"), "{damage}");
    assert!(!file.exists(), "the damaged cache is removed");
    let table: Vec<_> = BlobIndex::load(&c).unwrap().iter_table().collect();
    assert_eq!(table.len(), slots);
    // ... and by a pass over the table, which ends early and says so.
    flip(HEADER_LEN + page * PAGE_SLOTS * SLOT_SIZE + 17);
    let index = BlobIndex::load(&c).unwrap();
    assert!(index.iter_table().count() < slots);
    assert!(index.damage().is_some());
    // ... and by marking through a queue, which marks nothing from that page on.
    flip(HEADER_LEN + page * PAGE_SLOTS * SLOT_SIZE + 17);
    let index = BlobIndex::load(&c).unwrap();
    let (mut marks, mut queue) = (Marks::new(&index), MarkQueue::new(&index));
    for t in memory.iter_table() {
        queue.push(&index, &mut marks, t.entry.id).unwrap();
    }
    let unknown = queue.finish(&index, &mut marks).unwrap();
    assert!(marks.count() < memory.len());
    assert_eq!(marks.count() + unknown.len(), memory.len());
    assert!(index.damage().unwrap().to_string().contains("page 3 does not authenticate"));
    // ... and by looking ids up together: none is found from the pages read with it on.
    flip(HEADER_LEN + page * PAGE_SLOTS * SLOT_SIZE + 17);
    let index = BlobIndex::load(&c).unwrap();
    let mut ids: Vec<Id> = memory.iter().map(|(id, _, _)| id).collect();
    ids.sort_unstable();
    let mut found = Vec::new();
    index.stored_where_sorted(ids.into_iter(), slots as u64, |_| true, |_, s| found.push(s));
    let first_lost = found.iter().position(|s| !s).unwrap();
    assert!(first_lost <= page * PAGE_SLOTS && found[first_lost..].iter().all(|s| !s), "{first_lost}");
    assert!(index.damage().unwrap().to_string().contains("page 3 does not authenticate"));

    // The filter: a membership test falls back to the table, the damage is reported.
    std::fs::write(&file, &good).unwrap();
    flip(filter_at + 3);
    let index = BlobIndex::load(&c).unwrap();
    assert!(index.contains(&victim));
    assert!(index.damage().unwrap().to_string().contains("filter does not authenticate"));

    // A page that fails its check while the cache is merged into a rebuild (gc removed
    // an index file): built again from nothing.
    flip(HEADER_LEN + page * PAGE_SLOTS * SLOT_SIZE + 17);
    let names = repo.backend().list(Kind::Index).unwrap();
    repo.backend().remove(Kind::Index, &names[0]).unwrap();
    let memory = BlobIndex::load(&repo).unwrap();
    assert_agree(&memory, &BlobIndex::load(&c).unwrap(), &[], true);

    // Another repository's cache file, whole and valid for it: refused.
    let (other, other_store) = self::repo();
    write_files(&other, &mut rng, &pool, &mut Vec::new(), 3);
    let other_dir = tempfile::tempdir().unwrap();
    drop(BlobIndex::load(&cached(&other_store, other_dir.path())).unwrap());
    std::fs::copy(other_dir.path().join(CACHE_FILE), &file).unwrap();
    assert_agree(&memory, &BlobIndex::load(&c).unwrap(), &[], true);
}

/// Strict loads refuse what they refused without a cache (a damaged index file, a stray
/// file), tolerant loads skip and list it; excluded packs are left out of lookups.
#[test]
fn strictness_and_exclusion_are_kept() {
    let (repo, store) = repo();
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng(7);
    let pool: Vec<Id> = (0..3_000).map(|_| rng.id()).collect();
    let mut packs = Vec::new();
    write_files(&repo, &mut rng, &pool, &mut packs, 6);
    let c = cached(&store, dir.path());
    let memory = BlobIndex::load(&repo).unwrap();
    let excluded: HashSet<Id> = memory.packs()[..3].iter().copied().collect();
    let partial = BlobIndex::load_excluding(&c, &excluded).unwrap();
    for (id, _, _) in memory.iter() {
        let want: Vec<_> = memory.locations(&id).filter(|(p, _)| !excluded.contains(p)).collect();
        assert_eq!(partial.locations(&id).collect::<Vec<_>>(), want);
        assert_eq!(partial.contains(&id), !want.is_empty());
    }
    assert!(partial.iter_all().all(|(_, p, _)| !excluded.contains(&p)));
    let ids: Vec<Id> = memory.iter().map(|(id, _, _)| id).collect();
    assert_sorted_lookups_agree(&partial, &ids);

    // A damaged index file and a stray one, added after the cache was built.
    let bad = write_files(&repo, &mut rng, &pool, &mut packs, 1).pop().unwrap();
    let mut bytes = repo.backend().read(Kind::Index, &bad).unwrap();
    bytes[60] ^= 1;
    repo.backend().remove(Kind::Index, &bad).unwrap();
    repo.backend().write(Kind::Index, &bad, &bytes).unwrap();
    repo.backend().write(Kind::Index, "notes", b"x").unwrap();
    let strict = BlobIndex::load(&c).err().unwrap().to_string();
    assert!(strict.contains("notes"), "{strict}");
    repo.backend().remove(Kind::Index, "notes").unwrap();
    assert!(BlobIndex::load(&c).err().unwrap().is_damage());
    let (scanned, skipped) = BlobIndex::scan(&c, &HashSet::new()).unwrap();
    assert_eq!(skipped.damaged.len(), 1);
    assert!(skipped.damaged[0].contains(&bad));
    assert_agree(&memory, &scanned, &[], false);
    // Never covered: still reported by the next load, with the cache rebuilt or not.
    std::fs::remove_file(dir.path().join(CACHE_FILE)).unwrap();
    assert_eq!(BlobIndex::scan(&c, &HashSet::new()).unwrap().1.damaged.len(), 1);
    assert_eq!(BlobIndex::scan(&c, &HashSet::new()).unwrap().1.damaged.len(), 1);
}

/// Sorted runs a killed process left beside the cache (a cache build's, a gc's marks)
/// are removed by the next load through the cache; the cache itself stays.
#[test]
fn a_load_removes_the_runs_of_a_killed_process() {
    let (repo, store) = repo();
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng(11);
    let pool: Vec<Id> = (0..500).map(|_| rng.id()).collect();
    write_files(&repo, &mut rng, &pool, &mut Vec::new(), 3);
    let c = cached(&store, dir.path());
    BlobIndex::load(&c).unwrap();
    let left = [
        "marks.run4194305-0.lock",
        "marks.run4194305-0.0",
        "blob-index.run4194306-2.lock",
        "blob-index.run4194306-2.7",
        "blob-index.run4194306-2.cache",
    ];
    for name in left {
        std::fs::write(dir.path().join(name), vec![0u8; 4096]).unwrap();
    }
    let memory = BlobIndex::load(&repo).unwrap();
    assert_agree(&memory, &BlobIndex::load(&c).unwrap(), &[], false);
    let names: Vec<String> =
        std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    assert_eq!(names, [CACHE_FILE.to_string()]);
}

/// The file's layout is pinned: magic, version, where each header field lies, and the
/// size the sections add up to.
#[test]
fn the_layout_is_pinned() {
    let (repo, store) = repo();
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng(3);
    let pool: Vec<Id> = (0..1_000).map(|_| rng.id()).collect();
    write_files(&repo, &mut rng, &pool, &mut Vec::new(), 2);
    let memory = BlobIndex::load(&repo).unwrap();
    drop(BlobIndex::load(&cached(&store, dir.path())).unwrap());
    let b = std::fs::read(dir.path().join(CACHE_FILE)).unwrap();
    let u64_at = |at: usize| u64::from_le_bytes(b[at..at + 8].try_into().unwrap());
    assert_eq!(&b[..8], b"BPIX\x02\x00\x00\x00");
    assert_eq!(&b[8..40], &repo.id().0);
    assert_eq!(u64_at(40) as usize, memory.table_len());
    assert_eq!(u64_at(48) as usize, memory.len());
    assert_eq!(&b[72..80], &[128, 0, 0, 0, 0, 0, 0, 0]);
    let pages = memory.table_len().div_ceil(128) as u64;
    let files: u64 = memory.file_packs().map(|(_, p)| 36 + 4 * p.len() as u64).sum();
    let windows = pages.div_ceil(64);
    let meta = 4 + 48 * memory.packs().len() as u64 + 4 + files + pages * (16 + 32) + windows * 16;
    assert_eq!(u64_at(64), meta);
    assert!(u64_at(56) >= (memory.len() as u64 * 8).div_ceil(256), "1 byte of filter per blob");
    assert_eq!(b.len() as u64, 128 + 54 * memory.table_len() as u64 + 32 * u64_at(56) + meta);
    // The MACs: a page's, then (the meta section's last bytes) its window's.
    let key = repo.keys().cache_hasher();
    let table = &b[128..128 + 54 * memory.table_len()];
    let meta_at = b.len() - meta as usize;
    let page_key = blake3::Hasher::new_keyed(&mac(&key, b"page key", &[]));
    let page_mac =
        *page_key.clone().update(&table[..table.len().min(128 * 54)]).update(&0u64.to_le_bytes()).finalize().as_bytes();
    let macs_at = meta_at + meta as usize - (windows * 16 + pages * 48) as usize;
    assert_eq!(&b[macs_at..macs_at + 16], &page_mac[..16]);
    let window_mac = mac(&key, b"window", &[&0u64.to_le_bytes(), table]);
    assert_eq!(&b[b.len() - 16..], &window_mac[..16]);
}

/// A whole window of pages is believed by its one MAC (its pages' MACs are then not
/// needed); a window that fails it, page by page; a single page, by its own MAC.
#[test]
fn a_window_is_read_by_its_own_mac() {
    let (repo, store) = repo();
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng(5);
    let pool: Vec<Id> = (0..20_000).map(|_| rng.id()).collect();
    write_files(&repo, &mut rng, &pool, &mut Vec::new(), 40);
    drop(BlobIndex::load(&cached(&store, dir.path())).unwrap());
    let (mut table, _) = CachedTable::open(&dir.path().join(CACHE_FILE), &repo).unwrap();
    let pages = table.pages();
    assert!(pages > PASS_PAGES, "{pages} pages: more than one window");
    let (first, last) = (table.window_of(0), table.window_of(pages - 1));
    assert_eq!((first.clone(), last.end), (0..PASS_PAGES, pages));
    // Page 3's MAC made wrong in memory: its window still reads whole, the page alone not.
    let good = table.macs[3];
    table.macs[3] = [0; 16];
    assert_eq!(table.read_pages(0, PASS_PAGES, &mut Vec::new()).unwrap().len(), PASS_PAGES);
    assert_eq!(table.read_pages(last.start, last.len(), &mut Vec::new()).unwrap().len(), last.len());
    assert!(table.read_pages(3, 1, &mut Vec::new()).unwrap_err().contains("page 3 does not authenticate"));
    assert!(
        table.read_pages(1, 4, &mut Vec::new()).unwrap_err().contains("page 3"),
        "not a whole window: page by page"
    );
    // The window's MAC made wrong: its pages are checked one by one, and all pass...
    table.macs[3] = good;
    table.windows[0] = [0; 16];
    assert_eq!(table.read_pages(0, PASS_PAGES, &mut Vec::new()).unwrap().len(), PASS_PAGES);
    // ... unless one fails, which is named.
    table.macs[3] = [0; 16];
    assert!(table.read_pages(0, PASS_PAGES, &mut Vec::new()).unwrap_err().contains("page 3 does not authenticate"));
    assert!(table.damage().is_none(), "read_pages reports; its callers record");
}

/// A basis (the index files lookups rested on) holds while every file it names is loaded
/// whole: through files added beside the cache and a rebuild that appends them; not once
/// a file it names is removed (nor a file the cache covered: the rebuild drops it from
/// the list the digest is of), not with packs excluded, not without the cache.
#[test]
fn a_basis_holds_while_its_files_remain() {
    let (repo, store) = repo();
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng(0xba515);
    let pool: Vec<Id> = (0..2_000).map(|_| rng.id()).collect();
    let mut packs = Vec::new();
    write_files(&repo, &mut rng, &pool, &mut packs, 40);
    let c = cached(&store, dir.path());
    let first = BlobIndex::load(&c).unwrap();
    // The process writes a file of its own; the next one reads it beside the cache.
    let own = write_files(&repo, &mut rng, &pool, &mut packs, 1).pop().unwrap();
    let own_id: Id = own.parse().unwrap();
    let basis = first.basis(&[own_id]).unwrap();
    assert_eq!((basis.cached, basis.files.clone()), (40, vec![own_id]));
    let next = BlobIndex::load(&c).unwrap();
    assert!(next.holds(&basis));
    let beside = next.basis(&[]).unwrap();
    assert_eq!((beside.cached, beside.files.clone()), (40, vec![own_id]), "read beside the cache");
    assert!(next.basis(&vec![own_id; blockproof_format::basis::BASIS_FILES]).is_none(), "too many files");

    // Enough files for a rebuild, which appends them: both bases hold.
    write_files(&repo, &mut rng, &pool, &mut packs, crate::index::load::DELTA_FILES + 1);
    let rebuilt = BlobIndex::load(&c).unwrap();
    assert!(rebuilt.layers().1 == 0, "everything is in the rebuilt cache");
    assert!(rebuilt.holds(&basis) && rebuilt.holds(&beside));
    let whole = rebuilt.basis(&[]).unwrap();
    assert_eq!((whole.cached as usize, whole.files.len()), (rebuilt.files().len(), 0));
    assert!(BlobIndex::load(&c).unwrap().holds(&whole));
    let memory = BlobIndex::load(&repo).unwrap();
    assert!(!memory.holds(&whole) && !memory.holds(&basis), "an index without the cache names none by digest");
    assert!(memory.holds(&memory.basis(&[]).unwrap()));
    let some: HashSet<Id> = rebuilt.packs()[..1].iter().copied().collect();
    let excluded = BlobIndex::load_excluding(&c, &some).unwrap();
    assert!(!excluded.holds(&whole) && excluded.basis(&[]).is_none(), "packs left out");

    // The process's own file removed: the cache is rebuilt without it.
    repo.backend().remove(Kind::Index, &own).unwrap();
    let after = BlobIndex::load(&c).unwrap();
    assert!(!after.holds(&basis) && !after.holds(&beside) && !after.holds(&whole));
    let now = after.basis(&[]).unwrap();
    assert!(BlobIndex::load(&c).unwrap().holds(&now));
    // A file named only by the digest removed.
    let covered = after.files()[0].clone();
    repo.backend().remove(Kind::Index, &covered).unwrap();
    assert!(!BlobIndex::load(&c).unwrap().holds(&now));
}
