//! Check: is the repository whole, and (with `--read-data`) do its stored bytes still
//! match their ids?
//!
//! Structure (always): every index file authenticates and decodes; every pack an index
//! names exists and is long enough; every snapshot authenticates; every page of every
//! disk's fixed index reads back, and every chunk it names is in the index.
//! Data (`read_data`): each selected pack is read whole; its name must be its hash, its
//! header must authenticate and agree with the index, and every blob must authenticate,
//! decompress and re-hash to its id. With a budget, packs are chosen least recently
//! verified first (never verified first, ties at random) until the budget is spent; the
//! rotation is kept in `state/check` (per pack, the data-check run that last verified
//! it), so a nightly `--read-data=3%` reads the whole repository every 34 nights. The
//! state is advisory: lost or unreadable, the rotation starts over with a warning; one
//! that cannot be saved (a read-only repository) is a warning after the data was
//! checked; two checks at once simply both save theirs (the last one wins — harmless).
//!
//! Stray files (names that are not object names of their directory, `index/.DS_Store`)
//! are warnings; damaged key slots, index files and snapshot files are errors.
//!
//! The snapshot set (`integrity.rs`): a snapshot a vm's head names, or that a
//! snapshot made since its vm's head exists names as a parent, that is neither present
//! nor in a forget record was deleted or rolled back outside blockproof: an error. A
//! recorded snapshot that is present again is a warning.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Instant;

use blockproof_format::tree::chunk_count;
use blockproof_format::{Id, ObjectMagic};
use blockproof_repo::blob::open_blob;
use blockproof_repo::pack_writer::read_pack_header;
use blockproof_repo::repository::check_name;
use blockproof_repo::{BlobIndex, BlobReader, IndexBuilder, MarkQueue, Marks, Repository};
use blockproof_store::Kind;
use blockproof_work::{fan_out, FanOut};
use rand::seq::SliceRandom;
use serde::Serialize;

use crate::{Budget, CoreError, Progress};

/// What to check.
#[derive(Clone, Debug, Default)]
pub struct CheckOptions {
    /// Also read and verify stored data, within this budget.
    pub read_data: Option<Budget>,
}

/// What `read_data` did.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ReadDataReport {
    pub packs_checked: u64,
    pub packs_total: u64,
    pub blobs_checked: u64,
    pub bytes_read: u64,
    /// This data check's number (every `check --read-data` counts one).
    pub run: u64,
    /// Packs never verified, after this run.
    pub packs_never_checked: u64,
    /// Runs since the least recently verified pack was verified.
    pub oldest_checked_runs_ago: u64,
    /// With this budget, every pack is verified within this many runs (0: never).
    pub full_coverage_within_runs: u64,
}

/// The rotation of data checks (`state/check`): per pack, the run that last verified it;
/// and the packs the last data check of each found damaged (with that run), which backups
/// and copies leave out of deduplication (absent in states written before repair
/// existed). Read strictly: no field but these is accepted (an unreadable state starts
/// over).
#[derive(Clone, Debug, Default, Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct CheckState {
    run: u64,
    packs: BTreeMap<String, u64>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    damaged: BTreeMap<String, u64>,
}

/// The packs `check --read-data` found damaged and that have not passed a data check
/// since (`state/check`). Advisory: an unreadable state gives none, with a warning.
pub(crate) fn damaged_packs(repo: &Repository, warnings: &mut Vec<String>) -> HashSet<Id> {
    let state = CheckState::load(repo, warnings);
    state.damaged.keys().filter_map(|n| n.parse().ok()).collect()
}

/// Forgets that `packs` were found damaged (`repair` read them whole and found them
/// intact, or removed them).
pub(crate) fn clear_damaged(repo: &Repository, packs: &HashSet<&str>) -> Result<(), CoreError> {
    let mut state = CheckState::load(repo, &mut Vec::new());
    let before = state.damaged.len();
    state.damaged.retain(|name, _| !packs.contains(name.as_str()));
    if state.damaged.len() != before {
        state.save(repo)?;
    }
    Ok(())
}

const CHECK_STATE: &str = "check";

