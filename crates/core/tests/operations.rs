//! The operations through the library API, with in-memory sources (fakes are for unit
//! tests; the CLI tests use real files).

use std::sync::atomic::{AtomicU64, Ordering};

use blockproof_core::{backup, check, restore, BackupOptions, CheckOptions, DiskInput, NoProgress, RestoreOptions};
use blockproof_format::KdfParams;
use blockproof_repo::{InitOptions, Repository};
use blockproof_source::{BlockSource, Changes, OpenedDisk, SourceError};
use blockproof_store::LocalBackend;

/// A disk in memory that can be told to fail after some reads.
struct MemDisk {
    data: Vec<u8>,
    fail_after: Option<u64>,
    reads: AtomicU64,
    zero: Vec<(u64, u64)>,
}

impl BlockSource for MemDisk {
    fn size(&self) -> u64 {
        self.data.len() as u64
    }

    fn read_ranges(
        &mut self,
        ranges: &mut dyn Iterator<Item = (u64, usize)>,
        sink: &mut dyn FnMut(u64, Vec<u8>) -> bool,
    ) -> Result<(), SourceError> {
        for (offset, len) in ranges {
            let n = self.reads.fetch_add(1, Ordering::SeqCst);
            if self.fail_after.is_some_and(|f| n >= f) {
                return Err(SourceError::Read {
                    what: "memdisk".into(),
                    offset,
                    len,
                    source: std::io::Error::other("injected EIO"),
                });
            }
            if !sink(offset, self.data[offset as usize..offset as usize + len].to_vec()) {
                break;
            }
        }
        Ok(())
    }

    fn zero_ranges(&mut self) -> Result<Vec<(u64, u64)>, SourceError> {
        Ok(self.zero.clone())
    }

    fn describe(&self) -> String {
        "memdisk".into()
    }
}

fn disk(data: Vec<u8>, fail_after: Option<u64>) -> DiskInput {
    DiskInput::source("d", Box::new(MemDisk { data, fail_after, reads: AtomicU64::new(0), zero: vec![] }))
}

/// A disk whose change source reports `changes` (`None`: no parent state, read all)
/// and whose allocation map reports `zero`.
fn tracked(data: Vec<u8>, changes: Option<Vec<(u64, u64)>>, zero: Vec<(u64, u64)>) -> DiskInput {
    let source = Box::new(MemDisk { data, fail_after: None, reads: AtomicU64::new(0), zero });
    DiskInput {
        id: "d".into(),
        cbt: "changes:test".into(),
        open: Box::new(move |_, _| {
            let changes = match changes {
                Some(r) => Changes::ranges(r),
                None => Changes::All { reason: "test".into() },
            };
            let mut opened = OpenedDisk::full(source, "unused");
            opened.changes = changes;
            Ok(opened)
        }),
        verify: None,
    }
}

fn content(size: usize) -> Vec<u8> {
    (0..size).map(|i| if (i / 65536) % 3 == 0 { 0 } else { (i * 7 / 13 % 251) as u8 ^ (i >> 16) as u8 }).collect()
}

fn repo(dir: &std::path::Path) -> Repository {
    let opts = InitOptions { kdf: KdfParams::MIN, pack_size: 256 * 1024, ..InitOptions::default() };
    Repository::init(Box::new(LocalBackend::create(dir.join("repo")).unwrap()), b"pw", &opts).unwrap()
}

fn opts(d: DiskInput) -> BackupOptions {
    BackupOptions {
        vm: "vm".into(),
        disks: vec![d],
        tags: vec![],
        hostname: "test".into(),
        full: false,
        verify: blockproof_core::default_verify_budget(),
        on_mismatch: blockproof_core::OnMismatch::Keep,
        lock_wait: std::time::Duration::ZERO,
        machine: None,
    }
}

#[test]
fn backup_restore_check_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let repo = repo(dir.path());
    let data = content((5 << 20) + 333);
    let r = backup(&repo, opts(disk(data.clone(), None)), &NoProgress).unwrap();
    let d = &r.disks[0];
    assert_eq!(d.bytes_read, data.len() as u64);
    assert_eq!(d.chunks, 81);
    assert_eq!(d.zero_chunks, 27);
    let target = dir.path().join("out");
    let rr = restore(
        &repo,
        &RestoreOptions {
            snapshot: r.snapshot.to_hex(),
            disk: "d".into(),
            target: target.clone(),
            force: false,
            ..Default::default()
        },
        &NoProgress,
    )
    .unwrap();
    assert_eq!(rr.zero_chunks, 27);
    assert_eq!(std::fs::read(&target).unwrap(), data);
    let c = check(&repo, &CheckOptions { read_data: Some(Default::default()) }, &NoProgress).unwrap();
    assert!(c.ok, "{:?}", c.errors);
    assert_eq!(c.referenced_chunks, 54);
}

#[test]
fn a_failing_source_leaves_no_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let repo = repo(dir.path());
    let err = backup(&repo, opts(disk(content(4 << 20), Some(30))), &NoProgress).unwrap_err();
    assert!(err.to_string().contains("injected EIO"), "{err}");
    assert!(repo.snapshots().unwrap().is_empty(), "no snapshot after a failed read");
    let c = check(&repo, &CheckOptions::default(), &NoProgress).unwrap();
    assert!(c.ok, "{:?}", c.errors);
}

#[test]
fn identical_disks_are_stored_once() {
    let dir = tempfile::tempdir().unwrap();
    let repo = repo(dir.path());
    let data = content(3 << 20);
    let first = backup(&repo, opts(disk(data.clone(), None)), &NoProgress).unwrap();
    assert!(first.disks[0].new_chunks > 0);
    let again = backup(&repo, opts(disk(data, None)), &NoProgress).unwrap();
    assert_eq!(again.disks[0].new_chunks, 0);
    // Nothing new but the disk's confirmation state (one small page: every chunk was
    // confirmed at run 2 now); the index pages are the parent's.
    assert!(again.packs_written <= 1 && again.bytes_written < 2048, "{} bytes", again.bytes_written);
    assert_eq!(again.disks[0].parent, Some(first.snapshot));
}

