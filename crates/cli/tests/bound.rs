//! Verification you can stake a restore on (issue 15), against real slow and lying
//! sources (nbdkit): the bound is true for every budget form and never contradicts the
//! state; a budget below one chunk is said to be useless; over-reported chunks in holes
//! are counted; the whole stale extent is reported; writes change tracking missed are
//! caught from the allocation map for free; an allocation map that hides data is
//! sampled, caught and healed (issue 14, item 6).

mod harness;

use std::fs;
use std::path::Path;

use harness::nbdkit::Nbdkit;
use harness::{change_list, hash, snap_id, Dir};
use serde_json::Value;

const CHUNK: u64 = 65536;

/// Runs a backup of one disk `d` from `source`; returns (exit code, report, stderr).
fn backup(dir: &Dir, source: &str, extra: &[&str]) -> (i32, Value, String) {
    let mut c = dir.repo_cmd("backup");
    c.args(["--vm", "v", "--json", "--disk"]).arg(format!("id=d,source={source}")).args(extra);
    let out = c.output();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    let report = serde_json::from_slice(&out.stdout).unwrap_or_else(|_| panic!("no report: {stderr}"));
    (out.status.code().unwrap(), report, stderr)
}

/// An empty change list for a disk of `size` bytes: "nothing changed".
fn nothing_changed(dir: &Dir, size: u64) -> String {
    let list = dir.join("nothing.json");
    change_list(&list, size as usize, &[]);
    format!("changes:{}", list.display())
}

fn coverage(report: &Value) -> &Value {
    &report["disks"][0]["coverage"]
}

fn k(report: &Value) -> u64 {
    coverage(report)["full_coverage_within_runs"].as_u64().unwrap()
}

/// Item 1: a count combined with a time cap on a slow source. Each run is cut short by
/// the deadline; the report says so, bases its bound on what was achieved, and the bound
/// never contradicts the state (it was 4 while chunks were 9 runs old).
#[test]
fn a_count_with_a_time_cap_reports_a_true_bound() {
    let dir = Dir::new();
    dir.init();
    let size = 16u64 << 20; // 256 chunks; 25% is 64 a run
    let img = dir.random_image("d.img", size as usize, 1);
    backup(&dir, img.to_str().unwrap(), &[]);
    // About 2 MB/s: 64 chunks (4 MiB) take 2 s, the cap allows 1.
    let slow = Nbdkit::start(&dir, "slow", &["--filter=rate", "file", img.to_str().unwrap(), "rate=16M"]);
    let cbt = nothing_changed(&dir, size);
    let mut reports = Vec::new();
    for _ in 0..7 {
        let (code, r, err) = backup(&dir, &format!("{},cbt={cbt}", slow.uri()), &["--verify", "25%,1s"]);
        assert_eq!(code, 0, "{err}");
        reports.push(coverage(&r).clone());
    }
    // Never a bound the state contradicts: chunks already that old make it larger.
    for (run, c) in reports.iter().enumerate() {
        let bound = c["full_coverage_within_runs"].as_u64().unwrap();
        assert!(bound > c["oldest_confirmed_runs_ago"].as_u64().unwrap(), "run {run}: {c}");
    }
    // The rate filter lets an idle source burst once; after that the cap cuts every run.
    for (run, c) in reports.iter().enumerate().skip(1) {
        assert_eq!(c["budget_chunks"], 64, "{c}");
        let per_run = c["sampled_per_run"].as_u64().unwrap();
        assert!(per_run < 64 && per_run > 0, "run {run}: the cap cuts the count: {c}");
        assert_eq!(c["cut_short"], "deadline", "run {run}: {c}");
        assert_eq!(c["bound"], "achieved", "run {run}: {c}");
        assert!(c["full_coverage_within_runs"].as_u64().unwrap() >= 255u64.div_ceil(per_run), "run {run}: {c}");
    }
    // The text says what the bound rests on.
    let status = dir.repo_cmd("status").ok();
    assert!(status.contains("if each later run compares at least"), "{status}");
}

