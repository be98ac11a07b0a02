//! Damage is repaired, not inherited (issue 14, item 3).
//!
//! A new backup of the same source after a pack went missing, was truncated, emptied,
//! bit-flipped, swapped, made unreadable, or after a tree blob was damaged, stores again
//! what it needs instead of reusing the bad blob: the new snapshot restores bit-exact, and
//! so do the older ones that referenced the same content. The same for an incremental
//! whose parent's chunks (or pages) are gone and for a copy into a target missing a pack.
//! `repair` rebuilds the index from the packs, salvages damaged packs and reports exactly
//! what is lost; check and gc run afterwards.

mod harness;

use std::fs;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use harness::{change_list, hash, snap_id, Dir};
use serde_json::Value;

const CHUNK: u64 = 64 << 10;
const SIZE: usize = 4 << 20;

/// A repository with packs of 512 KiB and one snapshot of a random 4 MiB image: 64
/// distinct chunks in 8 data packs of 8 chunks each, and one small pack holding only the
/// index and confirmation pages (written last).
struct Fixture {
    dir: Dir,
    img: PathBuf,
    first: String,
}

impl Fixture {
    fn new(seed: u64) -> Fixture {
        Self::with_cbt(seed, None)
    }

    /// The first backup with `cbt` (a change list path) if given.
    fn with_cbt(seed: u64, list: Option<&Path>) -> Fixture {
        let dir = Dir::new();
        init(&dir, &dir.repo(), harness::PASSWORD);
        let img = dir.random_image("d.img", SIZE, seed);
        let f = Fixture { dir, img, first: String::new() };
        let first = snap_id(&f.backup("v", list));
        let f = Fixture { first, ..f };
        assert_eq!(f.data_packs().len(), 8, "{:?}", f.dir.packs());
        assert!(fs::metadata(f.meta_pack()).unwrap().len() < CHUNK, "the last pack holds pages only");
        f
    }

    /// A backup of the image as `vm` (with a change list if given); its JSON report.
    fn backup(&self, vm: &str, list: Option<&Path>) -> Value {
        let mut c = self.dir.repo_cmd("backup");
        c.args(["--vm", vm, "--json", "--disk"]);
        match list {
            Some(l) => c.arg(format!("id=d,source={},cbt=changes:{}", self.img.display(), l.display())),
            None => c.arg(format!("id=d,source={}", self.img.display())),
        };
        c.json()
    }

    /// The data packs (about 512 KiB each), sorted.
    fn data_packs(&self) -> Vec<PathBuf> {
        self.dir.packs().into_iter().filter(|p| fs::metadata(p).unwrap().len() > CHUNK).collect()
    }

    /// The small pack of index and confirmation pages.
    fn meta_pack(&self) -> PathBuf {
        self.dir.packs().into_iter().min_by_key(|p| fs::metadata(p).unwrap().len()).unwrap()
    }

    /// Restores `snap` and asserts it is bit-exact.
    fn assert_restores(&self, snap: &str, what: &str) {
        let to = self.dir.join(&format!("restored-{}.img", rand::random::<u32>()));
        let out = self.dir.repo_cmd("restore").arg(snap).args(["--disk", "d", "--to"]).arg(&to).output();
        assert!(
            out.status.success(),
            "{what}: restore of {snap} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        assert_eq!(hash(&to), hash(&self.img), "{what}: restore of {snap} differs");
        fs::remove_file(&to).unwrap();
    }
}

fn init(dir: &Dir, repo: &Path, password: &str) {
    dir.cmd("init")
        .arg("--repo")
        .arg(repo)
        .args(["--kdf-memory", "8", "--kdf-iterations", "1", "--pack-size", "512KiB"])
        .env("BLOCKPROOF_PASSWORD", password)
        .ok();
}

fn flip_middle(p: &Path) {
    let f = fs::OpenOptions::new().read(true).write(true).open(p).unwrap();
    let at = f.metadata().unwrap().len() / 2;
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, at).unwrap();
    f.write_all_at(&[b[0] ^ 0x20], at).unwrap();
}

fn truncate(p: &Path, len: u64) {
    fs::OpenOptions::new().write(true).open(p).unwrap().set_len(len).unwrap();
}

