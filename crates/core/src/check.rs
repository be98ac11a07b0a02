//! Check: is the repository whole, and (with `--read-data`) do its stored bytes still
//! match their ids?
//!
//! Structure (always): every index file authenticates and decodes; every pack an index
//! names exists and is long enough; every snapshot authenticates; every page of every
//! disk's fixed index reads back, and every chunk it names is in the index.
//! Data (`read_data`): each selected pack is read whole; its name must be its hash, its
//! header must authenticate and agree with the index, and every blob must authenticate,
//! decompress and re-hash to its id. With a budget, packs are chosen at random until the
//! budget is spent.

use std::collections::{HashMap, HashSet};
use std::time::Instant;

use blockproof_format::tree::chunk_count;
use blockproof_format::Id;
use blockproof_repo::blob::open_blob;
use blockproof_repo::pack_writer::read_pack_header;
use blockproof_repo::repository::check_name;
use blockproof_repo::{BlobIndex, BlobReader, Repository, TreeReader};
use blockproof_store::Kind;
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
    pub errors: Vec<String>,
    pub warnings: Vec<String>,
}

/// Checks the repository. Problems found are in the report; `Err` means the check
/// itself could not run (for example, the storage is unreachable).
pub fn check(repo: &Repository, opts: &CheckOptions, progress: &dyn Progress) -> Result<CheckReport, CoreError> {
    let mut report = CheckReport::default();
    let backend = repo.backend();

    // Index files.
    let mut index = BlobIndex::default();
    for name in backend.list(Kind::Index)? {
        match repo.read_index_file(&name) {
            Ok(file) => index.add_file(name, &file),
            Err(e) => report.errors.push(e.to_string()),
        }
    }
    report.index_files = index.files().len() as u64;
    report.blobs = index.len() as u64;

    // Packs: every indexed pack exists and is long enough for its blobs.
    let stored: HashMap<String, u64> = backend
        .list(Kind::Pack)?
        .into_iter()
        .map(|n| {
            let size = backend.size(Kind::Pack, &n).unwrap_or(0);
            (n, size)
        })
        .collect();
    let mut needed_len: HashMap<Id, u64> = HashMap::new();
    for (_, pack, entry) in index.iter() {
        let e = needed_len.entry(pack).or_default();
        *e = (*e).max(entry.end());
    }
    for pack in index.packs() {
        match stored.get(&pack.to_hex()) {
            None => report.errors.push(format!("pack {pack} is listed in the index but missing")),
            Some(&size) if size < needed_len.get(pack).copied().unwrap_or(0) + 4 => {
                report.errors.push(format!("pack {pack} is truncated ({size} bytes)"))
            }
            _ => {}
        }
    }
    let indexed: HashSet<String> = index.packs().iter().map(Id::to_hex).collect();
    for name in stored.keys().filter(|n| !indexed.contains(*n)) {
        report
            .warnings
            .push(format!("pack {name} is not in any index (left by an interrupted backup; no snapshot uses it)"));
    }
    report.packs = stored.len() as u64;

    // Snapshots and their trees.
    let reader = BlobReader::new(repo, &index);
    let mut referenced: HashSet<Id> = HashSet::new();
    let names = backend.list(Kind::Snapshot)?;
    report.snapshots = names.len() as u64;
    progress.begin("check snapshots", names.len() as u64);
    for name in names {
        progress.advance(1);
        let info = match repo.load_snapshot(&name) {
            Ok(i) => i,
            Err(e) => {
                report.errors.push(e.to_string());
                continue;
            }
        };
        for disk in &info.snapshot.disks {
            let place = format!("snapshot {} disk {}", info.id.short(), disk.id);
            if let Err(e) = check_tree(&reader, disk, &mut referenced) {
                report.errors.push(format!("{place}: {e}"));
            }
        }
    }
    progress.end();
    for id in &referenced {
        if !index.contains(id) {
            report.errors.push(format!("chunk {id} is used by a snapshot but not stored"));
        }
    }
    report.referenced_chunks = referenced.len() as u64;

    if let Some(budget) = &opts.read_data {
        report.read_data = Some(read_data(repo, &index, &stored, budget, &mut report.errors, progress));
    }
    report.ok = report.errors.is_empty();
    Ok(report)
}

/// Reads every page of a disk's tree; collects the chunk ids it names.
fn check_tree(
    reader: &BlobReader<'_>,
    disk: &blockproof_format::DiskEntry,
    referenced: &mut HashSet<Id>,
) -> Result<(), CoreError> {
    let n = chunk_count(disk.size, disk.chunk_size);
    let mut tree = TreeReader::new(reader, disk.index_root, n, disk.index_fanout)?;
    for page in 0..tree.leaf_pages() {
        for id in tree.leaf(page)? {
            if !id.is_zero() {
                referenced.insert(*id);
            }
        }
    }
    Ok(())
}

fn read_data(
    repo: &Repository,
    index: &BlobIndex,
    stored: &HashMap<String, u64>,
    budget: &Budget,
    errors: &mut Vec<String>,
    progress: &dyn Progress,
) -> ReadDataReport {
    let started = Instant::now();
    let mut packs: Vec<(&String, u64)> = stored.iter().map(|(n, s)| (n, *s)).collect();
    packs.sort();
    if !budget.is_unlimited() {
        packs.shuffle(&mut rand::thread_rng());
    }
    let total: u64 = packs.iter().map(|p| p.1).sum();
    let byte_limit = budget.byte_limit(total);
    let mut r = ReadDataReport { packs_total: packs.len() as u64, ..Default::default() };
    let by_pack: HashMap<Id, Vec<&blockproof_format::BlobEntry>> =
        index.iter().fold(HashMap::new(), |mut m, (_, p, e)| {
            m.entry(p).or_default().push(e);
            m
        });
    progress.begin("check data", byte_limit);
    for (name, size) in packs {
        let over_bytes = r.bytes_read >= byte_limit;
        let over_ios = budget.ios.is_some_and(|n| r.packs_checked >= n);
        let over_time = budget.time.is_some_and(|t| started.elapsed() >= t);
        if budget.nothing || over_bytes || over_ios || over_time {
            break;
        }
        progress.advance(size);
        r.packs_checked += 1;
        let file = match repo.backend().read(Kind::Pack, name) {
            Ok(f) => f,
            Err(e) => {
                errors.push(format!("pack {name}: {e}"));
                continue;
            }
        };
        r.bytes_read += file.len() as u64;
        if let Err(d) = check_name(name, &file) {
            errors.push(format!("pack {name}: {d}"));
        }
        let entries = match read_pack_header(repo, name, &file) {
            Ok(e) => e,
            Err(e) => {
                errors.push(e.to_string());
                continue;
            }
        };
        for e in &entries {
            r.blobs_checked += 1;
            let sealed = &file[e.offset as usize..e.end() as usize];
            if let Err(err) = open_blob(repo.keys(), e, sealed, &format!("pack {name} offset {}", e.offset)) {
                errors.push(err.to_string());
            }
        }
        if let Ok(id) = name.parse::<Id>() {
            let header: HashSet<_> = entries.iter().collect();
            for e in by_pack.get(&id).into_iter().flatten() {
                if !header.contains(*e) {
                    errors.push(format!("pack {name}: index entry for blob {} disagrees with the pack header", e.id));
                }
            }
        }
    }
    progress.end();
    r
}
