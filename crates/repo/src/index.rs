//! The blob index: where every blob lives.

use std::collections::{HashMap, HashSet};

use blockproof_format::{BlobEntry, BlobKind, Id, IndexFile};

use crate::blob::open_blob;
use crate::blob_table::{self, Run, Slot};
use crate::index_cache::CachedTable;
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

/// The union of all index files: blob id → location, in compact slots sorted by id
/// (54 bytes per location and a directory of 4 bytes per 8,
/// see `blob_table.rs`); see docs/ARCHITECTURE.md §7.
///
/// A blob stored more than once (two backups at once, a backup that stored again what
/// was missing or damaged, a repair or a repack that copied it) keeps its first location
/// — the first in load order: index files in listing order, packs and entries in the
/// order each file gives them — and its further ones, one per other pack, in load order;
/// [`BlobReader`] tries them in turn when a read fails, so one good copy is enough.
///
/// The loaders ([`BlobIndex::load`], [`BlobIndex::scan`], [`IndexBuilder`]) sort every
/// location once into one run. [`BlobIndex::add_pack`] and [`BlobIndex::add_file`] on a
/// loaded index add a further sorted run, checked against the runs before it (so each
/// run holds only locations the index keeps); a run is merged in place into the one
/// before it once that one is at most twice its size, so there are O(log n) runs and
/// each slot is moved O(log n) times. Lookups search the runs oldest first: in each, one
/// directory entry and a bucket of about 8 slots.
///
/// With a cache directory ([`Repository::set_index_cache`]) the loaders take the table
/// from the local cache file instead ([`crate::index_cache`]): the oldest run is then on
/// disk, read a verified page at a time, and only the index files written since the
/// cache was built are held in memory. Packs excluded from such a load stay in
/// [`BlobIndex::packs`] and [`BlobIndex::len`]; their locations are left out of lookups.
#[derive(Default)]
pub struct BlobIndex {
    packs: Vec<Id>,
    pack_pos: HashMap<Id, u32>,
    /// Per pack (by position): what its first index listing says about its layout.
    layouts: Vec<PackLayout>,
    /// The table of the local cache: the oldest run, on disk.
    base: Option<CachedTable>,
    /// Packs (by position) whose locations in `base` lookups leave out.
    excluded_base: HashSet<u32>,
    /// Sorted runs of locations in memory, oldest first (after `base`).
    runs: Vec<Run>,
    /// While the loader adds a few index files on top of the cache: look them up without
    /// the membership filter (reading it would cost more than the lookups).
    unfiltered_adds: bool,
    /// Number of distinct blobs.
    blobs: usize,
    /// The index files this was loaded from, and the packs each lists.
    files: Vec<String>,
    file_packs: Vec<Vec<Id>>,
    /// How many of `files`, first, the local cache covers (in the cache's order).
    cached_files: usize,
    /// Whether the loader left packs out ([`BlobIndex::load_excluding`]).
    excluded_any: bool,
}

/// Builds a [`BlobIndex`] from index listings in bulk: every location is appended
/// unsorted and sorted once by [`IndexBuilder::finish`] (the loaders use it; so does
/// `check`, which reports damaged index files itself). The result is the index that
/// [`BlobIndex::add_pack`] would give for the same listings in the same order.
#[derive(Default)]
pub struct IndexBuilder {
    index: BlobIndex,
    slots: Vec<Slot>,
    /// Per listing added: the pack's position.
    listing_pack: Vec<u32>,
}

