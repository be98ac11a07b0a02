//! `status` and `verify`: what has been proven about the backups, and a proof on demand.

use anyhow::Result;
use blockproof_core::events::Cause;
use blockproof_core::{Budget, Coverage, VerifyOptions};
use blockproof_format::manifest::{BoundBasis, CutShort};

use crate::args::{DiffArgs, StatusArgs, VerifyArgs, VmArgs};
use crate::commands::{count, human_bytes, open_repo, print_json};
use crate::{exit, progress, Usage};

pub fn status(args: StatusArgs) -> Result<u8> {
    let a = &args.vms;
    let repo = open_repo(&a.repo)?;
    let report = blockproof_core::status(&repo, a.vm.as_deref())?;
    for w in &report.warnings {
        eprintln!("blockproof: warning: {w}");
    }
    let stale = args.max_age.map(|age| {
        let mut expected = args.expect.clone();
        expected.extend(a.vm.clone());
        (age, blockproof_core::stale_vms(&report, &expected, age, std::time::SystemTime::now()))
    });
    let vms = report.vms;
    if a.json {
        print_json(&vms)?;
    } else {
        print_status(&vms);
    }
    match stale {
        Some((age, stale)) if !stale.is_empty() => {
            let named: Vec<String> = stale
                .iter()
                .map(|s| match &s.last_good {
                    Some(t) => format!("{} (last good {})", s.vm, t.get(..19).unwrap_or(t)),
                    None => format!("{} (no good restore point)", s.vm),
                })
                .collect();
            anyhow::bail!(
                "{} vm(s) without a good restore point in the last {}: {}",
                stale.len(),
                humantime::format_duration(age),
                named.join(", ")
            )
        }
        _ => Ok(exit::OK),
    }
}

fn print_status(vms: &[blockproof_core::VmStatus]) {
    for v in vms {
        println!(
            "vm {}: latest snapshot {} at {} ({}), {} snapshot(s)",
            v.vm,
            v.snapshot.short(),
            crate::timestamp::show(&v.time),
            v.status.as_str(),
            v.snapshots
        );
        if let Some(t) = &v.last_restore_test {
            println!(
                "  last restore test: snapshot {} tested {}: {}",
                t.snapshot.short(),
                crate::timestamp::show(&t.time),
                match &t.reason {
                    None => "passed".to_string(),
                    Some(why) => format!("FAILED ({why})"),
                }
            );
        }
        for d in &v.disks {
            let next = match &d.next_full_reason {
                Some(why) => format!("next backup: full ({why})"),
                None => "next backup: incremental".to_string(),
            };
            println!("  disk {} ({}, cbt={}, run {}): {next}", d.id, human_bytes(d.size), d.cbt, d.run);
            if d.snapshot != v.snapshot {
                println!(
                    "    not in the latest snapshot: newest restore point {} at {}",
                    d.snapshot.short(),
                    crate::timestamp::show(&d.time)
                );
            }
            match &d.coverage {
                Some(c) => println!("    {}", coverage_text(c)),
                None => println!("    no coverage recorded (written before verification existed)"),
            }
            if !d.mismatches.is_empty() {
                println!("    TAINTED: {} range(s) differ from the source", d.mismatches.len());
            }
        }
        for e in &v.events {
            println!(
                "  detected {}: snapshot {}{} was stale",
                crate::timestamp::show(&e.time),
                e.snapshot.short(),
                if e.forgotten { " (since forgotten)" } else { "" }
            );
            for d in &e.disks {
                let ranges: Vec<String> =
                    d.mismatches.iter().take(4).map(|r| crate::commands::range_text(r.offset, r.length)).collect();
                let causes: Vec<&str> = d
                    .causes
                    .iter()
                    .map(|c| match c {
                        Cause::ChangeTracking => "change tracking lied",
                        Cause::AllocationMap => "the allocation map lied",
                        Cause::SourceChanged => "the source changed while read",
                    })
                    .collect();
                println!(
                    "    disk {} ({}): bytes {}{}; suspects: {}; good bytes in: {}",
                    d.id,
                    causes.join(", "),
                    ranges.join(", "),
                    if d.mismatches.len() > 4 { " and more" } else { "" },
                    if d.suspects.is_empty() {
                        "none".to_string()
                    } else {
                        d.suspects.iter().map(|s| s.short()).collect::<Vec<_>>().join(", ")
                    },
                    d.good_snapshot
                        .map_or("no restore point yet (the next backup reads the disk in full)".into(), |g| {
                            format!("snapshot {} (restore --patch-tainted writes them)", g.short())
                        })
                );
            }
        }
    }
}

