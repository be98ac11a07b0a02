//! `mount`: a snapshot as a read-only FUSE filesystem.
//!
//! The mount point holds one directory per disk of the snapshot, named by disk id. Each
//! holds `disk.raw`, the disk's bytes (served by blockproof-core's verified, cached
//! [`DiskImage`]), and, for each partition whose filesystem blockproof-fs reads (ext2/3/4,
//! FAT, NTFS), a directory `partN` (`fs` for a filesystem on the whole disk) with its file
//! tree: directories, regular files read on demand, symlinks, sizes, times, and modes and
//! owners where the filesystem has them. Device nodes, FIFOs and sockets are left out.
//!
//! - Read-only: mounted `ro,nosuid,nodev`; writes fail with EROFS.
//! - A read that meets a damaged chunk fails with EIO (and the reason is printed); the
//!   mount stays up.
//! - The command stays in the foreground until the filesystem is unmounted (`fusermount3
//!   -u`, `umount`): exit 0. SIGINT and SIGTERM unmount it (lazily, so a busy mount point
//!   is detached at once) and exit 0.
//!
//! The FUSE protocol is the `fuser` crate's, without libfuse (it mounts through the
//! `fusermount3` helper, or directly as root). Requests are served one at a time on this
//! thread: blockproof-fs filesystems are not `Send`.

use std::collections::HashMap;
use std::ffi::{CString, OsStr};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::{anyhow, Result};
use blockproof_core::image::DEFAULT_CACHE_BYTES;
use blockproof_core::DiskImage;
use blockproof_fs::{Disk, Entry, EntryKind, Filesystem, FsError, ReadAt, TableKind};
use blockproof_repo::{BlobIndex, BlobReader, Repository};
use fuser::{FileAttr, FileType, MountOption, ReplyAttr, ReplyData, ReplyDirectory, ReplyEntry, ReplyOpen, Request};

use crate::args::MountArgs;
use crate::{exit, Usage};

/// How long the kernel may cache names and attributes: a snapshot never changes.
const TTL: Duration = Duration::from_secs(3600);

/// The name of the raw disk file in each disk's directory.
const RAW_NAME: &str = "disk.raw";

