//! A running VM as a source, over QMP (`--from qmp:SOCKET`): every disk node of a QEMU
//! process or qemu-storage-daemon is backed up from a point-in-time view that blockproof
//! sets up, with change tracking from a dirty bitmap it owns, and torn down afterwards.
//!
//! The cycle (docs/LIVE-VMS.md):
//!
//! 1. A journal (`<state dir>/<vm>.journal.json`, directory 0700) is written before each
//!    change to the VM, naming what will exist; a journal left by an earlier run (killed,
//!    crashed) is undone first — exactly what it names, nothing else. All of it under the
//!    vm's [`VmLock`], so a journal is never undone while its run is still going.
//! 2. Per disk, a temporary qcow2 overlay backed by the disk (`blockproof-fleece-<disk>`,
//!    shortened with a hash where QEMU's 31-character node names require)
//!    is added; then one `transaction` takes the view of every disk at once: a new bitmap
//!    `blockproof/<vm>/<disk>/<n>` starts recording, the vm's earlier bitmaps of the disk
//!    stop, and `blockdev-backup sync=none` into the overlay keeps the view as it was.
//! 3. The overlay is exported read-only over NBD (a private unix socket, or the socket of
//!    the NBD server the process already runs) with the bitmap the parent restore point
//!    named: exactly the writes between the parent's view and this one.
//! 4. Once the snapshot is committed the earlier bitmaps are removed: the new one is the
//!    base of the next run. A run that does not commit merges the new bitmap back into
//!    the earlier ones and re-enables them, so no write is ever lost.
//! 5. Teardown removes exports, jobs, overlays, their files, the NBD server it started
//!    and the journal.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use blockproof_nbd::Uri;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::agent::{with_frozen, Timeouts};
use crate::disk::{Base, Owner, ParentCbt};
use crate::kept::{KeptExport, KeptView};
use crate::nbd::BitmapOutcome;
use crate::qemu::qemu_img_create;
use crate::qmp::{Qmp, QmpError, VmDisk};
use crate::{Changes, NbdSource, OpenedDisk, SourceError};
use blockproof_format::Consistency;

/// How long teardown waits for QEMU to finish removing an export or a job.
const TEARDOWN_WAIT: Duration = Duration::from_secs(30);

/// The longest node name QEMU takes.
const NODE_NAME_MAX: usize = 31;

/// The node name of a disk's view overlay: `blockproof-fleece-<disk>`, or, where that is
/// longer than QEMU takes (a disk node name over 13 characters, as libvirt's
/// `libvirt-1-format`), `blockproof-fleece-` and 13 hex digits of the disk's BLAKE3 hash.
fn overlay_node(disk: &str) -> String {
    let plain = format!("blockproof-fleece-{disk}");
    if plain.len() <= NODE_NAME_MAX {
        return plain;
    }
    let hash = blake3::hash(disk.as_bytes()).to_hex();
    format!("blockproof-fleece-{}", &hash[..NODE_NAME_MAX - "blockproof-fleece-".len()])
}

/// What one run set up for one disk.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JournalDisk {
    pub id: String,
    pub node: String,
    pub overlay_node: String,
    pub overlay_file: PathBuf,
    pub job: String,
    pub export: String,
    /// The bitmap this run started.
    pub new_bitmap: String,
    /// The vm's bitmaps of this disk that were recording and that this run stopped.
    pub stopped: Vec<String>,
}

/// Which kind of VM source a journal's run used, so the right teardown undoes it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JournalKind {
    /// `--from qmp:SOCKET`: `qmp`, `nbd_started` and `disks` name what was set up.
    #[default]
    Qmp,
    /// `--from libvirt:DOMAIN`: `libvirt` names what was set up.
    Libvirt,
}

/// The journal of one run: what exists in the VM because of it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Journal {
    pub vm: String,
    /// Absent in journals written before libvirt sources existed: QMP.
    #[serde(default)]
    pub kind: JournalKind,
    #[serde(default)]
    pub qmp: PathBuf,
    /// The NBD server socket blockproof started (`None`: it used the process's own).
    pub nbd_started: Option<PathBuf>,
    pub disks: Vec<JournalDisk>,
    /// The snapshot was committed: the new bitmaps are the base of the next run.
    pub committed: bool,
    /// For [`JournalKind::Libvirt`]: the job, files and checkpoint of the run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub libvirt: Option<crate::libvirt::LibvirtJournal>,
    /// The guest's file systems are (or may be) frozen through this guest agent socket:
    /// set before the freeze, cleared once thawed. Undoing the journal thaws them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frozen: Option<PathBuf>,
    /// The view is kept after a mismatch, for investigation, until released
    /// (docs/LIVE-VMS.md); its bitmaps are already settled as for a committed snapshot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kept: Option<KeptView>,
}

