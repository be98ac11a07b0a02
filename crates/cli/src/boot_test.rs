//! `blockproof restore-test SNAP --boot`: prove a restore point boots. The wiring only —
//! the snapshot's disks as NBD exports (serve-nbd's [`ImageExport`]), the kernel and
//! initrd of a direct kernel boot read out of the snapshot's own filesystem (blockproof-fs,
//! as `cat` reads), SIGINT and SIGTERM turned into a cancellation, the VM run by
//! [`blockproof_vm::boot`], and the outcome stored as a restore-test record of kind
//! `boot` (blockproof_core::restore_test).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::Result;
use blockproof_core::image::DEFAULT_CACHE_BYTES;
use blockproof_core::restore_test::{BootCheck, BootMethod, RestoreTest, TestKind};
use blockproof_core::DiskImage;
use blockproof_format::DiskEntry;
use blockproof_fs::{Disk, FsError, FsPath};
use blockproof_nbd::Exports;
use blockproof_repo::BlobReader;
use blockproof_vm::{AccelChoice, Boot, BootSpec, Cancel, Firmware, VmError};
use clap::Args;

use crate::restore_test::{print_record, selected_disks, RestoreTestArgs};
use crate::serve::ImageExport;
use crate::Usage;

/// The options of `restore-test --boot` (each requires `--boot`).
#[derive(Args, Debug)]
pub struct BootArgs {
    /// Boot the restore point in an isolated, throwaway VM (QEMU) instead of walking its
    /// filesystems; passes when the check (--console-marker, --script) passes.
    #[arg(long)]
    pub boot: bool,
    /// Text that must appear on the VM's serial console (ttyS0) for the boot to pass.
    #[arg(long, value_name = "TEXT", requires = "boot")]
    pub console_marker: Option<String>,
    /// Pass only once the guest agent (qemu-ga in the guest, on the virtio serial port
    /// org.qemu.guest_agent.0 that the VM gets) answers a ping; after --console-marker
    /// when both are given.
    #[arg(long, requires = "boot")]
    pub guest_agent: bool,
    /// Text that fails the test at once when it appears on the serial console.
    #[arg(long, value_name = "TEXT", requires = "boot")]
    pub fail_marker: Option<String>,
    /// A program run after the marker (without one: as the VM starts), with
    /// BLOCKPROOF_QMP, BLOCKPROOF_CONSOLE and BLOCKPROOF_SNAPSHOT set; exit 0 passes.
    #[arg(long, value_name = "PATH", requires = "boot")]
    pub script: Option<PathBuf>,
    /// How long the VM gets, from its start, to pass the check.
    #[arg(long, value_name = "DURATION", default_value = "5m", value_parser = crate::args::parse_duration, requires = "boot")]
    pub timeout: Duration,
    #[command(flatten)]
    pub machine: MachineArgs,
}

/// The shape of a VM made from a restore point (`restore-test --boot`, `recover`).
#[derive(Args, Debug)]
pub struct MachineArgs {
    /// The VM's memory in MiB [default: 512].
    #[arg(long, value_name = "MIB", value_parser = clap::value_parser!(u64).range(16..))]
    pub memory: Option<u64>,
    /// The VM's virtual CPUs [default: 2].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=64))]
    pub cpus: Option<u32>,
    /// The accelerator [default: auto: KVM when /dev/kvm opens read-write and the CPU has
    /// VT-x or AMD-V, TCG otherwise].
    #[arg(long, value_enum, value_name = "ACCEL")]
    pub accel: Option<Accel>,
    /// The VM's firmware [default: bios]: uefi boots a disk's EFI system partition
    /// (OVMF, from Debian's ovmf package).
    #[arg(long, value_enum, value_name = "FIRMWARE")]
    pub firmware: Option<FirmwareArg>,
    /// Boot this kernel directly instead of the disk's boot loader: a path inside the
    /// snapshot's filesystems (the first disk's), so the kernel is the backup's own.
    #[arg(long, value_name = "PATH")]
    pub kernel: Option<String>,
    /// The initrd of --kernel, a path in the same filesystem.
    #[arg(long, value_name = "PATH", requires = "kernel")]
    pub initrd: Option<String>,
    /// The kernel command line of --kernel (add console=ttyS0 to see its console).
    #[arg(long, value_name = "TEXT", requires = "kernel")]
    pub append: Option<String>,
}

