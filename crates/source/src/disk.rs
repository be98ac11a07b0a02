//! Disk specs: a source and its change source, opened against the parent's recorded state.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use blockproof_nbd::Uri;

use crate::changes::ALL_AREAS;
use crate::nbd::BitmapOutcome;
use crate::qemu::{add_bitmap, chain_bitmaps, image_bitmaps, image_format, remove_bitmap};
use crate::{BlockSource, ChangeList, Changes, NbdSource, QemuNbd, RawFile, SourceError};

/// The bitmaps `bitmap:auto` owns are named `blockproof/<vm>/<disk id>/<n>` (vm names
/// and disk ids hold no `/`), so the same image backed up under two vm names keeps one
/// rotation per vm. Older versions named them `blockproof-<n>`: such a bitmap is still
/// used when the parent restore point names it, and removed once a newer one replaced it.
const AUTO_ROOT: &str = "blockproof/";
const LEGACY_PREFIX: &str = "blockproof-";

/// Who opens a disk: the vm and the disk id it is backed up as. Bitmaps blockproof
/// creates are named after both.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Owner<'a> {
    pub vm: &'a str,
    pub disk: &'a str,
}

impl Owner<'_> {
    /// The name prefix of this owner's `bitmap:auto` bitmaps.
    fn prefix(&self) -> String {
        format!("{AUTO_ROOT}{}/{}/", self.vm, self.disk)
    }

    /// The number of this owner's `bitmap:auto` bitmap `name`.
    pub(crate) fn number(&self, name: &str) -> Option<u64> {
        name.strip_prefix(&self.prefix())?.parse().ok()
    }

    /// The name of this owner's `bitmap:auto` bitmap number `n`.
    pub fn bitmap(&self, n: u64) -> String {
        format!("{}{n}", self.prefix())
    }
}

/// A change source (`cbt=` of a disk spec).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Cbt {
    /// Read everything.
    None,
    /// The dirty bitmap NAME exported by the NBD server (or in the qcow2 image).
    Bitmap(String),
    /// A rotation of persistent bitmaps in a qcow2 image, owned by blockproof.
    AutoBitmap,
    /// A VMware DiskChangeInfo JSON file.
    Changes(PathBuf),
}

impl FromStr for Cbt {
    type Err = String;

    fn from_str(s: &str) -> Result<Cbt, String> {
        match s.split_once(':') {
            None if s == "none" => Ok(Cbt::None),
            Some(("bitmap", "auto")) => Ok(Cbt::AutoBitmap),
            Some(("bitmap", name)) if valid_bitmap_name(name) => Ok(Cbt::Bitmap(name.to_string())),
            Some(("bitmap", name)) => Err(format!("invalid bitmap name {name:?}")),
            Some(("changes", file)) if !file.is_empty() => Ok(Cbt::Changes(PathBuf::from(file))),
            _ => Err(format!("unknown change source {s:?}: use none, bitmap:NAME, bitmap:auto or changes:FILE")),
        }
    }
}

impl fmt::Display for Cbt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Cbt::None => f.write_str("none"),
            Cbt::Bitmap(name) => write!(f, "bitmap:{name}"),
            Cbt::AutoBitmap => f.write_str("bitmap:auto"),
            Cbt::Changes(p) => write!(f, "changes:{}", p.display()),
        }
    }
}

fn valid_bitmap_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= 1023 && !name.chars().any(|c| c.is_control())
}

/// What the parent restore point of a disk recorded about its change source.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ParentCbt {
    /// The change source the parent used, as written in its manifest.
    pub cbt: String,
    /// The state it left for this run (`bitmap:auto`: the bitmap recording since then).
    pub state: Option<String>,
}

/// Where a disk's bytes come from.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Location {
    Raw(PathBuf),
    Nbd(Uri),
    Image { path: PathBuf, format: &'static str },
}

/// A disk to open: its source and change source.
#[derive(Clone, Debug)]
pub struct DiskSpec {
    location: Location,
    cbt: Cbt,
}

