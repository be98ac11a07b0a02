//! Repository locks: who is working on the repository, so that garbage collection knows
//! which operations may still reference what it wants to delete.
//!
//! A lock is a small sealed document in `locks/<random name>` (JSON, FORMAT §20: kind,
//! host, pid, operation, creation and refresh times, and the identity of the process's
//! PID namespace). Taking a lock writes it, then lists every lock and backs off (removing
//! its own) if a conflicting live lock exists. A background thread refreshes it every
//! [`refresh_interval`]; it is removed when dropped.
//!
//! | held \ wanted | shared (backup, forget, copy) | gc | exclusive |
//! |---|---|---|---|
//! | shared | ok | ok (gc defers what running backups may use) | refused |
//! | gc | ok | refused | refused |
//! | exclusive | refused | refused | refused |
//!
//! ## Liveness is a heartbeat, never a guess
//!
//! A lock is **stale** when it was not refreshed for [`stale_after`] (30 minutes), or
//! when its holder is *certainly* gone: the lock names the same boot (`boot_id`) and the
//! same PID namespace as the reader's, and that pid no longer exists there or is another
//! process (its start time differs). A host name says nothing: containers with a fixed
//! host name, and two hosts with the same name, share it while their pids mean different
//! processes. A lock from another namespace or an older blockproof is judged by its
//! heartbeat alone.
//!
//! ## A holder knows when it has lost its lock
//!
//! The holder gives its lock up — sticky, for good — once its last successful refresh is
//! [`lost_after`] old (half the stale age, so clocks of different hosts may disagree by
//! up to 15 minutes), or when a refresh finds its lock file gone (removed by `unlock
//! --all`, or judged stale). Losing the lock cancels the repository's [`Cancel`] token,
//! which stops every stage of the running operation, and [`Lock::ensure_held`] fails. A
//! refresh that fails is retried every few seconds, never ignored. Every write that
//! makes earlier writes reachable — an index file (it names packs) and a snapshot (it
//! names blobs) — is checked against the session's locks just before and just after;
//! an operation also calls `ensure_held`, which reads the lock file back, around its
//! commit. A snapshot written as the lock was lost is withdrawn. An index file written
//! then is *settled*, not removed (`Repository::write_index_file`): it was visible, and
//! while its writer was stopped others may have deduplicated against it, so it keeps
//! every pack that still exists and loses only those gc deleted meanwhile (gc, for its
//! part, rewrites an index file that appeared during its sweep naming a pack it deleted).
//! So a process stopped for longer than the stale age (SIGSTOP, a frozen VM, a suspended
//! laptop) can never commit a snapshot, nor leave an index entry, that names what gc
//! removed in the meantime.
//!
//! ## Files that are not locks
//!
//! A file in `locks/` that is not a sealed lock of this repository (foreign, damaged:
//! bad magic, failed authentication) is treated as absent, as FORMAT §20 says: it blocks
//! nobody, and `unlock` removes it. A lock written by a newer blockproof (a newer
//! envelope version, or fields this build does not know) is treated as a live shared lock
//! until its file is older than the stale age: it may belong to a running backup.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use blockproof_format::{Envelope, FormatError, ObjectMagic};
use blockproof_store::{Backend, Kind};
use blockproof_work::Cancel;
use serde::{Deserialize, Serialize};

use crate::repository::write_doc;
use crate::{RepoError, Repository};

/// How often a held lock is rewritten with a new refresh time.
pub const REFRESH: Duration = Duration::from_secs(120);
/// A lock not refreshed for this long is stale.
pub const STALE_AFTER: Duration = Duration::from_secs(30 * 60);
/// How soon a failed refresh is retried.
const RETRY: Duration = Duration::from_secs(10);

/// The refresh interval ([`REFRESH`]; test builds may shorten it with
/// `BLOCKPROOF_TEST_LOCK_REFRESH_SECS`).
pub fn refresh_interval() -> Duration {
    test_override("BLOCKPROOF_TEST_LOCK_REFRESH_SECS").unwrap_or(REFRESH)
}

/// The stale age ([`STALE_AFTER`]; test builds may shorten it with
/// `BLOCKPROOF_TEST_LOCK_STALE_SECS`).
pub fn stale_after() -> Duration {
    test_override("BLOCKPROOF_TEST_LOCK_STALE_SECS").unwrap_or(STALE_AFTER)
}

