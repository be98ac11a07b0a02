//! Snapshot-set integrity: a snapshot file deleted or rolled back outside blockproof is
//! reported by `check`, never silently used as a gap by the next change-list incremental;
//! `forget` leaves a record so that what it removed is not mistaken for a deletion; a
//! change list may name the change id it is relative to, and a backup reads in full when
//! that is not its parent's. Crashes and concurrent writers never make `check` report a
//! deletion that did not happen.

mod harness;

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use harness::{hash, mixed_image, snap_id, Dir};
use rand::{Rng, RngCore, SeedableRng};

const SIZE: usize = 4 << 20;
const KIB: u64 = 1024;
const MIB: u64 = 1 << 20;

/// A disk image the test changes between backups, with the bytes it holds now.
struct Disk {
    path: PathBuf,
    data: Vec<u8>,
}

impl Disk {
    fn new(dir: &Dir, seed: u64) -> Disk {
        let path = dir.join("d.img");
        let data = mixed_image(SIZE, seed);
        fs::write(&path, &data).unwrap();
        Disk { path, data }
    }

    /// Overwrites `areas` (offset, length) with fresh random bytes of `seed`.
    fn write(&mut self, areas: &[(u64, u64)], seed: u64) {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        for &(off, len) in areas {
            rng.fill_bytes(&mut self.data[off as usize..(off + len) as usize]);
        }
        fs::write(&self.path, &self.data).unwrap();
    }
}

/// A VMware-style change list naming `areas`, with the optional change-id fields.
fn change_list(dir: &Dir, name: &str, areas: &[(u64, u64)], ids: &[(&str, &str)]) -> PathBuf {
    let a: Vec<serde_json::Value> = areas.iter().map(|(s, l)| serde_json::json!({"start": s, "length": l})).collect();
    let mut json = serde_json::json!({"startOffset": 0, "length": SIZE, "changedArea": a});
    for (k, v) in ids {
        json[*k] = serde_json::json!(v);
    }
    let path = dir.join(name);
    fs::write(&path, json.to_string()).unwrap();
    path
}

fn backup_cmd(dir: &Dir, disk: &Disk, cbt: &str) -> harness::TestCommand {
    let mut c = dir.repo_cmd("backup");
    c.args(["--vm", "v", "--json", "--disk"]).arg(format!("id=d,source={},cbt={cbt}", disk.path.display()));
    c
}

fn backup(dir: &Dir, disk: &Disk, cbt: &str) -> serde_json::Value {
    backup_cmd(dir, disk, cbt).json()
}

fn changes(list: &Path) -> String {
    format!("changes:{}", list.display())
}

/// The disk report of a backup.
fn disk_report(r: &serde_json::Value) -> &serde_json::Value {
    &r["disks"][0]
}

/// The restore of a backup's snapshot equals the disk's bytes now.
fn assert_restores(dir: &Dir, r: &serde_json::Value, disk: &Disk) {
    let out = dir.restore(&snap_id(r), "d", "restored.img");
    assert!(hash(&out) == blake3::hash(&disk.data), "snapshot {} restores to other bytes", snap_id(r));
    fs::remove_file(out).unwrap();
}

fn snapshot_file(dir: &Dir, id: &str) -> PathBuf {
    dir.repo().join("snapshots").join(id)
}

/// `check` fails (exit 1); returns its stderr.
fn check_fails(dir: &Dir) -> String {
    let (_, err) = dir.repo_cmd("check").code(1);
    err
}

/// `check` passes without errors; returns its JSON report.
fn check_passes(dir: &Dir) -> serde_json::Value {
    let r = dir.repo_cmd("check").arg("--json").json();
    assert_eq!(r["ok"], true, "{r}");
    r
}

fn copy_dir(from: &Path, to: &Path) {
    let status = std::process::Command::new("cp").arg("-a").arg(from).arg(to).status().unwrap();
    assert!(status.success());
}

/// Replaces directory `target` by a copy of `from`.
fn replace_dir(target: &Path, from: &Path) {
    fs::remove_dir_all(target).unwrap();
    copy_dir(from, target);
}

