//! One function per command: parse arguments, call blockproof-core, print the report.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use blockproof_core::budget::parse_size;
use blockproof_core::{BackupOptions, Budget, CheckOptions, OnMismatch, RestoreFormat, RestoreOptions};
use blockproof_format::config::ZSTD_LEVELS;
use blockproof_format::SnapshotStatus;
use blockproof_format::{Codec, KdfParams};
use blockproof_repo::{BlobIndex, InitOptions, Repository, Skipped, SnapshotInfo};
use serde::Serialize;

use crate::args::{BackupArgs, CheckArgs, Cli, Command, InitArgs, RepoArgs, RestoreArgs, VmArgs};
use crate::{exit, password, progress, Usage};

pub fn run(cli: Cli) -> Result<u8> {
    match cli.command {
        Command::Init(a) => init(a),
        Command::Backup(a) => backup(a),
        Command::Snapshots(a) => snapshots(a),
        Command::Restore(a) => restore(a),
        Command::Status(a) => crate::audit::status(a),
        Command::ServeNbd(a) => crate::serve::serve_nbd(a),
        Command::Mount(a) => crate::mount::mount(a),
        Command::Forget(a) => crate::lifecycle::forget(a),
        Command::Gc(a) => crate::lifecycle::gc(a),
        Command::Protect(a) => crate::lifecycle::protect(a, true),
        Command::Unprotect(a) => crate::lifecycle::protect(a, false),
        Command::Unlock(a) => crate::lifecycle::unlock(a),
        Command::Cleanup(a) => crate::live::cleanup(a),
        Command::Repair(a) => crate::lifecycle::repair(a),
        Command::Key(k) => crate::lifecycle::key(k),
        Command::Server(c) => crate::repo_server::run(c),
        Command::Copy(a) => crate::lifecycle::copy(a),
        Command::Stats(a) => crate::audit::stats(a),
        Command::Verify(a) => crate::audit::verify(a),
        Command::Check(a) => check(a),
        Command::Diff(a) => crate::audit::diff(a),
        Command::Completions(a) => crate::reference::completions(a),
        Command::Man(a) => crate::reference::man(a),
        Command::Demo(a) => crate::demo::run(a),
        Command::Partitions(a) => crate::files::partitions(a),
        Command::Ls(a) => crate::files::ls(a),
        Command::Cat(a) => crate::files::cat(a),
        Command::RestoreFiles(a) => crate::files::restore_files(a),
        Command::RestoreTest(a) => crate::restore_test::restore_test(a),
        Command::Recover(a) => crate::recover::recover(a),
        Command::Run(a) => crate::jobs::run(a),
        Command::Schedule(a) => crate::jobs::schedule(a),
    }
}

/// Opens the repository named by `--repo` with the user's password.
pub fn open_repo(args: &RepoArgs) -> Result<Repository> {
    let backend = crate::location::backend(args.location()?, &args.store, false)?;
    let pw = password::password(args.password_file.as_deref(), false)?;
    let mut repo = Repository::open(backend, &pw)?;
    repo.set_index_cache(crate::location::index_cache(&args.store, args.location()?));
    Ok(repo)
}

/// Prints the warnings for files a tolerant read skipped (stray and damaged files).
pub fn warn_skipped(skipped: &Skipped) {
    for w in skipped.warnings() {
        eprintln!("blockproof: warning: {w}");
    }
}

/// Resolves a snapshot for reading it, warning about the snapshot files skipped.
pub fn resolve_for_reading(repo: &Repository, reference: &str) -> Result<SnapshotInfo> {
    let (info, skipped) = repo.resolve_snapshot_for_reading(reference)?;
    warn_skipped(&skipped);
    Ok(info)
}

/// The blob index for reading, warning about the index files skipped.
pub fn index_for_reading(repo: &Repository) -> Result<BlobIndex> {
    let (index, skipped) = BlobIndex::scan(repo, &Default::default())?;
    warn_skipped(&skipped);
    Ok(index)
}

