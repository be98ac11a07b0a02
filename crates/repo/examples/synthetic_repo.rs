//! Grows a real repository into a synthetic one of N more blobs, for the scale benchmark
//! (`bench/scale.sh`): what a repository holding many backups looks like to every command
//! that loads the blob index, without storing the data.
//!
//! ```text
//! BLOCKPROOF_PASSWORD=... cargo run --release -p blockproof-repo --example synthetic_repo -- REPO BLOBS [SEED=1]
//! ```
//!
//! REPO is an existing directory repository (made with `blockproof init`, usually holding
//! a small real vm's snapshots, which backup, restore, copy and gc then work on). Added:
//!
//! - BLOBS synthetic data blobs (random ids; sealed lengths between 8 KiB and one chunk,
//!   as compressed and incompressible chunks give) in synthetic packs laid out as the
//!   pack writer lays them out (closed once they reach the config's pack size), listed by
//!   real index files, 64 packs each ([`Repository::write_index_file`]: sealed, named by
//!   their hash, written durably like a backup's);
//! - each synthetic pack as a *sparse* file of exactly the size its index listing gives
//!   it (FORMAT §9): `check` (structure) compares pack sizes with the index and finds
//!   them whole; only `check --read-data`, `repair` and reading the blobs see zeros;
//! - one snapshot of vm `synthetic`, disk `synthetic0` of BLOBS chunks, whose fixed index
//!   tree lists every synthetic blob (its tree pages are real blobs, in real packs, 32
//!   bytes per blob), and that vm's head: so every synthetic blob is referenced, `check`
//!   walks all of them, and `gc` marks all of them and deletes nothing — a repository in
//!   steady state. Restoring `synthetic:latest` fails on the first chunk (zeros do not
//!   authenticate); nothing else reads a synthetic blob.
//!
//! On disk that costs about 50 bytes per blob of index files and 32 of tree pages. Prints
//! what it added and how long it took.

use std::fs::{create_dir_all, File};
use std::time::{Instant, SystemTime};

use blockproof_format::manifest::{DiskStats, ReadMode};
use blockproof_format::pack::PACK_HEADER_LEN;
use blockproof_format::tree::{encode_page, DEFAULT_FANOUT};
use blockproof_format::{
    BlobEntry, BlobKind, Codec, Compression, DiskEntry, Id, IndexFile, Snapshot, SnapshotStatus, SEAL_OVERHEAD,
};
use blockproof_repo::index::pack_size;
use blockproof_repo::{BlobCodec, Head, PackWriter, Recorded, RepoError, Repository, TreeWriter};
use blockproof_store::{Kind, LocalBackend};
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};

/// The vm and disk of the snapshot that references every synthetic blob.
const VM: &str = "synthetic";
const DISK: &str = "synthetic0";
/// Packs per index file, as a backup writes them (FORMAT §10).
const PACKS_PER_INDEX_FILE: usize = 64;
/// The smallest sealed body of a synthetic blob (a chunk that compressed well).
const MIN_BODY: u32 = 8 << 10;

/// What [`generate`] added.
#[derive(Debug)]
struct Added {
    packs: u64,
    index_files: u64,
    tree_packs: u64,
    snapshot: Id,
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (Some(path), Some(blobs)) = (args.first(), args.get(1).and_then(|n| n.parse::<u64>().ok())) else {
        eprintln!("usage: synthetic_repo REPO BLOBS [SEED=1]   (BLOCKPROOF_PASSWORD in the environment)");
        std::process::exit(2);
    };
    let seed: u64 = args.get(2).map_or(1, |s| s.parse().expect("SEED is a number"));
    let password = std::env::var("BLOCKPROOF_PASSWORD").unwrap_or_else(|_| {
        eprintln!("synthetic_repo: set BLOCKPROOF_PASSWORD");
        std::process::exit(2);
    });
    let started = Instant::now();
    let result = LocalBackend::open(path)
        .map_err(RepoError::from)
        .and_then(|b| Repository::open(Box::new(b), password.as_bytes()))
        .and_then(|repo| generate(&repo, &LocalBackend::open(path)?, blobs, seed));
    match result {
        Ok(a) => println!(
            "added {blobs} synthetic blobs in {} packs, {} index files; vm {VM} snapshot {} ({} pack(s) of tree \
             pages) in {:.1} s",
            a.packs,
            a.index_files,
            a.snapshot.short(),
            a.tree_packs,
            started.elapsed().as_secs_f64()
        ),
        Err(e) => {
            eprintln!("synthetic_repo: {e}");
            std::process::exit(1);
        }
    }
}

