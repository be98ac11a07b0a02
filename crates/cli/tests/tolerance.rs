//! One bad file never takes the whole repository down, and bad input is never read as
//! "nothing": a change list with a misspelled key is an error, not an empty list; stray
//! files (`index/.DS_Store`, `snapshots/.foo`) are ignored with one warning; a damaged
//! snapshot or index file is reported and skipped by everything that reads — but never
//! by garbage collection, which refuses to run; and a read-only repository can be
//! listed, restored and data-checked.

mod harness;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use harness::{change_list, hash, mixed_image, snap_id, Dir};

/// Flips one byte in the middle of a file.
fn flip(path: &Path) {
    let mut b = fs::read(path).unwrap();
    let mid = b.len() / 2;
    b[mid] ^= 0x10;
    fs::write(path, b).unwrap();
}

fn files_in(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
    v.sort();
    v
}

/// Warning lines on stderr.
fn warnings(stderr: &str) -> Vec<&str> {
    stderr.lines().filter(|l| l.contains("warning")).collect()
}

/// A change list whose `changedArea` key is misspelled used to mean "nothing changed"
/// (unknown keys ignored, the list defaulted to empty): an "ok" snapshot stale wherever
/// the disk had changed. Now it is a usage error naming the file and the key, and no
/// snapshot is stored; a list without `changedArea` is refused the same way.
#[test]
fn a_misspelled_change_list_key_is_an_error_never_an_empty_list() {
    let dir = Dir::new();
    dir.init();
    let size = 4 << 20;
    let img = dir.join("d.img");
    let mut data = mixed_image(size, 5);
    fs::write(&img, &data).unwrap();
    dir.backup("vm", &[("d", &img)]);
    data[1 << 20..(1 << 20) + 65536].fill(0xab);
    fs::write(&img, &data).unwrap();

    let list = dir.join("changes.json");
    let cases = [
        (
            serde_json::json!({"startOffset": 0, "length": size, "changed_area": [{"start": 1 << 20, "length": 65536}]}),
            "changed_area",
        ),
        (serde_json::json!({"startOffset": 0, "length": size}), "changedArea"),
        (
            serde_json::json!({"startOffset": 0, "length": size, "changedArea": [{"start": 1 << 20, "lenght": 65536}]}),
            "lenght",
        ),
    ];
    for (json, key) in cases {
        fs::write(&list, json.to_string()).unwrap();
        let mut c = dir.repo_cmd("backup");
        c.args(["--vm", "vm", "--disk"]).arg(format!("id=d,source={},cbt=changes:{}", img.display(), list.display()));
        let line = c.fails_with_one_line(2);
        assert!(line.contains("changes.json") && line.contains(key), "{key}: {line}");
        assert_eq!(dir.snapshots().len(), 1, "{key}: no snapshot is stored");
    }
    // The same list spelled right is an incremental that restores the new bytes.
    change_list(&list, size, &[(1 << 20, 65536)]);
    let mut c = dir.backup_cmd("vm", &[]);
    c.arg("--disk").arg(format!("id=d,source={},cbt=changes:{}", img.display(), list.display()));
    let r = c.json();
    assert_eq!(r["disks"][0]["mode"], "incremental", "{r}");
    assert_eq!(hash(&dir.restore(&snap_id(&r), "d", "out.img")), hash(&img));
}

/// Two vms, two snapshots each; returns (images by vm, snapshot ids by vm).
fn two_vms(dir: &Dir) -> (Vec<PathBuf>, Vec<Vec<String>>) {
    dir.repo_cmd("init").args(["--kdf-memory", "8", "--kdf-iterations", "1", "--pack-size", "512KiB"]).ok();
    let mut imgs = Vec::new();
    let mut ids = Vec::new();
    for (k, vm) in ["a", "b"].iter().enumerate() {
        let img = dir.join(&format!("{vm}.img"));
        let mut data = mixed_image(2 << 20, 10 + k as u64);
        fs::write(&img, &data).unwrap();
        let first = snap_id(&dir.backup(vm, &[("d", &img)]));
        data[65536..131072].fill(0x5a + k as u8);
        fs::write(&img, &data).unwrap();
        let second = snap_id(&dir.backup(vm, &[("d", &img)]));
        imgs.push(img);
        ids.push(vec![first, second]);
    }
    (imgs, ids)
}

