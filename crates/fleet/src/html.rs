//! The HTML report of a run: one self-contained file — inline CSS and SVG, no script, no
//! font, no image, nothing fetched (its Content-Security-Policy forbids every load) —
//! with the night's status per vm, the trends of recent runs, and per disk a coverage
//! heatmap: the disk's chunks, aggregated into cells, coloured by how many runs ago the
//! least recently confirmed chunk of the cell was confirmed against its source, tainted
//! cells outlined. Each cell carries its numbers as `data-` attributes, so a browser test
//! (or a person with the inspector) can check it against the repository.

use std::fmt::Write;

use blockproof_core::budget::format_size as bytes;

use crate::inventory::{DiskInventory, Inventory};
use crate::report::{HistoryEntry, RunReport, RunStatus};

/// Cells per heatmap row.
const ROW: usize = 64;
/// Cell size and pitch in pixels.
const CELL: usize = 10;
const PITCH: usize = 11;
/// Runs shown in the trends.
const TRENDS: usize = 30;

/// Age buckets of the heatmap: (upper bound in runs, label, colour). Beyond the last:
/// the overdue colour; never confirmed: grey.
const BUCKETS: [(u64, &str, &str); 6] = [
    (0, "this run", "#1a9850"),
    (1, "1 run ago", "#66bd63"),
    (3, "2–3 runs", "#a6d96a"),
    (7, "4–7 runs", "#fee08b"),
    (15, "8–15 runs", "#fdae61"),
    (31, "16–31 runs", "#f46d43"),
];
const OLDER: (&str, &str) = ("32 runs or more", "#a50026");
const NEVER: (&str, &str) = ("never confirmed", "#7f7f7f");

/// The bucket of a cell: its index in [`BUCKETS`], `BUCKETS.len()` for older, `None` for
/// never.
pub fn bucket(oldest_runs_ago: Option<u64>) -> Option<usize> {
    oldest_runs_ago.map(|age| BUCKETS.iter().position(|(max, _, _)| age <= *max).unwrap_or(BUCKETS.len()))
}

/// The colour of a cell.
pub fn colour(oldest_runs_ago: Option<u64>) -> &'static str {
    match bucket(oldest_runs_ago) {
        None => NEVER.1,
        Some(i) if i < BUCKETS.len() => BUCKETS[i].2,
        Some(_) => OLDER.1,
    }
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;").replace('\'', "&#39;")
}

fn status_class(s: RunStatus) -> &'static str {
    s.as_str()
}

