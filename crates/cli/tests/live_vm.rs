//! `backup --from qmp:SOCKET` against a real qemu-storage-daemon (issue 16 item 1, 2):
//! every disk node backed up from a point-in-time view blockproof sets up over QMP,
//! incrementals from the bitmap it owns per vm and disk, guest writes made during the
//! backup left out (and caught by the next run), a SIGKILLed run cleaned up by the next
//! one with no change lost, and nothing left behind.

mod harness;

use harness::wait_for;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Child;

use harness::qemu::*;
use harness::qsd::{write_via_nbd, Qsd};
use harness::Dir;
use serde_json::{json, Value};

struct Vm {
    qsd: Qsd,
    nbd: PathBuf,
    state: PathBuf,
    /// The daemon's second QMP monitor.
    qmp2: PathBuf,
}

/// A daemon with a qcow2 disk `sys` (8 MiB) and a raw disk `data` (4 MiB), each with a
/// writable NBD export (`w-sys`, `w-data`) standing for the guest.
fn vm(dir: &Dir) -> Vm {
    let sys = qcow2(dir, "sys", 8 << 20, 11);
    let data = dir.image("data.raw", 4 << 20, 12);
    let nbd = dir.join("guest.nbd");
    let mut args = Vec::new();
    for (node, path, drv) in [("sys", &sys, "qcow2"), ("data", &data, "raw")] {
        args.push("--blockdev".to_string());
        args.push(format!("driver=file,filename={},node-name={node}-file", path.display()));
        args.push("--blockdev".into());
        args.push(format!("driver={drv},file={node}-file,node-name={node}"));
    }
    // A second monitor, as a QEMU may have (libvirt's and a user's).
    let qmp2 = dir.join("vm2.qmp");
    args.push("--chardev".into());
    args.push(format!("socket,path={},server=on,wait=off,id=qmp1", qmp2.display()));
    args.push("--monitor".into());
    args.push("chardev=qmp1".into());
    args.push("--nbd-server".into());
    args.push(format!("addr.type=unix,addr.path={}", nbd.display()));
    for node in ["sys", "data"] {
        args.push("--export".into());
        args.push(format!("type=nbd,id=w-{node},node-name={node},name=w-{node},writable=on"));
    }
    let qsd = Qsd::start(dir, "vm", &args);
    let state = dir.join("state");
    Vm { qsd, nbd, state, qmp2 }
}

impl Vm {
    fn backup_cmd(&self, dir: &Dir) -> harness::TestCommand {
        let mut c = dir.repo_cmd("backup");
        c.args(["--vm", "v", "--json", "--verify", "all"]);
        c.arg("--from").arg(format!("qmp:{},nbd={}", self.qsd.qmp.display(), self.nbd.display()));
        c.arg("--state-dir").arg(&self.state);
        c
    }

    /// The guest's view of disk `node` now.
    fn truth(&self, dir: &Dir, node: &str, name: &str) -> PathBuf {
        let out = dir.join(name);
        let uri = format!("nbd+unix:///w-{node}?socket={}", self.nbd.display());
        qemu("qemu-img", &["convert", "-q", "-f", "raw", "-O", "raw", &uri, s(&out)]);
        out
    }

    fn write(&self, node: &str, writes: &[(u64, u64, u8)]) -> BTreeSet<u64> {
        write_via_nbd(&self.nbd, &format!("w-{node}"), writes)
    }

    /// Writes to disk `node` that the vm's bitmap of it never sees (disabled around them).
    fn hidden_write(&self, node: &str, writes: &[(u64, u64, u8)]) {
        let nodes = self.qsd.qmp("query-named-block-nodes", json!({"flat": true})).unwrap();
        let n = nodes.as_array().unwrap().iter().find(|n| n["node-name"] == node).unwrap();
        let bitmap = n["dirty-bitmaps"][0]["name"].as_str().unwrap().to_string();
        self.qsd.qmp("block-dirty-bitmap-disable", json!({"node": node, "name": bitmap})).unwrap();
        self.write(node, writes);
        self.qsd.qmp("block-dirty-bitmap-enable", json!({"node": node, "name": bitmap})).unwrap();
    }