/// Adds `blobs` synthetic blobs, their sparse packs and index files, and the snapshot that
/// references them, to the repository `repo` stored in `dir`.
fn generate(repo: &Repository, dir: &LocalBackend, blobs: u64, seed: u64) -> Result<Added, RepoError> {
    if blobs == 0 {
        return Err(RepoError::Invalid("BLOBS must be at least 1".into()));
    }
    let config = repo.config();
    let chunk = config.chunk_size;
    let compressed = match config.compression {
        Codec::Zstd => Compression::Zstd,
        Codec::Lz4 => Compression::Lz4,
    };
    let mut rng = StdRng::seed_from_u64(seed);
    let mut tree = TreeWriter::new(blobs, DEFAULT_FANOUT);
    let mut codec = BlobCodec::for_repo(repo);
    let mut pages = PackWriter::new(repo);
    let mut store = |ids: &[Id]| -> Result<Id, RepoError> {
        let plain = encode_page(ids);
        let id = codec.keys().blob_id(&plain);
        pages.add(codec.seal(BlobKind::Tree, id, &plain))?;
        Ok(id)
    };
    let mut added = Added { packs: 0, index_files: 0, tree_packs: 0, snapshot: Id::ZERO };
    let mut pending: Vec<(Id, Vec<BlobEntry>)> = Vec::with_capacity(PACKS_PER_INDEX_FILE);
    let mut made = 0u64;
    while made < blobs {
        let mut entries = Vec::new();
        let mut end = PACK_HEADER_LEN as u64;
        while made < blobs && end < u64::from(config.pack_size) {
            let id = random_id(&mut rng);
            let body = rng.gen_range(MIN_BODY.min(chunk)..=chunk);
            // What the writer keeps compressed saves more than 1/32 (FORMAT §8).
            let (compression, body) =
                if body < chunk - chunk / 32 { (compressed, body) } else { (Compression::None, chunk) };
            let length = body + SEAL_OVERHEAD as u32;
            entries.push(BlobEntry { kind: BlobKind::Data, compression, id, offset: end, length, raw_length: chunk });
            end += u64::from(length);
            made += 1;
            tree.push(id, &mut store)?;
        }
        let pack = random_id(&mut rng);
        let file = dir.path(Kind::Pack, &pack.to_hex())?;
        let sparse = || -> std::io::Result<()> {
            create_dir_all(file.parent().expect("a pack path has a directory"))?;
            File::create(&file)?.set_len(pack_size(entries.len() as u64, end))
        };
        sparse().map_err(|e| RepoError::Invalid(format!("{}: {e}", file.display())))?;
        pending.push((pack, entries));
        added.packs += 1;
        if pending.len() == PACKS_PER_INDEX_FILE {
            repo.write_index_file(&IndexFile { packs: std::mem::take(&mut pending) })?;
            added.index_files += 1;
        }
    }
    if !pending.is_empty() {
        repo.write_index_file(&IndexFile { packs: pending })?;
        added.index_files += 1;
    }
    let root = tree.finish(&mut store)?;
    let (written, stats) = pages.finish()?;
    added.tree_packs = written.len() as u64;
    added.index_files += stats.index_files.len() as u64;

    let disk = DiskEntry {
        id: DISK.into(),
        size: blobs * u64::from(chunk),
        chunk_size: chunk,
        index_root: root,
        index_fanout: DEFAULT_FANOUT,
        parent: None,
        source: "synthetic".into(),
        cbt: "none".into(),
        cbt_state: None,
        mode: ReadMode::Full,
        full_reason: Some("synthetic".into()),
        stats: DiskStats { new_chunks: blobs, new_bytes: blobs * u64::from(chunk), ..DiskStats::default() },
        mismatches: Vec::new(),
        run: 1,
        confirm_root: None,
        coverage: None,
        next_full: None,
    };
    let snapshot = Snapshot {
        vm: VM.into(),
        time: humantime::format_rfc3339_micros(SystemTime::now()).to_string(),
        hostname: "synthetic".into(),
        tags: vec!["synthetic".into()],
        status: SnapshotStatus::Ok,
        disks: vec![disk],
        program: format!("blockproof-repo {} synthetic_repo example", env!("CARGO_PKG_VERSION")),
        copied_from: None,
        machine: None,
    }
    .for_version(config.version);
    added.snapshot = repo.save_snapshot(&snapshot)?;
    // The vm's head, as a backup's commit records it (FORMAT §20a): `check` finds the
    // snapshot set whole.
    let recorded = Recorded::of(added.snapshot, &snapshot);
    let mut head = Head::new(VM, recorded.clone());
    head.seq = 1;
    head.disks.insert(DISK.into(), recorded);
    repo.write_head(&head)?;
    Ok(added)
}

