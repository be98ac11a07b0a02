//! NTFS through Colin Finck's `ntfs` crate (read-only, pure Rust, no `unsafe`).
//!
//! Paths are walked one directory index at a time; names match case-insensitively with
//! the volume's `$UpCase` table. A listing shows each file once under its long (Win32 or
//! POSIX) name, not its 8.3 alias, and hides the metafiles (`$MFT`, `$Extend`, ... —
//! records below 24). A file's bytes are its unnamed `$DATA` stream (alternate streams
//! are not read); times come from `$STANDARD_INFORMATION`. NTFS has no Unix modes.
//! Reparse points (symlinks, junctions) are listed as `other` and not extracted.
//! Compressed or encrypted files fail with the crate's error.

use std::cell::RefCell;
use std::io::{SeekFrom, Write};

use ntfs::indexes::NtfsFileNameIndex;
use ntfs::structured_values::{NtfsFileAttributeFlags, NtfsFileNamespace};
use ntfs::{Ntfs, NtfsError, NtfsFile, NtfsReadSeek, NtfsTime};

use crate::entry::{Entry, EntryKind, FsPath, Timestamp};
use crate::error::FsError;
use crate::filesystem::{copy_stream, fill, Backend, MAX_DIR_ENTRIES};
use crate::window::Window;

const NAME: &str = "ntfs";
/// MFT records 0-23 are the filesystem's own (`$MFT` ... `$Extend`, reserved).
const FIRST_USER_RECORD: u64 = 24;
/// 100 ns ticks between 1601-01-01 and 1970-01-01.
const EPOCH_DIFF_SECS: i64 = 11_644_473_600;

pub(crate) struct NtfsFs {
    ntfs: Ntfs,
    reader: RefCell<Window>,
}

fn error(e: NtfsError, path: &FsPath) -> FsError {
    match e {
        NtfsError::Io(io) => FsError::from_io(NAME, io),
        NtfsError::NotADirectory { .. } => FsError::NotADirectory { path: path.to_string() },
        other => FsError::corrupt(NAME, format!("{path}: {other}")),
    }
}

fn timestamp(t: NtfsTime) -> Timestamp {
    let ticks = t.nt_timestamp();
    let secs = (ticks / 10_000_000) as i64 - EPOCH_DIFF_SECS;
    Timestamp { secs, nanos: (ticks % 10_000_000) as u32 * 100 }
}

impl NtfsFs {
    pub fn open(window: Window) -> Result<NtfsFs, FsError> {
        let mut reader = window;
        let root = FsPath::root();
        let mut ntfs = Ntfs::new(&mut reader).map_err(|e| error(e, &root))?;
        ntfs.read_upcase_table(&mut reader).map_err(|e| error(e, &root))?;
        Ok(NtfsFs { ntfs, reader: RefCell::new(reader) })
    }

    /// The file at `path`, walking from the root directory.
    /// Runs `f` on the unnamed data stream of the regular file at `path` (`None`: the
    /// file has none, so it is empty): the one place `read` and `read_at` find it.
    fn with_data<T>(
        &self,
        path: &FsPath,
        f: impl FnOnce(&mut Window, &mut ntfs::attribute_value::NtfsAttributeValue<'_, '_>) -> Result<T, FsError>,
    ) -> Result<Option<T>, FsError> {
        let r = &mut *self.reader.borrow_mut();
        let file = self.find(r, path)?;
        if file.is_directory() {
            return Err(FsError::IsADirectory { path: path.to_string() });
        }
        let Some(item) = file.data(r, "") else { return Ok(None) };
        let item = item.map_err(|e| error(e, path))?;
        let attribute = item.to_attribute().map_err(|e| error(e, path))?;
        let mut value = attribute.value(r).map_err(|e| error(e, path))?;
        f(r, &mut value).map(Some)
    }

