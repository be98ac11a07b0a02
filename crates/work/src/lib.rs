//! # blockproof-work
//!
//! The one way blockproof spreads work over threads: [`fan_out`] — a producer thread, N
//! worker threads and the calling thread as the consumer, joined by bounded channels —
//! and the [`Cancel`] token that stops it from outside. Every parallel stage of the
//! codebase (the backup pipeline, verification sampling, restore, `check --read-data`,
//! instant-access chunk fetches) is an instance of it.
//!
//! ```text
//! produce ──(I)──▶ worker ×N ──(O)──▶ consume (calling thread, arrival order)
//! ```
//!
//! ## Invariants
//!
//! - **Bounded.** Both channels hold at most [`FanOut::queue`] items, so a slow stage
//!   stalls the ones before it; memory is a fixed number of items whatever the input size.
//! - **First error wins, everything stops.** An error from any stage is kept (later ones
//!   are consequences and are dropped), the producer stops emitting, workers stop taking
//!   items, and [`fan_out`] returns it once every thread has been joined.
//! - **A panic is an error, never a hang and never a silent success.** A panicking stage
//!   closes its channels as it unwinds (so nobody waits for it forever) and its panic
//!   becomes [`WorkError::Panicked`], which takes precedence over any other error: it is
//!   the root cause. A run whose worker died can therefore never look complete.
//! - **Cancellation is cooperative and prompt.** [`Cancel::cancel`] (from another thread:
//!   a lost repository lock, a signal) is seen by the producer before each item and by
//!   the workers and the consumer between items; the run then returns
//!   [`WorkError::Cancelled`] with the first reason given. Work inside one item (a read
//!   from a slow source) is not interrupted.
//! - Threads are scoped: nothing outlives the call, and stages may borrow from the caller.

use std::any::Any;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use crossbeam_channel::{bounded, Sender};

/// Why a run of work stopped without an error of its own stages.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WorkError {
    /// [`Cancel::cancel`] was called; the reason given.
    #[error("{0}")]
    Cancelled(String),
    /// A thread panicked: an internal fault, never the user's.
    #[error("internal error: {0}")]
    Panicked(String),
}

#[derive(Debug, Default)]
struct CancelInner {
    flag: AtomicBool,
    reason: Mutex<Option<String>>,
}

/// A cancellation token shared by every stage of an operation (cheap to clone).
#[derive(Clone, Debug, Default)]
pub struct Cancel(Arc<CancelInner>);

impl Cancel {
    pub fn new() -> Self {
        Cancel::default()
    }

    /// Asks every stage to stop; the first reason given is kept.
    pub fn cancel(&self, reason: impl Into<String>) {
        let mut r = self.0.reason.lock().unwrap_or_else(|e| e.into_inner());
        if r.is_none() {
            *r = Some(reason.into());
        }
        self.0.flag.store(true, Ordering::SeqCst);
    }

    pub fn is_cancelled(&self) -> bool {
        self.0.flag.load(Ordering::SeqCst)
    }

    /// The reason given to the first [`Cancel::cancel`].
    pub fn reason(&self) -> Option<String> {
        self.0.reason.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// `Err(WorkError::Cancelled)` once cancelled.
    pub fn check(&self) -> Result<(), WorkError> {
        if self.is_cancelled() {
            Err(WorkError::Cancelled(self.reason().unwrap_or_else(|| "cancelled".into())))
        } else {
            Ok(())
        }
    }
}

/// The shape of a [`fan_out`].
#[derive(Clone, Copy, Debug)]
pub struct FanOut {
    /// Worker threads (at least one).
    pub workers: usize,
    /// Capacity of each of the two channels (at least one).
    pub queue: usize,
}

/// What the producer sends items through.
pub struct Emit<'a, I> {
    tx: Sender<I>,
    stopped: &'a (dyn Fn() -> bool + Sync),
}

impl<I> Emit<'_, I> {
    /// Hands an item to the workers (blocking while the queue is full). `false` means the
    /// run is stopping (an error elsewhere, or cancellation): the producer should return.
    pub fn send(&self, item: I) -> bool {
        !(self.stopped)() && self.tx.send(item).is_ok()
    }

    /// Whether the run is stopping.
    pub fn stopped(&self) -> bool {
        (self.stopped)()
    }
}

