//! Damaged repositories, beyond a flipped byte in any pack (corruption.rs): a damaged
//! chunk is pinned to the exact disk range it holds and spares the snapshots that do not
//! use it; and damage of any kind to any file of the repository is an error, never a
//! panic and never wrong bytes (DESIGN.md §8).

mod harness;

use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use harness::{hash, mixed_image, Dir};
use rand::{Rng, RngCore, SeedableRng};

const CHUNK: usize = 64 << 10;

/// Overwrites `count` distinct whole chunks with random data; returns their numbers.
fn rewrite_chunks(img: &mut [u8], count: usize, seed: u64) -> BTreeSet<usize> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut chosen = BTreeSet::new();
    while chosen.len() < count {
        chosen.insert(rng.gen_range(0..img.len() / CHUNK));
    }
    for &c in &chosen {
        rng.fill_bytes(&mut img[c * CHUNK..(c + 1) * CHUNK]);
    }
    chosen
}

/// The `A..B` after "bytes " in an error line.
fn byte_range(line: &str) -> Option<(u64, u64)> {
    let rest = &line[line.find("bytes ")? + "bytes ".len()..];
    let token: String = rest.chars().take_while(|c| c.is_ascii_digit() || *c == '.').collect();
    let (a, b) = token.split_once("..")?;
    Some((a.parse().ok()?, b.parse().ok()?))
}

fn partial_files(dir: &Path) -> Vec<PathBuf> {
    fs::read_dir(dir).unwrap().flatten().map(|e| e.path()).filter(|p| p.to_string_lossy().contains("partial")).collect()
}

/// The pack written by an incremental holds only the rewritten chunks (and the index page
/// written after them). A flipped byte in its middle hits one of those chunks: restore of
/// the incremental fails naming exactly that chunk's range; the first snapshot, which
/// does not use the pack, still restores bit-exact.
#[test]
fn damaged_chunk_of_an_incremental_names_its_range_and_spares_older_snapshots() {
    let dir = Dir::new();
    dir.init();
    let img = dir.join("d.img");
    let mut data = mixed_image(32 << 20, 61);
    fs::write(&img, &data).unwrap();
    let v1 = hash(&img);
    let first = dir.backup("v", &[("d", &img)]);
    let old_packs: BTreeSet<_> = dir.packs().into_iter().collect();

    let changed = rewrite_chunks(&mut data, 40, 62);
    fs::write(&img, &data).unwrap();
    let second = dir.backup("v", &[("d", &img)]);
    assert_eq!(second["disks"][0]["new_chunks"], 40, "{second}");
    let new_packs: Vec<_> = dir.packs().into_iter().filter(|p| !old_packs.contains(p)).collect();
    assert_eq!(new_packs.len(), 1, "the incremental wrote one pack: {new_packs:?}");
    let pack = &new_packs[0];
    let name = pack.file_name().unwrap().to_str().unwrap().to_string();

    let f = fs::OpenOptions::new().read(true).write(true).open(pack).unwrap();
    let at = f.metadata().unwrap().len() / 2;
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, at).unwrap();
    f.write_all_at(&[b[0] ^ 0x80], at).unwrap();

    let (stdout, stderr) = dir.repo_cmd("check").arg("--read-data").code(1);
    assert!(stderr.contains(&name), "check --read-data names pack {name}:\n{stdout}\n{stderr}");

    let (s1, s2) = (first["snapshot"].as_str().unwrap(), second["snapshot"].as_str().unwrap());
    assert_eq!(hash(&dir.restore(s1, "d", "first.img")), v1, "the first snapshot does not use the damaged pack");

    let target = dir.join("second.img");
    let line = dir.repo_cmd("restore").arg(s2).args(["--disk", "d", "--to"]).arg(&target).fails_with_one_line(1);
    let (from, to) = byte_range(&line).unwrap_or_else(|| panic!("no byte range in: {line}"));
    let chunk = (from / CHUNK as u64) as usize;
    assert!(
        from % CHUNK as u64 == 0 && to == from + CHUNK as u64 && changed.contains(&chunk),
        "range {from}..{to} is not one of the rewritten chunks {changed:?}: {line}"
    );
    assert!(!target.exists(), "a failed restore leaves no target file");
    assert!(partial_files(dir.path()).is_empty(), "{:?}", partial_files(dir.path()));
}

