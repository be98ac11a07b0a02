//! `restore-test --boot` with real QEMU (issue 18: prove the restore, not just the
//! bytes): a restore point is booted in an isolated VM over the binary's own NBD exports
//! and qcow2 overlays. The disk is built here from the host's Debian kernel and a
//! busybox initramfs (harness/bootdisk.rs). A restore point that boots passes, with its
//! boot time recorded; one backed up without the file its init checks fails at once on
//! the failure marker; one whose boot hangs fails at the timeout, and so does a check
//! script that never ends (killed with its children); a stopped test stops its VM. Whatever the outcome, nothing is left: no QEMU, no overlay, socket or
//! directory (each test points TMPDIR at a directory of its own and checks it is empty).

mod harness;

use std::fs;
use std::path::{Path, PathBuf};

use harness::bootdisk::{
    boot_disk, processes_using, uefi_boot_disk, AGENT, APPEND, FAILED, FIRMWARE_OK, HANG, OK, STAY,
};
use harness::{assert_json_documented, snap_id, Dir, TestCommand};
use serde_json::Value;

/// The directory the binary's temporary files go to (TMPDIR), created empty.
fn tmp(dir: &Dir) -> PathBuf {
    let t = dir.join("tmp");
    fs::create_dir_all(&t).unwrap();
    t
}

/// `restore-test SNAP --boot` with the test's VM size, temporary directory and JSON.
fn boot_cmd(dir: &Dir, tmp: &Path, snap: &str) -> TestCommand {
    let mut c = dir.repo_cmd("restore-test");
    c.arg(snap).args(["--boot", "--memory", "256", "--cpus", "1", "--json"]).env("TMPDIR", tmp.to_str().unwrap());
    c
}

/// A direct kernel boot of the test disk, the kernel and initrd read from the backup.
fn kernel_boot<'a>(c: &'a mut TestCommand, append: &str) -> &'a mut TestCommand {
    c.args(["--kernel", "/boot/vmlinuz", "--initrd", "/boot/initrd.img", "--append", append])
}

/// Nothing of the test is left: no file in TMPDIR, no process mentioning it.
fn assert_nothing_left(tmp: &Path) {
    let left: Vec<_> = fs::read_dir(tmp).unwrap().map(|e| e.unwrap().path()).collect();
    assert!(left.is_empty(), "left behind: {left:?}");
    let procs = processes_using(tmp);
    assert!(procs.is_empty(), "processes left: {procs:?}");
}