fn restored(repo: &Repository, dir: &std::path::Path, snapshot: &str) -> Vec<u8> {
    let target = dir.join(format!("restored-{snapshot}"));
    restore(
        repo,
        &RestoreOptions {
            snapshot: snapshot.into(),
            disk: "d".into(),
            target: target.clone(),
            force: false,
            ..Default::default()
        },
        &NoProgress,
    )
    .unwrap();
    std::fs::read(&target).unwrap()
}

/// An honest change list: only the chunks it touches are read, the rest are inherited, and
/// the incremental restores bit-exact; what the allocation map calls zero is not read.
#[test]
fn incremental_reads_only_reported_chunks_and_restores_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let repo = repo(dir.path());
    let cs = 65536u64;
    let mut data = content((4 << 20) + 100); // 65 chunks, the last one short
    let first = backup(&repo, opts(tracked(data.clone(), None, vec![])), &NoProgress).unwrap();
    assert_eq!(first.disks[0].full_reason.as_deref(), Some("test"));
    assert_eq!(first.disks[0].bytes_read, data.len() as u64);

    // Change bytes in chunks 3, 10 and 11 and the short last chunk; report exactly those.
    for (off, len) in [(3 * cs + 5, 10u64), (10 * cs + cs - 1, 2), (64 * cs + 50, 50)] {
        for b in &mut data[off as usize..(off + len) as usize] {
            *b = b.wrapping_add(77);
        }
    }
    let changes = vec![(3 * cs + 5, 10), (10 * cs + cs - 1, 2), (64 * cs + 50, 50)];
    let r = backup(&repo, opts(tracked(data.clone(), Some(changes.clone()), vec![])), &NoProgress).unwrap();
    let d = &r.disks[0];
    assert_eq!(d.mode, blockproof_format::manifest::ReadMode::Incremental, "{:?}", d.full_reason);
    assert_eq!(d.cbt_reported_chunks, 4);
    assert_eq!(d.bytes_read, 3 * cs + 100);
    assert_eq!(d.parent, Some(first.snapshot));
    assert_eq!(restored(&repo, dir.path(), &r.snapshot.to_hex()), data);
    assert_eq!(restored(&repo, dir.path(), &first.snapshot.to_hex()[..12]), content((4 << 20) + 100));

    // Chunks 20..30 now read as zero per the allocation map: neither read nor inherited.
    data[20 * cs as usize..30 * cs as usize].fill(0);
    let r = backup(&repo, opts(tracked(data.clone(), Some(vec![]), vec![(20 * cs, 10 * cs)])), &NoProgress).unwrap();
    assert_eq!((r.disks[0].bytes_read, r.disks[0].cbt_reported_chunks), (0, 0));
    assert_eq!(restored(&repo, dir.path(), &r.snapshot.to_hex()), data);

    // A resized disk is read in full, and says why.
    data.extend_from_slice(&[9u8; 4096]);
    let r = backup(&repo, opts(tracked(data.clone(), Some(vec![]), vec![])), &NoProgress).unwrap();
    let why = r.disks[0].full_reason.clone().unwrap();
    assert!(why.contains("size changed"), "{why}");
    assert_eq!(r.disks[0].bytes_read, data.len() as u64);
    assert_eq!(restored(&repo, dir.path(), &r.snapshot.to_hex()), data);
    let c = check(&repo, &CheckOptions { read_data: Some(Default::default()) }, &NoProgress).unwrap();
    assert!(c.ok, "{:?}", c.errors);
}

/// `--full` overrides a change list, and says so.
#[test]
fn full_flag_overrides_changes() {
    let dir = tempfile::tempdir().unwrap();
    let repo = repo(dir.path());
    let data = content(1 << 20);
    backup(&repo, opts(tracked(data.clone(), None, vec![])), &NoProgress).unwrap();
    let mut o = opts(tracked(data.clone(), Some(vec![]), vec![]));
    o.full = true;
    let r = backup(&repo, o, &NoProgress).unwrap();
    assert_eq!(r.disks[0].full_reason.as_deref(), Some("--full was given"));
    assert_eq!(r.disks[0].bytes_read, data.len() as u64);
}

/// A change hidden from change tracking, not sampled for two runs (`--verify none`), then
/// caught by a full sample: both restore points taken since the chunk was last confirmed
/// are suspects; the first (a full read) is not.
#[test]
fn suspects_are_the_restore_points_since_the_last_confirmation() {
    let dir = tempfile::tempdir().unwrap();
    let repo = repo(dir.path());
    let cs = 65536usize;
    let mut data = content(2 << 20);
    let first = backup(&repo, opts(tracked(data.clone(), None, vec![])), &NoProgress).unwrap();
    data[5 * cs + 100] ^= 0xff; // the lie: changed, never reported
    let mut quiet = Vec::new();
    for _ in 0..2 {
        let mut o = opts(tracked(data.clone(), Some(vec![]), vec![]));
        o.verify = blockproof_core::Budget::parse("none").unwrap();
        let r = backup(&repo, o, &NoProgress).unwrap();
        assert_eq!((r.disks[0].verified_chunks, r.status), (0, blockproof_format::SnapshotStatus::Ok));
        quiet.push(r.snapshot);
    }
    let mut o = opts(tracked(data.clone(), Some(vec![]), vec![]));
    o.verify = blockproof_core::Budget::parse("all").unwrap();
    o.on_mismatch = blockproof_core::OnMismatch::Heal;
    let r = backup(&repo, o, &NoProgress).unwrap();
    let d = &r.disks[0];
    assert_eq!(r.status, blockproof_format::SnapshotStatus::Tainted);
    assert_eq!(d.verified_chunks, 32, "every inherited chunk");
    assert_eq!(d.mismatches, vec![blockproof_format::manifest::ByteRange { offset: 5 * 65536, length: 512 }]);
    let mut suspects = d.suspect_snapshots.clone();
    suspects.sort();
    quiet.sort();
    assert_eq!(suspects, quiet);
    assert!(!d.suspect_snapshots.contains(&first.snapshot));
    // The healed snapshot restores the source; the tainted one still holds the stale byte.
    let healed = r.healed_snapshot.expect("healed");
    assert_eq!(restored(&repo, dir.path(), &healed.to_hex()), data);
    assert_ne!(restored(&repo, dir.path(), &r.snapshot.to_hex()), data);
    // And the next backup reads the disk in full, saying why.
    let next = backup(&repo, opts(tracked(data.clone(), Some(vec![]), vec![])), &NoProgress).unwrap();
    assert!(next.disks[0].full_reason.as_deref().unwrap_or("").contains("lying"), "{:?}", next.disks[0].full_reason);
}