    /// Starts `c` (a backup) with the test hook that makes it wait, its view set up and
    /// its disks opened, until `gate` exists; returns once it waits.
    fn paused(c: &mut harness::TestCommand, gate: &Path) -> Child {
        c.env("BLOCKPROOF_PAUSE_AFTER_OPEN", gate.to_str().unwrap());
        let child = c.spawn_piped();
        wait_for(&PathBuf::from(format!("{}.waiting", gate.display())));
        child
    }

    /// A backup SIGKILLed while its view is set up.
    fn killed_backup(&self, dir: &Dir, gate: &Path) {
        let mut child = Vm::paused(&mut self.backup_cmd(dir), gate);
        child.kill().unwrap();
        child.wait().unwrap();
    }

    /// A backup that catches a hidden write in disk sys (exit 3) and keeps its view with
    /// `keep` (default: none given); returns its report and the truth of sys at the view.
    fn tainted_and_kept(&self, dir: &Dir, keep: Option<&str>) -> (Value, PathBuf) {
        self.backup_cmd(dir).json();
        self.write("sys", &[(0, 65536, 21)]);
        self.hidden_write("sys", &[(5 << 20, 4096, 22)]);
        let truth = self.truth(dir, "sys", "t-sys.raw");
        let mut c = self.backup_cmd(dir);
        if let Some(k) = keep {
            c.args(["--keep-view", k]);
        }
        let (stdout, _) = c.code(3);
        let r: Value = serde_json::from_str(&stdout).expect("one JSON document");
        assert_eq!(disk(&r, "sys")["mismatches"], json!([{"offset": 5 << 20, "length": 4096}]), "{r}");
        assert!(r["kept_view"]["until"].is_string(), "the view is kept: {r}");
        assert!(self.state.join("v.journal.json").exists(), "the journal names the kept view");
        (r, truth)
    }

    /// Waits until no keeper process of this test's state directory is left.
    fn assert_keeper_gone(&self) {
        harness::wait_until("the keeper exiting", || !harness::keeper_runs("v", &self.state));
    }

    /// Asserts nothing of blockproof is left in the daemon or the state directory, and
    /// each disk carries exactly one bitmap, the vm's.
    fn assert_no_leftovers(&self) {
        let exports: Vec<String> = self
            .qsd
            .qmp("query-block-exports", json!({}))
            .unwrap()
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["id"].as_str().unwrap().to_string())
            .collect();
        let mut exports = exports;
        exports.sort();
        assert_eq!(exports, ["w-data", "w-sys"], "only the guest's exports remain");
        let jobs = self.qsd.qmp("query-block-jobs", json!({})).unwrap();
        assert_eq!(jobs, json!([]), "no job remains");
        let nodes = self.qsd.qmp("query-named-block-nodes", json!({"flat": true})).unwrap();
        let mut names: Vec<&str> = nodes.as_array().unwrap().iter().map(|n| n["node-name"].as_str().unwrap()).collect();
        names.sort();
        assert_eq!(names, ["data", "data-file", "sys", "sys-file"], "no overlay remains");
        for n in
            nodes.as_array().unwrap().iter().filter(|n| ["sys", "data"].contains(&n["node-name"].as_str().unwrap()))
        {
            let b: Vec<&str> =
                n["dirty-bitmaps"].as_array().unwrap().iter().map(|b| b["name"].as_str().unwrap()).collect();
            let node = n["node-name"].as_str().unwrap();
            assert_eq!(b.len(), 1, "{node}: {b:?}");
            assert!(b[0].starts_with(&format!("blockproof/v/{node}/")), "{node}: {b:?}");
        }
        let left: Vec<_> = std::fs::read_dir(&self.state).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert!(left.is_empty(), "the state directory is empty: {left:?}");
    }
}

