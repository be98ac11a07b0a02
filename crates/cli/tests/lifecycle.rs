//! The lifecycle of restore points: forget by id and by policy, protection, garbage
//! collection that frees what only forgotten snapshots used, gc racing a backup (driven
//! deterministically with the pause hook), two backups and a gc at once, locks.

mod harness;

use harness::wait_for;

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use harness::{hash, scatter_writes, snap_id, Dir};
use serde_json::Value;

/// Forget + gc: what only forgotten snapshots referenced goes (≥ 90% of it), the kept
/// snapshots restore bit-exact, and check --read-data passes.
#[test]
fn forget_and_gc_free_what_only_forgotten_snapshots_used() {
    let dir = Dir::new();
    dir.init();
    let keep = dir.image("keep.img", 16 << 20, 1);
    let gone = dir.image("gone.img", 16 << 20, 2);
    let k = dir.backup("keep", &[("d", &keep)]);
    let before_gone = dir.repo_bytes();
    let g = dir.backup("gone", &[("d", &gone)]);
    let only_gone = dir.repo_bytes() - before_gone;

    let dry = dir.repo_cmd("forget").args(["gone:latest", "--dry-run", "--json"]).json();
    assert_eq!(dry["forget"]["removed"][0]["id"], g["snapshot"]);
    assert_eq!(dir.snapshots().len(), 2, "a dry run removes nothing");

    let out = dir.repo_cmd("forget").args(["gone:latest", "--prune", "--json"]).json();
    assert_eq!(out["forget"]["removed"].as_array().unwrap().len(), 1);
    let freed = before_gone + only_gone - dir.repo_bytes();
    assert!(freed as f64 >= 0.9 * only_gone as f64, "freed {freed} of {only_gone}");
    assert_eq!(out["gc"]["packs_deferred"], 0);
    dir.check_all();
    let restored = dir.restore(&snap_id(&k), "d", "keep-restored.img");
    assert_eq!(hash(&restored), hash(&keep));
}

/// Partly used packs are repacked: after forgetting one of two vms whose chunks share
/// packs, gc copies the live blobs and frees the rest.
#[test]
fn sparse_packs_are_repacked() {
    let dir = Dir::new();
    dir.repo_cmd("init").args(["--kdf-memory", "8", "--kdf-iterations", "1", "--pack-size", "1MiB"]).ok();
    // Two disks in one backup: their chunks interleave in the same packs.
    let a = dir.image("a.img", 8 << 20, 3);
    let b = dir.image("b.img", 8 << 20, 4);
    let both = dir.backup("v", &[("a", &a), ("b", &b)]);
    let only_a = dir.backup("w", &[("a", &a)]);
    dir.repo_cmd("forget").arg(snap_id(&both)).ok();
    let r = dir.repo_cmd("gc").arg("--json").json();
    assert!(r["packs_repacked"].as_u64().unwrap() > 0 || r["packs_deleted"].as_u64().unwrap() > 0, "{r}");
    dir.check_all();
    assert_eq!(hash(&dir.restore(&snap_id(&only_a), "a", "a.out")), hash(&a));
    // Everything b alone used is gone: a second gc finds nothing more to do.
    let again = dir.repo_cmd("gc").arg("--json").json();
    assert_eq!((again["packs_deleted"].as_u64(), again["packs_repacked"].as_u64()), (Some(0), Some(0)), "{again}");
}