/// `1 pack`, `2 packs`: a count with its noun in the right number.
pub fn count(n: u64, noun: &str) -> String {
    if n == 1 {
        format!("1 {noun}")
    } else {
        format!("{n} {noun}s")
    }
}

/// A byte range as every text output writes it: `OFFSET+LENGTH` (JSON has both fields).
pub fn range_text(offset: u64, length: u64) -> String {
    format!("{offset}+{length}")
}

/// `1.5 GiB`-style sizes for people (the one formatter, shared with the fleet's reports).
pub use blockproof_core::budget::format_size as human_bytes;

pub fn print_json<T: Serialize>(value: &T) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

fn init(a: InitArgs) -> Result<u8> {
    let chunk_size = parse_size(&a.chunk_size)
        .and_then(|v| u32::try_from(v).ok())
        .ok_or_else(|| Usage(format!("invalid --chunk-size {:?}", a.chunk_size)))?;
    let kdf = KdfParams { m_cost_kib: a.kdf_memory.saturating_mul(1024), t_cost: a.kdf_iterations, p_cost: 1 };
    if !kdf.in_range() {
        return Err(Usage(format!(
            "--kdf-memory must be 1..4096 MiB and --kdf-iterations 1..{}",
            KdfParams::MAX_T_COST
        ))
        .into());
    }
    if !chunk_size.is_power_of_two() || !(4096..=4 << 20).contains(&chunk_size) {
        return Err(Usage(format!("--chunk-size must be a power of two from 4KiB to 4MiB, not {chunk_size}")).into());
    }
    let pack_size = parse_size(&a.pack_size)
        .and_then(|v| u32::try_from(v).ok())
        .filter(|&v| (chunk_size..=1 << 30).contains(&v))
        .ok_or_else(|| Usage(format!("invalid --pack-size {:?}: from the chunk size to 1GiB", a.pack_size)))?;
    let (compression, zstd_level) = Codec::parse_setting(&a.compression).ok_or_else(|| {
        Usage(format!(
            "invalid --compression {:?}: lz4, zstd or zstd:LEVEL ({} to {})",
            a.compression,
            ZSTD_LEVELS.start(),
            ZSTD_LEVELS.end()
        ))
    })?;
    let opts = InitOptions { chunk_size, pack_size, kdf, compression, zstd_level };
    let pw = password::password(a.repo.password_file.as_deref(), true)?;
    let location = a.repo.location()?;
    let backend = crate::location::backend(location, &a.repo.store, true)?;
    let repo = Repository::init(backend, &pw, &opts)?;
    if a.json {
        print_json(&serde_json::json!({
            "repository": repo.id(),
            "path": location,
            "chunk_size": repo.config().chunk_size,
            "compression": repo.config().compression_setting(),
        }))?;
    } else {
        println!(
            "created repository {} at {} (chunk size {}, {} compression)",
            repo.id().short(),
            location,
            human_bytes(u64::from(repo.config().chunk_size)),
            repo.config().compression_setting()
        );
        println!("keep the password safe: without it the data cannot be read by anyone.");
    }
    Ok(exit::OK)
}

