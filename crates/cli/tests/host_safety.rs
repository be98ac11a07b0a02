//! What blockproof leaves on the host it runs on, with hostile or careless input:
//! restore-files makes no setuid/setgid or world-writable files unless asked and keeps
//! sparse files sparse; an ext4 entry named `.` or `..` is reported, never silently
//! dropped; repository files and restored images are private whatever the umask; an
//! absurdly large disk and an endless password file fail at once, in one line.
//!
//! The guest disks are real ext4 images made with `mke2fs -d`, modes and owners set with
//! `debugfs` (e2fsprogs), so the tests need no root; as root they also check owners.

#[path = "../../fs/tests/common/disk_image.rs"]
mod disk_image;
mod harness;

use std::fs::{self, File};
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use disk_image::run;
use harness::nbdkit::Nbdkit;
use harness::Dir;

/// Length of the guest's sparse file, and where its two pieces of data are.
const SPARSE_LEN: u64 = 512 << 20;
const SPARSE_DATA: [(u64, &[u8]); 2] = [(256 << 20, b"in the middle"), (SPARSE_LEN - 4, b"tail")];

/// The guest's entries with special modes: (path, stored mode, mode restore-files gives
/// by default). Owners are root's but for `suid`, which belongs to uid/gid 1000.
const SPECIAL: [(&str, u32, u32); 8] = [
    ("suid", 0o4755, 0o755),
    ("sgid", 0o2755, 0o755),
    ("sticky", 0o1644, 0o644),
    ("shared", 0o666, 0o664),
    ("open", 0o777, 0o775),
    ("open/inner.txt", 0o644, 0o644),
    ("tmp", 0o1777, 0o1775),
    ("team", 0o2770, 0o2770),
];
const GUEST_UID: u32 = 1000;

fn euid() -> u32 {
    // SAFETY: no preconditions, cannot fail.
    unsafe { libc::geteuid() }
}

/// An ext4 filesystem image (no partition table) of the guest: the entries of
/// [`SPECIAL`] and a sparse file. Built once per test binary.
fn guest_image() -> &'static Path {
    static IMAGE: OnceLock<PathBuf> = OnceLock::new();
    IMAGE.get_or_init(|| {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("host-safety");
        let _ = fs::remove_dir_all(&dir);
        let tree = dir.join("tree");
        for d in ["open", "tmp", "team"] {
            fs::create_dir_all(tree.join(d)).unwrap();
        }
        for f in ["suid", "sgid", "sticky", "shared", "open/inner.txt"] {
            fs::write(tree.join(f), format!("#!/bin/sh\necho {f}\n")).unwrap();
        }
        let sparse = File::create(tree.join("sparse.bin")).unwrap();
        sparse.set_len(SPARSE_LEN).unwrap();
        for (at, data) in SPARSE_DATA {
            sparse.write_all_at(data, at).unwrap();
        }
        let img = dir.join("guest.img");
        File::create(&img).unwrap().set_len(64 << 20).unwrap();
        run(Command::new("mke2fs").args(["-q", "-F", "-t", "ext4", "-b", "4096", "-d"]).arg(&tree).arg(&img), None);
        let mut script = String::new();
        for (path, mode, _) in SPECIAL {
            let kind = if tree.join(path).is_dir() { 0o040000 } else { 0o100000 };
            let owner = if path == "suid" { GUEST_UID } else { 0 };
            script +=
                &format!("sif /{path} mode 0{:o}\nsif /{path} uid {owner}\nsif /{path} gid {owner}\n", kind | mode);
        }
        run(Command::new("debugfs").args(["-w", "-f", "-"]).arg(&img), Some(script.as_bytes()));
        img
    })
}

/// Modes and owners as `ls --json` reads them from the image: the image is what the
/// tests think it is.
fn assert_guest_as_built(dir: &Dir) {
    let mut c = dir.cmd("ls");
    let rows = c.arg("--image").arg(guest_image()).args(["/", "--json"]).json();
    let open = dir.cmd("ls").arg("--image").arg(guest_image()).args(["/open", "--json"]).json();
    let rows: Vec<_> = rows.as_array().unwrap().iter().chain(open.as_array().unwrap()).cloned().collect();
    for (path, mode, _) in SPECIAL {
        let row = rows.iter().find(|r| r["path"] == format!("/{path}")).unwrap_or_else(|| panic!("{path}"));
        assert_eq!(row["mode"], format!("{mode:04o}"), "{path}");
        assert_eq!(row["uid"], if path == "suid" { GUEST_UID } else { 0 }, "{path}");
    }
}

/// A repository holding one backup of the guest disk (`guest:latest`, disk `root`).
fn backed_up() -> Dir {
    let dir = Dir::new();
    dir.init();
    dir.backup("guest", &[("root", guest_image())]);
    dir
}

