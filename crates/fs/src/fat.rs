//! FAT12/16/32 through `fatfs` (long file names, all three FAT types).
//!
//! `fatfs` wants a `Read + Write + Seek` device; it gets a [`Window`] whose writes fail,
//! and it is opened with access-date updates off, so it has no reason to write (its
//! unmount on drop writes only what an earlier write made dirty: nothing). Names are
//! matched case-insensitively, against the long and the 8.3 name, walking one directory
//! at a time. FAT has no modes, owners or symlinks; its times are local time without a
//! zone and are read as UTC; the access time is a date (midnight).

use std::io::{Read, Seek, SeekFrom, Write};

use fatfs::{Date, DirEntry, FileSystem, FsOptions, Time};

use crate::entry::{days_from_civil, Entry, EntryKind, FsPath, Timestamp};
use crate::error::FsError;
use crate::filesystem::{copy_stream, fill, Backend, MAX_DIR_ENTRIES};
use crate::fs_kind::FsKind;
use crate::window::Window;

pub(crate) struct FatFs {
    fs: FileSystem<Window>,
    name: &'static str,
}

/// What a path names: the root (which has no directory entry) or an entry.
enum Found<'a> {
    Root,
    Entry(DirEntry<'a, Window>),
}

impl FatFs {
    pub fn open(kind: FsKind, window: Window) -> Result<FatFs, FsError> {
        let name = kind.name();
        let options = FsOptions::new().update_accessed_date(false);
        let fs = FileSystem::new(window, options).map_err(|e| FsError::from_io(name, e))?;
        Ok(FatFs { fs, name })
    }

    fn io(&self, e: std::io::Error) -> FsError {
        FsError::from_io(self.name, e)
    }

    /// The regular file at `path`, opened for reading, and its length.
    fn file(&self, path: &FsPath) -> Result<(fatfs::File<'_, Window>, u64), FsError> {
        match self.find(path)? {
            Found::Entry(e) if !e.is_dir() => Ok((e.to_file(), e.len())),
            _ => Err(FsError::IsADirectory { path: path.to_string() }),
        }
    }

    /// Walks `path` from the root.
    fn find(&self, path: &FsPath) -> Result<Found<'_>, FsError> {
        let names = path.utf8_components()?;
        let mut dir = self.fs.root_dir();
        let mut walked = FsPath::root();
        for (i, name) in names.iter().enumerate() {
            let entry = self.lookup(&dir, name, &walked)?;
            walked = walked.join(name.as_bytes());
            if i + 1 == names.len() {
                return Ok(Found::Entry(entry));
            }
            if !entry.is_dir() {
                return Err(FsError::NotADirectory { path: walked.to_string() });
            }
            dir = entry.to_dir();
        }
        Ok(Found::Root)
    }

    /// The entry called `name` in `dir` (whose path is `dir_path`).
    fn lookup<'a>(
        &'a self,
        dir: &fatfs::Dir<'a, Window>,
        name: &str,
        dir_path: &FsPath,
    ) -> Result<DirEntry<'a, Window>, FsError> {
        let wanted = name.to_uppercase();
        for (n, item) in dir.iter().enumerate() {
            if n >= MAX_DIR_ENTRIES {
                return Err(FsError::TooManyEntries { path: dir_path.to_string(), limit: MAX_DIR_ENTRIES });
            }
            let item = item.map_err(|e| self.io(e))?;
            if item.file_name().to_uppercase() == wanted || item.short_file_name().to_uppercase() == wanted {
                return Ok(item);
            }
        }
        Err(FsError::NotFound { path: dir_path.join(name.as_bytes()).to_string() })
    }
}

fn fat_time(d: Date, t: Time) -> Option<Timestamp> {
    let valid = (1..=12).contains(&d.month) && (1..=31).contains(&d.day) && t.hour < 24 && t.min < 60 && t.sec < 60;
    if !valid {
        return None;
    }
    let days = days_from_civil(i64::from(d.year), u32::from(d.month), u32::from(d.day));
    let secs = days * 86_400 + i64::from(t.hour) * 3600 + i64::from(t.min) * 60 + i64::from(t.sec);
    Some(Timestamp { secs, nanos: u32::from(t.millis.min(999)) * 1_000_000 })
}

fn entry(path: FsPath, e: &DirEntry<'_, Window>) -> Entry {
    let (kind, size) = if e.is_dir() { (EntryKind::Dir, 0) } else { (EntryKind::File, e.len()) };
    let mut out = Entry::new(path, kind, size);
    let modified = e.modified();
    out.mtime = fat_time(modified.date, modified.time);
    out.atime = fat_time(e.accessed(), Time { hour: 0, min: 0, sec: 0, millis: 0 });
    out
}

impl Backend for FatFs {
    fn stat(&self, path: &FsPath) -> Result<Entry, FsError> {
        match self.find(path)? {
            Found::Root => Ok(Entry::new(FsPath::root(), EntryKind::Dir, 0)),
            Found::Entry(e) => Ok(entry(path.clone(), &e)),
        }
    }

    fn list(&self, path: &FsPath) -> Result<Vec<Entry>, FsError> {
        let dir = match self.find(path)? {
            Found::Root => self.fs.root_dir(),
            Found::Entry(e) if e.is_dir() => e.to_dir(),
            Found::Entry(_) => return Err(FsError::NotADirectory { path: path.to_string() }),
        };
        let mut out = Vec::new();
        for item in dir.iter() {
            if out.len() >= MAX_DIR_ENTRIES {
                return Err(FsError::TooManyEntries { path: path.to_string(), limit: MAX_DIR_ENTRIES });
            }
            let item = item.map_err(|e| self.io(e))?;
            let name = item.file_name();
            if name == "." || name == ".." {
                continue;
            }
            out.push(entry(path.join(name.as_bytes()), &item));
        }
        Ok(out)
    }

    fn read(&self, path: &FsPath, out: &mut dyn Write) -> Result<u64, FsError> {
        let (mut file, _) = self.file(path)?;
        copy_stream(|buf| file.read(buf).map_err(|e| self.io(e)), out)
    }

    fn read_at(&self, path: &FsPath, offset: u64, buf: &mut [u8]) -> Result<usize, FsError> {
        let (mut file, len) = self.file(path)?;
        if offset >= len {
            return Ok(0);
        }
        file.seek(SeekFrom::Start(offset)).map_err(|e| self.io(e))?;
        fill(buf, |b| file.read(b).map_err(|e| self.io(e)))
    }

    fn read_link(&self, path: &FsPath) -> Result<Vec<u8>, FsError> {
        Err(FsError::NotAFile { path: path.to_string() })
    }

    fn label(&self) -> Option<String> {
        let label = self.fs.volume_label();
        let label = label.trim_end();
        (!label.is_empty() && label != "NO NAME").then(|| label.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fat_times_are_checked_and_read_as_utc() {
        let d = Date { year: 2021, month: 3, day: 4 };
        let t = Time { hour: 5, min: 6, sec: 8, millis: 500 };
        assert_eq!(fat_time(d, t), Some(Timestamp { secs: 1_614_834_368, nanos: 500_000_000 }));
        assert_eq!(fat_time(Date { year: 1980, month: 0, day: 0 }, t), None);
        assert_eq!(fat_time(d, Time { hour: 31, ..t }), None);
    }
}
