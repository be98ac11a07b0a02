//! Restore: write one disk of a snapshot to a sparse raw file or a block device.

use std::collections::HashSet;
use std::fs::{self, File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use blockproof_format::tree::chunk_count;
use blockproof_format::{BlobKind, Id, SnapshotStatus};
use blockproof_repo::{BlobIndex, BlobReader, Repository, TreeReader};
use blockproof_work::{fan_out, FanOut};
use serde::Serialize;

use crate::{CoreError, Progress};

/// Mode of a restored image file (raw or qcow2): its owner's only, whatever the umask.
/// A block device target keeps its own.
pub const IMAGE_MODE: u32 = 0o600;

/// The format of a restored file.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RestoreFormat {
    /// A sparse raw image (or the bytes of a block device).
    #[default]
    Raw,
    /// A qcow2 image (zero chunks unallocated), converted by qemu-img.
    Qcow2,
}

/// What to restore, and where.
#[derive(Clone, Debug, Default)]
pub struct RestoreOptions {
    /// A snapshot id, unique prefix, or `VM:latest`.
    pub snapshot: String,
    pub disk: String,
    pub target: PathBuf,
    /// Overwrite an existing regular file.
    pub force: bool,
    /// Only these bytes of the disk (`offset`, `length`), written at the same offset of the
    /// target; the rest of a new file stays a hole.
    pub range: Option<(u64, u64)>,
    pub format: RestoreFormat,
}

/// The result of a restore.
#[derive(Clone, Debug, Serialize)]
pub struct RestoreReport {
    pub snapshot: Id,
    pub disk: String,
    pub target: PathBuf,
    pub size: u64,
    pub chunks: u64,
    pub zero_chunks: u64,
    /// Bytes written (zero chunks of a regular file are left as holes).
    pub bytes_written: u64,
    pub status: SnapshotStatus,
    pub block_device: bool,
    pub format: RestoreFormat,
    /// The restored byte range, when only part of the disk was restored.
    pub range: Option<(u64, u64)>,
    /// Ranges where verification found this restore point differs from its source (a
    /// tainted snapshot restores, with a warning).
    pub mismatches: Vec<blockproof_format::manifest::ByteRange>,
}

enum Target {
    /// A temporary file renamed over `final_path` on success.
    File {
        file: File,
        temp: PathBuf,
        final_path: PathBuf,
    },
    Device {
        file: File,
    },
}

impl Target {
    fn open(path: &Path, size: u64, force: bool) -> Result<Self, CoreError> {
        match fs::metadata(path) {
            Ok(m) if m.file_type().is_block_device() => {
                let mut file = OpenOptions::new().write(true).open(path).map_err(|e| CoreError::io(path, e))?;
                let dev_size = file.seek(SeekFrom::End(0)).map_err(|e| CoreError::io(path, e))?;
                if dev_size < size {
                    return Err(CoreError::Invalid(format!(
                        "{} holds {dev_size} bytes, the disk needs {size}",
                        path.display()
                    )));
                }
                return Ok(Target::Device { file });
            }
            Ok(m) if m.is_file() && !force => {
                return Err(CoreError::Invalid(format!(
                    "{} already exists; use --force to overwrite it",
                    path.display()
                )))
            }
            Ok(m) if !m.is_file() => {
                return Err(CoreError::Invalid(format!(
                    "{} is neither a regular file nor a block device",
                    path.display()
                )))
            }
            _ => {}
        }
        let name =
            path.file_name().ok_or_else(|| CoreError::Invalid(format!("{} is not a file path", path.display())))?;
        let dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let temp = dir.join(format!(".{}.blockproof-{:08x}.partial", name.to_string_lossy(), rand::random::<u32>()));
        // Readable by its owner only, whatever the umask: it holds a whole disk.
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(IMAGE_MODE)
            .open(&temp)
            .map_err(|e| CoreError::io(path, e))?;
        // A sparse file of the right size: zero chunks stay holes.
        file.set_len(size).map_err(|e| CoreError::io(&temp, e))?;
        Ok(Target::File { file, temp, final_path: path.to_path_buf() })
    }

    fn file(&self) -> &File {
        match self {
            Target::File { file, .. } | Target::Device { file } => file,
        }
    }

    fn commit(self) -> Result<(), CoreError> {
        match self {
            Target::Device { file } => file.sync_all().map_err(|e| CoreError::io("block device", e)),
            Target::File { file, temp, final_path } => {
                file.sync_all().map_err(|e| CoreError::io(&temp, e))?;
                fs::rename(&temp, &final_path).map_err(|e| CoreError::io(&final_path, e))?;
                // The rename is durable only once the directory is.
                let dir = match final_path.parent() {
                    Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
                    _ => PathBuf::from("."),
                };
                File::open(&dir).and_then(|d| d.sync_all()).map_err(|e| CoreError::io(&dir, e))
            }
        }
    }

    fn abort(self) {
        if let Target::File { temp, .. } = self {
            let _ = fs::remove_file(temp);
        }
    }
}

