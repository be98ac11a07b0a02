//! End-to-end: init, backup, snapshots, restore, incrementals, JSON contracts, usage errors.

mod harness;

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};

use harness::{hash, mixed_image, scatter_writes, Dir, MARKER};

#[test]
fn full_backup_restores_bit_exact_and_sparse_and_leaks_no_plaintext() {
    let dir = Dir::new();
    dir.init();
    let img = dir.join("disk.img");
    fs::write(&img, mixed_image(256 << 20, 1)).unwrap();
    let report = dir.backup("web", &[("sda", &img)]);
    assert_eq!(report["status"], "ok");
    assert_eq!(report["disks"][0]["bytes_read"], 256u64 << 20);
    let out = dir.restore("web:latest", "sda", "restored.img");
    assert_eq!(hash(&out), hash(&img), "restore is bit-exact");
    let meta = fs::metadata(&out).unwrap();
    assert_eq!(meta.len(), 256 << 20);
    assert!(meta.blocks() * 512 < meta.len() * 9 / 10, "zero chunks are holes: {} blocks", meta.blocks());

    // No file of the repository holds the plaintext marker of the source.
    for f in dir.repo_files() {
        let bytes = fs::read(&f).unwrap();
        assert!(!bytes.windows(MARKER.len()).any(|w| w == MARKER), "{} contains plaintext", f.display());
    }
    // No temporary file is left behind by a successful restore.
    let leftovers: Vec<_> = fs::read_dir(dir.path())
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().contains("partial"))
        .collect();
    assert!(leftovers.is_empty());
}

#[test]
fn incremental_after_one_percent_change_stores_little_and_both_points_restore() {
    let dir = Dir::new();
    dir.init();
    let img = dir.join("disk.img");
    let mut data = mixed_image(128 << 20, 2);
    fs::write(&img, &data).unwrap();
    let first = dir.backup("db", &[("vda", &img)]);
    let v1 = hash(&img);
    let before = dir.repo_bytes();

    let changed = scatter_writes(&mut data, 20, 64 << 10, 3); // 1% of 128 MiB, 64 KiB-aligned
    fs::write(&img, &data).unwrap();
    let second = dir.backup("db", &[("vda", &img)]);
    let grown = dir.repo_bytes() - before;
    assert!(grown < 4 * changed, "incremental added {grown} bytes for {changed} changed");
    assert_eq!(second["disks"][0]["new_chunks"], 20);
    assert_eq!(second["disks"][0]["parent"], first["snapshot"]);

    let snap1 = first["snapshot"].as_str().unwrap();
    let snap2 = second["snapshot"].as_str().unwrap();
    assert_eq!(hash(&dir.restore(snap1, "vda", "one.img")), v1);
    assert_eq!(hash(&dir.restore(&snap2[..10], "vda", "two.img")), hash(&img));
}

#[test]
fn backup_json_has_the_contract_fields() {
    let dir = Dir::new();
    dir.init();
    let img = dir.join("d.img");
    fs::write(&img, mixed_image(3 << 20, 4)).unwrap();
    let r = dir.backup("vm1", &[("disk-0", &img)]);
    assert_eq!(r["snapshot"].as_str().unwrap().len(), 64);
    assert_eq!(r["vm"], "vm1");
    assert_eq!(r["status"], "ok");
    let d = &r["disks"][0];
    for field in [
        "id",
        "mode",
        "size",
        "chunk_size",
        "bytes_read",
        "cbt_reported_chunks",
        "cbt_overreported_chunks",
        "verified_chunks",
        "verified_bytes",
        "mismatches",
        "suspect_snapshots",
        "coverage",
        "next_mode",
    ] {
        assert!(!d[field].is_null(), "disks[].{field} missing in {d}");
    }
    for field in ["chunks", "never_confirmed", "oldest_confirmed_runs_ago", "full_coverage_within_runs"] {
        assert!(d["coverage"][field].is_u64(), "coverage.{field} missing in {d}");
    }
    assert_eq!(d["id"], "disk-0");
    assert_eq!(d["mode"], "full");
    assert_eq!(d["size"], 3u64 << 20);
    assert_eq!(d["chunk_size"], 65536);
    assert_eq!(d["coverage"]["chunks"], 48);
    assert_eq!(d["coverage"]["never_confirmed"], 0);
    assert!(d["mismatches"].as_array().unwrap().is_empty());

    let snaps = dir.snapshots();
    assert_eq!(snaps.len(), 1);
    let s = &snaps[0];
    assert_eq!(s["id"], r["snapshot"]);
    assert_eq!(s["vm"], "vm1");
    assert_eq!(s["status"], "ok");
    assert_eq!(s["disks"][0]["id"], "disk-0");
    assert_eq!(s["disks"][0]["size"], 3u64 << 20);
    let time = s["time"].as_str().unwrap();
    assert!(time.len() >= 20 && time.ends_with('Z') && &time[10..11] == "T", "RFC 3339: {time}");

    let check = dir.repo_cmd("check").arg("--json").json();
    assert_eq!(check["ok"], true);
}

