//! Writing a new file durably, large ones around the page cache.
//!
//! A pack is written once and read back rarely (restore, `check --read-data`), so
//! copying it into the page cache and then waiting for `fsync` to write that copy back
//! costs CPU (the kernel's copy) and wall time (write-back starts only at `fsync`) for
//! nothing. Files of at least [`DIRECT_MIN`] bytes are therefore written with `O_DIRECT`
//! through an aligned bounce buffer, in [`BOUNCE`]-sized pieces; the unaligned tail goes
//! through the page cache, and one `fsync` then makes all of it and the metadata durable.
//! On a filesystem that refuses `O_DIRECT` (tmpfs, some network filesystems) the whole
//! file is written the ordinary way: the result is the same file either way.

use std::cell::RefCell;
use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

/// Alignment of `O_DIRECT` offsets, lengths and buffers (the largest logical block size
/// of common devices).
const ALIGN: usize = 4096;
/// Smallest file written with `O_DIRECT`.
pub const DIRECT_MIN: usize = 1 << 20;
/// Size of each direct write (and of the per-thread bounce buffer).
const BOUNCE: usize = 8 << 20;

thread_local! {
    static BOUNCE_BUF: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Creates `path` (which must not exist) readable by its owner only, writes `data` and
/// makes it durable.
pub fn write_new_file(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let mut f = OpenOptions::new().write(true).create_new(true).mode(crate::local::FILE_MODE).open(path)?;
    let direct_len = if data.len() >= DIRECT_MIN { data.len() / ALIGN * ALIGN } else { 0 };
    let done = if direct_len > 0 && write_direct(path, &data[..direct_len])? { direct_len } else { 0 };
    if done == 0 {
        f.write_all(data)?;
    } else {
        f.write_all_at(&data[done..], done as u64)?;
    }
    f.sync_all()
}

/// Writes `data` (a multiple of [`ALIGN`] long) at offset 0 of the existing file `path`
/// with `O_DIRECT`. Returns false, having written nothing that matters, if the
/// filesystem does not do direct I/O.
fn write_direct(path: &Path, data: &[u8]) -> std::io::Result<bool> {
    let f = match OpenOptions::new().write(true).custom_flags(libc::O_DIRECT).open(path) {
        Ok(f) => f,
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => return Ok(false),
        Err(e) => return Err(e),
    };
    BOUNCE_BUF.with(|cell| {
        let mut buf = cell.borrow_mut();
        if buf.len() < BOUNCE + ALIGN {
            buf.resize(BOUNCE + ALIGN, 0);
        }
        let start = buf.as_ptr().align_offset(ALIGN);
        let bounce = &mut buf[start..start + BOUNCE];
        for (i, piece) in data.chunks(BOUNCE).enumerate() {
            bounce[..piece.len()].copy_from_slice(piece);
            match write_all_direct(&f, &bounce[..piece.len()], (i * BOUNCE) as u64) {
                Ok(()) => {}
                // Accepted at open, refused at write (alignment rules of the device):
                // the caller rewrites the whole file through the page cache.
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => return Ok(false),
                Err(e) => return Err(e),
            }
        }
        Ok(true)
    })
}

fn write_all_direct(f: &File, mut buf: &[u8], mut offset: u64) -> std::io::Result<()> {
    while !buf.is_empty() {
        match f.write_at(buf, offset) {
            Ok(0) => return Err(std::io::Error::new(ErrorKind::WriteZero, "direct write wrote nothing")),
            // A short direct write ends on a block boundary; the rest stays aligned.
            Ok(n) => {
                buf = &buf[n..];
                offset += n as u64;
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_of_every_size_are_written_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let data: Vec<u8> = (0..(3 * BOUNCE + 12345) as u32).map(|i| (i.wrapping_mul(2654435761) >> 7) as u8).collect();
        for len in [0, 1, 4095, DIRECT_MIN - 1, DIRECT_MIN, DIRECT_MIN + 1, BOUNCE, BOUNCE + ALIGN + 17, data.len()] {
            let path = dir.path().join(format!("f{len}"));
            write_new_file(&path, &data[..len]).unwrap();
            assert!(std::fs::read(&path).unwrap() == data[..len], "length {len}");
            assert_eq!(write_new_file(&path, b"x").unwrap_err().kind(), ErrorKind::AlreadyExists);
        }
    }
}
