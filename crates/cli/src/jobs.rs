//! `blockproof run JOBFILE` and `blockproof schedule JOBFILE`: open what the job names,
//! hand it to blockproof-fleet, print the summary, map the outcome to the exit code.

use std::io::IsTerminal;
use std::path::Path;
use std::sync::Mutex;

use anyhow::{Context, Result};
use blockproof_core::Progress;
use blockproof_fleet::{Job, Monitor, PasswordSource, Repositories, RepositorySpec, RunStatus, VmRun};
use blockproof_repo::Repository;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};

use crate::args::{RunArgs, ScheduleArgs, StoreArgs};
use crate::commands::{human_bytes, print_json};
use crate::{exit, Usage};

fn load(path: &Path) -> Result<Job> {
    Job::load(path).map_err(|e| Usage(e.to_string()).into())
}

/// Opens one of the job's repositories: its password as the job says (a file, or an
/// environment variable — a prompt only on a terminal), its S3 options from the job
/// over the command line's.
fn open(spec: &RepositorySpec, store: &StoreArgs, label: &str) -> Result<Repository> {
    let mut store = store.clone();
    if let Some(endpoints) = &spec.s3_endpoint {
        // The job's endpoint (a comma-separated list of a cluster's nodes) replaces the
        // command line's.
        store.s3_endpoint = endpoints.split(',').map(str::to_string).collect();
    }
    store.s3_path_style |= spec.s3_path_style;
    let backend = crate::location::backend(&spec.location, &store, false)
        .with_context(|| format!("{label} {}", spec.location))?;
    let what = format!("{label} password");
    let pw = match &spec.password {
        PasswordSource::File(f) => crate::password::secret("", "password_file", Some(f), &what, false)?,
        PasswordSource::Env(var) => crate::password::secret(var, "password_file", None, &what, false)?,
    };
    let mut repo = Repository::open(backend, &pw).with_context(|| format!("{label} {}", spec.location))?;
    repo.set_index_cache(crate::location::index_cache(&store, &spec.location));
    Ok(repo)
}

pub fn run(a: RunArgs) -> Result<u8> {
    let job = load(&a.job)?;
    if a.dry_run {
        print!("{}", blockproof_fleet::plan::describe(&job));
        return Ok(exit::OK);
    }
    // Lives as long as the process: the restore tests' filesystem readers borrow it.
    let main: &'static Repository = Box::leak(Box::new(open(&job.repository, &a.store, "[repository]")?));
    let copy = job.copy.as_ref().map(|c| open(c, &a.store, "[copy]")).transpose()?;
    let (history, warnings) = match &job.reports.directory {
        Some(d) => blockproof_fleet::load_history(d),
        None => (Vec::new(), Vec::new()),
    };
    for w in &warnings {
        eprintln!("blockproof: warning: {w}");
    }
    let monitor = Terminal::new(job.vms.len());
    let tester = Tester { repo: main };
    let repos = Repositories { main, copy: copy.as_ref(), tester: Some(&tester) };
    let report = blockproof_fleet::run(&job, &repos, &history, &monitor);
    monitor.finish();
    let publication = blockproof_fleet::publish(&job, &report, &history);
    if a.json {
        print_json(&report)?;
    } else {
        summary(&report);
        for p in &publication.written {
            println!("wrote {}", p.display());
        }
    }
    for e in report.errors.iter().chain(&publication.errors) {
        eprintln!("blockproof: error: {e}");
    }
    for n in &publication.notifications {
        if let Some(e) = &n.error {
            eprintln!("blockproof: warning: notification {}: {e}", n.target);
        }
    }
    let code = if publication.errors.is_empty() { report.exit_code() } else { exit::ERROR };
    Ok(code)
}

/// `[restore_test]`'s tests: the filesystem-level test of `blockproof restore-test`, or
/// with `[restore_test.boot]` its boot test (stopped with the run: the repository's
/// cancellation).
struct Tester {
    repo: &'static Repository,
}