/// The private state directory (created 0700).
pub fn state_dir(explicit: Option<&Path>) -> Result<PathBuf, SourceError> {
    let dir = match explicit {
        Some(d) => d.to_path_buf(),
        None => match std::env::var_os("XDG_STATE_HOME").filter(|v| !v.is_empty()) {
            Some(x) => PathBuf::from(x).join("blockproof"),
            None => match std::env::var_os("HOME") {
                Some(h) => PathBuf::from(h).join(".local/state/blockproof"),
                None => return Err(SourceError::Invalid("no state directory: set --state-dir or HOME".into())),
            },
        },
    };
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .map_err(|source| SourceError::Open { path: dir.clone(), source })?;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
        .map_err(|source| SourceError::Open { path: dir.clone(), source })?;
    Ok(dir)
}

/// Exclusive use of one vm's journal and view in a state directory, for one run or one
/// `cleanup`: an advisory lock (`flock`) of `<state dir>/<vm>.lock`, held until dropped.
/// The kernel releases it when its process dies, so a killed run never leaves it held;
/// the file is removed on release. Another vm's lock is another file: it never conflicts.
#[derive(Debug)]
pub struct VmLock {
    file: std::fs::File,
    path: PathBuf,
}

impl VmLock {
    /// Takes the lock of `vm` in `dir`, trying again for up to `wait` while another
    /// process holds it; then fails naming the vm.
    pub fn take(dir: &Path, vm: &str, wait: Duration) -> Result<VmLock, SourceError> {
        use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
        let path = dir.join(format!("{vm}.lock"));
        let io = |source| SourceError::Open { path: path.clone(), source };
        let deadline = Instant::now() + wait;
        loop {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .mode(0o600)
                .open(&path)
                .map_err(io)?;
            match file.try_lock() {
                Ok(()) => {
                    // The holder before may have removed the file after this one opened
                    // it: only the lock of the file at the path counts.
                    let here = file.metadata().map_err(io)?;
                    match std::fs::metadata(&path) {
                        Ok(m) if (m.dev(), m.ino()) == (here.dev(), here.ino()) => return Ok(VmLock { file, path }),
                        Ok(_) => continue,
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                        Err(e) => return Err(io(e)),
                    }
                }
                Err(std::fs::TryLockError::WouldBlock) if Instant::now() < deadline => {
                    std::thread::sleep(
                        Duration::from_millis(200).min(deadline.saturating_duration_since(Instant::now())),
                    );
                }
                Err(std::fs::TryLockError::WouldBlock) => {
                    return Err(SourceError::Invalid(format!(
                        "vm {vm} is already being backed up or cleaned up on this host (it holds {}): one run per vm \
                         at a time (wait for it, or pass --lock-wait)",
                        path.display()
                    )))
                }
                Err(std::fs::TryLockError::Error(e)) => return Err(io(e)),
            }
        }
    }
}

impl Drop for VmLock {
    fn drop(&mut self) {
        // Removed while still locked: a process waiting for it finds the path gone (or
        // another file there) and tries again.
        let _ = std::fs::remove_file(&self.path);
        let _ = self.file.unlock();
    }
}

fn qmp_err(e: QmpError) -> SourceError {
    SourceError::Qemu(e.to_string())
}

pub(crate) fn journal_path(dir: &Path, vm: &str) -> PathBuf {
    dir.join(format!("{vm}.journal.json"))
}

pub(crate) fn write_journal(dir: &Path, j: &Journal) -> Result<(), SourceError> {
    let path = journal_path(dir, &j.vm);
    let tmp = path.with_extension("tmp");
    let io = |source| SourceError::Open { path: path.clone(), source };
    std::fs::write(&tmp, serde_json::to_vec_pretty(j).expect("a journal serializes")).map_err(io)?;
    std::fs::File::open(&tmp).and_then(|f| f.sync_all()).map_err(io)?;
    std::fs::rename(&tmp, &path).map_err(io)
}

