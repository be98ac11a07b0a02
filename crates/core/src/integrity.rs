//! Snapshot-set integrity: what each operation does with the vms' heads and the forget
//! records ([`blockproof_repo::heads`]), so that a snapshot deleted or rolled back outside
//! blockproof is reported, and a change-list incremental never inherits from an older
//! parent than the restore point its changes are relative to.
//!
//! - **backup** ([`Lineage`]): before planning, reads its vm's head. A disk whose changes
//!   are only the caller's word ([`Base::Assumed`]: `bitmap:NAME`, a change list without
//!   `baseChangeId`) is read in full when the head records a newer restore point of the
//!   disk than the parent the backup found — that one was forgotten, or removed outside
//!   blockproof, and the changes may be relative to it. After the commit
//!   ([`record_commit`], also for `copy`) the head names the new snapshot.
//! - **forget** ([`record_forget`]): records what it removes, then moves each head whose
//!   latest snapshot it removes back to the newest remaining one, then removes the files.
//! - **check** ([`check_snapshot_set`]): errors for a snapshot a head names, or a parent
//!   reference of a snapshot made since its vm's head exists, that is neither present nor
//!   recorded; warnings for a recorded snapshot that is present again.
//! - **gc** ([`prune_records`]): drops the records nothing references any more.
//!
//! Crash safety: every step leaves a head that names a present or recorded snapshot,
//! possibly older than a newer present one (a commit whose head update was lost). Two
//! writers of one head at once lose one update, which only lags the head; records are
//! only added, except by gc, which keeps any written after the oldest running operation
//! began.

use std::collections::{HashMap, HashSet};

use blockproof_format::{Id, Snapshot};
use blockproof_repo::heads::{Forgotten, Head, Named, Recorded, Removal};
use blockproof_repo::{RepoError, Repository, SnapshotInfo};
use blockproof_source::Base;
use blockproof_store::Kind;

use crate::CoreError;

/// Whether a snapshot file exists (damaged or not). A storage error counts as present:
/// nothing is ever called missing on a guess.
fn exists(repo: &Repository, id: &Id) -> bool {
    match repo.backend().size(Kind::Snapshot, &id.to_hex()) {
        Ok(_) => true,
        Err(e) => !e.is_not_found(),
    }
}

fn outside(full: &Id) -> String {
    format!(
        "deleted or rolled back outside blockproof, or forgotten by a blockproof that kept no forget records (if \
         that was intended, record it with: blockproof forget {full})"
    )
}

/// The error (check) or warning (backup) for a snapshot a head names that is gone.
fn missing(r: &Recorded, named: Named<'_>, vm: &str) -> String {
    let (id, time) = (&r.snapshot, &r.time);
    match named {
        Named::Latest => format!("snapshot {id} ({time}), the latest of vm {vm}, is missing: {}", outside(id)),
        Named::Disk(d) => {
            format!("snapshot {id} ({time}), the latest of disk {d} of vm {vm}, is missing: {}", outside(id))
        }
        Named::Missing => {
            format!("snapshot {id} ({time}) of vm {vm} is missing (a later backup found it so): {}", outside(id))
        }
    }
}

/// What a backup knows of its vm's recorded snapshots.
pub(crate) struct Lineage {
    head: Option<Head>,
    /// Snapshots the head names that are not there: `true` if a forget record names them.
    gone: HashMap<Id, bool>,
    warnings: Vec<String>,
}