impl IndexBuilder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds the blobs of one pack listing.
    pub fn add_pack(&mut self, pack: Id, entries: &[BlobEntry]) {
        let pos = self.index.register_pack(pack, entries);
        let listing = self.listing_pack.len() as u32;
        self.listing_pack.push(pos);
        // Settling orders a listing's slots by offset; a listing whose offsets do not
        // increase (never written so) first loses its repeated ids, so that its first
        // mention of a blob is the one kept, as add_pack keeps it.
        if entries.windows(2).all(|w| w[0].offset < w[1].offset) {
            self.slots.extend(entries.iter().map(|e| Slot::new(e, listing)));
        } else {
            let mut seen = HashSet::new();
            self.slots.extend(entries.iter().filter(|e| seen.insert(e.id)).map(|e| Slot::new(e, listing)));
        }
    }

    /// Adds every pack listing of an index file, and its name to [`BlobIndex::files`].
    pub fn add_file(&mut self, name: String, file: &IndexFile) {
        for (pack, entries) in &file.packs {
            self.add_pack(*pack, entries);
        }
        self.index.push_file(name, file);
    }

    /// The index: the locations sorted by id.
    pub fn finish(self) -> BlobIndex {
        let IndexBuilder { mut index, slots, listing_pack } = self;
        let (run, blobs) = blob_table::settle(slots, &listing_pack);
        index.blobs = blobs;
        if run.len() > 0 {
            index.runs.push(run);
        }
        index
    }
}

/// A pack's layout as its index listing gives it: how many blobs its header lists and
/// where its last blob ends.
#[derive(Clone, Copy, Debug, Default)]
struct PackLayout {
    blobs: u64,
    end: u64,
}

