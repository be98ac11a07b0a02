//! `forget`, `gc`, `protect`/`unprotect`, `unlock` and `repair`: the lifecycle of restore
//! points and the upkeep of the repository.

use anyhow::Result;
use blockproof_core::{ForgetOptions, GcOptions, GcReport, KeepPolicy, RepairOptions};
use blockproof_repo::LockFile;
use blockproof_store::Kind;

use crate::args::{CopyArgs, ForgetArgs, GcArgs, KeyAddArgs, KeyCommand, RepairArgs, SnapshotRefArgs, UnlockArgs};
use crate::commands::{count, human_bytes, open_repo, print_json, range_text};
use crate::{exit, progress, Usage};

fn print_gc(r: &GcReport) {
    let verb = if r.dry_run { "would free" } else { "freed" };
    println!(
        "gc: {} reference {} in {}; {verb} {} in {} ({} repacked, {} copied)",
        count(r.snapshots, "snapshot"),
        count(r.referenced_blobs, "blob"),
        count(r.packs, "pack"),
        human_bytes(r.bytes_freed),
        count(r.packs_deleted, "pack"),
        r.packs_repacked,
        human_bytes(r.bytes_repacked)
    );
    if r.forget_records_dropped > 0 {
        println!(
            "gc: dropped the forget records of {} nothing names any more",
            count(r.forget_records_dropped, "snapshot")
        );
    }
    if r.packs_recompressed > 0 {
        if r.dry_run {
            println!(
                "gc: would recompress {} ({}) with zstd",
                count(r.packs_recompressed, "pack"),
                human_bytes(r.bytes_recompressed_from)
            );
        } else {
            println!(
                "gc: recompressed {} with zstd: their live blobs {} -> {} (the old packs are freed with the plan)",
                count(r.packs_recompressed, "pack"),
                human_bytes(r.bytes_recompressed_from),
                human_bytes(r.bytes_recompressed_to)
            );
        }
    }
    if r.restore_test_records_dropped > 0 {
        println!(
            "gc: removed {} of restore points that are gone",
            count(r.restore_test_records_dropped, "restore-test record")
        );
    }
    if r.packs_deferred > 0 {
        println!(
            "gc: {} ({}) deferred: backups that were running may still use them; a later gc removes them",
            count(r.packs_deferred, "pack"),
            human_bytes(r.bytes_deferred)
        );
    }
}

fn parse_threshold(s: &str) -> Result<f64, Usage> {
    let v: f64 = s
        .trim()
        .trim_end_matches('%')
        .parse()
        .map_err(|_| Usage(format!("invalid --repack-threshold {s:?}: use a percentage such as 25%")))?;
    if !(0.0..=100.0).contains(&v) {
        return Err(Usage(format!("invalid --repack-threshold {s:?}: between 0% and 100%")));
    }
    Ok(v / 100.0)
}

pub fn gc(a: GcArgs) -> Result<u8> {
    let recompress = match &a.recompress {
        Some(b) => Some(blockproof_core::RecompressOptions {
            budget: blockproof_core::Budget::parse(b).map_err(|e| Usage(format!("--recompress: {e}")))?,
            older_than: a.older_than,
        }),
        None => None,
    };
    let opts = GcOptions { repack_threshold: parse_threshold(&a.repack_threshold)?, dry_run: a.dry_run, recompress };
    let repo = open_repo(&a.repo)?;
    let progress = progress::for_stderr();
    let r = blockproof_core::gc(&repo, &opts, progress.as_ref())?;
    if a.json {
        print_json(&r)?;
    } else {
        print_gc(&r);
    }
    Ok(exit::OK)
}

