//! Locks and garbage collection under hostile conditions: a backup in another PID
//! namespace, a backup whose lock file disappears, a backup stopped for longer than the
//! stale age, a pack renamed behind blockproof's back, damaged and foreign lock files.
//! In every case: nothing a snapshot references is ever deleted, and no snapshot is
//! committed that references deleted data.

mod harness;

use harness::wait_for;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::Duration;

use harness::{hash, snap_id, Dir};
use serde_json::Value;

/// Starts a backup of `img` as vm `vm` that pauses before its commit until `gate` exists;
/// returns once it is waiting there.
fn paused_backup(dir: &Dir, via: Option<&[&str]>, vm: &str, img: &Path, gate: &Path, env: &[(&str, &str)]) -> Child {
    paused_at("BLOCKPROOF_PAUSE_BEFORE_COMMIT", dir, via, vm, img, gate, env)
}

/// Starts a backup that pauses at the test hook `hook` until `gate` exists; returns once
/// it is waiting there.
fn paused_at(
    hook: &str,
    dir: &Dir,
    via: Option<&[&str]>,
    vm: &str,
    img: &Path,
    gate: &Path,
    env: &[(&str, &str)],
) -> Child {
    let mut c = match via {
        Some(via) => dir.cmd_via(via, "backup"),
        None => dir.cmd("backup"),
    };
    c.arg("--repo").arg(dir.repo()).args(["--vm", vm, "--json", "--disk"]);
    c.arg(format!("id=d,source={}", img.display()));
    c.env(hook, gate.to_str().unwrap());
    for (k, v) in env {
        c.env(k, v);
    }
    let child = c.spawn_piped();
    wait_for(&PathBuf::from(format!("{}.waiting", gate.display())));
    child
}

/// Runs gc; returns its report.
fn gc(dir: &Dir, env: &[(&str, &str)]) -> Value {
    let mut c = dir.repo_cmd("gc");
    c.arg("--json");
    for (k, v) in env {
        c.env(k, v);
    }
    c.json()
}

fn unshare_works() -> bool {
    std::process::Command::new("unshare")
        .args(["--pid", "--fork", "--mount-proc", "true"])
        .status()
        .is_ok_and(|s| s.success())
}

/// Issue 14, item 1: a backup in another PID namespace (a container with the same host
/// name) whose pid does not exist in gc's namespace must not look dead. gc defers what
/// the backup deduplicated against, and the backup's snapshot restores bit-exact.
#[test]
fn gc_never_deletes_what_a_backup_in_another_pid_namespace_uses() {
    if !unshare_works() {
        eprintln!("skipped: unshare --pid --fork --mount-proc does not work here (needs root)");
        return;
    }
    let dir = Dir::new();
    dir.init();
    let img = dir.random_image("a0.img", 8 << 20, 1);
    let first = dir.backup("v", &[("d", &img)]);
    dir.repo_cmd("forget").arg(snap_id(&first)).ok();
    // Inside a new PID namespace, blockproof gets pid 30001 (the shell forks it; with
    // exec it would be pid 1, which exists outside too), a pid unused outside it.
    let via = [
        "unshare",
        "--pid",
        "--fork",
        "--mount-proc",
        "sh",
        "-c",
        "echo 30000 > /proc/sys/kernel/ns_last_pid; \"$@\"",
        "sh",
    ];
    let gate = dir.join("go");
    let child = paused_backup(&dir, Some(&via), "v", &img, &gate, &[]);
    let r = gc(&dir, &[]);
    assert_eq!(r["packs_deleted"], 0, "gc deleted packs a running backup uses: {r}");
    fs::write(&gate, b"").unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["disks"][0]["new_chunks"], 0, "it deduplicated against the forgotten data");
    dir.check_all();
    assert_eq!(hash(&dir.restore(&snap_id(&report), "d", "r.img")), hash(&img));
}

/// Short lock timings for the tests below (test builds only): refreshed every second,
/// stale after three.
const FAST_LOCKS: [(&str, &str); 2] =
    [("BLOCKPROOF_TEST_LOCK_REFRESH_SECS", "1"), ("BLOCKPROOF_TEST_LOCK_STALE_SECS", "3")];

/// A backup must end with the state of the repository it began with or fail: if its
/// lock disappears (removed by hand, or judged stale by another host), whatever gc then
/// deletes, the backup does not commit a snapshot that references it.
fn assert_backup_refused_to_commit(dir: &Dir, child: Child, img: &Path) {
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "the backup must fail: {stderr}");
    assert!(stderr.contains("lock"), "the error names the lost lock: {stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(dir.snapshots().is_empty(), "no snapshot was committed");
    dir.check_all();
    // Nothing is lost for good: the next backup stores what gc removed.
    let again = dir.backup("v", &[("d", img)]);
    assert_eq!(hash(&dir.restore(&snap_id(&again), "d", "again.img")), hash(img));
}

