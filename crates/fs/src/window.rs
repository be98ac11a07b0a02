//! A byte window of the disk: what the filesystem crates read through.
//!
//! `gpt`, `fatfs` and `ntfs` want a `Read + Seek` stream (`fatfs` also `Write`);
//! `ext4-view` wants "read these bytes at this offset". A [`Window`] is all of that over
//! one byte range `[start, start + len)` of a [`ReadAt`], positioned relative to the
//! range's start, so a partition looks like a whole device to the crate reading it.
//!
//! The filesystem crates read in small pieces (a 32-byte directory entry, a 4-byte FAT
//! entry), and a backed-up disk is read a whole chunk at a time, so the window keeps one
//! cached block of [`CACHE_BLOCK`] bytes, aligned on the disk (not the window) so that
//! it matches the repository's chunks. Reads of a whole block or more bypass it.
//!
//! Writes always fail: the disk is read-only.

use std::io::{self, Read, Seek, SeekFrom, Write};
use std::sync::Arc;

use crate::error::DiskRead;
use crate::ReadAt;

/// Size and alignment of the window's read cache (blockproof's default chunk size).
pub(crate) const CACHE_BLOCK: u64 = 64 << 10;

pub(crate) struct Window {
    src: Arc<dyn ReadAt>,
    start: u64,
    len: u64,
    /// Stream position, relative to `start`.
    pos: u64,
    cache: Vec<u8>,
    /// Disk offset of `cache[0]`; meaningful only when `cache` is not empty.
    cache_at: u64,
}

impl Window {
    /// The window `[start, start + len)` of `src`; it may extend past the end of the disk
    /// (a truncated image), in which case reading there fails.
    pub fn new(src: Arc<dyn ReadAt>, start: u64, len: u64) -> Window {
        let len = len.min(u64::MAX - start);
        Window { src, start, len, pos: 0, cache: Vec::new(), cache_at: 0 }
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    /// Fills `buf` from window offset `offset`, exactly, or fails.
    pub fn read_exact_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let end = offset.checked_add(buf.len() as u64).filter(|&end| end <= self.len);
        if end.is_none() {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "{} bytes at offset {offset} of a {}-byte partition or disk: beyond its end",
                    buf.len(),
                    self.len
                ),
            ));
        }
        let mut done = 0;
        while done < buf.len() {
            let at = self.start + offset + done as u64;
            let rest = &mut buf[done..];
            if let Some(n) = self.copy_cached(rest, at) {
                done += n;
                continue;
            }
            if rest.len() as u64 >= CACHE_BLOCK {
                // Large reads go straight to the disk, in whole-block pieces.
                let n = (rest.len() as u64 - (rest.len() as u64 % CACHE_BLOCK)) as usize;
                self.disk_read(&mut rest[..n], at)?;
                done += n;
            } else {
                self.fill_cache(at)?;
            }
        }
        Ok(())
    }

    /// Copies from the cache if it holds `at`; returns the number of bytes copied.
    fn copy_cached(&self, buf: &mut [u8], at: u64) -> Option<usize> {
        let cache_end = self.cache_at + self.cache.len() as u64;
        if self.cache.is_empty() || at < self.cache_at || at >= cache_end {
            return None;
        }
        let from = (at - self.cache_at) as usize;
        let n = buf.len().min(self.cache.len() - from);
        buf[..n].copy_from_slice(&self.cache[from..from + n]);
        Some(n)
    }

    /// Loads the aligned block holding disk offset `at`, clipped to the window and the disk.
    fn fill_cache(&mut self, at: u64) -> io::Result<()> {
        let block = at - at % CACHE_BLOCK;
        let window_end = self.start + self.len;
        let disk_end = self.src.size();
        let mut from = block.max(self.start);
        let mut to = (block + CACHE_BLOCK).min(window_end);
        if at < disk_end {
            to = to.min(disk_end);
        } else {
            // Past the disk's end: ask for it anyway, so the disk reports the failure
            // at the offset that was wanted.
            from = at;
        }
        self.cache.clear();
        self.cache.resize((to - from) as usize, 0);
        let mut cache = std::mem::take(&mut self.cache);
        let result = self.disk_read(&mut cache, from);
        if result.is_ok() {
            self.cache = cache;
            self.cache_at = from;
        }
        result
    }

    fn disk_read(&self, buf: &mut [u8], at: u64) -> io::Result<()> {
        self.src.read_at(buf, at).map_err(|source| DiskRead { offset: at, len: buf.len(), source }.into_io())
    }
}

