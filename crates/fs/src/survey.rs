//! A filesystem-level restore test: [`survey`] walks one filesystem whole, as a restore
//! would need it, and says what it could not read.
//!
//! ## Model
//!
//! Every directory is listed and every entry's metadata is read (that is what a listing
//! gives); every symlink's target is read; the contents of a sample of the regular files
//! are read to the end and their length compared with the size their entry states; the
//! files the user names are read whole, always. A read that fails, or a file that ends
//! before or after its stated size, is a [`Problem`] of that path; the walk goes on past
//! it. Nothing is written anywhere: contents go to a counting sink.
//!
//! Which files are sampled is decided by a hash of the path and a seed, so the same seed
//! reads the same files (a test can be repeated), and another seed others.
//!
//! ## Invariants
//!
//! The walk is bounded like every walk here: nesting deeper than the extract limit is a
//! problem of that directory, not an endless loop, and entries whose names cannot be a
//! path component are counted but never descended into. At most [`MAX_PROBLEMS`]
//! problems are kept (all are counted).

use std::io::Write;

use crate::extract::MAX_DEPTH;
use crate::{Entry, EntryKind, Filesystem, FsError, FsPath};

/// Problems kept in a [`Survey`] (more are counted, not kept).
pub const MAX_PROBLEMS: usize = 100;

/// What to read.
#[derive(Clone, Debug, Default)]
pub struct SurveyOptions {
    /// The share of regular files whose contents are read, from 0 (none) to 1 (all).
    pub sample: f64,
    /// Chooses which files a sample reads.
    pub seed: u64,
    /// Paths that must exist; regular files among them are read whole.
    pub expect: Vec<FsPath>,
}

/// Something the walk could not read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    pub path: String,
    pub error: String,
}

/// A path the user expected, and what was found there.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Expected {
    pub path: String,
    /// Its kind, or `None` when it is missing (or unreadable: then also a problem).
    pub kind: Option<EntryKind>,
}

/// The outcome of [`survey`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Survey {
    pub dirs: u64,
    pub files: u64,
    pub symlinks: u64,
    /// Devices, FIFOs, sockets.
    pub others: u64,
    /// Regular files whose contents were read to the end.
    pub files_read: u64,
    pub bytes_read: u64,
    /// Everything that failed, up to [`MAX_PROBLEMS`].
    pub problems: Vec<Problem>,
    /// How many problems there were in all.
    pub problem_count: u64,
    pub expected: Vec<Expected>,
}

impl Survey {
    /// No problem, and every expected path found.
    pub fn passed(&self) -> bool {
        self.problem_count == 0 && self.expected.iter().all(|e| e.kind.is_some())
    }

    fn problem(&mut self, path: &FsPath, error: impl ToString) {
        self.problem_count += 1;
        if self.problems.len() < MAX_PROBLEMS {
            self.problems.push(Problem { path: path.to_string(), error: error.to_string() });
        }
    }
}

/// Walks `fs` whole (see the module doc).
pub fn survey(fs: &Filesystem, opts: &SurveyOptions) -> Survey {
    let mut s = Survey::default();
    s.dirs += 1; // the root
    walk(fs, &FsPath::root(), 0, opts, &mut s);
    for path in &opts.expect {
        let kind = match fs.stat(path.to_bytes()) {
            Ok(e) => {
                if e.kind == EntryKind::File {
                    read_whole(fs, &e, &mut s);
                }
                Some(e.kind)
            }
            Err(FsError::NotFound { .. }) => None,
            Err(e) => {
                s.problem(path, e);
                None
            }
        };
        s.expected.push(Expected { path: path.to_string(), kind });
    }
    s
}

fn walk(fs: &Filesystem, dir: &FsPath, depth: usize, opts: &SurveyOptions, s: &mut Survey) {
    if depth > MAX_DEPTH {
        s.problem(dir, FsError::TooDeep { path: dir.to_string(), limit: MAX_DEPTH });
        return;
    }
    let entries = match fs.list_dir(dir) {
        Ok(mut e) => {
            e.sort_by(|a, b| a.path.file_name().cmp(b.path.file_name()));
            e
        }
        Err(e) => return s.problem(dir, e),
    };
    for e in entries {
        match e.kind {
            EntryKind::Dir => {
                s.dirs += 1;
                if e.unsafe_name().is_none() {
                    walk(fs, &e.path, depth + 1, opts, s);
                }
            }
            EntryKind::File => {
                s.files += 1;
                if sampled(&e.path, opts) {
                    read_whole(fs, &e, s);
                }
            }
            EntryKind::Symlink => {
                s.symlinks += 1;
                if let Err(err) = fs.read_link_path(&e.path) {
                    s.problem(&e.path, err);
                }
            }
            EntryKind::Other => s.others += 1,
        }
    }
}

/// Reads a regular file to its end; its length must be the size its entry states.
fn read_whole(fs: &Filesystem, e: &Entry, s: &mut Survey) {
    let mut sink = Counting(0);
    match fs.read_path(&e.path, &mut sink) {
        Ok(n) if n == e.size => {
            s.files_read += 1;
            s.bytes_read += n;
        }
        Ok(n) => {
            s.bytes_read += n;
            s.problem(&e.path, format!("read {n} bytes of a file whose entry says {}", e.size));
        }
        Err(err) => {
            s.bytes_read += sink.0;
            s.problem(&e.path, err);
        }
    }
}

/// Whether the sample reads this file: a hash of the path and seed against the share.
fn sampled(path: &FsPath, opts: &SurveyOptions) -> bool {
    if opts.sample >= 1.0 {
        return true;
    }
    if opts.sample <= 0.0 {
        return false;
    }
    // FNV-1a over the seed and the path, then MurmurHash3's finalizer (FNV alone mixes
    // the last bytes poorly into the high bits): stable across builds and platforms.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in opts.seed.to_le_bytes().into_iter().chain(path.to_bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^= h >> 33;
    (h >> 11) as f64 / (1u64 << 53) as f64 <= opts.sample
}

struct Counting(u64);

impl Write for Counting {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0 += buf.len() as u64;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sample_is_a_share_decided_by_path_and_seed() {
        let paths: Vec<FsPath> = (0..4000).map(|i| FsPath::parse(format!("/d/f{i}")).unwrap()).collect();
        let count = |sample: f64, seed: u64| {
            let o = SurveyOptions { sample, seed, expect: vec![] };
            paths.iter().filter(|p| sampled(p, &o)).count()
        };
        assert_eq!(count(0.0, 1), 0);
        assert_eq!(count(1.0, 1), 4000);
        let tenth = count(0.1, 1);
        assert!((300..500).contains(&tenth), "{tenth}");
        assert_eq!(count(0.1, 1), tenth, "the same seed reads the same files");
        let o1 = SurveyOptions { sample: 0.1, seed: 1, expect: vec![] };
        let o2 = SurveyOptions { sample: 0.1, seed: 2, expect: vec![] };
        let differ = paths.iter().filter(|p| sampled(p, &o1) != sampled(p, &o2)).count();
        assert!(differ > 100, "another seed reads other files: {differ}");
    }
}
