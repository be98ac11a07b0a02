//! The `blockproof` command: a thin layer over blockproof-core.

// Standard output survives a closed pipe (output.rs): these shadow the standard macros in
// every module of the crate (they are defined before the modules).
macro_rules! println {
    () => {
        $crate::output::write(format_args!(""), true)
    };
    ($($arg:tt)*) => {
        $crate::output::write(format_args!($($arg)*), true)
    };
}

macro_rules! print {
    ($($arg:tt)*) => {
        $crate::output::write(format_args!($($arg)*), false)
    };
}

mod args;
mod audit;
mod boot_test;
mod changed_files;
mod commands;
mod demo;
mod disk_spec;
mod files;
mod jobs;
mod lifecycle;
mod live;
mod location;
mod machine;
mod mount;
mod output;
mod password;
mod progress;
mod recover;
mod reference;
mod repo_server;
mod restore_test;
mod serve;
mod timestamp;

use std::process::ExitCode;

use clap::Parser;

/// An error in how blockproof was called (exit code 2).
#[derive(Debug)]
pub struct Usage(pub String);

impl std::fmt::Display for Usage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Usage {}

/// Exit codes (documented in the README and `--help`).
pub mod exit {
    pub const OK: u8 = 0;
    pub const ERROR: u8 = 1;
    pub const USAGE: u8 = 2;
    pub const TAINTED: u8 = 3;
}

fn main() -> ExitCode {
    let cli = match args::Cli::try_parse() {
        Ok(cli) => cli,
        Err(err) if !err.use_stderr() => err.exit(), // --help, --version
        Err(err) => {
            // clap's message up to its usage block, on one line.
            let rendered = err.to_string();
            let lines: Vec<&str> = rendered.lines().take_while(|l| !l.trim().is_empty()).map(str::trim).collect();
            eprintln!("blockproof: error: {}", lines.join(" ").trim_start_matches("error: "));
            return ExitCode::from(exit::USAGE);
        }
    };
    progress::set(cli.progress_setting());
    timestamp::set_local(cli.local_time);
    let result = commands::run(cli);
    location::report_requests();
    match result {
        Ok(code) => match output::failure() {
            // The report was not delivered: not a success. (A tainted backup keeps its 3.)
            Some(msg) => {
                eprintln!("blockproof: error: {msg}");
                ExitCode::from(if code == exit::OK { exit::ERROR } else { code })
            }
            None => ExitCode::from(code),
        },
        Err(err) => {
            let usage = err.downcast_ref::<Usage>().is_some()
                || err.downcast_ref::<blockproof_core::CoreError>().is_some_and(|e| e.is_usage())
                || err.downcast_ref::<blockproof_repo::RepoError>().is_some_and(|e| e.is_usage());
            let msg = one_line(&err);
            eprintln!("blockproof: error: {msg}");
            ExitCode::from(if usage { exit::USAGE } else { exit::ERROR })
        }
    }
}

/// The error and its causes on one line, each cause once: library errors often embed their
/// source in their own message, so a cause already contained in the text is not repeated.
fn one_line(err: &anyhow::Error) -> String {
    let mut msg = err.to_string();
    for cause in err.chain().skip(1) {
        let text = cause.to_string();
        if !msg.contains(&text) {
            msg.push_str(": ");
            msg.push_str(&text);
        }
    }
    msg.replace('\n', " ")
}
