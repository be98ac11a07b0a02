//! Sorted runs of fixed-size records written aside to temporary files and read back.
//!
//! Work that must sort more than it may hold (building the index cache's table, marking
//! every blob the snapshots reference) sorts a batch in memory, writes it here as one
//! run, and later merges the runs. A run file is private to the process (mode 0600, a
//! name with the process id), removed when its [`RunFiles`] is dropped, and hashed with
//! BLAKE3 as it is written: a reader that finds it shorter or different from what was
//! written says so ([`RunReader::failed`]) instead of giving other records.
//!
//! A process killed while it holds runs cannot remove them (they can take gigabytes).
//! So each set of runs has a lock file beside it, `<base>.run<pid>-<k>.lock`, which its
//! process holds locked (`flock`) from before the first run is written until the runs are
//! removed; the kernel releases the lock when the process dies, in whatever PID namespace
//! it ran. [`remove_stale`] removes the runs whose lock it can take.

use std::cell::Cell;
use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};

use blockproof_format::Id;

use crate::blob_table::{Slot, SLOT_SIZE};

/// A record of fixed size.
pub(crate) trait Record: Sized {
    const SIZE: usize;
    fn encode(&self, out: &mut Vec<u8>);
    /// `None` for bytes no record encodes to.
    fn decode(bytes: &[u8]) -> Option<Self>;
}

impl Record for Slot {
    const SIZE: usize = SLOT_SIZE;
    fn encode(&self, out: &mut Vec<u8>) {
        Slot::encode(self, out)
    }
    fn decode(bytes: &[u8]) -> Option<Self> {
        Slot::decode(bytes)
    }
}

impl Record for Id {
    const SIZE: usize = 32;
    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.0);
    }
    fn decode(bytes: &[u8]) -> Option<Self> {
        Some(Id(bytes.try_into().ok()?))
    }
}

/// A file created for this process only (mode 0600), truncated.
pub(crate) fn private_file(path: &Path) -> std::io::Result<File> {
    std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).mode(0o600).open(path)
}

/// The runs written so far: (path, records, BLAKE3 of the bytes). Their files are
/// removed on drop.
pub(crate) struct RunFiles {
    base: PathBuf,
    serial: u64,
    runs: Vec<(PathBuf, usize, blake3::Hash)>,
    /// The lock file, held locked while there are runs (taken before the first).
    owner: Option<(PathBuf, File)>,
    /// Other files of the set ([`RunFiles::aside`]), removed on drop if still there.
    aside: Vec<PathBuf>,
}

impl RunFiles {
    /// Runs named after `base` (`<base>.run<pid>-<k>.<n>`, `k` distinct for every
    /// `RunFiles` of the process): `base` names a file in the directory they go to.
    pub(crate) fn new(base: PathBuf) -> Self {
        static SERIAL: AtomicU64 = AtomicU64::new(0);
        RunFiles {
            base,
            serial: SERIAL.fetch_add(1, Ordering::Relaxed),
            runs: Vec::new(),
            owner: None,
            aside: Vec::new(),
        }
    }

    /// `<base>.run<pid>-<k>.<what>`.
    fn path(&self, what: &str) -> PathBuf {
        self.base.with_extension(format!("run{}-{}.{what}", std::process::id(), self.serial))
    }

