//! `check --read-data=BUDGET` reads packs least recently verified first, keeps the
//! rotation in the repository, honours the budget, survives a lost state, and still
//! reports damage in the pack it selects.

mod harness;

use std::collections::BTreeSet;
use std::fs;

use harness::{mixed_image, Dir};
use serde_json::Value;

fn check(dir: &Dir, budget: &str) -> Value {
    let out = dir.repo_cmd("check").arg(format!("--read-data={budget}")).arg("--json").output();
    serde_json::from_slice(&out.stdout).unwrap()
}

/// A quarter of the bytes per run: every pack verified within four runs, each run within
/// the budget (plus at most one pack).
#[test]
fn a_quarter_per_run_covers_every_pack_in_four_runs() {
    let dir = Dir::new();
    dir.repo_cmd("init").args(["--kdf-memory", "8", "--kdf-iterations", "1", "--pack-size", "128KiB"]).ok();
    let img = dir.join("d.img");
    fs::write(&img, mixed_image(12 << 20, 3)).unwrap();
    dir.backup("v", &[("d", &img)]);
    let packs = dir.packs().len() as u64;
    assert!(packs >= 20, "{packs} packs");
    let first = check(&dir, "25%");
    let rd = &first["read_data"];
    assert_eq!(rd["run"], 1);
    assert_eq!(rd["full_coverage_within_runs"], 4, "{rd}");
    let mut never = rd["packs_never_checked"].as_u64().unwrap();
    let total_bytes: u64 = dir.packs().iter().map(|p| fs::metadata(p).unwrap().len()).sum();
    for run in 2..=4 {
        let r = check(&dir, "25%");
        let rd = &r["read_data"];
        assert_eq!(r["ok"], true, "{r}");
        assert_eq!(rd["run"], run);
        let read = rd["bytes_read"].as_u64().unwrap() as f64;
        // The budget is a byte limit: the last pack read may pass it by one pack.
        assert!(read >= 0.25 * total_bytes as f64 * 0.95 && read <= 0.25 * total_bytes as f64 + 200_000.0, "{rd}");
        let now = rd["packs_never_checked"].as_u64().unwrap();
        assert!(now < never || now == 0, "run {run}: {now} never checked, before {never}");
        never = now;
    }
    assert_eq!(never, 0, "every pack verified within 4 runs");
    let fifth = check(&dir, "25%");
    assert!(fifth["read_data"]["oldest_checked_runs_ago"].as_u64().unwrap() <= 4, "{fifth}");
}

/// A lost or corrupted rotation state restarts the rotation with a warning, never an
/// error; damage in a pack is reported by the run that selects it and it stays first.
#[test]
fn lost_state_restarts_and_damage_is_found() {
    let dir = Dir::new();
    dir.repo_cmd("init").args(["--kdf-memory", "8", "--kdf-iterations", "1", "--pack-size", "256KiB"]).ok();
    let img = dir.join("d.img");
    fs::write(&img, mixed_image(8 << 20, 4)).unwrap();
    dir.backup("v", &[("d", &img)]);
    check(&dir, "all");
    let state = dir.repo().join("state").join("check");
    assert!(state.exists());
    fs::write(&state, b"garbage").unwrap();
    let r = check(&dir, "10%");
    assert_eq!(r["ok"], true, "{r}");
    assert!(r["warnings"].to_string().contains("rotation"), "{r}");
    assert_eq!(r["read_data"]["run"], 1, "starting over");
    fs::remove_file(&state).unwrap();
    assert_eq!(check(&dir, "10%")["read_data"]["run"], 1);

    // Flip a byte in one pack: some run of 10% checks finds it, and keeps finding it.
    let packs: BTreeSet<_> = dir.packs().into_iter().collect();
    let victim = packs.iter().next().unwrap().clone();
    let mut bytes = fs::read(&victim).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 1;
    fs::write(&victim, &bytes).unwrap();
    let mut found = 0;
    for _ in 0..12 {
        let r = check(&dir, "10%");
        if r["ok"] == false {
            found += 1;
        }
    }
    assert!(found >= 2, "the damaged pack stays first in line once found ({found} of 12 runs)");
}