/// What an [`OpenedDisk`]'s [`Changes::Ranges`] are known to be relative to.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Base {
    /// The caller's word: the changes since its last backup, which blockproof takes to
    /// be the parent restore point only while the repository records no newer one of
    /// the disk (`bitmap:NAME`, a change list without `baseChangeId`).
    #[default]
    Assumed,
    /// Proven relative to the parent's recorded state: `bitmap:auto`'s bitmap named by
    /// the parent, a change list whose `baseChangeId` is the parent's change id.
    Parent,
}

/// An opened disk: the source, what changed, and what to record for the next run.
pub struct OpenedDisk {
    pub source: Box<dyn BlockSource>,
    pub changes: Changes,
    /// What the changes are relative to.
    pub base: Base,
    /// State recorded with the snapshot for the next run.
    pub cbt_state: Option<String>,
    /// What to do once the snapshot is committed and `source` dropped.
    pub after_commit: AfterCommit,
}

/// Work left for after the commit.
#[derive(Debug, Default)]
pub struct AfterCommit {
    /// `bitmap:auto`: remove the image's bitmaps `remove` names (the owner's earlier
    /// rotation, and a legacy bitmap the parent named), never `keep`.
    prune_bitmaps: Option<Prune>,
}

#[derive(Debug)]
struct Prune {
    image: PathBuf,
    prefix: String,
    legacy: Option<String>,
    keep: String,
}

impl AfterCommit {
    /// Runs it. Failing here leaves extra bitmaps, which the next run removes.
    pub fn run(self) -> Result<(), SourceError> {
        if let Some(p) = self.prune_bitmaps {
            for b in image_bitmaps(&p.image)? {
                let ours = b.name.strip_prefix(&p.prefix).is_some_and(|n| n.parse::<u64>().is_ok());
                if (ours || p.legacy.as_ref() == Some(&b.name)) && b.name != p.keep {
                    remove_bitmap(&p.image, &b.name)?;
                }
            }
        }
        Ok(())
    }
}

fn legacy_number(name: &str) -> Option<u64> {
    name.strip_prefix(LEGACY_PREFIX)?.parse().ok()
}

impl OpenedDisk {
    /// A disk already opened, with no change information (every chunk is read).
    pub fn full(source: Box<dyn BlockSource>, reason: &str) -> OpenedDisk {
        OpenedDisk {
            source,
            changes: Changes::All { reason: reason.into() },
            base: Base::Assumed,
            cbt_state: None,
            after_commit: AfterCommit::default(),
        }
    }
}

impl DiskSpec {
    /// Parses a source (`nbd://…`, `nbd+unix://…`, an image path by extension, or a raw
    /// path) and checks that the change source suits it. Nothing is opened yet.
    pub fn new(source: &str, cbt: Cbt) -> Result<DiskSpec, SourceError> {
        let location = if source.starts_with("nbd:") || source.starts_with("nbd+") {
            Location::Nbd(Uri::parse(source).map_err(|e| SourceError::Invalid(e.to_string()))?)
        } else {
            let path = PathBuf::from(source);
            match image_format(&path) {
                Some(format) => Location::Image { path, format },
                None => Location::Raw(path),
            }
        };
        let fits = match (&cbt, &location) {
            (Cbt::Bitmap(_), Location::Raw(_)) => Err("bitmap:NAME needs an NBD source or a qcow2 image"),
            (Cbt::Bitmap(_), Location::Image { format, .. }) if *format != "qcow2" => {
                Err("bitmap:NAME needs an NBD source or a qcow2 image")
            }
            (Cbt::AutoBitmap, Location::Image { format: "qcow2", .. }) => Ok(()),
            (Cbt::AutoBitmap, _) => Err("bitmap:auto needs a .qcow2 image path"),
            _ => Ok(()),
        };
        fits.map_err(|why| SourceError::Invalid(format!("cbt={cbt} for {source}: {why}")))?;
        Ok(DiskSpec { location, cbt })
    }

