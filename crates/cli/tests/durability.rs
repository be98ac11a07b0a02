//! The repository under concurrent and interrupted writers (DESIGN.md §6, §8): backups of
//! different vms may run at the same time, and a backup killed while it writes packs
//! never leaves a torn file under a final name.

mod harness;

use std::collections::HashMap;
use std::fs;
use std::time::{Duration, Instant};

use harness::{hash, mixed_image, Dir};
use rand::{Rng, RngCore, SeedableRng};

const MIB: usize = 1 << 20;

/// Two vms whose disks share half their content are backed up at the same moment, three
/// times: both backups succeed (the same new chunks may be stored twice, never lost),
/// every snapshot restores bit-exact, and `check --read-data` finds nothing wrong.
#[test]
fn concurrent_backups_of_different_vms_are_both_whole() {
    let dir = Dir::new();
    dir.repo_cmd("init").args(["--kdf-memory", "8", "--kdf-iterations", "1", "--pack-size", "1MiB"]).ok();
    let shared = mixed_image(12 * MIB, 71);
    let mut rng = rand::rngs::StdRng::seed_from_u64(72);
    let mut expected: HashMap<String, blake3::Hash> = HashMap::new();
    for round in 0..3 {
        let mut imgs = Vec::new();
        for vm in ["alpha", "beta"] {
            // Shared content first, then content of this vm and round only.
            let mut data = shared.clone();
            let mut own = vec![0u8; 12 * MIB];
            rng.fill_bytes(&mut own);
            data.extend_from_slice(&own);
            let path = dir.join(&format!("{vm}-{round}.img"));
            fs::write(&path, &data).unwrap();
            imgs.push((vm, path, blake3::hash(&data)));
        }
        let outputs: Vec<_> = std::thread::scope(|s| {
            let handles: Vec<_> = imgs
                .iter()
                .map(|(vm, path, _)| {
                    let dir = &dir;
                    s.spawn(move || {
                        dir.repo_cmd("backup")
                            .args(["--vm", vm, "--json", "--disk"])
                            .arg(format!("id=root,source={}", path.display()))
                            .output()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for ((vm, _, h), out) in imgs.iter().zip(outputs) {
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(out.status.success(), "round {round}: backup of {vm} failed: {stderr}");
            let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            assert_eq!(report["vm"], *vm);
            expected.insert(report["snapshot"].as_str().unwrap().to_string(), *h);
        }
    }
    let check = dir.repo_cmd("check").args(["--read-data", "--json"]).json();
    assert_eq!(check["ok"], true, "{check}");
    assert_eq!(check["errors"].as_array().unwrap().len(), 0, "{check}");
    let snaps = dir.snapshots();
    assert_eq!(snaps.len(), 6);
    for s in snaps {
        let id = s["id"].as_str().unwrap();
        let out = dir.restore(id, "root", "out.img");
        assert_eq!(hash(&out), expected[id], "snapshot {id} of {} restores bit-exact", s["vm"]);
        fs::remove_file(out).unwrap();
    }
}

/// Rewrites a quarter of the image in random whole MiBs; returns the new image's hash.
fn new_version(data: &mut [u8], rng: &mut rand::rngs::StdRng, img: &std::path::Path) -> blake3::Hash {
    for _ in 0..(data.len() / MIB / 4) {
        let at = rng.gen_range(0..data.len() / MIB) * MIB;
        rng.fill_bytes(&mut data[at..at + MIB]);
    }
    fs::write(img, &*data).unwrap();
    blake3::hash(data)
}

/// Each round writes a quarter of the disk anew, so the killed backup is busy sealing and
/// writing small packs and index files; SIGKILL lands at a seeded random moment. After
/// every kill, `check --read-data` (which reads every pack file, indexed or not, and
/// checks that its name is the hash of its bytes) passes, and every snapshot that became
/// visible restores to exactly the image it was taken of.
#[test]
fn sigkill_while_packs_are_written_leaves_no_torn_file() {
    let dir = Dir::new();
    dir.repo_cmd("init").args(["--kdf-memory", "8", "--kdf-iterations", "1", "--pack-size", "1MiB"]).ok();
    let img = dir.join("d.img");
    let mut data = mixed_image(48 * MIB, 73);
    fs::write(&img, &data).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(74);
    let first = dir.backup("v", &[("d", &img)]);
    let first_id = first["snapshot"].as_str().unwrap().to_string();
    let first_hash = hash(&img);
    // Kill moments are drawn over the length of an uninterrupted backup of the same kind,
    // and a little beyond, so that some land in the final commit or after it.
    new_version(&mut data, &mut rng, &img);
    let started = Instant::now();
    let timed = dir.backup("v", &[("d", &img)]);
    let span = (started.elapsed().as_millis() as u64 * 6 / 5).max(50);
    // Snapshots already verified, by id.
    let mut known: HashMap<String, blake3::Hash> = HashMap::new();
    known.insert(first_id.clone(), first_hash);
    known.insert(timed["snapshot"].as_str().unwrap().to_string(), hash(&img));

    // Rounds run until 8 backups were interrupted; a backup that finished before its kill
    // (the machine may be less loaded than when timed) shortens the span.
    let (mut interrupted, mut leftovers, mut span) = (0, 0, span);
    for round in 0..24 {
        if interrupted == 8 {
            break;
        }
        let version = new_version(&mut data, &mut rng, &img);

        let mut child =
            dir.repo_cmd("backup").args(["--vm", "v", "--disk"]).arg(format!("id=d,source={}", img.display())).spawn();
        std::thread::sleep(Duration::from_millis(rng.gen_range(0..span)));
        if child.try_wait().unwrap().is_none() {
            interrupted += 1;
        } else {
            span = (span * 3 / 4).max(20);
        }
        let _ = child.kill(); // SIGKILL
        child.wait().unwrap();
        leftovers += harness::files(&dir.repo().join("tmp")).len();

        let report = dir.repo_cmd("check").args(["--read-data", "--json"]).json();
        assert_eq!(report["ok"], true, "round {round}: {report}");
        for w in report["warnings"].as_array().unwrap() {
            assert!(
                w.as_str().unwrap().contains("not listed by any index file"),
                "round {round}: unexpected warning {w}"
            );
        }
        let out = dir.restore(&first_id, "d", "first.img");
        assert_eq!(hash(&out), first_hash, "round {round}: the first snapshot restores bit-exact");
        fs::remove_file(out).unwrap();
        // A snapshot that became visible in this round is complete and of this round's image.
        for s in dir.snapshots() {
            let id = s["id"].as_str().unwrap();
            if !known.contains_key(id) {
                let out = dir.restore(id, "d", "new.img");
                assert_eq!(hash(&out), version, "round {round}: new snapshot {id} restores this round's image");
                fs::remove_file(out).unwrap();
                known.insert(id.to_string(), version);
            }
        }
    }
    assert_eq!(interrupted, 8, "the loop must really interrupt backups");
    eprintln!("8 backups interrupted, {} completed; {leftovers} temporary files seen after kills", known.len() - 2);

    let last = dir.backup("v", &[("d", &img)]);
    assert_eq!(hash(&dir.restore(last["snapshot"].as_str().unwrap(), "d", "last.img")), hash(&img));
    let report = dir.repo_cmd("check").args(["--read-data", "--json"]).json();
    assert_eq!(report["ok"], true, "{report}");
}

/// A restore killed at any moment leaves no target that looks complete: a new target does
/// not exist, and an existing one replaced with --force still holds its old bytes. (A
/// `.partial` temporary file may stay behind; it never has the target's name.)
#[test]
fn sigkill_during_restore_never_leaves_a_half_written_target() {
    let dir = Dir::new();
    dir.init();
    let img = dir.join("d.img");
    let mut data = mixed_image(32 * MIB, 75);
    let mut rng = rand::rngs::StdRng::seed_from_u64(76);
    // Mostly random, so that the restore writes (rather than skips) most of the disk.
    for mib in (0..32).filter(|m| m % 4 != 0) {
        rng.fill_bytes(&mut data[mib * MIB..(mib + 1) * MIB]);
    }
    fs::write(&img, &data).unwrap();
    let image_hash = blake3::hash(&data);
    dir.backup("v", &[("d", &img)]);
    let started = Instant::now();
    let timed = dir.restore("v:latest", "d", "timed.img");
    let span = (started.elapsed().as_millis() as u64 * 6 / 5).max(50);
    assert_eq!(hash(&timed), image_hash);

    let old = b"the previous content of an existing target".to_vec();
    // Rounds run until 8 restores were interrupted; one that finished first shortens the span.
    let (mut interrupted, mut completed, mut span) = (0, 0, span);
    for round in 0..24 {
        if interrupted == 8 {
            break;
        }
        let force = round % 2 == 1;
        let target = dir.join(&format!("target-{round}.img"));
        if force {
            fs::write(&target, &old).unwrap();
        }
        let mut cmd = dir.repo_cmd("restore");
        cmd.args(["v:latest", "--disk", "d", "--to"]).arg(&target);
        if force {
            cmd.arg("--force");
        }
        let mut child = cmd.spawn();
        std::thread::sleep(Duration::from_millis(rng.gen_range(0..span)));
        let _ = child.kill(); // SIGKILL
        let status = child.wait().unwrap();
        if status.success() {
            completed += 1;
            span = (span * 3 / 4).max(20);
            assert_eq!(hash(&target), image_hash, "round {round}: a completed restore is bit-exact");
        } else {
            interrupted += 1;
            // Killed before the rename: the old state; killed after it (while syncing the
            // directory or exiting): the complete new image. Never anything in between.
            let replaced = target.exists() && hash(&target) == image_hash;
            if force {
                assert!(
                    replaced || fs::read(&target).unwrap() == old,
                    "round {round}: the target is neither intact nor completely restored"
                );
            } else {
                assert!(
                    !target.exists() || replaced,
                    "round {round}: a killed restore left a partial {}",
                    target.display()
                );
            }
        }
    }
    assert_eq!(interrupted, 8, "the loop must really interrupt restores ({completed} completed)");
}

/// Issue 14, item 14: a directory created on the retry path of a write (a repository
/// copied by a tool that drops empty directories) is made durable in its parent: after
/// the `mkdir`, the parent directory (here the repository root) is fsynced before the
/// file is renamed into the new directory. Observed with strace.
#[test]
fn a_directory_created_on_the_retry_path_is_fsynced_in_its_parent() {
    if std::process::Command::new("strace").arg("-V").output().is_err() {
        panic!("strace is missing: scripts/test.sh installs it");
    }
    let dir = Dir::new();
    dir.init();
    let img = dir.image("d.img", 1 << 20, 77);
    fs::remove_dir(dir.repo().join("snapshots")).unwrap();
    let trace = dir.join("trace.txt");
    let via = ["strace", "-f", "-qq", "-e", "trace=mkdir,mkdirat,openat,fsync,rename,renameat,renameat2", "-o"];
    let mut via: Vec<&str> = via.to_vec();
    let trace_s = trace.to_str().unwrap().to_string();
    via.push(&trace_s);
    let mut c = dir.cmd_via(&via, "backup");
    c.arg("--repo").arg(dir.repo()).args(["--vm", "v", "--disk"]).arg(format!("id=d,source={}", img.display()));
    c.ok();
    let text = fs::read_to_string(&trace).unwrap();
    let root = dir.repo().display().to_string();
    let lines: Vec<&str> = text.lines().collect();
    let made = lines
        .iter()
        .position(|l| l.contains("mkdir") && l.contains(&format!("{root}/snapshots\"")))
        .unwrap_or_else(|| panic!("no mkdir of snapshots/ in the trace:\n{text}"));
    let renamed = lines[made..]
        .iter()
        .position(|l| l.contains("rename") && l.contains(&format!("{root}/snapshots/")))
        .map(|k| made + k)
        .expect("the snapshot is renamed into the new directory");
    // Between the two: the root is opened, and that descriptor fsynced.
    let synced = lines[made..renamed].iter().any(|l| {
        l.contains(&format!("openat(AT_FDCWD, \"{root}\", ")) && {
            let fd = l.rsplit("= ").next().unwrap_or("").trim();
            lines[made..renamed].iter().any(|m| m.contains(&format!("fsync({fd})")))
        }
    });
    assert!(
        synced,
        "the repository root is not fsynced after snapshots/ was made:\n{}",
        lines[made..=renamed].join("\n")
    );
    assert_eq!(dir.snapshots().len(), 1);
}
