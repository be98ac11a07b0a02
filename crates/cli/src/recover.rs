//! `blockproof recover SNAP --dir DIR`: instant recovery. The VM starts at once from the
//! restore point (its disks served over NBD from the repository, under local qcow2
//! images that take its writes) while QEMU copies the disks into those images; the
//! command ends when the VM runs on ordinary local disks. `--resume` carries on a
//! recovery that was stopped at any point. The wiring only: the restore point's disks as
//! exports (serve-nbd's [`ImageExport`]), the kernel of a direct boot read out of the
//! backup (as `restore-test --boot` reads it), SIGINT and SIGTERM turned into a
//! cancellation, and the VM and its copy run by [`blockproof_vm::Recovery`].

use std::path::PathBuf;
use std::sync::Arc;
use std::time::SystemTime;

use anyhow::{Context, Result};
use blockproof_core::image::DEFAULT_CACHE_BYTES;
use blockproof_core::DiskImage;
use blockproof_nbd::Exports;
use blockproof_vm::{Cancel, CopyOptions, NewRecovery, Recovery, RecoveryEvent, VmError, RECONNECT_DELAY_SECS};
use clap::Args;
use serde::Serialize;

use crate::args::RepoArgs;
use crate::boot_test::MachineArgs;
use crate::commands::{human_bytes, open_repo, print_json, resolve_for_reading};
use crate::serve::ImageExport;
use crate::{exit, Usage};

#[derive(Args, Debug)]
pub struct RecoverArgs {
    #[command(flatten)]
    pub repo: RepoArgs,
    /// Snapshot: id, unique id prefix, VM:latest, VM:latest~N, VM:tag=TAG or VM:before=TIME
    /// (not with --resume: the recovery names it).
    #[arg(value_name = "SNAP", required_unless_present = "resume", conflicts_with = "resume")]
    pub snapshot: Option<String>,
    /// The recovered VM's directory: its local disk images (one qcow2 per disk), serial
    /// console, QMP socket and journal. New or empty; with --resume, the recovery's.
    #[arg(long, value_name = "DIR")]
    pub dir: PathBuf,
    /// Carry on the recovery in --dir after it was stopped (the command killed, the host
    /// restarted, the VM gone): the VM is started again if it is not running, and the
    /// copy goes on from where it is.
    #[arg(long)]
    pub resume: bool,
    /// The copy's speed limit per disk, bytes per second (e.g. 50M); default: unlimited.
    #[arg(long, value_name = "RATE", value_parser = parse_rate)]
    pub speed: Option<u64>,
    #[command(flatten)]
    pub machine: MachineArgs,
    /// A further QEMU argument, e.g. a network: --qemu-arg=-nic --qemu-arg=bridge,br=br0
    /// (repeatable; the VM has no network device otherwise).
    #[arg(long = "qemu-arg", value_name = "ARG", allow_hyphen_values = true)]
    pub qemu_args: Vec<String>,
    /// Print the outcome as JSON.
    #[arg(long)]
    pub json: bool,
}

fn parse_rate(s: &str) -> Result<u64, String> {
    match blockproof_core::budget::parse_size(s) {
        Some(n) if n > 0 => Ok(n),
        _ => Err(format!("invalid rate {s:?}: give bytes per second, e.g. 50M or 1G")),
    }
}

/// The outcome, as `--json` prints it (docs/JSON.md).
#[derive(Debug, Serialize)]
struct RecoverReport {
    snapshot: String,
    vm: String,
    dir: PathBuf,
    state: &'static str,
    resumed: bool,
    vm_started: bool,
    qemu_pid: Option<u32>,
    accelerator: &'static str,
    qmp: PathBuf,
    console: PathBuf,
    disks: Vec<RecoveredDisk>,
    vm_start_seconds: Option<f64>,
    seconds: f64,
}

#[derive(Debug, Serialize)]
struct RecoveredDisk {
    id: String,
    size: u64,
    image: PathBuf,
}