/// Two backups: a full one, then a change-list incremental (areas in the first MiB).
fn two_backups(dir: &Dir, disk: &mut Disk) -> (serde_json::Value, serde_json::Value) {
    let s1 = backup(dir, disk, "none");
    let a1 = [(0, 64 * KIB), (MIB, 128 * KIB)];
    disk.write(&a1, 2);
    let s2 = backup(dir, disk, &changes(&change_list(dir, "l1.json", &a1, &[])));
    assert_eq!(disk_report(&s2)["mode"], "incremental", "{s2}");
    (s1, s2)
}

#[test]
fn a_deleted_latest_snapshot_is_an_error_for_check() {
    let dir = Dir::new();
    dir.init();
    let mut disk = Disk::new(&dir, 1);
    let (_, s2) = two_backups(&dir, &mut disk);
    let r = check_passes(&dir);
    let head = &r["heads"][0];
    assert_eq!((&head["vm"], &head["seq"], &head["latest"]), (&"v".into(), &2.into(), &s2["snapshot"]), "{r}");
    fs::remove_file(snapshot_file(&dir, &snap_id(&s2))).unwrap();
    let err = check_fails(&dir);
    assert!(
        err.contains(&snap_id(&s2)) && err.contains("the latest of vm v") && err.contains("outside blockproof"),
        "{err}"
    );
}

/// The repository's latest snapshot is deleted; the next change list is relative to it
/// (it lists only what changed since). Inheriting from the older snapshot would miss
/// what changed in between: the disk is read in full, and the restore is bit-exact.
/// The deletion stays reported after that backup, until `forget ID` records it.
#[test]
fn after_a_deleted_latest_snapshot_a_change_list_incremental_reads_in_full() {
    let dir = Dir::new();
    dir.init();
    let mut disk = Disk::new(&dir, 1);
    let (_, s2) = two_backups(&dir, &mut disk);
    fs::remove_file(snapshot_file(&dir, &snap_id(&s2))).unwrap();
    let a2 = [(2 * MIB, 64 * KIB)];
    disk.write(&a2, 3);
    let out = backup_cmd(&dir, &disk, &changes(&change_list(&dir, "l2.json", &a2, &[]))).output();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let s3: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let d = disk_report(&s3);
    assert_eq!(d["mode"], "full", "{d}");
    let reason = d["full_reason"].as_str().unwrap();
    assert!(reason.contains(&snap_id(&s2)[..8]) && reason.contains("missing"), "{reason}");
    let warnings = String::from_utf8_lossy(&out.stderr);
    assert!(warnings.contains("warning") && warnings.contains("outside blockproof"), "{warnings}");
    assert_restores(&dir, &s3, &disk);

    // Still an error for check, until the loss is recorded.
    let err = check_fails(&dir);
    assert!(err.contains(&snap_id(&s2)) && err.contains("outside blockproof"), "{err}");
    let rec = dir.repo_cmd("forget").arg(snap_id(&s2)).arg("--json").json();
    assert_eq!(rec["forget"]["removed"][0]["id"], snap_id(&s2), "{rec}");
    check_passes(&dir);
    // The next backup drops it from the head, and gc then drops its record.
    backup(&dir, &disk, "none");
    let gc = dir.repo_cmd("gc").arg("--json").json();
    assert_eq!(gc["forget_records_dropped"], 1, "{gc}");
    check_passes(&dir);
    // A full id nobody references is still unknown.
    let unknown = "ab".repeat(32);
    dir.repo_cmd("forget").arg(&unknown).fails_with_one_line(2);
}