/// Damages the fixture, then backs the same image up again: the backup succeeds, and both
/// the new snapshot and the first one restore bit-exact. Returns the second report.
fn new_backup_repairs(f: &Fixture, what: &str) -> Value {
    let second = f.backup("v", None);
    assert_eq!(second["status"], "ok", "{what}: {second}");
    f.assert_restores(&snap_id(&second), &format!("{what}: the new snapshot"));
    f.assert_restores(&f.first, &format!("{what}: the first snapshot, whose data was stored again"));
    second
}

/// A data pack's 8 chunks are stored again and counted as repaired.
fn assert_data_repaired(report: &Value, what: &str) {
    let d = &report["disks"][0];
    assert_eq!(d["repaired_chunks"], 8, "{what}: {report}");
    assert_eq!(d["new_chunks"], 8, "{what}: {report}");
}

#[test]
fn a_missing_pack_is_stored_again_by_the_next_backup() {
    let f = Fixture::new(1);
    fs::remove_file(&f.data_packs()[3]).unwrap();
    let r = new_backup_repairs(&f, "missing pack");
    assert_data_repaired(&r, "missing pack");
    assert_eq!(r["unavailable_packs"], 1, "{r}");
    assert!(r["warnings"].to_string().contains("1 missing"), "{r}");
}

#[test]
fn a_truncated_pack_is_stored_again_by_the_next_backup() {
    let f = Fixture::new(2);
    let p = &f.data_packs()[2];
    truncate(p, fs::metadata(p).unwrap().len() / 2);
    let r = new_backup_repairs(&f, "truncated pack");
    assert_data_repaired(&r, "truncated pack");
    assert!(r["warnings"].to_string().contains("wrong size"), "{r}");
}

#[test]
fn a_zero_length_pack_is_stored_again_by_the_next_backup() {
    let f = Fixture::new(3);
    truncate(&f.data_packs()[0], 0);
    assert_data_repaired(&new_backup_repairs(&f, "zero-length pack"), "zero-length pack");
}

/// A flipped bit keeps the pack's size: `check --read-data` finds it, and backups leave
/// the pack out from then on.
#[test]
fn a_bit_flipped_pack_found_by_check_is_stored_again_by_the_next_backup() {
    let f = Fixture::new(4);
    let p = &f.data_packs()[5];
    flip_middle(p);
    let (_, stderr) = f.dir.repo_cmd("check").arg("--read-data").code(1);
    assert!(stderr.contains(p.file_name().unwrap().to_str().unwrap()), "{stderr}");
    let r = new_backup_repairs(&f, "bit-flipped pack");
    assert_data_repaired(&r, "bit-flipped pack");
    assert!(r["warnings"].to_string().contains("found damaged by check"), "{r}");

    // The pack put back as it was: repair reads it whole, finds it intact, and backups
    // reuse it again.
    flip_middle(p);
    repair(&f.dir, &[], 0);
    let r = f.backup("v", None);
    assert_eq!(r["unavailable_packs"], 0, "{r}");
}

#[test]
fn two_swapped_packs_are_stored_again_by_the_next_backup() {
    let f = Fixture::new(5);
    let (a, b) = (f.data_packs()[1].clone(), f.meta_pack());
    let (da, db) = (fs::read(&a).unwrap(), fs::read(&b).unwrap());
    fs::write(&a, db).unwrap();
    fs::write(&b, da).unwrap();
    let r = new_backup_repairs(&f, "swapped packs");
    assert_data_repaired(&r, "swapped packs");
    assert_eq!(r["unavailable_packs"], 2, "{r}");
    assert!(r["repaired_pages"].as_u64().unwrap() >= 1, "the index page is stored again: {r}");
}

/// A pack that cannot be read: a directory in its place, or a dangling symbolic link.
#[test]
fn an_unreadable_pack_is_stored_again_by_the_next_backup() {
    let f = Fixture::new(6);
    let packs = f.data_packs();
    fs::remove_file(&packs[4]).unwrap();
    fs::create_dir(&packs[4]).unwrap();
    fs::remove_file(&packs[6]).unwrap();
    std::os::unix::fs::symlink(f.dir.join("nowhere"), &packs[6]).unwrap();
    let r = new_backup_repairs(&f, "unreadable packs");
    assert_eq!(r["disks"][0]["repaired_chunks"], 16, "{r}");
    assert_eq!(r["unavailable_packs"], 2, "{r}");
}

