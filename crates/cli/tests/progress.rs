//! Progress when stderr is not a terminal (`2>&1 | tee log`): a line with the rate and
//! the time left every `--progress-interval` while a phase runs, a line per phase start
//! and end with `-v`, nothing with `-q`; bars that count items say so (copy counted disks
//! as bytes: `0 B/2 B`), and verification's bar moves.

mod harness;

use harness::nbdkit::Nbdkit;
use harness::{Dir, PASSWORD};

#[test]
fn progress_lines_when_stderr_is_not_a_terminal() {
    let dir = Dir::new();
    dir.init();
    // 4 MiB through a 1 MiB/s source: about four seconds of reading.
    let img = dir.random_image("d.img", 4 << 20, 95);
    let slow = Nbdkit::start(&dir, "slow", &["--filter=rate", "file", img.to_str().unwrap(), "rate=8M"]);
    dir.backup("v", &[("d", &img)]);
    let empty = dir.join("changes.json");
    harness::change_list(&empty, 4 << 20, &[]);
    let run = |full: bool, extra: &[&str]| {
        let cbt = if full { String::new() } else { format!(",cbt=changes:{}", empty.display()) };
        let mut c = dir.repo_cmd("backup");
        c.args(["--vm", "v", "--verify", "all", "--disk"]).arg(format!("id=d,source={}{cbt}", slow.uri()));
        if full {
            c.arg("--full");
        }
        let out = c.args(extra).output();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stderr).unwrap()
    };
    let lines = run(true, &["--progress-interval", "1"]);
    let line = lines.lines().find(|l| l.starts_with("blockproof: backup d: ")).unwrap_or_else(|| panic!("{lines}"));
    assert!(line.contains(" of 4.0 MiB (") && line.contains("/s") && line.contains("left"), "{line}");
    assert!(!lines.contains("started"), "auto shows no phase lines: {lines}");
    // Verification of what the (empty) change list left unread: its line moves.
    let lines = run(false, &["--progress-interval", "1"]);
    let line = lines.lines().find(|l| l.starts_with("blockproof: verify d: ")).unwrap_or_else(|| panic!("{lines}"));
    assert!(!line.starts_with("blockproof: verify d: 0 B of"), "{line}");

    let quiet = run(false, &["-q", "--progress-interval", "1"]);
    assert!(quiet.is_empty(), "{quiet}");
    // The default interval (10 s) is longer than a backup of the image itself (well under
    // a second, so a loaded machine cannot stretch it past the interval): nothing.
    let out = dir.backup_cmd("v", &[("d", &img)]).output();
    assert!(out.status.success());
    let default = String::from_utf8(out.stderr).unwrap();
    assert!(default.is_empty(), "{default}");

    let verbose = run(true, &["-v"]);
    assert!(verbose.contains("blockproof: backup d: started, 4.0 MiB"), "{verbose}");
    assert!(
        verbose
            .lines()
            .any(|l| l.starts_with("blockproof: backup d: 4.0 MiB of 4.0 MiB (100%)") && l.contains("done in")),
        "{verbose}"
    );

    let site2 = dir.join("site2");
    dir.cmd("init").arg("--repo").arg(&site2).args(["--kdf-memory", "8", "--kdf-iterations", "1"]).ok();
    let mut c = dir.repo_cmd("copy");
    c.arg("--to").arg(&site2).arg("-v").env("BLOCKPROOF_TO_PASSWORD", PASSWORD);
    let out = c.output();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains(": started, 1\n") && stderr.contains("1 of 1 (100%)"), "{stderr}");
    assert!(!stderr.contains(" B of "), "copy counts disks, not bytes: {stderr}");
}
