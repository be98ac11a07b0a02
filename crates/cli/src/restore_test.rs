//! `blockproof restore-test SNAP`: prove a restore point restores, at the filesystem
//! level and without booting it — every filesystem of every disk walked with the
//! in-process readers (blockproof_fs::survey), a verdict per filesystem, and the outcome
//! stored in the repository as evidence (blockproof_core::restore_test). With `--boot`,
//! the restore point is booted instead (`boot_test.rs`); both end in [`print_record`].

use std::time::{Instant, SystemTime};

use anyhow::Result;
use blockproof_core::restore_test::{ExpectedPath, RestoreTest, TestKind, TestProblem, TestedFilesystem};
use blockproof_format::DiskEntry;
use blockproof_fs::{Disk, FsPath, SurveyOptions};
use blockproof_repo::SnapshotInfo;
use clap::Args;

use crate::args::RepoArgs;
use crate::boot_test::BootArgs;
use crate::commands::{count, human_bytes, open_repo, print_json, resolve_for_reading};
use crate::{exit, Usage};

#[derive(Args, Debug)]
pub struct RestoreTestArgs {
    #[command(flatten)]
    pub repo: RepoArgs,
    /// Snapshot: id, unique id prefix, VM:latest, VM:latest~N, VM:tag=TAG or VM:before=TIME.
    #[arg(value_name = "SNAP")]
    pub snapshot: String,
    /// Test only this disk (default: every disk of the snapshot).
    #[arg(long, value_name = "ID", value_parser = crate::disk_spec::disk_id)]
    pub disk: Option<String>,
    /// The share of regular files whose contents are read to the end (0% to 100%;
    /// default 5%). Every directory, entry and symlink is read whatever the share.
    #[arg(long, value_name = "PCT", default_value = "5%", value_parser = parse_share, conflicts_with = "boot")]
    pub sample: f64,
    /// A path that must exist in one of the snapshot's filesystems (`/etc/hostname`);
    /// a regular file is read whole. Repeatable.
    #[arg(long, value_name = "PATH", conflicts_with = "boot")]
    pub expect: Vec<String>,
    /// Chooses which files the sample reads (the same seed reads the same files).
    #[arg(long, value_name = "N", default_value_t = 0, conflicts_with = "boot")]
    pub seed: u64,
    /// Do not store the outcome in the repository.
    #[arg(long)]
    pub no_record: bool,
    /// Print the record as JSON.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub boot: BootArgs,
}

fn parse_share(s: &str) -> Result<f64, String> {
    let pct = s.strip_suffix('%').unwrap_or(s);
    match pct.parse::<f64>() {
        Ok(p) if (0.0..=100.0).contains(&p) => Ok(p / 100.0),
        _ => Err(format!("invalid share {s:?}: give a percentage from 0% to 100%")),
    }
}

pub fn restore_test(a: RestoreTestArgs) -> Result<u8> {
    if a.boot.boot {
        return crate::boot_test::boot_test(a);
    }
    if a.boot.machine.given() {
        return Err(Usage("--memory, --cpus, --accel, --firmware and --kernel need --boot".into()).into());
    }
    let expect: Vec<FsPath> = a
        .expect
        .iter()
        .map(|p| FsPath::parse(p.as_bytes()).map_err(|e| Usage(format!("invalid --expect {p:?}: {e}"))))
        .collect::<Result<_, _>>()?;
    let repo: &'static blockproof_repo::Repository = Box::leak(Box::new(open_repo(&a.repo)?));
    let info = resolve_for_reading(repo, &a.snapshot)?;
    let test = fs_test(repo, &info, a.disk.as_deref(), a.sample, a.seed, &expect)?;
    print_record(&a, repo, &test)
}