impl MachineArgs {
    /// Whether any of the options was given.
    pub fn given(&self) -> bool {
        self.memory.is_some()
            || self.cpus.is_some()
            || self.accel.is_some()
            || self.kernel.is_some()
            || self.firmware.is_some()
    }

    pub fn firmware(&self) -> Firmware {
        match self.firmware {
            None | Some(FirmwareArg::Bios) => Firmware::Bios,
            Some(FirmwareArg::Uefi) => Firmware::Uefi,
        }
    }

    pub fn memory(&self) -> u64 {
        self.memory.unwrap_or(512)
    }

    pub fn cpus(&self) -> u32 {
        self.cpus.unwrap_or(2)
    }

    pub fn accel(&self) -> AccelChoice {
        self.accel.unwrap_or(Accel::Auto).into()
    }

    /// The kernel and initrd paths of a direct boot, parsed.
    pub fn kernel_paths(&self) -> Result<Option<(FsPath, Option<FsPath>)>, Usage> {
        let Some(k) = &self.kernel else { return Ok(None) };
        let parse =
            |opt: &str, p: &str| FsPath::parse(p.as_bytes()).map_err(|e| Usage(format!("invalid {opt} {p:?}: {e}")));
        Ok(Some((parse("--kernel", k)?, self.initrd.as_deref().map(|i| parse("--initrd", i)).transpose()?)))
    }

    /// How the VM boots: the firmware, or the kernel (and initrd) read out of the first
    /// disk of the restore point (`Err`: why it cannot be, for the caller to report),
    /// with where each was found.
    #[allow(clippy::type_complexity)]
    pub fn boot(
        &self,
        reader: &'static BlobReader<'static>,
        first: &DiskEntry,
    ) -> Result<Result<(Boot, Option<String>, Option<String>), String>> {
        boot_from_snapshot(reader, first, self.kernel_paths()?.as_ref(), self.append.clone())
    }
}

/// How a VM of the restore point boots: the firmware, or the kernel (and initrd) at these
/// paths in the first disk of the restore point (`Err`: why it cannot be, for the
/// caller to report), with where each was found.
#[allow(clippy::type_complexity)]
fn boot_from_snapshot(
    reader: &'static BlobReader<'static>,
    first: &DiskEntry,
    kernel: Option<&(FsPath, Option<FsPath>)>,
    append: Option<String>,
) -> Result<Result<(Boot, Option<String>, Option<String>), String>> {
    match kernel {
        None => Ok(Ok((Boot::Firmware, None, None))),
        Some((kernel, initrd)) => {
            kernel_from_snapshot(reader, first, kernel, initrd.as_ref(), append.unwrap_or_default())
        }
    }
}

/// `--firmware`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum FirmwareArg {
    /// SeaBIOS: the disk's MBR boot loader.
    Bios,
    /// OVMF: the disk's EFI system partition (its boot entries, \EFI\BOOT\BOOTX64.EFI, or
    /// startup.nsh in the UEFI shell).
    Uefi,
}

/// `restore-test --accel`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Accel {
    /// KVM when /dev/kvm opens read-write and the CPU has VT-x or AMD-V, TCG otherwise.
    Auto,
    /// KVM; an error where it is not available.
    Kvm,
    /// TCG (emulation), even where KVM is available.
    Tcg,
}

impl From<Accel> for AccelChoice {
    fn from(a: Accel) -> AccelChoice {
        match a {
            Accel::Auto => AccelChoice::Auto,
            Accel::Kvm => AccelChoice::Kvm,
            Accel::Tcg => AccelChoice::Tcg,
        }
    }
}

