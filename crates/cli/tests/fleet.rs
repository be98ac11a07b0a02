//! `blockproof run JOBFILE`: a fleet of vms under one job — N at a time, one vm's failure
//! never stops the others, retention, the copy, the reports (JSON, Prometheus checked by
//! promtool, HTML) and notifications; exit codes 0, 3, 1 and 2; `--dry-run`.

mod harness;

use std::fs;
use std::path::Path;
use std::process::Command;

use harness::nbdkit::Nbdkit;
use harness::qemu::*;
use harness::{change_list, mixed_image, Dir};
use serde_json::Value;

fn write_job(dir: &Dir, text: &str) -> std::path::PathBuf {
    let p = dir.join("job.toml");
    fs::write(&p, text).unwrap();
    p
}

fn read_json(p: &Path) -> Value {
    serde_json::from_slice(&fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))).unwrap()
}

fn vm<'a>(report: &'a Value, name: &str) -> &'a Value {
    report["vms"].as_array().unwrap().iter().find(|v| v["name"] == name).unwrap_or_else(|| panic!("vm {name}"))
}

fn modes(vm: &Value) -> Vec<String> {
    vm["backup"]["disks"].as_array().unwrap().iter().map(|d| d["mode"].as_str().unwrap().to_string()).collect()
}