/// The filesystem-level test of restore point `info` (every disk, or `disk`): every
/// filesystem walked, `sample` of the regular files read whole (chosen by `seed`), the
/// `expect`ed paths looked up; the record, not yet stored. Also `run`'s restore tests.
pub(crate) fn fs_test(
    repo: &'static blockproof_repo::Repository,
    info: &SnapshotInfo,
    disk: Option<&str>,
    sample: f64,
    seed: u64,
    expect: &[FsPath],
) -> Result<RestoreTest> {
    let started = Instant::now();
    let time = humantime::format_rfc3339_micros(SystemTime::now()).to_string();
    let disks = selected_disks(info, disk)?;
    let reader = crate::files::leaked_reader(repo)?;
    let opts = SurveyOptions { sample, seed, expect: expect.to_vec() };
    let mut filesystems = Vec::new();
    let mut unchecked = Vec::new();
    let mut found: Vec<Vec<String>> = vec![Vec::new(); expect.len()];
    for entry in &disks {
        let disk = match Disk::open(crate::files::snapshot_disk(reader, entry)?) {
            Ok(d) => d,
            Err(e) => {
                // A damaged partition table is a failure of this disk's restore.
                filesystems.push(failed_open(&entry.id, 0, "?", e.to_string()));
                continue;
            }
        };
        let readable: Vec<_> =
            disk.partitions().iter().filter(|p| p.filesystem.is_some_and(|k| k.is_readable())).cloned().collect();
        if readable.is_empty() {
            unchecked.push(entry.id.clone());
            continue;
        }
        for p in readable {
            let kind = p.filesystem.map(|k| k.to_string()).unwrap_or_default();
            let fs = match disk.open_filesystem(Some(p.index)) {
                Ok(fs) => fs,
                Err(e) => {
                    filesystems.push(failed_open(&entry.id, p.index, &kind, e.to_string()));
                    continue;
                }
            };
            let s = blockproof_fs::survey(&fs, &opts);
            for (i, e) in s.expected.iter().enumerate() {
                if e.kind.is_some() {
                    found[i].push(format!("{}/part{}", entry.id, p.index));
                }
            }
            filesystems.push(TestedFilesystem {
                disk: entry.id.clone(),
                partition: p.index,
                filesystem: kind,
                dirs: s.dirs,
                files: s.files,
                symlinks: s.symlinks,
                others: s.others,
                files_read: s.files_read,
                bytes_read: s.bytes_read,
                passed: s.problem_count == 0,
                problem_count: s.problem_count,
                problems: s.problems.into_iter().map(|p| TestProblem { path: p.path, error: p.error }).collect(),
            });
        }
    }
    let expected: Vec<ExpectedPath> =
        expect.iter().zip(found).map(|(p, found_in)| ExpectedPath { path: p.to_string(), found_in }).collect();
    let reason = verdict(&filesystems, &expected);
    Ok(RestoreTest {
        snapshot: info.id,
        vm: info.snapshot.vm.clone(),
        time,
        kind: TestKind::Filesystem,
        passed: reason.is_none(),
        reason,
        duration_seconds: started.elapsed().as_secs_f64(),
        hostname: blockproof_core::hostname(),
        program: format!("blockproof {}", env!("CARGO_PKG_VERSION")),
        sample,
        filesystems,
        unchecked_disks: unchecked,
        expected,
        boot_seconds: None,
        console_excerpt: None,
        check: None,
        accelerator: None,
    })
}

/// The disks to test: `--disk ID`, or every disk of the snapshot in its order.
pub(crate) fn selected_disks(info: &SnapshotInfo, disk: Option<&str>) -> Result<Vec<DiskEntry>> {
    Ok(match disk {
        Some(id) => vec![info.snapshot.disk(id).cloned().ok_or_else(|| {
            let ids: Vec<_> = info.snapshot.disks.iter().map(|d| d.id.as_str()).collect();
            Usage(format!("snapshot {} has no disk {id:?} (it has: {})", info.id.short(), ids.join(", ")))
        })?],
        None => info.snapshot.disks.clone(),
    })
}

/// Stores the record (unless `--no-record`), prints it, and gives the exit code: 0 when
/// the test passed, 1 when it failed.
pub(crate) fn print_record(a: &RestoreTestArgs, repo: &blockproof_repo::Repository, test: &RestoreTest) -> Result<u8> {
    if !a.no_record {
        blockproof_core::restore_test::record(repo, test)?;
    }
    if a.json {
        print_json(test)?;
    } else {
        if test.kind == TestKind::Boot {
            print_boot_text(test);
        }
        print_text(test, !a.no_record);
    }
    Ok(if test.passed { exit::OK } else { exit::ERROR })
}

