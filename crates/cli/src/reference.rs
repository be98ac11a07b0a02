//! The reference generated from the command-line definitions themselves: shell
//! completions (clap_complete) and manual pages (clap_mangen), so they cannot drift from
//! the options the binary takes.

use std::fs;

use anyhow::{Context, Result};
use clap::CommandFactory;

use crate::args::{Cli, CompletionsArgs, ManArgs};
use crate::exit;

/// `blockproof completions SHELL`: the script on standard output.
pub fn completions(a: CompletionsArgs) -> Result<u8> {
    let mut cmd = Cli::command();
    let mut script = Vec::new();
    clap_complete::generate(a.shell, &mut cmd, "blockproof", &mut script);
    print!("{}", String::from_utf8_lossy(&script));
    Ok(exit::OK)
}

/// `blockproof man --to DIR`: `blockproof.1` and `blockproof-COMMAND.1` for each command
/// (`blockproof-key-add.1` for nested ones).
pub fn man(a: ManArgs) -> Result<u8> {
    fs::create_dir_all(&a.to).with_context(|| format!("cannot create {}", a.to.display()))?;
    let cmd = Cli::command();
    let mut written = 0;
    let mut pages = vec![("blockproof".to_string(), cmd.clone())];
    while let Some((name, c)) = pages.pop() {
        let mut page = Vec::new();
        let shown = c.clone().bin_name(name.replace('-', " "));
        clap_mangen::Man::new(shown).title(name.clone()).render(&mut page).context("rendering a manual page")?;
        let path = a.to.join(format!("{name}.1"));
        fs::write(&path, page).with_context(|| format!("cannot write {}", path.display()))?;
        written += 1;
        for sub in c.get_subcommands().filter(|s| s.get_name() != "help") {
            pages.push((format!("{name}-{}", sub.get_name()), sub.clone()));
        }
    }
    println!("wrote {written} manual pages to {}", a.to.display());
    Ok(exit::OK)
}