/// The age of its last successful refresh at which a holder gives its lock up: half the
/// stale age, so that the holder always knows it lost the lock before anyone else may
/// judge it stale, even with clocks 15 minutes apart.
pub fn lost_after() -> Duration {
    stale_after() / 2
}

#[cfg(feature = "test-hooks")]
fn test_override(var: &str) -> Option<Duration> {
    std::env::var(var).ok().and_then(|v| v.parse().ok()).map(Duration::from_secs)
}

#[cfg(not(feature = "test-hooks"))]
fn test_override(_var: &str) -> Option<Duration> {
    None
}

/// What a lock allows others.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LockKind {
    Shared,
    Gc,
    Exclusive,
}

impl LockKind {
    fn conflicts(self, other: LockKind) -> bool {
        !matches!((self, other), (LockKind::Shared, LockKind::Shared | LockKind::Gc) | (LockKind::Gc, LockKind::Shared))
    }

    fn name(self) -> &'static str {
        match self {
            LockKind::Shared => "shared",
            LockKind::Gc => "gc",
            LockKind::Exclusive => "exclusive",
        }
    }
}

/// The content of a lock file (FORMAT §20).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LockInfo {
    pub kind: LockKind,
    pub host: String,
    pub pid: u32,
    pub operation: String,
    /// Seconds since the Unix epoch.
    pub created: u64,
    pub refreshed: u64,
    /// The holder's boot (`/proc/sys/kernel/random/boot_id`); absent in locks of older
    /// versions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_id: Option<String>,
    /// The inode number of the holder's PID namespace (`/proc/self/ns/pid`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid_ns: Option<u64>,
    /// The holder's start time in clock ticks since boot (`/proc/self/stat`, field 22),
    /// which tells a reused pid from the holder.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<u64>,
    /// The vm a backup works on: two locks naming the same vm conflict whatever their
    /// kinds, so two runs of one vm never overlap (absent for every other operation, and
    /// in locks written before 2026-12-02).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm: Option<String>,
}

/// Where the reader runs: what it can tell about processes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Here {
    pub boot_id: Option<String>,
    pub pid_ns: Option<u64>,
}

impl Here {
    /// This process's boot and PID namespace.
    pub fn current() -> Here {
        Here { boot_id: boot_id(), pid_ns: pid_namespace() }
    }
}

impl LockInfo {
    /// Whether the holder is certainly gone, as seen from `here` at `now` (seconds).
    pub fn is_stale(&self, here: &Here, now: u64) -> bool {
        if now.saturating_sub(self.refreshed) > stale_after().as_secs() {
            return true;
        }
        let same_namespace = self.boot_id.is_some()
            && self.boot_id == here.boot_id
            && self.pid_ns.is_some()
            && self.pid_ns == here.pid_ns;
        match (same_namespace, self.start_time) {
            (true, Some(started)) => process_start_time(self.pid) != Some(started),
            _ => false,
        }
    }

    /// Whether a lock of `kind` for `vm` may not be taken while this one is held.
    fn blocks(&self, kind: LockKind, vm: Option<&str>) -> bool {
        kind.conflicts(self.kind) || (vm.is_some() && self.vm.as_deref() == vm)
    }

    pub fn describe(&self) -> String {
        format!(
            "{} lock of {} (pid {} on {}) since {}",
            self.kind.name(),
            self.operation,
            self.pid,
            self.host,
            time_text(self.created)
        )
    }
}

fn boot_id() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok().map(|s| s.trim().to_string())
}

/// The inode of `/proc/self/ns/pid` (as `readlink` shows it: `pid:[4026531836]`).
fn pid_namespace() -> Option<u64> {
    let link = std::fs::read_link("/proc/self/ns/pid").ok()?;
    let text = link.to_str()?;
    text.strip_prefix("pid:[")?.strip_suffix(']')?.parse().ok()
}

/// A process's start time (clock ticks since boot), or `None` if it does not exist.
fn process_start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may contain spaces.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// Seconds since the Unix epoch.
pub fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// This machine's host name.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

/// A file in `locks/`, as read.
#[derive(Clone, Debug)]
pub enum LockFile {
    /// A lock of this repository.
    Lock(LockInfo),
    /// Not a lock of this repository (foreign or damaged): treated as absent.
    Invalid(String),
    /// A lock of a newer blockproof: treated as a live shared lock until the file is
    /// older than the stale age; `modified` is the file's time (seconds since the epoch).
    Newer { modified: u64, why: String },
}

