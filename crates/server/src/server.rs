//! The listener: TLS 1.3 over TCP, HTTP/1.1 by hyper, authentication, limits and
//! graceful shutdown around [`crate::service::execute`].
//!
//! Limits: a request body larger than [`Options::max_body`] is refused before it is
//! read (`413`); a body must arrive within [`BODY_TIMEOUT`], headers within
//! [`HEADER_TIMEOUT`], the TLS handshake within [`HANDSHAKE_TIMEOUT`]; at most
//! [`Options::max_connections`] connections are served at once (more wait in the
//! kernel's backlog); a token has at most [`Options::per_token`] requests in progress
//! (more are refused with `429`, which the client retries). On SIGTERM or SIGINT the
//! server stops accepting, answers `503` to new requests on open connections, lets the
//! requests in progress finish (each write is atomic in the store, so nothing is ever
//! half-visible) and exits.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::{TokioIo, TokioTimer};

use crate::audit::{Audit, Event};
use crate::route::{Route, RouteError};
use crate::service::{execute, Answer, Repositories, Served};
use crate::token::{authenticate, TokenEntry, TokenStore};
use crate::ServerError;

pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(30);
pub const BODY_TIMEOUT: Duration = Duration::from_secs(300);
/// How often the trash is purged of entries past their grace period.
const PURGE_EVERY: Duration = Duration::from_secs(3600);

/// How a server runs.
#[derive(Clone, Debug)]
pub struct Options {
    pub listen: SocketAddr,
    pub state_dir: PathBuf,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// Extra names (DNS or IP) of a generated certificate.
    pub names: Vec<String>,
    /// How long the trash keeps what requests removed or replaced.
    pub trash_grace: Duration,
    pub max_body: u64,
    pub per_token: usize,
    pub max_connections: usize,
    /// The audit log rotates at this size.
    pub audit_max: u64,
}

/// What a started server tells its caller.
#[derive(Clone, Debug)]
pub struct Started {
    pub addr: SocketAddr,
    pub fingerprint: String,
    pub certificate: PathBuf,
    pub generated: bool,
}

struct TokenCache {
    stamp: Option<(SystemTime, u64, u64)>,
    entries: Arc<Vec<TokenEntry>>,
}

struct Shared {
    repos: Repositories,
    store: TokenStore,
    tokens: Mutex<TokenCache>,
    audit: Audit,
    in_progress: Mutex<HashMap<String, usize>>,
    stopping: AtomicBool,
    options: Options,
}

impl Shared {
    /// The tokens, reloaded when the file changed (so a revocation holds at once).
    /// A file that cannot be read fails closed.
    fn tokens(&self) -> Result<Arc<Vec<TokenEntry>>, ServerError> {
        use std::os::unix::fs::MetadataExt;
        let stamp = std::fs::metadata(self.store.path())
            .ok()
            .map(|m| (m.modified().unwrap_or(SystemTime::UNIX_EPOCH), m.len(), m.ino()));
        let mut cache = self.tokens.lock().expect("token cache");
        if cache.stamp != stamp || stamp.is_none() {
            cache.entries = Arc::new(self.store.load()?);
            cache.stamp = stamp;
        }
        Ok(cache.entries.clone())
    }
}

/// Releases a token's request slot.
struct Slot<'a> {
    shared: &'a Shared,
    token: String,
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        let mut map = self.shared.in_progress.lock().expect("in progress");
        if let Some(n) = map.get_mut(&self.token) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.token);
            }
        }
    }
}

fn response(answer: Answer) -> Response<Full<Bytes>> {
    let mut builder = Response::builder().status(answer.status);
    let has_length = answer.headers.iter().any(|(h, _)| *h == "content-length");
    for (h, v) in &answer.headers {
        builder = builder.header(*h, v);
    }
    let body = if has_length { Full::new(Bytes::new()) } else { Full::new(Bytes::from(answer.body)) };
    builder.body(body).expect("a valid response")
}

async fn handle(
    req: Request<Incoming>,
    peer: SocketAddr,
    shared: Arc<Shared>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    Ok(response(answer(req, peer, &shared).await))
}