/// The size of a whole pack file that holds `blobs` blobs, the last ending at `end`: the
/// blobs, the sealed header (`count u32` and 50 bytes per entry) right after them, and the
/// 4-byte trailer (FORMAT §9). A pack file of any other size is truncated or replaced.
pub fn pack_size(blobs: u64, end: u64) -> u64 {
    use blockproof_format::pack::{BLOB_ENTRY_LEN, PACK_HEADER_LEN, PACK_TRAILER_LEN};
    let header = 4 + blobs * BLOB_ENTRY_LEN as u64 + blockproof_format::SEAL_OVERHEAD as u64;
    end.max(PACK_HEADER_LEN as u64) + header + PACK_TRAILER_LEN as u64
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
        if let Some(dir) = repo.index_cache() {
            if let Some(loaded) = Self::read_cached(repo, dir, excluded, strict)? {
                return Ok(loaded);
            }
        }
        let mut builder = IndexBuilder::new();
        let mut skipped = Skipped::default();
        for name in list_files(repo, strict, &mut skipped)? {
            let Some(file) = read_listed(repo, &name, strict, &mut skipped)? else { continue };
            for (pack, entries) in file.packs.iter().filter(|(p, _)| !excluded.contains(p)) {
                builder.add_pack(*pack, entries);
            }
            builder.index.push_file(name, &file);
        }
        builder.index.excluded_any = !excluded.is_empty();
        Ok((builder.finish(), skipped))
    }

    /// The position of a pack, added (with the layout of this listing) if new.
    fn register_pack(&mut self, pack: Id, entries: &[BlobEntry]) -> u32 {
        let next = self.packs.len() as u32;
        let pos = *self.pack_pos.entry(pack).or_insert(next);
        if pos == next {
            self.packs.push(pack);
            let end = entries.iter().map(BlobEntry::end).max().unwrap_or(0);
            self.layouts.push(PackLayout { blobs: entries.len() as u64, end });
        }
        pos
    }

    /// Adds the blobs of one pack. A blob already known keeps its first location; a
    /// location in another pack is kept as a further copy (one per pack).
    pub fn add_pack(&mut self, pack: Id, entries: &[BlobEntry]) {
        let pos = self.register_pack(pack, entries);
        // (slot, whether the blob is new), in listing order; then sorted by id, the
        // first mention of each id kept.
        let mut fresh: Vec<(Slot, bool)> = Vec::with_capacity(entries.len());
        for e in entries {
            let known = self.slots(&e.id, !self.unfiltered_adds);
            let new = known.is_empty();
            if new || known.iter().all(|s| s.pack() != pos) {
                fresh.push((Slot::new(e, pos), new));
            }
        }
        fresh.sort_by_key(|f| f.0.id);
        fresh.dedup_by(|b, a| a.0.id == b.0.id);
        self.blobs += fresh.iter().filter(|f| f.1).count();
        if fresh.is_empty() {
            return;
        }
        self.runs.push(Run::new(fresh.into_iter().map(|f| f.0).collect()));
        while let [.., older, newer] = &self.runs[..] {
            if older.len() > 2 * newer.len() {
                break;
            }
            let newer = self.runs.pop().expect("two runs");
            self.runs.last_mut().expect("one run").merge(newer);
        }
    }

    /// Every slot of a blob: its locations in load order. `filtered`: ask the cache's
    /// membership filter first (for ids that are often absent).
    fn slots(&self, id: &Id, filtered: bool) -> Vec<Slot> {
        let mut out = match &self.base {
            Some(base) if !filtered || base.may_contain(id) => {
                let mut group = base.find(id).1;
                if !self.excluded_base.is_empty() {
                    group.retain(|s| !self.excluded_base.contains(&s.pack()));
                }
                group
            }
            _ => Vec::new(),
        };
        for run in &self.runs {
            out.extend_from_slice(run.group(id));
        }
        out
    }

    /// Whether the cache's table is loaded, and the number of runs in memory.
    #[cfg(test)]
    pub(crate) fn layers(&self) -> (bool, usize) {
        (self.base.is_some(), self.runs.len())
    }

    /// What failed its check in the local cache since this index was loaded: lookups
    /// that needed it answered "not found", and passes over the table ended early. An
    /// operation that deletes must not act on such an index.
    pub fn damage(&self) -> Option<RepoError> {
        let base = self.base.as_ref()?;
        base.damage().map(|d| RepoError::corrupt(d, "it was removed; run the command again to rebuild it"))
    }

    fn location(&self, slot: &Slot) -> (Id, BlobEntry) {
        (self.packs[slot.pack() as usize], slot.entry())
    }

    pub fn contains(&self, id: &Id) -> bool {
        !self.slots(id, true).is_empty()
    }

    /// The pack id and entry of a blob (its first location).
    pub fn get(&self, id: &Id) -> Option<(Id, BlobEntry)> {
        self.slots(id, false).first().map(|s| self.location(s))
    }

    /// Every location of a blob: the first one, then its further copies.
    pub fn locations<'s>(&'s self, id: &Id) -> impl Iterator<Item = (Id, BlobEntry)> + 's {
        self.slots(id, false).into_iter().map(|s| self.location(&s))
    }

    /// Whether the blob has a location besides its first.
    fn has_copies(&self, id: &Id) -> bool {
        self.slots(id, false).len() > 1
    }

    /// Whether some location of the blob is in a pack `usable` accepts.
    pub fn stored_where(&self, id: &Id, usable: impl Fn(&Id) -> bool) -> bool {
        self.slots(id, true).iter().any(|s| usable(&self.packs[s.pack() as usize]))
    }

    /// The size the pack file must have, from its index listing ([`pack_size`]); `None`
    /// for a pack the index does not know.
    pub fn expected_pack_size(&self, pack: &Id) -> Option<u64> {
        Some(self.expected_size_at(*self.pack_pos.get(pack)?))
    }

    /// [`BlobIndex::expected_pack_size`] of the pack at position `pos` of
    /// [`BlobIndex::packs`].
    pub fn expected_size_at(&self, pos: u32) -> u64 {
        let l = self.layouts[pos as usize];
        pack_size(l.blobs, l.end)
    }

    /// All packs the index knows.
    pub fn packs(&self) -> &[Id] {
        &self.packs
    }

    /// All index files it was loaded from.
    pub fn files(&self) -> &[String] {
        &self.files
    }

    /// Each index file it was loaded from with the packs it lists (excluded ones too).
    pub fn file_packs(&self) -> impl Iterator<Item = (&str, &[Id])> + '_ {
        self.files.iter().map(String::as_str).zip(self.file_packs.iter().map(Vec::as_slice))
    }

    fn push_file(&mut self, name: String, file: &IndexFile) {
        self.files.push(name);
        self.file_packs.push(file.packs.iter().map(|(p, _)| *p).collect());
    }

    /// Number of blobs.
    pub fn len(&self) -> usize {
        self.blobs
    }

    pub fn is_empty(&self) -> bool {
        self.blobs == 0
    }

    /// Iterates over (blob id, pack id, entry): the first location of each blob, in no
    /// particular order (today: by id within each run).
    pub fn iter(&self) -> impl Iterator<Item = (Id, Id, BlobEntry)> + '_ {
        self.iter_table().filter(|t| t.at == t.blob).filter_map(|t| self.visible(t))
    }

    /// Iterates over every location of every blob, further copies included, in no
    /// particular order.
    pub fn iter_all(&self) -> impl Iterator<Item = (Id, Id, BlobEntry)> + '_ {
        self.iter_table().filter_map(|t| self.visible(t))
    }

    /// A location of the table as (blob id, pack id, entry), unless its pack is excluded.
    fn visible(&self, t: TableEntry) -> Option<(Id, Id, BlobEntry)> {
        (!self.excluded_base.contains(&t.pack)).then(|| (t.entry.id, self.packs[t.pack as usize], t.entry))
    }

    /// The number of locations in the table (the cache's, then the runs one after the
    /// other): every [`BlobIndex::position`] is below it.
    pub fn table_len(&self) -> usize {
        self.base.as_ref().map_or(0, CachedTable::len) + self.runs.iter().map(Run::len).sum::<usize>()
    }

    /// Where a blob's first location lies in the table: a number below
    /// [`BlobIndex::table_len`], one per blob, that stays the same while the index is
    /// not changed ([`crate::Marks`] keep one bit per position). `None` for a blob the
    /// index does not know. One directory entry and a bucket per run, like [`BlobIndex::get`].
    pub fn position(&self, id: &Id) -> Option<usize> {
        self.position_before(self.runs.len(), id)
    }

    /// The position of `id`'s first location in the cache's table and the first `runs`
    /// runs.
    fn position_before(&self, runs: usize, id: &Id) -> Option<usize> {
        let mut base_len = 0;
        if let Some(base) = &self.base {
            let (at, group) = base.find(id);
            if !group.is_empty() {
                return Some(at);
            }
            base_len = base.len();
        }
        position_in(&self.runs[..runs], id).map(|p| base_len + p)
    }

    /// [`BlobIndex::position`] of each of `ids` (ascending, distinct; `count` of them, or
    /// an upper bound), given to `found` in order. With a local cache this walks its
    /// table once rather than reading a page per id (what marking every referenced blob
    /// needs, [`crate::MarkQueue`]).
    pub fn positions_sorted(
        &self,
        ids: impl Iterator<Item = Id>,
        count: u64,
        mut found: impl FnMut(Id, Option<usize>),
    ) {
        let Some(base) = &self.base else {
            ids.for_each(|id| found(id, self.position(&id)));
            return;
        };
        base.find_sorted(ids, dense(base, count), |id, at, _| {
            found(id, at.or_else(|| position_in(&self.runs, &id).map(|p| base.len() + p)))
        });
    }

    /// [`BlobIndex::stored_where`] for each of `ids` (ascending, distinct; `count` of
    /// them, or an upper bound), given to `found` in order: with a local cache, one walk
    /// along its table rather than a page lookup per id (what checking the thousands of
    /// page ids a backup keeps without reading them needs).
    pub fn stored_where_sorted(
        &self,
        ids: impl Iterator<Item = Id>,
        count: u64,
        usable: impl Fn(&Id) -> bool,
        mut found: impl FnMut(Id, bool),
    ) {
        let in_runs =
            |id: &Id| self.runs.iter().any(|run| run.group(id).iter().any(|s| usable(&self.packs[s.pack() as usize])));
        let Some(base) = &self.base else {
            ids.for_each(|id| found(id, in_runs(&id)));
            return;
        };
        base.find_sorted(ids, dense(base, count), |id, _, group| {
            let in_base =
                group.iter().any(|s| !self.excluded_base.contains(&s.pack()) && usable(&self.packs[s.pack() as usize]));
            found(id, in_base || in_runs(&id))
        });
    }

    /// Where temporary files of work on this index go: beside its local cache, if it has one.
    pub(crate) fn scratch_base(&self, name: &str) -> Option<std::path::PathBuf> {
        self.base.as_ref().map(|b| b.path().with_file_name(name))
    }

    /// The position of a pack in [`BlobIndex::packs`] (the `pack` of a [`TableEntry`]).
    pub fn pack_position(&self, pack: &Id) -> Option<u32> {
        self.pack_pos.get(pack).copied()
    }

    /// Every location of every blob, further copies included, in table order, each with
    /// its blob's [`BlobIndex::position`]: a pass over the table, with no lookup unless
    /// the index has more than one run (an index changed after loading).
    pub fn iter_table(&self) -> TableIter<'_> {
        let pass = self.base.as_ref().map(CachedTable::pass);
        let base = self.base.as_ref().map_or(0, CachedTable::len);
        TableIter { index: self, pass, passed: 0, previous: None, run: 0, at: 0, base, blob: 0 }
    }

    /// Decodes an index file's plaintext into this index, as [`BlobIndex::add_pack`]
    /// does; loading many files is faster through [`IndexBuilder`].
    pub fn add_file(&mut self, name: String, file: &IndexFile) {
        for (pack, entries) in &file.packs {
            self.add_pack(*pack, entries);
        }
        self.push_file(name, file);
    }
}