#[test]
fn a_running_vm_over_qmp_full_incremental_kill_and_recovery() {
    let dir = Dir::new();
    dir.init();
    let vm = vm(&dir);

    // Full: every disk node is found and read from its view.
    let t0 = [vm.truth(&dir, "sys", "t0-sys.raw"), vm.truth(&dir, "data", "t0-data.raw")];
    let r0 = vm.backup_cmd(&dir).json();
    let ids: Vec<&str> = r0["disks"].as_array().unwrap().iter().map(|d| d["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["data", "sys"]);
    for id in ["sys", "data"] {
        assert_eq!(disk(&r0, id)["mode"], "full", "{r0}");
    }
    assert_eq!(r0["consistency"], "crash", "{r0}");
    assert!(r0["consistency_note"].as_str().unwrap().contains("no guest agent socket given"), "{r0}");
    assert_restores(&dir, &r0["snapshot"], "sys", &t0[0]);
    assert_restores(&dir, &r0["snapshot"], "data", &t0[1]);
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&vm.state).unwrap().permissions().mode() & 0o777, 0o700);
    vm.assert_no_leftovers();

    // Writes, then an incremental during which the guest writes again: those later
    // writes are not in the restore point (it is the view), and the bitmap of the next
    // run has them.
    let a_sys = vm.write("sys", &scattered(8 << 20, 6, 1));
    let a_data = vm.write("data", &scattered(4 << 20, 4, 2));
    let t1 = [vm.truth(&dir, "sys", "t1-sys.raw"), vm.truth(&dir, "data", "t1-data.raw")];
    let gate = dir.join("go");
    let child = Vm::paused(&mut vm.backup_cmd(&dir), &gate);
    let b_sys = vm.write("sys", &scattered(8 << 20, 5, 3));
    std::fs::write(&gate, b"").unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let r1: Value = serde_json::from_slice(&out.stdout).expect("one JSON document");
    let (s1, d1) = (disk(&r1, "sys"), disk(&r1, "data"));
    assert_eq!((s1["mode"].as_str(), d1["mode"].as_str()), (Some("incremental"), Some("incremental")), "{r1}");
    assert_eq!(s1["cbt_reported_chunks"], a_sys.len() as u64, "{s1}");
    assert_eq!(d1["cbt_reported_chunks"], a_data.len() as u64, "{d1}");
    assert!(s1["mismatches"].as_array().unwrap().is_empty(), "the view did not change: {s1}");
    assert_restores(&dir, &r1["snapshot"], "sys", &t1[0]);
    assert_restores(&dir, &r1["snapshot"], "data", &t1[1]);
    vm.assert_no_leftovers();
    std::fs::remove_file(&gate).unwrap();

    // SIGKILL while the view is set up: the VM keeps running, the journal names what
    // was left, and the next run tears it down and still covers every change.
    vm.killed_backup(&dir, &gate);
    assert!(vm.state.join("v.journal.json").exists(), "the journal names what was set up");
    let c_sys = vm.write("sys", &scattered(8 << 20, 4, 4));
    let t2 = [vm.truth(&dir, "sys", "t2-sys.raw"), vm.truth(&dir, "data", "t2-data.raw")];
    let r2 = vm.backup_cmd(&dir).json();
    let s2 = disk(&r2, "sys");
    assert_eq!(s2["mode"], "incremental", "{s2}");
    let expected: BTreeSet<u64> = b_sys.union(&c_sys).copied().collect();
    assert_eq!(s2["cbt_reported_chunks"], expected.len() as u64, "every write since the last commit: {s2}");
    assert_eq!(disk(&r2, "data")["cbt_reported_chunks"], 0);
    let warnings = r2["warnings"].to_string();
    assert!(warnings.contains("cleaned up after an earlier run"), "{warnings}");
    assert_restores(&dir, &r2["snapshot"], "sys", &t2[0]);
    assert_restores(&dir, &r2["snapshot"], "data", &t2[1]);
    vm.assert_no_leftovers();
    dir.check_all();
}

