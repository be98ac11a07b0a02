//! A qemu-storage-daemon under test control: it holds images open the way a running VM
//! does (QEMU's image locks included), exports them over NBD, and is driven over QMP.
//! Writes go through its block layer (a writable NBD export), so its dirty bitmaps see
//! them. Dropping it kills the daemon.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{json, Value};

use super::Dir;

pub struct Qsd {
    child: Child,
    /// The QMP socket.
    pub qmp: PathBuf,
}

impl Qsd {
    /// Starts `qemu-storage-daemon` with `args` and a QMP monitor on `<dir>/<name>.qmp`;
    /// returns once the monitor answers.
    pub fn start(dir: &Dir, name: &str, args: &[String]) -> Qsd {
        let qmp = dir.join(&format!("{name}.qmp"));
        let child = Command::new("qemu-storage-daemon")
            .args(args)
            .arg("--chardev")
            .arg(format!("socket,path={},server=on,wait=off,id=qmp0", qmp.display()))
            .args(["--monitor", "chardev=qmp0"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("run qemu-storage-daemon (install qemu-utils)");
        let mut d = Qsd { child, qmp };
        for _ in 0..500 {
            if let Ok(Some(status)) = d.child.try_wait() {
                panic!("qemu-storage-daemon {args:?} exited: {status}");
            }
            if UnixStream::connect(&d.qmp).is_ok() {
                return d;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        d.kill();
        panic!("qemu-storage-daemon never listened on {}", d.qmp.display());
    }

    /// A daemon serving `image` (qcow2) as block node `node` (its file node is
    /// `<node>-file`), with a writable NBD export named `node` on `<dir>/<name>.nbd`.
    pub fn serving(dir: &Dir, name: &str, image: &Path, node: &str) -> (Qsd, PathBuf) {
        let nbd = dir.join(&format!("{name}.nbd"));
        let args = [
            "--blockdev".to_string(),
            format!("driver=file,filename={},node-name={node}-file", image.display()),
            "--blockdev".into(),
            format!("driver=qcow2,file={node}-file,node-name={node}"),
            "--nbd-server".into(),
            format!("addr.type=unix,addr.path={}", nbd.display()),
            "--export".into(),
            format!("type=nbd,id=writer-{node},node-name={node},name={node},writable=on"),
        ];
        (Qsd::start(dir, name, &args), nbd)
    }

    /// Runs one QMP command; `Err` holds the error's description ([`qmp`]).
    pub fn qmp(&self, command: &str, arguments: Value) -> Result<Value, String> {
        qmp(&self.qmp, command, arguments)
    }

    pub fn quit(mut self) {
        let _ = self.qmp("quit", json!({}));
        let _ = self.child.wait();
    }

    /// The daemon's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Qsd {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Runs one QMP command on the monitor at `socket`; `Err` holds the error's description.
/// A monitor serves one client at a time and may still be closing the previous
/// connection: retried then.
pub fn qmp(socket: &Path, command: &str, arguments: Value) -> Result<Value, String> {
    for _ in 0..200 {
        let once = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| qmp_once(socket, command, &arguments)));
        if let Ok(r) = once {
            return r;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("QMP {command} on {} never answered", socket.display());
}

fn qmp_once(socket: &Path, command: &str, arguments: &Value) -> Result<Value, String> {
    let stream = UnixStream::connect(socket).expect("connect to QMP");
    stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut writer = stream;
    let mut line = String::new();
    reader.read_line(&mut line).unwrap(); // the greeting
    let mut call = |v: Value| -> Value {
        writer.write_all(format!("{v}\n").as_bytes()).unwrap();
        loop {
            line.clear();
            assert!(reader.read_line(&mut line).unwrap() > 0, "QMP closed");
            let reply: Value = serde_json::from_str(&line).unwrap();
            if reply.get("event").is_none() {
                return reply;
            }
        }
    };
    call(json!({"execute": "qmp_capabilities"}));
    let reply = call(json!({"execute": command, "arguments": arguments}));
    match reply.get("return") {
        Some(r) => Ok(r.clone()),
        None => Err(reply["error"]["desc"].as_str().unwrap_or("?").to_string()),
    }
}

/// Writes `(offset, length, pattern)` through the NBD export `export` on the unix socket
/// `socket` with qemu-io (so the daemon's block layer, and its dirty bitmaps, see them);
/// returns the 64 KiB chunks touched.
pub fn write_via_nbd(socket: &Path, export: &str, writes: &[(u64, u64, u8)]) -> std::collections::BTreeSet<u64> {
    let mut args = vec!["-f".to_string(), "raw".into()];
    let mut chunks = std::collections::BTreeSet::new();
    for &(off, len, pat) in writes {
        args.push("-c".into());
        args.push(format!("write -P {pat} {off} {len}"));
        chunks.extend(off / super::qemu::CHUNK..(off + len).div_ceil(super::qemu::CHUNK));
    }
    args.push(format!("nbd+unix:///{export}?socket={}", socket.display()));
    super::qemu::qemu("qemu-io", &args.iter().map(String::as_str).collect::<Vec<_>>());
    chunks
}
