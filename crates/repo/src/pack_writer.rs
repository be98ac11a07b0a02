//! Assembling sealed blobs into pack files and writing the index files that list them.

use blockproof_format::pack::{encode_entries, PACK_HEADER_LEN};
use blockproof_format::{BlobEntry, Envelope, Id, IndexFile, ObjectMagic};
use blockproof_store::Kind;

use crate::{RepoError, Repository, SealedBlob};

/// Write an index file at least every this many packs, so memory stays bounded and an
/// interrupted long backup leaves most of its packs indexed.
const PACKS_PER_INDEX_FILE: usize = 64;

/// Packs written, each with the entries of its blobs.
pub type WrittenPacks = Vec<(Id, Vec<BlobEntry>)>;

/// What a [`PackWriter`] wrote.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PackWriterStats {
    pub packs: u64,
    pub blobs: u64,
    /// Bytes of pack files written (headers included).
    pub pack_bytes: u64,
    /// The index files written, by id (their names).
    pub index_files: Vec<Id>,
}

/// Appends sealed blobs to a pack until it reaches the repository's pack size, then
/// hands it to a background thread that writes it durably while the next pack fills;
/// every [`PACKS_PER_INDEX_FILE`] packs and at [`PackWriter::finish`] writes an index file
/// for the packs written so far. Packs are durable before the index file that lists them
/// is written.
pub struct PackWriter<'a> {
    repo: &'a Repository,
    buf: Vec<u8>,
    entries: Vec<BlobEntry>,
    pending_index: WrittenPacks,
    written: WrittenPacks,
    stats: PackWriterStats,
    uploads: Uploads,
}