/// A failed lock refresh is not ignored: a backup whose lock file is gone (here removed
/// by hand while gc deletes what it deduplicated against) fails instead of committing.
#[test]
fn a_backup_whose_lock_is_removed_does_not_commit() {
    let dir = Dir::new();
    dir.init();
    let img = dir.random_image("a.img", 4 << 20, 2);
    let first = dir.backup("v", &[("d", &img)]);
    dir.repo_cmd("forget").arg(snap_id(&first)).ok();
    let gate = dir.join("go");
    let child = paused_backup(&dir, None, "v", &img, &gate, &FAST_LOCKS);
    for l in harness::files(&dir.repo().join("locks")) {
        fs::remove_file(l).unwrap();
    }
    let r = gc(&dir, &[]);
    assert!(r["packs_deleted"].as_u64().unwrap() > 0, "with no lock, gc frees the forgotten data: {r}");
    std::thread::sleep(Duration::from_secs(2)); // at least one refresh tick
    fs::write(&gate, b"").unwrap();
    assert_backup_refused_to_commit(&dir, child, &img);
}

/// A backup stopped (SIGSTOP) for longer than the stale age loses its lock; gc may then
/// delete what it uses, and when the backup continues it must not commit.
#[test]
fn a_backup_stopped_past_the_stale_age_does_not_commit() {
    let dir = Dir::new();
    dir.init();
    let img = dir.random_image("a.img", 4 << 20, 3);
    let first = dir.backup("v", &[("d", &img)]);
    dir.repo_cmd("forget").arg(snap_id(&first)).ok();
    let gate = dir.join("go");
    let child = paused_backup(&dir, None, "v", &img, &gate, &FAST_LOCKS);
    let pid = child.id() as i32;
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    std::thread::sleep(Duration::from_secs(5));
    let r = gc(&dir, &FAST_LOCKS);
    assert!(r["packs_deleted"].as_u64().unwrap() > 0, "the stopped backup's lock is stale: {r}");
    fs::write(&gate, b"").unwrap();
    unsafe { libc::kill(pid, libc::SIGCONT) };
    assert_backup_refused_to_commit(&dir, child, &img);
}

/// A backup stopped past the stale age right after it made an index file visible: while
/// it is stopped, another backup deduplicates against every blob that file lists and
/// commits, and gc keeps them for it. When the stopped backup continues it fails (its lock
/// is lost) — and its index file must stay. Removing it, as the writer did, took the other
/// snapshot's chunks out of the index ("used by a snapshot but not stored"; found by the
/// crash harness, `crash.rs`).
#[test]
fn an_index_file_others_rely_on_stays_when_its_writer_loses_its_lock() {
    let dir = Dir::new();
    dir.init();
    let img = dir.random_image("a.img", 4 << 20, 4);
    let gate = dir.join("go");
    let child = paused_at("BLOCKPROOF_PAUSE_AFTER_INDEX_WRITE", &dir, None, "v0", &img, &gate, &FAST_LOCKS);
    let pid = child.id() as i32;
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    std::thread::sleep(Duration::from_secs(5));
    let other = dir.backup("v1", &[("d", &img)]);
    assert_eq!(other["disks"][0]["new_chunks"], 0, "it deduplicated against the stopped backup's index file");
    // The stopped backup's lock is stale by now: gc works as if it were gone.
    gc(&dir, &FAST_LOCKS);
    assert!(harness::files(&dir.repo().join("locks")).is_empty(), "gc removed the stale lock");
    fs::write(&gate, b"").unwrap();
    unsafe { libc::kill(pid, libc::SIGCONT) };
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "the stopped backup fails: {stderr}");
    assert!(stderr.contains("lost the repository lock"), "{stderr}");
    dir.check_all();
    assert_eq!(hash(&dir.restore(&snap_id(&other), "d", "r.img")), hash(&img));
    gc(&dir, &[]);
    dir.check_all();
    assert_eq!(hash(&dir.restore(&snap_id(&other), "d", "r2.img")), hash(&img));
}

/// Issue 14, item 2: a pack renamed to another valid-looking name is "unindexed" under
/// its new name, while a live snapshot needs it under its old one. gc refuses to run
/// while referenced data is missing, and deletes nothing.
#[test]
fn gc_refuses_while_referenced_data_is_missing() {
    let dir = Dir::new();
    dir.repo_cmd("init").args(["--kdf-memory", "8", "--kdf-iterations", "1", "--pack-size", "1MiB"]).ok();
    let img = dir.random_image("a.img", 3 << 20, 4);
    dir.backup("v", &[("d", &img)]);
    let packs = dir.packs();
    assert!(packs.len() >= 3, "data packs and a pack with the index pages");
    // Whichever pack goes missing — one of data chunks or the one with the index pages.
    for pack in packs {
        let renamed = pack.with_file_name("ab".repeat(32));
        fs::rename(&pack, &renamed).unwrap();
        let line = dir.repo_cmd("gc").fails_with_one_line(1);
        let name = pack.file_name().unwrap().to_string_lossy().to_string();
        assert!(line.contains("missing") && line.contains(&name), "{line}");
        assert!(renamed.exists(), "gc deleted nothing");
        assert_eq!(dir.repo_cmd("gc").arg("--dry-run").output().status.code(), Some(1), "a dry run refuses too");
        fs::rename(&renamed, &pack).unwrap();
    }
    dir.repo_cmd("gc").ok();
    dir.check_all();
}