/// Forgetting the latest snapshot is not an error for check; but a change list made
/// after it is relative to it, so the next change-list backup reads in full.
#[test]
fn forgetting_the_latest_is_no_error_and_the_next_change_list_backup_reads_in_full() {
    let dir = Dir::new();
    dir.init();
    let mut disk = Disk::new(&dir, 5);
    let (s1, s2) = two_backups(&dir, &mut disk);
    dir.repo_cmd("forget").arg("v:latest").ok();
    let r = check_passes(&dir);
    assert!(r["errors"].as_array().unwrap().is_empty(), "{r}");
    let a2 = [(3 * MIB, 64 * KIB)];
    disk.write(&a2, 6);
    let s3 = backup(&dir, &disk, &changes(&change_list(&dir, "l2.json", &a2, &[])));
    let d = disk_report(&s3);
    assert_eq!(d["mode"], "full", "{d}");
    assert_eq!(d["parent"], s1["snapshot"], "{d}");
    let reason = d["full_reason"].as_str().unwrap();
    assert!(reason.contains(&snap_id(&s2)[..8]) && reason.contains("forgotten"), "{reason}");
    assert_restores(&dir, &s3, &disk);
    check_passes(&dir);
    // Forgetting older snapshots (parents of newer ones) is no error either, before and
    // after gc.
    dir.repo_cmd("forget").args(["--keep-last", "1"]).ok();
    check_passes(&dir);
    dir.repo_cmd("gc").ok();
    check_passes(&dir);
}

/// A change list naming its base (`baseChangeId`) and the disk's change id now
/// (`changeId`, recorded with the restore point): an incremental only from the parent
/// whose recorded change id is the base; otherwise a full read, with the reason.
#[test]
fn a_change_list_is_bound_to_the_change_id_of_its_parent() {
    let dir = Dir::new();
    dir.init();
    let mut disk = Disk::new(&dir, 7);
    // No parent yet: a full read, recording change id c1.
    let l1 = change_list(&dir, "l1.json", &[], &[("changeId", "52 de c0 d9-66 0b/1")]);
    assert_eq!(disk_report(&backup(&dir, &disk, &changes(&l1)))["mode"], "full");
    // Relative to c1: an incremental.
    let a2 = [(0, 64 * KIB), (MIB, 64 * KIB)];
    disk.write(&a2, 8);
    let l2 = change_list(&dir, "l2.json", &a2, &[("baseChangeId", "52 de c0 d9-66 0b/1"), ("changeId", "c2")]);
    let s2 = backup(&dir, &disk, &changes(&l2));
    assert_eq!(disk_report(&s2)["mode"], "incremental", "{s2}");
    assert_restores(&dir, &s2, &disk);
    // Relative to a change id that is not the parent's (c2): what changed between c2 and
    // c9 is not in the list. A full read, and the restore is exact.
    disk.write(&[(2 * MIB, 64 * KIB)], 9);
    let a3 = [(3 * MIB, 64 * KIB)];
    disk.write(&a3, 10);
    let l3 = change_list(&dir, "l3.json", &a3, &[("baseChangeId", "c9"), ("changeId", "c10")]);
    let s3 = backup(&dir, &disk, &changes(&l3));
    let d = disk_report(&s3);
    assert_eq!(d["mode"], "full", "{d}");
    let reason = d["full_reason"].as_str().unwrap();
    assert!(reason.contains("\"c9\"") && reason.contains("\"c2\""), "{reason}");
    assert_restores(&dir, &s3, &disk);
    // The full read recorded c10: a list relative to c10 is an incremental again.
    let a4 = [(MIB, 4 * KIB)];
    disk.write(&a4, 11);
    let l4 = change_list(&dir, "l4.json", &a4, &[("baseChangeId", "c10")]);
    let s4 = backup(&dir, &disk, &changes(&l4));
    assert_eq!(disk_report(&s4)["mode"], "incremental", "{s4}");
    assert_restores(&dir, &s4, &disk);
    // s4 recorded no change id (its list named none): a list naming a base is read in full.
    let l5 = change_list(&dir, "l5.json", &[], &[("baseChangeId", "c10")]);
    let d = disk_report(&backup(&dir, &disk, &changes(&l5))).clone();
    assert_eq!(d["mode"], "full", "{d}");
    assert!(d["full_reason"].as_str().unwrap().contains("no change id"), "{d}");
    // "*" (every allocated area) is not relative to a restore point.
    let l6 = change_list(&dir, "l6.json", &[(0, SIZE as u64)], &[("baseChangeId", "*"), ("changeId", "c11")]);
    let d = disk_report(&backup(&dir, &disk, &changes(&l6))).clone();
    assert_eq!(d["mode"], "full", "{d}");
    assert!(d["full_reason"].as_str().unwrap().contains("\"*\""), "{d}");
    // An empty change id is a usage error naming the key.
    let bad = change_list(&dir, "bad.json", &[], &[("changeId", "")]);
    let line = backup_cmd(&dir, &disk, &changes(&bad)).fails_with_one_line(2);
    assert!(line.contains("bad.json") && line.contains("changeId"), "{line}");
    check_passes(&dir);
}

