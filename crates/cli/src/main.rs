//! The `blockproof` command: a thin layer over blockproof-core.

mod args;
mod commands;
mod demo;
mod disk_spec;
mod password;
mod progress;

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
    let cli = args::Cli::parse();
    match commands::run(cli) {
        Ok(code) => ExitCode::from(code),
        Err(err) => {
            let usage = err.downcast_ref::<Usage>().is_some()
                || err.downcast_ref::<blockproof_core::CoreError>().is_some_and(|e| e.is_usage());
            let msg = format!("{err:#}").replace('\n', " ");
            eprintln!("blockproof: error: {msg}");
            ExitCode::from(if usage { exit::USAGE } else { exit::ERROR })
        }
    }
}