impl CheckState {
    /// The saved state; a missing one is new, an unreadable one is new with a warning.
    fn load(repo: &Repository, warnings: &mut Vec<String>) -> CheckState {
        match repo.read_doc(Kind::State, ObjectMagic::State, CHECK_STATE) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                warnings.push(format!("the data-check rotation state is unreadable ({e}); starting over"));
                CheckState::default()
            }),
            Err(blockproof_repo::RepoError::Store(e)) if e.is_not_found() => CheckState::default(),
            Err(e) => {
                warnings.push(format!("the data-check rotation state is unreadable ({e}); starting over"));
                CheckState::default()
            }
        }
    }

    fn save(&self, repo: &Repository) -> Result<(), CoreError> {
        let bytes = serde_json::to_vec(self).expect("the state serializes");
        Ok(repo.write_doc(Kind::State, ObjectMagic::State, CHECK_STATE, &bytes)?)
    }
}

/// The result of a check. `ok` is false when `errors` is not empty.
#[derive(Clone, Debug, Default, Serialize)]
pub struct CheckReport {
    pub ok: bool,
    pub snapshots: u64,
    pub index_files: u64,
    pub packs: u64,
    pub blobs: u64,
    pub referenced_chunks: u64,
    pub read_data: Option<ReadDataReport>,
    /// What the repository recorded of each vm (its head): a monitor that remembers
    /// `seq` sees a repository rolled back as a whole (docs/FORMAT.md §20a).
    pub heads: Vec<HeadReport>,
    pub errors: Vec<String>,
    pub warnings: Vec<String>,
}

/// One vm's head, as `check` reports it.
#[derive(Clone, Debug, Serialize)]
pub struct HeadReport {
    pub vm: String,
    pub seq: u64,
    pub latest: Id,
    pub time: String,
}

