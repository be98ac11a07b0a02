//! How blockproof talks when it is called wrongly or the system says no (DESIGN.md §5,
//! §8): exit code 2 for usage and 1 for errors, one clear line on stderr either way, the
//! offending argument or path named and the cause stated once; `--help` documents the
//! contract's options. (Disk-spec, vm-name, budget and restore-target usage errors are in
//! backup_restore.rs.)

mod harness;

use std::fs;

use harness::{mixed_image, Dir};

/// Errors found by the argument parser are usage errors like any other: exit 2 and one
/// line that names what is wrong, not a multi-line usage dump.
#[test]
fn argument_parser_errors_are_one_line_exit_2() {
    let dir = Dir::new();
    dir.init();
    let img = dir.join("d.img");
    fs::write(&img, mixed_image(1 << 20, 91)).unwrap();
    let spec = format!("id=d,source={}", img.display());
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["backup", "--vm", "v", "--disk", &spec, "--no-such-flag"], "--no-such-flag"),
        (vec!["backup", "--vm", "v"], "--disk"),
        (vec!["restore", "--disk", "d", "--to", "x.img"], "<SNAP>"),
        (vec!["restore", "v:latest", "--disk", "d", "--to"], "--to"),
        (vec!["check", "--read-data", "lots"], "lots"),
        (vec!["init", "--kdf-memory", "lots"], "--kdf-memory"),
    ];
    let mut problems = Vec::new();
    for (args, names) in cases {
        let mut cmd = dir.cmd(args[0]);
        cmd.arg("--repo").arg(dir.repo()).args(&args[1..]);
        problems.extend(one_line_error(&mut cmd, 2, names).err().map(|p| format!("{args:?}: {p}")));
    }
    problems
        .extend(one_line_error(&mut dir.cmd("frobnicate"), 2, "frobnicate").err().map(|p| format!("frobnicate: {p}")));
    assert!(problems.is_empty(), "{}", problems.join("\n\n"));
}

/// The error line if `cmd` failed as it should (the exit code, one line on stderr in
/// blockproof's own format, naming `names`); otherwise what is wrong.
fn one_line_error(cmd: &mut harness::TestCommand, code: i32, names: &str) -> Result<String, String> {
    let out = cmd.output();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    if out.status.code() != Some(code) {
        Err(format!("exit {:?}, expected {code}: {stderr}", out.status.code()))
    } else if stderr.lines().count() != 1 || !stderr.starts_with("blockproof: error: ") {
        Err(format!("expected one line \"blockproof: error: ...\", got {} lines:\n{stderr}", stderr.lines().count()))
    } else if !stderr.contains(names) {
        Err(format!("the error does not name {names}: {stderr}"))
    } else {
        Ok(stderr)
    }
}

