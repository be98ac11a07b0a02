//! blockproof-fs against real images made by the real tools: a GPT disk with ext4, FAT32
//! and NTFS; an MBR disk with a primary and a logical partition; a bare ext2 filesystem.

mod common;

use std::collections::BTreeSet;
use std::fs::{self, File};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;

use blockproof_fs::{
    extract, Disk, EntryKind, ExtVersion, ExtractOptions, FatType, Filesystem, FsError, FsKind, FsPath, ReadAt,
    TableKind,
};
use common::disk_image::{self, DIRS, DIR_MTIME, FILE_ATIME, FILE_MTIME, LINK, NTFSCP_MTIME, PARTITIONS};
use common::{image, open_disk, open_fs};

const EXT: u32 = 1;
const FAT: u32 = 2;
const NTFS: u32 = 3;

fn gpt_disk() -> Disk {
    open_disk(&image("filesystems").image)
}

fn names(fs: &Filesystem, path: &str) -> BTreeSet<String> {
    fs.list(path).unwrap().into_iter().map(|e| e.name).collect()
}

fn read(fs: &Filesystem, path: &str) -> Vec<u8> {
    let mut out = Vec::new();
    fs.read(path, &mut out).unwrap();
    out
}

fn mtime(path: &Path) -> i64 {
    fs::symlink_metadata(path).unwrap().mtime()
}

#[test]
fn a_gpt_disk_shows_its_three_partitions_and_filesystems() {
    let disk = gpt_disk();
    assert_eq!(disk.table(), TableKind::Gpt);
    let got: Vec<_> =
        disk.partitions().iter().map(|p| (p.index, p.start, p.size, p.filesystem, p.name.clone().unwrap())).collect();
    let kinds = [FsKind::Ext(ExtVersion::Ext4), FsKind::Fat(FatType::Fat32), FsKind::Ntfs];
    let want: Vec<_> = (0..3)
        .map(|i| {
            let name = ["root", "fat", "ntfs"][i].to_string();
            (i as u32 + 1, PARTITIONS[i].0 * 512, PARTITIONS[i].1 * 512, Some(kinds[i]), name)
        })
        .collect();
    assert_eq!(got, want);
    assert_eq!(disk.partitions()[0].type_name, "Linux filesystem");
    assert_eq!(disk.partitions()[2].type_id, "EBD0A0A2-B9E5-4433-87C0-68B6B72699C7");
    let labels: Vec<_> = (1..=3).map(|i| open_fs(&disk, i).label()).collect();
    assert_eq!(labels, [Some("rootfs".into()), Some("FATVOL".into()), Some("NTFSVOL".into())]);

    let err = disk.open_filesystem(None).unwrap_err();
    assert!(matches!(err, FsError::Ambiguous { count: 3, .. }), "{err}");
    assert_eq!(
        err.to_string(),
        "the disk has 3 filesystems (1: ext4, 2: fat32, 3: ntfs); choose one by its partition number"
    );
    let err = disk.open_filesystem(Some(7)).unwrap_err();
    assert!(matches!(err, FsError::NoSuchPartition { index: 7, .. }) && err.is_usage(), "{err}");
}

#[test]
fn every_filesystem_lists_the_tree_with_sizes_and_times() {
    let disk = gpt_disk();
    for index in [EXT, FAT, NTFS] {
        let fs = open_fs(&disk, index);
        let mut want: BTreeSet<String> = ["big.bin", "dir", "empty", "hostname"].map(String::from).into();
        match index {
            EXT => want.extend(["link".to_string(), "lost+found".to_string()]),
            NTFS => {
                want.insert("ntfscp.txt".to_string());
            }
            _ => {}
        }
        assert_eq!(names(&fs, "/"), want, "partition {index}");
        assert_eq!(names(&fs, "/dir"), ["note.txt", "sub"].map(String::from).into(), "partition {index}");
        assert_eq!(names(&fs, "dir/sub/"), ["deep.txt"].map(String::from).into(), "partition {index}");

        for (path, content, mode) in disk_image::files() {
            let e = fs.stat(path).unwrap();
            assert_eq!((e.kind, e.size), (EntryKind::File, content.len() as u64), "{path} on {index}");
            assert_eq!(e.mtime.unwrap().secs, FILE_MTIME, "{path} on {index}");
            assert_eq!(e.mode, (index == EXT).then_some(mode), "{path} on {index}");
        }
        // `ls FILE` shows the file itself.
        let one = fs.list("/dir/note.txt").unwrap();
        assert_eq!((one.len(), one[0].path.to_string()), (1, "/dir/note.txt".to_string()));
        assert!(matches!(fs.list("/nope"), Err(FsError::NotFound { path }) if path == "/nope"));
        assert!(matches!(fs.list("/hostname/x"), Err(FsError::NotADirectory { .. } | FsError::NotFound { .. })));
    }
}

