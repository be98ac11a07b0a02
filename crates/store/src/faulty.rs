//! [`FaultyBackend`]: a test double that wraps any backend and makes chosen calls fail,
//! return short or damaged data, wait, or stop for good as if the process had died.

use std::io::ErrorKind;
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use crate::{Backend, Kind, StoreError};

/// A backend call, to choose the calls a fault hits. `location` and `parallelism` touch
/// no storage and are neither counted nor faulted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Op {
    Read,
    ReadAt,
    Size,
    Modified,
    /// [`Backend::write`] and [`Backend::write_owned`].
    Write,
    List,
    Remove,
    CleanTemporary,
}

/// What happens to a call a fault hits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fault {
    /// The call fails ([`StoreError::Io`]) without reaching the wrapped backend.
    Error,
    /// The call reaches the wrapped backend — a write is stored, a file removed — and
    /// then fails: a reply lost after the work was done.
    ErrorAfter,
    /// A read succeeds with only the first half of the bytes: `read` returns half the
    /// file, `read_at` fills half the buffer and zeroes the rest. A backend breaking its
    /// contract (a proxy that cuts responses, a store that loses a file's tail).
    /// Other calls are not affected.
    ShortRead,
    /// A read succeeds with one bit flipped in the middle of the bytes. Other calls are
    /// not affected.
    Corrupt,
    /// The call waits this long, then runs (a crash meanwhile ends the wait, and the call
    /// fails: see [`Faults::crash_after`]).
    Delay(Duration),
}

/// Which calls a fault hits: calls of the chosen operations and kinds (every one when
/// none is chosen), after the first `after` of them, `times` of them (all when unset).
/// Each injected fault counts its own matching calls.
#[derive(Clone, Debug, Default)]
pub struct Calls {
    ops: Vec<Op>,
    kinds: Vec<Kind>,
    after: u64,
    times: Option<u64>,
}

impl Calls {
    /// Every call.
    pub fn any() -> Self {
        Calls::default()
    }

    /// Calls of `op` (more with [`Calls::or`]).
    pub fn op(op: Op) -> Self {
        Calls { ops: vec![op], ..Calls::default() }
    }

    /// Calls of `op` too.
    pub fn or(mut self, op: Op) -> Self {
        self.ops.push(op);
        self
    }

    /// Only calls on files of `kind` (this and the other kinds chosen).
    pub fn kind(mut self, kind: Kind) -> Self {
        self.kinds.push(kind);
        self
    }

    /// The first `n` matching calls pass.
    pub fn after(mut self, n: u64) -> Self {
        self.after = n;
        self
    }

    /// Then `n` matching calls are hit (by default every later one).
    pub fn times(mut self, n: u64) -> Self {
        self.times = Some(n);
        self
    }

    fn matches(&self, op: Op, kind: Kind) -> bool {
        (self.ops.is_empty() || self.ops.contains(&op)) && (self.kinds.is_empty() || self.kinds.contains(&kind))
    }

    /// Whether the `n`th matching call (from 0) is hit.
    fn hits(&self, n: u64) -> bool {
        n >= self.after && self.times.is_none_or(|t| n - self.after < t)
    }
}

/// One call, as the log of [`Faults::log`] keeps it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Call {
    /// Calls are numbered from 1, in the order they reached the wrapper.
    pub number: u64,
    pub op: Op,
    pub kind: Kind,
    /// The file name (empty for `list` and `clean_temporary`).
    pub name: String,
    /// Whether a fault or the crash hit it (delays excepted).
    pub hit: bool,
    /// The bytes a `read_at` asked for (`None` for other calls).
    pub range: Option<std::ops::Range<u64>>,
}

#[derive(Default)]
struct State {
    rules: Vec<(Calls, Fault, u64)>,
    crash_after: Option<u64>,
    /// A call after the crash point arrived: the process is gone.
    crashed: bool,
    calls: u64,
    log: Vec<Call>,
}

/// The faults of a [`FaultyBackend`], shared: a test keeps this handle to arm faults
/// and read the log after handing the backend itself to a repository.
#[derive(Default)]
pub struct Faults {
    state: Mutex<State>,
    /// Wakes calls waiting out a delay when the crash happens.
    crash: Condvar,
}