/// A lock as seen by others: what it is and whether it counts.
fn classify(repo: &Repository, name: &str) -> Result<Option<LockFile>, RepoError> {
    let bytes = match repo.backend().read(Kind::Lock, name) {
        Ok(b) => b,
        Err(e) if e.is_not_found() => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let (ad, sealed) = match Envelope::decode(ObjectMagic::Lock, &bytes) {
        Ok(x) => x,
        Err(e @ FormatError::UnsupportedVersion { .. }) => return Ok(Some(newer(repo, name, e.to_string()))),
        Err(e) => return Ok(Some(LockFile::Invalid(e.to_string()))),
    };
    let plain = match repo.keys().open(ad, sealed) {
        Ok(p) => p,
        Err(e) => return Ok(Some(LockFile::Invalid(format!("does not authenticate: {e}")))),
    };
    Ok(Some(match serde_json::from_slice::<LockInfo>(&plain) {
        Ok(info) => LockFile::Lock(info),
        // Authentic, so written with this repository's key: a newer writer's fields.
        Err(e) => newer(repo, name, e.to_string()),
    }))
}

fn newer(repo: &Repository, name: &str, why: String) -> LockFile {
    let modified = repo
        .backend()
        .modified(Kind::Lock, name)
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or_else(now_secs, |d| d.as_secs());
    LockFile::Newer { modified, why }
}

/// The holder's view of its lock: when it was last refreshed, and whether it is lost.
pub(crate) struct Held {
    last_ok: Mutex<(Instant, SystemTime)>,
    lost: AtomicBool,
    reason: Mutex<Option<String>>,
    cancel: Cancel,
}

impl Held {
    /// How long ago the last successful refresh was, by the monotonic clock or the wall
    /// clock, whichever says longer (the monotonic clock stops while the machine sleeps).
    fn age(&self) -> Duration {
        let (at, wall) = *self.last_ok.lock().unwrap_or_else(|e| e.into_inner());
        at.elapsed().max(wall.elapsed().unwrap_or_default())
    }

    fn lose(&self, why: String) {
        let msg = format!("lost the repository lock: {why}; nothing was committed, run the operation again");
        self.reason.lock().unwrap_or_else(|e| e.into_inner()).get_or_insert(msg.clone());
        self.lost.store(true, Ordering::SeqCst);
        self.cancel.cancel(msg);
    }

    /// Fails (and loses the lock for good) once the last refresh is too old.
    pub(crate) fn check_age(&self) -> Result<(), RepoError> {
        if !self.lost.load(Ordering::SeqCst) {
            let age = self.age();
            if age >= lost_after() {
                self.lose(format!(
                    "it was not refreshed for {}s (was the process stopped or the repository unreachable?)",
                    age.as_secs()
                ));
            }
        }
        match self.reason.lock().unwrap_or_else(|e| e.into_inner()).clone() {
            Some(msg) if self.lost.load(Ordering::SeqCst) => Err(RepoError::LockLost(msg)),
            _ => Ok(()),
        }
    }

    /// Records a successful refresh that *began* at `at`: others judge the lock by the
    /// time written into it, so a slow write must not make the holder think it fresher.
    fn refreshed(&self, at: (Instant, SystemTime)) {
        *self.last_ok.lock().unwrap_or_else(|e| e.into_inner()) = at;
    }
}

/// A held lock; dropping it stops the refresh and removes the lock file.
pub struct Lock<'r> {
    repo: &'r Repository,
    name: String,
    info: LockInfo,
    held: Arc<Held>,
    /// Dropping it wakes the refresher at once (it waits on the channel, not a sleep), so
    /// releasing a lock costs no refresh tick.
    stop: Option<mpsc::Sender<()>>,
    refresher: Option<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for Lock<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lock").field("name", &self.name).field("info", &self.info).finish()
    }
}

/// Removes a lock file when dropped, unless disarmed: a lock that was written but not
/// taken (a conflict, an error while listing) never stays behind.
struct Written<'a> {
    backend: &'a dyn Backend,
    name: Option<&'a str>,
}

impl Drop for Written<'_> {
    fn drop(&mut self) {
        if let Some(name) = self.name {
            let _ = self.backend.remove(Kind::Lock, name);
        }
    }
}

