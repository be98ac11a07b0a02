//! A source that changes while it is read (issue 16 item 5): a live disk exported by
//! qemu-storage-daemon without a point-in-time view, written through the daemon's block
//! layer during the backup, is reported as "source changed / not a point-in-time view",
//! never as a lie of change tracking.

mod harness;

use harness::wait_for;

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};

use harness::qemu::*;
use harness::qsd::{write_via_nbd, Qsd};
use harness::Dir;
use serde_json::{json, Value};

#[test]
fn a_live_export_written_during_the_backup_is_a_changing_source_not_a_cbt_lie() {
    let dir = Dir::new();
    dir.init();
    let size = 64u64 << 20;
    let img = qcow2(&dir, "d", size as usize, 5);
    let (vm, nbd) = Qsd::serving(&dir, "vm", &img, "disk0");
    vm.qmp("block-dirty-bitmap-add", json!({"node": "disk0", "name": "b"})).unwrap();
    let first = backup(&dir, "v", &[format!("id=d,source=nbd+unix:///disk0?socket={}", nbd.display())]);
    assert_eq!(disk(&first, "d")["mode"], "full");
    write_via_nbd(&nbd, "disk0", &[(1 << 20, 65536, 7)]);
    // The live disk itself with the bitmap of the changes since (qemu exports only a
    // disabled bitmap read-only): no point-in-time view.
    vm.qmp("block-dirty-bitmap-disable", json!({"node": "disk0", "name": "b"})).unwrap();
    vm.qmp(
        "block-export-add",
        json!({"type": "nbd", "id": "live", "node-name": "disk0", "name": "live", "writable": false, "bitmaps": ["b"]}),
    )
    .unwrap();
    let spec = format!("id=d,source=nbd+unix:///live?socket={},cbt=bitmap:b", nbd.display());

    // The backup opens the disk (the bitmap is queried), then waits; the guest starts
    // writing a region the bitmap did not report, and keeps writing while it is read.
    let gate = dir.join("go");
    let mut c = dir.repo_cmd("backup");
    c.args(["--vm", "v", "--json", "--verify", "all", "--disk", &spec]);
    c.env("BLOCKPROOF_PAUSE_AFTER_OPEN", gate.to_str().unwrap());
    let backup = c.spawn_piped();
    wait_for(&PathBuf::from(format!("{}.waiting", gate.display())));
    let region = 4u64 << 20;
    let mut args = vec!["-f".to_string(), "raw".into()];
    for i in 0..20000u64 {
        args.push("-c".into());
        args.push(format!("write -P {} {region} 65536", i % 250 + 1));
    }
    args.push(format!("nbd+unix:///disk0?socket={}", nbd.display()));
    let mut writer = Command::new("qemu-io").args(&args).stdout(Stdio::piped()).stderr(Stdio::null()).spawn().unwrap();
    let mut lines = BufReader::new(writer.stdout.take().unwrap()).lines();
    assert!(lines.next().is_some(), "the writer writes");
    let drain = std::thread::spawn(move || lines.count());
    std::fs::write(&gate, b"").unwrap();
    let out = backup.wait_with_output().unwrap();
    let _ = writer.kill();
    let _ = writer.wait();
    drain.join().unwrap();

    assert_eq!(out.status.code(), Some(3), "a difference is found: {}", String::from_utf8_lossy(&out.stderr));
    let report: Value = serde_json::from_slice(&out.stdout).expect("one JSON document");
    let d = disk(&report, "d");
    assert_eq!(d["source_changed"], true, "{d}");
    assert!(!d["mismatches"].as_array().unwrap().is_empty(), "{d}");
    let advice = d["advice"].as_str().unwrap();
    assert!(advice.contains("not a point-in-time view"), "{advice}");
    assert!(!advice.contains("reset CBT") && !advice.contains("reported changed data as unchanged"), "{advice}");
    assert!(d["next_full_reason"].is_null() || !d["next_full_reason"].as_str().unwrap().contains("lying"), "{d}");
    drop(vm);
}
