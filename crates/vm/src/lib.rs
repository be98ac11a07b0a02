//! # blockproof-vm
//!
//! Virtual machines from restore points, two ways: a throwaway, isolated VM that boots a
//! restore point and says whether it came up (the check behind `blockproof restore-test
//! --boot`: prove the restore, not just the bytes), and instant recovery (`blockproof
//! recover`): the VM runs from the backup at once while its disks are copied to local
//! images under it.
//!
//! ## The boot test
//!
//! [`boot`] takes the restore point's disks as read-only NBD exports
//! ([`blockproof_nbd::Exports`], in the VM's disk order: the first one boots) and a
//! [`BootSpec`]. In a private temporary directory (mode 0700) it
//!
//! 1. serves the exports on a unix socket there (`export_server.rs`): instant access,
//!    nothing is restored first;
//! 2. puts a qcow2 overlay on each export (`qemu-img create -F raw -b
//!    nbd+unix:///ID?socket=...`): every write of the VM lands in the overlay, the backup
//!    is never written (the exports refuse writes anyway);
//! 3. starts `qemu-system-x86_64` isolated: no network device (`-nic none`), no default
//!    devices, no display, the serial console written to a file, QMP on a socket in the
//!    directory; KVM when `/dev/kvm` opens read-write and the CPU has VT-x or AMD-V,
//!    TCG otherwise; booted by the
//!    firmware (SeaBIOS, from the first disk's boot loader) or directly from a kernel
//!    and initrd the caller read out of the backup ([`Boot::Kernel`]);
//! 4. watches the console (`console.rs`) for the success marker (and the failure
//!    marker), then pings the guest agent (`qemu-ga` on a virtio serial port, with
//!    blockproof-source's `GuestAgent`) every second until it answers, then runs the
//!    check script — each stage only when asked for — until the check passes, fails or
//!    the timeout ends it;
//! 5. stops everything: the script's process group is killed, QEMU is asked to `quit`
//!    over QMP (blockproof-source's `Qmp`) and killed (its whole process group) if it has not gone within
//!    seconds, the server is stopped and its connections shut down, the directory is
//!    removed.
//!
//! The outcome is a [`BootOutcome`]: passed, or failed with a one-line reason, the time
//! from QEMU's start to the marker (a measured recovery time), the tail of the console.
//! A [`VmError`] means the test could not be run at all (no QEMU, no temporary
//! directory, cancelled).
//!
//! ## Invariants
//!
//! - **The backup is never written**: the exports are read-only and QEMU only ever
//!   opens the overlays for writing.
//! - **Isolated**: the VM has no network device, no display and no host directory; its
//!   only ways out are the serial console (a file) and the QMP socket, both in the
//!   private directory.
//! - **Nothing is left behind**, whatever the outcome — pass, fail, timeout, error or
//!   cancellation: no QEMU or script process (each in its own process group, killed
//!   whole; QEMU also dies with its parent through `PR_SET_PDEATHSIG`), no overlay, no
//!   socket, no directory.
//! - Threads are scoped (the server's accept loop and one thread per NBD connection):
//!   nothing outlives [`boot`], and the exports may borrow from the caller.
//! - Children start with every signal unblocked, whatever the caller blocked (the
//!   binary blocks SIGINT and SIGTERM to turn them into a [`Cancel`]).

//!
//! ## Instant recovery
//!
//! A [`Recovery`] lives in a directory of the user's (mode 0700), described by its
//! journal (`recovery.json`, `journal.rs`) and locked (`flock`) by the one command
//! working on it. [`Recovery::create`] writes the journal (the restore point, the disks,
//! the VM's shape); [`Recovery::run`] does the rest, and also carries on a recovery that
//! was stopped at any point (`recover --resume`):
//!
//! 1. serves the restore point's disks on `nbd.sock` in the directory (the same export
//!    server as the boot test);
//! 2. makes a local qcow2 image per disk whose backing file is the disk's export, if it
//!    is not there yet (made under a temporary name and renamed);
//! 3. starts QEMU unless the recovery's QEMU still runs: in a session of its own, so it
//!    outlives the command; the images are its disks, each over an NBD client node with a
//!    reconnect delay ([`RECONNECT_DELAY_SECS`]) so that a gone server makes reads wait,
//!    not fail; two QMP sockets (blockproof's own, and `qmp.sock` for the user); the
//!    serial console appended to `console.log`; no network unless the caller adds one;
//! 4. starts QEMU's `block-stream` job on each image that still has a backing file (or
//!    follows the job an earlier run started), throttled if asked: it copies into the
//!    image every cluster the image does not hold yet, and drops the backing file at the
//!    end;
//! 5. for each finished disk: flushes it, removes the backup's node from the VM, records
//!    it in the journal; when all are done the journal says `complete` and the server
//!    stops. The VM runs on, on ordinary local images.
//!
//! ## Invariants of a recovery
//!
//! - **The VM's writes are never lost**: they go to the local images from the first
//!   moment; the copy only fills the clusters the images do not hold; a cancelled or
//!   failed copy leaves them as they are.
//! - **The backup is never written**: the exports are read-only, the backing nodes are
//!   opened read-only.
//! - **Safe to stop at any point**: the journal is replaced atomically, images appear
//!   whole, a killed command leaves the VM running (its reads of data not yet copied wait
//!   for `--resume`), a VM that is gone is started again by `--resume` on the images as
//!   they are, and a copy already finished is never started again.
//! - A disk counts as copied only once QEMU has dropped its backing file and flushed it.

