//! The backend contract: the rules of [`Backend`] and of the crate doc's durability rules
//! as one set of checks that every backend must pass, written once and run against each
//! (the directory backend, the read cache, the test doubles here; S3 against a real
//! Garage node in `crates/cli/tests/s3.rs`).
//!
//! [`check_backend`] runs every check on an empty store and leaves it empty;
//! [`check_shared`] checks that two handles on one store (two processes opening the same
//! directory or bucket) see each other's writes and removals. Both return the first
//! [`Violation`], naming the [`Rule`] broken and what was seen. What no check can see from
//! outside — that a file survives power loss once `write` returned — is argued in
//! docs/ARCHITECTURE.md §6 and tested by killing processes (`crates/cli/tests/crash.rs`).
//! Compiled for tests and with the `testing` feature.

use std::collections::BTreeSet;
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::{Backend, Kind, StoreError};

/// The rules the contract checks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rule {
    EmptyStore,
    RoundTrip,
    Config,
    ReadAt,
    ReadAtPastEnd,
    Size,
    Modified,
    NotFound,
    List,
    ListSizes,
    Rewrite,
    WriteOwned,
    Remove,
    InvalidName,
    ConcurrentWriters,
    ListedFilesComplete,
    CleanTemporary,
    Parallelism,
    Location,
    Shared,
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Rule::EmptyStore => "a new store lists no file (the contract needs an empty store)",
            Rule::RoundTrip => "a written file reads back byte for byte",
            Rule::Config => "the config is one file, whatever name it is given",
            Rule::ReadAt => "read_at returns exactly the bytes at its offset",
            Rule::ReadAtPastEnd => "read_at past the end of a file is an error (not not-found), never a short read",
            Rule::Size => "size is the length written",
            Rule::Modified => "modified is when the file was written (within a minute either way of this clock)",
            Rule::NotFound => "a missing file is a not-found error",
            Rule::List => "list shows every complete file of its kind, once, and nothing else",
            Rule::ListSizes => "list_sizes shows what list shows, each file with its size",
            Rule::Rewrite => "writing a content-named file again with the same bytes is harmless",
            Rule::WriteOwned => "write_owned stores the bytes and hands back, if anything, the same bytes",
            Rule::Remove => "remove deletes the file, and removing a missing file is not an error",
            Rule::InvalidName => "a name that could leave the store is refused (invalid) and nothing is stored",
            Rule::ConcurrentWriters => "concurrent writers all land, of different names or of one content-named file",
            Rule::ListedFilesComplete => "a listed file is complete while writes go on, never a prefix",
            Rule::CleanTemporary => "clean_temporary never removes a complete file",
            Rule::Parallelism => "parallelism is at least 1",
            Rule::Location => "location names the store",
            Rule::Shared => "a second handle on the same store sees what the first wrote and removed",
        })
    }
}

/// A rule a backend broke.
#[derive(Debug, thiserror::Error)]
#[error("{location}: {rule}: {detail}")]
pub struct Violation {
    pub location: String,
    pub rule: Rule,
    pub detail: String,
}

/// Every kind of file.
const KINDS: [Kind; 7] = [Kind::Config, Kind::Key, Kind::Pack, Kind::Index, Kind::Snapshot, Kind::Lock, Kind::State];

/// Names no backend may accept: empty, too short, path syntax, characters outside
/// `[A-Za-z0-9_-]`.
const BAD_NAMES: [&str; 10] = ["", "a", "..", "../ab", "ab/cd", "/abc", "ab.cd", "ab cd", "ab\0cd", "abé"];

/// A pack of more than 1 MiB with an unaligned tail (the directory backend writes
/// those with `O_DIRECT`; S3 does not split them: multipart starts at 64 MiB).
const BIG: usize = (1 << 20) + 4097;

/// A file the checks write.
#[derive(Clone)]
struct File {
    kind: Kind,
    name: String,
    data: Vec<u8>,
}

/// Bytes from a seed (xorshift64*): reproducible, incompressible, different per seed.
fn bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// A file named by the BLAKE3 hash of its bytes, as packs, index files and snapshots are.
fn content_named(kind: Kind, data: Vec<u8>) -> File {
    File { kind, name: blake3::hash(&data).to_hex().to_string(), data }
}