#[test]
fn snapshots_are_listed_oldest_first_and_filtered_by_vm() {
    let dir = Dir::new();
    dir.init();
    let img = dir.join("d.img");
    fs::write(&img, mixed_image(1 << 20, 5)).unwrap();
    let a = dir.backup("a", &[("d", &img)]);
    let b = dir.backup("b", &[("d", &img)]);
    let c = dir.backup("a", &[("d", &img)]);
    let ids: Vec<_> = dir.snapshots().iter().map(|s| s["id"].clone()).collect();
    assert_eq!(ids, vec![a["snapshot"].clone(), b["snapshot"].clone(), c["snapshot"].clone()]);
    let only_a = dir.repo_cmd("snapshots").args(["--vm", "a", "--json"]).json();
    assert_eq!(only_a.as_array().unwrap().len(), 2);
    // Disks follow their id within a vm: c's parent is a, not b.
    assert_eq!(only_a[1]["disks"][0]["parent"], a["snapshot"]);
    let table = dir.repo_cmd("snapshots").ok();
    assert!(table.contains(&a["snapshot"].as_str().unwrap()[..8]), "{table}");
    assert!(table.contains("3 snapshot(s)"), "{table}");
}

#[test]
fn two_disks_are_kept_apart_by_id() {
    let dir = Dir::new();
    dir.init();
    let (os, data) = (dir.join("os.img"), dir.join("data.img"));
    fs::write(&os, mixed_image(5 << 20, 6)).unwrap();
    fs::write(&data, mixed_image(7 << 20, 7)).unwrap();
    let r = dir.backup("app", &[("os-6000c29d", &os), ("data-6000c2a1", &data)]);
    assert_eq!(r["disks"].as_array().unwrap().len(), 2);
    let snap = r["snapshot"].as_str().unwrap();
    assert_eq!(hash(&dir.restore(snap, "os-6000c29d", "os.out")), hash(&os));
    assert_eq!(hash(&dir.restore(snap, "data-6000c2a1", "data.out")), hash(&data));
    // Swapping the paths does not swap identities: each id keeps its own parent chain.
    let r2 = dir.backup("app", &[("data-6000c2a1", &data), ("os-6000c29d", &os)]);
    let snaps = dir.snapshots();
    for d in snaps[1]["disks"].as_array().unwrap() {
        assert_eq!(d["parent"], r["snapshot"], "{d}");
    }
    assert_eq!(hash(&dir.restore(r2["snapshot"].as_str().unwrap(), "os-6000c29d", "os2.out")), hash(&os));
}

#[test]
fn read_only_source_file_is_backed_up() {
    let dir = Dir::new();
    dir.init();
    let img = dir.join("ro.img");
    fs::write(&img, mixed_image(2 << 20, 8)).unwrap();
    fs::set_permissions(&img, fs::Permissions::from_mode(0o444)).unwrap();
    let r = dir.backup("ro", &[("d", &img)]);
    assert_eq!(r["status"], "ok");
    assert_eq!(fs::metadata(&img).unwrap().permissions().mode() & 0o777, 0o444);
    assert_eq!(hash(&dir.restore("ro:latest", "d", "ro.out")), hash(&img));
}

#[test]
fn odd_sized_and_empty_disks() {
    let dir = Dir::new();
    dir.init();
    let odd = dir.join("odd.img");
    fs::write(&odd, mixed_image((3 << 20) + 12345, 9)).unwrap();
    let empty = dir.join("empty.img");
    fs::write(&empty, b"").unwrap();
    let r = dir.backup("odd", &[("odd", &odd), ("empty", &empty)]);
    let snap = r["snapshot"].as_str().unwrap();
    assert_eq!(hash(&dir.restore(snap, "odd", "odd.out")), hash(&odd));
    let e = dir.restore(snap, "empty", "empty.out");
    assert_eq!(fs::metadata(e).unwrap().len(), 0);
}

