//! Creating and opening repositories; config, key slots, index files and snapshots.

use std::time::SystemTime;

use blockproof_crypto::{create_slot, open_slot, CryptoError, Keys, MasterSecret};
use blockproof_format::config::{DEFAULT_CHUNK_SIZE, DEFAULT_PACK_SIZE, DEFAULT_ZSTD_LEVEL};
use blockproof_format::Codec;
use blockproof_format::{
    Envelope, Id, IndexFile, KdfParams, KeySlot, ObjectMagic, RepoConfig, RepoHeader, Snapshot, FORMAT_VERSION,
};
use blockproof_store::{Backend, Kind};
use rand::RngCore;

use crate::pack_writer::seal_index;
use crate::scan::{stray_error, Skipped, SnapshotScan};
use crate::RepoError;

/// Settings of a new repository.
#[derive(Clone, Debug)]
pub struct InitOptions {
    pub chunk_size: u32,
    pub pack_size: u32,
    pub zstd_level: i32,
    pub compression: Codec,
    pub kdf: KdfParams,
}

impl Default for InitOptions {
    fn default() -> Self {
        InitOptions {
            chunk_size: DEFAULT_CHUNK_SIZE,
            pack_size: DEFAULT_PACK_SIZE,
            zstd_level: DEFAULT_ZSTD_LEVEL,
            compression: Codec::Lz4,
            kdf: KdfParams::DEFAULT,
        }
    }
}

/// A snapshot with its id.
#[derive(Clone, Debug)]
pub struct SnapshotInfo {
    pub id: Id,
    pub snapshot: Snapshot,
}

/// An unlocked repository.
pub struct Repository {
    backend: std::sync::Arc<dyn Backend>,
    keys: Keys,
    header: RepoHeader,
    config: RepoConfig,
    /// The master secret, kept to wrap it in new key slots.
    pub(crate) secret: MasterSecret,
    /// The key slot that opened this session.
    pub(crate) slot: String,
    /// Cancels every stage of the operations of this session (a lost lock does).
    cancel: blockproof_work::Cancel,
    /// The locks this session holds: index files and snapshots are written only while
    /// every one of them is certainly held (see [`crate::lock`]).
    pub(crate) leases: std::sync::Mutex<Vec<std::sync::Arc<crate::lock::Held>>>,
    /// Where the blob index keeps its local cache ([`crate::index_cache`]); none: the
    /// index is loaded into memory from the index files.
    index_cache: Option<std::path::PathBuf>,
}

fn kdf_err(e: CryptoError) -> RepoError {
    match e {
        CryptoError::WrongPassword => RepoError::WrongPassword,
        other => RepoError::Kdf(other.to_string()),
    }
}