/// The snapshots directory replaced by an older copy: the snapshots made since are
/// missing, and check says so; a snapshot forgotten since, present again, is a warning.
#[test]
fn a_snapshots_directory_rolled_back_to_an_older_copy_is_reported() {
    let dir = Dir::new();
    dir.init();
    let mut disk = Disk::new(&dir, 12);
    two_backups(&dir, &mut disk);
    let snapshots = dir.repo().join("snapshots");
    let older = dir.join("snapshots-older");
    copy_dir(&snapshots, &older);
    disk.write(&[(MIB, 64 * KIB)], 13);
    let s3 = backup(&dir, &disk, "none");
    let newer = dir.join("snapshots-newer");
    copy_dir(&snapshots, &newer);

    replace_dir(&snapshots, &older);
    let err = check_fails(&dir);
    assert!(err.contains(&snap_id(&s3)) && err.contains("rolled back"), "{err}");

    // Back to the newer copy: whole again. Then s3 is forgotten, and the newer copy
    // (holding s3) comes back: not an error, but a warning naming it.
    replace_dir(&snapshots, &newer);
    check_passes(&dir);
    dir.repo_cmd("forget").arg(snap_id(&s3)).ok();
    check_passes(&dir);
    replace_dir(&snapshots, &newer);
    let r = check_passes(&dir);
    let warnings = r["warnings"].to_string();
    assert!(warnings.contains(&snap_id(&s3)) && warnings.contains("forgotten"), "{r}");
    // Forgetting it again settles it.
    dir.repo_cmd("forget").arg(snap_id(&s3)).ok();
    let r = check_passes(&dir);
    assert!(!r["warnings"].to_string().contains("forgotten"), "{r}");
}

/// A whole repository rolled back to an older copy is consistent in itself; what the
/// change ids catch: the next list is relative to a change id the parent does not have.
#[test]
fn after_a_whole_repository_rollback_change_ids_force_a_full_read() {
    let dir = Dir::new();
    dir.init();
    let mut disk = Disk::new(&dir, 14);
    let l1 = change_list(&dir, "l1.json", &[], &[("changeId", "c1")]);
    backup(&dir, &disk, &changes(&l1));
    let a2 = [(0, 64 * KIB)];
    disk.write(&a2, 15);
    let l2 = change_list(&dir, "l2.json", &a2, &[("baseChangeId", "c1"), ("changeId", "c2")]);
    backup(&dir, &disk, &changes(&l2));
    let old = dir.join("repo-copy");
    copy_dir(&dir.repo(), &old);
    let a3 = [(MIB, 64 * KIB)];
    disk.write(&a3, 16);
    let l3 = change_list(&dir, "l3.json", &a3, &[("baseChangeId", "c2"), ("changeId", "c3")]);
    assert_eq!(disk_report(&backup(&dir, &disk, &changes(&l3)))["mode"], "incremental");
    assert_eq!(check_passes(&dir)["heads"][0]["seq"], 3);
    replace_dir(&dir.repo(), &old);
    // Consistent in itself: only a monitor remembering the head's seq sees it go back.
    assert_eq!(check_passes(&dir)["heads"][0]["seq"], 2);
    let a4 = [(2 * MIB, 64 * KIB)];
    disk.write(&a4, 17);
    let l4 = change_list(&dir, "l4.json", &a4, &[("baseChangeId", "c3"), ("changeId", "c4")]);
    let s4 = backup(&dir, &disk, &changes(&l4));
    let d = disk_report(&s4);
    assert_eq!(d["mode"], "full", "{d}");
    assert!(d["full_reason"].as_str().unwrap().contains("\"c3\""), "{d}");
    assert_restores(&dir, &s4, &disk);
}

