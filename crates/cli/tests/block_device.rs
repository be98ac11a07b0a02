//! Block devices as restore targets and backup sources, through loop devices. Needs root
//! and losetup; where they are missing (most CI runners) the tests say so and pass.

mod harness;

use std::fs::{self, File};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use harness::{mixed_image, Dir};

/// A loop device over a file, detached on drop.
struct Loop(PathBuf);

impl Loop {
    fn attach(file: &Path) -> Option<Loop> {
        let out = Command::new("losetup").args(["--find", "--show"]).arg(file).output().ok()?;
        let dev = String::from_utf8(out.stdout).ok()?.trim().to_string();
        (out.status.success() && !dev.is_empty()).then(|| Loop(PathBuf::from(dev)))
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("--detach").arg(&self.0).status();
    }
}

fn read_device(dev: &Path, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    File::open(dev).unwrap().read_exact(&mut buf).unwrap();
    buf
}

/// Restore onto a device that holds old data: every byte of the disk is written, zero
/// chunks included (a device has no holes), and nothing past the disk's end is touched.
/// The device is then backed up as a source and restores to a file bit-exact.
#[test]
fn restore_to_a_used_block_device_overwrites_zero_chunks_too() {
    let dir = Dir::new();
    let backing = dir.join("device.bin");
    fs::write(&backing, vec![0xA5u8; 20 << 20]).unwrap();
    let Some(dev) = Loop::attach(&backing) else {
        eprintln!("skipped: cannot attach a loop device (needs root and losetup)");
        return;
    };
    dir.init();
    let img = dir.join("d.img");
    let data = mixed_image(16 << 20, 101);
    assert!(data.chunks(64 << 10).any(|c| c.iter().all(|&b| b == 0)), "the image has zero chunks");
    fs::write(&img, &data).unwrap();
    dir.backup("v", &[("d", &img)]);

    let report = dir.repo_cmd("restore").args(["v:latest", "--disk", "d", "--json", "--to"]).arg(&dev.0).json();
    assert_eq!(report["block_device"], true, "{report}");
    let on_device = read_device(&dev.0, 20 << 20);
    assert!(on_device[..16 << 20] == data[..], "the device holds the disk, zero chunks included");
    assert!(on_device[16 << 20..].iter().all(|&b| b == 0xA5), "bytes past the disk's end are untouched");

    let r = dir.backup("dev", &[("d", &dev.0)]);
    assert_eq!(r["disks"][0]["size"], 20u64 << 20, "{r}");
    let out = dir.restore("dev:latest", "d", "dev.img");
    assert!(fs::read(out).unwrap() == on_device, "a block device source restores bit-exact");
}

#[test]
fn restore_to_a_too_small_block_device_is_refused_untouched() {
    let dir = Dir::new();
    let backing = dir.join("small.bin");
    fs::write(&backing, vec![0x5Au8; 4 << 20]).unwrap();
    let Some(dev) = Loop::attach(&backing) else {
        eprintln!("skipped: cannot attach a loop device (needs root and losetup)");
        return;
    };
    dir.init();
    let img = dir.join("d.img");
    fs::write(&img, mixed_image(6 << 20, 102)).unwrap();
    dir.backup("v", &[("d", &img)]);
    let line = dir.repo_cmd("restore").args(["v:latest", "--disk", "d", "--to"]).arg(&dev.0).fails_with_one_line(2);
    assert!(line.contains(&dev.0.display().to_string()), "{line}");
    assert!(read_device(&dev.0, 4 << 20).iter().all(|&b| b == 0x5A), "the device is untouched");
}
