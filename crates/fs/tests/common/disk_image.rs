//! A real 512 MiB GPT disk image with ext4, FAT32 and NTFS partitions, made with the
//! ordinary tools and no root: `sfdisk` (fdisk), `mke2fs -d` (e2fsprogs), `mkfs.vfat`
//! (dosfstools) + `mcopy` (mtools), `mkntfs` + `ntfscp` (ntfs-3g), and `wimcapture` +
//! `wimapply` (wimtools), which is the only tool that makes directories on an unmounted
//! NTFS volume. Each filesystem is built in its own file and copied into the sparse disk
//! at its partition's offset, skipping zeros, so the disk costs a few MiB.
//!
//! Shared by blockproof-fs's tests and the CLI's (`#[path]` include).
#![allow(dead_code)]

use std::fs::{self, File, FileTimes};
use std::io::Read;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime};

pub const DISK_SIZE: u64 = 512 << 20;
/// (start sector, sectors) of partitions 1 (ext4), 2 (FAT32) and 3 (NTFS).
pub const PARTITIONS: [(u64, u64); 3] = [(2048, 327_680), (329_728, 327_680), (657_408, 389_120)];
pub const BIG_LEN: usize = 1_500_000;

/// Times given to the tree (even seconds: FAT keeps 2-second steps).
pub const FILE_MTIME: i64 = 1_614_834_368; // 2021-03-04T05:06:08Z
pub const FILE_ATIME: i64 = 1_650_000_000; // 2022-04-15T05:20:00Z
pub const DIR_MTIME: i64 = 1_577_934_246; // 2020-01-02T03:04:06Z
/// The file ntfscp copies in with `-t` (its modification time).
pub const NTFSCP_MTIME: i64 = 1_600_000_000;

/// Files every filesystem holds: (path, content, ext4 mode).
pub fn files() -> Vec<(&'static str, Vec<u8>, u32)> {
    vec![
        ("hostname", b"web01\n".to_vec(), 0o640),
        ("empty", Vec::new(), 0o600),
        ("big.bin", random_bytes(BIG_LEN, 7), 0o644),
        ("dir/note.txt", b"a note in a directory\n".to_vec(), 0o644),
        ("dir/sub/deep.txt", b"nested two levels down\n".to_vec(), 0o755),
    ]
}

/// Directories every filesystem holds: (path, ext4 mode).
pub const DIRS: [(&str, u32); 2] = [("dir", 0o750), ("dir/sub", 0o700)];
/// ext4 only: a relative symlink.
pub const LINK: (&str, &str) = ("link", "dir/note.txt");

/// Deterministic pseudo-random bytes (xorshift64*).
pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(len);
    out
}

pub fn time(secs: i64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(secs as u64)
}

pub struct DiskImage {
    pub dir: PathBuf,
    pub image: PathBuf,
}

impl DiskImage {
    /// Builds the disk in `dir` (emptied first).
    pub fn build(dir: &Path) -> DiskImage {
        let _ = fs::remove_dir_all(dir);
        fs::create_dir_all(dir).unwrap();
        let common = dir.join("tree");
        let ext_tree = dir.join("ext-tree");
        write_tree(&common, false);
        write_tree(&ext_tree, true);

        let image = dir.join("disk.img");
        File::create(&image).unwrap().set_len(DISK_SIZE).unwrap();
        let table = format!(
            "label: gpt\n\
             start={}, size={}, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4, name=root\n\
             start={}, size={}, type=EBD0A0A2-B9E5-4433-87C0-68B6B72699C7, name=fat\n\
             start={}, size={}, type=EBD0A0A2-B9E5-4433-87C0-68B6B72699C7, name=ntfs\n",
            PARTITIONS[0].0, PARTITIONS[0].1, PARTITIONS[1].0, PARTITIONS[1].1, PARTITIONS[2].0, PARTITIONS[2].1
        );
        run(Command::new("sfdisk").arg("--quiet").arg(&image), Some(table.as_bytes()));

        let ext = part_file(dir, "p1.img", 0);
        run(
            Command::new("mke2fs").args(["-q", "-F", "-t", "ext4", "-L", "rootfs", "-d"]).arg(&ext_tree).arg(&ext),
            None,
        );

        let fat = part_file(dir, "p2.img", 1);
        run(Command::new("mkfs.vfat").args(["-F", "32", "-n", "FATVOL"]).arg(&fat), None);
        let mut mcopy = Command::new("mcopy");
        mcopy.env("TZ", "UTC").env("MTOOLS_SKIP_CHECK", "1").args(["-s", "-m", "-i"]).arg(&fat);
        for name in ["hostname", "empty", "big.bin", "dir"] {
            mcopy.arg(common.join(name));
        }
        run(mcopy.arg("::/"), None);

        let ntfs = part_file(dir, "p3.img", 2);
        let start = PARTITIONS[2].0.to_string();
        run(
            Command::new("mkntfs").args(["-q", "-F", "-Q", "-L", "NTFSVOL", "-s", "512", "-p", &start]).arg(&ntfs),
            None,
        );
        let wim = dir.join("tree.wim");
        run(Command::new("wimcapture").arg(&common).arg(&wim).arg("--no-acls"), None);
        run(Command::new("wimapply").arg(&wim).arg("1").arg(&ntfs).arg("--no-acls"), None);
        let extra = dir.join("ntfscp.txt");
        fs::write(&extra, b"copied in with ntfscp\n").unwrap();
        File::options().write(true).open(&extra).unwrap().set_modified(time(NTFSCP_MTIME)).unwrap();
        run(Command::new("ntfscp").args(["-q", "-t"]).arg(&ntfs).arg(&extra).arg("ntfscp.txt"), None);

        for (i, part) in [ext, fat, ntfs].iter().enumerate() {
            copy_sparse(part, &image, PARTITIONS[i].0 * 512);
            fs::remove_file(part).unwrap();
        }
        DiskImage { dir: dir.to_path_buf(), image }
    }