pub fn boot_test(a: RestoreTestArgs) -> Result<u8> {
    let b = &a.boot;
    if b.console_marker.is_none() && b.script.is_none() && !b.guest_agent {
        return Err(Usage(
            "--boot needs a check: --console-marker TEXT, --guest-agent, --script PATH, or several".into(),
        )
        .into());
    }
    if let Some(s) = &b.script {
        if !s.is_file() {
            return Err(Usage(format!("--script {}: no such file", s.display())).into());
        }
    }
    let m = &b.machine;
    let params = BootParams {
        console_marker: b.console_marker.clone(),
        fail_marker: b.fail_marker.clone(),
        guest_agent: b.guest_agent,
        script: b.script.clone(),
        timeout: b.timeout,
        memory_mib: m.memory(),
        cpus: m.cpus(),
        accel: m.accel(),
        firmware: m.firmware(),
        // Checked before anything runs.
        kernel: m.kernel_paths()?,
        append: m.append.clone(),
    };
    // Before anything starts a thread, so that every thread has them blocked and the
    // one below takes them: Ctrl-C stops the VM and removes its files.
    let signals = crate::serve::block_stop_signals()?;
    let cancel = Cancel::new();
    cancel_on_signals(signals, cancel.clone());
    let repo: &'static blockproof_repo::Repository = Box::leak(Box::new(crate::commands::open_repo(&a.repo)?));
    let info = crate::commands::resolve_for_reading(repo, &a.snapshot)?;
    let disks = selected_disks(&info, a.disk.as_deref())?;
    let test = run_boot_test(repo, &info, &disks, &params, cancel)?;
    print_record(&a, repo, &test)
}

/// What a boot test boots and checks (`restore-test --boot`, or a job's
/// `[restore_test.boot]`).
pub(crate) struct BootParams {
    pub console_marker: Option<String>,
    pub fail_marker: Option<String>,
    pub guest_agent: bool,
    pub script: Option<PathBuf>,
    pub timeout: Duration,
    pub memory_mib: u64,
    pub cpus: u32,
    pub accel: AccelChoice,
    pub firmware: Firmware,
    /// A direct kernel boot: the kernel's and initrd's paths in the backup.
    pub kernel: Option<(FsPath, Option<FsPath>)>,
    pub append: Option<String>,
}

/// Boots `disks` of the restore point `info` as `p` says and returns the record (not yet
/// stored). `Err`: the test could not run (QEMU missing, cancelled, ...).
pub(crate) fn run_boot_test(
    repo: &'static blockproof_repo::Repository,
    info: &blockproof_repo::SnapshotInfo,
    disks: &[DiskEntry],
    p: &BootParams,
    cancel: Cancel,
) -> Result<RestoreTest> {
    let started = Instant::now();
    let time = humantime::format_rfc3339_micros(SystemTime::now()).to_string();
    let reader = crate::files::leaked_reader(repo)?;
    let mut check = BootCheck {
        console_marker: p.console_marker.clone(),
        fail_marker: p.fail_marker.clone(),
        script: p.script.as_ref().map(|p| p.display().to_string()),
        guest_agent: p.guest_agent,
        uefi: p.firmware == Firmware::Uefi,
        boot: if p.kernel.is_some() { BootMethod::Kernel } else { BootMethod::Firmware },
        kernel: None,
        initrd: None,
        append: p.append.clone(),
        memory_mib: p.memory_mib,
        cpus: p.cpus,
        disks: disks.iter().map(|d| d.id.clone()).collect(),
    };
    let mut test = RestoreTest {
        snapshot: info.id,
        vm: info.snapshot.vm.clone(),
        time,
        kind: TestKind::Boot,
        passed: false,
        reason: None,
        duration_seconds: 0.0,
        hostname: blockproof_core::hostname(),
        program: format!("blockproof {}", env!("CARGO_PKG_VERSION")),
        sample: 0.0,
        filesystems: Vec::new(),
        unchecked_disks: Vec::new(),
        expected: Vec::new(),
        boot_seconds: None,
        console_excerpt: None,
        check: None,
        accelerator: None,
    };
    let first = disks.first().ok_or_else(|| Usage(format!("snapshot {} has no disk", info.id.short())))?;
    let found = boot_from_snapshot(reader, first, p.kernel.as_ref(), p.append.clone())?;
    match found {
        Err(why) => test.reason = Some(why),
        Ok((boot, kernel_at, initrd_at)) => {
            check.kernel = kernel_at;
            check.initrd = initrd_at;
            let mut exports: Exports<'static> = Vec::new();
            for d in disks {
                exports.push((d.id.clone(), Arc::new(ImageExport(DiskImage::new(reader, d, DEFAULT_CACHE_BYTES)?))));
            }
            let spec = BootSpec {
                memory_mib: p.memory_mib,
                cpus: p.cpus,
                accel: p.accel,
                firmware: p.firmware,
                boot,
                marker: p.console_marker.clone(),
                agent: p.guest_agent,
                fail_marker: p.fail_marker.clone(),
                script: p.script.clone(),
                script_env: vec![("BLOCKPROOF_SNAPSHOT".into(), info.id.to_hex())],
                timeout: p.timeout,
                cancel,
                qemu: "qemu-system-x86_64".into(),
                qemu_img: "qemu-img".into(),
            };
            let outcome = match blockproof_vm::boot(&exports, &spec) {
                Ok(o) => o,
                Err(VmError::Cancelled(why)) => anyhow::bail!("restore test stopped ({why}); the VM was stopped"),
                Err(e) => return Err(e.into()),
            };
            test.reason = outcome.reason.clone();
            test.boot_seconds = outcome.boot_seconds;
            test.console_excerpt = Some(outcome.console_excerpt.clone());
            test.accelerator = Some(outcome.accelerator.name().into());
        }
    }
    test.check = Some(check);
    test.passed = test.reason.is_none();
    test.duration_seconds = started.elapsed().as_secs_f64();
    Ok(test)
}