fn backup(mut a: BackupArgs) -> Result<u8> {
    a.repo.store.vm = Some(a.vm.clone());
    let verify = match &a.verify {
        Some(v) => Budget::parse(v).map_err(Usage)?,
        None => blockproof_core::default_verify_budget(),
    };
    let on_mismatch: OnMismatch = a.on_mismatch.into();
    let disks = a.disks.iter().map(|s| crate::disk_spec::input(s)).collect::<Result<Vec<_>, _>>()?;
    let from = a.from.as_deref().map(crate::live::VmSource::parse).transpose()?;
    let repo = open_repo(&a.repo)?;
    // A running VM: its point-in-time view is set up now and torn down after the backup.
    let live = match &from {
        Some(f) => Some(f.start(&repo, &a.vm, a.state_dir.as_deref(), std::time::Duration::from_secs(a.lock_wait))?),
        None => None,
    };
    let disks = match &live {
        Some(l) => l.inputs(),
        None => disks,
    };
    let opts = BackupOptions {
        vm: a.vm,
        disks,
        tags: a.tags,
        hostname: blockproof_core::hostname(),
        full: a.full,
        verify,
        on_mismatch,
        lock_wait: std::time::Duration::from_secs(a.lock_wait),
        machine: live.as_ref().map(crate::live::Live::machine),
    };
    let progress = progress::for_stderr();
    let vm = opts.vm.clone();
    let result = blockproof_core::backup(&repo, opts, progress.as_ref());
    let keep_view = a.keep_view.unwrap_or(crate::live::DEFAULT_KEEP_VIEW);
    let (report, kept_view) = match live {
        Some(l) => crate::live::finish(l, &vm, result, keep_view)?,
        None => (result?, None),
    };
    if a.json {
        #[derive(serde::Serialize)]
        struct Report<'a> {
            #[serde(flatten)]
            report: &'a blockproof_core::BackupReport,
            kept_view: Option<&'a blockproof_source::KeptView>,
        }
        print_json(&Report { report: &report, kept_view: kept_view.as_ref() })?;
    } else {
        println!("snapshot {} of vm {} saved ({})", report.snapshot.short(), report.vm, report.status.as_str());
        if let Some(c) = report.consistency {
            let why = report.consistency_note.as_deref().map(|n| format!(": {n}")).unwrap_or_default();
            println!("  {}-consistent{why}", c.as_str());
        }
        for d in &report.disks {
            let mode = match (&d.full_reason, d.mode) {
                (Some(why), _) => format!("full read: {why}"),
                (None, _) => format!("incremental: {} chunks reported changed", d.cbt_reported_chunks),
            };
            println!(
                "  disk {}: {} read, {} new data ({} stored), {} zero chunks; {mode}",
                d.id,
                human_bytes(d.bytes_read),
                human_bytes(d.new_bytes),
                human_bytes(d.stored_bytes),
                d.zero_chunks,
            );
            if d.repaired_chunks > 0 {
                println!(
                    "    repaired: {} chunks the repository had lost or damaged were stored again from the source",
                    d.repaired_chunks
                );
            }
            if d.verified_chunks > 0 {
                println!(
                    "    compared {} unread chunks ({}) with the source: {}",
                    d.verified_chunks,
                    human_bytes(d.verified_bytes),
                    if d.mismatches.is_empty() {
                        "all equal".to_string()
                    } else {
                        format!("{} ranges differ", d.mismatches.len())
                    }
                );
            }
            if d.escalation.chunks > 0 {
                println!(
                    "    compared {} more chunks around the differences{}",
                    d.escalation.chunks,
                    if d.escalation.scanned {
                        " (every unread chunk)"
                    } else if d.escalation.limited {
                        " (stopped at the escalation limit: the stale extent may go on)"
                    } else {
                        ""
                    }
                );
            }
            if d.cbt_missed_chunks > 0 {
                println!(
                    "    change tracking missed {} chunk(s) that now read as zeros: the restore point is right, the \
                     tracking is not trusted",
                    d.cbt_missed_chunks
                );
            }
            println!("    coverage: {}", crate::audit::coverage_text(&d.coverage));
        }
        if let Some(h) = report.healed_snapshot {
            println!("snapshot {} of vm {} saved (ok): the tainted disks re-read in full", h.short(), report.vm);
        }
        if let Some(k) = &kept_view {
            println!("  the point-in-time view is kept until {} for investigation:", k.until);
            for e in &k.exports {
                println!("    disk {}: {}", e.disk, e.uri);
            }
            let state = a.state_dir.as_ref().map(|d| format!(" --state-dir {}", d.display())).unwrap_or_default();
            println!("    release it earlier with: blockproof cleanup --vm {}{state}", report.vm);
        }
        println!(
            "  {} written in {}, {:.1} s",
            human_bytes(report.bytes_written),
            count(report.packs_written, "pack file"),
            report.duration_seconds
        );
    }
    for w in &report.warnings {
        eprintln!("blockproof: warning: {w}");
    }
    if report.status != SnapshotStatus::Ok {
        for d in report.disks.iter().filter(|d| !d.mismatches.is_empty()) {
            let ranges: Vec<String> =
                d.mismatches.iter().take(4).map(|r| crate::commands::range_text(r.offset, r.length)).collect();
            let more =
                if d.mismatches.len() > 4 { format!(" and {} more", d.mismatches.len() - 4) } else { String::new() };
            eprintln!(
                "blockproof: MISMATCH: disk {} of snapshot {} differs from its source at bytes {}{more}; \
                 the snapshot is kept and marked tainted{}. {}",
                d.id,
                report.snapshot.short(),
                ranges.join(", "),
                if d.suspect_snapshots.is_empty() {
                    String::new()
                } else {
                    format!(
                        "; earlier snapshots that may share the stale data: {}",
                        d.suspect_snapshots.iter().map(|s| s.short()).collect::<Vec<_>>().join(", ")
                    )
                },
                d.advice.as_deref().unwrap_or("")
            );
        }
        return Ok(exit::TAINTED);
    }
    Ok(exit::OK)
}

