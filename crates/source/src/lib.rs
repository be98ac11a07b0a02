//! # blockproof-source
//!
//! What a backup reads, and what it is told has changed.
//!
//! ## Model
//!
//! - A [`BlockSource`] is a fixed-size, read-only view of one disk at one point in time:
//!   a raw image file or block device ([`RawFile`]), or an NBD export ([`NbdSource`]),
//!   possibly served by a private `qemu-nbd` that blockproof started for an image file
//!   ([`QemuNbd`]). It reads lists of ranges, so a source that can keep several requests
//!   in flight (NBD) does, and it may know which regions read as zeros (NBD
//!   `base:allocation`).
//! - A [`Cbt`] is the change source of a disk spec (`none`, `bitmap:NAME`, `bitmap:auto`,
//!   `changes:FILE`). [`DiskSpec::open`] opens the source for a disk of a vm ([`Owner`]:
//!   `bitmap:auto`'s bitmaps are named after the vm and the disk id, so one image backed
//!   up under two vm names keeps a rotation per vm), consulting the state
//!   the parent restore point recorded ([`ParentCbt`]), and returns an [`OpenedDisk`]: the
//!   source, the [`Changes`] since the parent (or why everything must be read), what they
//!   are known to be relative to ([`Base`]: proven the parent's state, or the caller's
//!   word), and the state to record for the next run. Once the snapshot is committed (and the source is
//!   dropped), [`OpenedDisk::committed`] finishes what the change source needs (for
//!   `bitmap:auto`, removing the bitmap that was just exported).
//!
//! ## Invariants
//!
//! - A running VM ([`LiveVm`], over [`Qmp`]) is read from a point-in-time view blockproof
//!   sets up (a fleecing overlay per disk, taken for every disk in one transaction),
//!   with a dirty bitmap per vm and disk that becomes the next run's base only once the
//!   snapshot is committed (otherwise it is merged back); a journal in a private state
//!   directory names everything set up, and the next run (or `cleanup`) undoes exactly
//!   that. A libvirt domain ([`LibvirtVm`], through [`Virsh`]) is read the same way from
//!   libvirt's pull-mode backup job, with checkpoints `blockproof.<vm>.<n>` in place of
//!   the bitmaps (older ones deleted on commit, the new one deleted otherwise), the same
//!   journal (kind `libvirt`) and lock, and a private run directory only QEMU's user (and
//!   root) can enter. libvirt is only ever driven through `virsh`, with time limits.
//! - A source is opened read-only, always (seed 004: a backup host must never be able to
//!   write to production volumes). [`RawFile`] opens with `O_RDONLY`; qemu-nbd is started
//!   with `--read-only`; the NBD client has no write command. The only writes blockproof
//!   makes to an image are `bitmap:auto`'s bitmap additions and removals, through
//!   `qemu-img bitmap`, which never touch guest data.
//! - A read fills the whole range or fails: a short read (the disk shrank under us) is an
//!   error, never silently zero-filled data.
//! - `size` is fixed when the source is opened; a backup never reads past it. It is at
//!   most [`MAX_DISK_SIZE`] (64 TiB), checked before anything is allocated for the disk.
//! - Doubt means a full read: a change source that cannot be trusted (missing or
//!   inconsistent bitmap, unreadable state) yields [`Changes::All`] with the reason,
//!   never an error and never a silent incremental.
//! - A qemu-nbd started by blockproof dies with its guard, and with the blockproof process
//!   itself (`PR_SET_PDEATHSIG`), on every exit path.

mod agent;
mod changes;
mod disk;
mod kept;
mod libvirt;
mod live;
mod nbd;
mod qemu;
mod qmp;
mod raw;
mod virsh;
mod xml;

pub use agent::{AgentError, GuestAgent, Timeouts};
pub use changes::{ChangeList, Changes};
pub use disk::{AfterCommit, Base, Cbt, DiskSpec, OpenedDisk, Owner, ParentCbt};
pub use kept::{release_when_expired, KeptExport, KeptView};
pub use libvirt::{LibvirtJournal, LibvirtVm, LIBVIRT_CBT};
pub use live::{cleanup, read_journal, state_dir, Journal, JournalDisk, JournalKind, LiveVm, VmLock};
pub use nbd::NbdSource;
pub use qemu::{add_bitmap, image_bitmaps, image_format, qemu_img_convert, remove_bitmap, Bitmap, QemuNbd};
pub use qmp::{NodeBitmap, Qmp, QmpError, VmDisk};
pub use raw::RawFile;
pub use virsh::{definition_file, parse_domain, restore_definition, Domain, DomainDisk, Virsh, DEFAULT_URI};

use std::path::PathBuf;

