//! Forget: remove snapshots by id or by a retention policy, and protect snapshots from it.
//!
//! A policy keeps, per vm, the `last` N snapshots and the newest snapshot of each of the
//! last N hours, days, ISO weeks, months and years that have snapshots — the semantics of
//! restic's `forget --keep-*` and Proxmox Backup Server's prune, with calendar periods in
//! UTC; `within` keeps every snapshot younger than a duration before the vm's newest, and
//! `tags` every snapshot carrying one of them. A snapshot kept by any rule is kept;
//! protected snapshots are always kept.
//!
//! Retention works per disk by default ([`RetentionScope::Disk`]): the policy is applied
//! to the vm's snapshots as a whole and again to the snapshots holding each disk, and a
//! snapshot kept for any disk is kept. A backup that left a disk out therefore never
//! lets a vm-wide `--keep-last 1` remove that disk's last restore point. (Per disk keeps
//! a superset of what the vm-wide policy keeps: a snapshot newest in a period for the vm
//! is newest in it for each of its disks.) [`RetentionScope::Vm`] asks for the vm-wide
//! policy alone.
//! Forgetting removes only snapshot files: the data they alone referenced is removed by
//! garbage collection ([`crate::gc`]). Tainted snapshots follow the policy like any other:
//! nothing is ever deleted *because* of a mismatch.
//!
//! Before a file is removed, a forget record names it and a vm head naming it as the
//! latest is moved back to the newest remaining snapshot (`integrity.rs`), so that
//! `check` tells what forget removed from a deletion outside blockproof. Forgetting the
//! full id of a snapshot that is already missing, but still named by a head or a parent
//! reference, records that loss.

use std::collections::{BTreeMap, HashSet};

use blockproof_format::{Id, ObjectMagic};
use blockproof_repo::{LockKind, Removal, RepoError, Repository, SnapshotInfo};
use blockproof_store::Kind;
use serde::{Deserialize, Serialize};

use crate::integrity::Removed;
use crate::CoreError;

/// How many of each period to keep (`None`: the rule is off).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KeepPolicy {
    pub last: Option<u32>,
    pub hourly: Option<u32>,
    pub daily: Option<u32>,
    pub weekly: Option<u32>,
    pub monthly: Option<u32>,
    pub yearly: Option<u32>,
    /// Every snapshot younger than this before the vm's newest snapshot.
    pub within: Option<std::time::Duration>,
    /// Every snapshot carrying one of these tags.
    pub tags: Vec<String>,
}

/// What a retention policy is applied to.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RetentionScope {
    /// Each vm, and each disk of it: the last restore point of any disk stays.
    #[default]
    Disk,
    /// Each vm as a whole: a snapshot is judged by its time alone.
    Vm,
}

impl KeepPolicy {
    pub fn is_empty(&self) -> bool {
        *self == KeepPolicy::default()
    }
}

/// What to forget.
#[derive(Clone, Debug, Default)]
pub struct ForgetOptions {
    /// Snapshots to forget by reference (id, prefix, `VM:latest`).
    pub snapshots: Vec<String>,
    /// Or a policy, applied per vm.
    pub policy: KeepPolicy,
    /// Only this vm's snapshots.
    pub vm: Option<String>,
    /// Per disk (default) or per vm.
    pub scope: RetentionScope,
    pub dry_run: bool,
}

/// One snapshot and why it is kept or removed.
#[derive(Clone, Debug, Serialize)]
pub struct Decision {
    pub id: Id,
    pub vm: String,
    pub time: String,
    pub reasons: Vec<String>,
}

/// What forget did (or would do, with `dry_run`).
#[derive(Clone, Debug, Serialize)]
pub struct ForgetReport {
    pub dry_run: bool,
    pub kept: Vec<Decision>,
    pub removed: Vec<Decision>,
    pub warnings: Vec<String>,
}

/// The marker of a protected snapshot (`state/protect-<id>`).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Protection {
    snapshot: Id,
    time: String,
    host: String,
}

fn protect_name(id: &Id) -> String {
    format!("protect-{}", id.to_hex())
}

/// Through a repository server ([`blockproof_store::Backend::receipt_times`]), each
/// snapshot's time becomes the time the server received it, oldest first: a client that
/// wrote a back-dated (or future-dated) snapshot cannot place it in a retention window
/// and push real history out of it.
fn by_receipt_time(repo: &Repository, mut all: Vec<SnapshotInfo>) -> Result<Vec<SnapshotInfo>, CoreError> {
    if !repo.backend().receipt_times() {
        return Ok(all);
    }
    for s in &mut all {
        let received = repo.backend().modified(Kind::Snapshot, &s.id.to_hex())?;
        s.snapshot.time = humantime::format_rfc3339_seconds(received).to_string();
    }
    all.sort_by(|a, b| (&a.snapshot.time, &a.id).cmp(&(&b.snapshot.time, &b.id)));
    Ok(all)
}

