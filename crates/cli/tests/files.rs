//! `partitions`, `ls`, `cat` and `restore-files` on a real 512 MiB GPT disk with ext4,
//! FAT32 and NTFS partitions (built by the real tools, see the included builder), and
//! the whole chain today: backup, restore, then files out of the restored disk.

#[path = "../../fs/tests/common/disk_image.rs"]
mod disk_image;
mod harness;

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use disk_image::{DiskImage, DIRS, DIR_MTIME, FILE_MTIME, LINK, NTFSCP_MTIME};
use harness::Dir;

/// The disk of this test binary, built once.
fn image() -> &'static Path {
    static IMAGE: OnceLock<DiskImage> = OnceLock::new();
    &IMAGE
        .get_or_init(|| DiskImage::build(&PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("fs-images").join("cli")))
        .image
}

/// `blockproof SUB --image IMG [--partition N]`.
fn on_image(dir: &Dir, sub: &str, partition: Option<u32>) -> harness::TestCommand {
    let mut c = dir.cmd(sub);
    c.arg("--image").arg(image());
    if let Some(p) = partition {
        c.args(["--partition", &p.to_string()]);
    }
    c
}

#[test]
fn partitions_shows_the_table_and_each_filesystem() {
    let dir = Dir::new();
    let json = on_image(&dir, "partitions", None).arg("--json").json();
    assert_eq!(json["table"], "gpt");
    assert_eq!(json["size"], 512 << 20);
    let rows: Vec<(u64, &str, &str)> = json["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["index"].as_u64().unwrap(), p["filesystem"].as_str().unwrap(), p["label"].as_str().unwrap()))
        .collect();
    assert_eq!(rows, [(1, "ext4", "rootfs"), (2, "fat32", "FATVOL"), (3, "ntfs", "NTFSVOL")]);
    let text = on_image(&dir, "partitions", None).ok();
    assert!(text.contains("partition table: gpt"), "{text}");
    assert!(
        text.lines().any(|l| l.contains("Linux filesystem") && l.contains("ext4") && l.contains("rootfs")),
        "{text}"
    );
}

#[test]
fn ls_lists_the_files_of_each_filesystem() {
    let dir = Dir::new();
    for p in 1..=3 {
        let json = on_image(&dir, "ls", Some(p)).args(["/", "--json"]).json();
        let names: Vec<&str> = json.as_array().unwrap().iter().map(|e| e["name"].as_str().unwrap()).collect();
        for want in ["big.bin", "dir", "empty", "hostname"] {
            assert!(names.contains(&want), "partition {p}: {names:?}");
        }
        let big = json.as_array().unwrap().iter().find(|e| e["name"] == "big.bin").unwrap();
        assert_eq!(big["type"], "file");
        assert_eq!(big["size"], disk_image::BIG_LEN);
        assert_eq!(big["path"], "/big.bin");
        assert_eq!(big["mtime"], "2021-03-04T05:06:08Z");
        assert_eq!(big["mtime_unix"], FILE_MTIME);
        assert_eq!(big["mode"], if p == 1 { serde_json::json!("0644") } else { serde_json::Value::Null });

        let nested = on_image(&dir, "ls", Some(p)).arg("/dir/sub").ok();
        assert!(nested.lines().count() == 1 && nested.contains("deep.txt"), "{nested}");
    }
    let ext = on_image(&dir, "ls", Some(1)).ok();
    assert!(ext.lines().any(|l| l.starts_with("-rw-r-----") && l.ends_with(" hostname")), "{ext}");
    assert!(ext.lines().any(|l| l.starts_with('l') && l.ends_with("link -> dir/note.txt")), "{ext}");
    let one = on_image(&dir, "ls", Some(2)).arg("/dir/note.txt").ok();
    assert!(one.trim_end().ends_with(" /dir/note.txt"), "{one}");
}

#[test]
fn cat_writes_identical_bytes() {
    let dir = Dir::new();
    let big = disk_image::random_bytes(disk_image::BIG_LEN, 7);
    for p in 1..=3 {
        let out = on_image(&dir, "cat", Some(p)).arg("/big.bin").output();
        assert!(out.status.success() && out.stderr.is_empty(), "{}", String::from_utf8_lossy(&out.stderr));
        assert!(out.stdout == big, "partition {p}: {} bytes", out.stdout.len());
        assert_eq!(on_image(&dir, "cat", Some(p)).arg("dir/sub/deep.txt").ok(), "nested two levels down\n");
        assert_eq!(on_image(&dir, "cat", Some(p)).arg("/empty").ok(), "");
    }
}

/// Checks a restored tree against the source tree.
fn assert_restored(root: &Path, ext: bool, what: &str) {
    for (path, content, mode) in disk_image::files() {
        let p = root.join(path);
        let meta = fs::metadata(&p).unwrap_or_else(|e| panic!("{what}: {path}: {e}"));
        assert_eq!(meta.mtime(), FILE_MTIME, "{what}: {path}");
        if ext {
            assert_eq!(meta.permissions().mode() & 0o7777, mode, "{what}: {path}");
        }
        assert!(fs::read(&p).unwrap() == content, "{what}: {path} differs");
    }
    if ext {
        for (d, mode) in DIRS {
            let meta = fs::metadata(root.join(d)).unwrap();
            assert_eq!((meta.mtime(), meta.permissions().mode() & 0o7777), (DIR_MTIME, mode), "{what}: {d}");
        }
        assert_eq!(fs::read_link(root.join(LINK.0)).unwrap(), Path::new(LINK.1), "{what}");
    }
}

#[test]
fn restore_files_returns_the_files_byte_identical_with_times_and_modes() {
    let dir = Dir::new();
    for p in 1..=3u32 {
        let to = dir.join(&format!("out{p}"));
        let report = on_image(&dir, "restore-files", Some(p)).arg("/").arg("--to").arg(&to).arg("--json").json();
        assert_eq!(report["files"], 5 + u64::from(p == 3), "{report}");
        assert_eq!(report["symlinks"], u64::from(p == 1), "{report}");
        assert_restored(&to, p == 1, &format!("partition {p}"));
        if p == 3 {
            assert_eq!(fs::metadata(to.join("ntfscp.txt")).unwrap().mtime(), NTFSCP_MTIME);
        }
    }
    // Chosen paths keep their place below the target.
    let to = dir.join("some");
    let text = on_image(&dir, "restore-files", Some(1)).args(["/dir/sub", "/hostname", "--to"]).arg(&to).ok();
    assert!(text.starts_with("restored 2 files"), "{text}");
    assert_eq!(fs::read(to.join("dir/sub/deep.txt")).unwrap(), b"nested two levels down\n");
    assert_eq!(fs::read(to.join("hostname")).unwrap(), b"web01\n");
    assert!(!to.join("dir/note.txt").exists());

    // Existing files are kept unless --force.
    let line = on_image(&dir, "restore-files", Some(1)).args(["/hostname", "--to"]).arg(&to).fails_with_one_line(2);
    assert!(line.contains("already exists") && line.contains("--force"), "{line}");
    fs::write(to.join("hostname"), b"changed").unwrap();
    on_image(&dir, "restore-files", Some(1)).args(["/hostname", "--force", "--to"]).arg(&to).ok();
    assert_eq!(fs::read(to.join("hostname")).unwrap(), b"web01\n");
}

#[test]
fn bad_requests_are_one_line_errors_with_documented_exit_codes() {
    let dir = Dir::new();
    // (command, --partition, arguments, exit code, part of the message)
    type Case<'a> = (&'a str, Option<u32>, &'a [&'a str], i32, &'a str);
    let cases: [Case; 9] = [
        ("ls", None, &["/"], 2, "choose one with --partition N"),
        ("ls", Some(9), &["/"], 2, "no partition 9 on this disk (it has: 1: ext4, 2: fat32, 3: ntfs)"),
        ("ls", Some(1), &["/nope"], 2, "/nope: no such file or directory"),
        ("cat", Some(2), &["/missing/file"], 2, "/missing: no such file or directory"),
        ("cat", Some(3), &["/dir"], 2, "/dir: is a directory"),
        ("cat", Some(1), &["/../etc/passwd"], 2, "'..' is not allowed"),
        ("restore-files", Some(1), &["../x", "--to", "out"], 2, "'..' is not allowed"),
        ("restore-files", Some(3), &["/dir", "/nope", "--to", "out"], 2, "/nope: no such file or directory"),
        ("ls", Some(1), &["/hostname/x"], 2, "not a directory"),
    ];
    for (sub, partition, args, code, text) in cases {
        let line = on_image(&dir, sub, partition).args(args).fails_with_one_line(code);
        assert!(line.contains(text), "{sub} {args:?}: {line}");
    }
    assert!(!dir.join("out").join("dir").exists(), "a failed restore-files wrote files");

    let garbage = dir.join("garbage.img");
    fs::write(&garbage, disk_image::random_bytes(3 << 20, 1)).unwrap();
    let line = dir.cmd("ls").arg("--image").arg(&garbage).fails_with_one_line(1);
    assert!(line.contains("no partition table and no filesystem"), "{line}");
    let line = dir.cmd("ls").arg("--image").arg(dir.join("absent.img")).fails_with_one_line(2);
    assert!(line.contains("cannot open image"), "{line}");
}

