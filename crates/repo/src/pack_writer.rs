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
    pub index_files: u64,
}

/// Appends sealed blobs to a pack until it reaches the repository's pack size, then
/// writes it durably; every [`PACKS_PER_INDEX_FILE`] packs and at [`PackWriter::finish`]
/// writes an index file for the packs written so far. Packs are durable before the index
/// file that lists them is written.
pub struct PackWriter<'a> {
    repo: &'a Repository,
    buf: Vec<u8>,
    entries: Vec<BlobEntry>,
    pending_index: WrittenPacks,
    written: WrittenPacks,
    stats: PackWriterStats,
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
        self.repo.backend().write(Kind::Pack, &id.to_hex(), file)?;
        self.stats.packs += 1;
        self.stats.pack_bytes += file.len() as u64;
        file.clear();
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
        let index = IndexFile { packs: std::mem::take(&mut self.pending_index) };
        self.repo.write_index_file(&index)?;
        self.stats.index_files += 1;
        self.written.extend(index.packs);
        Ok(())
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
