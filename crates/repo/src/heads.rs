//! The record of a repository's snapshot set: a head per vm, and forget records.
//!
//! Snapshot files are named by their hash and nothing else ties one to the next, so a
//! deleted file, or a snapshots directory replaced by an older copy, would leave no
//! trace — and a change-list incremental would silently take an older parent than the
//! one its list is relative to. Two kinds of state documents (docs/FORMAT.md §20) make
//! it visible:
//!
//! - a **head** per vm (`state/head-<64 hex>`, named by the keyed hash of the vm name, so
//!   the name reveals nothing): the newest snapshot of the vm the repository must hold,
//!   per disk the newest snapshot a backup (or copy) committed holding it — what the
//!   next change list of that disk is relative to — and the snapshots a backup found
//!   missing. Backup and copy update it after each commit; forget moves `latest` back to
//!   the newest remaining snapshot before it removes the one it named.
//! - **forget records** (`state/forgotten-<16 hex>`): every snapshot file blockproof
//!   removes (forget; a backup withdrawing its snapshot after it lost its lock), written
//!   durably *before* the file is removed.
//!
//! Invariants: a head names only snapshots that were committed, and a snapshot file is
//! only ever removed by blockproof after a forget record names it. So a snapshot that a
//! head or a parent reference names, and that is neither present nor recorded, was
//! removed outside blockproof (or by an older blockproof, which keeps no records). A
//! crash between any two steps leaves either a head that lags behind a newer snapshot
//! (consistent) or a record of a snapshot still present (a warning: forget it again).
//!
//! Both documents are read strictly (§15a). Readers of forget records re-list when a
//! record disappears under them: a writer folds older records into a new one, durable
//! before the old ones are removed, so the listing after shows the successor.

use std::collections::{BTreeMap, HashMap};

use blockproof_format::{Id, ObjectMagic, Snapshot};
use blockproof_store::Kind;
use serde::{Deserialize, Serialize};

use crate::{RepoError, Repository};

/// Name prefix of heads in `state/`.
pub const HEAD_PREFIX: &str = "head-";
/// Name prefix of forget records in `state/`.
pub const FORGOTTEN_PREFIX: &str = "forgotten-";

/// A snapshot as a head records it: its id and time (ordered by time, then id, like
/// parents are chosen).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Recorded {
    pub snapshot: Id,
    pub time: String,
}

impl Recorded {
    pub fn of(id: Id, snapshot: &Snapshot) -> Recorded {
        Recorded { snapshot: id, time: snapshot.time.clone() }
    }

    /// Later by time, then id: the order in which a backup chooses its parent.
    pub fn is_newer_than(&self, other: &Recorded) -> bool {
        (&self.time, &self.snapshot) > (&other.time, &other.snapshot)
    }
}

/// What the repository recorded of one vm's snapshots (`state/head-<name id>`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Head {
    pub vm: String,
    /// Counts the writes of this head (1 for the first).
    pub seq: u64,
    /// The time of the first snapshot this head recorded: snapshots of the vm made from
    /// then on were made while the repository kept forget records.
    pub since: String,
    /// The newest snapshot of the vm the repository must hold, unless a forget record
    /// names it.
    pub latest: Recorded,
    /// Per disk id, the newest snapshot holding the disk that a backup or copy committed.
    /// Forget leaves it: a change list of the disk is relative to it.
    pub disks: BTreeMap<String, Recorded>,
    /// Snapshots the head named that a later backup found missing and unrecorded.
    pub missing: Vec<Recorded>,
}

impl Head {
    /// The head of a vm whose first recorded snapshot is `first`.
    pub fn new(vm: &str, first: Recorded) -> Head {
        Head {
            vm: vm.into(),
            seq: 0,
            since: first.time.clone(),
            latest: first,
            disks: BTreeMap::new(),
            missing: Vec::new(),
        }
    }

