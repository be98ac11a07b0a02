//! The QMP client against a real qemu-storage-daemon: the greeting and capabilities,
//! typed errors, and a VM's disks found by node name (never by position), with their
//! sizes and dirty bitmaps.

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use blockproof_source::{Qmp, QmpError};
use serde_json::json;

struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn run(program: &str, args: &[&str]) {
    let out = Command::new(program).args(args).output().unwrap();
    assert!(out.status.success(), "{program} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

fn daemon(dir: &Path, blockdevs: &[String]) -> (Daemon, PathBuf) {
    let qmp = dir.join("qmp.sock");
    let mut c = Command::new("qemu-storage-daemon");
    for b in blockdevs {
        c.arg("--blockdev").arg(b);
    }
    c.arg("--chardev").arg(format!("socket,path={},server=on,wait=off,id=m", qmp.display()));
    c.args(["--monitor", "chardev=m"]).stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
    let d = Daemon(c.spawn().expect("qemu-storage-daemon (qemu-utils)"));
    for _ in 0..500 {
        if UnixStream::connect(&qmp).is_ok() {
            return (d, qmp);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("qemu-storage-daemon never listened");
}

#[test]
fn finds_the_disks_of_a_daemon_by_node_name() {
    let tmp = tempfile::tempdir().unwrap();
    let p = |n: &str| tmp.path().join(n).display().to_string();
    run("qemu-img", &["create", "-q", "-f", "qcow2", &p("base.qcow2"), "4M"]);
    run("qemu-img", &["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", &p("base.qcow2"), &p("top.qcow2")]);
    run("qemu-img", &["create", "-q", "-f", "raw", &p("data.raw"), "2M"]);
    let (_d, sock) = daemon(
        tmp.path(),
        &[
            format!("driver=file,filename={},node-name=data-file", p("data.raw")),
            "driver=raw,file=data-file,node-name=data".into(),
            format!("driver=file,filename={},node-name=base-file", p("base.qcow2")),
            "driver=qcow2,file=base-file,node-name=base".into(),
            format!("driver=file,filename={},node-name=sys-file", p("top.qcow2")),
            "driver=qcow2,file=sys-file,backing=base,node-name=sys".into(),
        ],
    );
    let mut qmp = Qmp::connect(&sock).unwrap();
    assert!(qmp.version().starts_with(char::is_numeric), "{}", qmp.version());
    qmp.execute("block-dirty-bitmap-add", Some(json!({"node": "sys", "name": "b", "persistent": true}))).unwrap();

    let disks = qmp.disks().unwrap();
    let ids: Vec<&str> = disks.iter().map(|d| d.id.as_str()).collect();
    assert_eq!(ids, ["data", "sys"], "the backing node is not a disk: {disks:?}");
    assert_eq!((disks[0].driver.as_str(), disks[0].size), ("raw", 2 << 20));
    assert_eq!((disks[1].driver.as_str(), disks[1].size), ("qcow2", 4 << 20));
    assert_eq!(disks[1].filename, p("top.qcow2"));
    let b = &disks[1].bitmaps;
    assert_eq!(b.len(), 1, "{b:?}");
    assert!(b[0].name == "b" && b[0].recording && b[0].persistent && !b[0].inconsistent, "{b:?}");

    // A refused command is a typed error with QEMU's class and description.
    match qmp.execute("block-dirty-bitmap-remove", Some(json!({"node": "sys", "name": "nope"}))) {
        Err(QmpError::Command { command, class, desc }) => {
            assert_eq!((command.as_str(), class.as_str()), ("block-dirty-bitmap-remove", "GenericError"));
            assert!(desc.contains("nope"), "{desc}");
        }
        other => panic!("expected a command error, got {other:?}"),
    }
    // The session is still usable after an error.
    assert_eq!(qmp.disks().unwrap().len(), 2);
}

#[test]
fn a_socket_that_is_not_qmp_is_a_protocol_error() {
    let tmp = tempfile::tempdir().unwrap();
    let sock = tmp.path().join("not-qmp.sock");
    let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let server = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        std::io::Write::write_all(&mut s, b"hello, I am not QEMU\n").unwrap();
    });
    match Qmp::connect(&sock) {
        Err(e @ QmpError::Protocol { .. }) => assert!(e.to_string().contains("does not speak QMP"), "{e}"),
        other => panic!("expected a protocol error, got {other:?}"),
    }
    server.join().unwrap();
    match Qmp::connect(&tmp.path().join("absent.sock")) {
        Err(e @ QmpError::Connect { .. }) => assert!(e.to_string().contains("absent.sock"), "{e}"),
        other => panic!("expected a connect error, got {other:?}"),
    }
}