/// The index page is read back once before it is reused: a damaged one is stored again.
#[test]
fn a_damaged_tree_blob_is_stored_again_by_the_next_backup() {
    let f = Fixture::new(7);
    flip_middle(&f.meta_pack());
    let r = new_backup_repairs(&f, "damaged tree blob");
    assert!(r["repaired_pages"].as_u64().unwrap() >= 1, "{r}");
    assert_eq!(r["disks"][0]["new_chunks"], 0, "no data chunk was damaged: {r}");
}

/// An incremental inherits nothing whose blob is gone: the chunks of a lost pack are read
/// from the source instead (exactly those), and the snapshot is whole.
#[test]
fn an_incremental_reads_again_the_chunks_its_parent_lost() {
    let dir_list = tempfile::NamedTempFile::new().unwrap();
    let list = dir_list.path();
    change_list(list, SIZE, &[]);
    let f = Fixture::with_cbt(8, Some(list));
    fs::remove_file(&f.data_packs()[2]).unwrap();
    let r = f.backup("v", Some(list));
    f.assert_restores(&snap_id(&r), "the incremental");
    f.assert_restores(&f.first, "its parent");
    let d = &r["disks"][0];
    assert_eq!(d["mode"], "incremental", "{r}");
    assert_eq!(d["repaired_chunks"], 8, "{r}");
    assert_eq!(d["bytes_read"], 8 * CHUNK, "only the lost chunks are read: {r}");
}

/// A parent whose index pages cannot be read makes the incremental a full read, with
/// that reason.
#[test]
fn an_incremental_whose_parent_pages_are_gone_reads_in_full() {
    let dir_list = tempfile::NamedTempFile::new().unwrap();
    let list = dir_list.path();
    change_list(list, SIZE, &[]);
    let f = Fixture::with_cbt(9, Some(list));
    fs::remove_file(f.meta_pack()).unwrap();
    let r = f.backup("v", Some(list));
    let d = &r["disks"][0];
    assert_eq!(d["mode"], "full", "{r}");
    let why = d["full_reason"].as_str().unwrap_or_default();
    assert!(why.contains("index pages cannot be read"), "{r}");
    assert_eq!(d["bytes_read"], SIZE as u64, "{r}");
    f.assert_restores(&snap_id(&r), "the full read");
    f.assert_restores(&f.first, "its parent");
}

/// A copy into a target that lost a pack stores again what the copied snapshot needs,
/// although the parent's copy in the target names those chunks.
#[test]
fn a_copy_into_a_target_missing_a_pack_stores_it_again() {
    let f = Fixture::new(10);
    let site2 = f.dir.join("site2");
    init(&f.dir, &site2, "other");
    let copy = || {
        let mut c = f.dir.repo_cmd("copy");
        c.arg("--to").arg(&site2).arg("--json").env("BLOCKPROOF_TO_PASSWORD", "other");
        c.json()
    };
    let t1 = copy()["copied"][0]["target"].as_str().unwrap().to_string();
    let target_packs: Vec<PathBuf> =
        harness::files(&site2.join("data")).into_iter().filter(|p| fs::metadata(p).unwrap().len() > CHUNK).collect();
    fs::remove_file(&target_packs[0]).unwrap();
    f.backup("v", None);
    let r = copy();
    let t2 = r["copied"][0]["target"].as_str().unwrap().to_string();
    for t in [&t2, &t1] {
        let to = f.dir.join("from-site2.img");
        let mut c = f.dir.cmd("restore");
        c.arg("--repo").arg(&site2).arg(t).args(["--disk", "d", "--to"]).arg(&to).env("BLOCKPROOF_PASSWORD", "other");
        c.ok();
        assert_eq!(hash(&to), hash(&f.img), "target snapshot {t}");
        fs::remove_file(&to).unwrap();
    }
    assert_eq!(r["chunks_repaired"], 8, "{r}");
}

/// `repair --json`, expecting exit code `code`.
fn repair(dir: &Dir, extra: &[&str], code: i32) -> Value {
    let (stdout, _) = dir.repo_cmd("repair").arg("--json").args(extra).code(code);
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {stdout}"))
}

/// `check --json` (with `--read-data`): its report.
fn check(dir: &Dir) -> Value {
    let out = dir.repo_cmd("check").args(["--read-data", "--json"]).output();
    serde_json::from_slice(&out.stdout).unwrap()
}

fn gc(dir: &Dir) -> Value {
    dir.repo_cmd("gc").arg("--json").json()
}

