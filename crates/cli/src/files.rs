//! `partitions`, `ls`, `cat` and `restore-files`: files inside a disk, without mounting and
//! without root, through blockproof-fs.
//!
//! Every command reads the disk through one `Box<dyn ReadAt>` made by [`open_disk`].
//! Today that is a raw image named by `--image`; the contract (`ls SNAP --disk ID` with
//! `--repo`) swaps in the backed-up disk's reader there and nowhere else: the `*_on`
//! functions below take the disk as a `ReadAt` and do not care where it comes from.

use std::ffi::OsString;
use std::io::{self, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;

use anyhow::{Context, Result};
use blockproof_fs::{extract, Disk, Entry, EntryKind, ExtractOptions, Filesystem, FsError, FsPath, ImageFile, ReadAt};
use clap::Args;
use serde::Serialize;

use blockproof_core::image::DEFAULT_CACHE_BYTES;
use blockproof_core::DiskImage;
use blockproof_format::DiskEntry;
use blockproof_repo::{BlobIndex, BlobReader, Repository};

use crate::commands::{human_bytes, open_repo, print_json};
use crate::{exit, Usage};

/// Where the disk comes from: a disk of a snapshot (`SNAP --disk ID` with `--repo`), or,
/// with `--image`, a raw disk image file or block device (then no SNAP is given).
#[derive(Args, Debug)]
pub struct DiskSource {
    /// Repository location (a directory or s3://BUCKET/PREFIX).
    #[arg(long, env = "BLOCKPROOF_REPO", value_name = "REPO")]
    pub repo: Option<String>,
    /// Read the password from the first line of this file.
    #[arg(long, value_name = "FILE")]
    pub password_file: Option<PathBuf>,
    #[command(flatten)]
    pub store: crate::args::StoreArgs,
    /// The disk id of the snapshot to read.
    #[arg(long, value_name = "ID", value_parser = crate::disk_spec::disk_id)]
    pub disk: Option<String>,
    /// Read a raw disk image file or block device instead of a snapshot (read-only).
    #[arg(long, value_name = "PATH", conflicts_with_all = ["repo", "disk"])]
    pub image: Option<PathBuf>,
}

impl DiskSource {
    /// Splits the positional arguments: the snapshot (unless `--image`) and the rest.
    fn split(&self, mut args: Vec<OsString>) -> Result<(Option<String>, Vec<OsString>), Usage> {
        if self.image.is_some() {
            return Ok((None, args));
        }
        if args.is_empty() {
            return Err(Usage(
                "give a snapshot (id, prefix, VM:latest, VM:latest~N, ...) and --disk ID, or --image PATH".into(),
            ));
        }
        let snap = args.remove(0).to_string_lossy().into_owned();
        Ok((Some(snap), args))
    }
}

/// A disk of a snapshot as a [`ReadAt`]: the verified, cached reader of blockproof-core.
struct SnapshotDisk(DiskImage<'static>);

impl ReadAt for SnapshotDisk {
    fn size(&self) -> u64 {
        self.0.size()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.0.read_at(buf, offset).map_err(|e| io::Error::other(e.to_string()))
    }
}

/// Which filesystem of the disk.
#[derive(Args, Debug)]
pub struct PartitionChoice {
    /// The partition to read, numbered as `blockproof partitions` shows (GPT entry
    /// number; MBR 1-4, logical from 5; 0 for a filesystem on the whole disk). Default:
    /// the only readable filesystem on the disk, EFI system and Windows recovery
    /// partitions passed over.
    #[arg(long, value_name = "N")]
    pub partition: Option<u32>,
}

#[derive(Args, Debug)]
pub struct PartitionsArgs {
    #[command(flatten)]
    pub source: DiskSource,
    /// SNAP (a snapshot id, prefix, VM:latest, VM:latest~N, VM:tag=TAG or VM:before=TIME; not with --image).
    #[arg(value_name = "SNAP")]
    pub args: Vec<OsString>,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct LsArgs {
    #[command(flatten)]
    pub source: DiskSource,
    #[command(flatten)]
    pub choice: PartitionChoice,
    /// SNAP, then a directory (listed) or file (shown) inside the filesystem, `/etc`
    /// style (default `/`). With --image, only the path.
    #[arg(value_name = "SNAP PATH")]
    pub args: Vec<OsString>,
    /// Print a JSON array.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct CatArgs {
    #[command(flatten)]
    pub source: DiskSource,
    #[command(flatten)]
    pub choice: PartitionChoice,
    /// SNAP, then the file inside the filesystem, `/etc/hostname` style. With --image,
    /// only the path.
    #[arg(value_name = "SNAP PATH", required = true)]
    pub args: Vec<OsString>,
}

#[derive(Args, Debug)]
pub struct RestoreFilesArgs {
    #[command(flatten)]
    pub source: DiskSource,
    #[command(flatten)]
    pub choice: PartitionChoice,
    /// SNAP, then files or directories inside the filesystem (`/` for all of it). With
    /// --image, only the paths.
    #[arg(required = true, value_name = "SNAP PATH")]
    pub args: Vec<OsString>,
    /// The directory to restore into: /etc/hostname becomes DIR/etc/hostname.
    #[arg(long, value_name = "DIR")]
    pub to: PathBuf,
    /// Replace existing files and symlinks (directories are merged either way).
    #[arg(long)]
    pub force: bool,
    /// Keep setuid, setgid and sticky bits and write permission for others as the
    /// filesystem stores them (by default they are removed). Run as root, this also gives
    /// every restored file, directory and symlink its stored numeric owner and group, so
    /// a kept setuid bit never makes a root-owned setuid file out of a guest user's.
    #[arg(long)]
    pub keep_special_modes: bool,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

/// The disk's bytes. The one place that knows where they come from.
pub fn open_disk(source: &DiskSource, snapshot: Option<&str>) -> Result<Box<dyn ReadAt>> {
    if let Some(image) = &source.image {
        return match ImageFile::open(image) {
            Ok(img) => Ok(Box::new(img)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                Err(Usage(format!("cannot open image {}: {e}", image.display())).into())
            }
            Err(e) => Err(e).with_context(|| format!("cannot open image {}", image.display())),
        };
    }
    let (Some(repo), Some(snapshot), Some(disk)) = (&source.repo, snapshot, &source.disk) else {
        return Err(Usage("give --repo REPO, a snapshot and --disk ID (or --image PATH)".into()).into());
    };
    let args = crate::args::RepoArgs {
        repo: Some(repo.clone()),
        password_file: source.password_file.clone(),
        store: source.store.clone(),
    };
    // The repository, its index and the reader live as long as this command: they are
    // leaked on purpose, so the disk reader can be a plain 'static value.
    let repo: &'static Repository = Box::leak(Box::new(open_repo(&args)?));
    let info = crate::commands::resolve_for_reading(repo, snapshot)?;
    let entry = info.snapshot.disk(disk).cloned().ok_or_else(|| {
        let ids: Vec<_> = info.snapshot.disks.iter().map(|d| d.id.as_str()).collect();
        Usage(format!("snapshot {} has no disk {disk:?} (it has: {})", info.id.short(), ids.join(", ")))
    })?;
    if !entry.mismatches.is_empty() {
        eprintln!(
            "blockproof: warning: snapshot {} is tainted: disk {disk} differs from its source in {} range(s)",
            info.id.short(),
            entry.mismatches.len()
        );
    }
    let reader = leaked_reader(repo)?;
    snapshot_disk(reader, &entry)
}

/// The blob reader of `repo`, living as long as the command (leaked on purpose, so disk
/// readers can be plain 'static values).
pub(crate) fn leaked_reader(repo: &'static Repository) -> Result<&'static BlobReader<'static>> {
    let index: &'static BlobIndex = Box::leak(Box::new(crate::commands::index_for_reading(repo)?));
    Ok(Box::leak(Box::new(BlobReader::new(repo, index))))
}

/// A disk of a snapshot as a [`ReadAt`] for blockproof-fs.
pub(crate) fn snapshot_disk(reader: &'static BlobReader<'static>, entry: &DiskEntry) -> Result<Box<dyn ReadAt>> {
    Ok(Box::new(SnapshotDisk(DiskImage::new(reader, entry, DEFAULT_CACHE_BYTES)?)))
}

/// A library error for the binary: the caller's mistakes are usage errors (exit 2).
pub(crate) fn fs_error(err: FsError) -> anyhow::Error {
    match err {
        FsError::Ambiguous { count, available } => {
            Usage(format!("the disk has {count} filesystems ({available}); choose one with --partition N")).into()
        }
        e if e.is_usage() => Usage(e.to_string()).into(),
        e => e.into(),
    }
}

fn open_filesystem(disk: Box<dyn ReadAt>, partition: Option<u32>) -> Result<Filesystem> {
    let disk = Disk::open(disk).map_err(fs_error)?;
    disk.open_filesystem(partition).map_err(fs_error)
}

fn parse_path(p: &OsString) -> Result<FsPath> {
    FsPath::parse(p.as_bytes()).map_err(fs_error)
}

pub fn partitions(a: PartitionsArgs) -> Result<u8> {
    let (snap, rest) = a.source.split(a.args)?;
    if !rest.is_empty() {
        return Err(Usage("partitions takes no path".into()).into());
    }
    partitions_on(open_disk(&a.source, snap.as_deref())?, a.json)
}

pub fn ls(a: LsArgs) -> Result<u8> {
    let (snap, rest) = a.source.split(a.args)?;
    let path = match rest.as_slice() {
        [] => OsString::from("/"),
        [p] => p.clone(),
        _ => return Err(Usage("ls takes one path".into()).into()),
    };
    ls_on(open_disk(&a.source, snap.as_deref())?, a.choice.partition, &path, a.json)
}

pub fn cat(a: CatArgs) -> Result<u8> {
    let (snap, rest) = a.source.split(a.args)?;
    let [path] = rest.as_slice() else {
        return Err(Usage("cat takes one file path".into()).into());
    };
    cat_on(open_disk(&a.source, snap.as_deref())?, a.choice.partition, path)
}

pub fn restore_files(a: RestoreFilesArgs) -> Result<u8> {
    let (snap, paths) = a.source.split(a.args)?;
    if paths.is_empty() {
        return Err(Usage("give the files or directories to restore (/ for everything)".into()).into());
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    let options = ExtractOptions {
        overwrite: a.force,
        keep_special_modes: a.keep_special_modes,
        restore_owners: a.keep_special_modes && root,
    };
    restore_files_on(open_disk(&a.source, snap.as_deref())?, a.choice.partition, &paths, &a.to, &options, a.json)
}

#[derive(Serialize)]
struct PartitionRow {
    index: u32,
    start: u64,
    size: u64,
    type_id: String,
    #[serde(rename = "type")]
    type_name: String,
    name: Option<String>,
    filesystem: Option<&'static str>,
    label: Option<String>,
}

pub fn partitions_on(src: Box<dyn ReadAt>, json: bool) -> Result<u8> {
    let disk = Disk::open(src).map_err(fs_error)?;
    let rows: Vec<PartitionRow> = disk
        .partitions()
        .iter()
        .map(|p| PartitionRow {
            index: p.index,
            start: p.start,
            size: p.size,
            type_id: p.type_id.clone(),
            type_name: p.type_name.clone(),
            name: p.name.clone(),
            filesystem: p.filesystem.map(|k| k.name()),
            // The label needs the filesystem opened; one that will not open has none.
            label: p
                .filesystem
                .filter(|k| k.is_readable())
                .and_then(|_| disk.open_filesystem(Some(p.index)).ok()?.label()),
        })
        .collect();
    if json {
        print_json(&serde_json::json!({ "table": disk.table().to_string(), "size": disk.size(), "partitions": rows }))?;
        return Ok(exit::OK);
    }
    println!("disk: {} ({} bytes), partition table: {}", human_bytes(disk.size()), disk.size(), disk.table());
    println!("{:>3}  {:>12}  {:>10}  {:<22} {:<12} label", "#", "start", "size", "type", "filesystem");
    for r in &rows {
        println!(
            "{:>3}  {:>12}  {:>10}  {:<22} {:<12} {}",
            r.index,
            r.start,
            human_bytes(r.size),
            r.type_name,
            r.filesystem.unwrap_or("-"),
            r.label.as_deref().unwrap_or("")
        );
    }
    Ok(exit::OK)
}

#[derive(Serialize)]
struct EntryRow {
    name: String,
    path: String,
    #[serde(rename = "type")]
    kind: &'static str,
    size: u64,
    mtime: Option<String>,
    mtime_unix: Option<i64>,
    mode: Option<String>,
    uid: Option<u32>,
    gid: Option<u32>,
    target: Option<String>,
}

pub fn ls_on(src: Box<dyn ReadAt>, partition: Option<u32>, path: &OsString, json: bool) -> Result<u8> {
    let path = parse_path(path)?;
    let fs = open_filesystem(src, partition)?;
    let entries = fs.list(path.to_bytes()).map_err(fs_error)?;
    for e in entries.iter().filter(|e| e.unsafe_name().is_some()) {
        eprintln!(
            "blockproof: warning: directory {path} has an entry named {:?}, which is {} (restore-files skips it)",
            e.name,
            e.unsafe_name().unwrap_or_default()
        );
    }
    let rows: Vec<EntryRow> = entries
        .iter()
        .map(|e| {
            let target = (e.kind == EntryKind::Symlink)
                .then(|| fs.read_link(e.path.to_bytes()).ok().map(|t| t.to_string_lossy().into_owned()))
                .flatten();
            entry_row(e, target)
        })
        .collect();
    if json {
        print_json(&rows)?;
        return Ok(exit::OK);
    }
    let single = entries.len() == 1 && entries[0].path == path && entries[0].kind != EntryKind::Dir;
    for (e, r) in entries.iter().zip(&rows) {
        let mode = match e.mode {
            Some(m) => permissions(e.kind, m),
            None => format!("{:<10}", type_char(e.kind)),
        };
        let time = r.mtime_unix.map_or("-".to_string(), crate::timestamp::show_unix);
        let name = if single { &r.path } else { &r.name };
        let arrow = r.target.as_deref().map(|t| format!(" -> {t}")).unwrap_or_default();
        // Through the crate's println! (output.rs): a closed pipe (ls | head) ends the
        // output quietly, any other write error fails the command.
        println!("{mode} {:>12} {time:<20} {name}{arrow}", e.size);
    }
    Ok(exit::OK)
}

fn entry_row(e: &Entry, target: Option<String>) -> EntryRow {
    EntryRow {
        name: e.name.clone(),
        path: e.path.to_string(),
        kind: e.kind.name(),
        size: e.size,
        mtime: e.mtime.map(|t| t.rfc3339()),
        mtime_unix: e.mtime.map(|t| t.secs),
        mode: e.mode.map(|m| format!("{m:04o}")),
        uid: e.uid,
        gid: e.gid,
        target,
    }
}

fn type_char(kind: EntryKind) -> char {
    match kind {
        EntryKind::Dir => 'd',
        EntryKind::Symlink => 'l',
        EntryKind::File => '-',
        EntryKind::Other => '?',
    }
}

/// `drwxr-xr-x`, with `s`/`t` for setuid, setgid and sticky.
fn permissions(kind: EntryKind, mode: u32) -> String {
    let mut s = String::from(type_char(kind));
    for (shift, special, letter) in [(6, 0o4000, 's'), (3, 0o2000, 's'), (0, 0o1000, 't')] {
        let bits = (mode >> shift) & 7;
        s.push(if bits & 4 != 0 { 'r' } else { '-' });
        s.push(if bits & 2 != 0 { 'w' } else { '-' });
        s.push(match (bits & 1 != 0, mode & special != 0) {
            (true, true) => letter,
            (false, true) => letter.to_ascii_uppercase(),
            (true, false) => 'x',
            (false, false) => '-',
        });
    }
    s
}

pub fn cat_on(src: Box<dyn ReadAt>, partition: Option<u32>, path: &OsString) -> Result<u8> {
    let path = parse_path(path)?;
    let fs = open_filesystem(src, partition)?;
    let mut out = io::stdout().lock();
    match fs.read(path.to_bytes(), &mut out) {
        Ok(_) => {}
        // `cat | head`: the reader has all it wants.
        Err(FsError::Output { source }) if source.kind() == io::ErrorKind::BrokenPipe => return Ok(exit::OK),
        Err(e) => return Err(fs_error(e)),
    }
    match out.flush() {
        Err(e) if e.kind() != io::ErrorKind::BrokenPipe => Err(e).context("writing to standard output"),
        _ => Ok(exit::OK),
    }
}

#[derive(Serialize)]
struct RestoreFilesReport<'a> {
    target: &'a std::path::Path,
    files: u64,
    dirs: u64,
    symlinks: u64,
    bytes: u64,
    skipped: Vec<serde_json::Value>,
    modes_restricted: u64,
}

pub fn restore_files_on(
    src: Box<dyn ReadAt>,
    partition: Option<u32>,
    paths: &[OsString],
    to: &std::path::Path,
    options: &ExtractOptions,
    json: bool,
) -> Result<u8> {
    let paths = paths.iter().map(parse_path).collect::<Result<Vec<_>>>()?;
    let fs = open_filesystem(src, partition)?;
    let report = extract(&fs, &paths, to, options).map_err(fs_error)?;
    for s in &report.skipped {
        eprintln!("blockproof: warning: {} not restored: {}", s.path, s.reason);
    }
    if json {
        let skipped =
            report.skipped.iter().map(|s| serde_json::json!({ "path": s.path, "reason": s.reason })).collect();
        print_json(&RestoreFilesReport {
            target: to,
            files: report.files,
            dirs: report.dirs,
            symlinks: report.symlinks,
            bytes: report.bytes,
            skipped,
            modes_restricted: report.modes_restricted,
        })?;
    } else {
        println!(
            "restored {} files ({}), {} directories and {} symlinks from the {} filesystem to {}",
            report.files,
            human_bytes(report.bytes),
            report.dirs,
            report.symlinks,
            fs.kind(),
            to.display()
        );
        if !report.skipped.is_empty() {
            println!("{} entries not restored (see the warnings)", report.skipped.len());
        }
        if report.modes_restricted > 0 {
            println!(
                "setuid, setgid, sticky and world-write bits removed from {} of the restored files and \
                 directories (--keep-special-modes keeps them)",
                report.modes_restricted
            );
        }
    }
    Ok(exit::OK)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permission_strings_match_ls() {
        assert_eq!(permissions(EntryKind::File, 0o644), "-rw-r--r--");
        assert_eq!(permissions(EntryKind::Dir, 0o1777), "drwxrwxrwt");
        assert_eq!(permissions(EntryKind::File, 0o4755), "-rwsr-xr-x");
        assert_eq!(permissions(EntryKind::File, 0o2640), "-rw-r-S---");
    }
}
