//! Standard output that survives a closed pipe. `blockproof status --json | head -1`
//! closes the pipe after the first line; Rust's `println!` then panics (exit 101), and a
//! backup that had committed would lose its real exit code. The crate's `println!` and
//! `print!` (macros in main.rs that shadow the standard ones) write through [`line`]
//! instead: once the reader has gone, further output is dropped, and the command ends
//! with the exit code it would have had.

use std::io::{ErrorKind, Write};
use std::sync::atomic::{AtomicBool, Ordering};

/// Set once a write to standard output failed because the reader has gone.
static CLOSED: AtomicBool = AtomicBool::new(false);

/// Writes formatted text to standard output (a newline after it when `newline`),
/// dropping it if the reader has gone. Other write errors are not silently dropped: they
/// end the process with exit code 1 and one line on stderr, as any error.
pub fn write(args: std::fmt::Arguments<'_>, newline: bool) {
    if CLOSED.load(Ordering::Relaxed) {
        return;
    }
    let mut out = std::io::stdout().lock();
    let written = out.write_fmt(args).and_then(|()| if newline { out.write_all(b"\n") } else { Ok(()) });
    match written {
        Ok(()) => {}
        Err(e) if e.kind() == ErrorKind::BrokenPipe => CLOSED.store(true, Ordering::Relaxed),
        Err(e) => {
            eprintln!("blockproof: error: cannot write to standard output: {e}");
            std::process::exit(i32::from(crate::exit::ERROR));
        }
    }
}
