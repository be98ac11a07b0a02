//! Snapshot manifests: one restore point of one vm.
//!
//! A snapshot file is an [`Envelope`](crate::Envelope) with magic `BPSN` whose plaintext
//! is the JSON of [`Snapshot`]. The snapshot id is the BLAKE3 hash of the file bytes. A
//! snapshot is written last, after every pack and index file it needs is durable, so a
//! visible snapshot is always complete. The JSON is read strictly: an unknown field, at
//! any level, is an error naming it (a misspelled or foreign field is never silently
//! dropped), and every field not marked optional is required. Fields added after the
//! first release are optional, so manifests written by earlier versions keep reading;
//! adding a field therefore needs a new format version (docs/FORMAT.md §17).

use serde::{Deserialize, Serialize};

use crate::Id;

/// Whether the snapshot is known to equal its source.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SnapshotStatus {
    /// Nothing contradicts it.
    Ok,
    /// Verification found the source and the backup differ (see the disks' mismatches).
    Tainted,
}

impl SnapshotStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            SnapshotStatus::Ok => "ok",
            SnapshotStatus::Tainted => "tainted",
        }
    }
}

/// A byte range of a disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ByteRange {
    pub offset: u64,
    pub length: u64,
}

/// How a disk was read for this snapshot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReadMode {
    /// Every byte of the source was read.
    Full,
    /// Only the ranges a change source reported were read.
    Incremental,
}

/// Counters recorded with each disk of a snapshot.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskStats {
    /// Bytes read from the source to back it up.
    pub bytes_read: u64,
    /// Chunks that were all zeros (not stored).
    pub zero_chunks: u64,
    /// Chunks whose content the repository did not hold before.
    pub new_chunks: u64,
    /// Plaintext bytes of those new chunks.
    pub new_bytes: u64,
    /// Bytes those new chunks take in the repository (compressed and sealed).
    pub stored_bytes: u64,
}

/// One disk of a snapshot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskEntry {
    /// The disk's stable identity, never its position.
    pub id: String,
    /// Size in bytes.
    pub size: u64,
    /// Chunk size in bytes.
    pub chunk_size: u32,
    /// Root of the fixed index tree ([`crate::tree`]); [`Id::ZERO`] when all zeros.
    pub index_root: Id,
    /// Ids per index page.
    pub index_fanout: u32,
    /// The snapshot this disk's parent chunk list came from, if any. Required (`null`
    /// when there is none): serde would otherwise read a missing `Option` as `None`.
    #[serde(deserialize_with = "Option::deserialize")]
    pub parent: Option<Id>,
    /// Where the disk was read from, for the operator's information.
    pub source: String,
    /// The change source used (`none`, `bitmap:NAME`, `bitmap:auto`, `changes:FILE`).
    pub cbt: String,
    /// State the change source left for the next run (`bitmap:auto`: the name of the
    /// bitmap recording writes since this restore point).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cbt_state: Option<String>,
    pub mode: ReadMode,
    /// Why every chunk was read (`mode: full`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub full_reason: Option<String>,
    #[serde(default)]
    pub stats: DiskStats,
    /// Ranges where verification found source and backup differ.
    #[serde(default)]
    pub mismatches: Vec<ByteRange>,
    /// This disk's run number: its parent's plus one (1 for a disk's first restore point).
    /// Confirmation state records runs.
    #[serde(default)]
    pub run: u64,
    /// Root of the confirmation state tree ([`crate::confirm`]); absent: never confirmed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub confirm_root: Option<Id>,
    /// How much of the disk had been confirmed against its source after this run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub coverage: Option<Coverage>,
    /// Why the next backup of this disk must read it in full (its change tracking was
    /// caught lying), if it must.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_full: Option<String>,
}

