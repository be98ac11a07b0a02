//! Helpers for tests against the real qemu tools: qcow2 images from generated content,
//! qemu-io writes, raw conversions, backups with disk specs, and qemu-nbd process checks.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

use super::{mixed_image, Dir};

pub const CHUNK: u64 = 65536;

/// Runs a qemu tool; panics with its output when it fails.
pub fn qemu(program: &str, args: &[&str]) -> String {
    let out = Command::new(program).args(args).output().unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(out.status.success(), "{program} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A qcow2 image made from generated content.
pub fn qcow2(dir: &Dir, name: &str, size: usize, seed: u64) -> PathBuf {
    let raw = dir.join(&format!("{name}.src.raw"));
    std::fs::write(&raw, mixed_image(size, seed)).unwrap();
    let img = dir.join(&format!("{name}.qcow2"));
    qemu("qemu-img", &["convert", "-q", "-f", "raw", "-O", "qcow2", s(&raw), s(&img)]);
    std::fs::remove_file(raw).unwrap();
    img
}

pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Writes with qemu-io (`(offset, length, pattern)`); returns the chunks touched.
pub fn qemu_io_writes(img: &Path, writes: &[(u64, u64, u8)]) -> BTreeSet<u64> {
    let mut args = vec!["-f".to_string(), "qcow2".into()];
    let mut chunks = BTreeSet::new();
    for &(off, len, pat) in writes {
        args.push("-c".into());
        args.push(format!("write -P {pat} {off} {len}"));
        chunks.extend(off / CHUNK..(off + len).div_ceil(CHUNK));
    }
    args.push(s(img).into());
    qemu("qemu-io", &args.iter().map(String::as_str).collect::<Vec<_>>());
    chunks
}

/// Scattered writes of 4 KiB to 96 KiB at 4 KiB-aligned offsets.
pub fn scattered(size: u64, count: usize, seed: u64) -> Vec<(u64, u64, u8)> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    (0..count)
        .map(|_| {
            let len = 4096 * (1 + next() % 24);
            let off = (next() % ((size - len) / 4096)) * 4096;
            (off, len, (next() % 250) as u8 + 1)
        })
        .collect()
}

/// The image's guest-visible bytes, as qemu-img sees them.
pub fn raw_of(dir: &Dir, img: &Path, name: &str) -> PathBuf {
    let out = dir.join(name);
    qemu("qemu-img", &["convert", "-q", "-O", "raw", s(img), s(&out)]);
    out
}

pub fn backup(dir: &Dir, vm: &str, specs: &[String]) -> Value {
    let mut c = dir.repo_cmd("backup");
    c.args(["--vm", vm, "--json"]);
    for spec in specs {
        c.arg("--disk").arg(spec);
    }
    c.json()
}

pub fn disk<'a>(report: &'a Value, id: &str) -> &'a Value {
    report["disks"].as_array().unwrap().iter().find(|d| d["id"] == id).unwrap()
}

pub fn assert_restores(dir: &Dir, snapshot: &Value, id: &str, expected: &Path) {
    let snap = snapshot.as_str().unwrap();
    let out = dir.restore(snap, id, &format!("restored-{}-{id}.raw", &snap[..12]));
    assert_eq!(super::hash(&out), super::hash(expected), "snapshot {snap} disk {id}");
    std::fs::remove_file(out).unwrap();
}

pub fn bitmaps(img: &Path) -> Vec<(String, Vec<String>)> {
    let info: Value = serde_json::from_str(&qemu("qemu-img", &["info", "--output=json", s(img)])).unwrap();
    info["format-specific"]["data"]["bitmaps"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|b| {
                    let flags = b["flags"].as_array().unwrap().iter().map(|f| f.as_str().unwrap().to_string());
                    (b["name"].as_str().unwrap().to_string(), flags.collect())
                })
                .collect()
        })
        .unwrap_or_default()
}

/// The qemu-nbd processes serving an image under `dir`.
pub fn qemu_nbd_for(dir: &Dir) -> Vec<String> {
    let needle = dir.path().to_str().unwrap().as_bytes().to_vec();
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok())
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok().map(|c| (e.file_name(), c)))
        .filter(|(_, c)| c.starts_with(b"qemu-nbd") && c.windows(needle.len()).any(|w| w == needle))
        .map(|(pid, _)| pid.to_string_lossy().into_owned())
        .collect()
}

/// No qemu-nbd serving anything under `dir` is left running (after a grace of 2 s).
pub fn assert_no_qemu_nbd_for(dir: &Dir) {
    for _ in 0..100 {
        if qemu_nbd_for(dir).is_empty() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    panic!("qemu-nbd still running for {}: {:?}", dir.path().display(), qemu_nbd_for(dir));
}
