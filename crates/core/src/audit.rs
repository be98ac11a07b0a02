//! `verify`: compare a restore point with a source, without taking a backup — for audits
//! and restore tests. The same selection (least recently confirmed first, the first chunk
//! always) and comparison as a backup's verification, over every chunk of the disk. It
//! reads the repository and the source and writes nothing.

use blockproof_format::manifest::ByteRange;
use blockproof_format::tree::chunk_count;
use blockproof_format::Id;
use blockproof_repo::{BlobIndex, BlobReader, Repository, TreeReader};
use serde::Serialize;

use crate::confirm::ConfirmState;
use crate::verify::{chunk_limit, differing_ranges, merge_ranges, sample, select};
use crate::{Budget, CoreError, DiskInput, Progress};

/// What to verify.
pub struct VerifyOptions {
    /// A snapshot id, unique prefix, or `VM:latest`.
    pub snapshot: String,
    /// The disks to compare, by id, with their sources (change sources are not used).
    pub disks: Vec<DiskInput>,
    pub budget: Budget,
}

/// The result for one disk.
#[derive(Clone, Debug, Serialize)]
pub struct DiskVerifyReport {
    pub id: String,
    pub chunks: u64,
    pub verified_chunks: u64,
    pub verified_bytes: u64,
    pub mismatches: Vec<ByteRange>,
}

/// The result of `verify`.
#[derive(Clone, Debug, Serialize)]
pub struct VerifyReport {
    pub snapshot: Id,
    pub vm: String,
    /// `true` when every compared chunk matched.
    pub ok: bool,
    pub disks: Vec<DiskVerifyReport>,
}

/// Compares the disks of a snapshot with their sources within the budget.
pub fn verify(repo: &Repository, opts: VerifyOptions, progress: &dyn Progress) -> Result<VerifyReport, CoreError> {
    let info = repo.resolve_snapshot(&opts.snapshot)?;
    let index = BlobIndex::load(repo)?;
    let reader = BlobReader::new(repo, &index);
    let mut disks = Vec::new();
    for input in opts.disks {
        let entry = info
            .snapshot
            .disk(&input.id)
            .ok_or_else(|| CoreError::Invalid(format!("snapshot {} has no disk {:?}", info.id.short(), input.id)))?;
        let mut source = (input.open)(None)?.source;
        if source.size() != entry.size {
            return Err(CoreError::Invalid(format!(
                "disk {}: the source holds {} bytes, the restore point {}",
                input.id,
                source.size(),
                entry.size
            )));
        }
        let n = chunk_count(entry.size, entry.chunk_size);
        let (state, _) = ConfirmState::load(&reader, entry, n);
        let budget = input.verify.unwrap_or_else(|| opts.budget.clone());
        let limit = chunk_limit(&budget, n, entry.chunk_size);
        let selected = if budget.nothing || n == 0 {
            Vec::new()
        } else {
            select(&state.last, std::slice::from_ref(&(0..n)), limit, &mut rand::thread_rng())
        };
        let mut tree = TreeReader::new(&reader, entry.index_root, n, entry.index_fanout)?;
        let mut order: Vec<usize> = (0..selected.len()).collect();
        order.sort_unstable_by_key(|&k| selected[k]);
        let mut expected = vec![Id::ZERO; selected.len()];
        for k in order {
            expected[k] = tree.chunk(selected[k])?;
        }
        progress.begin(&format!("verify {}", input.id), selected.len() as u64 * u64::from(entry.chunk_size));
        let sampled = sample(source.as_mut(), repo.keys(), entry.chunk_size, &selected, &expected, budget.time);
        progress.end();
        let sampled = sampled?;
        let cs = u64::from(entry.chunk_size);
        let mut mismatches = Vec::new();
        for (c, actual) in &sampled.mismatched {
            let want = expected[selected.iter().position(|s| s == c).expect("selected")];
            mismatches.extend(differing_ranges(&reader, want, actual, c * cs));
        }
        disks.push(DiskVerifyReport {
            id: input.id,
            chunks: n,
            verified_chunks: sampled.chunks,
            verified_bytes: sampled.bytes,
            mismatches: merge_ranges(mismatches),
        });
    }
    let ok = disks.iter().all(|d| d.mismatches.is_empty());
    Ok(VerifyReport { snapshot: info.id, vm: info.snapshot.vm.clone(), ok, disks })
}