/// The kernel (and initrd) read out of the first filesystem of `disk` that has it, and
/// where each was found (`DISK/partN:PATH`); `Err`: why not, for the record.
#[allow(clippy::type_complexity)]
fn kernel_from_snapshot(
    reader: &'static BlobReader<'static>,
    disk: &DiskEntry,
    kernel: &FsPath,
    initrd: Option<&FsPath>,
    append: String,
) -> Result<Result<(Boot, Option<String>, Option<String>), String>> {
    let d = match Disk::open(crate::files::snapshot_disk(reader, disk)?) {
        Ok(d) => d,
        Err(e) => return Ok(Err(format!("cannot read the partitions of disk {}: {e}", disk.id))),
    };
    let mut problems = Vec::new();
    for p in d.partitions().iter().filter(|p| p.filesystem.is_some_and(|k| k.is_readable())) {
        let at = |path: &FsPath| format!("{}/part{}:{path}", disk.id, p.index);
        let fs = match d.open_filesystem(Some(p.index)) {
            Ok(fs) => fs,
            Err(e) => {
                problems.push(format!("part{}: {e}", p.index));
                continue;
            }
        };
        let mut k = Vec::new();
        match fs.read(kernel.to_bytes(), &mut k) {
            Ok(_) => {}
            Err(FsError::NotFound { .. }) => continue,
            Err(e) => {
                problems.push(format!("{}: {e}", at(kernel)));
                continue;
            }
        }
        let mut i = None;
        if let Some(path) = initrd {
            let mut bytes = Vec::new();
            if let Err(e) = fs.read(path.to_bytes(), &mut bytes) {
                return Ok(Err(format!("initrd {}: {e}", at(path))));
            }
            i = Some(bytes);
        }
        let boot = Boot::Kernel { kernel: k, initrd: i, append };
        return Ok(Ok((boot, Some(at(kernel)), initrd.map(at))));
    }
    let mut why = format!("kernel {kernel} is in no filesystem of disk {}", disk.id);
    if !problems.is_empty() {
        why.push_str(&format!(" ({})", problems.join("; ")));
    }
    Ok(Err(why))
}

/// Takes SIGINT and SIGTERM (blocked by [`crate::serve::block_stop_signals`]) on a
/// thread of its own and cancels the test: the VM is stopped, its files removed, and the
/// command ends with an error.
pub(crate) fn cancel_on_signals(set: libc::sigset_t, cancel: Cancel) {
    std::thread::spawn(move || {
        let mut signal = 0;
        // SAFETY: `set` is initialised and blocked in every thread of this process.
        if unsafe { libc::sigwait(&set, &mut signal) } == 0 {
            cancel.cancel(if signal == libc::SIGTERM { "SIGTERM" } else { "SIGINT" });
        }
    });
}