pub fn repair(a: RepairArgs) -> Result<u8> {
    let repo = open_repo(&a.repo)?;
    let progress = progress::for_stderr();
    let r = blockproof_core::repair(&repo, &RepairOptions { dry_run: a.dry_run }, progress.as_ref())?;
    let code = if r.whole() { exit::OK } else { exit::ERROR };
    if a.json {
        print_json(&r)?;
        return Ok(code);
    }
    for p in &r.problems {
        println!("found: {p}");
    }
    for w in &r.warnings {
        eprintln!("blockproof: warning: {w}");
    }
    let (salvaged, written, removed) =
        if r.dry_run { ("to salvage", "would write", "would remove") } else { ("salvaged", "wrote", "removed") };
    println!(
        "repair: read {} packs ({}): {} intact ({} indexed again), {} damaged ({} blobs {salvaged}, {} blobs \
         damaged beyond repair), {} missing, {} unreadable",
        r.packs,
        human_bytes(r.bytes_read),
        r.packs_intact,
        r.packs_reindexed,
        r.packs_salvaged,
        r.blobs_salvaged,
        r.blobs_damaged,
        r.packs_missing,
        r.packs_unreadable
    );
    println!(
        "repair: {written} {} and {}; {removed} {} and {}",
        count(r.packs_written, "pack"),
        count(r.index_files_written, "index file"),
        count(r.index_files_removed, "index file"),
        count(r.packs_removed, "pack")
    );
    for l in &r.lost {
        let ranges: Vec<String> = l.ranges.iter().take(8).map(|b| range_text(b.offset, b.length)).collect();
        let more = if l.ranges.len() > 8 { format!(" and {} more", l.ranges.len() - 8) } else { String::new() };
        println!(
            "lost: snapshot {} (vm {}, {}) disk {}: {} in bytes {}{more}",
            l.snapshot.short(),
            l.vm,
            crate::timestamp::show(&l.time),
            l.disk,
            human_bytes(l.bytes),
            ranges.join(", ")
        );
    }
    if r.whole() {
        println!("every snapshot restores whole");
    }
    if !r.lost.is_empty() {
        println!(
            "{} referenced blob(s) are in no pack: back up the same disks again (blobs are named by their content, so \
             a backup of the same data makes these snapshots whole), or forget the snapshots; gc runs meanwhile",
            r.blobs_lost
        );
    }
    Ok(code)
}

pub fn forget(mut a: ForgetArgs) -> Result<u8> {
    a.repo.store.vm = a.vm.clone();
    let policy = KeepPolicy {
        last: a.keep_last,
        hourly: a.keep_hourly,
        daily: a.keep_daily,
        weekly: a.keep_weekly,
        monthly: a.keep_monthly,
        yearly: a.keep_yearly,
        within: a.keep_within,
        tags: a.keep_tag,
    };
    if a.snapshots.is_empty() == policy.is_empty() {
        return Err(Usage("give snapshots to forget or --keep-* options (not both)".into()).into());
    }
    let opts = ForgetOptions { snapshots: a.snapshots, policy, vm: a.vm, scope: a.per.into(), dry_run: a.dry_run };
    let repo = open_repo(&a.repo)?;
    let r = blockproof_core::forget(&repo, &opts)?;
    for w in &r.warnings {
        eprintln!("blockproof: warning: {w}");
    }
    let gc = if a.prune && !a.dry_run {
        let progress = progress::for_stderr();
        Some(blockproof_core::gc(&repo, &GcOptions::default(), progress.as_ref())?)
    } else {
        None
    };
    if a.json {
        print_json(&serde_json::json!({"forget": r, "gc": gc}))?;
        return Ok(exit::OK);
    }
    for d in &r.kept {
        println!("keep   {} {} {:<21} {}", d.id.short(), d.vm, crate::timestamp::show(&d.time), d.reasons.join(", "));
    }
    let verb = if r.dry_run { "would remove" } else { "remove" };
    for d in &r.removed {
        println!("{verb} {} {} {}", d.id.short(), d.vm, crate::timestamp::show(&d.time));
    }
    println!("{} kept, {} {}", r.kept.len(), r.removed.len(), if r.dry_run { "would be removed" } else { "removed" });
    if let Some(g) = &gc {
        print_gc(g);
    }
    Ok(exit::OK)
}

pub fn protect(a: SnapshotRefArgs, on: bool) -> Result<u8> {
    let repo = open_repo(&a.repo)?;
    let id = blockproof_core::set_protected(&repo, &a.snapshot, on)?;
    println!("snapshot {} {}", id.short(), if on { "protected" } else { "no longer protected" });
    Ok(exit::OK)
}

pub fn unlock(a: UnlockArgs) -> Result<u8> {
    let repo = open_repo(&a.repo)?;
    let files = repo.lock_files()?;
    // Files that are not locks of this repository (foreign, damaged) count as absent
    // (FORMAT §20): they go with the stale ones.
    let mut invalid = 0;
    for (name, file) in &files {
        if let LockFile::Invalid(why) = file {
            eprintln!("blockproof: removing {name}, which is not a lock of this repository ({why})");
            repo.backend().remove(Kind::Lock, name)?;
            invalid += 1;
        }
    }
    let before = files.len() - invalid;
    if a.all {
        for (name, _) in files.iter().filter(|(_, f)| !matches!(f, LockFile::Invalid(_))) {
            repo.backend().remove(Kind::Lock, name)?;
        }
        println!("removed {} lock(s)", before + invalid);
    } else {
        let live = repo.live_locks()?;
        println!("removed {} stale lock(s)", before - live.len() + invalid);
        for (_, l) in &live {
            println!("still held: {}", l.describe());
        }
    }
    Ok(exit::OK)
}

