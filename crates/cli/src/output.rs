//! Standard output that survives a closed pipe. `blockproof status --json | head -1`
//! closes the pipe after the first line; Rust's `println!` then panics (exit 101), and a
//! backup that had committed would lose its real exit code. The crate's `println!` and
//! `print!` (macros in main.rs that shadow the standard ones) write through [`write`]
//! instead: once the reader has gone, further output is dropped, and the command ends
//! with the exit code it would have had.
//!
//! Any other failure to write (a full disk behind `> report.json`) is not dropped: the
//! output stops, the command runs to its end (so its locks and temporary files are
//! released as on any path), and then ends with exit code 1 and the error ([`failure`]).

use std::io::{ErrorKind, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

/// Set once a write to standard output failed: nothing more is written.
static CLOSED: AtomicBool = AtomicBool::new(false);

/// The first write error other than a closed pipe.
static FAILURE: Mutex<Option<String>> = Mutex::new(None);

/// Writes formatted text to standard output (a newline after it when `newline`),
/// dropping it if the reader has gone or an earlier write failed.
pub fn write(args: std::fmt::Arguments<'_>, newline: bool) {
    if CLOSED.load(Ordering::Relaxed) {
        return;
    }
    let mut out = std::io::stdout().lock();
    let written = out.write_fmt(args).and_then(|()| if newline { out.write_all(b"\n") } else { Ok(()) });
    if let Err(e) = written {
        CLOSED.store(true, Ordering::Relaxed);
        if e.kind() != ErrorKind::BrokenPipe {
            let mut failure = FAILURE.lock().unwrap_or_else(|p| p.into_inner());
            failure.get_or_insert_with(|| format!("cannot write to standard output: {e}"));
        }
    }
}

/// The write error that cut the output short, other than a closed pipe: the command
/// must not end as if its report had been delivered.
pub fn failure() -> Option<String> {
    FAILURE.lock().unwrap_or_else(|p| p.into_inner()).clone()
}