/// `gc --recompress`: cold LZ4 packs are rewritten with zstd — nothing with the default
/// `--older-than 7d` on fresh packs, the dry run changes nothing, then with
/// `--older-than 0` the repository shrinks, every blob is still readable and checks
/// against its id, every snapshot restores bit-exact, and a second run finds nothing to do.
#[test]
fn cold_packs_are_recompressed_with_zstd() {
    let dir = Dir::new();
    dir.repo_cmd("init").args(["--kdf-memory", "8", "--kdf-iterations", "1", "--pack-size", "1MiB"]).ok();
    let a = dir.image("a.img", 12 << 20, 5);
    let b = dir.image("b.img", 12 << 20, 6);
    let sa = dir.backup("v", &[("a", &a)]);
    let sb = dir.backup("w", &[("b", &b)]);
    let fresh = dir.repo_cmd("gc").args(["--recompress", "--json"]).json();
    assert_eq!(fresh["packs_recompressed"], 0, "packs younger than 7 days stay: {fresh}");
    let before = dir.repo_bytes();
    let dry = dir.repo_cmd("gc").args(["--recompress", "all", "--older-than", "0", "--dry-run", "--json"]).json();
    assert!(dry["packs_recompressed"].as_u64().unwrap() > 0, "{dry}");
    assert_eq!(dir.repo_bytes(), before, "a dry run changes nothing");

    // One pack per run with a budget of 1ios; then the rest.
    let one = dir.repo_cmd("gc").args(["--recompress", "1ios", "--older-than", "0", "--json"]).json();
    assert_eq!(one["packs_recompressed"], 1, "{one}");
    let r = dir.repo_cmd("gc").args(["--recompress", "--older-than", "0", "--json"]).json();
    harness::assert_json_documented("gc", &r);
    assert!(r["packs_recompressed"].as_u64().unwrap() > 0, "{r}");
    let (from, to) = (r["bytes_recompressed_from"].as_u64().unwrap(), r["bytes_recompressed_to"].as_u64().unwrap());
    assert!(to < from, "zstd at level 9 is smaller than LZ4: {from} -> {to}");
    assert!(r["packs_deleted"].as_u64().unwrap() >= r["packs_recompressed"].as_u64().unwrap(), "old packs freed: {r}");
    assert!(dir.repo_bytes() < before, "the repository shrank: {} -> {}", before, dir.repo_bytes());
    dir.check_all();
    assert_eq!(hash(&dir.restore(&snap_id(&sa), "a", "a.out")), hash(&a));
    assert_eq!(hash(&dir.restore(&snap_id(&sb), "b", "b.out")), hash(&b));
    let again = dir.repo_cmd("gc").args(["--recompress", "--older-than", "0", "--json"]).json();
    assert_eq!(again["packs_recompressed"], 0, "no LZ4 blob is left: {again}");
    // An incremental after recompression still deduplicates against the rewritten blobs.
    let next = dir.backup("v", &[("a", &a)]);
    assert_eq!(next["disks"][0]["new_chunks"], 0, "{next}");
}

/// Retention policies per vm, and protection.
#[test]
fn keep_policies_and_protection() {
    let dir = Dir::new();
    dir.init();
    let img = dir.image("d.img", 1 << 20, 5);
    let mut ids = Vec::new();
    for _ in 0..4 {
        ids.push(snap_id(&dir.backup("v", &[("d", &img)])));
    }
    let other = snap_id(&dir.backup("w", &[("d", &img)]));
    dir.repo_cmd("protect").arg(&ids[0][..12]).ok();
    let r = dir.repo_cmd("forget").args(["--keep-last", "2", "--vm", "v", "--json"]).json();
    let removed: Vec<&str> =
        r["forget"]["removed"].as_array().unwrap().iter().map(|d| d["id"].as_str().unwrap()).collect();
    assert_eq!(removed, vec![ids[1].as_str()], "the oldest is protected, the newest two kept");
    let left: Vec<String> = dir.snapshots().iter().map(|s| s["id"].as_str().unwrap().to_string()).collect();
    assert!(left.contains(&ids[0]) && left.contains(&other) && !left.contains(&ids[1]));
    let line = dir.repo_cmd("forget").arg(&ids[0]).fails_with_one_line(2);
    assert!(line.contains("protected"), "{line}");
    dir.repo_cmd("unprotect").arg(&ids[0]).ok();
    dir.repo_cmd("forget").arg(&ids[0]).ok();
    dir.repo_cmd("forget").fails_with_one_line(2);
}