#[test]
fn ext4_keeps_modes_owners_atimes_and_symlinks_and_is_case_sensitive() {
    let fs = open_fs(&gpt_disk(), EXT);
    for (path, mode) in DIRS {
        let e = fs.stat(path).unwrap();
        assert_eq!((e.kind, e.mode, e.mtime.unwrap().secs), (EntryKind::Dir, Some(mode), DIR_MTIME), "{path}");
    }
    let host = fs.stat("/hostname").unwrap();
    assert_eq!(host.atime.unwrap().secs, FILE_ATIME);
    assert!(host.uid.is_some() && host.gid.is_some());
    let link = fs.stat(LINK.0).unwrap();
    assert_eq!(link.kind, EntryKind::Symlink);
    assert_eq!(fs.read_link(LINK.0).unwrap(), Path::new(LINK.1));
    // Reading through a symlink gives the target's bytes.
    assert_eq!(read(&fs, LINK.0), b"a note in a directory\n");
    assert!(matches!(fs.stat("/HOSTNAME"), Err(FsError::NotFound { .. })));
}

#[test]
fn fat_and_ntfs_match_names_case_insensitively() {
    let disk = gpt_disk();
    for index in [FAT, NTFS] {
        let fs = open_fs(&disk, index);
        assert_eq!(read(&fs, "/DIR/Sub/DEEP.TXT"), b"nested two levels down\n", "partition {index}");
    }
    let ntfs = open_fs(&disk, NTFS);
    assert_eq!(read(&ntfs, "/ntfscp.txt"), disk_image::DiskImage::ntfscp_content());
    assert_eq!(ntfs.stat("/ntfscp.txt").unwrap().mtime.unwrap().secs, NTFSCP_MTIME);
}

/// Random access (what a FUSE mount asks for): any offset and length reads the same bytes
/// as the streamed file, short at its end, nothing past it.
#[test]
fn every_filesystem_reads_files_at_any_offset() {
    let disk = gpt_disk();
    let big = disk_image::random_bytes(disk_image::BIG_LEN, 7);
    let len = big.len() as u64;
    for index in [EXT, FAT, NTFS] {
        let fs = open_fs(&disk, index);
        for (offset, size) in [(0, 4096), (1, 100), (4095, 70_000), (len - 10, 4096), (len, 10), (len + 5000, 10)] {
            let mut buf = vec![0xAAu8; size];
            let n = fs.read_at("/big.bin", offset, &mut buf).unwrap();
            let start = offset.min(len) as usize;
            let want = &big[start..(start + size).min(big.len())];
            assert_eq!(n, want.len(), "partition {index}, offset {offset}");
            assert!(&buf[..n] == want, "partition {index}, offset {offset}");
        }
        let mut buf = [0u8; 64];
        let n = fs.read_at("/dir/sub/deep.txt", 7, &mut buf).unwrap();
        assert_eq!(&buf[..n], b"two levels down\n", "partition {index}");
        assert!(matches!(fs.read_at("/dir", 0, &mut buf), Err(FsError::IsADirectory { .. })), "partition {index}");
        assert!(matches!(fs.read_at("/missing", 0, &mut buf), Err(FsError::NotFound { .. })), "partition {index}");
    }
}

#[test]
fn every_filesystem_reads_files_byte_identical() {
    let disk = gpt_disk();
    for index in [EXT, FAT, NTFS] {
        let fs = open_fs(&disk, index);
        for (path, content, _) in disk_image::files() {
            assert!(read(&fs, path) == content, "{path} on partition {index}");
        }
        let err = fs.read("/dir", &mut Vec::new()).unwrap_err();
        assert!(matches!(err, FsError::IsADirectory { .. }) && err.is_usage(), "{err}");
        let err = fs.read("/missing.txt", &mut Vec::new()).unwrap_err();
        assert_eq!(err.to_string(), "/missing.txt: no such file or directory");
        assert!(matches!(fs.read("/../etc/passwd", &mut Vec::new()), Err(FsError::InvalidPath { .. })));
    }
}