/// Item 2: a time-only budget on a source that takes half a second per chunk: the first
/// chunk (compared on top of the budget) is not counted, the deadline is checked before
/// each read, and a lie in the most recently confirmed chunk is found within the bound.
#[test]
fn a_time_budget_never_understates_its_bound() {
    let dir = Dir::new();
    dir.init();
    let size = 8 * CHUNK; // the first chunk and 7 others
    let img = dir.random_image("d.img", size as usize, 2);
    backup(&dir, img.to_str().unwrap(), &[]);
    // Half a second per read: the first chunk takes 0.5 s, so a 1.2 s budget leaves room
    // for one more read.
    let slow = Nbdkit::start(&dir, "slow", &["--filter=delay", "file", img.to_str().unwrap(), "rdelay=500ms"]);
    // The lie's chunk is read (confirmed) now: reported changed in this run.
    let lie = 5u64;
    let list = dir.join("one.json");
    change_list(&list, size as usize, &[(lie * CHUNK, CHUNK)]);
    let (_, r, _) = backup(&dir, &format!("{},cbt=changes:{}", slow.uri(), list.display()), &["--verify", "1200ms"]);
    let bound = k(&r);
    // One chunk besides the first fits in the time: 7 others need 7 runs.
    assert!(bound >= 7, "{}", coverage(&r));
    let per_run = coverage(&r)["sampled_per_run"].as_u64().unwrap();
    assert_eq!(coverage(&r)["bound"], "achieved");
    assert!(per_run >= 1 && bound >= 7u64.div_ceil(per_run), "{}", coverage(&r));
    // Now the chunk changes behind change tracking's back.
    let mut data = fs::read(&img).unwrap();
    data[(lie * CHUNK + 100) as usize] ^= 0xff;
    fs::write(&img, &data).unwrap();
    let cbt = nothing_changed(&dir, size);
    for run in 1..=bound {
        let (code, r, _) = backup(&dir, &format!("{},cbt={cbt}", slow.uri()), &["--verify", "1200ms"]);
        if code == 3 {
            assert!(!r["disks"][0]["mismatches"].as_array().unwrap().is_empty());
            return;
        }
        assert!(coverage(&r)["sampled_per_run"].as_u64().unwrap() >= per_run, "the condition of the bound");
        assert!(run < bound, "not found within the bound of {bound} runs");
    }
}

/// Item 3: a percentage never rounds to zero chunks; a size below one chunk is a warning
/// and no bound; `status` tells verification off from no bound.
#[test]
fn useless_budgets_are_named_and_off_is_not_no_bound() {
    let dir = Dir::new();
    dir.init();
    let img = dir.random_image("d.img", 16 * CHUNK as usize, 3);
    let src = img.to_str().unwrap();
    let (_, r, _) = backup(&dir, src, &["--verify", "1%"]);
    assert_eq!(k(&r), 15, "1% of 16 chunks is one chunk, not zero");
    assert_eq!(coverage(&r)["budget_chunks"], 1);
    let (code, r, err) = backup(&dir, src, &["--verify", "1KiB"]);
    assert_eq!(code, 0);
    assert!(err.contains("warning") && err.contains("less than one chunk"), "{err}");
    assert_eq!((k(&r), coverage(&r)["bound"].as_str()), (0, Some("none")));
    let no_bound = dir.repo_cmd("status").ok();
    assert!(no_bound.contains("no bound") && !no_bound.contains("within 0 runs"), "{no_bound}");
    backup(&dir, src, &["--verify", "none"]);
    let off = dir.repo_cmd("status").ok();
    assert!(off.contains("verification off"), "{off}");
    assert_ne!(no_bound.lines().last(), off.lines().last());
}

/// Item 4: chunks a change list names inside a hole (the allocation map says zeros, and
/// they were zeros before) are over-reported.
#[test]
fn overreported_chunks_in_holes_are_counted() {
    let dir = Dir::new();
    dir.init();
    let size = 32 * CHUNK;
    let img = dir.join("sparse.img");
    let mut data = vec![0u8; (16 * CHUNK) as usize];
    rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut data);
    fs::write(&img, &data).unwrap();
    fs::File::options().write(true).open(&img).unwrap().set_len(size).unwrap(); // a hole after
    backup(&dir, img.to_str().unwrap(), &[]);
    let list = dir.join("holes.json");
    change_list(&list, size as usize, &[(20 * CHUNK, 4 * CHUNK), (2 * CHUNK, CHUNK)]);
    let (code, r, err) = backup(&dir, &format!("{},cbt=changes:{}", img.display(), list.display()), &[]);
    assert_eq!(code, 0, "{err}");
    let d = &r["disks"][0];
    assert_eq!(d["cbt_reported_chunks"], 5);
    // Chunk 2 was read and is unchanged; chunks 20..24 are holes that were holes.
    assert_eq!(d["cbt_overreported_chunks"], 5, "{d}");
}

