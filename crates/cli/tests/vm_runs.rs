//! One run per vm (issue 16 item 9): two overlapping backups of a vm never both commit;
//! `bitmap:auto` bitmaps belong to a vm and a disk id, so one image backed up under two
//! vm names keeps both rotations; an image a running VM holds is refused with advice.

mod harness;

use harness::wait_for;

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use harness::qemu::*;
use harness::qsd::Qsd;
use harness::{hash, snap_id, Dir};
use serde_json::Value;

/// Starts a backup of `img` as `vm` that pauses before its commit until `gate` exists.
fn paused_backup(dir: &Dir, vm: &str, img: &Path, gate: &Path) -> std::process::Child {
    let mut c = dir.backup_cmd(vm, &[("d", img)]);
    c.env("BLOCKPROOF_PAUSE_BEFORE_COMMIT", gate.to_str().unwrap());
    let child = c.spawn_piped();
    wait_for(&PathBuf::from(format!("{}.waiting", gate.display())));
    child
}

fn finished(child: std::process::Child) -> Value {
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// While a backup of vm `v` runs, a second backup of `v` refuses with one line naming
/// it (nothing committed), a backup of another vm runs, and a backup of `v` given
/// `--lock-wait` waits and then commits on top of the first.
#[test]
fn two_backups_of_one_vm_never_both_commit() {
    let dir = Dir::new();
    dir.init();
    let img = dir.image("d.img", 4 << 20, 1);
    let gate = dir.join("go");
    let first = paused_backup(&dir, "v", &img, &gate);

    let line = dir.backup_cmd("v", &[("d", &img)]).fails_with_one_line(1);
    assert!(line.contains("vm v is already being backed up"), "{line}");
    assert!(line.contains(&format!("pid {}", first.id())), "it names the running backup: {line}");
    assert!(line.contains("--lock-wait"), "{line}");
    assert!(dir.snapshots().is_empty(), "the refused backup committed nothing");
    // Another vm is not held up.
    let other = dir.backup("w", &[("d", &img)]);
    assert_eq!(other["vm"], "w");

    let mut waiter = dir.backup_cmd("v", &[("d", &img)]);
    let waiter = waiter.args(["--lock-wait", "120"]).spawn_piped();
    std::thread::sleep(Duration::from_millis(300));
    assert!(dir.snapshots().iter().all(|s| s["vm"] != "v"), "nothing of v is committed while the first waits");
    fs::write(&gate, b"").unwrap();
    let a = finished(first);
    let b = finished(waiter);
    let of_v: Vec<_> = dir.snapshots().into_iter().filter(|s| s["vm"] == "v").collect();
    assert_eq!(of_v.len(), 2, "{of_v:?}");
    assert_ne!(snap_id(&a), snap_id(&b));
    assert_eq!(hash(&dir.restore(&snap_id(&b), "d", "b.img")), hash(&img));
    assert!(harness::files(&dir.repo().join("locks")).is_empty(), "every lock is released");
}

/// The same qcow2 image backed up as vm `a` and as vm `b` with `bitmap:auto`: each vm
/// keeps its own bitmap, so both stay exact incrementals, and every restore point
/// restores to the image at its time.
#[test]
fn one_image_under_two_vm_names_keeps_both_bitmaps() {
    let dir = Dir::new();
    dir.init();
    let size = 8 << 20;
    let img = qcow2(&dir, "d", size, 3);
    let spec = [format!("id=d,source={},cbt=bitmap:auto", img.display())];
    backup(&dir, "a", &spec);
    backup(&dir, "b", &spec);
    for round in 1..=2u64 {
        let dirty = qemu_io_writes(&img, &scattered(size as u64, 8, round));
        let truth = raw_of(&dir, &img, &format!("round{round}.raw"));
        for vm in ["a", "b"] {
            let r = backup(&dir, vm, &spec);
            let d = disk(&r, "d");
            assert_eq!(d["mode"], "incremental", "round {round}, vm {vm}: {d}");
            assert_eq!(d["cbt_reported_chunks"], dirty.len() as u64, "round {round}, vm {vm}");
            assert_restores(&dir, &r["snapshot"], "d", &truth);
        }
    }
    let names: Vec<String> = bitmaps(&img).into_iter().map(|(n, _)| n).collect();
    assert_eq!(names.len(), 2, "one bitmap per vm: {names:?}");
    assert!(
        names.iter().any(|n| n.starts_with("blockproof/a/d/"))
            && names.iter().any(|n| n.starts_with("blockproof/b/d/"))
    );
    assert_no_qemu_nbd_for(&dir);
}

/// An image a running qemu holds (here a qemu-storage-daemon with the image open for
/// writing) is never opened: the backup fails with one line that says the image is in
/// use and how to back a running VM up — for a plain image and for `bitmap:auto`.
#[test]
fn an_image_held_by_a_running_vm_is_refused_with_advice() {
    let dir = Dir::new();
    dir.init();
    let img = qcow2(&dir, "d", 4 << 20, 4);
    let before = hash(&img);
    let (vm, _nbd) = Qsd::serving(&dir, "vm", &img, "disk0");
    for cbt in ["none", "bitmap:auto"] {
        let mut c = dir.repo_cmd("backup");
        c.args(["--vm", "v", "--disk"]).arg(format!("id=d,source={},cbt={cbt}", img.display()));
        let line = c.fails_with_one_line(1);
        assert!(line.contains("is in use by a running VM"), "{cbt}: {line}");
        assert!(line.contains("Failed to get shared \"write\" lock"), "{cbt}: {line}");
        assert!(
            line.contains("--from qmp:SOCKET") && line.contains("NBD export of a point-in-time view"),
            "{cbt}: {line}"
        );
    }
    assert!(vm.qmp("query-block-exports", serde_json::json!({})).is_ok(), "the VM still runs");
    drop(vm);
    assert_eq!(hash(&img), before, "the image was not touched");
    assert!(dir.snapshots().is_empty());
    assert_no_qemu_nbd_for(&dir);
}

/// QEMU refuses node names longer than 31 characters, and libvirt names its nodes like
/// `libvirt-1-format`: the view's overlay node must fit whatever the disk's node name
/// (`blockproof-fleece-libvirt-1-format` did not: "Node name too long").
#[test]
fn a_disk_with_a_long_node_name_is_backed_up_from_a_view() {
    let dir = Dir::new();
    dir.init();
    let img = qcow2(&dir, "d", 4 << 20, 5);
    // 26 characters: the harness names the file node under it `<node>-file` (31).
    let node = "libvirt-1-format-long-disk";
    let (vm, nbd) = Qsd::serving(&dir, "vm", &img, node);
    let from = format!("qmp:{},nbd={}", vm.qmp.display(), nbd.display());
    let report = dir
        .repo_cmd("backup")
        .args(["--vm", "v", "--json", "--from", &from, "--state-dir"])
        .arg(dir.join("state"))
        .json();
    assert_eq!(report["disks"][0]["id"], node, "{report}");
    assert_eq!(report["consistency"], "crash", "no guest agent: {report}");
    let to = dir.join("restored.raw");
    dir.repo_cmd("restore").args(["v:latest", "--disk", node, "--to"]).arg(&to).ok();
    let truth = dir.join("truth.raw");
    drop(vm);
    qemu("qemu-img", &["convert", "-q", "-f", "qcow2", "-O", "raw", s(&img), s(&truth)]);
    assert_eq!(hash(&to), hash(&truth));
}