impl Repository {
    /// Every file in `locks/`: name and what it is.
    pub fn lock_files(&self) -> Result<Vec<(String, LockFile)>, RepoError> {
        let mut out = Vec::new();
        for name in self.backend().list(Kind::Lock)? {
            if let Some(f) = classify(self, &name)? {
                out.push((name, f));
            }
        }
        Ok(out)
    }

    /// Every lock of this repository (files that are not locks are left out).
    pub fn locks(&self) -> Result<Vec<(String, LockInfo)>, RepoError> {
        Ok(self
            .lock_files()?
            .into_iter()
            .filter_map(|(n, f)| match f {
                LockFile::Lock(info) => Some((n, info)),
                _ => None,
            })
            .collect())
    }

    /// Live locks (stale ones are removed on the way). A newer blockproof's lock counts
    /// as a live shared lock created when its file was last written, until that is older
    /// than the stale age.
    pub fn live_locks(&self) -> Result<Vec<(String, LockInfo)>, RepoError> {
        let (here, now) = (Here::current(), now_secs());
        let mut live = Vec::new();
        for (name, file) in self.lock_files()? {
            match file {
                LockFile::Lock(info) if info.is_stale(&here, now) => {
                    let _ = self.backend().remove(Kind::Lock, &name);
                }
                LockFile::Lock(info) => live.push((name, info)),
                LockFile::Invalid(_) => {}
                LockFile::Newer { modified, why } => {
                    if now.saturating_sub(modified) <= stale_after().as_secs() {
                        let info = LockInfo {
                            kind: LockKind::Shared,
                            host: "?".into(),
                            pid: 0,
                            operation: format!("a newer blockproof ({why})"),
                            created: modified,
                            refreshed: modified,
                            boot_id: None,
                            pid_ns: None,
                            start_time: None,
                            vm: None,
                        };
                        live.push((name, info));
                    }
                }
            }
        }
        Ok(live)
    }

    /// Takes a lock of `kind` for `operation`, or fails naming the holder of a conflicting
    /// lock. Losing it later cancels [`Repository::cancel`].
    pub fn lock(&self, kind: LockKind, operation: &str) -> Result<Lock<'_>, RepoError> {
        self.try_lock(kind, operation, None)
    }

    /// Takes a lock of `kind` for `operation` on `vm`: it also conflicts with every lock
    /// naming the same vm, so one vm is worked on by one run at a time. While a
    /// conflicting lock is live, tries again every second for up to `wait`; then fails
    /// naming the holder ([`RepoError::Locked`]).
    pub fn lock_vm(&self, kind: LockKind, operation: &str, vm: &str, wait: Duration) -> Result<Lock<'_>, RepoError> {
        let deadline = Instant::now() + wait;
        loop {
            match self.try_lock(kind, operation, Some(vm)) {
                Err(RepoError::Locked(_)) if Instant::now() < deadline && !self.cancel().is_cancelled() => {
                    // A little jitter, so two waiters that backed off together do not
                    // collide again.
                    let pause = Duration::from_millis(700 + u64::from(rand::random::<u16>() % 600));
                    std::thread::sleep(pause.min(deadline.saturating_duration_since(Instant::now())));
                }
                other => return other,
            }
        }
    }

    fn try_lock(&self, kind: LockKind, operation: &str, vm: Option<&str>) -> Result<Lock<'_>, RepoError> {
        let began = (Instant::now(), SystemTime::now());
        let now = began.1.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let here = Here::current();
        let info = LockInfo {
            kind,
            host: hostname(),
            pid: std::process::id(),
            operation: operation.into(),
            created: now,
            refreshed: now,
            boot_id: here.boot_id,
            pid_ns: here.pid_ns,
            start_time: process_start_time(std::process::id()),
            vm: vm.map(str::to_string),
        };
        let name = hex::encode(rand::random::<[u8; 16]>());
        self.write_doc(Kind::Lock, ObjectMagic::Lock, &name, &serde_json::to_vec(&info).expect("a lock serializes"))?;
        let mut written = Written { backend: self.backend(), name: Some(&name) };
        let conflict = self.live_locks()?.into_iter().find(|(n, other)| *n != name && other.blocks(kind, vm));
        if let Some((_, other)) = conflict {
            return Err(RepoError::Locked(match (vm, &other.vm) {
                (Some(vm), Some(theirs)) if vm == theirs && !kind.conflicts(other.kind) => format!(
                    "vm {vm} is already being backed up: {}; one run per vm at a time (wait for it, or pass \
                     --lock-wait); if that process is gone, run blockproof unlock",
                    other.describe()
                ),
                _ => format!(
                    "the repository is locked: {}; if that process is gone, run blockproof unlock",
                    other.describe()
                ),
            }));
        }
        written.name = None;
        drop(written);
        let held = Arc::new(Held {
            last_ok: Mutex::new(began),
            lost: AtomicBool::new(false),
            reason: Mutex::new(None),
            cancel: self.cancel().clone(),
        });
        self.leases.lock().unwrap_or_else(|e| e.into_inner()).push(held.clone());
        let (stop, stopped) = mpsc::channel::<()>();
        let refresher = {
            let (backend, keys, name, info, held) =
                (self.backend_arc(), self.keys().clone(), name.clone(), info.clone(), held.clone());
            std::thread::spawn(move || refresh_loop(backend.as_ref(), &keys, &name, info, &held, &stopped))
        };
        Ok(Lock { repo: self, name, info, held, stop: Some(stop), refresher: Some(refresher) })
    }
}