type Damage = (&'static str, fn(&Path));

const DAMAGES: [Damage; 5] = [
    ("flip a byte in the middle", |p| {
        let mut b = fs::read(p).unwrap();
        let mid = b.len() / 2;
        b[mid] ^= 0x04;
        fs::write(p, b).unwrap();
    }),
    ("flip a byte of the magic", |p| {
        let mut b = fs::read(p).unwrap();
        b[1] ^= 0x01;
        fs::write(p, b).unwrap();
    }),
    ("truncate to half", |p| {
        let b = fs::read(p).unwrap();
        fs::write(p, &b[..b.len() / 2]).unwrap();
    }),
    ("empty", |p| fs::write(p, b"").unwrap()),
    ("delete", |p| fs::remove_file(p).unwrap()),
];

/// Every file of a repository (config, key slot, packs, index files, snapshots, state),
/// every kind of damage: `check --read-data` reports it (exit 1; damage to a state
/// document is a warning, to the confirmation page summaries — a cache — nothing);
/// `restore` of each snapshot
/// either fails with one line and leaves no file, or returns exactly the right bytes;
/// `snapshots` never panics. Each file is put back before the next damage.
#[test]
fn any_damage_to_any_file_is_an_error_never_a_panic_or_wrong_bytes() {
    let dir = Dir::new();
    // Small packs: the snapshots' chunks spread over several of them.
    dir.repo_cmd("init").args(["--kdf-memory", "8", "--kdf-iterations", "1", "--pack-size", "512KiB"]).ok();
    let img = dir.join("d.img");
    let mut data = mixed_image(3 << 20, 63);
    fs::write(&img, &data).unwrap();
    let mut versions = vec![data.clone()];
    let mut snaps = vec![dir.backup("v", &[("d", &img)])["snapshot"].as_str().unwrap().to_string()];
    rewrite_chunks(&mut data, 6, 64);
    fs::write(&img, &data).unwrap();
    versions.push(data.clone());
    snaps.push(dir.backup("v", &[("d", &img)])["snapshot"].as_str().unwrap().to_string());
    dir.repo_cmd("check").arg("--read-data").ok();

    let files = dir.repo_files();
    let kinds = ["config", "keys/", "data/", "index/", "snapshots/"];
    for kind in kinds {
        let n = files.iter().filter(|f| f.strip_prefix(dir.repo()).unwrap().starts_with(kind)).count();
        assert!(n > 0, "the repository has a {kind} file: {files:?}");
    }
    let target = dir.join("out.img");
    for file in &files {
        let rel = file.strip_prefix(dir.repo()).unwrap().display().to_string();
        let original = fs::read(file).unwrap();
        for (what, damage) in DAMAGES {
            let case = format!("{rel}: {what}");
            damage(file);

            // A deleted snapshot file is an error too: the vm's head names the latest, and
            // the latest names the first as its parent (docs/FORMAT.md §20a).
            let deleted = what == "delete" && rel.starts_with("snapshots/");
            // State documents (the data-check rotation, the vm's head) are advisory:
            // damage there is a warning (the rotation starts over, the head is rewritten
            // by the next backup).
            let advisory = rel.starts_with("state/");
            let out = dir.repo_cmd("check").args(["--read-data"]).output();
            let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
            let expect = if advisory { 0 } else { 1 };
            // The confirmation page summaries are a cache (docs/FORMAT.md §19): damage there
            // is not even a warning; the next backup reads the pages instead.
            let cache = rel.starts_with("state/confirm-");
            if advisory && what != "delete" && !cache {
                let topic = if rel.starts_with("state/head-") { "record of a vm" } else { "rotation" };
                assert!(stderr.contains(topic), "{case}: damage to a state document is reported: {stderr}");
            }
            if deleted {
                assert!(stderr.contains("outside blockproof"), "{case}: {stderr}");
            }
            assert_eq!(out.status.code(), Some(expect), "{case}: check --read-data:\n{stdout}\n{stderr}");
            assert!(!stderr.contains("panicked"), "{case}: check panicked: {stderr}");

            let out = dir.repo_cmd("snapshots").output();
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(matches!(out.status.code(), Some(0 | 1)), "{case}: snapshots exited {:?}: {stderr}", out.status);

            for (snap, version) in snaps.iter().zip(&versions) {
                let out = dir.repo_cmd("restore").arg(snap).args(["--disk", "d", "--to"]).arg(&target).output();
                let stderr = String::from_utf8_lossy(&out.stderr).to_string();
                match out.status.code() {
                    Some(0) => {
                        assert!(
                            fs::read(&target).unwrap() == *version,
                            "{case}: restore of {snap} returned wrong bytes"
                        );
                        fs::remove_file(&target).unwrap();
                    }
                    Some(1) => {
                        // One error line, after warnings about the damaged files skipped.
                        let (errors, others): (Vec<&str>, Vec<&str>) =
                            stderr.lines().partition(|l| l.starts_with("blockproof: error: "));
                        assert_eq!(errors.len(), 1, "{case}: one error line expected: {stderr}");
                        assert!(others.iter().all(|l| l.starts_with("blockproof: warning: ")), "{case}: {stderr}");
                        assert!(
                            stderr.ends_with(&format!("{}\n", errors[0])),
                            "{case}: the error comes last: {stderr}"
                        );
                        assert!(!target.exists(), "{case}: a failed restore left {}", target.display());
                    }
                    // Only a deleted snapshot file may look like an unknown snapshot.
                    Some(2) if deleted => {}
                    code => panic!("{case}: restore of {snap} exited {code:?}: {stderr}"),
                }
                assert!(partial_files(dir.path()).is_empty(), "{case}: {:?}", partial_files(dir.path()));
            }
            fs::write(file, &original).unwrap();
        }
    }
    dir.repo_cmd("check").arg("--read-data").ok();
}

/// The index cache's header and slot sizes (FORMAT §22).
const CACHE_HEADER: usize = 128;
const CACHE_SLOT: usize = 54;

/// The number of slots in the table of an index cache file (FORMAT §22).
fn table_slots(cache: &[u8]) -> usize {
    u64::from_le_bytes(cache[40..48].try_into().unwrap()) as usize
}

/// A repository holding vm `v` (disk `d`: a mixed image of `size` bytes from `seed`) and
/// then vm `w` (other data), so that the index cache the second backup built covers the
/// first, warmed by a restore of `v`; returns the image and the cache file.
fn cached_repository(dir: &Dir, size: usize, seed: u64) -> (PathBuf, PathBuf) {
    dir.init();
    let img = dir.image("d.img", size, seed);
    dir.backup("v", &[("d", &img)]);
    let other = dir.image("e.img", 4 << 20, seed + 1);
    dir.backup("w", &[("e", &other)]);
    dir.restore("v:latest", "d", "warm.img");
    let caches = harness::files(&dir.join("cache"));
    let cache = caches.iter().find(|p| p.ends_with("blob-index")).expect("the index cache").clone();
    (img, cache)
}

/// The blob index's local cache (FORMAT §22) is never believed when it is damaged: with
/// every page of its table overwritten, a restore fails in one line naming the cache
/// (which it removes), the next one rebuilds it and restores bit-exact; `check` reports
/// the damage the same way, then is clean; gc refuses to plan or delete on it; a backup
/// on it stores its chunks again rather than trust it. Nothing in the repository is
/// changed by what the damaged cache says.
#[test]
fn a_damaged_index_cache_is_rebuilt_never_believed() {
    let dir = Dir::new();
    let (img, cache) = cached_repository(&dir, 8 << 20, 71);
    let repo_before: Vec<_> = dir.repo_files().iter().map(|p| (p.clone(), fs::read(p).unwrap())).collect();
    let trash = |path: &Path| {
        let bytes = fs::read(path).unwrap();
        let f = fs::OpenOptions::new().write(true).open(path).unwrap();
        f.write_all_at(&vec![0x5a; table_slots(&bytes) * CACHE_SLOT], CACHE_HEADER as u64).unwrap();
    };

    trash(&cache);
    let out = dir.repo_cmd("restore").args(["v:latest", "--disk", "d", "--to"]).arg(dir.join("r1.img")).output();
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success());
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("blob index cache") && err.contains("run the command again to rebuild it"), "{err}");
    assert!(!cache.exists(), "the damaged cache is removed");
    let restored = dir.restore("v:latest", "d", "r2.img");
    assert_eq!(hash(&restored), hash(&img));
    assert!(cache.exists(), "rebuilt");

    trash(&cache);
    let report = dir.repo_cmd("check").arg("--json").output();
    let text = String::from_utf8_lossy(&report.stdout).to_string();
    assert!(!report.status.success() && text.contains("blob index cache"), "{text}");
    dir.check_all();

    // gc neither plans nor deletes on it.
    dir.repo_cmd("forget").arg("w:latest").ok();
    trash(&cache);
    let packs = dir.packs();
    let out = dir.repo_cmd("gc").output();
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success() && err.contains("blob index cache"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert_eq!(dir.packs(), packs, "nothing deleted");
    dir.repo_cmd("gc").ok();
    assert!(dir.packs().len() < packs.len(), "the forgotten snapshot's packs go once the cache is whole");
    dir.check_all();

    trash(&cache);
    let img2 = dir.image("d2.img", 2 << 20, 73);
    dir.backup("x", &[("d", &img2)]);
    dir.check_all();
    assert_eq!(hash(&dir.restore("x:latest", "d", "r3.img")), hash(&img2));
    // The first snapshot's files are as they were (gc removed only w's).
    for (path, bytes) in repo_before.iter().filter(|(p, _)| p.exists()) {
        assert_eq!(&fs::read(path).unwrap(), bytes, "{} changed", path.display());
    }
    assert_eq!(hash(&dir.restore("v:latest", "d", "r4.img")), hash(&img));
}