    /// Every snapshot this head names (with what it names it as), once each.
    pub fn named(&self) -> Vec<(&Recorded, Named<'_>)> {
        let mut out: Vec<(&Recorded, Named<'_>)> = vec![(&self.latest, Named::Latest)];
        for (disk, r) in &self.disks {
            if !out.iter().any(|(o, _)| o.snapshot == r.snapshot) {
                out.push((r, Named::Disk(disk)));
            }
        }
        for r in &self.missing {
            if !out.iter().any(|(o, _)| o.snapshot == r.snapshot) {
                out.push((r, Named::Missing));
            }
        }
        out
    }
}

/// What a head names a snapshot as.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Named<'a> {
    Latest,
    Disk(&'a str),
    Missing,
}

/// Why blockproof removed (or recorded the loss of) a snapshot file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Removal {
    /// `forget`.
    Forget,
    /// A backup or copy that lost its lock right after writing it took it back.
    Withdrawn,
    /// It was already missing; `forget ID` recorded the loss as intended.
    Missing,
}

/// One snapshot file blockproof removed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Forgotten {
    pub snapshot: Id,
    /// Its vm and time (empty when it was already missing and nothing named them).
    pub vm: String,
    pub time: String,
    /// When it was removed, seconds since the epoch (host clock).
    pub removed: u64,
    pub host: String,
    pub how: Removal,
}

impl Forgotten {
    pub fn new(snapshot: Id, vm: &str, time: &str, how: Removal) -> Forgotten {
        Forgotten {
            snapshot,
            vm: vm.into(),
            time: time.into(),
            removed: crate::lock::now_secs(),
            host: crate::lock::hostname(),
            how,
        }
    }
}

/// The content of `state/forgotten-<16 hex>`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ForgetRecord {
    snapshots: Vec<Forgotten>,
}

/// Every forget record of a repository.
#[derive(Clone, Debug, Default)]
pub struct ForgetRecords {
    /// By snapshot id (the earliest record of each).
    pub snapshots: HashMap<Id, Forgotten>,
    /// The record files read.
    pub files: Vec<String>,
    /// Record files that could not be read: the snapshots they name may be reported
    /// as missing.
    pub warnings: Vec<String>,
}

impl ForgetRecords {
    pub fn contains(&self, id: &Id) -> bool {
        self.snapshots.contains_key(id)
    }
}

/// How often a reader lists the records again when one disappears while it reads.
const RELIST: usize = 8;

impl Repository {
    /// The name of a vm's head in `state/`.
    pub fn head_name(&self, vm: &str) -> String {
        format!("{HEAD_PREFIX}{}", self.keys().name_id(vm).to_hex())
    }

