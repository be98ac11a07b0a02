//! What a failing or crashing store leaves of a repository, through the library API, with
//! the store crate's test doubles: `MemoryBackend` (a repository built once, then forked
//! for every trial) under `FaultyBackend` (a failed call, a write that lands but reports
//! failure, a crash between two calls, short and damaged reads).
//!
//! Each test first runs the operation without faults and logs its calls, then repeats it
//! once per call number with the fault at that call. What must hold every time: no
//! snapshot appears that the operation did not finish committing, `check --read-data`
//! finds no error, every earlier snapshot restores bit-exact, and a restore that fails
//! names a disk range and leaves its target as it was.

use std::path::Path;

use blockproof_core::{backup, check, restore, BackupOptions, CheckOptions, CoreError, DiskInput, NoProgress};
use blockproof_core::{Budget, RestoreOptions};
use blockproof_format::KdfParams;
use blockproof_repo::{InitOptions, Removal, Repository};
use blockproof_source::{BlockSource, SourceError};
use blockproof_store::{is_injected, Backend, Call, Calls, Fault, FaultyBackend, Kind, MemoryBackend, Op};

const PASSWORD: &[u8] = b"pw";
const CHUNK: usize = 64 * 1024;
/// 17 chunks, the last one partial.
const SIZE: usize = 16 * CHUNK + 5000;

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
        Ok(vec![])
    }

    fn describe(&self) -> String {
        "memdisk".into()
    }
}

/// `data` with chunks `chunks` replaced by incompressible bytes of `seed` (chunk 1 is
/// always zeros).
fn changed(data: &[u8], chunks: std::ops::Range<usize>, seed: u8) -> Vec<u8> {
    let mut out = data.to_vec();
    for c in chunks {
        let end = ((c + 1) * CHUNK).min(SIZE);
        blake3::Hasher::new().update(&[seed, c as u8]).finalize_xof().fill(&mut out[c * CHUNK..end]);
    }
    out[CHUNK..2 * CHUNK].fill(0);
    out
}

fn backup_of(repo: &Repository, data: &[u8]) -> Result<String, CoreError> {
    let opts = BackupOptions {
        vm: "vm".into(),
        disks: vec![DiskInput::source("d", Box::new(MemDisk(data.to_vec())))],
        tags: vec![],
        hostname: "test".into(),
        full: false,
        verify: blockproof_core::default_verify_budget(),
        on_mismatch: blockproof_core::OnMismatch::Keep,
        lock_wait: std::time::Duration::ZERO,
        machine: None,
    };
    backup(repo, opts, &NoProgress).map(|r| r.snapshot.to_hex())
}

/// A snapshot and the disk bytes it must restore to.
struct Expected {
    id: String,
    data: Vec<u8>,
}

/// A repository with two snapshots (the second shares chunks with the first), and the
/// bytes of a third backup that shares chunks with both and adds new ones.
fn repository() -> (MemoryBackend, Vec<Expected>, Vec<u8>) {
    let store = MemoryBackend::new();
    let opts = InitOptions { kdf: KdfParams::MIN, pack_size: 128 * 1024, ..InitOptions::default() };
    let repo = Repository::init(Box::new(store.clone()), PASSWORD, &opts).unwrap();
    assert_eq!(repo.config().chunk_size as usize, CHUNK);
    let first = changed(&vec![0; SIZE], 0..17, 1);
    let second = changed(&first, 3..8, 2);
    let mut expected = Vec::new();
    for data in [first, second] {
        expected.push(Expected { id: backup_of(&repo, &data).unwrap(), data });
    }
    let third = changed(&expected[1].data, 5..14, 3);
    (store, expected, third)
}

/// What the death of the crashed process does to its locks: it is gone, so they are
/// stale (here the "crashed" process is this test, which lives on; without this its
/// lock, which names this vm, would stop the next backup of the vm).
fn bury_locks(store: &MemoryBackend) {
    for name in store.list(Kind::Lock).unwrap() {
        store.remove(Kind::Lock, &name).unwrap();
    }
}

fn open(backend: impl Backend + 'static) -> Repository {
    Repository::open(Box::new(backend), PASSWORD).unwrap()
}