impl blockproof_fleet::RestoreTester for Tester {
    fn test(
        &self,
        snapshot: blockproof_format::Id,
        policy: &blockproof_fleet::RestoreTestPolicy,
    ) -> Result<blockproof_core::restore_test::RestoreTest, String> {
        let parse = |p: &str| blockproof_fs::FsPath::parse(p.as_bytes()).map_err(|e| format!("{p:?}: {e}"));
        let info = crate::commands::resolve_for_reading(self.repo, &snapshot.to_hex()).map_err(|e| format!("{e:#}"))?;
        if let Some(b) = &policy.boot {
            let kernel = match &b.kernel {
                None => None,
                Some(k) => Some((parse(k)?, b.initrd.as_deref().map(parse).transpose()?)),
            };
            let params = crate::boot_test::BootParams {
                console_marker: b.console_marker.clone(),
                fail_marker: b.fail_marker.clone(),
                guest_agent: b.guest_agent,
                script: None,
                timeout: b.timeout,
                memory_mib: b.memory_mib,
                cpus: b.cpus,
                accel: blockproof_vm::AccelChoice::Auto,
                firmware: if b.uefi { blockproof_vm::Firmware::Uefi } else { blockproof_vm::Firmware::Bios },
                kernel,
                append: b.append.clone(),
            };
            let disks = info.snapshot.disks.clone();
            return crate::boot_test::run_boot_test(self.repo, &info, &disks, &params, self.repo.cancel().clone())
                .map_err(|e| format!("{e:#}"));
        }
        let expect = policy.expect.iter().map(|p| parse(p)).collect::<Result<Vec<_>, _>>()?;
        crate::restore_test::fs_test(self.repo, &info, None, policy.sample, 0, &expect).map_err(|e| format!("{e:#}"))
    }
}

/// The summary table: one line per vm, then retention, gc, copy, restore tests.
fn summary(r: &blockproof_fleet::RunReport) {
    println!("{:<24} {:<8} {:>10} {:>10} {:>9} {:>8}  note", "VM", "STATUS", "READ", "STORED", "VERIFIED", "SECONDS");
    for vm in &r.vms {
        let (read, stored, verified) = vm.backup.as_ref().map_or((0, 0, 0), |b| {
            b.disks.iter().fold((0, 0, 0), |(r, s, v), d| (r + d.bytes_read, s + d.stored_bytes, v + d.verified_bytes))
        });
        let note = match (&vm.error, &vm.backup) {
            (Some(e), _) => e.clone(),
            (None, Some(b)) => format!("snapshot {}", b.snapshot.short()),
            (None, None) => String::new(),
        };
        println!(
            "{:<24} {:<8} {:>10} {:>10} {:>9} {:>8.1}  {note}",
            vm.name,
            vm.status.as_str(),
            human_bytes(read),
            human_bytes(stored),
            human_bytes(verified),
            vm.duration_seconds
        );
    }
    let removed: u64 = r.retention.iter().map(|f| f.removed).sum();
    if !r.retention.is_empty() {
        println!("retention: {removed} restore point(s) forgotten");
    }
    if let Some(gc) = &r.gc {
        println!("gc: {}{}", if gc.ran { "ran: " } else { "skipped: " }, gc.reason);
    }
    if let Some(c) = &r.copy {
        match (&c.report, &c.error) {
            (Some(rep), _) => {
                println!("copy to {}: {} copied, {} already there", c.to, rep.copied.len(), rep.skipped.len())
            }
            (None, Some(e)) => println!("copy to {}: failed: {e}", c.to),
            _ => {}
        }
    }
    for t in &r.restore_tests {
        let verdict =
            if t.passed { "passed".to_string() } else { format!("FAILED ({})", t.reason.as_deref().unwrap_or("?")) };
        println!("restore test of vm {} (snapshot {}, {}): {verdict}", t.vm, &t.snapshot[..12], t.due);
    }
    let count = |s: RunStatus| r.vms.iter().filter(|v| v.status == s).count();
    println!(
        "{}: {} ok, {} tainted, {} failed in {:.1} s",
        r.status.as_str(),
        count(RunStatus::Ok),
        count(RunStatus::Tainted),
        count(RunStatus::Failed),
        r.duration_seconds
    );
}