/// Every file of the repository with its size, to show a dry run changes nothing.
fn listing(dir: &Dir) -> Vec<(PathBuf, u64)> {
    dir.repo_files()
        .into_iter()
        .filter(|p| !p.starts_with(dir.repo().join("locks")))
        .map(|p| {
            let len = fs::metadata(&p).unwrap().len();
            (p, len)
        })
        .collect()
}

#[test]
fn repair_indexes_packs_whose_index_file_was_lost() {
    let f = Fixture::new(11);
    for p in harness::files(&f.dir.repo().join("index")) {
        fs::remove_file(p).unwrap();
    }
    assert_eq!(check(&f.dir)["ok"], false);
    let before = listing(&f.dir);
    let dry = repair(&f.dir, &["--dry-run"], 0);
    assert_eq!((dry["dry_run"].as_bool(), dry["packs_reindexed"].as_u64()), (Some(true), Some(9)), "{dry}");
    assert_eq!(listing(&f.dir), before, "a dry run changes nothing");
    let r = repair(&f.dir, &[], 0);
    assert_eq!(r["packs_reindexed"], 9, "{r}");
    assert_eq!(r["lost"], serde_json::json!([]), "{r}");
    assert_eq!(check(&f.dir)["ok"], true);
    f.assert_restores(&f.first, "after re-indexing");
    gc(&f.dir);
    f.assert_restores(&f.first, "after gc");
    assert_eq!(repair(&f.dir, &[], 0)["packs_reindexed"], 0, "a second repair has nothing to do");
}

#[test]
fn repair_salvages_a_pack_under_a_wrong_name() {
    let f = Fixture::new(12);
    let p = f.data_packs()[3].clone();
    let name = p.file_name().unwrap().to_str().unwrap().to_string();
    let last = if name.ends_with('0') { '1' } else { '0' };
    let renamed = p.with_file_name(format!("{}{last}", &name[..63]));
    fs::rename(&p, &renamed).unwrap();
    assert_eq!(check(&f.dir)["ok"], false);
    let r = repair(&f.dir, &[], 0);
    assert_eq!((r["packs_salvaged"].as_u64(), r["blobs_salvaged"].as_u64()), (Some(1), Some(8)), "{r}");
    assert_eq!((r["packs_missing"].as_u64(), r["blobs_damaged"].as_u64()), (Some(1), Some(0)), "{r}");
    assert!(r["problems"].to_string().contains("not named by the hash of its bytes"), "{r}");
    assert!(!renamed.exists(), "the misnamed file is removed once its blobs are safe");
    let c = check(&f.dir);
    assert_eq!(c["ok"], true, "{c}");
    f.assert_restores(&f.first, "after repair");
    gc(&f.dir);
    f.assert_restores(&f.first, "after gc");
}

/// The `A..B` after "bytes " in an error line.
fn byte_range(line: &str) -> (u64, u64) {
    let rest = &line[line.find("bytes ").unwrap_or_else(|| panic!("no range in {line}")) + 6..];
    let token: String = rest.chars().take_while(|c| c.is_ascii_digit() || *c == '.').collect();
    let (a, b) = token.split_once("..").unwrap();
    (a.parse().unwrap(), b.parse().unwrap())
}