fn restore_to(repo: &Repository, snapshot: &str, target: &Path, force: bool) -> Result<(), CoreError> {
    let opts = RestoreOptions {
        snapshot: snapshot.into(),
        disk: "d".into(),
        target: target.into(),
        force,
        ..Default::default()
    };
    restore(repo, &opts, &NoProgress).map(drop)
}

/// The repository in `store` is sound after `what`: `check --read-data` finds no error,
/// every snapshot of `before` is there and restores bit-exact, and any other snapshot
/// (at most one) restores to `new`. Returns whether there is such a new snapshot.
fn assert_sound(store: &MemoryBackend, before: &[Expected], new: &[u8], what: &str) -> bool {
    let repo = open(store.clone());
    let report = check(&repo, &CheckOptions { read_data: Some(Budget::all()) }, &NoProgress).unwrap();
    assert!(report.ok, "{what}: check found {:?}", report.errors);
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("disk");
    let restores_to = |id: &str, data: &[u8]| {
        restore_to(&repo, id, &target, true).unwrap_or_else(|e| panic!("{what}: restore of {id}: {e}"));
        assert!(std::fs::read(&target).unwrap() == data, "{what}: snapshot {id} restores to other bytes");
    };
    let ids: Vec<String> = repo.snapshots().unwrap().iter().map(|s| s.id.to_hex()).collect();
    for e in before {
        assert!(ids.contains(&e.id), "{what}: snapshot {} is gone", e.id);
        restores_to(&e.id, &e.data);
    }
    let new_ids: Vec<&String> = ids.iter().filter(|id| !before.iter().any(|e| &&e.id == id)).collect();
    assert!(new_ids.len() <= 1, "{what}: new snapshots {new_ids:?}");
    for id in &new_ids {
        restores_to(id, new);
    }
    !new_ids.is_empty()
}

/// The calls a backup of `data` makes on a copy of `store`, once it has opened the
/// repository; `parallelism` as the store reports it.
fn backup_calls(store: &MemoryBackend, data: &[u8], parallelism: usize) -> Vec<Call> {
    let faulty = FaultyBackend::new(Box::new(store.fork().with_parallelism(parallelism)));
    let faults = faulty.faults();
    let repo = open(faulty);
    let start = faults.calls();
    backup_of(&repo, data).unwrap();
    faults.log().into_iter().filter(|c| c.number > start).collect()
}

fn is_data_write(c: &Call) -> bool {
    c.op == Op::Write && matches!(c.kind, Kind::Pack | Kind::Index | Kind::Snapshot)
}

fn data_writes() -> Calls {
    Calls::op(Op::Write).kind(Kind::Pack).kind(Kind::Index).kind(Kind::Snapshot)
}

#[test]
fn a_backup_writes_packs_then_index_files_then_its_snapshot() {
    let (store, _, new) = repository();
    let kinds: Vec<Kind> = backup_calls(&store, &new, 1).iter().filter(|c| is_data_write(c)).map(|c| c.kind).collect();
    let last_pack = kinds.iter().rposition(|k| *k == Kind::Pack).expect("packs written");
    let first_index = kinds.iter().position(|k| *k == Kind::Index).expect("an index file written");
    assert!(last_pack < first_index, "an index file before a pack: {kinds:?}");
    assert_eq!(kinds.iter().filter(|k| **k == Kind::Snapshot).count(), 1, "{kinds:?}");
    assert_eq!(kinds.last(), Some(&Kind::Snapshot), "{kinds:?}");
}

/// A pack, index or snapshot write that fails, at each of them in turn: the backup
/// fails, no new snapshot is visible, the repository is sound, its lock is gone.
#[test]
fn a_failed_write_at_any_point_of_a_backup_leaves_no_snapshot_and_a_sound_repository() {
    let (store, before, new) = repository();
    let writes = backup_calls(&store, &new, 1).iter().filter(|c| is_data_write(c)).count() as u64;
    assert!(writes >= 5, "{writes} writes");
    for i in 0..writes {
        let trial = store.fork();
        let faulty = FaultyBackend::new(Box::new(trial.clone()));
        faulty.faults().inject(data_writes().after(i).times(1), Fault::Error);
        let repo = open(faulty);
        let what = format!("write {} of {writes} failed", i + 1);
        let err = backup_of(&repo, &new).expect_err(&what);
        assert!(err.to_string().contains("injected fault"), "{what}: {err}");
        drop(repo);
        assert!(!assert_sound(&trial, &before, &new, &what), "{what}: a snapshot appeared");
        assert!(trial.list(Kind::Lock).unwrap().is_empty(), "{what}: the backup left its lock");
    }
}

