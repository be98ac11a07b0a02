//! How one request is tried: bounded by time, failing over between endpoints, and
//! given up at once when the store has already been found unreachable.
//!
//! ## The rules
//!
//! - **Time, not count.** A request is retried until [`S3Options::retry_timeout`] has
//!   passed since its first attempt (the last wait is cut so that the last attempt starts
//!   before then). The count ([`max_attempts`]) is only a safety net far above what the
//!   waits allow.
//! - **Failover.** Attempts go round the endpoints, starting at the one that answered
//!   last; after a transient failure the next endpoint is tried at once, and only after a
//!   whole round has failed does the request wait — [`wait`]: jittered, doubling from
//!   [`FIRST_WAIT`] to at most [`MAX_WAIT`], so a node restarting for ten seconds costs a
//!   few attempts and the clients of a recovering cluster do not all come back at once.
//! - **One attempt is bounded too**: [`attempt_limit`] (30 s plus the time to move its
//!   bytes at 64 KiB/s, at most [`ATTEMPT_MAX`]), so a stalled connection becomes a
//!   failed attempt, not a hang.
//! - **A failed operation stops at once.** Requests watch the operation's cancellation
//!   token ([`Cancel`], the repository's, given by `Backend::observe_cancel`): once it
//!   is cancelled — by the first error of any stage, a lost lock, or a request of this
//!   store giving up after the whole retry timeout, which cancels it — every request in
//!   flight is abandoned with its reason (so an operation ends within moments of its
//!   first permanent failure instead of waiting for its other uploads). Requests started
//!   after it was cancelled, or while the store is *failing* (a request gave up and none
//!   has succeeded since), get a single round over the endpoints: the cleanup of the
//!   failed operation (its lock) is tried, but costs no second retry timeout.
//!
//! [`S3Options::retry_timeout`]: crate::S3Options::retry_timeout

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use blockproof_work::Cancel;
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::client::{HttpConnector, ReqwestConnector};
use object_store::{BackoffConfig, ClientOptions, RetryConfig};
use rand::Rng;

use crate::backend::RequestCounts;
use crate::problem::{one_line, Class, Problem};
use crate::S3Error;

/// The wait after the first failed round.
pub const FIRST_WAIT: Duration = Duration::from_millis(200);
/// The longest wait between two rounds.
pub const MAX_WAIT: Duration = Duration::from_secs(4);
/// What any attempt may take, before the time its bytes need.
pub const ATTEMPT_BASE: Duration = Duration::from_secs(30);
/// The slowest transfer rate an attempt is allowed, in bytes per second.
pub const SLOWEST_RATE: u64 = 64 << 10;
/// The longest any attempt may take: well under the hour after which gc aborts an
/// incomplete multipart upload (crate::multipart), since an attempt's upload is live
/// until the attempt ends.
pub const ATTEMPT_MAX: Duration = Duration::from_secs(50 * 60);

/// The wait before round `round + 1` (`round` ≥ 1 rounds have failed): "equal jitter" —
/// half of the doubling cap plus a random part of the other half.
pub fn wait(round: u32, rng: &mut impl Rng) -> Duration {
    let cap = FIRST_WAIT.saturating_mul(1u32 << round.saturating_sub(1).min(16)).min(MAX_WAIT);
    let half = cap / 2;
    half + half.mul_f64(rng.gen_range(0.0..=1.0))
}

/// How long one attempt moving `bytes` may take.
pub fn attempt_limit(bytes: u64) -> Duration {
    (ATTEMPT_BASE + Duration::from_secs(bytes / SLOWEST_RATE)).min(ATTEMPT_MAX)
}

/// The safety net on attempts: one per endpoint per second of the retry timeout, plus
/// twenty — the waits (at least [`MAX_WAIT`]/2 each once grown) never let a request
/// come near it.
pub fn max_attempts(endpoints: usize, timeout: Duration) -> u32 {
    (endpoints.max(1) as u64 * (timeout.as_secs() + 20)).min(u64::from(u32::MAX)) as u32
}

/// How often a request in flight looks at the operation's cancellation token (it is a
/// flag, [`Cancel`], shared with every other stage of the operation).
const CANCEL_POLL: Duration = Duration::from_millis(50);

/// Resolves once `cancel` is cancelled.
async fn cancelled(cancel: &Cancel) {
    while !cancel.is_cancelled() {
        tokio::time::sleep(CANCEL_POLL).await;
    }
}

fn abandoned(cancel: &Cancel) -> Failure {
    Failure::Failed(cancel.reason().unwrap_or_else(|| "the operation was cancelled".into()))
}

/// One endpoint: its URL (for messages), object_store's client bound to it, and a plain
/// HTTP client for the requests object_store does not make (crate::multipart).
#[derive(Clone)]
pub struct Endpoint {
    pub url: String,
    pub store: AmazonS3,
    pub http: object_store::client::HttpClient,
}