/// The index files listed, in listing order; a stray file is an error when `strict`,
/// else recorded in `skipped` (sorted).
fn list_files(repo: &Repository, strict: bool, skipped: &mut Skipped) -> Result<Vec<String>, RepoError> {
    let mut names = Vec::new();
    for name in repo.backend().list(Kind::Index)? {
        if Id::is_file_name(&name) {
            names.push(name);
        } else if strict {
            return Err(stray_error(Kind::Index, &name));
        } else {
            skipped.stray.push(format!("{}/{name}", Kind::Index.dir()));
        }
    }
    skipped.stray.sort();
    Ok(names)
}

/// Reads a listed index file: `None` for one removed since the listing (garbage
/// collection replaced it: its successor, if listed, holds what is still needed) or, when
/// not `strict`, a damaged one (recorded in `skipped`).
fn read_listed(
    repo: &Repository,
    name: &str,
    strict: bool,
    skipped: &mut Skipped,
) -> Result<Option<IndexFile>, RepoError> {
    match repo.read_index_file(name) {
        Ok(f) => Ok(Some(f)),
        Err(RepoError::Store(e)) if e.is_not_found() => Ok(None),
        Err(e) if !strict && e.is_damage() => {
            skipped.damaged.push(e.to_string());
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// Whether `count` sorted lookups in `base` read every page in order
/// ([`CachedTable::find_sorted`]): that costs less than a page per id once the ids touch
/// about one page in eight.
fn dense(base: &CachedTable, count: u64) -> bool {
    count.saturating_mul(8) >= (base.len() / crate::index_cache::PAGE_SLOTS) as u64
}

/// The position of `id`'s first location in `runs` (one after the other).
fn position_in(runs: &[Run], id: &Id) -> Option<usize> {
    let mut base = 0;
    for run in runs {
        let at = run.lower_bound(id);
        if run.slots().get(at).is_some_and(|s| s.id == *id) {
            return Some(base + at);
        }
        base += run.len();
    }
    None
}

/// One location in the table ([`BlobIndex::iter_table`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TableEntry {
    /// The position of the blob: of its first location.
    pub blob: usize,
    /// The position of this location: equal to `blob` for the first location.
    pub at: usize,
    /// The pack, by position in [`BlobIndex::packs`].
    pub pack: u32,
    pub entry: BlobEntry,
}

/// The iterator of [`BlobIndex::iter_table`].
pub struct TableIter<'a> {
    index: &'a BlobIndex,
    /// The pass over the cache's table, until it ends.
    pass: Option<crate::index_cache::Pass<'a>>,
    /// Slots of the cache's table passed, and the id of the last.
    passed: usize,
    previous: Option<Id>,
    run: usize,
    at: usize,
    /// The position of the current run's first slot.
    base: usize,
    /// The position of the current slot's blob.
    blob: usize,
}

impl Iterator for TableIter<'_> {
    type Item = TableEntry;

    fn next(&mut self) -> Option<TableEntry> {
        if let Some(pass) = &mut self.pass {
            if let Some(slot) = pass.next() {
                if self.previous != Some(slot.id) {
                    (self.previous, self.blob) = (Some(slot.id), self.passed);
                }
                let item = TableEntry { blob: self.blob, at: self.passed, pack: slot.pack(), entry: slot.entry() };
                self.passed += 1;
                return Some(item);
            }
            self.pass = None;
        }
        loop {
            let runs = &self.index.runs;
            let slots = runs.get(self.run)?.slots();
            let Some(slot) = slots.get(self.at) else {
                self.base += slots.len();
                (self.run, self.at) = (self.run + 1, 0);
                continue;
            };
            if self.at == 0 || slots[self.at - 1].id != slot.id {
                // A blob's locations are adjacent in a run; an older run may hold its first.
                self.blob = self.index.position_before(self.run, &slot.id).unwrap_or(self.base + self.at);
            }
            let item = TableEntry { blob: self.blob, at: self.base + self.at, pack: slot.pack(), entry: slot.entry() };
            self.at += 1;
            return Some(item);
        }
    }
}