/// A random blob or pack id (never the zero id, which names no blob).
fn random_id(rng: &mut StdRng) -> Id {
    let mut id = [0u8; 32];
    rng.fill_bytes(&mut id);
    id[0] |= 1;
    Id(id)
}

#[cfg(test)]
mod tests {
    use super::*;
    use blockproof_format::tree::chunk_count;
    use blockproof_format::KdfParams;
    use blockproof_repo::{BlobIndex, BlobReader, InitOptions, TreeReader};

    #[test]
    fn a_synthetic_repository_is_structurally_whole_and_references_every_blob() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("repo");
        let opts = InitOptions { kdf: KdfParams { m_cost_kib: 1024, t_cost: 1, p_cost: 1 }, ..Default::default() };
        let repo = Repository::init(Box::new(LocalBackend::create(&path).unwrap()), b"pw", &opts).unwrap();
        let blobs = 3000;
        let added = generate(&repo, &LocalBackend::open(&path).unwrap(), blobs, 7).unwrap();
        // Packs of about 16 MiB of blobs between 8 KiB and 64 KiB: several, each indexed.
        assert!(added.packs >= 4, "{added:?}");
        let index = BlobIndex::load(&repo).unwrap();
        // 3000 data blobs, 3 leaf pages and the root.
        assert_eq!(index.len() as u64, blobs + 4);
        assert_eq!(index.files().len() as u64, added.index_files);
        // Every pack file has exactly the size its index listing gives it (what check tests).
        let sizes: std::collections::HashMap<String, u64> =
            repo.backend().list_sizes(Kind::Pack).unwrap().into_iter().collect();
        assert_eq!(sizes.len(), index.packs().len());
        for pack in index.packs() {
            assert_eq!(Some(sizes[&pack.to_hex()]), index.expected_pack_size(pack), "pack {pack}");
        }
        // The snapshot's tree reads back and lists every synthetic blob once, in the index.
        let snapshot = repo.snapshots().unwrap().into_iter().find(|s| s.id == added.snapshot).unwrap();
        let disk = &snapshot.snapshot.disks[0];
        assert_eq!((snapshot.snapshot.vm.as_str(), chunk_count(disk.size, disk.chunk_size)), (VM, blobs));
        let reader = BlobReader::new(&repo, &index);
        let mut tree = TreeReader::new(&reader, disk.index_root, blobs, disk.index_fanout).unwrap();
        let mut listed = std::collections::HashSet::new();
        for page in 0..tree.leaf_pages() {
            for id in tree.leaf(page).unwrap() {
                let (_, entry) = index.get(id).unwrap();
                assert_eq!((entry.kind, entry.raw_length), (BlobKind::Data, disk.chunk_size));
                listed.insert(*id);
            }
        }
        assert_eq!(listed.len() as u64, blobs);
        // The vm's head names it.
        let head = repo.read_head(VM).unwrap().unwrap();
        assert_eq!(head.latest.snapshot, added.snapshot);
    }
}