impl Lineage {
    /// Reads the head of `vm`; `snapshots` are the readable snapshots the backup found.
    pub(crate) fn load(repo: &Repository, vm: &str, snapshots: &[SnapshotInfo]) -> Result<Lineage, CoreError> {
        let mut warnings = Vec::new();
        let head = match repo.read_head(vm) {
            Ok(h) => h,
            Err(e) if e.is_damage() => {
                warnings.push(format!("{e}: the record of vm {vm}'s snapshots is unreadable; this backup rewrites it"));
                None
            }
            Err(e) => return Err(e.into()),
        };
        let mut gone = HashMap::new();
        if let Some(h) = &head {
            let absent: Vec<(&Recorded, Named<'_>)> = h
                .named()
                .into_iter()
                .filter(|(r, _)| !snapshots.iter().any(|s| s.id == r.snapshot) && !exists(repo, &r.snapshot))
                .collect();
            if !absent.is_empty() {
                let records = repo.forget_records()?;
                warnings.extend(records.warnings.iter().cloned());
                for (r, named) in absent {
                    let recorded = records.contains(&r.snapshot);
                    if !recorded {
                        warnings.push(missing(r, named, vm));
                    }
                    gone.insert(r.snapshot, recorded);
                }
            }
        }
        Ok(Lineage { head, gone, warnings })
    }

    pub(crate) fn warnings(&self) -> Vec<String> {
        self.warnings.clone()
    }

    /// Why disk `disk`, whose changes are relative to `base`, cannot be read
    /// incrementally from `parent`: the head records a newer restore point of the disk,
    /// which is gone. A head that records an older one lags behind (its update after a
    /// commit was lost): the parent is the newest, as the changes assume.
    pub(crate) fn unbound(&self, base: Base, disk: &str, parent: &SnapshotInfo) -> Option<String> {
        if base == Base::Parent {
            return None;
        }
        let r = self.head.as_ref()?.disks.get(disk)?;
        if r.snapshot == parent.id || !r.is_newer_than(&Recorded::of(parent.id, &parent.snapshot)) {
            return None;
        }
        let (x, p) = (r.snapshot.short(), parent.id.short());
        Some(match self.gone.get(&r.snapshot) {
            Some(true) => format!(
                "restore point {x} of disk {disk} ({}), newer than its parent {p}, was forgotten: the changes may be \
                 relative to it",
                r.time
            ),
            Some(false) => format!(
                "restore point {x} of disk {disk} ({}), the latest the repository recorded, is missing: deleted or \
                 rolled back outside blockproof; the changes may be relative to it, not to {p}",
                r.time
            ),
            None => format!(
                "restore point {x} of disk {disk} ({}) is newer than its parent {p} but could not be read: the \
                 changes may be relative to it",
                r.time
            ),
        })
    }
}

/// Records a committed snapshot in its vm's head (backup, copy): the newer of it and the
/// head's latest becomes the latest; per disk likewise. A snapshot the head named that
/// this replaces, and that is neither present nor recorded, is kept in `missing` (until a
/// forget record names it: `forget ID` accepted the loss). Returns
/// warnings: a failure here is not the commit's (a head that lags is consistent).
pub(crate) fn record_commit(repo: &Repository, id: Id, snapshot: &Snapshot) -> Vec<String> {
    update_head(repo, id, snapshot).unwrap_or_else(|e| {
        vec![format!(
            "the record of vm {}'s latest snapshot could not be updated ({e}); the snapshot is committed",
            snapshot.vm
        )]
    })
}

fn update_head(repo: &Repository, id: Id, snapshot: &Snapshot) -> Result<Vec<String>, RepoError> {
    let new = Recorded::of(id, snapshot);
    let mut warnings = Vec::new();
    let mut head = match repo.read_head(&snapshot.vm) {
        Ok(Some(h)) => h,
        Ok(None) => Head::new(&snapshot.vm, new.clone()),
        Err(e) if e.is_damage() => {
            warnings.push(format!("{e}: the record of vm {}'s snapshots starts over", snapshot.vm));
            Head::new(&snapshot.vm, new.clone())
        }
        Err(e) => return Err(e),
    };
    let mut replaced = Vec::new();
    if new.is_newer_than(&head.latest) {
        replaced.push(std::mem::replace(&mut head.latest, new.clone()));
    }
    for d in &snapshot.disks {
        match head.disks.get(&d.id) {
            Some(r) if !new.is_newer_than(r) => {}
            _ => replaced.extend(head.disks.insert(d.id.clone(), new.clone())),
        }
    }
    replaced.retain(|r| r.snapshot != id);
    let still_named: HashSet<Id> = head.named().iter().map(|(r, _)| r.snapshot).collect();
    let mut gone: Vec<Recorded> =
        replaced.into_iter().filter(|r| !still_named.contains(&r.snapshot) && !exists(repo, &r.snapshot)).collect();
    let mut once = HashSet::new();
    gone.retain(|r| once.insert(r.snapshot));
    if !gone.is_empty() || !head.missing.is_empty() {
        // Missing ones since recorded (`forget ID`), or back, need no mention any more.
        let records = repo.forget_records()?;
        head.missing.extend(gone);
        head.missing.retain(|r| !records.contains(&r.snapshot) && !exists(repo, &r.snapshot));
    }
    head.seq = head.seq.saturating_add(1);
    repo.write_head(&head)?;
    Ok(warnings)
}

/// A snapshot to remove: id, vm, time.
pub(crate) struct Removed<'a> {
    pub id: Id,
    pub vm: &'a str,
    pub time: &'a str,
    pub how: Removal,
}

