//! Loading the blob index through the local cache ([`crate::index_cache`]).

use std::collections::HashSet;
use std::path::Path;

use blockproof_format::{Id, IndexFile};

use super::{list_files, read_listed, BlobIndex, PackLayout};
use crate::index_cache::{build, BuildError, CachedTable, Meta, CACHE_FILE, PAGE_BYTES};
use crate::scan::Skipped;
use crate::{RepoError, Repository};

/// Index files written since the cache was built that are read into memory on top of
/// it; more, and the cache is rebuilt first.
pub(crate) const DELTA_FILES: usize = 64;
/// Locations read into memory on top of the cache; more (or more than an eighth of the
/// cache's, so a small repository's cache covers everything), and it is rebuilt first.
const DELTA_SLOTS: usize = 1 << 18;

/// The index files listed, against those a cache covers.
struct Coverage {
    /// Covered and still listed.
    keep: HashSet<String>,
    /// Listed, not covered, in listing order.
    added: Vec<String>,
    /// Covered files no longer listed (gc replaced or removed them).
    removed: bool,
}

fn coverage(names: &[String], meta: Option<&Meta>) -> Coverage {
    let covered: HashSet<&str> = meta.map(|m| m.files.iter().map(|(n, _)| n.as_str()).collect()).unwrap_or_default();
    let listed: HashSet<&str> = names.iter().map(String::as_str).collect();
    Coverage {
        keep: names.iter().filter(|n| covered.contains(n.as_str())).cloned().collect(),
        added: names.iter().filter(|n| !covered.contains(n.as_str())).cloned().collect(),
        removed: covered.iter().any(|n| !listed.contains(n)),
    }
}

impl BlobIndex {
    /// Loads the index through the cache in `dir`: the cache's table, rebuilt first when
    /// it is missing, fails its check, misses index files that gc removed, or is far
    /// behind; then the index files it does not cover, read into memory. `None` when the
    /// cache cannot be written (the caller loads into memory instead).
    pub(super) fn read_cached(
        repo: &Repository,
        dir: &Path,
        excluded: &HashSet<Id>,
        strict: bool,
    ) -> Result<Option<(Self, Skipped)>, RepoError> {
        // Runs a killed build or marking left here (they can take gigabytes).
        crate::run_file::remove_stale(dir);
        let mut skipped = Skipped::default();
        let names = list_files(repo, strict, &mut skipped)?;
        let path = dir.join(CACHE_FILE);
        let mut opened = CachedTable::open(&path, repo).ok();
        let mut cover = coverage(&names, opened.as_ref().map(|(_, m)| m));
        let mut delta = Vec::new();
        let mut rebuild = opened.is_none() || cover.removed || cover.added.len() > DELTA_FILES;
        if !rebuild {
            delta = read_files(repo, &cover.added, strict, &mut skipped, DELTA_SLOTS)?;
            let base = opened.as_ref().map_or(0, |(t, _)| t.len());
            rebuild = slots(&delta) > DELTA_SLOTS.min(base / 8);
        }
        if rebuild {
            delta.clear();
            skipped.damaged.clear();
            if blockproof_store::create_private_dir_all(dir).is_err() {
                return Ok(None);
            }
            let old = opened.as_ref().map(|(t, m)| (t, m));
            let mut built = build(repo, &path, old, &cover.keep, &cover.added);
            if matches!(built, Err(BuildError::Cache(_))) && old.is_some_and(|(t, _)| t.damage().is_some()) {
                // The previous table failed its check while it was merged: from nothing.
                built = build(repo, &path, None, &HashSet::new(), &names);
            }
            match built {
                Ok(()) => {}
                Err(BuildError::Repo(e)) => return Err(e),
                Err(BuildError::Cache(_)) => return Ok(None),
            }
            drop(opened);
            opened = match CachedTable::open(&path, repo) {
                Ok(o) => Some(o),
                Err(_) => return Ok(None),
            };
            cover = coverage(&names, opened.as_ref().map(|(_, m)| m));
            // What the build left out: files damaged or gone since the listing.
            delta = read_files(repo, &cover.added, strict, &mut skipped, usize::MAX)?;
        }
        let (table, meta) = opened.expect("a cache, opened or built");
        let mut index = BlobIndex::default();
        let n = meta.packs.len();
        index.packs.reserve_exact(n);
        index.layouts.reserve_exact(n);
        index.pack_pos.reserve(n);
        for (pack, blobs, end) in &meta.packs {
            index.pack_pos.insert(*pack, index.packs.len() as u32);
            index.packs.push(*pack);
            index.layouts.push(PackLayout { blobs: *blobs, end: *end });
        }
        for (name, listed) in meta.files {
            index.files.push(name);
            index.file_packs.push(listed.iter().map(|p| index.packs[*p as usize]).collect());
        }
        index.cached_files = index.files.len();
        index.excluded_any = !excluded.is_empty();
        index.excluded_base = excluded.iter().filter_map(|p| index.pack_pos.get(p).copied()).collect();
        index.blobs = table.blobs();
        // Each location added is looked up in the table: through the membership filter
        // (read whole, 1 byte per blob of the cache) when that reads less than a page per
        // location would; most added locations are new blobs, which the filter rules out.
        index.unfiltered_adds = slots(&delta).saturating_mul(PAGE_BYTES) < table.filter_bytes();
        index.base = Some(table);
        for (name, file) in delta {
            for (pack, entries) in file.packs.iter().filter(|(p, _)| !excluded.contains(p)) {
                index.add_pack(*pack, entries);
            }
            index.push_file(name, &file);
        }
        index.unfiltered_adds = false;
        Ok(Some((index, skipped)))
    }
}

/// The number of locations `files` list.
fn slots(files: &[(String, IndexFile)]) -> usize {
    files.iter().map(|(_, f)| f.packs.iter().map(|(_, e)| e.len()).sum::<usize>()).sum()
}

/// Reads index files into memory, as the in-memory loader does, until they list more
/// than `limit` locations.
fn read_files(
    repo: &Repository,
    names: &[String],
    strict: bool,
    skipped: &mut Skipped,
    limit: usize,
) -> Result<Vec<(String, IndexFile)>, RepoError> {
    let mut out = Vec::new();
    let mut total = 0;
    for name in names {
        let Some(file) = read_listed(repo, name, strict, skipped)? else { continue };
        total += file.packs.iter().map(|(_, e)| e.len()).sum::<usize>();
        out.push((name.clone(), file));
        if total > limit {
            break;
        }
    }
    Ok(out)
}
