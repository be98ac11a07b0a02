//! `backup --from libvirt:DOMAIN` against a real libvirtd and a TCG QEMU (issue 16): every
//! disk of a transient domain backed up from libvirt's pull-mode backup (a point-in-time
//! view), a qcow2 disk incrementally from blockproof's checkpoint, a raw disk in full with
//! the reason; guest writes made during the backup left out of the restore point and
//! covered by the next one; a SIGKILLed run undone by the next run and by `cleanup`
//! with no change lost; the domain recreated between backups (its checkpoints gone, the
//! bitmaps in the image) still incremental; and nothing left behind after any run.

mod harness;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Child;

use harness::libvirt::{DiskDef, Domain};
use harness::qemu::{assert_restores, disk};
use harness::{wait_for, Dir};
use serde_json::Value;

const SIZE: usize = 64 << 20;

struct Case {
    dom: Domain,
    state: PathBuf,
}

impl Case {
    fn vm(&self) -> &str {
        &self.dom.name
    }

    fn backup_cmd(&self, dir: &Dir) -> harness::TestCommand {
        self.backup_verifying(dir, "5%")
    }

    fn backup_verifying(&self, dir: &Dir, verify: &str) -> harness::TestCommand {
        let mut c = dir.repo_cmd("backup");
        c.args(["--vm", self.vm(), "--json", "--verify", verify]);
        c.arg("--from").arg(format!("libvirt:{},uri=qemu:///system", self.vm()));
        c.arg("--state-dir").arg(&self.state);
        c
    }

