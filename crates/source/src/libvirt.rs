//! A running libvirt domain as a source (`--from libvirt:DOMAIN[,uri=URI]`), driven
//! through `virsh` ([`crate::virsh`]): every disk of the domain is read from the
//! point-in-time view of libvirt's backup API in pull mode, with change tracking from
//! libvirt checkpoints blockproof owns per vm.
//!
//! The cycle (docs/LIVE-VMS.md), sharing the QMP source's journal, [`VmLock`] and state
//! directory ([`crate::live`]):
//!
//! 1. Under the vm's lock, a journal an earlier run left is undone (any kind).
//! 2. The domain's live XML gives its disks (device `disk`), their ids (serial, wwn or
//!    target dev), its UUID and the user its QEMU runs as; `dumpxml --inactive` gives the
//!    definition the restore point keeps.
//! 3. The journal names the run's private directory, socket, scratch files, job and new
//!    checkpoint `blockproof.<vm>.<n>` before any of them exists.
//! 4. The private directory (mode 0700, owned by QEMU's user) holds the NBD socket and the
//!    scratch files; `virsh backup-begin` starts the pull-mode backup and the checkpoint
//!    at one moment, the file systems frozen around it when the guest agent answers.
//! 5. Each disk is read over NBD; a qcow2 disk incrementally from the checkpoint its
//!    parent restore point recorded (libvirt exports the bitmap of the changes since),
//!    a raw disk (no checkpoint possible) in full, with the reason.
//! 6. Teardown aborts the job, removes the directory; committed, the vm's older
//!    checkpoints are deleted (the new one is the next run's base); not committed, the new
//!    checkpoint is deleted (libvirt merges its bitmap into its parent's: no write lost).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use blockproof_format::Consistency;
use blockproof_nbd::Uri;
use serde::{Deserialize, Serialize};

use crate::disk::{Base, Owner, ParentCbt};
use crate::kept::{KeptExport, KeptView};
use crate::live::{journal_path, read_journal, undo, write_journal, Journal, JournalKind, VmLock};
use crate::nbd::BitmapOutcome;
use crate::virsh::{parse_domain, DomainDisk, Virsh};
use crate::xml;
use crate::{Changes, NbdSource, OpenedDisk, SourceError};

/// How long freezing or thawing the guest's file systems may take.
const AGENT_TIMEOUT: Duration = Duration::from_secs(10);

/// How long teardown waits for libvirt to end an aborted job.
const JOB_WAIT: Duration = Duration::from_secs(30);

/// The change source recorded in the manifest for a libvirt disk.
pub const LIBVIRT_CBT: &str = "libvirt";

/// What one libvirt run set up ([`Journal::libvirt`]).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LibvirtJournal {
    pub uri: String,
    pub domain: String,
    pub uuid: String,
    /// The private directory: socket, scratch files, the XML handed to virsh.
    pub run_dir: PathBuf,
    pub socket: PathBuf,
    /// The checkpoint this run creates (`None`: no disk can carry one).
    pub checkpoint: Option<String>,
    /// A freeze may be in force: teardown thaws.
    pub frozen: bool,
    /// `backup-begin` was (or is about to be) called: teardown aborts the job whose
    /// socket is [`LibvirtJournal::socket`].
    pub job: bool,
}

/// The number of `vm`'s checkpoint `name` (`blockproof.<vm>.<n>`).
fn checkpoint_number(vm: &str, name: &str) -> Option<u64> {
    name.strip_prefix("blockproof.")?.strip_prefix(vm)?.strip_prefix('.')?.parse().ok()
}

fn checkpoint_name(vm: &str, n: u64) -> String {
    format!("blockproof.{vm}.{n}")
}

/// Whether a virsh error says the domain does not exist.
fn domain_gone(e: &SourceError) -> bool {
    let s = e.to_string();
    s.contains("Domain not found") || s.contains("failed to get domain")
}

