//! The wire protocol: which request means which operation on which repository file.
//!
//! Every path starts with `/v1/<repository>`; a repository name and an object name are
//! `[A-Za-z0-9_-]` (an object name at least two characters, as the store requires), so
//! no path can leave the repository or name a temporary file.
//!
//! | request | operation |
//! |---|---|
//! | `GET /v1/R/` | who am I: the token's name, role and repository (JSON) |
//! | `GET /v1/R/o/KIND/` | list a kind: one `name size` line per file |
//! | `GET /v1/R/o/KIND/NAME` | read a file; `Range: bytes=A-B` reads a part |
//! | `HEAD /v1/R/o/KIND/NAME` | size (`Content-Length`) and receipt time ([`MODIFIED`]) |
//! | `PUT /v1/R/o/KIND/NAME` | write a file (the whole body, atomically) |
//! | `DELETE /v1/R/o/KIND/NAME` | remove a file (into the server's trash) |
//! | `GET /v1/R/trash` | the trash of the repository (JSON) |
//! | `POST /v1/R/trash/ID` | put a trashed file back |
//!
//! The parser is a pure function of the method, path and range header
//! ([`Route::parse`]), fuzzed by the crate's property test: whatever it is given it
//! returns a route or a refusal, never panics, and never yields a name the store would
//! refuse.

use blockproof_store::{relative_path, Kind};

/// Header of `HEAD` answers: when the server received the file, in nanoseconds since the
/// Unix epoch (the time retention judges a snapshot by through a server).
pub const MODIFIED: &str = "blockproof-modified";

/// The largest part of a file one ranged GET reads (the server holds it in memory; a
/// restore reads pack regions of a few MiB).
pub const MAX_RANGE: u64 = 256 << 20;

/// Request header: the vm the client's operation is for (checked against a token
/// limited to some vms, and recorded for the snapshots it writes).
pub const VM: &str = "blockproof-vm";

/// A vm name as blockproof accepts it: 1–128 of `A–Z a–z 0–9 - _ . @ +`, not starting
/// with `.`.
pub fn valid_vm_name(vm: &str) -> bool {
    (1..=128).contains(&vm.len())
        && !vm.starts_with('.')
        && vm.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.@+".contains(&b))
}

/// The kinds, by their names on the wire ([`Kind::name`]).
pub const KINDS: [Kind; 7] =
    [Kind::Config, Kind::Key, Kind::Pack, Kind::Index, Kind::Snapshot, Kind::Lock, Kind::State];

/// The kind named `name` on the wire.
pub fn kind_named(name: &str) -> Option<Kind> {
    KINDS.iter().copied().find(|k| k.name() == name)
}

/// What a request asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Route {
    Info { repo: String },
    List { repo: String, kind: Kind },
    Read { repo: String, kind: Kind, name: String, range: Option<(u64, u64)> },
    Stat { repo: String, kind: Kind, name: String },
    Write { repo: String, kind: Kind, name: String },
    Remove { repo: String, kind: Kind, name: String },
    TrashList { repo: String },
    TrashRestore { repo: String, id: String },
}

/// Why a request was not understood: the answer is `400` (or `405`) with this text.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    #[error("no such path")]
    NotFound,
    #[error("method {0} not allowed here")]
    Method(String),
    #[error("{0}")]
    Bad(String),
}

