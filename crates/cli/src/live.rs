//! `backup --from qmp:SOCKET | libvirt:DOMAIN` and `cleanup`: a running VM's
//! point-in-time view, set up before the backup and torn down after it
//! (blockproof_source::LiveVm over QMP, blockproof_source::LibvirtVm through virsh).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Result;
use blockproof_core::{BackupReport, CoreError, DiskInput};
use blockproof_format::{Machine, MachineKind, SnapshotStatus};
use blockproof_repo::Repository;
use blockproof_source::{KeptView, LibvirtVm, LiveVm, ParentCbt};

use crate::args::CleanupArgs;
use crate::Usage;

const SYNTAX: &str = "expected qmp:SOCKET[,nbd=PATH][,qga=PATH] or libvirt:DOMAIN[,uri=URI]";

/// How long a view is kept after a mismatch when `--keep-view` is not given.
pub const DEFAULT_KEEP_VIEW: Duration = Duration::from_secs(3600);

/// A parsed `--from` value.
#[derive(Debug, PartialEq, Eq)]
pub enum VmSource {
    Qmp { qmp: PathBuf, nbd: Option<PathBuf>, qga: Option<PathBuf> },
    Libvirt { domain: String, uri: String },
}

impl VmSource {
    pub fn parse(s: &str) -> Result<VmSource, Usage> {
        let bad = || Usage(format!("invalid --from {s:?}: {SYNTAX}"));
        if let Some(rest) = s.strip_prefix("libvirt:") {
            let (domain, uri) = match rest.split_once(",uri=") {
                Some((d, u)) => (d, u),
                None => (rest, blockproof_source::DEFAULT_URI),
            };
            if domain.is_empty() || domain.contains(',') || uri.is_empty() {
                return Err(bad());
            }
            return Ok(VmSource::Libvirt { domain: domain.into(), uri: uri.into() });
        }
        let rest = s.strip_prefix("qmp:").ok_or_else(bad)?;
        let mut parts = rest.split(',');
        let qmp = parts.next().filter(|q| !q.is_empty()).ok_or_else(bad)?;
        let (mut nbd, mut qga) = (None, None);
        for part in parts {
            let (slot, value) = match part.split_once('=') {
                Some(("nbd", v)) => (&mut nbd, v),
                Some(("qga", v)) => (&mut qga, v),
                _ => return Err(bad()),
            };
            if value.is_empty() || slot.is_some() {
                return Err(bad());
            }
            *slot = Some(PathBuf::from(value));
        }
        Ok(VmSource::Qmp { qmp: qmp.into(), nbd, qga })
    }

    /// Takes the view of every disk of the VM; another run of the vm from the same state
    /// directory is waited for up to `lock_wait`. `repo`: where the parent restore points
    /// are (libvirt begins its backup job incrementally from their checkpoints).
    pub fn start(&self, repo: &Repository, vm: &str, state_dir: Option<&Path>, lock_wait: Duration) -> Result<Live> {
        let dir = blockproof_source::state_dir(state_dir)?;
        // Absolute: a kept view's keeper process is started with it.
        let dir = std::fs::canonicalize(&dir).unwrap_or(dir);
        let view = match self {
            VmSource::Qmp { qmp, nbd, qga } => {
                View::Qmp(LiveVm::start(qmp, vm, &dir, nbd.as_deref(), qga.as_deref(), lock_wait)?)
            }
            VmSource::Libvirt { domain, uri } => {
                // The parent of each disk as the backup finds it: the latest snapshot of
                // the vm holding the disk id (the backup checks it opens the same one).
                let snapshots = repo.scan_snapshots()?.snapshots;
                let parent = |id: &str| {
                    let p = snapshots.iter().rev().find(|s| s.snapshot.vm == vm && s.snapshot.disk(id).is_some())?;
                    let d = p.snapshot.disk(id)?;
                    Some(ParentCbt { cbt: d.cbt.clone(), state: d.cbt_state.clone() })
                };
                View::Libvirt(LibvirtVm::start(uri, domain, vm, &dir, lock_wait, &parent)?)
            }
        };
        Ok(Live { view, dir })
    }
}

/// The view of one kind of VM source.
enum View {
    Qmp(LiveVm),
    Libvirt(LibvirtVm),
}

/// A view set up for one backup.
pub struct Live {
    view: View,
    /// The state directory (absolute).
    dir: PathBuf,
}