/// Progress of a run: on a terminal a bar per vm while it runs (indicatif), and a line per
/// vm as it finishes; elsewhere the lines only.
struct Terminal {
    bars: Option<MultiProgress>,
    done: Mutex<usize>,
    total: usize,
}

impl Terminal {
    fn new(total: usize) -> Self {
        let bars = std::io::stderr().is_terminal().then(MultiProgress::new);
        Terminal { bars, done: Mutex::new(0), total }
    }

    fn line(&self, text: &str) {
        match &self.bars {
            Some(m) => {
                let _ = m.println(text);
            }
            None => eprintln!("{text}"),
        }
    }

    fn finish(&self) {
        if let Some(m) = &self.bars {
            let _ = m.clear();
        }
    }
}

impl Monitor for Terminal {
    fn vm_progress(&self, vm: &str) -> Box<dyn Progress + '_> {
        match &self.bars {
            Some(m) => Box::new(VmBar { multi: m, vm: vm.to_string(), bar: Mutex::new(None) }),
            None => Box::new(crate::progress::Plain),
        }
    }

    fn vm_done(&self, run: &VmRun) {
        let mut done = self.done.lock().unwrap_or_else(|p| p.into_inner());
        *done += 1;
        let why = run.error.as_ref().map_or(String::new(), |e| format!(": {e}"));
        self.line(&format!("[{}/{}] vm {} {}{why}", *done, self.total, run.name, run.status.as_str()));
    }

    fn phase(&self, what: &str) {
        self.line(&format!("{what}..."));
    }
}

/// One vm's bar among the run's.
struct VmBar<'a> {
    multi: &'a MultiProgress,
    vm: String,
    bar: Mutex<Option<ProgressBar>>,
}

impl Progress for VmBar<'_> {
    fn begin(&self, what: &str, total: u64) {
        let bar = self.multi.add(ProgressBar::new(total));
        bar.set_style(
            ProgressStyle::with_template("{msg:>28} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec}")
                .expect("valid template")
                .progress_chars("=> "),
        );
        bar.set_message(format!("{} {what}", self.vm));
        if let Some(old) = self.bar.lock().unwrap_or_else(|p| p.into_inner()).replace(bar) {
            old.finish_and_clear();
        }
    }

    fn advance(&self, amount: u64) {
        if let Some(b) = self.bar.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
            b.inc(amount);
        }
    }

    fn end(&self) {
        if let Some(b) = self.bar.lock().unwrap_or_else(|p| p.into_inner()).take() {
            b.finish_and_clear();
            self.multi.remove(&b);
        }
    }

    fn warn(&self, message: &str) {
        let _ = self.multi.println(format!("blockproof: warning: vm {}: {message}", self.vm));
    }
}

pub fn schedule(a: ScheduleArgs) -> Result<u8> {
    let job = load(&a.job)?;
    let schedule = job.schedule.as_ref().ok_or_else(|| {
        Usage(format!("{}: the job has no [schedule] (add one, e.g. every = \"1d\", at = \"01:00\")", a.job.display()))
    })?;
    let exe = std::env::current_exe().context("cannot find the blockproof executable")?;
    let path = std::fs::canonicalize(&a.job).with_context(|| format!("{}", a.job.display()))?;
    let unit = format!("blockproof-{}", job.name);
    let (service, timer) = schedule.systemd_units(&unit, &exe, &path);
    match &a.write {
        Some(dir) => {
            for (name, text) in [(format!("{unit}.service"), &service), (format!("{unit}.timer"), &timer)] {
                let p = dir.join(name);
                std::fs::write(&p, text).with_context(|| format!("cannot write {}", p.display()))?;
                println!("wrote {}", p.display());
            }
            println!("then: systemctl daemon-reload && systemctl enable --now {unit}.timer");
        }
        None => {
            println!("# {unit}.service\n{service}\n# {unit}.timer\n{timer}");
            let cmd = format!("{} run {}", exe.display(), path.display());
            println!("# or, without systemd, this crontab line:\n# {}", schedule.cron_line(&cmd));
        }
    }
    Ok(exit::OK)
}