/// A repository name as a server serves it: 1–64 characters of `[A-Za-z0-9_-]`.
pub fn valid_repo_name(name: &str) -> bool {
    (1..=64).contains(&name.len()) && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

impl Route {
    /// The repository the route concerns.
    pub fn repo(&self) -> &str {
        match self {
            Route::Info { repo }
            | Route::List { repo, .. }
            | Route::Read { repo, .. }
            | Route::Stat { repo, .. }
            | Route::Write { repo, .. }
            | Route::Remove { repo, .. }
            | Route::TrashList { repo }
            | Route::TrashRestore { repo, .. } => repo,
        }
    }

    /// Parses a request line: `method`, the path (without query) and the `Range` header.
    pub fn parse(method: &str, path: &str, range: Option<&str>) -> Result<Route, RouteError> {
        let rest = path.strip_prefix("/v1/").ok_or(RouteError::NotFound)?;
        let (repo, rest) = match rest.split_once('/') {
            Some((r, rest)) => (r, Some(rest)),
            None => (rest, None),
        };
        if !valid_repo_name(repo) {
            return Err(RouteError::NotFound);
        }
        let repo = repo.to_string();
        let parts: Vec<&str> = match rest {
            None | Some("") => Vec::new(),
            Some(r) => r.split('/').collect(),
        };
        let method_err = || RouteError::Method(method.chars().take(16).collect());
        match parts.as_slice() {
            [] => match method {
                "GET" => Ok(Route::Info { repo }),
                _ => Err(method_err()),
            },
            ["trash"] => match method {
                "GET" => Ok(Route::TrashList { repo }),
                _ => Err(method_err()),
            },
            ["trash", id] => {
                if !crate::trash::valid_id(id) {
                    return Err(RouteError::NotFound);
                }
                match method {
                    "POST" => Ok(Route::TrashRestore { repo, id: id.to_string() }),
                    _ => Err(method_err()),
                }
            }
            ["o", kind, ""] => {
                let kind = kind_named(kind).ok_or(RouteError::NotFound)?;
                match method {
                    "GET" => Ok(Route::List { repo, kind }),
                    _ => Err(method_err()),
                }
            }
            ["o", kind, name] => {
                let kind = kind_named(kind).ok_or(RouteError::NotFound)?;
                if kind == Kind::Config && *name != "config" {
                    return Err(RouteError::NotFound);
                }
                relative_path(kind, name).map_err(|_| RouteError::NotFound)?;
                let name = name.to_string();
                match method {
                    "GET" => Ok(Route::Read { repo, kind, name, range: range.map(parse_range).transpose()? }),
                    "HEAD" => Ok(Route::Stat { repo, kind, name }),
                    "PUT" => Ok(Route::Write { repo, kind, name }),
                    "DELETE" => Ok(Route::Remove { repo, kind, name }),
                    _ => Err(method_err()),
                }
            }
            _ => Err(RouteError::NotFound),
        }
    }
}

/// `bytes=A-B` (inclusive, as HTTP has it) as `(offset, length)`.
fn parse_range(value: &str) -> Result<(u64, u64), RouteError> {
    let bad = || RouteError::Bad("a Range header must be bytes=FIRST-LAST".into());
    let (a, b) = value.strip_prefix("bytes=").and_then(|r| r.split_once('-')).ok_or_else(bad)?;
    let first: u64 = a.parse().map_err(|_| bad())?;
    let last: u64 = b.parse().map_err(|_| bad())?;
    if last < first {
        return Err(bad());
    }
    if last - first >= MAX_RANGE {
        return Err(RouteError::Bad(format!("a range may be at most {MAX_RANGE} bytes")));
    }
    Ok((first, last - first + 1))
}

/// The path of an object (the client's side of [`Route::parse`]).
pub fn object_path(repo: &str, kind: Kind, name: &str) -> String {
    format!("/v1/{repo}/o/{}/{name}", kind.name())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    #[test]
    fn the_table_of_the_module_doc() {
        let r = |m, p| Route::parse(m, p, None);
        assert_eq!(r("GET", "/v1/main/").unwrap(), Route::Info { repo: "main".into() });
        assert_eq!(r("GET", "/v1/main").unwrap(), Route::Info { repo: "main".into() });
        assert_eq!(r("GET", "/v1/main/o/pack/").unwrap(), Route::List { repo: "main".into(), kind: Kind::Pack });
        assert_eq!(
            Route::parse("GET", "/v1/main/o/pack/abcd", Some("bytes=10-19")).unwrap(),
            Route::Read { repo: "main".into(), kind: Kind::Pack, name: "abcd".into(), range: Some((10, 10)) }
        );
        assert!(matches!(r("HEAD", "/v1/main/o/snapshot/ab").unwrap(), Route::Stat { .. }));
        assert!(matches!(r("PUT", "/v1/main/o/config/config").unwrap(), Route::Write { kind: Kind::Config, .. }));
        assert!(matches!(r("DELETE", "/v1/main/o/lock/ab").unwrap(), Route::Remove { kind: Kind::Lock, .. }));
        assert_eq!(r("GET", "/v1/main/trash").unwrap(), Route::TrashList { repo: "main".into() });
        assert!(matches!(r("POST", "/v1/main/trash/1700000000-3-pack-abcd").unwrap(), Route::TrashRestore { .. }));
    }

    #[test]
    fn names_that_could_leave_the_repository_are_not_routes() {
        for p in [
            "/v1/../o/pack/ab",
            "/v1/main/o/pack/..",
            "/v1/main/o/pack/a",
            "/v1/main/o/pack/a%2Fb",
            "/v1/main/o/pack/ab/cd",
            "/v1/main/o/tmp/ab",
            "/v1/main/o/config/other",
            "/v2/main/",
            "/v1//",
            "/v1/main/trash/../../x",
        ] {
            assert!(Route::parse("GET", p, None).is_err(), "{p}");
            assert!(Route::parse("PUT", p, None).is_err(), "{p}");
        }
        assert!(matches!(Route::parse("PATCH", "/v1/main/o/pack/ab", None), Err(RouteError::Method(_))));
        assert!(Route::parse("GET", "/v1/main/o/pack/ab", Some("bytes=9-1")).is_err());
        assert!(Route::parse("GET", "/v1/main/o/pack/ab", Some("bytes=-1")).is_err());
        assert!(Route::parse("GET", "/v1/main/o/pack/ab", Some("bytes=0-4294967295")).is_err());
        assert!(Route::parse("GET", "/v1/main/o/pack/ab", Some("bytes=0-268435455")).is_ok());
    }

    /// The property test of the router: random methods, paths built from the protocol's
    /// own pieces and from hostile ones, random range headers. Never a panic; every
    /// accepted object name is one the store accepts; only the listed methods route.
    #[test]
    fn random_requests_route_safely() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed);
        let methods = ["GET", "HEAD", "PUT", "DELETE", "POST", "PATCH", "get", "", "OPTIONS"];
        let pieces = [
            "v1", "o", "trash", "pack", "lock", "config", "state", "ab", "..", ".", "", "%2e", "main", "x y", "é",
            "a\0b",
        ];
        for _ in 0..200_000 {
            let n = rng.gen_range(0..7);
            let mut path = String::new();
            for _ in 0..n {
                path.push('/');
                if rng.gen_bool(0.2) {
                    let len = rng.gen_range(0..12);
                    path.extend((0..len).map(|_| rng.gen_range(0x20u8..0x7f) as char));
                } else {
                    path.push_str(pieces[rng.gen_range(0..pieces.len())]);
                }
            }
            let method = methods[rng.gen_range(0..methods.len())];
            let range = match rng.gen_range(0..4) {
                0 => None,
                1 => Some(format!("bytes={}-{}", rng.gen::<u32>(), rng.gen::<u32>())),
                2 => Some(format!("bytes={}-{}", rng.gen::<u64>(), rng.gen::<u64>())),
                _ => Some((0..rng.gen_range(0..10)).map(|_| rng.gen_range(0x20u8..0x7f) as char).collect()),
            };
            match Route::parse(method, &path, range.as_deref()) {
                Ok(route) => {
                    assert!(valid_repo_name(route.repo()), "{path}");
                    match &route {
                        Route::Read { kind, name, range, .. } => {
                            assert_eq!(method, "GET");
                            relative_path(*kind, name).unwrap();
                            if let Some((_, len)) = range {
                                assert!((1..=MAX_RANGE).contains(len));
                            }
                        }
                        Route::Stat { kind, name, .. }
                        | Route::Write { kind, name, .. }
                        | Route::Remove { kind, name, .. } => {
                            relative_path(*kind, name).unwrap();
                            assert!(!name.contains(['/', '.']), "{path}");
                        }
                        Route::TrashRestore { id, .. } => assert!(crate::trash::valid_id(id)),
                        _ => {}
                    }
                }
                Err(e) => assert!(!e.to_string().is_empty()),
            }
        }
    }
}