#[derive(Serialize)]
struct SnapshotRow<'a> {
    id: String,
    vm: &'a str,
    time: &'a str,
    status: &'a str,
    /// Verification later found the disks of this restore point may share stale content
    /// (a suspect of a detection event): the ranges are in `suspect_ranges`.
    suspect: bool,
    suspect_ranges: Vec<SuspectRange>,
    hostname: &'a str,
    tags: &'a [String],
    /// Protected from forget (`protect`/`unprotect`).
    protected: bool,
    /// The snapshot of the source repository this one is a copy of (`copy`).
    copied_from: Option<String>,
    /// A running VM's restore point (`--from`): its hypervisor interface, consistency and
    /// identity (the definition itself is restored by `restore SNAP --to DIR`).
    machine: Option<MachineRow<'a>>,
    /// The newest restore test of this restore point (`restore-test`), if any.
    restore_test: Option<TestRow<'a>>,
    disks: Vec<SnapshotDisk<'a>>,
}

#[derive(Serialize)]
struct TestRow<'a> {
    time: &'a str,
    kind: blockproof_core::restore_test::TestKind,
    passed: bool,
    reason: Option<&'a str>,
}

#[derive(Serialize)]
struct MachineRow<'a> {
    kind: &'static str,
    consistency: &'static str,
    consistency_note: Option<&'a str>,
    uuid: Option<&'a str>,
}

#[derive(Serialize)]
struct SuspectRange {
    disk: String,
    offset: u64,
    length: u64,
    /// The tainted restore point whose verification found it.
    found_by: String,
}

#[derive(Serialize)]
struct SnapshotDisk<'a> {
    id: &'a str,
    size: u64,
    chunk_size: u32,
    parent: Option<String>,
}

