//! A small QMP client: the QEMU Machine Protocol over a unix socket, as spoken by a QEMU
//! process (`-qmp unix:PATH,server=on,wait=off`) and by qemu-storage-daemon
//! (`--chardev socket,...,id=m --monitor chardev=m`). One JSON document per line: the
//! server's greeting, `qmp_capabilities`, then commands, each answered by `return` or
//! `error`; asynchronous events may come between and are skipped.
//!
//! This is the first step of a VM source (issue 16, docs/LIVE-VMS.md): blockproof finds
//! a VM's disks over QMP. Fleecing, exports and bitmap rotation over QMP are planned.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use serde_json::{json, Value};

/// What [`QmpError::Protocol`] says when the peer closed the connection.
const CLOSED: &str = "the connection was closed";

/// How long one QMP command may take to answer.
const REPLY_TIMEOUT: Duration = Duration::from_secs(60);

/// Format drivers: the nodes that can be a VM's disk. Protocol nodes (`file`,
/// `host_device`, `nbd`, ...) and filters lie under them.
const FORMAT_DRIVERS: &[&str] = &["qcow2", "raw", "qed", "vmdk", "vhdx", "vpc", "vdi", "luks", "parallels"];

/// Errors of a QMP conversation.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("cannot connect to the QMP socket {path}: {source}")]
    Connect { path: PathBuf, source: std::io::Error },
    #[error("QMP socket {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    /// The peer did not speak QMP (no greeting, a reply that is not JSON, ...).
    #[error("QMP socket {path} does not speak QMP: {what}")]
    Protocol { path: PathBuf, what: String },
    /// QEMU refused a command.
    #[error("QMP command {command} failed ({class}): {desc}")]
    Command { command: String, class: String, desc: String },
}

/// An open QMP session (capabilities negotiated).
pub struct Qmp {
    path: PathBuf,
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    /// The QEMU version the greeting named (`major.minor.micro`).
    version: String,
}

impl std::fmt::Debug for Qmp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qmp").field("path", &self.path).field("version", &self.version).finish()
    }
}

impl Qmp {
    /// Connects, reads the greeting and leaves capabilities negotiation mode.
    pub fn connect(path: &Path) -> Result<Qmp, QmpError> {
        Qmp::connect_within(path, REPLY_TIMEOUT)
    }

    /// [`Qmp::connect`], where every read and write of the session gives up after
    /// `timeout` (a hung QEMU is then the caller's to kill).
    pub fn connect_within(path: &Path, timeout: Duration) -> Result<Qmp, QmpError> {
        let stream =
            UnixStream::connect(path).map_err(|source| QmpError::Connect { path: path.to_path_buf(), source })?;
        let io = |source| QmpError::Io { path: path.to_path_buf(), source };
        stream.set_read_timeout(Some(timeout)).map_err(io)?;
        stream.set_write_timeout(Some(timeout)).map_err(io)?;
        let writer = stream.try_clone().map_err(io)?;
        let mut qmp = Qmp { path: path.to_path_buf(), reader: BufReader::new(stream), writer, version: String::new() };
        let greeting = qmp.read()?;
        let v = greeting
            .get("QMP")
            .and_then(|q| q.get("version"))
            .and_then(|v| v.get("qemu"))
            .ok_or_else(|| qmp.protocol(format!("expected a QMP greeting, got {greeting}")))?;
        qmp.version = format!("{}.{}.{}", v["major"], v["minor"], v["micro"]);
        qmp.execute("qmp_capabilities", None)?;
        Ok(qmp)
    }

    /// The QEMU version (`major.minor.micro`).
    pub fn version(&self) -> &str {
        &self.version
    }

    fn protocol(&self, what: String) -> QmpError {
        QmpError::Protocol { path: self.path.clone(), what }
    }

    /// Reads one JSON document (one line).
    fn read(&mut self) -> Result<Value, QmpError> {
        let mut line = String::new();
        let n = self.reader.read_line(&mut line).map_err(|source| QmpError::Io { path: self.path.clone(), source })?;
        if n == 0 {
            return Err(self.protocol(CLOSED.into()));
        }
        serde_json::from_str(&line).map_err(|e| self.protocol(format!("not JSON ({e}): {}", line.trim())))
    }