fn parse(stdout: &str) -> Value {
    serde_json::from_str(stdout).unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

#[test]
fn a_restore_point_that_boots_passes_and_records_its_boot_time() {
    let dir = Dir::new();
    dir.init();
    let disk = boot_disk(&dir, "vda.img", true);
    let snap = snap_id(&dir.backup("vm", &[("vda", &disk)]));
    let tmp = tmp(&dir);

    let r = kernel_boot(&mut boot_cmd(&dir, &tmp, &snap), APPEND)
        .args(["--console-marker", OK, "--fail-marker", FAILED, "--timeout", "4m"])
        .json();
    assert_eq!((r["passed"].as_bool(), r["kind"].as_str()), (Some(true), Some("boot")), "{r}");
    assert!(r["boot_seconds"].as_f64().unwrap() > 0.0, "{r}");
    assert!(["kvm", "tcg"].contains(&r["accelerator"].as_str().unwrap()), "{r}");
    assert!(r["console_excerpt"].as_str().unwrap().contains(OK), "{r}");
    let c = &r["check"];
    assert_eq!(c["boot"], "kernel");
    assert_eq!(c["kernel"], "vda/part1:/boot/vmlinuz", "read out of the backup's own filesystem");
    assert_eq!(c["initrd"], "vda/part1:/boot/initrd.img");
    assert_eq!((c["console_marker"].as_str(), c["disks"].clone()), (Some(OK), serde_json::json!(["vda"])));
    assert_json_documented("restore-test", &r);
    assert_nothing_left(&tmp);
    // The backup was only read: the restore point still checks whole.
    dir.repo_cmd("check").args(["--read-data"]).ok();

    // The firmware boots the disk's own boot code (its MBR writes a line on COM1 and
    // halts: the VM stays up, so the check script can see the QMP socket).
    let script = dir.join("check.sh");
    let want = format!(
        "#!/bin/sh\n[ \"$BLOCKPROOF_SNAPSHOT\" = {snap} ] || {{ echo wrong snapshot; exit 1; }}\n\
         [ -S \"$BLOCKPROOF_QMP\" ] || {{ echo no QMP socket; exit 1; }}\n\
         grep -q {FIRMWARE_OK} \"$BLOCKPROOF_CONSOLE\" || {{ echo no marker; exit 1; }}\n"
    );
    fs::write(&script, want).unwrap();
    make_executable(&script);
    let r = boot_cmd(&dir, &tmp, &snap)
        .args(["--console-marker", FIRMWARE_OK, "--script", script.to_str().unwrap(), "--timeout", "2m"])
        .json();
    assert_eq!(r["passed"], true, "{r}");
    assert_eq!((r["check"]["boot"].as_str(), r["check"]["kernel"].as_str()), (Some("firmware"), None), "{r}");
    assert_json_documented("restore-test", &r);
    assert_nothing_left(&tmp);

    // A script that fails fails the test with its status and last line.
    fs::write(&script, "#!/bin/sh\necho the service did not answer\nexit 3\n").unwrap();
    let (stdout, _) = boot_cmd(&dir, &tmp, &snap)
        .args(["--console-marker", FIRMWARE_OK, "--script", script.to_str().unwrap(), "--timeout", "2m"])
        .code(1);
    let r = parse(&stdout);
    let reason = r["reason"].as_str().unwrap();
    assert!(reason.contains("check.sh failed") && reason.contains("the service did not answer"), "{reason}");
    assert_nothing_left(&tmp);

    // Recorded: the newest test of the restore point is that boot test.
    let snaps = dir.snapshots();
    let t = &snaps.iter().find(|s| s["id"] == snap.as_str()).unwrap()["restore_test"];
    assert_eq!((t["kind"].as_str(), t["passed"].as_bool()), (Some("boot"), Some(false)), "{t}");
    let text = dir.repo_cmd("status").ok();
    assert!(text.contains("last restore test:") && text.contains("the service did not answer"), "{text}");
}

#[test]
fn a_restore_point_without_the_checked_file_fails_at_once_on_the_failure_marker() {
    let dir = Dir::new();
    dir.init();
    let good = boot_disk(&dir, "vda.img", true);
    dir.backup("vm", &[("vda", &good)]);
    // Removed at the source before the next backup: that restore point's boot fails.
    let bad = boot_disk(&dir, "vda.img", false);
    let snap = snap_id(&dir.backup("vm", &[("vda", &bad)]));
    let tmp = tmp(&dir);
    let (stdout, _) = kernel_boot(&mut boot_cmd(&dir, &tmp, &snap), APPEND)
        .args(["--console-marker", OK, "--fail-marker", FAILED, "--timeout", "4m"])
        .code(1);
    let r = parse(&stdout);
    assert_eq!(r["passed"], false);
    assert_eq!(r["reason"], format!("the console showed the failure marker {FAILED:?}"), "{r}");
    assert!(r["boot_seconds"].is_null() && r["console_excerpt"].as_str().unwrap().contains(FAILED), "{r}");
    assert_json_documented("restore-test", &r);
    assert_nothing_left(&tmp);

    // In text: the verdict and the end of the console.
    let mut c = dir.repo_cmd("restore-test");
    c.arg(&snap).args(["--boot", "--memory", "256", "--cpus", "1", "--no-record"]).env("TMPDIR", tmp.to_str().unwrap());
    let (text, _) = kernel_boot(&mut c, APPEND).args(["--console-marker", OK, "--fail-marker", FAILED]).code(1);
    assert!(text.contains("FAILED: the console showed the failure marker") && text.contains("console (last lines):"));
    assert!(text.contains(&format!("  {FAILED}")), "{text}");

    // A kernel that is not in the backup fails the test, without starting a VM.
    let (stdout, _) = boot_cmd(&dir, &tmp, &snap)
        .args(["--kernel", "/boot/vmlinuz-missing", "--console-marker", OK, "--no-record"])
        .code(1);
    let r = parse(&stdout);
    assert_eq!(r["reason"], "kernel /boot/vmlinuz-missing is in no filesystem of disk vda", "{r}");
    assert!(r["accelerator"].is_null(), "{r}");
    assert_nothing_left(&tmp);
}

#[test]
fn a_boot_that_hangs_fails_at_the_timeout_with_qemu_stopped_and_nothing_left() {
    let dir = Dir::new();
    dir.init();
    let disk = boot_disk(&dir, "vda.img", true);
    let snap = snap_id(&dir.backup("vm", &[("vda", &disk)]));
    let tmp = tmp(&dir);
    let (stdout, _) = kernel_boot(&mut boot_cmd(&dir, &tmp, &snap), &format!("{APPEND} {HANG}"))
        .args(["--console-marker", OK, "--fail-marker", FAILED, "--timeout", "20s"])
        .code(1);
    let r = parse(&stdout);
    assert_eq!(r["passed"], false);
    assert_eq!(r["reason"], format!("no {OK:?} on the console within 20s"), "{r}");
    // Its console was captured until it was stopped (how far it got in 20s depends on
    // the machine: the init's line when it got there).
    let console = r["console_excerpt"].as_str().unwrap();
    assert!(!console.contains(OK), "{console}");
    eprintln!("console of the hung boot: {:?}", console.lines().last().unwrap_or(""));
    assert_json_documented("restore-test", &r);
    assert_nothing_left(&tmp);
}

#[test]
fn a_check_script_that_does_not_finish_fails_at_the_timeout_and_is_killed_with_its_children() {
    let dir = Dir::new();
    dir.init();
    let disk = boot_disk(&dir, "vda.img", true);
    let snap = snap_id(&dir.backup("vm", &[("vda", &disk)]));
    let tmp = tmp(&dir);
    // No marker: the script starts with the VM; its child outlives it unless its whole
    // process group is killed.
    let script = dir.join("wait-forever.sh");
    let child = dir.join("child.sh");
    fs::write(&child, "sleep 1000\ntrue\n").unwrap();
    fs::write(&script, format!("#!/bin/sh\nsh {}\n", child.display())).unwrap();
    make_executable(&script);
    let (stdout, _) =
        boot_cmd(&dir, &tmp, &snap).args(["--script", script.to_str().unwrap(), "--timeout", "5s"]).code(1);
    let r = parse(&stdout);
    let reason = r["reason"].as_str().unwrap();
    assert_eq!(reason, format!("the check script {} did not finish within 5s", script.display()), "{r}");
    assert!(r["boot_seconds"].is_null() && r["check"]["console_marker"].is_null(), "{r}");
    assert_nothing_left(&tmp);
    let procs = processes_using(&child);
    assert!(procs.is_empty(), "the script's child was not killed: {procs:?}");
}

#[test]
fn sigterm_stops_the_vm_and_removes_everything() {
    let dir = Dir::new();
    dir.init();
    let disk = boot_disk(&dir, "vda.img", true);
    let snap = snap_id(&dir.backup("vm", &[("vda", &disk)]));
    let tmp = tmp(&dir);
    // The firmware boot halts after its line: a marker that never comes keeps it running.
    let child = boot_cmd(&dir, &tmp, &snap).args(["--console-marker", "never", "--timeout", "10m"]).spawn_piped();
    harness::wait_until("QEMU runs", || !processes_using(&tmp).is_empty());
    // SAFETY: kill has no memory preconditions; the pid is our unreaped child's.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("stopped (SIGTERM)") && stderr.lines().count() == 1, "{stderr}");
    assert_nothing_left(&tmp);
    let records = fs::read_dir(dir.repo().join("state"))
        .map(|d| d.filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().starts_with("restore-test-")).count())
        .unwrap_or(0);
    assert_eq!(records, 0, "a stopped test is no evidence: nothing recorded");
}