/// A write that lands but whose reply is lost, at each write in turn: the backup
/// fails; the repository is sound; the snapshot is visible only if its own write was the
/// one, and then it is complete.
#[test]
fn a_lost_reply_at_any_write_of_a_backup_leaves_a_sound_repository() {
    let (store, before, new) = repository();
    let writes: Vec<Call> = backup_calls(&store, &new, 1).into_iter().filter(is_data_write).collect();
    for (i, call) in writes.iter().enumerate() {
        let trial = store.fork();
        let faulty = FaultyBackend::new(Box::new(trial.clone()));
        faulty.faults().inject(data_writes().after(i as u64).times(1), Fault::ErrorAfter);
        let repo = open(faulty);
        let what = format!("the reply to write {} ({} {}) was lost", i + 1, call.kind, call.name);
        assert!(backup_of(&repo, &new).is_err(), "{what}: the backup succeeded");
        drop(repo);
        let visible = assert_sound(&trial, &before, &new, &what);
        assert_eq!(visible, call.kind == Kind::Snapshot, "{what}");
    }
}

/// The process dies after each call of a backup in turn (on a store that runs four
/// uploads at once, some delayed, so packs land out of order). The store then holds what
/// the calls before left: the repository is sound, the new snapshot is there whole or
/// not at all, and the next backup succeeds.
#[test]
fn a_crash_at_any_call_of_a_backup_leaves_a_sound_repository_and_the_next_backup_succeeds() {
    let (store, before, new) = repository();
    for parallelism in [1, 4] {
        let calls = backup_calls(&store, &new, parallelism).len() as u64;
        for k in 0..calls {
            let trial = store.fork().with_parallelism(parallelism);
            let faulty = FaultyBackend::new(Box::new(trial.clone()));
            let faults = faulty.faults();
            if parallelism > 1 {
                faults.inject(Calls::op(Op::Write).kind(Kind::Pack), Fault::Delay(std::time::Duration::from_millis(3)));
            }
            let repo = open(faulty);
            faults.crash_after(faults.calls() + k);
            let what = format!("crash after call {k} of {calls} of a backup, {parallelism} uploads");
            let result = backup_of(&repo, &new);
            drop(repo);
            if let Err(e) = &result {
                assert!(e.to_string().contains("injected crash"), "{what}: {e}");
            }
            let visible = assert_sound(&trial, &before, &new, &what);
            assert!(result.is_err() || visible, "{what}: the backup succeeded but its snapshot is not there");
            bury_locks(&trial);
            let again = backup_of(&open(trial.clone()), &new).unwrap_or_else(|e| panic!("{what}: next backup: {e}"));
            let mut all: Vec<Expected> =
                before.iter().map(|e| Expected { id: e.id.clone(), data: e.data.clone() }).collect();
            all.push(Expected { id: again, data: new.clone() });
            assert_sound(&trial, &all, &new, &format!("{what}, then a backup"));
        }
    }
}

