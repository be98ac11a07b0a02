//! docs/JSON.md is the reference of every command's `--json` output: each command runs
//! here on a repository with a tainted restore point, a detection event, a protected
//! copy and a check with `--read-data`, and every field it prints must be named in the
//! command's section of the reference (harness::assert_json_documented). The file-level
//! commands are pinned the same way in files.rs.

mod harness;

use std::fs;

use harness::{assert_json_documented, change_list, mixed_image, snap_id, Dir, PASSWORD};
use serde_json::Value;

#[test]
fn every_json_field_is_documented() {
    let dir = Dir::new();
    let init = dir
        .cmd("init")
        .arg("--repo")
        .arg(dir.repo())
        .args(["--kdf-memory", "8", "--kdf-iterations", "1", "--json"])
        .json();
    assert_json_documented("init", &init);
    let size = 1 << 20;
    let mut data = mixed_image(size, 93);
    let img = dir.join("d.img");
    fs::write(&img, &data).unwrap();
    let first = dir.backup_cmd("vm", &[("d", &img)]).args(["--tag", "t"]).json();
    assert_json_documented("backup", &first);
    dir.repo_cmd("protect").arg(snap_id(&first)).ok();
    // A lie of the change list: a tainted restore point, an event, a suspect.
    data[8192..12288].fill(0x5a);
    fs::write(&img, &data).unwrap();
    let list = dir.join("changes.json");
    change_list(&list, size, &[]);
    let lying = |verify: &str| {
        let mut c = dir.repo_cmd("backup");
        c.args(["--vm", "vm", "--json", "--verify", verify, "--disk"]).arg(format!(
            "id=d,source={},cbt=changes:{}",
            img.display(),
            list.display()
        ));
        c
    };
    // Missed by a run that does not verify (a suspect later), caught by one that does.
    lying("none").ok();
    let (stdout, _) = lying("all").code(3);
    let tainted: Value = serde_json::from_str(&stdout).unwrap();
    assert!(!tainted["disks"][0]["mismatches"].as_array().unwrap().is_empty(), "{tainted}");
    assert_json_documented("backup", &tainted);
    dir.backup("vm", &[("d", &img)]);

    let json = |sub: &str, args: &[&str]| dir.repo_cmd(sub).args(args).arg("--json").json();
    let status = json("status", &[]);
    assert!(!status[0]["events"].as_array().unwrap().is_empty(), "{status}");
    assert_json_documented("status", &status);
    let snapshots = json("snapshots", &[]);
    assert!(snapshots.as_array().unwrap().iter().any(|s| s["suspect"] == true), "{snapshots}");
    assert_json_documented("snapshots", &snapshots);
    let mut c = dir.repo_cmd("verify");
    c.args(["vm:latest", "--json", "--disk"]).arg(format!("id=d,source={}", img.display()));
    assert_json_documented("verify", &c.json());
    assert_json_documented("check", &json("check", &["--read-data=all"]));
    assert_json_documented("forget", &json("forget", &["--keep-last", "1", "--dry-run"]));
    assert_json_documented("forget", &json("forget", &["--keep-last", "2", "--prune"]));
    assert_json_documented("gc", &json("gc", &[]));
    assert_json_documented("repair", &json("repair", &["--dry-run"]));
    assert_json_documented("stats", &json("stats", &[]));
    let keys = dir.cmd("key").arg("list").arg("--repo").arg(dir.repo()).arg("--json").json();
    assert_json_documented("key list", &keys);
    let out = dir.join("out.img");
    let mut c = dir.repo_cmd("restore");
    c.args(["vm:latest", "--disk", "d", "--json", "--to"]).arg(&out);
    assert_json_documented("restore", &c.json());
    let site2 = dir.join("site2");
    dir.cmd("init").arg("--repo").arg(&site2).args(["--kdf-memory", "8", "--kdf-iterations", "1"]).ok();
    let mut c = dir.repo_cmd("copy");
    c.arg("--to").arg(&site2).arg("--json").env("BLOCKPROOF_TO_PASSWORD", PASSWORD);
    assert_json_documented("copy", &c.json());
}