/// What a call does, decided when it arrives.
struct Plan {
    number: u64,
    delay: Duration,
    fault: Option<Fault>,
    crashed: bool,
}

impl Faults {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Makes the calls `calls` chooses suffer `fault` (faults injected earlier win when
    /// two hit one call; delays add up and apply too).
    pub fn inject(&self, calls: Calls, fault: Fault) {
        self.state().rules.push((calls, fault, 0));
    }

    /// Simulates a process that dies after call number `n` (counted over every call,
    /// from 1, including those made so far: see [`Faults::calls`]): every later call
    /// fails without reaching the wrapped backend, which keeps exactly what the first
    /// `n` calls left. A test then opens the wrapped store anew to see what a crash at
    /// that point leaves. A call that arrived before the crash but was still waiting out
    /// a [`Fault::Delay`] when it happened fails too: it was in flight when the process
    /// died, and an atomic write in flight leaves nothing.
    pub fn crash_after(&self, n: u64) {
        self.state().crash_after = Some(n);
    }

    /// Whether the crash happened (a call arrived after the crash point).
    pub fn crashed(&self) -> bool {
        self.state().crashed
    }

    /// Removes every fault and the crash; the count and the log go on.
    pub fn clear(&self) {
        let mut s = self.state();
        s.rules.clear();
        s.crash_after = None;
        s.crashed = false;
    }

    /// How many calls arrived so far.
    pub fn calls(&self) -> u64 {
        self.state().calls
    }

    /// Every call so far, in order.
    pub fn log(&self) -> Vec<Call> {
        self.state().log.clone()
    }

    /// How many calls a fault or the crash hit so far.
    pub fn hits(&self) -> usize {
        self.state().log.iter().filter(|c| c.hit).count()
    }

    fn plan(&self, op: Op, kind: Kind, name: &str, range: Option<std::ops::Range<u64>>) -> Plan {
        let mut s = self.state();
        s.calls += 1;
        let number = s.calls;
        let crashed = s.crash_after.is_some_and(|n| number > n);
        if crashed && !s.crashed {
            s.crashed = true;
            self.crash.notify_all();
        }
        let (mut delay, mut fault) = (Duration::ZERO, None);
        for (calls, f, seen) in s.rules.iter_mut() {
            if !calls.matches(op, kind) {
                continue;
            }
            *seen += 1;
            if !calls.hits(*seen - 1) {
                continue;
            }
            match f {
                Fault::Delay(d) => delay += *d,
                // A short read or a flipped bit only means something for a read.
                Fault::ShortRead | Fault::Corrupt if !matches!(op, Op::Read | Op::ReadAt) => {}
                f => {
                    fault.get_or_insert(f.clone());
                }
            }
        }
        let hit = crashed || fault.is_some();
        s.log.push(Call { number, op, kind, name: name.to_string(), hit, range });
        Plan { number, delay, fault, crashed }
    }
}

/// **A test double**: wraps a backend and injects [`Fault`]s into the calls [`Calls`]
/// chooses, or a crash after a chosen call ([`Faults::crash_after`]). Without faults it
/// passes every call through unchanged (and passes the contract, [`crate::contract`]).
/// Compiled for tests and with the `testing` feature.
///
/// ```
/// use blockproof_store::{Backend, Calls, Fault, FaultyBackend, Kind, MemoryBackend, Op};
/// let store = MemoryBackend::new();
/// let faulty = FaultyBackend::new(Box::new(store.clone()));
/// let faults = faulty.faults();
/// faults.inject(Calls::op(Op::Write).kind(Kind::Pack).after(1).times(1), Fault::Error);
/// faulty.write(Kind::Pack, "p1", b"first").unwrap();
/// assert!(faulty.write(Kind::Pack, "p2", b"second").is_err());
/// faulty.write(Kind::Pack, "p3", b"third").unwrap();
/// assert_eq!(store.list(Kind::Pack).unwrap().len(), 2);
/// ```
pub struct FaultyBackend {
    inner: Box<dyn Backend>,
    faults: Arc<Faults>,
}

impl FaultyBackend {
    /// Wraps `inner`, with no fault yet.
    pub fn new(inner: Box<dyn Backend>) -> Self {
        FaultyBackend { inner, faults: Arc::new(Faults::default()) }
    }