/// Checks the repository. Problems found are in the report; `Err` means the check
/// itself could not run (for example, the storage is unreachable).
pub fn check(repo: &Repository, opts: &CheckOptions, progress: &dyn Progress) -> Result<CheckReport, CoreError> {
    let mut report = CheckReport::default();
    let backend = repo.backend();
    // Files whose names are not object names of their directory: warnings, listed once.
    let mut stray = Vec::new();

    // Key slots: each must still hash to its name (one opened this session; a damaged
    // other one is a password that no longer opens the repository).
    for name in backend.list(Kind::Key)? {
        if !Id::is_file_name(&name) {
            stray.push(format!("{}/{name}", Kind::Key.dir()));
            continue;
        }
        match backend.read(Kind::Key, &name) {
            Ok(bytes) => {
                if let Err(d) = check_name(&name, &bytes) {
                    report.errors.push(format!("key slot {name} is damaged: {d}"));
                }
            }
            Err(e) if e.is_not_found() => {}
            Err(e) => report.errors.push(format!("key slot {name}: {e}")),
        }
    }

    // Index files: every one read and authenticated. With a local cache of the blob index
    // each is dropped once checked and the table comes from the cache (which a file
    // damaged since it was built does not change: the damage is reported here).
    // They are read on one thread per core (more on a remote store), and taken in the
    // order listed.
    let cached = repo.index_cache().is_some();
    let (names, stray_index): (Vec<String>, Vec<String>) =
        backend.list(Kind::Index)?.into_iter().partition(|n| Id::is_file_name(n));
    stray.extend(stray_index.iter().map(|n| format!("{}/{n}", Kind::Index.dir())));
    let mut index = IndexBuilder::new();
    let mut early: BTreeMap<usize, Result<Option<blockproof_format::IndexFile>, String>> = BTreeMap::new();
    let mut next = 0;
    fan_out(
        repo.cancel(),
        FanOut { workers: crate::readers(repo), queue: 4 },
        |emit| {
            for k in 0..names.len() {
                if !emit.send(k) {
                    break;
                }
            }
            Ok::<(), CoreError>(())
        },
        || {
            |k: usize| {
                let read = match repo.read_index_file(&names[k]) {
                    Ok(_) if cached => Ok(None),
                    Ok(file) => Ok(Some(file)),
                    // Replaced by a gc running at the same time: its successor is listed too.
                    Err(blockproof_repo::RepoError::Store(e)) if e.is_not_found() => Ok(None),
                    Err(e) => Err(e.to_string()),
                };
                Ok((k, read))
            }
        },
        |(k, read)| {
            early.insert(k, read);
            while let Some(read) = early.remove(&next) {
                match read {
                    Ok(Some(file)) => index.add_file(names[next].clone(), &file),
                    Ok(None) => {}
                    Err(e) => report.errors.push(e),
                }
                next += 1;
            }
            Ok(())
        },
    )?;
    let index = if cached { BlobIndex::scan(repo, &Default::default())?.0 } else { index.finish() };
    report.index_files = index.files().len() as u64;
    report.blobs = index.len() as u64;

    // Packs: every indexed pack exists and has the size its index listing gives it.
    type Listing = Vec<(String, u64)>;
    let (packs, stray_packs): (Listing, Listing) =
        backend.list_sizes(Kind::Pack)?.into_iter().partition(|(n, _)| Id::is_file_name(n));
    stray.extend(stray_packs.iter().map(|(n, _)| format!("{}/*/{n}", Kind::Pack.dir())));
    let stored: HashMap<String, u64> = packs.into_iter().collect();
    for pack in index.packs() {
        let expected = index.expected_pack_size(pack).unwrap_or(0);
        match stored.get(&pack.to_hex()) {
            None => report.errors.push(format!("pack {pack} is listed in the index but missing")),
            Some(&size) if size < expected => report.errors.push(format!("pack {pack} is truncated ({size} bytes)")),
            Some(&size) if size != expected => report
                .errors
                .push(format!("pack {pack} has {size} bytes, its index listing says {expected} (replaced?)")),
            _ => {}
        }
    }
    let indexed: HashSet<String> = index.packs().iter().map(Id::to_hex).collect();
    for name in stored.keys().filter(|n| !indexed.contains(*n)) {
        // Not necessarily harmless: if its index file was lost, the snapshots that need
        // its blobs are reported below as missing chunks.
        report.warnings.push(format!(
            "pack {name} is not listed by any index file (left by an interrupted backup, or its index file \
             was lost: blockproof repair re-indexes it)"
        ));
    }
    report.packs = stored.len() as u64;

    // Snapshots and their trees. The vms' heads are read before the listing, the forget
    // records after it (see crate::integrity).
    let heads = crate::integrity::read_heads(repo)?;
    let reader = BlobReader::new(repo, &index);
    // Tree pages read whole, as bits parallel to the index's table (a page a snapshot
    // shares with one checked before is not read again); the chunks they name, queued and
    // marked together after the walk.
    let mut referenced =
        Referenced { queue: MarkQueue::new(&index), chunks: Marks::new(&index), pages: Marks::new(&index) };
    let (names, stray_snapshots): (Vec<String>, Vec<String>) =
        backend.list(Kind::Snapshot)?.into_iter().partition(|n| Id::is_file_name(n));
    let present: HashSet<Id> = names.iter().filter_map(|n| n.parse().ok()).collect();
    let mut loaded = Vec::new();
    stray.extend(stray_snapshots.iter().map(|n| format!("{}/{n}", Kind::Snapshot.dir())));
    stray.sort();
    report.warnings.extend(blockproof_repo::Skipped { stray, ..Default::default() }.warnings());
    report.snapshots = names.len() as u64;
    progress.begin_count("check snapshots", names.len() as u64);
    for name in names {
        progress.advance(1);
        let info = match repo.load_snapshot(&name) {
            Ok(i) => i,
            // Forgotten while this check ran.
            Err(blockproof_repo::RepoError::Store(e)) if e.is_not_found() => continue,
            Err(e) => {
                report.errors.push(e.to_string());
                continue;
            }
        };
        for disk in &info.snapshot.disks {
            let place = format!("snapshot {} disk {}", info.id.short(), disk.id);
            match check_tree(&reader, disk, &mut referenced) {
                Ok(()) => {}
                // The queue's temporary files: not a fault of this snapshot.
                Err(e @ CoreError::Refused(_)) => return Err(e),
                Err(e) => report.errors.push(format!("{place}: {e}")),
            }
            // The confirmation state is advisory: damage there is a warning.
            let n = chunk_count(disk.size, disk.chunk_size);
            if let (_, Some(w)) = crate::confirm::ConfirmState::load(&reader, disk, n) {
                report.warnings.push(format!("{place}: {w}"));
            }
        }
        loaded.push(info);
    }
    progress.end();
    report.heads = heads.report();
    crate::integrity::check_snapshot_set(repo, heads, &present, &loaded, &mut report.errors, &mut report.warnings)?;
    let Referenced { queue, mut chunks, .. } = referenced;
    let missing = queue.finish(&index, &mut chunks).map_err(crate::live_blobs::scratch_error)?;
    for id in &missing {
        report.errors.push(format!("chunk {id} is used by a snapshot but not stored"));
    }
    report.referenced_chunks = (chunks.count() + missing.len()) as u64;

    if let Some(budget) = &opts.read_data {
        let mut state = CheckState::load(repo, &mut report.warnings);
        let r = read_data(repo, &index, &stored, budget, &mut state, &mut report.errors, progress);
        // The rotation is advisory: on a read-only repository the data is still checked.
        if !budget.nothing {
            if let Err(e) = state.save(repo) {
                report.warnings.push(format!(
                    "the data-check rotation state could not be saved ({e}): the next check --read-data will \
                     not know which packs this one verified"
                ));
            }
        }
        report.read_data = Some(r);
    }
    // Errors above may come from the local cache of the index failing its check, not
    // from the repository: said so (the cache is removed; the next check rebuilds it).
    if let Some(e) = index.damage() {
        report.errors.push(e.to_string());
    }
    report.ok = report.errors.is_empty();
    Ok(report)
}