/// Restores one disk of a snapshot. Stray and damaged snapshot and index files are
/// skipped with a warning (through `progress`); a chunk whose blob only a damaged index
/// file listed then fails as a damaged range.
pub fn restore(repo: &Repository, opts: &RestoreOptions, progress: &dyn Progress) -> Result<RestoreReport, CoreError> {
    let (info, mut skipped) = repo.resolve_snapshot_for_reading(&opts.snapshot)?;
    let disk = info.snapshot.disk(&opts.disk).ok_or_else(|| {
        let ids: Vec<_> = info.snapshot.disks.iter().map(|d| d.id.as_str()).collect();
        CoreError::Invalid(format!(
            "snapshot {} has no disk {:?} (it has: {})",
            info.id.short(),
            opts.disk,
            ids.join(", ")
        ))
    })?;
    let range = match opts.range {
        Some((off, len)) if off.checked_add(len).is_none_or(|end| end > disk.size) || len == 0 => {
            return Err(CoreError::Invalid(format!(
                "the range {off}+{len} is not inside disk {} ({} bytes)",
                disk.id, disk.size
            )));
        }
        Some(r) => r,
        None => (0, disk.size),
    };
    if opts.format == RestoreFormat::Qcow2 {
        // The raw restore it runs first gives the warnings.
        return restore_qcow2(repo, opts, progress);
    }
    let (index, index_skipped) = BlobIndex::scan(repo, &HashSet::new())?;
    skipped.extend(index_skipped);
    for w in skipped.warnings() {
        progress.warn(&w);
    }
    let target = Target::open(&opts.target, disk.size, opts.force)?;
    let is_device = matches!(target, Target::Device { .. });
    progress.begin(&format!("restore {}", disk.id), range.1);
    let result = write_chunks(repo, &index, disk, target.file(), is_device, range, progress);
    progress.end();
    match result {
        Ok((chunks, zero_chunks, bytes_written)) => {
            target.commit()?;
            Ok(RestoreReport {
                snapshot: info.id,
                disk: disk.id.clone(),
                target: opts.target.clone(),
                size: disk.size,
                chunks,
                zero_chunks,
                bytes_written,
                status: info.snapshot.status,
                block_device: is_device,
                format: RestoreFormat::Raw,
                range: opts.range,
                mismatches: disk.mismatches.clone(),
            })
        }
        Err(e) => {
            target.abort();
            Err(e)
        }
    }
}

/// Restores to a sparse raw file next to the target, then converts it with qemu-img
/// (zero chunks stay unallocated) and renames the result into place.
fn restore_qcow2(
    repo: &Repository,
    opts: &RestoreOptions,
    progress: &dyn Progress,
) -> Result<RestoreReport, CoreError> {
    match fs::metadata(&opts.target) {
        Ok(m) if !m.is_file() => {
            return Err(CoreError::Invalid(format!(
                "{} is not a regular file: a qcow2 restore writes a new file (restore raw to a block device)",
                opts.target.display()
            )))
        }
        Ok(_) if !opts.force => {
            return Err(CoreError::Invalid(format!(
                "{} already exists; use --force to overwrite it",
                opts.target.display()
            )))
        }
        _ => {}
    }
    let name = opts.target.file_name().ok_or_else(|| CoreError::Invalid("the target is not a file path".into()))?;
    let dir = match opts.target.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let tag = rand::random::<u32>();
    let raw = dir.join(format!(".{}.blockproof-{tag:08x}.raw", name.to_string_lossy()));
    let qcow = dir.join(format!(".{}.blockproof-{tag:08x}.qcow2", name.to_string_lossy()));
    let raw_opts = RestoreOptions { target: raw.clone(), format: RestoreFormat::Raw, force: false, ..opts.clone() };
    let result = restore(repo, &raw_opts, progress).and_then(|mut r| {
        blockproof_source::qemu_img_convert(&raw, "raw", &qcow, "qcow2")?;
        // qemu-img creates its file by the umask; the image is as private as a raw one.
        fs::set_permissions(&qcow, fs::Permissions::from_mode(IMAGE_MODE)).map_err(|e| CoreError::io(&qcow, e))?;
        File::open(&qcow).and_then(|f| f.sync_all()).map_err(|e| CoreError::io(&qcow, e))?;
        fs::rename(&qcow, &opts.target).map_err(|e| CoreError::io(&opts.target, e))?;
        File::open(&dir).and_then(|d| d.sync_all()).map_err(|e| CoreError::io(&dir, e))?;
        r.target = opts.target.clone();
        r.format = RestoreFormat::Qcow2;
        Ok(r)
    });
    let _ = fs::remove_file(&raw);
    let _ = fs::remove_file(&qcow);
    result
}

/// Bytes written between two writeback kicks.
const WRITEBACK_EVERY: usize = 64 << 20;

/// How many chunks of `chunk_size` bytes one [`BlobReader::read_many`] is given: about
/// 4 MiB of them, so a remote store answers about one request per pack region (restore's
/// batches, copy's windows).
pub(crate) fn chunks_per_read(chunk_size: u64) -> u64 {
    ((4u64 << 20) / chunk_size.max(1)).max(1)
}

