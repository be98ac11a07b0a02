//! The blob index's local cache: its sorted table on disk, read a verified page at a time.
//!
//! ## Model
//!
//! One file per repository in the cache directory ([`CACHE_FILE`], FORMAT §22): the
//! index's slots sorted by id in pages of [`PAGE_SLOTS`], a membership filter, and a
//! meta section (the packs with their layouts, the index files it covers with the packs
//! each lists, each page's first id and MAC, and a MAC per window of [`PASS_PAGES`]
//! pages). Opening reads and authenticates the header and the meta section only (about
//! 0.4 bytes per blob); a lookup finds the page by its first id, reads it with one `pread`
//! and checks its MAC before using it; a small cache keeps the pages read last. Passes
//! over the table and walks that touch most of it read whole windows, each checked by its
//! one MAC (a tenth of the cost of its pages'). The filter (1 byte per blob) is read on
//! the first membership test. So a process holds about 1.5 bytes per blob however large
//! the repository, and starts without reading the index files.
//!
//! ## Invariants
//!
//! - Every byte used is authenticated with the repository's cache key
//!   ([`blockproof_crypto::Keys::cache_hasher`]): a cache file that is damaged, truncated,
//!   of another repository or forged without the master secret is never believed. At open
//!   it is refused (and rebuilt); a page or the filter that fails later is reported as
//!   damage ([`CachedTable::damage`]), its lookups answer "not found", and the file is
//!   removed so the next command rebuilds it. Operations that delete check the damage
//!   before they act.
//! - The cache is disposable: it is derived only from the repository's index files
//!   and names the ones it covers; deleting it costs one rebuild.
//! - A cache file appears whole or not at all (written aside, then renamed), so two
//!   processes that rebuild it at once each leave a valid file.
//! - Building holds at most [`BATCH_SLOTS`] slots in memory: listings are sorted in
//!   batches, spilled to temporary run files, and merged with the previous cache's table
//!   (whose packs no index file lists any more are dropped).

use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use blockproof_format::Id;

use crate::blob_table::{Slot, SLOT_SIZE};
use crate::membership::{Membership, BLOCK_BYTES};
use crate::Repository;

/// The cache file's name in the repository's cache directory.
pub const CACHE_FILE: &str = "blob-index";
pub(crate) const MAGIC: [u8; 4] = *b"BPIX";
pub(crate) const VERSION: u32 = 2;
/// Slots per page: a lookup reads and authenticates 6 912 bytes.
pub(crate) const PAGE_SLOTS: usize = 128;
pub(crate) const PAGE_BYTES: usize = PAGE_SLOTS * SLOT_SIZE;
pub(crate) const HEADER_LEN: usize = 128;
const MAC_LEN: usize = 16;
/// Slots sorted in memory at once while building (54 MiB; small in tests, so that they
/// spill and merge).
const BATCH_SLOTS: usize = if cfg!(test) { 1000 } else { 1 << 20 };
/// Pages kept by lookups: 7 MiB.
const CACHED_PAGES: usize = 1024;
/// Pages read at once by a pass over the table: a window, which has a MAC of its own.
pub(crate) const PASS_PAGES: usize = 64;

/// One pack as the cache records it: its id and its layout (blobs listed, end of the last).
pub(crate) type PackRecord = (Id, u64, u64);

/// The meta section: the packs (position order) and the index files covered.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Meta {
    pub(crate) packs: Vec<PackRecord>,
    pub(crate) files: Vec<(String, Vec<u32>)>,
}

/// An open cache file: the table's fences and MACs in memory, its pages on disk.
pub(crate) struct CachedTable {
    file: File,
    path: PathBuf,
    keyed: blake3::Hasher,
    page_key: blake3::Hasher,
    slots: usize,
    blobs: usize,
    filter_at: u64,
    filter_blocks: usize,
    filter_mac: [u8; MAC_LEN],
    fences: Vec<Id>,
    macs: Vec<[u8; MAC_LEN]>,
    /// Per window of [`PASS_PAGES`] pages (the last may be shorter): its MAC.
    windows: Vec<[u8; MAC_LEN]>,
    filter: OnceLock<Option<Membership>>,
    pages: Mutex<PageCache>,
    damage: Mutex<Option<String>>,
}

#[derive(Default)]
struct PageCache {
    pages: HashMap<usize, Arc<[Slot]>>,
    order: VecDeque<usize>,
}

