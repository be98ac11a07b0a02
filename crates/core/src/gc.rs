//! Garbage collection: remove the packs no snapshot needs, safely while backups run.
//!
//! ## Two phases
//!
//! 1. **Mark and plan.** Under the gc lock (one gc at a time), walk every snapshot's
//!    trees (index pages, chunks, confirmation pages) and mark the referenced blobs, as
//!    bits over the blob index's table (`live_blobs.rs`).
//!    Packs with no referenced blob, and packs no index lists (left by crashed backups,
//!    or being written right now), are *planned* for deletion; packs whose unreferenced
//!    share reaches the repack threshold have their referenced blobs copied into new
//!    packs first and are planned too. The plan is a sealed document `state/gc-plan-*`
//!    with its creation time.
//! 2. **Sweep.** A plan may be carried out once no backup that could use its packs is
//!    still running: no live shared lock was created before the plan (plus a margin for
//!    clock skew). Backups that start after a plan exists never deduplicate against
//!    planned packs (they load the index without them), so only backups older than the
//!    plan matter — and once they have finished, their snapshots are visible. The sweep
//!    marks again and deletes a planned pack only if every blob in it that is referenced
//!    now has another copy in a pack that stays and exists (an index entry of a lost pack
//!    is no copy). It writes new index files without the
//!    deleted packs, removes the old index files, then the packs; then rewrites any index
//!    file that appeared since its load naming a deleted pack (written by a backup that
//!    lost its lock as it wrote it); then removes the plan.
//!
//! A gc that finds its plan not yet safe leaves it for the next gc and says so.
//!
//! | running \ starting | backup | forget | gc | check / restore |
//! |---|---|---|---|---|
//! | backup | yes | yes | yes (defers what the backup may use) | yes |
//! | forget | yes | yes | yes (marks what is still listed) | yes |
//! | gc | yes (skips planned packs) | yes | no (gc lock) | yes, but a restore of a snapshot forgotten meanwhile may fail |
//!
//! ## Crash safety
//!
//! Every step leaves a consistent repository: a plan is only a list; new packs and index
//! files are durable before anything is removed; old index files go before their packs,
//! so a crash leaves at worst unindexed packs (planned by the next gc) or blobs listed
//! twice (harmless).

use std::collections::HashSet;
use std::time::Duration;

use blockproof_format::{BlobEntry, Id, IndexFile, ObjectMagic};
use blockproof_repo::lock::now_secs;
use blockproof_repo::{BlobIndex, Lock, LockKind, Marks, PackWriter, Repository, SealedBlob};
use blockproof_store::Kind;
use serde::{Deserialize, Serialize};

use crate::live_blobs::{covered, for_each_live_list, mark, pack_usage, refuse_if_data_missing, LiveBlobs};
use crate::{CoreError, Progress};

/// What a test runs in the middle of a sweep.
#[cfg(test)]
type SweepHook = Box<dyn FnOnce(&Repository)>;

#[cfg(test)]
thread_local! {
    /// Blob index loads by gc on this thread (tests).
    static INDEX_LOADS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
    /// Run once by the next sweep on this thread after it rewrote the index files and
    /// before it deletes packs (tests of what other processes do meanwhile).
    static BEFORE_DELETE: std::cell::RefCell<Option<SweepHook>> = const { std::cell::RefCell::new(None) };
}

fn load_index(repo: &Repository) -> Result<BlobIndex, CoreError> {
    #[cfg(test)]
    INDEX_LOADS.with(|n| n.set(n.get() + 1));
    Ok(BlobIndex::load(repo)?)
}

/// The index, its marks and the packs stored, as one mark left them.
type Marked = (BlobIndex, LiveBlobs, Vec<(String, Id)>);

/// Backups whose lock is younger than a plan by less than this still block its sweep
/// (clocks of different hosts may disagree).
pub const CLOCK_SKEW: Duration = Duration::from_secs(60);

/// What to do.
#[derive(Clone, Debug)]
pub struct GcOptions {
    /// Repack a pack when at least this fraction of its bytes is unreferenced.
    pub repack_threshold: f64,
    /// Only report what would be done.
    pub dry_run: bool,
    /// Also rewrite cold LZ4 packs with zstd ([`crate::recompress`]).
    pub recompress: Option<crate::RecompressOptions>,
}

