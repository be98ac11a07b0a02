//! A real libvirt under test control: `virtlogd` and `libvirtd` (`qemu:///system`) are
//! started when not already running (there is no systemd) and stopped again by whoever
//! started them, once the last test holding them is done; transient TCG domains with
//! unique names whose disks live in a directory QEMU's user can read, destroyed when
//! their guard drops (also on panic). No guest OS: the test writes to a disk through
//! QEMU's block layer (HMP `qemu-io` on the disk's device), so libvirt's bitmaps see
//! it, and replays each write on a raw copy, the truth a restore is compared with.

use std::collections::BTreeSet;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use super::qemu::{qemu, s, CHUNK};
use super::{mixed_image, Dir};

pub const URI: &str = "qemu:///system";

/// Runs `virsh -c qemu:///system ARGS`; returns (success, stdout, stderr).
pub fn virsh_try(args: &[&str]) -> (bool, String, String) {
    let out = Command::new("virsh").arg("-c").arg(URI).args(args).stdin(Stdio::null()).output().expect("run virsh");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs virsh; panics with its error when it fails.
pub fn virsh(args: &[&str]) -> String {
    let (ok, out, err) = virsh_try(args);
    assert!(ok, "virsh {args:?}: {err}");
    out
}

/// The daemons this process started (none when they were already running).
pub struct Daemons {
    started: Vec<Child>,
}

impl Drop for Daemons {
    fn drop(&mut self) {
        // libvirtd first, then virtlogd: the reverse of their start.
        for c in self.started.iter_mut().rev() {
            // SAFETY: kill has no memory effects; the pid is our own child's.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let _ = c.wait();
        }
    }
}

static DAEMONS: Mutex<Weak<Daemons>> = Mutex::new(Weak::new());

fn listening(socket: &str) -> bool {
    std::os::unix::net::UnixStream::connect(socket).is_ok()
}

/// The running daemons: started on first use by this process, stopped when the last
/// holder drops them.
pub fn daemons() -> Arc<Daemons> {
    let mut held = DAEMONS.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(d) = held.upgrade() {
        return d;
    }
    let mut started = Vec::new();
    for (program, socket) in [("virtlogd", "/run/libvirt/virtlogd-sock"), ("libvirtd", "/run/libvirt/libvirt-sock")] {
        if listening(socket) {
            continue;
        }
        let child = Command::new(program)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("{program}: {e} (install libvirt-daemon-system: scripts/test.sh)"));
        started.push(child);
        let deadline = Instant::now() + Duration::from_secs(60);
        while !listening(socket) {
            assert!(Instant::now() < deadline, "{program} never listened on {socket}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let d = Arc::new(Daemons { started });
    *held = Arc::downgrade(&d);
    d
}

/// One disk of a test domain.
pub struct DiskDef {
    pub target: &'static str,
    /// `qcow2` or `raw`.
    pub format: &'static str,
    pub size: usize,
    pub serial: Option<&'static str>,
}

/// A transient domain, destroyed on drop.
pub struct Domain {
    pub name: String,
    /// The domain's XML as created (to create it again after a destroy).
    pub xml: PathBuf,
    /// Where its images are (mode 0755, so QEMU's user reaches them).
    pub images: tempfile::TempDir,
    disks: Vec<(DiskDef, PathBuf, PathBuf)>,
    running: bool,
    _daemons: Arc<Daemons>,
}

impl Domain {
    /// Creates and starts a domain `bp-<tag>-<pid>` with `disks`, each filled with
    /// generated content (seeded by its position).
    pub fn create(tag: &str, disks: Vec<DiskDef>) -> Domain {
        let daemons = daemons();
        let images = tempfile::Builder::new().prefix("blockproof-libvirt-").tempdir().unwrap();
        std::fs::set_permissions(images.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let name = format!("bp-{tag}-{}", std::process::id());
        let mut devices = String::new();
        let mut made = Vec::new();
        for (i, d) in disks.into_iter().enumerate() {
            let model = images.path().join(format!("{}.model.raw", d.target));
            std::fs::write(&model, mixed_image(d.size, 40 + i as u64)).unwrap();
            let image = images.path().join(format!("{}.{}", d.target, d.format));
            qemu("qemu-img", &["convert", "-q", "-f", "raw", "-O", d.format, s(&model), s(&image)]);
            std::fs::set_permissions(&image, std::fs::Permissions::from_mode(0o644)).unwrap();
            let serial = d.serial.map(|x| format!("<serial>{x}</serial>")).unwrap_or_default();
            devices.push_str(&format!(
                "<disk type='file' device='disk'><driver name='qemu' type='{}'/><source file='{}'/>\
                 <target dev='{}' bus='virtio'/>{serial}<alias name='ua-{}'/></disk>\n",
                d.format,
                image.display(),
                d.target,
                d.target
            ));
            made.push((d, image, model));
        }
        let xml = format!(
            "<domain type='qemu'><name>{name}</name><memory unit='MiB'>128</memory><vcpu>1</vcpu>\
             <os><type arch='x86_64' machine='pc'>hvm</type></os><devices>\n{devices}</devices></domain>\n"
        );
        let xml_path = images.path().join("domain.xml");
        std::fs::write(&xml_path, xml).unwrap();
        let mut dom = Domain { name, xml: xml_path, images, disks: made, running: false, _daemons: daemons };
        dom.start();
        dom
    }

    /// Creates the domain (again) from its XML.
    pub fn start(&mut self) {
        virsh(&["create", s(&self.xml)]);
        self.running = true;
    }

    /// Stops it cleanly for QEMU (persistent bitmaps are stored in the images).
    pub fn destroy(&mut self) {
        virsh(&["destroy", &self.name]);
        self.running = false;
    }

    fn disk(&self, target: &str) -> &(DiskDef, PathBuf, PathBuf) {
        self.disks.iter().find(|(d, _, _)| d.target == target).unwrap_or_else(|| panic!("no disk {target}"))
    }

    /// The image file of disk `target`.
    pub fn image(&self, target: &str) -> &Path {
        &self.disk(target).1
    }

    /// Writes `(offset, length, pattern)` to disk `target` through the guest's device, and
    /// to the truth model; returns the chunks touched.
    pub fn write(&self, target: &str, writes: &[(u64, u64, u8)]) -> BTreeSet<u64> {
        let model = std::fs::OpenOptions::new().write(true).open(&self.disk(target).2).unwrap();
        let mut chunks = BTreeSet::new();
        for &(off, len, pat) in writes {
            let cmd =
                format!("qemu-io -d /machine/peripheral/ua-{target}/virtio-backend \"write -P {pat} {off} {len}\"");
            let out = virsh(&["qemu-monitor-command", &self.name, "--hmp", &cmd]);
            // HMP prints qemu-io's errors and virsh still succeeds.
            assert!(out.trim().is_empty(), "qemu-io on {target}: {out}");
            model.write_all_at(&vec![pat; len as usize], off).unwrap();
            chunks.extend(off / CHUNK..(off + len).div_ceil(CHUNK));
        }
        chunks
    }

    /// Like [`Domain::write`], but hidden from change tracking: every bitmap of disk
    /// `target`'s image node is disabled around the writes (a CBT lie: libvirt's
    /// checkpoints never see them).
    pub fn hidden_write(&self, target: &str, writes: &[(u64, u64, u8)]) -> BTreeSet<u64> {
        let image = self.image(target).to_str().unwrap().to_string();
        let nodes: serde_json::Value =
            serde_json::from_str(&self.qmp(r#"{"execute":"query-named-block-nodes","arguments":{"flat":true}}"#))
                .unwrap();
        let node = nodes["return"]
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["file"] == image.as_str() && n["drv"] != "file")
            .unwrap_or_else(|| panic!("no format node of {image}: {nodes}"));
        let name = node["node-name"].as_str().unwrap();
        let bitmaps: Vec<String> = node["dirty-bitmaps"]
            .as_array()
            .map(|a| a.iter().filter_map(|b| b["name"].as_str().map(String::from)).collect())
            .unwrap_or_default();
        assert!(!bitmaps.is_empty(), "disk {target} has no bitmap to hide the write from: {node}");
        let toggle = |cmd: &str| {
            for b in &bitmaps {
                self.qmp(&serde_json::json!({"execute": cmd, "arguments": {"node": name, "name": b}}).to_string());
            }
        };
        toggle("block-dirty-bitmap-disable");
        let chunks = self.write(target, writes);
        toggle("block-dirty-bitmap-enable");
        chunks
    }

    /// A QMP command through libvirt; its answer.
    pub fn qmp(&self, command: &str) -> String {
        virsh(&["qemu-monitor-command", &self.name, command])
    }

    /// A copy of disk `target`'s content now (the model of every write so far).
    pub fn truth(&self, dir: &Dir, target: &str, name: &str) -> PathBuf {
        let out = dir.join(name);
        std::fs::copy(&self.disk(target).2, &out).unwrap();
        out
    }

    /// The domain's checkpoints.
    pub fn checkpoints(&self) -> Vec<String> {
        virsh(&["checkpoint-list", &self.name, "--name"])
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(String::from)
            .collect()
    }

    /// Whether a job runs on the domain.
    pub fn has_job(&self) -> bool {
        let info = virsh(&["domjobinfo", &self.name]);
        !info.lines().any(|l| l.starts_with("Job type:") && l.contains("None"))
    }

    pub fn is_running(&self) -> bool {
        virsh(&["domstate", &self.name]).trim() == "running"
    }
}

impl Drop for Domain {
    fn drop(&mut self) {
        if self.running {
            let _ = virsh_try(&["destroy", &self.name]);
        }
    }
}

/// Random-looking writes of 4 KiB to 64 KiB at 4 KiB-aligned offsets of a disk of `size`.
pub fn writes(size: u64, count: usize, seed: u64) -> Vec<(u64, u64, u8)> {
    super::qemu::scattered(size, count, seed).into_iter().map(|(o, l, p)| (o, l.min(65536), p)).collect()
}