    /// The handle to arm faults and read the log (shared with the backend).
    pub fn faults(&self) -> Arc<Faults> {
        self.faults.clone()
    }

    /// The error of a call a fault hit; `in_flight`: the crash happened while it waited.
    fn injected(&self, plan: &Plan, op: Op, kind: Kind, name: &str, in_flight: bool) -> StoreError {
        let what = if plan.crashed {
            format!("injected crash: the process died before call {}", plan.number)
        } else if in_flight {
            format!("injected crash: the process died while call {} was in flight", plan.number)
        } else {
            format!("injected fault on call {} ({op:?} of {kind} {name})", plan.number)
        };
        let file = crate::relative_path(kind, name).unwrap_or_else(|_| kind.dir().to_string());
        StoreError::Io {
            path: PathBuf::from(format!("{}/{file}", self.inner.location())),
            source: std::io::Error::other(what),
        }
    }

    /// Decides what the call does: fails at once (crash, [`Fault::Error`]) or waits. `range`:
    /// the bytes a `read_at` reads (logged with the call).
    fn start(&self, op: Op, kind: Kind, name: &str, range: Option<std::ops::Range<u64>>) -> Result<Plan, StoreError> {
        let plan = self.faults.plan(op, kind, name, range);
        if plan.crashed || plan.fault == Some(Fault::Error) {
            return Err(self.injected(&plan, op, kind, name, false));
        }
        if !plan.delay.is_zero() {
            let state = self.faults.state();
            let (state, _) = self
                .faults
                .crash
                .wait_timeout_while(state, plan.delay, |s| !s.crashed)
                .unwrap_or_else(|e| e.into_inner());
            let crashed = state.crashed;
            drop(state);
            if crashed {
                return Err(self.injected(&plan, op, kind, name, true));
            }
        }
        Ok(plan)
    }

    /// After the wrapped backend did the call: [`Fault::ErrorAfter`] fails it.
    fn finish(&self, plan: &Plan, op: Op, kind: Kind, name: &str) -> Result<(), StoreError> {
        if plan.fault == Some(Fault::ErrorAfter) {
            return Err(self.injected(plan, op, kind, name, false));
        }
        Ok(())
    }

    /// A call that reads nothing: only errors, delays and the crash apply.
    fn pass<T>(
        &self,
        op: Op,
        kind: Kind,
        name: &str,
        call: impl FnOnce(&dyn Backend) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let plan = self.start(op, kind, name, None)?;
        let out = call(self.inner.as_ref())?;
        self.finish(&plan, op, kind, name)?;
        Ok(out)
    }
}

/// Cuts or flips `bytes` as `fault` says (read faults only).
fn damage_bytes(bytes: &mut [u8], fault: &Fault) -> usize {
    match fault {
        Fault::ShortRead => {
            let keep = bytes.len() / 2;
            bytes[keep..].fill(0);
            keep
        }
        Fault::Corrupt => {
            if let Some(b) = bytes.get_mut(bytes.len() / 2) {
                *b ^= 0x10;
            }
            bytes.len()
        }
        _ => bytes.len(),
    }
}

impl Backend for FaultyBackend {
    fn location(&self) -> String {
        self.inner.location()
    }

    fn read(&self, kind: Kind, name: &str) -> Result<Vec<u8>, StoreError> {
        let plan = self.start(Op::Read, kind, name, None)?;
        let mut data = self.inner.read(kind, name)?;
        self.finish(&plan, Op::Read, kind, name)?;
        if let Some(f) = &plan.fault {
            let keep = damage_bytes(&mut data, f);
            data.truncate(keep);
        }
        Ok(data)
    }

    fn read_at(&self, kind: Kind, name: &str, offset: u64, buf: &mut [u8]) -> Result<(), StoreError> {
        let plan = self.start(Op::ReadAt, kind, name, Some(offset..offset + buf.len() as u64))?;
        self.inner.read_at(kind, name, offset, buf)?;
        self.finish(&plan, Op::ReadAt, kind, name)?;
        if let Some(f) = &plan.fault {
            damage_bytes(buf, f);
        }
        Ok(())
    }

    fn size(&self, kind: Kind, name: &str) -> Result<u64, StoreError> {
        self.pass(Op::Size, kind, name, |b| b.size(kind, name))
    }

