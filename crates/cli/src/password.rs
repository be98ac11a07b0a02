//! Where the repository password comes from.

use std::io::IsTerminal;
use std::path::Path;

use anyhow::{bail, Context, Result};

/// The password, from `BLOCKPROOF_PASSWORD`, `--password-file`, or a terminal prompt
/// (asked twice when `confirm`).
pub fn password(file: Option<&Path>, confirm: bool) -> Result<Vec<u8>> {
    secret("BLOCKPROOF_PASSWORD", "--password-file", file, "repository password", confirm)
}

/// A password from a file (`file_flag` names it in messages), the environment variable
/// `var`, or a terminal prompt (`label`).
pub fn secret(var: &str, file_flag: &str, file: Option<&Path>, label: &str, confirm: bool) -> Result<Vec<u8>> {
    if let Some(path) = file {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("cannot read password file {}", path.display()))?;
        let line = text.lines().next().unwrap_or("");
        if line.is_empty() {
            bail!("password file {} is empty", path.display());
        }
        return Ok(line.as_bytes().to_vec());
    }
    if let Ok(p) = std::env::var(var) {
        if p.is_empty() {
            bail!("{var} is set but empty");
        }
        return Ok(p.into_bytes());
    }
    if !std::io::stdin().is_terminal() {
        bail!("no {label}: set {var}, use {file_flag}, or run on a terminal");
    }
    let p = rpassword::prompt_password(format!("{label}: ")).context("cannot read the password")?;
    if p.is_empty() {
        bail!("empty password");
    }
    if confirm && rpassword::prompt_password("repeat password: ").context("cannot read the password")? != p {
        bail!("the passwords do not match");
    }
    Ok(p.into_bytes())
}