    /// Runs `command` with `arguments`; returns its `return` value.
    pub fn execute(&mut self, command: &str, arguments: Option<Value>) -> Result<Value, QmpError> {
        let mut msg = json!({ "execute": command });
        if let Some(a) = arguments {
            msg["arguments"] = a;
        }
        let mut bytes = serde_json::to_vec(&msg).expect("a QMP command serializes");
        bytes.push(b'\n');
        self.writer.write_all(&bytes).map_err(|source| QmpError::Io { path: self.path.clone(), source })?;
        loop {
            let mut reply = self.read()?;
            if reply.get("event").is_some() {
                continue;
            }
            if let Some(r) = reply.get_mut("return") {
                return Ok(r.take());
            }
            if let Some(e) = reply.get("error") {
                return Err(QmpError::Command {
                    command: command.into(),
                    class: e["class"].as_str().unwrap_or("?").into(),
                    desc: e["desc"].as_str().unwrap_or("?").into(),
                });
            }
            return Err(self.protocol(format!("unexpected reply to {command}: {reply}")));
        }
    }

    /// Asks QEMU to quit. A connection closed before the answer came counts as done:
    /// QEMU was quitting.
    pub fn quit(mut self) -> Result<(), QmpError> {
        match self.execute("quit", None) {
            Ok(_) => Ok(()),
            Err(QmpError::Protocol { what, .. }) if what == CLOSED => Ok(()),
            Err(QmpError::Io { source, .. }) if source.kind() == std::io::ErrorKind::ConnectionReset => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Runs `command` and parses its `return` value as `T`.
    pub fn execute_as<T: serde::de::DeserializeOwned>(
        &mut self,
        command: &str,
        arguments: Option<Value>,
    ) -> Result<T, QmpError> {
        let value = self.execute(command, arguments)?;
        serde_json::from_value(value).map_err(|e| self.protocol(format!("unexpected reply to {command}: {e}")))
    }

    /// The VM's disks: every format node that is neither the backing of another node
    /// nor one of blockproof's own (named `blockproof-…`), by node name — a name the
    /// user (or libvirt) gave, never a position. Sorted by node name.
    pub fn disks(&mut self) -> Result<Vec<VmDisk>, QmpError> {
        let nodes: Vec<NamedNode> = self.execute_as("query-named-block-nodes", Some(json!({ "flat": true })))?;
        Ok(disks_of(nodes))
    }
}

/// A node as `query-named-block-nodes` describes it (the fields blockproof uses).
#[derive(Clone, Debug, Deserialize)]
struct NamedNode {
    #[serde(rename = "node-name")]
    node_name: String,
    drv: String,
    file: String,
    #[serde(default)]
    backing_file: Option<String>,
    image: NodeImage,
    #[serde(rename = "dirty-bitmaps", default)]
    dirty_bitmaps: Vec<NodeBitmap>,
}

#[derive(Clone, Debug, Deserialize)]
struct NodeImage {
    #[serde(rename = "virtual-size")]
    virtual_size: u64,
}

/// A dirty bitmap of a node.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct NodeBitmap {
    /// Empty for an anonymous bitmap (a block job's own, e.g. a running backup's).
    #[serde(default)]
    pub name: String,
    /// Recording writes (enabled).
    #[serde(default)]
    pub recording: bool,
    /// Stored in the image (qcow2) when QEMU closes it.
    #[serde(default)]
    pub persistent: bool,
    /// In use by a job or an export.
    #[serde(default)]
    pub busy: bool,
    /// Loaded `in-use` from an image QEMU did not close cleanly: its content is unknown.
    #[serde(default)]
    pub inconsistent: bool,
    #[serde(default)]
    pub granularity: u64,
    /// Dirty bytes.
    #[serde(default)]
    pub count: u64,
}

/// One disk of a VM, as found over QMP.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmDisk {
    /// Its stable id: the node name.
    pub id: String,
    /// The format driver (`qcow2`, `raw`, ...): only qcow2 keeps persistent bitmaps.
    pub driver: String,
    /// The image file (or device) under it.
    pub filename: String,
    /// Its size in bytes.
    pub size: u64,
    pub bitmaps: Vec<NodeBitmap>,
}