/// `promtool check metrics` (Debian package `prometheus`) accepts the textfile.
fn promtool_accepts(metrics: &Path) {
    let out = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(fs::File::open(metrics).unwrap())
        .output()
        .expect("promtool (apt-get install prometheus)");
    assert!(
        out.status.success(),
        "promtool: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The value of the metric line starting with `series` (name and labels).
fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// Six vms — raw images, a qcow2 with `bitmap:auto`, a change list, hooks, and a vm whose
/// source fails once opened — backed up three at a time: the good vms back up, the broken
/// one is reported, retention and the copy run, the reports agree with the repository,
/// and the second run is incremental.
#[test]
fn a_job_over_six_vms() {
    let dir = Dir::new();
    dir.init();
    dir.cmd("init").arg("--repo").arg(dir.join("offsite")).args(["--kdf-memory", "8", "--kdf-iterations", "1"]).ok();
    let size = 4 << 20;
    dir.image("web.img", size, 1);
    dir.image("app-a.img", size, 2);
    dir.image("app-b.img", size / 2, 3);
    let qcow = qcow2(&dir, "db", size, 4);
    let files_img = dir.image("files.img", size, 5);
    dir.image("hooked.img", size, 6);
    let broken_img = dir.image("broken.img", size, 7);
    // A source that opens and then fails every read: its server is shutting down (a disk
    // gone from under it). (`EIO` would be retried for a while first.)
    let broken = Nbdkit::start(
        &dir,
        "broken",
        &["--filter=error", "file", broken_img.to_str().unwrap(), "error-pread-rate=100%", "error-pread=ESHUTDOWN"],
    );
    let job = write_job(
        &dir,
        &format!(
            r#"version = 1
name = "nightly"

[repository]
location = "repo"

[copy]
location = "offsite"
password_env = "BLOCKPROOF_PASSWORD"

[schedule]
every = "1d"

[run]
parallel = 3

[reports]
directory = "reports"
metrics = "textfile/blockproof.prom"

[defaults]
verify = "10%"

[[vm]]
name = "web"
disks = ["id=sda,source=web.img"]
retention = {{ keep_last = 1 }}

[[vm]]
name = "app"
disks = ["id=sda,source=app-a.img", "id=sdb,source=app-b.img"]

[[vm]]
name = "db"
disks = ["id=vda,source=db.qcow2,cbt=bitmap:auto"]

[[vm]]
name = "files"
disks = ["id=sda,source=files.img,cbt=changes:changes.json"]

[[vm]]
name = "hooked"
disks = ["id=sda,source=hooked.img"]
detect_within = "7d"
pre = {{ command = ["sh", "-c", "echo \"$BLOCKPROOF_VM $BLOCKPROOF_PHASE\" >> hooks.log"], timeout = "30s" }}
post = {{ command = ["sh", "-c", "echo \"$BLOCKPROOF_VM $BLOCKPROOF_PHASE $BLOCKPROOF_STATUS\" >> hooks.log"] }}

[[vm]]
name = "broken"
disks = ["id=sda,source={}"]

[[notify]]
on = ["failure"]
command = ["sh", "-c", "cat > notified.json"]
"#,
            broken.uri()
        ),
    );
    fs::create_dir(dir.join("textfile")).unwrap();
    change_list(&dir.join("changes.json"), size, &[(0, size as u64)]);

    let (out, err) = dir.cmd("run").arg(&job).code(1);
    assert!(out.lines().any(|l| l.starts_with("broken ") && l.contains("failed")), "stdout {out}\nstderr {err}");
    assert!(err.contains("vm broken failed"), "stdout {out}\nstderr {err}");
    let first = read_json(&dir.join("reports/latest.json"));
    assert_eq!(first["status"], "failed");
    for name in ["web", "app", "db", "files", "hooked"] {
        assert_eq!(vm(&first, name)["status"], "ok", "{name}: {}", vm(&first, name));
    }
    let b = vm(&first, "broken");
    assert_eq!(b["status"], "failed");
    assert!(b["error"].as_str().unwrap().len() > 5, "{b}");
    assert!(b["backup"].is_null());
    assert_eq!(vm(&first, "hooked")["assessments"][0]["verdict"], "holds", "{}", vm(&first, "hooked"));
    assert_eq!(fs::read_to_string(dir.join("hooks.log")).unwrap(), "hooked pre\nhooked post ok\n");
    assert_eq!(first["copy"]["report"]["copied"].as_array().unwrap().len(), 5, "{}", first["copy"]);
    assert_eq!(first["gc"]["ran"], true);
    let notified = read_json(&dir.join("notified.json"));
    assert_eq!(notified["started"], first["started"], "the notification got this run's report");

    // The reports match the repository's state.
    let snaps = dir.repo_cmd("snapshots").arg("--json").json();
    let snaps = snaps.as_array().unwrap();
    assert_eq!(snaps.len(), 5);
    let inv = &first["repository"];
    assert_eq!(inv["snapshots"], 5);
    for s in snaps {
        let name = s["vm"].as_str().unwrap();
        let v = inv["vms"].as_array().unwrap().iter().find(|v| v["vm"] == name).unwrap();
        assert_eq!(v["last_good"]["id"], s["id"], "{name}");
        assert_eq!(vm(&first, name)["backup"]["snapshot"], s["id"], "{name}");
    }
    let metrics_path = dir.join("textfile/blockproof.prom");
    promtool_accepts(&metrics_path);
    let metrics = fs::read_to_string(&metrics_path).unwrap();
    let web_time =
        humantime::parse_rfc3339_weak(snaps.iter().find(|s| s["vm"] == "web").unwrap()["time"].as_str().unwrap())
            .unwrap()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
    let series =
        |vm: &str| format!("blockproof_vm_last_success_timestamp_seconds{{blockproof_job=\"nightly\",vm=\"{vm}\"}}");
    let shown = metric(&metrics, &series("web")).unwrap_or_else(|| panic!("{metrics}"));
    assert!((shown - web_time).abs() < 0.001, "{shown} {web_time}");
    assert_eq!(metric(&metrics, &series("broken")), None, "no success of broken: {metrics}");
    assert_eq!(
        metric(&metrics, "blockproof_vm_status{blockproof_job=\"nightly\",vm=\"broken\",status=\"failed\"}"),
        Some(1.0)
    );
    assert_eq!(metric(&metrics, "blockproof_repository_snapshots{blockproof_job=\"nightly\"}"), Some(5.0), "{metrics}");
    let html = fs::read_to_string(dir.join("reports/report.html")).unwrap();
    assert!(html.contains("broken") && html.contains("hooked"));
    assert!(!html.contains("src=\"http") && !html.contains("href=\"http"), "self-contained");

    // Changes, then the second run: incremental where change tracking allows it.
    let _ = qemu_io_writes(&qcow, &scattered(size as u64, 6, 11));
    let mut data = mixed_image(size, 5);
    data[65536..65536 + 4096].fill(0x5a);
    fs::write(&files_img, &data).unwrap();
    change_list(&dir.join("changes.json"), size, &[(65536, 4096)]);
    dir.cmd("run").arg(&job).code(1);
    let second = read_json(&dir.join("reports/latest.json"));
    assert_ne!(second["started"], first["started"]);
    assert_eq!(modes(vm(&second, "db")), ["incremental"], "{}", vm(&second, "db"));
    assert_eq!(modes(vm(&second, "files")), ["incremental"], "{}", vm(&second, "files"));
    assert_eq!(vm(&second, "files")["backup"]["disks"][0]["bytes_read"], 65536);
    assert_eq!(vm(&second, "broken")["status"], "failed");
    // Retention kept web's newest restore point only; gc is not due a second time.
    let web_retention = second["retention"].as_array().unwrap().iter().find(|r| r["vm"] == "web").unwrap();
    assert_eq!((web_retention["kept"].as_u64(), web_retention["removed"].as_u64()), (Some(1), Some(1)));
    assert_eq!(second["gc"]["ran"], false);
    assert_eq!(second["copy"]["report"]["copied"].as_array().unwrap().len(), 5);
    let snaps = dir.repo_cmd("snapshots").arg("--json").json();
    assert_eq!(snaps.as_array().unwrap().iter().filter(|s| s["vm"] == "web").count(), 1);
    assert_eq!(second["repository"]["snapshots"], 9);
    promtool_accepts(&metrics_path);
    let reports: Vec<_> = fs::read_dir(dir.join("reports"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("run-"))
        .collect();
    assert_eq!(reports.len(), 2, "{reports:?}");
    dir.check_all();
}

const SMALL_JOB: &str = r#"version = 1

[repository]
location = "repo"

[run]
parallel = 2

[[vm]]
name = "one"
disks = ["id=sda,source=one.img"]

[[vm]]
name = "two"
disks = ["id=sda,source=two.img"]
"#;

/// All good: exit 0 and a summary per vm; `--dry-run` prints the plan and opens nothing;
/// an invalid job file: exit 2, one line naming the line.
#[test]
fn exit_codes_dry_run_and_invalid_jobs() {
    let dir = Dir::new();
    dir.image("one.img", 1 << 20, 1);
    dir.image("two.img", 1 << 20, 2);
    let job = write_job(&dir, SMALL_JOB);

    let plan = dir.cmd("run").arg(&job).arg("--dry-run").ok();
    assert!(plan.contains("2 vm(s), 2 at a time") && plan.contains("vm one") && plan.contains("disk sda"), "{plan}");
    assert!(!dir.repo().exists(), "a dry run opens nothing");

    dir.init();
    let out = dir.cmd("run").arg(&job).ok();
    assert!(out.lines().any(|l| l.starts_with("one ") && l.contains(" ok ")), "{out}");
    assert!(out.contains("ok: 2 ok, 0 tainted, 0 failed"), "{out}");
    let report = dir.cmd("run").arg(&job).arg("--json").json();
    assert_eq!(report["status"], "ok");
    assert_eq!(report["vms"].as_array().unwrap().len(), 2);

    let bad = SMALL_JOB.replace("parallel = 2", "parallel = 2\nretries = 3");
    let job = write_job(&dir, &bad);
    let err = dir.cmd("run").arg(&job).fails_with_one_line(2);
    assert!(err.contains("job.toml line 8") && err.contains("retries"), "{err}");
    let err = dir.cmd("run").arg(dir.join("missing.toml")).fails_with_one_line(2);
    assert!(err.contains("missing.toml: cannot read it"), "{err}");
}

/// The gc rule reads the run reports kept: pruning them to `keep` must not lose the record
/// of the last gc, or gc would run again as soon as that report is pruned (with hourly runs
/// and the default `keep = 30`, every 31 hours instead of weekly).
#[test]
fn pruning_run_reports_keeps_the_record_of_the_last_gc() {
    let dir = Dir::new();
    dir.init();
    dir.image("one.img", 1 << 20, 1);
    dir.image("two.img", 1 << 20, 2);
    let job = write_job(&dir, &format!("{SMALL_JOB}\n[reports]\ndirectory = \"reports\"\nkeep = 1\n"));
    let gc_ran = |run: usize| {
        dir.cmd("run").arg(&job).ok();
        let report = read_json(&dir.join("reports/latest.json"));
        assert_eq!(report["status"], "ok", "run {run}");
        report["gc"]["ran"].as_bool().unwrap()
    };
    assert!(gc_ran(1), "the first run runs gc");
    assert!(!gc_ran(2), "the second is within the week");
    assert!(!gc_ran(3), "so is the third, though only one run report is kept besides the last gc's");
}

/// A change list that hides a write, and verification of every unread chunk: the restore
/// point is stored but tainted, and the run exits 3.
#[test]
fn a_tainted_vm_makes_the_run_exit_3() {
    let dir = Dir::new();
    dir.init();
    let size = 2 << 20;
    let img = dir.image("liar.img", size, 9);
    dir.image("one.img", 1 << 20, 1);
    let job = write_job(
        &dir,
        &SMALL_JOB
            .replace("name = \"two\"", "name = \"liar\"\nverify = \"100%\"")
            .replace("source=two.img", "source=liar.img,cbt=changes:changes.json"),
    );
    change_list(&dir.join("changes.json"), size, &[(0, size as u64)]);
    dir.cmd("run").arg(&job).ok();
    let mut data = mixed_image(size, 9);
    data[3 * 65536..3 * 65536 + 512].fill(0xee);
    fs::write(&img, &data).unwrap();
    change_list(&dir.join("changes.json"), size, &[]);
    let (out, _) = dir.cmd("run").arg(&job).code(3);
    assert!(out.lines().any(|l| l.starts_with("liar ") && l.contains("tainted")), "{out}");
    assert!(out.lines().any(|l| l.starts_with("one ") && l.contains(" ok ")), "{out}");
}

/// `blockproof schedule` prints a systemd service and a persistent timer for the job.
#[test]
fn schedule_prints_systemd_units() {
    let dir = Dir::new();
    let job = write_job(&dir, &format!("{SMALL_JOB}\n[schedule]\nevery = \"12h\"\nat = \"02:15\"\n"));
    let out = dir.cmd("schedule").arg(&job).ok();
    assert!(out.contains("OnCalendar=*-*-* 02/12:15:00") && out.contains("Persistent=true"), "{out}");
    assert!(out.contains(" run ") && out.contains("job.toml"), "{out}");
    assert!(out.contains("15 2-23/12 * * *"), "{out}");
    let units = dir.join("units");
    fs::create_dir(&units).unwrap();
    dir.cmd("schedule").arg(&job).arg("--write").arg(&units).ok();
    let timer = fs::read_to_string(units.join("blockproof-job.timer")).unwrap();
    assert!(timer.contains("Persistent=true"));
    assert!(fs::read_to_string(units.join("blockproof-job.service")).unwrap().contains("Type=oneshot"));
    let err = dir.cmd("schedule").arg(write_job(&dir, SMALL_JOB)).fails_with_one_line(2);
    assert!(err.contains("no [schedule]"), "{err}");
}

/// `status --max-age`: the check for missed backups names every vm without a good restore
/// point that recent — a tainted latest one does not count, nor does a vm never backed up.
#[test]
fn status_max_age_names_every_stale_vm() {
    let dir = Dir::new();
    dir.init();
    let one = dir.image("one.img", 1 << 20, 1);
    dir.backup("one", &[("sda", &one)]);
    dir.repo_cmd("status").args(["--max-age", "1h"]).ok();
    let err = dir.repo_cmd("status").args(["--max-age", "1h", "--expect", "two"]).fails_with_one_line(1);
    assert!(err.contains("1 vm(s)") && err.contains("two (no good restore point)"), "{err}");
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let err = dir.repo_cmd("status").args(["--max-age", "1s", "--expect", "two"]).fails_with_one_line(1);
    assert!(err.contains("2 vm(s)") && err.contains("one (last good ") && err.contains("two (no good"), "{err}");
    let err = dir.repo_cmd("status").args(["--max-age", "soon"]).fails_with_one_line(2);
    assert!(err.contains("--max-age"), "{err}");
}

/// Runs headless Chromium (Debian package `chromium`) on `page` with `args`; returns its
/// standard output and the console messages it logged (errors, CSP violations).
fn chromium(dir: &Dir, page: &Path, args: &[&str]) -> (String, Vec<String>) {
    let out = Command::new("chromium")
        .args(["--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr", "--v=0"])
        .arg(format!("--user-data-dir={}", dir.join("chromium-profile").display()))
        .args(args)
        .arg(format!("file://{}", page.display()))
        .output()
        .expect("chromium (apt-get install chromium)");
    assert!(out.status.success(), "chromium: {}", String::from_utf8_lossy(&out.stderr));
    let console =
        String::from_utf8_lossy(&out.stderr).lines().filter(|l| l.contains(":CONSOLE")).map(String::from).collect();
    (String::from_utf8_lossy(&out.stdout).into_owned(), console)
}

/// The value of attribute `name` in the tag text `tag`.
fn attr<'a>(tag: &'a str, name: &str) -> &'a str {
    let key = format!("{name}=\"");
    let at = if tag.starts_with(&key) { Some(0) } else { tag.find(&format!(" {key}")).map(|i| i + 1) };
    let start = at.unwrap_or_else(|| panic!("{name} in {tag}")) + key.len();
    &tag[start..start + tag[start..].find('"').unwrap()]
}

/// The HTML report in a real browser: it loads with no console message (no error, nothing
/// blocked by its Content-Security-Policy — a page that breaks the policy is shown to be
/// caught), every disk of the repository has a heatmap whose cells are the disk's
/// confirmation state (ages, never-confirmed, tainted ranges), and a screenshot is kept.
#[test]
fn the_html_report_in_chromium() {
    let dir = Dir::new();
    dir.init();
    let size = 4 << 20;
    let plain = dir.image("plain.img", size, 1);
    let liar = dir.image("liar.img", size / 2, 2);
    let job = write_job(
        &dir,
        r#"version = 1
name = "html"

[repository]
location = "repo"

[reports]
directory = "reports"
heatmap_cells = 32

[[vm]]
name = "plain"
verify = "10%"
disks = ["id=sda,source=plain.img,cbt=changes:plain.json"]

[[vm]]
name = "liar"
verify = "100%"
disks = ["id=sda,source=liar.img,cbt=changes:liar.json"]
"#,
    );
    change_list(&dir.join("plain.json"), size, &[(0, size as u64)]);
    change_list(&dir.join("liar.json"), size / 2, &[(0, size as u64 / 2)]);
    dir.cmd("run").arg(&job).ok();
    // Two more runs reading nothing: the sample confirms some chunks, others age.
    change_list(&dir.join("plain.json"), size, &[]);
    change_list(&dir.join("liar.json"), size / 2, &[]);
    dir.cmd("run").arg(&job).ok();
    let mut data = fs::read(&liar).unwrap();
    data[5 * 65536..5 * 65536 + 512].fill(0xee);
    fs::write(&liar, &data).unwrap();
    dir.cmd("run").arg(&job).code(3);
    let _ = plain;

    let report = read_json(&dir.join("reports/latest.json"));
    let page = dir.join("reports/report.html");
    let (dom, console) = chromium(&dir, &page, &["--dump-dom"]);
    assert!(console.is_empty(), "console messages: {console:#?}");
    let figures: Vec<&str> =
        dom.split("<figure class=\"heatmap\"").skip(1).map(|f| &f[..f.find("</figure>").unwrap()]).collect();
    let mut seen_ages = std::collections::BTreeSet::new();
    let mut tainted_cells = 0;
    let inventory = report["repository"]["vms"].as_array().unwrap();
    assert_eq!(figures.len(), 2, "one heatmap per disk");
    for vm in inventory {
        for disk in vm["disks"].as_array().unwrap() {
            let figure = figures
                .iter()
                .find(|f| attr(f, "data-vm") == vm["vm"] && attr(f, "data-disk") == disk["id"])
                .unwrap_or_else(|| panic!("no heatmap for {} {}", vm["vm"], disk["id"]));
            let cells = disk["map"]["cells"].as_array().unwrap();
            let rects: Vec<&str> = figure.split("<rect ").skip(1).collect();
            assert_eq!(rects.len(), cells.len(), "{}", vm["vm"]);
            assert_eq!(attr(figure, "data-chunks"), disk["map"]["chunks"].to_string());
            for (rect, cell) in rects.iter().zip(cells) {
                assert_eq!(attr(rect, "data-first-chunk"), cell["first_chunk"].to_string());
                assert_eq!(attr(rect, "data-chunks"), cell["chunks"].to_string());
                let age = cell["oldest_runs_ago"].as_u64().map_or("never".to_string(), |a| a.to_string());
                assert_eq!(attr(rect, "data-age"), age);
                seen_ages.insert(age);
                let tainted = cell["tainted"].as_bool().unwrap();
                assert_eq!(attr(rect, "class") == "cell tainted", tainted, "{rect}");
                assert_eq!(attr(rect, "data-tainted"), if tainted { "1" } else { "0" });
                tainted_cells += usize::from(tainted);
            }
        }
    }
    assert!(tainted_cells >= 1, "the hidden write is marked");
    assert!(seen_ages.len() >= 2, "cells of different ages: {seen_ages:?}");
    assert!(dom.contains("data-vm=\"liar\" data-status=\"tainted\""), "the night's status per vm");

    // A screenshot, kept as a test artifact.
    let shot = Path::new(env!("CARGO_TARGET_TMPDIR")).join("fleet-report.png");
    let _ = fs::remove_file(&shot);
    chromium(&dir, &page, &[&format!("--screenshot={}", shot.display()), "--window-size=1280,1600"]);
    assert!(fs::read(&shot).unwrap().starts_with(b"\x89PNG"), "{}", shot.display());

    // The console check catches a page that breaks the report's policy.
    let bad = dir.join("reports/bad.html");
    let html = fs::read_to_string(&page).unwrap();
    fs::write(&bad, html.replacen("</body>", "<img src=\"https://example.invalid/x.png\"></body>", 1)).unwrap();
    let (_, console) = chromium(&dir, &bad, &["--dump-dom"]);
    assert!(console.iter().any(|l| l.contains("Content Security Policy")), "{console:#?}");
}

/// A pre hook that fails fails its vm only: no backup of it, its post hook still runs
/// (to undo what the pre hook did), the other vm is backed up, and the run exits 1.
#[test]
fn a_failing_pre_hook_fails_its_vm_only() {
    let dir = Dir::new();
    dir.init();
    dir.image("one.img", 1 << 20, 1);
    dir.image("two.img", 1 << 20, 2);
    let job = write_job(
        &dir,
        &SMALL_JOB.replace(
            "name = \"two\"",
            "name = \"two\"\npre = { command = [\"sh\", \"-c\", \"echo cannot freeze >&2; exit 4\"] }\n\
             post = { command = [\"sh\", \"-c\", \"echo $BLOCKPROOF_STATUS > post.txt\"] }",
        ),
    );
    let report = {
        let mut c = dir.cmd("run");
        c.arg(&job).arg("--json");
        let (out, _) = c.code(1);
        serde_json::from_str::<Value>(&out).unwrap()
    };
    assert_eq!(vm(&report, "one")["status"], "ok");
    let two = vm(&report, "two");
    assert_eq!(two["status"], "failed");
    assert_eq!(two["error"], "pre hook: sh exited with 4: cannot freeze", "{two}");
    assert!(two["backup"].is_null());
    assert_eq!(fs::read_to_string(dir.join("post.txt")).unwrap(), "failed\n");
    let snaps = dir.repo_cmd("snapshots").arg("--json").json();
    assert_eq!(snaps.as_array().unwrap().iter().map(|s| s["vm"].as_str().unwrap()).collect::<Vec<_>>(), ["one"]);
}