/// `restore-files guest:latest --disk root PATHS --to TO --json` from the repository.
fn restore_files(dir: &Dir, paths: &[&str], to: &Path) -> harness::TestCommand {
    let mut c = dir.repo_cmd("restore-files");
    c.args(["guest:latest", "--disk", "root"]).args(paths).arg("--to").arg(to).arg("--json");
    c
}

fn mode(p: &Path) -> u32 {
    fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777
}

/// Every path below `root` (not `root` itself).
fn walk(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if fs::symlink_metadata(&p).unwrap().is_dir() {
                stack.push(p.clone());
            }
            out.push(p);
        }
    }
    out.sort();
    out
}

#[test]
fn restore_files_makes_no_setuid_or_world_writable_files_unless_asked() {
    let dir = backed_up();
    assert_guest_as_built(&dir);

    // Under umask 000 too: a new target directory is private, nothing is world-writable.
    let to = dir.join("out");
    let report = restore_files(&dir, &["/"], &to).umask(0).json();
    for (path, _, want) in SPECIAL {
        assert_eq!(format!("{:04o}", mode(&to.join(path))), format!("{want:04o}"), "{path}");
    }
    assert_eq!(mode(&to), 0o700, "a new target directory");
    assert_eq!(report["modes_restricted"], 6, "{report}");
    for p in walk(&to) {
        let meta = fs::symlink_metadata(&p).unwrap();
        let m = meta.permissions().mode();
        assert_eq!(m & 0o002, 0, "{} is world-writable ({m:o})", p.display());
        if meta.is_file() {
            assert_eq!(m & 0o7000, 0, "{} is setuid, setgid or sticky ({m:o})", p.display());
        }
        // Owners are never taken from the guest unless asked: the files are ours.
        assert_eq!(meta.uid(), euid(), "{}", p.display());
    }
    assert_eq!(fs::read(to.join("suid")).unwrap(), b"#!/bin/sh\necho suid\n");

    // The text report says what was held back, and how to keep it.
    let text =
        dir.repo_cmd("restore-files").args(["guest:latest", "--disk", "root", "/suid", "--to"]).arg(dir.join("t")).ok();
    assert!(text.contains("bits removed from 1 of the restored files and directories"), "{text}");
    assert!(text.contains("--keep-special-modes"), "{text}");

    // Asked for, the modes are kept as stored; as root the owners are the stored ones
    // too, so the guest user's setuid file stays the guest user's, never root's.
    let kept = dir.join("kept");
    let report = restore_files(&dir, &["/"], &kept).arg("--keep-special-modes").json();
    assert_eq!(report["modes_restricted"], 0, "{report}");
    for (path, stored, _) in SPECIAL {
        assert_eq!(format!("{:04o}", mode(&kept.join(path))), format!("{stored:04o}"), "{path}");
    }
    let suid = fs::metadata(kept.join("suid")).unwrap();
    let owner = if euid() == 0 { GUEST_UID } else { euid() };
    assert_eq!(suid.uid(), owner, "the owner of the kept setuid file");
    if euid() == 0 {
        assert_eq!(suid.gid(), GUEST_UID);
        assert_eq!(fs::metadata(kept.join("sgid")).unwrap().uid(), 0, "stored as root's");
    }
}

#[test]
fn restore_files_keeps_sparse_files_sparse() {
    let dir = backed_up();
    let to = dir.join("out");
    let report = restore_files(&dir, &["/sparse.bin"], &to).json();
    assert_eq!(report["bytes"], SPARSE_LEN, "{report}");
    let file = to.join("sparse.bin");
    let meta = fs::metadata(&file).unwrap();
    assert_eq!(meta.len(), SPARSE_LEN);
    // Two pieces of data: a few blocks, not 512 MiB.
    assert!(meta.blocks() * 512 <= 1 << 20, "{} bytes allocated for a sparse file", meta.blocks() * 512);
    let f = File::open(&file).unwrap();
    for (at, data) in SPARSE_DATA {
        // The data and the 4 bytes before it (zeros).
        let mut buf = vec![0u8; data.len() + 4];
        f.read_exact_at(&mut buf, at - 4).unwrap();
        assert_eq!(&buf[4..], data);
        assert!(buf[..4].iter().all(|&b| b == 0));
    }
}

