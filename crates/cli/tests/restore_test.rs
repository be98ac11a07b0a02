//! `restore-test` at the filesystem level (issue 18): a restore point whose files are all
//! there passes; one backed up after the checked file was removed at the source fails,
//! naming the file; one whose stored data is damaged fails, naming what could not be
//! read. Every outcome is recorded in the repository, shown by `snapshots` and `status`,
//! and removed with its restore point by `forget`. Real FAT images (mkfs.vfat, mtools).

mod harness;

use std::fs;
use std::path::Path;
use std::process::Command;

use harness::{assert_json_documented, snap_id, Dir};
use serde_json::Value;

/// A whole-disk FAT filesystem with /hostname and /etc/motd.
fn fat_image(dir: &Dir, name: &str) -> std::path::PathBuf {
    let img = dir.join(name);
    let run = |program: &str, args: &[&str]| {
        let out = Command::new(program).args(args).output().unwrap_or_else(|e| panic!("{program}: {e}"));
        assert!(out.status.success(), "{program} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    run("mkfs.vfat", &["-C", img.to_str().unwrap(), "8192"]);
    let host = dir.join("hostname");
    fs::write(&host, b"web01\n").unwrap();
    let motd = dir.join("motd");
    fs::write(&motd, "welcome\n".repeat(5000)).unwrap();
    let i = img.to_str().unwrap();
    run("mmd", &["-i", i, "::/etc"]);
    run("mcopy", &["-i", i, host.to_str().unwrap(), "::/hostname"]);
    run("mcopy", &["-i", i, motd.to_str().unwrap(), "::/etc/motd"]);
    img
}

fn mdel(img: &Path, path: &str) {
    let out = Command::new("mdel").args(["-i", img.to_str().unwrap(), &format!("::{path}")]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

fn test_cmd(dir: &Dir, snap: &str) -> harness::TestCommand {
    let mut c = dir.repo_cmd("restore-test");
    c.arg(snap).args(["--sample", "100%", "--expect", "/hostname", "--json"]);
    c
}

fn restore_test_records(dir: &Dir) -> usize {
    fs::read_dir(dir.repo().join("state"))
        .map(|d| d.filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().starts_with("restore-test-")).count())
        .unwrap_or(0)
}

#[test]
fn a_restore_point_passes_and_one_without_the_checked_file_fails_naming_it() {
    let dir = Dir::new();
    dir.init();
    let img = fat_image(&dir, "d.img");
    let good = snap_id(&dir.backup("vm", &[("d", &img)])).to_string();

    let r = test_cmd(&dir, &good).json();
    assert_eq!(r["passed"], true, "{r}");
    assert_eq!(r["kind"], "filesystem");
    let f = &r["filesystems"][0];
    assert_eq!((f["disk"].as_str(), f["partition"].as_u64()), (Some("d"), Some(0)), "{r}");
    assert!(f["filesystem"].as_str().unwrap().starts_with("fat"), "{f}");
    assert_eq!((f["dirs"].as_u64(), f["files"].as_u64()), (Some(2), Some(2)), "/ and /etc; hostname and motd: {f}");
    assert_eq!(f["files_read"], 3, "a sample of 100% reads every file, and /hostname again as expected: {f}");
    assert_eq!(f["bytes_read"].as_u64().unwrap(), 6 + 40000 + 6, "each file, and /hostname again as expected");
    assert_eq!(r["expected"][0]["found_in"], serde_json::json!(["d/part0"]));
    assert_json_documented("restore-test", &r);

    // Removed at the source before the next backup: that restore point fails the test.
    mdel(&img, "/hostname");
    let bad = snap_id(&dir.backup("vm", &[("d", &img)])).to_string();
    let (stdout, _) = test_cmd(&dir, &bad).code(1);
    let r: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(r["passed"], false);
    assert_eq!(r["reason"], "missing: /hostname", "{r}");
    let text = dir.repo_cmd("restore-test").arg(&bad).args(["--expect", "/hostname"]).code(1).0;
    assert!(text.contains("expected /hostname: missing") && text.contains("FAILED: missing: /hostname"), "{text}");

    // Recorded: each restore point shows its newest test; the vm its newest tested point.
    let snaps = dir.snapshots();
    let test_of = |id: &str| snaps.iter().find(|s| s["id"] == id).unwrap()["restore_test"].clone();
    assert_eq!(test_of(&good)["passed"], true);
    assert_eq!(test_of(&bad)["passed"], false);
    let status = dir.repo_cmd("status").arg("--json").json();
    assert_json_documented("status", &status);
    assert_json_documented("snapshots", &serde_json::json!(snaps));
    let last = &status[0]["last_restore_test"];
    assert_eq!((last["snapshot"].as_str(), last["passed"].as_bool()), (Some(bad.as_str()), Some(false)), "{last}");
    let text = dir.repo_cmd("status").ok();
    assert!(text.contains("last restore test: snapshot") && text.contains("FAILED (missing: /hostname)"), "{text}");
    assert_eq!(restore_test_records(&dir), 3);

    // `--no-record` leaves no record; forget takes a restore point's records with it.
    test_cmd(&dir, &good).arg("--no-record").json();
    assert_eq!(restore_test_records(&dir), 3);
    let state = dir.repo().join("state");
    let of_bad = fs::read_dir(&state)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.file_name().unwrap().to_string_lossy().starts_with(&format!("restore-test-{bad}")))
        .unwrap();
    let saved = fs::read(&of_bad).unwrap();
    dir.repo_cmd("forget").arg(&bad).ok();
    assert_eq!(restore_test_records(&dir), 1, "the forgotten point's two records are gone");
    let status = dir.repo_cmd("status").arg("--json").json();
    assert_eq!(status[0]["last_restore_test"]["snapshot"], good.as_str());

    // A forget interrupted between the restore point and its records leaves a record of
    // a gone point: gc removes it, and says so.
    fs::write(&of_bad, saved).unwrap();
    assert_eq!(restore_test_records(&dir), 2);
    let gc = dir.repo_cmd("gc").arg("--json").json();
    assert_eq!(gc["restore_test_records_dropped"], 1, "{gc}");
    assert_json_documented("gc", &gc);
    assert_eq!(restore_test_records(&dir), 1, "only the record of the point that exists stays");
    assert_eq!(dir.repo_cmd("gc").arg("--json").json()["restore_test_records_dropped"], 0);
}

#[test]
fn damaged_stored_data_fails_the_test_and_says_what_was_unreadable() {
    let dir = Dir::new();
    dir.init();
    let img = fat_image(&dir, "d.img");
    let snap = snap_id(&dir.backup("vm", &[("d", &img)])).to_string();
    // Flip one byte in the middle of every pack: each holds data of the disk.
    for p in harness::files(&dir.repo().join("data")) {
        let mut b = fs::read(&p).unwrap();
        let mid = b.len() / 2;
        b[mid] ^= 0xff;
        fs::write(&p, b).unwrap();
    }
    let (stdout, _) = dir.repo_cmd("restore-test").arg(&snap).args(["--sample", "100%", "--json"]).code(1);
    let r: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(r["passed"], false, "{r}");
    let reason = r["reason"].as_str().unwrap();
    // The path that could not be read, and why (a file's data, or the filesystem itself).
    assert!(reason.contains("problem") && reason.contains("authentication failed"), "{reason}");
    let problems: usize =
        r["filesystems"].as_array().unwrap().iter().map(|f| f["problems"].as_array().unwrap().len()).sum();
    assert!(problems > 0, "{r}");
}

#[test]
fn bad_arguments_are_one_line_usage_errors() {
    let dir = Dir::new();
    dir.init();
    let line = dir.repo_cmd("restore-test").args(["vm:latest", "--sample", "150%"]).fails_with_one_line(2);
    assert!(line.contains("0% to 100%"), "{line}");
    let img = fat_image(&dir, "d.img");
    dir.backup("vm", &[("d", &img)]);
    let line = dir.repo_cmd("restore-test").args(["vm:latest", "--disk", "nope"]).fails_with_one_line(2);
    assert!(line.contains("has no disk \"nope\""), "{line}");
    let line = dir.repo_cmd("restore-test").args(["vm:latest", "--expect", "/a/../b"]).fails_with_one_line(2);
    assert!(line.contains("invalid --expect"), "{line}");
}

/// `[restore_test]` in a job file: each run tests the latest restore point of the vm
/// tested least recently (never tested first, in the job's order), `per_run` of them,
/// and stores the record like `restore-test`; a vm tested less than `every` ago is not
/// due; a restore point that fails its test fails the run (exit 1) and `status` shows it.
#[test]
fn a_job_tests_its_vms_least_recently_tested_first() {
    let dir = Dir::new();
    dir.init();
    fat_image(&dir, "a.img");
    let b = fat_image(&dir, "b.img");
    let job = dir.join("job.toml");
    let text = r#"version = 1

[repository]
location = "repo"

[restore_test]
every = "EVERY"
per_run = 1
sample = "100%"
expect = ["/hostname"]

[[vm]]
name = "a"
disks = ["id=d,source=a.img"]

[[vm]]
name = "b"
disks = ["id=d,source=b.img"]
"#;
    fs::write(&job, text.replace("EVERY", "1s")).unwrap();
    let run = |code: i32| -> Value {
        let (out, _) = dir.cmd("run").arg(&job).arg("--json").code(code);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
    };
    let tested = |r: &Value| -> Vec<(String, bool)> {
        r["restore_tests"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| (t["vm"].as_str().unwrap().to_string(), t["passed"].as_bool().unwrap()))
            .collect()
    };
    let r1 = run(0);
    assert_eq!(tested(&r1), [("a".to_string(), true)], "never tested, first in the job: {r1}");
    assert_eq!(r1["restore_tests"][0]["due"], "never tested");
    let r2 = run(0);
    assert_eq!(tested(&r2), [("b".to_string(), true)], "{r2}");
    assert_eq!(restore_test_records(&dir), 2, "each test is recorded");
    // Both were tested: the one tested longest ago is next, once `every` has passed.
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let r3 = run(0);
    assert_eq!(tested(&r3), [("a".to_string(), true)], "{r3}");
    assert!(r3["restore_tests"][0]["due"].as_str().unwrap().starts_with("last tested "), "{r3}");

    // b's source loses the checked file: its next restore point fails the test.
    mdel(&b, "/hostname");
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let metrics = dir.join("job.prom");
    let with_metrics = |every: &str| {
        let t = text.replace("EVERY", every);
        let reports =
            format!("[reports]\ndirectory = \"reports\"\nmetrics = \"{}\"\n\n[restore_test]", metrics.display());
        t.replace("[restore_test]", &reports)
    };
    fs::write(&job, with_metrics("1s")).unwrap();
    let r4 = run(1);
    let prom = fs::read_to_string(&metrics).unwrap();
    assert!(prom.contains(r#"blockproof_vm_restore_test_passed{blockproof_job="job",vm="b"} 0"#), "{prom}");
    // The repository's state in the reports: each vm's newest test, whichever run made it.
    assert!(prom.contains(r#"blockproof_vm_last_restore_test_passed{blockproof_job="job",vm="a"} 1"#), "{prom}");
    assert!(prom.contains(r#"blockproof_vm_last_restore_test_passed{blockproof_job="job",vm="b"} 0"#), "{prom}");
    let inv =
        |name: &str| r4["repository"]["vms"].as_array().unwrap().iter().find(|v| v["vm"] == name).unwrap().clone();
    assert_eq!(inv("a")["last_restore_test"]["passed"], true, "{r4}");
    assert_eq!(inv("b")["last_restore_test"]["reason"], "missing: /hostname", "{r4}");
    let html = fs::read_to_string(dir.join("reports/report.html")).unwrap();
    assert!(html.contains("failed (missing: /hostname)"), "the HTML report shows b's failed test");
    assert_eq!(tested(&r4), [("b".to_string(), false)], "{r4}");
    assert_eq!(r4["restore_tests"][0]["reason"], "missing: /hostname", "{r4}");
    assert!(r4["errors"].to_string().contains("restore test of vm b"), "{r4}");
    let status = dir.repo_cmd("status").arg("--json").json();
    let b_status = status.as_array().unwrap().iter().find(|v| v["vm"] == "b").unwrap();
    assert_eq!(b_status["last_restore_test"]["passed"], false, "{b_status}");

    // Not due within `every`: no test at all.
    fs::write(&job, text.replace("EVERY", "7d")).unwrap();
    let r5 = run(0);
    assert_eq!(tested(&r5), [], "{r5}");
}