/// A bit flip in a data pack: repair salvages its 7 good blobs, reports exactly the one
/// chunk lost in both snapshots that use it, lets gc run, and a backup of the same data
/// makes both whole again.
#[test]
fn repair_salvages_a_damaged_pack_and_reports_exactly_what_is_lost() {
    let f = Fixture::new(13);
    let second = snap_id(&f.backup("w", None));
    let p = f.data_packs()[4].clone();
    flip_middle(&p);
    let to = f.dir.join("broken.img");
    let line = f.dir.repo_cmd("restore").arg(&f.first).args(["--disk", "d", "--to"]).arg(&to).fails_with_one_line(1);
    let (from, end) = byte_range(&line);
    assert_eq!(end - from, CHUNK, "{line}");
    let expected = serde_json::json!([{"offset": from, "length": CHUNK}]);

    let before = listing(&f.dir);
    let dry = repair(&f.dir, &["--dry-run"], 1);
    assert_eq!(listing(&f.dir), before, "a dry run changes nothing");
    for r in [dry, repair(&f.dir, &[], 1)] {
        assert_eq!((r["packs_salvaged"].as_u64(), r["blobs_salvaged"].as_u64()), (Some(1), Some(7)), "{r}");
        assert_eq!((r["blobs_damaged"].as_u64(), r["blobs_lost"].as_u64()), (Some(1), Some(1)), "{r}");
        let lost = r["lost"].as_array().unwrap();
        let mut snaps: Vec<&str> = lost.iter().map(|l| l["snapshot"].as_str().unwrap()).collect();
        snaps.sort();
        let mut want = vec![f.first.as_str(), second.as_str()];
        want.sort();
        assert_eq!(snaps, want, "{r}");
        for l in lost {
            assert_eq!((&l["disk"], &l["ranges"], &l["bytes"]), (&Value::from("d"), &expected, &Value::from(CHUNK)));
        }
    }
    assert!(!p.exists(), "the damaged pack is removed once its good blobs are safe");
    let c = check(&f.dir);
    let errors = c["errors"].as_array().unwrap();
    assert!(!errors.is_empty() && errors.iter().all(|e| e.as_str().unwrap().contains("not stored")), "{c}");
    gc(&f.dir);

    // The same content again: the lost chunk is stored again and every snapshot is whole.
    let third = f.backup("v", None);
    assert_eq!(third["disks"][0]["new_chunks"], 1, "{third}");
    assert_eq!(check(&f.dir)["ok"], true);
    for s in [&f.first, &second, &snap_id(&third)] {
        f.assert_restores(s, "after the repair and a new backup");
    }
    let again = repair(&f.dir, &[], 0);
    assert_eq!(again["lost"], serde_json::json!([]), "{again}");
    gc(&f.dir);
    f.assert_restores(&f.first, "after gc");
}

/// Repair removes and rewrites files: it holds the exclusive lock, so it refuses while a
/// backup runs (a dry run takes no lock and may run).
#[test]
fn repair_refuses_while_a_backup_runs() {
    let f = Fixture::new(14);
    let gate = f.dir.join("gate");
    let mut c = f.dir.repo_cmd("backup");
    c.args(["--vm", "v", "--json", "--disk"]).arg(format!("id=d,source={}", f.img.display()));
    c.env("BLOCKPROOF_PAUSE_BEFORE_COMMIT", gate.to_str().unwrap());
    let child = c.spawn_piped();
    let waiting = PathBuf::from(format!("{}.waiting", gate.display()));
    for _ in 0..3000 {
        if waiting.exists() {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(waiting.exists(), "the backup never paused");
    let line = f.dir.repo_cmd("repair").fails_with_one_line(1);
    assert!(line.contains("shared lock of backup"), "{line}");
    repair(&f.dir, &["--dry-run"], 0);
    fs::write(&gate, b"").unwrap();
    assert!(child.wait_with_output().unwrap().status.success());
    let r = repair(&f.dir, &[], 0);
    let nothing = ["packs_reindexed", "packs_salvaged", "packs_written", "index_files_written", "index_files_removed"];
    for field in nothing {
        assert_eq!(r[field], 0, "a healthy repository needs nothing: {field} in {r}");
    }
}

/// Packs written by earlier versions have the exact size their index listing gives
/// (FORMAT §9): repair finds the fixture repositories intact, and a backup into them
/// reuses every pack.
#[test]
fn packs_of_every_format_version_have_their_listed_size() {
    for (version, password) in [(1, "fixture password v1"), (2, "fixture password v2")] {
        let dir = Dir::new();
        let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("../../tests/fixtures/repo-v{version}"));
        let status = std::process::Command::new("cp").arg("-r").arg(&fixture).arg(dir.repo()).status().unwrap();
        assert!(status.success());
        let img = dir.random_image("d.img", 1 << 20, version);
        let run = |args: &[&str]| {
            let mut c = dir.repo_cmd(args[0]);
            c.args(&args[1..]).env("BLOCKPROOF_PASSWORD", password);
            c.json()
        };
        let r = run(&["repair", "--dry-run", "--json"]);
        assert_eq!(r["packs"], r["packs_intact"], "repo-v{version}: {r}");
        assert_eq!((r["packs_reindexed"].as_u64(), r["index_files_removed"].as_u64()), (Some(0), Some(0)), "{r}");
        let source = format!("id=d,source={}", img.display());
        let b = run(&["backup", "--vm", "x", "--json", "--disk", &source]);
        assert_eq!(b["unavailable_packs"], 0, "repo-v{version}: {b}");
    }
}
