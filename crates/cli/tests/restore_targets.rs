//! Restore beyond a whole raw file: a partial range, a qcow2 image (zero chunks left
//! unallocated, a partial range, targets it must not replace), and a tainted snapshot that
//! restores with a warning naming the suspect ranges.

mod harness;

use std::fs;

use harness::qemu::qemu;
use harness::{hash, mixed_image, Dir};

#[test]
fn partial_range_is_written_at_its_offset() {
    let dir = Dir::new();
    dir.init();
    let img = dir.join("d.img");
    let data = mixed_image(4 << 20, 41);
    fs::write(&img, &data).unwrap();
    let r = dir.backup("v", &[("d", &img)]);
    let snap = r["snapshot"].as_str().unwrap();
    let out = dir.join("part.img");
    // 1 MiB + 100 bytes starting inside a chunk.
    let (off, len) = (3 * 65536 + 1000, (1 << 20) + 100);
    dir.repo_cmd("restore")
        .arg(snap)
        .args(["--disk", "d", "--offset", &off.to_string(), "--length", &len.to_string(), "--to"])
        .arg(&out)
        .ok();
    let got = fs::read(&out).unwrap();
    assert_eq!(got.len(), data.len(), "the target has the disk's size");
    assert_eq!(&got[off..off + len], &data[off..off + len]);
    assert!(got[..off].iter().all(|&b| b == 0) && got[off + len..].iter().all(|&b| b == 0), "outside the range: holes");
    let line = dir
        .repo_cmd("restore")
        .arg(snap)
        .args(["--disk", "d", "--offset", "4MiB", "--length", "1", "--to"])
        .arg(dir.join("x"))
        .fails_with_one_line(2);
    assert!(line.contains("not inside"), "{line}");
}

#[test]
fn qcow2_target_converts_with_qemu_img() {
    let dir = Dir::new();
    dir.init();
    let img = dir.join("d.img");
    fs::write(&img, mixed_image(6 << 20, 42)).unwrap();
    let r = dir.backup("v", &[("d", &img)]);
    let out = dir.join("restored.qcow2");
    dir.repo_cmd("restore")
        .arg(r["snapshot"].as_str().unwrap())
        .args(["--disk", "d", "--format", "qcow2", "--to"])
        .arg(&out)
        .ok();
    let info = qemu("qemu-img", &["info", "--output=json", out.to_str().unwrap()]);
    assert!(info.contains("\"format\": \"qcow2\""), "{info}");
    let raw = dir.join("back.raw");
    qemu("qemu-img", &["convert", "-O", "raw", out.to_str().unwrap(), raw.to_str().unwrap()]);
    assert_eq!(hash(&raw), hash(&img));
    // Nothing temporary is left next to the target.
    let leftovers: Vec<_> = fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    // The format follows the target's name unless given: `data.qcow2` is a qcow2 image
    // (it used to be raw bytes under a qcow2 name), `--format raw` keeps raw.
    let named = dir.join("data.qcow2");
    dir.repo_cmd("restore").arg(r["snapshot"].as_str().unwrap()).args(["--disk", "d", "--to"]).arg(&named).ok();
    let info = qemu("qemu-img", &["info", "--output=json", named.to_str().unwrap()]);
    assert!(info.contains("\"format\": \"qcow2\""), "{info}");
    let forced = dir.join("raw.qcow2");
    let mut c = dir.repo_cmd("restore");
    c.arg(r["snapshot"].as_str().unwrap()).args(["--disk", "d", "--format", "raw", "--to"]).arg(&forced).ok();
    assert_eq!(hash(&forced), hash(&img));
}

#[test]
fn tainted_snapshot_restores_with_a_warning() {
    let dir = Dir::new();
    dir.init();
    let img = dir.join("d.img");
    let mut data = mixed_image(2 << 20, 43);
    fs::write(&img, &data).unwrap();
    let empty = dir.join("empty.json");
    fs::write(&empty, format!("{{\"startOffset\": 0, \"length\": {}, \"changedArea\": []}}", 2 << 20)).unwrap();
    let spec = format!("id=d,source={},cbt=changes:{}", img.display(), empty.display());
    dir.repo_cmd("backup").args(["--vm", "v", "--disk", &spec]).ok();
    data[0] ^= 0xff; // an unreported change in the always-verified first chunk
    fs::write(&img, &data).unwrap();
    let out = dir.repo_cmd("backup").args(["--vm", "v", "--json", "--disk", &spec]).output();
    assert_eq!(out.status.code(), Some(3));
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let restored = dir.join("t.img");
    let res = dir
        .repo_cmd("restore")
        .arg(r["snapshot"].as_str().unwrap())
        .args(["--disk", "d", "--to"])
        .arg(&restored)
        .output();
    assert!(res.status.success());
    let stderr = String::from_utf8_lossy(&res.stderr);
    assert!(stderr.contains("tainted") && stderr.contains("0+512"), "{stderr}");
}

