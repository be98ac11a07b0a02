//! Which stored blobs a backup or a copy may reuse.
//!
//! Deduplication trusts the blob index, and the index only says where a blob *was*
//! written. A pack may since have been lost, truncated, replaced or damaged; a blob reused
//! from it would make the new snapshot as broken as the old ones. So before reusing
//! anything, a backup (and a copy, on its target) lists the packs with their sizes — one
//! LIST on object storage, one directory walk locally — and leaves out of deduplication
//! every pack that is
//!
//! - **missing** (named by the index, not in the listing: deleted, or not a regular file),
//! - **of the wrong size** (not the size its index listing gives, [`pack_size`]: truncated,
//!   emptied, extended or swapped with another pack), or
//! - **damaged**, as the last `check --read-data` that read it found (`state/check`).
//!
//! A blob whose every copy is in such packs counts as not stored: a chunk read from the
//! source is stored again, a chunk an incremental would inherit is read from the source
//! instead ([`crate::plan::ChunkPlan::read_instead`]), and the metadata pages a backup
//! would reuse are read back once per backup before they are (see
//! [`crate::pipeline::Dedup`]). Blobs are named by their content, so what is stored again
//! makes every older snapshot that references it whole again: readers try each copy of a
//! blob in turn ([`blockproof_repo::BlobReader`]).
//!
//! [`pack_size`]: blockproof_repo::index::pack_size

use std::collections::HashSet;
use std::str::FromStr;

use blockproof_format::Id;
use blockproof_repo::{BlobIndex, Repository};
use blockproof_store::Kind;

use crate::CoreError;

/// The packs of an index that may not be reused, and why.
#[derive(Debug, Default)]
pub(crate) struct Availability {
    unusable: HashSet<Id>,
    missing: u64,
    wrong_size: u64,
    damaged: u64,
}

impl Availability {
    /// Lists the packs with their sizes and judges every pack `index` knows: each listed
    /// pack is found by position in the index (no name is built per pack the index
    /// knows: at 220 000 packs that was a tenth of a small backup).
    pub fn assess(repo: &Repository, index: &BlobIndex, warnings: &mut Vec<String>) -> Result<Self, CoreError> {
        let listed = repo.backend().list_sizes(Kind::Pack)?;
        let damaged = crate::check::damaged_packs(repo, warnings);
        // Per pack of the index, by position: listed with the size its listing gives?
        let mut sized: Vec<Option<bool>> = vec![None; index.packs().len()];
        for (name, size) in &listed {
            let id = Id::is_file_name(name).then(|| Id::from_str(name).ok()).flatten();
            let Some(pos) = id.and_then(|id| index.pack_position(&id)) else { continue };
            sized[pos as usize] = Some(index.expected_size_at(pos) == *size);
        }
        let mut a = Availability::default();
        for (pack, sized) in index.packs().iter().zip(sized) {
            match sized {
                None => a.missing += 1,
                Some(false) => a.wrong_size += 1,
                Some(true) if damaged.contains(pack) => a.damaged += 1,
                Some(true) => continue,
            }
            a.unusable.insert(*pack);
        }
        if let Some(w) = a.warning() {
            warnings.push(w);
        }
        Ok(a)
    }

    /// Whether blobs in `pack` may be reused.
    pub fn usable(&self, pack: &Id) -> bool {
        !self.unusable.contains(pack)
    }

    /// Whether every pack may be reused (nothing to check per blob).
    pub fn all_usable(&self) -> bool {
        self.unusable.is_empty()
    }

    /// Packs left out of deduplication.
    pub fn unusable_packs(&self) -> u64 {
        self.unusable.len() as u64
    }

    fn warning(&self) -> Option<String> {
        if self.unusable.is_empty() {
            return None;
        }
        let mut why = Vec::new();
        for (n, what) in [
            (self.missing, "missing"),
            (self.wrong_size, "of the wrong size (truncated or replaced)"),
            (self.damaged, "found damaged by check --read-data"),
        ] {
            if n > 0 {
                why.push(format!("{n} {what}"));
            }
        }
        Some(format!(
            "{} pack file(s) the index names are not reused ({}): what this run needs from them is stored again \
             from the source; run blockproof repair to rebuild the index and salvage what is left",
            self.unusable.len(),
            why.join(", ")
        ))
    }
}
