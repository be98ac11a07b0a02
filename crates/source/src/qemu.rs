//! The qemu tools blockproof drives: a private, read-only `qemu-nbd` for image files, and
//! `qemu-img` for the persistent dirty bitmaps of qcow2 images.

use std::fs::File;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde::Deserialize;

use crate::SourceError;

/// How long qemu-nbd may take to listen on its socket.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// The qemu format of an image path, from its extension (`None` for raw).
pub fn image_format(path: &Path) -> Option<&'static str> {
    let ext = path.extension()?.to_str()?.to_ascii_lowercase();
    match ext.as_str() {
        "qcow2" => Some("qcow2"),
        "vmdk" => Some("vmdk"),
        "vhdx" => Some("vhdx"),
        "vdi" => Some("vdi"),
        _ => None,
    }
}

/// A `qemu-nbd --read-only` serving one image on a unix socket in a private directory.
/// Dropping it stops the server; so does the death of this process (`PR_SET_PDEATHSIG`).
pub struct QemuNbd {
    child: Child,
    dir: tempfile::TempDir,
    socket: PathBuf,
    image: PathBuf,
}

impl QemuNbd {
    /// Starts qemu-nbd for `image` (of qemu format `format`), exporting the dirty bitmap
    /// `bitmap` if given, and waits until it accepts connections.
    pub fn start(image: &Path, format: &str, bitmap: Option<&str>) -> Result<QemuNbd, SourceError> {
        let dir = tempfile::Builder::new()
            .prefix("blockproof-nbd-")
            .tempdir()
            .map_err(|e| SourceError::Qemu(format!("cannot create a private socket directory: {e}")))?;
        let socket = dir.path().join("nbd.sock");
        let log_path = dir.path().join("qemu-nbd.log");
        let log = File::create(&log_path).map_err(|e| SourceError::Qemu(format!("{}: {e}", log_path.display())))?;
        let mut cmd = Command::new("qemu-nbd");
        cmd.arg("--read-only")
            .arg("--persistent")
            .arg("--shared=8")
            .arg("--format")
            .arg(format)
            .arg("--socket")
            .arg(&socket);
        if let Some(b) = bitmap {
            cmd.arg("--bitmap").arg(b);
        }
        cmd.arg("--").arg(image).stdin(Stdio::null()).stdout(Stdio::null()).stderr(log);
        // SAFETY: prctl is async-signal-safe and touches no memory of the parent; it makes
        // the kernel kill qemu-nbd (read-only, nothing to flush) when the thread that spawned it dies.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child =
            cmd.spawn().map_err(|e| SourceError::Qemu(format!("cannot run qemu-nbd (install qemu-utils): {e}")))?;
        let mut server = QemuNbd { child, dir, socket, image: image.to_path_buf() };
        server.wait_ready(&log_path)?;
        Ok(server)
    }

    fn wait_ready(&mut self, log: &Path) -> Result<(), SourceError> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(self.exit_error(log, &status.to_string()));
            }
            if let Ok(probe) = UnixStream::connect(&self.socket) {
                // qemu-nbd listens before it opens the image: only its greeting says the
                // image is open. A server that could not open it (an image a running VM
                // holds) closes the connection and exits, and its log says why.
                return match greeting(probe, deadline) {
                    Ok(()) => Ok(()),
                    Err(e) => {
                        let until = Instant::now() + Duration::from_secs(5);
                        while Instant::now() < until {
                            if let Ok(Some(status)) = self.child.try_wait() {
                                return Err(self.exit_error(log, &status.to_string()));
                            }
                            std::thread::sleep(Duration::from_millis(10));
                        }
                        Err(SourceError::Qemu(format!(
                            "qemu-nbd serving {} sent no NBD greeting: {e}",
                            self.image.display()
                        )))
                    }
                };
            }
            if Instant::now() > deadline {
                return Err(SourceError::Qemu(format!(
                    "qemu-nbd did not listen on {} within {}s",
                    self.socket.display(),
                    START_TIMEOUT.as_secs()
                )));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The error for a qemu-nbd that exited, from its log.
    fn exit_error(&self, log: &Path, status: &str) -> SourceError {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let msg = text.lines().map(str::trim).filter(|l| !l.is_empty()).collect::<Vec<_>>().join("; ");
        in_use(Some(&self.image), &msg).unwrap_or_else(|| {
            SourceError::Qemu(format!("qemu-nbd could not serve {} ({status}): {msg}", self.image.display()))
        })
    }

    /// The NBD URI of the export.
    pub fn uri(&self) -> blockproof_nbd::Uri {
        blockproof_nbd::Uri::unix(&self.socket, "")
    }

    /// The image served.
    pub fn image(&self) -> &Path {
        &self.image
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for QemuNbd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.socket);
        let _ = &self.dir; // removed after this
    }
}