/// A page's MAC (FORMAT §22): its bytes first, so that they are hashed a whole chunk at a
/// time, under a key of its own (`MAC("page key")`), then its number.
fn page_mac(page_key: &blake3::Hasher, p: usize, bytes: &[u8]) -> [u8; MAC_LEN] {
    let mut h = page_key.clone();
    h.update(bytes);
    h.update(&(p as u64).to_le_bytes());
    short(*h.finalize().as_bytes())
}

/// The keyed hasher of page MACs, from the cache's key.
fn page_key(keyed: &blake3::Hasher) -> blake3::Hasher {
    blake3::Hasher::new_keyed(&mac(keyed, b"page key", &[]))
}

fn mac(keyed: &blake3::Hasher, domain: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    let mut h = keyed.clone();
    h.update(domain);
    for p in parts {
        h.update(p);
    }
    *h.finalize().as_bytes()
}

fn short(m: [u8; 32]) -> [u8; MAC_LEN] {
    m[..MAC_LEN].try_into().expect("16 bytes")
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// Reads the meta section a record at a time, hashing what it reads (so that the section
/// is never held whole beside what is parsed from it); nothing parsed is used before the
/// whole section authenticates.
struct MetaReader<'a> {
    reader: std::io::BufReader<&'a File>,
    left: u64,
    hasher: blake3::Hasher,
}

impl MetaReader<'_> {
    fn take<const N: usize>(&mut self) -> Result<[u8; N], String> {
        use std::io::Read;
        if self.left < N as u64 {
            return Err("meta section is short".into());
        }
        let mut b = [0u8; N];
        self.reader.read_exact(&mut b).map_err(|e| format!("meta: {e}"))?;
        self.hasher.update(&b);
        self.left -= N as u64;
        Ok(b)
    }
    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_le_bytes(self.take()?))
    }
    fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_le_bytes(self.take()?))
    }
    fn id(&mut self) -> Result<Id, String> {
        Ok(Id(self.take()?))
    }
}

impl CachedTable {
    /// Opens and authenticates the cache file of `repo` at `path`; an error says why it
    /// cannot be used (missing, damaged, another repository's or another version).
    pub(crate) fn open(path: &Path, repo: &Repository) -> Result<(CachedTable, Meta), String> {
        let file = File::open(path).map_err(|e| e.to_string())?;
        let mut header = [0u8; HEADER_LEN];
        file.read_exact_at(&mut header, 0).map_err(|e| format!("header: {e}"))?;
        if header[..4] != MAGIC || u32_at(&header, 4) != VERSION {
            return Err(format!("not a version {VERSION} cache file"));
        }
        if header[8..40] != repo.id().0 {
            return Err("the cache of another repository".into());
        }
        let (slots, blobs) = (u64_at(&header, 40), u64_at(&header, 48));
        let (filter_blocks, meta_len) = (u64_at(&header, 56), u64_at(&header, 64));
        if u32_at(&header, 72) as usize != PAGE_SLOTS || blobs > slots || meta_len > 1 << 40 {
            return Err("implausible header".into());
        }
        let filter_at = HEADER_LEN as u64 + slots * SLOT_SIZE as u64;
        let meta_at = filter_at + filter_blocks * BLOCK_BYTES as u64;
        let size = file.metadata().map_err(|e| e.to_string())?.len();
        if size != meta_at + meta_len {
            return Err(format!("{size} bytes where the header gives {}", meta_at + meta_len));
        }
        let keyed = repo.keys().cache_hasher();
        let mut hasher = keyed.clone();
        hasher.update(b"header");
        hasher.update(&header[..96]);
        let mut reader = std::io::BufReader::with_capacity(1 << 20, &file);
        std::io::Seek::seek(&mut reader, std::io::SeekFrom::Start(meta_at)).map_err(|e| format!("meta: {e}"))?;
        let mut c = MetaReader { reader, left: meta_len, hasher };
        let pages = (slots as usize).div_ceil(PAGE_SLOTS);
        let mut parsed = Meta::default();
        let packs = c.u32()?;
        parsed.packs.reserve_exact((packs as u64).min(meta_len / 48) as usize);
        for _ in 0..packs {
            parsed.packs.push((c.id()?, c.u64()?, c.u64()?));
        }
        for _ in 0..c.u32()? {
            let name = c.id()?.to_hex();
            let listed = (0..c.u32()?).map(|_| c.u32()).collect::<Result<_, _>>()?;
            parsed.files.push((name, listed));
        }
        // Sized up front (the file's size bounds `pages`): no doubling on the way.
        let (mut macs, mut fences) = (Vec::with_capacity(pages), Vec::with_capacity(pages));
        for _ in 0..pages {
            macs.push(c.take::<MAC_LEN>()?);
        }
        for _ in 0..pages {
            fences.push(c.id()?);
        }
        let windows = (0..pages.div_ceil(PASS_PAGES)).map(|_| c.take::<MAC_LEN>()).collect::<Result<_, _>>()?;
        if c.left != 0 {
            return Err("meta section is long".into());
        }
        if *c.hasher.finalize().as_bytes() != header[96..128] {
            return Err("its header does not authenticate".into());
        }
        let table = CachedTable {
            file,
            path: path.to_path_buf(),
            page_key: page_key(&keyed),
            keyed,
            slots: slots as usize,
            blobs: blobs as usize,
            filter_at,
            filter_blocks: filter_blocks as usize,
            filter_mac: header[80..96].try_into().expect("16 bytes"),
            fences,
            macs,
            windows,
            filter: OnceLock::new(),
            pages: Mutex::new(PageCache::default()),
            damage: Mutex::new(None),
        };
        Ok((table, parsed))
    }