/// The pack reads of a restore fail (from each read on: one failed read of several
/// blobs is retried blob by blob), or one comes back short or damaged, at each read in
/// turn: the restore fails naming the disk range it could not restore, and the target
/// file keeps its old contents (no wrong byte is written to it).
#[test]
fn a_restore_from_a_failing_store_names_the_range_and_leaves_the_target_alone() {
    let (store, before, _) = repository();
    let expected = &before[1];
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("disk");

    let probe = FaultyBackend::new(Box::new(store.clone()));
    let faults = probe.faults();
    let repo = open(probe);
    let start = faults.calls();
    restore_to(&repo, &expected.id, &target, false).unwrap();
    assert!(std::fs::read(&target).unwrap() == expected.data);
    let calls: Vec<Call> = faults.log().into_iter().filter(|c| c.number > start).collect();
    let pack_reads = calls.iter().filter(|c| c.kind == Kind::Pack && matches!(c.op, Op::Read | Op::ReadAt)).count();
    assert!(pack_reads >= 2, "{calls:?}");

    let old = b"the target's old contents".to_vec();
    for fault in [Fault::Error, Fault::ShortRead, Fault::Corrupt] {
        for j in 0..pack_reads as u64 {
            std::fs::write(&target, &old).unwrap();
            let faulty = FaultyBackend::new(Box::new(store.clone()));
            let faults = faulty.faults();
            let reads = Calls::op(Op::Read).or(Op::ReadAt).kind(Kind::Pack).after(j);
            faults.inject(if fault == Fault::Error { reads } else { reads.times(1) }, fault.clone());
            let repo = open(faulty);
            let what = format!("{fault:?} at pack read {} of {pack_reads}", j + 1);
            let err = restore_to(&repo, &expected.id, &target, true).expect_err(&what);
            assert!(faults.hits() >= 1, "{what}");
            match &err {
                CoreError::DamagedRange { disk, offset, end, .. } => {
                    assert!(disk == "d" && offset < end && *end <= SIZE as u64, "{what}: {err}");
                    assert!(err.to_string().contains(&format!("bytes {offset}..{end}")), "{what}: {err}");
                }
                // The pack holding the root page of the disk's index: the whole disk.
                CoreError::DamagedIndex { disk, .. } => {
                    assert!(disk == "d" && err.to_string().contains("whole disk"), "{what}: {err}")
                }
                e => panic!("{what}: the error names no range: {e}"),
            }
            assert!(std::fs::read(&target).unwrap() == old, "{what}: the target was changed");
            let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
            assert_eq!(left, ["disk"], "{what}: files left beside the target");
        }
    }

    // Any other read failing (config, keys, index files, snapshots) fails the restore too,
    // before it writes anything.
    let other_reads = calls.iter().filter(|c| c.kind != Kind::Pack).count() as u64;
    for j in 0..other_reads {
        std::fs::write(&target, &old).unwrap();
        let faulty = FaultyBackend::new(Box::new(store.clone()));
        let faults = faulty.faults();
        let repo = open(faulty);
        let kinds = [Kind::Config, Kind::Key, Kind::Index, Kind::Snapshot, Kind::Lock, Kind::State];
        faults.inject(kinds.iter().fold(Calls::any(), |c, k| c.kind(*k)).after(j).times(1), Fault::Error);
        let err = restore_to(&repo, &expected.id, &target, true).expect_err("the restore succeeded");
        // An index file that cannot be read is skipped with a warning (one damaged file
        // never blocks the rest): the blobs it listed are then named as missing, by range.
        let named = err.to_string().contains("injected fault")
            || matches!(
                &err,
                CoreError::DamagedRange { cause: blockproof_repo::RepoError::MissingBlob(_), .. }
                    | CoreError::DamagedIndex { cause: blockproof_repo::RepoError::MissingBlob(_), .. }
            );
        assert!(named, "{err}");
        assert!(std::fs::read(&target).unwrap() == old, "other read {j}: the target was changed");
    }
}

/// A store that keeps failing fails the backup with the store's error, which a caller
/// can tell from a source's.
#[test]
fn a_store_that_keeps_failing_fails_the_backup_with_its_error() {
    let (store, before, new) = repository();
    let trial = store.fork();
    let faulty = FaultyBackend::new(Box::new(trial.clone()));
    faulty.faults().inject(Calls::op(Op::Write).kind(Kind::Pack), Fault::Error);
    let repo = open(faulty);
    match backup_of(&repo, &new) {
        Err(CoreError::Repo(blockproof_repo::RepoError::Store(e))) => assert!(is_injected(&e), "{e}"),
        other => panic!("{:?}", other.map_err(|e| format!("{e:?}"))),
    }
    drop(repo);
    assert!(!assert_sound(&trial, &before, &new, "every pack write failing"));
}

/// The repository of [`repository`] with damage for `repair` to mend: its index files
/// lost (every pack must be indexed again) and a byte flipped in the middle of its
/// largest pack (salvaged: its other blobs copied, one chunk lost).
fn damaged_repository() -> (MemoryBackend, Vec<Expected>) {
    let (store, before, _) = repository();
    for name in store.list(Kind::Index).unwrap() {
        store.remove(Kind::Index, &name).unwrap();
    }
    let (name, _) = store.list_sizes(Kind::Pack).unwrap().into_iter().max_by_key(|(_, s)| *s).unwrap();
    let mut bytes = store.read(Kind::Pack, &name).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x10;
    store.write(Kind::Pack, &name, &bytes).unwrap();
    (store, before)
}

