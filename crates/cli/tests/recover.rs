//! `blockproof recover` with real QEMU (issue 18: instant recovery). The VM starts from
//! the backup at once, over the binary's own NBD exports under local qcow2 images, while
//! QEMU copies the disks into those images; the command ends when the VM runs on local
//! disks alone. Writes made during the copy (by the guest itself, and through QEMU's
//! block layer with HMP `qemu-io`) end up in the local image with everything the backup
//! held; a recovery whose command is killed leaves its VM running, and `--resume`
//! finishes the copy; one stopped by SIGTERM says so and leaves its VM running; one whose
//! VM died as well starts it again on the images as they
//! are. TCG throughout; the copy is throttled (`--speed`) so that it is still running
//! when the test writes.

mod harness;

use std::path::{Path, PathBuf};
use std::process::Command;

use harness::bootdisk::{boot_disk, processes_using, APPEND, GUEST_BYTES, GUEST_SECTOR, GUEST_WROTE, OK, STAY};
use harness::qsd::qmp;
use harness::{assert_json_documented, snap_id, wait_until, Dir};
use serde_json::{json, Value};

/// The recovered VM of `dir`. `recover` leaves it running by design; the test quits it,
/// and dropping this kills it whatever happened.
struct Vm {
    dir: PathBuf,
}

impl Vm {
    fn call(&self, command: &str, arguments: Value) -> Value {
        qmp(&self.dir.join("qmp.sock"), command, arguments).unwrap_or_else(|e| panic!("{command}: {e}"))
    }

    fn journal(&self) -> Value {
        serde_json::from_slice(&std::fs::read(self.dir.join("recovery.json")).unwrap()).unwrap()
    }

    fn pid(&self) -> Option<u32> {
        std::fs::read(self.dir.join("recovery.json"))
            .ok()
            .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
            .and_then(|j| j["qemu_pid"].as_u64())
            .map(|p| p as u32)
    }

    fn running(&self) -> bool {
        self.pid().is_some_and(alive) && self.call("query-status", json!({}))["status"] == "running"
    }

    /// The copy job of disk 0, while there is one.
    fn job(&self) -> Option<Value> {
        self.call("query-jobs", json!({})).as_array().unwrap().first().cloned()
    }

    /// Waits until QEMU answers on the user's QMP socket and the copy has begun.
    fn wait_copying(&self) {
        wait_until("the copy to run", || {
            self.dir.join("qmp.sock").exists()
                && self.pid().is_some()
                && self.job().is_some_and(|j| j["status"] == "running" && j["current-progress"].as_u64() > Some(0))
        });
    }

    /// Writes through the VM's own disk device (the guest's path into the block layer),
    /// then flushes it.
    fn write(&self, writes: &[(u64, u64, u8)]) {
        let device = "/machine/peripheral/vd0/virtio-backend";
        for (offset, len, pattern) in writes {
            let line = format!("qemu-io -d {device} \"write -P {pattern} {offset} {len}\"");
            let out = self.call("human-monitor-command", json!({ "command-line": line }));
            assert!(!out.as_str().unwrap().contains("rror"), "{line}: {out}");
        }
        let out = self.call("human-monitor-command", json!({ "command-line": format!("qemu-io -d {device} flush") }));
        assert_eq!(out, "", "flush");
    }

    /// Asks QEMU to quit and waits until it has gone.
    fn quit(&self) {
        let pid = self.pid().unwrap();
        let _ = qmp(&self.dir.join("qmp.sock"), "quit", json!({}));
        wait_until("QEMU to quit", || !alive(pid));
    }

