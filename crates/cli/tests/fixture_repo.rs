//! The fixture repositories: small repositories written by each format version and
//! committed under tests/fixtures/repo-vN (version 1: zstd blobs; version 2: LZ4 blobs;
//! version 3: manifests whose coverage says what the bound rests on; version 4: a running
//! VM's restore points, backed up with `--from qmp:` from a qemu-storage-daemon, keep the
//! VM's `machine`).
//! Every later version of blockproof must still read them, restore them bit-exact and
//! find them whole; their files must keep the pinned magic numbers and versions of
//! docs/FORMAT.md; and writing into an old repository must keep it readable by the build
//! that made it (same version in every file, config untouched).
//!
//! A fixture is made once by `regenerate_fixture` (ignored; run with
//! `BLOCKPROOF_WRITE_FIXTURE=repo-v2 cargo test -p blockproof --test fixture_repo -- --ignored`)
//! and never rewritten after a release: a format change adds repo-vN+1, it does not
//! replace older ones.

mod harness;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The fixtures and their passwords.
const FIXTURES: [(u16, &str); 4] =
    [(1, "fixture password v1"), (2, "fixture password v2"), (3, "fixture password v3"), (4, "fixture password v4")];
const CHUNK: usize = 4096;
/// 1280 chunks and a 1000-byte tail: two levels of index pages (fanout 1024).
const SIZE: usize = 1280 * CHUNK + 1000;

fn fixture_dir(version: u16) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("../../tests/fixtures/repo-v{version}"))
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

/// The disk of fixture `fixture` at its snapshot `version`: from version 4 a running VM's
/// disk, whose size QEMU rounds up to whole 512-byte sectors (the tail reads as zeros).
fn disk_image(fixture: u16, version: u32) -> Vec<u8> {
    let mut img = image(version);
    if fixture >= 4 {
        img.resize(SIZE.next_multiple_of(512), 0);
    }
    img
}