/// A backup that left out a disk the vm had used to pass without a word; `status` then
/// hid the disk and `forget --keep-last 1` removed its last restore point. The backup
/// warns, `status` lists every disk with the restore point holding its newest copy, and
/// retention keeps each disk's last restore point unless asked to judge the vm alone.
#[test]
fn a_disk_left_out_keeps_its_last_restore_point() {
    let dir = Dir::new();
    dir.init();
    let os = dir.image("os.img", 1 << 20, 6);
    let data = dir.image("data.img", 1 << 20, 7);
    let both = snap_id(&dir.backup("web01", &[("web01-os", &os), ("web01-data", &data)]));
    let partial = dir.backup("web01", &[("web01-data", &data)]);
    let warnings: Vec<&str> = partial["warnings"].as_array().unwrap().iter().map(|w| w.as_str().unwrap()).collect();
    assert!(
        warnings.iter().any(|w| w.contains("web01-os") && w.contains("leaves out") && w.contains(&both[..8])),
        "{partial}"
    );
    let partial = snap_id(&partial);

    let status = dir.repo_cmd("status").args(["--vm", "web01", "--json"]).json();
    let disks = status[0]["disks"].as_array().unwrap();
    let disk = |id: &str| disks.iter().find(|d| d["id"] == id).unwrap_or_else(|| panic!("{id} missing: {status}"));
    assert_eq!(disk("web01-os")["snapshot"], both.as_str());
    assert_eq!(disk("web01-data")["snapshot"], partial.as_str());
    let text = dir.repo_cmd("status").args(["--vm", "web01"]).ok();
    assert!(text.contains("disk web01-os") && text.contains("not in the latest snapshot"), "{text}");

    let r = dir.repo_cmd("forget").args(["--keep-last", "1", "--dry-run", "--json"]).json();
    assert_eq!(r["forget"]["removed"], serde_json::json!([]), "{r}");
    let kept = r["forget"]["kept"].as_array().unwrap();
    let first = kept.iter().find(|d| d["id"] == both.as_str()).unwrap_or_else(|| panic!("{r}"));
    assert_eq!(first["reasons"], serde_json::json!(["last of disk web01-os"]), "{r}");
    // Asked to judge the vm as a whole, the same policy removes it.
    let r = dir.repo_cmd("forget").args(["--keep-last", "1", "--per", "vm", "--dry-run", "--json"]).json();
    assert_eq!(r["forget"]["removed"][0]["id"], both.as_str(), "{r}");
    // For real, per disk: both stay and restore.
    dir.repo_cmd("forget").args(["--keep-last", "1"]).ok();
    assert_eq!(dir.snapshots().len(), 2);
    assert_eq!(hash(&dir.restore(&both[..12], "web01-os", "os.out")), hash(&os));
}

/// `--keep-within` keeps what is younger than a duration before the vm's newest
/// snapshot, `--keep-tag` what carries a tag; a duration that is not one is a usage error.
#[test]
fn keep_within_and_keep_tag() {
    let dir = Dir::new();
    dir.init();
    let img = dir.image("d.img", 1 << 20, 8);
    let tagged = snap_id(&dir.backup_cmd("v", &[("d", &img)]).args(["--tag", "monthly"]).json());
    let middle = snap_id(&dir.backup("v", &[("d", &img)]));
    std::thread::sleep(Duration::from_millis(1100));
    let newest = snap_id(&dir.backup("v", &[("d", &img)]));
    let r = dir.repo_cmd("forget").args(["--keep-within", "1s", "--keep-tag", "monthly", "--json"]).json();
    let removed: Vec<&str> =
        r["forget"]["removed"].as_array().unwrap().iter().map(|d| d["id"].as_str().unwrap()).collect();
    assert_eq!(removed, vec![middle.as_str()], "{r}");
    let reasons =
        |id: &str| r["forget"]["kept"].as_array().unwrap().iter().find(|d| d["id"] == id).unwrap()["reasons"].clone();
    assert_eq!(reasons(&tagged), serde_json::json!(["tag monthly"]));
    assert_eq!(reasons(&newest), serde_json::json!(["within"]));
    for bad in ["0s", "soon"] {
        let line = dir.repo_cmd("forget").args(["--keep-within", bad]).fails_with_one_line(2);
        assert!(line.contains(bad), "{line}");
    }
}

