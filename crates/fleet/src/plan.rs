//! The plan of a job in words (`blockproof run --dry-run`): what each vm's run would do,
//! with every policy resolved and every budget derived, and nothing opened.

use std::fmt::Write;

use blockproof_core::{KeepPolicy, OnMismatch};

use crate::job::{Job, PasswordSource, RepositorySpec};
use crate::notify::NotifyTarget;

fn repository(r: &RepositorySpec) -> String {
    let pw = match &r.password {
        PasswordSource::File(f) => format!("password from {}", f.display()),
        PasswordSource::Env(v) => format!("password from ${v}"),
    };
    format!("{} ({pw})", r.location)
}

fn keep(p: &KeepPolicy) -> String {
    let rules = [
        ("last", p.last),
        ("hourly", p.hourly),
        ("daily", p.daily),
        ("weekly", p.weekly),
        ("monthly", p.monthly),
        ("yearly", p.yearly),
    ];
    rules.iter().filter_map(|(k, v)| v.map(|n| format!("{k} {n}"))).collect::<Vec<_>>().join(", ")
}

/// The plan as text.
pub fn describe(job: &Job) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "job {} ({})", job.name, job.path.display());
    let _ = writeln!(s, "repository: {}", repository(&job.repository));
    match &job.schedule {
        Some(sc) => {
            let _ = writeln!(
                s,
                "schedule: every {} h from {:02}:{:02} ({} run(s) a day; OnCalendar={})",
                sc.every_hours,
                sc.at.0,
                sc.at.1,
                sc.runs_per_day(),
                sc.on_calendar()
            );
        }
        None => s.push_str("schedule: none (run by hand or by your own scheduler)\n"),
    }
    let _ = writeln!(s, "{} vm(s), {} at a time:", job.vms.len(), job.parallel);
    for vm in &job.vms {
        let _ = writeln!(
            s,
            "  vm {}{}{}",
            vm.name,
            vm.group.as_ref().map_or(String::new(), |g| format!(" (group {g})")),
            if vm.tags.is_empty() { String::new() } else { format!(" tags {}", vm.tags.join(",")) }
        );
        if let Some(h) = &vm.pre {
            let _ = writeln!(s, "    pre hook: {} (timeout {} s)", h.command.join(" "), h.timeout.as_secs());
        }
        for d in &vm.disks {
            let _ = writeln!(
                s,
                "    disk {}: {} cbt={}{}",
                d.id,
                d.source,
                d.cbt,
                d.verify.as_ref().map_or(String::new(), |v| format!(" verify={v}"))
            );
        }
        let verify = match &vm.verify.objective {
            Some(o) => format!(
                "{} of each disk a run: detect within {} = {} run(s) at {} a day (budget >= 1 / (D x r))",
                vm.verify.text, o.within, o.runs, o.runs_per_day
            ),
            None => format!("{} of each disk a run", vm.verify.text),
        };
        let mismatch = match vm.on_mismatch {
            OnMismatch::Keep => "keep",
            OnMismatch::Heal => "heal",
            OnMismatch::Scan => "scan",
        };
        let _ = writeln!(s, "    verify: {verify}; on mismatch: {mismatch}");
        if let Some(h) = &vm.post {
            let _ = writeln!(s, "    post hook: {} (timeout {} s)", h.command.join(" "), h.timeout.as_secs());
        }
        match &vm.retention {
            Some(p) => {
                let _ = writeln!(s, "    retention: keep {}", keep(p));
            }
            None => s.push_str("    retention: none (every restore point kept)\n"),
        }
    }
    match job.gc.every {
        Some(e) => {
            let _ = writeln!(
                s,
                "gc: at most every {}, repacking packs {:.0}% unused",
                humantime::format_duration(e),
                job.gc.repack_threshold * 100.0
            );
        }
        None => s.push_str("gc: never\n"),
    }
    if let Some(c) = &job.copy {
        let _ = writeln!(s, "copy to: {}", repository(c));
    }
    if let Some(d) = &job.reports.directory {
        let _ = writeln!(
            s,
            "reports: {} (JSON{}; {} kept)",
            d.display(),
            if job.reports.html { ", HTML" } else { "" },
            job.reports.keep
        );
    }
    if let Some(m) = &job.reports.metrics {
        let _ = writeln!(s, "metrics: {}", m.display());
    }
    for n in &job.notify {
        let on: Vec<String> = n.on.iter().map(|o| format!("{o:?}").to_lowercase()).collect();
        let target = match &n.target {
            NotifyTarget::Command(c) => format!("command {}", c.join(" ")),
            NotifyTarget::Webhook(u) => format!("webhook {}", crate::notify::origin(u)),
        };
        let _ = writeln!(s, "notify on {}: {target} (timeout {} s)", on.join(", "), n.timeout.as_secs());
    }
    s
}
