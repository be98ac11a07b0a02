//! Who took which lock: a backup or restore token may replace and remove only the locks
//! it wrote itself. Recorded per repository in `STATE/owners/<repository>/<lock name>`
//! (the token's name), written before the lock is, so it survives a server restart.

use std::path::{Path, PathBuf};

use crate::ServerError;

pub struct Owners {
    dir: PathBuf,
}

impl Owners {
    pub fn new(state_dir: &Path, repo: &str) -> Owners {
        Owners { dir: state_dir.join("owners").join(repo) }
    }

    /// The token that wrote lock `name` through this server, if any.
    pub fn of(&self, name: &str) -> Option<String> {
        std::fs::read_to_string(self.dir.join(name)).ok()
    }

    pub fn set(&self, name: &str, token: &str) -> Result<(), ServerError> {
        crate::files::write_atomic(&self.dir.join(name), token.as_bytes(), 0o600)
    }

    pub fn clear(&self, name: &str) {
        let _ = std::fs::remove_file(self.dir.join(name));
    }
}
