//! Where the repository password comes from.

use std::io::{IsTerminal, Read};
use std::path::Path;

use anyhow::{bail, Context, Result};

/// Longest password a password file may hold: only the first line is read, and no more
/// than this many bytes of it (`/dev/zero` or a huge file is an error, not a read until
/// memory runs out).
pub const MAX_PASSWORD_FILE_LINE: usize = 4096;

/// The password, from `BLOCKPROOF_PASSWORD`, `--password-file`, or a terminal prompt
/// (asked twice when `confirm`).
pub fn password(file: Option<&Path>, confirm: bool) -> Result<Vec<u8>> {
    secret("BLOCKPROOF_PASSWORD", "--password-file", file, "repository password", confirm)
}

/// A password from a file (`file_flag` names it in messages), the environment variable
/// `var`, or a terminal prompt (`label`).
pub fn secret(var: &str, file_flag: &str, file: Option<&Path>, label: &str, confirm: bool) -> Result<Vec<u8>> {
    if let Some(path) = file {
        return first_line(path);
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

/// The first line of a password file (without its `\n` or `\r\n`), reading at most
/// [`MAX_PASSWORD_FILE_LINE`] + 1 bytes.
fn first_line(path: &Path) -> Result<Vec<u8>> {
    let cannot = || format!("cannot read password file {}", path.display());
    let file = std::fs::File::open(path).with_context(cannot)?;
    let mut head = Vec::with_capacity(MAX_PASSWORD_FILE_LINE + 1);
    file.take(MAX_PASSWORD_FILE_LINE as u64 + 1).read_to_end(&mut head).with_context(cannot)?;
    let line = match head.iter().position(|&b| b == b'\n') {
        Some(end) => &head[..end],
        None if head.len() > MAX_PASSWORD_FILE_LINE => bail!(
            "password file {}: its first line is longer than {MAX_PASSWORD_FILE_LINE} bytes (a password file \
             holds the password on its first line)",
            path.display()
        ),
        None => &head[..],
    };
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    if line.is_empty() {
        bail!("password file {} is empty", path.display());
    }
    if std::str::from_utf8(line).is_err() {
        bail!("password file {}: the password is not valid UTF-8", path.display());
    }
    Ok(line.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn password_files_are_read_to_the_first_line_and_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let file = |name: &str, bytes: &[u8]| {
            let p = dir.path().join(name);
            std::fs::write(&p, bytes).unwrap();
            p
        };
        assert_eq!(first_line(&file("a", b"secret\nrest")).unwrap(), b"secret");
        assert_eq!(first_line(&file("b", b"secret\r\n")).unwrap(), b"secret");
        assert_eq!(first_line(&file("c", b"no newline")).unwrap(), b"no newline");
        let longest = vec![b'x'; MAX_PASSWORD_FILE_LINE];
        assert_eq!(first_line(&file("d", &longest)).unwrap(), longest);
        let mut long = longest.clone();
        long.push(b'x');
        let err = first_line(&file("e", &long)).unwrap_err().to_string();
        assert!(err.contains("longer than 4096 bytes"), "{err}");
        assert!(first_line(&file("f", b"\nsecond")).unwrap_err().to_string().contains("is empty"));
        assert!(first_line(&file("g", b"\xff\xfe\n")).unwrap_err().to_string().contains("not valid UTF-8"));
        let err = first_line(Path::new("/dev/zero")).unwrap_err().to_string();
        assert!(err.contains("longer than 4096 bytes"), "{err}");
    }
}