fn repair_of(store: &MemoryBackend) -> blockproof_core::RepairReport {
    let opts = blockproof_core::RepairOptions { dry_run: false };
    blockproof_core::repair(&open(store.clone()), &opts, &NoProgress).unwrap()
}

/// The process dies after each call of a repair in turn. Whatever it had done, the
/// next repair finishes the job and loses nothing more than a repair without the crash:
/// the same byte ranges of the same snapshots, and every other byte restores.
#[test]
fn a_crash_at_any_call_of_a_repair_loses_nothing_and_the_next_repair_finishes() {
    let (store, before) = damaged_repository();
    let reference = repair_of(&store.fork());
    assert_eq!((reference.packs_salvaged, reference.blobs_damaged), (1, 1), "{reference:?}");
    assert!(reference.packs_reindexed >= 3, "{reference:?}");
    let lost = |r: &blockproof_core::RepairReport| -> Vec<String> {
        let mut v: Vec<String> = r.lost.iter().map(|l| format!("{} {} {:?}", l.snapshot, l.disk, l.ranges)).collect();
        v.sort();
        v
    };
    assert!(!lost(&reference).is_empty());

    let faulty = FaultyBackend::new(Box::new(store.fork()));
    let faults = faulty.faults();
    let repo = open(faulty);
    let start = faults.calls();
    blockproof_core::repair(&repo, &blockproof_core::RepairOptions { dry_run: false }, &NoProgress).unwrap();
    let calls = faults.calls() - start;
    drop(repo);
    assert!(calls > 20, "{calls} calls");

    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("disk");
    for k in 0..calls {
        let trial = store.fork();
        let faulty = FaultyBackend::new(Box::new(trial.clone()));
        let faults = faulty.faults();
        let repo = open(faulty);
        faults.crash_after(faults.calls() + k);
        let what = format!("crash after call {k} of {calls} of a repair");
        if let Err(e) = blockproof_core::repair(&repo, &blockproof_core::RepairOptions { dry_run: false }, &NoProgress)
        {
            assert!(e.to_string().contains("injected crash"), "{what}: {e}");
        }
        drop(repo);
        // The dead process's lock (blockproof unlock removes it).
        for name in trial.list(Kind::Lock).unwrap() {
            trial.remove(Kind::Lock, &name).unwrap();
        }
        let again = repair_of(&trial);
        assert_eq!(lost(&again), lost(&reference), "{what}: {again:?}");
        assert!(repair_of(&trial).problems.is_empty(), "{what}: a third repair finds nothing to do");
        let repo = open(trial.clone());
        for e in &before {
            // Every byte but the lost ranges restores: the gaps between them.
            let mut gaps = Vec::new();
            let mut at = 0u64;
            for l in reference.lost.iter().filter(|l| l.snapshot.to_hex() == e.id) {
                for r in &l.ranges {
                    gaps.push((at, r.offset - at));
                    at = r.offset + r.length;
                }
            }
            gaps.push((at, e.data.len() as u64 - at));
            for (offset, length) in gaps {
                if length == 0 {
                    continue;
                }
                let opts = RestoreOptions {
                    snapshot: e.id.clone(),
                    disk: "d".into(),
                    target: target.clone(),
                    force: true,
                    range: Some((offset, length)),
                    ..Default::default()
                };
                restore(&repo, &opts, &NoProgress).unwrap_or_else(|err| panic!("{what}: restore of {}: {err}", e.id));
                let got = std::fs::read(&target).unwrap();
                let (a, b) = (offset as usize, (offset + length) as usize);
                assert!(got[a..b] == e.data[a..b], "{what}: snapshot {} differs in {a}..{b}", e.id);
            }
        }
    }
}

