//! The index files a set of lookups rests on ([`IndexBasis`]), and whether a later index
//! still holds them.
//!
//! A blob found in an index is listed by one of the index files the index was loaded
//! from. While every one of those files is still listed, read whole and nothing of it
//! left out, a later index finds the blob too, without looking it up. Naming thousands of
//! files would cost what the lookups cost, so the files of the local cache are named by a
//! digest of the cache's first files: the cache only ever appends the files it adds
//! and keeps the order of those it keeps (a rebuild that drops one drops it from the
//! list, and a digest over it no longer matches), so a cache whose first `cached` files
//! have that digest covers every one of them.

use std::collections::HashSet;
use std::str::FromStr;

use blockproof_format::basis::{IndexBasis, BASIS_FILES};
use blockproof_format::Id;

use super::BlobIndex;

/// BLAKE3 of the ids of `names`, in order (names that are not ids count as zero ids;
/// the loaders list only ids).
fn digest(names: &[String]) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    for name in names {
        h.update(&Id::from_str(name).unwrap_or(Id::ZERO).0);
    }
    *h.finalize().as_bytes()
}

impl BlobIndex {
    /// The basis of lookups in this index by a process that then wrote the index files
    /// `written`: `None` when packs were left out of it, or it names more than
    /// [`BASIS_FILES`] files beside the cache's.
    pub fn basis(&self, written: &[Id]) -> Option<IndexBasis> {
        if self.excluded_any {
            return None;
        }
        let (cached, more) = self.files.split_at(self.cached_files);
        if more.len() + written.len() > BASIS_FILES {
            return None;
        }
        let mut files: Vec<Id> = more.iter().filter_map(|n| Id::from_str(n).ok()).collect();
        files.extend_from_slice(written);
        Some(IndexBasis { cached: cached.len() as u32, digest: digest(cached), files })
    }

    /// Whether this index holds every index file `basis` names, whole: its cache begins
    /// with the cached files `basis` names, every other file it names is among those this
    /// index was loaded from, and no pack was left out of it. Every blob the lookups of
    /// `basis` found is then in this index.
    pub fn holds(&self, basis: &IndexBasis) -> bool {
        let cached = basis.cached as usize;
        if self.excluded_any || cached > self.cached_files || digest(&self.files[..cached]) != basis.digest {
            return false;
        }
        let loaded: HashSet<&str> = self.files.iter().map(String::as_str).collect();
        basis.files.iter().all(|f| loaded.contains(f.to_hex().as_str()))
    }
}
