//! `DiskImage`, the random-access snapshot reader, through the library API: random reads
//! against the source bytes, zero chunks and allocation from the ids alone, several leaf
//! pages, a bounded cache, many threads on one image, damaged packs named, never
//! returned, and the storage reads it makes (counted through `FaultyBackend`): pack
//! regions, not one read per chunk, and a bounded read-ahead for a sequential stream.

use blockproof_core::{backup, BackupOptions, CoreError, DiskImage, DiskInput, NoProgress};
use blockproof_format::KdfParams;
use blockproof_repo::{BlobIndex, BlobReader, InitOptions, Repository};
use blockproof_source::{BlockSource, SourceError};
use blockproof_store::{Faults, FaultyBackend, Kind, LocalBackend, Op};

/// A disk in memory.
struct MemDisk(Vec<u8>);

impl BlockSource for MemDisk {
    fn size(&self) -> u64 {
        self.0.len() as u64
    }

    fn read_ranges(
        &mut self,
        ranges: &mut dyn Iterator<Item = (u64, usize)>,
        sink: &mut dyn FnMut(u64, Vec<u8>) -> bool,
    ) -> Result<(), SourceError> {
        for (offset, len) in ranges {
            if !sink(offset, self.0[offset as usize..offset as usize + len].to_vec()) {
                break;
            }
        }
        Ok(())
    }

    fn zero_ranges(&mut self) -> Result<Vec<(u64, u64)>, SourceError> {
        Ok(Vec::new())
    }

    fn describe(&self) -> String {
        "memdisk".into()
    }
}

const CS: usize = 4096;

/// `chunks` chunks of 4 KiB (plus a short tail): every third chunk zero, the rest distinct.
fn content(chunks: usize, tail: usize) -> Vec<u8> {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    (0..chunks * CS + tail)
        .map(|i| {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            if (i / CS).is_multiple_of(3) {
                0
            } else {
                (x >> 56) as u8
            }
        })
        .collect()
}

struct Fixture {
    _dir: tempfile::TempDir,
    repo: Repository,
    data: Vec<u8>,
}

/// A repository of 4 KiB chunks and 64 KiB packs holding one backup of `data`.
fn fixture(data: Vec<u8>) -> Fixture {
    fixture_packs(data, 64 * 1024)
}

/// A repository of 4 KiB chunks and packs of `pack_size` holding one backup of `data`.
fn fixture_packs(data: Vec<u8>, pack_size: u32) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let opts = InitOptions { kdf: KdfParams::MIN, chunk_size: CS as u32, pack_size, ..Default::default() };
    let repo =
        Repository::init(Box::new(LocalBackend::create(dir.path().join("repo")).unwrap()), b"pw", &opts).unwrap();
    let options = BackupOptions {
        vm: "vm".into(),
        disks: vec![DiskInput::source("d", Box::new(MemDisk(data.clone())))],
        tags: vec![],
        hostname: "test".into(),
        full: false,
        verify: blockproof_core::default_verify_budget(),
        on_mismatch: blockproof_core::OnMismatch::Keep,
        lock_wait: std::time::Duration::ZERO,
        machine: None,
    };
    backup(&repo, options, &NoProgress).unwrap();
    Fixture { _dir: dir, repo, data }
}