fn snapshots(a: VmArgs) -> Result<u8> {
    let repo = open_repo(&a.repo)?;
    let scan = repo.scan_snapshots()?;
    warn_skipped(&scan.skipped);
    let all = scan.snapshots;
    if let Some(vm) = a.vm.as_deref().filter(|vm| !all.iter().any(|s| &s.snapshot.vm == vm)) {
        let mut known: Vec<&str> = all.iter().map(|s| s.snapshot.vm.as_str()).collect();
        known.sort_unstable();
        known.dedup();
        let known = if known.is_empty() { "none".to_string() } else { known.join(", ") };
        return Err(Usage(format!("no snapshots of vm {vm:?} (vms in the repository: {known})")).into());
    }
    let protected = blockproof_core::protected(&repo)?;
    let (tests, test_warnings) = blockproof_core::restore_test::restore_tests(&repo)?;
    let tested = blockproof_core::restore_test::latest_by_snapshot(&tests);
    for w in test_warnings {
        eprintln!("blockproof: warning: {w}");
    }
    let (events, event_warnings) = blockproof_core::events::events(&repo)?;
    for w in event_warnings {
        eprintln!("blockproof: warning: {w}");
    }
    let suspect_ranges = |id: &blockproof_format::Id| -> Vec<SuspectRange> {
        events
            .iter()
            .flat_map(|e| e.disks.iter().map(move |d| (e, d)))
            .filter(|(_, d)| d.suspects.contains(id))
            .flat_map(|(e, d)| {
                d.mismatches.iter().map(move |m| SuspectRange {
                    disk: d.id.clone(),
                    offset: m.offset,
                    length: m.length,
                    found_by: e.snapshot.to_hex(),
                })
            })
            .collect()
    };
    let rows: Vec<SnapshotRow> = all
        .iter()
        .filter(|s| a.vm.as_ref().is_none_or(|vm| &s.snapshot.vm == vm))
        .map(|s| SnapshotRow {
            id: s.id.to_hex(),
            vm: &s.snapshot.vm,
            time: &s.snapshot.time,
            status: s.snapshot.status.as_str(),
            suspect: !suspect_ranges(&s.id).is_empty(),
            suspect_ranges: suspect_ranges(&s.id),
            hostname: &s.snapshot.hostname,
            tags: &s.snapshot.tags,
            protected: protected.contains(&s.id),
            copied_from: s.snapshot.copied_from.map(|c| c.to_hex()),
            machine: s.snapshot.machine.as_ref().map(|m| MachineRow {
                kind: m.kind.as_str(),
                consistency: m.consistency.as_str(),
                consistency_note: m.consistency_note.as_deref(),
                uuid: m.uuid.as_deref(),
            }),
            restore_test: tested.get(&s.id).map(|t| TestRow {
                time: &t.time,
                kind: t.kind,
                passed: t.passed,
                reason: t.reason.as_deref(),
            }),
            disks: s
                .snapshot
                .disks
                .iter()
                .map(|d| SnapshotDisk {
                    id: &d.id,
                    size: d.size,
                    chunk_size: d.chunk_size,
                    parent: d.parent.map(|p| p.to_hex()),
                })
                .collect(),
        })
        .collect();
    if a.json {
        print_json(&rows)?;
        return Ok(exit::OK);
    }
    println!("{:<10} {:<21} {:<16} {:<8} disks", "id", "time", "vm", "status");
    for r in &rows {
        let disks: Vec<String> = r.disks.iter().map(|d| format!("{} ({})", d.id, human_bytes(d.size))).collect();
        let time = crate::timestamp::show(r.time);
        let status = if r.suspect && r.status == "ok" { "suspect" } else { r.status };
        let mut notes: Vec<String> = r.tags.iter().map(|t| format!("tag:{t}")).collect();
        if r.protected {
            notes.push("protected".into());
        }
        if let Some(c) = &r.copied_from {
            notes.push(format!("copy of {}", &c[..8]));
        }
        if let Some(m) = &r.machine {
            notes.push(format!("{}:{}-consistent", m.kind, m.consistency));
        }
        if let Some(t) = &r.restore_test {
            notes.push(if t.passed { "restore-tested".into() } else { "restore-test-FAILED".into() });
        }
        let notes = if notes.is_empty() { String::new() } else { format!("  [{}]", notes.join(" ")) };
        println!("{:<10} {:<21} {:<16} {:<8} {}{notes}", &r.id[..8], time, r.vm, status, disks.join(", "));
    }
    println!("{} snapshot(s)", rows.len());
    Ok(exit::OK)
}

fn restore(a: RestoreArgs) -> Result<u8> {
    let size =
        |s: &str| parse_size(s).ok_or_else(|| Usage(format!("invalid size {s:?}: use bytes or 64KiB, 1GiB, ...")));
    let range = match (&a.offset, &a.length) {
        (Some(o), Some(l)) => Some((size(o)?, size(l)?)),
        _ => None,
    };
    let repo = open_repo(&a.repo)?;
    let Some(disk) = a.disk.clone() else {
        return restore_vm(&repo, a);
    };
    if a.patch_tainted {
        let r = blockproof_core::events::patch(&repo, &a.snapshot, &disk, &a.to)?;
        if a.json {
            print_json(&r)?;
        } else {
            println!(
                "patched {} stale range(s) ({}) of disk {} of snapshot {} in {} with the good bytes of snapshot {}",
                r.ranges.len(),
                human_bytes(r.bytes_written),
                r.disk,
                r.snapshot.short(),
                r.target.display(),
                r.good_snapshot.short()
            );
        }
        return Ok(exit::OK);
    }
    let format = restore_format(a.format, &a.to);
    let opts = RestoreOptions { snapshot: a.snapshot, disk, target: a.to, force: a.force, range, format };
    let report = restore_disk(&repo, &opts)?;
    if a.json {
        print_json(&report)?;
    } else {
        print_restored(&report);
    }
    Ok(exit::OK)
}