/// How much of a disk has been confirmed against its source. Field names are part of
/// the JSON contract (docs/JSON.md). The last four fields exist from format version 3 on
/// (absent in older manifests, and never written into older repositories).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Coverage {
    /// Chunks of the disk.
    pub chunks: u64,
    /// Chunks never confirmed against the source.
    pub never_confirmed: u64,
    /// Runs since the least recently confirmed chunk was confirmed (among confirmed ones).
    pub oldest_confirmed_runs_ago: u64,
    /// The bound `K`: every chunk is confirmed at least once in every window of `K`
    /// consecutive runs — the windows already open (each chunk's age counts) and every
    /// later one, as long as each later run samples at least `sampled_per_run` chunks
    /// (guaranteed when `bound` is `budget`). 0: no bound (`bound` says why).
    pub full_coverage_within_runs: u64,
    /// What the bound rests on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bound: Option<BoundBasis>,
    /// Chunks per run the bound assumes (the first chunk, compared every run, not
    /// counted): the budget's count, or what a time limit let this run sample.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sampled_per_run: Option<u64>,
    /// The budget's count part in chunks per run (absent: the budget has none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget_chunks: Option<u64>,
    /// Why this run sampled fewer chunks than `budget_chunks`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cut_short: Option<CutShort>,
}

impl Coverage {
    /// The fields a repository of format `version` may hold (older versions reject the
    /// newer fields: FORMAT §15a, §17).
    pub fn for_version(mut self, version: u16) -> Coverage {
        if version < 3 {
            self.bound = None;
            self.sampled_per_run = None;
            self.budget_chunks = None;
            self.cut_short = None;
        }
        self
    }
}

/// What a coverage bound rests on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BoundBasis {
    /// The budget's count (a percentage, a size, a number of reads, or `all`), which
    /// every run samples in full: the bound is guaranteed.
    Budget,
    /// A time limit decided how much this run sampled (a time budget, or a deadline or
    /// window that cut the count short): the bound assumes later runs sample at least
    /// as many chunks, and a later run that samples fewer reports a larger one.
    Achieved,
    /// Nothing but the first chunk was sampled (a budget below one chunk, or a time limit
    /// reached at once): no bound.
    None,
    /// Verification is off (`--verify none`).
    Off,
}

/// Why a run sampled less than its budget's count.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CutShort {
    /// The budget's time limit (`30s`).
    Deadline,
    /// The budget's time window (`until=06:00`).
    Window,
}

/// A restore point.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Snapshot {
    pub vm: String,
    /// RFC 3339 time the backup started.
    pub time: String,
    pub hostname: String,
    #[serde(default)]
    pub tags: Vec<String>,
    pub status: SnapshotStatus,
    pub disks: Vec<DiskEntry>,
    /// The blockproof version that wrote it.
    pub program: String,
    /// For a snapshot made by `copy`: the id of the snapshot it was copied from, in the
    /// source repository (a later copy skips it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub copied_from: Option<Id>,
    /// For a backup of a running VM (`--from`): the VM itself — its definition as the
    /// hypervisor gave it and how consistent the point-in-time view was. From version 4;
    /// never written into older repositories (FORMAT §11, §17).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub machine: Option<Machine>,
}

/// A running VM a restore point was taken from: enough to bring the whole VM back, not
/// only its disks.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Machine {
    /// Which hypervisor interface the VM was backed up through.
    pub kind: MachineKind,
    /// Whether the guest's file systems were frozen while the view was taken.
    pub consistency: Consistency,
    /// Why the backup is only crash-consistent (no guest agent, it did not answer, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consistency_note: Option<String>,
    /// The VM's definition: libvirt's domain XML, or for QMP the JSON block graph
    /// blockproof saw (each disk's node, driver, file and size).
    pub definition: String,
    /// The hypervisor's identity of the VM (libvirt's domain UUID), where it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uuid: Option<String>,
}

/// The hypervisor interface of a [`Machine`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MachineKind {
    /// A QEMU process or qemu-storage-daemon driven over QMP.
    Qmp,
    /// A libvirt domain.
    Libvirt,
}

impl MachineKind {
    pub fn as_str(self) -> &'static str {
        match self {
            MachineKind::Qmp => "qmp",
            MachineKind::Libvirt => "libvirt",
        }
    }
}

/// How consistent a running VM's point-in-time view is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Consistency {
    /// As if the VM had lost power at that moment: what the guest had not flushed is
    /// missing, and its file systems replay their journals on restore.
    Crash,
    /// The guest agent froze the guest's file systems while the view was taken.
    Frozen,
}

impl Consistency {
    pub fn as_str(self) -> &'static str {
        match self {
            Consistency::Crash => "crash",
            Consistency::Frozen => "frozen",
        }
    }
}

