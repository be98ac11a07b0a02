//! Diff: which byte ranges of each disk differ between two restore points.
//!
//! Chunk ids are keyed hashes of the content, the same key for every snapshot of a
//! repository, so two restore points differ exactly where their fixed indexes hold
//! different ids: no data is read, only index pages, and of two disks of the same size
//! a leaf page with the same id in both is equal without reading it. Ranges are whole chunks, merged when adjacent; a disk that
//! grew or shrank differs in the bytes only one side has.

use blockproof_format::manifest::ByteRange;
use blockproof_format::tree::chunk_count;
use blockproof_format::{DiskEntry, Id};
use blockproof_repo::{BlobIndex, BlobReader, Repository, TreeReader};
use serde::Serialize;

use crate::CoreError;

/// One disk in a diff.
#[derive(Clone, Debug, Serialize)]
pub struct DiskDiff {
    pub id: String,
    /// Its size in the first and in the second restore point (`None`: not there).
    pub size_from: Option<u64>,
    pub size_to: Option<u64>,
    /// The byte ranges that differ (of the larger size), merged.
    pub changed: Vec<ByteRange>,
    pub changed_bytes: u64,
}

/// The differences between two restore points.
#[derive(Clone, Debug, Serialize)]
pub struct DiffReport {
    pub from: Id,
    pub to: Id,
    pub disks: Vec<DiskDiff>,
}

/// Compares restore point `from` with `to` (references as `restore` takes them), every
/// disk of either, or only `disk`.
pub fn diff(repo: &Repository, from: &str, to: &str, disk: Option<&str>) -> Result<DiffReport, CoreError> {
    let a = repo.resolve_snapshot(from)?;
    let b = repo.resolve_snapshot(to)?;
    let index = BlobIndex::load(repo)?;
    let reader = BlobReader::new(repo, &index);
    let mut ids: Vec<&str> = a.snapshot.disks.iter().chain(&b.snapshot.disks).map(|d| d.id.as_str()).collect();
    let mut seen = Vec::new();
    ids.retain(|id| {
        let new = !seen.contains(id);
        seen.push(id);
        new
    });
    if let Some(d) = disk {
        if !ids.contains(&d) {
            return Err(CoreError::Invalid(format!(
                "neither snapshot {} nor {} has a disk {d:?}",
                a.id.short(),
                b.id.short()
            )));
        }
        ids.retain(|id| *id == d);
    }
    let mut disks = Vec::new();
    for id in ids {
        let (da, db) = (a.snapshot.disk(id), b.snapshot.disk(id));
        let changed = match (da, db) {
            (Some(x), Some(y)) => changed_ranges(&reader, x, y)?,
            (Some(only), None) | (None, Some(only)) => {
                vec![ByteRange { offset: 0, length: only.size }].into_iter().filter(|r| r.length > 0).collect()
            }
            (None, None) => unreachable!("the id comes from one of them"),
        };
        disks.push(DiskDiff {
            id: id.to_string(),
            size_from: da.map(|d| d.size),
            size_to: db.map(|d| d.size),
            changed_bytes: changed.iter().map(|r| r.length).sum(),
            changed,
        });
    }
    Ok(DiffReport { from: a.id, to: b.id, disks })
}

/// The ranges where two versions of a disk differ, chunk by chunk.
fn changed_ranges(reader: &BlobReader<'_>, a: &DiskEntry, b: &DiskEntry) -> Result<Vec<ByteRange>, CoreError> {
    let mut out: Vec<ByteRange> = Vec::new();
    let mut add = |offset: u64, end: u64| match out.last_mut() {
        Some(last) if last.offset + last.length == offset => last.length = end - last.offset,
        _ => out.push(ByteRange { offset, length: end - offset }),
    };
    let (small, large) = (a.size.min(b.size), a.size.max(b.size));
    if a.chunk_size != b.chunk_size {
        // Not comparable chunk by chunk (another repository's copy would be re-chunked).
        if large > 0 {
            add(0, large);
        }
        return Ok(out);
    }
    if a.index_root == b.index_root && a.size == b.size && a.index_fanout == b.index_fanout {
        return Ok(out);
    }
    let cs = u64::from(a.chunk_size);
    let (na, nb) = (chunk_count(a.size, a.chunk_size), chunk_count(b.size, b.chunk_size));
    let mut ta = TreeReader::new(reader, a.index_root, na, a.index_fanout)?;
    let mut tb = TreeReader::new(reader, b.index_root, nb, b.index_fanout)?;
    if a.size == b.size && a.index_fanout == b.index_fanout {
        // Same shape: a leaf page with the same id in both is equal without reading it.
        let f = u64::from(a.index_fanout);
        for page in 0..ta.leaf_pages() {
            if ta.leaf_id(page)? == tb.leaf_id(page)? {
                continue;
            }
            let differ: Vec<u64> = {
                let left = ta.leaf(page)?.to_vec();
                let right = tb.leaf(page)?;
                (0..left.len() as u64).filter(|&k| left[k as usize] != right[k as usize]).collect()
            };
            for k in differ {
                let c = page * f + k;
                add(c * cs, ((c + 1) * cs).min(a.size));
            }
        }
        return Ok(out);
    }
    let common = chunk_count(small, a.chunk_size);
    for c in 0..common {
        let end = ((c + 1) * cs).min(small);
        // The last common chunk is partial on the shorter side when sizes differ.
        let partial = end == small && a.size != b.size && small % cs != 0;
        if partial || ta.chunk(c)? != tb.chunk(c)? {
            add(c * cs, end);
        }
    }
    if large > small {
        add(small, large);
    }
    Ok(out)
}