fn disks_of(nodes: Vec<NamedNode>) -> Vec<VmDisk> {
    let ours = |n: &&NamedNode| n.node_name.starts_with("blockproof-");
    // What another node (not one of blockproof's own overlays) uses as its backing.
    let backings: Vec<&str> = nodes.iter().filter(|n| !ours(n)).filter_map(|n| n.backing_file.as_deref()).collect();
    let mut disks: Vec<VmDisk> = nodes
        .iter()
        .filter(|n| FORMAT_DRIVERS.contains(&n.drv.as_str()))
        .filter(|n| !n.node_name.is_empty() && !ours(n))
        .filter(|n| !backings.contains(&n.file.as_str()))
        .map(|n| VmDisk {
            id: n.node_name.clone(),
            driver: n.drv.clone(),
            filename: n.file.clone(),
            size: n.image.virtual_size,
            // A job's anonymous bitmaps are nobody's change tracking.
            bitmaps: n.dirty_bitmaps.iter().filter(|b| !b.name.is_empty()).cloned().collect(),
        })
        .collect();
    disks.sort_by(|a, b| a.id.cmp(&b.id));
    disks
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake QMP server: greets, answers capabilities, then reads `quit` and either
    /// sends an event and the answer, or closes the connection at once.
    fn fake_qemu(answer: bool) -> (tempfile::TempDir, PathBuf, std::thread::JoinHandle<Vec<String>>) {
        use std::os::unix::net::UnixListener;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let server = std::thread::spawn(move || {
            let (s, _) = listener.accept().unwrap();
            let mut r = BufReader::new(s.try_clone().unwrap());
            let mut w = s;
            let mut got = Vec::new();
            let greeting =
                r#"{"QMP": {"version": {"qemu": {"major": 10, "minor": 0, "micro": 2}}, "capabilities": []}}"#;
            writeln!(w, "{greeting}").unwrap();
            for _ in 0..2 {
                let mut line = String::new();
                r.read_line(&mut line).unwrap();
                got.push(line);
                if got.len() == 2 && !answer {
                    return got;
                }
                if got.len() == 2 {
                    writeln!(w, r#"{{"event": "SHUTDOWN", "data": {{}}}}"#).unwrap();
                }
                writeln!(w, r#"{{"return": {{}}}}"#).unwrap();
            }
            got
        });
        (dir, path, server)
    }

    #[test]
    fn quit_negotiates_skips_events_and_a_closed_connection_is_quitting() {
        for answer in [true, false] {
            let (_dir, path, server) = fake_qemu(answer);
            let qmp = Qmp::connect_within(&path, Duration::from_secs(5)).unwrap();
            assert_eq!(qmp.version(), "10.0.2");
            qmp.quit().unwrap_or_else(|e| panic!("answer {answer}: {e}"));
            let got = server.join().unwrap();
            assert!(got[0].contains("qmp_capabilities") && got[1].contains("\"quit\""), "{got:?}");
        }
    }

    fn node(name: &str, drv: &str, file: &str, backing: Option<&str>) -> NamedNode {
        NamedNode {
            node_name: name.into(),
            drv: drv.into(),
            file: file.into(),
            backing_file: backing.map(str::to_string),
            image: NodeImage { virtual_size: 1 << 20 },
            dirty_bitmaps: vec![],
        }
    }

    #[test]
    fn a_jobs_anonymous_bitmap_is_no_disk_bitmap() {
        // What qemu 10 lists for a disk while a blockdev-backup runs from it.
        let reply = json!([{"node-name": "sys", "drv": "qcow2", "file": "/i/s.qcow2",
            "image": {"virtual-size": 8_388_608},
            "dirty-bitmaps": [
                {"busy": true, "recording": true, "persistent": false, "granularity": 65536, "count": 0},
                {"name": "blockproof/v/sys/2", "busy": false, "recording": true, "persistent": true,
                 "granularity": 65536, "count": 0}]}]);
        let nodes: Vec<NamedNode> = serde_json::from_value(reply).expect("a reply with an anonymous bitmap parses");
        let disks = disks_of(nodes);
        let names: Vec<&str> = disks[0].bitmaps.iter().map(|b| b.name.as_str()).collect();
        assert_eq!(names, ["blockproof/v/sys/2"]);
    }

    #[test]
    fn disks_are_top_format_nodes_by_name() {
        let nodes = vec![
            node("vdb", "raw", "/i/b.raw", None),
            node("vdb-file", "file", "/i/b.raw", None),
            node("vda", "qcow2", "/i/a.qcow2", Some("/i/base.qcow2")),
            node("vda-file", "file", "/i/a.qcow2", None),
            node("base", "qcow2", "/i/base.qcow2", None),
            node("blockproof-fleece-vda", "qcow2", "/s/f.qcow2", Some("/i/a.qcow2")),
        ];
        let ids: Vec<String> = disks_of(nodes).into_iter().map(|d| d.id).collect();
        // `base` backs `vda`: not a disk. `vda` backs blockproof's own fleecing node,
        // which is not a disk and hides nothing.
        assert_eq!(ids, ["vda", "vdb"], "a node another node uses as its backing is not a disk");
    }
}