/// One file or more of every kind, with an empty file, a big one and every byte value.
fn samples(seed: u64) -> Vec<File> {
    let named = |kind, name: &str, data| File { kind, name: format!("{name}-{seed:x}"), data };
    vec![
        File { kind: Kind::Config, name: "config".into(), data: bytes(seed, 300) },
        named(Kind::Key, "contract-key", bytes(seed + 1, 200)),
        content_named(Kind::Pack, bytes(seed + 2, 1000)),
        content_named(Kind::Pack, bytes(seed + 3, BIG)),
        content_named(Kind::Pack, (0..=255u8).collect()),
        content_named(Kind::Index, bytes(seed + 4, 5000)),
        content_named(Kind::Index, Vec::new()),
        content_named(Kind::Snapshot, bytes(seed + 5, 700)),
        named(Kind::Lock, "contract-lock", bytes(seed + 6, 90)),
        named(Kind::State, "contract-state", bytes(seed + 7, 40)),
        named(Kind::State, "contract-empty", Vec::new()),
    ]
}

struct Checker<'a> {
    b: &'a dyn Backend,
}

macro_rules! ensure {
    ($c:expr, $cond:expr, $rule:expr, $($fmt:tt)+) => {
        if !$cond {
            return Err($c.fail($rule, format!($($fmt)+)));
        }
    };
}

impl<'a> Checker<'a> {
    fn fail(&self, rule: Rule, detail: impl Into<String>) -> Violation {
        Violation { location: self.b.location(), rule, detail: detail.into() }
    }

    /// The value of a call that must succeed; its error is a violation of `rule`.
    fn ok<T>(&self, rule: Rule, what: impl fmt::Display, r: Result<T, StoreError>) -> Result<T, Violation> {
        r.map_err(|e| self.fail(rule, format!("{what} failed: {e}")))
    }

    fn listed(&self, rule: Rule, kind: Kind) -> Result<Vec<String>, Violation> {
        let mut names = self.ok(rule, format!("list {kind}"), self.b.list(kind))?;
        names.sort();
        Ok(names)
    }

    /// The names of `files` of `kind` a listing must show (the config is `config`).
    fn expected(files: &[File], kind: Kind) -> Vec<String> {
        let set: BTreeSet<String> = files.iter().filter(|f| f.kind == kind).map(|f| f.name.clone()).collect();
        set.into_iter().collect()
    }

    fn lists_exactly(&self, rule: Rule, files: &[File]) -> Result<(), Violation> {
        for kind in KINDS {
            let (got, want) = (self.listed(rule, kind)?, Self::expected(files, kind));
            ensure!(self, got == want, rule, "list {kind} gave {got:?}, expected {want:?}");
        }
        Ok(())
    }

    /// `list_sizes` of every kind: exactly the files `list` must show, with their sizes
    /// (the config under the name `config`).
    fn sizes_listed(&self, files: &[File]) -> Result<(), Violation> {
        let rule = Rule::ListSizes;
        for kind in KINDS {
            let mut got = self.ok(rule, format!("list_sizes {kind}"), self.b.list_sizes(kind))?;
            got.sort();
            let want: BTreeSet<(String, u64)> = files
                .iter()
                .filter(|f| f.kind == kind)
                .map(|f| (if kind == Kind::Config { "config".into() } else { f.name.clone() }, f.data.len() as u64))
                .collect();
            let want: Vec<(String, u64)> = want.into_iter().collect();
            ensure!(self, got == want, rule, "list_sizes {kind} gave {got:?}, expected {want:?}");
        }
        Ok(())
    }

    fn reads_back(&self, rule: Rule, f: &File) -> Result<(), Violation> {
        let (kind, name) = (f.kind, &f.name);
        let got = self.ok(rule, format!("read {kind} {name}"), self.b.read(kind, name))?;
        ensure!(
            self,
            got == f.data,
            rule,
            "read {kind} {name} gave {} bytes, not the {} written{}",
            got.len(),
            f.data.len(),
            first_difference(&got, &f.data)
        );
        Ok(())
    }

    fn not_found<T>(&self, what: impl fmt::Display, r: Result<T, StoreError>) -> Result<(), Violation> {
        match r {
            Err(e) if e.is_not_found() => Ok(()),
            Err(e) => Err(self.fail(Rule::NotFound, format!("{what}: {e} is not a not-found error"))),
            Ok(_) => Err(self.fail(Rule::NotFound, format!("{what} succeeded"))),
        }
    }

