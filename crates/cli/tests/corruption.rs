//! Damaged repositories: check finds the damage, restore refuses to return wrong bytes.

mod harness;

use std::fs;
use std::os::unix::fs::FileExt;

use harness::{mixed_image, Dir};

/// Flips one byte in the middle of the blob area of every pack, one pack at a time, and
/// checks that `check --read-data` names the pack and that restore of the snapshot fails
/// naming a byte range, leaving no target file.
#[test]
fn flipped_byte_in_any_pack_is_found_and_never_restored() {
    let dir = Dir::new();
    // Small packs so the image spans several of them.
    dir.repo_cmd("init").args(["--kdf-memory", "8", "--kdf-iterations", "1", "--pack-size", "2MiB"]).ok();
    let img = dir.join("d.img");
    fs::write(&img, mixed_image(40 << 20, 21)).unwrap();
    dir.backup("v", &[("d", &img)]);
    let packs = dir.packs();
    assert!(packs.len() >= 2, "expected several packs, got {}", packs.len());
    for pack in packs {
        let f = fs::OpenOptions::new().read(true).write(true).open(&pack).unwrap();
        let len = f.metadata().unwrap().len();
        // Blobs occupy everything between the 6-byte header and the pack header at the end.
        let at = len / 3;
        let mut b = [0u8; 1];
        f.read_exact_at(&mut b, at).unwrap();
        f.write_all_at(&[b[0] ^ 0x10], at).unwrap();

        let name = pack.file_name().unwrap().to_str().unwrap().to_string();
        let (stdout, stderr) = dir.repo_cmd("check").arg("--read-data").code(1);
        assert!(stderr.contains(&name), "check names the damaged pack {name}: {stderr}");
        assert!(stdout.contains("error(s) found"), "{stdout}");
        // Structure-only check does not read data and passes.
        dir.repo_cmd("check").ok();

        let target = dir.join("out.img");
        let line =
            dir.repo_cmd("restore").args(["v:latest", "--disk", "d", "--to"]).arg(&target).fails_with_one_line(1);
        assert!(line.contains("bytes ") && line.contains(&name), "restore names the range and pack: {line}");
        assert!(!target.exists(), "a failed restore leaves no target file");
        let partials = fs::read_dir(dir.path())
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with(".partial"))
            .count();
        assert_eq!(partials, 0, "no temporary file is left behind");

        f.write_all_at(&b, at).unwrap();
        dir.repo_cmd("check").arg("--read-data").ok();
    }
}

#[test]
fn truncated_or_deleted_pack_is_found_by_structure_check() {
    let dir = Dir::new();
    dir.init();
    let img = dir.join("d.img");
    fs::write(&img, mixed_image(20 << 20, 22)).unwrap();
    dir.backup("v", &[("d", &img)]);
    let pack = dir.packs().pop().unwrap();
    let name = pack.file_name().unwrap().to_str().unwrap().to_string();
    let original = fs::read(&pack).unwrap();

    fs::write(&pack, &original[..original.len() / 2]).unwrap();
    let (_, stderr) = dir.repo_cmd("check").code(1);
    assert!(stderr.contains(&name) && stderr.contains("truncated"), "{stderr}");

    fs::remove_file(&pack).unwrap();
    let (_, stderr) = dir.repo_cmd("check").code(1);
    assert!(stderr.contains(&name) && stderr.contains("missing"), "{stderr}");
    let line = dir.repo_cmd("restore").args(["v:latest", "--disk", "d", "--to", "out.img"]).fails_with_one_line(1);
    // The damaged byte range, or the whole disk when the pack held its index's root.
    assert!(line.contains("bytes ") || line.contains("whole disk"), "{line}");

    fs::write(&pack, &original).unwrap();
    dir.repo_cmd("check").arg("--read-data").ok();
}

#[test]
fn read_data_budget_reads_a_part() {
    let dir = Dir::new();
    dir.init();
    let img = dir.join("d.img");
    fs::write(&img, mixed_image(64 << 20, 23)).unwrap();
    dir.backup("v", &[("d", &img)]);
    let all = dir.repo_cmd("check").args(["--read-data", "--json"]).json();
    let total = all["read_data"]["packs_total"].as_u64().unwrap();
    assert_eq!(all["read_data"]["packs_checked"], total);
    let one = dir.repo_cmd("check").args(["--read-data=1ios", "--json"]).json();
    assert_eq!(one["read_data"]["packs_checked"], 1);
    let none = dir.repo_cmd("check").args(["--read-data=none", "--json"]).json();
    assert_eq!(none["read_data"]["packs_checked"], 0);
    let line = dir.repo_cmd("check").arg("--read-data=lots").fails_with_one_line(2);
    assert!(line.contains("budget"), "{line}");
}