/// Item 5: a 2000-byte hidden write across a segment boundary (chunks 127 and 128 of 192,
/// segments of 64 chunks): whichever of the two chunks the sample finds, the comparison
/// grows around it and the mismatch covers the whole write, with the escalation reported.
#[test]
fn the_whole_stale_extent_is_reported() {
    let dir = Dir::new();
    dir.init();
    let size = 192 * CHUNK;
    let img = dir.random_image("d.img", size as usize, 5);
    backup(&dir, img.to_str().unwrap(), &[]);
    let at = 128 * CHUNK - 1000;
    let mut data = fs::read(&img).unwrap();
    data[at as usize..at as usize + 2000].iter_mut().for_each(|b| *b ^= 0x5a);
    fs::write(&img, &data).unwrap();
    let src = format!("{},cbt={}", img.display(), nothing_changed(&dir, size));
    for _ in 0..4 {
        // One segment's worth a run: one of the two chunks, not both.
        let (code, r, err) = backup(&dir, &src, &["--verify", "64ios"]);
        if code == 3 {
            let d = &r["disks"][0];
            let ranges: Vec<(u64, u64)> = d["mismatches"]
                .as_array()
                .unwrap()
                .iter()
                .map(|m| (m["offset"].as_u64().unwrap(), m["length"].as_u64().unwrap()))
                .collect();
            assert_eq!(ranges, vec![(128 * CHUNK - 1024, 2048)], "{err}");
            assert!(d["escalation"]["chunks"].as_u64().unwrap() > 0, "{d}");
            assert_eq!(d["escalation"]["limited"], false);
            return;
        }
    }
    panic!("the hidden write was not found in 4 runs of one segment each (bound 3)");
}

/// Item 6: a discard change tracking missed — the allocation map now says zeros where the
/// parent held data, and the change list is empty. The backup stores zeros (right), stays
/// `ok`, counts the miss, gives advice and reads in full next time.
#[test]
fn zeros_over_parent_data_are_a_detected_miss() {
    let dir = Dir::new();
    dir.init();
    let size = 32 * CHUNK;
    let img = dir.random_image("d.img", size as usize, 6);
    backup(&dir, img.to_str().unwrap(), &[]);
    // Punch a hole over chunks 8..12, without telling change tracking.
    let st = std::process::Command::new("fallocate")
        .args(["--punch-hole", "--offset", &(8 * CHUNK).to_string(), "--length", &(4 * CHUNK).to_string()])
        .arg(&img)
        .status()
        .unwrap();
    assert!(st.success());
    let src = format!("{},cbt={}", img.display(), nothing_changed(&dir, size));
    let (code, r, err) = backup(&dir, &src, &[]);
    assert_eq!(code, 0, "the restore point is right: {err}");
    let d = &r["disks"][0];
    assert_eq!((r["status"].as_str(), d["cbt_missed_chunks"].as_u64()), (Some("ok"), Some(4)), "{d}");
    assert_eq!(d["next_mode"], "full");
    assert!(d["advice"].as_str().unwrap_or("").contains("missed"), "{d}");
    assert_eq!(hash(&dir.restore(&snap_id(&r), "d", "r.img")), hash(&img));
    let (_, next, _) = backup(&dir, &src, &[]);
    assert!(next["disks"][0]["full_reason"].as_str().unwrap_or("").contains("missed"), "{next}");
}

/// An nbdkit export of `img` whose allocation map claims the first half is a hole of
/// zeros (a buggy or hostile server), while reads return the data.
fn lying_server(dir: &Dir, img: &Path, size: u64) -> Nbdkit {
    let half = size / 2;
    Nbdkit::start(
        dir,
        "liar",
        &[
            "eval",
            &format!("get_size=echo {size}"),
            &format!("pread=dd if={} skip=$4 count=$3 iflag=skip_bytes,count_bytes status=none", img.display()),
            "can_extents=exit 0",
            &format!("extents=echo 0 {half} hole,zero; echo {half} {half} 0"),
        ],
    )
}