const STYLE: &str = "
body{font-family:system-ui,sans-serif;margin:1.5rem;color:#222;background:#fff}
h1{margin:0 0 .3rem}h2{margin-top:2rem;border-bottom:1px solid #ccc}
table{border-collapse:collapse}td,th{padding:.25rem .6rem;border-bottom:1px solid #eee;text-align:left;vertical-align:top}
.status{font-weight:bold;padding:.1rem .4rem;border-radius:.3rem;color:#fff}
.ok{background:#1a9850}.tainted{background:#d73027}.failed{background:#111}
.num{text-align:right;font-variant-numeric:tabular-nums}
.err{color:#a50026}.note{color:#555;font-size:.9rem}
figure{margin:1rem 0}figcaption{font-size:.9rem;margin-top:.3rem}
.legend span{display:inline-block;margin-right:1rem;font-size:.85rem}
.legend i{display:inline-block;width:10px;height:10px;margin-right:.3rem;vertical-align:middle}
rect.cell.tainted{stroke:#000;stroke-width:2}
";

/// The report page.
pub fn render(report: &RunReport, history: &[HistoryEntry]) -> String {
    let mut h = String::new();
    let title = format!("blockproof: {} — {}", report.job, report.status.as_str());
    let _ = write!(
        h,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\n\
         <meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'\">\n\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
         <title>{}</title><style>{STYLE}</style></head><body>\n",
        esc(&title)
    );
    let counts: Vec<String> = [RunStatus::Ok, RunStatus::Tainted, RunStatus::Failed]
        .iter()
        .map(|s| format!("{} {}", report.vms.iter().filter(|v| v.status == *s).count(), s.as_str()))
        .collect();
    let _ = write!(
        h,
        "<header><h1>{}</h1><p><span id=\"run-status\" class=\"status {}\">{}</span> run of {} on {}, {:.1} s: {} \
         ({} VMs)</p>",
        esc(&report.job),
        status_class(report.status),
        report.status.as_str(),
        esc(&report.started),
        esc(&report.host),
        report.duration_seconds,
        counts.join(", "),
        report.vms.len()
    );
    if let Some(inv) = &report.repository {
        let _ = write!(
            h,
            "<p class=\"note\">repository {}: {} restore points, {} stored for {} of disks ({:.1}× deduplication and \
             compression)</p>",
            esc(&inv.location),
            inv.snapshots,
            bytes(inv.stored_bytes),
            bytes(inv.logical_bytes),
            inv.dedup_ratio
        );
    }
    h.push_str("</header>\n");
    vms_table(&mut h, report);
    trends(&mut h, report, history);
    if let Some(inv) = &report.repository {
        coverage(&mut h, inv);
    }
    lifecycle(&mut h, report);
    h.push_str("</body></html>\n");
    h
}

fn vms_table(h: &mut String, report: &RunReport) {
    h.push_str(
        "<section id=\"vms\"><h2>VMs</h2><table><tr><th>vm</th><th>status</th><th class=\"num\">time</th>\
         <th class=\"num\">read</th><th class=\"num\">written</th><th>restore point</th><th>verification</th>\
         <th>last good</th><th>last restore test</th><th>notes</th></tr>\n",
    );
    for vm in &report.vms {
        let inv = report.repository.as_ref().and_then(|i| i.vms.iter().find(|v| v.vm == vm.name));
        let (read, written, snap) = match &vm.backup {
            Some(b) => (bytes(b.disks.iter().map(|d| d.bytes_read).sum()), bytes(b.bytes_written), b.snapshot.short()),
            None => ("–".into(), "–".into(), "–".into()),
        };
        let mut notes = Vec::new();
        if let Some(e) = &vm.error {
            notes.push(format!("<span class=\"err\">{}</span>", esc(e)));
        }
        for a in &vm.assessments {
            notes.push(format!(
                "disk {}: objective {}: {}",
                esc(&a.disk),
                esc(&format!("{:?}", a.assessment.verdict).to_lowercase()),
                esc(&a.assessment.text)
            ));
        }
        if let Some(b) = &vm.backup {
            for d in b.disks.iter().filter(|d| !d.mismatches.is_empty()) {
                notes.push(format!(
                    "<span class=\"err\">disk {}: {} range(s) differ from the source</span>",
                    esc(&d.id),
                    d.mismatches.len()
                ));
            }
        }
        let verify = match &vm.objective {
            Some(o) => format!("{} (detect within {})", esc(&vm.verify), esc(&o.within)),
            None => esc(&vm.verify),
        };
        let last_good = inv.and_then(|i| i.last_good.as_ref()).map_or("none".to_string(), |g| esc(&g.time));
        let last_test = inv.and_then(|i| i.last_restore_test.as_ref()).map_or("never".to_string(), |t| {
            if t.passed {
                format!("{}: passed", esc(&t.time))
            } else {
                format!(
                    "<span class=\"err\">{}: failed ({})</span>",
                    esc(&t.time),
                    esc(t.reason.as_deref().unwrap_or("?"))
                )
            }
        });
        let _ = writeln!(
            h,
            "<tr data-vm=\"{}\" data-status=\"{}\"><td>{}</td><td><span class=\"status {}\">{}</span></td>\
             <td class=\"num\">{:.1} s</td><td class=\"num\">{read}</td><td class=\"num\">{written}</td><td>{snap}</td>\
             <td>{verify}</td><td>{last_good}</td><td data-restore-test>{last_test}</td><td>{}</td></tr>",
            esc(&vm.name),
            vm.status.as_str(),
            esc(&vm.name),
            status_class(vm.status),
            vm.status.as_str(),
            vm.duration_seconds,
            notes.join("<br>")
        );
    }
    h.push_str("</table></section>\n");
}

/// One bar of the trends: the run's start, status (`None`: the vm was not in it),
/// seconds and bytes read.
type Bar = (String, Option<RunStatus>, f64, u64);

/// Bars of the recent runs: per run and per vm, height by duration, colour by status.
fn trends(h: &mut String, report: &RunReport, history: &[HistoryEntry]) {
    let past: Vec<&HistoryEntry> = history.iter().rev().take(TRENDS - 1).rev().collect();
    h.push_str("<section id=\"trends\"><h2>Recent runs</h2><table>\n");
    // (label, status, seconds, read bytes) per run, oldest first; the current run last.
    let mut rows: Vec<(String, Vec<Bar>)> = Vec::new();
    let mut all: Vec<Bar> = past.iter().map(|e| (e.started.clone(), Some(e.status), e.duration_seconds, 0)).collect();
    all.push((report.started.clone(), Some(report.status), report.duration_seconds, 0));
    rows.push(("whole run".into(), all));
    for vm in &report.vms {
        let mut bars: Vec<Bar> = past
            .iter()
            .map(|e| match e.vms.iter().find(|v| v.name == vm.name) {
                Some(v) => (
                    e.started.clone(),
                    Some(v.status),
                    v.duration_seconds,
                    v.backup.as_ref().map_or(0, |b| b.disks.iter().map(|d| d.bytes_read).sum()),
                ),
                None => (e.started.clone(), None, 0.0, 0),
            })
            .collect();
        let read = vm.backup.as_ref().map_or(0, |b| b.disks.iter().map(|d| d.bytes_read).sum());
        bars.push((report.started.clone(), Some(vm.status), vm.duration_seconds, read));
        rows.push((vm.name.clone(), bars));
    }
    for (label, bars) in rows {
        let max = bars.iter().map(|b| b.2).fold(0.0f64, f64::max).max(1e-9);
        let width = bars.len() * 8;
        let _ = write!(h, "<tr><td>{}</td><td><svg class=\"trend\" width=\"{width}\" height=\"30\" role=\"img\" aria-label=\"recent runs of {}\">", esc(&label), esc(&label));
        for (i, (time, status, secs, read)) in bars.iter().enumerate() {
            let height = ((secs / max) * 28.0).max(2.0);
            let fill = match status {
                Some(RunStatus::Ok) => "#1a9850",
                Some(RunStatus::Tainted) => "#d73027",
                Some(RunStatus::Failed) => "#111111",
                None => "#dddddd",
            };
            let what = status.map_or("not in this run", |s| s.as_str());
            let _ = write!(
                h,
                "<rect x=\"{}\" y=\"{:.1}\" width=\"6\" height=\"{height:.1}\" fill=\"{fill}\"><title>{}: {what}, {secs:.1} s, read {}</title></rect>",
                i * 8,
                30.0 - height,
                esc(time),
                bytes(*read)
            );
        }
        h.push_str("</svg></td></tr>\n");
    }
    h.push_str("</table></section>\n");
}

fn coverage(h: &mut String, inv: &Inventory) {
    h.push_str("<section id=\"coverage\"><h2>Coverage: runs since each part of a disk was last confirmed</h2>\n<p class=\"legend\">");
    for (_, label, c) in BUCKETS {
        let _ = write!(h, "<span><i style=\"background:{c}\"></i>{label}</span>");
    }
    for (label, c) in [OLDER, NEVER] {
        let _ = write!(h, "<span><i style=\"background:{c}\"></i>{label}</span>");
    }
    h.push_str(
        "<span><i style=\"background:#fff;outline:2px solid #000\"></i>tainted: verification found it differs</span></p>\n\
         <p class=\"note\">Each cell is a run of consecutive chunks, coloured by its least recently confirmed chunk: a \
         chunk is confirmed when a backup reads it or verification compares it with the source.</p>\n",
    );
    for vm in &inv.vms {
        let _ = writeln!(h, "<h3>{}</h3>", esc(&vm.vm));
        if vm.disks.is_empty() {
            h.push_str("<p class=\"note\">no restore point yet</p>\n");
        }
        for d in &vm.disks {
            heatmap(h, &vm.vm, d);
        }
    }
    h.push_str("</section>\n");
}

fn heatmap(h: &mut String, vm: &str, d: &DiskInventory) {
    let m = &d.map;
    let rows = m.cells.len().div_ceil(ROW);
    let cols = m.cells.len().min(ROW);
    let _ = write!(
        h,
        "<figure class=\"heatmap\" data-vm=\"{}\" data-disk=\"{}\" data-run=\"{}\" data-chunks=\"{}\" data-cells=\"{}\">\
         <svg width=\"{}\" height=\"{}\" role=\"img\" aria-label=\"coverage of disk {}\">",
        esc(vm),
        esc(&d.id),
        m.run,
        m.chunks,
        m.cells.len(),
        cols * PITCH,
        rows * PITCH,
        esc(&d.id)
    );
    let cs = u64::from(m.chunk_size);
    for (i, c) in m.cells.iter().enumerate() {
        let age = c.oldest_runs_ago.map_or("never".to_string(), |a| a.to_string());
        let text = match c.oldest_runs_ago {
            Some(a) => format!("oldest confirmed {a} run(s) ago, newest {}", c.newest_runs_ago.unwrap_or(a)),
            None => format!("{} chunk(s) never confirmed", c.never_confirmed),
        };
        let _ = write!(
            h,
            "<rect class=\"cell{}\" x=\"{}\" y=\"{}\" width=\"{CELL}\" height=\"{CELL}\" fill=\"{}\" data-first-chunk=\"{}\" \
             data-chunks=\"{}\" data-age=\"{age}\" data-tainted=\"{}\"><title>bytes {}–{}: {text}{}</title></rect>",
            if c.tainted { " tainted" } else { "" },
            (i % ROW) * PITCH,
            (i / ROW) * PITCH,
            colour(c.oldest_runs_ago),
            c.first_chunk,
            c.chunks,
            u8::from(c.tainted),
            c.first_chunk * cs,
            ((c.first_chunk + c.chunks) * cs).min(m.size),
            if c.tainted { "; TAINTED" } else { "" }
        );
    }
    h.push_str("</svg><figcaption>");
    let coverage = match &d.coverage {
        Some(c) if c.full_coverage_within_runs > 0 => format!(
            "every chunk confirmed within {} runs ({}); {} never confirmed",
            c.full_coverage_within_runs,
            c.bound.map_or("bound".to_string(), |b| format!("{b:?}").to_lowercase()),
            c.never_confirmed
        ),
        Some(c) => format!("no coverage bound; {} never confirmed", c.never_confirmed),
        None => "no coverage recorded".into(),
    };
    let _ = write!(
        h,
        "disk <b>{}</b>, {}, run {}, {} chunks in {} cells: {coverage}",
        esc(&d.id),
        bytes(d.size),
        d.run,
        m.chunks,
        m.cells.len()
    );
    if !d.mismatches.is_empty() {
        let ranges: Vec<String> = d.mismatches.iter().take(8).map(|r| format!("{}+{}", r.offset, r.length)).collect();
        let _ = write!(h, "; <span class=\"err\">tainted at bytes {}</span>", ranges.join(", "));
    }
    if let Some(w) = &m.warning {
        let _ = write!(h, "; <span class=\"err\">{}</span>", esc(w));
    }
    h.push_str("</figcaption></figure>\n");
}

fn lifecycle(h: &mut String, report: &RunReport) {
    h.push_str("<section id=\"lifecycle\"><h2>Retention, gc, copy</h2><ul>\n");
    for r in &report.retention {
        let _ = writeln!(
            h,
            "<li>retention of {}: {} kept, {} removed{}</li>",
            esc(&r.vm),
            r.kept,
            r.removed,
            r.error.as_ref().map_or(String::new(), |e| format!(" — <span class=\"err\">{}</span>", esc(e)))
        );
    }
    if let Some(g) = &report.gc {
        let what = match (&g.report, &g.error) {
            (_, Some(e)) => format!("<span class=\"err\">{}</span>", esc(e)),
            (Some(r), None) => format!("freed {} in {} packs", bytes(r.bytes_freed), r.packs_deleted),
            (None, None) => "not run".into(),
        };
        let _ = writeln!(h, "<li>gc: {what} ({})</li>", esc(&g.reason));
    }
    if let Some(c) = &report.copy {
        let what = match (&c.report, &c.error) {
            (_, Some(e)) => format!("<span class=\"err\">{}</span>", esc(e)),
            (Some(r), None) => format!(
                "{} restore points copied, {} already there, {} written",
                r.copied.len(),
                r.skipped.len(),
                bytes(r.bytes_written)
            ),
            (None, None) => "not run".into(),
        };
        let _ = writeln!(h, "<li>copy to {}: {what}</li>", esc(&c.to));
    }
    for e in &report.errors {
        let _ = writeln!(h, "<li class=\"err\">{}</li>", esc(e));
    }
    h.push_str("</ul></section>\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_and_escaping() {
        assert_eq!(bucket(None), None);
        assert_eq!(bucket(Some(0)), Some(0));
        assert_eq!(bucket(Some(3)), Some(2));
        assert_eq!(bucket(Some(4)), Some(3));
        assert_eq!(bucket(Some(1000)), Some(BUCKETS.len()));
        assert_eq!(colour(Some(1000)), OLDER.1);
        assert_eq!(esc("<a href=\"x\">&'"), "&lt;a href=&quot;x&quot;&gt;&amp;&#39;");
    }
}
