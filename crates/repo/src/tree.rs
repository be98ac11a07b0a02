//! Building and reading fixed index trees (layout in [`blockproof_format::tree`]).

use blockproof_format::tree::{decode_page, level_sizes, page_len};
use blockproof_format::{BlobKind, Id};

use crate::{BlobReader, RepoError};

/// Builds a tree from chunk ids pushed in disk order, emitting each page as soon as it
/// is full: memory is one page per level, whatever the disk size.
pub struct TreeWriter {
    fanout: usize,
    chunks: u64,
    pushed: u64,
    levels: Vec<Vec<Id>>,
}

impl TreeWriter {
    pub fn new(chunks: u64, fanout: u32) -> Self {
        let levels = level_sizes(chunks, fanout).iter().map(|_| Vec::with_capacity(fanout as usize)).collect();
        TreeWriter { fanout: fanout as usize, chunks, pushed: 0, levels }
    }

    fn top(&self) -> usize {
        self.levels.len() - 1
    }

    /// Appends the next chunk id; `store` is called with each completed page and returns
    /// its blob id (pages of all-zero ids are not passed to it).
    pub fn push<E>(&mut self, id: Id, store: &mut impl FnMut(&[Id]) -> Result<Id, E>) -> Result<(), E> {
        assert!(self.pushed < self.chunks, "more chunk ids than chunks");
        self.pushed += 1;
        self.levels[0].push(id);
        let mut level = 0;
        while level < self.top() && self.levels[level].len() == self.fanout {
            self.emit(level, store)?;
            level += 1;
        }
        Ok(())
    }

    /// Appends the id of a whole page of level `level` (0: a leaf page, listing chunk ids;
    /// 1: a page listing leaf page ids; ...) in place of the chunk ids below it, as an
    /// incremental inherits an unchanged part of its parent's tree (pages are named by
    /// their content, so the tree is the same as if every chunk id had been pushed). The
    /// page must start at the next chunk to push, on a boundary of `fanout^(level + 1)`
    /// chunks, and may not be the root (`level < levels() - 1`).
    pub fn push_page<E>(
        &mut self,
        level: usize,
        id: Id,
        store: &mut impl FnMut(&[Id]) -> Result<Id, E>,
    ) -> Result<(), E> {
        assert!(level < self.top(), "the root page cannot be pushed");
        let span = (0..=level).fold(1u64, |acc, _| acc.saturating_mul(self.fanout as u64));
        assert!(self.pushed.is_multiple_of(span) && self.pushed < self.chunks, "a page pushed off its boundary");
        self.pushed += span.min(self.chunks - self.pushed);
        self.levels[level + 1].push(id);
        let mut at = level + 1;
        while at < self.top() && self.levels[at].len() == self.fanout {
            self.emit(at, store)?;
            at += 1;
        }
        Ok(())
    }

    /// Number of levels (1: the root page lists the chunk ids).
    pub fn levels(&self) -> usize {
        self.levels.len()
    }

    fn emit<E>(&mut self, level: usize, store: &mut impl FnMut(&[Id]) -> Result<Id, E>) -> Result<(), E> {
        let page = &self.levels[level];
        let id = if page.iter().all(Id::is_zero) { Id::ZERO } else { store(page)? };
        self.levels[level].clear();
        self.levels[level + 1].push(id);
        Ok(())
    }

    /// Stores the partial pages and the root page; returns the root id.
    pub fn finish<E>(mut self, store: &mut impl FnMut(&[Id]) -> Result<Id, E>) -> Result<Id, E> {
        assert_eq!(self.pushed, self.chunks, "tree finished before every chunk id was pushed");
        for level in 0..self.top() {
            if !self.levels[level].is_empty() {
                self.emit(level, store)?;
            }
        }
        let root = &self.levels[self.top()];
        if root.iter().all(Id::is_zero) {
            Ok(Id::ZERO)
        } else {
            store(root)
        }
    }
}

/// The chunks an unreadable index page hides ([`TreeReader::unreadable_span`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PageSpan {
    /// The page is the root: the whole disk is lost until the page is repaired.
    pub root: bool,
    /// The chunks the page lists, directly or through the pages below it.
    pub chunks: std::ops::Range<u64>,
}

