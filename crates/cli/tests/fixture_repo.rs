//! The fixture repository: a small repository written by format version 1 and committed
//! under tests/fixtures/repo-v1. Every later version of blockproof must still read it,
//! restore it bit-exact and find it whole; and its files must keep the pinned magic
//! numbers of docs/FORMAT.md.
//!
//! The fixture is made once by `regenerate_fixture` (ignored; run with
//! `BLOCKPROOF_WRITE_FIXTURE=1 cargo test -p blockproof --test fixture_repo -- --ignored`)
//! and never rewritten after a release: a format change adds repo-v2, it does not
//! replace repo-v1.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const PASSWORD: &str = "fixture password v1";
const CHUNK: usize = 4096;
/// 1280 chunks and a 1000-byte tail: two levels of index pages (fanout 1024).
const SIZE: usize = 1280 * CHUNK + 1000;

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/repo-v1")
}

/// The disk as it was at snapshot `version` (1 or 2): text chunks, zero chunks,
/// duplicated chunks and a partial last chunk; version 2 rewrote every 97th chunk.
fn image(version: u32) -> Vec<u8> {
    let mut out = Vec::with_capacity(SIZE);
    for i in 0..SIZE.div_ceil(CHUNK) {
        let len = (SIZE - i * CHUNK).min(CHUNK);
        let chunk: Vec<u8> = if i % 7 == 3 {
            vec![0; len]
        } else {
            let source = if i % 11 == 5 { 5 } else { i };
            let text = if version == 2 && i % 97 == 0 {
                format!("blockproof fixture v1, chunk {source:06}, rewritten before snapshot 2. ")
            } else {
                format!("blockproof fixture v1, chunk {source:06}. ")
            };
            text.bytes().cycle().take(len).collect()
        };
        out.extend_from_slice(&chunk);
    }
    out
}

fn blockproof(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_blockproof"))
        .args(args)
        .env("BLOCKPROOF_PASSWORD", PASSWORD)
        .env_remove("BLOCKPROOF_REPO")
        .output()
        .expect("run blockproof")
}

fn ok(out: Output) -> String {
    assert!(out.status.success(), "blockproof failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

fn copy_dir(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap();
    for e in fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let target = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &target);
        } else {
            fs::copy(e.path(), target).unwrap();
        }
    }
}

/// A private copy of the fixture (blockproof must not touch the committed one).
fn fixture_copy(tmp: &Path) -> PathBuf {
    let repo = tmp.join("repo");
    copy_dir(&fixture_dir(), &repo);
    repo
}

fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in fs::read_dir(dir).into_iter().flatten().flatten() {
        if e.file_type().unwrap().is_dir() {
            out.extend(files(&e.path()));
        } else {
            out.push(e.path());
        }
    }
    out.sort();
    out
}

#[test]
#[ignore = "writes the committed fixture; run only when creating a new format version"]
fn regenerate_fixture() {
    if std::env::var("BLOCKPROOF_WRITE_FIXTURE").as_deref() != Ok("1") {
        return;
    }
    let dir = fixture_dir();
    assert!(!dir.exists(), "{} exists: fixtures are never rewritten", dir.display());
    let tmp = tempfile::tempdir().unwrap();
    let repo = dir.to_str().unwrap();
    ok(blockproof(&["init", "--repo", repo, "--chunk-size", "4KiB", "--kdf-memory", "1", "--kdf-iterations", "1"]));
    for v in [1, 2] {
        let img = tmp.path().join(format!("disk-v{v}.img"));
        fs::write(&img, image(v)).unwrap();
        let spec = format!("id=fixture-disk-0,source={}", img.display());
        ok(blockproof(&["backup", "--repo", repo, "--vm", "fixture-vm", "--disk", &spec]));
    }
    let _ = fs::remove_dir(dir.join("tmp"));
}

