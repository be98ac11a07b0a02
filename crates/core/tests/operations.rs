//! The operations through the library API, with in-memory sources (fakes are for unit
//! tests; the CLI tests use real files).

use std::sync::atomic::{AtomicU64, Ordering};

use blockproof_core::{backup, check, restore, BackupOptions, CheckOptions, DiskInput, NoProgress, RestoreOptions};
use blockproof_format::KdfParams;
use blockproof_repo::{InitOptions, Repository};
use blockproof_source::{BlockSource, SourceError};
use blockproof_store::LocalBackend;

/// A disk in memory that can be told to fail after some reads.
struct MemDisk {
    data: Vec<u8>,
    fail_after: Option<u64>,
    reads: AtomicU64,
}

impl BlockSource for MemDisk {
    fn size(&self) -> u64 {
        self.data.len() as u64
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), SourceError> {
        let n = self.reads.fetch_add(1, Ordering::SeqCst);
        if self.fail_after.is_some_and(|f| n >= f) {
            return Err(SourceError::Read {
                what: "memdisk".into(),
                offset,
                len: buf.len(),
                source: std::io::Error::other("injected EIO"),
            });
        }
        buf.copy_from_slice(&self.data[offset as usize..offset as usize + buf.len()]);
        Ok(())
    }

    fn describe(&self) -> String {
        "memdisk".into()
    }
}

fn disk(data: Vec<u8>, fail_after: Option<u64>) -> DiskInput {
    DiskInput {
        id: "d".into(),
        source: Box::new(MemDisk { data, fail_after, reads: AtomicU64::new(0) }),
        cbt: "none".into(),
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
    BackupOptions { vm: "vm".into(), disks: vec![d], tags: vec![], hostname: "test".into() }
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
        &RestoreOptions { snapshot: r.snapshot.to_hex(), disk: "d".into(), target: target.clone(), force: false },
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
    assert_eq!(again.packs_written, 0, "nothing new: not even an index page");
    assert_eq!(again.disks[0].parent, Some(first.snapshot));
}