fn new_slot_password(a: &KeyAddArgs) -> Result<(Vec<u8>, blockproof_format::KdfParams)> {
    let kdf = blockproof_format::KdfParams {
        m_cost_kib: a.kdf_memory.saturating_mul(1024),
        t_cost: a.kdf_iterations,
        p_cost: 1,
    };
    if !kdf.in_range() {
        return Err(Usage("--kdf-memory must be 1..4096 MiB and --kdf-iterations 1..64".into()).into());
    }
    let pw = crate::password::secret(
        "BLOCKPROOF_NEW_PASSWORD",
        "--new-password-file",
        a.new_password_file.as_deref(),
        "new password",
        true,
    )?;
    Ok((pw, kdf))
}

pub fn key(k: KeyCommand) -> Result<u8> {
    match k {
        KeyCommand::List(a) => {
            let repo = open_repo(&a.repo)?;
            let slots = repo.key_slots()?;
            if a.json {
                print_json(&slots)?;
            } else {
                for s in &slots {
                    println!(
                        "{} {} Argon2id {} MiB, {} passes, {} lane(s){}",
                        if s.current { "*" } else { " " },
                        &s.name[..16],
                        s.m_cost_kib / 1024,
                        s.t_cost,
                        s.p_cost,
                        if s.current { "  (opened this session)" } else { "" }
                    );
                }
            }
        }
        KeyCommand::Add(a) => {
            let repo = open_repo(&a.repo)?;
            let (pw, kdf) = new_slot_password(&a)?;
            let name = repo.add_key(&pw, kdf)?;
            println!("added key slot {}", &name[..16]);
        }
        KeyCommand::Remove(a) => {
            let repo = open_repo(&a.repo)?;
            let name = repo.remove_key(&a.slot)?;
            println!("removed key slot {}", &name[..16]);
        }
        KeyCommand::Passwd(a) => {
            let repo = open_repo(&a.repo)?;
            let (pw, kdf) = new_slot_password(&a)?;
            let old = repo.current_slot().to_string();
            let name = repo.add_key(&pw, kdf)?;
            repo.remove_key(&old)?;
            println!("passphrase changed: key slot {} replaces {}", &name[..16], &old[..16]);
        }
    }
    Ok(exit::OK)
}

pub fn copy(a: CopyArgs) -> Result<u8> {
    let src = open_repo(&a.repo)?;
    let pw = crate::password::secret(
        "BLOCKPROOF_TO_PASSWORD",
        "--to-password-file",
        a.to_password_file.as_deref(),
        "target repository password",
        false,
    )?;
    let backend =
        crate::location::backend(&a.to, &a.repo.store, false).map_err(|e| anyhow::anyhow!("{}: {e}", a.to))?;
    let mut dst = blockproof_repo::Repository::open(backend, &pw)?;
    dst.set_index_cache(crate::location::index_cache(&a.repo.store, &a.to));
    let progress = progress::for_stderr();
    let r =
        blockproof_core::copy(&src, &dst, &blockproof_core::CopyOptions { snapshots: a.snapshots }, progress.as_ref())?;
    for w in &r.warnings {
        eprintln!("blockproof: warning: {w}");
    }
    if a.json {
        print_json(&r)?;
    } else {
        for c in &r.copied {
            println!("copied snapshot {} of vm {} as {}", c.source.short(), c.vm, c.target.short());
        }
        println!(
            "{} copied, {} already there; {} chunks read, {} new in the target, {} written",
            r.copied.len(),
            r.skipped.len(),
            r.chunks_read,
            r.chunks_new,
            human_bytes(r.bytes_written)
        );
        if r.chunks_repaired > 0 {
            println!("{} chunks the target had only in missing or damaged packs were stored again", r.chunks_repaired);
        }
    }
    for w in &r.warnings {
        eprintln!("blockproof: warning: {w}");
    }
    Ok(exit::OK)
}
