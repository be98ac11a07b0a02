//! `mount`: a snapshot of a real GPT disk (ext4, FAT32 and NTFS partitions, built by the
//! real tools) mounted read-only over FUSE: disk.raw is the disk byte for byte, each
//! filesystem's files and directories are there, writes fail, and `fusermount3 -u` or
//! SIGTERM unmount it with exit 0. Skipped (with a message) where FUSE is not usable.

#[path = "../../fs/tests/common/disk_image.rs"]
mod disk_image;
mod harness;

use std::fs;
use std::io::ErrorKind;
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;

use disk_image::{DiskImage, DIR_MTIME, FILE_MTIME, LINK};
use harness::Dir;

/// The disk of this test binary, built once.
fn image() -> &'static Path {
    static IMAGE: OnceLock<DiskImage> = OnceLock::new();
    &IMAGE
        .get_or_init(|| DiskImage::build(&PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("fs-images").join("mount")))
        .image
}

/// Whether this machine can mount FUSE filesystems: /dev/fuse opens and fusermount3 runs.
fn fuse_usable() -> bool {
    let dev = fs::OpenOptions::new().read(true).write(true).open("/dev/fuse").is_ok();
    let helper = Command::new("fusermount3").arg("-V").output().is_ok_and(|o| o.status.success());
    if !(dev && helper) {
        eprintln!("skipped: FUSE is not usable here (/dev/fuse opens: {dev}, fusermount3 runs: {helper})");
    }
    dev && helper
}

fn is_mounted(point: &Path) -> bool {
    let point = fs::canonicalize(point).unwrap();
    fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .any(|l| l.split(' ').nth(4) == Some(point.to_str().unwrap()))
}

/// A running `blockproof mount` (stderr in a log file); unmounted and killed when dropped.
struct Mounted {
    child: Child,
    point: PathBuf,
    log: PathBuf,
}

impl Mounted {
    fn start(dir: &Dir, snap: &str, name: &str) -> Mounted {
        let point = dir.join(name);
        fs::create_dir(&point).unwrap();
        let log = dir.join(&format!("{name}.log"));
        let mut child = Command::new(env!("CARGO_BIN_EXE_blockproof"))
            .args(["mount", "--repo"])
            .arg(dir.repo())
            .arg(snap)
            .arg(&point)
            .env("BLOCKPROOF_PASSWORD", harness::PASSWORD)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        harness::wait_until("the mount", || {
            if let Ok(Some(status)) = child.try_wait() {
                panic!("mount exited with {status}: {}", fs::read_to_string(&log).unwrap_or_default());
            }
            is_mounted(&point)
        });
        Mounted { child, point, log }
    }

    fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits for the command to end; its exit code.
    fn wait(&mut self) -> Option<i32> {
        self.child.wait().unwrap().code()
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if is_mounted(&self.point) {
            let _ = Command::new("fusermount3").arg("-u").arg("-z").arg(&self.point).status();
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn backed_up(dir: &Dir) -> String {
    dir.init();
    harness::snap_id(&dir.backup("fileserver", &[("os", image())]))
}

#[test]
fn a_mounted_snapshot_shows_the_disk_and_its_files_read_only() {
    if !fuse_usable() {
        return;
    }
    let dir = Dir::new();
    let snap = backed_up(&dir);
    let mut m = Mounted::start(&dir, &snap, "mnt");
    let os = m.point.join("os");

    let mut top: Vec<String> =
        fs::read_dir(&os).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    top.sort();
    assert_eq!(top, ["disk.raw", "part1", "part2", "part3"]);
    assert_eq!(fs::read_dir(&m.point).unwrap().count(), 1);

    let raw = os.join("disk.raw");
    assert_eq!(fs::metadata(&raw).unwrap().len(), disk_image::DISK_SIZE);
    assert!(fs::read(&raw).unwrap() == fs::read(image()).unwrap(), "disk.raw differs from the source image");

    let big = disk_image::random_bytes(disk_image::BIG_LEN, 7);
    for p in 1..=3 {
        let root = os.join(format!("part{p}"));
        let mut names: Vec<String> =
            fs::read_dir(&root).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        names.sort();
        for want in ["big.bin", "dir", "empty", "hostname"] {
            assert!(names.iter().any(|n| n == want), "partition {p}: {names:?}");
        }
        assert!(fs::read(root.join("big.bin")).unwrap() == big, "partition {p}: big.bin differs");
        assert_eq!(fs::read_to_string(root.join("dir/sub/deep.txt")).unwrap(), "nested two levels down\n");
        assert_eq!(fs::read(root.join("empty")).unwrap(), b"");
        let meta = fs::metadata(root.join("big.bin")).unwrap();
        assert_eq!((meta.len(), meta.mtime()), (disk_image::BIG_LEN as u64, FILE_MTIME), "partition {p}");
        let sub: Vec<String> = fs::read_dir(root.join("dir/sub"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(sub, ["deep.txt"], "partition {p}");
    }
    // ext4 keeps modes, directory times and symlinks.
    let ext = os.join("part1");
    for (path, _, mode) in disk_image::files() {
        assert_eq!(fs::metadata(ext.join(path)).unwrap().permissions().mode() & 0o7777, mode, "{path}");
    }
    assert_eq!(fs::metadata(ext.join("dir")).unwrap().mtime(), DIR_MTIME);
    assert_eq!(fs::read_link(ext.join(LINK.0)).unwrap(), Path::new(LINK.1));
    assert_eq!(fs::read_to_string(ext.join(LINK.0)).unwrap(), fs::read_to_string(ext.join(LINK.1)).unwrap());
    assert_eq!(fs::read_link(ext.join(LINK.0)).unwrap(), Path::new(LINK.1));

    // Read-only, every way.
    for err in [
        fs::write(ext.join("hostname"), b"x").unwrap_err(),
        fs::write(ext.join("new-file"), b"x").unwrap_err(),
        fs::OpenOptions::new().write(true).open(&raw).unwrap_err(),
        fs::create_dir(os.join("part2/newdir")).unwrap_err(),
        fs::remove_file(os.join("part2/hostname")).unwrap_err(),
    ] {
        assert_eq!(err.kind(), ErrorKind::ReadOnlyFilesystem, "{err}");
    }
    assert_eq!(fs::metadata(ext.join("absent")).unwrap_err().kind(), ErrorKind::NotFound);

    let out = Command::new("fusermount3").arg("-u").arg(&m.point).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(m.wait(), Some(0), "{}", m.log());
    assert!(!is_mounted(&m.point));
    assert_eq!(fs::read_dir(&m.point).unwrap().count(), 0, "the mount point is empty again");
    assert!(m.log().contains("unmounted"), "{}", m.log());
}

#[test]
fn sigterm_unmounts_cleanly_even_when_the_mount_point_is_busy() {
    if !fuse_usable() {
        return;
    }
    let dir = Dir::new();
    let snap = backed_up(&dir);
    let mut m = Mounted::start(&dir, &snap, "mnt");
    // A file held open inside the mount: a plain unmount would be refused (busy).
    let held = fs::File::open(m.point.join("os/part2/hostname")).unwrap();
    let pid = m.child.id().to_string();
    assert!(Command::new("kill").args(["-s", "TERM", &pid]).status().unwrap().success());
    assert_eq!(m.wait(), Some(0), "{}", m.log());
    assert!(!is_mounted(&m.point), "{}", m.log());
    assert_eq!(fs::read_dir(&m.point).unwrap().count(), 0);
    assert!(m.log().contains("unmounted") && m.log().contains("SIGTERM"), "{}", m.log());
    drop(held);
}

/// A damaged chunk fails the read that meets it with EIO (and says why); the mount stays
/// up and unmounts cleanly. A disk without a filesystem shows only disk.raw.
#[test]
fn a_damaged_chunk_is_an_io_error_for_that_read_only() {
    if !fuse_usable() {
        return;
    }
    let dir = Dir::new();
    dir.init();
    let img = dir.join("d.img");
    fs::write(&img, harness::mixed_image(8 << 20, 5)).unwrap();
    let snap = harness::snap_id(&dir.backup("v", &[("d", &img)]));
    let packs = dir.packs();
    assert_eq!(packs.len(), 1, "{packs:?}");
    let f = fs::OpenOptions::new().read(true).write(true).open(&packs[0]).unwrap();
    let at = f.metadata().unwrap().len() / 2;
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, at).unwrap();
    f.write_all_at(&[b[0] ^ 0x80], at).unwrap();

    let mut m = Mounted::start(&dir, &snap, "mnt");
    let names: Vec<_> = fs::read_dir(m.point.join("d")).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(names, ["disk.raw"]);
    let err = fs::read(m.point.join("d/disk.raw")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(EIO), "{err}");
    assert_eq!(fs::metadata(m.point.join("d/disk.raw")).unwrap().len(), 8 << 20, "still mounted");
    assert!(m.log().contains("blockproof: error:"), "{}", m.log());
    assert!(Command::new("fusermount3").arg("-u").arg(&m.point).status().unwrap().success());
    assert_eq!(m.wait(), Some(0), "{}", m.log());
    assert!(!m.log().contains("panicked"), "{}", m.log());
}

/// EIO, as Linux numbers it.
const EIO: i32 = 5;

#[test]
fn bad_mount_points_are_one_line_errors() {
    let dir = Dir::new();
    let snap = backed_up(&dir);
    let mount = |point: &Path| {
        let mut c = dir.cmd("mount");
        c.arg("--repo").arg(dir.repo()).arg(&snap).arg(point);
        c
    };
    let line = mount(&dir.join("absent")).fails_with_one_line(1);
    assert!(line.contains("cannot mount on") && line.contains("absent"), "{line}");
    fs::write(dir.join("file"), b"").unwrap();
    let line = mount(&dir.join("file")).fails_with_one_line(1);
    assert!(line.contains("not a directory"), "{line}");
    let line = dir.cmd("mount").arg("--repo").arg(dir.repo()).arg(&snap).fails_with_one_line(2);
    assert!(line.contains("MOUNTPOINT"), "{line}");
}