/// Two backups of one vm at once: one run per vm (issue 16), so the second is refused
/// and commits nothing; the first commits; check passes, and the next change-list backup
/// is exact.
#[test]
fn concurrent_backups_of_one_vm_leave_a_consistent_record() {
    let dir = Dir::new();
    dir.init();
    let mut disk = Disk::new(&dir, 20);
    backup(&dir, &disk, "none");
    let (child, gate) = paused_backup(&dir, &disk);
    disk.write(&[(MIB, 64 * KIB)], 21);
    let refused = backup_cmd(&dir, &disk, "none").fails_with_one_line(1);
    assert!(refused.contains("is already being backed up"), "{refused}");
    fs::write(&gate, b"").unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    check_passes(&dir);
    let second = backup(&dir, &disk, "none");
    check_passes(&dir);
    let a = [(2 * MIB, 64 * KIB)];
    disk.write(&a, 22);
    let r = backup(&dir, &disk, &changes(&change_list(&dir, "l.json", &a, &[])));
    assert_eq!(disk_report(&r)["parent"], second["snapshot"], "{r}");
    assert_restores(&dir, &r, &disk);
    check_passes(&dir);
}

/// A repository from before heads and forget records, where an older blockproof forgot
/// a parent: the first backup of this build starts the vm's record, and check does not
/// call that older forget a deletion. What is removed after that is reported.
#[test]
fn what_an_older_build_forgot_before_the_record_began_is_no_error() {
    let dir = Dir::new();
    dir.init();
    let mut disk = Disk::new(&dir, 50);
    let (s1, s2) = two_backups(&dir, &mut disk);
    // As an older build leaves it: no state documents, the parent's file simply gone.
    for f in harness::files(&dir.repo().join("state")) {
        fs::remove_file(f).unwrap();
    }
    fs::remove_file(snapshot_file(&dir, &snap_id(&s1))).unwrap();
    check_passes(&dir);
    disk.write(&[(MIB, 64 * KIB)], 51);
    let s3 = backup(&dir, &disk, "none");
    assert_eq!(disk_report(&s3)["parent"], s2["snapshot"]);
    check_passes(&dir);
    // From here on the vm is recorded: its parent deleted by hand is an error.
    fs::remove_file(snapshot_file(&dir, &snap_id(&s2))).unwrap();
    let err = check_fails(&dir);
    assert!(err.contains(&snap_id(&s2)) && err.contains("the parent of disk d"), "{err}");
}

/// `copy` records what it commits in the target like a backup: the target's latest
/// snapshot deleted there is reported by check on the target.
#[test]
fn copy_records_its_snapshots_in_the_target() {
    let dir = Dir::new();
    dir.init();
    let mut disk = Disk::new(&dir, 60);
    two_backups(&dir, &mut disk);
    let target = dir.join("site2");
    dir.cmd("init").arg("--repo").arg(&target).args(["--kdf-memory", "8", "--kdf-iterations", "1"]).ok();
    let r = dir
        .repo_cmd("copy")
        .arg("--to")
        .arg(&target)
        .arg("--json")
        .env("BLOCKPROOF_TO_PASSWORD", harness::PASSWORD)
        .json();
    let on_target = |sub: &str| {
        let mut c = dir.cmd(sub);
        c.arg("--repo").arg(&target);
        c
    };
    assert_eq!(on_target("check").arg("--json").json()["ok"], true);
    let latest = r["copied"][1]["target"].as_str().unwrap().to_string();
    fs::remove_file(target.join("snapshots").join(&latest)).unwrap();
    let (_, err) = on_target("check").code(1);
    assert!(err.contains(&latest) && err.contains("the latest of vm v"), "{err}");
}

