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
use crate::verification::DiskCheck;
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
    /// Differences found (only among the compared chunks: a sample proves nothing about
    /// the chunks it did not read).
    pub mismatches: Vec<ByteRange>,
    /// Some differing chunks read differently a second time: the source is changing.
    pub source_changed: bool,
    /// How far the comparison went around mismatches.
    pub escalation: crate::verification::Escalation,
    /// A budget below one chunk.
    pub warning: Option<String>,
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
        let owner = blockproof_source::Owner { vm: &info.snapshot.vm, disk: &input.id };
        let mut source = (input.open)(&owner, None)?.source;
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
        let check = DiskCheck {
            id: &input.id,
            reader: &reader,
            chunk_size: entry.chunk_size,
            chunks: n,
            unread: std::iter::once(0..n).filter(|r| !r.is_empty()).collect(),
            forced: Vec::new(),
            budget: &budget,
            scan: false,
        };
        let mut tree = TreeReader::new(&reader, entry.index_root, n, entry.index_fanout)?;
        let mut expected = |c: u64| -> Result<Id, CoreError> { Ok(tree.chunk(c)?) };
        let verdict = check.run(source.as_mut(), repo, &state, &mut expected, progress)?;
        disks.push(DiskVerifyReport {
            id: input.id.clone(),
            chunks: n,
            verified_chunks: verdict.verified_chunks,
            verified_bytes: verdict.verified_bytes,
            mismatches: verdict.mismatches,
            source_changed: !verdict.changing.is_empty(),
            escalation: verdict.escalation,
            warning: verdict.warning,
        });
    }
    let ok = disks.iter().all(|d| d.mismatches.is_empty());
    Ok(VerifyReport { snapshot: info.id, vm: info.snapshot.vm.clone(), ok, disks })
}
