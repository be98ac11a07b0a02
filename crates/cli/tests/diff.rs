//! `diff`: the byte ranges of each disk that differ between two restore points, from the
//! indexes alone, at chunk granularity (64 KiB), merged when adjacent.

mod harness;

use std::fs;

use harness::{assert_json_documented, mixed_image, Dir};
use serde_json::json;

#[test]
fn diff_names_exactly_the_changed_chunks() {
    let dir = Dir::new();
    dir.init();
    let cs = 65536usize;
    let mut data = mixed_image(32 * cs, 96);
    let img = dir.join("d.img");
    let other = dir.join("e.img");
    fs::write(&img, &data).unwrap();
    fs::write(&other, mixed_image(4 * cs, 97)).unwrap();
    dir.backup("v", &[("d", &img), ("e", &other)]);
    // One byte in chunk 3; chunks 10 and 11 (adjacent: one range); the last chunk.
    data[3 * cs + 17] ^= 0xff;
    data[10 * cs + 5..11 * cs + 9].iter_mut().for_each(|b| *b = b.wrapping_add(1));
    data[32 * cs - 1] ^= 1;
    fs::write(&img, &data).unwrap();
    dir.backup("v", &[("d", &img)]);

    let r = dir.repo_cmd("diff").args(["v:latest~1", "v:latest", "--json"]).json();
    assert_json_documented("diff", &r);
    let d = r["disks"].as_array().unwrap().iter().find(|d| d["id"] == "d").unwrap();
    let ranges = |v: &[(usize, usize)]| v.iter().map(|(o, l)| json!({"offset": o, "length": l})).collect::<Vec<_>>();
    assert_eq!(d["changed"], json!(ranges(&[(3 * cs, cs), (10 * cs, 2 * cs), (31 * cs, cs)])), "{r}");
    assert_eq!(d["changed_bytes"], 4 * cs);
    // Disk e is only in the first restore point: all of it differs.
    let e = r["disks"].as_array().unwrap().iter().find(|d| d["id"] == "e").unwrap();
    assert_eq!((e["size_from"].clone(), e["size_to"].clone()), (json!(4 * cs), json!(null)));
    assert_eq!(e["changed_bytes"], 4 * cs);

    let text = dir.repo_cmd("diff").args(["v:latest~1", "v:latest", "--disk", "d"]).ok();
    assert!(text.contains(&format!("{}+{}", 10 * cs, 2 * cs)) && text.contains("3 ranges"), "{text}");
    let same = dir.repo_cmd("diff").args(["v:latest", "v:latest"]).ok();
    assert!(same.contains("identical"), "{same}");
    // The disk grows by 8 chunks and 100 bytes: what was there is equal, the rest differs.
    data.extend(mixed_image(8 * cs + 100, 98));
    fs::write(&img, &data).unwrap();
    dir.backup("v", &[("d", &img)]);
    let r = dir.repo_cmd("diff").args(["v:latest~1", "v:latest", "--disk", "d", "--json"]).json();
    assert_eq!(r["disks"][0]["changed"], json!(ranges(&[(32 * cs, 8 * cs + 100)])), "{r}");
    assert_eq!(
        (r["disks"][0]["size_from"].clone(), r["disks"][0]["size_to"].clone()),
        (json!(32 * cs), json!(40 * cs + 100))
    );
    let line = dir.repo_cmd("diff").args(["v:latest~1", "v:latest", "--disk", "nope"]).fails_with_one_line(2);
    assert!(line.contains("nope"), "{line}");
}

/// Runs a tool of the test (mkfs.fat, mtools) and insists it worked.
fn tool(program: &str, args: &[&str]) {
    let out = std::process::Command::new(program).args(args).env("MTOOLS_SKIP_CHECK", "1").output().unwrap();
    assert!(out.status.success(), "{program} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// `diff --files`: the files added, removed and modified between two backups of a disk
/// holding a FAT filesystem (built and changed with mkfs.fat and mtools), in text and
/// JSON; an identical pair of snapshots opens no filesystem.
#[test]
fn diff_files_names_the_changed_files() {
    let dir = Dir::new();
    dir.init();
    let img = dir.join("fat.img");
    let image = img.to_str().unwrap();
    tool("truncate", &["-s", "16M", image]);
    tool("mkfs.fat", &["-F", "16", "-n", "DIFFTEST", image]);
    let file = |name: &str, bytes: &[u8]| {
        let p = dir.join(name);
        fs::write(&p, bytes).unwrap();
        p.to_str().unwrap().to_string()
    };
    let (keep, gone, grows) = (file("keep.txt", b"same"), file("gone.txt", b"bye"), file("grows.txt", b"short"));
    tool("mmd", &["-i", image, "::/docs"]);
    for (f, to) in [(&keep, "::/keep.txt"), (&gone, "::/docs/gone.txt"), (&grows, "::/docs/grows.txt")] {
        tool("mcopy", &["-m", "-i", image, f, to]);
    }
    dir.backup("v", &[("d", &img)]);

    let grown = file("grows2.txt", b"much longer than before");
    let new = file("new.txt", b"hello");
    tool("mcopy", &["-o", "-i", image, &grown, "::/docs/grows.txt"]);
    tool("mdel", &["-i", image, "::/docs/gone.txt"]);
    tool("mmd", &["-i", image, "::/added"]);
    tool("mcopy", &["-i", image, &new, "::/added/new.txt"]);
    dir.backup("v", &[("d", &img)]);

    let text = dir.repo_cmd("diff").args(["v:latest~1", "v:latest", "--files"]).ok();
    for line in ["+ /added\n", "+ /added/new.txt\n", "- /docs/gone.txt\n", "M /docs/grows.txt (size"] {
        assert!(text.contains(line), "{line:?} in:\n{text}");
    }
    assert!(!text.contains("keep.txt"), "an unchanged file is not listed:\n{text}");
    assert!(text.contains("disk d partition 0 (fat16): 4 changes"), "{text}");

    let r = dir.repo_cmd("diff").args(["v:latest~1", "v:latest", "--files", "--json"]).json();
    assert_json_documented("diff", &r);
    let changes = r["files"][0]["changes"].as_array().unwrap();
    let grows = changes.iter().find(|c| c["path"] == "/docs/grows.txt").unwrap();
    assert_eq!((grows["change"].as_str(), grows["kind"].as_str()), (Some("modified"), Some("file")), "{r}");
    assert!(grows["differs"].as_array().unwrap().contains(&json!("size")), "{r}");
    assert_eq!(changes.len(), 4, "{r}");

    let same = dir.repo_cmd("diff").args(["v:latest", "v:latest", "--files", "--json"]).json();
    assert_eq!(same["files"], json!([]), "{same}");
}