mod console;
mod export_server;
mod isolated_vm;
mod journal;
mod qemu;
mod recovery;

use std::path::PathBuf;

pub use blockproof_work::Cancel;
pub use isolated_vm::{boot, AccelChoice, Accelerator, Boot, BootOutcome, BootSpec, Firmware};
pub use journal::{Journal, JournalDisk, Machine, RecoveryState, JOURNAL_FILE, JOURNAL_VERSION};
pub use recovery::{
    CopyOptions, NewRecovery, Recovery, RecoveryEvent, RecoveryOutcome, CONSOLE, NBD_SOCKET, QEMU_LOG,
    RECONNECT_DELAY_SECS, USER_QMP,
};

/// Why a boot test could not be run (a failed boot is a [`BootOutcome`], not an error).
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// A [`BootSpec`] with neither a marker nor a script: nothing would decide the test.
    #[error("a boot test needs a check: a console marker, the guest agent, a script, or several")]
    NoCheck,
    /// `--accel kvm` on a machine where `/dev/kvm` does not open read-write.
    #[error("KVM is not available: /dev/kvm: {0}")]
    NoKvm(std::io::Error),
    /// UEFI was asked for and OVMF is not installed.
    #[error("the UEFI firmware {0} is missing: install Debian's ovmf package")]
    NoUefi(PathBuf),
    /// A program (QEMU, qemu-img, the check script) could not be started.
    #[error("cannot run {program}: {source}")]
    Spawn { program: String, source: std::io::Error },
    /// `qemu-img create` of an overlay failed.
    #[error("cannot create the overlay of disk {disk}: {message}")]
    Overlay { disk: String, message: String },
    /// The private directory, its socket or a file in it.
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
    /// The caller's [`Cancel`] was cancelled (SIGINT, SIGTERM): a boot test's VM was
    /// stopped; a recovery's copy was stopped (its VM runs on).
    #[error("{0}")]
    Cancelled(String),
    /// A new recovery in a directory that holds files.
    #[error("{0} is not empty: a new recovery needs an empty or new directory (--resume carries one on)")]
    DirNotEmpty(PathBuf),
    /// `--resume` in a directory without a journal.
    #[error("{0} holds no recovery (no recovery.json)")]
    NoRecovery(PathBuf),
    #[error("{0} is in use by another blockproof recover")]
    Busy(PathBuf),
    #[error("cannot read the recovery journal {path}: {why}")]
    Journal { path: PathBuf, why: String },
    /// The directory's sockets would not fit a unix socket address.
    #[error("{0}: the path is too long for the VM's sockets (at most 87 bytes): choose a shorter directory")]
    LongPath(PathBuf),
    /// The restore point lacks a disk the journal names.
    #[error("the restore point has no disk {0:?}")]
    MissingExport(String),
    #[error(transparent)]
    Qmp(#[from] blockproof_source::QmpError),
    /// QEMU did not start, or the VM is not the one blockproof set up.
    #[error("the VM cannot run: {0}")]
    VmFailed(String),
    /// The recovery's QEMU runs but does not answer on blockproof's QMP socket.
    #[error("the VM's QEMU (pid {pid}) runs but does not answer on {socket}")]
    VmUnreachable { pid: u32, socket: PathBuf },
    /// The VM went away before its copy was complete; its images keep everything.
    #[error("the VM stopped before its disks were copied ({why}); `blockproof recover --resume --dir {}` starts it again and finishes the copy", dir.display())]
    VmStopped { why: String, dir: PathBuf },
    /// QEMU's copy of a disk failed; the VM runs on.
    #[error("the copy of disk {disk} failed: {why}")]
    Copy { disk: String, why: String },
}

impl VmError {
    pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> VmError {
        let what = what.into();
        move |source| VmError::Io { what, source }
    }
}
