//! The audit log: one JSON line per request that changed something or was refused, and
//! per failed authentication — who (the token's name), what, in which repository, when,
//! from where. Opened for appending only; rotated by size (`audit.log` becomes
//! `audit.log.1`, and so on, keeping [`KEEP`] old files). Put the state directory's log
//! on a file system where the server's user cannot rewrite history (`chattr +a`, or
//! shipping lines to a log host) when the host itself is part of the threat.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::Serialize;

use crate::ServerError;

/// Old log files kept after rotation.
pub const KEEP: usize = 9;

/// One line of the log.
#[derive(Debug, Serialize)]
pub struct Event<'a> {
    /// RFC 3339, milliseconds, UTC.
    pub time: String,
    /// The client's address.
    pub from: String,
    /// The token's name (empty when authentication failed).
    pub token: &'a str,
    pub role: &'a str,
    pub repo: &'a str,
    /// `create`, `replace`, `remove`, `restore`, `read`, `list`, `info`, `authenticate`, ...
    pub op: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    pub kind: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    pub name: &'a str,
    pub bytes: u64,
    /// `ok`, `refused` or `failed`.
    pub outcome: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    pub detail: &'a str,
}

struct Open {
    file: File,
    size: u64,
}

/// The log of a server.
pub struct Audit {
    path: PathBuf,
    max_size: u64,
    open: Mutex<Open>,
}

fn open(path: &Path) -> Result<Open, ServerError> {
    use std::os::unix::fs::OpenOptionsExt;
    let file =
        OpenOptions::new().append(true).create(true).mode(0o600).open(path).map_err(|e| ServerError::io(path, e))?;
    let size = file.metadata().map_err(|e| ServerError::io(path, e))?.len();
    Ok(Open { file, size })
}

impl Audit {
    pub fn open(path: &Path, max_size: u64) -> Result<Audit, ServerError> {
        Ok(Audit { path: path.to_path_buf(), max_size, open: Mutex::new(open(path)?) })
    }

    /// Appends one event (and rotates first when the file is full). A failure to log is
    /// returned: the caller refuses to go on unlogged.
    pub fn record(&self, event: &Event<'_>) -> Result<(), ServerError> {
        let mut line = serde_json::to_vec(event).expect("an event serializes");
        line.push(b'\n');
        let mut open = self.open.lock().expect("audit lock");
        if open.size > 0 && open.size + line.len() as u64 > self.max_size {
            for n in (1..KEEP).rev() {
                let _ = std::fs::rename(self.rotated(n), self.rotated(n + 1));
            }
            std::fs::rename(&self.path, self.rotated(1)).map_err(|e| ServerError::io(&self.path, e))?;
            *open = self::open(&self.path)?;
        }
        open.file.write_all(&line).map_err(|e| ServerError::io(&self.path, e))?;
        open.size += line.len() as u64;
        Ok(())
    }

    fn rotated(&self, n: usize) -> PathBuf {
        let mut s = self.path.clone().into_os_string();
        s.push(format!(".{n}"));
        s.into()
    }
}

/// Now, as the log writes it.
pub fn now_text() -> String {
    humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(name: &str) -> Event<'_> {
        Event {
            time: now_text(),
            from: "127.0.0.1:1".into(),
            token: "t",
            role: "backup",
            repo: "main",
            op: "create",
            kind: "pack",
            name,
            bytes: 1,
            outcome: "ok",
            detail: "",
        }
    }

    #[test]
    fn lines_are_appended_and_rotated_by_size() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let audit = Audit::open(&path, 400).unwrap();
        for i in 0..20 {
            audit.record(&event(&format!("n{i:02}"))).unwrap();
        }
        let current = std::fs::read_to_string(&path).unwrap();
        assert!(current.len() <= 400);
        let first: serde_json::Value = serde_json::from_str(current.lines().next().unwrap()).unwrap();
        assert_eq!(first["op"], "create");
        assert!(dir.path().join("audit.log.1").exists());
        let all: String = (1..=KEEP)
            .rev()
            .filter_map(|n| std::fs::read_to_string(dir.path().join(format!("audit.log.{n}"))).ok())
            .chain([current])
            .collect();
        let names: Vec<String> = all
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["name"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(names, (0..20).map(|i| format!("n{i:02}")).collect::<Vec<_>>());
    }
}