/// Stray files — names that are not blockproof object names, in any directory — are
/// ignored with one warning listing them: `snapshots`, `status`, restore and backup work;
/// `check` passes and names each of them as a warning.
#[test]
fn stray_files_are_ignored_with_a_warning() {
    let dir = Dir::new();
    let (imgs, ids) = two_vms(&dir);
    let repo = dir.repo();
    let strays = ["index/.DS_Store", "snapshots/.foo", "snapshots/README", "keys/.DS_Store", "data/ab/Thumbs.db"];
    for s in strays {
        fs::create_dir_all(repo.join(s).parent().unwrap()).unwrap();
        fs::write(repo.join(s), b"not a blockproof file").unwrap();
    }

    let out = dir.repo_cmd("snapshots").arg("--json").output();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "snapshots: {stderr}");
    let listed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(listed.as_array().unwrap().len(), 4);
    let w = warnings(&stderr);
    assert_eq!(w.len(), 1, "one warning for the stray snapshot files: {stderr}");
    assert!(w[0].contains(".foo") && w[0].contains("README"), "{stderr}");

    let (_, stderr) = dir.repo_cmd("status").code(0);
    assert!(stderr.contains(".foo"), "status warns: {stderr}");
    assert_eq!(hash(&dir.restore("a:latest", "d", "a.out")), hash(&imgs[0]));
    assert_eq!(hash(&dir.restore(&ids[1][0], "d", "b0.out")), blake3::hash(&mixed_image(2 << 20, 11)));
    let r = dir.backup("b", &[("d", &imgs[1])]);
    assert_eq!(r["status"], "ok");

    let out = dir.repo_cmd("check").arg("--read-data").output();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "strays are warnings for check: {stderr}");
    for s in strays {
        let name = Path::new(s).file_name().unwrap().to_str().unwrap();
        assert!(stderr.contains(name), "check names {s}: {stderr}");
    }
}

/// One damaged snapshot file is reported and skipped: the other snapshots list, restore
/// and show their status; a backup of the same vm reads in full (the damaged one may
/// have been its parent); `check` reports it as an error; and garbage collection refuses
/// to run, deleting nothing, because it cannot know what the damaged snapshot references.
/// A copy of a snapshot under another valid-looking name is damage too.
#[test]
fn a_damaged_snapshot_file_is_skipped_by_readers_and_stops_gc() {
    let dir = Dir::new();
    let (imgs, ids) = two_vms(&dir);
    let repo = dir.repo();
    let damaged = repo.join("snapshots").join(&ids[0][1]);
    flip(&damaged);
    let renamed = repo.join("snapshots").join("0".repeat(64));
    fs::copy(repo.join("snapshots").join(&ids[1][0]), &renamed).unwrap();

    let out = dir.repo_cmd("snapshots").arg("--json").output();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "snapshots: {stderr}");
    let listed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let listed: Vec<&str> = listed.as_array().unwrap().iter().map(|s| s["id"].as_str().unwrap()).collect();
    assert_eq!(listed.len(), 3, "{listed:?}");
    assert!(!listed.contains(&ids[0][1].as_str()));
    assert!(stderr.contains(&ids[0][1][..16]) && stderr.contains(&"0".repeat(16)), "both are named: {stderr}");

    let (stdout, _) = dir.repo_cmd("status").code(0);
    assert!(stdout.contains(&ids[1][1][..8]), "{stdout}");
    assert_eq!(hash(&dir.restore("b:latest", "d", "b.out")), hash(&imgs[1]));
    assert_eq!(hash(&dir.restore(&ids[0][0], "d", "a0.out")), blake3::hash(&mixed_image(2 << 20, 10)));
    // `a:latest` is the latest readable one, and the user is told it may not be the newest.
    let mut c = dir.repo_cmd("restore");
    let (_, stderr) = c.args(["a:latest", "--disk", "d", "--to"]).arg(dir.join("a-latest.out")).code(0);
    assert!(stderr.contains(&format!("a:latest is the latest readable snapshot, {}", &ids[0][0][..8])), "{stderr}");
    assert_eq!(hash(&dir.join("a-latest.out")), blake3::hash(&mixed_image(2 << 20, 10)));
    let line = dir.repo_cmd("restore").arg(&ids[0][1]).args(["--disk", "d", "--to"]).arg(dir.join("x.img")).code(1).1;
    assert!(line.contains(&ids[0][1]) && line.contains("error"), "{line}");

    // `a:latest` would have been the damaged one, and this change list (nothing changed)
    // is relative to it: inheriting from the older parent would store a's first state as
    // ok. The backup reads everything instead.
    let list = dir.join("nothing.json");
    change_list(&list, 2 << 20, &[]);
    let mut c = dir.backup_cmd("a", &[]);
    c.arg("--disk").arg(format!("id=d,source={},cbt=changes:{}", imgs[0].display(), list.display()));
    let r = c.json();
    assert_eq!(r["disks"][0]["mode"], "full", "{r}");
    assert!(r["disks"][0]["full_reason"].as_str().unwrap().contains("damaged"), "{r}");
    assert_eq!(hash(&dir.restore(&snap_id(&r), "d", "a-new.out")), hash(&imgs[0]));

    let (_, stderr) = dir.repo_cmd("check").code(1);
    assert!(stderr.contains(&ids[0][1][..16]) && stderr.contains(&"0".repeat(16)), "{stderr}");

    dir.repo_cmd("forget").arg(&ids[1][0]).ok();
    let before = dir.repo_files();
    let (_, stderr) = dir.repo_cmd("gc").code(1);
    assert!(stderr.contains("snapshot"), "{stderr}");
    assert_eq!(dir.repo_files(), before, "a gc that refuses deletes nothing");
}

