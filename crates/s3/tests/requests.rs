//! How one request is retried, failed over and reported (crate::retry, crate::problem),
//! against a fake S3 endpoint on loopback that answers what each test scripts: a 503
//! with no body, a quorum error in XML with entities, a refused connection, a 403, an
//! answer that never comes. object_store makes the requests as it does against a real
//! store, so its wording of errors is part of what is tested.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use blockproof_s3::retry::{Client, Endpoint, Failure};
use blockproof_s3::RequestCounts;
use blockproof_work::Cancel;
use object_store::aws::AmazonS3Builder;
use object_store::path::Path;
use object_store::ObjectStoreExt;

/// What the fake answers: the whole HTTP response, or `None` to hold the connection
/// open without answering.
type Script = dyn Fn(usize) -> Option<String> + Send + Sync;

/// A fake endpoint: answers every request by its script (the argument counts requests
/// from 0); stops when dropped.
struct Fake {
    url: String,
    requests: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Fake {
    fn start(script: impl Fn(usize) -> Option<String> + Send + Sync + 'static) -> Fake {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (requests, stop) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicBool::new(false)));
        let script: Arc<Script> = Arc::new(script);
        let thread = {
            let (requests, stop) = (requests.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut held = Vec::new();
                for stream in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        return;
                    }
                    let Ok(stream) = stream else { continue };
                    let n = requests.fetch_add(1, Ordering::SeqCst);
                    if let Some(stream) = answer(stream, script(n)) {
                        held.push(stream);
                    }
                }
            })
        };
        Fake { url, requests, stop, thread: Some(thread) }
    }

    fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }
}

/// Reads one request and writes `response` (closing the connection); with `None`, keeps
/// the connection open and unanswered (returned, to be held).
fn answer(stream: TcpStream, response: Option<String>) -> Option<TcpStream> {
    let mut reader = BufReader::new(stream.try_clone().ok()?);
    let mut length = 0usize;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).ok()? == 0 {
            return None;
        }
        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
            length = v.trim().parse().unwrap_or(0);
        }
        if line == "\r\n" {
            break;
        }
    }
    let mut body = vec![0u8; length];
    reader.read_exact(&mut body).ok()?;
    let Some(response) = response else { return Some(stream) };
    let mut stream = stream;
    let _ = stream.write_all(response.as_bytes());
    None
}

impl Drop for Fake {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.url.trim_start_matches("http://"));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn response(status: &str, headers: &str, body: &str) -> String {
    format!("HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n{headers}\r\n{body}", body.len())
}

/// An address where nothing listens.
fn refusing() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    format!("http://{}", listener.local_addr().unwrap())
}

