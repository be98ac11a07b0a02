//! The confirmation state of a disk: for every chunk, the run at which its stored content
//! was last confirmed against the source (format in [`blockproof_format::confirm`]).
//!
//! It is loaded from the parent restore point, updated by the backup (chunks read and
//! chunks sampled by verification are confirmed now), and stored with the new snapshot,
//! which references it: it changes atomically with the snapshot. A state that cannot be
//! loaded (lost or damaged pages, an older snapshot without one, a resized disk) is
//! rebuilt as "never confirmed", with a warning: verification then simply starts over.
//!
//! The pages come in **groups** of [`GROUP_PAGES`], the pages one leaf page of the state's
//! tree lists. With the group list the previous backup left (FORMAT §19), a group whose
//! leaf page is the one the list names is known by its summed runs alone: its page ids
//! and per-page runs are loaded only if this run needs them, and storing the state takes
//! such a group's leaf page whole. A one-chunk incremental of a 64 TiB disk so handles
//! the 64 groups and the one page it changes; of the other 65 535 pages it only looks up
//! the ids (for a reusable copy), all together in one walk along the blob index — or,
//! when the group list's basis still holds (the index files in which the backup that
//! wrote it found those pages are all still loaded, whole, and every pack is usable),
//! not even that: such a group's leaf page is kept by its id alone.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::ops::Range;

use blockproof_format::basis::IndexBasis;
use blockproof_format::confirm::{decode_page, encode_page, group_count, page_count, ENTRIES_PER_PAGE, GROUP_PAGES};
use blockproof_format::tree::{chunk_count, DEFAULT_FANOUT};
use blockproof_format::{BlobKind, DiskEntry, Id};
use blockproof_repo::{BlobReader, TreeReader, TreeWriter};

use crate::pipeline::BlobSink;

mod bound;
use crate::verify::LastConfirmed;
use crate::CoreError;
pub(crate) use bound::Sampling;

/// How many chunks of a page were last confirmed at each run: (run, count), by run.
pub(crate) type Runs = blockproof_format::confirm::PageRuns;

fn runs_of(entries: &[u32]) -> Runs {
    let mut sorted = entries.to_vec();
    sorted.sort_unstable();
    let mut out: Runs = Vec::new();
    for r in sorted {
        match out.last_mut() {
            Some((run, n)) if *run == r => *n += 1,
            _ => out.push((r, 1)),
        }
    }
    out
}

fn add_run(runs: &mut Runs, run: u32, delta: i64) {
    match runs.binary_search_by_key(&run, |&(r, _)| r) {
        Ok(k) => {
            runs[k].1 = (runs[k].1 as i64 + delta) as u64;
            if runs[k].1 == 0 {
                runs.remove(k);
            }
        }
        Err(k) => runs.insert(k, (run, delta as u64)),
    }
}

fn total(runs: &Runs) -> u64 {
    runs.iter().map(|&(_, n)| n).sum()
}

/// How many groups [`ConfirmState::store`] looks up together (at most 64 Ki page ids).
const INHERIT_BATCH: u64 = 64;

/// The page ids of groups `first..`, looked up together before the groups are stored
/// ([`ConfirmState::look_up`]).
#[derive(Default)]
struct Batch {
    first: u64,
    /// Per group: the page ids its leaf page lists when it may be taken whole (empty for
    /// a zero leaf or one known reusable), or `None` when it is stored page by page
    /// (loaded by this run, or its leaf unreadable).
    leaves: Vec<Option<Vec<Id>>>,
    /// Per group: whether its page ids were looked up (all but one whose leaf page could
    /// not be read).
    checked: Vec<bool>,
    /// The ids looked up that have no copy that may be reused.
    missing: HashSet<Id>,
}

/// Which of `ids` have no copy that may be reused ([`BlobSink::reusable_sorted`]): looked
/// up together, sorted, in one walk along the index rather than one lookup each.
fn missing_among(sink: &BlobSink<'_, '_>, mut ids: Vec<Id>) -> HashSet<Id> {
    blockproof_format::id::sort_ids(&mut ids);
    ids.dedup();
    let reusable = sink.reusable_sorted(&ids);
    ids.into_iter().zip(reusable).filter(|(_, r)| !r).map(|(id, _)| id).collect()
}

/// What the previous backup of the disk left in its summary documents (a cache).
pub(crate) enum Known<'r> {
    /// Nothing: every stored page is read.
    None,
    /// Page summaries by page id (FORMAT §19, version 1).
    Pages(HashMap<Id, Runs>),
    /// A group list (version 2 or 3): per group its leaf page id and summed runs; `load`
    /// reads one group's page summaries (empty when they cannot be read). `reusable`:
    /// the list's basis holds, so every leaf page it names, and every page such a leaf
    /// lists, may be reused without a lookup.
    Groups { groups: Vec<(Id, Runs)>, load: Box<dyn Fn(u64) -> HashMap<Id, Runs> + 'r>, reusable: bool },
}

/// The summary documents of a stored state ([`ConfirmState::summaries`]).
pub(crate) struct SummaryDocs {
    /// The disk's document, before its encoding ([`SummaryDocs::encode_list`]).
    list: List,
    /// The page summaries of each group (by number) whose document must be (re)written.
    pub groups: Vec<(u64, Vec<u8>)>,
}

/// The disk's summary document: page summaries (encoded) for a disk of one group, else
/// the group list.
enum List {
    Pages(Vec<u8>),
    Groups(Vec<(Id, Runs)>),
}

impl SummaryDocs {
    /// The disk's document; a group list with `basis`, the index files in which this
    /// run found every page it kept or stored (FORMAT §19).
    pub fn encode_list(&self, basis: Option<&IndexBasis>) -> Vec<u8> {
        match &self.list {
            List::Pages(bytes) => bytes.clone(),
            List::Groups(groups) => {
                let groups: Vec<(Id, &Runs)> = groups.iter().map(|(id, runs)| (*id, runs)).collect();
                blockproof_format::confirm::encode_groups(&groups, basis)
            }
        }
    }
}

/// Clean pages kept loaded at most (64 KiB each); changed pages stay until stored.
const CLEAN_PAGES: usize = 64;