impl Live {
    /// One disk input per disk of the VM: by node name (QMP), by serial, wwn or target
    /// dev (libvirt).
    pub fn inputs(&self) -> Vec<DiskInput> {
        match &self.view {
            View::Qmp(vm) => vm
                .disks()
                .into_iter()
                .map(|d| DiskInput {
                    id: d.id.clone(),
                    cbt: "qmp".into(),
                    open: Box::new(vm.opener(&d.id)),
                    verify: None,
                })
                .collect(),
            View::Libvirt(vm) => vm
                .disks()
                .into_iter()
                .map(|d| DiskInput {
                    id: d.id.clone(),
                    cbt: blockproof_source::LIBVIRT_CBT.into(),
                    open: Box::new(vm.opener(&d.id)),
                    verify: None,
                })
                .collect(),
        }
    }

    /// The VM as the restore point keeps it. For QMP, the block graph blockproof saw —
    /// each disk's node name, format driver, image file and size; for libvirt, the
    /// domain's XML (`virsh dumpxml --inactive`) and UUID; for both, whether the guest
    /// agent froze the file systems for the view, or why not (docs/LIVE-VMS.md).
    pub fn machine(&self) -> Machine {
        match &self.view {
            View::Qmp(vm) => {
                let disks: Vec<_> = vm
                    .disks()
                    .into_iter()
                    .map(
                        |d| serde_json::json!({ "node": d.id, "driver": d.driver, "file": d.filename, "size": d.size }),
                    )
                    .collect();
                let (consistency, consistency_note) = vm.consistency();
                Machine {
                    kind: MachineKind::Qmp,
                    consistency,
                    consistency_note,
                    definition: serde_json::json!({ "disks": disks }).to_string(),
                    uuid: None,
                }
            }
            View::Libvirt(vm) => {
                let (consistency, consistency_note) = vm.consistency();
                Machine {
                    kind: MachineKind::Libvirt,
                    consistency,
                    consistency_note,
                    definition: vm.definition(),
                    uuid: Some(vm.uuid()),
                }
            }
        }
    }

    fn recovered(&self) -> Vec<String> {
        match &self.view {
            View::Qmp(vm) => vm.recovered(),
            View::Libvirt(vm) => vm.recovered(),
        }
    }

    fn release(self, committed: bool) -> Result<(), blockproof_source::SourceError> {
        match self.view {
            View::Qmp(vm) => vm.finish(committed),
            View::Libvirt(vm) => vm.finish(committed),
        }
    }

    /// The view an earlier run kept after a mismatch, released before this run's.
    fn released(&self) -> Option<KeptView> {
        match &self.view {
            View::Qmp(vm) => vm.released(),
            View::Libvirt(vm) => vm.released(),
        }
    }

    fn keep(&self, keep: Duration, snapshot: &str) -> Result<KeptView, blockproof_source::SourceError> {
        match &self.view {
            View::Qmp(vm) => vm.keep(keep, snapshot),
            View::Libvirt(vm) => vm.keep(keep, snapshot),
        }
    }
}

/// Tears the view down after the backup: a committed snapshot (ok or tainted) makes the
/// new bitmaps or checkpoint the base of the next run; a failed backup merges them back.
/// A tainted restore point that was not healed keeps the view for `keep_view` (not zero)
/// instead: returned, with a keeper process started that releases it then. When a
/// failed backup's view cannot be released either (the VM process died, say), the
/// backup's error stays the error and the teardown's is a warning on standard error.
pub fn finish(
    live: Live,
    vm: &str,
    result: Result<BackupReport, CoreError>,
    keep_view: Duration,
) -> Result<(BackupReport, Option<KeptView>)> {
    let recovered = live.recovered();
    match result {
        Ok(mut report) => {
            if let Some(k) = live.released() {
                report.warnings.push(format!(
                    "released the point-in-time view kept after the mismatch of snapshot {} (it was kept until {})",
                    short(&k.snapshot),
                    k.until
                ));
            } else {
                report.warnings.extend(recovered.into_iter().map(|r| format!("cleaned up after an earlier run: {r}")));
            }
            let keep =
                report.status == SnapshotStatus::Tainted && report.healed_snapshot.is_none() && !keep_view.is_zero();
            if !keep {
                live.release(true)?;
                return Ok((report, None));
            }
            match live.keep(keep_view, &report.snapshot.to_string()) {
                Ok(kept) => {
                    let Live { view, dir } = live;
                    drop(view); // releases the vm's lock: the keeper takes it later
                    if let Err(e) = spawn_keeper(vm, &dir) {
                        report.warnings.push(format!(
                            "could not start the process that releases the kept view at {} ({e}): release it with \
                             `blockproof cleanup --vm {vm}`; the next backup of the vm releases it too",
                            kept.until
                        ));
                    }
                    Ok((report, Some(kept)))
                }
                Err(e) => {
                    report.warnings.push(format!("the point-in-time view could not be kept ({e}); it was released"));
                    live.release(true)?;
                    Ok((report, None))
                }
            }
        }
        Err(e) => {
            // The backup's error is what the user must see; a teardown failure is left
            // in the journal for the next run, and said.
            if let Err(t) = live.release(false) {
                eprintln!(
                    "warning: the point-in-time view of vm {vm} was not released ({t}); the next run or `blockproof cleanup --vm {vm}` undoes it"
                );
            }
            Err(e.into())
        }
    }
}