impl Default for GcOptions {
    fn default() -> Self {
        GcOptions { repack_threshold: 0.25, dry_run: false, recompress: None }
    }
}

/// What gc did.
#[derive(Clone, Debug, Default, Serialize)]
pub struct GcReport {
    pub dry_run: bool,
    pub snapshots: u64,
    pub referenced_blobs: u64,
    pub packs: u64,
    /// Packs removed and the bytes that freed.
    pub packs_deleted: u64,
    pub bytes_freed: u64,
    /// Packs whose live blobs were copied into new packs.
    pub packs_repacked: u64,
    pub bytes_repacked: u64,
    pub index_files_rewritten: u64,
    /// Packs planned but not yet removed: backups that were running may still use them.
    pub packs_deferred: u64,
    pub bytes_deferred: u64,
    /// Temporary files of interrupted writes removed (older than [`TEMP_AGE`]).
    pub temporary_files_removed: u64,
    /// Forget records of snapshots nothing references any more, dropped.
    pub forget_records_dropped: u64,
    /// Restore-test records of restore points that are gone, removed.
    pub restore_test_records_dropped: u64,
    /// Packs rewritten with zstd (`--recompress`), and the sealed bytes of their
    /// referenced blobs before and after (with a dry run: the packs that would be, and
    /// their bytes before).
    pub packs_recompressed: u64,
    pub bytes_recompressed_from: u64,
    pub bytes_recompressed_to: u64,
}

/// Temporary files older than this belong to writers that died.
pub const TEMP_AGE: Duration = Duration::from_secs(3600);

/// A deletion plan (`state/gc-plan-<random>`), read strictly (FORMAT §15a).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Plan {
    created: u64,
    host: String,
    packs: Vec<Id>,
}

const PLAN_PREFIX: &str = "gc-plan-";

/// Packs named by any gc plan: backups do not deduplicate against them.
pub fn planned_packs(repo: &Repository) -> Result<HashSet<Id>, CoreError> {
    Ok(plans(repo)?.into_iter().flat_map(|(_, p)| p.packs).collect())
}