/// A page of the index cache's table that holds only chunk entries, damaged: gc's walk
/// finds every tree page, and only the marking of the chunks reads that page. gc then
/// names the damaged cache (not "referenced blobs in no index file", which would send the
/// administrator to repair a whole repository) and deletes nothing; the next gc, on the
/// rebuilt cache, runs.
#[test]
fn gc_names_a_damaged_cache_page_that_only_chunks_needed() {
    let dir = Dir::new();
    let (img, cache) = cached_repository(&dir, 128 << 20, 81);
    let bytes = fs::read(&cache).unwrap();
    let slots = table_slots(&bytes);
    let (header, slot, page) = (CACHE_HEADER, CACHE_SLOT, 128);
    let kind = |s: usize| bytes[header + s * slot + 52];
    // A few index and confirmation pages among more than a thousand chunks: most
    // pages of the table hold chunk entries only.
    let data_page = (0..slots / page)
        .find(|p| (p * page..(p + 1) * page).all(|s| kind(s) == 0))
        .unwrap_or_else(|| panic!("a page of chunk entries only among {slots} slots"));
    let f = fs::OpenOptions::new().write(true).open(&cache).unwrap();
    f.write_all_at(&[!bytes[header + data_page * page * slot + 7]], (header + data_page * page * slot + 7) as u64)
        .unwrap();

    let packs = dir.packs();
    let out = dir.repo_cmd("gc").output();
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("blob index cache") && err.contains("run the command again"), "{err}");
    assert!(!err.contains("no index file"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert_eq!(dir.packs(), packs, "nothing deleted");
    dir.repo_cmd("gc").ok();
    dir.check_all();
    assert_eq!(hash(&dir.restore("v:latest", "d", "r.img")), hash(&img));
}
