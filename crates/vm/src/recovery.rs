//! Instant recovery: a VM started at once from a restore point, its disks copied to local
//! images while it runs (the crate doc has the model and the invariants).

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use blockproof_nbd::Exports;
use blockproof_source::Qmp;
use blockproof_work::Cancel;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::export_server::{ExportServer, StopServer};
use crate::journal::{sync_dir, DirLock, Journal, JournalDisk, Machine, RecoveryState, JOURNAL_VERSION};
use crate::qemu::{
    accelerator, command, create_overlay, firmware_args, kill_group, last_line, option_value, spawn_error, Tie,
};
use crate::{AccelChoice, Accelerator, Boot, Firmware, VmError};

/// The NBD server's socket in the recovery directory (the images' backing files).
pub const NBD_SOCKET: &str = "nbd.sock";
/// blockproof's own QMP socket of the VM.
const OWN_QMP: &str = "blockproof-qmp.sock";
/// The QMP socket left for the user (and their tools) while and after the copy runs.
pub const USER_QMP: &str = "qmp.sock";
/// The VM's serial console (ttyS0), appended to.
pub const CONSOLE: &str = "console.log";
/// QEMU's standard error, appended to.
pub const QEMU_LOG: &str = "qemu.log";
/// How long the VM's reads of data not yet copied wait for the backup to come back (a
/// `recover --resume`) after the command that served it went away; after that they fail
/// in the guest until it is back.
pub const RECONNECT_DELAY_SECS: u64 = 300;
/// How often the copy is looked at.
const POLL: Duration = Duration::from_millis(250);
/// How long a QMP command may take.
const QMP_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a starting QEMU gets to open its QMP socket.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long, from its first failure in a run, the failed copy of a disk is started again
/// (QEMU's NBD client tries to reconnect with growing pauses, up to 16 s).
const RETRY_WINDOW: Duration = Duration::from_secs(120);
/// The longest socket path a `sockaddr_un` holds.
const SOCKET_PATH_MAX: usize = 107;

/// A recovery to start: the restore point, its disks and the VM's shape.
#[derive(Clone, Debug)]
pub struct NewRecovery {
    pub repository: String,
    pub snapshot: String,
    pub vm: String,
    /// RFC 3339 (UTC), for the journal.
    pub created: String,
    /// `(id, size)` in the VM's disk order: the first one boots.
    pub disks: Vec<(String, u64)>,
    pub memory_mib: u64,
    pub cpus: u32,
    pub accel: AccelChoice,
    pub firmware: Firmware,
    pub boot: Boot,
    pub extra_args: Vec<String>,
}

/// How one run of the copy goes.
#[derive(Clone, Debug)]
pub struct CopyOptions {
    /// Bytes per second per disk (QEMU's job throttle); `None`: as fast as it goes.
    pub speed: Option<u64>,
    /// Stops the copy (the VM keeps running: [`VmError::Cancelled`]).
    pub cancel: Cancel,
    pub qemu: PathBuf,
    pub qemu_img: PathBuf,
}

/// What a run reports as it goes.
#[derive(Clone, Debug, PartialEq)]
pub enum RecoveryEvent<'a> {
    /// This run started QEMU; `again`: a QEMU of this recovery ran before (it was gone).
    VmStarted {
        pid: u32,
        again: bool,
    },
    /// The VM of an earlier run still runs; this run carries its copy on.
    VmFound {
        pid: Option<u32>,
    },
    /// Bytes copied so far of all the disks (copied disks count whole).
    Copying {
        done: u64,
        total: u64,
    },
    DiskCopied {
        id: &'a str,
    },
}

/// What one run did.
#[derive(Clone, Debug, PartialEq)]
pub struct RecoveryOutcome {
    /// Whether this run started QEMU (a new recovery, or one whose VM was gone).
    pub vm_started: bool,
    pub qemu_pid: Option<u32>,
    /// Seconds from the run's start to QEMU answering on QMP, when this run started it.
    pub vm_start_seconds: Option<f64>,
    /// The disks whose copy this run finished.
    pub copied: Vec<String>,
    pub seconds: f64,
}

/// One recovery directory, locked while the value lives.
pub struct Recovery {
    dir: PathBuf,
    journal: Journal,
    _lock: DirLock,
}