fn blockproof(password: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_blockproof"))
        .args(args)
        .env("BLOCKPROOF_PASSWORD", password)
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
fn fixture_copy(version: u16, tmp: &Path) -> PathBuf {
    let repo = tmp.join("repo");
    copy_dir(&fixture_dir(version), &repo);
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
    let Ok(name) = std::env::var("BLOCKPROOF_WRITE_FIXTURE") else { return };
    let &(version, password) = FIXTURES.iter().find(|(v, _)| name == format!("repo-v{v}")).expect("a known fixture");
    let dir = fixture_dir(version);
    assert!(!dir.exists(), "{} exists: fixtures are never rewritten", dir.display());
    let tmp = tempfile::tempdir().unwrap();
    let repo = dir.to_str().unwrap();
    ok(blockproof(
        password,
        &["init", "--repo", repo, "--chunk-size", "4KiB", "--kdf-memory", "1", "--kdf-iterations", "1"],
    ));
    if version >= 4 {
        // A running VM: the disk is node fixture-disk-0 of a qemu-storage-daemon, the
        // second image written through its block layer so its bitmap sees the change.
        use harness::qemu::{qemu, s};
        let vm = harness::Dir::new();
        // A raw image keeps the disk's exact size (qcow2 rounds it up to 512 bytes).
        let disk = vm.join("fixture-disk-0.raw");
        fs::write(&disk, image(1)).unwrap();
        let nbd = vm.join("vm.nbd");
        let args = [
            "--blockdev".to_string(),
            format!("driver=file,filename={},node-name=fixture-file", disk.display()),
            "--blockdev".into(),
            "driver=raw,file=fixture-file,node-name=fixture-disk-0".into(),
            "--nbd-server".into(),
            format!("addr.type=unix,addr.path={}", nbd.display()),
            "--export".into(),
            "type=nbd,id=writer,node-name=fixture-disk-0,name=fixture-disk-0,writable=on".into(),
        ];
        let qsd = harness::qsd::Qsd::start(&vm, "vm", &args);
        let from = format!("qmp:{},nbd={}", qsd.qmp.display(), nbd.display());
        let state = vm.join("state");
        let backup = ["backup", "--repo", repo, "--vm", "fixture-vm", "--from", &from, "--state-dir", s(&state)];
        ok(blockproof(password, &backup));
        let v2 = vm.join("disk-v2.img");
        fs::write(&v2, image(2)).unwrap();
        let target = format!("nbd+unix:///fixture-disk-0?socket={}", nbd.display());
        qemu("qemu-img", &["convert", "-q", "-n", "-f", "raw", "-O", "raw", s(&v2), &target]);
        ok(blockproof(password, &backup));
    } else {
        for v in [1, 2] {
            let img = tmp.path().join(format!("disk-v{v}.img"));
            fs::write(&img, image(v)).unwrap();
            let spec = format!("id=fixture-disk-0,source={}", img.display());
            ok(blockproof(password, &["backup", "--repo", repo, "--vm", "fixture-vm", "--disk", &spec]));
        }
    }
    let _ = fs::remove_dir(dir.join("tmp"));
}

/// Restores every snapshot of the fixture at `repo` bit-exact and checks it clean.
fn assert_restores_and_checks(fixture: u16, password: &str, repo: &str, tmp: &Path) {
    let bp = |args: &[&str]| ok(blockproof(password, args));
    let list: serde_json::Value = serde_json::from_str(&bp(&["snapshots", "--repo", repo, "--json"])).unwrap();
    let snaps = list.as_array().unwrap();
    assert_eq!(snaps.len(), 2);
    for (i, s) in snaps.iter().enumerate() {
        assert_eq!(s["vm"], "fixture-vm");
        assert_eq!(s["status"], "ok");
        assert_eq!(s["disks"][0]["id"], "fixture-disk-0");
        assert_eq!(s["disks"][0]["size"], disk_image(fixture, 1).len() as u64);
        let target = tmp.join(format!("restored-{i}.img"));
        let id = s["id"].as_str().unwrap();
        bp(&["restore", "--repo", repo, id, "--disk", "fixture-disk-0", "--to", target.to_str().unwrap()]);
        assert!(fs::read(&target).unwrap() == disk_image(fixture, i as u32 + 1), "snapshot {i} restores bit-exact");
    }
    assert_eq!(snaps[1]["disks"][0]["parent"], snaps[0]["id"]);
    let report: serde_json::Value =
        serde_json::from_str(&bp(&["check", "--repo", repo, "--read-data", "--json"])).unwrap();
    assert_eq!(report["ok"], true, "{report}");
    assert!(report["warnings"].as_array().unwrap().is_empty());
}

#[test]
fn fixtures_restore_bit_exact_and_check_clean() {
    for (version, password) in FIXTURES {
        let tmp = tempfile::tempdir().unwrap();
        let repo = fixture_copy(version, tmp.path());
        assert_restores_and_checks(version, password, repo.to_str().unwrap(), tmp.path());
    }
}

/// Every file of `dir` carries its magic and `version` (the config: `config_version`)
/// and is named by the BLAKE3 hash of its bytes.
fn assert_headers(dir: &Path, version: u8, config_version: u8) {
    let expect = |sub: &str, magic: &[u8; 4]| {
        let found = files(&dir.join(sub));
        assert!(!found.is_empty(), "fixture has files under {sub}");
        for f in found {
            let bytes = fs::read(&f).unwrap();
            assert_eq!(&bytes[..6], [&magic[..], &[version, 0]].concat().as_slice(), "{}", f.display());
            assert_eq!(blake3::hash(&bytes).to_hex().as_str(), f.file_name().unwrap().to_str().unwrap());
        }
    };
    expect("keys", b"BPKS");
    expect("data", b"BPPK");
    expect("index", b"BPIX");
    expect("snapshots", b"BPSN");
    assert_eq!(&fs::read(dir.join("config")).unwrap()[..6], [&b"BPRC"[..], &[config_version, 0]].concat().as_slice());
}

#[test]
fn fixture_files_carry_the_pinned_magic_numbers() {
    // Versions 2 and 3 changed no byte layout: only the config says which.
    assert_headers(&fixture_dir(1), 1, 1);
    assert_headers(&fixture_dir(2), 1, 2);
    assert_headers(&fixture_dir(3), 1, 3);
    assert_headers(&fixture_dir(4), 1, 4);
}

/// A version 2 build writing into a version 1 repository keeps it a version 1
/// repository (zstd blobs, version 1 config untouched), which the build that made it
/// can still read; and a version 2 repository is refused with one clear line by a build
/// that reads only version 1 (simulated by the config check of this build on version 5).
#[test]
fn writing_into_a_version_1_repository_keeps_it_version_1() {
    let (version, password) = FIXTURES[0];
    let tmp = tempfile::tempdir().unwrap();
    let repo_path = fixture_copy(version, tmp.path());
    let repo = repo_path.to_str().unwrap();
    let config_before = fs::read(repo_path.join("config")).unwrap();
    let packs_before = files(&repo_path.join("data")).len();
    let mut third = image(2);
    third[..CHUNK].copy_from_slice(&[0x5a; CHUNK]);
    let img = tmp.path().join("disk-v3.img");
    fs::write(&img, &third).unwrap();
    let spec = format!("id=fixture-disk-0,source={}", img.display());
    ok(blockproof(password, &["backup", "--repo", repo, "--vm", "fixture-vm", "--disk", &spec]));
    assert!(files(&repo_path.join("data")).len() > packs_before, "the backup wrote a pack");
    assert_eq!(fs::read(repo_path.join("config")).unwrap(), config_before);
    assert_headers(&repo_path, 1, 1);
    let target = tmp.path().join("third.img");
    ok(blockproof(
        password,
        &["restore", "--repo", repo, "fixture-vm:latest", "--disk", "fixture-disk-0", "--to", target.to_str().unwrap()],
    ));
    assert!(fs::read(&target).unwrap() == third);
    let report: serde_json::Value =
        serde_json::from_str(&ok(blockproof(password, &["check", "--repo", repo, "--read-data", "--json"]))).unwrap();
    assert_eq!(report["ok"], true, "{report}");

    // A config from the future: refused before anything else is read, one line, exit 1.
    let mut future = config_before.clone();
    future[4] = 5;
    fs::write(repo_path.join("config"), &future).unwrap();
    let out = blockproof(password, &["snapshots", "--repo", repo]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("format version 5"), "{stderr}");
}

#[test]
fn fixtures_refuse_a_wrong_password() {
    for (version, _) in FIXTURES {
        let tmp = tempfile::tempdir().unwrap();
        let repo = fixture_copy(version, tmp.path());
        let out = blockproof("not the password", &["snapshots", "--repo", repo.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(1));
        let stderr = String::from_utf8(out.stderr).unwrap();
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(stderr.contains("wrong password"), "{stderr}");
    }
}

/// Damaged copies of the fixtures: every kind of damage is found by check --read-data.
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
        for (version, password) in FIXTURES {
            let tmp = tempfile::tempdir().unwrap();
            let repo = fixture_copy(version, tmp.path());
            let victim = files(&repo.join(sub)).into_iter().next().unwrap();
            damage(&victim);
            let out = blockproof(password, &["check", "--repo", repo.to_str().unwrap(), "--read-data"]);
            assert_eq!(out.status.code(), Some(1), "v{version} {name}: check must fail");
            let text = String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
            let victim_name = victim.file_name().unwrap().to_str().unwrap();
            // A deleted index file orphans its packs (a warning naming them) and loses
            // blobs: the error names what is missing rather than the deleted file.
            if name != "deleted index file" {
                assert!(text.contains(victim_name), "v{version} {name}: the report names {victim_name}: {text}");
            }
        }
    }
}

