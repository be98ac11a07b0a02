//! Small per-file records of the server, by repository: who took which lock (a backup or
//! restore token may replace and remove only the locks it wrote itself), and which vm a
//! snapshot was declared for when it was written (a token limited to some vms may remove
//! only their snapshots). Kept in `STATE/<what>/<repository>/<file name>`, written before
//! the file itself, so they survive a server restart.

use std::path::{Path, PathBuf};

use crate::ServerError;

pub struct Records {
    dir: PathBuf,
}

impl Records {
    /// `what`: `owners` (lock owners) or `vms` (the vm of each snapshot).
    pub fn new(state_dir: &Path, what: &str, repo: &str) -> Records {
        Records { dir: state_dir.join(what).join(repo) }
    }

    /// The record of file `name`, if any.
    pub fn of(&self, name: &str) -> Option<String> {
        std::fs::read_to_string(self.dir.join(name)).ok()
    }

    pub fn set(&self, name: &str, value: &str) -> Result<(), ServerError> {
        crate::files::write_atomic(&self.dir.join(name), value.as_bytes(), 0o600)
    }

    pub fn clear(&self, name: &str) {
        let _ = std::fs::remove_file(self.dir.join(name));
    }
}