/// A disk shared by `disk.raw` and the filesystem readers (one chunk cache).
struct SharedDisk(Arc<DiskImage<'static>>);

impl ReadAt for SharedDisk {
    fn size(&self) -> u64 {
        self.0.size()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.0.read_at(buf, offset).map_err(|e| io::Error::other(e.to_string()))
    }
}

/// What an inode is.
enum Kind {
    /// The mount point itself or a disk's directory: children fixed at mount.
    Dir,
    /// `disk.raw` of disk `n`.
    Raw(usize),
    /// An entry of filesystem `n` (its root included).
    Fs(usize, Entry),
}

struct Node {
    parent: u64,
    name: Vec<u8>,
    kind: Kind,
    /// Child inodes; for a filesystem directory, read on first use.
    children: Option<Vec<u64>>,
}

/// The mounted snapshot: inode `n` is `nodes[n - 1]` (the root is [`fuser::FUSE_ROOT_ID`]).
struct SnapshotFs {
    /// (parent inode, name) to inode, for lookups.
    by_name: HashMap<(u64, Vec<u8>), u64>,
    images: Vec<Arc<DiskImage<'static>>>,
    filesystems: Vec<Filesystem>,
    nodes: Vec<Node>,
    /// The snapshot's time: the time of every directory and file made up here.
    time: SystemTime,
    uid: u32,
    gid: u32,
}

impl SnapshotFs {
    fn add(&mut self, parent: u64, name: &[u8], kind: Kind, children: Option<Vec<u64>>) -> u64 {
        self.nodes.push(Node { parent, name: name.to_vec(), kind, children });
        let ino = self.nodes.len() as u64;
        self.by_name.insert((parent, name.to_vec()), ino);
        if let Some(Some(list)) = self.nodes.get_mut(parent as usize - 1).map(|p| p.children.as_mut()) {
            list.push(ino);
        }
        ino
    }

    fn node(&self, ino: u64) -> Option<&Node> {
        self.nodes.get((ino as usize).checked_sub(1)?)
    }

    /// The children of directory `ino`, listing a filesystem directory the first time.
    fn children(&mut self, ino: u64) -> Result<&[u64], i32> {
        let node = self.node(ino).ok_or(libc::ENOENT)?;
        if node.children.is_some() {
            return Ok(self.nodes[ino as usize - 1].children.as_deref().unwrap_or_default());
        }
        let Kind::Fs(fs, entry) = &node.kind else { return Err(libc::ENOTDIR) };
        if entry.kind != EntryKind::Dir {
            return Err(libc::ENOTDIR);
        }
        let fs = *fs;
        let entries = self.filesystems[fs].list(entry.path.to_bytes()).map_err(errno)?;
        self.nodes[ino as usize - 1].children = Some(Vec::new());
        for e in entries {
            if let Some(why) = e.unsafe_name() {
                eprintln!("blockproof: warning: {} is not shown: its name is {why}", e.path);
                continue;
            }
            if e.kind == EntryKind::Other {
                continue;
            }
            let name = e.path.file_name().to_vec();
            self.add(ino, &name, Kind::Fs(fs, e), None);
        }
        Ok(self.nodes[ino as usize - 1].children.as_deref().unwrap_or_default())
    }

    fn attr(&self, ino: u64) -> Option<FileAttr> {
        let node = self.node(ino)?;
        let (kind, size, perm, mtime, atime, uid, gid) = match &node.kind {
            Kind::Dir => (FileType::Directory, 0, 0o555, self.time, self.time, self.uid, self.gid),
            Kind::Raw(d) => {
                (FileType::RegularFile, self.images[*d].size(), 0o444, self.time, self.time, self.uid, self.gid)
            }
            Kind::Fs(_, e) => {
                let (kind, perm) = match e.kind {
                    EntryKind::Dir => (FileType::Directory, 0o555),
                    EntryKind::Symlink => (FileType::Symlink, 0o777),
                    _ => (FileType::RegularFile, 0o444),
                };
                let time =
                    |t: Option<blockproof_fs::Timestamp>| t.and_then(|t| t.to_system_time()).unwrap_or(self.time);
                (
                    kind,
                    e.size,
                    e.mode.map_or(perm, |m| (m & 0o7777) as u16),
                    time(e.mtime),
                    time(e.atime),
                    e.uid.unwrap_or(self.uid),
                    e.gid.unwrap_or(self.gid),
                )
            }
        };
        Some(FileAttr {
            ino,
            size,
            blocks: size.div_ceil(512),
            atime,
            mtime,
            ctime: mtime,
            crtime: mtime,
            kind,
            perm,
            nlink: if kind == FileType::Directory { 2 } else { 1 },
            uid,
            gid,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        })
    }

    /// Reads up to `size` bytes of file `ino` at `offset`.
    fn read_file(&self, ino: u64, offset: u64, size: usize) -> Result<Vec<u8>, i32> {
        let node = self.node(ino).ok_or(libc::ENOENT)?;
        match &node.kind {
            Kind::Raw(d) => {
                let image = &self.images[*d];
                let len = image.size().saturating_sub(offset).min(size as u64) as usize;
                let mut buf = vec![0u8; len];
                image.read_at(&mut buf, offset).map_err(|e| {
                    eprintln!("blockproof: error: {e}");
                    libc::EIO
                })?;
                Ok(buf)
            }
            Kind::Fs(fs, e) if e.kind == EntryKind::File => {
                let mut buf = vec![0u8; size.min(e.size.saturating_sub(offset) as usize)];
                let n = self.filesystems[*fs].read_at(e.path.to_bytes(), offset, &mut buf).map_err(errno)?;
                buf.truncate(n);
                Ok(buf)
            }
            Kind::Dir | Kind::Fs(..) => Err(libc::EISDIR),
        }
    }
}

/// The errno for a filesystem error; a damaged filesystem or backup is EIO, and said.
fn errno(e: FsError) -> i32 {
    match e {
        FsError::NotFound { .. } => libc::ENOENT,
        FsError::NotADirectory { .. } => libc::ENOTDIR,
        FsError::IsADirectory { .. } => libc::EISDIR,
        FsError::NotAFile { .. } => libc::EINVAL,
        e => {
            eprintln!("blockproof: error: {e}");
            libc::EIO
        }
    }
}

impl fuser::Filesystem for SnapshotFs {
    fn lookup(&mut self, _req: &Request<'_>, parent: u64, name: &OsStr, reply: ReplyEntry) {
        if let Err(e) = self.children(parent) {
            return reply.error(e);
        }
        match self.by_name.get(&(parent, name.as_bytes().to_vec())).and_then(|&ino| self.attr(ino)) {
            Some(attr) => reply.entry(&TTL, &attr, 0),
            None => reply.error(libc::ENOENT),
        }
    }

    fn getattr(&mut self, _req: &Request<'_>, ino: u64, _fh: Option<u64>, reply: ReplyAttr) {
        match self.attr(ino) {
            Some(attr) => reply.attr(&TTL, &attr),
            None => reply.error(libc::ENOENT),
        }
    }

    fn readlink(&mut self, _req: &Request<'_>, ino: u64, reply: ReplyData) {
        match self.node(ino).map(|n| &n.kind) {
            Some(Kind::Fs(fs, e)) if e.kind == EntryKind::Symlink => {
                match self.filesystems[*fs].read_link(e.path.to_bytes()) {
                    Ok(target) => reply.data(target.as_os_str().as_bytes()),
                    Err(e) => reply.error(errno(e)),
                }
            }
            Some(_) => reply.error(libc::EINVAL),
            None => reply.error(libc::ENOENT),
        }
    }

    fn open(&mut self, _req: &Request<'_>, ino: u64, flags: i32, reply: ReplyOpen) {
        if flags & libc::O_ACCMODE != libc::O_RDONLY {
            return reply.error(libc::EROFS);
        }
        match self.node(ino) {
            // The bytes never change: the kernel may keep its page cache between opens.
            Some(_) => reply.opened(0, fuser::consts::FOPEN_KEEP_CACHE),
            None => reply.error(libc::ENOENT),
        }
    }

    fn read(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _fh: u64,
        offset: i64,
        size: u32,
        _flags: i32,
        _lock_owner: Option<u64>,
        reply: ReplyData,
    ) {
        let Ok(offset) = u64::try_from(offset) else { return reply.error(libc::EINVAL) };
        match self.read_file(ino, offset, size as usize) {
            Ok(data) => reply.data(&data),
            Err(e) => reply.error(e),
        }
    }

    fn readdir(&mut self, _req: &Request<'_>, ino: u64, _fh: u64, offset: i64, mut reply: ReplyDirectory) {
        if let Err(e) = self.children(ino) {
            return reply.error(e);
        }
        let Some(node) = self.node(ino) else { return reply.error(libc::ENOENT) };
        let dots = [(ino, &b"."[..]), (node.parent, &b".."[..])];
        let children = node
            .children
            .as_deref()
            .unwrap_or_default()
            .iter()
            .map(|&c| (c, self.node(c).map_or(&[][..], |n| &n.name[..])));
        // Offset i + 1 names the entry after the i-th: the kernel resumes there.
        for (i, (child, name)) in dots.into_iter().chain(children).enumerate().skip(offset.max(0) as usize) {
            let kind = self.attr(child).map_or(FileType::RegularFile, |a| a.kind);
            if reply.add(child, i as i64 + 1, kind, OsStr::from_bytes(name)) {
                break;
            }
        }
        reply.ok();
    }
}

/// Opens the snapshot and builds the tree: disks, `disk.raw`, readable filesystems.
fn snapshot_fs(a: &MountArgs) -> Result<(SnapshotFs, String)> {
    let cache = match a.cache_mib {
        None => DEFAULT_CACHE_BYTES,
        Some(m) => m.checked_mul(1 << 20).ok_or_else(|| Usage(format!("--cache-mib {m} is too large")))?,
    };
    // Leaked on purpose: they live as long as the mount, and the readers are then 'static.
    let repo: &'static Repository = Box::leak(Box::new(crate::commands::open_repo(&a.repo)?));
    let info = crate::commands::resolve_for_reading(repo, &a.snapshot)?;
    if let Some(want) = &a.disk {
        if info.snapshot.disk(want).is_none() {
            let ids: Vec<_> = info.snapshot.disks.iter().map(|d| d.id.as_str()).collect();
            let msg = format!("snapshot {} has no disk {want:?} (it has: {})", info.id.short(), ids.join(", "));
            return Err(Usage(msg).into());
        }
    }
    let index: &'static BlobIndex = Box::leak(Box::new(crate::commands::index_for_reading(repo)?));
    let reader: &'static BlobReader<'static> = Box::leak(Box::new(BlobReader::new(repo, index)));
    // SAFETY: getuid and getgid have no preconditions and cannot fail.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    let time = humantime::parse_rfc3339_weak(&info.snapshot.time).unwrap_or(SystemTime::UNIX_EPOCH);
    let root = Node { parent: fuser::FUSE_ROOT_ID, name: Vec::new(), kind: Kind::Dir, children: Some(Vec::new()) };
    let mut fs = SnapshotFs {
        by_name: HashMap::new(),
        images: Vec::new(),
        filesystems: Vec::new(),
        nodes: vec![root],
        time,
        uid,
        gid,
    };
    let mut shown = Vec::new();
    for d in &info.snapshot.disks {
        if a.disk.as_ref().is_some_and(|want| want != &d.id) {
            continue;
        }
        if !d.mismatches.is_empty() {
            eprintln!(
                "blockproof: warning: snapshot {} is tainted: disk {} differs from its source in {} range(s)",
                info.id.short(),
                d.id,
                d.mismatches.len()
            );
        }
        let image = Arc::new(DiskImage::new(reader, d, cache)?);
        let disk_dir = fs.add(fuser::FUSE_ROOT_ID, d.id.as_bytes(), Kind::Dir, Some(Vec::new()));
        fs.images.push(image.clone());
        fs.add(disk_dir, RAW_NAME.as_bytes(), Kind::Raw(fs.images.len() - 1), None);
        let mut names = vec![RAW_NAME.to_string()];
        let disk = match Disk::open(Box::new(SharedDisk(image))) {
            Ok(disk) => disk,
            Err(FsError::NoFilesystem) => {
                shown.push(format!("{} ({})", d.id, names.join(", ")));
                continue;
            }
            Err(e) => {
                eprintln!("blockproof: warning: disk {}: no files shown: {e}", d.id);
                shown.push(format!("{} ({})", d.id, names.join(", ")));
                continue;
            }
        };
        for p in disk.partitions().iter().filter(|p| p.filesystem.is_some_and(|k| k.is_readable())) {
            let filesystem = match disk.open_filesystem(Some(p.index)) {
                Ok(f) => f,
                Err(e) => {
                    eprintln!("blockproof: warning: disk {} partition {}: not shown: {e}", d.id, p.index);
                    continue;
                }
            };
            let root = match filesystem.stat("/") {
                Ok(root) => root,
                Err(e) => {
                    eprintln!("blockproof: warning: disk {} partition {}: not shown: {e}", d.id, p.index);
                    continue;
                }
            };
            let name = if disk.table() == TableKind::None { "fs".to_string() } else { format!("part{}", p.index) };
            fs.filesystems.push(filesystem);
            fs.add(disk_dir, name.as_bytes(), Kind::Fs(fs.filesystems.len() - 1, root), None);
            names.push(name);
        }
        shown.push(format!("{} ({})", d.id, names.join(", ")));
    }
    Ok((fs, format!("snapshot {} read-only: {}", info.id.short(), shown.join("; "))))
}

pub fn mount(a: MountArgs) -> Result<u8> {
    let point = &a.mountpoint;
    match std::fs::metadata(point) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => return Err(anyhow!("cannot mount on {}: not a directory", point.display())),
        Err(e) => return Err(anyhow!("cannot mount on {}: {e}", point.display())),
    }
    if !Path::new("/dev/fuse").exists() {
        return Err(anyhow!("cannot mount: /dev/fuse does not exist (load the fuse kernel module: modprobe fuse)"));
    }
    // Blocked before the repository opens (an S3 repository starts threads, which would
    // otherwise take a signal with its default action and leave the mount behind), so no
    // signal finds the mount without its handler; one that comes while the snapshot opens
    // waits, and unmounts as soon as the mount exists.
    let signals = crate::serve::block_stop_signals()?;
    let (fs, what) = snapshot_fs(&a)?;
    let options = [
        MountOption::RO,
        MountOption::NoSuid,
        MountOption::NoDev,
        MountOption::FSName("blockproof".into()),
        MountOption::Subtype("blockproof".into()),
    ];
    let mut session = fuser::Session::new(fs, point, &options)
        .map_err(|e| anyhow!("cannot mount on {}: {e} (is fusermount3 installed?)", point.display()))?;
    unmount_on_signals(signals, point.clone());
    eprintln!("mounted {what} on {} (unmount with `fusermount3 -u {}` or Ctrl-C)", point.display(), point.display());
    session.run().map_err(|e| anyhow!("the mount on {} failed: {e}", point.display()))?;
    eprintln!("unmounted {}", point.display());
    Ok(exit::OK)
}