/// Last-confirmed run per chunk (0: never), page by page ([`ENTRIES_PER_PAGE`] chunks):
/// each page is loaded from the restore point's state when first needed and kept while
/// this run changes it (copy on write); a page this run leaves alone keeps the id it had,
/// so storing the state stores only the changed pages (and the index pages above them).
/// Beside the pages, how many chunks of each page and of each group were confirmed at each
/// run ([`Runs`]), kept current: the coverage and the selection's histogram come from
/// those, not from every chunk.
pub(crate) struct ConfirmState<'r> {
    chunks: u64,
    reader: Option<&'r BlobReader<'r>>,
    inner: RefCell<Inner<'r>>,
}

struct Inner<'r> {
    groups: Vec<Group>,
    /// Loaded pages: their entries, and whether this run changed them.
    pages: BTreeMap<u64, (Vec<u32>, bool)>,
    /// Pages that could not be loaded when needed (they count as never confirmed).
    warnings: Vec<String>,
    /// The restore point's state tree (none: nothing stored).
    tree: Option<TreeReader<'r>>,
    known: Known<'r>,
}

struct Group {
    /// The id of its leaf page in the restore point's state (zero: no page stored), then,
    /// once stored, in this run's.
    leaf: Id,
    /// Its runs, summed over its pages, current.
    runs: Runs,
    /// Its pages' ids (in the restore point's state) and runs (current), once loaded.
    pages: Option<Pages>,
    /// Whether its summary document is known to describe `leaf`.
    doc: bool,
    /// Whether `leaf` and every page it lists may be reused without a lookup (the group
    /// list named it, and its basis holds).
    reusable: bool,
}

struct Pages {
    ids: Vec<Id>,
    runs: Vec<Runs>,
}

fn group_len(chunks: u64, g: u64) -> u64 {
    (chunks - g * GROUP_PAGES * ENTRIES_PER_PAGE).min(GROUP_PAGES * ENTRIES_PER_PAGE)
}

fn group_pages(chunks: u64, g: u64) -> Range<u64> {
    g * GROUP_PAGES..((g + 1) * GROUP_PAGES).min(page_count(chunks))
}

/// Group `g`'s pages as never confirmed.
fn never_pages(chunks: u64, g: u64) -> Pages {
    let range = group_pages(chunks, g);
    Pages {
        ids: vec![Id::ZERO; (range.end - range.start) as usize],
        runs: range.map(|p| vec![(0, page_len(chunks, p))]).collect(),
    }
}

impl<'r> ConfirmState<'r> {
    pub fn never(chunks: u64) -> Self {
        let groups = group_count(page_count(chunks));
        ConfirmState {
            chunks,
            reader: None,
            inner: RefCell::new(Inner {
                groups: (0..groups)
                    .map(|g| Group {
                        leaf: Id::ZERO,
                        runs: vec![(0, group_len(chunks, g))],
                        pages: None,
                        doc: true,
                        reusable: false,
                    })
                    .collect(),
                pages: BTreeMap::new(),
                warnings: Vec::new(),
                tree: None,
                known: Known::None,
            }),
        }
    }

    /// A state holding `last` (tests).
    #[cfg(test)]
    pub fn of(last: &[u32]) -> Self {
        let mut s = Self::never(last.len() as u64);
        for (c, &r) in last.iter().enumerate() {
            s.confirm(c as u64, r);
        }
        s
    }

    /// The state a restore point left for `chunks` chunks; "never confirmed" (and the
    /// reason, as a warning) when there is none or it cannot be read.
    pub fn load(reader: &'r BlobReader<'r>, entry: &DiskEntry, chunks: u64) -> (Self, Option<String>) {
        Self::load_with(reader, entry, chunks, Known::None)
    }

    /// [`ConfirmState::load`], taking summaries from `known` instead of reading pages where
    /// they are there: a state whose groups are all known loads without reading a page
    /// (nor listing a group's pages).
    pub fn load_with(
        reader: &'r BlobReader<'r>,
        entry: &DiskEntry,
        chunks: u64,
        known: Known<'r>,
    ) -> (Self, Option<String>) {
        let Some(root) = entry.confirm_root else {
            return (Self::never(chunks), None);
        };
        if chunk_count(entry.size, entry.chunk_size) != chunks {
            return (Self::never(chunks), None);
        }
        match Self::read(reader, root, chunks, known) {
            Ok(s) => (s, None),
            Err(e) => (
                Self::never(chunks),
                Some(format!(
                    "disk {}: the confirmation state cannot be read ({e}); every chunk counts as never confirmed",
                    entry.id
                )),
            ),
        }
    }

    fn read(reader: &'r BlobReader<'r>, root: Id, chunks: u64, known: Known<'r>) -> Result<Self, CoreError> {
        let pages = page_count(chunks);
        let mut tree = TreeReader::new(reader, root, pages, DEFAULT_FANOUT)?;
        let mut s = Self::never(chunks);
        s.reader = Some(reader);
        let inner = s.inner.get_mut();
        let (listed, reusable) = match &known {
            Known::Groups { groups, reusable, .. } if groups.len() == inner.groups.len() => {
                (groups.as_slice(), *reusable)
            }
            _ => (&[][..], false),
        };
        let mut eager = Vec::new();
        for (g, group) in inner.groups.iter_mut().enumerate() {
            let g = g as u64;
            group.leaf = tree.leaf_id(g)?;
            if group.leaf.is_zero() {
                continue;
            }
            match listed.get(g as usize) {
                Some((leaf, runs)) if *leaf == group.leaf && total(runs) == group_len(chunks, g) => {
                    group.runs = runs.clone();
                    group.reusable = reusable;
                }
                _ => eager.push(g),
            }
        }
        inner.tree = Some(tree);
        inner.known = known;
        for g in eager {
            load_group(chunks, reader, inner, g)?;
        }
        Ok(s)
    }

