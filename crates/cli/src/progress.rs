//! Progress bars on stderr when it is a terminal; nothing otherwise.

use std::io::IsTerminal;
use std::sync::Mutex;

use blockproof_core::Progress;
use indicatif::{ProgressBar, ProgressStyle};

/// An indicatif bar per phase.
pub struct Bar {
    bar: Mutex<Option<ProgressBar>>,
}

impl Progress for Bar {
    fn begin(&self, what: &str, total: u64) {
        let bar = ProgressBar::new(total);
        bar.set_style(
            ProgressStyle::with_template("{msg:>16} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}")
                .expect("valid template")
                .progress_chars("=> "),
        );
        bar.set_message(what.to_string());
        *self.bar.lock().expect("bar lock") = Some(bar);
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

/// No bars (stderr is not a terminal), but warnings still shown.
pub struct Plain;

impl Progress for Plain {
    fn begin(&self, _: &str, _: u64) {}
    fn advance(&self, _: u64) {}
    fn end(&self) {}
    fn warn(&self, message: &str) {
        warn(message);
    }
}

/// A progress reporter fit for where stderr goes.
pub fn for_stderr() -> Box<dyn Progress> {
    if std::io::stderr().is_terminal() {
        Box::new(Bar { bar: Mutex::new(None) })
    } else {
        Box::new(Plain)
    }
}