#[test]
fn extraction_returns_the_tree_with_bytes_times_and_ext4_modes() {
    let disk = gpt_disk();
    for index in [EXT, FAT, NTFS] {
        let fs = open_fs(&disk, index);
        let out = tempfile::tempdir().unwrap();
        let report = extract(&fs, &[FsPath::root()], out.path(), &ExtractOptions::default()).unwrap();
        let extra = u64::from(index == NTFS);
        assert_eq!((report.files, report.bytes >= disk_image::BIG_LEN as u64), (5 + extra, true), "{index}");
        assert!(report.skipped.is_empty(), "{:?}", report.skipped);
        for (path, content, mode) in disk_image::files() {
            let p = out.path().join(path);
            // Metadata first: reading the file would update its access time.
            assert_eq!(mtime(&p), FILE_MTIME, "{path} on {index}");
            if index == EXT {
                let meta = fs::metadata(&p).unwrap();
                assert_eq!(meta.permissions().mode() & 0o7777, mode, "{path}");
                assert_eq!(meta.atime(), FILE_ATIME, "{path}");
            }
            assert!(fs::read(&p).unwrap() == content, "{path} on {index}");
        }
        for (dir, mode) in DIRS {
            let p = out.path().join(dir);
            // Directory times are set after their contents are written.
            assert_eq!(mtime(&p), fs.stat(dir).unwrap().mtime.unwrap().secs, "{dir} on {index}");
            if index == EXT {
                assert_eq!(mtime(&p), DIR_MTIME);
                assert_eq!(fs::metadata(&p).unwrap().permissions().mode() & 0o7777, mode);
            }
        }
        if index == EXT {
            assert_eq!(report.symlinks, 1);
            assert_eq!(fs::read_link(out.path().join(LINK.0)).unwrap(), Path::new(LINK.1));
        }
        if index == NTFS {
            assert_eq!(mtime(&out.path().join("ntfscp.txt")), NTFSCP_MTIME);
        }
    }
}

#[test]
fn extraction_of_chosen_paths_keeps_them_in_place() {
    let fs = open_fs(&gpt_disk(), FAT);
    let out = tempfile::tempdir().unwrap();
    let paths = ["/dir/sub/deep.txt", "hostname"].map(|p| FsPath::parse(p).unwrap());
    let report = extract(&fs, &paths, out.path(), &ExtractOptions::default()).unwrap();
    assert_eq!((report.files, report.dirs), (2, 0));
    let found: Vec<_> = disk_image_files(out.path());
    assert_eq!(found, ["dir/sub/deep.txt", "hostname"]);

    // A typo among the paths writes nothing at all.
    let out = tempfile::tempdir().unwrap();
    let paths = ["/hostname", "/no/such"].map(|p| FsPath::parse(p).unwrap());
    let err = extract(&fs, &paths, out.path(), &ExtractOptions::default()).unwrap_err();
    assert_eq!(err.to_string(), "/no: no such file or directory");
    assert!(disk_image_files(out.path()).is_empty());
}

/// Files below `root`, relative, sorted.
fn disk_image_files(root: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in fs::read_dir(&dir).unwrap() {
            let e = e.unwrap();
            if e.file_type().unwrap().is_dir() {
                stack.push(e.path());
            } else {
                out.push(e.path().strip_prefix(root).unwrap().to_string_lossy().into_owned());
            }
        }
    }
    out.sort();
    out
}