/// Reads the journal a run of `vm` left in `dir`, if any.
pub fn read_journal(dir: &Path, vm: &str) -> Result<Option<Journal>, SourceError> {
    let path = journal_path(dir, vm);
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| SourceError::Invalid(format!("{}: not a blockproof journal: {e}", path.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(SourceError::Open { path, source }),
    }
}

/// `blockproof cleanup`: undoes the journal a run of `vm` left in `dir`, if any, holding
/// the vm's [`VmLock`] (so never the journal of a run that is still going); returns what
/// was done.
pub fn cleanup(dir: &Path, vm: &str) -> Result<Vec<String>, SourceError> {
    let _lock = VmLock::take(dir, vm, Duration::ZERO)?;
    match read_journal(dir, vm)? {
        Some(j) => undo(dir, &j),
        None => Ok(Vec::new()),
    }
}

/// Undoes what a journal names, ignoring what is already gone; returns what was done.
/// The caller holds the vm's [`VmLock`].
pub(crate) fn undo(dir: &Path, j: &Journal) -> Result<Vec<String>, SourceError> {
    let done = match j.kind {
        JournalKind::Libvirt => crate::libvirt::teardown(j)?,
        JournalKind::Qmp => teardown(&mut Qmp::connect(&j.qmp).map_err(qmp_err)?, j)?,
    };
    std::fs::remove_file(journal_path(dir, &j.vm)).map_err(|source| SourceError::Open { path: dir.into(), source })?;
    Ok(done)
}

/// A QMP call whose "not found" answer means the thing is already gone.
fn gone_ok(r: Result<Value, QmpError>) -> Result<bool, SourceError> {
    match r {
        Ok(_) => Ok(true),
        Err(QmpError::Command { .. }) => Ok(false),
        Err(e) => Err(qmp_err(e)),
    }
}

fn wait_until(qmp: &mut Qmp, query: &str, key: &str, id: &str) -> Result<(), SourceError> {
    let deadline = Instant::now() + TEARDOWN_WAIT;
    loop {
        let list = qmp.execute(query, None).map_err(qmp_err)?;
        let present = list.as_array().is_some_and(|a| a.iter().any(|e| e[key] == id));
        if !present {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(SourceError::Qemu(format!(
                "{id} is still listed by {query} after {}s",
                TEARDOWN_WAIT.as_secs()
            )));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Thaws the guest if the journal says it may be frozen, removes exports, jobs, overlays
/// and files; then settles the bitmaps: committed, the vm's earlier ones of each disk go;
/// otherwise the new one is merged back into them and they record again.
fn teardown(qmp: &mut Qmp, j: &Journal) -> Result<Vec<String>, SourceError> {
    let mut done = Vec::new();
    if let Some(agent) = &j.frozen {
        // A run killed between freeze and thaw. A guest agent that does not answer cannot
        // be helped here: said, and the rest is undone (a leftover never blocks the vm).
        match crate::agent::GuestAgent::connect(agent, crate::agent::Timeouts::default()).and_then(|mut a| a.thaw()) {
            Ok(n) => done.push(format!("guest file systems thawed ({n})")),
            Err(e) => done.push(format!("guest file systems: thaw through {} failed ({e})", agent.display())),
        }
    }
    release_view(qmp, j, &mut done)?;
    settle_bitmaps(qmp, j, &mut done)?;
    Ok(done)
}

/// Removes exports, jobs, overlays, their files and the NBD server blockproof started.
fn release_view(qmp: &mut Qmp, j: &Journal, done: &mut Vec<String>) -> Result<(), SourceError> {
    for d in &j.disks {
        if gone_ok(qmp.execute("block-export-del", Some(json!({"id": d.export, "mode": "hard"}))))? {
            done.push(format!("export {}", d.export));
        }
        wait_until(qmp, "query-block-exports", "id", &d.export)?;
        if gone_ok(qmp.execute("block-job-cancel", Some(json!({"device": d.job, "force": true}))))? {
            done.push(format!("job {}", d.job));
        }
        wait_until(qmp, "query-block-jobs", "device", &d.job)?;
        if gone_ok(qmp.execute("blockdev-del", Some(json!({"node-name": d.overlay_node}))))? {
            done.push(format!("overlay {}", d.overlay_node));
        }
        if std::fs::remove_file(&d.overlay_file).is_ok() {
            done.push(format!("file {}", d.overlay_file.display()));
        }
    }
    if j.nbd_started.is_some() && gone_ok(qmp.execute("nbd-server-stop", None))? {
        done.push("nbd server".into());
    }
    if let Some(s) = &j.nbd_started {
        let _ = std::fs::remove_file(s);
    }
    Ok(())
}

/// Committed, the vm's earlier bitmaps of each disk go; otherwise the new one is merged
/// back into the stopped ones and they record again. What is already settled is skipped.
fn settle_bitmaps(qmp: &mut Qmp, j: &Journal, done: &mut Vec<String>) -> Result<(), SourceError> {
    for d in &j.disks {
        let bitmaps = node_bitmaps(qmp, &d.node)?;
        let has = |n: &str| bitmaps.iter().any(|b| b == n);
        if j.committed {
            // Every earlier bitmap of this vm and disk goes, not only the ones this run
            // stopped: one left inconsistent by a killed VM (or disabled by hand) would
            // otherwise stay in the image for ever.
            let owner = Owner { vm: &j.vm, disk: &d.id };
            for old in bitmaps.iter().filter(|n| **n != d.new_bitmap && owner.number(n).is_some()) {
                gone_ok(qmp.execute("block-dirty-bitmap-remove", Some(json!({"node": d.node, "name": old}))))?;
                done.push(format!("bitmap {old} (replaced by {})", d.new_bitmap));
            }
        } else if has(&d.new_bitmap) {
            // Not committed: every write the new bitmap saw goes back where the next
            // run looks for it.
            for old in d.stopped.iter().filter(|n| has(n)) {
                let merge = json!({"node": d.node, "target": old, "bitmaps": [d.new_bitmap]});
                qmp.execute("block-dirty-bitmap-merge", Some(merge)).map_err(qmp_err)?;
                gone_ok(qmp.execute("block-dirty-bitmap-enable", Some(json!({"node": d.node, "name": old}))))?;
            }
            gone_ok(qmp.execute("block-dirty-bitmap-remove", Some(json!({"node": d.node, "name": d.new_bitmap}))))?;
            done.push(format!("bitmap {} (merged back)", d.new_bitmap));
        } else {
            for old in d.stopped.iter().filter(|n| has(n)) {
                gone_ok(qmp.execute("block-dirty-bitmap-enable", Some(json!({"node": d.node, "name": old}))))?;
            }
        }
    }
    Ok(())
}

fn node_bitmaps(qmp: &mut Qmp, node: &str) -> Result<Vec<String>, SourceError> {
    let disks = qmp.disks().map_err(qmp_err)?;
    Ok(disks
        .into_iter()
        .find(|d| d.id == node)
        .map(|d| d.bitmaps.into_iter().map(|b| b.name).collect())
        .unwrap_or_default())
}

/// A running VM's point-in-time view, set up over QMP, until [`LiveVm::finish`].
pub struct LiveVm {
    inner: Arc<Mutex<Inner>>,
}

struct Inner {
    qmp: Qmp,
    dir: PathBuf,
    journal: Journal,
    disks: Vec<VmDisk>,
    nbd_socket: PathBuf,
    /// What undoing an earlier run's journal did.
    recovered: Vec<String>,
    /// The view an earlier run kept after a mismatch, released by this one.
    released: Option<KeptView>,
    /// How consistent the view is, and why not frozen.
    consistency: (Consistency, Option<String>),
    /// Held as long as the view exists.
    _lock: VmLock,
}

impl LiveVm {
    /// Connects, undoes what an earlier run of `vm` left (its journal), and takes the
    /// point-in-time view of every disk. `nbd_socket`: the unix socket of the NBD server
    /// the process already runs (QEMU runs one at most); without it blockproof starts one
    /// on a private socket. `agent`: the guest agent's socket, to freeze the guest's
    /// file systems for the moment the view is taken ([`crate::agent`]).
    ///
    /// It holds the vm's [`VmLock`] until dropped: another run of the vm from this state
    /// directory waits up to `wait` for it, then fails, and never undoes this run's journal.
    pub fn start(
        qmp_path: &Path,
        vm: &str,
        dir: &Path,
        nbd_socket: Option<&Path>,
        agent: Option<&Path>,
        wait: Duration,
    ) -> Result<LiveVm, SourceError> {
        let lock = VmLock::take(dir, vm, wait)?;
        let (recovered, released) = match read_journal(dir, vm)? {
            Some(j) => (undo(dir, &j)?, j.kept),
            None => (Vec::new(), None),
        };
        let mut qmp = Qmp::connect(qmp_path).map_err(qmp_err)?;
        let disks = qmp.disks().map_err(qmp_err)?;
        if disks.is_empty() {
            return Err(SourceError::Invalid(format!("{}: the VM has no disk node", qmp_path.display())));
        }
        let nbd_started = nbd_socket.is_none().then(|| dir.join(format!("{vm}.nbd.sock")));
        let nbd_socket = nbd_socket.map_or_else(|| nbd_started.clone().expect("one of them"), Path::to_path_buf);
        let mut journal = Journal {
            vm: vm.into(),
            kind: JournalKind::Qmp,
            qmp: qmp_path.to_path_buf(),
            nbd_started,
            disks: Vec::new(),
            committed: false,
            libvirt: None,
            frozen: None,
            kept: None,
        };
        for d in &disks {
            let owner = Owner { vm, disk: &d.id };
            let ours: Vec<_> = d.bitmaps.iter().filter(|b| owner.number(&b.name).is_some()).collect();
            let next = ours.iter().filter_map(|b| owner.number(&b.name)).max().unwrap_or(0) + 1;
            journal.disks.push(JournalDisk {
                id: d.id.clone(),
                node: d.id.clone(),
                overlay_node: overlay_node(&d.id),
                overlay_file: dir.join(format!("{vm}.{}.fleece.qcow2", d.id)),
                job: format!("blockproof-{vm}-{}", d.id),
                export: format!("blockproof-{vm}-{}", d.id),
                new_bitmap: owner.bitmap(next),
                stopped: ours.iter().filter(|b| b.recording).map(|b| b.name.clone()).collect(),
            });
        }
        // A view of this vm that this state directory's journal does not name (a run with
        // another state directory, or from another host) is not ours to set up again, nor
        // to tear down: the names would collide.
        let nodes = qmp.execute("query-named-block-nodes", Some(json!({ "flat": true }))).map_err(qmp_err)?;
        let existing: Vec<&str> =
            nodes.as_array().into_iter().flatten().filter_map(|n| n["node-name"].as_str()).collect();
        if let Some(j) = journal.disks.iter().find(|j| existing.contains(&j.overlay_node.as_str())) {
            return Err(SourceError::Invalid(format!(
                "vm {vm}: the process already has a point-in-time view of disk {} ({}), set up by another \
                 blockproof run (another --state-dir, or another host); one run per vm at a time",
                j.id, j.overlay_node
            )));
        }
        // From here on the journal names everything that may exist.
        write_journal(dir, &journal)?;
        let mut inner = Inner {
            qmp,
            dir: dir.to_path_buf(),
            journal,
            disks,
            nbd_socket,
            recovered,
            released,
            consistency: (Consistency::Crash, None),
            _lock: lock,
        };
        if let Err(e) = inner.set_up(agent) {
            let _ = inner.finish(false);
            return Err(e);
        }
        Ok(LiveVm { inner: Arc::new(Mutex::new(inner)) })
    }

    /// The VM's disks (ids are node names).
    pub fn disks(&self) -> Vec<VmDisk> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).disks.clone()
    }

    /// What undoing an earlier run's journal did.
    pub fn recovered(&self) -> Vec<String> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).recovered.clone()
    }

    /// How consistent the view is: `Frozen` when the guest agent froze the guest's file
    /// systems for the moment it was taken; otherwise `Crash`, with the reason.
    pub fn consistency(&self) -> (Consistency, Option<String>) {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).consistency.clone()
    }

    /// The view an earlier run kept after a mismatch, which this run released before it
    /// set up its own.
    pub fn released(&self) -> Option<KeptView> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).released.clone()
    }

    /// A function that opens disk `id` of the view for its owner and parent.
    pub fn opener(&self, id: &str) -> impl FnOnce(&Owner<'_>, Option<&ParentCbt>) -> Result<OpenedDisk, SourceError> {
        let inner = self.inner.clone();
        let id = id.to_string();
        move |owner, parent| inner.lock().unwrap_or_else(|e| e.into_inner()).open(&id, owner, parent)
    }

    /// Tears the view down. `committed`: the snapshot was committed, so the new bitmaps
    /// are the base of the next run; otherwise they are merged back.
    pub fn finish(self, committed: bool) -> Result<(), SourceError> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).finish(committed)
    }

    /// After a committed tainted `snapshot`: settles the bitmaps as for any committed
    /// snapshot but keeps the view (overlays, jobs, exports, the NBD server) for `keep`,
    /// named in the journal as kept. The vm's lock is released with `self`; `cleanup`,
    /// the next run or a keeper ([`crate::release_when_expired`]) releases the view.
    /// On an error the view is still whole and the caller releases it with
    /// [`LiveVm::finish`].
    pub fn keep(&self, keep: Duration, snapshot: &str) -> Result<KeptView, SourceError> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).keep(keep, snapshot)
    }
}

