//! What the integration tests of blockproof-fs share: one real disk image per test
//! binary, built on first use under Cargo's target tmp dir.
#![allow(dead_code)]

pub mod disk_image;

use std::path::PathBuf;
use std::sync::OnceLock;

use blockproof_fs::{Disk, Filesystem, ImageFile};

pub use disk_image::DiskImage;

/// The disk image of this test binary, built once (`name` keeps binaries apart).
pub fn image(name: &str) -> &'static DiskImage {
    static IMAGE: OnceLock<DiskImage> = OnceLock::new();
    IMAGE.get_or_init(|| DiskImage::build(&PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("fs-images").join(name)))
}

pub fn open_disk(path: &std::path::Path) -> Disk {
    Disk::open(Box::new(ImageFile::open(path).unwrap())).unwrap()
}

pub fn open_fs(disk: &Disk, partition: u32) -> Filesystem {
    disk.open_filesystem(Some(partition)).unwrap()
}