impl Recovery {
    /// Prepares a new recovery in `dir` (created; it must be empty if it exists): the
    /// kernel files of a direct boot and the journal. Nothing runs yet: [`Recovery::run`].
    pub fn create(dir: &Path, new: NewRecovery) -> Result<Recovery, VmError> {
        let dir = absolute(dir)?;
        match fs::read_dir(&dir) {
            Ok(mut entries) => {
                if entries.next().is_some() {
                    return Err(VmError::DirNotEmpty(dir));
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                fs::create_dir_all(&dir).map_err(VmError::io(format!("cannot create {}", dir.display())))?;
            }
            Err(e) => return Err(VmError::io(format!("cannot read {}", dir.display()))(e)),
        }
        // The images hold the VM's data: for its owner only.
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o700))
            .map_err(VmError::io(format!("cannot restrict {}", dir.display())))?;
        let lock = DirLock::take(&dir)?;
        // Another `recover` may have filled the directory between the look above and
        // the lock: only the lock file may be there now.
        let others = fs::read_dir(&dir)
            .map_err(VmError::io(format!("cannot read {}", dir.display())))?
            .filter_map(Result::ok)
            .any(|e| e.file_name() != crate::journal::LOCK_FILE);
        if others {
            return Err(VmError::DirNotEmpty(dir));
        }
        let accelerator = accelerator(new.accel)?;
        let (kernel, initrd, append) = match new.boot {
            Boot::Firmware => (false, false, None),
            Boot::Kernel { kernel, initrd, append } => {
                write_new(&dir.join("kernel"), &kernel)?;
                if let Some(i) = &initrd {
                    write_new(&dir.join("initrd"), i)?;
                }
                (true, initrd.is_some(), Some(append))
            }
        };
        let mut images: Vec<String> = Vec::new();
        for (i, (id, _)) in new.disks.iter().enumerate() {
            let safe: String =
                id.chars().map(|c| if c.is_ascii_alphanumeric() || "._-".contains(c) { c } else { '_' }).collect();
            let mut name = format!("{safe}.qcow2");
            if images.contains(&name) || safe.starts_with('.') {
                name = format!("disk{i}-{safe}.qcow2");
            }
            images.push(name);
        }
        let journal = Journal {
            version: JOURNAL_VERSION,
            repository: new.repository,
            snapshot: new.snapshot,
            vm: new.vm,
            created: new.created,
            disks: new
                .disks
                .into_iter()
                .zip(images)
                .map(|((id, size), image)| JournalDisk { id, size, image, copied: false })
                .collect(),
            machine: Machine {
                memory_mib: new.memory_mib,
                cpus: new.cpus,
                accelerator,
                firmware: new.firmware,
                kernel,
                initrd,
                append,
                extra_args: new.extra_args,
            },
            qemu_pid: None,
            state: RecoveryState::Copying,
        };
        journal.save(&dir)?;
        Ok(Recovery { dir, journal, _lock: lock })
    }

    /// Opens the recovery in `dir` to carry it on (or to look at it).
    pub fn open(dir: &Path) -> Result<Recovery, VmError> {
        let dir = absolute(dir)?;
        if !dir.join(crate::journal::JOURNAL_FILE).exists() {
            return Err(VmError::NoRecovery(dir));
        }
        let lock = DirLock::take(&dir)?;
        let journal = Journal::load(&dir)?;
        Ok(Recovery { dir, journal, _lock: lock })
    }

    pub fn journal(&self) -> &Journal {
        &self.journal
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Runs the recovery until every disk is a standalone local image: serves `exports`
    /// (the restore point's disks by id), starts the VM unless it still runs, starts or
    /// carries on the copy of each disk, and waits for it. The VM keeps running when
    /// this returns, whatever it returns.
    pub fn run(
        &mut self,
        exports: &Exports<'_>,
        opts: &CopyOptions,
        events: &mut dyn FnMut(RecoveryEvent<'_>),
    ) -> Result<RecoveryOutcome, VmError> {
        let started = Instant::now();
        if self.journal.state == RecoveryState::Complete {
            return Ok(RecoveryOutcome {
                vm_started: false,
                qemu_pid: self.journal.qemu_pid,
                vm_start_seconds: None,
                copied: Vec::new(),
                seconds: 0.0,
            });
        }
        if let Some(d) = self.journal.disks.iter().find(|d| !exports.iter().any(|(id, _)| id == &d.id)) {
            return Err(VmError::MissingExport(d.id.clone()));
        }
        let socket = self.dir.join(NBD_SOCKET);
        remove_stale(&socket)?;
        let server = ExportServer::bind(&socket).map_err(VmError::io("cannot listen for the VM"))?;
        let outcome = std::thread::scope(|s| {
            let _stop = StopServer(&server);
            s.spawn(|| server.run(exports));
            self.copy(&socket, opts, events, started)
        });
        // Nobody serves it any more (a resume binds it again).
        let _ = fs::remove_file(&socket);
        outcome
    }

    fn copy(
        &mut self,
        socket: &Path,
        opts: &CopyOptions,
        events: &mut dyn FnMut(RecoveryEvent<'_>),
        started: Instant,
    ) -> Result<RecoveryOutcome, VmError> {
        for i in 0..self.journal.disks.len() {
            let image = self.journal.image(&self.dir, i);
            if !image.exists() {
                // Made under another name and renamed: a crash never leaves half an image.
                let tmp = self.dir.join(format!("{}.tmp", self.journal.disks[i].image));
                let d = &self.journal.disks[i];
                create_overlay(&opts.qemu_img, &d.id, d.size, socket, &tmp)?;
                fs::rename(&tmp, &image).map_err(VmError::io(format!("cannot create {}", image.display())))?;
            }
        }
        sync_dir(&self.dir)?;

        let own = self.dir.join(OWN_QMP);
        let mut vm_started = false;
        let mut vm_start_seconds = None;
        let (mut qmp, mut child) = match Qmp::connect_within(&own, QMP_TIMEOUT) {
            Ok(qmp) => {
                events(RecoveryEvent::VmFound { pid: self.journal.qemu_pid });
                (qmp, None)
            }
            Err(_) => {
                if let Some(pid) = self.journal.qemu_pid.filter(|&p| runs_here(p, &self.dir)) {
                    return Err(VmError::VmUnreachable { pid, socket: own });
                }
                let again = self.journal.qemu_pid.is_some();
                let (qmp, child) = self.start_vm(opts)?;
                vm_started = true;
                vm_start_seconds = Some(started.elapsed().as_secs_f64());
                events(RecoveryEvent::VmStarted { pid: child.id(), again });
                (qmp, Some(child))
            }
        };

        let mut copied_now = Vec::new();
        let mut streaming = vec![false; self.journal.disks.len()];
        let mut failing_since: Vec<Option<Instant>> = vec![None; self.journal.disks.len()];
        let mut restart_at: Vec<Option<Instant>> = vec![None; self.journal.disks.len()];
        let jobs = query_jobs(&mut qmp)?;
        for (i, streams) in streaming.iter_mut().enumerate() {
            if self.journal.disks[i].copied {
                continue;
            }
            match jobs.iter().find(|j| j.id == job_id(i)) {
                Some(j) if j.status == "concluded" => dismiss(&mut qmp, i)?,
                Some(_) => {
                    // An earlier run's copy goes on, at this run's speed.
                    let speed = opts.speed.unwrap_or(0);
                    qmp.execute("block-job-set-speed", Some(json!({ "device": job_id(i), "speed": speed })))?;
                    *streams = true;
                    continue;
                }
                None => {}
            }
            if has_backing(&mut qmp, i)? {
                stream(&mut qmp, i, opts.speed)?;
                *streams = true;
            } else {
                self.finish_disk(&mut qmp, i)?;
                copied_now.push(self.journal.disks[i].id.clone());
                events(RecoveryEvent::DiskCopied { id: &self.journal.disks[i].id });
            }
        }

        loop {
            if opts.cancel.is_cancelled() {
                cancel_jobs(&mut qmp, &streaming);
                return Err(VmError::Cancelled(opts.cancel.reason().unwrap_or_else(|| "cancelled".into())));
            }
            if let Some(c) = &mut child {
                if let Some(status) = c.try_wait().map_err(VmError::io("waiting for QEMU"))? {
                    return Err(self.vm_stopped(format!("QEMU ended ({status})")));
                }
            }
            let jobs = match query_jobs(&mut qmp) {
                Ok(jobs) => jobs,
                Err(e) if self.journal.qemu_pid.is_none_or(|p| !runs_here(p, &self.dir)) => {
                    return Err(self.vm_stopped(e.to_string()))
                }
                Err(e) => return Err(e),
            };
            let mut done = 0;
            let mut total = 0;
            for (i, d) in self.journal.disks.iter().enumerate() {
                match jobs.iter().find(|j| j.id == job_id(i)) {
                    Some(j) if !d.copied => {
                        done += j.current_progress;
                        total += j.total_progress.max(j.current_progress);
                    }
                    _ => {
                        done += if d.copied { d.size } else { 0 };
                        total += d.size;
                    }
                }
            }
            events(RecoveryEvent::Copying { done, total });
            for j in jobs.iter().filter(|j| j.status == "concluded") {
                let Some(i) = (0..self.journal.disks.len()).find(|&i| j.id == job_id(i) && streaming[i]) else {
                    continue;
                };
                dismiss(&mut qmp, i)?;
                streaming[i] = false;
                if let Some(why) = &j.error {
                    // A read that failed while the backup was away (QEMU fails the reads
                    // that wait for a reconnect when its graph is drained, and fails new
                    // ones until its client is connected again) ends the job; a new one,
                    // a second later, goes on from what the image holds.
                    let since = *failing_since[i].get_or_insert_with(Instant::now);
                    if since.elapsed() > RETRY_WINDOW {
                        return Err(VmError::Copy { disk: self.journal.disks[i].id.clone(), why: why.clone() });
                    }
                    restart_at[i] = Some(Instant::now() + Duration::from_secs(1));
                    continue;
                }
                if has_backing(&mut qmp, i)? {
                    return Err(VmError::Copy {
                        disk: self.journal.disks[i].id.clone(),
                        why: "the copy ended but the image still has the backup as its backing file".into(),
                    });
                }
                self.finish_disk(&mut qmp, i)?;
                copied_now.push(self.journal.disks[i].id.clone());
                events(RecoveryEvent::DiskCopied { id: &self.journal.disks[i].id });
            }
            for (i, at) in restart_at.iter_mut().enumerate() {
                if at.is_some_and(|at| at <= Instant::now()) {
                    *at = None;
                    stream(&mut qmp, i, opts.speed)?;
                    streaming[i] = true;
                }
            }
            if self.journal.disks.iter().all(|d| d.copied) {
                break;
            }
            std::thread::sleep(POLL);
        }
        self.journal.state = RecoveryState::Complete;
        self.journal.save(&self.dir)?;
        // The backup is no longer used: its socket goes with the server.
        Ok(RecoveryOutcome {
            vm_started,
            qemu_pid: self.journal.qemu_pid,
            vm_start_seconds,
            copied: copied_now,
            seconds: started.elapsed().as_secs_f64(),
        })
    }

    /// Disk `i`'s copy is complete: its image is flushed (the copied data and the header
    /// without a backing file reach the disk before the journal says so), the backup's
    /// node is removed from the VM, and the journal records it.
    fn finish_disk(&mut self, qmp: &mut Qmp, i: usize) -> Result<(), VmError> {
        let out = qmp
            .execute("human-monitor-command", Some(json!({ "command-line": format!("qemu-io {} flush", node(i)) })))?;
        let out = out.as_str().unwrap_or_default().trim();
        if !out.is_empty() {
            return Err(VmError::Copy { disk: self.journal.disks[i].id.clone(), why: format!("flush: {out}") });
        }
        let nodes: Vec<Value> = qmp.execute_as("query-named-block-nodes", Some(json!({ "flat": true })))?;
        if nodes.iter().any(|n| n["node-name"] == backup_node(i).as_str()) {
            qmp.execute("blockdev-del", Some(json!({ "node-name": backup_node(i) })))?;
        }
        self.journal.disks[i].copied = true;
        self.journal.save(&self.dir)
    }

    /// Starts QEMU for the journal's VM: images that still need the backup get it as
    /// their backing node (an NBD client that waits for the server to come back), the
    /// others are opened alone. Returns once QEMU answers on QMP.
    fn start_vm(&mut self, opts: &CopyOptions) -> Result<(Qmp, Child), VmError> {
        let own = self.dir.join(OWN_QMP);
        let user = self.dir.join(USER_QMP);
        remove_stale(&own)?;
        remove_stale(&user)?;
        let mut backing = Vec::new();
        for i in 0..self.journal.disks.len() {
            let image = self.journal.image(&self.dir, i);
            backing.push(image_has_backing(&image).map_err(VmError::io(format!("cannot read {}", image.display())))?);
        }
        let mut args = firmware_args(self.journal.machine.firmware, &self.dir.join("uefi-vars.fd"))?;
        args.extend(qemu_args(&self.dir, &self.journal, &backing));
        let append = |name: &str| {
            let path = self.dir.join(name);
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .map_err(VmError::io(format!("cannot open {}", path.display())))
        };
        append(CONSOLE)?;
        let log = append(QEMU_LOG)?;
        let mut cmd = command(&opts.qemu, Tie::OwnSession);
        cmd.args(&args).current_dir(&self.dir).stdin(Stdio::null()).stdout(Stdio::null()).stderr(log);
        let mut child = cmd.spawn().map_err(|source| spawn_error(&opts.qemu, source))?;
        self.journal.qemu_pid = Some(child.id());
        self.journal.save(&self.dir)?;
        let asked = Instant::now();
        loop {
            if let Some(status) = child.try_wait().map_err(VmError::io("waiting for QEMU"))? {
                return Err(VmError::VmFailed(format!("QEMU ended ({status}){}", last_line(&self.dir.join(QEMU_LOG)))));
            }
            if own.exists() {
                if let Ok(qmp) = Qmp::connect_within(&own, QMP_TIMEOUT) {
                    return Ok((qmp, child));
                }
            }
            if asked.elapsed() > START_TIMEOUT || opts.cancel.is_cancelled() {
                kill_group(&mut child);
                return Err(VmError::VmFailed(format!(
                    "QEMU did not answer on {} within {}s; it was stopped",
                    own.display(),
                    START_TIMEOUT.as_secs()
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn vm_stopped(&self, why: String) -> VmError {
        VmError::VmStopped { why, dir: self.dir.clone() }
    }
}

/// QEMU's command line for the journal's VM; `backing[i]`: disk `i` still needs the
/// backup.
fn qemu_args(dir: &Path, j: &Journal, backing: &[bool]) -> Vec<String> {
    let m = &j.machine;
    let mut args: Vec<String> = vec![
        "-name".into(),
        format!("guest={},debug-threads=on", j.vm.replace(',', ",,")),
        "-machine".into(),
        "q35".into(),
        "-accel".into(),
        m.accelerator.name().into(),
        "-cpu".into(),
        if m.accelerator == Accelerator::Kvm { "host" } else { "max" }.into(),
        "-m".into(),
        m.memory_mib.to_string(),
        "-smp".into(),
        m.cpus.to_string(),
        "-nodefaults".into(),
        "-no-user-config".into(),
        "-display".into(),
        "none".into(),
    ];
    let socket = dir.join(NBD_SOCKET);
    for (i, d) in j.disks.iter().enumerate() {
        let mut format = json!({
            "driver": "qcow2",
            "node-name": node(i),
            "file": { "driver": "file", "filename": j.image(dir, i) },
        });
        if backing[i] {
            args.push("-blockdev".into());
            args.push(
                json!({
                    "driver": "nbd",
                    "node-name": backup_node(i),
                    "server": { "type": "unix", "path": socket },
                    "export": d.id,
                    "reconnect-delay": RECONNECT_DELAY_SECS,
                    "read-only": true,
                })
                .to_string(),
            );
            format["backing"] = backup_node(i).into();
        }
        args.push("-blockdev".into());
        args.push(format.to_string());
        args.push("-device".into());
        args.push(format!(
            "virtio-blk-pci,drive={},id={},write-cache=on{}",
            node(i),
            device(i),
            if i == 0 { ",bootindex=1" } else { "" }
        ));
    }
    if m.kernel {
        args.extend(["-kernel".into(), dir.join("kernel").display().to_string()]);
        if m.initrd {
            args.extend(["-initrd".into(), dir.join("initrd").display().to_string()]);
        }
        args.extend(["-append".into(), m.append.clone().unwrap_or_default()]);
    }
    args.push("-chardev".into());
    args.push(format!("file,id=console,append=on,path={}", option_value(&dir.join(CONSOLE))));
    args.extend(["-serial".into(), "chardev:console".into()]);
    for qmp in [OWN_QMP, USER_QMP] {
        args.extend(["-qmp".into(), format!("unix:{},server=on,wait=off", option_value(&dir.join(qmp)))]);
    }
    args.extend(m.extra_args.iter().cloned());
    args
}

fn node(i: usize) -> String {
    format!("disk{i}")
}

fn backup_node(i: usize) -> String {
    format!("backup{i}")
}

fn device(i: usize) -> String {
    format!("vd{i}")
}

fn job_id(i: usize) -> String {
    format!("blockproof-copy-{i}")
}

/// A block job as `query-jobs` lists it.
#[derive(Debug, Deserialize)]
struct Job {
    id: String,
    status: String,
    #[serde(rename = "current-progress", default)]
    current_progress: u64,
    #[serde(rename = "total-progress", default)]
    total_progress: u64,
    error: Option<String>,
}

/// Starts the copy of disk `i` into its image: QEMU's `block-stream`, which copies every
/// cluster the image does not hold and drops the backing file at the end.
fn stream(qmp: &mut Qmp, i: usize, speed: Option<u64>) -> Result<(), VmError> {
    let mut args = json!({ "job-id": job_id(i), "device": node(i), "auto-dismiss": false });
    if let Some(speed) = speed {
        args["speed"] = speed.into();
    }
    qmp.execute("block-stream", Some(args))?;
    Ok(())
}

fn query_jobs(qmp: &mut Qmp) -> Result<Vec<Job>, VmError> {
    Ok(qmp.execute_as("query-jobs", None)?)
}

fn dismiss(qmp: &mut Qmp, i: usize) -> Result<(), VmError> {
    qmp.execute("job-dismiss", Some(json!({ "id": job_id(i) })))?;
    Ok(())
}

/// Whether disk `i`'s node in the running VM still has a backing node (the backup). (The
/// flat listing says `backing_file_depth` 0 for every node.)
fn has_backing(qmp: &mut Qmp, i: usize) -> Result<bool, VmError> {
    let nodes: Vec<Value> = qmp.execute_as("query-named-block-nodes", None)?;
    let n = nodes.iter().find(|n| n["node-name"] == node(i).as_str()).ok_or_else(|| {
        VmError::VmFailed(format!("the VM has no block node {} (it was changed outside blockproof)", node(i)))
    })?;
    Ok(n["backing_file_depth"].as_u64().unwrap_or(0) > 0)
}

/// Cancels the running copies and waits (briefly) for them to end; what they copied
/// stays in the images. Errors are ignored: the caller reports the cancellation.
fn cancel_jobs(qmp: &mut Qmp, streaming: &[bool]) {
    for (i, _) in streaming.iter().enumerate().filter(|(_, s)| **s) {
        let _ = qmp.execute("job-cancel", Some(json!({ "id": job_id(i) })));
    }
    let asked = Instant::now();
    while asked.elapsed() < Duration::from_secs(10) {
        let Ok(jobs) = query_jobs(qmp) else { return };
        let ours: Vec<usize> = (0..streaming.len()).filter(|&i| jobs.iter().any(|j| j.id == job_id(i))).collect();
        if ours.is_empty() {
            return;
        }
        for i in ours {
            if jobs.iter().any(|j| j.id == job_id(i) && j.status == "concluded") {
                let _ = dismiss(qmp, i);
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Whether a qcow2 image names a backing file in its header (bytes 8..16, big-endian: its
/// offset, 0 when there is none).
fn image_has_backing(path: &Path) -> io::Result<bool> {
    let mut header = [0u8; 16];
    File::open(path)?.read_exact(&mut header)?;
    if &header[..4] != b"QFI\xfb" {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "not a qcow2 image"));
    }
    Ok(u64::from_be_bytes(header[8..16].try_into().expect("8 bytes")) != 0)
}

/// Whether process `pid` is alive (not a zombie) and is a QEMU of the recovery in `dir`
/// (its command line names the directory): a recycled pid is not taken for the VM.
fn runs_here(pid: u32, dir: &Path) -> bool {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let state = stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().next());
    if matches!(state, None | Some("Z") | Some("X")) {
        return false;
    }
    let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let needle = dir.join(OWN_QMP).display().to_string();
    cmdline.windows(needle.len()).any(|w| w == needle.as_bytes())
}

/// Removes a socket file left by a process that is gone (binding needs the path free).
fn remove_stale(path: &Path) -> Result<(), VmError> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => {
            Err(VmError::io(format!("cannot remove {}", path.display()))(e))
        }
        _ => Ok(()),
    }
}

/// `dir` as an absolute path whose sockets fit a `sockaddr_un`.
fn absolute(dir: &Path) -> Result<PathBuf, VmError> {
    let dir = std::path::absolute(dir).map_err(VmError::io(format!("cannot resolve {}", dir.display())))?;
    let longest = dir.join(OWN_QMP).as_os_str().len();
    if longest > SOCKET_PATH_MAX {
        return Err(VmError::LongPath(dir));
    }
    Ok(dir)
}

fn write_new(path: &Path, bytes: &[u8]) -> Result<(), VmError> {
    fs::write(path, bytes).map_err(VmError::io(format!("cannot write {}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn new(disks: &[&str]) -> NewRecovery {
        NewRecovery {
            repository: "r".into(),
            snapshot: "s".into(),
            vm: "web,1".into(),
            created: "2026-12-02T10:00:00Z".into(),
            disks: disks.iter().map(|d| (d.to_string(), 1 << 20)).collect(),
            memory_mib: 256,
            cpus: 1,
            accel: AccelChoice::Tcg,
            firmware: Firmware::Bios,
            boot: Boot::Kernel { kernel: b"k".to_vec(), initrd: None, append: "console=ttyS0".into() },
            extra_args: vec!["-nic".into(), "user".into()],
        }
    }

    #[test]
    fn a_new_recovery_needs_an_empty_directory_and_locks_it() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("r");
        let r = Recovery::create(&dir, new(&["vda", "a/b", "a_b"])).unwrap();
        let images: Vec<&str> = r.journal().disks.iter().map(|d| d.image.as_str()).collect();
        assert_eq!(images, ["vda.qcow2", "a_b.qcow2", "disk2-a_b.qcow2"]);
        assert_eq!(fs::read(dir.join("kernel")).unwrap(), b"k");
        assert!(!dir.join("initrd").exists());
        assert!(matches!(Recovery::open(&dir), Err(VmError::Busy(_))));
        drop(r);
        let r = Recovery::open(&dir).unwrap();
        assert_eq!(r.journal().state, RecoveryState::Copying);
        drop(r);
        assert!(matches!(Recovery::create(&dir, new(&["vda"])), Err(VmError::DirNotEmpty(_))));
        assert!(matches!(Recovery::open(tmp.path()), Err(VmError::NoRecovery(_))));
    }

    #[test]
    fn the_command_line_backs_only_the_images_not_yet_copied_with_the_backup() {
        let tmp = tempfile::tempdir().unwrap();
        let r = Recovery::create(&tmp.path().join("r"), new(&["vda", "vdb"])).unwrap();
        let args = qemu_args(r.dir(), r.journal(), &[true, false]);
        let blockdevs: Vec<Value> =
            args.windows(2).filter(|w| w[0] == "-blockdev").map(|w| serde_json::from_str(&w[1]).unwrap()).collect();
        assert_eq!(blockdevs.len(), 3, "{args:?}");
        assert_eq!(blockdevs[0]["driver"], "nbd");
        assert_eq!(blockdevs[0]["export"], "vda");
        assert_eq!(blockdevs[0]["reconnect-delay"], RECONNECT_DELAY_SECS);
        assert_eq!(blockdevs[1]["backing"], "backup0");
        assert!(blockdevs[2].get("backing").is_none());
        assert!(args.contains(&"guest=web,,1,debug-threads=on".to_string()));
        assert!(args.ends_with(&["-nic".to_string(), "user".to_string()]));
        assert!(args.contains(&"-kernel".to_string()) && !args.contains(&"-initrd".to_string()));
    }

    #[test]
    fn a_directory_too_long_for_a_socket_is_refused() {
        let long = Path::new("/tmp").join("x".repeat(100));
        assert!(matches!(absolute(&long), Err(VmError::LongPath(_))));
    }

    #[test]
    fn the_backing_file_is_read_from_the_qcow2_header() {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("i");
        let mut h = b"QFI\xfb\0\0\0\x03".to_vec();
        h.extend(0x100u64.to_be_bytes());
        fs::write(&p, &h).unwrap();
        assert!(image_has_backing(&p).unwrap());
        h[8..16].copy_from_slice(&0u64.to_be_bytes());
        fs::write(&p, &h).unwrap();
        assert!(!image_has_backing(&p).unwrap());
        fs::write(&p, b"raw data, not qcow2").unwrap();
        assert!(image_has_backing(&p).is_err());
    }
}