/// Reads blobs through the index, verifying each one.
pub struct BlobReader<'a> {
    repo: &'a Repository,
    index: &'a BlobIndex,
    /// Metadata blobs (index and confirmation pages) this reader has read and verified:
    /// a backup reuses such a page without reading it back again.
    verified: std::sync::Mutex<std::collections::HashSet<Id>>,
}

impl<'a> BlobReader<'a> {
    pub fn new(repo: &'a Repository, index: &'a BlobIndex) -> Self {
        BlobReader { repo, index, verified: Default::default() }
    }

    /// Reads a blob: authenticated, decompressed and re-hashed against its id. When the
    /// blob's first location fails (a missing, short or damaged pack), its further copies
    /// are tried in turn; the error of the first location is returned when none reads.
    pub fn read(&self, id: &Id, kind: BlobKind) -> Result<Vec<u8>, RepoError> {
        let first = self.read_first(id, kind);
        let result = match first {
            Err(e) if self.index.has_copies(id) => self.read_copies(id, kind).ok_or(e),
            r => r,
        };
        if kind != BlobKind::Data && result.is_ok() {
            self.verified.lock().unwrap_or_else(|e| e.into_inner()).insert(*id);
        }
        result
    }

    /// Whether this reader has read the metadata blob `id` (an index or confirmation
    /// page) and found it whole.
    pub fn has_verified(&self, id: &Id) -> bool {
        self.verified.lock().unwrap_or_else(|e| e.into_inner()).contains(id)
    }