/// A disk's coverage in words: what is proven, on what the bound rests, and when it is
/// off or there is none (never the same words for those two).
pub fn coverage_text(c: &Coverage) -> String {
    let state = format!(
        "{}, {} never confirmed, oldest confirmed {}",
        count(c.chunks, "chunk"),
        c.never_confirmed,
        match c.oldest_confirmed_runs_ago {
            0 => "in this run".to_string(),
            n => format!("{} ago", count(n, "run")),
        }
    );
    let k = c.full_coverage_within_runs;
    let per = c.sampled_per_run.unwrap_or(0);
    let bound = match c.bound {
        Some(BoundBasis::Off) => "verification off (--verify none): nothing is compared, no bound".to_string(),
        Some(BoundBasis::None) => {
            "no bound: only the first chunk was compared (a budget below one chunk, or a time limit reached at once)"
                .to_string()
        }
        Some(BoundBasis::Budget) => format!("every chunk confirmed within {k} runs (guaranteed: {per} chunks a run)"),
        Some(BoundBasis::Achieved) => format!(
            "every chunk confirmed within {k} runs if each later run compares at least {per} chunks (a time limit \
             decides how many)"
        ),
        // Written before the bound said what it rests on.
        None if k == 0 => "verification off, no bound".to_string(),
        None => format!("every chunk confirmed within {k} runs"),
    };
    let cut = match (c.cut_short, c.budget_chunks) {
        (Some(why), Some(b)) => format!(
            "; this run compared {per} of the budget's {b} chunks: the {} cut it short",
            match why {
                CutShort::Deadline => "time limit",
                CutShort::Window => "time window",
            }
        ),
        _ => String::new(),
    };
    format!("{state}; {bound}{cut}")
}

pub fn stats(a: VmArgs) -> Result<u8> {
    let repo = open_repo(&a.repo)?;
    let s = blockproof_core::stats(&repo, a.vm.as_deref())?;
    if a.json {
        print_json(&s)?;
        return Ok(exit::OK);
    }
    println!(
        "{} protect {} (logical); {} of distinct data; stored in {} ({}, {})",
        count(s.snapshots, "snapshot"),
        human_bytes(s.logical_bytes),
        human_bytes(s.unique_bytes),
        human_bytes(s.stored_bytes),
        count(s.packs, "pack"),
        count(s.blobs, "blob")
    );
    println!(
        "deduplication and compression: {:.1}x (logical / stored); compression alone {:.2}x",
        s.dedup_ratio, s.compression_ratio
    );
    for v in &s.vms {
        println!(
            "vm {}: {} snapshots, {} logical, {} distinct",
            v.vm,
            v.snapshots,
            human_bytes(v.logical_bytes),
            human_bytes(v.unique_bytes)
        );
        for d in &v.disks {
            println!(
                "  disk {} ({}): {} distinct in {} chunks",
                d.id,
                human_bytes(d.size),
                human_bytes(d.unique_bytes),
                d.unique_chunks
            );
        }
        for g in &v.growth {
            println!(
                "  {} {}: read {}, added {} ({} stored)",
                g.snapshot.short(),
                crate::timestamp::show(&g.time),
                human_bytes(g.bytes_read),
                human_bytes(g.new_bytes),
                human_bytes(g.stored_bytes)
            );
        }
    }
    Ok(exit::OK)
}