#[test]
fn files_come_back_from_a_backed_up_and_restored_disk() {
    let dir = Dir::new();
    dir.init();
    dir.backup("fileserver", &[("os", image())]);
    let restored = dir.restore("fileserver:latest", "os", "restored.img");
    for p in 1..=3u32 {
        let to = dir.join(&format!("files{p}"));
        dir.cmd("restore-files")
            .arg("--image")
            .arg(&restored)
            .args(["--partition", &p.to_string(), "/", "--to"])
            .arg(&to)
            .ok();
        assert_restored(&to, p == 1, &format!("restored disk, partition {p}"));
    }
}

/// The contract: after a backup, `ls SNAP --disk ID` lists the files and `restore-files`
/// returns them byte-identical, from each of the three filesystems, read straight from the
/// repository (no restore of the disk, no mount, no root).
#[test]
fn files_come_straight_from_a_snapshot() {
    let dir = Dir::new();
    dir.init();
    let snap = dir.backup("fileserver", &[("os", image())])["snapshot"].as_str().unwrap().to_string();
    let on_snap = |sub: &str, p: u32| {
        let mut c = dir.cmd(sub);
        c.arg("--repo").arg(dir.repo()).arg(&snap).args(["--disk", "os", "--partition", &p.to_string()]);
        c
    };
    let parts = {
        let mut c = dir.cmd("partitions");
        c.arg("--repo").arg(dir.repo()).arg("fileserver:latest").args(["--disk", "os"]);
        c.ok()
    };
    assert!(parts.contains("ext4") && parts.contains("fat32") && parts.contains("ntfs"), "{parts}");
    for p in 1..=3u32 {
        let listing = on_snap("ls", p).arg("/dir/sub").ok();
        assert!(listing.contains("deep.txt"), "partition {p}: {listing}");
        assert_eq!(on_snap("cat", p).arg("/dir/sub/deep.txt").ok(), "nested two levels down\n");
        let to = dir.join(&format!("snapfiles{p}"));
        on_snap("restore-files", p).args(["/", "--to"]).arg(&to).ok();
        assert_restored(&to, p == 1, &format!("snapshot, partition {p}"));
    }
    let line = dir.cmd("ls").arg("--repo").arg(dir.repo()).arg(&snap).args(["--disk", "nope"]).fails_with_one_line(2);
    assert!(line.contains("no disk"), "{line}");
}