    pub fn cbt(&self) -> &Cbt {
        &self.cbt
    }

    /// The source as given.
    pub fn describe(&self) -> String {
        match &self.location {
            Location::Raw(p) | Location::Image { path: p, .. } => p.display().to_string(),
            Location::Nbd(uri) => uri.to_string(),
        }
    }

    /// Opens the disk for `owner`. `parent` is what the parent restore point of this disk
    /// recorded, `None` when there is none.
    pub fn open(&self, owner: &Owner<'_>, parent: Option<&ParentCbt>) -> Result<OpenedDisk, SourceError> {
        let what = self.describe();
        if let Location::Image { path, .. } = &self.location {
            // A clear error for a missing image, before any bitmap work or qemu-nbd.
            std::fs::File::open(path).map_err(|source| SourceError::Open { path: path.clone(), source })?;
        }
        match (&self.location, &self.cbt) {
            (Location::Image { path, .. }, Cbt::AutoBitmap) => open_auto(path, owner, parent),
            (Location::Image { path, .. }, Cbt::Bitmap(name)) => {
                let bitmaps = chain_bitmaps(path)?;
                let unusable = match bitmaps.iter().find(|b| &b.name == name) {
                    None => Some(format!("the image has no bitmap {name:?}")),
                    Some(b) if b.inconsistent() => Some(inconsistent(name)),
                    Some(_) => None,
                };
                let server = QemuNbd::start(path, "qcow2", unusable.is_none().then_some(name.as_str()))?;
                let uri = server.uri();
                let bitmap = unusable.is_none().then_some(name.as_str());
                let (source, outcome) = NbdSource::connect(&uri, what, bitmap, Some(server))?;
                with_bitmap(source, outcome, unusable)
            }
            (Location::Image { path, format }, cbt) => {
                let server = QemuNbd::start(path, format, None)?;
                let (source, _) = NbdSource::connect(&server.uri(), what, None, Some(server))?;
                simple(Box::new(source), cbt, parent)
            }
            (Location::Nbd(uri), Cbt::Bitmap(name)) => {
                let (source, outcome) = NbdSource::connect(uri, what, Some(name), None)?;
                with_bitmap(source, outcome, None)
            }
            (Location::Nbd(uri), cbt) => {
                let (source, _) = NbdSource::connect(uri, what, None, None)?;
                simple(Box::new(source), cbt, parent)
            }
            (Location::Raw(path), cbt) => simple(Box::new(RawFile::open(path)?), cbt, parent),
        }
    }
}

fn inconsistent(name: &str) -> String {
    format!("bitmap {name:?} is inconsistent (left in-use by a program that did not close the image cleanly)")
}

/// `none` and `changes:FILE`, which work the same for every source.
fn simple(source: Box<dyn BlockSource>, cbt: &Cbt, parent: Option<&ParentCbt>) -> Result<OpenedDisk, SourceError> {
    match cbt {
        Cbt::Changes(file) => {
            let list = ChangeList::load(file)?;
            let (changes, base) = match list_base(&list, parent) {
                Ok(base) => (list.changes(source.size()), base),
                Err(reason) => (Changes::All { reason }, Base::Assumed),
            };
            // The restore point is the disk at `changeId`, however it is read.
            let cbt_state = list.change_id.clone();
            Ok(OpenedDisk { source, changes, base, cbt_state, after_commit: AfterCommit::default() })
        }
        _ => Ok(OpenedDisk::full(source, "cbt=none")),
    }
}