/// Reads the 8 bytes an NBD server sends first (`NBDMAGIC`) by `deadline`.
fn greeting(mut stream: UnixStream, deadline: Instant) -> std::io::Result<()> {
    use std::io::Read;
    let left = deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(100));
    stream.set_read_timeout(Some(left))?;
    let mut magic = [0u8; 8];
    stream.read_exact(&mut magic)?;
    if &magic == b"NBDMAGIC" {
        Ok(())
    } else {
        Err(std::io::Error::new(std::io::ErrorKind::InvalidData, "not an NBD server"))
    }
}

/// The error for a qemu tool's message saying another process holds the image's lock
/// (`Failed to get shared "write" lock`, `Failed to get "write" lock`).
fn in_use(image: Option<&Path>, msg: &str) -> Option<SourceError> {
    let image = image?;
    let locked = msg.contains("Failed to get shared \"write\" lock") || msg.contains("Failed to get \"write\" lock");
    locked.then(|| {
        // qemu's own advice ("Is another process using the image?") is what we answer.
        let detail = msg.split("; Is another process").next().unwrap_or(msg);
        let detail = detail.rsplit(": ").next().unwrap_or(detail).to_string();
        SourceError::InUse { image: image.to_path_buf(), detail }
    })
}

/// A persistent dirty bitmap of a qcow2 image, as `qemu-img info` reports it.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct Bitmap {
    pub name: String,
    #[serde(default)]
    pub flags: Vec<String>,
    #[serde(default)]
    pub granularity: u64,
}

impl Bitmap {
    /// Left `in-use` by a program that did not close the image cleanly: its content
    /// cannot be trusted (and qemu refuses to export it).
    pub fn inconsistent(&self) -> bool {
        self.flags.iter().any(|f| f == "in-use")
    }

    /// Recording writes (`auto`), as opposed to disabled.
    pub fn enabled(&self) -> bool {
        self.flags.iter().any(|f| f == "auto")
    }
}

#[derive(Deserialize)]
struct ImageInfo {
    #[serde(rename = "format-specific")]
    format_specific: Option<FormatSpecific>,
}

#[derive(Deserialize)]
struct FormatSpecific {
    #[serde(rename = "type")]
    kind: String,
    data: Option<FormatData>,
}

#[derive(Deserialize)]
struct FormatData {
    #[serde(default)]
    bitmaps: Vec<Bitmap>,
}

fn qemu_img(args: &[&std::ffi::OsStr]) -> Result<Vec<u8>, SourceError> {
    let out = Command::new("qemu-img")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| SourceError::Qemu(format!("cannot run qemu-img (install qemu-utils): {e}")))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let msg = err.lines().map(str::trim).filter(|l| !l.is_empty()).collect::<Vec<_>>().join("; ");
        if let Some(e) = in_use(args.last().map(Path::new), &msg) {
            return Err(e);
        }
        let words: Vec<String> = args.iter().map(|a| a.to_string_lossy().into_owned()).collect();
        return Err(SourceError::Qemu(format!("qemu-img {} failed: {msg}", words.join(" "))));
    }
    Ok(out.stdout)
}