/// `blockproof cleanup` undoes exactly what a killed run's journal names; the VM keeps
/// running, and the next backup is still an exact incremental.
#[test]
fn cleanup_undoes_a_killed_run() {
    let dir = Dir::new();
    dir.init();
    let vm = vm(&dir);
    vm.backup_cmd(&dir).json();
    let a = vm.write("sys", &scattered(8 << 20, 5, 7));
    vm.killed_backup(&dir, &dir.join("go"));

    let mut c = dir.cmd("cleanup");
    c.args(["--vm", "v", "--json"]).arg("--state-dir").arg(&vm.state);
    let r = c.json();
    harness::assert_json_documented("cleanup", &r);
    let removed = r["removed"].to_string();
    for what in ["export blockproof-v-sys", "job blockproof-v-data", "overlay blockproof-fleece-sys", "merged back"] {
        assert!(removed.contains(what), "{what}: {removed}");
    }
    vm.assert_no_leftovers();
    let mut again = dir.cmd("cleanup");
    again.args(["--vm", "v"]).arg("--state-dir").arg(&vm.state);
    assert!(again.ok().contains("nothing to clean up"));

    let truth = vm.truth(&dir, "sys", "t-sys.raw");
    let r = vm.backup_cmd(&dir).json();
    let s = disk(&r, "sys");
    assert_eq!((s["mode"].as_str(), s["cbt_reported_chunks"].as_u64()), (Some("incremental"), Some(a.len() as u64)));
    assert_restores(&dir, &r["snapshot"], "sys", &truth);
    vm.assert_no_leftovers();
}

/// A write the vm's bitmap never saw (disabled around it) is caught in the view by
/// verification: with `--keep-view 0` the run exits 3 with the tainted restore point
/// committed and the view released at once, change tracking reset, and the next run of
/// the disk a full read with the reason.
#[test]
fn a_hidden_write_is_caught_in_the_view_and_the_next_run_is_full() {
    let dir = Dir::new();
    dir.init();
    let vm = vm(&dir);
    vm.backup_cmd(&dir).json();
    vm.write("sys", &[(0, 65536, 9)]);
    vm.hidden_write("sys", &[(5 << 20, 4096, 10)]);
    let truth = vm.truth(&dir, "sys", "t-sys.raw");

    let (stdout, _) = vm.backup_cmd(&dir).args(["--keep-view", "0"]).code(3);
    let r: Value = serde_json::from_str(&stdout).expect("one JSON document");
    assert_eq!(r["status"], "tainted", "{r}");
    assert_eq!(r["kept_view"], Value::Null, "{r}");
    let s = disk(&r, "sys");
    assert_eq!(s["source_changed"], false, "the view does not change: {s}");
    assert_eq!(s["mismatches"], json!([{"offset": 5 << 20, "length": 4096}]), "{s}");
    assert_restores(&dir, &r["snapshot"], "data", &vm.truth(&dir, "data", "t-data.raw"));
    vm.assert_no_leftovers();

    let next = vm.backup_cmd(&dir).json();
    let s = disk(&next, "sys");
    assert_eq!(s["mode"], "full", "{s}");
    // The tainted restore point recorded no bitmap for the disk (change tracking reset).
    assert!(s["full_reason"].as_str().unwrap().contains("recorded no bitmap"), "{s}");
    assert_restores(&dir, &next["snapshot"], "sys", &truth);
    vm.assert_no_leftovers();
}

/// With `--on-mismatch=heal` the clean restore point is read from the same view before
/// it is released: it equals the guest's disk at the view although the guest keeps
/// writing afterwards.
#[test]
fn heal_reads_the_clean_restore_point_from_the_view() {
    let dir = Dir::new();
    dir.init();
    let vm = vm(&dir);
    vm.backup_cmd(&dir).json();
    vm.hidden_write("sys", &[(3 << 20, 8192, 11)]);
    let truth = vm.truth(&dir, "sys", "t-sys.raw");

    let gate = dir.join("go");
    let child = Vm::paused(vm.backup_cmd(&dir).args(["--on-mismatch", "heal"]), &gate);
    vm.write("sys", &[(3 << 20, 65536, 12)]); // after the view: not in either restore point
    std::fs::write(&gate, b"").unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(3), "{}", String::from_utf8_lossy(&out.stderr));
    let r: Value = serde_json::from_slice(&out.stdout).expect("one JSON document");
    assert_eq!(disk(&r, "sys")["mismatches"], json!([{"offset": 3 << 20, "length": 8192}]), "{r}");
    let healed = &r["healed_snapshot"];
    assert!(healed.is_string(), "{r}");
    assert_eq!(r["kept_view"], Value::Null, "healed: the view is released: {r}");
    assert_restores(&dir, healed, "sys", &truth);
    vm.assert_no_leftovers();
}