    /// The first further copy of a blob that reads whole.
    fn read_copies(&self, id: &Id, kind: BlobKind) -> Option<Vec<u8>> {
        self.index.locations(id).skip(1).find_map(|(pack, entry)| self.read_location(id, kind, pack, entry).ok())
    }

    fn read_first(&self, id: &Id, kind: BlobKind) -> Result<Vec<u8>, RepoError> {
        // A blob the index does not give because its local cache failed a check is that
        // failure, not a missing blob.
        let missing = || self.index.damage().unwrap_or(RepoError::MissingBlob(*id));
        let (pack, entry) = self.index.get(id).ok_or_else(missing)?;
        self.read_location(id, kind, pack, entry)
    }

    fn read_location(&self, id: &Id, kind: BlobKind, pack: Id, entry: BlobEntry) -> Result<Vec<u8>, RepoError> {
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
        // A blob whose first location failed: its further copies, if it has any.
        for (k, r) in out.iter_mut().enumerate() {
            if matches!(r, Some(Err(_))) && self.index.has_copies(&ids[k]) {
                if let Some(plain) = self.read_copies(&ids[k], kind) {
                    *r = Some(Ok(plain));
                }
            }
        }
        out.into_iter().map(|r| r.expect("every blob was read")).collect()
    }

    pub fn index(&self) -> &BlobIndex {
        self.index
    }

    /// The repository read from (and its cancellation token).
    pub fn repo(&self) -> &Repository {
        self.repo
    }
}

mod basis;
pub(crate) mod load;
#[cfg(test)]
pub(crate) mod tests;
