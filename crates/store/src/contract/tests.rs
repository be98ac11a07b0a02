//! The contract against every backend of this crate, and against backends broken on
//! purpose, one flaw each, to show that each check catches what it is about.

use std::sync::{Condvar, Mutex};

use super::*;
use crate::{relative_path, Calls, Fault, FaultyBackend, LocalBackend, MemoryBackend, Op, ReadCache};

fn keeps(b: &dyn Backend) {
    if let Err(v) = check_backend(b) {
        panic!("{v}");
    }
}

fn shares(a: &dyn Backend, b: &dyn Backend) {
    if let Err(v) = check_shared(a, b) {
        panic!("{v}");
    }
}

#[test]
fn the_directory_backend_keeps_the_contract() {
    let d = tempfile::tempdir().unwrap();
    let b = LocalBackend::create(d.path().join("repo")).unwrap();
    keeps(&b);
    assert_eq!(std::fs::read_dir(d.path().join("repo/tmp")).unwrap().count(), 0, "no temporary file left");
    b.write(Kind::Config, "config", b"cfg").unwrap();
    shares(&b, &LocalBackend::open(d.path().join("repo")).unwrap());
}

#[test]
fn the_read_cache_keeps_the_contract() {
    let d = tempfile::tempdir().unwrap();
    let local = LocalBackend::create(d.path().join("repo")).unwrap();
    let cache = ReadCache::new(Box::new(local), d.path().join("cache")).unwrap();
    keeps(&cache);
    cache.write(Kind::Config, "config", b"cfg").unwrap();
    // Another process without a cache, and one with its own cache, in both directions.
    shares(&cache, &LocalBackend::open(d.path().join("repo")).unwrap());
    let other =
        ReadCache::new(Box::new(LocalBackend::open(d.path().join("repo")).unwrap()), d.path().join("c2")).unwrap();
    shares(&other, &cache);
}

#[test]
fn the_memory_backend_keeps_the_contract() {
    let m = MemoryBackend::new();
    keeps(&m);
    shares(&m, &m.clone());
    keeps(&MemoryBackend::new().with_parallelism(8));
}

#[test]
fn the_faulty_backend_without_faults_or_with_delays_keeps_the_contract() {
    keeps(&FaultyBackend::new(Box::new(MemoryBackend::new())));
    let d = tempfile::tempdir().unwrap();
    let f = FaultyBackend::new(Box::new(LocalBackend::create(d.path().join("repo")).unwrap()));
    let faults = f.faults();
    faults.inject(Calls::any().after(5).times(20), Fault::Delay(Duration::from_millis(1)));
    keeps(&f);
    assert!(faults.calls() > 500, "{} calls", faults.calls());
    assert_eq!(faults.hits(), 0);
}

/// One way to break the contract.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Flaw {
    ListsTemporaryFiles,
    ListsOtherKinds,
    NotFoundAsIo,
    WrongSize,
    ConfigByName,
    ZeroFilledPastEnd,
    RewriteRefused,
    AcceptsBadNames,
    RemoveOfMissingFails,
    CleanTemporaryRemovesPacks,
    NoParallelism,
    /// Every file looks written in 1970 (a store that does not keep times).
    EpochTimes,
    /// `list_sizes` reports a pack a byte longer than it is (a LIST that counts headers).
    ListedSizesWrong,
    /// One big pack appears under its name with half its bytes first, and gets the rest
    /// only once a reader has read that prefix (so the check's outcome does not depend
    /// on timing).
    TornWrites,
}

#[derive(Default)]
struct TornState {
    read: Vec<String>,
}

struct Broken {
    inner: MemoryBackend,
    flaw: Flaw,
    torn: (Mutex<TornState>, Condvar),
}

impl Broken {
    fn new(flaw: Flaw) -> Self {
        Broken { inner: MemoryBackend::new(), flaw, torn: Default::default() }
    }