/// While a backup of the vm runs, a second backup, a `cleanup`, and a backup with another
/// state directory are refused without touching its view: the running backup completes
/// with an exact incremental, and nothing is left behind.
#[test]
fn a_second_run_of_the_vm_leaves_the_running_ones_view_alone() {
    let dir = Dir::new();
    dir.init();
    let vm = vm(&dir);
    vm.backup_cmd(&dir).json();
    let a = vm.write("sys", &scattered(8 << 20, 5, 13));
    let truth = vm.truth(&dir, "sys", "t-sys.raw");
    let gate = dir.join("go");
    let first = Vm::paused(&mut vm.backup_cmd(&dir), &gate);

    let second = vm.backup_cmd(&dir).fails_with_one_line(1);
    assert!(second.contains("vm v is already being backed up"), "{second}");
    let mut c = dir.cmd("cleanup");
    c.args(["--vm", "v"]).arg("--state-dir").arg(&vm.state);
    let cleanup = c.fails_with_one_line(1);
    assert!(cleanup.contains("vm v is already being backed up"), "{cleanup}");
    // Through the process's other monitor (the first run holds one: QEMU serves one client
    // per monitor), with another state directory: a view it did not journal.
    let other_state = dir.join("other-state");
    let mut third = dir.repo_cmd("backup");
    third.args(["--vm", "v", "--json"]).arg("--state-dir").arg(&other_state);
    third.arg("--from").arg(format!("qmp:{},nbd={}", vm.qmp2.display(), vm.nbd.display()));
    let third = third.fails_with_one_line(1);
    assert!(third.contains("already has a point-in-time view of disk"), "{third}");
    assert!(std::fs::read_dir(&other_state).unwrap().next().is_none(), "the refused run wrote no journal");

    std::fs::write(&gate, b"").unwrap();
    let out = first.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let r: Value = serde_json::from_slice(&out.stdout).expect("one JSON document");
    let s = disk(&r, "sys");
    assert_eq!((s["mode"].as_str(), s["cbt_reported_chunks"].as_u64()), (Some("incremental"), Some(a.len() as u64)));
    assert_restores(&dir, &r["snapshot"], "sys", &truth);
    vm.assert_no_leftovers();
}

/// A backup that fails and then cannot release its view (the VM process died) says so in
/// a warning after its error — the journal is left for the next run or `cleanup`.
#[test]
fn a_view_that_cannot_be_released_is_a_warning_not_silence() {
    let dir = Dir::new();
    dir.init();
    let vm = vm(&dir);
    let gate = dir.join("go");
    let child = Vm::paused(&mut vm.backup_cmd(&dir), &gate);
    let killed = std::process::Command::new("kill").args(["-9", &vm.qsd.pid().to_string()]).status().unwrap();
    assert!(killed.success());
    std::fs::write(&gate, b"").unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(1), "the backup fails: {}", String::from_utf8_lossy(&out.stderr));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("warning: the point-in-time view of vm v was not released"),
        "the teardown error is not swallowed: {stderr}"
    );
    assert!(vm.state.join("v.journal.json").exists(), "the journal still names the view");
}

