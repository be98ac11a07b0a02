//! Detection events: what verification found, kept in the repository beside the restore
//! points it concerns, so a finding never vanishes with the stderr it was printed on.
//!
//! An event is a sealed state document `state/event-<tainted snapshot id>` (FORMAT §20):
//! the tainted restore point, per disk the stale ranges, the cause, the earlier restore
//! points that may share the stale content (suspects), and — once known — the restore
//! point holding the good bytes (the snapshot healed in the same run). Events outlive
//! later full backups and `forget`: they are the history `status` shows. Where no healed
//! snapshot exists, the good bytes are those of the next full, `ok` restore point of the
//! same vm and disk, found when asked.
//!
//! [`patch`] writes those good bytes over the stale ranges of a restored image, in place.

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use blockproof_format::manifest::{ByteRange, ReadMode};
use blockproof_format::{Id, ObjectMagic, SnapshotStatus};
use blockproof_repo::{BlobIndex, BlobReader, Repository, SnapshotInfo};
use blockproof_store::Kind;
use serde::{Deserialize, Serialize};

use crate::{CoreError, DiskImage};

const PREFIX: &str = "event-";

/// Why a disk of a restore point is stale.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Cause {
    /// Change tracking called changed chunks unchanged.
    ChangeTracking,
    /// The source's allocation map called chunks holding data zeros.
    AllocationMap,
    /// The source changed while it was read (not a point-in-time view).
    SourceChanged,
}

/// One disk of an event.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventDisk {
    pub id: String,
    pub causes: Vec<Cause>,
    /// Sector-exact ranges where the tainted restore point differs from its source.
    pub mismatches: Vec<ByteRange>,
    /// Earlier restore points of the disk that hold the same stale content there.
    pub suspects: Vec<Id>,
}

/// What verification found in one backup (read strictly, FORMAT §15a).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Event {
    /// The tainted restore point.
    pub snapshot: Id,
    pub vm: String,
    /// When the backup ran (the tainted snapshot's time).
    pub time: String,
    pub disks: Vec<EventDisk>,
    /// The clean restore point committed after it in the same run, from the same
    /// point-in-time source (`--on-mismatch=heal`).
    pub healed_by: Option<Id>,
}

impl Event {
    /// Whether `snapshot` is this event's tainted restore point or one of its suspects,
    /// for `disk` (any disk when `None`).
    pub fn concerns(&self, snapshot: &Id, disk: Option<&str>) -> bool {
        *snapshot == self.snapshot
            || self.disks.iter().any(|d| disk.is_none_or(|x| x == d.id) && d.suspects.contains(snapshot))
    }
}

fn name(snapshot: &Id) -> String {
    format!("{PREFIX}{}", snapshot.to_hex())
}

/// Writes (or rewrites, to add `healed_by`) an event.
pub fn record(repo: &Repository, event: &Event) -> Result<(), CoreError> {
    let bytes = serde_json::to_vec(event).expect("an event serializes");
    repo.write_doc(Kind::State, ObjectMagic::State, &name(&event.snapshot), &bytes)?;
    Ok(())
}

/// Every event, oldest first, and a warning for each one that cannot be read (it is
/// skipped: one damaged document never hides the others).
pub fn events(repo: &Repository) -> Result<(Vec<Event>, Vec<String>), CoreError> {
    let (mut out, warnings): (Vec<Event>, _) = crate::state_doc::read_all(repo, PREFIX, "detection event")?;
    out.sort_by(|a, b| a.time.cmp(&b.time).then(a.snapshot.cmp(&b.snapshot)));
    Ok((out, warnings))
}

/// Where the good bytes of `event`'s ranges on `disk` are: the healed snapshot, else the
/// next full, `ok` restore point of the same vm holding the disk (`snapshots` oldest
/// first).
pub fn good_snapshot(event: &Event, disk: &str, snapshots: &[SnapshotInfo]) -> Option<Id> {
    if let Some(h) = event.healed_by {
        if snapshots.iter().any(|s| s.id == h) {
            return Some(h);
        }
    }
    snapshots
        .iter()
        .filter(|s| {
            s.snapshot.vm == event.vm && s.snapshot.time > event.time && s.snapshot.status == SnapshotStatus::Ok
        })
        .find(|s| s.snapshot.disk(disk).is_some_and(|d| d.mode == ReadMode::Full))
        .map(|s| s.id)
}

