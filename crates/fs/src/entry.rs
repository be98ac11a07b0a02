//! Paths inside a filesystem, and what a directory entry says about a file.

use std::ffi::OsStr;
use std::fmt;
use std::os::unix::ffi::OsStrExt;
use std::time::{Duration, SystemTime};

use crate::error::FsError;

/// An absolute path inside a filesystem: a list of plain name components, never `.` or
/// `..`. Components are bytes, since ext2/3/4 names need not be UTF-8.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct FsPath {
    parts: Vec<Vec<u8>>,
}

impl FsPath {
    /// The root directory.
    pub fn root() -> FsPath {
        FsPath::default()
    }

    /// Parses `/etc/hostname`-style paths. The leading `/` is optional; empty and `.`
    /// components are dropped; `..` and NUL bytes are refused.
    pub fn parse(path: impl AsRef<[u8]>) -> Result<FsPath, FsError> {
        let raw = path.as_ref();
        let invalid = |reason| FsError::InvalidPath { path: String::from_utf8_lossy(raw).into_owned(), reason };
        if raw.contains(&0) {
            return Err(invalid("it contains a NUL byte"));
        }
        let mut parts = Vec::new();
        for part in raw.split(|&b| b == b'/') {
            match part {
                b"" | b"." => {}
                b".." => return Err(invalid("'..' is not allowed; give the path from the filesystem's root")),
                name => parts.push(name.to_vec()),
            }
        }
        Ok(FsPath { parts })
    }

    pub fn is_root(&self) -> bool {
        self.parts.is_empty()
    }

    /// The components, outermost first.
    pub fn components(&self) -> impl Iterator<Item = &[u8]> {
        self.parts.iter().map(Vec::as_slice)
    }

    /// The last component (empty for the root).
    pub fn file_name(&self) -> &[u8] {
        self.parts.last().map_or(&[], Vec::as_slice)
    }

    /// This path with one more component. The name must already be known to be one plain
    /// component: not empty, `.` or `..`, and without `/` or NUL.
    pub fn join(&self, name: &[u8]) -> FsPath {
        let mut parts = self.parts.clone();
        parts.push(name.to_vec());
        FsPath { parts }
    }

    /// `/a/b` as bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        if self.parts.is_empty() {
            return b"/".to_vec();
        }
        let mut out = Vec::new();
        for p in &self.parts {
            out.push(b'/');
            out.extend_from_slice(p);
        }
        out
    }

    /// The components as a relative OS path (empty for the root).
    pub fn to_relative_os(&self) -> std::path::PathBuf {
        self.parts.iter().map(|p| OsStr::from_bytes(p)).collect()
    }

    /// The components as UTF-8 strings, for filesystems whose names are Unicode.
    pub(crate) fn utf8_components(&self) -> Result<Vec<&str>, FsError> {
        self.parts
            .iter()
            .map(|p| std::str::from_utf8(p).map_err(|_| FsError::NotFound { path: self.to_string() }))
            .collect()
    }
}

impl fmt::Display for FsPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&String::from_utf8_lossy(&self.to_bytes()))
    }
}

/// Why `name`, read from a directory, cannot be used as one path component, if it cannot.
pub(crate) fn check_name(name: &[u8]) -> Result<(), &'static str> {
    match name {
        b"" => Err("an empty name"),
        b"." | b".." => Err("a name that means a directory itself or its parent"),
        _ if name.contains(&b'/') => Err("a name with '/' in it"),
        _ if name.contains(&0) => Err("a name with a NUL byte in it"),
        _ => Ok(()),
    }
}

/// What kind of file an entry is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryKind {
    File,
    Dir,
    Symlink,
    /// A device node, FIFO or socket: listed, never extracted.
    Other,
}

impl EntryKind {
    pub fn name(self) -> &'static str {
        match self {
            EntryKind::File => "file",
            EntryKind::Dir => "dir",
            EntryKind::Symlink => "symlink",
            EntryKind::Other => "other",
        }
    }
}

/// A point in time as the filesystem stores it: seconds since the Unix epoch (negative
/// before 1970) and nanoseconds. FAT stores local time without a zone; it is read as UTC.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Timestamp {
    pub secs: i64,
    pub nanos: u32,
}