    /// A backup; asserts success and that stdout is one JSON document and nothing else.
    fn backup(&self, dir: &Dir) -> Value {
        let out = self.backup_cmd(dir).output();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)))
    }

    /// Starts a backup that waits, its view set up and its disks opened, until `gate`.
    fn paused(&self, dir: &Dir, gate: &Path) -> Child {
        let mut c = self.backup_cmd(dir);
        c.env("BLOCKPROOF_PAUSE_AFTER_OPEN", gate.to_str().unwrap());
        let child = c.spawn_piped();
        let waiting = PathBuf::from(format!("{}.waiting", gate.display()));
        wait_for(&waiting);
        std::fs::remove_file(waiting).unwrap();
        child
    }

    /// A backup that catches a write hidden from the checkpoints in disk sys (exit 3) and
    /// keeps its view with `keep` (default: none given); returns its report and the
    /// truth of sys at the view.
    /// `pattern`: the hidden write's byte (each call its own, so it always changes the disk).
    fn tainted(&self, dir: &Dir, keep: Option<&str>, pattern: u8) -> (Value, PathBuf) {
        self.dom.write("vda", &[(0, 65536, 21)]);
        self.dom.hidden_write("vda", &[(5 << 20, 4096, pattern)]);
        let truth = self.dom.truth(dir, "vda", "t-sys.raw");
        let mut c = self.backup_verifying(dir, "100%");
        if let Some(k) = keep {
            c.args(["--keep-view", k]);
        }
        let (stdout, _) = c.code(3);
        let r: Value = serde_json::from_str(&stdout).expect("one JSON document");
        assert_eq!(r["status"], "tainted", "{r}");
        assert_eq!(disk(&r, "sys")["mismatches"], serde_json::json!([{"offset": 5 << 20, "length": 4096}]), "{r}");
        (r, truth)
    }

    fn journal(&self) -> PathBuf {
        self.state.join(format!("{}.journal.json", self.vm()))
    }

    fn assert_keeper_gone(&self) {
        harness::wait_until("the keeper exiting", || !harness::keeper_runs(self.vm(), &self.state));
    }

    fn run_dirs(&self) -> Vec<String> {
        let prefix = format!("{}.", self.vm());
        std::fs::read_dir("/run/blockproof")
            .map(|r| {
                r.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                    .filter(|n| n.starts_with(&prefix))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// No job, no private directory (socket, scratch files), no journal, and exactly the
    /// committed checkpoint `n`.
    fn assert_no_leftovers(&self, n: u64) {
        assert!(!self.dom.has_job(), "no backup job remains");
        assert_eq!(self.run_dirs(), Vec::<String>::new(), "no private directory remains");
        let left: Vec<_> = std::fs::read_dir(&self.state).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert!(left.is_empty(), "the state directory is empty: {left:?}");
        assert_eq!(self.dom.checkpoints(), [format!("blockproof.{}.{n}", self.vm())], "only the committed checkpoint");
        assert!(self.dom.is_running());
    }
}

fn mode(report: &Value, id: &str) -> (String, String) {
    let d = disk(report, id);
    (d["mode"].as_str().unwrap().to_string(), d["full_reason"].as_str().unwrap_or("").to_string())
}

const RAW_REASON: &str =
    "disk vdb is raw: libvirt keeps checkpoints only in qcow2 images, so it is read in full every run";

#[test]
fn a_libvirt_domain_full_incremental_kill_cleanup_and_restart() {
    let dir = Dir::new();
    dir.init();
    let dom = Domain::create(
        "lv",
        vec![
            DiskDef { target: "vda", format: "qcow2", size: SIZE, serial: Some("sys") },
            DiskDef { target: "vdb", format: "raw", size: SIZE, serial: None },
        ],
    );
    let case = Case { state: dir.join("state"), dom };
    let (dom, size) = (&case.dom, SIZE as u64);

    // Full: both disks, ids from the serial and the target dev; the raw one says why it
    // is read in full.
    let t0 = [dom.truth(&dir, "vda", "t0-sys.raw"), dom.truth(&dir, "vdb", "t0-vdb.raw")];
    let r0 = case.backup(&dir);
    let ids: Vec<&str> = r0["disks"].as_array().unwrap().iter().map(|d| d["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["sys", "vdb"]);
    assert_eq!(mode(&r0, "sys").0, "full");
    assert_eq!(mode(&r0, "vdb"), ("full".into(), RAW_REASON.into()));
    assert_eq!(disk(&r0, "sys")["cbt"], "libvirt");
    // No guest agent: crash-consistent, and the report says why.
    assert_eq!(r0["consistency"], "crash", "{r0}");
    let note = r0["consistency_note"].as_str().unwrap();
    assert!(note.contains("guest agent is not configured"), "{note}");
    assert_restores(&dir, &r0["snapshot"], "sys", &t0[0]);
    assert_restores(&dir, &r0["snapshot"], "vdb", &t0[1]);
    assert_eq!(std::fs::metadata(&case.state).unwrap().permissions().mode() & 0o777, 0o700);
    case.assert_no_leftovers(1);

    // Writes, then an incremental during which the guest writes again: the restore point
    // is the view (without the later writes); the next run's bitmap has them.
    let a = dom.write("vda", &harness::libvirt::writes(size, 6, 1));
    dom.write("vdb", &harness::libvirt::writes(size, 3, 2));
    let t1 = [dom.truth(&dir, "vda", "t1-sys.raw"), dom.truth(&dir, "vdb", "t1-vdb.raw")];
    let gate = dir.join("go");
    let child = case.paused(&dir, &gate);
    // The private directory: QEMU's user owns it, nobody else may enter.
    let runs = case.run_dirs();
    assert_eq!(runs.len(), 1, "{runs:?}");
    let meta = std::fs::metadata(Path::new("/run/blockproof").join(&runs[0])).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o700);
    let qemu_uid = harness::qemu::qemu("id", &["-u", "libvirt-qemu"]).trim().parse::<u32>().unwrap();
    assert_eq!(meta.uid(), qemu_uid, "owned by the user QEMU runs as");
    let b = dom.write("vda", &harness::libvirt::writes(size, 5, 3));
    std::fs::write(&gate, b"").unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let r1: Value = serde_json::from_slice(&out.stdout).expect("one JSON document");
    assert_eq!(mode(&r1, "sys"), ("incremental".into(), String::new()), "{r1}");
    assert_eq!(disk(&r1, "sys")["cbt_reported_chunks"], a.len() as u64, "{r1}");
    assert_eq!(mode(&r1, "vdb"), ("full".into(), RAW_REASON.into()));
    assert!(disk(&r1, "sys")["mismatches"].as_array().unwrap().is_empty(), "the view did not change: {r1}");
    assert_restores(&dir, &r1["snapshot"], "sys", &t1[0]);
    assert_restores(&dir, &r1["snapshot"], "vdb", &t1[1]);
    case.assert_no_leftovers(2);
    std::fs::remove_file(&gate).unwrap();

    // SIGKILL with the view set up: the domain keeps running, the journal names what was
    // left; the next run undoes it and still covers every write since the last commit
    // (those made during the last backup, and after the kill).
    let mut child = case.paused(&dir, &gate);
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(case.state.join(format!("{}.journal.json", case.vm())).exists());
    assert!(dom.is_running() && dom.has_job(), "the killed run's job is still there");
    let c = dom.write("vda", &harness::libvirt::writes(size, 4, 4));
    let t2 = dom.truth(&dir, "vda", "t2-sys.raw");
    let r2 = case.backup(&dir);
    let want: std::collections::BTreeSet<u64> = b.union(&c).copied().collect();
    assert_eq!(mode(&r2, "sys").0, "incremental", "{r2}");
    assert_eq!(disk(&r2, "sys")["cbt_reported_chunks"], want.len() as u64, "{r2}");
    let warnings = r2["warnings"].to_string();
    assert!(warnings.contains("cleaned up after an earlier run: backup job of domain"), "{warnings}");
    assert_restores(&dir, &r2["snapshot"], "sys", &t2);
    case.assert_no_leftovers(4);

    // Killed again, then `cleanup` undoes it: job, directory, checkpoint, journal.
    let mut child = case.paused(&dir, &gate);
    child.kill().unwrap();
    child.wait().unwrap();
    let mut c = dir.cmd("cleanup");
    c.args(["--vm", case.vm(), "--json"]).arg("--state-dir").arg(&case.state);
    let done = c.json();
    let removed = done["removed"].to_string();
    for what in ["backup job of domain", "directory /run/blockproof/", "checkpoint blockproof."] {
        assert!(removed.contains(what), "{what} in {removed}");
    }
    case.assert_no_leftovers(4);

    // The domain recreated from the same XML: libvirt forgot its checkpoints, the qcow2
    // image kept the bitmap; blockproof defines the checkpoint again and stays
    // incremental.
    let d = dom.write("vda", &harness::libvirt::writes(size, 3, 5));
    let case = {
        let Case { mut dom, state } = case;
        dom.destroy();
        dom.start();
        assert!(dom.checkpoints().is_empty(), "a transient domain's checkpoints end with it");
        Case { dom, state }
    };
    let dom = &case.dom;
    let t3 = dom.truth(&dir, "vda", "t3-sys.raw");
    let r3 = case.backup(&dir);
    assert_eq!(mode(&r3, "sys"), ("incremental".into(), String::new()), "{r3}");
    assert_eq!(disk(&r3, "sys")["cbt_reported_chunks"], d.len() as u64, "{r3}");
    assert_restores(&dir, &r3["snapshot"], "sys", &t3);
    case.assert_no_leftovers(5);

    // The restore point keeps the domain: a whole-VM restore writes its definition beside
    // the disks, which libvirt accepts, pointing at the restored images.
    let snaps = dir.snapshots();
    let m = &snaps.last().unwrap()["machine"];
    assert_eq!((m["kind"].as_str(), m["consistency"].as_str()), (Some("libvirt"), Some("crash")), "{m}");
    let uuid = harness::libvirt::virsh(&["domuuid", case.vm()]);
    assert_eq!(m["uuid"].as_str(), Some(uuid.trim()));
    let to = dir.join("whole");
    let mut c = dir.repo_cmd("restore");
    c.arg(r3["snapshot"].as_str().unwrap()).arg("--to").arg(&to);
    let out = c.ok();
    let xml = to.join(format!("{}.xml", case.vm()));
    assert!(out.contains(&format!("virsh define {}", xml.display())), "{out}");
    let restored_name = format!("{}-restored", case.vm());
    harness::libvirt::virsh(&["define", xml.to_str().unwrap()]);
    let _defined = Undefine(restored_name.clone());
    let def = harness::libvirt::virsh(&["dumpxml", "--inactive", &restored_name]);
    for (file, format) in [(to.join("sys.raw"), "raw"), (to.join("vdb.raw"), "raw")] {
        assert!(def.contains(&format!("<source file='{}'/>", file.display())), "{} in {def}", file.display());
        assert!(file.exists());
        let _ = format;
    }
    assert!(!def.contains(uuid.trim()), "a new uuid: {def}");
    assert!(!def.contains(dom.image("vda").to_str().unwrap()), "not the original image: {def}");
    assert_restores(&dir, &r3["snapshot"], "sys", &to.join("sys.raw"));
}

/// Undefines a domain on drop (also on panic).
struct Undefine(String);

impl Drop for Undefine {
    fn drop(&mut self) {
        let _ = harness::libvirt::virsh_try(&["undefine", &self.0]);
    }
}

/// A write hidden from libvirt's checkpoints, caught by verification (exit 3, the tainted
/// restore point committed): the view — libvirt's backup job, its exports and scratch
/// files — is kept, readable with exactly the content the backup compared while the
/// guest overwrites it, until `cleanup`; kept again, released by the next backup (which
/// says so, reads the tainted disk in full with the reason, and restores to the guest's
/// disk); released on schedule by the keeper alone; with `--keep-view 0` released at once.
/// After each release nothing is left and exactly one checkpoint remains.
#[test]
fn a_libvirt_view_kept_after_a_mismatch_until_cleanup_the_next_run_or_its_deadline() {
    let dir = Dir::new();
    dir.init();
    let dom = Domain::create("kv", vec![DiskDef { target: "vda", format: "qcow2", size: SIZE, serial: Some("sys") }]);
    let case = Case { state: dir.join("state"), dom };
    let dom = &case.dom;
    case.backup(&dir);
    case.assert_no_leftovers(1);

    // Kept by default: the report names the export, the job and its directory stay.
    let (r, truth) = case.tainted(&dir, None, 31);
    harness::assert_json_documented("backup", &r);
    let kept = &r["kept_view"];
    assert_eq!(kept["snapshot"], r["snapshot"], "{kept}");
    let sys = kept["exports"].as_array().unwrap().iter().find(|e| e["disk"] == "sys").unwrap();
    assert_eq!(sys["name"], "vda", "{sys}");
    assert!(case.journal().exists(), "the journal names the kept view");
    assert!(dom.has_job(), "libvirt's backup job is kept");
    assert!(harness::keeper_runs(case.vm(), &case.state), "a keeper waits for the deadline");
    // Change tracking is settled at once, as for any committed restore point.
    assert_eq!(dom.checkpoints(), [format!("blockproof.{}.2", case.vm())], "only the new checkpoint");
    // The guest overwrites the differing range after the backup: the view does not move.
    dom.write("vda", &[(5 << 20, 65536, 23)]);
    let seen = dir.join("kept-sys.raw");
    harness::qemu::qemu(
        "qemu-img",
        &["convert", "-q", "-f", "raw", "-O", "raw", sys["uri"].as_str().unwrap(), seen.to_str().unwrap()],
    );
    assert_eq!(harness::hash(&seen), harness::hash(&truth), "the kept view is the disk at the view");
    std::fs::remove_file(&seen).unwrap();

    let mut c = dir.cmd("cleanup");
    c.args(["--vm", case.vm(), "--json"]).arg("--state-dir").arg(&case.state);
    let removed = c.json()["removed"].to_string();
    for what in ["backup job of domain", "directory /run/blockproof/"] {
        assert!(removed.contains(what), "{what} in {removed}");
    }
    assert!(!removed.contains("checkpoint"), "the checkpoints were settled already: {removed}");
    case.assert_no_leftovers(2);
    case.assert_keeper_gone();
    // The tainted restore point recorded no checkpoint: the next run reads in full.
    let next = case.backup(&dir);
    let (how, reason) = mode(&next, "sys");
    assert_eq!(how, "full", "{next}");
    assert!(reason.contains("recorded no checkpoint"), "{reason}");
    case.assert_no_leftovers(3);

    // Kept again; the next backup releases it first, says so, and succeeds.
    case.tainted(&dir, Some("1h"), 32);
    dom.write("vda", &[(1 << 20, 65536, 24)]);
    let truth = dom.truth(&dir, "vda", "t2-sys.raw");
    let next = case.backup(&dir);
    assert_eq!(next["status"], "ok", "{next}");
    let warnings = next["warnings"].to_string();
    assert!(warnings.contains("released the point-in-time view kept after the mismatch of snapshot"), "{warnings}");
    assert_eq!(mode(&next, "sys").0, "full", "{next}");
    assert_restores(&dir, &next["snapshot"], "sys", &truth);
    case.assert_no_leftovers(5);
    case.assert_keeper_gone();

    // Released on schedule by the keeper, with no other blockproof command running.
    case.tainted(&dir, Some("2s"), 33);
    harness::wait_until("the kept view being released", || !case.journal().exists());
    case.assert_keeper_gone();
    case.assert_no_leftovers(6);

    // --keep-view 0: released at once.
    case.backup(&dir);
    let (r, _) = case.tainted(&dir, Some("0"), 34);
    assert_eq!(r["kept_view"], Value::Null, "{r}");
    case.assert_no_leftovers(8);
}