    /// Loads group `g`'s page ids and runs if they are not (a group that cannot be read
    /// counts as never confirmed, with a warning).
    fn ensure(&self, inner: &mut Inner<'r>, g: u64) {
        if inner.groups[g as usize].pages.is_some() {
            return;
        }
        let Some(reader) = self.reader else {
            inner.groups[g as usize].pages = Some(never_pages(self.chunks, g));
            return;
        };
        if let Err(e) = load_group(self.chunks, reader, inner, g) {
            let range = group_pages(self.chunks, g);
            inner.warnings.push(format!(
                "confirmation pages {}..{} cannot be read ({e}); their chunks count as never confirmed",
                range.start, range.end
            ));
            let group = &mut inner.groups[g as usize];
            group.pages = Some(never_pages(self.chunks, g));
            group.runs = vec![(0, group_len(self.chunks, g))];
            group.doc = false;
        }
    }

    /// Calls `f` with page `p`'s entries and changed flag, loading the page first if it
    /// is not (a page that cannot be read counts as never confirmed, with a warning).
    fn with_page<T>(&self, p: u64, f: impl FnOnce(&mut Vec<u32>, &mut bool) -> T) -> T {
        let mut inner = self.inner.borrow_mut();
        let inner = &mut *inner;
        if !inner.pages.contains_key(&p) {
            let g = p / GROUP_PAGES;
            self.ensure(inner, g);
            let len = page_len(self.chunks, p);
            let at = (p % GROUP_PAGES) as usize;
            let id = inner.groups[g as usize].pages.as_ref().expect("loaded").ids[at];
            let mut page = (vec![0; len as usize], false);
            if let Some(reader) = self.reader.filter(|_| !id.is_zero()) {
                match read_page(reader, id, len) {
                    Ok(last) => page.0 = last,
                    Err(e) => {
                        inner.warnings.push(format!(
                            "confirmation page {p} cannot be read ({e}); its chunks count as never confirmed"
                        ));
                        let group = &mut inner.groups[g as usize];
                        let runs = &mut group.pages.as_mut().expect("loaded").runs[at];
                        for &(r, n) in runs.iter() {
                            add_run(&mut group.runs, r, -(n as i64));
                        }
                        add_run(&mut group.runs, 0, len as i64);
                        *runs = vec![(0, len)];
                        page.1 = true;
                    }
                }
            }
            // Only unchanged pages are dropped, the first ones first.
            let clean: Vec<u64> = inner.pages.iter().filter(|(_, pg)| !pg.1).map(|(&k, _)| k).collect();
            for k in clean.iter().take((clean.len() + 1).saturating_sub(CLEAN_PAGES)) {
                inner.pages.remove(k);
            }
            inner.pages.insert(p, page);
        }
        let (last, dirty) = inner.pages.get_mut(&p).expect("loaded above");
        f(last, dirty)
    }

    /// Calls `f` with page `p`'s runs, loading its group first if it is not.
    fn with_runs<T>(&self, p: u64, f: impl FnOnce(&Runs) -> T) -> T {
        let mut inner = self.inner.borrow_mut();
        let g = p / GROUP_PAGES;
        self.ensure(&mut inner, g);
        f(&inner.groups[g as usize].pages.as_ref().expect("loaded").runs[(p % GROUP_PAGES) as usize])
    }

    /// Warnings about pages that could not be loaded when needed.
    pub fn take_warnings(&self) -> Vec<String> {
        std::mem::take(&mut self.inner.borrow_mut().warnings)
    }

    /// The run at which chunk `c` was last confirmed.
    pub fn get(&self, c: u64) -> u32 {
        self.with_page(c / ENTRIES_PER_PAGE, |last, _| last[(c % ENTRIES_PER_PAGE) as usize])
    }

    pub fn confirm(&mut self, chunk: u64, run: u32) {
        let p = chunk / ENTRIES_PER_PAGE;
        let before = self.with_page(p, |last, dirty| {
            let at = &mut last[(chunk % ENTRIES_PER_PAGE) as usize];
            let before = *at;
            if before != run {
                *at = run;
                *dirty = true;
            }
            before
        });
        if before != run {
            let group = &mut self.inner.get_mut().groups[(p / GROUP_PAGES) as usize];
            let runs = &mut group.pages.as_mut().expect("loaded with the page").runs[(p % GROUP_PAGES) as usize];
            add_run(runs, before, -1);
            add_run(runs, run, 1);
            add_run(&mut group.runs, before, -1);
            add_run(&mut group.runs, run, 1);
        }
    }

    /// How many chunks were last confirmed at each run, over the whole disk (from the
    /// groups' sums: no page is visited).
    fn histogram(&self) -> BTreeMap<u32, u64> {
        let mut hist = BTreeMap::new();
        for group in &self.inner.borrow().groups {
            for &(r, n) in &group.runs {
                *hist.entry(r).or_default() += n;
            }
        }
        hist
    }

    /// Stores the state; returns the root (`None` when nothing was ever confirmed). A
    /// page this run did not change keeps its id when a copy of it may be reused (like an
    /// inherited chunk); otherwise it is read and stored again. A group this run did not
    /// load keeps its leaf page whole when every page it lists, and the leaf page itself,
    /// may be reused (the ids are checked, the pages not read; for a group known
    /// reusable, [`Known::Groups`], neither).
    pub fn store(&mut self, sink: &mut BlobSink<'_, '_>) -> Result<Option<Id>, CoreError> {
        let pages = page_count(self.chunks);
        let mut tree = TreeWriter::new(pages, DEFAULT_FANOUT);
        let groups = self.inner.get_mut().groups.len() as u64;
        let whole = tree.levels() > 1;
        if !whole {
            // One group (or none), whose leaf page is the root: stored page by page.
            for g in 0..groups {
                self.ensure(&mut self.inner.borrow_mut(), g);
            }
        }
        let mut batch = Batch::default();
        for g in 0..groups {
            if g >= batch.first + batch.leaves.len() as u64 {
                batch = self.look_up(g..groups.min(g + INHERIT_BATCH), sink);
            }
            if whole && self.inherit(g, &mut batch, &mut tree, sink)? {
                continue;
            }
            self.ensure(&mut self.inner.borrow_mut(), g);
            let own;
            let missing = if batch.checked[(g - batch.first) as usize] {
                &batch.missing
            } else {
                own = missing_among(sink, self.unchanged_pages(g));
                &own
            };
            let mut ids = Vec::with_capacity(GROUP_PAGES as usize);
            for p in group_pages(self.chunks, g) {
                let at = (p % GROUP_PAGES) as usize;
                let (old, dirty) = {
                    let inner = self.inner.get_mut();
                    let old = inner.groups[g as usize].pages.as_ref().expect("loaded").ids[at];
                    (old, inner.pages.get(&p).is_some_and(|pg| pg.1))
                };
                let id = if !dirty && !missing.contains(&old) {
                    old
                } else {
                    let last = self.with_page(p, |last, _| last.clone());
                    if last.iter().all(|&r| r == 0) {
                        Id::ZERO
                    } else {
                        sink.put(BlobKind::Confirm, &encode_page(&last))?
                    }
                };
                tree.push(id, &mut |ids: &[Id]| sink.page(ids))?;
                ids.push(id);
                let inner = self.inner.get_mut();
                inner.groups[g as usize].pages.as_mut().expect("loaded").ids[at] = id;
                if let Some(page) = inner.pages.get_mut(&p) {
                    page.1 = false;
                }
            }
            let group = &mut self.inner.get_mut().groups[g as usize];
            let leaf = sink.page_id(&ids);
            group.doc &= leaf == group.leaf;
            group.leaf = leaf;
        }
        let root = tree.finish(&mut |ids: &[Id]| sink.page(ids))?;
        Ok((!root.is_zero()).then_some(root))
    }