    fn missing(&self, kind: Kind, name: &str) -> Result<(), Violation> {
        self.not_found(format!("read of missing {kind} {name}"), self.b.read(kind, name))?;
        self.not_found(format!("size of missing {kind} {name}"), self.b.size(kind, name))?;
        self.not_found(format!("read_at of missing {kind} {name}"), self.b.read_at(kind, name, 0, &mut [0u8; 4]))
    }

    fn write_all(&self, files: &[File]) -> Result<(), Violation> {
        for (i, f) in files.iter().enumerate() {
            let what = format!("write {} {}", f.kind, f.name);
            if i % 2 == 0 {
                self.ok(Rule::RoundTrip, what, self.b.write(f.kind, &f.name, &f.data))?;
            } else {
                let back = self.ok(Rule::RoundTrip, what, self.b.write_owned(f.kind, &f.name, f.data.clone()))?;
                if let Some(back) = back {
                    ensure!(self, back == f.data, Rule::WriteOwned, "{} {} came back changed", f.kind, f.name);
                }
            }
        }
        Ok(())
    }

    fn read_at_exact(&self, f: &File) -> Result<(), Violation> {
        let len = f.data.len();
        let spans = [(0, len), (0, 1), (1, 7), (len / 2, 4097.min(len / 2)), (len - 1, 1), (len, 0)];
        for (offset, n) in spans.into_iter().filter(|&(o, n)| o + n <= len) {
            let mut buf = vec![0xa5u8; n];
            let what = format!("read_at {} {} of {n} bytes at {offset}", f.kind, f.name);
            self.ok(Rule::ReadAt, &what, self.b.read_at(f.kind, &f.name, offset as u64, &mut buf))?;
            ensure!(
                self,
                buf == f.data[offset..offset + n],
                Rule::ReadAt,
                "{what} gave other bytes{}",
                first_difference(&buf, &f.data[offset..offset + n])
            );
        }
        for (offset, n) in [(len as u64 - 2, 4), (len as u64, 1), (len as u64 + 10, 1)] {
            let mut buf = vec![0u8; n];
            match self.b.read_at(f.kind, &f.name, offset, &mut buf) {
                Err(e) if !e.is_not_found() => {}
                r => {
                    return Err(self.fail(
                        Rule::ReadAtPastEnd,
                        format!("read_at {} {} ({len} bytes) of {n} bytes at {offset}: {r:?}", f.kind, f.name),
                    ))
                }
            }
        }
        Ok(())
    }

    fn invalid_names(&self, files: &[File]) -> Result<(), Violation> {
        for kind in KINDS.into_iter().filter(|&k| k != Kind::Config) {
            for name in BAD_NAMES {
                let results: [(&str, Result<(), StoreError>); 5] = [
                    ("write", self.b.write(kind, name, b"x")),
                    ("read", self.b.read(kind, name).map(drop)),
                    ("read_at", self.b.read_at(kind, name, 0, &mut [0u8; 1])),
                    ("size", self.b.size(kind, name).map(drop)),
                    ("remove", self.b.remove(kind, name)),
                ];
                for (op, r) in results {
                    ensure!(
                        self,
                        matches!(r, Err(StoreError::Invalid(_))),
                        Rule::InvalidName,
                        "{op} {kind} {name:?} gave {r:?}"
                    );
                }
            }
        }
        self.lists_exactly(Rule::InvalidName, files)
    }

    /// Writers of different names at once, then writers of one content-named file.
    fn concurrent_writers(&self) -> Result<Vec<File>, Violation> {
        let files: Vec<Vec<File>> = (0..4u64)
            .map(|t| {
                (0..6u64)
                    .map(|i| {
                        let kind = if i % 2 == 0 { Kind::Pack } else { Kind::Snapshot };
                        content_named(kind, bytes(1000 + t * 10 + i, 3000 + i as usize))
                    })
                    .collect()
            })
            .collect();
        let same = content_named(Kind::Pack, bytes(2000, 20_000));
        let errors: Vec<String> = std::thread::scope(|s| {
            let mut threads: Vec<_> = files
                .iter()
                .map(|mine| {
                    s.spawn(move || {
                        mine.iter().filter_map(|f| self.b.write(f.kind, &f.name, &f.data).err()).collect::<Vec<_>>()
                    })
                })
                .collect();
            threads.extend((0..4).map(|_| {
                let same = &same;
                s.spawn(move || self.b.write(same.kind, &same.name, &same.data).err().into_iter().collect())
            }));
            threads
                .into_iter()
                .flat_map(|t| t.join().expect("a writer thread panicked"))
                .map(|e| e.to_string())
                .collect()
        });
        ensure!(self, errors.is_empty(), Rule::ConcurrentWriters, "writes failed: {errors:?}");
        let mut written: Vec<File> = files.into_iter().flatten().collect();
        written.push(same);
        for f in &written {
            self.reads_back(Rule::ConcurrentWriters, f)?;
        }
        Ok(written)
    }