/// A hidden write caught with the default `--keep-view`: the tainted restore point is
/// committed, the view stays — readable through its export with exactly the content the
/// backup compared, although the guest writes afterwards — with the bitmaps already
/// settled, until `cleanup` releases it; then nothing is left and the next run of the
/// disk is a full read with the reason.
#[test]
fn a_view_kept_after_a_mismatch_is_readable_until_cleanup() {
    let dir = Dir::new();
    dir.init();
    let vm = vm(&dir);
    let (r, truth) = vm.tainted_and_kept(&dir, None);
    harness::assert_json_documented("backup", &r);
    let kept = &r["kept_view"];
    assert_eq!(kept["snapshot"], r["snapshot"], "{kept}");
    let sys = kept["exports"].as_array().unwrap().iter().find(|e| e["disk"] == "sys").unwrap();
    assert_eq!(sys["name"], "blockproof-v-sys", "{sys}");
    // The guest overwrites the differing range after the backup: the view does not move.
    vm.write("sys", &[(5 << 20, 65536, 23)]);
    let seen = dir.join("kept-sys.raw");
    qemu("qemu-img", &["convert", "-q", "-f", "raw", "-O", "raw", sys["uri"].as_str().unwrap(), s(&seen)]);
    assert_eq!(harness::hash(&seen), harness::hash(&truth), "the kept view is the disk at the view");
    std::fs::remove_file(&seen).unwrap();
    // Change tracking is settled as for any committed restore point: one bitmap per disk.
    let nodes = vm.qsd.qmp("query-named-block-nodes", json!({"flat": true})).unwrap();
    for n in nodes.as_array().unwrap().iter().filter(|n| ["sys", "data"].contains(&n["node-name"].as_str().unwrap())) {
        let named = n["dirty-bitmaps"].as_array().unwrap().iter().filter(|b| b["name"].is_string()).count();
        assert_eq!(named, 1, "{n}");
    }

    let mut c = dir.cmd("cleanup");
    c.args(["--vm", "v", "--json"]).arg("--state-dir").arg(&vm.state);
    let removed = c.json()["removed"].to_string();
    for what in ["export blockproof-v-sys", "job blockproof-v-sys", "overlay blockproof-fleece-data"] {
        assert!(removed.contains(what), "{what}: {removed}");
    }
    vm.assert_no_leftovers();
    vm.assert_keeper_gone();

    let next = vm.backup_cmd(&dir).json();
    let s = disk(&next, "sys");
    assert_eq!(s["mode"], "full", "{s}");
    assert!(s["full_reason"].as_str().unwrap().contains("recorded no bitmap"), "{s}");
    vm.assert_no_leftovers();
}

/// The next backup of the vm releases a kept view first, says so, and succeeds: a full
/// read of the tainted disk with the reason, restoring to the guest's disk.
#[test]
fn the_next_backup_releases_a_kept_view() {
    let dir = Dir::new();
    dir.init();
    let vm = vm(&dir);
    vm.tainted_and_kept(&dir, Some("1h"));
    vm.write("sys", &[(1 << 20, 65536, 24)]);
    let truth = vm.truth(&dir, "sys", "t2-sys.raw");
    let next = vm.backup_cmd(&dir).json();
    assert_eq!(next["status"], "ok", "{next}");
    let warnings = next["warnings"].to_string();
    assert!(warnings.contains("released the point-in-time view kept after the mismatch of snapshot"), "{warnings}");
    let s = disk(&next, "sys");
    assert_eq!(s["mode"], "full", "{s}");
    assert!(s["full_reason"].as_str().unwrap().contains("recorded no bitmap"), "{s}");
    assert_restores(&dir, &next["snapshot"], "sys", &truth);
    vm.assert_no_leftovers();
    vm.assert_keeper_gone();
}

/// A kept view is released on schedule with no other blockproof command running: by the
/// keeper the tainted run started, after that run exited.
#[test]
fn a_kept_view_is_released_on_schedule() {
    let dir = Dir::new();
    dir.init();
    let vm = vm(&dir);
    vm.tainted_and_kept(&dir, Some("2s"));
    let journal = vm.state.join("v.journal.json");
    harness::wait_until("the kept view being released", || !journal.exists());
    vm.assert_keeper_gone();
    vm.assert_no_leftovers();
    let next = vm.backup_cmd(&dir).json();
    assert_eq!(next["warnings"], json!([]), "nothing left to release: {next}");
}

/// A real qemu-ga listening on a unix socket, with only `guest-sync-delimited` and
/// `guest-ping` allowed: an agent that answers and refuses to freeze. (One that may
/// freeze would freeze this host's file systems: never run that here.)
struct RefusingAgent {
    child: Child,
    socket: PathBuf,
}