#[test]
fn extraction_never_replaces_or_writes_through_a_symlink() {
    let fs = open_fs(&gpt_disk(), EXT);
    let out = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    let host = [FsPath::parse("/hostname").unwrap()];
    extract(&fs, &host, out.path(), &ExtractOptions::default()).unwrap();
    let err = extract(&fs, &host, out.path(), &ExtractOptions::default()).unwrap_err();
    assert!(matches!(err, FsError::TargetExists { .. }) && err.is_usage(), "{err}");

    // A symlink where a directory must go is refused, and nothing lands outside.
    std::os::unix::fs::symlink(outside.path(), out.path().join("dir")).unwrap();
    let err =
        extract(&fs, &[FsPath::parse("/dir/note.txt").unwrap()], out.path(), &ExtractOptions::default()).unwrap_err();
    assert!(matches!(err, FsError::TargetNotDirectory { .. }), "{err}");
    assert!(fs::read_dir(outside.path()).unwrap().next().is_none());

    // With overwrite, a symlink in the file's place is replaced, not written through.
    let victim = outside.path().join("victim");
    fs::write(&victim, b"keep me").unwrap();
    fs::remove_file(out.path().join("hostname")).unwrap();
    std::os::unix::fs::symlink(&victim, out.path().join("hostname")).unwrap();
    let err = extract(&fs, &host, out.path(), &ExtractOptions::default()).unwrap_err();
    assert!(matches!(err, FsError::TargetExists { .. }), "{err}");
    extract(&fs, &host, out.path(), &ExtractOptions { overwrite: true, ..ExtractOptions::default() }).unwrap();
    assert_eq!(fs::read(&victim).unwrap(), b"keep me");
    assert_eq!(fs::read(out.path().join("hostname")).unwrap(), b"web01\n");
    assert!(!fs::symlink_metadata(out.path().join("hostname")).unwrap().file_type().is_symlink());
}

/// Runs a tool of the image builder.
fn tool(args: &[&str]) -> Command {
    let mut c = Command::new(args[0]);
    c.args(&args[1..]);
    c
}

/// A bare filesystem image (no partition table) with the root's `hostname` entry renamed
/// to `../etc/x` (same length) in place; `utf16` for NTFS names.
fn hostile_image(dir: &Path, mkfs: &[&str], utf16: bool) -> Vec<u8> {
    let tree = dir.join("tree");
    disk_image::write_tree(&tree, false);
    let img = dir.join("bare.img");
    File::create(&img).unwrap().set_len(16 << 20).unwrap();
    if utf16 {
        disk_image::run(tool(mkfs).arg(&img), None);
        disk_image::run(tool(&["ntfscp", "-q"]).arg(&img).arg(tree.join("hostname")).arg("hostname"), None);
    } else {
        disk_image::run(tool(mkfs).arg(&tree).arg(&img), None);
    }
    let encode = |s: &str| -> Vec<u8> {
        if utf16 {
            s.encode_utf16().flat_map(u16::to_le_bytes).collect()
        } else {
            s.as_bytes().to_vec()
        }
    };
    let (from, to) = (encode("hostname"), encode("../etc/x"));
    let mut bytes = fs::read(&img).unwrap();
    let mut found = 0;
    for at in 0..bytes.len() - from.len() {
        if bytes[at..at + from.len()] == from[..] {
            bytes[at..at + from.len()].copy_from_slice(&to);
            found += 1;
        }
    }
    assert!(found > 0, "no directory entry to rename");
    bytes
}

#[test]
fn a_hostile_name_inside_a_bare_filesystem_is_never_extracted() {
    // NTFS does not police names: blockproof lists the entry, then skips it and reports it
    // (and would extract everything else).
    let dir = tempfile::tempdir().unwrap();
    let disk = Disk::open(Box::new(hostile_image(dir.path(), &["mkntfs", "-q", "-F", "-Q"], true))).unwrap();
    assert_eq!(disk.table(), TableKind::None);
    assert_eq!((disk.partitions()[0].index, disk.partitions()[0].filesystem), (0, Some(FsKind::Ntfs)));
    let fs = disk.open_filesystem(None).unwrap();
    assert!(names(&fs, "/").contains("../etc/x"));
    let hostile = fs.list("/").unwrap().into_iter().find(|e| e.name == "../etc/x").unwrap();
    assert_eq!(hostile.unsafe_name(), Some("a name with '/' in it"));
    let out = dir.path().join("out");
    let report = extract(&fs, &[FsPath::root()], &out, &ExtractOptions::default()).unwrap();
    assert_eq!(report.skipped.len(), 1, "{report:?}");
    assert_eq!(report.skipped[0].reason, "directory / has an entry named \"../etc/x\", which is a name with '/' in it");
    assert!(!dir.path().join("etc").exists());
    assert_eq!(fs::read_dir(&out).unwrap().count(), 0, "the image holds nothing else");

    // ext4-view already refuses such a directory entry as damage.
    let dir = tempfile::tempdir().unwrap();
    let disk =
        Disk::open(Box::new(hostile_image(dir.path(), &["mke2fs", "-q", "-F", "-t", "ext2", "-d"], false))).unwrap();
    let fs = disk.open_filesystem(Some(0)).unwrap();
    assert_eq!(fs.kind(), FsKind::Ext(ExtVersion::Ext2));
    let err = extract(&fs, &[FsPath::root()], &dir.path().join("out"), &ExtractOptions::default()).unwrap_err();
    assert!(matches!(&err, FsError::Corrupt { detail, .. } if detail.contains("path separator")), "{err}");
    assert!(!dir.path().join("etc").exists());
    // Other paths still extract.
    extract(&fs, &[FsPath::parse("/dir").unwrap()], &dir.path().join("out"), &ExtractOptions::default()).unwrap();
    assert!(dir.path().join("out/dir/sub/deep.txt").is_file());
}