impl Snapshot {
    /// The fields a repository of format `version` may hold: `machine` and the newer
    /// coverage fields are left out of older repositories, whose builds reject them
    /// (FORMAT §15a, §17).
    pub fn for_version(mut self, version: u16) -> Snapshot {
        if version < 4 {
            self.machine = None;
        }
        for d in &mut self.disks {
            d.coverage = d.coverage.take().map(|c| c.for_version(version));
        }
        self
    }

    pub fn disk(&self, id: &str) -> Option<&DiskEntry> {
        self.disks.iter().find(|d| d.id == id)
    }

    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a snapshot always serializes")
    }

    /// Decodes and validates a manifest: every disk's geometry must be one a reader can
    /// walk (chunk size a power of two in range, fan-out in range), whatever the JSON says.
    pub fn from_json(buf: &[u8]) -> Result<Self, crate::FormatError> {
        let bad = |detail: String| crate::FormatError::Malformed { what: "snapshot manifest", detail };
        let snap: Snapshot = serde_json::from_slice(buf).map_err(|e| bad(e.to_string()))?;
        for d in &snap.disks {
            let cs = d.chunk_size;
            if !cs.is_power_of_two() || !(crate::config::MIN_CHUNK_SIZE..=crate::config::MAX_CHUNK_SIZE).contains(&cs) {
                return Err(bad(format!("disk {}: chunk size {cs}", d.id)));
            }
            if !(crate::tree::MIN_FANOUT..=crate::tree::MAX_FANOUT).contains(&d.index_fanout) {
                return Err(bad(format!("disk {}: index fan-out {}", d.id, d.index_fanout)));
            }
        }
        Ok(snap)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Snapshot {
        Snapshot {
            vm: "web".into(),
            time: "2026-11-22T10:00:00Z".into(),
            hostname: "h".into(),
            tags: vec![],
            status: SnapshotStatus::Ok,
            disks: vec![DiskEntry {
                id: "sda".into(),
                size: 10,
                chunk_size: 65536,
                index_root: Id::ZERO,
                index_fanout: 1024,
                parent: None,
                source: "/x".into(),
                cbt: "none".into(),
                cbt_state: None,
                mode: ReadMode::Full,
                full_reason: Some("cbt=none".into()),
                stats: DiskStats::default(),
                mismatches: vec![],
                run: 1,
                confirm_root: None,
                coverage: None,
                next_full: None,
            }],
            program: "blockproof 0.1.0".into(),
            copied_from: None,
            machine: None,
        }
    }

    #[test]
    fn json_field_names_are_stable() {
        let s = sample();
        let j: serde_json::Value = serde_json::from_slice(&s.to_json()).unwrap();
        assert_eq!(j["status"], "ok");
        assert_eq!(j["disks"][0]["mode"], "full");
        assert_eq!(j["disks"][0]["index_root"], "0".repeat(64));
        assert_eq!(Snapshot::from_json(&s.to_json()).unwrap(), s);
        assert!(Snapshot::from_json(b"{").is_err());

        // Geometry a reader cannot walk is refused at decode, not discovered by a panic.
        for (cs, fanout) in [(0, 1024), (3000, 1024), (65536, 0), (65536, 1), (65536, 1 << 20)] {
            let mut bad = s.clone();
            bad.disks[0].chunk_size = cs;
            bad.disks[0].index_fanout = fanout;
            let err = Snapshot::from_json(&bad.to_json()).unwrap_err().to_string();
            assert!(err.contains("disk sda"), "{err}");
        }
    }

    /// An unknown field at any level is an error naming it; a missing required field too;
    /// optional fields may be absent (manifests of earlier versions lack them).
    #[test]
    fn manifests_are_read_strictly() {
        let good: serde_json::Value = serde_json::from_slice(&sample().to_json()).unwrap();
        let decode = |j: &serde_json::Value| Snapshot::from_json(&serde_json::to_vec(j).unwrap());
        assert!(decode(&good).is_ok());
        let mut cases: Vec<(serde_json::Value, &str)> = Vec::new();
        let mut j = good.clone();
        j["statuss"] = "ok".into();
        cases.push((j, "unknown field `statuss`"));
        let mut j = good.clone();
        j["disks"][0]["index_rot"] = serde_json::Value::String("0".repeat(64));
        cases.push((j, "unknown field `index_rot`"));
        let mut j = good.clone();
        j["disks"][0]["stats"]["bytes_red"] = 1.into();
        cases.push((j, "unknown field `bytes_red`"));
        let mut j = good.clone();
        j["disks"][0]["mismatches"] = serde_json::json!([{"offset": 0, "length": 1, "len": 1}]);
        cases.push((j, "unknown field `len`"));
        let mut j = good.clone();
        j["disks"][0]["coverage"] = serde_json::json!({"chunks": 1, "never_confirmed": 1,
            "oldest_confirmed_runs_ago": 0, "full_coverage_within_runs": 0, "extra": 0});
        cases.push((j, "unknown field `extra`"));
        for field in ["vm", "time", "hostname", "status", "disks", "program"] {
            let mut j = good.clone();
            j.as_object_mut().unwrap().remove(field);
            cases.push((j, Box::leak(format!("missing field `{field}`").into_boxed_str())));
        }
        for field in ["id", "size", "chunk_size", "index_root", "index_fanout", "parent", "source", "cbt", "mode"] {
            let mut j = good.clone();
            j["disks"][0].as_object_mut().unwrap().remove(field);
            cases.push((j, Box::leak(format!("missing field `{field}`").into_boxed_str())));
        }
        for (j, want) in cases {
            let err = decode(&j).unwrap_err().to_string();
            assert!(err.contains("snapshot manifest") && err.contains(want), "{want}: {err}");
        }
        // The optional fields, absent: what a manifest of the first release looks like.
        let mut old = good.clone();
        old.as_object_mut().unwrap().remove("tags");
        let disk = old["disks"][0].as_object_mut().unwrap();
        for field in ["stats", "mismatches", "run", "cbt_state", "full_reason", "confirm_root", "coverage", "next_full"]
        {
            disk.remove(field);
        }
        let s = decode(&old).unwrap();
        assert_eq!((s.disks[0].run, s.disks[0].stats.bytes_read), (0, 0));
    }

    /// A running VM's `machine`: its names are pinned, it is read strictly, and it is
    /// left out of repositories older than version 4 (with the newer coverage fields).
    #[test]
    fn machine_is_pinned_and_only_written_from_version_4() {
        let mut s = sample();
        s.machine = Some(Machine {
            kind: MachineKind::Libvirt,
            consistency: Consistency::Frozen,
            consistency_note: None,
            definition: "<domain/>".into(),
            uuid: Some("4dea22b3-1d52-d8f3-2516-782e98ab3fa0".into()),
        });
        let j: serde_json::Value = serde_json::from_slice(&s.to_json()).unwrap();
        assert_eq!(j["machine"]["kind"], "libvirt");
        assert_eq!(j["machine"]["consistency"], "frozen");
        assert!(j["machine"].get("consistency_note").is_none(), "absent when none");
        assert_eq!(Snapshot::from_json(&s.to_json()).unwrap(), s);
        let mut bad = j.clone();
        bad["machine"]["extra"] = 1.into();
        let err = Snapshot::from_json(&serde_json::to_vec(&bad).unwrap()).unwrap_err().to_string();
        assert!(err.contains("unknown field `extra`"), "{err}");
        let mut bad = j.clone();
        bad["machine"]["kind"] = "vmware".into();
        assert!(Snapshot::from_json(&serde_json::to_vec(&bad).unwrap()).is_err());

        s.disks[0].coverage = Some(Coverage {
            chunks: 1,
            never_confirmed: 0,
            oldest_confirmed_runs_ago: 0,
            full_coverage_within_runs: 1,
            bound: Some(BoundBasis::Budget),
            sampled_per_run: Some(1),
            budget_chunks: Some(1),
            cut_short: None,
        });
        assert_eq!(s.clone().for_version(4), s);
        let v3 = s.clone().for_version(3);
        assert!(v3.machine.is_none());
        assert_eq!(v3.disks[0].coverage.as_ref().unwrap().bound, Some(BoundBasis::Budget));
        let v2 = s.for_version(2);
        assert_eq!(v2.disks[0].coverage.as_ref().unwrap().bound, None);
    }
}