#[test]
fn boot_options_are_checked_as_usage_errors() {
    let dir = Dir::new();
    dir.init();
    let img = dir.image("d.img", 1 << 20, 1);
    dir.backup("vm", &[("d", &img)]);
    let cases: &[(&[&str], &str)] = &[
        (&["--boot"], "--boot needs a check"),
        (&["--console-marker", "x"], "--boot"),
        (&["--boot", "--console-marker", "x", "--expect", "/etc"], "--expect"),
        (&["--boot", "--console-marker", "x", "--accel", "xen"], "xen"),
        (&["--boot", "--console-marker", "x", "--initrd", "/i"], "--kernel"),
        (&["--boot", "--script", "/no/such/script"], "/no/such/script: no such file"),
        (&["--boot", "--console-marker", "x", "--timeout", "soon"], "soon"),
        (&["--boot", "--console-marker", "x", "--kernel", "/a/../b"], "invalid --kernel"),
    ];
    for (args, want) in cases {
        let line = dir.repo_cmd("restore-test").arg("vm:latest").args(*args).fails_with_one_line(2);
        assert!(line.contains(want), "{args:?}: {line}");
    }
}

fn make_executable(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(path, fs::Permissions::from_mode(0o755)).unwrap();
}

#[test]
fn the_guest_agent_check_passes_when_the_guests_agent_answers_and_fails_when_it_never_does() {
    let dir = Dir::new();
    dir.init();
    let disk = boot_disk(&dir, "vda.img", true);
    let snap = snap_id(&dir.backup("vm", &[("vda", &disk)]));
    let tmp = tmp(&dir);

    // The guest starts qemu-ga on the port the VM was given: a heartbeat, no marker.
    let r = kernel_boot(&mut boot_cmd(&dir, &tmp, &snap), &format!("{APPEND} {AGENT} {STAY}"))
        .args(["--guest-agent", "--timeout", "4m"])
        .json();
    assert_eq!(r["passed"], true, "{r}");
    assert_eq!(r["check"]["guest_agent"], true, "{r}");
    assert_eq!(r["check"]["console_marker"], Value::Null, "{r}");
    assert!(r["boot_seconds"].as_f64().unwrap() > 0.0, "the agent's first answer: {r}");
    assert!(r["console_excerpt"].as_str().unwrap().contains(OK), "{r}");
    assert_json_documented("restore-test", &r);
    assert_nothing_left(&tmp);

    // A guest without its agent: the marker comes, the agent never answers, and the VM
    // powers off: failed, with the stage it stopped at.
    let (stdout, _) = kernel_boot(&mut boot_cmd(&dir, &tmp, &snap), APPEND)
        .args(["--console-marker", OK, "--guest-agent", "--timeout", "4m"])
        .code(1);
    let r = parse(&stdout);
    let reason = r["reason"].as_str().unwrap();
    assert!(reason.contains("before the guest agent answered"), "{reason}");
    assert_eq!(r["boot_seconds"], Value::Null, "{r}");
    assert_nothing_left(&tmp);
}

