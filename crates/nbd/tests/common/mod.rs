//! Harness for tests against the real qemu tools: images in a temporary directory, and a
//! qemu-nbd guard that kills its server when dropped (also when a test panics).

#![allow(dead_code)]

use std::net::TcpListener;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use blockproof_nbd::{ClientOptions, RetryPolicy, Uri};

/// Runs a qemu tool and panics with its output if it fails.
pub fn run(program: &str, args: &[&str]) -> Vec<u8> {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program} (install qemu-utils): {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// A scratch directory holding one qcow2 image.
pub struct Image {
    pub dir: tempfile::TempDir,
    pub path: PathBuf,
}

impl Image {
    /// An empty qcow2 image of `size` bytes.
    pub fn qcow2(size: u64) -> Image {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.qcow2");
        run("qemu-img", &["create", "-q", "-f", "qcow2", path.to_str().unwrap(), &size.to_string()]);
        Image { dir, path }
    }

    /// A qcow2 image converted from `raw` (all-zero clusters stay unallocated).
    pub fn from_raw(raw: &[u8]) -> Image {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src.raw");
        std::fs::write(&src, raw).unwrap();
        let path = dir.path().join("disk.qcow2");
        run("qemu-img", &["convert", "-q", "-f", "raw", "-O", "qcow2", src.to_str().unwrap(), path.to_str().unwrap()]);
        std::fs::remove_file(&src).unwrap();
        Image { dir, path }
    }

    pub fn path(&self) -> &str {
        self.path.to_str().unwrap()
    }

    /// Runs qemu-io commands on the image (opened read-write, so the enabled persistent
    /// bitmaps in it are loaded, updated by the writes, and stored back on close).
    pub fn io(&self, commands: &[&str]) {
        let mut args = vec!["-f", "qcow2"];
        for c in commands {
            args.extend(["-c", c]);
        }
        args.push(self.path());
        run("qemu-io", &args);
    }

    pub fn add_bitmap(&self, name: &str) {
        run("qemu-img", &["bitmap", "--add", "-f", "qcow2", self.path(), name]);
    }

    /// The guest-visible bytes, as `qemu-img convert -O raw` produces them.
    pub fn raw(&self) -> Vec<u8> {
        let out = self.dir.path().join("converted.raw");
        run("qemu-img", &["convert", "-q", "-f", "qcow2", "-O", "raw", self.path(), out.to_str().unwrap()]);
        let bytes = std::fs::read(&out).unwrap();
        std::fs::remove_file(&out).unwrap();
        bytes
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("nbd.sock")
    }
}

/// Where a qemu-nbd listens.
#[derive(Clone)]
pub enum Listen {
    Unix(PathBuf),
    Tcp(u16),
}

/// A running `qemu-nbd --read-only --persistent`; killed and reaped on drop.
pub struct QemuNbd {
    child: Option<Child>,
    pub listen: Listen,
    args: Vec<String>,
}

impl QemuNbd {
    /// Serves `image` (qcow2) on `listen`; `extra` are more qemu-nbd arguments (`-B`, `-x`).
    pub fn start(image: &str, listen: Listen, extra: &[&str]) -> QemuNbd {
        let mut args: Vec<String> =
            ["--read-only", "--persistent", "--shared=4", "-f", "qcow2"].iter().map(|s| s.to_string()).collect();
        args.extend(extra.iter().map(|s| s.to_string()));
        args.push(image.to_string());
        QemuNbd::spawn(listen, args)
    }

    /// Serves with `--image-opts` (e.g. a blkdebug stack); `spec` replaces the image path.
    pub fn start_image_opts(spec: &str, listen: Listen) -> QemuNbd {
        let args =
            ["--read-only", "--persistent", "--shared=4", "--image-opts", spec].into_iter().map(|s| s.to_string());
        QemuNbd::spawn(listen, args.collect())
    }

    fn spawn(listen: Listen, args: Vec<String>) -> QemuNbd {
        let mut cmd = Command::new("qemu-nbd");
        match &listen {
            Listen::Unix(p) => {
                let _ = std::fs::remove_file(p);
                cmd.arg(format!("--socket={}", p.display()));
            }
            Listen::Tcp(port) => {
                cmd.args(["--bind=127.0.0.1", &format!("--port={port}")]);
            }
        }
        cmd.args(&args).stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
        let child = cmd.spawn().expect("cannot run qemu-nbd (install qemu-utils)");
        let mut server = QemuNbd { child: Some(child), listen, args };
        server.wait_ready();
        server
    }

    /// Polls until the server accepts connections (it exits on bad arguments: then panic).
    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let ok = match &self.listen {
                Listen::Unix(p) => UnixStream::connect(p).is_ok(),
                Listen::Tcp(port) => std::net::TcpStream::connect(("127.0.0.1", *port)).is_ok(),
            };
            if ok {
                return;
            }
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                panic!("qemu-nbd {:?} exited: {status}", self.args);
            }
            assert!(Instant::now() < deadline, "qemu-nbd did not start listening");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The same server again, after a delay, on another thread (for reconnect tests).
    pub fn restart_later(&self, delay: Duration) -> Restarter {
        let (listen, args) = (self.listen.clone(), self.args.clone());
        Restarter(Some(std::thread::spawn(move || {
            std::thread::sleep(delay);
            QemuNbd::spawn(listen, args)
        })))
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn uri(&self, export: &str) -> Uri {
        match &self.listen {
            Listen::Unix(p) => Uri::unix(p, export),
            Listen::Tcp(port) => Uri::tcp("127.0.0.1", *port, export),
        }
    }
}

impl Drop for QemuNbd {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A server being restarted on another thread; joined (and so killed) on drop.
pub struct Restarter(Option<JoinHandle<QemuNbd>>);

impl Restarter {
    pub fn join(mut self) -> QemuNbd {
        self.0.take().unwrap().join().expect("restart failed")
    }
}

impl Drop for Restarter {
    fn drop(&mut self) {
        if let Some(h) = self.0.take() {
            let _ = h.join();
        }
    }
}

/// A TCP port free right now on 127.0.0.1.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Test options: quick retries so failure tests stay fast.
pub fn options(contexts: &[String]) -> ClientOptions {
    ClientOptions {
        contexts: contexts.to_vec(),
        depth: 8,
        retry: RetryPolicy {
            attempts: 5,
            initial_delay: Duration::from_millis(20),
            max_delay: Duration::from_millis(200),
        },
        io_timeout: Some(Duration::from_secs(20)),
        ..ClientOptions::default()
    }
}

/// Deterministic pseudo-random bytes.
pub fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// A raw disk of `size` bytes: noise in the given `(offset, len)` regions, zeroes elsewhere.
pub fn sparse_disk(size: usize, regions: &[(usize, usize)]) -> Vec<u8> {
    let mut raw = vec![0u8; size];
    for (i, &(off, len)) in regions.iter().enumerate() {
        raw[off..off + len].copy_from_slice(&noise(i as u64 + 7, len));
    }
    raw
}