/// What `check` says of a repository after an interrupted forget or gc: no error (above
/// all no snapshot "deleted or rolled back outside blockproof" that forget removed), and
/// every snapshot of `before` still there restores bit-exact.
fn assert_consistent(store: &MemoryBackend, before: &[Expected], what: &str) {
    let repo = open(store.clone());
    let report = check(&repo, &CheckOptions::default(), &NoProgress).unwrap();
    assert!(report.ok, "{what}: check found {:?}", report.errors);
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("disk");
    let ids: Vec<String> = repo.snapshots().unwrap().iter().map(|s| s.id.to_hex()).collect();
    for e in before.iter().filter(|e| ids.contains(&e.id)) {
        restore_to(&repo, &e.id, &target, true).unwrap_or_else(|err| panic!("{what}: restore of {}: {err}", e.id));
        assert!(std::fs::read(&target).unwrap() == e.data, "{what}: snapshot {} restores to other bytes", e.id);
    }
}

type TrialOp = fn(&Repository) -> Result<(), CoreError>;

fn forget_refs(refs: &[&str]) -> blockproof_core::ForgetOptions {
    blockproof_core::ForgetOptions { snapshots: refs.iter().map(|r| r.to_string()).collect(), ..Default::default() }
}

/// `forget VM:latest` (which moves the vm's head back), `forget --keep-last 1`, `gc`
/// after a forget of a parent and `gc --recompress`: the process dies after each of their
/// calls in turn.
/// `check` never reports a deletion that did not happen, every snapshot left restores,
/// and a backup and a check after it pass.
#[test]
fn a_crash_at_any_call_of_forget_or_gc_never_makes_check_report_a_false_deletion() {
    let (store, before, new) = repository();
    let first_forgotten = store.fork();
    blockproof_core::forget(&open(first_forgotten.clone()), &forget_refs(&[&before[0].id])).unwrap();
    let ops: [(&str, &MemoryBackend, TrialOp); 4] = [
        ("forget vm:latest", &store, |r| blockproof_core::forget(r, &forget_refs(&["vm:latest"])).map(drop)),
        ("forget --keep-last 1", &store, |r| {
            let policy = blockproof_core::KeepPolicy { last: Some(1), ..Default::default() };
            blockproof_core::forget(r, &blockproof_core::ForgetOptions { policy, ..Default::default() }).map(drop)
        }),
        ("gc after a forget of a parent", &first_forgotten, |r| {
            blockproof_core::gc(r, &blockproof_core::GcOptions::default(), &NoProgress).map(drop)
        }),
        ("gc --recompress", &store, |r| {
            let recompress = blockproof_core::RecompressOptions {
                budget: blockproof_core::Budget::all(),
                older_than: std::time::Duration::ZERO,
            };
            let opts = blockproof_core::GcOptions { recompress: Some(recompress), ..Default::default() };
            let report = blockproof_core::gc(r, &opts, &NoProgress)?;
            assert!(report.packs_recompressed > 0, "LZ4 packs are rewritten");
            Ok(())
        }),
    ];
    for (name, base, op) in ops {
        let calls = {
            let faulty = FaultyBackend::new(Box::new(base.fork()));
            let faults = faulty.faults();
            let repo = open(faulty);
            let start = faults.calls();
            op(&repo).unwrap();
            faults.calls() - start
        };
        assert!(calls >= 4, "{name}: {calls} calls");
        for k in 0..=calls {
            let trial = base.fork();
            let faulty = FaultyBackend::new(Box::new(trial.clone()));
            let faults = faulty.faults();
            let repo = open(faulty);
            faults.crash_after(faults.calls() + k);
            let what = format!("{name}, crash after call {k} of {calls}");
            if let Err(e) = op(&repo) {
                assert!(e.to_string().contains("injected crash"), "{what}: {e}");
            }
            drop(repo);
            assert_consistent(&trial, &before, &what);
            backup_of(&open(trial.clone()), &new).unwrap_or_else(|e| panic!("{what}: next backup: {e}"));
            assert_consistent(&trial, &before, &format!("{what}, then a backup"));
        }
    }
}