impl Endpoint {
    /// Completes `builder` (credentials, region and bucket set) for one endpoint:
    /// `url` is the endpoint in effect (`None`: AWS), which decides plain HTTP and
    /// path-style addressing. object_store's own retries are off — every call of it is
    /// one exchange (or one multipart upload), retried by [`Client::call`].
    pub fn new(builder: AmazonS3Builder, url: Option<String>, path_style: bool) -> Result<Endpoint, S3Error> {
        let retry = RetryConfig { backoff: BackoffConfig::default(), max_retries: 0, retry_timeout: Duration::ZERO };
        // Attempts are bounded by [`attempt_limit`]; the client's own limit on a whole
        // request is only a backstop.
        let client = ClientOptions::new()
            .with_timeout(Duration::from_secs(3600))
            .with_connect_timeout(Duration::from_secs(5))
            .with_allow_http(url.as_deref().is_some_and(|e| e.starts_with("http://")));
        // The payload is not part of the signature (UNSIGNED-PAYLOAD): hashing every
        // pack with SHA-256 on both ends would cost more CPU than compressing it, and
        // buys nothing — TLS protects the transfer and every pack is authenticated
        // (AEAD) and named by its hash, which `check` verifies.
        let store = builder
            .with_unsigned_payload(true)
            .with_virtual_hosted_style_request(!(path_style || url.is_some()))
            .with_retry(retry)
            .with_client_options(client.clone())
            .build()
            .map_err(|e| S3Error::Config(one_line(&e.to_string())))?;
        // For the requests object_store does not make (crate::multipart).
        let http =
            ReqwestConnector::default().connect(&client).map_err(|e| S3Error::Config(one_line(&e.to_string())))?;
        let url = url.unwrap_or_else(|| "https://s3.amazonaws.com".to_string());
        Ok(Endpoint { url: url.trim_end_matches('/').to_string(), store, http })
    }
}

/// Why a request did not succeed.
#[derive(Debug)]
pub enum Failure {
    /// The object does not exist.
    NotFound,
    /// The one-line error to report.
    Failed(String),
}

/// The endpoints of one store and the state every request of it shares.
pub struct Client {
    pub endpoints: Vec<Endpoint>,
    /// The endpoint that answered last: where requests start.
    preferred: AtomicUsize,
    pub timeout: Duration,
    /// Set when a request gave up after its whole retry timeout, cleared by the next
    /// success: until then new requests get a single round.
    failing: AtomicBool,
    /// The operation's cancellation token ([`Client::observe`]), if one was given.
    cancel: Mutex<Option<Cancel>>,
    pub counts: Arc<RequestCounts>,
}

impl Client {
    pub fn new(endpoints: Vec<Endpoint>, timeout: Duration, counts: Arc<RequestCounts>) -> Self {
        assert!(!endpoints.is_empty(), "a client needs an endpoint");
        Client {
            endpoints,
            preferred: AtomicUsize::new(0),
            timeout,
            failing: AtomicBool::new(false),
            cancel: Mutex::new(None),
            counts,
        }
    }

    /// Ties the requests to an operation's token (`Backend::observe_cancel`).
    pub fn observe(&self, cancel: &Cancel) {
        *self.cancel.lock().unwrap_or_else(|e| e.into_inner()) = Some(cancel.clone());
    }

    /// Whether a request gave up and none has succeeded since.
    pub fn failing(&self) -> bool {
        self.failing.load(Ordering::SeqCst)
    }

    fn answered(&self) {
        self.failing.store(false, Ordering::SeqCst);
    }

