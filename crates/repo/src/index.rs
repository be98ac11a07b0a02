//! The blob index: where every blob lives.

use std::collections::{HashMap, HashSet};

use blockproof_format::{BlobEntry, BlobKind, Id, IndexFile};

use crate::blob::open_blob;
use crate::scan::{stray_error, Skipped};
use crate::{RepoError, Repository};
use blockproof_store::{Kind, StoreError};

/// Blobs of one pack this close together are fetched with one read (the bytes between are
/// read and dropped).
pub const COALESCE_GAP: u64 = 256 << 10;
/// The largest single read [`BlobReader::read_many`] makes.
pub const MAX_SPAN: u64 = 8 << 20;

/// Where one blob lives: a pack (by position in [`BlobIndex::packs`]) and its entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlobLocation {
    pub pack: u32,
    pub entry: BlobEntry,
}

/// The union of all index files: blob id → location. Memory is about 100 bytes per
/// blob; see docs/ARCHITECTURE.md for the plan to page it.
#[derive(Default)]
pub struct BlobIndex {
    packs: Vec<Id>,
    pack_pos: HashMap<Id, u32>,
    blobs: HashMap<Id, BlobLocation>,
    /// The index files this was loaded from.
    files: Vec<String>,
}

impl BlobIndex {
    /// Loads every index file of the repository, strictly: a damaged index file or a stray
    /// file in `index/` is an error. For garbage collection, which must know every blob
    /// location to be safe; readers use [`BlobIndex::scan`].
    pub fn load(repo: &Repository) -> Result<Self, RepoError> {
        Self::load_excluding(repo, &HashSet::new())
    }

    /// Loads the index strictly without the blobs of `excluded` packs (those garbage
    /// collection plans to delete: a backup must not deduplicate against them).
    pub fn load_excluding(repo: &Repository, excluded: &HashSet<Id>) -> Result<Self, RepoError> {
        Ok(Self::read(repo, excluded, true)?.0)
    }

    /// Loads the readable index files without the blobs of `excluded` packs, skipping
    /// stray and damaged files (returned for a warning). What a skipped index file listed
    /// is then unknown: a backup stores those blobs again, a restore that needs one fails
    /// on it naming the disk range.
    pub fn scan(repo: &Repository, excluded: &HashSet<Id>) -> Result<(Self, Skipped), RepoError> {
        Self::read(repo, excluded, false)
    }

    fn read(repo: &Repository, excluded: &HashSet<Id>, strict: bool) -> Result<(Self, Skipped), RepoError> {
        let mut idx = BlobIndex::default();
        let mut skipped = Skipped::default();
        for name in repo.backend().list(Kind::Index)? {
            if !Id::is_file_name(&name) {
                if strict {
                    return Err(stray_error(Kind::Index, &name));
                }
                skipped.stray.push(format!("{}/{name}", Kind::Index.dir()));
                continue;
            }
            // An index file replaced by garbage collection between listing and reading
            // is skipped: its successor, if listed, holds what is still needed.
            let file = match repo.read_index_file(&name) {
                Ok(f) => f,
                Err(RepoError::Store(e)) if e.is_not_found() => continue,
                Err(e) if !strict && e.is_damage() => {
                    skipped.damaged.push(e.to_string());
                    continue;
                }
                Err(e) => return Err(e),
            };
            for (pack, entries) in file.packs.iter().filter(|(p, _)| !excluded.contains(p)) {
                idx.add_pack(*pack, entries);
            }
            idx.files.push(name);
        }
        skipped.stray.sort();
        Ok((idx, skipped))
    }

    /// Adds the blobs of one pack. A blob already known keeps its first location.
    pub fn add_pack(&mut self, pack: Id, entries: &[BlobEntry]) {
        let next = self.packs.len() as u32;
        let pos = *self.pack_pos.entry(pack).or_insert(next);
        if pos == next {
            self.packs.push(pack);
        }
        for e in entries {
            self.blobs.entry(e.id).or_insert(BlobLocation { pack: pos, entry: *e });
        }
    }

    pub fn contains(&self, id: &Id) -> bool {
        self.blobs.contains_key(id)
    }

    /// The pack id and entry of a blob.
    pub fn get(&self, id: &Id) -> Option<(Id, BlobEntry)> {
        self.blobs.get(id).map(|l| (self.packs[l.pack as usize], l.entry))
    }

    /// All packs the index knows.
    pub fn packs(&self) -> &[Id] {
        &self.packs
    }

    /// All index files it was loaded from.
    pub fn files(&self) -> &[String] {
        &self.files
    }

    /// Number of blobs.
    pub fn len(&self) -> usize {
        self.blobs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.blobs.is_empty()
    }