/// Packs being written by background threads while the next one fills: the writer
/// never waits for a pack's `fsync` (or upload) unless `limit` are pending or an index
/// file is about to name them. A local disk gets one writer thread; a remote store gets
/// as many as its [`Backend::parallelism`](blockproof_store::Backend::parallelism)
/// asks for, to fill the link. The first failed upload cancels the operation
/// ([`Repository::cancel`]): uploads in flight are abandoned by the store and queued ones
/// are not started, so a failure ends the operation at once.
struct Uploads {
    tx: Option<crossbeam_channel::Sender<(Id, Vec<u8>)>>,
    done: crossbeam_channel::Receiver<(Result<(), RepoError>, Vec<u8>)>,
    in_flight: usize,
    limit: usize,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Uploads {
    fn new(backend: std::sync::Arc<dyn blockproof_store::Backend>, cancel: blockproof_work::Cancel) -> Self {
        let writers = backend.parallelism().clamp(1, 16);
        // Each pending pack holds a pack-sized buffer: writers + 1 bounds the memory.
        let limit = writers + 1;
        let (tx, rx) = crossbeam_channel::bounded::<(Id, Vec<u8>)>(limit);
        let (done_tx, done) = crossbeam_channel::unbounded();
        let threads = (0..writers)
            .map(|_| {
                let (rx, done_tx, backend, cancel) = (rx.clone(), done_tx.clone(), backend.clone(), cancel.clone());
                std::thread::spawn(move || {
                    for (id, file) in rx.iter() {
                        if let Err(e) = cancel.check() {
                            if done_tx.send((Err(RepoError::from(e)), Vec::new())).is_err() {
                                return;
                            }
                            continue;
                        }
                        // A backend that keeps the buffer (an object store sends it as
                        // is) hands back nothing; the next pack then allocates anew. A
                        // panic is answered like any failure, so nobody waits for it.
                        let written = blockproof_work::guarded("pack upload thread", || {
                            backend.write_owned(Kind::Pack, &id.to_hex(), file)
                        });
                        let (r, spare) = match written {
                            Ok(Ok(back)) => (Ok(()), back.unwrap_or_default()),
                            Ok(Err(e)) => (Err(RepoError::from(e)), Vec::new()),
                            Err(panicked) => (Err(RepoError::from(panicked)), Vec::new()),
                        };
                        if let Err(e) = &r {
                            cancel.cancel(e.to_string());
                        }
                        if done_tx.send((r, spare)).is_err() {
                            return;
                        }
                    }
                })
            })
            .collect();
        Uploads { tx: Some(tx), done, in_flight: 0, limit, threads }
    }

    /// Hands a finished pack over; returns a spare buffer when one came back.
    fn send(&mut self, id: Id, file: Vec<u8>) -> Result<Option<Vec<u8>>, RepoError> {
        let mut spare = None;
        if self.in_flight >= self.limit {
            spare = Some(self.wait_one()?);
        }
        self.tx
            .as_ref()
            .expect("open")
            .send((id, file))
            .map_err(|_| RepoError::Internal("every pack upload thread is gone".into()))?;
        self.in_flight += 1;
        Ok(spare)
    }

    fn wait_one(&mut self) -> Result<Vec<u8>, RepoError> {
        let (r, buf) = self.done.recv().map_err(|_| RepoError::Internal("every pack upload thread is gone".into()))?;
        self.in_flight -= 1;
        match r {
            Ok(()) => Ok(buf),
            Err(e @ RepoError::Cancelled(_)) => Err(self.first_real_error(e)),
            Err(e) => Err(e),
        }
    }

    /// After a cancellation: the error of the upload that caused it, if one is still in
    /// flight (an upload that failed cancels the others, whose results may come first),
    /// so the caller sees the store's error rather than "cancelled".
    fn first_real_error(&mut self, cancelled: RepoError) -> RepoError {
        while self.in_flight > 0 {
            let Ok((r, _)) = self.done.recv() else { break };
            self.in_flight -= 1;
            if let Err(e) = r {
                if !matches!(e, RepoError::Cancelled(_)) {
                    return e;
                }
            }
        }
        cancelled
    }

    /// Waits until every pack handed over is durable.
    fn drain(&mut self) -> Result<(), RepoError> {
        while self.in_flight > 0 {
            self.wait_one()?;
        }
        Ok(())
    }
}

impl Drop for Uploads {
    fn drop(&mut self) {
        self.tx.take();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl<'a> PackWriter<'a> {
    pub fn new(repo: &'a Repository) -> Self {
        PackWriter {
            repo,
            buf: Vec::new(),
            entries: Vec::new(),
            pending_index: Vec::new(),
            written: Vec::new(),
            stats: PackWriterStats::default(),
            uploads: Uploads::new(repo.backend_arc(), repo.cancel().clone()),
        }
    }

    /// Appends a blob; may write a pack (and an index file).
    pub fn add(&mut self, blob: SealedBlob) -> Result<(), RepoError> {
        if self.buf.is_empty() {
            self.buf.reserve(self.repo.config().pack_size as usize + (1 << 20));
            self.buf.extend_from_slice(&ObjectMagic::Pack.header());
        }
        self.entries.push(BlobEntry {
            kind: blob.kind,
            compression: blob.compression,
            id: blob.id,
            offset: self.buf.len() as u64,
            length: blob.bytes.len() as u32,
            raw_length: blob.raw_length,
        });
        self.buf.extend_from_slice(&blob.bytes);
        self.stats.blobs += 1;
        if self.buf.len() >= self.repo.config().pack_size as usize {
            self.flush_pack()?;
        }
        Ok(())
    }

    fn flush_pack(&mut self) -> Result<(), RepoError> {
        if self.entries.is_empty() {
            return Ok(());
        }
        // The pack is built in `self.buf`, which keeps its capacity for the next pack.
        let file = &mut self.buf;
        let header = encode_entries(&self.entries);
        let before = file.len();
        self.repo.keys().seal_into(&ObjectMagic::Pack.header(), &header, file);
        let header_len = (file.len() - before) as u32;
        file.extend_from_slice(&header_len.to_le_bytes());
        debug_assert!(file.len() > PACK_HEADER_LEN);
        let id = Id(*blake3::hash(file).as_bytes());
        self.stats.packs += 1;
        self.stats.pack_bytes += file.len() as u64;
        let full = std::mem::take(file);
        if let Some(mut spare) = self.uploads.send(id, full)? {
            spare.clear();
            self.buf = spare;
        }
        self.pending_index.push((id, std::mem::take(&mut self.entries)));
        if self.pending_index.len() >= PACKS_PER_INDEX_FILE {
            self.flush_index()?;
        }
        Ok(())
    }

    fn flush_index(&mut self) -> Result<(), RepoError> {
        if self.pending_index.is_empty() {
            return Ok(());
        }
        // Every pack the index names must be durable first.
        self.uploads.drain()?;
        let index = IndexFile { packs: std::mem::take(&mut self.pending_index) };
        let id = self.repo.write_index_file(&index)?;
        self.stats.index_files.push(id);
        self.written.extend(index.packs);
        Ok(())
    }

    /// Gives up after the operation was cancelled (`cause`): returns the error of a
    /// failed upload when one caused it, else `cause`.
    pub fn abandon(mut self, cause: RepoError) -> RepoError {
        self.uploads.first_real_error(cause)
    }

    /// Writes the last pack and index file. Returns every pack written with its blobs.
    pub fn finish(mut self) -> Result<(WrittenPacks, PackWriterStats), RepoError> {
        self.flush_pack()?;
        self.flush_index()?;
        Ok((self.written, self.stats))
    }
}

/// Splits a whole pack file into its entries (used by `check --read-data` and index
/// rebuilds): checks magic, version and the sealed header.
pub fn read_pack_header(repo: &Repository, name: &str, file: &[u8]) -> Result<Vec<BlobEntry>, RepoError> {
    let what = || format!("pack {name}");
    ObjectMagic::Pack.check(file).map_err(|e| RepoError::corrupt(what(), e))?;
    let len = file.len();
    if len < 4 {
        return Err(RepoError::corrupt(what(), "truncated"));
    }
    let trailer: [u8; 4] = file[len - 4..].try_into().expect("4 bytes");
    let range =
        blockproof_format::pack::header_range(len as u64, trailer).map_err(|e| RepoError::corrupt(what(), e))?;
    let plain = repo
        .keys()
        .open(&ObjectMagic::Pack.header(), &file[range.start as usize..range.end as usize])
        .map_err(|e| RepoError::corrupt(what(), format!("pack header: {e}")))?;
    let entries = blockproof_format::pack::decode_entries(&plain).map_err(|e| RepoError::corrupt(what(), e))?;
    for e in &entries {
        if e.offset < PACK_HEADER_LEN as u64 || e.end() > range.start {
            return Err(RepoError::corrupt(what(), format!("blob {} lies outside the blob area", e.id)));
        }
    }
    Ok(entries)
}

/// Seals an [`IndexFile`] into file bytes.
pub(crate) fn seal_index(repo: &Repository, index: &IndexFile) -> Vec<u8> {
    let header = ObjectMagic::Index.header();
    Envelope::encode(ObjectMagic::Index, &repo.keys().seal(&header, &index.encode()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{BlobCodec, InitOptions};
    use blockproof_format::{BlobKind, KdfParams};
    use blockproof_store::{Backend, LocalBackend};
    use std::sync::Arc;

    /// A directory whose pack writes panic (a bug in a backend), with several upload
    /// threads as an object store has.
    struct PanickingPacks(LocalBackend);

    impl Backend for PanickingPacks {
        fn location(&self) -> String {
            self.0.location()
        }
        fn read(&self, kind: Kind, name: &str) -> Result<Vec<u8>, blockproof_store::StoreError> {
            self.0.read(kind, name)
        }
        fn read_at(&self, k: Kind, n: &str, o: u64, b: &mut [u8]) -> Result<(), blockproof_store::StoreError> {
            self.0.read_at(k, n, o, b)
        }
        fn size(&self, kind: Kind, name: &str) -> Result<u64, blockproof_store::StoreError> {
            self.0.size(kind, name)
        }
        fn modified(&self, kind: Kind, name: &str) -> Result<std::time::SystemTime, blockproof_store::StoreError> {
            self.0.modified(kind, name)
        }
        fn write(&self, kind: Kind, name: &str, data: &[u8]) -> Result<(), blockproof_store::StoreError> {
            if kind == Kind::Pack {
                panic!("backend bug");
            }
            self.0.write(kind, name, data)
        }
        fn list(&self, kind: Kind) -> Result<Vec<String>, blockproof_store::StoreError> {
            self.0.list(kind)
        }
        fn remove(&self, kind: Kind, name: &str) -> Result<(), blockproof_store::StoreError> {
            self.0.remove(kind, name)
        }
        fn parallelism(&self) -> usize {
            4
        }
    }

    /// Issue 14, item 14: a panicking upload thread used to leave the writer waiting
    /// forever (several threads) or fail as a usage error (one thread). It is an internal
    /// error, promptly.
    #[test]
    fn a_panicking_upload_thread_is_an_internal_error_not_a_hang() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("r");
        let opts = InitOptions { kdf: KdfParams::MIN, pack_size: 64 * 1024, ..InitOptions::default() };
        Repository::init(Box::new(LocalBackend::create(&root).unwrap()), b"pw", &opts).unwrap();
        let backend = PanickingPacks(LocalBackend::open(&root).unwrap());
        let repo = Arc::new(Repository::open(Box::new(backend), b"pw").unwrap());
        let (tx, rx) = std::sync::mpsc::channel();
        let r = repo.clone();
        std::thread::spawn(move || {
            let mut codec = BlobCodec::for_repo(&r);
            let mut w = PackWriter::new(&r);
            let result = (0..64u32)
                .try_for_each(|i| {
                    let plain = format!("blob {i} ").repeat(4000).into_bytes();
                    w.add(codec.seal(BlobKind::Data, r.keys().blob_id(&plain), &plain))
                })
                .and_then(|()| w.finish().map(|_| ()));
            let _ = tx.send(result);
        });
        let result = rx.recv_timeout(std::time::Duration::from_secs(60)).expect("the writer must not hang");
        match result {
            Err(e @ RepoError::Internal(_)) => {
                assert!(!e.is_usage());
                assert!(e.to_string().contains("backend bug"), "{e}");
            }
            other => panic!("expected an internal error, got {other:?}"),
        }
    }
}

#[cfg(test)]
mod size_and_copies {
    use super::*;
    use crate::{BlobCodec, BlobIndex, BlobReader, InitOptions};
    use blockproof_format::{BlobKind, KdfParams};
    use blockproof_store::{Backend, MemoryBackend};

    fn repo() -> (Repository, MemoryBackend) {
        let store = MemoryBackend::new();
        let opts = InitOptions { kdf: KdfParams::MIN, pack_size: 64 * 1024, ..InitOptions::default() };
        (Repository::init(Box::new(store.clone()), b"pw", &opts).unwrap(), store)
    }

    /// Writes blobs of various sizes and compressibility; returns their ids and plaintexts.
    fn write(repo: &Repository, seed: u32, n: u32) -> Vec<(Id, Vec<u8>)> {
        let mut codec = BlobCodec::for_repo(repo);
        let mut w = PackWriter::new(repo);
        let mut out = Vec::new();
        for i in 0..n {
            let mut plain = format!("blob {seed} {i} ").repeat(50 + (i as usize * 37) % 900).into_bytes();
            if i % 3 == 0 {
                let mut x = u64::from(seed * 1000 + i) | 1;
                for b in plain.iter_mut() {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    *b = x as u8;
                }
            }
            let id = repo.keys().blob_id(&plain);
            w.add(codec.seal(BlobKind::Data, id, &plain)).unwrap();
            out.push((id, plain));
        }
        w.finish().unwrap();
        out
    }

    /// The size the index gives a pack (`index::pack_size`) is the size the writer wrote:
    /// backups compare the two to find truncated or replaced packs.
    #[test]
    fn the_index_knows_each_packs_exact_size() {
        let (repo, store) = repo();
        write(&repo, 1, 300);
        let index = BlobIndex::load(&repo).unwrap();
        assert!(index.packs().len() > 3, "{} packs", index.packs().len());
        for pack in index.packs() {
            let size = store.size(Kind::Pack, &pack.to_hex()).unwrap();
            assert_eq!(index.expected_pack_size(pack), Some(size), "pack {pack}");
        }
        assert_eq!(index.expected_pack_size(&Id([7; 32])), None);
    }

    /// A blob stored twice reads from its second copy when the pack of its first is gone
    /// or damaged, one by one and in batches.
    #[test]
    fn a_blob_reads_from_another_copy_when_its_first_fails() {
        let (repo, store) = repo();
        let blobs = write(&repo, 2, 40);
        let first_packs: Vec<String> = store.list(Kind::Pack).unwrap();
        // The same blobs again (another backup storing what it found missing).
        let mut codec = BlobCodec::for_repo(&repo);
        let mut w = PackWriter::new(&repo);
        for (id, plain) in &blobs {
            w.add(codec.seal(BlobKind::Data, *id, plain)).unwrap();
        }
        w.finish().unwrap();
        let index = BlobIndex::load(&repo).unwrap();
        let (id, _) = blobs[5];
        assert_eq!(index.locations(&id).count(), 2);
        // Break every pack of the first copies: one removed, the others bit-flipped.
        for (k, name) in first_packs.iter().enumerate() {
            if k == 0 {
                store.remove(Kind::Pack, name).unwrap();
            } else {
                let mut bytes = store.read(Kind::Pack, name).unwrap();
                for b in bytes.iter_mut().skip(6).step_by(97) {
                    *b ^= 1;
                }
                store.write(Kind::Pack, name, &bytes).unwrap();
            }
        }
        let reader = BlobReader::new(&repo, &index);
        for (id, plain) in &blobs {
            assert_eq!(&reader.read(id, BlobKind::Data).unwrap(), plain);
        }
        let ids: Vec<Id> = blobs.iter().map(|b| b.0).collect();
        for (r, (_, plain)) in reader.read_many(&ids, BlobKind::Data).into_iter().zip(&blobs) {
            assert_eq!(&r.unwrap(), plain);
        }
        // With no good copy left, the first location's error is returned.
        let second: Vec<String> =
            store.list(Kind::Pack).unwrap().into_iter().filter(|n| !first_packs.contains(n)).collect();
        for name in second {
            store.remove(Kind::Pack, &name).unwrap();
        }
        let index = BlobIndex::load(&repo).unwrap();
        let reader = BlobReader::new(&repo, &index);
        assert!(reader.read(&id, BlobKind::Data).is_err());
    }
}