impl Inner {
    fn set_up(&mut self, agent: Option<&Path>) -> Result<(), SourceError> {
        let mut actions = Vec::new();
        for (d, j) in self.disks.iter().zip(&self.journal.disks) {
            qemu_img_create(&j.overlay_file, d.size)?;
            let overlay = json!({
                "driver": "qcow2",
                "node-name": j.overlay_node,
                "file": {"driver": "file", "filename": j.overlay_file},
                "backing": d.id,
            });
            self.qmp.execute("blockdev-add", Some(overlay)).map_err(qmp_err)?;
            // Bitmaps of raw disks cannot persist: they live as long as the process.
            let persistent = d.driver == "qcow2";
            actions.push(json!({"type": "block-dirty-bitmap-add",
                "data": {"node": d.id, "name": j.new_bitmap, "persistent": persistent}}));
            for old in &j.stopped {
                actions.push(json!({"type": "block-dirty-bitmap-disable", "data": {"node": d.id, "name": old}}));
            }
            actions.push(json!({"type": "blockdev-backup", "data": {"job-id": j.job, "device": d.id,
                "target": j.overlay_node, "sync": "none", "auto-finalize": true, "auto-dismiss": true}}));
        }
        // One moment for every disk, with the guest's file systems frozen when its agent
        // answers; the journal says when they may be frozen.
        let (dir, journal, qmp) = (&self.dir, &mut self.journal, &mut self.qmp);
        let ((), consistency, note) = with_frozen(
            agent,
            Timeouts::default(),
            &mut |frozen| {
                journal.frozen = frozen.then(|| agent.expect("frozen through an agent").to_path_buf());
                write_journal(dir, journal)
            },
            || qmp.execute("transaction", Some(json!({ "actions": actions }))).map(drop).map_err(qmp_err),
        )?;
        self.consistency = (consistency, note);
        if let Some(sock) = &self.journal.nbd_started {
            let _ = std::fs::remove_file(sock);
            let addr = json!({"addr": {"type": "unix", "data": {"path": sock}}});
            self.qmp.execute("nbd-server-start", Some(addr)).map_err(|e| match e {
                QmpError::Command { desc, .. } if desc.contains("already running") => SourceError::Invalid(format!(
                    "{}: the process already runs an NBD server; name its unix socket (qmp:SOCKET,nbd=PATH)",
                    self.journal.qmp.display()
                )),
                e => qmp_err(e),
            })?;
        }
        Ok(())
    }