impl RefusingAgent {
    fn start(dir: &Dir) -> RefusingAgent {
        let socket = dir.join("qga.sock");
        let state = dir.join("qga-state");
        std::fs::create_dir_all(&state).unwrap();
        let child = std::process::Command::new("qemu-ga")
            .args(["-m", "unix-listen", "-p"])
            .arg(&socket)
            .arg("-t")
            .arg(&state)
            .arg("--allow-rpcs=guest-sync-delimited,guest-ping")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("qemu-ga (qemu-guest-agent) is installed");
        wait_for(&socket);
        RefusingAgent { child, socket }
    }
}

impl Drop for RefusingAgent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `qga=PATH` without a guest: a socket nobody answers (a guest without its agent
/// running) gives a crash-consistent backup with the reason, within the agent's bound; a
/// real qemu-ga that refuses the freeze, the same with its words. Both succeed with
/// nothing left behind.
#[test]
fn a_guest_agent_that_does_not_freeze_means_crash_consistent() {
    let dir = Dir::new();
    dir.init();
    let vm = vm(&dir);
    let with_agent = |agent: &Path| {
        let mut c = dir.repo_cmd("backup");
        c.args(["--vm", "v", "--json"]).arg("--state-dir").arg(&vm.state);
        c.arg("--from").arg(format!("qmp:{},nbd={},qga={}", vm.qsd.qmp.display(), vm.nbd.display(), agent.display()));
        c.json()
    };
    // Connections queue on the listening socket; nobody ever reads them.
    let silent = dir.join("silent.sock");
    let _listener = std::os::unix::net::UnixListener::bind(&silent).unwrap();
    let r = with_agent(&silent);
    assert_eq!(r["consistency"], "crash", "{r}");
    let note = r["consistency_note"].as_str().unwrap();
    assert!(note.contains("did not answer guest-sync-delimited within 3 s"), "{note}");
    vm.assert_no_leftovers();

    let agent = RefusingAgent::start(&dir);
    let r = with_agent(&agent.socket);
    assert_eq!(r["consistency"], "crash", "{r}");
    let note = r["consistency_note"].as_str().unwrap();
    assert!(note.contains("did not freeze") && note.contains("guest-fsfreeze-freeze has been disabled"), "{note}");
    harness::assert_json_documented("backup", &r);
    // The restore point says the same.
    let snaps = dir.repo_cmd("snapshots").args(["--vm", "v", "--json"]).json();
    let snap = snaps.as_array().unwrap().iter().find(|s| s["id"] == r["snapshot"]).unwrap();
    assert_eq!(snap["machine"]["consistency"], "crash", "{snap}");
    assert_eq!(snap["machine"]["consistency_note"].as_str(), Some(note), "{snap}");
    vm.assert_no_leftovers();
}

/// A run killed while the guest may be frozen leaves `frozen` in its journal (written
/// before the freeze); `cleanup` then asks the agent to thaw before anything else — here
/// the refusing qemu-ga, whose refusal is said and does not stop the cleanup.
#[test]
fn cleanup_thaws_what_a_killed_run_may_have_frozen() {
    let dir = Dir::new();
    dir.init();
    let vm = vm(&dir);
    let agent = RefusingAgent::start(&dir);
    vm.backup_cmd(&dir).json();
    vm.killed_backup(&dir, &dir.join("go"));
    // The journal as a run killed between the freeze and the thaw leaves it.
    let path = vm.state.join("v.journal.json");
    let mut journal: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    journal["frozen"] = json!(agent.socket);
    std::fs::write(&path, serde_json::to_vec(&journal).unwrap()).unwrap();

    let mut c = dir.cmd("cleanup");
    c.args(["--vm", "v", "--json"]).arg("--state-dir").arg(&vm.state);
    let removed = c.json()["removed"].as_array().unwrap().clone();
    let first = removed[0].as_str().unwrap();
    assert!(first.starts_with("guest file systems: thaw through") && first.contains("disabled"), "{removed:?}");
    assert!(removed.iter().any(|r| r == "export blockproof-v-sys"), "{removed:?}");
    vm.assert_no_leftovers();
}
