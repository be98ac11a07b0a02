//! ext2/3/4 through `ext4-view` (read-only by design, pure Rust, no `unsafe`).
//!
//! Names are bytes; symlinks inside a path are resolved by `ext4-view` within the
//! filesystem (bounded); modes, owners and nanosecond times come from the inode. The
//! journal is not replayed by blockproof beyond what `ext4-view` does, so a backup of a
//! mounted, busy filesystem shows its last consistent on-disk state.

use std::io::Write;

use ext4_view::{Ext4, Ext4Error, FileType, Metadata};

use crate::entry::{Entry, EntryKind, FsPath, Timestamp};
use crate::error::FsError;
use crate::filesystem::{copy_stream, fill, Backend, MAX_DIR_ENTRIES};
use crate::fs_kind::FsKind;
use crate::window::Window;

pub(crate) struct ExtFs {
    fs: Ext4,
    name: &'static str,
}

impl ExtFs {
    pub fn open(kind: FsKind, window: Window) -> Result<ExtFs, FsError> {
        let name = kind.name();
        let fs = Ext4::load(Box::new(window)).map_err(|e| error(name, e, &FsPath::root()))?;
        Ok(ExtFs { fs, name })
    }

    fn err(&self, e: Ext4Error, path: &FsPath) -> FsError {
        error(self.name, e, path)
    }
}

/// ext4-view's error as ours, naming `path` where the error is about it.
fn error(fs: &str, e: Ext4Error, path: &FsPath) -> FsError {
    let path_s = || path.to_string();
    match e {
        Ext4Error::NotFound => FsError::NotFound { path: path_s() },
        Ext4Error::NotADirectory => FsError::NotADirectory { path: path_s() },
        Ext4Error::IsADirectory => FsError::IsADirectory { path: path_s() },
        Ext4Error::IsASpecialFile | Ext4Error::NotASymlink => FsError::NotAFile { path: path_s() },
        Ext4Error::MalformedPath => FsError::InvalidPath { path: path_s(), reason: "not a valid ext path" },
        Ext4Error::PathTooLong => FsError::InvalidPath { path: path_s(), reason: "too long" },
        Ext4Error::Io(inner) => FsError::from_boxed(fs, inner),
        other => FsError::corrupt(fs, format!("{}: {other}", path_s())),
    }
}

fn kind_of(t: FileType) -> EntryKind {
    if t.is_regular_file() {
        EntryKind::File
    } else if t.is_dir() {
        EntryKind::Dir
    } else if t.is_symlink() {
        EntryKind::Symlink
    } else {
        EntryKind::Other
    }
}

fn timestamp(t: ext4_view::Timestamp) -> Timestamp {
    Timestamp { secs: t.seconds(), nanos: t.nanoseconds() }
}

fn entry(path: FsPath, m: &Metadata) -> Entry {
    let kind = kind_of(m.file_type());
    let size = if kind == EntryKind::Dir { 0 } else { m.len() };
    let mut e = Entry::new(path, kind, size);
    e.mtime = Some(timestamp(m.modified()));
    e.atime = Some(timestamp(m.accessed()));
    e.mode = Some(u32::from(m.mode()));
    e.uid = Some(m.uid());
    e.gid = Some(m.gid());
    e
}

impl Backend for ExtFs {
    fn stat(&self, path: &FsPath) -> Result<Entry, FsError> {
        let m = self.fs.symlink_metadata(path.to_bytes().as_slice()).map_err(|e| self.err(e, path))?;
        Ok(entry(path.clone(), &m))
    }

    fn list(&self, path: &FsPath) -> Result<Vec<Entry>, FsError> {
        let dir = self.fs.read_dir(path.to_bytes().as_slice()).map_err(|e| self.err(e, path))?;
        let mut out = Vec::new();
        for (n, item) in dir.enumerate() {
            let item = item.map_err(|e| self.err(e, path))?;
            let name = item.file_name();
            // A directory's own `.` and `..` are its first two entries. Any other entry of
            // those names is listed: extraction reports it and skips it, never silently.
            if (n == 0 && name == ".") || (n == 1 && name == "..") {
                continue;
            }
            if out.len() >= MAX_DIR_ENTRIES {
                return Err(FsError::TooManyEntries { path: path.to_string(), limit: MAX_DIR_ENTRIES });
            }
            let child = path.join(name.as_ref());
            let m = item.metadata().map_err(|e| self.err(e, &child))?;
            out.push(entry(child, &m));
        }
        Ok(out)
    }

    fn read(&self, path: &FsPath, out: &mut dyn Write) -> Result<u64, FsError> {
        let mut file = self.fs.open(path.to_bytes().as_slice()).map_err(|e| self.err(e, path))?;
        copy_stream(|buf| file.read_bytes(buf).map_err(|e| self.err(e, path)), out)
    }

    fn read_at(&self, path: &FsPath, offset: u64, buf: &mut [u8]) -> Result<usize, FsError> {
        let mut file = self.fs.open(path.to_bytes().as_slice()).map_err(|e| self.err(e, path))?;
        if offset >= file.metadata().len() {
            return Ok(0);
        }
        file.seek_to(offset).map_err(|e| self.err(e, path))?;
        fill(buf, |b| file.read_bytes(b).map_err(|e| self.err(e, path)))
    }

    fn read_link(&self, path: &FsPath) -> Result<Vec<u8>, FsError> {
        let target = self.fs.read_link(path.to_bytes().as_slice()).map_err(|e| self.err(e, path))?;
        Ok(target.as_ref().to_vec())
    }

    fn label(&self) -> Option<String> {
        self.fs.label().to_str().ok().filter(|l| !l.is_empty()).map(str::to_string)
    }
}