/// A gc that runs while a backup is between deduplicating and committing never deletes a
/// chunk that backup then references: it defers, and the backup restores bit-exact.
#[test]
fn gc_during_a_backup_defers_what_the_backup_uses() {
    let dir = Dir::new();
    dir.init();
    let img = dir.image("d.img", 16 << 20, 6);
    let first = dir.backup("old", &[("d", &img)]);
    // The new backup deduplicates against everything `old` stored, then pauses.
    let gate = dir.join("go");
    let mut c = dir.repo_cmd("backup");
    c.args(["--vm", "new", "--json", "--disk"]).arg(format!("id=d,source={}", img.display()));
    c.env("BLOCKPROOF_PAUSE_BEFORE_COMMIT", gate.to_str().unwrap());
    let child = c.spawn_piped();
    wait_for(&PathBuf::from(format!("{}.waiting", gate.display())));

    // Meanwhile the only snapshot referencing that data is forgotten and gc runs.
    dir.repo_cmd("forget").arg(snap_id(&first)).ok();
    let r = dir.repo_cmd("gc").arg("--json").json();
    assert_eq!(r["packs_deleted"], 0, "{r}");
    assert!(r["packs_deferred"].as_u64().unwrap() > 0, "{r}");

    fs::write(&gate, b"").unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["disks"][0]["new_chunks"], 0, "it deduplicated against the old data");
    dir.check_all();
    assert_eq!(hash(&dir.restore(&snap_id(&report), "d", "new.img")), hash(&img));

    // Now the deferred plan is swept: the packs are referenced again, so nothing goes.
    let r = dir.repo_cmd("gc").arg("--json").json();
    assert_eq!((r["packs_deleted"].as_u64(), r["packs_deferred"].as_u64()), (Some(0), Some(0)), "{r}");
    dir.check_all();
}

/// A backup that starts after gc planned a deletion does not deduplicate against the
/// planned packs: it stores what it needs again, and the sweep removes the old packs.
#[test]
fn backups_after_a_plan_do_not_use_planned_packs() {
    let dir = Dir::new();
    dir.init();
    let img = dir.image("d.img", 8 << 20, 7);
    let old = dir.backup("old", &[("d", &img)]);
    // A backup of another vm holds a lock, so the plan cannot be swept at once.
    let other = dir.image("o.img", 1 << 20, 8);
    let gate = dir.join("go");
    let mut c = dir.repo_cmd("backup");
    c.args(["--vm", "other", "--disk"]).arg(format!("id=d,source={}", other.display()));
    c.env("BLOCKPROOF_PAUSE_BEFORE_COMMIT", gate.to_str().unwrap());
    let holder = c.spawn_piped();
    wait_for(&PathBuf::from(format!("{}.waiting", gate.display())));
    dir.repo_cmd("forget").arg(snap_id(&old)).ok();
    let r = dir.repo_cmd("gc").arg("--json").json();
    assert!(r["packs_deferred"].as_u64().unwrap() > 0, "{r}");

    let new = dir.backup("new", &[("d", &img)]);
    assert!(new["disks"][0]["new_chunks"].as_u64().unwrap() > 0, "planned packs are not reused");
    fs::write(&gate, b"").unwrap();
    assert!(holder.wait_with_output().unwrap().status.success());
    let r = dir.repo_cmd("gc").arg("--json").json();
    assert!(r["packs_deleted"].as_u64().unwrap() > 0, "{r}");
    dir.check_all();
    assert_eq!(hash(&dir.restore(&snap_id(&new), "d", "new.img")), hash(&img));
}