fn short(id: &str) -> &str {
    id.get(..12).unwrap_or(id)
}

/// Starts `blockproof cleanup --vm VM --state-dir DIR --when-expired` detached (its own
/// session, no terminal, standard streams to /dev/null), so the kept view is released at
/// its deadline even if no other blockproof command runs, after this process exited.
fn spawn_keeper(vm: &str, dir: &Path) -> std::io::Result<()> {
    use std::os::unix::process::CommandExt;
    use std::process::{Command, Stdio};
    let mut c = Command::new(std::env::current_exe()?);
    c.args(["cleanup", "--vm", vm, "--when-expired", "--state-dir"])
        .arg(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    // SAFETY: setsid is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        c.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    let mut child = c.spawn()?;
    // Reaped if this process outlives it (it exits when the view is released).
    std::thread::spawn(move || child.wait());
    Ok(())
}

/// `blockproof cleanup --vm NAME`: undoes the journal an interrupted backup left.
pub fn cleanup(a: CleanupArgs) -> Result<u8> {
    let dir = blockproof_source::state_dir(a.state_dir.as_deref())?;
    let done = if a.when_expired {
        blockproof_source::release_when_expired(&dir, &a.vm)?
    } else {
        blockproof_source::cleanup(&dir, &a.vm)?
    };
    if a.json {
        crate::commands::print_json(&serde_json::json!({ "vm": a.vm, "removed": done }))?;
    } else if done.is_empty() {
        println!("nothing to clean up for vm {}", a.vm);
    } else {
        for d in &done {
            println!("removed {d}");
        }
    }
    Ok(crate::exit::OK)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_sources_parse() {
        let q = |qmp: &str, nbd: Option<&str>, qga: Option<&str>| VmSource::Qmp {
            qmp: qmp.into(),
            nbd: nbd.map(PathBuf::from),
            qga: qga.map(PathBuf::from),
        };
        assert_eq!(VmSource::parse("qmp:/run/vm.qmp").unwrap(), q("/run/vm.qmp", None, None));
        assert_eq!(VmSource::parse("qmp:/q,nbd=/n.sock").unwrap(), q("/q", Some("/n.sock"), None));
        assert_eq!(
            VmSource::parse("qmp:/q,qga=/g.sock,nbd=/n.sock").unwrap(),
            q("/q", Some("/n.sock"), Some("/g.sock"))
        );
        assert_eq!(
            VmSource::parse("libvirt:web01").unwrap(),
            VmSource::Libvirt { domain: "web01".into(), uri: "qemu:///system".into() }
        );
        assert_eq!(
            VmSource::parse("libvirt:web01,uri=qemu:///session").unwrap(),
            VmSource::Libvirt { domain: "web01".into(), uri: "qemu:///session".into() }
        );
        for bad in [
            "",
            "qmp:",
            "libvirt:",
            "libvirt:,uri=x",
            "libvirt:d,uri=",
            "libvirt:d,x=y",
            "/q",
            "qmp:/q,nbd=",
            "qmp:/q,qga=",
            "qmp:/q,nbd=/a,nbd=/b",
            "qmp:/q,x=1",
        ] {
            assert!(VmSource::parse(bad).is_err(), "{bad}");
        }
    }
}
