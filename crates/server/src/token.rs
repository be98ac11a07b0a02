//! Tokens: who may talk to the server, with which role, in which repositories.
//!
//! The token file (`STATE/tokens.json`) holds, per token, its name, role, repository
//! pattern, creation time and revocation time, and the keyed BLAKE3 hash of its secret —
//! never the secret, which is shown once when the token is created. A token as clients
//! send it is `bpt_<name>.<64 hex digits>`; the name finds the entry and the hash is
//! compared in constant time. The file is replaced atomically on every change, and the
//! server reloads it when it changes, so a revoked token fails on its next request.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::policy::Role;
use crate::ServerError;

/// The file name under the state directory.
pub const TOKENS_FILE: &str = "tokens.json";
const HASH_CONTEXT: &str = "blockproof server token 2026-12 v1";
const PREFIX: &str = "bpt_";

/// One token as stored.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TokenEntry {
    pub name: String,
    pub role: Role,
    /// The repositories it may use: a name, or a pattern with `*` and `?`.
    pub repos: String,
    /// The vms whose snapshots it may write and remove: a name or a pattern (`*`: all,
    /// and then it may also remove packs and index files, as gc does).
    #[serde(default = "every")]
    pub vms: String,
    /// BLAKE3 (keyed by derivation from a fixed context) of the secret, hex.
    pub hash: String,
    /// Seconds since the Unix epoch.
    pub created: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked: Option<u64>,
}

fn every() -> String {
    "*".into()
}

impl TokenEntry {
    pub fn may_use(&self, repo: &str) -> bool {
        glob(&self.repos, repo)
    }

    /// Limited to some vms (not `*`).
    pub fn vm_scoped(&self) -> bool {
        self.vms != "*"
    }

    pub fn may_touch_vm(&self, vm: &str) -> bool {
        glob(&self.vms, vm)
    }
}

/// A pattern of names: `[A-Za-z0-9_-.@+*?]`, 1-128 characters.
fn valid_pattern(p: &str) -> bool {
    (1..=128).contains(&p.len()) && p.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.@+*?".contains(&b))
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenFile {
    version: u32,
    tokens: Vec<TokenEntry>,
}

/// The token file of a state directory.
pub struct TokenStore {
    path: PathBuf,
}

fn hash(secret: &str) -> String {
    blake3::Hasher::new_derive_key(HASH_CONTEXT).update(secret.as_bytes()).finalize().to_hex().to_string()
}

/// A token name: 1–64 characters of `[A-Za-z0-9_-]`.
pub fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len()) && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

fn now() -> u64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

impl TokenStore {
    pub fn new(state_dir: &Path) -> TokenStore {
        TokenStore { path: state_dir.join(TOKENS_FILE) }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Every token, revoked ones too. A missing file holds none.
    pub fn load(&self) -> Result<Vec<TokenEntry>, ServerError> {
        match std::fs::read(&self.path) {
            Ok(bytes) => {
                let file: TokenFile = serde_json::from_slice(&bytes)
                    .map_err(|e| ServerError::Config(format!("{}: {e}", self.path.display())))?;
                if file.version != 1 {
                    return Err(ServerError::Config(format!(
                        "{}: version {} (this build reads 1)",
                        self.path.display(),
                        file.version
                    )));
                }
                Ok(file.tokens)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(e) => Err(ServerError::io(&self.path, e)),
        }
    }

    /// Holds an exclusive `flock` on `tokens.lock` beside the file while `change`
    /// reads, changes and saves it, so two `token` commands at once cannot lose one
    /// another's change.
    fn change<T>(&self, change: impl FnOnce(&Self) -> Result<T, ServerError>) -> Result<T, ServerError> {
        use std::os::unix::io::AsRawFd;
        let path = self.path.with_file_name("tokens.lock");
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| ServerError::io(dir, e))?;
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| ServerError::io(&path, e))?;
        // SAFETY: flock on a file descriptor this function owns; it is released when the
        // file is closed.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(ServerError::io(&path, std::io::Error::last_os_error()));
        }
        change(self)
    }

    fn save(&self, tokens: Vec<TokenEntry>) -> Result<(), ServerError> {
        let bytes = serde_json::to_vec_pretty(&TokenFile { version: 1, tokens }).expect("tokens serialize");
        crate::files::write_atomic(&self.path, &bytes, 0o600)
    }

    /// Creates a token and returns its secret (the only time it is shown).
    pub fn create(&self, name: &str, role: Role, repos: &str, vms: &str) -> Result<String, ServerError> {
        if !valid_name(name) {
            return Err(ServerError::Config(format!("invalid token name {name:?}: 1-64 of [A-Za-z0-9_-]")));
        }
        if repos.is_empty() || !repos.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_*?".contains(&b)) {
            return Err(ServerError::Config(format!("invalid repository pattern {repos:?}")));
        }
        if !valid_pattern(vms) {
            return Err(ServerError::Config(format!("invalid vm pattern {vms:?}")));
        }
        self.change(|store| {
            let mut tokens = store.load()?;
            if tokens.iter().any(|t| t.name == name) {
                return Err(ServerError::Config(format!(
                    "a token named {name} exists (revoked tokens keep their name)"
                )));
            }
            let mut raw = [0u8; 32];
            rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut raw);
            let secret = format!("{PREFIX}{name}.{}", hex::encode(raw));
            tokens.push(TokenEntry {
                name: name.into(),
                role,
                repos: repos.into(),
                vms: vms.into(),
                hash: hash(&secret),
                created: now(),
                revoked: None,
            });
            store.save(tokens)?;
            Ok(secret)
        })
    }

    /// Revokes a token; it fails on its next request.
    pub fn revoke(&self, name: &str) -> Result<(), ServerError> {
        self.change(|store| {
            let mut tokens = store.load()?;
            let Some(t) = tokens.iter_mut().find(|t| t.name == name) else {
                return Err(ServerError::Config(format!("no token named {name}")));
            };
            if t.revoked.is_none() {
                t.revoked = Some(now());
            }
            store.save(tokens)
        })
    }
}

