//! `backup --from qmp:SOCKET | libvirt:DOMAIN` and `cleanup`: a running VM's
//! point-in-time view, set up before the backup and torn down after it
//! (blockproof_source::LiveVm over QMP, blockproof_source::LibvirtVm through virsh).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Result;
use blockproof_core::{BackupReport, CoreError, DiskInput};
use blockproof_format::{Consistency, Machine, MachineKind};
use blockproof_repo::Repository;
use blockproof_source::{LibvirtVm, LiveVm, ParentCbt};

use crate::args::CleanupArgs;
use crate::Usage;

const SYNTAX: &str = "expected qmp:SOCKET[,nbd=PATH] or libvirt:DOMAIN[,uri=URI]";

/// A parsed `--from` value.
#[derive(Debug, PartialEq, Eq)]
pub enum VmSource {
    Qmp { qmp: PathBuf, nbd: Option<PathBuf> },
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
        let (qmp, nbd) = match rest.split_once(",nbd=") {
            Some((q, n)) => (q, Some(n)),
            None => (rest, None),
        };
        if qmp.is_empty() || nbd.is_some_and(str::is_empty) {
            return Err(bad());
        }
        Ok(VmSource::Qmp { qmp: qmp.into(), nbd: nbd.map(PathBuf::from) })
    }

    /// Takes the view of every disk of the VM; another run of the vm from the same state
    /// directory is waited for up to `lock_wait`. `repo`: where the parent restore points
    /// are (libvirt begins its backup job incrementally from their checkpoints).
    pub fn start(&self, repo: &Repository, vm: &str, state_dir: Option<&Path>, lock_wait: Duration) -> Result<Live> {
        let dir = blockproof_source::state_dir(state_dir)?;
        match self {
            VmSource::Qmp { qmp, nbd } => {
                let vm_view = LiveVm::start(qmp, vm, &dir, nbd.as_deref(), lock_wait)?;
                Ok(Live::Qmp(vm_view))
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
                Ok(Live::Libvirt(LibvirtVm::start(uri, domain, vm, &dir, lock_wait, &parent)?))
            }
        }
    }
}

/// A view set up for one backup.
pub enum Live {
    Qmp(LiveVm),
    Libvirt(LibvirtVm),
}

impl Live {
    /// One disk input per disk of the VM: by node name (QMP), by serial, wwn or target
    /// dev (libvirt).
    pub fn inputs(&self) -> Vec<DiskInput> {
        match self {
            Live::Qmp(vm) => vm
                .disks()
                .into_iter()
                .map(|d| DiskInput {
                    id: d.id.clone(),
                    cbt: "qmp".into(),
                    open: Box::new(vm.opener(&d.id)),
                    verify: None,
                })
                .collect(),
            Live::Libvirt(vm) => vm
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
    /// domain's XML (`virsh dumpxml --inactive`) and UUID, and whether the guest agent
    /// froze the file systems for the view (docs/LIVE-VMS.md).
    pub fn machine(&self) -> Machine {
        match self {
            Live::Qmp(vm) => {
                let disks: Vec<_> = vm
                    .disks()
                    .into_iter()
                    .map(
                        |d| serde_json::json!({ "node": d.id, "driver": d.driver, "file": d.filename, "size": d.size }),
                    )
                    .collect();
                Machine {
                    kind: MachineKind::Qmp,
                    consistency: Consistency::Crash,
                    consistency_note: Some("no guest agent was asked to freeze the file systems".into()),
                    definition: serde_json::json!({ "disks": disks }).to_string(),
                    uuid: None,
                }
            }
            Live::Libvirt(vm) => {
                let (consistency, note) = vm.consistency();
                Machine {
                    kind: MachineKind::Libvirt,
                    consistency: match consistency {
                        blockproof_source::Consistency::Frozen => Consistency::Frozen,
                        blockproof_source::Consistency::Crash => Consistency::Crash,
                    },
                    consistency_note: note,
                    definition: vm.definition(),
                    uuid: Some(vm.uuid()),
                }
            }
        }
    }

    fn recovered(&self) -> Vec<String> {
        match self {
            Live::Qmp(vm) => vm.recovered(),
            Live::Libvirt(vm) => vm.recovered(),
        }
    }

    fn finish(self, committed: bool) -> Result<(), blockproof_source::SourceError> {
        match self {
            Live::Qmp(vm) => vm.finish(committed),
            Live::Libvirt(vm) => vm.finish(committed),
        }
    }
}

/// Tears the view down after the backup: a committed snapshot (ok or tainted) makes the
/// new bitmaps the base of the next run; a failed backup merges them back. When a failed
/// backup's view cannot be released either (the VM process died, say), the backup's error
/// stays the error and the teardown's is a warning on standard error.
pub fn finish(live: Live, vm: &str, result: Result<BackupReport, CoreError>) -> Result<BackupReport> {
    let recovered = live.recovered();
    match result {
        Ok(mut report) => {
            live.finish(true)?;
            report.warnings.extend(recovered.into_iter().map(|r| format!("cleaned up after an earlier run: {r}")));
            Ok(report)
        }
        Err(e) => {
            // The backup's error is what the user must see; a teardown failure is left
            // in the journal for the next run, and said.
            if let Err(t) = live.finish(false) {
                eprintln!(
                    "warning: the point-in-time view of vm {vm} was not released ({t}); the next run or `blockproof cleanup --vm {vm}` undoes it"
                );
            }
            Err(e.into())
        }
    }
}

/// `blockproof cleanup --vm NAME`: undoes the journal an interrupted backup left.
pub fn cleanup(a: CleanupArgs) -> Result<u8> {
    let dir = blockproof_source::state_dir(a.state_dir.as_deref())?;
    let done = blockproof_source::cleanup(&dir, &a.vm)?;
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
        assert_eq!(VmSource::parse("qmp:/run/vm.qmp").unwrap(), VmSource::Qmp { qmp: "/run/vm.qmp".into(), nbd: None });
        let with = VmSource::parse("qmp:/q,nbd=/n.sock").unwrap();
        assert_eq!(with, VmSource::Qmp { qmp: "/q".into(), nbd: Some("/n.sock".into()) });
        assert_eq!(
            VmSource::parse("libvirt:web01").unwrap(),
            VmSource::Libvirt { domain: "web01".into(), uri: "qemu:///system".into() }
        );
        assert_eq!(
            VmSource::parse("libvirt:web01,uri=qemu:///session").unwrap(),
            VmSource::Libvirt { domain: "web01".into(), uri: "qemu:///session".into() }
        );
        for bad in ["", "qmp:", "libvirt:", "libvirt:,uri=x", "libvirt:d,uri=", "libvirt:d,x=y", "/q", "qmp:/q,nbd="] {
            assert!(VmSource::parse(bad).is_err(), "{bad}");
        }
    }
}
