//! Random access to one disk of a snapshot: [`DiskImage`].
//!
//! ## Model
//!
//! A disk of a snapshot is a fixed index tree of chunk ids (`DiskEntry::index_root`) over
//! blobs in packs. `DiskImage` answers `read_at(buf, offset)` for any byte range by walking
//! the chunks the range touches: a chunk whose id is the zero id is zeros, without I/O; any
//! other is read through [`BlobReader`], which authenticates it, decompresses it and
//! re-hashes it against its id, and is then checked to have the chunk's exact length.
//!
//! The stored chunks a read misses are fetched together with
//! [`BlobReader::read_many`], which reads the blobs of one pack region with one ranged
//! request: on S3 a 2 MiB NBD request costs a request or two per pack it touches, not one
//! per 64 KiB chunk. Many missing chunks are cut into groups of consecutive chunks, at
//! least half a restore batch (2 MiB of 64 KiB chunks) each and at most one per worker
//! (`workers()`), fetched in parallel, so a big read uses the cores and a streaming client
//! costs about the requests of a restore.
//!
//! **Read-ahead.** A read that misses and continues an earlier read — it starts where one
//! of the last [`STREAMS`] reads ended, or only zero chunks lie between (qemu-img skips
//! holes) — also fetches, in the same `read_many`, the following stored chunks that are
//! not cached: up to [`READ_AHEAD_BYTES`] (4 MiB), and never more than half the chunk
//! cache (none without a cache). They go to the cache only, so a client reading 128 KiB
//! at a time (a kernel NBD client) or 2 MiB at a time (qemu-img convert, nbdcopy) costs
//! about one round of requests per 4 MiB. A read-ahead chunk that fails to read or verify
//! is dropped without failing the read that fetched it; the read that asks for it meets
//! the damage. Random reads fetch only what they ask for.
//!
//! [`DiskImage::allocation`] and [`DiskImage::is_zero_range`] answer from the ids alone,
//! which is what NBD `base:allocation` and holes in a read reply need.
//!
//! ## Sharing and memory
//!
//! One `DiskImage` serves many threads (every `serve-nbd` client of one export, or the
//! file-level restore of another engineer's crate): all methods take `&self`.
//!
//! - **Chunk cache**: recently read chunks, bounded in bytes (`cache_bytes`, default
//!   [`DEFAULT_CACHE_BYTES`]), least recently used evicted first. Entries are `Arc`s, so a
//!   reader copies out of a chunk without holding the lock, and eviction never invalidates
//!   a chunk being copied.
//! - **Leaf pages**: the last [`LEAF_PAGES`] leaf pages of chunk ids (at most 32 KiB each),
//!   also least recently used first, so clients streaming different regions do not make
//!   each other reload index pages. Below them, one `TreeReader` (one cached page per
//!   level) behind a mutex loads pages on a miss.
//! - **No lock is held during blob I/O or decryption.** The groups of a read run on up to
//!   `workers()` scoped threads, each writing into its own disjoint parts of the caller's
//!   buffer. Two clients missing the same chunk at the same moment may both read it; both
//!   get the same verified bytes.
//!
//! Memory: `cache_bytes` + at most `LEAF_PAGES` × the page size (2 MiB with the default
//! fanout) + per read running now, the chunks it fetches (its own and at most
//! [`READ_AHEAD_BYTES`] read ahead) and the pack regions being read for them (each at most
//! `MAX_SPAN`, 8 MiB, of sealed bytes, one per group in flight).
//!
//! ## Errors
//!
//! A range past the end of the disk is [`CoreError::Invalid`]. Anything wrong with stored
//! data — a blob that fails authentication or its hash, a chunk of the wrong length, a
//! damaged index page — is [`CoreError::DamagedRange`] naming the disk bytes affected
//! (for an index page, every byte it locates), or [`CoreError::DamagedIndex`] when the
//! root of the disk's index is damaged and no byte can be located. No
//! method returns unverified bytes, and none panics on repository content.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use blockproof_format::tree::chunk_count;
use blockproof_format::{BlobKind, DiskEntry, Id};
use blockproof_repo::{BlobReader, RepoError, TreeReader};
use blockproof_work::{fan_out, FanOut};