/// Version 3 manifests say what a disk's coverage bound rests on; a version 3 build
/// writing into a version 2 repository leaves those fields out (a version 2 build, which
/// reads manifests strictly, would reject them).
#[test]
fn coverage_fields_exist_from_version_3_and_are_not_written_into_older_repositories() {
    let status = |password: &str, repo: &str| -> serde_json::Value {
        serde_json::from_str(&ok(blockproof(password, &["status", "--repo", repo, "--json"]))).unwrap()
    };
    let tmp = tempfile::tempdir().unwrap();
    let (v3, pw3) = FIXTURES[2];
    let repo3 = fixture_copy(v3, tmp.path());
    let c = &status(pw3, repo3.to_str().unwrap())[0]["disks"][0]["coverage"];
    assert_eq!(c["bound"], "budget", "{c}");
    assert!(c["sampled_per_run"].as_u64().unwrap() > 0, "{c}");

    let tmp = tempfile::tempdir().unwrap();
    let (v2, pw2) = FIXTURES[1];
    let repo2 = fixture_copy(v2, tmp.path());
    let repo = repo2.to_str().unwrap();
    let img = tmp.path().join("d.img");
    fs::write(&img, image(2)).unwrap();
    let spec = format!("id=fixture-disk-0,source={}", img.display());
    ok(blockproof(pw2, &["backup", "--repo", repo, "--vm", "fixture-vm", "--disk", &spec]));
    let c = &status(pw2, repo)[0]["disks"][0]["coverage"];
    assert!(c.get("bound").is_none() && c.get("sampled_per_run").is_none(), "{c}");
    assert!(c["full_coverage_within_runs"].as_u64().unwrap() > 0, "{c}");
    assert_headers(&repo2, 1, 2);
}