/// Forget records stay while a snapshot names the forgotten one as its parent (or a head
/// names it), and gc drops them once nothing does: they do not pile up.
#[test]
fn gc_keeps_the_forget_records_still_referenced_and_drops_the_rest() {
    let (store, before, new) = repository();
    let repo = open(store.clone());
    let gc = |repo: &Repository| blockproof_core::gc(repo, &Default::default(), &NoProgress).unwrap();
    let records = |store: &MemoryBackend| {
        store.list(Kind::State).unwrap().into_iter().filter(|n| n.starts_with("forgotten-")).count()
    };
    // The first snapshot is the parent of the second: its record stays.
    blockproof_core::forget(&repo, &forget_refs(&[&before[0].id])).unwrap();
    assert_eq!(gc(&repo).forget_records_dropped, 0);
    assert_eq!(records(&store), 1);
    assert_consistent(&store, &before, "after gc");
    // The second goes too; the next backup has no parent and the head moves to it:
    // nothing names either any more.
    blockproof_core::forget(&repo, &forget_refs(&["vm:latest"])).unwrap();
    assert_eq!(records(&store), 1, "records are folded into one");
    backup_of(&repo, &new).unwrap();
    assert_eq!(gc(&repo).forget_records_dropped, 2);
    assert_eq!(records(&store), 0);
    assert_consistent(&store, &before, "after the records were dropped");
}

/// A backup that lost its lock right after writing its snapshot takes it back; another
/// backup may have chosen it as its parent meanwhile. The withdrawal is recorded, so that
/// parent reference is no "deletion outside blockproof".
#[test]
fn a_withdrawn_snapshot_is_recorded_before_it_goes() {
    let (store, before, _) = repository();
    let repo = open(store.clone());
    // The second snapshot names the first as its parent: withdraw the first.
    let first = repo.load_snapshot(&before[0].id).unwrap();
    repo.withdraw_snapshot(first.id, &first.snapshot);
    assert!(!repo.snapshots().unwrap().iter().any(|s| s.id == first.id));
    let records = repo.forget_records().unwrap();
    assert_eq!(records.snapshots[&first.id].how, blockproof_repo::Removal::Withdrawn);
    assert_consistent(&store, &before, "after a withdrawal");
}

/// A forget record or a head with absurd numbers (damaged, or written by a broken or
/// hostile writer holding the key) is reported, never a panic: a removal time past the
/// year 9999 or the end of `SystemTime`, a write count at its maximum.
#[test]
fn absurd_numbers_in_a_forget_record_or_a_head_are_no_panic() {
    let (store, before, new) = repository();
    let repo = open(store.clone());
    let present = repo.load_snapshot(&before[1].id).unwrap();
    for removed in [253_402_300_800, u64::MAX] {
        let mut f = blockproof_repo::Forgotten::new(present.id, "vm", &present.snapshot.time, Removal::Forget);
        f.removed = removed;
        let old = repo.forget_records().unwrap().files;
        repo.replace_forget_records(vec![f], &old).unwrap();
        let report = check(&repo, &CheckOptions::default(), &NoProgress).unwrap();
        let warning = report.warnings.iter().find(|w| w.contains("was forgotten")).expect("a warning");
        assert!(warning.contains(&format!("{removed} s after the epoch")), "{warning}");
    }
    let mut head = repo.read_head("vm").unwrap().unwrap();
    head.seq = u64::MAX;
    repo.write_head(&head).unwrap();
    backup_of(&repo, &new).unwrap();
    assert_eq!(repo.read_head("vm").unwrap().unwrap().seq, u64::MAX, "the count stays at its maximum");
}

/// A backup whose change source is the caller's word (a change list without change ids)
/// of `data`, reporting `changes`.
fn tracked_backup_of(
    repo: &Repository,
    data: &[u8],
    changes: Vec<(u64, u64)>,
) -> Result<blockproof_core::BackupReport, CoreError> {
    let data = data.to_vec();
    let disk = DiskInput {
        id: "d".into(),
        cbt: "changes:test".into(),
        open: Box::new(move |_, _| {
            let mut opened = blockproof_source::OpenedDisk::full(Box::new(MemDisk(data)), "unused");
            opened.changes = blockproof_source::Changes::ranges(changes);
            Ok(opened)
        }),
        verify: None,
    };
    let opts = BackupOptions {
        vm: "vm".into(),
        disks: vec![disk],
        tags: vec![],
        hostname: "test".into(),
        full: false,
        verify: blockproof_core::default_verify_budget(),
        on_mismatch: blockproof_core::OnMismatch::Keep,
        lock_wait: std::time::Duration::ZERO,
        machine: None,
    };
    backup(repo, opts, &NoProgress)
}