pub fn recover(a: RecoverArgs) -> Result<u8> {
    if a.resume && (a.machine.given() || !a.qemu_args.is_empty()) {
        return Err(Usage(
            "--resume starts the VM as the recovery first did: --memory, --cpus, --accel, --firmware, --kernel and --qemu-arg \
             cannot be given with it"
                .into(),
        )
        .into());
    }
    a.machine.kernel_paths()?;
    // Before anything starts a thread, so that every thread has them blocked and the
    // one below takes them: Ctrl-C stops the copy (the VM runs on).
    let signals = crate::serve::block_stop_signals()?;
    let cancel = Cancel::new();
    crate::boot_test::cancel_on_signals(signals, cancel.clone());

    let repo: &'static blockproof_repo::Repository = Box::leak(Box::new(open_repo(&a.repo)?));
    let (mut recovery, info) = if a.resume {
        let recovery = Recovery::open(&a.dir).map_err(usage_or_error)?;
        let j = recovery.journal();
        if j.repository != repo.id().to_hex() {
            return Err(Usage(format!(
                "{} recovers a restore point of repository {}, not of this one ({})",
                a.dir.display(),
                j.repository,
                repo.id().to_hex()
            ))
            .into());
        }
        let info = resolve_for_reading(repo, &j.snapshot)?;
        (recovery, info)
    } else {
        let snapshot = a.snapshot.as_deref().expect("clap requires SNAP without --resume");
        let info = resolve_for_reading(repo, snapshot)?;
        (prepare(&a, repo, &info)?, info)
    };
    let reader = crate::files::leaked_reader(repo)?;
    let mut exports: Exports<'static> = Vec::new();
    for d in &info.snapshot.disks {
        exports.push((d.id.clone(), Arc::new(ImageExport(DiskImage::new(reader, d, DEFAULT_CACHE_BYTES)?))));
    }
    let opts = CopyOptions { speed: a.speed, cancel, qemu: "qemu-system-x86_64".into(), qemu_img: "qemu-img".into() };
    let dir = recovery.dir().to_path_buf();
    let progress = crate::progress::for_stderr();
    let quiet = a.json || matches!(crate::progress::mode(), crate::args::ProgressMode::Never);
    let mut shown = 0u64;
    let mut begun = false;
    let mut events = |e: RecoveryEvent<'_>| match e {
        RecoveryEvent::VmStarted { pid, again } if !quiet => eprintln!(
            "recover: the VM {} (pid {pid}); console {}, QMP {}",
            if again { "was gone: started it again" } else { "is starting from the backup" },
            dir.join(blockproof_vm::CONSOLE).display(),
            dir.join(blockproof_vm::USER_QMP).display()
        ),
        RecoveryEvent::VmFound { pid } if !quiet => eprintln!(
            "recover: the VM still runs{}; carrying on its copy",
            pid.map(|p| format!(" (pid {p})")).unwrap_or_default()
        ),
        RecoveryEvent::Copying { done, total } => {
            if !begun {
                progress.begin("copying", total);
                begun = true;
            }
            if done > shown {
                progress.advance(done - shown);
                shown = done;
            }
        }
        RecoveryEvent::DiskCopied { id } if !quiet => eprintln!("recover: disk {id} is local now"),
        _ => {}
    };
    let outcome = match recovery.run(&exports, &opts, &mut events) {
        Ok(o) => o,
        Err(VmError::Cancelled(why)) => anyhow::bail!(
            "recovery paused ({why}): the VM runs on; its reads of data not yet copied wait up to {}s for \
             `blockproof recover --resume --dir {}`",
            RECONNECT_DELAY_SECS,
            dir.display()
        ),
        Err(e) => return Err(e.into()),
    };
    progress.end();
    let j = recovery.journal();
    let report = RecoverReport {
        snapshot: j.snapshot.clone(),
        vm: j.vm.clone(),
        dir: dir.clone(),
        state: "complete",
        resumed: a.resume,
        vm_started: outcome.vm_started,
        qemu_pid: outcome.qemu_pid,
        accelerator: j.machine.accelerator.name(),
        qmp: dir.join(blockproof_vm::USER_QMP),
        console: dir.join(blockproof_vm::CONSOLE),
        disks: j
            .disks
            .iter()
            .map(|d| RecoveredDisk { id: d.id.clone(), size: d.size, image: dir.join(&d.image) })
            .collect(),
        vm_start_seconds: outcome.vm_start_seconds,
        seconds: outcome.seconds,
    };
    if a.json {
        print_json(&report)?;
    } else {
        print_text(&report);
    }
    Ok(exit::OK)
}

/// A new recovery: the VM's shape and boot, checked and written to the journal.
fn prepare(
    a: &RecoverArgs,
    repo: &'static blockproof_repo::Repository,
    info: &blockproof_repo::SnapshotInfo,
) -> Result<Recovery> {
    let disks = &info.snapshot.disks;
    let first = disks.first().ok_or_else(|| Usage(format!("snapshot {} has no disk", info.id.short())))?;
    let reader = crate::files::leaked_reader(repo)?;
    let (boot, _, _) = a.machine.boot(reader, first)?.map_err(|why| anyhow::anyhow!("cannot boot the VM: {why}"))?;
    let new = NewRecovery {
        repository: repo.id().to_hex(),
        snapshot: info.id.to_hex(),
        vm: info.snapshot.vm.clone(),
        created: humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
        disks: disks.iter().map(|d| (d.id.clone(), d.size)).collect(),
        memory_mib: a.machine.memory(),
        cpus: a.machine.cpus(),
        accel: a.machine.accel(),
        firmware: a.machine.firmware(),
        boot,
        extra_args: a.qemu_args.clone(),
    };
    Recovery::create(&a.dir, new).map_err(usage_or_error).with_context(|| format!("recovery in {}", a.dir.display()))
}

/// The caller's mistakes (a directory in use, not empty, not a recovery) are usage
/// errors (exit 2).
fn usage_or_error(e: VmError) -> anyhow::Error {
    match e {
        VmError::DirNotEmpty(_) | VmError::NoRecovery(_) | VmError::LongPath(_) | VmError::Journal { .. } => {
            Usage(e.to_string()).into()
        }
        e => e.into(),
    }
}

fn print_text(r: &RecoverReport) {
    println!(
        "recover: vm {} from snapshot {}: every disk is local; the VM runs on them{}",
        r.vm,
        r.snapshot.get(..12).unwrap_or(&r.snapshot),
        r.qemu_pid.map(|p| format!(" (QEMU pid {p})")).unwrap_or_default()
    );
    for d in &r.disks {
        println!("  {:<12} {:>10}  {}", d.id, human_bytes(d.size), d.image.display());
    }
    println!("  console {}, QMP {}", r.console.display(), r.qmp.display());
}
