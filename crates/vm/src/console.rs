//! The VM's serial console: a file QEMU appends to, read as it grows, searched for the
//! markers, and its tail kept for the record.
//!
//! The console may be long (a chatty boot writes megabytes); only the last
//! [`EXCERPT_BYTES`] and the few bytes a marker may straddle between two reads are kept.

use std::fs::File;
use std::io::{self, Read};
use std::path::Path;

/// How much of the console's end an outcome keeps.
pub(crate) const EXCERPT_BYTES: usize = 4096;

pub(crate) struct Console {
    file: File,
    /// The end of what was read: the excerpt, and the bytes before a new read that a
    /// marker may begin in.
    tail: Vec<u8>,
}

impl Console {
    /// Opens the console file (created empty by the caller before QEMU starts).
    pub(crate) fn open(path: &Path) -> io::Result<Console> {
        Ok(Console { file: File::open(path)?, tail: Vec::new() })
    }

    /// Reads what QEMU wrote since the last call; returns the index (into `markers`) of
    /// the marker that appears first in the new text (a marker that straddles the two
    /// reads counts), or `None`.
    pub(crate) fn poll(&mut self, markers: &[&str]) -> io::Result<Option<usize>> {
        let mut new = Vec::new();
        self.file.read_to_end(&mut new)?;
        if new.is_empty() {
            return Ok(None);
        }
        let old = self.tail.len();
        self.tail.extend_from_slice(&new);
        // A marker counts when it ends in the new bytes (it may begin in the old ones).
        let first = markers
            .iter()
            .enumerate()
            .filter(|(_, m)| !m.is_empty())
            .filter_map(|(i, m)| {
                let from = old.saturating_sub(m.len() - 1);
                find(&self.tail[from..], m.as_bytes()).map(|at| (from + at, i))
            })
            .min();
        let longest = markers.iter().map(|m| m.len()).max().unwrap_or(0);
        let keep = EXCERPT_BYTES.max(longest);
        if self.tail.len() > keep {
            self.tail.drain(..self.tail.len() - keep);
        }
        Ok(first.map(|(_, i)| i))
    }

    /// The last [`EXCERPT_BYTES`] of the console as text (invalid UTF-8 replaced; a
    /// character cut by the start is dropped).
    pub(crate) fn excerpt(&self) -> String {
        let start = self.tail.len().saturating_sub(EXCERPT_BYTES);
        let mut bytes = &self.tail[start..];
        while let [b, rest @ ..] = bytes {
            if b & 0xc0 != 0x80 {
                break;
            }
            bytes = rest;
        }
        String::from_utf8_lossy(bytes).into_owned()
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    fn console() -> (tempfile::TempDir, File, Console) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.log");
        let w = File::create(&path).unwrap();
        let c = Console::open(&path).unwrap();
        (dir, w, c)
    }

    #[test]
    fn a_marker_is_found_across_two_reads_and_the_first_one_wins() {
        let (_d, mut w, mut c) = console();
        w.write_all(b"booting... BLOCKPROOF-B").unwrap();
        assert_eq!(c.poll(&["BLOCKPROOF-BOOT-OK", "BLOCKPROOF-BOOT-FAILED"]).unwrap(), None);
        w.write_all(b"OOT-OK\n").unwrap();
        assert_eq!(c.poll(&["BLOCKPROOF-BOOT-FAILED", "BLOCKPROOF-BOOT-OK"]).unwrap(), Some(1));
        w.write_all(b"FAIL then OK").unwrap();
        assert_eq!(c.poll(&["OK", "FAIL"]).unwrap(), Some(1), "the earlier one in the text");
        assert_eq!(c.poll(&["OK"]).unwrap(), None, "nothing new");
    }

    #[test]
    fn the_excerpt_is_the_end_of_the_console_on_a_character_boundary() {
        let (_d, mut w, mut c) = console();
        w.write_all(&vec![b'a'; 10_000]).unwrap();
        w.write_all("é".repeat(EXCERPT_BYTES / 2).as_bytes()).unwrap();
        w.write_all(b"end").unwrap();
        c.poll(&["x"]).unwrap();
        let e = c.excerpt();
        assert!(e.len() <= EXCERPT_BYTES && e.ends_with("éend") && !e.contains('a'), "{}", e.len());
        assert!(!e.contains('\u{fffd}'), "the cut character is dropped, not replaced");
    }
}
