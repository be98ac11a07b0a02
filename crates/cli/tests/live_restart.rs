//! A running VM's change tracking across restarts of the VM (issue 16): a VM stopped
//! cleanly and started again keeps blockproof's persistent bitmap, so the next backup is
//! an exact incremental; a VM that was killed either lost the bitmap (QEMU stores a new
//! one only when it closes the image) or left it inconsistent (in use when it died), and
//! the next backup reads the disk in full, saying why. Against a real qemu-storage-daemon holding a qcow2 disk.

mod harness;

use std::path::{Path, PathBuf};

use harness::qemu::*;
use harness::qsd::{write_via_nbd, Qsd};
use harness::{hash, Dir};
use serde_json::{json, Value};

/// The VM: a daemon with the qcow2 disk `sys` and a writable NBD export `sys` (the guest).
fn start(dir: &Dir, img: &Path) -> (Qsd, PathBuf) {
    Qsd::serving(dir, "vm", img, "sys")
}

fn backup(dir: &Dir, vm: &Qsd, nbd: &Path) -> Value {
    dir.repo_cmd("backup")
        .args(["--vm", "v", "--json", "--verify", "all"])
        .arg("--from")
        .arg(format!("qmp:{},nbd={}", vm.qmp.display(), nbd.display()))
        .arg("--state-dir")
        .arg(dir.join("state"))
        .json()
}

/// The guest's disk now, through its export.
fn truth(dir: &Dir, nbd: &Path, name: &str) -> PathBuf {
    let out = dir.join(name);
    let uri = format!("nbd+unix:///sys?socket={}", nbd.display());
    qemu("qemu-img", &["convert", "-q", "-f", "raw", "-O", "raw", &uri, s(&out)]);
    out
}

fn assert_restores(dir: &Dir, report: &Value, truth: &Path) {
    let to = dir.join("restored.raw");
    let _ = std::fs::remove_file(&to);
    dir.repo_cmd("restore").arg(report["snapshot"].as_str().unwrap()).args(["--disk", "sys", "--to"]).arg(&to).ok();
    assert_eq!(hash(&to), hash(truth), "the restore point is the disk at its view");
}

/// The named bitmaps of `sys` (a block job's own has no name): (name, inconsistent).
fn bitmaps(vm: &Qsd) -> Vec<(String, bool)> {
    let nodes = vm.qmp("query-named-block-nodes", json!({"flat": true})).unwrap();
    let n = nodes.as_array().unwrap().iter().find(|n| n["node-name"] == "sys").unwrap().clone();
    n["dirty-bitmaps"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|b| Some((b["name"].as_str()?.to_string(), b["inconsistent"].as_bool().unwrap_or(false))))
        .collect()
}