    /// One thread writes big content-named packs while another lists packs and reads
    /// each new one: every listed pack must hash to its name.
    fn listed_files_complete(&self) -> Result<Vec<File>, Violation> {
        let packs: Vec<File> = (0..4).map(|i| content_named(Kind::Pack, bytes(3000 + i, BIG + i as usize))).collect();
        let done = AtomicBool::new(false);
        let (written, seen) = std::thread::scope(|s| {
            let writer = s.spawn(|| {
                let r = packs.iter().try_for_each(|f| self.b.write(f.kind, &f.name, &f.data));
                done.store(true, Ordering::SeqCst);
                r
            });
            let mut seen = BTreeSet::new();
            let mut result = Ok(());
            loop {
                let last = done.load(Ordering::SeqCst);
                match self.check_listed_packs(&mut seen) {
                    Ok(()) if !last => std::thread::sleep(Duration::from_millis(1)),
                    other => {
                        result = result.and(other);
                        break;
                    }
                }
            }
            let written = writer.join().expect("the writer thread panicked");
            (written.map_err(|e| self.fail(Rule::ListedFilesComplete, format!("write failed: {e}"))), result)
        });
        written?;
        seen?;
        Ok(packs)
    }

    fn check_listed_packs(&self, seen: &mut BTreeSet<String>) -> Result<(), Violation> {
        let rule = Rule::ListedFilesComplete;
        for name in self.listed(rule, Kind::Pack)? {
            if seen.contains(&name) {
                continue;
            }
            let data = self.ok(rule, format!("read of listed pack {name}"), self.b.read(Kind::Pack, &name))?;
            let hash = blake3::hash(&data).to_hex().to_string();
            ensure!(self, hash == name, rule, "listed pack {name} holds {} bytes that hash to {hash}", data.len());
            seen.insert(name);
        }
        Ok(())
    }
}

/// Where two byte strings first differ, for messages.
fn first_difference(a: &[u8], b: &[u8]) -> String {
    match a.iter().zip(b).position(|(x, y)| x != y) {
        Some(i) => format!(" (first difference at byte {i})"),
        None if a.len() != b.len() => format!(" (one is a prefix of the other: {} and {} bytes)", a.len(), b.len()),
        None => String::new(),
    }
}