fn client(urls: &[&str], timeout: Duration) -> Client {
    let endpoints = urls
        .iter()
        .map(|url| {
            let builder = AmazonS3Builder::new()
                .with_bucket_name("bkt")
                .with_region("garage")
                .with_access_key_id("GK0123")
                .with_secret_access_key("secret");
            Endpoint::new(builder.with_endpoint(*url), Some(url.to_string()), true).unwrap()
        })
        .collect();
    Client::new(endpoints, timeout, Arc::new(RequestCounts::default()))
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

/// One GET of `key` through the client.
fn get(rt: &tokio::runtime::Runtime, client: &Client, key: &str) -> Result<Vec<u8>, Failure> {
    let path = Path::from(key);
    rt.block_on(client.call("GET", &format!("s3://bkt/{key}"), 0, |ep| {
        let (store, path) = (ep.store.clone(), path.clone());
        async move {
            let r: Result<_, object_store::Error> = async { store.get(&path).await?.bytes().await }.await;
            r.map(|b| b.to_vec()).map_err(|e| blockproof_s3::problem::Problem::of_store(&e))
        }
    }))
}

fn failed(r: Result<Vec<u8>, Failure>) -> String {
    match r {
        Err(Failure::Failed(msg)) => {
            assert!(!msg.contains('\n'), "one line: {msg}");
            msg
        }
        other => panic!("expected a failure, got {other:?}"),
    }
}

const OK_HEADERS: &str = "ETag: \"abc\"\r\nLast-Modified: Wed, 02 Dec 2026 00:00:00 GMT\r\n";

/// A 503 with an empty body is retried until the retry timeout (not cut short by a
/// count), and the error says in words what the endpoint did, what was tried and what
/// to do — where the old client printed `503 Service Unavailable:` and nothing else.
#[test]
fn an_empty_503_is_retried_for_the_timeout_and_reported_in_words() {
    let fake = Fake::start(|_| Some(response("503 Service Unavailable", "", "")));
    let rt = runtime();
    let c = client(&[&fake.url], Duration::from_secs(2));
    let msg = failed(get(&rt, &c, "repo/config"));
    let expected = format!(
        "s3://bkt/repo/config: GET failed: {} answered 503 Service Unavailable with no explanation; tried ",
        fake.url
    );
    assert!(msg.starts_with(&expected), "{msg}");
    assert!(msg.contains("(retry timeout 2 s): the store is overloaded or some of its nodes are down"), "{msg}");
    // Waits of 0.1–0.2, 0.2–0.4, 0.4–0.8 and 0.8–1.6 s fit in 2 s: at least 4 attempts.
    assert!(fake.requests() >= 4, "{} requests: {msg}", fake.requests());
    assert_eq!(c.counts.retries.load(Ordering::Relaxed) as usize, fake.requests() - 1);
}

/// Garage's quorum error: XML with `&quot;` entities becomes its code and message,
/// decoded, with the hint for a cluster missing nodes.
#[test]
fn a_quorum_error_is_one_readable_line() {
    let xml = "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>ServiceUnavailable</Code><Message>Internal \
               error: Could not reach quorum of 2. 1 of 3 request succeeded, others returned errors: \
               [&quot;Network error: Not connected: 3758b8b8db41d6d0&quot;]</Message><Resource>/bkt/k</Resource>\
               <Region>garage</Region></Error>";
    let fake =
        Fake::start(move |_| Some(response("503 Service Unavailable", "Content-Type: application/xml\r\n", xml)));
    let rt = runtime();
    let msg = failed(get(&rt, &client(&[&fake.url], Duration::from_millis(500)), "k"));
    assert!(
        msg.contains(&format!(
            "{} answered 503 Service Unavailable: ServiceUnavailable: Internal error: Could not reach quorum of 2.",
            fake.url
        )),
        "{msg}"
    );
    assert!(msg.contains("[\"Network error: Not connected: 3758b8b8db41d6d0\"]"), "{msg}");
    assert!(!msg.contains("&quot;") && !msg.contains('<'), "{msg}");
    assert!(msg.ends_with("too few of the cluster's nodes answer to store or read the object: bring the nodes back, or allow longer with --s3-retry-timeout"), "{msg}");
}

/// A refused connection says so (the old client: `HTTP error: error sending request`).
#[test]
fn a_refused_connection_is_named() {
    let url = refusing();
    let rt = runtime();
    let msg = failed(get(&rt, &client(&[&url], Duration::from_millis(500)), "k"));
    assert!(msg.contains(&format!("{url} refused the connection (nothing listens there); tried ")), "{msg}");
    assert!(msg.ends_with("check that the S3 service runs there and is reachable; with a cluster, list several of its nodes in --s3-endpoint"), "{msg}");
}

/// A 403 is an answer another attempt would repeat: tried once, reported with its code.
#[test]
fn a_permanent_error_is_not_retried() {
    let body = "<Error><Code>AccessDenied</Code><Message>Forbidden: no such key</Message></Error>";
    let fake = Fake::start(move |_| Some(response("403 Forbidden", "", body)));
    let rt = runtime();
    let msg = failed(get(&rt, &client(&[&fake.url], Duration::from_secs(5)), "k"));
    assert_eq!(fake.requests(), 1, "{msg}");
    assert_eq!(
        msg,
        format!(
            "s3://bkt/k: GET failed: {} answered 403 Forbidden: AccessDenied: Forbidden: no such key: check that the \
             key (AWS_ACCESS_KEY_ID) may read, write, list and delete objects in this bucket",
            fake.url
        )
    );
}

/// With several endpoints, a request goes on to the next when one refuses, and later
/// requests start at the one that answered.
#[test]
fn requests_fail_over_between_endpoints() {
    let fake = Fake::start(|_| Some(response("200 OK", OK_HEADERS, "hello")));
    let down = refusing();
    let rt = runtime();
    let c = client(&[&down, &fake.url], Duration::from_secs(5));
    assert_eq!(get(&rt, &c, "k").unwrap(), b"hello");
    assert_eq!(c.counts.retries.load(Ordering::Relaxed), 1, "one attempt on the refusing endpoint");
    assert_eq!(get(&rt, &c, "k").unwrap(), b"hello");
    assert_eq!(c.counts.retries.load(Ordering::Relaxed), 1, "the next request starts where the last answered");
    assert_eq!(fake.requests(), 2);
}

/// A request waiting on an answer that never comes is abandoned when the operation is
/// cancelled, with the operation's reason — not after its attempt limit (30 s); and a
/// request started after the cancellation (cleanup) is tried once, not retried.
#[test]
fn cancelling_the_operation_abandons_requests_in_flight() {
    let fake = Fake::start(|n| if n == 0 { None } else { Some(response("503 Service Unavailable", "", "")) });
    let rt = runtime();
    let c = client(&[&fake.url], Duration::from_secs(60));
    let cancel = Cancel::new();
    c.observe(&cancel);
    let canceller = {
        let (cancel, requests) = (cancel.clone(), fake.requests.clone());
        std::thread::spawn(move || {
            while requests.load(Ordering::SeqCst) == 0 {
                std::thread::sleep(Duration::from_millis(10));
            }
            cancel.cancel("s3://bkt/other: PUT failed: the first error");
        })
    };
    let msg = failed(get(&rt, &c, "stalled"));
    canceller.join().unwrap();
    assert_eq!(msg, "s3://bkt/other: PUT failed: the first error");
    let msg = failed(get(&rt, &c, "lock"));
    assert_eq!(fake.requests(), 2, "tried once: {msg}");
    assert!(msg.ends_with("tried once, not retried: the operation had already failed: the store is overloaded or some of its nodes are down: check its nodes and logs, or allow longer with --s3-retry-timeout"), "{msg}");
}

/// A request that gives up after the retry timeout cancels the operation, so its other
/// requests stop too.
#[test]
fn giving_up_cancels_the_operation() {
    let fake = Fake::start(|_| Some(response("500 Internal Server Error", "", "disk full")));
    let rt = runtime();
    let c = client(&[&fake.url], Duration::from_millis(300));
    let cancel = Cancel::new();
    c.observe(&cancel);
    let msg = failed(get(&rt, &c, "k"));
    assert!(msg.contains("answered 500 Internal Server Error: disk full; tried "), "{msg}");
    assert_eq!(cancel.reason().as_deref(), Some(msg.as_str()));
}

/// With several endpoints failing, the line leads with what a node that is up answered
/// (it says most: a missing quorum) and names the others' failures in brackets.
#[test]
fn the_answer_of_a_node_that_is_up_leads_the_line() {
    let body = "<Error><Code>ServiceUnavailable</Code><Message>Could not reach quorum of 2</Message></Error>";
    let fake = Fake::start(move |_| Some(response("503 Service Unavailable", "", body)));
    let down = refusing();
    let rt = runtime();
    let msg = failed(get(&rt, &client(&[&fake.url, &down], Duration::from_millis(500)), "k"));
    let expected = format!(
        "s3://bkt/k: GET failed: {} answered 503 Service Unavailable: ServiceUnavailable: Could not reach quorum of 2 \
         (also {down} refused the connection (nothing listens there)); tried ",
        fake.url
    );
    assert!(msg.starts_with(&expected), "{msg}");
    assert!(msg.contains(" on 2 endpoints (retry timeout 0 s): too few of the cluster's nodes answer"), "{msg}");
}

/// `Date` and a `ListMultipartUploadsResult` page as a store answers it: `date` is the
/// store's clock, each upload `(key, id, initiated)`, and `next` the markers of a
/// truncated page.
fn listing(date: std::time::SystemTime, uploads: &[(&str, &str, std::time::SystemTime)], next: Option<&str>) -> String {
    let http_date = chrono::DateTime::<chrono::Utc>::from(date).format("%a, %d %b %Y %H:%M:%S GMT");
    let mut xml = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?><ListMultipartUploadsResult>");
    match next {
        Some(m) => xml.push_str(&format!(
            "<IsTruncated>true</IsTruncated><NextKeyMarker>{m}</NextKeyMarker><NextUploadIdMarker>{m}</NextUploadIdMarker>"
        )),
        None => xml.push_str("<IsTruncated>false</IsTruncated>"),
    }
    for (key, id, initiated) in uploads {
        let t = humantime::format_rfc3339_millis(*initiated);
        xml.push_str(&format!("<Upload><Key>{key}</Key><UploadId>{id}</UploadId><Initiated>{t}</Initiated></Upload>"));
    }
    xml.push_str("</ListMultipartUploadsResult>");
    response("200 OK", &format!("Date: {http_date}\r\nContent-Type: application/xml\r\n"), &xml)
}

/// gc aborts the incomplete uploads of packs by their age on the store's clock (the
/// `Date` of its answer), not this host's: with the store's clock two hours behind, an
/// upload it started a minute ago is a running backup's and stays; one it started three
/// hours ago goes. Before, the host's clock made both look older than an hour.
#[test]
fn an_uploads_age_is_judged_by_the_stores_clock() {
    use std::time::SystemTime;
    let store_now = SystemTime::now() - Duration::from_secs(2 * 3600);
    let page = listing(
        store_now,
        &[
            ("repo/data/ab/ab01", "live", store_now - Duration::from_secs(60)),
            ("repo/data/cd/cd01", "stale", store_now - Duration::from_secs(3 * 3600)),
        ],
        None,
    );
    let fake = Fake::start(move |n| Some(if n == 0 { page.clone() } else { response("204 No Content", "", "") }));
    let rt = runtime();
    let c = client(&[&fake.url], Duration::from_secs(5));
    let location = blockproof_s3::S3Location::parse("s3://bkt/repo").unwrap();
    let aborted =
        rt.block_on(blockproof_s3::multipart::abort_stale_uploads(&c, &location, Duration::from_secs(3600))).unwrap();
    assert_eq!((aborted, fake.requests()), (1, 2), "one listing, one abort");
}

/// A listing whose pages never end (a broken or hostile endpoint handing back markers
/// it gave before) is an error, not a gc that lists for ever.
#[test]
fn a_listing_that_repeats_its_markers_is_an_error() {
    let now = std::time::SystemTime::now();
    let fake = Fake::start(move |n| Some(listing(now, &[], Some(if n % 2 == 0 { "a" } else { "b" }))));
    let (tx, rx) = std::sync::mpsc::channel();
    let url = fake.url.clone();
    std::thread::spawn(move || {
        let rt = runtime();
        let c = client(&[&url], Duration::from_secs(5));
        let _ = tx.send(rt.block_on(blockproof_s3::multipart::list_uploads(&c, "bkt", "repo/data/")).map(|u| u.len()));
    });
    let r = rx.recv_timeout(Duration::from_secs(30)).expect("the listing must end");
    let e = r.expect_err("a listing that repeats itself").to_string();
    assert!(e.contains("repeats its page marker"), "{e}");
    assert_eq!(fake.requests(), 3, "{e}");
}

/// An answer longer than any listing page is not read whole into memory: the request
/// fails once it passes the bound.
#[test]
fn an_overlong_answer_is_not_read_whole() {
    let body = "x".repeat(blockproof_s3::multipart::BODY_MAX + 1);
    let fake = Fake::start(move |_| Some(response("200 OK", "", &body)));
    let rt = runtime();
    let c = client(&[&fake.url], Duration::from_secs(5));
    let e = rt.block_on(blockproof_s3::multipart::list_uploads(&c, "bkt", "repo/data/")).unwrap_err().to_string();
    assert!(e.contains("answered with more than 8 MiB"), "{e}");
    assert_eq!(fake.requests(), 1, "{e}");
}
