//! `backup --from qmp:SOCKET` and `cleanup`: a running VM's point-in-time view, set up
//! before the backup and torn down after it (blockproof_source::LiveVm).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Result;
use blockproof_core::{BackupReport, CoreError, DiskInput};
use blockproof_format::{Machine, MachineKind, SnapshotStatus};
use blockproof_source::{KeptView, LiveVm};

use crate::args::CleanupArgs;
use crate::Usage;

/// How long a view is kept after a mismatch when `--keep-view` is not given.
pub const DEFAULT_KEEP_VIEW: Duration = Duration::from_secs(3600);

/// A parsed `--from` value.
#[derive(Debug, PartialEq, Eq)]
pub struct VmSource {
    qmp: PathBuf,
    nbd: Option<PathBuf>,
    qga: Option<PathBuf>,
}

impl VmSource {
    pub fn parse(s: &str) -> Result<VmSource, Usage> {
        let bad = || Usage(format!("invalid --from {s:?}: expected qmp:SOCKET[,nbd=PATH][,qga=PATH]"));
        let rest = s.strip_prefix("qmp:").ok_or_else(bad)?;
        let mut parts = rest.split(',');
        let qmp = parts.next().filter(|q| !q.is_empty()).ok_or_else(bad)?;
        let mut source = VmSource { qmp: qmp.into(), nbd: None, qga: None };
        for part in parts {
            let slot = match part.split_once('=') {
                Some(("nbd", _)) => &mut source.nbd,
                Some(("qga", _)) => &mut source.qga,
                _ => return Err(bad()),
            };
            let value = part.split_once('=').map(|(_, v)| v).unwrap_or_default();
            if value.is_empty() || slot.is_some() {
                return Err(bad());
            }
            *slot = Some(value.into());
        }
        Ok(source)
    }

    /// Takes the view of every disk of the VM; another run of the vm from the same state
    /// directory is waited for up to `lock_wait`.
    pub fn start(&self, vm: &str, state_dir: Option<&Path>, lock_wait: Duration) -> Result<Live> {
        let dir = blockproof_source::state_dir(state_dir)?;
        let dir = std::fs::canonicalize(&dir).unwrap_or(dir);
        let vm_view = LiveVm::start(&self.qmp, vm, &dir, self.nbd.as_deref(), self.qga.as_deref(), lock_wait)?;
        Ok(Live { vm: vm_view, dir })
    }
}

/// A view set up for one backup.
pub struct Live {
    vm: LiveVm,
    /// The state directory (absolute).
    dir: PathBuf,
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
    /// each disk's node name, format driver, image file and size (docs/LIVE-VMS.md) —
    /// and how consistent the view is (frozen through the guest agent, or crash-consistent
    /// with the reason).
    pub fn machine(&self) -> Machine {
        let disks: Vec<_> = self
            .vm
            .disks()
            .into_iter()
            .map(|d| serde_json::json!({ "node": d.id, "driver": d.driver, "file": d.filename, "size": d.size }))
            .collect();
        let (consistency, consistency_note) = self.vm.consistency();
        Machine {
            kind: MachineKind::Qmp,
            consistency,
            consistency_note,
            definition: serde_json::json!({ "disks": disks }).to_string(),
            uuid: None,
        }
    }
}

/// Tears the view down after the backup: a committed snapshot (ok or tainted) makes the
/// new bitmaps the base of the next run; a failed backup merges them back. A tainted
/// restore point that was not healed keeps the view for `keep_view` (not zero) instead:
/// returned, with a keeper process started that releases it then. When a failed backup's
/// view cannot be released either (the VM process died, say), the backup's error stays
/// the error and the teardown's is a warning on standard error.
pub fn finish(
    live: Live,
    vm: &str,
    result: Result<BackupReport, CoreError>,
    keep_view: Duration,
) -> Result<(BackupReport, Option<KeptView>)> {
    let recovered = live.vm.recovered();
    match result {
        Ok(mut report) => {
            if let Some(k) = live.vm.released() {
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
                live.vm.finish(true)?;
                return Ok((report, None));
            }
            match live.vm.keep(keep_view, &report.snapshot.to_string()) {
                Ok(kept) => {
                    drop(live.vm); // releases the vm's lock: the keeper takes it later
                    if let Err(e) = spawn_keeper(vm, &live.dir) {
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
                    live.vm.finish(true)?;
                    Ok((report, None))
                }
            }
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
        let plain = VmSource::parse("qmp:/run/vm.qmp").unwrap();
        assert_eq!(plain, VmSource { qmp: "/run/vm.qmp".into(), nbd: None, qga: None });
        let with = VmSource::parse("qmp:/q,nbd=/n.sock").unwrap();
        assert_eq!(with, VmSource { qmp: "/q".into(), nbd: Some("/n.sock".into()), qga: None });
        let both = VmSource::parse("qmp:/q,qga=/g.sock,nbd=/n.sock").unwrap();
        assert_eq!(both, VmSource { qmp: "/q".into(), nbd: Some("/n.sock".into()), qga: Some("/g.sock".into()) });
        for bad in ["", "qmp:", "libvirt:dom", "/q", "qmp:/q,nbd=", "qmp:/q,qga=", "qmp:/q,nbd=/a,nbd=/b", "qmp:/q,x=1"]
        {
            assert!(VmSource::parse(bad).is_err(), "{bad}");
        }
    }
}
