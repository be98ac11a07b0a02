//! Changed-block tracking against the real qemu tools (qemu-img, qemu-io, qemu-nbd):
//! dirty bitmaps exported by qemu-nbd, blockproof's own `bitmap:auto` rotation in a qcow2
//! image, VMware-style change lists, the fallbacks to a full read, disk identity across
//! reordered disks and exports, and qemu-nbd never outliving blockproof.

mod harness;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use harness::qemu::*;
use harness::{mixed_image, Dir};

/// `bitmap:NAME` on a qcow2 path: only the dirty chunks are read, and the incremental
/// restores to exactly what `qemu-img convert -O raw` makes of the image.
#[test]
fn named_bitmap_reads_only_dirty_chunks() {
    let dir = Dir::new();
    dir.init();
    let size = 8 << 20;
    let img = qcow2(&dir, "d", size, 1);
    let full = backup(&dir, "vm", &[format!("id=d,source={}", img.display())]);
    assert_eq!(disk(&full, "d")["mode"], "full");
    let before = raw_of(&dir, &img, "before.raw");
    qemu("qemu-img", &["bitmap", "--add", s(&img), "nightly"]);
    let dirty = qemu_io_writes(&img, &scattered(size as u64, 12, 7));

    let r = backup(&dir, "vm", &[format!("id=d,source={},cbt=bitmap:nightly", img.display())]);
    let d = disk(&r, "d");
    assert_eq!(d["mode"], "incremental", "{d}");
    assert_eq!(d["cbt_reported_chunks"], dirty.len() as u64);
    assert!(d["bytes_read"].as_u64().unwrap() <= dirty.len() as u64 * CHUNK, "{d}");
    assert_eq!(d["parent"], full["snapshot"]);
    assert_restores(&dir, &r["snapshot"], "d", &raw_of(&dir, &img, "now.raw"));
    assert_restores(&dir, &full["snapshot"], "d", &before);
    assert_no_qemu_nbd_for(&dir);

    // A backup failing after the image's qemu-nbd started stops it too.
    let mut c = dir.repo_cmd("backup");
    c.args(["--vm", "vm", "--disk"]).arg(format!("id=d,source={}", img.display()));
    c.args(["--disk", "id=e,source=/no/such/disk.img"]);
    c.fails_with_one_line(1);
    assert_no_qemu_nbd_for(&dir);
}

/// `bitmap:auto` over five rounds of writes: every round reads only what changed, every
/// restore point restores bit-exact, and the image ends with exactly one blockproof bitmap.
#[test]
fn auto_bitmap_rotation_over_five_rounds() {
    let dir = Dir::new();
    dir.init();
    let size = 8 << 20;
    let img = qcow2(&dir, "d", size, 2);
    let spec = [format!("id=d,source={},cbt=bitmap:auto", img.display())];
    let first = backup(&dir, "vm", &spec);
    let d = disk(&first, "d");
    assert_eq!(d["mode"], "full");
    assert!(d["full_reason"].as_str().unwrap().contains("no earlier restore point"), "{d}");
    let mut points = vec![(first["snapshot"].clone(), raw_of(&dir, &img, "round0.raw"))];
    for round in 1..=5u64 {
        let dirty = qemu_io_writes(&img, &scattered(size as u64, 6 + round as usize, round));
        let r = backup(&dir, "vm", &spec);
        let d = disk(&r, "d");
        assert_eq!(d["mode"], "incremental", "round {round}: {d}");
        assert_eq!(d["cbt_reported_chunks"], dirty.len() as u64, "round {round}");
        assert!(d["bytes_read"].as_u64().unwrap() <= dirty.len() as u64 * CHUNK, "round {round}: {d}");
        points.push((r["snapshot"].clone(), raw_of(&dir, &img, &format!("round{round}.raw"))));
        let ours: Vec<_> = bitmaps(&img).into_iter().filter(|(n, _)| n.starts_with("blockproof/")).collect();
        assert_eq!(ours.len(), 1, "round {round}: {ours:?}");
    }
    for (snap, raw) in &points {
        assert_restores(&dir, snap, "d", raw);
    }
    assert_no_qemu_nbd_for(&dir);
}