/// Errors of a block source.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("cannot open source {path}: {source}")]
    Open { path: PathBuf, source: std::io::Error },
    /// A `changes:FILE` change list could not be read (the source itself is fine).
    #[error("cannot read the change list {path}: {source}")]
    ChangeList { path: PathBuf, source: std::io::Error },
    #[error("{path} is not a regular file or block device")]
    NotADisk { path: PathBuf },
    #[error("read of {len} bytes at offset {offset} from {what} failed: {source}")]
    Read { what: String, offset: u64, len: usize, source: std::io::Error },
    #[error("read at offset {offset} is past the end of {what} ({size} bytes)")]
    OutOfRange { what: String, offset: u64, size: u64 },
    #[error("{what}: {source}")]
    Nbd { what: String, source: blockproof_nbd::Error },
    /// A qemu tool failed or could not be run.
    #[error("{0}")]
    Qemu(String),
    /// A qemu tool could not open an image because another process (a running VM, a
    /// qemu-storage-daemon) holds its lock: blockproof never opens such an image, and
    /// says how to back the VM up instead.
    #[error(
        "{} is in use by a running VM or another qemu process ({detail}): back a running VM up as a VM source \
         (--from qmp:SOCKET) or through an NBD export of a point-in-time view of its disk (see \
         docs/LIVE-VMS.md), never through its image file",
        image.display()
    )]
    InUse { image: PathBuf, detail: String },
    /// libvirt (through virsh) refused or failed a call.
    #[error("libvirt: {0}")]
    Libvirt(String),
    /// The disk spec or its change source is unusable as given (a usage error).
    #[error("{0}")]
    Invalid(String),
    /// The disk is larger than blockproof backs up ([`check_disk_size`]).
    #[error("{0}")]
    TooLarge(String),
}

/// The largest disk blockproof backs up: 64 TiB. Checked as soon as a source is open
/// ([`RawFile::open`], [`NbdSource::connect`]), before anything is planned or allocated
/// for it: a backup keeps a few bytes per chunk in memory (its confirmation state is 4
/// bytes a chunk: 4 GiB for 64 TiB of 64 KiB chunks), so an absurd size (a 1 PiB or 2^63
/// NBD export, a damaged or hostile server) must fail at once, not in the allocator.
pub const MAX_DISK_SIZE: u64 = 64 << 40;

/// The most chunks one disk may have: 2^30, which is [`MAX_DISK_SIZE`] at the default
/// 64 KiB chunk size (a repository with 4 KiB chunks takes disks up to 4 TiB).
pub const MAX_DISK_CHUNKS: u64 = 1 << 30;

/// Refuses a disk of `size` bytes larger than [`MAX_DISK_SIZE`] or, given the chunk size,
/// with more than [`MAX_DISK_CHUNKS`] chunks. `what` names the source in the message.
pub fn check_disk_size(what: &str, size: u64, chunk_size: Option<u32>) -> Result<(), SourceError> {
    let tib = |bytes: u64| bytes as f64 / (1u64 << 40) as f64;
    if size > MAX_DISK_SIZE {
        return Err(SourceError::TooLarge(format!(
            "{what} is {size} bytes ({:.1} TiB): larger than the largest disk blockproof backs up ({} TiB)",
            tib(size),
            MAX_DISK_SIZE >> 40
        )));
    }
    if let Some(cs) = chunk_size.filter(|&cs| cs > 0) {
        let chunks = size.div_ceil(u64::from(cs));
        if chunks > MAX_DISK_CHUNKS {
            return Err(SourceError::TooLarge(format!(
                "{what} is {size} bytes: {chunks} chunks of {cs} bytes, more than the {MAX_DISK_CHUNKS} one disk may \
                 have ({:.0} TiB at this repository's chunk size)",
                tib(MAX_DISK_CHUNKS * u64::from(cs))
            )));
        }
    }
    Ok(())
}

/// A read-only disk at one point in time.
pub trait BlockSource: Send {
    /// Size of the disk in bytes.
    fn size(&self) -> u64;

    /// What it is, for reports and messages (a path or URI).
    fn describe(&self) -> String;

    /// Reads `ranges` (`(offset, length)`) and hands each range's bytes to `sink`, in the
    /// order given. A source that can overlap requests does. `sink` returns false to stop
    /// early (not an error).
    fn read_ranges(
        &mut self,
        ranges: &mut dyn Iterator<Item = (u64, usize)>,
        sink: &mut dyn FnMut(u64, Vec<u8>) -> bool,
    ) -> Result<(), SourceError>;

    /// Regions known to read as zeros, as sorted, disjoint `(offset, length)` ranges
    /// (`base:allocation`); empty when the source cannot tell.
    fn zero_ranges(&mut self) -> Result<Vec<(u64, u64)>, SourceError> {
        Ok(Vec::new())
    }

    /// Fills `buf` with the bytes at `offset`.
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> Result<(), SourceError> {
        let mut got = None;
        self.read_ranges(&mut std::iter::once((offset, buf.len())), &mut |_, data| {
            got = Some(data);
            false
        })?;
        match got {
            Some(data) if data.len() == buf.len() => {
                buf.copy_from_slice(&data);
                Ok(())
            }
            _ => Err(SourceError::OutOfRange { what: self.describe(), offset, size: self.size() }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_sizes_are_bounded_before_anything_is_allocated() {
        assert!(check_disk_size("d", MAX_DISK_SIZE, Some(64 << 10)).is_ok());
        let err = check_disk_size("nbd://x", 1 << 50, None).unwrap_err().to_string();
        assert_eq!(
            err,
            "nbd://x is 1125899906842624 bytes (1024.0 TiB): larger than the largest disk blockproof backs up (64 TiB)"
        );
        assert!(check_disk_size("d", u64::MAX, None).is_err());
        // Small chunks lower the limit: 2^30 chunks of 4 KiB are 4 TiB.
        assert!(check_disk_size("d", 4 << 40, Some(4096)).is_ok());
        let err = check_disk_size("d", (4 << 40) + 1, Some(4096)).unwrap_err().to_string();
        assert!(err.contains("more than the 1073741824 one disk may have (4 TiB"), "{err}");
    }
}