/// One damaged index file: backup and restore skip it with a warning (its blobs are
/// stored again by the next backup, which reads in full), snapshots that do not need it
/// restore; `check` reports it; garbage collection refuses to run.
#[test]
fn a_damaged_index_file_is_skipped_by_backup_and_restore_and_stops_gc() {
    let dir = Dir::new();
    dir.init();
    let a = dir.image("a.img", 2 << 20, 20);
    dir.backup("a", &[("d", &a)]);
    let index_of_a = files_in(&dir.repo().join("index"));
    assert_eq!(index_of_a.len(), 1);
    let b = dir.image("b.img", 2 << 20, 21);
    let snap_b = snap_id(&dir.backup("b", &[("d", &b)]));
    flip(&index_of_a[0]);
    let name = index_of_a[0].file_name().unwrap().to_str().unwrap().to_string();

    // This client's local cache of the blob index read a's index file while it was
    // intact and keeps an authenticated copy of it: readers go on using that copy (a
    // restores), and check, which reads every index file, reports the damage.
    dir.restore("a:latest", "d", "a-cached.out");
    assert_eq!(hash(&dir.join("a-cached.out")), hash(&a));
    let (_, stderr) = dir.repo_cmd("check").code(1);
    assert!(stderr.contains(&name[..16]), "{stderr}");
    // Another client (here: the cache removed) has only the damaged file to go by.
    std::fs::remove_dir_all(dir.join("cache")).unwrap();

    // b's blobs are in b's own index file: it restores, with a warning.
    let out = dir.repo_cmd("restore").arg(&snap_b).args(["--disk", "d", "--to"]).arg(dir.join("b.out")).output();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains(&name[..16]), "the damaged index file is named: {stderr}");
    assert_eq!(hash(&dir.join("b.out")), hash(&b));
    // a's cannot: one error line, after the warning.
    let (_, stderr) =
        dir.repo_cmd("restore").arg("a:latest").args(["--disk", "d", "--to"]).arg(dir.join("a.out")).code(1);
    assert_eq!(stderr.lines().filter(|l| l.starts_with("blockproof: error: ")).count(), 1, "{stderr}");
    assert!(!dir.join("a.out").exists());

    // A new backup of a stores what the damaged index listed again, and restores.
    let r = dir.backup("a", &[("d", &a)]);
    assert_eq!(r["disks"][0]["mode"], "full", "{r}");
    assert!(r["warnings"].to_string().contains(&name[..16]), "{r}");
    assert_eq!(hash(&dir.restore(&snap_id(&r), "d", "a2.out")), hash(&a));

    let (_, stderr) = dir.repo_cmd("check").code(1);
    assert!(stderr.contains(&name[..16]), "{stderr}");
    let files = dir.repo_files();
    let (_, stderr) = dir.repo_cmd("gc").code(1);
    assert!(stderr.contains(&name[..16]), "gc names the damaged index file: {stderr}");
    assert_eq!(dir.repo_files(), files, "a gc that refuses deletes nothing");
}