/// The persistent bitmaps of a qcow2 image (none for other formats).
pub fn image_bitmaps(image: &Path) -> Result<Vec<Bitmap>, SourceError> {
    let out = qemu_img(&["info".as_ref(), "--output=json".as_ref(), "--".as_ref(), image.as_os_str()])?;
    let info: ImageInfo = serde_json::from_slice(&out)
        .map_err(|e| SourceError::Qemu(format!("cannot parse qemu-img info of {}: {e}", image.display())))?;
    Ok(info.format_specific.filter(|f| f.kind == "qcow2").and_then(|f| f.data).map(|d| d.bitmaps).unwrap_or_default())
}

/// The persistent bitmaps of a qcow2 image and of its backing chain, top first: what
/// `qemu-nbd --bitmap NAME` can export (it searches the backing chain too).
pub fn chain_bitmaps(image: &Path) -> Result<Vec<Bitmap>, SourceError> {
    let out = qemu_img(&[
        "info".as_ref(),
        "--output=json".as_ref(),
        "--backing-chain".as_ref(),
        "--".as_ref(),
        image.as_os_str(),
    ])?;
    let chain: Vec<ImageInfo> = serde_json::from_slice(&out)
        .map_err(|e| SourceError::Qemu(format!("cannot parse qemu-img info of {}: {e}", image.display())))?;
    Ok(chain
        .into_iter()
        .filter_map(|i| i.format_specific)
        .filter(|f| f.kind == "qcow2")
        .filter_map(|f| f.data)
        .flat_map(|d| d.bitmaps)
        .collect())
}

/// Converts an image (`qemu-img convert -f SRC_FMT -O DST_FMT`); unallocated or zero
/// regions of the source stay unallocated in the result.
/// Creates an empty qcow2 image of `size` bytes (a fleecing overlay; its backing is set
/// when QEMU opens it).
pub(crate) fn qemu_img_create(path: &Path, size: u64) -> Result<(), SourceError> {
    let size = size.to_string();
    qemu_img(&["create".as_ref(), "-q".as_ref(), "-f".as_ref(), "qcow2".as_ref(), path.as_os_str(), size.as_ref()])
        .map(drop)
}

pub fn qemu_img_convert(src: &Path, src_format: &str, dst: &Path, dst_format: &str) -> Result<(), SourceError> {
    qemu_img(&[
        "convert".as_ref(),
        "-q".as_ref(),
        "-f".as_ref(),
        src_format.as_ref(),
        "-O".as_ref(),
        dst_format.as_ref(),
        "--".as_ref(),
        src.as_os_str(),
        dst.as_os_str(),
    ])
    .map(drop)
}

/// Adds an enabled persistent bitmap to a qcow2 image (which nothing else may hold open).
pub fn add_bitmap(image: &Path, name: &str) -> Result<(), SourceError> {
    qemu_img(&["bitmap".as_ref(), "--add".as_ref(), "--".as_ref(), image.as_os_str(), name.as_ref()]).map(drop)
}

/// Removes a persistent bitmap (also an inconsistent one).
pub fn remove_bitmap(image: &Path, name: &str) -> Result<(), SourceError> {
    qemu_img(&["bitmap".as_ref(), "--remove".as_ref(), "--".as_ref(), image.as_os_str(), name.as_ref()]).map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_from_extensions() {
        assert_eq!(image_format(Path::new("/a/b.QCOW2")), Some("qcow2"));
        assert_eq!(image_format(Path::new("x.vmdk")), Some("vmdk"));
        assert_eq!(image_format(Path::new("x.vhdx")), Some("vhdx"));
        assert_eq!(image_format(Path::new("x.vdi")), Some("vdi"));
        assert_eq!(image_format(Path::new("x.img")), None);
        assert_eq!(image_format(Path::new("/dev/sda")), None);
    }

    #[test]
    fn bitmap_flags() {
        let info: ImageInfo = serde_json::from_str(
            r#"{"format-specific": {"type": "qcow2", "data": {"compat": "1.1",
                "bitmaps": [{"flags": ["in-use", "auto"], "name": "b1", "granularity": 65536},
                            {"flags": [], "name": "b2", "granularity": 65536}]}}}"#,
        )
        .unwrap();
        let b = info.format_specific.unwrap().data.unwrap().bitmaps;
        assert!(b[0].inconsistent() && b[0].enabled());
        assert!(!b[1].inconsistent() && !b[1].enabled());
    }
}