/// docs/JSON.md names every field `partitions`, `ls` and `restore-files` print.
#[test]
fn file_commands_json_is_documented() {
    let dir = Dir::new();
    harness::assert_json_documented("partitions", &on_image(&dir, "partitions", None).arg("--json").json());
    harness::assert_json_documented("ls", &on_image(&dir, "ls", Some(1)).args(["/", "--json"]).json());
    let to = dir.join("files-json");
    let report = on_image(&dir, "restore-files", Some(1)).args(["/", "--json", "--to"]).arg(&to).json();
    harness::assert_json_documented("restore-files", &report);
}

/// `restore-test` walks all three filesystems of the backed-up disk (ext4 with its
/// symlink, FAT32, NTFS) and reads every file when asked: a pass, with every file read
/// to its stated size.
#[test]
fn restore_test_walks_ext4_fat_and_ntfs() {
    let dir = Dir::new();
    dir.init();
    let snap = dir.backup("fileserver", &[("os", image())])["snapshot"].as_str().unwrap().to_string();
    let r = dir.repo_cmd("restore-test").arg(&snap).args(["--sample", "100%", "--json"]).json();
    assert_eq!(r["passed"], true, "{r}");
    let fss = r["filesystems"].as_array().unwrap();
    let kinds: Vec<&str> = fss.iter().map(|f| f["filesystem"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["ext4", "fat32", "ntfs"]);
    for f in fss {
        assert!(f["files"].as_u64().unwrap() >= disk_image::files().len() as u64, "{f}");
        assert_eq!(f["files_read"], f["files"], "{f}");
        assert!(f["bytes_read"].as_u64().unwrap() >= disk_image::BIG_LEN as u64, "{f}");
    }
    assert_eq!(fss[0]["symlinks"], 1, "ext4 holds one symlink: {}", fss[0]);
}