/// `verify` compares a snapshot with a source without writing anything.
#[test]
fn verify_compares_without_writing() {
    let dir = tempfile::tempdir().unwrap();
    let repo = repo(dir.path());
    let mut data = content(1 << 20);
    let r = backup(&repo, opts(disk(data.clone(), None)), &NoProgress).unwrap();
    let files = |p: &std::path::Path| walk(p);
    let before = files(&dir.path().join("repo"));
    let all = blockproof_core::Budget::parse("all").unwrap();
    let v = |data: Vec<u8>| {
        blockproof_core::verify(
            &repo,
            blockproof_core::VerifyOptions {
                snapshot: r.snapshot.to_hex(),
                disks: vec![disk(data, None)],
                budget: all.clone(),
            },
            &NoProgress,
        )
        .unwrap()
    };
    let ok = v(data.clone());
    assert!(ok.ok);
    assert_eq!(ok.disks[0].verified_chunks, 16);
    data[3 * 65536 + 1000] ^= 1;
    let bad = v(data);
    assert!(!bad.ok);
    assert_eq!(
        bad.disks[0].mismatches,
        vec![blockproof_format::manifest::ByteRange { offset: 3 * 65536 + 512, length: 512 }]
    );
    assert_eq!(files(&dir.path().join("repo")), before, "verify writes nothing");
}

fn walk(p: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(p).unwrap() {
        let e = e.unwrap().path();
        if e.is_dir() {
            out.extend(walk(&e));
        } else {
            out.push(e);
        }
    }
    out.sort();
    out
}

/// A time budget stops sampling at its deadline (here at once: only the first chunk and
/// the one in hand), a per-disk budget overrides the backup's, and the bound follows
/// what was sampled.
#[test]
fn time_and_per_disk_budgets() {
    let dir = tempfile::tempdir().unwrap();
    let repo = repo(dir.path());
    let data = content(4 << 20); // 64 chunks
    backup(&repo, opts(tracked(data.clone(), None, vec![])), &NoProgress).unwrap();
    let mut o = opts(tracked(data.clone(), Some(vec![]), vec![]));
    // (`0s` is refused on the command line; the library takes a deadline already passed.)
    o.verify = blockproof_core::Budget { time: Some(std::time::Duration::ZERO), ..Default::default() };
    let r = backup(&repo, o, &NoProgress).unwrap();
    let d = &r.disks[0];
    // The deadline is checked before each read: only the first chunk (always compared,
    // outside the budget) is read, and no bound can be claimed.
    assert_eq!(d.verified_chunks, 1);
    assert_eq!(d.coverage.full_coverage_within_runs, 0);
    assert_eq!(d.coverage.bound, Some(blockproof_format::manifest::BoundBasis::None));

    let mut input = tracked(data.clone(), Some(vec![]), vec![]);
    input.verify = Some(blockproof_core::Budget::parse("8ios").unwrap());
    let mut o = opts(input);
    o.verify = blockproof_core::Budget::parse("all").unwrap();
    let r = backup(&repo, o, &NoProgress).unwrap();
    assert_eq!(r.disks[0].verified_chunks, 9, "8 plus the first chunk");
    // 63 other chunks at 8 a run is 8 runs in the steady state; but the run before sampled
    // nothing, so 55 chunks are already 2 runs old and need 7 more runs: 9.
    assert_eq!(r.disks[0].coverage.full_coverage_within_runs, 9);
    assert_eq!(r.disks[0].coverage.bound, Some(blockproof_format::manifest::BoundBasis::Budget));
}