    fn open(&mut self, id: &str, owner: &Owner<'_>, parent: Option<&ParentCbt>) -> Result<OpenedDisk, SourceError> {
        let (d, j) = self
            .disks
            .iter()
            .zip(&self.journal.disks)
            .find(|(d, _)| d.id == id)
            .ok_or_else(|| SourceError::Invalid(format!("the VM has no disk {id}")))?;
        if owner.disk != id {
            return Err(SourceError::Invalid(format!("disk {id} opened as {}", owner.disk)));
        }
        let prev = match parent {
            None => Err("no earlier restore point of this disk".to_string()),
            Some(ParentCbt { state: None, .. }) => Err("the previous restore point recorded no bitmap".to_string()),
            Some(ParentCbt { state: Some(name), .. }) => match d.bitmaps.iter().find(|b| &b.name == name) {
                _ if owner.number(name).is_none() => Err(format!("bitmap {name:?} is not this vm's")),
                None if d.driver != "qcow2" => Err(format!(
                    "bitmap {name:?} is gone: a {} disk keeps no persistent bitmap (the VM process was restarted)",
                    d.driver
                )),
                None => Err(format!("bitmap {name:?} is missing from disk {id}")),
                Some(b) if b.inconsistent => {
                    Err(format!("bitmap {name:?} is inconsistent (the VM was not stopped cleanly)"))
                }
                Some(_) if !j.stopped.contains(name) => Err(format!("bitmap {name:?} was not recording")),
                Some(_) => Ok(name.clone()),
            },
        };
        let mut export = json!({"type": "nbd", "id": j.export, "node-name": j.overlay_node,
            "name": j.export, "writable": false});
        if let Ok(b) = &prev {
            export["bitmaps"] = json!([b]);
        }
        self.qmp.execute("block-export-add", Some(export)).map_err(qmp_err)?;
        let uri = Uri::unix(&self.nbd_socket, &j.export);
        let what = format!("disk {id} of vm {} (point-in-time view)", owner.vm);
        let (mut source, outcome) = NbdSource::connect(&uri, what, prev.as_ref().ok().map(String::as_str), None)?;
        let changes = match (prev, outcome) {
            (Err(reason), _) | (Ok(_), BitmapOutcome::Missing(reason)) => Changes::All { reason },
            (Ok(_), BitmapOutcome::Granted) => Changes::ranges(source.dirty_ranges()?),
        };
        Ok(OpenedDisk {
            source: Box::new(source),
            changes,
            base: Base::Parent,
            cbt_state: Some(j.new_bitmap.clone()),
            after_commit: Default::default(),
        })
    }

