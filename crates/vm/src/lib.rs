//! # blockproof-vm
//!
//! Boots a restore point in an isolated, throwaway QEMU virtual machine and says whether
//! it came up: the check behind `blockproof restore-test --boot` (prove the restore, not
//! just the bytes).
//!
//! ## Model
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
//!    marker), then runs the check script, until the check passes, fails or the timeout
//!    ends it;
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

mod console;
mod export_server;
mod isolated_vm;

pub use blockproof_work::Cancel;
pub use isolated_vm::{boot, AccelChoice, Accelerator, Boot, BootOutcome, BootSpec};

/// Why a boot test could not be run (a failed boot is a [`BootOutcome`], not an error).
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// A [`BootSpec`] with neither a marker nor a script: nothing would decide the test.
    #[error("a boot test needs a check: a console marker, a script or both")]
    NoCheck,
    /// `--accel kvm` on a machine where `/dev/kvm` does not open read-write.
    #[error("KVM is not available: /dev/kvm: {0}")]
    NoKvm(std::io::Error),
    /// A program (QEMU, qemu-img, the check script) could not be started.
    #[error("cannot run {program}: {source}")]
    Spawn { program: String, source: std::io::Error },
    /// `qemu-img create` of an overlay failed.
    #[error("cannot create the overlay of disk {disk}: {message}")]
    Overlay { disk: String, message: String },
    /// The private directory, its socket or a file in it.
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
    /// The caller's [`Cancel`] was cancelled (SIGINT, SIGTERM); everything was stopped.
    #[error("{0}")]
    Cancelled(String),
}

impl VmError {
    pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> VmError {
        let what = what.into();
        move |source| VmError::Io { what, source }
    }
}