fn restore_format(format: Option<crate::args::TargetFormat>, target: &Path) -> RestoreFormat {
    match crate::args::TargetFormat::for_target(format, target) {
        crate::args::TargetFormat::Qcow2 => RestoreFormat::Qcow2,
        crate::args::TargetFormat::Raw => RestoreFormat::Raw,
    }
}

/// Restores one disk, with the warnings a suspect or tainted restore point deserves.
fn restore_disk(repo: &Repository, opts: &RestoreOptions) -> Result<blockproof_core::RestoreReport> {
    let progress = progress::for_stderr();
    let report = blockproof_core::restore(repo, opts, progress.as_ref())?;
    let (events, _) = blockproof_core::events::events(repo)?;
    for e in events.iter().filter(|e| e.snapshot != report.snapshot && e.concerns(&report.snapshot, Some(&report.disk)))
    {
        for d in e.disks.iter().filter(|d| d.id == report.disk) {
            let r: Vec<String> =
                d.mismatches.iter().take(4).map(|m| crate::commands::range_text(m.offset, m.length)).collect();
            eprintln!(
                "blockproof: warning: snapshot {} is a suspect: verification of snapshot {} found disk {} stale at \
                 bytes {}{}, and this restore point holds the same content there (restore --patch-tainted writes \
                 the known-good bytes)",
                report.snapshot.short(),
                e.snapshot.short(),
                report.disk,
                r.join(", "),
                if d.mismatches.len() > 4 { " and more" } else { "" }
            );
        }
    }
    if !report.mismatches.is_empty() {
        let r: Vec<String> =
            report.mismatches.iter().take(4).map(|m| crate::commands::range_text(m.offset, m.length)).collect();
        eprintln!(
            "blockproof: warning: snapshot {} is tainted: disk {} differs from its source at bytes {}{}",
            report.snapshot.short(),
            report.disk,
            r.join(", "),
            if report.mismatches.len() > 4 { " and more" } else { "" }
        );
    }
    Ok(report)
}

fn print_restored(report: &blockproof_core::RestoreReport) {
    println!(
        "restored disk {} of snapshot {} to {} ({}, {} written, {} zero chunks {})",
        report.disk,
        report.snapshot.short(),
        report.target.display(),
        human_bytes(report.size),
        human_bytes(report.bytes_written),
        report.zero_chunks,
        if report.block_device { "written as zeros" } else { "left as holes" }
    );
}

