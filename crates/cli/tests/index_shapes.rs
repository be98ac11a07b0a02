//! Fixed-index shapes at their edges: disk sizes around chunk and index-page boundaries,
//! pages that are entirely zero (stored as no page at all), and all-zero disks with more
//! than one level. With 4 KiB chunks and 1024 ids per page, one leaf page covers 4 MiB.

mod harness;

use std::fs;

use harness::Dir;
use rand::{RngCore, SeedableRng};

const PAGE_SPAN: usize = 1024 * 4096;

#[test]
fn disks_at_chunk_and_page_boundaries_restore_bit_exact() {
    let dir = Dir::new();
    dir.repo_cmd("init").args(["--kdf-memory", "8", "--kdf-iterations", "1", "--chunk-size", "4KiB"]).ok();
    let mut rng = rand::rngs::StdRng::seed_from_u64(111);
    let mut random = |len: usize| {
        let mut v = vec![0u8; len];
        rng.fill_bytes(&mut v);
        v
    };
    let mut disks: Vec<(String, Vec<u8>)> = Vec::new();
    for size in [1, 4095, 4096, 4097, PAGE_SPAN - 1, PAGE_SPAN, PAGE_SPAN + 1, 2 * PAGE_SPAN + 3 * 4096 + 7] {
        disks.push((format!("size-{size}"), random(size)));
    }
    // A zero first page, data, a zero page, and one non-zero byte at the very end.
    let mut holes = vec![0u8; 3 * PAGE_SPAN + 100];
    holes[PAGE_SPAN..2 * PAGE_SPAN].copy_from_slice(&random(PAGE_SPAN));
    *holes.last_mut().unwrap() = 1;
    disks.push(("zero-pages".into(), holes));
    // All zeros over two levels: no page is stored at all.
    disks.push(("all-zero".into(), vec![0u8; 2 * PAGE_SPAN + 1]));
    // The same random page twice: its index page is stored once.
    let page = random(PAGE_SPAN);
    disks.push(("twice".into(), [page.clone(), page].concat()));

    let paths: Vec<_> = disks
        .iter()
        .map(|(id, data)| {
            let p = dir.join(&format!("{id}.img"));
            fs::write(&p, data).unwrap();
            (id.as_str(), p)
        })
        .collect();
    let refs: Vec<(&str, &std::path::Path)> = paths.iter().map(|(id, p)| (*id, p.as_path())).collect();
    let report = dir.backup("shapes", &refs);
    let snap = report["snapshot"].as_str().unwrap().to_string();
    for (d, (id, data)) in report["disks"].as_array().unwrap().iter().zip(&disks) {
        assert_eq!(d["id"], id.as_str());
        assert_eq!(d["size"], data.len() as u64);
        assert_eq!(d["chunk_size"], 4096);
    }
    dir.repo_cmd("check").arg("--read-data").ok();
    for (id, data) in &disks {
        let out = dir.restore(&snap, id, &format!("{id}.out"));
        assert_eq!(fs::metadata(&out).unwrap().len(), data.len() as u64, "{id}");
        assert!(fs::read(&out).unwrap() == *data, "disk {id} restores bit-exact");
    }
}
