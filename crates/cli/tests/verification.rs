//! Real change-tracking lies, reproduced with the qemu tools, each caught by sampled
//! verification (`--verify 25%`) within the reported coverage bound: exit code 3, the
//! exact byte ranges, a tainted snapshot, and a heal whose restore point is bit-exact.
//! And the other side: honest runs never raise a false alarm, and sampling spends what
//! the budget says.

mod harness;

use std::path::Path;

use harness::qemu::*;
use harness::{mixed_image, Dir};
use serde_json::Value;

/// Runs a backup that may exit 0 or 3; returns the code and the JSON report.
fn run_backup(dir: &Dir, vm: &str, specs: &[String], extra: &[&str]) -> (i32, Value, String) {
    let mut c = dir.repo_cmd("backup");
    c.args(["--vm", vm, "--json"]).args(extra);
    for spec in specs {
        c.arg("--disk").arg(spec);
    }
    let out = c.output();
    let code = out.status.code().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(code == 0 || code == 3, "exit {code}: {stderr}");
    (code, serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {stderr}")), stderr)
}

/// Backs up until verification reports a mismatch; asserts it came within the coverage
/// bound the first run after the lie reported (4 for 25%). Returns the tainted report.
fn until_caught(dir: &Dir, vm: &str, specs: &[String]) -> (Value, String) {
    let mut bound = None;
    for run in 1..=8 {
        let (code, r, stderr) = run_backup(dir, vm, specs, &["--verify", "25%", "--on-mismatch=heal"]);
        let b = r["disks"][0]["coverage"]["full_coverage_within_runs"].as_u64().unwrap();
        let bound = *bound.get_or_insert(b);
        assert_eq!(bound, 4, "25% of the disk per run: every chunk within 4 runs");
        if code == 3 {
            assert!(run as u64 <= bound, "caught in run {run}, after the bound of {bound}");
            assert_eq!(r["status"], "tainted");
            assert!(stderr.contains("MISMATCH"), "{stderr}");
            return (r, stderr);
        }
        for d in r["disks"].as_array().unwrap() {
            assert_eq!(d["mismatches"].as_array().unwrap().len(), 0);
        }
    }
    panic!("the lie was never caught");
}

fn ranges(disk: &Value) -> Vec<(u64, u64)> {
    disk["mismatches"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| (m["offset"].as_u64().unwrap(), m["length"].as_u64().unwrap()))
        .collect()
}

/// After the catch: the healed snapshot restores bit-exact, the tainted one is kept, and
/// the next backup of the disk is a full read.
fn assert_healed(dir: &Dir, r: &Value, id: &str, truth: &Path) {
    let healed = &r["healed_snapshot"];
    assert!(healed.is_string(), "{r}");
    assert_restores(dir, healed, id, truth);
    let snaps = dir.snapshots();
    let tainted = snaps.iter().find(|s| s["id"] == r["snapshot"]).expect("the tainted snapshot is kept");
    assert_eq!(tainted["status"], "tainted");
    let d = r["disks"].as_array().unwrap().iter().find(|d| d["id"] == id).unwrap();
    assert_eq!(d["next_mode"], "full");
}

/// A write made while the bitmap was disabled (`qemu-img bitmap --disable`, qemu-io,
/// `--enable`): the bitmap never learns of it.
#[test]
fn write_behind_a_disabled_bitmap_is_caught_and_healed() {
    let dir = Dir::new();
    dir.init();
    let img = qcow2(&dir, "d", 8 << 20, 21);
    let spec = [format!("id=d,source={},cbt=bitmap:auto", img.display())];
    let (_, full, _) = run_backup(&dir, "vm", &spec, &["--verify", "25%"]);
    qemu_io_writes(&img, &[(CHUNK * 3, 4096, 1)]); // an honest change, recorded
    run_backup(&dir, "vm", &spec, &["--verify", "25%"]);

    let name = bitmaps(&img).into_iter().map(|(n, _)| n).find(|n| n.starts_with("blockproof/")).unwrap();
    qemu("qemu-img", &["bitmap", "--disable", s(&img), &name]);
    let lie = CHUNK * 77 + 8192;
    qemu_io_writes(&img, &[(lie, 4096, 0xab)]);
    qemu("qemu-img", &["bitmap", "--enable", s(&img), &name]);

    let (r, _) = until_caught(&dir, "vm", &spec);
    let d = &r["disks"][0];
    assert_eq!(ranges(d), vec![(lie, 4096)], "sector-exact: {d}");
    // Suspects are restore points taken after the chunk was last confirmed: never the
    // full backup, which read it.
    assert!(!d["suspect_snapshots"].as_array().unwrap().contains(&full["snapshot"]), "{d}");
    assert!(d["advice"].as_str().unwrap().contains("rotation"), "{d}");
    let truth = raw_of(&dir, &img, "truth.raw");
    assert_healed(&dir, &r, "d", &truth);
    let (code, next, _) = run_backup(&dir, "vm", &spec, &["--verify", "25%"]);
    assert_eq!((code, next["disks"][0]["mode"].as_str()), (0, Some("full")));
    assert_restores(&dir, &next["snapshot"], "d", &truth);
}

/// A write into an external qcow2 overlay whose backing file carries the bitmap: the
/// bitmap (in the backing file) never sees writes to the active layer.
#[test]
fn write_into_an_overlay_above_the_bitmap_is_caught() {
    let dir = Dir::new();
    dir.init();
    let base = qcow2(&dir, "base", 8 << 20, 22);
    qemu("qemu-img", &["bitmap", "--add", s(&base), "b0"]);
    let top = dir.join("top.qcow2");
    qemu("qemu-img", &["create", "-q", "-f", "qcow2", "-b", s(&base), "-F", "qcow2", s(&top)]);
    let spec = [format!("id=d,source={},cbt=bitmap:b0", top.display())];
    run_backup(&dir, "vm", &spec, &["--verify", "25%"]);
    let lie = CHUNK * 50 + 4096;
    qemu_io_writes(&top, &[(lie, 8192, 0x5c)]);

    let (r, _) = until_caught(&dir, "vm", &spec);
    let d = &r["disks"][0];
    assert_eq!(ranges(d), vec![(lie, 8192)], "{d}");
    assert!(d["advice"].as_str().unwrap().contains("reset CBT"), "{d}");
    assert_healed(&dir, &r, "d", &raw_of(&dir, &top, "truth.raw"));
}

/// A VMware change list with one changed area left out.
#[test]
fn change_list_missing_an_area_is_caught() {
    let dir = Dir::new();
    dir.init();
    let size = 8 << 20;
    let img = dir.join("d.img");
    let mut data = mixed_image(size, 23);
    std::fs::write(&img, &data).unwrap();
    let list = dir.join("changes.json");
    let write_list = |areas: &[(u64, u64)]| harness::change_list(&list, size, areas);
    let spec = [format!("id=d,source={},cbt=changes:{}", img.display(), list.display())];
    write_list(&[]);
    run_backup(&dir, "vm", &spec, &["--verify", "25%"]);
    let areas = [(CHUNK * 10, 65536u64), (CHUNK * 90 + 512, 1024), (CHUNK * 30, 131072)];
    for (i, &(off, len)) in areas.iter().enumerate() {
        data[off as usize..(off + len) as usize].fill(0x30 + i as u8);
    }
    std::fs::write(&img, &data).unwrap();
    write_list(&areas[..2]); // the third area is missing from the list

    let (r, _) = until_caught(&dir, "vm", &spec);
    assert_eq!(ranges(&r["disks"][0]), vec![areas[2]]);
    write_list(&[]);
    assert_healed(&dir, &r, "d", &img);
}

/// Two disks of one vm whose sources are swapped between runs while the ids stay put:
/// the always-confirmed first chunk catches it on the very first run.
#[test]
fn swapped_sources_are_caught_on_the_first_run() {
    let dir = Dir::new();
    dir.init();
    let (a, b) = (dir.join("a.img"), dir.join("b.img"));
    std::fs::write(&a, mixed_image(4 << 20, 24)).unwrap();
    std::fs::write(&b, mixed_image(4 << 20, 25)).unwrap();
    let empty = dir.join("empty.json");
    std::fs::write(&empty, format!("{{\"startOffset\": 0, \"length\": {}, \"changedArea\": []}}", 4 << 20)).unwrap();
    let specs = |sys: &Path, data: &Path| {
        [
            format!("id=sys,source={},cbt=changes:{}", sys.display(), empty.display()),
            format!("id=data,source={},cbt=changes:{}", data.display(), empty.display()),
        ]
    };
    run_backup(&dir, "vm", &specs(&a, &b), &[]);
    let (code, r, stderr) = run_backup(&dir, "vm", &specs(&b, &a), &["--verify", "25%", "--on-mismatch=heal"]);
    assert_eq!(code, 3, "{stderr}");
    assert_eq!(r["status"], "tainted");
    for d in r["disks"].as_array().unwrap() {
        assert_eq!(ranges(d)[0].0, 0, "the first chunk is among the differences: {d}");
    }
    assert_healed(&dir, &r, "sys", &b);
    assert_healed(&dir, &r, "data", &a);
}

/// Twenty honest incrementals with random qemu-io writes: no false alarm, every sample
/// within 5% of the budget, every restore point bit-exact; `status` shows the coverage.
#[test]
fn honest_runs_never_mismatch_and_sampling_spends_the_budget() {
    let dir = Dir::new();
    dir.init();
    let size = 16u64 << 20;
    let img = qcow2(&dir, "d", size as usize, 26);
    let spec = [format!("id=d,source={},cbt=bitmap:auto", img.display())];
    run_backup(&dir, "vm", &spec, &["--verify", "25%"]);
    for run in 1..=20u64 {
        qemu_io_writes(&img, &scattered(size, 3 + (run % 5) as usize, 100 + run));
        let (code, r, stderr) = run_backup(&dir, "vm", &spec, &["--verify", "25%"]);
        assert_eq!(code, 0, "run {run}: {stderr}");
        let d = &r["disks"][0];
        assert_eq!(d["mode"], "incremental");
        let verified = d["verified_bytes"].as_u64().unwrap() as f64;
        let budget = size as f64 * 0.25;
        assert!((verified - budget).abs() <= budget * 0.05, "run {run}: verified {verified} of {budget}");
        if run % 5 == 0 {
            assert_restores(&dir, &r["snapshot"], "d", &raw_of(&dir, &img, &format!("r{run}.raw")));
        }
    }
    let status = dir.repo_cmd("status").args(["--vm", "vm", "--json"]).json();
    let d = &status[0]["disks"][0];
    assert_eq!(d["coverage"]["never_confirmed"], 0, "{status}");
    assert_eq!(d["coverage"]["full_coverage_within_runs"], 4, "{status}");
    assert!(d["coverage"]["oldest_confirmed_runs_ago"].as_u64().unwrap() <= 4, "{status}");
    let text = dir.repo_cmd("status").ok();
    assert!(text.contains("vm") && text.contains("within 4 runs"), "{text}");
}