#[test]
fn a_restore_point_that_boots_only_by_uefi_boots_with_ovmf() {
    let dir = Dir::new();
    dir.init();
    let disk = uefi_boot_disk(&dir, "vda.img");
    let snap = snap_id(&dir.backup("vm", &[("vda", &disk)]));
    let tmp = tmp(&dir);

    // The disk's own EFI system partition: OVMF's shell runs its startup.nsh, which
    // starts the kernel's EFI stub; nothing is handed to QEMU but the disk.
    let r = boot_cmd(&dir, &tmp, &snap)
        .args(["--firmware", "uefi", "--console-marker", OK, "--fail-marker", FAILED, "--timeout", "4m"])
        .json();
    assert_eq!(r["passed"], true, "{r}");
    assert_eq!((r["check"]["uefi"].as_bool(), r["check"]["boot"].as_str()), (Some(true), Some("firmware")), "{r}");
    assert_json_documented("restore-test", &r);
    assert_nothing_left(&tmp);

    // SeaBIOS finds no boot loader on it: the same restore point fails without UEFI.
    let (stdout, _) =
        boot_cmd(&dir, &tmp, &snap).args(["--console-marker", OK, "--timeout", "30s", "--no-record"]).code(1);
    let r = parse(&stdout);
    assert!(r["reason"].as_str().unwrap().contains("within 30s"), "{r}");
    assert!(r["check"].get("uefi").is_none(), "{r}");
    assert_nothing_left(&tmp);
}

/// `[restore_test.boot]` in a job file: the run boots the latest restore point as
/// `restore-test --boot` would, records it, and a second run soon after finds nothing
/// due.
#[test]
fn a_job_boots_the_restore_point_it_tests() {
    let dir = Dir::new();
    dir.init();
    boot_disk(&dir, "vda.img", true);
    let tmp = tmp(&dir);
    let job = dir.join("job.toml");
    let text = format!(
        r#"version = 1

[repository]
location = "repo"

[restore_test]
every = "1h"

[restore_test.boot]
console_marker = "{OK}"
fail_marker = "{FAILED}"
kernel = "/boot/vmlinuz"
initrd = "/boot/initrd.img"
append = "{APPEND}"
memory = 256
cpus = 1
timeout = "4m"

[[vm]]
name = "web"
disks = ["id=vda,source=vda.img"]
"#
    );
    fs::write(&job, text).unwrap();
    let run = || -> Value {
        let (out, _) = dir.cmd("run").arg(&job).arg("--json").env("TMPDIR", tmp.to_str().unwrap()).code(0);
        parse(&out)
    };
    let r = run();
    let t = &r["restore_tests"][0];
    assert_eq!((t["vm"].as_str(), t["passed"].as_bool()), (Some("web"), Some(true)), "{r}");
    assert_nothing_left(&tmp);
    let status = dir.repo_cmd("status").arg("--json").json();
    let last = &status[0]["last_restore_test"];
    assert_eq!((last["passed"].as_bool(), last["kind"].as_str()), (Some(true), Some("boot")), "{status}");
    let r = run();
    assert_eq!(r["restore_tests"], serde_json::json!([]), "tested within the hour: not due");
}

/// Not a test: writes the bootable test disk to `$BLOCKPROOF_BOOT_DISK` for
/// bench/boot_rto.sh (`cargo test -p blockproof --test boot_test -- --ignored
/// write_boot_disk`).
#[test]
#[ignore]
fn write_boot_disk() {
    let Some(out) = std::env::var_os("BLOCKPROOF_BOOT_DISK") else { return };
    let dir = Dir::new();
    fs::copy(boot_disk(&dir, "vda.img", true), out).unwrap();
}