    fn has(&self, flaw: Flaw) -> bool {
        self.flaw == flaw
    }

    fn io(e: StoreError) -> StoreError {
        match e {
            StoreError::NotFound { kind, name } => {
                StoreError::Io { path: name.into(), source: std::io::Error::other(format!("no such {kind}")) }
            }
            e => e,
        }
    }

    fn map<T>(&self, r: Result<T, StoreError>) -> Result<T, StoreError> {
        if self.has(Flaw::NotFoundAsIo) {
            r.map_err(Self::io)
        } else {
            r
        }
    }
}

impl Backend for Broken {
    fn location(&self) -> String {
        format!("{} with flaw {:?}", self.inner.location(), self.flaw)
    }

    fn read(&self, kind: Kind, name: &str) -> Result<Vec<u8>, StoreError> {
        if kind == Kind::Config && self.has(Flaw::ConfigByName) && name != "config" {
            return Err(StoreError::NotFound { kind, name: name.into() });
        }
        let r = self.map(self.inner.read(kind, name));
        if self.has(Flaw::TornWrites) {
            self.torn.0.lock().unwrap().read.push(name.to_string());
            self.torn.1.notify_all();
        }
        r
    }

    fn read_at(&self, kind: Kind, name: &str, offset: u64, buf: &mut [u8]) -> Result<(), StoreError> {
        if self.has(Flaw::ZeroFilledPastEnd) {
            let data = self.inner.read(kind, name)?;
            buf.fill(0);
            let start = (offset as usize).min(data.len());
            let n = (data.len() - start).min(buf.len());
            buf[..n].copy_from_slice(&data[start..start + n]);
            return Ok(());
        }
        self.map(self.inner.read_at(kind, name, offset, buf))
    }

    fn size(&self, kind: Kind, name: &str) -> Result<u64, StoreError> {
        let extra = u64::from(self.has(Flaw::WrongSize));
        self.map(self.inner.size(kind, name)).map(|s| s + extra)
    }

    fn modified(&self, kind: Kind, name: &str) -> Result<std::time::SystemTime, StoreError> {
        let t = self.map(self.inner.modified(kind, name))?;
        Ok(if self.has(Flaw::EpochTimes) { std::time::UNIX_EPOCH } else { t })
    }

    fn write(&self, kind: Kind, name: &str, data: &[u8]) -> Result<(), StoreError> {
        if self.has(Flaw::AcceptsBadNames) && relative_path(kind, name).is_err() {
            return Ok(());
        }
        if self.has(Flaw::RewriteRefused) && self.inner.size(kind, name).is_ok() {
            return Err(StoreError::Invalid(format!("{kind} {name} exists")));
        }
        if self.has(Flaw::TornWrites) && kind == Kind::Pack && data.len() == BIG + 1 {
            self.inner.write(kind, name, &data[..data.len() / 2])?;
            let guard = self.torn.0.lock().unwrap();
            let _ = self
                .torn
                .1
                .wait_timeout_while(guard, Duration::from_secs(10), |s| !s.read.iter().any(|n| n == name))
                .unwrap();
        }
        self.inner.write(kind, name, data)
    }

    fn write_owned(&self, kind: Kind, name: &str, data: Vec<u8>) -> Result<Option<Vec<u8>>, StoreError> {
        self.write(kind, name, &data)?;
        Ok(Some(data))
    }

    fn list(&self, kind: Kind) -> Result<Vec<String>, StoreError> {
        let mut names = self.inner.list(kind)?;
        if self.has(Flaw::ListsTemporaryFiles) {
            if let Some(first) = names.first().cloned() {
                names.push(format!("{first}.tmp-1234"));
            }
        }
        if self.has(Flaw::ListsOtherKinds) && kind == Kind::Index {
            names.extend(self.inner.list(Kind::Pack)?);
        }
        Ok(names)
    }