use crate::{workers, CoreError};

/// Chunks kept in memory by default: 64 MiB (1024 chunks of 64 KiB).
pub const DEFAULT_CACHE_BYTES: usize = 64 << 20;
/// Leaf pages of chunk ids kept in memory (64 × 1024 ids cover 4 GiB of 64 KiB chunks).
pub const LEAF_PAGES: usize = 64;
/// The most a read that continues a stream fetches ahead of itself: 4 MiB, a restore's
/// batch ([`crate::restore`]), and never more than half the chunk cache.
pub const READ_AHEAD_BYTES: u64 = 4 << 20;
/// Streams told apart for read-ahead (the ends of the last reads remembered).
pub const STREAMS: usize = 8;

/// A map bounded by the total weight of its values, evicting the least recently used.
struct Lru<V> {
    map: HashMap<u64, (V, usize, u64)>,
    /// Last use → key.
    order: BTreeMap<u64, u64>,
    tick: u64,
    weight: usize,
    limit: usize,
}

impl<V: Clone> Lru<V> {
    fn new(limit: usize) -> Self {
        Lru { map: HashMap::new(), order: BTreeMap::new(), tick: 0, weight: 0, limit }
    }

    fn get(&mut self, key: u64) -> Option<V> {
        self.tick += 1;
        let (v, _, used) = self.map.get_mut(&key)?;
        self.order.remove(used);
        *used = self.tick;
        self.order.insert(self.tick, key);
        Some(v.clone())
    }

    /// Whether `key` is held, without counting as a use.
    fn contains(&self, key: u64) -> bool {
        self.map.contains_key(&key)
    }

    fn put(&mut self, key: u64, value: V, weight: usize) {
        if weight > self.limit || self.map.contains_key(&key) {
            return;
        }
        while self.weight + weight > self.limit {
            let Some((_, old)) = self.order.pop_first() else { break };
            if let Some((_, w, _)) = self.map.remove(&old) {
                self.weight -= w;
            }
        }
        self.tick += 1;
        self.weight += weight;
        self.order.insert(self.tick, key);
        self.map.insert(key, (value, weight, self.tick));
    }
}

/// One missing chunk of a read: where its bytes go (nowhere for a chunk read ahead, which
/// only goes to the cache).
struct Fetch<'b> {
    chunk: u64,
    id: Id,
    within: usize,
    out: Option<&'b mut [u8]>,
}