/// What a boot test booted and saw; on a failure, the end of the console.
fn print_boot_text(t: &RestoreTest) {
    if let Some(c) = &t.check {
        let how = match (&c.kernel, &t.accelerator) {
            (Some(k), Some(acc)) => format!("kernel {k}, {acc}"),
            (None, Some(acc)) => format!("firmware, {acc}"),
            (_, None) => "not started".to_string(),
        };
        let mut checks = Vec::new();
        if let Some(m) = &c.console_marker {
            checks.push(match t.boot_seconds {
                Some(s) => format!("{m:?} on the console after {s:.1}s"),
                None => format!("{m:?} not seen"),
            });
        }
        if let Some(s) = &c.script {
            checks.push(format!("script {s}"));
        }
        println!("booted {} ({how}): {}", c.disks.join(", "), checks.join("; "));
    }
    if !t.passed {
        if let Some(console) = t.console_excerpt.as_deref().filter(|c| !c.trim().is_empty()) {
            println!("console (last lines):");
            let lines: Vec<&str> = console.lines().collect();
            for l in &lines[lines.len().saturating_sub(10)..] {
                println!("  {l}");
            }
        }
    }
}

fn failed_open(disk: &str, partition: u32, kind: &str, error: String) -> TestedFilesystem {
    TestedFilesystem {
        disk: disk.into(),
        partition,
        filesystem: kind.into(),
        dirs: 0,
        files: 0,
        symlinks: 0,
        others: 0,
        files_read: 0,
        bytes_read: 0,
        problems: vec![TestProblem { path: "/".into(), error }],
        problem_count: 1,
        passed: false,
    }
}

/// Why the test failed, or `None`: every filesystem walked without a problem, every
/// expected path found, and at least one filesystem tested.
fn verdict(filesystems: &[TestedFilesystem], expected: &[ExpectedPath]) -> Option<String> {
    let failed: Vec<String> = filesystems
        .iter()
        .filter(|f| !f.passed)
        .map(|f| {
            let first = f.problems.first().map(|p| format!(": {} ({})", p.path, p.error)).unwrap_or_default();
            format!("{}/part{} {} has {}{first}", f.disk, f.partition, f.filesystem, count(f.problem_count, "problem"))
        })
        .collect();
    let missing: Vec<&str> = expected.iter().filter(|e| e.found_in.is_empty()).map(|e| e.path.as_str()).collect();
    if filesystems.is_empty() {
        return Some("no filesystem blockproof can read (ext2/3/4, FAT, NTFS) on any tested disk".into());
    }
    let mut why = failed;
    if !missing.is_empty() {
        why.push(format!("missing: {}", missing.join(", ")));
    }
    (!why.is_empty()).then(|| why.join("; "))
}

fn print_text(t: &RestoreTest, recorded: bool) {
    for f in &t.filesystems {
        println!(
            "{}/part{} {}: {} dirs, {} files, {} symlinks; read {} files ({}): {}",
            f.disk,
            f.partition,
            f.filesystem,
            f.dirs,
            f.files,
            f.symlinks,
            f.files_read,
            human_bytes(f.bytes_read),
            if f.passed { "ok".to_string() } else { count(f.problem_count, "problem") }
        );
        for p in &f.problems {
            println!("  {}: {}", p.path, p.error);
        }
    }
    for d in &t.unchecked_disks {
        println!("{d}: no filesystem blockproof can read; not checked");
    }
    for e in &t.expected {
        match e.found_in.as_slice() {
            [] => println!("expected {}: missing", e.path),
            found => println!("expected {}: found in {}", e.path, found.join(", ")),
        }
    }
    let outcome = match &t.reason {
        None => "passed".to_string(),
        Some(why) => format!("FAILED: {why}"),
    };
    println!(
        "restore test{} of snapshot {} of vm {} {outcome} ({:.1}s){}",
        if t.kind == TestKind::Boot { " (boot)" } else { "" },
        t.snapshot.short(),
        t.vm,
        t.duration_seconds,
        if recorded { "; recorded in the repository" } else { "" }
    );
}