/// Issue 14, item 7: a damaged or foreign lock file is treated as absent (FORMAT §20):
/// it blocks no writer, commands that fail leave no lock of their own behind, and
/// `unlock` removes it.
#[test]
fn damaged_and_foreign_lock_files_block_nobody() {
    let dir = Dir::new();
    dir.init();
    let img = dir.random_image("a.img", 1 << 20, 5);
    let locks = dir.repo().join("locks");
    let foreign = locks.join("0123456789abcdef0123456789abcdef");
    fs::write(&foreign, b"not a lock at all").unwrap();
    let damaged = locks.join("fedcba9876543210fedcba9876543210");
    let r = dir.backup("v", &[("d", &img)]);
    // A real lock with one bit flipped: it no longer authenticates.
    let gate = dir.join("go");
    let child = paused_backup(&dir, None, "w", &img, &gate, &[]);
    let held: Vec<PathBuf> = harness::files(&locks).into_iter().filter(|p| *p != foreign).collect();
    let mut bytes = fs::read(&held[0]).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    fs::write(&damaged, bytes).unwrap();
    fs::write(&gate, b"").unwrap();
    assert!(child.wait_with_output().unwrap().status.success());

    // Writers are not blocked, and gc runs.
    dir.backup("v", &[("d", &img)]);
    dir.repo_cmd("gc").ok();
    // A command that fails after taking its lock leaves none behind.
    dir.repo_cmd("backup").args(["--vm", "v", "--disk", "id=d,source=/nonexistent.img"]).code(1);
    let mut left: Vec<PathBuf> = harness::files(&locks);
    left.sort();
    let mut expected = vec![foreign.clone(), damaged.clone()];
    expected.sort();
    assert_eq!(left, expected, "only the two bad files remain");
    let out = dir.repo_cmd("unlock").ok();
    assert!(out.contains("2"), "{out}");
    assert!(harness::files(&locks).is_empty(), "unlock removed them");
    assert_eq!(hash(&dir.restore(&snap_id(&r), "d", "r.img")), hash(&img));
}

/// gc never deletes the last stored copy of referenced data because the index lists
/// another copy in a pack that is gone. Here: pack A is planned while a backup that
/// deduplicated against it runs; a later backup (which skips planned packs) stores the
/// same chunks again in pack D; that backup is forgotten and D lost (deleted outside
/// blockproof, still indexed). When the
/// first backup has committed, the sweep must keep A: D's index entries are no copy.
#[test]
fn gc_keeps_a_planned_pack_whose_other_copy_is_missing() {
    let dir = Dir::new();
    dir.repo_cmd("init").args(["--kdf-memory", "8", "--kdf-iterations", "1"]).ok();
    let img = dir.random_image("a.img", 2 << 20, 9);
    let s0 = snap_id(&dir.backup("a", &[("d", &img)]));
    let first: Vec<PathBuf> = dir.packs();
    dir.repo_cmd("forget").arg(&s0).ok();
    // A backup that deduplicates against A (unreferenced now) waits before its commit.
    let gate = dir.join("gate");
    let child = paused_backup(&dir, None, "b", &img, &gate, &[]);
    let planned = gc(&dir, &[]);
    assert!(planned["packs_deferred"].as_u64().unwrap() > 0, "A is planned, not deleted: {planned}");
    // A backup that starts now stores the chunks again (it skips planned packs); it is
    // forgotten, and its packs, still indexed, are lost.
    let before = dir.packs();
    let s2 = snap_id(&dir.backup("c", &[("d", &img)]));
    let again: Vec<PathBuf> = dir.packs().into_iter().filter(|p| !before.contains(p)).collect();
    assert!(!again.is_empty());
    dir.repo_cmd("forget").arg(&s2).ok();
    for p in &again {
        fs::remove_file(p).unwrap();
    }
    fs::write(&gate, b"").unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let s1 = snap_id(&serde_json::from_slice(&out.stdout).unwrap());
    gc(&dir, &[]);
    assert!(first.iter().all(|p| p.exists()), "gc kept A: it holds the only stored copy");
    let to = dir.join("s1.img");
    dir.repo_cmd("restore").arg(&s1).args(["--disk", "d", "--to"]).arg(&to).ok();
    assert_eq!(hash(&to), hash(&img), "the first backup's restore point is whole");
}