    fn modified(&self, kind: Kind, name: &str) -> Result<std::time::SystemTime, StoreError> {
        self.pass(Op::Modified, kind, name, |b| b.modified(kind, name))
    }

    fn write(&self, kind: Kind, name: &str, data: &[u8]) -> Result<(), StoreError> {
        self.pass(Op::Write, kind, name, |b| b.write(kind, name, data))
    }

    fn write_owned(&self, kind: Kind, name: &str, data: Vec<u8>) -> Result<Option<Vec<u8>>, StoreError> {
        self.pass(Op::Write, kind, name, |b| b.write_owned(kind, name, data))
    }

    fn list(&self, kind: Kind) -> Result<Vec<String>, StoreError> {
        self.pass(Op::List, kind, "", |b| b.list(kind))
    }

    fn list_sizes(&self, kind: Kind) -> Result<Vec<(String, u64)>, StoreError> {
        self.pass(Op::List, kind, "", |b| b.list_sizes(kind))
    }

    fn remove(&self, kind: Kind, name: &str) -> Result<(), StoreError> {
        self.pass(Op::Remove, kind, name, |b| b.remove(kind, name))
    }

    /// Counted and faulted as a call on [`Kind::Pack`] (temporary files have no kind).
    fn clean_temporary(&self, age: Duration) -> Result<u64, StoreError> {
        self.pass(Op::CleanTemporary, Kind::Pack, "", |b| b.clean_temporary(age))
    }