/// Runs `blockproof SUB --repo REPO ARGS` with the repository directory bind-mounted
/// read-only over itself, in a private mount namespace (works for root, for whom
/// permission bits are no obstacle, and for users with unprivileged user namespaces).
/// None when this machine cannot make such a mount.
fn read_only(dir: &Dir, sub: &str, args: &[&str]) -> Option<std::process::Output> {
    let probe = Command::new("unshare").args(["-rm", "true"]).output();
    if !probe.is_ok_and(|o| o.status.success()) {
        eprintln!("skipped: unshare -rm is not available here");
        return None;
    }
    let script = r#"repo="$1"; shift; mount --bind "$repo" "$repo" && mount -o remount,bind,ro "$repo" && exec "$@""#;
    let out = Command::new("unshare")
        .args(["-rm", "sh", "-c", script, "sh"])
        .arg(dir.repo())
        .arg(env!("CARGO_BIN_EXE_blockproof"))
        .arg(sub)
        .arg("--repo")
        .arg(dir.repo())
        .args(args)
        .current_dir(dir.path())
        .env("BLOCKPROOF_PASSWORD", harness::PASSWORD)
        .env_remove("BLOCKPROOF_REPO")
        .output()
        .unwrap();
    Some(out)
}

/// On a read-only repository (here a read-only bind mount, even without `tmp/`):
/// `check --read-data` reads and verifies every pack, reports the result and warns that
/// the rotation state could not be saved; `snapshots`, `status`, `check`, `restore`, `ls`
/// and `cat` work.
#[test]
fn a_read_only_repository_can_be_read_and_data_checked() {
    let dir = Dir::new();
    dir.init();
    // An ext4 disk (made by mkfs.ext4 from a directory) holding one file.
    let content = dir.join("content");
    fs::create_dir(&content).unwrap();
    fs::write(content.join("hello.txt"), b"read-only repositories can be read\n").unwrap();
    let img = dir.join("d.img");
    let mkfs = Command::new("mkfs.ext4").args(["-q", "-F", "-d"]).arg(&content).arg(&img).arg("8M").status().unwrap();
    assert!(mkfs.success());
    let id = snap_id(&dir.backup("vm", &[("d", &img)]));
    fs::remove_dir(dir.repo().join("tmp")).unwrap();
    // The backup wrote its vm's head in state/; a read-only check must add nothing.
    let state = harness::files(&dir.repo().join("state"));

    let Some(out) = read_only(&dir, "check", &["--read-data", "--json"]) else { return };
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["ok"], true, "{r}");
    let packs = r["packs"].as_u64().unwrap();
    assert!(packs > 0);
    assert_eq!(r["read_data"]["packs_checked"], packs, "every pack was read: {r}");
    assert!(r["warnings"].to_string().contains("could not be saved"), "{r}");
    let state_now = harness::files(&dir.repo().join("state"));
    assert!(state_now == state && !dir.repo().join("tmp").exists(), "nothing was written: {state_now:?}");

    let out = read_only(&dir, "check", &["--read-data"]).unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("Read-only file system"), "the reason is given: {stderr}");

    for (sub, args) in [("snapshots", vec![]), ("status", vec![]), ("check", vec![])] {
        let out = read_only(&dir, sub, &args).unwrap();
        assert!(out.status.success(), "{sub}: {}", String::from_utf8_lossy(&out.stderr));
    }
    let out = read_only(&dir, "ls", &[&id, "--disk", "d", "/"]).unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("hello.txt"),
        "ls: {stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = read_only(&dir, "cat", &[&id, "--disk", "d", "/hello.txt"]).unwrap();
    assert_eq!(out.stdout, b"read-only repositories can be read\n");
    let to = dir.join("restored.img");
    let out = read_only(&dir, "restore", &[&id, "--disk", "d", "--to", to.to_str().unwrap()]).unwrap();
    assert!(out.status.success(), "restore: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(hash(&to), hash(&img));
}
