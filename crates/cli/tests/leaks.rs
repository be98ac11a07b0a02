//! What a stolen repository directory reveals (DESIGN.md §6, §8): no plaintext of the
//! disks, none of the names given on the command line, and no unkeyed hash of a chunk.
//! And what a backup does to its source: opens it read-only and leaves it untouched.

mod harness;

use std::collections::HashSet;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::time::{Duration, Instant};

use harness::{hash, mixed_image, Dir, MARKER};
use rand::{Rng, RngCore, SeedableRng};

const CHUNK: usize = 64 << 10;

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// The first 8 bytes of every 32-byte (raw) or 64-character (hex) BLAKE3 digest of a
/// chunk, found anywhere in `bytes`.
fn digest_hits(bytes: &[u8], raw: &HashSet<[u8; 8]>, hex: &HashSet<[u8; 8]>) -> usize {
    bytes
        .windows(8)
        .filter(|w| {
            let k: [u8; 8] = (*w).try_into().unwrap();
            raw.contains(&k) || hex.contains(&k)
        })
        .count()
}

/// An image whose plaintext a repository without encryption would store verbatim: the
/// marker in text regions (compressible) and inside random chunks (incompressible, so
/// zstd alone would keep it as a literal).
fn image_with_markers(size: usize, seed: u64) -> Vec<u8> {
    let mut img = mixed_image(size, seed);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0x5eed);
    for c in (0..size / CHUNK).step_by(7) {
        let chunk = &mut img[c * CHUNK..(c + 1) * CHUNK];
        rng.fill_bytes(chunk);
        let at = rng.gen_range(0..CHUNK - MARKER.len());
        chunk[at..at + MARKER.len()].copy_from_slice(MARKER);
    }
    img
}

#[test]
fn repository_holds_no_plaintext_no_names_and_no_unkeyed_chunk_hashes() {
    let dir = Dir::new();
    dir.init();
    // Names given on the command line are metadata a thief must not read either.
    let vm = "vm-CONFIDENTIAL-payroll-7731";
    let disk = "disk-CONFIDENTIAL-6000c29d4e1b";
    let tag = "tag-CONFIDENTIAL-quarter-close";
    let secret_dir = dir.join("src-CONFIDENTIAL-datastore");
    fs::create_dir(&secret_dir).unwrap();
    let img = secret_dir.join("payroll-db-flat.img");
    let data = image_with_markers(16 << 20, 41);
    fs::write(&img, &data).unwrap();
    let report = dir
        .repo_cmd("backup")
        .args(["--vm", vm, "--tag", tag, "--json", "--disk"])
        .arg(format!("id={disk},source={}", img.display()))
        .json();
    assert_eq!(report["status"], "ok");

    // The unkeyed BLAKE3 digest of every non-zero chunk (what a keyless id would be).
    let (mut raw, mut hex) = (HashSet::new(), HashSet::new());
    for c in data.chunks(CHUNK).filter(|c| c.iter().any(|&b| b != 0)) {
        let h = blake3::hash(c);
        raw.insert(h.as_bytes()[..8].try_into().unwrap());
        hex.insert(h.to_hex().as_bytes()[..8].try_into().unwrap());
    }
    // The scan itself works: it sees what it looks for in the plaintext.
    assert!(contains(&data, MARKER));
    assert!(digest_hits(blake3::hash(&data[..CHUNK]).to_hex().as_bytes(), &raw, &hex) > 0);

    let hostname = fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default().trim().to_string();
    let mut needles: Vec<&[u8]> = vec![MARKER, vm.as_bytes(), disk.as_bytes(), tag.as_bytes(), b"CONFIDENTIAL"];
    if hostname.len() >= 8 {
        needles.push(hostname.as_bytes());
    }
    let files = dir.repo_files();
    assert!(files.len() >= 4, "{files:?}");
    for f in &files {
        let bytes = fs::read(f).unwrap();
        let name = f.strip_prefix(dir.repo()).unwrap().display().to_string();
        assert!(!name.contains("CONFIDENTIAL"), "a file name reveals a name: {name}");
        for n in &needles {
            assert!(!contains(&bytes, n), "{name} contains {:?} in plaintext", String::from_utf8_lossy(n));
        }
        assert_eq!(digest_hits(&bytes, &raw, &hex), 0, "{name} contains unkeyed chunk digests");
    }
}

/// The access mode of every descriptor `pid` holds on `path`, as `/proc` shows it.
fn open_modes(pid: u32, path: &Path) -> Vec<u32> {
    let mut modes = Vec::new();
    for fd in fs::read_dir(format!("/proc/{pid}/fd")).into_iter().flatten().flatten() {
        if fs::read_link(fd.path()).is_ok_and(|target| target == path) {
            let info = fs::read_to_string(format!("/proc/{pid}/fdinfo/{}", fd.file_name().to_string_lossy()));
            let flags = info.ok().and_then(|text| {
                let line = text.lines().find(|l| l.starts_with("flags:"))?.to_string();
                u32::from_str_radix(line["flags:".len()..].trim(), 8).ok()
            });
            if let Some(flags) = flags {
                modes.push(flags & 0o3); // O_ACCMODE
            }
        }
    }
    modes
}

/// The source is opened read-only, always (DESIGN.md §8). File permissions prove nothing
/// when the tests run as root, so the open descriptors of a running backup are read
/// from /proc: every one on the source must be O_RDONLY. The file is also left as it was.
#[test]
fn source_is_opened_read_only_and_left_untouched() {
    let dir = Dir::new();
    dir.init();
    let img = dir.join("source.img");
    let mut data = vec![0u8; 96 << 20];
    rand::rngs::StdRng::seed_from_u64(42).fill_bytes(&mut data);
    fs::write(&img, &data).unwrap();
    drop(data);
    fs::set_permissions(&img, fs::Permissions::from_mode(0o444)).unwrap();
    let img = img.canonicalize().unwrap();

    // The probe itself works: it sees this process's own read-write descriptor.
    fs::write(dir.join("probe"), b"x").unwrap();
    let probe = dir.join("probe").canonicalize().unwrap();
    let held = fs::OpenOptions::new().read(true).write(true).open(&probe).unwrap();
    assert_eq!(open_modes(std::process::id(), &probe), vec![2], "O_RDWR seen through /proc");
    drop(held);
    let mtime = |p: &Path| fs::metadata(p).map(|m| (m.mtime(), m.mtime_nsec())).unwrap();
    let (before, mtime_before) = (hash(&img), mtime(&img));

    let mut child =
        dir.repo_cmd("backup").args(["--vm", "ro", "--disk"]).arg(format!("id=d,source={}", img.display())).spawn();
    let started = Instant::now();
    let mut seen = Vec::new();
    let status = loop {
        seen.extend(open_modes(child.id(), &img));
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > Duration::from_secs(120) {
            let _ = child.kill();
            panic!("backup did not finish");
        }
        std::thread::sleep(Duration::from_millis(1));
    };
    assert!(status.success(), "backup failed: {status:?}");
    assert!(!seen.is_empty(), "the backup was never seen holding the source open");
    let modes: std::collections::BTreeSet<_> = seen.iter().collect();
    assert!(modes.iter().all(|&&m| m == 0), "source held open with access modes {modes:?} (0 = O_RDONLY, 2 = O_RDWR)");

    let meta = fs::metadata(&img).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o444);
    assert_eq!(mtime(&img), mtime_before, "the source's mtime changed");
    assert_eq!(hash(&img), before, "the source's content changed");
    assert_eq!(hash(&dir.restore("ro:latest", "d", "out.img")), before);
}