    fn parallelism(&self) -> usize {
        self.inner.parallelism()
    }
}

/// An error an injected fault made (tests tell them from real ones by this).
pub fn is_injected(e: &StoreError) -> bool {
    matches!(e, StoreError::Io { source, .. } if source.kind() == ErrorKind::Other
        && source.to_string().starts_with("injected "))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MemoryBackend;

    fn faulty() -> (MemoryBackend, FaultyBackend, Arc<Faults>) {
        let store = MemoryBackend::new();
        let f = FaultyBackend::new(Box::new(store.clone()));
        let faults = f.faults();
        (store, f, faults)
    }

    #[test]
    fn faults_hit_the_chosen_calls_only() {
        let (store, f, faults) = faulty();
        faults.inject(Calls::op(Op::Write).kind(Kind::Pack).after(1).times(2), Fault::Error);
        let results: Vec<bool> = (0..5).map(|i| f.write(Kind::Pack, &format!("p{i}"), b"x").is_ok()).collect();
        assert_eq!(results, [true, false, false, true, true]);
        // Other kinds and operations are not counted by that fault.
        f.write(Kind::Index, "i0", b"y").unwrap();
        f.read(Kind::Pack, "p0").unwrap();
        let mut listed = store.list(Kind::Pack).unwrap();
        listed.sort();
        assert_eq!(listed, ["p0", "p3", "p4"], "a failed write stores nothing");
        let log = faults.log();
        assert_eq!(log.len(), 7);
        assert_eq!(log.iter().filter(|c| c.hit).map(|c| c.number).collect::<Vec<_>>(), [2, 3]);
        assert_eq!((log[6].op, log[6].kind, log[6].name.as_str()), (Op::Read, Kind::Pack, "p0"));
        let e = f.write(Kind::Pack, "p1", b"x");
        assert!(e.is_ok());
        faults.inject(Calls::any(), Fault::Error);
        let e = f.list(Kind::Lock).unwrap_err();
        assert!(is_injected(&e), "{e}");
        assert!(e.to_string().contains("call 9") && e.to_string().contains("List of lock"), "{e}");
        faults.clear();
        assert!(f.list(Kind::Lock).is_ok());
    }

    #[test]
    fn error_after_does_the_work_then_fails() {
        let (store, f, faults) = faulty();
        faults.inject(Calls::op(Op::Write).or(Op::Remove), Fault::ErrorAfter);
        assert!(is_injected(&f.write(Kind::Snapshot, "s1", b"bytes").unwrap_err()));
        assert_eq!(store.read(Kind::Snapshot, "s1").unwrap(), b"bytes", "the write landed");
        assert!(f.write_owned(Kind::Snapshot, "s2", b"owned".to_vec()).is_err());
        assert_eq!(store.read(Kind::Snapshot, "s2").unwrap(), b"owned");
        assert!(f.remove(Kind::Snapshot, "s1").is_err());
        assert!(store.read(Kind::Snapshot, "s1").unwrap_err().is_not_found(), "the remove happened");
        assert_eq!(f.read(Kind::Snapshot, "s2").unwrap(), b"owned", "reads are not chosen");
    }

    #[test]
    fn short_and_damaged_reads_succeed_with_wrong_bytes() {
        let (store, f, faults) = faulty();
        store.write(Kind::Pack, "pp", b"0123456789").unwrap();
        faults.inject(Calls::op(Op::Read).or(Op::ReadAt).times(2), Fault::ShortRead);
        assert_eq!(f.read(Kind::Pack, "pp").unwrap(), b"01234");
        let mut buf = *b"xxxxxx";
        f.read_at(Kind::Pack, "pp", 2, &mut buf).unwrap();
        assert_eq!(&buf, b"234\0\0\0");
        f.read_at(Kind::Pack, "pp", 2, &mut buf).unwrap();
        assert_eq!(&buf, b"234567", "two calls were chosen");
        faults.inject(Calls::op(Op::Read).kind(Kind::Pack), Fault::Corrupt);
        assert_eq!(f.read(Kind::Pack, "pp").unwrap(), b"01234%6789");
        // On a call that is not a read, a read fault does nothing.
        faults.inject(Calls::any(), Fault::ShortRead);
        assert_eq!(f.size(Kind::Pack, "pp").unwrap(), 10);
        // A failing read stays a failure: the fault does not invent bytes.
        assert!(f.read(Kind::Pack, "missing").unwrap_err().is_not_found());
    }

    #[test]
    fn a_crash_stops_every_later_call_and_keeps_what_came_before() {
        let (store, f, faults) = faulty();
        f.write(Kind::Pack, "p1", b"1").unwrap();
        faults.crash_after(faults.calls() + 2);
        f.write(Kind::Pack, "p2", b"2").unwrap();
        f.write(Kind::Index, "i1", b"3").unwrap();
        for _ in 0..3 {
            let e = f.write(Kind::Snapshot, "s1", b"4").unwrap_err();
            assert!(is_injected(&e) && e.to_string().contains("injected crash"), "{e}");
            assert!(f.read(Kind::Pack, "p1").is_err() && f.list(Kind::Pack).is_err());
        }
        assert_eq!(store.file_count(), 3, "the store keeps what the first calls wrote");
        assert!(store.read(Kind::Snapshot, "s1").unwrap_err().is_not_found());
        assert_eq!(faults.hits(), 9);
    }

    #[test]
    fn a_call_in_flight_when_the_crash_happens_leaves_nothing() {
        let (store, f, faults) = faulty();
        // Long enough never to end by itself: the crash ends it.
        faults.inject(Calls::op(Op::Write).kind(Kind::Pack), Fault::Delay(Duration::from_secs(600)));
        faults.crash_after(1);
        let (slow, fast) = std::thread::scope(|s| {
            let slow = s.spawn(|| f.write(Kind::Pack, "p1", b"slow"));
            // The second call waits until the first has arrived, then crashes the process.
            while faults.calls() == 0 {
                std::thread::yield_now();
            }
            let fast = f.write(Kind::Index, "i1", b"fast");
            (slow.join().unwrap(), fast)
        });
        assert!(faults.crashed());
        for r in [&slow, &fast] {
            assert!(r.as_ref().is_err_and(|e| e.to_string().contains("injected crash")), "{r:?}");
        }
        assert!(slow.unwrap_err().to_string().contains("in flight"));
        assert_eq!(store.file_count(), 0, "the write in flight left nothing");
    }

    #[test]
    fn delays_add_up_and_pass_the_call_through() {
        let (store, f, faults) = faulty();
        faults.inject(Calls::op(Op::Write).times(1), Fault::Delay(Duration::from_millis(1)));
        faults.inject(Calls::op(Op::Write).times(1), Fault::Delay(Duration::from_millis(1)));
        f.write(Kind::Lock, "l1", b"x").unwrap();
        assert_eq!(store.read(Kind::Lock, "l1").unwrap(), b"x");
        assert_eq!(faults.hits(), 0, "a delay is not a hit");
        assert_eq!(f.parallelism(), 1);
        assert_eq!(f.location(), store.location());
    }
}