/// What a change list is relative to, given what the parent restore point recorded; the
/// reason to read in full when its `baseChangeId` is not the parent's change id. A list
/// without `baseChangeId` is taken at its word ([`Base::Assumed`]).
fn list_base(list: &ChangeList, parent: Option<&ParentCbt>) -> Result<Base, String> {
    let (Some(base), Some(parent)) = (list.base_change_id.as_deref(), parent) else {
        return Ok(Base::Assumed);
    };
    if base == ALL_AREAS {
        return Err(format!(
            "the change list lists every allocated area (baseChangeId \"{ALL_AREAS}\"), not the changes since the \
             parent restore point"
        ));
    }
    match &parent.state {
        _ if !parent.cbt.starts_with("changes:") => Err(format!(
            "the change list is relative to change id {base:?}, but the parent restore point used cbt={} and \
             recorded no change id",
            parent.cbt
        )),
        None => Err(format!(
            "the change list is relative to change id {base:?}, but the parent restore point recorded no change id"
        )),
        Some(recorded) if recorded != base => Err(format!(
            "the change list is relative to change id {base:?}, not to the parent restore point's {recorded:?}"
        )),
        Some(_) => Ok(Base::Parent),
    }
}

fn with_bitmap(
    mut source: NbdSource,
    outcome: BitmapOutcome,
    unusable: Option<String>,
) -> Result<OpenedDisk, SourceError> {
    let changes = match (unusable, outcome) {
        (Some(reason), _) | (None, BitmapOutcome::Missing(reason)) => Changes::All { reason },
        (None, BitmapOutcome::Granted) => Changes::ranges(source.dirty_ranges()?),
    };
    Ok(OpenedDisk {
        source: Box::new(source),
        changes,
        base: Base::Assumed,
        cbt_state: None,
        after_commit: AfterCommit::default(),
    })
}