fn with_image(f: &Fixture, cache: usize, test: impl FnOnce(&DiskImage<'_>)) {
    let index = BlobIndex::load(&f.repo).unwrap();
    let reader = BlobReader::new(&f.repo, &index);
    let snap = f.repo.resolve_snapshot("vm:latest").unwrap();
    let image = DiskImage::new(&reader, snap.snapshot.disk("d").unwrap(), cache).unwrap();
    test(&image);
}

/// Like [`with_image`], through a `FaultyBackend` that counts the storage calls.
fn with_counted_image(f: &Fixture, cache: usize, test: impl FnOnce(&DiskImage<'_>, &Faults)) {
    let faulty = FaultyBackend::new(Box::new(LocalBackend::open(f._dir.path().join("repo")).unwrap()));
    let faults = faulty.faults();
    let repo = Repository::open(Box::new(faulty), b"pw").unwrap();
    let index = BlobIndex::load(&repo).unwrap();
    let reader = BlobReader::new(&repo, &index);
    let snap = repo.resolve_snapshot("vm:latest").unwrap();
    let image = DiskImage::new(&reader, snap.snapshot.disk("d").unwrap(), cache).unwrap();
    test(&image, &faults);
}

/// Ranged reads of pack files since the log held `since` calls.
fn pack_reads(faults: &Faults, since: u64) -> usize {
    faults.log().iter().filter(|c| c.number > since && c.op == Op::ReadAt && c.kind == Kind::Pack).count()
}

/// A deterministic stream of (offset, length) inside `size`.
fn ranges(size: u64, seed: u64, max_len: u64) -> impl Iterator<Item = (u64, usize)> {
    let mut x = seed;
    std::iter::repeat_with(move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let offset = x % size;
        let len = (x >> 32) % max_len.min(size - offset) + 1;
        (offset, len as usize)
    })
}

#[test]
fn random_reads_return_the_source_bytes() {
    // 1100 chunks: two leaf pages at the default fanout of 1024.
    let f = fixture(content(1100, 333));
    let size = f.data.len() as u64;
    with_image(&f, 64 * 1024, |image| {
        assert_eq!(image.size(), size);
        for (offset, len) in ranges(size, 7, 100_000).take(300) {
            let mut buf = vec![0xee; len];
            image.read_at(&mut buf, offset).unwrap();
            assert!(buf == f.data[offset as usize..offset as usize + len], "{offset}+{len}");
        }
        // The whole disk at once (the parallel path), and nothing at all.
        let mut all = vec![0xee; size as usize];
        image.read_at(&mut all, 0).unwrap();
        assert!(all == f.data);
        image.read_at(&mut [], size).unwrap();
        assert!(image.cached_bytes() <= 64 * 1024, "{}", image.cached_bytes());
    });
    // Without a cache, the same bytes.
    with_image(&f, 0, |image| {
        for (offset, len) in ranges(size, 8, 20_000).take(50) {
            let mut buf = vec![0xee; len];
            image.read_at(&mut buf, offset).unwrap();
            assert!(buf == f.data[offset as usize..offset as usize + len], "{offset}+{len}");
        }
        assert_eq!(image.cached_bytes(), 0);
    });
}

#[test]
fn allocation_and_zero_ranges_come_from_the_ids() {
    let f = fixture(content(1100, 333));
    let size = f.data.len() as u64;
    with_image(&f, 0, |image| {
        // Chunk k is zero when k % 3 == 0: 4 KiB of zeros, 8 KiB of data, ...
        let alloc = image.allocation(0, size).unwrap();
        let mut expected: Vec<(u64, bool)> = Vec::new();
        for chunk in f.data.chunks(CS) {
            let zero = chunk.iter().all(|&b| b == 0);
            match expected.last_mut() {
                Some((l, z)) if *z == zero => *l += chunk.len() as u64,
                _ => expected.push((chunk.len() as u64, zero)),
            }
        }
        assert_eq!(alloc, expected);
        assert_eq!(&alloc[..3], &[(4096, true), (8192, false), (4096, true)]);
        assert_eq!(alloc.iter().map(|(l, _)| l).sum::<u64>(), size);
        // The short tail chunk (1100 % 3 == 2: data).
        assert_eq!(alloc.last(), Some(&(4096 + 333, false)));
        assert_eq!(image.allocation(100, 50).unwrap(), vec![(50, true)]);
        assert_eq!(image.allocation(4000, 200).unwrap(), vec![(96, true), (104, false)]);
        assert!(image.is_zero_range(0, 4096).unwrap());
        assert!(image.is_zero_range(1023 * 4096 + 10, 100).unwrap(), "chunk 1023 spans no page edge");
        assert!(!image.is_zero_range(0, 4097).unwrap());
        assert!(image.is_zero_range(5, 0).unwrap());
        // Past the end: a usage error, not a panic.
        for (offset, len) in [(size, 1), (size - 1, 2), (u64::MAX, 2)] {
            let err = image.allocation(offset, len).unwrap_err();
            assert!(err.is_usage(), "{err}");
            let err = image.read_at(&mut [0; 2][..len as usize], offset).unwrap_err();
            assert!(err.is_usage(), "{err}");
        }
    });
}

#[test]
fn many_threads_share_one_image() {
    let f = fixture(content(600, 0));
    let size = f.data.len() as u64;
    with_image(&f, 256 * 1024, |image| {
        std::thread::scope(|s| {
            for t in 0..4u64 {
                let data = &f.data;
                s.spawn(move || {
                    for (offset, len) in ranges(size, 100 + t, 70_000).take(100) {
                        let mut buf = vec![0; len];
                        image.read_at(&mut buf, offset).unwrap();
                        assert!(buf == data[offset as usize..offset as usize + len], "{offset}+{len}");
                    }
                });
            }
        });
        assert!(image.cached_bytes() <= 256 * 1024);
    });
}

#[test]
fn damaged_packs_are_named_never_returned() {
    let f = fixture(content(200, 0));
    // Flip one byte in the middle of every pack file.
    let packs = f._dir.path().join("repo").join("data");
    let mut flipped = 0;
    for entry in walk(&packs) {
        let mut bytes = std::fs::read(&entry).unwrap();
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0x40;
        std::fs::write(&entry, bytes).unwrap();
        flipped += 1;
    }
    assert!(flipped > 0, "no pack files under {}", packs.display());
    with_image(&f, 1 << 20, |image| {
        let mut damaged = 0;
        for chunk in 0..200u64 {
            let mut buf = vec![0; CS];
            match image.read_at(&mut buf, chunk * CS as u64) {
                Ok(()) => assert!(buf == f.data[chunk as usize * CS..][..CS], "chunk {chunk}: wrong bytes"),
                Err(CoreError::DamagedRange { disk, offset, end, .. }) => {
                    assert_eq!((disk.as_str(), offset, end), ("d", chunk * CS as u64, (chunk + 1) * CS as u64));
                    damaged += 1;
                }
                Err(other) => panic!("chunk {chunk}: {other}"),
            }
        }
        assert!(damaged > 0);
        // A read spanning a damaged chunk fails as a whole (the parallel path too).
        assert!(matches!(image.read_at(&mut vec![0; 200 * CS], 0), Err(CoreError::DamagedRange { .. })));
    });
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// Flips a byte inside the sealed bytes of blob `id`.
fn damage_blob(f: &Fixture, id: &blockproof_format::Id) {
    let index = BlobIndex::load(&f.repo).unwrap();
    let (pack, entry) = index.get(id).unwrap();
    let hex = pack.to_hex();
    let path = f._dir.path().join("repo").join("data").join(&hex[..2]).join(&hex);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[(entry.offset + u64::from(entry.length) / 2) as usize] ^= 0x01;
    std::fs::write(&path, bytes).unwrap();
}

/// The ids of the root page of the disk's index.
fn root_page(f: &Fixture) -> (blockproof_format::Id, Vec<blockproof_format::Id>) {
    let index = BlobIndex::load(&f.repo).unwrap();
    let reader = BlobReader::new(&f.repo, &index);
    let root = f.repo.resolve_snapshot("vm:latest").unwrap().snapshot.disk("d").unwrap().index_root;
    let page = reader.read(&root, blockproof_format::BlobKind::Tree).unwrap();
    (root, page.chunks(32).map(|c| blockproof_format::Id(c.try_into().unwrap())).collect())
}

fn restore_error(f: &Fixture) -> String {
    let target = f._dir.path().join("restored.img");
    let opts = blockproof_core::RestoreOptions {
        snapshot: "vm:latest".into(),
        disk: "d".into(),
        target: target.clone(),
        ..Default::default()
    };
    let err = blockproof_core::restore(&f.repo, &opts, &NoProgress).unwrap_err().to_string();
    assert!(!target.exists());
    err
}

/// Damage to the root of a disk's index used to be reported as damage to its first
/// chunk ("bytes 0..4096"): no byte of the disk can be located, and the message says so.
/// A damaged leaf page names the whole range of chunks it lists, not its first chunk.
#[test]
fn a_damaged_index_page_names_what_it_covers() {
    // 3000 chunks: three leaf pages (1024, 1024, 952 chunks) under one root.
    let f = fixture(content(3000, 0));
    let (root, leaves) = root_page(&f);
    assert_eq!(leaves.len(), 3);
    damage_blob(&f, &root);
    let err = restore_error(&f);
    assert!(err.contains("disk d") && err.contains("index") && err.contains("whole disk"), "{err}");
    assert!(!err.contains("bytes 0.."), "{err}");
    with_image(&f, 0, |image| {
        let err = image.read_at(&mut [0u8; 10], 5 * CS as u64).unwrap_err().to_string();
        assert!(err.contains("whole disk") && !err.contains("bytes 0.."), "{err}");
    });

    let f = fixture(content(3000, 0));
    let (_, leaves) = root_page(&f);
    damage_blob(&f, &leaves[1]);
    let page = 1024 * CS as u64;
    let err = restore_error(&f);
    assert!(err.contains(&format!("bytes {page}..{}", 2 * page)), "the leaf page's whole range: {err}");
    with_image(&f, 0, |image| {
        image.read_at(&mut [0u8; 10], 5 * CS as u64).unwrap();
        let err = image.read_at(&mut [0u8; 10], page + 5).unwrap_err().to_string();
        assert!(err.contains(&format!("bytes {page}..{}", 2 * page)), "{err}");
    });
}

/// 2048 chunks of 4 KiB (8 MiB, every third chunk zero) in packs of 1 MiB.
fn streamed() -> Fixture {
    fixture_packs(content(2048, 0), 1 << 20)
}

/// A read of an uncached region fetches the pack regions its chunks lie in: a 2 MiB read
/// (512 chunks, 341 stored, in about three packs) is a handful of ranged reads. Before
/// issue 22 it was one read per stored chunk.
#[test]
fn a_large_read_fetches_pack_regions_not_chunks() {
    let f = streamed();
    with_counted_image(&f, 64 << 20, |image, faults| {
        let (offset, len) = (1 << 20, 2 << 20);
        let start = faults.calls();
        let mut buf = vec![0xee; len];
        image.read_at(&mut buf, offset as u64).unwrap();
        assert!(buf == f.data[offset..offset + len]);
        let reads = pack_reads(faults, start);
        assert!(reads <= 8, "{reads} pack reads for 341 stored chunks");
        // Now cached: no storage read at all.
        let start = faults.calls();
        image.read_at(&mut buf, offset as u64).unwrap();
        assert!(buf == f.data[offset..offset + len]);
        assert_eq!(pack_reads(faults, start), 0);
    });
}

/// A client streaming the disk in 128 KiB reads (a kernel NBD client, qemu-img convert)
/// gets the following chunks read ahead: far fewer pack reads than stored chunks, the
/// bytes exact, the cache within its bound. Before issue 22: one read per stored chunk.
#[test]
fn a_sequential_stream_is_read_ahead() {
    let f = streamed();
    let stored = f.data.chunks(CS).filter(|c| c.iter().any(|&b| b != 0)).count();
    for cache in [64 << 20, 256 << 10] {
        with_counted_image(&f, cache, |image, faults| {
            let start = faults.calls();
            for offset in (0..f.data.len()).step_by(128 << 10) {
                let mut buf = vec![0xee; 128 << 10];
                image.read_at(&mut buf, offset as u64).unwrap();
                assert!(buf == f.data[offset..offset + buf.len()], "{offset}");
                assert!(image.cached_bytes() <= cache, "{} cached", image.cached_bytes());
            }
            let reads = pack_reads(faults, start);
            assert!(reads * 10 <= stored, "cache {cache}: {reads} pack reads for {stored} stored chunks");
        });
    }
    // Without a cache there is no read-ahead (nothing could keep it): the same bytes, and
    // still no more than a few reads per 128 KiB request.
    with_counted_image(&f, 0, |image, faults| {
        let start = faults.calls();
        for offset in (0..f.data.len()).step_by(128 << 10) {
            let mut buf = vec![0xee; 128 << 10];
            image.read_at(&mut buf, offset as u64).unwrap();
            assert!(buf == f.data[offset..offset + buf.len()], "{offset}");
        }
        assert_eq!(image.cached_bytes(), 0);
        let reads = pack_reads(faults, start);
        assert!(reads <= 2 * 64, "{reads} pack reads for 64 requests");
    });
}

/// A damaged chunk that read-ahead fetched with its neighbours fails no read that does not
/// ask for it; the read that does fails naming exactly its bytes.
#[test]
fn damage_met_by_read_ahead_fails_only_the_read_of_that_chunk() {
    let f = streamed();
    let bad = 301u64; // 301 % 3 != 0: a stored chunk
    let index = BlobIndex::load(&f.repo).unwrap();
    let reader = BlobReader::new(&f.repo, &index);
    let entry = f.repo.resolve_snapshot("vm:latest").unwrap().snapshot.disk("d").unwrap().clone();
    let id =
        blockproof_repo::TreeReader::new(&reader, entry.index_root, 2048, entry.index_fanout).unwrap().leaf(0).unwrap()
            [bad as usize];
    damage_blob(&f, &id);
    with_image(&f, 64 << 20, |image| {
        let step = 128 << 10;
        let mut offset = 0u64;
        while offset + step <= bad * CS as u64 {
            let mut buf = vec![0; step as usize];
            image.read_at(&mut buf, offset).unwrap();
            assert!(buf == f.data[offset as usize..][..step as usize], "{offset}");
            offset += step;
        }
        let mut buf = vec![0; CS];
        match image.read_at(&mut buf, bad * CS as u64) {
            Err(CoreError::DamagedRange { offset, end, .. }) => {
                assert_eq!((offset, end), (bad * CS as u64, (bad + 1) * CS as u64))
            }
            other => panic!("{other:?}"),
        }
        // Past it, the stream goes on.
        let mut buf = vec![0; step as usize];
        image.read_at(&mut buf, (bad + 1) * CS as u64).unwrap();
        assert!(buf == f.data[(bad as usize + 1) * CS..][..step as usize]);
    });
}