    /// The extra NTFS file's content.
    pub fn ntfscp_content() -> &'static [u8] {
        b"copied in with ntfscp\n"
    }
}

/// An empty, sparse file the size of partition `i`.
fn part_file(dir: &Path, name: &str, i: usize) -> PathBuf {
    let path = dir.join(name);
    File::create(&path).unwrap().set_len(PARTITIONS[i].1 * 512).unwrap();
    path
}

/// The source tree, with modes and times set (directories last).
pub fn write_tree(root: &Path, unix_extras: bool) {
    for (dir, _) in DIRS {
        fs::create_dir_all(root.join(dir)).unwrap();
    }
    let times = FileTimes::new().set_modified(time(FILE_MTIME)).set_accessed(time(FILE_ATIME));
    for (path, content, mode) in files() {
        let p = root.join(path);
        fs::write(&p, &content).unwrap();
        let f = File::options().write(true).open(&p).unwrap();
        f.set_times(times).unwrap();
        f.set_permissions(fs::Permissions::from_mode(mode)).unwrap();
    }
    if unix_extras {
        std::os::unix::fs::symlink(LINK.1, root.join(LINK.0)).unwrap();
    }
    for (dir, mode) in DIRS.iter().rev() {
        let d = File::open(root.join(dir)).unwrap();
        d.set_times(FileTimes::new().set_modified(time(DIR_MTIME)).set_accessed(time(FILE_ATIME))).unwrap();
        d.set_permissions(fs::Permissions::from_mode(*mode)).unwrap();
    }
}

/// Runs a tool (found in PATH, /usr/sbin or /sbin), feeding it `input`; fails the test
/// with its output, or with how to install it when it is missing.
pub fn run(cmd: &mut Command, input: Option<&[u8]>) {
    use std::io::Write;
    use std::process::Stdio;
    let path = std::env::var("PATH").unwrap_or_default();
    cmd.env("PATH", format!("{path}:/usr/sbin:/sbin"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let program = cmd.get_program().to_string_lossy().into_owned();
    let mut child = cmd.spawn().unwrap_or_else(|e| {
        panic!(
            "{program} could not be run ({e}). The file-level restore tests need: \
             apt-get install -y dosfstools mtools ntfs-3g fdisk wimtools e2fsprogs (scripts/test.sh does it)"
        )
    });
    if let Some(input) = input {
        child.stdin.take().unwrap().write_all(input).unwrap();
    }
    drop(child.stdin.take());
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Copies `from` into `to` at `offset`, leaving all-zero blocks as holes.
pub fn copy_sparse(from: &Path, to: &Path, offset: u64) {
    let mut src = File::open(from).unwrap();
    let dst = File::options().write(true).open(to).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    let mut at = 0u64;
    loop {
        let n = src.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        for (i, block) in buf[..n].chunks(64 << 10).enumerate() {
            if block.iter().any(|&b| b != 0) {
                dst.write_all_at(block, offset + at + (i as u64) * (64 << 10)).unwrap();
            }
        }
        at += n as u64;
    }
}