/// The process dies after each call of a backup; when its snapshot was committed but
/// the vm's head not yet updated, the head lags behind: the next change-list backup
/// still takes that snapshot as its parent and reads incrementally (and exactly).
#[test]
fn after_a_crash_between_a_commit_and_its_record_the_next_incremental_is_still_one() {
    use blockproof_format::manifest::ReadMode;
    let (store, before, new) = repository();
    let calls = backup_calls(&store, &new, 1).len() as u64;
    let mut lagging = 0;
    for k in 0..calls {
        let trial = store.fork();
        let faulty = FaultyBackend::new(Box::new(trial.clone()));
        let faults = faulty.faults();
        let repo = open(faulty);
        faults.crash_after(faults.calls() + k);
        let _ = backup_of(&repo, &new);
        drop(repo);
        bury_locks(&trial);
        let what = format!("crash after call {k} of {calls}");
        let repo = open(trial.clone());
        let snapshots = repo.snapshots().unwrap();
        let newest = snapshots.last().unwrap().id;
        if newest.to_hex() == before[1].id {
            continue; // not committed
        }
        if repo.read_head("vm").unwrap().unwrap().latest.snapshot != newest {
            lagging += 1;
        }
        let r = tracked_backup_of(&repo, &new, vec![]).unwrap_or_else(|e| panic!("{what}: {e}"));
        let d = &r.disks[0];
        assert_eq!((d.mode, d.parent), (ReadMode::Incremental, Some(newest)), "{what}: {:?}", d.full_reason);
        drop(repo);
        assert_consistent(&trial, &before, &what);
    }
    assert!(lagging >= 1, "some crash must fall between a commit and the update of the head");
}

/// A gc that dies part-way — at each of its calls in turn — says in its error how many
/// packs it had already deleted, so with the next gc's report every deleted pack is
/// counted exactly once (before, a gc interrupted after its deletions reported nothing,
/// and the next one "freed 0 B in 0 packs" although the packs were gone).
#[test]
fn an_interrupted_gc_says_what_it_already_deleted() {
    let (store, before, _) = repository();
    let base = store.fork();
    let ids: Vec<&str> = before.iter().map(|e| e.id.as_str()).collect();
    blockproof_core::forget(&open(base.clone()), &forget_refs(&ids)).unwrap();
    let gc = |r: &Repository| blockproof_core::gc(r, &blockproof_core::GcOptions::default(), &NoProgress);
    let packs = |m: &MemoryBackend| m.list(Kind::Pack).unwrap().len() as u64;
    let calls = {
        let faulty = FaultyBackend::new(Box::new(base.fork()));
        let faults = faulty.faults();
        let repo = open(faulty);
        let start = faults.calls();
        assert!(gc(&repo).unwrap().packs_deleted > 1, "the forgotten snapshots' packs go");
        faults.calls() - start
    };
    let mut interrupted_after_deleting = 0;
    for k in 0..=calls {
        let trial = base.fork();
        let at_start = packs(&trial);
        let faulty = FaultyBackend::new(Box::new(trial.clone()));
        let faults = faulty.faults();
        let repo = open(faulty);
        faults.crash_after(faults.calls() + k);
        let what = format!("crash after call {k} of {calls}");
        let said = match gc(&repo) {
            Ok(r) => r.packs_deleted,
            Err(CoreError::Interrupted { done, source, .. }) => {
                assert!(source.to_string().contains("injected crash"), "{what}: {source}");
                interrupted_after_deleting += 1;
                let n = done.split(" in ").nth(1).and_then(|t| t.split(' ').next()).and_then(|n| n.parse().ok());
                n.unwrap_or_else(|| panic!("{what}: no count in {done:?}"))
            }
            Err(e) => {
                assert!(e.to_string().contains("injected crash"), "{what}: {e}");
                0
            }
        };
        drop(repo);
        bury_locks(&trial);
        let next = gc(&open(trial.clone())).unwrap_or_else(|e| panic!("{what}: the next gc: {e}"));
        assert_eq!(said + next.packs_deleted, at_start - packs(&trial), "{what}: every deleted pack counted once");
        assert_consistent(&trial, &[], &what);
    }
    assert!(interrupted_after_deleting > 0, "some crash points fall after a deletion");
}