/// A failed system call is reported once, with the path: anyhow's `{:#}` already appends
/// an error's source, so a message that also embeds it says "(os error 2)" twice.
#[test]
fn system_errors_name_the_path_and_state_the_cause_once() {
    let dir = Dir::new();
    dir.init();
    let img = dir.join("d.img");
    fs::write(&img, mixed_image(1 << 20, 92)).unwrap();
    dir.backup("v", &[("d", &img)]);
    let missing_dir = dir.join("no-such-dir");
    let target = missing_dir.join("x.img");
    let not_a_dir = dir.join("plain-file");
    fs::write(&not_a_dir, b"x").unwrap();

    let cases: Vec<(harness::TestCommand, String)> = vec![
        (
            {
                let mut c = dir.repo_cmd("backup");
                c.args(["--vm", "v", "--disk", "id=d,source=/no/such/disk.img"]);
                c
            },
            "/no/such/disk.img".into(),
        ),
        (
            {
                let mut c = dir.repo_cmd("restore");
                c.args(["v:latest", "--disk", "d", "--to"]).arg(&target);
                c
            },
            missing_dir.display().to_string(),
        ),
        (
            {
                let mut c = dir.cmd("init");
                c.arg("--repo").arg(not_a_dir.join("repo")).args(["--kdf-memory", "8"]);
                c
            },
            not_a_dir.display().to_string(),
        ),
    ];
    let mut problems = Vec::new();
    for (mut cmd, path) in cases {
        match one_line_error(&mut cmd, 1, &path) {
            Err(p) => problems.push(p),
            Ok(line) if line.matches("(os error").count() != 1 => {
                problems.push(format!("the cause is not stated exactly once: {}", line.trim_end()))
            }
            Ok(_) => {}
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// Bad sources, names and passwords: never a panic, one line naming the culprit.
#[test]
fn bad_inputs_are_clear_one_line_errors() {
    let dir = Dir::new();
    dir.init();
    let img = dir.join("d.img");
    fs::write(&img, mixed_image(1 << 20, 93)).unwrap();
    let spec = format!("id=d,source={}", img.display());
    let not_a_repo = dir.join("empty-dir");
    fs::create_dir(&not_a_repo).unwrap();
    let empty_pw = dir.join("empty-pw");
    fs::write(&empty_pw, b"\n").unwrap();

    let backup = |disks: &[&str]| {
        let mut c = dir.repo_cmd("backup");
        c.args(["--vm", "v"]);
        for d in disks {
            c.args(["--disk", d]);
        }
        c
    };
    let dir_spec = format!("id=d,source={}", dir.path().display());
    let cases: Vec<(harness::TestCommand, i32, &str)> = vec![
        (backup(&[&dir_spec]), 1, "not a regular file"),
        (backup(&["id=d,source=/dev/null"]), 1, "/dev/null"),
        (backup(&[&spec, &spec]), 2, "twice"),
        (backup(&[&format!("{spec},cbt=bitmap:nightly")]), 2, "bitmap:nightly"),
        (backup(&["id=d,source=disk.qcow2"]), 1, "cannot open source disk.qcow2"),
        (backup(&["id=d,source=disk.vmdk,cbt=bitmap:auto"]), 2, "bitmap:auto needs a .qcow2"),
        (backup(&[&format!("{spec},cbt=changes:")]), 2, "unknown change source"),
        (backup(&[&format!("{spec},cbt=changes:/no/such.json")]), 1, "/no/such.json"),
        (backup(&["id=d,source=nbd+unix:///x?socket=/no/such.sock"]), 1, "/no/such.sock"),
        (
            {
                let mut c = dir.cmd("snapshots");
                c.arg("--repo").arg(&not_a_repo);
                c
            },
            1,
            "not a blockproof repository",
        ),
        (
            {
                let mut c = dir.repo_cmd("snapshots");
                c.arg("--password-file").arg(dir.join("no-such-file"));
                c
            },
            1,
            "no-such-file",
        ),
        (
            {
                let mut c = dir.repo_cmd("snapshots");
                c.arg("--password-file").arg(&empty_pw);
                c
            },
            1,
            "empty",
        ),
        (
            {
                let mut c = dir.repo_cmd("snapshots");
                c.env("BLOCKPROOF_PASSWORD", "");
                c
            },
            1,
            "empty",
        ),
    ];
    for (mut cmd, code, says) in cases {
        let line = cmd.fails_with_one_line(code);
        assert!(line.contains(says), "the error says {says:?}: {line}");
    }
    assert!(dir.snapshots().is_empty(), "no failed backup left a snapshot");
}

#[test]
fn help_documents_the_contract_options() {
    let dir = Dir::new();
    for (sub, options) in [
        ("init", &["--repo", "--password-file"][..]),
        ("backup", &["--repo", "--vm", "--disk", "--verify", "--full", "--json", "id=", "source="]),
        ("snapshots", &["--repo", "--vm", "--json"]),
        ("restore", &["--repo", "--disk", "--to", "--force", "latest"]),
        ("check", &["--repo", "--read-data", "--json"]),
        ("demo", &[]),
    ] {
        let help = dir.cmd(sub).arg("--help").ok();
        for o in options {
            assert!(help.contains(o), "{sub} --help mentions {o}:\n{help}");
        }
    }
    let version = dir.cmd("--version").ok();
    assert!(version.starts_with("blockproof "), "{version}");
}

/// Each command's one-line summary in `blockproof --help` is its own: `completions` once
/// carried `run`'s summary glued to its own, and `run` the summary of its S3 options.
#[test]
fn every_command_summary_is_its_own() {
    let help = Dir::new().cmd("--help").ok();
    let summary = |name: &str| -> String {
        let at = help.find(&format!("\n  {name} ")).unwrap_or_else(|| panic!("{name} in:\n{help}"));
        help[at + 3 + name.len()..].lines().next().unwrap().trim().to_string()
    };
    assert!(summary("completions").starts_with("Print a shell completion script"), "{help}");
    assert!(summary("run").starts_with("Run a job file"), "{help}");
    assert!(summary("man").starts_with("Write the manual pages"), "{help}");
    assert!(!help.contains("How to reach repositories"), "{help}");
}

/// `blockproof status --json | head -c1` closed the pipe under the command; `println!`
/// then panicked (exit 101, a panic message on stderr), and a backup whose report could
/// not be printed lost its real exit code. Output to a closed pipe is dropped; the exit
/// code is the command's own: 0 for a good backup, 3 for a tainted one.
#[test]
fn a_closed_output_pipe_keeps_the_exit_code() {
    let dir = Dir::new();
    dir.init();
    let size = 1 << 20;
    let mut data = mixed_image(size, 92);
    let img = dir.join("d.img");
    fs::write(&img, &data).unwrap();
    let (code, stderr) = dir.backup_cmd("vm", &[("d", &img)]).run_into_closed_pipe();
    assert_eq!(code, Some(0), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    for cmd in [&["status", "--json"][..], &["snapshots"], &["snapshots", "--json"], &["check"]] {
        let (code, stderr) = dir.repo_cmd(cmd[0]).args(&cmd[1..]).run_into_closed_pipe();
        assert_eq!(code, Some(0), "{cmd:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{cmd:?}: {stderr}");
    }
    // A lie the change list tells is caught; the tainted exit code survives the pipe.
    data[4096..8192].fill(0x5a);
    fs::write(&img, &data).unwrap();
    let list = dir.join("changes.json");
    harness::change_list(&list, size, &[]);
    let mut c = dir.repo_cmd("backup");
    c.args(["--vm", "vm", "--json", "--verify", "100%", "--disk"]).arg(format!(
        "id=d,source={},cbt=changes:{}",
        img.display(),
        list.display()
    ));
    let (code, stderr) = c.run_into_closed_pipe();
    assert_eq!(code, Some(3), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    // Output that cannot be written for another reason (a full disk) is an error, in one
    // line, not a panic.
    let (code, stderr) = dir.repo_cmd("snapshots").arg("--json").run_into_full_device();
    assert_eq!(code, Some(1), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("cannot write to standard output"), "{stderr}");
}

/// The repository may come from BLOCKPROOF_REPO, so usage lines must not mark `--repo` as
/// required, and a missing repository says both ways to give it; a target that is not a
/// repository says how to create one.
#[test]
fn the_repository_comes_from_repo_or_blockproof_repo() {
    let dir = Dir::new();
    dir.init();
    let help = dir.cmd("snapshots").arg("--help").ok();
    let usage = help.lines().find(|l| l.starts_with("Usage:")).unwrap();
    assert!(!usage.contains("--repo"), "{usage}");
    assert!(help.contains("BLOCKPROOF_REPO"), "{help}");
    let line = dir.cmd("snapshots").fails_with_one_line(2);
    assert!(line.contains("--repo") && line.contains("BLOCKPROOF_REPO"), "{line}");
    dir.cmd("snapshots").env("BLOCKPROOF_REPO", dir.repo().to_str().unwrap()).ok();
    let empty = dir.join("offsite");
    fs::create_dir(&empty).unwrap();
    let line = dir
        .repo_cmd("copy")
        .arg("--to")
        .arg(&empty)
        .env("BLOCKPROOF_TO_PASSWORD", harness::PASSWORD)
        .fails_with_one_line(1);
    assert!(line.contains("blockproof init"), "{line}");
}

/// `check --read-data 10%` was refused (only `--read-data=10%` worked); both forms work,
/// and `--read-data` alone still means all.
#[test]
fn read_data_takes_its_budget_with_or_without_equals() {
    let dir = Dir::new();
    dir.init();
    let img = dir.join("d.img");
    fs::write(&img, mixed_image(1 << 20, 94)).unwrap();
    dir.backup("v", &[("d", &img)]);
    for args in [&["--read-data", "10%"][..], &["--read-data=10%"], &["--read-data", "--json"]] {
        let out = dir.repo_cmd("check").args(args).ok();
        assert!(!out.is_empty(), "{args:?}");
    }
}

/// Completions and manual pages come from the command-line definitions: the bash script
/// is valid bash that knows the commands, and there is a page per command, with its
/// example.
#[test]
fn completions_and_manual_pages_are_generated() {
    let dir = Dir::new();
    let script = dir.cmd("completions").arg("bash").ok();
    assert!(script.contains("restore-files") && script.contains("--keep-within"), "the commands and options");
    let file = dir.join("blockproof.bash");
    fs::write(&file, &script).unwrap();
    let syntax = std::process::Command::new("bash").arg("-n").arg(&file).output().unwrap();
    assert!(syntax.status.success(), "{}", String::from_utf8_lossy(&syntax.stderr));
    for shell in ["zsh", "fish"] {
        assert!(!dir.cmd("completions").arg(shell).ok().is_empty(), "{shell}");
    }
    let man = dir.join("man1");
    dir.cmd("man").arg("--to").arg(&man).ok();
    for page in ["blockproof.1", "blockproof-backup.1", "blockproof-key-add.1", "blockproof-diff.1"] {
        let text = fs::read_to_string(man.join(page)).unwrap_or_else(|e| panic!("{page}: {e}"));
        assert!(text.starts_with(".ie") || text.contains(".TH"), "{page} is a manual page");
    }
    let backup = fs::read_to_string(man.join("blockproof-backup.1")).unwrap();
    assert!(backup.contains("Example"), "the example is in the page");
}

/// Times in text output are one form: RFC 3339 to the second in UTC with `Z` — `status`,
/// `stats` and `forget` printed them without a zone (and `ls` with a space) — or, with
/// `--local-time`, in the local zone with its offset. JSON keeps UTC.
#[test]
fn times_are_rfc3339_utc_or_local_on_request() {
    let dir = Dir::new();
    dir.init();
    let img = dir.random_image("d.img", 1 << 20, 5);
    dir.backup_cmd("v", &[("d", &img)]).ok();
    let utc = utc_time();
    for sub in [&["status"][..], &["stats"], &["snapshots"], &["forget", "--keep-last", "1", "--dry-run"]] {
        let out = dir.repo_cmd(sub[0]).args(&sub[1..]).ok();
        assert!(utc(&out), "{sub:?} prints a UTC time with Z:\n{out}");
        let local = dir.repo_cmd(sub[0]).args(&sub[1..]).arg("--local-time").env("TZ", "Etc/GMT-2").ok();
        assert!(local.contains("+02:00"), "{sub:?} --local-time prints the offset:\n{local}");
    }
    let json = dir.repo_cmd("snapshots").args(["--json", "--local-time"]).env("TZ", "Etc/GMT-2").ok();
    assert!(json.contains("Z\""), "JSON stays UTC: {json}");
}

/// A matcher for `YYYY-MM-DDTHH:MM:SSZ` not followed by more digits or letters.
fn utc_time() -> impl Fn(&str) -> bool {
    |text: &str| {
        text.match_indices('T').any(|(at, _)| {
            let (Some(before), Some(after)) = (text.get(at.saturating_sub(10)..at), text.get(at + 1..at + 10)) else {
                return false;
            };
            let date = before.len() == 10 && before.as_bytes()[4] == b'-' && before.as_bytes()[7] == b'-';
            let time = after.as_bytes()[2] == b':' && after.as_bytes()[5] == b':' && after.as_bytes()[8] == b'Z';
            let next = text[at + 10..].chars().next();
            date && time && next.is_none_or(|c| !c.is_ascii_alphanumeric())
        })
    }
}

/// One vocabulary: `--disk` names a disk by its id everywhere — bare, or `id=ID` as in a
/// backup spec (restore refused `id=d`, the form backup had just taught) — and a source
/// where none is read is a one-line usage error. Every command calls a snapshot `SNAP`.
#[test]
fn disk_means_one_thing_and_snapshots_are_snap() {
    let dir = Dir::new();
    dir.init();
    let img = dir.random_image("d.img", 1 << 20, 6);
    dir.backup_cmd("v", &[("d", &img)]).ok();
    let to = dir.join("r.raw");
    dir.repo_cmd("restore").args(["v:latest", "--disk", "id=d", "--to"]).arg(&to).ok();
    assert_eq!(std::fs::read(&to).unwrap(), std::fs::read(&img).unwrap());
    let line = dir
        .repo_cmd("restore")
        .args(["v:latest", "--disk", "id=d,source=/dev/sda", "--to"])
        .arg(dir.join("x"))
        .fails_with_one_line(2);
    assert!(line.contains("source= has no meaning here"), "{line}");
    let diff = dir.repo_cmd("diff").args(["v:latest", "v:latest", "--disk", "id=d"]).ok();
    assert!(diff.contains("disk d"), "{diff}");
    for sub in ["restore", "serve-nbd", "mount", "verify", "protect", "unprotect", "forget", "copy", "ls", "cat"] {
        let help = dir.cmd(sub).arg("--help").ok();
        let usage = help.lines().find(|l| l.starts_with("Usage:")).unwrap();
        assert!(usage.contains("SNAP") && !usage.contains("SNAPSHOT"), "{sub}: {usage}");
    }
}