impl Repository {
    /// Initialises a repository in an empty backend: writes the key slot, then the
    /// config (the config file is what makes a directory a repository).
    pub fn init(backend: Box<dyn Backend>, password: &[u8], opts: &InitOptions) -> Result<Self, RepoError> {
        if !backend.list(Kind::Config)?.is_empty() {
            return Err(RepoError::Invalid(format!("{} already holds a repository", backend.location())));
        }
        let config = RepoConfig {
            version: FORMAT_VERSION,
            chunk_size: opts.chunk_size,
            pack_size: opts.pack_size,
            zstd_level: opts.zstd_level,
            compression: opts.compression,
            created: humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
        };
        config.validate().map_err(|e| RepoError::Invalid(e.to_string()))?;
        let secret = MasterSecret::random();
        let slot = create_slot(&secret, password, opts.kdf).map_err(kdf_err)?;
        let slot_bytes = slot.encode();
        let slot_name = blake3::hash(&slot_bytes).to_hex().to_string();
        backend.write(Kind::Key, &slot_name, &slot_bytes)?;
        let keys = Keys::from_secret(&secret, config.version);
        let mut repo_id = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut repo_id);
        let header = RepoHeader { repo_id: Id(repo_id), version: config.version };
        let sealed = keys.seal(&header.ad(), &serde_json_vec(&config));
        backend.write(Kind::Config, "config", &header.encode(&sealed))?;
        Ok(Repository::assemble(backend, keys, header, config, secret, slot_name))
    }

    /// Opens a repository with a password, trying every key slot. Key slots are named by
    /// the hash of their bytes: a slot that no longer matches its name is damaged and is
    /// not tried. When no slot opens, a damaged slot is reported before "wrong password"
    /// (the password may well be right: it may have been that slot's). Stray files in
    /// `keys/` are ignored.
    pub fn open(backend: Box<dyn Backend>, password: &[u8]) -> Result<Self, RepoError> {
        let cfg_bytes = backend.read(Kind::Config, "config")?;
        let (header, sealed) =
            RepoHeader::decode(&cfg_bytes).map_err(|e| RepoError::corrupt("repository config", e))?;
        let mut slots: Vec<String> = backend.list(Kind::Key)?.into_iter().filter(|n| Id::is_file_name(n)).collect();
        slots.sort();
        if slots.is_empty() {
            return Err(RepoError::corrupt("repository", "has no key slots"));
        }
        let mut last_err = RepoError::WrongPassword;
        let mut damaged: Option<RepoError> = None;
        for name in slots {
            let bytes = match backend.read(Kind::Key, &name) {
                Ok(b) => b,
                // Removed by `key remove` since the listing.
                Err(e) if e.is_not_found() => continue,
                Err(e @ blockproof_store::StoreError::Io { .. }) => {
                    damaged.get_or_insert(RepoError::corrupt(format!("key slot {name} is unreadable"), e));
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            if let Err(detail) = check_name(&name, &bytes) {
                damaged.get_or_insert(RepoError::corrupt(
                    format!("key slot {name} is damaged"),
                    format!("{detail}; it cannot be opened, and no other key slot opens with this password"),
                ));
                continue;
            }
            let slot = match KeySlot::decode(&bytes) {
                Ok(s) => s,
                Err(e) => {
                    last_err = RepoError::corrupt(format!("key slot {name}"), e);
                    continue;
                }
            };
            match open_slot(&slot, password) {
                Ok(secret) => {
                    let keys = Keys::from_secret(&secret, header.version);
                    let plain = keys
                        .open(&header.ad(), sealed)
                        .map_err(|e| RepoError::corrupt("repository config", format!("settings: {e}")))?;
                    let config: RepoConfig = serde_json::from_slice(&plain)
                        .map_err(|e| RepoError::corrupt("repository config", format!("settings: {e}")))?;
                    config.validate().map_err(|e| RepoError::corrupt("repository config", e))?;
                    if config.version != header.version {
                        return Err(RepoError::corrupt(
                            "repository config",
                            format!("header says version {}, settings say {}", header.version, config.version),
                        ));
                    }
                    return Ok(Repository::assemble(backend, keys, header, config, secret, name));
                }
                Err(CryptoError::WrongPassword) => {}
                Err(e) => last_err = kdf_err(e),
            }
        }
        Err(damaged.unwrap_or(last_err))
    }

    pub fn backend(&self) -> &dyn Backend {
        self.backend.as_ref()
    }

    /// A shared handle on the backend, for threads that outlive a borrow.
    pub fn backend_arc(&self) -> std::sync::Arc<dyn Backend> {
        self.backend.clone()
    }

    /// A session whose backend observes its cancellation token
    /// ([`Backend::observe_cancel`]).
    fn assemble(
        backend: Box<dyn Backend>,
        keys: Keys,
        header: RepoHeader,
        config: RepoConfig,
        secret: MasterSecret,
        slot: String,
    ) -> Self {
        let cancel = blockproof_work::Cancel::new();
        backend.observe_cancel(&cancel);
        let leases = Default::default();
        Repository { backend: backend.into(), keys, header, config, secret, slot, cancel, leases, index_cache: None }
    }

    /// The cancellation token of this session's operations: every parallel stage stops
    /// when it is cancelled (by a lost lock, see [`crate::lock`], or by the caller).
    pub fn cancel(&self) -> &blockproof_work::Cancel {
        &self.cancel
    }

    /// Keeps the blob index's cache in `dir` (created when needed; one directory per
    /// repository): [`crate::BlobIndex`] then holds about 1.5 bytes per blob instead of
    /// 55 and starts without reading every index file. `None`: no cache.
    pub fn set_index_cache(&mut self, dir: Option<std::path::PathBuf>) {
        self.index_cache = dir;
    }

    /// The directory of the blob index's cache, if one is set.
    pub fn index_cache(&self) -> Option<&std::path::Path> {
        self.index_cache.as_deref()
    }

    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    pub fn config(&self) -> &RepoConfig {
        &self.config
    }

    pub fn id(&self) -> Id {
        self.header.repo_id
    }

    /// Reads, authenticates and decodes an index file, checking its name is its hash.
    pub fn read_index_file(&self, name: &str) -> Result<IndexFile, RepoError> {
        let what = || format!("index file {name}");
        if !Id::is_file_name(name) {
            return Err(stray_error(Kind::Index, name));
        }
        let bytes = self.backend.read(Kind::Index, name)?;
        check_name(name, &bytes).map_err(|d| RepoError::corrupt(what(), d))?;
        let (ad, sealed) = Envelope::decode(ObjectMagic::Index, &bytes).map_err(|e| RepoError::corrupt(what(), e))?;
        let plain = self.keys.open(ad, sealed).map_err(|e| RepoError::corrupt(what(), e))?;
        IndexFile::decode(&plain).map_err(|e| RepoError::corrupt(what(), e))
    }

    /// Writes an index file durably; returns its id. Under a lock, only while the lock is
    /// certainly held: checked before the write and after it. An index file written as
    /// the lock was lost is settled, not removed ([`Repository::settle_unleased_index`]),
    /// and the write fails.
    pub fn write_index_file(&self, index: &IndexFile) -> Result<Id, RepoError> {
        let bytes = seal_index(self, index);
        let id = Id(*blake3::hash(&bytes).as_bytes());
        self.leases_held()?;
        self.backend.write(Kind::Index, &id.to_hex(), &bytes)?;
        crate::hooks::pause_at("BLOCKPROOF_PAUSE_AFTER_INDEX_WRITE");
        if let Err(e) = self.leases_held() {
            self.settle_unleased_index(id, index);
            return Err(e);
        }
        Ok(id)
    }

    /// Settles an index file this session wrote as it lost its lock (a process stopped
    /// for longer than the stale age, right before or right after the write). The file
    /// was visible from the moment it was written, and others may have deduplicated
    /// against the blobs it lists since — their snapshots then reference blobs in these
    /// packs — so removing it could take blobs of committed snapshots out of the index.
    /// It stays while its packs exist (no snapshot of this session references them; gc
    /// collects them like any unreferenced pack). Packs that gc deleted meanwhile (the
    /// process was stopped before the write landed) are dropped from it: it is replaced
    /// by a file without them, or removed when none is left, and the replacement is
    /// checked the same way. Best effort: a store that fails here leaves a file naming a
    /// missing pack, which `check` reports and `repair` mends, never a lost blob.
    pub(crate) fn settle_unleased_index(&self, mut id: Id, index: &IndexFile) {
        let mut packs = index.packs.clone();
        loop {
            let before = packs.len();
            packs.retain(|(p, _)| !matches!(self.backend.size(Kind::Pack, &p.to_hex()), Err(e) if e.is_not_found()));
            if packs.len() == before {
                return;
            }
            let old = id;
            if !packs.is_empty() {
                let bytes = seal_index(self, &IndexFile { packs: packs.clone() });
                id = Id(*blake3::hash(&bytes).as_bytes());
                if self.backend.write(Kind::Index, &id.to_hex(), &bytes).is_err() {
                    return;
                }
            }
            let _ = self.backend.remove(Kind::Index, &old.to_hex());
            if packs.is_empty() {
                return;
            }
        }
    }

    /// Seals and writes a snapshot manifest. Call only after everything it references is
    /// durable: from this moment the snapshot is visible. Under a lock, only while it is
    /// certainly held (checked before and after the write; a snapshot written as the lock
    /// was lost is withdrawn).
    pub fn save_snapshot(&self, snapshot: &Snapshot) -> Result<Id, RepoError> {
        let header = ObjectMagic::Snapshot.header();
        let bytes = Envelope::encode(ObjectMagic::Snapshot, &self.keys.seal(&header, &snapshot.to_json()));
        let id = Id(*blake3::hash(&bytes).as_bytes());
        self.leases_held()?;
        self.backend.write(Kind::Snapshot, &id.to_hex(), &bytes)?;
        if let Err(e) = self.leases_held() {
            self.withdraw_snapshot(id, snapshot);
            return Err(e);
        }
        Ok(id)
    }

    /// Takes back a snapshot this session just wrote (it lost its lock: gc may have
    /// deleted what the snapshot references). A forget record is written first: another
    /// backup may have taken the snapshot as its parent meanwhile, and a parent that is
    /// missing without a record counts as deleted outside blockproof ([`crate::heads`]).
    pub fn withdraw_snapshot(&self, id: Id, snapshot: &Snapshot) {
        let record = crate::heads::Forgotten::new(id, &snapshot.vm, &snapshot.time, crate::heads::Removal::Withdrawn);
        let _ = self.record_forgotten(vec![record]);
        let _ = self.backend.remove(Kind::Snapshot, &id.to_hex());
    }

    /// Fails if this session has lost any lock it holds (see [`crate::lock`]).
    pub fn leases_held(&self) -> Result<(), RepoError> {
        let leases = self.leases.lock().unwrap_or_else(|e| e.into_inner()).clone();
        leases.iter().try_for_each(|h| h.check_age())
    }

    /// Seals `plain` as a small document of `kind` (lock or state) under `name`,
    /// replacing any previous one (atomically).
    pub fn write_doc(&self, kind: Kind, magic: ObjectMagic, name: &str, plain: &[u8]) -> Result<(), RepoError> {
        write_doc(self.backend.as_ref(), &self.keys, kind, magic, name, plain)
    }

    /// Reads and opens a document written by [`Repository::write_doc`].
    pub fn read_doc(&self, kind: Kind, magic: ObjectMagic, name: &str) -> Result<Vec<u8>, RepoError> {
        let what = || format!("{} {name}", magic.name());
        let bytes = self.backend.read(kind, name)?;
        let (ad, sealed) = Envelope::decode(magic, &bytes).map_err(|e| RepoError::corrupt(what(), e))?;
        self.keys.open(ad, sealed).map_err(|e| RepoError::corrupt(what(), e))
    }

    /// Loads one snapshot by its full id.
    pub fn load_snapshot(&self, name: &str) -> Result<SnapshotInfo, RepoError> {
        let what = || format!("snapshot {name}");
        if !Id::is_file_name(name) {
            return Err(stray_error(Kind::Snapshot, name));
        }
        let bytes = self.backend.read(Kind::Snapshot, name)?;
        check_name(name, &bytes).map_err(|d| RepoError::corrupt(what(), d))?;
        let (ad, sealed) =
            Envelope::decode(ObjectMagic::Snapshot, &bytes).map_err(|e| RepoError::corrupt(what(), e))?;
        let plain = self.keys.open(ad, sealed).map_err(|e| RepoError::corrupt(what(), e))?;
        let snapshot = Snapshot::from_json(&plain).map_err(|e| RepoError::corrupt(what(), e))?;
        let id = name.parse().map_err(|e| RepoError::corrupt(what(), e))?;
        Ok(SnapshotInfo { id, snapshot })
    }

    /// All snapshots, oldest first (by time, then id), strictly: a damaged snapshot file
    /// or a stray file in `snapshots/` is an error. For operations that must see every
    /// snapshot to be safe (garbage collection, forget by policy); readers use
    /// [`Repository::scan_snapshots`]. A snapshot removed (by `forget`) between listing
    /// and reading is skipped.
    pub fn snapshots(&self) -> Result<Vec<SnapshotInfo>, RepoError> {
        Ok(self.read_snapshots(true)?.snapshots)
    }

    /// The readable snapshots, oldest first, skipping stray and damaged files (listed in
    /// [`SnapshotScan::skipped`] for a warning). Storage failures are still errors.
    pub fn scan_snapshots(&self) -> Result<SnapshotScan, RepoError> {
        self.read_snapshots(false)
    }

    /// Resolves a snapshot reference: a full id, a unique id prefix, or `VM:latest`.
    /// `VM:latest` is strict (see [`Repository::snapshots`]): for operations that delete.
    pub fn resolve_snapshot(&self, reference: &str) -> Result<SnapshotInfo, RepoError> {
        Ok(self.resolve(reference, true)?.0)
    }

    /// Resolves a snapshot reference for reading it (restore, listing files, serving):
    /// `VM:latest` skips stray and damaged snapshot files and returns them for a warning
    /// (the latest readable snapshot may then not be the newest).
    pub fn resolve_snapshot_for_reading(&self, reference: &str) -> Result<(SnapshotInfo, Skipped), RepoError> {
        self.resolve(reference, false)
    }

    fn resolve(&self, reference: &str, strict: bool) -> Result<(SnapshotInfo, Skipped), RepoError> {
        if let Some(parsed) = crate::selector::parse(reference) {
            let (vm, selector) = parsed?;
            let SnapshotScan { snapshots, mut skipped } = self.read_snapshots(strict)?;
            let damaged = skipped.damaged.len();
            let any = snapshots.iter().any(|s| s.snapshot.vm == vm);
            return match crate::selector::select(snapshots, vm, &selector) {
                Some(s) => {
                    if damaged > 0 {
                        let what = match selector {
                            crate::selector::Selector::Latest(0) => "the latest readable snapshot".to_string(),
                            _ => "chosen among the readable snapshots".to_string(),
                        };
                        skipped.notes.push(format!(
                            "{reference} is {what}, {} of {}: a damaged one may be newer",
                            s.id.short(),
                            s.snapshot.time
                        ));
                    }
                    Ok((s, skipped))
                }
                // Not the caller's mistake: its snapshots may be among the damaged ones.
                None if damaged > 0 => Err(RepoError::corrupt(
                    format!("no readable snapshot of vm {vm:?} matches {}", crate::selector::describe(&selector)),
                    format!("{damaged} damaged snapshot file(s) skipped"),
                )),
                None if !any => Err(RepoError::NotFound(format!("no snapshot of vm {vm:?}"))),
                None => Err(RepoError::NotFound(format!(
                    "no snapshot of vm {vm:?} matches {}",
                    crate::selector::describe(&selector)
                ))),
            };
        }
        let lower = reference.to_ascii_lowercase();
        if lower.is_empty() || !lower.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(RepoError::Invalid(format!(
                "invalid snapshot reference {reference:?}: use an id, an id prefix, VM:latest, VM:latest~N, \
                 VM:tag=TAG or VM:before=TIME"
            )));
        }
        // Stray files are never snapshots, whatever their name starts with.
        let names: Vec<String> = self
            .backend
            .list(Kind::Snapshot)?
            .into_iter()
            .filter(|n| Id::is_file_name(n) && n.starts_with(&lower))
            .collect();
        match names.as_slice() {
            [one] => Ok((self.load_snapshot(one)?, Skipped::default())),
            [] => Err(RepoError::NotFound(format!("no snapshot matches {reference:?}"))),
            _ => Err(RepoError::Invalid(format!(
                "snapshot prefix {reference:?} is ambiguous ({} matches); give more digits",
                names.len()
            ))),
        }
    }
}