/// The text of a panic payload.
pub fn panic_message(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "unknown panic".into()
    }
}

/// Runs `f`, turning a panic into [`WorkError::Panicked`] naming `what`. For threads that
/// are not part of a [`fan_out`] (a long-lived writer), so their panic reaches whoever
/// waits for their result instead of leaving it waiting.
pub fn guarded<T>(what: &str, f: impl FnOnce() -> T) -> Result<T, WorkError> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f))
        .map_err(|p| WorkError::Panicked(format!("{what} panicked: {}", panic_message(p.as_ref()))))
}

/// Runs `produce` on its own thread, `make_worker()`'s closures on `shape.workers`
/// threads, and `consume` on the calling thread, as the crate doc describes. Returns the
/// first error, [`WorkError::Panicked`] if any stage panicked, or
/// [`WorkError::Cancelled`] if `cancel` was cancelled before the work was done.
pub fn fan_out<I, O, E, P, F, W, C>(
    cancel: &Cancel,
    shape: FanOut,
    produce: P,
    make_worker: F,
    mut consume: C,
) -> Result<(), E>
where
    I: Send,
    O: Send,
    E: Send + From<WorkError>,
    P: FnOnce(&Emit<'_, I>) -> Result<(), E> + Send,
    F: Fn() -> W + Sync,
    W: FnMut(I) -> Result<O, E>,
    C: FnMut(O) -> Result<(), E>,
{
    let first: Mutex<Option<E>> = Mutex::new(None);
    let stop = AtomicBool::new(false);
    let fail = |e: E| {
        first.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert(e);
        stop.store(true, Ordering::SeqCst);
    };
    let stopped = || stop.load(Ordering::SeqCst) || cancel.is_cancelled();
    let mut panics: Vec<String> = Vec::new();

    std::thread::scope(|s| {
        let (in_tx, in_rx) = bounded::<I>(shape.queue.max(1));
        let (out_tx, out_rx) = bounded::<O>(shape.queue.max(1));
        let (fail, stopped, make_worker) = (&fail, &stopped, &make_worker);
        let producer = s.spawn(move || {
            let emit = Emit { tx: in_tx, stopped };
            if let Err(e) = produce(&emit) {
                fail(e);
            }
        });
        let workers: Vec<_> = (0..shape.workers.max(1))
            .map(|_| {
                let (rx, tx) = (in_rx.clone(), out_tx.clone());
                s.spawn(move || {
                    let mut work = make_worker();
                    for item in rx.iter() {
                        if stopped() {
                            return;
                        }
                        match work(item) {
                            Ok(o) => {
                                if tx.send(o).is_err() {
                                    return;
                                }
                            }
                            Err(e) => return fail(e),
                        }
                    }
                })
            })
            .collect();
        drop(in_rx);
        drop(out_tx);
        for o in out_rx.iter() {
            if stopped() {
                break;
            }
            if let Err(e) = consume(o) {
                fail(e);
                break;
            }
        }
        // Workers blocked on a full output channel now fail their send and return; the
        // producer's sends fail once every worker has gone.
        drop(out_rx);
        for (what, h) in std::iter::once(("producer", producer)).chain(workers.into_iter().map(|w| ("worker", w))) {
            if let Err(p) = h.join() {
                panics.push(format!("{what} thread panicked: {}", panic_message(p.as_ref())));
            }
        }
    });
    if let Some(p) = panics.into_iter().next() {
        return Err(E::from(WorkError::Panicked(p)));
    }
    if let Some(e) = first.into_inner().unwrap_or_else(|p| p.into_inner()) {
        return Err(e);
    }
    cancel.check().map_err(E::from)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    #[derive(Debug, PartialEq)]
    enum E {
        Work(WorkError),
        Mine(&'static str),
    }
    impl From<WorkError> for E {
        fn from(e: WorkError) -> Self {
            E::Work(e)
        }
    }
    const SHAPE: FanOut = FanOut { workers: 3, queue: 2 };

    #[test]
    fn every_item_reaches_the_consumer() {
        let mut got = Vec::new();
        let r: Result<(), E> = fan_out(
            &Cancel::new(),
            SHAPE,
            |emit| {
                for i in 0..1000u64 {
                    if !emit.send(i) {
                        break;
                    }
                }
                Ok(())
            },
            || |i: u64| Ok(i * 2),
            |o| {
                got.push(o);
                Ok(())
            },
        );
        assert_eq!(r, Ok(()));
        got.sort_unstable();
        assert_eq!(got, (0..1000).map(|i| i * 2).collect::<Vec<_>>());
    }

    #[test]
    fn the_first_error_wins_and_stops_the_producer() {
        let produced = AtomicUsize::new(0);
        let r: Result<(), E> = fan_out(
            &Cancel::new(),
            SHAPE,
            |emit| {
                for i in 0..1_000_000u64 {
                    if !emit.send(i) {
                        return Ok(());
                    }
                    produced.fetch_add(1, Ordering::Relaxed);
                }
                Ok(())
            },
            || |i: u64| if i == 10 { Err(E::Mine("ten")) } else { Ok(i) },
            |_| Ok(()),
        );
        assert_eq!(r, Err(E::Mine("ten")));
        assert!(produced.load(Ordering::Relaxed) < 1000, "the producer stopped early");
    }

    #[test]
    fn a_consumer_error_is_returned() {
        let r: Result<(), E> = fan_out(
            &Cancel::new(),
            SHAPE,
            |emit| {
                (0..100u64).take_while(|&i| emit.send(i)).count();
                Ok(())
            },
            || |i: u64| Ok(i),
            |o| if o == 50 { Err(E::Mine("fifty")) } else { Ok(()) },
        );
        assert_eq!(r, Err(E::Mine("fifty")));
    }

    #[test]
    fn a_panicking_worker_is_an_error_not_a_hang_or_a_success() {
        let mut seen = 0;
        let r: Result<(), E> = fan_out(
            &Cancel::new(),
            SHAPE,
            |emit| {
                (0..100u64).take_while(|&i| emit.send(i)).count();
                Ok(())
            },
            || {
                |i: u64| {
                    if i == 7 {
                        panic!("boom at {i}");
                    }
                    Ok(i)
                }
            },
            |_| {
                seen += 1;
                Ok(())
            },
        );
        match r {
            Err(E::Work(WorkError::Panicked(m))) => assert!(m.contains("boom at 7"), "{m}"),
            other => panic!("expected a panic error, got {other:?}"),
        }
        assert!(seen < 100);
    }

    #[test]
    fn a_panicking_producer_or_consumer_side_error_is_reported() {
        let r: Result<(), E> = fan_out(
            &Cancel::new(),
            SHAPE,
            |emit| {
                emit.send(1u64);
                panic!("producer broke");
            },
            || |i: u64| Ok(i),
            |_| Ok(()),
        );
        assert!(matches!(r, Err(E::Work(WorkError::Panicked(m))) if m.contains("producer broke")));
    }

    #[test]
    fn cancellation_stops_the_run_with_its_reason() {
        let cancel = Cancel::new();
        let r: Result<(), E> = fan_out(
            &cancel,
            SHAPE,
            |emit| {
                for i in 0..u64::MAX {
                    if !emit.send(i) {
                        break;
                    }
                }
                Ok(())
            },
            || |i: u64| Ok(i),
            |o| {
                if o == 20 {
                    cancel.cancel("lock lost");
                    cancel.cancel("second reason is ignored");
                }
                Ok(())
            },
        );
        assert_eq!(r, Err(E::Work(WorkError::Cancelled("lock lost".into()))));
        assert_eq!(cancel.check(), Err(WorkError::Cancelled("lock lost".into())));
    }

    #[test]
    fn guarded_turns_a_panic_into_an_error() {
        assert_eq!(guarded("x", || 5), Ok(5));
        let e = guarded("upload thread", || -> u8 { panic!("disk on fire") }).unwrap_err();
        assert_eq!(e, WorkError::Panicked("upload thread panicked: disk on fire".into()));
    }
}
