//! Progress on stderr: bars on a terminal; elsewhere (a log, `2>&1 | tee`) a plain line
//! per phase every [`Setting::interval`] with the rate and the time left, so a long
//! backup is visibly alive; nothing with `--progress never` or `-q`.
//!
//! The setting is chosen once per process from the global options (`--progress`, `-q`,
//! `-v`, `--progress-interval`); every command asks [`for_stderr`] for its reporter.
//! Phases count bytes ([`Progress::begin`]) or items ([`Progress::begin_count`]: snapshots,
//! packs), and say which.

use std::io::IsTerminal;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use blockproof_core::Progress;
use indicatif::{ProgressBar, ProgressStyle};

use crate::args::ProgressMode;
use crate::commands::human_bytes;

/// How progress is shown, for the whole process.
#[derive(Clone, Copy, Debug)]
pub struct Setting {
    pub mode: ProgressMode,
    /// Between two lines of a phase, when lines are shown.
    pub interval: Duration,
}

static SETTING: OnceLock<Setting> = OnceLock::new();

/// Chooses the setting (once, from the command line).
pub fn set(setting: Setting) {
    let _ = SETTING.set(setting);
}

/// The progress mode chosen for the process.
pub fn mode() -> ProgressMode {
    setting().mode
}

fn setting() -> Setting {
    *SETTING.get().unwrap_or(&Setting { mode: ProgressMode::Auto, interval: Duration::from_secs(10) })
}

/// An indicatif bar per phase.
pub struct Bar {
    bar: Mutex<Option<ProgressBar>>,
}

impl Bar {
    fn start(&self, what: &str, total: u64, template: &str) {
        let bar = ProgressBar::new(total);
        bar.set_style(ProgressStyle::with_template(template).expect("valid template").progress_chars("=> "));
        bar.set_message(what.to_string());
        *self.bar.lock().expect("bar lock") = Some(bar);
    }
}

impl Progress for Bar {
    fn begin(&self, what: &str, total: u64) {
        self.start(what, total, "{msg:>16} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}");
    }

    fn begin_count(&self, what: &str, total: u64) {
        self.start(what, total, "{msg:>16} [{bar:30}] {pos}/{len} {per_sec} eta {eta}");
    }

    fn advance(&self, amount: u64) {
        if let Some(b) = self.bar.lock().expect("bar lock").as_ref() {
            b.inc(amount);
        }
    }

    fn end(&self) {
        if let Some(b) = self.bar.lock().expect("bar lock").take() {
            b.finish_and_clear();
        }
    }

    fn warn(&self, message: &str) {
        match self.bar.lock().expect("bar lock").as_ref() {
            Some(b) => b.suspend(|| warn(message)),
            None => warn(message),
        }
    }
}

fn warn(message: &str) {
    eprintln!("blockproof: warning: {message}");
}

/// One phase as [`Lines`] follows it.
struct Phase {
    what: String,
    total: u64,
    done: u64,
    bytes: bool,
    started: Instant,
    last_line: Instant,
}

/// Plain lines: one every `interval` while a phase runs (and, with `always`, one when a
/// phase starts and one when it ends).
pub struct Lines {
    phase: Mutex<Option<Phase>>,
    interval: Duration,
    every_phase: bool,
}

impl Lines {
    fn start(&self, what: &str, total: u64, bytes: bool) {
        let now = Instant::now();
        let phase = Phase { what: what.to_string(), total, done: 0, bytes, started: now, last_line: now };
        if self.every_phase {
            eprintln!("blockproof: {}: started, {}", phase.what, amount(phase.total, phase.bytes));
        }
        *self.phase.lock().expect("progress lock") = Some(phase);
    }
}

fn amount(n: u64, bytes: bool) -> String {
    if bytes {
        human_bytes(n)
    } else {
        n.to_string()
    }
}

/// `backup d: 1.2 GiB of 3.0 GiB (40%), 150.0 MiB/s, about 12 s left`.
fn line(p: &Phase) -> String {
    let secs = p.started.elapsed().as_secs_f64().max(1e-3);
    let rate = p.done as f64 / secs;
    let pct = if p.total == 0 { 100.0 } else { p.done as f64 * 100.0 / p.total as f64 };
    let rate_text = if p.bytes { format!("{}/s", human_bytes(rate as u64)) } else { format!("{rate:.1}/s") };
    let left = if rate > 0.0 && p.total > p.done {
        format!(", about {} s left", ((p.total - p.done) as f64 / rate).ceil() as u64)
    } else {
        String::new()
    };
    format!("{}: {} of {} ({pct:.0}%), {rate_text}{left}", p.what, amount(p.done, p.bytes), amount(p.total, p.bytes))
}

impl Progress for Lines {
    fn begin(&self, what: &str, total: u64) {
        self.start(what, total, true);
    }

    fn begin_count(&self, what: &str, total: u64) {
        self.start(what, total, false);
    }

    fn advance(&self, n: u64) {
        let mut guard = self.phase.lock().expect("progress lock");
        if let Some(p) = guard.as_mut() {
            p.done += n;
            if p.last_line.elapsed() >= self.interval {
                p.last_line = Instant::now();
                eprintln!("blockproof: {}", line(p));
            }
        }
    }

    fn end(&self) {
        if let Some(p) = self.phase.lock().expect("progress lock").take() {
            if self.every_phase {
                eprintln!("blockproof: {}: done in {:.1} s", line(&p), p.started.elapsed().as_secs_f64());
            }
        }
    }

    fn warn(&self, message: &str) {
        warn(message);
    }
}

/// No progress, but warnings still shown.
pub struct Plain;

impl Progress for Plain {
    fn begin(&self, _: &str, _: u64) {}
    fn advance(&self, _: u64) {}
    fn end(&self) {}
    fn warn(&self, message: &str) {
        warn(message);
    }
}

/// The progress reporter for this process's setting and where stderr goes.
pub fn for_stderr() -> Box<dyn Progress> {
    let s = setting();
    let lines = |every_phase| Box::new(Lines { phase: Mutex::new(None), interval: s.interval, every_phase });
    match s.mode {
        ProgressMode::Never => Box::new(Plain),
        _ if std::io::stderr().is_terminal() => Box::new(Bar { bar: Mutex::new(None) }),
        ProgressMode::Auto => lines(false),
        ProgressMode::Always => lines(true),
    }
}