    /// Iterates over (blob id, pack id, entry).
    pub fn iter(&self) -> impl Iterator<Item = (&Id, Id, &BlobEntry)> + '_ {
        self.blobs.iter().map(|(id, l)| (id, self.packs[l.pack as usize], &l.entry))
    }

    /// Decodes an index file's plaintext into this index (used by loaders that skip
    /// damaged files, such as `check`).
    pub fn add_file(&mut self, name: String, file: &IndexFile) {
        for (pack, entries) in &file.packs {
            self.add_pack(*pack, entries);
        }
        self.files.push(name);
    }
}

/// Reads blobs through the index, verifying each one.
pub struct BlobReader<'a> {
    repo: &'a Repository,
    index: &'a BlobIndex,
}

impl<'a> BlobReader<'a> {
    pub fn new(repo: &'a Repository, index: &'a BlobIndex) -> Self {
        BlobReader { repo, index }
    }

    /// Reads a blob: authenticated, decompressed and re-hashed against its id.
    pub fn read(&self, id: &Id, kind: BlobKind) -> Result<Vec<u8>, RepoError> {
        let (pack, entry) = self.index.get(id).ok_or(RepoError::MissingBlob(*id))?;
        if entry.kind != kind {
            return Err(RepoError::corrupt(
                format!("blob {id}"),
                format!("is a {:?} blob, expected {kind:?}", entry.kind),
            ));
        }
        let mut buf = vec![0u8; entry.length as usize];
        self.repo.backend().read_at(Kind::Pack, &pack.to_hex(), entry.offset, &mut buf)?;
        open_blob(self.repo.keys(), &entry, &buf, &format!("pack {pack} offset {}", entry.offset))
    }

    /// Reads several blobs with as few storage requests as possible: blobs of one pack
    /// that lie close together (gaps up to [`COALESCE_GAP`]) are fetched with one ranged
    /// read of at most [`MAX_SPAN`] bytes. On a remote store this turns a restore's
    /// per-chunk GETs into about one GET per pack region. Each result is verified like
    /// [`BlobReader::read`]. A span read that finds its pack missing or short falls back to
    /// reading the blobs one by one, so the error stays attached to the blobs it concerns;
    /// a remote store's failure is given to every blob of the span at once.
    pub fn read_many(&self, ids: &[Id], kind: BlobKind) -> Vec<Result<Vec<u8>, RepoError>> {
        let mut out: Vec<Option<Result<Vec<u8>, RepoError>>> = (0..ids.len()).map(|_| None).collect();
        let mut located: Vec<(Id, BlobEntry, usize)> = Vec::with_capacity(ids.len());
        for (k, id) in ids.iter().enumerate() {
            match self.index.get(id) {
                Some((pack, entry)) if entry.kind == kind => located.push((pack, entry, k)),
                _ => out[k] = Some(self.read(id, kind)),
            }
        }
        located.sort_by_key(|(pack, entry, _)| (*pack, entry.offset));
        let mut start = 0;
        while start < located.len() {
            let (pack, first, _) = located[start];
            let (lo, mut hi) = (first.offset, first.offset + u64::from(first.length));
            let mut end = start + 1;
            while end < located.len() {
                let (p, e, _) = located[end];
                let e_end = e.offset + u64::from(e.length);
                if p != pack || e.offset > hi + COALESCE_GAP || e_end.max(hi) - lo > MAX_SPAN {
                    break;
                }
                hi = hi.max(e_end);
                end += 1;
            }
            let members = &located[start..end];
            start = end;
            if members.len() > 1 {
                let mut span = vec![0u8; (hi - lo) as usize];
                match self.repo.backend().read_at(Kind::Pack, &pack.to_hex(), lo, &mut span) {
                    Ok(()) => {
                        for (_, entry, k) in members {
                            let at = (entry.offset - lo) as usize;
                            let sealed = &span[at..at + entry.length as usize];
                            let where_ = format!("pack {pack} offset {}", entry.offset);
                            out[*k] = Some(open_blob(self.repo.keys(), entry, sealed, &where_));
                        }
                        continue;
                    }
                    // The store itself failed (after its retries): every blob would fail
                    // the same way, each after as long a wait.
                    Err(StoreError::Remote(msg)) => {
                        for (_, _, k) in members {
                            out[*k] = Some(Err(StoreError::Remote(msg.clone()).into()));
                        }
                        continue;
                    }
                    // A missing or short pack: blob by blob, so the error lands on the
                    // blobs it concerns.
                    Err(_) => {}
                }
            }
            for (_, entry, k) in members {
                out[*k] = Some(self.read(&entry.id, kind));
            }
        }
        out.into_iter().map(|r| r.expect("every blob was read")).collect()
    }

    pub fn index(&self) -> &BlobIndex {
        self.index
    }
}