async fn answer(req: Request<Incoming>, peer: SocketAddr, shared: &Arc<Shared>) -> Answer {
    if shared.stopping.load(Ordering::Relaxed) {
        return Answer::text(503, "the server is shutting down");
    }
    let header = |name: &str| req.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_string);
    let route = match Route::parse(req.method().as_str(), req.uri().path(), header("range").as_deref()) {
        Ok(r) => r,
        Err(e @ RouteError::NotFound) => return Answer::text(404, e.to_string()),
        Err(e @ RouteError::Method(_)) => return Answer::text(405, e.to_string()),
        Err(e @ RouteError::Bad(_)) => return Answer::text(400, e.to_string()),
    };
    let vm = header(crate::route::VM);
    if vm.as_deref().is_some_and(|v| !crate::route::valid_vm_name(v)) {
        return Answer::text(400, "an invalid vm name in blockproof-vm");
    }
    let tokens = match shared.tokens() {
        Ok(t) => t,
        Err(e) => {
            eprintln!("blockproof server: {e}");
            return Answer::text(503, "the server cannot read its token file");
        }
    };
    let secret =
        header("authorization").and_then(|v| v.strip_prefix("Bearer ").map(str::to_string)).unwrap_or_default();
    let Some(token) = authenticate(&tokens, &secret) else {
        let named = secret.strip_prefix("bpt_").and_then(|s| s.rsplit_once('.')).map(|(n, _)| n).unwrap_or("");
        let _ = shared.audit.record(&Event {
            time: crate::audit::now_text(),
            from: peer.to_string(),
            token: named,
            role: "",
            repo: route.repo(),
            op: "authenticate",
            kind: "",
            name: "",
            bytes: 0,
            outcome: "refused",
            detail: "unknown or revoked token",
        });
        return Answer::text(401, "unknown or revoked token");
    };
    let repo_name = route.repo().to_string();
    if !shared.repos.contains_key(&repo_name) {
        return Answer::text(404, format!("no repository {repo_name} on this server"));
    }
    if !token.may_use(&repo_name) {
        let why = format!("token {} may not use repository {repo_name}", token.name);
        let _ = shared.audit.record(&Event {
            time: crate::audit::now_text(),
            from: peer.to_string(),
            token: &token.name,
            role: token.role.name(),
            repo: &repo_name,
            op: "use",
            kind: "",
            name: "",
            bytes: 0,
            outcome: "refused",
            detail: &why,
        });
        return Answer::text(403, why);
    }
    {
        let mut map = shared.in_progress.lock().expect("in progress");
        let n = map.entry(token.name.clone()).or_insert(0);
        if *n >= shared.options.per_token {
            return Answer::text(429, format!("token {} has {} requests in progress already", token.name, *n));
        }
        *n += 1;
    }
    let slot = Slot { shared, token: token.name.clone() };
    let body = if matches!(route, Route::Write { .. }) {
        let max = shared.options.max_body;
        if header("content-length").and_then(|l| l.parse::<u64>().ok()).is_some_and(|l| l > max) {
            return Answer::text(413, format!("a request body may be at most {max} bytes"));
        }
        let limited = Limited::new(req.into_body(), max as usize);
        match tokio::time::timeout(BODY_TIMEOUT, limited.collect()).await {
            Ok(Ok(collected)) => collected.to_bytes(),
            Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => {
                return Answer::text(413, format!("a request body may be at most {max} bytes"))
            }
            Ok(Err(_)) => return Answer::text(400, "the request body was cut off"),
            Err(_) => return Answer::text(408, "the request body did not arrive in time"),
        }
    } else {
        bytes::Bytes::new()
    };
    let token = token.clone();
    let from = peer.to_string();
    let shared2 = shared.clone();
    let answer = tokio::task::spawn_blocking(move || {
        let served: &Served = &shared2.repos[&repo_name];
        let request = crate::service::Request { token: &token, vm, from, audit: &shared2.audit };
        execute(served, route, body, &request)
    })
    .await
    .unwrap_or_else(|_| Answer::text(500, "the request failed inside the server"));
    drop(slot);
    answer
}

fn purge_all(shared: &Shared) {
    for (name, served) in &shared.repos {
        match served.trash.purge(shared.options.trash_grace) {
            Ok(0) => {}
            Ok(n) => eprintln!("blockproof server: purged {n} trash entries of {name} past their grace period"),
            Err(e) => eprintln!("blockproof server: purging the trash of {name}: {e}"),
        }
    }
}