    fn list_sizes(&self, kind: Kind) -> Result<Vec<(String, u64)>, StoreError> {
        let extra = u64::from(self.has(Flaw::ListedSizesWrong) && kind == Kind::Pack);
        Ok(self.inner.list_sizes(kind)?.into_iter().map(|(n, s)| (n, s + extra)).collect())
    }

    fn remove(&self, kind: Kind, name: &str) -> Result<(), StoreError> {
        if self.has(Flaw::RemoveOfMissingFails) {
            self.inner.size(kind, name)?;
        }
        self.inner.remove(kind, name)
    }

    fn clean_temporary(&self, _: Duration) -> Result<u64, StoreError> {
        if !self.has(Flaw::CleanTemporaryRemovesPacks) {
            return Ok(0);
        }
        let packs = self.inner.list(Kind::Pack)?;
        for p in &packs {
            self.inner.remove(Kind::Pack, p)?;
        }
        Ok(packs.len() as u64)
    }

    fn parallelism(&self) -> usize {
        usize::from(!self.has(Flaw::NoParallelism))
    }
}

fn violated(b: &dyn Backend) -> Violation {
    check_backend(b).expect_err("the contract found nothing wrong")
}

#[test]
fn each_flaw_breaks_its_rule() {
    let cases = [
        (Flaw::ListsTemporaryFiles, Rule::List),
        (Flaw::ListsOtherKinds, Rule::List),
        (Flaw::NotFoundAsIo, Rule::NotFound),
        (Flaw::WrongSize, Rule::Size),
        (Flaw::ConfigByName, Rule::Config),
        (Flaw::ZeroFilledPastEnd, Rule::ReadAtPastEnd),
        (Flaw::RewriteRefused, Rule::Rewrite),
        (Flaw::AcceptsBadNames, Rule::InvalidName),
        (Flaw::RemoveOfMissingFails, Rule::Remove),
        (Flaw::CleanTemporaryRemovesPacks, Rule::CleanTemporary),
        (Flaw::NoParallelism, Rule::Parallelism),
        (Flaw::EpochTimes, Rule::Modified),
        (Flaw::ListedSizesWrong, Rule::ListSizes),
        (Flaw::TornWrites, Rule::ListedFilesComplete),
    ];
    for (flaw, rule) in cases {
        let v = violated(&Broken::new(flaw));
        assert_eq!(v.rule, rule, "{flaw:?}: {v}");
        assert!(v.to_string().contains(&format!("flaw {flaw:?}")), "the violation names the store: {v}");
    }
}

#[test]
fn injected_faults_break_the_contract() {
    let f = FaultyBackend::new(Box::new(MemoryBackend::new()));
    f.faults().inject(Calls::op(Op::Read).kind(Kind::Index), Fault::ShortRead);
    let v = violated(&f);
    assert_eq!(v.rule, Rule::RoundTrip, "{v}");
    assert!(v.detail.contains("prefix"), "{v}");

    let f = FaultyBackend::new(Box::new(MemoryBackend::new()));
    f.faults().inject(Calls::op(Op::ReadAt).kind(Kind::Pack), Fault::Corrupt);
    assert_eq!(violated(&f).rule, Rule::ReadAt);

    let f = FaultyBackend::new(Box::new(MemoryBackend::new()));
    f.faults().inject(Calls::op(Op::Write).after(20).times(1), Fault::Error);
    let v = violated(&f);
    assert!(v.detail.contains("injected fault"), "{v}");
}

#[test]
fn the_contract_needs_an_empty_store_and_a_shared_one() {
    let m = MemoryBackend::new();
    m.write(Kind::Lock, "left-over", b"x").unwrap();
    assert_eq!(violated(&m).rule, Rule::EmptyStore);
    let v = check_shared(&MemoryBackend::new(), &MemoryBackend::new()).unwrap_err();
    assert_eq!(v.rule, Rule::Shared, "{v}");
}
