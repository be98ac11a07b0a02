//! SIGKILL at random moments of a backup: the repository stays consistent, and every
//! snapshot made before restores bit-exact.

mod harness;

use std::fs;
use std::time::Duration;

use harness::{hash, mixed_image, scatter_writes, Dir};
use rand::{Rng, SeedableRng};

#[test]
fn sigkill_during_backup_never_damages_the_repository() {
    let dir = Dir::new();
    dir.init();
    let img = dir.join("d.img");
    let mut data = mixed_image(64 << 20, 31);
    fs::write(&img, &data).unwrap();
    let started = std::time::Instant::now();
    let first = dir.backup("v", &[("d", &img)]);
    // Kill moments are drawn over the length of a real backup of this image.
    let span = started.elapsed().as_millis().max(50) as u64;
    let first_id = first["snapshot"].as_str().unwrap().to_string();
    let first_hash = hash(&img);

    let mut rng = rand::rngs::StdRng::seed_from_u64(99);
    let mut killed_mid_run = 0;
    for round in 0..8 {
        // New content each round so the backup has real work to do.
        scatter_writes(&mut data, 64, 4096, 1000 + round);
        fs::write(&img, &data).unwrap();
        let mut child =
            dir.repo_cmd("backup").args(["--vm", "v", "--disk"]).arg(format!("id=d,source={}", img.display())).spawn();
        // Later backups store less than the first, so draw from its first third.
        std::thread::sleep(Duration::from_millis(rng.gen_range(0..span / 3 + 1)));
        if child.try_wait().unwrap().is_none() {
            killed_mid_run += 1;
        }
        let _ = child.kill(); // SIGKILL
        child.wait().unwrap();

        let report = dir.repo_cmd("check").arg("--json").json();
        assert_eq!(report["ok"], true, "round {round}: {report}");
        let out = dir.restore(&first_id, "d", &format!("first-{round}.img"));
        assert_eq!(hash(&out), first_hash, "round {round}: the first snapshot restores bit-exact");
        fs::remove_file(out).unwrap();
        // Every snapshot that became visible is complete.
        for s in dir.snapshots() {
            let out = dir.restore(s["id"].as_str().unwrap(), "d", "any.img");
            fs::remove_file(out).unwrap();
        }
    }
    assert!(killed_mid_run >= 3, "the loop must really interrupt backups ({killed_mid_run} did)");
    let last = dir.backup("v", &[("d", &img)]);
    assert_eq!(hash(&dir.restore(last["snapshot"].as_str().unwrap(), "d", "last.img")), hash(&img));
    let report = dir.repo_cmd("check").args(["--read-data", "--json"]).json();
    assert_eq!(report["ok"], true, "{report}");
}