    pub(crate) fn len(&self) -> usize {
        self.slots
    }

    /// The cache file.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Distinct blobs in the table.
    pub(crate) fn blobs(&self) -> usize {
        self.blobs
    }

    fn pages(&self) -> usize {
        self.fences.len()
    }

    /// What failed its check since the file was opened, if anything.
    pub(crate) fn damage(&self) -> Option<String> {
        self.damage.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn damaged(&self, what: String) {
        let mut d = self.damage.lock().unwrap_or_else(|e| e.into_inner());
        if d.is_none() {
            *d = Some(format!("the local blob index cache {} failed its check ({what})", self.path.display()));
            // The next command rebuilds it.
            let _ = std::fs::remove_file(&self.path);
        }
    }

    /// The pages of the window that holds page `p`: [`PASS_PAGES`] of them from a multiple
    /// of [`PASS_PAGES`] (the last window may be shorter).
    fn window_of(&self, p: usize) -> Range<usize> {
        let start = p - p % PASS_PAGES;
        start..(start + PASS_PAGES).min(self.pages())
    }

    /// Reads and authenticates pages `first..first + count`: a whole window by its one
    /// MAC (ten times cheaper than its pages' MACs), anything else page by page. `buf`
    /// holds the bytes read (kept by callers that read window after window, so that its
    /// memory is not mapped afresh each time).
    fn read_pages(&self, first: usize, count: usize, buf: &mut Vec<u8>) -> Result<Vec<Arc<[Slot]>>, String> {
        let start = first * PAGE_SLOTS;
        let end = ((first + count) * PAGE_SLOTS).min(self.slots);
        buf.resize((end - start) * SLOT_SIZE, 0);
        let buf = &mut buf[..];
        self.file
            .read_exact_at(buf, HEADER_LEN as u64 + (start * SLOT_SIZE) as u64)
            .map_err(|e| format!("page {first}: {e}"))?;
        let w = first / PASS_PAGES;
        let whole = count > 1
            && self.window_of(first) == (first..first + count)
            && short(mac(&self.keyed, b"window", &[&(w as u64).to_le_bytes(), buf])) == self.windows[w];
        let mut out = Vec::with_capacity(count);
        for (k, bytes) in buf.chunks(PAGE_BYTES).enumerate() {
            let p = first + k;
            // A window that fails its MAC is checked page by page, to name the page.
            if !whole && page_mac(&self.page_key, p, bytes) != self.macs[p] {
                return Err(format!("page {p} does not authenticate"));
            }
            let slots: Option<Arc<[Slot]>> = bytes.chunks_exact(SLOT_SIZE).map(Slot::decode).collect();
            out.push(slots.ok_or_else(|| format!("page {p} holds an unknown kind"))?);
        }
        Ok(out)
    }

    /// Page `p` from the page cache or the file; `None` (and the damage recorded) when
    /// it fails its check.
    fn page(&self, p: usize) -> Option<Arc<[Slot]>> {
        if let Some(page) = self.pages.lock().unwrap_or_else(|e| e.into_inner()).pages.get(&p) {
            return Some(page.clone());
        }
        match self.read_pages(p, 1, &mut Vec::new()) {
            Ok(mut v) => {
                let page = v.pop().expect("one page");
                let mut cache = self.pages.lock().unwrap_or_else(|e| e.into_inner());
                while cache.pages.len() >= CACHED_PAGES {
                    let Some(old) = cache.order.pop_front() else { break };
                    cache.pages.remove(&old);
                }
                if cache.pages.insert(p, page.clone()).is_none() {
                    cache.order.push_back(p);
                }
                Some(page)
            }
            Err(e) => {
                self.damaged(e);
                None
            }
        }
    }

    /// Whether the slots of `id`, which reach slot `end` of page `p` (of `len` slots),
    /// go on onto the next page: only if they fill the page and the next page's first id
    /// is `id` (its fence), so that page is not read for nothing.
    fn continues(&self, end: usize, len: usize, p: usize, id: &Id) -> bool {
        end == len && self.fences.get(p + 1) == Some(id)
    }

    /// The first position whose id is not below `id`, and the slots of `id` (its
    /// locations in load order; empty if absent, or when a page fails its check).
    pub(crate) fn find(&self, id: &Id) -> (usize, Vec<Slot>) {
        let mut p = self.fences.partition_point(|f| f < id).saturating_sub(1);
        let (mut at, mut group) = (None, Vec::new());
        while p < self.pages() {
            let Some(page) = self.page(p) else { return (self.slots, Vec::new()) };
            let from = if at.is_some() { 0 } else { page.partition_point(|s| s.id < *id) };
            if at.is_none() {
                if from == page.len() {
                    p += 1;
                    continue;
                }
                at = Some(p * PAGE_SLOTS + from);
            }
            let same = page[from..].iter().take_while(|s| s.id == *id).count();
            group.extend_from_slice(&page[from..from + same]);
            if !self.continues(from + same, page.len(), p, id) {
                break;
            }
            p += 1;
        }
        (at.unwrap_or(self.slots), group)
    }

    /// The first position of each of `ids` (ascending, distinct), or `None` for an id the
    /// table does not hold, given to `found` in order with the id's slots (its locations
    /// in load order; empty when absent): one walk along the table instead of a lookup
    /// each. `dense`: the ids touch most pages, which are then read [`PASS_PAGES`] at a
    /// time, not through the page cache. A page that fails its check is recorded as
    /// damage, and no id is found from the pages read with it on.
    pub(crate) fn find_sorted(
        &self,
        ids: impl Iterator<Item = Id>,
        dense: bool,
        mut found: impl FnMut(Id, Option<usize>, &[Slot]),
    ) {
        let mut window = Window { first: 0, pages: Vec::new(), dense, failed: false, buf: Vec::new() };
        let mut group = Vec::new();
        // Where the previous id's search ended (page, slot): the ids ascend, so the next
        // one lies there or after.
        let mut cursor: Option<(usize, usize)> = None;
        for id in ids {
            group.clear();
            let (mut p, mut start) = match cursor {
                Some((p0, k0)) if window.last_id(p0).is_some_and(|last| id <= last) => (p0, k0),
                _ => (self.fences.partition_point(|f| *f < id).saturating_sub(1), 0),
            };
            let mut at = None;
            while p < self.pages() {
                let Some(page) = self.window_page(&mut window, p) else {
                    (at, group) = (None, Vec::new());
                    break;
                };
                let from = if at.is_some() { 0 } else { lower_bound_from(page, start, &id) };
                start = 0;
                if at.is_none() {
                    if from == page.len() {
                        // Its first location, if any, opens the next page.
                        p += 1;
                        continue;
                    }
                    cursor = Some((p, from));
                    if page[from].id != id {
                        break;
                    }
                    at = Some(p * PAGE_SLOTS + from);
                }
                let same = page[from..].iter().take_while(|s| s.id == id).count();
                group.extend_from_slice(&page[from..from + same]);
                if !self.continues(from + same, page.len(), p, &id) {
                    break;
                }
                p += 1;
            }
            found(id, at, &group);
        }
    }

    /// Page `p` for [`CachedTable::find_sorted`]: from the window read last, else read
    /// (with the window's neighbours when dense). `None` once a page failed its check.
    fn window_page<'w>(&self, window: &'w mut Window, p: usize) -> Option<&'w [Slot]> {
        if window.failed {
            return None;
        }
        if !(window.first..window.first + window.pages.len()).contains(&p) {
            // Dense: the whole window of `p`, authenticated by its one MAC.
            let start = if window.dense { self.window_of(p).start } else { p };
            let read = if window.dense {
                self.read_pages(start, self.window_of(p).len(), &mut window.buf).map_err(|e| self.damaged(e)).ok()
            } else {
                self.page(p).map(|page| vec![page])
            };
            let Some(read) = read else {
                window.failed = true;
                return None;
            };
            (window.first, window.pages) = (start, read);
        }
        Some(&window.pages[p - window.first])
    }

    /// False only if the table certainly does not hold `id` (the filter, read and
    /// authenticated on the first call; a filter that fails its check answers true).
    pub(crate) fn may_contain(&self, id: &Id) -> bool {
        let filter = self.filter.get_or_init(|| self.read_filter().map_err(|e| self.damaged(e)).ok());
        filter.as_ref().is_none_or(|f| f.may_contain(id))
    }

    /// The bytes the filter's first use reads (and authenticates).
    pub(crate) fn filter_bytes(&self) -> usize {
        self.filter_blocks * BLOCK_BYTES
    }

    /// Reads and authenticates the filter, 1 MiB at a time into its words (so that it is
    /// never held twice).
    fn read_filter(&self) -> Result<Membership, String> {
        let len = self.filter_blocks * BLOCK_BYTES;
        let mut words = Vec::with_capacity(len / 4);
        let mut h = self.keyed.clone();
        h.update(b"filter");
        let mut buf = vec![0u8; len.min(1 << 20)];
        let mut at = 0;
        while at < len {
            let n = (len - at).min(buf.len());
            self.file.read_exact_at(&mut buf[..n], self.filter_at + at as u64).map_err(|e| format!("filter: {e}"))?;
            h.update(&buf[..n]);
            words.extend(buf[..n].chunks_exact(4).map(|w| u32::from_le_bytes(w.try_into().expect("4 bytes"))));
            at += n;
        }
        if short(*h.finalize().as_bytes()) != self.filter_mac {
            return Err("its filter does not authenticate".into());
        }
        Membership::from_words(words).ok_or_else(|| "its filter is empty".into())
    }

    /// Every slot in table order, read [`PASS_PAGES`] pages at a time (not through the
    /// page cache). A page that fails its check ends the pass and is recorded as damage.
    pub(crate) fn pass(&self) -> Pass<'_> {
        Pass {
            table: self,
            next_page: 0,
            batch: VecDeque::new(),
            current: Arc::from(Vec::new()),
            k: 0,
            buf: Vec::new(),
        }
    }
}