/// Two backups of different vms and a gc at the same time: nothing is lost.
#[test]
fn two_backups_and_a_gc_at_once() {
    let dir = Dir::new();
    dir.init();
    let a = dir.image("a.img", 16 << 20, 9);
    let b = dir.image("b.img", 16 << 20, 10);
    let old = dir.backup("a", &[("d", &a)]);
    let mut data = fs::read(&a).unwrap();
    scatter_writes(&mut data, 32, 4096, 11);
    fs::write(&a, &data).unwrap();
    for round in 0..3 {
        let spawn = |vm: &str, img: &Path| {
            let mut c = dir.repo_cmd("backup");
            c.args(["--vm", vm, "--json", "--disk"]).arg(format!("id=d,source={}", img.display()));
            c.spawn_piped()
        };
        let (ca, cb) = (spawn("a", &a), spawn("b", &b));
        if round == 0 {
            dir.repo_cmd("forget").arg(snap_id(&old)).ok();
        }
        let gc = dir.repo_cmd("gc").output();
        assert!(gc.status.success(), "{}", String::from_utf8_lossy(&gc.stderr));
        for (child, img) in [(ca, &a), (cb, &b)] {
            let out = child.wait_with_output().unwrap();
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
            let r: Value = serde_json::from_slice(&out.stdout).unwrap();
            assert_eq!(hash(&dir.restore(&snap_id(&r), "d", "x.img")), hash(img), "round {round}");
            fs::remove_file(dir.join("x.img")).unwrap();
        }
        dir.check_all();
    }
}

/// One gc at a time; stale locks (of processes that are gone) are ignored and removed.
#[test]
fn locks_name_their_holder_and_stale_ones_go() {
    let dir = Dir::new();
    dir.init();
    let img = dir.image("d.img", 4 << 20, 12);
    let gate = dir.join("go");
    let mut c = dir.repo_cmd("backup");
    c.args(["--vm", "v", "--disk"]).arg(format!("id=d,source={}", img.display()));
    c.env("BLOCKPROOF_PAUSE_BEFORE_COMMIT", gate.to_str().unwrap());
    let child = c.spawn_piped();
    wait_for(&PathBuf::from(format!("{}.waiting", gate.display())));
    let locks = harness::files(&dir.repo().join("locks"));
    assert_eq!(locks.len(), 1, "the running backup holds a lock");
    // A copy of that lock stands for a backup of a process that died: pid reuse aside,
    // the holder is gone once the child exits.
    let stale = dir.repo().join("locks").join("0123456789abcdef0123456789abcdef");
    fs::copy(&locks[0], &stale).unwrap();
    fs::write(&gate, b"").unwrap();
    assert!(child.wait_with_output().unwrap().status.success());
    let out = dir.repo_cmd("unlock").ok();
    assert!(out.contains("removed 1 stale lock"), "{out}");
    assert!(harness::files(&dir.repo().join("locks")).is_empty());
}

/// Key slots: add a second passphrase, open with it, change one, never remove the last.
#[test]
fn key_slots_add_passwd_remove() {
    let dir = Dir::new();
    dir.init();
    let fast = ["--kdf-memory", "8", "--kdf-iterations", "1"];
    let key = |sub: &str| {
        let mut c = dir.cmd("key");
        c.arg(sub).arg("--repo").arg(dir.repo());
        c
    };
    key("add").args(fast).env("BLOCKPROOF_NEW_PASSWORD", "second").ok();
    let list = key("list").args(["--json"]).json();
    assert_eq!(list.as_array().unwrap().len(), 2);
    let mut with_second = dir.repo_cmd("snapshots");
    with_second.env("BLOCKPROOF_PASSWORD", "second");
    with_second.ok();
    // Change the second passphrase; the old one no longer opens, the new one does.
    key("passwd").args(fast).env("BLOCKPROOF_PASSWORD", "second").env("BLOCKPROOF_NEW_PASSWORD", "third").ok();
    dir.repo_cmd("snapshots").env("BLOCKPROOF_PASSWORD", "second").fails_with_one_line(1);
    dir.repo_cmd("snapshots").env("BLOCKPROOF_PASSWORD", "third").ok();
    // Remove the original slot (opened with the new passphrase), then the last one is kept.
    let list = key("list").args(["--json"]).env("BLOCKPROOF_PASSWORD", "third").json();
    let original =
        list.as_array().unwrap().iter().find(|s| s["current"] == false).unwrap()["name"].as_str().unwrap().to_string();
    key("remove").args([&original[..10]]).env("BLOCKPROOF_PASSWORD", "third").ok();
    dir.repo_cmd("snapshots").fails_with_one_line(1);
    let last = key("list").args(["--json"]).env("BLOCKPROOF_PASSWORD", "third").json();
    let only = last[0]["name"].as_str().unwrap().to_string();
    let line = key("remove").args([&only[..10]]).env("BLOCKPROOF_PASSWORD", "third").fails_with_one_line(2);
    assert!(line.contains("only key slot"), "{line}");
}