/// Takes SIGINT and SIGTERM (blocked by the caller) on a thread of their own: detaches the
/// mount (lazily, so a shell inside it does not keep it) and exits 0.
fn unmount_on_signals(set: libc::sigset_t, point: PathBuf) {
    std::thread::spawn(move || {
        let mut signal = 0;
        // SAFETY: `set` is initialised and blocked in every thread of this process.
        let rc = unsafe { libc::sigwait(&set, &mut signal) };
        let name = if signal == libc::SIGTERM { "SIGTERM" } else { "SIGINT" };
        match detach(&point) {
            Ok(()) if rc == 0 => eprintln!("unmounted {} ({name})", point.display()),
            Ok(()) => {}
            Err(e) => {
                eprintln!("blockproof: error: cannot unmount {}: {e}", point.display());
                std::process::exit(exit::ERROR.into());
            }
        }
        std::process::exit(exit::OK.into());
    });
}

/// Unmounts `point` lazily: directly as root, else through `fusermount3 -u -z`.
fn detach(point: &Path) -> io::Result<()> {
    let c = CString::new(point.as_os_str().as_bytes()).map_err(io::Error::other)?;
    // SAFETY: `c` is a valid NUL-terminated path.
    if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } == 0 {
        return Ok(());
    }
    let out = std::process::Command::new("fusermount3").arg("-u").arg("-z").arg("--").arg(point).output()?;
    if out.status.success() {
        return Ok(());
    }
    Err(io::Error::other(String::from_utf8_lossy(&out.stderr).trim().to_string()))
}