/// Runs every check of the contract on `backend`, which must be an empty store, and
/// removes what it wrote. Returns the first rule broken.
pub fn check_backend(backend: &dyn Backend) -> Result<(), Violation> {
    let c = Checker { b: backend };
    ensure!(c, !backend.location().trim().is_empty(), Rule::Location, "location is empty");
    ensure!(c, backend.parallelism() >= 1, Rule::Parallelism, "parallelism is {}", backend.parallelism());
    c.lists_exactly(Rule::EmptyStore, &[])?;

    let files = samples(rand::random::<u32>().into());
    for f in &files {
        c.missing(f.kind, &f.name)?;
    }
    let before = std::time::SystemTime::now();
    c.write_all(&files)?;
    let after = std::time::SystemTime::now();
    // gc never deletes a pack younger than what may use it: times must be real.
    let skew = std::time::Duration::from_secs(60);
    for f in &files {
        c.reads_back(Rule::RoundTrip, f)?;
        let size = c.ok(Rule::Size, format!("size {} {}", f.kind, f.name), backend.size(f.kind, &f.name))?;
        ensure!(c, size == f.data.len() as u64, Rule::Size, "{} {}: {size}, not {}", f.kind, f.name, f.data.len());
        let at = c.ok(Rule::Modified, format!("modified {} {}", f.kind, f.name), backend.modified(f.kind, &f.name))?;
        ensure!(
            c,
            at + skew >= before && at <= after + skew,
            Rule::Modified,
            "{} {}: written between {before:?} and {after:?}, modified says {at:?}",
            f.kind,
            f.name
        );
    }
    c.not_found("modified of a missing file", backend.modified(Kind::Pack, &"ee".repeat(32)))?;
    c.lists_exactly(Rule::List, &files)?;
    c.sizes_listed(&files)?;
    let config = &files[0];
    let under_other_name =
        c.ok(Rule::Config, "read of the config as \"other\"", backend.read(Kind::Config, "other"))?;
    ensure!(c, under_other_name == config.data, Rule::Config, "reading the config under another name gave other bytes");

    // A file is only found under its own kind.
    let pack = files.iter().find(|f| f.kind == Kind::Pack).expect("samples hold packs");
    c.missing(Kind::Index, &pack.name)?;
    c.missing(Kind::Snapshot, &pack.name)?;

    for f in files.iter().filter(|f| f.data.len() >= 2) {
        c.read_at_exact(f)?;
    }

    // Writing a content-named file again, both ways, changes nothing.
    for f in files.iter().filter(|f| matches!(f.kind, Kind::Pack | Kind::Index | Kind::Snapshot)) {
        let what = format!("second write of {} {}", f.kind, f.name);
        c.ok(Rule::Rewrite, &what, backend.write(f.kind, &f.name, &f.data))?;
        c.ok(Rule::Rewrite, &what, backend.write_owned(f.kind, &f.name, f.data.clone()))?;
        c.reads_back(Rule::Rewrite, f)?;
    }
    c.lists_exactly(Rule::Rewrite, &files)?;

    c.invalid_names(&files)?;

    let mut all = files.clone();
    all.extend(c.concurrent_writers()?);
    c.lists_exactly(Rule::ConcurrentWriters, &all)?;
    all.extend(c.listed_files_complete()?);
    c.lists_exactly(Rule::ListedFilesComplete, &all)?;

    c.ok(Rule::CleanTemporary, "clean_temporary", backend.clean_temporary(Duration::ZERO))?;
    c.lists_exactly(Rule::CleanTemporary, &all)?;
    for f in &all {
        c.reads_back(Rule::CleanTemporary, f)?;
    }

    // Remove everything, each file twice, and a file that never existed.
    for f in &all {
        c.ok(Rule::Remove, format!("remove {} {}", f.kind, f.name), backend.remove(f.kind, &f.name))?;
        c.missing(f.kind, &f.name)
            .map_err(|v| c.fail(Rule::Remove, format!("after remove {} {}: {}", f.kind, f.name, v.detail)))?;
        c.ok(Rule::Remove, format!("second remove {} {}", f.kind, f.name), backend.remove(f.kind, &f.name))?;
    }
    c.ok(Rule::Remove, "remove of a file never written", backend.remove(Kind::Snapshot, "never-written"))?;
    c.sizes_listed(&[])?;
    c.lists_exactly(Rule::Remove, &[])
}

/// Checks that `second`, another handle on the store `first` uses (a second process
/// opening the same directory or bucket), reads what `first` writes and that `first`
/// no longer lists what `second` removes. Any store will do: the files it writes have
/// fresh names, and it removes them.
pub fn check_shared(first: &dyn Backend, second: &dyn Backend) -> Result<(), Violation> {
    let seed: u64 = rand::random::<u32>().into();
    let c = Checker { b: first };
    let files: Vec<File> = samples(seed).into_iter().filter(|f| f.kind != Kind::Config && !f.data.is_empty()).collect();
    c.write_all(&files)?;
    let other = Checker { b: second };
    for f in &files {
        other.reads_back(Rule::Shared, f)?;
        let size = other.ok(Rule::Shared, format!("size {} {}", f.kind, f.name), second.size(f.kind, &f.name))?;
        ensure!(
            c,
            size == f.data.len() as u64,
            Rule::Shared,
            "the second handle's size of {} {} is {size}",
            f.kind,
            f.name
        );
        let listed = other.listed(Rule::Shared, f.kind)?;
        ensure!(c, listed.contains(&f.name), Rule::Shared, "the second handle does not list {} {}", f.kind, f.name);
    }
    for f in &files {
        other.ok(
            Rule::Shared,
            format!("remove {} {} by the second handle", f.kind, f.name),
            second.remove(f.kind, &f.name),
        )?;
        let listed = c.listed(Rule::Shared, f.kind)?;
        ensure!(
            c,
            !listed.contains(&f.name),
            Rule::Shared,
            "{} {} is still listed after the second handle removed it",
            f.kind,
            f.name
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests;
