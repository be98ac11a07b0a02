//! What a backup stores: never the all-zero chunk, every other chunk once per repository
//! (within a disk, across snapshots and across vms), and disks that change size between
//! backups restore each version exactly (DESIGN.md §4, §6).

mod harness;

use std::fs;
use std::os::unix::fs::MetadataExt;

use harness::{hash, mixed_image, Dir};
use rand::{RngCore, SeedableRng};

const CHUNK: usize = 64 << 10;
const MIB: usize = 1 << 20;

fn disk0(report: &serde_json::Value) -> &serde_json::Value {
    &report["disks"][0]
}

#[test]
fn all_zero_disk_stores_no_chunk_and_restores_as_a_hole() {
    let dir = Dir::new();
    dir.init();
    let img = dir.join("zero.img");
    fs::write(&img, vec![0u8; 64 * MIB]).unwrap();
    let before = dir.repo_bytes();
    let r = dir.backup("z", &[("d", &img)]);
    let grown = dir.repo_bytes() - before;
    assert_eq!(disk0(&r)["new_chunks"], 0, "{r}");
    assert_eq!(disk0(&r)["zero_chunks"], 1024, "{r}");
    assert_eq!(disk0(&r)["bytes_read"], 64u64 << 20);
    assert!(grown < 32 << 10, "an all-zero 64 MiB disk added {grown} bytes to the repository");

    let out = dir.restore("z:latest", "d", "zero.out");
    let meta = fs::metadata(&out).unwrap();
    assert_eq!(meta.len(), 64 << 20);
    assert!(meta.blocks() * 512 < 64 << 10, "restored zero disk allocates {} blocks", meta.blocks());
    assert_eq!(hash(&out), hash(&img));
}

#[test]
fn unchanged_disk_and_the_same_disk_in_another_vm_add_no_chunk() {
    let dir = Dir::new();
    dir.init();
    let img = dir.join("d.img");
    fs::write(&img, mixed_image(32 * MIB, 51)).unwrap();
    let first = dir.backup("a", &[("d", &img)]);
    assert!(disk0(&first)["new_chunks"].as_u64().unwrap() > 100, "{first}");

    for vm in ["a", "b"] {
        let before = dir.repo_bytes();
        let r = dir.backup(vm, &[("d", &img)]);
        let grown = dir.repo_bytes() - before;
        assert_eq!(disk0(&r)["new_chunks"], 0, "vm {vm}: {r}");
        assert!(grown < 64 << 10, "vm {vm}: an unchanged 32 MiB disk added {grown} bytes");
        assert_eq!(hash(&dir.restore(&format!("{vm}:latest"), "d", &format!("{vm}.out"))), hash(&img));
    }
    // Global dedup does not mix up lineage: b's disk has no parent, a's second has a's first.
    let snaps = dir.snapshots();
    assert_eq!(snaps.len(), 3);
    assert_eq!(snaps[1]["disks"][0]["parent"], first["snapshot"]);
    assert!(snaps[2]["disks"][0]["parent"].is_null(), "{}", snaps[2]);
}

#[test]
fn repeated_regions_are_stored_once() {
    let dir = Dir::new();
    dir.init();
    let mut block = vec![0u8; MIB];
    rand::rngs::StdRng::seed_from_u64(52).fill_bytes(&mut block);
    // 24 copies of one random MiB at chunk-aligned offsets, with zero gaps between some.
    let mut img = Vec::new();
    for i in 0..24 {
        img.extend_from_slice(&block);
        img.resize(img.len() + (i % 3) * CHUNK, 0);
    }
    let path = dir.join("dup.img");
    fs::write(&path, &img).unwrap();
    let before = dir.repo_bytes();
    let r = dir.backup("dup", &[("d", &path)]);
    let grown = dir.repo_bytes() - before;
    assert_eq!(disk0(&r)["new_chunks"], 16, "{r}");
    assert!(grown < (MIB + MIB / 4) as u64, "{} MiB of one repeated MiB added {grown} bytes", img.len() / MIB);
    assert_eq!(hash(&dir.restore("dup:latest", "d", "dup.out")), hash(&path));
}

#[test]
fn grown_and_shrunk_disk_restores_every_version() {
    let dir = Dir::new();
    dir.init();
    let img = dir.join("d.img");
    let v1 = mixed_image(8 * MIB, 53);
    let mut v2 = v1.clone();
    let mut tail = vec![0u8; 4 * MIB + 5000];
    rand::rngs::StdRng::seed_from_u64(54).fill_bytes(&mut tail);
    v2.extend_from_slice(&tail);
    let v3 = v2[..3 * MIB + 17].to_vec();

    let mut ids = Vec::new();
    for (n, v) in [&v1, &v2, &v3].into_iter().enumerate() {
        fs::write(&img, v).unwrap();
        let r = dir.backup("r", &[("d", &img)]);
        assert_eq!(disk0(&r)["size"], v.len() as u64, "{r}");
        let expect_new = match n {
            0 => None,
            // Only the 64 full and one partial chunk appended are new.
            1 => Some(65),
            // The short last chunk is new unless it is all zeros.
            _ => Some(u64::from(v3[3 * MIB..].iter().any(|&b| b != 0))),
        };
        if let Some(expect) = expect_new {
            assert_eq!(disk0(&r)["new_chunks"], expect, "version {}: {r}", n + 1);
        }
        ids.push(r["snapshot"].as_str().unwrap().to_string());
    }
    let snaps = dir.snapshots();
    for (i, v) in [&v1, &v2, &v3].into_iter().enumerate() {
        assert_eq!(snaps[i]["disks"][0]["size"], v.len() as u64);
        if i > 0 {
            assert_eq!(snaps[i]["disks"][0]["parent"].as_str(), Some(ids[i - 1].as_str()));
        }
        let out = dir.restore(&ids[i], "d", &format!("v{}.out", i + 1));
        assert_eq!(fs::metadata(&out).unwrap().len(), v.len() as u64);
        assert!(fs::read(&out).unwrap() == *v, "version {} restores bit-exact", i + 1);
    }
    dir.repo_cmd("check").arg("--read-data").ok();
}