/// Copy to a second repository with another passphrase (other keys): check passes there,
/// restores are bit-exact, verification status travels, and a second copy after an
/// incremental transfers only the new data.
#[test]
fn copy_to_a_second_repository_with_other_keys() {
    let dir = Dir::new();
    dir.init();
    let site2 = dir.join("site2");
    dir.cmd("init")
        .arg("--repo")
        .arg(&site2)
        .args(["--kdf-memory", "8", "--kdf-iterations", "1"])
        .env("BLOCKPROOF_PASSWORD", "other")
        .ok();
    let img = dir.image("d.img", 8 << 20, 13);
    let first = dir.backup("v", &[("d", &img)]);
    let copy = |extra: &[&str]| {
        let mut c = dir.repo_cmd("copy");
        c.arg("--to").arg(&site2).arg("--json").args(extra).env("BLOCKPROOF_TO_PASSWORD", "other");
        c.json()
    };
    let r1 = copy(&[]);
    assert_eq!(r1["copied"].as_array().unwrap().len(), 1);
    let on_site2 = |sub: &str| {
        let mut c = dir.cmd(sub);
        c.arg("--repo").arg(&site2).env("BLOCKPROOF_PASSWORD", "other");
        c
    };
    let check = on_site2("check").args(["--read-data", "--json"]).json();
    assert_eq!(check["ok"], true, "{check}");
    let target1 = r1["copied"][0]["target"].as_str().unwrap().to_string();
    let out = dir.join("from-site2.img");
    on_site2("restore").arg(&target1).args(["--disk", "d", "--to"]).arg(&out).ok();
    assert_eq!(hash(&out), hash(&img));

    // An incremental (1% changed), then a second copy: only about the change moves.
    let mut data = fs::read(&img).unwrap();
    let changed = scatter_writes(&mut data, 8, 65536, 14);
    fs::write(&img, &data).unwrap();
    let second = dir.backup("v", &[("d", &img)]);
    let r2 = copy(&[]);
    assert_eq!(r2["copied"].as_array().unwrap().len(), 1, "{r2}");
    assert_eq!(r2["skipped"][0], first["snapshot"]);
    assert!(r2["chunks_read"].as_u64().unwrap() <= changed.div_ceil(65536) + 8, "{r2}");
    assert!(r2["bytes_written"].as_u64().unwrap() < 2 * changed + (256 << 10), "{r2}");
    let target2 = r2["copied"][0]["target"].as_str().unwrap().to_string();
    fs::remove_file(&out).unwrap();
    on_site2("restore").arg(&target2).args(["--disk", "d", "--to"]).arg(&out).ok();
    assert_eq!(hash(&out), hash(&img));
    // The copied snapshot keeps its coverage; a third copy has nothing to do.
    let status = on_site2("status").arg("--json").json();
    assert!(status[0]["disks"][0]["coverage"].is_object(), "{status}");
    assert_eq!(copy(&[])["copied"].as_array().unwrap().len(), 0);
    let _ = second;
}