    fn kill(&self) {
        if let Some(pid) = self.pid().filter(|&p| alive(p)) {
            // SAFETY: kill has no memory preconditions.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            wait_until("QEMU to die", || !alive(pid));
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Whether `pid` runs (a zombie does not).
fn alive(pid: u32) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    stat.rsplit_once(')').and_then(|(_, r)| r.split_whitespace().next()).is_some_and(|s| s != "Z" && s != "X")
}

/// `image` (qcow2) holds exactly `expected` (raw), and no longer has a backing file.
fn assert_local_and_equal(image: &Path, expected: &Path) {
    let info = Command::new("qemu-img").args(["info", "--output=json"]).arg(image).output().unwrap();
    let info: Value = serde_json::from_slice(&info.stdout).unwrap();
    assert!(info.get("backing-filename").is_none(), "{} still has a backing file: {info}", image.display());
    let out = Command::new("qemu-img")
        .args(["compare", "-f", "qcow2", "-F", "raw"])
        .arg(image)
        .arg(expected)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
}

/// The snapshot's disk restored to a file, with `writes` applied: what the recovered
/// image must hold.
fn expected(dir: &Dir, snap: &str, writes: &[(u64, u64, u8)], extra: Option<(u64, &[u8])>) -> PathBuf {
    use std::os::unix::fs::FileExt;
    let path = dir.restore(snap, "vda", "expected.raw");
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    for (offset, len, pattern) in writes {
        f.write_all_at(&vec![*pattern; *len as usize], *offset).unwrap();
    }
    if let Some((offset, bytes)) = extra {
        f.write_all_at(bytes, offset).unwrap();
    }
    path
}

fn parse(stdout: &[u8]) -> Value {
    serde_json::from_slice(stdout).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(stdout)))
}

#[test]
fn a_vm_boots_from_the_backup_and_ends_on_local_disks_with_every_write_it_made() {
    let dir = Dir::new();
    dir.init();
    let disk = boot_disk(&dir, "vda.img", true);
    let snap = snap_id(&dir.backup("web", &[("vda", &disk)]));
    let vmdir = dir.join("vm");
    let append = format!("{APPEND} {STAY}");
    let mut recover = dir.repo_cmd("recover");
    recover.arg(&snap).arg("--dir").arg(&vmdir);
    recover.args(["--memory", "256", "--cpus", "1", "--accel", "tcg", "--speed", "1M", "--json"]);
    recover.args(["--kernel", "/boot/vmlinuz", "--initrd", "/boot/initrd.img", "--append", &append]);
    let child = recover.spawn_piped();
    let vm = Vm { dir: vmdir.clone() };
    vm.wait_copying();
    // In the gap before the partition: nothing the guest reads.
    let writes = [(128 << 10, 64 << 10, 0x5a), (960 << 10, 4096, 0x6b)];
    vm.write(&writes);
    assert!(vm.job().is_some(), "the copy ended before the writes: slow it down");

    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "recover: {}", String::from_utf8_lossy(&out.stderr));
    let report = parse(&out.stdout);
    assert_json_documented("recover", &report);
    assert_eq!(report["state"], "complete");
    assert_eq!(report["vm_started"], true);
    assert_eq!(report["resumed"], false);
    assert_eq!(report["accelerator"], "tcg");
    assert_eq!(report["disks"][0]["image"], vmdir.join("vda.qcow2").to_str().unwrap());
    assert!(report["vm_start_seconds"].as_f64().unwrap() <= report["seconds"].as_f64().unwrap());
    assert_eq!(vm.journal()["state"], "complete");

    // The guest booted from the backup (its kernel read out of it) and wrote to its disk.
    wait_until("the guest to boot and write", || {
        std::fs::read_to_string(vmdir.join("console.log")).is_ok_and(|c| c.contains(GUEST_WROTE))
    });
    let console = std::fs::read_to_string(vmdir.join("console.log")).unwrap();
    assert!(console.contains(OK), "{console}");
    assert!(vm.running(), "the VM runs on after the command");
    assert!(!vmdir.join("nbd.sock").exists(), "the backup is no longer served");
    vm.quit();
    let expected = expected(&dir, &snap, &writes, Some((GUEST_SECTOR * 512, GUEST_BYTES.as_bytes())));
    assert_local_and_equal(&vmdir.join("vda.qcow2"), &expected);
    assert!(processes_using(&vmdir).is_empty(), "{:?}", processes_using(&vmdir));
}

/// A recovery of a disk of random data (nothing boots: the VM sits in its firmware)
/// throttled to take seconds; returns the running command and the VM.
fn start_recovery(dir: &Dir) -> (String, std::process::Child, Vm) {
    dir.init();
    let disk = dir.random_image("vda.img", 24 << 20, 7);
    let snap = snap_id(&dir.backup("db", &[("vda", &disk)]));
    let vmdir = dir.join("vm");
    let mut recover = dir.repo_cmd("recover");
    recover.arg(&snap).arg("--dir").arg(&vmdir).args(["--memory", "64", "--cpus", "1", "--accel", "tcg"]);
    recover.args(["--speed", "2M", "--json"]).own_process_group();
    let child = recover.spawn_piped();
    let vm = Vm { dir: vmdir };
    vm.wait_copying();
    (snap, child, vm)
}

