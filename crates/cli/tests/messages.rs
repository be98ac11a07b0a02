//! Messages that must not mislead: a zero budget is not silently `none`; a missing
//! change list is not a missing source; an unindexed pack is not necessarily left by an
//! interrupted backup; a damaged key slot is not a wrong password.

mod harness;

use std::fs;

use harness::{change_list, Dir};

/// `--verify 0%` (or `0`, `0ios`, `0B`, `0s`) used to mean `none` without a word. Zero
/// is a usage error that tells the user to write `none`, for backup, verify and
/// `check --read-data`, and in a disk spec's `verify=`.
#[test]
fn a_zero_budget_is_a_usage_error_asking_for_none() {
    let dir = Dir::new();
    dir.init();
    let img = dir.image("d.img", 1 << 20, 1);
    for zero in ["0%", "0", "0ios", "0B", "0s", "0GiB", "10%,0ios"] {
        let mut c = dir.backup_cmd("vm", &[("d", &img)]);
        let line = c.args(["--verify", zero]).fails_with_one_line(2);
        assert!(line.contains("none") && line.contains(zero.split(',').next_back().unwrap()), "{zero}: {line}");
        let line = dir.repo_cmd("check").arg(format!("--read-data={zero}")).fails_with_one_line(2);
        assert!(line.contains("none"), "check {zero}: {line}");
        if !zero.contains(',') {
            // (In a disk spec, a comma separates the spec's own fields.)
            let mut c = dir.repo_cmd("backup");
            c.args(["--vm", "vm", "--disk"]).arg(format!("id=d,source={},verify={zero}", img.display()));
            assert!(c.fails_with_one_line(2).contains("none"), "disk spec {zero}");
        }
    }
    assert!(dir.snapshots().is_empty());
    // `none` itself is accepted.
    let r = dir.backup_cmd("vm", &[("d", &img)]).args(["--verify", "none"]).json();
    assert_eq!(r["status"], "ok");
    dir.repo_cmd("check").arg("--read-data=none").ok();
}

/// `cbt=changes:/missing` named the change list as a source it could not open.
#[test]
fn a_missing_change_list_is_named_as_a_change_list() {
    let dir = Dir::new();
    dir.init();
    let img = dir.image("d.img", 1 << 20, 2);
    dir.backup("vm", &[("d", &img)]);
    let missing = dir.join("no-such-changes.json");
    let mut c = dir.repo_cmd("backup");
    c.args(["--vm", "vm", "--disk"]).arg(format!("id=d,source={},cbt=changes:{}", img.display(), missing.display()));
    let line = c.fails_with_one_line(1);
    assert!(line.contains("change list") && line.contains("no-such-changes.json"), "{line}");
    assert!(!line.contains("source"), "the source is fine: {line}");
    // A change list that is a directory: the same.
    let mut c = dir.repo_cmd("backup");
    c.args(["--vm", "vm", "--disk"]).arg(format!("id=d,source={},cbt=changes:{}", img.display(), dir.path().display()));
    let line = c.fails_with_one_line(1);
    assert!(line.contains("change list") && !line.contains("source"), "{line}");
    change_list(&missing, 1 << 20, &[]);
    dir.repo_cmd("backup")
        .args(["--vm", "vm", "--disk"])
        .arg(format!("id=d,source={},cbt=changes:{}", img.display(), missing.display()))
        .ok();
}

/// A pack no index file lists is either left by an interrupted backup or lost its index
/// file: `check` must not claim the first (and that no snapshot uses it) when the second
/// is what happened.
#[test]
fn an_unindexed_pack_is_not_blamed_on_an_interrupted_backup() {
    let dir = Dir::new();
    dir.init();
    let img = dir.image("d.img", 1 << 20, 3);
    dir.backup("vm", &[("d", &img)]);
    for f in harness::files(&dir.repo().join("index")) {
        fs::remove_file(f).unwrap();
    }
    let (_, stderr) = dir.repo_cmd("check").code(1);
    let line =
        stderr.lines().find(|l| l.contains("not listed by any index file")).unwrap_or_else(|| panic!("{stderr}"));
    assert!(line.contains("interrupted backup") && line.contains("index file was lost"), "{line}");
    assert!(!stderr.contains("no snapshot uses it"), "{stderr}");
}

/// A bit flip in a key slot made `blockproof` say "wrong password". Key slots are named
/// by the hash of their bytes: a slot that no longer matches its name is reported as
/// damaged; another slot that opens still opens the repository.
#[test]
fn a_damaged_key_slot_is_not_a_wrong_password() {
    let dir = Dir::new();
    dir.init();
    let slots = harness::files(&dir.repo().join("keys"));
    assert_eq!(slots.len(), 1);
    let original = fs::read(&slots[0]).unwrap();
    let mut b = original.clone();
    b[100] ^= 0x01;
    fs::write(&slots[0], &b).unwrap();
    let name = slots[0].file_name().unwrap().to_str().unwrap().to_string();

    let line = dir.repo_cmd("snapshots").fails_with_one_line(1);
    assert!(line.contains(&format!("key slot {}", &name[..16])) && line.contains("damaged"), "{line}");
    assert!(!line.contains("wrong password"), "{line}");
    // With the wrong password as well, the damage is what is reported: the password may
    // well be right.
    let line = dir.repo_cmd("snapshots").env("BLOCKPROOF_PASSWORD", "not it").fails_with_one_line(1);
    assert!(line.contains("damaged"), "{line}");

    // A right password and an intact slot: no damage reported, a wrong one: wrong password.
    fs::write(&slots[0], &original).unwrap();
    dir.repo_cmd("snapshots").ok();
    let line = dir.repo_cmd("snapshots").env("BLOCKPROOF_PASSWORD", "not it").fails_with_one_line(1);
    assert!(line.contains("wrong password"), "{line}");

    // With a second slot, the damaged first one does not stand in the way.
    let mut c = dir.cmd("key");
    c.args(["add", "--kdf-memory", "8", "--kdf-iterations", "1", "--repo"]).arg(dir.repo());
    c.env("BLOCKPROOF_NEW_PASSWORD", "second").ok();
    fs::write(&slots[0], &b).unwrap();
    dir.repo_cmd("snapshots").env("BLOCKPROOF_PASSWORD", "second").ok();
    let line = dir.repo_cmd("snapshots").fails_with_one_line(1);
    assert!(line.contains("damaged"), "{line}");
}