    /// Takes the lock file (once). A cleaner may remove a lock file it could lock just as
    /// this process created it: only a lock of the file still at the path counts.
    fn own(&mut self) -> std::io::Result<()> {
        use std::os::unix::fs::MetadataExt;
        while self.owner.is_none() {
            let path = self.path("lock");
            let file = private_file(&path)?;
            file.lock()?;
            let here = file.metadata()?;
            match std::fs::metadata(&path) {
                Ok(m) if (m.dev(), m.ino()) == (here.dev(), here.ino()) => self.owner = Some((path, file)),
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.runs.len()
    }

    /// The path of a further file of this set, `<base>.run<pid>-<k>.<what>`, for the
    /// caller to create (the cache file being built, renamed into place when done): like
    /// a run, [`remove_stale`] removes it once this process is gone, and it is removed on
    /// drop unless it was moved away.
    pub(crate) fn aside(&mut self, what: &str) -> std::io::Result<PathBuf> {
        self.own()?;
        let path = self.path(what);
        self.aside.push(path.clone());
        Ok(path)
    }

    /// Writes one run, in the order given (the caller sorted it).
    pub(crate) fn write<R: Record>(&mut self, records: impl IntoIterator<Item = R>) -> std::io::Result<()> {
        self.own()?;
        let path = self.path(&self.runs.len().to_string());
        let mut out = BufWriter::with_capacity(1 << 20, private_file(&path)?);
        // Registered before it is written, so that a failed write leaves no file behind.
        self.runs.push((path, 0, blake3::Hasher::new().finalize()));
        let mut hasher = blake3::Hasher::new();
        let mut bytes = Vec::with_capacity(R::SIZE);
        let mut len = 0;
        for r in records {
            bytes.clear();
            r.encode(&mut bytes);
            hasher.update(&bytes);
            out.write_all(&bytes)?;
            len += 1;
        }
        out.flush()?;
        let last = self.runs.last_mut().expect("registered above");
        (last.1, last.2) = (len, hasher.finalize());
        Ok(())
    }

    /// A reader of every run, with `buffer` bytes of read-ahead each; all share `failed`.
    pub(crate) fn readers<R: Record>(
        &self,
        buffer: usize,
        failed: &Rc<Cell<bool>>,
    ) -> std::io::Result<Vec<RunReader<R>>> {
        self.runs.iter().map(|(path, len, hash)| RunReader::open(path, *len, *hash, buffer, failed.clone())).collect()
    }
}

impl Drop for RunFiles {
    fn drop(&mut self) {
        for path in self.runs.iter().map(|r| &r.0).chain(&self.aside) {
            let _ = std::fs::remove_file(path);
        }
        if let Some((path, _file)) = self.owner.take() {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Removes from `dir` the runs of processes that died before they could (killed while
/// building the index cache or marking): every set whose lock file it can lock. Runs of a
/// live process, and files it cannot read, are left alone. Returns the files removed.
pub(crate) fn remove_stale(dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    let names: Vec<String> = entries.flatten().filter_map(|e| e.file_name().into_string().ok()).collect();
    let mut removed = 0;
    for lock in names.iter().filter(|n| n.contains(".run") && n.ends_with(".lock")) {
        let path = dir.join(lock);
        let Ok(file) = File::open(&path) else { continue };
        if file.try_lock().is_err() {
            continue;
        }
        // `<base>.run<pid>-<k>.`: the runs, then the lock file itself.
        let prefix = &lock[..lock.len() - "lock".len()];
        for name in names.iter().filter(|n| n.starts_with(prefix) && *n != lock) {
            removed += usize::from(std::fs::remove_file(dir.join(name)).is_ok());
        }
        removed += usize::from(std::fs::remove_file(&path).is_ok());
    }
    removed
}

/// A run read back, its bytes hashed as they go; `failed` is set when it ends short, holds
/// bytes no record encodes to, or its hash differs (it then ends).
pub(crate) struct RunReader<R> {
    reader: BufReader<File>,
    left: usize,
    hasher: blake3::Hasher,
    expect: blake3::Hash,
    failed: Rc<Cell<bool>>,
    buf: Vec<u8>,
    _record: std::marker::PhantomData<R>,
}

impl<R: Record> RunReader<R> {
    fn open(
        path: &Path,
        len: usize,
        expect: blake3::Hash,
        buffer: usize,
        failed: Rc<Cell<bool>>,
    ) -> std::io::Result<Self> {
        let reader = BufReader::with_capacity(buffer, File::open(path)?);
        let hasher = blake3::Hasher::new();
        let buf = vec![0; R::SIZE];
        Ok(RunReader { reader, left: len, hasher, expect, failed, buf, _record: std::marker::PhantomData })
    }
}

impl<R: Record> Iterator for RunReader<R> {
    type Item = R;

    fn next(&mut self) -> Option<R> {
        if self.left == 0 {
            return None;
        }
        let record = self.reader.read_exact(&mut self.buf).ok().and_then(|()| R::decode(&self.buf));
        self.hasher.update(&self.buf);
        self.left -= 1;
        if record.is_none() || (self.left == 0 && self.hasher.finalize() != self.expect) {
            self.failed.set(true);
            self.left = 0;
            return None;
        }
        record
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(k: u8) -> Id {
        Id([k; 32])
    }

    #[test]
    fn runs_read_back_as_written_and_are_removed_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let mut runs = RunFiles::new(dir.path().join("x"));
        runs.write([id(1), id(3)]).unwrap();
        runs.write([id(2)]).unwrap();
        let failed = Rc::new(Cell::new(false));
        let read: Vec<Vec<Id>> = runs.readers(64, &failed).unwrap().into_iter().map(|r| r.collect()).collect();
        assert_eq!(read, vec![vec![id(1), id(3)], vec![id(2)]]);
        assert!(!failed.get());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 3, "two runs and their lock file");
        drop(runs);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    /// Runs whose process died (their lock file not locked) are removed; the runs of a
    /// live process (here this one) and other files stay.
    #[test]
    fn runs_of_a_dead_process_are_removed_and_live_ones_stay() {
        let dir = tempfile::tempdir().unwrap();
        let mut live = RunFiles::new(dir.path().join("marks"));
        live.write([id(1)]).unwrap();
        // What a killed process left: its lock file (nobody holds it) and two runs.
        for name in ["marks.run4194305-3.lock", "marks.run4194305-3.0", "marks.run4194305-3.1"] {
            std::fs::write(dir.path().join(name), b"x").unwrap();
        }
        std::fs::write(dir.path().join("blob-index"), b"the cache").unwrap();
        std::fs::write(dir.path().join("marks.run4194305-30.0"), b"another set").unwrap();
        assert_eq!(remove_stale(dir.path()), 3);
        let mut left: Vec<String> =
            std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        left.sort();
        let mine = format!("marks.run{}-{}", std::process::id(), live.serial);
        let mut want =
            ["blob-index".to_string(), format!("{mine}.0"), format!("{mine}.lock"), "marks.run4194305-30.0".into()];
        want.sort();
        assert_eq!(left, want);
        let failed = Rc::new(Cell::new(false));
        let read: Vec<Id> = live.readers(64, &failed).unwrap().remove(0).collect();
        assert_eq!(read, [id(1)]);
        drop(live);
        assert_eq!(remove_stale(dir.path()), 0);
    }

    /// A run changed or cut short after it was written is never read as other records.
    #[test]
    fn a_run_changed_behind_the_reader_fails_it() {
        let dir = tempfile::tempdir().unwrap();
        let mut runs = RunFiles::new(dir.path().join("x"));
        runs.write([id(1), id(2), id(3)]).unwrap();
        let path = dir.path().join(format!("x.run{}-{}.0", std::process::id(), runs.serial));
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[40] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        let failed = Rc::new(Cell::new(false));
        let read: Vec<Id> = runs.readers(64, &failed).unwrap().remove(0).collect();
        assert!(failed.get());
        assert_eq!(read[0], id(1), "what was read before the end is as written; the end is refused");
        std::fs::write(&path, &bytes[..50]).unwrap();
        let failed = Rc::new(Cell::new(false));
        let read: Vec<Id> = runs.readers(64, &failed).unwrap().remove(0).collect();
        assert!(failed.get() && read.len() == 1);
    }
}