    fn find<'n>(&'n self, r: &mut Window, path: &FsPath) -> Result<NtfsFile<'n>, FsError> {
        let mut file = self.ntfs.root_directory(r).map_err(|e| error(e, &FsPath::root()))?;
        let mut walked = FsPath::root();
        for name in path.utf8_components()? {
            if !file.is_directory() {
                return Err(FsError::NotADirectory { path: walked.to_string() });
            }
            let next = {
                let index = file.directory_index(r).map_err(|e| error(e, &walked))?;
                let mut finder = index.finder();
                match NtfsFileNameIndex::find(&mut finder, &self.ntfs, r, name) {
                    None => return Err(FsError::NotFound { path: walked.join(name.as_bytes()).to_string() }),
                    Some(found) => {
                        let found = found.map_err(|e| error(e, &walked))?;
                        found.to_file(&self.ntfs, r).map_err(|e| error(e, &walked))?
                    }
                }
            };
            walked = walked.join(name.as_bytes());
            file = next;
        }
        Ok(file)
    }

    fn entry(&self, r: &mut Window, path: FsPath, file: &NtfsFile<'_>) -> Result<Entry, FsError> {
        let info = file.info().map_err(|e| error(e, &path))?;
        let reparse = info.file_attributes().contains(NtfsFileAttributeFlags::REPARSE_POINT);
        let (kind, size) = if reparse {
            (EntryKind::Other, 0)
        } else if file.is_directory() {
            (EntryKind::Dir, 0)
        } else {
            let size = match file.data(r, "") {
                None => 0,
                Some(item) => {
                    let item = item.map_err(|e| error(e, &path))?;
                    item.to_attribute().map_err(|e| error(e, &path))?.value_length()
                }
            };
            (EntryKind::File, size)
        };
        let mut e = Entry::new(path, kind, size);
        e.mtime = Some(timestamp(info.modification_time()));
        e.atime = Some(timestamp(info.access_time()));
        Ok(e)
    }
}

impl Backend for NtfsFs {
    fn stat(&self, path: &FsPath) -> Result<Entry, FsError> {
        let r = &mut *self.reader.borrow_mut();
        let file = self.find(r, path)?;
        self.entry(r, path.clone(), &file)
    }

    fn list(&self, path: &FsPath) -> Result<Vec<Entry>, FsError> {
        let r = &mut *self.reader.borrow_mut();
        let dir = self.find(r, path)?;
        if !dir.is_directory() {
            return Err(FsError::NotADirectory { path: path.to_string() });
        }
        let index = dir.directory_index(r).map_err(|e| error(e, path))?;
        let mut entries = index.entries();
        let mut out = Vec::new();
        let mut seen = 0usize;
        while let Some(item) = entries.next(r) {
            seen += 1;
            if seen > MAX_DIR_ENTRIES {
                return Err(FsError::TooManyEntries { path: path.to_string(), limit: MAX_DIR_ENTRIES });
            }
            let item = item.map_err(|e| error(e, path))?;
            let Some(key) = item.key() else { continue };
            let key = key.map_err(|e| error(e, path))?;
            if key.namespace() == NtfsFileNamespace::Dos
                || item.file_reference().file_record_number() < FIRST_USER_RECORD
            {
                continue;
            }
            let child = path.join(key.name().to_string_lossy().as_bytes());
            let file = item.to_file(&self.ntfs, r).map_err(|e| error(e, &child))?;
            out.push(self.entry(r, child, &file)?);
        }
        Ok(out)
    }

    fn read(&self, path: &FsPath, out: &mut dyn Write) -> Result<u64, FsError> {
        self.with_data(path, |r, value| copy_stream(|buf| value.read(r, buf).map_err(|e| error(e, path)), out))
            .map(|n| n.unwrap_or(0))
    }

    fn read_at(&self, path: &FsPath, offset: u64, buf: &mut [u8]) -> Result<usize, FsError> {
        self.with_data(path, |r, value| {
            if offset >= value.len() {
                return Ok(0);
            }
            value.seek(r, SeekFrom::Start(offset)).map_err(|e| error(e, path))?;
            fill(buf, |b| value.read(r, b).map_err(|e| error(e, path)))
        })
        .map(|n| n.unwrap_or(0))
    }

    fn read_link(&self, path: &FsPath) -> Result<Vec<u8>, FsError> {
        Err(FsError::NotAFile { path: path.to_string() })
    }

    fn label(&self) -> Option<String> {
        let r = &mut *self.reader.borrow_mut();
        let name = self.ntfs.volume_name(r)?.ok()?;
        Some(name.name().to_string_lossy()).filter(|n| !n.is_empty())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nt_times_convert_to_unix() {
        let unix = 1_614_834_368i64;
        let ticks = ((unix + EPOCH_DIFF_SECS) as u64) * 10_000_000 + 1234;
        assert_eq!(timestamp(NtfsTime::from(ticks)), Timestamp { secs: unix, nanos: 123_400 });
    }
}
