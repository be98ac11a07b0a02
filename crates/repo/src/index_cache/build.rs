//! Building the cache file: the previous table merged with the index files read since.

use std::cell::Cell;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet};
use std::fs::File;
use std::io::{BufWriter, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::rc::Rc;

use blockproof_format::{BlobEntry, Id};

use super::{
    mac, page_key, page_mac, short, CachedTable, Meta, PackRecord, BATCH_SLOTS, HEADER_LEN, MAC_LEN, MAGIC, PAGE_BYTES,
    PASS_PAGES,
};
use super::{PAGE_SLOTS, VERSION};
use crate::blob_table::{settle, Slot};
use crate::membership::Membership;
use crate::run_file::{private_file, RunFiles};
use crate::{RepoError, Repository};

/// Why a build did not leave a cache file.
#[derive(Debug)]
pub(crate) enum BuildError {
    /// Reading the repository failed (not a damaged index file: those are left out).
    Repo(RepoError),
    /// The cache itself: its directory, a write, or the previous file failing its check
    /// (the loader then loads into memory; the text is for tests and debugging).
    Cache(#[allow(dead_code)] String),
}

impl From<std::io::Error> for BuildError {
    fn from(e: std::io::Error) -> Self {
        BuildError::Cache(e.to_string())
    }
}

/// Writes the cache file at `path`: the slots of `old` whose packs an index file in
/// `keep` still lists, merged with the listings of the index files `added`, read from
/// the repository one at a time in the order given (after `old`'s, so their locations
/// come after its own). An added file that is missing or damaged is left out: it stays
/// uncovered, and the loader reads it again and treats it as it treats any damaged file.
pub(crate) fn build(
    repo: &Repository,
    path: &Path,
    old: Option<(&CachedTable, &Meta)>,
    keep: &HashSet<String>,
    added: &[String],
) -> Result<(), BuildError> {
    let mut table = Tables::default();
    let mut remap = Vec::new();
    if let Some((_, meta)) = old {
        let mut retained = vec![false; meta.packs.len()];
        for (_, listed) in meta.files.iter().filter(|(name, _)| keep.contains(name)) {
            for p in listed {
                retained[*p as usize] = true;
            }
        }
        for (record, kept) in meta.packs.iter().zip(retained) {
            remap.push(if kept { table.register(*record) } else { u32::MAX });
        }
        for (name, listed) in meta.files.iter().filter(|(name, _)| keep.contains(name)) {
            table.files.push((name.clone(), listed.iter().map(|p| remap[*p as usize]).collect()));
        }
    }
    // The sorted runs and the file being built: `blob-index.run<pid>-<k>.*`, removed
    // when `spill` is dropped, or by a later load if this process is killed.
    let mut spill = RunFiles::new(path.to_path_buf());
    let tmp = spill.aside("cache")?;
    let result = (|| {
        let (spill, last, listing_pack, total) = read_added(repo, &mut table, added, spill)?;
        let mut sources: Vec<Box<dyn Iterator<Item = Slot> + '_>> = Vec::new();
        let mut old_slots = 0;
        if let Some((old_table, _)) = old {
            old_slots = old_table.len();
            let remap = &remap;
            sources.push(Box::new(old_table.pass().filter_map(move |s| {
                let pos = remap[s.pack() as usize];
                (pos != u32::MAX).then(|| s.with_pack(pos))
            })));
        }
        let failed = Rc::new(Cell::new(false));
        for run in spill.readers::<Slot>(1 << 20, &failed)? {
            sources.push(Box::new(run));
        }
        let (last_run, _) = settle(last, &listing_pack);
        sources.push(Box::new(last_run.into_slots().into_iter()));
        let mut writer = Writer::create(&tmp, repo.keys().cache_hasher(), old_slots + total)?;
        merge(sources, &mut writer)?;
        if let Some(damage) = old.and_then(|(t, _)| t.damage()) {
            return Err(BuildError::Cache(damage));
        }
        if failed.get() {
            return Err(BuildError::Cache("a temporary run changed while it was merged".into()));
        }
        writer.finish(repo.id(), &table, path)
    })();
    result
}

/// The packs and files of the table being built.
#[derive(Default)]
struct Tables {
    packs: Vec<PackRecord>,
    pack_pos: HashMap<Id, u32>,
    files: Vec<(String, Vec<u32>)>,
}

impl Tables {
    fn register(&mut self, record: PackRecord) -> u32 {
        let next = self.packs.len() as u32;
        let pos = *self.pack_pos.entry(record.0).or_insert(next);
        if pos == next {
            self.packs.push(record);
        }
        pos
    }
}

type Added = (RunFiles, Vec<Slot>, Vec<u32>, usize);

/// Reads the added index files into batches of slots (settled and spilled when full);
/// returns the spilled runs, the last batch, each listing's pack and the slot count.
fn read_added(
    repo: &Repository,
    table: &mut Tables,
    added: &[String],
    mut spill: RunFiles,
) -> Result<Added, BuildError> {
    let (mut batch, mut listing_pack, mut total) = (Vec::new(), Vec::new(), 0);
    for name in added {
        repo.cancel().check().map_err(|e| BuildError::Repo(e.into()))?;
        let file = match repo.read_index_file(name) {
            Ok(f) => f,
            Err(RepoError::Store(e)) if e.is_not_found() => continue,
            Err(e) if e.is_damage() => continue,
            Err(e) => return Err(BuildError::Repo(e)),
        };
        let mut listed = Vec::with_capacity(file.packs.len());
        for (pack, entries) in &file.packs {
            let end = entries.iter().map(BlobEntry::end).max().unwrap_or(0);
            let pos = table.register((*pack, entries.len() as u64, end));
            listed.push(pos);
            let listing = listing_pack.len() as u32;
            listing_pack.push(pos);
            let before = batch.len();
            // As IndexBuilder::add_pack: a listing whose offsets do not increase keeps
            // its first mention of a blob.
            if entries.windows(2).all(|w| w[0].offset < w[1].offset) {
                batch.extend(entries.iter().map(|e| Slot::new(e, listing)));
            } else {
                let mut seen = HashSet::new();
                batch.extend(entries.iter().filter(|e| seen.insert(e.id)).map(|e| Slot::new(e, listing)));
            }
            total += batch.len() - before;
        }
        table.files.push((name.clone(), listed));
        if batch.len() >= BATCH_SLOTS {
            spill.write(settle(std::mem::take(&mut batch), &listing_pack).0.into_slots())?;
        }
    }
    Ok((spill, batch, listing_pack, total))
}

/// Merges sorted sources by id (of equal ids, earlier sources first) into `writer`,
/// keeping for each blob its first location and one further location per other pack.
fn merge(mut sources: Vec<Box<dyn Iterator<Item = Slot> + '_>>, writer: &mut Writer) -> Result<(), BuildError> {
    let mut heads: Vec<Option<Slot>> = Vec::with_capacity(sources.len());
    let mut heap = BinaryHeap::new();
    for (rank, source) in sources.iter_mut().enumerate() {
        let head = source.next();
        if let Some(s) = &head {
            heap.push(Reverse((s.id, rank)));
        }
        heads.push(head);
    }
    let (mut current, mut kept): (Option<Id>, Vec<u32>) = (None, Vec::new());
    while let Some(Reverse((_, rank))) = heap.pop() {
        let slot = heads[rank].take().expect("a head per heap entry");
        if let Some(next) = sources[rank].next() {
            heap.push(Reverse((next.id, rank)));
            heads[rank] = Some(next);
        }
        let first = current != Some(slot.id);
        if first {
            current = Some(slot.id);
            kept.clear();
        } else if kept.contains(&slot.pack()) {
            continue;
        }
        kept.push(slot.pack());
        writer.push(&slot, first)?;
    }
    Ok(())
}

/// Writes the cache file aside: a header placeholder, the pages, the filter, the meta
/// section, then the header; renamed into place by [`Writer::finish`].
struct Writer {
    out: BufWriter<File>,
    tmp: PathBuf,
    keyed: blake3::Hasher,
    page_key: blake3::Hasher,
    page: Vec<u8>,
    slots: u64,
    blobs: u64,
    fences: Vec<Id>,
    macs: Vec<[u8; MAC_LEN]>,
    /// The MAC of the window of pages being written, and those of the windows before.
    window: Option<blake3::Hasher>,
    windows: Vec<[u8; MAC_LEN]>,
    filter: Membership,
}

impl Writer {
    fn create(tmp: &Path, keyed: blake3::Hasher, max_blobs: usize) -> Result<Self, BuildError> {
        let mut out = BufWriter::with_capacity(1 << 20, private_file(tmp)?);
        out.write_all(&[0u8; HEADER_LEN])?;
        let (page, filter) = (Vec::with_capacity(PAGE_BYTES), Membership::for_keys(max_blobs));
        Ok(Writer {
            out,
            tmp: tmp.to_path_buf(),
            page_key: page_key(&keyed),
            keyed,
            page,
            slots: 0,
            blobs: 0,
            fences: Vec::new(),
            macs: Vec::new(),
            window: None,
            windows: Vec::new(),
            filter,
        })
    }

    fn push(&mut self, slot: &Slot, new_blob: bool) -> std::io::Result<()> {
        if self.page.is_empty() {
            self.fences.push(slot.id);
        }
        slot.encode(&mut self.page);
        self.slots += 1;
        if new_blob {
            self.blobs += 1;
            self.filter.insert(&slot.id);
        }
        if self.page.len() == PAGE_BYTES {
            self.flush_page()?;
        }
        Ok(())
    }

    fn flush_page(&mut self) -> std::io::Result<()> {
        let p = self.macs.len();
        self.macs.push(page_mac(&self.page_key, p, &self.page));
        let window = self.window.get_or_insert_with(|| {
            let mut h = self.keyed.clone();
            h.update(b"window");
            h.update(&((p / PASS_PAGES) as u64).to_le_bytes());
            h
        });
        window.update(&self.page);
        if (p + 1).is_multiple_of(PASS_PAGES) {
            self.end_window();
        }
        self.out.write_all(&self.page)?;
        self.page.clear();
        Ok(())
    }

    fn end_window(&mut self) {
        if let Some(h) = self.window.take() {
            self.windows.push(short(*h.finalize().as_bytes()));
        }
    }

    fn finish(mut self, repo_id: Id, table: &Tables, path: &Path) -> Result<(), BuildError> {
        if !self.page.is_empty() {
            self.flush_page()?;
        }
        self.end_window();
        let filter = self.filter.to_bytes();
        self.out.write_all(&filter)?;
        let mut meta = Vec::new();
        meta.extend_from_slice(&(table.packs.len() as u32).to_le_bytes());
        for (id, blobs, end) in &table.packs {
            meta.extend_from_slice(&id.0);
            meta.extend_from_slice(&blobs.to_le_bytes());
            meta.extend_from_slice(&end.to_le_bytes());
        }
        meta.extend_from_slice(&(table.files.len() as u32).to_le_bytes());
        for (name, listed) in &table.files {
            let id: Id = name.parse().map_err(|_| BuildError::Cache(format!("index file name {name}")))?;
            meta.extend_from_slice(&id.0);
            meta.extend_from_slice(&(listed.len() as u32).to_le_bytes());
            listed.iter().for_each(|p| meta.extend_from_slice(&p.to_le_bytes()));
        }
        self.macs.iter().for_each(|m| meta.extend_from_slice(m));
        self.fences.iter().for_each(|f| meta.extend_from_slice(&f.0));
        self.windows.iter().for_each(|m| meta.extend_from_slice(m));
        self.out.write_all(&meta)?;
        let mut header = [0u8; HEADER_LEN];
        header[..4].copy_from_slice(&MAGIC);
        header[4..8].copy_from_slice(&VERSION.to_le_bytes());
        header[8..40].copy_from_slice(&repo_id.0);
        header[40..48].copy_from_slice(&self.slots.to_le_bytes());
        header[48..56].copy_from_slice(&self.blobs.to_le_bytes());
        header[56..64].copy_from_slice(&(self.filter.blocks() as u64).to_le_bytes());
        header[64..72].copy_from_slice(&(meta.len() as u64).to_le_bytes());
        header[72..76].copy_from_slice(&(PAGE_SLOTS as u32).to_le_bytes());
        header[80..96].copy_from_slice(&short(mac(&self.keyed, b"filter", &[&filter])));
        let header_mac = mac(&self.keyed, b"header", &[&header[..96], &meta]);
        header[96..].copy_from_slice(&header_mac);
        let mut file = self.out.into_inner().map_err(|e| BuildError::Cache(e.to_string()))?;
        file.seek(SeekFrom::Start(0))?;
        file.write_all(&header)?;
        drop(file);
        std::fs::rename(&self.tmp, path)?;
        Ok(())
    }
}