#[test]
fn files_of_a_filesystem_without_modes_are_never_world_writable() {
    // FAT stores no modes: files get 0666 and directories 0777 less the umask, and never
    // write permission for others, even under umask 000.
    let dir = Dir::new();
    let tree = dir.join("tree");
    fs::create_dir_all(tree.join("docs")).unwrap();
    fs::write(tree.join("docs/readme.txt"), b"hello\n").unwrap();
    let img = dir.join("fat.img");
    File::create(&img).unwrap().set_len(16 << 20).unwrap();
    run(Command::new("mkfs.vfat").arg(&img), None);
    run(
        Command::new("mcopy")
            .env("MTOOLS_SKIP_CHECK", "1")
            .args(["-s", "-i"])
            .arg(&img)
            .arg(tree.join("docs"))
            .arg("::/"),
        None,
    );
    let to = dir.join("out");
    dir.cmd("restore-files").arg("--image").arg(&img).args(["/", "--to"]).arg(&to).umask(0).ok();
    assert_eq!(fs::read(to.join("docs/readme.txt")).unwrap(), b"hello\n");
    let modes: Vec<_> =
        [&to, &to.join("docs"), &to.join("docs/readme.txt")].iter().map(|p| format!("{:04o}", mode(p))).collect();
    assert_eq!(modes, ["0700", "0775", "0664"]);
}

/// An ext4 image (no metadata checksums, so bytes can be patched) whose `/dir` holds
/// `ok.txt` and two entries renamed in place to `..` and `.`.
fn dot_entries_image(dir: &Dir) -> PathBuf {
    let tree = dir.join("tree");
    fs::create_dir_all(tree.join("dir")).unwrap();
    fs::write(tree.join("dir/ok.txt"), b"fine\n").unwrap();
    fs::write(tree.join("dir/zz"), b"named zz, renamed to ..\n").unwrap();
    fs::write(tree.join("dir/z"), b"named z, renamed to .\n").unwrap();
    let img = dir.join("dots.img");
    File::create(&img).unwrap().set_len(16 << 20).unwrap();
    run(
        Command::new("mke2fs").args(["-q", "-F", "-t", "ext4", "-O", "^metadata_csum", "-d"]).arg(&tree).arg(&img),
        None,
    );
    let mut bytes = fs::read(&img).unwrap();
    // A directory entry: inode (4), record length (2), name length (1), file type (1,
    // 1 = regular file), name.
    for (from, to) in [(&[2u8, 1, b'z', b'z'][..], &b".."[..]), (&[1u8, 1, b'z'][..], &b"."[..])] {
        let hits: Vec<usize> = (0..bytes.len() - from.len()).filter(|&i| bytes[i..i + from.len()] == *from).collect();
        assert_eq!(hits.len(), 1, "directory entries {from:?} found at {hits:?}");
        bytes[hits[0] + 2..hits[0] + 2 + to.len()].copy_from_slice(to);
    }
    fs::write(&img, bytes).unwrap();
    img
}

#[test]
fn ext4_entries_named_dot_or_dotdot_are_reported_never_skipped_silently() {
    let dir = Dir::new();
    let img = dot_entries_image(&dir);
    let to = dir.join("out");
    let out = dir.cmd("restore-files").arg("--image").arg(&img).args(["/", "--json", "--to"]).arg(&to).output();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let skipped: Vec<(&str, &str)> = report["skipped"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (s["path"].as_str().unwrap(), s["reason"].as_str().unwrap()))
        .collect();
    assert_eq!(skipped.len(), 2, "{report}");
    for name in ["..", "."] {
        let why = format!("directory /dir has an entry named \"{name}\", which is a name that means");
        assert!(skipped.iter().any(|(_, reason)| reason.starts_with(&why)), "{name}: {skipped:?}");
        // One warning line each, naming the directory and the name.
        assert_eq!(stderr.lines().filter(|l| l.starts_with("blockproof: warning: ") && l.contains(&why)).count(), 1);
    }
    // The rest is restored; nothing lands outside the target.
    assert_eq!(fs::read(to.join("dir/ok.txt")).unwrap(), b"fine\n");
    let restored: Vec<_> = walk(&to).into_iter().map(|p| p.strip_prefix(&to).unwrap().to_path_buf()).collect();
    assert_eq!(restored, [Path::new("dir"), Path::new("dir/ok.txt"), Path::new("lost+found")]);
    let mut around: Vec<_> = fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    around.sort();
    assert_eq!(around, ["dots.img", "out", "tree"]);

    // The text report counts them; ls shows and flags them.
    let text = dir.cmd("restore-files").arg("--image").arg(&img).args(["/dir", "--to"]).arg(dir.join("t")).ok();
    assert!(text.contains("2 entries not restored (see the warnings)"), "{text}");
    let ls = dir.cmd("ls").arg("--image").arg(&img).arg("/dir").output();
    let ls_err = String::from_utf8_lossy(&ls.stderr);
    assert!(ls.status.success(), "{ls_err}");
    assert_eq!(ls_err.lines().filter(|l| l.contains("directory /dir has an entry named")).count(), 2, "{ls_err}");
}

