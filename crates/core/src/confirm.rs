//! The confirmation state of a disk: for every chunk, the run at which its stored content
//! was last confirmed against the source (format in [`blockproof_format::confirm`]).
//!
//! It is loaded from the parent restore point, updated by the backup (chunks read and
//! chunks sampled by verification are confirmed now), and stored with the new snapshot,
//! which references it: it changes atomically with the snapshot. A state that cannot be
//! loaded (lost or damaged pages, an older snapshot without one, a resized disk) is
//! rebuilt as "never confirmed", with a warning: verification then simply starts over.

use blockproof_format::confirm::{decode_page, encode_page, page_count, ENTRIES_PER_PAGE};
use blockproof_format::manifest::Coverage;
use blockproof_format::tree::{chunk_count, DEFAULT_FANOUT};
use blockproof_format::{BlobKind, DiskEntry, Id};
use blockproof_repo::{BlobReader, TreeReader, TreeWriter};

use crate::pipeline::BlobSink;
use crate::CoreError;

/// Last-confirmed run per chunk (0: never).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ConfirmState {
    pub last: Vec<u32>,
}

impl ConfirmState {
    pub fn never(chunks: u64) -> Self {
        ConfirmState { last: vec![0; chunks as usize] }
    }

    /// The state a restore point left for `chunks` chunks; "never confirmed" (and the
    /// reason, as a warning) when there is none or it cannot be read.
    pub fn load(reader: &BlobReader<'_>, entry: &DiskEntry, chunks: u64) -> (Self, Option<String>) {
        let Some(root) = entry.confirm_root else {
            return (Self::never(chunks), None);
        };
        if chunk_count(entry.size, entry.chunk_size) != chunks {
            return (Self::never(chunks), None);
        }
        match Self::read(reader, root, chunks) {
            Ok(s) => (s, None),
            Err(e) => (
                Self::never(chunks),
                Some(format!(
                    "disk {}: the confirmation state cannot be read ({e}); every chunk counts as never confirmed",
                    entry.id
                )),
            ),
        }
    }

    fn read(reader: &BlobReader<'_>, root: Id, chunks: u64) -> Result<Self, CoreError> {
        let pages = page_count(chunks);
        let mut tree = TreeReader::new(reader, root, pages, DEFAULT_FANOUT)?;
        let mut last = Vec::with_capacity(chunks as usize);
        for p in 0..pages {
            let len = (chunks - p * ENTRIES_PER_PAGE).min(ENTRIES_PER_PAGE) as usize;
            let id = tree.chunk(p)?;
            if id.is_zero() {
                last.resize(last.len() + len, 0);
            } else {
                let plain = reader.read(&id, BlobKind::Confirm)?;
                let page = decode_page(&plain, len)
                    .map_err(|e| CoreError::Repo(blockproof_repo::RepoError::corrupt(format!("page {id}"), e)))?;
                last.extend_from_slice(&page);
            }
        }
        Ok(ConfirmState { last })
    }

    /// Stores the state; returns the root (`None` when nothing was ever confirmed).
    pub fn store(&self, sink: &mut BlobSink<'_, '_>) -> Result<Option<Id>, CoreError> {
        let pages = page_count(self.last.len() as u64);
        let mut tree = TreeWriter::new(pages, DEFAULT_FANOUT);
        for page in self.last.chunks(ENTRIES_PER_PAGE as usize) {
            let id =
                if page.iter().all(|&r| r == 0) { Id::ZERO } else { sink.put(BlobKind::Confirm, &encode_page(page))? };
            tree.push(id, &mut |ids: &[Id]| sink.page(ids))?;
        }
        let root = tree.finish(&mut |ids: &[Id]| sink.page(ids))?;
        Ok((!root.is_zero()).then_some(root))
    }

    pub fn confirm(&mut self, chunk: u64, run: u32) {
        self.last[chunk as usize] = run;
    }

    /// Coverage after run `run`, for a budget of `per_run` sampled chunks per run (`None`:
    /// verification off).
    pub fn coverage(&self, run: u32, per_run: Option<u64>) -> Coverage {
        let chunks = self.last.len() as u64;
        let never = self.last.iter().filter(|&&r| r == 0).count() as u64;
        let oldest = self.last.iter().copied().filter(|&r| r > 0).min().unwrap_or(run);
        Coverage {
            chunks,
            never_confirmed: never,
            oldest_confirmed_runs_ago: u64::from(run.saturating_sub(oldest)),
            full_coverage_within_runs: match per_run {
                None | Some(0) if chunks > 0 => 0,
                None | Some(0) => 1,
                Some(b) => chunks.div_ceil(b).max(1),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coverage_bound_is_chunks_over_budget() {
        let mut s = ConfirmState::never(100);
        assert_eq!(s.coverage(1, Some(25)).full_coverage_within_runs, 4);
        assert_eq!(s.coverage(1, Some(30)).full_coverage_within_runs, 4);
        assert_eq!(s.coverage(1, Some(100)).full_coverage_within_runs, 1);
        assert_eq!(s.coverage(1, Some(1000)).full_coverage_within_runs, 1);
        assert_eq!(s.coverage(1, None).full_coverage_within_runs, 0);
        assert_eq!(s.coverage(1, None).never_confirmed, 100);
        for c in 0..100 {
            s.confirm(c, 3 + (c % 4) as u32);
        }
        let c = s.coverage(7, Some(25));
        assert_eq!((c.chunks, c.never_confirmed, c.oldest_confirmed_runs_ago), (100, 0, 4));
        assert_eq!(ConfirmState::never(0).coverage(1, None).full_coverage_within_runs, 1);
    }
}