    /// The head of `vm`, `None` if there is none. A head that does not open, does not
    /// parse, or belongs to another vm is an error ([`RepoError::is_damage`]).
    pub fn read_head(&self, vm: &str) -> Result<Option<Head>, RepoError> {
        let name = self.head_name(vm);
        match self.read_doc(Kind::State, ObjectMagic::State, &name) {
            Ok(bytes) => parse_head(&name, &bytes, Some(vm)).map(Some),
            Err(RepoError::Store(e)) if e.is_not_found() => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Writes (replaces) a head.
    pub fn write_head(&self, head: &Head) -> Result<(), RepoError> {
        let bytes = serde_json::to_vec(head).expect("a head serializes");
        self.write_doc(Kind::State, ObjectMagic::State, &self.head_name(&head.vm), &bytes)
    }

    pub fn remove_head(&self, vm: &str) -> Result<(), RepoError> {
        Ok(self.backend().remove(Kind::State, &self.head_name(vm))?)
    }

    /// Every readable head, and a warning for each that is not.
    pub fn heads(&self) -> Result<(Vec<Head>, Vec<String>), RepoError> {
        let (mut heads, mut warnings) = (Vec::new(), Vec::new());
        let mut names: Vec<String> =
            self.backend().list(Kind::State)?.into_iter().filter(|n| n.starts_with(HEAD_PREFIX)).collect();
        names.sort();
        for name in names {
            match self.read_doc(Kind::State, ObjectMagic::State, &name).and_then(|b| parse_head(&name, &b, None)) {
                Ok(h) => heads.push(h),
                Err(RepoError::Store(e)) if e.is_not_found() => {}
                Err(e) if e.is_damage() => warnings.push(format!(
                    "{e}: the record of a vm's latest snapshot is unreadable (its next backup writes it again; \
                     until then a deletion of that vm's snapshots may go unnoticed)"
                )),
                Err(e) => return Err(e),
            }
        }
        Ok((heads, warnings))
    }

    /// Every forget record. A record removed while it is read (folded into a newer one
    /// by a concurrent writer) makes the listing start over.
    pub fn forget_records(&self) -> Result<ForgetRecords, RepoError> {
        'list: for _ in 0..RELIST {
            let mut out = ForgetRecords::default();
            let mut names: Vec<String> =
                self.backend().list(Kind::State)?.into_iter().filter(|n| n.starts_with(FORGOTTEN_PREFIX)).collect();
            names.sort();
            for name in names {
                let record = self.read_doc(Kind::State, ObjectMagic::State, &name).and_then(|b| {
                    serde_json::from_slice::<ForgetRecord>(&b)
                        .map_err(|e| RepoError::corrupt(format!("forget record {name}"), e))
                });
                match record {
                    Ok(r) => {
                        for f in r.snapshots {
                            out.snapshots.entry(f.snapshot).or_insert(f);
                        }
                        out.files.push(name);
                    }
                    Err(RepoError::Store(e)) if e.is_not_found() => continue 'list,
                    Err(e) if e.is_damage() => {
                        out.warnings.push(format!("{e}: snapshots it recorded as forgotten may be reported as missing"))
                    }
                    Err(e) => return Err(e),
                }
            }
            return Ok(out);
        }
        Err(RepoError::Invalid("forget records keep changing while they are read; try again".into()))
    }

    /// Records that these snapshots are (about to be) removed, durably; call before
    /// removing their files. The records read so far are folded into the new one, and
    /// removed once it is durable, so their number stays small.
    pub fn record_forgotten(&self, entries: Vec<Forgotten>) -> Result<(), RepoError> {
        if entries.is_empty() {
            return Ok(());
        }
        let old = self.forget_records()?;
        let mut all: Vec<Forgotten> = old.snapshots.into_values().collect();
        for e in entries {
            if !all.iter().any(|a| a.snapshot == e.snapshot) {
                all.push(e);
            }
        }
        self.replace_forget_records(all, &old.files)
    }

    /// Drops these snapshots from the forget records (they were put back, from a
    /// repository server's trash); returns how many were recorded.
    pub fn unrecord_forgotten(&self, ids: &[Id]) -> Result<usize, RepoError> {
        let records = self.forget_records()?;
        let dropped = records.snapshots.keys().filter(|id| ids.contains(id)).count();
        if dropped == 0 {
            return Ok(0);
        }
        let rest: Vec<Forgotten> = records.snapshots.into_values().filter(|f| !ids.contains(&f.snapshot)).collect();
        self.replace_forget_records(rest, &records.files)?;
        Ok(dropped)
    }

    /// Writes `snapshots` as one new forget record, then removes the record files
    /// `replaced` (whose entries the caller folded in, or chose to drop).
    pub fn replace_forget_records(&self, mut snapshots: Vec<Forgotten>, replaced: &[String]) -> Result<(), RepoError> {
        snapshots.sort_by_key(|a| (a.removed, a.snapshot));
        if !snapshots.is_empty() {
            let name = format!("{FORGOTTEN_PREFIX}{}", hex::encode(rand::random::<[u8; 8]>()));
            let bytes = serde_json::to_vec(&ForgetRecord { snapshots }).expect("a record serializes");
            self.write_doc(Kind::State, ObjectMagic::State, &name, &bytes)?;
        }
        for name in replaced {
            self.backend().remove(Kind::State, name)?;
        }
        Ok(())
    }
}

fn parse_head(name: &str, bytes: &[u8], vm: Option<&str>) -> Result<Head, RepoError> {
    let head: Head = serde_json::from_slice(bytes).map_err(|e| RepoError::corrupt(format!("head {name}"), e))?;
    if vm.is_some_and(|v| v != head.vm) {
        return Err(RepoError::corrupt(format!("head {name}"), "it records another vm"));
    }
    Ok(head)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::InitOptions;
    use blockproof_format::KdfParams;
    use blockproof_store::LocalBackend;

    fn repo() -> (tempfile::TempDir, Repository) {
        let dir = tempfile::tempdir().unwrap();
        let opts = InitOptions { kdf: KdfParams::MIN, ..InitOptions::default() };
        let backend = LocalBackend::create(dir.path().join("r")).unwrap();
        let repo = Repository::init(Box::new(backend), b"pw", &opts).unwrap();
        (dir, repo)
    }

    fn rec(n: u8, time: &str) -> Recorded {
        Recorded { snapshot: Id([n; 32]), time: time.into() }
    }

    #[test]
    fn heads_round_trip_under_a_name_that_hides_the_vm() {
        let (_dir, repo) = repo();
        assert_eq!(repo.read_head("web01").unwrap(), None);
        let mut head = Head::new("web01", rec(1, "2026-12-03T10:00:00.000000Z"));
        head.disks.insert("sda".into(), rec(1, "2026-12-03T10:00:00.000000Z"));
        head.seq = 1;
        repo.write_head(&head).unwrap();
        assert_eq!(repo.read_head("web01").unwrap(), Some(head.clone()));
        let names = repo.backend().list(Kind::State).unwrap();
        assert_eq!(names, vec![repo.head_name("web01")]);
        assert!(!names[0].contains("web01") && names[0].len() == HEAD_PREFIX.len() + 64);
        assert_eq!(repo.heads().unwrap(), (vec![head.clone()], vec![]));
        // A head copied under another vm's name is refused, not believed.
        let bytes = repo.backend().read(Kind::State, &repo.head_name("web01")).unwrap();
        repo.backend().write(Kind::State, &repo.head_name("db01"), &bytes).unwrap();
        assert!(repo.read_head("db01").unwrap_err().is_damage());
        // Unknown fields are refused (strict), as a damaged head.
        let bad = serde_json::to_vec(&serde_json::json!({"vm": "x", "seq": 1, "since": "", "latest": {"snapshot": Id([1; 32]), "time": ""}, "disks": {}, "missing": [], "extra": 1})).unwrap();
        repo.write_doc(Kind::State, ObjectMagic::State, &repo.head_name("x"), &bad).unwrap();
        let err = repo.read_head("x").unwrap_err();
        assert!(err.is_damage() && err.to_string().contains("extra"), "{err}");
        repo.remove_head("web01").unwrap();
        assert_eq!(repo.read_head("web01").unwrap(), None);
    }

    #[test]
    fn named_lists_each_snapshot_once() {
        let mut head = Head::new("v", rec(1, "t1"));
        head.disks.insert("a".into(), rec(1, "t1"));
        head.disks.insert("b".into(), rec(2, "t0"));
        head.missing.push(rec(2, "t0"));
        head.missing.push(rec(3, "t2"));
        let named: Vec<(u8, Named<'_>)> = head.named().into_iter().map(|(r, n)| (r.snapshot.0[0], n)).collect();
        assert_eq!(named, vec![(1, Named::Latest), (2, Named::Disk("b")), (3, Named::Missing)]);
        assert!(rec(1, "t2").is_newer_than(&rec(9, "t1")) && rec(2, "t1").is_newer_than(&rec(1, "t1")));
    }

    #[test]
    fn forget_records_fold_into_one_and_skip_damaged_ones() {
        let (_dir, repo) = repo();
        let f = |n: u8| Forgotten::new(Id([n; 32]), "v", "t", Removal::Forget);
        repo.record_forgotten(vec![f(1), f(2)]).unwrap();
        repo.record_forgotten(vec![f(2), f(3)]).unwrap();
        let r = repo.forget_records().unwrap();
        assert_eq!(r.files.len(), 1, "the second record folded the first in");
        let mut ids: Vec<u8> = r.snapshots.keys().map(|i| i.0[0]).collect();
        ids.sort();
        assert_eq!(ids, vec![1, 2, 3]);
        repo.backend().write(Kind::State, "forgotten-0000000000000000", b"garbage").unwrap();
        let r = repo.forget_records().unwrap();
        assert_eq!((r.snapshots.len(), r.warnings.len()), (3, 1), "{:?}", r.warnings);
        // Dropping every entry leaves no record file (but the damaged one).
        repo.replace_forget_records(vec![], &r.files).unwrap();
        assert_eq!(repo.forget_records().unwrap().files, Vec::<String>::new());
    }
}