#[test]
fn an_mbr_disk_with_a_primary_and_a_logical_partition() {
    let dir = tempfile::tempdir().unwrap();
    let tree = dir.path().join("tree");
    disk_image::write_tree(&tree, false);
    let img = dir.path().join("mbr.img");
    File::create(&img).unwrap().set_len(64 << 20).unwrap();
    // 1: FAT16 at 1 MiB (20 MiB); 2: extended; 5: ext2 (20 MiB) inside it.
    let table = "label: dos\nstart=2048, size=40960, type=e\nstart=43008, size=86016, type=5\nstart=45056, size=40960, type=83\n";
    disk_image::run(tool(&["sfdisk", "--quiet"]).arg(&img), Some(table.as_bytes()));
    let fat = dir.path().join("fat.img");
    File::create(&fat).unwrap().set_len(40960 * 512).unwrap();
    disk_image::run(tool(&["mkfs.vfat", "-F", "16"]).arg(&fat), None);
    disk_image::run(
        tool(&["mcopy", "-m", "-i"]).env("TZ", "UTC").arg(&fat).arg(tree.join("hostname")).arg("::/"),
        None,
    );
    let ext = dir.path().join("ext.img");
    File::create(&ext).unwrap().set_len(40960 * 512).unwrap();
    disk_image::run(tool(&["mke2fs", "-q", "-F", "-t", "ext2", "-d"]).arg(&tree).arg(&ext), None);
    disk_image::copy_sparse(&fat, &img, 2048 * 512);
    disk_image::copy_sparse(&ext, &img, 45056 * 512);

    let disk = open_disk(&img);
    assert_eq!(disk.table(), TableKind::Mbr);
    let got: Vec<_> =
        disk.partitions().iter().map(|p| (p.index, p.start / 512, p.type_id.as_str(), p.filesystem)).collect();
    assert_eq!(
        got,
        [(1, 2048, "0x0e", Some(FsKind::Fat(FatType::Fat16))), (5, 45056, "0x83", Some(FsKind::Ext(ExtVersion::Ext2)))]
    );
    for index in [1, 5] {
        assert_eq!(read(&open_fs(&disk, index), "/hostname"), b"web01\n", "partition {index}");
    }
}

#[test]
fn a_damaged_primary_gpt_falls_back_to_the_backup() {
    let src = image("filesystems");
    // The primary header's CRC no longer matches once one byte of it changes.
    let damaged = Patched { inner: blockproof_fs::ImageFile::open(&src.image).unwrap(), at: 512 + 40, byte: 0x55 };
    let disk = Disk::open(Box::new(damaged)).unwrap();
    assert_eq!(disk.partitions().len(), 3);
    assert_eq!(read(&disk.open_filesystem(Some(FAT)).unwrap(), "/hostname"), b"web01\n");
}

/// A disk with one byte replaced.
struct Patched {
    inner: blockproof_fs::ImageFile,
    at: u64,
    byte: u8,
}

impl ReadAt for Patched {
    fn size(&self) -> u64 {
        self.inner.size()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.inner.read_at(buf, offset)?;
        if (offset..offset + buf.len() as u64).contains(&self.at) {
            buf[(self.at - offset) as usize] = self.byte;
        }
        Ok(())
    }
}