pub fn verify(a: VerifyArgs) -> Result<u8> {
    let budget = match &a.verify {
        Some(v) => Budget::parse(v).map_err(Usage)?,
        None => blockproof_core::default_verify_budget(),
    };
    let disks = a.disks.iter().map(|s| crate::disk_spec::input_without_cbt(s)).collect::<Result<Vec<_>, _>>()?;
    let repo = open_repo(&a.repo)?;
    let progress = progress::for_stderr();
    let report =
        blockproof_core::verify(&repo, VerifyOptions { snapshot: a.snapshot, disks, budget }, progress.as_ref())?;
    if a.json {
        print_json(&report)?;
    } else {
        for d in &report.disks {
            println!(
                "disk {} of snapshot {}: compared {} of {} chunks ({}): {}",
                d.id,
                report.snapshot.short(),
                d.verified_chunks,
                d.chunks,
                human_bytes(d.verified_bytes),
                if d.mismatches.is_empty() && d.verified_chunks >= d.chunks {
                    "equal: every chunk compared".to_string()
                } else if d.mismatches.is_empty() {
                    format!(
                        "those are equal; the other {} chunks were not compared, so nothing is proven about them \
                         (--verify all compares every chunk)",
                        d.chunks - d.verified_chunks
                    )
                } else {
                    format!("{} ranges DIFFER", d.mismatches.len())
                }
            );
            if d.source_changed {
                println!("  the source changed while it was read: compare with a source that does not change");
            }
            if let Some(w) = &d.warning {
                eprintln!("blockproof: warning: {w}");
            }
        }
    }
    if !report.ok {
        for d in report.disks.iter().filter(|d| !d.mismatches.is_empty()) {
            let r: Vec<String> =
                d.mismatches.iter().take(4).map(|m| crate::commands::range_text(m.offset, m.length)).collect();
            eprintln!(
                "blockproof: MISMATCH: disk {} of snapshot {} differs from the source at bytes {}",
                d.id,
                report.snapshot.short(),
                r.join(", ")
            );
        }
        return Ok(exit::TAINTED);
    }
    Ok(exit::OK)
}

pub fn diff(a: DiffArgs) -> Result<u8> {
    let repo = open_repo(&a.repo)?;
    let r = blockproof_core::diff(&repo, &a.from, &a.to, a.disk.as_deref())?;
    let files = if a.files { Some(crate::changed_files::changed_files(repo, &r)?) } else { None };
    if a.json {
        let mut doc = serde_json::to_value(&r)?;
        if let Some(f) = &files {
            doc["files"] = serde_json::to_value(f)?;
        }
        print_json(&doc)?;
        return Ok(exit::OK);
    }
    println!("snapshot {} -> {}", r.from.short(), r.to.short());
    for d in &r.disks {
        let sizes = match (d.size_from, d.size_to) {
            (Some(x), Some(y)) if x == y => human_bytes(x),
            (Some(x), Some(y)) => format!("{} -> {}", human_bytes(x), human_bytes(y)),
            (Some(x), None) => format!("{}, only in {}", human_bytes(x), r.from.short()),
            (None, Some(y)) => format!("{}, only in {}", human_bytes(y), r.to.short()),
            (None, None) => String::new(),
        };
        if d.changed.is_empty() {
            println!("  disk {} ({sizes}): identical", d.id);
            continue;
        }
        let shown: Vec<String> =
            d.changed.iter().take(8).map(|c| crate::commands::range_text(c.offset, c.length)).collect();
        let more = if d.changed.len() > 8 { format!(" and {} more", d.changed.len() - 8) } else { String::new() };
        println!(
            "  disk {} ({sizes}): {} changed in {}: {}{more}",
            d.id,
            human_bytes(d.changed_bytes),
            count(d.changed.len() as u64, "range"),
            shown.join(", ")
        );
    }
    if let Some(f) = &files {
        crate::changed_files::print(f);
    }
    Ok(exit::OK)
}