#[test]
fn a_restarted_vm_keeps_its_bitmap_and_a_killed_one_means_a_full_read_with_the_reason() {
    let dir = Dir::new();
    dir.init();
    let img = qcow2(&dir, "sys", 8 << 20, 21);
    let (vm, nbd) = start(&dir, &img);
    let r0 = backup(&dir, &vm, &nbd);
    assert_eq!(r0["disks"][0]["mode"], "full", "{r0}");

    // Written, then the VM stopped cleanly and started again: the bitmap was stored in
    // the image and still counts every write since the restore point.
    let written = write_via_nbd(&nbd, "sys", &scattered(8 << 20, 6, 22));
    vm.quit();
    let (vm, nbd) = start(&dir, &img);
    assert_eq!(bitmaps(&vm).len(), 1, "the vm's bitmap persisted: {:?}", bitmaps(&vm));
    let t1 = truth(&dir, &nbd, "t1.raw");
    let r1 = backup(&dir, &vm, &nbd);
    let d1 = &r1["disks"][0];
    assert_eq!(d1["mode"], "incremental", "{r1}");
    assert_eq!(d1["cbt_reported_chunks"], written.len() as u64, "{d1}");
    assert!(d1["mismatches"].as_array().unwrap().is_empty(), "{d1}");
    assert_restores(&dir, &r1, &t1);

    // Killed right after that backup: QEMU stores a new bitmap in the image only when it
    // closes it, so the bitmap that run started is gone (and the one before it was
    // removed at the commit): a full read, saying the bitmap is missing.
    write_via_nbd(&nbd, "sys", &scattered(8 << 20, 3, 23));
    drop(vm);
    let (vm, nbd) = start(&dir, &img);
    assert_eq!(bitmaps(&vm), [], "no bitmap survived the kill");
    let t2 = truth(&dir, &nbd, "t2.raw");
    let r2 = backup(&dir, &vm, &nbd);
    let d2 = &r2["disks"][0];
    assert_eq!(d2["mode"], "full", "{r2}");
    let why = d2["full_reason"].as_str().unwrap();
    assert!(why.contains("missing"), "{why}");
    assert_restores(&dir, &r2, &t2);

    // Stopped cleanly (the bitmap stored), started again (QEMU marks it in use in the
    // image), written and killed: the bitmap comes back inconsistent — it may have missed
    // writes — and is not trusted: a full read, and the reason.
    vm.quit();
    let (vm, nbd) = start(&dir, &img);
    write_via_nbd(&nbd, "sys", &scattered(8 << 20, 3, 25));
    drop(vm);
    let (vm, nbd) = start(&dir, &img);
    let b = bitmaps(&vm);
    assert!(b.len() == 1 && b[0].1, "the bitmap is inconsistent after the kill: {b:?}");
    let t3 = truth(&dir, &nbd, "t3.raw");
    let r3 = backup(&dir, &vm, &nbd);
    let d3 = &r3["disks"][0];
    assert_eq!(d3["mode"], "full", "{r3}");
    let why = d3["full_reason"].as_str().unwrap();
    assert!(why.contains("inconsistent"), "{why}");
    assert_restores(&dir, &r3, &t3);
    // The inconsistent bitmap is replaced by a new one; the next run is incremental again.
    let b = bitmaps(&vm);
    assert!(b.len() == 1 && !b[0].1, "one consistent bitmap, the new one: {b:?}");
    write_via_nbd(&nbd, "sys", &scattered(8 << 20, 2, 24));
    let t4 = truth(&dir, &nbd, "t4.raw");
    let r4 = backup(&dir, &vm, &nbd);
    assert_eq!(r4["disks"][0]["mode"], "incremental", "{r4}");
    assert_restores(&dir, &r4, &t4);
    let left: Vec<_> = std::fs::read_dir(dir.join("state")).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert!(left.is_empty(), "nothing left in the state directory: {left:?}");
    dir.check_all();
}

/// A raw disk keeps no persistent bitmap: after the VM process restarts, its bitmap is
/// gone and the next backup reads it in full, saying so — never skipped, never trusted.
#[test]
fn a_raw_disk_of_a_restarted_vm_is_read_in_full_with_the_reason() {
    let dir = Dir::new();
    dir.init();
    let img = dir.image("data.raw", 4 << 20, 26);
    let nbd = dir.join("vm.nbd");
    let args = [
        "--blockdev".to_string(),
        format!("driver=file,filename={},node-name=data-file", img.display()),
        "--blockdev".into(),
        "driver=raw,file=data-file,node-name=data".into(),
        "--nbd-server".into(),
        format!("addr.type=unix,addr.path={}", nbd.display()),
        "--export".into(),
        "type=nbd,id=w,node-name=data,name=data,writable=on".into(),
    ];
    let run = |vm: &Qsd| -> Value {
        dir.repo_cmd("backup")
            .args(["--vm", "v", "--json"])
            .arg("--from")
            .arg(format!("qmp:{},nbd={}", vm.qmp.display(), nbd.display()))
            .arg("--state-dir")
            .arg(dir.join("state"))
            .json()
    };
    let vm = Qsd::start(&dir, "vm", &args);
    assert_eq!(run(&vm)["disks"][0]["mode"], "full");
    write_via_nbd(&nbd, "data", &scattered(4 << 20, 2, 27));
    assert_eq!(run(&vm)["disks"][0]["mode"], "incremental", "the process kept its bitmap");
    write_via_nbd(&nbd, "data", &scattered(4 << 20, 2, 28));
    vm.quit();
    let vm = Qsd::start(&dir, "vm", &args);
    let r = run(&vm);
    let d = &r["disks"][0];
    assert_eq!(d["mode"], "full", "{r}");
    let why = d["full_reason"].as_str().unwrap();
    assert!(why.contains("keeps no persistent bitmap"), "{why}");
    let to = dir.join("restored.raw");
    dir.repo_cmd("restore").arg(r["snapshot"].as_str().unwrap()).args(["--disk", "data", "--to"]).arg(&to).ok();
    drop(vm);
    assert_eq!(hash(&to), hash(&img), "the restore point is the disk");
}