fn plans(repo: &Repository) -> Result<Vec<(String, Plan)>, CoreError> {
    let mut out = Vec::new();
    for name in repo.backend().list(Kind::State)? {
        if !name.starts_with(PLAN_PREFIX) {
            continue;
        }
        match repo.read_doc(Kind::State, ObjectMagic::State, &name) {
            Ok(bytes) => {
                let plan = serde_json::from_slice(&bytes)
                    .map_err(|e| blockproof_repo::RepoError::corrupt(format!("gc plan {name}"), e))?;
                out.push((name, plan));
            }
            Err(blockproof_repo::RepoError::Store(e)) if e.is_not_found() => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(out)
}

/// The packs that exist, by id (names that are not ids are not packs of this format).
fn stored_packs(repo: &Repository) -> Result<Vec<(String, Id)>, CoreError> {
    Ok(repo.backend().list(Kind::Pack)?.into_iter().filter_map(|n| n.parse::<Id>().ok().map(|id| (n, id))).collect())
}

/// Runs garbage collection. A gc that fails after it deleted packs says how many, and
/// the bytes that freed, in its error ([`CoreError::Interrupted`]): they are gone, and
/// the next gc does not count them again.
pub fn gc(repo: &Repository, opts: &GcOptions, progress: &dyn Progress) -> Result<GcReport, CoreError> {
    let mut report = GcReport { dry_run: opts.dry_run, ..GcReport::default() };
    match collect(repo, opts, progress, &mut report) {
        Ok(()) => Ok(report),
        Err(e) if report.packs_deleted > 0 => Err(CoreError::Interrupted {
            operation: "gc",
            done: format!(
                "freed {} bytes in {} pack{} (gone: a later gc does not count them again)",
                report.bytes_freed,
                report.packs_deleted,
                if report.packs_deleted == 1 { "" } else { "s" }
            ),
            source: Box::new(e),
        }),
        Err(e) => Err(e),
    }
}

fn collect(
    repo: &Repository,
    opts: &GcOptions,
    progress: &dyn Progress,
    report: &mut GcReport,
) -> Result<(), CoreError> {
    let lock = repo.lock(LockKind::Gc, "gc")?;

    // Mark, and refuse if referenced data is missing: before anything is deleted.
    let index = load_index(repo)?;
    let live = mark(repo, &index)?;
    let stored = stored_packs(repo)?;
    refuse_if_data_missing(repo, &index, &live, &stored.iter().map(|(_, id)| *id).collect())?;
    let mut marked = Some((index, live, stored));

    // Carry out earlier plans that have become safe; drop forget records nothing needs.
    if !opts.dry_run {
        report.temporary_files_removed = repo.backend().clean_temporary(TEMP_AGE)?;
        for (name, plan) in plans(repo)? {
            if blocked(repo, &lock, &plan)? {
                defer(repo, &plan.packs, report);
                continue;
            }
            // A sweep loads the index and marks again: one index in memory at a time. One
            // that changed nothing hands its marks back.
            drop(marked.take());
            marked = sweep(repo, &lock, &name, &plan, report)?;
        }
        let others: Vec<u64> =
            repo.live_locks()?.into_iter().filter(|(n, _)| n != lock.name()).map(|(_, l)| l.created).collect();
        report.forget_records_dropped = crate::integrity::prune_records(repo, &others)?;
        report.restore_test_records_dropped = crate::restore_test::remove_orphans(repo)?;
    }

    // Mark again after a sweep that changed the index.
    let (index, live, stored) = match marked {
        Some(m) => m,
        None => {
            let index = load_index(repo)?;
            let live = mark(repo, &index)?;
            (index, live, stored_packs(repo)?)
        }
    };
    report.snapshots = live.snapshots;
    report.referenced_blobs = live.count();
    let already: HashSet<Id> = planned_packs(repo)?;

    // Plan, from the index's table and the marks: each pack's live and dead bytes.
    let usage = pack_usage(&index, &live);
    // A local cache of the index that failed its check gave an incomplete table: no plan
    // is made on it.
    if let Some(e) = index.damage() {
        return Err(e.into());
    }
    report.packs = stored.len() as u64;
    let mut doomed = Vec::new();
    let mut repack = Vec::new();
    for &(_, pack) in &stored {
        if already.contains(&pack) {
            continue;
        }
        match index.pack_position(&pack).map(|p| usage[p as usize]) {
            None => doomed.push(pack), // unindexed: a crashed backup's, or one being written
            Some(u) => {
                if u.dead == u.total {
                    doomed.push(pack);
                } else if u.total > 0 && u.dead as f64 / u.total as f64 >= opts.repack_threshold {
                    repack.push(pack);
                }
            }
        }
    }
    let chosen = match &opts.recompress {
        Some(r) => {
            let skip: HashSet<Id> = already.iter().chain(&doomed).chain(&repack).copied().collect();
            crate::recompress::choose(repo, r, &stored, &index, &usage, &skip)?
        }
        None => Vec::new(),
    };
    if opts.dry_run {
        report.packs_recompressed = chosen.len() as u64;
        report.bytes_recompressed_from = chosen.iter().map(|c| c.size).sum();
        report.packs_deleted = doomed.len() as u64;
        report.packs_repacked = repack.len() as u64;
        for p in doomed.iter().chain(&repack) {
            report.bytes_freed += repo.backend().size(Kind::Pack, &p.to_hex()).unwrap_or(0);
        }
        return Ok(());
    }

    // Repack: copy the live blobs of sparse packs into new packs (durable, indexed).
    if !repack.is_empty() {
        progress.begin_count("repack", repack.len() as u64);
        let mut writer = PackWriter::new(repo);
        for_each_live_list(&index, &live, &usage, &repack, |k, entries| {
            for e in entries {
                let mut bytes = vec![0u8; e.length as usize];
                repo.backend().read_at(Kind::Pack, &repack[k].to_hex(), e.offset, &mut bytes)?;
                report.bytes_repacked += u64::from(e.length);
                writer.add(SealedBlob {
                    kind: e.kind,
                    id: e.id,
                    compression: e.compression,
                    raw_length: e.raw_length,
                    bytes,
                })?;
            }
            progress.advance(1);
            Ok(true)
        })?;
        writer.finish()?;
        progress.end();
        report.packs_repacked = repack.len() as u64;
    }

    doomed.extend(repack);
    if let Some(r) = &opts.recompress {
        doomed.extend(crate::recompress::rewrite(repo, r, &chosen, &index, &live, &usage, report, progress)?);
    }
    // The sweep loads the index and marks again.
    drop((index, live, usage));
    if !doomed.is_empty() {
        let plan = Plan { created: now_secs(), host: crate::hostname(), packs: doomed };
        let name = format!("{PLAN_PREFIX}{}", hex::encode(rand::random::<[u8; 8]>()));
        let bytes = serde_json::to_vec(&plan).expect("a plan serializes");
        repo.write_doc(Kind::State, ObjectMagic::State, &name, &bytes)?;
        sweep(repo, &lock, &name, &plan, report)?;
    }
    Ok(())
}

fn defer(repo: &Repository, packs: &[Id], report: &mut GcReport) {
    report.packs_deferred += packs.len() as u64;
    for p in packs {
        report.bytes_deferred += repo.backend().size(Kind::Pack, &p.to_hex()).unwrap_or(0);
    }
}

/// Carries out a plan if it is safe now; otherwise counts it as deferred. Whatever the
/// lock files say, a pack written after the plan was made, or after the oldest operation
/// still running began (less [`CLOCK_SKEW`], since pack times are the store's clock and
/// lock times their host's), is never deleted: it may be that operation's, and stays
/// planned for a later gc. A sweep that deletes nothing and rewrites no index file
/// returns the index, marks and stored packs it read, for the caller to plan from.
fn sweep(
    repo: &Repository,
    lock: &Lock<'_>,
    name: &str,
    plan: &Plan,
    report: &mut GcReport,
) -> Result<Option<Marked>, CoreError> {
    if blocked(repo, lock, plan)? {
        defer(repo, &plan.packs, report);
        return Ok(None);
    }
    let live_locks: Vec<_> = repo.live_locks()?.into_iter().filter(|(n, _)| n != lock.name()).map(|(_, l)| l).collect();
    let oldest_running = live_locks.iter().map(|l| l.created).min().unwrap_or(u64::MAX);
    // Pack times come from the store's clock, lock times from their host's: allow skew.
    let running_since = oldest_running.saturating_sub(CLOCK_SKEW.as_secs());
    let young = |pack: &Id| match repo.backend().modified(Kind::Pack, &pack.to_hex()) {
        Ok(t) => t
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(true, |d| d.as_secs() > plan.created || d.as_secs() >= running_since),
        Err(e) => !e.is_not_found(),
    };
    // Mark again: snapshots committed since the plan count.
    let index = load_index(repo)?;
    let live = mark(repo, &index)?;
    let planned: HashSet<Id> = plan.packs.iter().copied().collect();
    // Where else each blob lives: in a pack that stays and that exists. An index entry
    // of a pack that is gone (lost outside blockproof, or deleted under a backup that
    // then indexed it) is no copy: counting it would delete the last one.
    let listing = stored_packs(repo)?;
    let stored: HashSet<Id> = listing.iter().map(|(_, id)| *id).collect();
    let stays: Vec<bool> = index.packs().iter().map(|p| !planned.contains(p) && stored.contains(p)).collect();
    let elsewhere: Marks = covered(&index, &live, |pack| stays[pack as usize]);
    // Planned packs (by position) holding a referenced blob that has no copy elsewhere.
    let mut needed: HashSet<u32> = HashSet::new();
    for t in index.iter_table() {
        if !stays[t.pack as usize] && live.contains(t.blob) && !elsewhere.contains(t.blob) {
            needed.insert(t.pack);
        }
    }
    // A local cache of the index that failed its check gave an incomplete table: nothing
    // is deleted on it.
    if let Some(e) = index.damage() {
        return Err(e.into());
    }
    let mut deletable: HashSet<Id> = HashSet::new();
    // Planned packs already gone (an earlier gc deleted them and was interrupted before
    // it removed its plan): dropped from the plan and the index, not counted again.
    let mut gone: HashSet<Id> = HashSet::new();
    let mut kept = Vec::new();
    for pack in &plan.packs {
        if !stored.contains(pack) {
            gone.insert(*pack);
            continue;
        }
        if index.pack_position(pack).is_some_and(|p| needed.contains(&p)) {
            continue;
        }
        if young(pack) {
            kept.push(*pack);
        } else {
            deletable.insert(*pack);
        }
    }
    // The index files listing a pack to drop, rewritten below one at a time.
    let dropped = |p: &Id| deletable.contains(p) || gone.contains(p);
    let rewrite: Vec<String> =
        index.file_packs().filter(|(_, packs)| packs.iter().any(dropped)).map(|(f, _)| f.to_string()).collect();
    drop(elsewhere);
    let unchanged = rewrite.is_empty() && deletable.is_empty();
    let mut loaded: HashSet<String> = index.files().iter().cloned().collect();
    let marked = if unchanged {
        Some((index, live, listing))
    } else {
        drop((index, live));
        None
    };
    // Nothing is deleted by a gc that may have lost its lock (stopped for too long).
    lock.ensure_held()?;
    // New index files without the deleted packs, then remove the old ones.
    loaded.extend(rewrite_without(repo, &rewrite, &dropped, report)?);
    #[cfg(test)]
    BEFORE_DELETE.with(|f| f.borrow_mut().take().map(|f| f(repo)));
    for pack in &deletable {
        let hex = pack.to_hex();
        let size = repo.backend().size(Kind::Pack, &hex).unwrap_or(0);
        repo.backend().remove(Kind::Pack, &hex)?;
        report.packs_deleted += 1;
        report.bytes_freed += size;
    }
    // A process that lost its lock may have made an index file visible after the index
    // above was loaded, naming a pack just deleted: it checks its packs after the write
    // (`Repository::write_index_file`), and this closes the other half of that race —
    // index files new since the load are read, and one naming a deleted pack is
    // rewritten without it.
    if !deletable.is_empty() {
        let new: Vec<String> = repo
            .backend()
            .list(Kind::Index)?
            .into_iter()
            .filter(|n| Id::is_file_name(n) && !loaded.contains(n))
            .collect();
        rewrite_without(repo, &new, &dropped, report)?;
    }
    if kept.is_empty() {
        repo.backend().remove(Kind::State, name)?;
    } else {
        defer(repo, &kept, report);
        let rest = Plan { packs: kept, ..plan.clone() };
        repo.write_doc(Kind::State, ObjectMagic::State, name, &serde_json::to_vec(&rest).expect("a plan serializes"))?;
    }
    Ok(marked)
}

/// Replaces each of `files` that lists a `dropped` pack by an index file without those
/// packs (none, when nothing else is left), then removes it; returns the names of the
/// files written. A file already gone (its writer settled it) is skipped.
fn rewrite_without(
    repo: &Repository,
    files: &[String],
    dropped: &dyn Fn(&Id) -> bool,
    report: &mut GcReport,
) -> Result<Vec<String>, CoreError> {
    let mut written = Vec::new();
    for fname in files {
        let f = match repo.read_index_file(fname) {
            Ok(f) => f,
            Err(blockproof_repo::RepoError::Store(e)) if e.is_not_found() => continue,
            Err(e) => return Err(e.into()),
        };
        if !f.packs.iter().any(|(p, _)| dropped(p)) {
            continue;
        }
        let kept: Vec<(Id, Vec<BlobEntry>)> = f.packs.into_iter().filter(|(p, _)| !dropped(p)).collect();
        if !kept.is_empty() {
            written.push(repo.write_index_file(&IndexFile { packs: kept })?.to_hex());
        }
        repo.backend().remove(Kind::Index, fname)?;
        report.index_files_rewritten += 1;
    }
    Ok(written)
}

/// Whether a backup that could use the plan's packs may still run: a live shared lock
/// created before the plan (plus [`CLOCK_SKEW`]).
fn blocked(repo: &Repository, lock: &Lock<'_>, plan: &Plan) -> Result<bool, CoreError> {
    let live: Vec<_> = repo.live_locks()?.into_iter().filter(|(n, _)| n != lock.name()).map(|(_, l)| l).collect();
    Ok(live.iter().any(|l| l.kind == LockKind::Shared && l.created <= plan.created + CLOCK_SKEW.as_secs()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sweep that deletes nothing (here: a plan of packs already gone) hands its marks
    /// back: gc loads the index once to mark and once in the sweep, not a third time.
    #[test]
    fn a_sweep_that_changes_nothing_does_not_reload_the_index() {
        let dir = tempfile::tempdir().unwrap();
        let repo = crate::test_repo::in_dir(dir.path());
        let loads = || INDEX_LOADS.with(|n| n.get());
        let plan = Plan { created: 0, host: "h".into(), packs: vec![Id([7; 32])] };
        let bytes = serde_json::to_vec(&plan).unwrap();
        repo.write_doc(Kind::State, ObjectMagic::State, "gc-plan-0000000000000000", &bytes).unwrap();
        let before = loads();
        let report = gc(&repo, &GcOptions::default(), &crate::NoProgress).unwrap();
        assert_eq!((report.packs_deleted, report.packs_deferred), (0, 0));
        assert!(plans(&repo).unwrap().is_empty(), "the plan is done");
        assert_eq!(loads() - before, 2, "marked, swept; no reload");
        // Without a plan: one load.
        let before = loads();
        gc(&repo, &GcOptions::default(), &crate::NoProgress).unwrap();
        assert_eq!(loads() - before, 1);
    }

    /// Writes one pack holding one blob of `fill` bytes; returns the pack and its entries.
    fn one_pack(repo: &Repository, fill: u8) -> (Id, Vec<BlobEntry>) {
        let mut codec = blockproof_repo::BlobCodec::for_repo(repo);
        let data = vec![fill; 4096];
        let id = repo.keys().blob_id(&data);
        let mut writer = PackWriter::new(repo);
        writer.add(codec.seal(blockproof_format::BlobKind::Data, id, &data)).unwrap();
        writer.finish().unwrap().0.remove(0)
    }

    /// The packs each index file lists.
    fn listings(repo: &Repository) -> Vec<(String, Vec<Id>)> {
        let names = repo.backend().list(Kind::Index).unwrap();
        let packs = |n: &str| repo.read_index_file(n).unwrap().packs.into_iter().map(|(p, _)| p).collect();
        names.into_iter().map(|n| (n.clone(), packs(&n))).collect()
    }

    /// An index file that becomes visible between a sweep's load and its deletions (a
    /// backup that lost its lock as it wrote it) and names a pack the sweep deletes is
    /// rewritten without it: no index file names a deleted pack, and the other pack it
    /// listed stays indexed.
    #[test]
    fn an_index_file_that_appears_during_a_sweep_loses_only_the_deleted_packs() {
        let dir = tempfile::tempdir().unwrap();
        let repo = crate::test_repo::in_dir(dir.path());
        // A pack no snapshot references: gc plans it and deletes it at once.
        let doomed = one_pack(&repo, 1);
        let late = std::rc::Rc::new(std::cell::RefCell::new(None));
        let seen = late.clone();
        let listed = doomed.clone();
        BEFORE_DELETE.with(|f| {
            *f.borrow_mut() = Some(Box::new(move |repo: &Repository| {
                // A pack written after the plan (not in it), and a file naming both.
                let fresh = one_pack(repo, 2);
                let id = repo.write_index_file(&IndexFile { packs: vec![listed, fresh.clone()] }).unwrap();
                *seen.borrow_mut() = Some((id.to_hex(), fresh.0));
            }));
        });
        let report = gc(&repo, &GcOptions::default(), &crate::NoProgress).unwrap();
        assert_eq!(report.packs_deleted, 1, "{report:?}");
        let (late, fresh) = late.borrow().clone().expect("the hook ran");
        let now = listings(&repo);
        assert!(now.iter().all(|(n, _)| *n != late), "the late file was rewritten: {now:?}");
        assert!(now.iter().all(|(_, p)| !p.contains(&doomed.0)), "no index file names the deleted pack: {now:?}");
        assert!(now.iter().any(|(_, p)| *p == [fresh]), "the rest of the late file is indexed: {now:?}");
        let report = crate::check::check(&repo, &Default::default(), &crate::NoProgress).unwrap();
        assert!(report.ok, "{report:?}");
    }
}