#[test]
fn restore_refuses_to_overwrite_unless_forced() {
    let dir = Dir::new();
    dir.init();
    let img = dir.join("d.img");
    fs::write(&img, mixed_image(1 << 20, 10)).unwrap();
    dir.backup("v", &[("d", &img)]);
    let target = dir.join("existing.img");
    fs::write(&target, b"precious").unwrap();
    let line = dir.repo_cmd("restore").args(["v:latest", "--disk", "d", "--to"]).arg(&target).fails_with_one_line(2);
    assert!(line.contains("--force"), "{line}");
    assert_eq!(fs::read(&target).unwrap(), b"precious");
    dir.repo_cmd("restore").args(["v:latest", "--disk", "d", "--force", "--to"]).arg(&target).ok();
    assert_eq!(hash(&target), hash(&img));
}

#[test]
fn usage_errors_exit_2_with_one_line() {
    let dir = Dir::new();
    dir.init();
    let img = dir.join("d.img");
    fs::write(&img, mixed_image(1 << 20, 11)).unwrap();
    for spec in ["id=d", "source=x", "id=d,source=/x,bogus=1", "nonsense"] {
        let line = dir.repo_cmd("backup").args(["--vm", "v", "--disk", spec]).fails_with_one_line(2);
        assert!(line.contains("disk spec"), "{line}");
    }
    let line = dir
        .repo_cmd("backup")
        .args(["--vm", "bad:name", "--disk"])
        .arg(format!("id=d,source={}", img.display()))
        .fails_with_one_line(2);
    assert!(line.contains("vm name"), "{line}");
    let line = dir
        .repo_cmd("backup")
        .args(["--vm", "v", "--verify", "lots", "--disk"])
        .arg(format!("id=d,source={}", img.display()))
        .fails_with_one_line(2);
    assert!(line.contains("budget"), "{line}");
    let (_, stderr) = dir.repo_cmd("backup").arg("--no-such-flag").code(2);
    assert!(stderr.contains("--no-such-flag"));
    dir.backup("v", &[("d", &img)]);
    let line = dir.repo_cmd("restore").args(["v:latest", "--disk", "nope", "--to", "x.img"]).fails_with_one_line(2);
    assert!(line.contains("no disk \"nope\"") && line.contains("d"), "{line}");
    let line = dir.repo_cmd("restore").args(["other:latest", "--disk", "d", "--to", "x.img"]).fails_with_one_line(2);
    assert!(line.contains("other"), "{line}");
    // A missing source is an error of the system, not of usage.
    let line = dir.repo_cmd("backup").args(["--vm", "v", "--disk", "id=d,source=/no/such.img"]).fails_with_one_line(1);
    assert!(line.contains("/no/such.img"), "{line}");
}

#[test]
fn wrong_password_is_one_line_exit_1() {
    let dir = Dir::new();
    dir.init();
    let line = dir.repo_cmd("snapshots").env("BLOCKPROOF_PASSWORD", "wrong").fails_with_one_line(1);
    assert!(line.contains("wrong password"), "{line}");
    let pwfile = dir.join("pw");
    fs::write(&pwfile, format!("{}\n", harness::PASSWORD)).unwrap();
    dir.repo_cmd("snapshots").arg("--password-file").arg(&pwfile).env("BLOCKPROOF_PASSWORD", "wrong").ok();
    let line = dir.cmd("snapshots").args(["--repo", "/no/such/repo"]).fails_with_one_line(1);
    assert!(line.contains("not a blockproof repository"), "{line}");
    let line = dir.repo_cmd("init").fails_with_one_line(1);
    assert!(line.contains("not empty"), "{line}");
}

/// `init --compression`: both codecs back up, restore bit-exact and check clean; zstd
/// stores less than LZ4 on compressible data; a bad codec is a usage error.
#[test]
fn both_codecs_round_trip_and_zstd_stores_less() {
    let mut stored = Vec::new();
    for codec in ["lz4", "zstd", "zstd:3"] {
        let dir = Dir::new();
        let init = dir.repo_cmd("init").args(["--kdf-memory", "8", "--compression", codec, "--json"]).json();
        let expect = if codec == "zstd" { "zstd:1" } else { codec };
        assert_eq!(init["compression"], expect);
        let img = dir.join("disk.img");
        fs::write(&img, mixed_image(32 << 20, 7)).unwrap();
        dir.backup("vm", &[("sda", &img)]);
        assert_eq!(hash(&dir.restore("vm:latest", "sda", "out.img")), hash(&img), "{codec}");
        dir.check_all();
        stored.push(dir.repo_bytes());
    }
    assert!(stored[1] < stored[0], "zstd {} bytes, lz4 {} bytes", stored[1], stored[0]);
    let dir = Dir::new();
    let out = dir.repo_cmd("init").args(["--compression", "gzip"]).output();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid --compression"));
}