/// Rewrites the lock every refresh interval until stopped or lost (see the module doc).
fn refresh_loop(
    backend: &dyn Backend,
    keys: &blockproof_crypto::Keys,
    name: &str,
    mut info: LockInfo,
    held: &Held,
    stopped: &mpsc::Receiver<()>,
) {
    let mut wait = refresh_interval();
    while let Err(mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(wait) {
        if held.check_age().is_err() {
            return;
        }
        match backend.read(Kind::Lock, name) {
            Err(e) if e.is_not_found() => {
                return held
                    .lose("its lock file was removed (by `unlock --all`, or another host judged it stale)".into())
            }
            Err(_) => {
                wait = RETRY.min(refresh_interval());
                continue;
            }
            Ok(_) => {}
        }
        let began = (Instant::now(), SystemTime::now());
        // Whole seconds, rounded down: the lock never claims to be fresher than it is.
        info.refreshed = began.1.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let bytes = serde_json::to_vec(&info).expect("a lock serializes");
        // A refresh must not resurrect a lock that went stale while this thread slept.
        if held.check_age().is_err() {
            return;
        }
        match write_doc(backend, keys, Kind::Lock, ObjectMagic::Lock, name, &bytes) {
            Ok(()) => {
                held.refreshed(began);
                wait = refresh_interval();
            }
            Err(_) => wait = RETRY.min(refresh_interval()),
        }
    }
}

impl<'r> Lock<'r> {
    /// The lock's content.
    pub fn info(&self) -> &LockInfo {
        &self.info
    }

    /// The lock file's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Fails unless the lock is certainly still held: not lost, refreshed less than
    /// [`lost_after`] ago, and its file still there. Call it right before and right after
    /// making work visible.
    pub fn ensure_held(&self) -> Result<(), RepoError> {
        self.held.check_age()?;
        match self.repo.backend().read(Kind::Lock, &self.name) {
            Ok(_) => {}
            Err(e) if e.is_not_found() => {
                self.held.lose("its lock file was removed (by `unlock --all`, or another host judged it stale)".into())
            }
            Err(e) => return Err(e.into()),
        }
        self.held.check_age()
    }
}

impl Drop for Lock<'_> {
    fn drop(&mut self) {
        self.repo.leases.lock().unwrap_or_else(|e| e.into_inner()).retain(|h| !Arc::ptr_eq(h, &self.held));
        drop(self.stop.take());
        if let Some(t) = self.refresher.take() {
            let _ = t.join();
        }
        let _ = self.repo.backend().remove(Kind::Lock, &self.name);
    }
}