    /// Looks up the page ids of the groups of `range` together, sorted, in one walk along
    /// the index (65 536 for a 64 TiB disk) rather than one lookup each: for a group this
    /// run loaded, those of its pages it did not change; for one it did not, every page
    /// its leaf page lists and the leaf page itself (the group may be taken whole) —
    /// unless they are known reusable, when neither is read nor looked up.
    fn look_up(&mut self, range: Range<u64>, sink: &BlobSink<'_, '_>) -> Batch {
        let mut batch = Batch { first: range.start, ..Batch::default() };
        let mut all = Vec::with_capacity((range.end - range.start) as usize * (GROUP_PAGES as usize + 1));
        for g in range {
            let inner = self.inner.get_mut();
            let group = &inner.groups[g as usize];
            let (leaf, checked) = if group.pages.is_some() {
                all.extend(self.unchanged_pages(g));
                (None, true)
            } else if group.leaf.is_zero() || group.reusable {
                (Some(Vec::new()), true)
            } else {
                let ids = inner.tree.as_mut().and_then(|t| t.leaf(g).ok()).map(<[Id]>::to_vec);
                if let Some(ids) = &ids {
                    all.extend(ids.iter().filter(|id| !id.is_zero()));
                    all.push(group.leaf);
                }
                let read = ids.is_some();
                (ids, read)
            };
            batch.leaves.push(leaf);
            batch.checked.push(checked);
        }
        batch.missing = missing_among(sink, all);
        batch
    }

    /// The non-zero ids of the pages of loaded group `g` that this run did not change.
    fn unchanged_pages(&mut self, g: u64) -> Vec<Id> {
        let inner = self.inner.get_mut();
        let listed = &inner.groups[g as usize].pages.as_ref().expect("loaded").ids;
        group_pages(self.chunks, g)
            .filter(|p| !inner.pages.get(p).is_some_and(|pg| pg.1))
            .map(|p| listed[(p % GROUP_PAGES) as usize])
            .filter(|id| !id.is_zero())
            .collect()
    }

    /// Takes group `g` of `batch` whole from the restore point's tree if it may be: true
    /// when it did.
    fn inherit(
        &mut self,
        g: u64,
        batch: &mut Batch,
        tree: &mut TreeWriter,
        sink: &mut BlobSink<'_, '_>,
    ) -> Result<bool, CoreError> {
        let Some(ids) = batch.leaves[(g - batch.first) as usize].take() else {
            return Ok(false);
        };
        let leaf = self.inner.get_mut().groups[g as usize].leaf;
        if !leaf.is_zero() {
            if ids.iter().any(|id| batch.missing.contains(id)) {
                return Ok(false);
            }
            // The leaf page was read whole just now; without a copy that may be reused it
            // is stored again.
            if batch.missing.contains(&leaf) {
                let again = sink.page(&ids)?;
                debug_assert_eq!(again, leaf);
            }
        }
        tree.push_page(0, leaf, &mut |ids: &[Id]| sink.page(ids))?;
        Ok(true)
    }

    /// The summary documents of the stored state (after [`ConfirmState::store`]), encoded
    /// ([`blockproof_format::confirm`]): for a disk of one group its page summaries; else
    /// the group list and the page summaries of every group this run stored anew (or whose
    /// document was not known to be current).
    pub fn summaries(&self) -> SummaryDocs {
        let mut inner = self.inner.borrow_mut();
        let encode_group = |group: &Group| {
            let pages = group.pages.as_ref().expect("loaded");
            let listed: Vec<(Id, &Runs)> =
                pages.ids.iter().zip(&pages.runs).filter(|(id, _)| !id.is_zero()).map(|(id, r)| (*id, r)).collect();
            blockproof_format::confirm::encode_summaries(&listed)
        };
        if inner.groups.len() <= 1 {
            if inner.groups.is_empty() {
                let list = List::Pages(blockproof_format::confirm::encode_summaries(&[]));
                return SummaryDocs { list, groups: Vec::new() };
            }
            self.ensure(&mut inner, 0);
            return SummaryDocs { list: List::Pages(encode_group(&inner.groups[0])), groups: Vec::new() };
        }
        let groups = inner
            .groups
            .iter()
            .enumerate()
            .filter(|(_, group)| group.pages.is_some() && !group.doc && !group.leaf.is_zero())
            .map(|(g, group)| (g as u64, encode_group(group)))
            .collect();
        let list = inner.groups.iter().map(|group| (group.leaf, group.runs.clone())).collect();
        SummaryDocs { list: List::Groups(list), groups }
    }

    /// Every chunk's run, in order (tests).
    #[cfg(test)]
    pub fn all(&self) -> Vec<u32> {
        (0..self.chunks).map(|c| self.get(c)).collect()
    }
}