/// Issue 14, item 6: the NBD allocation map is tracking metadata, and is sampled like
/// change tracking: a server that reports a hole over data is caught — in a full backup
/// and in an incremental — the restore point is tainted, and healing reads every byte.
#[test]
fn an_allocation_map_that_hides_data_is_caught_and_healed() {
    let dir = Dir::new();
    dir.init();
    let size = 16 * CHUNK;
    let img = dir.random_image("d.img", size as usize, 7);
    let liar = lying_server(&dir, &img, size);
    // A full backup: the "zero" half is sampled, found to hold data, healed.
    let (code, r, err) = backup(&dir, &liar.uri(), &["--verify", "all", "--on-mismatch", "heal"]);
    assert_eq!(code, 3, "{err}");
    assert_eq!(r["status"], "tainted");
    assert!(r["disks"][0]["advice"].as_str().unwrap().contains("allocation map"), "{r}");
    let healed = r["healed_snapshot"].as_str().unwrap();
    assert_eq!(hash(&dir.restore(healed, "d", "healed.img")), hash(&img));
    // An incremental over an honest parent: the lie hides a change.
    let honest = dir.join("honest");
    fs::create_dir(&honest).unwrap();
    let (_, base, _) = backup(&dir, img.to_str().unwrap(), &["--full"]);
    assert_eq!(base["status"], "ok");
    let mut data = fs::read(&img).unwrap();
    data[(3 * CHUNK) as usize] ^= 1; // in the half the server calls a hole
    fs::write(&img, &data).unwrap();
    let list = dir.join("c.json");
    change_list(&list, size as usize, &[(3 * CHUNK, 1)]);
    let (code, r, err) = backup(&dir, &format!("{},cbt=changes:{}", liar.uri(), list.display()), &["--verify", "all"]);
    assert_eq!(code, 3, "{err}");
    assert_eq!(r["disks"][0]["next_mode"], "full");
    // The next run trusts no allocation map: it reads every byte and is right.
    let (code, r, _) = backup(&dir, &liar.uri(), &["--verify", "all"]);
    assert_eq!(code, 0);
    assert_eq!(hash(&dir.restore(&snap_id(&r), "d", "next.img")), hash(&img));
}

/// Item 7: a detection is recorded in the repository: the suspects show as such in
/// `snapshots` (text and JSON), `status` keeps the event after later backups and names
/// where the good bytes are, restoring a suspect warns with the ranges, and
/// `restore --patch-tainted` writes the good bytes over a restored tainted image.
#[test]
fn detection_events_are_recorded_and_outlive_later_backups() {
    let dir = Dir::new();
    dir.init();
    let size = 16 * CHUNK;
    let img = dir.random_image("d.img", size as usize, 8);
    let (_, first, _) = backup(&dir, img.to_str().unwrap(), &[]);
    let mut data = fs::read(&img).unwrap();
    data[(5 * CHUNK + 7) as usize] ^= 0xff; // the lie
    fs::write(&img, &data).unwrap();
    let src = format!("{},cbt={}", img.display(), nothing_changed(&dir, size));
    let quiet: Vec<String> = (0..2).map(|_| snap_id(&backup(&dir, &src, &["--verify", "none"]).1)).collect();
    let (code, tainted, _) = backup(&dir, &src, &["--verify", "all"]);
    assert_eq!(code, 3);
    let tainted = snap_id(&tainted);

    let list = dir.snapshots();
    for s in &list {
        let id = s["id"].as_str().unwrap();
        let suspect = quiet.iter().any(|q| q == id);
        assert_eq!(s["suspect"], suspect, "{s}");
        if suspect {
            assert_eq!(s["suspect_ranges"][0]["offset"], 5 * CHUNK, "{s}");
            assert_eq!(s["suspect_ranges"][0]["found_by"], tainted.as_str());
        }
    }
    assert!(!list.iter().any(|s| s["id"] == first["snapshot"] && s["suspect"] == true), "confirmed then: no suspect");
    let text = dir.repo_cmd("snapshots").ok();
    assert_eq!(text.lines().filter(|l| l.contains("suspect")).count(), 2, "{text}");

    let status = dir.repo_cmd("status").ok();
    assert!(status.contains(&format!("snapshot {} was stale", &tainted[..8])), "{status}");
    assert!(status.contains("no restore point yet"), "{status}");
    // The next backup reads the disk in full: the good bytes are there; the event stays.
    let (_, full, _) = backup(&dir, &src, &[]);
    assert_eq!(full["disks"][0]["mode"], "full");
    backup(&dir, &src, &[]);
    let status: Value = dir.repo_cmd("status").arg("--json").json();
    let events = status[0]["events"].as_array().unwrap();
    assert_eq!(events.len(), 1, "{status}");
    assert_eq!(events[0]["snapshot"], tainted.as_str());
    assert_eq!(events[0]["disks"][0]["good_snapshot"], full["snapshot"]);
    assert_eq!(events[0]["disks"][0]["causes"][0], "change_tracking");

    let out = dir.repo_cmd("restore").arg(&quiet[0]).args(["--disk", "d", "--to"]).arg(dir.join("q.img")).output();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && err.contains("is a suspect") && err.contains(&(5 * CHUNK).to_string()), "{err}");

    let target = dir.restore(&tainted, "d", "t.img");
    assert_ne!(hash(&target), hash(&img));
    dir.repo_cmd("restore").arg(&tainted).args(["--disk", "d", "--patch-tainted", "--to"]).arg(&target).ok();
    assert_eq!(hash(&target), hash(&img), "the tainted image with its good bytes is the source");
}