/// What the snapshots' trees reference.
struct Referenced {
    /// The chunks, marked in `chunks` (at once, or together once every tree is walked).
    queue: MarkQueue,
    chunks: Marks,
    /// Tree pages read whole, with every page below them.
    pages: Marks,
}

/// Reads every page of a disk's tree not read whole for an earlier one; marks the chunk
/// ids it names. The pages a failed walk marked are unmarked again, so that every
/// snapshot sharing a damaged page reports it.
fn check_tree(
    reader: &BlobReader<'_>,
    disk: &blockproof_format::DiskEntry,
    referenced: &mut Referenced,
) -> Result<(), CoreError> {
    let n = chunk_count(disk.size, disk.chunk_size);
    let index = reader.index();
    let Referenced { queue, chunks, pages } = referenced;
    let mut walked = Vec::new();
    let mut leaf = |_: &mut Marks, id: Id| queue.push(index, chunks, id).map_err(crate::live_blobs::scratch_error);
    let result = crate::live_blobs::walk(
        reader,
        disk.index_root,
        n,
        disk.index_fanout,
        pages,
        &mut walked,
        &HashSet::new(),
        &mut leaf,
    );
    if result.is_err() {
        for at in walked {
            pages.remove(at);
        }
    }
    result
}

/// What reading one pack found.
struct PackVerdict {
    bytes_read: u64,
    blobs_checked: u64,
    errors: Vec<String>,
}

/// Reads one pack whole and verifies it: its name is its hash, its header authenticates
/// and agrees with the index, every blob opens and re-hashes to its id.
fn verify_pack(repo: &Repository, name: &str, by_pack: &HashMap<Id, Vec<blockproof_format::BlobEntry>>) -> PackVerdict {
    let mut v = PackVerdict { bytes_read: 0, blobs_checked: 0, errors: Vec::new() };
    let file = match repo.backend().read(Kind::Pack, name) {
        Ok(f) => f,
        Err(e) => {
            v.errors.push(format!("pack {name}: {e}"));
            return v;
        }
    };
    v.bytes_read = file.len() as u64;
    if let Err(d) = check_name(name, &file) {
        v.errors.push(format!("pack {name}: {d}"));
    }
    let entries = match read_pack_header(repo, name, &file) {
        Ok(e) => e,
        Err(e) => {
            v.errors.push(e.to_string());
            return v;
        }
    };
    for e in &entries {
        v.blobs_checked += 1;
        let sealed = &file[e.offset as usize..e.end() as usize];
        if let Err(err) = open_blob(repo.keys(), e, sealed, &format!("pack {name} offset {}", e.offset)) {
            v.errors.push(err.to_string());
        }
    }
    if let Ok(id) = name.parse::<Id>() {
        let header: HashSet<_> = entries.iter().collect();
        for e in by_pack.get(&id).into_iter().flatten() {
            if !header.contains(e) {
                v.errors.push(format!("pack {name}: index entry for blob {} disagrees with the pack header", e.id));
            }
        }
    }
    v
}