/// Files and directories below `root` whose permission bits are not 0600 and 0700.
fn not_private(root: &Path) -> Vec<String> {
    walk(root)
        .into_iter()
        .filter_map(|p| {
            let meta = fs::symlink_metadata(&p).unwrap();
            let want = if meta.is_dir() { 0o700 } else { 0o600 };
            let got = meta.permissions().mode() & 0o7777;
            (got != want).then(|| format!("{} {got:04o}", p.display()))
        })
        .collect()
}

#[test]
fn repository_files_and_restored_images_are_private_whatever_the_umask() {
    for mask in [0o000, 0o022] {
        let dir = Dir::new();
        dir.repo_cmd("init").args(["--kdf-memory", "8", "--kdf-iterations", "1"]).umask(mask).ok();
        let img = dir.image("disk.img", 3 << 20, 5);
        dir.backup_cmd("vm", &[("a", &img)]).umask(mask).json();
        // state/ appears with check's rotation.
        dir.repo_cmd("check").args(["--read-data", "--json"]).umask(mask).json();
        assert!(dir.repo().join("state").is_dir());
        let wrong = not_private(&dir.repo());
        assert!(wrong.is_empty(), "umask {mask:03o}: not private: {wrong:#?}");
        assert_eq!(mode(&dir.repo()), 0o700, "umask {mask:03o}: the repository directory");

        for (name, format) in [("restored.img", "raw"), ("restored.qcow2", "qcow2")] {
            let to = dir.join(name);
            dir.repo_cmd("restore")
                .args(["vm:latest", "--disk", "a", "--format", format, "--to"])
                .arg(&to)
                .umask(mask)
                .ok();
            assert_eq!(format!("{:04o}", mode(&to)), "0600", "umask {mask:03o}: {name}");
        }
        // An existing file replaced with --force is private afterwards too.
        let to = dir.join("existing.img");
        fs::write(&to, b"x").unwrap();
        fs::set_permissions(&to, fs::Permissions::from_mode(0o666)).unwrap();
        dir.repo_cmd("restore").args(["vm:latest", "--disk", "a", "--force", "--to"]).arg(&to).umask(mask).ok();
        assert_eq!(format!("{:04o}", mode(&to)), "0600", "umask {mask:03o}: replaced");
    }
}

#[test]
fn disks_larger_than_the_limit_fail_at_once_before_any_allocation() {
    let dir = Dir::new();
    dir.init();
    let huge_qcow2 = dir.join("huge.qcow2");
    harness::qemu::qemu("qemu-img", &["create", "-q", "-f", "qcow2", harness::qemu::s(&huge_qcow2), "100T"]);
    let pib = Nbdkit::start(&dir, "pib", &["null", "size=1P"]);
    let top = Nbdkit::start(&dir, "top", &["null", &format!("size={}", i64::MAX as u64 - 511)]);
    // (source, its size in bytes)
    let cases =
        [(pib.uri(), 1u64 << 50), (top.uri(), i64::MAX as u64 - 511), (huge_qcow2.display().to_string(), 100 << 40)];
    for (source, size) in cases {
        let line = dir
            .repo_cmd("backup")
            .args(["--vm", "big", "--disk", &format!("id=a,source={source}")])
            .memory_limit(4 << 30)
            .fails_with_one_line(1);
        assert!(line.contains(&format!("is {size} bytes")), "{line}");
        assert!(line.contains("larger than the largest disk blockproof backs up (64 TiB)"), "{line}");
    }
    assert!(dir.snapshots().is_empty());
}

#[test]
fn password_files_are_read_to_their_first_line_only() {
    let dir = Dir::new();
    dir.init();
    let long = dir.join("long-line");
    fs::write(&long, vec![b'p'; 1 << 20]).unwrap();
    // (command and arguments, the password file flag)
    let commands: [(&[&str], &str); 3] = [
        (&["snapshots"], "--password-file"),
        (&["key", "add"], "--new-password-file"),
        (&["copy", "--to", "elsewhere"], "--to-password-file"),
    ];
    for (args, flag) in commands {
        for file in [Path::new("/dev/zero"), &long] {
            let mut c = dir.cmd(args[0]);
            c.args(&args[1..]).arg("--repo").arg(dir.repo()).arg(flag).arg(file).memory_limit(2 << 30);
            let line = c.fails_with_one_line(1);
            assert!(
                line.contains("its first line is longer than 4096 bytes"),
                "{args:?} {flag} {}: {line}",
                file.display()
            );
        }
    }
    // The first line is the password, whatever follows it.
    let good = dir.join("good");
    let mut bytes = format!("{}\n", harness::PASSWORD).into_bytes();
    bytes.extend(vec![b'x'; 1 << 20]);
    fs::write(&good, bytes).unwrap();
    dir.cmd("snapshots")
        .arg("--repo")
        .arg(dir.repo())
        .arg("--password-file")
        .arg(&good)
        .env("BLOCKPROOF_PASSWORD", "wrong")
        .ok();
}