    /// Runs `attempt` (one HTTP exchange, or one multipart upload) against the endpoints
    /// under the rules of the module doc. `op` and `object` name the request in the error
    /// line; `bytes` is what it moves (for [`attempt_limit`]).
    pub async fn call<T, F, Fut>(&self, op: &str, object: &str, bytes: u64, attempt: F) -> Result<T, Failure>
    where
        F: Fn(&Endpoint) -> Fut,
        Fut: Future<Output = Result<T, Problem>>,
    {
        let start = Instant::now();
        let cancel = self.cancel.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let cancel = cancel.unwrap_or_default();
        // Started after the operation was cancelled (its cleanup), or while the store is
        // failing: one round, no waits, and nothing to abandon.
        let once = cancel.is_cancelled() || self.failing();
        let n = self.endpoints.len();
        let first = self.preferred.load(Ordering::Relaxed) % n;
        let limit = attempt_limit(bytes);
        let max = max_attempts(n, self.timeout);
        let mut tried: u32 = 0;
        // The failures of the current round, one per endpoint tried.
        let mut round: Vec<(usize, Problem)> = Vec::with_capacity(n);
        loop {
            let e = (first + tried as usize) % n;
            tried += 1;
            if tried > 1 {
                RequestCounts::add(&self.counts.retries, 1);
            }
            if !once && cancel.is_cancelled() {
                return Err(abandoned(&cancel));
            }
            let outcome = tokio::select! {
                biased;
                _ = cancelled(&cancel), if !once => return Err(abandoned(&cancel)),
                r = tokio::time::timeout(limit, attempt(&self.endpoints[e])) => r,
            };
            let problem = match outcome {
                Ok(Ok(v)) => {
                    self.preferred.store(e, Ordering::Relaxed);
                    self.answered();
                    return Ok(v);
                }
                Ok(Err(p)) => p,
                Err(_) => Problem::timed_out(limit),
            };
            match problem.class {
                Class::NotFound => {
                    self.preferred.store(e, Ordering::Relaxed);
                    self.answered();
                    return Err(Failure::NotFound);
                }
                Class::Permanent => {
                    self.answered();
                    let url = &self.endpoints[e].url;
                    return Err(Failure::Failed(format!(
                        "{object}: {op} failed: {url} {}: {}",
                        problem.what, problem.hint
                    )));
                }
                Class::Transient => {
                    if (tried as usize - 1).is_multiple_of(n) {
                        round.clear();
                    }
                    round.push((e, problem));
                }
            }
            // The other endpoints of this round at once; then wait.
            if !(tried as usize).is_multiple_of(n) {
                continue;
            }
            let elapsed = start.elapsed();
            if once || tried >= max || elapsed >= self.timeout {
                break;
            }
            let pause = wait(tried / n as u32, &mut rand::thread_rng()).min(self.timeout - elapsed);
            tokio::select! {
                biased;
                _ = cancelled(&cancel) => return Err(abandoned(&cancel)),
                _ = tokio::time::sleep(pause) => {}
            }
        }
        // Reported: what an endpoint answered (a node that is up says most, such as a
        // missing quorum), else the last failure; the other endpoints' in brackets.
        let main = round.iter().position(|(_, p)| p.answered).unwrap_or(round.len() - 1);
        let (e, problem) = round.remove(main);
        let others: Vec<String> = round.iter().map(|(o, p)| format!("{} {}", self.endpoints[*o].url, p.what)).collect();
        let others = if others.is_empty() { String::new() } else { format!(" (also {})", others.join(", ")) };
        let on = if n > 1 { format!(" on {n} endpoints") } else { String::new() };
        let tried_how = if once {
            let times = if tried == 1 { "once".to_string() } else { format!("{tried} times{on}") };
            if cancel.is_cancelled() {
                format!("tried {times}, not retried: the operation had already failed")
            } else {
                format!(
                    "tried {times}, not retried: another request already failed for the whole retry \
                     timeout and none has succeeded since"
                )
            }
        } else {
            format!(
                "tried {tried} times in {:.1} s{on} (retry timeout {} s)",
                start.elapsed().as_secs_f64(),
                self.timeout.as_secs()
            )
        };
        let msg = format!(
            "{object}: {op} failed: {} {}{others}; {tried_how}: {}",
            self.endpoints[e].url, problem.what, problem.hint
        );
        if !once {
            // The store is unreachable for now: the operation's other requests stop.
            self.failing.store(true, Ordering::SeqCst);
            cancel.cancel(msg.clone());
        }
        Err(Failure::Failed(msg))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_double_with_jitter_up_to_the_cap() {
        let mut rng = rand::thread_rng();
        for round in 1..40 {
            let cap = (FIRST_WAIT * 2u32.pow((round - 1).min(10))).min(MAX_WAIT);
            for _ in 0..50 {
                let w = wait(round, &mut rng);
                assert!(w >= cap / 2 && w <= cap, "round {round}: {w:?} outside {:?}..={cap:?}", cap / 2);
            }
        }
        assert_eq!(wait(1, &mut rng).max(FIRST_WAIT), FIRST_WAIT);
    }

    /// The schedule reaches the retry timeout long before the attempt count: a request
    /// that fails at once is retried for the whole timeout (issue 22: object_store's
    /// count of 20 ended retries after 5 to 40 s of a 120 s timeout).
    #[test]
    fn the_count_is_only_a_safety_net() {
        let mut rng = rand::thread_rng();
        for (endpoints, secs) in [(1, 1), (1, 10), (1, 120), (3, 120), (1, 3600)] {
            let timeout = Duration::from_secs(secs);
            let (mut elapsed, mut tried, mut round) = (Duration::ZERO, 0u32, 0u32);
            while elapsed < timeout {
                tried += endpoints;
                round += 1;
                elapsed += wait(round, &mut rng).min(timeout - elapsed);
            }
            assert!(
                u64::from(tried) * 2 < u64::from(max_attempts(endpoints as usize, timeout)),
                "{endpoints} endpoints, {secs} s: {tried} attempts"
            );
        }
    }

    #[test]
    fn an_attempt_may_take_longer_the_more_it_moves() {
        assert_eq!(attempt_limit(0), ATTEMPT_BASE);
        assert_eq!(attempt_limit(16 << 20), ATTEMPT_BASE + Duration::from_secs(256));
        assert_eq!(attempt_limit(u64::MAX), ATTEMPT_MAX);
    }

    /// gc aborts incomplete multipart uploads an hour old (blockproof_core::gc::TEMP_AGE):
    /// an attempt, whose upload is live until it ends, must end well before that.
    #[test]
    fn no_attempt_lives_as_long_as_gc_waits_for_an_upload() {
        let gc_age = Duration::from_secs(3600);
        assert!(attempt_limit(u64::MAX) + Duration::from_secs(5 * 60) <= gc_age, "{:?}", attempt_limit(u64::MAX));
    }
}