/// Before forget removes `removed` (and records snapshots already missing): writes their
/// forget record, then moves each head whose latest snapshot is among them back to the
/// newest remaining snapshot of its vm (or removes the head when none remains). Returns
/// warnings. The caller removes the files only after this returned `Ok`.
pub(crate) fn record_forget(repo: &Repository, removed: &[Removed<'_>]) -> Result<Vec<String>, CoreError> {
    let mut warnings = Vec::new();
    repo.record_forgotten(removed.iter().map(|r| Forgotten::new(r.id, r.vm, r.time, r.how)).collect())?;
    let ids: HashSet<Id> = removed.iter().map(|r| r.id).collect();
    let mut vms: Vec<&str> = removed.iter().map(|r| r.vm).filter(|v| !v.is_empty()).collect();
    vms.sort_unstable();
    vms.dedup();
    let mut remaining: Option<Vec<SnapshotInfo>> = None;
    for vm in vms {
        let mut head = match repo.read_head(vm) {
            Ok(Some(h)) if ids.contains(&h.latest.snapshot) => h,
            Ok(_) => continue,
            Err(e) if e.is_damage() => {
                warnings
                    .push(format!("{e}: the record of vm {vm}'s snapshots is unreadable; its next backup rewrites it"));
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        if remaining.is_none() {
            let scan = repo.scan_snapshots()?;
            remaining = Some(scan.snapshots.into_iter().filter(|s| !ids.contains(&s.id)).collect());
        }
        let newest = remaining.as_deref().unwrap_or_default().iter().rev().find(|s| s.snapshot.vm == vm);
        match newest {
            Some(s) => {
                head.latest = Recorded::of(s.id, &s.snapshot);
                head.seq = head.seq.saturating_add(1);
                repo.write_head(&head)?;
            }
            None => repo.remove_head(vm)?,
        }
    }
    Ok(warnings)
}

/// The vm and time of a snapshot that is missing but referenced — by a head, or as a
/// parent by a snapshot — so that `forget ID` can record its loss; `None` if nothing
/// references it.
pub(crate) fn referenced_missing(repo: &Repository, id: &Id) -> Result<Option<(String, String)>, CoreError> {
    let (heads, _) = repo.heads()?;
    for h in &heads {
        if let Some((r, _)) = h.named().into_iter().find(|(r, _)| r.snapshot == *id) {
            return Ok(Some((h.vm.clone(), r.time.clone())));
        }
    }
    let scan = repo.scan_snapshots()?;
    Ok(scan
        .snapshots
        .iter()
        .find(|s| s.snapshot.disks.iter().any(|d| d.parent == Some(*id)))
        .map(|s| (s.snapshot.vm.clone(), String::new())))
}

/// The heads, read by `check` before it lists the snapshots (a head read later could
/// name a snapshot committed after the listing).
pub(crate) struct HeadsSeen {
    heads: Vec<Head>,
    warnings: Vec<String>,
}

pub(crate) fn read_heads(repo: &Repository) -> Result<HeadsSeen, CoreError> {
    let (heads, warnings) = repo.heads()?;
    Ok(HeadsSeen { heads, warnings })
}

impl HeadsSeen {
    pub(crate) fn report(&self) -> Vec<crate::check::HeadReport> {
        let mut out: Vec<_> = self
            .heads
            .iter()
            .map(|h| crate::check::HeadReport {
                vm: h.vm.clone(),
                seq: h.seq,
                latest: h.latest.snapshot,
                time: h.latest.time.clone(),
            })
            .collect();
        out.sort_by(|a, b| a.vm.cmp(&b.vm));
        out
    }
}

/// Check's part: `present` are the names in `snapshots/` (listed after the heads were
/// read), `loaded` the snapshots that could be read. The forget records are read last:
/// a snapshot removed after the listing was recorded before it went.
pub(crate) fn check_snapshot_set(
    repo: &Repository,
    seen: HeadsSeen,
    present: &HashSet<Id>,
    loaded: &[SnapshotInfo],
    errors: &mut Vec<String>,
    warnings: &mut Vec<String>,
) -> Result<(), CoreError> {
    let records = repo.forget_records()?;
    warnings.extend(seen.warnings);
    warnings.extend(records.warnings.iter().cloned());
    let lost = |id: &Id| !present.contains(id) && !records.contains(id);
    for h in &seen.heads {
        for (r, named) in h.named() {
            if lost(&r.snapshot) {
                errors.push(missing(r, named, &h.vm));
            }
        }
    }
    // Parent references, for snapshots made since their vm's head exists (earlier ones
    // may name parents forgotten before forget kept records).
    let since: HashMap<&str, &str> = seen.heads.iter().map(|h| (h.vm.as_str(), h.since.as_str())).collect();
    let mut reported = HashSet::new();
    for s in loaded {
        let tracked = since.get(s.snapshot.vm.as_str()).is_some_and(|t| s.snapshot.time.as_str() >= *t);
        if !tracked {
            continue;
        }
        for d in &s.snapshot.disks {
            if let Some(p) = d.parent.filter(|p| lost(p) && reported.insert(*p)) {
                errors.push(format!(
                    "snapshot {p}, the parent of disk {} in snapshot {} of vm {}, is missing: {}",
                    d.id,
                    s.id.short(),
                    s.snapshot.vm,
                    outside(&p)
                ));
            }
        }
    }
    let mut again: Vec<&Forgotten> = records.snapshots.values().filter(|f| present.contains(&f.snapshot)).collect();
    again.sort_by_key(|f| f.snapshot);
    for f in again {
        let how = match f.how {
            Removal::Forget => "forgotten",
            Removal::Withdrawn => "withdrawn by a backup that lost its lock",
            Removal::Missing => "recorded as missing",
        };
        let when = blockproof_repo::time_text(f.removed);
        warnings.push(format!(
            "snapshot {} of vm {} was {how} ({when}) but is present: a forget was interrupted, or the snapshots \
             directory was restored from an older copy; blockproof forget {} removes it again",
            f.snapshot, f.vm, f.snapshot
        ));
    }
    Ok(())
}

/// gc's part: drops the forget records nothing needs any more — of a snapshot no head
/// names, no snapshot names as a parent and that is not present — once they are older
/// than the oldest operation still running (less clock skew: a running backup may have
/// chosen the snapshot as its parent before it was forgotten). `others` are the live
/// locks' creation times, gc's own excluded. Returns how many were dropped.
pub(crate) fn prune_records(repo: &Repository, others: &[u64]) -> Result<u64, CoreError> {
    let records = repo.forget_records()?;
    if records.snapshots.is_empty() {
        return Ok(0);
    }
    let (heads, _) = repo.heads()?;
    let snapshots = repo.snapshots()?;
    let present: HashSet<Id> = repo.backend().list(Kind::Snapshot)?.iter().filter_map(|n| n.parse().ok()).collect();
    let mut needed: HashSet<Id> = heads.iter().flat_map(|h| h.named().into_iter().map(|(r, _)| r.snapshot)).collect();
    needed.extend(snapshots.iter().flat_map(|s| s.snapshot.disks.iter().filter_map(|d| d.parent)));
    needed.extend(present);
    let running_since =
        others.iter().min().copied().unwrap_or(u64::MAX).saturating_sub(crate::gc::CLOCK_SKEW.as_secs());
    let total = records.snapshots.len();
    let keep: Vec<Forgotten> = records
        .snapshots
        .into_values()
        .filter(|f| needed.contains(&f.snapshot) || f.removed >= running_since)
        .collect();
    let dropped = (total - keep.len()) as u64;
    if dropped > 0 {
        repo.replace_forget_records(keep, &records.files)?;
    }
    Ok(dropped)
}