/// Undoes a libvirt journal: thaws, aborts the job it started, removes its directory,
/// and settles the checkpoints. What is already gone is skipped.
pub(crate) fn teardown(j: &Journal) -> Result<Vec<String>, SourceError> {
    let l =
        j.libvirt.as_ref().ok_or_else(|| SourceError::Invalid("a libvirt journal without its libvirt part".into()))?;
    let virsh = Virsh::new(&l.uri);
    let mut done = Vec::new();
    let exists = match virsh.run(&["domuuid", &l.domain]) {
        Ok(_) => true,
        Err(e) if domain_gone(&e) => false,
        Err(e) => return Err(e),
    };
    if exists && l.frozen && virsh.run_for(&["domfsthaw", &l.domain], AGENT_TIMEOUT).is_ok() {
        done.push(format!("thawed the file systems of domain {}", l.domain));
    }
    if exists && l.job && virsh.has_job(&l.domain)? {
        // Only the job serving this run's socket is this run's.
        if let Ok(x) = virsh.run(&["backup-dumpxml", &l.domain]) {
            let ours = xml::parse(&x)
                .ok()
                .and_then(|b| b.child("server").and_then(|s| s.attr("socket")).map(|s| Path::new(s) == l.socket))
                .unwrap_or(false);
            if ours {
                virsh.run(&["domjobabort", &l.domain])?;
                done.push(format!("backup job of domain {}", l.domain));
                // Another's job is not waited for: only the one aborted here.
                let deadline = Instant::now() + JOB_WAIT;
                while virsh.has_job(&l.domain)? {
                    if Instant::now() > deadline {
                        return Err(SourceError::Libvirt(format!(
                            "domain {} still runs a job {}s after it was aborted",
                            l.domain,
                            JOB_WAIT.as_secs()
                        )));
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        }
    }
    match std::fs::remove_dir_all(&l.run_dir) {
        Ok(()) => done.push(format!("directory {}", l.run_dir.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => return Err(SourceError::Open { path: l.run_dir.clone(), source }),
    }
    if let (true, Some(new)) = (exists, &l.checkpoint) {
        let listed = virsh.checkpoints(&l.domain)?;
        if j.committed {
            delete_older_checkpoints(&virsh, &l.domain, &j.vm, new, &listed, &mut done)?;
        } else if listed.contains(new) {
            // libvirt merges its bitmap into its parent's: the next run still sees every
            // write since the last committed restore point.
            virsh.run(&["checkpoint-delete", &l.domain, new])?;
            done.push(format!("checkpoint {new} (not committed)"));
        }
    }
    Ok(done)
}

/// Committed: the vm's checkpoints older than `new` (of those `listed`) are deleted —
/// `new` is the next run's base.
fn delete_older_checkpoints(
    virsh: &Virsh,
    domain: &str,
    vm: &str,
    new: &str,
    listed: &[String],
    done: &mut Vec<String>,
) -> Result<(), SourceError> {
    let new_n = checkpoint_number(vm, new);
    for old in listed.iter().filter(|c| checkpoint_number(vm, c).is_some_and(|n| Some(n) < new_n)) {
        virsh.run(&["checkpoint-delete", domain, old])?;
        done.push(format!("checkpoint {old} (replaced by {new})"));
    }
    Ok(())
}

/// One disk of the view.
#[derive(Clone, Debug)]
struct ViewDisk {
    disk: DomainDisk,
    /// The checkpoint the export's bitmap counts from, or why the disk is read in full.
    base: Result<String, String>,
    /// The parent restore point's state as given when the view was set up.
    parent_state: Option<String>,
    export: String,
    bitmap: String,
    scratch: PathBuf,
}

/// A running domain's point-in-time view (a libvirt pull-mode backup job), until
/// [`LibvirtVm::finish`].
pub struct LibvirtVm {
    inner: Arc<Mutex<Inner>>,
}

struct Inner {
    dir: PathBuf,
    journal: Journal,
    disks: Vec<ViewDisk>,
    definition: String,
    consistency: (Consistency, Option<String>),
    recovered: Vec<String>,
    /// The view an earlier run kept after a mismatch, released by this one.
    released: Option<KeptView>,
    _lock: VmLock,
}

/// Where private run directories go: QEMU must reach them, so when blockproof runs as
/// root (and QEMU as another user) not under a home or state directory it cannot
/// traverse, but under `/run/blockproof` (mode 0711: others may pass, not list).
fn run_root(state_dir: &Path, qemu_user: Option<(u32, u32)>) -> Result<PathBuf, SourceError> {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    match qemu_user {
        Some((uid, _)) if uid != euid && euid == 0 => {
            use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
            let root = PathBuf::from("/run/blockproof");
            let io = |source| SourceError::Open { path: root.clone(), source };
            std::fs::DirBuilder::new().recursive(true).mode(0o711).create(&root).map_err(io)?;
            std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o711)).map_err(io)?;
            Ok(root)
        }
        Some((uid, _)) if uid != euid => Err(SourceError::Invalid(format!(
            "QEMU runs as uid {uid}: blockproof must run as root (or as that user) to give it a private directory \
             for the backup's socket and scratch files"
        ))),
        _ => Ok(state_dir.to_path_buf()),
    }
}

/// Creates the private directory: 0700, owned by QEMU's user.
fn make_run_dir(path: &Path, qemu_user: Option<(u32, u32)>) -> Result<(), SourceError> {
    use std::os::unix::fs::DirBuilderExt;
    let io = |source| SourceError::Open { path: path.to_path_buf(), source };
    std::fs::DirBuilder::new().mode(0o700).create(path).map_err(io)?;
    if let Some((uid, gid)) = qemu_user {
        std::os::unix::fs::chown(path, Some(uid), Some(gid)).map_err(io)?;
    }
    Ok(())
}

impl LibvirtVm {
    /// Undoes what an earlier run of `vm` left, and takes the point-in-time view of every
    /// disk of `domain`. `parent(id)`: what the parent restore point of disk `id`
    /// recorded (the backup checks in [`LibvirtVm::opener`] that it used the same one).
    pub fn start(
        uri: &str,
        domain: &str,
        vm: &str,
        dir: &Path,
        wait: Duration,
        parent: &dyn Fn(&str) -> Option<ParentCbt>,
    ) -> Result<LibvirtVm, SourceError> {
        let lock = VmLock::take(dir, vm, wait)?;
        let mut floor = 0;
        let (recovered, released) = match read_journal(dir, vm)? {
            Some(j) => {
                if let Some(c) = j.libvirt.as_ref().and_then(|l| l.checkpoint.as_deref()) {
                    floor = checkpoint_number(vm, c).unwrap_or(0);
                }
                (undo(dir, &j)?, j.kept)
            }
            None => (Vec::new(), None),
        };
        let virsh = Virsh::new(uri);
        let live = virsh.run(&["dumpxml", domain])?;
        let dom = parse_domain(&live)?;
        if dom.disks.is_empty() {
            return Err(SourceError::Invalid(format!("domain {domain} has no disk")));
        }
        let definition = virsh.run(&["dumpxml", "--inactive", domain])?;
        let listed = virsh.checkpoints(domain)?;
        let parents: Vec<Option<ParentCbt>> = dom.disks.iter().map(|d| parent(&d.id)).collect();
        let n = listed
            .iter()
            .filter_map(|c| checkpoint_number(vm, c))
            .chain(parents.iter().flatten().filter_map(|p| p.state.as_deref().and_then(|s| checkpoint_number(vm, s))))
            .chain([floor])
            .max()
            .unwrap_or(0)
            + 1;
        let with_bitmap = |d: &DomainDisk| d.format == "qcow2";
        let checkpoint = dom.disks.iter().any(with_bitmap).then(|| checkpoint_name(vm, n));
        let run_dir = run_root(dir, dom.qemu_user)?.join(format!("{vm}.{n}"));
        let socket = run_dir.join("nbd.sock");
        let mut disks = Vec::new();
        for (d, p) in dom.disks.iter().zip(&parents) {
            let base = if !with_bitmap(d) {
                Err(format!(
                    "disk {} is {}: libvirt keeps checkpoints only in qcow2 images, so it is read in full every run",
                    d.target, d.format
                ))
            } else {
                match p {
                    None => Err("no earlier restore point of this disk".to_string()),
                    Some(p) if p.cbt != LIBVIRT_CBT => {
                        Err(format!("the previous restore point used change source {}", p.cbt))
                    }
                    Some(ParentCbt { state: None, .. }) => {
                        Err("the previous restore point recorded no checkpoint".into())
                    }
                    Some(ParentCbt { state: Some(s), .. }) if checkpoint_number(vm, s).is_none() => {
                        Err(format!("checkpoint {s:?} is not this vm's"))
                    }
                    Some(ParentCbt { state: Some(s), .. }) => Ok(s.clone()),
                }
            };
            disks.push(ViewDisk {
                disk: d.clone(),
                base,
                parent_state: p.as_ref().and_then(|p| p.state.clone()),
                export: d.target.clone(),
                bitmap: format!("blockproof-{}", d.target),
                scratch: run_dir.join(format!("{}.scratch.qcow2", d.target)),
            });
        }
        let journal = Journal {
            vm: vm.into(),
            kind: JournalKind::Libvirt,
            libvirt: Some(LibvirtJournal {
                uri: uri.into(),
                domain: domain.into(),
                uuid: dom.uuid.clone(),
                run_dir: run_dir.clone(),
                socket,
                checkpoint,
                frozen: false,
                job: false,
            }),
            ..Journal::default()
        };
        // From here on the journal names everything that may exist.
        write_journal(dir, &journal)?;
        let mut inner = Inner {
            dir: dir.to_path_buf(),
            journal,
            disks,
            definition,
            consistency: (Consistency::Crash, None),
            recovered,
            released,
            _lock: lock,
        };
        let set_up = make_run_dir(&run_dir, dom.qemu_user).and_then(|()| inner.set_up(&virsh, &listed));
        if let Err(e) = set_up {
            let _ = inner.finish(false);
            return Err(e);
        }
        Ok(LibvirtVm { inner: Arc::new(Mutex::new(inner)) })
    }

    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The domain's disks, in its XML's order.
    pub fn disks(&self) -> Vec<DomainDisk> {
        self.inner().disks.iter().map(|d| d.disk.clone()).collect()
    }

    /// What undoing an earlier run's journal did.
    pub fn recovered(&self) -> Vec<String> {
        self.inner().recovered.clone()
    }

    /// Whether the file systems were frozen for the view, and if not, why.
    pub fn consistency(&self) -> (Consistency, Option<String>) {
        self.inner().consistency.clone()
    }

    /// The domain's definition (`virsh dumpxml --inactive`).
    pub fn definition(&self) -> String {
        self.inner().definition.clone()
    }

    /// The domain's UUID.
    pub fn uuid(&self) -> String {
        self.inner().journal.libvirt.as_ref().map(|l| l.uuid.clone()).unwrap_or_default()
    }

    /// A function that opens disk `id` of the view for its owner and parent.
    pub fn opener(&self, id: &str) -> impl FnOnce(&Owner<'_>, Option<&ParentCbt>) -> Result<OpenedDisk, SourceError> {
        let inner = self.inner.clone();
        let id = id.to_string();
        move |owner, parent| inner.lock().unwrap_or_else(|e| e.into_inner()).open(&id, owner, parent)
    }

    /// The view an earlier run kept after a mismatch, which this run released before it
    /// set up its own.
    pub fn released(&self) -> Option<KeptView> {
        self.inner().released.clone()
    }

    /// Tears the view down. `committed`: the snapshot was committed, so the new
    /// checkpoint is the base of the next run; otherwise it is deleted.
    pub fn finish(self, committed: bool) -> Result<(), SourceError> {
        self.inner().finish(committed)
    }

    /// After a committed tainted `snapshot`: settles the checkpoints as for any committed
    /// snapshot (the older ones are deleted; libvirt allows it while the job runs) but
    /// keeps the view — the backup job, its NBD exports and scratch files — for `keep`,
    /// named in the journal as kept. The vm's lock is released with `self`; `cleanup`,
    /// the next run or a keeper ([`crate::release_when_expired`]) releases the view. On
    /// an error the view is still whole and the caller releases it with
    /// [`LibvirtVm::finish`].
    pub fn keep(&self, keep: Duration, snapshot: &str) -> Result<KeptView, SourceError> {
        let mut inner = self.inner();
        let socket = inner.lj().socket.clone();
        let exports = inner
            .disks
            .iter()
            .map(|d| KeptExport {
                disk: d.disk.id.clone(),
                socket: socket.clone(),
                name: d.export.clone(),
                uri: Uri::unix(&socket, &d.export).to_string(),
            })
            .collect();
        inner.journal.committed = true;
        write_journal(&inner.dir, &inner.journal)?;
        let l = inner.lj().clone();
        if let Some(new) = &l.checkpoint {
            let virsh = Virsh::new(&l.uri);
            let listed = virsh.checkpoints(&l.domain)?;
            delete_older_checkpoints(&virsh, &l.domain, &inner.journal.vm, new, &listed, &mut Vec::new())?;
        }
        let kept = KeptView::new(keep, snapshot, exports);
        inner.journal.kept = Some(kept.clone());
        write_journal(&inner.dir, &inner.journal)?;
        Ok(kept)
    }
}

impl Inner {
    fn lj(&mut self) -> &mut LibvirtJournal {
        self.journal.libvirt.as_mut().expect("a libvirt journal")
    }

    /// Redefines missing base checkpoints, freezes if the agent answers, begins the
    /// backup with the new checkpoint, thaws.
    fn set_up(&mut self, virsh: &Virsh, listed: &[String]) -> Result<(), SourceError> {
        let l = self.lj().clone();
        let domain = l.domain.as_str();
        let write = |name: &str, text: String| -> Result<PathBuf, SourceError> {
            let p = l.run_dir.join(name);
            std::fs::write(&p, text).map_err(|source| SourceError::Open { path: p.clone(), source })?;
            Ok(p)
        };
        // A base checkpoint libvirt no longer lists (the domain was recreated: a transient
        // domain's checkpoints end with it, its bitmaps stay in the images) is defined
        // again from its bitmaps, which libvirt checks (--redefine-validate).
        let mut missing: Vec<String> =
            self.disks.iter().filter_map(|d| d.base.as_ref().ok()).filter(|b| !listed.contains(b)).cloned().collect();
        missing.sort();
        missing.dedup();
        for name in missing {
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
            let mut x = format!(
                "<domaincheckpoint><name>{}</name><creationTime>{now}</creationTime><disks>",
                xml::escape(&name)
            );
            for d in &self.disks {
                if d.base.as_ref() == Ok(&name) {
                    x.push_str(&format!(
                        "<disk name='{}' checkpoint='bitmap' bitmap='{}'/>",
                        xml::escape(&d.disk.target),
                        xml::escape(&name)
                    ));
                } else {
                    x.push_str(&format!("<disk name='{}' checkpoint='no'/>", xml::escape(&d.disk.target)));
                }
            }
            x.push_str("</disks></domaincheckpoint>");
            let file = write("redefine.xml", x)?;
            let f = file.to_str().expect("a UTF-8 path");
            if let Err(e) = virsh.run(&["checkpoint-create", domain, f, "--redefine", "--redefine-validate"]) {
                for d in self.disks.iter_mut().filter(|d| d.base.as_ref() == Ok(&name)) {
                    d.base = Err(format!(
                        "checkpoint {name} is unknown to libvirt (the domain was recreated) and could not be defined \
                         again from the disk's bitmap ({e})"
                    ));
                }
            }
        }
        let mut b = format!(
            "<domainbackup mode='pull'>\n  <server transport='unix' socket='{}'/>\n  <disks>\n",
            xml::escape(l.socket.to_str().expect("a UTF-8 path"))
        );
        for d in &self.disks {
            let mode = match &d.base {
                Ok(c) => format!("backupmode='incremental' incremental='{}'", xml::escape(c)),
                Err(_) => "backupmode='full'".into(),
            };
            b.push_str(&format!(
                "    <disk name='{t}' backup='yes' type='file' {mode} exportname='{e}' exportbitmap='{bm}'><scratch file='{s}'/></disk>\n",
                t = xml::escape(&d.disk.target),
                e = xml::escape(&d.export),
                bm = xml::escape(&d.bitmap),
                s = xml::escape(d.scratch.to_str().expect("a UTF-8 path")),
            ));
        }
        b.push_str("  </disks>\n</domainbackup>\n");
        let backup_xml = write("backup.xml", b)?;
        let mut args = vec!["backup-begin".to_string(), domain.to_string(), backup_xml.to_str().expect("UTF-8").into()];
        if let Some(c) = &l.checkpoint {
            let mut x = format!("<domaincheckpoint>\n  <name>{}</name>\n  <disks>\n", xml::escape(c));
            for d in &self.disks {
                let how = if d.disk.format == "qcow2" { "bitmap" } else { "no" };
                x.push_str(&format!("    <disk name='{}' checkpoint='{how}'/>\n", xml::escape(&d.disk.target)));
            }
            x.push_str("  </disks>\n</domaincheckpoint>\n");
            args.push(write("checkpoint.xml", x)?.to_str().expect("UTF-8").into());
        }
        // Freeze for the moment of the view, if the guest agent answers.
        self.lj().frozen = true;
        write_journal(&self.dir, &self.journal)?;
        let frozen = match virsh.run_for(&["domfsfreeze", domain], AGENT_TIMEOUT) {
            Ok(_) => true,
            Err(e) => {
                if e.contains("did not answer") {
                    let _ = virsh.run_for(&["domfsthaw", domain], AGENT_TIMEOUT);
                }
                self.consistency =
                    (Consistency::Crash, Some(format!("crash-consistent: the file systems were not frozen ({e})")));
                false
            }
        };
        if !frozen {
            self.lj().frozen = false;
        }
        self.lj().job = true;
        write_journal(&self.dir, &self.journal)?;
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        let begun = virsh.run(&argv);
        if frozen {
            match virsh.run_for(&["domfsthaw", domain], AGENT_TIMEOUT) {
                Ok(_) => {
                    self.consistency = (Consistency::Frozen, None);
                    self.lj().frozen = false;
                    write_journal(&self.dir, &self.journal)?;
                }
                Err(e) => return Err(SourceError::Libvirt(format!("the file systems could not be thawed: {e}"))),
            }
        }
        begun.map(|_| ())
    }

    fn open(&mut self, id: &str, owner: &Owner<'_>, parent: Option<&ParentCbt>) -> Result<OpenedDisk, SourceError> {
        if owner.disk != id {
            return Err(SourceError::Invalid(format!("disk {id} opened as {}", owner.disk)));
        }
        let socket = self.lj().socket.clone();
        let checkpoint = self.lj().checkpoint.clone();
        let d = self
            .disks
            .iter()
            .find(|d| d.disk.id == id)
            .ok_or_else(|| SourceError::Invalid(format!("the domain has no disk {id}")))?;
        let base = match (&d.base, parent.and_then(|p| p.state.as_ref())) {
            (Ok(_), state) if state != d.parent_state.as_ref() => {
                Err("the parent restore point changed while the view was set up".to_string())
            }
            (b, _) => b.clone(),
        };
        let uri = Uri::unix(&socket, &d.export);
        let what = format!("disk {id} of vm {} (libvirt point-in-time view)", owner.vm);
        let (mut source, outcome) =
            NbdSource::connect(&uri, what, base.as_ref().ok().map(|_| d.bitmap.as_str()), None)?;
        let changes = match (base, outcome) {
            (Err(reason), _) | (Ok(_), BitmapOutcome::Missing(reason)) => Changes::All { reason },
            (Ok(_), BitmapOutcome::Granted) => Changes::ranges(source.dirty_ranges()?),
        };
        Ok(OpenedDisk {
            source: Box::new(source),
            changes,
            base: Base::Parent,
            cbt_state: if d.disk.format == "qcow2" { checkpoint } else { None },
            after_commit: Default::default(),
        })
    }

    fn finish(&mut self, committed: bool) -> Result<(), SourceError> {
        self.journal.committed = committed;
        write_journal(&self.dir, &self.journal)?;
        teardown(&self.journal)?;
        std::fs::remove_file(journal_path(&self.dir, &self.journal.vm))
            .map_err(|source| SourceError::Open { path: self.dir.clone(), source })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checkpoints_are_numbered_per_vm() {
        assert_eq!(checkpoint_name("web01", 3), "blockproof.web01.3");
        assert_eq!(checkpoint_number("web01", "blockproof.web01.3"), Some(3));
        // A vm whose name extends another's never takes its checkpoints.
        assert_eq!(checkpoint_number("a", "blockproof.a.b.3"), None);
        assert_eq!(checkpoint_number("a.b", "blockproof.a.b.3"), Some(3));
        assert_eq!(checkpoint_number("web01", "manual-checkpoint"), None);
    }

    #[test]
    fn journals_without_a_kind_are_qmp_and_libvirt_ones_round_trip() {
        let old = r#"{"vm":"v","qmp":"/q","nbd_started":null,"disks":[],"committed":false}"#;
        let j: Journal = serde_json::from_str(old).unwrap();
        assert_eq!((j.kind, j.libvirt), (JournalKind::Qmp, None));
        let j = Journal {
            vm: "v".into(),
            kind: JournalKind::Libvirt,
            libvirt: Some(LibvirtJournal {
                uri: "qemu:///system".into(),
                checkpoint: Some("blockproof.v.2".into()),
                ..Default::default()
            }),
            ..Journal::default()
        };
        let text = serde_json::to_string(&j).unwrap();
        assert!(text.contains(r#""kind":"libvirt""#), "{text}");
        assert_eq!(serde_json::from_str::<Journal>(&text).unwrap(), j);
    }
}