/// Stats: logical against stored bytes, deduplication, growth per run.
#[test]
fn stats_show_deduplication_and_growth() {
    let dir = Dir::new();
    dir.init();
    let img = dir.image("d.img", 4 << 20, 15);
    dir.backup("v", &[("d", &img)]);
    dir.backup("v", &[("d", &img)]);
    let s = dir.repo_cmd("stats").arg("--json").json();
    assert_eq!(s["logical_bytes"], 2 * (4u64 << 20));
    let unique = s["unique_bytes"].as_u64().unwrap();
    assert!(unique > 0 && unique <= 4 << 20, "{s}");
    assert!(s["dedup_ratio"].as_f64().unwrap() > 2.0, "two identical backups store once: {s}");
    let growth = s["vms"][0]["growth"].as_array().unwrap();
    assert_eq!(growth.len(), 2);
    assert_eq!(growth[1]["new_bytes"], 0, "the second run added nothing");
    assert!(dir.repo_cmd("stats").ok().contains("deduplication"));
}

/// `snapshots` showed neither tags nor protection, `copy` dropped protection (the copy of
/// a protected snapshot was `would remove` in the target) and hid where a copy came
/// from; `snapshots --vm` with a name no snapshot has printed `0 snapshot(s)`, exit 0.
#[test]
fn snapshots_show_tags_protection_and_origin_and_copies_stay_protected() {
    let dir = Dir::new();
    dir.init();
    let site2 = dir.join("site2");
    dir.cmd("init").arg("--repo").arg(&site2).args(["--kdf-memory", "8", "--kdf-iterations", "1"]).ok();
    let img = dir.image("d.img", 1 << 20, 15);
    let first = snap_id(&dir.backup_cmd("web01", &[("d", &img)]).args(["--tag", "before-upgrade"]).json());
    dir.backup("web01", &[("d", &img)]);
    dir.repo_cmd("protect").arg(&first).ok();
    let rows = dir.snapshots();
    assert_eq!(rows[0]["protected"], true, "{rows:?}");
    assert_eq!(rows[0]["tags"], serde_json::json!(["before-upgrade"]));
    assert_eq!(rows[1]["protected"], false);
    let text = dir.repo_cmd("snapshots").ok();
    let line = text.lines().find(|l| l.starts_with(&first[..8])).unwrap();
    assert!(line.contains("tag:before-upgrade") && line.contains("protected"), "{text}");

    let run_copy =
        || dir.repo_cmd("copy").arg("--to").arg(&site2).env("BLOCKPROOF_TO_PASSWORD", harness::PASSWORD).ok();
    run_copy();
    let on_site2 = |sub: &str| {
        let mut c = dir.cmd(sub);
        c.arg("--repo").arg(&site2);
        c
    };
    let copies = on_site2("snapshots").arg("--json").json();
    let copy = copies.as_array().unwrap().iter().find(|s| s["copied_from"] == first.as_str()).unwrap();
    assert_eq!(copy["protected"], true, "{copies}");
    let r = on_site2("forget").args(["--keep-last", "1", "--dry-run", "--json"]).json();
    assert!(!r["forget"]["removed"].as_array().unwrap().iter().any(|d| d["id"] == copy["id"]), "{r}");
    // Protected after it was copied: the next copy carries the protection over.
    let second = dir.snapshots()[1]["id"].as_str().unwrap().to_string();
    dir.repo_cmd("protect").arg(&second).ok();
    run_copy();
    let copies = on_site2("snapshots").arg("--json").json();
    assert!(copies.as_array().unwrap().iter().all(|s| s["protected"] == true), "{copies}");
    assert!(on_site2("snapshots").ok().contains(&format!("copy of {}", &first[..8])));

    let line = dir.repo_cmd("snapshots").args(["--vm", "webO1"]).fails_with_one_line(2);
    assert!(line.contains("webO1") && line.contains("web01"), "{line}");
}
