//! What changed between two versions of one filesystem: [`changes`].
//!
//! ## Model
//!
//! Both trees are walked together, directory by directory, names compared as bytes. An
//! entry only in the newer tree is [`Change::Added`], only in the older
//! [`Change::Removed`] (a directory's whole subtree with it); in both, it is
//! [`Change::Modified`] when its kind, size, modification time, permission bits or
//! symlink target differ — the quick check rsync makes. File contents are not read: a
//! file rewritten with the same size and modification time (times restored on purpose)
//! is not reported. The cost is reading the metadata of both trees, once.
//!
//! ## Invariants
//!
//! Changes come in the order of a depth-first walk with names sorted, a directory before
//! its entries. Entries whose names cannot be a path component ([`Entry::unsafe_name`])
//! are compared but never descended into. A directory cycle in a damaged filesystem is
//! [`FsError::TooDeep`], not a walk without end.

use std::cmp::Ordering;

use crate::extract::MAX_DEPTH;
use crate::{Entry, EntryKind, Filesystem, FsError, FsPath};

/// How an entry changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Change {
    Added,
    Removed,
    Modified,
}

impl Change {
    /// `+`, `-` or `M`, as the text of `blockproof diff --files` marks it.
    pub fn mark(self) -> char {
        match self {
            Change::Added => '+',
            Change::Removed => '-',
            Change::Modified => 'M',
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Change::Added => "added",
            Change::Removed => "removed",
            Change::Modified => "modified",
        }
    }
}

/// One changed entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileChange {
    pub path: FsPath,
    pub change: Change,
    /// The entry's kind in the newer tree (the older one's when removed).
    pub kind: EntryKind,
    /// For a modified entry, what differs: `kind`, `size`, `mtime`, `mode`, `target`.
    pub differs: Vec<&'static str>,
}

/// The entries that differ between `old` and `new` (two versions of one filesystem).
pub fn changes(old: &Filesystem, new: &Filesystem) -> Result<Vec<FileChange>, FsError> {
    let mut out = Vec::new();
    walk(old, new, &FsPath::root(), 0, &mut out)?;
    Ok(out)
}

fn sorted(fs: &Filesystem, dir: &FsPath) -> Result<Vec<Entry>, FsError> {
    let mut entries = fs.list_dir(dir)?;
    entries.sort_by(|a, b| a.path.file_name().cmp(b.path.file_name()));
    Ok(entries)
}

fn descend(e: &Entry) -> bool {
    e.kind == EntryKind::Dir && e.unsafe_name().is_none()
}

fn walk(
    old: &Filesystem,
    new: &Filesystem,
    dir: &FsPath,
    depth: usize,
    out: &mut Vec<FileChange>,
) -> Result<(), FsError> {
    if depth > MAX_DEPTH {
        return Err(FsError::TooDeep { path: dir.to_string(), limit: MAX_DEPTH });
    }
    let (a, b) = (sorted(old, dir)?, sorted(new, dir)?);
    let (mut i, mut j) = (0, 0);
    while i < a.len() || j < b.len() {
        let order = match (a.get(i), b.get(j)) {
            (Some(x), Some(y)) => x.path.file_name().cmp(y.path.file_name()),
            (Some(_), None) => Ordering::Less,
            _ => Ordering::Greater,
        };
        match order {
            Ordering::Less => {
                one_side(old, &a[i], Change::Removed, depth, out)?;
                i += 1;
            }
            Ordering::Greater => {
                one_side(new, &b[j], Change::Added, depth, out)?;
                j += 1;
            }
            Ordering::Equal => {
                let (x, y) = (&a[i], &b[j]);
                let differs = differences(old, new, x, y)?;
                if !differs.is_empty() {
                    out.push(FileChange { path: y.path.clone(), change: Change::Modified, kind: y.kind, differs });
                }
                match (descend(x), descend(y)) {
                    (true, true) => walk(old, new, &y.path, depth + 1, out)?,
                    (true, false) => subtree(old, &x.path, Change::Removed, depth + 1, out)?,
                    (false, true) => subtree(new, &y.path, Change::Added, depth + 1, out)?,
                    (false, false) => {}
                }
                i += 1;
                j += 1;
            }
        }
    }
    Ok(())
}

/// An entry present on one side only, with its subtree.
fn one_side(
    fs: &Filesystem,
    e: &Entry,
    change: Change,
    depth: usize,
    out: &mut Vec<FileChange>,
) -> Result<(), FsError> {
    out.push(FileChange { path: e.path.clone(), change, kind: e.kind, differs: Vec::new() });
    if descend(e) {
        subtree(fs, &e.path, change, depth + 1, out)?;
    }
    Ok(())
}

fn subtree(
    fs: &Filesystem,
    dir: &FsPath,
    change: Change,
    depth: usize,
    out: &mut Vec<FileChange>,
) -> Result<(), FsError> {
    if depth > MAX_DEPTH {
        return Err(FsError::TooDeep { path: dir.to_string(), limit: MAX_DEPTH });
    }
    for e in sorted(fs, dir)? {
        one_side(fs, &e, change, depth, out)?;
    }
    Ok(())
}

fn differences(old: &Filesystem, new: &Filesystem, x: &Entry, y: &Entry) -> Result<Vec<&'static str>, FsError> {
    let mut d = Vec::new();
    if x.kind != y.kind {
        d.push("kind");
    }
    if x.kind != EntryKind::Dir && x.size != y.size {
        d.push("size");
    }
    if x.kind != EntryKind::Dir && x.mtime != y.mtime {
        d.push("mtime");
    }
    if x.mode != y.mode {
        d.push("mode");
    }
    if x.kind == EntryKind::Symlink && y.kind == EntryKind::Symlink {
        let path = |e: &Entry| e.path.to_bytes();
        if old.read_link(path(x))? != new.read_link(path(y))? {
            d.push("target");
        }
    }
    Ok(d)
}
