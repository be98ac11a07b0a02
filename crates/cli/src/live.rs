//! `backup --from qmp:SOCKET` and `cleanup`: a running VM's point-in-time view, set up
//! before the backup and torn down after it (blockproof_source::LiveVm).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Result;
use blockproof_core::{BackupReport, CoreError, DiskInput};
use blockproof_format::{Consistency, Machine, MachineKind};
use blockproof_source::LiveVm;

use crate::args::CleanupArgs;
use crate::Usage;

/// A parsed `--from` value.
#[derive(Debug, PartialEq, Eq)]
pub struct VmSource {
    qmp: PathBuf,
    nbd: Option<PathBuf>,
}

impl VmSource {
    pub fn parse(s: &str) -> Result<VmSource, Usage> {
        let rest = s
            .strip_prefix("qmp:")
            .ok_or_else(|| Usage(format!("invalid --from {s:?}: expected qmp:SOCKET[,nbd=PATH]")))?;
        let (qmp, nbd) = match rest.split_once(",nbd=") {
            Some((q, n)) => (q, Some(n)),
            None => (rest, None),
        };
        if qmp.is_empty() || nbd.is_some_and(str::is_empty) {
            return Err(Usage(format!("invalid --from {s:?}: expected qmp:SOCKET[,nbd=PATH]")));
        }
        Ok(VmSource { qmp: qmp.into(), nbd: nbd.map(PathBuf::from) })
    }

    /// Takes the view of every disk of the VM; another run of the vm from the same state
    /// directory is waited for up to `lock_wait`.
    pub fn start(&self, vm: &str, state_dir: Option<&Path>, lock_wait: Duration) -> Result<Live> {
        let dir = blockproof_source::state_dir(state_dir)?;
        let vm_view = LiveVm::start(&self.qmp, vm, &dir, self.nbd.as_deref(), lock_wait)?;
        Ok(Live { vm: vm_view })
    }
}

/// A view set up for one backup.
pub struct Live {
    vm: LiveVm,
}

impl Live {
    /// One disk input per disk of the VM, by node name.
    pub fn inputs(&self) -> Vec<DiskInput> {
        self.vm
            .disks()
            .into_iter()
            .map(|d| DiskInput {
                id: d.id.clone(),
                cbt: "qmp".into(),
                open: Box::new(self.vm.opener(&d.id)),
                verify: None,
            })
            .collect()
    }

    /// The VM as the restore point keeps it: for QMP, the block graph blockproof saw —
    /// each disk's node name, format driver, image file and size (docs/LIVE-VMS.md).
    pub fn machine(&self) -> Machine {
        let disks: Vec<_> = self
            .vm
            .disks()
            .into_iter()
            .map(|d| serde_json::json!({ "node": d.id, "driver": d.driver, "file": d.filename, "size": d.size }))
            .collect();
        Machine {
            kind: MachineKind::Qmp,
            consistency: Consistency::Crash,
            consistency_note: Some("no guest agent was asked to freeze the file systems".into()),
            definition: serde_json::json!({ "disks": disks }).to_string(),
            uuid: None,
        }
    }
}

/// Tears the view down after the backup: a committed snapshot (ok or tainted) makes the
/// new bitmaps the base of the next run; a failed backup merges them back. When a failed
/// backup's view cannot be released either (the VM process died, say), the backup's error
/// stays the error and the teardown's is a warning on standard error.
pub fn finish(live: Live, vm: &str, result: Result<BackupReport, CoreError>) -> Result<BackupReport> {
    let recovered = live.vm.recovered();
    match result {
        Ok(mut report) => {
            live.vm.finish(true)?;
            report.warnings.extend(recovered.into_iter().map(|r| format!("cleaned up after an earlier run: {r}")));
            Ok(report)
        }
        Err(e) => {
            // The backup's error is what the user must see; a teardown failure is left
            // in the journal for the next run, and said.
            if let Err(t) = live.vm.finish(false) {
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
        assert_eq!(VmSource::parse("qmp:/run/vm.qmp").unwrap(), VmSource { qmp: "/run/vm.qmp".into(), nbd: None });
        let with = VmSource::parse("qmp:/q,nbd=/n.sock").unwrap();
        assert_eq!(with, VmSource { qmp: "/q".into(), nbd: Some("/n.sock".into()) });
        for bad in ["", "qmp:", "libvirt:dom", "/q", "qmp:/q,nbd="] {
            assert!(VmSource::parse(bad).is_err(), "{bad}");
        }
    }
}