/// Starts a backup that waits before its commit; returns it and the gate that releases it.
fn paused_backup(dir: &Dir, disk: &Disk) -> (std::process::Child, PathBuf) {
    let gate = dir.join("gate");
    let mut c = backup_cmd(dir, disk, "none");
    c.env("BLOCKPROOF_PAUSE_BEFORE_COMMIT", gate.to_str().unwrap());
    let child = c.spawn_piped();
    let waiting = dir.join("gate.waiting");
    for _ in 0..3000 {
        if waiting.exists() {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(waiting.exists(), "the backup never reached its commit");
    (child, gate)
}

/// A backup chose its parent; the parent is forgotten (no committed snapshot names it
/// then) and gc runs before the backup commits. gc must keep the forget record of the
/// parent: the backup's snapshot names it.
#[test]
fn gc_keeps_the_record_of_a_parent_a_running_backup_chose() {
    let dir = Dir::new();
    dir.init();
    let mut disk = Disk::new(&dir, 40);
    backup(&dir, &disk, "none");
    disk.write(&[(0, 64 * KIB)], 41);
    let parent = backup(&dir, &disk, "none");
    let (child, gate) = paused_backup(&dir, &disk);
    dir.repo_cmd("forget").arg(snap_id(&parent)).ok();
    dir.repo_cmd("gc").ok();
    fs::write(&gate, b"").unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(disk_report(&r)["parent"], parent["snapshot"], "{r}");
    check_passes(&dir);
    // Once that backup is done, nothing running: the record stays while it is named.
    dir.repo_cmd("gc").ok();
    check_passes(&dir);
}

/// SIGKILL at random moments of change-list backups (each list naming the change id of
/// the last backup that succeeded) and of `forget VM:latest`, 24 rounds: check never
/// reports a deletion that did not happen, and every backup that succeeds restores
/// bit-exact — also after a kill between a commit and its record.
#[test]
fn sigkill_during_backup_and_forget_never_reports_a_false_deletion() {
    let dir = Dir::new();
    dir.init();
    let mut disk = Disk::new(&dir, 30);
    let l0 = change_list(&dir, "l0.json", &[], &[("changeId", "c0")]);
    backup(&dir, &disk, &changes(&l0));
    // Kill moments are drawn over the length of an incremental like those of the loop.
    let warm = change_list(&dir, "warm.json", &[], &[("baseChangeId", "c0"), ("changeId", "c00")]);
    let started = std::time::Instant::now();
    backup(&dir, &disk, &changes(&warm));
    // A little beyond it, so that the last steps (a commit and its record; a forget
    // record and the removal) are reached too.
    let span = started.elapsed().as_millis().max(20) as u64 * 3 / 2;
    let mut rng = rand::rngs::StdRng::seed_from_u64(3030);
    // What changed since the last backup that succeeded, and its change id.
    let (mut since, mut base) = (Vec::new(), "c00".to_string());
    let mut interrupted = 0;
    for round in 1..=24u64 {
        let forget = round % 4 == 0;
        let mut cmd = if forget {
            let mut c = dir.repo_cmd("forget");
            c.arg("v:latest");
            c
        } else {
            let off = rng.gen_range(0..SIZE as u64 / (64 * KIB)) * 64 * KIB;
            disk.write(&[(off, 64 * KIB)], 100 + round);
            since.push((off, 64 * KIB));
            let ids = [("baseChangeId", base.as_str()), ("changeId", &format!("c{round}"))];
            let list = change_list(&dir, &format!("l{round}.json"), &since, &ids);
            backup_cmd(&dir, &disk, &changes(&list))
        };
        let mut child = cmd.spawn_piped();
        std::thread::sleep(Duration::from_millis(rng.gen_range(0..=span)));
        let _ = child.kill(); // SIGKILL
        let out = child.wait_with_output().unwrap();
        if out.status.success() {
            if !forget {
                let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
                assert_restores(&dir, &r, &disk);
                since.clear();
                base = format!("c{round}");
            }
        } else {
            interrupted += 1;
        }
        let report = dir.repo_cmd("check").arg("--json").json();
        assert_eq!(report["ok"], true, "round {round} (forget: {forget}): {report}");
    }
    assert!(interrupted >= 4, "the loop must really interrupt operations ({interrupted} of 24 did)");
    assert!(interrupted <= 21, "and let some finish, so kills reach their last steps ({interrupted} of 24 killed)");
    // And the next backup, whatever happened, restores bit-exact.
    let list = change_list(&dir, "last.json", &since, &[("baseChangeId", base.as_str())]);
    let r = backup(&dir, &disk, &changes(&list));
    assert_restores(&dir, &r, &disk);
}