/// Seals and writes a small document (see [`Repository::write_doc`]).
pub fn write_doc(
    backend: &dyn Backend,
    keys: &Keys,
    kind: Kind,
    magic: ObjectMagic,
    name: &str,
    plain: &[u8],
) -> Result<(), RepoError> {
    let header = magic.header();
    let bytes = Envelope::encode(magic, &keys.seal(&header, plain));
    backend.write(kind, name, &bytes)?;
    Ok(())
}

/// Checks that a file named by the hash of its bytes still hashes to its name.
/// Files named by the hash of their bytes must still hash to their name.
pub fn check_name(name: &str, bytes: &[u8]) -> Result<(), String> {
    let actual = blake3::hash(bytes).to_hex();
    if actual.as_str() == name {
        Ok(())
    } else {
        Err(format!("content hash {} does not match its name (file damaged or truncated)", &actual[..16]))
    }
}

fn serde_json_vec(config: &RepoConfig) -> Vec<u8> {
    serde_json::to_vec(config).expect("config serializes")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{BlobCodec, BlobIndex, BlobReader, PackWriter, TreeReader, TreeWriter};
    use blockproof_format::manifest::ReadMode;
    use blockproof_format::{BlobKind, DiskEntry, SnapshotStatus};
    use blockproof_store::LocalBackend;

    fn fast() -> InitOptions {
        InitOptions { kdf: KdfParams::MIN, pack_size: 64 * 1024, ..InitOptions::default() }
    }

    #[test]
    fn init_open_and_wrong_password() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("r");
        let repo = Repository::init(Box::new(LocalBackend::create(&root).unwrap()), b"pw", &fast()).unwrap();
        let id = repo.id();
        let again = Repository::open(Box::new(LocalBackend::open(&root).unwrap()), b"pw").unwrap();
        assert_eq!(again.id(), id);
        assert_eq!(again.config(), repo.config());
        assert!(matches!(
            Repository::open(Box::new(LocalBackend::open(&root).unwrap()), b"nope"),
            Err(RepoError::WrongPassword)
        ));
        assert!(Repository::init(Box::new(LocalBackend::open(&root).unwrap()), b"pw", &fast()).is_err());
    }

    /// Key slots are named by the hash of their bytes: one that no longer matches is
    /// damaged, reported as such (not as a wrong password) when no other slot opens.
    #[test]
    fn a_damaged_key_slot_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("r");
        let repo = Repository::init(Box::new(LocalBackend::create(&root).unwrap()), b"one", &fast()).unwrap();
        let first = repo.current_slot().to_string();
        repo.add_key(b"two", KdfParams::MIN).unwrap();
        repo.backend().write(Kind::Key, "README", b"not a key slot").unwrap();
        let open = |pw: &[u8]| Repository::open(Box::new(LocalBackend::open(&root).unwrap()), pw);
        assert!(open(b"one").is_ok(), "a stray file in keys/ is ignored");
        let mut bytes = repo.backend().read(Kind::Key, &first).unwrap();
        bytes[80] ^= 0x01;
        std::fs::write(root.join("keys").join(&first), &bytes).unwrap();
        let err = open(b"one").err().unwrap();
        assert!(matches!(err, RepoError::Corrupt { .. }), "{err}");
        assert!(err.to_string().starts_with(&format!("key slot {first} is damaged")), "{err}");
        assert!(open(b"two").is_ok(), "the other slot still opens");
    }

    #[test]
    fn blobs_trees_and_snapshots_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let repo =
            Repository::init(Box::new(LocalBackend::create(dir.path().join("r")).unwrap()), b"pw", &fast()).unwrap();
        let mut codec = BlobCodec::for_repo(&repo);
        let mut writer = PackWriter::new(&repo);
        // 3000 chunks: three levels with fanout 32, several packs of 64 KiB.
        let chunks: Vec<Vec<u8>> = (0..3000u32).map(|i| format!("chunk {i} ").repeat(50).into_bytes()).collect();
        let mut ids = Vec::new();
        for (i, c) in chunks.iter().enumerate() {
            let id = if i % 10 == 0 { Id::ZERO } else { repo.keys().blob_id(c) };
            if !id.is_zero() {
                writer.add(codec.seal(BlobKind::Data, id, c)).unwrap();
            }
            ids.push(id);
        }
        let mut pages = Vec::new();
        let mut store = |p: &[Id]| -> Result<Id, RepoError> {
            let bytes = blockproof_format::tree::encode_page(p);
            let id = repo.keys().blob_id(&bytes);
            pages.push(codec.seal(BlobKind::Tree, id, &bytes));
            Ok(id)
        };
        let mut tree = TreeWriter::new(ids.len() as u64, 32);
        for id in &ids {
            tree.push(*id, &mut store).unwrap();
        }
        let root = tree.finish(&mut store).unwrap();
        for p in pages {
            writer.add(p).unwrap();
        }
        let (packs, stats) = writer.finish().unwrap();
        assert!(stats.packs > 1 && stats.index_files.len() == 1, "{stats:?}");
        assert_eq!(packs.len() as u64, stats.packs);

        let index = BlobIndex::load(&repo).unwrap();
        let reader = BlobReader::new(&repo, &index);
        let mut tr = TreeReader::new(&reader, root, ids.len() as u64, 32).unwrap();
        for (i, id) in ids.iter().enumerate().rev().step_by(7) {
            assert_eq!(tr.chunk(i as u64).unwrap(), *id);
            if !id.is_zero() {
                assert_eq!(reader.read(id, BlobKind::Data).unwrap(), chunks[i]);
                assert!(reader.read(id, BlobKind::Tree).is_err(), "kind is checked");
            }
        }
        let mut visited = 0;
        tr.visit_pages(&mut |_| visited += 1).unwrap();
        assert_eq!(visited, 94 + 3 + 1, "leaves, level-1 pages and the root");

        let snap = Snapshot {
            vm: "vm".into(),
            time: "2026-11-22T12:00:00.000001Z".into(),
            hostname: "h".into(),
            tags: vec![],
            status: SnapshotStatus::Ok,
            disks: vec![DiskEntry {
                id: "d".into(),
                size: 3000 * 64,
                chunk_size: 65536,
                index_root: root,
                index_fanout: 32,
                parent: None,
                source: "x".into(),
                cbt: "none".into(),
                cbt_state: None,
                mode: ReadMode::Full,
                full_reason: None,
                stats: Default::default(),
                mismatches: vec![],
                run: 1,
                confirm_root: None,
                coverage: None,
                next_full: None,
            }],
            program: "test".into(),
            copied_from: None,
            machine: None,
        };
        let id = repo.save_snapshot(&snap).unwrap();
        assert_eq!(repo.load_snapshot(&id.to_hex()).unwrap().snapshot, snap);
        assert_eq!(repo.resolve_snapshot(&id.to_hex()[..6]).unwrap().id, id);
        assert_eq!(repo.resolve_snapshot("vm:latest").unwrap().id, id);
        assert!(matches!(repo.resolve_snapshot("other:latest"), Err(RepoError::NotFound(_))));
        assert!(matches!(repo.resolve_snapshot("zz"), Err(RepoError::Invalid(_))));
    }

    /// An index file written as the lock was lost keeps every pack that still exists
    /// (others may have deduplicated against them while it was visible) and loses only the
    /// packs gc deleted meanwhile.
    #[test]
    fn an_index_file_written_as_the_lock_was_lost_keeps_the_packs_that_exist() {
        let dir = tempfile::tempdir().unwrap();
        let repo =
            Repository::init(Box::new(LocalBackend::create(dir.path().join("r")).unwrap()), b"pw", &fast()).unwrap();
        let mut codec = BlobCodec::for_repo(&repo);
        let mut pack = |fill: u8| {
            let data = vec![fill; 4096];
            let mut writer = PackWriter::new(&repo);
            writer.add(codec.seal(BlobKind::Data, repo.keys().blob_id(&data), &data)).unwrap();
            writer.finish().unwrap().0.remove(0)
        };
        let packs: Vec<_> = (1..=3).map(&mut pack).collect();
        // Only the file under test lists them.
        for name in repo.backend().list(Kind::Index).unwrap() {
            repo.backend().remove(Kind::Index, &name).unwrap();
        }
        let listings = || -> Vec<Vec<Id>> {
            let names = repo.backend().list(Kind::Index).unwrap();
            names.iter().map(|n| repo.read_index_file(n).unwrap().packs.into_iter().map(|(p, _)| p).collect()).collect()
        };
        let file = IndexFile { packs: packs.clone() };
        let id = repo.write_index_file(&file).unwrap();
        let before = listings();

        // Every pack there: the file stays as it is.
        repo.settle_unleased_index(id, &file);
        assert_eq!(listings(), before);

        // One deleted by gc: replaced by a file of the other two.
        repo.backend().remove(Kind::Pack, &packs[1].0.to_hex()).unwrap();
        repo.settle_unleased_index(id, &file);
        let now = listings();
        assert!(!now.iter().any(|l| l.contains(&packs[1].0)), "{now:?}");
        assert!(now.contains(&vec![packs[0].0, packs[2].0]), "{now:?}");
        assert_eq!(now.len(), before.len());

        // All gone: no file of it is left.
        let file = IndexFile { packs: vec![packs[0].clone(), packs[2].clone()] };
        let id = repo.write_index_file(&file).unwrap();
        for (p, _) in &file.packs {
            repo.backend().remove(Kind::Pack, &p.to_hex()).unwrap();
        }
        repo.settle_unleased_index(id, &file);
        assert!(!repo.backend().list(Kind::Index).unwrap().contains(&id.to_hex()));
    }
}
