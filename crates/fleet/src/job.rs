//! The job file: its TOML schema, and the validated [`Job`] made from it.
//!
//! Everything is checked before anything runs, and every error names the line (the TOML
//! parser gives each value its byte span): unknown keys, wrong types, bad durations,
//! budgets and disk specs, `verify` together with `detect_within`, an objective without a
//! schedule, a vm in an unknown group, duplicate vm names. Keys reserved for running-VM
//! sources (libvirt domains, QMP sockets) are refused with a message saying so, so that a
//! job file written for a later version never runs half-understood. The schema is
//! documented in docs/JOBS.md.

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use blockproof_core::{Budget, KeepPolicy, OnMismatch};
use serde::de::IgnoredAny;
use serde::Deserialize;
use toml::Spanned;

use crate::disk::DiskSpec;
use crate::hook::Hook;
use crate::notify::{Notify, NotifyOn, NotifyTarget};
use crate::objective::Objective;
use crate::restore_tests::{BootTestPolicy, RestoreTestPolicy};
use crate::schedule::Schedule;
use crate::JobError;

/// The job file version this build reads.
pub const JOB_VERSION: i64 = 1;

/// Where a repository's password comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PasswordSource {
    /// The first line of this file.
    File(PathBuf),
    /// This environment variable.
    Env(String),
}

/// A repository of the job.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RepositorySpec {
    /// A directory or `s3://BUCKET/PREFIX`.
    pub location: String,
    pub password: PasswordSource,
    pub s3_endpoint: Option<String>,
    pub s3_path_style: bool,
}

/// How much each of a vm's disks is verified per run, and why.
#[derive(Clone, Debug, PartialEq)]
pub struct VerifyPlan {
    pub budget: Budget,
    /// The budget as written, or as derived from the objective.
    pub text: String,
    pub objective: Option<Objective>,
}

/// One vm of the job with its policy resolved (vm, then its group, then `[defaults]`).
#[derive(Clone, Debug)]
pub struct VmPlan {
    pub name: String,
    pub group: Option<String>,
    pub disks: Vec<DiskSpec>,
    pub verify: VerifyPlan,
    pub on_mismatch: OnMismatch,
    pub retention: Option<KeepPolicy>,
    pub pre: Option<Hook>,
    pub post: Option<Hook>,
    pub tags: Vec<String>,
}

/// Where reports go.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Reports {
    /// JSON run reports (`run-TIME.json`, `latest.json`) and `report.html`.
    pub directory: Option<PathBuf>,
    /// The Prometheus textfile (node_exporter's textfile collector), written atomically.
    pub metrics: Option<PathBuf>,
    pub html: bool,
    /// Run reports kept in the directory (the trends of the HTML report read them).
    pub keep: usize,
    /// Cells of a disk's heatmap at most.
    pub heatmap_cells: usize,
}

/// When garbage collection runs after retention.
#[derive(Clone, Debug, PartialEq)]
pub struct GcPolicy {
    /// At most this often (`None`: never), judged from the run reports kept.
    pub every: Option<Duration>,
    pub repack_threshold: f64,
}