/// What [`patch`] did.
#[derive(Clone, Debug, Serialize)]
pub struct PatchReport {
    /// The restore point whose stale ranges were patched.
    pub snapshot: Id,
    pub disk: String,
    pub target: PathBuf,
    /// The restore point the good bytes came from.
    pub good_snapshot: Id,
    pub ranges: Vec<ByteRange>,
    pub bytes_written: u64,
}

/// Writes the known-good bytes of the stale ranges of `snapshot`'s `disk` — as recorded
/// by the events that name it, tainted or suspect — into `target` (an image of that disk,
/// a file or a block device), in place, and syncs it. Fails if no event names the
/// snapshot, or no restore point with the good bytes exists yet.
pub fn patch(repo: &Repository, snapshot: &str, disk: &str, target: &Path) -> Result<PatchReport, CoreError> {
    let info = repo.resolve_snapshot(snapshot)?;
    let entry = info
        .snapshot
        .disk(disk)
        .ok_or_else(|| CoreError::Invalid(format!("snapshot {} has no disk {disk:?}", info.id.short())))?;
    let (all, _) = events(repo)?;
    let concerned: Vec<&Event> = all.iter().filter(|e| e.concerns(&info.id, Some(disk))).collect();
    if concerned.is_empty() {
        return Err(CoreError::Invalid(format!(
            "no detection event names disk {disk} of snapshot {}: there are no known stale ranges to patch",
            info.id.short()
        )));
    }
    let snapshots = repo.snapshots()?;
    // The latest event's good snapshot has the newest proven bytes.
    let event = concerned.last().expect("not empty");
    let good = good_snapshot(event, disk, &snapshots).ok_or_else(|| {
        CoreError::Invalid(format!(
            "the good bytes of disk {disk} are not in the repository yet: back it up again (the next backup reads \
             it in full), then patch"
        ))
    })?;
    let good_info = snapshots.iter().find(|s| s.id == good).expect("found among them");
    let good_entry = good_info.snapshot.disk(disk).expect("it holds the disk");
    if good_entry.size != entry.size {
        return Err(CoreError::Invalid(format!(
            "disk {disk} changed size between snapshot {} and {}: patch by hand",
            info.id.short(),
            good.short()
        )));
    }
    let mut ranges: Vec<ByteRange> = concerned
        .iter()
        .flat_map(|e| e.disks.iter().filter(|d| d.id == disk))
        .flat_map(|d| d.mismatches.clone())
        .collect();
    ranges.sort_unstable_by_key(|r| r.offset);
    ranges.dedup();
    // A range outside the disk (a damaged event, or one written by something else) is
    // refused before anything is written.
    if let Some(r) = ranges.iter().find(|r| r.offset.checked_add(r.length).is_none_or(|end| end > entry.size)) {
        return Err(CoreError::Invalid(format!(
            "a detection event names bytes {}+{} of disk {disk}, outside the disk ({} bytes): the event is damaged; \
             nothing was patched",
            r.offset, r.length, entry.size
        )));
    }
    let index = BlobIndex::load(repo)?;
    let reader = BlobReader::new(repo, &index);
    let image = DiskImage::new(&reader, good_entry, 16 << 20)?;
    let out = OpenOptions::new().write(true).open(target).map_err(|e| CoreError::io(target, e))?;
    let mut written = 0;
    // In pieces of at most 4 MiB: a range is as long as the disk at most.
    const PIECE: u64 = 4 << 20;
    let mut buf = Vec::new();
    for r in &ranges {
        let mut at = r.offset;
        while at < r.offset + r.length {
            let n = (r.offset + r.length - at).min(PIECE);
            buf.resize(n as usize, 0);
            image.read_at(&mut buf, at)?;
            out.write_all_at(&buf, at).map_err(|e| CoreError::io(target, e))?;
            at += n;
        }
        written += r.length;
    }
    out.sync_all().map_err(|e| CoreError::io(target, e))?;
    Ok(PatchReport {
        snapshot: info.id,
        disk: disk.to_string(),
        target: target.to_path_buf(),
        good_snapshot: good,
        ranges,
        bytes_written: written,
    })
}