/// The entry a presented secret belongs to, if it is valid and not revoked.
pub fn authenticate<'t>(tokens: &'t [TokenEntry], secret: &str) -> Option<&'t TokenEntry> {
    let name = secret.strip_prefix(PREFIX)?.rsplit_once('.')?.0;
    let entry = tokens.iter().find(|t| t.name == name)?;
    let presented = blake3::Hasher::new_derive_key(HASH_CONTEXT).update(secret.as_bytes()).finalize();
    let stored = blake3::Hash::from_hex(&entry.hash).ok()?;
    // blake3::Hash compares in constant time.
    (presented == stored && entry.revoked.is_none()).then_some(entry)
}

/// `*` any run of characters, `?` one character; everything else literal.
pub fn glob(pattern: &str, text: &str) -> bool {
    let (p, t): (Vec<char>, Vec<char>) = (pattern.chars().collect(), text.chars().collect());
    let (mut pi, mut ti, mut star, mut mark) = (0, 0, None, 0);
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = ti;
            pi += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ti = mark;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_authenticates_until_it_is_revoked_and_the_file_holds_no_secret() {
        let dir = tempfile::tempdir().unwrap();
        let store = TokenStore::new(dir.path());
        let secret = store.create("host-1", Role::Backup, "prod-*", "web*").unwrap();
        assert!(store.create("host-1", Role::Admin, "*", "*").is_err());
        assert!(store.create("bad name", Role::Admin, "*", "*").is_err());
        let text = std::fs::read_to_string(store.path()).unwrap();
        assert!(!text.contains(&secret[secret.len() - 64..]));
        let tokens = store.load().unwrap();
        let t = authenticate(&tokens, &secret).unwrap();
        assert_eq!((t.name.as_str(), t.role), ("host-1", Role::Backup));
        assert!(t.may_use("prod-eu") && !t.may_use("test"));
        assert!(t.vm_scoped() && t.may_touch_vm("web01") && !t.may_touch_vm("db01"));
        assert!(store.create("x", Role::Admin, "*", "a/b").is_err());
        let mut wrong = secret.clone();
        wrong.pop();
        wrong.push(if secret.ends_with('0') { '1' } else { '0' });
        assert!(authenticate(&tokens, &wrong).is_none());
        assert!(authenticate(&tokens, "bpt_host-1").is_none());
        store.revoke("host-1").unwrap();
        assert!(authenticate(&store.load().unwrap(), &secret).is_none());
    }

    /// The stored form (docs/FORMAT.md §21): a version-1 file written by hand
    /// authenticates its token, so the hash's context and encoding cannot drift.
    #[test]
    fn the_version_1_token_file_is_pinned() {
        let dir = tempfile::tempdir().unwrap();
        let secret = format!("bpt_host-1.{}", "ab".repeat(32));
        let text = r#"{"version": 1, "tokens": [{"name": "host-1", "role": "backup", "repos": "prod-*",
            "hash": "HASH", "created": 1796000000}]}"#;
        std::fs::write(dir.path().join(TOKENS_FILE), text.replace("HASH", PINNED)).unwrap();
        let tokens = TokenStore::new(dir.path()).load().unwrap();
        assert_eq!(hash(&secret), PINNED);
        assert_eq!(authenticate(&tokens, &secret).unwrap().role, Role::Backup);
        std::fs::write(dir.path().join(TOKENS_FILE), text.replace("\"version\": 1", "\"version\": 2")).unwrap();
        assert!(TokenStore::new(dir.path()).load().is_err());
        std::fs::write(dir.path().join(TOKENS_FILE), text.replace("\"created\"", "\"extra\": 1, \"created\"")).unwrap();
        assert!(TokenStore::new(dir.path()).load().is_err());
    }

    const PINNED: &str = "cf1beec15830461d740762baf17209ac442a7d4907b86425a43403ddd15ce31f";

    /// Two token commands at once: neither loses the other's token.
    #[test]
    fn tokens_created_at_once_are_all_kept() {
        let dir = tempfile::tempdir().unwrap();
        std::thread::scope(|s| {
            for t in 0..4 {
                let path = dir.path();
                s.spawn(move || {
                    for i in 0..10 {
                        TokenStore::new(path).create(&format!("t{t}-{i}"), Role::Backup, "*", "*").unwrap();
                    }
                });
            }
        });
        assert_eq!(TokenStore::new(dir.path()).load().unwrap().len(), 40);
    }

    #[test]
    fn globs() {
        assert!(glob("*", "") && glob("*", "abc") && glob("a*c", "abbbc") && glob("a?c", "abc"));
        assert!(!glob("a?c", "ac") && !glob("prod", "prod2") && glob("*-eu", "prod-eu") && !glob("*-eu", "prod-us"));
    }
}