/// Reads a tree lazily, keeping the last page of each level: sequential reads load each
/// page once; random reads load one path (at most one page per level).
pub struct TreeReader<'a> {
    reader: &'a BlobReader<'a>,
    root: Id,
    fanout: u32,
    sizes: Vec<u64>,
    cache: Vec<Option<(u64, Vec<Id>)>>,
}

impl<'a> TreeReader<'a> {
    pub fn new(reader: &'a BlobReader<'a>, root: Id, chunks: u64, fanout: u32) -> Result<Self, RepoError> {
        if !(blockproof_format::tree::MIN_FANOUT..=blockproof_format::tree::MAX_FANOUT).contains(&fanout) {
            return Err(RepoError::corrupt("fixed index", format!("fanout {fanout} out of range")));
        }
        let sizes = level_sizes(chunks, fanout);
        let cache = vec![None; sizes.len()];
        Ok(TreeReader { reader, root, fanout, sizes, cache })
    }

    /// Number of chunks.
    pub fn chunks(&self) -> u64 {
        self.sizes[0]
    }

    /// Ids per page.
    pub fn fanout(&self) -> u32 {
        self.fanout
    }

    /// Number of levels (1: the root page lists the chunk ids).
    pub fn levels(&self) -> usize {
        self.sizes.len()
    }

    /// The id of page `page` of level `level` (0: leaf pages; the root is the single page
    /// of level `levels() - 1`). [`Id::ZERO`]: every chunk below it is zero.
    pub fn page_id(&mut self, level: usize, page: u64) -> Result<Id, RepoError> {
        let top = self.sizes.len() - 1;
        if level >= top {
            return Ok(self.root);
        }
        let f = u64::from(self.fanout);
        self.load(level + 1, page / f)?;
        Ok(self.cache[level + 1].as_ref().expect("loaded").1[(page % f) as usize])
    }

    /// Number of leaf pages.
    pub fn leaf_pages(&self) -> u64 {
        self.sizes[0].div_ceil(u64::from(self.fanout))
    }

    fn load(&mut self, level: usize, page: u64) -> Result<(), RepoError> {
        if matches!(&self.cache[level], Some((p, _)) if *p == page) {
            return Ok(());
        }
        let f = u64::from(self.fanout);
        let id = if level == self.sizes.len() - 1 {
            self.root
        } else {
            self.load(level + 1, page / f)?;
            self.cache[level + 1].as_ref().expect("loaded above").1[(page % f) as usize]
        };
        let len = page_len(self.sizes[level], page, self.fanout);
        let ids = if id.is_zero() {
            vec![Id::ZERO; len]
        } else {
            let plain = self.reader.read(&id, BlobKind::Tree)?;
            decode_page(&plain, len).map_err(|e| RepoError::corrupt(format!("index page {id}"), e))?
        };
        self.cache[level] = Some((page, ids));
        Ok(())
    }

    /// The chunk ids of leaf page `page` (chunks `page * fanout ..`).
    pub fn leaf(&mut self, page: u64) -> Result<&[Id], RepoError> {
        self.load(0, page)?;
        Ok(&self.cache[0].as_ref().expect("loaded").1)
    }

    /// The id of leaf page `page`. Pages are named by their content, so two trees of one
    /// repository with the same id for a leaf page list the same chunks there (`diff`
    /// skips such pages without reading them).
    pub fn leaf_id(&mut self, page: u64) -> Result<Id, RepoError> {
        if self.sizes.len() == 1 {
            return Ok(self.root);
        }
        let f = u64::from(self.fanout);
        self.load(1, page / f)?;
        Ok(self.cache[1].as_ref().expect("loaded").1[(page % f) as usize])
    }

    /// The id of one chunk.
    pub fn chunk(&mut self, index: u64) -> Result<Id, RepoError> {
        let f = u64::from(self.fanout);
        Ok(self.leaf(index / f)?[(index % f) as usize])
    }