/// Loads group `g`'s page ids (from its leaf page) and runs (from the summaries where they
/// are known, else by reading the page); sets the group's summed runs from them.
fn load_group<'r>(chunks: u64, reader: &'r BlobReader<'r>, inner: &mut Inner<'r>, g: u64) -> Result<(), CoreError> {
    let range = group_pages(chunks, g);
    let leaf = inner.groups[g as usize].leaf;
    if leaf.is_zero() {
        let group = &mut inner.groups[g as usize];
        group.pages = Some(never_pages(chunks, g));
        group.runs = vec![(0, group_len(chunks, g))];
        return Ok(());
    }
    let ids = match inner.tree.as_mut() {
        Some(tree) => tree.leaf(g)?.to_vec(),
        None => vec![Id::ZERO; (range.end - range.start) as usize],
    };
    let from_doc = match &inner.known {
        Known::Groups { load, .. } => load(g),
        _ => HashMap::new(),
    };
    let known = match &inner.known {
        Known::Pages(m) => m,
        _ => &from_doc,
    };
    let mut doc = matches!(inner.known, Known::Groups { .. });
    let mut runs = Vec::with_capacity(ids.len());
    let mut sum = Runs::new();
    for (p, id) in range.zip(&ids) {
        let len = page_len(chunks, p);
        let page = if id.is_zero() {
            vec![(0, len)]
        } else {
            match known.get(id).filter(|r| total(r) == len) {
                Some(r) => r.clone(),
                None => {
                    doc = false;
                    runs_of(&read_page(reader, *id, len)?)
                }
            }
        };
        for &(r, n) in &page {
            add_run(&mut sum, r, n as i64);
        }
        runs.push(page);
    }
    let group = &mut inner.groups[g as usize];
    group.pages = Some(Pages { ids, runs });
    group.runs = sum;
    group.doc = doc;
    Ok(())
}

fn page_len(chunks: u64, page: u64) -> u64 {
    (chunks - page * ENTRIES_PER_PAGE).min(ENTRIES_PER_PAGE)
}

fn read_page(reader: &BlobReader<'_>, id: Id, len: u64) -> Result<Vec<u32>, CoreError> {
    let plain = reader.read(&id, BlobKind::Confirm)?;
    decode_page(&plain, len as usize)
        .map_err(|e| CoreError::Repo(blockproof_repo::RepoError::corrupt(format!("page {id}"), e)))
}