    fn keep(&mut self, keep: Duration, snapshot: &str) -> Result<KeptView, SourceError> {
        self.journal.committed = true;
        write_journal(&self.dir, &self.journal)?;
        // Each export carries the parent's bitmap, which keeps that bitmap busy: exported
        // again without it, so the bitmaps settle now, as for any committed snapshot.
        let mut exports = Vec::new();
        for j in &self.journal.disks {
            gone_ok(self.qmp.execute("block-export-del", Some(json!({"id": j.export, "mode": "hard"}))))?;
            wait_until(&mut self.qmp, "query-block-exports", "id", &j.export)?;
            let export = json!({"type": "nbd", "id": j.export, "node-name": j.overlay_node,
                "name": j.export, "writable": false});
            self.qmp.execute("block-export-add", Some(export)).map_err(qmp_err)?;
            exports.push(KeptExport {
                disk: j.id.clone(),
                socket: self.nbd_socket.clone(),
                name: j.export.clone(),
                uri: Uri::unix(&self.nbd_socket, &j.export).to_string(),
            });
        }
        settle_bitmaps(&mut self.qmp, &self.journal, &mut Vec::new())?;
        let kept = KeptView::new(keep, snapshot, exports);
        self.journal.kept = Some(kept.clone());
        write_journal(&self.dir, &self.journal)?;
        Ok(kept)
    }

    fn finish(&mut self, committed: bool) -> Result<(), SourceError> {
        self.journal.committed = committed;
        write_journal(&self.dir, &self.journal)?;
        teardown(&mut self.qmp, &self.journal)?;
        std::fs::remove_file(journal_path(&self.dir, &self.journal.vm))
            .map_err(|source| SourceError::Open { path: self.dir.clone(), source })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlay_node_names_fit_qemu() {
        assert_eq!(overlay_node("vda"), "blockproof-fleece-vda");
        assert_eq!(overlay_node("thirteen-char"), "blockproof-fleece-thirteen-char");
        let long = overlay_node("libvirt-1-format");
        assert_eq!(long.len(), NODE_NAME_MAX);
        assert!(long.starts_with("blockproof-fleece-"), "{long}");
        assert_ne!(long, overlay_node("libvirt-2-format"));
        assert_eq!(long, overlay_node("libvirt-1-format"), "stable");
    }
}