    /// After reading leaf `page` failed: which part of the disk the failure hides. Finds
    /// the highest page on the path from the root to that leaf that cannot be read and
    /// returns the chunks it lists (directly or through the pages below it); `root` is
    /// true when it is the root page, so that no chunk of the disk can be located.
    pub fn unreadable_span(&mut self, page: u64) -> PageSpan {
        let f = u64::from(self.fanout);
        let n = self.chunks();
        let top = self.sizes.len() - 1;
        for level in (0..=top).rev() {
            // Chunks under one page of this level: f^(level + 1), saturating.
            let per_page = (0..=level).fold(1u64, |acc, _| acc.saturating_mul(f));
            let at = page / (0..level).fold(1u64, |acc, _| acc.saturating_mul(f));
            if self.load(level, at).is_err() {
                let first = at.saturating_mul(per_page).min(n);
                let end = (at.saturating_add(1)).saturating_mul(per_page).min(n);
                return PageSpan { root: level == top, chunks: first..end };
            }
        }
        // Every page on the path reads now (the failure was transient): the leaf's chunks.
        let first = page.saturating_mul(f).min(n);
        PageSpan { root: top == 0, chunks: first..(first.saturating_add(f)).min(n) }
    }

    /// Calls `visit` with the id of every stored (non-zero) page of the tree, top-down.
    pub fn visit_pages(&mut self, visit: &mut impl FnMut(Id)) -> Result<(), RepoError> {
        let f = u64::from(self.fanout);
        for level in (0..self.sizes.len()).rev() {
            let pages = self.sizes[level].div_ceil(f).max(1);
            for page in 0..pages {
                let id = if level == self.sizes.len() - 1 {
                    self.root
                } else {
                    self.load(level + 1, page / f)?;
                    self.cache[level + 1].as_ref().expect("loaded").1[(page % f) as usize]
                };
                if !id.is_zero() {
                    visit(id);
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn build(ids: &[Id], fanout: u32) -> (Id, Vec<Vec<Id>>) {
        let mut pages = Vec::new();
        let mut store = |p: &[Id]| -> Result<Id, ()> {
            pages.push(p.to_vec());
            Ok(Id([pages.len() as u8; 32]))
        };
        let mut w = TreeWriter::new(ids.len() as u64, fanout);
        for id in ids {
            w.push(*id, &mut store).unwrap();
        }
        let root = w.finish(&mut store).unwrap();
        (root, pages)
    }

    #[test]
    fn page_counts_follow_geometry() {
        let ids: Vec<Id> = (1..=10u8).map(|i| Id([i; 32])).collect();
        // fanout 4: 3 leaves (4,4,2), one root of 3.
        let (root, pages) = build(&ids, 4);
        assert_eq!(pages.len(), 4);
        assert_eq!(pages[0], ids[0..4]);
        assert_eq!(pages[2], ids[8..10]);
        assert_eq!(pages[3].len(), 3);
        assert_eq!(root, Id([4; 32]));
        // fits in one page: the root is the only page.
        let (_, pages) = build(&ids[..3], 4);
        assert_eq!(pages, vec![ids[..3].to_vec()]);
    }

    /// Pushing an unchanged page's id builds the same tree as pushing its chunk ids.
    #[test]
    fn pushed_pages_build_the_same_tree_as_their_chunks() {
        // A content hash standing for the blob id.
        fn store(p: &[Id]) -> Result<Id, ()> {
            let mut h = [0u8; 32];
            for (k, id) in p.iter().enumerate() {
                h[k % 31] = h[k % 31].wrapping_mul(31).wrapping_add(id.0[0]).wrapping_add(k as u8);
            }
            h[31] = p.len() as u8;
            Ok(Id(h))
        }
        let ids: Vec<Id> =
            (0..70u32).map(|i| if i % 7 == 3 { Id::ZERO } else { Id([(i % 251) as u8 + 1; 32]) }).collect();
        // fanout 4, 70 chunks: levels of 70, 18, 5 and 2 entries.
        let mut whole = TreeWriter::new(70, 4);
        assert_eq!(whole.levels(), 4);
        for id in &ids {
            whole.push(*id, &mut store).unwrap();
        }
        let root = whole.finish(&mut store).unwrap();
        // The same with leaf 1 (chunks 4..8), the level-1 page 1 (chunks 16..32) and the
        // short last leaf (chunks 68..70) pushed as pages.
        let leaf1 = store(&ids[4..8]).unwrap();
        let leaves: Vec<Id> = (4..8).map(|l| store(&ids[l * 4..l * 4 + 4]).unwrap()).collect();
        let mid = store(&leaves).unwrap();
        let last = store(&ids[68..70]).unwrap();
        let mut w = TreeWriter::new(70, 4);
        for id in &ids[..4] {
            w.push(*id, &mut store).unwrap();
        }
        w.push_page(0, leaf1, &mut store).unwrap();
        for id in &ids[8..16] {
            w.push(*id, &mut store).unwrap();
        }
        w.push_page(1, mid, &mut store).unwrap();
        for id in &ids[32..68] {
            w.push(*id, &mut store).unwrap();
        }
        w.push_page(0, last, &mut store).unwrap();
        assert_eq!(w.finish(&mut store).unwrap(), root);
    }

    #[test]
    fn zero_pages_are_not_stored() {
        let mut ids = vec![Id::ZERO; 8];
        ids.push(Id([1; 32]));
        let (_, pages) = build(&ids, 4);
        // leaves 0 and 1 are all zero; leaf 2 and the root are stored.
        assert_eq!(pages.len(), 2);
        assert_eq!(pages[1], vec![Id::ZERO, Id::ZERO, Id([1; 32])]);
        let (root, pages) = build(&[Id::ZERO; 9], 4);
        assert_eq!((root, pages.len()), (Id::ZERO, 0));
        let (root, pages) = build(&[], 4);
        assert_eq!((root, pages.len()), (Id::ZERO, 0));
    }

    /// An unreadable page hides exactly the chunks below it; the root hides the disk.
    #[test]
    fn an_unreadable_page_hides_the_chunks_below_it() {
        use crate::{BlobCodec, BlobIndex, InitOptions, PackWriter, Repository};
        use blockproof_format::tree::encode_page;

        let dir = tempfile::tempdir().unwrap();
        let opts = InitOptions { kdf: blockproof_format::KdfParams::MIN, ..InitOptions::default() };
        let backend = blockproof_store::LocalBackend::create(dir.path()).unwrap();
        let repo = Repository::init(Box::new(backend), b"pw", &opts).unwrap();
        // 3000 chunks at fanout 32: 94 leaves under 3 level-1 pages under the root.
        let ids: Vec<Id> = (0..3000u32).map(|i| repo.keys().blob_id(&i.to_le_bytes())).collect();
        let mut codec = BlobCodec::for_repo(&repo);
        let mut sealed = Vec::new();
        let mut store = |p: &[Id]| -> Result<Id, RepoError> {
            let bytes = encode_page(p);
            let id = repo.keys().blob_id(&bytes);
            sealed.push(codec.seal(BlobKind::Tree, id, &bytes));
            Ok(id)
        };
        let mut w = TreeWriter::new(3000, 32);
        for id in &ids {
            w.push(*id, &mut store).unwrap();
        }
        let root = w.finish(&mut store).unwrap();
        let mut writer = PackWriter::new(&repo);
        for b in sealed {
            writer.add(b).unwrap();
        }
        writer.finish().unwrap();
        let full = BlobIndex::load(&repo).unwrap();
        let reader = BlobReader::new(&repo, &full);
        let level1 = decode_page(&reader.read(&root, BlobKind::Tree).unwrap(), 3).unwrap();
        let leaves = decode_page(&reader.read(&level1[1], BlobKind::Tree).unwrap(), 32).unwrap();
        // Leaf page 40 is the 9th under the second level-1 page.
        let mut tree = TreeReader::new(&reader, root, 3000, 32).unwrap();
        assert_eq!(tree.leaf_id(40).unwrap(), leaves[8]);
        let small = TreeReader::new(&reader, leaves[8], 32, 32).unwrap().leaf_id(0).unwrap();
        assert_eq!(small, leaves[8], "a one-page tree: the root is the leaf");

        // (page missing from the index, leaf read, what it hides)
        let cases = [
            (root, 40, PageSpan { root: true, chunks: 0..3000 }),
            (level1[1], 40, PageSpan { root: false, chunks: 1024..2048 }),
            (leaves[8], 40, PageSpan { root: false, chunks: 1280..1312 }),
            (level1[2], 93, PageSpan { root: false, chunks: 2048..3000 }),
        ];
        for (gone, leaf, want) in cases {
            let mut index = BlobIndex::default();
            for (_, pack, entry) in full.iter().filter(|(id, _, _)| *id != gone) {
                index.add_pack(pack, std::slice::from_ref(&entry));
            }
            let reader = BlobReader::new(&repo, &index);
            let mut tree = TreeReader::new(&reader, root, 3000, 32).unwrap();
            assert!(tree.leaf(leaf).is_err());
            assert_eq!(tree.unreadable_span(leaf), want);
            if !want.root {
                assert!(tree.leaf(0).is_ok(), "the rest of the disk still reads");
            }
        }
    }
}