impl LastConfirmed for ConfirmState<'_> {
    fn chunks(&self) -> u64 {
        self.chunks
    }

    fn run_of(&self, chunk: u64) -> u32 {
        self.get(chunk)
    }

    fn add_runs(&self, range: Range<u64>, hist: &mut BTreeMap<u32, u64>) {
        let p = range.start / ENTRIES_PER_PAGE;
        if range.start == p * ENTRIES_PER_PAGE && range.end - range.start == page_len(self.chunks, p) {
            self.with_runs(p, |runs| {
                for &(r, n) in runs {
                    *hist.entry(r).or_default() += n;
                }
            });
        } else {
            for c in range {
                *hist.entry(self.get(c)).or_default() += 1;
            }
        }
    }

    fn may_hold(&self, range: Range<u64>, runs: Range<u32>) -> bool {
        let p = range.start / ENTRIES_PER_PAGE;
        self.with_runs(p, |page| page.iter().any(|(r, _)| runs.contains(r)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn count(b: u64) -> Sampling {
        Sampling { budget_chunks: Some(b), sampled: b, ..Sampling::default() }
    }

    /// Stores `state` into `repo`; returns the root and the blobs written.
    fn store_in(repo: &blockproof_repo::Repository, state: &mut ConfirmState<'_>) -> (Option<Id>, u64) {
        let index = blockproof_repo::BlobIndex::load(repo).unwrap();
        let (root, stats) = store_on(repo, &index, state);
        (root, stats.blobs)
    }

    /// Stores `state` into `repo`, deduplicating against `index`.
    fn store_on(
        repo: &blockproof_repo::Repository,
        index: &blockproof_repo::BlobIndex,
        state: &mut ConfirmState<'_>,
    ) -> (Option<Id>, blockproof_repo::PackWriterStats) {
        let reader = BlobReader::new(repo, index);
        let avail = crate::availability::Availability::assess(repo, index, &mut Vec::new()).unwrap();
        let dedup = crate::pipeline::Dedup::new(&reader, &avail);
        crate::pipeline::with_pack_writer(repo, |tx| {
            let mut sink = BlobSink::new(repo, &dedup, tx);
            state.store(&mut sink)
        })
        .unwrap()
    }

    /// Whether `basis` holds for `index` as a backup judges it.
    fn holds(repo: &blockproof_repo::Repository, index: &blockproof_repo::BlobIndex, basis: &IndexBasis) -> bool {
        let reader = BlobReader::new(repo, index);
        let avail = crate::availability::Availability::assess(repo, index, &mut Vec::new()).unwrap();
        crate::pipeline::Dedup::new(&reader, &avail).holds(basis)
    }

    fn group_list(docs: &SummaryDocs) -> Vec<(Id, Runs)> {
        match blockproof_format::confirm::decode_any(&docs.encode_list(None)).unwrap() {
            blockproof_format::confirm::Summaries::Groups(g, _) => g,
            other => panic!("{other:?}"),
        }
    }

    fn page_ids(repo: &blockproof_repo::Repository, root: Id, chunks: u64) -> Vec<Id> {
        let index = blockproof_repo::BlobIndex::load(repo).unwrap();
        let reader = BlobReader::new(repo, &index);
        let pages = page_count(chunks);
        let mut tree = TreeReader::new(&reader, root, pages, DEFAULT_FANOUT).unwrap();
        (0..pages).map(|p| tree.chunk(p).unwrap()).collect()
    }

    /// Pages are loaded when first needed and stored copy-on-write: a page the run did not
    /// change keeps its id and is not stored again; the summaries give the coverage
    /// without loading a page.
    #[test]
    fn pages_load_on_demand_and_unchanged_ones_keep_their_id() {
        let dir = tempfile::tempdir().unwrap();
        let repo = crate::test_repo::in_dir(dir.path());
        // 4 pages, the last one short; pages 0, 2 and 3 hold confirmations, page 1 none.
        let n = 3 * ENTRIES_PER_PAGE + 100;
        let mut model = vec![0u32; n as usize];
        let mut s = ConfirmState::never(n);
        for c in (0..n).filter(|c| c / ENTRIES_PER_PAGE != 1 && c % 5 == 0) {
            s.confirm(c, 1 + (c % 3) as u32);
            model[c as usize] = 1 + (c % 3) as u32;
        }
        let (root1, written) = store_in(&repo, &mut s);
        let root1 = root1.unwrap();
        assert_eq!(written, 3 + 1, "three pages and the root");
        let ids1 = page_ids(&repo, root1, n);
        assert!(ids1[1].is_zero() && !ids1[0].is_zero());

        // Loaded: no page is read until needed; the coverage comes from the summaries.
        let index = blockproof_repo::BlobIndex::load(&repo).unwrap();
        let reader = BlobReader::new(&repo, &index);
        let s = ConfirmState::read(&reader, root1, n, Known::None).unwrap();
        assert!(s.inner.borrow().pages.is_empty());
        let off = Sampling { off: true, ..Sampling::default() };
        let reference = ConfirmState::of(&model).coverage(4, &count(1000));
        assert_eq!(s.coverage(4, &off).never_confirmed, reference.never_confirmed);
        assert_eq!(s.coverage(4, &off).oldest_confirmed_runs_ago, 3);
        assert!(s.inner.borrow().pages.is_empty(), "the coverage loads no page");
        assert_eq!(s.coverage(4, &count(1000)), reference);
        assert_eq!(s.get(2 * ENTRIES_PER_PAGE + 5), model[(2 * ENTRIES_PER_PAGE + 5) as usize]);
        assert_eq!(s.all(), model);

        // One chunk of page 2 confirmed again: only that page (and the root) is new.
        let mut s = ConfirmState::read(&reader, root1, n, Known::None).unwrap();
        s.confirm(2 * ENTRIES_PER_PAGE + 7, 4);
        assert_eq!(s.inner.borrow().pages.len(), 1);
        let (root2, written) = store_in(&repo, &mut s);
        assert_eq!(written, 2);
        let ids2 = page_ids(&repo, root2.unwrap(), n);
        assert_eq!((ids2[0], ids2[1], ids2[3]), (ids1[0], ids1[1], ids1[3]));
        assert_ne!(ids2[2], ids1[2]);
        model[(2 * ENTRIES_PER_PAGE + 7) as usize] = 4;
        let index = blockproof_repo::BlobIndex::load(&repo).unwrap();
        let reader = BlobReader::new(&repo, &index);
        let s2 = ConfirmState::read(&reader, root2.unwrap(), n, Known::None).unwrap();
        assert_eq!(s2.all(), model);

        // With the pages' summaries (the state document a backup keeps), no page is read
        // to load: an index without the pages still loads it, and the coverage is right;
        // a page then needed and not readable counts as never confirmed, with a warning.
        let known: HashMap<Id, Runs> = blockproof_format::confirm::decode_summaries(&s.summaries().encode_list(None))
            .unwrap()
            .into_iter()
            .collect();
        assert_eq!(known.len(), 3);
        let mut partial = blockproof_repo::BlobIndex::default();
        for (_, pack, entry) in index.iter().filter(|(id, _, _)| !ids2.contains(id)) {
            partial.add_pack(pack, std::slice::from_ref(&entry));
        }
        let reader = BlobReader::new(&repo, &partial);
        assert!(ConfirmState::read(&reader, root2.unwrap(), n, Known::None).is_err());
        let s3 = ConfirmState::read(&reader, root2.unwrap(), n, Known::Pages(known.clone())).unwrap();
        assert_eq!(s3.coverage(4, &off), ConfirmState::of(&model).coverage(4, &off));
        assert_eq!(s3.get(2 * ENTRIES_PER_PAGE + 7), 0);
        assert_eq!(s3.take_warnings().len(), 1);
        assert_eq!(s3.coverage(4, &off).never_confirmed, reference.never_confirmed + 16384 / 5 + 1);
    }

    /// The selection over the paged state picks as over the plain runs: the same chunks
    /// older than the threshold, in the same order, and as many at it.
    #[test]
    fn the_paged_selection_matches_the_plain_one() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let n = 2 * ENTRIES_PER_PAGE + 3000;
        let last: Vec<u32> = (0..n)
            .map(|c| {
                if c / ENTRIES_PER_PAGE == 1 {
                    5
                } else if rng.gen_bool(0.01) {
                    rng.gen_range(0..4)
                } else {
                    4
                }
            })
            .collect();
        let s = ConfirmState::of(&last);
        let cands = [0..100, 200..ENTRIES_PER_PAGE + 10, ENTRIES_PER_PAGE + 20..n];
        for limit in [0, 1, 50, 300, 5000, 40000] {
            let plain = crate::verify::select(&last[..], &cands, Some(limit), &mut rng);
            let paged = crate::verify::select(&s, &cands, Some(limit), &mut rng);
            assert_eq!(plain.len(), paged.len(), "limit {limit}");
            let threshold = paged.iter().skip(1).map(|&c| last[c as usize]).max().unwrap_or(0);
            let older = |v: &[u64]| v.iter().copied().filter(|&c| last[c as usize] < threshold).collect::<Vec<_>>();
            assert_eq!(older(&plain), older(&paged), "limit {limit}");
            let mut unique = paged.clone();
            unique.sort_unstable();
            unique.dedup();
            assert_eq!(unique.len(), paged.len());
        }
    }

    /// A state of three groups (the last one short): with the group list, a run that
    /// changes one page loads only that page's group, stores only it (the others' leaf
    /// pages are taken whole) and rewrites only its group document; the tree is the one
    /// a run loading everything builds, and the version-1 summaries still load it.
    #[test]
    fn groups_not_touched_are_neither_loaded_nor_rewritten() {
        let dir = tempfile::tempdir().unwrap();
        let repo = crate::test_repo::in_dir(dir.path());
        let group = GROUP_PAGES * ENTRIES_PER_PAGE;
        let n = 2 * group + 5 * ENTRIES_PER_PAGE + 77;
        // Confirmed: a few chunks in pages of groups 0 and 2, one page of group 1.
        let confirmed = [3, 5 * ENTRIES_PER_PAGE + 1, group + 7, 2 * group + 3 * ENTRIES_PER_PAGE, n - 1];
        let mut s = ConfirmState::never(n);
        confirmed.iter().for_each(|&c| s.confirm(c, 1));
        let root1 = store_in(&repo, &mut s).0.unwrap();
        let docs1 = s.summaries();
        assert_eq!(docs1.groups.iter().map(|(g, _)| *g).collect::<Vec<_>>(), vec![0, 1, 2], "every group is new");
        let list = group_list(&docs1);
        let group_docs: HashMap<u64, Vec<u8>> = docs1.groups.into_iter().collect();
        assert_eq!(list.len(), 3);
        assert_eq!(list[1].1, vec![(0, group - 1), (1, 1)]);
        let loads = std::cell::Cell::new(0);
        let known = || Known::Groups {
            groups: list.clone(),
            load: Box::new(|g| {
                loads.set(loads.get() + 1);
                blockproof_format::confirm::decode_summaries(&group_docs[&g]).unwrap().into_iter().collect()
            }),
            reusable: false,
        };

        // Loaded with the list: no group's pages, the coverage from the sums.
        let index = blockproof_repo::BlobIndex::load(&repo).unwrap();
        let reader = BlobReader::new(&repo, &index);
        let mut s2 = ConfirmState::read(&reader, root1, n, known()).unwrap();
        assert!(s2.inner.borrow().groups.iter().all(|g| g.pages.is_none()));
        let off = Sampling { off: true, ..Sampling::default() };
        assert_eq!(s2.coverage(2, &off).never_confirmed, n - confirmed.len() as u64);
        // One chunk of group 1 confirmed again (chunk 0, which the bound looks up, is in
        // group 0: that group is loaded, not changed).
        s2.confirm(group + 8, 2);
        assert_eq!(loads.get(), 1, "group 1 was loaded");
        let loaded: Vec<bool> = s2.inner.borrow().groups.iter().map(|g| g.pages.is_some()).collect();
        assert_eq!(loaded, vec![false, true, false]);
        let (root2, written) = store_in(&repo, &mut s2);
        assert_eq!(written, 1 + 1 + 1, "the page, group 1's leaf page and the root");
        let docs2 = s2.summaries();
        assert_eq!(docs2.groups.iter().map(|(g, _)| *g).collect::<Vec<_>>(), vec![1], "only group 1 is rewritten");
        let list2 = group_list(&docs2);
        assert_eq!((list2[0].0, list2[2].0), (list[0].0, list[2].0));
        assert_ne!(list2[1].0, list[1].0);
        assert_eq!(list2[1].1, vec![(0, group - 2), (1, 1), (2, 1)]);

        // The same content, every group loaded from the pages: the same tree and sums.
        let index = blockproof_repo::BlobIndex::load(&repo).unwrap();
        let reader = BlobReader::new(&repo, &index);
        let mut model = ConfirmState::never(n);
        confirmed.iter().for_each(|&c| model.confirm(c, 1));
        model.confirm(group + 8, 2);
        assert_eq!(store_in(&repo, &mut model).0, root2);
        let eager = ConfirmState::read(&reader, root2.unwrap(), n, Known::None).unwrap();
        assert!(eager.inner.borrow().groups.iter().all(|g| g.pages.is_some()));
        assert_eq!(eager.coverage(2, &off), s2.coverage(2, &off));
        // A version-1 document of every page still loads it, and its stores write every
        // group's document (the list replaces it).
        let pages: HashMap<Id, Runs> = (0..3)
            .flat_map(|g| {
                let group = &eager.inner.borrow().groups[g];
                let p = group.pages.as_ref().unwrap();
                p.ids.iter().copied().zip(p.runs.iter().cloned()).filter(|(id, _)| !id.is_zero()).collect::<Vec<_>>()
            })
            .collect();
        let mut v1 = ConfirmState::read(&reader, root2.unwrap(), n, Known::Pages(pages)).unwrap();
        assert_eq!(v1.coverage(2, &off), s2.coverage(2, &off));
        assert_eq!(store_in(&repo, &mut v1), (root2, 0));
        assert_eq!(v1.summaries().groups.len(), 3);
        // A list naming another leaf for a group: that group is loaded from its pages.
        let mut stale = list2.clone();
        stale[2].0 = Id([9; 32]);
        let s3 = ConfirmState::read(
            &reader,
            root2.unwrap(),
            n,
            Known::Groups { groups: stale, load: Box::new(|_| HashMap::new()), reusable: false },
        )
        .unwrap();
        let loaded: Vec<bool> = s3.inner.borrow().groups.iter().map(|g| g.pages.is_some()).collect();
        assert_eq!(loaded, vec![false, false, true]);
        for c in confirmed.iter().flat_map(|&c| [c.saturating_sub(1), c, (c + 1).min(n - 1)]).chain([group + 8]) {
            assert_eq!(s3.get(c), eager.get(c), "chunk {c}");
        }
        assert_eq!((s3.get(group + 8), s3.get(n - 1), s3.get(n - 2)), (2, 1, 0));
    }

    /// Groups this run did not load are taken whole only while every page they list may
    /// be reused: with their pack unusable (here: of the wrong size), every page and leaf
    /// page is read back and stored again, and the tree is the same.
    #[test]
    fn groups_whose_pages_may_not_be_reused_are_stored_again() {
        let dir = tempfile::tempdir().unwrap();
        let repo = crate::test_repo::in_dir(dir.path());
        let group = GROUP_PAGES * ENTRIES_PER_PAGE;
        let n = 2 * group + 3 * ENTRIES_PER_PAGE;
        let mut s = ConfirmState::never(n);
        // Eleven pages hold confirmations (each at another place, so that no two pages
        // are alike): five of group 0, three of group 1, three of group 2.
        let pages_confirmed = [0, 1, 2, 3, 4, GROUP_PAGES, GROUP_PAGES + 40, GROUP_PAGES + 900]
            .into_iter()
            .chain((0..3).map(|p| 2 * GROUP_PAGES + p));
        let confirmed: Vec<u64> = pages_confirmed.enumerate().map(|(k, p)| p * ENTRIES_PER_PAGE + k as u64).collect();
        confirmed.iter().for_each(|&c| s.confirm(c, 1));
        let root = store_in(&repo, &mut s).0.unwrap();
        let list = group_list(&s.summaries());
        let known = || Known::Groups { groups: list.clone(), load: Box::new(|_| HashMap::new()), reusable: false };
        let index = blockproof_repo::BlobIndex::load(&repo).unwrap();
        let reader = BlobReader::new(&repo, &index);

        // Every pack usable: every group taken whole, nothing written.
        let mut again = ConfirmState::read(&reader, root, n, known()).unwrap();
        assert_eq!(store_in(&repo, &mut again), (Some(root), 0));
        assert!(again.inner.borrow().groups.iter().all(|g| g.pages.is_none()));

        // The packs one byte longer than their index listing says: nothing may be reused.
        for shard in std::fs::read_dir(dir.path().join("data")).unwrap() {
            for pack in std::fs::read_dir(shard.unwrap().path()).unwrap() {
                let mut f = std::fs::OpenOptions::new().append(true).open(pack.unwrap().path()).unwrap();
                std::io::Write::write_all(&mut f, b"x").unwrap();
            }
        }
        let mut repaired = ConfirmState::read(&reader, root, n, known()).unwrap();
        let pages = confirmed.iter().map(|c| c / ENTRIES_PER_PAGE).collect::<std::collections::BTreeSet<_>>().len();
        assert_eq!(pages, 11);
        assert_eq!(store_in(&repo, &mut repaired), (Some(root), pages as u64 + 3 + 1), "pages, leaf pages, root");
        assert_eq!(repaired.all(), s.all());
    }

    /// A group whose leaf page the group list names is kept by that id alone, neither
    /// read nor looked up, when the list's basis holds; the basis holds while the index
    /// files it names remain. Once the index file holding groups 0 and 2 is removed, it
    /// does not, their leaf pages are looked up (and, unreadable, stored as never
    /// confirmed, with warnings), and the stored tree names only blobs the index has.
    #[test]
    fn a_group_list_spares_lookups_only_while_its_basis_holds() {
        let dir = tempfile::tempdir().unwrap();
        let repo = crate::test_repo::in_dir(dir.path());
        let group = GROUP_PAGES * ENTRIES_PER_PAGE;
        let n = 2 * group + 3 * ENTRIES_PER_PAGE;
        let mut s = ConfirmState::never(n);
        [1, group + 2, 2 * group + 3].iter().for_each(|&c| s.confirm(c, 1));
        let (root1, first) = store_on(&repo, &blockproof_repo::BlobIndex::load(&repo).unwrap(), &mut s);
        let list1 = group_list(&s.summaries());
        // Run 2 changes group 1: its page, its leaf page and the root go to a file of
        // their own; the basis names both files.
        let index = blockproof_repo::BlobIndex::load(&repo).unwrap();
        let reader = BlobReader::new(&repo, &index);
        let known = |list: &[(Id, Runs)], reusable| Known::Groups {
            groups: list.to_vec(),
            load: Box::new(|_| HashMap::new()),
            reusable,
        };
        let mut s2 = ConfirmState::read(&reader, root1.unwrap(), n, known(&list1, false)).unwrap();
        s2.confirm(group + 5, 2);
        let (root2, second) = store_on(&repo, &index, &mut s2);
        let root2 = root2.unwrap();
        assert_eq!((first.index_files.len(), second.index_files.len()), (1, 1));
        let basis = index.basis(&second.index_files).unwrap();
        let list2 = group_list(&s2.summaries());

        // It holds: on an index without groups 0 and 2's leaf and pages (so that a lookup
        // would find them missing), they are kept by id; nothing is read or written.
        let index = blockproof_repo::BlobIndex::load(&repo).unwrap();
        assert!(holds(&repo, &index, &basis));
        let unlisted: HashSet<Id> =
            [0, 2].iter().flat_map(|&g| [list1[g].0]).chain(page_ids(&repo, root1.unwrap(), n)).collect();
        let mut partial = blockproof_repo::BlobIndex::default();
        for (_, pack, entry) in index.iter().filter(|(id, _, _)| !unlisted.contains(id) || *id == list2[1].0) {
            partial.add_pack(pack, std::slice::from_ref(&entry));
        }
        let reader = BlobReader::new(&repo, &partial);
        let mut kept = ConfirmState::read(&reader, root2, n, known(&list2, true)).unwrap();
        assert_eq!(store_on(&repo, &partial, &mut kept).0, Some(root2));
        assert!(kept.take_warnings().is_empty() && kept.inner.borrow().groups.iter().all(|g| g.pages.is_none()));
        let mut looked_up = ConfirmState::read(&reader, root2, n, known(&list2, false)).unwrap();
        assert_ne!(store_on(&repo, &partial, &mut looked_up).0, Some(root2), "without the basis they are looked up");

        // The first file removed: the basis no longer holds; groups 0 and 2 are looked
        // up, their leaf pages cannot be read, and the tree stored names nothing missing.
        repo.backend().remove(blockproof_store::Kind::Index, &first.index_files[0].to_hex()).unwrap();
        let index = blockproof_repo::BlobIndex::load(&repo).unwrap();
        assert!(!holds(&repo, &index, &basis));
        let reader = BlobReader::new(&repo, &index);
        let mut s3 = ConfirmState::read(&reader, root2, n, known(&list2, false)).unwrap();
        let root3 = store_on(&repo, &index, &mut s3).0.unwrap();
        assert_eq!(s3.take_warnings().len(), 2, "groups 0 and 2");
        let index = blockproof_repo::BlobIndex::load(&repo).unwrap();
        let reader = BlobReader::new(&repo, &index);
        let s4 = ConfirmState::read(&reader, root3, n, Known::None).unwrap();
        assert_eq!((s4.get(group + 2), s4.get(group + 5), s4.get(1), s4.get(2 * group + 3)), (1, 2, 0, 0));
    }
}
