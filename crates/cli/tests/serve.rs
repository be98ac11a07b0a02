//! `serve-nbd` against real NBD clients: qemu-img convert, nbdinfo --map (when libnbd-bin
//! is installed), several clients at once, writes refused, unknown exports refused, and a
//! qcow2 overlay on top of the export (instant recovery) that writes without touching the
//! backup.

mod harness;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use harness::qemu::qemu;
use harness::{hash, mixed_image, Dir};

/// A running `serve-nbd`, killed when dropped.
struct Server(Child, PathBuf);

impl Server {
    fn start(dir: &Dir, snap: &str, extra: &[&str]) -> Server {
        let sock = dir.join("nbd.sock");
        let child = Command::new(env!("CARGO_BIN_EXE_blockproof"))
            .args(["serve-nbd", "--repo"])
            .arg(dir.repo())
            .arg(snap)
            .arg("--socket")
            .arg(&sock)
            .args(extra)
            .env("BLOCKPROOF_PASSWORD", harness::PASSWORD)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        for _ in 0..500 {
            if std::os::unix::net::UnixStream::connect(&sock).is_ok() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        Server(child, sock)
    }

    fn uri(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.1.display())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn real_clients_read_the_backup_bit_exact() {
    let dir = Dir::new();
    dir.init();
    let (a, b) = (dir.join("a.img"), dir.join("b.img"));
    std::fs::write(&a, mixed_image(24 << 20, 31)).unwrap();
    std::fs::write(&b, mixed_image(8 << 20, 32)).unwrap();
    let r = dir.backup("v", &[("sys", &a), ("data", &b)]);
    let server = Server::start(&dir, r["snapshot"].as_str().unwrap(), &[]);

    // Two clients at once, one per export, through qemu-img.
    let out_a = dir.join("a.out");
    let out_b = dir.join("b.out");
    let ta = {
        let (uri, out) = (server.uri("sys"), out_a.clone());
        std::thread::spawn(move || qemu("qemu-img", &["convert", "-O", "raw", &uri, s(&out)]))
    };
    qemu("qemu-img", &["convert", "-O", "raw", &server.uri("data"), s(&out_b)]);
    ta.join().unwrap();
    assert_eq!(hash(&out_a), hash(&a));
    assert_eq!(hash(&out_b), hash(&b));

    // The zero regions are holes in base:allocation (qemu-img map reads it).
    let map = qemu("qemu-img", &["map", "--output=json", "-f", "raw", &server.uri("sys")]);
    let entries: serde_json::Value = serde_json::from_str(&map).unwrap();
    assert!(entries.as_array().unwrap().iter().any(|e| e["zero"] == true && e["data"] == false), "{map}");
    assert!(entries.as_array().unwrap().iter().any(|e| e["data"] == true), "{map}");
    if let Ok(out) = Command::new("nbdinfo").args(["--map", &server.uri("sys")]).output() {
        if out.status.success() {
            assert!(String::from_utf8_lossy(&out.stdout).contains("hole,zero"));
        }
    }

    // Writes are refused; unknown exports too.
    let w = Command::new("qemu-io").args(["-f", "raw", "-c", "write 0 4k", &server.uri("sys")]).output().unwrap();
    assert!(!w.status.success() || String::from_utf8_lossy(&w.stdout).contains("Permission denied"));
    let u = Command::new("qemu-img").args(["info", &server.uri("nope")]).output().unwrap();
    assert!(!u.status.success());
}

/// Instant recovery: a qcow2 overlay backed by the export takes the VM's writes; the
/// backup stays as it was.
#[test]
fn a_qcow2_overlay_on_the_export_takes_writes() {
    let dir = Dir::new();
    dir.init();
    let img = dir.join("d.img");
    std::fs::write(&img, mixed_image(8 << 20, 33)).unwrap();
    let r = dir.backup("v", &[("d", &img)]);
    let snap = r["snapshot"].as_str().unwrap().to_string();
    let server = Server::start(&dir, &snap, &["--disk", "d"]);
    let overlay = dir.join("overlay.qcow2");
    qemu("qemu-img", &["create", "-q", "-f", "qcow2", "-b", &server.uri("d"), "-F", "raw", s(&overlay)]);
    let out = qemu("qemu-io", &["-c", "write -P 0x5a 1M 64k", "-c", "read -P 0x5a 1M 64k", s(&overlay)]);
    assert!(out.contains("read 65536/65536"), "{out}");
    // Everything else reads through to the backup.
    let converted = dir.join("overlay.raw");
    qemu("qemu-img", &["convert", "-O", "raw", s(&overlay), s(&converted)]);
    let mut expected = std::fs::read(&img).unwrap();
    expected[1 << 20..(1 << 20) + 65536].fill(0x5a);
    assert_eq!(std::fs::read(&converted).unwrap(), expected);
    drop(server);
    assert_eq!(hash(&dir.restore(&snap, "d", "after.img")), hash(&img), "the backup is untouched");
}