/// The pages [`CachedTable::find_sorted`] read last: `first..first + pages.len()`.
struct Window {
    first: usize,
    pages: Vec<Arc<[Slot]>>,
    dense: bool,
    failed: bool,
    /// The bytes of the last read, reused by the next.
    buf: Vec<u8>,
}

impl Window {
    /// The last id of page `p`, if the window holds it.
    fn last_id(&self, p: usize) -> Option<Id> {
        let page = self.pages.get(p.checked_sub(self.first)?)?;
        page.last().map(|s| s.id)
    }
}

/// The first slot of `page` at or after `start` whose id is not below `id`: a few steps
/// forward first (sorted ids that touch most slots lie close together), then a binary
/// search over the rest.
fn lower_bound_from(page: &[Slot], start: usize, id: &Id) -> usize {
    let near = (start + 4).min(page.len());
    match page[start..near].iter().position(|s| s.id >= *id) {
        Some(k) => start + k,
        None => near + page[near..].partition_point(|s| s.id < *id),
    }
}

/// The iterator of [`CachedTable::pass`].
pub(crate) struct Pass<'a> {
    table: &'a CachedTable,
    next_page: usize,
    batch: VecDeque<Arc<[Slot]>>,
    current: Arc<[Slot]>,
    k: usize,
    /// The bytes of the last read, reused by the next.
    buf: Vec<u8>,
}

impl Iterator for Pass<'_> {
    type Item = Slot;

    fn next(&mut self) -> Option<Slot> {
        loop {
            if let Some(s) = self.current.get(self.k) {
                self.k += 1;
                return Some(*s);
            }
            if self.batch.is_empty() {
                let pages = self.table.pages();
                if self.next_page >= pages {
                    return None;
                }
                let n = PASS_PAGES.min(pages - self.next_page);
                match self.table.read_pages(self.next_page, n, &mut self.buf) {
                    Ok(v) => self.batch.extend(v),
                    Err(e) => {
                        self.table.damaged(e);
                        self.next_page = pages;
                        return None;
                    }
                }
                self.next_page += n;
            }
            self.current = self.batch.pop_front().expect("a page");
            self.k = 0;
        }
    }
}

mod build;
pub(crate) use build::{build, BuildError};

#[cfg(test)]
mod tests;