/// A damaged detection event is reported, whatever its parse error says: only a file gone
/// between listing and reading is skipped in silence.
#[test]
fn a_damaged_event_is_reported_even_when_its_error_says_not_found() {
    let dir = tempfile::tempdir().unwrap();
    let repo = repo(dir.path());
    // An event written by something else: its parse error quotes the unknown field.
    let name = format!("event-{}", blockproof_format::Id::ZERO.to_hex());
    repo.write_doc(blockproof_store::Kind::State, blockproof_format::ObjectMagic::State, &name, br#"{"not found":1}"#)
        .unwrap();
    let (events, warnings) = blockproof_core::events::events(&repo).unwrap();
    assert!(events.is_empty());
    assert_eq!(warnings.len(), 1, "the damaged event must be reported: {warnings:?}");
    assert!(warnings[0].contains(&name), "{warnings:?}");
}

/// `restore --patch-tainted` with an event whose ranges do not fit the disk (damaged, or
/// written by something else): a clear error, no panic, nothing written.
#[test]
fn patch_refuses_ranges_outside_the_disk() {
    use blockproof_core::events::{patch, record, Event, EventDisk};
    use blockproof_format::manifest::ByteRange;
    let dir = tempfile::tempdir().unwrap();
    let repo = repo(dir.path());
    let data = content(1 << 20);
    let tainted = backup(&repo, opts(disk(data.clone(), None)), &NoProgress).unwrap().snapshot;
    let good = backup(&repo, opts(disk(data.clone(), None)), &NoProgress).unwrap().snapshot;
    let target = dir.path().join("image");
    std::fs::write(&target, &data).unwrap();
    for bad in [
        ByteRange { offset: 4096, length: u64::MAX / 2 },
        ByteRange { offset: (1 << 20) - 512, length: 1024 },
        ByteRange { offset: u64::MAX - 100, length: 512 },
    ] {
        let event = Event {
            snapshot: tainted,
            vm: "vm".into(),
            time: "2026-01-01T00:00:00Z".into(),
            disks: vec![EventDisk {
                id: "d".into(),
                causes: vec![],
                mismatches: vec![ByteRange { offset: 0, length: 512 }, bad],
                suspects: vec![],
            }],
            healed_by: Some(good),
        };
        record(&repo, &event).unwrap();
        let err = patch(&repo, &tainted.to_hex(), "d", &target).unwrap_err().to_string();
        assert!(err.contains("outside"), "{bad:?}: {err}");
        assert_eq!(std::fs::read(&target).unwrap(), data, "nothing written");
    }
}

/// A repository of 4 KiB chunks, so that a small disk spans several leaf pages (1024
/// chunk ids each).
fn small_chunk_repo(dir: &std::path::Path) -> Repository {
    let opts = InitOptions { kdf: KdfParams::MIN, chunk_size: 4096, pack_size: 256 * 1024, ..InitOptions::default() };
    Repository::init(Box::new(LocalBackend::create(dir.join("repo")).unwrap()), b"pw", &opts).unwrap()
}

/// 3500 chunks of 4 KiB (leaves 0..3, the last one short): data in leaves 0, 1 and 3,
/// leaf 2 a hole the allocation map reports.
fn paged_disk() -> (Vec<u8>, Vec<(u64, u64)>) {
    let cs = 4096usize;
    // Incompressible, so that the chunks fill many packs.
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut data: Vec<u8> = (0..3500 * cs)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    data[2048 * cs..3072 * cs].fill(0);
    data[100 * cs..110 * cs].fill(0); // zero chunks inside a data page
    (data, vec![(2048 * 4096, 1024 * 4096)])
}

/// Options of an incremental of `data` whose change tracking reports `changes` (the
/// allocation map: `zero`), without verification.
fn quiet(data: &[u8], changes: Vec<(u64, u64)>, zero: &[(u64, u64)]) -> BackupOptions {
    let mut o = opts(tracked(data.to_vec(), Some(changes), zero.to_vec()));
    o.verify = blockproof_core::Budget { nothing: true, ..Default::default() };
    o
}

fn entry_root(repo: &Repository, snapshot: &blockproof_format::Id) -> blockproof_format::Id {
    let s = repo.snapshots().unwrap().into_iter().find(|s| s.id == *snapshot).unwrap();
    s.snapshot.disks[0].index_root
}

/// An incremental takes the parent's unchanged pages whole: its tree is the one a full
/// backup of the same content builds, the counts are those of a chunk-by-chunk walk, and
/// it restores bit-exact.
#[test]
fn unchanged_pages_are_inherited_whole() {
    let dir = tempfile::tempdir().unwrap();
    let repo = small_chunk_repo(dir.path());
    let cs = 4096u64;
    let (mut data, zero) = paged_disk();
    let first = backup(&repo, opts(tracked(data.clone(), None, zero.clone())), &NoProgress).unwrap();
    assert_eq!(first.disks[0].zero_chunks, 1024 + 10);
    // One chunk of leaf 1 changes; change tracking also reports a chunk of the hole.
    data[(1500 * cs) as usize] ^= 0xff;
    let changes = vec![(1500 * cs, 1), (2500 * cs, 1)];
    let r = backup(&repo, opts(tracked(data.clone(), Some(changes), zero.clone())), &NoProgress).unwrap();
    let d = &r.disks[0];
    assert_eq!(d.mode, blockproof_format::manifest::ReadMode::Incremental, "{:?}", d.full_reason);
    assert_eq!((d.bytes_read, d.zero_chunks, d.cbt_overreported_chunks), (cs, 1024 + 10, 1));
    assert_eq!((d.cbt_missed_chunks, d.repaired_chunks), (0, 0));
    assert_eq!(restored(&repo, dir.path(), &r.snapshot.to_hex()), data);
    // The same content read in full builds the same tree.
    let mut full = opts(tracked(data.clone(), None, zero));
    full.full = true;
    let f = backup(&repo, full, &NoProgress).unwrap();
    assert_eq!(entry_root(&repo, &r.snapshot), entry_root(&repo, &f.snapshot));
    let c = check(&repo, &CheckOptions { read_data: Some(Default::default()) }, &NoProgress).unwrap();
    assert!(c.ok, "{:?}", c.errors);
}

/// A page of the parent listing a blob that has no usable copy (its pack is gone) is not
/// referenced blindly: the chunk is read from the source and stored again, and the new
/// restore point is whole.
#[test]
fn a_page_listing_a_missing_blob_is_not_inherited_blindly() {
    let dir = tempfile::tempdir().unwrap();
    let repo = small_chunk_repo(dir.path());
    let cs = 4096u64;
    let (mut data, zero) = paged_disk();
    backup(&repo, opts(tracked(data.clone(), None, zero.clone())), &NoProgress).unwrap();
    // Remove the pack holding chunk 5 (leaf 0, which the next run inherits whole).
    let index = blockproof_repo::BlobIndex::load(&repo).unwrap();
    let id = repo.keys().blob_id(&data[5 * cs as usize..6 * cs as usize]);
    let (pack, _) = index.get(&id).unwrap();
    let hex = pack.to_hex();
    std::fs::remove_file(dir.path().join("repo/data").join(&hex[..2]).join(&hex)).unwrap();
    // Only leaf 3 changes.
    data[(3200 * cs) as usize] ^= 0xff;
    let mut o = opts(tracked(data.clone(), Some(vec![(3200 * cs, 1)]), zero));
    o.verify = blockproof_core::Budget { nothing: true, ..Default::default() };
    let r = backup(&repo, o, &NoProgress).unwrap();
    let d = &r.disks[0];
    assert_eq!(d.mode, blockproof_format::manifest::ReadMode::Incremental, "{:?}", d.full_reason);
    assert!(d.repaired_chunks >= 1 && d.bytes_read > cs, "{d:?}");
    assert_eq!(restored(&repo, dir.path(), &r.snapshot.to_hex()), data);
    // Every blob the new restore point references is there (the old one stays damaged).
    let index = blockproof_repo::BlobIndex::load(&repo).unwrap();
    let reader = blockproof_repo::BlobReader::new(&repo, &index);
    for (c, id) in chunk_ids(&repo, &r.snapshot).into_iter().enumerate() {
        if !id.is_zero() {
            assert!(index.locations(&id).any(|(p, _)| p != pack), "chunk {c}: its only copy was in the removed pack");
            assert!(reader.read(&id, blockproof_format::BlobKind::Data).is_ok(), "chunk {c}");
        }
    }
}

/// A backup records the basis of its data tree (the index files every blob it references
/// was found in or written to); the next backup takes the tree's inherited chunks without
/// a lookup each only while that basis holds. Here the first backup's index file goes
/// (its packs stay): the second backup's tree pages are still there, the chunks they
/// inherit are no longer indexed, and the next backup reads them from the source again
/// instead of referencing them.
#[test]
fn inherited_chunks_are_looked_up_once_their_index_file_is_gone() {
    use blockproof_store::Kind;
    let dir = tempfile::tempdir().unwrap();
    let repo = small_chunk_repo(dir.path());
    let cs = 4096u64;
    let (mut data, zero) = paged_disk();
    let index_files =
        || repo.backend().list(Kind::Index).unwrap().into_iter().collect::<std::collections::BTreeSet<_>>();
    let quiet = |data: &Vec<u8>, changes: Vec<(u64, u64)>| quiet(data, changes, &zero);
    backup(&repo, opts(tracked(data.clone(), None, zero.clone())), &NoProgress).unwrap();
    let first = index_files();
    // A chunk of every leaf holding data changes: the leaf pages are stored anew, the
    // chunks they inherit stay where the first backup put them.
    let changed = [5, 1500, 3200];
    changed.iter().for_each(|&c| data[(c * cs) as usize] ^= 0xff);
    let second = backup(&repo, quiet(&data, changed.iter().map(|&c| (c * cs, 1)).collect()), &NoProgress).unwrap();
    assert_eq!(second.disks[0].bytes_read, 3 * cs);
    // Its tree basis names its tree and both index files.
    let tree_doc: Vec<String> =
        repo.backend().list(Kind::State).unwrap().into_iter().filter(|n| n.ends_with("-tree")).collect();
    assert_eq!(tree_doc.len(), 1);
    let doc = repo.read_doc(Kind::State, blockproof_format::ObjectMagic::State, &tree_doc[0]).unwrap();
    let (root, basis) = blockproof_format::basis::decode_tree_basis(&doc).unwrap();
    assert_eq!(root, entry_root(&repo, &second.snapshot));
    assert_eq!(basis.files.len(), index_files().len());
    // While it holds, an unchanged run inherits everything: nothing read, nothing repaired.
    let kept = backup(&repo, quiet(&data, vec![]), &NoProgress).unwrap();
    assert_eq!((kept.disks[0].bytes_read, kept.disks[0].repaired_chunks), (0, 0));

    for name in &first {
        repo.backend().remove(Kind::Index, name).unwrap();
    }
    let r = backup(&repo, quiet(&data, vec![]), &NoProgress).unwrap();
    let d = &r.disks[0];
    assert_eq!(d.mode, blockproof_format::manifest::ReadMode::Incremental, "{:?}", d.full_reason);
    assert!(d.repaired_chunks > 1000, "the inherited chunks are read again: {d:?}");
    assert_eq!(restored(&repo, dir.path(), &r.snapshot.to_hex()), data);
    let index = blockproof_repo::BlobIndex::load(&repo).unwrap();
    for (c, id) in chunk_ids(&repo, &r.snapshot).into_iter().enumerate() {
        assert!(id.is_zero() || index.contains(&id), "chunk {c} references a blob no index file lists");
    }
}

/// While the parent's tree basis holds, an unchanged page of the parent's tree is taken
/// whole without being read, and the zero chunks under it are still counted (from the
/// parent's recorded count). Without the basis the same run reads those pages.
#[test]
fn unchanged_pages_are_not_read_while_the_tree_basis_holds() {
    use blockproof_store::{FaultyBackend, Kind, Op};
    let dir = tempfile::tempdir().unwrap();
    let cs = 4096u64;
    let (mut data, zero) = paged_disk();
    let quiet = |data: &Vec<u8>, changes: Vec<(u64, u64)>| quiet(data, changes, &zero);
    let parent = {
        let repo = small_chunk_repo(dir.path());
        backup(&repo, opts(tracked(data.clone(), None, zero.clone())), &NoProgress).unwrap();
        data[(1500 * cs) as usize] ^= 0xff;
        backup(&repo, quiet(&data, vec![(1500 * cs, 1)]), &NoProgress).unwrap().snapshot
    };
    let faulty = FaultyBackend::new(Box::new(LocalBackend::open(dir.path().join("repo")).unwrap()));
    let faults = faulty.faults();
    let repo = Repository::open(Box::new(faulty), b"pw").unwrap();
    // Where the parent's leaf pages are (leaves 0, 1 and 3 hold data).
    let leaf_blobs: Vec<(String, std::ops::Range<u64>)> = {
        let s = repo.snapshots().unwrap().into_iter().find(|s| s.id == parent).unwrap();
        let e = &s.snapshot.disks[0];
        let index = blockproof_repo::BlobIndex::load(&repo).unwrap();
        let reader = blockproof_repo::BlobReader::new(&repo, &index);
        let mut tree = blockproof_repo::TreeReader::new(&reader, e.index_root, 3500, e.index_fanout).unwrap();
        let leaves: Vec<_> = (0..4).map(|l| tree.leaf_id(l).unwrap()).filter(|id| !id.is_zero()).collect();
        assert_eq!(leaves.len(), 3);
        let at = |id| index.get(id).map(|(p, b)| (p.to_hex(), b.offset..b.offset + u64::from(b.length))).unwrap();
        leaves.iter().map(at).collect()
    };
    // Reads of those pages since call `from` of the log.
    let leaf_reads = |from: usize| {
        let log = faults.log();
        let reads = log[from..].iter().filter(|c| c.op == Op::ReadAt && c.kind == Kind::Pack);
        let overlaps = |c: &&blockproof_store::Call| {
            let r = c.range.clone().unwrap();
            leaf_blobs.iter().any(|(p, b)| *p == c.name && r.start < b.end && b.start < r.end)
        };
        reads.filter(overlaps).count()
    };

    let from = faults.log().len();
    let r = backup(&repo, quiet(&data, vec![]), &NoProgress).unwrap();
    let d = &r.disks[0];
    assert_eq!(d.mode, blockproof_format::manifest::ReadMode::Incremental, "{:?}", d.full_reason);
    assert_eq!((d.bytes_read, d.zero_chunks, d.repaired_chunks), (0, 1024 + 10, 0));
    assert_eq!(leaf_reads(from), 0, "no leaf page of the parent was read");
    assert_eq!(entry_root(&repo, &r.snapshot), entry_root(&repo, &parent));

    // A chunk of leaf 3 changes: leaves 0 and 1 (its zero chunks) are still not read.
    data[(3200 * cs) as usize] ^= 0xff;
    let r = backup(&repo, quiet(&data, vec![(3200 * cs, 1)]), &NoProgress).unwrap();
    assert_eq!((r.disks[0].bytes_read, r.disks[0].zero_chunks), (cs, 1024 + 10));
    assert_eq!(restored(&repo, dir.path(), &r.snapshot.to_hex()), data);

    // Without the basis, the unchanged pages are read (each chunk id looked up).
    for name in repo.backend().list(Kind::State).unwrap().into_iter().filter(|n| n.ends_with("-tree")) {
        repo.backend().remove(Kind::State, &name).unwrap();
    }
    let from = faults.log().len();
    let r = backup(&repo, quiet(&data, vec![]), &NoProgress).unwrap();
    assert_eq!((r.disks[0].bytes_read, r.disks[0].zero_chunks), (0, 1024 + 10));
    assert!(leaf_reads(from) > 0, "the leaf pages are read without the basis");
}

/// The count of zero chunks under unread pages comes from the parent's recorded count;
/// a recorded count that cannot be right (fewer zero chunks than the run saw elsewhere,
/// or more than the unread pages hold) is not trusted: the pages are read to count.
#[test]
fn a_zero_count_that_does_not_fit_the_tree_is_not_trusted() {
    let dir = tempfile::tempdir().unwrap();
    let repo = small_chunk_repo(dir.path());
    let cs = 4096u64;
    let (mut data, zero) = paged_disk();
    let quiet = |data: &Vec<u8>, changes: Vec<(u64, u64)>| quiet(data, changes, &zero);
    backup(&repo, opts(tracked(data.clone(), None, zero.clone())), &NoProgress).unwrap();
    data[(1500 * cs) as usize] ^= 0xff;
    backup(&repo, quiet(&data, vec![(1500 * cs, 1)]), &NoProgress).unwrap();
    for wrong in [0, 1 << 40] {
        // The latest restore point again, a microsecond later, with another count.
        let mut forged = repo.snapshots().unwrap().pop().unwrap().snapshot;
        let (head, fraction) = forged.time.trim_end_matches('Z').split_once('.').unwrap();
        let micros: u64 = fraction.parse().unwrap();
        assert!(micros < 999_999, "{}", forged.time);
        forged.time = format!("{head}.{:06}Z", micros + 1);
        forged.disks[0].stats.zero_chunks = wrong;
        let id = repo.save_snapshot(&forged).unwrap();
        assert_eq!(repo.snapshots().unwrap().pop().unwrap().id, id);
        let r = backup(&repo, quiet(&data, vec![]), &NoProgress).unwrap();
        let d = &r.disks[0];
        assert_eq!(d.mode, blockproof_format::manifest::ReadMode::Incremental, "{:?}", d.full_reason);
        assert_eq!((d.bytes_read, d.zero_chunks), (0, 1024 + 10), "recorded {wrong}");
    }
}

/// The chunk ids of the first disk of `snapshot`, in disk order.
fn chunk_ids(repo: &Repository, snapshot: &blockproof_format::Id) -> Vec<blockproof_format::Id> {
    let s = repo.snapshots().unwrap().into_iter().find(|s| s.id == *snapshot).unwrap();
    let e = &s.snapshot.disks[0];
    let index = blockproof_repo::BlobIndex::load(repo).unwrap();
    let reader = blockproof_repo::BlobReader::new(repo, &index);
    let chunks = e.size.div_ceil(4096);
    let mut tree = blockproof_repo::TreeReader::new(&reader, e.index_root, chunks, e.index_fanout).unwrap();
    (0..chunks).map(|c| tree.chunk(c).unwrap()).collect()
}

/// The confirmation page summaries are a cache: damaged or gone, the next backup reads
/// the pages instead and reports the same coverage.
#[test]
fn damaged_page_summaries_only_cost_reading_the_pages() {
    use blockproof_store::Kind;
    let dir = tempfile::tempdir().unwrap();
    let repo = small_chunk_repo(dir.path());
    let (data, zero) = paged_disk();
    backup(&repo, opts(tracked(data.clone(), None, zero.clone())), &NoProgress).unwrap();
    let docs = || -> Vec<String> {
        let listed = repo.backend().list(Kind::State).unwrap().into_iter();
        listed.filter(|n| n.starts_with("confirm-") && !n.ends_with("-tree")).collect()
    };
    assert_eq!(docs().len(), 1, "one summary document per disk");
    let none = || {
        let mut o = opts(tracked(data.clone(), Some(vec![]), zero.clone()));
        o.verify = blockproof_core::Budget { nothing: true, ..Default::default() };
        o
    };
    let intact = backup(&repo, none(), &NoProgress).unwrap();
    for (k, damage) in [&b"garbage"[..], b""].into_iter().enumerate() {
        std::fs::write(dir.path().join("repo/state").join(&docs()[0]), damage).unwrap();
        let r = backup(&repo, none(), &NoProgress).unwrap();
        let (a, b) = (&r.disks[0].coverage, &intact.disks[0].coverage);
        assert_eq!(a.never_confirmed, b.never_confirmed);
        assert_eq!(a.oldest_confirmed_runs_ago, b.oldest_confirmed_runs_ago + 1 + k as u64);
    }
    assert_eq!(docs().len(), 1, "rewritten whole");
}

/// A disk's confirmation page summaries go when its last snapshot does (forget), not
/// before, and another vm's stay.
#[test]
fn forgetting_a_disks_last_snapshot_removes_its_page_summaries() {
    use blockproof_core::{forget, ForgetOptions, KeepPolicy, RetentionScope};
    use blockproof_store::Kind;
    let dir = tempfile::tempdir().unwrap();
    let repo = repo(dir.path());
    let data = content(2 << 20);
    let a1 = backup(&repo, opts(disk(data.clone(), None)), &NoProgress).unwrap();
    let a2 = backup(&repo, opts(disk(data.clone(), None)), &NoProgress).unwrap();
    let mut other = opts(disk(data, None));
    other.vm = "other".into();
    backup(&repo, other, &NoProgress).unwrap();
    let docs = || -> Vec<String> {
        let mut d: Vec<String> =
            repo.backend().list(Kind::State).unwrap().into_iter().filter(|n| n.starts_with("confirm-")).collect();
        d.sort();
        d
    };
    let all = docs();
    assert_eq!(all.len(), 4, "two per vm and disk: its summaries and its tree basis");
    let forget_one = |id: blockproof_format::Id| {
        let o = ForgetOptions {
            snapshots: vec![id.to_hex()],
            policy: KeepPolicy::default(),
            vm: None,
            scope: RetentionScope::default(),
            dry_run: false,
        };
        forget(&repo, &o).unwrap()
    };
    let r = forget_one(a1.snapshot);
    assert!(r.warnings.is_empty(), "{:?}", r.warnings);
    assert_eq!(docs(), all, "a snapshot of the disk remains");
    forget_one(a2.snapshot);
    let left = docs();
    assert_eq!(left.len(), 2, "{left:?}");
    // Those left are the other vm's: its next backup still finds them.
    assert!(left.iter().all(|d| all.contains(d)));
    assert!(repo.snapshots().unwrap().iter().all(|s| s.snapshot.vm == "other"));
}

/// A sparse disk in memory: `size` bytes, zero but for the chunks (4 KiB) in `data`, whose
/// bytes are `fill`; its allocation map reports the rest as zero.
struct SparseDisk {
    size: u64,
    data: Vec<u64>,
    fill: u8,
}

impl BlockSource for SparseDisk {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_ranges(
        &mut self,
        ranges: &mut dyn Iterator<Item = (u64, usize)>,
        sink: &mut dyn FnMut(u64, Vec<u8>) -> bool,
    ) -> Result<(), SourceError> {
        for (offset, len) in ranges {
            let mut buf = vec![0u8; len];
            for c in &self.data {
                let (start, end) = (c * 4096, c * 4096 + 4096);
                if start < offset + len as u64 && offset < end {
                    let (a, b) = (start.max(offset), end.min(offset + len as u64));
                    buf[(a - offset) as usize..(b - offset) as usize].fill(self.fill ^ (*c as u8));
                }
            }
            if !sink(offset, buf) {
                break;
            }
        }
        Ok(())
    }

    fn zero_ranges(&mut self) -> Result<Vec<(u64, u64)>, SourceError> {
        let mut out = Vec::new();
        let mut at = 0;
        let mut data = self.data.clone();
        data.sort_unstable();
        for c in data {
            if c * 4096 > at {
                out.push((at, c * 4096 - at));
            }
            at = c * 4096 + 4096;
        }
        if at < self.size {
            out.push((at, self.size - at));
        }
        Ok(out)
    }

    fn describe(&self) -> String {
        "sparse".into()
    }
}

/// A disk of more than one group of confirmation pages (1024 pages of 16 384 chunks):
/// the backup keeps a group list and one document per group; an incremental changing
/// one chunk rewrites that group's document only; the next one keeps the untouched group
/// by id (the list's basis holds); both report the coverage a backup reading every page
/// reports.
#[test]
fn a_large_disks_page_summaries_are_kept_per_group() {
    use blockproof_store::Kind;
    let dir = tempfile::tempdir().unwrap();
    let repo = small_chunk_repo(dir.path());
    let group = 1024 * 16384u64;
    let size = (group + 3 * 16384 + 10) * 4096;
    let data = vec![5, group / 2, group + 2 * 16384 + 1];
    let sparse = |fill: u8, changes: Option<Vec<(u64, u64)>>| {
        let source = Box::new(SparseDisk { size, data: data.clone(), fill });
        let mut o = opts(DiskInput {
            id: "d".into(),
            cbt: "changes:test".into(),
            open: Box::new(move |_, _| {
                let mut opened = OpenedDisk::full(source, "unused");
                opened.changes = match changes {
                    Some(r) => Changes::ranges(r),
                    None => Changes::All { reason: "test".into() },
                };
                Ok(opened)
            }),
            verify: None,
        });
        o.verify = blockproof_core::Budget { nothing: true, ..Default::default() };
        o
    };
    let docs = || -> std::collections::BTreeMap<String, Vec<u8>> {
        let state = dir.path().join("repo/state");
        repo.backend()
            .list(Kind::State)
            .unwrap()
            .into_iter()
            .filter(|n| n.starts_with("confirm-"))
            .map(|n| (n.clone(), std::fs::read(state.join(&n)).unwrap()))
            .collect()
    };
    let full = backup(&repo, sparse(1, None), &NoProgress).unwrap();
    assert_eq!(full.disks[0].coverage.never_confirmed, size / 4096 - 3);
    let first = docs();
    let names: Vec<&String> = first.keys().collect();
    assert_eq!(names.len(), 4, "{names:?}");
    let list = names[0].clone();
    assert_eq!(names[1..], [&format!("{list}-0"), &format!("{list}-1"), &format!("{list}-tree")]);
    // The chunk in group 1 changes.
    let changed = group + 2 * 16384 + 1;
    let r = backup(&repo, sparse(2, Some(vec![(changed * 4096, 4096)])), &NoProgress).unwrap();
    let d = &r.disks[0];
    assert_eq!(
        (d.mode, d.bytes_read),
        (blockproof_format::manifest::ReadMode::Incremental, 4096),
        "{:?}",
        d.full_reason
    );
    assert!(r.warnings.is_empty(), "{:?}", r.warnings);
    let second = docs();
    assert_eq!(second[&format!("{list}-0")], first[&format!("{list}-0")], "group 0's document untouched");
    assert_ne!(second[&format!("{list}-1")], first[&format!("{list}-1")]);
    assert_ne!(second[&list], first[&list]);
    // The list names the index files in which the backup found every page (version 3):
    // while they all remain, the next backup keeps the groups it leaves alone by id.
    use blockproof_format::confirm::{decode_any, Summaries};
    let doc = repo.read_doc(Kind::State, blockproof_format::ObjectMagic::State, &list).unwrap();
    match decode_any(&doc).unwrap() {
        Summaries::Groups(groups, basis) => {
            assert_eq!(groups.len(), 2);
            assert!(basis.is_some_and(|b| !b.files.is_empty()), "the list has its basis");
        }
        other => panic!("{other:?}"),
    }
    let kept = backup(&repo, sparse(2, Some(vec![])), &NoProgress).unwrap();
    assert!(kept.warnings.is_empty(), "{:?}", kept.warnings);
    assert_eq!(kept.disks[0].coverage.never_confirmed, d.coverage.never_confirmed);
    // The same coverage as a backup that finds no summaries and reads every page.
    for n in docs().keys() {
        std::fs::remove_file(dir.path().join("repo/state").join(n)).unwrap();
    }
    let again = backup(&repo, sparse(2, Some(vec![])), &NoProgress).unwrap();
    let (a, b) = (&again.disks[0].coverage, &kept.disks[0].coverage);
    assert_eq!((a.never_confirmed, a.oldest_confirmed_runs_ago), (b.never_confirmed, b.oldest_confirmed_runs_ago + 1));
    assert_eq!(docs().len(), 4);
    let c = check(&repo, &CheckOptions { read_data: Some(Default::default()) }, &NoProgress).unwrap();
    assert!(c.ok, "{:?}", c.errors);
    assert_eq!(
        restored_sparse_chunk(&repo, dir.path(), &again.snapshot.to_hex(), changed),
        vec![2 ^ changed as u8; 4096]
    );
}

fn restored_sparse_chunk(repo: &Repository, dir: &std::path::Path, snapshot: &str, chunk: u64) -> Vec<u8> {
    let latest = repo.snapshots().unwrap().into_iter().find(|s| s.id.to_hex() == snapshot).unwrap();
    let e = &latest.snapshot.disks[0];
    let index = blockproof_repo::BlobIndex::load(repo).unwrap();
    let reader = blockproof_repo::BlobReader::new(repo, &index);
    let mut tree = blockproof_repo::TreeReader::new(
        &reader,
        e.index_root,
        e.size / 4096 + (e.size % 4096 > 0) as u64,
        e.index_fanout,
    )
    .unwrap();
    let _ = dir;
    reader.read(&tree.chunk(chunk).unwrap(), blockproof_format::BlobKind::Data).unwrap()
}

/// A disk the vm no longer has loses its page summaries when a policy forgets its last
/// snapshot; the disk the vm still has keeps its own.
#[test]
fn a_policy_forgetting_a_dropped_disks_last_snapshot_removes_only_its_summaries() {
    use blockproof_core::{forget, ForgetOptions, KeepPolicy, RetentionScope};
    use blockproof_store::Kind;
    let dir = tempfile::tempdir().unwrap();
    let repo = repo(dir.path());
    let data = content(1 << 20);
    let second = DiskInput::source(
        "d2",
        Box::new(MemDisk { data: data.clone(), fail_after: None, reads: AtomicU64::new(0), zero: vec![] }),
    );
    let mut both = opts(disk(data.clone(), None));
    both.disks.push(second);
    backup(&repo, both, &NoProgress).unwrap();
    let docs = || repo.backend().list(Kind::State).unwrap().into_iter().filter(|n| n.starts_with("confirm-")).count();
    assert_eq!(docs(), 4, "per disk its summaries and its tree basis");
    backup(&repo, opts(disk(data, None)), &NoProgress).unwrap();
    let o = ForgetOptions {
        snapshots: vec![],
        policy: KeepPolicy { last: Some(1), ..KeepPolicy::default() },
        vm: None,
        scope: RetentionScope::Vm,
        dry_run: false,
    };
    let r = forget(&repo, &o).unwrap();
    assert_eq!((r.removed.len(), r.kept.len()), (1, 1));
    assert_eq!(docs(), 2, "d2's documents went with its last snapshot, d's stay");
}
