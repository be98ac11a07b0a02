//! # blockproof-fs
//!
//! Files inside a disk image, without mounting and without root. The disk is any
//! random-access byte source behind the small [`ReadAt`] trait: a raw image file
//! ([`ImageFile`]), bytes in memory, or (in blockproof) a backed-up disk read chunk by
//! chunk from the repository.
//!
//! ## Model
//!
//! - A [`Disk`] is a byte source plus what was found on it: a GPT (with its protective
//!   MBR) or an MBR partition table (primary and logical partitions), or a bare
//!   filesystem on the whole disk (partition index 0). Each [`Partition`] records its
//!   index, byte range, type and the filesystem its superblock or boot sector shows
//!   ([`FsKind`]).
//! - A [`Filesystem`] is one opened ext2/3/4, FAT12/16/32 or NTFS filesystem. It answers
//!   [`stat`](Filesystem::stat), [`list`](Filesystem::list),
//!   [`read`](Filesystem::read) (streamed to a writer, never whole in memory) and
//!   [`read_link`](Filesystem::read_link) for `/etc/hostname`-style paths.
//! - [`changes`] compares two versions of one filesystem: entries added, removed, or
//!   modified by kind, size, modification time, mode or link target (contents unread).
//! - [`survey`] walks one filesystem whole for a restore test: every directory listed,
//!   every symlink read, a sample of the files (and the files the user names) read to
//!   the end and checked against their stated size; what failed is listed, not fatal.
//! - [`extract`] copies paths (files, directories recursively, symlinks) into a target
//!   directory, preserving modification and access times, and Unix modes where the
//!   filesystem has them (ext2/3/4) less setuid, setgid, sticky-on-files and
//!   write-for-others unless asked; files are written sparse.
//!
//! Reading goes through a window of the disk (`window.rs`): a `Read + Seek` cursor over
//! one partition's byte range with a 64 KiB read cache, which is what the filesystem
//! crates want. The crates doing the parsing are `gpt` (GPT headers and entries,
//! CRC-checked), `ext4-view`, `fatfs` and `ntfs`; the MBR is parsed here (64 bytes and
//! a chain of EBRs). docs/FILES.md records why each was chosen.
//!
//! ## Invariants
//!
//! - **Read-only.** Nothing here can write to the disk: the source trait has no write
//!   method, and the window handed to `fatfs` (whose API wants `Write`) fails every write.
//! - **Never writes outside the target.** [`extract`] writes only below its target
//!   directory: path arguments with `..` are refused, every name read from the
//!   filesystem must be one plain component (not empty, `.`, `..`, and without `/` or
//!   NUL; any other is skipped and reported), no existing symlink below the target is
//!   ever followed (files are created with `O_EXCL`, every directory on the way is
//!   checked with `lstat`), and nothing is replaced unless asked to.
//! - **Nothing dangerous to the host unless asked.** No setuid/setgid or world-writable
//!   file or directory is created without [`ExtractOptions::keep_special_modes`], and a
//!   sparse file stays sparse.
//! - **Bad input is an error, not a panic.** Damaged tables and filesystems give a typed
//!   [`FsError`] with a one-line message; directory sizes, nesting depth and entry counts
//!   are bounded so a corrupt (cyclic) filesystem cannot loop forever.
//!
//! ## Example
//!
//! ```no_run
//! use blockproof_fs::{Disk, ImageFile};
//!
//! let disk = Disk::open(Box::new(ImageFile::open("disk.raw".as_ref())?))?;
//! let fs = disk.open_filesystem(None)?; // the only filesystem, or an error listing them
//! for entry in fs.list("/etc")? {
//!     println!("{} {}", entry.name, entry.size);
//! }
//! fs.read("/etc/hostname", &mut std::io::stdout())?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod changes;
mod disk;
mod entry;
mod error;
mod ext;
mod extract;
mod fat;
mod filesystem;
mod fs_kind;
mod ntfs;
mod partition_table;
mod survey;
mod window;

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

pub use changes::{changes, Change, FileChange};
pub use disk::{Disk, Partition, TableKind};
pub use entry::{Entry, EntryKind, FsPath, Timestamp};
pub use error::FsError;
pub use extract::{extract, ExtractOptions, ExtractReport, Skipped};
pub use filesystem::Filesystem;
pub use fs_kind::{ExtVersion, FatType, FsKind};
pub use survey::{survey, Expected, Problem, Survey, SurveyOptions};

/// A fixed-size, random-access, read-only byte source: a disk.
pub trait ReadAt: Send + Sync {
    /// The size in bytes.
    fn size(&self) -> u64;

    /// Fills `buf` with the bytes at `offset`. A read that cannot be filled completely
    /// (past the end, a damaged backup) is an error, never zero-filled.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
}

/// A raw disk image file or block device, opened read-only.
#[derive(Debug)]
pub struct ImageFile {
    file: File,
    size: u64,
    path: PathBuf,
}

impl ImageFile {
    /// Opens `path` read-only; its size is taken once, now.
    pub fn open(path: &Path) -> io::Result<Self> {
        let file = File::open(path)?;
        // Seeking to the end also sizes block devices, whose metadata length is 0.
        let size = io::Seek::seek(&mut &file, io::SeekFrom::End(0))?;
        Ok(ImageFile { file, size, path: path.to_path_buf() })
    }
}

impl ReadAt for ImageFile {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let end = offset.checked_add(buf.len() as u64);
        if end.is_none_or(|end| end > self.size) {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "{}: {} bytes at offset {offset} are beyond the end of the image ({} bytes)",
                    self.path.display(),
                    buf.len(),
                    self.size
                ),
            ));
        }
        self.file.read_exact_at(buf, offset)
    }
}

/// Bytes in memory as a disk (tests, small images).
impl ReadAt for Vec<u8> {
    fn size(&self) -> u64 {
        self.len() as u64
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let start = usize::try_from(offset).ok().filter(|&s| s <= self.len());
        match start.and_then(|s| self.get(s..s.checked_add(buf.len())?)) {
            Some(bytes) => {
                buf.copy_from_slice(bytes);
                Ok(())
            }
            None => Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("{} bytes at offset {offset} are beyond the end of the disk ({} bytes)", buf.len(), self.len()),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_reads_are_exact_or_fail() {
        let disk: Vec<u8> = (0..=255u8).collect();
        let mut buf = [0u8; 4];
        disk.read_at(&mut buf, 252).unwrap();
        assert_eq!(buf, [252, 253, 254, 255]);
        assert!(disk.read_at(&mut buf, 253).is_err());
        assert!(disk.read_at(&mut buf, u64::MAX).is_err());
    }

    #[test]
    fn image_file_reads_are_exact_or_fail() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img");
        std::fs::write(&path, [7u8; 1000]).unwrap();
        let img = ImageFile::open(&path).unwrap();
        assert_eq!(img.size(), 1000);
        let mut buf = [0u8; 10];
        img.read_at(&mut buf, 990).unwrap();
        let err = img.read_at(&mut buf, 991).unwrap_err();
        assert!(err.to_string().contains("beyond the end"), "{err}");
    }
}
