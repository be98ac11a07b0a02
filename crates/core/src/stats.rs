//! Stats: what the repository stores against what it protects, for capacity planning
//! (seed 003: "how much will de-duplication save").
//!
//! - **logical**: the sum of the sizes of every disk of every snapshot — what full copies
//!   of every restore point would take.
//! - **unique**: the plaintext bytes of the distinct non-zero chunks the snapshots
//!   reference — what deduplication leaves.
//! - **stored**: the bytes of the pack files — after compression and encryption, including
//!   index pages, confirmation pages and garbage not yet collected.
//! - **growth**: per vm, what each of the last runs added (from the manifests).

use std::collections::{BTreeMap, HashSet};

use blockproof_format::tree::chunk_count;
use blockproof_format::Id;
use blockproof_repo::{BlobIndex, BlobReader, Repository, TreeReader};
use blockproof_store::Kind;
use serde::Serialize;

use crate::CoreError;

/// One run of one vm.
#[derive(Clone, Debug, Serialize)]
pub struct RunGrowth {
    pub snapshot: Id,
    pub time: String,
    /// Bytes read from the sources.
    pub bytes_read: u64,
    /// Plaintext of the new chunks, and what they took stored.
    pub new_bytes: u64,
    pub stored_bytes: u64,
}

/// One disk of a vm.
#[derive(Clone, Debug, Serialize)]
pub struct DiskStats {
    pub id: String,
    pub size: u64,
    /// Distinct non-zero chunks of this disk over all its snapshots, and their plaintext.
    pub unique_chunks: u64,
    pub unique_bytes: u64,
}

/// One vm.
#[derive(Clone, Debug, Serialize)]
pub struct VmStats {
    pub vm: String,
    pub snapshots: u64,
    pub logical_bytes: u64,
    pub unique_bytes: u64,
    pub disks: Vec<DiskStats>,
    /// The last runs, oldest first (at most 10).
    pub growth: Vec<RunGrowth>,
}

/// The whole repository.
#[derive(Clone, Debug, Serialize)]
pub struct RepoStats {
    pub snapshots: u64,
    pub packs: u64,
    pub blobs: u64,
    pub logical_bytes: u64,
    pub unique_bytes: u64,
    pub stored_bytes: u64,
    /// logical / stored.
    pub dedup_ratio: f64,
    /// unique / stored: what compression saves.
    pub compression_ratio: f64,
    pub vms: Vec<VmStats>,
}

/// Computes the statistics (of one vm, or all).
pub fn stats(repo: &Repository, vm: Option<&str>) -> Result<RepoStats, CoreError> {
    let snapshots = repo.snapshots()?;
    let index = BlobIndex::load(repo)?;
    let reader = BlobReader::new(repo, &index);
    let packs = repo.backend().list(Kind::Pack)?;
    let mut stored = 0;
    for p in &packs {
        stored += repo.backend().size(Kind::Pack, p).unwrap_or(0);
    }
    let raw_len = |id: &Id| index.get(id).map_or(0, |(_, e)| u64::from(e.raw_length));

    let mut by_vm: BTreeMap<&str, Vec<&blockproof_repo::SnapshotInfo>> = BTreeMap::new();
    for s in snapshots.iter().filter(|s| vm.is_none_or(|v| v == s.snapshot.vm)) {
        by_vm.entry(&s.snapshot.vm).or_default().push(s);
    }
    let mut all_chunks: HashSet<Id> = HashSet::new();
    let mut vms = Vec::new();
    let mut logical_total = 0;
    for (name, snaps) in by_vm {
        let mut vm_chunks: HashSet<Id> = HashSet::new();
        let mut disks: BTreeMap<&str, (u64, HashSet<Id>)> = BTreeMap::new();
        let mut logical = 0;
        for s in &snaps {
            for d in &s.snapshot.disks {
                logical += d.size;
                let n = chunk_count(d.size, d.chunk_size);
                let mut tree = TreeReader::new(&reader, d.index_root, n, d.index_fanout)?;
                let entry = disks.entry(&d.id).or_default();
                entry.0 = d.size;
                for page in 0..tree.leaf_pages() {
                    for id in tree.leaf(page)?.iter().filter(|id| !id.is_zero()) {
                        entry.1.insert(*id);
                    }
                }
                vm_chunks.extend(entry.1.iter().copied());
            }
        }
        logical_total += logical;
        let growth = snaps
            .iter()
            .rev()
            .take(10)
            .rev()
            .map(|s| RunGrowth {
                snapshot: s.id,
                time: s.snapshot.time.clone(),
                bytes_read: s.snapshot.disks.iter().map(|d| d.stats.bytes_read).sum(),
                new_bytes: s.snapshot.disks.iter().map(|d| d.stats.new_bytes).sum(),
                stored_bytes: s.snapshot.disks.iter().map(|d| d.stats.stored_bytes).sum(),
            })
            .collect();
        vms.push(VmStats {
            vm: name.to_string(),
            snapshots: snaps.len() as u64,
            logical_bytes: logical,
            unique_bytes: vm_chunks.iter().map(raw_len).sum(),
            disks: disks
                .into_iter()
                .map(|(id, (size, chunks))| DiskStats {
                    id: id.to_string(),
                    size,
                    unique_chunks: chunks.len() as u64,
                    unique_bytes: chunks.iter().map(raw_len).sum(),
                })
                .collect(),
            growth,
        });
        all_chunks.extend(vm_chunks);
    }
    let unique: u64 = all_chunks.iter().map(raw_len).sum();
    let ratio = |a: u64, b: u64| if b == 0 { 0.0 } else { a as f64 / b as f64 };
    Ok(RepoStats {
        snapshots: snapshots.len() as u64,
        packs: packs.len() as u64,
        blobs: index.len() as u64,
        logical_bytes: logical_total,
        unique_bytes: unique,
        stored_bytes: stored,
        dedup_ratio: ratio(logical_total, stored),
        compression_ratio: ratio(unique, stored),
        vms,
    })
}