/// An `in-use` bitmap (qemu-io killed with the image open), a missing bitmap and a grown
/// disk each give a full read with the reason, never an error or a silent incremental;
/// `bitmap:auto` recovers its rotation after each.
#[test]
fn untrustworthy_bitmaps_and_grown_disks_mean_a_full_read() {
    let dir = Dir::new();
    dir.init();
    let size = 4 << 20;
    let img = qcow2(&dir, "d", size, 3);
    let auto = [format!("id=d,source={},cbt=bitmap:auto", img.display())];
    backup(&dir, "vm", &auto);

    // qemu-io dies (SIGKILL) with the image open: the recording bitmap is left in-use.
    let out =
        Command::new("qemu-io").args(["-f", "qcow2", "-c", "write -P 9 0 64k", "-c", "sigraise 9", s(&img)]).output();
    assert!(!out.unwrap().status.success());
    assert!(bitmaps(&img).iter().any(|(_, f)| f.iter().any(|f| f == "in-use")), "{:?}", bitmaps(&img));
    let r = backup(&dir, "vm", &auto);
    let d = disk(&r, "d");
    assert_eq!(d["mode"], "full");
    assert!(d["full_reason"].as_str().unwrap().contains("inconsistent"), "{d}");
    assert_restores(&dir, &r["snapshot"], "d", &raw_of(&dir, &img, "a.raw"));
    assert_eq!(bitmaps(&img).len(), 1, "{:?}", bitmaps(&img));

    // Someone removed blockproof's bitmap.
    let name = bitmaps(&img)[0].0.clone();
    qemu("qemu-img", &["bitmap", "--remove", s(&img), &name]);
    qemu_io_writes(&img, &[(CHUNK * 5, 4096, 7)]);
    let r = backup(&dir, "vm", &auto);
    let d = disk(&r, "d");
    assert_eq!(d["mode"], "full");
    assert!(d["full_reason"].as_str().unwrap().contains("missing"), "{d}");
    assert_restores(&dir, &r["snapshot"], "d", &raw_of(&dir, &img, "b.raw"));

    // Back in rotation: the next run is incremental again.
    qemu_io_writes(&img, &[(CHUNK * 7, 4096, 8)]);
    let r = backup(&dir, "vm", &auto);
    assert_eq!(disk(&r, "d")["mode"], "incremental", "{r}");
    assert_eq!(disk(&r, "d")["bytes_read"], CHUNK);

    // The disk grows: a full read that says so; the restore has the new size.
    qemu("qemu-img", &["resize", "-q", s(&img), &(size as u64 + 3 * CHUNK).to_string()]);
    let r = backup(&dir, "vm", &auto);
    let d = disk(&r, "d");
    assert_eq!(d["mode"], "full");
    assert!(d["full_reason"].as_str().unwrap().contains("size changed"), "{d}");
    assert_restores(&dir, &r["snapshot"], "d", &raw_of(&dir, &img, "c.raw"));

    // bitmap:NAME naming a bitmap the image does not have.
    let r = backup(&dir, "vm", &[format!("id=d,source={},cbt=bitmap:nope", img.display())]);
    let d = disk(&r, "d");
    assert_eq!(d["mode"], "full");
    assert!(d["full_reason"].as_str().unwrap().contains("no bitmap \"nope\""), "{d}");
    assert_no_qemu_nbd_for(&dir);
}

/// A VMware-style change list for a raw image: an honest list gives an exact incremental.
#[test]
fn change_list_incremental_of_a_raw_image() {
    let dir = Dir::new();
    dir.init();
    let size = 6 << 20;
    let img = dir.join("d.img");
    let mut data = mixed_image(size, 4);
    std::fs::write(&img, &data).unwrap();
    let spec = |cbt: &str| [format!("id=d,source={},cbt={cbt}", img.display())];
    backup(&dir, "vm", &spec("none"));
    let writes = scattered(size as u64, 10, 9);
    let mut areas = Vec::new();
    let mut chunks = BTreeSet::new();
    for &(off, len, pat) in &writes {
        data[off as usize..(off + len) as usize].fill(pat);
        areas.push(serde_json::json!({"start": off, "length": len}));
        chunks.extend(off / CHUNK..(off + len).div_ceil(CHUNK));
    }
    std::fs::write(&img, &data).unwrap();
    let list = dir.join("changes.json");
    let json = serde_json::json!({"startOffset": 0, "length": size, "changedArea": areas});
    std::fs::write(&list, json.to_string()).unwrap();
    let r = backup(&dir, "vm", &spec(&format!("changes:{}", list.display())));
    let d = disk(&r, "d");
    assert_eq!(d["mode"], "incremental", "{d}");
    assert_eq!(d["cbt_reported_chunks"], chunks.len() as u64);
    assert_eq!(d["bytes_read"], chunks.len() as u64 * CHUNK);
    assert_restores(&dir, &r["snapshot"], "d", &img);

    // A malformed list is a usage error naming the file.
    std::fs::write(&list, b"{\"startOffset\": 0, \"length\": 10, \"changedArea\": [{\"start\": 9, \"length\": 5}]}")
        .unwrap();
    let mut c = dir.repo_cmd("backup");
    c.args(["--vm", "vm", "--disk", &spec(&format!("changes:{}", list.display()))[0]]);
    let line = c.fails_with_one_line(2);
    assert!(line.contains("changes.json") && line.contains("outside"), "{line}");
}