fn resume(dir: &Dir, vm: &Vm) -> Value {
    let mut c = dir.repo_cmd("recover");
    c.args(["--resume", "--json", "--dir"]).arg(&vm.dir);
    let report = c.json();
    assert_json_documented("recover", &report);
    assert_eq!(report["state"], "complete");
    assert_eq!(report["resumed"], true);
    report
}

#[test]
fn a_killed_recovery_leaves_its_vm_running_and_resume_finishes_the_copy() {
    let dir = Dir::new();
    let (snap, mut child, vm) = start_recovery(&dir);
    child.kill().unwrap();
    child.wait().unwrap();
    let job = vm.job().expect("the copy is unfinished");
    assert!(job["current-progress"].as_u64() < job["total-progress"].as_u64(), "{job}");
    assert!(vm.running(), "the VM runs on without the command");
    // Whole clusters (64 KiB, aligned): written without reading the backup, which is away.
    let writes = [(0, 64 << 10, 0x11), ((24 << 20) - (128 << 10), 128 << 10, 0x22)];
    vm.write(&writes);

    let report = resume(&dir, &vm);
    assert_eq!(report["vm_started"], false, "the running VM is kept");
    assert!(vm.running());
    vm.quit();
    assert_local_and_equal(&vm.dir.join("vda.qcow2"), &expected(&dir, &snap, &writes, None));

    // Done is done: a further resume changes nothing.
    let again = resume(&dir, &vm);
    assert_eq!(again["vm_started"], false);
}

#[test]
fn a_stopped_recovery_whose_vm_died_too_starts_it_again_on_its_images() {
    let dir = Dir::new();
    let (snap, child, vm) = start_recovery(&dir);
    let writes = [(1 << 20, 64 << 10, 0x33)];
    vm.write(&writes);
    // SIGTERM stops the copy, not the VM, and says how to go on.
    // SAFETY: kill has no memory preconditions.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("recovery paused (SIGTERM): the VM runs on") && stderr.contains("--resume"), "{stderr}");
    assert!(vm.running());
    let old = vm.pid().unwrap();
    vm.kill();

    let report = resume(&dir, &vm);
    assert_eq!(report["vm_started"], true);
    assert_ne!(report["qemu_pid"].as_u64().unwrap(), u64::from(old));
    assert!(vm.running());
    vm.quit();
    assert_local_and_equal(&vm.dir.join("vda.qcow2"), &expected(&dir, &snap, &writes, None));
}

#[test]
fn recover_refuses_what_it_cannot_do_in_one_line() {
    let dir = Dir::new();
    dir.init();
    let disk = dir.image("vda.img", 1 << 20, 1);
    let snap = snap_id(&dir.backup("db", &[("vda", &disk)]));
    let busy = dir.join("busy");
    std::fs::create_dir_all(&busy).unwrap();
    std::fs::write(busy.join("x"), b"x").unwrap();
    let err = dir.repo_cmd("recover").arg(&snap).arg("--dir").arg(&busy).fails_with_one_line(2);
    assert!(err.contains("is not empty"), "{err}");
    let err = dir.repo_cmd("recover").args(["--resume", "--dir"]).arg(&busy).fails_with_one_line(2);
    assert!(err.contains("holds no recovery"), "{err}");
    let err = dir.repo_cmd("recover").args(["--resume", "--memory", "64", "--dir"]).arg(&busy).fails_with_one_line(2);
    assert!(err.contains("--resume"), "{err}");
    let err = dir.repo_cmd("recover").arg(&snap).args(["--resume", "--dir"]).arg(&busy).fails_with_one_line(2);
    assert!(err.contains("--resume"), "{err}");
    let err =
        dir.repo_cmd("recover").arg(&snap).args(["--speed", "0", "--dir"]).arg(dir.join("new")).fails_with_one_line(2);
    assert!(err.contains("invalid rate"), "{err}");
    let long = dir.join(&"x".repeat(100));
    let err = dir.repo_cmd("recover").arg(&snap).arg("--dir").arg(&long).fails_with_one_line(2);
    assert!(err.contains("too long"), "{err}");
    // Without --boot, the VM's shape means nothing to restore-test.
    let err = dir.repo_cmd("restore-test").arg(&snap).args(["--memory", "64"]).fails_with_one_line(2);
    assert!(err.contains("--boot"), "{err}");
}