/// The protected snapshots.
pub fn protected(repo: &Repository) -> Result<HashSet<Id>, CoreError> {
    let mut out = HashSet::new();
    for name in repo.backend().list(Kind::State)? {
        if let Some(hex) = name.strip_prefix("protect-") {
            if let Ok(id) = hex.parse() {
                out.insert(id);
            }
        }
    }
    Ok(out)
}

/// Protects a snapshot from forget (`on`) or lifts the protection.
pub fn set_protected(repo: &Repository, reference: &str, on: bool) -> Result<Id, CoreError> {
    let info = repo.resolve_snapshot(reference)?;
    if on {
        protect(repo, info.id)?;
    } else {
        repo.backend().remove(Kind::State, &protect_name(&info.id))?;
    }
    Ok(info.id)
}

/// Writes the protection marker of snapshot `id`.
pub(crate) fn protect(repo: &Repository, id: Id) -> Result<(), CoreError> {
    let p = Protection {
        snapshot: id,
        time: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
        host: crate::hostname(),
    };
    repo.write_doc(Kind::State, ObjectMagic::State, &protect_name(&id), &serde_json::to_vec(&p).expect("serializes"))?;
    Ok(())
}

/// Calendar fields of a UTC time: (year, month, day, hour, iso year, iso week).
fn calendar(time: &str) -> Option<(i64, u32, u32, u32, i64, u32)> {
    let t = humantime::parse_rfc3339_weak(time).ok()?;
    let secs = t.duration_since(std::time::UNIX_EPOCH).ok()?.as_secs() as i64;
    let days = secs.div_euclid(86400);
    let hour = (secs.rem_euclid(86400) / 3600) as u32;
    let (y, m, d) = civil_from_days(days);
    // ISO week: the week (Monday first) containing the year's first Thursday is week 1.
    let weekday = (days + 3).rem_euclid(7) as i64; // 0 = Monday (1970-01-01 was a Thursday)
    let thursday = days - weekday + 3;
    let (iso_year, _, _) = civil_from_days(thursday);
    let jan1 = days_from_civil(iso_year, 1, 1);
    let week = ((thursday - jan1) / 7 + 1) as u32;
    Some((y, m, d, hour, iso_year, week))
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian (H. Hinnant).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719468;
    let era = z.div_euclid(146097);
    let doe = z.rem_euclid(146097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = i64::from(if m > 2 { m - 3 } else { m + 9 });
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146097 + doe - 719468
}

/// Applies the policy to one vm's snapshots (oldest first); returns the reasons each
/// kept snapshot is kept, by index.
fn apply_policy(snaps: &[&SnapshotInfo], policy: &KeepPolicy) -> BTreeMap<usize, Vec<String>> {
    let mut keep: BTreeMap<usize, Vec<String>> = BTreeMap::new();
    let newest_first: Vec<usize> = (0..snaps.len()).rev().collect();
    if let Some(n) = policy.last {
        for &i in newest_first.iter().take(n as usize) {
            keep.entry(i).or_default().push("last".into());
        }
    }
    type Bucket = fn(&(i64, u32, u32, u32, i64, u32)) -> (i64, u32, u32, u32);
    let rules: [(&str, Option<u32>, Bucket); 5] = [
        ("hourly", policy.hourly, |c| (c.0, c.1, c.2, c.3)),
        ("daily", policy.daily, |c| (c.0, c.1, c.2, 0)),
        ("weekly", policy.weekly, |c| (c.4, c.5, 0, 0)),
        ("monthly", policy.monthly, |c| (c.0, c.1, 0, 0)),
        ("yearly", policy.yearly, |c| (c.0, 0, 0, 0)),
    ];
    for (name, count, bucket) in rules {
        let Some(count) = count else { continue };
        let mut seen = Vec::new();
        for &i in &newest_first {
            let Some(cal) = calendar(&snaps[i].snapshot.time) else { continue };
            let b = bucket(&cal);
            if seen.len() as u32 >= count {
                break;
            }
            if !seen.contains(&b) {
                seen.push(b);
                keep.entry(i).or_default().push(name.into());
            }
        }
    }
    if let Some(within) = policy.within {
        let since = |s: &SnapshotInfo| humantime::parse_rfc3339_weak(&s.snapshot.time).ok();
        if let Some(newest) = snaps.iter().filter_map(|s| since(s)).max() {
            let from = newest.checked_sub(within).unwrap_or(std::time::UNIX_EPOCH);
            for (i, s) in snaps.iter().enumerate() {
                if since(s).is_some_and(|t| t >= from) {
                    keep.entry(i).or_default().push("within".into());
                }
            }
        }
    }
    for (i, s) in snaps.iter().enumerate() {
        if let Some(tag) = policy.tags.iter().find(|t| s.snapshot.tags.contains(t)) {
            keep.entry(i).or_default().push(format!("tag {tag}"));
        }
    }
    keep
}

/// The policy applied to one vm's snapshots (oldest first) and, with
/// [`RetentionScope::Disk`], to the snapshots holding each of its disks: a snapshot kept
/// only for a disk says which (`last of disk os`).
fn retained(snaps: &[&SnapshotInfo], policy: &KeepPolicy, scope: RetentionScope) -> BTreeMap<usize, Vec<String>> {
    let mut keep = apply_policy(snaps, policy);
    if scope == RetentionScope::Vm {
        return keep;
    }
    let mut disks: Vec<&str> = snaps.iter().flat_map(|s| s.snapshot.disks.iter().map(|d| d.id.as_str())).collect();
    disks.sort_unstable();
    disks.dedup();
    let vm_wide: std::collections::BTreeSet<usize> = keep.keys().copied().collect();
    for disk in disks {
        let holding: Vec<usize> =
            (0..snaps.len()).filter(|&i| snaps[i].snapshot.disks.iter().any(|d| d.id == disk)).collect();
        let subset: Vec<&SnapshotInfo> = holding.iter().map(|&i| snaps[i]).collect();
        for (j, reasons) in apply_policy(&subset, policy) {
            let i = holding[j];
            if !vm_wide.contains(&i) {
                keep.entry(i).or_default().extend(reasons.into_iter().map(|r| format!("{r} of disk {disk}")));
            }
        }
    }
    keep
}

fn decision(s: &SnapshotInfo, reasons: Vec<String>) -> Decision {
    Decision { id: s.id, vm: s.snapshot.vm.clone(), time: s.snapshot.time.clone(), reasons }
}

/// Forgets snapshots by reference or by policy.
pub fn forget(repo: &Repository, opts: &ForgetOptions) -> Result<ForgetReport, CoreError> {
    if opts.snapshots.is_empty() == opts.policy.is_empty() {
        return Err(CoreError::Invalid(
            "give either snapshots to forget or a policy (--keep-last, --keep-daily, ...), not both or neither".into(),
        ));
    }
    let _lock = if opts.dry_run { None } else { Some(repo.lock(LockKind::Shared, "forget")?) };
    let protected = protected(repo)?;
    let mut kept = Vec::new();
    let mut removed = Vec::new();
    // The vm and disks of each snapshot removed (one that is already missing has none).
    let mut disks_of_removed: Vec<(String, Vec<String>)> = Vec::new();
    let disks = |s: &SnapshotInfo| (s.snapshot.vm.clone(), s.snapshot.disks.iter().map(|d| d.id.clone()).collect());
    if !opts.snapshots.is_empty() {
        let mut ids = Vec::new();
        for r in &opts.snapshots {
            let s = match repo.resolve_snapshot(r) {
                Ok(s) => s,
                Err(e @ RepoError::NotFound(_)) => match missing_but_referenced(repo, r)? {
                    // Already gone (removed outside blockproof): record its loss.
                    Some(d) if !ids.contains(&d.id) => {
                        ids.push(d.id);
                        removed.push(d);
                        continue;
                    }
                    Some(_) => continue,
                    None => return Err(e.into()),
                },
                Err(e) => return Err(e.into()),
            };
            if protected.contains(&s.id) {
                return Err(CoreError::Invalid(format!(
                    "snapshot {} is protected; run blockproof unprotect {} first",
                    s.id.short(),
                    s.id.short()
                )));
            }
            if !ids.contains(&s.id) {
                ids.push(s.id);
                removed.push(decision(&s, vec!["named".into()]));
                disks_of_removed.push(disks(&s));
            }
        }
    } else {
        // A policy needs every snapshot: a damaged or stray snapshot file is an error.
        let all = by_receipt_time(repo, repo.snapshots()?)?;
        let mut vms: Vec<&str> = all.iter().map(|s| s.snapshot.vm.as_str()).collect();
        vms.dedup();
        vms.sort_unstable();
        vms.dedup();
        for vm in vms.into_iter().filter(|v| opts.vm.as_deref().is_none_or(|w| w == *v)) {
            let snaps: Vec<&SnapshotInfo> = all.iter().filter(|s| s.snapshot.vm == vm).collect();
            let mut keep = retained(&snaps, &opts.policy, opts.scope);
            for (i, s) in snaps.iter().enumerate() {
                if protected.contains(&s.id) {
                    keep.entry(i).or_default().push("protected".into());
                }
            }
            for (i, s) in snaps.iter().enumerate() {
                match keep.remove(&i) {
                    Some(reasons) => kept.push(decision(s, reasons)),
                    None => {
                        removed.push(decision(s, vec![]));
                        disks_of_removed.push(disks(s));
                    }
                }
            }
        }
    }
    let mut warnings = Vec::new();
    if !opts.dry_run {
        // Recorded first (and the heads moved off them), so that a snapshot this removes
        // never counts as deleted outside blockproof, whenever a crash comes.
        let how = |d: &Decision| if d.reasons == [ALREADY_MISSING] { Removal::Missing } else { Removal::Forget };
        let records: Vec<Removed<'_>> =
            removed.iter().map(|d| Removed { id: d.id, vm: &d.vm, time: &d.time, how: how(d) }).collect();
        warnings = crate::integrity::record_forget(repo, &records)?;
        let mut gone = std::collections::HashSet::new();
        for d in removed.iter().filter(|d| how(d) == Removal::Forget) {
            repo.backend().remove(Kind::Snapshot, &d.id.to_hex())?;
            gone.insert(d.id);
        }
        // Their restore-test records go with them (what a crash here leaves, gc removes).
        crate::restore_test::remove_for(repo, &gone)?;
        // And the confirmation page summaries of a disk no snapshot has any more (a cache:
        // failing to remove them is a warning).
        if !disks_of_removed.is_empty() {
            let pruned = repo
                .scan_snapshots()
                .map_err(CoreError::from)
                .and_then(|scan| crate::page_summaries::prune(repo, &disks_of_removed, &scan.snapshots));
            if let Err(e) = pruned {
                warnings.push(format!("the confirmation page summaries of a removed disk could not be removed: {e}"));
            }
        }
    }
    Ok(ForgetReport { dry_run: opts.dry_run, kept, removed, warnings })
}

/// The reason of a snapshot forgotten by its full id that was already missing.
const ALREADY_MISSING: &str = "already missing";

/// A full snapshot id that is not in the repository but that a vm's head or a parent
/// reference names: forgetting it records the loss, so `check` no longer reports it.
fn missing_but_referenced(repo: &Repository, reference: &str) -> Result<Option<Decision>, CoreError> {
    let Some(id) = reference.parse::<Id>().ok().filter(|_| reference.len() == 64) else {
        return Ok(None);
    };
    Ok(crate::integrity::referenced_missing(repo, &id)?.map(|(vm, time)| Decision {
        id,
        vm,
        time,
        reasons: vec![ALREADY_MISSING.into()],
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calendar_and_iso_weeks() {
        assert_eq!(calendar("2026-11-22T16:05:00Z"), Some((2026, 11, 22, 16, 2026, 47)));
        // 2021-01-03 (a Sunday) belongs to ISO week 53 of 2020; 2024-12-30 to week 1 of 2025.
        assert_eq!(calendar("2021-01-03T00:00:00Z").map(|c| (c.4, c.5)), Some((2020, 53)));
        assert_eq!(calendar("2024-12-30T23:59:59.123456Z").map(|c| (c.4, c.5)), Some((2025, 1)));
        assert_eq!(calendar("2024-02-29T12:00:00Z").map(|c| (c.0, c.1, c.2)), Some((2024, 2, 29)));
        for d in [-1000, 0, 59, 365 * 30, 20000] {
            let (y, m, dd) = civil_from_days(d);
            assert_eq!(days_from_civil(y, m, dd), d);
        }
    }

    fn snap(time: &str) -> SnapshotInfo {
        snap_with(time, &[], &[])
    }

    fn snap_with(time: &str, disks: &[&str], tags: &[&str]) -> SnapshotInfo {
        let entry = |id: &str| blockproof_format::DiskEntry {
            id: id.into(),
            size: 0,
            chunk_size: 4096,
            index_root: Id::ZERO,
            index_fanout: 64,
            parent: None,
            source: String::new(),
            cbt: "none".into(),
            cbt_state: None,
            mode: blockproof_format::manifest::ReadMode::Full,
            full_reason: None,
            stats: Default::default(),
            mismatches: vec![],
            run: 1,
            confirm_root: None,
            coverage: None,
            next_full: None,
        };
        SnapshotInfo {
            id: Id(*blake3::hash(time.as_bytes()).as_bytes()),
            snapshot: blockproof_format::Snapshot {
                vm: "v".into(),
                time: time.into(),
                hostname: "h".into(),
                tags: tags.iter().map(|t| t.to_string()).collect(),
                status: blockproof_format::SnapshotStatus::Ok,
                disks: disks.iter().map(|d| entry(d)).collect(),
                program: "t".into(),
                copied_from: None,
                machine: None,
            },
        }
    }

    #[test]
    fn policy_keeps_newest_per_period() {
        // Two snapshots a day for ten days (oldest first).
        let times: Vec<String> =
            (1..=10).flat_map(|d| [format!("2026-11-{d:02}T01:00:00Z"), format!("2026-11-{d:02}T13:00:00Z")]).collect();
        let infos: Vec<SnapshotInfo> = times.iter().map(|t| snap(t)).collect();
        let refs: Vec<&SnapshotInfo> = infos.iter().collect();
        let p = KeepPolicy { last: Some(2), daily: Some(3), ..Default::default() };
        let keep = apply_policy(&refs, &p);
        let kept: Vec<usize> = keep.keys().copied().collect();
        // last 2: 19, 18; daily 3: newest of days 10, 9, 8 = 19, 17, 15.
        assert_eq!(kept, vec![15, 17, 18, 19]);
        assert_eq!(keep[&19], vec!["last".to_string(), "daily".to_string()]);
        let weekly = apply_policy(&refs, &KeepPolicy { weekly: Some(2), ..Default::default() });
        // ISO weeks: Nov 1 (Sunday) is week 44, Nov 2-8 week 45, Nov 9-10 week 46.
        assert_eq!(weekly.keys().copied().collect::<Vec<_>>(), vec![15, 19]);
        let monthly = apply_policy(&refs, &KeepPolicy { monthly: Some(5), yearly: Some(1), ..Default::default() });
        assert_eq!(monthly.keys().copied().collect::<Vec<_>>(), vec![19]);
    }

    #[test]
    fn per_disk_retention_keeps_each_disks_last_restore_point() {
        let infos = [
            snap_with("2026-11-01T01:00:00Z", &["os", "data"], &[]),
            snap_with("2026-11-02T01:00:00Z", &["data"], &[]),
            snap_with("2026-11-03T01:00:00Z", &["data"], &[]),
        ];
        let refs: Vec<&SnapshotInfo> = infos.iter().collect();
        let p = KeepPolicy { last: Some(1), ..Default::default() };
        let vm = retained(&refs, &p, RetentionScope::Vm);
        assert_eq!(vm.keys().copied().collect::<Vec<_>>(), vec![2]);
        let disk = retained(&refs, &p, RetentionScope::Disk);
        assert_eq!(disk.keys().copied().collect::<Vec<_>>(), vec![0, 2]);
        assert_eq!(disk[&0], vec!["last of disk os".to_string()]);
        assert_eq!(disk[&2], vec!["last".to_string()], "kept for the vm: no per-disk reason");
        // Daily: the os disk's only day is kept for it.
        let daily = retained(&refs, &KeepPolicy { daily: Some(2), ..Default::default() }, RetentionScope::Disk);
        assert_eq!(daily.keys().copied().collect::<Vec<_>>(), vec![0, 1, 2]);
    }

    #[test]
    fn within_is_measured_from_the_newest_and_tags_keep_their_snapshots() {
        let infos = [
            snap_with("2026-11-01T00:00:00Z", &[], &["monthly"]),
            snap_with("2026-11-05T00:00:00Z", &[], &[]),
            snap_with("2026-11-09T12:00:00Z", &[], &[]),
            snap_with("2026-11-10T00:00:00Z", &[], &["x"]),
        ];
        let refs: Vec<&SnapshotInfo> = infos.iter().collect();
        let p = KeepPolicy {
            within: Some(std::time::Duration::from_secs(86400)),
            tags: vec!["monthly".into()],
            ..Default::default()
        };
        let keep = apply_policy(&refs, &p);
        assert_eq!(keep.keys().copied().collect::<Vec<_>>(), vec![0, 2, 3]);
        assert_eq!(keep[&0], vec!["tag monthly".to_string()]);
        assert_eq!(keep[&2], vec!["within".to_string()]);
        assert!(!KeepPolicy { tags: vec!["t".into()], ..Default::default() }.is_empty());
    }
}