/// A qemu-nbd serving `img` as export `name` on a unix socket, for the test's lifetime.
struct Export(std::process::Child, PathBuf);

impl Export {
    fn start(dir: &Dir, img: &Path, name: &str, bitmap: Option<&str>) -> Export {
        let sock = dir.join(&format!("{name}.sock"));
        let mut c = Command::new("qemu-nbd");
        c.args(["--read-only", "--persistent", "--shared=4", "-f", "qcow2", "-x", name, "-k", s(&sock)]);
        if let Some(b) = bitmap {
            c.args(["-B", b]);
        }
        let child = c.arg(img).spawn().unwrap();
        for _ in 0..500 {
            if std::os::unix::net::UnixStream::connect(&sock).is_ok() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        Export(child, sock)
    }

    fn uri(&self, name: &str) -> String {
        format!("nbd+unix:///{name}?socket={}", self.1.display())
    }
}

impl Drop for Export {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Disks are found by id, never by position: swapping the `--disk` arguments and the NBD
/// exports between runs changes nothing, and both disks restore bit-exact.
#[test]
fn disk_identity_survives_reordered_disks_and_exports() {
    let dir = Dir::new();
    dir.init();
    let size = 4 << 20;
    let a = qcow2(&dir, "a", size, 5);
    let b = qcow2(&dir, "b", size, 6);
    let first = {
        let (ea, eb) = (Export::start(&dir, &a, "e0", None), Export::start(&dir, &b, "e1", None));
        backup(&dir, "vm", &[format!("id=sys,source={}", ea.uri("e0")), format!("id=data,source={}", eb.uri("e1"))])
    };
    for img in [&a, &b] {
        qemu("qemu-img", &["bitmap", "--add", s(img), "inc"]);
    }
    let dirty_a = qemu_io_writes(&a, &scattered(size as u64, 5, 11));
    let dirty_b = qemu_io_writes(&b, &scattered(size as u64, 9, 12));
    // Now the export names are swapped, and so is the order of the disks.
    let (eb, ea) = (Export::start(&dir, &b, "e0", Some("inc")), Export::start(&dir, &a, "e1", Some("inc")));
    let r = backup(
        &dir,
        "vm",
        &[
            format!("id=data,source={},cbt=bitmap:inc", eb.uri("e0")),
            format!("id=sys,source={},cbt=bitmap:inc", ea.uri("e1")),
        ],
    );
    drop((ea, eb));
    for (id, dirty, img) in [("sys", &dirty_a, &a), ("data", &dirty_b, &b)] {
        let d = disk(&r, id);
        assert_eq!(d["mode"], "incremental", "{d}");
        assert_eq!(d["cbt_reported_chunks"], dirty.len() as u64, "{id}");
        assert_eq!(d["parent"], first["snapshot"]);
        assert_restores(&dir, &r["snapshot"], id, &raw_of(&dir, img, &format!("{id}.raw")));
    }
}

/// Interrupted with SIGINT or SIGTERM while reading, blockproof leaves no qemu-nbd behind.
#[test]
fn qemu_nbd_stops_when_blockproof_is_interrupted() {
    for signal in ["INT", "TERM", "KILL"] {
        let dir = Dir::new();
        dir.init();
        let img = qcow2(&dir, "big", 256 << 20, 8);
        let mut c = dir.repo_cmd("backup");
        c.args(["--vm", "vm", "--disk"]).arg(format!("id=d,source={}", img.display()));
        let mut child = c.spawn();
        // Wait until its qemu-nbd is up, then interrupt blockproof alone.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while qemu_nbd_for(&dir).is_empty() {
            assert!(std::time::Instant::now() < deadline, "qemu-nbd never started");
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        Command::new("kill").args([&format!("-{signal}"), &child.id().to_string()]).status().unwrap();
        let status = child.wait().unwrap();
        assert!(!status.success(), "SIG{signal}: blockproof finished before the signal; use a larger image");
        assert_no_qemu_nbd_for(&dir);
    }
}