/// `bitmap:auto`: export the bitmap the parent left recording, start the next one, and
/// after the commit keep only the next one. Only `owner`'s bitmaps are touched. See the
/// crate doc for the failure cases.
fn open_auto(image: &Path, owner: &Owner<'_>, parent: Option<&ParentCbt>) -> Result<OpenedDisk, SourceError> {
    let bitmaps = image_bitmaps(image)?;
    let ours: Vec<_> = bitmaps.iter().filter(|b| owner.number(&b.name).is_some()).collect();
    let prev = match parent {
        None => Err("no earlier restore point of this disk".to_string()),
        Some(p) if p.cbt != Cbt::AutoBitmap.to_string() => {
            Err(format!("the previous restore point used cbt={}, not bitmap:auto", p.cbt))
        }
        Some(ParentCbt { state: None, .. }) => Err("the previous restore point recorded no bitmap".to_string()),
        Some(ParentCbt { state: Some(name), .. }) => {
            let mine = owner.number(name).is_some() || legacy_number(name).is_some();
            match bitmaps.iter().find(|b| &b.name == name).filter(|_| mine) {
                None => Err(format!("bitmap {name:?} is missing from the image")),
                Some(b) if b.inconsistent() => Err(inconsistent(name)),
                Some(_) => Ok(name.clone()),
            }
        }
    };
    // This owner's bitmaps of failed runs, and an unusable previous one, are of no use.
    // Other owners' bitmaps (the same image under another vm name) are left alone.
    for b in &ours {
        if prev.as_ref().ok() != Some(&b.name) {
            remove_bitmap(image, &b.name)?;
        }
    }
    let next_no = ours.iter().filter_map(|b| owner.number(&b.name)).max().unwrap_or(0) + 1;
    let next = owner.bitmap(next_no);
    // From here on, every write to the image is recorded for the next run.
    add_bitmap(image, &next)?;
    let server = QemuNbd::start(image, "qcow2", prev.as_ref().ok().map(String::as_str))?;
    let (source, outcome) = NbdSource::connect(
        &server.uri(),
        image.display().to_string(),
        prev.as_ref().ok().map(String::as_str),
        Some(server),
    )?;
    let legacy = prev.as_ref().ok().filter(|n| legacy_number(n).is_some()).cloned();
    let mut opened = with_bitmap(source, outcome, prev.err())?;
    // The bitmap the parent named has recorded every write since the parent was read.
    opened.base = Base::Parent;
    opened.cbt_state = Some(next.clone());
    opened.after_commit = AfterCommit {
        prune_bitmaps: Some(Prune { image: image.to_path_buf(), prefix: owner.prefix(), legacy, keep: next }),
    };
    Ok(opened)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn change_sources_parse_and_print() {
        for s in ["none", "bitmap:nightly", "bitmap:auto", "changes:/tmp/c.json"] {
            assert_eq!(s.parse::<Cbt>().unwrap().to_string(), s);
        }
        for s in ["", "bitmap:", "changes:", "rct:x", "bitmaps:x", "None"] {
            assert!(s.parse::<Cbt>().is_err(), "{s}");
        }
    }

    #[test]
    fn change_sources_must_suit_the_source() {
        let ok = |src: &str, cbt: &str| DiskSpec::new(src, cbt.parse().unwrap()).is_ok();
        assert!(ok("/d.img", "none") && ok("/d.img", "changes:/c.json"));
        assert!(!ok("/d.img", "bitmap:b") && !ok("/d.img", "bitmap:auto"));
        assert!(ok("/d.qcow2", "bitmap:b") && ok("/d.qcow2", "bitmap:auto"));
        assert!(!ok("/d.vmdk", "bitmap:auto") && !ok("/d.vmdk", "bitmap:b") && ok("/d.vmdk", "changes:/c"));
        assert!(ok("nbd+unix:///e?socket=/s", "bitmap:b") && !ok("nbd://h/e", "bitmap:auto"));
        assert!(DiskSpec::new("nbd://", Cbt::None).is_err());
    }

    #[test]
    fn a_change_list_binds_to_the_parent_change_id_it_names() {
        let list = |base: Option<&str>| {
            let mut l = ChangeList::parse(br#"{"startOffset": 0, "length": 10, "changedArea": []}"#).unwrap();
            l.base_change_id = base.map(String::from);
            l
        };
        let parent = |cbt: &str, state: Option<&str>| ParentCbt { cbt: cbt.into(), state: state.map(String::from) };
        let p = parent("changes:/l.json", Some("c2"));
        assert_eq!(list_base(&list(None), Some(&p)), Ok(Base::Assumed));
        assert_eq!(list_base(&list(Some("c2")), Some(&p)), Ok(Base::Parent));
        assert_eq!(list_base(&list(Some("c2")), None), Ok(Base::Assumed), "no parent: a full read anyway");
        let err = list_base(&list(Some("c1")), Some(&p)).unwrap_err();
        assert!(err.contains("\"c1\"") && err.contains("\"c2\""), "{err}");
        assert!(list_base(&list(Some("c2")), Some(&parent("changes:/l", None))).unwrap_err().contains("no change id"));
        let err = list_base(&list(Some("c2")), Some(&parent("bitmap:auto", Some("c2")))).unwrap_err();
        assert!(err.contains("cbt=bitmap:auto"), "a bitmap name is not a change id: {err}");
        assert!(list_base(&list(Some("*")), Some(&p)).unwrap_err().contains("every allocated area"));
    }

    #[test]
    fn auto_bitmap_names() {
        assert_eq!(legacy_number("blockproof-12"), Some(12));
        assert_eq!(legacy_number("blockproof-x"), None);
        assert_eq!(legacy_number("nightly"), None);
        let a = Owner { vm: "web.1", disk: "sda" };
        assert_eq!(a.bitmap(3), "blockproof/web.1/sda/3");
        assert_eq!(a.number("blockproof/web.1/sda/3"), Some(3));
        // Another vm, another disk, a name that merely starts alike: not a's.
        let b = Owner { vm: "web", disk: "1" };
        assert_eq!(b.number("blockproof/web.1/sda/3"), None);
        assert_eq!(a.number("blockproof/web.1/sda2/3"), None);
        assert_eq!(a.number("blockproof/web.1/sda/x"), None);
    }
}