/// qcow2 restores leave zero chunks unallocated, take a partial range, refuse to replace
/// what they must not, and replace a file with `--force`.
#[test]
fn qcow2_target_is_sparse_partial_and_careful() {
    let dir = Dir::new();
    dir.init();
    let img = dir.join("d.img");
    let data = mixed_image(8 << 20, 44);
    fs::write(&img, &data).unwrap();
    let r = dir.backup("v", &[("d", &img)]);
    let snap = r["snapshot"].as_str().unwrap();
    let out = dir.join("r.qcow2");
    let restore = |extra: &[&str]| {
        let mut c = dir.repo_cmd("restore");
        c.arg(snap).args(["--disk", "d", "--format", "qcow2", "--json"]).args(extra).arg("--to").arg(&out);
        c
    };
    restore(&[]).ok();
    // Every zero MiB of the source is unallocated in the qcow2 (qemu-img map: data false).
    let map: serde_json::Value =
        serde_json::from_str(&qemu("qemu-img", &["map", "--output=json", out.to_str().unwrap()])).unwrap();
    let allocated = |pos: u64| {
        map.as_array().unwrap().iter().any(|e| {
            let (start, len) = (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap());
            e["data"] == true && start <= pos && pos < start + len
        })
    };
    let zero_mibs: Vec<u64> =
        (0..8u64).filter(|m| data[(*m as usize) << 20..][..1 << 20].iter().all(|&b| b == 0)).collect();
    assert!(!zero_mibs.is_empty(), "the image has zero MiBs");
    for m in 0..8u64 {
        assert_eq!(allocated((m << 20) + 4096), !zero_mibs.contains(&m), "MiB {m}: {map}");
    }

    // It exists now: refused without --force (nothing changed), replaced with it.
    let before = hash(&out);
    let line = restore(&[]).fails_with_one_line(2);
    assert!(line.contains("--force"), "{line}");
    assert_eq!(hash(&out), before);
    let report: serde_json::Value =
        serde_json::from_str(&restore(&["--force", "--offset", "1MiB", "--length", "64KiB"]).ok()).unwrap();
    assert_eq!((report["format"].as_str(), report["range"][0].as_u64()), (Some("qcow2"), Some(1 << 20)));
    let raw = dir.join("part.raw");
    qemu("qemu-img", &["convert", "-O", "raw", out.to_str().unwrap(), raw.to_str().unwrap()]);
    let got = fs::read(&raw).unwrap();
    assert_eq!(got.len(), data.len());
    assert_eq!(&got[1 << 20..(1 << 20) + 65536], &data[1 << 20..(1 << 20) + 65536]);
    assert!(got[..1 << 20].iter().chain(&got[(1 << 20) + 65536..]).all(|&b| b == 0));

    // A directory (or a device) is never a qcow2 target, --force or not.
    let d = dir.join("adir");
    fs::create_dir(&d).unwrap();
    let line = dir
        .repo_cmd("restore")
        .arg(snap)
        .args(["--disk", "d", "--format", "qcow2", "--force", "--to"])
        .arg(&d)
        .fails_with_one_line(2);
    assert!(line.contains("not a regular file"), "{line}");
    assert!(d.is_dir());
}

/// A whole vm in one command: without `--disk`, every disk of the snapshot goes into the
/// directory `--to` as `DISK.raw` (or `DISK.qcow2`). One disk that cannot be written fails
/// the command with one line, and the files it created for the other disks are gone again.
#[test]
fn a_whole_vm_restores_into_a_directory_all_or_nothing() {
    let dir = Dir::new();
    dir.init();
    let (os, data) = (dir.join("os.img"), dir.join("data.img"));
    fs::write(&os, mixed_image(3 << 20, 43)).unwrap();
    fs::write(&data, mixed_image(2 << 20, 44)).unwrap();
    dir.backup("v", &[("os", &os), ("data", &data)]);

    let to = dir.join("vm");
    let r = dir.repo_cmd("restore").args(["v:latest", "--json", "--to"]).arg(&to).json();
    assert_eq!(r["vm"], "v");
    assert_eq!(r["disks"].as_array().unwrap().len(), 2, "{r}");
    harness::assert_json_documented("restore", &r);
    assert_eq!(hash(&to.join("os.raw")), hash(&os));
    assert_eq!(hash(&to.join("data.raw")), hash(&data));

    let q = dir.join("vm-qcow2");
    let text = dir.repo_cmd("restore").args(["v:latest", "--format", "qcow2", "--to"]).arg(&q).ok();
    assert!(text.contains("restored 2 disks of vm v into"), "{text}");
    for (id, src) in [("os", &os), ("data", &data)] {
        let raw = dir.join(&format!("{id}.back"));
        let image = q.join(format!("{id}.qcow2"));
        qemu("qemu-img", &["convert", "-f", "qcow2", "-O", "raw", image.to_str().unwrap(), raw.to_str().unwrap()]);
        assert_eq!(hash(&raw), hash(src), "{id}");
    }

    // data.raw exists already (without --force, a usage error as for one disk): the
    // restore fails on it and takes os.raw back out.
    let again = dir.join("again");
    fs::create_dir(&again).unwrap();
    fs::write(again.join("data.raw"), b"keep me").unwrap();
    let line = dir.repo_cmd("restore").args(["v:latest", "--to"]).arg(&again).fails_with_one_line(2);
    assert!(line.contains("data.raw") && line.contains("disk data"), "{line}");
    let left: Vec<String> =
        fs::read_dir(&again).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert_eq!(left, ["data.raw"], "only the file that was there before");
    assert_eq!(fs::read(again.join("data.raw")).unwrap(), b"keep me");

    // A file is not a directory; a range or a patch needs one disk.
    let line = dir.repo_cmd("restore").args(["v:latest", "--to"]).arg(&os).fails_with_one_line(2);
    assert!(line.contains("is not a directory"), "{line}");
    let line = dir
        .repo_cmd("restore")
        .args(["v:latest", "--offset", "0", "--length", "1", "--to"])
        .arg(&to)
        .fails_with_one_line(2);
    assert!(line.contains("--disk"), "{line}");
}