/// A validated job.
#[derive(Clone, Debug)]
pub struct Job {
    pub name: String,
    pub path: PathBuf,
    pub repository: RepositorySpec,
    pub copy: Option<RepositorySpec>,
    pub schedule: Option<Schedule>,
    /// VMs backed up at once.
    pub parallel: usize,
    pub reports: Reports,
    pub gc: GcPolicy,
    pub vms: Vec<VmPlan>,
    pub notify: Vec<Notify>,
    /// `[restore_test]`: scheduled restore tests ([`crate::restore_tests`]).
    pub restore_test: Option<RestoreTestPolicy>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawJob {
    version: Spanned<i64>,
    name: Option<Spanned<String>>,
    repository: Spanned<RawRepository>,
    copy: Option<Spanned<RawRepository>>,
    schedule: Option<Spanned<RawSchedule>>,
    run: Option<RawRun>,
    reports: Option<RawReports>,
    gc: Option<RawGc>,
    defaults: Option<Spanned<RawEntry>>,
    #[serde(default)]
    groups: BTreeMap<String, Spanned<RawEntry>>,
    #[serde(default)]
    vm: Vec<Spanned<RawEntry>>,
    #[serde(default)]
    notify: Vec<Spanned<RawNotify>>,
    restore_test: Option<Spanned<RawRestoreTest>>,
    // Reserved for running-VM sources (hypervisor connections).
    libvirt: Option<Spanned<IgnoredAny>>,
    qmp: Option<Spanned<IgnoredAny>>,
    hypervisor: Option<Spanned<IgnoredAny>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRepository {
    location: Spanned<String>,
    password_file: Option<Spanned<String>>,
    password_env: Option<Spanned<String>>,
    s3_endpoint: Option<String>,
    #[serde(default)]
    s3_path_style: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSchedule {
    every: Option<Spanned<String>>,
    at: Option<Spanned<String>>,
    randomized_delay: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRun {
    parallel: Option<Spanned<i64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawReports {
    directory: Option<Spanned<String>>,
    metrics: Option<Spanned<String>>,
    html: Option<bool>,
    keep: Option<Spanned<i64>>,
    heatmap_cells: Option<Spanned<i64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRestoreTest {
    every: Option<Spanned<String>>,
    per_run: Option<Spanned<i64>>,
    sample: Option<Spanned<String>>,
    #[serde(default)]
    expect: Vec<Spanned<String>>,
    boot: Option<Spanned<RawBootTest>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBootTest {
    console_marker: Option<String>,
    fail_marker: Option<String>,
    #[serde(default)]
    guest_agent: bool,
    timeout: Option<Spanned<String>>,
    memory: Option<Spanned<i64>>,
    cpus: Option<Spanned<i64>>,
    firmware: Option<Spanned<FirmwareChoice>>,
    kernel: Option<String>,
    initrd: Option<String>,
    append: Option<String>,
}

/// `firmware` of `[restore_test.boot]`.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
enum FirmwareChoice {
    Bios,
    Uefi,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGc {
    every: Option<Spanned<String>>,
    repack_threshold: Option<Spanned<String>>,
}

/// `[defaults]`, a `[groups.NAME]` or a `[[vm]]`: the same keys, some only in `[[vm]]`.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawEntry {
    name: Option<Spanned<String>>,
    group: Option<Spanned<String>>,
    disks: Option<Spanned<Vec<Spanned<String>>>>,
    verify: Option<Spanned<String>>,
    detect_within: Option<Spanned<String>>,
    on_mismatch: Option<Spanned<MismatchChoice>>,
    retention: Option<Spanned<RawRetention>>,
    pre: Option<Spanned<RawHook>>,
    post: Option<Spanned<RawHook>>,
    tags: Option<Vec<Spanned<String>>>,
    // Reserved for running-VM sources: a libvirt domain, a glob of domains, a QMP socket,
    // the hypervisor connection.
    domain: Option<Spanned<IgnoredAny>>,
    domains: Option<Spanned<IgnoredAny>>,
    qmp: Option<Spanned<IgnoredAny>>,
    libvirt: Option<Spanned<IgnoredAny>>,
    hypervisor: Option<Spanned<IgnoredAny>>,
}

#[derive(Deserialize, Clone, Copy)]
#[serde(rename_all = "lowercase")]
enum MismatchChoice {
    Keep,
    Heal,
    Scan,
}

#[derive(Deserialize, Clone, Default)]
#[serde(deny_unknown_fields)]
struct RawRetention {
    keep_last: Option<u32>,
    keep_hourly: Option<u32>,
    keep_daily: Option<u32>,
    keep_weekly: Option<u32>,
    keep_monthly: Option<u32>,
    keep_yearly: Option<u32>,
}

#[derive(Deserialize, Clone)]
#[serde(deny_unknown_fields)]
struct RawHook {
    command: Spanned<Vec<String>>,
    timeout: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNotify {
    on: Option<Vec<NotifyOn>>,
    command: Option<Spanned<Vec<String>>>,
    webhook: Option<Spanned<String>>,
    timeout: Option<Spanned<String>>,
}

const DEFAULT_HOOK_TIMEOUT: Duration = Duration::from_secs(300);
const DEFAULT_NOTIFY_TIMEOUT: Duration = Duration::from_secs(30);

/// Errors at byte spans of one job file.
struct Source<'a> {
    path: &'a Path,
    text: &'a str,
}

impl Source<'_> {
    fn err(&self, span: Range<usize>, message: impl Into<String>) -> JobError {
        let line = self.text[..span.start.min(self.text.len())].matches('\n').count() + 1;
        JobError { path: self.path.to_path_buf(), line: Some(line), message: message.into() }
    }

    fn duration(&self, s: &Spanned<String>, key: &str) -> Result<Duration, JobError> {
        let d = humantime::parse_duration(s.get_ref().trim()).map_err(|e| {
            self.err(s.span(), format!("{key} = {:?}: {e} (e.g. \"30s\", \"5m\", \"7d\")", s.get_ref()))
        })?;
        if d.is_zero() {
            return Err(self.err(s.span(), format!("{key} = {:?}: must be more than zero", s.get_ref())));
        }
        Ok(d)
    }

    fn path(&self, s: &Spanned<String>) -> PathBuf {
        let p = Path::new(s.get_ref());
        if p.is_relative() {
            self.path.parent().unwrap_or(Path::new(".")).join(p)
        } else {
            p.to_path_buf()
        }
    }

    fn reserved(&self, key: &str, value: &Option<Spanned<IgnoredAny>>) -> Result<(), JobError> {
        match value {
            Some(v) => Err(self.err(
                v.span(),
                format!(
                    "{key} is reserved for running-VM sources (libvirt domains, QMP sockets), which this version does \
                     not support yet: list the vm's disks with disks = [\"id=...,source=...\"]"
                ),
            )),
            None => Ok(()),
        }
    }
}

impl Job {
    /// Reads and validates the job file at `path`.
    pub fn load(path: &Path) -> Result<Job, JobError> {
        let text = std::fs::read_to_string(path).map_err(|e| JobError {
            path: path.to_path_buf(),
            line: None,
            message: format!("cannot read it: {e}"),
        })?;
        Job::parse(path, &text)
    }

    /// Validates the job file text `text` read from `path` (relative paths in it are
    /// relative to the file's directory).
    pub fn parse(path: &Path, text: &str) -> Result<Job, JobError> {
        let src = Source { path, text };
        let raw: RawJob = toml::from_str(text).map_err(|e| {
            let message = e.message().trim().to_string();
            match e.span() {
                Some(span) => src.err(span, message),
                None => JobError { path: path.to_path_buf(), line: None, message },
            }
        })?;
        if *raw.version.get_ref() != JOB_VERSION {
            return Err(src.err(
                raw.version.span(),
                format!(
                    "version = {}: this blockproof reads job files of version {JOB_VERSION}",
                    raw.version.get_ref()
                ),
            ));
        }
        src.reserved("libvirt", &raw.libvirt)?;
        src.reserved("qmp", &raw.qmp)?;
        src.reserved("hypervisor", &raw.hypervisor)?;
        let name = match &raw.name {
            Some(n) => {
                check_name(n.get_ref()).map_err(|e| src.err(n.span(), format!("name = {:?}: {e}", n.get_ref())))?;
                n.get_ref().clone()
            }
            None => path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .filter(|s| check_name(s).is_ok())
                .unwrap_or_else(|| "job".into()),
        };
        let repository = repository_spec(&src, &raw.repository, "BLOCKPROOF_PASSWORD")?;
        let copy = raw.copy.as_ref().map(|c| repository_spec(&src, c, "BLOCKPROOF_TO_PASSWORD")).transpose()?;
        let schedule = match &raw.schedule {
            Some(s) => {
                let s = s.get_ref();
                let every = match &s.every {
                    Some(e) => src.duration(e, "every")?,
                    None => Duration::from_secs(86400),
                };
                let delay = s.randomized_delay.as_ref().map(|d| src.duration(d, "randomized_delay")).transpose()?;
                let at = s.at.as_ref().map_or("01:00", |a| a.get_ref().as_str());
                // The error names the key at fault (`every = ...` or `at = ...`): its line.
                let span = |e: &str| {
                    let at_fault = if e.starts_with("at ") { s.at.as_ref() } else { s.every.as_ref() };
                    at_fault.or(s.every.as_ref()).or(s.at.as_ref()).map_or(0..0, |v| v.span())
                };
                Some(Schedule::new(every, at, delay).map_err(|e| src.err(span(&e), e))?)
            }
            None => None,
        };
        let parallel = match raw.run.as_ref().and_then(|r| r.parallel.as_ref()) {
            Some(p) if (1..=64).contains(p.get_ref()) => *p.get_ref() as usize,
            Some(p) => return Err(src.err(p.span(), format!("parallel = {}: from 1 to 64", p.get_ref()))),
            None => 2,
        };
        let reports = reports(&src, raw.reports.as_ref())?;
        let gc = gc_policy(&src, raw.gc.as_ref())?;

        let empty = Spanned::new(0..0, RawEntry::default());
        let defaults = raw.defaults.as_ref().unwrap_or(&empty);
        only_in_vm(&src, defaults.get_ref(), "[defaults]")?;
        for (group, entry) in &raw.groups {
            only_in_vm(&src, entry.get_ref(), &format!("[groups.{group}]"))?;
        }
        if raw.vm.is_empty() {
            return Err(JobError { path: path.to_path_buf(), line: None, message: "no [[vm]] in the job".into() });
        }
        let mut vms: Vec<VmPlan> = Vec::new();
        for entry in &raw.vm {
            let vm = vm_plan(&src, entry, &raw.groups, defaults.get_ref(), schedule.as_ref())?;
            if vms.iter().any(|v| v.name == vm.name) {
                return Err(src.err(entry.span(), format!("vm {:?} is listed twice", vm.name)));
            }
            vms.push(vm);
        }
        let notify = raw.notify.iter().map(|n| notify(&src, n)).collect::<Result<_, _>>()?;
        let restore_test = raw.restore_test.as_ref().map(|r| restore_test_policy(&src, r.get_ref())).transpose()?;
        Ok(Job {
            name,
            path: path.to_path_buf(),
            repository,
            copy,
            schedule,
            parallel,
            reports,
            gc,
            vms,
            notify,
            restore_test,
        })
    }
}

fn restore_test_policy(src: &Source<'_>, r: &RawRestoreTest) -> Result<RestoreTestPolicy, JobError> {
    let every =
        r.every.as_ref().map(|e| src.duration(e, "every")).transpose()?.unwrap_or(Duration::from_secs(7 * 86400));
    let per_run = match &r.per_run {
        Some(n) if (1..=1000).contains(n.get_ref()) => *n.get_ref() as usize,
        Some(n) => return Err(src.err(n.span(), format!("per_run = {}: from 1 to 1000", n.get_ref()))),
        None => 1,
    };
    let sample = match &r.sample {
        Some(s) => {
            let text = s.get_ref().trim();
            match text.strip_suffix('%').unwrap_or(text).trim().parse::<f64>() {
                Ok(p) if (0.0..=100.0).contains(&p) => p / 100.0,
                _ => return Err(src.err(s.span(), format!("sample = {:?}: a percentage from 0% to 100%", s.get_ref()))),
            }
        }
        None => 0.05,
    };
    let mut expect = Vec::new();
    for e in &r.expect {
        if !e.get_ref().starts_with('/') {
            return Err(src.err(e.span(), format!("expect = {:?}: an absolute path inside the vm", e.get_ref())));
        }
        expect.push(e.get_ref().clone());
    }
    let boot = r.boot.as_ref().map(|b| boot_test_policy(src, b)).transpose()?;
    if boot.is_some() {
        if let Some(s) = r.sample.as_ref() {
            return Err(src.err(s.span(), "sample: a boot test reads no files (remove it or [restore_test.boot])"));
        }
        if let Some(e) = r.expect.first() {
            return Err(src.err(e.span(), "expect: a boot test reads no files (remove it or [restore_test.boot])"));
        }
    }
    Ok(RestoreTestPolicy { every, per_run, sample, expect, boot })
}

fn boot_test_policy(src: &Source<'_>, b: &Spanned<RawBootTest>) -> Result<BootTestPolicy, JobError> {
    let r = b.get_ref();
    if r.console_marker.is_none() && !r.guest_agent {
        return Err(src.err(b.span(), "[restore_test.boot] needs a check: console_marker, guest_agent = true or both"));
    }
    if r.kernel.is_none() && (r.initrd.is_some() || r.append.is_some()) {
        return Err(src.err(b.span(), "[restore_test.boot]: initrd and append need kernel"));
    }
    let ranged = |v: &Option<Spanned<i64>>, key: &str, range: std::ops::RangeInclusive<i64>, default: i64| match v {
        Some(n) if range.contains(n.get_ref()) => Ok(*n.get_ref()),
        Some(n) => {
            Err(src.err(n.span(), format!("{key} = {}: from {} to {}", n.get_ref(), range.start(), range.end())))
        }
        None => Ok(default),
    };
    Ok(BootTestPolicy {
        console_marker: r.console_marker.clone(),
        fail_marker: r.fail_marker.clone(),
        guest_agent: r.guest_agent,
        timeout: r
            .timeout
            .as_ref()
            .map(|t| src.duration(t, "timeout"))
            .transpose()?
            .unwrap_or(Duration::from_secs(300)),
        memory_mib: ranged(&r.memory, "memory", 16..=1 << 20, 512)? as u64,
        cpus: ranged(&r.cpus, "cpus", 1..=64, 2)? as u32,
        uefi: r.firmware.as_ref().is_some_and(|f| *f.get_ref() == FirmwareChoice::Uefi),
        kernel: r.kernel.clone(),
        initrd: r.initrd.clone(),
        append: r.append.clone(),
    })
}

/// Names of jobs (unit files, metric labels) and vms: letters, digits and `-_.@+`.
fn check_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.@+".contains(&b))
        && !name.starts_with('.');
    if ok {
        Ok(())
    } else {
        Err("use 1-128 letters, digits and - _ . @ + (not starting with a dot)".into())
    }
}

fn repository_spec(src: &Source<'_>, r: &Spanned<RawRepository>, env: &str) -> Result<RepositorySpec, JobError> {
    let raw = r.get_ref();
    if raw.location.get_ref().trim().is_empty() {
        return Err(src.err(raw.location.span(), "location is empty"));
    }
    let password = match (&raw.password_file, &raw.password_env) {
        (Some(_), Some(e)) => return Err(src.err(e.span(), "give password_file or password_env, not both")),
        (Some(f), None) => PasswordSource::File(src.path(f)),
        (None, Some(e)) => PasswordSource::Env(e.get_ref().clone()),
        (None, None) => PasswordSource::Env(env.into()),
    };
    let location = raw.location.get_ref();
    let location =
        if location.starts_with("s3://") { location.clone() } else { src.path(&raw.location).display().to_string() };
    Ok(RepositorySpec { location, password, s3_endpoint: raw.s3_endpoint.clone(), s3_path_style: raw.s3_path_style })
}

fn reports(src: &Source<'_>, r: Option<&RawReports>) -> Result<Reports, JobError> {
    let Some(r) = r else {
        return Ok(Reports { keep: 30, heatmap_cells: 256, ..Reports::default() });
    };
    let keep = match &r.keep {
        Some(k) if (1..=10_000).contains(k.get_ref()) => *k.get_ref() as usize,
        Some(k) => return Err(src.err(k.span(), format!("keep = {}: from 1 to 10000", k.get_ref()))),
        None => 30,
    };
    let heatmap_cells = match &r.heatmap_cells {
        Some(k) if (16..=4096).contains(k.get_ref()) => *k.get_ref() as usize,
        Some(k) => return Err(src.err(k.span(), format!("heatmap_cells = {}: from 16 to 4096", k.get_ref()))),
        None => 256,
    };
    if let (Some(h), None) = (r.html, &r.directory) {
        if h {
            return Err(JobError {
                path: src.path.to_path_buf(),
                line: None,
                message: "[reports] html = true needs a directory".into(),
            });
        }
    }
    let metrics = match &r.metrics {
        Some(m) if !m.get_ref().ends_with(".prom") => {
            return Err(
                src.err(m.span(), "metrics: node_exporter's textfile collector reads only files ending in .prom")
            )
        }
        Some(m) => Some(src.path(m)),
        None => None,
    };
    Ok(Reports {
        directory: r.directory.as_ref().map(|d| src.path(d)),
        metrics,
        html: r.html.unwrap_or(true) && r.directory.is_some(),
        keep,
        heatmap_cells,
    })
}

fn gc_policy(src: &Source<'_>, g: Option<&RawGc>) -> Result<GcPolicy, JobError> {
    let mut policy = GcPolicy { every: Some(Duration::from_secs(7 * 86400)), repack_threshold: 0.25 };
    let Some(g) = g else { return Ok(policy) };
    if let Some(e) = &g.every {
        policy.every = if e.get_ref() == "never" { None } else { Some(src.duration(e, "every")?) };
    }
    if let Some(t) = &g.repack_threshold {
        let v: f64 =
            t.get_ref().trim().trim_end_matches('%').parse().ok().filter(|v| (0.0..=100.0).contains(v)).ok_or_else(
                || src.err(t.span(), format!("repack_threshold = {:?}: a percentage such as \"25%\"", t.get_ref())),
            )?;
        policy.repack_threshold = v / 100.0;
    }
    Ok(policy)
}

fn only_in_vm(src: &Source<'_>, e: &RawEntry, table: &str) -> Result<(), JobError> {
    let spans = [
        ("name", e.name.as_ref().map(|s| s.span())),
        ("group", e.group.as_ref().map(|s| s.span())),
        ("disks", e.disks.as_ref().map(|s| s.span())),
    ];
    for (key, span) in spans {
        if let Some(span) = span {
            return Err(src.err(span, format!("{key} belongs in a [[vm]], not in {table}")));
        }
    }
    check_reserved(src, e)
}

fn check_reserved(src: &Source<'_>, e: &RawEntry) -> Result<(), JobError> {
    src.reserved("domain", &e.domain)?;
    src.reserved("domains", &e.domains)?;
    src.reserved("qmp", &e.qmp)?;
    src.reserved("libvirt", &e.libvirt)?;
    src.reserved("hypervisor", &e.hypervisor)
}

/// The first of `layers` (most specific first) that sets a key.
fn first<'a, T>(layers: &[&'a RawEntry], get: impl Fn(&'a RawEntry) -> Option<&'a T>) -> Option<&'a T> {
    layers.iter().find_map(|l| get(l))
}

fn vm_plan(
    src: &Source<'_>,
    entry: &Spanned<RawEntry>,
    groups: &BTreeMap<String, Spanned<RawEntry>>,
    defaults: &RawEntry,
    schedule: Option<&Schedule>,
) -> Result<VmPlan, JobError> {
    let e = entry.get_ref();
    check_reserved(src, e)?;
    let name = e.name.as_ref().ok_or_else(|| src.err(entry.span(), "a [[vm]] needs name = \"...\""))?;
    check_name(name.get_ref()).map_err(|m| src.err(name.span(), format!("vm name {:?}: {m}", name.get_ref())))?;
    let group = match &e.group {
        Some(g) => Some(
            groups
                .get(g.get_ref())
                .ok_or_else(|| src.err(g.span(), format!("no [groups.{}] in the job", g.get_ref())))?
                .get_ref(),
        ),
        None => None,
    };
    let layers: Vec<&RawEntry> = [Some(e), group, Some(defaults)].into_iter().flatten().collect();

    let disks_raw = e.disks.as_ref().filter(|d| !d.get_ref().is_empty()).ok_or_else(|| {
        src.err(entry.span(), format!("vm {:?} has no disks: disks = [\"id=ID,source=SOURCE\"]", name.get_ref()))
    })?;
    let base = src.path.parent().unwrap_or(Path::new("."));
    let mut disks: Vec<DiskSpec> = Vec::new();
    for d in disks_raw.get_ref() {
        let spec = DiskSpec::parse(d.get_ref()).map_err(|m| src.err(d.span(), m))?.relative_to(base);
        if disks.iter().any(|x| x.id == spec.id) {
            return Err(src.err(d.span(), format!("disk id {:?} is listed twice", spec.id)));
        }
        disks.push(spec);
    }

    // The budget: the most specific layer that says anything about verification decides.
    let verify_layer = layers.iter().find(|l| l.verify.is_some() || l.detect_within.is_some());
    let verify = match verify_layer {
        Some(l) => match (&l.verify, &l.detect_within) {
            (Some(_), Some(d)) => return Err(src.err(d.span(), "give verify or detect_within, not both")),
            (Some(v), None) => VerifyPlan {
                budget: Budget::parse(v.get_ref()).map_err(|m| src.err(v.span(), format!("verify: {m}")))?,
                text: v.get_ref().clone(),
                objective: None,
            },
            (None, Some(d)) => {
                let schedule = schedule.ok_or_else(|| {
                    src.err(
                        d.span(),
                        "detect_within needs a [schedule]: the budget depends on how many runs a day there are",
                    )
                })?;
                let within = src.duration(d, "detect_within")?;
                let o = Objective::new(d.get_ref(), within, schedule).map_err(|m| src.err(d.span(), m))?;
                VerifyPlan { budget: o.budget(), text: o.budget_text(), objective: Some(o) }
            }
            (None, None) => unreachable!("the layer sets one"),
        },
        None => VerifyPlan { budget: blockproof_core::default_verify_budget(), text: "5%".into(), objective: None },
    };
    let on_mismatch = match first(&layers, |l| l.on_mismatch.as_ref()).map(|s| *s.get_ref()) {
        Some(MismatchChoice::Heal) => OnMismatch::Heal,
        Some(MismatchChoice::Scan) => OnMismatch::Scan,
        Some(MismatchChoice::Keep) | None => OnMismatch::Keep,
    };
    let retention = match first(&layers, |l| l.retention.as_ref()) {
        Some(r) => {
            let raw = r.get_ref();
            let p = KeepPolicy {
                last: raw.keep_last,
                hourly: raw.keep_hourly,
                daily: raw.keep_daily,
                weekly: raw.keep_weekly,
                monthly: raw.keep_monthly,
                yearly: raw.keep_yearly,
                ..KeepPolicy::default()
            };
            if p.is_empty() {
                return Err(src.err(r.span(), "retention keeps nothing: give keep_last, keep_daily, ..."));
            }
            Some(p)
        }
        None => None,
    };
    let hook = |h: Option<&Spanned<RawHook>>| -> Result<Option<Hook>, JobError> {
        let Some(h) = h else { return Ok(None) };
        let raw = h.get_ref();
        if raw.command.get_ref().is_empty() || raw.command.get_ref()[0].is_empty() {
            return Err(src.err(raw.command.span(), "command is empty: [\"/path/to/program\", \"arg\", ...]"));
        }
        let timeout = raw.timeout.as_ref().map(|t| src.duration(t, "timeout")).transpose()?;
        Ok(Some(Hook { command: raw.command.get_ref().clone(), timeout: timeout.unwrap_or(DEFAULT_HOOK_TIMEOUT) }))
    };
    let pre = hook(first(&layers, |l| l.pre.as_ref()))?;
    let post = hook(first(&layers, |l| l.post.as_ref()))?;
    let mut tags: Vec<String> = Vec::new();
    for l in layers.iter().rev() {
        for t in l.tags.iter().flatten() {
            if t.get_ref().is_empty() {
                return Err(src.err(t.span(), "empty tag"));
            }
            if !tags.contains(t.get_ref()) {
                tags.push(t.get_ref().clone());
            }
        }
    }
    Ok(VmPlan {
        name: name.get_ref().clone(),
        group: e.group.as_ref().map(|g| g.get_ref().clone()),
        disks,
        verify,
        on_mismatch,
        retention,
        pre,
        post,
        tags,
    })
}

fn notify(src: &Source<'_>, n: &Spanned<RawNotify>) -> Result<Notify, JobError> {
    let raw = n.get_ref();
    let target = match (&raw.command, &raw.webhook) {
        (Some(c), None) => {
            if c.get_ref().is_empty() || c.get_ref()[0].is_empty() {
                return Err(src.err(c.span(), "command is empty"));
            }
            NotifyTarget::Command(c.get_ref().clone())
        }
        (None, Some(w)) => {
            let url = w.get_ref();
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                return Err(src.err(w.span(), format!("webhook = {url:?}: an http:// or https:// URL")));
            }
            NotifyTarget::Webhook(url.clone())
        }
        _ => return Err(src.err(n.span(), "a [[notify]] needs command = [...] or webhook = \"https://...\" (one)")),
    };
    let timeout = raw.timeout.as_ref().map(|t| src.duration(t, "timeout")).transpose()?;
    Ok(Notify {
        on: raw.on.clone().unwrap_or_else(|| vec![NotifyOn::Failure, NotifyOn::Tainted]),
        target,
        timeout: timeout.unwrap_or(DEFAULT_NOTIFY_TIMEOUT),
    })
}