/// Serves `repos` until SIGTERM or SIGINT. `on_start` is called once the socket listens.
pub fn serve(
    options: Options,
    repos: Vec<(String, Arc<dyn blockproof_store::Backend>)>,
    on_start: impl FnOnce(&Started),
) -> Result<(), ServerError> {
    std::fs::create_dir_all(&options.state_dir).map_err(|e| ServerError::io(&options.state_dir, e))?;
    let identity =
        crate::tls::identity(&options.state_dir, options.cert.as_deref(), options.key.as_deref(), &options.names)?;
    let (tls, fingerprint) = crate::tls::server_config(&identity)?;
    let mut served = Repositories::new();
    for (name, backend) in repos {
        if !crate::route::valid_repo_name(&name) {
            return Err(ServerError::Config(format!("invalid repository name {name:?}: 1-64 of [A-Za-z0-9_-]")));
        }
        if served.insert(name.clone(), Served::new(backend, &options.state_dir, &name)).is_some() {
            return Err(ServerError::Config(format!("repository {name} given twice")));
        }
    }
    let store = TokenStore::new(&options.state_dir);
    store.load()?;
    let audit = Audit::open(&options.state_dir.join("audit.log"), options.audit_max)?;
    let shared = Arc::new(Shared {
        repos: served,
        store,
        tokens: Mutex::new(TokenCache { stamp: None, entries: Arc::new(Vec::new()) }),
        audit,
        in_progress: Mutex::new(HashMap::new()),
        stopping: AtomicBool::new(false),
        options: options.clone(),
    });
    purge_all(&shared);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("blockproof-server")
        .build()
        .map_err(|e| ServerError::io(Path::new("tokio runtime"), e))?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(options.listen)
            .await
            .map_err(|e| ServerError::Listen(options.listen.to_string(), e))?;
        let addr = listener.local_addr().map_err(|e| ServerError::Listen(options.listen.to_string(), e))?;
        on_start(&Started { addr, fingerprint, certificate: identity.cert.clone(), generated: identity.generated });
        let acceptor = tokio_rustls::TlsAcceptor::from(tls);
        let connections = Arc::new(tokio::sync::Semaphore::new(options.max_connections.max(1)));
        let graceful = hyper_util::server::graceful::GracefulShutdown::new();
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .map_err(|e| ServerError::io(Path::new("SIGTERM handler"), e))?;
        let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
            .map_err(|e| ServerError::io(Path::new("SIGINT handler"), e))?;
        let purger = shared.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(PURGE_EVERY);
            every.tick().await;
            loop {
                every.tick().await;
                let s = purger.clone();
                let _ = tokio::task::spawn_blocking(move || purge_all(&s)).await;
            }
        });
        loop {
            let permit = tokio::select! {
                _ = term.recv() => break,
                _ = int.recv() => break,
                p = connections.clone().acquire_owned() => p.expect("semaphore open"),
            };
            let (tcp, peer) = tokio::select! {
                _ = term.recv() => break,
                _ = int.recv() => break,
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        eprintln!("blockproof server: accept: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = acceptor.clone();
            let shared = shared.clone();
            let watcher = graceful.watcher();
            tokio::spawn(async move {
                let _permit = permit;
                let Ok(Ok(stream)) = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await else {
                    return;
                };
                let service = hyper::service::service_fn(move |req| handle(req, peer, shared.clone()));
                let conn = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(HEADER_TIMEOUT)
                    .serve_connection(TokioIo::new(stream), service);
                let _ = watcher.watch(conn).await;
            });
        }
        shared.stopping.store(true, Ordering::Relaxed);
        drop(listener);
        eprintln!("blockproof server: stopping: finishing the requests in progress");
        if tokio::time::timeout(Duration::from_secs(30), graceful.shutdown()).await.is_err() {
            eprintln!("blockproof server: requests still in progress after 30 s were abandoned");
        }
        Ok::<(), ServerError>(())
    })?;
    runtime.shutdown_timeout(Duration::from_secs(30));
    Ok(())
}
