//! A point-in-time view kept after a mismatch (docs/LIVE-VMS.md): instead of releasing
//! the view of a tainted run at once, blockproof leaves it — overlays, backup jobs, NBD
//! exports — for a bounded time, so the exact content the backup was compared with can
//! be read again (`nbdinfo`, `qemu-img`, `blockproof verify --disk id=...,source=URI`).
//!
//! The journal names it ([`KeptView`], `kept`), and it is released by whichever comes
//! first: `blockproof cleanup --vm NAME`, the next backup of the vm (which releases it
//! before it sets up its own view), or its deadline — a keeper process
//! (`blockproof cleanup --vm NAME --when-expired`, started detached by the backup) waits
//! for it ([`release_when_expired`]). The keeper releases only the kept view it was
//! started for (by its id) and only once it expired; it exits as soon as something else
//! released it. Nothing here is specific to QMP: a kept view is a journal entry.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use crate::live::{read_journal, undo, VmLock};
use crate::SourceError;

/// How often a keeper looks at the journal while it waits.
const POLL: Duration = Duration::from_secs(1);

/// A view kept after a mismatch, as the journal and the backup report name it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeptView {
    /// Identifies this keep: a keeper releases only the view it was started for.
    pub id: String,
    /// When it is released at the latest (RFC 3339, UTC, whole seconds).
    pub until: String,
    /// The tainted restore point whose source it is.
    pub snapshot: String,
    /// One export per disk: the disk as it was at the view.
    pub exports: Vec<KeptExport>,
}

/// One disk's export of a kept view.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeptExport {
    pub disk: String,
    /// The NBD server's unix socket.
    pub socket: PathBuf,
    /// The export name.
    pub name: String,
    /// The same as an NBD URI (`nbd+unix:///NAME?socket=SOCKET`).
    pub uri: String,
}

impl KeptView {
    /// A kept view of `snapshot` released `keep` from now (rounded up to the second).
    pub fn new(keep: Duration, snapshot: &str, exports: Vec<KeptExport>) -> KeptView {
        let since = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
        let until = SystemTime::UNIX_EPOCH + round_up(since + keep);
        KeptView {
            id: format!("{}-{}", std::process::id(), since.as_nanos()),
            until: humantime::format_rfc3339_seconds(until).to_string(),
            snapshot: snapshot.into(),
            exports,
        }
    }

    /// When it expires.
    pub fn deadline(&self) -> Result<SystemTime, SourceError> {
        humantime::parse_rfc3339(&self.until)
            .map_err(|e| SourceError::Invalid(format!("kept view until {:?}: {e}", self.until)))
    }
}

/// `t` rounded up to the whole second (a deadline is never earlier than asked).
fn round_up(t: Duration) -> Duration {
    Duration::from_secs(t.as_secs() + u64::from(t.subsec_nanos() > 0))
}

/// `blockproof cleanup --when-expired`: waits until the view of `vm` kept now (if any)
/// expires, then releases it under the vm's lock — unless something else released it
/// first (it returns as soon as the journal no longer names that view). While a run or
/// a cleanup holds the vm's lock it waits: that holder releases the view itself. Returns
/// what was removed (nothing when it was released by something else).
pub fn release_when_expired(dir: &Path, vm: &str) -> Result<Vec<String>, SourceError> {
    let Some(id) = read_journal(dir, vm)?.and_then(|j| j.kept).map(|k| k.id) else {
        return Ok(Vec::new());
    };
    let ours = |dir: &Path| -> Result<Option<(crate::Journal, SystemTime)>, SourceError> {
        match read_journal(dir, vm)? {
            Some(j) => match &j.kept {
                Some(k) if k.id == id => {
                    let deadline = k.deadline()?;
                    Ok(Some((j, deadline)))
                }
                _ => Ok(None),
            },
            None => Ok(None),
        }
    };
    loop {
        let Some((_, deadline)) = ours(dir)? else { return Ok(Vec::new()) };
        let now = SystemTime::now();
        if now >= deadline {
            match VmLock::take(dir, vm, Duration::ZERO) {
                Ok(_lock) => {
                    return match ours(dir)? {
                        Some((j, _)) => undo(dir, &j),
                        None => Ok(Vec::new()),
                    }
                }
                // Held by a run or a cleanup of the vm: it releases the view itself.
                Err(SourceError::Invalid(_)) => std::thread::sleep(POLL),
                Err(e) => return Err(e),
            }
        } else {
            std::thread::sleep(POLL.min(deadline.duration_since(now).unwrap_or_default()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deadlines_round_up_to_the_second() {
        // 100.9 s + 1.5 s = 102.4 s: 103, never 102 (the fractions together pass a second).
        let t = Duration::from_millis(100_900) + Duration::from_millis(1500);
        assert_eq!(round_up(t), Duration::from_secs(103));
        assert_eq!(round_up(Duration::from_secs(7)), Duration::from_secs(7));
    }

    #[test]
    fn a_deadline_is_rounded_up_to_the_second_and_parses_back() {
        let keep = Duration::from_millis(1500);
        let before = SystemTime::now();
        let k = KeptView::new(keep, "ab", vec![]);
        let after = SystemTime::now();
        let deadline = k.deadline().unwrap();
        assert!(deadline >= before + keep, "never earlier than asked: {}", k.until);
        assert!(deadline <= after + keep + Duration::from_secs(1), "at most a second later: {}", k.until);
        assert!(k.until.ends_with('Z'), "{}", k.until);
        assert_ne!(k.id, KeptView::new(Duration::ZERO, "ab", vec![]).id, "each keep has its own id");
    }
}