impl Timestamp {
    pub fn to_system_time(self) -> Option<SystemTime> {
        let nanos = Duration::from_nanos(u64::from(self.nanos.min(999_999_999)));
        if self.secs >= 0 {
            SystemTime::UNIX_EPOCH.checked_add(Duration::from_secs(self.secs as u64) + nanos)
        } else {
            SystemTime::UNIX_EPOCH.checked_sub(Duration::from_secs(self.secs.unsigned_abs()))?.checked_add(nanos)
        }
    }

    /// RFC 3339 in UTC with seconds (`2021-03-04T05:06:08Z`); whole seconds, as `ls` shows.
    pub fn rfc3339(self) -> String {
        let days = self.secs.div_euclid(86_400);
        let rem = self.secs.rem_euclid(86_400);
        let (y, m, d) = civil_from_days(days);
        format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem / 60 % 60, rem % 60)
    }
}

/// Howard Hinnant's days-to-civil: the proleptic Gregorian date `days` after 1970-01-01.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = (if mp < 10 { mp + 3 } else { mp - 9 }) as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// Days from 1970-01-01 to the proleptic Gregorian date (the inverse of the above).
pub(crate) fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = i64::from((m + 9) % 12);
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// One file, directory or link, as its directory entry and inode describe it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// The name (lossily converted to UTF-8 where the filesystem's bytes are not).
    pub name: String,
    /// The absolute path inside the filesystem.
    pub path: FsPath,
    pub kind: EntryKind,
    /// Size in bytes (files and symlinks; 0 for directories).
    pub size: u64,
    pub mtime: Option<Timestamp>,
    pub atime: Option<Timestamp>,
    /// Permission bits (`0o7777`), where the filesystem has them (ext2/3/4).
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
}

impl Entry {
    /// Why this entry's name cannot be one component of a path (it is empty, `.`, `..`,
    /// or holds `/` or NUL), if it cannot: only a damaged or hostile filesystem stores
    /// such a name. [`extract`](crate::extract) skips and reports such entries.
    pub fn unsafe_name(&self) -> Option<&'static str> {
        check_name(self.path.file_name()).err()
    }

    /// An entry with only the facts every filesystem has.
    pub(crate) fn new(path: FsPath, kind: EntryKind, size: u64) -> Entry {
        let name = String::from_utf8_lossy(path.file_name()).into_owned();
        Entry { name, path, kind, size, mtime: None, atime: None, mode: None, uid: None, gid: None }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_parse_to_plain_components() {
        assert_eq!(FsPath::parse("/etc//./hostname/").unwrap().to_string(), "/etc/hostname");
        assert_eq!(FsPath::parse("etc").unwrap().to_string(), "/etc");
        assert!(FsPath::parse("/").unwrap().is_root());
        assert!(FsPath::parse("").unwrap().is_root());
        assert!(matches!(FsPath::parse("/a/../../etc"), Err(FsError::InvalidPath { .. })));
        assert!(matches!(FsPath::parse(b"/a\0b"), Err(FsError::InvalidPath { .. })));
        let p = FsPath::parse(b"/d/\xffname").unwrap();
        assert_eq!(p.file_name(), b"\xffname");
        assert_eq!(p.to_relative_os(), std::path::PathBuf::from(OsStr::from_bytes(b"d/\xffname")));
    }

    #[test]
    fn names_must_be_one_plain_component() {
        for bad in [&b""[..], b".", b"..", b"a/b", b"/", b"x\0"] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
        assert!(check_name(b"...").is_ok());
        assert!(check_name(b"a\\b").is_ok());
    }

    #[test]
    fn timestamps_format_and_convert() {
        let t = Timestamp { secs: 1_614_834_368, nanos: 5 };
        assert_eq!(t.rfc3339(), "2021-03-04T05:06:08Z");
        assert_eq!(Timestamp { secs: -1, nanos: 0 }.rfc3339(), "1969-12-31T23:59:59Z");
        assert_eq!(Timestamp { secs: 951_782_400, nanos: 0 }.rfc3339(), "2000-02-29T00:00:00Z");
        assert_eq!(days_from_civil(2000, 2, 29) * 86_400, 951_782_400);
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        let st = t.to_system_time().unwrap();
        assert_eq!(st.duration_since(SystemTime::UNIX_EPOCH).unwrap(), Duration::new(1_614_834_368, 5));
        assert!(Timestamp { secs: -86_400, nanos: 0 }.to_system_time().unwrap() < SystemTime::UNIX_EPOCH);
    }
}