/// `restore SNAP --to DIR` without `--disk`: every disk of the snapshot into `DIR` as
/// `DISK.raw` (or `.qcow2`), in the snapshot's disk order. All or nothing: when one disk
/// fails, the files this command created for the others are removed again.
fn restore_vm(repo: &Repository, a: RestoreArgs) -> Result<u8> {
    let info = resolve_for_reading(repo, &a.snapshot)?;
    let format = match a.format {
        Some(crate::args::TargetFormat::Qcow2) => RestoreFormat::Qcow2,
        _ => RestoreFormat::Raw,
    };
    let ext = if format == RestoreFormat::Qcow2 { "qcow2" } else { "raw" };
    if a.to.exists() && !a.to.is_dir() {
        return Err(Usage(format!(
            "{} is not a directory: without --disk, restore writes every disk of the snapshot into a directory \
             (use --disk ID to restore one disk to a file)",
            a.to.display()
        ))
        .into());
    }
    let targets: Vec<PathBuf> = info.snapshot.disks.iter().map(|d| a.to.join(format!("{}.{ext}", d.id))).collect();
    // A running VM's restore point brings its definition back, pointing at these disks:
    // made (and refused if it exists without --force) before any disk is written.
    let definition = match &info.snapshot.machine {
        Some(m) => {
            let disks: Vec<crate::machine::RestoredDisk> = info
                .snapshot
                .disks
                .iter()
                .zip(&targets)
                .map(|(d, t)| crate::machine::RestoredDisk { id: &d.id, path: t, format: ext })
                .collect();
            let (path, text) = crate::machine::definition(&info.snapshot.vm, m, &disks, &a.to)
                .with_context(|| format!("the VM definition of snapshot {}", info.id.short()))?;
            if path.exists() && !a.force {
                anyhow::bail!("{} exists (use --force to replace it)", path.display());
            }
            Some((path, text))
        }
        None => None,
    };
    std::fs::create_dir_all(&a.to).with_context(|| format!("cannot create the directory {}", a.to.display()))?;
    let mut created: Vec<PathBuf> = Vec::new();
    let mut reports = Vec::new();
    for (d, target) in info.snapshot.disks.iter().zip(targets) {
        let existed = target.exists();
        let opts = RestoreOptions {
            snapshot: info.id.to_hex(),
            disk: d.id.clone(),
            target: target.clone(),
            force: a.force,
            range: None,
            format,
        };
        match restore_disk(repo, &opts) {
            Ok(r) => {
                if !existed {
                    created.push(target);
                }
                if !a.json {
                    print_restored(&r);
                }
                reports.push(r);
            }
            Err(e) => {
                for f in &created {
                    let _ = std::fs::remove_file(f);
                }
                return Err(e.context(format!("disk {} of snapshot {}", d.id, info.id.short())));
            }
        }
    }
    let definition = match definition {
        Some((path, text)) => match crate::machine::write_whole(&path, &text, a.force) {
            Ok(()) => Some(path),
            Err(e) => {
                for f in &created {
                    let _ = std::fs::remove_file(f);
                }
                return Err(e.context(format!("the VM definition of snapshot {}", info.id.short())));
            }
        },
        None => None,
    };
    if a.json {
        print_json(&serde_json::json!({
            "snapshot": info.id.to_hex(),
            "vm": info.snapshot.vm,
            "target": a.to,
            "definition": definition,
            "disks": reports,
        }))?;
    } else {
        println!("restored {} of vm {} into {}", count(reports.len() as u64, "disk"), info.snapshot.vm, a.to.display());
        if let Some(p) = &definition {
            println!("wrote the VM's definition to {} (not registered or started)", p.display());
            if info.snapshot.machine.as_ref().is_some_and(|m| m.kind == blockproof_format::MachineKind::Libvirt) {
                println!("  to register it with libvirt: virsh define {}", p.display());
            }
        }
    }
    Ok(exit::OK)
}

fn check(a: CheckArgs) -> Result<u8> {
    let read_data = a.read_data.as_deref().map(Budget::parse).transpose().map_err(Usage)?;
    let repo = open_repo(&a.repo)?;
    let progress = progress::for_stderr();
    let report =
        blockproof_core::check(&repo, &CheckOptions { read_data }, progress.as_ref()).context("check could not run")?;
    if a.json {
        print_json(&report)?;
    } else {
        for w in &report.warnings {
            eprintln!("warning: {w}");
        }
        for e in &report.errors {
            eprintln!("error: {e}");
        }
        print!(
            "{}, {}, {}, {}, {}",
            count(report.snapshots, "snapshot"),
            count(report.index_files, "index file"),
            count(report.packs, "pack"),
            count(report.blobs, "blob"),
            count(report.referenced_chunks, "referenced chunk")
        );
        if let Some(r) = &report.read_data {
            print!(
                "; read {} of {} ({}), {} verified",
                r.packs_checked,
                count(r.packs_total, "pack"),
                human_bytes(r.bytes_read),
                count(r.blobs_checked, "blob")
            );
        }
        println!();
        println!(
            "{}",
            if report.ok { "no errors found".to_string() } else { format!("{} error(s) found", report.errors.len()) }
        );
    }
    Ok(if report.ok { exit::OK } else { exit::ERROR })
}