/// Version 4 restore points of a running VM keep the VM (`machine`): the fixture's were
/// backed up with `--from qmp:`, crash-consistent, with the block graph blockproof saw; a
/// whole-VM restore writes that graph beside the disks, pointing at them. Copied into a
/// version 3 repository, the field is left out (a version 3 build would reject it).
#[test]
fn machine_exists_from_version_4_and_is_not_written_into_older_repositories() {
    let snapshots = |password: &str, repo: &Path| -> serde_json::Value {
        serde_json::from_str(&ok(blockproof(password, &["snapshots", "--repo", repo.to_str().unwrap(), "--json"])))
            .unwrap()
    };
    let tmp = tempfile::tempdir().unwrap();
    let (v4, pw4) = FIXTURES[3];
    let repo4 = fixture_copy(v4, tmp.path());
    let list = snapshots(pw4, &repo4);
    for s in list.as_array().unwrap() {
        assert_eq!(s["machine"]["kind"], "qmp", "{s}");
        assert_eq!(s["machine"]["consistency"], "crash", "{s}");
    }
    let to = tmp.path().join("vm");
    ok(blockproof(
        pw4,
        &["restore", "--repo", repo4.to_str().unwrap(), "fixture-vm:latest", "--to", to.to_str().unwrap()],
    ));
    assert!(fs::read(to.join("fixture-disk-0.raw")).unwrap() == disk_image(4, 2));
    let def: serde_json::Value = serde_json::from_slice(&fs::read(to.join("fixture-vm.qmp.json")).unwrap()).unwrap();
    let disk = &def["disks"][0];
    assert_eq!(disk["node"], "fixture-disk-0", "{def}");
    let file = to.join("fixture-disk-0.raw");
    assert_eq!(
        disk["blockdev"],
        format!("driver=raw,node-name=fixture-disk-0,file.driver=file,file.filename={}", file.display())
    );
    assert_eq!(disk["backed_up_from"]["driver"], "raw", "{def}");
    assert_eq!(disk["backed_up_from"]["size"], disk_image(4, 2).len() as u64, "{def}");
    // A definition already there (and no --force): refused before any disk is written.
    let again = tmp.path().join("again");
    fs::create_dir(&again).unwrap();
    fs::write(again.join("fixture-vm.qmp.json"), b"mine").unwrap();
    let out = blockproof(
        pw4,
        &["restore", "--repo", repo4.to_str().unwrap(), "fixture-vm:latest", "--to", again.to_str().unwrap()],
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("exists (use --force to replace it)"));
    assert_eq!(fs::read_dir(&again).unwrap().count(), 1, "no disk was written");
    assert_eq!(fs::read(again.join("fixture-vm.qmp.json")).unwrap(), b"mine");

    let (v3, pw3) = FIXTURES[2];
    let tmp3 = tempfile::tempdir().unwrap();
    let repo3 = fixture_copy(v3, tmp3.path());
    let out = Command::new(env!("CARGO_BIN_EXE_blockproof"))
        .args(["copy", "--repo", repo4.to_str().unwrap(), "--to", repo3.to_str().unwrap()])
        .env("BLOCKPROOF_PASSWORD", pw4)
        .env("BLOCKPROOF_TO_PASSWORD", pw3)
        .env_remove("BLOCKPROOF_REPO")
        .output()
        .unwrap();
    ok(out);
    let copies = snapshots(pw3, &repo3);
    let copies: Vec<_> = copies.as_array().unwrap().iter().filter(|s| !s["copied_from"].is_null()).collect();
    assert_eq!(copies.len(), 2);
    assert!(copies.iter().all(|s| s["machine"].is_null()), "{copies:?}");
    assert_headers(&repo3, 1, 3);
}