/// Starts writing the target's dirty pages to disk without waiting for it, so that the
/// final `fsync` finds little left to do: the disk works while chunks are decrypted.
fn start_writeback(file: &File) {
    use std::os::unix::io::AsRawFd;
    // SAFETY: a hint to the kernel on a file descriptor we own; it neither reads nor
    // writes our memory. Failure only means no overlap, so it is ignored.
    unsafe {
        libc::sync_file_range(file.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE);
    }
}

fn write_chunks(
    repo: &Repository,
    index: &BlobIndex,
    disk: &blockproof_format::DiskEntry,
    out: &File,
    write_zeros: bool,
    range: (u64, u64),
    progress: &dyn Progress,
) -> Result<(u64, u64, u64), CoreError> {
    let reader = BlobReader::new(repo, index);
    let cs = u64::from(disk.chunk_size);
    let n = chunk_count(disk.size, disk.chunk_size);
    let mut tree = TreeReader::new(&reader, disk.index_root, n, disk.index_fanout)?;
    let range_err = |i: u64, cause| CoreError::DamagedRange {
        disk: disk.id.clone(),
        offset: i * cs,
        end: ((i + 1) * cs).min(disk.size),
        cause,
    };
    // What chunk `i` puts where: its blob (None for a zero chunk) checked for the chunk's
    // length, cut to the restored range at the edges of a partial restore.
    let chunk_bytes = |i: u64, id: Id, blob: Option<Result<Vec<u8>, blockproof_repo::RepoError>>| {
        let (offset, len) = (i * cs, (disk.size - i * cs).min(cs) as usize);
        let d = blob.unwrap_or_else(|| Ok(vec![0u8; len])).map_err(|e| range_err(i, e))?;
        if d.len() != len {
            return Err(range_err(
                i,
                blockproof_repo::RepoError::Corrupt {
                    what: format!("blob {id}"),
                    detail: format!("holds {} bytes, the chunk has {len}", d.len()),
                },
            ));
        }
        let (lo, hi) = (range.0.max(offset), (range.0 + range.1).min(offset + len as u64));
        Ok(if lo == offset && hi == offset + len as u64 {
            (offset, d)
        } else {
            (lo, d[(lo - offset) as usize..(hi - offset) as usize].to_vec())
        })
    };
    let mut written = 0u64;
    let mut zero_chunks = 0u64;
    let mut unflushed = 0usize;
    let fanout = u64::from(disk.index_fanout);
    let (first, last) = (range.0 / cs, (range.0 + range.1).div_ceil(cs));
    let batch_len = chunks_per_read(cs) as usize;
    let zeros = &mut zero_chunks;
    // The tree is walked by the producer, batches of consecutive chunks are read by the
    // workers (read_many: about one request per pack region), and this thread writes, in
    // the order chunks arrive: parallel writers to one file contend on its inode lock and
    // cost more system time than they save.
    fan_out(
        repo.cancel(),
        FanOut { workers: crate::readers(repo), queue: 4 },
        |emit| {
            let mut batch = Vec::with_capacity(batch_len);
            for page in first / fanout..last.div_ceil(fanout).min(tree.leaf_pages()) {
                let ids = match tree.leaf(page) {
                    Ok(ids) => ids.to_vec(),
                    Err(e) => return Err(crate::index_damage(disk, tree.unreadable_span(page), e)),
                };
                for (k, id) in ids.into_iter().enumerate() {
                    let i = page * fanout + k as u64;
                    if i < first || i >= last {
                        continue;
                    }
                    progress.advance((disk.size - i * cs).min(cs).min(range.1));
                    if id.is_zero() {
                        *zeros += 1;
                        if !write_zeros {
                            continue;
                        }
                    }
                    batch.push((i, id));
                    if batch.len() == batch_len {
                        let full = std::mem::replace(&mut batch, Vec::with_capacity(batch_len));
                        if !emit.send(full) {
                            return Ok(());
                        }
                    }
                }
            }
            if !batch.is_empty() {
                emit.send(batch);
            }
            Ok(())
        },
        || {
            |batch: Vec<(u64, Id)>| -> Result<Vec<(u64, Vec<u8>)>, CoreError> {
                let stored: Vec<Id> = batch.iter().map(|(_, id)| *id).filter(|id| !id.is_zero()).collect();
                let mut blobs = reader.read_many(&stored, BlobKind::Data).into_iter();
                batch
                    .into_iter()
                    .map(|(i, id)| {
                        let data = if id.is_zero() { None } else { Some(blobs.next().expect("one per id")) };
                        chunk_bytes(i, id, data)
                    })
                    .collect()
            }
        },
        |chunks| {
            for (offset, data) in chunks {
                out.write_all_at(&data, offset).map_err(|e| CoreError::io("restore target", e))?;
                written += data.len() as u64;
                unflushed += data.len();
                if unflushed >= WRITEBACK_EVERY {
                    start_writeback(out);
                    unflushed = 0;
                }
            }
            Ok(())
        },
    )?;
    Ok((n, zero_chunks, written))
}