/// One disk of a snapshot, readable at any offset by any number of threads.
pub struct DiskImage<'a> {
    reader: &'a BlobReader<'a>,
    entry: DiskEntry,
    tree: Mutex<TreeReader<'a>>,
    leaves: Mutex<Lru<Arc<Vec<Id>>>>,
    cache: Mutex<Lru<Arc<Vec<u8>>>>,
    cache_limit: usize,
    /// Where the last [`STREAMS`] reads ended (oldest first), to recognise a read that
    /// continues one of them.
    streams: Mutex<VecDeque<u64>>,
    threads: usize,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these locks leaves consistent state (every update is
    // completed before anything can panic), so a poisoned lock is still usable.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl<'a> DiskImage<'a> {
    /// Opens `entry` (a disk of a snapshot) for reading through `reader`, caching up to
    /// `cache_bytes` of chunks (0: no chunk cache).
    pub fn new(reader: &'a BlobReader<'a>, entry: &DiskEntry, cache_bytes: usize) -> Result<Self, CoreError> {
        let n = chunk_count(entry.size, entry.chunk_size);
        let tree = TreeReader::new(reader, entry.index_root, n, entry.index_fanout)?;
        Ok(DiskImage {
            reader,
            entry: entry.clone(),
            tree: Mutex::new(tree),
            leaves: Mutex::new(Lru::new(LEAF_PAGES)),
            cache: Mutex::new(Lru::new(cache_bytes)),
            cache_limit: cache_bytes,
            streams: Mutex::new(VecDeque::with_capacity(STREAMS)),
            threads: workers(),
        })
    }

    /// The disk's size in bytes.
    pub fn size(&self) -> u64 {
        self.entry.size
    }

    pub fn chunk_size(&self) -> u64 {
        u64::from(self.entry.chunk_size)
    }

    /// The disk entry (id, mismatches, ...).
    pub fn entry(&self) -> &DiskEntry {
        &self.entry
    }

    /// Bytes of chunks held in the cache now (at most the `cache_bytes` given to `new`).
    pub fn cached_bytes(&self) -> usize {
        lock(&self.cache).weight
    }

    fn damaged(&self, first_chunk: u64, chunks: u64, cause: RepoError) -> CoreError {
        let cs = self.chunk_size();
        CoreError::DamagedRange {
            disk: self.entry.id.clone(),
            offset: first_chunk * cs,
            end: (first_chunk + chunks).saturating_mul(cs).min(self.size()),
            cause,
        }
    }

    /// The chunk ids of leaf page `page`.
    fn leaf(&self, page: u64) -> Result<Arc<Vec<Id>>, CoreError> {
        let cached = lock(&self.leaves).get(page);
        if let Some(ids) = cached {
            return Ok(ids);
        }
        let ids = {
            let mut tree = lock(&self.tree);
            match tree.leaf(page) {
                Ok(ids) => Arc::new(ids.to_vec()),
                Err(e) => {
                    let span = tree.unreadable_span(page);
                    return Err(crate::index_damage(&self.entry, span, e));
                }
            }
        };
        lock(&self.leaves).put(page, ids.clone(), 1);
        Ok(ids)
    }

    fn id(&self, chunk: u64) -> Result<Id, CoreError> {
        let fanout = u64::from(self.entry.index_fanout);
        let ids = self.leaf(chunk / fanout)?;
        ids.get((chunk % fanout) as usize)
            .copied()
            .ok_or_else(|| self.damaged(chunk, 1, RepoError::corrupt("index page", "shorter than its geometry")))
    }

    /// Reads, verifies and caches the chunks of `group` with one [`BlobReader::read_many`]
    /// (about one storage request per pack region) and copies each into its part of the
    /// caller's buffer. The first chunk the caller asked for that fails is the error; a
    /// read-ahead chunk that fails is dropped (a read that asks for it meets the damage).
    fn fetch(&self, group: Vec<Fetch<'_>>) -> Result<(), CoreError> {
        let ids: Vec<Id> = group.iter().map(|f| f.id).collect();
        let blobs = self.reader.read_many(&ids, BlobKind::Data);
        let mut first_error = None;
        for (f, blob) in group.into_iter().zip(blobs) {
            let want = (self.size() - f.chunk * self.chunk_size()).min(self.chunk_size()) as usize;
            let checked = blob.and_then(|data| {
                if data.len() == want {
                    Ok(data)
                } else {
                    let detail = format!("holds {} bytes, the chunk has {want}", data.len());
                    Err(RepoError::corrupt(format!("blob {}", f.id), detail))
                }
            });
            match (checked, f.out) {
                (Ok(data), out) => {
                    if let Some(out) = out {
                        let n = out.len();
                        out.copy_from_slice(&data[f.within..f.within + n]);
                    }
                    lock(&self.cache).put(f.chunk, Arc::new(data), want);
                }
                (Err(e), Some(_)) if first_error.is_none() => first_error = Some(self.damaged(f.chunk, 1, e)),
                (Err(_), _) => {}
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<(), CoreError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size() => Ok(()),
            _ => Err(CoreError::Invalid(format!(
                "bytes {offset}+{len} are not inside disk {} ({} bytes)",
                self.entry.id,
                self.size()
            ))),
        }
    }

    /// Fills `buf` with the disk's bytes at `offset`. Zero chunks cost no I/O; missing
    /// chunks are fetched by pack regions, in parallel groups when there are many, with the
    /// following chunks read ahead when the read continues an earlier one.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), CoreError> {
        self.check_range(offset, buf.len() as u64)?;
        let cs = self.chunk_size();
        let end = offset + buf.len() as u64;
        let mut missing = Vec::new();
        let (mut rest, mut at) = (buf, offset);
        while !rest.is_empty() {
            let (chunk, within) = (at / cs, (at % cs) as usize);
            let n = (cs as usize - within).min(rest.len());
            let (out, tail) = std::mem::take(&mut rest).split_at_mut(n);
            rest = tail;
            at += n as u64;
            let cached = lock(&self.cache).get(chunk);
            if let Some(c) = cached {
                out.copy_from_slice(&c[within..within + n]);
                continue;
            }
            let id = self.id(chunk)?;
            if id.is_zero() {
                out.fill(0);
            } else {
                missing.push(Fetch { chunk, id, within, out: Some(out) });
            }
        }
        if self.continues_a_stream(offset, end, !missing.is_empty()) && !missing.is_empty() {
            self.read_ahead(end.div_ceil(cs), &mut missing);
        }
        if missing.is_empty() {
            return Ok(());
        }
        // Groups of consecutive chunks, each one `read_many`: at least half a restore
        // batch each (so a streaming client costs about the requests of a restore), at
        // most one per worker.
        let min_group = (crate::restore::chunks_per_read(cs) / 2).max(1) as usize;
        let groups = (missing.len() / min_group).clamp(1, self.threads);
        if groups == 1 {
            return self.fetch(missing);
        }
        let per_group = missing.len().div_ceil(groups);
        let mut batches = Vec::with_capacity(groups);
        let mut it = missing.into_iter().peekable();
        while it.peek().is_some() {
            batches.push(it.by_ref().take(per_group).collect::<Vec<_>>());
        }
        fan_out(
            self.reader.repo().cancel(),
            FanOut { workers: batches.len(), queue: batches.len() },
            |emit| {
                for b in batches {
                    if !emit.send(b) {
                        break;
                    }
                }
                Ok(())
            },
            || |b: Vec<Fetch<'_>>| self.fetch(b),
            |()| Ok(()),
        )
    }

    /// Records the read `offset..end` among the recent streams and says whether it
    /// continues one: it starts where an earlier read ended or, when `look_past_holes`,
    /// only zero chunks lie between (a client that skips holes, as qemu-img does).
    fn continues_a_stream(&self, offset: u64, end: u64, look_past_holes: bool) -> bool {
        if self.read_ahead_bytes() == 0 {
            return false;
        }
        let ends: Vec<u64> = lock(&self.streams).iter().copied().collect();
        let near = |e: u64| e < offset && offset - e <= READ_AHEAD_BYTES * 4;
        // Past the exact match, the gap is judged from the ids (a damaged page: not a hole).
        let from = ends.iter().copied().find(|&e| e == offset).or_else(|| {
            let mut gaps = ends.iter().copied().filter(|&e| look_past_holes && near(e));
            gaps.find(|&e| self.is_zero_range(e, offset - e).unwrap_or(false))
        });
        let mut streams = lock(&self.streams);
        if let Some(pos) = from.and_then(|e| streams.iter().position(|&x| x == e)) {
            streams.remove(pos);
        }
        if streams.len() == STREAMS {
            streams.pop_front();
        }
        streams.push_back(end);
        from.is_some()
    }

    /// Bytes one read-ahead may add to the cache: [`READ_AHEAD_BYTES`], at most half the
    /// cache (none without a cache).
    fn read_ahead_bytes(&self) -> u64 {
        READ_AHEAD_BYTES.min(self.cache_limit as u64 / 2)
    }

    /// Appends to `fetch` the stored chunks from `first` on that are not cached, up to
    /// [`DiskImage::read_ahead_bytes`] of them (looking at most four times that far).
    fn read_ahead(&self, first: u64, fetch: &mut Vec<Fetch<'_>>) {
        let cs = self.chunk_size();
        let chunks = chunk_count(self.size(), self.entry.chunk_size);
        let budget = self.read_ahead_bytes() / cs;
        let last = first.saturating_add(budget * 4).min(chunks);
        let mut taken = 0;
        for chunk in first..last {
            if taken >= budget {
                break;
            }
            if lock(&self.cache).contains(chunk) {
                continue;
            }
            let id = match self.id(chunk) {
                Ok(id) => id,
                // A damaged index page beyond the read: the read that needs it says so.
                Err(_) => break,
            };
            if !id.is_zero() {
                fetch.push(Fetch { chunk, id, within: 0, out: None });
                taken += 1;
            }
        }
    }

    /// Calls `visit(first byte, end, is_zero)` for each chunk overlapping
    /// `offset..offset + len` (clipped to it), in order, until it returns `false`.
    fn walk(&self, offset: u64, len: u64, visit: &mut dyn FnMut(u64, u64, bool) -> bool) -> Result<(), CoreError> {
        self.check_range(offset, len)?;
        let (cs, fanout) = (self.chunk_size(), u64::from(self.entry.index_fanout));
        let end = offset + len;
        let mut at = offset;
        while at < end {
            let page = at / cs / fanout;
            let ids = self.leaf(page)?;
            let page_end = ((page + 1) * fanout).saturating_mul(cs).min(end);
            while at < page_end {
                let chunk = at / cs;
                let next = ((chunk + 1) * cs).min(end);
                let id = ids.get((chunk % fanout) as usize).ok_or_else(|| {
                    self.damaged(chunk, 1, RepoError::corrupt("index page", "shorter than its geometry"))
                })?;
                if !visit(at, next, id.is_zero()) {
                    return Ok(());
                }
                at = next;
            }
        }
        Ok(())
    }

    /// The zero and data ranges covering `offset..offset + len`, in order and merged:
    /// `(length, is_zero)`. Answered from the chunk ids alone (no chunk is read).
    pub fn allocation(&self, offset: u64, len: u64) -> Result<Vec<(u64, bool)>, CoreError> {
        let mut out: Vec<(u64, bool)> = Vec::new();
        self.walk(offset, len, &mut |start, end, zero| {
            match out.last_mut() {
                Some((l, z)) if *z == zero => *l += end - start,
                _ => out.push((end - start, zero)),
            }
            true
        })?;
        Ok(out)
    }

    /// Whether every byte of `offset..offset + len` lies in a zero chunk (no chunk is read).
    pub fn is_zero_range(&self, offset: u64, len: u64) -> Result<bool, CoreError> {
        let mut all_zero = true;
        self.walk(offset, len, &mut |_, _, zero| {
            all_zero &= zero;
            zero
        })?;
        Ok(all_zero)
    }
}

#[cfg(test)]
mod tests {
    use super::Lru;

    #[test]
    fn lru_evicts_the_least_recently_used_within_its_weight() {
        let mut c = Lru::new(10);
        c.put(1, 'a', 4);
        c.put(2, 'b', 4);
        assert_eq!(c.get(1), Some('a')); // 2 is now the least recently used
        c.put(3, 'c', 4);
        assert_eq!((c.get(1), c.get(2), c.get(3)), (Some('a'), None, Some('c')));
        assert_eq!(c.weight, 8);
        c.put(4, 'd', 11); // heavier than the limit: not kept, nothing evicted
        assert_eq!((c.get(4), c.weight), (None, 8));
        c.put(5, 'e', 10);
        assert_eq!((c.get(1), c.get(3), c.get(5), c.weight), (None, None, Some('e'), 10));
        assert_eq!((c.map.len(), c.order.len()), (1, 1));
        let mut none = Lru::new(0);
        none.put(1, 'x', 1);
        assert_eq!(none.get(1), None);
    }
}