impl Read for Window {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = (buf.len() as u64).min(self.len.saturating_sub(self.pos)) as usize;
        self.read_exact_at(&mut buf[..n], self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}

impl Seek for Window {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        let new = match to {
            SeekFrom::Start(n) => Some(n),
            SeekFrom::End(d) => self.len.checked_add_signed(d),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d),
        };
        match new {
            Some(n) => {
                self.pos = n;
                Ok(n)
            }
            None => Err(io::Error::new(io::ErrorKind::InvalidInput, "seek before the start or past 2^64")),
        }
    }
}

/// `fatfs` needs `Write` in its type; every write fails, nothing reaches the disk.
impl Write for Window {
    fn write(&mut self, _buf: &[u8]) -> io::Result<usize> {
        Err(io::Error::new(io::ErrorKind::PermissionDenied, "the disk is read-only"))
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl ext4_view::Ext4Read for Window {
    fn read(
        &mut self,
        start_byte: u64,
        dst: &mut [u8],
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync + 'static>> {
        self.read_exact_at(dst, start_byte).map_err(|e| match e.into_inner() {
            // Pass a DiskRead through unwrapped so it can be recognised.
            Some(inner) => inner,
            None => "read failed".into(),
        })
    }
}

/// `gpt` prints its device with `{:?}`.
impl std::fmt::Debug for Window {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Window({}+{})", self.start, self.len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn disk(len: usize) -> Arc<dyn ReadAt> {
        Arc::new((0..len).map(|i| (i % 251) as u8).collect::<Vec<u8>>())
    }

    fn expect(range: std::ops::Range<usize>) -> Vec<u8> {
        range.map(|i| (i % 251) as u8).collect()
    }

    #[test]
    fn reads_are_relative_to_the_window_and_match_the_disk() {
        let mut w = Window::new(disk(300_000), 1000, 250_000);
        for (off, len) in [(0, 10), (65_000, 2000), (100, 140_000), (249_990, 10), (131_072, 1)] {
            let mut buf = vec![0; len];
            w.read_exact_at(&mut buf, off).unwrap();
            assert_eq!(buf, expect(1000 + off as usize..1000 + off as usize + len), "{off}+{len}");
        }
        let mut buf = [0u8; 11];
        assert!(w.read_exact_at(&mut buf, 249_990).is_err(), "past the window");
    }

    #[test]
    fn stream_reads_stop_at_the_window_end() {
        let mut w = Window::new(disk(10_000), 9_000, 1000);
        assert_eq!(w.seek(SeekFrom::End(-4)).unwrap(), 996);
        let mut buf = [0u8; 16];
        assert_eq!(w.read(&mut buf).unwrap(), 4);
        assert_eq!(&buf[..4], &expect(9996..10_000)[..]);
        assert_eq!(w.read(&mut buf).unwrap(), 0);
        assert!(w.seek(SeekFrom::Current(-2000)).is_err());
        assert!(w.write(b"x").is_err());
    }

    #[test]
    fn a_window_past_the_disk_end_fails_with_the_disk_offset() {
        let mut w = Window::new(disk(5000), 4096, 8192);
        let mut buf = [0u8; 100];
        w.read_exact_at(&mut buf, 800).unwrap();
        let err = w.read_exact_at(&mut buf, 850).unwrap_err();
        let read = err.get_ref().and_then(|e| e.downcast_ref::<DiskRead>()).expect("a DiskRead");
        assert_eq!(read.offset, 5000, "{err}");
    }
}
