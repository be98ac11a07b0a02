//! Random access to one disk of a snapshot: any byte range, chunk by chunk, every chunk
//! authenticated and re-hashed against its id before its bytes are used, zero chunks
//! without I/O, and a bounded in-memory cache of recently read chunks. Shared by the
//! clients of `serve-nbd` (and by file-level restore): the tree of chunk ids and the cache
//! sit behind locks; reading and checking a chunk happens outside them, so clients overlap.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use blockproof_format::tree::chunk_count;
use blockproof_format::{BlobKind, DiskEntry, Id};
use blockproof_repo::{BlobReader, TreeReader};

use crate::CoreError;

/// Chunks kept in memory by default: 64 MiB of 64 KiB chunks.
pub const DEFAULT_CACHE_BYTES: usize = 64 << 20;

/// A chunk cache bounded in bytes, evicting the oldest insertions first.
struct Cache {
    chunks: HashMap<u64, Arc<Vec<u8>>>,
    order: VecDeque<u64>,
    bytes: usize,
    limit: usize,
}

impl Cache {
    fn get(&self, i: u64) -> Option<Arc<Vec<u8>>> {
        self.chunks.get(&i).cloned()
    }

    fn put(&mut self, i: u64, data: Arc<Vec<u8>>) {
        if self.chunks.contains_key(&i) || data.len() > self.limit {
            return;
        }
        while self.bytes + data.len() > self.limit {
            let Some(old) = self.order.pop_front() else { break };
            if let Some(d) = self.chunks.remove(&old) {
                self.bytes -= d.len();
            }
        }
        self.bytes += data.len();
        self.order.push_back(i);
        self.chunks.insert(i, data);
    }
}

/// One disk of a snapshot, readable at any offset.
pub struct DiskImage<'a> {
    reader: &'a BlobReader<'a>,
    entry: DiskEntry,
    tree: Mutex<TreeReader<'a>>,
    cache: Mutex<Cache>,
}

impl<'a> DiskImage<'a> {
    /// Opens `entry` (a disk of a snapshot) for reading through `reader`.
    pub fn new(reader: &'a BlobReader<'a>, entry: &DiskEntry, cache_bytes: usize) -> Result<Self, CoreError> {
        let n = chunk_count(entry.size, entry.chunk_size);
        let tree = TreeReader::new(reader, entry.index_root, n, entry.index_fanout)?;
        let cache = Cache { chunks: HashMap::new(), order: VecDeque::new(), bytes: 0, limit: cache_bytes };
        Ok(DiskImage { reader, entry: entry.clone(), tree: Mutex::new(tree), cache: Mutex::new(cache) })
    }

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

    fn id(&self, i: u64) -> Result<Id, CoreError> {
        Ok(self.tree.lock().expect("tree lock").chunk(i)?)
    }

    /// The bytes of chunk `i` (`None` for a zero chunk).
    fn chunk(&self, i: u64) -> Result<Option<Arc<Vec<u8>>>, CoreError> {
        if let Some(c) = self.cache.lock().expect("cache lock").get(i) {
            return Ok(Some(c));
        }
        let id = self.id(i)?;
        if id.is_zero() {
            return Ok(None);
        }
        let data = self.reader.read(&id, BlobKind::Data).map_err(|cause| CoreError::DamagedRange {
            disk: self.entry.id.clone(),
            offset: i * self.chunk_size(),
            end: ((i + 1) * self.chunk_size()).min(self.size()),
            cause,
        })?;
        let want = (self.size() - i * self.chunk_size()).min(self.chunk_size()) as usize;
        if data.len() != want {
            return Err(CoreError::Invalid(format!(
                "chunk {i} of disk {} has {} bytes, not {want}",
                self.entry.id,
                data.len()
            )));
        }
        let data = Arc::new(data);
        self.cache.lock().expect("cache lock").put(i, data.clone());
        Ok(Some(data))
    }

    /// Fills `buf` with the bytes at `offset`.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), CoreError> {
        if offset.checked_add(buf.len() as u64).is_none_or(|end| end > self.size()) {
            return Err(CoreError::Invalid(format!(
                "read of {} bytes at {offset} is past the end of the disk",
                buf.len()
            )));
        }
        let cs = self.chunk_size();
        let mut done = 0usize;
        while done < buf.len() {
            let at = offset + done as u64;
            let (i, within) = (at / cs, (at % cs) as usize);
            let n = (cs as usize - within).min(buf.len() - done);
            match self.chunk(i)? {
                Some(c) => buf[done..done + n].copy_from_slice(&c[within..within + n]),
                None => buf[done..done + n].fill(0),
            }
            done += n;
        }
        Ok(())
    }

    /// The zero and data ranges covering `offset..offset + len`: `(length, is_zero)`,
    /// merged, by chunk.
    pub fn allocation(&self, offset: u64, len: u64) -> Result<Vec<(u64, bool)>, CoreError> {
        let cs = self.chunk_size();
        let end = (offset + len).min(self.size());
        let mut out: Vec<(u64, bool)> = Vec::new();
        let mut at = offset;
        while at < end {
            let i = at / cs;
            let next = ((i + 1) * cs).min(end);
            let zero = self.id(i)?.is_zero();
            match out.last_mut() {
                Some((l, z)) if *z == zero => *l += next - at,
                _ => out.push((next - at, zero)),
            }
            at = next;
        }
        Ok(out)
    }
}
