//! Repository locks: who is working on the repository, so that garbage collection knows
//! which backups may still reference what it wants to delete.
//!
//! A lock is a small sealed document in `locks/<random name>` (JSON: kind, host, pid,
//! operation, creation and refresh times in seconds since the epoch). Taking a lock
//! writes it, then lists every lock and backs off (removing its own) if a conflicting,
//! live lock exists. A lock is refreshed every [`REFRESH`] by a background thread and
//! removed when dropped.
//!
//! | held \ wanted | shared (backup, forget, copy) | gc | exclusive (unlock --all) |
//! |---|---|---|---|
//! | shared | ok | ok (gc defers what running backups may use) | refused |
//! | gc | ok | refused | refused |
//! | exclusive | refused | refused | refused |
//!
//! A lock is **stale** when its holder is certainly gone: same host and the process no
//! longer exists, or not refreshed for [`STALE_AFTER`]. Stale locks are ignored (and
//! removed by whoever finds them); `blockproof unlock` removes them explicitly.

use std::sync::mpsc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use blockproof_format::ObjectMagic;
use blockproof_store::Kind;
use serde::{Deserialize, Serialize};

use crate::repository::write_doc;
use crate::{RepoError, Repository};

/// How often a held lock is rewritten with a new refresh time.
pub const REFRESH: Duration = Duration::from_secs(120);
/// A lock not refreshed for this long is stale.
pub const STALE_AFTER: Duration = Duration::from_secs(30 * 60);

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
}

/// The content of a lock file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockInfo {
    pub kind: LockKind,
    pub host: String,
    pub pid: u32,
    pub operation: String,
    /// Seconds since the Unix epoch.
    pub created: u64,
    pub refreshed: u64,
}

impl LockInfo {
    /// Whether the holder is certainly gone, as seen from `host` at `now`.
    pub fn is_stale(&self, host: &str, now: u64) -> bool {
        if now.saturating_sub(self.refreshed) > STALE_AFTER.as_secs() {
            return true;
        }
        self.host == host && !process_alive(self.pid)
    }

    pub fn describe(&self) -> String {
        format!(
            "{} lock of {} (pid {} on {}) since {}",
            serde_json::to_value(self.kind).ok().and_then(|v| v.as_str().map(String::from)).unwrap_or_default(),
            self.operation,
            self.pid,
            self.host,
            humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(self.created))
        )
    }
}

fn process_alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
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

/// A held lock; dropping it stops the refresh and removes the lock file.
pub struct Lock<'r> {
    repo: &'r Repository,
    name: String,
    info: LockInfo,
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

impl Repository {
    /// Every lock file: name and content (unreadable ones are skipped).
    pub fn locks(&self) -> Result<Vec<(String, LockInfo)>, RepoError> {
        let mut out = Vec::new();
        for name in self.backend().list(Kind::Lock)? {
            match self.read_doc(Kind::Lock, ObjectMagic::Lock, &name) {
                Ok(bytes) => {
                    if let Ok(info) = serde_json::from_slice::<LockInfo>(&bytes) {
                        out.push((name, info));
                    }
                }
                Err(RepoError::Store(e)) if e.is_not_found() => {}
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }

    /// Live locks (stale ones are removed on the way).
    pub fn live_locks(&self) -> Result<Vec<(String, LockInfo)>, RepoError> {
        let (host, now) = (hostname(), now_secs());
        let mut live = Vec::new();
        for (name, info) in self.locks()? {
            if info.is_stale(&host, now) {
                let _ = self.backend().remove(Kind::Lock, &name);
            } else {
                live.push((name, info));
            }
        }
        Ok(live)
    }

    /// Takes a lock of `kind` for `operation`, or fails naming the holder of a conflicting
    /// lock.
    pub fn lock(&self, kind: LockKind, operation: &str) -> Result<Lock<'_>, RepoError> {
        let now = now_secs();
        let info = LockInfo {
            kind,
            host: hostname(),
            pid: std::process::id(),
            operation: operation.into(),
            created: now,
            refreshed: now,
        };
        let name = hex::encode(rand::random::<[u8; 16]>());
        self.write_doc(Kind::Lock, ObjectMagic::Lock, &name, &serde_json::to_vec(&info).expect("a lock serializes"))?;
        let conflict = self.live_locks()?.into_iter().find(|(n, other)| *n != name && kind.conflicts(other.kind));
        if let Some((_, other)) = conflict {
            let _ = self.backend().remove(Kind::Lock, &name);
            return Err(RepoError::Locked(format!(
                "the repository is locked: {}; if that process is gone, run blockproof unlock",
                other.describe()
            )));
        }
        let (stop, stopped) = mpsc::channel::<()>();
        let refresher = {
            let (backend, keys, name, mut info) = (self.backend_arc(), self.keys().clone(), name.clone(), info.clone());
            std::thread::spawn(move || {
                while let Err(mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(REFRESH) {
                    info.refreshed = now_secs();
                    let bytes = serde_json::to_vec(&info).expect("a lock serializes");
                    let _ = write_doc(backend.as_ref(), &keys, Kind::Lock, ObjectMagic::Lock, &name, &bytes);
                }
            })
        };
        Ok(Lock { repo: self, name, info, stop: Some(stop), refresher: Some(refresher) })
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
}

impl Drop for Lock<'_> {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.refresher.take() {
            let _ = t.join();
        }
        let _ = self.repo.backend().remove(Kind::Lock, &self.name);
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

    #[test]
    fn staleness() {
        let me = LockInfo {
            kind: LockKind::Shared,
            host: "h".into(),
            pid: std::process::id(),
            operation: "backup".into(),
            created: 1000,
            refreshed: 1000,
        };
        assert!(!me.is_stale("h", 1000 + 60));
        assert!(me.is_stale("h", 1000 + STALE_AFTER.as_secs() + 1), "not refreshed");
        let gone = LockInfo { pid: u32::MAX - 1, ..me.clone() };
        assert!(gone.is_stale("h", 1001), "same host, no such process");
        assert!(!gone.is_stale("other-host", 1001), "another host: only age tells");
    }
}