/// A time stored as seconds after the Unix epoch, for people: RFC 3339 (UTC) up to the
/// year 9999, beyond it (a damaged or hostile record) `N s after the epoch` — never a panic.
pub fn time_text(secs: u64) -> String {
    const YEAR_10000: u64 = 253_402_300_800;
    if secs < YEAR_10000 {
        humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(secs)).to_string()
    } else {
        format!("{secs} s after the epoch")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conflict_table() {
        use LockKind::*;
        assert!(!Shared.conflicts(Shared) && !Shared.conflicts(Gc) && !Gc.conflicts(Shared));
        assert!(Gc.conflicts(Gc) && Exclusive.conflicts(Shared) && Shared.conflicts(Exclusive));
        assert!(Exclusive.conflicts(Exclusive) && Gc.conflicts(Exclusive));
    }

    fn me() -> LockInfo {
        let here = Here::current();
        LockInfo {
            kind: LockKind::Shared,
            host: "h".into(),
            pid: std::process::id(),
            operation: "backup".into(),
            created: 1000,
            refreshed: 1000,
            boot_id: here.boot_id,
            pid_ns: here.pid_ns,
            start_time: process_start_time(std::process::id()),
            vm: None,
        }
    }

    #[test]
    fn a_lock_naming_a_vm_blocks_only_that_vm() {
        let a = LockInfo { vm: Some("a".into()), ..me() };
        assert!(a.blocks(LockKind::Shared, Some("a")), "one run per vm");
        assert!(!a.blocks(LockKind::Shared, Some("b")) && !a.blocks(LockKind::Shared, None));
        assert!(!me().blocks(LockKind::Shared, Some("a")), "a lock of no vm blocks no vm");
        assert!(a.blocks(LockKind::Exclusive, None), "the kinds still conflict");
    }

    #[test]
    fn a_live_lock_goes_stale_only_by_its_heartbeat() {
        let here = Here::current();
        assert!(here.boot_id.is_some() && here.pid_ns.is_some(), "Linux tells boot and namespace");
        let me = me();
        assert!(!me.is_stale(&here, 1000 + 60));
        assert!(me.is_stale(&here, 1000 + STALE_AFTER.as_secs() + 1), "not refreshed");
    }

    #[test]
    fn a_dead_holder_is_certain_only_in_the_same_namespace() {
        let here = Here::current();
        // No such process in this namespace (pids are below 2^22 on Linux).
        let gone = LockInfo { pid: u32::MAX - 1, ..me() };
        assert!(gone.is_stale(&here, 1001), "same boot and namespace, no such process");
        let reused = LockInfo { start_time: me().start_time.map(|t| t + 1), ..me() };
        assert!(reused.is_stale(&here, 1001), "the pid now belongs to another process");
        // The same pid in another PID namespace (a container) means nothing here.
        let container = LockInfo { pid_ns: here.pid_ns.map(|n| n + 1), ..gone.clone() };
        assert!(!container.is_stale(&here, 1001));
        // Another boot (another host with the same name, or a reboot): only age tells.
        let other_host = LockInfo { boot_id: Some("another".into()), ..gone.clone() };
        assert!(!other_host.is_stale(&here, 1001));
        // An older blockproof's lock (no namespace recorded): only age tells, whatever
        // the host name says.
        let old = LockInfo { boot_id: None, pid_ns: None, start_time: None, ..gone };
        assert!(!old.is_stale(&here, 1001));
    }

    #[test]
    fn older_lock_documents_still_parse_and_unknown_fields_do_not() {
        let old = br#"{"kind":"shared","host":"h","pid":7,"operation":"backup","created":1,"refreshed":2}"#;
        let info: LockInfo = serde_json::from_slice(old).unwrap();
        assert_eq!((info.pid, info.boot_id), (7, None));
        let newer = br#"{"kind":"shared","host":"h","pid":7,"operation":"b","created":1,"refreshed":2,"x":1}"#;
        assert!(serde_json::from_slice::<LockInfo>(newer).is_err());
    }

    #[test]
    fn a_holder_loses_its_lock_for_good_once_its_refresh_is_too_old() {
        let held = Held {
            last_ok: Mutex::new((Instant::now(), SystemTime::now())),
            lost: AtomicBool::new(false),
            reason: Mutex::new(None),
            cancel: Cancel::new(),
        };
        assert!(held.check_age().is_ok());
        *held.last_ok.lock().unwrap() = (Instant::now() - lost_after(), SystemTime::now());
        assert!(matches!(held.check_age(), Err(RepoError::LockLost(_))));
        assert!(held.cancel.is_cancelled(), "losing the lock cancels the operation");
        held.refreshed((Instant::now(), SystemTime::now()));
        assert!(held.check_age().is_err(), "a later refresh does not bring it back");
    }

    #[test]
    fn process_start_times_are_read() {
        assert!(process_start_time(std::process::id()).is_some());
        assert_eq!(process_start_time(u32::MAX - 1), None);
    }
}