/// Reads and verifies packs within the budget, least recently verified first (never
/// verified first, ties in random order), and records in `state` the packs that passed.
fn read_data(
    repo: &Repository,
    index: &BlobIndex,
    stored: &HashMap<String, u64>,
    budget: &Budget,
    state: &mut CheckState,
    errors: &mut Vec<String>,
    progress: &dyn Progress,
) -> ReadDataReport {
    let started = Instant::now();
    state.run += 1;
    let run = state.run;
    // Packs that no longer exist leave the rotation; new ones join it as never checked.
    state.packs.retain(|name, _| stored.contains_key(name));
    state.damaged.retain(|name, _| stored.contains_key(name));
    let mut packs: Vec<(&String, u64)> = stored.iter().map(|(n, s)| (n, *s)).collect();
    packs.shuffle(&mut rand::thread_rng());
    packs.sort_by_key(|(n, _)| state.packs.get(*n).copied().unwrap_or(0));
    let total: u64 = packs.iter().map(|p| p.1).sum();
    let byte_limit = budget.byte_limit(total);
    let mut r = ReadDataReport { packs_total: packs.len() as u64, run, ..Default::default() };
    progress.begin("check data", byte_limit);
    // The byte and pack-count limits pick the packs up front (each tested before the
    // pack, as documented); the time limit is tested by the readers before each pack.
    let mut chosen = Vec::new();
    let mut planned_bytes = 0u64;
    for (name, size) in packs {
        let over_bytes = planned_bytes >= byte_limit;
        let over_ios = budget.ios.is_some_and(|n| chosen.len() as u64 >= n);
        if budget.nothing || over_bytes || over_ios {
            break;
        }
        planned_bytes += size;
        chosen.push((name, size));
    }
    // The index entries of the chosen packs (not of every pack: a second copy of the
    // index), from one pass over its table.
    let wanted: HashMap<u32, Id> = chosen
        .iter()
        .filter_map(|(n, _)| n.parse::<Id>().ok())
        .filter_map(|id| index.pack_position(&id).map(|p| (p, id)))
        .collect();
    let mut by_pack: HashMap<Id, Vec<blockproof_format::BlobEntry>> = HashMap::new();
    for t in index.iter_table() {
        if let Some(id) = wanted.get(&t.pack) {
            by_pack.entry(*id).or_default().push(t.entry);
        }
    }
    // Packs are verified in parallel (one per core, more on a remote store), each
    // reader holding one whole pack: at most 256 MiB of packs in memory at once.
    let largest = chosen.iter().map(|c| c.1).max().unwrap_or(1).max(1);
    let readers = crate::readers(repo).min(((256u64 << 20) / largest).max(1) as usize);
    let mut results: Vec<(usize, PackVerdict)> = Vec::new();
    let checked = fan_out(
        repo.cancel(),
        FanOut { workers: readers, queue: 1 },
        |emit| {
            for k in 0..chosen.len() {
                // The time limit is tested before each pack is taken.
                if budget.time.is_some_and(|t| started.elapsed() >= t) || !emit.send(k) {
                    break;
                }
            }
            Ok::<(), CoreError>(())
        },
        || {
            |k: usize| {
                let (name, size) = chosen[k];
                let verdict = verify_pack(repo, name, &by_pack);
                progress.advance(size);
                Ok((k, verdict))
            }
        },
        |r| {
            results.push(r);
            Ok(())
        },
    );
    if let Err(e) = checked {
        // Only a fault of blockproof itself (a reader that panicked) ends here.
        errors.push(format!("the data check stopped: {e}"));
    }
    results.sort_by_key(|(k, _)| *k);
    for (k, v) in results {
        r.packs_checked += 1;
        r.bytes_read += v.bytes_read;
        r.blobs_checked += v.blobs_checked;
        // Only a pack that passed counts as verified: a damaged one stays first in line,
        // and backups stop deduplicating against it until it passes again.
        if v.errors.is_empty() {
            state.packs.insert(chosen[k].0.clone(), run);
            state.damaged.remove(chosen[k].0);
        } else {
            state.damaged.insert(chosen[k].0.clone(), run);
        }
        errors.extend(v.errors);
    }
    progress.end();
    let n = stored.len() as u64;
    r.packs_never_checked = stored.keys().filter(|k| !state.packs.contains_key(*k)).count() as u64;
    let oldest = if r.packs_never_checked > 0 { 0 } else { state.packs.values().copied().min().unwrap_or(run) };
    r.oldest_checked_runs_ago = run - oldest.min(run);
    r.full_coverage_within_runs = match r.packs_checked {
        _ if budget.nothing => 0,
        0 if n == 0 => 1,
        0 => 0,
        k => n.div_ceil(k),
    };
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rotation_state_is_read_strictly() {
        let ok: CheckState = serde_json::from_str(r#"{"run":3,"packs":{"ab":2}}"#).unwrap();
        assert_eq!((ok.run, ok.packs.len()), (3, 1));
        for bad in [r#"{"run":3,"packs":{},"extra":1}"#, r#"{"run":3}"#, r#"{"packs":{}}"#] {
            assert!(serde_json::from_str::<CheckState>(bad).is_err(), "{bad}");
        }
    }
}