#[test]
fn fixture_restores_bit_exact_and_checks_clean() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = fixture_copy(tmp.path());
    let repo = repo.to_str().unwrap();
    let list: serde_json::Value =
        serde_json::from_str(&ok(blockproof(&["snapshots", "--repo", repo, "--json"]))).unwrap();
    let snaps = list.as_array().unwrap();
    assert_eq!(snaps.len(), 2);
    for (i, s) in snaps.iter().enumerate() {
        assert_eq!(s["vm"], "fixture-vm");
        assert_eq!(s["status"], "ok");
        assert_eq!(s["disks"][0]["id"], "fixture-disk-0");
        assert_eq!(s["disks"][0]["size"], SIZE as u64);
        let target = tmp.path().join(format!("restored-{i}.img"));
        ok(blockproof(&[
            "restore",
            "--repo",
            repo,
            s["id"].as_str().unwrap(),
            "--disk",
            "fixture-disk-0",
            "--to",
            target.to_str().unwrap(),
        ]));
        assert!(fs::read(&target).unwrap() == image(i as u32 + 1), "snapshot {i} restores bit-exact");
    }
    assert_eq!(snaps[1]["disks"][0]["parent"], snaps[0]["id"]);
    let report: serde_json::Value =
        serde_json::from_str(&ok(blockproof(&["check", "--repo", repo, "--read-data", "--json"]))).unwrap();
    assert_eq!(report["ok"], true, "{report}");
    assert!(report["warnings"].as_array().unwrap().is_empty());
}

#[test]
fn fixture_files_carry_the_pinned_magic_numbers() {
    let dir = fixture_dir();
    let expect = |sub: &str, magic: &[u8; 4]| {
        let found = files(&dir.join(sub));
        assert!(!found.is_empty(), "fixture has files under {sub}");
        for f in found {
            let bytes = fs::read(&f).unwrap();
            assert_eq!(&bytes[..6], [&magic[..], &[1, 0]].concat().as_slice(), "{}", f.display());
            // Files are named by the BLAKE3 hash of their bytes.
            assert_eq!(blake3::hash(&bytes).to_hex().as_str(), f.file_name().unwrap().to_str().unwrap());
        }
    };
    expect("keys", b"BPKS");
    expect("data", b"BPPK");
    expect("index", b"BPIX");
    expect("snapshots", b"BPSN");
    assert_eq!(&fs::read(dir.join("config")).unwrap()[..6], b"BPRC\x01\x00");
}

#[test]
fn fixture_refuses_a_wrong_password() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = fixture_copy(tmp.path());
    let out = Command::new(env!("CARGO_BIN_EXE_blockproof"))
        .args(["snapshots", "--repo", repo.to_str().unwrap()])
        .env("BLOCKPROOF_PASSWORD", "not the password")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("wrong password"), "{stderr}");
}

/// Damaged copies of the fixture: every kind of damage is found by check --read-data.
#[test]
fn damaged_fixture_copies_are_detected() {
    type Damage = fn(&Path);
    let flip_middle: Damage = |f| {
        let mut b = fs::read(f).unwrap();
        let mid = b.len() / 2;
        b[mid] ^= 0x01;
        fs::write(f, b).unwrap();
    };
    let truncate: Damage = |f| {
        let b = fs::read(f).unwrap();
        fs::write(f, &b[..b.len() - 7]).unwrap();
    };
    let delete: Damage = |f| fs::remove_file(f).unwrap();
    for (sub, damage, name) in [
        ("data", flip_middle, "bit flip in a pack"),
        ("data", truncate, "truncated pack"),
        ("data", delete, "deleted pack"),
        ("index", flip_middle, "bit flip in an index file"),
        ("index", delete, "deleted index file"),
        ("snapshots", flip_middle, "bit flip in a snapshot"),
        ("snapshots", truncate, "truncated snapshot"),
    ] {
        let tmp = tempfile::tempdir().unwrap();
        let repo = fixture_copy(tmp.path());
        let victim = files(&repo.join(sub)).into_iter().next().unwrap();
        damage(&victim);
        let out = blockproof(&["check", "--repo", repo.to_str().unwrap(), "--read-data"]);
        assert_eq!(out.status.code(), Some(1), "{name}: check must fail");
        let text = String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
        let victim_name = victim.file_name().unwrap().to_str().unwrap();
        // A deleted index file orphans its packs (a warning naming them) and loses blobs:
        // the error names what is missing rather than the deleted file.
        if name != "deleted index file" {
            assert!(text.contains(victim_name), "{name}: the report names {victim_name}: {text}");
        }
    }
}
