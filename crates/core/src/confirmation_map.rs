//! The confirmation state of a restore point's disk, for people: how many runs ago each
//! part of the disk was last confirmed against its source, aggregated to a bounded number
//! of cells (a coverage heatmap), with the ranges verification found stale.
//!
//! Read-only. The state is the one the restore point stored ([`crate::confirm`]); a state
//! that cannot be read counts as "never confirmed", with a warning, as a backup would
//! treat it.

use blockproof_format::manifest::ByteRange;
use blockproof_format::tree::chunk_count;
use blockproof_repo::{BlobIndex, BlobReader, Repository, SnapshotInfo};
use serde::Serialize;

use std::collections::BTreeMap;

use crate::confirm::ConfirmState;
use crate::verify::{LastConfirmed, PAGE};
use crate::CoreError;

/// A run of consecutive chunks of a disk, aggregated.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ConfirmationCell {
    /// The first chunk of the cell.
    pub first_chunk: u64,
    pub chunks: u64,
    /// Runs since the least recently confirmed chunk of the cell was confirmed (0: at
    /// this restore point's run); `None` when some chunk of the cell was never confirmed.
    pub oldest_runs_ago: Option<u64>,
    /// Runs since the most recently confirmed chunk of the cell was confirmed (`None`:
    /// no chunk of the cell was ever confirmed).
    pub newest_runs_ago: Option<u64>,
    /// Chunks of the cell never confirmed.
    pub never_confirmed: u64,
    /// Whether a range verification found stale at this restore point overlaps the cell.
    pub tainted: bool,
}

/// One disk of one restore point: its confirmation state in at most `max_cells` cells.
#[derive(Clone, Debug, Serialize)]
pub struct ConfirmationMap {
    pub disk: String,
    /// The restore point's run of the disk (runs are counted per disk id).
    pub run: u64,
    pub size: u64,
    pub chunk_size: u32,
    pub chunks: u64,
    /// Consecutive, equal-sized (the last ones one chunk smaller at most) cells covering
    /// every chunk in order.
    pub cells: Vec<ConfirmationCell>,
    /// The byte ranges verification found stale in this restore point.
    pub tainted: Vec<ByteRange>,
    /// Why the state could not be read, when it could not (every chunk then counts as never
    /// confirmed).
    pub warning: Option<String>,
}

/// Reads confirmation maps of a repository's restore points (loads the blob index once).
pub struct ConfirmationReader<'a> {
    repo: &'a Repository,
    index: BlobIndex,
}

impl<'a> ConfirmationReader<'a> {
    pub fn new(repo: &'a Repository) -> Result<Self, CoreError> {
        Ok(ConfirmationReader { repo, index: BlobIndex::load(repo)? })
    }

    /// The map of disk `disk` of restore point `snapshot`, in at most `max_cells` cells
    /// (at least one; never more than the disk's chunks).
    pub fn map(&self, snapshot: &SnapshotInfo, disk: &str, max_cells: usize) -> Result<ConfirmationMap, CoreError> {
        let entry = snapshot
            .snapshot
            .disk(disk)
            .ok_or_else(|| CoreError::Invalid(format!("snapshot {} has no disk {disk:?}", snapshot.id.short())))?;
        let chunks = chunk_count(entry.size, entry.chunk_size);
        let reader = BlobReader::new(self.repo, &self.index);
        let (state, warning) = ConfirmState::load(&reader, entry, chunks);
        let cs = u64::from(entry.chunk_size);
        let chunk_ranges: Vec<(u64, u64)> =
            entry.mismatches.iter().map(|r| (r.offset / cs, (r.offset + r.length).div_ceil(cs))).collect();
        let cells = aggregate(&state, entry.run, max_cells, &chunk_ranges);
        let warning = warning.or_else(|| {
            let w = state.take_warnings();
            (!w.is_empty()).then(|| format!("disk {}: {}", entry.id, w.join("; ")))
        });
        Ok(ConfirmationMap {
            disk: entry.id.clone(),
            run: entry.run,
            size: entry.size,
            chunk_size: entry.chunk_size,
            chunks,
            cells,
            tainted: entry.mismatches.clone(),
            warning,
        })
    }
}

/// Aggregates last-confirmed runs (0: never) seen at run `run` into at most `max_cells`
/// cells; `tainted` are half-open chunk ranges. A page wholly inside a cell is counted
/// from its summary ([`LastConfirmed::add_runs`]).
fn aggregate(last: &dyn LastConfirmed, run: u64, max_cells: usize, tainted: &[(u64, u64)]) -> Vec<ConfirmationCell> {
    let n = last.chunks();
    let cells = (max_cells.max(1) as u64).min(n);
    (0..cells)
        .map(|i| {
            let (start, end) = (i * n / cells, (i + 1) * n / cells);
            let mut hist = BTreeMap::new();
            let mut at = start;
            while at < end {
                let part_end = ((at / PAGE + 1) * PAGE).min(end);
                last.add_runs(at..part_end, &mut hist);
                at = part_end;
            }
            let never = hist.get(&0).copied().unwrap_or(0);
            let ago = |r: u32| run.saturating_sub(u64::from(r));
            let min = hist.keys().copied().find(|&r| r > 0);
            let max = hist.keys().copied().next_back().filter(|&r| r > 0);
            ConfirmationCell {
                first_chunk: start,
                chunks: end - start,
                oldest_runs_ago: if never > 0 { None } else { min.map(ago) },
                newest_runs_ago: max.map(ago),
                never_confirmed: never,
                tainted: tainted.iter().any(|&(a, b)| a < end && start < b),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cells_cover_every_chunk_in_order_and_keep_the_oldest() {
        let last: Vec<u32> = (0..10).map(|c| if c == 7 { 0 } else { c + 1 }).collect();
        let cells = aggregate(&ConfirmState::of(&last), 10, 4, &[(5, 6)]);
        assert_eq!(cells.len(), 4);
        assert_eq!(cells.iter().map(|c| c.chunks).sum::<u64>(), 10);
        let mut next = 0;
        for c in &cells {
            assert_eq!(c.first_chunk, next);
            next += c.chunks;
        }
        // Cell 0: chunks 0..2, confirmed at runs 1, 2 → 9 and 8 runs ago.
        assert_eq!((cells[0].oldest_runs_ago, cells[0].newest_runs_ago), (Some(9), Some(8)));
        // Chunk 7 was never confirmed: its cell has no oldest age.
        let with_never = cells.iter().find(|c| (c.first_chunk..c.first_chunk + c.chunks).contains(&7)).unwrap();
        assert_eq!((with_never.oldest_runs_ago, with_never.never_confirmed), (None, 1));
        let tainted: Vec<bool> = cells.iter().map(|c| c.tainted).collect();
        assert_eq!(tainted.iter().filter(|&&t| t).count(), 1);
        // More cells than chunks: one per chunk.
        assert_eq!(aggregate(&ConfirmState::of(&last), 10, 1000, &[]).len(), 10);
        assert_eq!(aggregate(&ConfirmState::of(&last), 10, 0, &[]).len(), 1);
    }
}
